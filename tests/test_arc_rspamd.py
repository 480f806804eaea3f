"""ARC interop with rspamd 3.4 (Debian): rspamd seals, :func:`verify_chain` verifies.

rspamd's ARC code (``plugins/arc.lua`` over its C DKIM canonicalization and signing) is
independent of dkimpy, which built every chain in tests/test_arc_verify.py. Here one private
rspamd (:mod:`rspamd_fixture`) seals messages for ``forwarder.test`` and ``relay.test`` with
2048-bit keys whose records a private NSD serves; our verifier reads those keys from the same
NSD through :class:`authmilter.resolver.Resolver`.

Each verdict of ours is checked against rspamd's own (``ARC_ALLOW``/``ARC_REJECT``) on the
same bytes, which also keeps the fixture honest: rspamd reaches NSD and verifies what it
sealed. The other directions of the issue (we seal and rspamd verifies, a three-hop chain
mixing both) wait for our sealing code; :meth:`rspamd_fixture.Rspamd.check` is what they
will use.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import dkim
import pytest

import rspamd_fixture
from authmilter.arc_verify import ArcOutcome, ArcSet, verify_chain
from authmilter.keys import PrivateKey, generate_private_key, key_record_text
from authmilter.resolver import Resolver
from conftest import NsdFactory
from dnsserver import make_zone, txt_rdata
from helpers import make_message
from rspamd_fixture import Rspamd, RspamdStarter

rspamd_factory_module = rspamd_fixture.rspamd_factory_module

ORIGIN = "origin.test"  # DKIM-signs the original message
FORWARDER = "forwarder.test"  # first ARC hop
RELAY = "relay.test"  # second ARC hop
SELECTOR = {ORIGIN: "dk1", FORWARDER: "arc1", RELAY: "arc2"}


@dataclass
class Lab:
    rspamd: Rspamd
    resolver: Resolver
    keys: dict[str, PrivateKey]

    def seal(self, message: bytes, domain: str) -> bytes:
        return self.rspamd.arc_seal(
            message, domain=domain, selector=SELECTOR[domain], key_pem=self.keys[domain].pem()
        )

    def verify(self, message: bytes) -> ArcOutcome:
        headers, body = dkim.rfc822_parse(message)
        fields = [(bytes(name), bytes(value)) for name, value in headers]
        return verify_chain(fields, bytes(body), self.resolver)

    def rspamd_arc(self, message: bytes) -> str:
        return self.rspamd.check(message).arc


@pytest.fixture(scope="module")
def lab(nsd_server_module: NsdFactory, rspamd_factory_module: RspamdStarter) -> Iterator[Lab]:
    keys = {domain: generate_private_key("rsa", 2048) for domain in SELECTOR}
    zones = {
        domain: make_zone(
            domain,
            [(f"{SELECTOR[domain]}._domainkey", "TXT", txt_rdata(key_record_text(key)))],
        )
        for domain, key in keys.items()
    }
    nsd = nsd_server_module(zones)
    yield Lab(rspamd_factory_module(nsd.nameserver), Resolver([nsd.nameserver]), keys)


def dkim_signed(lab: Lab) -> bytes:
    message = make_message(from_=f"Alice <alice@{ORIGIN}>")
    signature = dkim.sign(message, SELECTOR[ORIGIN].encode(), ORIGIN.encode(),
                          lab.keys[ORIGIN].dkimpy_private())  # fmt: skip
    return bytes(signature) + message


def field_values(message: bytes, name: str) -> list[str]:
    headers, _ = dkim.rfc822_parse(message)
    return [bytes(v).decode() for n, v in headers if bytes(n).lower() == name.lower().encode()]


def assert_verdicts(lab: Lab, message: bytes, ours: str, theirs: str) -> ArcOutcome:
    outcome = lab.verify(message)
    verdict = lab.rspamd.check(message)
    assert (outcome.result, verdict.arc) == (ours, theirs), (
        f"ours: {outcome}\nrspamd: {verdict.arc} {verdict.arc_options}\n"
        + message.decode(errors="replace")
    )
    return outcome


@pytest.mark.parametrize("signed", [True, False], ids=["dkim-signed", "unsigned"])
def test_one_rspamd_hop_passes_in_both(lab: Lab, signed: bool) -> None:
    message = dkim_signed(lab) if signed else make_message()
    sealed = lab.seal(message, FORWARDER)

    outcome = assert_verdicts(lab, sealed, "pass", "ARC_ALLOW")
    assert outcome.instances == 1
    assert outcome.oldest_pass == 0
    assert outcome.sets == (ArcSet(1, FORWARDER, SELECTOR[FORWARDER]),)
    # rspamd's AAR records its DKIM verdict: it looked the origin key up in the test NSD.
    (aar,) = field_values(sealed, "ARC-Authentication-Results")
    assert re.match(rf"\s*i=1;\s*mx\.{re.escape(FORWARDER)};", aar), aar
    if signed:
        assert re.search(rf"\bdkim=pass\b.*header\.d={re.escape(ORIGIN)}", aar, re.S), aar


def test_two_rspamd_hops_pass_in_both(lab: Lab) -> None:
    sealed = lab.seal(lab.seal(dkim_signed(lab), FORWARDER), RELAY)
    # rspamd validated the first set before adding the second: cv=pass on i=2.
    seals = field_values(sealed, "ARC-Seal")
    assert len(seals) == 2
    assert any(re.search(r"\bi=2;.*\bcv=pass;", seal, re.S) for seal in seals), seals

    outcome = assert_verdicts(lab, sealed, "pass", "ARC_ALLOW")
    assert outcome.instances == 2
    assert outcome.oldest_pass == 0
    assert [(s.instance, s.domain, s.selector) for s in outcome.sets] == [
        (1, FORWARDER, SELECTOR[FORWARDER]),
        (2, RELAY, SELECTOR[RELAY]),
    ]


def test_body_changed_after_sealing_fails_in_both(lab: Lab) -> None:
    sealed = lab.seal(dkim_signed(lab), FORWARDER) + b"Sent from the mailing list.\r\n"
    outcome = assert_verdicts(lab, sealed, "fail", "ARC_REJECT")
    assert outcome.reason == "AMS i=1: body hash did not verify"


def test_signed_header_changed_after_sealing_fails_in_both(lab: Lab) -> None:
    sealed = lab.seal(dkim_signed(lab), FORWARDER)
    assert "subject" in field_values(sealed, "ARC-Message-Signature")[0].lower()
    changed = sealed.replace(b"\r\nSubject: ", b"\r\nSubject: [list] ", 1)
    assert changed != sealed
    outcome = assert_verdicts(lab, changed, "fail", "ARC_REJECT")
    assert outcome.reason == "AMS i=1: signature verification failed"


def test_second_hop_changed_body_fails_in_both(lab: Lab) -> None:
    """A change between two rspamd hops: rspamd seals i=2 with cv=fail, both say fail."""
    first = lab.seal(dkim_signed(lab), FORWARDER) + b"Footer added by the forwarder.\r\n"
    headers = {"SignOnAuthFailed": "yes"}  # rspamd skips sealing a broken chain otherwise
    key_pem = lab.keys[RELAY].pem()
    sealed = lab.rspamd.arc_seal(first, domain=RELAY, selector=SELECTOR[RELAY], key_pem=key_pem,
                                 headers=headers)  # fmt: skip
    seals = field_values(sealed, "ARC-Seal")
    assert any(re.search(r"\bi=2;.*\bcv=fail;", seal, re.S) for seal in seals), seals
    outcome = assert_verdicts(lab, sealed, "fail", "ARC_REJECT")
    assert "cv=fail" in outcome.reason
