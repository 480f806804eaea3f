"""The ``check-dmarc`` subcommand: opendmarc-check, ours.

``authmilter check-dmarc [-c CONF] [--nameservers SPEC] [--timeout S] [--method psl|treewalk]
[--psl FILE] [-v] DOMAIN...`` finds the DMARC policy record that applies to each domain the
way the milter does (RFC 7489 §6.6.3 with the public suffix list, or the DMARCbis tree walk)
and prints it in opendmarc-check's layout (same labels, same order, a blank line between
domains)::

    DMARC record for mail.example.com:
    \tSample percentage: 100
    \tDKIM alignment: relaxed
    \tSPF alignment: relaxed
    \tDomain policy: reject
    \tSubdomain policy: unspecified
    \tAggregate report URIs:
    \t\tmailto:dmarc@example.com
    \tFailure report URIs:
    \t\t(none)

followed by what opendmarc-check does not say: where the record was found, the organizational
domain, ``np=``/``t=``/``psd=`` when the record has them, the policy that applies to the domain
itself, and warnings about discarded parts of the record. A domain without a usable record gets
one line on stderr.

The lookups use ``--nameservers``, else the ``Nameservers`` (and ``DNSTimeout``) of ``-c CONF``,
else those of the default configuration file (``cli.DEFAULT_CONFIG``) when it exists, as
opendkim-testkey reads opendkim.conf; else /etc/resolv.conf.

Exit codes follow ``sysexits.h`` (opendmarc-check exits 70 for every failure); with several
domains, the code of the first domain that fails:

=====  ===============================================================================
0      every domain has a valid record
64     EX_USAGE: a malformed --nameservers/--timeout or an argument that is no domain
65     EX_DATAERR: a broken DMARC record (permerror) or a malformed DNS answer
69     EX_UNAVAILABLE: no DMARC record, or several at one name (then none applies)
75     EX_TEMPFAIL: a DNS lookup failed transiently (timeout, SERVFAIL); try again
78     EX_CONFIG: the --psl file or the configuration file cannot be used, or no
       nameserver is configured
=====  ===============================================================================
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from authmilter.addresses import normalize_domain
from authmilter.dmarc import (
    Discovery,
    DmarcRecord,
    OrgDomainMethod,
    PublicSuffix,
    discover,
)
from authmilter.errors import ConfigError, Location
from authmilter.resolver import Resolver
from authmilter.results import DmarcResult

__all__ = [
    "EXIT_CONFIG",
    "EXIT_DATAERR",
    "EXIT_OK",
    "EXIT_TEMPFAIL",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "add_check_dmarc_parser",
    "format_record",
    "run_check_dmarc",
]

#: Every domain has a valid DMARC record.
EXIT_OK = 0
#: EX_USAGE: bad arguments.
EXIT_USAGE = 64
#: EX_DATAERR: a broken record or a malformed DNS answer.
EXIT_DATAERR = 65
#: EX_UNAVAILABLE: no record (or several at one name, which counts as none).
EXIT_UNAVAILABLE = 69
#: EX_TEMPFAIL: a transient DNS failure.
EXIT_TEMPFAIL = 75
#: EX_CONFIG: the public suffix list or the resolver configuration is unusable.
EXIT_CONFIG = 78

PROG = "authmilter"
COMMAND = "check-dmarc"
DEFAULT_TIMEOUT = 5.0

_ALIGNMENT = {"r": "relaxed", "s": "strict"}
_PSD = {"y": "yes, a public suffix domain", "n": "no, an organizational domain", "u": "unknown"}


def _say(stream: TextIO, message: str) -> None:
    print(f"{PROG} {COMMAND}: {message}", file=stream)


def add_check_dmarc_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    default_config: str,
) -> None:
    """Add the ``check-dmarc`` subcommand (opendmarc-check, with more detail) to ``subparsers``.

    ``default_config`` is the file read for resolver settings without ``-c`` (the CLI passes
    ``cli.DEFAULT_CONFIG``; a test can point it elsewhere).
    """
    parser = subparsers.add_parser(
        COMMAND,
        help="show the DMARC policy that applies to domains (as opendmarc-check)",
        description=(
            "Find the DMARC record that applies to each DOMAIN as the milter does and print it "
            "in opendmarc-check's layout, plus where it was found and the DMARCbis tags. "
            "Without -c or --nameservers the lookups use the Nameservers and DNSTimeout of "
            f"{default_config} if it exists, else /etc/resolv.conf. "
            "Exit status 0 when every domain has a valid record; 64 usage, 65 broken record, "
            "69 no record, 75 DNS failure, 78 configuration."
        ),
    )
    parser.add_argument("domains", nargs="+", metavar="DOMAIN", help="From domain to check")
    parser.add_argument(
        "-c",
        "--config",
        metavar="CONF",
        help="take Nameservers and DNSTimeout from this configuration file "
        f"(default: {default_config} if it exists)",
    )
    parser.add_argument(
        "--nameservers",
        metavar="SPEC",
        help="comma-separated nameservers, e.g. 127.0.0.1:5353,[::1]:5353 "
        f"(default: the Nameservers of -c CONF, else of {default_config} if it exists, "
        "else /etc/resolv.conf)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="DNS deadline per lookup in seconds (default: the configuration's DNSTimeout, "
        f"else {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--method",
        choices=[m.value for m in OrgDomainMethod],
        default=OrgDomainMethod.PSL.value,
        help="organizational domain: psl (RFC 7489, the default, as OpenDMARC) or treewalk "
        "(the DMARCbis DNS tree walk)",
    )
    parser.add_argument(
        "--psl",
        metavar="FILE",
        help="public suffix list file (OpenDMARC's PublicSuffixList; default: the list "
        "shipped with the publicsuffixlist package)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="say on stderr which configuration file the resolver settings come from",
    )
    parser.set_defaults(func=run_check_dmarc, default_config=default_config)


def format_record(domain: str, found: Discovery, record: DmarcRecord) -> list[str]:
    """The lines printed for ``domain`` whose policy record is ``record``."""
    lines = [
        f"DMARC record for {domain}:",
        f"\tSample percentage: {record.pct}",
        f"\tDKIM alignment: {_ALIGNMENT[record.adkim]}",
        f"\tSPF alignment: {_ALIGNMENT[record.aspf]}",
        f"\tDomain policy: {record.p.value}",
        f"\tSubdomain policy: {record.sp.value if record.sp else 'unspecified'}",
        "\tAggregate report URIs:",
        *(f"\t\t{uri}" for uri in record.rua or ("(none)",)),
        "\tFailure report URIs:",
        *(f"\t\t{uri}" for uri in record.ruf or ("(none)",)),
    ]
    where = found.detail.split("; ")[0]
    lines.append(f"\t{where[:1].upper()}{where[1:]}")
    if found.org_domain:
        lines.append(f"\tOrganizational domain: {found.org_domain}")
    if "np" in record.tags and record.np is not None:
        lines.append(f"\tNon-existent subdomain policy: {record.np.value}")
    if "t" in record.tags:
        lines.append(f"\tTesting: {'yes' if record.testing else 'no'} (t={record.tags['t']})")
    if "psd" in record.tags:
        lines.append(f"\tPublic suffix domain: {_PSD[record.psd]} (psd={record.psd})")
    lines.append(f"\tPolicy for {domain}: {_applied(domain, found, record)}")
    lines += [f"\tWarning: {warning}" for warning in record.warnings]
    return lines


def _applied(domain: str, found: Discovery, record: DmarcRecord) -> str:
    """The policy the milter would apply to failing mail from ``domain``, and its tag."""
    if found.record_domain == domain:
        policy, tag = record.p, "p"
    elif found.from_domain_exists is False and record.np is not None:
        policy, tag = record.np, "np"
    elif record.sp is not None:
        policy, tag = record.sp, "sp"
    else:
        policy, tag = record.p, "p"
    notes = [f"the record's {tag}="]
    if found.from_domain_exists is False:
        notes.append(f"{domain} does not exist")
    if record.testing:
        notes.append("t=y: one step less strict while testing")
    elif record.pct < 100:
        notes.append(f"to {record.pct}% of failing mail, one step less strict to the rest")
    return f"{policy.value} ({'; '.join(notes)})"


def run_check_dmarc(ns: argparse.Namespace) -> int:
    """Handle ``check-dmarc``: print the policy record of each domain; return the exit code."""
    err = sys.stderr
    resolver = _make_resolver(ns, err)
    if isinstance(resolver, int):
        return resolver
    try:
        psl = PublicSuffix(ns.psl)
    except ConfigError as exc:
        _say(err, str(exc))
        return EXIT_CONFIG
    method = OrgDomainMethod(ns.method)

    first_failure = EXIT_OK
    printed = False
    for argument in ns.domains:
        try:
            domain = normalize_domain(argument)
        except ValueError as exc:
            _say(err, f"{argument}: not a domain: {exc}")
            code = EXIT_USAGE
        else:
            found = discover(resolver, domain, method=method, psl=psl)
            if found.record is not None:
                if printed:
                    print()
                print("\n".join(format_record(domain, found, found.record)))
                printed = True
            code = _code(found)
            if code != EXIT_OK:
                _say(err, f"{domain}: {found.detail}")
        if code != EXIT_OK and first_failure == EXIT_OK:
            first_failure = code
    return first_failure


def _make_resolver(ns: argparse.Namespace, err: TextIO) -> Resolver | int:
    """The resolver: --nameservers, else the Nameservers of -c CONF, else of the default
    configuration file when it exists, else resolv.conf; the timeout likewise from --timeout,
    else DNSTimeout. Returns it, or an exit code after printing the problem (a problem in a
    configuration file is named file:line).
    """
    from authmilter import cli
    from authmilter.config import Config, load_config

    path: str = ns.config or getattr(ns, "default_config", None) or cli.DEFAULT_CONFIG
    config: Config | None = None
    try:
        if ns.config:
            config = load_config(ns.config).config
            if ns.verbose:
                _say(err, f"using configfile {ns.config}")
        elif not ns.nameservers:
            config = cli.read_default_config(path, err, f"{PROG} {COMMAND}", verbose=ns.verbose)
    except ConfigError as exc:
        _say(err, str(exc))
        return EXIT_CONFIG
    timeout: float = ns.timeout if ns.timeout is not None else DEFAULT_TIMEOUT
    if ns.timeout is None and config is not None and config.dns_timeout:
        timeout = float(config.dns_timeout)  # DNSTimeout 0 ("wait forever") keeps the default
    try:
        if ns.nameservers or config is None:
            return Resolver([ns.nameservers] if ns.nameservers else None, timeout=timeout)
        return Resolver(list(config.nameservers) or None, timeout=timeout)
    except ValueError as exc:
        if config is None or (ns.nameservers and timeout > 0):
            _say(err, f"--nameservers/--timeout: {exc}")
            return EXIT_USAGE
        if timeout > 0:
            attr, name = "nameservers", "Nameservers"
        elif ns.timeout is not None:
            _say(err, f"--timeout: {exc}")
            return EXIT_USAGE
        else:
            attr, name = "dns_timeout", "DNSTimeout"
        _say(err, str(ConfigError(f"{name}: {exc}", config.location(attr) or Location(path))))
        return EXIT_CONFIG
    except ConfigError as exc:
        _say(err, str(exc))
        return EXIT_CONFIG


def _code(found: Discovery) -> int:
    if found.error is DmarcResult.TEMPERROR:
        return EXIT_TEMPFAIL
    if found.error is not None:
        return EXIT_DATAERR
    if found.record is None:
        return EXIT_UNAVAILABLE
    return EXIT_OK
