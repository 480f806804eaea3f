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
from pathlib import Path
from typing import Any

import dkim
import nacl.encoding
import nacl.signing

from authmilter.keys import KeyAlgorithm, PrivateKey, generate_private_key, key_record_text

#: Header fields the corpus signs, in this order (From first, as OpenDKIM does).
SIGNED_HEADERS = ("from", "to", "subject", "date", "message-id")


def rsa_key(bits: int) -> PrivateKey:
    """A fresh RSA key of ``bits`` bits."""
    return generate_private_key(KeyAlgorithm.RSA, bits)


def ed25519_key() -> PrivateKey:
    """A fresh Ed25519 key."""
    return generate_private_key(KeyAlgorithm.ED25519)


def record(key: PrivateKey) -> str:
    """The key record publishing ``key`` (``v=DKIM1; k=…; p=…``)."""
    return key_record_text(key)


def write_key(path: Path, key: PrivateKey) -> Path:
    """Write ``key`` as a 0600 PEM file (OpenDKIM's RequireSafeKeys accepts it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.pem())
    path.chmod(0o600)
    return path


def sign(message: bytes, key: PrivateKey, *, domain: str, selector: str,
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
        ed = key.algorithm is KeyAlgorithm.ED25519
        algorithm = "ed25519-sha256" if ed else "rsa-sha256"
    alg = algorithm.encode("ascii")
    signer = dkim.DKIM(message, linesep=b"\r\n")
    signer.signature_algorithm = alg
    pk: Any
    if key.algorithm is KeyAlgorithm.ED25519:
        pk = nacl.signing.SigningKey(key.dkimpy_private(), encoder=nacl.encoding.Base64Encoder)
    else:
        pk = dkim.crypto.parse_pem_private_key(key.pem())
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
