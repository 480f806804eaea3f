"""Streaming body canonicalization equals dkimpy's whole-body canonicalization."""

from __future__ import annotations

import hashlib

import pytest
from dkim.canonicalization import CanonicalizationPolicy
from hypothesis import given, settings
from hypothesis import strategies as st

from authmilter.body_hash import BodyHash, BodyHashes


def reference(body: bytes, canon: str, limit: int | None = None) -> tuple[bytes, int]:
    """dkimpy's canonical body (after its CRLF normalization) hashed, and its length."""
    normalized = b"\r\n".join(body.replace(b"\r\n", b"\n").split(b"\n")) if body else b""
    # dkimpy splits on \r?\n and joins with \r\n: a bare CR stays, \r\n and \n become \r\n.
    import re

    normalized = b"\r\n".join(re.split(b"\r?\n", body))
    canonical = CanonicalizationPolicy.from_c_value(
        f"{canon}/{canon}".encode()).canonicalize_body(normalized)
    hashed = canonical if limit is None else canonical[:limit]
    return hashlib.sha256(hashed).digest(), len(canonical)


def streamed(body: bytes, canon: str, cuts: list[int], limit: int | None = None) -> BodyHash:
    h = BodyHash(canon, "sha256", limit)
    points = sorted({c % (len(body) + 1) for c in cuts}) + [len(body)]
    start = 0
    for p in points:
        h.update(body[start:p])
        start = p
    h.digest()
    return h


BODY_BYTES = st.lists(st.sampled_from([b"a", b"b c", b" ", b"\t", b"\r\n", b"\n", b"\r",
                                       b"  \r\n", b"x\t \r\n", b"."]),
                      max_size=40).map(b"".join)  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(body=BODY_BYTES, canon=st.sampled_from(["simple", "relaxed"]),
       cuts=st.lists(st.integers(min_value=0, max_value=500), max_size=6),
       limit=st.one_of(st.none(), st.integers(min_value=0, max_value=60)))  # fmt: skip
def test_streaming_equals_dkimpy_for_any_body_and_chunking(body: bytes, canon: str,
                                                           cuts: list[int],
                                                           limit: int | None) -> None:  # fmt: skip
    h = streamed(body, canon, cuts, limit)
    digest, length = reference(body, canon, limit)
    assert (h.digest(), h.length) == (digest, length)


@pytest.mark.parametrize("canon,body,canonical", [
    ("simple", b"", b"\r\n"),
    ("relaxed", b"", b""),
    ("simple", b"\r\n\r\n", b"\r\n"),
    ("relaxed", b"a  b \t\r\n\r\n\r\n", b"a b\r\n"),
    ("simple", b"a  b \r\n\r\nc\r\n\r\n", b"a  b \r\n\r\nc\r\n"),
    ("relaxed", b"  \r\n\t\r\nx\r\n", b"\r\n\r\nx\r\n"),
])  # fmt: skip
def test_rfc6376_examples(canon: str, body: bytes, canonical: bytes) -> None:
    h = BodyHash(canon, "sha256")
    h.update(body)
    assert (h.digest(), h.length) == (hashlib.sha256(canonical).digest(), len(canonical))


def test_fifty_megabytes_stream_in_bounded_memory() -> None:
    import tracemalloc

    chunk = (b"x" * 998 + b"\r\n") * 64  # 64 KiB, the size Postfix sends body chunks in
    h = BodyHashes([("relaxed", "sha256", None), ("simple", "sha256", None)])
    tracemalloc.start()
    for _ in range((50 << 20) // len(chunk)):
        h.update(chunk)
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2 << 20, f"peak {peak} bytes while hashing 50 MB"
    assert h.canonical_length("simple") == (50 << 20) // len(chunk) * len(chunk)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        BodyHash("loose", "sha256")
    with pytest.raises(ValueError):
        BodyHash("simple", "md5")
    h = BodyHash("simple", "sha256")
    h.digest()
    with pytest.raises(RuntimeError):
        h.update(b"late")
