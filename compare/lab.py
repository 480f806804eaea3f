"""The daemons of ``make compare``, built on the test fixtures (``tests/`` is put on sys.path).

* :class:`Nsd53`: the fixture's NSD on port 53 of a 127.x.y.z address, because OpenDMARC and
  policyd-spf resolve through /etc/resolv.conf, which cannot name a port.
* :class:`AnchorPostfix`: the fixture's Postfix, started (``postfix start``) inside a mount
  namespace whose /etc/resolv.conf names that NSD, so that everything master spawns, the
  ``policyd-spf`` policy service included, resolves there; with a policyd-spf file it gets the
  ``spawn`` service of Debian's README and ``check_policy_service`` at RCPT.
* :class:`AnchorOpenDkim`: the fixture's OpenDKIM (syslog captured), but reading the config
  set's own opendkim.conf instead of writing one.
* :class:`NamespacedDaemon`: OpenDMARC and authmilter, each in a mount namespace with the
  private resolv.conf and a captured /dev/log, output to a file, stopped by pid.

Nothing here edits a file outside the directories it creates; the machine's /etc/resolv.conf
is only ever covered by a bind mount inside a private mount namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from compare.corpus import Role  # noqa: E402
from dnsserver import NsdServer  # noqa: E402
from opendkim_fixture import OpenDkim, SyslogCatcher  # noqa: E402
from postfix_fixture import (  # noqa: E402
    COMMAND_TIMEOUT,
    HarnessError,
    PostfixInstance,
    SmtpConnectionLost,
    SmtpRejected,
    new_socket_dir,
    process_tree,
    wait_for_socket,
)

__all__ = ["PostfixInstance", "SmtpConnectionLost", "SmtpRejected", "new_socket_dir"]

UNSHARE = "/usr/bin/unshare"
OPENDMARC = "/usr/sbin/opendmarc"
POLICYD_SPF = "/usr/bin/policyd-spf"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

#: ``sh -c`` script: private mounts, $1 over /etc/resolv.conf, then (when $2 is not empty) an
#: overlay on /dev whose upper layer $2 holds a ``log`` symlink to a catcher socket; exec the
#: rest. The overlay is best effort (the daemon runs without a log if it fails).
NAMESPACE_SCRIPT = (
    'mount --make-rprivate / && mount --bind "$1" /etc/resolv.conf || exit 97; '
    'if [ -n "$2" ]; then mount -t overlay overlay '
    '-o lowerdir=/dev,upperdir="$2",workdir="$3" /dev '
    "|| echo 'compare/lab.py: no /dev/log capture (overlay mount failed)' >&2; fi; "
    'shift 3; exec "$@"'
)


class LabError(HarnessError):
    """A daemon of the comparison could not be configured or started."""


def free_dns_address(candidates: Sequence[str]) -> str:
    """The first of ``candidates`` where UDP and TCP port 53 are free right now (another run of
    the comparison, or the benchmark, may hold one).

    :raises LabError: all are taken.
    """
    for address in candidates:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                udp.bind((address, 53))
                tcp.bind((address, 53))
        except OSError:
            continue
        return address
    raise LabError(f"port 53 is taken on every one of {', '.join(candidates)}")


def resolv_conf_text(address: str) -> str:
    """A resolv.conf naming only the NSD at ``address`` (port 53)."""
    return f"nameserver {address}\noptions attempts:2 timeout:2\n"


class Nsd53(NsdServer):
    """The fixture's NSD, on port 53 of ``address`` (resolv.conf cannot name a port)."""

    def __init__(self, zones: Mapping[str, str], address: str) -> None:
        super().__init__(zones)
        self.host = address

    @property
    def port(self) -> int:
        return 53

    @port.setter
    def port(self, value: int) -> None:
        pass

    def start(self) -> Nsd53:
        conf = self._config_text()
        if "rrl-ratelimit: 0" not in conf or "rrl-whitelist-ratelimit: 0" not in conf:
            raise LabError("tests/dnsserver.py no longer turns NSD's response-rate limiting off")
        super().start()
        return self


class AnchorPostfix(PostfixInstance):
    """The fixture's Postfix in a mount namespace with ``resolv_conf`` over /etc/resolv.conf.

    With ``policyd_spf_conf``, master.cf gets Debian's ``policyd-spf`` spawn service reading
    that file, and ``smtpd_recipient_restrictions = check_policy_service`` calls it at RCPT.
    """

    def __init__(self, milter_socket: str | None, *, resolv_conf: Path,
                 policyd_spf_conf: Path | None) -> None:  # fmt: skip
        main_cf: dict[str, str] = {}
        if policyd_spf_conf is not None:
            main_cf["smtpd_recipient_restrictions"] = (
                "check_policy_service unix:private/policyd-spf")
            main_cf["policyd-spf_time_limit"] = "3600"
        super().__init__(milter_socket, main_cf=main_cf)
        self.resolv_conf = resolv_conf
        self.policyd_spf_conf = policyd_spf_conf

    def _master_cf(self) -> str:
        text = super()._master_cf()
        if self.policyd_spf_conf is not None:
            text += (
                "policyd-spf unix - n n - 0 spawn\n"
                f"  user=policyd-spf argv={POLICYD_SPF} {self.policyd_spf_conf}\n"
            )
        return text

    def _run(self, *argv: str, timeout: float = COMMAND_TIMEOUT) -> tuple[int, str]:
        if argv[-1:] == ("start",):
            # master and all it spawns (smtpd, policyd-spf) inherit the mount namespace.
            argv = (UNSHARE, "-m", "sh", "-c", NAMESPACE_SCRIPT, "postfix-ns",
                    str(self.resolv_conf), "", "", *argv)  # fmt: skip
        return super()._run(*argv, timeout=timeout)


class AnchorOpenDkim(OpenDkim):
    """The fixture's OpenDKIM process control and syslog capture, reading ``conf`` as it is.

    ``socket_path`` must be the ``Socket local:…`` of that file.
    """

    def __init__(self, conf: Path, socket_path: Path) -> None:
        super().__init__(mode="sv", nameserver="127.0.0.1:53", dns_zones=[])
        self._conf = conf
        self._socket = socket_path

    @property
    def conf_path(self) -> Path:
        return self._conf

    @property
    def socket_path(self) -> Path:
        return self._socket

    def _write_config(self) -> None:
        """Nothing to write: the config set's file is used unchanged."""

    def cleanup(self) -> None:
        """Stop and remove the directory, the latter even when the stop is interrupted."""
        try:
            self.stop()
        finally:
            super().cleanup()


class NamespacedDaemon:
    """``argv`` in a mount namespace with ``resolv_conf`` and a captured /dev/log.

    The daemon's output goes to ``<dir>/output.log``, its syslog to ``<dir>/syslog.log``. It is
    stopped by pid (SIGTERM, then SIGKILL for it and every descendant).
    """

    def __init__(self, name: str, argv: Sequence[str], *, socket_path: Path,
                 resolv_conf: Path) -> None:  # fmt: skip
        self.name = name
        self.argv = list(argv)
        self.socket_path = socket_path
        self.resolv_conf = resolv_conf
        self.dir = new_socket_dir(f"compare-{name}-")
        self.proc: subprocess.Popen[bytes] | None = None
        self._syslog: SyslogCatcher | None = None

    @property
    def output_path(self) -> Path:
        return self.dir / "output.log"

    @property
    def syslog_path(self) -> Path:
        return self.dir / "syslog.log"

    def start(self) -> NamespacedDaemon:
        """Start and wait until the socket accepts connections from user postfix.

        :raises LabError: the daemon exited or did not listen in time.
        """
        upper, work = self.dir / "dev-upper", self.dir / "dev-work"
        upper.mkdir()
        work.mkdir()
        sock = self.dir / "syslog.sock"
        self._syslog = SyslogCatcher(sock, self.syslog_path).start()
        (upper / "log").symlink_to(sock)
        argv = [UNSHARE, "-m", "sh", "-c", NAMESPACE_SCRIPT, f"{self.name}-ns",
                str(self.resolv_conf), str(upper), str(work), *self.argv]  # fmt: skip
        with self.output_path.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        proc = self.proc
        try:
            wait_for_socket(f"unix:{self.socket_path}", timeout=START_TIMEOUT,
                            alive=lambda: proc.poll() is None)  # fmt: skip
        except (HarnessError, AssertionError) as exc:
            self.stop()
            raise LabError(f"{self.name} did not start: {exc}\n{self.diagnostics()}") from exc
        return self

    def terminate(self) -> None:
        """SIGTERM without waiting (libmilter daemons take up to ~5 s to notice)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL whatever is left of the process tree; idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None:
            pids = process_tree([proc.pid]) if proc.poll() is None else []
            try:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=STOP_TIMEOUT)
            finally:  # even when interrupted while waiting: nothing may outlive the run
                for pid in process_tree(pids):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait(timeout=STOP_TIMEOUT)
        if self._syslog is not None:
            time.sleep(0.05)
            self._syslog.stop()
            self._syslog = None

    def cleanup(self, keep: bool = False) -> None:
        """Stop and remove the directory (unless ``keep``)."""
        try:
            self.stop()
        finally:
            if not keep:
                shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        """Output and syslog so far."""
        parts = []
        for path in (self.output_path, self.syslog_path):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def diagnostics(self) -> str:
        """Output and syslog, headed, for error messages."""
        out = []
        for title, path in (("output", self.output_path), ("syslog", self.syslog_path)):
            try:
                text = path.read_text(errors="replace")[-6000:]
            except OSError:
                text = "(none)\n"
            out.append(f"--- {self.name} {title} ---\n{text}")
        return "".join(out)


def opendmarc(conf: Path, socket_path: Path, resolv_conf: Path) -> NamespacedDaemon:
    """OpenDMARC in the foreground reading ``conf`` (whose Socket is ``socket_path``)."""
    return NamespacedDaemon("opendmarc", [OPENDMARC, "-f", "-c", str(conf)],
                            socket_path=socket_path, resolv_conf=resolv_conf)  # fmt: skip


def authmilter(files: Mapping[Role, Path], socket_path: Path,
               resolv_conf: Path) -> NamespacedDaemon:  # fmt: skip
    """``authmilter run --opendkim-conf … --opendmarc-conf … [--policyd-spf-conf …] -p``.

    ``files`` maps ``opendkim`` / ``opendmarc`` / ``policyd-spf`` to the config set's files.
    """
    argv = [sys.executable, "-m", "authmilter", "run"]
    options: list[tuple[Role, str]] = [
        ("opendkim", "--opendkim-conf"), ("opendmarc", "--opendmarc-conf"),
        ("policyd-spf", "--policyd-spf-conf")]  # fmt: skip
    for key, option in options:
        if key in files:
            argv += [option, str(files[key])]
    argv += ["-p", f"local:{socket_path}"]
    return NamespacedDaemon("authmilter", argv, socket_path=socket_path, resolv_conf=resolv_conf)
