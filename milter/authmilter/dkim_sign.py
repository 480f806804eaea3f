"""DKIM signing (RFC 6376, RFC 8463): dkimpy's canonicalization, OpenSSL's arithmetic.

dkimpy canonicalizes and selects header fields exactly as its verifier expects; the signature
itself is made with ``cryptography`` on the key object loaded once at start (dkimpy would
re-parse the PEM and sign RSA in pure Python on every message). dkimpy's signer also lacks
``x=``, which ``SignatureTTL`` needs.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from dkim.canonicalization import CanonicalizationPolicy

from authmilter.config import Canon, SignatureAlgorithm
from authmilter.keys import KeyAlgorithm
from authmilter.keytable import SigningKey

#: Header fields RFC 6376 §5.4 requires in h= whatever the configuration says.
MANDATORY_SIGNED = ("from",)


@dataclass(frozen=True, slots=True, kw_only=True)
class SigningPolicy:
    """What the configuration says about how to sign (Canonicalization, SignHeaders, …)."""

    canonicalization: tuple[Canon, Canon] = (Canon.RELAXED, Canon.SIMPLE)
    sign_headers: tuple[str, ...] = ()
    omit_headers: tuple[str, ...] = ()
    oversign_headers: tuple[str, ...] = ("From",)
    rsa_algorithm: SignatureAlgorithm = SignatureAlgorithm.RSA_SHA256
    ttl: int = 0  # SignatureTTL: seconds until x=; 0 = no x=


def signed_header_names(present: Sequence[str], policy: SigningPolicy) -> list[str]:
    """The h= list for a message whose header field names are ``present`` (top to bottom).

    Every occurrence of a field in SignHeaders and not in OmitHeaders is signed (From always,
    RFC 6376 §5.4); each OversignHeaders name is listed once more than it occurs, so nobody
    can add another instance after signing (RFC 6376 §8.15).
    """
    sign = {h.lower() for h in policy.sign_headers} | set(MANDATORY_SIGNED)
    omit = {h.lower() for h in policy.omit_headers} - set(MANDATORY_SIGNED)
    names = [n.lower() for n in present if n.lower() in sign and n.lower() not in omit]
    for extra in policy.oversign_headers:
        low = extra.lower()
        if low in omit:
            continue
        names.append(low)
    return names


def _fold_tags(tags: Sequence[tuple[str, str]]) -> bytes:
    """Join tags as ``t=v;`` with CRLF+TAB folding between tags, b= last on its own line."""
    lines: list[str] = []
    current = ""
    for name, value in tags:
        piece = f"{name}={value};"
        if name == "b":
            lines.append(current)
            current = f"b={value}"
            continue
        if current and len(current) + 1 + len(piece) > 76:
            lines.append(current)
            current = piece
        else:
            current = f"{current} {piece}" if current else piece
    lines.append(current)
    return "\r\n\t".join(line for line in lines if line).encode("ascii")


def fold_base64(value: str, width: int = 72) -> str:
    """Break a long base64 value with FWS (allowed inside b= and bh=, RFC 6376 §3.5)."""
    return "\r\n\t ".join(value[i : i + width] for i in range(0, len(value), width))


def body_hash_spec(key: SigningKey, policy: SigningPolicy) -> tuple[str, str, None]:
    """The (canonicalization, hash, l=) of the body hash signing with ``key`` needs, so the
    caller can hash the body as it streams in (:mod:`authmilter.body_hash`)."""
    algorithm = _algorithm(key, policy)
    hash_name = "sha1" if algorithm is SignatureAlgorithm.RSA_SHA1 else "sha256"
    return policy.canonicalization[1].value, hash_name, None


def _algorithm(key: SigningKey, policy: SigningPolicy) -> SignatureAlgorithm:
    if key.key.algorithm is KeyAlgorithm.ED25519:
        return SignatureAlgorithm.ED25519_SHA256
    return policy.rsa_algorithm


def sign(headers: Sequence[tuple[bytes, bytes]], body: bytes | None, key: SigningKey,
         policy: SigningPolicy, *, now: int, body_hash: bytes | None = None) -> bytes:  # fmt: skip
    """Make the value of a DKIM-Signature field (``v=1; a=…; b=…``, CRLF-folded, no name).

    ``headers`` are ``(name, value)`` pairs as on the wire: the value is everything after the
    colon, including the leading space, folding and the final CRLF. Give the body either as
    ``body`` (CRLF lines) or as ``body_hash``, the digest of its canonical form computed while
    it streamed in (see :func:`body_hash_spec`).
    """
    canon = CanonicalizationPolicy.from_c_value(
        f"{policy.canonicalization[0].value}/{policy.canonicalization[1].value}".encode())
    algorithm = _algorithm(key, policy)
    hasher = hashlib.sha1 if algorithm is SignatureAlgorithm.RSA_SHA1 else hashlib.sha256
    if body_hash is None:
        if body is None:
            raise ValueError("sign() needs the body or its hash")
        body_hash = hasher(canon.canonicalize_body(body)).digest()
    bh = base64.b64encode(body_hash).decode()
    include = signed_header_names([n.decode("ascii", "replace") for n, _v in headers], policy)
    tags: list[tuple[str, str]] = [
        ("v", "1"),
        ("a", algorithm.value),
        ("c", canon.to_c_value().decode()),
        ("d", key.domain),
        ("s", key.selector),
    ]
    if key.identity:
        tags.append(("i", key.identity))
    tags.append(("t", str(now)))
    if policy.ttl:
        tags.append(("x", str(now + policy.ttl)))
    tags += [("h", ":".join(include)), ("bh", fold_base64(bh))]
    # RFC 6376 §3.7: the selected fields, then this field with an empty b=, without its CRLF.
    canonical = canon.canonicalize_headers(list(headers))
    return sign_tags(
        tags, key, algorithm, b"DKIM-Signature",
        lambda data, field: dkim.hash_headers(data, canon, canonical,
                                              [h.encode() for h in include], field, None),
    )  # fmt: skip


def sign_tags(
    tags: Sequence[tuple[str, str]],
    key: SigningKey,
    algorithm: SignatureAlgorithm,
    name: bytes,
    hash_fields: Callable[[Any, tuple[bytes, bytes]], None],
) -> bytes:
    """Fold ``tags`` plus an empty ``b=``, sign and return the value with ``b=`` filled in.

    ``hash_fields(hasher, (name, unsigned value))`` feeds the hasher what the signature
    covers (for DKIM: the selected header fields, then this field with its ``b=`` empty).
    Shared by DKIM-Signature and the ARC signatures (:mod:`authmilter.arc_sign`).
    """
    unsigned = b" " + _fold_tags([*tags, ("b", "")])
    data = hashlib.sha1() if algorithm is SignatureAlgorithm.RSA_SHA1 else hashlib.sha256()
    hash_fields(data, (name, unsigned))
    signature = _sign_digest(key, data.digest(), algorithm)
    b64 = base64.b64encode(signature).decode()
    return unsigned[1:] + fold_base64(b64).encode()


def _sign_digest(key: SigningKey, digest: bytes, algorithm: SignatureAlgorithm) -> bytes:
    """The one place that does key arithmetic."""
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    pk = key.key.key
    if isinstance(pk, ed25519.Ed25519PrivateKey):
        return pk.sign(digest)  # RFC 8463 §3: Ed25519 over the SHA-256 hash
    assert isinstance(pk, rsa.RSAPrivateKey)
    alg = hashes.SHA1() if algorithm is SignatureAlgorithm.RSA_SHA1 else hashes.SHA256()
    return pk.sign(digest, padding.PKCS1v15(), Prehashed(alg))
