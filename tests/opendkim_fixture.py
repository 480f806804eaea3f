"""A real OpenDKIM milter (Debian's ``/usr/sbin/opendkim`` 2.11) as a test fixture.

:class:`OpenDkim` writes an ``opendkim.conf`` (and KeyTable, SigningTable and an Unbound
configuration) into a fresh 0755 directory under /run, starts ``opendkim -x CONF -f`` in the
foreground on a ``local:`` socket that user ``postfix`` can reach, and stops it by pid.

DNS. Debian's OpenDKIM is built with libunbound (``opendkim -V`` lists ``USE_UNBOUND``): it
does not use /etc/resolv.conf's stub resolver but resolves recursively from the root. What
points it at a private NSD on 127.0.0.1:<port> (measured with Debian's 2.11.0~beta2 and
libunbound 1.17.1) is ``ResolverConfiguration <file>`` naming an unbound.conf with a
``stub-zone`` per test domain, ``stub-addr: 127.0.0.1@<port>`` (:func:`unbound_config`).

* ``do-not-query-localhost: no`` is *not* needed for an explicit stub address (measured).
* ``Nameservers 127.0.0.1@<port>`` works too (OpenDKIM hands each entry to libunbound as a
  forwarder for everything); ``Nameservers 127.0.0.1:<port>`` makes OpenDKIM exit with
  "can't configure DKIM library: failed to set nameserver list".
* libunbound answers ``.test`` names from a built-in local zone, stub-zone or not: the
  signature gets ``dkim=fail reason="key not found in DNS"``. ``local-zone: "test." nodefault``
  lifts that (added for ``.test`` zones); the interop tests use ``.example``-style domains.

Logging. OpenDKIM logs only through syslog(3), i.e. to ``/dev/log``, which this machine does not
have. :class:`OpenDkim` runs it in a private mount namespace (``unshare -m``) where ``/dev`` is
an overlay whose upper layer holds a ``log`` symlink to a datagram socket the test process
reads (:class:`SyslogCatcher`); no file outside the fixture's directory is touched, and the
log (``LogWhy``, ``LogResults``) lands in ``<dir>/syslog.log`` for failure messages. Where no
mount namespace can be made, OpenDKIM runs all the same, without a log.

Stopping. libmilter notices SIGTERM only when its listener's select() times out: OpenDKIM (and
any libmilter milter) takes up to ~5 s to exit. :meth:`OpenDkim.terminate` signals without
waiting, so that a teardown can stop several milters at once.

Typical use::

    dkim = OpenDkim(mode="v", nameserver=nsd.nameserver, dns_zones=["example.net"]).start()
    pf = postfix_factory(dkim.socket)
    ...
    dkim.cleanup()  # stop, remove the directory

or the fixtures :func:`opendkim_factory` / :func:`opendkim_factory_module`, which stop every
instance they started. Without OpenDKIM they fail (never skip) and say to run ``make test``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from postfix_fixture import HarnessError, HarnessTimeout, new_socket_dir, wait_for_socket

OPENDKIM = "/usr/sbin/opendkim"
OPENDKIM_GENKEY = "/usr/sbin/opendkim-genkey"
UNSHARE = "/usr/bin/unshare"
OPENDKIM_MISSING = (
    "OpenDKIM is not installed ({path} missing): run `make test`, which installs the Debian "
    "packages the test suite drives (opendkim, opendkim-tools, postfix, nsd …)"
)
#: authserv-id of the Authentication-Results header fields OpenDKIM adds.
DEFAULT_AUTHSERV_ID = "opendkim.test"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 8.0


class OpenDkimError(HarnessError):
    """OpenDKIM could not be configured or started (the message carries its output and log)."""


def require_opendkim() -> None:
    """Fail the test (never skip) when OpenDKIM or its tools are not installed."""
    for path in (OPENDKIM, OPENDKIM_GENKEY):
        if not os.access(path, os.X_OK):
            pytest.fail(OPENDKIM_MISSING.format(path=path), pytrace=False)


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One KeyTable entry: ``<selector>._domainkey.<domain>  domain:selector:key_file``."""

    domain: str
    selector: str
    key_file: Path

    @property
    def name(self) -> str:
        """The key name (first column of the KeyTable, second of the SigningTable)."""
        return f"{self.selector}._domainkey.{self.domain}"

    def keytable_line(self) -> str:
        return f"{self.name} {self.domain}:{self.selector}:{self.key_file}"


def opendkim_genkey(directory: Path, *, domain: str, selector: str, bits: int = 2048) -> KeySpec:
    """Make an RSA key with Debian's ``opendkim-genkey``: ``<selector>.private`` and ``.txt``.

    :raises OpenDkimError: the tool failed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [OPENDKIM_GENKEY, "-b", str(bits), "-d", domain, "-s", selector, "-D", str(directory)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise OpenDkimError(f"opendkim-genkey failed ({proc.returncode}): {proc.stderr}")
    key_file = directory / f"{selector}.private"
    key_file.chmod(0o600)
    return KeySpec(domain, selector, key_file)


def split_nameserver(nameserver: str) -> tuple[str, int]:
    """``127.0.0.1:5300`` → ``("127.0.0.1", 5300)`` (IPv4 only; this is for NSD on loopback)."""
    host, sep, port = nameserver.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"nameserver {nameserver!r} is not HOST:PORT")
    return host, int(port)


def unbound_config(nameserver: str, zones: Sequence[str]) -> str:
    """The libunbound configuration that sends lookups below ``zones`` to ``nameserver``.

    ``stub-zone`` (not ``forward-zone``, which works as well) because NSD is authoritative.
    """
    host, port = split_nameserver(nameserver)
    lines = ["server:"]
    if any(z.rstrip(".").lower().rpartition(".")[2] == "test" for z in zones):
        lines.append('    local-zone: "test." nodefault')  # else NXDOMAIN from libunbound
    for zone in zones:
        lines += ["stub-zone:", f'    name: "{zone.rstrip(".")}"', f"    stub-addr: {host}@{port}"]
    return "\n".join(lines) + "\n"


class SyslogCatcher:
    """A UNIX datagram socket that stands in for ``/dev/log`` and appends to a file."""

    def __init__(self, sock_path: Path, log_path: Path) -> None:
        self.sock_path = sock_path
        self.log_path = log_path
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> SyslogCatcher:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.sock_path))
        self.sock_path.chmod(0o666)
        sock.settimeout(0.1)
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name="syslog-catcher", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self._sock is not None
        with self.log_path.open("ab", buffering=0) as out:
            while not self._stop.is_set():
                try:
                    data = self._sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                out.write(data.rstrip(b"\0\n") + b"\n")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


@functools.cache
def _can_unshare() -> bool:
    """True when this process may make a mount namespace (root, or CAP_SYS_ADMIN)."""
    if not os.access(UNSHARE, os.X_OK):
        return False
    probe = subprocess.run(
        [UNSHARE, "-m", "true"], stdin=subprocess.DEVNULL, capture_output=True, check=False
    )
    return probe.returncode == 0


class OpenDkim:
    """A private ``opendkim`` milter on a ``local:`` socket.

    ``mode`` is OpenDKIM's ``Mode`` (``s``, ``v``, ``sv``). ``keys`` become the KeyTable and
    ``signing_table`` (``{pattern: key name}``, a ``refile:`` so ``*@example.org`` works) the
    SigningTable. ``nameserver`` (``127.0.0.1:<port>``) serves ``dns_zones``. ``settings``
    adds or overrides opendkim.conf directives last.
    """

    def __init__(
        self,
        *,
        mode: str,
        nameserver: str,
        dns_zones: Sequence[str],
        keys: Sequence[KeySpec] = (),
        signing_table: Mapping[str, str] | None = None,
        canonicalization: str = "relaxed/simple",
        internal_hosts: Sequence[str] = ("127.0.0.1",),
        authserv_id: str = DEFAULT_AUTHSERV_ID,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.mode = mode
        self.nameserver = nameserver
        self.dns_zones = list(dns_zones)
        self.keys = list(keys)
        self.signing_table = dict(signing_table or {})
        self.canonicalization = canonicalization
        self.internal_hosts = list(internal_hosts)
        self.authserv_id = authserv_id
        self.extra = dict(settings or {})
        self.dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._syslog: SyslogCatcher | None = None

    # --- paths -----------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        if self.dir is None:
            raise HarnessError("OpenDKIM is not started")
        return self.dir / name

    @property
    def socket_path(self) -> Path:
        return self._path("opendkim.sock")

    @property
    def socket(self) -> str:
        """The milter socket in Postfix notation (``unix:/run/…/opendkim.sock``)."""
        return f"unix:{self.socket_path}"

    @property
    def conf_path(self) -> Path:
        return self._path("opendkim.conf")

    # --- configuration ---------------------------------------------------------------------

    def settings(self) -> dict[str, str]:
        """The opendkim.conf directives (after :meth:`start` chose the paths)."""
        conf = {
            "Socket": f"local:{self.socket_path}",
            "UMask": "000",  # the socket must be writable by user postfix
            "Background": "no",
            "Mode": self.mode,
            "AuthservID": self.authserv_id,
            "Canonicalization": self.canonicalization,
            "InternalHosts": self._path("internal.hosts").as_posix(),
            "ResolverConfiguration": self._path("unbound.conf").as_posix(),
            "Syslog": "yes",
            "SyslogSuccess": "yes",
            "LogWhy": "yes",
            "LogResults": "yes",
            # RequireSafeKeys stays on (OpenDKIM's default): keys of mode 0600 in a 0755
            # directory under /run pass it. Keys under /tmp (world-writable) need
            # settings={"RequireSafeKeys": "false"}.
            # Any error is reported in Authentication-Results, not as a tempfail.
            "On-Default": "accept",
        }
        if self.keys:
            conf["KeyTable"] = f"file:{self._path('key.table')}"
        if self.signing_table:
            conf["SigningTable"] = f"refile:{self._path('signing.table')}"
        conf.update(self.extra)
        return conf

    def _write_config(self) -> None:
        self._path("internal.hosts").write_text("".join(f"{h}\n" for h in self.internal_hosts))
        self._path("unbound.conf").write_text(unbound_config(self.nameserver, self.dns_zones))
        if self.keys:
            self._path("key.table").write_text("".join(k.keytable_line() + "\n" for k in self.keys))
        if self.signing_table:
            self._path("signing.table").write_text(
                "".join(f"{pattern} {name}\n" for pattern, name in self.signing_table.items())
            )
        text = "".join(f"{k} {v}\n" for k, v in self.settings().items())
        self.conf_path.write_text(text)

    # --- process control -------------------------------------------------------------------

    def start(self) -> OpenDkim:
        """Write the configuration, check it (``opendkim -n``), start and wait for the socket.

        :raises OpenDkimError: OpenDKIM is missing, rejects the configuration or exits.
        """
        if not os.access(OPENDKIM, os.X_OK):
            raise OpenDkimError(OPENDKIM_MISSING.format(path=OPENDKIM))
        self.dir = new_socket_dir("opendkim-test-")
        self._write_config()
        check = subprocess.run(
            [OPENDKIM, "-n", "-x", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            raise OpenDkimError(
                f"opendkim -n rejected {self.conf_path} (exit {check.returncode}):\n"
                f"{check.stdout}{check.stderr}\n--- config ---\n{self.conf_path.read_text()}"
            )
        argv = [OPENDKIM, "-f", "-x", str(self.conf_path)]
        if _can_unshare():
            # /dev/log for OpenDKIM: an overlay on /dev, in its own mount namespace only. If
            # the overlay cannot be mounted OpenDKIM still runs, without a log.
            upper, work = self._path("dev-upper"), self._path("dev-work")
            upper.mkdir()
            work.mkdir()
            sock, log = self._path("syslog.sock"), self._path("syslog.log")
            self._syslog = SyslogCatcher(sock, log).start()
            (upper / "log").symlink_to(sock)
            script = (
                "if ! { mount --make-rprivate / && mount -t overlay overlay "
                f"-o lowerdir=/dev,upperdir={upper},workdir={work} /dev; }}; then "
                "echo 'opendkim_fixture: no /dev/log capture (overlay mount failed)' >&2; fi; "
                'exec "$0" "$@"'
            )
            argv = [UNSHARE, "-m", "sh", "-c", script, *argv]
        with self._path("opendkim.out").open("ab") as out:
            # unshare execs sh, which execs opendkim: the pid is OpenDKIM's own either way.
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        proc = self.process
        try:
            wait_for_socket(self.socket, timeout=START_TIMEOUT, alive=lambda: proc.poll() is None)
        except (HarnessError, HarnessTimeout) as exc:
            self.stop()
            raise OpenDkimError(f"OpenDKIM did not start: {exc}\n{self.diagnostics()}") from exc
        return self

    def terminate(self) -> None:
        """Send OpenDKIM SIGTERM without waiting (it takes up to ~5 s to exit)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM OpenDKIM by pid, wait (SIGKILL after a few seconds); safe to call twice."""
        self.terminate()
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        if self._syslog is not None:
            # Late log lines (the end of the last message) are still worth having.
            time.sleep(0.05)
            self._syslog.stop()
            self._syslog = None

    def cleanup(self) -> None:
        """Stop and remove the directory (kept when ``AUTHMILTER_KEEP_POSTFIX`` is set)."""
        self.stop()
        if self.dir is not None and not os.environ.get("AUTHMILTER_KEEP_POSTFIX"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> OpenDkim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # --- diagnostics -----------------------------------------------------------------------

    def log(self) -> str:
        """What OpenDKIM sent to syslog so far."""
        try:
            return self._path("syslog.log").read_text(errors="replace")
        except (OSError, HarnessError):
            return ""

    def diagnostics(self) -> str:
        """Configuration, output and log, headed, for failure messages."""
        parts = []
        for title, name in (
            ("opendkim.conf", "opendkim.conf"),
            ("unbound.conf", "unbound.conf"),
            ("opendkim output", "opendkim.out"),
            ("opendkim syslog", "syslog.log"),
        ):
            try:
                text = self._path(name).read_text(errors="replace")
            except (OSError, HarnessError):
                text = "(none)\n"
            parts.append(f"--- {title} ---\n{text}")
        return "".join(parts)


class OpenDkimStarter(Protocol):
    """The callable the fixtures yield: :class:`OpenDkim`'s parameters, returns it started."""

    def __call__(self, **kwargs: Any) -> OpenDkim: ...


@contextlib.contextmanager
def _starter() -> Iterator[OpenDkimStarter]:
    require_opendkim()
    started: list[OpenDkim] = []

    def start(**kwargs: Any) -> OpenDkim:
        milter = OpenDkim(**kwargs)
        started.append(milter)
        try:
            return milter.start()
        except OpenDkimError as exc:
            problem = str(exc)
        pytest.fail(f"cannot start OpenDKIM for the test: {problem}", pytrace=False)

    try:
        yield start
    finally:
        for milter in started:
            milter.terminate()
        for milter in reversed(started):
            milter.cleanup()


@pytest.fixture()
def opendkim_factory() -> Iterator[OpenDkimStarter]:
    """Start :class:`OpenDkim` milters (keyword arguments as the class); stopped after the test."""
    with _starter() as start:
        yield start


@pytest.fixture(scope="module")
def opendkim_factory_module() -> Iterator[OpenDkimStarter]:
    """Like :func:`opendkim_factory`, but the milters live until the end of the module."""
    with _starter() as start:
        yield start
