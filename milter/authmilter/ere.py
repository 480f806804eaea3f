"""POSIX extended regular expressions as glibc reads them, for OpenDKIM's ``refile:`` host lists.

opendkim-db.c (DKIMF_DB_TYPE_REFILE) hands each pattern to util.c dkimf_mkregexp(), which writes
"^", the pattern with "*" turned into ".*" and "." and "+" backslash-escaped, and "$"; the result
goes to glibc's regcomp() with REG_EXTENDED | REG_ICASE, in the C locale (OpenDKIM never calls
setlocale()). Everything else is live POSIX extended regular-expression syntax, so a pattern means
here what it means to OpenDKIM only if it is read as glibc reads it.

Why by hand: Python's ``re`` is not POSIX (bracket expressions, character classes, what is an
error), no maintained Python library implements glibc's ERE dialect, and calling regcomp()
through ctypes would follow the process locale that Python sets at start, not OpenDKIM's "C".
:class:`EreParser` reads the expression exactly as glibc's posix/regcomp.c does
(RE_SYNTAX_POSIX_EXTENDED | RE_ICASE, byte-wise), failing where regcomp() fails; the result is
matched with Python's ``re`` or, where backtracking could take exponential time on a host name an
attacker chooses, with :class:`BitMatcher`. tests/test_datasets.py cross-checks both against the
real regcomp()/regexec() through ctypes.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, TypeAlias

__all__ = [
    "Alt",
    "BitMatcher",
    "EreParser",
    "Node",
    "RefilePattern",
    "RegexError",
    "as_bytes",
    "mkregexp",
    "python_regex",
    "subject",
]

# C isspace() in the "C" locale.
_WS: Final = " \t\n\v\f\r"

class RegexError(ValueError):
    """glibc's ``regcomp()`` refuses the expression; ``code`` is its ``REG_*`` error number."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(_REG_ERRORS[code])


# glibc's regerror() texts by REG_* code (posix/regcomp.c __re_error_msgid).
_REG_ERRORS: Final = {
    2: "Invalid regular expression",
    3: "Invalid collation character",
    4: "Invalid character class name",
    5: "Trailing backslash",
    6: "Invalid back reference",
    7: "Unmatched [, [^, [:, [., or [=",
    8: "Unmatched ( or \\(",
    9: "Unmatched \\{",
    10: "Invalid content of \\{\\}",
    11: "Invalid range end",
    13: "Invalid preceding regular expression",
    15: "Regular expression too big",
}
_REG_BADPAT, _REG_ECOLLATE, _REG_ECTYPE, _REG_EESCAPE, _REG_ESUBREG, _REG_EBRACK = 2, 3, 4, 5, 6, 7
_REG_EPAREN, _REG_EBRACE, _REG_BADBR, _REG_ERANGE, _REG_BADRPT, _REG_ESIZE = 8, 9, 10, 11, 13, 15
#: glibc's RE_DUP_MAX: the largest count an interval {m,n} may name.
_RE_DUP_MAX: Final = 0x7FFF
#: glibc's BRACKET_NAME_BUF_SIZE: a [:class:], [=x=] or [.x.] name must be shorter.
_BRACKET_NAME_MAX: Final = 32


def _byte_class(test: str) -> frozenset[int]:
    """The bytes a C-locale ``<ctype.h>`` class holds (ASCII only, as in glibc's "C" locale)."""
    return frozenset(b for b in range(128) if _CTYPE[test](chr(b)))


_CTYPE: Final[dict[str, Callable[[str], bool]]] = {
    "alnum": lambda c: c.isalnum(),
    "alpha": lambda c: c.isalpha(),
    "blank": lambda c: c in " \t",
    "cntrl": lambda c: ord(c) < 32 or ord(c) == 127,
    "digit": lambda c: c.isdigit(),
    "graph": lambda c: 32 < ord(c) < 127,
    "lower": lambda c: c.islower(),
    "print": lambda c: 32 <= ord(c) < 127,
    "punct": lambda c: 32 < ord(c) < 127 and not c.isalnum(),
    "space": lambda c: c in _WS,
    "upper": lambda c: c.isupper(),
    "xdigit": lambda c: c in string.hexdigits,
}
_ALL_BYTES: Final = frozenset(range(256))
_WORD_BYTES: Final = _byte_class("alnum") | {ord("_")}


@dataclass(frozen=True, slots=True)
class _Set:
    """One byte out of ``chars`` (a literal, ``.``, a bracket expression, ``\\w`` …)."""

    chars: frozenset[int]


@dataclass(frozen=True, slots=True)
class _Cat:
    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Alt:
    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class _Rep:
    """``item`` repeated ``low`` to ``high`` times (``None``: no upper bound)."""

    item: Node
    low: int
    high: int | None


@dataclass(frozen=True, slots=True)
class _Group:
    """A parenthesized subexpression, number ``index`` (1-based) for back-references."""

    item: Node
    index: int


@dataclass(frozen=True, slots=True)
class _Backref:
    index: int


@dataclass(frozen=True, slots=True)
class _Anchor:
    """A zero-width assertion: ``^ $`` (start/end of the string), ``< > b B`` (word edges)."""

    kind: str


Node: TypeAlias = _Set | _Cat | Alt | _Rep | _Group | _Backref | _Anchor
_EMPTY: Final[Node] = _Cat(())
_DOT: Final = _Set(_ALL_BYTES - {0})  # RE_DOT_NEWLINE, RE_DOT_NOT_NULL
_CLASS_ESCAPES: Final = {
    ord("w"): _Set(_WORD_BYTES),
    ord("W"): _Set(_ALL_BYTES - _WORD_BYTES),
    ord("s"): _Set(_byte_class("space")),
    ord("S"): _Set(_ALL_BYTES - _byte_class("space")),
}
# glibc peek_token(): "\" + these is an anchor; "^" and "$" are anchors anywhere in an ERE.
_ANCHOR_ESCAPES: Final = {ord("<"): "<", ord(">"): ">", ord("b"): "b", ord("B"): "B",
                          ord("`"): "^", ord("'"): "$"}  # fmt: skip
_OPERATORS: Final = {ord("|"): "alt", ord("*"): "dup", ord("+"): "dup", ord("?"): "dup",
                     ord("{"): "open_dup", ord("}"): "close_dup", ord("("): "open",
                     ord(")"): "close", ord("["): "bracket", ord("."): "period",
                     ord("^"): "anchor", ord("$"): "anchor"}  # fmt: skip
_Token: TypeAlias = tuple[str, int, int]  # kind, byte, length


def mkregexp(pattern: bytes) -> bytes:
    """``dkimf_mkregexp()``: anchor, ``*`` → ``.*``, escape ``.`` and ``+``, keep the rest."""
    body = pattern.replace(b".", b"\\.").replace(b"+", b"\\+").replace(b"*", b".*")
    return b"^" + body + b"$"


class EreParser:
    """glibc ``regcomp()`` with ``REG_EXTENDED | REG_ICASE`` in the C locale, as a parse tree.

    Follows posix/regcomp.c (``peek_token``, ``parse_reg_exp`` … ``parse_bracket_exp``) with
    the syntax bits of ``RE_SYNTAX_POSIX_EXTENDED``: anchors anywhere, ``?``/``{`` at the start
    of an expression is an error, an unmatched ``)`` is literal, ``\\1``–``\\9`` refer back,
    GNU ``\\w \\W \\s \\S \\b \\B \\< \\> \\` \\'`` are live, any other ``\\c`` is ``c``, and a
    backslash is literal inside brackets. With ``REG_ICASE`` glibc upper-cases the pattern —
    except a character after a backslash and the name in ``[:name:]`` — and every subject, so
    :meth:`parse`'s tree must be matched against the ASCII-upper-cased subject.
    """

    def __init__(self, regex: bytes) -> None:
        self._raw = regex
        self._up = regex.upper()  # bytes.upper(): ASCII only, like toupper() in the C locale
        self._pos = 0
        self._kind, self._c, self._size = "end", 0, 0
        self._groups = 0
        self._completed = 0  # bit i: group i+1 is closed (glibc's completed_bkref_map)

    @classmethod
    def parse(cls, regex: bytes) -> Node:
        """Parse ``regex``; :raises RegexError: where glibc's ``regcomp()`` fails."""
        parser = cls(regex)
        parser._fetch()
        return parser._reg_exp(0)

    def _peek(self) -> _Token:
        if self._pos >= len(self._raw):
            return "end", 0, 0
        c = self._up[self._pos]
        if c == 0x5C:  # backslash
            if self._pos + 1 >= len(self._raw):
                return "backslash", c, 1
            c2 = self._raw[self._pos + 1]  # re_string_peek_byte_case(): not upper-cased
            if 0x31 <= c2 <= 0x39:
                return "backref", c2, 2
            if c2 in _ANCHOR_ESCAPES:
                return "anchor", ord(_ANCHOR_ESCAPES[c2]), 2
            if c2 in _CLASS_ESCAPES:
                return "class", c2, 2
            return "char", c2, 2
        return _OPERATORS.get(c, "char"), c, 1

    def _fetch(self) -> None:
        self._pos += self._size
        self._kind, self._c, self._size = self._peek()

    def _reg_exp(self, nest: int) -> Node:
        initial = self._completed
        branches = [self._branch(nest)]
        while self._kind == "alt":
            self._fetch()
            if self._kind not in ("alt", "end") and (nest == 0 or self._kind != "close"):
                accumulated = self._completed
                self._completed = initial  # a back-reference never reaches into another branch
                branches.append(self._branch(nest))
                self._completed |= accumulated
            else:
                branches.append(_EMPTY)
        return branches[0] if len(branches) == 1 else Alt(tuple(branches))

    def _branch(self, nest: int) -> Node:
        items = [self._expression()]
        while self._kind not in ("alt", "end") and (nest == 0 or self._kind != "close"):
            items.append(self._expression())
        return items[0] if len(items) == 1 else _Cat(tuple(items))

    def _expression(self) -> Node:
        kind, c = self._kind, self._c
        node: Node
        if kind in ("char", "close", "close_dup"):  # an unmatched ")" or "}" is literal
            node = _Set(frozenset({c}))
        elif kind == "open":
            node = self._sub_exp()
        elif kind == "bracket":
            node = self._bracket()
        elif kind == "backref":
            if not self._completed & (1 << (c - 0x31)):
                raise RegexError(_REG_ESUBREG)
            node = _Backref(c - 0x30)
        elif kind in ("dup", "open_dup"):  # RE_CONTEXT_INVALID_OPS
            raise RegexError(_REG_BADRPT)
        elif kind == "anchor":
            self._fetch()
            return _Anchor(chr(c))  # nothing may repeat an anchor: "^*" is an error
        elif kind == "period":
            node = _DOT
        elif kind == "class":
            node = _CLASS_ESCAPES[c]
        elif kind in ("alt", "end"):
            return _EMPTY
        else:
            raise RegexError(_REG_EESCAPE)
        self._fetch()
        while self._kind in ("dup", "open_dup"):
            node = self._dup(node)
        return node

    def _sub_exp(self) -> Node:
        index = self._groups
        self._groups += 1
        self._fetch()
        inner = _EMPTY
        if self._kind != "close":
            inner = self._reg_exp(1)
            if self._kind != "close":
                raise RegexError(_REG_EPAREN)
        if index < 9:
            self._completed |= 1 << index
        return _Group(inner, index + 1)

    def _number(self) -> int:
        """glibc ``fetch_number()``: -1 for no digits, -2 for anything else, capped."""
        num = -1
        while True:
            self._fetch()
            if self._kind == "end":
                return -2
            if self._kind == "close_dup" or self._c == ord(","):
                return num
            if self._kind != "char" or not 0x30 <= self._c <= 0x39 or num == -2:
                num = -2
            else:
                num = min(_RE_DUP_MAX + 1, max(num, 0) * 10 + self._c - 0x30)

    def _dup(self, node: Node) -> Node:
        if self._kind == "open_dup":
            low = self._number()
            if low == -1:
                if self._kind != "char" or self._c != ord(","):
                    raise RegexError(_REG_BADBR)  # "{}"
                low = 0  # "{,n}" is "{0,n}"
            high = -2
            if low != -2:
                if self._kind == "close_dup":
                    high = low
                elif self._kind == "char" and self._c == ord(","):
                    high = self._number()
            if low == -2 or high == -2:
                raise RegexError(_REG_EBRACE if self._kind == "end" else _REG_BADBR)
            if (high != -1 and low > high) or self._kind != "close_dup":
                raise RegexError(_REG_BADBR)
            if (low if high == -1 else high) > _RE_DUP_MAX:
                raise RegexError(_REG_ESIZE)
        else:
            low = 1 if self._c == ord("+") else 0
            high = 1 if self._c == ord("?") else -1
        self._fetch()
        return _Rep(node, low, None if high == -1 else high)

    # -- bracket expressions (glibc parse_bracket_exp) --

    def _peek_bracket(self) -> _Token:
        if self._pos >= len(self._raw):
            return "end", 0, 0
        c = self._up[self._pos]
        if c == ord("["):
            c2 = self._up[self._pos + 1] if self._pos + 1 < len(self._raw) else 0
            kind = {ord("."): "coll", ord("="): "equiv", ord(":"): "ctype"}.get(c2)
            return ("char", c, 1) if kind is None else (kind, c2, 2)
        return {ord("-"): "range", ord("]"): "close", ord("^"): "hat"}.get(c, "char"), c, 1

    def _bracket(self) -> Node:
        self._pos += self._size
        self._size = 0
        kind, c, size = self._peek_bracket()
        if kind == "end":
            raise RegexError(_REG_BADPAT)
        negate = kind == "hat"
        if negate:
            self._pos += size
            kind, c, size = self._peek_bracket()
            if kind == "end":
                raise RegexError(_REG_BADPAT)
        if kind == "close":
            kind = "char"  # "]" first is an ordinary character
        chars: set[int] = set()
        first = True
        while True:
            start = self._bracket_element(kind, c, size, accept_hyphen=first)
            first = False
            kind, c, size = self._peek_bracket()
            end: tuple[str, bytes] | None = None
            if start[0] not in ("ctype", "equiv"):
                if kind == "end":
                    raise RegexError(_REG_EBRACK)
                if kind == "range":
                    self._pos += size
                    kind2, c2, size2 = self._peek_bracket()
                    if kind2 == "end":
                        raise RegexError(_REG_EBRACK)
                    if kind2 == "close":  # "-" last is an ordinary character
                        self._pos -= size
                        kind = "char"
                    else:
                        end = self._bracket_element(kind2, c2, size2, accept_hyphen=True)
                        kind, c, size = self._peek_bracket()
            chars |= self._bracket_single(*start) if end is None else self._range(start, end)
            if kind == "end":
                raise RegexError(_REG_EBRACK)
            if kind == "close":
                break
        self._size = size  # the "]": _expression()'s _fetch() steps over it
        return _Set(frozenset(_ALL_BYTES - chars if negate else chars))

    def _bracket_element(self, kind: str, c: int, size: int, *, accept_hyphen: bool
                         ) -> tuple[str, bytes]:  # fmt: skip
        self._pos += size
        if kind in ("coll", "equiv", "ctype"):
            return kind, self._bracket_name(kind, c)
        if kind == "range" and not accept_hyphen and self._peek_bracket()[0] != "close":
            raise RegexError(_REG_ERANGE)
        return "char", bytes([c])

    def _bracket_name(self, kind: str, delim: int) -> bytes:
        if self._pos >= len(self._raw):
            raise RegexError(_REG_EBRACK)
        source = self._raw if kind == "ctype" else self._up
        name = bytearray()
        while True:
            if len(name) >= _BRACKET_NAME_MAX:
                raise RegexError(_REG_EBRACK)
            ch = source[self._pos]
            self._pos += 1
            if self._pos >= len(self._raw):
                raise RegexError(_REG_EBRACK)
            if ch == delim and self._up[self._pos] == ord("]"):
                break
            name.append(ch)
        self._pos += 1
        return bytes(name)

    @staticmethod
    def _bracket_single(kind: str, value: bytes) -> frozenset[int]:
        if kind == "char":
            return frozenset(value)
        if kind == "ctype":
            name = value.decode("latin-1")
            if name in ("upper", "lower"):  # REG_ICASE: both mean alpha
                name = "alpha"
            if name not in _CTYPE:
                raise RegexError(_REG_ECTYPE)
            return _byte_class(name)
        if len(value) != 1:  # the C locale has single-byte collating elements only
            raise RegexError(_REG_ECOLLATE)
        return frozenset(value)

    @staticmethod
    def _range(start: tuple[str, bytes], end: tuple[str, bytes]) -> frozenset[int]:
        if start[0] in ("ctype", "equiv") or end[0] in ("ctype", "equiv"):
            raise RegexError(_REG_ERANGE)
        if len(start[1]) > 1 or len(end[1]) > 1:
            raise RegexError(_REG_ECOLLATE)
        low, high = (value[0] if value else 0 for _kind, value in (start, end))
        if low > high:
            raise RegexError(_REG_ERANGE)
        return frozenset(range(low, high + 1))


_WORD_CLASS: Final = "[0-9A-Za-z_]"
_ANCHOR_PYTHON: Final = {
    "^": r"\A",
    "$": r"\Z",
    "<": f"(?<!{_WORD_CLASS})(?={_WORD_CLASS})",
    ">": f"(?<={_WORD_CLASS})(?!{_WORD_CLASS})",
    "b": f"(?:(?<!{_WORD_CLASS})(?={_WORD_CLASS})|(?<={_WORD_CLASS})(?!{_WORD_CLASS}))",
    "B": f"(?:(?<={_WORD_CLASS})(?={_WORD_CLASS})|(?<!{_WORD_CLASS})(?!{_WORD_CLASS}))",
}


def _python_set(chars: frozenset[int]) -> str:
    """A Python bytes-regex atom for exactly ``chars``."""
    if not chars:
        return "(?!)"
    ordered = sorted(chars)
    if len(ordered) == 1:
        return f"\\x{ordered[0]:02x}"
    runs: list[str] = []
    start = prev = ordered[0]
    for c in [*ordered[1:], -1]:
        if c != prev + 1:
            runs.append(f"\\x{start:02x}" if start == prev else f"\\x{start:02x}-\\x{prev:02x}")
            start = c
        prev = c
    return "[" + "".join(runs) + "]"


def python_regex(node: Node, prefix: str) -> str:
    """Write the tree as a Python bytes regex; groups are named ``<prefix><n>``."""
    if isinstance(node, _Set):
        return _python_set(node.chars)
    if isinstance(node, _Cat):
        return "".join(python_regex(item, prefix) for item in node.items)
    if isinstance(node, Alt):
        return "(?:" + "|".join(python_regex(item, prefix) for item in node.items) + ")"
    if isinstance(node, _Rep):
        count = f"{{{node.low},}}" if node.high is None else f"{{{node.low},{node.high}}}"
        return f"(?:{python_regex(node.item, prefix)}){count}"
    if isinstance(node, _Group):
        return f"(?P<{prefix}{node.index}>{python_regex(node.item, prefix)})"
    if isinstance(node, _Backref):
        return f"(?P={prefix}{node.index})"
    return _ANCHOR_PYTHON[node.kind]


def _walk(node: Node) -> Iterator[Node]:
    """Yield the node and every node below it."""
    yield node
    if isinstance(node, _Cat | Alt):
        for item in node.items:
            yield from _walk(item)
    elif isinstance(node, _Rep | _Group):
        yield from _walk(node.item)


def _backtracking_is_risky(tree: Node) -> bool:
    """Tell whether Python's backtracking ``re`` could take exponential or high-degree time.

    That is when a repetition of more than one wraps another repetition or an alternation
    (``(.*){5}``, ``(a|ab)*``), or when three or more unbounded repetitions follow each other
    (``*a*b*c``). Patterns with back-references always go to ``re`` (:class:`BitMatcher`
    cannot match them).
    """
    reps = [n for n in _walk(tree) if isinstance(n, _Rep) and (n.high is None or n.high > 1)]
    if any(isinstance(n, _Backref) for n in _walk(tree)):
        return False
    nested = any(isinstance(m, _Rep | Alt) for n in reps for m in _walk(n.item))
    return nested or sum(1 for n in reps if n.high is None) >= 3


class BitMatcher:
    """Search a subject with a tree, one set of positions at a time (no backtracking).

    Positions ``0..len`` are bits of an int; a node maps the set of positions where it may
    start to the set where it may end. A repetition iterates until its set stops changing, so
    the work is polynomial in the subject's length whatever the tree (back-references are not
    supported).
    """

    __slots__ = ("_tree",)

    def __init__(self, tree: Node) -> None:
        self._tree = tree

    def search(self, subject: bytes) -> bool:
        """Tell whether the tree matches anywhere in ``subject`` (upper-cased already)."""
        run = _BitRun(subject)
        return run.ends(self._tree, (1 << (len(subject) + 1)) - 1) != 0


class _BitRun:
    """The per-subject state of :meth:`BitMatcher.search`."""

    __slots__ = ("_masks", "_n", "subject", "_word_after", "_word_before")

    def __init__(self, subject: bytes) -> None:
        self.subject = subject
        self._n = len(subject)
        self._masks: dict[frozenset[int], int] = {}
        after = self._mask(_WORD_BYTES)
        self._word_after = after
        self._word_before = after << 1

    def _mask(self, chars: frozenset[int]) -> int:
        mask = self._masks.get(chars)
        if mask is None:
            mask = sum(1 << p for p, c in enumerate(self.subject) if c in chars)
            self._masks[chars] = mask
        return mask

    def ends(self, node: Node, starts: int) -> int:
        if not starts:
            return 0
        if isinstance(node, _Set):
            return (starts & self._mask(node.chars)) << 1
        if isinstance(node, _Cat):
            for item in node.items:
                starts = self.ends(item, starts)
            return starts
        if isinstance(node, Alt):
            found = 0
            for item in node.items:
                found |= self.ends(item, starts)
            return found
        if isinstance(node, _Group):
            return self.ends(node.item, starts)
        if isinstance(node, _Rep):
            return self._repeat(node, starts)
        if isinstance(node, _Anchor):
            return starts & self._anchor(node.kind)
        raise TypeError("back-references need Python's re")  # pragma: no cover

    def _anchor(self, kind: str) -> int:
        full = (1 << (self._n + 1)) - 1
        before, after = self._word_before, self._word_after
        return {
            "^": 1,
            "$": 1 << self._n,
            "<": ~before & after & full,
            ">": before & ~after & full,
            "b": (before ^ after) & full,
            "B": ~(before ^ after) & full,
        }[kind]

    def _repeat(self, node: _Rep, starts: int) -> int:
        current, seen, count = starts, {starts: 0}, 0
        while count < node.low:
            current = self.ends(node.item, current)
            count += 1
            if not current:
                return 0
            if current in seen:  # the sets cycle: skip whole periods
                period = count - seen[current]
                for _ in range((node.low - count) % period):
                    current = self.ends(node.item, current)
                break
            seen[current] = count
        found = frontier = current
        more = None if node.high is None else node.high - node.low
        while frontier and (more is None or more > 0):
            frontier = self.ends(node.item, frontier) & ~found
            found |= frontier
            more = None if more is None else more - 1
        return found


def as_bytes(text: str) -> bytes:
    """The bytes behind text read from a file or the MTA (surrogate escapes become bytes)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def subject(text: str) -> bytes:
    """The bytes OpenDKIM's ``regexec()`` compares for a probe: as given, ASCII-upper-cased."""
    return as_bytes(text).upper()


@dataclass(frozen=True, slots=True)
class RefilePattern:
    """One ``refile:`` host-list line compiled as OpenDKIM compiles it."""

    tree: Node
    #: The Python bytes regex, when Python's ``re`` does the matching.
    python: str | None
    search: Callable[[bytes], object]

    @classmethod
    def compile(cls, pattern: str, prefix: str = "g") -> RefilePattern:
        """:raises RegexError: where OpenDKIM's ``regcomp()`` fails (OpenDKIM will not start)."""
        tree = EreParser.parse(mkregexp(as_bytes(pattern)))
        if _backtracking_is_risky(tree):
            return cls(tree, None, BitMatcher(tree).search)
        python = python_regex(tree, prefix)
        return cls(tree, python, re.compile(python.encode("latin-1")).search)
