"""A real rspamd (Debian's ``/usr/bin/rspamd`` 3.4) as an ARC peer in the tests.

rspamd has its own ARC implementation (``plugins/arc.lua`` over its C DKIM code), so a chain it
seals is an independent check of ``authmilter.arc_verify``, and its ``ARC_*`` symbols are a
second opinion on chains we build.

:class:`Rspamd` writes a minimal ``rspamd.conf`` into a fresh directory (never touching
/etc/rspamd), starts ``rspamd -f -c <dir>/rspamd.conf`` in the foreground with a normal worker
and a controller on 127.0.0.1 free ports, and stops it by pid. What the configuration needs,
measured with rspamd 3.4:

* ``options.dns.nameserver = ["127.0.0.1:<port>"]``: rspamd's resolver asks the test NSD only.
* ``options.filters = "dkim"`` and a ``dkim {}`` section: the ``arc`` plugin refuses to load
  without the C ``dkim`` module. ``modules.path`` is the stock plugin directory; every other
  plugin stays off because it has no section.
* ``dkim { check_local = true; }``: rspamd checks no DKIM signature from a local address
  (127.0.0.0/8 always is one) otherwise, and its AAR would say ``none``.
* ``arc { use_http_headers = true; }``: signing is chosen per request by the HTTP headers
  ``PerformDkimSign``, ``DkimDomain``, ``DkimSelector`` and ``DkimPrivateKey`` (base64 DER;
  a PEM key would need newlines in a header), so one rspamd seals for any domain a test names
  and no key file is written. ``MTA-Name`` sets the authserv-id of the AAR rspamd writes.
* ``options.url_tld``: a two-line suffix list (``test``, ``example``). The stock 9,600-entry
  list takes rspamd ~9 s to compile at every start; the URL code is irrelevant to ARC.
* rspamd refuses to run its workers as root: as root it is started with ``-u _rspamd -g
  _rspamd`` (the user the Debian package creates) and the directory is chowned to it.
* ``DBDIR``, ``RUNDIR`` and ``LOGDIR`` (``--var``) point into the directory; the log is
  ``<dir>/rspamd.log`` and ends up in every :class:`RspamdError`.

Messages go to the normal worker's ``/checkv2`` over HTTP (stdlib :mod:`http.client`) with the
envelope as request headers (``IP``, ``Helo``, ``From``, ``Rcpt``, ``User``); the JSON reply
carries the symbols (``ARC_ALLOW``, ``ARC_REJECT``, ``ARC_INVALID``, ``ARC_DNSFAIL``,
``ARC_NA``; ``ARC_SIGNED`` when it sealed) and, in ``milter.add_headers``, the ARC Set to
prepend (:meth:`Scan.apply`).

Typical use::

    rspamd = rspamd_factory_module(nsd.nameserver)
    sealed = rspamd.arc_seal(message, domain="forwarder.test", selector="s1", key_pem=pem)
    assert rspamd.check(sealed).arc == "ARC_ALLOW"

Without rspamd the fixture fails (never skips) and says to run ``make test``.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

RSPAMD = "/usr/bin/rspamd"
RSPAMD_USER = "_rspamd"
RSPAMD_MISSING = (
    "rspamd is not installed ({path} missing): run `make test`, which installs the Debian "
    "packages the test suite drives (rspamd, nsd, postfix …)"
)
LOOPBACK = "127.0.0.1"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
REQUEST_TIMEOUT = 20.0
#: The ARC verdict symbols of rspamd's arc plugin (one of them is in every reply).
ARC_SYMBOLS = ("ARC_ALLOW", "ARC_REJECT", "ARC_INVALID", "ARC_DNSFAIL", "ARC_NA")
#: Top-to-bottom order of an ARC Set when prepended (rspamd's milter inserts AAR, AMS, AS
#: each at the top, so the seal ends up first).
_ARC_ORDER = ("ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results")


class RspamdError(RuntimeError):
    """rspamd could not be configured or started, or gave an unusable reply (log attached)."""


def require_rspamd() -> None:
    if not os.access(RSPAMD, os.X_OK):
        pytest.fail(RSPAMD_MISSING.format(path=RSPAMD), pytrace=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _crlf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", "\r\n")


@dataclass(frozen=True)
class Scan:
    """One ``/checkv2`` reply: symbols with their options, and the header fields to add."""

    symbols: dict[str, list[str]]
    add_headers: list[tuple[str, str]]
    reply: dict[str, Any] = field(repr=False)

    @property
    def arc(self) -> str:
        """The ARC verdict symbol (one of :data:`ARC_SYMBOLS`)."""
        found = [name for name in ARC_SYMBOLS if name in self.symbols]
        if len(found) != 1:
            raise RspamdError(f"expected one ARC verdict symbol, got {found}: {self.symbols}")
        return found[0]

    @property
    def arc_options(self) -> list[str]:
        """rspamd's detail for the ARC verdict (e.g. the failing check)."""
        return self.symbols.get(self.arc, [])

    def apply(self, message: bytes) -> bytes:
        """``message`` with :attr:`add_headers` prepended (CRLF line ends, ARC Set order)."""
        fields = "".join(f"{name}: {_crlf(value)}\r\n" for name, value in self.add_headers)
        return fields.encode() + message


def _header_list(add_headers: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``milter.add_headers`` (name → {value, order} or a list of them) as ordered fields."""
    fields: list[tuple[str, str]] = []
    for name, spec in add_headers.items():
        for item in spec if isinstance(spec, list) else [spec]:
            value = item["value"] if isinstance(item, dict) else str(item)
            fields.append((name, value))

    def rank(item: tuple[str, str]) -> int:
        lower = [n.lower() for n in _ARC_ORDER]
        name = item[0].lower()
        return lower.index(name) if name in lower else len(lower)

    return sorted(fields, key=rank)


class Rspamd:
    """A private rspamd resolving through ``nameserver`` (``127.0.0.1:<port>``).

    Use as a context manager or call :meth:`start` / :meth:`cleanup`.
    """

    def __init__(self, nameserver: str, *, workdir: str | os.PathLike[str] | None = None):
        self.nameserver = nameserver
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="rspamd-"))
        self.normal_port = 0
        self.controller_port = 0
        self.process: subprocess.Popen[bytes] | None = None

    # -- paths and text --------------------------------------------------------------------
    @property
    def conf_path(self) -> Path:
        return self.dir / "rspamd.conf"

    @property
    def log_path(self) -> Path:
        return self.dir / "rspamd.log"

    def log(self) -> str:
        """rspamd's log and console output so far."""
        parts = []
        for path in (self.log_path, self.dir / "rspamd.stdout"):
            with contextlib.suppress(FileNotFoundError):
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def _diagnostics(self, lines: int = 40) -> str:
        tail = "\n".join(self.log().splitlines()[-lines:])
        return f"--- rspamd log ({self.dir}) ---\n{tail}"

    def _config_text(self) -> str:
        d = self.dir
        return f"""\
options {{
  filters = "dkim";
  pidfile = "{d / "rspamd.pid"}";
  url_tld = "{d / "tld.dat"}";
  history_file = "{d / "rspamd.history"}";
  # Hyperscan cache files here, not in the system's /var/lib/rspamd.
  hs_cache_dir = "{d}";
  control_socket = "";
  local_addrs = [];
  dns {{
    nameserver = ["{self.nameserver}"];
    timeout = 1s;
    retransmits = 2;
  }}
}}
logging {{
  type = "file";
  filename = "{self.log_path}";
  level = "info";
}}
modules {{
  path = "${{PLUGINSDIR}}";
}}
dkim {{
  check_local = true;
  check_authed = true;
}}
arc {{
  use_http_headers = true;
}}
worker "normal" {{
  bind_socket = "{LOOPBACK}:{self.normal_port}";
  count = 1;
}}
worker "controller" {{
  bind_socket = "{LOOPBACK}:{self.controller_port}";
  count = 1;
  secure_ip = "{LOOPBACK}";
}}
"""

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Rspamd:
        """Write the config, start rspamd and wait until both workers answer ``/ping``.

        :raises RspamdError: rspamd is missing, exited while starting, or did not answer
            within :data:`START_TIMEOUT` (the message carries its log).
        """
        if not os.access(RSPAMD, os.X_OK):
            raise RspamdError(RSPAMD_MISSING.format(path=RSPAMD))
        (self.dir / "tld.dat").write_text("test\nexample\n")
        command = [RSPAMD, "-f", "-c", str(self.conf_path)]
        for name in ("DBDIR", "RUNDIR", "LOGDIR"):
            command += ["--var", f"{name}={self.dir}"]
        if os.geteuid() == 0:
            user = pwd.getpwnam(RSPAMD_USER)
            for path in [self.dir, *self.dir.iterdir()]:
                os.chown(path, user.pw_uid, user.pw_gid)
            command += ["-u", RSPAMD_USER, "-g", RSPAMD_USER]
        last_error = ""
        for _attempt in range(3):
            self.normal_port, self.controller_port = _free_port(), _free_port()
            self.conf_path.write_text(self._config_text())
            with open(self.dir / "rspamd.stdout", "ab") as out:
                self.process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                self._wait_ready()
                return self
            except RspamdError as exc:
                last_error = str(exc)
                self.stop()
                if "address already in use" not in last_error.lower():
                    break
        raise RspamdError(last_error)

    def _ping(self, port: int) -> bool:
        try:
            conn = http.client.HTTPConnection(LOOPBACK, port, timeout=1.0)
            try:
                conn.request("GET", "/ping")
                return conn.getresponse().read().strip() == b"pong"
            finally:
                conn.close()
        except OSError:
            return False

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RspamdError(
                    f"rspamd exited with status {self.process.returncode} while starting\n"
                    f"{self._diagnostics()}"
                )
            if self._ping(self.normal_port) and self._ping(self.controller_port):
                return
            time.sleep(0.05)
        raise RspamdError(
            f"rspamd did not answer /ping within {START_TIMEOUT:g}s\n{self._diagnostics()}"
        )

    def stop(self) -> None:
        """SIGTERM rspamd's process group (main process and workers); SIGKILL if it lingers."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)
        # Workers that outlived the main process would still hold the ports.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    def cleanup(self) -> None:
        """Stop rspamd and remove its directory (if this object made it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Rspamd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- requests --------------------------------------------------------------------------
    def check(
        self,
        message: bytes,
        *,
        ip: str = "127.0.0.2",
        helo: str = "mail.origin.test",
        mail_from: str = "alice@origin.test",
        rcpt: Sequence[str] = ("bob@example.net",),
        user: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Scan:
        """Scan ``message`` on the normal worker (``POST /checkv2``) and return the reply.

        :raises RspamdError: not running, HTTP error or a reply without ``symbols``.
        """
        if self.process is None:
            raise RspamdError("rspamd is not running")
        request: list[tuple[str, str]] = [("IP", ip), ("Helo", helo), ("From", mail_from)]
        request += [("Rcpt", address) for address in rcpt]
        if user is not None:
            request.append(("User", user))
        request += list((headers or {}).items())
        conn = http.client.HTTPConnection(LOOPBACK, self.normal_port, timeout=REQUEST_TIMEOUT)
        try:
            conn.putrequest("POST", "/checkv2")
            for name, value in request:
                conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(message)))
            conn.endheaders(message)
            response = conn.getresponse()
            body = response.read()
        except OSError as exc:
            raise RspamdError(f"/checkv2 failed: {exc}\n{self._diagnostics()}") from exc
        finally:
            conn.close()
        if response.status != 200:
            raise RspamdError(
                f"/checkv2 answered {response.status}: {body[:500]!r}\n{self._diagnostics()}"
            )
        try:
            reply = json.loads(body)
            symbols = {
                name: list(item.get("options", [])) for name, item in reply["symbols"].items()
            }
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            raise RspamdError(f"/checkv2 reply unusable ({exc}): {body[:500]!r}") from exc
        add = reply.get("milter", {}).get("add_headers", {})
        return Scan(symbols=symbols, add_headers=_header_list(add), reply=reply)

    def arc_seal(
        self,
        message: bytes,
        *,
        domain: str,
        selector: str,
        key_pem: bytes,
        authserv_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        **envelope: Any,
    ) -> bytes:
        """Have rspamd add its ARC Set for ``domain``/``selector`` and return the sealed message.

        ``key_pem`` is the PEM private key (PKCS#1 or PKCS#8); ``authserv_id`` (default
        ``mx.<domain>``) names the AAR's authserv-id; ``headers`` are more request headers
        (``SignOnAuthFailed: yes`` makes rspamd seal a chain it found broken, with
        ``cv=fail``). Other keywords go to :meth:`check`.

        :raises RspamdError: rspamd did not seal (``ARC_SIGNED`` missing: the symbols and log
            say why, e.g. a broken incoming chain) or sent other than one ARC Set.
        """
        key = serialization.load_pem_private_key(key_pem, password=None)
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        request = {
            **(headers or {}),
            "PerformDkimSign": "yes",
            "DkimDomain": domain,
            "DkimSelector": selector,
            "DkimPrivateKey": base64.b64encode(der).decode("ascii"),
            "MTA-Name": authserv_id or f"mx.{domain}",
        }
        scan = self.check(message, headers=request, **envelope)
        names = sorted(name.lower() for name, _ in scan.add_headers)
        if "ARC_SIGNED" not in scan.symbols or names != sorted(n.lower() for n in _ARC_ORDER):
            raise RspamdError(
                f"rspamd did not seal for {domain}: symbols {scan.symbols}, "
                f"headers {[name for name, _ in scan.add_headers]}\n{self._diagnostics()}"
            )
        return scan.apply(message)


RspamdStarter = Callable[[str], Rspamd]


@contextlib.contextmanager
def _starter() -> Iterator[RspamdStarter]:
    require_rspamd()
    started: list[Rspamd] = []

    def start(nameserver: str) -> Rspamd:
        server = Rspamd(nameserver)
        started.append(server)
        try:
            return server.start()
        except RspamdError as exc:
            problem = str(exc)
        pytest.fail(f"cannot start rspamd for the test: {problem}", pytrace=False)

    try:
        yield start
    finally:
        for server in started:
            server.cleanup()


@pytest.fixture()
def rspamd_factory() -> Iterator[RspamdStarter]:
    """Start :class:`Rspamd` for a nameserver spec; stopped after the test."""
    with _starter() as start:
        yield start


@pytest.fixture(scope="module")
def rspamd_factory_module() -> Iterator[RspamdStarter]:
    """Like :func:`rspamd_factory`, but the instances live until the end of the module."""
    with _starter() as start:
        yield start
