"""A SIGKILLed milter costs no mail: Postfix with ``milter_default_action = tempfail`` defers.

Real Postfix, the real ``authmilter run`` (supervisor and two workers) and a real NSD. Mail
flows; then the whole milter is SIGKILLed with a transaction in flight. Postfix answers that
transaction and every new one with 451 4.7.1, and queues nothing unchecked. The client keeps
the refused messages; once the milter is started again on the same socket, it sends them again
and every message arrives exactly once, signed or with our Authentication-Results. The long
version is ``make loadtest`` (loadtest/run.py, docs/load.md); its ``--quick`` run is here too.
"""

from __future__ import annotations

import collections
import email
import email.policy
import email.utils
import re
import shutil
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import authres
import dkim
import pytest

import postfix_fixture
from authmilter.keys import KeyAlgorithm, PrivateKey, generate_private_key, key_record_text
from dnsserver import make_zone, txt_rdata
from milter_fixture import AuthmilterProcess, write_keytable
from postfix_fixture import PostfixInstance, SmtpTempfail, new_socket_dir, wire_form

REPO = Path(__file__).resolve().parents[1]
AUTHSERV_ID = "mx.kill.test"
OURS = "ours.example"  # we sign for it
REMOTE = "remote.example"  # SPF passes for the outside client the PROXY line claims
SELECTOR = "sel"
RCPT = "user@rcpt.example"


@dataclass
class Stack:
    milter: AuthmilterProcess
    postfix: PostfixInstance
    key: PrivateKey


@pytest.fixture()
def stack(nsd_server) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    key = generate_private_key(KeyAlgorithm.RSA, 2048)
    keydir = new_socket_dir("kill-restart-keys-")
    key_path = keydir / f"{SELECTOR}.private"
    key_path.write_bytes(key.pem())
    key_path.chmod(0o600)
    nsd = nsd_server({
        OURS: make_zone(OURS, [(f"{SELECTOR}._domainkey", "TXT",
                                txt_rdata(key_record_text(key)))]),
        REMOTE: make_zone(REMOTE, [("@", "TXT", txt_rdata("v=spf1 ip4:198.51.100.0/24 -all"))]),
    })  # fmt: skip
    tables = write_keytable(keydir, {"k": (OURS, SELECTOR, key_path)}, [(f"*@{OURS}", "k")])
    milter = AuthmilterProcess(f"AuthservID {AUTHSERV_ID}\nWorkers 2\n"
                               f"Nameservers {nsd.nameserver}\n{tables}").start()  # fmt: skip
    postfix = PostfixInstance(milter.postfix_socket, milter_default_action="tempfail").start()
    try:
        yield Stack(milter, postfix, key)
    finally:
        postfix.stop()
        milter.cleanup()
        shutil.rmtree(keydir, ignore_errors=True)


@dataclass(frozen=True)
class Mail:
    token: str
    port: postfix_fixture.Port
    mail_from: str
    data: bytes


def mail(n: int, port: postfix_fixture.Port) -> Mail:
    sender = f"alice@{OURS}" if port == "submit" else f"carol@{REMOTE}"
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = RCPT
    msg["Subject"] = f"kill/restart {n}"
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = f"<kill.{n}@{sender.split('@')[1]}>"
    msg["X-Token"] = f"kill-{n}"
    msg.set_content(f"message {n}\n")
    return Mail(f"kill-{n}", port, sender, msg.as_bytes(policy=email.policy.SMTP))


def send(stack: Stack, m: Mail) -> tuple[int, str]:
    return stack.postfix.send(m.data, mail_from=m.mail_from, rcpt_to=[RCPT], port=m.port)


def token(raw: bytes) -> str:
    found = re.search(rb"^X-Token: (\S+)\r?$", raw, re.M)
    assert found, raw[:500]
    return found.group(1).decode()


def check_delivered(raw: bytes, port: str, key: PrivateKey) -> None:
    msg = email.message_from_bytes(raw)
    if port == "submit":
        [sig] = msg.get_all("DKIM-Signature") or [None]
        assert sig is not None and f"d={OURS}" in " ".join(str(sig).split())

        def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
            assert name.decode().rstrip(".") == f"{SELECTOR}._domainkey.{OURS}"
            return key_record_text(key).encode()

        assert dkim.verify(raw, dnsfunc=dnsfunc), "our DKIM-Signature does not verify"
    else:
        ours = [" ".join(str(v).split()) for v in msg.get_all("Authentication-Results") or []
                if str(v).strip().startswith(AUTHSERV_ID)]  # fmt: skip
        assert len(ours) == 1, msg.get_all("Authentication-Results")
        results = {r.method: r.result for r in authres.all_features().parse_value(ours[0]).results}
        assert results.get("spf") == "pass" and results.get("dmarc") == "none", ours[0]


def test_sigkilled_milter_makes_postfix_tempfail_and_no_mail_is_lost_after_restart(
        stack: Stack) -> None:  # fmt: skip
    before = [mail(n, "submit" if n % 2 else "inbound") for n in range(4)]
    for m in before:
        assert send(stack, m)[0] == 250
    stack.postfix.wait_delivered(len(before), timeout=30)

    # A transaction in flight: the milter has seen CONNECT … RCPT; the body is not sent yet.
    in_flight = mail(4, "submit")
    smtp = smtplib.SMTP(postfix_fixture.LOOPBACK, stack.postfix.port_number("submit"), timeout=30)
    try:
        assert smtp.ehlo("client.example")[0] == 250
        assert smtp.docmd("MAIL", f"FROM:<{in_flight.mail_from}>")[0] == 250
        assert smtp.docmd("RCPT", f"TO:<{RCPT}>")[0] == 250
        assert smtp.docmd("DATA")[0] == 354
        old_pid = stack.milter.proc.pid if stack.milter.proc else 0
        pids = stack.milter.kill_all()
        assert len(pids) == 3, f"supervisor and two workers expected, SIGKILLed {pids}"
        smtp.send(wire_form(in_flight.data))
        code, text = smtp.getreply()
        assert (code, text[:5]) == (451, b"4.7.1"), (code, text)
    finally:
        smtp.close()

    # While the milter is down, every new transaction is deferred (4xx), on both ports.
    while_down = [mail(n, "submit" if n % 2 else "inbound") for n in range(5, 9)]
    for m in while_down:
        with pytest.raises(SmtpTempfail) as refused:
            send(stack, m)
        assert refused.value.code == 451 and refused.value.text.startswith("4.7.1"), refused.value
    # Nothing was queued unchecked, and nothing more reached the sink (the queue may still
    # hold an earlier message for a moment after the sink took it).
    stack.postfix.wait_queue(lambda queue: queue == [], what="an empty queue")
    assert len(stack.postfix.delivered()) == len(before)

    stack.milter.start()  # the same configuration and socket
    assert stack.milter.proc is not None and stack.milter.proc.pid != old_pid
    retried = [in_flight, *while_down]
    for m in retried:  # the client's retry
        assert send(stack, m)[0] == 250
    stack.postfix.flush()
    everything = [*before, *retried]
    stack.postfix.wait_delivered(len(everything), timeout=30)
    stack.postfix.wait_queue(lambda q: q == [], what="an empty queue", timeout=30)
    delivered = stack.postfix.delivered()
    counts = collections.Counter(token(raw) for raw in delivered)
    assert counts == {m.token: 1 for m in everything}, counts
    port_of = {m.token: m.port for m in everything}
    for raw in delivered:
        check_delivered(raw, port_of[token(raw)], stack.key)


def test_example_postfix_snippet_recommends_milter_default_action_tempfail() -> None:
    text = (REPO / "etc" / "postfix-main.cf.snippet").read_text()
    settings = re.findall(r"^\s*milter_default_action\s*=\s*(\S+)\s*$", text, re.M)
    assert settings == ["tempfail"], settings
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("milter_default_action"))
    above = []
    while at > 0 and lines[at - 1].startswith("#"):
        at -= 1
        above.append(lines[at])
    assert "defer" in " ".join(above), f"no comment saying the mail is deferred: {above}"


def test_quick_load_test_accounts_for_every_message_across_a_kill() -> None:
    """``loadtest/run.py --quick``: a few hundred mixed messages, the milter SIGKILLed and
    restarted mid-run; exit 0 means none lost, none duplicated, no unexpected result."""
    postfix_fixture.require_postfix()
    doc = REPO / "docs" / "load.md"
    doc_before = doc.read_bytes() if doc.exists() else None
    proc = subprocess.run(
        [sys.executable, str(REPO / "loadtest" / "run.py"), "--quick"],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "**Result: PASS**" in proc.stdout, out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in proc.stdout.splitlines() if line.startswith("| ")}  # fmt: skip
    # sent, delivered, rejected, lost, duplicated, unexpected, 4xx replies
    kill = rows["kill"]
    assert int(kill[0]) == int(kill[1]) + int(kill[2]) > 0, kill
    assert kill[3:6] == ["0", "0", "0"], kill
    assert int(kill[6]) > 0, "the kill phase saw no 4xx: the milter was not down"
    assert doc_before == (doc.read_bytes() if doc.exists() else None), "--quick wrote the doc"
