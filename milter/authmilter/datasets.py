"""OpenDKIM datasets (``file:``, ``refile:``, ``csl:``) and the host lists built from them.

A *dataset* is the value of directives such as ``KeyTable``, ``SigningTable``, ``PeerList`` or
``InternalHosts`` (opendkim(8), DATA SETS). The type comes from the spec string, exactly as
OpenDKIM 2.11's ``dkimf_db_open()`` decides it:

* ``file:PATH`` or a bare ``/PATH`` (we also take ``./PATH`` and ``../PATH``): a flat file, one
  ``key [value]`` entry per line (:class:`FileDataset`);
* ``refile:PATH``: one ``pattern [value]`` per line, ``*`` the only wildcard
  (:class:`RegexDataset`; a :class:`HostList` reads the patterns as the regular expressions
  OpenDKIM makes of them);
* ``csl:a,b=c`` or any other string: a comma-separated list (:class:`ListDataset`);
* ``db:``, ``dsn:``, ``ldap:`` … and a bare name ending in ``.db``: known to OpenDKIM, not supported
  here, a :class:`~authmilter.errors.ConfigError`.

Values are returned raw; :func:`split_fields` splits them on ``:`` the way OpenDKIM fills its
multi-field requests (``KeyTable``: ``domain:selector:keyfile``).

:class:`HostList` answers ``PeerList`` / ``InternalHosts`` / ``ExternalIgnoreList`` questions the
way OpenDKIM's ``dkimf_checkhost()`` + ``dkimf_checkip()`` do, for ``file:``, ``csl:`` and
``refile:`` lists alike, and reports (in :attr:`HostList.warnings`) the entries OpenDKIM accepts
but can never match or reads differently.

This is written by hand: no library reads OpenDKIM's dataset formats, and the behaviour that
matters — which lines count, how ``refile:`` globs become regular expressions, which probe
strings OpenDKIM looks up in which order — lives only in OpenDKIM's C sources
(``opendkim/opendkim-db.c``, ``opendkim/util.c``), which the functions here follow and cite.
"""

from __future__ import annotations

import ipaddress
import os
import re
import string
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Final, TypeAlias

from authmilter.ere import Alt, Node, RefilePattern, RegexError, as_bytes, mkregexp, subject
from authmilter.errors import ConfigError, Location

__all__ = [
    "DEFAULT_INTERNAL_HOSTS",
    "Dataset",
    "FileDataset",
    "HostEntry",
    "HostList",
    "ListDataset",
    "RegexDataset",
    "compile_wildcard",
    "open_dataset",
    "parse_spec",
    "split_fields",
]

#: One dataset entry: key (or pattern), raw value (``""`` when absent), where it was defined.
Record: TypeAlias = tuple[str, str, Location]

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

SUPPORTED_TYPES: Final = ("file", "refile", "csl")
#: Types OpenDKIM 2.11 knows (some only when compiled in) that authmilter does not implement.
UNSUPPORTED_TYPES: Final = frozenset(
    {"db", "dsn", "ldap", "ldaps", "ldapi", "lua", "memcache", "erlang", "mdb", "repute", "socket"}
)
#: OpenDKIM 2.11's ``DEFINTERNAL`` (``csl:127.0.0.1,::1``), used when ``InternalHosts`` is unset.
DEFAULT_INTERNAL_HOSTS: Final = ("127.0.0.1", "::1")

_SUPPORTED_TEXT: Final = "supported: file:, refile:, csl:"
# C isspace() in the "C" locale: what OpenDKIM's parsers treat as blanks.
_WS: Final = " \t\n\v\f\r"
_WS_RE: Final = re.compile(r"[ \t\n\v\f\r]")
_TYPE_NAME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_ASCII_LOWER: Final = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_BRACKETED_RE: Final = re.compile(r"\[(?P<addr>[^\]]*)\](?P<rest>.*)", re.DOTALL)
_DOTTED_RE: Final = re.compile(r"[0-9.]+")
_MAPPED_V4: Final = ipaddress.IPv6Network("::ffff:0:0/96")


def _fold(text: str) -> str:
    """Lower-case ASCII letters only, as C ``strcasecmp()`` compares."""
    return text.lower() if text.isascii() else text.translate(_ASCII_LOWER)


def split_fields(value: str, n: int | None = None) -> list[str]:
    """Split a dataset value into its colon-separated fields, the last one taking the rest.

    OpenDKIM separates the fields of a multi-field value with ``:`` and gives the remainder of
    the value to the last field requested (``dkimf_db_datasplit()``), so a ``KeyTable`` value is
    ``split_fields(value, 3)`` → ``[domain, selector, keyfile]``. With ``n=None`` every colon
    splits. Fewer than ``n`` fields come back as a shorter list; checking that is the caller's job.

    :raises ValueError: if ``n`` is less than 1.
    """
    if n is None:
        return value.split(":")
    if n < 1:
        raise ValueError(f"split_fields: n must be at least 1, not {n}")
    return value.split(":", n - 1)


def _unsupported(kind: str, where: Location | None, note: str = "") -> ConfigError:
    """Build the error for a dataset type OpenDKIM knows and authmilter does not implement."""
    return ConfigError(
        f"dataset type '{kind}:' is not supported by authmilter ({_SUPPORTED_TEXT}){note}", where
    )


def _is_ipv6_literal(text: str) -> bool:
    """Tell whether a csl's first element is an IPv6 host-list entry (which contains colons)."""
    first = text.split(",", 1)[0].strip(_WS)
    body = first[1:] if first.startswith("!") else first
    match = _BRACKETED_RE.fullmatch(body)
    if match is not None:
        body = match["addr"] + match["rest"]
    try:
        return ipaddress.ip_network(body, strict=False).version == 6
    except ValueError:
        return False


def parse_spec(spec: str, *, where: Location | None = None) -> tuple[str, str]:
    """Classify a dataset spec as OpenDKIM 2.11 does: ``(kind, rest)`` without opening anything.

    ``kind`` is ``"file"``, ``"refile"`` or ``"csl"``; ``rest`` is the path or the list text. The
    type prefix is the text before the first ``:`` unless a ``,`` comes first (a csl whose later
    elements contain colons), compared case-insensitively. Without a prefix a value starting with
    ``/``, ``./`` or ``../`` is a file, one ending in ``.db`` a Berkeley DB, anything else a csl.

    Where OpenDKIM would refuse a spec with an unknown prefix, authmilter still reads it as a csl
    when the prefix cannot be a type name (``::1``, ``[2001:db8::1]``, ``fe80::1,10.0.0.1``,
    ``a=b:c``) and as a file when it is a path, so every spec OpenDKIM accepts means the same here.

    :raises ConfigError: for a known but unsupported type (``db:``, ``dsn:``, ``ldap:`` …), or an
        unknown ``word:`` prefix, with ``where``.
    """
    colon = spec.find(":")
    if colon >= 0:
        # opendkim-db.c ignores a colon that comes after a comma; such a prefix contains the
        # comma, so it can be neither a type name nor a path and falls through to csl below.
        prefix = spec[:colon]
        kind = prefix.lower()
        if kind in SUPPORTED_TYPES:
            return kind, spec[colon + 1 :]
        if kind in UNSUPPORTED_TYPES:
            raise _unsupported(kind, where)
        if spec.startswith(("/", "./", "../")):
            return "file", spec
        if _TYPE_NAME_RE.fullmatch(prefix) and not _is_ipv6_literal(spec):
            raise ConfigError(f"unknown dataset type '{prefix}:' ({_SUPPORTED_TEXT})", where)
        return "csl", spec
    # opendkim-db.c: with no prefix, the last ".db" ending the name makes it a Berkeley DB.
    if spec.endswith(".db"):
        raise _unsupported(
            "db", where, f"; '{spec}' ends in '.db', which OpenDKIM opens as a Berkeley DB"
        )
    if spec.startswith(("/", "./", "../")):
        return "file", spec
    return "csl", spec


class Dataset(ABC):
    """A loaded OpenDKIM dataset: an ordered list of ``(key, value, where)`` entries.

    Lookups compare keys case-insensitively (ASCII only, like ``strcasecmp()``) unless the dataset
    was opened with ``case_sensitive=True``: OpenDKIM opens every dataset with
    ``DKIMF_DB_FLAG_ICASE`` except ``KeyTable``, ``MTA``, ``MacroList`` and the reputation tables,
    whose callers should pass ``case_sensitive=True``. ``ascii_only=True`` (OpenDKIM's
    ``DKIMF_DB_FLAG_ASCIIONLY``, used for ``SigningTable``) makes a query containing non-ASCII
    characters match nothing. Instances are immutable and safe to share between threads.
    """

    __slots__ = ()

    #: ``"file"``, ``"refile"`` or ``"csl"``.
    kind: ClassVar[str]
    #: The spec as written in the configuration.
    spec: str
    #: The file the entries came from, or ``"csl"``.
    source: str
    records: tuple[Record, ...]
    case_sensitive: bool
    ascii_only: bool

    @abstractmethod
    def get_all(self, key: str) -> list[str]:
        """Return the raw value of every entry matching ``key``, in file order."""

    def get(self, key: str) -> str | None:
        """Return the raw value of the first entry matching ``key`` (``""`` if it has none)."""
        values = self.get_all(key)
        return values[0] if values else None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def entries(self) -> list[Record]:
        """Return every entry as ``(key, value, where)``, in file order, for listing tools."""
        return list(self.records)

    def __len__(self) -> int:
        return len(self.records)


def _index_records(records: tuple[Record, ...], case_sensitive: bool) -> dict[str, tuple[str, ...]]:
    """Map each (folded) key to the values of its entries, in file order."""
    index: dict[str, list[str]] = {}
    for key, value, _where in records:
        index.setdefault(key if case_sensitive else _fold(key), []).append(value)
    return {key: tuple(values) for key, values in index.items()}


@dataclass(frozen=True, slots=True)
class _KeyedDataset(Dataset):
    """Exact-key lookups shared by ``file:`` and ``csl:`` datasets."""

    spec: str
    source: str
    records: tuple[Record, ...]
    case_sensitive: bool = False
    ascii_only: bool = False
    _index: dict[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", _index_records(self.records, self.case_sensitive))

    def _values(self, key: str) -> tuple[str, ...]:
        if self.ascii_only and not key.isascii():
            return ()
        return self._index.get(key if self.case_sensitive else _fold(key), ())

    def get_all(self, key: str) -> list[str]:
        """Return the raw value of every entry whose key equals ``key``, in file order."""
        return list(self._values(key))

    def get(self, key: str) -> str | None:
        """Return the raw value of the first entry whose key equals ``key``."""
        values = self._values(key)
        return values[0] if values else None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self._values(key))


def _data_lines(text: str) -> Iterable[tuple[int, str]]:
    """Yield ``(lineno, line)`` with ``#`` comments cut off, skipping lines left blank."""
    if text.startswith("\ufeff"):
        text = text[1:]
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.split("#", 1)[0]
        if line.strip(_WS):
            yield lineno, line


def _key_value(line: str) -> tuple[str, str]:
    """Split a data line into key (up to the first blank) and value (the rest, trimmed)."""
    line = line.strip(_WS)
    gap = _WS_RE.search(line)
    if gap is None:
        return line, ""
    return line[: gap.start()], line[gap.end() :].lstrip(_WS)


@dataclass(frozen=True, slots=True)
class FileDataset(_KeyedDataset):
    """A ``file:`` dataset: ``key [value]`` lines, ``#`` comments, blank lines ignored.

    The key is the text up to the first blank; the value is the rest of the line with surrounding
    blanks removed and inner text kept as written (``""`` for a key alone). A key may appear more
    than once: :meth:`get` returns the first, :meth:`get_all` all of them in file order.
    """

    kind: ClassVar[str] = "file"

    @classmethod
    def from_text(
        cls,
        text: str,
        *,
        path: str,
        spec: str | None = None,
        case_sensitive: bool = False,
        ascii_only: bool = False,
    ) -> FileDataset:
        """Parse the text of a flat data file; ``path`` names it in each entry's location."""
        records = tuple(
            (*_key_value(line), Location(path, lineno)) for lineno, line in _data_lines(text)
        )
        return cls(
            spec=f"file:{path}" if spec is None else spec,
            source=path,
            records=records,
            case_sensitive=case_sensitive,
            ascii_only=ascii_only,
        )


@dataclass(frozen=True, slots=True)
class ListDataset(_KeyedDataset):
    """A ``csl:`` dataset: comma-separated elements, each ``key`` or ``key=value``, trimmed."""

    kind: ClassVar[str] = "csl"

    @classmethod
    def from_text(
        cls,
        text: str,
        *,
        where: Location | None = None,
        spec: str | None = None,
        case_sensitive: bool = False,
        ascii_only: bool = False,
    ) -> ListDataset:
        """Parse the list text (without its ``csl:`` prefix); entries are located at ``where``.

        Empty elements (``a,,b`` or ``a, ,b``) are skipped, as OpenDKIM's ``strtok()`` does.

        :raises ConfigError: for an element like ``=value`` whose key is empty.
        """
        at = where if where is not None else Location("csl")
        records: list[Record] = []
        for element in text.split(","):
            if not element.strip(_WS):
                continue
            key, _eq, value = element.partition("=")
            key = key.strip(_WS)
            if not key:
                raise ConfigError(f"csl element '{element.strip(_WS)}' has an empty key", where)
            records.append((key, value.strip(_WS), at))
        return cls(
            spec=f"csl:{text}" if spec is None else spec,
            source="csl",
            records=tuple(records),
            case_sensitive=case_sensitive,
            ascii_only=ascii_only,
        )


def compile_wildcard(pattern: str, *, case_sensitive: bool = False) -> re.Pattern[str]:
    """Compile a ``refile:`` pattern: ``*`` matches any run of characters, all else is literal.

    The pattern must match the whole query. Matching ignores ASCII case unless
    ``case_sensitive``.
    """
    flags = re.DOTALL | re.ASCII | (0 if case_sensitive else re.IGNORECASE)
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), flags)


@dataclass(frozen=True, slots=True)
class RegexDataset(Dataset):
    """A ``refile:`` dataset: ``pattern [value]`` lines tried in file order.

    A pattern is anchored at both ends, ``*`` matches any run of characters (empty, dots and ``@``
    included) and every other character is literal, so ``*@example.com`` matches
    ``user@example.com`` but not ``user@sub.example.com``. (OpenDKIM's ``dkimf_mkregexp()``
    escapes only ``.`` and ``+`` and hands other regex metacharacters such as ``?``, ``[`` or
    ``|`` to ``regcomp()``; for these lookups authmilter follows the documented rule and keeps
    them literal. A :class:`HostList` built from a refile: dataset compiles its lines exactly
    as OpenDKIM does, regex syntax included.)
    """

    kind: ClassVar[str] = "refile"

    spec: str
    source: str
    records: tuple[Record, ...]
    case_sensitive: bool = False
    ascii_only: bool = False
    #: ``(message, where)`` for lines OpenDKIM silently drops (kept out of ``records``).
    warnings: tuple[tuple[str, Location], ...] = ()
    _patterns: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        patterns = tuple(
            compile_wildcard(key, case_sensitive=self.case_sensitive) for key, _, _ in self.records
        )
        object.__setattr__(self, "_patterns", patterns)

    @classmethod
    def from_text(
        cls,
        text: str,
        *,
        path: str,
        spec: str | None = None,
        case_sensitive: bool = False,
        ascii_only: bool = False,
    ) -> RegexDataset:
        """Parse the text of a pattern file; ``path`` names it in each entry's location.

        A pattern line that starts with a blank is dropped, as OpenDKIM 2.11 drops it (it cuts
        the pattern at the first blank and finds it empty), and named in :attr:`warnings`, so
        that a file OpenDKIM starts with is never refused and the dropped line is never silent.
        """
        records: list[Record] = []
        warnings: list[tuple[str, Location]] = []
        for lineno, line in _data_lines(text):
            if line[0] in _WS:
                warnings.append((
                    f"refile line '{line.strip(_WS)}' starts with whitespace, so it is ignored "
                    "(as OpenDKIM ignores it); remove the indentation to use it",
                    Location(path, lineno)))  # fmt: skip
                continue
            records.append((*_key_value(line), Location(path, lineno)))
        return cls(
            spec=f"refile:{path}" if spec is None else spec,
            source=path,
            records=tuple(records),
            case_sensitive=case_sensitive,
            ascii_only=ascii_only,
            warnings=tuple(warnings),
        )

    def get_all(self, key: str) -> list[str]:
        """Return the value of every entry whose pattern matches ``key``, in file order."""
        if self.ascii_only and not key.isascii():
            return []
        return [
            record[1]
            for pattern, record in zip(self._patterns, self.records, strict=True)
            if pattern.fullmatch(key)
        ]

    def get(self, key: str) -> str | None:
        """Return the value of the first entry whose pattern matches ``key``."""
        if self.ascii_only and not key.isascii():
            return None
        for pattern, record in zip(self._patterns, self.records, strict=True):
            if pattern.fullmatch(key):
                return record[1]
        return None


def _read_data_file(path: str, where: Location | None) -> str:
    """Read a data file as text; undecodable bytes survive as surrogate escapes."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path ("embedded null byte")
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot read dataset file '{path}': {reason}", where) from exc
    return data.decode("utf-8", errors="surrogateescape")


def open_dataset(
    spec: str,
    *,
    where: Location | None = None,
    case_sensitive: bool = False,
    ascii_only: bool = False,
    base_dir: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Open the dataset a configuration value names; see :func:`parse_spec` for the types.

    ``where`` is the configuration line naming the dataset: errors about the spec or an
    unreadable file carry it, errors inside a data file carry that file's ``path:line``.
    A relative file path is taken relative to ``base_dir`` (OpenDKIM's ``BaseDirectory``) when
    given, else to the working directory. ``case_sensitive`` and ``ascii_only`` are described on
    :class:`Dataset`.

    :raises ConfigError: for an unsupported or unknown type, an unreadable file, or a bad entry.
    """
    kind, rest = parse_spec(spec, where=where)
    if kind == "csl":
        return ListDataset.from_text(
            rest, where=where, spec=spec, case_sensitive=case_sensitive, ascii_only=ascii_only
        )
    if not rest:
        raise ConfigError(f"dataset '{spec}' names no file", where)
    path = rest if base_dir is None else os.path.join(base_dir, rest)
    text = _read_data_file(path, where)
    if kind == "refile":
        return RegexDataset.from_text(
            text, path=path, spec=spec, case_sensitive=case_sensitive, ascii_only=ascii_only
        )
    return FileDataset.from_text(
        text, path=path, spec=spec, case_sensitive=case_sensitive, ascii_only=ascii_only
    )


# ---------------------------------------------------------------------------------------------
# Host lists (PeerList, InternalHosts, ExternalIgnoreList)

#: A host-list warning: the message and where the entry was written (data file line or the
#: configuration line of a csl:).
_Warning: TypeAlias = tuple[str, Location | None]

# The characters POSIX extended regular expressions treat as syntax that OpenDKIM's
# dkimf_mkregexp() passes through to regcomp() unchanged ("*", "." and "+" it rewrites).
_ERE_SPECIALS: Final = frozenset("?[](){}|^$\\")
_STAR_DOMAIN_RE: Final = re.compile(r"\*\.(?P<domain>[^*.][^*]*)")
_STAR_IPV4_RE: Final = re.compile(r"(?P<octets>(?:[0-9]{1,3}\.){1,3})\*(?:\.\*)*")
# A dotted quad cut short ("192.168.1." or "192.168.1"): one to three octets.
_PARTIAL_IPV4_RE: Final = re.compile(r"[0-9]{1,3}\.|[0-9]{1,3}(?:\.[0-9]{1,3}){1,2}\.?")
_V4_FULL: Final = (1 << 32) - 1
_V6_FULL: Final = (1 << 128) - 1


@dataclass(frozen=True, slots=True)
class HostEntry:
    """One host-list entry as written, with the network it denotes if it is an address entry.

    For a ``refile:`` list ``text`` is the pattern and ``network`` is always ``None``.
    """

    text: str
    negated: bool
    where: Location | None = None
    network: IPNetwork | None = None


def _as_ipv4(network: IPNetwork) -> IPNetwork:
    """Rewrite an IPv4-mapped IPv6 network (``::ffff:192.0.2.0/120``) as IPv4 (``/24``)."""
    if (
        isinstance(network, ipaddress.IPv6Network)
        and network.prefixlen >= 96
        and network.subnet_of(_MAPPED_V4)
    ):
        base = int(network.network_address) & 0xFFFFFFFF
        return ipaddress.IPv4Network((base, network.prefixlen - 96))
    return network


def _ntop4(value: int) -> str:
    """Print an IPv4 address as OpenDKIM's ``dkimf_inet_ntoa()`` does (plain dotted decimal)."""
    return f"{value >> 24}.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}"


def _ntop6(value: int) -> str:
    """Print an IPv6 address as glibc ``inet_ntop()`` does, for ``dkimf_checkip()``'s probes.

    Lower-case hex without leading zeros, the first longest run of two or more zero groups
    written ``::`` (RFC 5952, as Python prints it), except that an address whose first six
    groups are zero (seventh non-zero) or whose first five are zero and sixth ``ffff`` ends in
    dotted IPv4: ``::ffff:192.0.2.1``, ``::0.2.0.3``.
    """
    words = [(value >> (112 - 16 * i)) & 0xFFFF for i in range(8)]
    best, best_len, run, run_len = -1, 0, -1, 0
    for i, word in enumerate([*words, 1]):  # the sentinel closes a trailing run
        if word == 0:
            run, run_len = (i, 1) if run < 0 else (run, run_len + 1)
        elif run >= 0:
            if run_len > best_len:
                best, best_len = run, run_len
            run = -1
    if best_len < 2:
        best = -1
    text = ""
    for i, word in enumerate(words):
        if best >= 0 and best <= i < best + best_len:
            text += ":" if i == best else ""
            continue
        text += ":" if i else ""
        if i == 6 and best == 0 and (best_len == 6 or (best_len == 5 and words[5] == 0xFFFF)):
            return text + _ntop4(value & _V4_FULL)
        text += f"{word:x}"
    return text + ":" if best >= 0 and best + best_len == 8 else text


def _ntop(address: IPAddress | int, version: int) -> str:
    """Print an address the way ``dkimf_checkip()`` spells its probes."""
    return _ntop4(int(address)) if version == 4 else _ntop6(int(address))


def _inspect_address(body: str) -> tuple[IPNetwork | None, str | None]:
    """Read an address or CIDR entry (after any ``!``; brackets allowed) as OpenDKIM can match it.

    Returns ``(network, spelling)``. ``spelling`` is the text ``dkimf_checkip()`` would have to
    probe for the block (``None`` if ``body`` is not an address or CIDR block at all); for a
    block with host bits set it is the enclosing network's text and ``network`` is ``None``,
    since the probes only ever carry masked addresses.
    """
    match = _BRACKETED_RE.fullmatch(body)
    inner = body if match is None else match["addr"] + match["rest"]
    address, slash, prefix = inner.partition("/")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None, None
    bits: int = ip.max_prefixlen
    if slash:
        if not (prefix.isascii() and prefix.isdigit()) or int(prefix) > ip.max_prefixlen:
            return None, None
        bits = int(prefix)
    network = ipaddress.ip_network((ip, bits), strict=False)
    spelling = _ntop(network.network_address, network.version)
    if match is not None:
        spelling = f"[{spelling}]"
    if slash:
        spelling += f"/{bits}"
    if int(network.network_address) != int(ip):
        return None, spelling
    return _as_ipv4(network), spelling


def _looks_like_address(body: str) -> bool:
    """Tell an address/CIDR entry from a host or domain name (names have no ``: / [``)."""
    return any(c in body for c in ":/[") or _DOTTED_RE.fullmatch(body) is not None


def _star_advice(body: str, bang: str) -> str:
    """Say what to write instead of an entry using ``*`` as a wildcard."""
    match = _STAR_DOMAIN_RE.fullmatch(body)
    if match is not None:
        domain = match["domain"]
        return f"write '{bang}.{domain}' (every name below {domain})"
    match = _STAR_IPV4_RE.fullmatch(body)
    if match is not None:
        octets = match["octets"].rstrip(".").split(".")
        if all(int(octet) <= 255 for octet in octets):
            network = ".".join(octets + ["0"] * (4 - len(octets)))
            return f"write '{bang}{network}/{8 * len(octets)}'"
    return (
        "list the host names, write '.domain' for every name below a domain, "
        "or use CIDR blocks for address ranges"
    )


def _partial_ipv4_advice(body: str, bang: str) -> str:
    """Suggest the CIDR block a truncated dotted quad (``192.168.1.``) was probably meant as."""
    if _PARTIAL_IPV4_RE.fullmatch(body) is None:
        return ""
    octets = body.rstrip(".").split(".")
    if any(int(octet) > 255 for octet in octets):
        return ""
    network = ".".join(octets + ["0"] * (4 - len(octets)))
    return f"; write '{bang}{network}/{8 * len(octets)}'"


def _inspect_entry(text: str) -> tuple[IPNetwork | None, str | None]:
    """Read a ``file:``/``csl:`` host-list entry: ``(network it denotes, warning or None)``.

    OpenDKIM accepts every key and compares it as text with the probes of ``dkimf_checkhost()``
    and ``dkimf_checkip()``; the warning names an entry that can therefore never match.
    """
    negated = text.startswith("!")
    body = text[1:] if negated else text
    bang = "!" if negated else ""
    if not body.strip(_WS):
        return None, f"host list entry '{text}' names nothing, so it never matches"
    if "*" in body:
        # opendkim-db.c dkimf_db_get(): file: and csl: keys are compared with strcasecmp().
        return None, (
            f"'{text}' is not a wildcard here: OpenDKIM compares file: and csl: host-list "
            f"entries as plain text, so it never matches; {_star_advice(body, bang)}"
        )
    if not _looks_like_address(body):
        return None, None
    network, spelling = _inspect_address(body)
    if spelling is None:
        return None, (
            f"host list entry '{text}' is not a valid IP address or CIDR block, so it never "
            f"matches{_partial_ipv4_advice(body, bang)}"
        )
    if network is None:
        # util.c dkimf_checkip() probes masked addresses only ("10.0.0.0/8", never "10.0.0.1/8").
        return None, (
            f"host list entry '{text}' has host bits set; OpenDKIM looks the client up by its "
            f"masked network, so it never matches; write '{bang}{spelling}'"
        )
    if _fold(spelling) != _fold(body):
        # dkimf_checkip() probes inet_ntop()/dkimf_inet_ntoa() text; other spellings never match.
        return network, (
            f"OpenDKIM never matches host list entry '{text}': it looks addresses up spelled "
            f"'{bang}{spelling}'; authmilter matches it anyway; write '{bang}{spelling}' so "
            f"both agree"
        )
    return network, None


def _star_ipv4_pattern_warning(text: str, octets_text: str, bang: str) -> list[str]:
    """Warn when a ``refile:`` pattern like ``10.*`` matches more than the block it suggests.

    ``dkimf_checkip()`` also probes the masked networks ``net/bits``; for ``10.*`` the probe
    ``10.0.0.0/7`` of 11.1.2.3 starts with ``10.`` too. With ``k`` leading octets whose value
    ends in ``t`` zero bits, the pattern matches the whole block ``prefix/(8k - t)``.
    """
    octets = [int(octet) for octet in octets_text.rstrip(".").split(".")]
    if any(octet > 255 for octet in octets):
        return []
    width = 8 * len(octets)
    value = 0
    for octet in octets:
        value = value << 8 | octet
    zeros = width if value == 0 else (value & -value).bit_length() - 1
    if zeros == 0:
        return []
    network = _ntop4(value << (32 - width))
    wide, exact = f"{network}/{width - zeros}", f"{network}/{width}"
    return [
        f"refile pattern '{text}' matches every address in {wide}, not only in {exact}: "
        f"OpenDKIM also looks up masked networks such as '{wide}', which the pattern matches; "
        f"write '{bang}{exact}' for exactly {exact}"
    ]


def _regex_advice() -> str:
    """What to do about regular-expression syntax in a host-list pattern."""
    return (
        "OpenDKIM turns '*' into '.*' and takes '.' and '+' literally, but reads "
        "( ) [ ] { } ? | ^ $ \\ as regular-expression syntax: remove them, or balance them"
    )


def _pattern_error(text: str, error: RegexError) -> str:
    """The message for a pattern glibc's ``regcomp()`` refuses (OpenDKIM then will not start)."""
    return (
        f"refile pattern '{text}' is not a regular expression OpenDKIM can compile ({error}), "
        f"so OpenDKIM refuses to start with this file (dkimf_db_open(): Error compiling "
        f"regular expression); {_regex_advice()}"
    )


def _pattern_warnings(text: str, tree: Node) -> list[str]:
    """Say what is surprising about a ``refile:`` host-list pattern (nothing for most).

    ``tree`` is the pattern as OpenDKIM compiles it (:class:`EreParser`). Each message says
    what OpenDKIM does with the line and, for a line that can never match, what to write.
    """
    body = text[1:] if text.startswith("!") else text
    bang = "!" if text.startswith("!") else ""
    found: list[str] = []
    if text.startswith("*"):
        # util.c dkimf_checkhost()/dkimf_checkip() try "!probe" before "probe", and a leading
        # ".*" matches the "!" too: such a pattern answers the exclusion lookup first.
        found.append(
            f"refile pattern '{text}' starts with '*', so it also matches the '!'-prefixed "
            f"form OpenDKIM looks up first, and excludes the hosts it matches instead of "
            f"including them; {_star_advice(text, '')}"
        )
    star_ipv4 = _STAR_IPV4_RE.fullmatch(body)
    if star_ipv4 is not None:
        found += _star_ipv4_pattern_warning(text, star_ipv4["octets"], bang)
    specials = sorted(_ERE_SPECIALS.intersection(text))
    if specials:
        found += _regex_warnings(text, body, bang, tree, specials)
    elif "*" not in text and body and _looks_like_address(body):
        network, spelling = _inspect_address(body)
        if spelling is None:
            found.append(
                f"refile pattern '{text}' is not a valid IP address or CIDR block, so it never "
                f"matches an address{_partial_ipv4_advice(body, bang)}"
            )
        elif network is None:
            found.append(
                f"refile pattern '{text}' has host bits set, so it never matches: OpenDKIM "
                f"looks the client up by its masked network; write '{bang}{spelling}'"
            )
        elif _fold(spelling) != _fold(body):
            found.append(
                f"refile pattern '{text}' never matches: OpenDKIM looks this address up spelled "
                f"'{bang}{spelling}'; write that instead"
            )
    elif not body:
        found.append(f"refile pattern '{text}' names nothing, so it never matches")
    return found


def _regex_warnings(text: str, body: str, bang: str, tree: Node, specials: list[str]
                    ) -> list[str]:  # fmt: skip
    """Warn about a pattern using regular-expression syntax beyond ``*``, ``.`` and ``+``."""
    compiled = mkregexp(as_bytes(text)).decode("utf-8", "surrogateescape")
    found: list[str] = []
    bracketed = _BRACKETED_RE.fullmatch(body)
    spelling = None
    if bracketed is not None:
        spelling = _inspect_address(bracketed["addr"] + bracketed["rest"])[1]
    if spelling is not None:
        # util.c dkimf_checkip() does probe "[192.0.2.1]", but as a regex the brackets make a
        # one-character class: "[192.0.2.1]" matches "1", "9", "2", "0" or ".", nothing more.
        found.append(
            f"refile pattern '{text}' never matches: OpenDKIM reads the square brackets as a "
            f"regular-expression class that matches a single character, not as a bracketed "
            f"address; write '{bang}{spelling}'"
        )
    elif "\\." in body or "\\+" in body:
        fixed = text.replace("\\.", ".").replace("\\+", "+")
        found.append(
            f"refile pattern '{text}' never matches a host name or address: OpenDKIM already "
            f"takes '.' and '+' literally and compiles '\\.' as a literal backslash followed "
            f"by any character ('{compiled}'); write '{fixed}'"
        )
    elif isinstance(tree, Alt):
        found.append(
            f"refile pattern '{text}' has '|' outside parentheses: OpenDKIM compiles it as "
            f"'{compiled}', which anchors only the start of the first alternative and the end "
            f"of the last, so they also match longer names and addresses (the '!'-prefixed "
            f"form OpenDKIM looks up first among them, which excludes the host); write one "
            f"line per alternative"
        )
    else:
        note = ""
        if "?" in specials:
            note = " ('?' makes the character before it optional; it is no one-character wildcard)"
        found.append(
            f"refile pattern '{text}' contains {' '.join(specials)}: OpenDKIM compiles it as "
            f"the POSIX extended regular expression '{compiled}'{note}, and authmilter matches "
            f"it the same way; check that it means what you intend"
        )
    return found


def _name_probes(hostname: str) -> Iterator[str]:
    """Yield the name and each parent domain with its leading dot (``dkimf_checkhost()``)."""
    start = 0
    while start >= 0:
        yield hostname[start:]
        start = hostname.find(".", start + 1)


def _address_probes(address: IPAddress) -> Iterator[str]:
    """Yield ``dkimf_checkip()``'s probes without the ``!``: the address, bracketed, then
    ``net/bits`` and ``[net]/bits`` for every prefix length from the longest to 0."""
    bits = address.max_prefixlen
    full = _V4_FULL if bits == 32 else _V6_FULL
    value = int(address)
    text = _ntop(value, address.version)
    yield text
    yield f"[{text}]"
    for plen in range(bits, -1, -1):
        net = _ntop(value & (full ^ (full >> plen)), address.version)
        yield f"{net}/{plen}"
        yield f"[{net}]/{plen}"


# Rank within one prefix length, highest first: OpenDKIM probes "!ip", "ip", "![ip]", "[ip]"
# before "!ip/32", "ip/32", "![ip]/32", "[ip]/32".
_Rank: TypeAlias = tuple[bool, bool, bool]
_Level: TypeAlias = tuple[int, int, dict[int, HostEntry]]
#: The entry that decided a check, and whether it excluded the client.
_Hit: TypeAlias = tuple[HostEntry, bool]


def _build_levels(rules: list[tuple[IPNetwork, _Rank, HostEntry]], bits: int) -> tuple[_Level, ...]:
    """Group address entries by prefix length, longest first, keeping the best rank per network."""
    best: dict[int, dict[int, tuple[_Rank, HostEntry]]] = {}
    for network, rank, entry in rules:
        table = best.setdefault(network.prefixlen, {})
        key = int(network.network_address)
        held = table.get(key)
        if held is None or rank > held[0]:
            table[key] = (rank, entry)
    full = (1 << bits) - 1
    return tuple(
        (plen, full ^ (full >> plen), {net: entry for net, (_, entry) in table.items()})
        for plen, table in sorted(best.items(), reverse=True)
    )


def _client_address(ip: str | IPAddress, *, unmap: bool = True) -> IPAddress | None:
    """Parse the client address (brackets, ``%scope`` allowed); ``None`` if it is not one.

    With ``unmap`` an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) comes back as IPv4.
    """
    if isinstance(ip, str):
        text = ip.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        text = text.partition("%")[0]
        try:
            address: IPAddress = ipaddress.ip_address(text)
        except ValueError:
            return None
    else:
        address = ip
    if unmap and isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class _Patterns:
    """The ``refile:`` side of a host list: OpenDKIM's regexes tested against its probes.

    Every line is compiled up front (:class:`RefilePattern`); those Python's ``re`` matches are
    also joined into one alternation, so that a probe costs one search whatever the length of
    the list.
    """

    __slots__ = ("_any", "_compiled", "_entries", "_slow")

    def __init__(self, entries: tuple[HostEntry, ...]) -> None:
        self._entries = entries
        compiled: list[RefilePattern] = []
        for number, entry in enumerate(entries):
            try:
                compiled.append(RefilePattern.compile(entry.text, f"p{number}_"))
            except RegexError as exc:
                raise ConfigError(_pattern_error(entry.text, exc), entry.where) from None
        self._compiled = tuple(compiled)
        fast = [c.python for c in compiled if c.python is not None]
        joined = "|".join(f"(?:{p})" for p in fast).encode("latin-1")
        self._any = re.compile(joined) if fast else None
        self._slow = tuple(c.search for c in compiled if c.python is None)

    @property
    def trees(self) -> tuple[Node, ...]:
        """Each line's parse tree, in entry order."""
        return tuple(c.tree for c in self._compiled)

    def _exists(self, subject: bytes) -> bool:
        """``dkimf_db_get()`` on a REFILE: does any line's regex match the probe?"""
        if self._any is not None and self._any.search(subject):
            return True
        return any(search(subject) for search in self._slow)

    def decide(self, probes: Iterable[str]) -> _Hit | None:
        """Return the first probe's hit: ``!probe`` tried before ``probe``, as OpenDKIM does.

        A probe exists if any pattern matches it (opendkim-db.c ``dkimf_db_get()``, REFILE), so
        the line order only chooses which entry is reported: the first matching one.
        """
        if not self._entries:
            return None
        for probe in probes:
            for excluded, key in ((True, "!" + probe), (False, probe)):
                text = subject(key)
                if self._exists(text):
                    pairs = zip(self._entries, self._compiled, strict=True)
                    return next(e for e, c in pairs if c.search(text)), excluded
        return None


class HostList:
    """A ``PeerList`` / ``InternalHosts`` / ``ExternalIgnoreList`` list, as OpenDKIM 2.11 reads it.

    OpenDKIM never walks the entries. ``dkimf_checkhost()`` and ``dkimf_checkip()`` build a fixed
    series of *probe* strings from the client and ask the dataset whether each exists, the
    ``!``-prefixed probe before the plain one; the first probe found decides the check (found
    with ``!``: excluded). The probes are, in order:

    * the host name, then each parent domain with its leading dot (``a.b.example.com``,
      ``.b.example.com``, ``.example.com``, ``.com``);
    * the address as text, then bracketed (``192.0.2.1``, ``[192.0.2.1]``), then for every
      prefix length from ``/32`` (``/128``) down to ``/0`` the masked network as ``net/bits``
      and ``[net]/bits``. Addresses are spelled as OpenDKIM prints them: plain dotted decimal,
      IPv6 as glibc ``inet_ntop()`` writes it (lower case, ``::``-compressed).

    The client matches if either check includes it (OpenDKIM ORs them): an excluded host name
    does not stop an included address, nor the other way round.

    **file: and csl: lists** (:meth:`from_entries`, :meth:`from_dataset`) compare the probes with
    the entries' text, ignoring ASCII case. Entries are therefore host names
    (``mail.example.com``), domains (``.example.com``: every name *below* example.com, not
    example.com itself), addresses and CIDR blocks, optionally in square brackets, each
    excluding instead of including with ``!`` in front. What follows from the probe order:

    * names: at each step an excluding entry is looked for before an including one, and the
      first hit decides, so ``!mail.example.com`` beats ``.example.com`` for that host.
    * addresses: the most specific entry containing the address decides — longest prefix first,
      a bare address before the same address as ``/32`` (``/128``), unbracketed before
      bracketed, exclusion before inclusion at equal specificity. So ``!192.0.2.1`` inside
      ``192.0.2.0/24`` excludes just that host.
    * an entry OpenDKIM accepts but can never match is kept (never refused) and reported in
      :attr:`warnings`: anything containing ``*`` (there is no wildcard here), a string that
      looks like an address but is none, a CIDR block with host bits set. An address written in
      another spelling than OpenDKIM's probes (``2001:0db8::1``, ``10.0.0.0/08``) never matches
      in OpenDKIM but does here; it is warned about too.
    * an IPv4-mapped client address (``::ffff:192.0.2.1``) is checked as IPv4 here, against
      IPv4 and IPv4-mapped entries alike. OpenDKIM does not (measured: Debian's 2.11.0~beta2
      with ``file:`` ``198.51.100.0/24`` does not sign for a milter client
      ``::ffff:198.51.100.7``); Postfix hands milters plain IPv4, so only other MTAs notice.

    **refile: lists** (:meth:`from_dataset` on a :class:`RegexDataset`) behave as Debian's
    ``/usr/sbin/opendkim`` 2.11.0~beta2 was measured to behave (the table and the ``miltertest``
    script are in tests/test_datasets.py; it agrees with the master sources' util.c and
    opendkim-db.c). Each line is a regular expression: ``dkimf_mkregexp()`` turns it into
    ``^`` + the line with ``*`` made ``.*`` and ``.`` and ``+`` escaped + ``$``, and glibc's
    ``regcomp()`` compiles that as a POSIX extended regular expression, ignoring ASCII case
    (:class:`EreParser` reproduces glibc's reading). Every probe — host name, address, network
    — is matched against every line, the ``!`` form first; a probe exists if any line's
    expression matches it anywhere (``regexec()``; ``dkimf_db_get()``), so the probe order
    decides, not the line order. Hence ``192.168.1.*`` matches 192.168.1.x through the
    plain-address probe, ``10.0.0.0/8`` and ``2001:db8::/32`` through their masked-network
    probes, ``.example.com`` every name below example.com, ``mail.example.com`` that name only,
    and ``!`` lines exclude whatever their position. What surprises, each warned about in
    :attr:`warnings` at its file:line with what to write instead:

    * a line starting with ``*`` — the tutorials' ``*.example.com`` — also matches the ``!``
      probe tried first, so it *excludes* the hosts it matches (write ``.example.com``);
    * a trailing ``*`` also matches the masked-network probes: ``10.*`` matches 11.1.2.3
      through ``10.0.0.0/7``, ``192.168.*`` all of ``192.168.0.0/13`` (``2001:db8:*`` likewise
      covers ``2001:db8::/29``; only the IPv4 form is warned about);
    * the rest of the regex syntax (``? [ ] ( ) { } | ^ $ \\``) is live: ``[192.0.2.1]`` is a
      one-character class and never matches (write ``192.0.2.1``), ``mail\\.example.com``
      needs a backslash in the name, ``a|b`` anchors only ``^a`` and ``b$``, ``mail?.example``
      also matches ``mai.example``;
    * an address spelled otherwise than OpenDKIM prints it, with host bits set, or that is no
      address at all never matches.

    A line glibc cannot compile (``[192.0.2.1``, ``(a``, ``?a``, ``a{``) makes OpenDKIM refuse
    to start; :meth:`from_dataset` raises :class:`~authmilter.errors.ConfigError` at that line.
    An IPv4-mapped client address is probed in its IPv6 spelling (``::ffff:192.0.2.1``), as
    OpenDKIM does, so IPv4 lines do not match it.

    Instances are immutable and safe to share between threads.
    """

    __slots__ = ("_entries", "_names", "_patterns", "_v4", "_v6", "_warnings")

    def __init__(self, entries: Iterable[HostEntry], *, patterns: bool = False) -> None:
        """Build the lookup tables; prefer :meth:`from_dataset` / :meth:`from_entries`.

        With ``patterns=True`` each entry's text is a ``refile:`` pattern (``network`` unused).

        :raises ConfigError: with ``patterns=True``, at the entry's location, for a pattern
            OpenDKIM cannot compile (and so would not start with).
        """
        self._entries = tuple(entries)
        self._names: dict[str, HostEntry] = {}
        self._patterns: _Patterns | None = None
        v4: list[tuple[IPNetwork, _Rank, HostEntry]] = []
        v6: list[tuple[IPNetwork, _Rank, HostEntry]] = []
        warnings: list[_Warning] = []
        if patterns:
            self._patterns = _Patterns(self._entries)
            for entry, tree in zip(self._entries, self._patterns.trees, strict=True):
                warnings += [(text, entry.where) for text in _pattern_warnings(entry.text, tree)]
            keyed: tuple[HostEntry, ...] = ()
        else:
            keyed = self._entries
        for entry in keyed:
            body = entry.text[1:] if entry.negated else entry.text
            # dkimf_checkhost() looks every entry up by its text, addresses included.
            key = _fold(body)
            held = self._names.get(key)
            if held is None or (entry.negated and not held.negated):
                self._names[key] = entry
            if entry.network is not None:
                rank = ("/" not in body, not body.startswith("["), entry.negated)
                target = v4 if entry.network.version == 4 else v6
                target.append((entry.network, rank, entry))
            message = _inspect_entry(entry.text)[1]
            if message is not None:
                warnings.append((message, entry.where))
        self._v4 = _build_levels(v4, 32)
        self._v6 = _build_levels(v6, 128)
        self._warnings = tuple(warnings)

    @staticmethod
    def parse_entry(text: str, where: Location | None = None) -> HostEntry:
        """Parse one ``file:``/``csl:`` host-list entry.

        Every entry OpenDKIM would accept is accepted, including those that can never match
        (``*.example.com``, ``10.0.0.1/8``, ``300.1.1.1``): they become name entries that no
        probe equals, and a :class:`HostList` built from them lists them in :attr:`warnings`.

        :raises ConfigError: at ``where`` for an empty or blank entry (no dataset yields one).
        """
        if not text.strip(_WS):
            raise ConfigError(f"host list entry '{text}' is empty", where)
        network = _inspect_entry(text)[0]
        return HostEntry(text=text, negated=text.startswith("!"), where=where, network=network)

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[str, Location | None]]) -> HostList:
        """Build a ``file:``/``csl:``-style host list from ``(entry text, where written)`` pairs.

        :raises ConfigError: for an empty entry (see :meth:`parse_entry`).
        """
        return cls(cls.parse_entry(text, where) for text, where in entries)

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> HostList:
        """Build a host list from the keys of a dataset (values are ignored, as OpenDKIM does).

        A ``refile:`` dataset gives a pattern list, ``file:`` and ``csl:`` a text list; see the
        class docstring. Nothing OpenDKIM would start with is refused: entries that can never
        match, or that OpenDKIM reads differently, are listed in :attr:`warnings` at their
        data-file line (a csl: at its configuration line).

        :raises ConfigError: at its data-file line, for a ``refile:`` pattern OpenDKIM cannot
            compile as a regular expression (OpenDKIM refuses to start with such a file).
        """
        if isinstance(dataset, RegexDataset):
            records = dataset.records
            patterns = (HostEntry(key, key.startswith("!"), where) for key, _, where in records)
            found = cls(patterns, patterns=True)
            found._warnings = (*dataset.warnings, *found._warnings)
            return found
        return cls.from_entries((key, where) for key, _value, where in dataset.records)

    @classmethod
    def default(cls, hosts: Iterable[str] = DEFAULT_INTERNAL_HOSTS) -> HostList:
        """Build a host list from plain entry strings, by default OpenDKIM's ``InternalHosts``.

        :raises ConfigError: for an empty entry (see :meth:`parse_entry`).
        """
        return cls.from_entries((host, None) for host in hosts)

    @property
    def entries(self) -> tuple[HostEntry, ...]:
        """Every entry, in the order given."""
        return self._entries

    @property
    def warnings(self) -> tuple[tuple[str, Location | None], ...]:
        """``(message, where)`` for each entry that never matches or that OpenDKIM reads otherwise.

        Collected when the list is built, in entry order; empty for an ordinary list. Each
        message names the entry and says what to write instead.
        """
        return self._warnings

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        kind = ", patterns=True" if self._patterns is not None else ""
        return f"HostList({[entry.text for entry in self._entries]!r}{kind})"

    def _match_name(self, hostname: str) -> _Hit | None:
        """Return the entry deciding the name check (``dkimf_checkhost()``), if any."""
        if self._patterns is not None:
            return self._patterns.decide(_name_probes(hostname))
        name = _fold(hostname)
        for probe in _name_probes(name):
            entry = self._names.get(probe)
            if entry is not None:
                return entry, entry.negated
        return None

    def _match_ip(self, ip: str | IPAddress) -> _Hit | None:
        """Return the entry deciding the address check (``dkimf_checkip()``), if any."""
        address = _client_address(ip, unmap=self._patterns is None)
        if address is None:
            return None
        if self._patterns is not None:
            return self._patterns.decide(_address_probes(address))
        value = int(address)
        for _plen, mask, table in self._v4 if address.version == 4 else self._v6:
            entry = table.get(value & mask)
            if entry is not None:
                return entry, entry.negated
        return None

    def find(self, ip: str | IPAddress | None, hostname: str | None = None) -> HostEntry | None:
        """Return the including entry that makes the client match, or ``None`` (for logging)."""
        if hostname:
            hit = self._match_name(hostname)
            if hit is not None and not hit[1]:
                return hit[0]
        if ip is not None:
            hit = self._match_ip(ip)
            if hit is not None and not hit[1]:
                return hit[0]
        return None

    def matches(self, ip: str | IPAddress | None, hostname: str | None = None) -> bool:
        """Tell whether a client (address and/or host name) is in the list; see the class doc."""
        return self.find(ip, hostname) is not None
