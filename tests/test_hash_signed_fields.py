"""dkim_verify.hash_signed_fields hashes exactly what dkimpy's hash_headers hashes."""

from __future__ import annotations

import hashlib

import dkim
from dkim.canonicalization import CanonicalizationPolicy
from hypothesis import given, settings
from hypothesis import strategies as st

from authmilter.dkim_verify import hash_signed_fields

NAMES = [b"From", b"from", b"FROM ", b"To", b"Subject", b"Date", b"X-List", b"Received"]
VALUES = st.sampled_from([
    b" a@example.com\r\n", b"\ta@example.com \r\n", b" folded\r\n\tvalue  here\r\n",
    b"  two  spaces\t\r\n", b"\r\n", b" x\n y\r\n", b" trailing \t \r\n",
])  # fmt: skip
SIG = (b"DKIM-Signature", b" v=1; a=rsa-sha256; d=example.com; s=s;\r\n\th=from:to:subject;"
       b" bh=abc=; b=dGhpcyBpcyBub3QgYSBzaWduYXR1cmU=\r\n ;  \r\n")  # fmt: skip


def reference(policy: CanonicalizationPolicy, headers: list[tuple[bytes, bytes]],
              include: list[bytes]) -> bytes:  # fmt: skip
    hasher = hashlib.sha256()
    dkim.hash_headers(hasher, policy, policy.canonicalize_headers(headers), include, SIG, None)
    return hasher.digest()


@settings(max_examples=300, deadline=None)
@given(
    headers=st.lists(st.tuples(st.sampled_from(NAMES), VALUES), max_size=12),
    include=st.lists(st.sampled_from([b"from", b"to", b"subject", b"date", b"x-list",
                                      b"missing"]), max_size=8),  # fmt: skip
    canon=st.sampled_from([b"simple/simple", b"relaxed/simple", b"relaxed/relaxed",
                           b"simple/relaxed"]),  # fmt: skip
)
def test_the_same_bytes_as_dkimpy_for_any_header_and_h_list(
    headers: list[tuple[bytes, bytes]], include: list[bytes], canon: bytes
) -> None:
    policy = CanonicalizationPolicy.from_c_value(canon)
    hasher = hashlib.sha256()
    hash_signed_fields(hasher, policy, headers + [SIG], include, SIG)
    assert hasher.digest() == reference(policy, headers + [SIG], include)


def test_duplicates_are_taken_bottom_up_and_a_name_with_trailing_space_counts_in_relaxed() -> None:
    headers = [(b"From", b" first\r\n"), (b"Subject", b" s\r\n"), (b"FROM ", b" second\r\n")]
    fed: list[bytes] = []

    class Recorder:
        def update(self, data: bytes, /) -> None:
            fed.append(data)

    relaxed = CanonicalizationPolicy.from_c_value(b"relaxed/simple")
    hash_signed_fields(Recorder(), relaxed, headers, [b"from", b"from"], SIG)
    assert b"".join(fed).startswith(b"from:second\r\nfrom:first\r\ndkim-signature:")
    fed.clear()
    simple = CanonicalizationPolicy.from_c_value(b"simple/simple")
    hash_signed_fields(Recorder(), simple, headers, [b"from", b"from"], SIG)
    # simple keeps names as they are: "FROM " is not "from", so only the first From is signed
    assert b"".join(fed).startswith(b"From: first\r\nDKIM-Signature:")
