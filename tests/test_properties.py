"""Property-based tests for every parser we own (issue 6).

Each parser takes hostile text and may raise only its documented error; what it returns is
traceable to what went in. Strategies build the structure the parsers look for (directive lines
from the real directive table, tag=value lists, header-shaped text with folding, quotes,
comments, angle brackets, encoded words, NUL and 8-bit), not only random text.

Properties that other modules already hold are not repeated here: random From text
(test_dmarc), DMARC tag soup (test_dmarc), random bytes and tag lists as a DKIM-Signature
(test_dkim_verify), literal refile patterns (test_datasets), SPF evaluation (test_spf_check).
The whole pipeline is fuzzed by ``fuzz/run.py`` (``make fuzz``).
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

import authres
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authmilter import authresults
from authmilter.addresses import FromStatus, author_domain, normalize_domain
from authmilter.config import (
    DIRECTIVES,
    Component,
    Config,
    Directive,
    Kind,
    load_split,
    read_policyd_spf_text,
)
from authmilter.datasets import (
    SUPPORTED_TYPES,
    FileDataset,
    HostList,
    ListDataset,
    RegexDataset,
    open_dataset,
    parse_spec,
)
from authmilter.dkim_verify import verify_message
from authmilter.dmarc import DmarcRecordError, NotDmarcRecord, parse_record
from authmilter.errors import ConfigError, KeyMaterialError, Location
from authmilter.keys import KeyRecordError, load_private_key, parse_key_record
from authmilter.keytable import parse_key_entry
from authmilter.pipeline import Connection, Context, _unfold
from authmilter.resolver import parse_nameserver, parse_nameservers
from authmilter.results import (
    DkimOutcome,
    DkimResult,
    DmarcOutcome,
    DmarcPolicy,
    DmarcResult,
    SpfIdentity,
    SpfOutcome,
    SpfResult,
)
from authmilter.spf_check import SpfWhitelist, received_spf
from authmilter.taglist import parse_tag_list
from dnsserver import make_zone
from fakedns import ZoneResolver
from helpers import NoKeys, assert_plausible, make_message

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
CONF = "generated.conf"
WHERE = Location("/etc/authmilter.conf", 7)

# -- building blocks ----------------------------------------------------------------------------

#: Characters that make parsers branch: separators, quotes, brackets, controls, line breaks of
#: every kind str.splitlines() knows, 8-bit, a lone surrogate (surrogateescape'd byte).
_NASTY = [
    " ", "\t", ",", ";", ":", "=", "#", "!", "*", "@", ".", "/", "\\", '"', "'", "(", ")", "<",
    ">", "[", "]", "%s", "\x00", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\r", "\r\n", "\n",
    "é", "ü", "ｘ", "\udce9", "xn--", "=?utf-8?q?caf=C3=A9?=", "=?iso-8859-1?b?4Q==?=",
]  # fmt: skip
_WORD = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,12}", fullmatch=True)
_NASTY_TEXT = st.lists(st.one_of(st.sampled_from(_NASTY), _WORD), max_size=12).map("".join)
_ANY_TEXT = st.one_of(st.text(max_size=40), _NASTY_TEXT)
#: Deeply nested comments, balanced or not: recursive parsers (email.utils, authres) overflow.
_DEEP = st.builds(lambda n, close, inner: "(" * n + inner + ")" * (n if close else n // 2),
                  st.integers(min_value=100, max_value=1500), st.booleans(),
                  st.sampled_from(["x", "a@b.test", ""]))  # fmt: skip
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_DOMAIN = st.lists(_LABEL, min_size=1, max_size=3).map(lambda ls: ".".join([*ls, "test"]))
_FWS = st.sampled_from(["", " ", "\t", "  ", "\r\n ", "\r\n\t", "\n "])
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _editor_lines(text: str) -> list[str]:
    """Lines as an editor numbers them (``sed -n Np``): split at LF only."""
    return text.split("\n")


# =============================================================================================
# 1. Configuration: only ConfigError escapes, and it names the file:line at fault.
# =============================================================================================

# Include reads other files; it has its own tests in test_config.
_DIRECTIVES = [d for d in DIRECTIVES if d.name != "Include"]
_CROSS_RULES = {"KeyFile", "Selector", "KeyTable", "SigningTable", "RejectString"}

_HOST = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=4).map(lambda a: f"{a}/32"),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    _DOMAIN,
    _DOMAIN.map(lambda d: "." + d),
)
_HOSTS = st.lists(st.tuples(st.booleans(), _HOST), min_size=1, max_size=4).map(
    lambda xs: ", ".join(("!" if neg else "") + h for neg, h in xs))
_HEADER_NAMES = st.lists(st.sampled_from(["From", "To", "Subject", "Date", "X-Any"]),
                         min_size=1, max_size=4)  # fmt: skip


def _header_list(names: list[str]) -> st.SearchStrategy[str]:
    edited = "*," + ",".join(f"+{n}" if i % 2 else f"-{n}" for i, n in enumerate(names))
    return st.sampled_from([",".join(names), edited, "csl:" + ",".join(names)])


_VALID: dict[Kind, st.SearchStrategy[str]] = {
    Kind.BOOL: st.sampled_from(["yes", "no", "true", "False", "1", "0", "Y", "n"]),
    Kind.INT: st.integers(min_value=0, max_value=10**6).map(str),
    Kind.OCTAL: st.sampled_from(["007", "0077", "022", "0", "777"]),
    Kind.STRING: _WORD,
    Kind.LIST: st.lists(_WORD, min_size=1, max_size=3).map(", ".join),
    Kind.ACTION: st.sampled_from(["accept", "reject", "tempfail", "discard", "quarantine",
                                  "a", "r", "T", "Quarantine"]),  # fmt: skip
    Kind.SOCKET: st.sampled_from(["inet:8891@127.0.0.1", "inet6:8891@[::1]", "inet:25",
                                  "local:/run/a.sock", "/run/b.sock", "unix:/x"]),  # fmt: skip
    Kind.CANON: st.sampled_from(["relaxed/simple", "simple", "relaxed/relaxed", "Simple/Relaxed"]),
    Kind.MODE: st.sampled_from(["s", "v", "sv", "vs", "SV"]),
    Kind.ALGORITHM: st.sampled_from(["rsa-sha256", "ed25519-sha256", "RSA-SHA256"]),
    Kind.DATASET: _HOSTS,
    Kind.HOSTS: _HOSTS.map(lambda h: "csl:" + h),
    Kind.HEADERS: _HEADER_NAMES.flatmap(_header_list),
}


def _valid_value(d: Directive) -> st.SearchStrategy[str]:
    if d.kind is Kind.CHOICE:
        return st.sampled_from([*d.choices, *(c.upper() for c in d.choices)])
    return _VALID[d.kind]


def _spelled(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.lower(), name.upper()])


@st.composite
def _valid_line(draw: st.DrawFn, pool: Sequence[Directive]) -> tuple[Directive, str, str]:
    d = draw(st.sampled_from(pool))
    value = draw(_valid_value(d))
    sep = draw(st.sampled_from([" ", "\t", "   "]))
    if d.component is Component.POLICYD_SPF:
        sep = draw(st.sampled_from([sep, " = "]))  # pasted from policyd-spf.conf
    comment = draw(st.sampled_from(["", " # note", "\t#"]))
    return d, value, f"{draw(_spelled(d.name))}{sep}{value}{comment}"


@st.composite
def _hostile_line(draw: st.DrawFn) -> str:
    kind = draw(st.integers(min_value=0, max_value=5))
    if kind == 0:
        return draw(_valid_line(_DIRECTIVES))[2]
    if kind == 1:  # a known name with a hostile value
        d = draw(st.sampled_from(_DIRECTIVES))
        return f"{draw(_spelled(d.name))}{draw(_FWS)} {draw(_ANY_TEXT)}"
    if kind == 2:  # unknown names, typos
        typo = draw(st.sampled_from(_DIRECTIVES)).name[:-1]
        return f"{draw(st.sampled_from([typo, 'Bogus', 'ldap:x']))} {draw(_ANY_TEXT)}"
    if kind == 3:
        return draw(st.sampled_from(["", "   ", "# comment", "\t# x", "\ufeff"]))
    if kind == 4:  # a name alone (missing value)
        return draw(st.sampled_from(_DIRECTIVES)).name
    return draw(_ANY_TEXT)


def _assert_located(err: ConfigError, path: str, text: str) -> None:
    """The error names ``path:line`` and that line (as an editor counts) holds the culprit."""
    assert err.where is not None, err
    assert err.where.path == path, err
    assert err.where.line is not None, err
    assert str(err).startswith(f"{path}:{err.where.line}: "), err
    lines = _editor_lines(text)
    assert 1 <= err.where.line <= len(lines), (err, len(lines))
    words = lines[err.where.line - 1].split("#", 1)[0].split()
    assert words, (err, lines[err.where.line - 1])
    # Every message names the directive of its line (or quotes the unknown name).
    assert words[0].lower() in err.message.lower(), (err, lines[err.where.line - 1])


@SETTINGS
@given(lines=st.lists(_hostile_line(), max_size=10),
       eol=st.sampled_from(["\n", "\r\n"]))  # fmt: skip
def test_config_text_raises_only_config_error_at_the_culprit_line(
    lines: list[str], eol: str
) -> None:
    text = eol.join(lines)
    try:
        cfg = Config.from_text(text, path=CONF)
    except ConfigError as err:
        _assert_located(err, CONF, text)
        return
    for attr, where in cfg.where.items():
        assert where.path == CONF and where.line is not None
        first = _editor_lines(text)[where.line - 1].split()[0].lower()
        assert DIRECTIVES_BY_LOWER[first].field_name == attr, (attr, where)


DIRECTIVES_BY_LOWER = {d.name.lower(): d for d in DIRECTIVES}
_SIMPLE = [d for d in _DIRECTIVES if d.name not in _CROSS_RULES]


def _loads_alone(line: str) -> bool:
    try:
        Config.from_text(line, path=CONF)
    except ConfigError:
        return False  # a directive with rules of its own (MetricsListen, …) and a generic value
    return True


@SETTINGS
@given(st.lists(_valid_line(_SIMPLE), min_size=1, max_size=12))
def test_lines_that_load_alone_load_together_and_the_last_one_wins(
    lines: list[tuple[Directive, str, str]],
) -> None:
    lines = [row for row in lines if _loads_alone(row[2])]
    text = "\n".join(line for _, _, line in lines)
    cfg = Config.from_text(text, path=CONF)
    last = {d.name: (i, line) for i, (d, _, line) in enumerate(lines, start=1)}
    for name, (lineno, line) in last.items():
        d = DIRECTIVES_BY_LOWER[name.lower()]
        if d.field_name not in cfg.where:
            continue  # recognised but not implemented: warned about, no attribute
        assert cfg.location(d.field_name) == Location(CONF, lineno)
        alone = Config.from_text(line, path=CONF)
        assert getattr(cfg, d.field_name) == getattr(alone, d.field_name), line


_POLICYD = [d for d in DIRECTIVES if d.component is Component.POLICYD_SPF]


@st.composite
def _policyd_line(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        d, value, _ = draw(_valid_line(_POLICYD))
        return f"{draw(_spelled(d.name))}{draw(st.sampled_from(['=', ' = ', '  =']))}{value}"
    name = draw(st.one_of(st.sampled_from([d.name for d in DIRECTIVES]), _WORD))
    return f"{name}{draw(st.sampled_from(['', '=', ' = ', ' ']))}{draw(_ANY_TEXT)}"


@SETTINGS
@given(st.lists(_policyd_line(), max_size=8))
def test_policyd_spf_text_raises_only_config_error_with_its_line(lines: list[str]) -> None:
    text = "\n".join(lines)
    try:
        settings_ = read_policyd_spf_text(text, "policyd-spf.conf")
    except ConfigError as err:
        assert err.where is not None and err.where.path == "policyd-spf.conf"
        assert err.where.line is not None
        assert 1 <= err.where.line <= len(_editor_lines(text)), err
        return
    for s in settings_:
        assert s.where.line is not None
        name = _editor_lines(text)[s.where.line - 1].partition("=")[0].strip()
        assert name.lower() == s.directive.name.lower()


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("split")


@settings(max_examples=60, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(texts=st.tuples(*[st.lists(_hostile_line(), max_size=5).map("\n".join)] * 2),
       policyd=st.lists(_policyd_line(), max_size=4).map("\n".join))  # fmt: skip
def test_split_files_raise_only_config_error_naming_one_of_them(
    split_dir: Path, texts: tuple[str, str], policyd: str
) -> None:
    paths = [split_dir / "opendkim.conf", split_dir / "opendmarc.conf", split_dir / "spf.conf"]
    for path, text in zip(paths, [*texts, policyd], strict=True):
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        loaded = load_split(*(str(p) for p in paths))
    except ConfigError as err:
        assert err.where is not None and err.where.line is not None, err
        assert err.where.path in {str(p) for p in paths}, err
        return
    assert set(loaded.config.sources) <= {str(p) for p in paths}


# =============================================================================================
# 2. Datasets and host lists
# =============================================================================================

_SPEC_PREFIX = st.sampled_from(["", "csl:", "CSL:", "file:", "refile:", "File:", "db:", "ldap:",
                                "x:", "./", "../", "/", "file:./"])  # fmt: skip


@SETTINGS
@given(prefix=_SPEC_PREFIX, rest=_ANY_TEXT)
def test_parse_spec_classifies_or_raises_config_error_at_the_config_line(
    prefix: str, rest: str
) -> None:
    spec = prefix + rest
    try:
        kind, body = parse_spec(spec, where=WHERE)
    except ConfigError as err:
        assert err.where == WHERE and str(err).startswith(f"{WHERE}: ")
        return
    assert kind in SUPPORTED_TYPES
    assert spec.endswith(body)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("datasets")
    (base / "table").write_text("a.test x\n# c\n\n*@b.test y\n")
    (base / "indented").write_text("ok 1\n  *@x.test bad\n")
    return base


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(prefix=_SPEC_PREFIX,
       rest=st.one_of(_ANY_TEXT, st.sampled_from(["table", "indented", "", "missing", "a\x00b"])),
       case_sensitive=st.booleans(), ascii_only=st.booleans())  # fmt: skip
def test_open_dataset_raises_only_config_error(
    data_dir: Path, prefix: str, rest: str, case_sensitive: bool, ascii_only: bool
) -> None:
    spec = prefix + rest
    try:
        ds = open_dataset(spec, where=WHERE, case_sensitive=case_sensitive,
                          ascii_only=ascii_only, base_dir=data_dir)  # fmt: skip
    except ConfigError as err:
        assert err.where is not None
        # Spec and unreadable-file errors point at the config line, bad entries at their file.
        assert err.where == WHERE or Path(err.where.path).parent == data_dir, err
        return
    for key, value, where in ds.entries():
        assert key and key == key.strip(" \t\n\v\f\r")
        assert where == WHERE or where.line is not None
        if ascii_only and not key.isascii():
            assert ds.get(key) is None  # DKIMF_DB_FLAG_ASCIIONLY: such a query matches nothing
        else:
            assert ds.get(key) is not None and value in ds.get_all(key)


@SETTINGS
@given(st.lists(_ANY_TEXT, max_size=8).map("\n".join))
def test_file_dataset_keys_come_from_their_line(text: str) -> None:
    ds = FileDataset.from_text(text, path="table")
    lines = _editor_lines(text.removeprefix("\ufeff"))
    for key, value, where in ds.entries():
        assert where.path == "table" and where.line is not None
        line = lines[where.line - 1]
        assert key in line.split("#", 1)[0] and value in line
        assert not any(c in key for c in " \t\n\v\f\r#")
        assert key in ds


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["", " ", "\t"]), _ANY_TEXT), max_size=8))
def test_refile_raises_only_at_an_indented_line_and_every_pattern_matches_itself(
    rows: list[tuple[str, str]],
) -> None:
    text = "\n".join(indent + body for indent, body in rows)
    try:
        ds = RegexDataset.from_text(text, path="patterns")
    except ConfigError as err:
        assert err.where is not None and err.where.path == "patterns" and err.where.line
        assert _editor_lines(text)[err.where.line - 1][:1] in (" ", "\t", "\v", "\f", "\r")
        return
    for key, value, _where in ds.entries():
        assert ds.get(key) is not None and value in ds.get_all(key)


@SETTINGS
@given(st.lists(st.one_of(_ANY_TEXT, st.tuples(_WORD, _ANY_TEXT).map("=".join)),
                max_size=6).map(",".join))  # fmt: skip
def test_csl_raises_only_config_error_and_keys_are_trimmed_text(text: str) -> None:
    try:
        ds = ListDataset.from_text(text, where=WHERE)
    except ConfigError as err:
        assert err.where == WHERE and "empty key" in err.message
        return
    for key, _value, where in ds.entries():
        assert key and key in text and where == WHERE
        assert "," not in key and "=" not in key


_ENTRY = st.one_of(
    _HOST,
    st.ip_addresses(v=4).map(lambda a: f"{a}/{a.max_prefixlen - 3}"),  # host bits, maybe
    st.tuples(st.ip_addresses(), st.integers(min_value=0, max_value=140)).map(
        lambda t: f"{t[0]}/{t[1]}"),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    _ANY_TEXT,
)


@SETTINGS
@given(negated=st.booleans(), body=_ENTRY)
def test_host_entry_raises_only_config_error_and_matches_what_it_names(
    negated: bool, body: str
) -> None:
    text = ("!" if negated else "") + body
    try:
        entry = HostList.parse_entry(text, WHERE)
    except ConfigError as err:
        assert err.where == WHERE
        return
    hosts = HostList([entry])
    # dkimf_checkhost() looks every entry up by its text: the name check finds it.
    assert hosts.matches(None, body) is not negated
    if entry.network is not None:
        assert hosts.matches(str(entry.network.network_address)) is not negated
        assert hosts.matches(ipaddress.ip_address(entry.network.broadcast_address)) is not negated


@SETTINGS
@given(entries=st.lists(st.tuples(st.booleans(), _HOST), max_size=6),
       ip=st.one_of(st.ip_addresses().map(str), _ANY_TEXT),
       hostname=st.one_of(st.none(), _DOMAIN, _ANY_TEXT))  # fmt: skip
def test_host_list_answers_any_client(entries: list[tuple[bool, str]], ip: str,
                                      hostname: str | None) -> None:  # fmt: skip
    hosts = HostList.from_entries((("!" if n else "") + h, None) for n, h in entries)
    found = hosts.find(ip, hostname)
    assert hosts.matches(ip, hostname) is (found is not None)
    assert found is None or not found.negated


@SETTINGS
@given(name=_WORD, value=_ANY_TEXT)
def test_keytable_entry_raises_only_config_error(name: str, value: str) -> None:
    try:
        entry = parse_key_entry(name, value, WHERE)
    except ConfigError as err:
        assert err.where == WHERE
        return
    assert entry.domain and entry.selector and entry.key_source
    assert entry.domain == entry.domain.lower() and entry.selector in value
    assert entry.key_source in value and entry.where == WHERE


# =============================================================================================
# 3. From: header-shaped values, as the MTA hands them over (folding, 8-bit, encoded words).
# =============================================================================================

_MAILBOX = st.one_of(
    st.builds(lambda local, dom: f"{local}@{dom}", _WORD, _DOMAIN),
    st.builds(lambda name, local, dom: f'"{name}" <{local}@{dom}>',
              _NASTY_TEXT.map(lambda t: t.replace('"', "")), _WORD, _DOMAIN),
    st.builds(lambda name, local, dom: f"{name} <{local}@{dom}>", _NASTY_TEXT, _WORD, _DOMAIN),
    st.builds(lambda c, local, dom: f"({c}) {local}@{dom} ({c})", _NASTY_TEXT, _WORD, _DOMAIN),
    st.builds(lambda g, mbox: f"{g}: {mbox};", _WORD, _WORD.map(lambda w: w + "@g.test")),
)  # fmt: skip


@st.composite
def _from_value(draw: st.DrawFn) -> bytes:
    """A From value as the milter gets it: leading space, LF folding, raw 8-bit bytes."""
    parts = draw(st.lists(st.one_of(_MAILBOX, _NASTY_TEXT, _DEEP), min_size=1, max_size=3))
    text = draw(st.sampled_from([", ", ",", " , "])).join(parts)
    folded = "".join(c + ("\n " if c == " " and draw(st.booleans()) else "") for c in text)
    data = (" " + folded).encode("utf-8", "surrogateescape")
    if draw(st.booleans()):
        at = draw(st.integers(min_value=0, max_value=len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xe9", b"\xff\xfe", b"\x00", b"\r"])) + data[at:]
    return data


@pytest.fixture(scope="module")
def connection() -> Connection:
    cfg = Config.from_text("AuthservID mx.properties.test\nMode v\n")
    resolver = ZoneResolver(make_zone("properties.test", []), "properties.test")
    return Connection(Context.build(cfg, resolver=resolver), hostname=None, ip="192.0.2.1")


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(values=st.lists(_from_value(), min_size=1, max_size=2))
def test_from_fields_give_a_plausible_author_or_a_reason(
    connection: Connection, values: list[bytes]
) -> None:
    txn = connection.transaction()
    for value in values:
        txn.header("From", value)
    texts = [_unfold(v) for v in values]  # as the pipeline reads them
    author = author_domain(texts)
    if author.status is FromStatus.OK:
        assert_plausible(texts[0], author)
        assert len(values) == 1
    else:
        assert author.domain is None and author.detail
    address = txn.author_address()  # the signer is chosen by this one (OpenDKIM's rule)
    assert address is None or "@" in address
    if author.status is FromStatus.OK and address is not None:
        # When the field parses strictly, the signer is chosen by the same domain. (When it
        # does not, email.utils may glue text after a comment to the domain, e.g.
        # "a@evil.test (x).example.com" gives "a@evil.test.example.com": reported.)
        assert normalize_domain(address.rpartition("@")[2]) == author.domain, (address, author)


# =============================================================================================
# 4. DMARC record: white space, case and separators around the version tag.
# =============================================================================================

_DMARC_TAGS = st.lists(st.tuples(
    st.sampled_from(["p", "sp", "np", "pct", "adkim", "rua", "t", "psd", "P", "x-new"]),
    st.sampled_from(["reject", "none", "quarantine", "50", "s", "y", "mailto:a@b.test",
                     "", "R", "101", " bad"])), max_size=6)  # fmt: skip


@SETTINGS
@given(v=st.sampled_from(["v", "V", " v", "version"]),
       version=st.sampled_from(["DMARC1", "dmarc1", "DMARC1 ", "DMARC2", ""]),
       ws=st.lists(st.sampled_from(["", " ", "\t", "\r\n "]), min_size=4, max_size=4),
       tags=_DMARC_TAGS, sep=st.sampled_from([";", "; ", " ;", ";;"]))  # fmt: skip
def test_dmarc_record_is_skipped_iff_the_version_tag_is_not_v_dmarc1(
    v: str, version: str, ws: list[str], tags: list[tuple[str, str]], sep: str
) -> None:
    text = f"{ws[0]}{v}{ws[1]}={ws[2]}{version}{ws[3]}"
    text += "".join(f"{sep}{ws[1]}{name}={value}" for name, value in tags)
    first_ok = v.strip() in ("v", "V") and version.strip() == "DMARC1"
    try:
        record = parse_record(text)
    except NotDmarcRecord:
        assert not first_ok, text
        return
    except DmarcRecordError as err:
        assert first_ok and str(err), text
        return
    assert first_ok, text
    assert all(key == key.lower() for key in record.tags)
    given_p = [value for name, value in tags if name.lower() == "p"]
    if given_p and given_p[0].lower() in ("none", "quarantine", "reject") and not record.warnings:
        assert record.p.value == given_p[0].lower()


# =============================================================================================
# 5. Authentication-Results: what we write reads back exactly; what others wrote never raises.
# =============================================================================================

_AID = st.one_of(_DOMAIN, st.tuples(_DOMAIN, _WORD).map("/".join))
#: Envelope and HELO text a client controls (SMTP allows quoted local parts with anything).
_CLIENT_TEXT = st.one_of(
    st.builds(lambda local, dom: f"{local}@{dom}", _WORD, _DOMAIN),
    st.builds(lambda inj, dom: f'"{inj}"@{dom}', _NASTY_TEXT, _DOMAIN),
    st.builds(lambda inj, dom: f"x@{dom}{inj}", _NASTY_TEXT, _DOMAIN),
    _NASTY_TEXT,
)
_REASONS = st.one_of(st.none(), _NASTY_TEXT)


def _dkim_outcomes() -> st.SearchStrategy[list[DkimOutcome]]:
    return st.lists(st.builds(
        DkimOutcome, result=st.sampled_from(list(DkimResult)), domain=st.one_of(st.none(), _DOMAIN),
        selector=st.one_of(st.none(), _WORD), reason=_REASONS,
        identity=st.one_of(st.none(), _CLIENT_TEXT),
        algorithm=st.one_of(st.none(), st.just("rsa-sha256")),
        b=st.one_of(st.none(), st.just("dGVzdHNpZ25hdHVyZQ==")),
        key_bits=st.one_of(st.none(), st.just(2048)), testing=st.booleans()), max_size=3)


def _spf_outcome() -> st.SearchStrategy[SpfOutcome | None]:
    return st.one_of(st.none(), st.builds(
        SpfOutcome, result=st.sampled_from(list(SpfResult)),
        identity=st.sampled_from(list(SpfIdentity)), sender=_CLIENT_TEXT, domain=_DOMAIN,
        client_ip=st.ip_addresses().map(str), helo=st.one_of(st.none(), _CLIENT_TEXT),
        comment=_REASONS, problem=_REASONS))


def _dmarc_outcome() -> st.SearchStrategy[DmarcOutcome | None]:
    return st.one_of(st.none(), st.builds(
        DmarcOutcome, result=st.sampled_from(list(DmarcResult)),
        from_domain=st.one_of(st.none(), _DOMAIN),
        policy=st.one_of(st.none(), st.sampled_from(list(DmarcPolicy))),
        disposition=st.sampled_from(list(DmarcPolicy))))


def _one_line_utf8(value: str) -> None:
    """Header text as pymilter hands it to libmilter: one line, UTF-8 ("ss" arguments)."""
    assert not _CONTROL.search(value), value
    value.encode("utf-8")  # a lone surrogate (an undecodable byte) raises here


def _same_modulo_quoting(written: str | None, given: str | None) -> bool:
    """A property value read back equals the one given, whatever quoting made it one value."""
    if not written or not given:
        return not written and not given  # authres leaves an empty value out
    return re.sub(r'["\\]', "", written) == re.sub(r'["\\]', "", given)


def _clean(text: str | None) -> bool:
    """Text without controls (C0, C1) or lone surrogates, which are rewritten, not kept."""
    return text is None or not re.search(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]", text)


@settings(max_examples=300, deadline=None)
@given(aid=_AID, dkim=_dkim_outcomes(), spf=_spf_outcome(), dmarc=_dmarc_outcome(),
       header_b=st.booleans())  # fmt: skip
def test_our_authentication_results_read_back_exactly(
    aid: str, dkim: list[DkimOutcome], spf: SpfOutcome | None, dmarc: DmarcOutcome | None,
    header_b: bool,
) -> None:
    value = authresults.build(aid, dkim=dkim, spf=spf, dmarc=dmarc, header_b=header_b)
    _one_line_utf8(value)
    assert authresults.claims(value, [aid])  # our own field is recognised as ours
    if not value.isascii() or "/" in aid:
        return  # authres reads neither UTF-8 (RFC 6532) nor a quoted authserv-id (RFC 8601)
    parsed = authres.all_features().parse_value(value)
    assert str(parsed.authserv_id) == aid
    # No client text (MAIL FROM, HELO, i=) adds, hides or changes a clause.
    expected = [("dkim", o.result.value) for o in dkim]
    expected += [("spf", spf.result.value)] if spf is not None else []
    expected += [("dmarc", dmarc.result.value)] if dmarc is not None else []
    assert [(r.method, r.result) for r in parsed.results] == expected, value
    for outcome, clause in zip(dkim, parsed.results, strict=False):
        assert clause.header_d == outcome.domain, value
        # authres drops a quoted value followed by another property (header.s), so a quoted
        # header.i is checked only when authres kept it. Written bare: dot-atoms around the
        # "@", no leading, trailing or doubled dot ("x@0.test." is quoted).
        plain = re.fullmatch(r"(?:[\w+-]+(?:\.[\w+-]+)*)?@[\w-]+(?:\.[\w-]+)*",
                             outcome.identity or "", re.ASCII)  # fmt: skip
        if _clean(outcome.identity) and (plain or clause.header_i is not None):
            assert _same_modulo_quoting(clause.header_i, outcome.identity), value
    if spf is not None:
        clause = parsed.results[len(dkim)]
        if spf.identity is SpfIdentity.MAILFROM:
            written, given = clause.smtp_mailfrom, spf.sender
        else:
            written, given = clause.smtp_helo, spf.helo or spf.domain
        if _clean(given):
            assert _same_modulo_quoting(written, given), value
    # A reader trusting us sees exactly our DKIM passes.
    upstream = authresults.trusted_upstream([value], [aid])
    passes = [o.domain.lower() for o in dkim if o.result is DkimResult.PASS and o.domain]
    assert upstream.dkim_pass_domains == tuple(dict.fromkeys(passes)), value


_AR_PIECES = st.one_of(
    st.sampled_from(["mx.test", "MX.Test", "other.test", ";", " ", "(", ")", "(mx.test)", '"',
                     "\\", "=", ".", "dkim=pass", "spf=fail", "dmarc=none", "header.d=",
                     "smtp.mailfrom=", "@", "i=1;", "none", "\r\n ", "\x00", "é", "\udce9",
                     "=?utf-8?q?mx.test?="]),
    _WORD,
    _DEEP,
)  # fmt: skip


@SETTINGS
@given(values=st.lists(st.lists(_AR_PIECES, max_size=14).map("".join), max_size=3),
       ours=st.lists(st.sampled_from(["mx.test", ".test", "other.test", ".mx.test"]),
                     min_size=1, max_size=2))  # fmt: skip
def test_upstream_results_are_read_without_raising(values: list[str], ours: list[str]) -> None:
    for value in values:
        claimed = authresults.claims(value, ours)
        if not any(name.lower().lstrip(".") in value.lower() for name in ours) and (
            "\\" not in value and "=?" not in value
        ):
            assert not claimed, (value, ours)
    upstream = authresults.trusted_upstream(values, ours)
    for domain in upstream.dkim_pass_domains:
        assert domain == domain.lower() and any(domain in v.lower() for v in values)
    if upstream.spf_mailfrom is not None:
        assert upstream.spf_result is not None


# =============================================================================================
# 6. DKIM-Signature as a header field: folding, FWS around "=" and ";", duplicates, 8-bit.
# =============================================================================================

_SIG_TAG = st.tuples(
    st.sampled_from(["v", "a", "b", "bh", "d", "h", "s", "i", "l", "q", "t", "x", "c", "z",
                     "V", "D", "9x", "", "_"]),
    st.one_of(st.sampled_from(["1", "rsa-sha256", "example.test", "sel", "from:to", "AAAA",
                               "relaxed/relaxed", "dns/txt", "5", "@example.test",
                               "a(@example.test", '"@example.test', "x@sub.example.test"]),
              _NASTY_TEXT),  # fmt: skip
    _FWS, _FWS,
)


@SETTINGS
@given(tags=st.lists(_SIG_TAG, max_size=12), trailing=st.sampled_from(["", ";", "; ", ";;"]),
       eight_bit=st.sampled_from([b"", b"\xe9", b"\xff", b"\x00"]))  # fmt: skip
def test_header_shaped_signatures_give_one_line_reasons(
    tags: list[tuple[str, str, str, str]], trailing: str, eight_bit: bytes
) -> None:
    value = ";".join(f"{w1}{name}{w2}={w1}{v}{w2}" for name, v, w1, w2 in tags) + trailing
    raw = value.encode("utf-8", "surrogateescape").replace(b"\r\n", b"\r\n ") + eight_bit
    message = b"DKIM-Signature: " + raw + b"\r\n" + make_message()
    for outcome in verify_message(message, NoKeys()):
        assert outcome.result in (DkimResult.PERMERROR, DkimResult.FAIL), outcome
        # The reason goes into the A-R comment, the log line and maybe an SMTP reply.
        assert outcome.reason, outcome
        _one_line_utf8(outcome.reason)
        for text in (outcome.domain, outcome.selector, outcome.identity):
            if text is not None:
                _one_line_utf8(text)


# =============================================================================================
# 7. DKIM key records: only KeyRecordError, from parsing to the public key object.
# =============================================================================================

_KEY_TAG = st.tuples(
    st.sampled_from(["v", "k", "p", "h", "s", "t", "n", "g", "x", "P", "", "1"]),
    st.one_of(st.sampled_from(["DKIM1", "rsa", "ed25519", "RSA", "sha256", "sha1:sha256", "email",
                               "*", "y:s", "y::s", "", "MCowBQYDK2VwAyEA", "=41=20"]),
              st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode()),
              _NASTY_TEXT),  # fmt: skip
    _FWS,
)


@SETTINGS
@given(tags=st.lists(_KEY_TAG, max_size=8), as_bytes=st.booleans())
def test_key_records_raise_only_key_record_error(
    tags: list[tuple[str, str, str]], as_bytes: bool
) -> None:
    text = ";".join(f"{ws}{name}{ws}={ws}{value}" for name, value, ws in tags)
    try:
        pairs = parse_tag_list(text)
    except ValueError:
        pairs = None
    else:
        assert len({name for name, _ in pairs}) == len(pairs)
    try:
        record = parse_key_record(text.encode("utf-8", "surrogateescape") if as_bytes else text)
    except KeyRecordError as err:
        assert str(err)
        return
    assert pairs is not None  # a record parsed means its tag-list parsed
    try:
        record.public_key()
    except KeyRecordError as err:
        assert str(err)


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("keys")
    base.chmod(0o700)
    return base


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(name=st.one_of(_NASTY_TEXT, st.just("\x00")), content=st.one_of(
    st.binary(max_size=200),
    st.sampled_from([
        b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN RSA PRIVATE KEY-----\n\n-----END RSA PRIVATE KEY-----\n"])),
       mode=st.sampled_from([0o600, 0o644, 0o000]), write=st.booleans())  # fmt: skip
def test_private_key_files_raise_only_key_material_error(
    key_dir: Path, name: str, content: bytes, mode: int, write: bool
) -> None:
    path = str(key_dir / "k") + name
    if write and "\x00" not in name and "/" not in name:
        try:
            Path(path).write_bytes(content)
            Path(path).chmod(mode)
        except (OSError, UnicodeEncodeError):
            pass
    try:
        key = load_private_key(path)
    except KeyMaterialError as err:
        assert str(err)
    else:
        assert key.public_p()


# =============================================================================================
# 8. SPF helpers that write or read text, and nameserver specs.
# =============================================================================================


@SETTINGS
@given(outcome=_spf_outcome(), receiver=st.one_of(_DOMAIN, st.just("<UNKNOWN>")),
       envelope=st.one_of(st.none(), _CLIENT_TEXT))  # fmt: skip
def test_received_spf_is_one_header_line(outcome: SpfOutcome | None, receiver: str,
                                         envelope: str | None) -> None:  # fmt: skip
    if outcome is None:
        return
    value = received_spf(outcome, receiver=receiver, envelope_from=envelope)
    _one_line_utf8(value)
    assert value.startswith(outcome.result.value.capitalize() + " (")
    assert f"receiver={receiver}" in value or f'receiver="{receiver}"' in value


@SETTINGS
@given(st.lists(st.one_of(_HOST, _ANY_TEXT), max_size=4))
def test_spf_whitelists_raise_only_value_error(entries: list[str]) -> None:
    try:
        SpfWhitelist(skip_addresses=tuple(entries), whitelist=tuple(entries))
    except ValueError as err:
        assert "is not an IP network" in str(err)


_NS = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.tuples(st.ip_addresses(v=4), st.integers(min_value=0, max_value=70000)).map(
        lambda t: f"{t[0]}:{t[1]}"),
    st.tuples(st.ip_addresses(v=6), st.integers(min_value=0, max_value=70000)).map(
        lambda t: f"[{t[0]}]:{t[1]}"),
    _ANY_TEXT,
)


@SETTINGS
@given(spec=_NS)
def test_nameserver_spec_raises_only_value_error_and_round_trips(spec: str) -> None:
    try:
        address, port = parse_nameserver(spec)
    except ValueError as err:
        assert str(err)
        return
    ip = ipaddress.ip_address(address)
    assert 1 <= port <= 65535
    written = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    assert parse_nameserver(written) == (address, port)


@SETTINGS
@given(st.lists(_NS, max_size=4).map(",".join))
def test_nameserver_list_raises_only_value_error(text: str) -> None:
    try:
        servers = parse_nameservers(text)
    except ValueError as err:
        assert str(err)
        return
    assert len(servers) == len(text.split(","))
