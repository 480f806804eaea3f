r"""The manual pages ``authmilter(8)`` and ``authmilter.conf(5)``, rendered as roff (man(7)).

Both pages are generated, so that they cannot drift from the code:

- ``authmilter.conf.5`` lists every directive of :data:`authmilter.config.DIRECTIVES` from the
  very rows of the table in ``docs/configuration.md``
  (:func:`~authmilter.config.directives_markdown`): its status and default are that table's
  cells, so the page and the document never disagree;
- ``authmilter.8`` takes its synopsis and options from the argparse parsers
  (:func:`authmilter.cli.build_parser`), its exit statuses from the ``EXIT_*`` constants, and
  its defaults and limits from the code.

The prose around them is written here. It has one piece of markup, as the directive table's
notes do: ```code``` is set in bold, with every ``-`` as ``\-`` (a hyphen-minus one types).
Elsewhere a hyphen joining two words stays a hyphen, unless the word is a directive, header
field, command or program name; options (``-c``), paths and values keep ``\-``. A backslash
becomes ``\(rs``, a quote that is no apostrophe ``\(aq``, other non-ASCII characters
``\[uXXXX]``, and a line never starts with ``.`` or ``'``: the pages are plain ASCII.

``python -m authmilter.manpages --output-dir man`` writes both pages (``make man``); ``python
-m authmilter.manpages --check man`` exits 1 when the pages there differ from what it would
write. ``man/`` holds the generated pages, committed as ``docs/configuration.md`` is, and
``tests/test_manpages.py`` keeps them current.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from authmilter import __version__, cli, dmarctools, keytools
from authmilter.config import (
    DEFAULT_OMIT_HEADERS,
    DEFAULT_SIGN_HEADERS,
    DIRECTIVES,
    MAX_INCLUDE_DEPTH,
    Component,
    Directive,
    directive,
    directives_markdown,
)
from authmilter.supervisor import Supervisor

PROGRAM_PAGE = "authmilter.8"
CONFIG_PAGE = "authmilter.conf.5"

# ---------------------------------------------------------------------------------------------
# roff


_NON_WORD_EDGES = "([{<\"'`.,;:!?)]}>"
_LITERAL_WORDS = frozenset(
    w.lower()
    for w in (
        *(d.name for d in DIRECTIVES),
        *DEFAULT_SIGN_HEADERS,
        *DEFAULT_OMIT_HEADERS,
        "Authentication-Results", "Received-SPF", "ARC-Seal",
        "config-test", "check-dmarc",
        "opendkim-genkey", "opendkim-testkey", "opendmarc-check", "policyd-spf",
        "postfix-policyd-spf-python",
    )
)  # fmt: skip
_MANREF = re.compile(r"([^A-Za-z]*)([A-Za-z][\w.+-]*)\(([1-9])\)(\W*)")
_HYPHENATED_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)+")
_STRAY_QUOTE = re.compile(r"(?<![A-Za-z])'|'(?![A-Za-z])")


def escape(text: str) -> str:
    """Backslashes and non-ASCII characters of ``text`` as roff escapes; nothing else."""
    out: list[str] = []
    for ch in text:
        if ch == "\\":
            out.append(r"\(rs")
        elif ord(ch) > 126 or (ord(ch) < 32 and ch != "\t"):
            out.append(f"\\[u{ord(ch):04X}]")
        else:
            out.append(ch)
    return "".join(out)


def literal(text: str) -> str:
    """``text`` typed as is (an option, path, value or name): every ``-`` is ``\\-``."""
    return escape(text).replace("'", r"\(aq").replace("`", r"\(ga").replace("-", r"\-")


def bold(text: str) -> str:
    return rf"\fB{literal(text)}\fR"


def italic(text: str) -> str:
    return rf"\fI{literal(text)}\fR"


def _is_typed(word: str) -> bool:
    """Whether a word with a hyphen is something one types (``\\-``) rather than prose."""
    core = word.strip(_NON_WORD_EDGES)
    core = core.removesuffix("'s")
    if core.startswith("-"):
        return True
    return not _HYPHENATED_WORD.fullmatch(core) or core.lower() in _LITERAL_WORDS


def _word(word: str) -> str:
    ref = _MANREF.fullmatch(word)
    if ref:  # name(N): a reference to another manual page
        before, name, section, after = ref.groups()
        return f"{_word(before) if before else ''}{bold(name)}({section}){_word(after)}"
    out = _STRAY_QUOTE.sub(r"\\(aq", escape(word))
    return out.replace("-", r"\-") if "-" in word and _is_typed(word) else out


def prose(text: str) -> str:
    """Running text with ```code``` spans, as one roff text line (see the module docstring)."""
    parts = " ".join(text.split()).split("`")
    if len(parts) % 2 == 0:
        raise ValueError(f"unbalanced ` in {text!r}")
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(bold(part))
        else:
            out.append(re.sub(r"\S+", lambda m: _word(m.group()), part))
    return "".join(out)


class Page:
    """A man(7) page being written: macros and text lines, never a blank line."""

    def __init__(self, name: str, section: str, title: str, footer: str, manual: str) -> None:
        self.lines: list[str] = [
            rf'.\" {name}({section}): generated by `python -m authmilter.manpages` '
            "(make man); do not edit.",
            r'.\" The source is milter/authmilter/manpages.py, and for the directives the table '
            "in milter/authmilter/config.py.",
        ]
        self.macro("TH", title, section, "", footer, manual)
        # Names, options and paths are long words: no hyphenation (HY is groff's register for
        # it, which .YS restores), and ragged right rather than wide gaps.
        self.macro("nr", "HY", "0")
        self.macro("nh")
        self.macro("ad", "l")

    def macro(self, name: str, *args: str) -> None:
        """``.NAME args``; an argument with white space (or empty) is quoted."""
        shown = [f'"{a}"' if not a or re.search(r"\s", a) else a for a in args]
        if any('"' in a for a in args):
            raise ValueError(f"a quote in the arguments of .{name}: {args!r}")
        self.lines.append(" ".join([f".{name}", *shown]))

    def text(self, roff: str) -> None:
        """One text line, already in roff."""
        roff = roff.strip()
        if not roff:
            raise ValueError("a blank text line")
        self.lines.append(rf"\&{roff}" if roff[0] in ".'" else roff)

    def section(self, title: str) -> None:
        self.macro("SH", title.upper())

    def subsection(self, title: str) -> None:
        """``.SS``; ``title`` in roff."""
        self.macro("SS", title)

    def para(self, text: str) -> None:
        """A paragraph of :func:`prose`."""
        self.macro("PP")
        self.text(prose(text))

    def item(self, tag: str, *paragraphs: str) -> None:
        """A ``.TP`` entry: ``tag`` (roff) and its text (paragraphs of :func:`prose`)."""
        self.macro("TP")
        self.text(tag)
        for i, p in enumerate(paragraphs):
            if i:
                self.macro("br")
            self.text(prose(p))

    def example(self, lines: Iterable[str]) -> None:
        """Literal lines, indented and not filled."""
        self.macro("PP")
        self.macro("RS", "4")
        self.macro("nf")
        for line in lines:
            self.text(literal(line))
        self.macro("fi")
        self.macro("RE")

    def render(self) -> str:
        return "\n".join(self.lines) + "\n"


def _footer() -> str:
    return f"authmilter {__version__}"


# ---------------------------------------------------------------------------------------------
# authmilter.conf(5)

_COMPONENT = {
    Component.OPENDKIM: "OpenDKIM",
    Component.OPENDMARC: "OpenDMARC",
    Component.BOTH: "OpenDKIM and OpenDMARC",
    Component.POLICYD_SPF: "policyd-spf",
    Component.AUTHMILTER: "authmilter's own",
}
_TABLE_HEADER = "| Directive | From | Status | Type | Default | Notes |"
_NO_DEFAULT = "\N{EM DASH}"


def table_rows() -> list[tuple[Directive, str, str]]:
    """``(directive, status, default)`` for every directive, in the order and with the cells
    of the table of ``docs/configuration.md``.

    :raises RuntimeError: when that table's layout is not the one read here.
    """
    lines = directives_markdown().splitlines()
    if lines[0] != _TABLE_HEADER:
        raise RuntimeError(f"directives_markdown() header changed: {lines[0]!r}")
    rows = []
    by_name = {d.name: d for d in DIRECTIVES}
    for line in lines[2:]:
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        name, _from, status, _kind, default, _notes = cells
        rows.append((by_name[name.strip("`")], status, default))
    if len(rows) != len(DIRECTIVES):
        raise RuntimeError("directives_markdown() does not list every directive")
    return rows


def _directive_entry(page: Page, d: Directive, status: str, default: str) -> None:
    kind = italic(d.kind.value)
    if d.choices:
        kind += " " + "|".join(bold(c) for c in d.choices)
    shown = "no default" if default == _NO_DEFAULT else rf"default {bold(default)}"
    page.macro("TP")
    page.macro("B", literal(d.name))
    page.text(f"{kind}; {shown}; {escape(status)}; {prose(_COMPONENT[d.component])}.")
    page.macro("br")
    page.text(prose(d.doc))


def config_page() -> str:
    """The text of ``authmilter.conf.5``."""
    conf = cli.DEFAULT_CONFIG
    page = Page("authmilter.conf", "5", "AUTHMILTER.CONF", _footer(), "File Formats Manual")
    page.section("Name")
    page.text(r"authmilter.conf \- configuration file of authmilter, the DKIM, SPF and DMARC "
              "milter")

    page.section("Synopsis")
    page.text(bold(conf))

    page.section("Description")
    page.para(
        f"authmilter(8) reads its configuration from `{conf}`, or from the file named with "
        "`-c`. The syntax and the directive names are those of OpenDKIM 2.11 (opendkim.conf(5)) "
        "and OpenDMARC 1.4 (opendmarc.conf(5)), and the options of policyd-spf 3.0 "
        "(policyd-spf.conf(5)) are accepted too. Existing `opendkim.conf`, `opendmarc.conf` and "
        "`policyd-spf.conf` files are read unchanged with `--opendkim-conf`, `--opendmarc-conf` "
        "and `--policyd-spf-conf` instead of `-c`; where they set one directive to different "
        "values, the first file's value is used, in that order, and a warning names both lines."
    )
    page.para(
        "Each line holds a directive name, white space and the value. A `#` starts a comment "
        "that runs to the end of the line; blank lines are ignored. Directive names are matched "
        "without regard to case. A Boolean is read by its first character: `T t Y y 1` mean "
        "true and `F f N n 0` mean false. `Include FILE` reads another file in place; a "
        "relative path is taken relative to the including file, and includes nest "
        f"{MAX_INCLUDE_DEPTH} levels deep at most. When a directive is set twice to values that "
        "mean different things, the last value wins and a warning names both lines. "
        "policyd-spf's options may also be written in its own syntax, `HELO_reject = Fail`."
    )
    page.para(
        "A name no program knows is an error, with a \"did you mean\" suggestion; a value of "
        "the wrong type is an error; both name the file and line. A directive OpenDKIM, "
        "OpenDMARC or policyd-spf knows but authmilter does not implement is named in a warning "
        "and ignored. `authmilter config-test` checks a configuration as `opendkim -n` does, and "
        "with `-v` prints every supported directive with its effective value and where it was "
        "set."
    )
    restart = ", ".join(f"`{n}`" for n in ("Socket", "UserID", "PidFile", "UMask", "Workers",
                                            "MetricsListen"))  # fmt: skip
    page.para(
        "The running milter reads the configuration, its tables and keys again on SIGHUP "
        f"(`systemctl reload authmilter`); {restart} and the syslog settings take effect at "
        "the next start."
    )
    page.subsection("Datasets")
    page.para("Directives of type dataset take OpenDKIM's dataset forms:")
    page.item(
        rf"{bold('file:')}{italic('/path')}, or a path starting with {bold('/')}, "
        rf"{bold('./')} or {bold('../')}",
        "A flat file with one entry per line: a key, white space and a value. `#` starts a "
        "comment.",
    )
    page.item(
        rf"{bold('refile:')}{italic('/path')}",
        "Wildcard patterns, one per line, tried in file order. A pattern must match the whole "
        "string, `*` matches any run of characters, every other character is literal, and case "
        "is ignored: `*@example.com` does not match `user@sub.example.com`.",
    )
    page.item(
        rf"{bold('csl:')}{italic('a,b,c')}, or any other value",
        "A comma-separated list; `key=value` items are pairs.",
    )
    page.para(
        "Other dataset types of OpenDKIM (`db:`, `dsn:`, `ldap:`, `lua:`, `memcache:` and the "
        "like) are an error. Host lists (`InternalHosts`, `ExternalIgnoreList`, `PeerList`, "
        "`IgnoreHosts`) hold IPv4 and IPv6 addresses, CIDR blocks, host names and `.domain` "
        "suffixes; a `!` prefix negates an entry and the most specific match decides. They are "
        "matched as OpenDKIM 2.11 matches them: a `refile:` host list holds extended regular "
        "expressions, and an entry OpenDKIM would never match is named in a warning that says "
        "what to write instead. `IgnoreHosts` is a file path, as in OpenDMARC, unless it "
        "carries a dataset prefix."
    )
    page.subsection("Signing keys")
    page.para(
        "`KeyTable` lines are `keyname domain:selector:/path/to/key`; a domain of `%` stands "
        "for the From domain, and a `%` in the path is replaced by it. `SigningTable` maps the "
        "From address to a key name, for example `*@example.com` in a `refile:` table. Without "
        "a `KeyTable`, `Domain`, `KeyFile` and `Selector` sign with one key. Keys are PEM RSA "
        "or Ed25519 keys, read at start and at each reload; with `RequireSafeKeys` (the "
        "default) a key file others could read or replace is refused."
    )

    page.section("Directives")
    page.para(
        "Every directive authmilter recognises, from the same table as the configuration "
        "reference (docs/configuration.md). Each entry gives the type of the value, the "
        "default, the status and the program the directive comes from, then what it does. "
        "The status is one of:"
    )
    page.item(bold("supported"), "authmilter honours the directive.")
    page.item(
        bold("always true") + ", " + bold("always false"),
        "authmilter always behaves as that value: setting it so is silent, setting the other "
        "value is named in a warning with its file and line.",
    )
    page.item(
        bold("warned, ignored"),
        "A configuration may contain the directive; it is named in a warning with its file and "
        "line, and has no effect. With (resolver), it configured the resolver library of "
        "OpenDKIM; authmilter uses dnspython, see `Nameservers`.",
    )
    for d, status, default in table_rows():
        _directive_entry(page, d, status, default)

    page.section("Files")
    page.item(bold(conf), "The configuration file.")
    page.item(
        bold("/etc/authmilter/key.table") + ", " + bold("/etc/authmilter/signing.table"),
        "The `KeyTable` and `SigningTable` as a configuration usually names them "
        "(`KeyTable file:/etc/authmilter/key.table`, `SigningTable "
        "refile:/etc/authmilter/signing.table`).",
    )
    page.item(
        bold("/etc/dkimkeys"),
        "The private keys, a folder per domain, laid out as Debian's opendkim package lays it "
        "out: only the milter's user may enter it (mode 0700).",
    )

    page.section("See also")
    page.text(_see_also("authmilter(8)", "opendkim.conf(5)", "opendmarc.conf(5)",
                        "policyd-spf.conf(5)"))  # fmt: skip
    return page.render()


def _see_also(*refs: str) -> str:
    return ", ".join(_word(r) for r in refs)


# ---------------------------------------------------------------------------------------------
# authmilter(8)


@dataclass(frozen=True)
class Command:
    """A command of the ``authmilter`` parser: ``path`` holds each word with its parser, from
    the top (``[("authmilter", top), ("rotate", p1), ("new", p2)]``)."""

    path: tuple[tuple[str, argparse.ArgumentParser], ...]
    help: str

    @property
    def name(self) -> str:
        return " ".join(word for word, _ in self.path[1:])

    @property
    def parser(self) -> argparse.ArgumentParser:
        return self.path[-1][1]

    @property
    def is_group(self) -> bool:
        """Whether it only holds further commands (``rotate``: ``new``, ``check`` …)."""
        return _subparsers(self.parser) is not None


def _subparsers(
    parser: argparse.ArgumentParser,
) -> argparse._SubParsersAction[argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def commands(parser: argparse.ArgumentParser) -> list[Command]:
    """Every command and nested command of ``parser``, depth first, in the parser's order."""
    found: list[Command] = []

    def walk(path: tuple[tuple[str, argparse.ArgumentParser], ...]) -> None:
        sub = _subparsers(path[-1][1])
        if sub is None:
            return
        helps = {a.dest: a.help or "" for a in sub._choices_actions}
        for name, child in sub.choices.items():
            here = (*path, (name, child))
            found.append(Command(here, helps.get(name, "")))
            walk(here)

    walk(((parser.prog, parser),))
    return found


def shown_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options and positionals of ``parser`` the page shows: not help, not suppressed,
    not the choice of a subcommand (those have their own entries)."""
    return [a for a in parser._actions
            if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
            and a.help != argparse.SUPPRESS]  # fmt: skip


def _top_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The program's own options, help included."""
    return [a for a in parser._actions
            if a.option_strings and a.help != argparse.SUPPRESS]  # fmt: skip


def _has_help(parser: argparse.ArgumentParser, option: str) -> bool:
    return any(isinstance(a, argparse._HelpAction) and option in a.option_strings
               for a in parser._actions)  # fmt: skip


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _metavar(action: argparse.Action) -> str:
    """The argument of an option or a positional, in roff, as argparse names it."""
    if action.choices is not None and action.metavar is None:
        return "|".join(bold(str(c)) for c in action.choices)
    if isinstance(action.metavar, tuple):
        raise RuntimeError(f"tuple metavar of {action.dest} is not rendered")
    name = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    shown = italic(name)
    if action.nargs in ("+", "*"):
        shown += r" .\|.\|."
    return shown


def _synopsis_item(action: argparse.Action) -> str:
    if not action.option_strings:
        shown = _metavar(action)
        return f"[{shown}]" if action.nargs in ("?", "*") else shown
    opt = bold(action.option_strings[0])
    if _takes_value(action):
        opt += " " + _metavar(action)
    return opt if action.required else f"[{opt}]"


def _option_tag(action: argparse.Action) -> str:
    if not action.option_strings:
        return _metavar(action)
    value = " " + _metavar(action) if _takes_value(action) else ""
    return ", ".join(bold(s) + value for s in action.option_strings)


def _help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = argparse.HelpFormatter(parser.prog)._expand_help(action) if action.help else ""
    return _sentence(text)


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def _synopsis(page: Page, path: Sequence[tuple[str, argparse.ArgumentParser]]) -> None:
    """``.SY`` for one command: each word followed by the options of its own parser (the
    program's own options, ``-V`` and ``--help``, only in the line of the program alone)."""
    page.macro("SY", path[0][0])
    items: list[str] = []
    if len(path) == 1:
        items.extend(_synopsis_item(a) for a in _top_actions(path[0][1]))
    for word, parser in path[1:]:
        items.append(bold(word))
        items.extend(_synopsis_item(a) for a in shown_actions(parser))
    if items:
        page.text(" ".join(items))
    page.macro("YS")


def _options(page: Page, parser: argparse.ArgumentParser,
             actions: Iterable[argparse.Action]) -> None:  # fmt: skip
    for action in actions:
        page.macro("TP")
        page.text(_option_tag(action))
        help_text = _help_text(parser, action)
        if help_text:
            page.text(prose(help_text))


#: Written here: what a command does beyond its argparse help (which comes first).
_COMMAND_TEXT = {
    "run": (
        "Read the configuration, tables and keys (a problem is reported as `config-test` "
        "reports it, and the exit status is 78), then serve milter connections on `Socket` "
        "until SIGTERM or SIGINT. Started as root, authmilter opens the socket, reads "
        "the configuration, tables and keys, and forks `Workers` processes (default one per "
        "CPU) that become the `UserID` user before they handle mail. The supervisor stays root "
        "and handles no mail, so the keys are read with the same rights at start and at every "
        "reload. It stays in the foreground, for a service manager; under systemd "
        "(`Type=notify`) it reports readiness once the socket listens."
    ),
    "config-test": (
        "Read the configuration, every dataset and every key as `run` would (run it as root, "
        "as the service starts), check the folders of the socket and the pid file, and print "
        "the warnings. It ends with `configuration OK` and exits 0 only when the configuration "
        "is usable; otherwise it names the file and line of the first problem and exits 78. "
        "`-v` prints every supported directive with its effective value and where it was set."
    ),
}


def _exit_status(page: Page, names: Sequence[str]) -> None:
    k, m = keytools, dmarctools
    shared = ("EXIT_OK", "EXIT_USAGE", "EXIT_DATAERR", "EXIT_UNAVAILABLE", "EXIT_TEMPFAIL",
              "EXIT_CONFIG")  # fmt: skip
    if any(getattr(k, n) != getattr(m, n) for n in shared) or k.EXIT_CONFIG != cli.EXIT_CONFIG:
        raise RuntimeError("keytools, dmarctools and cli disagree on an exit status")
    page.para("For every command:")
    page.item(bold(str(cli.EXIT_OK)), "Success; `run` was stopped by SIGTERM or SIGINT.")
    page.item(
        bold(str(cli.EXIT_FAILURE)),
        "An error other than the configuration; `run` stopped because workers kept dying "
        f"(more than {Supervisor.MAX_RESTARTS} in {Supervisor.RESTART_WINDOW:g} seconds).",
    )
    page.item(
        bold(str(cli.EXIT_USAGE)),
        "The command line cannot be parsed: an unknown command or option, or a missing argument.",
    )
    page.item(
        bold(str(cli.EXIT_CONFIG)),
        "EX_CONFIG: the configuration cannot be used; the message names the file and line. For "
        "`testkey` and `check-dmarc` also unusable resolver settings (no nameserver), and for "
        "`check-dmarc` a `--psl` file that cannot be read.",
    )
    tools = [f"`{n}`" for n in names if n not in ("run", "config-test")]
    tools_text = ", ".join(tools[:-1]) + " and " + tools[-1] if len(tools) > 1 else tools[0]
    page.para(f"{tools_text} also use these codes of sysexits.h, as OpenDKIM's tools do:")
    page.item(
        bold(str(k.EXIT_USAGE)),
        "EX_USAGE: arguments that parse but cannot be used: an RSA key under 1024 bits or a "
        "bad selector (`genkey`), no `-d`/`-s` (`testkey`), a malformed `--nameservers` or "
        "`--timeout`, an argument that is no domain (`check-dmarc`).",
    )
    page.item(
        bold(str(k.EXIT_DATAERR)),
        "EX_DATAERR: the key record is malformed or does not match the private key "
        "(`testkey`); a broken DMARC record or a malformed DNS answer (`check-dmarc`).",
    )
    page.item(
        bold(str(k.EXIT_NOINPUT)),
        "EX_NOINPUT: the private key file cannot be read or holds no usable key (`testkey`).",
    )
    page.item(
        bold(str(k.EXIT_UNAVAILABLE)),
        "EX_UNAVAILABLE: no key record, or a revoked one (`testkey`); no DMARC record "
        "(`check-dmarc`).",
    )
    page.item(
        bold(str(k.EXIT_CANTCREAT)),
        "EX_CANTCREAT: an output file exists (without `--force`) or cannot be written "
        "(`genkey`).",
    )
    page.item(
        bold(str(k.EXIT_TEMPFAIL)),
        "EX_TEMPFAIL: a DNS lookup failed transiently (timeout, SERVFAIL); try again.",
    )
    page.item(
        bold(str(k.EXIT_NOPERM)),
        "EX_NOPERM: the private key file is unsafe and `--require-safe-keys` was given "
        "(`testkey`).",
    )


def program_page() -> str:
    """The text of ``authmilter.8``."""
    conf = cli.DEFAULT_CONFIG
    parser = cli.build_parser()
    every = commands(parser)
    socket_default = directive("Socket").default
    facility = directive("SyslogFacility").default
    ident = directive("SyslogName").default

    page = Page("authmilter", "8", "AUTHMILTER", _footer(), "System Manager's Manual")
    page.section("Name")
    page.text(r"authmilter \- DKIM signing and verification, SPF and DMARC in one milter")

    page.section("Synopsis")
    _synopsis(page, [(parser.prog, parser)])
    for command in every:
        if not command.is_group:
            _synopsis(page, command.path)

    page.section("Description")
    page.para(
        "authmilter is a mail filter (milter) for Postfix and Sendmail. It signs outbound mail "
        "with DKIM (RFC 6376), verifies DKIM signatures, checks SPF (RFC 7208) and applies "
        "DMARC (RFC 7489) in one process, and reports the results in one "
        "Authentication-Results header field. It is a drop-in for OpenDKIM, OpenDMARC and "
        "policyd-spf: it reads their configuration files and directive names, described in "
        f"authmilter.conf(5); by default `{conf}`."
    )
    page.para(
        "Mail that OpenDKIM would sign (from a client in `InternalHosts`, after SMTP AUTH, or "
        "marked by `MTA` or `MacroList`) is signed with the keys the `SigningTable` (or "
        "`Domain`, `KeyFile` and `Selector`) chooses for its From address. Other mail is "
        "verified: its DKIM signatures, SPF, then DMARC, with the results in "
        "Authentication-Results. What happens to a message then is set by the `On-*` "
        "directives, `RejectFailures` and the policyd-spf options."
    )
    no_short = [c.name for c in every if not _has_help(c.parser, "-h")]
    note = (" (except " + ", ".join(f"`{n}`" for n in no_short) + ", where `-h` is an option "
            "of its own)" if no_short else "")  # fmt: skip
    page.para(f"`authmilter COMMAND --help` lists a command's options; so does `-h`{note}.")

    page.section("Options")
    _options(page, parser, _top_actions(parser))
    page.section("Commands")
    for command in every:
        page.subsection(literal(command.name))
        page.para(_sentence(command.help))
        if command.parser.description:
            page.para(_sentence(command.parser.description))
        if command.name in _COMMAND_TEXT:
            page.para(_COMMAND_TEXT[command.name])
        _options(page, command.parser, shown_actions(command.parser))

    page.section("Signals")
    page.item(
        bold("SIGHUP") + ", " + bold("SIGUSR1"),
        "Reload (`systemctl reload authmilter`). The supervisor reads the configuration, tables "
        "and keys again. If that works, it starts new workers with them; the old ones take no "
        "new connection, finish theirs and exit, so no connection is refused or dropped. A "
        "reload that fails keeps the running configuration and logs why. `Socket`, `UserID`, "
        "`PidFile`, `UMask`, `Workers`, `MetricsListen` and the syslog settings need a restart.",
    )
    page.item(
        bold("SIGTERM") + ", " + bold("SIGINT"),
        "Stop (`systemctl stop authmilter`). The workers take no new connection, let the "
        f"messages in flight finish (at most {Supervisor.STOP_WAIT:g} seconds) and exit; the "
        "socket and the pid file are removed.",
    )
    page.item(
        "A killed worker",
        "The supervisor starts a replacement. If workers keep dying (more than "
        f"{Supervisor.MAX_RESTARTS} in {Supervisor.RESTART_WINDOW:g} seconds), it stops.",
    )

    page.section("Files")
    page.item(bold(conf), "The configuration, authmilter.conf(5).")
    page.item(
        bold("/etc/authmilter/key.table") + ", " + bold("/etc/authmilter/signing.table"),
        "The `KeyTable` and `SigningTable`, as a configuration usually names them.",
    )
    page.item(
        bold("/etc/dkimkeys"),
        "The private keys, a folder per domain (mode 0700), as Debian's opendkim package lays "
        "it out (`authmilter genkey -D /etc/dkimkeys/DOMAIN`).",
    )
    page.item(
        bold("/run/authmilter/authmilter.pid"),
        "The process id of the supervisor, with `PidFile /run/authmilter/authmilter.pid`; the "
        "systemd unit creates `/run/authmilter` (`RuntimeDirectory=`).",
    )
    page.item(
        bold("/var/lib/authmilter"),
        "State, owned by the milter's user: `rotate activate` records each activation in "
        "`rotate/DOMAIN.json` there, for `rotate retire`; the package's `ReportDatabase` is "
        "`dmarc.db` there.",
    )
    page.item(
        bold("authmilter-reports.timer"),
        "The systemd timer that runs `authmilter reports send` hourly as the milter's user "
        "(`authmilter-reports.service`); shipped by the package, not enabled until you "
        "enable it.",
    )
    page.item(
        bold("/var/spool/postfix/authmilter/authmilter.sock"),
        "The socket, with `Socket local:/var/spool/postfix/authmilter/authmilter.sock`: inside "
        "the chroot of Postfix's smtpd, which connects to `unix:authmilter/authmilter.sock`. "
        f"The default `Socket` is `{socket_default}`.",
    )

    page.section("Logging")
    page.para(
        f"authmilter logs to syslog (`/dev/log`) with facility `{facility}` and the name "
        f"`{ident}` (`Syslog`, `SyslogFacility`, `SyslogName`), as Debian's opendkim and "
        "opendmarc packages do: the lines are in `/var/log/mail.log` where rsyslog runs, "
        f"otherwise in the journal (`journalctl -t {ident}`). Each message gets one line keyed "
        "by the MTA's queue id; plain successes are logged only with `SyslogSuccess yes`. "
        "`Syslog no`, or no `/dev/log`, sends the lines to standard error."
    )

    page.section("Exit status")
    _exit_status(page, [c.path[1][0] for c in every if len(c.path) == 2])

    page.section("See also")
    page.text(_see_also("authmilter.conf(5)", "opendkim(8)", "opendkim-genkey(8)",
                        "opendkim-testkey(8)", "opendmarc(8)", "opendmarc-check(8)",
                        "policyd-spf(1)", "postconf(5)"))  # fmt: skip
    return page.render()


# ---------------------------------------------------------------------------------------------
# Writing them


def render_pages() -> dict[str, str]:
    """File name → text of every page."""
    return {PROGRAM_PAGE: program_page(), CONFIG_PAGE: config_page()}


def write_pages(directory: str | Path) -> list[Path]:
    """Write every page into ``directory`` (made if missing); returns the paths."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_pages().items():
        path = folder / name
        path.write_text(text, encoding="ascii")
        written.append(path)
    return written


def stale_pages(directory: str | Path) -> list[str]:
    """The pages in ``directory`` that are missing or differ from :func:`render_pages`."""
    stale = []
    for name, text in render_pages().items():
        path = Path(directory) / name
        try:
            current = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            current = None
        if current != text:
            stale.append(str(path))
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m authmilter.manpages (--output-dir DIR | --check DIR)``."""
    parser = argparse.ArgumentParser(
        prog="python -m authmilter.manpages",
        description="Write (or check) the man pages authmilter.8 and authmilter.conf.5.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--output-dir", metavar="DIR", help="write both pages into DIR")
    what.add_argument("--check", metavar="DIR",
                      help="exit 1 if the pages in DIR differ from what would be written")
    ns = parser.parse_args(argv)
    if ns.check:
        stale = stale_pages(ns.check)
        for name in stale:
            print(f"{name}: out of date; run `make man` (python -m authmilter.manpages "
                  f"--output-dir {ns.check})", file=sys.stderr)  # fmt: skip
        return 1 if stale else 0
    for path in write_pages(ns.output_dir):
        print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover - `make man`
    sys.exit(main())
