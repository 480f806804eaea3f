"""The configuration layer: OpenDKIM/OpenDMARC syntax, every value type, every error path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from authmilter.config import (
    DEFAULT_OMIT_HEADERS,
    DEFAULT_SIGN_HEADERS,
    DIRECTIVES,
    TABLE_MARKER,
    Action,
    Canon,
    Config,
    DatasetSpec,
    Kind,
    SignatureAlgorithm,
    Support,
    directives_markdown,
    effective_lines,
    load_config,
    load_split,
)
from authmilter.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def error_of(tmp_path: Path, text: str, name: str = "opendkim.conf") -> str:
    path = write(tmp_path, name, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    return str(exc.value)


# -- syntax -----------------------------------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    cfg = Config.from_text("")
    assert cfg.socket == "inet:8891@127.0.0.1"
    assert cfg.internal_hosts == DatasetSpec("127.0.0.1, ::1")
    assert cfg.canonicalization == (Canon.RELAXED, Canon.SIMPLE)
    assert cfg.minimum_key_bits == 1024
    assert cfg.oversign_headers == ("From",)
    assert cfg.on_dns_error is Action.TEMPFAIL
    assert cfg.on_signature_error is Action.REJECT
    assert cfg.on_bad_signature is Action.ACCEPT
    assert cfg.require_safe_keys is True
    assert cfg.mode == "sv" and cfg.signing and cfg.verifying


def test_comments_blank_lines_and_trailing_hash_are_ignored() -> None:
    cfg = Config.from_text("# a comment\n\n   \nSyslog yes   # trailing comment\nMode v#x\n")
    assert cfg.syslog is True
    assert cfg.mode == "v"


def test_directive_names_are_case_insensitive() -> None:
    assert Config.from_text("minimumkeybits 2048\n").minimum_key_bits == 2048


def test_value_keeps_inner_whitespace() -> None:
    cfg = Config.from_text("RejectString  DMARC says no to %s today \n")
    assert cfg.reject_string == "DMARC says no to %s today"


@pytest.mark.parametrize("word,expected", [
    ("true", True), ("Yes", True), ("1", True), ("t", True), ("y", True),
    ("false", False), ("No", False), ("0", False), ("f", False), ("nope", False),
])  # fmt: skip
def test_booleans_are_read_by_their_first_character(word: str, expected: bool) -> None:
    assert Config.from_text(f"SubDomains {word}\n").sub_domains is expected


def test_unknown_directive_is_an_error_with_file_line_and_suggestion(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "Syslog yes\nSigningTabel refile:/x\n")
    assert msg.endswith("opendkim.conf:2: unknown directive 'SigningTabel'; did you mean "
                        "'SigningTable'?")  # fmt: skip


def test_unknown_directive_without_close_match_has_no_suggestion(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "Frobnicate 3\n")
    assert msg.endswith("opendkim.conf:1: unknown directive 'Frobnicate'")


@pytest.mark.parametrize("line,expected", [
    ("Syslog maybe", "Syslog: 'maybe' is not a Boolean"),
    ("DNSTimeout five", "DNSTimeout: 'five' is not a non-negative integer"),
    ("DNSTimeout -1", "DNSTimeout: '-1' is not a non-negative integer"),
    ("UMask 0999", "UMask: '0999' is not an octal file mode mask"),
    ("On-BadSignature explode", "On-BadSignature: 'explode' is not an action"),
    ("Canonicalization relaxed/loose", "Canonicalization: 'relaxed/loose': canonicalizations"),
    ("Canonicalization a/b/c", "Canonicalization: 'a/b/c' is not header/body"),
    ("Mode sx", "Mode: 'sx' is not a mode"),
    ("SignatureAlgorithm rsa-md5", "SignatureAlgorithm: 'rsa-md5' is not a signature algorithm"),
    ("Socket tcp:25", "Socket: 'tcp:25': unknown socket type 'tcp'"),
    ("Socket inet:99999@127.0.0.1", "Socket: 'inet:99999@127.0.0.1': port must be"),
    ("Socket inet:8891@::1", "Socket: 'inet:8891@::1': inet needs an IPv4 address"),
    ("Socket local:relative/sock", "Socket: 'local:relative/sock': a local socket needs an"),
    ("Socket 8891", "Socket: '8891' is not a socket"),
    ("KeyTable dsn:mysql://u@h/db", "KeyTable: dataset type 'dsn:' is not supported"),
    ("SigningTable ldap://host/dc=x", "SigningTable: dataset type 'ldap:' is not supported"),
    ("InternalHosts db:/etc/hosts.db", "InternalHosts: dataset type 'db:' is not supported"),
    ("Socket", "Socket: missing value"),
])  # fmt: skip
def test_bad_values_are_errors_with_file_line(tmp_path: Path, line: str, expected: str) -> None:
    msg = error_of(tmp_path, f"# header\n{line}\n")
    assert "opendkim.conf:2: " + expected in msg


@pytest.mark.parametrize("value,expected", [
    ("inet:8891@127.0.0.1", "inet:8891@127.0.0.1"),
    ("inet:8891", "inet:8891"),
    ("inet:8891@localhost", "inet:8891@localhost"),
    ("inet:8891@[127.0.0.1]", "inet:8891@[127.0.0.1]"),
    ("inet6:8891@[::1]", "inet6:8891@[::1]"),
    ("inet6:8891@::1", "inet6:8891@::1"),
    ("local:/run/authmilter/authmilter.sock", "local:/run/authmilter/authmilter.sock"),
    ("unix:/run/a.sock", "local:/run/a.sock"),
    ("/run/a.sock", "local:/run/a.sock"),
])  # fmt: skip
def test_socket_forms(value: str, expected: str) -> None:
    assert Config.from_text(f"Socket {value}\n").socket == expected


def test_typed_values() -> None:
    cfg = Config.from_text(
        "UMask 007\nCanonicalization simple\nMode s\nSignatureAlgorithm ed25519-sha256\n"
        "On-BadSignature r\nOn-KeyNotFound quarantine\nNameservers 127.0.0.1:5353, [::1]:53\n"
        "RemoveARFrom mx.example.com,.example.net\nSignatureTTL 86400\n"
    )
    assert cfg.umask == 0o007
    assert cfg.canonicalization == (Canon.SIMPLE, Canon.SIMPLE)
    assert cfg.mode == "s" and not cfg.verifying
    assert cfg.signature_algorithm is SignatureAlgorithm.ED25519_SHA256
    assert cfg.on_bad_signature is Action.REJECT
    assert cfg.on_key_not_found is Action.QUARANTINE
    assert cfg.nameservers == ("127.0.0.1:5353", "[::1]:53")
    assert cfg.remove_ar_from == ("mx.example.com", ".example.net")
    assert cfg.signature_ttl == 86400


def test_on_default_fills_only_the_on_directives_not_set() -> None:
    cfg = Config.from_text("On-NoSignature accept\nOn-Default reject\n")
    assert cfg.on_default is Action.REJECT
    assert cfg.on_bad_signature is Action.REJECT
    assert cfg.on_dns_error is Action.REJECT
    assert cfg.on_no_signature is Action.ACCEPT


def test_header_lists_replace_or_edit_the_default() -> None:
    assert Config.from_text("SignHeaders From,To,Subject\n").sign_headers == (
        "From", "To", "Subject")
    edited = Config.from_text("OmitHeaders *,+X-Spam,-Bcc\n").omit_headers
    assert "X-Spam" in edited and "Bcc" not in edited
    assert set(edited) == (set(DEFAULT_OMIT_HEADERS) - {"Bcc"}) | {"X-Spam"}
    assert Config.from_text("SignHeaders *,-List-Id\n").sign_headers == tuple(
        h for h in DEFAULT_SIGN_HEADERS if h != "List-Id")


def test_header_list_from_a_file_dataset(tmp_path: Path) -> None:
    f = write(tmp_path, "oversign", "From\nSubject  # and the subject\n")
    assert Config.from_text(f"OversignHeaders file:{f}\n").oversign_headers == ("From", "Subject")


def test_ignore_hosts_bare_value_is_a_file_path_as_in_opendmarc() -> None:
    assert Config.from_text("IgnoreHosts ignore.hosts\n").ignore_hosts.spec == "file:ignore.hosts"
    assert Config.from_text("IgnoreHosts /etc/ign\n").ignore_hosts.spec == "/etc/ign"
    assert Config.from_text("IgnoreHosts csl:10.0.0.1\n").ignore_hosts.spec == "csl:10.0.0.1"


# -- warnings -----------------------------------------------------------------------------------


def test_recognised_unimplemented_directive_warns_with_file_line(tmp_path: Path) -> None:
    path = write(tmp_path, "opendkim.conf", "Syslog yes\nLogWhy yes\n")
    loaded = load_config(path)
    assert [str(w).split(";")[0] for w in loaded.warnings] == [
        f"{path}:2: LogWhy is recognised but not implemented by authmilter"]
    assert ("LogWhy", "yes") in loaded.config.ignored


def test_resolver_only_directive_is_warned_not_fatal(tmp_path: Path) -> None:
    path = write(tmp_path, "opendkim.conf", "ResolverConfiguration /etc/unbound/unbound.conf\n")
    loaded = load_config(path)
    assert len(loaded.warnings) == 1
    w = str(loaded.warnings[0])
    assert w.startswith(f"{path}:1: ResolverConfiguration configures the anchors' resolver")


def test_repeated_directive_warns_and_last_value_wins(tmp_path: Path) -> None:
    path = write(tmp_path, "a.conf", "DNSTimeout 3\nSyslog yes\nDNSTimeout 7\n")
    loaded = load_config(path)
    assert loaded.config.dns_timeout == 7
    assert str(loaded.warnings[0]) == (
        f"{path}:3: DNSTimeout set again (first at {path}:1); this value is used")


def test_rsa_sha1_signing_is_warned() -> None:
    loaded = load_config_text("SignatureAlgorithm rsa-sha1\n")
    assert any("RFC 8301" in str(w) for w in loaded.warnings)


def load_config_text(text: str) -> object:
    from authmilter.config import build_config, read_settings_text

    return build_config(read_settings_text(text, "<t>"))


# -- combinations -------------------------------------------------------------------------------


def test_reject_string_needs_exactly_one_percent_s(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "Syslog no\nRejectString no domain here\n")
    assert msg.endswith("opendkim.conf:2: RejectString: must contain '%s' exactly once "
                        "(the From domain)")  # fmt: skip


def test_signing_table_without_key_table_is_an_error(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "SigningTable refile:/etc/x\n")
    assert msg.endswith("opendkim.conf:1: SigningTable needs a KeyTable")


def test_keyfile_without_selector_is_an_error(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "Domain example.com\nKeyFile /etc/k.private\n")
    assert msg.endswith("opendkim.conf:2: single-key signing needs KeyFile and Selector; "
                        "Selector is missing")  # fmt: skip


def test_keyfile_ignored_when_keytable_is_set(tmp_path: Path) -> None:
    path = write(tmp_path, "a.conf", "KeyTable file:/k\nSigningTable refile:/s\nKeyFile /x\n")
    warnings = [str(w) for w in load_config(path).warnings]
    assert f"{path}:3: KeyFile is ignored because KeyTable is set" in warnings


# -- Include ------------------------------------------------------------------------------------


def test_include_is_read_relative_to_the_including_file(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    write(tmp_path, "conf.d/extra.conf", "MinimumKeyBits 2048\n")
    path = write(tmp_path, "main.conf", "Include conf.d/extra.conf\nSyslog yes\n")
    cfg = load_config(path).config
    assert cfg.minimum_key_bits == 2048 and cfg.syslog
    assert str(cfg.location("minimum_key_bits")) == f"{tmp_path}/conf.d/extra.conf:1"


def test_error_inside_include_names_the_included_file(tmp_path: Path) -> None:
    write(tmp_path, "extra.conf", "\n\nMode q\n")
    msg = error_of(tmp_path, "Include extra.conf\n", name="main.conf")
    assert msg.endswith(f"{tmp_path}/extra.conf:3: Mode: 'q' is not a mode (s = sign, "
                        "v = verify, sv = both)")  # fmt: skip


def test_missing_include_is_an_error_at_the_include_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "Syslog yes\nInclude /nonexistent/x.conf\n", name="main.conf")
    assert "main.conf:2: cannot read /nonexistent/x.conf: No such file or directory" in msg


def test_include_nesting_is_limited_to_five_levels(tmp_path: Path) -> None:
    write(tmp_path, "loop.conf", "Include loop.conf\n")
    msg = error_of(tmp_path, "Include loop.conf\n", name="main.conf")
    assert "loop.conf:1: Include: nested more than 5 levels" in msg


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*nope.conf: No such file"):
        load_config(str(tmp_path / "nope.conf"))


# -- the two modes ------------------------------------------------------------------------------

OPENDKIM_CONF = """\
Syslog yes
UMask 007
Socket local:/run/opendkim/opendkim.sock
PidFile /run/opendkim/opendkim.pid
Canonicalization relaxed/simple
Mode sv
OversignHeaders From
AuthservID mx.example.com
KeyTable refile:/etc/opendkim/key.table
SigningTable refile:/etc/opendkim/signing.table
InternalHosts 127.0.0.1, ::1, 192.0.2.0/24
"""
OPENDMARC_CONF = """\
AuthservID mx.example.com
PidFile /run/opendmarc/opendmarc.pid
Socket local:/run/opendmarc/opendmarc.sock
RejectFailures true
IgnoreAuthenticatedClients true
TrustedAuthservIDs mx.example.com, border.example.com
Syslog true
UMask 0002
"""
MERGED_CONF = """\
Syslog yes
UMask 007
Socket local:/run/opendkim/opendkim.sock
PidFile /run/opendkim/opendkim.pid
Canonicalization relaxed/simple
Mode sv
OversignHeaders From
AuthservID mx.example.com
KeyTable refile:/etc/opendkim/key.table
SigningTable refile:/etc/opendkim/signing.table
InternalHosts 127.0.0.1, ::1, 192.0.2.0/24
RejectFailures true
IgnoreAuthenticatedClients true
TrustedAuthservIDs mx.example.com, border.example.com
"""


def test_split_files_and_merged_file_give_equal_configs(tmp_path: Path) -> None:
    dkim = write(tmp_path, "opendkim.conf", OPENDKIM_CONF)
    dmarc = write(tmp_path, "opendmarc.conf", OPENDMARC_CONF)
    merged = write(tmp_path, "authmilter.conf", MERGED_CONF)
    split_cfg = load_split(dkim, dmarc).config
    merged_cfg = load_config(merged).config
    assert split_cfg == merged_cfg
    assert split_cfg.reject_failures and split_cfg.umask == 0o007
    assert split_cfg.trusted_authserv_ids == ("mx.example.com", "border.example.com")
    assert split_cfg.sources == (dkim, dmarc)


def test_split_conflict_opendkim_wins_and_warning_names_both_lines(tmp_path: Path) -> None:
    dkim = write(tmp_path, "opendkim.conf", OPENDKIM_CONF)
    dmarc = write(tmp_path, "opendmarc.conf", OPENDMARC_CONF)
    loaded = load_split(dkim, dmarc)
    assert loaded.config.socket == "local:/run/opendkim/opendkim.sock"
    warnings = [str(w) for w in loaded.warnings]
    assert (f"{dmarc}:3: Socket is 'local:/run/opendkim/opendkim.sock' in {dkim}:3 and "
            "'local:/run/opendmarc/opendmarc.sock' here; the earlier file's value is used "
            "(OpenDKIM, then OpenDMARC, then policyd-spf)") in warnings  # fmt: skip
    assert any(w.startswith(f"{dmarc}:2: PidFile is ") for w in warnings)
    assert any(w.startswith(f"{dmarc}:8: UMask is ") for w in warnings)
    # Same value in both files (AuthservID, Syslog "yes" vs "true" differ in text): only a
    # textual difference warns; identical lines do not.
    assert not any("AuthservID" in w for w in warnings)


def test_command_line_socket_overrides_both_files(tmp_path: Path) -> None:
    dkim = write(tmp_path, "opendkim.conf", OPENDKIM_CONF)
    cfg = load_split(dkim, None, overrides={"Socket": "inet:9999@127.0.0.1"}).config
    assert cfg.socket == "inet:9999@127.0.0.1"
    assert str(cfg.location("socket")) == "<command line>"


def test_debian_default_opendkim_conf_loads(tmp_path: Path) -> None:
    """The opendkim.conf Debian ships (installed by `make test`) is accepted as it is."""
    text = Path("/etc/opendkim.conf").read_text()
    loaded = load_config(write(tmp_path, "opendkim.conf", text))
    assert loaded.config.socket.startswith("local:")


def test_debian_default_opendmarc_conf_loads(tmp_path: Path) -> None:
    text = Path("/etc/opendmarc.conf").read_text()
    loaded = load_config(write(tmp_path, "opendmarc.conf", text))
    assert loaded.config.authserv_id is None or isinstance(loaded.config.authserv_id, str)
    assert loaded.config.socket.startswith(("local:", "inet"))


# -- the table and its documentation ------------------------------------------------------------


def test_every_supported_directive_has_a_config_attribute_and_default() -> None:
    names = {f.name for f in dataclasses.fields(Config)}
    cfg = Config()
    for d in DIRECTIVES:
        if d.support is Support.SUPPORTED and d.name != "Include":
            assert d.field_name in names, d.name
            assert getattr(cfg, d.field_name) == d.default, d.name


def test_every_config_attribute_comes_from_a_directive() -> None:
    from_table = {d.field_name for d in DIRECTIVES}
    provenance = {"ignored", "where", "sources", "default_notes"}
    for f in dataclasses.fields(Config):
        assert f.name in from_table | provenance, f.name


def test_table_lists_every_directive_of_the_anchor_man_pages() -> None:
    """Every name in opendkim.conf(5) and opendmarc.conf(5) (Debian packages) is in the table."""
    import gzip
    import re

    known = {d.name for d in DIRECTIVES}
    for page in ("opendkim.conf.5.gz", "opendmarc.conf.5.gz"):
        with gzip.open(f"/usr/share/man/man5/{page}", "rt") as f:
            text = f.read()
        names = set(re.findall(r"^\.TP\n\.I ([A-Za-z0-9-]+) \(", text, flags=re.M))
        assert len(names) > 30, page
        assert names - known == set(), page


def test_docs_configuration_md_lists_every_directive() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc.endswith(TABLE_MARKER + "\n\n" + directives_markdown()), "run `make docs`"


def test_effective_lines_show_value_and_origin(tmp_path: Path) -> None:
    path = write(tmp_path, "a.conf", "UMask 007\nLogWhy yes\n")
    lines = effective_lines(load_config(path).config)
    assert f"{'UMask':<28} 0007    # {path}:1" in lines
    assert f"{'MinimumKeyBits':<28} 1024    # default" in lines
    assert any(line.startswith("#LogWhy") for line in lines)


def test_every_kind_is_used_by_some_directive() -> None:
    assert {d.kind for d in DIRECTIVES} == set(Kind)


# -- policyd-spf --------------------------------------------------------------------------------

POLICYD_SPF_CONF = """\
#  For a fully commented sample config file see policyd-spf.conf.commented

debugLevel = 1
TestOnly = 1

HELO_reject = SPF_Not_Pass
Mail_From_reject = Softfail

PermError_reject = True
TempError_Defer = False

skip_addresses = 127.0.0.0/8,::ffff:127.0.0.0/104,::1
Whitelist = 192.0.2.0/24
Header_Type = AR
Authserv_Id = spf.example.com
Reject_Not_Pass_Domains = aol.example,hotmail.example
"""


def test_policyd_spf_conf_is_read_unchanged(tmp_path: Path) -> None:
    conf = write(tmp_path, "policyd-spf.conf", POLICYD_SPF_CONF)
    loaded = load_split(None, None, conf)
    cfg = loaded.config
    assert (cfg.helo_reject, cfg.mail_from_reject) == ("SPF_Not_Pass", "Softfail")
    assert cfg.permerror_reject is True and cfg.temperror_defer is False
    assert cfg.test_only is True and cfg.header_type == "AR"
    assert cfg.whitelist == ("192.0.2.0/24",)
    assert cfg.spf_authserv_id == "spf.example.com"
    assert cfg.reject_not_pass_domains == ("aol.example", "hotmail.example")
    assert [str(w).split(";")[0] for w in loaded.warnings] == [
        f"{conf}:3: debugLevel is recognised but not implemented by authmilter"]


def test_policyd_spf_options_in_our_own_file_take_either_syntax() -> None:
    cfg = Config.from_text("HELO_reject softfail\nMail_From_reject = False\nTestOnly 0\n")
    assert (cfg.helo_reject, cfg.mail_from_reject, cfg.test_only) == ("Softfail", "False", False)


def test_policyd_spf_bad_choice_and_unknown_name_are_errors(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "HELO_reject Sometimes\n")
    assert msg.endswith("opendkim.conf:1: HELO_reject: 'Sometimes' is not one of Fail, "
                        "SPF_Not_Pass, Softfail, Null, False, No_Check")  # fmt: skip
    conf = write(tmp_path, "policyd-spf.conf", "\nHELO_Reject_Mode = Fail\n")
    with pytest.raises(ConfigError) as exc:
        load_split(None, None, conf)
    assert str(exc.value) == f"{conf}:2: unknown policyd-spf option 'HELO_Reject_Mode'"
    conf = write(tmp_path, "policyd-spf.conf", "Canonicalization = relaxed\n")
    with pytest.raises(ConfigError, match="unknown policyd-spf option 'Canonicalization'"):
        load_split(None, None, conf)
    conf = write(tmp_path, "policyd-spf.conf", "HELO_reject Fail\n")
    with pytest.raises(ConfigError, match=r":1: expected 'name = value', got 'HELO_reject Fail'"):
        load_split(None, None, conf)


def test_three_files_conflict_first_file_wins(tmp_path: Path) -> None:
    dkim = write(tmp_path, "opendkim.conf", "Socket local:/run/a.sock\n")
    spf = write(tmp_path, "policyd-spf.conf", "Socket = local:/run/spf.sock\nUMask = 007\n")
    loaded = load_split(dkim, None, spf)
    assert loaded.config.socket == "local:/run/a.sock" and loaded.config.umask == 0o007
    assert str(loaded.warnings[0]).startswith(f"{spf}:1: Socket is 'local:/run/a.sock' in {dkim}:1")


def test_debian_default_policyd_spf_conf_loads() -> None:
    """The policyd-spf.conf Debian ships (installed by `make test`) is read as it is."""
    loaded = load_split(None, None, "/etc/postfix-policyd-spf-python/policyd-spf.conf")
    assert loaded.config.helo_reject == "Fail" and loaded.config.test_only is True


def test_table_lists_every_option_policyd_spf_reads() -> None:
    """Every name the installed policyd-spf (Debian package) accepts is in the table."""
    import re

    src = Path("/usr/lib/python3/dist-packages/spf_engine/policydspfsupp.py").read_text()
    block = src.split("nameConversion = {", 1)[1].split("}", 1)[0]
    names = set(re.findall(r"'([A-Za-z_]+)'\s*:", block)) - {"IntHosts"}
    assert len(names) > 20
    assert names - {d.name for d in DIRECTIVES} == set()
