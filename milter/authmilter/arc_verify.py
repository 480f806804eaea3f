"""ARC chain validation (RFC 8617 §5.2): dkimpy canonicalizes, this module decides.

:func:`verify_chain` turns the ARC Sets on a message into one :class:`ArcOutcome`: ``none``
(no ARC header fields), ``pass`` or ``fail``, with a short reason, the instance count, the
``oldest-pass`` value (RFC 8617 §5.2 step 5, ``header.oldest-pass`` of RFC 8617 §10.2) and,
per instance, the sealer's ``d=``/``s=`` and the AAR's ``smtp.remote-ip`` — what the
Authentication-Results ``arc=`` clause and its comment need. It is not wired into the milter
yet.

The body is never kept: like :func:`authmilter.dkim_verify.verify_fields`, the caller gives
the header fields at the end of the header and a :class:`~authmilter.body_hash.BodyHashes`
that :func:`plan_body_hashes` prepared before the body streamed through it. Raw body bytes
are accepted too (tests, tools); they are hashed here the same way.

The ARC signatures are DKIM signatures (RFC 8617 §4.1.2, §4.1.3), so the tag-list parser,
the key lookup and the key record checks are :mod:`authmilter.dkim_verify`'s. dkimpy's ARC
verifier is not used: it looks keys up itself, accepts rsa-sha1 and picks the sealed header
fields by name from the bottom of the header, not by instance. Here dkimpy only supplies the
header canonicalization and selection (:func:`dkim.hash_headers`); OpenSSL (``cryptography``)
checks the RSA signatures.

The algorithm, in RFC 8617 §5.2 order; every "fail" stops it:

1. No ARC-Seal, ARC-Message-Signature or ARC-Authentication-Results field: ``none``.
   An ARC field whose instance cannot be read (``i=`` missing, not ``1``..``50``, a broken
   tag-list) fails the chain, which also bounds the chain at 50 sets.
2. The newest ARC-Seal says ``cv=fail``: fail.
3. Structure: instances 1..N without gaps, exactly one AS, AMS and AAR each; ``cv=none``
   at instance 1, ``cv=pass`` above.
4. The newest AMS must validate (body hash, header signature, key).
5. oldest-pass: the AMS from N-1 down to 1 are checked; the first that does not validate
   sets oldest-pass to its instance + 1; 0 when all validate (RFC 8617 §5.2 step 5).
6. Every AS from N down to 1 must validate.
7. pass.

Decisions where the RFCs leave room:

- **DNS errors are fail.** ``arc=`` has no temperror (RFC 8617 §5.2 and §10.1 know only
  none/pass/fail), so a key lookup that fails temporarily makes the chain fail; the reason
  names the DNS error so the log tells it from a broken signature.
- **Algorithms**: ``rsa-sha256`` only. rsa-sha1 is forbidden by RFC 8301 §3.1; RFC 8617
  defines no other algorithm for ARC.
- **Key size**: RSA keys under 1024 bits (RFC 8301 §3.2) or under ``minimum_key_bits``
  fail the signature they verify.
- **AMS tags** follow DKIM (RFC 6376 §3.5) except as RFC 8617 §4.1.2 says: ``i=`` is the
  instance, ``v=`` is ignored if present; the absent-``c=`` default is DKIM's
  ``simple/simple``; ``h=`` must name From (RFC 6376 §5.4) and must not name ARC-Seal.
  An AMS ``x=`` older than now − ``clock_drift`` does not validate.
- **AS tags**: ``i``, ``cv``, ``a``, ``b``, ``d``, ``s`` required, ``h=`` forbidden
  (RFC 8617 §4.1.3); the AS is always hashed with relaxed header canonicalization.
- **Anything a library raises** on hostile input makes the chain fail with the exception in
  the reason; :func:`verify_chain` never raises for message content.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import time
from dataclasses import dataclass
from typing import Any, Final, Literal

import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy

from authmilter.body_hash import BodyHashes
from authmilter.dkim_verify import (  # the DKIM tag grammar (RFC 6376 §3.5) is shared
    CANON,
    DNS_NAME,
    FIELD_NAME,
    FWS,
    LENGTH,
    TIMESTAMP,
    SignatureError,
    TxtLookup,
    check_key,
    decode_base64_tag,
    fetch_key,
    hash_signed_fields,
    key_bits,
    parse_signature_tags,
)
from authmilter.keys import MIN_RSA_BITS

__all__ = [
    "MAX_INSTANCES",
    "ArcOutcome",
    "ArcSet",
    "arc_set_fields",
    "feed_seal",
    "newest_seal_cv",
    "plan_body_hashes",
    "verify_chain",
]

#: RFC 8617 §4.2.1: at most 50 ARC Sets.
MAX_INSTANCES: Final = 50
_ALGORITHM: Final = "rsa-sha256"
_AAR: Final = b"arc-authentication-results"
_AMS: Final = b"arc-message-signature"
_AS: Final = b"arc-seal"
_ARC_FIELDS: Final = (_AAR, _AMS, _AS)
_SHORT: Final = {_AAR: "AAR", _AMS: "AMS", _AS: "AS"}
_INSTANCE: Final = re.compile(r"[1-9][0-9]?")  # 1..99; the range check says 1..50
# RFC 8617 §4.1.1: AAR = "i=" instance ";" authres-payload (white space around both).
_AAR_INSTANCE: Final = re.compile(r"[ \t\r\n]*i[ \t\r\n]*=[ \t\r\n]*([^; \t\r\n]*)[ \t\r\n]*;")
_REMOTE_IP: Final = re.compile(r"(?:^|[ \t\r\n;])smtp\.remote-ip[ \t\r\n]*=[ \t\r\n]*"
                               r"([0-9A-Fa-f:.]{1,45})(?=[ \t\r\n;()]|\Z)")  # fmt: skip
_RELAXED: Final = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")

ArcResult = Literal["none", "pass", "fail"]


@dataclass(frozen=True, slots=True)
class ArcSet:
    """What the A-R comment shows of one instance: ``as[i].d``, ``as[i].s``, ``remote-ip[i]``."""

    instance: int
    domain: str
    selector: str
    remote_ip: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ArcOutcome:
    """The Chain Validation Status of a message (RFC 8617 §5.2).

    ``instances`` is N (0 with ``none``). ``oldest_pass`` is set only with ``pass``: 0 when
    every AMS validates, else the oldest instance from which on all AMS validate.
    ``sets`` holds instance 1..N (oldest first) when the structure was sound, else ``()``.
    """

    result: ArcResult
    reason: str
    instances: int = 0
    oldest_pass: int | None = None
    sets: tuple[ArcSet, ...] = ()

    @property
    def passed(self) -> bool:
        return self.result == "pass"


class _Fail(Exception):
    """The chain fails for this reason (never leaves this module)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Ams:
    domain: str
    selector: str
    header_canon: str
    body_canon: str
    body_hash: bytes
    signature: bytes
    include: tuple[bytes, ...]
    length: int | None
    expiration: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Seal:
    cv: str
    domain: str
    selector: str
    signature: bytes


@dataclass(slots=True)
class _Instance:
    """The header fields of one ARC Set, as ``(index in headers, name, value)``."""

    aar: list[tuple[int, bytes, bytes]]
    ams: list[tuple[int, bytes, bytes]]
    seal: list[tuple[int, bytes, bytes]]


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def plan_body_hashes(headers: list[tuple[bytes, bytes]], bodies: BodyHashes) -> None:
    """Add to ``bodies`` the body hashes the ARC-Message-Signatures in ``headers`` need.

    Call at the end of the header, before the body is fed to ``bodies``. An AMS too broken
    to say how its body is hashed needs none (the chain fails anyway).
    """
    for name, value in headers:
        if name.lower() != _AMS:
            continue
        try:
            ams = _parse_ams(value)
        except (_Fail, SignatureError):
            continue
        bodies.add(ams.body_canon, "sha256", ams.length)


def verify_chain(
    headers: list[tuple[bytes, bytes]],
    bodies: BodyHashes | bytes,
    resolver: TxtLookup,
    *,
    now: float | None = None,
    minimum_key_bits: int = MIN_RSA_BITS,
    clock_drift: int = 300,
) -> ArcOutcome:
    """Validate the ARC chain of a message (RFC 8617 §5.2).

    :param headers: ``(name, value)`` pairs as on the wire, top first (value after the
        colon, folding and final CRLF kept), as for :func:`dkim_verify.verify_fields`.
    :param bodies: a :class:`BodyHashes` that got :func:`plan_body_hashes` before the body
        was fed to it, or the raw body (CRLF line ends).
    :param minimum_key_bits: RSA keys under ``max(1024, minimum_key_bits)`` bits fail.
    :param clock_drift: seconds of slack for an AMS ``x=``.
    :param now: the verification time (Unix seconds); ``None`` reads the clock.
    :raises ValueError: a negative ``minimum_key_bits`` or ``clock_drift``.
    """
    if minimum_key_bits < 0 or clock_drift < 0:
        raise ValueError("minimum_key_bits and clock_drift must not be negative")
    if isinstance(bodies, bytes):
        hashes_ = BodyHashes()
        plan_body_hashes(headers, hashes_)
        hashes_.update(bodies)
        bodies = hashes_
    checker = _Checker(
        headers=headers,
        bodies=bodies,
        resolver=resolver,
        minimum_key_bits=max(MIN_RSA_BITS, minimum_key_bits),
        now=time.time() if now is None else now,
        clock_drift=clock_drift,
    )
    instances = 0
    try:
        sets = _collect(headers)
        if not sets:
            return ArcOutcome(result="none", reason="no ARC header fields")
        instances = max(sets)
        return checker.run(sets)
    except _Fail as exc:
        return ArcOutcome(result="fail", reason=str(exc), instances=instances)
    except Exception as exc:  # hostile input must never raise; see the module docstring
        return ArcOutcome(
            result="fail", reason=f"verifier error: {_exception_text(exc)}", instances=instances
        )


# --------------------------------------------------------------------------------------------
# Structure (RFC 8617 §5.2 steps 1-3)
# --------------------------------------------------------------------------------------------


def _collect(headers: list[tuple[bytes, bytes]]) -> dict[int, _Instance]:
    """Group the ARC fields by instance; any unreadable instance fails the chain."""
    sets: dict[int, _Instance] = {}
    for index, (name, value) in enumerate(headers):
        lower = name.lower()
        if lower not in _ARC_FIELDS:
            continue
        instance = _instance_of(lower, value)
        entry = sets.setdefault(instance, _Instance([], [], []))
        {_AAR: entry.aar, _AMS: entry.ams, _AS: entry.seal}[lower].append((index, name, value))
    return sets  # at most MAX_INSTANCES: _instance_of refuses any i= above it


def _instance_of(lower: bytes, value: bytes) -> int:
    """The ``i=`` of one ARC field (RFC 8617 §4.2.1).

    :raises _Fail: no readable instance in 1..50.
    """
    text = value.decode("utf-8", "replace")
    what = _SHORT[lower]
    if lower == _AAR:
        match = _AAR_INSTANCE.match(text)
        if match is None:
            raise _Fail(f"{what} does not start with i=<instance>; (RFC 8617 §4.1.1)")
        raw = match.group(1)
    else:
        tags = _tags(what, value)
        if "i" not in tags:
            raise _Fail(f"{what} has no i= tag (RFC 8617 §4.2.1)")
        raw = tags["i"]
    if not _INSTANCE.fullmatch(raw) or int(raw) > MAX_INSTANCES:
        raise _Fail(f"{what} i={_excerpt(raw)} is not an instance 1..{MAX_INSTANCES} "
                    "(RFC 8617 §4.2.1)")  # fmt: skip
    return int(raw)


def _tags(what: str, value: bytes) -> dict[str, str]:
    try:
        return parse_signature_tags(value.decode("utf-8", "replace"))
    except SignatureError as exc:
        raise _Fail(f"{what}: {exc.reason}") from None


def _newest_cv(sets: dict[int, _Instance]) -> str | None:
    """The ``cv=`` of the highest-instance ARC-Seal, if there is exactly one."""
    newest = sets[max(sets)].seal
    if len(newest) != 1:
        return None
    return _tags("AS", newest[0][2]).get("cv", "").strip(FWS).lower()


def newest_seal_cv(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The ``cv=`` of the newest ARC-Seal in ``headers`` (lower case), or ``None`` when there
    is no ARC field or the newest seal cannot be read. A sealer must not add a set above
    ``cv=fail`` (RFC 8617 §5.1 step 1)."""
    try:
        sets = _collect(headers)
        return _newest_cv(sets) if sets else None
    except _Fail:
        return None


def arc_set_fields(headers: list[tuple[bytes, bytes]]) -> dict[int, list[tuple[bytes, bytes]]]:
    """Each instance's fields as ``[AAR, AMS, AS]`` (name, value), for a sealer to sign.

    :raises ValueError: the chain's structure is broken (RFC 8617 §5.2 steps 1-3).
    """
    try:
        sets = _collect(headers)
        if sets:
            _check_structure(sets)
    except _Fail as exc:
        raise ValueError(str(exc)) from None
    return {i: [e.aar[0][1:], e.ams[0][1:], e.seal[0][1:]] for i, e in sets.items()}


def feed_seal(hasher: Any, signed: list[tuple[bytes, bytes]], seal: tuple[bytes, bytes]) -> None:
    """Feed ``hasher`` what an ARC-Seal signs (RFC 8617 §5.1.1): the ``signed`` fields in
    order, then ``seal`` (its ``b=`` empty when signing), relaxed, without the final CRLF.
    Shared by the verifier and :mod:`authmilter.arc_sign`."""
    for name, value in _RELAXED.canonicalize_headers(signed):
        hasher.update(name + b":" + value)
    dkim.hash_headers(hasher, _RELAXED, [], [], seal, None)


def _check_structure(sets: dict[int, _Instance]) -> int:
    """RFC 8617 §5.2 step 3 (with step 2 first); returns N."""
    count = max(sets)
    if _newest_cv(sets) == "fail":
        raise _Fail(f"ARC-Seal i={count} has cv=fail (RFC 8617 §5.2 step 2)")
    for instance in range(1, count + 1):
        entry = sets.get(instance)
        if entry is None:
            raise _Fail(f"ARC set i={instance} missing: instances must be 1..{count} "
                        "(RFC 8617 §5.2 step 3)")  # fmt: skip
        for what, fields in (("AAR", entry.aar), ("AMS", entry.ams), ("AS", entry.seal)):
            if len(fields) != 1:
                raise _Fail(f"{len(fields)} {what} for i={instance}, need exactly one "
                            "(RFC 8617 §5.2 step 3)")  # fmt: skip
    return count


# --------------------------------------------------------------------------------------------
# Signatures
# --------------------------------------------------------------------------------------------


def _domain_selector(what: str, tags: dict[str, str]) -> tuple[str, str]:
    domain, selector = tags["d"], tags["s"]
    if not DNS_NAME.fullmatch(domain):
        raise _Fail(f"{what} d= {_excerpt(domain)} is not a domain name (RFC 6376 §3.5)")
    if not DNS_NAME.fullmatch(selector) or len(f"{selector}._domainkey.{domain}") > 253:
        raise _Fail(f"{what} s= {_excerpt(selector)} is not a valid selector (RFC 6376 §3.1)")
    return domain, selector


def _require(what: str, tags: dict[str, str], required: tuple[str, ...]) -> None:
    for tag in required:
        if tag not in tags:
            raise _Fail(f"{what} missing required tag '{tag}' (RFC 8617 §4.1)")
    if tags["a"] != _ALGORITHM:
        raise _Fail(f"{what} a={_excerpt(tags['a'])} not acceptable, only {_ALGORITHM} "
                    "(RFC 8301 §3.1)")  # fmt: skip


def _b64(what: str, tag: str, value: str) -> bytes:
    try:
        return base64.b64decode(decode_base64_tag(tag, value))
    except SignatureError as exc:
        raise _Fail(f"{what}: {exc.reason}") from None


def _parse_ams(value: bytes, what: str = "AMS") -> _Ams:
    """RFC 8617 §4.1.2: a DKIM-Signature with ``i=`` the instance and no ``v=``."""
    tags = _tags(what, value)
    _require(what, tags, ("i", "a", "b", "bh", "d", "h", "s"))
    domain, selector = _domain_selector(what, tags)
    canon = CANON.fullmatch(tags.get("c", "simple/simple"))
    if canon is None:
        raise _Fail(f"{what} c={_excerpt(tags['c'])} unknown (RFC 6376 §3.5)")
    names = [item.strip(FWS) for item in tags["h"].split(":")]
    for item in names:
        if not FIELD_NAME.fullmatch(item):
            raise _Fail(f"{what} h= has an invalid field name {_excerpt(item)} (RFC 6376 §3.5)")
    lower = [item.lower() for item in names]
    if "from" not in lower:
        raise _Fail(f"{what} does not sign From (RFC 6376 §5.4)")
    if "arc-seal" in lower:
        raise _Fail(f"{what} h= includes ARC-Seal (RFC 8617 §4.1.2)")
    if "q" in tags and tags["q"] != "dns/txt":
        raise _Fail(f"{what} q={_excerpt(tags['q'])} unsupported (RFC 6376 §3.5)")
    length = None
    if "l" in tags:
        if not LENGTH.fullmatch(tags["l"]):
            raise _Fail(f"{what} l= {_excerpt(tags['l'])} is not a byte count (RFC 6376 §3.5)")
        length = int(tags["l"])
    expiration = None
    if "x" in tags:
        if not TIMESTAMP.fullmatch(tags["x"]):
            raise _Fail(f"{what} x= {_excerpt(tags['x'])} is not a timestamp (RFC 6376 §3.5)")
        expiration = int(tags["x"])
    return _Ams(
        domain=domain,
        selector=selector,
        header_canon=canon.group(1),
        body_canon=canon.group(2) or "simple",
        body_hash=_b64(what, "bh", tags["bh"]),
        signature=_b64(what, "b", tags["b"]),
        include=tuple(item.encode("ascii") for item in lower),
        length=length,
        expiration=expiration,
    )


def _parse_seal(value: bytes, what: str) -> _Seal:
    """RFC 8617 §4.1.3: ``i``, ``cv``, ``a``, ``b``, ``d``, ``s`` (``t`` optional), no ``h``."""
    tags = _tags(what, value)
    _require(what, tags, ("i", "cv", "a", "b", "d", "s"))
    if "h" in tags:
        raise _Fail(f"{what} has an h= tag (RFC 8617 §4.1.3)")
    cv = tags["cv"].strip(FWS).lower()
    if cv not in ("none", "pass", "fail"):
        raise _Fail(f"{what} cv={_excerpt(tags['cv'])} unknown (RFC 8617 §4.1.3)")
    domain, selector = _domain_selector(what, tags)
    return _Seal(cv=cv, domain=domain, selector=selector,
                 signature=_b64(what, "b", tags["b"]))  # fmt: skip


def _remote_ip(aar_value: bytes) -> str | None:
    """The AAR's ``smtp.remote-ip`` (RFC 8617 §10.2 ``remote-ip[i]``), if a valid address."""
    match = _REMOTE_IP.search(aar_value.decode("utf-8", "replace"))
    if match is None:
        return None
    try:
        return str(ipaddress.ip_address(match.group(1)))
    except ValueError:
        return None


@dataclass(slots=True, kw_only=True)
class _Checker:
    headers: list[tuple[bytes, bytes]]
    bodies: BodyHashes
    resolver: TxtLookup
    minimum_key_bits: int
    now: float
    clock_drift: int

    def run(self, sets: dict[int, _Instance]) -> ArcOutcome:
        count = _check_structure(sets)
        seals: dict[int, _Seal] = {}
        for instance in range(count, 0, -1):
            seal = _parse_seal(sets[instance].seal[0][2], f"AS i={instance}")
            expected = "none" if instance == 1 else "pass"
            if seal.cv != expected:
                raise _Fail(f"AS i={instance} has cv={seal.cv}, must be {expected} "
                            "(RFC 8617 §5.2 step 3)")  # fmt: skip
            seals[instance] = seal
        arc_sets = tuple(
            ArcSet(i, seals[i].domain, seals[i].selector, _remote_ip(sets[i].aar[0][2]))
            for i in range(1, count + 1)
        )

        # Step 4: the newest AMS.
        problem = self.ams_problem(sets[count], count)
        if problem is not None:
            raise _Fail(problem)
        # Step 5: oldest-pass.
        oldest_pass = 0
        for instance in range(count - 1, 0, -1):
            if self.ams_problem(sets[instance], instance) is not None:
                oldest_pass = instance + 1
                break
        # Step 6: every AS, newest first.
        for instance in range(count, 0, -1):
            self.check_seal(sets, instance, seals[instance])
        return ArcOutcome(
            result="pass",
            reason=f"{count} ARC set{'s' if count > 1 else ''} verified",
            instances=count,
            oldest_pass=oldest_pass,
            sets=arc_sets,
        )

    # -- keys ---------------------------------------------------------------------------------

    def public_key(self, what: str, domain: str, selector: str) -> rsa.RSAPublicKey:
        """Fetch and check the key with DKIM's rules, then apply RFC 8301 and the minimum."""
        try:
            key = fetch_key(selector, domain, self.resolver)
            bits = key_bits(key)
            check_key(key, _ALGORITHM, domain, domain)
        except SignatureError as exc:
            # A DNS temperror too: arc= has no temperror (see the module docstring).
            raise _Fail(f"{what}: {exc.reason}") from None
        public = key.public_key()
        if not isinstance(public, rsa.RSAPublicKey):  # check_key made sure; for mypy
            raise _Fail(f"{what}: not an RSA key")
        if bits < MIN_RSA_BITS:
            raise _Fail(f"{what}: {bits}-bit key below the RFC 8301 minimum of {MIN_RSA_BITS}")
        if bits < self.minimum_key_bits:
            raise _Fail(f"{what}: {bits}-bit key below MinimumKeyBits {self.minimum_key_bits}")
        return public

    @staticmethod
    def rsa_verify(public: rsa.RSAPublicKey, signature: bytes, digest: bytes) -> bool:
        try:
            public.verify(signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True

    # -- AMS (RFC 8617 §4.1.2, verified as DKIM, RFC 6376 §6.1.3) ----------------------------

    def ams_problem(self, entry: _Instance, instance: int) -> str | None:
        """Why the AMS of ``instance`` does not validate, or ``None`` when it does."""
        what = f"AMS i={instance}"
        try:
            _index, name, value = entry.ams[0]
            ams = _parse_ams(value, what)
            if ams.expiration is not None and ams.expiration < self.now - self.clock_drift:
                return f"{what}: signature expired"
            body = self.bodies.get(ams.body_canon, "sha256", ams.length)
            if body is None:
                return f"{what}: its body hash was not planned (plan_body_hashes)"
            digest = body.digest()  # finishes the hash, so body.length is the full length
            if ams.length is not None and body.length < ams.length:
                return f"{what}: l={ams.length} exceeds the body (RFC 6376 §3.5)"
            if digest != ams.body_hash:
                return f"{what}: body hash did not verify"
            public = self.public_key(what, ams.domain, ams.selector)
            policy = CanonicalizationPolicy.from_c_value(
                f"{ams.header_canon}/{ams.body_canon}".encode()
            )
            include = list(ams.include)
            if b"from" in include:
                include.append(b"from")  # one more From than signed, as dkim_verify does
            hasher = hashlib.sha256()
            hash_signed_fields(hasher, policy, self.headers, include, (name, value))
            if not self.rsa_verify(public, ams.signature, hasher.digest()):
                return f"{what}: signature verification failed"
        except _Fail as exc:
            return str(exc)
        return None

    # -- AS (RFC 8617 §5.1.1) -----------------------------------------------------------------

    def check_seal(self, sets: dict[int, _Instance], instance: int, seal: _Seal) -> None:
        """The AS of ``instance`` signs the sets 1..instance, each AAR, AMS, AS in that order,
        relaxed, with its own ``b=`` empty and no final CRLF."""
        what = f"AS i={instance}"
        signed: list[tuple[bytes, bytes]] = []
        for i in range(1, instance + 1):
            entry = sets[i]
            signed += [entry.aar[0][1:], entry.ams[0][1:]]
            if i < instance:
                signed.append(entry.seal[0][1:])
        hasher = hashlib.sha256()
        feed_seal(hasher, signed, sets[instance].seal[0][1:])
        public = self.public_key(what, seal.domain, seal.selector)
        if not self.rsa_verify(public, seal.signature, hasher.digest()):
            raise _Fail(f"{what}: seal did not verify")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _excerpt(text: str, limit: int = 40) -> str:
    """A short, ASCII-only quotation of hostile text for a reason string."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return ascii(text)


def _exception_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if len(text) > 200:
        text = text[:200] + "..."
    return ascii(text)[1:-1]
