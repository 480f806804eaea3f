"""The per-message pipeline: ``Connection`` (client) and ``Transaction`` (one message).

No pymilter here: the adapter (:mod:`authmilter.server`) feeds events in and applies the
:class:`Verdict` that comes out. Everything is decided in plain Python that tests drive directly.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from authmilter import addresses, arc_sign, arc_trust, arc_verify, authresults, dmarc
from authmilter.arc_verify import ArcOutcome
from authmilter.body_hash import BodyHashes
from authmilter.config import Action, Config, DatasetSpec, SignatureAlgorithm
from authmilter.datasets import Dataset, HostList, open_dataset
from authmilter.dkim_sign import SigningPolicy, body_hash_spec, sign
from authmilter.dkim_verify import TxtLookup, plan_body_hashes, verify_fields
from authmilter.errors import AuthmilterError, ConfigError
from authmilter.keys import KeyAlgorithm
from authmilter.keytable import KeyStore, SigningKey
from authmilter.reports.record import DmarcEvent, MessageContext, is_report_mail
from authmilter.results import (
    DkimOutcome,
    DkimProblem,
    DkimResult,
    DmarcOutcome,
    DmarcPolicy,
    DmarcResult,
    SpfIdentity,
    SpfOutcome,
    SpfResult,
)
from authmilter.spf_check import (
    DnsQuery,
    SpfChecker,
    SpfPolicy,
    SpfWhitelist,
    decide,
    received_spf,
    received_spf_receiver,
    whitelist_comment,
    whitelisted,
)

#: Macros every transaction wants from the MTA (names without braces).
BASE_MACROS = ("i", "j", "daemon_name", "auth_type", "auth_authen")

log = logging.getLogger("authmilter")


# -- actions the adapter applies ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddHeader:
    """Insert a header field; ``index`` 0 = at the very top (RFC 8601 §5, RFC 6376 §5.6)."""

    name: str
    value: str
    index: int = 0


@dataclass(frozen=True, slots=True)
class DeleteHeader:
    """Delete the ``occurrence``-th (1-based) field of that name, as ``smfi_chgheader``."""

    name: str
    occurrence: int


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply for a reject or tempfail."""

    code: str
    xcode: str
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RcptVerdict:
    """The answer to one RCPT TO: ``action`` ``ACCEPT`` (go on with the message, the milter's
    continue), or ``REJECT``/``TEMPFAIL`` with its ``reply`` when SPF refuses the sender.

    Every recipient of a refused message gets the same answer and its own log line, but the
    message is counted once: ``first`` is set on its first refused recipient only, which also
    carries the ``(method, result)`` pairs for the metrics (always the verify direction).
    """

    action: Action = Action.ACCEPT
    reply: Reply | None = None
    log: str = ""
    first: bool = False
    results: tuple[tuple[str, str], ...] = ()


class Direction(StrEnum):
    """What the pipeline did with a message: signed it (or tried), or checked it."""

    SIGN = "sign"
    VERIFY = "verify"


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """What to do with the message: the action, its reply, header edits, the log line, and
    for the metrics the direction and the ``(method, result)`` pairs found."""

    action: Action
    reply: Reply | None = None
    edits: tuple[AddHeader | DeleteHeader, ...] = ()
    quarantine_reason: str | None = None
    log: str = ""
    direction: Direction = Direction.VERIFY
    results: tuple[tuple[str, str], ...] = ()
    #: The traceback of an unexpected failure behind the verdict (a signing library error),
    #: for the adapter to log below the line.
    traceback: str | None = None
    #: The message as a DMARC report records it: inbound mail whose DMARC result is pass or
    #: fail (a policy record was found and applied); ``None`` otherwise.
    dmarc_event: DmarcEvent | None = None
    #: With :attr:`dmarc_event`, when HistoryFile or FailureReports is on: the message as
    #: received, for them.
    report_context: MessageContext | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Results:
    """The one value the end-of-message steps fill in, in order (:meth:`Transaction._eom`):
    evaluate (DKIM, ARC; SPF came at RCPT) → DMARC → decide → render → seal and sign →
    record. Each step returns a new value; one that settles the message sets ``done``."""

    qid: str
    edits: tuple[AddHeader | DeleteHeader, ...] = ()
    #: A verdict that ends the message here (a header reject, a signing error).
    done: Verdict | None = None
    author: addresses.AuthorDomain | None = None
    dkim: tuple[DkimOutcome, ...] = ()
    dkim_action: Action = Action.ACCEPT
    dkim_why: str = ""
    dkim_problem: DkimProblem | None = None
    arc: ArcOutcome | None = None
    #: The DMARC outcome; after :meth:`Transaction._decide` with the disposition applied.
    dmarc: DmarcOutcome | None = None
    #: The disposition DMARC asked for (t=y and pct applied, before local policy).
    evaluated: DmarcPolicy | None = None
    #: A trusted ARC sealer's results that turned a DMARC failure into disposition none.
    rescue: arc_trust.Rescue | None = None
    action: Action = Action.ACCEPT
    reply: Reply | None = None
    why: str = ""
    #: Why a held SPF reply still applies (SPFRejectAfterDMARC); empty when dropped.
    spf_why: str = ""
    #: Our Authentication-Results value as added (``authserv-id; results``).
    ar: str | None = None
    log: str = ""
    event: DmarcEvent | None = None
    context: MessageContext | None = None


# -- the shared, read-only context ------------------------------------------------------------


class DnsResolver(TxtLookup, DnsQuery, Protocol):
    """What the pipeline needs of the resolver: TXT for DKIM and DMARC, any type for SPF, and
    a per-stage time budget (:meth:`authmilter.resolver.Resolver.deadline`)."""

    def deadline(self, seconds: float) -> AbstractContextManager[None]:
        """Bound the lookups of this thread inside the block to ``seconds`` in total."""
        ...


@dataclass(frozen=True, slots=True)
class MacroRule:
    """One MacroList entry: the macro must be set, and equal one of ``values`` if any."""

    name: str
    values: tuple[str, ...] = ()

    def matches(self, macros: Mapping[str, str]) -> bool:
        """OpenDKIM's rule: value match is case-sensitive; no values = any non-empty value."""
        value = macros.get(self.name)
        if not value:
            return False
        return not self.values or value in self.values


def _macro_name(name: str) -> str:
    return name.strip().strip("{}")


def parse_macro_list(ds: Dataset) -> tuple[MacroRule, ...]:
    """MacroList entries ``name`` or ``name=value1|value2`` (csl) / ``name value1|value2``."""
    rules = []
    for key, value, _where in ds.entries():
        if "=" in key and not value:
            key, _, value = key.partition("=")
        values = tuple(v.strip() for v in value.split("|") if v.strip())
        rules.append(MacroRule(_macro_name(key), values))
    return tuple(rules)


@dataclass(frozen=True, slots=True, kw_only=True)
class Context:
    """Everything shared by all messages: configuration, keys, resolver, host lists."""

    config: Config
    keys: KeyStore
    resolver: DnsResolver
    authserv_id: str
    #: AuthservID (and policyd-spf's Authserv_Id) unset: as OpenDKIM and OpenDMARC, the MTA's
    #: own name (the ``{j}`` macro) is the authserv-id; ``authserv_id`` is the fallback.
    authserv_id_from_mta: bool = False
    internal_hosts: HostList
    peer_list: HostList | None = None
    external_ignore: HostList | None = None
    macro_rules: tuple[MacroRule, ...] = ()
    mta_names: Dataset | None = None
    signing_policy: SigningPolicy = field(default_factory=SigningPolicy)
    spf: SpfChecker
    spf_policy: SpfPolicy = field(default_factory=SpfPolicy)
    spf_whitelist: SpfWhitelist = field(default_factory=SpfWhitelist)
    spf_skip: HostList
    ignore_hosts: HostList
    psl: dmarc.PublicSuffix
    org_method: dmarc.OrgDomainMethod = dmarc.OrgDomainMethod.PSL
    clock: Callable[[], float] = time.time
    rand: Callable[[], float] = random.random
    #: ARCSign: which mail is sealed, and with which key (RFC 8617 §5.1).
    arc_sign: str = "none"
    arc_seal_key: SigningKey | None = None
    #: ARCTrustedSealers, DomainWhitelist and DomainWhitelistFile: trusted sealer domains.
    arc_trusted: tuple[Dataset, ...] = ()

    @classmethod
    def build(cls, cfg: Config, *, resolver: DnsResolver, keys: KeyStore | None = None,
              clock: Callable[[], float] = time.time,
              rand: Callable[[], float] = random.random) -> Context:  # fmt: skip
        """Open the datasets and key tables a configuration names.

        :raises ConfigError: for an unusable dataset or key.
        """

        def hosts(spec: DatasetSpec | None) -> HostList | None:
            if spec is None:
                return None
            return HostList.from_dataset(open_dataset(spec.spec, where=spec.where))

        internal = hosts(cfg.internal_hosts)
        assert internal is not None
        macro_rules: tuple[MacroRule, ...] = ()
        if cfg.macro_list is not None:
            macro_rules = parse_macro_list(
                open_dataset(cfg.macro_list.spec, where=cfg.macro_list.where,
                             case_sensitive=True))  # fmt: skip
        mta = None
        if cfg.mta is not None:
            mta = open_dataset(cfg.mta.spec, where=cfg.mta.where, case_sensitive=True)
        assert cfg.authserv_id is not None, "resolve AuthservID (HOSTNAME) before building"
        try:
            spf_policy = SpfPolicy(
                helo_reject=cfg.helo_reject,  # type: ignore[arg-type]  # validated choice text
                mail_from_reject=cfg.mail_from_reject,  # type: ignore[arg-type]
                permerror_reject=cfg.permerror_reject,
                temperror_defer=cfg.temperror_defer,
                reject_not_pass_domains=cfg.reject_not_pass_domains,
                no_mail=cfg.no_mail,
                test_only=cfg.test_only,
                enhanced_status_codes=cfg.spf_enhanced_status_codes,
                reason_message=cfg.reason_message,
            )
        except ValueError as e:
            raise ConfigError(str(e), cfg.location("reason_message")) from None
        try:
            spf_whitelist = SpfWhitelist(skip_addresses=cfg.skip_addresses,
                                         whitelist=cfg.whitelist,
                                         helo_whitelist=cfg.helo_whitelist,
                                         domain_whitelist=cfg.domain_whitelist)  # fmt: skip
        except ValueError as e:
            raise ConfigError(str(e), cfg.location("whitelist") or cfg.location(
                "skip_addresses")) from None
        skip = HostList.from_entries((a, cfg.location("skip_addresses"))
                                     for a in cfg.skip_addresses)  # fmt: skip
        ignore = hosts(cfg.ignore_hosts)
        assert ignore is not None
        keys = keys if keys is not None else KeyStore.from_config(cfg)
        seal_key = None
        if cfg.arc_sign != "none":
            where = cfg.location("arc_seal_key")
            assert cfg.arc_seal_key is not None, "Config checks ARCSign needs ARCSealKey"
            seal_key = keys.named_key(cfg.arc_seal_key, where)
            if seal_key.key.algorithm is not KeyAlgorithm.RSA:
                raise ConfigError(f"ARCSealKey {cfg.arc_seal_key}: ARC seals are rsa-sha256 "
                                  f"only (RFC 8617 §4.1.3); this key is "
                                  f"{seal_key.key.algorithm.value}", where)  # fmt: skip
            if cfg.arc_sign in ("inbound", "both") and not cfg.verifying:
                raise ConfigError(f"ARCSign {cfg.arc_sign} seals verified mail, but Mode "
                                  f"{cfg.mode} does not verify", cfg.location("arc_sign"))
        trusted: list[Dataset] = []
        if cfg.arc_trusted_sealers is not None:
            trusted.append(open_dataset(cfg.arc_trusted_sealers.spec,
                                        where=cfg.arc_trusted_sealers.where))  # fmt: skip
        if cfg.dmarc_domain_whitelist:
            trusted.append(open_dataset("csl:" + ",".join(cfg.dmarc_domain_whitelist),
                                        where=cfg.location("dmarc_domain_whitelist")))
        if cfg.domain_whitelist_file:
            trusted.append(open_dataset("file:" + cfg.domain_whitelist_file,
                                        where=cfg.location("domain_whitelist_file")))
        return cls(
            config=cfg,
            keys=keys,
            resolver=resolver,
            authserv_id=cfg.authserv_id,
            authserv_id_from_mta=(cfg.location("authserv_id") is None
                                  and cfg.location("spf_authserv_id") is None),
            internal_hosts=internal,
            peer_list=hosts(cfg.peer_list),
            external_ignore=hosts(cfg.external_ignore_list),
            macro_rules=macro_rules,
            mta_names=mta,
            signing_policy=SigningPolicy(
                canonicalization=cfg.canonicalization,
                sign_headers=cfg.sign_headers,
                omit_headers=cfg.omit_headers,
                oversign_headers=cfg.oversign_headers,
                rsa_algorithm=cfg.signature_algorithm,
                ttl=cfg.signature_ttl,
            ),
            spf=SpfChecker(resolver, timeout=float(cfg.lookup_time or 20),
                           void_limit=cfg.void_limit, receiver=cfg.authserv_id),  # fmt: skip
            spf_policy=spf_policy,
            spf_whitelist=spf_whitelist,
            spf_skip=skip,
            ignore_hosts=ignore,
            psl=dmarc.PublicSuffix(cfg.public_suffix_list),
            org_method=dmarc.OrgDomainMethod(cfg.organizational_domain_method),
            clock=clock,
            rand=rand,
            arc_sign=cfg.arc_sign,
            arc_seal_key=seal_key,
            arc_trusted=tuple(trusted),
        )

    def trusts_sealer(self, domain: str) -> bool:
        """Whether ``domain`` (an ARC-Seal's d=) is a trusted sealer."""
        name = domain.strip().rstrip(".")
        return bool(name) and any(name in ds for ds in self.arc_trusted)

    def seals(self, originating: bool) -> bool:
        """Whether ARCSign asks to seal mail of this direction."""
        wanted = ("outbound", "both") if originating else ("inbound", "both")
        return self.arc_seal_key is not None and self.arc_sign in wanted

    def macro_names(self) -> tuple[str, ...]:
        """Every macro the pipeline may consult (for the adapter to fetch)."""
        names = list(BASE_MACROS) + [r.name for r in self.macro_rules]
        return tuple(dict.fromkeys(names))

    def dataset_warnings(self) -> list[str]:
        """``where: Directive: message`` for host-list entries OpenDKIM accepts but that never
        match (or match otherwise), and for SigningTable lines OpenDKIM drops."""
        lists = (("InternalHosts", self.internal_hosts), ("PeerList", self.peer_list),
                 ("ExternalIgnoreList", self.external_ignore),
                 ("IgnoreHosts", self.ignore_hosts))  # fmt: skip
        found = [(name, message, where) for name, hosts in lists if hosts is not None
                 for message, where in hosts.warnings]  # fmt: skip
        found += [("SigningTable", message, where) for message, where in self.keys.warnings()]
        return [f"{where}: {name}: {message}" if where else f"{name}: {message}"
                for name, message, where in found]  # fmt: skip

    def removable_ids(self) -> tuple[str, ...]:
        """Our authserv-id plus RemoveARFrom: incoming A-R claiming these are removed."""
        return (self.authserv_id, *self.config.remove_ar_from)


# -- connection and transaction ---------------------------------------------------------------


class Connection:
    """One SMTP client connection: who it is, decided once."""

    def __init__(self, ctx: Context, *, hostname: str | None, ip: str | None,
                 macros: Mapping[str, str] | None = None,
                 leading_space: bool = True) -> None:  # fmt: skip
        self.ctx = ctx
        # True when header values arrive exactly as on the wire, space after the colon
        # included (SMFIP_HDR_LEADSPC); otherwise the MTA stripped one space, which we restore.
        self.leading_space = leading_space
        self.hostname = hostname if hostname and not hostname.startswith("[") else None
        self.ip = ip
        self.helo: str | None = None
        self.macros: dict[str, str] = dict(macros or {})
        # PeerList: connections passed through without any processing.
        self.peer = ctx.peer_list is not None and ctx.peer_list.matches(ip, self.hostname)
        self.internal = ctx.internal_hosts.matches(ip, self.hostname)

    def set_helo(self, name: str) -> None:
        """Remember the HELO/EHLO name (SPF's HELO identity, later)."""
        self.helo = name

    def transaction(self) -> Transaction:
        """Start a new message on this connection."""
        return Transaction(self)


class Transaction:
    """One message: MAIL FROM … end of message. ``abort`` simply drops the object."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.ctx = conn.ctx
        self.macros: dict[str, str] = dict(conn.macros)
        self.mail_from: str | None = None
        self.recipients: list[str] = []
        self.spf_checked = False
        self.spf: SpfOutcome | None = None
        self.spf_reply: Reply | None = None
        self.refused_rcpts = 0  # recipients answered with spf_reply (the message counts once)
        # SPFRejectAfterDMARC: the SPF reply, held until DMARC is known at the end of message.
        self.spf_held: Reply | None = None
        self.spf_note: str | None = None  # why SPF was not checked, or the whitelist entry
        # The client is a relay the user exempted from SPF (skip_addresses, Whitelist …): the
        # only mail whose upstream results (TrustedAuthservIDs) may fill in for our own.
        self.trusted_relay = False
        self.spf_header: AddHeader | None = None
        self.headers: list[tuple[str, bytes]] = []
        self.header_bytes = 0
        # The body is never kept: it is hashed as it streams in, for signing or verifying,
        # by the hashes planned at the end of the header (memory stays flat for any size).
        self.bodies: BodyHashes | None = None
        # Decided once at the end of the header (no header field comes after it).
        self.author: str | None = None
        self._author_parsed: tuple[tuple[str, ...], addresses.AuthorDomain] | None = None
        self.is_originating = False
        self._wire: list[tuple[bytes, bytes]] | None = None
        self.sign_keys: list[SigningKey] = []
        self.sign_error: str | None = None
        self.results: list[tuple[str, str]] = []  # (method, result) for the metrics
        # What DMARC was evaluated with (our DKIM results plus trusted upstream ones, and the
        # SPF outcome), for the report record.
        self._dmarc_inputs: tuple[list[DkimOutcome], SpfOutcome | None] = ([], None)

    # -- events --------------------------------------------------------------------------------

    def update_macros(self, macros: Mapping[str, str | None]) -> None:
        """Record macro values the MTA sent at some stage (``None`` = not sent)."""
        self.macros.update({k: v for k, v in macros.items() if v is not None})

    def envfrom(self, address: str) -> None:
        """MAIL FROM."""
        self.mail_from = address.strip("<>")

    def rcpt(self, address: str) -> RcptVerdict:
        """RCPT TO: SPF is checked at the first one (as policyd-spf, at RCPT time); a reject or
        defer answers every recipient alike, each logged here (the queue id is the ``i``
        macro, so update the macros first)."""
        self.recipients.append(address.strip("<>"))
        if not self.spf_checked:
            self.spf_checked = True
            # One budget for the whole stage: Postfix waits milter_command_timeout for RCPT.
            with self.ctx.resolver.deadline(self.ctx.config.dns_deadline):
                self._check_spf()
            if self.spf_reply is not None and self.ctx.config.spf_reject_after_dmarc:
                # Held: DMARC, at the end of the message, may still pass through DKIM.
                self.spf_held, self.spf_reply = self.spf_reply, None
        reply = self.spf_reply
        if reply is None:
            return RcptVerdict()
        spf = self.spf
        action = Action.REJECT if reply.code.startswith("5") else Action.TEMPFAIL
        qid = self.macros.get("i") or "NOQUEUE"
        identity = f"{spf.identity.value}={spf.sender}" if spf else ""
        line = (f"{qid}: spf={spf.result.value if spf else '?'} {identity}, "
                f"action={action.value} at RCPT: {reply.code} {reply.xcode} {reply.text}")
        log.info("%s", line)
        first = self.refused_rcpts == 0
        self.refused_rcpts += 1
        results = (("spf", spf.result.value),) if first and spf is not None else ()
        return RcptVerdict(action=action, reply=reply, log=line, first=first, results=results)

    def _check_spf(self) -> None:
        """RFC 7208 for the HELO and MAIL FROM identities, with policyd-spf's options."""
        ctx, conn = self.ctx, self.conn
        cfg = ctx.config
        if conn.peer or self.originating():
            self.spf_note = "internal or authenticated client"
            return
        ip = conn.ip
        if ip is None:
            self.spf_note = "no client address"
            return
        if ctx.spf_skip.matches(ip):
            self.spf_note = "skip_addresses"
            self.trusted_relay = True
            return
        reason = whitelisted(ctx.spf_whitelist, ctx.spf, ip, conn.helo)
        if reason is not None:
            self.spf_note = reason
            self.trusted_relay = True
            name, value = whitelist_comment(reason, ip, conn.helo, self.mail_from,
                                            self._receiver())  # fmt: skip
            self.spf_header = AddHeader(name, value)
            return
        sender = self.mail_from or ""
        helo_outcome = None
        # The HELO identity is always checked (as policyd-spf), unless HELO_reject No_Check;
        # for the null sender it is also the MAIL FROM identity (RFC 7208 §2.4).
        if cfg.helo_reject != "No_Check" and conn.helo:
            helo_outcome = ctx.spf.check_helo(ip, conn.helo)
        mailfrom_outcome = None
        if cfg.mail_from_reject != "No_Check" or not sender:
            mailfrom_outcome = ctx.spf.check_mailfrom(ip, sender, conn.helo)
        decision = decide(ctx.spf_policy, helo_outcome, mailfrom_outcome,
                          receiver=self._receiver())  # fmt: skip
        self.spf = mailfrom_outcome or helo_outcome
        # Received-SPF records the identity policyd-spf records (the HELO result when MAIL
        # FROM has none); Authentication-Results and DMARC keep the MAIL FROM result.
        shown = self.spf
        if decision.identity is SpfIdentity.HELO and helo_outcome is not None:
            shown = helo_outcome
        if shown is not None and cfg.header_type == "SPF":
            self.spf_header = AddHeader("Received-SPF", received_spf(
                shown, receiver=self._receiver(), envelope_from=sender or None))  # fmt: skip
        if decision.action in ("reject", "defer"):
            self.spf_reply = Reply(decision.code, decision.xcode, decision.text)

    def _receiver(self) -> str:
        """``receiver=`` of Received-SPF: our host (authserv-id), or hidden."""
        return "<UNKNOWN>" if self.ctx.config.hide_receiver else self.authserv_id

    @property
    def authserv_id(self) -> str:
        """Our authserv-id: AuthservID, else the MTA's name (``{j}``, opendkim.conf(5): "the
        name of the MTA processing the message"), else this host's name."""
        mta = self.macros.get("j") if self.ctx.authserv_id_from_mta else None
        return mta.strip() if mta and mta.strip() else self.ctx.authserv_id

    def removable_ids(self) -> tuple[str, ...]:
        """Incoming A-R claiming these are removed: ours (the MTA's name and the fallback
        when the MTA names the id) and RemoveARFrom."""
        ids = dict.fromkeys((self.authserv_id, *self.ctx.removable_ids()))
        return tuple(ids)

    def header(self, name: str, value: bytes) -> None:
        """One header field, ``value`` as the MTA sent it (leading space, LF folding)."""
        self.headers.append((name, value))
        self.header_bytes += len(name) + len(value) + 3

    def eoh(self) -> None:
        """End of the header: decide sign or verify, and plan the body hashes either needs."""
        if self.bodies is not None:
            return
        self.bodies = BodyHashes()
        cfg = self.ctx.config
        self.author = author = self.author_address()
        self.is_originating = self.originating()
        self._wire = self.wire_headers()
        if cfg.signing and author is not None and self.is_originating:
            try:
                self.sign_keys = self.ctx.keys.keys_for(author)
            except AuthmilterError as e:
                self.sign_error = str(e)
        for key in self.sign_keys:
            self.bodies.add(*body_hash_spec(key, self.ctx.signing_policy))
        if not self.sign_keys and cfg.verifying:
            plan_body_hashes(self._wire, self.bodies,
                             max_signatures=cfg.maximum_signatures_to_verify)  # fmt: skip
            if _has_arc(self._wire):
                arc_verify.plan_body_hashes(self._wire, self.bodies)
        if self.ctx.seals(self.is_originating):
            arc_sign.plan_body_hash(self.bodies)

    def body(self, chunk: bytes) -> None:
        """A piece of the body (CRLF line ends, as the milter protocol carries it)."""
        if self.bodies is None:
            self.eoh()
        assert self.bodies is not None
        self.bodies.update(chunk)

    def close(self) -> None:
        """Drop the body hashes (the transaction is over or aborted)."""
        self.bodies = None

    # -- the decision --------------------------------------------------------------------------

    def eom(self) -> Verdict:
        """Decide: sign or verify, headers to add and remove, the action."""
        try:
            verdict = self._eom()
        finally:
            self.close()
        signed = bool(self.sign_keys) or self.sign_error is not None
        return dataclasses.replace(verdict, results=tuple(self.results),
                                   direction=Direction.SIGN if signed else Direction.VERIFY)

    def _eom(self) -> Verdict:
        """The end of the message as ordered steps over one :class:`Results` value: outbound
        mail is signed then sealed; inbound mail is checked (RFC 5322), evaluated (DKIM, ARC;
        SPF came at RCPT), judged by DMARC, decided, rendered into our Authentication-Results,
        sealed, and recorded for reports. A step that settles the message sets ``done``."""
        cfg = self.ctx.config
        qid = self.macros.get("i") or "NOQUEUE"
        limit = cfg.maximum_headers
        if limit and self.header_bytes > limit:
            return Verdict(action=Action.REJECT, edits=(),
                           reply=Reply("552", "5.3.4", f"header block exceeds {limit} bytes"),
                           log=f"{qid}: header block of {self.header_bytes} bytes exceeds "
                               f"MaximumHeaders {limit}, action=reject")  # fmt: skip

        self.eoh()  # a no-op when the adapter called it already
        r = Results(qid=qid, edits=tuple(self._forged_removals()))
        if self.sign_error is not None:
            return self._sign_error(r, self.sign_error)
        steps: tuple[Callable[[Results], Results], ...]
        if self.sign_keys:
            steps = (self._sign, self._seal)
        else:
            steps = (self._check_header, self._evaluate, self._judge_dmarc, self._decide,
                     self._render, self._seal, self._record)  # fmt: skip
        # DKIM and ARC keys and DMARC records share one budget, far below
        # milter_content_timeout.
        with self.ctx.resolver.deadline(cfg.dns_deadline):
            for step in steps:
                r = step(r)
                if r.done is not None:
                    return r.done
        verdict = _verdict(r.action, list(r.edits), r.log, reply=r.reply, quarantine=r.why)
        return dataclasses.replace(verdict, dmarc_event=r.event, report_context=r.context)

    def originating(self) -> bool:
        """OpenDKIM's signing criteria (opendkim(8), OPERATION): SMTP AUTH, InternalHosts,
        an MTA daemon name, or a MacroList match."""
        if self.macros.get("auth_type") or self.macros.get("auth_authen"):
            return True
        if self.conn.internal:
            return True
        daemon = self.macros.get("daemon_name")
        if daemon and self.ctx.mta_names is not None and daemon in self.ctx.mta_names:
            return True
        return any(rule.matches(self.macros) for rule in self.ctx.macro_rules)

    def author_address(self) -> str | None:
        """The address in the first From field (the signer is chosen by it, as OpenDKIM)."""
        for name, value in self.headers:
            if name.lower() == "from":
                text = _unfold(value)
                # The strict parser (never raises): a From it refuses, e.g. a comment inside
                # the domain as in "a@evil.test (x).example.com", chooses no signing key.
                found = self._author_domain([text])
                return found.addresses[0] if found.addresses else None
        return None

    def _author_domain(self, from_values: list[str]) -> addresses.AuthorDomain:
        """:func:`addresses.author_domain`, parsed once for the same From values (the signer
        is chosen at the end of the header, DMARC's author domain at the end of message)."""
        key = tuple(from_values)
        if self._author_parsed is None or self._author_parsed[0] != key:
            self._author_parsed = (key, addresses.author_domain(from_values))
        return self._author_parsed[1]

    # -- signing ------------------------------------------------------------------------------

    def _sign(self, r: Results) -> Results:
        """Step: one DKIM-Signature per key, on top (the first key's topmost)."""
        wire = self.wire_headers()
        assert self.bodies is not None
        now = int(self.ctx.clock())
        added: list[AddHeader] = []
        described = []
        for key in self.sign_keys:
            try:
                spec = body_hash_spec(key, self.ctx.signing_policy)
                bh = self.bodies.get(*spec)
                assert bh is not None
                value = sign(wire, None, key, self.ctx.signing_policy, now=now,
                             body_hash=bh.digest())  # fmt: skip
            except Exception as e:  # noqa: BLE001 - a key/library failure must not lose mail
                verdict = self._sign_error(r, f"signing with {key.keyname} failed: {e}")
                return dataclasses.replace(r, done=dataclasses.replace(
                    verdict, traceback=traceback.format_exc().rstrip()))
            added.append(AddHeader("DKIM-Signature", _milter_folding(value)))
            described.append(f"d={key.domain} s={key.selector} a={self._algorithm(key)}")
        # Each insert goes to the top; insert in reverse so the first key's signature is on top.
        return dataclasses.replace(
            r, edits=(*r.edits, *reversed(added)),
            log=f"{r.qid}: signed {', '.join(described)}, action=accept")  # fmt: skip

    def _algorithm(self, key: SigningKey) -> str:
        if key.key.algorithm is KeyAlgorithm.ED25519:
            return SignatureAlgorithm.ED25519_SHA256.value
        return self.ctx.signing_policy.rsa_algorithm.value

    def _sign_error(self, r: Results, why: str) -> Verdict:
        action = self.ctx.config.on_signature_error
        return _verdict(action, list(r.edits), f"{r.qid}: signing error: {why}",
                        reply=Reply("451", "4.7.0", "signing failed; try again later")
                        if action is Action.TEMPFAIL else
                        Reply("550", "5.7.0", "message could not be signed"))  # fmt: skip

    # -- sealing (RFC 8617 §5.1) ----------------------------------------------------------------

    def _seal(self, r: Results) -> Results:
        """Step: add an ARC Set when ARCSign asks for this direction and the message goes on.

        Inbound mail is sealed with the Authentication-Results just rendered and the chain
        just verified. Outbound mail (a list resending what we received) is sealed with the
        newest Authentication-Results of ours it carries, and that field's ``arc=`` result
        stands for the chain as it arrived: the list's own changes since then (footer,
        subject tag) would break the upstream AMS, which is exactly what ARC is there to
        survive. Outbound mail without such a field is not sealed. A seal that cannot be
        made (a chain ended by ``cv=fail``, 50 instances) is left out and said in the log;
        it never costs the message."""
        originating = self.is_originating
        if (not self.ctx.seals(originating) or self.bodies is None
                or r.action not in (Action.ACCEPT, Action.QUARANTINE)):  # fmt: skip
            return r
        key = self.ctx.arc_seal_key
        assert key is not None
        headers = _final_headers(self.wire_headers(), r.edits)
        if originating:
            found = self._our_results()
            if found is None:
                return r
            aid, results_text, arc_result = found
            chain = _chain_as_recorded(headers, arc_result)
            if isinstance(chain, str):
                return dataclasses.replace(r, log=f"{r.log} (not ARC-sealed: {chain})")
        else:
            if r.ar is None:
                return r
            aid, _sep, results_text = r.ar.partition(";")
            chain = r.arc or ArcOutcome(result="none", reason="no ARC header fields")
        try:
            fields = arc_sign.seal(headers, self.bodies, key, authserv_id=aid.strip(),
                                   ar_value=results_text.strip(), chain=chain,
                                   now=self.ctx.clock())  # fmt: skip
        except arc_sign.SealRefused as e:
            return dataclasses.replace(r, log=f"{r.log} (not ARC-sealed: {e.reason})")
        except Exception as e:  # noqa: BLE001 - a seal is not worth a message
            log.exception("%s: ARC sealing failed", r.qid)
            return dataclasses.replace(r, log=f"{r.log} (not ARC-sealed: {e})")
        # Inserted at the top one after the other: AAR first, so the ARC-Seal ends on top.
        added = tuple(AddHeader(name, _milter_folding(value.encode("ascii", "surrogateescape")))
                      for name, value in reversed(fields))  # fmt: skip
        note = f", ARC-sealed i={chain.instances + 1} d={key.domain} s={key.selector}"
        return dataclasses.replace(r, edits=(*r.edits, *added), log=r.log + note)

    def _our_results(self) -> tuple[str, str, str | None] | None:
        """The newest incoming Authentication-Results with our authserv-id (on outbound mail
        only we can have written it: forged ones were removed when the mail arrived), as
        ``(authserv-id, results, arc result or None)``."""
        ours = tuple(dict.fromkeys((self.authserv_id, self.ctx.authserv_id)))
        for name, value in self.headers:
            if name.lower() != authresults.HEADER.lower():
                continue
            text = _unfold(value)
            if authresults.authserv_id_of(text) is None or not authresults.claims(text, ours):
                continue
            aid, _sep, rest = text.partition(";")
            return aid.strip(), rest.strip(), authresults.result_of(text, "arc")
        return None

    # -- verifying ----------------------------------------------------------------------------

    def _check_header(self, r: Results) -> Results:
        """Step: RFC 5322's header rules (RequiredHeaders) and RejectMultiValueFrom; the
        author domain for DMARC."""
        cfg = self.ctx.config
        qid = r.qid
        from_values = [_unfold(v) for n, v in self.headers if n.lower() == "from"]
        dates = sum(1 for n, _v in self.headers if n.lower() == "date")
        why = detail = ""
        xcode = "5.6.0"
        if cfg.required_headers and (len(from_values) != 1 or dates != 1):
            # RFC 5322 §3.6: exactly one From and one Date field.
            why = (f"the header must have exactly one From and one Date field (RFC 5322 "
                   f"section 3.6); it has {len(from_values)} From and {dates} Date")  # fmt: skip
        author_domain = self._author_domain(from_values)
        if not why and cfg.required_headers and author_domain.status in (
                addresses.FromStatus.ABSENT, addresses.FromStatus.UNPARSEABLE):  # fmt: skip
            # RFC 5322 §3.6.2: the From field holds the author's mailbox; without a domain
            # neither DMARC (RFC 7489 §6.6.1) nor a reader can tell who sent the message.
            why = (f"the From field names no author domain ({author_domain.detail}); "
                   "RFC 5322 section 3.6.2 requires an author mailbox")  # fmt: skip
        if (not why and author_domain.status is addresses.FromStatus.MULTIPLE_DOMAINS
                and cfg.reject_multi_value_from):  # fmt: skip
            why, xcode = "the From field lists addresses of several domains", "5.7.1"
            detail = f" ({author_domain.detail})"
        if why:
            return dataclasses.replace(r, done=Verdict(
                action=Action.REJECT, reply=Reply("550", xcode, why),
                log=f"{qid}: {why}{detail}, action=reject"))  # fmt: skip
        return dataclasses.replace(r, author=author_domain)

    def _evaluate(self, r: Results) -> Results:
        """Step: DKIM signatures and the ARC chain (SPF was checked at RCPT time)."""
        cfg = self.ctx.config
        if not cfg.verifying:
            return r
        assert self.bodies is not None
        outcomes = verify_fields(
            self.wire_headers(), self.bodies, self.ctx.resolver,
            max_signatures=cfg.maximum_signatures_to_verify,
            minimum_key_bits=cfg.minimum_key_bits,
            clock_drift=cfg.clock_drift,
            now=self.ctx.clock(),
        )  # fmt: skip
        action, why, problem = choose_action(cfg, outcomes)
        return dataclasses.replace(r, dkim=tuple(outcomes), dkim_action=action, dkim_why=why,
                                   dkim_problem=problem, arc=self._arc())  # fmt: skip

    def _judge_dmarc(self, r: Results) -> Results:
        """Step: DMARC, and a trusted ARC sealer's rescue of a failure that would be
        enforced (ARCTrustedSealers)."""
        assert r.author is not None
        outcome = self._dmarc(self.is_originating, r.author, list(r.dkim))
        if outcome is None:
            return r
        rescue = None
        if (outcome.result is DmarcResult.FAIL and outcome.disposition is not DmarcPolicy.NONE
                and r.arc is not None and r.arc.passed and self.ctx.arc_trusted):  # fmt: skip
            author = r.author

            def passes(dkim: Sequence[DkimOutcome], spf: SpfOutcome | None) -> str | None:
                o = dmarc.evaluate(self.ctx.resolver, author, dkim, spf,
                                   method=self.ctx.org_method, psl=self.ctx.psl,
                                   rand=self.ctx.rand)  # fmt: skip
                if o.result is not DmarcResult.PASS:
                    return None
                return "dkim" if o.dkim_aligned else "spf"

            rescue = arc_trust.find_rescue(r.arc, self.wire_headers(),
                                           trusted=self.ctx.trusts_sealer,
                                           passes=passes)  # fmt: skip
        return dataclasses.replace(r, dmarc=outcome, evaluated=outcome.disposition,
                                   rescue=rescue)  # fmt: skip

    def _decide(self, r: Results) -> Results:
        """Step: the action. DKIM's On-* and DMARC's enforcement, the stronger winning; an
        SPF reject held for DMARC (SPFRejectAfterDMARC) when DMARC did not pass through
        aligned DKIM. The DMARC outcome's disposition becomes the one applied."""
        dkim_reply = None
        if r.dkim_action is Action.REJECT:
            dkim_reply = Reply("550", "5.7.1", f"DKIM verification failed: {r.dkim_why}")
        elif r.dkim_action is Action.TEMPFAIL:
            # RFC 3463: X.4.3 directory server (DNS) failure; X.7.0 other security reasons.
            xcode = "4.4.3" if r.dkim_problem is DkimProblem.DNS_ERROR else "4.7.0"
            dkim_reply = Reply("451", xcode, f"DKIM verification could not be completed: "
                                             f"{r.dkim_why}")  # fmt: skip
        dmarc_outcome = r.dmarc
        if r.rescue is not None:
            dmarc_action, dmarc_reply = Action.ACCEPT, None
        else:
            dmarc_action, dmarc_reply = self._dmarc_action(dmarc_outcome)
        if dmarc_outcome is not None:
            # dis= is what was done, as OpenDMARC writes it: quarantine only when held, none
            # when the policy was not enforced (RejectFailures false, pct sampling, t=y, a
            # trusted ARC sealer).
            dmarc_outcome = dataclasses.replace(dmarc_outcome, disposition=_APPLIED.get(
                dmarc_action, DmarcPolicy.NONE))  # fmt: skip
        action, reply, why = r.dkim_action, dkim_reply, r.dkim_why
        if _SEVERITY[dmarc_action] > _SEVERITY[action]:
            action, reply = dmarc_action, dmarc_reply
            why = f"DMARC {dmarc_outcome.result.value}" if dmarc_outcome else "DMARC"
        # A trusted sealer's rescue drops a held SPF reply too: forwarding is what broke SPF.
        spf_why = "" if r.rescue is not None else self._held_spf(dmarc_outcome)
        if spf_why and self.spf_held is not None:
            held = self.spf_held
            spf_action = Action.TEMPFAIL if held.code.startswith("4") else Action.REJECT
            # At RCPT it would have come first: it wins a tie, so a spoof gets the same code.
            if _SEVERITY[spf_action] >= _SEVERITY[action]:
                action, reply, why = spf_action, held, spf_why
        return dataclasses.replace(r, dmarc=dmarc_outcome, action=action, reply=reply, why=why,
                                   spf_why=spf_why)  # fmt: skip

    def _render(self, r: Results) -> Results:
        """Step: Received-SPF and our one Authentication-Results; the log line and the
        metrics' results."""
        cfg = self.ctx.config
        edits = list(r.edits)
        outcomes, arc, dmarc_outcome = list(r.dkim), r.arc, r.dmarc
        if self.spf_header is not None:
            edits.append(self.spf_header)
        signed = any(o.result is not DkimResult.NONE for o in outcomes)
        ar = None
        if signed or cfg.always_add_ar_header or self.spf or dmarc_outcome or arc:
            aid = self.authserv_id
            if cfg.authserv_id_with_job_id and self.macros.get("i"):
                aid = f"{aid}/{self.macros['i']}"
            # dkim=none only with AlwaysAddARHeader, as OpenDKIM (which adds no field then).
            shown = outcomes if signed or cfg.always_add_ar_header else []
            override = f"ARC override: {r.rescue.comment}" if r.rescue is not None else None
            ar = authresults.build(aid, dkim=shown, spf=self.spf, dmarc=dmarc_outcome,
                                   arc=arc, remote_ip=self.conn.ip,
                                   header_b=not cfg.no_header_b,
                                   dmarc_note=override)  # fmt: skip
            edits.append(AddHeader(authresults.HEADER, ar))
        self.results = [("dkim", o.result.value) for o in outcomes]
        self.results += [("spf", self.spf.result.value)] if self.spf else []
        self.results += [("dmarc", dmarc_outcome.result.value)] if dmarc_outcome else []
        if arc is not None:
            self.results += [("arc", arc.result)]
        elif dmarc_outcome is not None:  # DMARC-evaluated mail without ARC fields
            self.results += [("arc", "none")]
        parts = [_describe(o) for o in outcomes]
        if arc is not None:
            parts.append(f"arc={arc.result}")
        parts.append(f"spf={self.spf.result.value}" if self.spf else
                     f"spf=skipped ({self.spf_note})" if self.spf_note else "spf=none")
        if dmarc_outcome is not None:
            parts.append(_describe_dmarc(dmarc_outcome))
        note = self._external_sender_note(self.is_originating, self.author)
        line = f"{r.qid}: {', '.join(parts)}{note}, action={r.action.value}"
        line += f" ({r.why})" if r.why and r.action is not Action.ACCEPT else ""
        if r.rescue is not None:
            line += (f" (DMARC failure overridden: trusted ARC sealer {r.rescue.sealer}, "
                     f"i={r.rescue.instance}, {r.rescue.method})")  # fmt: skip
        if self.spf_held is not None and not r.spf_why:
            line += (" (SPF reject dropped: a trusted ARC sealer's results pass DMARC)"
                     if r.rescue is not None else
                     " (SPF reject dropped: DMARC passed through aligned DKIM)")  # fmt: skip
        return dataclasses.replace(r, edits=tuple(edits), ar=ar, log=line)

    def _record(self, r: Results) -> Results:
        """Step: the report record, only when reporting asks for it (ReportDatabase,
        HistoryFile, FailureReports); making it never costs mail, and report mail gets none."""
        cfg = self.ctx.config
        if (not reports_wanted(cfg) or r.dmarc is None or r.evaluated is None
                or self._report_mail()):  # fmt: skip
            return r
        try:
            event = self._dmarc_event(r.dmarc, r.evaluated, r.rescue)
            # The message as received: only HistoryFile and failure reports read it.
            context = (self._report_context(r.dmarc) if event is not None and (
                cfg.history_file or cfg.failure_reports) else None)
        except Exception:  # noqa: BLE001 - a record is not worth a message
            log.exception("%s: no DMARC report record", r.qid)
            return r
        return dataclasses.replace(r, event=event, context=context)

    def _arc(self) -> ArcOutcome | None:
        """The ARC chain's validation (RFC 8617 §5.2); ``None`` for a message without ARC
        header fields (no ``arc=`` clause then: nothing to report)."""
        headers = self.wire_headers()
        if not _has_arc(headers):
            return None
        assert self.bodies is not None
        cfg = self.ctx.config
        return arc_verify.verify_chain(headers, self.bodies, self.ctx.resolver,
                                       now=self.ctx.clock(),
                                       minimum_key_bits=cfg.minimum_key_bits,
                                       clock_drift=cfg.clock_drift)  # fmt: skip

    def _report_mail(self) -> bool:
        """DMARC report mail (to or from ReportSender, FailureReportsSentBy, or shaped like a
        report): never recorded, so two sites cannot report on each other's reports."""
        cfg = self.ctx.config
        headers = [(n, _unfold(v)) for n, v in self.headers
                   if n.lower() in ("from", "subject", "content-type")]  # what it looks at
        return is_report_mail(headers, self.mail_from or "", self.recipients,
                              (cfg.report_sender or "", cfg.failure_reports_sent_by or ""))

    def _report_context(self, outcome: DmarcOutcome) -> MessageContext:
        """The message as received, for a history block or a failure report."""
        record = outcome.record
        assert record is not None
        return MessageContext(
            job_id=self.macros.get("i") or "NOQUEUE",
            pct=record.pct,
            psd=record.psd,
            headers=tuple((n, _unfold(v)) for n, v in self.headers),
            mail_from=self.mail_from or "",
            recipients=tuple(self.recipients),
            helo=self.conn.helo or "",
        )

    def _dmarc_event(self, outcome: DmarcOutcome, evaluated: DmarcPolicy,
                     rescue: arc_trust.Rescue | None = None) -> DmarcEvent | None:  # fmt: skip
        """The report record of a DMARC pass or fail (``outcome`` with the applied ``dis=``,
        ``evaluated`` the disposition after t=y and pct only, ``rescue`` a trusted ARC
        sealer's override); ``None`` when there is none to make: no policy record (result
        none, temperror, permerror) or no client address.

        The aligned DKIM and SPF verdicts stay the evaluated ones (fail) under an ARC
        override (RFC 9990); the reason says what overrode them: ``local_policy`` with RFC
        8617 §7.2.2's comment (``arc=pass as[2].d=… as[2].s=… … remote-ip[1]=…``)."""
        record = outcome.record
        if (outcome.result not in (DmarcResult.PASS, DmarcResult.FAIL) or record is None
                or outcome.policy is None or not outcome.from_domain
                or not outcome.record_domain or not self.conn.ip):  # fmt: skip
            return None
        cfg = self.ctx.config
        overrides: list[tuple[str, str]] = []
        if outcome.result is DmarcResult.FAIL:
            if record.testing and evaluated is not outcome.policy:
                overrides.append(("policy_test_mode", "t=y"))
            elif outcome.sampled_out:
                overrides.append(("policy_test_mode", f"sampled out by pct={record.pct}"))
            if rescue is not None:
                overrides.append(("local_policy", rescue.comment))
            elif outcome.disposition is not evaluated:
                why = ("RejectFailures is off" if not cfg.reject_failures
                       else "HoldQuarantinedMessages is off")  # fmt: skip
                overrides.append(("local_policy", why))
        dkim_used, spf_used = self._dmarc_inputs
        sigs = tuple((o.domain, o.selector, o.result.value) for o in dkim_used
                     if o.result is not DkimResult.NONE and o.domain and o.selector
                     and _reportable(o.domain) and _reportable(o.selector))  # fmt: skip
        spf = None
        if spf_used is not None and _reportable(spf_used.domain):
            scope = "helo" if spf_used.identity is SpfIdentity.HELO else "mfrom"
            spf = (spf_used.domain, scope, spf_used.result.value)
        mail_from = self.mail_from or ""
        envelope_from = mail_from.rpartition("@")[2] if mail_from else ""
        recipients = [r.rpartition("@")[2] for r in self.recipients if "@" in r]
        reporter = self.authserv_id if _reportable(self.authserv_id) else self.ctx.authserv_id
        try:
            return DmarcEvent(
                time=self.ctx.clock(),
                reporter=reporter,
                source_ip=self.conn.ip,
                header_from=outcome.from_domain,
                envelope_from=envelope_from if _reportable(envelope_from) else "",
                envelope_to=tuple(d for d in recipients if _reportable(d)),
                policy_domain=outcome.record_domain,
                p=record.p.value,
                sp=record.sp.value if record.sp is not None else None,
                np=record.np.value if record.np is not None else None,
                adkim=record.adkim,
                aspf=record.aspf,
                fo=record.fo,
                testing=record.testing,
                discovery_method=self.ctx.org_method.value,
                disposition=outcome.disposition.value,
                overrides=tuple(overrides),
                dkim_aligned="pass" if outcome.dkim_aligned else "fail",
                spf_aligned="pass" if outcome.spf_aligned else "fail",
                dkim=sigs,
                spf=spf,
                rua=record.rua,
                ruf=record.ruf,
            )
        except ValueError as e:  # a value the record refuses: no record, never lost mail
            log.debug("%s: no DMARC report record: %s", self.macros.get("i") or "NOQUEUE", e)
            return None

    def _held_spf(self, dmarc_outcome: DmarcOutcome | None) -> str:
        """Why a held SPF reply (SPFRejectAfterDMARC) still applies; empty when it is dropped
        because DMARC passed through an aligned DKIM signature (forwarded mail, RFC 7489 §10.1)."""
        if self.spf_held is None:
            return ""
        if (dmarc_outcome is not None and dmarc_outcome.result is DmarcResult.PASS
                and dmarc_outcome.dkim_aligned):  # fmt: skip
            return ""
        return "SPF, held until DMARC: no DMARC pass through aligned DKIM"

    def _external_sender_note(self, originating: bool, author: str | None) -> str:
        """OpenDKIM's "external host tried to send as" remark, unless ExternalIgnoreList."""
        if originating or author is None or not self.ctx.keys.can_sign:
            return ""
        if not _signs_for(self.ctx.keys, author):
            return ""
        ext = self.ctx.external_ignore
        if ext is not None and ext.matches(self.conn.ip, self.conn.hostname):
            return ""
        return (f" (external host {self.conn.hostname or self.conn.ip} tried to send as "
                f"{author.rpartition('@')[2]})")  # fmt: skip

    def _dmarc(self, originating: bool, author: addresses.AuthorDomain,
               outcomes: list[DkimOutcome]) -> DmarcOutcome | None:  # fmt: skip
        """Evaluate DMARC unless OpenDMARC's ignore rules (or our own mail) exempt it."""
        ctx, cfg = self.ctx, self.ctx.config
        if originating or self.conn.peer:
            return None
        if ctx.ignore_hosts.matches(self.conn.ip, self.conn.hostname):
            return None
        if author.domain and author.domain in {d.lower() for d in cfg.ignore_mail_from}:
            return None
        spf = self.spf
        dkim = list(outcomes)
        trusted = [t for t in cfg.trusted_authserv_ids or ()
                   if t.lower() not in {i.lower() for i in self.removable_ids()}]  # fmt: skip
        if trusted and self.trusted_relay:
            # Only from a relay the user exempted from our SPF check: mail straight from the
            # internet may carry any A-R naming a trusted id (RFC 8601 §7.1), and is ignored.
            # Results a trusted border host wrote (never our own id: those are forgeries).
            values = [_unfold(v) for n, v in self.headers if n.lower() == "authentication-results"]
            upstream = authresults.trusted_upstream(values, trusted)
            dkim += [DkimOutcome(result=DkimResult.PASS, domain=d, reason="trusted upstream")
                     for d in upstream.dkim_pass_domains]  # fmt: skip
            if (spf is None and not cfg.spf_ignore_results and upstream.spf_result
                    and upstream.spf_mailfrom):  # fmt: skip
                try:
                    result = SpfResult(upstream.spf_result.lower())
                except ValueError:
                    result = SpfResult.NONE
                spf = SpfOutcome(result=result, identity=SpfIdentity.MAILFROM,
                                 sender=upstream.spf_mailfrom,
                                 domain=upstream.spf_mailfrom.rpartition("@")[2].lower(),
                                 client_ip=self.conn.ip or "", comment="trusted upstream")
        self._dmarc_inputs = (dkim, spf)
        # For the null sender SPF's MAIL FROM identity is the HELO name (RFC 7208 §2.4).
        return dmarc.evaluate(ctx.resolver, author, dkim, spf, method=ctx.org_method,
                              psl=ctx.psl, rand=ctx.rand,
                              null_sender=not self.mail_from)  # fmt: skip

    def _dmarc_action(self, outcome: DmarcOutcome | None) -> tuple[Action, Reply | None]:
        """OpenDMARC's enforcement: RejectFailures and HoldQuarantinedMessages."""
        cfg = self.ctx.config
        if outcome is None:
            return Action.ACCEPT, None
        domain = outcome.from_domain or "?"
        if outcome.result is DmarcResult.FAIL:
            if outcome.disposition is DmarcPolicy.REJECT and cfg.reject_failures:
                return Action.REJECT, Reply("550", "5.7.1",
                                            cfg.reject_string.replace("%s", domain))  # fmt: skip
            # OpenDMARC holds only with RejectFailures too (measured with Debian's 1.4.2):
            # without it, nothing is enforced.
            if (outcome.disposition is DmarcPolicy.QUARANTINE and cfg.hold_quarantined_messages
                    and cfg.reject_failures):  # fmt: skip
                return Action.QUARANTINE, None
        elif (outcome.result is DmarcResult.TEMPERROR and cfg.reject_failures
              and outcome.policy is not DmarcPolicy.NONE):  # fmt: skip
            # A p=none domain's failure would be accepted anyway: no reason to defer it.
            return Action.TEMPFAIL, Reply("451", "4.4.3", f"DMARC evaluation for {domain} "
                                                          "could not be completed")  # fmt: skip
        return Action.ACCEPT, None

    # -- message text -------------------------------------------------------------------------

    def wire_headers(self) -> list[tuple[bytes, bytes]]:
        """Headers as on the wire: ``(name, value)``, value with CRLF folding and final CRLF."""
        if self._wire is not None:
            return self._wire
        out = []
        restore = not self.conn.leading_space
        for name, value in self.headers:
            v = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            if restore:
                v = b" " + v  # without HDR_LEADSPC the MTA removed one space after the colon
            out.append((name.encode("ascii", "surrogateescape"), v + b"\r\n"))
        return out

    def _forged_removals(self) -> Iterable[DeleteHeader]:
        """Incoming fields that claim to be ours go, bottom-up (so the indexes stay right):
        every Authentication-Results with our authserv-id (RFC 8601 §5), and every
        Received-SPF whose ``receiver=`` is our host (only we write those)."""
        ours = self.removable_ids()
        receivers = {self.authserv_id.lower().rstrip("."), self.ctx.authserv_id.lower().rstrip(".")}
        found = []
        counts = {authresults.HEADER.lower(): 0, "received-spf": 0}
        for name, value in self.headers:
            key = name.lower()
            if key not in counts:
                continue
            counts[key] += 1
            text = _unfold(value)
            if key == "received-spf":
                claimed = received_spf_receiver(text)
                if claimed is not None and claimed.lower().rstrip(".") in receivers:
                    found.append(DeleteHeader(name, counts[key]))
            elif authresults.claims(text, ours):
                found.append(DeleteHeader(authresults.HEADER, counts[key]))
        return reversed(found)


# -- helpers ----------------------------------------------------------------------------------


def choose_action(cfg: Config, outcomes: Iterable[DkimOutcome]
                  ) -> tuple[Action, str, DkimProblem | None]:  # fmt: skip
    """OpenDKIM's On-* choice: any pass accepts; otherwise DNS errors (which a retry may
    cure) come before bad signatures, which come before missing keys.

    :returns: the action, why (for the log and the SMTP reply), and the problem class.
    """
    outs = list(outcomes)
    if any(o.passed for o in outs):
        return Action.ACCEPT, "", None
    if all(o.result is DkimResult.NONE for o in outs):
        return cfg.on_no_signature, "no signature", None
    for problem, action in ((DkimProblem.DNS_ERROR, cfg.on_dns_error),
                            (DkimProblem.BAD_SIGNATURE, cfg.on_bad_signature),
                            (DkimProblem.KEY_NOT_FOUND, cfg.on_key_not_found)):  # fmt: skip
        hits = [o for o in outs if o.problem is problem]
        if not hits:
            continue
        if problem is DkimProblem.BAD_SIGNATURE and all(o.testing for o in hits):
            # A key in testing mode (t=y) never makes the message suffer (RFC 6376 §3.6.1).
            return Action.ACCEPT, "", problem
        o = hits[0]
        return action, f"{o.result.value} for d={o.domain}: {o.reason or problem.value}", problem
    return Action.ACCEPT, "", None


#: The DMARC disposition (A-R ``dis=``) of each action the DMARC policy led to.
_APPLIED = {Action.REJECT: DmarcPolicy.REJECT, Action.QUARANTINE: DmarcPolicy.QUARANTINE}

#: When DKIM and DMARC disagree, the stronger action wins; a tempfail (the mail comes back)
#: ranks above a discard (the mail is gone).
_SEVERITY = {Action.ACCEPT: 0, Action.QUARANTINE: 1, Action.DISCARD: 2, Action.TEMPFAIL: 3,
             Action.REJECT: 4}  # fmt: skip


def _describe_dmarc(o: DmarcOutcome) -> str:
    text = f"dmarc={o.result.value}"
    if o.from_domain:
        text += f" header.from={o.from_domain}"
    if o.policy is not None:
        text += f" p={o.policy.value} dis={o.disposition.value}"
    return text


def _verdict(action: Action, edits: list[AddHeader | DeleteHeader], log: str, *,
             reply: Reply | None = None, quarantine: str | None = None) -> Verdict:  # fmt: skip
    if action is Action.QUARANTINE:
        return Verdict(action=action, edits=tuple(edits), log=log,
                       quarantine_reason=f"authmilter: {quarantine or 'DKIM'}")  # fmt: skip
    if action in (Action.REJECT, Action.TEMPFAIL):
        return Verdict(action=action, reply=reply, log=log)
    return Verdict(action=action, edits=tuple(edits), log=log)


def _signs_for(keys: KeyStore, author: str) -> bool:
    try:
        return bool(keys.keys_for(author))
    except AuthmilterError:
        return False


def _describe(o: DkimOutcome) -> str:
    if o.result is DkimResult.NONE:
        return "dkim=none"
    return f"dkim={o.result.value} d={o.domain} s={o.selector}" + (
        f" ({o.reason})" if o.reason and not o.passed else "")


# Folding only: a line break followed by white space. A bare LF anywhere else stays and makes
# the value unparseable, instead of joining "ceo@bank.example" and ".evil.example".
_FOLD = re.compile(r"\r?\n(?=[ \t])")


_NOT_IN_NAME = re.compile(r"[\s<>@!]")


_ARC_FIELDS = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")


def _has_arc(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() in _ARC_FIELDS for name, _value in headers)


def _final_headers(
    wire: list[tuple[bytes, bytes]], edits: Iterable[AddHeader | DeleteHeader]
) -> list[tuple[bytes, bytes]]:
    """The header as it will leave us: ``wire`` with ``edits`` applied in order, as the MTA
    applies them (what a seal added last must sign)."""
    out = list(wire)
    for edit in edits:
        if isinstance(edit, DeleteHeader):
            name = edit.name.lower().encode()
            seen = 0
            for i, (n, _v) in enumerate(out):
                if n.lower() == name:
                    seen += 1
                    if seen == edit.occurrence:
                        del out[i]
                        break
            continue
        value = edit.value.replace("\r\n", "\n").replace("\n", "\r\n")
        if not value.startswith((" ", "\t")):
            value = " " + value
        out.insert(edit.index, (edit.name.encode(), value.encode("utf-8", "surrogateescape")
                                + b"\r\n"))  # fmt: skip
    return out


def _chain_as_recorded(headers: list[tuple[bytes, bytes]],
                       result: str | None) -> ArcOutcome | str:  # fmt: skip
    """The chain an outbound message arrived with, as our Authentication-Results recorded it
    then (``arc=`` result ``result``), for sealing; a text saying why not when it cannot
    stand for the ARC fields the message carries now."""
    present = _has_arc(headers)
    if result is None or result.lower() == "none":
        if present:
            return "our Authentication-Results has no arc= result for the chain it carries"
        return ArcOutcome(result="none", reason="no ARC header fields")
    result = result.lower()
    if result not in ("pass", "fail"):
        return f"our Authentication-Results says arc={result}"
    try:
        sets = arc_verify.arc_set_fields(headers)
    except ValueError as e:
        return f"the ARC header fields are broken: {e}"
    if not sets:
        return f"our Authentication-Results says arc={result}, but no ARC Set is left"
    return ArcOutcome(result="pass" if result == "pass" else "fail",
                      reason="as recorded on arrival", instances=max(sets))  # fmt: skip


def reports_wanted(cfg: Config) -> bool:
    """Whether DMARC-evaluated messages are to yield report records (and contexts)."""
    return bool(cfg.report_database or cfg.history_file or cfg.failure_reports)


def _reportable(name: str) -> bool:
    """A name a DMARC report record takes (a domain or selector: no space, ``<>@!``)."""
    name = name.strip().rstrip(".")
    return bool(name) and not _NOT_IN_NAME.search(name)


def _unfold(value: bytes) -> str:
    """A header value as one line of text (folding removed), for parsing."""
    text = value.decode("utf-8", "surrogateescape")
    return _FOLD.sub("", text).strip()


def _milter_folding(value: bytes) -> str:
    """Header text for the milter protocol: LF line breaks (the MTA writes CRLF)."""
    return value.decode("ascii", "surrogateescape").replace("\r\n", "\n")
