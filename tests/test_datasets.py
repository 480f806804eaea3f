"""Tests for OpenDKIM datasets (file:, refile:, csl:) and host lists."""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import locale
import re
import socket
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authmilter.datasets import (
    DEFAULT_INTERNAL_HOSTS,
    FileDataset,
    HostList,
    ListDataset,
    RegexDataset,
    open_dataset,
    parse_spec,
    split_fields,
)
from authmilter.ere import (
    BitMatcher,
    RefilePattern,
    RegexError,
    as_bytes,
    mkregexp,
    python_regex,
    subject,
)
from authmilter.errors import ConfigError, Location

CONF_LINE = Location("/etc/opendkim.conf", 7)


def write(tmp_path: Path, name: str, text: str) -> str:
    """Write a data file under tmp_path and return its path as a string."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def hosts(*entries: str) -> HostList:
    """Build a host list from entry strings."""
    return HostList.from_entries((entry, None) for entry in entries)


# --- choosing the dataset type ---------------------------------------------------------------


def test_file_prefix_opens_flat_file(tmp_path: Path) -> None:
    path = write(tmp_path, "keys", "example.com example.com:sel:/keys/a.pem\n")
    ds = open_dataset(f"file:{path}")
    assert isinstance(ds, FileDataset)
    assert ds.get("example.com") == "example.com:sel:/keys/a.pem"


def test_bare_absolute_path_is_file(tmp_path: Path) -> None:
    path = write(tmp_path, "peers", "mail.example.com\n")
    ds = open_dataset(path)
    assert isinstance(ds, FileDataset)
    assert ds.spec == path
    assert ds.source == path
    assert "mail.example.com" in ds


@pytest.mark.parametrize("spec", ["./peers", "../data/peers"])
def test_dot_relative_path_is_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str
) -> None:
    (tmp_path / "data").mkdir()
    write(tmp_path / "data", "peers", "relative.example.com\n")
    work = tmp_path / "data" if spec.startswith("./") else tmp_path / "other"
    work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)
    ds = open_dataset(spec)
    assert isinstance(ds, FileDataset)
    assert "relative.example.com" in ds


def test_path_containing_a_colon_is_still_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "keys:2024", "k v\n")
    assert parse_spec(path) == ("file", path)
    assert open_dataset(path).get("k") == "v"


def test_base_dir_resolves_relative_file_path(tmp_path: Path) -> None:
    write(tmp_path, "signing", "*@example.com key1\n")
    ds = open_dataset("refile:signing", base_dir=tmp_path)
    assert ds.source == str(tmp_path / "signing")
    assert ds.get("a@example.com") == "key1"


def test_type_prefix_is_case_insensitive(tmp_path: Path) -> None:
    path = write(tmp_path, "keys", "k v\n")
    assert isinstance(open_dataset(f"FILE:{path}"), FileDataset)
    assert isinstance(open_dataset(f"ReFile:{path}"), RegexDataset)
    assert isinstance(open_dataset("CSL:a,b"), ListDataset)


def test_plain_string_is_csl() -> None:
    ds = open_dataset("example.com, example.net")
    assert isinstance(ds, ListDataset)
    assert ds.source == "csl"
    assert [key for key, _, _ in ds.entries()] == ["example.com", "example.net"]


def test_refile_without_colon_is_csl() -> None:
    ds = open_dataset("refile")
    assert isinstance(ds, ListDataset)
    assert "refile" in ds


def test_colon_after_first_comma_does_not_make_a_type_prefix() -> None:
    assert parse_spec("127.0.0.1,::1") == ("csl", "127.0.0.1,::1")
    ds = open_dataset("a,b:c")
    assert [key for key, _, _ in ds.entries()] == ["a", "b:c"]


@pytest.mark.parametrize("spec", ["::1", "fe80::1,10.0.0.1", "!2001:db8::1", "[2001:db8::1]"])
def test_ipv6_literal_without_prefix_is_csl(spec: str) -> None:
    assert parse_spec(spec) == ("csl", spec)


def test_csl_prefix_is_stripped_from_list_text() -> None:
    assert parse_spec("csl:a=b:c,d") == ("csl", "a=b:c,d")
    ds = open_dataset("csl:a=b:c,d")
    assert ds.get("a") == "b:c"
    assert ds.spec == "csl:a=b:c,d"


def test_unknown_type_prefix_is_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        open_dataset("flie:/etc/opendkim/keys", where=CONF_LINE)
    assert info.value.message == "unknown dataset type 'flie:' (supported: file:, refile:, csl:)"
    assert info.value.where == CONF_LINE


@pytest.mark.parametrize(
    "kind", ["db", "dsn", "ldap", "ldaps", "ldapi", "lua", "memcache", "erlang", "mdb", "repute"]
)
def test_unsupported_dataset_types_raise_with_config_location(kind: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_dataset(f"{kind}:whatever/x", where=CONF_LINE)
    assert info.value.message == (
        f"dataset type '{kind}:' is not supported by authmilter (supported: file:, refile:, csl:)"
    )
    assert info.value.where == CONF_LINE
    assert str(info.value).startswith("/etc/opendkim.conf:7: dataset type")


def test_bare_name_ending_in_db_is_unsupported_berkeley_db() -> None:
    with pytest.raises(ConfigError) as info:
        open_dataset("/etc/opendkim/peers.db", where=CONF_LINE)
    assert "dataset type 'db:' is not supported by authmilter" in info.value.message
    assert "Berkeley DB" in info.value.message
    assert info.value.where == CONF_LINE


def test_missing_file_error_names_path_reason_and_config_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError) as info:
        open_dataset(f"file:{missing}", where=CONF_LINE)
    assert missing in info.value.message
    assert "No such file or directory" in info.value.message
    assert info.value.where == CONF_LINE


def test_directory_as_data_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        open_dataset(f"refile:{tmp_path}", where=CONF_LINE)
    assert str(tmp_path) in info.value.message
    assert "Is a directory" in info.value.message
    assert info.value.where == CONF_LINE


def test_file_spec_without_path_is_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        open_dataset("file:", where=CONF_LINE)
    assert "names no file" in info.value.message
    assert info.value.where == CONF_LINE


# --- file: ----------------------------------------------------------------------------------


def test_file_key_value_split_at_first_whitespace(tmp_path: Path) -> None:
    ds = open_dataset(write(tmp_path, "t", "sel._domainkey.example.com\texample.com:sel:/k.pem\n"))
    assert ds.get("sel._domainkey.example.com") == "example.com:sel:/k.pem"


def test_file_value_keeps_inner_whitespace_and_trims_ends(tmp_path: Path) -> None:
    ds = open_dataset(write(tmp_path, "t", "  key \t  first  second\tthird   \n"))
    assert ds.get("key") == "first  second\tthird"


def test_file_key_only_line_has_empty_value(tmp_path: Path) -> None:
    ds = open_dataset(write(tmp_path, "t", "example.com\n"))
    assert ds.get("example.com") == ""
    assert "example.com" in ds


def test_file_hash_starts_comment_anywhere_on_line(tmp_path: Path) -> None:
    ds = open_dataset(write(tmp_path, "t", "# header\nkey value # trailing\nother#glued\n"))
    assert ds.get("key") == "value"
    assert ds.get("other") == ""
    assert "#" not in "".join(key + value for key, value, _ in ds.entries())


def test_file_blank_and_comment_lines_are_skipped_but_line_numbers_kept(tmp_path: Path) -> None:
    path = write(tmp_path, "t", "# comment\n\n   \t\nfirst 1\n# again\nsecond 2\n")
    ds = open_dataset(path)
    assert len(ds) == 2
    assert ds.entries() == [
        ("first", "1", Location(path, 4)),
        ("second", "2", Location(path, 6)),
    ]


def test_file_crlf_line_endings_are_trimmed(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_bytes(b"key value\r\nalone\r\n")
    ds = open_dataset(str(path))
    assert ds.get("key") == "value"
    assert ds.get("alone") == ""


def test_file_lookup_is_case_insensitive_by_default(tmp_path: Path) -> None:
    ds = open_dataset(write(tmp_path, "t", "Example.COM Value:With:Case\n"))
    assert ds.get("example.com") == "Value:With:Case"
    assert ds.get("EXAMPLE.com") == "Value:With:Case"
    assert ds.entries()[0][0] == "Example.COM"


def test_case_sensitive_dataset_matches_exact_case_only(tmp_path: Path) -> None:
    ds = open_dataset(write(tmp_path, "keytable", "MyKey example.com:s:/k\n"), case_sensitive=True)
    assert ds.get("MyKey") == "example.com:s:/k"
    assert ds.get("mykey") is None


def test_ascii_only_dataset_matches_nothing_for_non_ascii_query(tmp_path: Path) -> None:
    path = write(tmp_path, "signing", "user@example.com k\nüser@example.com k1\n*@example.com k2\n")
    plain = open_dataset(path)
    strict = open_dataset(path, ascii_only=True)
    assert plain.get("üser@example.com") == "k1"
    assert strict.get("üser@example.com") is None
    assert strict.get_all("üser@example.com") == []
    assert "üser@example.com" not in strict
    assert strict.get("user@example.com") == "k"
    wild = open_dataset(f"refile:{path}", ascii_only=True)
    assert wild.get("üser@example.com") is None
    assert wild.get_all("üser@example.com") == []
    assert open_dataset(f"refile:{path}").get_all("üser@example.com") == ["k1", "k2"]


def test_non_ascii_case_is_not_folded(tmp_path: Path) -> None:
    ds = open_dataset(write(tmp_path, "t", "ÉCOLE.example x\n"))
    assert ds.get("école.example") is None  # É/é differ: strcasecmp() folds ASCII only
    assert ds.get("École.EXAMPLE") == "x"


def test_file_duplicate_keys_get_first_and_get_all_in_file_order(tmp_path: Path) -> None:
    ds = open_dataset(write(tmp_path, "t", "k one\nother x\nK two\nk three\n"))
    assert ds.get("k") == "one"
    assert ds.get_all("k") == ["one", "two", "three"]


def test_missing_key_is_none_empty_and_not_contained(tmp_path: Path) -> None:
    ds = open_dataset(write(tmp_path, "t", "present v\n"))
    assert ds.get("absent") is None
    assert ds.get_all("absent") == []
    assert "absent" not in ds
    assert 42 not in ds


def test_empty_file_is_empty_dataset(tmp_path: Path) -> None:
    ds = open_dataset(write(tmp_path, "t", "# nothing here\n\n"))
    assert len(ds) == 0
    assert ds.entries() == []
    assert ds.get("anything") is None


def test_utf8_bom_is_not_part_of_first_key(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_bytes(b"\xef\xbb\xbfexample.com v\n")
    assert open_dataset(str(path)).get("example.com") == "v"


def test_undecodable_bytes_do_not_stop_loading(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_bytes(b"# caf\xe9 comment in latin-1\nexample.com v\n")
    assert open_dataset(str(path)).get("example.com") == "v"


# --- refile: --------------------------------------------------------------------------------


def refile(tmp_path: Path, text: str, *, case_sensitive: bool = False) -> RegexDataset:
    """Open a refile dataset written from text."""
    path = write(tmp_path, "signing", text)
    ds = open_dataset(f"refile:{path}", case_sensitive=case_sensitive)
    assert isinstance(ds, RegexDataset)
    return ds


def test_refile_star_at_domain_matches_user(tmp_path: Path) -> None:
    ds = refile(tmp_path, "*@example.com key1\n")
    assert ds.get("user@example.com") == "key1"


def test_refile_star_at_domain_does_not_match_subdomain(tmp_path: Path) -> None:
    ds = refile(tmp_path, "*@example.com key1\n")
    assert ds.get("user@sub.example.com") is None


def test_refile_star_at_star_dot_domain_matches_subdomains(tmp_path: Path) -> None:
    ds = refile(tmp_path, "*@*.example.com key1\n")
    assert ds.get("user@sub.example.com") == "key1"
    assert ds.get("user@a.b.example.com") == "key1"
    assert ds.get("user@example.com") is None


def test_refile_star_matches_empty_dots_and_at(tmp_path: Path) -> None:
    ds = refile(tmp_path, "a*z v\n")
    assert ds.get("az") == "v"
    assert ds.get("a.b@c.z") == "v"
    assert ds.get("ab") is None


def test_refile_pattern_is_anchored_at_both_ends(tmp_path: Path) -> None:
    ds = refile(tmp_path, "user@example.com v\n")
    assert ds.get("user@example.com") == "v"
    assert ds.get("xuser@example.com") is None
    assert ds.get("user@example.comx") is None
    assert ds.get("user@example.com\n") is None


def test_refile_plus_in_pattern_is_literal(tmp_path: Path) -> None:
    ds = refile(tmp_path, "a+b@example.com v\n")
    assert ds.get("a+b@example.com") == "v"
    assert ds.get("aab@example.com") is None
    assert ds.get("ab@example.com") is None


def test_refile_dot_does_not_match_any_character(tmp_path: Path) -> None:
    ds = refile(tmp_path, "*@example.com v\n")
    assert ds.get("user@exampleXcom") is None


@pytest.mark.parametrize(
    ("pattern", "literal", "regex_reading"),
    [
        ("us?r@example.com", "us?r@example.com", "ur@example.com"),
        ("[abc]@example.com", "[abc]@example.com", "a@example.com"),
        ("(a|b)@example.com", "(a|b)@example.com", "a@example.com"),
        ("^a$@example.com", "^a$@example.com", "a@example.com"),
        ("a{2}@example.com", "a{2}@example.com", "aa@example.com"),
        ("a\\d@example.com", "a\\d@example.com", "a1@example.com"),
    ],
)
def test_refile_regex_metacharacters_are_literal(
    tmp_path: Path, pattern: str, literal: str, regex_reading: str
) -> None:
    ds = refile(tmp_path, f"{pattern} v\n")
    assert ds.get(literal) == "v"
    assert ds.get(regex_reading) is None


def test_refile_matching_is_case_insensitive(tmp_path: Path) -> None:
    ds = refile(tmp_path, "*@Example.COM v\n")
    assert ds.get("USER@example.com") == "v"


def test_refile_case_sensitive_option(tmp_path: Path) -> None:
    ds = refile(tmp_path, "*@Example.COM v\n", case_sensitive=True)
    assert ds.get("user@Example.COM") == "v"
    assert ds.get("user@example.com") is None


def test_refile_first_matching_line_wins(tmp_path: Path) -> None:
    ds = refile(tmp_path, "ceo@example.com special\n*@example.com general\n")
    assert ds.get("ceo@example.com") == "special"
    assert ds.get("bob@example.com") == "general"
    reversed_ds = refile(tmp_path, "*@example.com general\nceo@example.com special\n")
    assert reversed_ds.get("ceo@example.com") == "general"


def test_refile_get_all_returns_every_match_in_file_order(tmp_path: Path) -> None:
    ds = refile(tmp_path, "*@example.com first\n*@example.net no\n*@*.com second\n* third\n")
    assert ds.get_all("bob@example.com") == ["first", "second", "third"]
    assert ds.get_all("bob@example.org") == ["third"]


def test_refile_comments_blank_lines_and_values(tmp_path: Path) -> None:
    path = write(tmp_path, "r", "# sign everything\n\n*@example.com   key one  # why\nbare*\n")
    ds = open_dataset(f"refile:{path}")
    assert ds.entries() == [
        ("*@example.com", "key one", Location(path, 3)),
        ("bare*", "", Location(path, 4)),
    ]
    assert ds.get("bareword") == ""
    assert "bareword" in ds


def test_refile_indented_line_is_dropped_as_opendkim_does_with_a_warning(tmp_path: Path) -> None:
    path = write(
        tmp_path, "r", "*@example.com k\n   # indented comment is fine\n  *@example.net k\n"
    )
    ds = open_dataset(f"refile:{path}", where=CONF_LINE)
    assert isinstance(ds, RegexDataset)
    assert ds.get("a@example.com") == "k" and ds.get("a@example.net") is None
    ((message, where),) = ds.warnings
    assert where == Location(path, 3)
    assert message.startswith("refile line '*@example.net k' starts with whitespace")
    hosts = HostList.from_dataset(open_dataset(f"refile:{write(tmp_path, 'h', ' 10.0.0.0/8')}"))
    assert not hosts.matches("10.1.2.3")
    assert [m for m, _w in hosts.warnings][0].startswith("refile line '10.0.0.0/8' starts with")


def test_refile_dataset_spec_and_source(tmp_path: Path) -> None:
    path = write(tmp_path, "r", "* k\n")
    ds = open_dataset(f"refile:{path}")
    assert ds.spec == f"refile:{path}"
    assert ds.source == path
    assert ds.kind == "refile"


_LITERAL_ALPHABET = "".join(
    c for c in string.printable if c not in string.whitespace and c not in "#*"
)


@given(
    pattern=st.text(alphabet=_LITERAL_ALPHABET, min_size=1, max_size=40),
    extra=st.sampled_from(_LITERAL_ALPHABET + "*"),
    position=st.integers(min_value=0, max_value=40),
)
def test_refile_literal_pattern_matches_only_itself_ignoring_case(
    pattern: str, extra: str, position: int
) -> None:
    ds = RegexDataset.from_text(f"{pattern} hit\n", path="generated")
    assert ds.get(pattern) == "hit"
    assert ds.get(pattern.swapcase()) == "hit"
    at = min(position, len(pattern))
    assert ds.get(pattern[:at] + extra + pattern[at:]) is None
    assert ds.get(pattern[:-1]) is None


# --- csl: -----------------------------------------------------------------------------------


def test_csl_elements_are_trimmed() -> None:
    ds = open_dataset("csl:  a.example ,\tb.example  ")
    assert [key for key, _, _ in ds.entries()] == ["a.example", "b.example"]


def test_csl_key_value_element_splits_at_first_equals() -> None:
    ds = open_dataset("csl:k = v=w , plain")
    assert ds.get("k") == "v=w"
    assert ds.get("plain") == ""


def test_csl_empty_elements_are_skipped() -> None:
    ds = open_dataset("a,,b, ,c,")
    assert [key for key, _, _ in ds.entries()] == ["a", "b", "c"]


def test_csl_element_with_empty_key_is_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        open_dataset("csl:a,=b", where=CONF_LINE)
    assert "empty key" in info.value.message
    assert info.value.where == CONF_LINE


def test_csl_entries_are_located_at_config_line() -> None:
    ds = open_dataset("a,b=c", where=CONF_LINE)
    assert ds.entries() == [("a", "", CONF_LINE), ("b", "c", CONF_LINE)]


def test_csl_lookup_is_case_insensitive_and_duplicates_ordered() -> None:
    ds = open_dataset("csl:Key=1,KEY=2")
    assert ds.get("key") == "1"
    assert ds.get_all("kEy") == ["1", "2"]


def test_empty_csl_is_empty_dataset() -> None:
    ds = open_dataset("csl:")
    assert len(ds) == 0
    assert ds.get("") is None


# --- split_fields ---------------------------------------------------------------------------


def test_split_fields_last_field_takes_the_rest() -> None:
    assert split_fields("example.com:sel:/keys/a:b.pem", 3) == [
        "example.com",
        "sel",
        "/keys/a:b.pem",
    ]


def test_split_fields_without_n_splits_every_colon() -> None:
    assert split_fields("a:b::c") == ["a", "b", "", "c"]


def test_split_fields_with_fewer_fields_returns_shorter_list() -> None:
    assert split_fields("keyname", 2) == ["keyname"]


def test_split_fields_rejects_n_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        split_fields("a:b", 0)


# --- host lists -----------------------------------------------------------------------------

# OpenDKIM 2.11 opendkim/tests/t-peer.list and the expectations of t-peer.lua.
T_PEER_LIST = [
    ".example.com",
    "!nonpeer.example.com",
    "!.nonpeer.example.com",
    "allowed.nonpeer.example.com",
    "smtp.example.net",
    "192.168.1.0/24",
    "!192.168.1.64",
    "!192.168.1.128/30",
    "2001:db8::/64",
    "!2001:db8::99",
    "!2001:db8::fff0/126",
]


@pytest.mark.parametrize(
    ("hostname", "ip", "expected"),
    [
        ("peer.example.com", "127.0.0.1", True),
        ("bob.example.com", "127.0.0.1", True),
        ("bob.example.net", "127.0.0.1", False),
        ("nonpeer.example.com", "127.0.0.1", False),
        ("xyz.nonpeer.example.com", "127.0.0.1", False),
        ("allowed.nonpeer.example.com", "127.0.0.1", True),
        ("smtp.example.net", "127.0.0.1", True),
        ("localhost", "127.0.0.1", False),
        ("localhost", "192.168.1.1", True),
        ("localhost", "192.168.1.64", False),
        ("localhost", "192.168.1.128", False),
        ("localhost", "192.168.1.129", False),
        ("localhost", "192.168.1.130", False),
        ("localhost", "192.168.1.131", False),
        ("localhost", "192.168.1.132", True),
        ("localhost", "9001:db8::8:800:200c:417a", False),
        ("localhost", "2001:db8::91", True),
        ("localhost", "2001:db8::fff0", False),
        ("localhost", "2001:db8::fff1", False),
        ("localhost", "2001:db8::fff2", False),
        ("localhost", "2001:db8::fff3", False),
        ("localhost", "2001:db8::fff4", True),
    ],
)
def test_opendkim_t_peer_expectations(hostname: str, ip: str, expected: bool) -> None:
    assert hosts(*T_PEER_LIST).matches(ip, hostname) is expected


def test_host_name_entry_matches_exactly_and_case_insensitively() -> None:
    peers = hosts("mail.example.com")
    assert peers.matches(None, "MAIL.Example.com")
    assert not peers.matches(None, "mail.example.com.evil")
    assert not peers.matches(None, "xmail.example.com")
    assert not peers.matches(None, "sub.mail.example.com")


def test_domain_entry_matches_names_below_it_but_not_the_domain_itself() -> None:
    peers = hosts(".example.com")
    assert peers.matches(None, "host.example.com")
    assert peers.matches(None, "a.b.example.com")
    assert not peers.matches(None, "example.com")
    assert not peers.matches(None, "badexample.com")


def test_longer_domain_suffix_beats_shorter() -> None:
    peers = hosts(".example.com", "!.corp.example.com", ".lab.corp.example.com")
    assert peers.matches(None, "www.example.com")
    assert not peers.matches(None, "pc1.corp.example.com")
    assert peers.matches(None, "box.lab.corp.example.com")


def test_exact_host_name_beats_domain_suffix() -> None:
    assert hosts("!.example.com", "mail.example.com").matches(None, "mail.example.com")
    assert not hosts(".example.com", "!mail.example.com").matches(None, "mail.example.com")


def test_negated_host_inside_allowed_cidr_is_excluded() -> None:
    peers = hosts("192.0.2.0/24", "!192.0.2.1")
    assert not peers.matches("192.0.2.1")
    assert peers.matches("192.0.2.2")


def test_longest_matching_prefix_decides() -> None:
    peers = hosts("10.0.0.0/8", "!10.1.0.0/16", "10.1.2.0/24", "!10.1.2.3/32")
    assert peers.matches("10.9.9.9")
    assert not peers.matches("10.1.9.9")
    assert peers.matches("10.1.2.4")
    assert not peers.matches("10.1.2.3")


def test_entry_order_in_the_list_does_not_matter() -> None:
    assert not hosts("!192.0.2.1", "192.0.2.0/24").matches("192.0.2.1")
    assert hosts("!192.0.2.0/24", "192.0.2.1").matches("192.0.2.1")


def test_exclusion_wins_at_equal_specificity() -> None:
    assert not hosts("192.0.2.0/24", "!192.0.2.0/24").matches("192.0.2.9")
    assert not hosts("mail.example.com", "!mail.example.com").matches(None, "mail.example.com")


def test_bare_address_is_probed_before_the_same_address_as_slash_32() -> None:
    assert hosts("192.0.2.1", "!192.0.2.1/32").matches("192.0.2.1")
    assert not hosts("!192.0.2.1", "192.0.2.1/32").matches("192.0.2.1")


def test_zero_prefix_matches_every_address_of_its_family() -> None:
    peers = hosts("0.0.0.0/0", "!192.0.2.0/24")
    assert peers.matches("198.51.100.7")
    assert not peers.matches("192.0.2.7")
    assert not peers.matches("2001:db8::1")


@pytest.mark.parametrize(
    "entry", ["2001:db8::1", "2001:0db8:0000:0000:0000:0000:0000:0001", "2001:DB8::1"]
)
@pytest.mark.parametrize("client", ["2001:db8::1", "2001:0DB8::0:1"])
def test_ipv6_textual_forms_are_equivalent(entry: str, client: str) -> None:
    assert hosts(entry).matches(client)


def test_ipv6_cidr_matches_inside_and_not_outside() -> None:
    peers = hosts("2001:db8::/32")
    assert peers.matches("2001:db8:ffff::1")
    assert not peers.matches("2001:db9::1")


@pytest.mark.parametrize(
    "entry", ["[192.0.2.1]", "[192.0.2.0]/24", "[2001:db8::1]", "[2001:db8::]/32"]
)
def test_bracketed_entries_match_the_address(entry: str) -> None:
    client = "2001:db8::1" if ":" in entry else "192.0.2.1"
    assert hosts(entry).matches(client)
    assert not hosts(entry).matches("198.51.100.1")


def test_bracketed_client_address_is_accepted() -> None:
    assert hosts("192.0.2.1").matches("[192.0.2.1]")
    assert hosts("2001:db8::1").matches("[2001:db8::1]")


def test_ipaddress_objects_are_accepted_as_client() -> None:
    assert hosts("192.0.2.0/24").matches(ipaddress.ip_address("192.0.2.3"))


def test_ipv4_mapped_client_matches_ipv4_entries() -> None:
    peers = hosts("192.0.2.0/24", "!192.0.2.1")
    assert peers.matches("::ffff:192.0.2.7")
    assert not peers.matches("::ffff:192.0.2.1")


def test_ipv4_mapped_entry_matches_ipv4_client() -> None:
    assert hosts("::ffff:192.0.2.1").matches("192.0.2.1")
    assert hosts("::ffff:192.0.2.0/120").matches("192.0.2.200")
    assert not hosts("::ffff:192.0.2.0/120").matches("192.0.3.1")


def test_ipv6_entries_do_not_match_ipv4_clients() -> None:
    assert not hosts("::/0").matches("192.0.2.1")
    assert hosts("::/0").matches("2001:db8::1")


def test_included_host_name_wins_even_if_address_is_excluded() -> None:
    peers = hosts("mail.example.com", "!192.0.2.1")
    assert peers.matches("192.0.2.1", "mail.example.com")
    assert not peers.matches("192.0.2.1", "other.example.com")


def test_excluded_host_name_does_not_block_an_included_address() -> None:
    # OpenDKIM: internal = checkhost(host) || checkip(ip); an exclusion only ends its own check.
    peers = hosts("!mail.example.com", "192.0.2.0/24")
    assert peers.matches("192.0.2.1", "mail.example.com")
    assert not peers.matches("198.51.100.1", "mail.example.com")


def test_unresolved_client_name_in_brackets_matches_bracketed_entry_text() -> None:
    # libmilter passes "[192.0.2.1]" as the host name when there is no PTR record.
    assert hosts("[192.0.2.1]").matches(None, "[192.0.2.1]")


def test_no_address_and_no_name_matches_nothing() -> None:
    peers = hosts("0.0.0.0/0", "::/0", ".com")
    assert not peers.matches(None, None)
    assert not peers.matches(None, "")


def test_unparseable_client_address_matches_nothing() -> None:
    assert not hosts("0.0.0.0/0").matches("not-an-ip")


def test_empty_host_list_matches_nothing() -> None:
    empty = HostList.from_entries([])
    assert len(empty) == 0
    assert not empty.matches("127.0.0.1", "localhost")


def test_default_host_list_is_ipv4_and_ipv6_loopback() -> None:
    assert DEFAULT_INTERNAL_HOSTS == ("127.0.0.1", "::1")
    internal = HostList.default()
    assert internal.matches("127.0.0.1")
    assert internal.matches("::1")
    assert not internal.matches("127.0.0.2")
    assert HostList.default(["192.0.2.0/24"]).matches("192.0.2.5")


def test_host_list_from_file_dataset_ignores_values(tmp_path: Path) -> None:
    path = write(tmp_path, "peers", "# peers\n192.0.2.1 the relay\n.example.com\n")
    peers = HostList.from_dataset(open_dataset(path))
    assert peers.matches("192.0.2.1")
    assert peers.matches(None, "a.example.com")
    assert [entry.text for entry in peers.entries] == ["192.0.2.1", ".example.com"]


def test_out_of_range_cidr_in_data_file_is_kept_and_warned_at_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "peers", "192.0.2.1\n\n192.0.2.0/33\n")
    peers = HostList.from_dataset(open_dataset(f"file:{path}", where=CONF_LINE))
    assert [entry.text for entry in peers.entries] == ["192.0.2.1", "192.0.2.0/33"]
    assert len(peers.warnings) == 1
    message, where = peers.warnings[0]
    assert where == Location(path, 3)
    assert "'192.0.2.0/33'" in message and "never matches" in message
    assert peers.matches("192.0.2.1")
    assert not peers.matches("192.0.2.5")


def test_cidr_with_host_bits_never_matches_and_the_warning_names_the_network(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "peers", "10.0.0.0/8\n!10.0.0.1/8\n")
    peers = HostList.from_dataset(open_dataset(path))
    # dkimf_checkip() only probes masked addresses, so the exclusion never applies.
    assert peers.matches("10.0.0.1")
    assert peers.matches("10.200.0.1")
    assert len(peers.warnings) == 1
    message, where = peers.warnings[0]
    assert where == Location(path, 2)
    assert "host bits set" in message and "write '!10.0.0.0/8'" in message
    assert not hosts("10.0.0.1/8").matches("10.0.0.1")


@pytest.mark.parametrize(
    ("entry", "advice"),
    [
        ("192.0.2", "write '192.0.2.0/24'"),
        ("192.168.1.", "write '192.168.1.0/24'"),
        ("300.1.1.1", ""),
        ("2001:db8:::1", ""),
        ("192.0.2.0/abc", ""),
        ("192.0.2.0/255.255.255.0", ""),
        ("!", ""),
        ("[x]", ""),
    ],
)
def test_entries_that_can_never_match_are_kept_and_warned(entry: str, advice: str) -> None:
    peers = HostList.from_entries([(entry, CONF_LINE)])
    assert [e.text for e in peers.entries] == [entry]
    assert len(peers.warnings) == 1
    message, where = peers.warnings[0]
    assert where == CONF_LINE
    assert f"'{entry}'" in message and "never matches" in message
    assert advice in message
    for client in ("192.0.2.1", "192.168.1.1", "300.1.1.1", "2001:db8::1"):
        assert not peers.matches(client)


def test_bad_entry_in_csl_host_list_is_warned_at_the_configuration_line() -> None:
    peers = HostList.from_dataset(open_dataset("127.0.0.1,10.0.0.0/40", where=CONF_LINE))
    assert [where for _message, where in peers.warnings] == [CONF_LINE]
    assert "'10.0.0.0/40'" in peers.warnings[0][0]
    assert peers.matches("127.0.0.1")
    assert not peers.matches("10.0.0.1")


@pytest.mark.parametrize("entry", ["", "  ", "\t"])
def test_blank_entry_is_still_a_config_error(entry: str) -> None:
    with pytest.raises(ConfigError) as info:
        HostList.from_entries([(entry, CONF_LINE)])
    assert info.value.where == CONF_LINE


def test_file_host_list_star_domain_is_a_literal_that_is_warned_at_its_line(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "trusted.hosts", "127.0.0.1\n# office\n*.example.com\n")
    internal = HostList.from_dataset(open_dataset(path))
    assert not internal.matches(None, "mail.example.com")
    assert not internal.matches(None, "example.com")
    # OpenDKIM compares file: keys with strcasecmp(): the entry only equals its own text.
    assert internal.matches(None, "*.EXAMPLE.com")
    assert internal.matches("127.0.0.1")
    assert internal.warnings == (
        (
            "'*.example.com' is not a wildcard here: OpenDKIM compares file: and csl: host-list "
            "entries as plain text, so it never matches; write '.example.com' (every name below "
            "example.com)",
            Location(path, 3),
        ),
    )


@pytest.mark.parametrize(
    ("entry", "advice"),
    [
        ("*.example.com", "write '.example.com' (every name below example.com)"),
        ("!*.lab.example.com", "write '!.lab.example.com' (every name below lab.example.com)"),
        ("192.168.*", "write '192.168.0.0/16'"),
        ("192.168.1.*", "write '192.168.1.0/24'"),
        ("10.*.*.*", "write '10.0.0.0/8'"),
        ("!172.16.*", "write '!172.16.0.0/16'"),
        ("mail*.example.com", "write '.domain' for every name below a domain"),
        ("*", "use CIDR blocks for address ranges"),
        ("999.*", "use CIDR blocks for address ranges"),
    ],
)
def test_star_entry_warning_says_what_to_write_instead(
    tmp_path: Path, entry: str, advice: str
) -> None:
    path = write(tmp_path, "peers", f"{entry}\n")
    peers = HostList.from_dataset(open_dataset(f"file:{path}"))
    assert len(peers.warnings) == 1
    message, where = peers.warnings[0]
    assert where == Location(path, 1)
    assert message.startswith(f"'{entry}' is not a wildcard here")
    assert advice in message
    assert not peers.matches("192.168.1.1", "mail1.lab.example.com")


def test_star_entry_in_csl_host_list_is_warned_at_the_configuration_line() -> None:
    peers = HostList.from_dataset(open_dataset("csl:127.0.0.1,*.example.com", where=CONF_LINE))
    assert len(peers.warnings) == 1
    assert peers.warnings[0][1] == CONF_LINE
    assert "'.example.com'" in peers.warnings[0][0]


def test_ordinary_file_host_list_has_no_warnings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "TrustedHosts",
        "# OpenDKIM TrustedHosts\n127.0.0.1\n::1\nlocalhost\n192.168.0.0/16\n"
        "10.1.0.0/16 office\n.example.com\nmail.example.org\n!guest.example.com\n"
        "!192.168.9.9\n2001:db8::/32\n2001:DB8:1::7\n[192.0.2.1]\n[2001:db8::]/48\n"
        "::ffff:198.51.100.1\n",
    )
    internal = HostList.from_dataset(open_dataset(path))
    assert internal.warnings == ()
    assert len(internal) == 14
    assert internal.matches("192.168.3.4")
    assert not internal.matches("192.168.9.9")


def test_default_and_loopback_lists_have_no_warnings() -> None:
    assert HostList.default().warnings == ()
    assert hosts("127.0.0.1", "localhost", ".example.com").warnings == ()


@pytest.mark.parametrize(
    ("entry", "spelling", "client"),
    [
        ("2001:0db8::1", "2001:db8::1", "2001:db8::1"),
        ("2001:db8:0:0:0:0:0:1", "2001:db8::1", "2001:db8::1"),
        ("10.0.0.0/08", "10.0.0.0/8", "10.9.8.7"),
        ("!2001:db8::0/128", "!2001:db8::/128", "2001:db8::"),
        ("[192.0.2.0/24]", "[192.0.2.0]/24", "192.0.2.77"),
    ],
)
def test_address_spelled_unlike_opendkim_matches_here_but_is_warned(
    entry: str, spelling: str, client: str
) -> None:
    peers = hosts(entry)
    assert peers.matches(client) is not entry.startswith("!")
    assert len(peers.warnings) == 1
    message = peers.warnings[0][0]
    assert message.startswith(f"OpenDKIM never matches host list entry '{entry}'")
    assert f"write '{spelling}'" in message


# --- refile: host lists ---------------------------------------------------------------------


def refile_hosts(tmp_path: Path, text: str) -> tuple[HostList, str]:
    """Write a refile: host list under tmp_path and open it as the pipeline does."""
    path = write(tmp_path, "TrustedHosts", text)
    return HostList.from_dataset(open_dataset(f"refile:{path}", where=CONF_LINE)), path


def test_refile_host_list_matches_tutorial_trusted_hosts(tmp_path: Path) -> None:
    internal, _path = refile_hosts(tmp_path, "127.0.0.1\n::1\nlocalhost\n192.168.0.0/16\n")
    assert internal.matches("127.0.0.1")
    assert internal.matches("::1")
    assert internal.matches(None, "localhost")
    assert internal.matches("192.168.44.3")
    assert not internal.matches("192.169.0.1")
    assert not internal.matches("10.0.0.1", "mail.example.org")
    assert internal.warnings == ()


def test_refile_host_list_star_suffix_matches_addresses_with_that_prefix(tmp_path: Path) -> None:
    internal, _path = refile_hosts(tmp_path, "192.168.1.*\n172.16.*\n")
    assert internal.matches("192.168.1.4")
    # OpenDKIM probes an IPv4-mapped client in its IPv6 spelling: no IPv4 line matches it.
    assert not internal.matches("::ffff:192.168.1.4")
    assert internal.matches("172.31.0.1")  # via the probe 172.16.0.0/12
    assert not internal.matches("192.168.2.1")
    assert not internal.matches("10.192.168.1")
    assert not internal.matches("172.32.0.1")
    assert [message for message, _where in internal.warnings] == [
        "refile pattern '172.16.*' matches every address in 172.16.0.0/12, not only in "
        "172.16.0.0/16: OpenDKIM also looks up masked networks such as '172.16.0.0/12', which "
        "the pattern matches; write '172.16.0.0/16' for exactly 172.16.0.0/16"
    ]


def test_refile_host_list_star_suffix_also_matches_the_wider_masked_block(tmp_path: Path) -> None:
    internal, path = refile_hosts(tmp_path, "10.*\n!192.168.*\n2001:db8:*\n0.0.0.0/0\n")
    # 11.1.2.3 is probed as "11.1.2.3", ..., "11.0.0.0/8", "10.0.0.0/7": the last matches "10.*".
    assert internal.find("11.1.2.3") == internal.entries[0]
    assert internal.find("12.0.0.1") == internal.entries[3]
    # 192.175.0.1 meets "!192.168.0.0/13" before "0.0.0.0/0".
    assert not internal.matches("192.175.0.1")
    assert internal.matches("192.176.0.1")
    assert internal.find("2001:dbf::1") == internal.entries[2]
    assert internal.find("2001:dc0::1") is None
    assert [where for _message, where in internal.warnings] == [
        Location(path, 1),
        Location(path, 2),
    ]
    first, second = (message for message, _where in internal.warnings)
    assert first.startswith(
        "refile pattern '10.*' matches every address in 10.0.0.0/7, not only in 10.0.0.0/8"
    )
    assert second.startswith("refile pattern '!192.168.*' matches every address in 192.168.0.0/13")
    assert "write '!192.168.0.0/16'" in second


def test_refile_host_list_cidr_pattern_matches_through_the_masked_probe(tmp_path: Path) -> None:
    internal, _path = refile_hosts(tmp_path, "10.0.0.0/8\n198.51.100.0/24\n2001:db8::/32\n")
    assert internal.matches("10.255.1.2")
    assert internal.matches("198.51.100.200")
    assert internal.matches("2001:db8:abcd::1")
    assert not internal.matches("11.0.0.1")
    assert not internal.matches("198.51.101.1")
    assert not internal.matches("2001:db9::1")


def test_refile_host_list_dot_domain_matches_names_below_it(tmp_path: Path) -> None:
    internal, _path = refile_hosts(tmp_path, ".example.com\n")
    assert internal.matches(None, "mail.example.com")
    assert internal.matches(None, "a.b.EXAMPLE.com")
    assert not internal.matches(None, "example.com")
    assert not internal.matches(None, "badexample.com")


def test_refile_host_list_star_domain_pattern_excludes_the_names_it_matches(
    tmp_path: Path,
) -> None:
    # dkimf_checkhost() probes "!mail.example.com" first; "*.example.com" becomes
    # ^.*\.example\.com$, which matches that probe, so the name check says "excluded".
    internal, path = refile_hosts(tmp_path, "*.example.com\nmail.example.com\n192.0.2.0/24\n")
    assert not internal.matches(None, "mail.example.com")
    assert not internal.matches(None, "www.example.com")
    assert internal.find(None, "mail.example.com") is None
    # The name check does not stop the address check.
    assert internal.matches("192.0.2.7", "www.example.com")
    assert len(internal.warnings) == 1
    message, where = internal.warnings[0]
    assert where == Location(path, 1)
    assert "excludes the hosts it matches" in message
    assert "write '.example.com' (every name below example.com)" in message


def test_refile_host_list_negated_lines_exclude_whatever_their_position(tmp_path: Path) -> None:
    internal, _path = refile_hosts(
        tmp_path, "!192.168.1.5\n192.168.1.*\n.example.com\n!*.guest.example.com\n"
    )
    assert not internal.matches("192.168.1.5")
    assert internal.matches("192.168.1.6")
    assert not internal.matches(None, "pc.guest.example.com")
    assert internal.matches(None, "pc.example.com")
    assert internal.warnings == ()


def test_refile_host_list_longer_prefix_is_probed_before_shorter(tmp_path: Path) -> None:
    internal, _path = refile_hosts(tmp_path, "10.0.0.0/8\n!10.1.0.0/16\n10.1.2.0/24\n")
    assert not internal.matches("10.1.9.9")
    assert internal.matches("10.1.2.3")
    assert internal.matches("10.2.0.1")


def test_refile_host_list_patterns_ignore_case(tmp_path: Path) -> None:
    internal, _path = refile_hosts(tmp_path, "MAIL.Example.COM\n2001:DB8::/32\n")
    assert internal.matches(None, "mail.example.com")
    assert internal.matches("2001:db8::1")


def test_refile_host_list_find_reports_the_first_matching_line(tmp_path: Path) -> None:
    internal, path = refile_hosts(tmp_path, "# peers\n192.168.*\n192.168.1.*  office\n")
    found = internal.find("192.168.1.9")
    assert found is not None
    assert (found.text, found.where, found.network) == ("192.168.*", Location(path, 2), None)
    assert [entry.text for entry in internal.entries] == ["192.168.*", "192.168.1.*"]


def test_refile_host_list_regex_syntax_is_live_as_in_opendkim_and_warned(tmp_path: Path) -> None:
    internal, path = refile_hosts(tmp_path, "[192.0.2.1]\nmx.(a|b).example\n")
    # OpenDKIM's regcomp() reads "[192.0.2.1]" as a one-character class: it never matches.
    assert not internal.matches("192.0.2.1")
    assert not internal.matches(None, "mx.(a|b).example")
    assert internal.matches(None, "mx.a.example")
    assert [where for _message, where in internal.warnings] == [
        Location(path, 1),
        Location(path, 2),
    ]
    assert internal.warnings[0][0].endswith("write '192.0.2.1'")
    assert "regular expression" in internal.warnings[1][0]


def test_refile_host_list_address_spelled_unlike_opendkim_never_matches_and_is_warned(
    tmp_path: Path,
) -> None:
    internal, path = refile_hosts(tmp_path, "2001:0db8::1\n10.0.0.1/8\n192.0.2\n")
    assert not internal.matches("2001:db8::1")
    assert not internal.matches("10.0.0.1")
    assert not internal.matches("192.0.2.1")
    messages = [message for message, _where in internal.warnings]
    assert [where for _message, where in internal.warnings] == [
        Location(path, 1),
        Location(path, 2),
        Location(path, 3),
    ]
    assert "write that" in messages[0] and "'2001:db8::1'" in messages[0]
    assert "'10.0.0.0/8'" in messages[1] and "host bits" in messages[1]
    assert "write '192.0.2.0/24'" in messages[2]


def test_refile_host_list_bracketed_unresolved_client_name_is_probed_as_text(
    tmp_path: Path,
) -> None:
    # Without a PTR record the MTA passes "[192.0.2.1]" as the host name.
    internal, _path = refile_hosts(tmp_path, "192.0.2.*\n")
    assert not internal.matches(None, "[192.0.2.1]")
    assert internal.matches("192.0.2.1", "[192.0.2.1]")


def test_empty_refile_host_list_matches_nothing(tmp_path: Path) -> None:
    internal, _path = refile_hosts(tmp_path, "# nothing yet\n")
    assert len(internal) == 0
    assert not internal.matches("127.0.0.1", "localhost")


@given(
    address=st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None),
    prefix=st.integers(min_value=0, max_value=128),
)
def test_refile_ipv6_cidr_spelled_as_inet_ntop_prints_it_matches(
    address: ipaddress.IPv6Address, prefix: int
) -> None:
    network = ipaddress.IPv6Network((address, prefix), strict=False)
    spelled = socket.inet_ntop(socket.AF_INET6, network.network_address.packed)
    ds = RegexDataset.from_text(f"{spelled}/{prefix}\n", path="TrustedHosts")
    internal = HostList.from_dataset(ds)
    assert internal.matches(address)
    assert internal.warnings == ()
    assert not HostList.from_dataset(ds).matches("192.0.2.1")


def test_find_returns_the_deciding_entry_with_its_location(tmp_path: Path) -> None:
    path = write(tmp_path, "internal", "10.0.0.0/8\n!10.0.0.1\n.corp.example\n")
    internal = HostList.from_dataset(open_dataset(path))
    by_ip = internal.find("10.2.3.4")
    assert by_ip is not None
    assert (by_ip.text, by_ip.where, by_ip.negated) == ("10.0.0.0/8", Location(path, 1), False)
    assert by_ip.network == ipaddress.ip_network("10.0.0.0/8")
    by_name = internal.find("198.51.100.1", "pc.corp.example")
    assert by_name is not None
    assert by_name.where == Location(path, 3)
    assert by_name.network is None
    assert internal.find("10.0.0.1") is None


# --- refile: host lists as Debian's OpenDKIM binary matches them ------------------------------
#
# Measured with the real /usr/sbin/opendkim of Debian 12 (opendkim 2.11.0~beta2-8+deb12u1,
# glibc 2.36): for each case a TrustedHosts file holding the lines, and
#
#     Mode s
#     Domain example.org
#     Selector sel
#     KeyFile /root/refile_probe/sel.private      # opendkim-genkey -d example.org -s sel
#     InternalHosts refile:/root/refile_probe/cN/TrustedHosts
#     Socket local:/root/refile_probe/cN/sock
#     Syslog no
#
# run as `opendkim -x opendkim.conf -f`, then `miltertest -s probe.lua`, where probe.lua does,
# per client (host name, address):
#
#     local conn = mt.connect("local:/root/refile_probe/cN/sock", 40, 0.05)
#     mt.conninfo(conn, host, ip)
#     mt.macro(conn, SMFIC_MAIL, "i", "QID1")
#     mt.mailfrom(conn, "user@example.org");  mt.rcptto(conn, "rcpt@example.net")
#     mt.header(conn, "From", "user@example.org")   -- and To, Subject, Date
#     mt.eoh(conn);  mt.bodystring(conn, "hello\r\n");  mt.eom(conn)
#     signed = mt.eom_check(conn, MT_HDRINSERT, "DKIM-Signature")
#
# (checking mt.getreply() after each step: an external client gets SMFIR_ACCEPT at end of
# header, Mode s having nothing to do for it). "Signed" means OpenDKIM found the client
# internal. REFUSED: opendkim exits at start with "refile:…/TrustedHosts: dkimf_db_open():
# Error compiling regular expression". The tutorial rows were also sent through a private
# Postfix (tests/postfix_fixture.py, inbound port, PROXY client 198.51.100.7) with the tutorial
# opendkim.conf (Mode sv, InternalHosts and ExternalIgnoreList refile:TrustedHosts, refile
# KeyTable/SigningTable): signed. (`make compare`'s sign-from-trusted-cidr difference is not
# OpenDKIM's: its syslog shows "DKIM-Signature field added", then OpenDMARC rejects the message
# — SPF fails and it does not see the signature OpenDKIM is adding.)
#
# Columns: TrustedHosts lines, client host name, client address, OpenDKIM found it internal.
# HostList agrees on every row (test_refile_host_list_agrees_with_the_opendkim_binary).

TUTORIAL_A = "127.0.0.1\nlocalhost\n192.168.0.0/16\n*.example.com"
TUTORIAL_B = "127.0.0.1\nlocalhost\n198.51.100.0/24\n\n*.sign.example.com"
REFUSED = "refuses to start"

OPENDKIM_MEASURED: list[tuple[str, str, str, bool | str]] = [
    ("198.51.100.0/24", "client.invalid", "198.51.100.7", True),
    ("198.51.100.0/24", "unknown", "198.51.100.7", True),
    ("198.51.100.0/24", "[198.51.100.7]", "198.51.100.7", True),
    ("198.51.100.0/24", "client.invalid", "198.51.101.7", False),
    ("198.51.100.7", "client.invalid", "198.51.100.7", True),
    ("198.51.100.7", "client.invalid", "198.51.100.70", False),
    ("198.51.100.7", "client.invalid", "198.51.100.8", False),
    ("198.51.100.*", "client.invalid", "198.51.100.7", True),
    ("198.51.100.*", "client.invalid", "198.51.101.7", True),
    ("*.example.com", "mail.example.com", "203.0.113.7", False),
    ("*.example.com", "example.com", "203.0.113.7", False),
    ("*.example.com", "client.invalid", "203.0.113.7", False),
    (".example.com", "mail.example.com", "203.0.113.7", True),
    (".example.com", "a.b.example.com", "203.0.113.7", True),
    (".example.com", "example.com", "203.0.113.7", False),
    (".example.com", "notexample.com", "203.0.113.7", False),
    ("mail.example.com", "mail.example.com", "203.0.113.7", True),
    ("mail.example.com", "MAIL.Example.COM", "203.0.113.7", True),
    ("mail.example.com", "x.mail.example.com", "203.0.113.7", False),
    ("mail.example.com", "ail.example.com", "203.0.113.7", False),
    ("!198.51.100.9\n198.51.100.*", "client.invalid", "198.51.100.9", False),
    ("!198.51.100.9\n198.51.100.*", "client.invalid", "198.51.100.7", True),
    ("198.51.100.*\n!198.51.100.9", "client.invalid", "198.51.100.9", False),
    ("198.51.100.*\n!198.51.100.9", "client.invalid", "198.51.100.7", True),
    ("!198.51.100.9\n198.51.100.0/24", "client.invalid", "198.51.100.9", False),
    ("!198.51.100.9\n198.51.100.0/24", "client.invalid", "198.51.100.7", True),
    ("localhost", "localhost", "203.0.113.7", True),
    ("localhost", "localhost", "127.0.0.1", True),
    ("[198.51.100.7]", "client.invalid", "198.51.100.7", False),
    ("[198.51.100.7]", "[198.51.100.7]", "203.0.113.9", False),
    ("10.*", "client.invalid", "11.2.3.4", True),
    ("10.*", "client.invalid", "10.2.3.4", True),
    ("10.*", "client.invalid", "12.2.3.4", False),
    ("192.168.*", "client.invalid", "192.168.7.7", True),
    ("192.168.*", "client.invalid", "192.169.7.7", True),
    ("192.168.*", "client.invalid", "192.175.7.7", True),
    ("192.168.*", "client.invalid", "192.176.7.7", False),
    ("2001:db8::1", "client.invalid", "2001:db8::1", True),
    ("2001:db8::1", "client.invalid", "2001:db8::2", False),
    ("2001:db8::/32", "client.invalid", "2001:db8::1", True),
    ("2001:db8::/32", "client.invalid", "2001:db9::1", False),
    ("198.51.100", "client.invalid", "198.51.100.7", False),
    ("example.com", "mail.example.com", "203.0.113.7", False),
    ("example.com", "example.com", "203.0.113.7", True),
    ("51.100.7", "client.invalid", "198.51.100.7", False),
    (TUTORIAL_A, "client.invalid", "192.168.7.7", True),
    (TUTORIAL_A, "localhost", "203.0.113.7", True),
    (TUTORIAL_A, "mail.example.com", "203.0.113.7", False),
    (TUTORIAL_A, "mail.example.com", "192.168.7.7", True),
    (TUTORIAL_A, "unknown", "192.168.7.7", True),
    (TUTORIAL_B, "client.invalid", "198.51.100.7", True),
    (TUTORIAL_B, "unknown", "198.51.100.7", True),
    (TUTORIAL_B, "[198.51.100.7]", "198.51.100.7", True),
    (TUTORIAL_B, "client.sign.example.com", "198.51.100.7", True),
    (TUTORIAL_B, "localhost", "127.0.0.1", True),
    ("mx.(a|b).example", "mx.a.example", "203.0.113.7", True),
    ("mx.(a|b).example", "mx.(a|b).example", "203.0.113.7", False),
    ("mail?.example.com", "mai.example.com", "203.0.113.7", True),
    ("mail?.example.com", "mail.example.com", "203.0.113.7", True),
    ("mail?.example.com", "mailx.example.com", "203.0.113.7", False),
    ("198.51.100.[0-9]", "client.invalid", "198.51.100.7", True),
    ("198.51.100.[0-9]", "client.invalid", "198.51.100.17", False),
    ("198.51.100.7|mail.example.com", "client.invalid", "198.51.100.7", True),
    ("198.51.100.7|mail.example.com", "client.invalid", "198.51.100.77", True),
    ("198.51.100.7|mail.example.com", "mail.example.com", "203.0.113.7", False),
    ("198.51.100.7|mail.example.com", "xmail.example.com", "203.0.113.7", False),
    ("^198.51.100.7$", "client.invalid", "198.51.100.7", True),
    ("198.51.100.7{1}", "client.invalid", "198.51.100.7", True),
    ("198.51.100.7 some words here", "client.invalid", "198.51.100.7", True),
    ("MAIL.EXAMPLE.COM", "mail.example.com", "203.0.113.7", True),
    ("*", "mail.example.com", "203.0.113.7", False),
    ("198.51.100.0/24", "client.invalid", "::ffff:198.51.100.7", False),
    ("::ffff:198.51.100.7", "client.invalid", "::ffff:198.51.100.7", True),
    ("[198.51.100.7", "client.invalid", "198.51.100.7", REFUSED),
    ("?mail.example.com", "mail.example.com", "203.0.113.7", REFUSED),
    ("mail.example.com{", "mail.example.com", "203.0.113.7", REFUSED),
    ("(mail.example.com", "mail.example.com", "203.0.113.7", REFUSED),
    ("mail.example.com)", "mail.example.com)", "203.0.113.7", True),
    ("mail.example.com)", "mail.example.com", "203.0.113.7", False),
    ("mail\\.example.com", "mail.example.com", "203.0.113.7", False),
    ("mail\\.example.com", "mail\\.example.com", "203.0.113.7", True),
    ("[[:alpha:]]*.example.com", "mail.example.com", "203.0.113.7", True),
    ("[[:alpha:]]*.example.com", "1mail.example.com", "203.0.113.7", False),
    ("127.0.0.1:value", "client.invalid", "127.0.0.1", False),
    ("2001:db8::1 x", "client.invalid", "2001:db8::1", True),
    ("!*.example.com\nmail.example.com", "mail.example.com", "203.0.113.7", False),
    ("*.example.com\n198.51.100.7", "mail.example.com", "198.51.100.7", True),
    ("[198.51.100.0]/24", "client.invalid", "198.51.100.200", False),
    ("2001:db8:*", "client.invalid", "2001:dbf::1", True),
    ("2001:db8:*", "client.invalid", "2001:dc0::1", False),
    ("*.example.com\nmail.example.com\n192.0.2.0/24", "www.example.com", "192.0.2.7", True),
    ("(a|b).example.com", "a.example.com", "203.0.113.7", True),
    ("!*.guest.example.com\n.example.com", "pc.guest.example.com", "203.0.113.7", False),
    ("!*.guest.example.com\n.example.com", "pc.example.com", "203.0.113.7", True),
]


@pytest.mark.parametrize(("lines", "hostname", "ip", "internal"), OPENDKIM_MEASURED)
def test_refile_host_list_agrees_with_the_opendkim_binary(
    tmp_path: Path, lines: str, hostname: str, ip: str, internal: bool | str
) -> None:
    path = write(tmp_path, "TrustedHosts", lines + "\n")
    if internal == REFUSED:
        with pytest.raises(ConfigError) as info:
            HostList.from_dataset(open_dataset(f"refile:{path}", where=CONF_LINE))
        assert info.value.where == Location(path, 1)
        assert "OpenDKIM refuses to start with this file" in info.value.message
        return
    hosts = HostList.from_dataset(open_dataset(f"refile:{path}", where=CONF_LINE))
    assert hosts.matches(ip, hostname) is internal


def test_refile_cidr_line_makes_the_address_internal_as_in_opendkim(tmp_path: Path) -> None:
    # The brief's case: "198.51.100.0/24" and client 198.51.100.7. dkimf_checkip() probes
    # "198.51.100.0/24" (the /24 step), which ^198\.51\.100\.0/24$ matches.
    internal, _path = refile_hosts(tmp_path, "198.51.100.0/24\n")
    assert internal.matches("198.51.100.7", "unknown")
    assert internal.matches("198.51.100.7", "[198.51.100.7]")
    assert not internal.matches("198.51.101.7")
    assert internal.warnings == ()


def test_refile_bracketed_address_never_matches_and_says_what_to_write(tmp_path: Path) -> None:
    internal, path = refile_hosts(tmp_path, "[198.51.100.7]\n![198.51.100.0]/24\n[2001:db8::1]\n")
    assert not internal.matches("198.51.100.7", "[198.51.100.7]")
    assert not internal.matches("2001:db8::1", "[2001:db8::1]")
    assert [where for _message, where in internal.warnings] == [
        Location(path, 1),
        Location(path, 2),
        Location(path, 3),
    ]
    first, second, third = (message for message, _where in internal.warnings)
    assert first == (
        "refile pattern '[198.51.100.7]' never matches: OpenDKIM reads the square brackets as "
        "a regular-expression class that matches a single character, not as a bracketed "
        "address; write '198.51.100.7'"
    )
    assert second.endswith("write '!198.51.100.0/24'")
    assert third.endswith("write '2001:db8::1'")


def test_refile_escaped_dot_never_matches_and_says_what_to_write(tmp_path: Path) -> None:
    internal, path = refile_hosts(tmp_path, "mail\\.example\\.com\n")
    assert not internal.matches(None, "mail.example.com")
    ((message, where),) = internal.warnings
    assert where == Location(path, 1)
    assert message.startswith("refile pattern 'mail\\.example\\.com' never matches a host name")
    assert "'^mail\\\\.example\\\\.com$'" in message
    assert message.endswith("write 'mail.example.com'")


def test_refile_top_level_alternation_is_half_anchored_and_warned(tmp_path: Path) -> None:
    internal, path = refile_hosts(tmp_path, "198.51.100.7|mail.example.com\n")
    # ^198\.51\.100\.7|mail\.example\.com$: the first branch also matches 198.51.100.77, the
    # second also matches the "!mail.example.com" probe, which excludes the host.
    assert internal.matches("198.51.100.77")
    assert not internal.matches(None, "mail.example.com")
    ((message, where),) = internal.warnings
    assert where == Location(path, 1)
    assert "has '|' outside parentheses" in message
    assert "'^198\\.51\\.100\\.7|mail\\.example\\.com$'" in message
    assert message.endswith("write one line per alternative")


def test_refile_other_regex_syntax_is_live_and_warned(tmp_path: Path) -> None:
    internal, path = refile_hosts(tmp_path, "mail?.example.com\nmx.(a|b).example\n")
    assert internal.matches(None, "mai.example.com")
    assert internal.matches(None, "mx.b.example")
    assert not internal.matches(None, "mailx.example.com")
    first, second = internal.warnings
    assert first == (
        "refile pattern 'mail?.example.com' contains ?: OpenDKIM compiles it as the POSIX "
        "extended regular expression '^mail?\\.example\\.com$' ('?' makes the character before "
        "it optional; it is no one-character wildcard), and authmilter matches it the same way; "
        "check that it means what you intend",
        Location(path, 1),
    )
    assert second[0].startswith("refile pattern 'mx.(a|b).example' contains ( ) |:")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("[198.51.100.7", "Unmatched [, [^, [:, [., or [="),
        ("?mail.example.com", "Invalid preceding regular expression"),
        ("mail.example.com{", "Unmatched \\{"),
        ("(mail.example.com", "Unmatched ( or \\("),
        ("a{2,1}", "Invalid content of \\{\\}"),
        ("[z-a]", "Invalid range end"),
        ("[[:word:]]", "Invalid character class name"),
        ("\\1(a)", "Invalid back reference"),
    ],
)
def test_refile_pattern_opendkim_cannot_compile_is_a_config_error_at_its_line(
    tmp_path: Path, line: str, reason: str
) -> None:
    path = write(tmp_path, "TrustedHosts", f"127.0.0.1\n{line}\n")
    with pytest.raises(ConfigError) as info:
        HostList.from_dataset(open_dataset(f"refile:{path}", where=CONF_LINE))
    assert info.value.where == Location(path, 2)
    assert info.value.message.startswith(
        f"refile pattern '{line}' is not a regular expression OpenDKIM can compile ({reason}), "
        "so OpenDKIM refuses to start with this file"
    )


def test_refile_ipv4_mapped_client_is_probed_in_its_ipv6_spelling(tmp_path: Path) -> None:
    internal, _path = refile_hosts(tmp_path, "198.51.100.0/24\n::ffff:192.0.2.0/120\n")
    assert not internal.matches("::ffff:198.51.100.7")
    assert internal.matches("198.51.100.7")
    assert internal.matches("::ffff:192.0.2.9")
    assert not internal.matches("192.0.2.9")


def test_refile_nested_repetition_is_matched_without_backtracking(tmp_path: Path) -> None:
    # ^b(.*){20}x$ would make a backtracking matcher take exponential time on a long name.
    internal, _path = refile_hosts(tmp_path, "b(*){20}x\n((a|aa)){1,}.example\n")
    assert internal.matches(None, "a" * 250 + ".example")
    assert internal.matches(None, "b" * 250 + "x")
    assert not internal.matches(None, "b" * 250)
    assert not internal.matches(None, "a" * 250 + ".examplex")


# glibc's regcomp()/regexec() itself, to check EreParser and both matchers against.
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
_GLIBC = hasattr(_LIBC, "gnu_get_libc_version")
_REG_FLAGS = 1 | 2 | 8  # REG_EXTENDED | REG_ICASE | REG_NOSUB

_PIECES = [
    *"ab.A*+?[](){}|^$\\-,0129!:/_",
    "[[:alpha:]]", "[[:upper:]]", "[[:lower:]]", "[[:digit:]]", "[[:punct:]]", "[[:foo:]]",
    "[[:space:]", "[[=a=]]", "[[=ab=]]", "[^a-z]", "[a-]", "[]a]", "[^]]", "[0-z]", "{1,2}",
    "{2}", "{,3}", "{1,}", "{3,1}", "\\1", "\\2", "\\w", "\\W", "\\s", "\\b", "\\B", "\\<",
    "\\>", "\\`", "\\'", "\\.", "\\q", "\\Q", "é", "[a-é]", "[é-z]",
]  # fmt: skip
_SUBJECT = st.text(alphabet="aAbB.!-_ 019:/,()[]{}\\$^?*+|é", max_size=10)


@pytest.mark.skipif(not _GLIBC, reason="cross-checks against glibc's regcomp()")
@settings(max_examples=3000, deadline=None)
@given(pieces=st.lists(st.sampled_from(_PIECES), min_size=1, max_size=7),
       subjects=st.lists(_SUBJECT, min_size=1, max_size=8))  # fmt: skip
def test_refile_patterns_compile_and_match_as_glibc_regcomp_does(
    pieces: list[str], subjects: list[str]
) -> None:
    pattern = "".join(pieces)
    regex = mkregexp(as_bytes(pattern))
    saved = locale.setlocale(locale.LC_ALL)
    locale.setlocale(locale.LC_ALL, "C")  # OpenDKIM never calls setlocale()
    buffer = ctypes.create_string_buffer(1024)  # sizeof(regex_t) is 64 on x86-64
    try:
        status = _LIBC.regcomp(buffer, regex, _REG_FLAGS)
        try:
            compiled = RefilePattern.compile(pattern)
        except RegexError as exc:
            assert status == exc.code, (pattern, regex)
            return
        assert status == 0, (pattern, regex)
        try:
            python = re.compile(python_regex(compiled.tree, "g").encode("latin-1"))
            bits = BitMatcher(compiled.tree)
            backrefs = "\\1" in pattern or "\\2" in pattern
            for text in subjects:
                data = as_bytes(text)
                expected = _LIBC.regexec(buffer, data, 0, None, 0) == 0
                assert bool(compiled.search(subject(text))) is expected, (regex, text)
                assert bool(python.search(subject(text))) is expected, (regex, text)
                if not backrefs:
                    assert bits.search(subject(text)) is expected, (regex, text)
        finally:
            _LIBC.regfree(buffer)
    finally:
        locale.setlocale(locale.LC_ALL, saved)
