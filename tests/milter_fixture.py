"""Run the real ``authmilter run`` as a subprocess for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from postfix_fixture import _pid_alive, new_socket_dir, process_tree, wait_for_socket


class AuthmilterProcess:
    """``python -m authmilter run -c CONF`` on a UNIX socket Postfix can reach.

    ``conf`` is the configuration text without ``Socket``; the socket line is added here.
    """

    def __init__(self, conf: str, *, name: str = "authmilter") -> None:
        self.dir = new_socket_dir(f"{name}-")
        self.socket_path = self.dir / "milter.sock"
        self.conf_path = self.dir / "authmilter.conf"
        # Syslog is on by default; the tests read the lines on standard error.
        syslog = "" if re.search(r"^\s*Syslog\s", conf, flags=re.M) else "Syslog no\n"
        self.conf_path.write_text(f"Socket local:{self.socket_path}\nUMask 000\n{conf}"
                                  f"{'' if conf.endswith(chr(10)) or not conf else chr(10)}"
                                  f"{syslog}")  # fmt: skip
        self.log_path = self.dir / "authmilter.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def postfix_socket(self) -> str:
        """The socket in Postfix's notation, for ``smtpd_milters``."""
        return f"unix:{self.socket_path}"

    def start(self) -> AuthmilterProcess:
        """Start and wait until the socket accepts connections.

        May be called again after :meth:`kill_all` or :meth:`stop`: the same configuration and
        socket, the output appended to the same log.
        """
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "authmilter", "run", "-c", str(self.conf_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        proc = self.proc
        try:
            wait_for_socket(self.postfix_socket, timeout=20,
                            alive=lambda: proc.poll() is None)  # fmt: skip
        except BaseException:
            self.stop()
            raise AssertionError(f"authmilter did not start:\n{self.log()}") from None
        return self

    def log(self) -> str:
        """Everything the milter wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        """Wait until ``needle`` appears in the log; returns the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if needle in text:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in the authmilter log:\n{self.log()}")

    def pids(self) -> list[int]:
        """The running supervisor and all its descendants (the workers), from /proc."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return process_tree([self.proc.pid])

    def kill_all(self, timeout: float = 10.0) -> list[int]:
        """SIGKILL the supervisor and every worker, as a crash of the whole service would.

        Nothing is cleaned up (the socket file stays). Waits until every one of them is gone;
        returns their pids.
        """
        pids = self.pids()
        for pid in pids:  # the supervisor first: it cannot start replacements afterwards
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while (alive := [p for p in pids if _pid_alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.02)
        if alive:
            raise AssertionError(f"authmilter processes {alive} survived SIGKILL")
        return pids

    def kill(self) -> None:
        """SIGKILL: the milter vanishes without cleaning up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode

    def cleanup(self) -> None:
        """Stop and remove the directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def write_keytable(directory: Path, entries: dict[str, tuple[str, str, Path]],
                   signing: list[tuple[str, str]]) -> str:  # fmt: skip
    """Write key.table / signing.table; returns the config lines naming them."""
    kt = directory / "key.table"
    kt.write_text("".join(f"{name} {d}:{s}:{path}\n" for name, (d, s, path) in entries.items()))
    st = directory / "signing.table"
    st.write_text("".join(f"{pattern} {name}\n" for pattern, name in signing))
    return f"KeyTable file:{kt}\nSigningTable refile:{st}\n"
