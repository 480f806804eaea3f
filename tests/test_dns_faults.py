"""DNS faults, message by message: a real server misbehaves, the RFC result and action follow.

Each message goes through the pipeline (:class:`~authmilter.pipeline.Connection` and
:class:`~authmilter.pipeline.Transaction`) with a real :class:`~authmilter.resolver.Resolver`.
The DNS data (DKIM keys, SPF and DMARC records) is in zones a real NSD serves. In front of NSD
sits :class:`~dnsserver.FaultyDns`, which relays every query byte for byte and breaks the
one a test names: slow, dropped, SERVFAIL, REFUSED, truncated (TC) with a good or a failing
TCP answer, or malformed. The zones also hold what NSD itself serves badly: CNAME loops, and
TXT and A answers too big for UDP (TCP needed). Each fault is tried on each kind of lookup:
the DKIM key TXT, the SPF TXT, A and MX, and the DMARC TXT. For each one the tests check the
result in the Authentication-Results field, the action (On-DNSError, TempError_Defer,
RejectFailures), and what the stage waited for: which queries reached the relay in which
stage and how often, which lookups timed out and after how long the resolver let them wait,
and which were not sent because the stage's DNSDeadline was spent. No test reads the wall
clock: speed is for the benchmarks. The last tests run a real Postfix and ``authmilter run``.
docs/dns-faults.md has the table.

The resolver timeout is sub-second here (DNSTimeout is whole seconds in the configuration),
so that the 50-odd fault cases stay fast; the DNSDeadline tests use DNSTimeout 1 as
configured.
"""

from __future__ import annotations

import contextlib
import email.utils
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

import authres
import dkim
import dns.rcode
import dns.rdata
import pytest

from authmilter.config import Action, Config
from authmilter.errors import DNSNameNotFound, DNSPermError, DNSTempError
from authmilter.keys import KeyAlgorithm, PrivateKey, generate_private_key, key_record_text
from authmilter.pipeline import AddHeader, Connection, Context, Reply, Verdict
from authmilter.resolver import Resolver
from dnsserver import (
    Fault,
    FaultyDns,
    NsdServer,
    Record,
    SeenQuery,
    cname_loop,
    make_zone,
    txt_rdata,
)
from milter_fixture import AuthmilterProcess
from postfix_fixture import PostfixInstance, SmtpTempfail

AID = "mx.faults.test"
OUTSIDE = "198.51.100.25"  # the client; host.<domain> has this address, so SPF mx passes
HELO = "client.relay.test"  # relay.test has no SPF record: the HELO identity gives none
OK = "ok.test"  # the domain whose answers FaultyDns breaks
TIMEOUT = 0.5  # the resolver's per-lookup deadline in the fault matrix, seconds
SLOW = TIMEOUT * 2.5  # an answer this late is too late
PROMPT = TIMEOUT * 0.3  # an answer this late is in time
BIG = 4500  # bytes of an oversized answer: far over 512, so UDP answers are truncated
SELECTORS = ("s1", "s2", "s3", "s4", "s5")  # the signatures of the DNSDeadline tests


class Lookup(StrEnum):
    """The lookups a message needs, and the method whose result each one decides."""

    DKIM = "dkim-key-txt"
    SPF_TXT = "spf-txt"
    SPF_A = "spf-a"
    SPF_MX = "spf-mx"
    DMARC = "dmarc-txt"

    @property
    def method(self) -> str:
        return self.value.split("-")[0]

    @property
    def owner(self) -> str:
        """The owner name of the looked-up record, relative to the sender's domain."""
        return {"dkim-key-txt": "sel._domainkey", "spf-txt": "spf", "spf-a": "a",
                "spf-mx": "mx", "dmarc-txt": "_dmarc"}[self.value]  # fmt: skip

    @property
    def rdtype(self) -> str:
        return {"spf-a": "A", "spf-mx": "MX"}.get(self.value, "TXT")

    def qname(self, domain: str) -> str:
        return f"{self.owner}.{domain}"

    @property
    def label(self) -> str:
        return self.value.replace("-", "")


# -- zones --------------------------------------------------------------------------------------


def sender_records(domain: str, key: str, *, loop: Lookup | None = None,
                   big: Lookup | None = None) -> list[Record]:  # fmt: skip
    """A sender domain: key ``sel``, SPF at ``spf.<domain>`` (the MAIL FROM domain) with an
    ``a:`` that does not match and an ``mx:`` that does, DMARC ``p=reject``.

    ``loop`` makes that lookup's name a CNAME loop; ``big`` makes its answer oversized.
    """
    records: dict[Lookup, list[Record]] = {
        Lookup.DKIM: [("sel._domainkey", "TXT", txt_rdata(key))]
        + [(f"{s}._domainkey", "TXT", txt_rdata(key)) for s in SELECTORS],
        Lookup.SPF_TXT: [("spf", "TXT", txt_rdata(f"v=spf1 a:a.{domain} mx:mx.{domain} -all"))],
        Lookup.SPF_A: [("a", "A", "192.0.2.99")],
        Lookup.SPF_MX: [("mx", "MX", f"10 host.{domain}.")],
        Lookup.DMARC: [("_dmarc", "TXT", '"v=DMARC1; p=reject"')],
    }
    if loop is not None:
        records[loop] = cname_loop(loop.owner, "partner")
    if big is Lookup.DKIM:
        padded = key.replace("; p=", f"; n={'padding' * (BIG // 7)}; p=")
        records[big] = [("sel._domainkey", "TXT", txt_rdata(padded))]
    elif big is Lookup.SPF_TXT:
        # ip4: mechanisms cost no DNS lookup (RFC 7208 §4.6.4); none of them matches.
        nets = " ".join(f"ip4:10.{i // 200}.{i % 200}.0/24" for i in range(BIG // 17))
        records[big] = [("spf", "TXT", txt_rdata(
            f"v=spf1 {nets} a:a.{domain} mx:mx.{domain} -all"))]  # fmt: skip
    elif big is Lookup.SPF_A:
        records[big] = [("a", "A", f"10.1.{i // 200}.{i % 200 + 1}") for i in range(BIG // 16)]
    elif big is Lookup.DMARC:
        rua = ",".join(f"mailto:report-{i}@{domain}" for i in range(BIG // 30))
        records[big] = [("_dmarc", "TXT", txt_rdata(f"v=DMARC1; p=reject; rua={rua}"))]
    elif big is not None:
        raise ValueError(f"no oversized form for {big}")
    return [("host", "A", OUTSIDE), *(r for rs in records.values() for r in rs)]


def loop_domain(lookup: Lookup) -> str:
    return f"loop-{lookup.label}.test"


def big_domain(lookup: Lookup) -> str:
    return f"big-{lookup.label}.test"


#: Lookups that can be made too big for UDP (more than 10 MX would be a permerror by itself,
#: RFC 7208 §4.6.4, so MX has no oversized case).
BIG_LOOKUPS = (Lookup.DKIM, Lookup.SPF_TXT, Lookup.SPF_A, Lookup.DMARC)


@dataclass
class World:
    nsd: NsdServer
    dns: FaultyDns
    key: PrivateKey


@pytest.fixture(scope="module")
def world(nsd_server_module) -> Iterator[World]:  # type: ignore[no-untyped-def]
    key = generate_private_key(KeyAlgorithm.RSA, 2048)
    text = key_record_text(key)
    zones = {OK: make_zone(OK, sender_records(OK, text)),
             "relay.test": make_zone("relay.test")}  # fmt: skip
    zones[OK] += 'badkey._domainkey\tIN\tTXT\t"v=DKIM1; k=rsa; p=!!not-base64!!"\n'
    for lookup in Lookup:
        zones[loop_domain(lookup)] = make_zone(
            loop_domain(lookup), sender_records(loop_domain(lookup), text, loop=lookup)
        )
    for lookup in BIG_LOOKUPS:
        zones[big_domain(lookup)] = make_zone(
            big_domain(lookup), sender_records(big_domain(lookup), text, big=lookup)
        )
    nsd = nsd_server_module(zones)
    with FaultyDns(nsd.nameserver) as relay:
        yield World(nsd, relay, key)


@pytest.fixture()
def faulty(world: World) -> Iterator[FaultyDns]:
    """The relay, with no fault set before and after the test."""
    world.dns.set_faults({})
    yield world.dns
    world.dns.set_faults({})


# -- one message through the pipeline -------------------------------------------------------------


def signed_message(key: PrivateKey, domain: str, selectors: tuple[str, ...] = ("sel",)) -> bytes:
    """A message from ``alice@<domain>``, signed by ``domain`` once per selector (dkimpy)."""
    msg = (f"From: Alice <alice@{domain}>\r\nTo: user@ours.test\r\nSubject: dns faults\r\n"
           f"Date: {email.utils.formatdate()}\r\nMessage-ID: <{time.time_ns()}@{domain}>\r\n"
           "\r\nHello,\r\n\r\nthe money is on its way.\r\n").encode()  # fmt: skip
    signatures = b""
    for selector in selectors:
        signatures = dkim.sign(msg, selector.encode(), domain.encode(), key.dkimpy_private(),
                               include_headers=[b"from", b"to", b"subject", b"date",
                                                b"message-id"]) + signatures  # fmt: skip
    return signatures + msg


class RecordingResolver(Resolver):
    """The real resolver, noting what the tests assert instead of timing the stages: the
    budget each stage was given (:attr:`deadlines`) and every lookup that failed, in order,
    as ``(name, type, error text)`` (:attr:`failures`; NXDOMAIN is an answer, not listed).
    A timed-out lookup's text says how long it was let wait ("timed out after 0.5s"); one
    the stage's budget stopped says "not asked" and "DNSDeadline"."""

    def __init__(self, server: str, timeout: float) -> None:
        super().__init__([server], timeout=timeout)
        self.deadlines: list[float] = []
        self.failures: list[tuple[str, str, str]] = []

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        self.deadlines.append(seconds)
        with super().deadline(seconds):
            yield

    def query(self, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
        try:
            return super().query(name, rdtype)
        except DNSNameNotFound:
            raise  # an answer (NXDOMAIN), not a failure
        except (DNSTempError, DNSPermError) as exc:
            self.failures.append((name.lower().rstrip("."), rdtype.upper(), str(exc)))
            raise

    def timed_out(self) -> list[tuple[str, str, float]]:
        """The lookups that timed out, with the seconds the resolver let each one wait."""
        found = []
        for name, rdtype, text in self.failures:
            match = re.search(r"timed out after ([0-9.e+-]+)s", text)
            if match:
                found.append((name, rdtype, float(match.group(1))))
        return found

    def not_asked(self) -> list[tuple[str, str]]:
        """The lookups refused because the stage's DNSDeadline was spent (no query sent)."""
        return [(n, t) for n, t, text in self.failures if "not asked" in text
                and "DNSDeadline" in text]  # fmt: skip


@dataclass
class Outcome:
    """What one transaction gave: the RCPT reply, or the end-of-message verdict; the queries
    the relay received in each stage, and the resolver's record of budgets and failures."""

    reply: Reply | None
    verdict: Verdict | None
    rcpt_queries: list[SeenQuery]
    eom_queries: list[SeenQuery]
    resolver: RecordingResolver

    def done(self) -> Verdict:
        assert self.reply is None, f"RCPT answered {self.reply}"
        assert self.verdict is not None
        return self.verdict

    @property
    def queries(self) -> list[SeenQuery]:
        return self.rcpt_queries + self.eom_queries


def asked(queries: list[SeenQuery], name: str, rdtype: str, *, tcp: bool | None = None) -> int:
    """How many of ``queries`` were for ``name``/``rdtype`` (over TCP only, UDP only, or any)."""
    wanted = (name.lower().rstrip("."), rdtype.upper())
    return sum(1 for q in queries
               if (q.name, q.rdtype) == wanted and (tcp is None or q.tcp == tcp))  # fmt: skip


def context(server: str, conf: str = "", *, timeout: float = TIMEOUT) -> Context:
    """A fresh Resolver (empty cache) on ``server``; the configuration is verify-only."""
    cfg = Config.from_text(f"AuthservID {AID}\nMode v\n{conf}")
    return Context.build(cfg, resolver=RecordingResolver(server, timeout))


def deliver(ctx: Context, raw: bytes, *, domain: str, relay: FaultyDns,
            helo: str = HELO) -> Outcome:  # fmt: skip
    """Drive one inbound transaction as the adapter does; MAIL FROM is ``spf.<domain>``.

    The queries ``relay`` received are split by stage: up to the RCPT reply, and after it.
    """
    resolver = ctx.resolver
    assert isinstance(resolver, RecordingResolver)
    before = len(relay.seen)
    conn = Connection(ctx, hostname=None, ip=OUTSIDE)
    conn.set_helo(helo)
    txn = conn.transaction()
    txn.update_macros({"i": "4BqFAULT"})
    txn.envfrom(f"<bounce@spf.{domain}>")
    reply = txn.rcpt("<user@ours.test>").reply
    at_rcpt = len(relay.seen)
    if reply is not None:
        txn.close()
        return Outcome(reply, None, relay.seen[before:at_rcpt], [], resolver)
    head, _, body = raw.partition(b"\r\n\r\n")
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            name, value = fields[-1]
            fields[-1] = (name, value + b"\n" + line)  # the milter protocol's LF folding
        else:
            raw_name, _, value = line.partition(b":")
            fields.append((raw_name.decode(), value))
    for name, value in fields:
        txn.header(name, value)
    txn.eoh()
    txn.body(body)
    verdict = txn.eom()
    seen = list(relay.seen)
    return Outcome(None, verdict, seen[before:at_rcpt], seen[at_rcpt:], resolver)


def ar_results(verdict: Verdict) -> dict[str, list[str]]:
    """Our Authentication-Results, parsed: method → results (one per DKIM signature)."""
    (value,) = [e.value for e in verdict.edits
                if isinstance(e, AddHeader) and e.name == "Authentication-Results"]  # fmt: skip
    parsed = authres.all_features().parse_value(" ".join(value.split()))
    assert parsed.authserv_id == AID
    found: dict[str, list[str]] = {}
    for result in parsed.results:
        found.setdefault(result.method, []).append(result.result)
    return found


def has_ar(verdict: Verdict) -> bool:
    return any(isinstance(e, AddHeader) and e.name == "Authentication-Results"
               for e in verdict.edits)  # fmt: skip


# -- the matrix: each fault on each lookup ---------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One fault on one lookup, and the RFC result of the method that lookup serves."""

    fault: str
    lookup: Lookup
    result: str  # pass, temperror or permerror
    domain: str = OK
    relay_fault: Fault | None = None  # what FaultyDns does to the lookup
    times_out: bool = False  # the stage waits for the lookup until the resolver's timeout
    tcp: bool = False  # the answer must be (or was tried to be) fetched over TCP

    def __str__(self) -> str:
        return f"{self.fault}-{self.lookup.value}"


RELAY_FAULTS: list[tuple[str, Fault, str, bool, bool]] = [
    # name, fault, RFC result, the lookup times out, goes to TCP
    ("slow", Fault.slow(SLOW), "temperror", True, False),
    ("slow-within-timeout", Fault.slow(PROMPT), "pass", False, False),
    ("drop", Fault.drop(), "temperror", True, False),
    ("servfail", Fault.answer(dns.rcode.SERVFAIL), "temperror", False, False),
    ("refused", Fault.answer(dns.rcode.REFUSED), "temperror", False, False),
    ("tc-then-tcp-answer", Fault.truncated(tcp_ok=True), "pass", False, True),
    ("tc-then-tcp-fails", Fault.truncated(tcp_ok=False), "temperror", False, True),
    ("malformed", Fault.malformed(), "permerror", False, True),
]

CASES = [
    Case(name, lookup, result, relay_fault=fault, times_out=times_out, tcp=tcp)
    for name, fault, result, times_out, tcp in RELAY_FAULTS for lookup in Lookup
] + [
    # NSD serves `x CNAME partner` / `partner CNAME x`: a broken zone, not a passing trouble.
    Case("cname-loop", lookup, "permerror", domain=loop_domain(lookup)) for lookup in Lookup
] + [
    # NSD truncates the UDP answer; the resolver asks again over TCP and gets it whole.
    Case("oversized", lookup, "pass", domain=big_domain(lookup), tcp=True)
    for lookup in BIG_LOOKUPS
] + [
    # The same, with TCP blocked on the way (a firewall that only lets UDP/53 through).
    Case("oversized-tcp-blocked", lookup, "temperror", domain=big_domain(lookup),
         relay_fault=Fault.no_tcp(), tcp=True)
    for lookup in BIG_LOOKUPS
]  # fmt: skip


def expected_results(case: Case) -> dict[str, str]:
    """Every method passes but the one whose lookup is broken. DMARC still passes when only
    DKIM or only SPF is broken: the other one is aligned and passes (RFC 7489 §4.2)."""
    results = {"dkim": "pass", "spf": "pass", "dmarc": "pass"}
    results[case.lookup.method] = case.result
    return results


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fault_gives_the_rfc_result_and_the_default_action(world: World, faulty: FaultyDns,
                                                           case: Case) -> None:  # fmt: skip
    name = case.lookup.qname(case.domain)
    if case.relay_fault is not None:
        faulty.set_faults({(name, case.lookup.rdtype): case.relay_fault})
    raw = signed_message(world.key, case.domain)
    outcome = deliver(context(faulty.nameserver), raw, domain=case.domain, relay=faulty)
    verdict = outcome.done()
    expected = expected_results(case)
    rdtype = case.lookup.rdtype

    # The broken lookup was really made, in the stage of its method (SPF at RCPT, DKIM and
    # DMARC at end of message) and not in the other: once over UDP, and once more over TCP
    # where the case needs it. No message asks (and waits for) the same lookup twice.
    stage, other = ((outcome.rcpt_queries, outcome.eom_queries) if case.lookup.method == "spf"
                    else (outcome.eom_queries, outcome.rcpt_queries))  # fmt: skip
    assert asked(stage, name, rdtype) >= 1 and asked(other, name, rdtype) == 0, outcome.queries
    assert asked(stage, name, rdtype, tcp=False) == 1, outcome.queries
    assert asked(stage, name, rdtype, tcp=True) == (1 if case.tcp else 0), outcome.queries
    # The log line names every result.
    for method, result in expected.items():
        assert f"{method}={result}" in verdict.log, verdict.log

    if case.lookup is Lookup.DKIM and case.result != "pass":
        # RFC 6376 §6.1.2: the key could not be had. temperror (or permerror for a broken
        # answer) is a DNS problem: On-DNSError, default tempfail, RFC 3463 X.4.3.
        assert verdict.action is Action.TEMPFAIL
        assert verdict.reply is not None and (verdict.reply.code, verdict.reply.xcode) == (
            "451", "4.4.3")  # fmt: skip
        assert f"dkim={case.result} d={case.domain} s=sel" in verdict.log
        assert not has_ar(verdict)
    else:
        # SPF: TempError_Defer and PermError_reject are off by default (policyd-spf), DMARC:
        # RejectFailures is off by default (OpenDMARC): the result is written, mail accepted.
        assert verdict.action is Action.ACCEPT, verdict.log
        assert ar_results(verdict) == {m: [r] for m, r in expected.items()}

    # What the message waited for: only the broken lookup failed; where it times out, the
    # resolver let it wait one TIMEOUT, and no other lookup of the message timed out. No
    # budget ran out (nothing was refused unasked).
    resolver = outcome.resolver
    failures = [(n, t) for n, t, _ in resolver.failures]
    assert failures == ([] if case.result == "pass" else [(name, rdtype)]), resolver.failures
    assert resolver.timed_out() == ([(name, rdtype, TIMEOUT)] if case.times_out else [])
    assert resolver.not_asked() == []


DKIM_FAULTS = [c for c in CASES if c.lookup is Lookup.DKIM and c.result != "pass"]


@pytest.mark.parametrize("case", DKIM_FAULTS, ids=str)
def test_key_lookup_fault_with_on_dnserror_accept_is_delivered_with_the_result(
    world: World, faulty: FaultyDns, case: Case
) -> None:
    name = case.lookup.qname(case.domain)
    if case.relay_fault is not None:
        faulty.set_faults({(name, "TXT"): case.relay_fault})
    ctx = context(faulty.nameserver, "On-DNSError accept\n")
    verdict = deliver(ctx, signed_message(world.key, case.domain), domain=case.domain,
                      relay=faulty).done()  # fmt: skip
    assert verdict.action is Action.ACCEPT and verdict.reply is None
    assert ar_results(verdict) == {"dkim": [case.result], "spf": ["pass"], "dmarc": ["pass"]}


def assert_failed_once_at_eom(outcome: Outcome, name: str, times_out: bool) -> None:
    """``name`` TXT was asked for once, at end of message, and was the one lookup that failed;
    it waited out the resolver's TIMEOUT when ``times_out``, and nothing else did."""
    assert asked(outcome.eom_queries, name, "TXT", tcp=False) == 1, outcome.queries
    assert asked(outcome.rcpt_queries, name, "TXT") == 0, outcome.queries
    assert [(n, t) for n, t, _ in outcome.resolver.failures] == [(name, "TXT")]
    assert outcome.resolver.timed_out() == ([(name, "TXT", TIMEOUT)] if times_out else [])


@pytest.mark.parametrize(
    ("fault", "times_out"),
    [(Fault.answer(dns.rcode.SERVFAIL), False), (Fault.drop(), True)],
    ids=["servfail", "drop"],
)
def test_key_lookup_fault_with_on_dnserror_reject_is_rejected(
    world: World, faulty: FaultyDns, fault: Fault, times_out: bool
) -> None:
    faulty.set_faults({(Lookup.DKIM.qname(OK), "TXT"): fault})
    outcome = deliver(context(faulty.nameserver, "On-DNSError reject\n"),
                      signed_message(world.key, OK), domain=OK, relay=faulty)  # fmt: skip
    verdict = outcome.done()
    assert verdict.action is Action.REJECT
    assert verdict.reply is not None and (verdict.reply.code, verdict.reply.xcode) == (
        "550", "5.7.1")  # fmt: skip
    assert "temperror for d=ok.test" in verdict.reply.text
    assert_failed_once_at_eom(outcome, Lookup.DKIM.qname(OK), times_out)


def test_malformed_key_record_is_permerror_under_on_bad_signature_not_on_dnserror(
    world: World, faulty: FaultyDns
) -> None:
    """DNS worked; the record is broken (p= not base64): RFC 6376 §3.6.1 permerror."""
    raw = signed_message(world.key, OK, ("badkey",))
    verdict = deliver(context(faulty.nameserver, "On-DNSError reject\n"), raw, domain=OK,
                      relay=faulty).done()  # fmt: skip
    assert verdict.action is Action.ACCEPT  # On-BadSignature defaults to accept
    assert ar_results(verdict) == {"dkim": ["permerror"], "spf": ["pass"], "dmarc": ["pass"]}
    verdict = deliver(context(faulty.nameserver, "On-BadSignature reject\n"), raw,
                      domain=OK, relay=faulty).done()  # fmt: skip
    assert verdict.action is Action.REJECT
    assert verdict.reply is not None and verdict.reply.code == "550"


@pytest.mark.parametrize("lookup", [Lookup.SPF_TXT, Lookup.SPF_A, Lookup.SPF_MX])
def test_spf_temperror_is_deferred_at_rcpt_with_tempError_defer(
    world: World, faulty: FaultyDns, lookup: Lookup
) -> None:
    """RFC 7208 §2.6.6 temperror; policyd-spf's TempError_Defer decides (RFC 7372 4.7.24)."""
    name = lookup.qname(OK)
    faulty.set_faults({(name, lookup.rdtype): Fault.answer(dns.rcode.SERVFAIL)})
    raw = signed_message(world.key, OK)
    outcome = deliver(context(faulty.nameserver, "TempError_Defer yes\nMail_From_reject Fail\n"),
                      raw, domain=OK, relay=faulty)  # fmt: skip
    assert outcome.reply is not None
    assert (outcome.reply.code, outcome.reply.xcode) == ("450", "4.7.24")
    # The SERVFAIL was taken at once: asked once, not retried, and nothing waited for a timeout.
    assert asked(outcome.rcpt_queries, name, lookup.rdtype) == 1, outcome.rcpt_queries
    assert [(n, t) for n, t, _ in outcome.resolver.failures] == [(name, lookup.rdtype)]
    assert outcome.resolver.timed_out() == []
    # On-DNSError is OpenDKIM's: it does not act on SPF.
    outcome = deliver(context(faulty.nameserver, "On-DNSError reject\n"), raw, domain=OK,
                      relay=faulty)  # fmt: skip
    assert ar_results(outcome.done())["spf"] == ["temperror"]
    assert outcome.done().action is Action.ACCEPT


def test_spf_permerror_from_a_broken_answer_is_rejected_with_permerror_reject(
    world: World, faulty: FaultyDns
) -> None:
    faulty.set_faults({(Lookup.SPF_TXT.qname(OK), "TXT"): Fault.malformed()})
    outcome = deliver(context(faulty.nameserver, "PermError_reject yes\nMail_From_reject Fail\n"),
                      signed_message(world.key, OK), domain=OK, relay=faulty)  # fmt: skip
    assert outcome.reply is not None
    assert (outcome.reply.code, outcome.reply.xcode) == ("550", "5.7.24")


@pytest.mark.parametrize(
    ("fault", "times_out"),
    [(Fault.answer(dns.rcode.SERVFAIL), False), (Fault.drop(), True)],
    ids=["servfail", "drop"],
)
def test_dmarc_temperror_tempfails_with_reject_failures(
    world: World, faulty: FaultyDns, fault: Fault, times_out: bool
) -> None:
    """RFC 7489 §6.6.3 / OpenDMARC: a DMARC temperror is a tempfail when enforcing."""
    faulty.set_faults({(Lookup.DMARC.qname(OK), "TXT"): fault})
    outcome = deliver(context(faulty.nameserver, "RejectFailures yes\n"),
                      signed_message(world.key, OK), domain=OK, relay=faulty)  # fmt: skip
    verdict = outcome.done()
    assert verdict.action is Action.TEMPFAIL
    assert verdict.reply is not None and (verdict.reply.code, verdict.reply.xcode) == (
        "451", "4.4.3")  # fmt: skip
    assert "dmarc=temperror header.from=ok.test" in verdict.log
    assert_failed_once_at_eom(outcome, Lookup.DMARC.qname(OK), times_out)


def test_aligned_identifiers_with_temporary_errors_make_dmarc_temperror_not_a_reject(
    world: World, faulty: FaultyDns
) -> None:
    """p=reject and RejectFailures: a DNS hiccup on the aligned DKIM key and SPF record must
    not bounce the message (RFC 7489 §11.2); it is deferred, to be tried again."""
    servfail = Fault.answer(dns.rcode.SERVFAIL)
    faulty.set_faults({(Lookup.DKIM.qname(OK), "TXT"): servfail,
                       (Lookup.SPF_TXT.qname(OK), "TXT"): servfail})  # fmt: skip
    raw = signed_message(world.key, OK)
    verdict = deliver(context(faulty.nameserver, "On-DNSError accept\nRejectFailures yes\n"),
                      raw, domain=OK, relay=faulty).done()  # fmt: skip
    assert verdict.action is Action.TEMPFAIL
    assert verdict.reply is not None and (verdict.reply.code, verdict.reply.xcode) == (
        "451", "4.4.3")  # fmt: skip
    assert "dmarc=temperror header.from=ok.test" in verdict.log
    verdict = deliver(context(faulty.nameserver, "On-DNSError accept\n"), raw, domain=OK,
                      relay=faulty).done()  # fmt: skip
    assert verdict.action is Action.ACCEPT
    assert ar_results(verdict) == {"dkim": ["temperror"], "spf": ["temperror"],
                                   "dmarc": ["temperror"]}  # fmt: skip


def test_dmarc_permerror_from_a_cname_loop_is_not_a_tempfail(
    world: World, faulty: FaultyDns
) -> None:
    """A broken zone will not heal by retrying: reported, never deferred."""
    domain = loop_domain(Lookup.DMARC)
    verdict = deliver(context(faulty.nameserver, "RejectFailures yes\n"),
                      signed_message(world.key, domain), domain=domain,
                      relay=faulty).done()  # fmt: skip
    assert verdict.action is Action.ACCEPT
    assert ar_results(verdict)["dmarc"] == ["permerror"]


# -- DNSDeadline: one budget per stage ------------------------------------------------------------


def drop_everything_at_eom(faulty: FaultyDns) -> list[tuple[str, str]]:
    names = [(f"{s}._domainkey.{OK}", "TXT") for s in SELECTORS] + [(f"_dmarc.{OK}", "TXT")]
    faulty.set_faults(dict.fromkeys(names, Fault.drop()))
    return names


DEADLINE_CONF = "DNSTimeout 1\nDNSDeadline 2\n"


@pytest.mark.parametrize(("on_dns_error", "max_signatures"),
                         [("tempfail", 5), ("accept", 5), ("tempfail", 0)])  # fmt: skip
def test_eom_whose_lookups_all_time_out_stops_asking_once_dns_deadline_is_spent(
    world: World, faulty: FaultyDns, on_dns_error: str, max_signatures: int
) -> None:
    """Five key lookups and the DMARC lookup, each 1 s to time out: 6 s without a budget.

    MaximumSignaturesToVerify 0 (every signature of the author domain, no count limit) has
    nothing but DNSDeadline to bound it.
    """
    names = drop_everything_at_eom(faulty)
    conf = (f"{DEADLINE_CONF}MaximumSignaturesToVerify {max_signatures}\n"
            f"On-DNSError {on_dns_error}\n")  # fmt: skip
    ctx = context(faulty.nameserver, conf, timeout=1.0)
    assert ctx.config.dns_deadline == 2
    outcome = deliver(ctx, signed_message(world.key, OK, SELECTORS), domain=OK, relay=faulty)
    verdict = outcome.done()
    resolver = outcome.resolver
    # Each stage ran under the configured budget: RCPT, then end of message.
    assert resolver.deadlines == [2, 2]
    # The first lookup had the whole DNSTimeout (2 s were left); the waits the resolver allowed
    # add up to no more than the budget (give or take the 3 digits of the error text) ...
    timed = resolver.timed_out()
    assert 1 <= len(timed) <= 3, resolver.failures
    assert timed[0][2] == 1.0
    assert sum(seconds for _, _, seconds in timed) <= 2 + 0.01, timed
    # ... and once it was spent, the other lookups failed without a query: every one of the
    # six either timed out (and reached the relay once) or was not sent at all.
    unasked = resolver.not_asked()
    assert sorted([(n, t) for n, t, _ in timed] + unasked) == sorted(names), resolver.failures
    for n, t, _ in timed:
        assert asked(outcome.eom_queries, n, t) == 1, outcome.eom_queries
    for n, t in unasked:
        assert asked(outcome.queries, n, t) == 0, outcome.queries
    assert sum(faulty.count(n, t) for n, t in names) == len(timed)
    assert verdict.log.count("dkim=temperror") == 5
    assert "dmarc=temperror" in verdict.log
    assert "DNSDeadline" in verdict.log
    if on_dns_error == "tempfail":
        assert verdict.action is Action.TEMPFAIL
        assert verdict.reply is not None and (verdict.reply.code, verdict.reply.xcode) == (
            "451", "4.4.3")  # fmt: skip
    else:
        assert verdict.action is Action.ACCEPT
        assert ar_results(verdict) == {"dkim": ["temperror"] * 5, "spf": ["pass"],
                                       "dmarc": ["temperror"]}  # fmt: skip


def test_without_a_tight_deadline_the_same_message_waits_for_every_lookup(
    world: World, faulty: FaultyDns
) -> None:
    """The control for the test above: each lookup times out in turn, all six are asked."""
    names = drop_everything_at_eom(faulty)
    ctx = context(faulty.nameserver, "DNSDeadline 60\nMaximumSignaturesToVerify 5\n",
                  timeout=TIMEOUT)  # fmt: skip
    outcome = deliver(ctx, signed_message(world.key, OK, SELECTORS), domain=OK, relay=faulty)
    resolver = outcome.resolver
    assert resolver.deadlines == [60, 60]
    # Every lookup was sent and waited out its whole TIMEOUT; the budget refused none.
    assert sorted(resolver.timed_out()) == sorted((n, t, TIMEOUT) for n, t in names)
    assert resolver.not_asked() == []
    assert sum(faulty.count(n, t) for n, t in names) == 6
    assert outcome.done().action is Action.TEMPFAIL


def test_rcpt_stage_spf_stops_asking_at_dns_deadline_and_eom_gets_its_own_budget(
    world: World, faulty: FaultyDns
) -> None:
    """HELO and MAIL FROM SPF records both time out; DNSDeadline 1 stops after the first."""
    helo_txt, mailfrom_txt = (HELO, "TXT"), (Lookup.SPF_TXT.qname(OK), "TXT")
    faulty.set_faults({helo_txt: Fault.drop(), mailfrom_txt: Fault.drop()})
    raw = signed_message(world.key, OK)
    ctx = context(faulty.nameserver,
                  "DNSTimeout 1\nDNSDeadline 1\nTempError_Defer yes\nMail_From_reject Fail\n",
                  timeout=1.0)  # fmt: skip
    outcome = deliver(ctx, raw, domain=OK, relay=faulty)
    assert outcome.reply is not None
    assert (outcome.reply.code, outcome.reply.xcode) == ("450", "4.7.24")
    assert_rcpt_budget_spent_on_helo(outcome, helo_txt, mailfrom_txt)
    assert outcome.resolver.deadlines == [1]

    faulty.set_faults({helo_txt: Fault.drop(), mailfrom_txt: Fault.drop()})
    ctx = context(faulty.nameserver, "DNSTimeout 1\nDNSDeadline 1\n", timeout=1.0)
    outcome = deliver(ctx, raw, domain=OK, relay=faulty)
    verdict = outcome.done()
    assert_rcpt_budget_spent_on_helo(outcome, helo_txt, mailfrom_txt)
    # End of message starts a new budget: the key and DMARC lookups are sent, and answered.
    assert outcome.resolver.deadlines == [1, 1]
    assert asked(outcome.eom_queries, Lookup.DKIM.qname(OK), "TXT") == 1, outcome.eom_queries
    assert asked(outcome.eom_queries, Lookup.DMARC.qname(OK), "TXT") == 1, outcome.eom_queries
    assert verdict.action is Action.ACCEPT
    assert ar_results(verdict) == {"dkim": ["pass"], "spf": ["temperror"], "dmarc": ["pass"]}


def assert_rcpt_budget_spent_on_helo(outcome: Outcome, helo_txt: tuple[str, str],
                                     mailfrom_txt: tuple[str, str]) -> None:  # fmt: skip
    """The HELO lookup was sent and waited out the 1 s budget (DNSTimeout 1, no more); the
    MAIL FROM lookup came after it and was refused unsent."""
    assert asked(outcome.rcpt_queries, *helo_txt) == 1, outcome.rcpt_queries
    assert asked(outcome.queries, *mailfrom_txt) == 0, outcome.queries
    ((name, rdtype, seconds),) = outcome.resolver.timed_out()
    assert (name, rdtype) == helo_txt and 0 < seconds <= 1.0
    assert outcome.resolver.not_asked() == [mailfrom_txt]


# -- the real thing: Postfix → authmilter run → FaultyDns → NSD -----------------------------------


@dataclass
class Stack:
    milter: AuthmilterProcess
    postfix: PostfixInstance

    def send(self, raw: bytes, *, domain: str = OK, helo: str = HELO) -> tuple[int, str]:
        return self.postfix.send(raw, mail_from=f"bounce@spf.{domain}",
                                 rcpt_to=["user@ours.test"], port="inbound",
                                 client_ip=OUTSIDE, helo=helo)  # fmt: skip


#: Postfix waits at most this long for the end-of-message reply: more than DNSDeadline (2 s),
#: less than the six lookups' 6 s. If the deadline did not hold, Postfix would give up on the
#: milter and answer its own 451 4.7.1 (milter_default_action = tempfail), not our 4.4.3.
CONTENT_TIMEOUT = 4


def start_stack(world: World, conf: str) -> Stack:
    milter = AuthmilterProcess(
        f"AuthservID {AID}\nMode v\nNameservers {world.dns.nameserver}\n{DEADLINE_CONF}"
        f"MaximumSignaturesToVerify 5\n{conf}"
    ).start()
    postfix = PostfixInstance(
        milter.postfix_socket,
        main_cf={"milter_content_timeout": f"{CONTENT_TIMEOUT}s", "milter_command_timeout": "4s"},
    )
    return Stack(milter, postfix.start())


@pytest.fixture(scope="module")
def tempfailing(world: World) -> Iterator[Stack]:
    stack = start_stack(world, "TempError_Defer yes\nMail_From_reject Fail\n")
    yield stack
    stack.postfix.stop()
    stack.milter.cleanup()


@pytest.fixture(scope="module")
def accepting(world: World) -> Iterator[Stack]:
    stack = start_stack(world, "On-DNSError accept\n")
    yield stack
    stack.postfix.stop()
    stack.milter.cleanup()


def test_postfix_answers_our_451_4_4_3_at_end_of_data_not_its_milter_timeout(
    world: World, faulty: FaultyDns, tempfailing: Stack
) -> None:
    names = drop_everything_at_eom(faulty)
    with pytest.raises(SmtpTempfail) as exc:
        tempfailing.send(signed_message(world.key, OK, SELECTORS))
    assert exc.value.stage == "data" and exc.value.code == 451
    assert "4.4.3" in exc.value.text, exc.value.text  # ours, not Postfix's milter timeout
    # What Postfix logs when the milter is too slow is not there: "warning: milter …: can't
    # read SMFIC_BODYEOB reply packet header: Connection timed out".
    assert "can't read" not in tempfailing.postfix.log()
    assert 1 <= sum(faulty.count(n, t) for n, t in names) <= 3  # the budget, in the milter
    log = tempfailing.milter.wait_log("dkim=temperror")
    assert "action=tempfail" in log
    assert tempfailing.postfix.delivered() == []


def test_postfix_defers_at_rcpt_with_our_450_4_7_24_on_spf_temperror(
    world: World, faulty: FaultyDns, tempfailing: Stack
) -> None:
    # Names no other message resolved: the milter's cache (one per worker) cannot answer.
    domain, helo = loop_domain(Lookup.DMARC), "rcpt-stage.relay.test"
    mailfrom_txt = (Lookup.SPF_TXT.qname(domain), "TXT")
    faulty.set_faults({(helo, "TXT"): Fault.drop(), mailfrom_txt: Fault.drop()})
    with pytest.raises(SmtpTempfail) as exc:
        tempfailing.send(signed_message(world.key, domain), domain=domain, helo=helo)
    # Ours (RFC 7372), not what Postfix says when the milter outlasts milter_command_timeout
    # (DNSDeadline 2 < 4 s): the milter answered RCPT itself.
    assert exc.value.stage == "rcpt" and exc.value.code == 450
    assert "4.7.24" in exc.value.text, exc.value.text
    assert faulty.count(helo, "TXT") == 1  # asked once, not answered from a cache
    assert faulty.count(*mailfrom_txt) <= 1  # each lookup waited for once, at most


def test_on_dnserror_accept_delivers_with_temperror_before_postfix_gives_up(
    world: World, faulty: FaultyDns, accepting: Stack
) -> None:
    """Had the end of message outlasted milter_content_timeout, Postfix would have answered
    451 4.7.1 itself (milter_default_action = tempfail): the delivery is the proof."""
    names = drop_everything_at_eom(faulty)
    accepting.send(signed_message(world.key, OK, SELECTORS))
    (delivered,) = accepting.postfix.wait_delivered(1)
    assert 1 <= sum(faulty.count(n, t) for n, t in names) <= 3  # the budget, in the milter
    msg = email.message_from_bytes(delivered)
    (value,) = [" ".join(str(v).split()) for v in msg.get_all("Authentication-Results") or []
                if str(v).strip().startswith(AID)]  # fmt: skip
    parsed = authres.all_features().parse_value(value)
    results = [(r.method, r.result) for r in parsed.results]
    assert results == [("dkim", "temperror")] * 5 + [("spf", "pass"), ("dmarc", "temperror")]
