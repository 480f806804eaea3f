"""The pymilter adapter: sockets, process set-up, and the libmilter callbacks.

Kept thin: each callback hands its event to :mod:`authmilter.pipeline` and applies the
:class:`~authmilter.pipeline.Verdict` that comes back. An exception inside the milter never
loses mail: it is logged with its traceback and answered with ``On-InternalError``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import logging
import logging.handlers
import os
import socket
import stat
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, TextIO, TypeVar

import Milter

from authmilter import metrics
from authmilter.config import Account, Action, Config, user_id_account
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
from authmilter.reports import failure, history, store
from authmilter.supervisor import ACTIVITY, Reloader, Supervisor

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
        # A stopping worker waits for the messages in flight (see authmilter.supervisor).
        self._in_message = False
        self._open = True
        ACTIVITY.change(sessions=1)

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

    def _in_flight(self, on: bool) -> None:
        """A message starts (MAIL FROM) or is over (end of message, abort, close)."""
        if on != self._in_message:
            self._in_message = on
            ACTIVITY.change(messages=1 if on else -1)

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
        self._in_flight(True)
        self.failed = False
        self.txn = self.conn.transaction()
        self.txn.update_macros(self._macros())
        self.txn.envfrom(mailfrom)
        return int(Milter.CONTINUE)

    @guarded
    def envrcpt(self, to: str, *esmtp: str) -> int:
        """RCPT TO: where SPF rejects or defers, as policyd-spf did (the pipeline logs it)."""
        if self.txn is None:
            return int(Milter.CONTINUE)
        self.txn.update_macros({"i": self.macro("i")})  # the queue id of the log line
        verdict = self.txn.rcpt(to)
        if verdict.first:  # a refused message counts once, not once per recipient
            metrics.message("verify", verdict.action.value)
            for method, value in verdict.results:
                metrics.result(method, value)
        if verdict.reply is None or verdict.action is Action.ACCEPT:
            return int(Milter.CONTINUE)
        self._setreply(verdict.reply)
        return int(Milter.REJECT if verdict.action is Action.REJECT else Milter.TEMPFAIL)

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
        try:
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
            database = self.ctx.config.report_database
            if database and verdict.dmarc_event is not None:
                store.record(database, verdict.dmarc_event)  # never blocks nor raises
            history_file = self.ctx.config.history_file
            if history_file and verdict.dmarc_event and verdict.report_context is not None:
                history.record(history_file, verdict.dmarc_event, verdict.report_context)  # idem
            if (self.ctx.config.failure_reports and verdict.dmarc_event is not None
                    and verdict.report_context is not None):  # fmt: skip
                failure.record(self.ctx.config, verdict.dmarc_event, verdict.report_context)
            return self.apply(verdict)
        finally:
            self._in_flight(False)

    def abort(self) -> int:
        """The MTA gave up on this message: drop only the transaction."""
        self._drop_transaction()
        self._in_flight(False)
        return int(Milter.CONTINUE)

    def close(self) -> int:
        """The connection is gone."""
        self._drop_transaction()
        self.conn = None
        self._in_flight(False)
        if self._open:
            self._open = False
            ACTIVITY.change(sessions=-1)
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


def setup_logging(cfg: Config, err: TextIO | None = None) -> str:
    """Syslog (SyslogFacility, default mail; SyslogName) when ``Syslog`` is on (the default),
    else standard error. Returns where the lines go, for the start-up message.

    With syslog on but no ``/dev/log`` (a container without a syslog daemon or journald),
    the lines go to standard error and a warning says so: never silently to the network, as
    Python's handler would by default (UDP to localhost:514).
    """
    root = logging.getLogger("authmilter")
    root.handlers.clear()
    root.setLevel(logging.INFO)
    handler: logging.Handler
    where = "standard error"
    if cfg.syslog:
        facility = logging.handlers.SysLogHandler.facility_names.get(cfg.syslog_facility.lower())
        if facility is None:
            raise ConfigError(f"SyslogFacility: unknown facility '{cfg.syslog_facility}'",
                              cfg.location("syslog_facility"))  # fmt: skip
        try:
            # The handler hides a failed connect (it retries at each line): probe first.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
                probe.connect(SYSLOG_SOCKET)
            handler = logging.handlers.SysLogHandler(address=SYSLOG_SOCKET, facility=facility)
            handler.setFormatter(logging.Formatter(
                f"{cfg.syslog_name}[%(process)d]: %(message)s"))  # fmt: skip
            root.addHandler(handler)
            return f"syslog ({SYSLOG_SOCKET}, facility {cfg.syslog_facility.lower()})"
        except OSError as e:
            print(f"authmilter: warning: Syslog is on but {SYSLOG_SOCKET} cannot be used "
                  f"({e.strerror or e}); logging to standard error instead",
                  file=err or sys.stderr)  # fmt: skip
            where = f"standard error ({SYSLOG_SOCKET} unusable)"
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("authmilter[%(process)d]: %(message)s"))
    root.addHandler(handler)
    return where


#: The local syslog socket: rsyslog's, or journald's under systemd.
SYSLOG_SOCKET = "/dev/log"


def drop_privileges(account: Account) -> None:
    """Become the ``UserID`` user and group, with the user's supplementary groups (a worker,
    right after the fork). Nothing to do when already that user."""
    if os.geteuid() == account.uid:
        return
    os.initgroups(account.name, account.gid)
    os.setgid(account.gid)
    os.setuid(account.uid)


def privileges(cfg: Config) -> Account | None:
    """The user the workers become, or None to stay as started.

    :raises ConfigError: for an unknown user or group, or a UserID other than the running user
        when not started as root.
    """
    account = user_id_account(cfg)
    if account is None or os.geteuid() == account.uid:
        return None
    if os.geteuid() != 0:
        raise ConfigError(f"UserID {cfg.user_id}: only root can become another user; start "
                          f"authmilter as root, or as {account.name}, or remove UserID",
                          cfg.location("user_id"))  # fmt: skip
    return account


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


def check_pid_folder(cfg: Config, *, create: bool = False) -> str | None:
    """The PidFile's folder must exist, or be creatable: its parent exists (``/run`` for
    ``/run/authmilter``). With ``create`` (at start, before binding) a missing folder is made,
    mode 0755; without it (config-test) a note says it will be. Returns that note.

    :raises ConfigError: naming the PidFile line, when neither the folder nor its parent exist
        or it cannot be made.
    """
    if not cfg.pid_file:
        return None
    folder = os.path.dirname(os.path.abspath(cfg.pid_file))
    if os.path.isdir(folder):
        return None
    where = cfg.location("pid_file")
    if not os.path.isdir(os.path.dirname(folder)):
        raise ConfigError(f"PidFile {cfg.pid_file}: the folder {folder} does not exist, nor "
                          f"its parent; create it (install -d -m 0755 {folder})",
                          where)  # fmt: skip
    if not create:
        return (f"PidFile {cfg.pid_file}: the folder {folder} does not exist yet; "
                "authmilter run creates it (as the systemd unit's RuntimeDirectory= does)")
    try:
        os.mkdir(folder, 0o755)
        os.chmod(folder, 0o755)  # whatever the UMask
    except OSError as e:
        raise ConfigError(f"PidFile {cfg.pid_file}: cannot create the folder {folder}: "
                          f"{e.strerror}", where) from None  # fmt: skip
    return None


def _listening_fd(spec: str) -> int:
    """The descriptor of the socket libmilter opened for ``spec`` (it keeps it private).

    :raises OSError: when there is none (ENOENT).
    """
    kind, _, rest = spec.partition(":")
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
        except OSError:
            continue
        probe = socket.socket(fileno=fd)
        try:
            if not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                continue
            address = probe.getsockname()
            if kind == "local" and probe.family == socket.AF_UNIX and address == rest:
                return fd
            if kind in ("inet", "inet6") and probe.family != socket.AF_UNIX \
                    and str(address[1]) == rest.partition("@")[0]:  # fmt: skip
                return fd
        except OSError:
            continue
        finally:
            probe.detach()
    raise OSError(errno.ENOENT, f"no listening socket for {spec} among this process's files")


def serve(cfg: Config, ctx: Context, reload: Reloader | None = None) -> int:
    """Open the socket, start the workers (as ``UserID``), and serve until SIGTERM/SIGINT;
    returns the exit code.

    The supervisor stays as started (root, when it was) to read keys at reloads; see
    :mod:`authmilter.supervisor`. The pid file and a UNIX socket are removed at every exit,
    also when the start fails after the socket was opened.
    """
    where = setup_logging(cfg)
    if where.startswith("syslog"):
        print(f"authmilter: logging to {where}: /var/log/mail.log where rsyslog runs, else "
              f"journalctl -t {cfg.syslog_name}", file=sys.stderr)  # fmt: skip
    if cfg.umask is not None:
        os.umask(cfg.umask)
    account = privileges(cfg)
    check_socket_folder(cfg)
    check_pid_folder(cfg, create=True)
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE)
    # The libmilter callbacks are registered by runmilter's set-up; we open the socket
    # ourselves, before forking the workers.
    # pymilter's C module is named "milter", like our source folder: import it by name at run
    # time (a regular module wins over a namespace folder on sys.path).
    libmilter: Any = importlib.import_module("milter")
    _register(libmilter)
    libmilter.setconn(cfg.socket)
    libmilter.settimeout(600)
    try:
        libmilter.opensocket(True)  # True: remove a stale UNIX socket file first
    except libmilter.error as e:
        why = _bind_problem(cfg.socket) or str(e)
        raise ConfigError(f"Socket {cfg.socket}: cannot listen: {why}",
                          cfg.location("socket")) from None  # fmt: skip
    socket_path = _socket_path(cfg.socket)
    pid_file = cfg.pid_file
    wrote_pid = False
    try:
        listen_fd = _listening_fd(cfg.socket)
        # Non-blocking, so a worker that lost the race for a connection is not left blocked
        # in accept() (see authmilter.supervisor).
        os.set_blocking(listen_fd, False)
        if pid_file:
            try:
                fd = os.open(pid_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                with open(fd, "w") as f:
                    os.fchmod(fd, 0o644)  # readable by all, whatever the UMask
                    f.write(f"{os.getpid()}\n")
                wrote_pid = True
            except OSError as e:
                raise ConfigError(f"PidFile {pid_file}: cannot write it: {e.strerror}",
                                  cfg.location("pid_file")) from None  # fmt: skip
        if account is not None and socket_path:
            os.chown(socket_path, account.uid, account.gid if ":" in (cfg.user_id or "") else -1)
        workers = cfg.workers or os.cpu_count() or 1
        aid = (f"the MTA's name, else {ctx.authserv_id}" if ctx.authserv_id_from_mta
               else ctx.authserv_id)  # fmt: skip
        log.info("listening on %s (authserv-id %s, %d worker%s%s; logging to %s)", cfg.socket,
                 aid, workers, "" if workers == 1 else "s",
                 f" as {cfg.user_id}" if account else "", where)  # fmt: skip

        def work(worker_ctx: Context) -> None:
            Milter.factory = lambda: AuthMilter(worker_ctx)
            libmilter.main()

        def start_metrics() -> None:
            # Run by the supervisor with its signals blocked, so the server threads inherit it.
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
            folder = metrics.enable()
            if account is not None:  # the workers write their counts there
                os.chown(folder, account.uid, account.gid)
        become = (lambda: drop_privileges(account)) if account is not None else None
        code = Supervisor(workers, work, ctx, reload, start=start_metrics, listen_fd=listen_fd,
                          become=become).run()  # fmt: skip
        log.info("stopped")
    finally:
        metrics.shutdown()
        for path in (pid_file if wrote_pid else None, socket_path):
            if path:
                with contextlib.suppress(OSError):
                    os.unlink(path)
    return code


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
