"""OpenDMARC's ``HistoryFile``: one block of ``key value`` lines per DMARC-evaluated message, in
the format ``opendmarc-import`` reads, so that an existing ``opendmarc-import`` /
``opendmarc-reports`` pipeline keeps working while authmilter replaces OpenDMARC.

The format is what Debian's OpenDMARC 1.4.2 writes (run with a ``HistoryFile`` behind Postfix
and OpenDKIM; tests/test_history.py compares the two files message by message) and what its
``opendmarc-import`` parses: each line is split at the first two spaces into key, value and
the rest; a ``job`` line starts a new message; unknown keys are complained about. A block, in
OpenDMARC's order::

    job <MTA queue id>              the {i} macro ("NOQUEUE" when the MTA gave none)
    reporter <host name>            who evaluated it (here: the event's reporter)
    received <UTC epoch seconds>    an integer
    ipaddr <client address>
    from <RFC5322.From domain>
    mfrom <RFC5321.MailFrom domain> empty after the space for the null sender <>
    dkim <domain> <selector> <code> one per DKIM signature, in header order
    spf <code>                      the SPF result DMARC used (-1: not evaluated)
    pdomain <policy domain>         where the DMARC record was found
    policy <code>                   the policy to enforce
    rua <URI>                       one line per rua= URI as published, or "rua -"
    pct <0..100>
    adkim <code>                    aspf <code> likewise
    p <code>                        sp <code> likewise, 0 when the record has no sp=
    align_dkim <code>               align_spf <code> likewise
    arc <code>                      arc_policy <code> json:[...]
    action <code>                   what was done to the message

Where each code comes from:

* ``dkim`` and ``spf`` results are OpenDMARC's ``ARES_RESULT_*`` numbers (opendmarc-ar.h), the
  ones ``opendmarc-reports`` turns back into result words: pass 0, softfail 2, neutral 3,
  temperror 4, permerror 5, none 6, fail 7, policy 8; -1 (``ARES_RESULT_UNDEFINED``) for an SPF
  result that was never evaluated (README.opendmarc calls it "not evaluated"). The result token
  of the event is written as its ARES number, as OpenDMARC writes the token it reads from an
  ``Authentication-Results`` field.
* ``policy`` is libopendmarc's ``DMARC_POLICY_*`` (dmarc.h): 15 pass (an aligned DKIM or SPF
  pass), else the policy in force: 16 reject, 17 quarantine, 18 none (14, no record, is never
  written here: see below). The policy in force is ``p=`` when the From domain is the policy
  domain and ``sp=`` (else ``p=``) for a subdomain, as OpenDMARC 1.4.2 applies it; it knows
  neither ``np=`` nor ``t=y``, and neither changes this code.
* ``adkim``/``aspf`` are the character codes of the tag values (dmarc.h
  ``DMARC_RECORD_A_*``): 114 ``r``, 115 ``s``; ``p``/``sp`` likewise (``DMARC_RECORD_P_*``):
  110 ``n``one, 113 ``q``uarantine, 114 ``r``eject, 0 unspecified (OpenDMARC writes ``sp 0``
  for a record without ``sp=``; opendmarc-reports then reports ``p``'s value as ``sp``).
* ``align_dkim``/``align_spf``: 4 aligned pass, 5 not (``DMARC_POLICY_*_ALIGNMENT_*``).
* ``action`` is the milter's ``DMARC_RESULT_*`` (opendmarc.h), read by opendmarc-reports as the
  disposition: 0 reject, 2 accept (``none``), 4 quarantine. It is the disposition applied:
  RejectFailures, HoldQuarantinedMessages, ``pct`` sampling and ``t=y`` are already in it.
* ``arc 7`` and ``arc_policy 2 json:[]``: what OpenDMARC 1.4.2 writes for a message it did not
  evaluate with ARC (observed; 7 is ARES fail, 2 ``DMARC_ARC_POLICY_RESULT_FAIL``). Every
  block says so, and the import fills its NOT NULL ``arc`` columns: authmilter's ARC verdicts
  and trusted-sealer overrides go to ``ReportDatabase`` and the Authentication-Results only.

What is not written: messages DMARC could not give a pass or fail for (no DMARC record,
temperror, permerror; OpenDMARC writes the first only with ``RecordAllMessages``), mail not
evaluated (IgnoreHosts, IgnoreMailFrom, our own outbound mail) and DMARC report mail — the
pipeline makes no :class:`~authmilter.reports.record.DmarcEvent` for them. Values are written
as single tokens: a space or control character in one (the job id is the MTA's; the validated
event fields have none) is written as ``%XX``, so a line can never be split differently or
start another message.

Writing never delays mail. :func:`record` hands the event to a bounded queue of this process
and returns; a background thread formats what has gathered and appends it with one
``write()`` per batch (up to :attr:`HistoryWriter.BATCH` blocks, or whatever came within
:attr:`HistoryWriter.INTERVAL` seconds of the first) to the file opened with ``O_APPEND``
under an exclusive ``flock()`` — the lock OpenDMARC takes to write and ``opendmarc-import``
takes (shared) to read — so the workers of one milter, and an OpenDMARC writing the same file
during a migration, never interleave a block (while ``opendmarc-import`` reads, holding its
lock for the whole run, the thread waits and blocks gather in the queue; a milter thread never
waits). The file is opened anew for each batch, so a rotated or truncated file (a cron job
usually empties it after each ``opendmarc-import`` run) is picked up at once.
A full queue drops the block, an error while writing drops the batch (what the failed write
appended is cut off again); both are counted in ``authmilter_history_records_total`` and
logged at most once a minute per kind. One writer per process and file, started at the first
event (never in the supervisor, which handles no mail; a writer inherited through a fork is
replaced); a stopping worker calls :func:`close` to write what is queued.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from typing import Any

from authmilter import metrics
from authmilter.reports.background import Background
from authmilter.reports.record import DmarcEvent, MessageContext
from authmilter.reports.store import RateLimitedLog

__all__ = [
    "ACTION",
    "ALIGNMENT",
    "ARES_RESULT",
    "HistoryWriter",
    "close",
    "format_block",
    "policy_code",
    "record",
    "writer",
]

log = logging.getLogger("authmilter")

#: RFC 8601 result token → OpenDMARC's ``ARES_RESULT_*`` number (dkim and spf lines).
ARES_RESULT = {"pass": 0, "softfail": 2, "neutral": 3, "temperror": 4, "permerror": 5,
               "none": 6, "fail": 7, "policy": 8}  # fmt: skip
#: ``spf`` when no SPF result was used (``ARES_RESULT_UNDEFINED``).
SPF_NOT_EVALUATED = -1
#: libopendmarc's ``DMARC_POLICY_*``: what ``opendmarc_get_policy_to_enforce`` answers.
POLICY_PASS = 15
POLICY = {"reject": 16, "quarantine": 17, "none": 18}
#: Aligned (4) or not (5): ``align_dkim`` and ``align_spf``.
ALIGNMENT = {"pass": 4, "fail": 5}
#: Disposition applied → the milter's ``DMARC_RESULT_*`` (``action``).
ACTION = {"reject": 0, "none": 2, "quarantine": 4}
#: ``arc`` / ``arc_policy`` of a message not evaluated with ARC, as OpenDMARC 1.4.2 writes them.
ARC_NOT_EVALUATED = 7
ARC_POLICY_NOT_EVALUATED = 2
#: Mode of a history file this writer creates (OpenDMARC's README: the filter's user only, and
#: the group, for an importer running under another account of that group).
FILE_MODE = 0o640


def _token(value: str) -> str:
    """``value`` as one token of a history line: spaces and control characters as ``%XX``."""
    if all(" " < c != "\x7f" for c in value):
        return value
    return "".join(f"%{ord(c):02X}" if c <= " " or c == "\x7f" else c for c in value)


def _code(letter: str | None) -> int:
    """The character code OpenDMARC stores for ``p``/``sp``/``adkim``/``aspf`` (0: unset)."""
    return ord(letter[0]) if letter else 0


def policy_code(event: DmarcEvent) -> int:
    """The ``policy`` number: pass, or the policy in force for the From domain as
    OpenDMARC 1.4.2 picks it (``sp=`` for a subdomain when published, else ``p=``)."""
    if "pass" in (event.dkim_aligned, event.spf_aligned):
        return POLICY_PASS
    subdomain = event.header_from != event.policy_domain
    return POLICY[event.sp if subdomain and event.sp is not None else event.p]


def format_block(event: DmarcEvent, context: MessageContext) -> str:
    """The history block of one message, every line ending in ``\\n`` (pure)."""
    lines = [
        f"job {_token(context.job_id) or 'NOQUEUE'}",
        f"reporter {_token(event.reporter)}",
        f"received {int(event.time)}",
        f"ipaddr {_token(event.source_ip)}",
        f"from {_token(event.header_from)}",
        f"mfrom {_token(event.envelope_from)}",
    ]
    lines += [f"dkim {_token(d)} {_token(s)} {ARES_RESULT[r]}" for d, s, r in event.dkim]
    lines.append(f"spf {SPF_NOT_EVALUATED if event.spf is None else ARES_RESULT[event.spf[2]]}")
    lines += [f"pdomain {_token(event.policy_domain)}", f"policy {policy_code(event)}"]
    lines += [f"rua {_token(uri)}" for uri in event.rua if uri] or ["rua -"]
    lines += [
        f"pct {int(context.pct)}",
        f"adkim {_code(event.adkim)}",
        f"aspf {_code(event.aspf)}",
        f"p {_code(event.p)}",
        f"sp {_code(event.sp)}",
        f"align_dkim {ALIGNMENT[event.dkim_aligned]}",
        f"align_spf {ALIGNMENT[event.spf_aligned]}",
        f"arc {ARC_NOT_EVALUATED}",
        f"arc_policy {ARC_POLICY_NOT_EVALUATED} json:[]",
        f"action {ACTION[event.disposition]}",
    ]
    return "\n".join(lines) + "\n"


_Item = tuple[DmarcEvent, MessageContext]


class HistoryWriter(Background):
    """The queue and the writing thread of one process for one history file.

    :param path: the history file (created with mode :data:`FILE_MODE` if missing).
    :param maxsize: blocks the queue holds; one more is dropped.
    :param start: start the thread at the first :meth:`put` (``False``: only :meth:`start`
        or :meth:`close` do, for tests that fill the queue first).
    """

    #: Blocks per write(), at most.
    BATCH = 500
    #: A batch is written this many seconds after its first block at the latest.
    INTERVAL = 1.0
    #: Queued blocks, at most (a few seconds of a busy MX, a few MB of memory).
    MAXSIZE = 10_000
    THREAD_NAME = "authmilter-history"

    def __init__(self, path: str, *, maxsize: int = MAXSIZE, batch: int = BATCH,
                 interval: float = INTERVAL, start: bool = True) -> None:  # fmt: skip
        super().__init__(maxsize=maxsize, batch=batch, interval=interval, start=start)
        self.path = path
        self.written = self.dropped = self.failed = 0
        self.batches: list[int] = []  # blocks per successful write() (for tests)
        self.warn = RateLimitedLog("")  # each line starts "HistoryFile <path>: "

    def put(self, event: DmarcEvent, context: MessageContext) -> bool:
        """Queue one message without waiting; ``False`` when it was dropped (queue full or
        writer closed)."""
        if self.offer((event, context)):
            return True
        self._count("dropped", 1)
        self.warn.warning("dropped", f"HistoryFile {self.path}: queue of {self.queue.maxsize} "
                                     f"full or writer stopped; block of {context.job_id} "
                                     "dropped")  # fmt: skip
        return False

    def left_at_stop(self, n: int) -> None:
        self._count("dropped", n)
        self.warn.warning("dropped", f"HistoryFile {self.path}: {n} block(s) not written "
                                     "before the stop")  # fmt: skip

    def handle(self, items: list[Any]) -> None:
        self._write(items)

    def _write(self, items: list[_Item]) -> None:
        blocks: list[str] = []
        for event, context in items:
            try:
                blocks.append(format_block(event, context))
            except Exception as e:  # noqa: BLE001 - one odd event must not cost the batch
                self._count("failed", 1)
                self.warn.warning("format", f"HistoryFile {self.path}: no block for "
                                            f"{context.job_id}: {e!r}")  # fmt: skip
        if not blocks:
            return
        try:
            append(self.path, "".join(blocks).encode("utf-8", "backslashreplace"))
        except OSError as e:
            self._count("failed", len(blocks))
            self.warn.warning("failed", f"HistoryFile {self.path}: cannot write "
                                        f"{len(blocks)} block(s): {e}")  # fmt: skip
            return
        self.batches.append(len(blocks))
        self._count("written", len(blocks))

    def _count(self, outcome: str, n: int) -> None:
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + n)
        metrics.history_records(outcome, n)


def append(path: str, data: bytes) -> None:
    """Append ``data`` to ``path`` in one ``write()`` under an exclusive ``flock()``; if the
    write fails part way, cut the file back to where it was, so no partial block stays.

    :raises OSError: the file cannot be opened, locked or written.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the close
        size = os.fstat(fd).st_size
        try:
            done = os.write(fd, data)
            if done != len(data):
                raise OSError(f"short write: {done} of {len(data)} bytes (disk full?)")
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


# -- the process's writers ---------------------------------------------------------------------

_writers: dict[str, HistoryWriter] = {}
_writers_lock = threading.Lock()


def writer(path: str) -> HistoryWriter:
    """This process's writer for ``path`` (a ``HistoryFile`` value), made at first use.

    :raises ValueError: ``path`` is empty.
    """
    if not path:
        raise ValueError("HistoryFile: empty path")
    with _writers_lock:
        found = _writers.get(path)
        if found is None or found.pid != os.getpid():  # inherited through a fork: not ours
            found = _writers[path] = HistoryWriter(path)
        return found


def record(path: str, event: DmarcEvent, context: MessageContext) -> bool:
    """Hand one message to this process's writer for ``path``: never blocks, never raises.

    :returns: whether it was queued.
    """
    try:
        return writer(path).put(event, context)
    except Exception as e:  # noqa: BLE001 - recording must never cost a message
        with contextlib.suppress(Exception):
            metrics.history_records("failed", 1)
            log.warning("DMARC report records: HistoryFile %s: cannot record: %s", path, e)
        return False


def close(timeout: float = 1.0) -> None:
    """Flush and stop this process's writers within ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout
    with _writers_lock:
        mine = [w for w in _writers.values() if w.pid == os.getpid()]
        _writers.clear()
    for w in mine:
        w.close(deadline - time.monotonic())
