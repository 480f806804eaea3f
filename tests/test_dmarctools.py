"""The check-dmarc subcommand against a real NSD, and its layout against opendmarc-check's."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

import dnsserver
from authmilter import cli
from authmilter.dmarctools import (
    EXIT_CONFIG,
    EXIT_DATAERR,
    EXIT_OK,
    EXIT_TEMPFAIL,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    add_check_dmarc_parser,
)
from dnsserver import BlackholeDns, DnsServerError, NsdServer, make_zone, txt_rdata

NsdFactory = Callable[[Mapping[str, str]], NsdServer]
TLD = "example"
#: The default configuration file the tests' parser reads: none, unless a test names one.
NO_DEFAULT_CONFIG = "/nonexistent/authmilter-tests/authmilter.conf"

FULL = (
    "v=DMARC1; p=reject; sp=quarantine; pct=50; adkim=s; "
    "rua=mailto:a@org.example,mailto:b@org.example!10m; ruf=mailto:f@org.example"
)
RECORDS = [
    ("_dmarc.org", "TXT", txt_rdata(FULL)),
    ("www.org", "A", "192.0.2.1"),
    ("_dmarc.minimal", "TXT", txt_rdata("v=DMARC1; p=none")),
    ("_dmarc.minimal", "TXT", txt_rdata("v=spf1 -all")),
    ("_dmarc.bis", "TXT", txt_rdata("v=DMARC1; p=quarantine; np=reject; t=y; psd=n")),
    ("_dmarc.broken", "TXT", txt_rdata("v=DMARC1; p=bogus")),
    ("_dmarc.two", "TXT", txt_rdata("v=DMARC1; p=none")),
    ("_dmarc.two", "TXT", txt_rdata("v=DMARC1; p=reject")),
    ("_dmarc.nop", "TXT", txt_rdata("v=DMARC1; rua=mailto:agg@nop.example")),
    ("_dmarc.b.corp", "TXT", txt_rdata("v=DMARC1; p=reject")),
    ("norecord", "A", "192.0.2.2"),
]
ZONE = make_zone(TLD, RECORDS)

#: What opendmarc-check 1.4.2 printed for FULL (captured from the real tool on this zone).
OPENDMARC_FULL = (
    "DMARC record for org.example:\n"
    "\tSample percentage: 50\n"
    "\tDKIM alignment: strict\n"
    "\tSPF alignment: relaxed\n"
    "\tDomain policy: reject\n"
    "\tSubdomain policy: quarantine\n"
    "\tAggregate report URIs:\n"
    "\t\tmailto:a@org.example\n"
    "\t\tmailto:b@org.example!10m\n"
    "\tFailure report URIs:\n"
    "\t\tmailto:f@org.example\n"
)
OPENDMARC_MINIMAL = (
    "DMARC record for minimal.example:\n"
    "\tSample percentage: 100\n"
    "\tDKIM alignment: relaxed\n"
    "\tSPF alignment: relaxed\n"
    "\tDomain policy: none\n"
    "\tSubdomain policy: unspecified\n"
    "\tAggregate report URIs:\n"
    "\t\t(none)\n"
    "\tFailure report URIs:\n"
    "\t\t(none)\n"
)


def make_parser(default_config: str = NO_DEFAULT_CONFIG) -> argparse.ArgumentParser:
    """The parser cli.main builds, reduced to the subcommand under test."""
    parser = argparse.ArgumentParser(prog="authmilter")
    sub = parser.add_subparsers(dest="command")
    add_check_dmarc_parser(sub, default_config=default_config)
    return parser


def invoke(*argv: str, default_config: str = NO_DEFAULT_CONFIG) -> tuple[int, str, str]:
    """Run check-dmarc; return (exit code, stdout, stderr)."""
    ns = make_parser(default_config).parse_args(["check-dmarc", *argv])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = ns.func(ns)
    assert isinstance(code, int)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def nameserver(nsd_server_module: NsdFactory) -> str:
    return nsd_server_module({TLD: ZONE}).nameserver


def check(nameserver: str, *argv: str) -> tuple[int, str, str]:
    return invoke("--nameservers", nameserver, "--timeout", "3", *argv)


# -- output ----------------------------------------------------------------------------------


@pytest.mark.dns
def test_a_full_record_prints_opendmarc_checks_block_then_ours(nameserver: str) -> None:
    code, out, err = check(nameserver, "org.example")
    assert (code, err) == (EXIT_OK, "")
    assert out == OPENDMARC_FULL + (
        "\tRecord found at _dmarc.org.example (the From domain itself)\n"
        "\tOrganizational domain: org.example\n"
        "\tPolicy for org.example: reject (the record's p=; to 50% of failing mail, "
        "one step less strict to the rest)\n"
    )


@pytest.mark.dns
def test_a_minimal_record_shows_the_defaults_as_opendmarc_check_does(nameserver: str) -> None:
    code, out, _ = check(nameserver, "minimal.example")
    assert code == EXIT_OK
    assert out.startswith(OPENDMARC_MINIMAL)


@pytest.mark.dns
def test_several_domains_are_separated_by_a_blank_line(nameserver: str) -> None:
    code, out, _ = check(nameserver, "minimal.example", "org.example")
    assert code == EXIT_OK
    blocks = out.split("\n\n")
    assert len(blocks) == 2
    assert blocks[0].startswith("DMARC record for minimal.example:")
    assert blocks[1].startswith("DMARC record for org.example:")


@pytest.mark.dns
def test_a_subdomain_shows_the_organizational_record_and_its_sp(nameserver: str) -> None:
    code, out, _ = check(nameserver, "WWW.Org.Example.")
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0] == "DMARC record for www.org.example:"
    assert (
        "\tRecord found at _dmarc.org.example (organizational domain of www.org.example)" in lines
    )
    assert (
        "\tPolicy for www.org.example: quarantine (the record's sp=; to 50% of failing mail, "
        "one step less strict to the rest)" in lines
    )


@pytest.mark.dns
def test_dmarcbis_tags_are_shown_when_present(nameserver: str) -> None:
    code, out, _ = check(nameserver, "bis.example", "ghost.bis.example")
    assert code == EXIT_OK
    first, second = out.split("\n\n")
    assert "\tNon-existent subdomain policy: reject" in first.splitlines()
    assert "\tTesting: yes (t=y)" in first.splitlines()
    assert "\tPublic suffix domain: no, an organizational domain (psd=n)" in first.splitlines()
    assert (
        "\tPolicy for bis.example: quarantine (the record's p=; t=y: one step less strict "
        "while testing)" in first.splitlines()
    )
    assert (
        "\tPolicy for ghost.bis.example: reject (the record's np=; ghost.bis.example does not "
        "exist; t=y: one step less strict while testing)" in second.splitlines()
    )
    assert "Non-existent" not in check(nameserver, "org.example")[1]


@pytest.mark.dns
def test_missing_p_with_rua_is_valid_as_p_none_with_a_warning(nameserver: str) -> None:
    code, out, _ = check(nameserver, "nop.example")
    assert code == EXIT_OK
    assert "\tDomain policy: none" in out.splitlines()
    assert (
        "\tWarning: p= is missing: treated as p=none because rua= is valid (RFC 7489 §6.6.3)"
        in (out.splitlines())
    )


@pytest.mark.dns
def test_method_treewalk_finds_a_record_on_an_intermediate_label(nameserver: str) -> None:
    code, out, err = check(nameserver, "--method", "treewalk", "a.b.corp.example")
    assert code == EXIT_OK, err
    assert (
        "\tRecord found at _dmarc.b.corp.example (organizational domain of a.b.corp.example)"
        in (out.splitlines())
    )
    code, out, err = check(nameserver, "--method", "psl", "a.b.corp.example")
    assert (code, out) == (EXIT_UNAVAILABLE, "")
    assert "no DMARC record at _dmarc.a.b.corp.example and _dmarc.corp.example" in err


@pytest.mark.dns
def test_a_psl_file_changes_the_organizational_domain(nameserver: str, tmp_path: Path) -> None:
    psl = tmp_path / "psl.dat"
    psl.write_text("example\ncorp.example\n")
    code, out, _ = check(nameserver, "--psl", str(psl), "a.b.corp.example")
    assert code == EXIT_OK
    assert "\tOrganizational domain: b.corp.example" in out.splitlines()


# -- exit codes ------------------------------------------------------------------------------


@pytest.mark.dns
@pytest.mark.parametrize(
    ("domain", "code", "message"),
    [
        ("norecord.example", EXIT_UNAVAILABLE, "no DMARC record at _dmarc.norecord.example"),
        ("nxdomain.example", EXIT_UNAVAILABLE, "no DMARC record"),
        ("two.example", EXIT_UNAVAILABLE, "2 DMARC records at _dmarc.two.example"),
        ("broken.example", EXIT_DATAERR, "p='bogus' is not none, quarantine or reject"),
        ("outside.invalid", EXIT_TEMPFAIL, "REFUSED"),  # NSD refuses names outside its zones
        ("bad_domain.example", EXIT_USAGE, "not a domain"),
    ],
)
def test_exit_code_and_message_for_each_failure(
    nameserver: str, domain: str, code: int, message: str
) -> None:
    got, out, err = check(nameserver, domain)
    assert got == code
    assert out == ""
    assert err.startswith("authmilter check-dmarc: ")
    assert message in err


@pytest.mark.dns
def test_the_first_failure_decides_and_every_domain_is_reported(nameserver: str) -> None:
    code, out, err = check(nameserver, "org.example", "broken.example", "norecord.example")
    assert code == EXIT_DATAERR
    assert out.startswith("DMARC record for org.example:")
    assert "broken.example" in err and "norecord.example" in err


def test_dns_timeout_is_tempfail(blackhole_dns: BlackholeDns) -> None:
    code, out, err = invoke("--nameservers", blackhole_dns.nameserver, "--timeout", "0.3", "x.test")
    assert (code, out) == (EXIT_TEMPFAIL, "")
    assert "timed out" in err or "no nameserver" in err


@pytest.mark.parametrize(
    "argv", [["--nameservers", "not-an-ip"], ["--nameservers", "127.0.0.1", "--timeout", "0"]]
)
def test_bad_resolver_arguments_are_usage_errors(argv: list[str]) -> None:
    code, _, err = invoke(*argv, "org.example")
    assert code == EXIT_USAGE
    assert "--nameservers/--timeout" in err


def test_unreadable_psl_file_is_a_config_error(tmp_path: Path) -> None:
    code, _, err = invoke(
        "--nameservers", "127.0.0.1", "--psl", str(tmp_path / "none.dat"), "org.example"
    )
    assert code == EXIT_CONFIG
    assert "PublicSuffixList" in err


def test_at_least_one_domain_is_required() -> None:
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        make_parser().parse_args(["check-dmarc"])


# -- resolver settings from a configuration file ---------------------------------------------


def _conf(tmp_path: Path, text: str, name: str = "authmilter.conf") -> str:
    conf = tmp_path / name
    conf.write_text(text)
    return str(conf)


@pytest.mark.dns
def test_without_options_the_default_configfiles_nameservers_are_used(
    nameserver: str, tmp_path: Path
) -> None:
    conf = _conf(tmp_path, f"Nameservers {nameserver}\nDNSTimeout 3\n")
    code, out, err = invoke("org.example", default_config=conf)
    assert (code, err) == (EXIT_OK, "")
    assert out.startswith("DMARC record for org.example:\n")
    code, out, err = invoke("-v", "org.example", default_config=conf)
    assert code == EXIT_OK
    assert err == f"authmilter check-dmarc: using default configfile {conf}\n"

    # Without that file the system resolver is asked, which does not know the test zone.
    absent = str(tmp_path / "absent.conf")
    code, out, err = invoke("-v", "--timeout", "1", "org.example", default_config=absent)
    assert code != EXIT_OK and out == ""
    assert err.splitlines()[0] == (
        f"authmilter check-dmarc: no default configfile {absent}; using /etc/resolv.conf"
    )


@pytest.mark.dns
def test_dash_c_names_the_configuration_instead_of_the_default(
    nameserver: str, blackhole_dns: BlackholeDns, tmp_path: Path
) -> None:
    default = _conf(tmp_path, f"Nameservers {blackhole_dns.nameserver}\nDNSTimeout 1\n")
    conf = _conf(tmp_path, f"Nameservers {nameserver}\n", "other.conf")
    code, out, err = invoke("-c", conf, "-v", "minimal.example", default_config=default)
    assert code == EXIT_OK
    assert out.startswith(OPENDMARC_MINIMAL)
    assert err == f"authmilter check-dmarc: using configfile {conf}\n"


def test_the_default_configfiles_dnstimeout_applies(
    blackhole_dns: BlackholeDns, tmp_path: Path
) -> None:
    conf = _conf(tmp_path, f"Nameservers {blackhole_dns.nameserver}\nDNSTimeout 1\n")
    started = time.monotonic()
    code, out, err = invoke("org.example", default_config=conf)
    assert time.monotonic() - started < 3  # DNSTimeout 1, not the 5 s default
    assert (code, out) == (EXIT_TEMPFAIL, "")
    assert "timed out" in err or "no nameserver" in err


@pytest.mark.dns
def test_nameservers_option_overrides_the_default_configfile(
    nameserver: str, blackhole_dns: BlackholeDns, tmp_path: Path
) -> None:
    conf = _conf(tmp_path, f"Nameservers {blackhole_dns.nameserver}\nDNSTimeout 1\n")
    code, out, err = invoke("-v", "--nameservers", nameserver, "org.example", default_config=conf)
    assert (code, err) == (EXIT_OK, "")  # the default file is not even read
    assert out.startswith("DMARC record for org.example:\n")


def test_an_error_in_the_default_configfile_is_a_config_error_at_file_line(
    tmp_path: Path,
) -> None:
    conf = _conf(tmp_path, "DNSTimeout 2\nNameservrs 127.0.0.1\n")
    code, out, err = invoke("org.example", default_config=conf)
    assert (code, out) == (EXIT_CONFIG, "")
    assert err.startswith(f"authmilter check-dmarc: {conf}:2: unknown directive 'Nameservrs'")

    conf = _conf(tmp_path, "DNSTimeout 2\nNameservers dns.example\n")
    code, out, err = invoke("org.example", default_config=conf)
    assert (code, out) == (EXIT_CONFIG, "")
    assert err.startswith(f"authmilter check-dmarc: {conf}:2: Nameservers: ")


def test_cli_check_dmarc_reads_cli_default_config_and_its_help_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["check-dmarc", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"Nameservers and DNSTimeout of {cli.DEFAULT_CONFIG} if it exists" in help_text
    assert f"(default: {cli.DEFAULT_CONFIG} if it exists)" in help_text

    conf = _conf(tmp_path, "Nameservers 127.0.0.1:notaport\n")
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", conf)
    assert cli.main(["check-dmarc", "org.example"]) == EXIT_CONFIG
    assert capsys.readouterr().err.startswith(f"authmilter check-dmarc: {conf}:1: Nameservers: ")


# -- against opendmarc-check itself ------------------------------------------------------------

OPENDMARC_CHECK = shutil.which("opendmarc-check") or "/usr/sbin/opendmarc-check"


@pytest.fixture()
def nsd_on_port_53(monkeypatch: pytest.MonkeyPatch) -> Iterator[NsdServer]:
    """NSD on <random 127.x.y.z>:53, the only way a resolv.conf can name it."""
    if os.geteuid() != 0:
        pytest.fail("binding port 53 and a private mount namespace need root, as `make test` runs")
    monkeypatch.setattr(dnsserver, "_free_port", lambda: 53)
    server = NsdServer({TLD: ZONE})
    server.host = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    try:
        server.start()
    except DnsServerError as exc:
        server.cleanup()
        pytest.fail(f"cannot start NSD on {server.host}:53: {exc}", pytrace=False)
    yield server
    server.cleanup()


@pytest.mark.dns
def test_the_opendmarc_check_block_is_byte_for_byte_the_same(nsd_on_port_53: NsdServer) -> None:
    if not os.access(OPENDMARC_CHECK, os.X_OK):
        pytest.fail("opendmarc-check is missing: run `make test` (Debian package opendmarc)")
    resolv = nsd_on_port_53.dir / "resolv.conf"
    resolv.write_text(f"nameserver {nsd_on_port_53.host}\n")
    domains = ["org.example", "minimal.example", "bis.example"]
    script = f'mount --make-rprivate / && mount --bind {resolv} /etc/resolv.conf && exec "$0" "$@"'
    theirs = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, OPENDMARC_CHECK, *domains],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert theirs.returncode == 0, theirs.stderr
    code, ours, _ = invoke("--nameservers", nsd_on_port_53.nameserver, *domains)
    assert code == EXIT_OK
    # Ours = theirs with extra lines (all starting with a tab and not theirs) in each block.
    their_blocks = theirs.stdout.rstrip("\n").split("\n\n")
    our_blocks = ours.rstrip("\n").split("\n\n")
    assert len(their_blocks) == len(our_blocks) == 3
    for their_block, our_block in zip(their_blocks, our_blocks, strict=True):
        their_lines = their_block.splitlines()
        assert our_block.splitlines()[: len(their_lines)] == their_lines
