"""Aggregate reports end to end, with real parts only: mail from outside goes through a real
Postfix to ``authmilter run`` (DMARC against a real NSD) and is recorded in SQLite; then
``reports send`` builds the day's reports, checks the rua destinations in that DNS and submits
them to the same Postfix, whose milter (the same authmilter) DKIM-signs them on the way out to
the sink. Each delivered report must verify with dkimpy and be read by parsedmarc with the
counts that were sent; a destination without a verification record gets nothing; a recipient
the MTA refuses is recorded, not retried; report mail itself is never recorded."""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import parsedmarc
import pytest

from authmilter.cli import main as authmilter_main
from authmilter.config import Config
from authmilter.dmarc import PublicSuffix
from authmilter.reports import send, store
from authmilter.reports.aggregate import DAY_SECONDS
from authmilter.resolver import Resolver
from dnsserver import NsdServer, make_zone
from helpers import OUTSIDE, message, only_signature
from milter_fixture import AuthmilterProcess, write_keytable
from postfix_fixture import PostfixInstance, SmtpPermfail, new_socket_dir

RECEIVER = "reports.receiver.test"
SENDER = f"dmarc@{RECEIVER}"
SPF = '"v=spf1 ip4:198.51.100.0/24 -all"'


@dataclass
class World:
    dir: Path
    nsd: NsdServer
    keytable_conf: str


@pytest.fixture(scope="module")
def world(nsd_server_module) -> Iterator[World]:  # type: ignore[no-untyped-def]
    directory = new_socket_dir("reports-e2e-")
    assert authmilter_main(["genkey", "-D", str(directory), "-d", RECEIVER, "-s", "rep"]) == 0
    nsd = nsd_server_module({
        RECEIVER: make_zone(RECEIVER, raw=(directory / "rep.txt").read_text()),
        "good.test": make_zone("good.test", [
            ("@", "TXT", SPF),
            ("_dmarc", "TXT", '"v=DMARC1; p=none; rua=mailto:agg@good.test"'),
        ]),
        "brand.test": make_zone("brand.test", [
            ("@", "TXT", SPF),
            ("_dmarc", "TXT", '"v=DMARC1; p=reject; rua=mailto:dmarc@reports.vendor.test"'),
        ]),
        "vendor.test": make_zone("vendor.test", [
            ("*._report._dmarc.reports", "TXT", '"v=DMARC1"'),  # a wildcard verification
        ]),
        "hidden.test": make_zone("hidden.test", [
            ("@", "TXT", SPF),
            ("_dmarc", "TXT", '"v=DMARC1; p=none; rua=mailto:agg@nowhere.vendor.test"'),
        ]),
        "bounce.test": make_zone("bounce.test", [
            ("@", "TXT", SPF),
            ("_dmarc", "TXT",
             '"v=DMARC1; p=none; rua=mailto:nobody@bounce.test,mailto:agg@bounce.test"'),
        ]),
    })  # fmt: skip
    conf = write_keytable(directory, {"rep": (RECEIVER, "rep", directory / "rep.private")},
                          [(f"*@{RECEIVER}", "rep")])  # fmt: skip
    yield World(directory, nsd, conf)
    shutil.rmtree(directory, ignore_errors=True)


def rows(url: str) -> int:
    if not Path(url.removeprefix("sqlite://")).exists():
        return 0  # no worker has written yet
    return len(store.read_events(url))


def test_reports_are_built_signed_delivered_and_read_by_parsedmarc(world: World) -> None:
    db = world.dir / "dmarc.db"
    url = f"sqlite:///{db}"
    milter = AuthmilterProcess(
        f"AuthservID mx1.receiver.test\nNameservers {world.nsd.nameserver}\nRejectFailures yes\n"
        f"ReportDatabase {url}\nReportSender {SENDER}\n{world.keytable_conf}").start()
    postfix = PostfixInstance(milter.postfix_socket, main_cf={
        # The MTA refuses one rua address at RCPT: the run must record it and go on.
        "smtpd_recipient_restrictions":
            "check_recipient_access inline:{ { nobody@bounce.test = REJECT no such mailbox } }",
    }).start()  # fmt: skip
    try:
        sent = Counter[tuple[str, str]]()
        for domain, n in (("good.test", 3), ("hidden.test", 1), ("bounce.test", 1)):
            for i in range(n):
                postfix.send(message(f"a@{domain}", f"{domain} {i}"), mail_from=f"a@{domain}",
                             rcpt_to=["user@ours.test"], port="inbound", client_ip=OUTSIDE)
                sent[(domain, "none")] += 1
        with pytest.raises(SmtpPermfail):  # a spoof of brand.test: rejected, and recorded
            postfix.send(message("ceo@brand.test", "wire"), mail_from="x@good.test",
                         rcpt_to=["user@ours.test"], port="inbound", client_ip=OUTSIDE)
        sent[("brand.test", "reject")] += 1
        # Report mail is never recorded: here a message to ReportSender (a bounce, say).
        postfix.send(message("a@good.test", "to the report sender"), mail_from="a@good.test",
                     rcpt_to=[SENDER], port="inbound", client_ip=OUTSIDE)
        postfix.wait_delivered(6, timeout=60)
        deadline = time.monotonic() + 30
        while rows(url) < sum(sent.values()) and time.monotonic() < deadline:
            time.sleep(0.2)  # the workers' writers commit within a second
        time.sleep(1.5)
        assert rows(url) == sum(sent.values())  # 6: not the message to ReportSender
        before = len(postfix.sink.deliveries())

        cfg = Config.from_text(f"ReportDatabase {url}\nReportSender {SENDER}\n"
                               f"ReportSMTPServer 127.0.0.1:{postfix.submit_port}\n"
                               "ReportSendRate 0\n")  # fmt: skip
        resolver = Resolver([world.nsd.nameserver], timeout=2)
        tomorrow = time.time() + DAY_SECONDS + send.GRACE_SECONDS + 60
        summary = send.run(cfg, resolver, PublicSuffix().org_domain, now=tomorrow)
        assert sorted(d for _day, d, _ in summary.sent) == ["bounce.test", "brand.test",
                                                            "good.test"]  # fmt: skip
        assert [(d, w.split(":")[0]) for _day, d, w in summary.skipped] == [
            ("hidden.test", "no rua destination left")]
        assert summary.deferred == [] and summary.failed == []
        (bounce,) = [r for r in send.queue_rows(url) if r["policy_domain"] == "bounce.test"]
        refused = bounce["outcome"]["refused"]
        assert bounce["state"] == "sent" and refused["nobody@bounce.test"][0] == 554
        delivered = postfix.sink.wait(before + 3, timeout=60)
        assert delivered is not None, postfix.sink.deliveries()
        reports = delivered[before:]
        assert sorted(r for d in reports for r in d.rcpt_to) == [
            "agg@bounce.test", "agg@good.test", "dmarc@reports.vendor.test"]
        counts = Counter[tuple[str, str]]()
        for d in reports:
            assert only_signature(d.data, resolver.dkimpy_dnsfunc) == (RECEIVER, "rep")
            parsed = parsedmarc.parse_report_file(d.data, offline=True,
                                                  always_use_local_files=True)  # fmt: skip
            assert parsed["report_type"] == "aggregate"
            report = parsed["report"]
            assert report["report_metadata"]["org_email"] == SENDER
            domain = report["policy_published"]["domain"]
            for record in report["records"]:
                assert record["source"]["ip_address"] == OUTSIDE
                counts[(domain, record["policy_evaluated"]["disposition"])] += record["count"]
        assert counts == sent - Counter({("hidden.test", "none"): 1})
        # A second run sends nothing more; the day is done.
        again = send.run(cfg, resolver, PublicSuffix().org_domain, now=tomorrow + 3600)
        assert (again.queued, again.sent) == ([], [])
    finally:
        postfix.stop()
        milter.cleanup()


def test_a_sendmail_program_as_report_smtp_server(tmp_path: Path) -> None:
    """ReportSMTPServer /path/to/sendmail: Postfix's own sendmail (pointed at the test
    instance with -C) takes the report; it arrives at the sink. A program that fails is a
    permanent SubmitError (exit 75, EX_TEMPFAIL, would be temporary)."""
    from email.message import EmailMessage

    from authmilter.reports.submit import SubmitError, submit

    postfix = PostfixInstance(None).start()
    try:
        wrapper = tmp_path / "sendmail"
        wrapper.write_text(f'#!/bin/sh\nexec /usr/sbin/sendmail -C {postfix.config_dir} "$@"\n')
        wrapper.chmod(0o755)
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = SENDER, "agg@good.test", "Report Domain: x"
        msg.set_content("report\n")
        done = submit(msg, SENDER, ["agg@good.test"], str(wrapper))
        assert done.accepted == ("agg@good.test",) and done.refused == {}
        delivered = postfix.sink.wait(1, timeout=60)
        assert delivered is not None and delivered[0].rcpt_to == ("agg@good.test",)
        assert delivered[0].mail_from == SENDER and b"Report Domain: x" in delivered[0].data
        with pytest.raises(SubmitError) as failed:
            submit(msg, SENDER, ["agg@good.test"], "/bin/false")
        assert not failed.value.temporary
    finally:
        postfix.stop()
