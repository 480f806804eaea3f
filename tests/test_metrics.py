"""Prometheus metrics (MetricsListen): the real milter with two workers behind a real Postfix,
resolving through NSD; the endpoint's totals must match the mail that went through, and every
series an alert uses is there at zero before the first message."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from authmilter import metrics, resolver, server
from authmilter.config import Action, Config
from authmilter.errors import ConfigError
from authmilter.pipeline import Direction
from authmilter.results import DkimResult, DmarcResult, SpfResult
from dnsserver import NsdServer, make_zone
from helpers import OUTSIDE, message
from milter_fixture import AuthmilterProcess
from postfix_fixture import (
    LOOPBACK,
    PostfixInstance,
    SmtpPermfail,
    _ProxySMTP,
    free_port,
    proxy_v1_line,
)

AID = "mx.metrics.test"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
Stack = tuple[AuthmilterProcess, PostfixInstance, str]


@pytest.fixture(scope="module")
def nsd(nsd_server_module) -> NsdServer:  # type: ignore[no-untyped-def]
    return nsd_server_module({
        "good.test": make_zone("good.test", [
            ("@", "TXT", '"v=spf1 ip4:198.51.100.0/24 -all"'),
            ("_dmarc", "TXT", '"v=DMARC1; p=none"'),
        ]),
        "spoofed.test": make_zone("spoofed.test", [
            ("@", "TXT", '"v=spf1 ip4:203.0.113.5 -all"'),
            ("_dmarc", "TXT", '"v=DMARC1; p=reject"'),
        ]),
    })  # fmt: skip


@contextlib.contextmanager
def running_stack(nsd: NsdServer) -> Iterator[Stack]:
    """The milter (two workers, metrics on) behind Postfix: (milter, postfix, metrics URL).

    The port was free when chosen; an outgoing connection may take it before the milter binds
    it (the kernel hands out the same range), so a start that finds it taken tries another."""
    for attempt in range(3):
        port = free_port()
        milter = AuthmilterProcess(f"AuthservID {AID}\nWorkers 2\nNameservers {nsd.nameserver}\n"
                                   f"MetricsListen 127.0.0.1:{port}\nMail_From_reject Fail\n")
        try:
            milter.start()
            milter.wait_log("metrics on http://127.0.0.1:")
            break
        except Exception:  # noqa: BLE001 - not started: retried only for a port taken
            taken = "Address already in use" in milter.log()
            milter.cleanup()
            if not taken or attempt == 2:
                raise
    try:
        postfix = PostfixInstance(milter.postfix_socket).start()
        try:
            yield milter, postfix, f"http://127.0.0.1:{port}/metrics"
        finally:
            postfix.stop()
    finally:
        milter.cleanup()


@pytest.fixture(scope="module")
def stack(nsd: NsdServer) -> Iterator[Stack]:
    with running_stack(nsd) as running:
        yield running


@pytest.fixture
def fresh_stack(nsd: NsdServer) -> Iterator[Stack]:
    """A stack of its own, which no other test has sent mail through."""
    with running_stack(nsd) as running:
        yield running


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in out, f"{key} scraped twice"
            out[key] = sample.value
    return out


def metrics_dir(milter: AuthmilterProcess) -> Path:
    """The supervisor's PROMETHEUS_MULTIPROC_DIR, as it logs it."""
    found = re.search(r"metrics on http://\S+ \(worker files in (\S+)\)", milter.log())
    assert found is not None
    return Path(found.group(1))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def series(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def alert_series() -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every series an alert may use, built here from the code's own vocabularies."""
    out = [series("authmilter_messages_total", direction=d.value, action=a.value)
           for d in Direction for a in Action]  # fmt: skip
    for method, tokens in (("dkim", DkimResult), ("spf", SpfResult), ("dmarc", DmarcResult)):
        out += [series("authmilter_results_total", method=method, result=t.value) for t in tokens]
    out += [series("authmilter_results_total", method="arc", result=r) for r in metrics.ARC_RESULTS]
    out += [series("authmilter_dns_queries_total", type=t, outcome=o)
            for t in metrics.DNS_TYPES for o in metrics.DNS_OUTCOMES]  # fmt: skip
    out += [series("authmilter_dns_query_seconds_count", type=t) for t in metrics.DNS_TYPES]
    out += [series("authmilter_dns_cache_total", result=r) for r in ("hit", "miss")]
    for name in metrics.CALLBACKS:
        out.append(series("authmilter_internal_errors_total", callback=name))
        out.append(series("authmilter_callback_seconds_count", callback=name))
    out += [series("authmilter_reloads_total", result=r) for r in ("ok", "failed")]
    out += [series("authmilter_report_records_total", outcome=o)
            for o in metrics.REPORT_OUTCOMES]  # fmt: skip
    out += [series("authmilter_history_records_total", outcome=o)
            for o in metrics.REPORT_OUTCOMES]  # fmt: skip
    out += [series("authmilter_failure_reports_total", outcome=o)
            for o in metrics.FAILURE_OUTCOMES]  # fmt: skip
    return out


def test_the_label_vocabularies_are_the_code_s() -> None:
    """CALLBACKS names each callback the adapter times and guards; DNS_OUTCOMES each
    outcome the resolver records."""
    probe = server._callback(lambda self: 0, lambda self: 0)
    timed = set()
    for name, attr in vars(server.AuthMilter).items():
        func = attr
        while func is not None:
            if getattr(func, "__code__", None) is probe.__code__:
                timed.add(name)
            func = getattr(func, "__wrapped__", None)
    assert timed == set(metrics.CALLBACKS)
    outcomes = set(resolver._OUTCOME.values()) | {"temperror", "permerror"}
    assert outcomes == set(metrics.DNS_OUTCOMES)


def test_every_alert_series_is_zero_before_the_first_message(fresh_stack) -> None:  # type: ignore[no-untyped-def]
    milter, postfix, url = fresh_stack
    expected = alert_series()
    first = scrape(url)
    assert [s for s in expected if s not in first] == []
    assert {s: first[s] for s in expected if first[s] != 0} == {}
    assert value(first, "authmilter_messages_total", direction="verify", action="reject") == 0
    assert value(first, "authmilter_results_total", method="dmarc", result="fail") == 0
    assert series("authmilter_results_total", method="dmarc", result="fail") in first

    def send(n: int) -> None:
        postfix.send(message("a@good.test", f"good {n}"), mail_from="a@good.test",
                     rcpt_to=["user@ours.test"], port="inbound", client_ip=OUTSIDE)  # fmt: skip
        postfix.wait_delivered(n, timeout=60)

    counted = {series("authmilter_messages_total", direction="verify", action="accept"),
               series("authmilter_results_total", method="dkim", result="none"),
               series("authmilter_results_total", method="spf", result="pass"),
               series("authmilter_results_total", method="arc", result="none"),
               series("authmilter_results_total", method="dmarc", result="pass")}  # fmt: skip
    untouched = [s for s in expected if s[0].endswith("_total") and s not in counted
                 and not s[0].startswith("authmilter_dns_")]  # fmt: skip

    send(1)
    after_one = scrape(url)
    assert {s: after_one[s] for s in counted} == dict.fromkeys(counted, 1.0)
    assert {s: after_one[s] for s in untouched if after_one[s] != 0} == {}

    # A reload counted in the supervisor, then every worker replaced: the new workers are
    # forked from a supervisor holding the zeros and the reload, and must count neither again.
    assert milter.proc is not None
    os.kill(milter.proc.pid, signal.SIGHUP)
    milter.wait_log("reloaded:")
    for pid in milter.pids()[1:]:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while milter.log().count("starting a new one") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert milter.log().count("starting a new one") == 2
    send(2)
    final = scrape(url)
    assert [s for s in expected if s not in final] == []
    assert {s: final[s] for s in counted} == dict.fromkeys(counted, 2.0)
    assert value(final, "authmilter_reloads_total", result="ok") == 1
    reloads = series("authmilter_reloads_total", result="ok")
    assert {s: final[s] for s in untouched if s != reloads and final[s] != 0} == {}


def test_totals_match_the_mail_sent_across_both_workers(stack) -> None:  # type: ignore[no-untyped-def]
    milter, postfix, url = stack
    before = scrape(url)
    good, spoofed = 12, 3

    def send_good(n: int) -> None:
        postfix.send(message("a@good.test", f"good {n}"), mail_from="a@good.test",
                     rcpt_to=["user@ours.test"], port="inbound", client_ip=OUTSIDE)  # fmt: skip

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(send_good, range(good)))
    for n in range(spoofed):  # SPF fail: Mail_From_reject Fail rejects at RCPT
        with pytest.raises(SmtpPermfail):
            postfix.send(message("ceo@spoofed.test", f"spoof {n}"), mail_from="ceo@spoofed.test",
                         rcpt_to=["user@ours.test"], port="inbound", client_ip=OUTSIDE)  # fmt: skip
    postfix.wait_delivered(good, timeout=60)
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("authmilter_messages_total", direction="verify", action="accept") == good
    assert delta("authmilter_messages_total", direction="verify", action="reject") == spoofed
    assert delta("authmilter_results_total", method="spf", result="pass") == good
    assert delta("authmilter_results_total", method="spf", result="fail") == spoofed
    assert delta("authmilter_results_total", method="dmarc", result="pass") == good
    # Each message needs the SPF and DMARC records. The first in each worker asked NSD; the
    # others got the results computed from those answers again while they are fresh
    # (Resolver.memo), so the cache is asked far less than twice a message.
    queries = sum(v for (name, _l), v in after.items() if name == "authmilter_dns_queries_total")
    assert queries >= 2
    assert delta("authmilter_dns_queries_total", type="TXT", outcome="ok") >= 2
    assert delta("authmilter_dns_query_seconds_count", type="TXT") >= 2
    assert delta("authmilter_dns_cache_total", result="miss") >= 2
    lookups = (delta("authmilter_dns_cache_total", result="hit")
               + delta("authmilter_dns_cache_total", result="miss"))  # fmt: skip
    assert lookups < 2 * (good + spoofed), lookups
    # Callback latency, by callback: one end of message per accepted message.
    assert delta("authmilter_callback_seconds_count", callback="eom") == good
    assert delta("authmilter_callback_seconds_count", callback="envrcpt") == good + spoofed
    assert delta("authmilter_callback_seconds_count", callback="header") >= good * 4
    # Each worker writes its own file; the endpoint adds them up.
    workers = {int(p) for p in re.findall(r"authmilter\[(\d+)\]: \w+: ", milter.log())}
    assert workers and len(list(metrics_dir(milter).glob("counter_*.db"))) >= len(workers)


def test_a_message_refused_for_two_recipients_counts_once(stack) -> None:  # type: ignore[no-untyped-def]
    """SPF rejects each RCPT TO of a spoofed message and logs each, but it is one message: one
    reject and one SPF result in the totals (not one per recipient)."""
    milter, postfix, url = stack
    before, log_before = scrape(url), milter.log()
    line = "spf=fail mailfrom=ceo@spoofed.test, action=reject at RCPT: 550 5.7.23"
    port = postfix.port_number("inbound")
    smtp = _ProxySMTP(proxy_v1_line(OUTSIDE, server_port=port), timeout=30, source_ip=None)
    try:
        assert smtp.connect(LOOPBACK, port)[0] == 220
        assert smtp.ehlo("client.example")[0] == 250
        assert smtp.docmd("MAIL", "FROM:<ceo@spoofed.test>")[0] == 250
        codes = [smtp.docmd("RCPT", f"TO:<{rcpt}>")[0]
                 for rcpt in ("user@ours.test", "other@ours.test")]  # fmt: skip
        smtp.docmd("QUIT")
    finally:
        smtp.close()
    assert codes == [550, 550]
    deadline = time.monotonic() + 10
    while milter.log().count(line) < log_before.count(line) + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert milter.log().count(line) == log_before.count(line) + 2
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("authmilter_callback_seconds_count", callback="envrcpt") == 2
    assert delta("authmilter_messages_total", direction="verify", action="reject") == 1
    assert delta("authmilter_results_total", method="spf", result="fail") == 1


def test_counts_of_a_killed_worker_are_kept_and_reloads_are_counted(stack) -> None:  # type: ignore[no-untyped-def]
    milter, postfix, url = stack
    before = scrape(url)
    total = value(before, "authmilter_messages_total", direction="verify", action="accept")
    assert total > 0
    assert milter.proc is not None
    for pid in milter.pids()[1:]:
        os.kill(pid, signal.SIGKILL)
    milter.wait_log("starting a new one")
    os.kill(milter.proc.pid, signal.SIGHUP)
    milter.wait_log("reloaded:")
    after = scrape(url)
    assert value(after, "authmilter_messages_total", direction="verify", action="accept") == total
    assert value(after, "authmilter_reloads_total", result="ok") == 1 + value(
        before, "authmilter_reloads_total", result="ok")


@pytest.mark.parametrize("listen", ["9489", "localhost:9489", "127.0.0.1:99999", "[::1]"])
def test_metrics_listen_must_be_address_and_port(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"^authmilter.conf:2: MetricsListen"):
        Config.from_text(f"Mode v\nMetricsListen {listen}\n", path="authmilter.conf")


def test_metrics_port_in_use_stops_the_start_with_a_clear_error(stack) -> None:  # type: ignore[no-untyped-def]
    _milter, _postfix, url = stack
    port = url.rsplit(":", 1)[1].split("/")[0]
    other = AuthmilterProcess(f"AuthservID {AID}\nWorkers 1\nMetricsListen 127.0.0.1:{port}\n"
                              "Nameservers 127.0.0.1:9\n")  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "authmilter", "run", "-c", str(other.conf_path)],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    other.cleanup()
    assert run.returncode != 0
    assert f"authmilter.conf:5: MetricsListen 127.0.0.1:{port}" in run.stderr
    assert "in use" in run.stderr
