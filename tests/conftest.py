"""Shared fixtures: real DNS servers on loopback (NSD, a black hole) for resolver and key tests.

The DNS fixtures never skip: without NSD they fail and say to run ``make test``, which
installs the Debian packages the suite drives.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping

import pytest
from hypothesis import settings

from dnsserver import BlackholeDns, DnsServerError, NsdServer

# make test is the CI gate: every run draws the same Hypothesis examples, so it cannot pass on
# one run and fail on the next. HYPOTHESIS_PROFILE=explore draws new ones each run.
settings.register_profile("gate", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gate"))

# The real-Postfix harness: fixtures postfix_factory, postfix_factory_module, milter_socket_dir.
pytest_plugins = ["postfix_fixture"]

NsdFactory = Callable[[Mapping[str, str]], NsdServer]


def _factory() -> tuple[NsdFactory, Callable[[], None]]:
    started: list[NsdServer] = []

    def start(zones: Mapping[str, str]) -> NsdServer:
        server = NsdServer(zones)
        started.append(server)
        try:
            return server.start()
        except DnsServerError as exc:
            problem = str(exc)
        pytest.fail(f"cannot start NSD for the test: {problem}", pytrace=False)

    def cleanup() -> None:
        for server in started:
            server.cleanup()

    return start, cleanup


@pytest.fixture()
def nsd_server() -> Iterator[NsdFactory]:
    """Start a private NSD for ``{origin: zone_text}``; stopped after the test.

    Usage: ``server = nsd_server({"example.test": make_zone("example.test", records)})``,
    then ``Resolver([server.nameserver])``.
    """
    start, cleanup = _factory()
    yield start
    cleanup()


@pytest.fixture(scope="module")
def nsd_server_module() -> Iterator[NsdFactory]:
    """Like :func:`nsd_server`, but the servers live until the end of the test module."""
    start, cleanup = _factory()
    yield start
    cleanup()


@pytest.fixture()
def blackhole_dns() -> Iterator[BlackholeDns]:
    """A loopback nameserver (UDP and TCP) that never answers: lookups through it time out."""
    server = BlackholeDns()
    problem = ""
    try:
        server.start()
    except DnsServerError as exc:
        problem = str(exc)
    if problem:
        pytest.fail(f"cannot start the black-hole DNS server: {problem}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def restore_tz() -> Iterator[None]:
    """Put the process's time zone (TZ) back after a test that changes it."""
    old = os.environ.get("TZ")
    yield
    if old is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = old
    time.tzset()


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """What the report-record writer tells the metrics, by outcome."""
    from authmilter import metrics

    seen: dict[str, int] = {}

    def report_records(outcome: str, count: int = 1) -> None:
        seen[outcome] = seen.get(outcome, 0) + count

    monkeypatch.setattr(metrics, "report_records", report_records)
    return seen
