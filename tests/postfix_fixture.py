"""A real Postfix for end-to-end tests: two loopback listeners, ``smtpd_milters``, a capture sink.

:class:`PostfixInstance` runs a private Postfix (its own ``config_directory``, ``queue_directory``
and ``data_directory`` in a temporary directory; never the system instance, never /etc/postfix)
with two SMTP listeners on free 127.0.0.1 ports:

``submit``
    plain ``smtpd``; the milter sees the client 127.0.0.1 (or the 127.x.y.z the test binds)
    and ``{daemon_name}`` = ``ORIGINATING``.
``inbound``
    ``smtpd`` with ``smtpd_upstream_proxy_protocol = haproxy``: :meth:`PostfixInstance.send`
    writes a PROXY v1 line claiming an outside client address (198.51.100.25 unless told),
    which Postfix hands to the milter; ``{daemon_name}`` = ``INBOUND``.

Everything Postfix accepts is relayed to ``relayhost = [127.0.0.1]:<sink port>``, where
:class:`SmtpSink` records each message exactly as delivered (Received and milter-added
headers included) for :meth:`PostfixInstance.wait_delivered`.

The fixtures :func:`postfix_factory` (and ``postfix_factory_module``) and
:func:`milter_socket_dir` are defined here. A test module gets them with
``from postfix_fixture import postfix_factory`` (pytest sees imported fixtures), or, to keep
ruff from flagging each test argument of that name (F811), by assignment:
``postfix_factory = postfix_fixture.postfix_factory``. Without Postfix they fail (never skip)
and say to run ``make test``.

Typical use::

    def test_x(postfix_factory, milter_socket_dir):
        sock = milter_socket_dir / "authmilter.sock"
        ...start the milter on f"unix:{sock}" with umask 000, then:
        wait_for_socket(f"unix:{sock}")
        pf = postfix_factory(f"unix:{sock}")
        pf.send(msg, mail_from="a@example.org", rcpt_to=["b@example.net"], port="inbound",
                client_ip="198.51.100.25")
        [raw] = pf.wait_delivered(1)
"""

from __future__ import annotations

import contextlib
import email.message
import grp
import json
import os
import pty
import pwd
import re
import shutil
import signal
import smtplib
import socket
import socketserver
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

import pytest

POSTFIX = "/usr/sbin/postfix"
POSTQUEUE = "/usr/sbin/postqueue"
POSTSUPER = "/usr/sbin/postsuper"
POSTFIX_MISSING = (
    "Postfix is not installed ({path} missing): run `make test`, it installs Postfix "
    "(and the other Debian packages the test suite drives)"
)
LOOPBACK = "127.0.0.1"
#: Outside address an ``inbound`` client claims when the test names none (RFC 5737 TEST-NET-2).
DEFAULT_INBOUND_CLIENT = "198.51.100.25"
#: ``myhostname`` of the instance: the ``by`` host of the Received header Postfix adds.
MYHOSTNAME = "mx.harness.example"
#: Set this environment variable to keep the instance's directory after the test (debugging).
KEEP_ENV = "AUTHMILTER_KEEP_POSTFIX"

COMMAND_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
SMTP_TIMEOUT = 30.0

Port = Literal["submit", "inbound"]
Stage = Literal["connect", "helo", "mail", "rcpt", "data"]

_EOL = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"(?m)^\.")


class HarnessError(RuntimeError):
    """The Postfix test harness could not configure, start, stop or query something."""


class HarnessTimeout(AssertionError):
    """Something the test waited for (deliveries, a queue state, a log line) did not happen."""


class SmtpError(Exception):
    """Root of the errors :meth:`PostfixInstance.send` raises for the SMTP conversation."""


class SmtpRejected(SmtpError):
    """Postfix answered a stage of the SMTP transaction with a 4xx or 5xx reply.

    ``code`` is the reply code (``550``), ``text`` the rest of the reply with the enhanced
    status code (``"5.7.1 harness says no"``; continuation lines joined with newlines), and
    ``stage`` the command that drew it: ``connect`` (banner), ``helo``, ``mail``, ``rcpt`` or
    ``data`` (the reply to the final dot, or to ``DATA`` itself).
    """

    def __init__(self, stage: Stage, code: int, text: str) -> None:
        super().__init__(f"{stage}: {code} {text}")
        self.stage = stage
        self.code = code
        self.text = text

    @property
    def temporary(self) -> bool:
        """True for a 4xx reply (try again later)."""
        return 400 <= self.code < 500

    @staticmethod
    def make(stage: Stage, code: int, text: str) -> SmtpRejected:
        """Return :class:`SmtpTempfail` for 4xx, :class:`SmtpPermfail` for 5xx, else the base."""
        if 400 <= code < 500:
            return SmtpTempfail(stage, code, text)
        if 500 <= code < 600:
            return SmtpPermfail(stage, code, text)
        return SmtpRejected(stage, code, text)


class SmtpTempfail(SmtpRejected):
    """A 4xx reply: e.g. ``451 4.7.1 Service unavailable`` when the milter is down."""


class SmtpPermfail(SmtpRejected):
    """A 5xx reply: e.g. ``550 5.7.1 …`` set by the milter with ``setreply``."""


class SmtpConnectionLost(SmtpError):
    """Postfix closed the connection (or it timed out) during ``stage``."""

    def __init__(self, stage: Stage, detail: str) -> None:
        super().__init__(f"{stage}: connection lost: {detail}")
        self.stage = stage


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def require_postfix() -> None:
    """Fail the test (never skip) when Postfix is not installed."""
    for path in (POSTFIX, POSTQUEUE):
        if not Path(path).exists():
            pytest.fail(POSTFIX_MISSING.format(path=path), pytrace=False)


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def new_socket_dir(prefix: str = "authmilter-test-") -> Path:
    """Create a fresh 0755 directory under /run (or /tmp) for a milter's ``unix:`` socket.

    pytest's ``tmp_path`` sits under a 0700 directory that user ``postfix`` cannot traverse,
    so the socket of a milter that Postfix must reach lives here instead. The caller removes it
    (:func:`milter_socket_dir` does at teardown).
    """
    parent = "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    return path


def _postfix_may(path: Path, access: Literal["w", "x"]) -> bool:
    """True when user ``postfix`` has write (``w``) or search (``x``) permission on ``path``."""
    st = path.stat()
    try:
        user = pwd.getpwnam("postfix")
    except KeyError:
        return True  # no such user: nothing to check here; Postfix will say more
    bits = {
        "w": (stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH),
        "x": (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH),
    }[access]
    if st.st_uid == user.pw_uid:
        return bool(st.st_mode & bits[0])
    groups = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    if st.st_gid in groups:
        return bool(st.st_mode & bits[1])
    return bool(st.st_mode & bits[2])


def _check_postfix_can_connect(path: Path) -> None:
    """Raise :class:`HarnessError` unless user ``postfix`` can connect to the socket ``path``."""
    for parent in reversed(path.parents):
        if not _postfix_may(parent, "x"):
            raise HarnessError(
                f"milter socket {path}: user postfix cannot enter {parent} "
                f"({stat.filemode(parent.stat().st_mode)}); put the socket in a "
                "milter_socket_dir() directory"
            )
    if not _postfix_may(path, "w"):
        raise HarnessError(
            f"milter socket {path} ({stat.filemode(path.stat().st_mode)}) is not writable by "
            "user postfix: start the milter with a umask that leaves it writable (e.g. 000)"
        )


def wait_for_socket(
    milter_socket: str,
    *,
    timeout: float = 10.0,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Wait until a milter listens on ``milter_socket`` (Postfix notation), or raise.

    ``unix:/path`` (or ``local:``) must also be reachable by user ``postfix``, which is what
    smtpd connects as: a socket made under a 022 umask, or under pytest's 0700 ``tmp_path``,
    is refused to Postfix although root can connect, so this raises :class:`HarnessError`
    then rather than let the test see mysterious tempfails. ``alive`` (e.g.
    ``lambda: proc.poll() is None``) stops the wait early when the milter process died.

    :raises HarnessTimeout: nothing listens after ``timeout`` seconds.
    :raises HarnessError: the socket is not writable by ``postfix``, or ``alive()`` is false.
    """
    kind, _, where = milter_socket.partition(":")
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        if alive is not None and not alive():
            raise HarnessError(f"milter process exited before listening on {milter_socket}")
        try:
            if kind in ("unix", "local"):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(1.0)
                    sock.connect(where)
                _check_postfix_can_connect(Path(where))
                return
            if kind == "inet":
                host, _, port = where.rpartition(":")
                with socket.create_connection((host or LOOPBACK, int(port)), timeout=1.0):
                    return
            raise HarnessError(f"unsupported milter socket {milter_socket!r}")
        except OSError as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            raise HarnessTimeout(f"no milter listening on {milter_socket} after {timeout}s: {last}")
        time.sleep(0.02)


def _drain(fd: int) -> str:
    """Read what is buffered on ``fd`` without blocking (a pty master after the command)."""
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):  # EIO: no slave left open
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers signal 0; it has ended for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _ipv6_loopback() -> bool:
    """True when ::1 can be bound (the kernel has IPv6 on loopback)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def _listening_ports() -> set[int]:
    """TCP ports in LISTEN state on IPv4 (from /proc/net/tcp)."""
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A":
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def process_tree(roots: Sequence[int]) -> list[int]:
    """``roots`` (those still alive) and all their descendants, from /proc; each process
    comes after its parent."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(entry.name)] = int(fields[1])
    found = [root for root in roots if root in parents]
    frontier = list(found)
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, ppid in parents.items() if ppid == parent]
        found.extend(kids)
        frontier.extend(kids)
    return found


# --------------------------------------------------------------------------------------------
# The delivery sink
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message the sink accepted: envelope, raw bytes, the file it was saved to."""

    seq: int
    mail_from: str
    rcpt_to: tuple[str, ...]
    helo: str
    data: bytes
    path: Path


class _SinkServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    sink: SmtpSink


class _SinkHandler(socketserver.StreamRequestHandler):
    server: _SinkServer
    timeout = 60

    def _reply(self, line: str) -> None:
        self.wfile.write(line.encode("ascii") + b"\r\n")

    def handle(self) -> None:
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sink = self.server.sink
        helo = ""
        mail_from: str | None = None
        rcpts: list[str] = []
        self._reply("220 sink.harness.example ESMTP harness sink")
        while True:
            raw = self.rfile.readline(65536)
            if not raw:
                return
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            verb = line[:4].upper()
            arg = line[4:].strip()
            if verb in ("EHLO", "HELO"):
                helo, mail_from, rcpts = arg, None, []
                if verb == "EHLO":
                    for ext in ("sink.harness.example", "PIPELINING", "8BITMIME", "SMTPUTF8"):
                        self._reply(f"250-{ext}")
                    self._reply("250 ENHANCEDSTATUSCODES")
                else:
                    self._reply("250 sink.harness.example")
            elif verb == "MAIL":
                mail_from, rcpts = _angle_addr(arg), []
                self._reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                if mail_from is None:
                    self._reply("503 5.5.1 Error: need MAIL command")
                else:
                    rcpts.append(_angle_addr(arg))
                    self._reply("250 2.1.5 Ok")
            elif verb == "DATA":
                if mail_from is None or not rcpts:
                    self._reply("503 5.5.1 Error: need RCPT command")
                    continue
                self._reply("354 End data with <CR><LF>.<CR><LF>")
                data = self._read_data()
                if data is None:
                    return
                reply = sink.data_reply
                if reply is None:
                    delivery = sink.record(mail_from, tuple(rcpts), helo, data)
                    reply = f"250 2.0.0 Ok: queued as S{delivery.seq:04d}"
                self._reply(reply)
                mail_from, rcpts = None, []
            elif verb == "RSET":
                mail_from, rcpts = None, []
                self._reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                self._reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                self._reply("221 2.0.0 Bye")
                return
            else:
                self._reply("502 5.5.2 Error: command not recognized")

    def _read_data(self) -> bytes | None:
        chunks: list[bytes] = []
        while True:
            raw = self.rfile.readline(1 << 20)
            if not raw:
                return None
            if raw in (b".\r\n", b".\n"):
                return b"".join(chunks)
            # RFC 5321 §4.5.2: the receiver removes one leading dot ("dot-unstuffing").
            chunks.append(raw[1:] if raw.startswith(b".") else raw)


def _angle_addr(arg: str) -> str:
    """``FROM:<a@b> SIZE=1`` → ``a@b``; ``TO:<>`` → ``""``."""
    _, _, rest = arg.partition(":")
    rest = rest.strip()
    if rest.startswith("<"):
        return rest[1 : rest.find(">")] if ">" in rest else rest[1:]
    return rest.split()[0] if rest else ""


class SmtpSink:
    """A tiny threaded SMTP server on loopback that keeps every message it is given.

    Why not Postfix's ``smtp-sink -d DIR/%H%M%S.``: its dump files turn CRLF into LF, put
    smtp-sink's own X-Client-Addr…/Received lines in front of the message and an empty line
    after it (so a message ending in an empty line cannot be told apart), name files by the
    second plus a random suffix with mtimes of jiffy granularity (no arrival order when two
    messages arrive in the same second; measured here), and create each file while the
    transaction is still in progress. This sink stores the DATA bytes exactly as sent (CRLF
    kept, dots unstuffed), numbers messages in arrival order, and writes ``NNNN.eml``
    atomically (tmp + rename) next to ``NNNN.json`` with the envelope, for post-mortems.

    ``data_reply`` set to e.g. ``"451 4.3.0 sink says later"`` makes the sink refuse messages
    (not recorded), so Postfix defers them: a way to fill the deferred queue.
    """

    def __init__(self, directory: Path, host: str = LOOPBACK) -> None:
        self.directory = directory
        self.host = host
        self.port = 0
        self.data_reply: str | None = None
        self._deliveries: list[Delivery] = []
        self._cond = threading.Condition()
        self._server: _SinkServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> SmtpSink:
        """Bind a free port on ``host`` and serve in a daemon thread."""
        self.directory.mkdir(parents=True, exist_ok=True)
        server = _SinkServer((self.host, 0), _SinkHandler)
        server.sink = self
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            daemon=True,
            name=f"smtp-sink-{self.port}",
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def record(self, mail_from: str, rcpt_to: tuple[str, ...], helo: str, data: bytes) -> Delivery:
        """Save one message (called by the SMTP handler) and wake the waiters."""
        with self._cond:
            seq = len(self._deliveries) + 1
            path = self.directory / f"{seq:04d}.eml"
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.rename(path)
            envelope = {"mail_from": mail_from, "rcpt_to": list(rcpt_to), "helo": helo}
            path.with_suffix(".json").write_text(json.dumps(envelope) + "\n")
            delivery = Delivery(seq, mail_from, rcpt_to, helo, data, path)
            self._deliveries.append(delivery)
            self._cond.notify_all()
            return delivery

    def deliveries(self) -> list[Delivery]:
        """Everything received so far, in arrival order."""
        with self._cond:
            return list(self._deliveries)

    def wait(self, n: int, timeout: float) -> list[Delivery] | None:
        """Wait until at least ``n`` messages arrived; all of them, or None on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._deliveries) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return list(self._deliveries)


# --------------------------------------------------------------------------------------------
# SMTP client with an optional PROXY v1 preamble
# --------------------------------------------------------------------------------------------


class _ProxySMTP(smtplib.SMTP):
    """smtplib.SMTP that writes ``proxy_line`` right after connect, before reading the banner."""

    def __init__(self, proxy_line: bytes | None, *, timeout: float, source_ip: str | None) -> None:
        self._proxy_line = proxy_line
        super().__init__(timeout=timeout, source_address=(source_ip, 0) if source_ip else None)
        self.command_encoding = "utf-8"

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((host, port), timeout, self.source_address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._proxy_line is not None:
            sock.sendall(self._proxy_line)
        return sock


def proxy_v1_line(client_ip: str, *, client_port: int = 40000, server_port: int = 25) -> bytes:
    """The HAProxy PROXY protocol v1 header claiming ``client_ip`` (TCP4 or TCP6)."""
    if ":" in client_ip:
        return f"PROXY TCP6 {client_ip} ::1 {client_port} {server_port}\r\n".encode()
    return f"PROXY TCP4 {client_ip} {LOOPBACK} {client_port} {server_port}\r\n".encode()


def wire_form(message: bytes | email.message.Message) -> bytes:
    """Return DATA content for ``message``: CRLF line ends, dots stuffed, ``.`` line appended."""
    if isinstance(message, email.message.Message):
        data = message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
    else:
        data = _EOL.sub(b"\r\n", message)
    data = _LEADING_DOT.sub(b"..", data)
    return _terminate(data)


def _terminate(data: bytes) -> bytes:
    return data + (b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n")


# --------------------------------------------------------------------------------------------
# The Postfix instance
# --------------------------------------------------------------------------------------------

#: Services of the instance (``-o`` overrides of the two listeners are added in front).
#: chroot is ``n`` everywhere: the daemons need the same paths (milter socket, log) as we do.
MASTER_CF_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixInstance:
    """A private Postfix on loopback relaying through ``smtpd_milters`` to an :class:`SmtpSink`.

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``milter_socket`` is in
    Postfix notation (``unix:/run/x/milter.sock``, ``inet:127.0.0.1:8891``) and is set as
    both ``smtpd_milters`` and ``non_smtpd_milters``; None runs without a milter.
    ``milter_macros`` overrides ``milter_*_macros`` parameters by name (Postfix's defaults are
    kept otherwise: ``{daemon_name}`` at connect, ``i`` from DATA on, ``{auth_*}`` at MAIL).
    ``main_cf`` overrides or adds any main.cf parameter last.
    """

    def __init__(
        self,
        milter_socket: str | None = None,
        *,
        milter_default_action: str = "tempfail",
        main_cf: Mapping[str, str] | None = None,
        milter_macros: Mapping[str, str] | None = None,
        milter_protocol: int = 6,
    ) -> None:
        self.milter_socket = milter_socket
        self.milter_default_action = milter_default_action
        self.extra_main_cf = dict(main_cf or {})
        self.milter_macros = dict(milter_macros or {})
        for name in self.milter_macros:
            if not re.fullmatch(r"milter_\w+_macros", name):
                raise ValueError(f"milter_macros: {name!r} is not a milter_*_macros parameter")
        self.milter_protocol = milter_protocol
        self.base: Path | None = None
        self.submit_port = 0
        self.inbound_port = 0
        self._sink: SmtpSink | None = None
        self._master_pid: int | None = None
        self._started = False

    # --- paths ---------------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        if self.base is None:
            raise HarnessError("the Postfix instance is not started")
        return self.base / name

    @property
    def config_dir(self) -> Path:
        """``config_directory``: main.cf and master.cf."""
        return self._dir("config")

    @property
    def queue_dir(self) -> Path:
        """``queue_directory`` of the instance."""
        return self._dir("queue")

    @property
    def data_dir(self) -> Path:
        """``data_directory`` of the instance."""
        return self._dir("data")

    @property
    def log_path(self) -> Path:
        """``maillog_file``: everything the instance logs."""
        return self._dir("log/maillog")

    @property
    def master_pid(self) -> int | None:
        """PID of the instance's ``master`` daemon while it runs."""
        return self._master_pid

    @property
    def sink(self) -> SmtpSink:
        """The delivery sink (``relayhost``)."""
        if self._sink is None:
            raise HarnessError("the Postfix instance is not started")
        return self._sink

    # --- configuration -------------------------------------------------------------------

    def main_cf_settings(self) -> dict[str, str]:
        """The main.cf parameters of the instance (after :meth:`start` chose ports/paths)."""
        base = self._dir("")
        settings = {
            "compatibility_level": "3.6",
            "config_directory": str(self.config_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            # Logging to a file needs the file under a maillog_file_prefixes entry, or
            # `postfix check` exits 1 without a word; postlogd (master.cf) writes it.
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(base / "log"),
            "syslog_name": "postfix-harness",
            "myhostname": MYHOSTNAME,
            "mydomain": "harness.example",
            "myorigin": "$myhostname",
            # Nothing is local: every recipient relays to the sink.
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:local delivery is disabled in the test harness",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": "",
            "relayhost": f"[{LOOPBACK}]:{self.sink.port}",
            "inet_interfaces": "loopback-only",
            # IPv6 on, where loopback has it: smtpd refuses a TCP6 PROXY claim otherwise.
            "inet_protocols": "all" if _ipv6_loopback() else "ipv4",
            "mynetworks": "127.0.0.0/8",
            # The listeners are loopback test ports: accept any relay. smtpd insists on a
            # reject-type restriction being present, hence the unreachable trailing one.
            "smtpd_relay_restrictions": (
                "permit_mynetworks, check_client_access static:OK, reject_unauth_destination"
            ),
            "smtpd_recipient_restrictions": "",
            # No DNS anywhere: no reverse lookups of clients, none for delivery.
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "biff": "no",
            # Speed: no 1 s pause after errors, no inflow throttling, quick retries.
            "smtpd_error_sleep_time": "0",
            "smtpd_soft_error_limit": "100",
            "smtpd_hard_error_limit": "200",
            "in_flow_delay": "0",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "delay_warning_time": "0",
            "smtp_connect_timeout": "5s",
            "smtp_helo_timeout": "10s",
            "smtp_connection_cache_on_demand": "no",
            "smtputf8_enable": "yes",
            "message_size_limit": "52428800",
            # Milters. Timeouts stay below the client's so a hung milter surfaces as a reply.
            "smtpd_milters": self.milter_socket or "",
            "non_smtpd_milters": self.milter_socket or "",
            "milter_default_action": self.milter_default_action,
            "milter_protocol": str(self.milter_protocol),
            "milter_connect_timeout": "5s",
            "milter_command_timeout": "10s",
            "milter_content_timeout": "20s",
        }
        settings.update(self.milter_macros)
        settings.update(self.extra_main_cf)
        return settings

    def _master_cf(self) -> str:
        common = ["-o syslog_name=postfix-harness/$service_name"]
        submit = [*common, "-o milter_macro_daemon_name=ORIGINATING"]
        inbound = [
            *common,
            "-o smtpd_upstream_proxy_protocol=haproxy",
            "-o smtpd_upstream_proxy_timeout=5s",
            "-o milter_macro_daemon_name=INBOUND",
        ]
        lines = []
        for port, opts in ((self.submit_port, submit), (self.inbound_port, inbound)):
            lines.append(f"{LOOPBACK}:{port} inet n - n - - smtpd")
            lines.extend(f"  {opt}" for opt in opts)
        return "\n".join(lines) + "\n" + MASTER_CF_SERVICES

    def _write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        main = "".join(f"{k} = {v}\n" for k, v in self.main_cf_settings().items())
        (self.config_dir / "main.cf").write_text(main)
        (self.config_dir / "master.cf").write_text(self._master_cf())
        # Postfix re-reads a table file (main.cf too) in 300 ms steps until its mtime is in
        # the past, against a concurrent editor: fresh files cost ~2.5 s per `postfix` command.
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))

    # --- process control -----------------------------------------------------------------

    def _run(self, *argv: str, timeout: float = COMMAND_TIMEOUT) -> tuple[int, str]:
        """Run a Postfix command; return its exit code and stdout, then stderr.

        stdout goes to a file (a daemon that inherits a pipe would hold it open), stderr to a
        pseudo-terminal: Postfix commands print their errors only when stderr is a tty
        (otherwise they go to the log, which a broken main.cf never reaches).
        """
        out_path = self._dir("commands.out")
        tty_master, tty_slave = pty.openpty()
        try:
            with out_path.open("a+b") as out:
                start = out.seek(0, os.SEEK_END)
                try:
                    proc = subprocess.run(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=tty_slave,
                        timeout=timeout,
                        check=False,
                    )
                except subprocess.TimeoutExpired as exc:
                    raise HarnessError(f"{' '.join(argv)} did not finish in {timeout}s") from exc
                out.seek(start)
                text = out.read().decode("utf-8", "replace")
            os.close(tty_slave)
            tty_slave = -1
            text += _drain(tty_master).replace("\r\n", "\n")
        finally:
            os.close(tty_master)
            if tty_slave >= 0:
                os.close(tty_slave)
        return proc.returncode, text

    def start(self) -> PostfixInstance:
        """Write the configuration, ``postfix check`` it, start the sink and Postfix.

        :raises HarnessError: Postfix is missing, ``check`` or ``start`` fails (with output).
        """
        if self._started:
            return self
        for path in (POSTFIX, POSTQUEUE):
            if not Path(path).exists():
                raise HarnessError(POSTFIX_MISSING.format(path=path))
        self.base = Path(tempfile.mkdtemp(prefix="authmilter-postfix-"))
        self.base.chmod(0o755)  # postfix daemons must traverse it
        self._started = True
        try:
            # queue_directory must exist (root-owned); `postfix check` creates its subdirectories
            # with the right owners, and data_directory (owned by postfix) too.
            for name in ("log", "queue"):
                self._dir(name).mkdir()
            self._sink = SmtpSink(self._dir("sink")).start()
            self.submit_port = free_port()
            self.inbound_port = free_port()
            while self.inbound_port == self.submit_port:
                self.inbound_port = free_port()
            self._write_config()
            conf = str(self.config_dir)
            code, out = self._run(POSTFIX, "-c", conf, "check")
            if code != 0:
                # The reason is on stderr (a tty, see _run) or, once logging works, in the log.
                raise HarnessError(
                    f"postfix -c {conf} check failed (exit {code}):\n{out}\n{self.log_tail()}"
                )
            code, out = self._run(POSTFIX, "-c", conf, "start")
            if code != 0:
                raise HarnessError(
                    f"postfix -c {conf} start failed (exit {code}):\n{out}\n{self.log_tail()}"
                )
            self._master_pid = self._read_master_pid()
            self._wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def _read_master_pid(self, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while (pid := self._master_pid_now()) is None or not _pid_alive(pid):
            if time.monotonic() > deadline:
                raise HarnessError(f"Postfix master is not running (pid {pid})\n{self.log_tail()}")
            time.sleep(0.02)
        return pid

    def _wait_listening(self, timeout: float = 10.0) -> None:
        # `postfix start` returns once master is initialized, listeners bound; check anyway,
        # from /proc (a probe connection would start an smtpd and log a haproxy warning).
        deadline = time.monotonic() + timeout
        wanted = {self.submit_port, self.inbound_port}
        while not wanted <= _listening_ports():
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"Postfix does not listen on {LOOPBACK} ports {sorted(wanted)}\n"
                    + self.log_tail()
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop Postfix and the sink, SIGKILL leftover processes by pid, remove the files.

        Safe to call more than once and after a failed :meth:`start`.
        """
        if not self._started:
            return
        self._started = False
        try:
            master = self._master_pid or self._master_pid_now()
            pids = process_tree([master]) if master and _pid_alive(master) else []
            if pids:
                # `postfix stop` sends master SIGTERM, then polls `master -t` with `sleep 1`
                # between tries: a whole second whenever master is not gone at once. `postfix
                # abort` sends the same SIGTERM (master then ends its children) without that
                # loop; the wait below polls at 20 ms and SIGKILLs what is left by pid.
                with contextlib.suppress(HarnessError, OSError):
                    self._run(POSTFIX, "-c", str(self.config_dir), "abort", timeout=STOP_TIMEOUT)
            deadline = time.monotonic() + STOP_TIMEOUT
            while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.02)
            for pid in pids:
                if _pid_alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        finally:
            self._master_pid = None
            if self._sink is not None:
                self._sink.stop()
            if self.base is not None and not os.environ.get(KEEP_ENV):
                shutil.rmtree(self.base, ignore_errors=True)

    def _master_pid_now(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, HarnessError):
            return int((self.queue_dir / "pid" / "master.pid").read_text().strip())
        return None

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- sending ---------------------------------------------------------------------------

    def port_number(self, port: Port) -> int:
        """The TCP port of the ``submit`` or ``inbound`` listener."""
        if port == "submit":
            return self.submit_port
        if port == "inbound":
            return self.inbound_port
        raise ValueError(f"port must be 'submit' or 'inbound', not {port!r}")

    def send(
        self,
        message: bytes | email.message.Message,
        *,
        mail_from: str,
        rcpt_to: Sequence[str],
        port: Port = "submit",
        client_ip: str | None = None,
        helo: str = "client.example",
        mail_options: Sequence[str] = (),
        timeout: float = SMTP_TIMEOUT,
    ) -> tuple[int, str]:
        """Send ``message`` through one SMTP transaction; return the reply to the final dot.

        Bytes get CRLF line ends (bare LF/CR converted) and dot-stuffing; an ``EmailMessage``
        is serialized with ``linesep="\\r\\n"``. On ``inbound`` the PROXY line claims
        ``client_ip`` (default :data:`DEFAULT_INBOUND_CLIENT`; IPv6 is sent as TCP6); on
        ``submit`` a ``client_ip`` in 127.0.0.0/8 becomes the connection's source address.
        ``mail_from`` is the bare address (``""`` for the null sender).

        :raises SmtpRejected: (:class:`SmtpTempfail` / :class:`SmtpPermfail`) any 4xx/5xx.
        :raises SmtpConnectionLost: Postfix hung up or timed out.
        """
        return self._transact(
            wire_form(message),
            mail_from=mail_from,
            rcpt_to=rcpt_to,
            port=port,
            client_ip=client_ip,
            helo=helo,
            mail_options=mail_options,
            timeout=timeout,
        )

    def send_raw(
        self,
        wire_data: bytes,
        *,
        mail_from: str,
        rcpt_to: Sequence[str],
        port: Port = "submit",
        client_ip: str | None = None,
        helo: str = "client.example",
        mail_options: Sequence[str] = (),
        timeout: float = SMTP_TIMEOUT,
    ) -> tuple[int, str]:
        """Like :meth:`send`, but write ``wire_data`` after ``354`` verbatim.

        No line-end conversion and no dot-stuffing (the caller writes the wire form); only the
        end marker is appended: ``.\\r\\n``, preceded by ``\\r\\n`` unless ``wire_data``
        already ends with it.
        """
        return self._transact(
            _terminate(wire_data),
            mail_from=mail_from,
            rcpt_to=rcpt_to,
            port=port,
            client_ip=client_ip,
            helo=helo,
            mail_options=mail_options,
            timeout=timeout,
        )

    def _transact(
        self,
        payload: bytes,
        *,
        mail_from: str,
        rcpt_to: Sequence[str],
        port: Port,
        client_ip: str | None,
        helo: str,
        mail_options: Sequence[str],
        timeout: float,
    ) -> tuple[int, str]:
        if isinstance(rcpt_to, str):
            raise TypeError("rcpt_to is a list of addresses, not one string")
        number = self.port_number(port)
        proxy: bytes | None = None
        source_ip: str | None = None
        if port == "inbound":
            proxy = proxy_v1_line(client_ip or DEFAULT_INBOUND_CLIENT, server_port=number)
        elif client_ip is not None:
            if not client_ip.startswith("127."):
                raise ValueError(
                    f"submit port: client_ip {client_ip} is not loopback; "
                    "claim outside addresses on the inbound port"
                )
            source_ip = client_ip
        stage: Stage = "connect"
        smtp = _ProxySMTP(proxy, timeout=timeout, source_ip=source_ip)
        try:
            code, msg = smtp.connect(LOOPBACK, number)
            _check(stage, code, msg, (220,))
            stage = "helo"
            code, msg = smtp.ehlo(helo)
            _check(stage, code, msg, (250,))
            stage = "mail"
            params = "".join(f" {opt}" for opt in mail_options)
            code, msg = smtp.docmd("MAIL", f"FROM:<{mail_from}>{params}")
            _check(stage, code, msg, (250,))
            stage = "rcpt"
            for rcpt in rcpt_to:
                code, msg = smtp.docmd("RCPT", f"TO:<{rcpt}>")
                _check(stage, code, msg, (250, 251))
            stage = "data"
            code, msg = smtp.docmd("DATA")
            _check(stage, code, msg, (354,))
            smtp.send(payload)
            code, msg = smtp.getreply()
            _check(stage, code, msg, (250,))
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.docmd("QUIT")
            return code, msg.decode("utf-8", "replace")
        except SmtpRejected:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.docmd("QUIT")
            raise
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            raise SmtpConnectionLost(stage, str(exc) or type(exc).__name__) from exc
        finally:
            smtp.close()

    # --- deliveries ------------------------------------------------------------------------

    def deliveries(self) -> list[Delivery]:
        """Everything the sink received so far, in arrival order (with envelopes)."""
        return self.sink.deliveries()

    def delivered(self) -> list[bytes]:
        """The raw messages the sink received so far, in arrival order."""
        return [d.data for d in self.sink.deliveries()]

    def wait_delivered(self, n: int, timeout: float = 10.0) -> list[bytes]:
        """Wait until at least ``n`` messages reached the sink; return all of them, in order.

        The list has every message delivered so far (possibly more than ``n``), each the raw
        bytes (headers and body, CRLF) as Postfix delivered them.

        :raises HarnessTimeout: fewer than ``n`` arrived in ``timeout`` seconds; the message
            has the queue and the tail of the Postfix log.
        """
        got = self.sink.wait(n, timeout)
        if got is None:
            have = len(self.sink.deliveries())
            raise HarnessTimeout(
                f"{have} of {n} message(s) delivered to the sink after {timeout}s\n"
                f"queue: {self._queue_summary()}\n{self.log_tail()}"
            )
        return [d.data for d in got]

    # --- queue -----------------------------------------------------------------------------

    def queue_json(self) -> list[dict[str, Any]]:
        """``postqueue -j``: one dict per queued message (``queue_name``: hold/deferred/…)."""
        code, out = self._postqueue("-j")
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def held(self) -> list[dict[str, Any]]:
        """Messages in the hold queue (milter ``quarantine``)."""
        return [m for m in self.queue_json() if m.get("queue_name") == "hold"]

    def deferred(self) -> list[dict[str, Any]]:
        """Messages in the deferred queue."""
        return [m for m in self.queue_json() if m.get("queue_name") == "deferred"]

    def flush(self) -> None:
        """``postqueue -f``: retry deferred mail now."""
        self._postqueue("-f")

    def release_held(self) -> None:
        """``postsuper -H ALL``: move held messages back to the queue for delivery."""
        code, out = self._run(POSTSUPER, "-c", str(self.config_dir), "-H", "ALL")
        if code != 0:
            raise HarnessError(f"postsuper -H ALL failed (exit {code}): {out}")

    def wait_queue(
        self,
        predicate: Callable[[list[dict[str, Any]]], bool],
        *,
        timeout: float = 10.0,
        what: str = "the expected queue state",
    ) -> list[dict[str, Any]]:
        """Poll :meth:`queue_json` until ``predicate(queue)``; return that queue.

        :raises HarnessTimeout: not reached in ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            queue = self.queue_json()
            if predicate(queue):
                return queue
            if time.monotonic() > deadline:
                raise HarnessTimeout(
                    f"{what} not reached after {timeout}s; queue: {queue}\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _postqueue(self, *args: str) -> tuple[int, str]:
        # postqueue -j prints JSON on stdout; with stdout going to our file, read it back.
        code, out = self._run(POSTQUEUE, "-c", str(self.config_dir), *args)
        if code != 0:
            raise HarnessError(f"postqueue {' '.join(args)} failed (exit {code}): {out}")
        return code, out

    def _queue_summary(self) -> str:
        try:
            queue = self.queue_json()
        except HarnessError as exc:
            return f"(postqueue failed: {exc})"
        if not queue:
            return "empty"
        return "; ".join(
            f"{m.get('queue_id')} {m.get('queue_name')} "
            + ",".join(str(r.get("delay_reason", "")) for r in m.get("recipients", []))
            for m in queue
        )

    # --- log -------------------------------------------------------------------------------

    def log(self) -> str:
        """The instance's whole mail log so far (postlogd writes it a moment after events)."""
        try:
            return self.log_path.read_text("utf-8", "replace")
        except (OSError, HarnessError):
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log, headed for inclusion in failure messages."""
        tail = self.log().splitlines()[-lines:]
        return "--- Postfix log (tail) ---\n" + "\n".join(tail)

    def wait_log(self, pattern: str, *, timeout: float = 10.0) -> re.Match[str]:
        """Wait until a log line matches the regular expression ``pattern``; return the match.

        :raises HarnessTimeout: no match in ``timeout`` seconds.
        """
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log())
            if match:
                return match
            if time.monotonic() > deadline:
                raise HarnessTimeout(
                    f"no log line matches {pattern!r} after {timeout}s\n" + self.log_tail()
                )
            time.sleep(0.05)


def _check(stage: Stage, code: int, msg: bytes, ok: tuple[int, ...]) -> None:
    if code in ok:
        return
    text = msg.decode("utf-8", "replace")
    if code == -1:
        raise SmtpConnectionLost(stage, text or "no reply")
    raise SmtpRejected.make(stage, code, text)


# --------------------------------------------------------------------------------------------
# pytest fixtures
# --------------------------------------------------------------------------------------------


class PostfixStarter(Protocol):
    """The callable :func:`postfix_factory` yields: the :class:`PostfixInstance` parameters."""

    def __call__(
        self,
        milter_socket: str | None = None,
        *,
        milter_default_action: str = "tempfail",
        main_cf: Mapping[str, str] | None = None,
        milter_macros: Mapping[str, str] | None = None,
        milter_protocol: int = 6,
    ) -> PostfixInstance: ...


@contextlib.contextmanager
def _starter() -> Iterator[PostfixStarter]:
    require_postfix()
    started: list[PostfixInstance] = []

    def start(milter_socket: str | None = None, **kwargs: Any) -> PostfixInstance:
        instance = PostfixInstance(milter_socket, **kwargs)
        started.append(instance)
        try:
            return instance.start()
        except HarnessError as exc:
            pytest.fail(f"cannot start Postfix for the test: {exc}", pytrace=False)

    try:
        yield start
    finally:
        for instance in reversed(started):
            instance.stop()


@pytest.fixture()
def postfix_factory() -> Iterator[PostfixStarter]:
    """Start private Postfix instances (:class:`PostfixInstance` parameters); all stopped after.

    Usage: ``pf = postfix_factory(f"unix:{milter_socket_dir / 'm.sock'}")``, then
    ``pf.send(msg, mail_from=…, rcpt_to=[…], port="inbound")`` and ``pf.wait_delivered(1)``.
    """
    with _starter() as start:
        yield start


@pytest.fixture(scope="module")
def postfix_factory_module() -> Iterator[PostfixStarter]:
    """Like :func:`postfix_factory`, but the instances live until the end of the test module."""
    with _starter() as start:
        yield start


@pytest.fixture()
def milter_socket_dir() -> Iterator[Path]:
    """A fresh 0755 directory (under /run) for a milter's ``unix:`` socket; removed after."""
    path = new_socket_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
