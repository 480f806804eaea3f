"""DKIM body hashes computed as the body streams in (RFC 6376 §3.4.3, §3.4.4, §3.7).

The milter never holds a message body: each chunk is canonicalized and hashed on arrival, so a
50 MB message costs the same memory as a 5 KB one. The output is byte-for-byte what dkimpy's
``CanonicalizationPolicy.canonicalize_body`` gives for the whole body (a property test checks
it), including its treatment of bare LF (taken as CRLF) and of a last line without CRLF.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

_WSP_RUN = re.compile(rb"[\t ]+")
_HASHES = {"sha256": hashlib.sha256, "sha1": hashlib.sha1}


def _trailing_crlfs(text: bytes) -> int:
    """How many CRLF pairs end ``text``."""
    end = len(text)
    while end >= 2 and text[end - 2 : end] == b"\r\n":
        end -= 2
    return (len(text) - end) // 2


class BodyHash:
    """One canonicalization (``simple``/``relaxed``) feeding one hash, with optional ``l=``.

    :raises ValueError: an unknown canonicalization or hash name, or a negative limit.
    """

    def __init__(self, canon: str, hash_name: str, limit: int | None = None) -> None:
        if canon not in ("simple", "relaxed"):
            raise ValueError(f"unknown body canonicalization {canon!r}")
        if hash_name not in _HASHES:
            raise ValueError(f"unknown hash {hash_name!r}")
        if limit is not None and limit < 0:
            raise ValueError(f"negative body length limit {limit}")
        self.canon = canon
        self.hash_name = hash_name
        self.limit = limit
        self._hash = _HASHES[hash_name]()
        self._relaxed = canon == "relaxed"
        self._held: list[bytes] = []  # text after the last LF, in the pieces it came in
        self._empty = 0  # empty lines held back: dropped if nothing follows them
        self._any = False  # a non-empty line was emitted
        self.length = 0  # canonical octets so far (all of them, not only up to l=)
        self._digest: bytes | None = None

    def _emit(self, data: bytes) -> None:
        if self.limit is None:
            self._hash.update(data)
        elif self.length < self.limit:
            self._hash.update(data[: self.limit - self.length])
        self.length += len(data)

    def _line(self, content: bytes, terminated: bool) -> None:
        if self._relaxed:
            if terminated:
                content = content.rstrip(b" \t")
            content = _WSP_RUN.sub(b" ", content)
        if not content and terminated:
            self._empty += 1
            return
        self._emit(b"\r\n" * self._empty + content + b"\r\n")
        self._empty = 0
        self._any = True

    def update(self, chunk: bytes) -> None:
        """Feed the next piece of the body, as it came (CRLF or bare LF line ends).

        The complete lines of a chunk are canonicalized together with a few regular
        expressions (C speed); only the empty lines at its end are held back.
        """
        if self._digest is not None:
            raise RuntimeError("body hash already finished")
        if not chunk:
            return
        if b"\n" not in chunk:
            # A line longer than a chunk: keep the pieces, join once its LF comes (joining and
            # searching the whole held line on every chunk would be quadratic).
            self._held.append(chunk)
            return
        data = b"".join([*self._held, chunk]) if self._held else chunk
        cut = data.rfind(b"\n") + 1
        self._held = [data[cut:]] if cut < len(data) else []
        text = data[:cut]  # the whole of data (no copy) when it ends with a line end
        # Bare LF counts as CRLF (as dkimpy); bytes.replace runs at C speed, re.sub does not.
        # Mail from an MTA has none: counting (no copy) spares two copies of every chunk.
        if text.count(b"\n") != text.count(b"\r\n"):
            text = text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if self._relaxed:
            # RFC 6376 §3.4.4: WSP runs become one SP, WSP before CRLF goes; with bytes
            # methods: tabs to spaces, halve double spaces until none, drop " " before CRLF.
            text = text.replace(b"\t", b" ")
            while b"  " in text:
                text = text.replace(b"  ", b" ")
            text = text.replace(b" \r\n", b"\r\n")
        pairs = _trailing_crlfs(text)
        if pairs * 2 == len(text):  # only empty lines: hold them all back
            self._empty += pairs
            return
        # The last non-empty line keeps its CRLF; the empty lines after it wait.
        if pairs > 1:
            text = text[: len(text) - 2 * (pairs - 1)]
        if self._empty:
            self._emit(b"\r\n" * self._empty)
        self._emit(text)
        self._empty = pairs - 1
        self._any = True

    def digest(self) -> bytes:
        """Finish (once) and return the hash of the canonical body."""
        if self._digest is None:
            if self._held:
                self._line(b"".join(self._held), False)
                self._held = []
            if not self._any and not self._relaxed:
                # RFC 6376 §3.4.3: an empty body is canonicalized as a single CRLF.
                self._emit(b"\r\n")
            self._digest = self._hash.digest()
        return self._digest


class BodyHashes:
    """Several body hashes fed from one stream of chunks (one per signature or key)."""

    def __init__(self, specs: Iterable[tuple[str, str, int | None]] = ()) -> None:
        self._by_spec: dict[tuple[str, str, int | None], BodyHash] = {}
        for spec in specs:
            self.add(*spec)

    def add(self, canon: str, hash_name: str, limit: int | None = None) -> BodyHash:
        """The hash for this (canonicalization, hash, l=) combination, made once."""
        key = (canon, hash_name, limit)
        if key not in self._by_spec:
            self._by_spec[key] = BodyHash(canon, hash_name, limit)
        return self._by_spec[key]

    def update(self, chunk: bytes) -> None:
        """Feed a chunk to every hash."""
        for h in self._by_spec.values():
            h.update(chunk)

    def get(self, canon: str, hash_name: str, limit: int | None = None) -> BodyHash | None:
        """The hash for that combination, if it was planned."""
        return self._by_spec.get((canon, hash_name, limit))

    def canonical_length(self, canon: str) -> int | None:
        """The full canonical body length under ``canon``, from any finished hash of it."""
        for (c, _h, _l), bh in self._by_spec.items():
            if c == canon:
                bh.digest()
                return bh.length
        return None
