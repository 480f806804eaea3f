"""Recording :class:`~authmilter.reports.record.DmarcEvent`\\ s (``ReportDatabase``), SQLite only.

The milter hands each event to :func:`record`, which never blocks and never raises: the event
goes into a bounded in-memory queue of this process, and a background thread writes what has
gathered in batches (up to :attr:`ReportWriter.BATCH` events in one transaction, or whatever
came within :attr:`ReportWriter.INTERVAL` seconds of the first). A full queue drops the event;
a database error drops the batch. Both are counted (``authmilter_report_records_total``
``{outcome="written|dropped|failed"}``) and logged at most once a minute per kind, and the
message gets its verdict as if nothing was recorded: reporting never delays or loses mail.

One writer per process, started at the first event. The supervisor handles no mail, so the
thread only ever starts in a worker, after the fork (threads do not survive a fork); a writer
inherited through a fork is recognised by its process id and replaced. A stopping worker
(:meth:`authmilter.supervisor.WorkerControl.leave`) calls :func:`close` to write what is queued
within the time it has left, at most a second.

The database: one SQLite file (``sqlite:////var/lib/authmilter/reports.db``), created by the
first worker that writes (the worker runs as ``UserID``: the folder must be writable by that
user), in WAL mode so several workers and a reader can use it at once. One table::

    dmarc_events(id INTEGER PRIMARY KEY, time REAL, policy_domain TEXT, event TEXT)

``event`` is the JSON of :meth:`DmarcEvent.to_json`; the index on ``(policy_domain, time)``
serves the daily report of one policy domain (:func:`read_events`). Only the standard library's
:mod:`sqlite3` is used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator

from authmilter import metrics
from authmilter.config import parse_report_database
from authmilter.reports.record import DmarcEvent

__all__ = ["SCHEMA", "ReportWriter", "close", "read_events", "record", "writer"]

log = logging.getLogger("authmilter")

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS dmarc_events ("
    "id INTEGER PRIMARY KEY, time REAL NOT NULL, policy_domain TEXT NOT NULL, "
    "event TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS dmarc_events_domain_time ON dmarc_events (policy_domain, time)",
)

_STOP = object()  # wakes the thread at close()


def connect(path: str, *, timeout: float = 5.0) -> sqlite3.Connection:
    """Open (creating if needed) the database at ``path`` in WAL mode, with the table.

    :raises sqlite3.Error: the file cannot be opened or created.
    """
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None,
                         check_same_thread=False)  # fmt: skip
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise sqlite3.OperationalError(f"{path}: cannot switch to WAL mode ({mode!r})")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
        for statement in SCHEMA:
            db.execute(statement)
    except BaseException:
        db.close()
        raise
    return db


class _RateLimited:
    """At most one log line per ``every`` seconds per kind; the lines in between are counted
    and said with the next one."""

    def __init__(self, every: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, text: str) -> bool:
        """Log ``text`` unless a line of this kind went out less than ``every`` seconds ago."""
        now = self.clock()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.every:
                self._held[kind] = self._held.get(kind, 0) + 1
                return False
            self._last[kind] = now
            held = self._held.pop(kind, 0)
        more = f" ({held} more such line(s) suppressed)" if held else ""
        log.warning("DMARC report records: %s%s", text, more)
        return True


class ReportWriter:
    """The queue and the writing thread of one process for one SQLite file.

    :param path: the database file.
    :param maxsize: events the queue holds; one more is dropped.
    :param start: start the thread at the first :meth:`put` (``False``: only :meth:`close`
        or :meth:`start` do, for tests that fill the queue first).
    """

    #: Events per transaction, at most.
    BATCH = 500
    #: A batch is written this many seconds after its first event at the latest.
    INTERVAL = 1.0
    #: Queued events, at most (a few seconds of a busy MX, a few MB of memory).
    MAXSIZE = 10_000

    def __init__(self, path: str, *, maxsize: int = MAXSIZE, batch: int = BATCH,
                 interval: float = INTERVAL, start: bool = True) -> None:  # fmt: skip
        self.path = path
        self.batch = batch
        self.interval = interval
        self.pid = os.getpid()
        self.queue: queue.Queue[object] = queue.Queue(maxsize)
        self.written = self.dropped = self.failed = 0
        self.batches: list[int] = []  # sizes of the transactions committed (for tests)
        self.warn = _RateLimited()
        self._autostart = start
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closing = False
        self._db: sqlite3.Connection | None = None

    # -- the milter's side ----------------------------------------------------------------

    def put(self, event: DmarcEvent) -> bool:
        """Queue ``event`` without waiting; ``False`` when it was dropped (queue full or
        writer closed)."""
        if self._autostart and self._thread is None:
            self.start()
        if not self._closing:
            try:
                self.queue.put_nowait(event)
                return True
            except queue.Full:
                pass
        self._count("dropped", 1)
        self.warn.warning("dropped", f"queue of {self.queue.maxsize} full or writer stopped; "
                                     f"event for {event.policy_domain} dropped")  # fmt: skip
        return False

    def start(self) -> None:
        """Start the writing thread (once)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="authmilter-reports")  # fmt: skip
                self._thread.start()

    def close(self, timeout: float = 1.0) -> bool:
        """Write what is queued and stop the thread, waiting at most ``timeout`` seconds.

        :returns: whether everything queued was written (or failed) in time; what is left
            is counted as dropped.
        """
        self._closing = True
        self.start()
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(_STOP)
        assert self._thread is not None
        self._thread.join(max(0.0, timeout))
        if self._thread.is_alive():
            left = self.queue.qsize()
            if left:
                self._count("dropped", left)
                self.warn.warning("dropped", f"{left} event(s) not written before the stop")
            return False
        return True

    # -- the thread -------------------------------------------------------------------------

    def _gather(self) -> tuple[list[DmarcEvent], bool]:
        """The next batch, and whether the writer is to stop after it."""
        while True:
            try:
                first = self.queue.get(timeout=0.1 if self._closing else 1.0)
                break
            except queue.Empty:
                if self._closing:  # the stop could not be queued (queue full), now drained
                    return [], True
        if first is _STOP:
            return [], True
        events = [first]
        deadline = time.monotonic() + self.interval
        while len(events) < self.batch:
            wait = 0.0 if self._closing else deadline - time.monotonic()
            try:
                item = self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return [e for e in events if isinstance(e, DmarcEvent)], True
            events.append(item)
        return [e for e in events if isinstance(e, DmarcEvent)], False

    def _run(self) -> None:
        stop = False
        while True:
            events, stop_now = self._gather()
            stop = stop or stop_now
            if events:
                self._write(events)
            if stop and self.queue.empty():
                break
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    def _write(self, events: list[DmarcEvent]) -> None:
        rows = [(e.time, e.policy_domain, json.dumps(e.to_json(), separators=(",", ":")))
                for e in events]  # fmt: skip
        try:
            if self._db is None:
                self._db = connect(self.path)
            with _transaction(self._db):
                self._db.executemany(
                    "INSERT INTO dmarc_events (time, policy_domain, event) VALUES (?, ?, ?)",
                    rows)  # fmt: skip
        except (sqlite3.Error, OSError) as e:
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = None  # reopen at the next batch: the file may be back
            self._count("failed", len(rows))
            self.warn.warning("failed", f"cannot write {len(rows)} event(s) to {self.path}: {e}")
            return
        self.batches.append(len(rows))
        self._count("written", len(rows))

    def _count(self, outcome: str, n: int) -> None:
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + n)
        metrics.report_records(outcome, n)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


# -- the process's writers ---------------------------------------------------------------------

_writers: dict[str, ReportWriter] = {}
_writers_lock = threading.Lock()


def writer(url: str) -> ReportWriter:
    """This process's writer for ``url`` (a ``ReportDatabase`` value), made at first use.

    :raises ValueError: ``url`` is not ``sqlite:////absolute/path.db``.
    """
    path = parse_report_database(url)
    with _writers_lock:
        found = _writers.get(path)
        if found is None or found.pid != os.getpid():  # inherited through a fork: not ours
            found = _writers[path] = ReportWriter(path)
        return found


def record(url: str, event: DmarcEvent) -> bool:
    """Hand ``event`` to this process's writer for ``url``: never blocks, never raises.

    :returns: whether it was queued.
    """
    try:
        return writer(url).put(event)
    except Exception as e:  # noqa: BLE001 - recording must never cost a message
        metrics.report_records("failed", 1)
        log.warning("DMARC report records: cannot record an event: %s", e)
        return False


def close(timeout: float = 1.0) -> None:
    """Flush and stop this process's writers within ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout
    with _writers_lock:
        mine = [w for w in _writers.values() if w.pid == os.getpid()]
        _writers.clear()
    for w in mine:
        w.close(deadline - time.monotonic())


def read_events(path: str, *, policy_domain: str | None = None, since: float = 0.0,
                until: float = float("inf")) -> list[DmarcEvent]:  # fmt: skip
    """The events recorded at ``path`` with ``since <= time < until``, in insertion order,
    of one policy domain or all.

    :raises sqlite3.Error: the database cannot be read.
    :raises ValueError: a stored event is not a valid :class:`DmarcEvent`.
    """
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        sql = "SELECT event FROM dmarc_events WHERE time >= ? AND time < ?"
        args: list[object] = [since, until if until != float("inf") else 1e300]
        if policy_domain is not None:
            sql += " AND policy_domain = ?"
            args.append(policy_domain.lower().rstrip("."))
        rows = db.execute(sql + " ORDER BY id", args).fetchall()
    finally:
        db.close()
    return [DmarcEvent.from_json(json.loads(text)) for (text,) in rows]
