"""The pymilter adapter: sockets, process set-up, and the libmilter callbacks.

Kept thin: each callback hands its event to :mod:`authmilter.pipeline` and applies the
:class:`~authmilter.pipeline.Verdict` that comes back. An exception inside the milter never
loses mail: it is logged with its traceback and answered with ``On-InternalError``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import grp
import importlib
import logging
import logging.handlers
import multiprocessing.sharedctypes
import os
import pwd
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import Milter

from authmilter import metrics
from authmilter.config import Action, Config
from authmilter.errors import ConfigError
from authmilter.pipeline import (
    AddHeader,
    Connection,
    Context,
    DeleteHeader,
    Reply,
    Transaction,
    Verdict,
)

log = logging.getLogger("authmilter")

F = TypeVar("F", bound=Callable[..., int])


def _callback(func: F, on_error: Callable[[AuthMilter], int]) -> F:
    """Time a callback for the metrics; on any exception log the traceback and answer
    ``on_error(self)``."""
    name = func.__name__

    @functools.wraps(func)
    def wrapper(self: AuthMilter, *args: Any) -> int:
        started = time.perf_counter()
        try:
            return func(self, *args)
        except Exception:  # noqa: BLE001 - the last-resort handler of the adapter
            self._log_internal_error(name)
            return on_error(self)
        finally:
            metrics.callback(name, time.perf_counter() - started)

    return wrapper  # type: ignore[return-value]


def guarded(func: F) -> F:
    """Run a callback; on any exception log the traceback and answer ``On-InternalError``."""
    return _callback(func, lambda self: self.internal_error())


def deferred(func: F) -> F:
    """For callbacks negotiated without a reply (``@Milter.noreply``: the MTA does not wait,
    which saves a round trip per header and body chunk): an exception is logged and the
    ``On-InternalError`` answer is given at end of message instead."""
    return _callback(func, lambda self: self.defer_error())


@Milter.header_leading_space
class AuthMilter(Milter.Base):  # type: ignore[misc]
    """One instance per SMTP connection (libmilter runs one thread per connection)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.conn: Connection | None = None
        self.txn: Transaction | None = None
        self.failed = False  # a no-reply callback of this message raised

    # -- helpers ----------------------------------------------------------------------------

    def macro(self, name: str) -> str | None:
        """A macro value by bare name (``i``, ``daemon_name``), or None."""
        try:
            value = self.getsymval(name if len(name) == 1 else "{" + name + "}")
        except Exception:  # noqa: BLE001 - no context (test harness) or libmilter refusal
            return None
        return str(value) if value else None

    def _macros(self) -> dict[str, str | None]:
        return {name: self.macro(name) for name in self.ctx.macro_names()}

    def _log_internal_error(self, where: str) -> None:
        qid = self.macro("i") or "NOQUEUE"
        log.error("%s: internal error in %s:\n%s", qid, where, traceback.format_exc().rstrip())
        metrics.internal_error(where)

    def defer_error(self) -> int:
        """A no-reply callback failed: remember it for the end of message, carry on now."""
        self.failed = True
        return int(Milter.CONTINUE)

    def internal_error(self) -> int:
        """Answer with the configured ``On-InternalError`` action (default tempfail)."""
        self._drop_transaction()
        action = self.ctx.config.on_internal_error
        if action is Action.TEMPFAIL:
            self.setreply("451", "4.3.0", "authmilter: internal error, try again later")
            return int(Milter.TEMPFAIL)
        if action is Action.REJECT:
            self.setreply("550", "5.3.0", "authmilter: internal error")
            return int(Milter.REJECT)
        if action is Action.DISCARD:
            return int(Milter.DISCARD)
        return int(Milter.ACCEPT)

    def _drop_transaction(self) -> None:
        if self.txn is not None:
            self.txn.close()
            self.txn = None

    # -- callbacks --------------------------------------------------------------------------

    @guarded
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        """A client connected to the MTA: classify it once."""
        ip = None
        if family in (socket.AF_INET, socket.AF_INET6) and hostaddr:
            # libmilter gives (address, port[, flow, scope]); test harnesses a bare string.
            ip = str(hostaddr[0] if isinstance(hostaddr, tuple) else hostaddr)
        self.conn = Connection(
            self.ctx, hostname=hostname, ip=ip,
            macros={k: v for k, v in self._macros().items() if v is not None},
            leading_space=bool(self._protocol & Milter.P_HDR_LEADSPC))  # fmt: skip
        if self.conn.peer:
            log.debug("connection from %s [%s] is in PeerList: not processed", hostname, ip)
            return int(Milter.ACCEPT)
        return int(Milter.CONTINUE)

    @Milter.noreply  # type: ignore[untyped-decorator]
    @deferred
    def hello(self, heloname: str) -> int:
        """HELO/EHLO."""
        if self.conn is not None:
            self.conn.set_helo(heloname)
        return int(Milter.CONTINUE)

    @guarded
    def envfrom(self, mailfrom: str, *esmtp: str) -> int:
        """MAIL FROM: a new transaction (the previous one, if any, is over)."""
        assert self.conn is not None
        self._drop_transaction()
        self.failed = False
        self.txn = self.conn.transaction()
        self.txn.update_macros(self._macros())
        self.txn.envfrom(mailfrom)
        return int(Milter.CONTINUE)

    @guarded
    def envrcpt(self, to: str, *esmtp: str) -> int:
        """RCPT TO: where SPF rejects or defers, as policyd-spf did."""
        if self.txn is None:
            return int(Milter.CONTINUE)
        reply = self.txn.rcpt(to)
        if reply is None:
            return int(Milter.CONTINUE)
        spf = self.txn.spf
        rejected = reply.code.startswith("5")
        action = "reject" if rejected else "tempfail"
        log.info("%s: spf=%s %s, action=%s at RCPT: %s %s %s",
                 self.macro("i") or "NOQUEUE", spf.result.value if spf else "?",
                 f"{spf.identity.value}={spf.sender}" if spf else "",
                 action, reply.code, reply.xcode, reply.text)  # fmt: skip
        metrics.message("verify", action)
        if spf is not None:
            metrics.result("spf", spf.result.value)
        self._setreply(reply)
        return int(Milter.REJECT if rejected else Milter.TEMPFAIL)

    def _setreply(self, reply: Reply) -> None:
        """libmilter reads the text as a format: a lone ``%`` must be doubled."""
        self.setreply(reply.code, reply.xcode, reply.text.replace("%", "%%"))

    @Milter.noreply  # type: ignore[untyped-decorator]
    @Milter.decode("bytes")  # type: ignore[untyped-decorator]
    @deferred
    def header(self, name: str, value: bytes) -> int:
        """One header field, raw bytes with leading space and folding (DKIM needs them)."""
        if self.txn is not None:
            self.txn.header(name, value)
        return int(Milter.CONTINUE)

    @Milter.noreply  # type: ignore[untyped-decorator]
    @deferred
    def eoh(self) -> int:
        """End of headers."""
        if self.txn is not None:
            # Macros were read at connect and MAIL FROM (daemon, SMTP AUTH); {i} at the end.
            self.txn.eoh()
        return int(Milter.CONTINUE)

    @Milter.noreply  # type: ignore[untyped-decorator]
    @deferred
    def body(self, chunk: bytes) -> int:
        """A body chunk."""
        if self.txn is not None:
            self.txn.body(chunk)
        return int(Milter.CONTINUE)

    @guarded
    def eom(self) -> int:
        """End of message: decide and apply."""
        if self.failed:
            return self.internal_error()
        if self.txn is None:
            return int(Milter.ACCEPT)
        self.txn.update_macros(self._macros())
        verdict = self.txn.eom()
        self.txn = None
        metrics.message(verdict.direction.value, verdict.action.value)
        for method, value in verdict.results:
            metrics.result(method, value)
        return self.apply(verdict)

    def abort(self) -> int:
        """The MTA gave up on this message: drop only the transaction."""
        self._drop_transaction()
        return int(Milter.CONTINUE)

    def close(self) -> int:
        """The connection is gone."""
        self._drop_transaction()
        self.conn = None
        return int(Milter.CONTINUE)

    # -- applying verdicts ------------------------------------------------------------------

    def apply(self, verdict: Verdict) -> int:
        """Carry out a verdict: header edits, quarantine, reply, and the log line."""
        cfg = self.ctx.config
        if verdict.traceback:
            log.error("%s\n%s", verdict.log, verdict.traceback)
        elif verdict.action is not Action.ACCEPT or cfg.syslog_success:
            log.info("%s", verdict.log)
        for edit in verdict.edits:
            if isinstance(edit, DeleteHeader):
                self.chgheader(edit.name, edit.occurrence, None)
            elif isinstance(edit, AddHeader):
                # With SMFIP_HDR_LEADSPC negotiated the MTA adds no space after the colon: we
                # do, so the field reads "Name: value" as it was signed.
                lead = " " if self._protocol & Milter.P_HDR_LEADSPC else ""
                self.addheader(edit.name, lead + edit.value, edit.index)
        action = verdict.action
        if action is Action.QUARANTINE:
            self.quarantine(verdict.quarantine_reason or "authmilter")
            return int(Milter.ACCEPT)
        if action in (Action.REJECT, Action.TEMPFAIL):
            if verdict.reply is not None:
                self._setreply(verdict.reply)
            return int(Milter.REJECT if action is Action.REJECT else Milter.TEMPFAIL)
        if action is Action.DISCARD:
            return int(Milter.DISCARD)
        return int(Milter.ACCEPT)


# -- the process -----------------------------------------------------------------------------


def setup_logging(cfg: Config) -> None:
    """Syslog (with SyslogFacility/SyslogName) when ``Syslog`` is on, else standard error."""
    root = logging.getLogger("authmilter")
    root.handlers.clear()
    root.setLevel(logging.INFO)
    handler: logging.Handler
    if cfg.syslog:
        facility = logging.handlers.SysLogHandler.facility_names.get(cfg.syslog_facility.lower())
        if facility is None:
            raise ConfigError(f"SyslogFacility: unknown facility '{cfg.syslog_facility}'",
                              cfg.location("syslog_facility"))  # fmt: skip
        address = "/dev/log" if os.path.exists("/dev/log") else ("localhost", 514)
        handler = logging.handlers.SysLogHandler(address=address, facility=facility)
        handler.setFormatter(logging.Formatter(f"{cfg.syslog_name}[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("authmilter[%(process)d]: %(message)s"))
    root.addHandler(handler)


def drop_privileges(user_spec: str) -> None:
    """Become ``user[:group]`` (UserID), with the user's supplementary groups.

    :raises ConfigError: for an unknown user or group.
    """
    user, _, group = user_spec.partition(":")
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"UserID: unknown user '{user}'") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"UserID: unknown group '{group}'") from None
    if os.getuid() == pw.pw_uid:
        return
    os.initgroups(user, gid)
    os.setgid(gid)
    os.setuid(pw.pw_uid)


def _socket_path(spec: str) -> str | None:
    return spec.partition(":")[2] if spec.startswith("local:") else None


def check_socket_folder(cfg: Config) -> None:
    """A ``local:`` socket's folder must exist and be a folder (config-test, and before binding).

    :raises ConfigError: naming the Socket line, the folder and what is wrong with it.
    """
    path = _socket_path(cfg.socket)
    if path is None:
        return
    folder = os.path.dirname(path) or "."
    if not os.path.exists(folder):
        raise ConfigError(f"Socket {cfg.socket}: the folder {folder} does not exist; create it "
                          "(the systemd unit's RuntimeDirectory= does, for /run)",
                          cfg.location("socket"))  # fmt: skip
    if not os.path.isdir(folder):
        raise ConfigError(f"Socket {cfg.socket}: {folder} is not a folder", cfg.location("socket"))


def _bind_problem(spec: str) -> str:
    """Why binding ``spec`` fails, with its errno, found by trying it (libmilter says only
    "cannot opensocket"); empty when a plain bind succeeds."""
    kind, _, rest = spec.partition(":")
    try:
        if kind == "local":
            probe = socket.socket(socket.AF_UNIX)
            target: Any = rest
            if os.path.exists(rest):
                return f"{rest} exists and cannot be replaced"
        else:
            port, _, host = rest.partition("@")
            family = socket.AF_INET6 if kind == "inet6" else socket.AF_INET
            probe = socket.socket(family)
            target = (host.strip("[]") or ("::" if kind == "inet6" else "0.0.0.0"), int(port))
        with probe:
            probe.bind(target)
        if kind == "local":
            os.unlink(rest)
    except OSError as e:
        return f"[Errno {e.errno}] {e.strerror}"
    return ""


def serve(cfg: Config, ctx: Context, reload: Reloader | None = None) -> int:
    """Open the socket, drop privileges, and serve until SIGTERM/SIGINT; returns the exit code.

    The workers finish the connections in flight; the pid file and a UNIX socket are removed
    on the way out. SIGHUP/SIGUSR1 call ``reload`` (see :class:`Supervisor`).
    """
    setup_logging(cfg)
    if cfg.umask is not None:
        os.umask(cfg.umask)
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE)
    # The libmilter callbacks are registered by runmilter's set-up; we open the socket
    # ourselves so privileges can be dropped after binding (and after the keys were read).
    # pymilter's C module is named "milter", like our source folder: import it by name at run
    # time (a regular module wins over a namespace folder on sys.path).
    libmilter: Any = importlib.import_module("milter")
    _register(libmilter)
    check_socket_folder(cfg)
    libmilter.setconn(cfg.socket)
    libmilter.settimeout(600)
    try:
        libmilter.opensocket(True)  # True: remove a stale UNIX socket file first
    except libmilter.error as e:
        why = _bind_problem(cfg.socket) or str(e)
        raise ConfigError(f"Socket {cfg.socket}: cannot listen: {why}",
                          cfg.location("socket")) from None  # fmt: skip
    pid_file = cfg.pid_file
    if pid_file:
        with open(pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    if cfg.user_id:
        path = _socket_path(cfg.socket)
        if path and os.path.exists(path):
            user, _, group = cfg.user_id.partition(":")
            os.chown(path, pwd.getpwnam(user).pw_uid,
                     grp.getgrnam(group).gr_gid if group else -1)  # fmt: skip
        drop_privileges(cfg.user_id)
    workers = cfg.workers or os.cpu_count() or 1
    aid = f"the MTA's name, else {ctx.authserv_id}" if ctx.authserv_id_from_mta else ctx.authserv_id
    log.info("listening on %s (authserv-id %s, %d worker%s)", cfg.socket, aid,
             workers, "" if workers == 1 else "s")  # fmt: skip
    def work(_worker_ctx: Context, generation: Generation) -> None:
        Milter.factory = lambda: AuthMilter(generation.current())
        libmilter.main()

    def start_metrics() -> None:
        # Run by the supervisor with its signals blocked, so the server threads inherit that.
        if cfg.metrics_listen:
            try:
                server = metrics.serve(cfg.metrics_listen)
            except (OSError, ValueError) as e:
                raise ConfigError(f"MetricsListen {cfg.metrics_listen}: {e}",
                                  cfg.location("metrics_listen")) from None  # fmt: skip
            host, port = server.server_address[:2]
            log.info("metrics on http://%s/metrics (worker files in %s)",
                     f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                     os.environ.get("PROMETHEUS_MULTIPROC_DIR"))  # fmt: skip

    if cfg.metrics_listen:
        metrics.enable()
    try:
        code = Supervisor(workers, work, ctx, reload, start=start_metrics).run()
    finally:
        metrics.shutdown()
        log.info("stopped")
        for path in (pid_file, _socket_path(cfg.socket)):
            if path:
                with contextlib.suppress(OSError):
                    os.unlink(path)
    return code


#: What a reload builds: the new configuration and context, or raises why it cannot.
Reloader = Callable[[], tuple[Config, Context]]


class Generation:
    """A reload counter in memory shared by the parent and its workers, and the worker's
    current context, which the connection factory consults."""

    def __init__(self, reload: Reloader | None) -> None:
        self._shared = multiprocessing.sharedctypes.RawValue(ctypes.c_ulonglong, 0)
        self._reload = reload
        self._seen = 0
        self._ctx: Context | None = None
        self._lock = threading.Lock()

    def bump(self) -> None:
        """Parent: a new configuration is ready."""
        self._shared.value += 1

    def adopt(self, ctx: Context) -> None:
        """Worker, at start: this context is current."""
        self._ctx = ctx
        self._seen = self._shared.value

    def current(self) -> Context:
        """Worker, for each new connection: the context, reloaded first if the parent did."""
        with self._lock:
            assert self._ctx is not None
            wanted = self._shared.value
            if wanted != self._seen and self._reload is not None:
                self._seen = wanted
                try:
                    _cfg, self._ctx = self._reload()
                    log.info("worker %d: configuration reloaded", os.getpid())
                except Exception as e:  # noqa: BLE001 - keep serving with what works
                    log.error("worker %d: reload failed, keeping the running configuration: %s",
                              os.getpid(), e)  # fmt: skip
            return self._ctx

#: Directives a reload cannot change (OpenDKIM's list, opendkim(8)): they need a restart.
NOT_RELOADABLE = ("socket", "user_id", "pid_file", "umask", "workers", "metrics_listen",
                  "syslog", "syslog_facility", "syslog_name")  # fmt: skip


class Supervisor:
    """The parent process: worker processes sharing the one listening socket (libmilter runs a
    thread per connection under one GIL; processes use every core), reloads, and stopping.

    The socket is opened before forking, so every worker's libmilter accepts on it and the
    kernel spreads connections. A worker that dies is replaced; one that keeps dying (more than
    ``MAX_RESTARTS`` in ``RESTART_WINDOW`` seconds) stops the whole service, so a broken
    configuration does not spin. SIGTERM/SIGINT are passed to the workers, which finish the
    connections in flight.

    SIGHUP or SIGUSR1 (OpenDKIM's) reloads: the parent reads the configuration, tables and keys
    again; if that works it bumps a generation number in shared memory, and each worker reads
    them again itself when its next connection arrives. Connections in flight keep the
    configuration they started with, and no worker stops, so nothing is refused (stopping
    libmilter aborts its open sessions). A reload that fails keeps the running configuration
    and logs why.
    """

    MAX_RESTARTS = 10
    RESTART_WINDOW = 60.0
    #: How long workers get to finish after SIGTERM before they are killed. libmilter
    #: normally stops within its 5 s polling interval; rarely it deadlocks in its stop path
    #: (seen under load), and a service must stop all the same.
    STOP_GRACE = 15.0
    SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)

    def __init__(self, count: int, work: Callable[[Context, Generation], object],
                 ctx: Context, reload: Reloader | None = None, *,
                 start: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.start = start
        self.count = count
        self.work = work
        self.ctx = ctx
        self.reload = reload
        self.generation = Generation(reload)
        self.children: set[int] = set()
        self.stopping = False
        self.stop_deadline = float("inf")
        self.restarts: list[float] = []

    def _spawn(self) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                _die_with_parent()
                signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                    signal.signal(sig, signal.SIG_DFL)
                self.generation.adopt(self.ctx)
                self.work(self.ctx, self.generation)
                code = 0
            except BaseException:  # noqa: BLE001 - report, and leave the restart to the parent
                log.error("worker %d failed:\n%s", os.getpid(), traceback.format_exc())
            finally:
                logging.shutdown()
                os._exit(code)
        self.children.add(pid)

    def _signal_all(self, pids: set[int]) -> None:
        for pid in list(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _stop(self) -> None:
        if not self.stopping:
            self.stop_deadline = time.monotonic() + self.STOP_GRACE
        self.stopping = True
        self._signal_all(self.children)

    def _reload(self) -> None:
        if self.reload is None:
            log.info("reload requested, but this process cannot reload; ignored")
            return
        try:
            cfg, ctx = self.reload()
        except Exception as e:  # noqa: BLE001 - any failure keeps the running configuration
            log.error("reload failed, keeping the running configuration: %s", e)
            metrics.reload(False)
            return
        metrics.reload(True)
        old = self.ctx.config
        for name in NOT_RELOADABLE:
            if getattr(old, name) != getattr(cfg, name):
                log.warning("reload: %s changed; it takes effect after a restart", name)
        self.ctx = ctx
        self.generation.bump()
        log.info("reloaded: the workers take the new configuration on their next connection")

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid not in self.children:
                continue
            self.children.discard(pid)
            metrics.process_dead(pid)
            if self.stopping:
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
        self.code = 0
        # Signals are taken synchronously (sigwaitinfo), never in the middle of a fork.
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        if self.start is not None:
            self.start()
        for _ in range(self.count):
            self._spawn()
        while self.children:
            info = signal.sigtimedwait(self.SIGNALS, 1.0)
            if info is None:
                pass
            elif info.si_signo in (signal.SIGTERM, signal.SIGINT):
                self._stop()
            elif info.si_signo in (signal.SIGHUP, signal.SIGUSR1) and not self.stopping:
                self._reload()
            self._reap()
            if self.stopping and self.children and time.monotonic() > self.stop_deadline:
                log.error("workers %s did not stop within %.0f s; killing them",
                          sorted(self.children), self.STOP_GRACE)  # fmt: skip
                for pid in list(self.children):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.stop_deadline = float("inf")
        return self.code


def _die_with_parent() -> None:
    """Linux: a worker is killed when the supervisor dies, even by SIGKILL, so no orphan keeps
    serving a socket nobody manages. SIGKILL, not SIGTERM: with its parent gone nobody would
    notice a worker stuck in libmilter's stop path."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


def _register(libmilter: Any) -> None:
    """Wire libmilter's callbacks to the factory's objects, as ``Milter.runmilter`` does."""
    libmilter.set_connect_callback(Milter.connect_callback)
    libmilter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    libmilter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    libmilter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    libmilter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    libmilter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    libmilter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    libmilter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    libmilter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    libmilter.set_close_callback(Milter.close_callback)
    libmilter.register("authmilter",
                       data=lambda ctx: ctx.getpriv().data(),
                       unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
                       negotiate=Milter.negotiate_callback)  # fmt: skip
