"""``authmilter reports send``: RFC 9990 aggregate reports from the report database, once per
policy domain per complete UTC day, through a durable send queue.

A run has two steps, both in the report database (``ReportDatabase``, SQLite or PostgreSQL), so
every MX of a fleet may run it and a crash anywhere loses nothing:

1. **Queue.** For every complete UTC day of the last :data:`LOOKBACK_DAYS` days and every policy
   domain with events that day and no row in ``dmarc_aggregate_reports`` yet, the report is built
   (:func:`authmilter.reports.aggregate.build_report`, from the events of all MX hosts), its
   ``rua`` destinations are checked (:func:`authmilter.reports.destinations.check_destinations`)
   and the finished message is stored with state ``queued``. The row's key
   ``(policy_domain, day)`` makes each day's report exist once: periods never overlap and are
   never sent twice. A domain in ``ReportSkipDomains``, without ``rua``, or whose every
   destination failed verification gets a ``skipped`` row saying why. A DNS temporary error
   while verifying leaves the day for the next run (up to :data:`DEFER_DAYS` days, then the
   deferred URIs are dropped).
2. **Send.** Every ``queued`` row whose time has come is claimed (marked ``sending`` for
   :data:`LEASE_SECONDS`, so two hosts' runs never send it both), submitted to
   ``ReportSMTPServer`` and then marked ``sent``. A crash between the MTA's 250 and that mark
   leaves ``sending``: once the lease is over a run sends the stored message again, byte for byte
   (the same Report-ID and Message-ID), and never anything else. A temporary failure (no connection,
   4xx) retries after 1, 2, 4 … hours, at most :data:`MAX_ATTEMPTS` times and never after
   :data:`EXPIRE_DAYS` days (state ``expired``); a permanent one (5xx) is recorded as ``failed``
   and not retried. Recipients the MTA refused are recorded in the row's ``outcome``. Messages
   go out at most ``ReportSendRate`` a minute.

``--period YYYY-MM-DD`` builds that day again and queues it whatever its state (a resend gives
the same Report-ID and bytes, as long as the events and the destinations are the same);
``--dry-run`` changes nothing in the database and, with ``--out DIR``, writes each report's
``.xml.gz`` and its message (``<report-id>.eml``) there instead of sending. Only a dry run may
name the current, incomplete day.

Days are UTC days computed from epoch seconds only: the host's time zone never matters.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.policy import SMTP
from typing import Any, Protocol

from authmilter.config import Config
from authmilter.dkim_verify import TxtLookup
from authmilter.errors import AuthmilterError, ConfigError, DNSTempError
from authmilter.reports import store
from authmilter.reports.aggregate import (
    DAY_SECONDS,
    AggregateReport,
    ReportingOrg,
    build_report,
    day_bounds,
)
from authmilter.reports.destinations import check_destinations, skipped_domain
from authmilter.reports.submit import SubmitError, Submitted, submit

__all__ = [
    "DEFER_DAYS",
    "EXPIRE_DAYS",
    "GRACE_SECONDS",
    "LOOKBACK_DAYS",
    "LEASE_SECONDS",
    "MAX_ATTEMPTS",
    "SCHEMA",
    "RunSummary",
    "complete_days",
    "reporting_org",
    "run",
    "utc_day",
]

log = logging.getLogger("authmilter")

#: Complete days looked at by a run without ``--period`` (older events are never reported).
LOOKBACK_DAYS = 7
#: A day is complete this long after its last second (late writes of a fleet's MX hosts).
GRACE_SECONDS = 300
#: Days a report whose destinations could not be verified (DNS temporary errors) waits.
DEFER_DAYS = 2
#: Submission attempts of one report, at most.
MAX_ATTEMPTS = 6
#: A queued report not sent this many days after it was queued expires.
EXPIRE_DAYS = 3
#: First retry delay; doubled at each attempt.
RETRY_SECONDS = 3600

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS dmarc_aggregate_reports ("
    "policy_domain TEXT NOT NULL, day TEXT NOT NULL, report_id TEXT NOT NULL, "
    "state TEXT NOT NULL, attempts INTEGER NOT NULL, created DOUBLE PRECISION NOT NULL, "
    "next_try DOUBLE PRECISION NOT NULL, envelope_to TEXT NOT NULL, message TEXT NOT NULL, "
    "outcome TEXT NOT NULL, PRIMARY KEY (policy_domain, day))",
)

STATES = ("queued", "sending", "sent", "failed", "expired", "skipped")


class Submit(Protocol):
    def __call__(self, message: bytes, envelope_from: str, recipients: Sequence[str],
                 server: str) -> Submitted: ...  # fmt: skip


@dataclass
class RunSummary:
    """What a run did, for the command's output and the tests."""

    queued: list[tuple[str, str, str]] = field(default_factory=list)  # (day, domain, report id)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (day, domain, why)
    deferred: list[tuple[str, str, str]] = field(default_factory=list)  # (day, domain, why)
    sent: list[tuple[str, str, str]] = field(default_factory=list)  # (day, domain, report id)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (day, domain, why)
    retry: list[tuple[str, str, str]] = field(default_factory=list)  # (day, domain, why)
    written: list[str] = field(default_factory=list)  # files of a dry run
    pruned: tuple[int, int] = (0, 0)  # (records, queue rows) older than ReportKeepDays

    def lines(self) -> list[str]:
        out = []
        for name in ("queued", "skipped", "deferred", "sent", "retry", "failed"):
            for day, domain, what in getattr(self, name):
                out.append(f"{name:<8} {day} {domain}: {what}")
        out.extend(f"wrote    {path}" for path in self.written)
        if any(self.pruned):
            out.append(f"pruned   {self.pruned[0]} record(s) and {self.pruned[1]} report(s) "
                       "older than ReportKeepDays")  # fmt: skip
        return out


def utc_day(epoch: float) -> dt.date:
    """The UTC day of ``epoch`` (never the local time zone)."""
    return dt.date(1970, 1, 1) + dt.timedelta(days=int(epoch // DAY_SECONDS))


def complete_days(now: float, lookback: int = LOOKBACK_DAYS) -> list[dt.date]:
    """The complete UTC days among the last ``lookback``, oldest first."""
    last = utc_day(now - GRACE_SECONDS) - dt.timedelta(days=1)
    return [last - dt.timedelta(days=n) for n in range(lookback - 1, -1, -1)]


def reporting_org(cfg: Config) -> ReportingOrg:
    """Who the reports are from: ``ReportSender`` and ``ReportOrgName``.

    :raises ConfigError: ``ReportSender`` is not set.
    """
    if not cfg.report_sender:
        raise ConfigError("reports: ReportSender is not set: the address reports are sent "
                          "from (e.g. dmarc-reports@reports.example.net)")  # fmt: skip
    domain = cfg.report_sender.rpartition("@")[2].lower()
    return ReportingOrg(org_name=cfg.report_org_name or domain, domain=domain,
                        email=cfg.report_sender)  # fmt: skip


def database_url(cfg: Config) -> str:
    """``ReportDatabase``, which every ``reports`` command needs.

    :raises ConfigError: it is not set.
    """
    if not cfg.report_database:
        raise ConfigError("reports: ReportDatabase is not set, so nothing was recorded "
                          "(docs/reports.md)")  # fmt: skip
    return cfg.report_database


@dataclass
class _Env:
    cfg: Config
    db: Any  # store.Database
    org: ReportingOrg
    resolver: TxtLookup
    org_domain: Callable[[str], str]
    now: float
    summary: RunSummary


def run(cfg: Config, resolver: TxtLookup, org_domain: Callable[[str], str], *,
        now: float | None = None, period: dt.date | None = None, dry_run: bool = False,
        out: str | None = None, submit_fn: Submit | None = None,
        sleep: Callable[[float], None] = time.sleep) -> RunSummary:  # fmt: skip
    """One ``reports send`` run (see the module docstring).

    :param org_domain: organizational domain of a name (for DKIM ordering and verification).
    :param submit_fn: hands a message to the MTA; :func:`authmilter.reports.submit.submit`
        with ``ReportSMTPServer`` by default.
    :raises ConfigError: ReportDatabase or ReportSender missing, or ``period`` not complete
        without ``dry_run``.
    """
    url = database_url(cfg)
    org = reporting_org(cfg)
    now = time.time() if now is None else now
    if period is not None and not dry_run and period > complete_days(now, 1)[0]:
        raise ConfigError(f"reports send --period {period}: the day is not complete yet "
                          "(UTC); only --dry-run may show it")  # fmt: skip
    summary = RunSummary()
    db = store.open_database(url)
    try:
        db.ensure_schema(SCHEMA)
        # Every name's organizational domain once per run (a tree walk asks DNS).
        env = _Env(cfg, db, org, resolver, functools.lru_cache(maxsize=4096)(org_domain),
                   now, summary)  # fmt: skip
        days = [period] if period is not None else complete_days(now)
        for day in days:
            _queue_day(env, day, force=period is not None, dry_run=dry_run, out=out)
        if not dry_run:
            _send_queued(env, submit_fn or submit, sleep)
            _prune(env)
    finally:
        db.close()
    return summary


# -- step 1: building and queueing -------------------------------------------------------------


def _queue_day(env: _Env, day: dt.date, *, force: bool, dry_run: bool, out: str | None) -> None:
    begin, end = day_bounds(day)
    domains = store.policy_domains(env.db, float(begin), float(begin + DAY_SECONDS))
    if not force:
        have = {d for (d,) in env.db.execute(
            "SELECT policy_domain FROM dmarc_aggregate_reports WHERE day = ?", (day.isoformat(),))}
        domains = [d for d in domains if d not in have]
    for domain in sorted(domains):
        _queue_report(env, day, domain, force=force, dry_run=dry_run, out=out)


def _queue_report(env: _Env, day: dt.date, domain: str, *, force: bool, dry_run: bool,
                  out: str | None) -> None:  # fmt: skip
    iso = day.isoformat()
    begin, end = day_bounds(day)
    skip = skipped_domain(domain, env.cfg.report_skip_domains)
    if skip is not None:
        _skip(env, iso, domain, f"ReportSkipDomains {skip}", dry_run, force)
        return
    unreadable: list[str] = []
    events = store.iter_events(env.db, policy_domain=domain, since=float(begin),
                               until=float(begin + DAY_SECONDS), unreadable=unreadable)
    first = next(events, None)
    report = None if first is None else build_report(
        itertools.chain([first], events), env.org, begin, end, env.org_domain)
    if unreadable:
        log.warning("reports: %s %s: %d unreadable record(s) left out, the first: %s", iso,
                    domain, len(unreadable), unreadable[0])  # fmt: skip
    if report is None:
        return  # nothing readable that day
    if not report.rua:
        _skip(env, iso, domain, "the policy publishes no rua", dry_run, force)
        return
    try:
        checked = check_destinations(domain, report.rua, env.resolver, env.org_domain)
    except DNSTempError as e:  # the organizational domain of a tree walk
        checked = None
        why = str(e)
    if checked is None or (checked.deferred and (env.now - end) < DEFER_DAYS * DAY_SECONDS):
        why = why if checked is None else "; ".join(w for _, w in checked.deferred)
        env.summary.deferred.append((iso, domain, f"destination check deferred: {why}"))
        log.info("reports: %s %s deferred: %s", iso, domain, why)
        return
    dropped = [f"{uri} ({why})" for uri, why in (*checked.dropped, *checked.deferred)]
    if not checked.addresses:
        _skip(env, iso, domain, "no rua destination left: " + "; ".join(dropped), dry_run,
              force)
        return
    message = report.to_email(env.org.email, recipients=checked.addresses)
    data = message.as_bytes(policy=SMTP)
    if dry_run:
        if out is not None:
            _write_dry_run(env, out, report, data)
        env.summary.queued.append((iso, domain, f"{report.report_id} (dry run) to "
                                                f"{', '.join(checked.addresses)}"))  # fmt: skip
        return
    outcome = json.dumps({"dropped": dropped, "refused": {}}, sort_keys=True)
    if not _put(env, domain, iso, report.report_id, "queued", json.dumps(checked.addresses),
                data.decode("ascii"), outcome, replace=force):  # fmt: skip
        return  # another host's run queued it first
    env.summary.queued.append((iso, domain, report.report_id))
    for text in dropped:
        log.info("reports: %s %s: destination dropped: %s", iso, domain, text)


def _skip(env: _Env, iso: str, domain: str, why: str, dry_run: bool, force: bool) -> None:
    env.summary.skipped.append((iso, domain, why))
    if not dry_run:
        _put(env, domain, iso, "", "skipped", "[]", "", json.dumps({"skipped": why}),
             replace=force)  # fmt: skip


def _put(env: _Env, domain: str, iso: str, rid: str, state: str, to_json: str, message: str,
         outcome: str, *, replace: bool) -> bool:  # fmt: skip
    """Insert the row of ``(domain, day)``; with ``replace`` over an existing one (a resend),
    without it only when there is none. Whether the row is now ours."""
    conflict = ("DO UPDATE SET report_id = excluded.report_id, state = excluded.state, "
                "attempts = 0, created = excluded.created, next_try = excluded.next_try, "
                "envelope_to = excluded.envelope_to, message = excluded.message, "
                "outcome = excluded.outcome" if replace else "DO NOTHING")  # fmt: skip
    with env.db.transaction():
        rows = env.db.execute(
            "INSERT INTO dmarc_aggregate_reports (policy_domain, day, report_id, state, "
            "attempts, created, next_try, envelope_to, message, outcome) "
            "VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?, ?) "
            f"ON CONFLICT (policy_domain, day) {conflict} RETURNING state",
            (domain, iso, rid, state, env.now, env.now, to_json, message, outcome))
    return bool(rows)


def _write_dry_run(env: _Env, out: str, report: AggregateReport, data: bytes) -> None:
    try:
        os.makedirs(out, exist_ok=True)
        for name, content in ((report.filename, report.to_gzip()),
                              (f"{report.report_id}.eml", data)):  # fmt: skip
            path = os.path.join(out, name)
            with open(path, "wb") as f:
                f.write(content)
            env.summary.written.append(path)
    except OSError as e:
        raise AuthmilterError(f"reports send --out {out}: {e.strerror or e} (the run is "
                              f"user {os.geteuid()})") from None


# -- step 2: sending ---------------------------------------------------------------------------


def _send_queued(env: _Env, send: Submit, sleep: Callable[[float], None]) -> None:
    rows = env.db.execute(
        "SELECT policy_domain, day, report_id, created, envelope_to, message, outcome "
        "FROM dmarc_aggregate_reports WHERE state IN ('queued', 'sending') AND next_try <= ? "
        "ORDER BY created, policy_domain, day", (env.now,))  # fmt: skip
    rate = env.cfg.report_send_rate
    gap = 60.0 / rate if rate > 0 else 0.0
    first = True
    for domain, iso, rid, created, to_json, message, outcome_json in rows:
        if env.now - created > EXPIRE_DAYS * DAY_SECONDS:
            _mark(env, domain, iso, "expired", env.now, outcome_json,
                  error=f"not sent within {EXPIRE_DAYS} days")  # fmt: skip
            env.summary.failed.append((iso, domain, f"{rid}: expired"))
            continue
        attempts = _claim(env, domain, iso)
        if attempts is None:
            continue  # another host's run is sending it
        if not first and gap:
            sleep(gap)  # ReportSendRate: a global cap on report messages per minute
        first = False
        try:
            done = send(message.encode("ascii"), env.org.email, json.loads(to_json),
                        env.cfg.report_smtp_server)  # fmt: skip
        except SubmitError as e:
            if e.temporary and attempts < MAX_ATTEMPTS:
                later = env.now + RETRY_SECONDS * 2 ** (attempts - 1)
                _mark(env, domain, iso, "queued", later, outcome_json, error=str(e), code=e.code)
                env.summary.retry.append((iso, domain, f"{rid}: {e}"))
            else:
                _mark(env, domain, iso, "failed", env.now, outcome_json, error=str(e),
                      code=e.code)  # fmt: skip
                env.summary.failed.append((iso, domain, f"{rid}: {e}"))
            log.warning("reports: %s %s (%s): %s", iso, domain, rid, e)
            continue
        _mark(env, domain, iso, "sent", env.now, outcome_json, refused=done.refused)
        env.summary.sent.append((iso, domain, f"{rid} to {', '.join(done.accepted)}"))
        for rcpt, (code, text) in done.refused.items():
            log.warning("reports: %s %s (%s): %s refused: %s %s", iso, domain, rid, rcpt, code,
                        text)  # fmt: skip


#: A report marked ``sending`` is taken again after this long (a run that crashed after the
#: MTA's 250 and before marking it sent, or another host's run that is still at it).
LEASE_SECONDS = 900


def _claim(env: _Env, domain: str, iso: str) -> int | None:
    """Mark the report ``sending`` (one more attempt, leased for :data:`LEASE_SECONDS`) unless
    another run did since it was read; the attempt number, or ``None``."""
    with env.db.transaction():
        rows = env.db.execute(
            "UPDATE dmarc_aggregate_reports SET state = 'sending', attempts = attempts + 1, "
            "next_try = ? WHERE policy_domain = ? AND day = ? "
            "AND state IN ('queued', 'sending') AND next_try <= ? RETURNING attempts",
            (env.now + LEASE_SECONDS, domain, iso, env.now))  # fmt: skip
    return int(rows[0][0]) if rows else None


def _mark(env: _Env, domain: str, iso: str, state: str, next_try: float, outcome_json: str, *,
          error: str | None = None, code: int | None = None,
          refused: dict[str, tuple[int, str]] | None = None) -> None:  # fmt: skip
    outcome = json.loads(outcome_json or "{}")
    if error is not None:
        outcome["last_error"] = error
        outcome["last_code"] = code
    if refused is not None:
        outcome["refused"] = {r: list(v) for r, v in refused.items()}
    with env.db.transaction():
        env.db.execute(
            "UPDATE dmarc_aggregate_reports SET state = ?, next_try = ?, outcome = ? "
            "WHERE policy_domain = ? AND day = ?",
            (state, next_try, json.dumps(outcome, sort_keys=True), domain, iso))


def _prune(env: _Env) -> None:
    """Delete records and queue rows older than ``ReportKeepDays`` (the database would grow
    for ever otherwise)."""
    cutoff = day_bounds(utc_day(env.now) - dt.timedelta(days=env.cfg.report_keep_days))[0]
    old_events = "FROM dmarc_events WHERE time < ?", (float(cutoff),)
    old_rows = ("FROM dmarc_aggregate_reports WHERE day < ? AND state NOT IN ('queued', "
                "'sending')", (utc_day(cutoff).isoformat(),))  # fmt: skip
    counts = []
    with env.db.transaction():
        for where, args in (old_events, old_rows):
            ((n,),) = env.db.execute(f"SELECT COUNT(*) {where}", args)
            if n:
                env.db.execute(f"DELETE {where}", args)
            counts.append(int(n))
    env.summary.pruned = (counts[0], counts[1])


# -- reading the queue back (for ``reports show`` and the tests) ------------------------------


def queue_rows(url: str) -> list[dict[str, Any]]:
    """Every row of the send queue, oldest day first."""
    db = store.open_database(url)
    try:
        db.ensure_schema(SCHEMA)
        rows = db.execute(
            "SELECT policy_domain, day, report_id, state, attempts, created, next_try, "
            "envelope_to, outcome FROM dmarc_aggregate_reports ORDER BY day, policy_domain")
    finally:
        db.close()
    keys = ("policy_domain", "day", "report_id", "state", "attempts", "created", "next_try",
            "envelope_to", "outcome")  # fmt: skip
    out = []
    for row in rows:
        item = dict(zip(keys, row, strict=True))
        item["envelope_to"] = json.loads(item["envelope_to"])
        item["outcome"] = json.loads(item["outcome"])
        out.append(item)
    return out
