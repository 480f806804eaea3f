"""RFC 9990 DMARC aggregate reports, built from :class:`~authmilter.reports.record.DmarcEvent`.

:func:`daily_reports` takes the recorded events and one UTC day and returns one
:class:`AggregateReport` per policy domain; the report renders itself as XML
(:meth:`AggregateReport.to_xml`), gzip (:meth:`AggregateReport.to_gzip`), the RFC 9990
attachment filename and subject, and a ready :class:`email.message.EmailMessage`. No I/O: storing
events and sending the message belong to other modules.

Why hand-written: no maintained Python library writes DMARC aggregate XML. parsedmarc, checkdmarc
and the dmarc-report packages only parse reports; the writers that exist are the Perl
Mail::DMARC and OpenDMARC's ``opendmarc-reports`` (both RFC 7489 format, both tied to their own
databases). The format is small, so it is built here with :mod:`xml.etree.ElementTree` and checked
in the tests by parsing every report with parsedmarc.

Decisions (RFC 9990 leaves these open):

* Period: one report per policy domain per UTC day; ``begin`` is 00:00:00 and ``end`` 23:59:59
  UTC, computed from epoch seconds only (never the local time zone). An event belongs to the day
  when ``begin <= time < begin + 86400``.
* Policy changes during the day (RFC 9990 "Changes in Policy During Reporting Period"): one
  report, ``policy_published`` from the latest event of the day (ties broken by the event's
  stored form, so the input order never matters); records keep the dispositions actually applied
  under whichever policy was in force. The ``rua`` the report goes to is the latest one too.
* ``policy_published`` reports the policy in effect: ``sp`` absent is reported as ``p`` and
  ``np`` absent as the effective ``sp`` (RFC 9989 defaults; RFC 9990: "Unspecified tags have
  their default values"); ``testing`` as ``y``/``n``; ``fo`` ``0`` when absent.
* Element order: RFC 9990 requires order for the first-level elements, ``record``,
  ``policy_evaluated`` and ``auth_results``; its XSD uses ``xs:all`` elsewhere. Everything is
  written in the order of the RFC's tables, so a strict ``xs:sequence`` reader accepts it too.
* Grouping: one ``record`` per distinct (source IP, disposition, override reasons, aligned DKIM
  and SPF results, header_from, envelope_from, envelope_to, DKIM results, SPF result), ``count``
  the number of messages. ``envelope_to`` (at most one in the XSD) is written when all of a
  message's recipients are in one domain and left out otherwise, so a message is never counted
  twice. ``envelope_from`` for the null path is written as an empty element (RFC 9990 allows it).
* DKIM results per record: ordered as RFC 9990 "DKIM Signatures in Aggregate Reports" prefers
  (pass strictly aligned with the From domain; pass relaxed-aligned; other passes; the rest),
  header order kept within each class, and cut to :data:`MAX_DKIM_RESULTS` (100). Relaxed
  alignment is judged with the ``org_domain`` callable given, or, without one, by one domain being
  the other or a parent of it (no DNS here).
* Report-ID: 32 hex digits of SHA-256 over (receiver domain, policy domain, begin, end, the sorted
  reporter host names of the events). A resend of the same day's data gives the same ID; two
  MXes that report separately from their own databases give different IDs; the ID has no ``@``,
  so it is unique without its domain part (parsedmarc keeps only the part before ``@``) and is
  itself a valid filename ``unique-id`` (``1*(ALPHA / DIGIT)``). XML, subject, filename and
  Message-ID carry the same ID.
* Bytes are reproducible: same events give the same XML; gzip uses the report's ``end`` as mtime
  and no file name; the e-mail has a fixed boundary and Message-ID, and its Date is the report end
  unless a time is passed.
"""

from __future__ import annotations

import calendar
import datetime as dt
import gzip
import hashlib
import ipaddress
import json
import re
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime

from authmilter import __version__
from authmilter.reports.record import DmarcEvent

__all__ = [
    "DAY_SECONDS",
    "MAX_DKIM_RESULTS",
    "NAMESPACE",
    "AggregateRecord",
    "AggregateReport",
    "PolicyPublished",
    "ReportingOrg",
    "build_report",
    "daily_reports",
    "day_bounds",
    "mailto_recipients",
    "report_id",
]

NAMESPACE = "urn:ietf:params:xml:ns:dmarc-2.0"
"""The RFC 9990 XML namespace, written as the default namespace of ``<feedback>``."""
MAX_DKIM_RESULTS = 100
"""RFC 9990: no more than 100 signatures for a given row."""
DAY_SECONDS = 86400
# RFC 5322 allows 998; a longer line keeps the filename parameter one plain quoted string
# instead of RFC 2231 continuations that simple report readers may not decode.
_POLICY = SMTP.clone(max_line_length=998)


@dataclass(frozen=True, slots=True)
class ReportingOrg:
    """Who sends the reports (the Mail Receiver).

    :param org_name: ``report_metadata/org_name``.
    :param domain: the receiver domain: the filename's ``receiver``, the subject's
        ``Submitter`` and part of the Report-ID.
    :param email: ``report_metadata/email`` and, unless another is given, the From of the message.
    :param extra_contact_info: ``report_metadata/extra_contact_info``, optional.
    :param generator: ``report_metadata/generator``; ``None`` leaves it out.
    """

    org_name: str
    domain: str
    email: str
    extra_contact_info: str | None = None
    generator: str | None = f"authmilter {__version__}"


@dataclass(frozen=True, slots=True)
class PolicyPublished:
    """``policy_published``: the policy in effect, defaults filled in."""

    domain: str
    discovery_method: str
    p: str
    sp: str
    np: str
    fo: str
    adkim: str
    aspf: str
    testing: str

    @classmethod
    def from_event(cls, event: DmarcEvent) -> PolicyPublished:
        sp = event.sp or event.p
        return cls(
            domain=event.policy_domain,
            discovery_method=event.discovery_method,
            p=event.p,
            sp=sp,
            np=event.np or sp,
            fo=event.fo,
            adkim=event.adkim,
            aspf=event.aspf,
            testing="y" if event.testing else "n",
        )


@dataclass(frozen=True, slots=True)
class AggregateRecord:
    """One ``record``: a group of messages with identical reported data."""

    source_ip: str
    count: int
    disposition: str
    dkim_aligned: str
    spf_aligned: str
    reasons: tuple[tuple[str, str], ...]
    header_from: str
    envelope_from: str
    envelope_to: str | None
    dkim: tuple[tuple[str, str, str], ...]
    spf: tuple[str, str, str] | None


def _ns(tag: str) -> str:
    return f"{{{NAMESPACE}}}{tag}"


def _sub(parent: ET.Element, tag: str, text: str | int | None = None) -> ET.Element:
    child = ET.SubElement(parent, _ns(tag))
    if text is not None:
        child.text = str(text)
    return child


@dataclass(frozen=True, slots=True)
class AggregateReport:
    """One RFC 9990 aggregate report: one policy domain, one period."""

    org: ReportingOrg
    report_id: str
    begin: int
    end: int
    policy: PolicyPublished
    records: tuple[AggregateRecord, ...]
    rua: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        """``receiver!policy-domain!begin!end!unique-id.xml.gz`` (RFC 9990 "Email")."""
        return (f"{self.org.domain}!{self.policy.domain}!{self.begin}!{self.end}"
                f"!{self.report_id}.xml.gz")

    @property
    def subject(self) -> str:
        """``Report Domain: D Submitter: S Report-ID: <id>`` (RFC 9990 ``dmarc-subject``)."""
        return (f"Report Domain: {self.policy.domain} Submitter: {self.org.domain} "
                f"Report-ID: <{self.report_id}>")

    def to_element(self) -> ET.Element:
        """The ``<feedback>`` element tree, every element in :data:`NAMESPACE`."""
        root = ET.Element(_ns("feedback"))
        _sub(root, "version", "1.0")
        meta = _sub(root, "report_metadata")
        _sub(meta, "org_name", self.org.org_name)
        _sub(meta, "email", self.org.email)
        if self.org.extra_contact_info:
            _sub(meta, "extra_contact_info", self.org.extra_contact_info)
        _sub(meta, "report_id", self.report_id)
        date_range = _sub(meta, "date_range")
        _sub(date_range, "begin", self.begin)
        _sub(date_range, "end", self.end)
        for error in self.errors:
            _sub(meta, "error", error)
        if self.org.generator:
            _sub(meta, "generator", self.org.generator)
        pol = _sub(root, "policy_published")
        for tag in ("domain", "discovery_method", "p", "sp", "np", "fo", "adkim", "aspf",
                    "testing"):
            _sub(pol, tag, getattr(self.policy, tag))
        for rec in self.records:
            record = _sub(root, "record")
            row = _sub(record, "row")
            _sub(row, "source_ip", rec.source_ip)
            _sub(row, "count", rec.count)
            evaluated = _sub(row, "policy_evaluated")
            _sub(evaluated, "disposition", rec.disposition)
            _sub(evaluated, "dkim", rec.dkim_aligned)
            _sub(evaluated, "spf", rec.spf_aligned)
            for kind, comment in rec.reasons:
                reason = _sub(evaluated, "reason")
                _sub(reason, "type", kind)
                if comment:
                    _sub(reason, "comment", comment)
            ids = _sub(record, "identifiers")
            _sub(ids, "header_from", rec.header_from)
            _sub(ids, "envelope_from", rec.envelope_from)
            if rec.envelope_to is not None:
                _sub(ids, "envelope_to", rec.envelope_to)
            auth = _sub(record, "auth_results")
            for domain, selector, result in rec.dkim:
                dkim = _sub(auth, "dkim")
                _sub(dkim, "domain", domain)
                _sub(dkim, "selector", selector)
                _sub(dkim, "result", result)
            if rec.spf is not None:
                spf = _sub(auth, "spf")
                for tag, value in zip(("domain", "scope", "result"), rec.spf, strict=True):
                    _sub(spf, tag, value)
        return root

    def to_xml(self) -> bytes:
        """The report as UTF-8 XML; the same report gives the same bytes."""
        root = self.to_element()
        ET.indent(root)
        body = ET.tostring(root, encoding="unicode", default_namespace=NAMESPACE)
        return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body.encode("utf-8") + b"\n"

    def to_gzip(self) -> bytes:
        """:meth:`to_xml` gzipped, mtime fixed to :attr:`end`, so a resend has the same bytes."""
        return gzip.compress(self.to_xml(), compresslevel=9, mtime=self.end)

    def to_email(self, sender: str | None = None, now: float | None = None,
                 recipients: Sequence[str] | None = None) -> EmailMessage:  # fmt: skip
        """The report message: a short text part and the gzip as ``application/gzip``.

        :param sender: the From address; the reporting org's ``email`` by default.
        :param now: the Date (epoch seconds); the report's :attr:`end` by default, so the same
            report gives the same message.
        :param recipients: the To addresses (those :mod:`authmilter.reports.destinations`
            verified); by default every ``mailto:`` URI of :attr:`rua` that accepts the size.
        :raises ValueError: no recipient.
        """
        attachment = self.to_gzip()
        if recipients is None:
            recipients = mailto_recipients(self.rua, _base64_size(len(attachment)))
        if not recipients:
            raise ValueError(f"{self.policy.domain}: no usable mailto: URI in rua {self.rua!r}")
        msg = EmailMessage(policy=_POLICY)
        msg["From"] = sender or self.org.email
        msg["To"] = ", ".join(recipients)
        msg["Subject"] = self.subject
        date = dt.datetime.fromtimestamp(self.end if now is None else now, dt.UTC)
        msg["Date"] = format_datetime(date)
        msg["Message-ID"] = f"<{self.report_id}@{self.org.domain}>"
        msg.set_content(
            f"DMARC aggregate report for {self.policy.domain} from {self.org.org_name}\n"
            f"Period: {_iso(self.begin)} to {_iso(self.end)} UTC\n"
            f"Report-ID: {self.report_id}\n"
        )
        msg.add_attachment(attachment, maintype="application", subtype="gzip",
                           filename=self.filename)
        msg.set_boundary(f"=_authmilter_{self.report_id}")
        return msg


def _iso(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _base64_size(n: int) -> int:
    # base64 with 76-character lines and CRLF, as the attachment travels
    chars = 4 * ((n + 2) // 3)
    return chars + 2 * ((chars + 75) // 76)


_SIZE = re.compile(r"^(\d+)([kmgt]?)$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def mailto_recipients(uris: Iterable[str], size: int | None = None) -> list[str]:
    """The addresses of the ``mailto:`` URIs, in order, without duplicates.

    A URI's ``!size`` limit (RFC 9989 ``rua`` syntax) is honoured when ``size`` is given: a URI
    whose limit is below ``size`` bytes is left out (RFC 9990 "Transport"). URIs of other schemes
    and malformed ones are left out.
    """
    out: list[str] = []
    for uri in uris:
        text = uri.strip()
        if not text.lower().startswith("mailto:"):
            continue
        text = text[len("mailto:"):]
        limit = None
        if "!" in text:
            text, _, raw = text.rpartition("!")
            match = _SIZE.match(raw.strip())
            if match is None:
                continue
            limit = int(match.group(1)) * _UNITS[match.group(2).lower()]
        addr = urllib.parse.unquote(text.split("?", 1)[0]).strip()
        if addr.count("@") != 1 or any(c.isspace() or c in "<>,;\"" for c in addr):
            continue
        if size is not None and limit is not None and size > limit:
            continue
        if addr.lower() not in (a.lower() for a in out):
            out.append(addr)
    return out


def day_bounds(day: dt.date) -> tuple[int, int]:
    """``(begin, end)`` of a UTC day in epoch seconds: 00:00:00 and 23:59:59 UTC."""
    begin = calendar.timegm((day.year, day.month, day.day, 0, 0, 0, 0, 0, 0))
    return begin, begin + DAY_SECONDS - 1


def report_id(org: ReportingOrg, policy_domain: str, begin: int, end: int,
              reporters: Iterable[str] = ()) -> str:
    """The deterministic Report-ID (see the module docstring): 32 lowercase hex digits."""
    key = json.dumps(["authmilter-dmarc-aggregate-1", org.domain.lower(), policy_domain.lower(),
                      begin, end, sorted(set(reporters))], separators=(",", ":"))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def _relaxed(domain: str, header_from: str) -> bool:
    return (domain == header_from or header_from.endswith("." + domain)
            or domain.endswith("." + header_from))


def _order_dkim(sigs: Sequence[tuple[str, str, str]], header_from: str,
                org_domain: Callable[[str], str] | None) -> tuple[tuple[str, str, str], ...]:
    def rank(sig: tuple[str, str, str]) -> int:
        domain, _, result = sig
        if result != "pass":
            return 3
        if domain == header_from:
            return 0
        if org_domain is not None:
            aligned = org_domain(domain) == org_domain(header_from)
        else:
            aligned = _relaxed(domain, header_from)
        return 1 if aligned else 2

    return tuple(sorted(sigs, key=rank)[:MAX_DKIM_RESULTS])  # sorted() is stable


def _ip_key(ip: str) -> tuple[int, int]:
    addr = ipaddress.ip_address(ip)
    return addr.version, int(addr)


def _event_key(event: DmarcEvent) -> tuple[float, str]:
    return event.time, json.dumps(event.to_json(), sort_keys=True)


def build_report(events: Iterable[DmarcEvent], org: ReportingOrg, begin: int, end: int,
                 org_domain: Callable[[str], str] | None = None) -> AggregateReport:
    """One report from events of a single policy domain (the caller picks them and the period).

    One pass over ``events``, which may be a stream (:func:`authmilter.reports.store.iter_events`):
    only the grouped records are held, never the events, so memory follows the number of
    distinct records, not of messages.

    :raises ValueError: no events, or events of several policy domains.
    """
    latest: DmarcEvent | None = None
    reporters: set[str] = set()
    groups: dict[AggregateRecord, int] = {}
    for e in events:
        if latest is None:
            latest = e
        elif e.policy_domain != latest.policy_domain:
            raise ValueError(f"one policy domain per report, got "
                             f"{sorted({latest.policy_domain, e.policy_domain})}")  # fmt: skip
        elif e.time > latest.time or (e.time == latest.time
                                      and _event_key(e) > _event_key(latest)):  # fmt: skip
            latest = e
        reporters.add(e.reporter)
        key = AggregateRecord(
            source_ip=e.source_ip, count=0, disposition=e.disposition,
            dkim_aligned=e.dkim_aligned, spf_aligned=e.spf_aligned, reasons=e.overrides,
            header_from=e.header_from, envelope_from=e.envelope_from,
            envelope_to=e.envelope_to[0] if len(e.envelope_to) == 1 else None,
            dkim=_order_dkim(e.dkim, e.header_from, org_domain), spf=e.spf,
        )
        groups[key] = groups.get(key, 0) + 1
    if latest is None:
        raise ValueError("one policy domain per report, got []")
    records = [replace(key, count=n) for key, n in groups.items()]
    records.sort(key=lambda r: (_ip_key(r.source_ip), repr(r)))
    return AggregateReport(
        org=org,
        report_id=report_id(org, latest.policy_domain, begin, end, reporters),
        begin=begin,
        end=end,
        policy=PolicyPublished.from_event(latest),
        records=tuple(records),
        rua=latest.rua,
    )


def daily_reports(events: Iterable[DmarcEvent], day: dt.date, org: ReportingOrg,
                  org_domain: Callable[[str], str] | None = None) -> list[AggregateReport]:
    """One report per policy domain for the UTC ``day``, sorted by policy domain.

    Events outside the day are ignored. Every policy domain with events gets a report, whether
    or not it publishes ``rua`` (:meth:`AggregateReport.to_email` refuses one without).
    """
    begin, end = day_bounds(day)
    by_domain: dict[str, list[DmarcEvent]] = {}
    for event in events:
        if begin <= event.time < begin + DAY_SECONDS:
            by_domain.setdefault(event.policy_domain, []).append(event)
    return [build_report(by_domain[d], org, begin, end, org_domain) for d in sorted(by_domain)]
