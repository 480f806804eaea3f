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
from postfix_fixture import PostfixInstance


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
