"""Recording DMARC report events (ReportDatabase): the pipeline's event, the SQLite writer,
the adapter, and end to end through Postfix into a report."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
import time
from functools import partial
from io import BytesIO
from pathlib import Path

import Milter
import pytest
from Milter.testctx import TestCtx as MilterCtx

from authmilter.config import Action, Config
from authmilter.errors import ConfigError
from authmilter.keys import key_record_text
from authmilter.pipeline import Context, Verdict
from authmilter.reports import aggregate, store
from authmilter.reports.record import DmarcEvent
from authmilter.server import AuthMilter
from dnsserver import NsdServer, make_zone, txt_rdata
from fakedns import ZoneResolver, failure_marker
from helpers import (  # noqa: F401 - keys: the helpers fixture
    AID,
    ATTACKER_IP,
    OUTSIDE,
    Keys,
    compose,
    dkim_sign,
    keys,
    message,
    recording_zones,
    run,
)
from milter_fixture import AuthmilterProcess
from postfix_fixture import PostfixInstance, SmtpPermfail

REP = "rep.test"
REP_DMARC = ("v=DMARC1; p=reject; sp=quarantine; np=none; adkim=s; aspf=r; fo=1; "
             "rua=mailto:agg@rep.test; ruf=mailto:fail@rep.test")  # fmt: skip
NOW = float(int(time.time()))


@pytest.fixture(autouse=True)
def fresh_now() -> None:
    """The verifier's clock, read again for every test: dkimpy signs with the real time, and a
    value frozen at import is "in the future" by more than ClockDrift (t= permerror) once the
    suite has run for five minutes before these tests."""
    global NOW
    NOW = float(int(time.time()))


def zones(k: Keys) -> dict[str, str]:
    return {
        REP: make_zone(REP, [
            ("@", "TXT", '"v=spf1 ip4:198.51.100.0/24 -all"'),
            ("_dmarc", "TXT", f'"{REP_DMARC}"'),
            ("sel._domainkey", "TXT", txt_rdata(key_record_text(k.bank))),
        ]),
        "evil.test": make_zone("evil.test", [
            ("@", "TXT", '"v=spf1 ip4:198.51.100.0/24 -all"'),
            ("sel._domainkey", "TXT", txt_rdata(key_record_text(k.evil))),
        ]),
        "testing.test": make_zone("testing.test", [("_dmarc", "TXT", '"v=DMARC1; p=reject; t=y"')]),
        "pct.test": make_zone("pct.test", [("_dmarc", "TXT", '"v=DMARC1; p=quarantine; pct=0"')]),
        "tw.test": make_zone("tw.test", [
            ("@", "TXT", '"v=spf1 ip4:198.51.100.0/24 -all"'),
            ("_dmarc", "TXT", '"v=DMARC1; p=none"'),
            ("sub", "A", "192.0.2.1"),
        ]),
        "test": make_zone("test", [("@", "A", "192.0.2.1")]),  # the tree walk asks _dmarc.test
        "nodmarc.test": make_zone("nodmarc.test", [("@", "TXT", '"v=spf1 -all"')]),
        "broken.test": make_zone("broken.test", [("_dmarc", "TXT", failure_marker("SERVFAIL"))]),
    }  # fmt: skip


@pytest.fixture(scope="module")
def resolver(keys: Keys) -> ZoneResolver:  # noqa: F811 - the helpers fixture
    return ZoneResolver.from_zones(zones(keys))


def ctx(resolver: ZoneResolver, conf: str = "") -> Context:
    # The pipeline makes records only when ReportDatabase is set (it opens nothing itself).
    cfg = Config.from_text(f"AuthservID {AID}\nMode v\n"
                           f"ReportDatabase sqlite:////nonexistent/r.db\n{conf}")  # fmt: skip
    return Context.build(cfg, resolver=resolver, clock=lambda: NOW, rand=lambda: 0.0)


def expected(**changes: object) -> DmarcEvent:
    """The event of a message from alice@rep.test, DKIM-signed by rep.test, from an address in
    rep.test's SPF with MAIL FROM bounce@rep.test: what the message and the DNS say."""
    fields: dict[str, object] = dict(
        time=NOW, reporter=AID, source_ip=ATTACKER_IP, header_from=REP, envelope_from=REP,
        envelope_to=("ours.test",), policy_domain=REP, p="reject", sp="quarantine", np="none",
        adkim="s", aspf="r", fo="1", testing=False, discovery_method="psl", disposition="none",
        overrides=(), dkim_aligned="pass", spf_aligned="pass", dkim=((REP, "sel", "pass"),),
        spf=(REP, "mfrom", "pass"), rua=("mailto:agg@rep.test",), ruf=("mailto:fail@rep.test",))
    fields.update(changes)
    return DmarcEvent(**fields)  # type: ignore[arg-type]


def event_of(verdict: Verdict) -> DmarcEvent:
    assert verdict.dmarc_event is not None, verdict.log
    event = verdict.dmarc_event
    assert DmarcEvent.from_json(json.loads(json.dumps(event.to_json()))) == event
    return event


# -- the pipeline's event ---------------------------------------------------------------------


def test_a_passing_message_s_event_is_what_the_message_and_dns_say(
        resolver: ZoneResolver, keys: Keys) -> None:  # noqa: F811  # fmt: skip
    raw = compose(f"Alice <alice@{REP}>")
    raw = dkim_sign(raw, keys.bank, REP) + raw
    verdict = run(ctx(resolver), raw, mail_from=f"bounce@{REP}")
    assert verdict.action is Action.ACCEPT
    assert event_of(verdict) == expected()


def test_a_spoof_records_every_signature_and_the_local_policy_override(
        resolver: ZoneResolver, keys: Keys) -> None:  # noqa: F811  # fmt: skip
    """Signed by the attacker's own domain, plus a rep.test signature broken by an edit; SPF
    passes for the attacker's MAIL FROM: nothing aligns. RejectFailures off (the default):
    dis=none with a local_policy reason; on: rejected, dis=reject, no override."""
    raw = compose(f"alice@{REP}")
    rep_sig = dkim_sign(raw, keys.bank, REP)
    edited = raw.replace(b"money", b"Money")
    raw = dkim_sign(edited, keys.evil, "evil.test") + rep_sig + edited
    fail = expected(envelope_from="evil.test", dkim_aligned="fail", spf_aligned="fail",
                    dkim=(("evil.test", "sel", "pass"), (REP, "sel", "fail")),
                    spf=("evil.test", "mfrom", "pass"))  # fmt: skip
    verdict = run(ctx(resolver), raw, mail_from="bounce@evil.test")
    assert verdict.action is Action.ACCEPT
    assert event_of(verdict) == expected(**{**_fields(fail), "overrides": (
        ("local_policy", "RejectFailures is off"),)})  # fmt: skip
    verdict = run(ctx(resolver, "RejectFailures yes\n"), raw, mail_from="bounce@evil.test")
    assert verdict.action is Action.REJECT
    assert event_of(verdict) == expected(**{**_fields(fail), "disposition": "reject"})


def _fields(event: DmarcEvent) -> dict[str, object]:
    return {name: getattr(event, name) for name in DmarcEvent.__dataclass_fields__}


@pytest.mark.parametrize(("domain", "conf", "action", "disposition", "overrides", "testing"), [
    # t=y: reject becomes quarantine (RFC 9989), held with HoldQuarantinedMessages.
    ("testing.test", "RejectFailures yes\nHoldQuarantinedMessages yes\n", Action.QUARANTINE,
     "quarantine", (("policy_test_mode", "t=y"),), True),
    ("testing.test", "RejectFailures yes\n", Action.ACCEPT, "none",
     (("policy_test_mode", "t=y"), ("local_policy", "HoldQuarantinedMessages is off")), True),
    # pct=0: every message is sampled out (RFC 7489 §6.6.4): quarantine becomes none.
    ("pct.test", "RejectFailures yes\nHoldQuarantinedMessages yes\n", Action.ACCEPT, "none",
     (("policy_test_mode", "sampled out by pct=0"),), False),
])  # fmt: skip
def test_test_mode_and_sampling_are_policy_test_mode_overrides(
        resolver: ZoneResolver, domain: str, conf: str, action: Action, disposition: str,
        overrides: tuple[tuple[str, str], ...], testing: bool) -> None:  # fmt: skip
    verdict = run(ctx(resolver, conf), compose(f"alice@{domain}"), mail_from="bounce@evil.test")
    assert verdict.action is action
    event = event_of(verdict)
    assert (event.disposition, event.overrides, event.testing) == (disposition, overrides,
                                                                   testing)  # fmt: skip
    assert (event.policy_domain, event.dkim, event.dkim_aligned) == (domain, (), "fail")


def test_tree_walk_subdomain_and_null_sender(resolver: ZoneResolver) -> None:
    """A subdomain's policy found by the DMARCbis tree walk at its parent; the null sender
    has no envelope_from, and SPF is the HELO check (mail.evil.example: no SPF record)."""
    c = ctx(resolver, "OrganizationalDomainMethod treewalk\n")
    verdict = run(c, compose("alice@sub.tw.test"), mail_from="bounce@tw.test")
    event = event_of(verdict)
    assert (event.header_from, event.policy_domain, event.discovery_method) == (
        "sub.tw.test", "tw.test", "treewalk")
    assert (event.p, event.sp, event.np, event.fo, event.rua) == ("none", None, None, "0", ())
    assert (event.spf, event.spf_aligned) == (("tw.test", "mfrom", "pass"), "pass")
    null = event_of(run(c, compose("alice@sub.tw.test"), mail_from=""))
    assert null.envelope_from == ""
    assert null.spf is not None and null.spf[1] == "helo"


@pytest.mark.parametrize(("from_", "conf", "macros"), [
    ("alice@nodmarc.test", "", {}),  # no policy record: DMARC none
    ("alice@broken.test", "", {}),  # temperror: nothing was decided
    (f"alice@{REP}", f"InternalHosts {ATTACKER_IP}\n", {}),  # our own mail: not evaluated
    (f"alice@{REP}", f"IgnoreMailFrom {REP}\n", {}),
])  # fmt: skip
def test_no_event_where_dmarc_gave_no_policy_verdict(resolver: ZoneResolver, from_: str,
                                                     conf: str, macros: dict[str, str]) -> None:
    verdict = run(ctx(resolver, conf), compose(from_), mail_from=f"bounce@{REP}")
    assert verdict.dmarc_event is None


def test_without_report_database_no_record_is_made(resolver: ZoneResolver) -> None:
    cfg = Config.from_text(f"AuthservID {AID}\nMode v\n")
    plain = Context.build(cfg, resolver=resolver, clock=lambda: NOW, rand=lambda: 0.0)
    recording = ctx(resolver)
    message = compose(f"alice@{REP}")
    assert run(recording, message, mail_from=f"bounce@{REP}").dmarc_event is not None
    assert run(plain, message, mail_from=f"bounce@{REP}").dmarc_event is None


# -- configuration ----------------------------------------------------------------------------


def test_report_database_takes_an_absolute_sqlite_path() -> None:
    cfg = Config.from_text("Mode v\nReportDatabase sqlite:////var/lib/authmilter/r.db\n")
    assert cfg.report_database == "sqlite:////var/lib/authmilter/r.db"
    assert Config.from_text("Mode v\n").report_database is None


@pytest.mark.parametrize(("url", "why"), [
    ("mysql://u@db/reports", "expected sqlite:////absolute/path.db or postgresql://"),
    ("/var/lib/authmilter/r.db", "expected sqlite"),
    ("sqlite:///relative.db", "absolute file path"),
])  # fmt: skip
def test_report_database_errors_name_file_and_line(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=rf"^authmilter.conf:2: ReportDatabase: .*{why}"):
        Config.from_text(f"Mode v\nReportDatabase {url}\n", path="authmilter.conf")


# -- the writer -------------------------------------------------------------------------------


def events(n: int) -> list[DmarcEvent]:
    return [DmarcEvent.from_json({**expected().to_json(), "time": NOW + i}) for i in range(n)]


def test_events_are_written_in_batches_to_a_wal_database(tmp_path: Path,
                                                         counted: dict[str, int]) -> None:
    path = str(tmp_path / "reports.db")
    url = f"sqlite:///{path}"
    writer = store.ReportWriter(url, start=False)
    batch = events(1200)
    assert all(writer.put(e) for e in batch)
    assert writer.close(timeout=30)
    assert writer.batches == [500, 500, 200]
    assert (writer.written, writer.dropped, writer.failed) == (1200, 0, 0)
    assert counted == {"written": 1200}
    assert store.read_events(url) == batch
    some = store.read_events(url, policy_domain=REP, since=NOW + 10, until=NOW + 12)
    assert some == batch[10:12]
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    indexes = [row[1] for row in db.execute("PRAGMA index_list(dmarc_events)")]
    assert "dmarc_events_domain_time" in indexes
    columns = [row[2] for row in db.execute("PRAGMA index_info(dmarc_events_domain_time)")]
    assert columns == ["policy_domain", "time"]
    db.close()


def test_a_started_writer_writes_within_its_interval(tmp_path: Path,
                                                     counted: dict[str, int]) -> None:
    url = f"sqlite:///{tmp_path}/reports.db"
    writer = store.ReportWriter(url, interval=0.05)
    for e in events(3):
        writer.put(e)
    deadline = time.monotonic() + 10
    while writer.written < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.written == 3 and len(store.read_events(url)) == 3
    assert writer.close(timeout=5)


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path: Path,
                                                        counted: dict[str, int]) -> None:
    """The thread is not started: a put that waited would never return."""
    writer = store.ReportWriter(f"sqlite:///{tmp_path}/reports.db", maxsize=5, start=False)
    accepted = [writer.put(e) for e in events(8)]
    assert accepted == [True] * 5 + [False] * 3
    assert writer.dropped == 3 and counted == {"dropped": 3}
    assert writer.close(timeout=30)
    assert (writer.written, writer.dropped, writer.failed) == (5, 3, 0)


def test_an_unwritable_database_counts_failures(tmp_path: Path, counted: dict[str, int]) -> None:
    (tmp_path / "file").write_text("not a folder")
    writer = store.ReportWriter(f"sqlite:///{tmp_path}/file/reports.db", start=False)
    for e in events(3):
        writer.put(e)
    assert writer.close(timeout=30)
    assert (writer.written, writer.failed) == (0, 3) and counted == {"failed": 3}


def test_warnings_are_rate_limited_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    warn = store.RateLimitedLog("DMARC report records: ", clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="authmilter"):
        assert warn.warning("dropped", "a")
        assert not warn.warning("dropped", "b")
        assert warn.warning("failed", "c")
        now[0] = 61.0
        assert warn.warning("dropped", "d")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["DMARC report records: a", "DMARC report records: c",
                     "DMARC report records: d (1 more such line(s) suppressed)"]


def test_a_writer_inherited_through_a_fork_is_replaced(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/reports.db"
    first = store.writer(url)
    assert store.writer(url) is first
    first.pid = -1  # as seen from a forked child
    assert store.writer(url) is not first
    store.close(5)


def test_the_adapter_gives_the_verdict_when_the_database_is_unwritable(
        tmp_path: Path, counted: dict[str, int]) -> None:  # fmt: skip
    (tmp_path / "file").write_text("not a folder")
    url = f"sqlite:///{tmp_path}/file/reports.db"
    cfg = Config.from_text(f"AuthservID mx.server.test\nReportDatabase {url}\n")
    zone = make_zone("example.org", [("_dmarc", "TXT", '"v=DMARC1; p=none"')])
    Milter.factory = partial(AuthMilter, Context.build(cfg, resolver=ZoneResolver(
        zone, "example.org")))  # fmt: skip
    # As test_server: pymilter's TestCtx takes a "no reply" answer for a refusal, so offer none.
    offered = MilterCtx.default_opts
    MilterCtx.default_opts = [Milter.CURR_ACTS, 0x1FFFFF, 0, 0]
    MilterCtx.default_opts[1] &= ~(Milter.P_NR_CONN | Milter.P_NR_HELO | Milter.P_NR_MAIL
                                   | Milter.P_NR_RCPT | Milter.P_NR_DATA | Milter.P_NR_UNKN
                                   | Milter.P_NR_EOH | Milter.P_NR_BODY | Milter.P_NR_HDR)
    try:
        test = MilterCtx()
        assert test._connect(host="client.example", ip="10.0.0.1") == Milter.CONTINUE
        message_ = (b"From: alice@example.org\nTo: bob@example.net\nSubject: hi\n"
                    b"Date: Mon, 23 Nov 2026 03:00:00 +0000\n\nbody\n")  # fmt: skip
        assert test._feedFile(BytesIO(message_), "alice@example.org",
                              "bob@example.net") == Milter.ACCEPT  # fmt: skip
    finally:
        MilterCtx.default_opts = offered
    assert "dmarc=fail" in str(test._msg["Authentication-Results"])
    writer = store.writer(url)
    store.close(10)
    assert (writer.written, writer.failed) == (0, 1) and counted == {"failed": 1}


# -- end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nsd(nsd_server_module) -> NsdServer:  # type: ignore[no-untyped-def]
    return nsd_server_module(recording_zones())


def test_inbound_mail_through_postfix_becomes_rows_and_a_report(nsd: NsdServer) -> None:
    milter = AuthmilterProcess(f"AuthservID mx.reports.test\nWorkers 2\n"
                               f"Nameservers {nsd.nameserver}\nRejectFailures yes\n")  # fmt: skip
    db = milter.dir / "reports.db"
    with milter.conf_path.open("a") as conf:
        conf.write(f"ReportDatabase sqlite:///{db}\n")
    milter.start()
    try:
        postfix = PostfixInstance(milter.postfix_socket).start()
        try:
            for n in range(3):
                postfix.send(message("a@good.test", f"good {n}"), mail_from="a@good.test",
                             rcpt_to=["user@ours.test"], port="inbound", client_ip=OUTSIDE)
            postfix.wait_delivered(3, timeout=60)
            with pytest.raises(SmtpPermfail):
                postfix.send(message("boss@spoofed.test", "wire"), mail_from="x@good.test",
                             rcpt_to=["user@ours.test"], port="inbound", client_ip=OUTSIDE)
        finally:
            postfix.stop()
    finally:
        assert milter.stop() == 0, milter.log()  # the stopping workers flush their queues
    try:
        rows = sqlite3.connect(db).execute(
            "SELECT policy_domain, time, event FROM dmarc_events ORDER BY id").fetchall()
        got = [DmarcEvent.from_json(json.loads(text)) for _d, _t, text in rows]
        assert [r[0] for r in rows] == [e.policy_domain for e in got]
        assert sorted(e.policy_domain for e in got) == ["good.test"] * 3 + ["spoofed.test"], (
            milter.log())
        good = [e for e in got if e.policy_domain == "good.test"]
        assert {(e.source_ip, e.header_from, e.envelope_from, e.envelope_to, e.spf,
                 e.spf_aligned, e.disposition, e.reporter) for e in good} == {
            (OUTSIDE, "good.test", "good.test", ("ours.test",),
             ("good.test", "mfrom", "pass"), "pass", "none", "mx.reports.test")}
        (spoof,) = [e for e in got if e.policy_domain == "spoofed.test"]
        assert (spoof.disposition, spoof.spf_aligned, spoof.dkim_aligned) == (
            "reject", "fail", "fail")
        day = dt.datetime.fromtimestamp(got[0].time, dt.UTC).date()
        org = aggregate.ReportingOrg("Reports Test", "reports.test", "dmarc@reports.test")
        reports = aggregate.daily_reports(got, day, org)
        assert [r.policy.domain for r in reports] == ["good.test", "spoofed.test"]
        xml = reports[0].to_xml().decode()
        assert "<count>3</count>" in xml and f"<source_ip>{OUTSIDE}</source_ip>" in xml
    finally:
        milter.cleanup()


def _open_and_write(url: str, barrier: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    db = store.open_database(url)
    try:
        with db.transaction():
            db.execute("INSERT INTO dmarc_events (time, policy_domain, event) VALUES (?, ?, ?)",
                       (1.0, "a.test", "{}"))  # fmt: skip
    finally:
        db.close()


def test_workers_creating_the_database_together_all_write(tmp_path: Path) -> None:
    """Two workers whose first records come together both create the file, switch it to WAL
    and create the table: SQLite answers "database is locked" at once to one of them (its
    busy timeout does not cover that), which once cost a batch. Eight processes at a barrier,
    ten new files: every insert must land."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for n in range(10):
        url = f"sqlite:///{tmp_path / f'race{n}.db'}"
        barrier = ctx.Barrier(8)
        procs = [ctx.Process(target=_open_and_write, args=(url, barrier)) for _ in range(8)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0] * 8, n
        (count,), = sqlite3.connect(url.removeprefix("sqlite://")).execute(
            "SELECT COUNT(*) FROM dmarc_events").fetchall()
        assert count == 8
