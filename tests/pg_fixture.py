"""A private PostgreSQL server for the ``ReportDatabase`` tests and the report benchmark.

:class:`PostgresServer` runs Debian's PostgreSQL binaries (``/usr/lib/postgresql/<N>/bin``,
the newest version installed) on a cluster of its own: ``initdb`` in a temporary folder, then
``pg_ctl start`` listening on 127.0.0.1 on a free port and on a UNIX socket in that folder.
Never the system cluster, never /etc/postgresql. ``pg_hba.conf`` trusts the UNIX socket and
loopback (127.0.0.1/32, ::1/128) and nothing else. It makes a login role ``authmilter``
(no superuser) owning the database ``reports``, and hands out more databases
(:meth:`PostgresServer.new_database`) so that tests do not see each other's rows.

Who runs it: PostgreSQL refuses to run as root. Run as root (as the suite is), the server runs
as the ``postgres`` system user that Debian's ``postgresql-common`` package creates, through
``runuser -u postgres``; the folder is chowned to it and removed as root at the end. Run as
any other user, the server runs as that user. ``postgres`` rather than a user made for the
tests: it exists wherever the binaries do, and the suite leaves no user behind.

The fixtures: :func:`postgres_server` (one server for the session) and
:func:`postgres_url` (a fresh database on it per test). A test module gets them by
assignment (``postgres_server = pg_fixture.postgres_server``), as with ``postfix_fixture``.
Without the binaries they fail (never skip) and say to run ``make test``, which installs the
Debian package ``postgresql``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

PG_ROOT = Path("/usr/lib/postgresql")
MISSING = ("PostgreSQL's server binaries (initdb, pg_ctl under {root}/<version>/bin) are not "
           "installed: run `make test`, it installs the Debian package postgresql")  # fmt: skip
ROLE = "authmilter"
DATABASE = "reports"
#: Settings for throwaway test clusters: no durability, fast start and stop.
FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
COMMAND_TIMEOUT = 60.0


class PostgresMissing(RuntimeError):
    """PostgreSQL's server binaries are not installed."""


class PostgresError(RuntimeError):
    """initdb, pg_ctl or the first connection failed; the message has the server's log."""


def find_bindir(root: Path = PG_ROOT) -> Path:
    """The ``bin`` folder of the newest PostgreSQL installed (Debian's layout).

    :raises PostgresMissing:
    """
    found = []
    for initdb in root.glob("*/bin/initdb"):
        bindir = initdb.parent
        if (bindir / "pg_ctl").exists() and bindir.parent.name.isdigit():
            found.append((int(bindir.parent.name), bindir))
    if not found:
        raise PostgresMissing(MISSING.format(root=root))
    return max(found)[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One private PostgreSQL cluster; :meth:`start`, :meth:`stop` (and start again),
    :meth:`cleanup`. A context manager too.

    :param settings: ``postgresql.conf`` settings added to the port and socket ones (the
        tests pass :data:`FAST`; the benchmark keeps PostgreSQL's defaults).
    """

    def __init__(self, settings: Mapping[str, str] | None = None) -> None:
        self.bindir = find_bindir()
        self.settings = dict(settings or {})
        self.base = Path(tempfile.mkdtemp(prefix="authmilter-pg-"))
        self.base.chmod(0o755)  # the server's user enters it; the data folder stays 0700
        self.data = self.base / "data"
        self.socket_dir = self.base / "run"
        self.log_path = self.base / "postgres.log"
        self.port = _free_port()
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self._names = itertools.count(1)
        self._initialised = False

    # -- URLs ---------------------------------------------------------------------------------

    def url(self, database: str = DATABASE, *, role: str = ROLE) -> str:
        """``postgresql://`` over TCP on 127.0.0.1."""
        return f"postgresql://{role}@127.0.0.1:{self.port}/{database}"

    def socket_url(self, database: str = DATABASE, *, role: str = ROLE) -> str:
        """``postgresql://`` over the UNIX socket (``?host=<folder>``)."""
        return f"postgresql://{role}@/{database}?host={self.socket_dir}&port={self.port}"

    # -- running --------------------------------------------------------------------------------

    def _as_server_user(self, *argv: str) -> subprocess.CompletedProcess[str]:
        command = list(argv)
        if os.geteuid() == 0:
            command = ["runuser", "-u", self.user, "--", *command]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        return subprocess.run(command, capture_output=True, text=True, env=env,
                              stdin=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT,
                              cwd=self.base)  # fmt: skip

    def _check(self, what: str, proc: subprocess.CompletedProcess[str]) -> None:
        if proc.returncode != 0:
            raise PostgresError(f"{what} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
                                f"\n--- server log ---\n{self.log()}")  # fmt: skip

    def log(self) -> str:
        """The server's log so far."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def _initdb(self) -> None:
        for path in (self.data, self.socket_dir):
            path.mkdir(mode=0o700 if path == self.data else 0o755)
        self.log_path.touch()
        if os.geteuid() == 0:
            server = pwd.getpwnam(self.user)
            for path in (self.data, self.socket_dir, self.log_path):
                os.chown(path, server.pw_uid, server.pw_gid)
        self._check("initdb", self._as_server_user(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
            "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"))
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "50",
            **self.settings,
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# authmilter test cluster (tests/pg_fixture.py)\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        # Trust the socket and loopback only; every other client is refused.
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "host all all ::1/128 trust\n")  # fmt: skip
        self._initialised = True

    def start(self) -> PostgresServer:
        """initdb (the first time) and ``pg_ctl start``; waits until it takes connections.
        A first start that fails removes what it made."""
        first = not self._initialised
        try:
            if first:
                self._initdb()
            self._check("pg_ctl start", self._as_server_user(
                str(self.bindir / "pg_ctl"), "start", "-D", str(self.data), "-l",
                str(self.log_path), "-w", "-t", "30"))  # fmt: skip
            if first:
                self.admin(f"CREATE ROLE {ROLE} LOGIN",
                           f"CREATE DATABASE {DATABASE} OWNER {ROLE}")  # fmt: skip
        except BaseException:
            if first:
                self.cleanup()
            raise
        return self

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop`` (``fast``: clients are disconnected); nothing when not running."""
        if not self.running():
            return
        proc = self._as_server_user(str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data),
                                    "-m", mode, "-w", "-t", "30")  # fmt: skip
        if proc.returncode != 0 and self.running():  # by its own pid, as a last resort
            pid = self.pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGQUIT)
            self._check("pg_ctl stop", proc)

    def pid(self) -> int | None:
        """The postmaster's pid, from ``postmaster.pid``."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        return None

    def running(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def cleanup(self) -> None:
        """Stop the server and remove its folder."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- administration ---------------------------------------------------------------------------

    def admin(self, *statements: str, database: str = "postgres") -> None:
        """Run statements as the superuser, each on its own (CREATE DATABASE cannot be in a
        transaction)."""
        import psycopg

        with psycopg.connect(self.url(database, role="postgres"), autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement.encode())

    def new_database(self) -> str:
        """A new empty database owned by ``authmilter``; its TCP URL."""
        name = f"test_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name} OWNER {ROLE}")
        return self.url(name)


def start_server(settings: Mapping[str, str] | None = FAST) -> PostgresServer:
    """A started :class:`PostgresServer`; in a test, fail (never skip) when it cannot be."""
    try:
        server = PostgresServer(settings)
    except PostgresMissing as e:
        pytest.fail(str(e), pytrace=False)
    try:
        return server.start()  # removes its folder when it fails
    except (PostgresError, OSError, subprocess.SubprocessError) as e:
        pytest.fail(f"cannot start PostgreSQL for the test: {e}", pytrace=False)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One private PostgreSQL for the session (see the module docstring)."""
    server = start_server()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on :func:`postgres_server`: its ``postgresql://`` URL (TCP)."""
    return postgres_server.new_database()


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, step: float = 0.05) -> bool:
    """Poll ``predicate()`` until it is true (``True``) or ``timeout`` passed (``False``)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
