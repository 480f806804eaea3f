"""ARC interop with rspamd 3.4 through a real Postfix, in both directions.

One host, ``authmilter run`` with ``ARCSign inbound`` (sealing as ``us.test``) behind a
private Postfix, and one private rspamd (:mod:`rspamd_fixture`) sealing as ``fwd.test`` (a
hop before us) or ``relay.test`` (a hop after us); a private NSD serves every key to both.
Each message crosses Postfix's inbound port, so our verdict is the Authentication-Results
and the ARC Set Postfix delivered, not a function's return value:

- rspamd seals, we verify: ``arc=pass`` naming rspamd's set, and a body or Subject changed
  after rspamd sealed is ``arc=fail`` (our set on it then says ``cv=fail``);
- we seal, rspamd verifies: ``ARC_ALLOW`` for fresh mail, for mail rspamd sealed first, and
  ``ARC_REJECT`` once the message changes after our seal; rspamd seals on top of our set with
  ``cv=pass``;
- three hops: rspamd → rspamd → us and us → rspamd → us pass in both verifiers.

rspamd → us → rspamd does not: **rspamd 3.4 cannot make a valid ARC-Seal at i=3 or above**,
on any chain, its own included. This is rspamd's bug, not the fixture's:
``plugins/arc.lua`` (``arc_sign_seal``, Debian's 3.4) feeds the older sets into the seal's
hash with ``for i = (cur_idx - 1), 1, (-1)``, newest first, where RFC 8617 §5.1.1 wants
them oldest first, and takes each AAR by its position in the header (``get_header_full``)
rather than by its ``i=``. With one older set (i=2) the order cannot be wrong, hence rspamd's
passing two-hop chains. :func:`rspamd34_seal_input` rebuilds that order, and the i=3 seal
rspamd wrote over our set verifies against it with relay.test's public key, while the
RFC 8617 order does not: the seal signs something other than the chain. rspamd's own
verifier (its C code, RFC order) rejects that seal too. Upstream fixed the sealer after 3.4
(rspamd pull request #4449, "Fix arc", 2023: "our arc signing is definitely broken for
i > 1"). So for that chain the test asserts what is true: rspamd validated our set before
sealing (``cv=pass`` on its i=3, and ``ARC_ALLOW`` on the two-set chain), both verifiers
reject the three-set chain, ours with ``AS i=3: seal did not verify``, and the reason is the
order above.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import dkim
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

import rspamd_fixture
from arc_stack import (
    Stack,
    arc_sets,
    clauses,
    has_clause,
    results_of,
    split,
    start_stack,
    tags,
    write_key,
)
from authmilter.arc_verify import ArcOutcome, arc_set_fields, feed_seal, verify_chain
from authmilter.keys import KeyAlgorithm, PrivateKey, generate_private_key, key_record_text
from authmilter.resolver import Resolver
from conftest import NsdFactory
from dnsserver import make_zone, txt_rdata
from fakedns import ZoneResolver
from helpers import make_message
from milter_fixture import write_keytable
from postfix_fixture import DEFAULT_INBOUND_CLIENT, new_socket_dir
from rspamd_fixture import Rspamd, RspamdStarter

rspamd_factory_module = rspamd_fixture.rspamd_factory_module

ORIGIN, FWD, US, RELAY = "origin.test", "fwd.test", "us.test", "relay.test"
SELECTOR = {ORIGIN: "o1", FWD: "f1", US: "u1", RELAY: "r1"}
AUTHOR = f"alice@{ORIGIN}"
OUR_ID = f"mx.{US}"


@dataclass
class Lab:
    keys: dict[str, PrivateKey]
    resolver: Resolver
    zone: ZoneResolver  # the same zones, for dkimpy
    rspamd: Rspamd
    us: Stack

    def rspamd_seal(self, message: bytes, domain: str) -> bytes:
        return self.rspamd.arc_seal(message, domain=domain, selector=SELECTOR[domain],
                                    key_pem=self.keys[domain].pem())  # fmt: skip

    def through_us(self, message: bytes) -> bytes:
        """``message`` through our Postfix and milter, as delivered."""
        return self.us.deliver(message, mail_from=AUTHOR, client_ip=DEFAULT_INBOUND_CLIENT)

    def ours(self, message: bytes) -> ArcOutcome:
        return verify_chain(*split(message), self.resolver)

    def theirs(self, message: bytes) -> str:
        return self.rspamd.check(message).arc


@pytest.fixture(scope="module")
def lab(nsd_server_module: NsdFactory, rspamd_factory_module: RspamdStarter) -> Iterator[Lab]:
    keys = {domain: generate_private_key(KeyAlgorithm.RSA, 2048) for domain in SELECTOR}
    zones = {domain: make_zone(domain, [
        ("@", "TXT", f'"v=spf1 ip4:{DEFAULT_INBOUND_CLIENT} -all"'),
        ("_dmarc", "TXT", '"v=DMARC1; p=none"'),
        (f"{SELECTOR[domain]}._domainkey", "TXT", txt_rdata(key_record_text(key))),
    ]) for domain, key in keys.items()}  # fmt: skip
    nsd = nsd_server_module(zones)
    rspamd = rspamd_factory_module(nsd.nameserver)
    directory = new_socket_dir("arc-rspamd-postfix-")
    stack: Stack | None = None
    try:
        path = write_key(directory, "us", keys[US])
        tables = write_keytable(directory, {"us": (US, SELECTOR[US], path)},
                                [(f"*@{US}", "us")])  # fmt: skip
        stack = start_stack(f"Nameservers {nsd.nameserver}\nAuthservID {OUR_ID}\n"
                            f"RejectFailures no\n{tables}ARCSign inbound\nARCSealKey us\n",
                            name="arc-us")  # fmt: skip
        yield Lab(keys, Resolver([nsd.nameserver]), ZoneResolver.from_zones(zones), rspamd, stack)
    finally:
        if stack is not None:
            stack.stop()
        shutil.rmtree(directory, ignore_errors=True)


def original(lab: Lab, subject: str) -> bytes:
    message = make_message(from_=f"Alice <{AUTHOR}>", subject=subject)
    signature = dkim.sign(message, SELECTOR[ORIGIN].encode(), ORIGIN.encode(),
                          lab.keys[ORIGIN].dkimpy_private())  # fmt: skip
    return bytes(signature) + message


def arc_clause(message: bytes) -> str:
    """The arc= clause of our Authentication-Results."""
    results = results_of(message, OUR_ID)
    (clause,) = [c for c in clauses(results) if c.startswith("arc=")] or [results]
    return clause


def seal_tags(message: bytes, instance: int) -> dict[str, str]:
    return tags(arc_sets(message)[instance]["seal"])


def assert_our_set(message: bytes, instance: int, cv: str) -> None:
    """Our milter sealed ``message`` as ``instance`` with ``cv``, its AAR our A-R."""
    sets = arc_sets(message)
    assert max(sets) == instance, sets
    seal = tags(sets[instance]["seal"])
    assert (seal["d"], seal["s"], seal["cv"]) == (US, SELECTOR[US], cv), seal
    aar = sets[instance]["aar"]
    assert aar.removeprefix(f"i={instance};").strip() == results_of(message, OUR_ID), aar


# -- rspamd seals, we verify --------------------------------------------------------------------


def test_rspamd_chain_passes_in_our_results(lab: Lab) -> None:
    sealed = lab.rspamd_seal(original(lab, "rspamd first"), FWD)
    delivered = lab.through_us(sealed)
    clause = arc_clause(delivered)
    assert clause.startswith("arc=pass"), clause
    assert f"as[1].d={FWD}" in clause and f"as[1].s={SELECTOR[FWD]}" in clause, clause
    assert "header.oldest-pass=0" in clause, clause
    assert f"smtp.remote-ip={DEFAULT_INBOUND_CLIENT}" in clause, clause
    # Our seal on top validated the chain, and both verifiers accept the result.
    assert_our_set(delivered, 2, "pass")
    assert (lab.ours(delivered).result, lab.theirs(delivered)) == ("pass", "ARC_ALLOW")


@pytest.mark.parametrize("where", ["body", "subject"])
def test_rspamd_chain_changed_after_sealing_fails_in_our_results(lab: Lab, where: str) -> None:
    sealed = lab.rspamd_seal(original(lab, "rspamd then changed"), FWD)
    if where == "body":
        changed = sealed + b"A footer added after the seal.\r\n"
    else:
        changed = sealed.replace(b"\r\nSubject: ", b"\r\nSubject: [tag] ", 1)
    assert changed != sealed and lab.theirs(changed) == "ARC_REJECT"
    delivered = lab.through_us(changed)
    clause = arc_clause(delivered)
    assert clause.startswith("arc=fail"), clause
    assert "AMS i=1" in clause, clause  # the comment says which signature broke
    # A failed chain is sealed once with cv=fail, which ends it for everybody.
    assert_our_set(delivered, 2, "fail")
    assert (lab.ours(delivered).result, lab.theirs(delivered)) == ("fail", "ARC_REJECT")


# -- we seal, rspamd verifies -------------------------------------------------------------------


def test_our_seal_on_fresh_mail_is_valid_for_rspamd(lab: Lab) -> None:
    delivered = lab.through_us(original(lab, "fresh"))
    assert_our_set(delivered, 1, "none")
    assert has_clause(arc_sets(delivered)[1]["aar"], "dkim=pass", f"header.d={ORIGIN}")
    scan = lab.rspamd.check(delivered)
    assert scan.arc == "ARC_ALLOW", scan.symbols
    assert scan.arc_options == [f"{US}:s={SELECTOR[US]}:i=1"], scan.arc_options
    assert lab.ours(delivered).result == "pass"

    tampered = delivered + b"Changed after our seal.\r\n"
    assert (lab.ours(tampered).result, lab.theirs(tampered)) == ("fail", "ARC_REJECT")


def test_rspamd_seals_on_top_of_our_set_with_cv_pass(lab: Lab) -> None:
    ours = lab.through_us(original(lab, "us then rspamd"))
    resealed = lab.rspamd_seal(ours, RELAY)
    seal = seal_tags(resealed, 2)
    assert (seal["d"], seal["cv"]) == (RELAY, "pass"), seal  # rspamd validated our set
    assert (lab.ours(resealed).result, lab.theirs(resealed)) == ("pass", "ARC_ALLOW")


# -- three hops ---------------------------------------------------------------------------------


def test_rspamd_rspamd_us_passes_in_both(lab: Lab) -> None:
    two = lab.rspamd_seal(lab.rspamd_seal(original(lab, "two rspamd hops"), FWD), RELAY)
    delivered = lab.through_us(two)
    clause = arc_clause(delivered)
    assert clause.startswith("arc=pass") and f"as[2].d={RELAY}" in clause, clause
    assert_our_set(delivered, 3, "pass")
    outcome = lab.ours(delivered)
    assert (outcome.result, outcome.instances) == ("pass", 3), outcome
    assert [(s.instance, s.domain) for s in outcome.sets] == [(1, FWD), (2, RELAY), (3, US)]
    assert lab.theirs(delivered) == "ARC_ALLOW"


def test_us_rspamd_us_passes_in_both(lab: Lab) -> None:
    first = lab.through_us(original(lab, "us, rspamd, us"))
    second = lab.rspamd_seal(first, RELAY)
    delivered = lab.through_us(second)
    assert arc_clause(delivered).startswith("arc=pass"), arc_clause(delivered)
    assert_our_set(delivered, 3, "pass")
    outcome = lab.ours(delivered)
    assert [(s.instance, s.domain) for s in outcome.sets] == [(1, US), (2, RELAY), (3, US)]
    assert lab.theirs(delivered) == "ARC_ALLOW"


def test_rspamd_us_rspamd_fails_on_rspamd_34s_third_seal(lab: Lab) -> None:
    """See the module docstring: rspamd validates our set, then signs its i=3 seal over the
    older sets in the wrong order."""
    ours = lab.through_us(lab.rspamd_seal(original(lab, "rspamd, us, rspamd"), FWD))
    assert_our_set(ours, 2, "pass")
    assert (lab.ours(ours).result, lab.theirs(ours)) == ("pass", "ARC_ALLOW")

    three = lab.rspamd_seal(ours, RELAY)
    assert seal_tags(three, 3)["cv"] == "pass"  # rspamd found our i=2 chain valid
    outcome = lab.ours(three)
    assert (outcome.result, outcome.reason) == ("fail", "AS i=3: seal did not verify"), outcome
    assert lab.theirs(three) == "ARC_REJECT"
    # dkimpy, a third verifier, agrees. Our verifier checks every AMS before any seal
    # (RFC 8617 §5.2 steps 4-6), so its reason says the AMSs are fine; the seal is not: it
    # signs rspamd 3.4's order, not RFC 8617's.
    assert dkim.arc_verify(three, dnsfunc=lab.zone.dkimpy_dnsfunc)[0] == b"fail"
    public = lab.keys[RELAY].public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    headers = split(three)[0]
    assert seal_verifies(public, headers, rspamd34_seal_input(headers, 3))
    assert not seal_verifies(public, headers, rfc8617_seal_input(headers, 3))


# -- what an ARC-Seal signs -------------------------------------------------------------------


def rfc8617_seal_input(headers: list[tuple[bytes, bytes]], n: int) -> list[tuple[bytes, bytes]]:
    """RFC 8617 §5.1.1: the sets 1..n-1 (AAR, AMS, AS each), then AAR and AMS of set n."""
    sets = arc_set_fields(headers)
    return [field for i in range(1, n) for field in sets[i]] + sets[n][:2]


def rspamd34_seal_input(headers: list[tuple[bytes, bytes]], n: int) -> list[tuple[bytes, bytes]]:
    """What rspamd 3.4's ``arc_sign_seal`` hashes for seal ``n``: for i = n-1 down to 1 the
    i-th AAR in header order (top first, as the header was before rspamd added set n), then
    AMS i and AS i by instance; then AAR and AMS of set n."""
    sets = arc_set_fields(headers)
    newest_aar = sets[n][0]
    aars = [(name, value) for name, value in headers
            if name.lower() == b"arc-authentication-results" and (name, value) != newest_aar]
    fields: list[tuple[bytes, bytes]] = []
    for i in range(n - 1, 0, -1):
        fields += [aars[i - 1], sets[i][1], sets[i][2]]
    return fields + sets[n][:2]


def seal_verifies(public: rsa.RSAPublicKey, headers: list[tuple[bytes, bytes]],
                  signed: list[tuple[bytes, bytes]]) -> bool:  # fmt: skip
    """Whether the newest ARC-Seal's b= is the key's signature over ``signed`` + the seal."""
    sets = arc_set_fields(headers)
    seal = sets[max(sets)][2]
    b_tag = re.search(rb"(?:^|;)\s*b\s*=([^;]*)", seal[1])
    assert b_tag, seal
    signature = base64.b64decode(re.sub(rb"\s+", b"", b_tag.group(1)))
    hasher = hashlib.sha256()
    feed_seal(hasher, signed, seal)
    try:
        public.verify(signature, hasher.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
