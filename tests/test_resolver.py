"""The process resolver against a real NSD on loopback: answers, failures, cache, specs."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import dns.rcode
import pytest

from authmilter.errors import ConfigError, DNSNameNotFound, DNSPermError, DNSTempError
from authmilter.resolver import (
    MAX_NEGATIVE_TTL,
    Resolver,
    parse_nameserver,
    parse_nameservers,
)
from dnsserver import (
    BlackholeDns,
    NsdServer,
    ScriptedDns,
    SeenQuery,
    make_zone,
    rcode_reply,
    truncated_then_garbage,
    txt_rdata,
)

NsdFactory = Callable[[Mapping[str, str]], NsdServer]
ZONE = "example.test"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def zone_text(ttl: int = 300, negative_ttl: int = 60) -> str:
    return make_zone(
        ZONE,
        [
            ("split", "TXT", '"v=spf1 " "include:a.example " "-all"'),
            ("two", "TXT", '"first"'),
            ("two", "TXT", '"second" "part"'),
            ("long", "TXT", txt_rdata("k" * 700)),
            ("host", "A", "192.0.2.10"),
            ("host", "AAAA", "2001:db8::10"),
            ("@", "MX", "10 mx.example.test."),
            ("10.2.0.192.in-addr", "PTR", "host.example.test."),
            ("alias", "CNAME", "host"),
            ("short", "TXT", '"short-lived"'),
        ],
        ttl=ttl,
        negative_ttl=negative_ttl,
    ).replace("short\tIN\tTXT", "short\t30\tIN\tTXT")


@pytest.fixture(scope="module")
def shared_nsd(nsd_server_module: NsdFactory) -> NsdServer:
    return nsd_server_module({ZONE: zone_text()})


@pytest.fixture()
def resolver(shared_nsd: NsdServer) -> Resolver:
    return Resolver([shared_nsd.nameserver], timeout=2.0)


# -- answers ----------------------------------------------------------------------------------


def test_txt_joins_the_character_strings_of_one_record(resolver: Resolver) -> None:
    assert resolver.txt(f"split.{ZONE}") == [b"v=spf1 include:a.example -all"]


def test_txt_returns_one_entry_per_record(resolver: Resolver) -> None:
    assert sorted(resolver.txt(f"two.{ZONE}")) == [b"first", b"secondpart"]


def test_txt_longer_than_255_bytes_comes_back_whole(resolver: Resolver) -> None:
    assert resolver.txt(f"long.{ZONE}") == [b"k" * 700]


def test_nodata_is_an_empty_list(resolver: Resolver) -> None:
    assert resolver.txt(f"host.{ZONE}") == []
    assert resolver.query(f"split.{ZONE}", "A") == []


def test_nxdomain_raises_name_not_found_naming_name_and_type(resolver: Resolver) -> None:
    with pytest.raises(DNSNameNotFound) as exc:
        resolver.txt(f"nope.{ZONE}")
    assert f"nope.{ZONE}" in str(exc.value)
    assert "TXT" in str(exc.value)
    assert isinstance(exc.value, DNSPermError)


def test_query_serves_a_aaaa_mx_ptr_and_follows_cname(resolver: Resolver) -> None:
    assert [r.to_text() for r in resolver.query(f"host.{ZONE}", "A")] == ["192.0.2.10"]
    assert [r.to_text() for r in resolver.query(f"host.{ZONE}", "AAAA")] == ["2001:db8::10"]
    assert [r.to_text() for r in resolver.query(ZONE, "MX")] == ["10 mx.example.test."]
    ptr = resolver.query(f"10.2.0.192.in-addr.{ZONE}", "PTR")
    assert [r.to_text() for r in ptr] == ["host.example.test."]
    assert [r.to_text() for r in resolver.query(f"alias.{ZONE}", "A")] == ["192.0.2.10"]


def test_unknown_record_type_is_a_value_error(resolver: Resolver) -> None:
    with pytest.raises(ValueError, match="NOTATYPE"):
        resolver.query(f"host.{ZONE}", "NOTATYPE")


def test_malformed_name_is_a_perm_error(resolver: Resolver) -> None:
    with pytest.raises(DNSPermError, match="malformed name"):
        resolver.txt("a..b.example.test")
    with pytest.raises(DNSPermError):
        resolver.txt("x" * 64 + ".example.test")


def test_dkimpy_dnsfunc_gives_first_txt_or_none(resolver: Resolver) -> None:
    assert resolver.dkimpy_dnsfunc(f"split.{ZONE}.".encode(), timeout=5) == (
        b"v=spf1 include:a.example -all"
    )
    assert resolver.dkimpy_dnsfunc(f"nope.{ZONE}.".encode()) is None
    assert resolver.dkimpy_dnsfunc(f"host.{ZONE}.".encode()) is None
    assert resolver.dkimpy_dnsfunc(b"\xff\xfe.example.test.") is None


# -- failures ---------------------------------------------------------------------------------


def test_blackhole_times_out_as_temp_error_after_one_query_with_the_timeout(
    blackhole_dns: BlackholeDns,
) -> None:
    resolver = Resolver([blackhole_dns.nameserver], timeout=1.0)
    with pytest.raises(DNSTempError) as exc:
        resolver.txt(f"sel._domainkey.{ZONE}")
    assert f"sel._domainkey.{ZONE} TXT" in str(exc.value)
    # The lookup was given the configured timeout (dnspython's lifetime), not its 5 s default.
    assert "timed out after 1s" in str(exc.value)
    # One query went out, and it was not asked again within the timeout.
    assert blackhole_dns.received() == [SeenQuery(f"sel._domainkey.{ZONE}", "TXT", False)]


def test_deadline_bounds_all_lookups_of_a_stage(blackhole_dns: BlackholeDns) -> None:
    """Each lookup gets min(timeout, budget left); once the budget is spent, none is sent.

    The clock is the test's: after each lookup it moves on by the time that lookup was given
    (dnspython's own wait is real, the budget is kept on the injected clock).
    """
    clock = FakeClock()
    resolver = Resolver([blackhole_dns.nameserver], timeout=0.25, clock=clock)
    errors = []
    took = [0.25, 0.25, 0.125, 0.0, 0.0]  # binary fractions: the clock lands on the end exactly
    with resolver.deadline(0.625):
        for n, seconds in enumerate(took):  # without the budget: 5 x 0.25 s
            with pytest.raises(DNSTempError) as exc:
                resolver.txt(f"s{n}._domainkey.{ZONE}")
            errors.append(str(exc.value))
            clock.advance(seconds)
    assert "timed out after 0.25s" in errors[0]
    assert "timed out after 0.25s" in errors[1]
    assert "timed out after 0.125s" in errors[2]  # what was left of the budget, not 0.25
    assert all("not asked" in e and "DNSDeadline" in e for e in errors[3:]), errors
    # The two lookups after the budget ran out were never sent.
    assert [q.name for q in blackhole_dns.received()] == [
        f"s{n}._domainkey.{ZONE}" for n in range(3)]  # fmt: skip


def test_deadline_leaves_cached_answers_and_other_threads_alone(shared_nsd: NsdServer) -> None:
    clock = FakeClock()
    resolver = Resolver([shared_nsd.nameserver], timeout=2.0, clock=clock)
    first = resolver.txt(f"split.{ZONE}")
    answers: list[list[bytes]] = []
    with resolver.deadline(0.05):
        clock.advance(0.1)  # the budget is spent; the cached answer (TTL 300) is still fresh
        assert resolver.txt(f"split.{ZONE}") == first  # from the cache: no DNS time needed
        with pytest.raises(DNSTempError, match="DNSDeadline"):
            resolver.txt(f"two.{ZONE}")
        other = threading.Thread(target=lambda: answers.append(resolver.txt(f"split.{ZONE}")))
        other.start()
        other.join()
    assert answers == [first]
    assert len(resolver.txt(f"two.{ZONE}")) == 2  # the budget ended with the block


def test_nested_deadlines_keep_the_earlier_end(blackhole_dns: BlackholeDns) -> None:
    resolver = Resolver([blackhole_dns.nameserver], timeout=5.0, clock=FakeClock())
    with resolver.deadline(0.25), resolver.deadline(30), pytest.raises(DNSTempError) as outer:
        resolver.txt(f"outer._domainkey.{ZONE}")
    with resolver.deadline(30), resolver.deadline(0.25), pytest.raises(DNSTempError) as inner:
        resolver.txt(f"inner._domainkey.{ZONE}")
    # Either way round the lookup was given the 0.25 s of the earlier end, not 30 s or 5 s.
    assert "timed out after 0.25s" in str(outer.value)
    assert "timed out after 0.25s" in str(inner.value)
    assert [q.name for q in blackhole_dns.received()] == [
        f"outer._domainkey.{ZONE}", f"inner._domainkey.{ZONE}"]  # fmt: skip
    with pytest.raises(ValueError, match="positive"), resolver.deadline(0):
        pass


def test_dkimpy_dnsfunc_lets_temp_errors_through(blackhole_dns: BlackholeDns) -> None:
    resolver = Resolver([blackhole_dns.nameserver], timeout=0.5)
    with pytest.raises(DNSTempError):
        resolver.dkimpy_dnsfunc(b"sel._domainkey.example.test.")


def test_refused_for_a_zone_the_server_does_not_serve_is_temp(resolver: Resolver) -> None:
    with pytest.raises(DNSTempError, match="REFUSED"):
        resolver.txt("sel._domainkey.elsewhere.example")


def test_servfail_is_a_temp_error() -> None:
    with ScriptedDns(rcode_reply(dns.rcode.SERVFAIL)) as server:
        resolver = Resolver([server.nameserver], timeout=1.0)
        with pytest.raises(DNSTempError, match="SERVFAIL"):
            resolver.txt("x.example.test")


def test_malformed_answer_is_a_perm_error() -> None:
    with ScriptedDns(truncated_then_garbage) as server:
        resolver = Resolver([server.nameserver], timeout=1.0)
        with pytest.raises(DNSPermError, match="malformed answer") as exc:
            resolver.txt("x.example.test")
        assert not isinstance(exc.value, DNSNameNotFound)


def test_nameserver_that_is_down_is_a_temp_error(shared_nsd: NsdServer) -> None:
    with ScriptedDns(lambda wire, tcp: None) as server:
        port = server.port
    resolver = Resolver([f"127.0.0.1:{port}"], timeout=0.3)
    with pytest.raises(DNSTempError):
        resolver.txt(f"split.{ZONE}")


def test_second_nameserver_answers_when_the_first_does_not_answer_at_all(
        shared_nsd: NsdServer, blackhole_dns: BlackholeDns) -> None:  # fmt: skip
    resolver = Resolver([blackhole_dns.nameserver, shared_nsd.nameserver], timeout=2.0)
    # Had the dead server been given the whole 2 s, the lookup would end as a timeout: the
    # answer proves it had its share only.
    assert sorted(resolver.txt(f"two.{ZONE}")) == [b"first", b"secondpart"]
    # The dead server was asked first, once: the answer did come by way of the failover.
    assert blackhole_dns.received() == [SeenQuery(f"two.{ZONE}", "TXT", False)]


def test_second_nameserver_answers_when_the_first_fails(shared_nsd: NsdServer) -> None:
    with ScriptedDns(rcode_reply(dns.rcode.SERVFAIL)) as broken:
        resolver = Resolver([broken.nameserver, shared_nsd.nameserver], timeout=2.0)
        assert resolver.txt(f"split.{ZONE}") == [b"v=spf1 include:a.example -all"]


# -- cache ------------------------------------------------------------------------------------


def test_cache_hit_answers_without_asking_again(nsd_server: NsdFactory) -> None:
    server = nsd_server({ZONE: zone_text()})
    resolver = Resolver([server.nameserver], timeout=0.3)
    assert resolver.txt(f"split.{ZONE}") == [b"v=spf1 include:a.example -all"]
    server.stop()
    assert resolver.txt(f"split.{ZONE}") == [b"v=spf1 include:a.example -all"]
    stats = resolver.stats
    assert (stats.hits, stats.misses) == (1, 1)
    with pytest.raises(DNSTempError):  # proves the server is really gone
        resolver.txt(f"two.{ZONE}")


def test_cache_key_ignores_case_and_trailing_dot(nsd_server: NsdFactory) -> None:
    server = nsd_server({ZONE: zone_text()})
    resolver = Resolver([server.nameserver], timeout=0.3)
    resolver.txt(f"split.{ZONE}")
    server.stop()
    assert resolver.txt("SPLIT.Example.Test.") == [b"v=spf1 include:a.example -all"]


def test_positive_answer_expires_after_its_ttl(nsd_server: NsdFactory) -> None:
    server = nsd_server({ZONE: zone_text()})
    clock = FakeClock()
    resolver = Resolver([server.nameserver], timeout=0.3, clock=clock)
    assert resolver.txt(f"short.{ZONE}") == [b"short-lived"]  # TTL 30
    server.stop()
    clock.advance(29)
    assert resolver.txt(f"short.{ZONE}") == [b"short-lived"]
    clock.advance(2)
    with pytest.raises(DNSTempError):
        resolver.txt(f"short.{ZONE}")


def test_nxdomain_is_cached_for_the_soa_minimum(nsd_server: NsdFactory) -> None:
    server = nsd_server({ZONE: zone_text(ttl=300, negative_ttl=60)})
    clock = FakeClock()
    resolver = Resolver([server.nameserver], timeout=0.3, clock=clock)
    with pytest.raises(DNSNameNotFound):
        resolver.txt(f"missing.{ZONE}")
    server.stop()
    clock.advance(59)
    with pytest.raises(DNSNameNotFound):
        resolver.txt(f"missing.{ZONE}")
    clock.advance(2)
    with pytest.raises(DNSTempError):
        resolver.txt(f"missing.{ZONE}")


def test_nodata_is_cached_for_the_soa_ttl_when_lower_than_minimum(
    nsd_server: NsdFactory,
) -> None:
    # RFC 2308 §5: min(SOA TTL, SOA MINIMUM); here the SOA's own TTL (20) is lower.
    server = nsd_server({ZONE: zone_text(ttl=20, negative_ttl=600)})
    clock = FakeClock()
    resolver = Resolver([server.nameserver], timeout=0.3, clock=clock)
    assert resolver.txt(f"host.{ZONE}") == []
    server.stop()
    clock.advance(19)
    assert resolver.txt(f"host.{ZONE}") == []
    clock.advance(2)
    with pytest.raises(DNSTempError):
        resolver.txt(f"host.{ZONE}")


def test_negative_ttl_is_capped(nsd_server: NsdFactory) -> None:
    server = nsd_server({ZONE: zone_text(ttl=86_400, negative_ttl=86_400)})
    clock = FakeClock()
    resolver = Resolver([server.nameserver], timeout=0.3, clock=clock)
    with pytest.raises(DNSNameNotFound):
        resolver.txt(f"missing.{ZONE}")
    server.stop()
    clock.advance(MAX_NEGATIVE_TTL - 1)
    with pytest.raises(DNSNameNotFound):
        resolver.txt(f"missing.{ZONE}")
    clock.advance(2)
    with pytest.raises(DNSTempError):
        resolver.txt(f"missing.{ZONE}")


def test_temp_errors_are_not_cached(shared_nsd: NsdServer) -> None:
    calls = {"n": 0}

    def flaky(wire: bytes, over_tcp: bool) -> bytes | None:
        calls["n"] += 1
        return rcode_reply(dns.rcode.SERVFAIL)(wire, over_tcp)

    with ScriptedDns(flaky) as server:
        resolver = Resolver([server.nameserver], timeout=1.0)
        for _ in range(2):
            with pytest.raises(DNSTempError):
                resolver.txt("x.example.test")
        assert calls["n"] == 2
        assert resolver.stats.size == 0


def test_cache_is_bounded_and_drops_the_least_recently_used(nsd_server: NsdFactory) -> None:
    server = nsd_server({ZONE: zone_text()})
    resolver = Resolver([server.nameserver], timeout=0.3, cache_size=2)
    resolver.txt(f"split.{ZONE}")
    resolver.txt(f"two.{ZONE}")
    resolver.txt(f"split.{ZONE}")  # split is now the most recently used
    resolver.txt(f"long.{ZONE}")  # evicts two
    assert resolver.stats.size == 2
    server.stop()
    assert resolver.txt(f"split.{ZONE}") == [b"v=spf1 include:a.example -all"]
    assert resolver.txt(f"long.{ZONE}") == [b"k" * 700]
    with pytest.raises(DNSTempError):
        resolver.txt(f"two.{ZONE}")


def test_cache_size_zero_disables_caching(shared_nsd: NsdServer) -> None:
    resolver = Resolver([shared_nsd.nameserver], timeout=1.0, cache_size=0)
    resolver.txt(f"split.{ZONE}")
    resolver.txt(f"split.{ZONE}")
    assert (resolver.stats.hits, resolver.stats.misses, resolver.stats.size) == (0, 2, 0)


# -- memo: values computed from answers ------------------------------------------------------


class Counted:
    """A computation from DNS answers that counts how often it really ran."""

    def __init__(self, resolver: Resolver, *names: str) -> None:
        self.resolver, self.names, self.runs = resolver, names, 0

    def __call__(self) -> tuple[bytes, ...]:
        self.runs += 1
        return tuple(b"".join(self.resolver.txt(n)) for n in self.names)


def test_memo_reuses_a_value_until_the_first_of_its_answers_expires(
    nsd_server: NsdFactory,
) -> None:
    server = nsd_server({ZONE: zone_text()})
    clock = FakeClock()
    resolver = Resolver([server.nameserver], timeout=0.3, clock=clock)
    both = Counted(resolver, f"split.{ZONE}", f"short.{ZONE}")  # TTL 300 and 30
    expected = (b"v=spf1 include:a.example -all", b"short-lived")
    assert resolver.memo("both", both) == expected
    assert resolver.memo("both", both) == expected
    assert both.runs == 1
    clock.advance(29)
    assert resolver.memo("both", both) == expected
    assert both.runs == 1
    clock.advance(2)  # short's 30 s are over: computed again, asking for short again
    assert resolver.memo("both", both) == expected
    assert both.runs == 2
    assert resolver.stats.misses == 3  # split, short, short again; never split twice
    # Another key is another computation; clear_cache forgets memos too.
    assert resolver.memo("other", both) == expected
    assert both.runs == 3
    resolver.clear_cache()
    resolver.memo("both", both)
    assert both.runs == 4


def test_memo_keeps_nothing_computed_while_a_lookup_failed() -> None:
    runs = {"n": 0}
    with ScriptedDns(rcode_reply(dns.rcode.SERVFAIL)) as broken:
        resolver = Resolver([broken.nameserver], timeout=1.0)

        def swallowed() -> str:
            """Swallows the failure, as SPF's PTR validation may: still not kept."""
            runs["n"] += 1
            try:
                resolver.txt("x.example.test")
            except DNSTempError:
                return "failed quietly"
            return "answered"

        assert resolver.memo("k", swallowed) == "failed quietly"
        assert resolver.memo("k", swallowed) == "failed quietly"
        assert runs["n"] == 2


def test_memo_keeps_nothing_refused_by_keep_or_raised_or_without_answers(
    shared_nsd: NsdServer,
) -> None:
    resolver = Resolver([shared_nsd.nameserver], timeout=1.0)
    split = Counted(resolver, f"split.{ZONE}")
    resolver.memo("refused", split, keep=lambda value: False)
    resolver.memo("refused", split, keep=lambda value: False)
    assert split.runs == 2
    runs = {"n": 0}

    def raising() -> None:
        runs["n"] += 1
        resolver.txt(f"split.{ZONE}")
        raise RuntimeError("no value")

    for _ in range(2):
        with pytest.raises(RuntimeError):
            resolver.memo("raised", raising)
    assert runs["n"] == 2
    # Nothing read from DNS: a function of the key alone, kept (until it is evicted).
    constant = Counted(resolver)
    resolver.memo("constant", constant)
    assert resolver.memo("constant", constant) == ()
    assert constant.runs == 1


def test_memo_nested_values_bound_the_outer_one(nsd_server: NsdFactory) -> None:
    server = nsd_server({ZONE: zone_text()})
    clock = FakeClock()
    resolver = Resolver([server.nameserver], timeout=0.3, clock=clock)
    inner = Counted(resolver, f"short.{ZONE}")  # TTL 30
    runs = {"outer": 0}

    def outer() -> bytes:
        runs["outer"] += 1
        return b"".join(resolver.txt(f"split.{ZONE}")) + resolver.memo("inner", inner)[0]

    resolver.memo("inner", inner)  # cached before the outer one runs: its 30 s still count
    clock.advance(10)
    resolver.memo("outer", outer)
    clock.advance(19)
    resolver.memo("outer", outer)
    assert runs["outer"] == 1
    clock.advance(2)
    resolver.memo("outer", outer)
    assert (runs["outer"], inner.runs) == (2, 2)


def test_memo_is_bounded_and_off_with_the_cache(shared_nsd: NsdServer) -> None:
    resolver = Resolver([shared_nsd.nameserver], timeout=1.0, cache_size=2)
    computations = {k: Counted(resolver, f"split.{ZONE}") for k in "abc"}
    for k in "abca":
        resolver.memo(k, computations[k])
    assert [c.runs for c in computations.values()] == [2, 1, 1]  # a was evicted by c
    off = Resolver([shared_nsd.nameserver], timeout=1.0, cache_size=0)
    split = Counted(off, f"split.{ZONE}")
    off.memo("k", split)
    off.memo("k", split)
    assert split.runs == 2


def test_concurrent_lookups_agree(shared_nsd: NsdServer) -> None:
    resolver = Resolver([shared_nsd.nameserver], timeout=2.0)
    names = ["split", "two", "long", "host", "nope"] * 8
    results: list[object] = []
    lock = threading.Lock()

    def work(label: str) -> None:
        try:
            value: object = sorted(resolver.txt(f"{label}.{ZONE}"))
        except DNSNameNotFound:
            value = "nxdomain"
        with lock:
            results.append((label, value))

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == len(names)
    assert len(set(map(repr, results))) == 5
    assert resolver.stats.hits + resolver.stats.misses == len(names)


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("192.0.2.1", ("192.0.2.1", 53)),
        ("192.0.2.1:5353", ("192.0.2.1", 5353)),
        ("2001:db8::1", ("2001:db8::1", 53)),
        ("[2001:db8::1]", ("2001:db8::1", 53)),
        ("[2001:db8::1]:5353", ("2001:db8::1", 5353)),
        ("  ::1 ", ("::1", 53)),
    ],
)
def test_parse_nameserver_forms(spec: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(spec) == expected


def test_parse_nameservers_comma_list() -> None:
    assert parse_nameservers("127.0.0.1:5353, [::1]:5354,192.0.2.53") == [
        ("127.0.0.1", 5353),
        ("::1", 5354),
        ("192.0.2.53", 53),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no nameserver"),
        ("ns.example.com", "not an IP address"),
        ("192.0.2.1:dns", "not a number"),
        ("192.0.2.1:\u0663", "not a number"),  # an Arabic-Indic digit is not a port
        ("[::1]:\u00b2", "not a number"),
        ("192.0.2.1:0", "out of range"),
        ("192.0.2.1:65536", "out of range"),
        ("[2001:db8::1", "missing ']'"),
        ("[2001:db8::1]5353", "expected ':port'"),
        ("[192.0.2.1]:53", "not an IPv6 address"),
        ("300.1.1.1:53", "not an IPv4 address"),
        ("192.0.2.1,,192.0.2.2", "entry 2"),
    ],
)
def test_parse_nameservers_rejects_junk_clearly(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_nameservers(text)


def test_resolver_reports_its_nameservers() -> None:
    resolver = Resolver(["127.0.0.1:5353", "[::1]:5354,192.0.2.1"], timeout=1.5)
    assert resolver.nameservers == [("127.0.0.1", 5353), ("::1", 5354), ("192.0.2.1", 53)]
    assert resolver.timeout == 1.5
    assert Resolver("127.0.0.1:5353, 192.0.2.1").nameservers == [
        ("127.0.0.1", 5353),
        ("192.0.2.1", 53),
    ]


def test_resolver_reads_resolv_conf_without_nameservers(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("search example.test\nnameserver 192.0.2.53\n")
    assert Resolver(resolv_conf=str(conf)).nameservers == [("192.0.2.53", 53)]


def test_resolv_conf_without_nameservers_is_a_config_error(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("search example.test\n")
    with pytest.raises(ConfigError, match=str(conf)):
        Resolver(resolv_conf=str(conf))


def test_bad_resolver_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="timeout"):
        Resolver(["127.0.0.1"], timeout=0)
    with pytest.raises(ValueError, match="cache size"):
        Resolver(["127.0.0.1"], cache_size=-1)
    with pytest.raises(ValueError, match="not an IP address"):
        Resolver(["dns.example"])
