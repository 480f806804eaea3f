"""ARC chain validation (RFC 8617 §5.2): chains sealed with dkimpy, keys served from zone text.

Each hop adds an Authentication-Results field of its own (``arc=pass`` from the second hop
on) and lets :func:`dkim.arc_sign` add the ARC Set, as a real intermediary would. Keys are
published with :func:`dnsserver.make_zone` and read through :class:`fakedns.ZoneResolver`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import dkim
import pytest

from authmilter.arc_verify import ArcOutcome, ArcSet, plan_body_hashes, verify_chain
from authmilter.body_hash import BodyHashes
from authmilter.keys import PrivateKey, generate_private_key, key_record_text, parse_private_key
from dnsserver import Record, make_zone, txt_rdata
from fakedns import ZoneResolver, failure_marker
from helpers import make_message

DATA = Path(__file__).parent / "data" / "dkim"
ORIGIN = "arc.test"
Hop = tuple[str, PrivateKey]  # (sealer domain below ORIGIN, key); the selector is "sel"


@pytest.fixture(scope="module")
def keys() -> dict[str, PrivateKey]:
    return {
        "rsa2048": generate_private_key("rsa", 2048),
        "rsa3072": generate_private_key("rsa", 3072),
        "rsa4096": generate_private_key("rsa", 4096),
        "rsa1024": generate_private_key("rsa", 1024),
        # cryptography no longer generates keys under 1024 bits: made with `openssl genrsa 768`.
        "rsa768": parse_private_key((DATA / "rsa768.pem").read_bytes(), source="rsa768.pem"),
    }


def resolver(hops: Sequence[Hop], *extra: Record) -> ZoneResolver:
    """A zone publishing each hop's key at ``sel._domainkey.<domain>``."""
    records: list[Record] = []
    for domain, key in hops:
        owner = f"sel._domainkey.{domain.removesuffix('.' + ORIGIN)}"
        record = (owner, "TXT", txt_rdata(key_record_text(key)))
        if record not in records:
            records.append(record)
    return ZoneResolver(make_zone(ORIGIN, [*records, *extra]), ORIGIN)


def seal(message: bytes, domain: str, key: PrivateKey, instance: int, *,
         remote_ip: str | None = "127.0.0.1") -> bytes:  # fmt: skip
    """One intermediary: its Authentication-Results, then the ARC Set dkimpy adds."""
    srv_id = f"mx{instance}.{domain}"
    ip = f" smtp.remote-ip={remote_ip}" if remote_ip else ""
    arc = "; arc=pass" if instance > 1 else ""
    ar = f"Authentication-Results: {srv_id}; spf=pass smtp.mailfrom={domain}{ip}{arc}\r\n"
    message = ar.encode() + message
    fields = dkim.arc_sign(message, b"sel", domain.encode(), key.dkimpy_private(),
                           srv_id.encode())  # fmt: skip
    assert len(fields) == 3, fields
    return b"".join(fields) + message


def chain(hops: Sequence[Hop], message: bytes | None = None,
          between: Callable[[int, bytes], bytes] | None = None) -> bytes:  # fmt: skip
    """Seal ``message`` once per hop; ``between(i, msg)`` may change it before hop ``i``."""
    message = make_message() if message is None else message
    for instance, (domain, key) in enumerate(hops, start=1):
        if between is not None:
            message = between(instance, message)
        message = seal(message, domain, key, instance, remote_ip=f"127.0.0.{instance}")
    return message


def split(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    headers, body = dkim.rfc822_parse(message)
    return [(bytes(name), bytes(value)) for name, value in headers], bytes(body)


def verify(message: bytes, dns: ZoneResolver, **kw: int) -> ArcOutcome:
    """Verify as the milter will: body hashes planned at end of header, body in chunks."""
    headers, body = split(message)
    bodies = BodyHashes()
    plan_body_hashes(headers, bodies)
    for start in range(0, len(body), 7):
        bodies.update(body[start : start + 7])
    return verify_chain(headers, bodies, dns, now=2_000_000_000.0, **kw)


def edit_field(message: bytes, name: str, instance: int,
               change: Callable[[bytes], bytes]) -> bytes:  # fmt: skip
    """Apply ``change`` to the whole ``name`` field (name, colon, value) of ``instance``."""
    head, sep, body = message.partition(b"\r\n\r\n")
    fields = re.split(rb"\r\n(?![ \t])", head)
    hits = [n for n, f in enumerate(fields)
            if f.lower().startswith(name.lower().encode() + b":")
            and re.search(rb"(?:^|[;:\s])i=%d;" % instance, f)]  # fmt: skip
    assert len(hits) == 1, (name, instance, hits)
    fields[hits[0]] = change(fields[hits[0]])
    return b"\r\n".join(f for f in fields if f) + sep + body


def drop_field(message: bytes, name: str, instance: int) -> bytes:
    return edit_field(message, name, instance, lambda _field: b"")


def sub(pattern: bytes, repl: bytes) -> Callable[[bytes], bytes]:
    def change(field: bytes) -> bytes:
        new, count = re.subn(pattern, repl, field, count=1)
        assert count == 1, (pattern, field)
        return new

    return change


def assert_fail(outcome: ArcOutcome, reason_part: str) -> None:
    assert outcome.result == "fail", outcome
    assert reason_part in outcome.reason, outcome
    assert outcome.oldest_pass is None and not outcome.passed


# -- none and pass -----------------------------------------------------------------------------


def test_no_arc_fields_is_none() -> None:
    outcome = verify(make_message(), resolver([]))
    assert outcome == ArcOutcome(result="none", reason="no ARC header fields")


@pytest.mark.parametrize("key_name", ["rsa2048", "rsa3072", "rsa4096"])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_chain_passes(keys: dict[str, PrivateKey], key_name: str, count: int) -> None:
    hops = [(f"hop{n}.{ORIGIN}", keys[key_name]) for n in range(1, count + 1)]
    message = chain(hops)
    dns = resolver(hops)
    outcome = verify(message, dns)
    assert outcome.result == "pass", outcome
    assert (outcome.instances, outcome.oldest_pass) == (count, 0)
    assert outcome.sets == tuple(
        ArcSet(n, f"hop{n}.{ORIGIN}", "sel", f"127.0.0.{n}") for n in range(1, count + 1)
    )
    # dkimpy's own verifier agrees with the chain the tests built.
    assert dkim.arc_verify(message, dnsfunc=dns.dkimpy_dnsfunc)[0] == b"pass"


def test_raw_body_bytes_give_the_same_outcome(keys: dict[str, PrivateKey]) -> None:
    hops = [(f"hop1.{ORIGIN}", keys["rsa2048"]), (f"hop2.{ORIGIN}", keys["rsa3072"])]
    message = chain(hops)
    headers, body = split(message)
    dns = resolver(hops)
    assert verify_chain(headers, body, dns, now=2e9) == verify(message, dns)
    assert verify(message, dns).passed


def test_aar_without_remote_ip(keys: dict[str, PrivateKey]) -> None:
    hop = (f"hop1.{ORIGIN}", keys["rsa2048"])
    message = seal(make_message(), *hop, 1, remote_ip=None)
    outcome = verify(message, resolver([hop]))
    assert outcome.passed, outcome
    assert outcome.sets == (ArcSet(1, f"hop1.{ORIGIN}", "sel", None),)


def test_header_changed_only_under_an_older_ams_lowers_oldest_pass(
    keys: dict[str, PrivateKey],
) -> None:
    """A mailing list at hop 2 rewrites Subject: AMS 1 breaks, AMS 2 and every AS hold."""
    hops = [(f"hop{n}.{ORIGIN}", keys["rsa2048"]) for n in (1, 2, 3)]

    def list_tag(instance: int, message: bytes) -> bytes:
        return message.replace(b"Subject: ", b"Subject: [list] ") if instance == 2 else message

    outcome = verify(chain(hops, between=list_tag), resolver(hops))
    assert outcome.result == "pass", outcome
    assert (outcome.instances, outcome.oldest_pass) == (3, 2)


# -- cryptographic failures --------------------------------------------------------------------


def test_body_changed_after_the_last_seal_fails(keys: dict[str, PrivateKey]) -> None:
    hops = [(f"hop{n}.{ORIGIN}", keys["rsa2048"]) for n in (1, 2)]
    message = chain(hops) + b"Unsubscribe here.\r\n"
    assert_fail(verify(message, resolver(hops)), "AMS i=2: body hash did not verify")


def test_header_changed_after_the_last_seal_fails(keys: dict[str, PrivateKey]) -> None:
    hops = [(f"hop{n}.{ORIGIN}", keys["rsa2048"]) for n in (1, 2)]
    message = chain(hops).replace(b"Subject: ", b"Subject: [ext] ")
    assert_fail(verify(message, resolver(hops)), "AMS i=2: signature verification failed")


def test_tampered_older_aar_breaks_the_seals(keys: dict[str, PrivateKey]) -> None:
    hops = [(f"hop{n}.{ORIGIN}", keys["rsa2048"]) for n in (1, 2)]
    message = edit_field(chain(hops), "ARC-Authentication-Results", 1,
                         sub(rb"spf=pass", b"spf=fail"))  # fmt: skip
    assert_fail(verify(message, resolver(hops)), "AS i=2: seal did not verify")


def test_tampered_seal_signature_fails(keys: dict[str, PrivateKey]) -> None:
    hop = (f"hop1.{ORIGIN}", keys["rsa2048"])

    def flip(field: bytes) -> bytes:  # one base64 digit of b= changed: still valid base64
        at = field.index(b" b=") + 3
        return field[:at] + (b"B" if field[at : at + 1] == b"A" else b"A") + field[at + 1 :]

    message = edit_field(seal(make_message(), *hop, 1), "ARC-Seal", 1, flip)
    assert_fail(verify(message, resolver([hop])), "AS i=1: seal did not verify")


def test_set_made_with_an_unpublished_key_fails(keys: dict[str, PrivateKey]) -> None:
    """The set names hop1's d= but was made with a key hop1 does not publish."""
    message = seal(make_message(), f"hop1.{ORIGIN}", keys["rsa3072"], 1)
    dns = resolver([(f"hop1.{ORIGIN}", keys["rsa2048"])])
    assert_fail(verify(message, dns), "AMS i=1: signature verification failed")


def test_seal_refolded_with_tabs_still_passes(keys: dict[str, PrivateKey]) -> None:
    """The AS is hashed relaxed: folding with tabs instead of spaces changes nothing."""
    hop = (f"hop1.{ORIGIN}", keys["rsa2048"])
    message = edit_field(seal(make_message(), *hop, 1), "ARC-Seal", 1,
                         sub(rb"; a=rsa-sha256; ", b";\r\n\ta=rsa-sha256;\t"))  # fmt: skip
    assert verify(message, resolver([hop])).passed


def test_seal_with_spaces_removed_fails(keys: dict[str, PrivateKey]) -> None:
    hop = (f"hop1.{ORIGIN}", keys["rsa2048"])
    message = edit_field(seal(make_message(), *hop, 1), "ARC-Seal", 1,
                         sub(rb"; a=rsa-sha256; ", b";a=rsa-sha256;"))  # fmt: skip
    assert_fail(verify(message, resolver([hop])), "AS i=1: seal did not verify")


# -- keys and DNS ------------------------------------------------------------------------------


def test_key_under_minimum_key_bits_fails(keys: dict[str, PrivateKey]) -> None:
    hop = (f"hop1.{ORIGIN}", keys["rsa1024"])
    message = seal(make_message(), *hop, 1)
    assert verify(message, resolver([hop])).passed
    assert_fail(verify(message, resolver([hop]), minimum_key_bits=2048),
                "1024-bit key below MinimumKeyBits 2048")  # fmt: skip


def test_key_under_rfc8301_floor_fails_even_with_minimum_zero(
    keys: dict[str, PrivateKey],
) -> None:
    hop = (f"hop1.{ORIGIN}", keys["rsa768"])
    message = seal(make_message(), *hop, 1)
    assert_fail(verify(message, resolver([hop]), minimum_key_bits=0),
                "768-bit key below the RFC 8301 minimum of 1024")  # fmt: skip


@pytest.mark.parametrize(
    ("marker", "detail"),
    [("SERVFAIL", "SERVFAIL"), ("TIMEOUT", "timed out"), ("MALFORMED", "malformed answer")],
)
def test_dns_error_on_a_key_fails_naming_the_dns_error(
    keys: dict[str, PrivateKey], marker: str, detail: str
) -> None:
    """arc= has no temperror (RFC 8617 §5.2): a failed key lookup fails the chain."""
    message = seal(make_message(), f"hop1.{ORIGIN}", keys["rsa2048"], 1)
    dns = resolver([], ("sel._domainkey.hop1", "TXT", failure_marker(marker)))
    expected = f"AMS i=1: key lookup failed: sel._domainkey.hop1.{ORIGIN} TXT: {detail}"
    assert_fail(verify(message, dns), expected)


def test_missing_key_fails(keys: dict[str, PrivateKey]) -> None:
    message = seal(make_message(), f"hop1.{ORIGIN}", keys["rsa2048"], 1)
    assert_fail(verify(message, resolver([])), "AMS i=1: key not found")


def test_revoked_key_fails(keys: dict[str, PrivateKey]) -> None:
    message = seal(make_message(), f"hop1.{ORIGIN}", keys["rsa2048"], 1)
    dns = resolver([], ("sel._domainkey.hop1", "TXT", txt_rdata("v=DKIM1; k=rsa; p=")))
    assert_fail(verify(message, dns), "AMS i=1: key revoked")


def test_unexpected_resolver_exception_is_a_fail() -> None:
    class Broken:
        def txt(self, name: str) -> list[bytes]:
            raise RuntimeError(f"resolver bug for {name}")

    message = seal(make_message(), f"hop1.{ORIGIN}", generate_private_key("rsa", 2048), 1)
    headers, body = split(message)
    outcome = verify_chain(headers, body, Broken(), now=2e9)
    assert_fail(outcome, "verifier error: RuntimeError: resolver bug for sel._domainkey.hop1")


def test_negative_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        verify_chain([], b"", resolver([]), minimum_key_bits=-1)


# -- hostile structure -------------------------------------------------------------------------

AS1, AMS1, AAR1 = ("ARC-Seal", 1), ("ARC-Message-Signature", 1), ("ARC-Authentication-Results", 1)
AS2, AMS2 = ("ARC-Seal", 2), ("ARC-Message-Signature", 2)
Mutation = Callable[[bytes], bytes]


def on(where: tuple[str, int], change: Mutation) -> Mutation:
    return lambda message: edit_field(message, where[0], where[1], change)


def prepend(field: bytes) -> Mutation:
    return lambda message: field + b"\r\n" + message


HOSTILE: dict[str, tuple[Mutation, str]] = {
    "seal-x": (prepend(b"ARC-Seal: x"), "AS: tag-spec 'x' has no '='"),
    "seal-empty": (prepend(b"ARC-Seal:"), "AS has no i= tag"),
    "seal-i-0": (on(AS2, sub(rb"i=2;", b"i=0;")), "AS i='0' is not an instance 1..50"),
    "seal-i-51": (on(AS2, sub(rb"i=2;", b"i=51;")), "AS i='51' is not an instance 1..50"),
    "seal-i-abc": (on(AS2, sub(rb"i=2;", b"i=abc;")), "AS i='abc' is not an instance"),
    "seal-i-huge": (on(AS2, sub(rb"i=2;", b"i=" + b"9" * 400 + b";")), "is not an instance"),
    "seal-i-negative": (on(AS2, sub(rb"i=2;", b"i=-2;")), "AS i='-2' is not an instance"),
    "seal-duplicate-tag": (on(AS2, sub(rb"cv=pass;", b"cv=pass; cv=pass;")),
                           "AS: duplicate tag 'cv'"),
    "aar-i-999": (on(AAR1, sub(rb"i=1;", b"i=999;")), "AAR i='999' is not an instance"),
    "aar-no-instance": (prepend(b"ARC-Authentication-Results: mx.arc.test; spf=pass"),
                        "AAR does not start with i=<instance>;"),
    "ams-garbage-bytes": (prepend(b"ARC-Message-Signature: i=1; \xff\xfe=\x00"),
                          "AMS: invalid tag name"),
    "duplicate-ams": (lambda m: edit_field(m, "ARC-Message-Signature", 2, lambda f: f + b"\r\n"
                                           + f), "2 AMS for i=2"),
    "duplicate-seal-of-older-set": (
        lambda m: edit_field(m, "ARC-Seal", 1, lambda f: f + b"\r\n" + f), "2 AS for i=1"),
    "missing-aar": (lambda m: drop_field(m, "ARC-Authentication-Results", 1), "0 AAR for i=1"),
    "missing-ams": (lambda m: drop_field(m, "ARC-Message-Signature", 1), "0 AMS for i=1"),
    "gap": (lambda m: drop_field(drop_field(drop_field(m, "ARC-Seal", 1),
                                            "ARC-Message-Signature", 1),
                                 "ARC-Authentication-Results", 1), "ARC set i=1 missing"),
    "newest-cv-fail": (on(AS2, sub(rb"cv=pass", b"cv=fail")), "ARC-Seal i=2 has cv=fail"),
    "first-cv-pass": (on(AS1, sub(rb"cv=none", b"cv=pass")), "AS i=1 has cv=pass, must be none"),
    "later-cv-none": (on(AS2, sub(rb"cv=pass", b"cv=none")), "AS i=2 has cv=none, must be pass"),
    "unknown-cv": (on(AS2, sub(rb"cv=pass", b"cv=maybe")), "AS i=2 cv='maybe' unknown"),
    "seal-sha1": (on(AS2, sub(rb"a=rsa-sha256", b"a=rsa-sha1")),
                  "AS i=2 a='rsa-sha1' not acceptable"),
    "ams-sha1": (on(AMS2, sub(rb"a=rsa-sha256", b"a=rsa-sha1")),
                 "AMS i=2 a='rsa-sha1' not acceptable"),
    "seal-with-h": (on(AS2, sub(rb"cv=pass;", b"cv=pass; h=from;")), "AS i=2 has an h= tag"),
    "seal-without-d": (on(AS2, sub(rb"d=hop2\.arc\.test;", b"")),
                       "AS i=2 missing required tag 'd'"),
    "seal-bad-domain": (on(AS2, sub(rb"d=hop2\.arc\.test;", b"d=-bad-.test;")),
                        "AS i=2 d= '-bad-.test' is not a domain name"),
    "seal-long-b": (on(AS2, sub(rb"b=[^;]*", b"b=" + b"QUFB" * 25_000)),
                    "AS i=2: seal did not verify"),
    "seal-bad-base64": (on(AS2, sub(rb"b=[^;]*", b"b=!!notbase64")),
                        "AS i=2: b= is not valid base64"),
    "ams-signs-arc-seal": (on(AMS2, sub(rb"h=from", b"h=arc-seal : from")),
                           "AMS i=2 h= includes ARC-Seal"),
    "ams-without-from": (on(AMS2, sub(rb"h=[^;]*;", b"h=to : subject;")),
                         "AMS i=2 does not sign From"),
    "ams-without-bh": (on(AMS2, sub(rb" bh=[^;]*;", b"")), "AMS i=2 missing required tag 'bh'"),
    "ams-bad-canon": (on(AMS2, sub(rb"c=relaxed/relaxed", b"c=loose")),
                      "AMS i=2 c='loose' unknown"),
    "ams-l-too-large": (on(AMS2, sub(rb"c=relaxed/relaxed;", b"c=relaxed/relaxed; l=99999;")),
                        "AMS i=2: l=99999 exceeds the body"),
    "ams-expired": (on(AMS2, sub(rb"c=relaxed/relaxed;", b"c=relaxed/relaxed; x=1000;")),
                    "AMS i=2: signature expired"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_chain_fails_with_a_reason(keys: dict[str, PrivateKey], name: str) -> None:
    hops = [(f"hop{n}.{ORIGIN}", keys["rsa2048"]) for n in (1, 2)]
    mutate, reason = HOSTILE[name]
    message = mutate(chain(hops))
    outcome = verify(message, resolver(hops))
    assert_fail(outcome, reason)
    assert outcome.sets == ()


def test_a_fifty_first_set_fails(keys: dict[str, PrivateKey]) -> None:
    hop = (f"hop1.{ORIGIN}", keys["rsa2048"])
    message = seal(make_message(), *hop, 1)
    for instance in range(2, 52):
        message = b"ARC-Seal: i=%d; cv=pass; a=rsa-sha256; d=x.test; s=s; b=AAAA\r\n" % (
            instance) + message  # fmt: skip
    assert_fail(verify(message, resolver([hop])), "i='51' is not an instance 1..50")


def test_fifty_instances_are_read(
    keys: dict[str, PrivateKey],
) -> None:
    """Fifty instances are read (none is refused for its number); the structure check then
    finds the AMS and AAR missing from instance 2 on."""
    hop = (f"hop1.{ORIGIN}", keys["rsa2048"])
    message = seal(make_message(), *hop, 1)
    for instance in range(2, 51):
        message = b"ARC-Seal: i=%d; cv=pass; a=rsa-sha256; d=x.test; s=s; b=AAAA\r\n" % (
            instance) + message  # fmt: skip
    outcome = verify(message, resolver([hop]))
    assert_fail(outcome, "0 AAR for i=2")
    assert outcome.instances == 50
