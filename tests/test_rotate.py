"""``authmilter rotate``: new, check, activate, retire, against two real NSD servers.

The zone ``example.test`` has two nameservers, ``ns1`` and ``ns2``, each an NSD on its own
random 127.x.y.z address, port 53 (so, as ``make test`` runs, as root), and each with its own
zone contents: a selector can be published on one and missing, wrong or revoked on the other.
The milter is a tiny child process that records the SIGHUP it gets; the clock of ``activate``
and ``retire`` is injected with ``--now``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import random
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import dnsserver
from authmilter import cli
from authmilter.keys import (
    KeyAlgorithm,
    PrivateKey,
    generate_private_key,
    key_record_text,
    load_private_key,
    parse_key_record,
)
from authmilter.keytools import (
    EXIT_CANTCREAT,
    EXIT_CONFIG,
    EXIT_DATAERR,
    EXIT_NOINPUT,
    EXIT_OK,
    EXIT_TEMPFAIL,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from authmilter.rotate import parse_postfix_time
from dnsserver import DnsServerError, NsdServer, txt_rdata

pytestmark = pytest.mark.dns

DOMAIN = "example.test"
OLD_TTL = 900
T0 = "2027-01-05T10:00:00"  # UTC
FIVE_DAYS = 5 * 86_400

# The keys, made once: "old" signs now; the others are candidates for the rotation.
OLD = generate_private_key(KeyAlgorithm.RSA, 2048)
GOOD, HALF, WRONG, OTHER, REVOKED, MAIL = (generate_private_key(KeyAlgorithm.ED25519)
                                           for _ in range(6))  # fmt: skip
PRIVATE = {"old": OLD, "good": GOOD, "half": HALF, "wrong": WRONG, "revoked": REVOKED,
           "mail": MAIL}  # fmt: skip


def txt(key: PrivateKey) -> str:
    return txt_rdata(key_record_text(key, hash_algorithms=["sha256"]))


def zone(ns1: str, ns2: str, records: list[str], raw: str = "") -> str:
    """example.test with NS ns1 and ns2 (at the two NSD addresses), and ``records``."""
    head = [
        f"$ORIGIN {DOMAIN}.",
        "$TTL 300",
        f"@ IN SOA ns1.{DOMAIN}. hostmaster.{DOMAIN}. ( 1 3600 600 86400 60 )",
        "@ IN NS ns1",
        "@ IN NS ns2",
        f"ns1 IN A {ns1}",
        f"ns2 IN A {ns2}",
        f"old._domainkey {OLD_TTL} IN TXT {txt(OLD)}",
    ]
    return "\n".join(head + records) + "\n" + raw


# What each server publishes: both the same for "good" and "mail"; the others differ.
NS1_RECORDS = [
    f"good._domainkey IN TXT {txt(GOOD)}",
    f"half._domainkey IN TXT {txt(HALF)}",
    f"wrong._domainkey IN TXT {txt(WRONG)}",
    f"revoked._domainkey IN TXT {txt(REVOKED)}",
    f"mail._domainkey.mail IN TXT {txt(MAIL)}",
]
NS2_RECORDS = [
    f"good._domainkey IN TXT {txt(GOOD)}",
    # half: missing here
    f"wrong._domainkey IN TXT {txt(OTHER)}",
    'revoked._domainkey IN TXT "v=DKIM1; k=ed25519; p="',
    f"mail._domainkey.mail IN TXT {txt(MAIL)}",
]


@dataclass
class Pair:
    ns1: NsdServer
    ns2: NsdServer

    @property
    def hosts(self) -> tuple[str, str]:
        return self.ns1.host, self.ns2.host

    def stop(self) -> None:
        self.ns1.cleanup()
        self.ns2.cleanup()


def _loopback() -> str:
    return f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"


def start_pair(ns1_records: list[str], ns2_records: list[str], raw: str = "",
               hosts: tuple[str, str] | None = None) -> Pair:  # fmt: skip
    """Two NSD on port 53 of two loopback addresses, each with its own example.test."""
    if os.geteuid() != 0:
        pytest.fail("NSD on port 53 needs root, as `make test` runs")
    problem = ""
    for _attempt in range(5):
        h1, h2 = hosts or (_loopback(), _loopback())
        if h1 == h2:
            continue
        servers: list[NsdServer] = []
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(dnsserver, "_free_port", lambda: 53)
                for host, records in ((h1, ns1_records), (h2, ns2_records)):
                    server = NsdServer({DOMAIN: zone(h1, h2, records, raw)})
                    server.host = host
                    servers.append(server)
                    server.start()
            return Pair(*servers)
        except DnsServerError as exc:
            problem = str(exc)
            for server in servers:
                server.cleanup()
    pytest.fail(f"cannot start NSD on 127.x.y.z:53: {problem}", pytrace=False)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    servers = start_pair(NS1_RECORDS, NS2_RECORDS)
    yield servers
    servers.stop()


@dataclass
class Site:
    """A configuration that signs example.test with selector "old", and its files."""

    root: Path
    conf: Path
    keys: Path
    key_table: Path
    signing_table: Path
    pid_file: Path
    state: Path


def make_site(root: Path, nameserver: str, *, user: str | None = "nobody",
              pid_file: bool = True) -> Site:  # fmt: skip
    keys = root / "keys"
    keys.mkdir(mode=0o700)
    for selector, key in PRIVATE.items():
        path = keys / f"{selector}.private"
        path.write_bytes(key.pem())
        path.chmod(0o600)
    key_table = root / "key.table"
    key_table.write_text(f"# the keys\nold._domainkey.{DOMAIN} {DOMAIN}:old:{keys}/old.private"
                         "  # signs now\n")  # fmt: skip
    signing_table = root / "signing.table"
    signing_table.write_text(f"*@{DOMAIN} old._domainkey.{DOMAIN}\n")
    conf = root / "authmilter.conf"
    lines = [
        f"Socket local:{root}/milter.sock",
        "Mode sv",
        f"KeyTable file:{key_table}",
        f"SigningTable refile:{signing_table}",
        f"Nameservers {nameserver}",
        "DNSTimeout 2",
        "Syslog no",
    ]
    if user:
        lines.append(f"UserID {user}")
    if pid_file:
        lines.append(f"PidFile {root}/authmilter.pid")
    conf.write_text("\n".join(lines) + "\n")
    return Site(root, conf, keys, key_table, signing_table, root / "authmilter.pid",
                root / "state")  # fmt: skip


@pytest.fixture()
def site(tmp_path: Path, pair: Pair) -> Site:
    return make_site(tmp_path, pair.ns1.host)


def invoke(*argv: str) -> tuple[int, str, str]:
    """Run ``authmilter ARGV`` as cli.main would; return (exit code, stdout, stderr)."""
    ns = cli.build_parser().parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = ns.func(ns)
    assert isinstance(code, int)
    return code, out.getvalue(), err.getvalue()


def rotate(site: Site, step: str, *args: str) -> tuple[int, str, str]:
    extra = ["--state-dir", str(site.state)] if step in ("activate", "retire") else []
    return invoke("rotate", step, "-c", str(site.conf), "-d", DOMAIN, *extra, *args)


class FakeMilter:
    """A child process that stands for the running milter: it records each SIGHUP."""

    def __init__(self, root: Path) -> None:
        self.log = root / "hup.log"
        ready = root / "hup.ready"
        script = ("import signal, sys, time\n"
                  "def hup(signum, frame):\n"
                  "    with open(sys.argv[1], 'a') as f: f.write('HUP\\n')\n"
                  "signal.signal(signal.SIGHUP, hup)\n"
                  "open(sys.argv[2], 'w').close()\n"
                  "while True: time.sleep(0.05)\n")  # fmt: skip
        self.process = subprocess.Popen(
            [sys.executable, "-c", script, str(self.log), str(ready), "authmilter-stand-in"]
        )
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert self.process.poll() is None, "the stand-in milter died"
            assert time.monotonic() < deadline, "the stand-in milter did not start"
            time.sleep(0.01)

    def hups(self, expect: int) -> int:
        """The SIGHUPs received, waiting up to 5 s for ``expect`` of them."""
        deadline = time.monotonic() + 5
        while True:
            count = self.log.read_text().count("HUP") if self.log.exists() else 0
            if count >= expect or time.monotonic() > deadline:
                return count
            time.sleep(0.01)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=5)


@pytest.fixture()
def milter(site: Site) -> Iterator[FakeMilter]:
    stand_in = FakeMilter(site.root)
    site.pid_file.write_text(f"{stand_in.process.pid}\n")
    yield stand_in
    stand_in.stop()


def snapshot(path: Path) -> tuple[bytes, int, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_ino, stat.S_IMODE(st.st_mode), st.st_uid


# -- new --------------------------------------------------------------------------------------


def test_new_writes_a_0600_key_owned_by_the_userid_user_beside_the_current_key(
    tmp_path: Path,
) -> None:
    site = make_site(tmp_path, "127.0.0.1")
    tables = snapshot(site.key_table), snapshot(site.signing_table)
    code, out, err = rotate(site, "new", "-s", "2027-01", "--algorithm", "ed25519")
    assert (code, err) == (EXIT_OK, "")
    path = site.keys / "2027-01.private"
    st = path.stat()
    nobody = pwd.getpwnam("nobody")
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    # Written through a temporary file in the same folder, which is gone.
    assert sorted(p.name for p in site.keys.iterdir() if p.name.startswith(".")) == []
    key = load_private_key(path, require_safe=False)
    # The output is a zone-file fragment: comments and the BIND TXT line to publish.
    record_lines = [line for line in out.splitlines() if not line.startswith(";")]
    assert record_lines[0].startswith(f"2027-01._domainkey.{DOMAIN}.\tIN\tTXT\t( ")
    strings = re.findall(r'"((?:[^"\\]|\\.)*)"', "\n".join(record_lines))
    assert key.matches(parse_key_record("".join(strings)).public_key())
    assert f"authmilter rotate check -c {site.conf} -d {DOMAIN} -s 2027-01" in out
    assert "nothing signs with it yet" in out
    # Nothing that signs was touched.
    assert (snapshot(site.key_table), snapshot(site.signing_table)) == tables


def test_new_refuses_to_replace_an_existing_key(tmp_path: Path) -> None:
    site = make_site(tmp_path, "127.0.0.1")
    assert rotate(site, "new", "-s", "2027-01", "--algorithm", "ed25519")[0] == EXIT_OK
    before = snapshot(site.keys / "2027-01.private")
    code, out, err = rotate(site, "new", "-s", "2027-01", "--algorithm", "ed25519")
    assert code == EXIT_CANTCREAT
    assert out == ""
    assert err == (f"authmilter rotate new: {site.keys}/2027-01.private exists; refusing to "
                   "replace a key (pick another selector, or remove that file if it is not in "
                   "use)\n")  # fmt: skip
    assert snapshot(site.keys / "2027-01.private") == before


def test_new_without_userid_is_owned_by_the_running_user_and_d_names_the_folder(
    tmp_path: Path,
) -> None:
    site = make_site(tmp_path, "127.0.0.1", user=None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    code, out, _ = rotate(site, "new", "-s", "2027-02", "-D", str(elsewhere), "-b", "1024")
    assert code == EXIT_OK
    st = (elsewhere / "2027-02.private").stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o600)
    assert load_private_key(elsewhere / "2027-02.private").bits == 1024
    assert f"-s 2027-02 -k {elsewhere}/2027-02.private" in out  # check must be told where


def test_new_refuses_the_selector_in_use_and_weak_rsa(tmp_path: Path) -> None:
    site = make_site(tmp_path, "127.0.0.1")
    code, _, err = rotate(site, "new", "-s", "old")
    assert code == EXIT_USAGE
    assert "selector old already signs for example.test" in err
    code, _, err = rotate(site, "new", "-s", "weak", "-b", "768")
    assert code == EXIT_USAGE and "768-bit" in err
    assert not (site.keys / "weak.private").exists()


# -- check ------------------------------------------------------------------------------------


def test_check_passes_when_every_server_publishes_the_key(site: Site, pair: Pair) -> None:
    code, out, err = rotate(site, "check", "-s", "good")  # the key: keys/good.private
    assert (code, err) == (EXIT_OK, "")
    ns1, ns2 = pair.hosts
    assert out.splitlines() == [
        f"good._domainkey.{DOMAIN} TXT against {site.keys}/good.private, zone {DOMAIN}:",
        f"ok   ns1.{DOMAIN} {ns1}:53: key OK",
        f"ok   ns2.{DOMAIN} {ns2}:53: key OK",
        f"ok   resolver {ns1}:53: key OK",
        f"good._domainkey.{DOMAIN} is published on all 3 servers and matches the key; next:",
        f"  authmilter rotate activate -c {site.conf} -d {DOMAIN} -s good",
    ]


def test_check_refuses_a_record_missing_on_one_server(site: Site, pair: Pair) -> None:
    code, out, err = rotate(site, "check", "-s", "half")
    assert code == EXIT_UNAVAILABLE
    ns1, ns2 = pair.hosts
    assert f"ok   ns1.{DOMAIN} {ns1}:53: key OK" in out
    assert err.splitlines() == [
        f"authmilter rotate check: ns2.{DOMAIN} {ns2}:53: no key record: "
        f"half._domainkey.{DOMAIN} does not exist (NXDOMAIN)",
        f"authmilter rotate check: half._domainkey.{DOMAIN}: 1 of 3 servers fail; do not "
        "activate yet",
    ]


def test_check_refuses_a_record_with_the_wrong_key(site: Site, pair: Pair) -> None:
    code, _, err = rotate(site, "check", "-s", "wrong")
    assert code == EXIT_DATAERR
    assert err.splitlines()[0] == (
        f"authmilter rotate check: ns2.{DOMAIN} {pair.hosts[1]}:53: the public key at "
        f"wrong._domainkey.{DOMAIN} does not match the private key {site.keys}/wrong.private")


def test_check_refuses_a_revoked_record(site: Site, pair: Pair) -> None:
    code, _, err = rotate(site, "check", "-s", "revoked")
    assert code == EXIT_UNAVAILABLE
    assert err.splitlines()[0] == (
        f"authmilter rotate check: ns2.{DOMAIN} {pair.hosts[1]}:53: key record at "
        f"revoked._domainkey.{DOMAIN} is revoked (empty p=)")


def test_check_walks_up_to_the_zone_cut(site: Site, pair: Pair) -> None:
    # mail.example.test has no NS records of its own: its zone is example.test.
    code, out, err = invoke("rotate", "check", "-c", str(site.conf), "-d", f"mail.{DOMAIN}",
                            "-s", "mail", "-k", str(site.keys / "mail.private"))  # fmt: skip
    assert (code, err) == (EXIT_OK, "")
    assert f", zone {DOMAIN}:" in out
    assert f"ok   ns2.{DOMAIN} {pair.hosts[1]}:53: key OK" in out


def test_check_without_a_key_file_says_which_one(site: Site) -> None:
    code, _, err = rotate(site, "check", "-s", "nokey")
    assert code == EXIT_NOINPUT
    assert err.startswith(f"authmilter rotate check: {site.keys}/nokey.private: cannot open key "
                          "file: No such file or directory")  # fmt: skip


# -- activate ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "code", "problem"),
    [
        ("half", EXIT_UNAVAILABLE, "no key record: half._domainkey.example.test does not exist"),
        ("wrong", EXIT_DATAERR, "the public key at wrong._domainkey.example.test does not match"),
        ("revoked", EXIT_UNAVAILABLE, "key record at revoked._domainkey.example.test is revoked"),
    ],
)
def test_activate_refuses_unless_every_server_is_right(
    site: Site, pair: Pair, milter: FakeMilter, selector: str, code: int, problem: str
) -> None:
    tables = snapshot(site.key_table), snapshot(site.signing_table)
    got, _, err = rotate(site, "activate", "-s", selector, "--now", T0)
    assert got == code
    refusals = [line for line in err.splitlines() if "refused" in line]
    assert len(refusals) == 1
    assert refusals[0].startswith(f"authmilter rotate activate: refused: {selector}._domainkey."
                                  f"{DOMAIN} is not ready on ns2.{DOMAIN} {pair.hosts[1]}:53: "
                                  f"{problem}")  # fmt: skip
    assert (snapshot(site.key_table), snapshot(site.signing_table)) == tables
    assert not site.state.exists()
    assert milter.hups(expect=0) == 0


def test_activate_switches_the_tables_atomically_and_reloads(
    site: Site, pair: Pair, milter: FakeMilter
) -> None:
    nobody = pwd.getpwnam("nobody")
    os.chown(site.key_table, nobody.pw_uid, nobody.pw_gid)
    site.key_table.chmod(0o640)
    _, inode, _, _ = snapshot(site.key_table)
    code, out, err = rotate(site, "activate", "-s", "good", "--now", T0)
    assert (code, err) == (EXIT_OK, ""), err
    # The KeyTable was replaced by a rename (new inode), with its mode, owner and comments.
    text, new_inode, mode, uid = snapshot(site.key_table)
    assert (new_inode != inode, mode, uid) == (True, 0o640, nobody.pw_uid)
    assert site.key_table.stat().st_gid == nobody.pw_gid
    assert text.decode() == (f"# the keys\ngood._domainkey.{DOMAIN} {DOMAIN}:good:"
                             f"{site.keys}/good.private  # signs now\n")  # fmt: skip
    assert site.signing_table.read_text() == f"*@{DOMAIN} good._domainkey.{DOMAIN}\n"
    assert [p.name for p in site.root.iterdir() if p.name.startswith(".")] == []
    assert milter.hups(expect=1) == 1
    assert f"reload: sent SIGHUP to authmilter (pid {milter.process.pid})" in out
    state = json.loads((site.state / "rotate" / f"{DOMAIN}.json").read_text())
    (act,) = state["activations"]
    assert act["activated_utc"] == "2027-01-05 10:00:00 UTC"
    assert (act["old_selector"], act["old_ttl"], act["selector"]) == ("old", OLD_TTL, "good")
    assert (act["old_key"], act["old_algorithm"]) == (f"{site.keys}/old.private", "rsa")
    # Again: nothing to switch.
    code, _, err = rotate(site, "activate", "-s", "good", "--now", T0)
    assert code == EXIT_OK and "nothing to switch" in err


def test_activate_refuses_a_configuration_that_does_not_build(site: Site, pair: Pair) -> None:
    (site.keys / "good.private").chmod(0o644)  # RequireSafeKeys refuses it
    tables = snapshot(site.key_table), snapshot(site.signing_table)
    code, _, err = rotate(site, "activate", "-s", "good", "--now", T0)
    assert code == EXIT_CONFIG
    assert ("authmilter rotate activate: refused: the configuration with the new key does not "
            "build, nothing changed: ") in err
    assert "good.private: mode 0644 is readable by group/others" in err
    assert (snapshot(site.key_table), snapshot(site.signing_table)) == tables
    assert [p.name for p in site.root.iterdir() if p.name.startswith(".")] == []


def test_activate_without_a_running_milter_says_to_reload(tmp_path: Path, pair: Pair) -> None:
    site = make_site(tmp_path, pair.ns1.host, pid_file=False)
    code, _, err = rotate(site, "activate", "-s", "good", "--now", T0)
    assert code == EXIT_OK
    assert err == ("authmilter rotate activate: reload: the configuration sets no PidFile: "
                   "reload authmilter yourself (systemctl reload authmilter)\n")  # fmt: skip
    assert "good:" in site.key_table.read_text()


# -- retire -----------------------------------------------------------------------------------


def test_retire_refuses_before_the_deadline_and_says_what_to_do_after(
    site: Site, pair: Pair, milter: FakeMilter
) -> None:
    assert rotate(site, "activate", "-s", "good", "--now", T0)[0] == EXIT_OK
    deadline = 1_799_143_200 + FIVE_DAYS + OLD_TTL  # T0 as epoch + 5 days + the TTL
    early = ("--now", f"@{deadline - 1}", "--queue-lifetime", "5d")
    code, out, err = rotate(site, "retire", *early)
    assert (code, out) == (EXIT_TEMPFAIL, "")
    assert err == ("authmilter rotate retire: refused: mail signed s=old may be queued until "
                   "2027-01-10 10:15:00 UTC (activated 2027-01-05 10:00:00 UTC + queue lifetime "
                   "5d (--queue-lifetime) + record TTL 900s); keep old._domainkey.example.test "
                   "until then\n")  # fmt: skip
    assert rotate(site, "retire", *early, "--delete-key")[0] == EXIT_TEMPFAIL
    assert (site.keys / "old.private").exists()

    on_time = ("--now", "2027-01-10T10:15:00", "--queue-lifetime", "120h")
    code, out, err = rotate(site, "retire", *on_time)
    assert (code, err) == (EXIT_OK, "")
    assert out.startswith("selector old of example.test can go since 2027-01-10 10:15:00 UTC")
    assert f"remove the record old._domainkey.{DOMAIN}. TXT" in out
    assert (f'old._domainkey.{DOMAIN}.\tIN\tTXT\t( "v=DKIM1; k=rsa; "\n\t  "p=" )  ; ----- DKIM '
            f"key old for {DOMAIN}\n") in out  # fmt: skip
    assert "--delete-key" in out
    assert (site.keys / "old.private").exists()  # nothing deleted without --delete-key

    code, out, _ = rotate(site, "retire", *on_time, "--delete-key")
    assert code == EXIT_OK
    assert f"deleted {site.keys}/old.private" in out
    assert not (site.keys / "old.private").exists()
    assert (site.keys / "good.private").exists()
    code, out, _ = rotate(site, "retire", *on_time)
    assert (code, out) == (EXIT_OK, f"nothing left to retire for {DOMAIN}: every recorded old "
                                    "key is deleted\n")  # fmt: skip


def test_retire_without_an_activation_refuses(site: Site) -> None:
    code, _, err = rotate(site, "retire", "--queue-lifetime", "5d")
    assert code == EXIT_NOINPUT
    assert err == (f"authmilter rotate retire: no activation of a new key for {DOMAIN} is "
                   f"recorded ({site.state}/rotate/{DOMAIN}.json): retire follows 'authmilter "
                   "rotate activate'\n")  # fmt: skip


def test_postfix_time_values() -> None:
    assert [parse_postfix_time(t) for t in ("5d", "5", "120h", "90m", "3600s", "1w")] == [
        FIVE_DAYS, FIVE_DAYS, FIVE_DAYS, 5400, 3600, 7 * 86_400]
    with pytest.raises(ValueError):
        parse_postfix_time("5 days")


# -- the whole rotation, with the record new prints published as printed ----------------------


def test_new_check_activate_retire_end_to_end(tmp_path: Path) -> None:
    first = start_pair(NS1_RECORDS, NS2_RECORDS)
    try:
        site = make_site(tmp_path, first.ns1.host)
        code, printed, _ = rotate(site, "new", "-s", "2027-01", "--algorithm", "ed25519")
        assert code == EXIT_OK
        code, _, err = rotate(site, "check", "-s", "2027-01")
        assert code == EXIT_UNAVAILABLE and "do not activate yet" in err
        assert rotate(site, "activate", "-s", "2027-01", "--now", T0)[0] == EXIT_UNAVAILABLE
        hosts = first.hosts
    finally:
        first.stop()
    # Publish what new printed, verbatim (its comments are zone-file comments), on both.
    second = start_pair(NS1_RECORDS, NS2_RECORDS, raw=printed, hosts=hosts)
    try:
        assert rotate(site, "check", "-s", "2027-01")[0] == EXIT_OK
        code, out, err = rotate(site, "activate", "-s", "2027-01", "--now", T0)
        assert code == EXIT_OK
        assert "reload: PidFile" in err and "does not exist" in err
        assert "2027-01:" in site.key_table.read_text()
        code, _, err = rotate(site, "retire", "--now", "2027-01-06T00:00:00",
                              "--queue-lifetime", "1d")  # fmt: skip
        assert code == EXIT_TEMPFAIL and "2027-01-06 10:15:00 UTC" in err
        assert rotate(site, "retire", "--now", "2027-01-06T10:15:00",
                      "--queue-lifetime", "1d")[0] == EXIT_OK  # fmt: skip
    finally:
        second.stop()


def test_the_stand_in_milter_is_not_signalled_when_the_pid_file_names_another_program(
    site: Site, pair: Pair
) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        site.pid_file.write_text(f"{sleeper.pid}\n")
        code, _, err = rotate(site, "activate", "-s", "good", "--now", T0)
        assert code == EXIT_OK
        assert f"process {sleeper.pid} (from PidFile {site.pid_file}) is not authmilter" in err
        assert sleeper.poll() is None  # a SIGHUP would have killed it
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait(timeout=5)
