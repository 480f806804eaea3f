"""ARC end to end: a post from a ``p=reject`` domain through a mailing list to our MX.

The issue's scenario, with real parts only: a private NSD serves ``origin.test`` (the author's
domain: DKIM key, SPF, ``v=DMARC1; p=reject``), ``list.test`` (the list's DKIM/ARC key and
SPF), and the ARC keys of two forwarders after the list, ``partner.test`` (trusted) and
``fwd.test`` (not). Three hosts, each ``authmilter run`` behind its own Postfix:

``list``
    the mailing-list host, ``AuthservID list.test``, ``ARCSign outbound``, ``ARCSealKey``
    and a SigningTable that signs everything it sends with ``d=list.test``.
``mx`` / ``mx-untrusting``
    our MX with ``RejectFailures yes``; ``mx`` has ``ARCTrustedSealers file:…`` (a dataset
    file naming partner.test and list.test) and a ``ReportDatabase``, ``mx-untrusting``
    trusts no sealer.

The post's way: the author's DKIM-signed message arrives at the list host's inbound port
from an address in origin.test's SPF; the list host's milter verifies it and writes its
Authentication-Results (``list.test; dkim=pass … dmarc=pass``). The list step then does what
a list manager does with the delivered post (:func:`arc_stack.list_rewrite`: ``[list]`` in
the Subject, a List-Id, a footer) and resends it from 127.0.0.1, an InternalHosts client, to
the list host's submission port, with the list's own envelope sender; there the milter signs
it with ``d=list.test`` and seals it, its first A-R becoming the AAR. The list step is the
test itself reading the list Postfix's delivery and resubmitting it: the simplest honest list
manager (a content_filter script would do the same between the same two Postfix passes).

The sealed message, byte for byte as the list's Postfix sent it, then goes to an MX's
inbound port from an address in list.test's SPF. The author's signature no longer verifies
(Subject and body changed), list.test's passes but is not aligned, so DMARC fails for
origin.test, ``p=reject``. The MX that trusts list.test delivers it and says why (the dmarc
clause's comment, the log line, the report record's ``local_policy`` override); the MX that
trusts nobody rejects it; a chain broken after sealing is rejected even by the trusting MX,
and so is a chain whose newest sealer is not trusted, or whose trusted AAR records no pass.
A trusted forwarder after the list (partner.test, sealing i=2 with dkimpy's ARC code) keeps
the override, which then rests on the list's results at i=1.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dkim
import pytest

from arc_stack import (
    SUBSCRIBER,
    Exchange,
    Stack,
    arc_sets,
    clauses,
    field_values,
    has_clause,
    list_rewrite,
    results_of,
    split,
    start_stack,
    tags,
    write_key,
)
from authmilter.arc_verify import verify_chain
from authmilter.keys import KeyAlgorithm, PrivateKey, generate_private_key, key_record_text
from authmilter.reports import store
from authmilter.reports.record import DmarcEvent
from authmilter.resolver import Resolver
from conftest import NsdFactory
from dnsserver import make_zone, txt_rdata
from fakedns import ZoneResolver
from milter_fixture import write_keytable
from postfix_fixture import new_socket_dir

ORIGIN, LIST, PARTNER, FWD = "origin.test", "list.test", "partner.test", "fwd.test"
SELECTOR = {ORIGIN: "o1", LIST: "l1", PARTNER: "p1", FWD: "f1"}
AUTHOR = f"alice@{ORIGIN}"
LIST_ADDRESS = f"list@{LIST}"
LIST_BOUNCES = f"list-bounces@{LIST}"
AUTHOR_IP = "203.0.113.5"  # in origin.test's SPF
LIST_IP = "192.0.2.25"  # in list.test's SPF: the list host's outside address
STRANGER_IP = "198.51.100.99"  # in nobody's SPF
MX_ID = "mx.ours.test"
REJECT_TEXT = f"rejected by DMARC policy for {ORIGIN}"


@dataclass
class World:
    dir: Path
    keys: dict[str, PrivateKey]
    resolver: Resolver
    zone: ZoneResolver  # the same zones for dkimpy's dnsfunc
    list: Stack
    mx: Stack  # trusts partner.test and list.test, records reports
    mx_untrusting: Stack
    db_url: str


@pytest.fixture(scope="module")
def world(nsd_server_module: NsdFactory) -> Iterator[World]:
    keys = {domain: generate_private_key(KeyAlgorithm.RSA, 2048) for domain in SELECTOR}

    def key_record(domain: str) -> tuple[str, str, str]:
        return (f"{SELECTOR[domain]}._domainkey", "TXT", txt_rdata(key_record_text(keys[domain])))

    zones = {
        ORIGIN: make_zone(ORIGIN, [
            ("@", "TXT", f'"v=spf1 ip4:{AUTHOR_IP} -all"'),
            ("_dmarc", "TXT", '"v=DMARC1; p=reject"'),
            key_record(ORIGIN),
        ]),
        LIST: make_zone(LIST, [
            ("@", "TXT", f'"v=spf1 ip4:{LIST_IP} -all"'),
            ("_dmarc", "TXT", '"v=DMARC1; p=none"'),
            key_record(LIST),
        ]),
        PARTNER: make_zone(PARTNER, [key_record(PARTNER)]),
        FWD: make_zone(FWD, [key_record(FWD)]),
    }  # fmt: skip
    nsd = nsd_server_module(zones)
    directory = new_socket_dir("arc-forwarding-")
    stacks: list[Stack] = []
    try:
        key_path = write_key(directory, "list", keys[LIST])
        tables = write_keytable(directory, {"list": (LIST, SELECTOR[LIST], key_path)},
                                [("*", "list")])  # fmt: skip
        common = f"Nameservers {nsd.nameserver}\n"
        stacks.append(start_stack(
            f"{common}AuthservID {LIST}\nRejectFailures no\n{tables}"
            "ARCSign outbound\nARCSealKey list\n", name="arc-list"))  # fmt: skip
        db_url = f"sqlite:///{directory / 'dmarc.db'}"
        sealers = directory / "trusted-sealers"
        sealers.write_text(f"{PARTNER}\n{LIST}\n")
        stacks.append(start_stack(
            f"{common}AuthservID {MX_ID}\nRejectFailures yes\nARCTrustedSealers file:{sealers}\n"
            f"ReportDatabase {db_url}\n", name="arc-mx"))  # fmt: skip
        stacks.append(start_stack(f"{common}AuthservID {MX_ID}\nRejectFailures yes\n",
                                  name="arc-mx-untrusting"))  # fmt: skip
        list_host, mx, mx_untrusting = stacks
        yield World(directory, keys, Resolver([nsd.nameserver]), ZoneResolver.from_zones(zones),
                    list_host, mx, mx_untrusting, db_url)  # fmt: skip
    finally:
        for stack in stacks:
            stack.stop()
        shutil.rmtree(directory, ignore_errors=True)


def post(world: World, subject: str, *, signed: bool = True) -> bytes:
    """The author's message to the list, DKIM-signed by origin.test unless told."""
    slug = re.sub(r"\W+", ".", subject)
    text = (f"From: Alice <{AUTHOR}>\r\nTo: {LIST_ADDRESS}\r\nSubject: {subject}\r\n"
            f"Date: Mon, 04 Mar 2024 10:00:00 +0000\r\n"
            f"Message-ID: <{slug}@{ORIGIN}>\r\n\r\n"
            "Hello list,\r\n\r\nthe meeting moves to Thursday.\r\n")  # fmt: skip
    message = text.encode()
    if not signed:
        return message
    signature = dkim.sign(message, SELECTOR[ORIGIN].encode(), ORIGIN.encode(),
                          world.keys[ORIGIN].dkimpy_private(),
                          include_headers=[b"from", b"to", b"subject", b"date",
                                           b"message-id"])  # fmt: skip
    return bytes(signature) + message


@dataclass(frozen=True)
class Forwarded:
    received: bytes  # as the list host delivered the post to the list manager
    sealed: bytes  # as the list host sent the resent post out


def through_list(world: World, message: bytes, *, client_ip: str = AUTHOR_IP) -> Forwarded:
    received = world.list.deliver(message, mail_from=AUTHOR, rcpt_to=LIST_ADDRESS,
                                  client_ip=client_ip)  # fmt: skip
    sealed = world.list.deliver(list_rewrite(received), mail_from=LIST_BOUNCES, port="submit",
                                client_ip="127.0.0.1")  # fmt: skip
    return Forwarded(received, sealed)


def dkimpy_verdicts(world: World, message: bytes) -> dict[str, bool]:
    """dkimpy's verdict on each DKIM signature, by d=."""
    values = [value for name, value in split(message)[0] if name.lower() == b"dkim-signature"]
    verdicts = {}
    for idx, value in enumerate(values):  # dkimpy's idx counts DKIM-Signature fields
        domain = tags(value.decode())["d"]
        try:
            verdicts[domain] = bool(dkim.DKIM(message).verify(
                idx=idx, dnsfunc=world.zone.dkimpy_dnsfunc))  # fmt: skip
        except dkim.ValidationError:  # a body hash mismatch is raised, not returned
            verdicts[domain] = False
    return verdicts


def to_mx(mx: Stack, message: bytes) -> Exchange:
    return mx.exchange(message, mail_from=LIST_BOUNCES, rcpt_to=SUBSCRIBER, client_ip=LIST_IP)


@pytest.fixture(scope="module")
def forwarded(world: World) -> Forwarded:
    return through_list(world, post(world, "Meeting moved"))


# -- the list host ------------------------------------------------------------------------------


def test_the_list_host_verifies_the_post_when_it_arrives(forwarded: Forwarded) -> None:
    results = results_of(forwarded.received, LIST)
    assert has_clause(results, "dkim=pass", f"header.d={ORIGIN}"), results
    assert has_clause(results, "spf=pass", f"smtp.mailfrom={AUTHOR}"), results
    assert has_clause(results, "dmarc=pass", f"header.from={ORIGIN}"), results
    # Inbound mail is not sealed with ARCSign outbound.
    assert not arc_sets(forwarded.received)


def test_the_resent_post_is_signed_and_sealed_by_the_list(
        world: World, forwarded: Forwarded) -> None:  # fmt: skip
    sealed = forwarded.sealed
    assert field_values(sealed, "Subject") == ["[list] Meeting moved"]
    signatures = {tags(v)["d"]: tags(v) for v in field_values(sealed, "DKIM-Signature")}
    assert set(signatures) == {ORIGIN, LIST}, signatures
    assert signatures[LIST]["s"] == SELECTOR[LIST]

    sets = arc_sets(sealed)
    assert list(sets) == [1], sets
    seal, ams = tags(sets[1]["seal"]), tags(sets[1]["ams"])
    assert (seal["d"], seal["s"], seal["cv"]) == (LIST, SELECTOR[LIST], "none")
    assert (ams["d"], ams["s"]) == (LIST, SELECTOR[LIST])
    # The DKIM signature added in the same pass is covered by the AMS.
    assert "dkim-signature" in ams["h"].lower().split(":"), ams["h"]
    # The AAR is the A-R the list host wrote when the post arrived.
    aar = sets[1]["aar"]
    first = results_of(forwarded.received, LIST)
    assert re.match(rf"i=1;\s*{re.escape(LIST)};", aar), aar
    assert aar.removeprefix("i=1;").strip() == first, (aar, first)

    # Independent checks of the list's work: dkimpy for its DKIM signature and ARC chain,
    # our verifier for the chain.
    assert dkimpy_verdicts(world, sealed) == {ORIGIN: False, LIST: True}
    assert dkim.arc_verify(sealed, dnsfunc=world.zone.dkimpy_dnsfunc)[0] == b"pass"
    outcome = verify_chain(*split(sealed), world.resolver)
    assert (outcome.result, outcome.instances) == ("pass", 1), outcome


def test_mail_the_list_host_sends_without_its_results_is_signed_not_sealed(world: World) -> None:
    message = post(world, "Announcement from the list owner", signed=False).replace(
        f"From: Alice <{AUTHOR}>".encode(), f"From: Owner <owner@{LIST}>".encode())  # fmt: skip
    sent = world.list.deliver(message, mail_from=LIST_BOUNCES, port="submit",
                              client_ip="127.0.0.1")  # fmt: skip
    assert [tags(v)["d"] for v in field_values(sent, "DKIM-Signature")] == [LIST]
    assert not arc_sets(sent)


# -- our MX -------------------------------------------------------------------------------------


def test_trusted_list_chain_overrides_the_dmarc_reject(world: World,
                                                       forwarded: Forwarded) -> None:  # fmt: skip
    recorded = len(overridden_events(world.db_url))
    result = to_mx(world.mx, forwarded.sealed)
    assert result.delivered is not None, f"{result.rejected}\n{result.log}"
    results = results_of(result.delivered, MX_ID)
    assert has_clause(results, "dkim=fail", f"header.d={ORIGIN}"), results
    assert has_clause(results, "dkim=pass", f"header.d={LIST}"), results
    assert has_clause(results, "spf=pass", f"smtp.mailfrom={LIST_BOUNCES}"), results
    assert has_clause(results, "arc=pass", f"as[1].d={LIST}"), results
    (clause,) = [c for c in clauses(results) if c.startswith("dmarc=")]
    assert clause.startswith("dmarc=fail"), clause
    assert f"header.from={ORIGIN}" in clause, clause
    comment = re.search(r"\((.*)\)", clause)
    assert comment and re.search(r"(?i)\barc\b", comment.group(1)), clause
    assert LIST in comment.group(1), clause
    assert "dis=none" in comment.group(1), clause
    # The log line says why the reject was not applied.
    assert "dmarc=fail" in result.log and "action=accept" in result.log, result.log
    assert re.search(r"(?i)arc\b.*overrid|overrid.*\barc\b", result.log), result.log
    assert LIST in result.log, result.log

    # The report record: disposition none, with the ARC override as local_policy.
    event = wait_event(world.db_url, after=recorded)
    assert (event.header_from, event.p, event.disposition) == (ORIGIN, "reject", "none")
    assert (event.dkim_aligned, event.spf_aligned) == ("fail", "fail")
    kinds = [kind for kind, _ in event.overrides]
    assert kinds == ["local_policy"], event.overrides
    comment_text = event.overrides[0][1]
    assert re.search(rf"arc=pass\b.*as\[1\]\.d={re.escape(LIST)}", comment_text), comment_text


def overridden_events(url: str) -> list[DmarcEvent]:
    """The report records of list mail from origin.test delivered despite p=reject."""
    try:
        events = store.read_events(url)
    except store.DatabaseError:
        return []  # no worker has written yet: no file, or no table in it yet
    return [e for e in events
            if (e.header_from, e.envelope_from, e.disposition) == (ORIGIN, LIST, "none")]


def wait_event(url: str, *, after: int, timeout: float = 15.0) -> DmarcEvent:
    """The newest of :func:`overridden_events` once there are more than ``after``; the
    workers' writer commits within a second or so."""
    deadline = time.monotonic() + timeout
    while len(events := overridden_events(url)) <= after:
        assert time.monotonic() < deadline, "no DMARC report record written"
        time.sleep(0.2)
    assert len(events) == after + 1, events
    return events[-1]


def test_without_trust_the_same_message_is_rejected(world: World,
                                                    forwarded: Forwarded) -> None:  # fmt: skip
    result = to_mx(world.mx_untrusting, forwarded.sealed)
    assert result.rejected is not None, "delivered without a trusted sealer"
    assert (result.rejected.code, result.rejected.stage) == (550, "data")
    assert REJECT_TEXT in result.rejected.text
    # The chain itself is fine; it is just nobody we trust.
    assert "arc=pass" in result.log and "dmarc=fail" in result.log, result.log
    assert "action=reject" in result.log, result.log


@pytest.mark.parametrize("where", ["body", "subject"])
def test_chain_broken_after_sealing_is_rejected(world: World, forwarded: Forwarded,
                                                where: str) -> None:  # fmt: skip
    if where == "body":
        broken = forwarded.sealed + b"Added after the list sealed it.\r\n"
    else:
        broken = forwarded.sealed.replace(b"Subject: [list] ", b"Subject: [list][spam] ", 1)
    assert broken != forwarded.sealed
    result = to_mx(world.mx, broken)
    assert result.rejected is not None, "a broken chain overrode DMARC"
    assert (result.rejected.code, result.rejected.stage) == (550, "data")
    assert REJECT_TEXT in result.rejected.text
    assert "arc=fail" in result.log and "action=reject" in result.log, result.log


def second_hop(world: World, sealed: bytes, domain: str, results: str) -> bytes:
    """A forwarder after the list (dkimpy's ARC sealer, as ``domain``): its A-R ``results``
    (as if it had verified the list's mail) become the AAR of ARC Set i=2."""
    srv_id = f"mx.{domain}"
    message = f"Authentication-Results: {srv_id}; {results}\r\n".encode() + sealed
    fields = dkim.arc_sign(message, SELECTOR[domain].encode(), domain.encode(),
                           world.keys[domain].dkimpy_private(), srv_id.encode())  # fmt: skip
    assert len(fields) == 3, fields
    resealed = b"".join(fields) + message
    outcome = verify_chain(*split(resealed), world.resolver)
    assert (outcome.result, [s.domain for s in outcome.sets]) == ("pass", [LIST, domain])
    return resealed


def test_trusted_sealers_down_to_the_passing_results(world: World,
                                                     forwarded: Forwarded) -> None:  # fmt: skip
    """partner.test (trusted) forwards the list's mail and seals i=2; its own results are a
    DMARC failure, as anybody's after the list. The MX walks down to i=1, the list's AAR,
    whose results pass: every sealer above it is trusted, so the reject is overridden."""
    resealed = second_hop(world, forwarded.sealed, PARTNER,
                          f"arc=pass; dkim=fail header.d={ORIGIN}; dkim=pass header.d={LIST}; "
                          f"dmarc=fail header.from={ORIGIN}")  # fmt: skip
    result = world.mx.exchange(resealed, mail_from=f"fwd@{PARTNER}", client_ip=STRANGER_IP)
    assert result.delivered is not None, f"{result.rejected}\n{result.log}"
    results = results_of(result.delivered, MX_ID)
    assert has_clause(results, "arc=pass", f"as[2].d={PARTNER}"), results
    assert has_clause(results, "dmarc=fail", "ARC", f"as[1].d={LIST}"), results
    assert "action=accept" in result.log and LIST in result.log, result.log


def test_an_untrusted_newer_sealer_hides_the_trusted_one(world: World,
                                                         forwarded: Forwarded) -> None:  # fmt: skip
    """fwd.test (not trusted) forwards the list's mail and seals i=2, its AAR claiming the
    author's DKIM passed. The chain is valid, but the trust path from the newest sealer down
    is broken at once: neither its claim nor the list's results count. Rejected."""
    resealed = second_hop(world, forwarded.sealed, FWD,
                          f"arc=pass; dkim=pass header.d={ORIGIN}; dmarc=pass header.from={ORIGIN}")
    result = world.mx.exchange(resealed, mail_from=f"fwd@{FWD}", client_ip=STRANGER_IP)
    assert result.rejected is not None, "an untrusted sealer's claim overrode DMARC"
    assert (result.rejected.code, result.rejected.stage) == (550, "data")
    assert REJECT_TEXT in result.rejected.text
    assert "arc=pass" in result.log and "action=reject" in result.log, result.log


def test_a_chain_sealed_before_the_list_survives_the_lists_changes(world: World) -> None:
    """The author's provider (fwd.test here, dkimpy's sealer) seals the post before it
    reaches the list: i=1. The list's footer and Subject tag break that AMS, but the list
    seals what it found on arrival (its A-R said arc=pass): i=2 with cv=pass. Our MX sees a
    valid chain whose oldest intact AMS is i=2, trusts list.test, and delivers."""
    message = (f"Authentication-Results: mx.{FWD}; dkim=pass header.d={ORIGIN}\r\n".encode()
               + post(world, "Sealed before the list"))  # fmt: skip
    fields = dkim.arc_sign(message, SELECTOR[FWD].encode(), FWD.encode(),
                           world.keys[FWD].dkimpy_private(), f"mx.{FWD}".encode())  # fmt: skip
    assert len(fields) == 3, fields
    forwarded = through_list(world, b"".join(fields) + message, client_ip=STRANGER_IP)
    assert has_clause(results_of(forwarded.received, LIST), "arc=pass", f"as[1].d={FWD}")

    sets = arc_sets(forwarded.sealed)
    assert sorted(sets) == [1, 2], sets
    assert [tags(sets[i]["seal"])["d"] for i in (1, 2)] == [FWD, LIST]
    assert tags(sets[2]["seal"])["cv"] == "pass", sets[2]["seal"]
    outcome = verify_chain(*split(forwarded.sealed), world.resolver)
    assert (outcome.result, outcome.oldest_pass) == ("pass", 2), outcome

    result = to_mx(world.mx, forwarded.sealed)
    assert result.delivered is not None, f"{result.rejected}\n{result.log}"
    results = results_of(result.delivered, MX_ID)
    assert has_clause(results, "arc=pass", f"as[2].d={LIST}", "header.oldest-pass=2"), results
    assert has_clause(results, "dmarc=fail", "ARC", f"as[2].d={LIST}"), results


def test_a_trusted_sealer_vouching_for_a_failure_changes_nothing(world: World) -> None:
    """A spoof (unsigned, from an address outside origin.test's SPF) reaches the list, whose
    host does not enforce DMARC: its A-R, sealed as the AAR, says dmarc=fail. Trusting the
    list only trusts what it recorded, so our MX still rejects."""
    spoof = through_list(world, post(world, "Urgent wire transfer", signed=False),
                         client_ip=STRANGER_IP)  # fmt: skip
    aar = arc_sets(spoof.sealed)[1]["aar"]
    assert re.search(r"\bspf=fail\b", aar) and re.search(r"\bdmarc=fail\b", aar), aar
    result = to_mx(world.mx, spoof.sealed)
    assert result.rejected is not None, "a recorded failure overrode DMARC"
    assert REJECT_TEXT in result.rejected.text
    assert "arc=pass" in result.log and "action=reject" in result.log, result.log
