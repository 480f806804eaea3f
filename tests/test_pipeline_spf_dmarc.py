"""SPF at RCPT time and DMARC at end of message, as the pipeline decides them (no socket)."""

from __future__ import annotations

import logging
from pathlib import Path

import authres
import pytest

from authmilter.config import Action, Config
from authmilter.errors import ConfigError
from authmilter.pipeline import (
    AddHeader,
    Connection,
    Context,
    DeleteHeader,
    RcptVerdict,
    Reply,
    Verdict,
)
from dnsserver import make_zone
from fakedns import ZoneResolver, failure_marker

AID = "mx.pipeline.test"
OUTSIDE = "198.51.100.25"

ZONES = {
    "strict.test": make_zone("strict.test", [
        ("@", "TXT", '"v=spf1 ip4:203.0.113.5 -all"'),
        ("_dmarc", "TXT", '"v=DMARC1; p=reject"'),
    ]),
    "quar.test": make_zone("quar.test", [
        ("@", "TXT", '"v=spf1 ip4:198.51.100.0/24 -all"'),
        ("_dmarc", "TXT", '"v=DMARC1; p=quarantine; aspf=s"'),
        ("mail", "TXT", '"v=spf1 ip4:198.51.100.0/24 -all"'),
    ]),
    "relay.test": make_zone("relay.test", [
        ("@", "TXT", '"v=spf1 ip4:198.51.100.0/24 -all"'),
    ]),
    "broken.test": make_zone("broken.test", [
        ("@", "TXT", '"v=spf1 ip4:198.51.100.0/24 -all"'),
        ("_dmarc", "TXT", failure_marker("SERVFAIL")),
    ]),
    "flaky.test": make_zone("flaky.test", [("@", "TXT", failure_marker("TIMEOUT"))]),
    "nospf.test": make_zone("nospf.test", [("@", "A", "192.0.2.1")]),
    "flakynone.test": make_zone("flakynone.test", [
        ("@", "TXT", failure_marker("TIMEOUT")), ("_dmarc", "TXT", '"v=DMARC1; p=none"')]),
    "flakyreject.test": make_zone("flakyreject.test", [
        ("@", "TXT", failure_marker("TIMEOUT")), ("_dmarc", "TXT", '"v=DMARC1; p=reject"')]),
}  # fmt: skip


def context(tmp_path: Path, conf: str = "") -> Context:
    cfg = Config.from_text(f"AuthservID {AID}\nMode v\n{conf}")
    return Context.build(cfg, resolver=ZoneResolver.from_zones(ZONES), rand=lambda: 0.0)


def message(from_: str = "alice@strict.test", *, date: bool = True,
            extra: str = "") -> list[tuple[str, bytes]]:  # fmt: skip
    fields = [("From", f" {from_}".encode()), ("To", b" user@ours.test"),
              ("Subject", b" money")]  # fmt: skip
    if date:
        fields.append(("Date", b" Mon, 23 Nov 2026 03:00:00 +0000"))
    if extra:
        name, _, value = extra.partition(":")
        fields.append((name, value.encode()))
    return fields


def run(ctx: Context, *, mail_from: str, fields: list[tuple[str, bytes]] | None = None,
        ip: str = OUTSIDE, helo: str = "client.relay.test",
        macros: dict[str, str] | None = None) -> tuple[Reply | None, Verdict | None]:  # fmt: skip
    """Drive one transaction; returns the RCPT reply, or the end-of-message verdict."""
    conn = Connection(ctx, hostname=None, ip=ip)
    conn.set_helo(helo)
    txn = conn.transaction()
    txn.update_macros({"i": "Q1", **(macros or {})})
    txn.envfrom(f"<{mail_from}>")
    reply = txn.rcpt("<user@ours.test>").reply
    if reply is not None:
        txn.close()
        return reply, None
    for name, value in fields or message():
        txn.header(name, value)
    txn.body(b"body\r\n")
    return None, txn.eom()


def results(verdict: Verdict) -> dict[str, authres.AuthenticationResult]:
    (value,) = [e.value for e in verdict.edits
                if isinstance(e, AddHeader) and e.name == "Authentication-Results"]  # fmt: skip
    parsed = authres.all_features().parse_value(" ".join(value.split()))
    assert parsed.authserv_id == AID
    return {r.method: r for r in parsed.results}


def header(verdict: Verdict, name: str) -> str | None:
    values = [e.value for e in verdict.edits if isinstance(e, AddHeader) and e.name == name]
    return values[0] if values else None


# -- SPF ------------------------------------------------------------------------------------------


def test_spf_fail_is_rejected_at_rcpt_with_rfc7372_code(tmp_path: Path) -> None:
    reply, _ = run(context(tmp_path, "Mail_From_reject Fail\n"), mail_from="alice@strict.test")
    assert reply is not None and (reply.code, reply.xcode) == ("550", "5.7.23")
    assert "strict.test" in reply.text


@pytest.mark.parametrize(("conf", "mail_from", "action", "code", "spf"), [
    ("Mail_From_reject Fail\n", "alice@strict.test", Action.REJECT, "550 5.7.23", "fail"),
    ("TempError_Defer yes\nMail_From_reject Fail\n", "a@flaky.test", Action.TEMPFAIL,
     "450 4.7.24", "temperror"),
])  # fmt: skip
def test_each_refused_recipient_is_answered_and_logged_but_the_message_counts_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, conf: str, mail_from: str,
        action: Action, code: str, spf: str) -> None:  # fmt: skip
    """Two RCPT TO of one refused message: both get the reply and the log line policyd-spf
    users grep; only the first is ``first`` (the metrics count the message, with its SPF
    result, once)."""
    conn = Connection(context(tmp_path, conf), hostname=None, ip=OUTSIDE)
    conn.set_helo("client.relay.test")
    txn = conn.transaction()
    txn.update_macros({"i": "4QRCPT"})
    txn.envfrom(f"<{mail_from}>")
    with caplog.at_level(logging.INFO, logger="authmilter"):
        one = txn.rcpt("<user@ours.test>")
        two = txn.rcpt("<other@ours.test>")
    assert one.action is two.action is action
    assert one.reply is not None and one.reply == two.reply
    assert f"{one.reply.code} {one.reply.xcode}" == code
    assert (one.first, one.results) == (True, (("spf", spf),))
    assert (two.first, two.results) == (False, ())
    line = (f"4QRCPT: spf={spf} mailfrom={mail_from}, action={action.value} at RCPT: "
            f"{code} {one.reply.text}")
    assert one.log == two.log == line
    logged = [r.getMessage() for r in caplog.records if r.name == "authmilter"]
    assert logged == [line, line]


def test_an_accepted_recipient_is_not_logged_or_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    conn = Connection(context(tmp_path, "Mail_From_reject Fail\n"), hostname=None, ip=OUTSIDE)
    txn = conn.transaction()
    txn.envfrom("<bob@relay.test>")
    with caplog.at_level(logging.INFO, logger="authmilter"):
        assert txn.rcpt("<user@ours.test>") == RcptVerdict(action=Action.ACCEPT)
    assert [r for r in caplog.records if r.name == "authmilter"] == []


def test_spf_fail_alone_never_rejects_by_default(tmp_path: Path) -> None:
    """Without policyd-spf's file or an explicit option, SPF only informs DMARC (as OpenDMARC):
    p=none mail with an SPF fail is delivered, with the result in A-R and Received-SPF."""
    reply, verdict = run(context(tmp_path), mail_from="bob@quar.test",
                         fields=message("bob@quar.test"), ip="203.0.113.9")  # fmt: skip
    assert reply is None and verdict is not None and verdict.action is Action.ACCEPT
    assert results(verdict)["spf"].result == "fail"
    received = header(verdict, "Received-SPF")
    assert received is not None and received.startswith("Fail (mailfrom)")


def test_spf_fail_only_marked_with_mail_from_reject_false(tmp_path: Path) -> None:
    reply, verdict = run(context(tmp_path, "Mail_From_reject False\n"),
                         mail_from="alice@strict.test")  # fmt: skip
    assert reply is None and verdict is not None
    spf = results(verdict)["spf"]
    assert (spf.result, spf.smtp_mailfrom) == ("fail", "alice@strict.test")
    received = header(verdict, "Received-SPF")
    assert received is not None and received.startswith("Fail (mailfrom) identity=mailfrom;")


def test_spf_temperror_defers_only_with_temperror_defer(tmp_path: Path) -> None:
    reply, verdict = run(context(tmp_path), mail_from="a@flaky.test")
    assert reply is None and verdict is not None
    assert results(verdict)["spf"].result == "temperror"
    reply, _ = run(context(tmp_path, "TempError_Defer yes\nMail_From_reject Fail\n"),
                   mail_from="a@flaky.test")  # fmt: skip
    assert reply is not None and (reply.code, reply.xcode) == ("450", "4.7.24")


def test_test_only_zero_never_rejects(tmp_path: Path) -> None:
    reply, verdict = run(context(tmp_path, "Mail_From_reject Fail\n"),
                         mail_from="alice@strict.test")  # fmt: skip
    assert reply is not None  # the same message is rejected with TestOnly 1
    reply, verdict = run(context(tmp_path, "TestOnly 0\nMail_From_reject Fail\n"),
                         mail_from="alice@strict.test")  # fmt: skip
    assert reply is None and verdict is not None
    assert results(verdict)["spf"].result == "fail"


def test_internal_and_authenticated_clients_are_not_spf_checked(tmp_path: Path) -> None:
    ctx = context(tmp_path, "InternalHosts 198.51.100.0/24\n")
    reply, verdict = run(ctx, mail_from="alice@strict.test")
    assert reply is None and verdict is not None and "spf" not in _methods(verdict)
    reply, verdict = run(context(tmp_path), mail_from="alice@strict.test",
                         macros={"auth_type": "PLAIN"})  # fmt: skip
    assert reply is None and verdict is not None and "spf=skipped" in verdict.log


def test_whitelisted_relay_gets_x_comment_and_no_spf_check(tmp_path: Path) -> None:
    reply, verdict = run(context(tmp_path, f"Whitelist {OUTSIDE}/32\n"),
                         mail_from="alice@strict.test")  # fmt: skip
    assert reply is None and verdict is not None
    comment = header(verdict, "X-Comment")
    assert comment is not None and comment.startswith("SPF skipped for whitelisted relay")
    assert "spf" not in _methods(verdict)


def test_header_type_ar_puts_spf_only_in_authentication_results(tmp_path: Path) -> None:
    _, verdict = run(context(tmp_path, "Header_Type AR\n"), mail_from="bob@relay.test",
                     fields=message("bob@relay.test"))  # fmt: skip
    assert verdict is not None and header(verdict, "Received-SPF") is None
    assert results(verdict)["spf"].result == "pass"


def test_null_sender_is_checked_with_the_helo_identity(tmp_path: Path) -> None:
    _, verdict = run(context(tmp_path), mail_from="", helo="relay.test",
                     fields=message("bob@relay.test"))  # fmt: skip
    assert verdict is not None
    spf = results(verdict)["spf"]
    assert (spf.result, spf.smtp_helo) == ("pass", "relay.test")


# -- DMARC ----------------------------------------------------------------------------------------


def _methods(verdict: Verdict) -> set[str]:
    if header(verdict, "Authentication-Results") is None:
        return set()
    return set(results(verdict))


def test_dmarc_reject_with_reject_failures_uses_reject_string(tmp_path: Path) -> None:
    ctx = context(tmp_path, "RejectFailures yes\nRejectString go away, %s\n")
    _, verdict = run(ctx, mail_from="bounce@relay.test")
    assert verdict is not None and verdict.action is Action.REJECT
    assert verdict.reply == Reply("550", "5.7.1", "go away, strict.test")


def test_dmarc_fail_without_reject_failures_is_marked(tmp_path: Path) -> None:
    _, verdict = run(context(tmp_path), mail_from="bounce@relay.test")
    assert verdict is not None and verdict.action is Action.ACCEPT
    dmarc = results(verdict)["dmarc"]
    assert (dmarc.result, dmarc.header_from, dmarc.policy) == ("fail", "strict.test", "reject")
    # dis= is the disposition applied (as OpenDMARC writes it): nothing was enforced.
    assert "dmarc=fail header.from=strict.test p=reject dis=none" in verdict.log
    (value,) = [e.value for e in verdict.edits
                if isinstance(e, AddHeader) and e.name == "Authentication-Results"]  # fmt: skip
    assert "dmarc=fail (p=reject dis=none) header.from=strict.test" in value


def test_dmarc_quarantine_is_held_with_hold_quarantined_messages(tmp_path: Path) -> None:
    # As OpenDMARC 1.4.2: HoldQuarantinedMessages acts only with RejectFailures.
    _, alone = run(context(tmp_path, "HoldQuarantinedMessages yes\n"), mail_from="x@mail.quar.test",
                   fields=message("bob@quar.test"))  # fmt: skip
    assert alone is not None and alone.action is Action.ACCEPT
    ctx = context(tmp_path, "HoldQuarantinedMessages yes\nRejectFailures yes\n")
    # aspf=s: an SPF pass for mail.quar.test is not strictly aligned with quar.test.
    _, verdict = run(ctx, mail_from="x@mail.quar.test", fields=message("bob@quar.test"))
    assert verdict is not None and verdict.action is Action.QUARANTINE
    assert results(verdict)["dmarc"].result == "fail"
    _, plain = run(context(tmp_path), mail_from="x@mail.quar.test",
                   fields=message("bob@quar.test"))  # fmt: skip
    assert plain is not None and plain.action is Action.ACCEPT


def test_spf_aligned_pass_is_dmarc_pass(tmp_path: Path) -> None:
    ctx = context(tmp_path, "HoldQuarantinedMessages yes\nRejectFailures yes\n")
    _, verdict = run(ctx, mail_from="x@quar.test", fields=message("bob@quar.test"))
    assert verdict is not None and verdict.action is Action.ACCEPT
    assert results(verdict)["dmarc"].result == "pass"


def test_dmarc_dns_failure_tempfails_only_with_reject_failures(tmp_path: Path) -> None:
    fields = message("carol@broken.test")
    _, verdict = run(context(tmp_path), mail_from="carol@broken.test", fields=fields)
    assert verdict is not None and results(verdict)["dmarc"].result == "temperror"
    _, verdict = run(context(tmp_path, "RejectFailures yes\n"), mail_from="carol@broken.test",
                     fields=fields)  # fmt: skip
    assert verdict is not None and verdict.action is Action.TEMPFAIL
    assert verdict.reply is not None and verdict.reply.code == "451"


@pytest.mark.parametrize("conf", ["IgnoreMailFrom strict.test\n", f"IgnoreHosts csl:{OUTSIDE}\n"])
def test_ignored_domains_and_hosts_are_not_dmarc_evaluated(tmp_path: Path, conf: str) -> None:
    _, verdict = run(context(tmp_path, "RejectFailures yes\n" + conf), mail_from="b@relay.test")
    assert verdict is not None and verdict.action is Action.ACCEPT
    assert "dmarc" not in _methods(verdict)


def test_required_headers_rejects_a_message_without_date(tmp_path: Path) -> None:
    _, verdict = run(context(tmp_path, "RequiredHeaders yes\n"), mail_from="b@relay.test",
                     fields=message("b@relay.test", date=False))  # fmt: skip
    assert verdict is not None and verdict.action is Action.REJECT
    assert verdict.reply is not None and verdict.reply.xcode == "5.6.0"
    assert "0 Date" in verdict.reply.text


def test_multiple_from_fields_are_never_a_dmarc_pass(tmp_path: Path) -> None:
    fields = message("b@relay.test", extra="From: boss@strict.test")
    _, verdict = run(context(tmp_path), mail_from="b@relay.test", fields=fields)
    assert verdict is not None
    assert results(verdict)["dmarc"].result in ("permerror", "none")


def test_multi_domain_from_rejected_with_reject_multi_value_from(tmp_path: Path) -> None:
    fields = message("b@relay.test, boss@strict.test")
    _, verdict = run(context(tmp_path, "RejectMultiValueFrom yes\n"), mail_from="b@relay.test",
                     fields=fields)  # fmt: skip
    assert verdict is not None and verdict.action is Action.REJECT
    _, verdict = run(context(tmp_path), mail_from="b@relay.test", fields=fields)
    assert verdict is not None and results(verdict)["dmarc"].result != "pass"


def test_trusted_upstream_spf_is_used_when_we_did_not_check(tmp_path: Path) -> None:
    """A border host we trust wrote spf=pass; our own check was skipped (whitelisted relay)."""
    upstream = "Authentication-Results: border.ours.test; spf=pass smtp.mailfrom=x@quar.test"
    ctx = context(tmp_path, f"Whitelist {OUTSIDE}/32\nTrustedAuthservIDs border.ours.test\n")
    _, verdict = run(ctx, mail_from="x@quar.test",
                     fields=message("bob@quar.test", extra=upstream))  # fmt: skip
    assert verdict is not None and results(verdict)["dmarc"].result == "pass"
    untrusted = context(tmp_path, f"Whitelist {OUTSIDE}/32\n")
    _, verdict = run(untrusted, mail_from="x@quar.test",
                     fields=message("bob@quar.test", extra=upstream))  # fmt: skip
    assert verdict is not None and results(verdict)["dmarc"].result == "fail"


def test_our_own_authserv_id_is_never_trusted_from_outside(tmp_path: Path) -> None:
    forged = f"Authentication-Results: {AID}; spf=pass smtp.mailfrom=x@quar.test"
    ctx = context(tmp_path, f"Whitelist {OUTSIDE}/32\nTrustedAuthservIDs {AID}\n")
    _, verdict = run(ctx, mail_from="x@quar.test", fields=message("bob@quar.test", extra=forged))
    assert verdict is not None and results(verdict)["dmarc"].result == "fail"


def test_forged_received_spf_claiming_our_host_is_removed(tmp_path: Path) -> None:
    """Only we write Received-SPF with our receiver=; others are trace fields and stay."""
    forged = [("Received-SPF", f" Pass (mailfrom) identity=mailfrom; receiver={AID.upper()};"
                               " client-ip=198.51.100.25".encode()),
              ("Received-SPF", b" Pass (receiver=" + AID.encode() + b") receiver=mx.other.test"),
              ("Received-SPF", f' pass receiver="{AID}."'.encode())]  # fmt: skip
    ctx = context(tmp_path, "Mail_From_reject False\n")
    _, verdict = run(ctx, mail_from="alice@strict.test", fields=message() + forged)
    assert verdict is not None
    deletes = [(e.name.lower(), e.occurrence) for e in verdict.edits
               if isinstance(e, DeleteHeader)]  # fmt: skip
    assert deletes == [("received-spf", 3), ("received-spf", 1)]  # bottom-up; the 2nd is not ours
    ours = header(verdict, "Received-SPF")
    assert ours is not None and ours.startswith("Fail (mailfrom)")
    assert results(verdict)["spf"].result == "fail" and results(verdict)["dmarc"].result == "fail"


@pytest.mark.parametrize(("conf", "budget"), [("", 20), ("DNSDeadline 7\n", 7)])
def test_each_smtp_stage_gets_one_dns_budget(tmp_path: Path, conf: str, budget: int) -> None:
    ctx = context(tmp_path, conf)
    assert isinstance(ctx.resolver, ZoneResolver)
    _, verdict = run(ctx, mail_from="bob@quar.test", fields=message("bob@quar.test"))
    assert verdict is not None
    assert ctx.resolver.deadlines == [budget, budget]  # SPF at RCPT, then DKIM + DMARC at EOM


def test_dns_deadline_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="DNSDeadline"):
        Config.from_text("DNSDeadline 0\n")


def test_received_spf_records_the_helo_result_when_mail_from_has_none(tmp_path: Path) -> None:
    """policyd-spf's choice: MAIL FROM's result, unless it is none and HELO has one. The A-R
    and DMARC keep the MAIL FROM identity."""
    _, verdict = run(context(tmp_path), mail_from="a@nospf.test", helo="mail.quar.test",
                     fields=message("a@nospf.test"))  # fmt: skip
    assert verdict is not None
    received = header(verdict, "Received-SPF")
    assert received is not None and received.startswith("Pass (")
    assert "identity=helo;" in received and 'envelope-from="a@nospf.test";' in received
    assert results(verdict)["spf"].result == "none"


def test_dmarc_none_carries_opendmarcs_comment(tmp_path: Path) -> None:
    _, verdict = run(context(tmp_path), mail_from="c@relay.test", fields=message("c@relay.test"))
    assert verdict is not None
    (value,) = [e.value for e in verdict.edits
                if isinstance(e, AddHeader) and e.name == "Authentication-Results"]  # fmt: skip
    assert "dmarc=none (p=none dis=none) header.from=relay.test" in " ".join(value.split())


def test_dmarc_temperror_defers_only_where_a_failure_would_be_enforced(tmp_path: Path) -> None:
    """RejectFailures: a temperror defers p=reject mail (a later try may pass), but never a
    p=none domain's, whose failure would be delivered anyway."""
    ctx = context(tmp_path, "RejectFailures yes\n")
    _, verdict = run(ctx, mail_from="a@flakynone.test", fields=message("a@flakynone.test"))
    assert verdict is not None and verdict.action is Action.ACCEPT
    assert results(verdict)["dmarc"].result == "temperror"
    _, verdict = run(ctx, mail_from="a@flakyreject.test", fields=message("a@flakyreject.test"))
    assert verdict is not None and verdict.action is Action.TEMPFAIL
    assert verdict.reply is not None and (verdict.reply.code, verdict.reply.xcode) == ("451",
                                                                                     "4.4.3")
