"""DKIM verification: named scenarios signed with dkimpy or by hand, keys served from zone text.

Unit tests publish key records with :func:`dnsserver.make_zone` and read them through
:class:`fakedns.ZoneResolver`; a few tests serve the same zone text from a real NSD.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authmilter.dkim_verify import verify_message
from authmilter.errors import DNSNameNotFound, DNSPermError, DNSTempError
from authmilter.keys import PrivateKey, generate_private_key, key_record_text, parse_private_key
from authmilter.resolver import Resolver
from authmilter.results import DkimOutcome, DkimProblem, DkimResult
from dnsserver import BlackholeDns, NsdServer, Record, SeenQuery, make_zone, txt_rdata
from fakedns import ZoneResolver, failure_marker
from helpers import DKIM_BODY as BODY
from helpers import NoKeys, make_message

NsdFactory = Callable[[Mapping[str, str]], NsdServer]
DOMAIN = "example.test"
DATA = Path(__file__).parent / "data" / "dkim"


@pytest.fixture(scope="module")
def keys() -> dict[str, PrivateKey]:
    """One key of each kind the tests sign with (generated once per module)."""
    return {
        "rsa2048": generate_private_key("rsa", 2048),
        "rsa1024": generate_private_key("rsa", 1024),
        "ed25519": generate_private_key("ed25519"),
        # cryptography no longer generates keys under 1024 bits: made with `openssl genrsa 768`.
        "rsa768": parse_private_key((DATA / "rsa768.pem").read_bytes(), source="rsa768.pem"),
        "other": generate_private_key("rsa", 2048),
    }


def key_txt(selector: str, record: str) -> Record:
    """The zone record publishing ``record`` at ``selector._domainkey``."""
    return (f"{selector}._domainkey", "TXT", txt_rdata(record))


def zone(*records: Record, domain: str = DOMAIN) -> ZoneResolver:
    return ZoneResolver(make_zone(domain, records), domain)


def sign(
    message: bytes,
    key: PrivateKey,
    *,
    selector: str = "sel",
    domain: str = DOMAIN,
    canon: tuple[str, str] = ("relaxed", "relaxed"),
    algorithm: str | None = None,
    identity: str | None = None,
    length: bool = False,
) -> bytes:
    """Sign with dkimpy and return the message with the DKIM-Signature prepended."""
    if algorithm is None:
        algorithm = "ed25519-sha256" if key.algorithm.value == "ed25519" else "rsa-sha256"
    header = dkim.sign(
        message,
        selector.encode(),
        domain.encode(),
        key.dkimpy_private(),
        identity=identity.encode() if identity else None,
        canonicalize=(canon[0].encode(), canon[1].encode()),
        signature_algorithm=algorithm.encode(),
        length=length,
    )
    return bytes(header) + message


class _Collector:
    """A hasher stand-in that keeps the bytes dkimpy would hash."""

    def __init__(self) -> None:
        self.data = bytearray()

    def update(self, data: bytes) -> None:
        self.data += data


def craft(
    message: bytes,
    key: PrivateKey,
    tags: Iterable[tuple[str, str | None]],
    *,
    hash_name: str = "sha256",
) -> bytes:
    """Sign by hand with arbitrary tags: ``bh`` given as ``None`` is computed, ``b=`` is added.

    The header hash input is built with dkimpy's own header selection and canonicalization,
    and signed with ``key`` whatever ``a=`` says, so tests can write signatures that dkimpy's
    ``sign()`` refuses to (no From in h=, duplicate tags, x=, an Ed25519 key under
    a=rsa-sha256, ...).
    """
    tag_list = list(tags)
    values = {name: value for name, value in tag_list}
    headers, body = dkim.rfc822_parse(message)
    c_value = values.get("c") or "simple/simple"
    try:
        policy = CanonicalizationPolicy.from_c_value(c_value.encode())
    except InvalidCanonicalizationPolicyError:
        policy = CanonicalizationPolicy.from_c_value(b"simple/simple")
    canonical_body = policy.canonicalize_body(body)
    if values.get("l"):
        canonical_body = canonical_body[: int(values["l"] or 0)]
    body_hash = base64.b64encode(hashlib.new(hash_name, canonical_body).digest()).decode()
    text = "; ".join(f"{n}={body_hash if n == 'bh' and v is None else v}" for n, v in tag_list)
    value = f" {text}; b=".encode()

    include = [x.strip().lower().encode() for x in (values.get("h") or "").split(":")]
    if b"from" in include:
        include.append(b"from")  # as dkimpy's verify does (Debian bug #644046)
    collector = _Collector()
    dkim.hash_headers(
        collector,
        policy,
        policy.canonicalize_headers(headers),
        include,
        (b"DKIM-Signature", value),
        {},
    )
    data = bytes(collector.data)
    if isinstance(key.key, ed25519.Ed25519PrivateKey):
        signature = key.key.sign(hashlib.sha256(data).digest())  # RFC 8463 §3
    else:
        assert isinstance(key.key, rsa.RSAPrivateKey)
        algorithm = hashes.SHA1() if hash_name == "sha1" else hashes.SHA256()
        signature = key.key.sign(data, padding.PKCS1v15(), algorithm)
    return b"DKIM-Signature:" + value + base64.b64encode(signature) + b"\r\n" + message


def base_tags(**override: str | None) -> list[tuple[str, str | None]]:
    """The tags of a good rsa-sha256 relaxed/relaxed signature; ``name=None`` drops one."""
    tags: dict[str, str | None] = {
        "v": "1",
        "a": "rsa-sha256",
        "c": "relaxed/relaxed",
        "d": DOMAIN,
        "s": "sel",
        "h": "from:to:subject:date",
        "bh": None,
    }
    for name, value in override.items():
        if value is None:
            tags.pop(name, None)
        else:
            tags[name] = value
    return list(tags.items())


def b_value(signed: bytes, index: int = 0) -> str:
    """The b= of the ``index``-th DKIM-Signature, white space removed."""
    headers, _ = dkim.rfc822_parse(signed)
    values = [v for n, v in headers if n.lower() == b"dkim-signature"]
    match = re.search(rb"(?:^|;)\s*b=([^;]*)", values[index])
    assert match is not None
    return re.sub(rb"\s+", b"", match.group(1)).decode()


def only(outcomes: list[DkimOutcome]) -> DkimOutcome:
    assert len(outcomes) == 1, outcomes
    return outcomes[0]


def assert_outcome(
    outcome: DkimOutcome,
    result: DkimResult,
    reason: str,
    problem: DkimProblem | None = DkimProblem.BAD_SIGNATURE,
) -> None:
    assert (outcome.result, outcome.reason, outcome.problem) == (result, reason, problem), outcome


# -- passing signatures -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "canon",
    [("relaxed", "relaxed"), ("simple", "simple"), ("relaxed", "simple")],
    ids=lambda c: "/".join(c),
)
def test_rsa_signature_passes(keys: dict[str, PrivateKey], canon: tuple[str, str]) -> None:
    key = keys["rsa2048"]
    signed = sign(make_message(), key, canon=canon)
    outcome = only(verify_message(signed, zone(key_txt("sel", key_record_text(key)))))
    assert outcome == DkimOutcome(
        result=DkimResult.PASS,
        domain=DOMAIN,
        selector="sel",
        identity=f"@{DOMAIN}",
        algorithm="rsa-sha256",
        b=b_value(signed),
        key_bits=2048,
        testing=False,
        reason="signature verified",
        problem=None,
    )
    assert outcome.passed


def test_ed25519_signature_passes(keys: dict[str, PrivateKey]) -> None:
    key = keys["ed25519"]
    signed = sign(make_message(), key, selector="ed")
    outcome = only(verify_message(signed, zone(key_txt("ed", key_record_text(key)))))
    assert_outcome(outcome, DkimResult.PASS, "signature verified", None)
    assert (outcome.algorithm, outcome.key_bits, outcome.selector) == ("ed25519-sha256", 256, "ed")
    assert outcome.b == b_value(signed)


def test_explicit_identity_in_a_subdomain_is_reported(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    signed = sign(make_message(), key, identity=f"alice@mail.{DOMAIN}")
    outcome = only(verify_message(signed, zone(key_txt("sel", key_record_text(key)))))
    assert outcome.result is DkimResult.PASS
    assert outcome.identity == f"alice@mail.{DOMAIN}"


def test_unsigned_header_added_in_transit_does_not_break_the_signature(
    keys: dict[str, PrivateKey],
) -> None:
    key = keys["rsa2048"]
    signed = sign(make_message(), key)
    relayed = b"Received: from mx.example.net by mx.example.org\r\n" + signed
    outcome = only(verify_message(relayed, zone(key_txt("sel", key_record_text(key)))))
    assert outcome.result is DkimResult.PASS


def test_bare_lf_line_ends_are_tolerated(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    signed = sign(make_message(), key)
    outcome = only(
        verify_message(signed.replace(b"\r\n", b"\n"), zone(key_txt("sel", key_record_text(key))))
    )
    assert outcome.result is DkimResult.PASS


def test_key_with_several_service_types_including_email_passes(
    keys: dict[str, PrivateKey],
) -> None:
    # dkimpy compares s= as one string and loses the key on "email:tlsrpt"; the record
    # handed to it is normalized, so this passes.
    key = keys["rsa2048"]
    record = key_record_text(key).replace("k=rsa;", "k=rsa; s=email:tlsrpt;")
    outcome = only(verify_message(sign(make_message(), key), zone(key_txt("sel", record))))
    assert_outcome(outcome, DkimResult.PASS, "signature verified", None)


def test_key_type_is_case_insensitive(keys: dict[str, PrivateKey]) -> None:
    key = keys["ed25519"]
    record = key_record_text(key).replace("k=ed25519", "k=ED25519")
    outcome = only(verify_message(sign(make_message(), key), zone(key_txt("sel", record))))
    assert outcome.result is DkimResult.PASS


def test_message_without_signature_gives_none() -> None:
    assert verify_message(make_message(), zone()) == [
        DkimOutcome(result=DkimResult.NONE, reason="no signature")
    ]


# -- failing signatures -----------------------------------------------------------------------


def test_modified_body_fails_with_body_hash(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    signed = sign(make_message(), key).replace(b"quarterly", b"annual")
    outcome = only(verify_message(signed, zone(key_txt("sel", key_record_text(key)))))
    assert_outcome(outcome, DkimResult.FAIL, "body hash did not verify")
    assert (outcome.domain, outcome.selector, outcome.key_bits) == (DOMAIN, "sel", 2048)


def test_modified_signed_header_fails_the_signature(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    signed = sign(make_message(), key).replace(b"Subject: Quarterly", b"Subject: Urgent")
    outcome = only(verify_message(signed, zone(key_txt("sel", key_record_text(key)))))
    assert_outcome(outcome, DkimResult.FAIL, "signature verification failed")


def test_signature_made_with_another_key_fails(keys: dict[str, PrivateKey]) -> None:
    signed = sign(make_message(), keys["other"])
    outcome = only(verify_message(signed, zone(key_txt("sel", key_record_text(keys["rsa2048"])))))
    assert_outcome(outcome, DkimResult.FAIL, "signature verification failed")


# -- the gaps dkimpy leaves open ----------------------------------------------------------------


def test_gap_a_valid_rsa_sha1_signature_is_policy(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    signed = sign(make_message(), key, algorithm="rsa-sha1")
    outcome = only(verify_message(signed, zone(key_txt("sel", key_record_text(key)))))
    assert_outcome(outcome, DkimResult.POLICY, "rsa-sha1 not acceptable (RFC 8301)")
    assert outcome.algorithm == "rsa-sha1"


def test_gap_a_broken_rsa_sha1_signature_still_fails(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    signed = sign(make_message(), key, algorithm="rsa-sha1").replace(b"Alice\r\n", b"Mallory\r\n")
    outcome = only(verify_message(signed, zone(key_txt("sel", key_record_text(key)))))
    assert_outcome(outcome, DkimResult.FAIL, "body hash did not verify")


def test_gap_b_key_hash_list_excluding_the_signature_hash_is_permerror(
    keys: dict[str, PrivateKey],
) -> None:
    key = keys["rsa2048"]
    record = key_record_text(key, hash_algorithms=["sha1"])
    outcome = only(verify_message(sign(make_message(), key), zone(key_txt("sel", record))))
    assert_outcome(
        outcome, DkimResult.PERMERROR, "key h=sha1 does not allow sha256 (RFC 6376 §3.6.1)"
    )
    assert outcome.key_bits == 2048


def test_gap_c_strict_key_refuses_an_identity_in_a_subdomain(
    keys: dict[str, PrivateKey],
) -> None:
    key = keys["rsa2048"]
    record = key_record_text(key, no_subdomains=True)
    signed = sign(make_message(), key, identity=f"alice@mail.{DOMAIN}")
    outcome = only(verify_message(signed, zone(key_txt("sel", record))))
    assert_outcome(
        outcome,
        DkimResult.PERMERROR,
        f"key t=s forbids i= subdomain mail.{DOMAIN} (RFC 6376 §3.6.1)",
    )


def test_gap_c_strict_key_accepts_an_identity_in_d_itself(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    record = key_record_text(key, no_subdomains=True)
    signed = craft(make_message(), key, base_tags(i=f"alice@{DOMAIN.upper()}"))
    outcome = only(verify_message(signed, zone(key_txt("sel", record))))
    assert outcome.result is DkimResult.PASS


def test_gap_d_signature_without_from_in_h_is_permerror(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    signed = craft(make_message(), key, base_tags(h="to:subject:date"))
    outcome = only(verify_message(signed, zone(key_txt("sel", key_record_text(key)))))
    assert_outcome(outcome, DkimResult.PERMERROR, "From not signed (RFC 6376 §5.4)")
    assert outcome.key_bits is None  # refused before the key was fetched


def test_gap_e_duplicate_tag_is_permerror(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    tags = [*base_tags(), ("d", "evil.example")]
    signed = craft(make_message(), key, tags)
    outcome = only(verify_message(signed, zone(key_txt("sel", key_record_text(key)))))
    assert_outcome(outcome, DkimResult.PERMERROR, "duplicate tag 'd' (RFC 6376 §3.2)")
    assert outcome.domain is None


def test_gap_f_ed25519_key_for_an_rsa_signature_is_permerror(
    keys: dict[str, PrivateKey],
) -> None:
    # Signed with the Ed25519 key but labelled a=rsa-sha256: dkimpy picks the crypto by the
    # key's k= and would accept it.
    key = keys["ed25519"]
    signed = craft(make_message(), key, base_tags(a="rsa-sha256"))
    outcome = only(verify_message(signed, zone(key_txt("sel", key_record_text(key)))))
    assert_outcome(
        outcome,
        DkimResult.PERMERROR,
        "key k=ed25519 does not match a=rsa-sha256 (RFC 6376 §6.1.2)",
    )
    assert outcome.key_bits == 256


def test_gap_f_rsa_key_for_an_ed25519_signature_is_permerror(
    keys: dict[str, PrivateKey],
) -> None:
    key = keys["rsa2048"]
    signed = craft(make_message(), key, base_tags(a="ed25519-sha256"))
    outcome = only(verify_message(signed, zone(key_txt("sel", key_record_text(key)))))
    assert outcome.result is DkimResult.PERMERROR
    assert outcome.reason == "key k=rsa does not match a=ed25519-sha256 (RFC 6376 §6.1.2)"


# -- signature tag checks (RFC 6376 §6.1.1) -------------------------------------------------------


def test_hand_crafted_signature_passes(keys: dict[str, PrivateKey]) -> None:
    # The crafting helper itself is right: with good tags it verifies.
    key = keys["rsa2048"]
    signed = craft(make_message(), key, base_tags(i=f"@{DOMAIN}", q="dns/txt"))
    outcome = only(verify_message(signed, zone(key_txt("sel", key_record_text(key)))))
    assert_outcome(outcome, DkimResult.PASS, "signature verified", None)


@pytest.mark.parametrize("tag", ["v", "a", "bh", "d", "h", "s"])
def test_missing_required_tag_is_permerror(keys: dict[str, PrivateKey], tag: str) -> None:
    key = keys["rsa2048"]
    tags = base_tags(**{tag: None})
    signed = craft(make_message(), key, tags)
    outcome = only(verify_message(signed, zone(key_txt("sel", key_record_text(key)))))
    assert_outcome(outcome, DkimResult.PERMERROR, f"missing required tag '{tag}' (RFC 6376 §6.1.1)")


def test_missing_b_tag_is_permerror(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    signed = craft(make_message(), key, base_tags())
    without_b = re.sub(rb";\s*b=[^;]*\r\n", b"\r\n", signed, count=1)
    assert without_b != signed
    outcome = only(verify_message(without_b, zone(key_txt("sel", key_record_text(key)))))
    assert_outcome(outcome, DkimResult.PERMERROR, "missing required tag 'b' (RFC 6376 §6.1.1)")


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"v": "2"}, "unsupported version v='2' (RFC 6376 §6.1.1)"),
        ({"a": "rsa-sha512"}, "unknown algorithm a='rsa-sha512' (RFC 6376 §3.5)"),
        ({"a": "RSA-SHA256"}, "unknown algorithm a='RSA-SHA256' (RFC 6376 §3.5)"),
        ({"c": "relaxed/strict"}, "unknown canonicalization c='relaxed/strict' (RFC 6376 §3.5)"),
        ({"bh": "not*base64"}, "bh= is not valid base64 (RFC 6376 §3.5)"),
        ({"bh": ""}, "bh= is empty (RFC 6376 §3.5)"),
        ({"d": "exa mple.test"}, "d= 'exa mple.test' is not a domain name (RFC 6376 §3.5)"),
        (
            {"d": "evil.example", "i": "@example.test"},
            "i= domain example.test is not within d= (RFC 6376 §6.1.1)",
        ),
        ({"i": "alice@evil.example"}, "i= domain evil.example is not within d= (RFC 6376 §6.1.1)"),
        (
            {"i": "alice@notexample.test"},
            "i= domain notexample.test is not within d= (RFC 6376 §6.1.1)",
        ),
        ({"i": "alice"}, "i= 'alice' is not [local]@domain (RFC 6376 §3.5)"),
        ({"h": "from::to"}, "h= has an invalid field name '' (RFC 6376 §3.5)"),
        ({"q": "dns"}, "unsupported query method q='dns' (RFC 6376 §3.5)"),
        ({"l": "-5"}, "l= '-5' is not a byte count (RFC 6376 §3.5)"),
        ({"t": "soon"}, "t= 'soon' is not a timestamp (RFC 6376 §3.5)"),
        ({"x": "1" * 13}, "x= '1111111111111' is not a timestamp (RFC 6376 §3.5)"),
        ({"s": "sel..x"}, "s= 'sel..x' is not a valid selector (RFC 6376 §3.1)"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_bad_signature_tag_is_permerror(
    keys: dict[str, PrivateKey], override: dict[str, str], reason: str
) -> None:
    key = keys["rsa2048"]
    signed = craft(make_message(), key, base_tags(**override))
    outcome = only(verify_message(signed, zone(key_txt("sel", key_record_text(key)))))
    assert_outcome(outcome, DkimResult.PERMERROR, reason)


def test_bad_base64_in_b_is_permerror(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    signed = craft(make_message(), key, base_tags())
    broken = re.sub(rb"(;\s*b=)[A-Za-z0-9+/]{4}", rb"\1!!!!", signed, count=1)
    outcome = only(verify_message(broken, zone(key_txt("sel", key_record_text(key)))))
    assert_outcome(outcome, DkimResult.PERMERROR, "b= is not valid base64 (RFC 6376 §3.5)")
    assert outcome.b is None


# -- times: t= and x= ---------------------------------------------------------------------------


def timed(keys: dict[str, PrivateKey], t: int | None, x: int | None) -> bytes:
    extra = {k: str(v) for k, v in (("t", t), ("x", x)) if v is not None}
    return craft(make_message(), keys["rsa2048"], base_tags(**extra))


def verify_timed(
    keys: dict[str, PrivateKey], signed: bytes, now: float | None = None, clock_drift: int = 300
) -> DkimOutcome:
    resolver = zone(key_txt("sel", key_record_text(keys["rsa2048"])))
    return only(verify_message(signed, resolver, now=now, clock_drift=clock_drift))


def test_expired_signature_is_permerror(keys: dict[str, PrivateKey]) -> None:
    now = int(time.time())
    signed = timed(keys, now - 7200, now - 3600)
    assert_outcome(verify_timed(keys, signed), DkimResult.PERMERROR, "signature expired")


def test_expiry_allows_the_clock_drift(keys: dict[str, PrivateKey]) -> None:
    now = int(time.time())
    signed = timed(keys, now - 7200, now + 3600)
    assert verify_timed(keys, signed, now=now + 3600 + 299).result is DkimResult.PASS
    outcome = verify_timed(keys, signed, now=now + 3600 + 301)
    assert_outcome(outcome, DkimResult.PERMERROR, "signature expired")
    assert verify_timed(keys, signed, now=now + 3600 + 301, clock_drift=600).passed


def test_timestamp_in_the_future_is_permerror(keys: dict[str, PrivateKey]) -> None:
    now = int(time.time())
    signed = timed(keys, now + 3600, None)
    assert_outcome(verify_timed(keys, signed), DkimResult.PERMERROR,
                   "signature timestamp in the future")
    assert verify_timed(keys, signed, now=now + 3600 - 250).passed


def test_timestamp_slightly_ahead_is_within_the_drift(keys: dict[str, PrivateKey]) -> None:
    now = int(time.time())
    assert verify_timed(keys, timed(keys, now + 200, None)).passed


@pytest.mark.parametrize("gap", [0, -10], ids=["x-equals-t", "x-before-t"])
def test_expiry_not_after_the_timestamp_is_permerror(keys: dict[str, PrivateKey], gap: int) -> None:
    now = int(time.time())
    signed = timed(keys, now, now + gap)
    assert_outcome(
        verify_timed(keys, signed), DkimResult.PERMERROR, "x= is not later than t= (RFC 6376 §3.5)"
    )


# -- l= body length ----------------------------------------------------------------------------


def canonical_length(body: bytes, canon: str = "relaxed") -> int:
    policy = CanonicalizationPolicy.from_c_value(f"{canon}/{canon}".encode())
    return len(policy.canonicalize_body(body))


def test_body_longer_than_l_verifies_and_says_what_is_unsigned(
    keys: dict[str, PrivateKey],
) -> None:
    key = keys["rsa2048"]
    signed = sign(make_message(), key, length=True)
    footer = b"\r\n--\r\nUnsubscribe: https://lists.example.net/u/12345\r\n"
    outcome = only(verify_message(signed + footer, zone(key_txt("sel", key_record_text(key)))))
    covered, total = canonical_length(BODY), canonical_length(BODY + footer)
    assert covered < total
    assert_outcome(
        outcome,
        DkimResult.PASS,
        f"signature verified (l= covers {covered} of {total} body bytes)",
        None,
    )


def test_l_equal_to_the_body_says_nothing_more(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    signed = sign(make_message(), key, length=True)
    outcome = only(verify_message(signed, zone(key_txt("sel", key_record_text(key)))))
    assert_outcome(outcome, DkimResult.PASS, "signature verified", None)


def test_l_zero_signs_no_body_at_all(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    signed = craft(make_message(), key, base_tags(l="0"))
    outcome = only(verify_message(signed, zone(key_txt("sel", key_record_text(key)))))
    total = canonical_length(BODY)
    assert outcome.reason == f"signature verified (l= covers 0 of {total} body bytes)"


def test_body_shorter_than_l_is_permerror(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    signed = sign(make_message(), key, length=True)
    truncated = signed[: -len(b"-- \r\nAlice\r\n")]
    outcome = only(verify_message(truncated, zone(key_txt("sel", key_record_text(key)))))
    signed_length = canonical_length(BODY)
    body_length = canonical_length(BODY[: -len(b"-- \r\nAlice\r\n")])
    assert_outcome(
        outcome,
        DkimResult.PERMERROR,
        f"l={signed_length} exceeds the {body_length}-byte body (RFC 6376 §3.5)",
    )


# -- keys ---------------------------------------------------------------------------------------


def test_missing_key_is_key_not_found(keys: dict[str, PrivateKey]) -> None:
    signed = sign(make_message(), keys["rsa2048"])
    outcome = only(verify_message(signed, zone()))
    assert_outcome(outcome, DkimResult.PERMERROR, "key not found", DkimProblem.KEY_NOT_FOUND)
    assert (outcome.domain, outcome.selector, outcome.key_bits) == (DOMAIN, "sel", None)


def test_selector_name_without_txt_is_key_not_found(keys: dict[str, PrivateKey]) -> None:
    signed = sign(make_message(), keys["rsa2048"])
    resolver = zone(("sel._domainkey", "A", "192.0.2.1"))
    outcome = only(verify_message(signed, resolver))
    assert_outcome(outcome, DkimResult.PERMERROR, "key not found", DkimProblem.KEY_NOT_FOUND)


def test_revoked_key_is_permerror(keys: dict[str, PrivateKey]) -> None:
    signed = sign(make_message(), keys["rsa2048"])
    outcome = only(verify_message(signed, zone(key_txt("sel", "v=DKIM1; k=rsa; p="))))
    assert_outcome(outcome, DkimResult.PERMERROR, "key revoked")


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ("v=DKIM1; k=rsa; p=!!notbase64", "malformed key record: p= is not valid base64"),
        ("v=DKIM1; k=rsa; p=AAAA", "malformed key record: p= is not a DER RSA public key"),
        ("v=spf1 -all", "malformed key record: v=spf1 -all is not DKIM1"),
        ("v=DKIM2; p=AAAA", "malformed key record: v=DKIM2 is not DKIM1"),
        ("k=dsa; p=AAAA", "malformed key record: unknown key type k=dsa"),
    ],
)
def test_malformed_key_record_is_permerror(
    keys: dict[str, PrivateKey], record: str, reason: str
) -> None:
    signed = sign(make_message(), keys["rsa2048"])
    outcome = only(verify_message(signed, zone(key_txt("sel", record))))
    assert outcome.result is DkimResult.PERMERROR
    assert outcome.problem is DkimProblem.BAD_SIGNATURE
    assert outcome.reason is not None and outcome.reason.startswith(reason), outcome.reason


def test_key_not_for_email_is_permerror(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    record = key_record_text(key).replace("k=rsa;", "k=rsa; s=tlsrpt;")
    outcome = only(verify_message(sign(make_message(), key), zone(key_txt("sel", record))))
    assert_outcome(outcome, DkimResult.PERMERROR, "key s=tlsrpt excludes email (RFC 6376 §3.6.1)")


def test_several_key_records_at_the_selector_are_permerror(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    # The old and the new key published at once (identical records would be one RR).
    resolver = zone(
        key_txt("sel", key_record_text(key)), key_txt("sel", key_record_text(keys["other"]))
    )
    outcome = only(verify_message(sign(make_message(), key), resolver))
    assert_outcome(
        outcome,
        DkimResult.PERMERROR,
        f"2 key records at sel._domainkey.{DOMAIN} (RFC 6376 §3.6.2.2)",
    )


@pytest.mark.parametrize("marker", ["SERVFAIL", "TIMEOUT"])
def test_transient_dns_failure_is_temperror(keys: dict[str, PrivateKey], marker: str) -> None:
    signed = sign(make_message(), keys["rsa2048"])
    resolver = zone(("sel._domainkey", "TXT", failure_marker(marker)))
    outcome = only(verify_message(signed, resolver))
    assert outcome.result is DkimResult.TEMPERROR
    assert outcome.problem is DkimProblem.DNS_ERROR
    assert outcome.reason is not None and outcome.reason.startswith("key lookup failed: ")
    assert resolver.queries == 1


def test_malformed_dns_answer_is_permerror_of_dns(keys: dict[str, PrivateKey]) -> None:
    signed = sign(make_message(), keys["rsa2048"])
    resolver = zone(("sel._domainkey", "TXT", failure_marker("MALFORMED")))
    outcome = only(verify_message(signed, resolver))
    assert (outcome.result, outcome.problem) == (DkimResult.PERMERROR, DkimProblem.DNS_ERROR)


def test_testing_key_is_reported_and_still_passes(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    record = key_record_text(key, testmode=True)
    outcome = only(verify_message(sign(make_message(), key), zone(key_txt("sel", record))))
    assert outcome.result is DkimResult.PASS
    assert outcome.testing is True


def test_testing_flag_is_reported_on_failure_too(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    record = key_record_text(key, testmode=True)
    signed = sign(make_message(), key).replace(b"quarterly", b"annual")
    outcome = only(verify_message(signed, zone(key_txt("sel", record))))
    assert (outcome.result, outcome.testing) == (DkimResult.FAIL, True)


# -- key size policy (RFC 8301 §3.2, MinimumKeyBits) --------------------------------------------


def test_1024_bit_key_below_minimum_key_bits_is_policy(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa1024"]
    signed = sign(make_message(), key)
    resolver = zone(key_txt("sel", key_record_text(key)))
    outcome = only(verify_message(signed, resolver, minimum_key_bits=2048))
    assert_outcome(outcome, DkimResult.POLICY, "1024-bit key below MinimumKeyBits 2048")
    assert outcome.key_bits == 1024
    assert only(verify_message(signed, resolver)).passed  # default MinimumKeyBits 1024


def test_key_under_1024_bits_is_policy_even_with_minimum_zero(
    keys: dict[str, PrivateKey],
) -> None:
    key = keys["rsa768"]
    signed = sign(make_message(), key)
    outcome = only(
        verify_message(signed, zone(key_txt("sel", key_record_text(key))), minimum_key_bits=0)
    )
    assert_outcome(outcome, DkimResult.POLICY, "768-bit key below the RFC 8301 minimum of 1024")
    assert outcome.key_bits == 768


def test_minimum_key_bits_does_not_apply_to_ed25519(keys: dict[str, PrivateKey]) -> None:
    key = keys["ed25519"]
    outcome = only(
        verify_message(
            sign(make_message(), key),
            zone(key_txt("sel", key_record_text(key))),
            minimum_key_bits=2048,
        )
    )
    assert outcome.passed


# -- several signatures -------------------------------------------------------------------------


def test_max_signatures_verifies_the_top_three_of_four(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    message = make_message()
    for selector in ("s4", "s3", "s2", "s1"):  # the last added is on top
        message = sign(message, key, selector=selector)
    records = [key_txt(s, key_record_text(key)) for s in ("s1", "s2", "s3", "s4")]
    resolver = zone(*records)
    outcomes = verify_message(message, resolver)
    assert [o.selector for o in outcomes] == ["s1", "s2", "s3"]
    assert all(o.passed for o in outcomes)
    assert resolver.queries == 3
    assert [o.selector for o in verify_message(message, resolver, max_signatures=10)] == [
        "s1",
        "s2",
        "s3",
        "s4",
    ]


def test_one_passing_and_one_failing_signature(keys: dict[str, PrivateKey]) -> None:
    message = sign(make_message(), keys["rsa2048"], selector="good")
    message = sign(message, keys["other"], selector="bad", domain="lists.example.test")
    resolver = zone(
        key_txt("good", key_record_text(keys["rsa2048"])),
        ("bad._domainkey.lists", "TXT", txt_rdata(key_record_text(keys["rsa2048"]))),
    )
    bad, good = verify_message(message, resolver)
    assert (bad.domain, bad.result, bad.reason) == (
        "lists.example.test",
        DkimResult.FAIL,
        "signature verification failed",
    )
    assert (good.domain, good.result) == (DOMAIN, DkimResult.PASS)
    assert good.b == b_value(message, 1)


def test_max_signatures_zero_verifies_only_author_domain_signatures(
    keys: dict[str, PrivateKey],
) -> None:
    key = keys["rsa2048"]
    message = sign(make_message(), key)
    for n in range(5):
        message = sign(message, key, domain="esp.example", selector=f"e{n}")
    resolver = ZoneResolver.from_zones(
        {
            DOMAIN: make_zone(DOMAIN, [key_txt("sel", key_record_text(key))]),
            "esp.example": make_zone(
                "esp.example", [key_txt(f"e{n}", key_record_text(key)) for n in range(5)]
            ),
        }
    )
    outcome = only(verify_message(message, resolver, max_signatures=0))
    assert (outcome.domain, outcome.result) == (DOMAIN, DkimResult.PASS)
    assert len(verify_message(message, resolver, max_signatures=6)) == 6


def test_max_signatures_zero_without_author_signature_gives_none(
    keys: dict[str, PrivateKey],
) -> None:
    key = keys["rsa2048"]
    message = sign(make_message(), key, domain="esp.example")
    outcomes = verify_message(message, zone(), max_signatures=0)
    assert outcomes == [
        DkimOutcome(
            result=DkimResult.NONE,
            reason="no signature from the author domain (MaximumSignaturesToVerify 0)",
        )
    ]


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_signatures"):
        verify_message(make_message(), zone(), max_signatures=-1)
    with pytest.raises(ValueError, match="clock_drift"):
        verify_message(make_message(), zone(), clock_drift=-1)


# -- hostile input --------------------------------------------------------------------------------


GARBAGE = [
    b"",
    b" ",
    b"garbage",
    b" ;;;",
    b" =",
    b" v=1; a=rsa-sha256",
    b" v=1; v=1",
    b" 1a=b",
    b" v=1; a=rsa-sha256; d=example.test; s=sel; h=from; bh=!!!; b=AAAA",
    b" v=1; a=rsa-sha256; d=example.test; s=sel; h=from; bh=AAAA; b=AAAA",
    b" v=1; a=rsa-sha256; d=\xff\xfe.test; s=sel; h=from; bh=AAAA; b=AAAA",
    b" v=1; a=rsa-sha256; d=example.test; s=sel; h=from; bh=AAAA; b=AAAA; l=99999999999",
    b" v=1; a=rsa-sha256; d=example.test; s=sel; h=from; bh=AAAA; b=AAAA; c=simple/simple/x",
    b" v=1; a=rsa-sha256; d=" + b"a." * 200 + b"test; s=sel; h=from; bh=AAAA; b=AAAA",
    b" \x00\x01\x02",
]


@pytest.mark.parametrize("value", GARBAGE)
def test_garbage_signature_value_is_permerror_or_fail(
    keys: dict[str, PrivateKey], value: bytes
) -> None:
    key = keys["rsa2048"]
    message = b"DKIM-Signature:" + value + b"\r\n" + make_message()
    outcome = only(verify_message(message, zone(key_txt("sel", key_record_text(key)))))
    assert outcome.result in (DkimResult.PERMERROR, DkimResult.FAIL), outcome
    assert outcome.problem is DkimProblem.BAD_SIGNATURE


def test_garbage_signature_does_not_hide_the_good_one(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    message = b"DKIM-Signature: v=1; d=;;\r\n" + sign(make_message(), key)
    bad, good = verify_message(message, zone(key_txt("sel", key_record_text(key))))
    assert bad.result is DkimResult.PERMERROR
    assert good.result is DkimResult.PASS


def test_message_header_dkimpy_cannot_parse_gives_permerror(keys: dict[str, PrivateKey]) -> None:
    key = keys["rsa2048"]
    signed = sign(make_message(), key)
    message = signed.replace(b"Message-ID:", b"this line has no colon\r\nMessage-ID:")
    outcome = only(verify_message(message, zone(key_txt("sel", key_record_text(key)))))
    assert outcome.result is DkimResult.PERMERROR
    assert outcome.reason is not None
    assert outcome.reason.startswith("message header not parseable: MessageFormatError")
    assert outcome.domain == DOMAIN


def test_verification_time_is_ours_alone(keys: dict[str, PrivateKey]) -> None:
    """Only `now` decides x=/t= (dkimpy re-checked them against the real clock)."""
    key = keys["rsa2048"]
    real = int(time.time())
    old = craft(make_message(), key, base_tags(t=str(real - 60000), x=str(real - 45000)))
    outcomes = verify_message(
        craft(old, key, base_tags(s="fresh")),
        zone(key_txt("sel", key_record_text(key)), key_txt("fresh", key_record_text(key))),
        now=real - 50000,
    )
    assert [o.result for o in outcomes] == [DkimResult.PASS, DkimResult.PASS]


def test_unexpected_library_exception_is_permerror_for_that_signature(
    keys: dict[str, PrivateKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = keys["rsa2048"]

    def broken(*args: object) -> None:
        raise ZeroDivisionError("simulated library bug")

    message = craft(make_message(), key, base_tags())
    monkeypatch.setattr(dkim, "select_headers", broken)  # dkimpy, under our hashing
    (outcome,) = verify_message(message, zone(key_txt("sel", key_record_text(key))))
    assert outcome.result is DkimResult.PERMERROR
    assert outcome.reason == "verifier error: ZeroDivisionError: simulated library bug"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.binary(max_size=300))
def test_random_bytes_as_signature_never_raise(value: bytes) -> None:
    message = b"DKIM-Signature:" + value + b"\r\n" + make_message()
    outcomes = verify_message(message, NoKeys())
    assert outcomes
    for outcome in outcomes:
        assert outcome.result in (DkimResult.PERMERROR, DkimResult.FAIL), outcome


_TAG_VALUES = st.one_of(
    st.sampled_from(
        [
            "1",
            "rsa-sha256",
            "ed25519-sha256",
            "rsa-sha1",
            "example.test",
            "sel",
            "from:to",
            "from",
            "AAAA",
            "relaxed/relaxed",
            "simple",
            "dns/txt",
            "0",
            "99999",
            "@example.test",
            "a@b.example.test",
            "",
        ]
    ),
    st.text(max_size=20),
)


@settings(max_examples=300, deadline=None)
@given(
    tags=st.lists(
        st.tuples(st.sampled_from(list("vabdhsilqtxcz") + ["bh", "Z9"]), _TAG_VALUES),
        max_size=14,
    )
)
def test_random_tag_lists_never_raise(tags: list[tuple[str, str]]) -> None:
    value = "; ".join(f"{n}={v}" for n, v in tags).encode("utf-8", "surrogatepass")
    message = b"DKIM-Signature: " + value + b"\r\n" + make_message()
    for outcome in verify_message(message, NoKeys()):
        assert outcome.result in (DkimResult.PERMERROR, DkimResult.FAIL), outcome


# -- through a real NSD ---------------------------------------------------------------------------


@pytest.mark.dns
def test_pass_with_the_key_served_by_nsd(
    keys: dict[str, PrivateKey], nsd_server: NsdFactory
) -> None:
    key = keys["rsa2048"]
    text = make_zone(DOMAIN, [key_txt("sel", key_record_text(key))])
    server = nsd_server({DOMAIN: text})
    signed = sign(make_message(), key)
    outcome = only(verify_message(signed, Resolver([server.nameserver], timeout=2)))
    assert_outcome(outcome, DkimResult.PASS, "signature verified", None)
    # The unit-test resolver reads the same zone text and agrees.
    assert only(verify_message(signed, ZoneResolver(text, DOMAIN))) == outcome


@pytest.mark.dns
def test_nxdomain_key_from_nsd_is_key_not_found(
    keys: dict[str, PrivateKey], nsd_server: NsdFactory
) -> None:
    server = nsd_server({DOMAIN: make_zone(DOMAIN)})
    signed = sign(make_message(), keys["rsa2048"])
    outcome = only(verify_message(signed, Resolver([server.nameserver], timeout=2)))
    assert_outcome(outcome, DkimResult.PERMERROR, "key not found", DkimProblem.KEY_NOT_FOUND)


@pytest.mark.dns
def test_unanswering_nameserver_gives_temperror_after_one_query_with_the_timeout(
    keys: dict[str, PrivateKey], blackhole_dns: BlackholeDns
) -> None:
    signed = sign(make_message(), keys["rsa2048"])
    resolver = Resolver([blackhole_dns.nameserver], timeout=1)
    outcome = only(verify_message(signed, resolver))
    assert (outcome.result, outcome.problem) == (DkimResult.TEMPERROR, DkimProblem.DNS_ERROR)
    # The resolver's 1 s bounded the key lookup (not dkimpy's or dnspython's 5 s default) ...
    assert outcome.reason is not None and "timed out after 1s" in outcome.reason
    # ... and the key was asked for once: no second wait.
    assert blackhole_dns.received() == [SeenQuery(f"sel._domainkey.{DOMAIN}", "TXT", False)]


@pytest.fixture(scope="module")
def good_message(keys: dict[str, PrivateKey]) -> tuple[bytes, str]:
    key = keys["rsa2048"]
    return sign(make_message(), key), key_record_text(key)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_good_signature_never_raises(
    good_message: tuple[bytes, str], data: st.DataObject
) -> None:
    signed, record = good_message
    end = signed.index(b"\r\n", signed.index(b"b="))  # inside the DKIM-Signature field
    position = data.draw(st.integers(min_value=len(b"DKIM-Signature:"), max_value=end - 1))
    byte = data.draw(st.integers(min_value=0, max_value=255))
    mutated = signed[:position] + bytes([byte]) + signed[position + 1 :]
    for outcome in verify_message(mutated, zone(key_txt("sel", record))):
        assert outcome.result in (
            DkimResult.PASS,  # e.g. a space changed into a tab in relaxed canonicalization
            DkimResult.FAIL,
            DkimResult.PERMERROR,
            DkimResult.TEMPERROR,  # d= or s= changed to a name outside the zone
        ), outcome


# -- the fake resolver answers as NSD does ---------------------------------------------------------


FAKE_ZONE_RECORDS: list[Record] = [
    ("sel._domainkey", "TXT", txt_rdata("v=DKIM1; p=" + "A" * 400)),
    ("two", "TXT", '"first"'),
    ("two", "TXT", '"second" "part"'),
    ("host", "A", "192.0.2.10"),
    ("alias", "CNAME", "host"),
    ("*.wild", "TXT", '"wildcard"'),
    ("deep.ent.below", "TXT", '"leaf"'),
]


def _answer(resolver: Resolver | ZoneResolver, name: str, rdtype: str) -> object:
    try:
        return sorted(r.to_text() for r in resolver.query(name, rdtype))
    except DNSNameNotFound:
        return "NXDOMAIN"


@pytest.mark.dns
def test_fake_resolver_agrees_with_nsd_on_the_same_zone_text(nsd_server: NsdFactory) -> None:
    text = make_zone(DOMAIN, FAKE_ZONE_RECORDS)
    real = Resolver([nsd_server({DOMAIN: text}).nameserver], timeout=2, cache_size=0)
    fake = ZoneResolver(text, DOMAIN)
    questions = [
        (f"sel._domainkey.{DOMAIN}", "TXT"),
        (f"two.{DOMAIN}", "TXT"),
        (f"host.{DOMAIN}", "TXT"),  # NODATA
        (f"alias.{DOMAIN}", "A"),  # CNAME followed
        (f"nope.{DOMAIN}", "TXT"),  # NXDOMAIN
        (f"x.wild.{DOMAIN}", "TXT"),  # wildcard
        (f"y.x.wild.{DOMAIN}", "TXT"),  # wildcard, two labels down
        (f"ent.below.{DOMAIN}", "TXT"),  # empty non-terminal: NODATA
        (f"below.{DOMAIN}", "TXT"),
        (f"_domainkey.{DOMAIN}", "TXT"),
        (DOMAIN, "NS"),
    ]
    for name, rdtype in questions:
        assert _answer(fake, name, rdtype) == _answer(real, name, rdtype), (name, rdtype)
    assert sorted(fake.txt(f"two.{DOMAIN}")) == sorted(real.txt(f"two.{DOMAIN}"))
    assert fake.queries == len(questions) + 1


def test_fake_resolver_markers_outside_zones_and_counting() -> None:
    text = make_zone(
        DOMAIN,
        [
            ("broken", "TXT", failure_marker("SERVFAIL")),
            ("slow", "TXT", failure_marker("TIMEOUT")),
            ("garbled", "TXT", failure_marker("MALFORMED")),
        ],
    )
    fake = ZoneResolver(text, DOMAIN)
    with pytest.raises(DNSTempError, match="SERVFAIL"):
        fake.txt(f"broken.{DOMAIN}")
    with pytest.raises(DNSTempError, match="timed out"):
        fake.query(f"slow.{DOMAIN}", "A")  # the marker fails every type at the name
    with pytest.raises(DNSPermError, match="malformed"):
        fake.txt(f"garbled.{DOMAIN}")
    with pytest.raises(DNSTempError, match="REFUSED"):
        fake.txt("sel._domainkey.elsewhere.example")
    with pytest.raises(ValueError, match="unknown DNS record type"):
        fake.query(DOMAIN, "NOPE")
    with pytest.raises(ValueError, match="unknown failure marker"):
        failure_marker("LATER")
    assert fake.queries == 4  # the unknown type was refused before asking
    assert fake.query_log[0] == (f"broken.{DOMAIN}", "TXT")
    assert fake.dkimpy_dnsfunc(f"nope.{DOMAIN}.".encode()) is None
