"""A tiny pymilter milter that proves the Postfix test harness wiring.

Run: ``python harness_milter.py unix:/run/authmilter-test-x/harness.sock``. For every message it
adds ``X-Harness-Client: <client IP it saw>``, ``X-Harness-Daemon: <{daemon_name}>`` and
``X-Harness-Queue-Id: <{i}>`` at end of message. Subject ``reject me`` is rejected with
``550 5.7.1 harness says no`` (setreply), subject ``hold me`` is quarantined (hold queue).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import Milter

CONTINUE: int = Milter.CONTINUE
ACCEPT: int = Milter.ACCEPT
REJECT: int = Milter.REJECT


class HarnessMilter(Milter.Base):  # type: ignore[misc]
    """Per-connection state: the client and daemon name, and the current subject."""

    def __init__(self) -> None:
        self.client = ""
        self.daemon = ""
        self.subject = ""

    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self.client = hostaddr[0] if isinstance(hostaddr, tuple) else str(hostaddr)
        self.daemon = self.getsymval("{daemon_name}") or ""
        print(f"connect {hostname} {self.client} daemon={self.daemon}", file=sys.stderr)
        return CONTINUE

    def envfrom(self, mailfrom: str, *params: str) -> int:
        self.subject = ""
        return CONTINUE

    def header(self, name: str, value: str) -> int:
        if name.lower() == "subject":
            self.subject = value.strip()
        return CONTINUE

    def eom(self) -> int:
        queue_id = self.getsymval("i") or ""
        print(f"eom {queue_id} subject={self.subject!r}", file=sys.stderr)
        if self.subject == "reject me":
            self.setreply("550", "5.7.1", "harness says no")
            return REJECT
        if self.subject == "hold me":
            self.quarantine("harness says hold")
        self.addheader("X-Harness-Client", self.client)
        self.addheader("X-Harness-Daemon", self.daemon)
        self.addheader("X-Harness-Queue-Id", queue_id)
        return ACCEPT


def main(argv: list[str]) -> int:
    """Serve on the socket named in ``argv[1]`` until killed."""
    if len(argv) != 2:
        print("usage: harness_milter.py unix:/path/to/socket", file=sys.stderr)
        return 2
    # smtpd connects as user postfix: the socket must be writable by others (OpenDKIM's UMask).
    os.umask(0o000)
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    Milter.factory = HarnessMilter
    Milter.set_flags(Milter.ADDHDRS | Milter.QUARANTINE)
    Milter.runmilter("harness", argv[1], timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
