"""The service as docs/operations.md sets it up, behind the real Postfix fixture.

Nothing is mocked: a real unprivileged user (created here), authmilter started as root with
``UserID``, its UNIX socket in a folder laid out like Postfix's chroot one (owned by the user,
group postfix, 0750, ``UMask 007``), keys in a Debian-style ``dkimkeys`` folder (owned by the
user, 0700), the tables and keys made with ``authmilter genkey`` as the walkthrough says. The
milter runs in a private mount namespace whose ``/dev/log`` is a socket this test reads (the
stand-in for rsyslog), and with ``NOTIFY_SOCKET`` set as systemd sets it for ``Type=notify``.

One test walks the whole life of the service, in the walkthrough's order: start, sign, add a
domain and reload, rotate and reload, stop.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from authmilter.keys import key_record_text, load_private_key
from helpers import Notifications, only_signature
from opendkim_fixture import SyslogCatcher
from postfix_fixture import PostfixInstance, new_socket_dir, process_tree

USER = "authmilter-svc"
AUTHMILTER = [sys.executable, "-m", "authmilter"]
# /dev/log inside the namespace is our socket: an overlay over /dev holds the link to it.
NAMESPACE = ('mount --make-rprivate / && mount -t overlay overlay '
             '-o lowerdir=/dev,upperdir="$1",workdir="$2" /dev || exit 97; shift 2; exec "$@"')


def sh(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def service_user() -> Iterator[pwd.struct_passwd]:
    """The milter's user, as `adduser --system --group` plus `adduser USER postfix` make it."""
    if os.geteuid() != 0:
        pytest.fail("the service test needs root, as `make test` runs")
    with contextlib.suppress(KeyError):
        pwd.getpwnam(USER)
        sh("userdel", USER)
    with contextlib.suppress(KeyError):
        grp.getgrnam(USER)
        sh("groupdel", USER)
    sh("useradd", "--system", "--user-group", "--home-dir", "/nonexistent", "--shell",
       "/usr/sbin/nologin", "--groups", "postfix", USER)  # fmt: skip
    yield pwd.getpwnam(USER)
    subprocess.run(["userdel", USER], capture_output=True, check=False)
    subprocess.run(["groupdel", USER], capture_output=True, check=False)


def outbound(sender: str, n: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "someone@remote.test"
    msg["Subject"] = f"service test {n}"
    msg["Date"] = "Sun, 06 Dec 2026 05:00:00 +0000"
    msg["Message-ID"] = f"<svc{n}@{sender.partition('@')[2]}>"
    msg.set_content("hello from the service test\n")
    return msg


def signature_of(delivered: bytes, keys: dict[str, Path]) -> tuple[str, str]:
    """(d=, s=) of the one DKIM-Signature, after checking that it verifies against the key
    record of the private key that ``keys`` maps ``selector._domainkey.domain.`` to."""
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        path = keys.get(name.decode().rstrip("."))
        return (key_record_text(load_private_key(path, require_safe=False)).encode()
                if path else b"")

    return only_signature(delivered, dnsfunc)


def test_the_documented_service_signs_reloads_rotates_and_stops(service_user) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    user = service_user
    base = new_socket_dir("service-")  # root 0755, like / above /etc and /var/spool/postfix
    etc, dkimkeys = base / "etc", base / "etc" / "dkimkeys"
    spool, run = base / "spool" / "authmilter", base / "run" / "authmilter"
    postfix: PostfixInstance | None = None
    proc: subprocess.Popen[bytes] | None = None
    catcher: SyslogCatcher | None = None
    try:
        # Keys: the Debian layout, the folder the user's own and closed to everybody else.
        etc.mkdir()
        sh("install", "-d", "-o", USER, "-g", USER, "-m", "0700", str(dkimkeys))
        sh(*AUTHMILTER, "genkey", "-D", str(dkimkeys), "-d", "example.com", "-s", "2026-11")
        sh("chown", f"{USER}:{USER}", str(dkimkeys / "2026-11.private"))  # as Debian's are
        (etc / "key.table").write_text(
            f"2026-11._domainkey.example.com example.com:2026-11:{dkimkeys}/2026-11.private\n")
        (etc / "signing.table").write_text("*@example.com 2026-11._domainkey.example.com\n")
        # The socket's folder, as in Postfix's chroot; the pid file's, as RuntimeDirectory=.
        spool.parent.mkdir()
        sh("install", "-d", "-o", USER, "-g", "postfix", "-m", "0750", str(spool))
        sh("install", "-d", "-m", "0755", str(run))
        conf = etc / "authmilter.conf"
        conf.write_text(
            f"Socket local:{spool}/authmilter.sock\nUMask 007\nUserID {USER}:postfix\n"
            f"PidFile {run}/authmilter.pid\nMode sv\nInternalHosts 127.0.0.1\n"
            f"KeyTable file:{etc}/key.table\nSigningTable refile:{etc}/signing.table\n"
            "SyslogSuccess yes\nAuthservID service.test\n")  # fmt: skip
        assert "configuration OK" in sh(*AUTHMILTER, "config-test", "-c", str(conf))

        # Start as root, the way systemd does: Type=notify, /dev/log, no terminal.
        notifications = Notifications(base / "notify.sock")
        upper, work = base / "dev-upper", base / "dev-work"
        upper.mkdir()
        work.mkdir()
        catcher = SyslogCatcher(base / "syslog.sock", base / "syslog.log").start()
        (upper / "log").symlink_to(base / "syslog.sock")
        output = (base / "output.log").open("wb")
        proc = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", NAMESPACE, "ns", str(upper), str(work), *AUTHMILTER,
             "run", "-c", str(conf)],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            env={**os.environ, "NOTIFY_SOCKET": str(notifications.path)})  # fmt: skip
        notifications.wait("READY=1")
        supervisor = int((run / "authmilter.pid").read_text())

        def uids(pid: int) -> set[str]:
            found = re.search(r"^Uid:\s+(.*)$", Path(f"/proc/{pid}/status").read_text(), re.M)
            return set(found.group(1).split()) if found else set()

        # Every uid of every worker becomes the user's (right after the fork); the
        # supervisor, which handles no mail, stays root to read keys at reloads.
        deadline = time.monotonic() + 10
        while True:
            workers = [p for p in process_tree([supervisor]) if p != supervisor]
            if workers and all(uids(p) == {str(user.pw_uid)} for p in workers):
                break
            assert time.monotonic() < deadline, [(p, uids(p)) for p in workers]
            time.sleep(0.05)
        assert uids(supervisor) == {"0"}
        sock = spool / "authmilter.sock"
        assert (sock.stat().st_uid, sock.stat().st_gid) == (user.pw_uid, grp.getgrnam(
            "postfix").gr_gid)  # fmt: skip
        assert sock.stat().st_mode & 0o777 == 0o770

        postfix = PostfixInstance(f"unix:{sock}").start()
        keys = {"2026-11._domainkey.example.com": dkimkeys / "2026-11.private"}

        def send_and_check(sender: str, n: int) -> tuple[str, str]:
            assert postfix is not None
            postfix.send(outbound(sender, n), mail_from=sender, rcpt_to=["someone@remote.test"],
                         port="submit")  # fmt: skip
            return signature_of(postfix.wait_delivered(n, timeout=30)[-1], keys)

        # 1. Outbound mail is signed.
        assert send_and_check("alice@example.com", 1) == ("example.com", "2026-11")

        # 2. A second domain, as the walkthrough adds it: genkey (root-owned 0600 key, as
        #    genkey writes it), two table lines, reload.
        sh(*AUTHMILTER, "genkey", "-D", str(dkimkeys), "-d", "example.net", "-s", "2026-11-net")
        with (etc / "key.table").open("a") as f:
            f.write("2026-11._domainkey.example.net "
                    f"example.net:2026-11-net:{dkimkeys}/2026-11-net.private\n")  # fmt: skip
        with (etc / "signing.table").open("a") as f:
            f.write("*@example.net 2026-11._domainkey.example.net\n")
        keys["2026-11-net._domainkey.example.net"] = dkimkeys / "2026-11-net.private"
        assert "configuration OK" in sh(*AUTHMILTER, "config-test", "-c", str(conf))
        os.kill(supervisor, signal.SIGHUP)
        notifications.wait("RELOADING=1")
        notifications.wait("READY=1")
        assert send_and_check("bob@example.net", 2) == ("example.net", "2026-11-net")

        # 3. Rotation: a new selector, the KeyTable entry pointed at it, reload.
        sh(*AUTHMILTER, "genkey", "-D", str(dkimkeys), "-d", "example.com", "-s", "2026-12")
        table = (etc / "key.table").read_text()
        (etc / "key.table").write_text(table.replace(
            "example.com:2026-11:", "example.com:2026-12:").replace(
            "2026-11.private", "2026-12.private"))  # fmt: skip
        keys["2026-12._domainkey.example.com"] = dkimkeys / "2026-12.private"
        os.kill(supervisor, signal.SIGHUP)
        notifications.wait("READY=1")
        assert send_and_check("carol@example.com", 3) == ("example.com", "2026-12")
        assert "reload failed" not in (base / "output.log").read_text()

        # 4. Stop: well under 5 s, and nothing left behind.
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - started
        assert proc.returncode == 0, (base / "output.log").read_text()
        assert took < 5, f"the stop took {took:.1f} s"
        assert not sock.exists()
        assert not (run / "authmilter.pid").exists()
        notifications.wait("STOPPING=1", timeout=1)

        # The log lines went to syslog, facility mail (priority <22> = mail.info).
        time.sleep(0.2)
        syslog = (base / "syslog.log").read_text(errors="replace")
        assert re.search(r"^<22>authmilter\[\d+\]: listening on local:", syslog, re.M), syslog
        assert re.search(r"^<22>authmilter\[\d+\]: \w+: signed d=example\.net s=2026-11-net",
                         syslog, re.M), syslog  # fmt: skip
        assert "Traceback" not in syslog + (base / "output.log").read_text()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if postfix is not None:
            postfix.stop()
        if catcher is not None:
            catcher.stop()
        if os.environ.get("KEEP"):
            print(base)
        else:
            shutil.rmtree(base, ignore_errors=True)


def test_the_systemd_unit_is_valid_and_notifies(tmp_path: Path) -> None:
    """etc/authmilter.service, with its paths pointed at this checkout, passes
    `systemd-analyze verify` (Debian's systemd), and is Type=notify with KillMode=mixed."""
    repo = Path(__file__).resolve().parent.parent
    unit = (repo / "etc" / "authmilter.service").read_text()
    assert re.search(r"^Type=notify$", unit, re.M) and re.search(r"^KillMode=mixed$", unit, re.M)
    copy = tmp_path / "authmilter.service"
    copy.write_text(unit.replace("/usr/bin/authmilter",
                                 str(Path(sys.executable).parent / "authmilter")))  # fmt: skip
    # --man=no: the man pages are checked once the package installed them (make deploy-test).
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_the_report_timer_and_its_service_are_valid(tmp_path: Path) -> None:
    """etc/authmilter-reports.{service,timer} pass `systemd-analyze verify`; the service is a
    oneshot `reports send` as the unprivileged user, the timer is hourly and persistent."""
    repo = Path(__file__).resolve().parent.parent
    service = (repo / "etc" / "authmilter-reports.service").read_text()
    timer = (repo / "etc" / "authmilter-reports.timer").read_text()
    assert re.search(r"^Type=oneshot$", service, re.M) and re.search(r"^User=authmilter$",
                                                                      service, re.M)
    assert re.search(r"^ExecStart=/usr/bin/authmilter reports send -c /etc/authmilter/"
                     r"authmilter\.conf$", service, re.M)  # fmt: skip
    assert re.search(r"^OnCalendar=\*-\*-\* \*:15:00 UTC$", timer, re.M)
    assert re.search(r"^Persistent=true$", timer, re.M)
    (tmp_path / "authmilter-reports.service").write_text(service.replace(
        "/usr/bin/authmilter", str(Path(sys.executable).parent / "authmilter")))
    (tmp_path / "authmilter-reports.timer").write_text(timer)
    # User=authmilter need not exist here: verify checks the syntax and the executables.
    result = subprocess.run(["systemd-analyze", "verify", "--man=no",
                             str(tmp_path / "authmilter-reports.timer"),
                             str(tmp_path / "authmilter-reports.service")],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
