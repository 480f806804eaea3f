"""The ``authmilter`` command: config-test, run, and the example configuration of `make run`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from authmilter.cli import EXIT_CONFIG, EXIT_OK, main

ROOT = Path(__file__).resolve().parent.parent
AUTHMILTER = [sys.executable, "-m", "authmilter"]


@pytest.fixture()
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the repository's etc/ with the example key made as `make run` makes it."""
    shutil.copytree(ROOT / "etc", tmp_path / "etc")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keys" / "example.com").mkdir(parents=True)
    assert main(["genkey", "-D", "keys/example.com", "-d", "example.com", "-s", "default"]) == 0
    return tmp_path


def test_example_config_is_usable(example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config-test", "-c", "etc/authmilter.conf"]) == EXIT_OK
    err = capsys.readouterr().err
    assert "configuration OK (etc/authmilter.conf)" in err
    assert "warning" not in err


def test_config_test_verbose_prints_effective_values(example: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config-test", "-v", "-c", "etc/authmilter.conf"]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"{'KeyTable':<28} file:etc/key.table    # etc/authmilter.conf:" in out
    assert f"{'ClockDrift':<28} 300    # default" in out


def test_config_test_fails_on_unsafe_key(example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (example / "keys/example.com/default.private").chmod(0o640)
    assert main(["config-test", "-c", "etc/authmilter.conf"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("authmilter: etc/key.table:3: ")
    assert "keys/example.com/default.private" in err and "0640" in err


def test_config_test_reports_file_line_of_a_typo(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "opendkim.conf"
    conf.write_text("Syslog yes\nCanonicalisation relaxed/relaxed\n")
    assert main(["config-test", "-c", str(conf)]) == EXIT_CONFIG
    assert capsys.readouterr().err == (
        f"authmilter: {conf}:2: unknown directive 'Canonicalisation'; "
        "did you mean 'Canonicalization'?\n")


def test_config_test_reads_split_files_and_warns_on_conflicts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    dkim, dmarc = tmp_path / "opendkim.conf", tmp_path / "opendmarc.conf"
    dkim.write_text("Socket local:/run/opendkim/opendkim.sock\nMode v\n")
    dmarc.write_text("Socket inet:8893@localhost\nRejectFailures true\n")
    code = main(["config-test", "-v", "--opendkim-conf", str(dkim),
                 "--opendmarc-conf", str(dmarc)])  # fmt: skip
    assert code == EXIT_OK
    captured = capsys.readouterr()
    assert (f"authmilter: warning: {dmarc}:1: Socket is 'local:/run/opendkim/opendkim.sock' in "
            f"{dkim}:1 and 'inet:8893@localhost' here") in captured.err  # fmt: skip
    assert f"{'RejectFailures':<28} true    # {dmarc}:2" in captured.out


def test_config_test_refuses_mixing_merged_and_split(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "a.conf"
    conf.write_text("Mode v\n")
    assert main(["config-test", "-c", str(conf), "--opendkim-conf", str(conf)]) == EXIT_CONFIG
    assert "either -c or --opendkim-conf" in capsys.readouterr().err


def test_authserv_id_falls_back_to_policyd_spf_then_host_name() -> None:
    import socket

    from authmilter.cli import resolve_authserv_id
    from authmilter.config import Config

    assert resolve_authserv_id(Config.from_text("Authserv_Id spf.test\n")).authserv_id == (
        "spf.test")
    both = Config.from_text("AuthservID mx.test\nAuthserv_Id spf.test\n")
    assert resolve_authserv_id(both).authserv_id == "mx.test"
    assert resolve_authserv_id(Config.from_text("")).authserv_id == socket.gethostname()


def test_python_dash_m_prints_version() -> None:
    out = subprocess.run([*AUTHMILTER, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("authmilter 0.")


MILTERTEST_SCRIPT = """
conn = mt.connect("{sock}", 20, 0.25)
if conn == nil then error("cannot connect") end
if mt.conninfo(conn, "client.example", "192.0.2.7") ~= nil then error("conninfo") end
if mt.getreply(conn) ~= SMFIR_CONTINUE then error("conninfo reply") end
if mt.eom(conn) ~= nil then error("eom") end
if mt.getreply(conn) ~= SMFIR_ACCEPT then error("not accepted") end
mt.disconnect(conn)
"""


def test_run_serves_the_milter_protocol_on_a_local_socket(example: Path) -> None:
    """`authmilter run -p local:…` answers a real milter client (Debian's miltertest)."""
    sock = example / "authmilter.sock"
    log = (example / "run.log").open("w")
    proc = subprocess.Popen([*AUTHMILTER, "run", "-c", "etc/authmilter.conf", "-p",
                             f"local:{sock}"], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, (example / "run.log").read_text()
            assert time.monotonic() < deadline, "socket never appeared"
            time.sleep(0.1)
        script = example / "t.lua"
        script.write_text(MILTERTEST_SCRIPT.format(sock=f"unix:{sock}"))
        result = subprocess.run(["miltertest", "-s", str(script)], capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=40)
        log.close()
    assert f"listening on local:{sock}" in (example / "run.log").read_text()


def test_run_with_bad_config_exits_78_without_listening(tmp_path: Path) -> None:
    conf = tmp_path / "a.conf"
    conf.write_text(f"Socket local:{tmp_path}/s.sock\nKeyTable file:{tmp_path}/missing\n"
                    "SigningTable refile:/dev/null\n")  # fmt: skip
    result = subprocess.run([*AUTHMILTER, "run", "-c", str(conf)], capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    assert result.returncode == EXIT_CONFIG
    assert f"{conf}:2: " in result.stderr and "missing" in result.stderr
    assert not (tmp_path / "s.sock").exists()


def test_a_missing_pid_folder_is_reported_at_its_line_and_leaves_no_socket(tmp_path: Path) -> None:
    conf = tmp_path / "a.conf"
    conf.write_text(f"Socket local:{tmp_path}/s.sock\nPidFile {tmp_path}/run/authmilter/a.pid\n"
                    "Syslog no\n")  # fmt: skip
    for command in ("config-test", "run"):
        result = subprocess.run([*AUTHMILTER, command, "-c", str(conf)], capture_output=True,
                                text=True, timeout=30)  # fmt: skip
        assert result.returncode == EXIT_CONFIG, result.stderr
        assert (f"{conf}:2: PidFile {tmp_path}/run/authmilter/a.pid: the folder "
                f"{tmp_path}/run/authmilter does not exist, nor its parent") in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "s.sock").exists()


def test_a_missing_pid_folder_whose_parent_exists_is_created_at_start(tmp_path: Path) -> None:
    """As /run/authmilter when started without systemd's RuntimeDirectory=: config-test says it
    will be created, run creates it, and the pid file and socket are gone after the stop."""
    (tmp_path / "run").mkdir()
    folder = tmp_path / "run" / "authmilter"
    conf = tmp_path / "a.conf"
    conf.write_text(f"Socket local:{tmp_path}/s.sock\nPidFile {folder}/a.pid\nSyslog no\n"
                    "UMask 077\n")  # fmt: skip
    result = subprocess.run([*AUTHMILTER, "config-test", "-c", str(conf)], capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"the folder {folder} does not exist yet; authmilter run creates it" in result.stderr
    assert not folder.exists()
    proc = subprocess.Popen([*AUTHMILTER, "run", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not (folder / "a.pid").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.05)
        assert folder.stat().st_mode & 0o777 == 0o755
        assert int((folder / "a.pid").read_text()) == proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0
    assert not (folder / "a.pid").exists() and not (tmp_path / "s.sock").exists()
