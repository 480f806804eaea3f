"""rspamd (Debian's ``/usr/bin/rspamd`` 3.4) as the benchmark's milter.

:class:`RspamdMilter` writes a small ``rspamd.conf`` into a fresh 0755 directory under /run
(never touching /etc/rspamd or /var/lib/rspamd) and starts ``rspamd -f -c <dir>/rspamd.conf``
in a session of its own. rspamd's ``rspamd_proxy`` worker speaks the milter protocol
(``milter = yes``) on a UNIX socket in that directory (``mode=0666``: Postfix's smtpd connects
as ``postfix``) and scans every message in-process (its one upstream has no hosts and
``self_scan = yes``; that key belongs in the ``upstream`` section: at the worker level rspamd
3.4 ignores it, finds no upstream and aborts on the first message), so no ``normal`` worker,
controller or Redis runs. The process tree is rspamd's main process (root, it binds
the socket), the ``rspamd_proxy`` workers and ``hs_helper`` (which rspamd 3.4 always spawns,
even when its config says ``enabled = false``; it compiles nothing here, there are no regexp
rules), all as ``_rspamd`` when we are root.

Two roles, one instance each, so the inbound instance cannot sign and the submit instance
does no verifying:

``sign``
    modules ``dkim`` (the C module: ``dkim_signing`` calls its ``sign``; it checks no
    signature here, the submitted mail has none and comes from 127.0.0.1, which rspamd always
    treats as local, and ``check_local`` is off) and ``dkim_signing``: one ``domain`` entry
    with the key file and selector. ``sign_local`` (rspamd's default) makes it sign for the
    local client. rspamd 3.4 signs ``rsa-sha256`` with ``c=relaxed/relaxed``: its signer has
    no canonicalization setting.
``verify``
    modules ``dkim``, ``spf``, ``dmarc`` (reporting off: it would need Redis) and
    ``milter_headers`` with ``use = ["authentication-results"]``, which adds one
    ``Authentication-Results`` field (rspamd adds ``remove-spam-flag`` by itself). Its
    authserv-id is the ``MTA-Name`` rspamd's milter takes from Postfix's ``{daemon_name}``
    macro (``milter_macro_daemon_name``, ``$myhostname`` unless set; ``INBOUND`` on the test
    fixture's inbound listener). The inbound client is the PROXY address (198.51.100.25),
    not local, so nothing needs ``check_local``.

What the configuration needs, measured with rspamd 3.4:

* rspamd loads a C module only if ``options.filters`` names it, and a Lua plugin only if it
  has a section: every other plugin stays off. :meth:`RspamdMilter.start` checks the list
  with ``rspamadm configdump -m`` ("Modules enabled: …") and refuses any other set.
* ``options.url_tld``: a two-line suffix list (``test``, ``example``), as in
  ``tests/rspamd_fixture.py``: the stock 9,600-entry list costs ~9 s at every start. DMARC's
  organizational domain of ``bench.example`` is the same with either list.
* ``options.hs_cache_dir`` in the directory: otherwise rspamd's main process writes (and
  prunes) Hyperscan cache files in the system's /var/lib/rspamd.
* ``DBDIR``, ``RUNDIR`` and ``LOGDIR`` (``--var``) point into the directory too.
* rspamd refuses to run its workers as root: as root it is started with ``-u _rspamd -g
  _rspamd`` (the user the Debian package creates), the directory and the key are chowned to
  it, the key stays 0600.
* logging: ``level = "warning"`` to ``<dir>/rspamd.log``: quiet, like the other milters in
  the benchmark (at ``info`` rspamd writes about nine lines per message).

Workers: ``count`` = the number of CPUs unless told, as authmilter's ``Workers`` default.
With ``self_scan`` the proxy workers do all the scanning, and one process scans on one CPU.
rspamd's own default would be 1 here (measured on 2 CPUs without ``count``), and Debian's
``worker-proxy.inc`` says ``count = 1`` too, for a proxy that only forwards to ``normal``
workers.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

RSPAMD = "/usr/bin/rspamd"
RSPAMADM = "/usr/bin/rspamadm"
RSPAMD_USER = "_rspamd"
RSPAMD_MISSING = (
    "rspamd is not installed ({path} missing): run `make bench`, which installs the Debian "
    "packages the benchmark drives (postfix, nsd, opendkim, opendmarc, rspamd)"
)
#: The modules each role must load, and no others (``rspamadm configdump -m``).
MODULES = {
    "sign": frozenset({"dkim", "dkim_signing"}),
    "verify": frozenset({"dkim", "spf", "dmarc", "milter_headers"}),
}
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class RspamdMilterError(RuntimeError):
    """rspamd could not be configured or started (its log attached)."""


def _quote(value: str) -> str:
    """A UCL string literal (our paths and names have no quotes or backslashes)."""
    if '"' in value or "\\" in value:
        raise RspamdMilterError(f"cannot quote {value!r} for rspamd.conf")
    return f'"{value}"'


class RspamdMilter:
    """A private rspamd milter: ``role`` ``sign`` (with ``sign_key`` = (domain, selector,
    PEM)) or ``verify``, resolving through ``nameserver`` (``ip:port``).

    Call :meth:`start`, then give Postfix :attr:`socket`; :attr:`pid` is the root of its
    process tree. :meth:`terminate` sends SIGTERM, :meth:`cleanup` makes sure every process is
    gone and removes the directory.
    """

    def __init__(
        self, role: str, *, nameserver: str, sign_key: tuple[str, str, bytes] | None = None,
        workers: int | None = None,
    ) -> None:  # fmt: skip
        if role not in MODULES:
            raise ValueError(f"role must be one of {sorted(MODULES)}, not {role!r}")
        if (role == "sign") != (sign_key is not None):
            raise ValueError("sign_key is required for role 'sign' and only for it")
        self.role, self.nameserver, self.sign_key = role, nameserver, sign_key
        self.workers = workers or os.cpu_count() or 1
        self.dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.modules: list[str] = []

    # -- paths and text ------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        if self.dir is None:
            raise RspamdMilterError("rspamd is not started")
        return self.dir / name

    @property
    def socket_path(self) -> Path:
        return self._path("rspamd.sock")

    @property
    def socket(self) -> str:
        """The milter socket in Postfix notation."""
        return f"unix:{self.socket_path}"

    @property
    def conf_path(self) -> Path:
        return self._path("rspamd.conf")

    @property
    def log_path(self) -> Path:
        return self._path("rspamd.log")

    @property
    def key_path(self) -> Path:
        assert self.sign_key is not None
        domain, selector, _pem = self.sign_key
        return self._path(f"{domain}.{selector}.key")

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RspamdMilterError("rspamd is not started")
        return self.process.pid

    def config_text(self) -> str:
        d = self._path("")
        if self.role == "sign":
            assert self.sign_key is not None
            domain, selector, _pem = self.sign_key
            modules = f"""\
# The C dkim module: dkim_signing signs through it. Local mail (127.0.0.1) is not checked.
dkim {{
}}
dkim_signing {{
  domain {{
    {_quote(domain)} {{
      path = {_quote(str(self.key_path))};
      selector = {_quote(selector)};
    }}
  }}
  sign_local = true;
  sign_authenticated = true;
  sign_inbound = false;
  use_esld = false;
  allow_hdrfrom_mismatch = false;
}}
"""
        else:
            modules = """\
dkim {
}
spf {
}
dmarc {
  reporting {
    enabled = false;
  }
}
milter_headers {
  use = ["authentication-results"];
}
"""
        return f"""\
options {{
  filters = "dkim";
  pidfile = {_quote(str(d / "rspamd.pid"))};
  url_tld = {_quote(str(d / "tld.dat"))};
  history_file = {_quote(str(d / "rspamd.history"))};
  hs_cache_dir = {_quote(str(d))};
  tempdir = {_quote(str(d))};
  dns {{
    nameserver = [{_quote(self.nameserver)}];
    timeout = 1s;
    retransmits = 2;
  }}
}}
logging {{
  type = "file";
  filename = {_quote(str(self.log_path))};
  level = "warning";
}}
modules {{
  path = "${{PLUGINSDIR}}";
}}
{modules}worker "rspamd_proxy" {{
  bind_socket = {_quote(f"{self.socket_path} mode=0666")};
  milter = yes;
  count = {self.workers};
  timeout = 120s;
  # Self-scan is a property of the upstream: no hosts, the worker scans in-process.
  upstream "local" {{
    default = yes;
    self_scan = yes;
  }}
}}
"""

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> RspamdMilter:
        """Write the config and key, check the module list, start rspamd and wait until its
        socket answers and every proxy worker runs.

        :raises RspamdMilterError: rspamd missing, a module list other than :data:`MODULES`
            says, or rspamd exited or was not ready within :data:`START_TIMEOUT`.
        """
        from postfix_fixture import new_socket_dir

        for path in (RSPAMD, RSPAMADM):
            if not os.access(path, os.X_OK):
                raise RspamdMilterError(RSPAMD_MISSING.format(path=path))
        self.dir = new_socket_dir(f"rspamd-bench-{self.role}-")
        self._path("tld.dat").write_text("test\nexample\n")
        if self.sign_key is not None:
            self.key_path.write_bytes(self.sign_key[2])
            self.key_path.chmod(0o600)
        self.conf_path.write_text(self.config_text())
        command = [RSPAMD, "-f", "-c", str(self.conf_path)]
        for name in ("DBDIR", "RUNDIR", "LOGDIR"):
            command += ["--var", f"{name}={self.dir}"]
        if os.geteuid() == 0:
            user = pwd.getpwnam(RSPAMD_USER)
            for owned in [self.dir, *self.dir.iterdir()]:
                os.chown(owned, user.pw_uid, user.pw_gid)
            command += ["-u", RSPAMD_USER, "-g", RSPAMD_USER]
        self.modules = self._enabled_modules()
        if set(self.modules) != MODULES[self.role]:
            raise RspamdMilterError(
                f"rspamd would load modules {sorted(self.modules)}, expected "
                f"{sorted(MODULES[self.role])}\n{self.diagnostics()}"
            )
        with self._path("rspamd.stdout").open("ab") as out:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self._wait_ready()
        return self

    def _enabled_modules(self) -> list[str]:
        """The modules this config enables, as ``rspamadm configdump -m`` lists them."""
        proc = subprocess.run(
            [RSPAMADM, "configdump", "-m", "-c", str(self.conf_path)],
            capture_output=True, text=True, check=False, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        m = re.search(r"^Modules enabled:(.*)$", proc.stdout, re.M)
        if proc.returncode != 0 or m is None:
            raise RspamdMilterError(
                f"rspamadm configdump -m failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return sorted(name.strip() for name in m.group(1).split(",") if name.strip())

    def _proxy_workers(self) -> int:
        """Running ``rspamd_proxy`` children of the main process."""
        from postfix_fixture import process_tree

        count = 0
        for pid in process_tree([self.pid])[1:]:
            with contextlib.suppress(OSError):
                if b"rspamd_proxy" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    count += 1
        return count

    def _wait_ready(self) -> None:
        from postfix_fixture import wait_for_socket

        process = self.process
        assert process is not None
        deadline = time.monotonic() + START_TIMEOUT
        try:
            wait_for_socket(self.socket, timeout=START_TIMEOUT,
                            alive=lambda: process.poll() is None)  # fmt: skip
            while self._proxy_workers() < self.workers:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RspamdMilterError(f"{self._proxy_workers()} of {self.workers} "
                                            "rspamd_proxy workers running")  # fmt: skip
                time.sleep(0.05)
        except Exception as exc:
            raise RspamdMilterError(
                f"rspamd did not start: {exc}\n{self.diagnostics()}"
            ) from exc

    def terminate(self) -> None:
        """SIGTERM to the main process (it stops its workers)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def cleanup(self) -> None:
        """Stop rspamd (SIGKILL to its own session after :data:`STOP_TIMEOUT`) and remove the
        directory."""
        process = self.process
        if process is not None:
            self.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(STOP_TIMEOUT)
            # Our own session: the main process and any worker that outlived it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log(self, lines: int = 40) -> str:
        """The tail of rspamd's log and console output."""
        parts: list[str] = []
        for name in ("rspamd.log", "rspamd.stdout"):
            with contextlib.suppress(OSError, RspamdMilterError):
                parts += self._path(name).read_text(errors="replace").splitlines()
        return "\n".join(parts[-lines:])

    def diagnostics(self) -> str:
        conf = ""
        with contextlib.suppress(OSError, RspamdMilterError):
            conf = self.conf_path.read_text()
        return (f"--- rspamd.conf ({self.role}) ---\n{conf}"
                f"--- rspamd modules: {', '.join(self.modules) or '?'} ---\n"
                f"--- rspamd log ---\n{self.log()}\n")  # fmt: skip


def start_rspamd(role: str, nameserver: str, *, sign_key: tuple[str, str, bytes] | None = None,
                 workers: int | None = None) -> RspamdMilter:  # fmt: skip
    """A started :class:`RspamdMilter`; on failure everything it made is removed first."""
    milter = RspamdMilter(role, nameserver=nameserver, sign_key=sign_key, workers=workers)
    try:
        return milter.start()
    except BaseException:
        milter.cleanup()
        raise

