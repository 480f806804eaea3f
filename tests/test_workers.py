"""Worker processes: shared socket, connections spread, a dead worker replaced, clean stop."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path

import pytest

from milter_fixture import AuthmilterProcess
from postfix_fixture import (
    DEFAULT_INBOUND_CLIENT,
    LOOPBACK,
    PostfixInstance,
    _ProxySMTP,
    proxy_v1_line,
)


def children(pid: int) -> list[int]:
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if re.search(rf"^PPid:\s+{pid}$", text, flags=re.M):
            out.append(int(status.parent.name))
    return sorted(out)


@pytest.fixture()
def stack() -> Iterator[tuple[AuthmilterProcess, PostfixInstance]]:
    milter = AuthmilterProcess("AuthservID workers.test\nWorkers 2\nSyslogSuccess yes\n"
                               "AlwaysAddARHeader yes\n").start()  # fmt: skip
    postfix = PostfixInstance(milter.postfix_socket).start()
    yield milter, postfix
    postfix.stop()
    milter.cleanup()


def message(n: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "a@sender.test"
    msg["To"] = "b@rcpt.test"
    msg["Subject"] = f"message {n}"
    msg["Date"] = "Mon, 23 Nov 2026 03:00:00 +0000"
    msg.set_content("hello\n")
    return msg


def send_many(postfix: PostfixInstance, count: int) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda n: postfix.send(message(n), mail_from="a@sender.test",
                                             rcpt_to=["b@rcpt.test"], port="inbound"),
                      range(count)))  # fmt: skip


def test_two_workers_share_the_socket_and_both_take_connections(stack) -> None:
    milter, postfix = stack
    assert milter.proc is not None
    workers = children(milter.proc.pid)
    assert len(workers) == 2
    send_many(postfix, 40)
    postfix.wait_delivered(40, timeout=60)
    handled = {int(pid) for pid in re.findall(r"authmilter\[(\d+)\]: \w+: ", milter.log())}
    assert handled <= set(workers)
    assert len(handled) == 2, f"only {handled} of {workers} took connections"


def test_a_killed_worker_is_replaced_and_mail_keeps_flowing(stack) -> None:
    milter, postfix = stack
    assert milter.proc is not None
    before = children(milter.proc.pid)
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = children(milter.proc.pid)
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"no replacement worker: {children(milter.proc.pid)}")
    assert f"worker {victim} exited (killed by signal 9); starting a new one" in milter.log()
    send_many(postfix, 6)
    assert len(postfix.wait_delivered(6, timeout=30)) == 6


def test_sigterm_stops_every_worker_and_removes_the_socket(stack) -> None:
    milter, _postfix = stack
    assert milter.proc is not None
    workers = children(milter.proc.pid)
    assert milter.stop() == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert not milter.socket_path.exists()


def test_a_stop_finishes_the_message_in_flight_and_takes_no_new_connection(stack) -> None:
    """SIGTERM between RCPT and DATA: the worker holding the message answers it (the mail is
    delivered with our header), then every process exits, well within 5 s."""
    milter, postfix = stack
    assert milter.proc is not None
    port = postfix.port_number("inbound")
    client = _ProxySMTP(proxy_v1_line(DEFAULT_INBOUND_CLIENT, server_port=port), timeout=30,
                        source_ip=None)  # fmt: skip
    try:
        assert client.connect(LOOPBACK, port)[0] == 220
        client.ehlo("client.test")
        assert client.mail("a@sender.test")[0] == 250
        assert client.rcpt("b@rcpt.test")[0] == 250  # the milter has the message now
        started = time.monotonic()
        milter.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert milter.proc.poll() is None, "the milter left with a message in flight"
        code, _ = client.data(message(99).as_bytes())
        assert code == 250
    finally:
        client.close()
    milter.proc.wait(timeout=10)
    stopped = time.monotonic() - started
    assert milter.proc.returncode == 0
    assert stopped < 5, f"the stop took {stopped:.1f} s"
    (delivered,) = postfix.wait_delivered(1, timeout=30)
    assert authserv_ids(delivered) == ["workers.test"]
    assert not milter.socket_path.exists()
    assert "killing them" not in milter.log()


def authserv_ids(delivered: bytes) -> list[str]:
    import email

    msg = email.message_from_bytes(delivered)
    return [str(v).split(";")[0].strip() for v in msg.get_all("Authentication-Results") or []]


def test_sighup_reloads_config_without_dropping_mail_and_a_bad_reload_keeps_the_old(
        stack) -> None:  # fmt: skip
    milter, postfix = stack
    assert milter.proc is not None
    send_many(postfix, 2)
    assert authserv_ids(postfix.wait_delivered(2)[-1]) == ["workers.test"]
    milter.conf_path.write_text(milter.conf_path.read_text().replace(
        "AuthservID workers.test", "AuthservID reloaded.test"))
    old_workers = children(milter.proc.pid)
    # Mail keeps flowing while the workers are replaced: none of it is refused.
    with ThreadPoolExecutor(max_workers=1) as pool:
        sending = pool.submit(send_many, postfix, 30)
        time.sleep(0.2)
        os.kill(milter.proc.pid, signal.SIGHUP)
        sending.result(timeout=120)
    milter.wait_log("reloaded: new workers take new connections; the old ones finish theirs")
    delivered = postfix.wait_delivered(32, timeout=60)
    assert len(delivered) == 32
    # No tempfail reply nor killed worker (a queue id may hold the digits 451: whole words).
    assert not re.search(r"\b451\b|\bkilled\b|action=tempfail", milter.log()), milter.log()
    send_many(postfix, 1)
    assert authserv_ids(postfix.wait_delivered(33)[-1]) == ["reloaded.test"]
    # The old workers finished their connections and left; two new ones serve.
    deadline = time.monotonic() + 30
    while set(children(milter.proc.pid)) & set(old_workers):
        assert time.monotonic() < deadline, "the old workers did not leave"
        time.sleep(0.1)
    assert len(children(milter.proc.pid)) == 2

    milter.conf_path.write_text(milter.conf_path.read_text() + "Canonicalisation relaxed\n")
    os.kill(milter.proc.pid, signal.SIGUSR1)
    log = milter.wait_log("reload failed, keeping the running configuration")
    assert "unknown directive 'Canonicalisation'" in log
    send_many(postfix, 1)
    assert authserv_ids(postfix.wait_delivered(34)[-1]) == ["reloaded.test"]


def test_workers_stop_when_the_supervisor_is_killed(stack) -> None:  # fmt: skip
    milter, _postfix = stack
    assert milter.proc is not None
    workers = children(milter.proc.pid)
    assert len(workers) == 2
    milter.kill()  # SIGKILL: the parent cannot forward anything
    deadline = time.monotonic() + 30
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in workers if Path(f"/proc/{p}").exists()
                 and " Z " not in Path(f"/proc/{p}/stat").read_text()]  # fmt: skip
    assert alive == [], "orphaned workers keep running"
