"""SPF (RFC 7208) on top of our resolver, policyd-spf's options, and ``Received-SPF`` text.

Evaluation is pyspf's (:class:`spf.query`), with its DNS replaced per query: :class:`_Query`
overrides the one method through which pyspf does every lookup (``query.dns``) and sends it to
the :class:`authmilter.resolver.Resolver` handed to :class:`SpfChecker`. Nothing in the ``spf``
module is patched, so checks running in different milter threads do not disturb each other,
and the void-lookup limit and the time limit are per checker instead of module globals.

The rest follows policyd-spf (``postfix-policyd-spf-python`` 3.0): :func:`decide` applies its
``HELO_reject``/``Mail_From_reject``/``PermError_reject``/``TempError_Defer``/
``Reject_Not_Pass_Domains``/``No_Mail``/``TestOnly`` semantics, :func:`whitelisted` its
``skip_addresses``/``Whitelist``/``Domain_Whitelist``/``HELO_Whitelist`` lists, and
:func:`received_spf` writes its ``Received-SPF`` form with RFC 7208 §9.1 quoting.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, Protocol

import dns.name
import dns.rdata
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.PTR
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rdtypes.txtbase
import spf

from authmilter.config import DEFAULT_REASON_MESSAGE, DEFAULT_SKIP_ADDRESSES
from authmilter.errors import DNSError, DNSNameNotFound, DNSPermError, DNSTempError
from authmilter.resolver import memoized
from authmilter.results import SpfIdentity, SpfOutcome, SpfResult

__all__ = [
    "DEFAULT_REASON_MESSAGE",
    "DEFAULT_SKIP_ADDRESSES",
    "NO_MAIL_RECORD",
    "UNKNOWN_RECEIVER",
    "DnsQuery",
    "HeloReject",
    "MailFromReject",
    "SpfCheckOutcome",
    "SpfChecker",
    "SpfDecision",
    "SpfPolicy",
    "SpfWhitelist",
    "decide",
    "received_spf",
    "received_spf_receiver",
    "whitelist_comment",
    "whitelisted",
]

#: policyd-spf's default ``Reason_Message``.
#: policyd-spf's default ``skip_addresses``.
#: The record ``No_Mail`` looks for: the domain sends no mail at all.
NO_MAIL_RECORD = "v=spf1 -all"
#: What policyd-spf writes for a receiver it does not know or hides (``Hide_Receiver``).
UNKNOWN_RECEIVER = "<UNKNOWN>"

# pyspf's prefixes of the explanation it returns for the two error results.
_PERM_PREFIX = "SPF Permanent Error: "
_TEMP_PREFIX = "SPF Temporary Error: "
# RFC 1035 §2.3.1 letters, digits, hyphen, plus the underscore of service names.
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")
# RFC 5322 §3.2.3 atext; RFC 7208 §9.1 values are dot-atom or quoted-string.
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class DnsQuery(Protocol):
    """The part of :class:`authmilter.resolver.Resolver` SPF needs (tests use a fake)."""

    def query(self, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
        """Records of ``rdtype`` at ``name``; ``[]`` on NODATA; raises ``DNSError`` kinds."""
        ...


# -- evaluation ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SpfCheckOutcome(SpfOutcome):
    """An :class:`SpfOutcome` as :class:`SpfChecker` produced it, with what policyd-spf uses.

    ``explanation`` is the text pyspf gives with the result and policyd-spf puts into its
    reject reason as ``{spf}``: for ``fail`` the domain's own ``exp=`` text when it has one
    (RFC 7208 §6.2), otherwise pyspf's stock text. ``record`` is the SPF record found at the
    checked domain itself (not at an include or redirect target); ``No_Mail`` rejects only when
    it is exactly ``v=spf1 -all``.
    """

    explanation: str | None = None
    record: str | None = None

    @property
    def sends_no_mail(self) -> bool:
        """True when the domain's record is exactly ``v=spf1 -all`` (policyd-spf ``No_Mail``)."""
        return self.record == NO_MAIL_RECORD


class _DnsPermError(spf.PermError):  # type: ignore[misc]  # pyspf is untyped
    """A permanent DNS failure other than NXDOMAIN, e.g. a malformed answer."""


class _Deadline(spf.TempError):  # type: ignore[misc]
    """The time allowed for one SPF evaluation (policyd-spf ``Lookup_Time``) ran out."""


class _Query(spf.query):  # type: ignore[misc]
    """One pyspf evaluation whose DNS goes through our resolver.

    pyspf routes every lookup through ``query.dns(name, qtype, ...)``, which normally calls the
    module function ``spf.DNSLookup``; overriding the method keeps the hook per query (and so
    per thread). The answers are converted to the shapes pyspf's own dnspython driver returns.
    """

    def __init__(
        self,
        resolver: DnsQuery,
        *,
        ip: str,
        sender: str,
        helo: str | None,
        receiver: str | None,
        timeout: float,
        void_limit: int,
    ) -> None:
        # querytime=0: pyspf keeps no clock of its own, ours is checked in dns().
        super().__init__(
            i=ip, s=sender, h=helo, receiver=receiver, strict=True, timeout=timeout, querytime=0
        )
        self._resolver = resolver
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._void_limit = void_limit
        self._record_seen = False
        self.top_record: str | None = None

    def dns(
        self, name: Any, qtype: str, cnames: Any = None, ignore_void: bool = False
    ) -> list[Any]:
        """Look ``name``/``qtype`` up in our resolver; ``[]`` for NXDOMAIN and NODATA.

        :raises spf.TempError: timeout/SERVFAIL, or the evaluation's time is up.
        :raises spf.PermError: malformed answer, or the void-lookup limit is exceeded.
        """
        del cnames  # our resolver follows CNAME chains itself
        if not name:
            return []
        text = str(name)
        if text.endswith("."):
            text = text[:-1]
        if not all(0 < len(label) < 64 for label in text.split(".")):
            return []  # as pyspf: a malformed name is not looked up and is not void
        text = text.lower()
        if time.monotonic() >= self._deadline:
            raise _Deadline(f"SPF evaluation exceeded {self._timeout:g}s")
        try:
            records = self._resolver.query(text, qtype)
        except DNSNameNotFound:
            records = []
        except DNSTempError as exc:
            raise spf.TempError(f"DNS {exc}") from None
        except DNSPermError as exc:
            raise _DnsPermError(f"DNS {exc}") from None
        result = _pyspf_answer(records, qtype)
        # RFC 7208 §4.6.4: at most void_limit lookups may give NXDOMAIN or an empty answer.
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > self._void_limit:
                raise spf.PermError(f"Void lookup limit of {self._void_limit} exceeded")
        return result

    def dns_spf(self, domain: str) -> Any:
        """pyspf's record selection; the first call (the checked domain) is remembered."""
        seen, self._record_seen = self._record_seen, True
        record = super().dns_spf(domain)
        if not seen:
            self.top_record = record if isinstance(record, str) else None
        return record

    def validated_ptrs(self) -> list[str]:
        """RFC 7208 §5.5: PTR names whose A/AAAA include the client, DNS errors skipped.

        pyspf lets an error on one name's address lookup end the whole check with temperror;
        RFC 7208 §5.5 says the name is skipped (and a failed PTR lookup matches nothing).
        """
        try:
            names = self.dns_ptr(self.i)
        except _Deadline:
            raise
        except (spf.TempError, _DnsPermError):
            return []
        valid: list[str] = []
        for ptr_name in names[: spf.MAX_PTR]:
            try:
                addresses = self.dns_a(ptr_name, self.A)
            except _Deadline:
                raise
            except (spf.TempError, _DnsPermError):
                continue
            if self.cidrmatch(addresses, self.cidrmax):
                valid.append(ptr_name)
        return valid


def _pyspf_answer(records: Sequence[dns.rdata.Rdata], qtype: str) -> list[Any]:
    """Records in the shapes pyspf's dnspython driver hands to ``query.dns`` callers."""
    result: list[Any] = []
    for rdata in records:
        if isinstance(rdata, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA):
            result.append(rdata.address)
        elif isinstance(rdata, dns.rdtypes.ANY.MX.MX):
            result.append((rdata.preference, _name_text(rdata.exchange)))
        elif isinstance(rdata, dns.rdtypes.ANY.PTR.PTR):
            target = _name_text(rdata.target)
            if target:
                result.append(target)
        elif isinstance(rdata, dns.rdtypes.txtbase.TXTBase) and qtype in ("TXT", "SPF"):
            result.append(tuple(rdata.strings) or (b"",))
    return result


def _name_text(name: dns.name.Name) -> str:
    """A name without the final dot; the root (a null MX, RFC 7505) becomes ``""``."""
    if name == dns.name.root:
        return ""
    return str(name.to_text(omit_final_dot=True))


def _client_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Parse the client address; an IPv4-mapped IPv6 address becomes its IPv4 form."""
    text = (ip or "").strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    text = text.partition("%")[0]  # a zone index says nothing to SPF
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _spf_domain(text: str) -> str | None:
    """The domain as SPF queries it (A-labels), or None when RFC 7208 §4.3 calls it malformed.

    Malformed: empty or over-long labels, a single label, an address literal, characters
    other than letters, digits, ``-`` and ``_``, an all-numeric top label (an IP address).
    """
    domain = text.strip()
    if domain.endswith("."):
        domain = domain[:-1]
    if not domain:
        return None
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")  # RFC 7208 §4.3: A-labels
        except UnicodeError:
            return None
    labels = domain.split(".")
    if len(labels) < 2 or len(domain) > 253:
        return None
    if not all(_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        return None
    return domain


class SpfChecker:
    """RFC 7208 ``check_host()`` for the MAIL FROM and HELO identities, on our resolver.

    :param resolver: the process's :class:`authmilter.resolver.Resolver` (or a fake).
    :param timeout: the time one evaluation may take, in seconds (policyd-spf ``Lookup_Time``);
        checked before each lookup, each lookup being bounded by the resolver's own timeout.
    :param void_limit: RFC 7208 §4.6.4 void lookups allowed (policyd-spf ``Void_Limit``).
    :param receiver: our host name, for the ``%{r}`` macro and the comment prefix
        (``mx.example.org: domain of … designates …``); ``None`` leaves the prefix out.
    :raises ValueError: ``timeout`` not positive or ``void_limit`` negative.
    """

    def __init__(
        self,
        resolver: DnsQuery,
        *,
        timeout: float = 20.0,
        void_limit: int = 2,
        receiver: str | None = None,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"SPF timeout must be positive, not {timeout}")
        if void_limit < 0:
            raise ValueError(f"SPF void lookup limit must not be negative, not {void_limit}")
        self._resolver = resolver
        self._timeout = float(timeout)
        self._void_limit = void_limit
        self._receiver = receiver

    @property
    def resolver(self) -> DnsQuery:
        """The resolver every lookup goes through."""
        return self._resolver

    @property
    def timeout(self) -> float:
        """Seconds one evaluation may take."""
        return self._timeout

    @property
    def void_limit(self) -> int:
        """Void lookups allowed per evaluation."""
        return self._void_limit

    def check_mailfrom(self, ip: str, mail_from: str, helo: str | None) -> SpfOutcome:
        """Check the MAIL FROM identity of ``mail_from`` for client ``ip``.

        The null sender (``""`` or ``"<>"``) is checked as ``postmaster@<helo>`` with the HELO
        identity (RFC 7208 §2.4). A sender without ``@`` is a bare domain, its local part
        ``postmaster`` (§4.3). Never raises: unusable input gives ``none``, broken DNS data
        ``permerror`` or ``temperror``.
        """
        sender = (mail_from or "").strip()
        if sender.startswith("<") and sender.endswith(">"):
            sender = sender[1:-1].strip()
        if not sender:
            return self.check_helo(ip, helo)  # RFC 7208 §2.4
        local, _, domain = sender.rpartition("@")  # a quoted local part may hold "@"
        return self._evaluate(
            ip,
            identity=SpfIdentity.MAILFROM,
            sender=sender,
            local=local or "postmaster",  # RFC 7208 §4.3
            domain=domain,
            helo=(helo or "").strip() or None,
        )

    def check_helo(self, ip: str, helo: str | None) -> SpfOutcome:
        """Check the HELO identity: ``postmaster@<helo>`` (RFC 7208 §2.3).

        A HELO that is not a domain name (an address literal, one label, none at all) gives
        ``none``.
        """
        name = (helo or "").strip()
        return self._evaluate(
            ip,
            identity=SpfIdentity.HELO,
            sender=f"postmaster@{name}",
            local="postmaster",
            domain=name,
            helo=name or None,
        )

    def _evaluate(
        self,
        ip: str,
        *,
        identity: SpfIdentity,
        sender: str,
        local: str,
        domain: str,
        helo: str | None,
    ) -> SpfCheckOutcome:
        address = _client_address(ip)
        client = str(address) if address is not None else (ip or "").strip()
        shown = sender if identity is SpfIdentity.MAILFROM else domain

        def outcome(
            result: SpfResult,
            *,
            problem: str | None = None,
            explanation: str | None = None,
            record: str | None = None,
            checked: str = domain,
        ) -> SpfCheckOutcome:
            return SpfCheckOutcome(
                result=result,
                identity=identity,
                sender=sender,
                domain=checked,
                client_ip=client,
                helo=helo,
                comment=_comment(result, shown, client, self._receiver, problem),
                problem=problem,
                explanation=explanation,
                record=record,
            )

        if address is None:
            # Not the domain's fault and nothing to evaluate: no SPF assertion at all.
            return outcome(SpfResult.NONE, problem=f"client address {ip!r} is not an IP address")
        spf_domain = _spf_domain(domain)
        if spf_domain is None:
            return outcome(SpfResult.NONE)  # RFC 7208 §4.3: malformed domain gives none

        def check() -> SpfCheckOutcome:
            return self._check_host(outcome, client, sender, local, spf_domain, helo)

        # The result is a function of these and of DNS: kept while the DNS answers it read
        # are (Resolver.memo), never a temperror (a lookup failed or Lookup_Time ran out).
        key = ("spf", identity, client, sender, local, domain, spf_domain, helo,
               self._receiver, self._timeout, self._void_limit)  # fmt: skip
        return memoized(self._resolver, key, check, keep=_keepable)

    def _check_host(self, outcome: Callable[..., SpfCheckOutcome], client: str, sender: str,
                    local: str, spf_domain: str, helo: str | None) -> SpfCheckOutcome:  # fmt: skip
        """pyspf's check_host() of ``spf_domain`` for ``client``."""
        query = _Query(
            self._resolver,
            ip=client,
            sender=sender,
            helo=helo,
            receiver=self._receiver,
            timeout=self._timeout,
            void_limit=self._void_limit,
        )
        # pyspf splits the sender at the first "@"; a quoted local part may hold one too.
        query.l, query.o, query.d = local, spf_domain, spf_domain
        try:
            answer = query.check()
            result_text, explanation = str(answer[0]), str(answer[2])
        except Exception as exc:  # hostile data must never crash the milter thread
            # pyspf itself failed on what the domain published: the record cannot be
            # interpreted, which is RFC 7208 §2.6.7 permerror.
            return outcome(
                SpfResult.PERMERROR,
                problem=f"SPF evaluation failed: {type(exc).__name__}: {exc}",
                checked=spf_domain,
            )
        try:
            result = SpfResult(result_text)
        except ValueError:
            result = SpfResult.PERMERROR  # "ambiguous" exists only in pyspf's harsh mode
        problem = None
        if result is SpfResult.PERMERROR:
            problem = explanation.removeprefix(_PERM_PREFIX)
        elif result is SpfResult.TEMPERROR:
            problem = explanation.removeprefix(_TEMP_PREFIX)
        return outcome(
            result,
            problem=_printable(problem) if problem is not None else None,
            explanation=_printable(explanation) or None,
            record=query.top_record,
            checked=spf_domain,
        )


#: pyspf's own explanation of a fail (no ``exp=``, or one that could not be used).
_STOCK_FAIL_EXPLANATION = str(spf.EXPLANATIONS["fail"])


def _keepable(outcome: SpfCheckOutcome) -> bool:
    """Whether a result may be reused for the same inputs while its DNS answers are fresh:
    not a temperror, and not a fail explained by the domain's own ``exp=`` text, which may
    expand ``%{t}``, the time of the check (RFC 7208 §7.3)."""
    if outcome.result is SpfResult.TEMPERROR:
        return False
    return outcome.result is not SpfResult.FAIL or outcome.explanation in (
        None, _printable(_STOCK_FAIL_EXPLANATION))


def _printable(text: str) -> str:
    """Text safe for a reply or a header: control characters become spaces, ends trimmed,
    lone surrogates (undecodable bytes from the client) "?", as pymilter sends UTF-8."""
    return _CONTROL.sub(" ", text).strip().encode("utf-8", "replace").decode("utf-8")


def _comment(
    result: SpfResult, who: str, ip: str, receiver: str | None, problem: str | None
) -> str:
    """The human text of a result, receiver-prefixed as pyspf and Mail::SPF write it."""
    match result:
        case SpfResult.PASS:
            text = f"domain of {who} designates {ip} as permitted sender"
        case SpfResult.FAIL:
            text = f"domain of {who} does not designate {ip} as permitted sender"
        case SpfResult.SOFTFAIL:
            text = f"transitioning domain of {who} does not designate {ip} as permitted sender"
        case SpfResult.NEUTRAL:
            text = f"{ip} is neither permitted nor denied by domain of {who}"
        case SpfResult.NONE:
            text = f"domain of {who} does not designate permitted sender hosts"
        case SpfResult.PERMERROR:
            text = f"permanent error in processing domain of {who}"
            if problem:
                text += f": {problem}"
        case SpfResult.TEMPERROR:
            text = f"temporary error in processing during lookup of {who}"
    text = _printable(text)
    return f"{receiver}: {text}" if receiver else text


# -- policy: policyd-spf's options --------------------------------------------------------


class HeloReject(StrEnum):
    """policyd-spf ``HELO_reject``."""

    FAIL = "Fail"
    SPF_NOT_PASS = "SPF_Not_Pass"
    SOFTFAIL = "Softfail"
    NULL = "Null"
    FALSE = "False"
    NO_CHECK = "No_Check"


class MailFromReject(StrEnum):
    """policyd-spf ``Mail_From_reject``."""

    FAIL = "Fail"
    SPF_NOT_PASS = "SPF_Not_Pass"
    SOFTFAIL = "Softfail"
    FALSE = "False"
    NO_CHECK = "No_Check"


# The results each setting rejects (spf_engine's _get_resultcodes). PermError and TempError
# are added by PermError_reject / TempError_Defer unless the setting is False.
_REJECTED: dict[str, frozenset[SpfResult]] = {
    "Fail": frozenset({SpfResult.FAIL}),
    "Null": frozenset({SpfResult.FAIL}),
    "Softfail": frozenset({SpfResult.FAIL, SpfResult.SOFTFAIL}),
    "SPF_Not_Pass": frozenset({SpfResult.FAIL, SpfResult.SOFTFAIL, SpfResult.NEUTRAL}),
    "False": frozenset(),
    "No_Check": frozenset(),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class SpfPolicy:
    """policyd-spf's rejection options; attribute names are the snake_case of its names.

    ``test_only`` is policyd-spf's ``TestOnly``: ``True`` (its ``1``, the default) acts on
    results, ``False`` (``0``) never rejects or defers.

    :raises ValueError: ``helo_reject``/``mail_from_reject`` is not one of policyd-spf's values,
        or ``reason_message`` is not a format string using only ``{rejectdefer}``, ``{spf}``
        and ``{url}``.
    """

    helo_reject: HeloReject = HeloReject.FAIL
    mail_from_reject: MailFromReject = MailFromReject.FAIL
    permerror_reject: bool = False
    temperror_defer: bool = False
    reject_not_pass_domains: tuple[str, ...] = ()
    no_mail: bool = False
    test_only: bool = True
    enhanced_status_codes: bool = True
    reason_message: str = DEFAULT_REASON_MESSAGE

    def __post_init__(self) -> None:
        # Accept the option's text as written in policyd-spf.conf ("Fail", "SPF_Not_Pass" …).
        object.__setattr__(self, "helo_reject", HeloReject(self.helo_reject))
        object.__setattr__(self, "mail_from_reject", MailFromReject(self.mail_from_reject))
        try:
            self.reason_message.format(rejectdefer="rejected", spf="fail", url="http://x/")
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"Reason_Message {self.reason_message!r} is not usable ({type(exc).__name__}: "
                f"{exc}); it may use {{rejectdefer}}, {{spf}} and {{url}}"
            ) from None


@dataclass(frozen=True, slots=True)
class SpfDecision:
    """What to answer at RCPT time.

    ``accept`` has empty ``code``/``xcode``; its ``text`` is empty, or with ``TestOnly = 0``
    says what would have been done. ``identity`` is the identity whose result decided a reject
    or defer; for ``accept`` it is the one policyd-spf records in its header (MAIL FROM unless
    that result is ``none`` while HELO has one), ``None`` when neither was checked.
    """

    action: Literal["accept", "reject", "defer"]
    code: str
    xcode: str
    text: str
    identity: SpfIdentity | None


def _listed(domains: Sequence[str], domain: str) -> bool:
    wanted = domain.lower().rstrip(".")
    return bool(wanted) and any(d.strip().lower().rstrip(".") == wanted for d in domains)


def _action(
    policy: SpfPolicy, setting: str, outcome: SpfOutcome
) -> tuple[Literal["reject", "defer"] | None, bool]:
    """The action one identity's result asks for, and whether Reject_Not_Pass_Domains did."""
    local = _listed(policy.reject_not_pass_domains, outcome.domain)
    if local:
        setting = "SPF_Not_Pass"  # also overrides False, as in policyd-spf
    action: Literal["reject", "defer"] | None = None
    if outcome.result in _REJECTED[setting]:
        action = "reject"
    elif setting == "False":
        action = None
    elif outcome.result is SpfResult.TEMPERROR and policy.temperror_defer:
        action = "defer"
    elif outcome.result is SpfResult.PERMERROR and policy.permerror_reject:
        action = "reject"
    if action == "reject" and policy.no_mail and not _sends_no_mail(outcome):
        action = None  # No_Mail: only a "v=spf1 -all" domain is rejected
    return action, local


def _sends_no_mail(outcome: SpfOutcome) -> bool:
    return isinstance(outcome, SpfCheckOutcome) and outcome.sends_no_mail


def _explanation(outcome: SpfOutcome) -> str:
    """policyd-spf's ``{spf}``: the text pyspf returned with the result."""
    if isinstance(outcome, SpfCheckOutcome) and outcome.explanation:
        return outcome.explanation
    if outcome.result is SpfResult.PERMERROR:
        return _PERM_PREFIX + (outcome.problem or "unknown problem")
    if outcome.result is SpfResult.TEMPERROR:
        return _TEMP_PREFIX + (outcome.problem or "unknown problem")
    return str(spf.EXPLANATIONS.get(outcome.result.value, ""))


def _reply(
    policy: SpfPolicy,
    action: Literal["reject", "defer"],
    outcome: SpfOutcome,
    local: bool,
    receiver: str,
) -> SpfDecision:
    error = outcome.result in (SpfResult.PERMERROR, SpfResult.TEMPERROR)
    if action == "reject":
        code = "550"
        xcode = ("5.7.24" if error else "5.7.23") if policy.enhanced_status_codes else "5.7.1"
    else:
        code = "450"
        xcode = "4.7.24" if policy.enhanced_status_codes else "4.7.1"
    if local:
        spf_text = f"Receiver policy for SPF {outcome.result.value.capitalize()}"
    else:
        spf_text = _explanation(outcome)
    helo = outcome.identity is SpfIdentity.HELO
    scope = "helo" if helo else "mfrom"
    ident = (outcome.helo or outcome.domain) if helo else outcome.sender
    url = f"http://www.openspf.net/Why?s={scope};id={ident};ip={outcome.client_ip};r={receiver}"
    text = policy.reason_message.format(
        rejectdefer="rejected" if action == "reject" else "deferred", spf=spf_text, url=url
    )
    # One SMTP reply line: printable ASCII only.
    text = _printable(text).encode("ascii", "replace").decode("ascii")
    return SpfDecision(action, code, xcode, text, outcome.identity)


def decide(
    policy: SpfPolicy,
    helo: SpfOutcome | None,
    mailfrom: SpfOutcome | None,
    *,
    receiver: str = UNKNOWN_RECEIVER,
) -> SpfDecision:
    """Apply policyd-spf's options to the HELO and MAIL FROM results.

    ``helo`` is the :meth:`SpfChecker.check_helo` outcome (``None`` when not checked);
    ``mailfrom`` the :meth:`SpfChecker.check_mailfrom` outcome, which for the null sender has
    the HELO identity: pass it for the null sender so that ``HELO_reject = Null`` knows.
    ``receiver`` goes into the URL of the reason (policyd-spf's ``r=``: the recipient domain,
    or ``<UNKNOWN>``).

    As policyd-spf: the HELO result is judged first and a reject/defer there ends it; for the
    null sender only the HELO options apply; then the MAIL FROM result. ``False`` never
    rejects (not even with PermError_reject/TempError_Defer), ``Null`` rejects a HELO fail only
    for the null sender, Reject_Not_Pass_Domains turns the setting into ``SPF_Not_Pass`` for
    listed domains, No_Mail turns a reject into accept unless the record is ``v=spf1 -all``,
    ``TestOnly = 0`` turns every reject/defer into accept.
    """
    null_sender = mailfrom is not None and mailfrom.identity is SpfIdentity.HELO
    helo_outcome = helo if helo is not None else (mailfrom if null_sender else None)
    if policy.helo_reject is HeloReject.NO_CHECK:
        helo_outcome = None
    mailfrom_outcome = None
    if (
        mailfrom is not None
        and not null_sender
        and policy.mail_from_reject is not MailFromReject.NO_CHECK
    ):
        mailfrom_outcome = mailfrom

    decision: SpfDecision | None = None
    if helo_outcome is not None and not (policy.helo_reject is HeloReject.NULL and not null_sender):
        action, local = _action(policy, policy.helo_reject.value, helo_outcome)
        if action is not None:
            decision = _reply(policy, action, helo_outcome, local, receiver)
    if decision is None and mailfrom_outcome is not None:
        action, local = _action(policy, policy.mail_from_reject.value, mailfrom_outcome)
        if action is not None:
            decision = _reply(policy, action, mailfrom_outcome, local, receiver)

    if decision is not None:
        if policy.test_only:
            return decision
        note = f"TestOnly=0, not applied: {decision.code} {decision.xcode} {decision.text}"
        return SpfDecision("accept", "", "", note, decision.identity)
    # policyd-spf's header: MAIL FROM's, unless that is "none" and HELO has a result.
    identity: SpfIdentity | None = None
    if mailfrom_outcome is not None and (
        mailfrom_outcome.result is not SpfResult.NONE
        or helo_outcome is None
        or helo_outcome.result is SpfResult.NONE
    ):
        identity = SpfIdentity.MAILFROM
    elif helo_outcome is not None:
        identity = SpfIdentity.HELO
    return SpfDecision("accept", "", "", "", identity)


# -- whitelisting -------------------------------------------------------------------------


def _network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = entry.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::]/32"
        inner, _, rest = text[1:].partition("]")
        text = inner + rest
    return ipaddress.ip_network(text, strict=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class SpfWhitelist:
    """policyd-spf's lists of clients exempt from SPF checks.

    ``skip_addresses`` and ``whitelist`` are networks (CIDR or bare addresses),
    ``helo_whitelist`` HELO names (honoured only when the client address is among the name's
    A/AAAA records), ``domain_whitelist`` domains whose SPF record must pass the client.

    :raises ValueError: an entry of ``skip_addresses`` or ``whitelist`` is not a network.
    """

    skip_addresses: tuple[str, ...] = DEFAULT_SKIP_ADDRESSES
    whitelist: tuple[str, ...] = ()
    helo_whitelist: tuple[str, ...] = ()
    domain_whitelist: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        lists = (("skip_addresses", self.skip_addresses), ("Whitelist", self.whitelist))
        for option, entries in lists:
            for entry in entries:
                try:
                    _network(entry)
                except ValueError:
                    raise ValueError(f"{option}: {entry!r} is not an IP network") from None


def _in_networks(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, entries: Sequence[str]
) -> str | None:
    """The first entry containing ``address`` (an IPv4 client also in its ``::ffff:`` form)."""
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv4Address):
        candidates.append(ipaddress.IPv6Address(f"::ffff:{address}"))
    for entry in entries:
        network = _cached_network(entry)
        if network is None:
            continue
        if any(c.version == network.version and c in network for c in candidates):
            return entry
    return None


@functools.lru_cache(maxsize=1024)
def _cached_network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """A list entry parsed once (the lists are configuration: parsing per message is waste)."""
    try:
        return _network(entry)
    except ValueError:
        return None


def _helo_confirmed(
    resolver: DnsQuery, name: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> bool:
    """Forward confirmation: ``address`` is among the A (IPv4) or AAAA (IPv6) of ``name``."""
    rdtype = "A" if address.version == 4 else "AAAA"
    try:
        records = resolver.query(name, rdtype)
    except (DNSError, ValueError):
        return False  # policyd-spf: a failed lookup just does not whitelist
    for rdata in records:
        if isinstance(rdata, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA):
            try:
                if ipaddress.ip_address(rdata.address) == address:
                    return True
            except ValueError:
                continue
    return False


def whitelisted(wl: SpfWhitelist, checker: SpfChecker, ip: str, helo: str | None) -> str | None:
    """Why the client is exempt from SPF checks, or ``None``; policyd-spf's order.

    ``skip_addresses`` and ``Whitelist`` by address, then ``Domain_Whitelist`` (the client
    passes the listed domain's SPF record), then ``HELO_Whitelist`` (HELO is listed and its
    A/AAAA hold the client address). Returns e.g. ``"Whitelist 192.0.2.0/24"``.
    """
    address = _client_address(ip)
    if address is None:
        return None
    entry = _in_networks(address, wl.skip_addresses)
    if entry is not None:
        return f"skip_addresses {entry}"
    entry = _in_networks(address, wl.whitelist)
    if entry is not None:
        return f"Whitelist {entry}"
    for domain in wl.domain_whitelist:
        name = domain.strip()
        if name and checker.check_mailfrom(str(address), name, name).result is SpfResult.PASS:
            return f"Domain_Whitelist {name}"
    given = (helo or "").strip().lower().rstrip(".")
    if given:
        for name in wl.helo_whitelist:
            if name.strip().lower().rstrip(".") != given:
                continue
            if _helo_confirmed(checker.resolver, name.strip(), address):
                return f"HELO_Whitelist {name.strip()}"
    return None


_WHITELIST_COMMENTS = {
    "skip_addresses": "SPF check N/A for local connections",
    "Whitelist": "SPF skipped for whitelisted relay",
    "Domain_Whitelist": "SPF skipped for whitelisted relay domain",
    "HELO_Whitelist": "SPF skipped for whitelisted HELO domain",
}


def whitelist_comment(
    reason: str, ip: str, helo: str | None, mail_from: str | None, receiver: str
) -> tuple[str, str]:
    """policyd-spf's ``X-Comment`` trace header for a whitelisted client: ``(name, value)``.

    ``reason`` is what :func:`whitelisted` returned. Example value:
    ``SPF skipped for whitelisted relay - client-ip=192.0.2.1; helo=relay.example.com;
    envelope-from=a@example.com; receiver=mx.example.com``.
    """
    kind = reason.split(" ", 1)[0]
    comment = _WHITELIST_COMMENTS.get(kind, "SPF skipped")
    sender = mail_from.strip() if mail_from is not None else ""
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1].strip()
    value = (
        f"{comment} - client-ip={ip}; helo={helo or UNKNOWN_RECEIVER}; "
        f"envelope-from={sender or '<>'}; receiver={receiver}"
    )
    return "X-Comment", _printable(value)


# -- Received-SPF -------------------------------------------------------------------------


def _kv_value(text: str) -> str:
    """RFC 7208 §9.1: a key-value-pair value is a dot-atom, else a quoted-string."""
    # Undecodable envelope bytes arrive as lone surrogates; the field must be UTF-8.
    text = _CONTROL.sub("", text).encode("utf-8", "replace").decode("utf-8")
    if _DOT_ATOM.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment_text(text: str) -> str:
    """Text for inside ``( … )``: no parentheses or backslashes, printable ASCII."""
    text = re.sub(r"[()\\]", "", _printable(text))
    return text.encode("ascii", "replace").decode("ascii")


def received_spf(outcome: SpfOutcome, *, receiver: str, envelope_from: str | None = None) -> str:
    """The value of policyd-spf's ``Received-SPF`` field for ``outcome``.

    ``Pass (mailfrom) identity=mailfrom; client-ip=192.0.2.1; helo=mail.example.org;
    envelope-from="a@example.org"; receiver=mx.example.com``: the result word as policyd-spf
    capitalizes it, the comment ``mailfrom`` for that identity and pyspf's explanation for HELO
    (``no SPF record`` for none), values quoted per RFC 7208 §9.1, ``problem=`` added for
    permerror and temperror. ``receiver`` is ``<UNKNOWN>`` with Hide_Receiver.
    ``envelope_from`` defaults to the sender for the MAIL FROM identity and ``<>`` for HELO.
    """
    if outcome.identity is SpfIdentity.MAILFROM:
        comment = "mailfrom"
    elif outcome.result is SpfResult.NONE:
        comment = "no SPF record"
    else:
        comment = _comment_text(_explanation(outcome))
    if envelope_from is None:
        envelope_from = outcome.sender if outcome.identity is SpfIdentity.MAILFROM else "<>"
    pairs = [f"identity={outcome.identity.value}", f"client-ip={_kv_value(outcome.client_ip)}"]
    helo = outcome.helo or (outcome.domain if outcome.identity is SpfIdentity.HELO else None)
    if helo:
        pairs.append(f"helo={_kv_value(helo)}")
    pairs.append(f"envelope-from={_kv_value(envelope_from or '<>')}")
    pairs.append(f"receiver={_kv_value(receiver)}")
    if outcome.problem and outcome.result in (SpfResult.PERMERROR, SpfResult.TEMPERROR):
        pairs.append(f"problem={_kv_value(outcome.problem)}")
    return f"{outcome.result.value.capitalize()} ({comment}) " + "; ".join(pairs)


_RECEIVER = re.compile(r'(?:^|[\s;])receiver\s*=\s*("(?:[^"\\]|\\.)*"|[^\s;]+)', re.IGNORECASE)


def received_spf_receiver(value: str) -> str | None:
    """The ``receiver=`` of a ``Received-SPF`` field value (RFC 7208 §9.1), or None.

    Comments (nested, as RFC 5322 CFWS) are skipped, so ``(receiver=x)`` names nobody; a
    quoted value is unquoted. The value is returned as written (compare case-insensitively).
    """
    outside: list[str] = []
    depth, quoted, escaped = 0, False, False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif ch == "(":
            depth += 1
            continue
        elif ch == ")" and depth:
            depth -= 1
            continue
        elif ch == '"' and not depth:
            quoted = True
        if not depth:
            outside.append(ch)
    match = _RECEIVER.search("".join(outside))
    if match is None:
        return None
    found = match.group(1)
    if len(found) >= 2 and found[0] == found[-1] == '"':
        found = re.sub(r"\\(.)", r"\1", found[1:-1])
    return found
