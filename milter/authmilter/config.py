"""Configuration: OpenDKIM- and OpenDMARC-compatible files into one frozen, typed ``Config``.

The file syntax is theirs: ``Name value`` per line, ``#`` starts a comment, booleans by their first
character, ``Include`` pulls in another file (five levels deep at most). A user's existing
``opendkim.conf`` and ``opendmarc.conf`` are read unchanged (:func:`load_split`), or one merged file
(:func:`load_config`); both give equal ``Config`` values.

Every directive either of them knows is in :data:`DIRECTIVES` with its type, default, component and
whether authmilter honours it. A known but unimplemented directive is a warning naming it with
file:line; an unknown name is an error with a "did you mean" suggestion; a bad value is an error
with file:line.
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import pwd
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

from authmilter.errors import ConfigError, Location

MAX_INCLUDE_DEPTH = 5


class Component(StrEnum):
    """Which anchor program a directive comes from."""

    OPENDKIM = "opendkim"
    OPENDMARC = "opendmarc"
    BOTH = "opendkim+opendmarc"
    POLICYD_SPF = "policyd-spf"
    AUTHMILTER = "authmilter"


class Support(StrEnum):
    """What authmilter does with a directive it recognises."""

    SUPPORTED = "supported"
    IGNORED = "ignored"  # recognised, not implemented: warned about with file:line
    FIXED = "fixed"  # authmilter always behaves as one value: the other is warned about
    RESOLVER = "resolver"  # configured the anchors' resolver library: warned about, not fatal


class Kind(StrEnum):
    """The value type of a directive, as the anchors' man pages name it (plus our refinements)."""

    BOOL = "Boolean"
    INT = "integer"
    OCTAL = "octal integer"
    STRING = "string"
    DATASET = "dataset"
    HOSTS = "host list (dataset)"
    HEADERS = "header-name list (dataset)"
    LIST = "comma-separated list"
    ACTION = "action"
    SOCKET = "socket"
    CANON = "canonicalization"
    MODE = "mode"
    ALGORITHM = "signature algorithm"
    CHOICE = "one of"


class Action(StrEnum):
    """A milter action chosen by the ``On-*`` directives; abbreviations as OpenDKIM's."""

    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCARD = "discard"
    QUARANTINE = "quarantine"


class Canon(StrEnum):
    """A DKIM canonicalization algorithm (RFC 6376 §3.4)."""

    SIMPLE = "simple"
    RELAXED = "relaxed"


class SignatureAlgorithm(StrEnum):
    """The DKIM ``a=`` values we can sign with (RFC 6376, RFC 8301, RFC 8463)."""

    RSA_SHA256 = "rsa-sha256"
    RSA_SHA1 = "rsa-sha1"
    ED25519_SHA256 = "ed25519-sha256"


@dataclass(frozen=True, slots=True)
class DatasetSpec:
    """A dataset named in the configuration, with where it was named (not part of equality)."""

    spec: str
    where: Location | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True, slots=True)
class Directive:
    """One row of the directive table."""

    name: str
    kind: Kind
    default: Any
    component: Component
    support: Support
    doc: str
    attr: str = ""  # the Config attribute; derived from the name when empty
    choices: tuple[str, ...] = ()  # for Kind.CHOICE: the accepted spellings (case-insensitive)
    fixed: Any = None  # for Support.FIXED: the value authmilter always behaves as

    @property
    def field_name(self) -> str:
        """The snake_case attribute name on :class:`Config`."""
        return self.attr or snake_case(self.name)


def snake_case(name: str) -> str:
    """``On-BadSignature`` → ``on_bad_signature``, ``DNSTimeout`` → ``dns_timeout``."""
    s = name.replace("-", "_")
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", s)
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s)
    return s.lower().replace("__", "_")


# RFC 6376 §5.4.1: fields that SHOULD be signed (the OpenDKIM default SignHeaders), and the ones
# that SHOULD NOT be (the OpenDKIM default OmitHeaders).
DEFAULT_SIGN_HEADERS = (
    "From", "Reply-To", "Subject", "Date", "To", "Cc", "Resent-Date", "Resent-From",
    "Resent-To", "Resent-Cc", "In-Reply-To", "References", "List-Id", "List-Help",
    "List-Unsubscribe", "List-Subscribe", "List-Post", "List-Owner", "List-Archive",
    "Message-ID", "Sender", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
    "Content-ID", "Content-Description",
)  # fmt: skip
DEFAULT_OMIT_HEADERS = (
    "Return-Path", "Received", "Comments", "Keywords", "Bcc", "Resent-Bcc", "DKIM-Signature",
)  # fmt: skip

D, M, B, A = Component.OPENDKIM, Component.OPENDMARC, Component.BOTH, Component.AUTHMILTER
P = Component.POLICYD_SPF
S, IG, R, FX = Support.SUPPORTED, Support.IGNORED, Support.RESOLVER, Support.FIXED


def _d(name: str, kind: Kind, default: Any, comp: Component, sup: Support, doc: str,
       attr: str = "", choices: tuple[str, ...] = (), fixed: Any = None) -> Directive:  # fmt: skip
    return Directive(name, kind, default, comp, sup, doc, attr, choices, fixed)


HELO_REJECT_CHOICES = ("Fail", "SPF_Not_Pass", "Softfail", "Null", "False", "No_Check")
MAIL_FROM_REJECT_CHOICES = ("Fail", "SPF_Not_Pass", "Softfail", "False", "No_Check")
DEFAULT_SKIP_ADDRESSES = ("127.0.0.0/8", "::ffff:127.0.0.0/104", "::1")
DEFAULT_REASON_MESSAGE = "Message {rejectdefer} due to: {spf}. Please see {url}"


#: Every directive of OpenDKIM 2.11 and OpenDMARC 1.4, plus authmilter's own.
DIRECTIVES: tuple[Directive, ...] = (
    # -- OpenDKIM ---------------------------------------------------------------------------
    _d("AllowSHA1Only", Kind.BOOL, False, D, IG, "For OpenSSL builds without SHA-256."),
    _d("AlwaysAddARHeader", Kind.BOOL, False, D, S,
       "Add Authentication-Results (dkim=none) even to unsigned mail."),
    _d("AuthservID", Kind.STRING, None, B, S,
       "authserv-id of our Authentication-Results. Unset: the MTA's name (the `{j}` macro, "
       "Postfix's `myhostname`), as OpenDKIM and OpenDMARC; `HOSTNAME`: this host's name.",
       "authserv_id"),
    _d("AuthservIDWithJobID", Kind.BOOL, False, B, S,
       "Append `/<queue id>` to the authserv-id.", "authserv_id_with_job_id"),
    _d("AutoRestart", Kind.BOOL, False, B, IG, "Use the service manager (systemd `Restart=`)."),
    _d("AutoRestartCount", Kind.INT, 0, B, IG, "See AutoRestart."),
    _d("AutoRestartRate", Kind.STRING, None, B, IG, "See AutoRestart."),
    _d("Background", Kind.BOOL, True, B, IG,
       "authmilter always runs in the foreground under a service manager."),
    _d("BaseDirectory", Kind.STRING, None, B, IG, "Use absolute paths instead."),
    _d("BodyLengthDB", Kind.DATASET, None, D, IG,
       "l= on signatures is not offered (RFC 6376 §8.2)."),
    _d("BogusKey", Kind.STRING, None, D, IG, "Not implemented."),
    _d("CaptureUnknownErrors", Kind.BOOL, False, D, IG, "See On-InternalError."),
    _d("Canonicalization", Kind.CANON, (Canon.RELAXED, Canon.SIMPLE), D, S,
       "header/body canonicalization when signing. Default `relaxed/simple` (OpenDKIM: "
       "`simple/simple`)."),
    _d("ChangeRootDirectory", Kind.STRING, None, B, IG, "Use systemd's RootDirectory= instead."),
    _d("ClockDrift", Kind.INT, 300, D, S, "Seconds of tolerance for t= and x= when verifying."),
    _d("Diagnostics", Kind.BOOL, False, D, IG, "z= tags are not generated."),
    _d("DiagnosticDirectory", Kind.STRING, None, D, IG, "Not implemented."),
    _d("DisableCryptoInit", Kind.BOOL, False, D, IG, "Not applicable."),
    _d("DNSConnect", Kind.BOOL, False, D, R, "OpenDKIM resolver option; dnspython retries over TCP "
       "on truncation by itself."),
    _d("DNSTimeout", Kind.INT, 5, B, S, "Per-lookup DNS deadline in seconds."),
    _d("Domain", Kind.DATASET, None, D, S,
       "Domains to sign for with KeyFile/Selector (ignored when KeyTable is set)."),
    _d("DomainKeysCompat", Kind.BOOL, False, D, IG, "DomainKeys (RFC 4870) is historic."),
    _d("DontSignMailTo", Kind.DATASET, None, D, IG, "Not implemented."),
    _d("EnableCoredumps", Kind.BOOL, False, B, IG, "Not applicable."),
    _d("ExemptDomains", Kind.DATASET, None, D, IG, "Not implemented."),
    _d("ExternalIgnoreList", Kind.HOSTS, None, D, S,
       "Hosts allowed to send as our domains without signing (no log noise)."),
    _d("FinalPolicyScript", Kind.STRING, None, D, IG, "Lua scripts are not supported."),
    _d("FixCRLF", Kind.BOOL, False, D, IG, "Not implemented."),
    _d("IdentityHeader", Kind.STRING, None, D, IG, "Experimental in OpenDKIM; not implemented."),
    _d("IdentityHeaderRemove", Kind.BOOL, False, D, IG, "See IdentityHeader."),
    _d("IgnoreMalformedMail", Kind.BOOL, False, D, IG, "Not implemented."),
    _d("Include", Kind.STRING, None, B, S,
       "Read another file here (relative paths: relative to the including file; 5 levels)."),
    _d("InternalHosts", Kind.HOSTS, DatasetSpec("127.0.0.1, ::1"), D, S,
       "Clients whose mail is signed, not verified. Default `127.0.0.1, ::1` "
       "(OpenDKIM: `127.0.0.1`)."),
    _d("KeepAuthResults", Kind.BOOL, False, D, IG,
       "Forged Authentication-Results with our authserv-id are always removed (RFC 8601 §5)."),
    _d("KeepTemporaryFiles", Kind.BOOL, False, D, IG, "Not implemented."),
    _d("KeyFile", Kind.STRING, None, D, S, "Private key for single-key signing (Domain/Selector)."),
    _d("KeyTable", Kind.DATASET, None, D, S, "Key name → `domain:selector:keyfile`."),
    _d("LDAPAuthMechanism", Kind.STRING, None, D, IG, "LDAP datasets are not supported."),
    _d("LDAPAuthName", Kind.STRING, None, D, IG, "LDAP datasets are not supported."),
    _d("LDAPAuthRealm", Kind.STRING, None, D, IG, "LDAP datasets are not supported."),
    _d("LDAPAuthUser", Kind.STRING, None, D, IG, "LDAP datasets are not supported."),
    _d("LDAPBindPassword", Kind.STRING, None, D, IG, "LDAP datasets are not supported."),
    _d("LDAPBindUser", Kind.STRING, None, D, IG, "LDAP datasets are not supported."),
    _d("LDAPDisableCache", Kind.BOOL, False, D, IG, "LDAP datasets are not supported."),
    _d("LDAPKeepaliveIdle", Kind.INT, 0, D, IG, "LDAP datasets are not supported."),
    _d("LDAPKeepaliveInterval", Kind.INT, 0, D, IG, "LDAP datasets are not supported."),
    _d("LDAPKeepaliveProbes", Kind.INT, 0, D, IG, "LDAP datasets are not supported."),
    _d("LDAPSoftStart", Kind.BOOL, False, D, IG, "LDAP datasets are not supported."),
    _d("LDAPTimeout", Kind.INT, 5, D, IG, "LDAP datasets are not supported."),
    _d("LDAPUseTLS", Kind.BOOL, False, D, IG, "LDAP datasets are not supported."),
    _d("LogResults", Kind.BOOL, False, D, IG,
       "authmilter always logs one line per message with every result."),
    _d("LogWhy", Kind.BOOL, False, D, IG, "Not implemented; use the per-message log line."),
    _d("MacroList", Kind.DATASET, None, D, S,
       "MTA macros (`name` or `name=v1|v2`) that mark mail to be signed."),
    _d("MaximumHeaders", Kind.INT, 65536, D, S, "Largest header block in bytes (0 = no limit)."),
    _d("MaximumSignaturesToVerify", Kind.INT, 3, D, S, "Signatures verified per message."),
    _d("MaximumSignedBytes", Kind.INT, 0, D, IG, "l= on signatures is not offered."),
    _d("MilterDebug", Kind.INT, 0, B, IG, "libmilter debug level; not exposed."),
    _d("Minimum", Kind.STRING, None, D, IG, "Partial-body (l=) policy; not implemented."),
    _d("MinimumKeyBits", Kind.INT, 1024, D, S,
       "RSA keys below this many bits give dkim=policy (RFC 8301); 0 accepts all."),
    _d("Mode", Kind.MODE, "sv", D, S, "`s` sign, `v` verify, or both."),
    _d("MTA", Kind.DATASET, None, D, S, "MTA daemon names ({daemon_name}) whose mail is signed."),
    _d("MTACommand", Kind.STRING, None, D, IG, "Reports are not sent by this version."),
    _d("MultipleSignatures", Kind.BOOL, False, D, S,
       "Apply every matching SigningTable entry, not only the first."),
    _d("MustBeSigned", Kind.HEADERS, None, D, IG, "Not implemented."),
    _d("Nameservers", Kind.LIST, (), D, S,
       "Comma-separated resolvers (`IP`, `IP:port`, `[IPv6]:port`); default resolv.conf."),
    _d("NoHeaderB", Kind.BOOL, False, D, S, "Leave header.b out of Authentication-Results."),
    _d("OmitHeaders", Kind.HEADERS, DEFAULT_OMIT_HEADERS, D, S,
       "Header fields never signed; `*,+X` / `*,-X` edit the default (RFC 6376 §5.4)."),
    _d("On-BadSignature", Kind.ACTION, Action.ACCEPT, D, S, "A signature fails to verify."),
    _d("On-Default", Kind.ACTION, None, D, S,
       "Blanket value for every On-* directive not set explicitly."),
    _d("On-DNSError", Kind.ACTION, Action.TEMPFAIL, D, S,
       "A transient DNS error while verifying.", "on_dns_error"),
    _d("On-InternalError", Kind.ACTION, Action.TEMPFAIL, D, S, "An internal error (mail is kept)."),
    _d("On-KeyNotFound", Kind.ACTION, Action.ACCEPT, D, S, "The signing key is not in DNS."),
    _d("On-NoSignature", Kind.ACTION, Action.ACCEPT, D, S, "A message arrives unsigned."),
    _d("On-Security", Kind.ACTION, Action.TEMPFAIL, D, IG, "Not implemented."),
    _d("On-SignatureError", Kind.ACTION, Action.REJECT, D, S, "A message cannot be signed."),
    _d("OversignHeaders", Kind.HEADERS, ("From",), D, S,
       "Fields signed once more than present, so none can be added. Default `From` "
       "(OpenDKIM: empty; Debian ships `From`)."),
    _d("PeerList", Kind.HOSTS, None, D, S, "Clients whose mail is passed through untouched."),
    _d("PidFile", Kind.STRING, None, B, S, "Write the process id here."),
    _d("POPDBFile", Kind.DATASET, None, D, IG, "Not implemented."),
    _d("Quarantine", Kind.BOOL, False, D, IG, "Use On-BadSignature quarantine."),
    _d("QueryCache", Kind.BOOL, False, D, FX,
       "authmilter always caches DNS answers for their TTL.", fixed=True),
    _d("RedirectFailuresTo", Kind.STRING, None, D, IG, "Not implemented."),
    _d("RemoveARAll", Kind.BOOL, False, D, FX,
       "Every A-R claiming our authserv-id (or a RemoveARFrom id) is removed, whatever results "
       "it carries (RFC 8601 §5), not only those with a DKIM result.", fixed=True),
    _d("RemoveARFrom", Kind.LIST, (), D, S,
       "More authserv-ids (`host.example.com`, or `.example.com` for a domain) whose A-R are "
       "removed."),
    _d("RemoveOldSignatures", Kind.BOOL, False, D, IG, "Not implemented."),
    _d("ReplaceHeaders", Kind.DATASET, None, D, IG, "Experimental in OpenDKIM; not implemented."),
    _d("ReplaceRules", Kind.STRING, None, D, IG, "Experimental in OpenDKIM; not implemented."),
    _d("ReportAddress", Kind.STRING, None, D, IG, "DKIM failure reports are not sent."),
    _d("ReportBccAddress", Kind.STRING, None, D, IG, "DKIM failure reports are not sent."),
    _d("RequestReports", Kind.BOOL, False, D, IG, "DKIM failure reports are not requested."),
    _d("RequiredHeaders", Kind.BOOL, False, B, S,
       "Reject messages without exactly one From and one Date (RFC 5322 §3.6)."),
    _d("RequireSafeKeys", Kind.BOOL, True, D, S,
       "Refuse key files that group or others can read or write, or that a user other than "
       "root or the UserID user owns or could replace."),
    _d("ResignAll", Kind.BOOL, False, D, IG, "Experimental in OpenDKIM; not implemented."),
    _d("ResignMailTo", Kind.DATASET, None, D, IG, "Experimental in OpenDKIM; not implemented."),
    _d("ResolverConfiguration", Kind.STRING, None, D, R,
       "libunbound configuration file; authmilter uses dnspython (see Nameservers)."),
    _d("ResolverTracing", Kind.BOOL, False, D, R, "OpenDKIM resolver option."),
    _d("ScreenPolicyScript", Kind.STRING, None, D, IG, "Lua scripts are not supported."),
    _d("SelectCanonicalizationHeader", Kind.STRING, None, D, IG, "Not implemented."),
    _d("Selector", Kind.STRING, None, D, S, "Selector for single-key signing (Domain/KeyFile)."),
    _d("SenderHeaders", Kind.HEADERS, None, D, IG, "The signer is always chosen by From."),
    _d("SenderMacro", Kind.STRING, None, D, IG, "Experimental in OpenDKIM; not implemented."),
    _d("SendReports", Kind.BOOL, False, D, IG, "DKIM failure reports are not sent."),
    _d("SetupPolicyScript", Kind.STRING, None, D, IG, "Lua scripts are not supported."),
    _d("SignatureAlgorithm", Kind.ALGORITHM, SignatureAlgorithm.RSA_SHA256, D, S,
       "Algorithm for RSA keys; Ed25519 keys always sign ed25519-sha256."),
    _d("SignatureTTL", Kind.INT, 0, D, S, "Signature lifetime in seconds (x=); 0 = none."),
    _d("SignHeaders", Kind.HEADERS, DEFAULT_SIGN_HEADERS, D, S,
       "Header fields to sign (default: RFC 6376 §5.4 list); `*,+X` / `*,-X` edit it."),
    _d("SigningTable", Kind.DATASET, None, D, S, "From address → KeyTable key name."),
    _d("SMTPURI", Kind.STRING, None, D, IG, "Not implemented."),
    _d("Socket", Kind.SOCKET, "inet:8891@127.0.0.1", B, S,
       "`inet:port@host`, `inet6:port@host`, `local:/path`. Prefer `local:` with Postfix."),
    _d("SoftStart", Kind.BOOL, False, D, IG, "No SQL/LDAP datasets, nothing to soft-start."),
    _d("SoftwareHeader", Kind.BOOL, False, B, IG, "Not implemented."),
    _d("Statistics", Kind.STRING, None, D, IG, "OpenDKIM statistics are not kept."),
    _d("StatisticsName", Kind.STRING, None, D, IG, "OpenDKIM statistics are not kept."),
    _d("StatisticsPolicyScript", Kind.STRING, None, D, IG, "Lua scripts are not supported."),
    _d("StatisticsPrefix", Kind.STRING, None, D, IG, "OpenDKIM statistics are not kept."),
    _d("StrictHeaders", Kind.BOOL, False, D, IG, "See RequiredHeaders."),
    _d("StrictTestMode", Kind.BOOL, False, D, IG, "Not applicable."),
    _d("SubDomains", Kind.BOOL, False, D, S, "Sign for subdomains of Domain/SigningTable domains."),
    _d("Syslog", Kind.BOOL, True, B, S,
       "Log to syslog (SyslogFacility, default mail), as Debian's packages do; with no "
       "/dev/log, to standard error with a warning. `no`: standard error only."),
    _d("SyslogFacility", Kind.STRING, "mail", B, S, "Syslog facility name."),
    _d("SyslogName", Kind.STRING, "authmilter", D, S, "Syslog identifier."),
    _d("SyslogSuccess", Kind.BOOL, False, D, S, "Also log successful signing/verification."),
    _d("TemporaryDirectory", Kind.STRING, None, D, IG,
       "Not needed: no message body is stored, its hashes are computed as it streams in."),
    _d("TestDNSData", Kind.DATASET, None, D, IG, "Tests use a real DNS server."),
    _d("TestPublicKeys", Kind.STRING, None, D, IG, "Tests use a real DNS server."),
    _d("TrustAnchorFile", Kind.STRING, None, D, R, "DNSSEC trust anchors of libunbound."),
    _d("TrustSignaturesFrom", Kind.DATASET, None, D, IG, "Not implemented."),
    _d("UMask", Kind.OCTAL, None, B, S, "umask for the socket and pid file (e.g. `007`).",
       "umask"),
    _d("UnprotectedKey", Kind.STRING, None, D, IG, "DNSSEC status is not evaluated."),
    _d("UserID", Kind.STRING, None, B, S, "`user[:group]` to run as after binding the socket."),
    _d("VBR-Certifiers", Kind.STRING, None, D, IG, "VBR (RFC 5518) is not implemented."),
    _d("VBR-PurgeFields", Kind.STRING, None, D, IG, "VBR (RFC 5518) is not implemented."),
    _d("VBR-TrustedCertifiers", Kind.STRING, None, D, IG, "VBR (RFC 5518) is not implemented."),
    _d("VBR-TrustedCertifiersOnly", Kind.BOOL, False, D, IG, "VBR (RFC 5518) is not implemented."),
    _d("VBR-Type", Kind.STRING, None, D, IG, "VBR (RFC 5518) is not implemented."),
    _d("WeakSyntaxChecks", Kind.BOOL, False, D, IG, "Not implemented."),
    # -- OpenDMARC --------------------------------------------------------------------------
    _d("CopyFailuresTo", Kind.STRING, None, M, IG, "Not implemented."),
    _d("DomainWhitelist", Kind.LIST, (), M, S,
       "OpenDMARC's trusted ARC sealer domains: read as ARCTrustedSealers entries (both lists "
       "are used), with a warning saying so.",
       "dmarc_domain_whitelist"),  # not policyd-spf's Domain_Whitelist
    _d("DomainWhitelistFile", Kind.STRING, None, M, S,
       "A file of trusted ARC sealer domains, one per line: read as ARCTrustedSealers entries, "
       "with a warning saying so."),
    _d("DomainWhitelistSize", Kind.INT, 0, M, IG,
       "The trusted sealer list has no fixed capacity."),
    _d("FailureReports", Kind.BOOL, False, M, S,
       "Send RFC 9991 failure reports (AFRF, headers only) to the `ruf=` of a failing "
       "domain whose `fo=` asks for one; off by default, as OpenDMARC (docs/reports.md)."),
    _d("FailureReportsBcc", Kind.STRING, None, M, S,
       "Also send every failure report to this address."),
    _d("FailureReportsOnNone", Kind.BOOL, False, M, S,
       "Send failure reports for `p=none` domains too (off: only quarantine and reject)."),
    _d("FailureReportsSentBy", Kind.STRING, None, M, S,
       "From address of failure reports; default: ReportSender, else `postmaster@` this host."),
    _d("HistoryFile", Kind.STRING, None, M, S,
       "Append OpenDMARC's history records (for `opendmarc-import`) to this file, one block "
       "per DMARC-evaluated message; written by a background thread, never delaying mail."),
    _d("HoldQuarantinedMessages", Kind.BOOL, False, M, S,
       "Put p=quarantine failures in the MTA's hold queue (with RejectFailures, as OpenDMARC)."),
    _d("IgnoreAuthenticatedClients", Kind.BOOL, False, M, FX,
       "Mail from SMTP-AUTH clients is outbound: it is signed, never DMARC-evaluated.",
       fixed=True),
    _d("IgnoreHosts", Kind.HOSTS, DatasetSpec("127.0.0.1"), M, S,
       "Clients whose mail is not DMARC-evaluated (a file path, as OpenDMARC; default "
       "`127.0.0.1`)."),
    _d("IgnoreMailFrom", Kind.LIST, (), M, S, "From domains whose mail is not DMARC-evaluated."),
    _d("IgnoreMailTo", Kind.LIST, (), M, IG,
       "Not implemented: every DMARC-evaluated message is recorded (docs/reports.md)."),
    _d("PublicSuffixList", Kind.STRING, None, M, S,
       "PSL file for the organizational domain; default: the list shipped with publicsuffixlist."),
    _d("RecordAllMessages", Kind.BOOL, False, M, IG,
       "Only messages with a DMARC pass or fail are recorded (ReportDatabase, HistoryFile)."),
    _d("RejectFailures", Kind.BOOL, False, M, S,
       "Enforce p=reject with 550 5.7.1 (temperror → tempfail)."),
    _d("RejectMultiValueFrom", Kind.BOOL, False, M, S,
       "Reject From fields with addresses from several domains."),
    _d("RejectString", Kind.STRING, "rejected by DMARC policy for %s", M, S,
       "SMTP reply text for DMARC rejects; one `%s` = the From domain."),
    _d("ReportCommand", Kind.STRING, None, M, IG, "DMARC failure reports are not sent yet."),
    _d("SPFIgnoreResults", Kind.BOOL, False, M, S,
       "Ignore SPF results in headers (authmilter never trusts them: it checks SPF itself)."),
    _d("SPFSelfValidate", Kind.BOOL, False, M, FX,
       "authmilter always evaluates SPF itself (RFC 7489 §4.1).", fixed=True),
    _d("TrustedAuthservIDs", Kind.LIST, None, M, S,
       "Upstream authserv-ids whose results fill in what authmilter could not check itself, "
       "for mail from a relay it does not SPF-check (skip_addresses, Whitelist); default none. "
       "Our own id is never trusted.", "trusted_authserv_ids"),
    # -- policyd-spf (postfix-policyd-spf-python 3.0) ----------------------------------------
    _d("HELO_reject", Kind.CHOICE, "False", P, S,
       "When to reject on the HELO identity: Fail, SPF_Not_Pass, Softfail, Null, False, "
       "No_Check. Default `False` (never rejects); `Fail`, policyd-spf's default, when a "
       "policyd-spf.conf is given (`--policyd-spf-conf`).", choices=HELO_REJECT_CHOICES),
    _d("Mail_From_reject", Kind.CHOICE, "False", P, S,
       "When to reject on the MAIL FROM identity: Fail, SPF_Not_Pass, Softfail, False, "
       "No_Check. Default `False` (never rejects); `Fail`, policyd-spf's default, when a "
       "policyd-spf.conf is given (`--policyd-spf-conf`).", choices=MAIL_FROM_REJECT_CHOICES),
    _d("PermError_reject", Kind.BOOL, False, P, S, "Reject on SPF permerror.",
       "permerror_reject"),
    _d("TempError_Defer", Kind.BOOL, False, P, S, "Defer (4xx) on SPF temperror.",
       "temperror_defer"),
    _d("skip_addresses", Kind.LIST, DEFAULT_SKIP_ADDRESSES, P, S,
       "Client networks never SPF-checked (InternalHosts and authenticated clients are not "
       "checked either)."),
    _d("Whitelist", Kind.LIST, (), P, S, "Client networks (CIDR) exempt from SPF checks."),
    _d("HELO_Whitelist", Kind.LIST, (), P, S,
       "HELO names exempt from SPF checks, when the client address is in their A/AAAA."),
    _d("Domain_Whitelist", Kind.LIST, (), P, S,
       "Domains whose SPF record, passing for the client, exempts it from SPF checks."),
    _d("Domain_Whitelist_PTR", Kind.LIST, (), P, IG, "Not implemented; use Whitelist."),
    _d("Header_Type", Kind.CHOICE, "SPF", P, S,
       "SPF: add Received-SPF as well; AR or None: the result is only in our "
       "Authentication-Results.", choices=("SPF", "AR", "None")),
    _d("Authserv_Id", Kind.STRING, None, P, S,
       "policyd-spf's authserv-id; used when AuthservID is not set.", "spf_authserv_id"),
    _d("Hide_Receiver", Kind.BOOL, False, P, S, "Write receiver=<UNKNOWN> in Received-SPF."),
    _d("Lookup_Time", Kind.INT, 20, P, S, "Time limit of one SPF evaluation, in seconds."),
    _d("Whitelist_Lookup_Time", Kind.INT, 10, P, IG, "DNSTimeout applies to each lookup."),
    _d("Void_Limit", Kind.INT, 2, P, S, "RFC 7208 §4.6.4 void lookup limit."),
    _d("Reject_Not_Pass_Domains", Kind.LIST, (), P, S,
       "Domains whose softfail/neutral results are rejected like fail."),
    _d("No_Mail", Kind.BOOL, False, P, S,
       "Only reject when the record is `v=spf1 -all` (the domain sends no mail)."),
    _d("TestOnly", Kind.BOOL, True, P, S,
       "policyd-spf's inverted switch: 1 (default) acts on results, 0 never rejects."),
    _d("defaultSeedOnly", Kind.BOOL, True, P, IG, "Old name of TestOnly; use TestOnly."),
    _d("SPF_Enhanced_Status_Codes", Kind.BOOL, True, P, S,
       "RFC 7372 enhanced status codes (5.7.23, 4.7.24 …) in SPF rejects."),
    _d("Reason_Message", Kind.STRING, DEFAULT_REASON_MESSAGE, P, S,
       "SPF reject text; {rejectdefer}, {spf} and {url} are filled in."),
    _d("debugLevel", Kind.INT, 1, P, IG, "authmilter logs one line per message."),
    _d("HELO_pass_restriction", Kind.STRING, None, P, IG, "Postfix restriction classes only."),
    _d("Mail_From_pass_restriction", Kind.STRING, None, P, IG,
       "Postfix restriction classes only."),
    _d("Prospective", Kind.STRING, None, P, IG, "Not implemented."),
    _d("Mock", Kind.BOOL, False, P, IG, "Not needed: authmilter is the only filter."),
    _d("QueueID", Kind.BOOL, True, P, IG, "authmilter always logs the queue id."),
    _d("Per_User", Kind.STRING, None, P, IG, "Per-recipient SPF settings are not supported."),
    # -- authmilter's own ---------------------------------------------------------------------
    _d("Workers", Kind.INT, 0, A, S,
       "Worker processes sharing the socket; 0 (default) = one per CPU."),
    _d("OrganizationalDomainMethod", Kind.CHOICE, "psl", A, S,
       "How DMARC finds the organizational domain: `psl` (RFC 7489, PublicSuffixList) or "
       "`treewalk` (the DMARCbis DNS tree walk).", choices=("psl", "treewalk")),
    _d("DNSDeadline", Kind.INT, 20, A, S,
       "Total DNS time, in seconds, of one SMTP stage of a message (SPF at RCPT; DKIM and "
       "DMARC at end of message); past it lookups give temperror. Keep it below Postfix's "
       "milter_command_timeout (30 s)."),
    _d("MetricsListen", Kind.STRING, None, A, S,
       "Serve Prometheus metrics over HTTP on `address:port` (e.g. `127.0.0.1:9489`); "
       "unset (default) = no metrics endpoint."),
    _d("ReportDatabase", Kind.STRING, None, A, S,
       "Record every DMARC-evaluated inbound message for DMARC aggregate reports in this "
       "database: `sqlite:////absolute/path.db` (one host; the folder must be writable by "
       "`UserID`) or `postgresql://user@host/dbname` (a fleet); unset (default) = nothing is "
       "recorded."),
    _d("ReportSender", Kind.STRING, None, A, S,
       "From address of aggregate reports (and of failure reports unless FailureReportsSentBy); "
       "its domain is the report's receiver domain. Use a subdomain that publishes no `rua`. "
       "Required by `authmilter reports send`."),
    _d("ReportOrgName", Kind.STRING, None, A, S,
       "`org_name` of aggregate reports; default: the domain of ReportSender."),
    _d("ReportSMTPServer", Kind.STRING, "localhost:25", A, S,
       "Where reports are submitted: `host:port` (SMTP, default `localhost:25`, so the local "
       "MTA and this milter sign them) or the absolute path of a sendmail program.",
       "report_smtp_server"),
    _d("ReportSkipDomains", Kind.LIST, (), A, S,
       "Policy domains (and their subdomains) never sent aggregate or failure reports."),
    _d("ReportKeepDays", Kind.INT, 31, A, S,
       "Days of DMARC report records (and of the send queue) kept; `reports send` deletes "
       "older ones. At least 8 (the week a run looks back over, and the day being recorded)."),
    _d("ReportSendRate", Kind.INT, 60, A, S,
       "Aggregate report messages sent per minute, at most, by one `reports send` run."),
    _d("FailureReportsRedact", Kind.BOOL, False, A, S,
       "Replace local parts of addresses in failure reports with `redacted` "
       "(RFC 9991 privacy)."),
    _d("FailureReportsPerDomain", Kind.INT, 10, A, S,
       "Failure reports per policy domain per hour, at most (per worker process)."),
    _d("FailureReportsPerHour", Kind.INT, 100, A, S,
       "Failure reports per hour in all, at most (per worker process)."),
    _d("ARCSign", Kind.CHOICE, "none", A, S,
       "Which mail gets an ARC Set (RFC 8617): `none` (default); `inbound`: verified inbound "
       "mail, sealed with our Authentication-Results, so mail the MTA forwards carries them; "
       "`outbound`: mail from internal or authenticated clients that carries an "
       "Authentication-Results with our authserv-id (a mailing list resending what we "
       "received); `both`. Needs ARCSealKey (docs/arc.md).",
       "arc_sign", choices=("none", "inbound", "outbound", "both")),
    _d("ARCSealKey", Kind.STRING, None, A, S,
       "The KeyTable key name (an RSA key) that seals: its domain and selector are the "
       "ARC-Seal's d= and s=."),
    _d("ARCTrustedSealers", Kind.DATASET, None, A, S,
       "Sealer domains (ARC-Seal d=) whose ARC results may rescue a DMARC failure: the chain "
       "validates, every sealer from the newest to the one whose results are used is listed, "
       "and those results pass DMARC; then the disposition is none (docs/arc.md)."),
    _d("SPFRejectAfterDMARC", Kind.BOOL, False, A, S,
       "Hold an SPF reject or defer (HELO_reject, Mail_From_reject …) until the end of the "
       "message and drop it when DMARC passes through an aligned DKIM signature, so forwarded "
       "mail survives; otherwise it is applied then, with the same reply.",
       "spf_reject_after_dmarc"),
)

_BY_LOWER: dict[str, Directive] = {d.name.lower(): d for d in DIRECTIVES}

# Directives whose meaning is an action on the message; On-Default fills those left unset.
_ON_DIRECTIVES = tuple(d for d in DIRECTIVES if d.kind is Kind.ACTION and d.name != "On-Default")


def directive(name: str) -> Directive:
    """Look a directive up by name, case-insensitively.

    :raises KeyError: when no anchor knows the name.
    """
    return _BY_LOWER[name.lower()]


# ---------------------------------------------------------------------------------------------
# The typed configuration.


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The effective configuration: every supported directive as a typed attribute.

    Equal configurations compare equal whichever files they came from (locations are kept in
    ``where`` and ``sources``, which do not take part in comparison). Change one by
    ``dataclasses.replace``.
    """

    always_add_ar_header: bool = False
    authserv_id: str | None = None
    authserv_id_with_job_id: bool = False
    canonicalization: tuple[Canon, Canon] = (Canon.RELAXED, Canon.SIMPLE)
    clock_drift: int = 300
    dns_timeout: int = 5
    domain: DatasetSpec | None = None
    external_ignore_list: DatasetSpec | None = None
    internal_hosts: DatasetSpec = DatasetSpec("127.0.0.1, ::1")
    key_file: str | None = None
    key_table: DatasetSpec | None = None
    macro_list: DatasetSpec | None = None
    maximum_headers: int = 65536
    maximum_signatures_to_verify: int = 3
    minimum_key_bits: int = 1024
    mode: str = "sv"
    mta: DatasetSpec | None = None
    multiple_signatures: bool = False
    nameservers: tuple[str, ...] = ()
    no_header_b: bool = False
    omit_headers: tuple[str, ...] = DEFAULT_OMIT_HEADERS
    on_bad_signature: Action = Action.ACCEPT
    on_default: Action | None = None
    on_dns_error: Action = Action.TEMPFAIL
    on_internal_error: Action = Action.TEMPFAIL
    on_key_not_found: Action = Action.ACCEPT
    on_no_signature: Action = Action.ACCEPT
    on_signature_error: Action = Action.REJECT
    oversign_headers: tuple[str, ...] = ("From",)
    peer_list: DatasetSpec | None = None
    pid_file: str | None = None
    remove_ar_from: tuple[str, ...] = ()
    required_headers: bool = False
    require_safe_keys: bool = True
    selector: str | None = None
    signature_algorithm: SignatureAlgorithm = SignatureAlgorithm.RSA_SHA256
    signature_ttl: int = 0
    sign_headers: tuple[str, ...] = DEFAULT_SIGN_HEADERS
    signing_table: DatasetSpec | None = None
    socket: str = "inet:8891@127.0.0.1"
    sub_domains: bool = False
    syslog: bool = True
    syslog_facility: str = "mail"
    syslog_name: str = "authmilter"
    syslog_success: bool = False
    umask: int | None = None
    user_id: str | None = None
    # OpenDMARC
    hold_quarantined_messages: bool = False
    ignore_hosts: DatasetSpec = DatasetSpec("127.0.0.1")
    ignore_mail_from: tuple[str, ...] = ()
    public_suffix_list: str | None = None
    reject_failures: bool = False
    reject_multi_value_from: bool = False
    reject_string: str = "rejected by DMARC policy for %s"
    failure_reports: bool = False
    failure_reports_bcc: str | None = None
    failure_reports_on_none: bool = False
    failure_reports_sent_by: str | None = None
    history_file: str | None = None
    spf_ignore_results: bool = False
    trusted_authserv_ids: tuple[str, ...] | None = None
    # policyd-spf
    helo_reject: str = "False"
    mail_from_reject: str = "False"
    permerror_reject: bool = False
    temperror_defer: bool = False
    skip_addresses: tuple[str, ...] = DEFAULT_SKIP_ADDRESSES
    whitelist: tuple[str, ...] = ()
    helo_whitelist: tuple[str, ...] = ()
    domain_whitelist: tuple[str, ...] = ()
    header_type: str = "SPF"
    spf_authserv_id: str | None = None
    hide_receiver: bool = False
    lookup_time: int = 20
    void_limit: int = 2
    reject_not_pass_domains: tuple[str, ...] = ()
    no_mail: bool = False
    test_only: bool = True
    spf_enhanced_status_codes: bool = True
    reason_message: str = DEFAULT_REASON_MESSAGE
    # authmilter
    organizational_domain_method: str = "psl"
    workers: int = 0
    dns_deadline: int = 20
    metrics_listen: str | None = None
    report_database: str | None = None
    report_sender: str | None = None
    report_org_name: str | None = None
    report_smtp_server: str = "localhost:25"
    report_skip_domains: tuple[str, ...] = ()
    report_send_rate: int = 60
    report_keep_days: int = 31
    failure_reports_redact: bool = False
    failure_reports_per_domain: int = 10
    failure_reports_per_hour: int = 100
    spf_reject_after_dmarc: bool = False
    arc_sign: str = "none"
    arc_seal_key: str | None = None
    arc_trusted_sealers: DatasetSpec | None = None
    dmarc_domain_whitelist: tuple[str, ...] = ()
    domain_whitelist_file: str | None = None
    # Provenance, not configuration.
    ignored: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    where: Mapping[str, Location] = field(default_factory=dict, compare=False)
    #: Why a default differs from the directive table's (e.g. policyd-spf's own defaults).
    default_notes: Mapping[str, str] = field(default_factory=dict, compare=False)
    sources: tuple[str, ...] = field(default=(), compare=False)

    @property
    def signing(self) -> bool:
        """True when Mode includes signing."""
        return "s" in self.mode

    @property
    def verifying(self) -> bool:
        """True when Mode includes verifying."""
        return "v" in self.mode

    @classmethod
    def from_text(cls, text: str, *, path: str = "<config>") -> Config:
        """Parse one configuration text (``Include`` relative to ``path``'s folder).

        :raises ConfigError: on the first unusable line, with file:line.
        """
        return build_config(read_settings_text(text, path)).config

    def location(self, attr: str) -> Location | None:
        """Where the value of ``attr`` was set, or None for a default."""
        return self.where.get(attr)


@dataclass(frozen=True, slots=True)
class ConfigWarning:
    """A warning about a usable configuration, with where it applies."""

    message: str
    where: Location | None = None

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where is not None else self.message


@dataclass(frozen=True, slots=True)
class Loaded:
    """A configuration together with the warnings found while reading it."""

    config: Config
    warnings: tuple[ConfigWarning, ...]


@dataclass(frozen=True, slots=True)
class Setting:
    """One ``Name value`` line, as read."""

    directive: Directive
    value: str
    where: Location


# ---------------------------------------------------------------------------------------------
# Reading files.


_LINE = re.compile(r"^\s*(?P<name>\S+)(?:\s+(?P<value>.*?))?\s*$")


def read_settings_text(text: str, path: str, *, _depth: int = 0) -> list[Setting]:
    """Split a configuration text into settings, following ``Include``.

    :raises ConfigError: for an unknown directive, a missing value or a bad Include.
    """
    settings: list[Setting] = []
    # Lines end at LF only (as fgets() reads them and editors number them); splitlines() would
    # also break at CR, FF, VT, NEL … and shift every file:line after one.
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.split("#", 1)[0]
        if not line.strip():
            continue
        where = Location(path, lineno)
        m = _LINE.match(line)
        assert m is not None  # a non-blank line always has a first word
        name, value = m.group("name"), m.group("value") or ""
        d = _BY_LOWER.get(name.lower())
        if d is None:
            raise ConfigError(_unknown_message(name), where)
        if d.component is Component.POLICYD_SPF and value.startswith("="):
            value = value[1:].strip()  # pasted from policyd-spf.conf: "HELO_reject = Fail"
        if not value:
            raise ConfigError(f"{d.name}: missing value", where)
        if d.name == "Include":
            target = Path(value)
            if not target.is_absolute():
                target = Path(path).parent / target
            if _depth + 1 > MAX_INCLUDE_DEPTH:
                raise ConfigError(f"Include: nested more than {MAX_INCLUDE_DEPTH} levels", where)
            settings.extend(_read_file(str(target), where, _depth + 1))
            continue
        settings.append(Setting(d, value, where))
    return settings


#: Directives a policyd-spf.conf may hold: its own, and the milter front end's.
_POLICYD_MILTER_NAMES = ("Socket", "PidFile", "UserID", "UMask", "InternalHosts", "MacroList")


def read_policyd_spf_text(text: str, path: str) -> list[Setting]:
    """Read policyd-spf.conf syntax: ``name = value`` lines, ``#`` comments.

    :raises ConfigError: for a line without ``=`` or a name policyd-spf does not know.
    """
    settings = []
    for lineno, raw in enumerate(text.split("\n"), start=1):  # LF only, as read_settings_text
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = Location(path, lineno)
        name, eq, value = (part.strip() for part in line.partition("="))
        if not eq or not value:
            raise ConfigError(f"expected 'name = value', got '{line}'", where)
        d = _BY_LOWER.get(name.lower())
        if d is None or (d.component is not Component.POLICYD_SPF
                         and d.name not in _POLICYD_MILTER_NAMES):  # fmt: skip
            known = [x.name for x in DIRECTIVES if x.component is Component.POLICYD_SPF]
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown policyd-spf option '{name}'{hint}", where)
        settings.append(Setting(d, value, where))
    return settings


def _read_file(path: str, where: Location | None, depth: int = 0) -> list[Setting]:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}", where) from e
    return read_settings_text(text, path, _depth=depth)


def _unknown_message(name: str) -> str:
    names = {d.name.lower(): d.name for d in DIRECTIVES}
    close = difflib.get_close_matches(name.lower(), list(names), n=1, cutoff=0.75)
    hint = f"; did you mean '{names[close[0]]}'?" if close else ""
    return f"unknown directive '{name}'{hint}"


# ---------------------------------------------------------------------------------------------
# Values.


def parse_bool(value: str) -> bool:
    """OpenDKIM's rule: only the first character counts.

    :raises ValueError: when it is none of ``TtYy1`` / ``FfNn0``.
    """
    c = value[:1]
    if c in "TtYy1" and c:
        return True
    if c in "FfNn0" and c:
        return False
    raise ValueError(f"'{value}' is not a Boolean (use true/false, yes/no, 1/0)")


def parse_int(value: str) -> int:
    """A non-negative decimal integer.

    :raises ValueError: otherwise.
    """
    if not re.fullmatch(r"[0-9]+", value):
        raise ValueError(f"'{value}' is not a non-negative integer")
    return int(value)


def parse_octal(value: str) -> int:
    """A umask such as ``007`` or ``0077`` (always octal, as users write them).

    :raises ValueError: otherwise.
    """
    if not re.fullmatch(r"0?[0-7]{1,4}", value) or int(value, 8) > 0o777:
        raise ValueError(f"'{value}' is not an octal file mode mask such as 007")
    return int(value, 8)


def parse_action(value: str) -> Action:
    """An ``On-*`` action: accept, reject, tempfail, discard, quarantine, or their first letter.

    :raises ValueError: otherwise.
    """
    v = value.lower()
    for a in Action:
        if v == a.value or v == a.value[0]:
            return a
    raise ValueError(f"'{value}' is not an action (accept, reject, tempfail, discard, quarantine)")


def parse_canonicalization(value: str) -> tuple[Canon, Canon]:
    """``relaxed/simple``; a single name sets the header canonicalization, body stays simple.

    :raises ValueError: on an unknown name.
    """
    parts = value.lower().split("/")
    if len(parts) > 2:
        raise ValueError(f"'{value}' is not header/body canonicalization")
    try:
        header = Canon(parts[0])
        body = Canon(parts[1]) if len(parts) == 2 else Canon.SIMPLE
    except ValueError:
        raise ValueError(f"'{value}': canonicalizations are 'simple' and 'relaxed'") from None
    return header, body


def parse_mode(value: str) -> str:
    """A subset of ``sv``, normalised to that order.

    :raises ValueError: on any other letter.
    """
    letters = set(value.lower())
    if not letters or not letters <= {"s", "v"}:
        raise ValueError(f"'{value}' is not a mode (s = sign, v = verify, sv = both)")
    return "".join(c for c in "sv" if c in letters)


def parse_algorithm(value: str) -> SignatureAlgorithm:
    """rsa-sha256, rsa-sha1 (accepted, but RFC 8301 verifiers fail it) or ed25519-sha256.

    :raises ValueError: otherwise.
    """
    try:
        return SignatureAlgorithm(value.lower())
    except ValueError:
        names = ", ".join(a.value for a in SignatureAlgorithm)
        raise ValueError(f"'{value}' is not a signature algorithm ({names})") from None


def parse_socket(value: str) -> str:
    """Validate a milter socket spec and return it in the form libmilter takes.

    Accepted: ``inet:PORT@HOST``, ``inet:PORT`` (all interfaces), ``inet6:PORT@HOST``,
    ``local:/path`` (also ``unix:/path`` and a bare absolute path). Host literals may be
    bracketed: ``inet6:8891@[::1]``.

    :raises ValueError: with what is wrong.
    """
    if value.startswith("/"):
        return "local:" + value
    kind, sep, rest = value.partition(":")
    kind = kind.lower()
    if not sep:
        raise ValueError(
            f"'{value}' is not a socket (inet:port@host, inet6:port@host, local:/path)")
    if kind in ("local", "unix"):
        if not rest.startswith("/"):
            raise ValueError(f"'{value}': a local socket needs an absolute path")
        return "local:" + rest
    if kind not in ("inet", "inet6"):
        raise ValueError(f"'{value}': unknown socket type '{kind}' (inet, inet6, local)")
    port_s, _, host = rest.partition("@")
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"'{value}': port must be a number from 1 to 65535")
    if host:
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            addr = ipaddress.ip_address(bare)
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", bare):
                raise ValueError(
                    f"'{value}': '{host}' is neither an address nor a host name") from None
        else:
            if (addr.version == 6) != (kind == "inet6"):
                raise ValueError(f"'{value}': {kind} needs an IPv{4 if kind == 'inet' else 6} "
                                 "address")  # fmt: skip
    return f"{kind}:{port_s}@{host}" if host else f"{kind}:{port_s}"


def parse_choice(value: str, choices: Sequence[str]) -> str:
    """One of ``choices``, matched case-insensitively, returned in its canonical spelling.

    :raises ValueError: otherwise.
    """
    for c in choices:
        if value.lower() == c.lower():
            return c
    raise ValueError(f"'{value}' is not one of {', '.join(choices)}")


def parse_list(value: str) -> tuple[str, ...]:
    """A comma-separated list (blank items dropped)."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def edit_header_list(value: str, default: Sequence[str]) -> tuple[str, ...]:
    """OpenDKIM's header-list syntax: a list replaces the default; ``*,+X,-Y`` edits it."""
    items = list(parse_list(value))
    if not items or items[0] != "*":
        return tuple(items)
    result = list(default)
    for item in items[1:]:
        name = item[1:] if item[:1] in "+-" else item
        present = [h for h in result if h.lower() == name.lower()]
        if item.startswith("-"):
            result = [h for h in result if h.lower() != name.lower()]
        elif not present:
            result.append(name)
    return tuple(result)


def header_list_from_dataset(spec: str, where: Location, default: Sequence[str]) -> tuple[str, ...]:
    """A header-name list given inline (csl) or as a file dataset.

    :raises ConfigError: when the dataset cannot be read.
    """
    from authmilter.datasets import open_dataset, parse_spec

    kind, rest = parse_spec(spec, where=where)
    if kind == "csl":
        return edit_header_list(rest, default)
    names = [k for k, _v, _w in open_dataset(spec, where=where).entries()]
    return edit_header_list(",".join(names), default)


_PARSERS: dict[Kind, Callable[[str], Any]] = {
    Kind.BOOL: parse_bool,
    Kind.INT: parse_int,
    Kind.OCTAL: parse_octal,
    Kind.STRING: str,
    Kind.LIST: parse_list,
    Kind.ACTION: parse_action,
    Kind.SOCKET: parse_socket,
    Kind.CANON: parse_canonicalization,
    Kind.MODE: parse_mode,
    Kind.ALGORITHM: parse_algorithm,
}


def parse_value(setting: Setting) -> Any:
    """Convert one setting's text to its typed value.

    :raises ConfigError: with the setting's file:line when the value is not of the type.
    """
    d = setting.directive
    try:
        if d.kind in (Kind.DATASET, Kind.HOSTS):
            return _dataset_spec(setting)
        if d.kind is Kind.HEADERS:
            return header_list_from_dataset(setting.value, setting.where, d.default or ())
        if d.kind is Kind.CHOICE:
            return parse_choice(setting.value, d.choices)
        return _PARSERS[d.kind](setting.value)
    except ValueError as e:
        raise ConfigError(f"{d.name}: {e}", setting.where) from None
    except ConfigError as e:
        raise ConfigError(f"{d.name}: {e.message}", e.where) from None


def _dataset_spec(setting: Setting) -> DatasetSpec:
    """Check the dataset type now, so an unsupported one is reported at the config line."""
    from authmilter.datasets import parse_spec

    spec = setting.value
    kind, _rest = parse_spec(spec, where=setting.where)
    if setting.directive.name == "IgnoreHosts" and kind == "csl" and not spec.startswith("csl:"):
        spec = "file:" + spec  # OpenDMARC: IgnoreHosts is always the path of a file
    return DatasetSpec(spec, setting.where)


# ---------------------------------------------------------------------------------------------
# Building the Config.


_CONFIG_FIELDS = {f.name for f in fields(Config)}

#: policyd-spf's own defaults (policyd-spf.conf(5)): they apply only when the user brings a
#: policyd-spf.conf. Without one, SPF never rejects by itself, as with OpenDMARC (RFC 7489
#: §10.1: rejecting on SPF alone, before DMARC, bounces forwarded mail that DKIM would save).
POLICYD_SPF_DEFAULTS: Mapping[str, str] = {"HELO_reject": "Fail", "Mail_From_reject": "Fail"}


def same_meaning(a: Setting, b: Setting) -> bool:
    """Tell whether two settings of one directive mean the same (``yes`` and ``true``)."""
    if a.value == b.value:
        return True
    try:
        return bool(parse_value(a) == parse_value(b))
    except ConfigError:
        return False  # a bad value is reported when it is used


def build_config(settings: Iterable[Setting], *,
                 overrides: Mapping[str, str] | None = None,
                 defaults: Mapping[str, str] | None = None,
                 defaults_note: str = "") -> Loaded:  # fmt: skip
    """Turn settings (last one wins within a source) into a ``Config`` and warnings.

    ``overrides`` maps directive names to values given on the command line (``-p`` → Socket).
    ``defaults`` maps directive names to defaults that replace the table's where no setting
    names them (policyd-spf's own, when its file is given); ``defaults_note`` says why.

    :raises ConfigError: on the first bad value or an unusable combination.
    """
    warnings: list[ConfigWarning] = []
    chosen: dict[str, Setting] = {}
    for s in settings:
        prev = chosen.get(s.directive.name)
        if prev is not None and not same_meaning(prev, s):
            warnings.append(ConfigWarning(
                f"{s.directive.name} set again (first at {prev.where}); this value is used",
                s.where))  # fmt: skip
        chosen[s.directive.name] = s
    for name, value in (overrides or {}).items():
        d = directive(name)
        chosen[d.name] = Setting(d, value, Location("<command line>"))

    values: dict[str, Any] = {}
    where: dict[str, Location] = {}
    notes: dict[str, str] = {}
    ignored: list[tuple[str, str]] = []
    for s in chosen.values():
        d = s.directive
        value = parse_value(s)
        if d.support is Support.SUPPORTED:
            values[d.field_name] = value
            where[d.field_name] = s.where
            continue
        if d.support is Support.FIXED:
            if value != d.fixed:
                ignored.append((d.name, s.value))
                warnings.append(ConfigWarning(
                    f"{d.name} {s.value} is not honoured: authmilter always behaves as "
                    f"{d.name} {_show(d.fixed)}. {d.doc}", s.where))  # fmt: skip
            continue
        ignored.append((d.name, s.value))
        if d.support is Support.RESOLVER:
            warnings.append(ConfigWarning(
                f"{d.name} configures the anchors' resolver library, not authmilter's "
                f"(dnspython); ignored. {d.doc}", s.where))  # fmt: skip
        else:
            warnings.append(ConfigWarning(
                f"{d.name} is recognised but not implemented by authmilter; ignored. {d.doc}",
                s.where))  # fmt: skip

    for name, text in (defaults or {}).items():
        d = directive(name)
        if d.field_name not in values:
            values[d.field_name] = parse_value(Setting(d, text, Location("<default>")))
            notes[d.field_name] = defaults_note
    # On-Default is "processed before the other On- values": it fills the ones not set.
    if "on_default" in values:
        for d in _ON_DIRECTIVES:
            if d.support is Support.SUPPORTED and d.field_name not in values:
                values[d.field_name] = values["on_default"]

    _check_combinations(values, where, warnings)
    assert set(values) <= _CONFIG_FIELDS, set(values) - _CONFIG_FIELDS
    cfg = Config(**values, ignored=tuple(sorted(ignored)), where=where, default_notes=notes,
                 sources=tuple(dict.fromkeys(s.where.path for s in chosen.values())))  # fmt: skip
    return Loaded(cfg, tuple(warnings))


def _check_combinations(values: dict[str, Any], where: Mapping[str, Location],
                        warnings: list[ConfigWarning]) -> None:  # fmt: skip
    """Cross-directive rules that make a configuration unusable or suspicious."""
    rs = values.get("reject_string")
    if rs is not None and rs.count("%s") != 1:
        raise ConfigError("RejectString: must contain '%s' exactly once (the From domain)",
                          where.get("reject_string"))  # fmt: skip
    if values.get("signature_algorithm") is SignatureAlgorithm.RSA_SHA1:
        warnings.append(ConfigWarning(
            "SignatureAlgorithm rsa-sha1: RFC 8301 verifiers treat such signatures as failing",
            where.get("signature_algorithm")))  # fmt: skip
    single = [n for n in ("key_file", "selector") if n in values]
    if "key_table" in values:
        for n in single + (["domain"] if "domain" in values else []):
            warnings.append(ConfigWarning(
                f"{_name_of(n)} is ignored because KeyTable is set", where.get(n)))
        if "signing_table" not in values:
            warnings.append(ConfigWarning(
                "KeyTable without SigningTable: nothing will be signed", where.get("key_table")))
    elif "signing_table" in values:
        raise ConfigError("SigningTable needs a KeyTable", where.get("signing_table"))
    elif single and len(single) < 2:
        missing = {"key_file", "selector"} - set(single)
        raise ConfigError(
            f"single-key signing needs KeyFile and Selector; {_name_of(missing.pop())} is missing",
            where.get(single[0]))  # fmt: skip
    # policyd-spf: with both identities at False (our default without its file), PermError_reject
    # and TempError_Defer do nothing; say so rather than let an explicit option sit unused.
    enforcing = {values.get("helo_reject", "False"), values.get("mail_from_reject", "False")}
    if enforcing <= {"False", "No_Check"}:
        for attr in ("temperror_defer", "permerror_reject"):
            if values.get(attr):
                warnings.append(ConfigWarning(
                    f"{_name_of(attr)} has no effect while HELO_reject and Mail_From_reject are "
                    "False or No_Check (their default without a policyd-spf.conf); set "
                    "Mail_From_reject Fail to use it", where.get(attr)))  # fmt: skip
    if values.get("dns_deadline", 1) <= 0:
        raise ConfigError("DNSDeadline: must be a positive number of seconds",
                          where.get("dns_deadline"))  # fmt: skip
    listen = values.get("metrics_listen")
    if listen is not None:
        try:
            parse_listen(listen)
        except ValueError as e:
            raise ConfigError(f"MetricsListen: {e}", where.get("metrics_listen")) from None
    database = values.get("report_database")
    if database is not None:
        try:
            parse_report_database(database)
        except ValueError as e:
            raise ConfigError(f"ReportDatabase: {e}", where.get("report_database")) from None
    if values.get("report_keep_days", 31) < 8:
        raise ConfigError("ReportKeepDays: at least 8 (reports send looks back over the last "
                          "7 complete days)", where.get("report_keep_days"))  # fmt: skip
    history = values.get("history_file")
    if history is not None and not history.startswith("/"):
        raise ConfigError(f"HistoryFile: {history!r} is not an absolute path (the workers "
                          "append to it from their own working directory)",
                          where.get("history_file"))  # fmt: skip
    server = values.get("report_smtp_server")
    if server is not None:
        try:
            parse_report_server(server)
        except ValueError as e:
            raise ConfigError(f"ReportSMTPServer: {e}", where.get("report_smtp_server")) from None
    for attr in ("report_sender", "failure_reports_sent_by", "failure_reports_bcc"):
        address = values.get(attr)
        if address is not None and not _plain_address(address):
            raise ConfigError(f"{_name_of(attr)}: {address!r} is not an address like "
                              "dmarc-reports@example.net", where.get(attr))  # fmt: skip
    arc_sign = values.get("arc_sign", "none")
    if arc_sign != "none" and not values.get("arc_seal_key"):
        raise ConfigError(f"ARCSign {arc_sign} needs ARCSealKey (a KeyTable key name)",
                          where.get("arc_sign"))  # fmt: skip
    if values.get("arc_seal_key") and "key_table" not in values:
        raise ConfigError("ARCSealKey names a KeyTable key, but no KeyTable is set",
                          where.get("arc_seal_key"))  # fmt: skip
    if values.get("arc_seal_key") and arc_sign == "none":
        warnings.append(ConfigWarning("ARCSealKey has no effect while ARCSign is none",
                                      where.get("arc_seal_key")))  # fmt: skip
    for attr in ("dmarc_domain_whitelist", "domain_whitelist_file"):
        if values.get(attr):
            name = "DomainWhitelist" if attr == "dmarc_domain_whitelist" else _name_of(attr)
            warnings.append(ConfigWarning(
                f"{name} (OpenDMARC's trusted ARC domains) is read as ARCTrustedSealers "
                "entries: a DMARC failure is overridden when a chain these domains sealed "
                "validates and its results pass DMARC (docs/arc.md)", where.get(attr)))
    mkb = values.get("minimum_key_bits")
    if mkb is not None and 0 < mkb < 1024:
        warnings.append(ConfigWarning(
            f"MinimumKeyBits {mkb}: RFC 8301 requires verifiers to refuse RSA keys below 1024 bits",
            where.get("minimum_key_bits")))  # fmt: skip


def parse_listen(text: str) -> tuple[str, int]:
    """``MetricsListen``: ``127.0.0.1:9489``, ``[::1]:9489`` or ``:9489`` (all addresses).

    :raises ValueError: not ``address:port`` with an IP address and a port in 1..65535.
    """
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65_535:
        raise ValueError(f"{text!r} is not address:port (e.g. 127.0.0.1:9489, [::1]:9489)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address") from None
    return host, int(port)


def _plain_address(text: str) -> bool:
    local, at, domain = text.strip().rpartition("@")
    return bool(at and local and "." in domain.strip(".")
                and not any(c.isspace() or c in "<>,;\"()" for c in text.strip()))


def parse_report_server(text: str) -> tuple[str, int] | str:
    """``ReportSMTPServer``: ``host:port`` (``localhost:25``, ``[::1]:25``) gives
    ``(host, port)``; an absolute path (a sendmail program) is returned as it is.

    :raises ValueError: neither.
    """
    value = text.strip()
    if value.startswith("/"):
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65_535 or not host:
        raise ValueError(f"{text!r} is neither host:port (e.g. localhost:25) nor the absolute "
                         "path of a sendmail program")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


@dataclass(frozen=True, slots=True)
class DatabaseURL:
    """A parsed ``ReportDatabase`` value (:func:`parse_report_database`).

    ``kind`` is ``"sqlite"`` or ``"postgresql"``; ``target`` the SQLite file's absolute path,
    or the libpq connection URI as written (it may hold a password: show :attr:`masked`, never
    ``target``; ``repr`` and ``str`` mask it too).
    """

    kind: str
    target: str

    @property
    def masked(self) -> str:
        """The URL for messages and logs, any password replaced by ``***``."""
        if self.kind == "sqlite":
            return f"sqlite:///{self.target}"
        return _mask_password(self.target)

    def redact(self, text: str) -> str:
        """``text`` (an error message, say) with this URL's password, if any, masked."""
        for secret in _passwords(self.target):
            text = text.replace(secret, "***")
        return text

    def __str__(self) -> str:
        return self.masked

    def __repr__(self) -> str:
        return f"DatabaseURL({self.kind!r}, {self.masked!r})"


# user:password@ in the authority, and password=... among the query parameters (libpq URIs).
_URI_PASSWORD = re.compile(r"^(?P<head>[A-Za-z]+://[^/?#@:]*:)(?P<secret>[^/?#@]*)(?=@)")
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<secret>[^&#]*)", re.I)


def _mask_password(url: str) -> str:
    url = _URI_PASSWORD.sub(lambda m: m["head"] + "***", url, count=1)
    return _QUERY_PASSWORD.sub(lambda m: m["head"] + "***", url)


def _passwords(url: str) -> list[str]:
    import urllib.parse

    found = [m["secret"] for m in (_URI_PASSWORD.match(url),) if m is not None]
    found += [m["secret"] for m in _QUERY_PASSWORD.finditer(url)]
    both = [s for s in found if s] + [urllib.parse.unquote(s) for s in found if s]
    return sorted(set(both), key=len, reverse=True)  # the longest first: no half-masked text


def parse_report_database(url: str) -> DatabaseURL:
    """``ReportDatabase``: ``sqlite:////absolute/path.db`` (one host) or a libpq connection URI
    ``postgresql://[user[:password]@][host][:port][/dbname][?param=value&...]`` (also
    ``postgres://``; ``?host=/run/postgresql`` for a UNIX socket folder) shared by a fleet.

    The PostgreSQL URI is checked by libpq's own parser (through psycopg), without connecting.

    :raises ValueError: another scheme, a relative SQLite path or a URI libpq refuses; the
        message never shows the password.
    """
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    kind = scheme.lower()
    if sep and kind == "sqlite":
        path = rest[1:] if rest.startswith("/") else ""
        if not path.startswith("/") or path.endswith("/"):
            raise ValueError(f"{text!r}: the SQLite database must be an absolute file path, "
                             "written sqlite:////absolute/path.db (four slashes)")
        return DatabaseURL("sqlite", path)
    if not sep or kind not in ("postgresql", "postgres"):
        raise ValueError(f"{_mask_password(text)!r}: expected sqlite:////absolute/path.db or "
                         "postgresql://user@host/dbname")
    found = DatabaseURL("postgresql", text)
    try:
        from psycopg import Error as PsycopgError
        from psycopg.conninfo import conninfo_to_dict
    except ImportError as e:
        raise ValueError(f"{found.masked!r}: PostgreSQL needs psycopg and the system libpq "
                         f"(Debian package libpq5): {e}") from None
    try:
        params = conninfo_to_dict(text)
    except PsycopgError as e:
        problem = found.redact(str(e).strip())
        raise ValueError(f"{found.masked!r}: not a valid PostgreSQL connection URI: "
                         f"{problem}") from None
    for port in str(params.get("port") or "").split(","):  # libpq checks ports only when used
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"{found.masked!r}: {port!r} is not a TCP port")
    return found


def _name_of(field_name: str) -> str:
    return next(d.name for d in DIRECTIVES if d.field_name == field_name)


def load_config(path: str, *, overrides: Mapping[str, str] | None = None) -> Loaded:
    """Read one (merged) configuration file.

    :raises ConfigError: naming file:line of the first problem.
    """
    return build_config(_read_file(path, None), overrides=overrides)


def load_split(opendkim_conf: str | None, opendmarc_conf: str | None,
               policyd_spf_conf: str | None = None, *,
               overrides: Mapping[str, str] | None = None) -> Loaded:  # fmt: skip
    """Read a user's existing opendkim.conf, opendmarc.conf and policyd-spf.conf unchanged.

    A directive set differently by several files takes the value of the first in that order
    (OpenDKIM, then OpenDMARC, then policyd-spf), with a warning that names both lines; values
    are compared by meaning (``Syslog yes`` and ``Syslog true`` agree). policyd-spf's defaults
    (``HELO_reject Fail``, ``Mail_From_reject Fail``) apply only when its file is given.

    :raises ConfigError: naming file:line of the first problem.
    """
    files = [
        _read_file(opendkim_conf, None) if opendkim_conf else [],
        _read_file(opendmarc_conf, None) if opendmarc_conf else [],
        _read_policyd_spf(policyd_spf_conf) if policyd_spf_conf else [],
    ]
    first: dict[str, int] = {}  # directive → the first file that sets it
    for i, settings in enumerate(files):
        for s in settings:
            first.setdefault(s.directive.name, i)
    # The winning file's value is its last line for that directive.
    winner = {s.directive.name: s for i, settings in enumerate(files) for s in settings
              if first[s.directive.name] == i}  # fmt: skip
    warnings: list[ConfigWarning] = []
    ordered: list[Setting] = []
    for i, settings in enumerate(files):
        for s in settings:
            other = winner[s.directive.name]
            if first[s.directive.name] == i:
                ordered.append(s)
            elif not same_meaning(other, s):
                warnings.append(ConfigWarning(
                    f"{s.directive.name} is '{other.value}' in {other.where} and '{s.value}' "
                    "here; the earlier file's value is used (OpenDKIM, then OpenDMARC, then "
                    "policyd-spf)", s.where))  # fmt: skip
    # policyd-spf's defaults come with its file only: OpenDKIM and OpenDMARC never reject on SPF.
    loaded = build_config(
        ordered, overrides=overrides,
        defaults=POLICYD_SPF_DEFAULTS if policyd_spf_conf else None,
        defaults_note=f"policyd-spf's default, as {policyd_spf_conf} is given")  # fmt: skip
    return Loaded(loaded.config, (*warnings, *loaded.warnings))


def _read_policyd_spf(path: str) -> list[Setting]:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
    return read_policyd_spf_text(text, path)


# ---------------------------------------------------------------------------------------------
# Presenting it.


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, tuple):
        if len(value) == 2 and all(isinstance(v, Canon) for v in value):
            return f"{value[0].value}/{value[1].value}"
        return ", ".join(str(v) for v in value) if value else "(empty)"
    if value is None:
        return "(unset)"
    return str(value)


def _origin(cfg: Config, attr: str) -> str:
    """Where a value comes from: file:line, or the default and why."""
    loc = cfg.location(attr)
    if loc is not None:
        return str(loc)
    note = cfg.default_notes.get(attr)
    return f"default ({note})" if note else "default"


def spf_enforcement_lines(cfg: Config) -> list[str]:
    """What SPF alone does to a message, and which setting decides it (``config-test -v``)."""

    def identity(attr: str, label: str) -> str:
        value = getattr(cfg, attr)
        name = _name_of(attr)
        if value == "No_Check":
            what = "not checked"
        elif value == "False":
            what = "checked, never rejects or defers by itself"
        elif not cfg.test_only:
            what = f"checked; would reject on {value} but TestOnly 0 never acts"
        else:
            what = f"rejects on {value}"
        return f"# SPF {label}: {what}    ({name} {value}: {_origin(cfg, attr)})"

    lines = [identity("mail_from_reject", "MAIL FROM"), identity("helo_reject", "HELO")]
    if cfg.spf_reject_after_dmarc:
        lines.append("# SPF rejects are held until the end of the message and dropped when DMARC "
                     "passes through an aligned DKIM signature    (SPFRejectAfterDMARC yes: "
                     f"{_origin(cfg, 'spf_reject_after_dmarc')})")  # fmt: skip
    else:
        lines.append("# SPF rejects and defers are answered at RCPT    (SPFRejectAfterDMARC "
                     f"no: {_origin(cfg, 'spf_reject_after_dmarc')})")  # fmt: skip
    return lines


def effective_lines(cfg: Config) -> list[str]:
    """``Name value  # where`` for every supported directive, for ``config-test -v``."""
    lines = spf_enforcement_lines(cfg)
    for d in DIRECTIVES:
        if d.name == "Include" or d.support in (Support.IGNORED, Support.RESOLVER):
            continue
        if d.support is Support.FIXED:
            lines.append(f"{d.name:<28} {_show(d.fixed)}    # always: {d.doc}")
            continue
        value = getattr(cfg, d.field_name)
        shown = f"{value:04o}" if d.kind is Kind.OCTAL and value is not None else _show(value)
        lines.append(f"{d.name:<28} {shown}    # {_origin(cfg, d.field_name)}")
    for name, value in cfg.ignored:
        lines.append(f"#{name:<27} {value}    # recognised, ignored")
    return lines


def directives_markdown() -> str:
    """The directive reference table of ``docs/configuration.md`` (kept in sync by a test)."""
    out = [
        "| Directive | From | Status | Type | Default | Notes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for d in sorted(DIRECTIVES, key=lambda d: d.name.lower()):
        if d.kind is Kind.OCTAL and d.default is not None:
            default = f"{d.default:04o}"
        elif d.default is None or d.default == ():
            default = "—"
        else:
            default = _show(d.default)
        status = {S: "supported", IG: "warned, ignored", R: "warned, ignored (resolver)",
                  FX: f"always {_show(d.fixed)}"}[d.support]  # fmt: skip
        default = default.replace("|", "\\|")
        out.append(f"| `{d.name}` | {d.component.value} | {status} | {d.kind.value} | "
                   f"{default} | {d.doc.replace('|', chr(92) + '|')} |")  # fmt: skip
    return "\n".join(out) + "\n"


TABLE_MARKER = "<!-- directive table: generated by `make docs`, do not edit below -->"


def update_docs(path: str) -> None:
    """Rewrite the directive table after :data:`TABLE_MARKER` in ``path``."""
    doc = Path(path).read_text(encoding="utf-8")
    head, marker, _old = doc.partition(TABLE_MARKER)
    if not marker:
        raise SystemExit(f"{path}: marker line not found: {TABLE_MARKER}")
    Path(path).write_text(f"{head}{TABLE_MARKER}\n\n{directives_markdown()}", encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover - `make docs`
    if sys.argv[1:2] == ["--update"] and len(sys.argv) == 3:
        update_docs(sys.argv[2])
    else:
        sys.stderr.write("usage: python -m authmilter.config --update docs/configuration.md\n")
        sys.exit(2)


@dataclass(frozen=True, slots=True)
class Account:
    """The ``UserID`` user and group that the workers become."""

    name: str
    uid: int
    gid: int


def user_id_account(cfg: Config) -> Account | None:
    """Resolve ``UserID user[:group]`` (the group defaults to the user's own), or None
    without UserID.

    :raises ConfigError: for an unknown user or group, at the UserID line.
    """
    if not cfg.user_id:
        return None
    user, _, group = cfg.user_id.partition(":")
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"UserID: unknown user '{user}'", cfg.location("user_id")) from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"UserID: unknown group '{group}'",
                              cfg.location("user_id")) from None  # fmt: skip
    return Account(user, pw.pw_uid, gid)
