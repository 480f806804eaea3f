"""ARC sealing (RFC 8617 §5.1): the three header fields an intermediary adds on top.

:func:`seal` makes one ARC Set for a message whose chain :func:`authmilter.arc_verify.
verify_chain` has just judged: ARC-Authentication-Results (our own results), an
ARC-Message-Signature (a DKIM signature over the message) and an ARC-Seal (a signature over
the ARC Sets). It is a pure function, not wired into the milter yet.

What the signatures cover is never written twice: the AMS goes through
:func:`authmilter.dkim_sign.sign_tags` (the tag folding, hashing and RSA arithmetic of DKIM
signing; dkimpy selects and canonicalizes the header fields), the AS through
:func:`authmilter.arc_verify.feed_seal`, the very function the verifier checks seals with.
``cryptography`` makes the RSA signatures.

Decisions:

- **Refusals** raise :class:`SealRefused` (its ``reason`` says why) instead of returning
  fields: a 51st instance (RFC 8617 §4.2.1), or a chain whose newest ARC-Seal already says
  ``cv=fail``, which ends the chain for good (RFC 8617 §5.1 step 1, §5.1.2). A key RFC 8617
  cannot use (Ed25519: ARC knows only ``rsa-sha256``) raises :class:`ArcKeyError`, a
  configuration error.
- **cv**: ``none`` at instance 1, ``pass``/``fail`` from the chain's verdict. A failed chain
  is sealed once with ``cv=fail``, and that seal covers only the new set (RFC 8617 §5.1.2);
  the AMS and AAR are made as always.
- **AMS**: ``a=rsa-sha256``, ``c=relaxed/relaxed``, the body hash from the caller's
  streamed :class:`~authmilter.body_hash.BodyHashes` (plan it with
  :func:`plan_body_hash`). ``h=`` is DKIM signing's list (:func:`authmilter.dkim_sign.
  signed_header_names`) over the OpenDKIM default SignHeaders plus DKIM-Signature, From
  oversigned; never ARC-Seal nor Authentication-Results (RFC 8617 §4.1.2).
- **Order**: returned top first as ARC-Seal, ARC-Message-Signature,
  ARC-Authentication-Results, the order dkimpy and rspamd prepend them in (each field is
  inserted at the top in the order AAR, AMS, AS of RFC 8617 §5.1).
- **Size**: tags are folded with CRLF+TAB near 76 columns, ``b=``/``bh=``/``h=`` are
  broken into 72-character pieces and the AAR at white space, so no line nears RFC 5322's
  998 octets; a field longer than :data:`MAX_FIELD_OCTETS` in all (only possible with a
  huge ``ar_value``, an unbreakable AAR word, or hundreds of signed header fields) is
  refused, keeping every field under libmilter's 2048-byte header limit.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import Any, Final

import dkim
from dkim.canonicalization import CanonicalizationPolicy

from authmilter.arc_verify import (
    MAX_INSTANCES,
    ArcOutcome,
    arc_set_fields,
    feed_seal,
    newest_seal_cv,
)
from authmilter.body_hash import BodyHashes
from authmilter.config import DEFAULT_SIGN_HEADERS, Canon, SignatureAlgorithm
from authmilter.dkim_sign import SigningPolicy, fold_base64, sign_tags, signed_header_names
from authmilter.keys import KeyAlgorithm, PrivateKey
from authmilter.keytable import SigningKey

__all__ = [
    "ARC_SIGN_HEADERS",
    "MAX_FIELD_OCTETS",
    "ArcKeyError",
    "SealRefused",
    "plan_body_hash",
    "seal",
]

#: The AMS signs DKIM's usual fields and the DKIM-Signatures above them.
ARC_SIGN_HEADERS: Final = (*DEFAULT_SIGN_HEADERS, "DKIM-Signature")
#: Never in an AMS h=: ARC-Seal (RFC 8617 §4.1.2) and fields downstream hops remove.
_NEVER_SIGNED: Final = ("ARC-Seal", "Authentication-Results")
#: A whole field ("Name: value" with folding) may not be longer (libmilter: 2048).
MAX_FIELD_OCTETS: Final = 2000
_BODY_SPEC: Final = ("relaxed", "sha256", None)
_RELAXED: Final = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
_AAR: Final = "ARC-Authentication-Results"
_AMS: Final = "ARC-Message-Signature"
_AS: Final = "ARC-Seal"
_WIDTH: Final = 76
_MAX_LINE: Final = 998  # RFC 5322 §2.1.1, without the CRLF


class SealRefused(Exception):
    """No ARC Set may (or can) be added to this message; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ArcKeyError(ValueError):
    """The key cannot make ARC signatures (RFC 8617 allows only rsa-sha256)."""


def plan_body_hash(bodies: BodyHashes) -> None:
    """Add the body hash :func:`seal` needs (relaxed, SHA-256, whole body) to ``bodies``;
    call before the body streams through it."""
    bodies.add(*_BODY_SPEC)


def seal(
    headers: list[tuple[bytes, bytes]],
    bodies: BodyHashes | bytes,
    key: SigningKey | tuple[str, str, PrivateKey],
    *,
    authserv_id: str,
    ar_value: str,
    chain: ArcOutcome,
    now: float,
    sign_headers: Sequence[str] = ARC_SIGN_HEADERS,
) -> list[tuple[str, str]]:
    """Make the ARC Set for ``headers`` (top first, as for ``verify_chain``).

    :param bodies: a :class:`BodyHashes` that got :func:`plan_body_hash` before the body
        was fed, or the raw body (CRLF lines).
    :param key: the sealing key, as a :class:`SigningKey` or ``(domain, selector, key)``.
    :param authserv_id: our authserv-id, written into the AAR.
    :param ar_value: our Authentication-Results without the authserv-id
        (``spf=pass ...; dkim=pass ...; arc=pass ...``); empty means ``none``.
    :param chain: what ``verify_chain`` said about these same headers.
    :param now: the signing time (Unix seconds) for ``t=``.
    :returns: ``[(name, value), ...]`` to insert at the top in this order: ARC-Seal,
        ARC-Message-Signature, ARC-Authentication-Results. Values have no leading space and
        are folded with CRLF+TAB.
    :raises SealRefused: the chain is terminated (newest ``cv=fail``), a 51st instance, a
        broken chain structure under a ``pass`` verdict, or a field too long.
    :raises ArcKeyError: the key is not RSA.
    :raises ValueError: a :class:`BodyHashes` without the planned hash.
    """
    signing_key = _signing_key(key)
    if newest_seal_cv(headers) == "fail":
        raise SealRefused("the newest ARC-Seal has cv=fail: the chain is terminated and no "
                          "further ARC Set may be added (RFC 8617 §5.1)")  # fmt: skip
    instance = chain.instances + 1
    if instance > MAX_INSTANCES:
        raise SealRefused(f"the chain already has {chain.instances} ARC Sets; at most "
                          f"{MAX_INSTANCES} are allowed (RFC 8617 §4.2.1)")  # fmt: skip
    if instance == 1 and chain.result != "fail":
        cv = "none"
    else:
        cv = "pass" if chain.result == "pass" else "fail"
    older: list[tuple[bytes, bytes]] = []
    if cv == "pass":
        try:
            sets = arc_set_fields(headers)
        except ValueError as exc:
            raise SealRefused(f"the chain said pass but its structure is broken: {exc}") from None
        if max(sets, default=0) != chain.instances:
            raise SealRefused(f"the chain has {chain.instances} instances, the header "
                              f"{max(sets, default=0)}: verified on other headers?")  # fmt: skip
        for i in range(1, instance):
            older += sets[i]
    body_hash = _body_hash(bodies)
    stamp = str(int(now))

    aar_value = _fold_words(f"i={instance}; {authserv_id}; {ar_value.strip() or 'none'}")
    aar = (_AAR.encode(), b" " + aar_value.encode() + b"\r\n")

    include = _ams_headers(headers, sign_headers)
    ams_tags = [
        ("i", str(instance)),
        ("a", "rsa-sha256"),
        ("c", "relaxed/relaxed"),
        ("d", signing_key.domain),
        ("s", signing_key.selector),
        ("t", stamp),
        ("h", _fold_list(include)),
        ("bh", fold_base64(base64.b64encode(body_hash).decode())),
    ]
    canonical = _RELAXED.canonicalize_headers(list(headers))

    def hash_ams(hasher: Any, field: tuple[bytes, bytes]) -> None:
        dkim.hash_headers(hasher, _RELAXED, canonical, [h.encode() for h in include],
                          field, None)  # fmt: skip

    ams_value = sign_tags(ams_tags, signing_key, SignatureAlgorithm.RSA_SHA256, _AMS.encode(),
                          hash_ams).decode("ascii")  # fmt: skip
    ams = (_AMS.encode(), b" " + ams_value.encode() + b"\r\n")

    as_tags = [
        ("i", str(instance)),
        ("a", "rsa-sha256"),
        ("cv", cv),
        ("d", signing_key.domain),
        ("s", signing_key.selector),
        ("t", stamp),
    ]
    # RFC 8617 §5.1.1: sets 1..i-1, then our AAR and AMS; §5.1.2: only our set on cv=fail.
    signed = [*older, aar, ams]

    as_value = sign_tags(as_tags, signing_key, SignatureAlgorithm.RSA_SHA256, _AS.encode(),
                         lambda hasher, field: feed_seal(hasher, signed, field)).decode("ascii")

    fields = [(_AS, as_value), (_AMS, ams_value), (_AAR, aar_value)]
    for name, value in fields:
        size = len(name) + 2 + len(value.encode())
        if size > MAX_FIELD_OCTETS:
            raise SealRefused(f"{name} would be {size} octets, over {MAX_FIELD_OCTETS}")
        lines = f"{name}: {value}".split("\r\n")
        if max(len(line.encode()) for line in lines) > _MAX_LINE:
            raise SealRefused(f"{name} has a word too long to fold under {_MAX_LINE} octets "
                              "a line (RFC 5322 §2.1.1)")  # fmt: skip
    return fields


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _signing_key(key: SigningKey | tuple[str, str, PrivateKey]) -> SigningKey:
    if not isinstance(key, SigningKey):
        domain, selector, private = key
        key = SigningKey(keyname=f"{selector}._domainkey.{domain}", domain=domain,
                         selector=selector, key=private)  # fmt: skip
    if key.key.algorithm is not KeyAlgorithm.RSA:
        raise ArcKeyError(f"cannot ARC-seal with the {key.key.algorithm.value} key "
                          f"{key.selector}._domainkey.{key.domain}: RFC 8617 allows only "
                          "rsa-sha256; use an RSA key for ARC")  # fmt: skip
    return key


def _body_hash(bodies: BodyHashes | bytes) -> bytes:
    if isinstance(bodies, bytes):
        hashes = BodyHashes()
        plan_body_hash(hashes)
        hashes.update(bodies)
        bodies = hashes
    body = bodies.get(*_BODY_SPEC)
    if body is None:
        raise ValueError("the relaxed SHA-256 body hash was not planned (plan_body_hash)")
    return body.digest()


def _ams_headers(headers: list[tuple[bytes, bytes]], sign_headers: Sequence[str]) -> list[str]:
    """DKIM signing's h= rule (every occurrence, From oversigned) for the AMS."""
    policy = SigningPolicy(
        canonicalization=(Canon.RELAXED, Canon.RELAXED),
        sign_headers=tuple(h for h in sign_headers if h.lower() not in _NEVER_LOWER),
        omit_headers=_NEVER_SIGNED,
    )
    present = [name.decode("ascii", "replace") for name, _value in headers]
    return signed_header_names(present, policy)


_NEVER_LOWER: Final = frozenset(h.lower() for h in _NEVER_SIGNED)


def _fold_list(names: list[str]) -> str:
    """``h=`` names joined by ``:``, with FWS after a colon every ~70 characters."""
    lines: list[str] = []
    current = ""
    for name in names:
        if current and len(current) + len(name) + 1 > 70:
            lines.append(current + ":")
            current = name
        else:
            current = f"{current}:{name}" if current else name
    lines.append(current)
    return "\r\n\t ".join(lines)


def _fold_words(text: str) -> str:
    """Fold at white space so lines stay near :data:`_WIDTH` (a longer word stays whole)."""
    words = re.split(r"[ \t\r\n]+", text.strip())
    lines: list[str] = []
    current = ""
    for word in words:
        if current and len(current) + 1 + len(word) > _WIDTH:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return "\r\n\t".join(lines)
