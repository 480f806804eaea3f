"""ARC sealing (RFC 8617 §5.1): :func:`authmilter.arc_sign.seal` checked by three verifiers.

Every chain we seal is verified by our :func:`verify_chain`, by dkimpy's ``dkim.arc_verify``
and by a real rspamd (:mod:`rspamd_fixture`); chains we seal on top of were made by dkimpy's
``dkim.arc_sign`` or by rspamd. All keys live in one zone, ``arc.test``, served by a private
NSD (for rspamd and our verifier) and read from the same zone text by
:class:`fakedns.ZoneResolver` for dkimpy and the long loops.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import dkim
import pytest

import rspamd_fixture
from authmilter.arc_sign import MAX_FIELD_OCTETS, ArcKeyError, SealRefused, plan_body_hash, seal
from authmilter.arc_verify import ArcOutcome, ArcSet, plan_body_hashes, verify_chain
from authmilter.body_hash import BodyHashes
from authmilter.dkim_sign import SigningPolicy, sign
from authmilter.dkim_verify import TxtLookup
from authmilter.keys import PrivateKey, generate_private_key, key_record_text
from authmilter.keytable import SigningKey
from authmilter.resolver import Resolver
from conftest import NsdFactory
from dnsserver import make_zone, txt_rdata
from fakedns import ZoneResolver
from helpers import make_message
from rspamd_fixture import Rspamd, RspamdStarter

rspamd_factory_module = rspamd_fixture.rspamd_factory_module

ZONE = "arc.test"
ORIGIN = f"origin.{ZONE}"  # DKIM-signs the original message
FORWARDER = f"fwd.{ZONE}"  # an rspamd or dkimpy hop before us
US = f"us.{ZONE}"  # our seal
RELAY = f"relay.{ZONE}"  # an rspamd hop after us
SELECTOR = "sel"
OUR_IP = "127.0.0.2"  # the client address rspamd_fixture.Rspamd.check reports


@dataclass
class Lab:
    rspamd: Rspamd
    nsd: Resolver
    zone: ZoneResolver
    keys: dict[str, PrivateKey]

    def key(self, domain: str) -> tuple[str, str, PrivateKey]:
        return (domain, SELECTOR, self.keys[domain])


@pytest.fixture(scope="module")
def lab(nsd_server_module: NsdFactory, rspamd_factory_module: RspamdStarter) -> Iterator[Lab]:
    keys = {domain: generate_private_key("rsa", 2048) for domain in (ORIGIN, FORWARDER, US, RELAY)}
    records = [(f"{SELECTOR}._domainkey.{domain.removesuffix('.' + ZONE)}", "TXT",
                txt_rdata(key_record_text(key))) for domain, key in keys.items()]  # fmt: skip
    zone = make_zone(ZONE, records)
    nsd = nsd_server_module({ZONE: zone})
    yield Lab(rspamd_factory_module(nsd.nameserver), Resolver([nsd.nameserver]),
              ZoneResolver(zone, ZONE), keys)  # fmt: skip


def split(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    headers, body = dkim.rfc822_parse(message)
    return [(bytes(name), bytes(value)) for name, value in headers], bytes(body)


Sealed = tuple[bytes, ArcOutcome, list[tuple[str, str]]]


def our_seal(lab: Lab, message: bytes, *, dns: TxtLookup | None = None,
             ar_value: str | None = None) -> Sealed:  # fmt: skip
    """One pass as the milter will make it: plan both body hashes, stream the body in
    chunks, verify the chain, seal. Returns the sealed message, the verdict and the fields."""
    headers, body = split(message)
    bodies = BodyHashes()
    plan_body_hashes(headers, bodies)
    plan_body_hash(bodies)
    for start in range(0, len(body), 5):
        bodies.update(body[start : start + 5])
    chain = verify_chain(headers, bodies, dns or lab.nsd)
    if ar_value is None:
        ar_value = (f"spf=pass smtp.mailfrom=alice@{ORIGIN} smtp.remote-ip={OUR_IP}; "
                    f"arc={chain.result}")  # fmt: skip
    fields = seal(headers, bodies, lab.key(US), authserv_id=f"mx.{US}", ar_value=ar_value,
                  chain=chain, now=time.time())  # fmt: skip
    return prepend(fields, message), chain, fields


def prepend(fields: list[tuple[str, str]], message: bytes) -> bytes:
    return b"".join(f"{name}: {value}\r\n".encode() for name, value in fields) + message


def dkimpy_hop(lab: Lab, message: bytes, domain: str = FORWARDER) -> bytes:
    """An intermediary using dkimpy: its Authentication-Results, then dkimpy's ARC Set."""
    srv_id = f"mx.{domain}"
    message = (f"Authentication-Results: {srv_id}; spf=pass smtp.mailfrom={domain}\r\n"
               ).encode() + message  # fmt: skip
    fields = dkim.arc_sign(message, SELECTOR.encode(), domain.encode(),
                           lab.keys[domain].dkimpy_private(), srv_id.encode())  # fmt: skip
    assert len(fields) == 3, fields
    return b"".join(fields) + message


def rspamd_hop(lab: Lab, message: bytes, domain: str) -> bytes:
    return lab.rspamd.arc_seal(message, domain=domain, selector=SELECTOR,
                               key_pem=lab.keys[domain].pem())  # fmt: skip


def verdicts(lab: Lab, message: bytes) -> tuple[str, bytes, str]:
    """(ours, dkimpy's, rspamd's) verdict on ``message``."""
    headers, body = split(message)
    ours = verify_chain(headers, body, lab.nsd)
    theirs = dkim.arc_verify(message, dnsfunc=lab.zone.dkimpy_dnsfunc)[0]
    return ours.result, theirs, lab.rspamd.check(message).arc


def tags(value: str) -> dict[str, str]:
    return {name: re.sub(r"\s+", "", text) for name, text in tags_raw(value).items()}


def tags_raw(value: str) -> dict[str, str]:
    items = (item.split("=", 1) for item in value.split(";") if item.strip())
    return {name.strip(): text for name, text in items}


# -- a fresh message ---------------------------------------------------------------------------


def test_fresh_message_is_sealed_as_instance_one(lab: Lab) -> None:
    sealed, chain, fields = our_seal(lab, make_message(from_=f"Alice <alice@{ORIGIN}>"))
    assert chain.result == "none"
    assert [name for name, _ in fields] == [
        "ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results"]  # fmt: skip
    seal_tags, ams_tags = tags(fields[0][1]), tags(fields[1][1])
    assert {k: seal_tags[k] for k in ("i", "a", "cv", "d", "s")} == {
        "i": "1", "a": "rsa-sha256", "cv": "none", "d": US, "s": SELECTOR}  # fmt: skip
    assert "h" not in seal_tags
    assert (ams_tags["i"], ams_tags["a"], ams_tags["c"]) == ("1", "rsa-sha256", "relaxed/relaxed")
    signed = ams_tags["h"].split(":")
    assert signed.count("from") == 2 and "subject" in signed and "arc-seal" not in signed
    assert re.fullmatch(rf"i=1; mx\.{re.escape(US)}; spf=pass .*; arc=none", fields[2][1],
                        re.S)  # fmt: skip

    headers, body = split(sealed)
    outcome = verify_chain(headers, body, lab.nsd)
    assert outcome.result == "pass", outcome
    assert (outcome.instances, outcome.oldest_pass) == (1, 0)
    assert outcome.sets == (ArcSet(1, US, SELECTOR, OUR_IP),)
    assert verdicts(lab, sealed) == ("pass", b"pass", "ARC_ALLOW")


def test_fields_are_folded_under_the_line_limits(lab: Lab) -> None:
    results = "; ".join(f"dkim=pass header.d=d{n}.{ORIGIN} header.s=s{n} header.b=abcdefgh"
                        for n in range(12))  # fmt: skip
    extra = [f"{name}: <list-{n}@{ORIGIN}>" for n, name in enumerate((
        "Reply-To", "Cc", "In-Reply-To", "References", "List-Id", "List-Help",
        "List-Unsubscribe", "List-Subscribe", "List-Post", "List-Owner", "List-Archive",
        "Sender"))]  # fmt: skip
    message = make_message(from_=f"Alice <alice@{ORIGIN}>", extra=extra)
    sealed, _chain, fields = our_seal(lab, message, ar_value=results + "; arc=none")
    for name, value in fields:
        assert len(name) + 2 + len(value) <= MAX_FIELD_OCTETS, name
        assert max(len(line) for line in value.split("\r\n")) <= 80, (name, value)
        assert "\n" not in value.replace("\r\n", "")
    assert len(fields[2][1]) > 500  # the long AAR and h= really were folded
    assert "\r\n" in tags_raw(fields[1][1])["h"]
    assert verdicts(lab, sealed) == ("pass", b"pass", "ARC_ALLOW")


@pytest.mark.parametrize(("ar_value", "problem"), [
    ("x-note=" + "a" * 1200, r"has a word too long to fold under 998 octets a line"),
    ("; ".join(["spf=pass smtp.mailfrom=a@b.example"] * 80), r"would be \d+ octets, over 2000"),
])  # fmt: skip
def test_a_field_too_long_is_refused(lab: Lab, ar_value: str, problem: str) -> None:
    headers, body = split(make_message())
    with pytest.raises(SealRefused, match="^ARC-Authentication-Results " + problem):
        seal(headers, body, lab.key(US), authserv_id="mx.us.arc.test", ar_value=ar_value,
             chain=ArcOutcome(result="none", reason=""), now=1e9)  # fmt: skip


# -- on top of other sealers -------------------------------------------------------------------


def test_sealed_on_a_dkimpy_chain(lab: Lab) -> None:
    first = dkimpy_hop(lab, make_message(from_=f"Alice <alice@{ORIGIN}>"))
    sealed, chain, fields = our_seal(lab, first)
    assert chain.passed and chain.instances == 1
    assert (tags(fields[0][1])["i"], tags(fields[0][1])["cv"]) == ("2", "pass")
    assert verdicts(lab, sealed) == ("pass", b"pass", "ARC_ALLOW")
    outcome = verify_chain(*split(sealed), lab.nsd)
    assert [(s.instance, s.domain) for s in outcome.sets] == [(1, FORWARDER), (2, US)]


def test_rspamd_then_us_then_us(lab: Lab) -> None:
    first = rspamd_hop(lab, make_message(from_=f"Alice <alice@{ORIGIN}>"), FORWARDER)
    second, chain, _fields = our_seal(lab, first)
    assert chain.passed and chain.instances == 1
    assert verdicts(lab, second) == ("pass", b"pass", "ARC_ALLOW")

    third, chain, fields = our_seal(lab, second)
    assert chain.passed and chain.instances == 2
    assert (tags(fields[0][1])["i"], tags(fields[0][1])["cv"]) == ("3", "pass")
    assert verdicts(lab, third) == ("pass", b"pass", "ARC_ALLOW")
    outcome = verify_chain(*split(third), lab.nsd)
    assert [(s.instance, s.domain) for s in outcome.sets] == [
        (1, FORWARDER), (2, US), (3, US)]  # fmt: skip
    assert outcome.oldest_pass == 0


def test_rspamd_on_top_of_our_set_behaves_as_on_its_own(lab: Lab) -> None:
    """rspamd → us → rspamd gets the verdicts rspamd → rspamd → rspamd gets.

    rspamd 3.4 validates both two-set chains (cv=pass on its i=3) but its third ARC-Seal
    does not verify anywhere, not even in rspamd, on its own chain as on ours: its sealer
    walks the older AMS and AS newest first (plugins/arc.lua ``arc_sign_seal``). So the
    three-hop interop that can be checked is that our set in the middle changes nothing.
    """
    message = make_message(from_=f"Alice <alice@{ORIGIN}>")
    mixed, _chain, _fields = our_seal(lab, rspamd_hop(lab, message, FORWARDER))
    mixed = rspamd_hop(lab, mixed, RELAY)
    pure = rspamd_hop(lab, rspamd_hop(lab, rspamd_hop(lab, message, FORWARDER), US), RELAY)
    for sealed in (mixed, pure):
        seals = [value for name, value in split(sealed)[0] if name == b"ARC-Seal"]
        assert any(re.search(rb"\bi=3;.*\bcv=pass;", value, re.S) for value in seals), seals
    assert verdicts(lab, mixed) == verdicts(lab, pure)
    assert verify_chain(*split(mixed), lab.nsd).reason == "AS i=3: seal did not verify"
    assert verify_chain(*split(pure), lab.nsd).reason == "AS i=3: seal did not verify"


# -- failed and terminated chains --------------------------------------------------------------


def test_a_failed_chain_is_sealed_with_cv_fail_and_then_terminated(lab: Lab) -> None:
    first = rspamd_hop(lab, make_message(), FORWARDER) + b"Footer added on the way.\r\n"
    sealed, chain, fields = our_seal(lab, first)
    assert chain.result == "fail" and chain.instances == 1, chain
    assert (tags(fields[0][1])["i"], tags(fields[0][1])["cv"]) == ("2", "fail")
    outcome = verify_chain(*split(sealed), lab.nsd)
    assert outcome.result == "fail" and "ARC-Seal i=2 has cv=fail" in outcome.reason, outcome
    assert lab.rspamd.check(sealed).arc == "ARC_REJECT"

    # RFC 8617 §5.1: no set may follow cv=fail, whatever the caller's verdict says.
    headers, body = split(sealed)
    with pytest.raises(SealRefused, match="cv=fail: the chain is terminated"):
        seal(headers, body, lab.key(US), authserv_id="mx.us.arc.test", ar_value="arc=fail",
             chain=outcome, now=1e9)  # fmt: skip


def test_fifty_sets_then_refused(lab: Lab) -> None:
    message = make_message()
    for instance in range(1, 51):
        message, chain, _fields = our_seal(lab, message, dns=lab.zone)
        assert chain.instances == instance - 1 and chain.result in ("none", "pass"), chain
    headers, body = split(message)
    outcome = verify_chain(headers, body, lab.zone)
    assert (outcome.result, outcome.instances) == ("pass", 50)
    with pytest.raises(SealRefused, match="already has 50 ARC Sets; at most 50"):
        seal(headers, body, lab.key(US), authserv_id="mx.us.arc.test", ar_value="arc=pass",
             chain=outcome, now=1e9)  # fmt: skip


def test_an_ed25519_key_is_refused(lab: Lab) -> None:
    headers, body = split(make_message())
    key = SigningKey("ed", US, "ed", generate_private_key("ed25519"))
    with pytest.raises(ArcKeyError, match="ed25519 key ed._domainkey.us.arc.test: RFC 8617 "
                                          "allows only rsa-sha256"):  # fmt: skip
        seal(headers, body, key, authserv_id="mx.us.arc.test", ar_value="arc=none",
             chain=ArcOutcome(result="none", reason=""), now=1e9)  # fmt: skip


def test_unplanned_body_hash_is_an_error(lab: Lab) -> None:
    headers, _body = split(make_message())
    with pytest.raises(ValueError, match="not planned"):
        seal(headers, BodyHashes(), lab.key(US), authserv_id="mx.us.arc.test",
             ar_value="arc=none", chain=ArcOutcome(result="none", reason=""), now=1e9)  # fmt: skip


# -- with our own DKIM signature ---------------------------------------------------------------


def test_sealed_after_our_dkim_signature(lab: Lab) -> None:
    message = make_message(from_=f"Alice <alice@{ORIGIN}>")
    headers, body = split(message)
    key = SigningKey("origin", ORIGIN, SELECTOR, lab.keys[ORIGIN])
    policy = SigningPolicy(sign_headers=("From", "To", "Subject", "Date", "Message-ID"))
    signature = sign(headers, body, key, policy, now=int(time.time()))
    signed = b"DKIM-Signature: " + signature + b"\r\n" + message

    sealed, _chain, fields = our_seal(lab, signed)
    assert "dkim-signature" in tags(fields[1][1])["h"].split(":")
    assert dkim.verify(sealed, dnsfunc=lab.zone.dkimpy_dnsfunc)
    assert verdicts(lab, sealed) == ("pass", b"pass", "ARC_ALLOW")
    # The AMS covers the DKIM-Signature: changing it breaks the AMS.
    changed = sealed.replace(b"DKIM-Signature: v=1;", b"DKIM-Signature: v=1; x=9;", 1)
    assert changed != sealed
    outcome = verify_chain(*split(changed), lab.nsd)
    assert outcome.result == "fail" and "AMS i=1" in outcome.reason, outcome
