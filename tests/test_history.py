"""OpenDMARC's ``HistoryFile`` (:mod:`authmilter.reports.history`), checked against Debian's real
OpenDMARC 1.4.2 and the rules of its ``opendmarc-import``.

End to end, the same messages go through two real Postfix instances with the same NSD zones:
one with Debian's OpenDKIM and OpenDMARC (``HistoryFile``, ``SPFSelfValidate``,
``RejectFailures``, ``HoldQuarantinedMessages``; compare/lab.py runs it in a mount namespace
whose resolv.conf names the NSD), one with authmilter reading the same settings. Both history
files are read by :func:`parse_history`, which follows ``opendmarc-import`` 1.4.2 line by line,
and for every message the values the import stores in its database are compared; job,
received and reporter may differ (two MTAs, two clocks) but must be present and well formed.

``/usr/sbin/opendmarc-import`` itself cannot run here: before it reads a line it needs a live
MySQL/MariaDB server (``DBI->connect`` to ``DBI:mysql:…``, opendmarc-import line 549, exits 1
without one, and it stores nothing anywhere else), and the test machines run no database
server. :func:`parse_history` stands in for it; each step cites the Perl line it follows.

The unit tests cover :func:`~authmilter.reports.history.format_block` and the writer: batches,
a full queue (dropped, counted, logged once), an unwritable path (failed, counted), a short
write cut back, and two processes appending to one file without interleaving a block.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dkim
import pytest

from authmilter import metrics
from authmilter.keys import KeyAlgorithm, PrivateKey, generate_private_key, key_record_text
from authmilter.reports import history
from authmilter.reports.record import DmarcEvent, MessageContext
from dnsserver import make_zone, txt_rdata
from helpers import compose
from milter_fixture import AuthmilterProcess
from opendkim_fixture import OpenDkim, require_opendkim
from postfix_fixture import (
    MYHOSTNAME,
    PostfixInstance,
    SmtpRejected,
    new_socket_dir,
    require_postfix,
)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from compare import lab  # noqa: E402

IMPORT = Path("/usr/sbin/opendmarc-import")
OPENDMARC = Path(lab.OPENDMARC)

# -- opendmarc-import's reading, in Python ------------------------------------------------------


@dataclass
class Imported:
    """One message as opendmarc-import 1.4.2 holds it when it calls ``update_db()``: Perl
    scalars stay strings, ``None`` is ``undef``."""

    jobid: str | None = None
    reporter: str | None = None
    received: str | None = None
    ipaddr: str | None = None
    fdomain: str | None = None
    envdomain: str | None = None
    pdomain: str | None = None
    policy: str | None = None
    action: str | None = None
    spf: str | None = None
    align_dkim: str | None = None
    align_spf: str | None = None
    arc: str | None = None
    arc_policy: str | None = None
    arc_policy_data: list[object] = field(default_factory=list)
    dkim_data: list[tuple[str | None, str | None, str | None, int]] = field(default_factory=list)
    sigcount: int = 0
    rua: list[str | None] = field(default_factory=list)
    adkim: str | None = None
    aspf: str | None = None
    p: str | None = None
    sp: str | None = None
    pct: str | None = None
    serialized_data: list[str] = field(default_factory=list)

    def inserted(self) -> bool:
        """Whether ``update_db()`` inserts it: l. 231-246 look up reporter, From, MAIL FROM,
        policy domain and address with ``get_table_id``, which gives up on an undefined name
        or ``-`` (l. 134), and return without a row if any of them failed."""
        names = (self.reporter, self.fdomain, self.envdomain, self.pdomain, self.ipaddr)
        return all(n is not None and n != "-" for n in names)

    def stored(self) -> dict[str, object]:
        """The values ``update_db()`` writes: the ``messages`` row (l. 248-266, but for date,
        jobid and reporter), the ``signatures`` rows (l. 297-325), the ARC rows (l. 327-388)
        and the ``requests`` row of the From domain (l. 390-435: repuri is the rua values
        joined with commas, l. 396)."""
        return {
            "policy": self.policy, "disp": self.action, "ip": self.ipaddr,
            "env_domain": self.envdomain, "from_domain": self.fdomain,
            "policy_domain": self.pdomain, "spf": self.spf, "align_spf": self.align_spf,
            "align_dkim": self.align_dkim, "sigcount": self.sigcount, "arc": self.arc,
            "arc_policy": self.arc_policy, "arc_policy_data": self.arc_policy_data,
            "signatures": self.dkim_data,
            "repuri": ",".join(u or "" for u in self.rua), "adkim": self.adkim,
            "aspf": self.aspf, "policy_p": self.p, "spolicy": self.sp, "pct": self.pct,
        }  # fmt: skip


@dataclass
class ImportRun:
    messages: list[Imported]
    unknown_keys: list[tuple[int, str]]


def parse_history(text: str) -> ImportRun:
    """Read a history file as opendmarc-import 1.4.2 (``/usr/sbin/opendmarc-import``) does."""
    messages: list[Imported] = []
    unknown: list[tuple[int, str]] = []
    cur = Imported()
    # $dkim_selector and $dkim_result are never reset (not in the list of l. 660-683).
    dkim_selector: str | None = None
    dkim_result: str | None = None
    for lineno, line in enumerate(text.split("\n"), 1):  # l. 568: while (<$inputfh>); chomp
        if line == "":
            continue  # l. 573-579: split of "" is the empty list: $key undefined, skipped
        # l. 573: split / /, $_, 3 — at single spaces, at most 3 fields, empty ones kept.
        parts = line.split(" ", 2)
        key = parts[0]
        value = parts[1] if len(parts) > 1 else None
        data = parts[2] if len(parts) > 2 else None
        if data:  # l. 581: defined and not empty
            if data.startswith("json:"):  # l. 583-586
                cur.serialized_data = data.split(":", 1)
            else:  # l. 589: split / /, $data (trailing empty fields dropped), two taken
                words = data.split(" ")
                while words and words[-1] == "":
                    words.pop()
                dkim_selector = words[0] if words else None
                dkim_result = words[1] if len(words) > 1 else None
        if key == "job":  # l. 655-687: a new job ends the one before
            if cur.jobid is not None:
                messages.append(cur)
                cur = Imported()
            cur.jobid = value
        elif key == "dkim":  # l. 632-649: error is 1 for results 4 and 5
            error = 1 if dkim_result in ("4", "5") else 0
            cur.dkim_data.append((value, dkim_selector, dkim_result, error))
            cur.sigcount += 1
        elif key in ("from", "mfrom", "pdomain"):  # l. 651-653, 693-695, 705-707: lc()
            lowered = (value or "").lower()
            if key == "from":
                cur.fdomain = lowered
            elif key == "mfrom":
                cur.envdomain = lowered
            else:
                cur.pdomain = lowered
        elif key == "rua":  # l. 721-726
            if value != "-":
                cur.rua.append(value)
        elif key == "arc_policy":  # l. 615-626
            cur.arc_policy = value
            if len(cur.serialized_data) == 2:
                cur.arc_policy_data = list(json.loads(cur.serialized_data[1]))
            else:
                cur.arc_policy_data = []
        elif key in ("action", "adkim", "align_dkim", "align_spf", "arc", "aspf", "ipaddr",
                     "p", "pct", "policy", "received", "reporter", "sp", "spf"):  # fmt: skip
            setattr(cur, key, value)  # l. 595-613, 628-630, 689-691, 697-719, 728-734
        else:
            unknown.append((lineno, key))  # l. 736-738: "unknown key"
    if cur.jobid is not None:  # l. 742-745
        messages.append(cur)
    return ImportRun(messages, unknown)


def test_the_parser_follows_opendmarc_import_s_source() -> None:
    """The Perl lines cited above are still what Debian's script says (a changed script
    fails here instead of silently disagreeing)."""
    if not IMPORT.exists():
        pytest.fail("opendmarc-import is missing: run `make test` (Debian package opendmarc)")
    perl = IMPORT.read_text().splitlines()
    assert "split / /, $_, 3;" in perl[572], perl[572]
    assert 'if ($data =~ /^json:/)' in perl[582]
    assert '$fdomain = lc($value);' in perl[651]
    assert 'if ($dkim_result eq "4" ||' in perl[636]
    assert 'if ($value ne "-")' in perl[721]
    assert "$dbi_h = DBI->connect(" in perl[548]
    assert "(!defined($name) || $name eq '-')" in perl[133]
    keys = set(re.findall(r'^\s*case "(\w+)"', "\n".join(perl), flags=re.M))
    assert keys == {"action", "adkim", "align_dkim", "align_spf", "arc", "arc_policy", "aspf",
                    "dkim", "from", "job", "ipaddr", "mfrom", "p", "pct", "pdomain", "policy",
                    "received", "reporter", "rua", "sp", "spf"}  # fmt: skip


# -- format_block -------------------------------------------------------------------------------

NOW = 1_790_000_000.0


def event(**changes: object) -> DmarcEvent:
    fields: dict[str, object] = dict(
        time=NOW + 0.7, reporter="mx.ours.example", source_ip="192.0.2.7",
        header_from="pass.example", envelope_from="bounce.example", envelope_to=("ours.example",),
        policy_domain="pass.example", p="reject", sp=None, np=None, adkim="r", aspf="s", fo="0",
        testing=False, discovery_method="psl", disposition="none", overrides=(),
        dkim_aligned="pass", spf_aligned="fail",
        dkim=(("pass.example", "sel", "pass"), ("other.example", "s2", "temperror")),
        spf=("bounce.example", "mfrom", "softfail"), rua=("mailto:agg@pass.example",), ruf=())
    fields.update(changes)
    return DmarcEvent(**fields)  # type: ignore[arg-type]


def context(**changes: object) -> MessageContext:
    fields: dict[str, object] = dict(job_id="4Q7X1Z2ABC", pct=100, psd="u", headers=(),
                                     mail_from="b@bounce.example", recipients=("u@ours.example",))
    fields.update(changes)
    return MessageContext(**fields)  # type: ignore[arg-type]


def test_a_block_has_opendmarc_s_lines_in_opendmarc_s_order() -> None:
    assert history.format_block(event(), context()) == textwrap.dedent(f"""\
        job 4Q7X1Z2ABC
        reporter mx.ours.example
        received {int(NOW)}
        ipaddr 192.0.2.7
        from pass.example
        mfrom bounce.example
        dkim pass.example sel 0
        dkim other.example s2 4
        spf 2
        pdomain pass.example
        policy 15
        rua mailto:agg@pass.example
        pct 100
        adkim 114
        aspf 115
        p 114
        sp 0
        align_dkim 4
        align_spf 5
        arc 7
        arc_policy 2 json:[]
        action 2
        """)


@pytest.mark.parametrize(("changes", "ctx", "expected"), [
    # A fail takes the policy in force: p= for the policy domain itself ...
    ({"dkim_aligned": "fail", "disposition": "reject"}, {},
     {"policy": "16", "disp": "0", "align_dkim": "5", "policy_p": "114", "spolicy": "0"}),
    # ... sp= for a subdomain when published, else p=.
    ({"dkim_aligned": "fail", "header_from": "sub.pass.example", "sp": "none",
      "p": "quarantine"}, {},
     {"policy": "18", "from_domain": "sub.pass.example", "policy_p": "113", "spolicy": "110"}),
    ({"dkim_aligned": "fail", "header_from": "sub.pass.example", "p": "quarantine",
      "disposition": "quarantine"}, {"pct": 40},
     {"policy": "17", "disp": "4", "pct": "40", "spolicy": "0"}),
    # An SPF pass aligned is a pass however the DKIM went.
    ({"dkim_aligned": "fail", "spf_aligned": "pass", "spf": ("pass.example", "mfrom", "pass"),
      "dkim": ()}, {}, {"policy": "15", "align_spf": "4", "spf": "0", "sigcount": 0}),
    # No SPF evaluated; no rua; the null sender.
    ({"spf": None, "rua": (), "envelope_from": ""}, {},
     {"spf": "-1", "repuri": "", "env_domain": ""}),
    # Every result token has its ARES number.
    ({"dkim": tuple(("d.example", f"s{i}", r) for i, r in enumerate(
        ("pass", "fail", "neutral", "none", "policy", "temperror", "permerror"))),
      "spf": ("pass.example", "helo", "permerror")}, {},
     {"signatures": [("d.example", "s0", "0", 0), ("d.example", "s1", "7", 0),
                     ("d.example", "s2", "3", 0), ("d.example", "s3", "6", 0),
                     ("d.example", "s4", "8", 0), ("d.example", "s5", "4", 1),
                     ("d.example", "s6", "5", 1)], "sigcount": 7, "spf": "5"}),
    ({"rua": ("mailto:a@pass.example", "mailto:b@x.example!10m")}, {},
     {"repuri": "mailto:a@pass.example,mailto:b@x.example!10m"}),
])  # fmt: skip
def test_what_opendmarc_import_reads_from_a_block(changes: dict[str, object],
                                                  ctx: dict[str, object],
                                                  expected: dict[str, object]) -> None:  # fmt: skip
    run = parse_history(history.format_block(event(**changes), context(**ctx)))
    assert run.unknown_keys == []
    (got,) = run.messages
    assert got.inserted()
    stored = got.stored()
    assert {k: stored[k] for k in expected} == expected


def test_np_and_t_y_do_not_change_the_policy_code_as_opendmarc_knows_neither() -> None:
    block = history.format_block(event(dkim_aligned="fail", np="none", testing=True,
                                       disposition="quarantine"), context())  # fmt: skip
    (got,) = parse_history(block).messages
    assert (got.policy, got.action) == ("16", "4")


def test_a_value_with_space_or_newline_cannot_split_a_line_or_start_a_job() -> None:
    block = history.format_block(event(), context(job_id="A B\njob X"))
    run = parse_history(block + block)
    assert [m.jobid for m in run.messages] == ["A%20B%0Ajob%20X"] * 2
    assert run.unknown_keys == []
    assert history.format_block(event(), context(job_id="")).startswith("job NOQUEUE\n")


def test_ipv6_and_mixed_case_are_written_as_the_event_has_them() -> None:
    block = history.format_block(event(source_ip="2001:DB8::1", header_from="Pass.Example",
                                       policy_domain="PASS.example"), context())  # fmt: skip
    (got,) = parse_history(block).messages
    assert (got.ipaddr, got.fdomain, got.pdomain) == ("2001:db8::1", "pass.example",
                                                      "pass.example")  # fmt: skip


# -- the writer ---------------------------------------------------------------------------------


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """What the writer tells the metrics, by outcome."""
    seen: dict[str, int] = {}

    def history_records(outcome: str, count: int = 1) -> None:
        seen[outcome] = seen.get(outcome, 0) + count

    monkeypatch.setattr(metrics, "history_records", history_records)
    return seen


def items(n: int, tag: str = "") -> list[tuple[DmarcEvent, MessageContext]]:
    return [(event(time=NOW + i), context(job_id=f"{tag}J{i:05d}")) for i in range(n)]


def test_blocks_are_appended_in_batches_in_order(tmp_path: Path,
                                                 counted: dict[str, int]) -> None:  # fmt: skip
    path = tmp_path / "history"
    path.write_text("job OLD\n")  # an existing file is appended to, never replaced
    writer = history.HistoryWriter(str(path), start=False)
    batch = items(1200)
    assert all(writer.put(e, c) for e, c in batch)
    assert writer.close(timeout=30)
    assert writer.batches == [500, 500, 200]
    assert (writer.written, writer.dropped, writer.failed) == (1200, 0, 0)
    assert counted == {"written": 1200}
    assert path.read_text() == "job OLD\n" + "".join(history.format_block(e, c) for e, c in batch)


def test_a_new_file_is_made_for_the_filter_s_user_and_group(tmp_path: Path) -> None:
    path = tmp_path / "history"
    old = os.umask(0)
    try:
        writer = history.HistoryWriter(str(path), start=False)
        writer.put(*items(1)[0])
        assert writer.close(timeout=30)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_started_writer_writes_within_its_interval(tmp_path: Path,
                                                     counted: dict[str, int]) -> None:  # fmt: skip
    path = tmp_path / "history"
    writer = history.HistoryWriter(str(path), interval=0.05)
    for e, c in items(3):
        writer.put(e, c)
    deadline = time.monotonic() + 10
    while writer.written < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.written == 3 and len(parse_history(path.read_text()).messages) == 3
    assert writer.close(timeout=5)


def test_a_full_queue_drops_counts_and_logs_once_without_blocking(
        tmp_path: Path, counted: dict[str, int], caplog: pytest.LogCaptureFixture) -> None:
    """The thread is not started: a put that waited would never return."""
    writer = history.HistoryWriter(str(tmp_path / "history"), maxsize=5, start=False)
    with caplog.at_level(logging.WARNING, logger="authmilter"):
        accepted = [writer.put(e, c) for e, c in items(8)]
    assert accepted == [True] * 5 + [False] * 3
    assert writer.dropped == 3 and counted == {"dropped": 3}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "queue of 5 full" in lines[0] and "J00005" in lines[0], lines
    assert writer.close(timeout=30)
    assert (writer.written, writer.dropped, writer.failed) == (5, 3, 0)
    assert len(parse_history((tmp_path / "history").read_text()).messages) == 5


def test_a_closed_writer_drops_and_counts(tmp_path: Path, counted: dict[str, int]) -> None:
    writer = history.HistoryWriter(str(tmp_path / "history"), start=False)
    assert writer.close(timeout=30)
    assert not writer.put(*items(1)[0])
    assert counted == {"dropped": 1}


def test_an_unwritable_file_counts_failures_and_a_later_batch_gets_through(
        tmp_path: Path, counted: dict[str, int], caplog: pytest.LogCaptureFixture) -> None:
    """The file is opened for each batch: once the path works again, writing resumes."""
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the folder should be")
    path = blocker / "history"
    writer = history.HistoryWriter(str(path), start=False)
    with caplog.at_level(logging.WARNING, logger="authmilter"):
        writer._write(items(3))
        writer._write(items(2))
    assert (writer.written, writer.failed) == (0, 5) and counted == {"failed": 5}
    assert [r.getMessage() for r in caplog.records] == [
        f"HistoryFile {path}: cannot write 3 block(s): "
        f"[Errno 20] Not a directory: '{path}'"]
    blocker.unlink()
    blocker.mkdir()
    writer._write(items(4))
    assert (writer.written, writer.failed) == (4, 5)
    assert len(parse_history(path.read_text()).messages) == 4


def test_record_never_raises_and_counts_what_it_could_not_queue(
        counted: dict[str, int]) -> None:  # fmt: skip
    assert history.record("", *items(1)[0]) is False
    assert counted == {"failed": 1}


def test_record_and_close_use_one_writer_per_process_and_file(tmp_path: Path,
                                                             counted: dict[str, int]) -> None:
    path = str(tmp_path / "history")
    first = history.writer(path)
    assert history.writer(path) is first
    for e, c in items(3):
        assert history.record(path, e, c)
    history.close(10)
    assert first.written == 3 and counted == {"written": 3}
    assert len(parse_history(Path(path).read_text()).messages) == 3
    again = history.writer(path)
    assert again is not first  # close() let go of it
    again.pid = -1  # as seen from a forked child: not this process's writer
    assert history.writer(path) is not again
    history.close(10)


WRITER_SCRIPT = """
import dataclasses, json, os, sys, time
from authmilter.reports import history
from authmilter.reports.record import DmarcEvent, MessageContext
path, tag, n, event = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
base = DmarcEvent.from_json(event)
w = history.HistoryWriter(path, batch=7, interval=0.0, maxsize=100)
open(f"{path}.{tag}.ready", "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(f"{path}.go") and time.monotonic() < deadline:  # start together
    time.sleep(0.001)
for i in range(n):  # as items(n, tag)
    e = dataclasses.replace(base, time=base.time + i)
    c = MessageContext(job_id=f"{tag}J{i:05d}", pct=100, psd="u", headers=(),
                       mail_from="b@bounce.example", recipients=("u@ours.example",))
    while not w.put(e, c):  # a full queue drops (and counts): offer it again
        pass
ok = w.close(timeout=120)
sys.exit(0 if ok and w.written == n else 1)
"""


def test_two_processes_appending_to_one_file_never_interleave_a_block(tmp_path: Path) -> None:
    path = tmp_path / "history"
    n = 3000
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "milter"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    base = json.dumps(event(time=NOW).to_json())
    procs = [subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(path), tag, str(n), base],
                              env=env) for tag in ("A", "B")]  # fmt: skip
    deadline = time.monotonic() + 60
    while not all(Path(f"{path}.{t}.ready").exists() for t in "AB"):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    Path(f"{path}.go").touch()
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    text = path.read_text()
    blocks = ["job " + b for b in text.split("job ")[1:]]
    assert text.startswith("job ") and len(blocks) == 2 * n
    expected = {history.format_block(e, c) for tag in ("A", "B") for e, c in items(n, tag)}
    assert set(blocks) == expected  # every block whole, none mixed with another
    for tag in ("A", "B"):  # each process's blocks in its own order
        jobs = [b.split("\n", 1)[0] for b in blocks if b.startswith(f"job {tag}")]
        assert jobs == [f"job {tag}J{i:05d}" for i in range(n)]


SHORT_WRITE_SCRIPT = """
import resource, signal, sys
from authmilter.reports import history
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: a short write, then EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    history.append(sys.argv[1], b"x" * 10000)
except OSError as e:
    print("refused:", e)
"""


def test_a_write_that_stops_part_way_is_cut_back(tmp_path: Path) -> None:
    """A full disk (here: a file size limit) must not leave half a block for the import."""
    path = tmp_path / "history"
    path.write_bytes(b"job OLD\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "milter")}
    out = subprocess.run([sys.executable, "-c", SHORT_WRITE_SCRIPT, str(path)], env=env,
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert out.stdout.startswith("refused: short write: 4088 of 10000 bytes"), out
    assert path.read_bytes() == b"job OLD\n"


# -- end to end: the real OpenDMARC and authmilter on the same messages ------------------------

OPENDKIM_ID = "opendkim.test"
AUTHMILTER_ID = "mx.authmilter.example"
EVIL_NET = "198.51.100"


@dataclass(frozen=True)
class Keys:
    passing: PrivateKey
    evil: PrivateKey


@dataclass(frozen=True)
class Case:
    name: str
    from_: str
    mail_from: str
    signers: tuple[tuple[str, str, str], ...] = ()  # (key name, domain, selector), top first
    helo: str = "mail.evil.example"
    tamper_after: int = 0  # signatures made before the body is edited (they fail)

    @property
    def client_ip(self) -> str:
        """One address per case: both files' blocks are matched by ``ipaddr``."""
        return f"{EVIL_NET}.{10 + CASES.index(self)}"


CASES = [
    Case("dkim-pass", "Alice <alice@pass.example>", "b@evil.example",
         (("passing", "pass.example", "sel"),)),
    Case("spoof-reject", "alice@pass.example", "b@evil.example",
         (("evil", "evil.example", "sel"),)),
    Case("quarantine", "alice@quar.example", "b@evil.example"),
    Case("none-pct-rua", "alice@none.example", "b@evil.example"),
    Case("spf-fail", "alice@none.example", "b@none.example"),
    Case("subdomain-sp", "alice@sub.org.example", "b@evil.example"),
    Case("null-sender", "alice@pass.example", "", (("passing", "pass.example", "sel"),)),
    Case("several-signatures", "alice@pass.example", "b@evil.example",
         (("passing", "pass.example", "sel"), ("evil", "evil.example", "sel"),
          ("passing", "pass.example", "s2")), tamper_after=1),
    Case("no-record", "alice@nodmarc.example", "b@evil.example"),
]  # fmt: skip
#: What both milters make of each case at the end of DATA: accepted, held or rejected.
SMTP = {"spoof-reject": "rejected", "quarantine": "held"}
#: OpenDMARC writes no block without a DMARC record (RecordAllMessages off); neither do we.
NOT_RECORDED = {"no-record"}


def zones(keys: Keys) -> dict[str, str]:
    passing = txt_rdata(key_record_text(keys.passing))
    return {
        "pass.example": make_zone("pass.example", [
            ("@", "TXT", '"v=spf1 ip4:203.0.113.5 -all"'),
            ("_dmarc", "TXT", '"v=DMARC1; p=reject; rua=mailto:agg@pass.example"'),
            ("sel._domainkey", "TXT", passing), ("s2._domainkey", "TXT", passing)]),
        "evil.example": make_zone("evil.example", [
            ("@", "TXT", f'"v=spf1 ip4:{EVIL_NET}.0/24 -all"'),
            ("sel._domainkey", "TXT", txt_rdata(key_record_text(keys.evil))),
            ("mail", "A", f"{EVIL_NET}.10"),
            ("mail", "TXT", f'"v=spf1 ip4:{EVIL_NET}.0/24 -all"')]),
        "none.example": make_zone("none.example", [
            ("@", "TXT", '"v=spf1 -all"'),
            ("_dmarc", "TXT", '"v=DMARC1; p=none; pct=50; sp=reject; adkim=s; aspf=s; '
                              'rua=mailto:a@none.example,mailto:b@x.example!10m"')]),
        "quar.example": make_zone("quar.example", [("_dmarc", "TXT", '"v=DMARC1; p=quarantine"')]),
        "org.example": make_zone("org.example", [
            ("_dmarc", "TXT", '"v=DMARC1; p=reject; sp=none"'), ("sub", "A", "192.0.2.1")]),
        "nodmarc.example": make_zone("nodmarc.example", [("@", "A", "192.0.2.1")]),
    }  # fmt: skip


def sign(raw: bytes, key: PrivateKey, domain: str, selector: str) -> bytes:
    return bytes(dkim.sign(raw, selector.encode(), domain.encode(), key.dkimpy_private(),
                           include_headers=[b"from", b"to", b"subject", b"date"],
                           canonicalize=(b"relaxed", b"simple")))  # fmt: skip


def make_message(case: Case, keys: Keys) -> bytes:
    raw = compose(case.from_, subject=case.name)
    edited = raw.replace(b"money", b"Money") if case.tamper_after else raw
    fields = b""
    for n, (key_name, domain, selector) in enumerate(case.signers):
        signed = raw if n < case.tamper_after else edited
        fields += sign(signed, getattr(keys, key_name), domain, selector)
    return fields + edited


def send(pf: PostfixInstance, case: Case, raw: bytes) -> tuple[str, str | None]:
    """``("accepted"|"held"|"rejected", queue id)``; the queue id of a rejected message is not
    in the reply."""
    try:
        _code, text = pf.send(raw, mail_from=case.mail_from, rcpt_to=["u@ours.example"],
                              port="inbound", client_ip=case.client_ip, helo=case.helo)
    except SmtpRejected as exc:
        return ("rejected" if exc.code == 550 else f"{exc.code} {exc.text}"), None
    found = re.search(r"queued as (\w+)", text)
    qid = found.group(1) if found else None
    held = any(entry.get("queue_id") == qid for entry in pf.held())
    return ("held" if held else "accepted"), qid


@dataclass
class Side:
    name: str
    smtp: dict[str, tuple[str, str | None]]
    blocks: dict[str, Imported]  # by ipaddr
    run: ImportRun
    text: str
    file_mode: int
    started: float
    ended: float


def run_side(postfix_milters: str, raws: dict[str, bytes],
             stop: list[object]) -> tuple[dict[str, tuple[str, str | None]], float, float]:
    """A Postfix in front of ``postfix_milters``; every case sent through it, in order."""
    pf = PostfixInstance(postfix_milters)
    stop.append(pf)
    pf.start()
    started = time.time()
    smtp = {case.name: send(pf, case, raws[case.name]) for case in CASES}
    return smtp, started, time.time()


def read_side(name: str, path: Path, smtp: dict[str, tuple[str, str | None]],
              started: float, ended: float) -> Side:
    text = path.read_text() if path.exists() else ""
    run = parse_history(text)
    blocks = {m.ipaddr or "": m for m in run.messages}
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0
    return Side(name, smtp, blocks, run, text, mode, started, ended)


@pytest.fixture(scope="module")
def sides() -> Iterator[tuple[Side, Side]]:
    """Both pipelines, fed the same messages; their history files, read."""
    require_postfix()
    require_opendkim()
    if os.geteuid() != 0:
        pytest.fail("NSD on port 53 and mount namespaces need root, as `make test` runs")
    if not os.access(OPENDMARC, os.X_OK):
        pytest.fail("opendmarc is missing: run `make test` (Debian package opendmarc)")
    keys = Keys(generate_private_key(KeyAlgorithm.RSA, 2048),
                generate_private_key(KeyAlgorithm.RSA, 2048))  # fmt: skip
    raws = {case.name: make_message(case, keys) for case in CASES}
    zone_texts = zones(keys)
    work = new_socket_dir("history-")
    address = lab.free_dns_address([f"127.79.{n}.53" for n in range(64)])
    resolv = work / "resolv.conf"
    resolv.write_text(lab.resolv_conf_text(address))
    psl = work / "psl.dat"  # .example is a public suffix on both sides (subdomain → org)
    psl.write_text("// the test's public suffixes\nexample\n")
    to_stop: list[object] = []
    nsd = lab.Nsd53(zone_texts, address)
    try:
        nsd.start()
        # OpenDKIM verifies for OpenDMARC, which reads its Authentication-Results.
        opendkim = OpenDkim(mode="v", nameserver=f"{address}:53", dns_zones=list(zone_texts),
                            authserv_id=OPENDKIM_ID)  # fmt: skip
        to_stop.append(opendkim)
        opendkim.start()
        theirs_path = work / "opendmarc.history"
        conf = work / "opendmarc.conf"
        sock = work / "opendmarc.sock"
        conf.write_text(textwrap.dedent(f"""\
            Socket local:{sock}
            UMask 000
            AuthservID mx.opendmarc.example
            TrustedAuthservIDs {OPENDKIM_ID}
            HistoryFile {theirs_path}
            SPFSelfValidate true
            SPFIgnoreResults true
            RejectFailures true
            HoldQuarantinedMessages true
            PublicSuffixList {psl}
            Syslog true
            """))
        opendmarc = lab.opendmarc(conf, sock, resolv)
        to_stop.append(opendmarc)
        opendmarc.start()
        theirs_smtp, t0, t1 = run_side(f"{opendkim.socket}, unix:{sock}", raws, to_stop)
        theirs = read_side("opendmarc", theirs_path, theirs_smtp, t0, t1)

        ours_path = work / "authmilter.history"
        milter = AuthmilterProcess(textwrap.dedent(f"""\
            AuthservID {AUTHMILTER_ID}
            Mode v
            Workers 2
            Nameservers {address}:53
            PublicSuffixList {psl}
            RejectFailures yes
            HoldQuarantinedMessages yes
            HistoryFile {ours_path}
            """))
        to_stop.append(milter)
        milter.start()
        ours_smtp, t0, t1 = run_side(milter.postfix_socket, raws, to_stop)
        assert milter.stop() == 0, milter.log()  # the stopping workers write what is queued
        ours = read_side("authmilter", ours_path, ours_smtp, t0, t1)
        yield theirs, ours
    finally:
        for thing in to_stop:  # the libmilter daemons take seconds to notice: signal all first
            if isinstance(thing, (OpenDkim, lab.NamespacedDaemon)):
                thing.terminate()
        for thing in reversed(to_stop):
            if isinstance(thing, PostfixInstance):
                thing.stop()
            elif isinstance(thing, AuthmilterProcess | OpenDkim | lab.NamespacedDaemon):
                thing.cleanup()
        nsd.cleanup()
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.dns
def test_both_files_hold_one_importable_block_per_recorded_message(
        sides: tuple[Side, Side]) -> None:  # fmt: skip
    for side in sides:
        assert side.run.unknown_keys == [], (side.name, side.run.unknown_keys)
        recorded = [c.client_ip for c in CASES if c.name not in NOT_RECORDED]
        assert sorted(side.blocks) == sorted(recorded), (side.name, side.text)
        assert len(side.run.messages) == len(recorded)
        assert all(m.inserted() for m in side.run.messages)
    assert sides[1].file_mode == 0o640


@pytest.mark.dns
@pytest.mark.parametrize("case", [c for c in CASES if c.name not in NOT_RECORDED],
                         ids=lambda c: c.name)  # fmt: skip
def test_opendmarc_import_stores_the_same_for_both(sides: tuple[Side, Side], case: Case) -> None:
    theirs, ours = sides
    assert theirs.smtp[case.name][0] == ours.smtp[case.name][0] == SMTP.get(case.name,
                                                                             "accepted")
    their_block, our_block = theirs.blocks[case.client_ip], ours.blocks[case.client_ip]
    assert our_block.stored() == their_block.stored(), (
        f"{case.name}\n--- opendmarc ---\n{theirs.text}\n--- authmilter ---\n{ours.text}")


@pytest.mark.dns
@pytest.mark.parametrize("case", [c for c in CASES if c.name not in NOT_RECORDED],
                         ids=lambda c: c.name)  # fmt: skip
def test_job_received_and_reporter_are_present_and_well_formed(sides: tuple[Side, Side],
                                                               case: Case) -> None:
    for side, reporter in zip(sides, (MYHOSTNAME, AUTHMILTER_ID), strict=True):
        # OpenDMARC's reporter is the MTA's name ({j}); ours is the event's (the authserv-id).
        block = side.blocks[case.client_ip]
        assert block.jobid is not None and re.fullmatch(r"[0-9A-F]{6,}", block.jobid), block
        qid = side.smtp[case.name][1]
        assert qid is None or block.jobid == qid  # the MTA's queue id, where the reply says it
        assert block.received is not None and block.received.isdigit()
        assert int(side.started) - 1 <= int(block.received) <= side.ended + 1
        assert block.reporter == reporter


@pytest.mark.dns
def test_the_cases_cover_what_they_say(sides: tuple[Side, Side]) -> None:
    """The comparison is only as good as its cases: each shows the value it is there for."""
    _theirs, ours = sides
    by_name = {c.name: ours.blocks[c.client_ip] for c in CASES if c.name not in NOT_RECORDED}
    assert (by_name["dkim-pass"].policy, by_name["dkim-pass"].align_dkim) == ("15", "4")
    assert (by_name["spoof-reject"].policy, by_name["spoof-reject"].action) == ("16", "0")
    assert (by_name["quarantine"].policy, by_name["quarantine"].action) == ("17", "4")
    none = by_name["none-pct-rua"]
    assert (none.policy, none.action, none.pct, none.sp, none.adkim) == ("18", "2", "50", "114",
                                                                       "115")  # fmt: skip
    assert none.rua == ["mailto:a@none.example", "mailto:b@x.example!10m"]
    assert by_name["spf-fail"].spf == "7"
    sub = by_name["subdomain-sp"]
    assert (sub.fdomain, sub.pdomain, sub.policy, sub.p, sub.sp) == (
        "sub.org.example", "org.example", "18", "114", "110")
    assert (by_name["null-sender"].envdomain, by_name["null-sender"].spf) == ("", "0")
    assert by_name["several-signatures"].dkim_data == [
        ("pass.example", "sel", "7", 0), ("evil.example", "sel", "0", 0),
        ("pass.example", "s2", "0", 0)]
