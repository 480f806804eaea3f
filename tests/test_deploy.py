"""The deployment test: the Debian package, installed and run as a postmaster would, behind the
**system** Postfix (`make deploy-test`; `make test` runs it too).

Nothing is mocked:

1. ``apt-get install ./build/authmilter_*.deb`` (``make deb`` built it);
2. the system Postfix gets the package's snippet (``postconf -e``), on loopback;
3. authmilter is started the way its unit does: with systemd as PID 1 through ``systemctl``,
   otherwise (a container) by running the unit's ``ExecStartPre``/``ExecStart`` as its user
   (root), with ``RuntimeDirectory=`` made and ``NOTIFY_SOCKET`` set, after
   ``systemd-analyze verify`` of the installed unit. Which of the two ran is printed;
4. DNS comes from NSD on loopback (the package's ``Nameservers`` line, uncommented);
5. mail: outbound over ``sendmail`` and over SMTP from 127.0.0.1 is signed (verified with
   dkimpy against NSD); inbound from 127.0.0.2, outside InternalHosts, gets our
   Authentication-Results, and a ``p=reject`` spoof is rejected;
6. a domain and its key are added, the unit's reload (SIGHUP), and that domain is signed;
7. a stop removes the socket and pid file; mail sent meanwhile is deferred, then delivered
   signed once the milter is back; an upgrade to a higher version keeps the user's files;
8. ``apt-get purge``, and what remains is checked.

It refuses to run where the package is installed or the system Postfix runs (a live server).
The machine is left as it was found: main.cf restored, Postfix stopped, ``/etc/dkimkeys`` given
back to its owner, the ``authmilter`` user removed.
"""

from __future__ import annotations

import mailbox
import os
import pwd
import re
import shutil
import signal
import smtplib
import subprocess
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest

from authmilter.keys import generate_private_key, key_record_text, load_private_key
from dnsserver import NsdServer, make_zone
from helpers import Notifications, only_signature

REPO = Path(__file__).resolve().parent.parent
UNIT = Path("/lib/systemd/system/authmilter.service")
CONF = Path("/etc/authmilter/authmilter.conf")
SOCKET = Path("/var/spool/postfix/authmilter/authmilter.sock")
PIDFILE = Path("/run/authmilter/authmilter.pid")
MAILBOX = Path("/var/mail/root")
KEYS = Path("/etc/dkimkeys")


def sh(*argv: str, timeout: float = 300, check: bool = True) -> str:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert done.returncode == 0, f"{' '.join(argv)}: {done.stdout}{done.stderr}"
    return done.stdout + done.stderr


def package() -> Path:
    debs = sorted((REPO / "build").glob("authmilter_*.deb"))
    if not debs:
        pytest.fail("no build/authmilter_*.deb: run `make deb` (make test and make deploy-test "
                    "do)", pytrace=False)  # fmt: skip
    return debs[-1]


class Service:
    """authmilter as its unit runs it: systemctl when systemd is PID 1, else the unit's own
    command lines."""

    def __init__(self, workdir: Path) -> None:
        self.systemd = Path("/run/systemd/system").is_dir()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: Notifications | None = None
        self.unit = UNIT.read_text()

    def _lines(self, key: str) -> list[str]:
        return re.findall(rf"^{key}=(.*)$", self.unit, re.M)

    def start(self) -> None:
        if self.systemd:
            sh("systemctl", "restart", "authmilter")
            return
        for directory in self._lines("RuntimeDirectory"):  # as systemd makes it
            mode = (self._lines("RuntimeDirectoryMode") or ["0755"])[0]
            sh("install", "-d", "-m", mode, f"/run/{directory}")
        for line in self._lines("ExecStartPre"):
            sh(*line.split())
        if self.notify is None:
            self.notify = Notifications(self.workdir / "notify.sock")
        (command,) = self._lines("ExecStart")
        with (self.workdir / "authmilter.out").open("ab") as out:
            self.proc = subprocess.Popen(
                command.split(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                     "NOTIFY_SOCKET": str(self.notify.path)})  # fmt: skip
        self.notify.wait("READY=1")

    def pid(self) -> int:
        return int(PIDFILE.read_text())

    def reload(self) -> None:
        if self.systemd:
            sh("systemctl", "reload", "authmilter")
            return
        (line,) = self._lines("ExecReload")
        assert line == "/bin/kill -HUP $MAINPID", line
        assert self.notify is not None
        os.kill(self.pid(), signal.SIGHUP)
        self.notify.wait("RELOADING=1")
        self.notify.wait("READY=1")

    def stop(self) -> float:
        """Stop as the unit does (KillMode=mixed: SIGTERM to the main process); seconds."""
        started = time.monotonic()
        if self.systemd:
            sh("systemctl", "stop", "authmilter")
        elif self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(timeout=30) == 0, self.output()
        return time.monotonic() - started

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.systemd:
            subprocess.run(["systemctl", "stop", "authmilter"], capture_output=True, check=False)

    def output(self) -> str:
        path = self.workdir / "authmilter.out"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """Remember what the test changes on the system, and put it back afterwards."""
    if os.geteuid() != 0:
        pytest.fail("the deployment test needs root, as `make test` runs", pytrace=False)
    deb = package()
    # Never on a live server: the test installs and purges the package, and reconfigures the
    # system Postfix for its duration.
    installed = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "authmilter"],
                               capture_output=True, text=True, check=False).stdout  # fmt: skip
    if "install ok installed" in installed:
        pytest.fail("the authmilter package is installed here; the deployment test would purge "
                    "it. Run it on a test machine.", pytrace=False)  # fmt: skip
    if subprocess.run(["postfix", "status"], capture_output=True, check=False).returncode == 0:
        pytest.fail("the system Postfix is running; the deployment test reconfigures it. Run "
                    "it on a test machine (or `postfix stop` first).", pytrace=False)  # fmt: skip
    main_cf = Path("/etc/postfix/main.cf")
    saved_main_cf = main_cf.read_bytes() if main_cf.exists() else None
    keys_owner = (KEYS.stat().st_uid, KEYS.stat().st_gid) if KEYS.exists() else None
    user_existed = _user_exists("authmilter")
    mbox_saved = MAILBOX.read_bytes() if MAILBOX.exists() else None
    workdir = tmp_path_factory.mktemp("deploy")
    workdir.chmod(0o755)
    try:
        yield deb, workdir
    finally:
        subprocess.run(["apt-get", "purge", "-y", "-q", "authmilter"], capture_output=True,
                       check=False, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                       )  # fmt: skip
        if saved_main_cf is None:
            main_cf.unlink(missing_ok=True)
        else:
            main_cf.write_bytes(saved_main_cf)
        subprocess.run(["postfix", "stop"], capture_output=True, check=False)
        if keys_owner is None:
            shutil.rmtree(KEYS, ignore_errors=True)
        else:
            for sub in ("example.com", "example.net"):
                shutil.rmtree(KEYS / sub, ignore_errors=True)
            os.chown(KEYS, *keys_owner)
        if mbox_saved is None:
            MAILBOX.unlink(missing_ok=True)
        else:
            MAILBOX.write_bytes(mbox_saved)
        if not user_existed:
            subprocess.run(["userdel", "authmilter"], capture_output=True, check=False)
            subprocess.run(["groupdel", "authmilter"], capture_output=True, check=False)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _txt(nsd: NsdServer, name: str) -> bytes:
    query = dns.message.make_query(name, dns.rdatatype.TXT)
    answer = dns.query.udp(query, nsd.host, port=nsd.port, timeout=5)
    for rrset in answer.answer:
        for rdata in rrset:
            return b"".join(rdata.strings)  # type: ignore[attr-defined,no-any-return]
    return b""


def _delivered(subject: str, timeout: float = 60) -> bytes:
    """The copy of the message with ``subject`` in root's mailbox, as delivered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if MAILBOX.exists():
            for message in mailbox.mbox(str(MAILBOX)):
                if message["Subject"] == subject:
                    return message.as_bytes().replace(b"\n", b"\r\n")
        subprocess.run(["postqueue", "-f"], capture_output=True, check=False)
        time.sleep(0.3)
    raise AssertionError(f"{subject!r} was not delivered:\n{sh('postqueue', '-p')}\n"
                         f"{sh('tail', '-n', '30', '/var/log/mail.log', check=False)}")  # fmt: skip


def _message(sender: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "root@localhost"
    msg["Subject"] = subject
    msg["Date"] = "Sun, 06 Dec 2026 06:00:00 +0000"
    msg["Message-ID"] = f"<{re.sub(r'[^a-z0-9]', '', subject.lower())}@{sender.split('@')[1]}>"
    msg.set_content(f"{subject}\n")
    return msg


def _signature(delivered: bytes, nsd: NsdServer) -> tuple[str, str]:
    """d= and s= of the one DKIM-Signature, after dkimpy verified it through NSD."""
    return only_signature(delivered, lambda name, timeout=5: _txt(nsd, name.decode()))


def _smtp(message: EmailMessage, *, source: str) -> None:
    with smtplib.SMTP("127.0.0.1", 25, source_address=(source, 0), timeout=60) as smtp:
        smtp.ehlo("client.deploy.test")
        smtp.send_message(message, from_addr=str(message["From"]), to_addrs=["root@localhost"])


def _sendmail(message: EmailMessage) -> None:
    subprocess.run(["/usr/sbin/sendmail", "-f", str(message["From"]), "root"],
                   input=message.as_bytes(), check=True, timeout=60)  # fmt: skip


def test_the_package_installs_runs_behind_the_system_postfix_and_purges(machine: Path) -> None:
    deb, work = machine
    timings: dict[str, float] = {}
    started = time.monotonic()

    # 1. Install, as a postmaster would.
    sh("apt-get", "install", "-y", "-q", str(deb))
    timings["install"] = time.monotonic() - started
    assert "authmilter" in sh("id", "-nG", "authmilter").split()
    assert "postfix" in sh("id", "-nG", "authmilter").split()
    spool = Path("/var/spool/postfix/authmilter").stat()
    assert (pwd.getpwuid(spool.st_uid).pw_name, oct(spool.st_mode & 0o777)) == ("authmilter",
                                                                               "0o750")
    assert Path("/var/lib/authmilter").is_dir()
    for name in ("authmilter.conf", "key.table", "signing.table"):
        assert f"/etc/authmilter/{name}" in sh("dpkg-query", "--control-show", "authmilter",
                                                "conffiles")  # fmt: skip
    assert sh("man", "-w", "authmilter.conf").strip().endswith("authmilter.conf.5.gz")
    assert sh("man", "-w", "8", "authmilter").strip().endswith("authmilter.8.gz")
    assert "usage: authmilter" in sh("authmilter", "--help")
    verify = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr

    # 2. The system Postfix, with the package's snippet.
    if not Path("/etc/postfix/main.cf").exists():
        shutil.copy("/usr/share/postfix/main.cf.debian", "/etc/postfix/main.cf")
    sh("postconf", "-e", "myhostname=mx.deploy.test", "mydestination=localhost, $myhostname",
       "inet_interfaces=loopback-only", "inet_protocols=ipv4", "alias_maps=",
       "alias_database=", "smtpd_peername_lookup=no", "mynetworks=127.0.0.0/8",
       "maillog_file=/var/log/mail.log")  # fmt: skip
    snippet = Path("/usr/share/doc/authmilter/examples/postfix-main.cf.snippet").read_text()
    settings = [line for line in snippet.splitlines() if line and not line.startswith("#")]
    assert any(s.startswith("smtpd_milters") for s in settings)
    sh("postconf", "-e", *settings)
    sh("postfix", "check")
    subprocess.run(["postfix", "start"], capture_output=True, check=False)
    sh("postfix", "reload")

    # 3. Keys as the walkthrough makes them, and DNS from NSD.
    if KEYS.stat().st_uid != pwd.getpwnam("authmilter").pw_uid:
        os.chown(KEYS, pwd.getpwnam("authmilter").pw_uid, pwd.getpwnam("authmilter").pw_gid)
    _add_key("example.com", "2026-12")
    sender_key = generate_private_key("rsa", 2048)
    zones = {
        "example.com": make_zone("example.com", [
            ("2026-12._domainkey", "TXT", _quoted(key_record_text(
                load_private_key(KEYS / "example.com" / "2026-12.private", require_safe=False))))]),
        "sender.test": make_zone("sender.test", [
            ("sel._domainkey", "TXT", _quoted(key_record_text(sender_key))),
            ("@", "TXT", '"v=spf1 ip4:127.0.0.2 -all"'),
            ("_dmarc", "TXT", '"v=DMARC1; p=reject; rua=mailto:dmarc@sender.test"')]),
        "bank.test": make_zone("bank.test", [
            ("@", "TXT", '"v=spf1 -all"'), ("_dmarc", "TXT", '"v=DMARC1; p=reject"')]),
    }  # fmt: skip
    nsd = NsdServer(zones, workdir=work / "nsd").start()
    service = Service(work)
    try:
        conf = CONF.read_text()
        conf = conf.replace("# Nameservers           127.0.0.1", f"Nameservers {nsd.nameserver}")
        conf = conf.replace("# RejectFailures        true", "RejectFailures true")
        conf = conf.replace("SyslogSuccess           no", "SyslogSuccess yes")
        CONF.write_text(conf)
        assert "configuration OK" in sh("authmilter", "config-test")

        # 4. Start as the unit does.
        phase = time.monotonic()
        service.start()
        timings["start"] = time.monotonic() - phase
        how = ("by systemctl" if service.systemd
               else "from the unit's ExecStart lines (systemd is not PID 1 here)")  # fmt: skip
        print(f"deploy-test: authmilter started {how}")
        assert SOCKET.exists() and PIDFILE.exists()

        # 5. Mail.
        phase = time.monotonic()
        _sendmail(_message("alice@example.com", "outbound by sendmail"))
        assert _signature(_delivered("outbound by sendmail"), nsd) == ("example.com", "2026-12")
        _smtp(_message("bob@example.com", "outbound by SMTP"), source="127.0.0.1")
        assert _signature(_delivered("outbound by SMTP"), nsd) == ("example.com", "2026-12")

        inbound = _message("carol@sender.test", "inbound signed").as_bytes(policy=SMTP)
        signed = dkim.sign(inbound, b"sel", b"sender.test", sender_key.pem(),
                           include_headers=[b"from", b"to", b"subject", b"date"])  # fmt: skip
        with smtplib.SMTP("127.0.0.1", 25, source_address=("127.0.0.2", 0), timeout=60) as smtp:
            smtp.sendmail("carol@sender.test", ["root@localhost"], signed + inbound)
        results = [v for k, v in _headers(_delivered("inbound signed")) if
                   k.lower() == "authentication-results"]  # fmt: skip
        assert len(results) == 1 and "dkim=pass" in results[0] and "dmarc=pass" in results[0]

        with pytest.raises(smtplib.SMTPDataError) as refused:
            _smtp(_message("ceo@bank.test", "spoof"), source="127.0.0.2")
        assert refused.value.smtp_code == 550, refused.value
        timings["mail"] = time.monotonic() - phase

        # 5b. DMARC report data: the package's ReportDatabase, read back as the milter's user.
        def as_user(*argv: str, check: bool = True) -> str:
            return sh("runuser", "-u", "authmilter", "--", "authmilter", *argv, check=check)

        deadline = time.monotonic() + 30
        shown = ""
        while "bank.test" not in shown and time.monotonic() < deadline:
            time.sleep(0.5)  # each worker writes its queue within a second (the file too)
            shown = as_user("reports", "show", "--days", "1", check=False)
        assert sh("authmilter", "reports", "show", "--days", "1") == shown  # root: as UserID
        db = Path("/var/lib/authmilter/dmarc.db")
        assert pwd.getpwuid(db.stat().st_uid).pw_name == "authmilter"
        lines = [line.split() for line in shown.splitlines()[1:]]
        assert ["sender.test", "127.0.0.2", "1", "1", "0", "0", "0"] in lines, shown
        assert ["bank.test", "127.0.0.2", "1", "0", "1", "0", "1"] in lines, shown
        today = time.strftime("%Y-%m-%d", time.gmtime())
        conf = CONF.read_text().replace("# ReportSender          dmarc-reports@reports.example.com",
                                        "ReportSender            dmarc@example.com")
        CONF.write_text(conf)
        dry = as_user("reports", "send", "--dry-run", "--period", today)
        assert f"queued   {today} sender.test:" in dry and "to dmarc@sender.test" in dry, dry
        assert f"skipped  {today} bank.test: the policy publishes no rua" in dry, dry
        timer = Path("/lib/systemd/system/authmilter-reports.timer")
        assert timer.exists() and Path("/lib/systemd/system/authmilter-reports.service").exists()
        assert not Path("/etc/systemd/system/timers.target.wants/authmilter-reports.timer"
                        ).exists()  # shipped, not enabled: nothing is sent until asked

        # 6. A second domain, then the unit's reload.
        _add_key("example.net", "2026-12")
        assert "configuration OK" in sh("authmilter", "config-test")
        service.reload()
        nsd.stop()
        zones["example.net"] = make_zone("example.net", [("2026-12._domainkey", "TXT", _quoted(
            key_record_text(load_private_key(KEYS / "example.net" / "2026-12.private",
                                            require_safe=False))))])
        nsd = NsdServer(zones, workdir=work / "nsd2").start()
        _sendmail(_message("dave@example.net", "after the reload"))
        assert _signature(_delivered("after the reload"), nsd) == ("example.net", "2026-12")

        # 7. Stop: nothing left behind; mail meanwhile waits, and goes out signed after.
        took = service.stop()
        timings["stop"] = took
        assert not SOCKET.exists() and not PIDFILE.exists()
        _sendmail(_message("erin@example.com", "while stopped"))
        time.sleep(2)
        queue = sh("postqueue", "-p")
        assert "erin@example.com" in queue, queue  # deferred, not lost nor passed unsigned
        service.start()
        assert _signature(_delivered("while stopped"), nsd) == ("example.com", "2026-12")
        service.stop()

        # An upgrade (the same package, a higher version) keeps the user's files.
        phase = time.monotonic()
        tables = {name: Path(f"/etc/authmilter/{name}").read_text()
                  for name in ("authmilter.conf", "key.table", "signing.table")}  # fmt: skip
        sh("dpkg-deb", "-R", str(deb), str(work / "unpacked"))
        control = work / "unpacked" / "DEBIAN" / "control"
        control.write_text(re.sub(r"^Version: (.*)$", r"Version: \1+upgrade", control.read_text(),
                                  flags=re.M))  # fmt: skip
        newer = work / "authmilter_upgrade.deb"
        sh("dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "-b", str(work / "unpacked"),
           str(newer))  # fmt: skip
        sh("apt-get", "install", "-y", "-q", str(newer))
        assert "+upgrade" in sh("dpkg-query", "-W", "-f=${Version}", "authmilter")
        for name, text in tables.items():
            assert Path(f"/etc/authmilter/{name}").read_text() == text, f"{name} was replaced"
        assert (KEYS / "example.net" / "2026-12.private").exists()
        service.start()
        _sendmail(_message("frank@example.net", "after the upgrade"))
        assert _signature(_delivered("after the upgrade"), nsd) == ("example.net", "2026-12")
        service.stop()
        timings["upgrade"] = time.monotonic() - phase
    finally:
        service.kill()
        nsd.stop()

    # 8. Purge: the package's files, state and socket folder go; keys and the user stay.
    phase = time.monotonic()
    sh("apt-get", "purge", "-y", "-q", "authmilter")
    timings["purge"] = time.monotonic() - phase
    for gone in ("/etc/authmilter", "/usr/lib/authmilter", "/usr/bin/authmilter",
                 "/var/lib/authmilter", "/var/spool/postfix/authmilter", str(UNIT)):
        assert not Path(gone).exists(), f"{gone} is still there after purge"
    assert (KEYS / "example.com" / "2026-12.private").exists()  # the user's keys stay
    assert _user_exists("authmilter")  # as Debian's packages leave their system users
    print("deploy-test timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


def _add_key(domain: str, selector: str) -> None:
    """A domain's key and table lines, as docs/operations.md makes them (steps 4, 5 and 12)."""
    folder = KEYS / domain
    sh("install", "-d", "-m", "0700", "-o", "authmilter", "-g", "authmilter", str(folder))
    sh("authmilter", "genkey", "-D", str(folder), "-d", domain, "-s", selector)
    name = f"{selector}._domainkey.{domain}"
    with open("/etc/authmilter/key.table", "a") as f:
        f.write(f"{name} {domain}:{selector}:{folder}/{selector}.private\n")
    with open("/etc/authmilter/signing.table", "a") as f:
        f.write(f"*@{domain} {name}\n")


def _quoted(record: str) -> str:
    """A TXT record's text as zone-file character-strings of at most 255 bytes."""
    return " ".join(f'"{record[i:i + 255]}"' for i in range(0, len(record), 255))


def _headers(raw: bytes) -> list[tuple[str, str]]:
    import email

    message = email.message_from_bytes(raw.replace(b"\r\n", b"\n"))
    return [(k, str(v)) for k, v in message.items()]
