"""The process supervisor: worker processes, privileges, reloads, stops and readiness.

libmilter serves one process with a thread per connection, under one GIL. To use every core,
the supervisor opens the socket once (in :mod:`authmilter.server`), then forks workers that
all accept on it; the kernel spreads the connections.

**Privileges.** Started as root with ``UserID``, the supervisor stays root and each worker
becomes the ``UserID`` user right after the fork, before it serves a connection. The
supervisor handles no mail: it reads the configuration, tables and keys (at start and at
every reload, with the same rights, so a key that loads at start also loads at a reload), and
it starts and stops workers. A reload that works forks a new set of workers that inherit the
new configuration, and retires the old set: they stop accepting, finish the connections they
have, then exit. So keys may be owned by root (``0600 root``), by the ``UserID`` user, or sit
in a folder only that user can enter (Debian's ``/etc/dkimkeys``), and reloads behave as start
does. (The alternative, re-reading in the unprivileged workers, would make every root-owned
key fail at the first reload, which is what users met.)

**Stopping.** libmilter's own stop (``smfi_stop``, or SIGTERM to a worker) is not used:

- libmilter's listener holds a mutex while it waits in ``select()`` and ``accept()``. With
  several processes on one socket, all are woken by a connection, one wins ``accept()``, and
  the others block in ``accept()`` holding that mutex until the next connection. The stop
  path (``mi_closener``) needs the mutex, so a stop on a quiet service waited until a mail
  came or the supervisor's SIGKILL (the 15 s stops seen in deployment). The listening socket
  is therefore made non-blocking: ``accept()`` answers ``EAGAIN``, which libmilter retries.
- libmilter checks for a stop only every 5 s, and ``smfi_main()`` returns without waiting for
  the sessions in flight; a non-root worker's stop also unlinks the shared socket's path.

Instead, the supervisor tells each worker over a pipe (:class:`WorkerControl`). The worker
points its copy of the listening descriptor at a socket nobody can reach (``dup2``), so its
libmilter takes no new connection, waits for the messages (stop) or connections (retire) it
has, and exits. A stop takes as long as the slowest message in flight, at most
:attr:`Supervisor.STOP_WAIT` seconds.

**Readiness.** With ``NOTIFY_SOCKET`` set (systemd's ``Type=notify``), the supervisor says
``READY=1`` once the socket listens and the workers are started, ``RELOADING=1`` during a
reload and ``STOPPING=1`` at a stop. The protocol is one datagram on a UNIX socket; it is
written here (:func:`notify`) rather than pulling in python-systemd, which needs libsystemd
headers to build, for ten lines.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import select
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from authmilter import metrics
from authmilter.config import Config
from authmilter.pipeline import Context
from authmilter.reports import failure, history, store

log = logging.getLogger("authmilter")

#: What a reload builds: the new configuration and context, or raises why it cannot.
Reloader = Callable[[], tuple[Config, Context]]

#: Directives a reload cannot change (OpenDKIM's list, opendkim(8)): they need a restart.
NOT_RELOADABLE = ("socket", "user_id", "pid_file", "umask", "workers", "metrics_listen",
                  "syslog", "syslog_facility", "syslog_name")  # fmt: skip


def notify(state: str) -> bool:
    """Send ``state`` (``READY=1`` …) to systemd's notification socket, if there is one.

    Returns whether a message was sent. A socket that cannot be reached is logged, never
    fatal: the service keeps running.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        log.warning("cannot tell systemd %s: NOTIFY_SOCKET %s: %s", state.split("\n")[0],
                    os.environ.get("NOTIFY_SOCKET"), e)  # fmt: skip
        return False
    return True


class Activity:
    """A worker's connections and messages in flight (the adapter counts them), so a worker
    that stops or retires knows when it may exit."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.sessions = 0
        self.messages = 0

    def change(self, *, sessions: int = 0, messages: int = 0) -> None:
        """Count connections or messages starting (+1) or ending (-1)."""
        with self._cond:
            self.sessions += sessions
            self.messages += messages
            self._cond.notify_all()

    def wait_idle(self, what: str, timeout: float) -> bool:
        """Wait until no ``what`` ("messages" or "sessions") is in flight; False on timeout."""
        with self._cond:
            return bool(self._cond.wait_for(lambda: getattr(self, what) <= 0, timeout))


#: The worker's activity; the milter adapter counts into it.
ACTIVITY = Activity()


class WorkerControl:
    """Worker side of the socket pair from the supervisor: one byte, ``s`` to stop (or the
    supervisor gone), ``r`` to retire after a reload. Once the worker takes no new connection
    it answers ``d``, so the supervisor can say the reload is done."""

    #: The last reply is written by libmilter after our callback returned: let it go out.
    REPLY_FLUSH = 0.2
    #: A connection accepted just before the detach is counted at its first milter command.
    SETTLE = 0.3
    #: Writing the queued DMARC report records takes at most this long ...
    FLUSH = 1.0
    #: ... and ends this long after ``limit + SETTLE + REPLY_FLUSH`` at the latest, inside the
    #: supervisor's ``STOP_GRACE``.
    FLUSH_MARGIN = 0.25

    def __init__(self, channel: int, listen_fd: int | None, *, stop_wait: float,
                 retire_wait: float, activity: Activity = ACTIVITY) -> None:  # fmt: skip
        self.channel = channel
        self.listen_fd = listen_fd
        self.stop_wait = stop_wait
        self.retire_wait = retire_wait
        self.activity = activity
        self._dummy: socket.socket | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Listen for the supervisor in a daemon thread."""
        threading.Thread(target=self._run, name="authmilter-control", daemon=True).start()

    def _read(self) -> bytes:
        try:
            return os.read(self.channel, 1)
        except OSError:
            return b""

    def _run(self) -> None:
        if self._read() == b"r":
            # A stop may still come while the old connections finish: it wins.
            threading.Thread(target=self._stop_later, name="authmilter-control-stop",
                             daemon=True).start()  # fmt: skip
            self.leave("sessions", self.retire_wait, "retired after a reload")
        else:
            self.leave("messages", self.stop_wait, "stopped")

    def _stop_later(self) -> None:
        self._read()
        self.leave("messages", self.stop_wait, "stopped")

    def detach(self) -> None:
        """Take no new connection: point libmilter's listening descriptor at a listening
        socket bound to an abstract address nobody knows. The shared socket stays open in the
        supervisor and the other workers."""
        with self._lock:
            if self.listen_fd is None or self._dummy is not None:
                return
            self._dummy = self._point_away(self.listen_fd)

    @staticmethod
    def _point_away(listen_fd: int) -> socket.socket:
        dummy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dummy.bind("")  # autobind: a fresh abstract address
        dummy.listen(1)
        dummy.setblocking(False)
        os.dup2(dummy.fileno(), listen_fd, inheritable=False)
        return dummy

    def leave(self, what: str, limit: float, why: str) -> None:
        """Stop taking connections, wait up to ``limit`` seconds for ``what`` in flight to
        end, write the queued DMARC report records if there is time, and exit the process."""
        started = time.monotonic()
        self.detach()
        with contextlib.suppress(OSError):
            os.write(self.channel, b"d")
        time.sleep(self.SETTLE)
        idle = self.activity.wait_idle(what, limit)
        if idle and what == "messages":
            time.sleep(self.REPLY_FLUSH)
        if not idle:
            log.warning("worker %d: %d message(s) and %d connection(s) still open after "
                        "%.0f s; leaving them to the MTA's milter_default_action",
                        os.getpid(), self.activity.messages, self.activity.sessions,
                        limit)  # fmt: skip
        spent = time.monotonic() - started
        flushed_by = time.monotonic() + min(self.FLUSH, limit + self.SETTLE + self.REPLY_FLUSH
                                            + self.FLUSH_MARGIN - spent)  # fmt: skip
        store.close(flushed_by - time.monotonic())
        history.close(flushed_by - time.monotonic())  # HistoryFile blocks, in what time is left
        failure.close(flushed_by - time.monotonic())  # failure reports: send what is queued
        log.debug("worker %d %s", os.getpid(), why)
        logging.shutdown()
        os._exit(0)


@dataclass
class _Worker:
    pid: int
    control: int  # the supervisor's end of the socket pair
    generation: int
    leaving: bool = field(default=False)


class Supervisor:
    """The parent process: workers, reloads and stopping (see the module docstring).

    A worker that dies is replaced; if workers keep dying (more than ``MAX_RESTARTS`` in
    ``RESTART_WINDOW`` seconds) the whole service stops, so a broken configuration does not
    spin.
    """

    MAX_RESTARTS = 10
    RESTART_WINDOW = 60.0
    #: How long a stopping worker waits for its messages in flight before it exits anyway.
    STOP_WAIT = 4.0
    #: Past this, a worker that has not exited is killed (it should never come to that).
    STOP_GRACE = 4.8
    #: How long a retired worker (after a reload) may keep serving its open connections;
    #: libmilter's own idle timeout is 600 s.
    RETIRE_WAIT = 600.0
    SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)

    def __init__(self, count: int, work: Callable[[Context], object], ctx: Context,
                 reload: Reloader | None = None, *, start: Callable[[], None] | None = None,
                 listen_fd: int | None = None,
                 become: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.count = count
        self.work = work
        self.ctx = ctx
        self.reload = reload
        self.start = start
        self.listen_fd = listen_fd
        self.become = become
        self.generation = 0
        self.workers: dict[int, _Worker] = {}
        self.stopping = False
        self.stop_deadline = float("inf")
        self.restarts: list[float] = []
        self.code = 0

    # -- workers ----------------------------------------------------------------------------

    def _spawn(self) -> None:
        # What the supervisor holds (modules, configuration, keys, the suffix list) is shared
        # with the workers copy-on-write. Python's cyclic collector writes into every object
        # it examines, which would copy those pages into each worker: frozen objects are
        # never examined (gc.freeze), so the pages stay shared.
        gc.collect()
        gc.freeze()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        read_fd, write_fd = theirs.detach(), mine.detach()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(write_fd)
                for other in self.workers.values():
                    with contextlib.suppress(OSError):
                        os.close(other.control)
                _die_with_parent()
                # Its own process group: a terminal's ^C reaches the supervisor only, which
                # then stops the workers in order.
                with contextlib.suppress(OSError):
                    os.setpgid(0, 0)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                    signal.signal(sig, signal.SIG_DFL)
                if self.become is not None:
                    self.become()
                control = WorkerControl(read_fd, self.listen_fd, stop_wait=self.STOP_WAIT,
                                        retire_wait=self.RETIRE_WAIT)  # fmt: skip
                # The control thread is started with the signals still blocked, as libmilter
                # wants them (its own signal thread takes them).
                control.start()
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
                self.work(self.ctx)
                # libmilter returned (a signal sent to this worker itself): finish what is
                # in flight as a stop does.
                control.leave("messages", self.STOP_WAIT, "stopped by a signal")
                code = 0
            except BaseException:  # noqa: BLE001 - report, and leave the restart to the parent
                log.error("worker %d failed:\n%s", os.getpid(), traceback.format_exc())
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(read_fd)
        self.workers[pid] = _Worker(pid, write_fd, self.generation)

    def _tell(self, worker: _Worker, word: bytes) -> None:
        worker.leaving = True
        with contextlib.suppress(OSError):
            os.write(worker.control, word)

    def _stop(self) -> None:
        if not self.stopping:
            self.stop_deadline = time.monotonic() + self.STOP_GRACE
            notify("STOPPING=1")
        self.stopping = True
        for worker in self.workers.values():
            self._tell(worker, b"s")

    def _reload(self) -> None:
        if self.reload is None:
            log.info("reload requested, but this process cannot reload; ignored")
            return
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC)//1000}")
        try:
            cfg, ctx = self.reload()
        except Exception as e:  # noqa: BLE001 - any failure keeps the running configuration
            log.error("reload failed, keeping the running configuration: %s", e)
            metrics.reload(False)
            notify("READY=1")
            return
        metrics.reload(True)
        old = self.ctx.config
        for name in NOT_RELOADABLE:
            if getattr(old, name) != getattr(cfg, name):
                log.warning("reload: %s changed; it takes effect after a restart", name)
        self.ctx = ctx
        retiring = [w for w in self.workers.values() if not w.leaving]
        self.generation += 1
        for _ in range(self.count):
            self._spawn()
        for worker in retiring:
            self._tell(worker, b"r")
        self._await_detached(retiring)
        log.info("reloaded: new workers take new connections; the old ones finish theirs")
        notify("READY=1")

    def _await_detached(self, workers: list[_Worker], limit: float = 5.0) -> None:
        """Wait until ``workers`` take no new connection (each answers ``d``), so that once
        the reload is reported, every new connection gets the new configuration."""
        deadline = time.monotonic() + limit
        waiting = {w.control: w for w in workers}
        while waiting and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(list(waiting), [], [], left)
            for fd in ready:
                with contextlib.suppress(OSError):
                    os.read(fd, 1)
                del waiting[fd]
        if waiting:
            log.warning("workers %s did not confirm within %.0f s that they take no new "
                        "connection", sorted(w.pid for w in waiting.values()), limit)  # fmt: skip

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            os.close(worker.control)
            metrics.process_dead(pid)
            if self.stopping or worker.leaving:
                if os.WIFSIGNALED(status) or os.WEXITSTATUS(status):
                    log.warning("worker %d ended: %s", pid, _describe_status(status))
                continue
            log.error("worker %d exited (%s); starting a new one", pid, _describe_status(status))
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < self.RESTART_WINDOW] + [now]
            if len(self.restarts) > self.MAX_RESTARTS:
                log.error("workers keep dying: %d restarts in %.0f s; stopping",
                          len(self.restarts), self.RESTART_WINDOW)  # fmt: skip
                self.code = 1
                self._stop()
                continue
            self._spawn()

    def run(self) -> int:
        """Start the workers and serve signals until every worker is gone; the exit code."""
        # Signals are taken synchronously (sigtimedwait), never in the middle of a fork.
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        if self.start is not None:
            self.start()
        for _ in range(self.count):
            self._spawn()
        notify(f"READY=1\nSTATUS=serving with {self.count} worker(s)\nMAINPID={os.getpid()}")
        while self.workers:
            info = signal.sigtimedwait(self.SIGNALS, 0.5)
            if info is None:
                pass
            elif info.si_signo in (signal.SIGTERM, signal.SIGINT):
                self._stop()
            elif info.si_signo in (signal.SIGHUP, signal.SIGUSR1) and not self.stopping:
                self._reload()
            self._reap()
            if self.stopping and self.workers and time.monotonic() > self.stop_deadline:
                log.error("workers %s did not stop within %.1f s; killing them",
                          sorted(self.workers), self.STOP_GRACE)  # fmt: skip
                for pid in list(self.workers):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.stop_deadline = float("inf")
        return self.code


def _die_with_parent() -> None:
    """Linux: a worker is killed when the supervisor dies, even by SIGKILL, so no orphan keeps
    serving a socket nobody manages."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"
