"""Real DNS for tests: a private NSD on loopback, a black-hole server, and zone-text helpers.

:class:`NsdServer` starts Debian's ``/usr/sbin/nsd`` in the foreground (``-d``) with its own
configuration, zone files, pid file and log in a temporary directory, on 127.0.0.1 and a free
high port (UDP and TCP). :class:`BlackholeDns` binds the same kind of port and never answers,
which is how a test produces a resolver timeout. :class:`ScriptedDns` answers from a handler;
:class:`FaultyDns` relays to a real server (NSD) and breaks the answers a test names: slow,
dropped, SERVFAIL/REFUSED, truncated with or without a TCP answer, malformed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

NSD = "/usr/sbin/nsd"
NSD_CHECKCONF = "/usr/sbin/nsd-checkconf"
NSD_MISSING = (
    "NSD is not installed ({path} missing): run `make test`, which installs the Debian packages "
    "the test suite drives (nsd, opendkim-tools, postfix …)"
)
LOOPBACK = "127.0.0.1"
START_TIMEOUT = 10.0

#: A record as ``(owner, type, rdata)``; owner relative to the origin, ``@`` for the apex.
Record = tuple[str, str, str]


class DnsServerError(RuntimeError):
    """The test DNS server could not be configured or started."""


def txt_rdata(text: str | bytes) -> str:
    """Return zone-file rdata for one TXT record holding ``text``: quoted ≤255-byte strings.

    ``"`` and ``\\`` are escaped, bytes outside printable ASCII become ``\\DDD``.
    """
    data = text.encode("utf-8") if isinstance(text, str) else text
    chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
    parts = []
    for chunk in chunks:
        escaped = "".join(
            "\\" + chr(b) if chr(b) in '"\\' else chr(b) if 0x20 <= b < 0x7F else f"\\{b:03d}"
            for b in chunk
        )
        parts.append(f'"{escaped}"')
    return " ".join(parts)


def make_zone(
    origin: str,
    records: Iterable[Record] | Mapping[str, Sequence[tuple[str, str]]] = (),
    *,
    ttl: int = 300,
    negative_ttl: int = 60,
    raw: str = "",
) -> str:
    """Build zone-file text for ``origin``: SOA, NS and glue, then ``records``, then ``raw``.

    ``records`` is a list of ``(owner, type, rdata)`` or a dict ``{owner: [(type, rdata)]}``;
    ``raw`` is appended verbatim (e.g. the ``.txt`` file opendkim-genkey or our ``genkey``
    writes). ``negative_ttl`` is the SOA MINIMUM field (RFC 2308 negative-caching TTL).
    """
    origin = origin.rstrip(".") + "."
    lines = [
        f"$ORIGIN {origin}",
        f"$TTL {ttl}",
        f"@ IN SOA ns.{origin} hostmaster.{origin} ( 1 3600 600 86400 {negative_ttl} )",
        f"@ IN NS ns.{origin}",
        f"ns IN A {LOOPBACK}",
    ]
    items: Iterable[Record]
    if isinstance(records, Mapping):
        items = [(owner, rtype, rdata) for owner, rrs in records.items() for rtype, rdata in rrs]
    else:
        items = records
    for owner, rtype, rdata in items:
        lines.append(f"{owner}\tIN\t{rtype}\t{rdata}")
    text = "\n".join(lines) + "\n"
    if raw:
        text += raw if raw.endswith("\n") else raw + "\n"
    return text


def _free_port() -> int:
    """Return a loopback port that is free for both UDP and TCP right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LOOPBACK, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    raise DnsServerError("no free loopback port for UDP and TCP")


class NsdServer:
    """A private NSD serving ``zones`` (``{origin: zone_text}``) on 127.0.0.1:<port>.

    Use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(self, zones: Mapping[str, str], *, workdir: str | os.PathLike[str] | None = None):
        self.zones = {origin.rstrip(".").lower(): text for origin, text in zones.items()}
        if not self.zones:
            raise ValueError("NsdServer needs at least one zone")
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="nsd-"))
        self.host = LOOPBACK
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    # -- paths and text --------------------------------------------------------------------
    @property
    def conf_path(self) -> Path:
        return self.dir / "nsd.conf"

    @property
    def log_path(self) -> Path:
        return self.dir / "nsd.log"

    @property
    def pid_path(self) -> Path:
        return self.dir / "nsd.pid"

    @property
    def nameserver(self) -> str:
        """The spec for :class:`authmilter.resolver.Resolver`: ``127.0.0.1:<port>``."""
        return f"{self.host}:{self.port}"

    def log(self) -> str:
        """Return NSD's log so far (empty when there is none)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _config_text(self) -> str:
        d = self.dir
        server = [
            "server:",
            f"    ip-address: {self.host}",
            f"    port: {self.port}",
            "    do-ip4: yes",
            "    do-ip6: no",
            '    username: ""',
            '    chroot: ""',
            f'    zonesdir: "{d}"',
            f'    pidfile: "{self.pid_path}"',
            f'    logfile: "{self.log_path}"',
            '    database: ""',
            f'    zonelistfile: "{d / "zone.list"}"',
            f'    xfrdfile: "{d / "xfrd.state"}"',
            f'    xfrdir: "{d / "xfr"}"',
            "    server-count: 1",
            "    reuseport: no",
            "    verbosity: 2",
            "    hide-version: yes",
            "    rrl-ratelimit: 0",
            "    rrl-whitelist-ratelimit: 0",
            "remote-control:",
            "    control-enable: no",
        ]
        zones = []
        for origin in self.zones:
            zones += ["zone:", f'    name: "{origin}"', f'    zonefile: "{origin}.zone"']
        return "\n".join(server + zones) + "\n"

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> NsdServer:
        """Write the config and zones, check them, start NSD and wait until it answers.

        :raises DnsServerError: NSD is missing, the config or a zone is rejected, or NSD did
            not answer a SOA query within :data:`START_TIMEOUT` (the message carries its log).
        """
        for tool in (NSD, NSD_CHECKCONF):
            if not os.access(tool, os.X_OK):
                raise DnsServerError(NSD_MISSING.format(path=tool))
        (self.dir / "xfr").mkdir(parents=True, exist_ok=True)
        for origin, text in self.zones.items():
            (self.dir / f"{origin}.zone").write_text(text)
        last_error = ""
        for _attempt in range(3):
            self.port = _free_port()
            self.conf_path.write_text(self._config_text())
            check = subprocess.run(
                [NSD_CHECKCONF, str(self.conf_path)], capture_output=True, text=True, check=False
            )
            if check.returncode != 0:
                raise DnsServerError(
                    f"nsd-checkconf rejected {self.conf_path}:\n{check.stdout}{check.stderr}\n"
                    f"--- config ---\n{self.conf_path.read_text()}"
                )
            with open(self.dir / "nsd.stdout", "ab") as out:
                self.process = subprocess.Popen(
                    [NSD, "-d", "-c", str(self.conf_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                self._wait_ready()
                return self
            except DnsServerError as exc:
                last_error = str(exc)
                self.stop()
                if "address already in use" not in last_error.lower():
                    break
        raise DnsServerError(last_error)

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        origin = next(iter(self.zones))
        query = dns.message.make_query(origin + ".", dns.rdatatype.SOA)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DnsServerError(
                    f"nsd exited with status {self.process.returncode} while starting\n"
                    f"{self._diagnostics()}"
                )
            try:
                response = dns.query.udp(query, self.host, port=self.port, timeout=0.2)
            except (dns.exception.Timeout, OSError):
                time.sleep(0.05)
                continue
            if response.rcode() == dns.rcode.NOERROR and response.answer:
                return
            if response.rcode() == dns.rcode.SERVFAIL:
                # NSD answers SERVFAIL for a zone it failed to load.
                raise DnsServerError(f"nsd did not load zone {origin}:\n{self._diagnostics()}")
            time.sleep(0.05)
        raise DnsServerError(
            f"nsd did not answer SOA {origin} on {self.nameserver} within {START_TIMEOUT:g}s\n"
            f"{self._diagnostics()}"
        )

    def _diagnostics(self) -> str:
        stdout = self.dir / "nsd.stdout"
        text = stdout.read_text(errors="replace") if stdout.exists() else ""
        return f"--- nsd log ({self.log_path}) ---\n{self.log()}--- nsd output ---\n{text}"

    def stop(self) -> None:
        """Stop NSD (SIGTERM to its pid, SIGKILL after 5 s); safe to call twice."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            # NSD's children are in its session: kill that group, which is ours alone.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)

    def cleanup(self) -> None:
        """Stop and remove the working directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NsdServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def _bind_udp_and_tcp(host: str, backlog: int,
                      what: str) -> tuple[int, socket.socket, socket.socket]:  # fmt: skip
    """A UDP and a listening TCP socket on one free port of ``host``: ``(port, udp, tcp)``.

    :raises DnsServerError: no port could be bound.
    """
    for _ in range(20):
        port = _free_port()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            udp.bind((host, port))
            tcp.bind((host, port))
            tcp.listen(backlog)
        except OSError:
            udp.close()
            tcp.close()
            continue
        return port, udp, tcp
    raise DnsServerError(f"could not bind a {what} DNS port on loopback")


class BlackholeDns:
    """A loopback "nameserver" that takes queries over UDP and TCP and never answers.

    :meth:`received` lists the UDP queries that reached it, so a test can count what was
    asked instead of timing how long the asking took.
    """

    def __init__(self) -> None:
        self.host = LOOPBACK
        self.port = 0
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._received: list[SeenQuery] = []

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> BlackholeDns:
        """Bind the sockets. UDP datagrams queue unread; TCP handshakes complete in the backlog.

        :raises DnsServerError: no port could be bound.
        """
        self.port, self._udp, self._tcp = _bind_udp_and_tcp(self.host, 64, "black-hole")
        return self

    def received(self) -> list[SeenQuery]:
        """The UDP queries that arrived so far, in order (TCP connections are not counted).

        The datagrams wait unread in the socket's queue until this reads them off (still
        unanswered); on loopback a datagram is queued when the sender's ``sendto`` returns, so
        every query a finished lookup sent is here. Unparsable datagrams are listed with an
        empty name and type.
        """
        udp = self._udp
        if udp is not None:
            while True:
                try:
                    data = udp.recv(65_535, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                try:
                    question = dns.message.from_wire(data).question[0]
                except (dns.exception.DNSException, IndexError):
                    self._received.append(SeenQuery("", "", False))
                    continue
                name, rdtype = _key(question.name.to_text(),
                                    dns.rdatatype.to_text(question.rdtype))  # fmt: skip
                self._received.append(SeenQuery(name, rdtype, False))
        return list(self._received)

    def stop(self) -> None:
        """Close the sockets."""
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = None

    def __enter__(self) -> BlackholeDns:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ScriptedDns:
    """A loopback "nameserver" (UDP and TCP) whose replies come from a handler.

    ``handler(query_wire, over_tcp) -> bytes | None`` gives the reply for each query; ``None``
    drops it. This serves what NSD will not: SERVFAIL, truncation, malformed packets.
    ``queries`` counts the queries received, over both transports.
    """

    def __init__(self, handler: Callable[[bytes, bool], bytes | None]) -> None:
        self.handler = handler
        self.host = LOOPBACK
        self.port = 0
        self.queries = 0
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> ScriptedDns:
        """Bind UDP and TCP on one free port and serve from two threads.

        :raises DnsServerError: no port could be bound.
        """
        self.port, udp, tcp = _bind_udp_and_tcp(self.host, 16, "scripted")
        udp.settimeout(0.05)
        tcp.settimeout(0.05)
        self._udp, self._tcp = udp, tcp
        for target in (self._serve_udp, self._serve_tcp):
            thread = threading.Thread(target=target, name="scripted-dns", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    #: Handle each query in its own thread, so that a slow reply holds up no other query.
    threaded = False
    #: How long a TCP connection may take to send its query (and, for a dropped query, how
    #: long it is held open unanswered).
    tcp_timeout = 2.0

    def _dispatch(self, target: Callable[..., None], *args: object) -> None:
        if self.threaded:
            threading.Thread(target=target, args=args, daemon=True).start()
        else:
            target(*args)

    def _serve_udp(self) -> None:
        assert self._udp is not None
        udp = self._udp
        while not self._stopping.is_set():
            try:
                data, peer = udp.recvfrom(65_535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.queries += 1
            self._dispatch(self._udp_one, udp, data, peer)

    def _udp_one(self, udp: socket.socket, data: bytes, peer: tuple[str, int]) -> None:
        reply = self.handler(data, False)
        if reply is not None:
            with contextlib.suppress(OSError):
                udp.sendto(reply, peer)

    def _serve_tcp(self) -> None:
        assert self._tcp is not None
        while not self._stopping.is_set():
            try:
                conn, _peer = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._dispatch(self._tcp_one, conn)

    def _tcp_one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(self.tcp_timeout)
            try:
                length = int.from_bytes(_recv_exactly(conn, 2), "big")
                data = _recv_exactly(conn, length)
            except (OSError, EOFError):
                return
            self.queries += 1
            reply = self.handler(data, True)
            if reply is None:
                self._unanswered(conn, data)
                return
            with contextlib.suppress(OSError):
                conn.sendall(len(reply).to_bytes(2, "big") + reply)

    def _unanswered(self, conn: socket.socket, data: bytes) -> None:
        """A TCP query the handler gave no reply: the connection is closed at once."""

    def stop(self) -> None:
        """Stop serving and close the sockets."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=5)
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = None
        self._threads = []

    def __enter__(self) -> ScriptedDns:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return data


def rcode_reply(rcode: dns.rcode.Rcode) -> Callable[[bytes, bool], bytes | None]:
    """A :class:`ScriptedDns` handler answering every query with ``rcode``."""

    def handler(wire: bytes, over_tcp: bool) -> bytes | None:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        response.set_rcode(rcode)
        return response.to_wire()

    return handler


def truncated_then_garbage(wire: bytes, over_tcp: bool) -> bytes | None:
    """A :class:`ScriptedDns` handler: UDP says "truncated, use TCP"; TCP sends a broken packet.

    dnspython drops unparsable UDP datagrams as possible spoofs (they end as a timeout), so a
    malformed answer has to come over TCP to be seen as malformed.
    """
    query = dns.message.from_wire(wire)
    if not over_tcp:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.TC
        return response.to_wire()
    # Same id, QR set, NOERROR, QDCOUNT=1 ANCOUNT=1, then a question cut short.
    return wire[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\x03ab"


# -- faults in front of a real server -------------------------------------------------------------


class FaultKind(StrEnum):
    """What :class:`FaultyDns` does to a query it has a :class:`Fault` for."""

    SLOW = "slow"  # forward, then answer after ``seconds``
    DROP = "drop"  # never answer (UDP and TCP)
    RCODE = "rcode"  # answer with ``rcode`` and nothing else (SERVFAIL, REFUSED …)
    TRUNCATE = "truncate"  # UDP: empty answer with TC; TCP: forward, or close when not tcp_ok
    MALFORMED = "malformed"  # UDP: TC; TCP: a packet cut short in its question
    NO_TCP = "no-tcp"  # UDP: forward as is (NSD sets TC when it does not fit); TCP: close


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault of :class:`FaultyDns`; build it with the class methods."""

    kind: FaultKind
    seconds: float = 0.0
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR
    tcp_ok: bool = True

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        return cls(FaultKind.SLOW, seconds=seconds)

    @classmethod
    def drop(cls) -> Fault:
        return cls(FaultKind.DROP)

    @classmethod
    def answer(cls, rcode: dns.rcode.Rcode) -> Fault:
        return cls(FaultKind.RCODE, rcode=rcode)

    @classmethod
    def truncated(cls, *, tcp_ok: bool) -> Fault:
        return cls(FaultKind.TRUNCATE, tcp_ok=tcp_ok)

    @classmethod
    def malformed(cls) -> Fault:
        return cls(FaultKind.MALFORMED)

    @classmethod
    def no_tcp(cls) -> Fault:
        return cls(FaultKind.NO_TCP)


@dataclass(frozen=True, slots=True)
class SeenQuery:
    """A query :class:`FaultyDns` received: name (lower case, no final dot), type, transport."""

    name: str
    rdtype: str
    tcp: bool


def _key(name: str, rdtype: str) -> tuple[str, str]:
    return name.lower().rstrip("."), rdtype.upper()


class FaultyDns(ScriptedDns):
    """A loopback nameserver that relays to ``upstream`` (e.g. NSD) and breaks chosen answers.

    Each query is relayed byte for byte over the transport it came on (UDP to UDP, TCP to TCP),
    so the upstream's truncation reaches the client unchanged. A query whose ``(name, type)``
    has a :class:`Fault` in :attr:`faults` gets that fault instead. Every query is handled in
    its own thread: a slow answer never holds up the next query. :attr:`seen` lists the
    queries received, in order.
    """

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.faults: dict[tuple[str, str], Fault] = {}
        self.seen: list[SeenQuery] = []
        self._seen_lock = threading.Lock()
        super().__init__(self._answer)

    def set_faults(self, faults: Mapping[tuple[str, str], Fault]) -> None:
        """Replace the faults (keys ``(name, type)``, any case and final dot) and forget
        :attr:`seen`."""
        with self._seen_lock:
            self.faults = {_key(name, rdtype): fault for (name, rdtype), fault in faults.items()}
            self.seen = []

    def count(self, name: str, rdtype: str, *, tcp: bool | None = None) -> int:
        """How many queries for ``name``/``rdtype`` arrived (over TCP only, UDP only, or any)."""
        wanted = _key(name, rdtype)
        with self._seen_lock:
            return sum(1 for q in self.seen if (q.name, q.rdtype) == wanted
                       and (tcp is None or q.tcp == tcp))  # fmt: skip

    # -- serving -----------------------------------------------------------------------------

    threaded = True
    tcp_timeout = 5.0

    def _unanswered(self, conn: socket.socket, data: bytes) -> None:
        if self._fault_for(data) == FaultKind.DROP:
            # Dropped: hold the connection, silent, until the client gives up.
            with contextlib.suppress(OSError):
                conn.recv(1)

    def _fault_for(self, wire: bytes) -> FaultKind | None:
        try:
            question = dns.message.from_wire(wire).question[0]
        except (dns.exception.DNSException, IndexError):
            return None
        fault = self.faults.get(_key(question.name.to_text(), dns.rdatatype.to_text(
            question.rdtype)))  # fmt: skip
        return fault.kind if fault else None

    def _answer(self, wire: bytes, over_tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
            question = query.question[0]
        except (dns.exception.DNSException, IndexError):
            return None
        key = _key(question.name.to_text(), dns.rdatatype.to_text(question.rdtype))
        with self._seen_lock:
            self.seen.append(SeenQuery(key[0], key[1], over_tcp))
            fault = self.faults.get(key)
        if fault is None:
            return self._relay(wire, over_tcp)
        if fault.kind is FaultKind.SLOW:
            reply = self._relay(wire, over_tcp)
            time.sleep(fault.seconds)
            return reply
        if fault.kind is FaultKind.DROP:
            return None
        if fault.kind is FaultKind.RCODE:
            return rcode_reply(fault.rcode)(wire, over_tcp)
        if fault.kind is FaultKind.TRUNCATE:
            if not over_tcp:
                response = dns.message.make_response(query)
                response.flags |= dns.flags.TC
                return response.to_wire()
            return self._relay(wire, over_tcp) if fault.tcp_ok else None
        if fault.kind is FaultKind.MALFORMED:
            return truncated_then_garbage(wire, over_tcp)
        # NO_TCP: UDP as the upstream answers it; the TCP connection is closed unanswered.
        return None if over_tcp else self._relay(wire, over_tcp)

    def _relay(self, wire: bytes, over_tcp: bool) -> bytes | None:
        """Send ``wire`` to the upstream over the same transport; its reply, or None."""
        try:
            if over_tcp:
                with socket.create_connection(self.upstream, timeout=3) as up:
                    up.sendall(len(wire).to_bytes(2, "big") + wire)
                    length = int.from_bytes(_recv_exactly(up, 2), "big")
                    return _recv_exactly(up, length)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
                up.settimeout(3)
                up.sendto(wire, self.upstream)
                data, _ = up.recvfrom(65_535)
                return data
        except (OSError, EOFError):
            return None

    def __enter__(self) -> FaultyDns:
        self.start()
        return self


def cname_loop(owner: str, partner: str) -> list[Record]:
    """Zone records making ``owner`` and ``partner`` CNAMEs of each other (a loop NSD serves)."""
    return [(owner, "CNAME", partner), (partner, "CNAME", owner)]
