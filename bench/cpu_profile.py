#!/usr/bin/env python3
"""Where the milter's CPU goes, per message: the profile behind docs/performance.md.

The milter's own Python code runs here in one thread, as a worker runs it, on the benchmark's
mail and configuration, without Postfix, libmilter or pymilter's C module:

- a real :class:`authmilter.pipeline.Context` built from the configuration ``make bench``
  gives the milter (``bench/run.py``: ``_authmilter_conf``, with ``ReportDatabase`` in a fresh
  SQLite file and ``ARCSign inbound`` for the verify cases that say so), loaded by
  :func:`authmilter.config.load_config` and resolving through the real resolver against a real
  NSD on loopback port 53 serving the benchmark's zone (``bench/run.py``'s ``start_nsd``);
- per message, a fresh :class:`authmilter.server.AuthMilter` gets the callbacks libmilter
  would give it, through pymilter's own Python entry points (``Milter.connect_callback``'s
  factory step, ``envfrom_bytes``, ``envrcpt_bytes``, ``header_bytes`` …), in Postfix's
  order, with Postfix's ``Received`` field on top, the macros Postfix sends, the body in one
  chunk (4 KiB) or 64 KiB chunks, and the protocol options Postfix 3.7 negotiates (no-reply
  header, body and end-of-header steps, leading space kept). The context object that stands
  in for libmilter's (:class:`FakeLibmilter`) only records what the milter asks of it.

Three kinds of pass per case, each over ``--messages`` messages after ``--warmup`` unmeasured
ones (the DNS cache is warm, as it is on a busy MX):

1. **plain**, ``--rounds`` times (the fastest counts: the least disturbed by the rest of the
   machine): the calling thread's CPU time (``time.thread_time``) per message, and the
   process's (``time.process_time``): the difference is the ``ReportDatabase`` writer thread.
2. **staged**: every stage in :data:`STAGES` wrapped with a thread-CPU timer, exclusive (a
   nested stage's time is taken out of its caller's), and Python's cyclic garbage collector
   timed as a stage of its own through :data:`gc.callbacks`. The stages' sum is a little above
   the plain figure (a timer costs ~0.5 µs a call); the table scales each row to the plain
   total.

What the table cannot see is what the milter process spends outside its Python code: libmilter
reading and writing the protocol, pymilter's C module turning each command into a Python call,
the thread libmilter starts per connection, and the kernel (sockets, the GIL's hand-offs
between those threads). ``bench/run.py`` measures the whole process; the difference between its
milter CPU per message and the plain figure here is that remainder.

Run as root (NSD binds port 53 of a loopback address)::

    .venv/bin/python bench/cpu_profile.py                      # sign, verify, verify-full
    .venv/bin/python bench/cpu_profile.py --cases verify --messages 500 --cprofile 30
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import random
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402 - bench/run.py, beside this file

sys.path.insert(0, str(bench.TESTS))
sys.path.insert(0, str(bench.REPO / "milter"))

import Milter  # noqa: E402

from authmilter import (  # noqa: E402
    arc_verify,
    body_hash,
    dkim_sign,
    dkim_verify,
    metrics,
    pipeline,
    resolver,
    server,
)
from authmilter.config import load_config  # noqa: E402
from authmilter.reports import store  # noqa: E402

#: The cases: (mode, what the configuration adds, the mail).
CASES = {
    "sign": "Mode s, RSA-2048 (authmilter-sign)",
    "verify": "Mode v: DKIM + SPF + DMARC (authmilter-verify)",
    "verify-full": "Mode v with ReportDatabase (SQLite) and ARCSign inbound: the issue's target",
}
#: Macros Postfix 3.7 sends that the milter may ask for (authmilter reads only some).
MACROS = {
    "j": "mx.bench.example", "{daemon_name}": "inbound", "{if_name}": "localhost",
    "{if_addr}": "127.0.0.1", "_": "mail.bench.example [198.51.100.25]",
    "{client_addr}": bench.OUTSIDE_CLIENT, "{client_name}": "unknown",
    "i": "4ZqQ1x3FbNz9Jkq",
}  # fmt: skip
CHUNK = 65535  # Postfix's milter body chunk (MILTER_CHUNK_SIZE)


class FakeLibmilter:
    """What pymilter's ``milterContext`` offers the callbacks, recording instead of sending."""

    def __init__(self, macros: dict[str, str]) -> None:
        self.macros = macros
        self.priv: Any = None
        self.added: list[tuple[str, str, int]] = []
        self.changed: list[tuple[str, int, str | None]] = []

    def getsymval(self, name: str) -> str | None:
        return self.macros.get(name)

    def setpriv(self, priv: Any) -> None:
        self.priv = priv

    def getpriv(self) -> Any:
        return self.priv

    def addheader(self, name: str, value: str, idx: int = -1) -> None:
        self.added.append((name, value, idx))

    def chgheader(self, name: str, idx: int, value: str | None) -> None:
        self.changed.append((name, idx, value))

    def setreply(self, *args: Any) -> None:
        raise AssertionError(f"the benchmark's mail must not be refused: {args}")

    def quarantine(self, reason: str) -> None:
        raise AssertionError(f"the benchmark's mail must not be quarantined: {reason}")


#: Protocol options Postfix 3.7 agrees to with authmilter (``P_HDR_LEADSPC`` and the
#: no-reply steps the adapter's decorators ask for).
PROTOCOL = (Milter.P_HDR_LEADSPC | Milter.P_NR_HELO | Milter.P_NR_HDR | Milter.P_NR_EOH
            | Milter.P_NR_BODY)  # fmt: skip


def split_message(raw: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """Header fields as libmilter hands them over (name; value with its leading space, folds
    as LF + white space) and the body (CRLF)."""
    head, _sep, body = raw.partition(b"\r\n\r\n")
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b"\n" + line)
        else:
            name, _colon, value = line.partition(b":")
            fields.append((name.decode("ascii"), value))
    return fields, body


def received(index: int) -> tuple[str, bytes]:
    """The Received field Postfix adds on top and shows the milter first."""
    return ("Received", b" from mail.bench.example (unknown [198.51.100.25])\n\tby "
            b"mx.bench.example (Postfix) with ESMTP id 4ZqQ1x3FbNz9Jkq\n\tfor <"
            + bench.RCPT.encode() + b">; Sun,  6 Dec 2026 20:00:%02d +0000 (UTC)" % (index % 60))


@dataclass
class Message:
    fields: list[tuple[str, bytes]]
    chunks: list[bytes]


def one_message(ctx: pipeline.Context, msg: Message, client: tuple[str, str]) -> FakeLibmilter:
    """One SMTP connection with one message through the adapter, as libmilter drives it."""
    lib = FakeLibmilter(MACROS)
    m = server.AuthMilter(ctx)
    m._setctx(lib)  # noqa: SLF001 - what Milter.connect_callback does
    m._protocol = PROTOCOL  # noqa: SLF001 - what the negotiation leaves
    hostname, ip = client
    m.connect(hostname, socket.AF_INET, (ip, 40000))
    m.hello(bench.HELO)
    m.envfrom_bytes(f"<{bench.SENDER}>".encode())
    m.envrcpt_bytes(f"<{bench.RCPT}>".encode())
    for name, value in msg.fields:
        m.header_bytes(name, value)
    m.eoh()
    for chunk in msg.chunks:
        m.body(chunk)
    m.eom()
    m.close()
    return lib


# -- the stage timers ------------------------------------------------------------------------

#: (owner, attribute, row). Every call of ``owner.attribute`` is timed; time in a nested
#: stage counts for the nested one only. Rows with the same name add up.
ADAPTER = "adapter callbacks (Python side of pymilter, the adapter)"
STAGES: list[tuple[Any, str, str]] = [
    *[(server.AuthMilter, callback, ADAPTER)
      for callback in ("connect", "hello", "envfrom", "envrcpt", "eoh", "body", "eom", "close")],
    (server.AuthMilter, "header", "header collection"),
    (pipeline.Connection, "__init__", "connection: InternalHosts, PeerList"),
    (pipeline.Transaction, "eoh", "end of header: author, wire form, body-hash plan"),
    (body_hash.BodyHashes, "update", "DKIM: body canonicalization and hashing"),
    (pipeline.Transaction, "_check_spf", "SPF: pyspf parsing and evaluation"),
    (resolver.Resolver, "query", "DNS: resolver cache hits"),
    (pipeline.Transaction, "_evaluate", "DKIM verify: signature parse, key checks"),
    (dkim_verify, "_crypto_verify", "DKIM verify: signature parse, key checks"),
    (dkim_verify, "hash_signed_fields", "DKIM: header canonicalization and hashing"),
    (arc_verify, "hash_signed_fields", "DKIM: header canonicalization and hashing"),
    (dkim_sign.dkim, "hash_headers", "DKIM: header canonicalization and hashing"),
    (dkim_verify, "fetch_key", "DKIM verify: key record parse"),
    (arc_verify, "verify_chain", "ARC: chain verification"),
    (pipeline.Transaction, "_check_header", "RFC 5322 checks, author domain"),
    (pipeline.Transaction, "_judge_dmarc", "DMARC: record, PSL, alignment"),
    (pipeline.Transaction, "_decide", "decision"),
    (pipeline.Transaction, "_render", "Authentication-Results and log line"),
    (pipeline.Transaction, "_seal", "ARC seal (two RSA-2048 signatures)"),
    (pipeline.Transaction, "_sign", "DKIM sign (RSA-2048 signature, header hash)"),
    (pipeline.Transaction, "_record", "report record: making it"),
    (store, "record", "report record: queueing it"),
    (server.AuthMilter, "apply", "applying the verdict (header edits, log)"),
    (metrics, "message", "metrics"),
    (metrics, "result", "metrics"),
    (metrics, "callback", "metrics"),
]


@dataclass
class Timer:
    """Exclusive thread-CPU time per row (a stack of running stages)."""

    rows: dict[str, float] = field(default_factory=dict)
    stack: list[list[Any]] = field(default_factory=list)  # [row, started, nested]

    def enter(self, row: str) -> None:
        self.stack.append([row, time.thread_time(), 0.0])

    def leave(self) -> None:
        row, started, nested = self.stack.pop()
        spent = time.thread_time() - started
        self.rows[row] = self.rows.get(row, 0.0) + spent - nested
        if self.stack:
            self.stack[-1][2] += spent

    def gc_event(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self.enter("Python's cyclic garbage collector")
        elif self.stack and self.stack[-1][0] == "Python's cyclic garbage collector":
            self.leave()


@contextlib.contextmanager
def staged(timer: Timer) -> Iterator[None]:
    """Wrap every stage of :data:`STAGES` (and the GC) with ``timer``; undone after."""
    undo: list[tuple[Any, str, Any]] = []

    def wrap(func: Callable[..., Any], row: str) -> Callable[..., Any]:
        @functools.wraps(func)
        def timed(*args: Any, **kwargs: Any) -> Any:
            timer.enter(row)
            try:
                return func(*args, **kwargs)
            finally:
                timer.leave()

        return timed

    for owner, attr, row in STAGES:
        original = vars(owner).get(attr)  # None: inherited, or not there (undone by delattr)
        undo.append((owner, attr, original))
        setattr(owner, attr, wrap(getattr(owner, attr), row))
    gc.callbacks.append(timer.gc_event)
    try:
        yield
    finally:
        gc.callbacks.remove(timer.gc_event)
        for owner, attr, original in reversed(undo):
            if original is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)


# -- the cases -------------------------------------------------------------------------------


def conf_text(lab: Any, case: str, workdir: Path) -> str:
    """The configuration ``bench/run.py`` gives the milter for this case."""
    if case == "sign":
        from milter_fixture import write_keytable

        name = f"{bench.RSA_SELECTOR}._domainkey.{bench.DOMAIN}"
        tables = write_keytable(workdir, {name: (bench.DOMAIN, bench.RSA_SELECTOR,
                                                 lab.keys.rsa_path)},
                                [(f"*@{bench.DOMAIN}", name)])  # fmt: skip
        return bench._authmilter_conf(lab, "s", None) + tables  # noqa: SLF001
    conf = bench._authmilter_conf(lab, "v", None)  # noqa: SLF001
    if case == "verify-full":
        conf += f"ReportDatabase sqlite:///{workdir / 'dmarc.db'}\n"
        conf += bench._seal_conf(lab.keys, workdir)  # noqa: SLF001
    return conf


def messages(lab: Any, case: str, count: int, size: int) -> list[Message]:
    rng = random.Random(size)
    out = []
    for i in range(count):
        plain = bench.make_message(i, size, rng)
        raw = plain if case == "sign" else bench.presigned(i, size, lab.keys.rsa_pem, plain)
        fields, body = split_message(raw)
        chunks = [body[j:j + CHUNK] for j in range(0, len(body), CHUNK)] or [b""]
        out.append(Message([received(i), *fields], chunks))
    return out


@dataclass
class CaseResult:
    case: str
    size: int
    messages: int
    thread_ms: float  # plain pass: calling thread's CPU per message
    process_ms: float  # plain pass: the process's CPU per message (writer thread included)
    staged_ms: float  # staged pass: calling thread, timers included
    rows: dict[str, float]  # staged pass: ms per message per row, unscaled
    calls: float  # cProfile pass: Python function calls per message


def run_case(lab: Any, case: str, count: int, warmup: int, size: int, rounds: int = 3,
             cprofile: int = 0) -> CaseResult:  # fmt: skip
    from authmilter.pipeline import Context
    from authmilter.resolver import config_resolver

    workdir = Path(tempfile.mkdtemp(prefix=f"profile-{case}-", dir=lab.keys.dir))
    try:
        path = workdir / "authmilter.conf"
        path.write_text(conf_text(lab, case, workdir))
        cfg = load_config(str(path)).config
        ctx = Context.build(cfg, resolver=config_resolver(cfg))
        client = ("mail.bench.example", bench.OUTSIDE_CLIENT) if case != "sign" \
            else ("localhost", "127.0.0.1")  # fmt: skip
        mail = messages(lab, case, count + warmup, size)
        expect = {"sign": "DKIM-Signature", "verify": "Authentication-Results",
                  "verify-full": "ARC-Seal"}[case]  # fmt: skip
        for msg in mail[:warmup]:
            lib = one_message(ctx, msg, client)
            names = [n for n, _v, _i in lib.added]
            if expect not in names:
                raise SystemExit(f"{case}: the milter added {names}, not {expect}")
            if case != "sign":
                ar = next(v for n, v, _i in lib.added if n == "Authentication-Results")
                for method in ("dkim", "spf", "dmarc"):
                    if f"{method}=pass" not in ar:
                        raise SystemExit(f"{case}: {method} did not pass: {ar}")
        measured = mail[warmup:]
        thread_ms, process_ms = [], []
        for _round in range(rounds):
            gc.collect()
            t0, p0 = time.thread_time(), time.process_time()
            for msg in measured:
                one_message(ctx, msg, client)
            t1 = time.thread_time()
            store.close(60)  # the writer thread's rows written: its CPU is counted
            p1 = time.process_time()
            thread_ms.append(1000 * (t1 - t0) / len(measured))
            process_ms.append(1000 * (p1 - p0) / len(measured))
        timer = Timer()
        with staged(timer):
            s0 = time.thread_time()
            for msg in measured:
                one_message(ctx, msg, client)
            s1 = time.thread_time()
        # Python function calls per message: a count that does not depend on the machine.
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for msg in measured:
            one_message(ctx, msg, client)
        prof.disable()
        stats = pstats.Stats(prof)
        calls = stats.total_calls / len(measured)  # type: ignore[attr-defined]
        if cprofile:
            print(f"\n--- cProfile, {case}: top {cprofile} by own time ---")
            stats.sort_stats("tottime").print_stats(cprofile)
        n = len(measured)
        best = min(range(rounds), key=lambda i: thread_ms[i])
        return CaseResult(case, size, n, thread_ms[best], process_ms[best], 1000 * (s1 - s0) / n,
                          {k: 1000 * v / n for k, v in timer.rows.items()},
                          calls)  # fmt: skip
    finally:
        store.close(60)
        shutil.rmtree(workdir, ignore_errors=True)


def table(result: CaseResult) -> str:
    """Rows scaled to the plain pass's thread CPU; the writer thread on its own line."""
    staged_sum = sum(result.rows.values())
    scale = result.thread_ms / staged_sum if staged_sum else 0.0
    lines = [f"{CASES[result.case]}, {bench.size_label(result.size)}, {result.messages} "
             "messages:", "", "| where | µs/msg | share |", "| --- | --- | --- |"]  # fmt: skip
    for row, ms in sorted(result.rows.items(), key=lambda kv: -kv[1]):
        us = 1000 * ms * scale
        if us >= 0.5:
            lines.append(f"| {row} | {us:.0f} | {100 * ms / staged_sum:.0f} % |")
    lines.append(f"| **the milter's Python code, one thread** | **{1000 * result.thread_ms:.0f}** "
                 "| 100 % |")
    writer = result.process_ms - result.thread_ms
    if writer > 0.005:
        lines.append(f"| other threads (ReportDatabase writer) | {1000 * writer:.0f} | |")
    lines.append("")
    lines.append(f"(plain pass: the fastest of the rounds; staged pass: "
                 f"{1000 * result.staged_ms:.0f} µs/msg with the timers, rows scaled by "
                 f"{scale:.2f}; {result.calls:.0f} Python function calls per message)")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="sign,verify,verify-full",
                   help=f"comma-separated: {', '.join(CASES)}")
    p.add_argument("--messages", type=int, default=2000, help="measured messages per pass")
    p.add_argument("--warmup", type=int, default=50, help="unmeasured messages first")
    p.add_argument("--rounds", type=int, default=3,
                   help="plain passes; the fastest counts (the least disturbed)")
    p.add_argument("--size", default="4k", help="message size (as bench/run.py's --size)")
    p.add_argument("--dns-address", default="127.77.0.54", help="loopback address for NSD")
    p.add_argument("--cprofile", type=int, default=0, metavar="N",
                   help="also print cProfile's top N functions per case")
    args = p.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    for c in args.cases:
        if c not in CASES:
            p.error(f"unknown case {c!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = bench.parse_size(args.size)
    keys = bench.make_keys()
    nsd = bench.start_nsd(keys, args.dns_address)
    try:
        lab = bench.Lab(keys=keys, workdir=keys.dir, nameserver=f"{args.dns_address}:53",
                        infra_pids=[])
        for case in args.cases:
            result = run_case(lab, case, args.messages, args.warmup, size, args.rounds,
                              args.cprofile)  # fmt: skip
            print(table(result))
            print()
    finally:
        nsd.stop()
        shutil.rmtree(keys.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
