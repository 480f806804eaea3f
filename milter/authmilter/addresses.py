"""The RFC 5322.From author: a strict mailbox-list parser and domain normalization.

:func:`author_domain` finds the author domain of a message in the values of its From fields,
as DMARC evaluates it (RFC 7489 §6.6.1); :func:`normalize_domain` gives a domain the form DMARC
compares (lowercase A-labels, no trailing dot). DMARC evaluates the domain found here, and the
same parse chooses the DKIM signing key (:meth:`authmilter.pipeline.Transaction.author_address`)
and the signatures worth verifying (``dkim_verify``), so all three see one author.

The parser is our own, a recursive descent over RFC 5322 §3.4 ``address-list`` (RFC 6854 group
syntax, RFC 6532 UTF-8), on purpose. The standard library has two parsers and neither will do:

* ``email.utils.getaddresses``/``parseaddr`` guess rather than refuse: ``a@evil.test
  (x).example.com`` comes back as ``a@evil.test.example.com`` and ``alice@example.org)<bob@
  example.org>`` as two addresses (CVE-2023-27043: its ``strict=True`` only came with Python
  3.13 and the 2024 security releases), and nested comments end in ``RecursionError``.
* ``email.headerregistry`` (``_header_value_parser``) accepts the same obsolete and broken
  syntax, turning it into "defects" next to an address it made up (``a@ex ample.com`` gives the
  domain ``ex``); its result would have to be second-guessed defect by defect. It recurses on
  nested comments too, so a hostile From raises ``RecursionError``.

OpenDMARC's CVEs came from lenient address parsing as well. So anything ambiguous here is
``UNPARSEABLE``, never a guess, and no input raises.
"""

from __future__ import annotations

import encodings.idna
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["AuthorDomain", "FromStatus", "author_domain", "normalize_domain"]


class FromStatus(StrEnum):
    """How usable the From field(s) of a message are for DMARC."""

    OK = "ok"
    ABSENT = "absent"  # no From field, or one that holds only an empty group
    MULTIPLE_FIELDS = "multiple-fields"
    MULTIPLE_DOMAINS = "multiple-domains"
    UNPARSEABLE = "unparseable"


@dataclass(frozen=True, slots=True)
class AuthorDomain:
    """The author domain of a message, or why there is none.

    ``domain`` is set only for ``OK``: lowercase, A-labels, no trailing dot. ``addresses`` are
    the mailboxes found (``local@domain``, the local part as written, the domain normalized);
    empty unless the field parsed. ``detail`` says what was found or what is wrong.
    """

    status: FromStatus
    domain: str | None
    addresses: tuple[str, ...]
    detail: str


class _FromSyntaxError(Exception):
    """Internal: the From value is not a valid RFC 5322 mailbox list."""


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "atom", "qstr", "dlit", or a special character: < > @ , ; : .
    text: str
    space_before: bool  # white space or a comment precedes the token
    pos: int


_SPECIALS = frozenset("<>@,;:.")
_ATEXT_ASCII = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
_UNFOLD = re.compile(r"\r\n(?=[ \t])")


def _is_atext(ch: str) -> bool:
    # RFC 5322 §3.2.3 atext, plus any non-ASCII character (RFC 6532 §3.2 UTF8-non-ascii).
    return ch in _ATEXT_ASCII or ord(ch) > 0x7F


def _skip_bracketed(text: str, start: int, opener: str, closer: str, *, nest: bool) -> int:
    """Return the index after the ``closer`` matching ``text[start] == opener``."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            if i + 1 >= len(text):
                break
            i += 2
            continue
        if ord(ch) < 0x20 and ch != "\t" or ch == "\x7f":
            raise _FromSyntaxError(f"control character {ch!r} at offset {i}")
        if ch == opener and (nest or i == start):
            depth += 1
        elif ch == opener and not nest:
            raise _FromSyntaxError(f"{opener!r} inside {opener}{closer} at offset {i}")
        elif ch == closer:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise _FromSyntaxError(f"unbalanced {opener!r} at offset {start}")


def _tokenize(text: str) -> list[_Token]:
    """Split an unfolded header value into RFC 5322 lexical tokens, dropping CFWS.

    :raises _FromSyntaxError: unbalanced quotes, comments, brackets; stray backslashes or
        control characters.
    """
    tokens: list[_Token] = []
    space = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in " \t":
            space = True
            i += 1
        elif ch == "(":
            i = _skip_bracketed(text, i, "(", ")", nest=True)
            space = True
        elif ch == '"':
            j = i + 1
            while j < len(text) and text[j] != '"':
                if text[j] == "\\":
                    j += 1
                elif ord(text[j]) < 0x20 and text[j] != "\t" or text[j] == "\x7f":
                    raise _FromSyntaxError(f"control character {text[j]!r} at offset {j}")
                j += 1
            if j >= len(text):
                raise _FromSyntaxError(f"unbalanced '\"' at offset {i}")
            tokens.append(_Token("qstr", text[i : j + 1], space, i))
            space = False
            i = j + 1
        elif ch == "[":
            j = _skip_bracketed(text, i, "[", "]", nest=False)
            tokens.append(_Token("dlit", text[i:j], space, i))
            space = False
            i = j
        elif ch in ")]":
            raise _FromSyntaxError(f"unbalanced {ch!r} at offset {i}")
        elif ch == "\\":
            raise _FromSyntaxError(f"backslash outside a quoted string at offset {i}")
        elif ch in _SPECIALS:
            tokens.append(_Token(ch, ch, space, i))
            space = False
            i += 1
        elif _is_atext(ch):
            j = i
            while j < len(text) and _is_atext(text[j]):
                j += 1
            tokens.append(_Token("atom", text[i:j], space, i))
            space = False
            i = j
        else:
            raise _FromSyntaxError(f"control character {ch!r} at offset {i}")
    return tokens


_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


def _normalize_label(label: str) -> str:
    """One domain label as a lowercase A-label.

    A U-label must already be in IDNA normal form: it must come back unchanged (but for case)
    from ToASCII + ToUnicode, so that the domain evaluated is the one written. IDNA 2003
    (Python's ``encodings.idna``) is what the standard library offers.

    :raises ValueError: not a valid LDH label, A-label or U-label.
    """
    if label.isascii():
        ascii_label = label.lower()
        if ascii_label.startswith("xn--"):
            try:
                unicode_label = encodings.idna.ToUnicode(ascii_label)
                if encodings.idna.ToASCII(unicode_label).decode("ascii") != ascii_label:
                    raise ValueError(f"{label!r} is not a valid A-label")
            except UnicodeError:
                raise ValueError(f"{label!r} is not a valid A-label") from None
    else:
        try:
            ascii_label = encodings.idna.ToASCII(label).decode("ascii").lower()
            back = encodings.idna.ToUnicode(ascii_label)
        except UnicodeError as exc:
            raise ValueError(f"{label!r} is not a valid U-label ({exc})") from None
        if back != label.lower():
            raise ValueError(f"{label!r} is not in IDNA normal form (it maps to {back!r})")
    if not _LDH_LABEL.match(ascii_label):
        raise ValueError(f"{label!r} is not a valid host name label")
    return ascii_label


def normalize_domain(domain: str) -> str:
    """Return ``domain`` as DMARC compares it: lowercase A-labels, no trailing dot.

    RFC 7489 §6.6.1: a U-label is converted to an A-label. One trailing dot (an absolute name)
    is dropped. Labels must be host name labels (letters, digits, inner hyphens); the top
    label must not be all-numeric (RFC 3696 §2), so a bare IPv4 address is no domain.

    :raises ValueError: empty, too long, an empty label, or a label that is not a host name
        label.
    """
    name = domain[:-1] if domain.endswith(".") else domain
    if not name:
        raise ValueError("empty domain")
    labels = name.split(".")
    if any(not label for label in labels):
        raise ValueError(f"{domain!r} has an empty label")
    result = ".".join(_normalize_label(label) for label in labels)
    if len(result) > 253:
        raise ValueError(f"{domain!r} is longer than 253 characters")
    if labels[-1].isdigit():
        raise ValueError(f"{domain!r}: the top-level label is all-numeric")
    return result


class _MailboxParser:
    """Recursive descent over the tokens of an RFC 5322 address list (RFC 6854 for From)."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.i = 0
        self.groups = 0

    def peek(self) -> _Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def peek_is(self, kind: str) -> bool:
        tok = self.peek()
        return tok is not None and tok.kind == kind

    def take(self) -> _Token:
        tok = self.peek()
        if tok is None:
            raise _FromSyntaxError("unexpected end of the field")
        self.i += 1
        return tok

    @staticmethod
    def unexpected(tok: _Token | None, what: str) -> _FromSyntaxError:
        if tok is None:
            return _FromSyntaxError(f"{what}, found the end of the field")
        return _FromSyntaxError(f"{what}, found {tok.text!r} at offset {tok.pos}")

    def address_list(self) -> list[tuple[str, str, bool]]:
        """``address-list`` with RFC 5322 §4.4 empty elements; returns (local, domain, dot)."""
        mailboxes: list[tuple[str, str, bool]] = []
        while True:
            while self.peek_is(","):
                self.i += 1
            if self.peek() is None:
                return mailboxes
            mailboxes += self.address(in_group=False)
            tok = self.peek()
            if tok is None:
                return mailboxes
            if tok.kind != ",":
                raise self.unexpected(tok, "expected ',' or the end after a mailbox")
            self.i += 1

    def phrase(self) -> list[_Token]:
        words: list[_Token] = []
        while (tok := self.peek()) is not None and tok.kind in ("atom", "qstr", "."):
            words.append(tok)
            self.i += 1
        return words

    def address(self, *, in_group: bool) -> list[tuple[str, str, bool]]:
        start = self.i
        words = self.phrase()
        tok = self.peek()
        if tok is not None and tok.kind == ":":
            if in_group:
                raise self.unexpected(tok, "a group cannot hold a group")
            if not words:
                raise self.unexpected(tok, "a group needs a display name")
            self.check_display_name(words)
            self.i += 1
            self.groups += 1
            return self.group_rest()
        if tok is not None and tok.kind == "<":
            self.check_display_name(words)
            self.i += 1
            mailbox = self.angle_addr_rest()
            return [mailbox]
        if tok is not None and tok.kind == "@":
            self.i = start
            return [self.addr_spec()]
        if words:
            raise self.unexpected(tok, "expected '@', '<' or ':' after a word (no address)")
        raise self.unexpected(tok, "expected a mailbox")

    def check_display_name(self, words: list[_Token]) -> None:
        # RFC 5322 §3.2.5 phrase / §4.1 obs-phrase: the first element must be a word.
        if words and words[0].kind == ".":
            raise self.unexpected(words[0], "a display name starts with a word")

    def group_rest(self) -> list[tuple[str, str, bool]]:
        mailboxes: list[tuple[str, str, bool]] = []
        while True:
            while self.peek_is(","):
                self.i += 1
            tok = self.peek()
            if tok is None:
                raise _FromSyntaxError("group not closed by ';'")
            if tok.kind == ";":
                self.i += 1
                return mailboxes
            mailboxes += self.address(in_group=True)
            tok = self.peek()
            if tok is not None and tok.kind == ",":
                self.i += 1
            elif tok is not None and tok.kind == ";":
                continue
            else:
                raise self.unexpected(tok, "expected ',' or ';' in a group")

    def angle_addr_rest(self) -> tuple[str, str, bool]:
        # RFC 5322 §4.4 obs-route: "<@relay,@relay2:local@domain>"; the route is dropped.
        if self.peek_is("@") or self.peek_is(","):
            while True:
                while self.peek_is(","):
                    self.i += 1
                if self.peek_is("@"):
                    self.i += 1
                    self.domain(allow_literal=True)
                tok = self.peek()
                if tok is not None and tok.kind == ",":
                    continue
                if tok is not None and tok.kind == ":":
                    self.i += 1
                    break
                raise self.unexpected(tok, "expected ',' or ':' in a source route")
        mailbox = self.addr_spec()
        tok = self.peek()
        if tok is None or tok.kind != ">":
            raise self.unexpected(tok, "expected '>' to close '<'")
        self.i += 1
        return mailbox

    def addr_spec(self) -> tuple[str, str, bool]:
        """``local-part "@" domain``; no CFWS inside the local part or the domain."""
        parts: list[str] = []
        first = True
        while True:
            tok = self.peek()
            if tok is None or tok.kind not in ("atom", "qstr"):
                raise self.unexpected(tok, "expected a local part")
            if not first and tok.space_before:
                raise self.unexpected(tok, "white space or a comment inside a local part")
            parts.append(tok.text)
            self.i += 1
            nxt = self.peek()
            if nxt is not None and nxt.kind == ".":
                if nxt.space_before:
                    raise self.unexpected(nxt, "white space or a comment inside a local part")
                parts.append(".")
                self.i += 1
                first = False
                continue
            break
        local = "".join(parts)
        if local == '""':
            raise _FromSyntaxError("empty local part")
        tok = self.peek()
        if tok is None or tok.kind != "@":
            raise self.unexpected(tok, f"expected '@' after {local!r} (no address)")
        self.i += 1
        domain, trailing_dot = self.domain(allow_literal=False)
        return local, domain, trailing_dot

    def domain(self, *, allow_literal: bool) -> tuple[str, bool]:
        tok = self.peek()
        if tok is not None and tok.kind == "dlit":
            if not allow_literal:
                raise _FromSyntaxError(
                    f"address literal {tok.text} at offset {tok.pos}: no domain to evaluate"
                )
            self.i += 1
            return tok.text, False
        if tok is None or tok.kind != "atom":
            raise self.unexpected(tok, "expected a domain after '@'")
        labels = [tok.text]
        self.i += 1
        trailing_dot = False
        while self.peek_is("."):
            dot = self.take()
            if dot.space_before:
                raise self.unexpected(dot, "white space or a comment inside a domain")
            nxt = self.peek()
            if nxt is not None and nxt.kind == "atom" and not nxt.space_before:
                labels.append(nxt.text)
                self.i += 1
                continue
            if nxt is not None and nxt.kind == ".":
                raise self.unexpected(nxt, "empty label in a domain")
            if nxt is not None and nxt.kind == "atom":
                raise self.unexpected(nxt, "white space or a comment inside a domain")
            trailing_dot = True  # an absolute name, "a@example.com."
            break
        return ".".join(labels), trailing_dot


def _parse_mailboxes(value: str) -> list[tuple[str, str, bool]]:
    """Parse one From value into ``(local, domain, trailing_dot)`` tuples.

    An empty list is returned only for a field made of empty groups.

    :raises _FromSyntaxError: the value is not a valid address list, or holds nothing.
    """
    parser = _MailboxParser(_tokenize(_UNFOLD.sub("", value)))
    mailboxes = parser.address_list()
    if not mailboxes and not parser.groups:
        raise _FromSyntaxError("no mailbox in the field" if value.strip() else "empty field")
    return mailboxes


def author_domain(values: Sequence[str]) -> AuthorDomain:
    """Find the author domain in the unfolded values of every From field of a message.

    RFC 7489 §6.6.1: DMARC needs exactly one From field holding one domain. One field with
    several mailboxes of the same domain is ``OK``; of several domains ``MULTIPLE_DOMAINS``.
    Group syntax (RFC 6854) is read; an empty group gives ``ABSENT``. Comments, quoted and
    RFC 2047-encoded display names are skipped without being decoded, so an encoded word can
    never produce an address. CFWS around ``@`` is accepted (RFC 5322 §3.4.1), but not inside
    a local part or domain (obsolete syntax, and a known spoofing vector): ``UNPARSEABLE``.
    Address literals, U-labels not in IDNA normal form and anything unbalanced are
    ``UNPARSEABLE`` too. Never raises.
    """
    if not values:
        return AuthorDomain(FromStatus.ABSENT, None, (), "no From field")
    if len(values) > 1:
        return AuthorDomain(
            FromStatus.MULTIPLE_FIELDS, None, (), f"{len(values)} From fields (RFC 5322 §3.6)"
        )
    value = values[0]
    try:
        mailboxes = _parse_mailboxes(value)
    except _FromSyntaxError as exc:
        return AuthorDomain(FromStatus.UNPARSEABLE, None, (), f"From: {exc}")
    if not mailboxes:
        return AuthorDomain(FromStatus.ABSENT, None, (), "From holds only an empty group")
    addresses: list[str] = []
    domains: list[str] = []
    notes: list[str] = []
    for local, raw_domain, trailing_dot in mailboxes:
        try:
            domain = normalize_domain(raw_domain)
        except ValueError as exc:
            return AuthorDomain(FromStatus.UNPARSEABLE, None, (), f"From: {exc}")
        if trailing_dot:
            notes.append(f"trailing dot after {raw_domain!r} dropped")
        addresses.append(f"{local}@{domain}")
        if domain not in domains:
            domains.append(domain)
    extra = f" ({'; '.join(notes)})" if notes else ""
    if len(domains) > 1:
        return AuthorDomain(
            FromStatus.MULTIPLE_DOMAINS,
            None,
            tuple(addresses),
            f"From holds mailboxes of {len(domains)} domains: {', '.join(domains)}{extra}",
        )
    return AuthorDomain(
        FromStatus.OK,
        domains[0],
        tuple(addresses),
        f"{len(addresses)} mailbox{'es' if len(addresses) > 1 else ''}{extra}",
    )
