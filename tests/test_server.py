"""The pymilter adapter and the process: internal errors, signals, sockets, privileges."""

from __future__ import annotations

import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from io import BytesIO
from pathlib import Path

import Milter
import pytest
from Milter.testctx import TestCtx

from authmilter.config import Config
from authmilter.keytable import KeyStore
from authmilter.pipeline import Context
from authmilter.server import AuthMilter
from dnsserver import make_zone
from fakedns import ZoneResolver
from postfix_fixture import new_socket_dir, process_tree

MESSAGE = (b"From: alice@example.com\nTo: bob@example.org\nSubject: hi\n"
           b"Date: Mon, 23 Nov 2026 03:00:00 +0000\n\nbody\n")  # fmt: skip


class ExplodingKeyStore(KeyStore):
    """A key store whose lookup fails in a way nothing in the pipeline expects."""

    def keys_for(self, address: str) -> list:  # type: ignore[override, type-arg]
        raise RuntimeError("boom: simulated bug")


_NO_REPLY_BITS = (Milter.P_NR_CONN | Milter.P_NR_HELO | Milter.P_NR_MAIL | Milter.P_NR_RCPT
                  | Milter.P_NR_DATA | Milter.P_NR_UNKN | Milter.P_NR_EOH | Milter.P_NR_BODY
                  | Milter.P_NR_HDR)  # fmt: skip


def run_adapter(conf: str, *, explode: bool = False) -> TestCtx:
    cfg = Config.from_text(f"AuthservID mx.server.test\n{conf}")
    keys = ExplodingKeyStore.from_config(cfg) if explode else KeyStore.from_config(cfg)
    resolver = ZoneResolver(make_zone("example.org"), "example.org")
    ctx = Context.build(cfg, resolver=resolver, keys=keys)
    Milter.factory = partial(AuthMilter, ctx)
    # pymilter's TestCtx takes a NOREPLY answer for a refusal: let it offer no "no reply"
    # steps, as an older MTA would (the adapter must work without that negotiation too).
    offered = TestCtx.default_opts
    TestCtx.default_opts = [Milter.CURR_ACTS, 0x1FFFFF & ~_NO_REPLY_BITS, 0, 0]
    try:
        test = TestCtx()
        assert test._connect(host="client.example", ip="10.0.0.1") == Milter.CONTINUE
        test._feedFile(BytesIO(MESSAGE), "alice@example.com", "bob@example.org")
    finally:
        TestCtx.default_opts = offered
    return test


def test_unexpected_exception_answers_on_internal_error_tempfail(
        capfd: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import logging

    logging.getLogger("authmilter").addHandler(logging.StreamHandler())
    test = run_adapter("InternalHosts 10.0.0.0/8\n", explode=True)
    assert test._reply == ("451", "4.3.0", "authmilter: internal error, try again later")
    err = capfd.readouterr().err
    assert "internal error in eoh" in err and "RuntimeError: boom: simulated bug" in err


def test_on_internal_error_accept_lets_the_message_through() -> None:
    test = run_adapter("InternalHosts 10.0.0.0/8\nOn-InternalError accept\n", explode=True)
    assert test._reply is None


def test_adapter_adds_authentication_results_through_the_milter_api() -> None:
    test = run_adapter("AlwaysAddARHeader yes\nInternalHosts 127.0.0.1\n")
    assert test._headerschanged
    value = " ".join(str(test._msg["Authentication-Results"]).split())
    assert value.startswith("mx.server.test; dkim=none (no signature); spf=")


# -- the process ----------------------------------------------------------------------------


def start(conf_text: str, directory: Path) -> subprocess.Popen[bytes]:
    conf = directory / "a.conf"
    conf.write_text(conf_text)
    log = (directory / "log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "authmilter", "run", "-c", str(conf)],
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


def wait_for(predicate, what: str, proc: subprocess.Popen[bytes], directory: Path,
             timeout: float = 20) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, (directory / "log").read_text()
        assert time.monotonic() < deadline, f"{what}: {(directory / 'log').read_text()}"
        time.sleep(0.05)


def test_sigterm_stops_cleanly_removing_socket_and_pid_file() -> None:
    d = new_socket_dir("server-")
    sock, pid = d / "m.sock", d / "m.pid"
    proc = start(f"Socket local:{sock}\nPidFile {pid}\n", d)
    try:
        wait_for(lambda: sock.exists() and pid.exists(), "socket and pid file", proc, d)
        assert int(pid.read_text()) == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
        assert not sock.exists() and not pid.exists()
    finally:
        proc.kill()


def test_stale_socket_file_is_replaced() -> None:
    d = new_socket_dir("server-")
    sock = d / "m.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # the file stays behind, as after a crash
    proc = start(f"Socket local:{sock}\n", d)
    try:
        def accepting() -> bool:
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(sock))
                except OSError:
                    return False
                return True

        wait_for(accepting, "listening on the old path", proc, d)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)


def _uids(pid: int) -> set[str]:
    status = Path(f"/proc/{pid}/status").read_text()
    return set(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:])


def test_user_id_workers_run_as_the_user_and_the_supervisor_stays_root() -> None:
    if os.getuid() != 0:
        pytest.fail("this test needs root, as `make test` runs")
    nobody = pwd.getpwnam("nobody")
    d = new_socket_dir("server-")
    sock = d / "m.sock"
    proc = start(f"Socket local:{sock}\nUserID nobody\nWorkers 2\nSyslog no\n", d)
    try:
        wait_for(lambda: "listening on" in (d / "log").read_text(), "start", proc, d)
        deadline = time.monotonic() + 20
        while len(workers := [p for p in process_tree([proc.pid]) if p != proc.pid]) < 2:
            assert time.monotonic() < deadline, "no workers"
            time.sleep(0.05)
        # Every uid (real, effective, saved, filesystem) of a worker is nobody's: it cannot
        # become root again. The supervisor, which handles no mail, stays root to read keys.
        for pid in workers:
            assert _uids(pid) == {str(nobody.pw_uid)}
        assert _uids(proc.pid) == {"0"}
        assert sock.stat().st_uid == nobody.pw_uid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)
    assert not sock.exists()


def test_umask_applies_to_the_unix_socket() -> None:
    d = new_socket_dir("server-")
    sock = d / "m.sock"
    proc = start(f"Socket local:{sock}\nUMask 007\n", d)
    try:
        wait_for(sock.exists, "socket", proc, d)
        assert sock.stat().st_mode & 0o777 == 0o770
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)


@pytest.mark.parametrize("family,host", [("inet", "127.0.0.1"), ("inet6", "::1")])
def test_tcp_sockets_listen_where_configured(family: str, host: str) -> None:
    fam = socket.AF_INET6 if family == "inet6" else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    d = new_socket_dir("server-")
    proc = start(f"Socket {family}:{port}@{host}\n", d)
    try:
        def accepting() -> bool:
            try:
                socket.create_connection((host, port), timeout=1).close()
            except OSError:
                return False
            return True

        wait_for(accepting, f"listening on {family}:{port}@{host}", proc, d)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)


def test_syslog_settings_choose_handler_facility_and_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Lines reach the syslog socket with the facility and name configured; with no socket
    the lines go to standard error after a warning, never to the network."""
    import io
    import logging.handlers

    from authmilter import server
    from authmilter.errors import ConfigError

    devlog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    devlog.bind(str(tmp_path / "log"))
    devlog.settimeout(5)
    monkeypatch.setattr(server, "SYSLOG_SOCKET", str(tmp_path / "log"))
    err = io.StringIO()
    where = server.setup_logging(Config.from_text("SyslogFacility local3\nSyslogName mymilter\n"),
                                 err)  # fmt: skip
    assert where == f"syslog ({tmp_path}/log, facility local3)" and err.getvalue() == ""
    (handler,) = logging.getLogger("authmilter").handlers
    assert isinstance(handler, logging.handlers.SysLogHandler)
    logging.getLogger("authmilter").info("hello")
    line = devlog.recv(4096).decode()
    assert re.fullmatch(r"<158>mymilter\[\d+\]: hello\x00?", line), line  # local3.info
    with pytest.raises(ConfigError, match="SyslogFacility: unknown facility 'nosuch'"):
        server.setup_logging(Config.from_text("Syslog yes\nSyslogFacility nosuch\n"))
    devlog.close()

    monkeypatch.setattr(server, "SYSLOG_SOCKET", str(tmp_path / "nothing-here"))
    where = server.setup_logging(Config.from_text("Syslog yes\n"), err)
    assert "Syslog is on but" in err.getvalue() and "logging to standard error" in err.getvalue()
    assert where.startswith("standard error")
    (handler,) = logging.getLogger("authmilter").handlers
    assert type(handler) is logging.StreamHandler
    server.setup_logging(Config.from_text("Syslog no\n"))
    (handler,) = logging.getLogger("authmilter").handlers
    assert type(handler) is logging.StreamHandler


def _run_once(conf_text: str, directory: Path, command: str = "run") -> tuple[int, str]:
    conf = directory / "a.conf"
    conf.write_text(conf_text)
    done = subprocess.run([sys.executable, "-m", "authmilter", command, "-c", str(conf)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    return done.returncode, done.stderr


@pytest.mark.parametrize("command", ["run", "config-test"])
def test_a_missing_socket_folder_is_named_at_the_socket_line(command: str) -> None:
    d = new_socket_dir("server-")
    missing = d / "not-there"
    code, err = _run_once(f"Socket local:{missing}/m.sock\n", d, command)
    assert code == 78, err
    assert f"{d}/a.conf:1: Socket local:{missing}/m.sock: the folder {missing} does not exist" \
        in err
    assert "Traceback" not in err and not missing.exists()


def test_a_busy_port_is_reported_with_its_errno() -> None:
    d = new_socket_dir("server-")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = _run_once(f"Socket inet:{port}@127.0.0.1\n", d)
    assert code == 78, err
    assert f"Socket inet:{port}@127.0.0.1: cannot listen: [Errno 98] Address already in use" in err
    assert "Traceback" not in err
