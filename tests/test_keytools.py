"""The genkey and testkey subcommands, with testkey asking a real NSD loaded from genkey's .txt."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pwd
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import dns.flags
import dns.message
import pytest
from cryptography.hazmat.primitives import serialization

from authmilter import cli
from authmilter.keys import (
    KeyAlgorithm,
    PrivateKey,
    key_record_text,
    load_private_key,
    parse_key_record,
    parse_private_key,
)
from authmilter.keytools import (
    EXIT_CANTCREAT,
    EXIT_CONFIG,
    EXIT_DATAERR,
    EXIT_NOINPUT,
    EXIT_NOPERM,
    EXIT_OK,
    EXIT_TEMPFAIL,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    _default_domain,
    add_genkey_parser,
    add_testkey_parser,
)
from dnsserver import BlackholeDns, FaultyDns, NsdServer, SeenQuery, make_zone, txt_rdata

NsdFactory = Callable[[Mapping[str, str]], NsdServer]
DOMAIN = "example.test"
#: The default configuration file the tests' parser reads: none, unless a test names one.
NO_DEFAULT_CONFIG = "/nonexistent/authmilter-tests/authmilter.conf"
#: testkey's DNSSEC note when the answer came without the AD flag (NSD, an authoritative
#: server, never sets it), as opendkim-testkey's "key not secure".
NOT_SECURE = "authmilter testkey: key not secure\n"


def make_parser(default_config: str = NO_DEFAULT_CONFIG) -> argparse.ArgumentParser:
    """The parser cli.main builds, reduced to the two subcommands under test."""
    parser = argparse.ArgumentParser(prog="authmilter")
    sub = parser.add_subparsers(dest="command")
    add_genkey_parser(sub)
    add_testkey_parser(sub, default_config=default_config)
    return parser


def invoke(*argv: str, default_config: str = NO_DEFAULT_CONFIG) -> tuple[int, str, str]:
    """Run one subcommand; return (exit code, stdout, stderr)."""
    ns = make_parser(default_config).parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = ns.func(ns)
    assert isinstance(code, int)
    return code, out.getvalue(), err.getvalue()


def zone_strings(bind_text: str) -> list[str]:
    raw = re.findall(r'"((?:[^"\\]|\\.)*)"', bind_text)
    return [re.sub(r"\\(.)", r"\1", s) for s in raw]


def genkey(directory: Path, selector: str, *args: str) -> tuple[int, str, str]:
    return invoke("genkey", "-D", str(directory), "-d", DOMAIN, "-s", selector, *args)


# -- genkey -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("algorithm", "bits"), [("rsa", 2048), ("ed25519", 256)])
def test_genkey_writes_a_0600_private_key_and_a_txt_that_publishes_it(
    tmp_path: Path, algorithm: str, bits: int
) -> None:
    code, out, err = genkey(tmp_path, "sel", "--algorithm", algorithm)
    assert (code, err) == (EXIT_OK, "")
    private = tmp_path / "sel.private"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_private_key(private)
    assert (key.algorithm.value, key.bits) == (algorithm, bits)
    txt = (tmp_path / "sel.txt").read_text()
    assert txt.startswith("sel._domainkey\tIN\tTXT\t( ")
    strings = zone_strings(txt)
    assert all(len(s) <= 255 for s in strings)
    record = parse_key_record("".join(strings))
    assert record.key_type is key.algorithm
    assert record.hash_algorithms == ("sha256",)
    assert key.matches(record.public_key())


def test_genkey_rsa_private_key_is_pkcs1_pem(tmp_path: Path) -> None:
    genkey(tmp_path, "sel", "-b", "1024")
    assert (tmp_path / "sel.private").read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")


def test_genkey_prints_the_keytable_and_signingtable_lines(tmp_path: Path) -> None:
    code, out, _ = genkey(tmp_path, "sel2024", "-b", "1024")
    assert code == EXIT_OK
    lines = [line for line in out.splitlines() if not line.startswith("#")]
    assert lines == [
        f"sel2024._domainkey.{DOMAIN} {DOMAIN}:sel2024:{tmp_path}/sel2024.private",
        f"*@{DOMAIN} sel2024._domainkey.{DOMAIN}",
    ]
    assert "KeyTable" in out and "SigningTable" in out


def test_genkey_private_key_is_never_wider_than_0600_even_with_umask_0(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        code, _, _ = genkey(tmp_path, "sel", "-b", "1024")
    finally:
        os.umask(old)
    assert code == EXIT_OK
    assert stat.S_IMODE((tmp_path / "sel.private").stat().st_mode) == 0o600


def test_genkey_refuses_rsa_under_1024_bits_citing_rfc_8301(tmp_path: Path) -> None:
    code, out, err = genkey(tmp_path, "weak", "-b", "768")
    assert code == EXIT_USAGE
    assert "768-bit" in err and "RFC 8301" in err
    assert out == ""
    assert list(tmp_path.iterdir()) == []


def test_genkey_warns_under_2048_bits(tmp_path: Path) -> None:
    code, _, err = genkey(tmp_path, "small", "-b", "1024")
    assert code == EXIT_OK
    assert "warning: 1024-bit RSA key" in err and "2048" in err
    assert load_private_key(tmp_path / "small.private").bits == 1024


def test_genkey_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    assert genkey(tmp_path, "sel", "-b", "1024")[0] == EXIT_OK
    before = (tmp_path / "sel.private").read_bytes()
    code, _, err = genkey(tmp_path, "sel", "-b", "1024")
    assert code == EXIT_CANTCREAT
    assert f"{tmp_path}/sel.private exists; use --force" in err
    assert (tmp_path / "sel.private").read_bytes() == before

    code, _, _ = genkey(tmp_path, "sel", "-b", "1024", "--force")
    assert code == EXIT_OK
    after = (tmp_path / "sel.private").read_bytes()
    assert after != before
    assert stat.S_IMODE((tmp_path / "sel.private").stat().st_mode) == 0o600
    key = load_private_key(tmp_path / "sel.private")
    record = parse_key_record("".join(zone_strings((tmp_path / "sel.txt").read_text())))
    assert key.matches(record.public_key())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_genkey_refuses_when_only_the_txt_exists(tmp_path: Path) -> None:
    (tmp_path / "sel.txt").write_text("keep me\n")
    code, _, err = genkey(tmp_path, "sel", "-b", "1024")
    assert code == EXIT_CANTCREAT and "sel.txt exists" in err
    assert not (tmp_path / "sel.private").exists()


def test_genkey_record_options_follow_opendkim_genkey(tmp_path: Path) -> None:
    code, _, _ = genkey(
        tmp_path, "opts", "-b", "1024", "-r", "-t", "-S", "-n", "rotated 2024", "-h", "sha1:sha256"
    )
    assert code == EXIT_OK
    text = "".join(zone_strings((tmp_path / "opts.txt").read_text()))
    assert text.startswith("v=DKIM1; n=rotated=202024; h=sha1:sha256; k=rsa; t=y:s; s=email; p=")
    record = parse_key_record(text)
    assert record.testing and record.strict_subdomains
    assert record.service_types == ("email",)
    assert record.notes == "rotated 2024"


def test_genkey_subdomains_flag_undoes_nosubdomains(tmp_path: Path) -> None:
    genkey(tmp_path, "sub", "-b", "1024", "-S", "--subdomains")
    record = parse_key_record("".join(zone_strings((tmp_path / "sub.txt").read_text())))
    assert not record.strict_subdomains


def test_genkey_empty_hash_list_omits_h(tmp_path: Path) -> None:
    genkey(tmp_path, "anyhash", "--algorithm", "ed25519", "-h", "")
    record = parse_key_record("".join(zone_strings((tmp_path / "anyhash.txt").read_text())))
    assert record.hash_algorithms is None


def test_genkey_append_domain_writes_an_absolute_owner(tmp_path: Path) -> None:
    genkey(tmp_path, "abs", "-b", "1024", "-a")
    assert (tmp_path / "abs.txt").read_text().startswith(f"abs._domainkey.{DOMAIN}.\tIN\tTXT\t(")


def test_genkey_dash_h_is_hash_algorithms_and_help_is_long_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ns = make_parser().parse_args(["genkey", "-h", "sha256"])
    assert ns.hash_algorithms == "sha256"
    with pytest.raises(SystemExit) as exc:
        make_parser().parse_args(["genkey", "--help"])
    assert exc.value.code == 0
    assert "--hash-algorithms" in capsys.readouterr().out


def test_genkey_defaults_selector_and_host_domain(tmp_path: Path) -> None:
    code, out, _ = invoke("genkey", "-D", str(tmp_path), "--algorithm", "ed25519")
    assert code == EXIT_OK
    domain = _default_domain()
    assert domain and " " not in domain
    assert f"default._domainkey.{domain} {domain}:default:{tmp_path}/default.private" in out
    assert (tmp_path / "default.txt").read_text().endswith(f"DKIM key default for {domain}\n")


def test_genkey_rejects_bad_selector_and_missing_directory(tmp_path: Path) -> None:
    code, _, err = genkey(tmp_path, "../escape", "-b", "1024")
    assert code == EXIT_USAGE and "invalid selector" in err
    code, _, err = genkey(tmp_path / "nope", "sel", "-b", "1024")
    assert code == EXIT_CANTCREAT and "not a directory" in err
    assert list(tmp_path.iterdir()) == []


def test_genkey_verbose_reports_progress(tmp_path: Path) -> None:
    _, _, err = genkey(tmp_path, "v", "--algorithm", "ed25519", "-v")
    assert "generating ed25519 private key" in err
    assert f"private key written to {tmp_path}/v.private" in err
    assert f"DNS TXT record written to {tmp_path}/v.txt" in err


# -- testkey against NSD serving genkey's .txt files --------------------------------------------


class Published:
    """Keys made with genkey and the NSD zone that publishes them."""

    def __init__(self, keydir: Path, server: NsdServer) -> None:
        self.keydir = keydir
        self.server = server

    def key(self, selector: str) -> str:
        return str(self.keydir / f"{selector}.private")

    def testkey(self, selector: str, *args: str, timeout: str = "2") -> tuple[int, str, str]:
        return invoke(
            "testkey", "-d", DOMAIN, "-s", selector,
            "--nameservers", self.server.nameserver, "--timeout", timeout, *args,
        )  # fmt: skip


def _rsa512_public_p() -> str:
    # cryptography will not make a key this small; OpenSSL (which opendkim-genkey uses) will.
    pem = subprocess.run(["openssl", "genrsa", "512"], check=True, capture_output=True).stdout
    key = serialization.load_pem_private_key(pem, None)
    return parse_private_key(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
        source="rsa512",
    ).public_p()


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, nsd_server_module: NsdFactory) -> Published:
    keydir = tmp_path_factory.mktemp("keys")
    made = {
        "good": ("-b", "2048"),
        "ed": ("--algorithm", "ed25519"),
        "testing": ("-b", "1024", "-t"),
        "absolute": ("-b", "1024", "-a"),
        "restricted": ("-b", "1024", "-r", "-S"),
        "unpublished": ("-b", "1024"),
    }
    for selector, args in made.items():
        code, _, err = genkey(keydir, selector, *args)
        assert code == EXIT_OK, err
    good = load_private_key(keydir / "good.private")
    # genkey's .txt files go into the zone verbatim: NSD must accept that syntax.
    raw = "".join((keydir / f"{s}.txt").read_text() for s in made if s != "unpublished")
    records = [
        ("revoked._domainkey", "TXT", '"v=DKIM1; k=rsa; p="'),
        ("malformed._domainkey", "TXT", '"v=DKIM1; k=rsa; p=!!not-base64!!"'),
        ("badversion._domainkey", "TXT", '"v=DKIM2; k=rsa; p=AAAA"'),
        ("multi._domainkey", "TXT", txt_rdata(key_record_text(good))),
        ("multi._domainkey", "TXT", '"v=DKIM1; k=rsa; p="'),
        ("nodata._domainkey", "A", "192.0.2.1"),
        ("sha1only._domainkey", "TXT", txt_rdata(key_record_text(good, hash_algorithms=["sha1"]))),
        ("weak._domainkey", "TXT", f'"v=DKIM1; k=rsa; p={_rsa512_public_p()}"'),
    ]
    server = nsd_server_module({DOMAIN: make_zone(DOMAIN, records, raw=raw)})
    return Published(keydir, server)


def test_testkey_reports_key_ok_for_a_matching_key(published: Published) -> None:
    assert published.testkey("good", "-k", published.key("good")) == (
        EXIT_OK, "key OK\n", NOT_SECURE)  # fmt: skip


def test_testkey_without_a_private_key_checks_the_record_only(published: Published) -> None:
    assert published.testkey("good") == (EXIT_OK, "key OK\n", NOT_SECURE)


@pytest.mark.parametrize("selector", ["ed", "absolute", "restricted"])
def test_testkey_accepts_other_genkey_forms(published: Published, selector: str) -> None:
    code, out, err = published.testkey(selector, "-k", published.key(selector))
    assert (code, out) == (EXIT_OK, "key OK\n")
    assert "warning: 1024-bit RSA key" in err or selector == "ed"


def test_testkey_testing_mode_is_ok_with_a_warning(published: Published) -> None:
    code, out, err = published.testkey("testing", "-k", published.key("testing"))
    assert (code, out) == (EXIT_OK, "key OK\n")
    assert f"domain {DOMAIN}, selector testing: warning: " in err
    assert "t=y" in err


def _one_line(err: str, selector: str) -> str:
    """The one problem line of stderr (after the DNSSEC note, when a record came back)."""
    lines = err.removeprefix(NOT_SECURE).splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"authmilter testkey: domain {DOMAIN}, selector {selector}: ")
    return lines[0]


def test_testkey_mismatch_with_another_key(published: Published) -> None:
    code, out, err = published.testkey("good", "-k", published.key("unpublished"))
    assert (code, out) == (EXIT_DATAERR, "")
    assert err.startswith(NOT_SECURE)  # a record came back: the note, then the problem
    line = _one_line(err, "good")
    assert "mismatch" in line and "does not match the private key" in line
    assert published.key("unpublished") in line


def test_testkey_mismatch_of_key_type(published: Published) -> None:
    code, _, err = published.testkey("ed", "-k", published.key("good"))
    assert code == EXIT_DATAERR
    assert "is k=ed25519, but the private key" in _one_line(err, "ed")


def test_testkey_no_record_when_the_name_does_not_exist(published: Published) -> None:
    code, out, err = published.testkey("missing", "-k", published.key("good"))
    assert (code, out) == (EXIT_UNAVAILABLE, "")
    assert "secure" not in err  # no record, no DNSSEC note (nor from opendkim-testkey)
    line = _one_line(err, "missing")
    assert "no_record" in line and f"missing._domainkey.{DOMAIN} does not exist (NXDOMAIN)" in line


def test_testkey_no_record_when_the_name_has_no_txt(published: Published) -> None:
    code, _, err = published.testkey("nodata")
    assert code == EXIT_UNAVAILABLE
    assert "has no TXT record" in _one_line(err, "nodata")
    assert "secure" not in err


def test_testkey_revoked_record(published: Published) -> None:
    code, _, err = published.testkey("revoked", "-k", published.key("good"))
    assert code == EXIT_UNAVAILABLE
    assert "revoked (empty p=)" in _one_line(err, "revoked")


@pytest.mark.parametrize(
    ("selector", "problem"),
    [
        ("malformed", "p= is not valid base64"),
        ("badversion", "v=DKIM2 is not DKIM1"),
        ("multi", "2 TXT records"),
        ("weak", "512-bit RSA key"),
    ],
)
def test_testkey_malformed_records(published: Published, selector: str, problem: str) -> None:
    code, _, err = published.testkey(selector)
    assert code == EXIT_DATAERR
    line = _one_line(err, selector)
    assert "malformed" in line and problem in line


def test_testkey_record_that_excludes_sha256(published: Published) -> None:
    code, _, err = published.testkey("sha1only", "-k", published.key("good"))
    assert code == EXIT_DATAERR
    assert "h=sha1, which excludes sha256" in _one_line(err, "sha1only")


def test_testkey_dns_timeout_is_a_temporary_failure(blackhole_dns: BlackholeDns) -> None:
    code, out, err = invoke(
        "testkey", "-d", DOMAIN, "-s", "good",
        "--nameservers", blackhole_dns.nameserver, "--timeout", "1",
    )  # fmt: skip
    assert (code, out) == (EXIT_TEMPFAIL, "")
    line = _one_line(err, "good")
    assert "secure" not in err
    # --timeout 1 bounded the lookup, and the key was asked for once.
    assert "dns_error" in line and "timed out after 1s" in line
    assert blackhole_dns.received() == [SeenQuery(f"good._domainkey.{DOMAIN}", "TXT", False)]


def test_testkey_warns_about_an_unsafe_key_file_as_opendkim_testkey(
    published: Published, tmp_path: Path
) -> None:
    loose = tmp_path / "loose.private"
    shutil.copy(published.key("good"), loose)
    os.chmod(loose, 0o644)
    code, out, err = published.testkey("good", "-k", str(loose))
    assert (code, out) == (EXIT_OK, "key OK\n")
    assert f"{loose}: WARNING: unsafe permissions: mode 0644 is readable by group/others" in err

    code, out, err = published.testkey("good", "-k", str(loose), "--require-safe-keys")
    assert (code, out) == (EXIT_NOPERM, "")
    assert "mode 0644" in _one_line(err, "good")


def test_testkey_unreadable_key_file(published: Published, tmp_path: Path) -> None:
    code, _, err = published.testkey("good", "-k", str(tmp_path / "absent.private"))
    assert code == EXIT_NOINPUT
    assert "No such file or directory" in _one_line(err, "good")


def test_testkey_usage_errors(published: Published) -> None:
    code, _, err = invoke("testkey", "-s", "good", "--nameservers", published.server.nameserver)
    assert code == EXIT_USAGE and "-d DOMAIN" in err
    code, _, err = invoke("testkey", "-d", DOMAIN, "-s", "good", "--nameservers", "dns.example")
    assert code == EXIT_USAGE and "not an IP address" in err


def test_testkey_verbose_shows_the_lookup_and_the_record(published: Published) -> None:
    code, out, err = published.testkey("good", "-k", published.key("good"), "-v")
    assert (code, out) == (EXIT_OK, "key OK\n")
    assert f"checking key 'good._domainkey.{DOMAIN}'" in err
    assert f"key loaded from {published.key('good')} (rsa, 2048 bits)" in err
    assert f"record retrieved for good._domainkey.{DOMAIN}: v=DKIM1; h=sha256; k=rsa; p=" in err
    assert NOT_SECURE in err
    assert (f"authmilter testkey: the answer was not DNSSEC-validated: the nameserver "
            f"{published.server.nameserver} did not set the AD flag (") in err  # fmt: skip


def test_published_key_is_the_one_on_disk(published: Published) -> None:
    # Guards the fixture itself: the zone really serves genkey's record for "good".
    key: PrivateKey = load_private_key(published.key("good"))
    assert key.algorithm is KeyAlgorithm.RSA
    text = "".join(zone_strings((published.keydir / "good.txt").read_text()))
    assert key.matches(parse_key_record(text).public_key())


def test_testkey_dash_c_checks_every_keytable_entry(published: Published, tmp_path: Path) -> None:
    """`testkey -c CONF` tests each KeyTable entry against DNS and fails if any fails."""
    table = tmp_path / "key.table"
    table.write_text(
        f"good._domainkey.{DOMAIN} {DOMAIN}:good:{published.key('good')}\n"
        f"ed._domainkey.{DOMAIN} {DOMAIN}:ed:{published.key('ed')}\n"
        f"wrong._domainkey.{DOMAIN} {DOMAIN}:good:{published.key('ed')}\n"
        f"any %:good:{published.key('good')}\n"
    )
    (tmp_path / "signing.table").write_text(f"*@{DOMAIN} good._domainkey.{DOMAIN}\n")
    conf = tmp_path / "authmilter.conf"
    conf.write_text(
        f"KeyTable file:{table}\nSigningTable refile:{tmp_path}/signing.table\n"
        f"Nameservers {published.server.nameserver}\nDNSTimeout 2\n"
    )
    code, out, err = invoke("testkey", "-c", str(conf))
    assert code == EXIT_DATAERR
    assert f"key good._domainkey.{DOMAIN} OK" in out and f"key ed._domainkey.{DOMAIN} OK" in out
    assert f"domain {DOMAIN}, selector good: mismatch" in err
    assert "4 keys" not in err and "3 keys checked; 2 pass, 1 fail, 1 skipped" in err
    # The DNSSEC note names the key and follows its result, as opendkim-testkey -x prints it.
    lines = err.splitlines()
    mismatch = next(i for i, line in enumerate(lines) if ": mismatch: " in line)
    assert lines[mismatch + 1] == f"authmilter testkey: key wrong._domainkey.{DOMAIN} not secure"
    for name in (f"good._domainkey.{DOMAIN}", f"ed._domainkey.{DOMAIN}"):
        assert f"authmilter testkey: key {name} not secure" in lines

    table.write_text(f"good._domainkey.{DOMAIN} {DOMAIN}:good:{published.key('good')}\n")
    code, out, err = invoke("testkey", "-c", str(conf))
    assert (code, out) == (EXIT_OK, f"key good._domainkey.{DOMAIN} OK\n")


# -- testkey and DNSSEC: the AD flag of the answer ----------------------------------------------


class ValidatingResolver(FaultyDns):
    """Stands in for a validating resolver (unbound, say) in front of NSD, on loopback.

    It relays each query to NSD and, as a validating resolver does for an answer it validated
    (RFC 6840 §5.7), sets AD in the response when the query asked for DNSSEC (DO bit or AD
    flag). ``asked`` holds (DO, AD) of each query. NSD, an authoritative server, never sets AD.
    """

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.asked: list[tuple[bool, bool]] = []

    def _answer(self, wire: bytes, over_tcp: bool) -> bytes | None:
        query = dns.message.from_wire(wire)
        do, ad = bool(query.ednsflags & dns.flags.DO), bool(query.flags & dns.flags.AD)
        self.asked.append((do, ad))
        reply = self._relay(wire, over_tcp)
        if reply is None or not (do or ad):
            return reply
        response = dns.message.from_wire(reply)
        response.flags |= dns.flags.AD
        return response.to_wire()


@pytest.fixture()
def validating(published: Published) -> Iterator[ValidatingResolver]:
    with ValidatingResolver(published.server.nameserver) as resolver:
        yield resolver


def _testkey_via(server: str, selector: str, *args: str) -> tuple[int, str, str]:
    return invoke("testkey", "-d", DOMAIN, "-s", selector, "--nameservers", server,
                  "--timeout", "2", *args)  # fmt: skip


def test_testkey_says_key_secure_when_the_answer_carries_the_ad_flag(
    published: Published, validating: ValidatingResolver
) -> None:
    code, out, err = _testkey_via(validating.nameserver, "good", "-k", published.key("good"))
    assert (code, out, err) == (EXIT_OK, "key OK\n", "authmilter testkey: key secure\n")
    # The one query asked for DNSSEC: EDNS0 with the DO bit, and the AD flag.
    assert validating.asked == [(True, True)]


def test_testkey_verbose_explains_whether_the_answer_was_validated(
    published: Published, validating: ValidatingResolver
) -> None:
    _, _, err = _testkey_via(validating.nameserver, "good", "-v")
    lines = err.splitlines()
    at = lines.index("authmilter testkey: key secure")
    assert lines[at + 1] == (
        "authmilter testkey: the answer was DNSSEC-validated: the nameserver "
        f"{validating.nameserver} set the AD flag (trust it as far as the path to that "
        "resolver: on this host or a trusted network)"
    )
    _, _, err = _testkey_via(published.server.nameserver, "good", "-v")
    lines = err.splitlines()
    at = lines.index("authmilter testkey: key not secure")
    assert lines[at + 1] == (
        "authmilter testkey: the answer was not DNSSEC-validated: the nameserver "
        f"{published.server.nameserver} did not set the AD flag (the zone is unsigned, or "
        "that nameserver does not validate: list a validating resolver in Nameservers or "
        "--nameservers)"
    )


def test_testkey_dnssec_note_never_changes_the_exit_status(
    published: Published, validating: ValidatingResolver
) -> None:
    """As with opendkim-testkey: "not secure" is no error, "secure" saves no broken key."""
    for server, note in ((published.server.nameserver, "key not secure"),
                         (validating.nameserver, "key secure")):  # fmt: skip
        assert _testkey_via(server, "good") == (EXIT_OK, "key OK\n",
                                                f"authmilter testkey: {note}\n")  # fmt: skip
        code, out, err = _testkey_via(server, "good", "-k", published.key("unpublished"))
        assert (code, out) == (EXIT_DATAERR, "")
        assert err.splitlines()[0] == f"authmilter testkey: {note}"
        assert "mismatch" in err.splitlines()[1]
        code, _, err = _testkey_via(server, "revoked")
        assert code == EXIT_UNAVAILABLE and err.startswith(f"authmilter testkey: {note}\n")
        code, _, err = _testkey_via(server, "missing")
        assert code == EXIT_UNAVAILABLE and "secure" not in err


def test_testkey_dash_c_notes_each_secure_key(
    published: Published, validating: ValidatingResolver, tmp_path: Path
) -> None:
    table = tmp_path / "key.table"
    table.write_text(f"good._domainkey.{DOMAIN} {DOMAIN}:good:{published.key('good')}\n")
    (tmp_path / "signing.table").write_text(f"*@{DOMAIN} good._domainkey.{DOMAIN}\n")
    conf = tmp_path / "authmilter.conf"
    conf.write_text(
        f"KeyTable file:{table}\nSigningTable refile:{tmp_path}/signing.table\n"
        f"Nameservers {validating.nameserver}\nDNSTimeout 2\n"
    )
    code, out, err = invoke("testkey", "-c", str(conf))
    assert (code, out) == (EXIT_OK, f"key good._domainkey.{DOMAIN} OK\n")
    assert err.splitlines() == [
        f"authmilter testkey: key good._domainkey.{DOMAIN} secure",
        "authmilter testkey: 1 key checked; 1 pass, 0 fail",
    ]


# -- testkey without -c: the default configuration file ----------------------------------------


def _default_conf(tmp_path: Path, text: str) -> str:
    conf = tmp_path / "authmilter.conf"
    conf.write_text(text)
    return str(conf)


def test_testkey_without_dash_c_uses_the_default_configfiles_nameservers(
    published: Published, tmp_path: Path
) -> None:
    """The documented key-rotation command (-d/-s/-k, no -c, no --nameservers) finds the key
    through the default file's Nameservers, as opendkim-testkey reads /etc/opendkim.conf."""
    conf = _default_conf(tmp_path, f"Nameservers {published.server.nameserver}\nDNSTimeout 2\n")
    argv = ("testkey", "-d", DOMAIN, "-s", "good", "-k", published.key("good"))
    assert invoke(*argv, default_config=conf) == (EXIT_OK, "key OK\n", NOT_SECURE)
    code, out, err = invoke(*argv, "-v", default_config=conf)
    assert (code, out) == (EXIT_OK, "key OK\n")
    assert err.splitlines()[0] == f"authmilter testkey: using default configfile {conf}"

    # Without that file the system resolver is asked, which does not know the test zone.
    absent = str(tmp_path / "absent.conf")
    code, out, err = invoke(*argv, "-v", "--timeout", "1", default_config=absent)
    assert code != EXIT_OK and out == ""
    assert err.splitlines()[0] == (
        f"authmilter testkey: no default configfile {absent}; using /etc/resolv.conf"
    )
    code, _, err = invoke(*argv, "--timeout", "1", default_config=absent)
    assert code != EXIT_OK and "default configfile" not in err


def test_testkey_default_configfiles_dnstimeout_applies(
    blackhole_dns: BlackholeDns, tmp_path: Path
) -> None:
    conf = _default_conf(tmp_path, f"Nameservers {blackhole_dns.nameserver}\nDNSTimeout 1\n")
    code, out, err = invoke("testkey", "-d", DOMAIN, "-s", "good", default_config=conf)
    assert (code, out) == (EXIT_TEMPFAIL, "")
    assert "timed out after 1s" in _one_line(err, "good")  # DNSTimeout 1, not the 5 s default
    assert [q.name for q in blackhole_dns.received()] == [f"good._domainkey.{DOMAIN}"]


def test_testkey_nameservers_option_overrides_the_default_configfile(
    published: Published, blackhole_dns: BlackholeDns, tmp_path: Path
) -> None:
    conf = _default_conf(tmp_path, f"Nameservers {blackhole_dns.nameserver}\nDNSTimeout 1\n")
    code, out, err = invoke(
        "testkey", "-d", DOMAIN, "-s", "good", "-v",
        "--nameservers", published.server.nameserver, default_config=conf,
    )  # fmt: skip
    assert (code, out) == (EXIT_OK, "key OK\n")
    assert "default configfile" not in err  # not even read


def test_testkey_error_in_the_default_configfile_is_a_config_error_at_file_line(
    tmp_path: Path,
) -> None:
    conf = _default_conf(tmp_path, "DNSTimeout 2\nNameservrs 127.0.0.1\n")
    code, out, err = invoke("testkey", "-d", DOMAIN, "-s", "good", default_config=conf)
    assert (code, out) == (EXIT_CONFIG, "")
    assert err.startswith(f"authmilter testkey: {conf}:2: unknown directive 'Nameservrs'")

    conf = _default_conf(tmp_path, "Nameservers dns.example\n")
    code, out, err = invoke("testkey", "-d", DOMAIN, "-s", "good", default_config=conf)
    assert (code, out) == (EXIT_CONFIG, "")
    assert err.startswith(f"authmilter testkey: {conf}:1: Nameservers: ")
    assert "not an IP address" in err


def test_testkey_unreadable_default_configfile_is_skipped_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = _default_conf(tmp_path, "Nameservers 192.0.2.1\n")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root reads any file
    code, _, err = invoke("testkey", "-s", "good", default_config=conf)
    assert code == EXIT_USAGE  # -d/-s are checked before the file is looked at
    code, _, err = invoke(
        "testkey", "-d", "nonexistent.invalid", "-s", "good", "--timeout", "1",
        default_config=conf,
    )  # fmt: skip
    assert code != EXIT_OK
    assert err.splitlines()[0] == (
        f"authmilter testkey: warning: cannot read default configfile {conf}; "
        "using /etc/resolv.conf (give -c or --nameservers)"
    )


def test_cli_testkey_reads_cli_default_config_and_its_help_names_it(
    published: Published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    with pytest.raises(SystemExit):
        cli.main(["testkey", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"Nameservers and DNSTimeout of {cli.DEFAULT_CONFIG} if it exists" in help_text
    assert cli.DEFAULT_CONFIG == "/etc/authmilter/authmilter.conf"

    conf = _default_conf(tmp_path, f"Nameservers {published.server.nameserver}\n")
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", conf)
    assert cli.main(["testkey", "-d", DOMAIN, "-s", "good", "-v"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert out == "key OK\n"
    assert f"authmilter testkey: using default configfile {conf}" in err


def test_testkey_judges_key_owners_as_the_milter_with_its_user_id(
    published: Published, tmp_path: Path
) -> None:
    """A key in Debian's layout (folder 0700 and key 0600, both the UserID user's) is safe for
    testkey as for the milter, when the configuration names that UserID."""
    nobody = pwd.getpwnam("nobody")
    folder = tmp_path / "dkimkeys"
    folder.mkdir(mode=0o700)
    key = folder / "good.private"
    shutil.copy(published.key("good"), key)
    os.chmod(key, 0o600)
    for path in (folder, key):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    argv = ("testkey", "-d", DOMAIN, "-s", "good", "-k", str(key))
    conf = _default_conf(tmp_path, f"Nameservers {published.server.nameserver}\nUserID nobody\n")
    assert invoke(*argv, default_config=conf) == (EXIT_OK, "key OK\n", NOT_SECURE)
    conf = _default_conf(tmp_path, f"Nameservers {published.server.nameserver}\n")
    code, out, err = invoke(*argv, "--require-safe-keys", default_config=conf)
    assert (code, out) == (EXIT_NOPERM, "")
    assert "owned by uid" in err and "(nobody)" in err and "chmod" not in err
