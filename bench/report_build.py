#!/usr/bin/env python3
"""How long building a day's DMARC aggregate reports takes from 1 M recorded events, in SQLite
and in PostgreSQL (docs/performance.md, "Building aggregate reports from 1 M records").

1. Make ``--records`` synthetic events (1,000,000 by default) of one UTC day: ``--domains``
   policy domains (200) whose traffic follows a Zipf law (the largest has about a sixth of it),
   each with its own pool of sending addresses (IPv4 and IPv6), four reporting MX hosts, DKIM
   and SPF passes, forwarded mail that breaks SPF alignment, and spoofs from random addresses
   dispositioned by each domain's policy. Seeded: every run makes the same events.
2. Load them with the project's own API (:func:`authmilter.reports.store.open_database`,
   ``executemany`` in transactions of 10,000 rows) into a fresh SQLite file and into a private
   PostgreSQL (``tests/pg_fixture.py``: initdb in a temporary folder, loopback only,
   PostgreSQL's default settings), then ``ANALYZE`` (``VACUUM ANALYZE`` on PostgreSQL), as a
   database that has been in service would be.
3. Build every report of the day, once per backend and way, each in a fresh process so its
   peak RSS is its own: ``streamed`` (one connection; :func:`store.policy_domains`, then per
   domain :func:`store.iter_events` streamed into :func:`aggregate.build_report`, which holds
   the grouped records and never the events: the way ``authmilter reports send`` goes; its
   reading and grouping are one pass, shown as "aggregate"), ``per-domain`` (the same, but each
   domain's events read into a list first with :func:`store.read_events`, then
   :func:`aggregate.daily_reports`) and ``all-at-once`` (one ``read_events`` of the whole day,
   then ``daily_reports``); all end with ``to_gzip`` of every report. Each build checks that
   its reports count every event exactly once.

One run of each, bounded by ``--records`` (at most 1,000,000). Nothing leaves the machine;
the temporary folders and the PostgreSQL server are removed at the end.

    .venv/bin/python bench/report_build.py                  # the documented run (minutes)
    .venv/bin/python bench/report_build.py --records 20000  # a quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (REPO / "milter", REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from authmilter.reports import aggregate, store  # noqa: E402
from authmilter.reports.record import DmarcEvent  # noqa: E402

DAY = dt.date(2026, 3, 14)
BEGIN, _END = aggregate.day_bounds(DAY)
ORG = aggregate.ReportingOrg("Bench Receiver", "receiver.example", "dmarc@receiver.example")
MAX_RECORDS = 1_000_000
LOAD_BATCH = 10_000
MODES = ("streamed", "per-domain", "all-at-once")
REPORTERS = tuple(f"mx{n}.receiver.example" for n in range(1, 5))
RECIPIENT_DOMAINS = tuple(f"dept{n}.receiver.example" for n in range(12))
FORWARDERS = ("lists.forward.example", "alumni.forward.example", "relay.forward.example")


# -- the events ---------------------------------------------------------------------------------


class Domain:
    """One sending organisation: its policy and the addresses it sends from."""

    def __init__(self, rank: int, rng: random.Random) -> None:
        self.name = f"{rng.choice(('shop', 'bank', 'news', 'mail', 'corp'))}{rank:03d}.example"
        self.p = rng.choices(("none", "quarantine", "reject"), (5, 2, 3))[0]
        self.pool: list[str] = []
        size = max(2, int(600 / (rank + 1)))
        base = rng.randrange(1, 223)
        for i in range(size):
            if rng.random() < 0.15:
                self.pool.append(f"2001:db8:{rank:x}:{i:x}::{rng.randrange(1, 0xFFFF):x}")
            else:
                self.pool.append(f"{base}.{rng.randrange(256)}.{rng.randrange(256)}."
                                 f"{rng.randrange(1, 255)}")  # fmt: skip


def events(n: int, domains: int, seed: int = 20260314) -> Iterator[DmarcEvent]:
    """``n`` events of :data:`DAY`, in time order."""
    rng = random.Random(seed)
    orgs = [Domain(rank, rng) for rank in range(domains)]
    weights = [1 / (rank + 1) for rank in range(domains)]
    for i in range(n):
        org = rng.choices(orgs, weights)[0]
        common: dict[str, Any] = dict(
            time=BEGIN + (i + rng.random()) * 86400 / n, reporter=rng.choice(REPORTERS),
            header_from=org.name, envelope_to=(rng.choice(RECIPIENT_DOMAINS),),
            policy_domain=org.name, p=org.p, sp=None, np=None, adkim="r", aspf="r", fo="0",
            testing=False, discovery_method="psl", rua=(f"mailto:dmarc@{org.name}",), ruf=())
        kind = rng.random()
        if kind < 0.90:  # its own mail: DKIM and SPF pass and align
            yield DmarcEvent(
                **common, source_ip=rng.choice(org.pool), envelope_from=org.name,
                disposition="none", overrides=(), dkim_aligned="pass", spf_aligned="pass",
                dkim=((org.name, rng.choice(("s1", "s2")), "pass"),),
                spf=(org.name, "mfrom", "pass"))  # fmt: skip
        elif kind < 0.96:  # forwarded: the list's SPF, the author's signature survives or not
            forwarder = rng.choice(FORWARDERS)
            intact = rng.random() < 0.7
            # A broken one fails DMARC; the receiver lets it through as list mail.
            override = () if intact or org.p == "none" else (("mailing_list", forwarder),)
            yield DmarcEvent(
                **common, source_ip=f"203.0.113.{rng.randrange(1, 60)}",
                envelope_from=forwarder, disposition="none", overrides=override,
                dkim_aligned="pass" if intact else "fail", spf_aligned="fail",
                dkim=((org.name, "s1", "pass" if intact else "fail"), (forwarder, "l", "pass")),
                spf=(forwarder, "mfrom", "pass"))  # fmt: skip
        else:  # spoofed, from anywhere
            ip = f"{rng.randrange(1, 223)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"  # noqa: E501
            yield DmarcEvent(
                **common, source_ip=ip, envelope_from=f"bulk{rng.randrange(50)}.spam.example",
                disposition=org.p, overrides=(), dkim_aligned="fail", spf_aligned="fail",
                dkim=(), spf=(f"bulk{rng.randrange(50)}.spam.example", "mfrom",
                              rng.choice(("pass", "softfail", "none"))))  # fmt: skip


def rows(n: int, domains: int) -> list[tuple[float, str, str]]:
    """The events as the writer stores them (time, policy domain, JSON)."""
    return [(e.time, e.policy_domain, json.dumps(e.to_json(), separators=(",", ":")))
            for e in events(n, domains)]  # fmt: skip


def load(url: str, data: list[tuple[float, str, str]]) -> float:
    """Insert ``data`` as the writer does, in transactions of :data:`LOAD_BATCH`; seconds."""
    started = time.perf_counter()
    with store.open_database(url) as db:
        for at in range(0, len(data), LOAD_BATCH):
            with db.transaction():
                db.executemany("INSERT INTO dmarc_events (time, policy_domain, event) "
                               "VALUES (?, ?, ?)", data[at:at + LOAD_BATCH])  # fmt: skip
        seconds = time.perf_counter() - started
        db.execute("VACUUM ANALYZE dmarc_events" if db.kind == "postgresql" else "ANALYZE")
    return seconds


def size_mib(url: str) -> float:
    with store.open_database(url, readonly=True) as db:
        if db.kind == "postgresql":
            return float(db.execute("SELECT pg_total_relation_size('dmarc_events')")[0][0]) / 2**20
    path = Path(url.removeprefix("sqlite://"))
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 2**20


# -- one build (run in a process of its own) ----------------------------------------------------


def build(url: str, mode: str) -> dict[str, Any]:
    """Build and gzip every report of :data:`DAY`; timings, counts and peak RSS."""
    times = {"read": 0.0, "aggregate": 0.0, "gzip": 0.0}
    cpu = time.process_time()
    started = time.perf_counter()
    reports: list[aggregate.AggregateReport] = []
    gz = 0

    def finish(built: list[aggregate.AggregateReport]) -> None:
        nonlocal gz
        t = time.perf_counter()
        gz += sum(len(r.to_gzip()) for r in built)
        times["gzip"] += time.perf_counter() - t
        reports.extend(built)

    end = float(BEGIN + aggregate.DAY_SECONDS)
    if mode == "streamed":  # as `reports send`: per domain, events streamed into the builder
        t = time.perf_counter()
        db = store.open_database(url, readonly=True)
        domains = store.policy_domains(db, float(BEGIN), end)
        times["read"] += time.perf_counter() - t
        for domain in domains:
            t = time.perf_counter()
            stream = store.iter_events(db, policy_domain=domain, since=BEGIN, until=end)
            built = [aggregate.build_report(stream, ORG, BEGIN, _END)]
            times["aggregate"] += time.perf_counter() - t  # reading and grouping, one pass
            finish(built)
        db.close()
    elif mode == "per-domain":  # one connection for the run, one query per domain
        t = time.perf_counter()
        db = store.open_database(url, readonly=True)
        domains = store.policy_domains(db, float(BEGIN), end)
        times["read"] += time.perf_counter() - t
        for domain in domains:
            t = time.perf_counter()
            day_events = store.read_events(db, policy_domain=domain, since=BEGIN, until=end)
            times["read"] += time.perf_counter() - t
            t = time.perf_counter()
            built = aggregate.daily_reports(day_events, DAY, ORG)
            times["aggregate"] += time.perf_counter() - t
            del day_events
            finish(built)
        db.close()
    else:
        t = time.perf_counter()
        day_events = store.read_events(url, since=BEGIN, until=end)
        times["read"] += time.perf_counter() - t
        t = time.perf_counter()
        built = aggregate.daily_reports(day_events, DAY, ORG)
        times["aggregate"] += time.perf_counter() - t
        del day_events
        finish(built)
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
        **{f"{k}_seconds": v for k, v in times.items()},
        "maxrss_mib": _peak_rss_mib(),
        "reports": len(reports),
        "records": sum(r.count for report in reports for r in report.records),
        "rows": sum(len(report.records) for report in reports),
        "gzip_bytes": gz,
    }


def _peak_rss_mib() -> float:
    """This process's peak RSS (``VmHWM``). Not ``getrusage``'s ``ru_maxrss``: Linux keeps that
    across ``execve``, so a child would report the parent's peak (the parent holds the
    million rows it loaded)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_in_child(url: str, mode: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--build", url, "--mode", mode],
                          capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"the {mode} build from {url} failed:\n{proc.stdout}{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


# -- the run ------------------------------------------------------------------------------------


def machine(pg_version: str | None) -> list[str]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    debian = "?"
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("PRETTY_NAME="):
            debian = line.split("=", 1)[1].strip('"')
    import psycopg

    return [
        f"Machine: {os.cpu_count()} CPUs ({cpu}), {mem:.1f} GiB, Linux {platform.release()}, "
        f"{debian}; load average before the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        f"Software: Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"PostgreSQL {pg_version or '-'}, psycopg {psycopg.__version__} "
        f"({psycopg.pq.__impl__}, libpq {psycopg.pq.version()}).",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=MAX_RECORDS)
    parser.add_argument("--domains", type=int, default=200)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--build", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        print(json.dumps(build(args.build, args.mode)))
        return 0
    if not 0 < args.records <= MAX_RECORDS or not 0 < args.domains <= args.records:
        parser.error(f"--records: 1 to {MAX_RECORDS:,}; --domains: 1 to --records")
    backends = args.backends.split(",")
    modes = args.modes.split(",")

    from pg_fixture import PostgresServer

    started = time.perf_counter()
    t = time.perf_counter()
    data = rows(args.records, args.domains)
    made = time.perf_counter() - t
    print(f"made {len(data):,} events of {args.domains} policy domains in {made:.1f} s",
          flush=True)  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="authmilter-report-bench-"))
    server: PostgresServer | None = None
    loads: list[tuple[str, float, float]] = []
    builds: list[tuple[str, str, dict[str, Any]]] = []
    pg_version = None
    try:
        for backend in backends:
            if backend == "sqlite":
                url = f"sqlite:///{folder}/reports.db"
            elif backend == "postgresql":
                server = PostgresServer().start()
                url = server.url()
                with store.open_database(url) as db:
                    pg_version = str(db.execute("SHOW server_version")[0][0])
            else:
                parser.error(f"unknown backend {backend!r}")
            seconds = load(url, data)
            loads.append((backend, seconds, size_mib(url)))
            print(f"{backend}: loaded in {seconds:.1f} s", flush=True)
            for mode in modes:
                result = build_in_child(url, mode)
                if result["records"] != len(data) or result["reports"] != args.domains:
                    raise SystemExit(f"{backend} {mode}: {result['reports']} reports counting "
                                     f"{result['records']} events, expected {args.domains} and "
                                     f"{len(data)}")  # fmt: skip
                builds.append((backend, mode, result))
                print(f"{backend} {mode}: {result['seconds']:.1f} s", flush=True)
            if server is not None:
                server.cleanup()
                server = None
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)
    del data

    print()
    print(f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
          f"{time.perf_counter() - started:.0f} s in all.")  # fmt: skip
    for line in machine(pg_version):
        print(line)
    print()
    distinct = builds[0][2]["rows"] if builds else 0
    print(f"{args.records:,} events, {args.domains} policy domains, one UTC day; "
          f"{distinct:,} report records (distinct rows) in all.")  # fmt: skip
    print()
    print("| backend | load (s) | rows/s | table + index (MiB) |")
    print("| --- | --- | --- | --- |")
    for backend, seconds, mib in loads:
        print(f"| {backend} | {seconds:.1f} | {args.records / seconds:,.0f} | {mib:.0f} |")
    print()
    print("| backend | build | reports | events | wall (s) | read (s) | aggregate (s) | gzip (s) "
          "| CPU (s) | peak RSS (MiB) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for backend, mode, r in builds:
        print(f"| {backend} | {mode} | {r['reports']} | {r['records']:,} | {r['seconds']:.1f} | "
              f"{r['read_seconds']:.1f} | {r['aggregate_seconds']:.1f} | "
              f"{r['gzip_seconds']:.2f} | {r['cpu_seconds']:.1f} | {r['maxrss_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
