"""``authmilter reports send`` and ``authmilter reports show``.

Both read the configuration exactly as ``authmilter run`` does (``-c FILE``, or a user's
``--opendkim-conf`` / ``--opendmarc-conf`` / ``--policyd-spf-conf``), so the database, the
resolver and the organizational-domain method are the milter's own; started as root, they run
as its ``UserID``, as the workers that write the database do.

``show`` is where a postmaster looks first: per policy domain and source IP, the messages of the
last days and how many passed DMARC, failed it, were quarantined and were rejected. With
``--queue`` it lists the aggregate report send queue instead (state, attempts, last error).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

from authmilter.config import Config
from authmilter.reports.record import DmarcEvent

__all__ = ["ShowRow", "add_reports_parser", "show_rows"]


def add_reports_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                       add_config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """``authmilter reports send|show``."""
    reports = sub.add_parser("reports", help="DMARC aggregate reports: send, show")
    rsub = reports.add_subparsers(dest="reports_command", metavar="ACTION")
    rsub.required = True

    send = rsub.add_parser("send", help="queue and send the aggregate reports of complete UTC "
                                        "days (run it from the timer or cron)")  # fmt: skip
    add_config_args(send)
    send.add_argument("--period", metavar="YYYY-MM-DD", type=_day,
                      help="build and send this UTC day again (a resend: same report ids and "
                           "bytes); with --dry-run it may be the current day")  # fmt: skip
    send.add_argument("--dry-run", action="store_true",
                      help="change nothing and send nothing; say what would be sent")
    send.add_argument("--out", metavar="DIR",
                      help="with --dry-run: write each report's .xml.gz and message here")
    send.set_defaults(func=cmd_send)

    show = rsub.add_parser("show", help="per domain and source IP: pass, fail, quarantine, "
                                        "reject counts")  # fmt: skip
    add_config_args(show)
    show.add_argument("--domain", help="only this policy domain")
    show.add_argument("--days", type=int, default=1,
                      help="the last N days (24 hours each, up to now); default 1")
    show.add_argument("--queue", action="store_true",
                      help="list the aggregate report send queue instead")
    show.set_defaults(func=cmd_show)


def _day(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day written YYYY-MM-DD") from None


def _as_user_id(cfg: Config) -> None:
    """Started as root, become the ``UserID`` user, as the workers that write the database
    are: a database file (or SQLite's ``-wal``/``-shm``) made by root would lock them out."""
    from authmilter.config import user_id_account
    from authmilter.server import drop_privileges

    if os.geteuid() != 0:
        return
    account = user_id_account(cfg)
    if account is not None:
        drop_privileges(account)


def cmd_send(ns: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """``authmilter reports send``."""
    from authmilter.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, load_from_args
    from authmilter.dmarc import org_domain_finder
    from authmilter.reports import send
    from authmilter.resolver import config_resolver

    if ns.out and not ns.dry_run:
        print("authmilter: reports send: --out needs --dry-run", file=err)
        return EXIT_USAGE
    cfg = load_from_args(ns, err).config
    _as_user_id(cfg)
    resolver = config_resolver(cfg)
    org_domain = org_domain_finder(cfg.organizational_domain_method, cfg.public_suffix_list,
                                   resolver)  # fmt: skip
    summary = send.run(cfg, resolver, org_domain, period=ns.period, dry_run=ns.dry_run,
                       out=ns.out)  # fmt: skip
    for line in summary.lines():
        print(line, file=out)
    if not summary.lines():
        print("nothing to send", file=out)
    return EXIT_FAILURE if summary.failed else EXIT_OK


@dataclass(frozen=True, slots=True)
class ShowRow:
    """One line of ``reports show``."""

    policy_domain: str
    source_ip: str
    messages: int
    passed: int
    failed: int
    quarantined: int
    rejected: int


def show_rows(events: Iterable[DmarcEvent]) -> list[ShowRow]:
    """Counts per (policy domain, source IP), busiest source first within a domain."""
    counts: dict[tuple[str, str], list[int]] = {}
    for e in events:
        c = counts.setdefault((e.policy_domain, e.source_ip), [0, 0, 0, 0, 0])
        c[0] += 1
        if e.dkim_aligned == "pass" or e.spf_aligned == "pass":
            c[1] += 1
        else:
            c[2] += 1
        c[3] += e.disposition == "quarantine"
        c[4] += e.disposition == "reject"
    rows = [ShowRow(d, ip, *c) for (d, ip), c in counts.items()]
    rows.sort(key=lambda r: (r.policy_domain, -r.messages, r.source_ip))
    return rows


def cmd_show(ns: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """``authmilter reports show``."""
    from authmilter.cli import EXIT_OK, EXIT_USAGE, load_from_args
    from authmilter.reports import send, store

    if ns.days < 1:
        print("authmilter: reports show: --days must be 1 or more", file=err)
        return EXIT_USAGE
    cfg = load_from_args(ns, err).config
    _as_user_id(cfg)
    url = send.database_url(cfg)
    if ns.queue:
        print(f"{'day':<10}  {'policy domain':<30} {'state':<8} {'tries':>5}  detail", file=out)
        for row in send.queue_rows(url):
            if ns.domain and row["policy_domain"] != ns.domain.lower().rstrip("."):
                continue
            outcome = row["outcome"]
            detail = (outcome.get("skipped") or outcome.get("last_error")
                      or ", ".join(row["envelope_to"]))  # fmt: skip
            print(f"{row['day']:<10}  {row['policy_domain']:<30} {row['state']:<8} "
                  f"{row['attempts']:>5}  {detail}", file=out)  # fmt: skip
        return EXIT_OK
    now = time.time()
    rows = show_rows(store.iter_events(url, policy_domain=ns.domain,  # streamed: counts only
                                       since=now - ns.days * 86400.0, until=now + 1))
    print(f"{'policy domain':<30} {'source IP':<39} {'msgs':>7} {'pass':>7} {'fail':>7} "
          f"{'quar':>7} {'reject':>7}", file=out)  # fmt: skip
    for r in rows:
        print(f"{r.policy_domain:<30} {r.source_ip:<39} {r.messages:>7} {r.passed:>7} "
              f"{r.failed:>7} {r.quarantined:>7} {r.rejected:>7}", file=out)  # fmt: skip
    if not rows:
        print(f"(no DMARC-evaluated messages recorded in the last {ns.days} day(s))", file=out)
    return EXIT_OK
