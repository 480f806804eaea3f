"""Prometheus metrics, served over HTTP when ``MetricsListen`` is set.

Off by default: until :func:`enable` runs every recording function here returns at once, and
``prometheus_client`` is not even imported. With ``MetricsListen``, :func:`enable` runs in the
supervisor before the workers fork. The workers are separate processes, so the library's
multiprocess mode is used: each process writes its counters to memory-mapped files in a
private directory (``PROMETHEUS_MULTIPROC_DIR``, chosen here, removed at exit), and the
supervisor's HTTP endpoint adds up the files of all workers, living and dead, on each scrape.

Metric names (all prefixed ``authmilter_``):

========================================  ================================================
``messages_total{direction,action}``      messages decided: ``sign``/``verify`` ×
                                          ``accept``/``reject``/``tempfail``/``quarantine``/
                                          ``discard``
``results_total{method,result}``          ``dkim``/``spf``/``arc``/``dmarc`` results, one
                                          per signature for DKIM; ``arc=none`` for
                                          DMARC-evaluated mail without ARC fields
``dns_queries_total{type,outcome}``       lookups sent to a nameserver: ``ok``, ``nodata``,
                                          ``nxdomain``, ``temperror``, ``permerror``
``dns_query_seconds{type}``               how long those lookups took (histogram)
``dns_cache_total{result}``               cache ``hit``/``miss``; hit rate = hit / (hit+miss)
``callback_seconds{callback}``            time spent in each milter callback (histogram)
``internal_errors_total{callback}``       exceptions caught by the adapter (On-InternalError)
``reloads_total{result}``                 SIGHUP/SIGUSR1 reloads: ``ok``/``failed``
``report_records_total{outcome}``         DMARC report records (``ReportDatabase``):
                                          ``written``, ``dropped`` (queue full),
                                          ``failed`` (database error)
``history_records_total{outcome}``        OpenDMARC history blocks (``HistoryFile``): the
                                          same outcomes (``failed``: file error)
``failure_reports_total{outcome}``        DMARC failure reports (``FailureReports``):
                                          ``sent``, or dropped: ``rate_limited``,
                                          ``queue_full``, ``no_destination``,
                                          ``dns_temperror``, ``smtp_failed``, ``stopped``,
                                          ``error``
========================================  ================================================

Every label set these can take is there from the start, at zero (see :func:`_zero`): an
alert on ``increase()`` sees the first failure as a step from 0, not as a new series.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from enum import StrEnum
from typing import Any

from authmilter.config import Action, parse_listen
from authmilter.results import DkimResult, DmarcResult, SpfResult

__all__ = [
    "CALLBACKS",
    "DNS_OUTCOMES",
    "DNS_TYPES",
    "callback",
    "dns_cache",
    "dns_query",
    "enable",
    "failure_reports",
    "history_records",
    "internal_error",
    "message",
    "process_dead",
    "reload",
    "report_records",
    "result",
    "serve",
    "shutdown",
]

#: Latency buckets in seconds: milter callbacks take tens of microseconds (a header) to
#: seconds (end of message waiting on DNS); the top bucket is Postfix's milter timeouts.
BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: The milter callbacks the adapter times and guards (``server.AuthMilter``, wrapped by
#: ``server._callback``): the ``callback`` label of ``callback_seconds`` and
#: ``internal_errors_total``.
CALLBACKS = ("connect", "hello", "envfrom", "envrcpt", "header", "eoh", "body", "eom")
#: Record types the checks ask for: TXT (DKIM keys, SPF and DMARC records), A, AAAA and MX
#: (SPF mechanisms, DMARCbis non-existent domains), PTR (SPF ``ptr``, ``%{p}``).
DNS_TYPES = ("TXT", "A", "AAAA", "MX", "PTR")
#: How a lookup sent to a nameserver ends (``resolver.Resolver._lookup``).
DNS_OUTCOMES = ("ok", "nodata", "nxdomain", "temperror", "permerror")
#: The ``arc=`` results (RFC 8617 §10.1: no temperror); DMARC-evaluated mail without ARC
#: fields counts as none.
ARC_RESULTS = ("none", "pass", "fail")
#: What became of a DMARC report record (``reports.store``).
REPORT_OUTCOMES = ("written", "dropped", "failed")
#: What became of a DMARC failure report (``reports.failure.OUTCOMES``).
FAILURE_OUTCOMES = ("sent", "rate_limited", "queue_full", "no_destination", "dns_temperror",
                    "smtp_failed", "stopped", "error")

_m: _Metrics | None = None
_dir: str | None = None


class _Metrics:
    """The metric objects; built only after the multiprocess directory is set."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        # registry=None: the HTTP endpoint collects from the files of every process instead.
        def counter(name: str, doc: str, labels: list[str]) -> Any:
            return Counter(f"authmilter_{name}", doc, labels, registry=None)

        def histogram(name: str, doc: str, labels: list[str]) -> Any:
            return Histogram(f"authmilter_{name}", doc, labels, buckets=BUCKETS, registry=None)

        self.messages = counter("messages", "Messages decided, by direction and action.",
                                ["direction", "action"])  # fmt: skip
        self.results = counter("results", "Authentication results, by method.",
                               ["method", "result"])  # fmt: skip
        self.dns_queries = counter("dns_queries", "DNS lookups sent to a nameserver, by type "
                                   "and outcome.", ["type", "outcome"])  # fmt: skip
        self.dns_seconds = histogram("dns_query_seconds", "Time of DNS lookups sent to a "
                                     "nameserver.", ["type"])  # fmt: skip
        self.dns_cache = counter("dns_cache", "DNS cache lookups, hit or miss.", ["result"])
        self.callbacks = histogram("callback_seconds", "Time spent in each milter callback.",
                                   ["callback"])  # fmt: skip
        self.errors = counter("internal_errors", "Exceptions caught by the milter adapter, by "
                              "callback.", ["callback"])  # fmt: skip
        self.reloads = counter("reloads", "Configuration reloads, by result.", ["result"])
        self.report_records = counter("report_records", "DMARC report records, by outcome: "
                                      "written, dropped (queue full) or failed (database "
                                      "error).", ["outcome"])  # fmt: skip
        self.failure_reports = counter("failure_reports", "DMARC failure reports, by outcome: "
                                       "sent, or why dropped.", ["outcome"])  # fmt: skip
        self.history_records = counter("history_records", "OpenDMARC history blocks "
                                       "(HistoryFile), by outcome: written, dropped (queue "
                                       "full) or failed (file error).", ["outcome"])  # fmt: skip


def _zero(m: _Metrics) -> None:
    """Create every label set at zero, so each series is scraped before its first count.

    Runs in the supervisor, which lives as long as the service: its files hold the zeros, and
    the endpoint adds them to the workers' counts. A worker (forked from here) writes only to
    its own files, starting from zero, so nothing is counted twice, before or after a worker
    is replaced. In multiprocess mode creating a child writes it to the file; the ``inc(0)``
    says so for the counters (a histogram child has no neutral update).
    """
    from authmilter.pipeline import Direction  # here: pipeline imports this module

    for direction in Direction:
        for action in Action:
            m.messages.labels(direction.value, action.value).inc(0)
    tokens: dict[str, type[StrEnum]] = {"dkim": DkimResult, "spf": SpfResult,
                                         "dmarc": DmarcResult}  # fmt: skip
    for method, enum in tokens.items():
        for token in enum:
            m.results.labels(method, token.value).inc(0)
    for arc_result in ARC_RESULTS:
        m.results.labels("arc", arc_result).inc(0)
    for rdtype in DNS_TYPES:
        m.dns_seconds.labels(rdtype)
        for outcome in DNS_OUTCOMES:
            m.dns_queries.labels(rdtype, outcome).inc(0)
    for hit in ("hit", "miss"):
        m.dns_cache.labels(hit).inc(0)
    for name in CALLBACKS:
        m.callbacks.labels(name)
        m.errors.labels(name).inc(0)
    for outcome in ("ok", "failed"):
        m.reloads.labels(outcome).inc(0)
    for outcome in REPORT_OUTCOMES:
        m.report_records.labels(outcome).inc(0)
        m.history_records.labels(outcome).inc(0)
    for outcome in FAILURE_OUTCOMES:
        m.failure_reports.labels(outcome).inc(0)


def enable() -> str:
    """Switch metrics on for this process and the workers it will fork.

    Must run before any worker is forked. The per-process files go to a new private
    temporary directory; every series is created there at zero (:func:`_zero`).

    :returns: the directory used.
    """
    global _m, _dir
    if _m is not None and _dir is not None:
        return _dir
    directory = tempfile.mkdtemp(prefix="authmilter-metrics-")
    # prometheus_client picks its storage when first imported: set the directory before.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    _dir = directory
    _m = _Metrics()
    _zero(_m)
    return directory


def serve(listen: str) -> Any:
    """Start the HTTP endpoint (``/metrics``) on ``address:port`` in a daemon thread.

    Call it from the thread whose signal mask the server threads should inherit.

    :returns: the server object (``server_address`` has the bound port).
    :raises ValueError: ``listen`` is not ``address:port``.
    :raises OSError: the address cannot be bound.
    """
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    if _m is None:
        enable()
    host, port = parse_listen(listen)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    server, _thread = start_http_server(port, addr=host or "0.0.0.0", registry=registry)
    return server


def shutdown() -> None:
    """Remove the private directory (at the end of the service)."""
    global _m, _dir
    if _dir is not None:
        shutil.rmtree(_dir, ignore_errors=True)
    _m, _dir = None, None


def process_dead(pid: int) -> None:
    """Supervisor: a worker is gone (its counters stay in the totals)."""
    if _m is None:
        return
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


# -- recording (no-ops while metrics are off) ---------------------------------------------------


def message(direction: str, action: str) -> None:
    """One message decided."""
    if _m is not None:
        _m.messages.labels(direction, action).inc()


def result(method: str, value: str) -> None:
    """One authentication result (``dkim``/``spf``/``dmarc``)."""
    if _m is not None:
        _m.results.labels(method, value).inc()


def dns_query(rdtype: str, outcome: str, seconds: float) -> None:
    """One lookup sent to a nameserver and how it ended."""
    if _m is not None:
        _m.dns_queries.labels(rdtype, outcome).inc()
        _m.dns_seconds.labels(rdtype).observe(seconds)


def dns_cache(hit: bool) -> None:
    """One cache lookup."""
    if _m is not None:
        _m.dns_cache.labels("hit" if hit else "miss").inc()


def callback(name: str, seconds: float) -> None:
    """Time spent in one milter callback."""
    if _m is not None:
        _m.callbacks.labels(name).observe(seconds)


def internal_error(name: str) -> None:
    """The adapter caught an exception in callback ``name``."""
    if _m is not None:
        _m.errors.labels(name).inc()


def reload(ok: bool) -> None:
    """A reload was attempted."""
    if _m is not None:
        _m.reloads.labels("ok" if ok else "failed").inc()


def report_records(outcome: str, count: int = 1) -> None:
    """``count`` DMARC report records ``written``, ``dropped`` or ``failed``."""
    if _m is not None and count:
        _m.report_records.labels(outcome).inc(count)


def history_records(outcome: str, count: int = 1) -> None:
    """``count`` OpenDMARC history blocks ``written``, ``dropped`` or ``failed``."""
    if _m is not None and count:
        _m.history_records.labels(outcome).inc(count)


def failure_reports(outcome: str, count: int = 1) -> None:
    """``count`` DMARC failure reports ``sent`` or dropped (``outcome`` says why)."""
    if _m is not None and count:
        _m.failure_reports.labels(outcome).inc(count)
