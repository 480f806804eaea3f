"""End to end: SPF and DMARC through real Postfix, ``authmilter run`` and a real NSD.

Inbound mail claims outside client addresses through the PROXY protocol, so the SPF and DMARC
paths run for real on loopback.
"""

from __future__ import annotations

import email
from collections.abc import Iterator
from dataclasses import dataclass

import authres
import dkim
import pytest

from authmilter.keys import KeyAlgorithm, PrivateKey, generate_private_key, key_record_text
from dnsserver import NsdServer, make_zone, txt_rdata
from helpers import OUTSIDE, message
from milter_fixture import AuthmilterProcess
from postfix_fixture import PostfixInstance, SmtpPermfail

AUTHSERV_ID = "mx.dmarc.test"


@dataclass
class Zones:
    nsd: NsdServer
    strict_key: PrivateKey


@pytest.fixture(scope="module")
def zones(nsd_server_module) -> Zones:  # type: ignore[no-untyped-def]
    key = generate_private_key(KeyAlgorithm.RSA, 2048)
    spf_only_mx = '"v=spf1 ip4:203.0.113.5 -all"'
    nsd = nsd_server_module({
        "strict.test": make_zone("strict.test", [
            ("@", "TXT", spf_only_mx),
            ("_dmarc", "TXT", '"v=DMARC1; p=reject; rua=mailto:dmarc@strict.test"'),
            ("sel._domainkey", "TXT", txt_rdata(key_record_text(key))),
        ]),
        "quar.test": make_zone("quar.test", [
            ("@", "TXT", spf_only_mx),
            ("_dmarc", "TXT", '"v=DMARC1; p=quarantine"'),
        ]),
        "relay.test": make_zone("relay.test", [
            ("@", "TXT", '"v=spf1 ip4:198.51.100.0/24 -all"'),
        ]),
    })  # fmt: skip
    return Zones(nsd, key)


@dataclass
class Stack:
    milter: AuthmilterProcess
    postfix: PostfixInstance

    def send(self, message: bytes, *, mail_from: str) -> tuple[int, str]:
        return self.postfix.send(message, mail_from=mail_from, rcpt_to=["user@ours.test"],
                                 port="inbound", client_ip=OUTSIDE)  # fmt: skip

    def deliver(self, message: bytes, *, mail_from: str) -> bytes:
        before = len(self.postfix.delivered())
        self.send(message, mail_from=mail_from)
        delivered = self.postfix.wait_delivered(before + 1)
        assert len(delivered) == before + 1
        return delivered[-1]


def start_stack(zones: Zones, conf: str) -> Stack:
    milter = AuthmilterProcess(f"AuthservID {AUTHSERV_ID}\nSyslogSuccess yes\n"
                               f"Nameservers {zones.nsd.nameserver}\n{conf}").start()  # fmt: skip
    return Stack(milter, PostfixInstance(milter.postfix_socket).start())


@pytest.fixture(scope="module")
def enforcing(zones: Zones) -> Iterator[Stack]:
    stack = start_stack(zones, "RejectFailures yes\nHoldQuarantinedMessages yes\n"
                               "RequiredHeaders yes\nRejectMultiValueFrom yes\n"
                               "Mail_From_reject Fail\n")  # fmt: skip
    yield stack
    stack.postfix.stop()
    stack.milter.cleanup()


@pytest.fixture(scope="module")
def after_dmarc(zones: Zones) -> Iterator[Stack]:
    """policyd-spf's Mail_From_reject Fail, but held until DMARC (SPFRejectAfterDMARC)."""
    stack = start_stack(zones, "RejectFailures yes\nMail_From_reject Fail\n"
                               "SPFRejectAfterDMARC yes\n")  # fmt: skip
    yield stack
    stack.postfix.stop()
    stack.milter.cleanup()


@pytest.fixture(scope="module")
def reporting(zones: Zones) -> Iterator[Stack]:
    stack = start_stack(zones, "RejectFailures no\nMail_From_reject False\nHeader_Type SPF\n")
    yield stack
    stack.postfix.stop()
    stack.milter.cleanup()


def our_results(delivered: bytes) -> dict[str, authres.AuthenticationResult]:
    msg = email.message_from_bytes(delivered)
    (value,) = [" ".join(str(v).split()) for v in msg.get_all("Authentication-Results") or []
                if str(v).strip().startswith(AUTHSERV_ID)]  # fmt: skip
    parsed = authres.all_features().parse_value(value)  # with the DMARC method
    return {r.method: r for r in parsed.results}


def our_ar_text(delivered: bytes) -> str:
    msg = email.message_from_bytes(delivered)
    (value,) = [" ".join(str(v).split()) for v in msg.get_all("Authentication-Results") or []
                if str(v).strip().startswith(AUTHSERV_ID)]  # fmt: skip
    return value


# -- enforcing ------------------------------------------------------------------------------


def test_p_reject_failure_is_rejected_with_550_naming_the_domain(enforcing: Stack) -> None:
    """From strict.test, envelope from relay.test (SPF passes, unaligned), no DKIM."""
    with pytest.raises(SmtpPermfail) as exc:
        enforcing.send(message("Alice <alice@strict.test>", "spoof"),
                       mail_from="bounce@relay.test")  # fmt: skip
    assert exc.value.code == 550 and exc.value.stage == "data"
    assert "5.7.1" in exc.value.text
    assert "rejected by DMARC policy for strict.test" in exc.value.text
    enforcing.milter.wait_log("dmarc=fail")


def test_p_quarantine_failure_goes_to_the_postfix_hold_queue(enforcing: Stack) -> None:
    before = len(enforcing.postfix.delivered())
    code, _ = enforcing.send(message("Bob <bob@quar.test>", "quarantine me"),
                             mail_from="bounce@relay.test")  # fmt: skip
    assert code == 250
    held = enforcing.postfix.wait_queue(lambda q: any(m.get("queue_name") == "hold" for m in q),
                                        what="a message in the hold queue")  # fmt: skip
    assert held
    assert len(enforcing.postfix.delivered()) == before


def test_spoofed_from_from_an_spf_failing_host_is_rejected_at_rcpt(enforcing: Stack) -> None:
    with pytest.raises(SmtpPermfail) as exc:
        enforcing.send(message("alice@strict.test", "spf spoof"), mail_from="alice@strict.test")
    assert exc.value.code == 550 and exc.value.stage == "rcpt"
    assert "5.7.23" in exc.value.text and "strict.test" in exc.value.text


def test_forwarded_but_dkim_signed_message_passes_dmarc(enforcing: Stack, zones: Zones) -> None:
    original = message("Alice <alice@strict.test>", "forwarded")
    signed = dkim.sign(original, b"sel", b"strict.test", zones.strict_key.dkimpy_private(),
                       include_headers=[b"from", b"to", b"subject", b"date"]) + original
    delivered = enforcing.deliver(signed, mail_from="srs0=abc=strict.test=alice@relay.test")
    results = our_results(delivered)
    assert results["dkim"].result == "pass" and results["dkim"].header_d == "strict.test"
    assert results["spf"].result == "pass"
    assert results["spf"].smtp_mailfrom == "srs0=abc=strict.test=alice@relay.test"
    assert results["dmarc"].result == "pass" and results["dmarc"].header_from == "strict.test"
    assert "dmarc=pass (p=reject dis=none) header.from=strict.test" in our_ar_text(delivered)


@pytest.mark.parametrize("from_", ["undisclosed-recipients:;", "<>", ""])
def test_from_without_a_domain_is_rejected_with_required_headers(enforcing: Stack,
                                                                  from_: str) -> None:
    raw = message("placeholder@relay.test", "no author").replace(
        b"From: placeholder@relay.test", f"From: {from_}".encode())  # fmt: skip
    with pytest.raises(SmtpPermfail) as exc:
        enforcing.send(raw, mail_from="bounce@relay.test")
    assert exc.value.code == 550 and exc.value.stage == "data"
    assert "5.6.0" in exc.value.text and "names no author domain" in exc.value.text


def test_spf_reject_held_until_dmarc_lets_forwarded_dkim_signed_mail_through(
        after_dmarc: Stack, zones: Zones) -> None:  # fmt: skip
    """Forwarded without SRS: the envelope keeps strict.test, whose SPF fails for the
    forwarder, but the aligned DKIM signature survives, so DMARC passes and the SPF reject is
    dropped."""
    original = message("Alice <alice@strict.test>", "forwarded, no SRS")
    signed = dkim.sign(original, b"sel", b"strict.test", zones.strict_key.dkimpy_private(),
                       include_headers=[b"from", b"to", b"subject", b"date"]) + original
    delivered = after_dmarc.deliver(signed, mail_from="alice@strict.test")
    results = our_results(delivered)
    assert (results["spf"].result, results["dkim"].result) == ("fail", "pass")
    assert results["dmarc"].result == "pass"
    after_dmarc.milter.wait_log("SPF reject dropped: DMARC passed through aligned DKIM")


def test_spf_reject_held_until_dmarc_still_bounces_a_spoof_with_the_same_code(
        after_dmarc: Stack) -> None:  # fmt: skip
    with pytest.raises(SmtpPermfail) as exc:
        after_dmarc.send(message("alice@strict.test", "held spoof"), mail_from="alice@strict.test")
    # Past RCPT (the reject waited for DMARC), with policyd-spf's RFC 7372 code.
    assert exc.value.code == 550 and exc.value.stage == "data"
    assert "5.7.23" in exc.value.text and "strict.test" in exc.value.text


def test_multiple_from_fields_are_rejected(enforcing: Stack) -> None:
    with pytest.raises(SmtpPermfail) as exc:
        enforcing.send(message("alice@relay.test", "two From fields",
                               extra_from="boss@strict.test"), mail_from="bounce@relay.test")
    assert exc.value.code == 550 and exc.value.stage == "data"


def test_one_from_with_addresses_of_two_domains_is_rejected(enforcing: Stack) -> None:
    with pytest.raises(SmtpPermfail) as exc:
        enforcing.send(message("alice@relay.test, boss@strict.test", "two domains"),
                       mail_from="bounce@relay.test")  # fmt: skip
    assert exc.value.code == 550 and "From" in exc.value.text


# -- reporting only -------------------------------------------------------------------------


def test_p_reject_failure_is_only_marked_when_reject_failures_is_off(reporting: Stack) -> None:
    delivered = reporting.deliver(message("Alice <alice@strict.test>", "spoof, marked"),
                                  mail_from="bounce@relay.test")  # fmt: skip
    results = our_results(delivered)
    assert results["dmarc"].result == "fail" and results["dmarc"].header_from == "strict.test"
    assert "dmarc=fail (p=reject dis=none) header.from=strict.test" in our_ar_text(delivered)
    assert "policy.dmarc=reject" in our_ar_text(delivered)


def test_spf_failing_spoof_is_marked_and_gets_received_spf(reporting: Stack) -> None:
    delivered = reporting.deliver(message("alice@strict.test", "spf fail marked"),
                                  mail_from="alice@strict.test")  # fmt: skip
    results = our_results(delivered)
    assert results["spf"].result == "fail"
    assert results["spf"].smtp_mailfrom == "alice@strict.test"
    assert results["dmarc"].result == "fail"
    received_spf = " ".join(str(email.message_from_bytes(delivered)["Received-SPF"]).split())
    assert received_spf.startswith("Fail (mailfrom) identity=mailfrom; client-ip=198.51.100.25;")
    # RFC 7208 §9.1: a value that is not a dot-atom is a quoted-string.
    assert 'envelope-from="alice@strict.test"' in received_spf


def test_all_results_share_one_header(reporting: Stack) -> None:
    delivered = reporting.deliver(message("carol@relay.test", "plain"),
                                  mail_from="carol@relay.test")  # fmt: skip
    msg = email.message_from_bytes(delivered)
    ours = [v for v in msg.get_all("Authentication-Results") or []
            if str(v).strip().startswith(AUTHSERV_ID)]  # fmt: skip
    assert len(ours) == 1
    results = our_results(delivered)
    assert (results["spf"].result, results["dmarc"].result) == ("pass", "none")

