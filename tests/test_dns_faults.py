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
RejectFailures), and how long the stage took. The last tests run a real Postfix and
``authmilter run``. docs/dns-faults.md has the table.

The resolver timeout is sub-second here (DNSTimeout is whole seconds in the configuration),
so that the 50-odd fault cases stay fast; the DNSDeadline tests use DNSTimeout 1 as
configured.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

import authres
import dkim
import dns.rcode
import pytest

from authmilter.config import Action, Config
from authmilter.keys import KeyAlgorithm, PrivateKey, generate_private_key, key_record_text
from authmilter.pipeline import AddHeader, Connection, Context, Reply, Verdict
from authmilter.resolver import Resolver
from dnsserver import Fault, FaultyDns, NsdServer, Record, cname_loop, make_zone, txt_rdata
from milter_fixture import AuthmilterProcess
from postfix_fixture import PostfixInstance, SmtpTempfail

AID = "mx.faults.test"
OUTSIDE = "198.51.100.25"  # the client; host.<domain> has this address, so SPF mx passes
HELO = "client.relay.test"  # relay.test has no SPF record: the HELO identity gives none
OK = "ok.test"  # the domain whose answers FaultyDns breaks
TIMEOUT = 0.5  # the resolver's per-lookup deadline in the fault matrix, seconds
SLOW = TIMEOUT * 2.5  # an answer this late is too late
PROMPT = TIMEOUT * 0.3  # an answer this late is in time
MARGIN = 0.8  # seconds allowed beyond the DNS waits for everything else in one stage
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


@dataclass
class Outcome:
    """What one transaction gave: the RCPT reply, or the end-of-message verdict; and times."""

    reply: Reply | None
    verdict: Verdict | None
    rcpt_seconds: float
    eom_seconds: float

    @property
    def seconds(self) -> float:
        return self.rcpt_seconds + self.eom_seconds

    def done(self) -> Verdict:
        assert self.reply is None, f"RCPT answered {self.reply}"
        assert self.verdict is not None
        return self.verdict


def context(server: str, conf: str = "", *, timeout: float = TIMEOUT) -> Context:
    """A fresh Resolver (empty cache) on ``server``; the configuration is verify-only."""
    cfg = Config.from_text(f"AuthservID {AID}\nMode v\n{conf}")
    return Context.build(cfg, resolver=Resolver([server], timeout=timeout))


def deliver(ctx: Context, raw: bytes, *, domain: str, helo: str = HELO) -> Outcome:
    """Drive one inbound transaction as the adapter does; MAIL FROM is ``spf.<domain>``."""
    conn = Connection(ctx, hostname=None, ip=OUTSIDE)
    conn.set_helo(helo)
    txn = conn.transaction()
    txn.update_macros({"i": "4BqFAULT"})
    txn.envfrom(f"<bounce@spf.{domain}>")
    started = time.monotonic()
    reply = txn.rcpt("<user@ours.test>")
    rcpt_seconds = time.monotonic() - started
    if reply is not None:
        txn.close()
        return Outcome(reply, None, rcpt_seconds, 0.0)
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
    started = time.monotonic()
    verdict = txn.eom()
    return Outcome(None, verdict, rcpt_seconds, time.monotonic() - started)


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
    waits: float = 0.0  # how long the stage must wait for the lookup (a timeout, a delay)
    tcp: bool = False  # the answer must be (or was tried to be) fetched over TCP

    def __str__(self) -> str:
        return f"{self.fault}-{self.lookup.value}"


RELAY_FAULTS: list[tuple[str, Fault, str, float, bool]] = [
    # name, fault, RFC result, how long the lookup waits, goes to TCP
    ("slow", Fault.slow(SLOW), "temperror", TIMEOUT, False),
    ("slow-within-timeout", Fault.slow(PROMPT), "pass", PROMPT, False),
    ("drop", Fault.drop(), "temperror", TIMEOUT, False),
    ("servfail", Fault.answer(dns.rcode.SERVFAIL), "temperror", 0.0, False),
    ("refused", Fault.answer(dns.rcode.REFUSED), "temperror", 0.0, False),
    ("tc-then-tcp-answer", Fault.truncated(tcp_ok=True), "pass", 0.0, True),
    ("tc-then-tcp-fails", Fault.truncated(tcp_ok=False), "temperror", 0.0, True),
    ("malformed", Fault.malformed(), "permerror", 0.0, True),
]

CASES = [
    Case(name, lookup, result, relay_fault=fault, waits=waits, tcp=tcp)
    for name, fault, result, waits, tcp in RELAY_FAULTS for lookup in Lookup
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
    outcome = deliver(context(faulty.nameserver), raw, domain=case.domain)
    verdict = outcome.done()
    expected = expected_results(case)

    # The broken lookup was really made, over TCP where the case needs it.
    assert faulty.count(name, case.lookup.rdtype) >= 1
    if case.tcp:
        assert faulty.count(name, case.lookup.rdtype, tcp=True) >= 1
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

    # Time: the stage of the broken lookup waits for it (a timeout, or the slow answer that
    # came in time), and not much longer; no message takes more than one timeout.
    stage = outcome.rcpt_seconds if case.lookup.method == "spf" else outcome.eom_seconds
    assert case.waits * 0.9 <= stage < case.waits + MARGIN
    assert outcome.seconds < TIMEOUT + MARGIN


DKIM_FAULTS = [c for c in CASES if c.lookup is Lookup.DKIM and c.result != "pass"]


@pytest.mark.parametrize("case", DKIM_FAULTS, ids=str)
def test_key_lookup_fault_with_on_dnserror_accept_is_delivered_with_the_result(
    world: World, faulty: FaultyDns, case: Case
) -> None:
    name = case.lookup.qname(case.domain)
    if case.relay_fault is not None:
        faulty.set_faults({(name, "TXT"): case.relay_fault})
    ctx = context(faulty.nameserver, "On-DNSError accept\n")
    verdict = deliver(ctx, signed_message(world.key, case.domain), domain=case.domain).done()
    assert verdict.action is Action.ACCEPT and verdict.reply is None
    assert ar_results(verdict) == {"dkim": [case.result], "spf": ["pass"], "dmarc": ["pass"]}


@pytest.mark.parametrize(
    ("fault", "waits"),
    [(Fault.answer(dns.rcode.SERVFAIL), False), (Fault.drop(), True)],
    ids=["servfail", "drop"],
)
def test_key_lookup_fault_with_on_dnserror_reject_is_rejected(
    world: World, faulty: FaultyDns, fault: Fault, waits: bool
) -> None:
    faulty.set_faults({(Lookup.DKIM.qname(OK), "TXT"): fault})
    outcome = deliver(context(faulty.nameserver, "On-DNSError reject\n"),
                      signed_message(world.key, OK), domain=OK)  # fmt: skip
    verdict = outcome.done()
    assert verdict.action is Action.REJECT
    assert verdict.reply is not None and (verdict.reply.code, verdict.reply.xcode) == (
        "550", "5.7.1")  # fmt: skip
    assert "temperror for d=ok.test" in verdict.reply.text
    assert outcome.eom_seconds < (TIMEOUT if waits else 0) + MARGIN


def test_malformed_key_record_is_permerror_under_on_bad_signature_not_on_dnserror(
    world: World, faulty: FaultyDns
) -> None:
    """DNS worked; the record is broken (p= not base64): RFC 6376 §3.6.1 permerror."""
    raw = signed_message(world.key, OK, ("badkey",))
    verdict = deliver(context(faulty.nameserver, "On-DNSError reject\n"), raw, domain=OK).done()
    assert verdict.action is Action.ACCEPT  # On-BadSignature defaults to accept
    assert ar_results(verdict) == {"dkim": ["permerror"], "spf": ["pass"], "dmarc": ["pass"]}
    verdict = deliver(context(faulty.nameserver, "On-BadSignature reject\n"), raw,
                      domain=OK).done()  # fmt: skip
    assert verdict.action is Action.REJECT
    assert verdict.reply is not None and verdict.reply.code == "550"


@pytest.mark.parametrize("lookup", [Lookup.SPF_TXT, Lookup.SPF_A, Lookup.SPF_MX])
def test_spf_temperror_is_deferred_at_rcpt_with_tempError_defer(
    world: World, faulty: FaultyDns, lookup: Lookup
) -> None:
    """RFC 7208 §2.6.6 temperror; policyd-spf's TempError_Defer decides (RFC 7372 4.7.24)."""
    faulty.set_faults({(lookup.qname(OK), lookup.rdtype): Fault.answer(dns.rcode.SERVFAIL)})
    raw = signed_message(world.key, OK)
    outcome = deliver(context(faulty.nameserver, "TempError_Defer yes\nMail_From_reject Fail\n"),
                      raw, domain=OK)  # fmt: skip
    assert outcome.reply is not None
    assert (outcome.reply.code, outcome.reply.xcode) == ("450", "4.7.24")
    assert outcome.rcpt_seconds < MARGIN
    # On-DNSError is OpenDKIM's: it does not act on SPF.
    outcome = deliver(context(faulty.nameserver, "On-DNSError reject\n"), raw, domain=OK)
    assert ar_results(outcome.done())["spf"] == ["temperror"]
    assert outcome.done().action is Action.ACCEPT


def test_spf_permerror_from_a_broken_answer_is_rejected_with_permerror_reject(
    world: World, faulty: FaultyDns
) -> None:
    faulty.set_faults({(Lookup.SPF_TXT.qname(OK), "TXT"): Fault.malformed()})
    outcome = deliver(context(faulty.nameserver, "PermError_reject yes\nMail_From_reject Fail\n"),
                      signed_message(world.key, OK), domain=OK)  # fmt: skip
    assert outcome.reply is not None
    assert (outcome.reply.code, outcome.reply.xcode) == ("550", "5.7.24")


@pytest.mark.parametrize(
    ("fault", "waits"),
    [(Fault.answer(dns.rcode.SERVFAIL), False), (Fault.drop(), True)],
    ids=["servfail", "drop"],
)
def test_dmarc_temperror_tempfails_with_reject_failures(
    world: World, faulty: FaultyDns, fault: Fault, waits: bool
) -> None:
    """RFC 7489 §6.6.3 / OpenDMARC: a DMARC temperror is a tempfail when enforcing."""
    faulty.set_faults({(Lookup.DMARC.qname(OK), "TXT"): fault})
    outcome = deliver(context(faulty.nameserver, "RejectFailures yes\n"),
                      signed_message(world.key, OK), domain=OK)  # fmt: skip
    verdict = outcome.done()
    assert verdict.action is Action.TEMPFAIL
    assert verdict.reply is not None and (verdict.reply.code, verdict.reply.xcode) == (
        "451", "4.4.3")  # fmt: skip
    assert "dmarc=temperror header.from=ok.test" in verdict.log
    assert outcome.eom_seconds < (TIMEOUT if waits else 0) + MARGIN


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
                      raw, domain=OK).done()  # fmt: skip
    assert verdict.action is Action.TEMPFAIL
    assert verdict.reply is not None and (verdict.reply.code, verdict.reply.xcode) == (
        "451", "4.4.3")  # fmt: skip
    assert "dmarc=temperror header.from=ok.test" in verdict.log
    verdict = deliver(context(faulty.nameserver, "On-DNSError accept\n"), raw, domain=OK).done()
    assert verdict.action is Action.ACCEPT
    assert ar_results(verdict) == {"dkim": ["temperror"], "spf": ["temperror"],
                                   "dmarc": ["temperror"]}  # fmt: skip


def test_dmarc_permerror_from_a_cname_loop_is_not_a_tempfail(
    world: World, faulty: FaultyDns
) -> None:
    """A broken zone will not heal by retrying: reported, never deferred."""
    domain = loop_domain(Lookup.DMARC)
    verdict = deliver(context(faulty.nameserver, "RejectFailures yes\n"),
                      signed_message(world.key, domain), domain=domain).done()  # fmt: skip
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
def test_eom_whose_lookups_all_time_out_ends_within_dns_deadline(
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
    outcome = deliver(ctx, signed_message(world.key, OK, SELECTORS), domain=OK)
    verdict = outcome.done()
    assert 1.9 <= outcome.eom_seconds < 2 + 1.0  # 6 s without the budget
    # Once the budget is spent, lookups fail without asking: at most 3 of the 6 went out.
    asked = sum(faulty.count(n, t) for n, t in names)
    assert 1 <= asked <= 3
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
    outcome = deliver(ctx, signed_message(world.key, OK, SELECTORS), domain=OK)
    assert outcome.eom_seconds >= 6 * TIMEOUT * 0.95
    assert sum(faulty.count(n, t) for n, t in names) == 6
    assert outcome.done().action is Action.TEMPFAIL


def test_rcpt_stage_spf_ends_within_dns_deadline_and_eom_gets_its_own_budget(
    world: World, faulty: FaultyDns
) -> None:
    """HELO and MAIL FROM SPF records both time out; DNSDeadline 1 stops after the first."""
    helo_txt, mailfrom_txt = (HELO, "TXT"), (Lookup.SPF_TXT.qname(OK), "TXT")
    faulty.set_faults({helo_txt: Fault.drop(), mailfrom_txt: Fault.drop()})
    raw = signed_message(world.key, OK)
    ctx = context(faulty.nameserver,
                  "DNSTimeout 1\nDNSDeadline 1\nTempError_Defer yes\nMail_From_reject Fail\n",
                  timeout=1.0)  # fmt: skip
    outcome = deliver(ctx, raw, domain=OK)
    assert outcome.reply is not None
    assert (outcome.reply.code, outcome.reply.xcode) == ("450", "4.7.24")
    assert 0.9 <= outcome.rcpt_seconds < 1 + 0.7
    assert faulty.count(*helo_txt) == 1 and faulty.count(*mailfrom_txt) == 0

    faulty.set_faults({helo_txt: Fault.drop(), mailfrom_txt: Fault.drop()})
    ctx = context(faulty.nameserver, "DNSTimeout 1\nDNSDeadline 1\n", timeout=1.0)
    outcome = deliver(ctx, raw, domain=OK)
    verdict = outcome.done()
    assert 0.9 <= outcome.rcpt_seconds < 1 + 0.7
    # End of message starts a new budget: the key and DMARC lookups still work.
    assert outcome.eom_seconds < MARGIN
    assert verdict.action is Action.ACCEPT
    assert ar_results(verdict) == {"dkim": ["pass"], "spf": ["temperror"], "dmarc": ["pass"]}


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


def test_postfix_answers_451_4_4_3_at_end_of_data_within_the_deadline(
    world: World, faulty: FaultyDns, tempfailing: Stack
) -> None:
    names = drop_everything_at_eom(faulty)
    started = time.monotonic()
    with pytest.raises(SmtpTempfail) as exc:
        tempfailing.send(signed_message(world.key, OK, SELECTORS))
    elapsed = time.monotonic() - started
    assert exc.value.stage == "data" and exc.value.code == 451
    assert "4.4.3" in exc.value.text, exc.value.text  # ours, not Postfix's milter timeout
    assert elapsed < CONTENT_TIMEOUT
    # What Postfix logs when the milter is too slow is not there: "warning: milter …: can't
    # read SMFIC_BODYEOB reply packet header: Connection timed out".
    assert "can't read" not in tempfailing.postfix.log()
    assert 1 <= sum(faulty.count(n, t) for n, t in names) <= 3  # the budget, in the milter
    log = tempfailing.milter.wait_log("dkim=temperror")
    assert "action=tempfail" in log
    assert tempfailing.postfix.delivered() == []


def test_postfix_defers_at_rcpt_on_spf_temperror_within_the_deadline(
    world: World, faulty: FaultyDns, tempfailing: Stack
) -> None:
    # Names no other message resolved: the milter's cache (one per worker) cannot answer.
    domain, helo = loop_domain(Lookup.DMARC), "rcpt-stage.relay.test"
    faulty.set_faults({(helo, "TXT"): Fault.drop(),
                       (Lookup.SPF_TXT.qname(domain), "TXT"): Fault.drop()})  # fmt: skip
    started = time.monotonic()
    with pytest.raises(SmtpTempfail) as exc:
        tempfailing.send(signed_message(world.key, domain), domain=domain, helo=helo)
    assert exc.value.stage == "rcpt" and exc.value.code == 450
    assert "4.7.24" in exc.value.text, exc.value.text
    assert faulty.count(helo, "TXT") >= 1  # asked, not answered from a cache
    assert time.monotonic() - started < 2 + 1.5  # DNSDeadline 2 < milter_command_timeout 4


def test_on_dnserror_accept_delivers_with_temperror_within_the_deadline(
    world: World, faulty: FaultyDns, accepting: Stack
) -> None:
    drop_everything_at_eom(faulty)
    started = time.monotonic()
    accepting.send(signed_message(world.key, OK, SELECTORS))
    (delivered,) = accepting.postfix.wait_delivered(1)
    assert time.monotonic() - started < CONTENT_TIMEOUT
    msg = email.message_from_bytes(delivered)
    (value,) = [" ".join(str(v).split()) for v in msg.get_all("Authentication-Results") or []
                if str(v).strip().startswith(AID)]  # fmt: skip
    parsed = authres.all_features().parse_value(value)
    results = [(r.method, r.result) for r in parsed.results]
    assert results == [("dkim", "temperror")] * 5 + [("spf", "pass"), ("dmarc", "temperror")]
