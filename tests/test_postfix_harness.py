"""The Postfix end-to-end harness itself: real Postfix → smtpd_milters → a tiny milter → sink.

The milter is ``tests/data/harness_milter.py`` (pymilter, in a subprocess on a ``unix:``
socket): it adds ``X-Harness-Client`` / ``X-Harness-Daemon`` headers, rejects ``reject me``
with ``550 5.7.1 harness says no`` and quarantines ``hold me``.
"""

from __future__ import annotations

import email
import email.policy
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

import postfix_fixture
from postfix_fixture import (
    HarnessError,
    PostfixInstance,
    PostfixStarter,
    SmtpPermfail,
    SmtpTempfail,
    wait_for_socket,
)

HARNESS_MILTER = Path(__file__).parent / "data" / "harness_milter.py"
SENDER = "alice@example.org"
RECIPIENT = "bob@example.net"


class HarnessMilter:
    """The harness milter as a subprocess; output goes to a file next to its socket."""

    def __init__(self, socket_dir: Path) -> None:
        self.path = socket_dir / "harness.sock"
        self.socket = f"unix:{self.path}"
        self.log_path = socket_dir / "harness-milter.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HarnessMilter:
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, str(HARNESS_MILTER), self.socket],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.proc = proc
        try:
            wait_for_socket(self.socket, timeout=10, alive=lambda: proc.poll() is None)
        except BaseException as exc:
            self.kill()
            exc.add_note(f"harness milter output:\n{self.log_path.read_text(errors='replace')}")
            raise
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None


@pytest.fixture()
def harness_milter(milter_socket_dir: Path) -> Iterator[HarnessMilter]:
    milter = HarnessMilter(milter_socket_dir).start()
    yield milter
    milter.kill()


@pytest.fixture()
def postfix(harness_milter: HarnessMilter, postfix_factory: PostfixStarter) -> PostfixInstance:
    return postfix_factory(harness_milter.socket, milter_default_action="tempfail")


def make_message(subject: str = "harness test", body: str = "hello harness\n") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = RECIPIENT
    msg["Subject"] = subject
    msg["Date"] = "Mon, 23 Nov 2026 03:00:00 +0000"
    msg["Message-ID"] = "<harness-1@example.org>"
    msg.set_content(body)
    return msg


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_submit_port_mail_reaches_sink_with_milter_headers_for_loopback_client(
    postfix: PostfixInstance,
) -> None:
    code, text = postfix.send(make_message(), mail_from=SENDER, rcpt_to=[RECIPIENT], port="submit")

    assert code == 250 and text.startswith("2.0.0 Ok: queued as ")
    [raw] = postfix.wait_delivered(1)
    msg = parse(raw)
    assert msg["X-Harness-Client"] == "127.0.0.1"
    assert msg["X-Harness-Daemon"] == "ORIGINATING"
    assert msg["X-Harness-Queue-Id"] == text.rsplit(" ", 1)[1]
    assert msg["Received"].startswith("from client.example (unknown [127.0.0.1])")
    assert raw.endswith(b"\r\n\r\nhello harness\r\n")
    [delivery] = postfix.deliveries()
    assert (delivery.mail_from, delivery.rcpt_to) == (SENDER, (RECIPIENT,))
    assert delivery.path.read_bytes() == raw


def test_inbound_port_milter_sees_the_address_claimed_by_proxy_line(
    postfix: PostfixInstance,
) -> None:
    postfix.send(
        make_message(),
        mail_from=SENDER,
        rcpt_to=[RECIPIENT],
        port="inbound",
        client_ip="198.51.100.25",
    )
    postfix.send(
        make_message(),
        mail_from=SENDER,
        rcpt_to=[RECIPIENT],
        port="inbound",
        client_ip="2001:db8::25",
    )

    first, second = (parse(raw) for raw in postfix.wait_delivered(2))
    assert first["X-Harness-Client"] == "198.51.100.25"
    assert first["X-Harness-Daemon"] == "INBOUND"
    assert second["X-Harness-Client"] == "2001:db8::25"
    assert second["X-Harness-Daemon"] == "INBOUND"


def test_submit_port_client_ip_binds_another_loopback_address(postfix: PostfixInstance) -> None:
    postfix.send(make_message(), mail_from=SENDER, rcpt_to=[RECIPIENT], client_ip="127.0.0.5")

    [raw] = postfix.wait_delivered(1)
    assert parse(raw)["X-Harness-Client"] == "127.0.0.5"


def test_milter_reject_raises_permfail_with_setreply_text(postfix: PostfixInstance) -> None:
    with pytest.raises(SmtpPermfail) as info:
        postfix.send(make_message("reject me"), mail_from=SENDER, rcpt_to=[RECIPIENT])

    assert (info.value.stage, info.value.code, info.value.text) == (
        "data",
        550,
        "5.7.1 harness says no",
    )
    assert postfix.queue_json() == []
    postfix.send(make_message("after the reject"), mail_from=SENDER, rcpt_to=[RECIPIENT])
    [raw] = postfix.wait_delivered(1)
    assert parse(raw)["Subject"] == "after the reject"


def test_dead_milter_with_tempfail_default_action_tempfails_until_it_is_back(
    postfix: PostfixInstance, harness_milter: HarnessMilter
) -> None:
    harness_milter.kill()

    with pytest.raises(SmtpTempfail) as info:
        postfix.send(make_message("milter down"), mail_from=SENDER, rcpt_to=[RECIPIENT])
    assert info.value.code == 451
    assert info.value.text.startswith("4.7.1 ")
    assert postfix.queue_json() == []
    assert postfix.deliveries() == []

    harness_milter.start()
    postfix.send(make_message("milter back"), mail_from=SENDER, rcpt_to=[RECIPIENT])
    [raw] = postfix.wait_delivered(1)
    assert parse(raw)["Subject"] == "milter back"


def test_quarantined_mail_is_held_and_delivered_after_release(postfix: PostfixInstance) -> None:
    postfix.send(make_message("hold me"), mail_from=SENDER, rcpt_to=[RECIPIENT])

    [held] = postfix.held()
    assert held["sender"] == SENDER
    assert [r["address"] for r in held["recipients"]] == [RECIPIENT]
    postfix.wait_log(r"milter-hold: END-OF-MESSAGE .* milter triggers HOLD action")
    assert postfix.deliveries() == []

    postfix.release_held()
    postfix.flush()
    [raw] = postfix.wait_delivered(1)
    assert parse(raw)["X-Harness-Queue-Id"] == held["queue_id"]
    # The sink has the message before Postfix has read its 250 and removed the queue file.
    postfix.wait_queue(lambda queue: queue == [], what="an empty queue")


def test_deferred_mail_is_delivered_after_flush(postfix: PostfixInstance) -> None:
    postfix.sink.data_reply = "451 4.3.0 sink says later"
    postfix.send(make_message("deferred"), mail_from=SENDER, rcpt_to=[RECIPIENT])

    [deferred] = postfix.wait_queue(
        lambda q: [m["queue_name"] for m in q] == ["deferred"], what="one deferred message"
    )
    assert "sink says later" in deferred["recipients"][0]["delay_reason"]

    postfix.sink.data_reply = None
    postfix.flush()
    [raw] = postfix.wait_delivered(1)
    assert parse(raw)["Subject"] == "deferred"


def test_send_normalizes_line_ends_and_stuffs_dots_send_raw_does_neither(
    postfix_factory: PostfixStarter,
) -> None:
    postfix = postfix_factory(None)
    postfix.send(
        b"Subject: lf\n\n.leading dot\nlast line",
        mail_from=SENDER,
        rcpt_to=[RECIPIENT],
        port="inbound",
    )
    postfix.send_raw(
        b"Subject: raw\r\n\r\n..stuffed by caller\r\nbare\nnewline",
        mail_from=SENDER,
        rcpt_to=[RECIPIENT],
        port="inbound",
    )

    first, second = postfix.wait_delivered(2)
    assert first.endswith(b"Subject: lf\r\n\r\n.leading dot\r\nlast line\r\n")
    # Postfix itself turns the bare LF into a line end on the way through.
    assert second.endswith(b"Subject: raw\r\n\r\n.stuffed by caller\r\nbare\r\nnewline\r\n")


def test_stop_ends_every_postfix_process_and_removes_the_directory() -> None:
    postfix_fixture.require_postfix()
    with PostfixInstance() as postfix:
        master = postfix.master_pid
        assert master is not None
        tree = postfix_fixture.process_tree([master])
        assert tree[0] == master and tree[1:]  # children: at least qmgr, pickup, postlogd
        base = postfix.base
        assert base is not None and base.is_dir()

    for pid in tree:
        assert not postfix_fixture._pid_alive(pid)
    assert not base.exists()
    assert postfix.submit_port not in postfix_fixture._listening_ports()


def test_missing_postfix_fails_instead_of_skipping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postfix_fixture, "POSTFIX", "/nonexistent/sbin/postfix")

    with pytest.raises(pytest.fail.Exception, match="run `make test`, it installs Postfix"):
        postfix_fixture.require_postfix()


def test_socket_dir_is_reachable_by_postfix(milter_socket_dir: Path) -> None:
    assert milter_socket_dir.stat().st_mode & 0o777 == 0o755
    assert all(os.stat(p).st_mode & 0o001 for p in milter_socket_dir.parents)


def listening_unix_socket(path: Path, mode: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    path.chmod(mode)
    return sock


def test_wait_for_socket_refuses_a_socket_postfix_cannot_write(milter_socket_dir: Path) -> None:
    path = milter_socket_dir / "umask022.sock"
    with listening_unix_socket(path, 0o755), pytest.raises(HarnessError, match="not writable"):
        wait_for_socket(f"unix:{path}", timeout=1)


def test_wait_for_socket_refuses_a_socket_in_a_private_directory(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    path = private / "milter.sock"
    with listening_unix_socket(path, 0o777), pytest.raises(HarnessError, match="cannot enter"):
        wait_for_socket(f"unix:{path}", timeout=1)
