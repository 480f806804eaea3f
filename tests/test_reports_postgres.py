"""ReportDatabase on PostgreSQL as on SQLite: the URL, the one database API, the writer, and a
fleet of two real milters behind two real Postfixes writing to one database that one report
run turns into one report per domain (read back by parsedmarc); a PostgreSQL that stops under
a running milter costs no mail and is written to again once it is back.

PostgreSQL is a private server of the tests (tests/pg_fixture.py); SQLite a file in the test's
folder. Each test gets an empty database.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import parsedmarc  # type: ignore[import-untyped]
import pytest
from prometheus_client.parser import text_string_to_metric_families

import pg_fixture
from authmilter.config import Config, DatabaseURL, parse_report_database
from authmilter.errors import ConfigError
from authmilter.reports import aggregate, store
from authmilter.reports.record import DmarcEvent
from dnsserver import NsdServer
from helpers import OUTSIDE, message, recording_zones
from milter_fixture import AuthmilterProcess
from pg_fixture import PostgresServer, wait_until
from postfix_fixture import PostfixInstance, SmtpPermfail, free_port

postgres_server = pg_fixture.postgres_server
postgres_url = pg_fixture.postgres_url

KINDS = ["sqlite", "postgresql"]
DAY = dt.date(2026, 3, 14)
BEGIN = 1773446400  # 2026-03-14T00:00:00Z
ORG = aggregate.ReportingOrg("Fleet Test", "fleet.test", "dmarc@fleet.test")
SECRET = "n0t-a-real-pa55word"


@pytest.fixture(params=KINDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty ReportDatabase of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/reports.db"
    return str(request.getfixturevalue("postgres_url"))


def ev(n: int, *, domain: str = "example.com", reporter: str = "mx1.fleet.test",
       ip: str = "192.0.2.1", time: float | None = None) -> DmarcEvent:  # fmt: skip
    return DmarcEvent(
        time=BEGIN + 60 * n if time is None else time, reporter=reporter, source_ip=ip,
        header_from=domain, envelope_from=domain, envelope_to=("fleet.test",),
        policy_domain=domain, p="reject", sp=None, np=None, adkim="r", aspf="r", fo="0",
        testing=False, discovery_method="psl", disposition="none", overrides=(),
        dkim_aligned="pass", spf_aligned="pass", dkim=((domain, "s1", "pass"),),
        spf=(domain, "mfrom", "pass"), rua=(f"mailto:dmarc@{domain}",), ruf=())


# -- the URL ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "kind", "target"), [
    ("sqlite:////var/lib/authmilter/r.db", "sqlite", "/var/lib/authmilter/r.db"),
    ("postgresql://authmilter@db.fleet.test/reports", "postgresql",
     "postgresql://authmilter@db.fleet.test/reports"),
    ("postgres://u@127.0.0.1:5433/reports?sslmode=disable&connect_timeout=3", "postgresql",
     "postgres://u@127.0.0.1:5433/reports?sslmode=disable&connect_timeout=3"),
    ("postgresql:///reports?host=/run/postgresql", "postgresql",
     "postgresql:///reports?host=/run/postgresql"),
    ("  postgresql://u@h1:5432,h2:5433/reports ", "postgresql", "postgresql://u@h1:5432,h2:5433/reports"),
])  # fmt: skip
def test_the_url_names_the_kind_and_the_target(text: str, kind: str, target: str) -> None:
    assert parse_report_database(text) == DatabaseURL(kind, target)
    assert Config.from_text(f"Mode v\nReportDatabase {text}\n").report_database == text.strip()


@pytest.mark.parametrize(("text", "why"), [
    (f"postgresql://u:{SECRET}@db/reports?nosuch=1", r"not a valid PostgreSQL connection URI: "
                                                     r'invalid URI query parameter: "nosuch"'),
    (f"postgresql://u:{SECRET}@db:54x/reports", "'54x' is not a TCP port"),
    (f"postgresql://u@db/reports?password={SECRET}&port=0", "'0' is not a TCP port"),
    (f"mysql://u:{SECRET}@db/reports", "expected sqlite:////absolute/path.db or postgresql://"),
])  # fmt: skip
def test_a_bad_url_is_a_config_error_that_never_shows_the_password(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=rf"^authmilter.conf:2: ReportDatabase: .*{why}") as e:
        Config.from_text(f"Mode v\nReportDatabase {text}\n", path="authmilter.conf")
    assert SECRET not in str(e.value) and "***" in str(e.value)


@pytest.mark.parametrize(("text", "secrets"), [
    (f"postgresql://u:{SECRET}@db/reports", (SECRET,)),
    (f"postgres://u@db/r?password={SECRET}", (SECRET,)),
    ("postgresql://u:p%40ss@db/reports", ("p@ss", "p%40ss")),  # as written and as meant
])  # fmt: skip
def test_the_password_is_masked_wherever_the_url_is_shown(text: str,
                                                          secrets: tuple[str, ...]) -> None:
    found = parse_report_database(text)
    shown = [found.masked, str(found), repr(found), found.redact(f"x {' '.join(secrets)} y")]
    for line in shown:
        assert "***" in line and not any(secret in line for secret in secrets), line
    assert parse_report_database("sqlite:////r.db").masked == "sqlite:////r.db"


# -- the database API ---------------------------------------------------------------------------


def test_one_api_for_both_kinds(url: str) -> None:
    with store.open_database(url) as db:
        assert db.kind == url.split(":")[0]
        db.ensure_schema(["CREATE TABLE IF NOT EXISTS sent (domain TEXT PRIMARY KEY, "
                          "n INTEGER NOT NULL, note TEXT)"])  # fmt: skip
        db.ensure_schema(["CREATE TABLE IF NOT EXISTS sent (domain TEXT PRIMARY KEY, "
                          "n INTEGER NOT NULL, note TEXT)"])  # again: nothing happens
        db.executemany("INSERT INTO sent (domain, n, note) VALUES (?, ?, ?)",
                       [("a.test", 1, "50% done?"), ("b.test", 2, None)])  # fmt: skip
        rows = db.execute("SELECT domain, n, note, '?', '100%' FROM sent WHERE n >= ? "
                          "ORDER BY domain", (1,))  # fmt: skip
        assert rows == [("a.test", 1, "50% done?", "?", "100%"), ("b.test", 2, None, "?", "100%")]
        assert db.execute("UPDATE sent SET n = n + 1") == []
        with pytest.raises(RuntimeError, match="boom"), db.transaction():
            db.execute("DELETE FROM sent")
            raise RuntimeError("boom")
        assert db.execute("SELECT count(*) FROM sent") == [(2,)]  # rolled back
        with db.transaction():
            db.execute("DELETE FROM sent WHERE domain = ?", ("a.test",))
            with pytest.raises(store.DatabaseError, match="does not nest"), db.transaction():
                pass
        assert db.execute("SELECT domain, n FROM sent") == [("b.test", 3)]
        assert list(db.stream("SELECT n FROM sent WHERE n > ?", (0,), chunk=1)) == [(3,)]
        with pytest.raises(store.DatabaseError, match="nosuch"):
            db.execute("SELECT * FROM nosuch")
        assert db.execute("SELECT 1") == [(1,)]  # the connection is still usable


def test_the_events_table_has_the_columns_and_index_of_its_kind(url: str) -> None:
    store.open_database(url).close()
    with store.open_database(url) as db:
        if db.kind == "sqlite":
            columns = [(r[1], r[2]) for r in db.execute("PRAGMA table_info(dmarc_events)")]
            assert columns == [("id", "INTEGER"), ("time", "REAL"), ("policy_domain", "TEXT"),
                               ("event", "TEXT")]  # fmt: skip
            index = [r[2] for r in db.execute("PRAGMA index_info(dmarc_events_domain_time)")]
        else:
            columns = db.execute("SELECT column_name, data_type FROM information_schema.columns "
                                 "WHERE table_name = 'dmarc_events' ORDER BY ordinal_position")
            assert columns == [("id", "bigint"), ("time", "double precision"),
                               ("policy_domain", "text"), ("event", "text")]  # fmt: skip
            assert db.execute("SELECT column_default FROM information_schema.columns "
                              "WHERE table_name = 'dmarc_events' AND column_name = 'id'"
                              )[0][0].startswith("nextval(")  # fmt: skip
            index = [r[0] for r in db.execute(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                "AND a.attnum = ANY(i.indkey) WHERE i.indexrelid = "
                "'dmarc_events_domain_time'::regclass ORDER BY array_position(i.indkey, a.attnum)")]
        assert index == ["policy_domain", "time"]


def test_the_writer_writes_batches_that_read_back_equal(url: str, counted: dict[str, int]) -> None:
    events = [ev(n, domain=f"d{n % 3}.test", reporter=f"mx{n % 2}.fleet.test") for n in range(1200)]
    writer = store.ReportWriter(url, start=False)
    assert all(writer.put(e) for e in events)
    assert writer.close(timeout=60)
    assert writer.batches == [500, 500, 200]
    assert (writer.written, writer.dropped, writer.failed) == (1200, 0, 0)
    assert counted == {"written": 1200}
    assert store.read_events(url) == events
    assert list(store.iter_events(url)) == events
    d1 = [e for e in events if e.policy_domain == "d1.test"]
    assert store.read_events(url, policy_domain="D1.test.") == d1
    assert store.read_events(url, policy_domain="d1.test", since=d1[10].time,
                             until=d1[20].time) == d1[10:20]  # fmt: skip
    assert store.policy_domains(url, BEGIN, BEGIN + 86400) == ["d0.test", "d1.test", "d2.test"]
    assert store.policy_domains(url, BEGIN + 60, BEGIN + 61) == ["d1.test"]
    assert store.policy_domains(url, BEGIN + 86400 * 2) == []
    with store.open_database(url) as db:  # an open Database serves as the source too
        assert list(store.iter_events(db, policy_domain="d2.test", chunk=7)) == [
            e for e in events if e.policy_domain == "d2.test"]
        assert db.execute("SELECT count(*) FROM dmarc_events") == [(1200,)]


def test_a_database_that_is_not_there_counts_failures_and_shows_no_password(
        tmp_path: Path, counted: dict[str, int], caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("not a folder")
    port = free_port()  # nothing listens there
    for url in (f"postgresql://authmilter:{SECRET}@127.0.0.1:{port}/reports",
                f"sqlite:///{tmp_path}/file/reports.db"):  # fmt: skip
        writer = store.ReportWriter(url, start=False)
        for n in range(3):
            writer.put(ev(n))
        with caplog.at_level(logging.WARNING, logger="authmilter"):
            assert writer.close(timeout=30)
        assert (writer.written, writer.failed) == (0, 3)
    assert counted == {"failed": 6}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "cannot write 3 event(s)" in lines[0], lines
    assert f"postgresql://authmilter:***@127.0.0.1:{port}/reports" in lines[0]
    assert SECRET not in caplog.text
    with pytest.raises(store.DatabaseError, match=r"authmilter:\*\*\*@") as e:
        store.open_database(f"postgresql://authmilter:{SECRET}@127.0.0.1:{port}/reports")
    assert SECRET not in str(e.value)


def test_missing_postgresql_binaries_say_how_to_get_them(tmp_path: Path) -> None:
    (tmp_path / "15" / "bin").mkdir(parents=True)  # a version folder without initdb
    with pytest.raises(pg_fixture.PostgresMissing, match=r"initdb, pg_ctl.*run `make test`"):
        pg_fixture.find_bindir(tmp_path)


def test_reading_a_unix_socket_url(postgres_server: PostgresServer) -> None:
    url = postgres_server.socket_url()
    assert "?host=/" in url
    writer = store.ReportWriter(url, start=False)
    writer.put(ev(1, reporter="socket.fleet.test"))
    assert writer.close(timeout=30) and writer.written == 1
    got = store.read_events(url, policy_domain="example.com")
    assert got == [ev(1, reporter="socket.fleet.test")]
    with store.open_database(url) as db:
        assert db.execute("SELECT count(*) FROM dmarc_events") == [(1,)]
        db.execute("DELETE FROM dmarc_events")


# -- a fleet through Postfix --------------------------------------------------------------------

MX = ("mx1.fleet.test", "mx2.fleet.test")
CLIENTS = (OUTSIDE, "198.51.100.26")  # the outside client each MX sees (both in good.test's SPF)


@pytest.fixture(scope="module")
def nsd(nsd_server_module) -> NsdServer:  # type: ignore[no-untyped-def]
    return nsd_server_module(recording_zones())  # type: ignore[no-any-return]


class Host:
    """One MX: an authmilter (its own AuthservID) behind its own Postfix."""

    def __init__(self, name: str, nsd: NsdServer, database: str, extra: str = "") -> None:
        self.name = name
        self.milter = AuthmilterProcess(
            f"AuthservID {name}\nWorkers 2\nNameservers {nsd.nameserver}\nRejectFailures yes\n"
            f"ReportDatabase {database}\n{extra}", name=name)  # fmt: skip
        self.postfix: PostfixInstance | None = None

    def start(self) -> Host:
        self.milter.start()
        self.postfix = PostfixInstance(self.milter.postfix_socket).start()
        return self

    def send_good(self, n: int, client: str) -> None:
        assert self.postfix is not None
        for i in range(n):
            self.postfix.send(message("a@good.test", f"{self.name} {i}"), mail_from="a@good.test",
                              rcpt_to=["user@ours.test"], port="inbound", client_ip=client)

    def send_spoof(self, client: str) -> None:
        assert self.postfix is not None
        with pytest.raises(SmtpPermfail):  # p=reject, RejectFailures yes: refused at the dot
            self.postfix.send(message("boss@spoofed.test", "wire"), mail_from="x@good.test",
                              rcpt_to=["user@ours.test"], port="inbound", client_ip=client)

    def delivered(self, n: int) -> list[bytes]:
        assert self.postfix is not None
        return self.postfix.wait_delivered(n, timeout=60)

    def stop(self) -> None:
        try:
            if self.postfix is not None:
                self.postfix.stop()
        finally:
            code = self.milter.stop()  # the stopping workers flush their queues
            assert code == 0, self.milter.log()

    def cleanup(self) -> None:
        if self.postfix is not None:
            self.postfix.stop()
        self.milter.cleanup()


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    """The hosts a test starts, cleaned up however it ends."""
    made: list[Host] = []
    yield made
    for host in made:
        host.cleanup()


def parsed_counts(report: aggregate.AggregateReport) -> Counter[tuple[str, str, str]]:
    """(policy domain, source IP, disposition) → count, as parsedmarc reads the report."""
    out = parsedmarc.parse_report_file(report.to_gzip(), offline=True,
                                       always_use_local_files=True)  # fmt: skip
    assert out["report_type"] == "aggregate"
    parsed: dict[str, Any] = out["report"]
    assert parsed["report_metadata"]["org_name"] == ORG.org_name
    assert parsed["report_metadata"]["report_id"] == report.report_id
    counts: Counter[tuple[str, str, str]] = Counter()
    for r in parsed["records"]:
        counts[(parsed["policy_published"]["domain"], r["source"]["ip_address"],
                r["policy_evaluated"]["disposition"])] += r["count"]  # fmt: skip
    return counts


@pytest.mark.dns
@pytest.mark.parametrize("kind", KINDS)
def test_two_mx_hosts_write_one_database_and_one_run_merges_them(
        kind: str, nsd: NsdServer, hosts: list[Host], tmp_path: Path,
        request: pytest.FixtureRequest) -> None:  # fmt: skip
    """Two milters, each behind its own Postfix and with its own AuthservID, share one
    ReportDatabase; one read of the day and one daily_reports give one report per policy
    domain with both hosts' messages counted, and parsedmarc reads the sums that were sent."""
    if kind == "sqlite":
        database = f"sqlite:///{tmp_path}/fleet.db"
    else:
        database = str(request.getfixturevalue("postgres_url"))
    sent = {MX[0]: 3, MX[1]: 2}
    for name in MX:
        hosts.append(Host(name, nsd, database).start())
    for host, client in zip(hosts, CLIENTS, strict=True):
        host.send_good(sent[host.name], client)
        host.send_spoof(client)
    for host in hosts:
        for raw in host.delivered(sent[host.name]):
            assert b"dmarc=pass" in raw
        host.stop()

    events = store.read_events(database)
    assert Counter(e.reporter for e in events) == {MX[0]: 4, MX[1]: 3}
    days = sorted({dt.datetime.fromtimestamp(e.time, dt.UTC).date() for e in events})
    assert 1 <= len(days) <= 2  # two only when the test ran across midnight UTC
    expected: Counter[tuple[str, str, str]] = Counter()
    for name, client in zip(MX, CLIENTS, strict=True):
        expected[("good.test", client, "none")] += sent[name]
        expected[("spoofed.test", client, "reject")] += 1
    got: Counter[tuple[str, str, str]] = Counter()
    for day in days:
        reports = aggregate.daily_reports(events, day, ORG)
        domains = [r.policy.domain for r in reports]
        assert len(domains) == len(set(domains)), domains  # one report per domain and day
        for report in reports:
            begin, end = aggregate.day_bounds(day)
            reporters = {e.reporter for e in events if e.policy_domain == report.policy.domain
                         and begin <= e.time <= end}  # fmt: skip
            assert report.report_id == aggregate.report_id(ORG, report.policy.domain, begin, end,
                                                           reporters)  # fmt: skip
            got += parsed_counts(report)
    assert got == expected
    if len(days) == 1:  # the usual case: both hosts in the same two reports
        reports = aggregate.daily_reports(events, days[0], ORG)
        assert [r.policy.domain for r in reports] == ["good.test", "spoofed.test"]
        assert sum(r.count for r in reports[0].records) == 5


def scrape(url: str) -> dict[str, float]:
    """``authmilter_report_records_total`` by outcome, from the metrics endpoint."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "authmilter_report_records_total":
                out[sample.labels["outcome"]] = sample.value
    return out


@pytest.mark.dns
def test_a_stopped_postgresql_costs_no_mail_and_is_written_again_once_back(
        nsd: NsdServer, hosts: list[Host]) -> None:  # fmt: skip
    """pg_ctl stop under a running milter: the mail is delivered all the same and its records
    are counted as failed; after pg_ctl start new records are written again."""
    server = pg_fixture.start_server()
    try:
        port = free_port()
        # Trust authentication ignores the password: it is there to be kept out of the log.
        database = f"postgresql://authmilter:{SECRET}@127.0.0.1:{server.port}/reports"
        host = Host(MX[0], nsd, database, f"MetricsListen 127.0.0.1:{port}\n")
        hosts.append(host.start())
        host.milter.wait_log("metrics on http://127.0.0.1:")
        endpoint = f"http://127.0.0.1:{port}/metrics"
        before, down, after = "198.51.100.30", "198.51.100.31", "198.51.100.32"

        host.send_good(2, before)
        assert len(host.delivered(2)) == 2
        assert wait_until(lambda: scrape(endpoint).get("written") == 2), scrape(endpoint)

        server.stop()
        host.send_good(3, down)
        delivered = host.delivered(5)
        assert len(delivered) == 5 and all(b"dmarc=pass" in raw for raw in delivered[2:])
        assert wait_until(lambda: scrape(endpoint).get("failed") == 3), scrape(endpoint)

        server.start()
        host.send_good(2, after)
        assert len(host.delivered(7)) == 7
        assert wait_until(lambda: scrape(endpoint).get("written") == 4), scrape(endpoint)
        assert scrape(endpoint) == {"written": 4, "failed": 3, "dropped": 0}
        host.stop()

        events = store.read_events(database)
        assert Counter(e.source_ip for e in events) == {before: 2, after: 2}
        log = host.milter.log()
        assert "cannot write" in log and "authmilter:***@127.0.0.1" in log
        assert SECRET not in log
    finally:
        server.cleanup()


def test_sqlite_rows_stay_readable_with_the_standard_library(tmp_path: Path) -> None:
    """The SQLite file is plain: any sqlite3 client reads what the writer wrote."""
    url = f"sqlite:///{tmp_path}/reports.db"
    writer = store.ReportWriter(url, start=False)
    writer.put(ev(1))
    assert writer.close(timeout=30)
    rows = sqlite3.connect(tmp_path / "reports.db").execute(
        "SELECT time, policy_domain, event FROM dmarc_events").fetchall()
    assert rows == [(ev(1).time, "example.com",
                     json.dumps(ev(1).to_json(), separators=(",", ":")))]  # fmt: skip


def test_the_report_build_benchmark_runs() -> None:
    """bench/report_build.py must not rot: a small run of both backends and both ways, each
    build counting every event once (the script checks it) into one report per domain."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "report_build.py"
    proc = subprocess.run([sys.executable, str(bench), "--records", "3000", "--domains", "20"],
                          capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    builds = [line.split("|")[1:-1] for line in proc.stdout.splitlines()
              if line.startswith("| ") and ("per-domain" in line or "all-at-once" in line)]
    assert [(b[0].strip(), b[1].strip(), b[2].strip(), b[3].strip()) for b in builds] == [
        (backend, mode, "20", "3,000") for backend in KINDS
        for mode in ("per-domain", "all-at-once")]  # fmt: skip
