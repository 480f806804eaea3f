"""Which keys sign a message: OpenDKIM's KeyTable / SigningTable, or the single-key mode.

Keys are loaded once, when the store is built (at start and on reload), never per message:
parsing and validating a PEM key costs tens of milliseconds, and the supervisor, which builds
the store, can read keys the unprivileged workers cannot. That holds for a KeyTable path with
``%`` (the From domain) too: every file the path matches is read then (``%`` standing for
any file-name part), so a new domain's key file is used after a reload, as a new KeyTable
line is.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass

from authmilter.config import Config, DatasetSpec, load_config, user_id_account
from authmilter.datasets import Dataset, RegexDataset, open_dataset
from authmilter.errors import ConfigError, KeyMaterialError, Location
from authmilter.keys import PrivateKey, key_owners, load_private_key, parse_private_key


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One KeyTable line: ``name  domain:selector:key``.

    ``domain`` may be ``%`` (the From domain); ``key_source`` is a path, or an inline
    base64 key, and may contain ``%`` too.
    """

    name: str
    domain: str
    selector: str
    key_source: str
    where: Location | None = None

    @property
    def is_path(self) -> bool:
        """OpenDKIM's rule: a value starting with ``/``, ``./`` or ``../`` names a file."""
        return self.key_source.startswith(("/", "./", "../"))


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A key chosen to sign one message, with ``%`` already replaced."""

    keyname: str
    domain: str
    selector: str
    key: PrivateKey
    identity: str | None = None  # the i= value the SigningTable asked for, if any


def parse_key_entry(name: str, value: str, where: Location | None) -> KeyEntry:
    """Split a KeyTable value ``domain:selector:key`` (the key part may contain colons).

    :raises ConfigError: when a part is missing.
    """
    parts = value.split(":", 2)
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise ConfigError(
            f"KeyTable entry '{name}': value must be domain:selector:keyfile, got '{value}'",
            where)  # fmt: skip
    domain, selector, key = (p.strip() for p in parts)
    return KeyEntry(name, domain.lower(), selector, key, where)


class KeyStore:
    """The signing-key lookup for a configuration: ``keys_for(from_address)``."""

    def __init__(self, *, key_table: Dataset | None, signing_table: Dataset | None,
                 entries: dict[str, KeyEntry], loaded: dict[str, PrivateKey],
                 domains: Dataset | None, single: KeyEntry | None, sub_domains: bool,
                 multiple: bool, percent: dict[str, dict[str, PrivateKey]] | None = None,
                 ) -> None:  # fmt: skip
        self._key_table = key_table
        self._signing_table = signing_table
        self._entries = entries
        self._loaded = loaded
        self._domains = domains
        self._single = single
        self._sub_domains = sub_domains
        self._multiple = multiple
        self._percent = percent or {}

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Config) -> KeyStore:
        """Open the tables and load every key they name, and every file a path with ``%``
        matches. A key must be safe for this configuration: owned by root, the running user or
        the ``UserID`` user (see :func:`authmilter.keys.unsafe_key_file_reason`).

        :raises ConfigError: for unreadable tables, malformed lines, unreadable or unsafe keys,
            each naming the file:line that named them; for an unknown ``UserID``.
        """
        safe = config_key_owners(cfg) if cfg.require_safe_keys else None
        entries: dict[str, KeyEntry] = {}
        loaded: dict[str, PrivateKey] = {}
        percent: dict[str, dict[str, PrivateKey]] = {}
        key_table = signing_table = domains = None
        single = None
        if cfg.key_table is not None:
            # OpenDKIM opens the KeyTable case-sensitively and the SigningTable ASCII-only.
            key_table = _open(cfg.key_table, case_sensitive=True)
            for name, value, where in key_table.entries():
                entry = parse_key_entry(name, value, where)
                entries.setdefault(name, entry)
                if "%" not in entry.key_source:
                    loaded[name] = _load(entry, safe)
                elif _is_path(entry.key_source) and name not in percent:
                    percent[name] = _load_matching(entry, safe)
            if cfg.signing_table is not None:
                signing_table = _open(cfg.signing_table, ascii_only=True)
        elif cfg.key_file is not None and cfg.selector is not None:
            if cfg.domain is None:
                raise ConfigError("single-key signing (KeyFile/Selector) needs Domain",
                                  cfg.location("key_file"))  # fmt: skip
            domains = _open(cfg.domain)
            single = KeyEntry("(KeyFile)", "%", cfg.selector, cfg.key_file,
                              cfg.location("key_file"))  # fmt: skip
            loaded[single.name] = _load(single, safe)
        return cls(key_table=key_table, signing_table=signing_table, entries=entries,
                   loaded=loaded, domains=domains, single=single, sub_domains=cfg.sub_domains,
                   multiple=cfg.multiple_signatures, percent=percent)

    # -- questions ----------------------------------------------------------------------------

    @property
    def can_sign(self) -> bool:
        """True when some sender could get a signature."""
        return self._single is not None or (
            self._signing_table is not None and bool(self._entries))

    def entries(self) -> list[KeyEntry]:
        """Every KeyTable entry (or the single key), in table order."""
        if self._single is not None:
            return [self._single]
        return list(self._entries.values())

    def warnings(self) -> tuple[tuple[str, Location], ...]:
        """Lines of a ``refile:`` SigningTable that OpenDKIM (and so authmilter) ignores."""
        table = self._signing_table
        return table.warnings if isinstance(table, RegexDataset) else ()

    def dangling_names(self) -> list[tuple[str, Location]]:
        """SigningTable key names that the KeyTable does not define (``%`` excepted)."""
        if self._signing_table is None:
            return []
        out = []
        for _key, value, where in self._signing_table.entries():
            keyname, _identity = _split_signer(value)
            if keyname != "%" and keyname not in self._entries:
                out.append((keyname, where))
        return out

    def named_key(self, name: str, where: Location | None = None) -> SigningKey:
        """The KeyTable key called ``name``, for a directive that names one (ARCSealKey).

        :raises ConfigError: at ``where`` when there is no such key, or its domain or key
            file depends on the From domain (``%``).
        """
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(self._entries) or "none"
            raise ConfigError(f"no KeyTable key named '{name}' (keys: {known})", where)
        if entry.domain == "%" or "%" in entry.key_source:
            raise ConfigError(f"KeyTable key '{name}' depends on the From domain ('%'); name "
                              "a key with a fixed domain and key file", where)  # fmt: skip
        return SigningKey(entry.name, entry.domain, entry.selector, self._loaded[name])

    def keys_for(self, address: str) -> list[SigningKey]:
        """The keys that sign mail whose From address is ``address`` (first match, or all
        with MultipleSignatures), in SigningTable order.

        :raises KeyMaterialError: when a table names a key that cannot be used.
        """
        local, _, domain = address.rpartition("@")
        domain = domain.lower().rstrip(".")
        if not domain:
            return []
        if self._single is not None:
            signer = self._single_domain(domain)
            if signer is None:
                return []
            return [SigningKey(self._single.name, signer, self._single.selector,
                               self._loaded[self._single.name])]  # fmt: skip
        if self._signing_table is None:
            return []
        values = self._signing_values(local, domain)
        out: list[SigningKey] = []
        seen: set[str] = set()
        for value in values:
            keyname, identity = _split_signer(value)
            keyname = domain if keyname == "%" else keyname
            if keyname in seen:
                continue
            seen.add(keyname)
            entry = self._entries.get(keyname)
            if entry is None:
                raise KeyMaterialError(f"SigningTable names key '{keyname}', which is not in "
                                       "the KeyTable")  # fmt: skip
            out.append(self._signing_key(entry, domain, identity))
            if not self._multiple:
                break
        return out

    # -- internals ----------------------------------------------------------------------------

    def _single_domain(self, domain: str) -> str | None:
        assert self._domains is not None
        if domain in self._domains:
            return domain
        if self._sub_domains:
            labels = domain.split(".")
            for i in range(1, len(labels)):
                parent = ".".join(labels[i:])
                if parent in self._domains:
                    return parent
        return None

    def _signing_values(self, local: str, domain: str) -> list[str]:
        st = self._signing_table
        assert st is not None
        address = f"{local}@{domain}" if local else domain
        if isinstance(st, RegexDataset):
            # refile: wildcard patterns against the address, in file order.
            return st.get_all(address)
        # OpenDKIM's order: user@host, host, user@.parent…, .parent…, user@*, *.
        candidates = [address, domain]
        parents = [m.start() for m in re.finditer(r"\.", domain)]
        candidates += [f"{local}@{domain[p:]}" for p in parents]
        candidates += [domain[p:] for p in parents]
        candidates += [f"{local}@*", "*"]
        found: list[str] = []
        for c in candidates:
            found.extend(st.get_all(c))
            if found and not self._multiple:
                break
        return found

    def _signing_key(self, entry: KeyEntry, domain: str, identity: str | None) -> SigningKey:
        d = domain if entry.domain == "%" else entry.domain
        key = self._loaded.get(entry.name)
        if key is None:
            source = entry.key_source.replace("%", domain)
            if not _is_path(source):  # an inline key that names the domain: parse it here
                key = _load_key(source, entry, None)
            else:
                key = self._percent.get(entry.name, {}).get(domain)
            if key is None:
                raise KeyMaterialError(
                    f"{source}: no such key file when the configuration was last read (a "
                    "KeyTable path with '%' is read at start and at each reload: add the "
                    "file, then reload)")  # fmt: skip
        ident = identity.replace("%", domain) if identity else None
        return SigningKey(entry.name, d, entry.selector, key, ident)


def config_key_owners(cfg: Config) -> frozenset[int]:
    """Who may own keys under ``cfg``: root, the running user and the ``UserID`` user (whom
    the workers become). The milter, config-test, testkey and rotate all judge by this.

    :raises ConfigError: for an unknown UserID user or group.
    """
    account = user_id_account(cfg)
    return key_owners([account.uid] if account else [])


def _split_signer(value: str) -> tuple[str, str | None]:
    """A SigningTable value: ``keyname`` with an optional signer (i=) after a colon or space."""
    parts = re.split(r"[:\s]+", value.strip(), maxsplit=1)
    return parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)


def _open(spec: DatasetSpec, *, case_sensitive: bool = False, ascii_only: bool = False) -> Dataset:
    """Open a dataset the configuration names; errors point at the config line."""
    return open_dataset(spec.spec, where=spec.where, case_sensitive=case_sensitive,
                        ascii_only=ascii_only)  # fmt: skip


def _is_path(source: str) -> bool:
    return source.startswith(("/", "./", "../"))


def _load_key(source: str, entry: KeyEntry, safe: frozenset[int] | None) -> PrivateKey:
    """Load a key from a path or an inline value; errors name the KeyTable line. ``safe``:
    the users who may own key files (RequireSafeKeys), or None not to check."""
    try:
        if _is_path(source):
            return load_private_key(source, require_safe=safe is not None, trusted=safe)
        return parse_private_key(source.encode(), source=f"KeyTable entry '{entry.name}'")
    except KeyMaterialError as e:
        raise ConfigError(str(e), entry.where) from e


def _load(entry: KeyEntry, safe: frozenset[int] | None) -> PrivateKey:
    """Load the key a table entry names (no ``%`` in it)."""
    return _load_key(entry.key_source, entry, safe)


def _load_matching(entry: KeyEntry, safe: frozenset[int] | None) -> dict[str, PrivateKey]:
    """Every key file a path with ``%`` matches, by the (lower-case) domain in its name.

    Each ``%`` stands for the same non-empty file-name part, as OpenDKIM puts the same
    domain in each; the rest of the path is taken literally.
    """
    parts = entry.key_source.split("%")
    pattern = "*".join(glob.escape(p) for p in parts)
    regex = re.compile(re.escape(parts[0]) + "(?P<d>[^/]+)"
                       + "(?P=d)".join(re.escape(p) for p in parts[1:]) + r"\Z")  # fmt: skip
    found: dict[str, PrivateKey] = {}
    for path in sorted(glob.glob(pattern)):
        m = regex.match(path)
        if m is None:
            continue
        found.setdefault(m.group("d").lower(), _load_key(path, entry, safe))
    return found


def load_key_entries(config_path: str) -> list[KeyEntry]:
    """The KeyTable entries (or the single KeyFile key) of a configuration file, for testkey.

    :raises ConfigError: when the configuration or its tables cannot be read.
    """
    cfg = load_config(config_path).config
    if cfg.key_table is not None:
        table = _open(cfg.key_table, case_sensitive=True)
        return [parse_key_entry(n, v, w) for n, v, w in table.entries()]
    if cfg.key_file is not None and cfg.selector is not None and cfg.domain is not None:
        domains = _open(cfg.domain)
        return [KeyEntry("(KeyFile)", d, cfg.selector, cfg.key_file, cfg.location("key_file"))
                for d, _v, _w in domains.entries()]  # fmt: skip
    return []
