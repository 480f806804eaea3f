"""DMARC failure reports (FailureReports, RFC 9991 / AFRF): when one is due, what it holds, the
rate limit, the sending thread (a real SMTP sink, real destination checks over the fake
resolver), and end to end through Postfix, ``authmilter run`` and NSD: the report leaves
through the local MTA, DKIM-signed by our own milter."""

from __future__ import annotations

import email
import email.policy
import email.utils
import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage, Message
from pathlib import Path

import dkim
import parsedmarc
import pytest

from authmilter.cli import main as authmilter_main
from authmilter.config import Config
from authmilter.dmarc import PublicSuffix
from authmilter.reports import failure
from authmilter.reports.record import DmarcEvent, MessageContext
from authmilter.resolver import Resolver
from dnsserver import NsdServer, make_zone
from fakedns import ZoneResolver, failure_marker
from helpers import OUTSIDE, message
from milter_fixture import AuthmilterProcess, write_keytable
from postfix_fixture import PostfixInstance, SmtpPermfail, SmtpSink, free_port, new_socket_dir

BANK = "bank.test"
NOW = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC
PSL = PublicSuffix(None)

# Local parts that must not survive redaction, and the message they are in.
SECRETS = ("alice.smith", "bob", "bounce-77", "carol", "dave", "eve")
HEADERS = (
    ("Received", "from mail.evil.test (mail.evil.test [198.51.100.25]) by mx.ours.test "
                 "(Postfix) with ESMTP id 4ABC for <bob@ours.test>; "
                 "Thu, 01 Jan 2026 00:00:00 +0000"),
    ("DKIM-Signature", f"v=1; a=rsa-sha256; d={BANK}; s=sel; i=alice.smith@{BANK}; "
                       "h=from:to:subject; bh=AAAA; b=BBBB"),
    ("From", f'"Alice Smith" <alice.smith@{BANK}>'),
    ("To", "bob@ours.test, \"Carol Q\" <carol@ours.test>"),
    ("Cc", '"dave"@ours.test'),
    ("Reply-To", "eve@evil.test"),
    ("Subject", "Please wire the money"),
    ("Date", "Thu, 01 Jan 2026 00:00:00 +0000"),
    ("Message-ID", "<id.1234@mail.evil.test>"),
)  # fmt: skip


def event(**changes: object) -> DmarcEvent:
    """A spoof of bank.test (p=reject, fo=1, ruf at bank.test): a bank.test signature that
    fails, the attacker's own that passes, SPF passes for the attacker's MAIL FROM."""
    fields: dict[str, object] = dict(
        time=NOW, reporter="mx.ours.test", source_ip="198.51.100.25", header_from=BANK,
        envelope_from="evil.test", envelope_to=("ours.test",), policy_domain=BANK, p="reject",
        sp=None, np=None, adkim="r", aspf="r", fo="1", testing=False, discovery_method="psl",
        disposition="reject", overrides=(), dkim_aligned="fail", spf_aligned="fail",
        dkim=((BANK, "sel", "fail"), ("evil.test", "e1", "pass")),
        spf=("evil.test", "mfrom", "pass"), rua=(), ruf=(f"mailto:ruf@{BANK}",))
    fields.update(changes)
    return DmarcEvent(**fields)  # type: ignore[arg-type]


def context(**changes: object) -> MessageContext:
    fields: dict[str, object] = dict(
        job_id="4ABC", pct=100, psd="u", headers=HEADERS, mail_from="bounce-77@evil.test",
        recipients=("bob@ours.test", "carol@ours.test"), helo="mail.evil.test")
    fields.update(changes)
    return MessageContext(**fields)  # type: ignore[arg-type]


def config(extra: str = "") -> Config:
    return Config.from_text(f"Mode v\nFailureReports yes\n{extra}")


ON = config()


# -- when a report is due ---------------------------------------------------------------------


@pytest.mark.parametrize(("fo", "options"), [
    ("0", ("0",)), ("", ("0",)), ("1", ("1",)), ("d:s", ("d", "s")),
    (" S : d : 1 ", ("1", "d", "s")), ("x:y", ("0",)), ("1:x", ("1",)),
])  # fmt: skip
def test_fo_is_a_colon_list_unknown_options_ignored(fo: str, options: tuple[str, ...]) -> None:
    assert failure.fo_options(fo) == options


PASS_BOTH = dict(dkim_aligned="pass", spf_aligned="pass", dkim=((BANK, "sel", "pass"),),
                 spf=(BANK, "mfrom", "pass"))  # fmt: skip
PASS_DKIM_ONLY = dict(dkim_aligned="pass", spf_aligned="fail", dkim=((BANK, "sel", "pass"),),
                      spf=("evil.test", "mfrom", "pass"))  # fmt: skip


@pytest.mark.parametrize(("fo", "changes", "reason"), [
    # fo=0: only when neither DKIM nor SPF gave an aligned pass (DMARC fail).
    ("0", {}, "fo=0"),
    ("0", PASS_DKIM_ONLY, None),
    # fo=1: when either did not, even though DMARC passes.
    ("1", {}, "fo=1: DKIM and SPF"),
    ("1", PASS_DKIM_ONLY, "fo=1: SPF gave no aligned pass"),
    ("1", PASS_BOTH, None),
    # fo=d: a signature that failed to verify, aligned or not, DMARC pass or fail.
    ("d", {}, "fo=d: DKIM signature bank.test/sel fail"),
    ("d", {**PASS_BOTH, "dkim": ((BANK, "sel", "pass"), ("other.test", "x", "permerror"))},
     "fo=d: DKIM signature other.test/x permerror"),
    ("d", {"dkim": ((BANK, "sel", "temperror"),)}, None),  # DNS trouble is no failure
    ("d", {"dkim": ()}, None),
    # fo=s: SPF failed, aligned or not.
    ("s", {}, None),  # SPF passed (for the attacker's domain)
    ("s", {"spf": ("evil.test", "mfrom", "softfail")}, "fo=s: SPF softfail for evil.test"),
    ("s", {**PASS_BOTH, "spf": (BANK, "helo", "fail")}, "fo=s: SPF fail for bank.test"),
    # A colon list: any option that applies.
    ("0:s", {**PASS_DKIM_ONLY, "spf": ("evil.test", "mfrom", "fail")}, "fo=s"),
    ("d:s", PASS_BOTH, None),
])  # fmt: skip
def test_fo_decides_which_messages_are_reported(fo: str, changes: dict[str, object],
                                                reason: str | None) -> None:
    got = failure.wants_report(event(fo=fo, **changes), context(), ON)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got, got


@pytest.mark.parametrize(("conf", "changes", "ctx", "due"), [
    ("", {}, {}, True),
    ("FailureReports no\n", {}, {}, False),  # off: the default, as OpenDMARC
    ("", {"ruf": ()}, {}, False),  # nobody asked
    ("", {}, {"psd": "y"}, False),  # RFC 9991: never for a psd=y record
    ("", {}, {"psd": "n"}, True),
    (f"ReportSkipDomains {BANK}\n", {}, {}, False),
    ("ReportSkipDomains test\n", {}, {}, False),  # below a skipped domain
    ("ReportSkipDomains ank.test, other.test\n", {}, {}, True),  # not a parent, only a suffix
    # p=none only with FailureReportsOnNone.
    ("", {"p": "none", "disposition": "none"}, {}, False),
    ("FailureReportsOnNone yes\n", {"p": "none", "disposition": "none"}, {}, True),
    # A subdomain gets sp=; the policy domain itself p=.
    ("", {"header_from": f"sub.{BANK}", "sp": "none"}, {}, False),
    ("FailureReportsOnNone yes\n", {"header_from": f"sub.{BANK}", "sp": "none"}, {}, True),
    ("", {"header_from": f"sub.{BANK}", "p": "none", "sp": "reject"}, {}, True),
    ("", {"p": "reject", "sp": "none"}, {}, True),
])  # fmt: skip
def test_the_directives_psd_and_the_policy_gate_reports(conf: str, changes: dict[str, object],
                                                         ctx: dict[str, object],
                                                         due: bool) -> None:  # fmt: skip
    cfg = Config.from_text(f"Mode v\nFailureReports yes\n{conf}")
    assert (failure.wants_report(event(**changes), context(**ctx), cfg) is not None) is due


# -- what a report holds ----------------------------------------------------------------------


def parse(msg: EmailMessage) -> tuple[bytes, Message, Message, Message, Message]:
    """The wire bytes and, parsed back with the standard parser: the message, its text part,
    the report fields (the message/feedback-report part's one entity) and the header part."""
    raw = msg.as_bytes()
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "feedback-report"
    text, feedback, headers = parts(parsed)
    assert [p.get_content_type() for p in (text, feedback, headers)] == [
        "text/plain", "message/feedback-report", "text/rfc822-headers"]
    (fields,) = parts(feedback)
    return raw, parsed, text, fields, headers


def parts(msg: Message) -> list[Message]:
    """The entities of a multipart or message/* entity."""
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [part for part in payload if isinstance(part, Message)]


def content(part: Message) -> str:
    """A text part's decoded content, line ends as LF."""
    return str(part.get_content()).replace("\r\n", "\n")  # type: ignore[attr-defined]


def test_a_report_has_every_afrf_field_and_the_original_header_without_body() -> None:
    cfg = config("FailureReportsSentBy dmarc-failures@reports.ours.test\n")
    msg = failure.build_report(event(), context(), cfg, now=NOW + 60, org_domain=PSL.org_domain)
    raw, parsed, text, fields, headers = parse(msg)
    assert parsed["From"] == "dmarc-failures@reports.ours.test"
    assert parsed["To"] == f"ruf@{BANK}"
    assert parsed["Subject"] == f"DMARC failure report for {BANK} from 198.51.100.25"
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert email.utils.parsedate_to_datetime(parsed["Date"]).timestamp() == NOW + 60
    # RFC 5965 required fields, RFC 6591's Auth-Failure, RFC 9991's Identity-Alignment.
    one = {name: fields.get_all(name) or [] for name in fields.keys()}  # noqa: SIM118
    assert all(len(v) == 1 for n, v in one.items() if n != "Original-Rcpt-To"), one
    got = {n: str(v[0]) for n, v in one.items()}
    assert got == {
        "Feedback-Type": "auth-failure",
        "User-Agent": failure.USER_AGENT,
        "Version": "1",
        "Auth-Failure": "dmarc",
        "Original-Mail-From": "<bounce-77@evil.test>",
        "Original-Rcpt-To": "<bob@ours.test>",
        "Arrival-Date": "Thu, 01 Jan 2026 00:00:00 +0000",
        "Reporting-MTA": "dns; mx.ours.test",
        "Source-IP": "198.51.100.25",
        "Reported-Domain": BANK,
        "Authentication-Results": (
            "mx.ours.test; dkim=fail header.d=bank.test header.s=sel; dkim=pass "
            "header.d=evil.test header.s=e1; spf=pass smtp.mailfrom=evil.test; dmarc=fail "
            "(p=reject dis=reject) header.from=bank.test policy.dmarc=reject"),
        # The bank.test signature aligns with the From domain and failed.
        "Identity-Alignment": "dkim",
        "DKIM-Domain": BANK,
        "DKIM-Identity": f"@{BANK}",
        "DKIM-Selector": "sel",
        "Delivery-Result": "reject",
    }  # fmt: skip
    assert [str(v) for v in one["Original-Rcpt-To"]] == ["<bob@ours.test>", "<carol@ours.test>"]
    # Each report field on one line: consumers read them so.
    assert b"\r\nAuthentication-Results: mx.ours.test; dkim=fail" in raw
    assert re.search(rb"\r\nAuthentication-Results: [^\r\n]*policy\.dmarc=reject\r\n", raw)
    # The original header fields, in order, unredacted; no body.
    sent = content(headers)
    assert [line.split(":", 1)[0] for line in sent.splitlines() if not line[:1].isspace()] == [
        name for name, _ in HEADERS]
    assert "Subject: Please wire the money\n" in sent
    assert "alice.smith@bank.test" in sent and "wire the money today" not in raw.decode()
    assert "fo=1: DKIM and SPF gave no aligned pass" in content(text)
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def test_parsedmarc_reads_the_report_as_a_failure_report() -> None:
    """parsedmarc is what most domain owners feed their ruf mail to."""
    msg = failure.build_report(event(), context(), ON, now=NOW, org_domain=PSL.org_domain)
    parsed = parsedmarc.parse_report_email(msg.as_bytes(), offline=True)
    assert parsed["report_type"] == "failure"
    report = parsed["report"]
    assert report["feedback_type"] == "auth-failure"
    assert report["auth_failure"] == ["dmarc"]
    assert report["source"]["ip_address"] == "198.51.100.25"
    assert report["reported_domain"] == BANK
    assert report["delivery_result"] == "reject"
    assert report["dkim_domain"] == BANK
    assert report["sample_headers_only"] is True
    assert report["parsed_sample"]["subject"] == "Please wire the money"
    assert report["authentication_results"].endswith("policy.dmarc=reject")


@pytest.mark.parametrize(("changes", "alignment", "dkim_field"), [
    # A pure spoof: no signature, SPF for the attacker: no aligned identifier failed.
    ({"dkim": ()}, "none", None),
    # Only the attacker's signature failed: named, but it is no aligned failure.
    ({"dkim": (("evil.test", "e1", "fail"),)}, "none", ("evil.test", "e1")),
    # A bank.test subdomain's signature aligns (relaxed) and failed; the aligned one is named.
    ({"dkim": (("evil.test", "e1", "fail"), (f"mail.{BANK}", "m", "fail"))}, "dkim",
     (f"mail.{BANK}", "m")),
    # ... but not under adkim=s.
    ({"adkim": "s", "dkim": ((f"mail.{BANK}", "m", "fail"),)}, "none", (f"mail.{BANK}", "m")),
    # SPF for bank.test itself failed: an aligned identifier.
    ({"dkim": ((BANK, "sel", "fail"),), "spf": (BANK, "mfrom", "fail")}, "dkim, spf",
     (BANK, "sel")),
    ({"dkim": (), "spf": (f"bounce.{BANK}", "mfrom", "softfail")}, "spf", None),
    ({"dkim": (), "aspf": "s", "spf": (f"bounce.{BANK}", "mfrom", "softfail")}, "none", None),
])  # fmt: skip
def test_identity_alignment_names_the_methods_whose_aligned_identifier_failed(
        changes: dict[str, object], alignment: str,
        dkim_field: tuple[str, str] | None) -> None:  # fmt: skip
    msg = failure.build_report(event(**changes), context(), ON, now=NOW,
                               org_domain=PSL.org_domain)  # fmt: skip
    fields = parse(msg)[3]
    assert fields["Identity-Alignment"] == alignment
    if dkim_field is None:
        assert fields["DKIM-Domain"] is None and fields["DKIM-Selector"] is None
    else:
        assert (fields["DKIM-Domain"], fields["DKIM-Selector"]) == dkim_field


@pytest.mark.parametrize(("disposition", "result"), [
    ("none", "delivered"), ("quarantine", "policy"), ("reject", "reject")])
def test_delivery_result_follows_the_disposition(disposition: str, result: str) -> None:
    msg = failure.build_report(event(disposition=disposition), context(), ON, now=NOW)
    assert parse(msg)[3]["Delivery-Result"] == result


def test_spf_dns_is_written_when_the_record_is_known() -> None:
    known = context(spf_record="v=spf1 ip4:198.51.100.0/24 -all")
    assert parse(failure.build_report(event(), context(), ON, now=NOW))[3]["SPF-DNS"] is None
    fields = parse(failure.build_report(event(), known, ON, now=NOW))[3]
    assert fields["SPF-DNS"] == "txt : evil.test : v=spf1 ip4:198.51.100.0/24 -all"


@pytest.mark.parametrize(("conf", "sender"), [
    ("FailureReportsSentBy fail@a.test\nReportSender agg@b.test\n", "fail@a.test"),
    ("ReportSender agg@b.test\n", "agg@b.test"),
    ("", "postmaster@mx.ours.test"),  # the reporting host (authserv-id)
])  # fmt: skip
def test_the_sender_is_sent_by_else_report_sender_else_postmaster(conf: str,
                                                                  sender: str) -> None:
    assert parse(failure.build_report(event(), context(), config(conf), now=NOW))[1][
        "From"] == sender


def test_redaction_leaves_no_local_part_and_keeps_domains() -> None:
    cfg = config("FailureReportsRedact yes\n")
    raw, _parsed, text, fields, headers = parse(failure.build_report(event(), context(), cfg,
                                                                     now=NOW))  # fmt: skip
    wire = raw.decode()
    for secret in SECRETS:
        assert secret not in wire, secret
    assert fields["Original-Mail-From"] == "<redacted@evil.test>"
    assert fields.get_all("Original-Rcpt-To") == ["<redacted@ours.test>"] * 2
    sent = content(headers)
    assert f'From: "Alice Smith" <redacted@{BANK}>' in sent
    assert 'To: redacted@ours.test, "Carol Q" <redacted@ours.test>' in sent
    assert "Cc: redacted@ours.test" in sent and "Reply-To: redacted@evil.test" in sent
    assert f"i=redacted@{BANK};" in sent and "for <redacted@ours.test>;" in sent
    assert "Message-ID: <id.1234@mail.evil.test>" in sent  # an identifier, not an address
    assert "redacted" in content(text)
    # Without the option every one of them is there.
    plain = parse(failure.build_report(event(), context(), ON, now=NOW))[0].decode()
    assert all(secret in plain for secret in SECRETS)


@pytest.mark.parametrize(("text", "redacted"), [
    ("smtp.mailfrom=bounce@evil.test; header.i=alice@b.test",
     "smtp.mailfrom=redacted@evil.test; header.i=redacted@b.test"),
    ("v=1; i=alice.smith@bank.test; d=bank.test", "v=1; i=redacted@bank.test; d=bank.test"),
    ("envelope-from=dave@x.test", "envelope-from=redacted@x.test"),
    # SRS, VERP and BATV local parts carry an address after "=": all of it goes.
    ("SRS0=abc=TT=orig.test=carol@fwd.test", "redacted@fwd.test"),
    ("<list-bounces+bob=ours.test@lists.test>", "<redacted@lists.test>"),
    ("prvs=1234=eve@evil.test", "redacted@evil.test"),
    ('"john doe"@x.test, "Alice@bank.test" <a.b+c@[192.0.2.1]>',
     'redacted@x.test, "redacted@bank.test" <redacted@[192.0.2.1]>'),
    ("no address @ all, user@", "no address @ all, user@"),
])  # fmt: skip
def test_redact_replaces_every_local_part(text: str, redacted: str) -> None:
    assert failure.redact(text) == redacted


def test_8bit_header_text_travels_quoted_printable() -> None:
    raw_subject = "Überweisung heute \udcff".encode("utf-8", "surrogateescape")
    headers = (("Subject", raw_subject.decode("utf-8", "surrogateescape")),)
    raw, *_rest, part = parse(failure.build_report(event(), context(headers=headers), ON,
                                                   now=NOW))  # fmt: skip
    assert raw.isascii()
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert content(part) == "Subject: Überweisung heute \ufffd\n"


def test_a_huge_header_is_cut_at_whole_fields_and_long_lines_are_folded() -> None:
    headers = tuple(("Received", f"from relay{i}.test by relay{i + 1}.test with ESMTP id "
                                 f"{'X' * 40}; Thu, 01 Jan 2026 00:00:00 +0000")
                    for i in range(2000))  # fmt: skip
    headers += (("X-Long", "word " * 300 + "Y" * 2000),)
    raw, _p, text, _f, part = parse(failure.build_report(event(), context(headers=headers), ON,
                                                         now=NOW))  # fmt: skip
    sent = content(part)
    fields = [line for line in sent.splitlines() if not line[:1].isspace()]
    assert 0 < len(fields) < 2000
    assert len(sent.encode()) <= failure.MAX_HEADER_BYTES
    assert f"{2001 - len(fields)} header field(s) were left out" in content(text)
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    small = (("X-Long", "word " * 300 + "Y" * 2000),)
    folded = parse(failure.build_report(event(), context(headers=small), ON, now=NOW))[4]
    lines = content(folded).splitlines()
    assert len(lines) > 10 and all(len(line) <= 900 for line in lines)
    assert " ".join(line.strip() for line in lines[:-1]).startswith("X-Long: word word")


# -- how many ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_limit_caps_each_domain_and_the_total_in_any_hour() -> None:
    clock = Clock()
    limit = failure.RateLimit(2, 3, clock=clock)
    assert [limit.allow("a.test"), limit.allow("a.test")] == [None, None]
    assert "FailureReportsPerDomain (2) reached for a.test" in (limit.allow("a.test") or "")
    clock.now = 1100.0
    assert limit.allow("b.test") is None
    assert "FailureReportsPerHour (3) reached" in (limit.allow("c.test") or "")
    clock.now = 2800.0
    assert limit.allow("c.test") is not None  # still within the hour
    clock.now = 4600.0  # an hour after a.test's two
    assert limit.allow("a.test") is None and limit.allow("c.test") is None
    assert limit.allow("d.test") is not None  # b.test's place is taken until 4700
    clock.now = 4700.0
    assert limit.allow("d.test") is None


def test_a_zero_limit_sends_nothing_and_many_domains_stay_bounded() -> None:
    clock = Clock()
    assert failure.RateLimit(0, 100, clock=clock).allow("a.test") is not None
    assert failure.RateLimit(5, 0, clock=clock).allow("a.test") is not None
    limit = failure.RateLimit(1, 10, clock=clock)
    for i in range(1000):
        clock.now += 400  # at most 9 places taken at any time
        assert limit.allow(f"d{i}.test") is None
    assert len(limit._domains) <= 2 * 10 + 17


# -- the sending thread -----------------------------------------------------------------------


def zones() -> dict[str, str]:
    return {
        "collector.test": make_zone("collector.test", [
            (f"{BANK}._report._dmarc", "TXT", '"v=DMARC1"'),
            ("broken.test._report._dmarc", "TXT", failure_marker("SERVFAIL")),
        ]),
        "unverified.test": make_zone("unverified.test", [("@", "A", "192.0.2.1")]),
    }  # fmt: skip


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SmtpSink]:
    server = SmtpSink(tmp_path / "sink").start()
    yield server
    server.stop()


def sender_for(sink: SmtpSink, extra: str = "", **kwargs: object) -> failure.FailureReporter:
    cfg = config(f"ReportSMTPServer 127.0.0.1:{sink.port}\n{extra}")
    return failure.FailureReporter(cfg, resolver=ZoneResolver.from_zones(zones()),
                                   org_domain=PSL.org_domain, **kwargs)  # type: ignore[arg-type]


def test_a_verified_external_destination_gets_the_report_and_bcc_a_copy(sink: SmtpSink) -> None:
    reporter = sender_for(sink, "FailureReportsBcc copies@ours.test\n"
                                "FailureReportsSentBy dmarc@reports.ours.test\n")  # fmt: skip
    ruf = (f"mailto:ruf@{BANK}", "mailto:fail@collector.test", "https://x.test/")
    assert reporter.put(event(ruf=ruf), context())
    assert reporter.close(timeout=30)
    (delivery,) = sink.deliveries()
    assert delivery.mail_from == "dmarc@reports.ours.test"
    assert delivery.rcpt_to == (f"ruf@{BANK}", "fail@collector.test", "copies@ours.test")
    parsed = email.message_from_bytes(delivery.data, policy=email.policy.default)
    assert parsed["To"] == f"ruf@{BANK}, fail@collector.test"  # Bcc: the envelope only
    assert "copies" not in delivery.data.decode()
    assert parsedmarc.parse_report_email(delivery.data, offline=True)["report_type"] == "failure"
    assert reporter.counts == {"sent": 1}


@pytest.mark.parametrize(("ruf", "outcome"), [
    (("mailto:ruf@unverified.test",), "no_destination"),  # NXDOMAIN: no verification record
    (("mailto:ruf@collector.test",), "no_destination"),  # collector.test did not agree for
    (("https://ruf.test/",), "no_destination"),  # other.test; not a mailto: URI
])  # fmt: skip
def test_a_destination_without_verification_gets_nothing(sink: SmtpSink, ruf: tuple[str, ...],
                                                          outcome: str) -> None:
    reporter = sender_for(sink)
    ev = event(ruf=ruf, policy_domain="other.test", header_from="other.test",
               dkim=(("other.test", "sel", "fail"),))  # fmt: skip
    assert reporter.put(ev, context())
    assert reporter.close(timeout=30)
    assert sink.deliveries() == [] and reporter.counts == {outcome: 1}


def test_a_dns_temperror_while_verifying_drops_and_counts(sink: SmtpSink,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    reporter = sender_for(sink)
    ev = event(policy_domain="broken.test", header_from="broken.test",
               ruf=("mailto:ruf@collector.test",))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="authmilter"):
        assert reporter.put(ev, context())
        assert reporter.close(timeout=30)
    assert sink.deliveries() == [] and reporter.counts == {"dns_temperror": 1}
    assert "DMARC failure report for broken.test not sent" in caplog.text


def test_an_mta_that_is_down_drops_and_counts_without_raising() -> None:
    port = free_port()  # nobody listens there
    cfg = config(f"ReportSMTPServer 127.0.0.1:{port}\n")
    reporter = failure.FailureReporter(cfg, resolver=ZoneResolver.from_zones(zones()),
                                       org_domain=PSL.org_domain, smtp_timeout=5)  # fmt: skip
    assert reporter.put(event(), context())
    assert reporter.close(timeout=30)
    assert reporter.counts == {"smtp_failed": 1}


def test_a_full_queue_drops_and_counts_without_blocking(sink: SmtpSink) -> None:
    """The thread is not started: a put that waited would never return."""
    reporter = sender_for(sink, maxsize=2, start=False)
    domains = [f"d{i}.test" for i in range(5)]
    queued = [reporter.put(event(policy_domain=d, header_from=d, ruf=(f"mailto:r@{d}",)),
                           context()) for d in domains]  # fmt: skip
    assert queued == [True, True, False, False, False]
    assert reporter.counts == {"queue_full": 3}
    assert reporter.close(timeout=30)
    assert reporter.counts == {"queue_full": 3, "sent": 2}
    assert sorted(d.rcpt_to for d in sink.deliveries()) == [("r@d0.test",), ("r@d1.test",)]


def test_over_the_rate_limit_nothing_is_queued(sink: SmtpSink,
                                               caplog: pytest.LogCaptureFixture) -> None:
    reporter = sender_for(sink, "FailureReportsPerDomain 2\n", start=False)
    with caplog.at_level(logging.WARNING, logger="authmilter"):
        assert [reporter.put(event(), context()) for _ in range(4)] == [True, True, False, False]
    assert reporter.queue.qsize() == 2 and reporter.counts == {"rate_limited": 2}
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"DMARC failure report for {BANK} not sent: FailureReportsPerDomain (2) "
                     f"reached for {BANK}"]  # the second one waits a minute, then is counted
    assert reporter.close(timeout=30) and len(sink.deliveries()) == 2


def test_messages_that_ask_for_no_report_cost_no_place(sink: SmtpSink) -> None:
    reporter = sender_for(sink, "FailureReportsPerDomain 1\n", start=False)
    for _ in range(3):
        assert not reporter.put(event(fo="0", **PASS_DKIM_ONLY), context())
    assert reporter.put(event(), context())
    assert reporter.counts == {} and reporter.close(timeout=30)


def test_record_never_raises_and_the_reporter_is_renewed_after_a_fork(sink: SmtpSink) -> None:
    cfg = config(f"ReportSMTPServer 127.0.0.1:{sink.port}\nFailureReportsPerDomain 0\n")
    assert not failure.record(config("FailureReports no\n"), event(), context())
    assert not failure.record(cfg, event(), None)  # type: ignore[arg-type]
    first = failure.reporter(cfg)
    assert failure.reporter(cfg) is first
    first.pid = -1  # as a forked child sees it
    assert failure.reporter(cfg) is not first
    assert not failure.record(cfg, event(), context())  # rate limited: 0 per domain
    failure.close(5)


# -- end to end ---------------------------------------------------------------------------------

SPOOFED = "spoofed.test"
UNVERIFIED = "unverified.test"
REPORTER = "reporter.test"
COLLECTOR = "collector.test"


@dataclass
class World:
    nsd: NsdServer
    keys: Path
    keytable: str


@pytest.fixture(scope="module")
def world(nsd_server_module) -> Iterator[World]:  # type: ignore[no-untyped-def]
    keys = new_socket_dir("failure-keys-")
    assert authmilter_main(["genkey", "-D", str(keys), "-d", REPORTER, "-s", "sel", "-b",
                            "2048"]) == 0  # fmt: skip
    dmarc_ = f"v=DMARC1; p=reject; fo=1; ruf=mailto:ruf@{COLLECTOR}"
    nsd = nsd_server_module({
        SPOOFED: make_zone(SPOOFED, [
            ("@", "TXT", '"v=spf1 ip4:203.0.113.5 -all"'),
            ("_dmarc", "TXT", f'"{dmarc_}"'),
        ]),
        UNVERIFIED: make_zone(UNVERIFIED, [
            ("@", "TXT", '"v=spf1 ip4:203.0.113.5 -all"'),
            ("_dmarc", "TXT", f'"{dmarc_}"'),
        ]),
        # Agrees to take spoofed.test's reports, not unverified.test's.
        COLLECTOR: make_zone(COLLECTOR, [(f"{SPOOFED}._report._dmarc", "TXT", '"v=DMARC1"')]),
        "relay.test": make_zone("relay.test", [("@", "TXT", '"v=spf1 ip4:198.51.100.0/24 -all"')]),
        REPORTER: make_zone(REPORTER, raw=(keys / "sel.txt").read_text()),
    })  # fmt: skip
    keytable = write_keytable(keys, {"sel": (REPORTER, "sel", keys / "sel.private")},
                              [(f"*@{REPORTER}", "sel")])  # fmt: skip
    yield World(nsd, keys, keytable)
    shutil.rmtree(keys, ignore_errors=True)


def spoof(postfix: PostfixInstance, domain: str, subject: str) -> None:
    """A message From the CEO of ``domain`` from an outside client that ``domain``'s SPF does
    not list, MAIL FROM relay.test (SPF pass, unaligned): DMARC fails, p=reject rejects it."""
    with pytest.raises(SmtpPermfail) as refused:
        postfix.send(message(f"The CEO <ceo@{domain}>", subject), mail_from="bounce@relay.test",
                     rcpt_to=["user@ours.test"], port="inbound", client_ip=OUTSIDE)  # fmt: skip
    assert refused.value.code == 550 and f"rejected by DMARC policy for {domain}" in (
        refused.value.text)


def test_a_spoof_yields_one_signed_report_through_the_local_mta(world: World) -> None:
    milter = AuthmilterProcess(
        f"AuthservID mx.failure.test\nWorkers 1\nNameservers {world.nsd.nameserver}\n"
        f"RejectFailures yes\nFailureReports yes\nFailureReportsPerDomain 1\n"
        f"FailureReportsSentBy dmarc-failures@{REPORTER}\n{world.keytable}")  # fmt: skip
    postfix = PostfixInstance(milter.postfix_socket).start()
    try:
        # The reports go back into this Postfix's submission port: the milter signs them there.
        with milter.conf_path.open("a") as conf:
            conf.write(f"ReportSMTPServer 127.0.0.1:{postfix.submit_port}\n")
        milter.start()
        spoof(postfix, SPOOFED, "wire the money")
        (report,) = postfix.wait_delivered(1, timeout=60)
        milter.wait_log(f"DMARC failure report for {SPOOFED} (From {SPOOFED}, client {OUTSIDE}")
        # Over FailureReportsPerDomain: rejected as before, no report.
        spoof(postfix, SPOOFED, "wire it again")
        milter.wait_log(f"DMARC failure report for {SPOOFED} not sent: FailureReportsPerDomain")
        # A destination that did not agree to take unverified.test's reports gets nothing.
        spoof(postfix, UNVERIFIED, "wire money too")
        milter.wait_log(f"DMARC failure report for {UNVERIFIED} not sent: no usable ruf=",
                        timeout=30)  # fmt: skip
        deliveries = postfix.sink.deliveries()
        assert len(deliveries) == 1, [d.rcpt_to for d in deliveries]
        assert deliveries[0].rcpt_to == (f"ruf@{COLLECTOR}",)
        assert deliveries[0].mail_from == f"dmarc-failures@{REPORTER}"
    finally:
        postfix.stop()
        assert milter.stop() == 0, milter.log()
        milter.cleanup()
    parsed = email.message_from_bytes(report, policy=email.policy.default)
    assert parsed["From"] == f"dmarc-failures@{REPORTER}"
    _text, feedback, headers = parts(parsed)
    (fields,) = parts(feedback)
    assert (fields["Auth-Failure"], fields["Source-IP"], fields["Reported-Domain"]) == (
        "dmarc", OUTSIDE, SPOOFED)
    assert fields["Original-Mail-From"] == "<bounce@relay.test>"
    assert fields["Identity-Alignment"] == "none" and fields["Delivery-Result"] == "reject"
    assert "dmarc=fail" in fields["Authentication-Results"]
    original = content(headers)
    assert "Subject: wire the money\n" in original and f"ceo@{SPOOFED}" in original
    assert "Please wire the money today" not in report.decode()  # headers only
    # Our own milter DKIM-signed it on the way out; the key is the one NSD serves.
    dnsfunc = Resolver([world.nsd.nameserver]).dkimpy_dnsfunc
    (signature,) = parsed.get_all("DKIM-Signature") or []
    assert f"d={REPORTER}" in " ".join(str(signature).split())
    assert dkim.verify(report, dnsfunc=dnsfunc)
    assert parsedmarc.parse_report_email(report, offline=True)["report_type"] == "failure"


def test_report_mail_coming_back_in_yields_no_report() -> None:
    """A failure report arriving from outside is report mail (multipart/report,
    feedback-report): the pipeline makes no event, so no report about a report (checked
    here on the report we build, with the pipeline's own predicate)."""
    from authmilter.reports.record import is_report_mail

    msg = failure.build_report(event(), context(), ON, now=NOW)
    parsed = email.message_from_bytes(msg.as_bytes(), policy=email.policy.compat32)
    headers = [(n, " ".join(str(v).split())) for n, v in parsed.items()]
    assert is_report_mail(headers, "bounce@x.test", ["ruf@bank.test"], ())

