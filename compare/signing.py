"""Keys and DKIM signatures for the corpus: every tag under the test's control.

dkimpy's ``sign()`` always writes ``t=`` = now and never ``x=``; the corpus needs expired
(``x=`` in the past), future (``t=`` ahead) and ``l=`` signatures, so :func:`sign` builds the
tag list itself and lets dkimpy canonicalize, hash and fold (``DKIM.gen_header``).
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import nacl.encoding
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

#: Header fields the corpus signs, in this order (From first, as OpenDKIM does).
SIGNED_HEADERS = ("from", "to", "subject", "date", "message-id")


@dataclass(frozen=True, slots=True)
class RsaKey:
    """An RSA private key (PKCS#1 PEM) and its ``p=`` value."""

    pem: bytes
    public_b64: str

    @property
    def record(self) -> str:
        return f"v=DKIM1; k=rsa; p={self.public_b64}"


@dataclass(frozen=True, slots=True)
class Ed25519Key:
    """An Ed25519 key: dkimpy's base64 seed and the raw public key's ``p=`` value."""

    seed_b64: bytes
    public_b64: str

    @property
    def record(self) -> str:
        return f"v=DKIM1; k=ed25519; p={self.public_b64}"


def rsa_key(bits: int) -> RsaKey:
    """A fresh RSA key of ``bits`` bits."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())  # fmt: skip
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return RsaKey(pem, base64.b64encode(der).decode("ascii"))


def ed25519_key() -> Ed25519Key:
    """A fresh Ed25519 key."""
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())  # fmt: skip
    pub = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)  # fmt: skip
    return Ed25519Key(base64.b64encode(seed), base64.b64encode(pub).decode("ascii"))


def write_key(path: Path, key: RsaKey) -> Path:
    """Write ``key`` as a 0600 PEM file (OpenDKIM's RequireSafeKeys accepts it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.pem)
    path.chmod(0o600)
    return path


def sign(message: bytes, key: RsaKey | Ed25519Key, *, domain: str, selector: str,
         algorithm: str | None = None, canonicalization: str = "relaxed/simple",
         headers: Sequence[str] = SIGNED_HEADERS, length: bool = False,
         timestamp: int | None = None, expiration: int | None = None,
         now: float | None = None) -> bytes:  # fmt: skip
    """``message`` (CRLF) with a DKIM-Signature prepended.

    ``algorithm`` defaults to ``rsa-sha256`` or ``ed25519-sha256`` by key type;
    ``timestamp``/``expiration`` are the ``t=``/``x=`` values (``t=`` defaults to now, no
    ``x=`` unless given); ``length`` adds ``l=`` with the canonical body length.
    """
    if algorithm is None:
        algorithm = "ed25519-sha256" if isinstance(key, Ed25519Key) else "rsa-sha256"
    alg = algorithm.encode("ascii")
    signer = dkim.DKIM(message, linesep=b"\r\n")
    signer.signature_algorithm = alg
    pk: Any
    if isinstance(key, Ed25519Key):
        pk = nacl.signing.SigningKey(key.seed_b64, encoder=nacl.encoding.Base64Encoder)
    else:
        pk = dkim.crypto.parse_pem_private_key(key.pem)
    policy = dkim.CanonicalizationPolicy.from_c_value(canonicalization.encode("ascii"))
    body = policy.canonicalize_body(signer.body)
    signer.hasher = dkim.HASH_ALGORITHMS[alg]
    hasher = signer.hasher()
    hasher.update(body)
    include = tuple(h.lower().encode("ascii") for h in headers)
    signer.include_headers = include
    t = int(now if now is not None else time.time()) if timestamp is None else timestamp
    fields: list[tuple[bytes, bytes]] = [
        (b"v", b"1"),
        (b"a", alg),
        (b"c", policy.to_c_value()),
        (b"d", domain.encode("ascii")),
        (b"s", selector.encode("ascii")),
        (b"t", str(t).encode("ascii")),
    ]
    if expiration is not None:
        fields.append((b"x", str(expiration).encode("ascii")))
    if length:
        fields.append((b"l", str(len(body)).encode("ascii")))
    fields += [
        (b"h", b":".join(include)),
        (b"bh", base64.b64encode(hasher.digest())),
        (b"b", b"0" * 60),
    ]
    value = signer.gen_header(fields, include, policy, b"DKIM-Signature", pk)
    return b"DKIM-Signature: " + bytes(value) + message


def drop_tag(message: bytes, tag: str) -> bytes:
    """Remove tag ``tag=`` from the first DKIM-Signature (a malformed signature)."""
    head, sep, rest = message.partition(b"\r\n\r\n")
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", head)
    pattern = rb"(DKIM-Signature:[^\r\n]*?)[; ]\s*" + tag.encode() + rb"=[^;\r\n]*"
    return re.sub(pattern, rb"\1", unfolded, count=1) + sep + rest
