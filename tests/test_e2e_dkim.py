"""End to end: real Postfix → ``smtpd_milters`` → ``authmilter run`` → real NSD.

Outbound mail from an internal client is signed, and the signatures verify with dkimpy (an
independent verifier) against the zone NSD serves. Inbound mail gets one Authentication-Results
header with our authserv-id; forged ones are removed; DNS failure gives temperror and the
configured action.
"""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import authres
import dkim
import pytest

from authmilter.cli import main as authmilter_main
from authmilter.keys import KeyAlgorithm, PrivateKey, generate_private_key, key_record_text
from authmilter.resolver import Resolver
from dnsserver import BlackholeDns, NsdServer, make_zone, txt_rdata
from milter_fixture import AuthmilterProcess, write_keytable
from postfix_fixture import PostfixInstance, SmtpTempfail, new_socket_dir

AUTHSERV_ID = "mx.authmilter.test"
OURS = "example.com"
REMOTE = "remote.test"


@dataclass
class World:
    """The keys, the DNS server and the directory every scenario shares."""

    dir: Path
    nsd: NsdServer
    remote_rsa: PrivateKey
    remote_ed: PrivateKey
    keytable_conf: str


@pytest.fixture(scope="module")
def world(nsd_server_module) -> Iterator[World]:  # type: ignore[no-untyped-def]
    directory = new_socket_dir("e2e-keys-")
    raw = ""
    for selector, args in (("rsa", ["-b", "2048"]), ("ed", ["--algorithm", "ed25519"])):
        assert authmilter_main(["genkey", "-D", str(directory), "-d", OURS, "-s", selector,
                                *args]) == 0  # fmt: skip
        raw += (directory / f"{selector}.txt").read_text()
    remote_rsa = generate_private_key(KeyAlgorithm.RSA, 2048)
    remote_ed = generate_private_key(KeyAlgorithm.ED25519)
    remote_zone = make_zone(REMOTE, [
        ("rsa._domainkey", "TXT", txt_rdata(key_record_text(remote_rsa))),
        ("ed._domainkey", "TXT", txt_rdata(key_record_text(remote_ed))),
    ])  # fmt: skip
    nsd = nsd_server_module({OURS: make_zone(OURS, raw=raw), REMOTE: remote_zone})
    conf = write_keytable(directory, {
        "rsa": (OURS, "rsa", directory / "rsa.private"),
        "ed": (OURS, "ed", directory / "ed.private"),
    }, [(f"*@{OURS}", "rsa"), (f"*@{OURS}", "ed")])  # fmt: skip
    yield World(directory, nsd, remote_rsa, remote_ed, conf)
    import shutil

    shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Stack:
    """One authmilter and the Postfix in front of it."""

    milter: AuthmilterProcess
    postfix: PostfixInstance


def start_stack(conf: str) -> Stack:
    milter = AuthmilterProcess(f"AuthservID {AUTHSERV_ID}\nSyslogSuccess yes\n{conf}").start()
    postfix = PostfixInstance(milter.postfix_socket).start()
    return Stack(milter, postfix)


def stop_stack(stack: Stack) -> None:
    stack.postfix.stop()
    stack.milter.cleanup()


@pytest.fixture(scope="module")
def relaxed(world: World) -> Iterator[Stack]:
    """RSA + Ed25519 dual signing (MultipleSignatures), relaxed/simple."""
    stack = start_stack(f"{world.keytable_conf}MultipleSignatures yes\n"
                        f"Canonicalization relaxed/simple\n"
                        f"Nameservers {world.nsd.nameserver}\n")  # fmt: skip
    yield stack
    stop_stack(stack)


@pytest.fixture(scope="module")
def simple(world: World) -> Iterator[Stack]:
    """One RSA signature with simple/simple canonicalization."""
    stack = start_stack(f"{world.keytable_conf}Canonicalization simple/simple\n"
                        f"Nameservers {world.nsd.nameserver}\n")  # fmt: skip
    yield stack
    stop_stack(stack)


def outbound_message(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Alice Example <alice@{OURS}>"
    msg["To"] = "bob@elsewhere.test"
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = email.utils.make_msgid(domain=OURS)
    msg.set_content("Hello Bob,\n\nthis line is long enough to be wrapped by nobody at all, "
                    "which is what we want.\n\n  Indented line with trailing space \n")  # fmt: skip
    return msg


def inbound_message(subject: str, body: str = "Hi there,\n\nsee you.\n") -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Remote Sender <carol@{REMOTE}>"
    msg["To"] = f"alice@{OURS}"
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = email.utils.make_msgid(domain=REMOTE)
    msg.set_content(body)
    return msg.as_bytes(policy=email.policy.SMTP)


def remote_sign(message: bytes, key: PrivateKey, selector: str) -> bytes:
    """Sign as the remote domain would, with dkimpy (an independent signer)."""
    algorithm = b"ed25519-sha256" if key.algorithm is KeyAlgorithm.ED25519 else b"rsa-sha256"
    sig = dkim.sign(message, selector.encode(), REMOTE.encode(), key.dkimpy_private(),
                    canonicalize=(b"relaxed", b"simple"), signature_algorithm=algorithm,
                    include_headers=[b"from", b"to", b"subject", b"date",
                                     b"message-id"])  # fmt: skip
    return sig + message


def verify_all(delivered: bytes, nameserver: str) -> list[bool]:
    """dkimpy verifies every DKIM-Signature of a delivered message against NSD."""
    resolver = Resolver([nameserver], timeout=2)
    d = dkim.DKIM(delivered)
    count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    return [d.verify(idx=i, dnsfunc=resolver.dkimpy_dnsfunc) for i in range(count)]


def our_ar(delivered: bytes) -> list[authres.AuthenticationResultsHeader]:
    msg = email.message_from_bytes(delivered)
    out = []
    for value in msg.get_all("Authentication-Results") or []:
        parsed = authres.AuthenticationResultsHeader.parse_value(
            " ".join(str(value).split()))
        if parsed.authserv_id == AUTHSERV_ID:
            out.append(parsed)
    return out


def our_ar_text(delivered: bytes) -> str:
    """Our Authentication-Results field, unfolded, as text (comments included)."""
    msg = email.message_from_bytes(delivered)
    (text,) = [" ".join(str(v).split()) for v in msg.get_all("Authentication-Results") or []
               if str(v).strip().startswith(AUTHSERV_ID)]  # fmt: skip
    return text


# -- outbound ---------------------------------------------------------------------------------


def test_internal_client_mail_is_signed_rsa_and_ed25519_and_verifies(relaxed: Stack,
                                                                   world: World) -> None:
    delivered = deliver(relaxed, outbound_message("dual signed"), inbound=False)
    msg = email.message_from_bytes(delivered)
    sigs = [" ".join(str(s).split()) for s in msg.get_all("DKIM-Signature") or []]
    assert len(sigs) == 2
    assert "a=rsa-sha256" in sigs[0] and "s=rsa" in sigs[0] and "c=relaxed/simple" in sigs[0]
    assert "a=ed25519-sha256" in sigs[1] and "s=ed" in sigs[1]
    assert all("h=from:" in s.replace(" ", "") for s in sigs)
    assert verify_all(delivered, world.nsd.nameserver) == [True, True]
    assert not our_ar(delivered), "signed outbound mail is not also verified"
    # One log line, keyed by Postfix's queue id (the {i} macro), as in Received: "id …".
    received = " ".join(str(email.message_from_bytes(delivered)["Received"]).split())
    queue_id = received.split(" id ")[1].split(";")[0].split()[0]
    relaxed.milter.wait_log(f"{queue_id}: signed d={OURS} s=rsa a=rsa-sha256, d={OURS} s=ed "
                            "a=ed25519-sha256, action=accept")  # fmt: skip


def test_simple_canonicalization_signature_survives_delivery(simple: Stack, world: World) -> None:
    # Folding and odd spacing that simple canonicalization signs exactly as they are.
    raw = (b"X-Folded: a header\r\n\t that is folded   with odd  spacing\r\n"
           + outbound_message("simple/simple").as_bytes(policy=email.policy.SMTP))
    delivered = deliver(simple, raw, inbound=False)
    sigs = email.message_from_bytes(delivered).get_all("DKIM-Signature") or []
    assert len(sigs) == 1 and "c=simple/simple" in " ".join(str(sigs[0]).split())
    assert b"X-Folded: a header\r\n\t that is folded   with odd  spacing\r\n" in delivered
    assert verify_all(delivered, world.nsd.nameserver) == [True]


def test_mail_from_a_domain_without_key_is_not_signed(relaxed: Stack) -> None:
    msg = outbound_message("no key")
    msg.replace_header("From", "someone@unrelated.test")
    delivered = deliver(relaxed, msg, inbound=False)
    assert email.message_from_bytes(delivered).get_all("DKIM-Signature") is None


# -- inbound ----------------------------------------------------------------------------------


def deliver(stack: Stack, message: bytes | EmailMessage, *, inbound: bool) -> bytes:
    """Send one message and return it as the sink received it (stacks are shared by tests)."""
    raw = message if isinstance(message, bytes) else message.as_bytes(policy=email.policy.SMTP)
    before = len(stack.postfix.delivered())
    if inbound:
        stack.postfix.send(raw, mail_from=f"carol@{REMOTE}", rcpt_to=[f"alice@{OURS}"],
                           port="inbound", client_ip="198.51.100.25")  # fmt: skip
    else:
        stack.postfix.send(raw, mail_from=f"alice@{OURS}", rcpt_to=["bob@elsewhere.test"],
                           port="submit")  # fmt: skip
    delivered = stack.postfix.wait_delivered(before + 1)
    assert len(delivered) == before + 1, "one message in, one message out"
    return delivered[-1]


def send_inbound(stack: Stack, message: bytes) -> bytes:
    return deliver(stack, message, inbound=True)


@pytest.mark.parametrize("algorithm", ["rsa", "ed"])
def test_external_valid_signature_gets_dkim_pass(relaxed: Stack, world: World,
                                                 algorithm: str) -> None:  # fmt: skip
    key = world.remote_rsa if algorithm == "rsa" else world.remote_ed
    delivered = send_inbound(relaxed, remote_sign(inbound_message(f"valid {algorithm}"), key,
                                                  algorithm))  # fmt: skip
    (ar,) = our_ar(delivered)
    (res,) = [r for r in ar.results if r.method == "dkim"]
    assert res.result == "pass"
    assert res.header_d == REMOTE and res.header_s == algorithm
    assert res.header_a == ("rsa-sha256" if algorithm == "rsa" else "ed25519-sha256")
    # authres drops comments when parsing; the comment is OpenDKIM's "(2048-bit key)".
    bits = "2048" if algorithm == "rsa" else "256"
    assert f"dkim=pass ({bits}-bit key) header.d={REMOTE}" in our_ar_text(delivered)
    header_b = next(p.value for p in res.properties if (p.type, p.name) == ("header", "b"))
    sig = " ".join(str(email.message_from_bytes(delivered)["DKIM-Signature"]).split())
    assert header_b and sig.replace(" ", "").split("b=")[-1].startswith(str(header_b))
    # The header sits above Postfix's own Received header (RFC 8601 §5: at the top).
    first = delivered.split(b"\r\n", 1)[0]
    assert first.startswith(b"Authentication-Results: " + AUTHSERV_ID.encode())


def test_modified_body_gets_dkim_fail(relaxed: Stack, world: World) -> None:
    signed = remote_sign(inbound_message("tampered"), world.remote_rsa, "rsa")
    tampered = signed.replace(b"see you.", b"send money.")
    delivered = send_inbound(relaxed, tampered)
    (ar,) = our_ar(delivered)
    assert [(r.method, r.result) for r in ar.results if r.method == "dkim"] == [("dkim", "fail")]
    assert "body hash did not verify" in our_ar_text(delivered)


def test_forged_ar_with_our_authserv_id_is_removed_and_others_kept(relaxed: Stack,
                                                                   world: World) -> None:
    forged = (f"Authentication-Results: {AUTHSERV_ID}; dkim=pass header.d={REMOTE}\r\n"
              f"Authentication-Results: {AUTHSERV_ID.upper()}; spf=pass "
              f"smtp.mailfrom=carol@{REMOTE}\r\n"
              "Authentication-Results: upstream.example.org; dkim=fail\r\n").encode()
    delivered = send_inbound(relaxed, forged + inbound_message("forged A-R"))
    values = [" ".join(str(v).split()) for v in
              email.message_from_bytes(delivered).get_all("Authentication-Results") or []]
    # Both fields claiming our authserv-id (in any letter case) are gone: what remains is the
    # upstream field and the one we wrote (SPF and DMARC; no dkim clause for unsigned mail).
    assert len(values) == 2 and values[1] == "upstream.example.org; dkim=fail"
    assert values[0].startswith(f"{AUTHSERV_ID}; spf=")
    assert "dkim=pass" not in values[0] and "spf=pass" not in values[0]


def test_unsigned_inbound_mail_has_no_dkim_clause_without_always_add(relaxed: Stack) -> None:
    delivered = send_inbound(relaxed, inbound_message("unsigned"))
    (ar,) = our_ar(delivered)
    assert [r.method for r in ar.results] == ["spf", "dmarc"]


# -- DNS failure ------------------------------------------------------------------------------


@pytest.fixture()
def deaf_dns() -> Iterator[BlackholeDns]:
    server = BlackholeDns().start()
    yield server
    server.stop()


def test_dns_server_that_does_not_answer_gives_tempfail_by_default(world: World,
                                                                   deaf_dns: BlackholeDns) -> None:
    stack = start_stack(f"{world.keytable_conf}Nameservers {deaf_dns.nameserver}\nDNSTimeout 1\n")
    try:
        signed = remote_sign(inbound_message("dns down"), world.remote_rsa, "rsa")
        with pytest.raises(SmtpTempfail) as exc:
            send_inbound(stack, signed)
        # Our 4.4.3 (a DNS failure), not the tempfail Postfix gives when the milter is too slow.
        assert exc.value.code == 451 and "4.4.3" in exc.value.text
        log = stack.milter.wait_log("dkim=temperror")
        # The key lookup went to the deaf server, once, and DNSTimeout 1 bounded it.
        assert f"rsa._domainkey.{REMOTE} TXT: timed out after 1s" in log
        asked = [q.name for q in deaf_dns.received()]
        assert asked.count(f"rsa._domainkey.{REMOTE}") == 1, asked
        assert stack.postfix.delivered() == []
    finally:
        stop_stack(stack)


def test_dns_error_with_on_dnserror_accept_delivers_temperror(world: World,
                                                              deaf_dns: BlackholeDns) -> None:
    stack = start_stack(f"{world.keytable_conf}Nameservers {deaf_dns.nameserver}\n"
                        "DNSTimeout 1\nOn-DNSError accept\n")  # fmt: skip
    try:
        delivered = send_inbound(stack, remote_sign(inbound_message("dns down, accept"),
                                                    world.remote_rsa, "rsa"))  # fmt: skip
        (ar,) = our_ar(delivered)
        assert [(r.method, r.result) for r in ar.results if r.method == "dkim"] == [
            ("dkim", "temperror")]
    finally:
        stop_stack(stack)
