"""``authmilter reports send``: the queue of complete UTC days, destinations, retries, resends
and crashes (SQLite, a zone resolver, an injected clock and submitter). The same run through a
real Postfix, NSD and parsedmarc is in test_reports_e2e.py."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from email import message_from_bytes
from email.policy import SMTP
from pathlib import Path
from typing import Any

import pytest

from authmilter.config import Config
from authmilter.errors import ConfigError
from authmilter.reports import send, store
from authmilter.reports.aggregate import DAY_SECONDS, day_bounds
from authmilter.reports.commands import show_rows
from authmilter.reports.destinations import check_destinations, mailto_address
from authmilter.reports.record import DmarcEvent, is_report_mail
from authmilter.reports.submit import SubmitError, Submitted
from dnsserver import make_zone
from fakedns import ZoneResolver, failure_marker

DAY = dt.date(2026, 3, 14)
BEGIN = day_bounds(DAY)[0]
AFTER = BEGIN + DAY_SECONDS + send.GRACE_SECONDS + 60  # DAY is complete, the next day is not


def zones() -> dict[str, str]:
    verify = '"v=DMARC1"'
    return {
        "test": make_zone("test", [("@", "A", "192.0.2.1")]),
        "vendor.test": make_zone("vendor.test", [
            ("brand.test._report._dmarc.agg", "TXT", verify),
            ("*._report._dmarc.wild", "TXT", verify),
            ("redir.test._report._dmarc.agg", "TXT",
             '"v=DMARC1; rua=mailto:other@agg.vendor.test,mailto:x@elsewhere.test"'),
            ("two.test._report._dmarc.agg", "TXT", verify),
            ("two.test._report._dmarc.agg", "TXT", '"v=DMARC1; rua=mailto:b@agg.vendor.test"'),
            ("flaky.test._report._dmarc.agg", "TXT", failure_marker("SERVFAIL")),
        ]),
    }  # fmt: skip


@pytest.fixture
def resolver() -> ZoneResolver:
    return ZoneResolver.from_zones(zones())


def org(domain: str) -> str:
    return ".".join(domain.split(".")[-2:])


def ev(domain: str = "sender.test", when: float = BEGIN + 3600, **kw: Any) -> DmarcEvent:
    base: dict[str, Any] = dict(
        time=when, reporter="mx1.receiver.test", source_ip="192.0.2.1", header_from=domain,
        envelope_from=domain, envelope_to=("receiver.test",), policy_domain=domain,
        p="reject", sp=None, np=None, adkim="r", aspf="r", fo="0", testing=False,
        discovery_method="psl", disposition="none", overrides=(), dkim_aligned="pass",
        spf_aligned="pass", dkim=((domain, "s1", "pass"),), spf=(domain, "mfrom", "pass"),
        rua=(f"mailto:dmarc@{domain}",), ruf=())  # fmt: skip
    base.update(kw)
    return DmarcEvent(**base)


def put(url: str, events: Sequence[DmarcEvent]) -> None:
    db = store.open_database(url)
    try:
        with db.transaction():
            db.executemany("INSERT INTO dmarc_events (time, policy_domain, event) VALUES (?, ?, ?)",
                           [(e.time, e.policy_domain, json.dumps(e.to_json())) for e in events])
    finally:
        db.close()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'dmarc.db'}"


def config(url: str, extra: str = "") -> Config:
    return Config.from_text(f"ReportDatabase {url}\nReportSender dmarc@reports.receiver.test\n"
                            f"ReportOrgName Receiver Test\nReportSendRate 0\n{extra}")


class Outbox:
    """The submitter: records what it was given; ``fail`` makes it raise instead."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, str, tuple[str, ...]]] = []
        self.fail: SubmitError | BaseException | None = None
        self.after_accept: BaseException | None = None
        self.refuse: dict[str, tuple[int, str]] = {}

    def __call__(self, message: bytes, envelope_from: str, recipients: Sequence[str],
                 server: str) -> Submitted:  # fmt: skip
        if self.fail is not None:
            raise self.fail
        self.sent.append((message, envelope_from, tuple(recipients)))
        if self.after_accept is not None:
            raise self.after_accept
        ok = tuple(r for r in recipients if r not in self.refuse)
        return Submitted(ok, {r: v for r, v in self.refuse.items() if r in recipients})


def go(url: str, resolver: ZoneResolver, outbox: Outbox, now: float = AFTER, extra: str = "",
       **kw: Any) -> send.RunSummary:  # fmt: skip
    return send.run(config(url, extra), resolver, org, now=now, submit_fn=outbox, **kw)


def states(url: str) -> dict[tuple[str, str], tuple[str, int]]:
    return {(r["policy_domain"], r["day"]): (r["state"], r["attempts"])
            for r in send.queue_rows(url)}  # fmt: skip


# -- days ------------------------------------------------------------------------------------


@pytest.mark.parametrize("zone", ["UTC", "Pacific/Kiritimati", "Pacific/Pago_Pago"])
def test_days_are_utc_days_whatever_the_host_zone(zone: str, restore_tz: None) -> None:
    os.environ["TZ"] = zone
    time.tzset()
    assert send.utc_day(BEGIN) == send.utc_day(BEGIN + DAY_SECONDS - 1) == DAY
    assert send.utc_day(BEGIN - 1) == DAY - dt.timedelta(days=1)
    # a minute after the grace following DAY: DAY is the last complete day
    assert send.complete_days(AFTER)[-1] == DAY
    assert send.complete_days(AFTER - 120)[-1] == DAY - dt.timedelta(days=1)  # within grace
    assert len(send.complete_days(AFTER)) == send.LOOKBACK_DAYS


# -- queue and send once ---------------------------------------------------------------------


def test_each_complete_day_is_sent_once_per_policy_domain(url: str,
                                                          resolver: ZoneResolver) -> None:
    put(url, [ev(), ev(when=BEGIN + 7200, source_ip="192.0.2.2"), ev("brand.test",
              rua=("mailto:d@agg.vendor.test",)),
              ev(when=BEGIN + DAY_SECONDS + 10)])  # the next day: not complete  # fmt: skip
    outbox = Outbox()
    summary = go(url, resolver, outbox)
    assert sorted(d for _day, d, _ in summary.sent) == ["brand.test", "sender.test"]
    assert [to for _m, _f, to in outbox.sent] == [("d@agg.vendor.test",), ("dmarc@sender.test",)]
    assert {f for _m, f, _to in outbox.sent} == {"dmarc@reports.receiver.test"}
    assert states(url) == {("brand.test", "2026-03-14"): ("sent", 1),
                           ("sender.test", "2026-03-14"): ("sent", 1)}
    # the report of sender.test counts both messages of the day, not the next day's
    msg = message_from_bytes(outbox.sent[1][0], policy=SMTP)
    (part,) = [p for p in msg.walk() if p.get_content_type() == "application/gzip"]
    xml = gzip.decompress(part.get_content()).decode()
    assert xml.count("<count>1</count>") == 2 and f"<begin>{BEGIN}</begin>" in xml
    assert "<org_name>Receiver Test</org_name>" in xml  # ReportOrgName
    assert "<email>dmarc@reports.receiver.test</email>" in xml  # ReportSender
    # run again, later the same day: nothing more
    again = go(url, resolver, outbox, now=AFTER + 3600)
    assert (again.queued, again.sent) == ([], []) and len(outbox.sent) == 2


def test_a_resend_of_a_period_is_byte_identical(url: str, resolver: ZoneResolver) -> None:
    put(url, [ev(), ev(source_ip="2001:db8::25")])
    outbox = Outbox()
    go(url, resolver, outbox)
    go(url, resolver, outbox, now=AFTER + 86400, period=DAY)
    assert len(outbox.sent) == 2 and outbox.sent[0] == outbox.sent[1]
    first = message_from_bytes(outbox.sent[0][0], policy=SMTP)
    rid = str(first["Subject"]).rpartition("Report-ID: ")[2].strip("<>")
    assert first["Message-ID"] == f"<{rid}@reports.receiver.test>"
    assert states(url)[("sender.test", "2026-03-14")] == ("sent", 1)  # a resend starts anew


def test_only_a_dry_run_may_name_the_current_day(url: str, resolver: ZoneResolver,
                                                 tmp_path: Path) -> None:  # fmt: skip
    today = DAY + dt.timedelta(days=1)
    put(url, [ev(when=BEGIN + DAY_SECONDS + 60)])
    with pytest.raises(ConfigError, match="not complete"):
        go(url, resolver, Outbox(), period=today)
    out = tmp_path / "out"
    summary = go(url, resolver, Outbox(), period=today, dry_run=True, out=str(out))
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 2 and names[0].endswith(".eml") and names[1].endswith(".xml.gz")
    assert names[1].startswith("reports.receiver.test!sender.test!")
    assert b"<feedback" in gzip.decompress((out / names[1]).read_bytes())
    assert summary.written and send.queue_rows(url) == []  # a dry run changes nothing


# -- crashes, retries, failures, rate ---------------------------------------------------------


class Crash(BaseException):
    """The process dies between the MTA's 250 and marking the report sent."""


def test_a_crash_after_the_250_resends_the_identical_report_once(url: str,
                                                                 resolver: ZoneResolver) -> None:
    put(url, [ev()])
    outbox = Outbox()
    outbox.after_accept = Crash()
    with pytest.raises(Crash):
        go(url, resolver, outbox)
    assert states(url)[("sender.test", "2026-03-14")] == ("sending", 1)
    outbox.after_accept = None
    go(url, resolver, outbox, now=AFTER + 60)  # another run while the lease holds: nothing
    assert len(outbox.sent) == 1
    go(url, resolver, outbox, now=AFTER + send.LEASE_SECONDS + 1)
    go(url, resolver, outbox, now=AFTER + send.LEASE_SECONDS + 3600)
    assert len(outbox.sent) == 2 and outbox.sent[0] == outbox.sent[1]
    assert states(url)[("sender.test", "2026-03-14")] == ("sent", 2)


def test_temporary_failures_back_off_and_end(url: str, resolver: ZoneResolver) -> None:
    put(url, [ev()])
    outbox = Outbox()
    outbox.fail = SubmitError("451 try later", temporary=True, code=451)
    now = AFTER
    delays = []
    for attempt in range(1, send.MAX_ATTEMPTS + 1):
        go(url, resolver, outbox, now=now)
        row = send.queue_rows(url)[0]
        assert row["attempts"] == attempt and row["outcome"]["last_code"] == 451
        delays.append(row["next_try"] - now)
        assert go(url, resolver, outbox, now=now + 1).retry == []  # not before its time
        now = row["next_try"]
    assert states(url)[("sender.test", "2026-03-14")] == ("failed", send.MAX_ATTEMPTS)
    assert delays[:3] == [3600, 7200, 14400]


def test_a_permanent_refusal_is_recorded_and_not_retried(url: str,
                                                         resolver: ZoneResolver) -> None:
    put(url, [ev()])
    outbox = Outbox()
    outbox.fail = SubmitError("554 no", temporary=False, code=554)
    summary = go(url, resolver, outbox)
    assert summary.failed and states(url)[("sender.test", "2026-03-14")] == ("failed", 1)
    assert send.queue_rows(url)[0]["outcome"]["last_error"] == "554 no"
    outbox.fail = None
    go(url, resolver, outbox, now=AFTER + 7 * 3600)
    assert outbox.sent == []


def test_refused_recipients_are_recorded(url: str, resolver: ZoneResolver) -> None:
    put(url, [ev(rua=("mailto:a@sender.test", "mailto:b@sender.test"))])
    outbox = Outbox()
    outbox.refuse = {"b@sender.test": (550, "no such user")}
    summary = go(url, resolver, outbox)
    assert summary.sent and send.queue_rows(url)[0]["outcome"]["refused"] == {
        "b@sender.test": [550, "no such user"]}


def test_a_report_never_sent_expires(url: str, resolver: ZoneResolver) -> None:
    put(url, [ev()])
    outbox = Outbox()
    outbox.fail = SubmitError("no connection", temporary=True)
    go(url, resolver, outbox)
    outbox.fail = None
    go(url, resolver, outbox, now=AFTER + (send.EXPIRE_DAYS + 1) * DAY_SECONDS)
    assert outbox.sent == [] and states(url)[("sender.test", "2026-03-14")][0] == "expired"


def test_the_send_rate_spaces_messages(url: str, resolver: ZoneResolver) -> None:
    put(url, [ev(f"d{n}.test") for n in range(4)])
    waits: list[float] = []
    send.run(config(url, "ReportSendRate 120\n"), resolver, org, now=AFTER, submit_fn=Outbox(),
             sleep=waits.append)  # fmt: skip
    assert waits == [0.5, 0.5, 0.5]  # 120 a minute: half a second between four messages


# -- destinations ------------------------------------------------------------------------------


def test_destinations_verified_wildcard_override_and_dropped(resolver: ZoneResolver) -> None:
    def check(domain: str, *uris: str) -> tuple[tuple[str, ...], list[str], list[str]]:
        got = check_destinations(domain, uris, resolver, org)
        return got.addresses, [u for u, _ in got.dropped], [u for u, _ in got.deferred]

    before = resolver.queries
    assert check("sender.test", "mailto:a@sender.test", "mailto:b@mx.sender.test!10m") == (
        ("a@sender.test", "b@mx.sender.test"), [], [])
    assert resolver.queries == before  # same organization: no DNS
    assert check("brand.test", "mailto:d@agg.vendor.test") == (("d@agg.vendor.test",), [], [])
    assert check("any.test", "mailto:d@wild.vendor.test") == (("d@wild.vendor.test",), [], [])
    assert check("nover.test", "mailto:d@agg.vendor.test") == ((), ["mailto:d@agg.vendor.test"], [])
    assert check("redir.test", "mailto:d@agg.vendor.test") == (
        ("other@agg.vendor.test",), ["mailto:x@elsewhere.test"], [])
    assert check("two.test", "mailto:d@agg.vendor.test")[0] == ()  # two records: no
    assert check("flaky.test", "mailto:d@agg.vendor.test") == ((), [], ["mailto:d@agg.vendor.test"])
    assert check("sender.test", "https://x.test/", "mailto:", "mailto:a b@sender.test") == (
        (), ["https://x.test/", "mailto:", "mailto:a b@sender.test"], [])


def test_mailto_address() -> None:
    assert mailto_address("mailto:dmarc@Example.COM!50m") == "dmarc@example.com"
    assert mailto_address("MAILTO:a%40b@example.com?subject=x") is None  # two @
    assert mailto_address("mailto:re%2Bports@example.com") == "re+ports@example.com"
    assert mailto_address("dmarc@example.com") is None


def test_unverified_skip_listed_and_rua_less_domains_are_skipped(url: str,
                                                                  resolver: ZoneResolver) -> None:
    put(url, [ev("nover.test", rua=("mailto:d@agg.vendor.test",)),
              ev("quiet.test", rua=()), ev("skip.test"), ev("sub.skipped.test")])
    outbox = Outbox()
    summary = go(url, resolver, outbox, extra="ReportSkipDomains skip.test, skipped.test\n")
    why = {d: w for _day, d, w in summary.skipped}
    assert why["nover.test"].startswith("no rua destination left: mailto:d@agg.vendor.test (")
    assert why["quiet.test"] == "the policy publishes no rua"
    assert why["skip.test"] == "ReportSkipDomains skip.test"
    assert why["sub.skipped.test"] == "ReportSkipDomains skipped.test"
    assert outbox.sent == [] and {s for s, _ in states(url).values()} == {"skipped"}


def test_a_dns_temperror_defers_the_day_then_drops_the_uri(url: str,
                                                            resolver: ZoneResolver) -> None:
    put(url, [ev("flaky.test", rua=("mailto:d@agg.vendor.test", "mailto:r@flaky.test"))])
    outbox = Outbox()
    summary = go(url, resolver, outbox)
    assert [d for _day, d, _w in summary.deferred] == ["flaky.test"] and states(url) == {}
    later = go(url, resolver, outbox, now=AFTER + send.DEFER_DAYS * DAY_SECONDS)
    assert [d for _day, d, _w in later.sent] == ["flaky.test"]
    assert outbox.sent[0][2] == ("r@flaky.test",)


# -- report mail and show ----------------------------------------------------------------------


def test_report_mail_is_recognised() -> None:
    senders = ("dmarc@reports.receiver.test",)
    assert is_report_mail([], "dmarc@reports.receiver.test", [], senders)
    assert is_report_mail([], "x@y.test", ["DMARC@reports.receiver.test"], senders)
    assert is_report_mail([("From", "Reports <DMARC@reports.receiver.test>")], "x@y.test", [],
                          senders)  # fmt: skip
    assert not is_report_mail([("From", "<xdmarc@reports.receiver.test>")], "x@y.test", [],
                              senders)  # fmt: skip
    assert is_report_mail([("Subject", "Report Domain: a.test Submitter: b.test Report-ID: 1")],
                          "x@y.test", [], ())
    assert is_report_mail([("Content-Type", 'multipart/report; report-type=feedback-report')],
                          "x@y.test", [], ())
    assert not is_report_mail([("Content-Type", "multipart/report; report-type=delivery-status"),
                               ("Subject", "Undelivered Mail")], "", ["u@y.test"], senders)


def test_show_counts_pass_fail_quarantine_reject() -> None:
    rows = show_rows([
        ev(), ev(),
        ev(source_ip="203.0.113.9", dkim_aligned="fail", spf_aligned="fail",
           disposition="reject"),
        ev(source_ip="203.0.113.9", dkim_aligned="fail", spf_aligned="fail",
           disposition="quarantine"),
        ev(source_ip="203.0.113.9", dkim_aligned="fail", spf_aligned="pass"),
        ev("b.test"),
    ])  # fmt: skip
    assert [(r.policy_domain, r.source_ip, r.messages, r.passed, r.failed, r.quarantined,
             r.rejected) for r in rows] == [
        ("b.test", "192.0.2.1", 1, 1, 0, 0, 0),
        ("sender.test", "203.0.113.9", 3, 1, 2, 1, 1),
        ("sender.test", "192.0.2.1", 2, 2, 0, 0, 0),
    ]  # fmt: skip


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authmilter", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=60)  # fmt: skip


def test_the_commands_read_the_configuration_as_run_does(tmp_path: Path) -> None:
    now = time.time()
    yesterday = send.utc_day(now - send.GRACE_SECONDS) - dt.timedelta(days=1)
    noon = day_bounds(yesterday)[0] + 43200
    url = f"sqlite:///{tmp_path / 'dmarc.db'}"
    put(url, [ev(when=noon), ev(when=noon, source_ip="203.0.113.9", dkim_aligned="fail",
                                spf_aligned="fail", disposition="reject"), ev(when=now - 60)])
    conf = tmp_path / "opendmarc.conf"  # a user's opendmarc.conf, with our lines added
    conf.write_text(f"AuthservID mx.receiver.test\nReportDatabase {url}\n"
                    "ReportSender dmarc@reports.receiver.test\nNameservers 127.0.0.1:9\n")
    shown = cli("reports", "show", "--opendmarc-conf", str(conf), "--days", "3")
    assert shown.returncode == 0, shown.stderr
    lines = [line.split() for line in shown.stdout.splitlines()[1:]]
    assert ["sender.test", "192.0.2.1", "2", "2", "0", "0", "0"] in lines
    assert ["sender.test", "203.0.113.9", "1", "0", "1", "0", "1"] in lines
    out = {}
    for zone in ("Pacific/Kiritimati", "Pacific/Pago_Pago"):  # UTC+14 and UTC-11
        done = cli("reports", "send", "--opendmarc-conf", str(conf), "--dry-run",
                   env={"TZ": zone})  # fmt: skip
        assert done.returncode == 0, done.stderr
        out[zone] = done.stdout
    assert out["Pacific/Kiritimati"] == out["Pacific/Pago_Pago"]
    assert f"queued   {yesterday.isoformat()} sender.test:" in out["Pacific/Kiritimati"]
    assert send.queue_rows(url) == []
    bad = cli("reports", "send", "-c", str(conf), "--out", str(tmp_path))
    assert bad.returncode == 2 and "--out needs --dry-run" in bad.stderr


def test_records_and_reports_older_than_report_keep_days_are_pruned(
        url: str, resolver: ZoneResolver) -> None:  # fmt: skip
    put(url, [ev(), ev(when=BEGIN - 40 * DAY_SECONDS)])
    outbox = Outbox()
    go(url, resolver, outbox)
    assert len(store.read_events(url)) == 1  # the one 40 days before: older than 31 days
    assert list(states(url)) == [("sender.test", "2026-03-14")]
    later = go(url, resolver, outbox, now=AFTER + 20 * DAY_SECONDS,
               extra="ReportKeepDays 10\n")  # fmt: skip
    assert later.pruned == (1, 1) and store.read_events(url) == [] and states(url) == {}
    with pytest.raises(ConfigError, match="ReportKeepDays: at least 8"):
        config(url, "ReportKeepDays 7\n")


def test_a_domain_with_only_subdomain_traffic_gets_its_report(url: str,
                                                               resolver: ZoneResolver) -> None:
    """Mail only from news.brand2.test, whose policy is brand2.test's record (sp=): one report
    for brand2.test, whose records name the subdomain as header_from."""
    put(url, [ev("brand2.test", header_from="news.brand2.test", envelope_from="news.brand2.test",
                 sp="quarantine", disposition="quarantine", dkim_aligned="fail",
                 spf_aligned="fail", dkim=(), spf=("news.brand2.test", "mfrom", "fail"))] * 2)
    outbox = Outbox()
    summary = go(url, resolver, outbox)
    assert [d for _day, d, _ in summary.sent] == ["brand2.test"]
    msg = message_from_bytes(outbox.sent[0][0], policy=SMTP)
    (part,) = [p for p in msg.walk() if p.get_content_type() == "application/gzip"]
    xml = gzip.decompress(part.get_content()).decode()
    assert "<domain>brand2.test</domain>" in xml and "<sp>quarantine</sp>" in xml
    assert "<header_from>news.brand2.test</header_from>" in xml and "<count>2</count>" in xml
    assert "<disposition>quarantine</disposition>" in xml


@pytest.mark.parametrize(("line", "why"), [
    ("ReportSMTPServer localhost", "neither host:port"),
    ("ReportSender reports", "is not an address"),
    ("FailureReportsBcc <a@b.test>", "is not an address"),
    ("HistoryFile var/lib/dmarc.hist", "is not an absolute path"),
    ("ReportSendRate -1", "is not a non-negative integer"),
])  # fmt: skip
def test_bad_reporting_directives_name_file_and_line(tmp_path: Path, line: str, why: str) -> None:
    conf = tmp_path / "authmilter.conf"
    conf.write_text(f"Mode v\n{line}\n")
    done = cli("config-test", "-c", str(conf))
    assert done.returncode == 78 and f"{conf}:2" in done.stderr and why in done.stderr, done.stderr


def test_a_database_that_cannot_be_opened_is_one_line_and_exit_1(tmp_path: Path) -> None:
    conf = tmp_path / "authmilter.conf"
    conf.write_text("ReportDatabase sqlite:////nonexistent/folder/dmarc.db\n"
                    "ReportSender dmarc@reports.receiver.test\n")
    done = cli("reports", "send", "-c", str(conf))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "/nonexistent/folder/dmarc.db" in done.stderr


def test_an_unreadable_record_is_left_out_not_the_report(url: str, resolver: ZoneResolver,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    put(url, [ev(), ev(source_ip="192.0.2.2")])
    db = store.open_database(url)
    with db.transaction():
        db.execute("INSERT INTO dmarc_events (time, policy_domain, event) VALUES (?, ?, ?)",
                   (BEGIN + 60.0, "sender.test", '{"v": 99}'))  # another version's row
    db.close()
    outbox = Outbox()
    summary = go(url, resolver, outbox)
    assert [d for _day, d, _ in summary.sent] == ["sender.test"]
    xml = gzip.decompress([p for p in message_from_bytes(outbox.sent[0][0], policy=SMTP).walk()
                           if p.get_content_type() == "application/gzip"][0].get_content())
    assert xml.count(b"<count>1</count>") == 2
    assert "1 unreadable record(s) left out" in caplog.text
