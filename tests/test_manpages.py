"""The man pages: man/ holds what ``authmilter.manpages`` writes, they cover every directive,
command and option, and Debian's real tools (groff, man-db) read them without a warning.

The tools never skip: without them the test fails and names the Debian package (``make test``
installs them).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from authmilter import manpages
from authmilter.cli import build_parser
from authmilter.config import DIRECTIVES, directives_markdown

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
NAMES = {
    manpages.PROGRAM_PAGE: "authmilter",
    manpages.CONFIG_PAGE: "authmilter.conf",
}


def unescape(roff: str) -> str:
    """The page with ``\\-`` as ``-``, for looking words up."""
    return roff.replace("\\-", "-")


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install Debian's {package} (make test does)")
    return path


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return manpages.render_pages()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("man")
    manpages.write_pages(folder)
    return folder


# -- the committed pages -----------------------------------------------------------------------


def test_committed_pages_are_what_the_generator_writes() -> None:
    stale = manpages.stale_pages(MAN)
    assert not stale, f"{stale}: run `make man` (python -m authmilter.manpages --output-dir man)"


def test_check_option_tells_a_stale_page(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert manpages.main(["--output-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(NAMES)
    assert manpages.main(["--check", str(tmp_path)]) == 0
    page = tmp_path / manpages.CONFIG_PAGE
    page.write_text(page.read_text().replace(".B ClockDrift\n", ""))
    capsys.readouterr()
    assert manpages.main(["--check", str(tmp_path)]) == 1
    assert f"{page}: out of date" in capsys.readouterr().err


def test_pages_are_plain_ascii_roff(pages: dict[str, str]) -> None:
    for name, text in pages.items():
        assert text.isascii(), name
        assert text.startswith('.\\" '), name
        lines = text.splitlines()
        assert not [n for n, line in enumerate(lines) if not line.strip()], f"{name}: blank line"
        th = next(line for line in lines if line.startswith(".TH "))
        assert th.split()[1:3] == [NAMES[name].upper(), name.rpartition(".")[2]]


# -- authmilter.conf(5) ------------------------------------------------------------------------


def test_every_directive_has_an_entry(pages: dict[str, str]) -> None:
    page = pages[manpages.CONFIG_PAGE]
    entries = [unescape(n) for n in re.findall(r"^\.TP\n\.B (\S+)$", page, re.M)]
    assert sorted(entries) == sorted(d.name for d in DIRECTIVES)


def test_entries_say_what_the_configuration_md_table_says(pages: dict[str, str]) -> None:
    """Status and default of each entry are the cells of docs/configuration.md's table."""
    page = unescape(pages[manpages.CONFIG_PAGE])
    rows = directives_markdown().splitlines()[2:]
    assert len(rows) == len(DIRECTIVES)
    for row in rows:
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row)[1:-1]]
        name, status, default = cells[0].strip("`"), cells[2], cells[4]
        entry = re.search(rf"^\.B {re.escape(name)}\n(.*)$", page, re.M)
        assert entry, name
        line = entry.group(1)
        assert f"; {status}; " in line, (name, line)
        if default == "\N{EM DASH}":
            assert "; no default; " in line, (name, line)
        else:
            shown = default.encode("ascii", "backslashreplace").decode()
            shown = re.sub(r"\\u(\w{4})", lambda m: f"\\[u{m.group(1).upper()}]", shown)
            shown = shown.replace("'", "\\(aq")
            assert f"default \\fB{shown}\\fR;" in line, (name, line)


def test_config_page_names_its_files(pages: dict[str, str]) -> None:
    from authmilter.cli import DEFAULT_CONFIG

    page = unescape(pages[manpages.CONFIG_PAGE])
    assert f".SH SYNOPSIS\n\\fB{DEFAULT_CONFIG}\\fR\n" in page
    for ref in ("authmilter", "opendkim.conf", "opendmarc.conf"):
        assert f"\\fB{ref}\\fR(" in page.partition(".SH \"SEE ALSO\"")[2]


# -- authmilter(8) -----------------------------------------------------------------------------


def parsers(
    parser: argparse.ArgumentParser, words: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, bool]]:
    """Every (command words, parser, has subcommands) under ``parser``, itself first."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    yield words, parser, bool(subs)
    for sub in subs:
        for name, child in sub.choices.items():
            yield from parsers(child, (*words, name))


def sections(page: str, macro: str) -> dict[str, str]:
    """The text under each ``.SH``/``.SS`` heading, by heading (quotes removed)."""
    parts = re.split(rf"^\.{macro} (.*)$", page, flags=re.M)
    return {parts[i].strip('"'): parts[i + 1] for i in range(1, len(parts), 2)}


def test_every_command_and_option_is_in_authmilter_8(pages: dict[str, str]) -> None:
    page = unescape(pages[manpages.PROGRAM_PAGE])
    top = sections(page, "SH")
    commands = sections(top["COMMANDS"], "SS")
    synopsis = top["SYNOPSIS"]
    seen = set()
    for words, parser, has_subcommands in parsers(build_parser()):
        where = top["OPTIONS"] if not words else commands[" ".join(words)]
        if words and not has_subcommands:
            assert ".SY authmilter\n" + " ".join(f"\\fB{w}\\fR" for w in words) in synopsis, words
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue
            if words and isinstance(action, argparse._HelpAction):
                continue  # one sentence covers every command's --help
            for option in action.option_strings:
                assert f"\\fB{option}\\fR" in where, (words, option)
                seen.add(option)
            if not action.option_strings:
                assert f"\\fI{action.metavar or action.dest}\\fR" in where, (words, action.dest)
    assert {"-c", "--config", "-p", "-v", "-h", "--help", "-V", "--version"} <= seen
    assert set(commands) >= {"run", "config-test", "genkey", "testkey", "check-dmarc"}


def test_program_page_sections_and_facts(pages: dict[str, str]) -> None:
    from authmilter import cli

    page = unescape(pages[manpages.PROGRAM_PAGE])
    top = sections(page, "SH")
    assert list(top)[:3] == ["NAME", "SYNOPSIS", "DESCRIPTION"]
    for heading in ("SIGNALS", "FILES", "LOGGING", "EXIT STATUS", "SEE ALSO"):
        assert heading in top
    for signal in ("SIGHUP", "SIGUSR1", "SIGTERM", "SIGINT"):
        assert f"\\fB{signal}\\fR" in top["SIGNALS"]
    assert "at most 4 seconds" in top["SIGNALS"]
    for path in (cli.DEFAULT_CONFIG, "/etc/authmilter/key.table", "/etc/authmilter/signing.table",
                 "/etc/dkimkeys", "/run/authmilter/authmilter.pid",
                 "/var/spool/postfix/authmilter/authmilter.sock"):  # fmt: skip
        assert f"\\fB{path}\\fR" in top["FILES"], path
    assert "facility \\fBmail\\fR" in top["LOGGING"]
    for code in (cli.EXIT_OK, cli.EXIT_FAILURE, cli.EXIT_USAGE, cli.EXIT_CONFIG):
        assert f".TP\n\\fB{code}\\fR\n" in top["EXIT STATUS"], code
    assert "\\fBauthmilter.conf\\fR(5)" in top["SEE ALSO"]


def test_prose_escapes_what_roff_would_misread() -> None:
    page = manpages.Page("x", "1", "X", "f", "m")
    page.text(manpages.prose(".dot first"))
    page.text(manpages.prose("'quote first"))
    assert page.lines[-2:] == ["\\&.dot first", "\\(aqquote first"]
    assert manpages.prose("a \\ b") == "a \\(rs b"
    assert manpages.prose("use `-c FILE` or --config, see authmilter.conf(5)") == (
        "use \\fB\\-c FILE\\fR or \\-\\-config, see \\fBauthmilter.conf\\fR(5)"
    )
    # A hyphen between words stays one; names one types keep the hyphen-minus.
    assert manpages.prose("per-message On-BadSignature rsa-sha256 /a-b policyd-spf's") == (
        "per-message On\\-BadSignature rsa\\-sha256 /a\\-b policyd\\-spf's"
    )
    assert manpages.prose("'key OK' (RFC 6376 \N{SECTION SIGN}3)") == (
        "\\(aqkey OK\\(aq (RFC 6376 \\[u00A7]3)"
    )


# -- the real tools ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(NAMES))
def test_groff_reads_the_page_without_a_warning(written: Path, name: str) -> None:
    groff = tool("groff", "groff-base")
    result = subprocess.run([groff, "-man", "-ww", "-z", str(written / name)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("name", sorted(NAMES))
def test_man_renders_the_page_without_a_warning(written: Path, name: str) -> None:
    man = tool("man", "man-db")
    env = {**os.environ, "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "80", "LC_ALL": "C.UTF-8"}
    result = subprocess.run([man, "--warnings", "-l", "-E", "UTF-8", str(written / name)],
                            capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith(f"{NAMES[name].upper()}(")
    assert "\nNAME\n" in result.stdout and "\nSEE ALSO\n" in result.stdout


@pytest.mark.parametrize("name", sorted(NAMES))
def test_lexgrog_finds_the_name_section(written: Path, name: str) -> None:
    """lexgrog parses NAME as mandb does for whatis/apropos."""
    lexgrog = tool("lexgrog", "man-db")
    path = written / name
    result = subprocess.run([lexgrog, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f'{path}: "{NAMES[name]} - '), result.stdout
