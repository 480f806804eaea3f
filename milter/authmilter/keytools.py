"""The ``genkey`` and ``testkey`` subcommands: opendkim-genkey and opendkim-testkey, ours.

``genkey`` takes opendkim-genkey's options (including ``-h`` for hash algorithms, so help is
``--help`` only) and writes the same two files: ``<selector>.private`` (PEM, mode 0600) and
``<selector>.txt`` (a zone-file stub laid out as opendkim-genkey lays it out). It then prints
the KeyTable and SigningTable lines that put the key to use.

``testkey`` looks up ``<selector>._domainkey.<domain>`` and checks the record, and the private
key against it when ``-k`` is given; ``-c`` checks every KeyTable entry of a config file. As
opendkim-testkey, it notes on stderr whether the answer was DNSSEC-validated ("key not secure"
unless the nameserver set the AD flag); that note never changes the exit status.
Without ``-c`` or ``--nameservers`` the lookups use the ``Nameservers`` and ``DNSTimeout`` of the
default configuration file (``cli.DEFAULT_CONFIG``) when it exists, as opendkim-testkey reads
opendkim.conf; else /etc/resolv.conf.

Exit codes follow ``sysexits.h``, as OpenDKIM's tools do; see the ``EXIT_*`` constants.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from authmilter.errors import ConfigError, KeyMaterialError, Location
from authmilter.keys import (
    MIN_RSA_BITS,
    RECOMMENDED_RSA_BITS,
    KeyAlgorithm,
    KeyTestResult,
    KeyTestStatus,
    PrivateKey,
    bind_txt,
    generate_private_key,
    key_record_name,
    key_record_text,
    load_private_key,
    parse_private_key,
    test_key,
    unsafe_key_file_reason,
)
from authmilter.resolver import Resolver

if TYPE_CHECKING:
    from authmilter.config import Config

__all__ = [
    "EXIT_CANTCREAT",
    "EXIT_CONFIG",
    "EXIT_DATAERR",
    "EXIT_NOINPUT",
    "EXIT_NOPERM",
    "EXIT_OK",
    "EXIT_TEMPFAIL",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "add_genkey_parser",
    "add_testkey_parser",
    "exit_code_for",
    "run_genkey",
    "run_testkey",
]

#: Success (a key in testing mode, ``t=y``, is a success too).
EXIT_OK = 0
#: EX_USAGE: bad arguments, e.g. an RSA key under 1024 bits or a missing -d/-s.
EXIT_USAGE = 64
#: EX_DATAERR: the key record is malformed or does not match the private key (opendkim-testkey
#: exits 65 for "keys do not match").
EXIT_DATAERR = 65
#: EX_NOINPUT: the private key file cannot be read or holds no usable key.
EXIT_NOINPUT = 66
#: EX_UNAVAILABLE: no key record (NXDOMAIN, no TXT at the name) or a revoked one (empty p=);
#: opendkim-testkey exits 69 for both too.
EXIT_UNAVAILABLE = 69
#: EX_CANTCREAT: genkey's output file exists (without --force) or cannot be written.
EXIT_CANTCREAT = 73
#: EX_TEMPFAIL: the DNS lookup failed (timeout, SERVFAIL, malformed answer); try again.
EXIT_TEMPFAIL = 75
#: EX_NOPERM: the private key file is unsafe and --require-safe-keys was given.
EXIT_NOPERM = 77
#: EX_CONFIG: the configuration file (-c) or the resolver settings are unusable.
EXIT_CONFIG = 78

PROG = "authmilter"
DEFAULT_TIMEOUT = 5.0
_SELECTOR = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")

_STATUS_EXIT = {
    KeyTestStatus.OK: EXIT_OK,
    KeyTestStatus.TESTING: EXIT_OK,
    KeyTestStatus.NO_RECORD: EXIT_UNAVAILABLE,
    KeyTestStatus.MALFORMED: EXIT_DATAERR,
    KeyTestStatus.MISMATCH: EXIT_DATAERR,
    KeyTestStatus.REVOKED: EXIT_UNAVAILABLE,
    KeyTestStatus.DNS_ERROR: EXIT_TEMPFAIL,
}


def exit_code_for(status: KeyTestStatus) -> int:
    """Return the exit code ``testkey`` uses for a key test status."""
    return _STATUS_EXIT[status]


def _say(stream: TextIO, command: str, message: str) -> None:
    print(f"{PROG} {command}: {message}", file=stream)


# --------------------------------------------------------------------------------------------
# genkey
# --------------------------------------------------------------------------------------------


def _default_domain() -> str:
    """This host's domain (FQDN minus the first label), else ``localhost``.

    opendkim-genkey 2.11 always defaults to ``localhost``; its older shell version used the
    host's domain, which gives usable KeyTable lines on a mail host.
    """
    fqdn = socket.getfqdn().rstrip(".")
    _, dot, domain = fqdn.partition(".")
    return domain if dot and domain and domain != "localdomain" else "localhost"


def add_genkey_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``genkey`` subcommand (opendkim-genkey's options) to ``subparsers``."""
    parser = subparsers.add_parser(
        "genkey",
        add_help=False,
        help="generate a DKIM key pair and its DNS record (as opendkim-genkey)",
        description=(
            "Generate <selector>.private (PEM, mode 0600) and <selector>.txt (zone-file TXT "
            "record) and print the KeyTable and SigningTable lines that use them. "
            "Note: -h is --hash-algorithms here, as in opendkim-genkey; help is --help."
        ),
    )
    parser.add_argument("--help", action="help", help="show this help message and exit")
    parser.add_argument(
        "-a",
        "--append-domain",
        action="store_true",
        help="write the owner as sel._domainkey.DOMAIN. instead of relative to the zone",
    )
    parser.add_argument(
        "--algorithm",
        choices=[a.value for a in KeyAlgorithm],
        default=KeyAlgorithm.RSA.value,
        help="key type (default: rsa; ed25519 is RFC 8463)",
    )
    parser.add_argument(
        "-b", "--bits", type=int, default=2048, help="RSA key size in bits (default: 2048)"
    )
    parser.add_argument(
        "-D", "--directory", default=".", help="directory to write the files in (default: .)"
    )
    parser.add_argument(
        "-d",
        "--domain",
        default=None,
        help="signing domain (default: this host's domain, else localhost)",
    )
    parser.add_argument(
        "-h",
        "--hash-algorithms",
        default="sha256",
        metavar="LIST",
        help="colon-separated h= list (default: sha256, as Debian's opendkim-genkey; "
        "'' to omit h=)",
    )
    parser.add_argument("-n", "--note", default=None, help="note text for the n= tag")
    parser.add_argument(
        "-r", "--restrict", action="store_true", help="restrict the key to email (s=email)"
    )
    parser.add_argument(
        "-s", "--selector", default="default", help="selector name (default: default)"
    )
    parser.add_argument(
        "-S",
        "--nosubdomains",
        dest="no_subdomains",
        action="store_true",
        help="disallow signing of subdomains (t=s)",
    )
    parser.add_argument(
        "--subdomains",
        dest="no_subdomains",
        action="store_false",
        help="allow signing of subdomains (the default)",
    )
    parser.add_argument(
        "-t", "--testmode", action="store_true", help="mark the key as in test mode (t=y)"
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="report progress on stderr"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace existing <selector>.private/.txt files"
    )
    parser.set_defaults(func=run_genkey)


def _write_new_file(path: str, data: bytes, *, mode: int, force: bool) -> None:
    """Write ``data`` to ``path`` created with ``mode`` from the start.

    Without ``force`` the file is created with O_EXCL (an existing file, or a symlink planted
    at the name, makes it fail). With ``force`` a private temporary file in the same directory
    is renamed over ``path``, so the name never points at a partly written or wider-moded file.

    :raises FileExistsError: ``path`` exists and ``force`` is false.
    :raises OSError: the file cannot be created or written.
    """
    if force:
        directory = os.path.dirname(path) or "."
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
        try:
            os.fchmod(fd, mode)
            _write_all(fd, data)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, path)
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widens beyond ``mode``
        _write_all(fd, data)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


def run_genkey(ns: argparse.Namespace) -> int:
    """Handle ``genkey``: generate the key, write the two files, print the table lines."""
    err = sys.stderr
    algorithm = KeyAlgorithm(ns.algorithm)
    selector: str = ns.selector
    domain: str = (ns.domain or _default_domain()).rstrip(".")
    verbose: int = ns.verbose

    if not all(_SELECTOR.fullmatch(label) for label in selector.split(".")):
        _say(err, "genkey", f"invalid selector {selector!r}: use letters, digits, '-' and '_'")
        return EXIT_USAGE
    hashes = [h.strip() for h in ns.hash_algorithms.split(":")] if ns.hash_algorithms else []
    if any(not re.fullmatch(r"[A-Za-z0-9]+", h) for h in hashes):
        _say(err, "genkey", f"invalid --hash-algorithms {ns.hash_algorithms!r}")
        return EXIT_USAGE
    if algorithm is KeyAlgorithm.RSA:
        if ns.bits < MIN_RSA_BITS:
            _say(
                err,
                "genkey",
                f"refusing a {ns.bits}-bit RSA key: RFC 8301 §3.2 says verifiers MUST NOT "
                f"accept RSA keys under {MIN_RSA_BITS} bits",
            )
            return EXIT_USAGE
        if ns.bits < RECOMMENDED_RSA_BITS:
            _say(
                err,
                "genkey",
                f"warning: {ns.bits}-bit RSA key; RFC 8301 §3.2 recommends at least "
                f"{RECOMMENDED_RSA_BITS} bits",
            )

    directory = os.path.abspath(ns.directory)
    if not os.path.isdir(directory):
        _say(err, "genkey", f"{directory}: not a directory")
        return EXIT_CANTCREAT
    private_path = os.path.join(directory, f"{selector}.private")
    txt_path = os.path.join(directory, f"{selector}.txt")
    if not ns.force:
        for path in (private_path, txt_path):
            if os.path.lexists(path):
                _say(err, "genkey", f"{path} exists; use --force to replace it")
                return EXIT_CANTCREAT

    if verbose:
        _say(err, "genkey", f"generating {algorithm.value} private key")
    key = generate_private_key(algorithm, ns.bits)
    record = key_record_text(
        key,
        hash_algorithms=hashes or None,
        restrict_email=ns.restrict,
        no_subdomains=ns.no_subdomains,
        testmode=ns.testmode,
        note=ns.note,
    )
    zone_text = bind_txt(selector, domain, record, append_domain=ns.append_domain)
    try:
        _write_new_file(private_path, key.pem(), mode=0o600, force=ns.force)
    except FileExistsError:
        _say(err, "genkey", f"{private_path} exists; use --force to replace it")
        return EXIT_CANTCREAT
    except OSError as exc:
        _say(err, "genkey", f"{private_path}: cannot write: {exc.strerror}")
        return EXIT_CANTCREAT
    if verbose:
        _say(err, "genkey", f"private key written to {private_path}")
    try:
        _write_new_file(txt_path, zone_text.encode("utf-8"), mode=0o644, force=ns.force)
    except OSError as exc:
        reason = "exists" if isinstance(exc, FileExistsError) else f"cannot write: {exc.strerror}"
        _say(err, "genkey", f"{txt_path}: {reason}")
        if not ns.force:
            with contextlib.suppress(OSError):
                os.unlink(private_path)
        return EXIT_CANTCREAT
    if verbose:
        _say(err, "genkey", f"DNS TXT record written to {txt_path}")

    key_name = key_record_name(selector, domain)
    out = sys.stdout
    print(f"# KeyTable: publish {os.path.basename(txt_path)} in the {domain} zone first", file=out)
    print(f"{key_name} {domain}:{selector}:{private_path}", file=out)
    print("# SigningTable (refile: for the wildcard pattern)", file=out)
    print(f"*@{domain} {key_name}", file=out)
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# testkey
# --------------------------------------------------------------------------------------------


def add_testkey_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    default_config: str,
) -> None:
    """Add the ``testkey`` subcommand (opendkim-testkey's options) to ``subparsers``.

    ``default_config`` is the file read for resolver settings without ``-c`` (the CLI passes
    ``cli.DEFAULT_CONFIG``; a test can point it elsewhere).
    """
    parser = subparsers.add_parser(
        "testkey",
        help="check a published DKIM key record against a private key (as opendkim-testkey)",
        description=(
            "Look up <selector>._domainkey.<domain>, check the key record, and with -k check "
            "that it publishes the public half of the private key. Prints 'key OK' on "
            "success; otherwise one line naming the domain, selector and problem, and a "
            "non-zero exit status. The lookup asks for DNSSEC (the DO bit); when a record "
            "comes back, 'key secure' or 'key not secure' on stderr says whether the "
            "nameserver marked the answer validated (the AD flag, which only a validating "
            "resolver sets); not secure is a note, not an error (as with opendkim-testkey). "
            "Without -c or --nameservers the lookups use the "
            f"Nameservers and DNSTimeout of {default_config} if it exists (as "
            "opendkim-testkey reads /etc/opendkim.conf), else /etc/resolv.conf."
        ),
    )
    parser.add_argument("-d", "--domain", help="signing domain")
    parser.add_argument("-s", "--selector", help="selector")
    parser.add_argument("-k", "--keyfile", help="private key file to compare with the record")
    parser.add_argument(
        "-c",
        "-x",
        "--config",
        metavar="CONF",
        help="test every KeyTable entry of this configuration file (without -c, "
        f"-d/-s lookups use the Nameservers of {default_config} if it exists)",
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
        "--require-safe-keys",
        action="store_true",
        help="fail (instead of warning, as opendkim-testkey does) when a private key file "
        "is readable or replaceable by other users",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="report progress on stderr, including which configuration file is read",
    )
    parser.set_defaults(func=run_testkey, default_config=default_config)


def _make_resolver(spec: str | None, nameservers: Sequence[str], timeout: float) -> Resolver:
    """Build the resolver from --nameservers (wins), the config's list, or resolv.conf.

    :raises ValueError: a nameserver spec is malformed or the timeout is not positive.
    :raises ConfigError: no nameservers given and resolv.conf has none.
    """
    servers = [spec] if spec else list(nameservers)
    return Resolver(servers or None, timeout=timeout)


def _default_resolver(ns: argparse.Namespace) -> Resolver | int:
    """The resolver for ``-d``/``-s`` (no ``-c``): --nameservers, else the default configuration
    file's Nameservers and DNSTimeout when it exists, else resolv.conf. Returns it, or an exit
    code after printing the problem (a problem in the default file is named file:line).
    """
    from authmilter import cli

    err = sys.stderr
    path: str = getattr(ns, "default_config", None) or cli.DEFAULT_CONFIG
    config: Config | None = None
    if not ns.nameservers:
        try:
            config = cli.read_default_config(path, err, f"{PROG} testkey", verbose=ns.verbose > 0)
            if config is not None:
                from authmilter.keytable import config_key_owners

                ns.key_owners = config_key_owners(config)
        except ConfigError as exc:
            _say(err, "testkey", str(exc))
            return EXIT_CONFIG
    if config is None:
        try:
            return _make_resolver(ns.nameservers, (), ns.timeout or DEFAULT_TIMEOUT)
        except ValueError as exc:
            _say(err, "testkey", f"--nameservers/--timeout: {exc}")
            return EXIT_USAGE
        except ConfigError as exc:
            _say(err, "testkey", str(exc))
            return EXIT_CONFIG
    timeout = ns.timeout or float(config.dns_timeout or DEFAULT_TIMEOUT)
    try:
        return _make_resolver(None, config.nameservers, timeout)
    except ValueError as exc:
        if timeout > 0:
            attr, name = "nameservers", "Nameservers"
        elif ns.timeout:
            _say(err, "testkey", f"--timeout: {exc}")
            return EXIT_USAGE
        else:
            attr, name = "dns_timeout", "DNSTimeout"
        where = config.location(attr) or Location(path)
        _say(err, "testkey", str(ConfigError(f"{name}: {exc}", where)))
        return EXIT_CONFIG
    except ConfigError as exc:
        _say(err, "testkey", str(exc))
        return EXIT_CONFIG


def _load_key(
    source: str, ns: argparse.Namespace, label: str, *, table_value: bool = False
) -> PrivateKey | int:
    """Load a private key file, or, for a KeyTable value not naming a file, the inline key.

    A KeyTable value names a file when it starts with ``/``, ``./`` or ``../`` (OpenDKIM's
    rule); ``-k`` always names a file. Unsafe permissions are a warning, as with
    opendkim-testkey, unless --require-safe-keys. Returns the key, or an exit code after
    printing the problem.
    """
    err = sys.stderr
    if table_value and not source.startswith(("/", "./", "../")):
        try:
            return parse_private_key(source.encode("utf-8"), source="inline")
        except KeyMaterialError as exc:
            _say(err, "testkey", f"{label}: {exc}")
            return EXIT_NOINPUT
    try:
        reason = unsafe_key_file_reason(source, getattr(ns, "key_owners", None))
    except OSError:
        reason = None  # load_private_key reports why the file cannot be used
    if reason is not None:
        if ns.require_safe_keys:
            _say(err, "testkey", f"{label}: {source}: {reason}")
            return EXIT_NOPERM
        _say(err, "testkey", f"{source}: WARNING: unsafe permissions: {reason}")
    try:
        key = load_private_key(source, require_safe=False)
    except KeyMaterialError as exc:
        _say(err, "testkey", f"{label}: {exc}")
        return EXIT_NOINPUT
    if ns.verbose:
        _say(err, "testkey", f"key loaded from {source} ({key.algorithm.value}, {key.bits} bits)")
    return key


def _report_dnssec(result: KeyTestResult, *, verbose: int, key: str) -> None:
    """Say on stderr whether the key record's answer was DNSSEC-validated, as opendkim-testkey
    does ("key not secure", "key secure"; ``key`` names the key), and with -v why. Nothing
    when no record came back. Either way it is a note, not a failure."""
    if result.dnssec is None:
        return
    server = result.nameserver or "asked"
    if result.dnssec:
        _say(sys.stderr, "testkey", f"{key} secure")
        why = (f"the answer was DNSSEC-validated: the nameserver {server} set the AD flag "
               "(trust it as far as the path to that resolver: on this host or a trusted "
               "network)")  # fmt: skip
    else:
        _say(sys.stderr, "testkey", f"{key} not secure")
        why = (f"the answer was not DNSSEC-validated: the nameserver {server} did not set the "
               "AD flag (the zone is unsigned, or that nameserver does not validate: list a "
               "validating resolver in Nameservers or --nameservers)")  # fmt: skip
    if verbose:
        _say(sys.stderr, "testkey", why)


def _report(result: KeyTestResult, *, verbose: int, ok_line: str, key: str = "key",
            note_after: bool = False) -> int:  # fmt: skip
    """Print a test result: ``ok_line`` on stdout on success, one line on stderr otherwise;
    and the DNSSEC note on stderr (see :func:`_report_dnssec`), before the result or with
    ``note_after`` after it (opendkim-testkey's order for a single key and for KeyTable
    entries)."""
    where = f"domain {result.domain}, selector {result.selector}"
    if verbose and result.record is not None:
        shown = "; ".join(f"{k}={v}" for k, v in result.record.tags)
        _say(sys.stderr, "testkey", f"record retrieved for {result.name}: {shown}")
    if not note_after:
        _report_dnssec(result, verbose=verbose, key=key)
    for warning in result.warnings:
        _say(sys.stderr, "testkey", f"{where}: warning: {warning}")
    if result.ok:
        print(ok_line, file=sys.stdout)
    else:
        _say(sys.stderr, "testkey", f"{where}: {result.status.value}: {result.message}")
    if note_after:
        _report_dnssec(result, verbose=verbose, key=key)
    return exit_code_for(result.status)


def run_testkey(ns: argparse.Namespace) -> int:
    """Handle ``testkey``: test one selector (-d/-s[/-k]) or every KeyTable entry (-c)."""
    if ns.config:
        return _run_testkey_config(ns)
    if not ns.domain or not ns.selector:
        _say(sys.stderr, "testkey", "give -d DOMAIN and -s SELECTOR (or -c CONF)")
        return EXIT_USAGE
    resolver = _default_resolver(ns)
    if isinstance(resolver, int):
        return resolver
    label = f"domain {ns.domain}, selector {ns.selector}"
    private: PrivateKey | None = None
    if ns.keyfile:
        loaded = _load_key(ns.keyfile, ns, label)
        if isinstance(loaded, int):
            return loaded
        private = loaded
    if ns.verbose:
        _say(sys.stderr, "testkey", f"checking key '{key_record_name(ns.selector, ns.domain)}'")
    result = test_key(resolver, ns.domain, ns.selector, private)
    return _report(result, verbose=ns.verbose, ok_line="key OK")


def _run_testkey_config(ns: argparse.Namespace) -> int:
    """Test every KeyTable entry of ``ns.config``; exit with the first failure's code."""
    from authmilter.config import load_config
    from authmilter.keytable import config_key_owners, load_key_entries

    err = sys.stderr
    try:
        config = load_config(ns.config).config
        entries = load_key_entries(ns.config)
        ns.key_owners = config_key_owners(config)
    except ConfigError as exc:
        _say(err, "testkey", str(exc))
        return EXIT_CONFIG
    timeout = ns.timeout or float(config.dns_timeout or DEFAULT_TIMEOUT)
    try:
        resolver = _make_resolver(ns.nameservers, config.nameservers, timeout)
    except (ValueError, ConfigError) as exc:
        _say(err, "testkey", f"{ns.config}: resolver settings: {exc}")
        return EXIT_CONFIG
    if not entries:
        _say(err, "testkey", f"{ns.config}: no KeyTable entries to test")
        return EXIT_CONFIG
    passed = failed = skipped = 0
    first_failure = EXIT_OK
    for entry in entries:
        label = f"key {entry.name} (domain {entry.domain}, selector {entry.selector})"
        if "%" in entry.domain or "%" in entry.key_source:
            # The domain comes from each message's From: nothing to look up here.
            _say(err, "testkey", f"{label}: skipped: '%' is only known per message")
            skipped += 1
            continue
        if ns.verbose:
            _say(err, "testkey", f"checking key '{entry.name}'")
        key = _load_key(entry.key_source, ns, label, table_value=True)
        if isinstance(key, int):
            code = key
        else:
            result = test_key(resolver, entry.domain, entry.selector, key)
            code = _report(result, verbose=ns.verbose, ok_line=f"key {entry.name} OK",
                           key=f"key {entry.name}", note_after=True)  # fmt: skip
        if code == EXIT_OK:
            passed += 1
            continue
        failed += 1
        if first_failure == EXIT_OK:
            first_failure = code
    total = passed + failed
    summary = f"{total} key{'' if total == 1 else 's'} checked; {passed} pass, {failed} fail"
    _say(err, "testkey", summary + (f", {skipped} skipped" if skipped else ""))
    return first_failure
