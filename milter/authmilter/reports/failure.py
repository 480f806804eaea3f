"""DMARC failure reports (RFC 9991, in the AFRF format of RFC 6591), sent by the milter's workers.

OpenDMARC's ``FailureReports`` (off by default), with ``FailureReportsSentBy``,
``FailureReportsBcc`` and ``FailureReportsOnNone``, plus ``FailureReportsRedact`` and two rate
limits. For every DMARC-evaluated message the adapter hands the
:class:`~authmilter.reports.record.DmarcEvent` and its
:class:`~authmilter.reports.record.MessageContext` to :func:`record`, which never blocks and
never raises. Report mail itself yields no event
(:func:`~authmilter.reports.record.is_report_mail`), so no report is ever made about a report.

**When** (:func:`wants_report`): FailureReports is on; the policy record has a ``ruf=``; its
domain is not (below) one of ``ReportSkipDomains``; it is not a ``psd=y`` record (RFC 9991:
never, without a prior agreement); the policy that applies to the From domain (``p``, or ``sp``
for a subdomain) is not ``none`` unless ``FailureReportsOnNone`` (OpenDMARC's "send reports even
for p=none"); and one of the ``fo=`` options (RFC 9989, a colon list, unknown options ignored)
asks for it:

* ``0``: neither DKIM nor SPF gave an aligned pass (the DMARC result is fail);
* ``1``: DKIM or SPF did not give an aligned pass (this can hold while DMARC passes);
* ``d``: a DKIM signature failed to verify (``fail``, ``neutral``, ``policy``, ``permerror``;
  not ``temperror``), aligned or not;
* ``s``: SPF failed (``fail``, ``softfail``, ``permerror``), aligned or not.

Unlike OpenDMARC, which only reports DMARC failures, ``fo=1``/``d``/``s`` are honoured for
passing messages too, as RFC 9989 defines them.

**What** (:func:`build_report`): ``multipart/report; report-type=feedback-report`` with a short
text part, the ``message/feedback-report`` part (``Feedback-Type: auth-failure``, ``User-Agent``,
``Version: 1``, ``Auth-Failure: dmarc``, ``Original-Mail-From``, ``Original-Rcpt-To``,
``Arrival-Date``, ``Reporting-MTA``, ``Source-IP``, ``Reported-Domain`` (the From domain),
``Authentication-Results`` (our verdict), ``Identity-Alignment``, ``DKIM-Domain``/
``-Identity``/``-Selector`` of a failing signature, ``SPF-DNS`` when the record is known,
``Delivery-Result``), and the original header fields as ``text/rfc822-headers``: the milter keeps
no body, so none is sent. Decisions:

* ``Identity-Alignment`` follows RFC 9991: the methods whose *aligned* identifier failed
  (a DKIM signature whose ``d=`` aligns with the From domain and did not pass; an SPF domain
  that aligns and did not pass), ``none`` when no aligned identifier failed. RFC 7489 had
  listed the methods that *produced* an aligned identifier instead.
* ``DKIM-Domain``/``DKIM-Selector``: the first failing aligned signature, else the first failing
  one. ``DKIM-Identity`` is written as ``@`` the domain (the RFC 6376 default ``i=``; the event
  does not keep ``i=``).
* ``Delivery-Result`` from the disposition applied: ``none`` → ``delivered``, ``quarantine``
  → ``policy`` (the MTA's hold queue: not delivered, held by local policy; not ``spam``),
  ``reject`` → ``reject``.
* Subject: ``DMARC failure report for <From domain> from <source IP>`` (neither RFC fixes one;
  the original subject is not repeated, it may be private). ``Auto-Submitted: auto-generated``.
* From: ``FailureReportsSentBy``, else ``ReportSender``, else ``postmaster@`` the reporting host
  (the authserv-id). The same address is the envelope sender. ``FailureReportsBcc`` is one more
  envelope recipient, never a header field.
* ``FailureReportsRedact``: the local part of every address in the header part and in the
  report fields becomes ``redacted`` (RFC 6590 style; domains kept, RFC 9991 privacy). Message
  identifiers (``Message-ID``, ``References`` …) are left alone. Display names stay.
* The header part: each field unfolded as received, refolded at white space; at most
  :data:`MAX_HEADER_BYTES`, whole fields only (the text part says how many were left out).
  Non-ASCII header text travels quoted-printable. Report fields are ASCII (other characters
  escaped as ``\\xNN``).

**How many**: at most ``FailureReportsPerDomain`` reports per policy domain and
``FailureReportsPerHour`` in all, in any hour (a sliding window, per worker process; ``0``
means none). Judged when the event comes, so a flood costs the sending thread nothing; a report
later dropped (no verified destination …) still used its place.

**Sending**: one bounded queue and one background thread per worker process, started at the
first report (threads do not survive a fork: a reporter inherited through one is recognised by
its process id and replaced, as :mod:`authmilter.reports.store` does). The thread checks the
``ruf=`` destinations (:func:`~authmilter.reports.destinations.check_destinations`, RFC 9990
external verification with ``kind="ruf"``) with its own resolver built from the configuration
like the worker's, and hands the report to the local MTA (``ReportSMTPServer``,
:func:`~authmilter.reports.submit.submit`), whose milters (this one) DKIM-sign it. A full
queue, a destination without a verification record, a DNS temporary error, an SMTP failure:
the report is dropped, counted (``authmilter_failure_reports_total{outcome}``) and logged at
most once a minute per kind; mail is never delayed or lost for it. A stopping worker calls
:func:`close`.

Built with the standard library's :mod:`email` and ``authres``: no maintained Python library
writes AFRF reports (parsedmarc, which the tests read every report back with, only parses them).
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import os
import re
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from email.message import EmailMessage, MIMEPart
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from typing import Any, cast

import authres
import authres.dmarc

from authmilter import __version__, dmarc, metrics
from authmilter.config import Config
from authmilter.errors import DNSTempError
from authmilter.reports.background import Background
from authmilter.reports.destinations import (
    Destinations,
    check_destinations,
    mailto_address,
    skipped_domain,
)
from authmilter.reports.record import DmarcEvent, MessageContext
from authmilter.reports.store import RateLimitedLog
from authmilter.reports.submit import SubmitError, submit

__all__ = [
    "MAX_HEADER_BYTES",
    "OUTCOMES",
    "REDACTED",
    "USER_AGENT",
    "FailureReporter",
    "RateLimit",
    "build_report",
    "close",
    "fo_options",
    "record",
    "redact",
    "reporter",
    "wants_report",
]

log = logging.getLogger("authmilter")

#: What a redacted local part becomes (``FailureReportsRedact``).
REDACTED = "redacted"
#: The header part holds at most this many bytes of header fields (whole fields).
MAX_HEADER_BYTES = 64 * 1024
#: ``Original-Rcpt-To`` fields, at most.
MAX_RECIPIENTS = 50
USER_AGENT = f"authmilter/{__version__}"
#: The ``outcome`` label of ``authmilter_failure_reports_total``: ``sent``; or dropped because
#: of a rate limit, a full queue, no usable (verified) destination, a DNS temporary error while
#: verifying, the MTA refusing or unreachable, the worker stopping first, an unexpected error.
OUTCOMES = metrics.FAILURE_OUTCOMES

_FO = ("0", "1", "d", "s")
_DKIM_FAILED = frozenset({"fail", "neutral", "policy", "permerror"})
_SPF_FAILED = frozenset({"fail", "softfail", "permerror"})
_DELIVERY = {"none": "delivered", "quarantine": "policy", "reject": "reject"}
# Fields that hold message identifiers, not addresses: never redacted.
_IDS = frozenset({"message-id", "in-reply-to", "references", "resent-message-id"})
# CRLF; header fields folded only past SMTP's line limit: report consumers (parsedmarc among
# them) read each report field from one line.
_POLICY = SMTP.clone(max_line_length=998)


# -- when -------------------------------------------------------------------------------------


def fo_options(fo: str) -> tuple[str, ...]:
    """The ``fo=`` options of a record, in the order ``0 1 d s``; unknown ones are ignored and
    none left means ``0`` (RFC 9989)."""
    given = {part.strip().lower() for part in fo.split(":")}
    found = tuple(option for option in _FO if option in given)
    return found or ("0",)


def _applied_policy(event: DmarcEvent) -> str:
    """The policy for the From domain: ``p`` at the policy domain itself, else ``sp`` if set."""
    if event.header_from == event.policy_domain or event.sp is None:
        return event.p
    return event.sp


def wants_report(event: DmarcEvent, context: MessageContext, cfg: Config) -> str | None:
    """Why a failure report is due for this message, or ``None`` when none is (see the module
    docstring for the rules)."""
    if not cfg.failure_reports or not event.ruf:
        return None
    if skipped_domain(event.policy_domain, cfg.report_skip_domains) is not None:
        return None
    if context.psd.strip().lower() == "y":
        return None
    if _applied_policy(event) == "none" and not cfg.failure_reports_on_none:
        return None
    reasons = []
    for option in fo_options(event.fo):
        if option == "0" and event.dkim_aligned == "fail" and event.spf_aligned == "fail":
            reasons.append("fo=0: neither DKIM nor SPF gave an aligned pass")
        elif option == "1" and "fail" in (event.dkim_aligned, event.spf_aligned):
            which = [m for m, r in (("DKIM", event.dkim_aligned), ("SPF", event.spf_aligned))
                     if r == "fail"]  # fmt: skip
            reasons.append(f"fo=1: {' and '.join(which)} gave no aligned pass")
        elif option == "d":
            failed = [f"{d}/{s} {r}" for d, s, r in event.dkim if r in _DKIM_FAILED]
            if failed:
                reasons.append(f"fo=d: DKIM signature {', '.join(failed)}")
        elif option == "s" and event.spf is not None and event.spf[2] in _SPF_FAILED:
            reasons.append(f"fo=s: SPF {event.spf[2]} for {event.spf[0]}")
    return "; ".join(reasons) or None


# -- what -------------------------------------------------------------------------------------

# A local part: a quoted string, or a run of characters an address may hold before "@". A
# property name in front ("smtp.mailfrom=", "header.i=", DKIM's "i=", Received-SPF's
# "envelope-from=") is kept; any other "=" belongs to the local part (SRS, VERP, BATV
# addresses carry the original address there).
_ADDRESS = re.compile(
    r'(?P<prop>(?<![\w.+=-])(?:smtp\.[a-z]+|header\.[a-z]+|envelope-from|i)=)?'
    r'(?P<local>"(?:[^"\\\r\n]|\\.)*"|[^\s<>()\[\]\\,;:@"]+)@(?=[A-Za-z0-9\[\x80-\U0010ffff])',
    re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the local part of every address replaced by :data:`REDACTED`."""
    return _ADDRESS.sub(lambda m: (m["prop"] or "") + REDACTED + "@", text)


def _ascii(text: str) -> str:
    """A report field value: ASCII without control characters."""
    text = re.sub(r"[\x00-\x1f\x7f]", " ", text)
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _sender(cfg: Config, event: DmarcEvent) -> str:
    return cfg.failure_reports_sent_by or cfg.report_sender or f"postmaster@{event.reporter}"


def _aligned(domain: str, from_domain: str, mode: str,
             org_domain: Callable[[str], str] | None) -> bool:  # fmt: skip
    if domain == from_domain:
        return True
    if mode == "s":
        return False
    if org_domain is not None:
        try:
            return org_domain(domain) == org_domain(from_domain)
        except Exception:  # noqa: BLE001 - a tree walk's DNS trouble: judge by the names
            pass
    return domain.endswith("." + from_domain) or from_domain.endswith("." + domain)


def _failing_signature(event: DmarcEvent,
                       org_domain: Callable[[str], str] | None) -> tuple[str, str, bool] | None:
    """``(domain, selector, aligned)`` of the signature the report names, if one failed."""
    failed = [(d, s) for d, s, r in event.dkim if r != "pass"]
    for domain, selector in failed:
        if _aligned(domain, event.header_from, event.adkim, org_domain):
            return domain, selector, True
    if failed:
        return failed[0][0], failed[0][1], False
    return None


def _identity_alignment(event: DmarcEvent, org_domain: Callable[[str], str] | None) -> str:
    """RFC 9991: the methods that failed to authenticate an aligned identifier, or ``none``."""
    methods = []
    signature = _failing_signature(event, org_domain)
    if signature is not None and signature[2]:
        methods.append("dkim")
    if (event.spf is not None and event.spf[2] != "pass"
            and _aligned(event.spf[0], event.header_from, event.aspf, org_domain)):  # fmt: skip
        methods.append("spf")
    return ", ".join(methods) or "none"


def _dmarc_result(event: DmarcEvent) -> str:
    return "pass" if "pass" in (event.dkim_aligned, event.spf_aligned) else "fail"


def _authentication_results(event: DmarcEvent) -> str:
    """Our verdict as an RFC 8601 value: each signature, SPF, DMARC."""
    clauses: list[object] = [
        authres.DKIMAuthenticationResult(result=r, header_d=d, header_s=s)
        for d, s, r in event.dkim
    ]
    if event.spf is not None:
        domain, scope, result = event.spf
        clauses.append(authres.SPFAuthenticationResult(
            result=result, smtp_mailfrom=domain if scope == "mfrom" else None,
            smtp_helo=domain if scope == "helo" else None))  # fmt: skip
    clauses.append(authres.dmarc.DMARCAuthenticationResult(
        result=_dmarc_result(event), result_comment=f"p={event.p} dis={event.disposition}",
        header_from=event.header_from, policy=_applied_policy(event)))  # fmt: skip
    return f"{event.reporter}; " + "; ".join(str(c) for c in clauses)


def _path(address: str, redacting: bool) -> str:
    address = address.strip().removeprefix("<").removesuffix(">")
    return f"<{redact(address) if redacting else address}>"


def _feedback_fields(event: DmarcEvent, context: MessageContext, cfg: Config,
                     org_domain: Callable[[str], str] | None) -> list[tuple[str, str]]:  # fmt: skip
    redacting = cfg.failure_reports_redact
    arrival = format_datetime(dt.datetime.fromtimestamp(event.time, dt.UTC))
    fields = [
        ("Feedback-Type", "auth-failure"),
        ("User-Agent", USER_AGENT),
        ("Version", "1"),
        ("Auth-Failure", "dmarc"),
        ("Original-Mail-From", _path(context.mail_from, redacting)),
    ]
    fields += [("Original-Rcpt-To", _path(r, redacting))
               for r in context.recipients[:MAX_RECIPIENTS]]  # fmt: skip
    fields += [
        ("Arrival-Date", arrival),
        ("Reporting-MTA", f"dns; {event.reporter}"),
        ("Source-IP", event.source_ip),
        ("Reported-Domain", event.header_from),
        ("Authentication-Results", _authentication_results(event)),
        ("Identity-Alignment", _identity_alignment(event, org_domain)),
    ]
    signature = _failing_signature(event, org_domain)
    if signature is not None:
        domain, selector, _aligned_ = signature
        fields += [("DKIM-Domain", domain), ("DKIM-Identity", f"@{domain}"),
                   ("DKIM-Selector", selector)]  # fmt: skip
    if event.spf is not None and context.spf_record:
        fields.append(("SPF-DNS", f"txt : {event.spf[0]} : {context.spf_record}"))
    fields.append(("Delivery-Result", _DELIVERY[event.disposition]))
    return [(name, _ascii(value)) for name, value in fields]


def _fold(line: str, width: int = 78, limit: int = 900) -> list[str]:
    """One header line folded at white space before ``width`` where it can be; a piece that
    cannot be folded is cut at ``limit`` characters (SMTP's line limit is 998 octets)."""
    out: list[str] = []
    while len(line) > width:
        cut = max(line.rfind(" ", 1, width), line.rfind("\t", 1, width))
        if cut <= 0:
            later = re.search(r"[ \t]", line[width:])
            cut = width + later.start() if later else len(line)
        if cut > limit:
            out.append(line[:limit])
            line = ""
            break
        if cut >= len(line):
            break
        out.append(line[:cut])
        line = line[cut:]
    if line:
        out.append(line)
    return out


def _header_part(context: MessageContext, redacting: bool) -> tuple[MIMEPart, int]:
    """The ``text/rfc822-headers`` part and how many fields were left out for size."""
    lines: list[str] = []
    size = 0
    left_out = 0
    for name, value in context.headers:
        if redacting and name.strip().lower() not in _IDS:
            value = redact(value)
        folded = _fold(f"{name}: {value}")
        length = sum(len(x.encode("utf-8", "surrogateescape")) + 2 for x in folded)
        if size + length > MAX_HEADER_BYTES:
            left_out += 1
            continue
        size += length
        lines.extend(folded)
    text = "".join(line + "\n" for line in lines)
    part = MIMEPart(policy=_POLICY)
    if text.isascii():
        part.set_content(text, subtype="rfc822-headers", cte="7bit")
    else:  # raw 8-bit header text: valid UTF-8 kept, stray bytes shown as U+FFFD
        clean = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        part.set_content(clean, subtype="rfc822-headers", charset="utf-8",
                         cte="quoted-printable")  # fmt: skip
    return part, left_out


def _text_part(event: DmarcEvent, why: str, redacting: bool, left_out: int) -> MIMEPart:
    arrival = dt.datetime.fromtimestamp(event.time, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [
        f"This is a DMARC failure report (RFC 9991) from {event.reporter}.",
        "",
        f"A message claiming to be from {event.header_from} was received from "
        f"{event.source_ip} on {arrival}.",
        f"DMARC: {_dmarc_result(event)} (policy of {event.policy_domain}: "
        f"p={event.p}; disposition applied: {event.disposition}); "
        f"DKIM aligned: {event.dkim_aligned}, SPF aligned: {event.spf_aligned}.",
        f"Reported because: {why}.",
        "",
        "Only the message's header fields are included: its body was not kept.",
    ]
    if redacting:
        lines.append(f"The local parts of addresses are replaced by '{REDACTED}'.")
    if left_out:
        lines.append(f"{left_out} header field(s) were left out to keep the report small.")
    part = MIMEPart(policy=_POLICY)
    part.set_content(_ascii_lines(lines))
    return part


def _ascii_lines(lines: Iterable[str]) -> str:
    return "".join((textwrap.fill(_ascii(line), 76) if line else "") + "\n" for line in lines)


def build_report(event: DmarcEvent, context: MessageContext, cfg: Config, *, now: float,
                 to: Sequence[str] | None = None, why: str | None = None,
                 org_domain: Callable[[str], str] | None = None) -> EmailMessage:  # fmt: skip
    """The failure report about one message (see the module docstring for its parts).

    Serialize it with its own policy (``msg.as_bytes()``: CRLF, header fields folded only past
    998 characters), not ``email.policy.SMTP``, which would fold the report fields.

    :param now: the report's Date (epoch seconds).
    :param to: the To addresses; by default those of the record's ``ruf=`` URIs (the sending
        thread passes the verified ones).
    :param why: the reason from :func:`wants_report`, for the text part.
    :param org_domain: the organizational domain finder, for relaxed alignment; without it a
        domain aligns with its parents and subdomains.
    """
    redacting = cfg.failure_reports_redact
    if to is None:
        to = [a for a in (mailto_address(u) for u in event.ruf) if a is not None]
    sender = _sender(cfg, event)
    msg = EmailMessage(policy=_POLICY)
    msg["From"] = sender
    msg["To"] = ", ".join(to) if to else "undisclosed-recipients:;"
    msg["Subject"] = f"DMARC failure report for {event.header_from} from {event.source_ip}"
    msg["Date"] = format_datetime(dt.datetime.fromtimestamp(now, dt.UTC))
    msg["Message-ID"] = make_msgid("dmarc-failure", domain=sender.rpartition("@")[2])
    msg["Auto-Submitted"] = "auto-generated"
    msg["MIME-Version"] = "1.0"
    headers, left_out = _header_part(context, redacting)
    text = _text_part(event, why or wants_report(event, context, cfg) or "requested by fo=",
                      redacting, left_out)  # fmt: skip
    fields = EmailMessage(policy=_POLICY)
    for name, value in _feedback_fields(event, context, cfg, org_domain):
        fields[name] = value
    feedback = MIMEPart(policy=_POLICY)
    feedback["Content-Type"] = "message/feedback-report"
    feedback["Content-Transfer-Encoding"] = "7bit"
    feedback.set_payload([fields])
    msg["Content-Type"] = "multipart/report; report-type=feedback-report"
    msg.set_payload([text, feedback, headers])
    return msg


# -- how many ---------------------------------------------------------------------------------


class RateLimit:
    """At most ``per_domain`` reports per policy domain and ``per_hour`` in all within any
    ``window`` seconds (a sliding window; ``clock`` injectable). Thread-safe."""

    def __init__(self, per_domain: int, per_hour: int, *, window: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.per_domain = per_domain
        self.per_hour = per_hour
        self.window = window
        self.clock = clock
        self._all: collections.deque[float] = collections.deque()
        self._domains: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def allow(self, domain: str) -> str | None:
        """Take a place for ``domain``: ``None`` when there was one, else which limit is full."""
        now = self.clock()
        start = now - self.window
        with self._lock:
            self._expire(self._all, start)
            seen = self._domains.get(domain)
            if seen is not None:
                self._expire(seen, start)
            if len(self._all) >= self.per_hour:
                return f"FailureReportsPerHour ({self.per_hour}) reached"
            if self.per_domain <= 0 or (seen is not None and len(seen) >= self.per_domain):
                return f"FailureReportsPerDomain ({self.per_domain}) reached for {domain}"
            if seen is None:
                if len(self._domains) > 2 * self.per_hour + 16:
                    self._sweep(start)
                seen = self._domains[domain] = collections.deque()
            seen.append(now)
            self._all.append(now)
            return None

    @staticmethod
    def _expire(times: collections.deque[float], start: float) -> None:
        while times and times[0] <= start:
            times.popleft()

    def _sweep(self, start: float) -> None:
        for name in list(self._domains):
            times = self._domains[name]
            self._expire(times, start)
            if not times:
                del self._domains[name]


# -- sending ----------------------------------------------------------------------------------


Job = tuple[DmarcEvent, MessageContext, str]


class FailureReporter(Background):
    """The queue and the sending thread of one process.

    :param cfg: the configuration (FailureReports* directives, ReportSMTPServer, Nameservers).
    :param resolver: the resolver of the thread; by default one built from ``cfg`` as the
        worker's is, made in the thread at its first report.
    :param org_domain: the organizational domain finder; by default the one ``cfg`` names
        (the public suffix list, or the tree walk over the thread's resolver).
    :param clock: the rate limit's clock; ``wall``: the report's Date.
    :param start: start the thread at the first :meth:`put` (``False``: only :meth:`close` or
        :meth:`start` do, for tests that fill the queue first).
    """

    #: Reports waiting, at most (a report is a few kB).
    MAXSIZE = 1000
    #: Seconds the MTA has to take one report.
    SMTP_TIMEOUT = 30.0
    THREAD_NAME = "authmilter-failure-reports"

    def __init__(self, cfg: Config, *, resolver: dmarc.DnsLookup | None = None,
                 org_domain: Callable[[str], str] | None = None, maxsize: int = MAXSIZE,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, smtp_timeout: float = SMTP_TIMEOUT,
                 start: bool = True) -> None:  # fmt: skip
        # One report at a time: each is checked and submitted on its own.
        super().__init__(maxsize=maxsize, batch=1, interval=0.0, start=start)
        self.cfg = cfg
        self.limit = RateLimit(cfg.failure_reports_per_domain, cfg.failure_reports_per_hour,
                               clock=clock)  # fmt: skip
        self.counts: collections.Counter[str] = collections.Counter()
        self.warn = RateLimitedLog("DMARC failure report ")
        self.wall = wall
        self.smtp_timeout = smtp_timeout
        self._resolver = resolver
        self._org_domain = org_domain

    # -- the milter's side --------------------------------------------------------------------

    def put(self, event: DmarcEvent, context: MessageContext) -> bool:
        """Queue a report about this message if one is due, without waiting; whether one was."""
        why = wants_report(event, context, self.cfg)
        if why is None:
            return False
        full = self.limit.allow(event.policy_domain)
        if full is not None:
            self._drop("rate_limited", f"for {event.policy_domain} not sent: {full}")
            return False
        if self.offer((event, context, why)):
            return True
        self._drop("queue_full", f"for {event.policy_domain} dropped: queue of "
                                 f"{self.queue.maxsize} full or sender stopped")  # fmt: skip
        return False

    def left_at_stop(self, n: int) -> None:
        self._drop("stopped", f"not sent: {n} report(s) still queued at the stop", n)

    def handle(self, items: list[Any]) -> None:
        for item in items:
            event, context, why = cast(Job, item)
            try:
                self._send(event, context, why)
            except Exception as e:  # noqa: BLE001 - the thread must live on
                self._drop("error", f"for {event.policy_domain} not sent: {e!r}")

    def _resolver_and_org(self) -> tuple[dmarc.DnsLookup, Callable[[str], str]]:
        if self._resolver is None:
            from authmilter.resolver import config_resolver

            self._resolver = config_resolver(self.cfg)
        if self._org_domain is None:
            self._org_domain = dmarc.org_domain_finder(self.cfg.organizational_domain_method,
                                                       self.cfg.public_suffix_list,
                                                       self._resolver)  # fmt: skip
        return self._resolver, self._org_domain

    def _send(self, event: DmarcEvent, context: MessageContext, why: str) -> None:
        domain = event.policy_domain
        resolver, org_domain = self._resolver_and_org()
        try:
            found: Destinations = check_destinations(domain, event.ruf, resolver, org_domain,
                                                     kind="ruf")  # fmt: skip
        except DNSTempError as e:
            self._drop("dns_temperror", f"for {domain} not sent: DNS: {e}")
            return
        if not found.addresses:
            if found.deferred:
                reasons = "; ".join(f"{u}: {w}" for u, w in found.deferred)
                self._drop("dns_temperror", f"for {domain} not sent: {reasons}")
            else:
                reasons = "; ".join(f"{u}: {w}" for u, w in found.dropped) or "no ruf= URI"
                self._drop("no_destination", f"for {domain} not sent: no usable ruf= "
                                             f"destination ({reasons})")  # fmt: skip
            return
        for uri, reason in (*found.dropped, *found.deferred):
            log.info("DMARC failure report for %s: %s left out: %s", domain, uri, reason)
        message = build_report(event, context, self.cfg, now=self.wall(), to=found.addresses,
                               why=why, org_domain=org_domain).as_bytes()  # fmt: skip
        sender = _sender(self.cfg, event)
        recipients = list(found.addresses)
        bcc = self.cfg.failure_reports_bcc
        if bcc and bcc.lower() not in (r.lower() for r in recipients):
            recipients.append(bcc)
        try:
            done = submit(message, sender, recipients, self.cfg.report_smtp_server,
                          timeout=self.smtp_timeout)  # fmt: skip
        except (SubmitError, ValueError) as e:
            self._drop("smtp_failed", f"for {domain} not sent: {e}")
            return
        sent = [r for r in done.accepted if r in found.addresses]
        if not sent:
            self._drop("smtp_failed", f"for {domain} not sent: every ruf= address refused "
                                      f"({done.refused})")  # fmt: skip
            return
        self._count("sent")
        log.info("DMARC failure report for %s (From %s, client %s, %s) sent to %s%s",
                 domain, event.header_from, event.source_ip, context.job_id, ", ".join(sent),
                 f"; refused: {done.refused}" if done.refused else "")  # fmt: skip

    def _drop(self, outcome: str, text: str, n: int = 1) -> None:
        self._count(outcome, n)
        self.warn.warning(outcome, text)

    def _count(self, outcome: str, n: int = 1) -> None:
        with self._lock:
            self.counts[outcome] += n
        metrics.failure_reports(outcome, n)


# -- the process's reporter -------------------------------------------------------------------

_reporter: FailureReporter | None = None
_reporter_lock = threading.Lock()


def reporter(cfg: Config) -> FailureReporter:
    """This process's reporter, made at first use (and anew after a fork)."""
    global _reporter
    with _reporter_lock:
        if _reporter is None or _reporter.pid != os.getpid():
            _reporter = FailureReporter(cfg)
        return _reporter


def record(cfg: Config, event: DmarcEvent, context: MessageContext) -> bool:
    """Queue a failure report about this message if one is due: never blocks, never raises.

    :returns: whether a report was queued.
    """
    if not cfg.failure_reports:
        return False
    try:
        return reporter(cfg).put(event, context)
    except Exception as e:  # noqa: BLE001 - a report is never worth a message
        metrics.failure_reports("error", 1)
        log.warning("DMARC failure report: cannot queue a report: %s", e)
        return False


def close(timeout: float = 1.0) -> None:
    """Send what is queued and stop this process's reporter within ``timeout`` seconds."""
    global _reporter
    with _reporter_lock:
        mine = _reporter if _reporter is not None and _reporter.pid == os.getpid() else None
        _reporter = None
    if mine is not None and mine._thread is not None:
        mine.close(timeout)
