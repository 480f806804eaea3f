"""The ``rotate`` subcommand: DKIM key rotation in four steps, each refusing the unsafe order.

Rotation breaks mail in two ways: the new selector signs before its DNS record is visible
everywhere (verifiers fail the signature), or the old record is removed while mail signed with
it is still queued (same failure, days later). ``authmilter rotate`` makes each step check the
one before:

``new -c CONF -d DOMAIN -s SELECTOR [--algorithm rsa|ed25519] [-b BITS] [-D DIR]``
    Generate the key with genkey's rules and write ``DIR/SELECTOR.private`` atomically (a
    temporary file in DIR, fsync, then a link to the name, which never replaces a file), mode
    0600, owned by the ``UserID`` user when the configuration sets one. DIR defaults to the
    folder of the key the KeyTable uses for DOMAIN now. Prints the record to publish (a BIND
    TXT line) and the next command. Nothing that signs is touched.

``check -c CONF -d DOMAIN -s SELECTOR [-k KEYFILE]``
    Find every authoritative nameserver of DOMAIN's zone (NS of DOMAIN, else of the domains
    above it up to the zone cut; then the A/AAAA of each NS name), ask each one directly with
    recursion off for ``SELECTOR._domainkey.DOMAIN`` TXT, and ask the configured resolver (the
    configuration's ``Nameservers``, else /etc/resolv.conf) too. Each answer must hold exactly
    one record that matches the private key (a revoked record, empty ``p=``, fails). Exit 0
    only when every server passes. Servers are asked on port 53, unless ``Nameservers`` lists
    the same address with a port.

``activate -c CONF -d DOMAIN -s SELECTOR``
    Run ``check`` and refuse unless it passes on every server. Then point DOMAIN's KeyTable
    entry (and the SigningTable lines naming it, when the entry's name carries the selector)
    at the new selector and key: each table is written beside itself, fsynced and renamed over
    the old one, keeping its mode and owner. The configuration is built with the new tables
    exactly as the milter builds it before anything is renamed (and again after), then the
    running milter is reloaded with SIGHUP to the pid in ``PidFile``. The activation (time,
    old selector, old record's TTL) is recorded in ``STATE_DIR/rotate/DOMAIN.json``.

``retire -c CONF -d DOMAIN``
    Say when the old record may go: the activation time plus the longest queue lifetime
    (Postfix ``maximal_queue_lifetime``, 5 days by default, or ``--queue-lifetime``) plus the
    old record's TTL. Before then it refuses and prints the date; after, it prints the DNS
    change to make (remove the record, or publish it revoked with an empty ``p=``). It deletes
    nothing, except the old ``.private`` file with ``--delete-key``.

Exit codes are the ``sysexits.h`` ones of :mod:`authmilter.keytools`: 64 usage, 65 the record
does not match the key, 66 no usable key file or no recorded activation, 69 no record or a
revoked one, 73 a file cannot be written or already exists, 75 a DNS failure or "not yet"
(retire before its date), 77 permission, 78 configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import io
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.NS
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rdtypes.txtbase

from authmilter import cli
from authmilter.config import Config, load_config, user_id_account
from authmilter.datasets import open_dataset, parse_spec
from authmilter.errors import ConfigError, DNSError, DNSNameNotFound, DNSTempError, KeyMaterialError
from authmilter.keys import (
    MIN_RSA_BITS,
    RECOMMENDED_RSA_BITS,
    KeyAlgorithm,
    PrivateKey,
    bind_txt,
    generate_private_key,
    key_record_name,
    key_record_text,
    load_private_key,
    test_key,
    unsafe_key_file_reason,
)
from authmilter.keytable import KeyEntry, config_key_owners, load_key_entries, parse_key_entry
from authmilter.keytools import (
    _SELECTOR,
    EXIT_CANTCREAT,
    EXIT_CONFIG,
    EXIT_NOINPUT,
    EXIT_NOPERM,
    EXIT_OK,
    EXIT_TEMPFAIL,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    _write_all,
    exit_code_for,
)
from authmilter.resolver import DEFAULT_PORT, DnssecTxt, Resolver, parse_nameservers

__all__ = [
    "DEFAULT_QUEUE_LIFETIME",
    "DEFAULT_STATE_DIR",
    "Outcome",
    "add_rotate_parser",
    "parse_postfix_time",
    "run_activate",
    "run_check",
    "run_new",
    "run_retire",
]

PROG = "authmilter rotate"
#: Where ``activate`` records what ``retire`` needs (``rotate/DOMAIN.json`` below it).
DEFAULT_STATE_DIR = "/var/lib/authmilter"
#: Postfix's default ``maximal_queue_lifetime`` (5 days), in seconds.
DEFAULT_QUEUE_LIFETIME = 5 * 86_400
DEFAULT_TIMEOUT = 5.0
STATE_VERSION = 1

_POSTFIX_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_WS = "[ \t\v\f\r]"
# A data line of a table: the key, blanks, the value, then blanks and a comment.
_TABLE_LINE = re.compile(rf"(?P<pre>\ufeff?{_WS}*)(?P<name>[^ \t\v\f\r#]+)(?P<gap>{_WS}+)"
                         rf"(?P<value>[^#]*?)(?P<post>{_WS}*(?:#.*)?)", re.DOTALL)  # fmt: skip
# A SigningTable line up to the key name, the key name, and the rest (signer, comment).
_SIGNING_LINE = re.compile(rf"(?P<pre>\ufeff?{_WS}*[^ \t\v\f\r#]+{_WS}+)(?P<name>[^: \t\v\f\r#]+)"
                           r"(?P<post>.*)", re.DOTALL)  # fmt: skip


class Refusal(Exception):
    """A step refused: ``message`` is the one line to print, ``code`` the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _say(stream: TextIO, command: str, message: str) -> None:
    print(f"{PROG} {command}: {message}", file=stream)


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------


def add_rotate_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    default_config: str,
) -> None:
    """Add ``rotate`` and its steps ``new``, ``check``, ``activate``, ``retire``.

    ``default_config`` is the configuration file read without ``-c`` (the CLI passes
    ``cli.DEFAULT_CONFIG``).
    """
    parser = subparsers.add_parser(
        "rotate",
        help="rotate a DKIM key in the safe order: new, check, activate, retire",
        description=(
            "Rotate a DKIM key without breaking mail: 'new' makes the key and prints its "
            "record; 'check' asks every authoritative nameserver and the resolver for it; "
            "'activate' refuses until check passes, then switches the KeyTable and reloads; "
            "'retire' says when the old record can go and refuses before."
        ),
    )
    steps = parser.add_subparsers(dest="step", metavar="STEP")
    steps.required = True

    new = steps.add_parser(
        "new",
        help="make the new key and print the DNS record to publish (signs nothing yet)",
        description=(
            "Generate DIR/SELECTOR.private (mode 0600, owned by the UserID user when the "
            "configuration sets one; an existing file is never replaced) and print the BIND "
            "TXT record to publish and the next command. The tables are not touched."
        ),
    )
    _common(new, default_config)
    new.add_argument("--algorithm", choices=[a.value for a in KeyAlgorithm],
                     default=KeyAlgorithm.RSA.value, help="key type (default: rsa)")  # fmt: skip
    new.add_argument("-b", "--bits", type=int, default=2048,
                     help="RSA key size in bits (default: 2048)")  # fmt: skip
    new.add_argument("-D", "--directory", metavar="DIR",
                     help="folder for SELECTOR.private (default: the folder of the key the "
                     "KeyTable uses for DOMAIN now)")  # fmt: skip
    new.set_defaults(func=run_new)

    check = steps.add_parser(
        "check",
        help="check the new record on every authoritative nameserver and the resolver",
        description=(
            "Ask every authoritative nameserver of DOMAIN's zone directly (recursion off) and "
            "the configured resolver for SELECTOR._domainkey.DOMAIN, and compare the record "
            "with the private key. Exit 0 only when every server publishes the right key."
        ),
    )
    _common(check, default_config)
    _key_and_timeout(check)
    check.set_defaults(func=run_check)

    activate = steps.add_parser(
        "activate",
        help="switch the KeyTable to the new selector once check passes, and reload",
        description=(
            "Refuse unless check passes on every server; then switch DOMAIN's KeyTable entry "
            "(and the SigningTable lines naming it) to SELECTOR atomically, build the new "
            "configuration as the milter does, reload the milter (SIGHUP to PidFile's pid) and "
            "record the activation for retire."
        ),
    )
    _common(activate, default_config)
    _key_and_timeout(activate)
    activate.add_argument("--replace", metavar="OLDSELECTOR",
                          help="the selector to replace, when the KeyTable has several for "
                          "DOMAIN")  # fmt: skip
    _state(activate)
    activate.set_defaults(func=run_activate)

    retire = steps.add_parser(
        "retire",
        help="say when the old key's record can be removed; refuse before",
        description=(
            "After the longest queue lifetime (Postfix maximal_queue_lifetime, default 5d) "
            "plus the old record's TTL have passed since activate, print the DNS change that "
            "retires the old key; before, refuse and print the date."
        ),
    )
    _common(retire, default_config, selector=False)
    retire.add_argument("--queue-lifetime", metavar="TIME",
                        help="the longest time mail stays queued, in Postfix's syntax (5d, "
                        "120h; a bare number is days) (default: postconf -h "
                        "maximal_queue_lifetime, else 5d)")  # fmt: skip
    retire.add_argument("--delete-key", action="store_true",
                        help="also delete the old key's .private file (only when it is due)")
    _state(retire)
    retire.set_defaults(func=run_retire)


def _common(p: argparse.ArgumentParser, default_config: str, *, selector: bool = True) -> None:
    p.add_argument("-c", "--config", metavar="CONF", default=default_config,
                   help=f"the milter's configuration file (default: {default_config})")
    p.add_argument("-d", "--domain", required=True, help="signing domain")
    if selector:
        p.add_argument("-s", "--selector", required=True, help="the new selector")


def _key_and_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("-k", "--keyfile", help="the new private key (default: the KeyTable's file "
                   "for SELECTOR, else SELECTOR.private beside DOMAIN's key)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=None,
                   help="DNS deadline per query in seconds (default: the configuration's "
                   f"DNSTimeout, else {DEFAULT_TIMEOUT:g})")  # fmt: skip


def _state(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                   help=f"state folder; the record is DIR/rotate/DOMAIN.json (default: "
                   f"{DEFAULT_STATE_DIR})")  # fmt: skip
    # The clock, for tests and dry reasoning: ISO 8601 (UTC when no zone) or @EPOCH.
    p.add_argument("--now", help=argparse.SUPPRESS)


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _domain(text: str) -> str:
    domain = text.strip().rstrip(".").lower()
    try:
        dns.name.from_text(domain)
    except dns.exception.DNSException as exc:
        raise Refusal(f"invalid domain {text!r}: {exc}", EXIT_USAGE) from None
    if not domain or "%" in domain:
        raise Refusal(f"invalid domain {text!r}", EXIT_USAGE)
    return domain


def _selector(text: str) -> str:
    if not all(_SELECTOR.fullmatch(label) for label in text.split(".")):
        raise Refusal(f"invalid selector {text!r}: use letters, digits, '-' and '_'", EXIT_USAGE)
    return text


def _config(path: str) -> Config:
    """The configuration as the milter reads it (AuthservID resolved)."""
    try:
        return cli.resolve_authserv_id(load_config(path).config)
    except ConfigError as exc:
        raise Refusal(str(exc), EXIT_CONFIG) from None


def _domain_keys(conf: str, domain: str) -> list[KeyEntry]:
    """The keys the configuration signs DOMAIN with now (KeyTable entries, or KeyFile)."""
    try:
        entries = load_key_entries(conf)
    except ConfigError as exc:
        raise Refusal(str(exc), EXIT_CONFIG) from None
    return [e for e in entries if e.domain.lower() == domain]


def _file_keys(entries: Sequence[KeyEntry]) -> list[KeyEntry]:
    return [e for e in entries if e.is_path and "%" not in e.key_source]


def _key_path(conf: str, domain: str, selector: str, keyfile: str | None) -> str:
    """The new key's file: -k, else the KeyTable's file for SELECTOR, else SELECTOR.private in
    the folder of DOMAIN's key now."""
    if keyfile:
        return os.path.abspath(keyfile)
    entries = _file_keys(_domain_keys(conf, domain))
    for entry in entries:
        if entry.selector == selector:
            return entry.key_source
    folders = sorted({os.path.dirname(os.path.abspath(e.key_source)) for e in entries})
    if len(folders) != 1:
        why = "no key file for it" if not folders else f"its keys are in {len(folders)} folders"
        raise Refusal(f"cannot tell where the key of selector {selector} is ({conf} has {why} "
                      f"for {domain}): give -k KEYFILE", EXIT_USAGE)  # fmt: skip
    return os.path.join(folders[0], f"{selector}.private")


def _load_key(path: str, cfg: Config, err: TextIO, command: str) -> PrivateKey:
    """Load the new private key; unsafe permissions are a warning here (activate's build of
    the configuration applies RequireSafeKeys as the milter does)."""
    try:
        owners = config_key_owners(cfg)
    except ConfigError as exc:
        raise Refusal(str(exc), EXIT_CONFIG) from None
    try:
        reason = unsafe_key_file_reason(path, owners)
    except OSError:
        reason = None  # load_private_key says why the file cannot be used
    if reason is not None:
        _say(err, command, f"{path}: warning: unsafe permissions: {reason}")
    try:
        return load_private_key(path, require_safe=False)
    except KeyMaterialError as exc:
        raise Refusal(f"{exc} (the new key of this rotation)", EXIT_NOINPUT) from None


def _timeout(ns: argparse.Namespace, cfg: Config) -> float:
    timeout = float(ns.timeout or cfg.dns_timeout or DEFAULT_TIMEOUT)
    if timeout <= 0:
        raise Refusal(f"--timeout must be positive, not {ns.timeout}", EXIT_USAGE)
    return timeout


def _now(text: str | None) -> float:
    """The clock: ``--now`` (ISO 8601, UTC without a zone, or ``@EPOCH``), else the time."""
    if not text:
        return time.time()
    try:
        if text.startswith("@"):
            return float(text[1:])
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise Refusal(f"--now {text!r}: not ISO 8601 or @EPOCH", EXIT_USAGE) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(seconds: float) -> str:
    """``5d``, ``2h30m``, ``300s``: a duration as Postfix writes one."""
    seconds = int(seconds)
    if seconds == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# Files: written beside the target, fsynced, then renamed (or linked: never replacing)
# --------------------------------------------------------------------------------------------


def _write_temp(path: str, data: bytes, *, mode: int, owner: tuple[int, int] | None) -> str:
    """Write ``data`` to a new temporary file beside ``path`` with ``mode`` and ``owner``
    from the start; return its name.

    :raises OSError: it cannot be created, owned or written.
    """
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)  # fmt: skip
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        _write_all(fd, data)  # fsyncs
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def _sync_folder(path: str) -> None:
    """fsync the folder holding ``path``, so the rename itself survives a crash."""
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename is done all the same
    finally:
        os.close(fd)


def _install(tmp: str, path: str, *, replace: bool) -> None:
    """Move a finished temporary file to ``path``: rename (replacing), or link (never
    replacing an existing file: FileExistsError) and drop the temporary name."""
    if replace:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)
        finally:
            os.unlink(tmp)
    _sync_folder(path)


def _write_like(path: str, data: bytes, st: os.stat_result) -> None:
    """Replace ``path`` by ``data`` atomically, keeping the mode and owner ``st`` had."""
    tmp = _write_temp(path, data, mode=st.st_mode & 0o7777, owner=(st.st_uid, st.st_gid))
    _install(tmp, path, replace=True)


# --------------------------------------------------------------------------------------------
# DNS: the zone's nameservers, asked directly
# --------------------------------------------------------------------------------------------


class _Authoritative(Resolver):
    """One authoritative server, asked directly with recursion off (RD clear).

    :meth:`txt_dnssec` is what :func:`authmilter.keys.test_key` calls, so a key is judged on
    each server by the same rules as ``testkey``'s. An answer without the AA flag (the server
    does not serve the zone: a lame delegation) is a failure.
    """

    def __init__(self, address: str, port: int, timeout: float) -> None:
        host = f"[{address}]" if ":" in address else address
        super().__init__([f"{host}:{port}"], timeout=timeout, cache_size=0)
        self.address = address
        self.port = port
        self.server = f"{host}:{port}"
        #: Set when the server could not even be reached (no route, e.g. no IPv6 here).
        self.unreachable = False

    def txt_dnssec(self, name: str) -> DnssecTxt:
        records, _ttl, authenticated = self.ask_txt(name)
        return DnssecTxt(records=records, authenticated=authenticated, nameserver=self.server)

    def ask_txt(self, name: str) -> tuple[tuple[bytes, ...], int | None, bool]:
        """The TXT records at ``name`` on this server, their TTL and the AD flag.

        :raises DNSNameNotFound: NXDOMAIN.
        :raises DNSTempError: no answer, an error rcode, a non-authoritative answer, or an
            alias to a name the server does not answer for.
        """
        what = f"{name} TXT on {self.server}"
        qname = dns.name.from_text(name)
        query = dns.message.make_query(qname, dns.rdatatype.TXT, want_dnssec=True)
        query.flags &= ~dns.flags.RD
        try:
            response, _tcp = dns.query.udp_with_fallback(query, self.address, timeout=self.timeout,
                                                         port=self.port)  # fmt: skip
        except dns.exception.Timeout:
            raise DNSTempError(f"{what}: no answer within {self.timeout:g}s") from None
        except OSError as exc:
            if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL,
                             errno.EAFNOSUPPORT):  # fmt: skip
                self.unreachable = True
            raise DNSTempError(f"{what}: {exc.strerror or exc}") from None
        except dns.exception.DNSException as exc:
            raise DNSTempError(f"{what}: malformed answer: {exc}") from None
        rcode = response.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            raise DNSNameNotFound(f"{what}: no such domain (NXDOMAIN)")
        if rcode != dns.rcode.NOERROR:
            raise DNSTempError(f"{what}: the server answered {dns.rcode.to_text(rcode)}")
        if not response.flags & dns.flags.AA:
            raise DNSTempError(f"{what}: the answer is not authoritative (the server does not "
                               "serve the zone: a lame delegation)")  # fmt: skip
        target = qname
        for _ in range(16):
            txt = alias = None
            for rrset in response.answer:
                if rrset.name == target and rrset.rdtype == dns.rdatatype.TXT:
                    txt = rrset
                elif rrset.name == target and rrset.rdtype == dns.rdatatype.CNAME:
                    alias = next((r.target for r in rrset
                                  if isinstance(r, dns.rdtypes.ANY.CNAME.CNAME)), None)  # fmt: skip
            if txt is not None:
                records = tuple(b"".join(r.strings) for r in txt
                                if isinstance(r, dns.rdtypes.txtbase.TXTBase))  # fmt: skip
                return records, txt.ttl, bool(response.flags & dns.flags.AD)
            if alias is None:
                break
            target = alias
        if target != qname:
            raise DNSTempError(f"{what}: an alias (CNAME) of {target}, which this server does "
                               "not answer for; check that name with testkey")  # fmt: skip
        return (), None, bool(response.flags & dns.flags.AD)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one server said about the new selector's record."""

    #: ``ns1.example.com 192.0.2.1:53``, or ``resolver 127.0.0.1:53``.
    where: str
    ok: bool
    message: str
    #: The exit code this outcome calls for (0 when ok).
    code: int
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Zone:
    name: str
    servers: tuple[_Authoritative | str, ...]  # a str is an NS name without an address
    labels: tuple[str, ...]  # the NS name of each server


def _resolver(cfg: Config, timeout: float) -> Resolver:
    try:
        return Resolver(list(cfg.nameservers) or None, timeout=timeout)
    except ValueError as exc:
        raise Refusal(str(ConfigError(f"Nameservers: {exc}", cfg.location("nameservers"))),
                      EXIT_CONFIG) from None  # fmt: skip
    except ConfigError as exc:
        raise Refusal(str(exc), EXIT_CONFIG) from None


def _ports(cfg: Config) -> dict[str, int]:
    """The ports ``Nameservers`` gives addresses; an authoritative server is asked there."""
    ports: dict[str, int] = {}
    for spec in cfg.nameservers:
        try:
            for address, port in parse_nameservers(spec):
                ports.setdefault(address, port)
        except ValueError:
            continue
    return ports


def _zone(resolver: Resolver, domain: str, ports: Mapping[str, int], timeout: float) -> _Zone:
    """The authoritative servers of the zone holding ``domain``: the NS of the domain or of the
    first domain above it that has some (the zone cut), and the addresses of each NS name."""
    name = domain
    targets: list[str] = []
    while True:
        try:
            records = resolver.query(name, "NS")
        except DNSNameNotFound:
            records = []
        except DNSError as exc:
            raise Refusal(f"cannot find the nameservers of {domain}: {exc}",
                          EXIT_TEMPFAIL) from None  # fmt: skip
        targets = sorted({r.target.to_text().rstrip(".").lower() for r in records
                          if isinstance(r, dns.rdtypes.ANY.NS.NS)})  # fmt: skip
        if targets:
            break
        _, dot, parent = name.partition(".")
        if not dot or not parent:
            raise Refusal(f"no NS records for {domain} or any domain above it: cannot find "
                          "its zone's nameservers", EXIT_UNAVAILABLE)  # fmt: skip
        name = parent
    servers: list[_Authoritative | str] = []
    labels: list[str] = []
    for target in targets:
        addresses: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                found = resolver.query(target, rdtype)
            except DNSError:
                continue
            for r in found:
                if isinstance(r, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA):
                    addresses.append(str(r.address))
        if not addresses:
            servers.append(target)
            labels.append(target)
        for address in addresses:
            servers.append(_Authoritative(address, ports.get(address, DEFAULT_PORT), timeout))
            labels.append(target)
    return _Zone(name, tuple(servers), tuple(labels))


def check_servers(cfg: Config, domain: str, selector: str, key: PrivateKey,
                  timeout: float) -> tuple[_Zone, list[Outcome]]:  # fmt: skip
    """Ask every authoritative server of ``domain``'s zone, and the configured resolver, for
    ``selector``'s record and judge it against ``key`` (as ``testkey`` does).

    :raises Refusal: the resolver settings are unusable or the zone's servers cannot be found.
    """
    resolver = _resolver(cfg, timeout)
    zone = _zone(resolver, domain, _ports(cfg), timeout)
    outcomes: list[Outcome] = []
    answered_v4: set[str] = set()
    pending_v6: list[tuple[int, str]] = []
    for server, label in zip(zone.servers, zone.labels, strict=True):
        if isinstance(server, str):
            outcomes.append(Outcome(f"{label} (no address)", False,
                                    f"the nameserver name {label} has no A or AAAA record, so "
                                    "it cannot be asked", EXIT_UNAVAILABLE))  # fmt: skip
            continue
        where = f"{label} {server.server}"
        result = test_key(server, domain, selector, key)
        if server.unreachable and ":" in server.address:
            pending_v6.append((len(outcomes), label))
        elif ":" not in server.address and result.ok:
            answered_v4.add(label)
        outcomes.append(Outcome(where, result.ok, result.message, exit_code_for(result.status),
                                result.warnings))  # fmt: skip
    # No IPv6 route from here: the same server, asked over IPv4, is enough.
    for index, label in pending_v6:
        if label in answered_v4:
            o = outcomes[index]
            outcomes[index] = Outcome(o.where, True, f"skipped: no route to it from this host; "
                                      f"{label} answered over IPv4", EXIT_OK)  # fmt: skip
    result = test_key(resolver, domain, selector, key)
    served = result.nameserver or ",".join(f"{a}:{p}" for a, p in resolver.nameservers)
    outcomes.append(Outcome(f"resolver {served}", result.ok, result.message,
                            exit_code_for(result.status), result.warnings))  # fmt: skip
    return zone, outcomes


def _print_outcomes(outcomes: Sequence[Outcome], out: TextIO, err: TextIO, command: str,
                    refusal: str) -> int:  # fmt: skip
    """One line per server on ``out``; each failure once more on ``err``, as one line naming
    the server, prefixed by ``refusal``. Returns the first failure's code, else 0."""
    code = EXIT_OK
    for o in outcomes:
        print(f"{'ok  ' if o.ok else 'FAIL'} {o.where}: {o.message}", file=out)
        for warning in o.warnings:
            _say(err, command, f"{o.where}: warning: {warning}")
    for o in outcomes:
        if not o.ok:
            _say(err, command, f"{refusal}{o.where}: {o.message}")
            if code == EXIT_OK:
                code = o.code
    return code


# --------------------------------------------------------------------------------------------
# new
# --------------------------------------------------------------------------------------------


def _new(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    domain, selector = _domain(ns.domain), _selector(ns.selector)
    algorithm = KeyAlgorithm(ns.algorithm)
    if algorithm is KeyAlgorithm.RSA:
        if ns.bits < MIN_RSA_BITS:
            raise Refusal(f"refusing a {ns.bits}-bit RSA key: RFC 8301 §3.2 says verifiers MUST "
                          f"NOT accept RSA keys under {MIN_RSA_BITS} bits", EXIT_USAGE)  # fmt: skip
        if ns.bits < RECOMMENDED_RSA_BITS:
            _say(err, "new", f"warning: {ns.bits}-bit RSA key; RFC 8301 §3.2 recommends at "
                 f"least {RECOMMENDED_RSA_BITS} bits")  # fmt: skip
    cfg = _config(ns.config)
    try:
        account = user_id_account(cfg)
    except ConfigError as exc:
        raise Refusal(str(exc), EXIT_CONFIG) from None
    current = _domain_keys(ns.config, domain)
    for entry in current:
        if entry.selector == selector:
            where = f" ({entry.where})" if entry.where else ""
            raise Refusal(f"selector {selector} already signs for {domain}{where}: a rotation "
                          "needs a new selector", EXIT_USAGE)  # fmt: skip
    if ns.directory:
        directory = os.path.abspath(ns.directory)
    else:
        folders = sorted({os.path.dirname(os.path.abspath(e.key_source))
                          for e in _file_keys(current)})  # fmt: skip
        if len(folders) != 1:
            why = (f"the keys for {domain} are in {len(folders)} folders" if folders
                   else f"{ns.config} names no key file for {domain}")  # fmt: skip
            raise Refusal(f"where should {selector}.private go? {why}: give -D DIR", EXIT_USAGE)
        directory = folders[0]
    if not os.path.isdir(directory):
        raise Refusal(f"{directory}: not a directory", EXIT_CANTCREAT)
    path = os.path.join(directory, f"{selector}.private")
    if os.path.lexists(path):
        raise Refusal(f"{path} exists; refusing to replace a key (pick another selector, or "
                      "remove that file if it is not in use)", EXIT_CANTCREAT)  # fmt: skip

    key = generate_private_key(algorithm, ns.bits)
    record = key_record_text(key, hash_algorithms=["sha256"])
    owner = (account.uid, account.gid) if account else None
    try:
        tmp = _write_temp(path, key.pem(), mode=0o600, owner=owner)
        _install(tmp, path, replace=False)
    except FileExistsError:
        raise Refusal(f"{path} exists; refusing to replace a key", EXIT_CANTCREAT) from None
    except PermissionError as exc:
        raise Refusal(f"{path}: cannot write: {exc.strerror}", EXIT_NOPERM) from None
    except OSError as exc:
        raise Refusal(f"{path}: cannot write: {exc.strerror or exc}", EXIT_CANTCREAT) from None

    who = account.name if account else _user(os.geteuid())
    bits = f", {key.bits} bits" if algorithm is KeyAlgorithm.RSA else ""
    keyfile = f" -k {path}" if ns.directory else ""
    print(f"; wrote {path} ({algorithm.value}{bits}, mode 0600, owner {who})", file=out)
    print(f"; publish this record in the {domain} zone, on every nameserver:", file=out)
    print(bind_txt(selector, domain, record, append_domain=True), end="", file=out)
    print(f"; nothing signs with it yet. Once published, run:\n;   authmilter rotate check -c "
          f"{ns.config} -d {domain} -s {selector}{keyfile}", file=out)  # fmt: skip
    return EXIT_OK


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------


def _check(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    domain, selector = _domain(ns.domain), _selector(ns.selector)
    cfg = _config(ns.config)
    path = _key_path(ns.config, domain, selector, ns.keyfile)
    key = _load_key(path, cfg, err, "check")
    zone, outcomes = check_servers(cfg, domain, selector, key, _timeout(ns, cfg))
    name = key_record_name(selector, domain)
    print(f"{name} TXT against {path}, zone {zone.name}:", file=out)
    code = _print_outcomes(outcomes, out, err, "check", "")
    failed = sum(not o.ok for o in outcomes)
    if code != EXIT_OK:
        _say(err, "check", f"{name}: {failed} of {len(outcomes)} servers fail; do not activate "
             "yet")  # fmt: skip
        return code
    keyfile = f" -k {path}" if ns.keyfile else ""
    print(f"{name} is published on all {len(outcomes)} servers and matches the key; next:\n"
          f"  authmilter rotate activate -c {ns.config} -d {domain} -s {selector}{keyfile}",
          file=out)  # fmt: skip
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# activate
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Edit:
    """A table file and its text before and after the switch."""

    path: str
    kind: str  # file or refile
    before: str
    after: str
    st: os.stat_result


def _table_file(spec_text: str, what: str, conf: str) -> tuple[str, str]:
    kind, rest = parse_spec(spec_text)
    if kind == "csl":
        raise Refusal(f"the {what} is written in {conf} itself (csl:); activate edits a {what} "
                      "file: switch it there by hand", EXIT_CONFIG)  # fmt: skip
    return kind, os.path.realpath(rest)


def _read_table(path: str) -> tuple[str, os.stat_result]:
    try:
        with open(path, "rb") as handle:
            st = os.fstat(handle.fileno())
            return handle.read().decode("utf-8", errors="surrogateescape"), st
    except OSError as exc:
        raise Refusal(f"{path}: cannot read: {exc.strerror}", EXIT_CONFIG) from None


def _switch_tables(cfg: Config, conf: str, old: KeyEntry, entries: Sequence[KeyEntry],
                   selector: str, key_path: str) -> tuple[list[_Edit], str, str]:  # fmt: skip
    """The edited KeyTable (and SigningTable) texts; also the old and new key names."""
    assert cfg.key_table is not None and old.where is not None and old.where.line is not None
    kind, path = _table_file(cfg.key_table.spec, "KeyTable", conf)
    text, st = _read_table(path)
    lines = text.split("\n")
    index = old.where.line - 1
    m = _TABLE_LINE.fullmatch(lines[index]) if 0 <= index < len(lines) else None
    try:
        seen = parse_key_entry(m["name"], m["value"], None) if m is not None else None
    except ConfigError:
        seen = None
    if m is None or seen is None or (seen.name, seen.domain, seen.selector, seen.key_source) != (
        old.name, old.domain, old.selector, old.key_source
    ):
        raise Refusal(f"{old.where}: the line changed since it was read; run activate again",
                      EXIT_TEMPFAIL)  # fmt: skip
    old_name = old.name
    first, dot, rest = old_name.partition(".")
    new_name = f"{selector}{dot}{rest}" if first == old.selector and dot else old_name
    if new_name != old_name:
        for e in entries:
            if e.name == new_name:
                raise Refusal(f"{e.where}: the KeyTable already has an entry named {new_name}; "
                              "remove it, then activate again", EXIT_CONFIG)  # fmt: skip
    domain_text = m["value"].split(":", 1)[0].strip()
    lines[index] = (f"{m['pre']}{new_name}{m['gap']}{domain_text}:{selector}:{key_path}"
                    f"{m['post']}")  # fmt: skip
    edits = [_Edit(path, kind, text, "\n".join(lines), st)]
    if new_name != old_name and cfg.signing_table is not None:
        skind, spath = _table_file(cfg.signing_table.spec, "SigningTable", conf)
        if spath == path:
            raise Refusal(f"{path} is both KeyTable and SigningTable", EXIT_CONFIG)
        stext, sst = _read_table(spath)
        slines = stext.split("\n")
        for i, line in enumerate(slines):
            sm = _SIGNING_LINE.fullmatch(line)
            if sm is not None and sm["name"] == old_name:
                slines[i] = f"{sm['pre']}{new_name}{sm['post']}"
        after = "\n".join(slines)
        if after != stext:
            edits.append(_Edit(spath, skind, stext, after, sst))
    return edits, old_name, new_name


def _build(conf: str, err: TextIO, overrides: Mapping[str, str] | None = None) -> None:
    """Build the configuration exactly as the milter does at start and on reload.

    :raises ConfigError: the first problem.
    """
    loaded = load_config(conf, overrides=overrides)
    for w in loaded.warnings:
        print(f"authmilter: warning: {w}", file=err)
    cli.build_context(cli.resolve_authserv_id(loaded.config), err)


def _record_ttl(zone: _Zone, name: str) -> int | None:
    """The longest TTL the zone's servers give the record at ``name`` (the longest a cache
    may keep it), or None when none of them has it."""
    ttls: list[int] = []
    for server in zone.servers:
        if isinstance(server, str):
            continue
        try:
            records, ttl, _ad = server.ask_txt(name)
        except DNSError:
            continue
        if records and ttl is not None:
            ttls.append(ttl)
    return max(ttls) if ttls else None


def _activate(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    domain, selector = _domain(ns.domain), _selector(ns.selector)
    conf = ns.config
    cfg = _config(conf)
    now = _now(ns.now)
    if cfg.key_table is None:
        where = cfg.location("key_file") or conf
        raise Refusal(f"{where}: this configuration signs with KeyFile/Selector, not a "
                      "KeyTable; set Selector and KeyFile there by hand, then reload",
                      EXIT_CONFIG)  # fmt: skip
    try:
        table = open_dataset(cfg.key_table.spec, where=cfg.key_table.where, case_sensitive=True)
        entries = [parse_key_entry(n, v, w) for n, v, w in table.entries()]
    except ConfigError as exc:
        raise Refusal(str(exc), EXIT_CONFIG) from None
    mine = [e for e in entries if e.domain == domain]
    for e in mine:
        if e.selector == selector:
            _say(err, "activate", f"nothing to switch: {e.where} already signs {domain} with "
                 f"selector {selector}; reload authmilter if it does not sign with it yet")
            return EXIT_OK
    if ns.replace:
        mine = [e for e in mine if e.selector == ns.replace]
    if not mine:
        which = f" with selector {ns.replace}" if ns.replace else ""
        raise Refusal(f"the KeyTable ({cfg.key_table.spec}) has no entry for {domain}{which}: "
                      "activate replaces a key that signs now", EXIT_CONFIG)  # fmt: skip
    if len(mine) > 1:
        selectors = ", ".join(e.selector for e in mine)
        raise Refusal(f"the KeyTable has {len(mine)} entries for {domain} (selectors "
                      f"{selectors}): say which one to replace with --replace", EXIT_USAGE)
    old = mine[0]
    key_path = _key_path(conf, domain, selector, ns.keyfile)
    key = _load_key(key_path, cfg, err, "activate")

    # 1. The record must be on every server: the milter signs with the key at the reload.
    zone, outcomes = check_servers(cfg, domain, selector, key, _timeout(ns, cfg))
    name = key_record_name(selector, domain)
    print(f"{name} TXT against {key_path}, zone {zone.name}:", file=out)
    code = _print_outcomes(outcomes, out, err, "activate", f"refused: {name} is not ready on ")
    if code != EXIT_OK:
        return code
    old_name_dns = key_record_name(old.selector, domain)
    old_ttl = _record_ttl(zone, old_name_dns)
    if old_ttl is None:
        _say(err, "activate", f"note: no server publishes {old_name_dns}; recording TTL 0")

    # The record for retire must be writable before anything changes.
    state_path = _state_path(ns.state_dir, domain)
    try:
        os.makedirs(os.path.dirname(state_path), mode=0o755, exist_ok=True)
    except OSError as exc:
        raise Refusal(f"{os.path.dirname(state_path)}: cannot make the folder of the rotation "
                      f"record: {exc.strerror or exc}", EXIT_CANTCREAT) from None  # fmt: skip
    if not os.access(os.path.dirname(state_path), os.W_OK):
        raise Refusal(f"{os.path.dirname(state_path)}: cannot write the rotation record there "
                      "(give --state-dir)", EXIT_CANTCREAT)  # fmt: skip
    _load_state(state_path)  # a broken record refuses now, not after the switch

    # 2. The new tables, beside the old ones; the configuration built with them first.
    edits, old_name, new_name = _switch_tables(cfg, conf, old, entries, selector, key_path)
    temps: list[str] = []
    try:
        try:
            for edit in edits:
                temps.append(_write_temp(edit.path, edit.after.encode("utf-8", "surrogateescape"),
                                         mode=edit.st.st_mode & 0o7777,
                                         owner=(edit.st.st_uid, edit.st.st_gid)))  # fmt: skip
        except OSError as exc:
            raise Refusal(f"cannot write beside {edits[len(temps)].path}: "
                          f"{exc.strerror or exc}", EXIT_CANTCREAT) from None  # fmt: skip
        overrides = {"KeyTable": f"{edits[0].kind}:{temps[0]}"}
        if len(edits) > 1:
            overrides["SigningTable"] = f"{edits[1].kind}:{temps[1]}"
        try:
            _build(conf, err, overrides)
        except ConfigError as exc:
            raise Refusal(f"refused: the configuration with the new key does not build, nothing "
                          f"changed: {exc}", EXIT_CONFIG) from None  # fmt: skip
        # 3. The switch: one rename per table.
        for tmp, edit in zip(temps, edits, strict=True):
            os.replace(tmp, edit.path)
            _sync_folder(edit.path)
        temps.clear()
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    try:
        _build(conf, io.StringIO())  # its warnings were printed by the build above
    except ConfigError as exc:
        for edit in edits:
            _write_like(edit.path, edit.before.encode("utf-8", "surrogateescape"), edit.st)
        raise Refusal(f"refused: the configuration does not build after the switch; the old "
                      f"tables are back: {exc}", EXIT_CONFIG) from None  # fmt: skip
    for edit in edits:
        what = "KeyTable" if edit is edits[0] else "SigningTable"
        print(f"{what} {edit.path}: {old_name} -> {new_name}"
              + (f" ({domain}:{selector}:{key_path})" if edit is edits[0] else ""), file=out)
    print("configuration OK with the new key (built as the milter builds it)", file=out)

    # 4. The record for retire, then the reload.
    reloaded, how = _reload(cfg)
    _record(ns.state_dir, domain, {
        "activated": now, "activated_utc": _when(now), "selector": selector,
        "old_selector": old.selector, "old_ttl": old_ttl or 0,
        "old_key": old.key_source if old.is_path else None,
        "old_algorithm": _algorithm(old), "reloaded": reloaded,
    })  # fmt: skip
    print(f"recorded in {state_path}: activated {_when(now)}, old selector {old.selector}, "
          f"its record's TTL {old_ttl or 0}s", file=out)
    if reloaded:
        print(f"reload: {how}", file=out)
    else:
        _say(err, "activate", f"reload: {how}")
    print(f"next, after the queues are empty of mail signed s={old.selector}:\n"
          f"  authmilter rotate retire -c {conf} -d {domain}", file=out)
    return EXIT_OK


def _algorithm(entry: KeyEntry) -> str | None:
    """The old key's algorithm (for the revoked record retire prints), if it can be read."""
    if not entry.is_path:
        return None
    try:
        return load_private_key(entry.key_source, require_safe=False).algorithm.value
    except KeyMaterialError:
        return None


def _reload(cfg: Config) -> tuple[bool, str]:
    """SIGHUP to the pid in ``PidFile``, when it is a running authmilter; else why not."""
    manual = "reload authmilter yourself (systemctl reload authmilter)"
    if not cfg.pid_file:
        return False, f"the configuration sets no PidFile: {manual}"
    path = cfg.pid_file
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            text = handle.read().strip()
    except FileNotFoundError:
        return False, f"PidFile {path} does not exist (authmilter is not running?): {manual}"
    except OSError as exc:
        return False, f"PidFile {path}: cannot read: {exc.strerror}: {manual}"
    if not text.isdigit() or int(text) <= 1:
        return False, f"PidFile {path} holds no pid ({text[:20]!r}): {manual}"
    pid = int(text)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read()
    except FileNotFoundError:
        return False, f"no process {pid} (from PidFile {path}) is running: {manual}"
    except OSError:
        cmdline = b"authmilter"  # no /proc to look in: trust the pid file
    if b"authmilter" not in cmdline:
        shown = cmdline.replace(b"\0", b" ").decode("utf-8", "replace").strip()[:60]
        return False, (f"process {pid} (from PidFile {path}) is not authmilter ({shown}): a "
                       f"stale PidFile? {manual}")  # fmt: skip
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False, f"no process {pid} (from PidFile {path}) is running: {manual}"
    except PermissionError:
        return False, f"not allowed to signal pid {pid} (run as root): {manual}"
    return True, (f"sent SIGHUP to authmilter (pid {pid}); when its log says 'reloaded', new "
                  "mail is signed with the new selector")  # fmt: skip


# --------------------------------------------------------------------------------------------
# The state file
# --------------------------------------------------------------------------------------------


def _state_path(state_dir: str, domain: str) -> str:
    return os.path.join(state_dir, "rotate", f"{domain}.json")


def _load_state(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise Refusal(f"{path}: cannot read the rotation record: {exc}", EXIT_NOINPUT) from None
    if not isinstance(data, dict) or not isinstance(data.get("activations"), list):
        raise Refusal(f"{path}: not a rotation record", EXIT_NOINPUT)
    return data


def _save_state(path: str, data: Mapping[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        _install(_write_temp(path, text.encode("utf-8"), mode=0o644, owner=None), path,
                 replace=True)  # fmt: skip
    except OSError as exc:
        raise Refusal(f"{path}: cannot write the rotation record: {exc.strerror or exc}",
                      EXIT_CANTCREAT) from None  # fmt: skip


def _record(state_dir: str, domain: str, activation: Mapping[str, Any]) -> str:
    path = _state_path(state_dir, domain)
    data = _load_state(path) or {"version": STATE_VERSION, "domain": domain, "activations": []}
    data["activations"].append(dict(activation))
    _save_state(path, data)
    return path


# --------------------------------------------------------------------------------------------
# retire
# --------------------------------------------------------------------------------------------


def parse_postfix_time(text: str) -> int:
    """A Postfix time value in seconds: a number and a unit (s, m, h, d, w); days without one.

    :raises ValueError: not such a value.
    """
    m = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", text.lower())
    if m is None:
        raise ValueError(f"{text!r} is not a time (e.g. 5d, 120h, 3600s)")
    return int(m[1]) * _POSTFIX_UNITS[m[2] or "d"]


def _queue_lifetime(option: str | None, err: TextIO) -> tuple[int, str]:
    """The longest time mail stays queued, and where that came from."""
    if option:
        try:
            return parse_postfix_time(option), "--queue-lifetime"
        except ValueError as exc:
            raise Refusal(f"--queue-lifetime: {exc}", EXIT_USAGE) from None
    postconf = shutil.which("postconf") or next(
        (p for p in ("/usr/sbin/postconf", "/sbin/postconf") if os.access(p, os.X_OK)), None)
    if postconf is None:
        return DEFAULT_QUEUE_LIFETIME, "Postfix's default (no postconf here)"
    try:
        run = subprocess.run([postconf, "-h", "maximal_queue_lifetime"], capture_output=True,
                             text=True, timeout=30, check=False)  # fmt: skip
        if run.returncode == 0:
            return parse_postfix_time(run.stdout.strip()), "postconf maximal_queue_lifetime"
        problem = run.stderr.strip() or f"exit status {run.returncode}"
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        problem = str(exc)
    _say(err, "retire", f"warning: postconf -h maximal_queue_lifetime failed ({problem}); "
         "using Postfix's default 5d (give --queue-lifetime)")  # fmt: skip
    return DEFAULT_QUEUE_LIFETIME, "Postfix's default"


def _retire(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    domain = _domain(ns.domain)
    now = _now(ns.now)
    path = _state_path(ns.state_dir, domain)
    data = _load_state(path)
    if data is None or not data["activations"]:
        raise Refusal(f"no activation of a new key for {domain} is recorded ({path}): retire "
                      "follows 'authmilter rotate activate'", EXIT_NOINPUT)  # fmt: skip
    pending = [a for a in data["activations"] if isinstance(a, dict) and not a.get("retired")]
    if not pending:
        print(f"nothing left to retire for {domain}: every recorded old key is deleted", file=out)
        return EXIT_OK
    current = _domain_keys(ns.config, domain)
    lifetime, source = _queue_lifetime(ns.queue_lifetime, err)
    code = EXIT_OK
    changed = False
    for act in pending:
        old = str(act.get("old_selector"))
        ttl = int(act.get("old_ttl") or 0)
        activated = float(act.get("activated") or 0)
        due = activated + lifetime + ttl
        why = (f"activated {_when(activated)} + queue lifetime {_span(lifetime)} ({source}) "
               f"+ record TTL {ttl}s")
        if act.get("reloaded") is False:
            _say(err, "retire", f"note: activate could not reload authmilter for selector "
                 f"{act.get('selector')}; the wait counts from the activation, so if the reload "
                 "came later, wait that much longer")  # fmt: skip
        in_use = [e for e in current if e.selector == old]
        if in_use:
            _say(err, "retire", f"refused: selector {old} signs for {domain} again "
                 f"({in_use[0].where}); it is not retired")  # fmt: skip
            code = code or EXIT_USAGE
            continue
        if now < due:
            _say(err, "retire", f"refused: mail signed s={old} may be queued until {_when(due)} "
                 f"({why}); keep {key_record_name(old, domain)} until then")  # fmt: skip
            code = code or EXIT_TEMPFAIL
            continue
        name = key_record_name(old, domain)
        algorithm = act.get("old_algorithm")
        revoked = "v=DKIM1; " + (f"k={algorithm}; " if algorithm else "") + "p="
        print(f"selector {old} of {domain} can go since {_when(due)} ({why}).", file=out)
        print(f"In the {domain} zone, on every nameserver, remove the record {name}. TXT,\n"
              "or publish it revoked (empty p=; verifiers then say the key was revoked):",
              file=out)  # fmt: skip
        print(bind_txt(old, domain, revoked, append_domain=True), end="", file=out)
        old_key = act.get("old_key")
        if not ns.delete_key:
            if old_key:
                print(f"Then delete {old_key}: authmilter rotate retire -c {ns.config} "
                      f"-d {domain} --delete-key", file=out)  # fmt: skip
            continue
        if not old_key:
            print("The old key was written in the KeyTable itself: no file to delete.", file=out)
        elif any(os.path.realpath(e.key_source) == os.path.realpath(old_key)
                 for e in _all_file_keys(ns.config)):
            _say(err, "retire", f"refused: {old_key} is still named in the KeyTable; not "
                 "deleted")  # fmt: skip
            code = code or EXIT_USAGE
            continue
        else:
            try:
                os.unlink(old_key)
                print(f"deleted {old_key}", file=out)
            except FileNotFoundError:
                print(f"{old_key} was already deleted", file=out)
            except OSError as exc:
                raise Refusal(f"{old_key}: cannot delete: {exc.strerror}", EXIT_NOPERM) from None
        act["retired"] = now
        changed = True
    if changed:
        _save_state(path, data)
    return code


def _all_file_keys(conf: str) -> list[KeyEntry]:
    try:
        return _file_keys(load_key_entries(conf))
    except ConfigError as exc:
        raise Refusal(str(exc), EXIT_CONFIG) from None


def _handler(command: str, step: Callable[[argparse.Namespace, TextIO, TextIO], int],
             ) -> Callable[[argparse.Namespace], int]:  # fmt: skip
    """The entry point of ``rotate COMMAND``: run ``step``; a refusal is one line and its code."""

    def run(ns: argparse.Namespace) -> int:
        try:
            return step(ns, sys.stdout, sys.stderr)
        except Refusal as r:
            _say(sys.stderr, command, r.message)
            return r.code

    run.__doc__ = f"Handle ``rotate {command}``."
    return run


run_new = _handler("new", _new)
run_check = _handler("check", _check)
run_activate = _handler("activate", _activate)
run_retire = _handler("retire", _retire)
