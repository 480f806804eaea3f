"""Hostile input through a real Postfix and the real milter process (issue 6).

The nastiest cases of :mod:`test_hostile_input`, sent over SMTP to a private Postfix whose
``smtpd_milters`` is ``authmilter run``, with the attacker's address claimed through the PROXY
protocol and NSD serving the same zones. The assertions are on the message as delivered: the
headers a downstream reader gets (one Authentication-Results with our id, ours; no forged
Received-SPF), or the SMTP reply. Postfix itself rewrites some input before the milter sees
it (NUL, bare CR, bare LF); what it does is asserted here and explained in
``docs/hostile-input.md``. One Postfix and one milter serve the whole module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dkim
import pytest

from authmilter.keys import KeyAlgorithm, generate_private_key
from authmilter.resolver import Resolver
from dnsserver import NsdServer
from helpers import (
    AID,
    ATTACKER_IP,
    BANK,
    BOUNCE,
    EVIL,
    FORGED_SPF,
    HELO,
    INJECTED_AR,
    Keys,
    ar_fields,
    assert_no_pass_for_bank,
    compose,
    core_zones,
    dkim_of,
    dkim_sign,
    dmarc_of,
    field_values,
    garbage_signatures,
    nested_comments,
    our_ar,
    receiver_of,
    set_tag,
    sig_field,
    sig_tags,
    signed_by_evil,
    spf_of,
)
from milter_fixture import AuthmilterProcess
from postfix_fixture import PostfixInstance, SmtpPermfail


@dataclass
class Stack:
    keys: Keys
    nsd: NsdServer
    milter: AuthmilterProcess
    postfix: PostfixInstance

    def send(self, raw: bytes) -> tuple[int, str]:
        """Send ``raw`` verbatim (no line-end repair) from the attacker's address."""
        return self.postfix.send_raw(raw, mail_from=BOUNCE, rcpt_to=["user@ours.test"],
                                     port="inbound", client_ip=ATTACKER_IP, helo=HELO)  # fmt: skip

    def deliver(self, raw: bytes) -> bytes:
        """Send ``raw``; return the one message the sink got for it."""
        before = len(self.postfix.delivered())
        code, _ = self.send(raw)
        assert code == 250
        delivered = self.postfix.wait_delivered(before + 1)
        assert len(delivered) == before + 1, "one message in, one message out"
        return delivered[-1]


@pytest.fixture(scope="module")
def stack(nsd_server_module) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    keys = Keys(bank=generate_private_key(KeyAlgorithm.RSA, 2048),
                evil=generate_private_key(KeyAlgorithm.RSA, 2048))  # fmt: skip
    nsd = nsd_server_module(core_zones(keys))
    milter = AuthmilterProcess(f"AuthservID {AID}\nSyslogSuccess yes\n"
                               f"Nameservers {nsd.nameserver}\n").start()  # fmt: skip
    postfix = PostfixInstance(milter.postfix_socket).start()
    yield Stack(keys, nsd, milter, postfix)
    postfix.stop()
    milter.cleanup()


def dkimpy_verifies(delivered: bytes, stack: Stack) -> bool:
    """dkimpy (an independent verifier) on the delivered message, against NSD."""
    resolver = Resolver([stack.nsd.nameserver], timeout=2)
    try:
        return bool(dkim.verify(delivered, dnsfunc=resolver.dkimpy_dnsfunc))
    except dkim.ValidationError:
        return False


def header_of(delivered: bytes) -> bytes:
    return delivered.partition(b"\r\n\r\n")[0]


def ours(delivered: bytes) -> str:
    """Our Authentication-Results: the first field of the delivered message (RFC 8601 §5)."""
    assert delivered.startswith(f"Authentication-Results: {AID};".encode()), delivered[:200]
    return field_values(delivered, "Authentication-Results")[0]


# -- the cases --------------------------------------------------------------------------------


@pytest.mark.parametrize("froms", [[f"x@{EVIL}", f"ceo@{BANK}"], [f"x@{EVIL}, ceo@{BANK}"]],
                         ids=["two-from-fields", "one-from-two-domains"])  # fmt: skip
def test_multiple_authors_through_postfix_get_dmarc_permerror(stack: Stack,
                                                              froms: list[str]) -> None:
    delivered = stack.deliver(signed_by_evil(compose(*froms), stack.keys))
    value = ours(delivered)
    assert dmarc_of(value) == ("permerror", None)
    # h=from signs one From; a second one counts as added after signing (RFC 6376 §8.15):
    # the signature fails, for dkimpy as for us.
    signature = "fail" if len(froms) > 1 else "pass"
    assert dkim_of(value) == [(signature, EVIL)] and spf_of(value) == ("pass", BOUNCE)
    assert dkimpy_verifies(delivered, stack) is (signature == "pass")
    assert len(field_values(delivered, "From")) == len(froms)  # Postfix passed them on
    stack.milter.wait_log("dmarc=permerror")


def test_deeply_nested_comments_in_from_through_postfix(stack: Stack) -> None:
    """1000 nested comments before the address: a plain message for DMARC, never an internal
    error (which On-InternalError would answer with 451 4.3.0, again at every retry)."""
    value = ours(stack.deliver(compose(f"{nested_comments(1000)} ceo@{BANK}")))
    assert dmarc_of(value) == ("fail", BANK) and spf_of(value) == ("pass", BOUNCE)


def test_injected_authentication_results_through_postfix_leave_only_ours(stack: Stack) -> None:
    values = [v for _i, v, _c in INJECTED_AR]
    extra = (f"Authentication-Results : {AID}; dkim=pass header.d={BANK}\r\n"  # obs-field
             "Authentication-Results\t: upstream.example; dkim=fail\r\n"
             f"authentication-results: {AID}; dmarc=pass header.from={BANK}\r\n").encode()
    delivered = stack.deliver(extra + signed_by_evil(compose(f"ceo@{BANK}",
                                                             top=ar_fields(values)), stack.keys))
    value = ours(delivered)
    assert dmarc_of(value) == ("fail", BANK) and dkim_of(value) == [("pass", EVIL)]
    kept = [v for _i, v, c in INJECTED_AR if not c]
    seen = [" ".join(v.split()) for v in field_values(delivered, "Authentication-Results")]
    # Postfix reads "Name :" (RFC 5322 §4.5 obs-field) as the field and writes it "Name:": the
    # one claiming our id went, the other stays.
    assert seen[1:] == ["upstream.example; dkim=fail", *kept]
    assert b"Authentication-Results :" not in delivered


def test_forged_received_spf_through_postfix_leaves_ours_on_top(stack: Stack) -> None:
    raw = compose(f"ceo@{BANK}", top=[("Received-SPF", v) for _i, v, _c in FORGED_SPF])
    delivered = stack.deliver(raw)
    assert spf_of(ours(delivered)) == ("pass", BOUNCE)
    assert dmarc_of(ours(delivered)) == ("fail", BANK)
    values = [" ".join(v.split()) for v in field_values(delivered, "Received-SPF")]
    assert receiver_of(values[0]) == AID and f"client-ip={ATTACKER_IP};" in values[0]
    assert values[0].startswith("Pass (mailfrom) identity=mailfrom;")
    assert values[1:] == [v for _i, v, c in FORGED_SPF if not c]


def test_8bit_headers_and_nul_in_the_body_through_postfix(stack: Stack) -> None:
    """Postfix passes UTF-8, invalid UTF-8 and a NUL in the body through unchanged: the
    attacker's own signature over them verifies, here and for dkimpy after delivery."""
    subject = "Grüße \xff".encode("utf-8", "surrogateescape").replace(b"\xc3\xbf", b"\xff")
    raw = compose(f"Jörg <ceo@{BANK}>".encode(), subject=subject, body=b"wire\x00money\r\n")
    delivered = stack.deliver(signed_by_evil(raw, stack.keys))
    assert b"Subject: Gr\xc3\xbc\xc3\x9fe \xff\r\n" in delivered and b"wire\x00money" in delivered
    value = ours(delivered)
    assert dkim_of(value) == [("pass", EVIL)] and dmarc_of(value) == ("fail", BANK)
    assert dkimpy_verifies(delivered, stack)


def test_nul_and_bare_cr_in_headers_are_rewritten_by_postfix_before_the_milter(
        stack: Stack) -> None:  # fmt: skip
    """Postfix cuts a header line at NUL and turns a bare CR into a space, in the header and
    the body; the milter judges what is delivered: the signature over the original bytes
    fails for us exactly as it does for a verifier after delivery."""
    raw = compose(f"ceo@{BANK}\x00<x@{EVIL}>".encode(), subject=b"a\x00b\rc",
                  body=b"bare\rCR\r\n")  # fmt: skip
    delivered = stack.deliver(signed_by_evil(raw, stack.keys))
    head = header_of(delivered)
    assert b"\x00" not in head and f"\r\nFrom: ceo@{BANK}\r\n".encode() in head
    assert b"\r\nSubject: a\r\n" in head and b"\r\nbare CR\r\n" in delivered
    value = ours(delivered)
    assert dkim_of(value) == [("fail", EVIL)] and dmarc_of(value) == ("fail", BANK)
    assert not dkimpy_verifies(delivered, stack)


def test_hostile_dkim_signatures_through_postfix(stack: Stack) -> None:
    """Replayed bank.example signatures, tampered: an i= that would open a comment in our
    field, a duplicate d=, l=2**64. None passes, and our spf= and dmarc= stay readable."""
    raw = compose(f"ceo@{BANK}")
    tags = sig_tags(dkim_sign(raw, stack.keys.bank, BANK, length=True))
    sigs = b"".join(sig_field(m(tags)) for m in (set_tag("i", f"x(@{BANK}"),
                                                 lambda t: [*t, ("d", EVIL)],
                                                 set_tag("l", str(2**64))))  # fmt: skip
    value = ours(stack.deliver(sigs + raw))
    assert [(r.method, r.result) for r in our_ar(value).results] == [
        ("dkim", "fail"), ("dkim", "permerror"), ("dkim", "permerror"), ("spf", "pass"),
        ("dmarc", "fail")]  # fmt: skip
    assert_no_pass_for_bank(value)


def test_thousand_signatures_through_postfix_get_552(stack: Stack) -> None:
    """The 100 kB header is over MaximumHeaders: a permanent SMTP reject, nothing verified."""
    with pytest.raises(SmtpPermfail) as exc:
        stack.send(garbage_signatures(1000) + compose(f"ceo@{BANK}"))
    assert exc.value.code == 552 and exc.value.stage == "data"
    assert "5.3.4" in exc.value.text
    stack.milter.wait_log("exceeds MaximumHeaders 65536, action=reject")


def peak_memory_kib(stack: Stack) -> dict[int, int]:
    """VmHWM (peak resident memory) of the milter's supervisor and each worker, by pid."""
    assert stack.milter.proc is not None
    root = stack.milter.proc.pid
    peaks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        pid, ppid = int(entry.name), int(stat.rsplit(")", 1)[1].split()[1])
        if root in (pid, ppid):
            (hwm,) = [line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")]
            peaks[pid] = int(hwm)
    return peaks


def test_forty_megabyte_message_through_postfix(stack: Stack) -> None:
    """A big body streams through Postfix and the milter; the signature over it verifies, and
    no milter process grows by anything near the message size (the body is never kept)."""
    line = b"wire \t the  money\x00 \xc3\xa9 today \r\n"
    raw = signed_by_evil(compose(f"ceo@{BANK}", body=line * ((40 << 20) // len(line))),
                         stack.keys)  # fmt: skip
    before = peak_memory_kib(stack)
    delivered = stack.deliver(raw)
    after = peak_memory_kib(stack)
    assert len(delivered) > 40 << 20
    growth = max(after[pid] - before.get(pid, 0) for pid in after)
    assert growth < 16 << 10, f"a milter process grew by {growth} KiB for a 40 MiB message"
    value = ours(delivered)
    assert dkim_of(value) == [("pass", EVIL)] and dmarc_of(value) == ("fail", BANK)

