"""OpenDKIM datasets (``file:``, ``refile:``, ``csl:``) and the host lists built from them.

A *dataset* is the value of directives such as ``KeyTable``, ``SigningTable``, ``PeerList`` or
``InternalHosts`` (opendkim(8), DATA SETS). The type comes from the spec string, exactly as
OpenDKIM 2.11's ``dkimf_db_open()`` decides it:

* ``file:PATH`` or a bare ``/PATH`` (we also take ``./PATH`` and ``../PATH``): a flat file, one
  ``key [value]`` entry per line (:class:`FileDataset`);
* ``refile:PATH``: one ``pattern [value]`` per line, ``*`` the only wildcard
  (:class:`RegexDataset`);
* ``csl:a,b=c`` or any other string: a comma-separated list (:class:`ListDataset`);
* ``db:``, ``dsn:``, ``ldap:`` … and a bare name ending in ``.db``: known to OpenDKIM, not supported
  here, a :class:`~authmilter.errors.ConfigError`.

Values are returned raw; :func:`split_fields` splits them on ``:`` the way OpenDKIM fills its
multi-field requests (``KeyTable``: ``domain:selector:keyfile``).

:class:`HostList` answers ``PeerList`` / ``InternalHosts`` / ``ExternalIgnoreList`` questions with
OpenDKIM's ``dkimf_checkhost()`` + ``dkimf_checkip()`` precedence rules.
"""

from __future__ import annotations

import ipaddress
import os
import re
import string
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Final, TypeAlias

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
    ``|`` to ``regcomp()``; authmilter follows the documented rule and keeps them literal.)
    """

    kind: ClassVar[str] = "refile"

    spec: str
    source: str
    records: tuple[Record, ...]
    case_sensitive: bool = False
    ascii_only: bool = False
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

        :raises ConfigError: at ``path:line`` for a pattern line that starts with a blank.
            OpenDKIM 2.11 cuts the pattern at the first blank, finds it empty and silently drops
            the whole line; authmilter refuses rather than quietly disagree with it.
        """
        records: list[Record] = []
        for lineno, line in _data_lines(text):
            if line[0] in _WS:
                raise ConfigError(
                    "refile line starts with whitespace, which OpenDKIM silently ignores; "
                    "remove the indentation (or comment the line out)",
                    Location(path, lineno),
                )
            records.append((*_key_value(line), Location(path, lineno)))
        return cls(
            spec=f"refile:{path}" if spec is None else spec,
            source=path,
            records=tuple(records),
            case_sensitive=case_sensitive,
            ascii_only=ascii_only,
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


@dataclass(frozen=True, slots=True)
class HostEntry:
    """One host-list entry as written, with the network it denotes if it is an address entry."""

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


def _address_entry(body: str, text: str, where: Location | None) -> IPNetwork:
    """Parse the body of an address or CIDR entry (after any ``!``), brackets allowed.

    :raises ConfigError: if it is not a valid address/CIDR, or a CIDR has host bits set.
    """
    match = _BRACKETED_RE.fullmatch(body)
    if match is not None:
        body = match["addr"] + match["rest"]
    address, slash, prefix = body.partition("/")
    if not slash:
        try:
            return _as_ipv4(ipaddress.ip_network(ipaddress.ip_address(address)))
        except ValueError:
            raise ConfigError(
                f"host list entry '{text}' is not a valid IP address", where
            ) from None
    if not (prefix.isascii() and prefix.isdigit()):
        raise ConfigError(
            f"host list entry '{text}': the prefix length must be a number of bits", where
        )
    try:
        network = ipaddress.ip_network(f"{address}/{prefix}")
    except ValueError:
        try:
            loose = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
        except ValueError:
            raise ConfigError(
                f"host list entry '{text}' is not a valid address/prefix", where
            ) from None
        # opendkim util.c dkimf_checkip() compares the masked client address as text, so an
        # entry with host bits set can never match there; refuse it rather than guess.
        raise ConfigError(
            f"host list entry '{text}' has host bits set (OpenDKIM never matches it); "
            f"did you mean '{'!' if text.startswith('!') else ''}{loose}'?",
            where,
        ) from None
    return _as_ipv4(network)


def _looks_like_address(body: str) -> bool:
    """Tell an address/CIDR entry from a host or domain name (names have no ``: / [``)."""
    return any(c in body for c in ":/[") or _DOTTED_RE.fullmatch(body) is not None


# Rank within one prefix length, highest first: OpenDKIM probes "!ip", "ip", "![ip]", "[ip]"
# before "!ip/32", "ip/32", "![ip]/32", "[ip]/32".
_Rank: TypeAlias = tuple[bool, bool, bool]
_Level: TypeAlias = tuple[int, int, dict[int, HostEntry]]


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


def _client_address(ip: str | IPAddress) -> IPAddress | None:
    """Parse the client address (brackets, ``%scope`` allowed); ``None`` if it is not one."""
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
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class HostList:
    """A ``PeerList``-style host list, matched with OpenDKIM 2.11's precedence.

    Entries are host names (``mail.example.com``), domains (``.example.com``: every name *below*
    example.com, not example.com itself), IPv4/IPv6 addresses in any textual form, optionally in
    square brackets, IPv4-mapped IPv6 addresses, and CIDR blocks; ``!`` in front of any of them
    excludes instead of including. :meth:`matches` follows ``dkimf_checkhost()`` then
    ``dkimf_checkip()``:

    * the host name is tried first: the full name, then each parent domain with its leading dot
      (``a.b.example.com``, ``.b.example.com``, ``.example.com``, ``.com``); at each step an
      excluding entry is looked for before an including one, and the first hit decides the name
      check. Names compare case-insensitively.
    * then the address: the most specific entry containing it decides — longest prefix first, a
      bare address before the same address as ``/32`` (``/128``), unbracketed before bracketed,
      exclusion before inclusion at equal specificity. So ``!192.0.2.1`` inside ``192.0.2.0/24``
      excludes just that host. An IPv4-mapped client address is checked as IPv4 (OpenDKIM would
      only compare it with IPv6 entries).
    * the client matches if either check includes it (OpenDKIM ORs them): an excluded host name
      does not stop an included address, nor the other way round.

    An entry's key is the dataset key (any value after it is ignored). Instances are immutable.
    """

    __slots__ = ("_entries", "_names", "_v4", "_v6")

    def __init__(self, entries: Iterable[HostEntry]) -> None:
        """Build the lookup tables; prefer :meth:`from_dataset` / :meth:`from_entries`."""
        self._entries = tuple(entries)
        names: dict[str, HostEntry] = {}
        v4: list[tuple[IPNetwork, _Rank, HostEntry]] = []
        v6: list[tuple[IPNetwork, _Rank, HostEntry]] = []
        for entry in self._entries:
            body = entry.text[1:] if entry.negated else entry.text
            # dkimf_checkhost() looks every entry up by its text, addresses included.
            key = _fold(body)
            held = names.get(key)
            if held is None or (entry.negated and not held.negated):
                names[key] = entry
            if entry.network is not None:
                rank = ("/" not in body, not body.startswith("["), entry.negated)
                target = v4 if entry.network.version == 4 else v6
                target.append((entry.network, rank, entry))
        self._names = names
        self._v4 = _build_levels(v4, 32)
        self._v6 = _build_levels(v6, 128)

    @staticmethod
    def parse_entry(text: str, where: Location | None = None) -> HostEntry:
        """Parse one host-list entry.

        :raises ConfigError: at ``where`` for an empty entry, an invalid address or CIDR, or a
            CIDR with host bits set (``10.0.0.1/8``): OpenDKIM compares the masked client
            address as text, so such an entry never matches there, and widening it silently
            would be worse.
        """
        negated = text.startswith("!")
        body = text[1:] if negated else text
        if not body.strip(_WS):
            raise ConfigError(f"host list entry '{text}' is empty", where)
        network = _address_entry(body, text, where) if _looks_like_address(body) else None
        return HostEntry(text=text, negated=negated, where=where, network=network)

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[str, Location | None]]) -> HostList:
        """Build a host list from ``(entry text, where it was written)`` pairs.

        :raises ConfigError: for a bad entry (see :meth:`parse_entry`).
        """
        return cls(cls.parse_entry(text, where) for text, where in entries)

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> HostList:
        """Build a host list from the keys of a ``file:`` or ``csl:`` dataset.

        :raises ConfigError: for a bad entry, at its data-file line, or for a ``refile:``
            dataset (OpenDKIM would probe its patterns with ``!``-prefixed names and
            ``ip/bits`` strings; authmilter does not emulate that).
        """
        if isinstance(dataset, RegexDataset):
            raise ConfigError(
                "a host list cannot be a refile: dataset (use file: or csl:)",
                Location(dataset.source),
            )
        return cls.from_entries((key, where) for key, _value, where in dataset.entries())

    @classmethod
    def default(cls, hosts: Iterable[str] = DEFAULT_INTERNAL_HOSTS) -> HostList:
        """Build a host list from plain entry strings, by default OpenDKIM's ``InternalHosts``.

        :raises ConfigError: for a bad entry (see :meth:`parse_entry`).
        """
        return cls.from_entries((host, None) for host in hosts)

    @property
    def entries(self) -> tuple[HostEntry, ...]:
        """Every entry, in the order given."""
        return self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"HostList({[entry.text for entry in self._entries]!r})"

    def _match_name(self, hostname: str) -> HostEntry | None:
        """Return the entry deciding the name check (``dkimf_checkhost()``), if any."""
        name = _fold(hostname)
        start = 0
        while True:
            entry = self._names.get(name[start:])
            if entry is not None:
                return entry
            start = name.find(".", start + 1)
            if start < 0:
                return None

    def _match_ip(self, ip: str | IPAddress) -> HostEntry | None:
        """Return the entry deciding the address check (``dkimf_checkip()``), if any."""
        address = _client_address(ip)
        if address is None:
            return None
        value = int(address)
        for _plen, mask, table in self._v4 if address.version == 4 else self._v6:
            entry = table.get(value & mask)
            if entry is not None:
                return entry
        return None

    def find(self, ip: str | IPAddress | None, hostname: str | None = None) -> HostEntry | None:
        """Return the including entry that makes the client match, or ``None`` (for logging)."""
        if hostname:
            entry = self._match_name(hostname)
            if entry is not None and not entry.negated:
                return entry
        if ip is not None:
            entry = self._match_ip(ip)
            if entry is not None and not entry.negated:
                return entry
        return None

    def matches(self, ip: str | IPAddress | None, hostname: str | None = None) -> bool:
        """Tell whether a client (address and/or host name) is in the list; see the class doc."""
        return self.find(ip, hostname) is not None
