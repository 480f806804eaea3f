"""Recording :class:`~authmilter.reports.record.DmarcEvent`\\ s (``ReportDatabase``) in SQLite or
PostgreSQL, and the one small database API the report commands use as well.

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

Two kinds of database, one table::

    dmarc_events(id, time, policy_domain, event)

``event`` is the JSON of :meth:`DmarcEvent.to_json`; the index on ``(policy_domain, time)``
serves the report of one policy domain and period (:func:`read_events`, :func:`iter_events`).

* ``sqlite:////var/lib/authmilter/reports.db``: one host. The file is created by the first
  worker that writes (as ``UserID``: the folder must be writable by that user), in WAL mode so
  several workers and a reader can use it at once; ``id INTEGER PRIMARY KEY, time REAL``.
  The standard library's :mod:`sqlite3`.
* ``postgresql://user@db.example/reports`` (libpq URI; ``?host=/run/postgresql`` for a UNIX
  socket): a fleet. Every MX writes to the same table, each event carrying its own ``reporter``
  (the host's ``AuthservID``), so one report run merges the hosts just by reading every row of
  the period. ``id BIGSERIAL, time DOUBLE PRECISION, event TEXT`` (the JSON is only ever read
  whole, so ``jsonb`` would add parsing on insert for nothing). psycopg 3 over the system libpq,
  imported only when a PostgreSQL URL is used. The writer connects with a 2 s
  ``connect_timeout`` and a 5 s ``statement_timeout`` and checks a kept connection with one
  round trip before each batch, so a PostgreSQL that is down or restarted costs at most the
  batches written while it was away (counted ``failed``) and never holds a message. The table
  is created if missing, under an advisory lock (several hosts may start at once); a DBA may
  create it beforehand and grant only ``SELECT, INSERT`` on it and ``USAGE`` on its sequence.

The API (:func:`open_database` → :class:`Database`) is the same for both: ``?`` placeholders
in the SQL whatever the kind, :meth:`Database.transaction`, :meth:`Database.ensure_schema` for
the tables of other modules. It is deliberately small: portable SQL is the caller's job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, TypeVar

from authmilter import metrics
from authmilter.config import DatabaseURL, parse_report_database
from authmilter.errors import AuthmilterError
from authmilter.reports.background import Background
from authmilter.reports.record import DmarcEvent

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "POSTGRESQL_SCHEMA",
    "SQLITE_SCHEMA",
    "Database",
    "DatabaseError",
    "RateLimitedLog",
    "ReportWriter",
    "close",
    "iter_events",
    "open_database",
    "policy_domains",
    "read_events",
    "record",
    "writer",
]

log = logging.getLogger("authmilter")

SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS dmarc_events ("
    "id INTEGER PRIMARY KEY, time REAL NOT NULL, policy_domain TEXT NOT NULL, "
    "event TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS dmarc_events_domain_time ON dmarc_events (policy_domain, time)",
    "CREATE INDEX IF NOT EXISTS dmarc_events_time ON dmarc_events (time)",  # days, pruning
)
POSTGRESQL_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS dmarc_events ("
    "id BIGSERIAL PRIMARY KEY, time DOUBLE PRECISION NOT NULL, policy_domain TEXT NOT NULL, "
    "event TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS dmarc_events_domain_time ON dmarc_events (policy_domain, time)",
    "CREATE INDEX IF NOT EXISTS dmarc_events_time ON dmarc_events (time)",  # days, pruning
)
_SCHEMAS = {"sqlite": SQLITE_SCHEMA, "postgresql": POSTGRESQL_SCHEMA}
_INSERT = "INSERT INTO dmarc_events (time, policy_domain, event) VALUES (?, ?, ?)"
# pg_advisory_xact_lock key for DDL: two hosts creating the same table at once would collide
# on PostgreSQL's catalogue ("duplicate key ... pg_type_typname_nsp_index").
_SCHEMA_LOCK = 0x61757468_6D696C74  # "authmilt"
_NO_END = 1e300  # until=inf, as a number both kinds compare with


Row = tuple[Any, ...]


class DatabaseError(AuthmilterError):
    """The database cannot be opened, read or written. The driver's exception
    (:class:`sqlite3.Error`, :class:`psycopg.Error`, :class:`OSError`) is the ``__cause__``; the
    message names the database without its password. An :class:`AuthmilterError`, so the
    ``reports`` commands say it in one line and exit 1."""


# -- the database API ----------------------------------------------------------------------------


class Database:
    """One connection to a ``ReportDatabase``, the same few calls for SQLite and PostgreSQL.

    Made by :func:`open_database`. SQL uses ``?`` placeholders for both kinds (turned into
    psycopg's ``%s`` for PostgreSQL; ``?`` inside quotes is left alone). Outside
    :meth:`transaction` every statement commits on its own. Not for several threads at once.
    """

    kind: str
    """``"sqlite"`` or ``"postgresql"``."""

    def __init__(self, url: DatabaseURL) -> None:
        self.url = url
        self._in_transaction = False

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run one statement; its rows (``[]`` for a statement without any).

        :raises DatabaseError:
        """
        raise NotImplementedError

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement once per row of parameters.

        :raises DatabaseError:
        """
        raise NotImplementedError

    def stream(self, sql: str, params: Sequence[Any] = (), *, chunk: int = 5000) -> Iterator[Row]:
        """The rows of a query, fetched ``chunk`` at a time rather than all at once (a
        server-side cursor on PostgreSQL, inside a transaction until the iterator is exhausted
        or closed).

        :raises DatabaseError:
        """
        raise NotImplementedError

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything in the ``with`` block commits together or not at all (an exception rolls
        back and goes on). SQLite: ``BEGIN IMMEDIATE``, so a writer waits for the lock up front
        instead of failing at its first write. Transactions do not nest.

        :raises DatabaseError:
        """
        if self._in_transaction:
            raise DatabaseError(f"{self.url.masked}: transaction() does not nest")
        self._in_transaction = True
        try:
            with self._transaction():
                yield
        finally:
            self._in_transaction = False

    def ensure_schema(self, statements: Sequence[str]) -> None:
        """Run ``CREATE ... IF NOT EXISTS`` statements in one transaction (on PostgreSQL under
        an advisory lock, so hosts starting together do not trip over each other). The DDL is
        the caller's and must suit :attr:`kind`.

        :raises DatabaseError:
        """
        with self.transaction():
            if self.kind == "postgresql":
                self.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
            for statement in statements:
                self.execute(statement)

    def close(self) -> None:
        """Close the connection (again is fine)."""
        raise NotImplementedError

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def _has_events_table(self) -> bool:
        return False

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


T = TypeVar("T")


def _while_locked(step: Callable[[], T], timeout: float) -> T:
    """Run ``step``, again while SQLite says the database is locked, for ``timeout`` seconds.

    SQLite's busy timeout does not cover every case: switching a new file to WAL, or
    upgrading a read lock to a write lock, answers "database is locked" at once when another
    connection is doing the same (to avoid a deadlock). Two workers whose first records
    arrive together do exactly that, so the setup is tried again rather than the batch lost.
    """
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        try:
            return step()
        except (sqlite3.OperationalError, DatabaseError) as e:
            cause = e if isinstance(e, sqlite3.OperationalError) else e.__cause__
            if (not isinstance(cause, sqlite3.OperationalError) or "locked" not in str(cause)
                    or time.monotonic() + pause > deadline):  # fmt: skip
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


class _SQLite(Database):
    kind = "sqlite"

    def __init__(self, url: DatabaseURL, *, timeout: float, readonly: bool) -> None:
        super().__init__(url)
        path = url.target
        if readonly and not os.path.exists(path):
            raise DatabaseError(f"{url.masked}: no such file: nothing has been recorded yet (the "
                                "milter's workers create it at the first DMARC-evaluated "
                                "message)")  # fmt: skip
        target = f"file:{urllib.parse.quote(path)}{'?mode=ro' if readonly else ''}"
        with self._errors():
            self._db = sqlite3.connect(target, uri=True, timeout=timeout, isolation_level=None,
                                       check_same_thread=False)  # fmt: skip
        if readonly:
            return
        try:
            with self._errors():
                mode = _while_locked(
                    lambda: self._db.execute("PRAGMA journal_mode=WAL").fetchone(), timeout)
                if mode is None or str(mode[0]).lower() != "wal":
                    raise DatabaseError(f"{path}: cannot switch to WAL mode ({mode!r})")
                # WAL: durable at checkpoints, never corrupt
                self._db.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as e:
            raise DatabaseError(f"{self.url.masked}: {e}") from e

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._errors():
            return [tuple(r) for r in self._db.execute(sql, tuple(params)).fetchall()]

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._errors():
            self._db.executemany(sql, rows)

    def stream(self, sql: str, params: Sequence[Any] = (), *, chunk: int = 5000) -> Iterator[Row]:
        with self._errors(), contextlib.closing(self._db.execute(sql, tuple(params))) as cur:
            while rows := cur.fetchmany(chunk):
                yield from rows

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._errors():
            self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        with self._errors():
            self._db.execute("COMMIT")

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error, AttributeError):
            self._db.close()


# ?, and the tokens to step over whole: quoted strings and names, comments. % doubled for psycopg.
_SQL_TOKENS = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|/\*.*?\*/|\?|%""", re.S)


@lru_cache(maxsize=256)
def _pyformat(sql: str) -> str:
    """``sql`` with ``?`` placeholders in psycopg's notation (``%s``; a literal ``%`` is
    ``%%`` everywhere, quotes included, since psycopg reads the whole text)."""

    def one(m: re.Match[str]) -> str:
        token = m.group()
        return "%s" if token == "?" else token.replace("%", "%%")

    return _SQL_TOKENS.sub(one, sql)


class _PostgreSQL(Database):
    kind = "postgresql"

    def __init__(self, url: DatabaseURL, *, connect_timeout: float,
                 statement_timeout: float | None) -> None:  # fmt: skip
        super().__init__(url)
        with self._errors():
            import psycopg
            from psycopg.conninfo import conninfo_to_dict

            params: dict[str, Any] = conninfo_to_dict(url.target)
            # The URL's own settings win; libpq takes whole seconds, 2 at least.
            params.setdefault("connect_timeout", str(max(2, round(connect_timeout))))
            params.setdefault("application_name", "authmilter")
            self._db: psycopg.Connection[Row] = psycopg.connect(**params, autocommit=True)
        self._cursors = 0
        if statement_timeout is not None:
            try:
                self.execute(f"SET statement_timeout = {max(1, round(statement_timeout * 1000))}")
            except BaseException:
                self.close()
                raise

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except ImportError as e:
            raise DatabaseError(f"{self.url.masked}: PostgreSQL needs psycopg and the system "
                                f"libpq (Debian package libpq5): {e}") from e
        except Exception as e:
            import psycopg

            if not isinstance(e, psycopg.Error | OSError):
                raise
            text = self.url.redact(" ".join(str(e).split()))  # libpq's lines, on one
            raise DatabaseError(f"{self.url.masked}: {text}") from e

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._errors(), self._db.cursor() as cur:
            if params:
                cur.execute(_pyformat(sql), tuple(params))
            else:  # no parameters: psycopg sends the text as it is
                cur.execute(sql)
            return cur.fetchall() if cur.description is not None else []

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._errors(), self._db.cursor() as cur:
            cur.executemany(_pyformat(sql), rows)

    def stream(self, sql: str, params: Sequence[Any] = (), *, chunk: int = 5000) -> Iterator[Row]:
        self._cursors += 1
        with self._errors(), contextlib.ExitStack() as stack:
            if not self._in_transaction:  # a server-side cursor lives in a transaction
                stack.enter_context(self._db.transaction())
            cur = stack.enter_context(self._db.cursor(name=f"authmilter_{self._cursors}"))
            if params:
                cur.execute(_pyformat(sql), tuple(params))
            else:
                cur.execute(sql)
            while rows := cur.fetchmany(chunk):
                yield from rows

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return self._pg_transaction()

    @contextlib.contextmanager
    def _pg_transaction(self) -> Iterator[None]:
        with self._errors(), self._db.transaction():
            yield

    def _has_events_table(self) -> bool:
        found = self.execute("SELECT to_regclass('dmarc_events') IS NOT NULL"
                             " AND to_regclass('dmarc_events_time') IS NOT NULL")
        return bool(found and found[0][0])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._db.close()


def open_database(url: str, *, connect_timeout: float = 5.0,
                  statement_timeout: float | None = None,
                  readonly: bool = False) -> Database:  # fmt: skip
    """Connect to the ``ReportDatabase`` ``url`` and create the ``dmarc_events`` table if it
    is missing (SQLite: switch the file to WAL mode).

    :param connect_timeout: SQLite: how long to wait for a lock; PostgreSQL: for the
        connection (libpq's ``connect_timeout``, whole seconds, 2 at least), unless the URL
        sets it.
    :param statement_timeout: PostgreSQL: the server cancels a statement running longer.
    :param readonly: only read (SQLite: the file is opened read-only and must exist); no
        table is created.
    :raises ValueError: ``url`` is not a valid ``ReportDatabase`` URL.
    :raises DatabaseError: the database cannot be opened or the table created.
    """
    parsed = parse_report_database(url)
    db: Database
    if parsed.kind == "sqlite":
        db = _SQLite(parsed, timeout=connect_timeout, readonly=readonly)
    else:
        db = _PostgreSQL(parsed, connect_timeout=connect_timeout,
                         statement_timeout=statement_timeout)  # fmt: skip
    if not readonly:
        try:
            if db.kind == "sqlite":  # two workers creating the file at once: see _while_locked
                _while_locked(lambda: db._has_events_table()
                              or db.ensure_schema(_SCHEMAS[db.kind]), connect_timeout)
            elif not db._has_events_table():
                db.ensure_schema(_SCHEMAS[db.kind])
        except BaseException:
            db.close()
            raise
    return db


# -- reading ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _reading(source: str | Database) -> Iterator[Database]:
    if isinstance(source, Database):
        yield source
        return
    db = open_database(source, readonly=True)
    try:
        yield db
    finally:
        db.close()


def iter_events(source: str | Database, *, policy_domain: str | None = None,
                since: float = 0.0, until: float = float("inf"), chunk: int = 5000,
                unreadable: list[str] | None = None) -> Iterator[DmarcEvent]:  # fmt: skip
    """The events with ``since <= time < until``, of one policy domain or all, in time order
    (ties in the order written), read ``chunk`` rows at a time.

    Time order, not ``id``: for one policy domain it is the order of the index, so neither
    kind sorts (on PostgreSQL, ``ORDER BY id`` made reading 1 M rows domain by domain three
    times slower: docs/performance.md).

    :param source: a ``ReportDatabase`` URL (opened read-only for the iteration) or an open
        :class:`Database`.
    :param unreadable: given, a row that is not a valid :class:`DmarcEvent` (another
        version's format, a hand edit) is skipped and why is appended here, so one bad row
        cannot cost a domain its report; otherwise it raises.
    :raises DatabaseError: the database cannot be read.
    :raises ValueError: a bad URL, or (without ``unreadable``) a stored event that is not a
        valid :class:`DmarcEvent`.
    """
    sql = "SELECT event FROM dmarc_events WHERE time >= ? AND time < ?"
    args: list[object] = [since, until if until != float("inf") else _NO_END]
    if policy_domain is not None:
        sql += " AND policy_domain = ?"
        args.append(policy_domain.lower().rstrip("."))
    with _reading(source) as db:
        for (text,) in db.stream(sql + " ORDER BY time, id", args, chunk=chunk):
            if unreadable is None:
                yield DmarcEvent.from_json(json.loads(text))
                continue
            try:
                event = DmarcEvent.from_json(json.loads(text))
            except ValueError as e:  # json.JSONDecodeError is one too
                unreadable.append(str(e))
                continue
            yield event


def read_events(source: str | Database, *, policy_domain: str | None = None, since: float = 0.0,
                until: float = float("inf")) -> list[DmarcEvent]:  # fmt: skip
    """:func:`iter_events` as a list: every event of the period (and policy domain) at once."""
    return list(iter_events(source, policy_domain=policy_domain, since=since, until=until))


def policy_domains(source: str | Database, since: float = 0.0,
                   until: float = float("inf")) -> list[str]:  # fmt: skip
    """The policy domains with events in ``since <= time < until``, sorted: what a report run
    goes through one at a time, so that it holds one domain's events at once and not all.

    :raises DatabaseError: the database cannot be read.
    """
    with _reading(source) as db:
        rows = db.execute("SELECT DISTINCT policy_domain FROM dmarc_events"
                          " WHERE time >= ? AND time < ?",
                          (since, until if until != float("inf") else _NO_END))  # fmt: skip
    return sorted(str(domain) for (domain,) in rows)


# -- the writer ---------------------------------------------------------------------------------


class RateLimitedLog:
    """Warnings, at most one line per ``every`` seconds per kind; the lines in between are
    counted and said with the next one. Shared by the background writers and senders of
    reporting (records, HistoryFile, failure reports), whose failures repeat per message.

    :param prefix: put before every line (``"DMARC report records: "``).
    """

    def __init__(self, prefix: str, every: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.prefix = prefix
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
        log.warning("%s%s%s", self.prefix, text, more)
        return True


class ReportWriter(Background):
    """The queue and the writing thread of one process for one database.

    :param url: the ``ReportDatabase`` URL.
    :param maxsize: events the queue holds; one more is dropped.
    :param start: start the thread at the first :meth:`put` (``False``: only :meth:`close`
        or :meth:`start` do, for tests that fill the queue first).
    :raises ValueError: ``url`` is not a valid ``ReportDatabase`` URL.
    """

    #: Events per transaction, at most.
    BATCH = 500
    #: A batch is written this many seconds after its first event at the latest.
    INTERVAL = 1.0
    #: Queued events, at most (a few seconds of a busy MX, a few MB of memory).
    MAXSIZE = 10_000
    #: PostgreSQL: seconds to connect, and for one statement, before the batch fails.
    CONNECT_TIMEOUT = 2.0
    STATEMENT_TIMEOUT = 5.0
    THREAD_NAME = "authmilter-reports"

    def __init__(self, url: str, *, maxsize: int = MAXSIZE, batch: int = BATCH,
                 interval: float = INTERVAL, start: bool = True) -> None:  # fmt: skip
        super().__init__(maxsize=maxsize, batch=batch, interval=interval, start=start)
        self.url = url
        self.database = parse_report_database(url)
        self.written = self.dropped = self.failed = 0
        self.batches: list[int] = []  # sizes of the transactions committed (for tests)
        self.warn = RateLimitedLog("DMARC report records: ")
        self._db: Database | None = None

    def put(self, event: DmarcEvent) -> bool:
        """Queue ``event`` without waiting; ``False`` when it was dropped (queue full or
        writer closed)."""
        if self.offer(event):
            return True
        self._count("dropped", 1)
        self.warn.warning("dropped", f"queue of {self.queue.maxsize} full or writer stopped; "
                                     f"event for {event.policy_domain} dropped")  # fmt: skip
        return False

    def left_at_stop(self, n: int) -> None:
        self._count("dropped", n)
        self.warn.warning("dropped", f"{n} event(s) not written before the stop")

    def handle(self, items: list[Any]) -> None:
        self._write(items)

    def finish(self) -> None:
        self._disconnect()

    def _connection(self) -> Database:
        """The open connection, checked (PostgreSQL: one round trip; a server restarted since
        the last batch closed it) or made anew."""
        if self._db is not None and self._db.kind == "postgresql":
            try:
                self._db.execute("SELECT 1")
            except DatabaseError:
                self._disconnect()
        if self._db is None:
            self._db = open_database(self.url, connect_timeout=self.CONNECT_TIMEOUT,
                                     statement_timeout=self.STATEMENT_TIMEOUT)  # fmt: skip
        return self._db

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _write(self, events: list[DmarcEvent]) -> None:
        rows = [(e.time, e.policy_domain, json.dumps(e.to_json(), separators=(",", ":")))
                for e in events]  # fmt: skip
        try:
            db = self._connection()
            with db.transaction():
                db.executemany(_INSERT, rows)
        except (DatabaseError, OSError) as e:
            self._disconnect()  # reopen at the next batch: the file or the server may be back
            self._count("failed", len(rows))
            self.warn.warning("failed", f"cannot write {len(rows)} event(s) to "
                                        f"{self.database.masked}: {self.database.redact(str(e))}")
            return
        self.batches.append(len(rows))
        self._count("written", len(rows))

    def _count(self, outcome: str, n: int) -> None:
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + n)
        metrics.report_records(outcome, n)


# -- the process's writers ---------------------------------------------------------------------

_writers: dict[str, ReportWriter] = {}
_writers_lock = threading.Lock()


def writer(url: str) -> ReportWriter:
    """This process's writer for ``url`` (a ``ReportDatabase`` value), made at first use.

    :raises ValueError: ``url`` is not a valid ``ReportDatabase`` URL.
    """
    with _writers_lock:  # by the text as configured: no parsing per message
        found = _writers.get(url)
        if found is None or found.pid != os.getpid():  # inherited through a fork: not ours
            found = _writers[url] = ReportWriter(url)
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
