"""DKIM verification: dkimpy computes, this module decides (RFC 6376, RFC 8301, RFC 8463).

:func:`verify_message` returns one :class:`~authmilter.results.DkimOutcome` per
DKIM-Signature header field. The tag parsing, the key record checks and every decision about
the result are made here; dkimpy (:func:`_dkimpy_verify`, the only place that touches it for
verification) does the canonicalization, the hashes and the signature arithmetic. dkimpy
alone would let through what RFC 6376/8301 forbid and would blur failures together: it
accepts rsa-sha1, ignores the key's ``h=``, ``t=s`` and ``k=`` against ``a=`` (an Ed25519
key "verifies" an ``a=rsa-sha256`` signature), turns every key problem into a plain
``False``, and lets exceptions of the DNS function escape.

Result mapping, in the order the checks run (RFC 6376 §6.1.1 signature, §6.1.2 key, §6.1.3
computation):

=========================================================  ==========  ==================
what                                                       result      problem
=========================================================  ==========  ==================
tag-list syntax, duplicate tag, missing required tag,      permerror   bad-signature
``v`` not 1, unknown ``a``/``c``/``q``, bad base64,
``i`` not within ``d``, ``h`` without From, ``x`` ≤ ``t``
``x`` older than now − ``clock_drift``                     permerror   bad-signature
``t`` later than now + ``clock_drift``                     permerror   bad-signature
``l`` larger than the canonicalized body                   permerror   bad-signature
key lookup: NXDOMAIN or no TXT record                      permerror   key-not-found
key lookup: :class:`DNSTempError`                          temperror   dns-error
key lookup: :class:`DNSPermError` (malformed answer)       permerror   dns-error
several TXT records at the selector                        permerror   bad-signature
key record malformed, revoked (empty ``p``), ``h`` not     permerror   bad-signature
allowing the hash, ``k`` not the ``a`` key type, ``s`` not
allowing email, ``t=s`` with an ``i`` subdomain
body hash or signature mismatch                            fail        bad-signature
valid, but rsa-sha1 (RFC 8301 §3.1)                        policy      bad-signature
valid, but RSA key under 1024 bits or MinimumKeyBits       policy      bad-signature
valid                                                      pass        —
anything dkimpy raises that the checks above did not       permerror   bad-signature
foresee
=========================================================  ==========  ==================

Decisions where the RFCs leave room:

- **Key size floor.** RFC 8301 §3.2 forbids accepting RSA keys under 1024 bits; that floor
  always applies, and ``minimum_key_bits`` (OpenDKIM's ``MinimumKeyBits``) can only raise it.
  OpenDKIM documents "0 accepts all keys"; here 0 means "the RFC floor only".
- **Several TXT records at a selector** (RFC 6376 §3.6.2.2: "the results are undefined"):
  permerror, as libopendkim does (``DKIM_SIGERROR_MULTIREPLY``); dkimpy would take the first.
- **``l=`` larger than the body**: permerror. ``l=`` counts canonicalized body octets that were
  signed (RFC 6376 §3.5); a count beyond the body is a malformed signature for this message,
  as libopendkim's ``DKIM_SIGERROR_TOOLARGE_L``. A body longer than ``l=`` verifies; the
  unsigned tail is noted in ``reason`` (RFC 6376 §8.2).
- **``x=`` equal to ``t=``** is a permerror: RFC 6376 §3.5 says x= "MUST be greater than" t=.
- **max_signatures** is OpenDKIM's ``MaximumSignaturesToVerify``: signatures are taken from
  the top down and the ones past the limit are left out of the result. ``0`` does what
  OpenDKIM 2.11 does with 0 (``dkimf_prescreen``): no count limit, but only signatures whose
  ``d=`` is the author (From) domain are verified. The header size limit (``MaximumHeaders``)
  bounds how many those can be.

Known coupling: dkimpy's ``verify()`` re-checks ``t=``/``x=`` against the real clock with
10 hours of slack. With a ``clock_drift`` over 36000 s, or a ``now`` more than 10 hours from
the real clock, a signature this module accepts can meet that check; the outcome is then a
permerror quoting dkimpy.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from dataclasses import dataclass
from enum import Enum
from typing import Final, Protocol

import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy, Relaxed

from authmilter.addresses import FromStatus, author_domain
from authmilter.body_hash import BodyHashes
from authmilter.errors import DNSNameNotFound, DNSPermError, DNSTempError
from authmilter.keys import MIN_RSA_BITS, KeyAlgorithm, KeyRecord, KeyRecordError, parse_key_record
from authmilter.resolver import memoized
from authmilter.results import DkimOutcome, DkimProblem, DkimResult
from authmilter.taglist import TagListError, TagListProblem, parse_tag_list

__all__ = [
    "DEFAULT_MAX_SIGNATURES",
    "SIGNATURE_ALGORITHMS",
    "SignatureError",
    "TxtLookup",
    "check_key",
    "decode_base64_tag",
    "fetch_key",
    "key_bits",
    "parse_signature_tags",
    "verify_message",
]

#: OpenDKIM's MaximumSignaturesToVerify default.
DEFAULT_MAX_SIGNATURES: Final = 3
#: ``a=`` values understood, with the key type (``k=``) and hash each implies.
SIGNATURE_ALGORITHMS: Final[dict[str, tuple[KeyAlgorithm, str]]] = {
    "rsa-sha256": (KeyAlgorithm.RSA, "sha256"),  # RFC 6376 §3.3.2
    "rsa-sha1": (KeyAlgorithm.RSA, "sha1"),  # RFC 6376 §3.3.1, never acceptable: RFC 8301 §3.1
    "ed25519-sha256": (KeyAlgorithm.ED25519, "sha256"),  # RFC 8463 §3
}
_REQUIRED_TAGS: Final = ("v", "a", "b", "bh", "d", "h", "s")  # RFC 6376 §3.5, §6.1.1
FWS: Final = " \t\r\n"
_LABEL: Final = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
# Domain names and selectors: LDH labels, leniently allowing "_" (seen in the wild).
DNS_NAME: Final = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*")
FIELD_NAME: Final = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 §3.6.8 ftext
CANON: Final = re.compile(r"(simple|relaxed)(?:/(simple|relaxed))?")
TIMESTAMP: Final = re.compile(r"[0-9]{1,12}")  # RFC 6376 §3.5: 1*12DIGIT
LENGTH: Final = re.compile(r"[0-9]{1,76}")  # RFC 6376 §3.5: 1*76DIGIT
_WSP: Final = re.compile(r"[ \t\r\n]+")
_PRINTABLE: Final = re.compile(r"[^\x00-\x20\x7f]*")  # no controls (UTF-8 allowed: RFC 8616)
_EXCERPT: Final = 40


class TxtLookup(Protocol):
    """What verification needs of a resolver (:class:`authmilter.resolver.Resolver` has it).

    ``txt(name)`` returns one ``bytes`` per TXT record and raises
    :class:`~authmilter.errors.DNSNameNotFound` (NXDOMAIN),
    :class:`~authmilter.errors.DNSTempError` or :class:`~authmilter.errors.DNSPermError`.
    """

    def txt(self, name: str) -> list[bytes]: ...


def verify_message(
    message: bytes,
    resolver: TxtLookup,
    *,
    max_signatures: int = DEFAULT_MAX_SIGNATURES,
    minimum_key_bits: int = 1024,
    clock_drift: int = 300,
    now: float | None = None,
) -> list[DkimOutcome]:
    """Verify the DKIM-Signature header fields of ``message``, top down.

    ``message`` is the message as the MTA has it: header fields with their folding, CRLF line
    ends (bare LF is tolerated), a blank line, the body.

    :param max_signatures: verify at most this many signatures from the top (OpenDKIM's
        ``MaximumSignaturesToVerify``); the rest are left out of the result. ``0``: only the
        signatures whose ``d=`` is the From domain, with no count limit (OpenDKIM's meaning).
    :param minimum_key_bits: OpenDKIM's ``MinimumKeyBits``; RSA keys under
        ``max(1024, minimum_key_bits)`` bits give ``policy`` (RFC 8301 §3.2 floor).
    :param clock_drift: OpenDKIM's ``ClockDrift``, seconds of slack for ``t=``/``x=``.
    :param now: the verification time (Unix seconds); ``None`` reads the clock.
    :returns: one outcome per verified signature in header order, or a single
        ``DkimOutcome(result=NONE, …)`` when none is there (or, with ``max_signatures=0``,
        none from the author domain). Hostile input never raises: it gives permerror/fail.
    :raises ValueError: a negative ``max_signatures``, ``minimum_key_bits`` or ``clock_drift``.
    """
    for name, value in (
        ("max_signatures", max_signatures),
        ("minimum_key_bits", minimum_key_bits),
        ("clock_drift", clock_drift),
    ):
        if value < 0:
            raise ValueError(f"{name} must not be negative, not {value}")

    try:
        parsed, body = dkim.rfc822_parse(message)
        headers = [(bytes(name), bytes(value)) for name, value in parsed]
        parse_error = ""
    except Exception as exc:  # dkimpy's header parser fails on some malformed headers
        headers = _split_header_fields(message)
        body = b""
        parse_error = _exception_text(exc)
    bodies = BodyHashes()
    plan_body_hashes(headers, bodies, max_signatures=max_signatures)
    bodies.update(body)
    return verify_fields(headers, bodies, resolver, max_signatures=max_signatures,
                         minimum_key_bits=minimum_key_bits, clock_drift=clock_drift, now=now,
                         parse_error=parse_error)  # fmt: skip


def _chosen(headers: list[tuple[bytes, bytes]],
            max_signatures: int) -> list[tuple[int, bytes]] | None:  # fmt: skip
    """The (index, value) of the signatures to verify; None when there is none at all."""
    signatures = [value for name, value in headers if name.lower() == b"dkim-signature"]
    if not signatures:
        return None
    if max_signatures > 0:
        return list(enumerate(signatures))[:max_signatures]
    author = _author_domain(headers)
    return [(idx, value) for idx, value in enumerate(signatures)
            if author is not None and _peek_domain(value) == author]  # fmt: skip


def plan_body_hashes(headers: list[tuple[bytes, bytes]], bodies: BodyHashes, *,
                     max_signatures: int = DEFAULT_MAX_SIGNATURES) -> None:  # fmt: skip
    """Add to ``bodies`` the body hashes the signatures to verify will need.

    Called at the end of the header, so the body is hashed as it streams in; a signature too
    broken to say how its body is hashed needs none (it is a permerror anyway).
    """
    for _idx, value in _chosen(headers, max_signatures) or []:
        try:
            sig = _parse_signature(value, _Fields())
        except SignatureError:
            continue
        bodies.add(sig.body_canon, sig.hash_name, sig.length)
        bodies.add(sig.body_canon, sig.hash_name, None)  # the full length, for l= checks


def verify_fields(
    headers: list[tuple[bytes, bytes]],
    bodies: BodyHashes,
    resolver: TxtLookup,
    *,
    max_signatures: int = DEFAULT_MAX_SIGNATURES,
    minimum_key_bits: int = 1024,
    clock_drift: int = 300,
    now: float | None = None,
    parse_error: str = "",
) -> list[DkimOutcome]:
    """Verify the signatures of a message given as header fields plus streamed body hashes.

    ``headers`` are ``(name, value)`` pairs as on the wire (value after the colon, folding and
    final CRLF kept); ``bodies`` got :func:`plan_body_hashes` before the body was fed to it.
    Same results as :func:`verify_message`.
    """
    chosen = _chosen(headers, max_signatures)
    if chosen is None:
        return [DkimOutcome(result=DkimResult.NONE, reason="no signature")]
    if not chosen:
        return [
            DkimOutcome(
                result=DkimResult.NONE,
                reason="no signature from the author domain (MaximumSignaturesToVerify 0)",
            )
        ]
    context = _Context(
        headers=None if parse_error else headers,
        bodies=bodies,
        parse_error=parse_error,
        resolver=resolver,
        minimum_key_bits=max(MIN_RSA_BITS, minimum_key_bits),
        clock_drift=clock_drift,
        now=time.time() if now is None else now,
    )
    return [_verify_one(context, idx, value) for idx, value in chosen]


# --------------------------------------------------------------------------------------------
# One signature
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Context:
    """What every signature of one message is checked with."""

    headers: list[tuple[bytes, bytes]] | None  # None: the header did not parse
    bodies: BodyHashes
    parse_error: str
    resolver: TxtLookup
    minimum_key_bits: int
    clock_drift: int
    now: float

    def canonical_body_length(self, body_canon: str) -> int | None:
        """Octets of the body after ``body_canon`` canonicalization (RFC 6376 §3.4)."""
        if self.headers is None:
            return None
        return self.bodies.canonical_length(body_canon)


@dataclass(slots=True)
class _Fields:
    """The outcome fields learnt so far; only validated values are recorded."""

    domain: str | None = None
    selector: str | None = None
    identity: str | None = None
    algorithm: str | None = None
    b: str | None = None
    key_bits: int | None = None
    testing: bool = False

    def outcome(
        self, result: DkimResult, reason: str, problem: DkimProblem | None = None
    ) -> DkimOutcome:
        return DkimOutcome(
            result=result,
            domain=self.domain,
            selector=self.selector,
            identity=self.identity,
            algorithm=self.algorithm,
            b=self.b,
            key_bits=self.key_bits,
            testing=self.testing,
            reason=reason,
            problem=problem,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class _Signature:
    """A DKIM-Signature whose tags passed the RFC 6376 §6.1.1 checks."""

    algorithm: str
    key_type: KeyAlgorithm
    hash_name: str
    domain: str
    selector: str
    identity_domain: str
    header_canon: str
    body_canon: str
    body_hash: bytes
    signature: bytes
    include_headers: tuple[bytes, ...]
    length: int | None
    timestamp: int | None
    expiration: int | None


class SignatureError(Exception):
    """Stop checking one signature with this result.

    Leaves this module only through the helpers shared with :mod:`authmilter.arc_verify`
    (:func:`parse_signature_tags`, :func:`decode_base64_tag`, :func:`fetch_key`,
    :func:`key_bits`, :func:`check_key`).
    """

    def __init__(
        self,
        result: DkimResult,
        reason: str,
        problem: DkimProblem | None = DkimProblem.BAD_SIGNATURE,
    ) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason
        self.problem = problem


def _permerror(reason: str) -> SignatureError:
    return SignatureError(DkimResult.PERMERROR, reason)


def _missing(tag: str) -> SignatureError:
    # RFC 6376 §6.1.1: a missing required tag is PERMFAIL (signature missing required tag).
    return _permerror(f"missing required tag '{tag}' (RFC 6376 §6.1.1)")


def _verify_one(context: _Context, idx: int, raw_value: bytes) -> DkimOutcome:
    """Check the ``idx``-th DKIM-Signature (0 = topmost) whose value is ``raw_value``."""
    fields = _Fields()
    try:
        signature = _parse_signature(raw_value, fields)
        _check_times(signature, context)
        _check_length(signature, context)
        key = fetch_key(signature.selector, signature.domain, context.resolver)
        _check_key(signature, key, fields)
        return _compute(context, idx, signature, key, fields)
    except SignatureError as verdict:
        return fields.outcome(verdict.result, verdict.reason, verdict.problem)


def parse_signature_tags(text: str) -> dict[str, str]:
    """Split a tag-list (RFC 6376 §3.2) strictly: one trailing ``;`` at most, no duplicates.

    :raises SignatureError: permerror naming the problem (hostile text quoted short and ASCII).
    """
    try:
        return dict(parse_tag_list(text, strict_empty=True))
    except TagListError as exc:
        if exc.problem is TagListProblem.EMPTY:
            reason = "empty tag-spec"
        elif exc.problem is TagListProblem.NO_EQUALS:
            reason = f"tag-spec {_excerpt(exc.spec)} has no '='"
        elif exc.problem is TagListProblem.BAD_NAME:
            reason = f"invalid tag name {_excerpt(exc.name)}"
        else:
            reason = f"duplicate tag '{exc.name}'"
        raise _permerror(f"{reason} (RFC 6376 §3.2)") from None


def decode_base64_tag(tag: str, value: str) -> str:
    """Return the value without white space, after checking it is non-empty base64."""
    compact = _WSP.sub("", value)
    if not compact:
        raise _permerror(f"{tag}= is empty (RFC 6376 §3.5)")
    try:
        base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise _permerror(f"{tag}= is not valid base64 (RFC 6376 §3.5)") from None
    return compact


def _parse_signature(raw_value: bytes, fields: _Fields) -> _Signature:
    """Apply RFC 6376 §6.1.1 to one DKIM-Signature value; record valid fields in ``fields``.

    :raises SignatureError: permerror with the first problem found.
    """
    tags = parse_signature_tags(raw_value.decode("utf-8", "replace"))

    for tag in _REQUIRED_TAGS:
        if tag not in tags and tag != "bh":  # bh= after d, s, i, a, b: they go into the A-R
            raise _missing(tag)
    if tags["v"] != "1":
        # RFC 6376 §6.1.1: a v= other than 1 is PERMFAIL (incompatible version).
        raise _permerror(f"unsupported version v={_excerpt(tags['v'])} (RFC 6376 §6.1.1)")

    domain = tags["d"]
    if not DNS_NAME.fullmatch(domain):
        raise _permerror(f"d= {_excerpt(domain)} is not a domain name (RFC 6376 §3.5)")
    fields.domain = domain
    selector = tags["s"]
    if not DNS_NAME.fullmatch(selector) or len(f"{selector}._domainkey.{domain}") > 253:
        raise _permerror(f"s= {_excerpt(selector)} is not a valid selector (RFC 6376 §3.1)")
    fields.selector = selector

    # i= is DKIM-Quoted-Printable (RFC 6376 §2.11): white space in it is folding, not data.
    identity = _WSP.sub("", tags.get("i", f"@{domain}"))
    local, at, identity_domain = identity.rpartition("@")
    if not at or not DNS_NAME.fullmatch(identity_domain) or not _PRINTABLE.fullmatch(local):
        raise _permerror(f"i= {_excerpt(identity)} is not [local]@domain (RFC 6376 §3.5)")
    lower_i, lower_d = identity_domain.lower(), domain.lower()
    if lower_i != lower_d and not lower_i.endswith("." + lower_d):
        # RFC 6376 §6.1.1: d= must be the same as or a parent of the i= domain, else
        # PERMFAIL (domain mismatch).
        raise _permerror(f"i= domain {identity_domain} is not within d= (RFC 6376 §6.1.1)")
    fields.identity = identity

    algorithm = tags["a"]
    if algorithm not in SIGNATURE_ALGORITHMS:
        # RFC 6376 §3.5 / §6.1.1: an algorithm the verifier does not implement is PERMFAIL.
        raise _permerror(f"unknown algorithm a={_excerpt(algorithm)} (RFC 6376 §3.5)")
    fields.algorithm = algorithm
    key_type, hash_name = SIGNATURE_ALGORITHMS[algorithm]

    fields.b = decode_base64_tag("b", tags["b"])
    if "bh" not in tags:
        raise _missing("bh")
    body_hash = base64.b64decode(decode_base64_tag("bh", tags["bh"]))

    canon = CANON.fullmatch(tags.get("c", "simple/simple"))
    if canon is None:
        raise _permerror(f"unknown canonicalization c={_excerpt(tags['c'])} (RFC 6376 §3.5)")
    header_canon = canon.group(1)
    body_canon = canon.group(2) or "simple"  # RFC 6376 §3.5: "c=relaxed" is relaxed/simple

    names = [item.strip(FWS) for item in tags["h"].split(":")]
    for item in names:
        if not FIELD_NAME.fullmatch(item):
            raise _permerror(f"h= has an invalid field name {_excerpt(item)} (RFC 6376 §3.5)")
    if "from" not in (item.lower() for item in names):
        # RFC 6376 §5.4 (From MUST be signed) and §6.1.1: PERMFAIL (From field not signed).
        raise _permerror("From not signed (RFC 6376 §5.4)")

    if "q" in tags and tags["q"] != "dns/txt":
        # RFC 6376 §3.5: "dns/txt" is the only query method defined.
        raise _permerror(f"unsupported query method q={_excerpt(tags['q'])} (RFC 6376 §3.5)")

    length: int | None = None
    if "l" in tags:
        if not LENGTH.fullmatch(tags["l"]):
            raise _permerror(f"l= {_excerpt(tags['l'])} is not a byte count (RFC 6376 §3.5)")
        length = int(tags["l"])

    timestamp = _timestamp(tags, "t")
    expiration = _timestamp(tags, "x")
    if timestamp is not None and expiration is not None and expiration <= timestamp:
        # RFC 6376 §3.5: x= "MUST be greater than" t= when both are present.
        raise _permerror("x= is not later than t= (RFC 6376 §3.5)")

    return _Signature(
        algorithm=algorithm,
        key_type=key_type,
        hash_name=hash_name,
        domain=domain,
        selector=selector,
        identity_domain=identity_domain,
        header_canon=header_canon,
        body_canon=body_canon,
        body_hash=body_hash,
        signature=base64.b64decode(fields.b),
        include_headers=tuple(item.lower().encode("ascii") for item in names),
        length=length,
        timestamp=timestamp,
        expiration=expiration,
    )


def _timestamp(tags: dict[str, str], tag: str) -> int | None:
    if tag not in tags:
        return None
    if not TIMESTAMP.fullmatch(tags[tag]):
        raise _permerror(f"{tag}= {_excerpt(tags[tag])} is not a timestamp (RFC 6376 §3.5)")
    return int(tags[tag])


def _check_times(signature: _Signature, context: _Context) -> None:
    """x= and t= against the verification time, with ``clock_drift`` of slack."""
    now, drift = context.now, context.clock_drift
    if signature.expiration is not None and signature.expiration < now - drift:
        # RFC 6376 §3.5 x= / §6.1.1: verifiers may consider an expired signature invalid,
        # PERMFAIL (signature expired): permerror, as OpenDKIM reports it.
        raise _permerror("signature expired")
    if signature.timestamp is not None and signature.timestamp > now + drift:
        # RFC 6376 §3.5 t=: implementations may ignore signatures timestamped in the future;
        # permerror, as OpenDKIM reports it.
        raise _permerror("signature timestamp in the future")


def _check_length(signature: _Signature, context: _Context) -> None:
    """l= must not claim more than the canonicalized body holds."""
    if signature.length is None:
        return
    body_length = context.canonical_body_length(signature.body_canon)
    if body_length is not None and signature.length > body_length:
        # RFC 6376 §3.5: l= is the count of canonicalized body octets signed; a count past
        # the end of the body does not describe this message (libopendkim: TOOLARGE_L).
        raise _permerror(
            f"l={signature.length} exceeds the {body_length}-byte body (RFC 6376 §3.5)"
        )


def fetch_key(selector: str, domain: str, resolver: TxtLookup) -> KeyRecord:
    """Fetch and parse the key record at ``selector._domainkey.domain`` (RFC 6376 §6.1.2).

    Shared with :mod:`authmilter.arc_verify`: ARC keys are DKIM keys (RFC 8617 §4.1.3).

    :raises SignatureError: key not found, DNS failure, several records, malformed or
        revoked key; ``result``/``problem`` say which as DKIM reports it.
    """
    name = f"{selector}._domainkey.{domain}"
    # Parsed once while its DNS answer is fresh; a failure (raised) is never kept.
    return memoized(resolver, ("dkim-key", name), lambda: _fetch_key(name, resolver))


def _fetch_key(name: str, resolver: TxtLookup) -> KeyRecord:
    try:
        records = resolver.txt(name)
    except DNSNameNotFound:
        records = []
    except DNSTempError as exc:
        # RFC 6376 §6.1.2 step 2: the key query failed to respond: TEMPFAIL (key unavailable).
        raise SignatureError(
            DkimResult.TEMPERROR, f"key lookup failed: {_clean(str(exc))}", DkimProblem.DNS_ERROR
        ) from None
    except DNSPermError as exc:
        # A malformed DNS answer will not heal by retrying: permerror, but classed as a DNS
        # problem (libopendkim's KEYFAIL goes to On-DNSError as well).
        raise SignatureError(
            DkimResult.PERMERROR, f"key lookup failed: {_clean(str(exc))}", DkimProblem.DNS_ERROR
        ) from None
    if not records:
        # RFC 6376 §6.1.2 step 3: no key record: PERMFAIL (no key for signature).
        raise SignatureError(DkimResult.PERMERROR, "key not found", DkimProblem.KEY_NOT_FOUND)
    if len(records) > 1:
        # RFC 6376 §3.6.2.2: several TXT records at a selector give undefined results;
        # refuse them as libopendkim does ("multiple DNS replies").
        raise _permerror(f"{len(records)} key records at {name} (RFC 6376 §3.6.2.2)")
    try:
        key = parse_key_record(records[0])
    except KeyRecordError as exc:
        # RFC 6376 §6.1.2 step 5: a record not following §3.6.1: PERMFAIL (key syntax error).
        raise _permerror(f"malformed key record: {_clean(str(exc))}") from None
    if key.revoked:
        # RFC 6376 §3.6.1 p= / §6.1.2 step 6: an empty p= is a revoked key: PERMFAIL.
        raise _permerror("key revoked")
    return key


def _check_key(signature: _Signature, key: KeyRecord, fields: _Fields) -> None:
    """Apply RFC 6376 §6.1.2 / §3.6.1 to the key record; record key_bits and testing."""
    fields.testing = key.testing
    fields.key_bits = key_bits(key)
    check_key(key, signature.algorithm, signature.domain, signature.identity_domain)


def key_bits(key: KeyRecord) -> int:
    """The size of the record's public key: RSA modulus bits, 256 for Ed25519.

    :raises SignatureError: permerror, the key data does not load.
    """
    try:
        public = key.public_key()
    except KeyRecordError as exc:
        raise _permerror(f"malformed key record: {_clean(str(exc))}") from None
    return public.key_size if isinstance(public, rsa.RSAPublicKey) else 256


def check_key(key: KeyRecord, algorithm: str, domain: str, identity_domain: str) -> None:
    """Check the key record's ``h=``, ``k=``, ``s=`` and ``t=s`` against a signature with
    ``a=algorithm`` (one of :data:`SIGNATURE_ALGORITHMS`), ``d=domain`` and the ``i=`` domain.

    Shared with :mod:`authmilter.arc_verify` (which passes ``domain`` as the ``i=`` domain:
    ARC has no AUID).

    :raises SignatureError: permerror naming the first mismatch.
    """
    key_type, hash_name = SIGNATURE_ALGORITHMS[algorithm]
    if key.hash_algorithms is not None and hash_name not in (
        name.lower() for name in key.hash_algorithms
    ):
        # RFC 6376 §3.6.1 h= / §6.1.2 step 7: PERMFAIL (inappropriate hash algorithm).
        raise _permerror(
            f"key h={':'.join(key.hash_algorithms)} does not allow {hash_name} (RFC 6376 §3.6.1)"
        )
    if key.key_type is not key_type:
        # RFC 6376 §6.1.2 step 8 (RFC 8463 §4 for ed25519): key data not suitable for a=:
        # PERMFAIL (inappropriate key algorithm).
        raise _permerror(
            f"key k={key.key_type.value} does not match a={algorithm} (RFC 6376 §6.1.2)"
        )
    if not key.allows_email:
        # RFC 6376 §3.6.1 s=: a key restricted to other services does not sign email.
        raise _permerror(f"key s={':'.join(key.service_types)} excludes email (RFC 6376 §3.6.1)")
    if key.strict_subdomains and identity_domain.lower() != domain.lower():
        # RFC 6376 §3.6.1 t=s: "the "i=" domain MUST NOT be a subdomain of "d="".
        raise _permerror(f"key t=s forbids i= subdomain {identity_domain} (RFC 6376 §3.6.1)")


def _compute(
    context: _Context, idx: int, signature: _Signature, key: KeyRecord, fields: _Fields
) -> DkimOutcome:
    """Run the cryptography and turn its answer into the RFC result."""
    if context.headers is None:
        raise _permerror(f"message header not parseable: {context.parse_error}")
    try:
        crypto = _crypto_verify(context, idx, signature, key)
    except _CryptoError as exc:
        # Never raise for hostile input: whatever the libraries reject that the checks above
        # did not is a permerror for this one signature.
        raise _permerror(f"verifier error: {exc}") from None

    if crypto is _Crypto.BODY_MISMATCH:
        # RFC 6376 §6.1.3 step 4: PERMFAIL (body hash did not verify).
        raise SignatureError(DkimResult.FAIL, "body hash did not verify")
    if crypto is _Crypto.SIGNATURE_MISMATCH:
        # RFC 6376 §6.1.3 step 5: PERMFAIL (signature did not verify).
        raise SignatureError(DkimResult.FAIL, "signature verification failed")

    if signature.algorithm == "rsa-sha1":
        # RFC 8301 §3.1: rsa-sha1 MUST NOT be used for signing or verifying.
        raise SignatureError(DkimResult.POLICY, "rsa-sha1 not acceptable (RFC 8301)")
    if signature.key_type is KeyAlgorithm.RSA and fields.key_bits is not None:
        if fields.key_bits < MIN_RSA_BITS:
            # RFC 8301 §3.2: RSA keys under 1024 bits MUST NOT be considered valid.
            raise SignatureError(
                DkimResult.POLICY,
                f"{fields.key_bits}-bit key below the RFC 8301 minimum of {MIN_RSA_BITS}",
            )
        if fields.key_bits < context.minimum_key_bits:
            # OpenDKIM MinimumKeyBits: a local policy above the RFC 8301 floor.
            raise SignatureError(
                DkimResult.POLICY,
                f"{fields.key_bits}-bit key below MinimumKeyBits {context.minimum_key_bits}",
            )

    reason = "signature verified"
    body_length = context.canonical_body_length(signature.body_canon)
    if signature.length is not None and body_length is not None and signature.length < body_length:
        # RFC 6376 §3.5 l= / §8.2: the octets after l= are not covered by the signature.
        reason += f" (l= covers {signature.length} of {body_length} body bytes)"
    return fields.outcome(DkimResult.PASS, reason)


# --------------------------------------------------------------------------------------------
# The cryptography: dkimpy canonicalizes and selects the header fields, OpenSSL checks
# --------------------------------------------------------------------------------------------


class _Crypto(Enum):
    VERIFIED = "verified"
    BODY_MISMATCH = "body hash mismatch"
    SIGNATURE_MISMATCH = "signature mismatch"


class _CryptoError(Exception):
    """A library raised something the checks before it did not foresee."""


_PREHASHED = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...


def hash_signed_fields(hasher: _Hasher, policy: CanonicalizationPolicy,
                       headers: list[tuple[bytes, bytes]], include: list[bytes],
                       sig_header: tuple[bytes, bytes]) -> None:  # fmt: skip
    """Feed ``hasher`` what ``dkim.hash_headers(hasher, policy,
    policy.canonicalize_headers(headers), include, sig_header, None)`` feeds it, byte for
    byte, canonicalizing only the fields ``include`` selects rather than every field of the
    message (dkimpy's own order): dkimpy's selection, its ``b=`` removal and its
    canonicalizations, on fewer fields. Shared with :mod:`authmilter.arc_verify`."""
    # Selection looks at the canonical names: relaxed lowercases them and strips trailing
    # white space, simple leaves them as they are (dkim.canonicalization).
    relaxed = policy.header_algorithm is Relaxed
    keyed = [(name.lower().rstrip() if relaxed else name, i)
             for i, (name, _value) in enumerate(headers)]  # fmt: skip
    picked = [headers[i] for _name, i in dkim.select_headers(keyed, include)]
    for name, value in policy.canonicalize_headers(picked):
        hasher.update(name)
        hasher.update(b":")
        hasher.update(value)
    unsigned = (sig_header[0], dkim.RE_BTAG.sub(b"\\1", sig_header[1]))
    for name, value in policy.canonicalize_headers([unsigned]):
        # The signature field is hashed without its final CRLF (RFC 6376 §3.7).
        hasher.update(name)
        hasher.update(b":")
        hasher.update(value.rstrip())


def _crypto_verify(context: _Context, idx: int, signature: _Signature,
                   key: KeyRecord) -> _Crypto:  # fmt: skip
    """RFC 6376 §3.7: compare the streamed body hash, hash the signed header fields with
    dkimpy's canonicalization and selection, and check the signature with OpenSSL.

    :raises _CryptoError: an unexpected failure (reported as permerror by the caller).
    """
    assert context.headers is not None
    body = context.bodies.get(signature.body_canon, signature.hash_name, signature.length)
    if body is None:
        raise _CryptoError("the body hash for this signature was not planned")
    if body.digest() != signature.body_hash:
        return _Crypto.BODY_MISMATCH
    try:
        sig_header = [(n, v) for n, v in context.headers if n.lower() == b"dkim-signature"][idx]
        policy = CanonicalizationPolicy.from_c_value(
            f"{signature.header_canon}/{signature.body_canon}".encode())
        include = list(signature.include_headers)
        if b"from" in include:
            # As dkimpy (its bug #644046): one more From than signed is selected, so a From
            # field added after signing makes the signature fail.
            include.append(b"from")
        hasher = hashlib.new(signature.hash_name)
        hash_signed_fields(hasher, policy, context.headers, include, sig_header)
        digest = hasher.digest()
        public = key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            prehashed = Prehashed(_PREHASHED[signature.hash_name]())
            public.verify(signature.signature, digest, padding.PKCS1v15(), prehashed)
        elif isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature.signature, digest)  # RFC 8463 §3: over the SHA-256 hash
        else:
            raise _CryptoError(f"unsupported public key type {type(public).__name__}")
    except InvalidSignature:
        return _Crypto.SIGNATURE_MISMATCH
    except _CryptoError:
        raise
    except Exception as exc:  # hostile input must not escape; see verify_message
        raise _CryptoError(_exception_text(exc)) from None
    return _Crypto.VERIFIED


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _excerpt(text: str) -> str:
    """A short, ASCII-only quotation of hostile text for a reason string."""
    if len(text) > _EXCERPT:
        text = text[:_EXCERPT] + "..."
    return ascii(text)


def _clean(text: str, limit: int = 200) -> str:
    """Text from elsewhere (an exception, a DNS answer) made short, ASCII and one line."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return ascii(text)[1:-1]


def _exception_text(exc: BaseException) -> str:
    return _clean(f"{type(exc).__name__}: {exc}")


def _split_header_fields(message: bytes) -> list[tuple[bytes, bytes]]:
    """A tolerant header split, used only when dkimpy's parser refuses the message."""
    fields: list[tuple[bytes, bytes]] = []
    for line in re.split(rb"\r?\n", message):
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if fields:
                name, value = fields[-1]
                fields[-1] = (name, value + line + b"\r\n")
            continue
        name, colon, value = line.partition(b":")
        if colon:
            fields.append((name.strip(), value + b"\r\n"))
    return fields


def _author_domain(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The domain of the single From address (RFC 5322 §3.6.2), lower case, or ``None``.

    DMARC's strict parser: the same author domain DMARC evaluates, and no recursion on
    hostile nesting (``getaddresses`` recurses once per nested comment: RecursionError).
    """
    values = [re.sub(r"\r?\n", "\r\n", value.decode("utf-8", "surrogateescape"))
              for name, value in headers if name.lower() == b"from"]  # fmt: skip
    author = author_domain([value.removesuffix("\r\n") for value in values])
    return author.domain if author.status is FromStatus.OK else None


def _peek_domain(raw_value: bytes) -> str | None:
    """The d= of a signature, lower case, or ``None`` when its tag-list does not parse."""
    try:
        domain = parse_signature_tags(raw_value.decode("utf-8", "replace")).get("d")
    except SignatureError:
        return None
    return domain.lower() if domain else None
