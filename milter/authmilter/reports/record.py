"""One DMARC-evaluated message, as the reporting code stores and reads it.

:class:`DmarcEvent` is what the milter will record per message (in SQLite or PostgreSQL) and what
:mod:`authmilter.reports.aggregate` builds RFC 9990 aggregate reports from. It carries the
policy as published (so a report can say which policy was in force), the disposition applied,
the override reasons, the aligned DKIM/SPF results, every DKIM signature tried and the SPF result.

The constructor validates every enumerated field against the token sets of RFC 9990 (policy,
alignment, override types, discovery method) and RFC 8601 (DKIM and SPF result tokens), lowercases
domains and normalizes the source address (``2001:DB8:0::1`` becomes ``2001:db8::1``, an
IPv4-mapped ``::ffff:192.0.2.1`` becomes ``192.0.2.1``), so that two events for the same traffic
compare, group and store identically.

:meth:`DmarcEvent.to_json` / :meth:`DmarcEvent.from_json` give a stable dict form (JSON types
only, a ``"v"`` format number first) for the database; ``from_json(e.to_json()) == e``.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Any

from authmilter.results import DkimResult, SpfResult

__all__ = [
    "ALIGNMENT_MODES",
    "DISCOVERY_METHODS",
    "DISPOSITIONS",
    "JSON_VERSION",
    "OVERRIDE_TYPES",
    "POLICIES",
    "SPF_SCOPES",
    "DmarcEvent",
    "MessageContext",
    "is_report_mail",
]

JSON_VERSION = 1
"""The ``"v"`` of :meth:`DmarcEvent.to_json`; bump it when the dict form changes."""

POLICIES = frozenset({"none", "quarantine", "reject"})
DISPOSITIONS = POLICIES
ALIGNMENT_MODES = frozenset({"r", "s"})
ALIGNED_RESULTS = frozenset({"pass", "fail"})
DISCOVERY_METHODS = frozenset({"psl", "treewalk"})
# RFC 9990 "Policy Override Reason": the types the milter can produce. "other" is valid in a
# report but the milter never has a reason it could not name, so it is not accepted here.
OVERRIDE_TYPES = frozenset(
    {"local_policy", "policy_test_mode", "trusted_forwarder", "mailing_list"}
)
SPF_SCOPES = frozenset({"mfrom", "helo"})
DKIM_RESULTS = frozenset(r.value for r in DkimResult)
SPF_RESULTS = frozenset(r.value for r in SpfResult)


def _domain(value: str, field: str, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field}: not a string: {value!r}")
    name = value.strip().rstrip(".").lower()
    if not name and not empty_ok:
        raise ValueError(f"{field}: empty domain")
    if any(c.isspace() or c in "<>@!" for c in name):
        raise ValueError(f"{field}: not a domain: {value!r}")
    return name


def _one_of(value: object, allowed: frozenset[str], field: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{field}: {value!r} is not one of {sorted(allowed)}")
    return value


@dataclass(frozen=True, slots=True)
class DmarcEvent:
    """One message the milter evaluated with DMARC.

    :param time: when it was evaluated, UTC epoch seconds.
    :param reporter: host name of the MX that evaluated it.
    :param source_ip: the connecting address, IPv4 or IPv6 (stored normalized).
    :param header_from: the RFC 5322.From domain.
    :param envelope_from: the RFC 5321.MailFrom domain, ``""`` for the null path ``<>``.
    :param envelope_to: the recipient domains (RCPT TO), in order, without duplicates.
    :param policy_domain: the domain whose DMARC record was used.
    :param p: ``p=`` as published. ``sp``/``np``: as published, ``None`` when absent.
    :param adkim: ``"r"`` or ``"s"``; ``aspf`` likewise.
    :param fo: ``fo=`` as published (``"0"`` when absent).
    :param testing: ``t=y`` (RFC 9989).
    :param discovery_method: ``"psl"`` or ``"treewalk"``.
    :param disposition: what was applied: ``"none"``, ``"quarantine"`` or ``"reject"``.
    :param overrides: ``(type, comment)`` pairs, the reasons the disposition differs from the
        policy; ``type`` is one of :data:`OVERRIDE_TYPES`, ``comment`` may be ``""``.
    :param dkim_aligned: ``"pass"`` or ``"fail"``: the DMARC DKIM alignment result.
    :param spf_aligned: ``"pass"`` or ``"fail"``: the DMARC SPF alignment result.
    :param dkim: ``(domain, selector, result)`` for every signature tried, in header order;
        ``result`` an RFC 8601 §2.7.1 token.
    :param spf: ``(domain, scope, result)``: the SPF check DMARC used, ``scope`` ``"mfrom"`` or
        ``"helo"``, ``result`` an RFC 8601 §2.7.2 token; ``None`` when SPF was not evaluated.
    :param rua: ``rua=`` URIs as published; ``ruf``: ``ruf=`` URIs.
    """

    time: float
    reporter: str
    source_ip: str
    header_from: str
    envelope_from: str
    envelope_to: tuple[str, ...]
    policy_domain: str
    p: str
    sp: str | None
    np: str | None
    adkim: str
    aspf: str
    fo: str
    testing: bool
    discovery_method: str
    disposition: str
    overrides: tuple[tuple[str, str], ...]
    dkim_aligned: str
    spf_aligned: str
    dkim: tuple[tuple[str, str, str], ...]
    spf: tuple[str, str, str] | None
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalization goes through object.__setattr__
        if isinstance(self.time, bool) or not isinstance(self.time, int | float):
            raise ValueError(f"time: not a number: {self.time!r}")
        if not math.isfinite(self.time) or self.time < 0:
            raise ValueError(f"time: not a UTC epoch time: {self.time!r}")
        set_(self, "time", float(self.time))
        set_(self, "reporter", _domain(self.reporter, "reporter"))
        try:
            addr = ipaddress.ip_address(self.source_ip.strip())
        except (ValueError, AttributeError):
            raise ValueError(f"source_ip: not an IP address: {self.source_ip!r}") from None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # a dual-stack socket's ::ffff:a.b.c.d is an IPv4 client
        set_(self, "source_ip", addr.compressed)
        set_(self, "header_from", _domain(self.header_from, "header_from"))
        set_(self, "envelope_from", _domain(self.envelope_from, "envelope_from", empty_ok=True))
        to: list[str] = []
        for name in self.envelope_to:
            norm = _domain(name, "envelope_to")
            if norm not in to:
                to.append(norm)
        set_(self, "envelope_to", tuple(to))
        set_(self, "policy_domain", _domain(self.policy_domain, "policy_domain"))
        _one_of(self.p, POLICIES, "p")
        if self.sp is not None:
            _one_of(self.sp, POLICIES, "sp")
        if self.np is not None:
            _one_of(self.np, POLICIES, "np")
        _one_of(self.adkim, ALIGNMENT_MODES, "adkim")
        _one_of(self.aspf, ALIGNMENT_MODES, "aspf")
        if not isinstance(self.fo, str):
            raise ValueError(f"fo: not a string: {self.fo!r}")
        set_(self, "fo", self.fo.strip() or "0")
        if not isinstance(self.testing, bool):
            raise ValueError(f"testing: not a bool: {self.testing!r}")
        _one_of(self.discovery_method, DISCOVERY_METHODS, "discovery_method")
        _one_of(self.disposition, DISPOSITIONS, "disposition")
        overrides = []
        for kind, comment in self.overrides:
            _one_of(kind, OVERRIDE_TYPES, "overrides type")
            if not isinstance(comment, str):
                raise ValueError(f"overrides comment: not a string: {comment!r}")
            overrides.append((kind, comment))
        set_(self, "overrides", tuple(overrides))
        _one_of(self.dkim_aligned, ALIGNED_RESULTS, "dkim_aligned")
        _one_of(self.spf_aligned, ALIGNED_RESULTS, "spf_aligned")
        sigs = []
        for domain, selector, result in self.dkim:
            if not isinstance(selector, str) or not selector.strip():
                raise ValueError(f"dkim selector: empty or not a string: {selector!r}")
            sigs.append(
                (_domain(domain, "dkim domain"), selector.strip().lower(),
                 _one_of(result, DKIM_RESULTS, "dkim result"))
            )
        set_(self, "dkim", tuple(sigs))
        if self.spf is not None:
            domain, scope, result = self.spf
            set_(self, "spf", (
                _domain(domain, "spf domain"),
                _one_of(scope, SPF_SCOPES, "spf scope"),
                _one_of(result, SPF_RESULTS, "spf result"),
            ))
        for name in ("rua", "ruf"):
            uris = getattr(self, name)
            if isinstance(uris, str) or not all(isinstance(u, str) for u in uris):
                raise ValueError(f"{name}: not a sequence of URIs: {uris!r}")
            set_(self, name, tuple(u.strip() for u in uris))

    def to_json(self) -> dict[str, Any]:
        """The stable dict form (JSON types only) for the database."""
        return {
            "v": JSON_VERSION,
            "time": self.time,
            "reporter": self.reporter,
            "source_ip": self.source_ip,
            "header_from": self.header_from,
            "envelope_from": self.envelope_from,
            "envelope_to": list(self.envelope_to),
            "policy": {
                "domain": self.policy_domain,
                "p": self.p,
                "sp": self.sp,
                "np": self.np,
                "adkim": self.adkim,
                "aspf": self.aspf,
                "fo": self.fo,
                "testing": self.testing,
                "discovery_method": self.discovery_method,
                "rua": list(self.rua),
                "ruf": list(self.ruf),
            },
            "disposition": self.disposition,
            "overrides": [{"type": t, "comment": c} for t, c in self.overrides],
            "dkim_aligned": self.dkim_aligned,
            "spf_aligned": self.spf_aligned,
            "dkim": [{"domain": d, "selector": s, "result": r} for d, s, r in self.dkim],
            "spf": None if self.spf is None else dict(zip(("domain", "scope", "result"), self.spf,
                                                          strict=True)),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DmarcEvent:
        """Read the dict form of :meth:`to_json`.

        :raises ValueError: an unknown format version, a missing key or an invalid value.
        """
        if data.get("v") != JSON_VERSION:
            raise ValueError(f"DmarcEvent: unknown format version {data.get('v')!r}")
        try:
            pol = data["policy"]
            spf = data["spf"]
            return cls(
                time=data["time"],
                reporter=data["reporter"],
                source_ip=data["source_ip"],
                header_from=data["header_from"],
                envelope_from=data["envelope_from"],
                envelope_to=tuple(data["envelope_to"]),
                policy_domain=pol["domain"],
                p=pol["p"],
                sp=pol["sp"],
                np=pol["np"],
                adkim=pol["adkim"],
                aspf=pol["aspf"],
                fo=pol["fo"],
                testing=pol["testing"],
                discovery_method=pol["discovery_method"],
                disposition=data["disposition"],
                overrides=tuple((o["type"], o["comment"]) for o in data["overrides"]),
                dkim_aligned=data["dkim_aligned"],
                spf_aligned=data["spf_aligned"],
                dkim=tuple((d["domain"], d["selector"], d["result"]) for d in data["dkim"]),
                spf=None if spf is None else (spf["domain"], spf["scope"], spf["result"]),
                rua=tuple(pol["rua"]),
                ruf=tuple(pol["ruf"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"DmarcEvent: malformed dict form: {exc!r}") from None


@dataclass(frozen=True, slots=True)
class MessageContext:
    """What an OpenDMARC history block and a failure report need beyond the
    :class:`DmarcEvent`: the message as it came, never stored in the report database.

    :param job_id: the MTA's queue id (``{i}``), ``"NOQUEUE"`` when the MTA gave none.
    :param pct: ``pct=`` of the policy record used (100 when absent).
    :param psd: ``psd=`` of the policy record used: ``"y"``, ``"n"`` or ``"u"``.
    :param headers: the header fields as received, ``(name, value)``, value unfolded text.
    :param mail_from: the envelope sender (``""`` for ``<>``).
    :param recipients: the envelope recipients, full addresses.
    :param helo: the client's HELO/EHLO name (``""`` when none).
    :param spf_record: the SPF TXT record that gave the SPF result DMARC used, when known.
    """

    job_id: str
    pct: int
    psd: str
    headers: tuple[tuple[str, str], ...]
    mail_from: str
    recipients: tuple[str, ...]
    helo: str = ""
    spf_record: str | None = None


# Subject of an RFC 9990 aggregate report; a failure report is multipart/report with
# report-type=feedback-report (RFC 6591).
_REPORT_SUBJECT = "report domain:"


def is_report_mail(headers: Iterable[tuple[str, str]], mail_from: str,
                   recipients: Iterable[str], report_senders: Iterable[str]) -> bool:
    """Whether a message is DMARC report mail, about which no report is ever made, so two
    sites cannot go on reporting on each other's reports: mail from or to one of
    ``report_senders`` (envelope or From field), an aggregate report (Subject
    ``Report Domain: …``, RFC 9990) or a failure report (``multipart/report`` with
    ``report-type=feedback-report``, RFC 6591). Bounces (``report-type=delivery-status``)
    are ordinary mail."""
    senders = {s.strip().lower() for s in report_senders if s and s.strip()}
    if mail_from.strip().lower() in senders:
        return True
    if any(r.strip().lower() in senders for r in recipients):
        return True
    for name, value in headers:
        lname = name.strip().lower()
        text = value.strip().lower()
        if lname == "subject" and text.startswith(_REPORT_SUBJECT):
            return True
        if (lname == "content-type" and text.startswith("multipart/report")
                and "feedback-report" in text):  # fmt: skip
            return True
        if lname == "from" and senders and any(
                addr.lower() in senders for _name, addr in getaddresses([value])):  # fmt: skip
            return True
    return False
