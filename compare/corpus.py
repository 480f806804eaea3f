"""The corpus of ``make compare``: configuration sets, DNS zones and messages.

A *config set* is one set of files (opendkim.conf, opendmarc.conf, optionally policyd-spf.conf,
and what they name: KeyTable, SigningTable, TrustedHosts, keys). The files come from
``compare/configs/<source>/`` — Debian's packaged files verbatim, or tutorial-style ones — plus
the set's own settings (e.g. ``RejectFailures true``), then the *harness changes*: the minimal
edits that let them run on this machine (socket and pid paths into the run's directory, no
``UserID``, ``UMask 000`` so Postfix can reach the socket, ``Nameservers`` naming our NSD).
Both sides read the very same files.

A *case* is one message with its envelope, client and the config set it runs under. Every
name a case resolves is under ``.example`` (libunbound answers ``.test`` itself) and served
by NSD from :func:`zones`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from authmilter.keys import PrivateKey
from compare import signing
from compare.signing import drop_tag, record, sign

CONFIGS = Path(__file__).resolve().parent / "configs"

Area = Literal["dkim", "spf", "dmarc", "headers", "signing"]
Role = Literal["opendkim", "opendmarc", "policyd-spf"]

RCPT = "user@rcpt.example.org"
#: Postfix's myhostname in tests/postfix_fixture.py (the {j} macro the anchors' A-R carry).
MTA_HOSTNAME = "mx.harness.example"
#: Clients the PROXY line claims (RFC 5737). GOOD is in every "authorized" SPF record.
GOOD = "192.0.2.10"
FORWARDER = "203.0.113.66"
TRUSTED_RELAY = "198.51.100.7"  # inside the tutorial TrustedHosts line 198.51.100.0/24
GOOD6 = "2001:db8::25"
RELAY_HELO = "mail.relay.example"
BODY = (
    "Hello,\r\n"
    "\r\n"
    "this message is part of the side-by-side comparison of authmilter with OpenDKIM,\r\n"
    "OpenDMARC and policyd-spf. It has a few lines of text, and that is all.\r\n"
    "\r\n"
    "-- \r\n"
    "The harness\r\n"
)
DATE = "Mon, 02 Jun 2025 10:00:00 +0000"


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Keys:
    """The keys of one run (made fresh each run)."""

    rsa2048: PrivateKey
    rsa1024: PrivateKey
    ed: PrivateKey
    other: PrivateKey  # published under other.example.org, and as a wrong key for dkim.example.com
    sign: PrivateKey  # the tutorial KeyTable's mail._domainkey.sign.example.com

    @staticmethod
    def make() -> Keys:
        return Keys(signing.rsa_key(2048), signing.rsa_key(1024), signing.ed25519_key(),
                    signing.rsa_key(2048), signing.rsa_key(2048))  # fmt: skip


# --------------------------------------------------------------------------------------------
# DNS
# --------------------------------------------------------------------------------------------

#: The zones NSD serves: the three second-level names RFC 2606 reserves, whose TLDs are in the
#: Public Suffix List, so OpenDMARC finds organizational domains as it would for real mail (for
#: names under a TLD missing from its PSL, such as ``.example``, OpenDMARC 1.4 finds none);
#: and, under ``.example``, the relay and the forwarder, whose envelope and HELO names must not
#: share an organizational domain with any From domain (no accidental SPF alignment). Only
#: SPF checkers resolve those two; OpenDKIM (libunbound) never needs them.
ORIGINS = ("example.com", "example.net", "example.org", "relay.example", "attacker.example")

AUTHORIZED = "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all"

#: Organizational DMARC records: example.com has p=reject sp=quarantine, example.net p=reject,
#: example.org none (so that its subdomains without a record of their own have no policy).
ORG_POLICIES = {"example.com": "v=DMARC1; p=reject; sp=quarantine",
                "example.net": "v=DMARC1; p=reject"}


def records(keys: Keys) -> list[tuple[str, str, str]]:
    """Every record of the corpus as (absolute owner, type, text); TXT text unquoted."""
    r: list[tuple[str, str, str]] = []

    def txt(owner: str, text: str) -> None:
        r.append((owner, "TXT", text))

    for origin, policy in ORG_POLICIES.items():
        txt(f"_dmarc.{origin}", policy)
    # The relay: authorized client of the DKIM/DMARC/header cases' envelopes and HELO.
    txt("relay.example", AUTHORIZED)
    txt(RELAY_HELO, AUTHORIZED)
    r.append((RELAY_HELO, "A", GOOD))
    txt("mail.attacker.example", "v=spf1 a -all")
    r.append(("mail.attacker.example", "A", FORWARDER))
    # DKIM
    dk = "_domainkey.dkim.example.com"
    txt(f"s2048.{dk}", record(keys.rsa2048))
    txt(f"s1024.{dk}", record(keys.rsa1024))
    txt(f"sed.{dk}", record(keys.ed))
    txt(f"revoked.{dk}", "v=DKIM1; k=rsa; p=")
    txt(f"testing.{dk}", record(keys.rsa2048) + "; t=y")
    txt(f"sha1only.{dk}", "v=DKIM1; k=rsa; h=sha1; p=" + keys.rsa2048.public_p())
    txt("_dmarc.dkim.example.com", "v=DMARC1; p=reject")
    txt("dkim.example.com", AUTHORIZED)
    txt("s2048._domainkey.other.example.org", record(keys.other))
    txt("other.example.org", AUTHORIZED)
    # SPF: each From domain has its own p=none record.
    spf = {
        "pass": AUTHORIZED,
        "fail": "v=spf1 -all",
        "softfail": "v=spf1 ~all",
        "neutral": "v=spf1 ?all",
        "permerror": "v=spf1 ip4:192.0.2.0/24 bogus:x -all",
        "includenone": "v=spf1 include:nospf.spf.example.org -all",
        "mx": "v=spf1 mx -all",
        "a": "v=spf1 a -all",
        "redirect": "v=spf1 redirect=fail.spf.example.org",
        "include": "v=spf1 include:pass.spf.example.org -all",
        "exists": "v=spf1 exists:%{i}._ip.spf.example.org -all",
        "helofail": "v=spf1 -all",
        # NSD serves no zone for .invalid and answers REFUSED: a DNS error, not NXDOMAIN.
        "temperror": "v=spf1 include:unserved.invalid -all",
    }
    for name, text in spf.items():
        txt(f"{name}.spf.example.org", text)
    txt("tworecords.spf.example.org", AUTHORIZED)
    txt("tworecords.spf.example.org", "v=spf1 -all")
    r.append(("nospf.spf.example.org", "A", "192.0.2.200"))
    r.append(("mx.spf.example.org", "MX", "10 mxhost.spf.example.org."))
    r.append(("mxhost.spf.example.org", "A", GOOD))
    r.append(("a.spf.example.org", "A", GOOD))
    r.append((f"{GOOD}._ip.spf.example.org", "A", "127.0.0.2"))
    for name in [*spf, "tworecords", "nospf"]:
        txt(f"_dmarc.{name}.spf.example.org", "v=DMARC1; p=none")
    # DMARC: the From domain's own record.
    dmarc = {
        "pnone.example.com": "v=DMARC1; p=none",
        "pquar.example.com": "v=DMARC1; p=quarantine",
        "preject.example.com": "v=DMARC1; p=reject",
        "pct0.example.com": "v=DMARC1; p=reject; pct=0",
        "mail.strictd.example.com": "v=DMARC1; p=reject; adkim=s",
        "stricts.example.com": "v=DMARC1; p=reject; aspf=s",
        "relaxeds.example.com": "v=DMARC1; p=reject",
        "badrec.example.org": "v=DMARC1; p=bogus",
        "notdmarc.example.org": "v=spf1 -all",
        "ruaonly.example.org": "v=DMARC1; rua=mailto:dmarc@ruaonly.example.org",
        "hdr.example.com": "v=DMARC1; p=none",
        "sign.example.com": "v=DMARC1; p=reject",
    }
    for name, text in dmarc.items():
        txt(f"_dmarc.{name}", text)
    txt("_dmarc.tworec.example.org", "v=DMARC1; p=reject")
    txt("_dmarc.tworec.example.org", "v=DMARC1; p=none")
    for name in ("pnone.example.com", "pquar.example.com", "preject.example.com",
                 "pct0.example.com", "strictd.example.com", "mail.strictd.example.com",
                 "stricts.example.com", "relaxeds.example.com", "news.example.com",
                 "nodmarc.example.org", "badrec.example.org", "notdmarc.example.org",
                 "tworec.example.org", "ruaonly.example.org", "a.b.example.net",
                 "hdr.example.com", "sign.example.com"):  # fmt: skip
        txt(name, AUTHORIZED)
        txt(f"bounce.{name}", AUTHORIZED)
        txt(f"s2048._domainkey.{name}", record(keys.rsa2048))
    # Signing (tutorial KeyTable)
    txt("mail._domainkey.sign.example.com", record(keys.sign))
    return r


def zones(keys: Keys) -> dict[str, str]:
    """``{origin: zone text}`` for NSD: every record of :func:`records` in its zone."""
    import dnsserver  # tests/ (compare.lab puts it on sys.path)

    by_zone: dict[str, list[tuple[str, str, str]]] = {o: [] for o in ORIGINS}
    for owner, rtype, text in records(keys):
        origin = next((o for o in ORIGINS if owner == o or owner.endswith("." + o)), None)
        if origin is None:
            raise ValueError(f"record {owner} is in no zone of ORIGINS")
        rdata = dnsserver.txt_rdata(text) if rtype == "TXT" else text
        by_zone[origin].append((owner + ".", rtype, rdata))
    return {o: dnsserver.make_zone(o, rs) for o, rs in by_zone.items()}


# --------------------------------------------------------------------------------------------
# Configuration sets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigSet:
    """One set of migration files; ``settings`` are the user's own edits (file → directives)."""

    name: str
    describe: str
    source: str
    roles: Mapping[Role, str]
    extra_files: Sequence[str] = ()
    settings: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


CONFIG_SETS: dict[str, ConfigSet] = {s.name: s for s in [
    ConfigSet("debian", "Debian's packaged opendkim.conf and opendmarc.conf; no policyd-spf",
              "debian", {"opendkim": "opendkim.conf", "opendmarc": "opendmarc.conf"}),
    ConfigSet("debian-spf", "Debian's packaged opendkim.conf, opendmarc.conf and policyd-spf.conf",
              "debian", {"opendkim": "opendkim.conf", "opendmarc": "opendmarc.conf",
                         "policyd-spf": "policyd-spf.conf"}),
    ConfigSet("debian-strict", "Debian's packaged files, opendmarc.conf with RejectFailures true "
              "and RequiredHeaders true added",
              "debian", {"opendkim": "opendkim.conf", "opendmarc": "opendmarc.conf",
                         "policyd-spf": "policyd-spf.conf"},
              settings={"opendmarc.conf": {"RejectFailures": "true",
                                           "RequiredHeaders": "true"}}),
    ConfigSet("debian-hold", "Debian's packaged files, opendmarc.conf with "
              "HoldQuarantinedMessages true added",
              "debian", {"opendkim": "opendkim.conf", "opendmarc": "opendmarc.conf",
                         "policyd-spf": "policyd-spf.conf"},
              settings={"opendmarc.conf": {"HoldQuarantinedMessages": "true"}}),
    ConfigSet("debian-strict-hold", "Debian's packaged files, opendmarc.conf with "
              "RejectFailures true and HoldQuarantinedMessages true added",
              "debian", {"opendkim": "opendkim.conf", "opendmarc": "opendmarc.conf",
                         "policyd-spf": "policyd-spf.conf"},
              settings={"opendmarc.conf": {"RejectFailures": "true",
                                           "HoldQuarantinedMessages": "true"}}),
    ConfigSet("tutorial", "tutorial-style opendkim.conf (refile: KeyTable, SigningTable and "
              "TrustedHosts as InternalHosts and ExternalIgnoreList) and opendmarc.conf "
              "(RejectFailures, RequiredHeaders, SPFSelfValidate)",
              "tutorial", {"opendkim": "opendkim.conf", "opendmarc": "opendmarc.conf"},
              extra_files=("TrustedHosts", "KeyTable", "SigningTable", "ignore.hosts")),
]}  # fmt: skip

_DIRECTIVE = re.compile(
    r"^(?P<comment>#\s*)?(?P<name>[A-Za-z][\w-]*)(?P<sep>\s*=?\s*)(?P<value>.*)$")


def set_directive(text: str, name: str, value: str | None) -> tuple[str, str]:
    """Set (or with ``None`` comment out) directive ``name`` in config ``text``.

    The first active line is replaced; else the first commented-out one is uncommented; else
    a line is appended. Returns the new text and a one-line description of the change.
    """
    lines = text.splitlines()
    active = commented = None
    for i, line in enumerate(lines):
        m = _DIRECTIVE.match(line.strip())
        if not m or m["name"].lower() != name.lower():
            continue
        if m["comment"] is None and active is None:
            active = i
        elif m["comment"] is not None and commented is None:
            commented = i
    if active is not None:
        old = lines[active].strip()
        m = _DIRECTIVE.match(old)
        assert m is not None
        if value is None:
            lines[active] = "#" + lines[active]
            change = f"`{_squash(old)}` commented out"
        else:
            lines[active] = f"{m['name']}{m['sep'] or ' '}{value}"
            change = f"`{_squash(old)}` → `{_squash(lines[active])}`"
    elif value is None:
        return text, ""
    elif commented is not None:
        old = lines[commented].strip()
        m = _DIRECTIVE.match(old)
        assert m is not None
        lines[commented] = f"{m['name']}{m['sep'] or ' '}{value}"
        change = f"`{_squash(old)}` → `{_squash(lines[commented])}`"
    else:
        lines.append(f"{name} {value}")
        change = f"`{name} {value}` added"
    return "\n".join(lines) + "\n", change


def _squash(line: str) -> str:
    return re.sub(r"\s+", " ", line.strip())


@dataclass(frozen=True, slots=True)
class Materialized:
    """A config set written to a directory: role → file, the sockets, what was changed."""

    directory: Path
    files: dict[Role, Path]
    sockets: dict[Role, Path]
    user_changes: list[str]
    harness_changes: list[str]


def materialize(cs: ConfigSet, directory: Path, keys: Keys, dns_address: str) -> Materialized:
    """Write ``cs`` into ``directory`` (which Postfix's user can traverse)."""
    src = CONFIGS / cs.source
    user: list[str] = []
    harness: list[str] = []
    files: dict[Role, Path] = {}
    sockets: dict[Role, Path] = {}
    # OpenDKIM's authserv-id is the MTA's host name ({j}: Postfix's myhostname).
    hostname = MTA_HOSTNAME
    path_map = {"/etc/opendkim/": f"{directory}/", "/etc/opendmarc/": f"{directory}/",
                "/run/opendmarc/opendmarc.dat": f"{directory}/opendmarc.dat"}  # fmt: skip

    def repath(text: str, fname: str) -> str:
        for old, new in path_map.items():
            if old in text:
                text = text.replace(old, new)
                note = f"{fname}: paths `{old}…` → the run's directory"
                if note not in harness:
                    harness.append(note)
        return text

    for role, fname in cs.roles.items():
        text = (src / fname).read_text()
        for name, value in cs.settings.get(fname, {}).items():
            text, change = set_directive(text, name, value)
            user.append(f"{fname}: {change}")
        changes: list[str] = []
        if role in ("opendkim", "opendmarc"):
            sock = directory / f"{role}.sock"
            sockets[role] = sock
            edits: list[tuple[str, str | None]] = [
                ("Socket", f"local:{sock}"), ("PidFile", str(directory / f"{role}.pid")),
                ("UserID", None), ("UMask", "000")]  # fmt: skip
            for name, edit in edits:
                text, change = set_directive(text, name, edit)
                if change:
                    changes.append(change)
        if role == "opendkim":
            text, change = set_directive(text, "TrustAnchorFile", None)
            if change:
                changes.append(change)
            text, change = set_directive(text, "Nameservers", dns_address)
            changes.append(change)
        if "@HOSTNAME@" in text:
            text = text.replace("@HOSTNAME@", hostname)
            changes.append("the tutorial's `mail.yourdomain.com` (OpenDKIM's authserv-id: the "
                           f"MTA's host name) is the harness Postfix's `{hostname}`")  # fmt: skip
        text = repath(text, fname)
        harness.extend(f"{fname}: {c}".replace(str(directory), "DIR") for c in changes)
        path = directory / fname
        path.write_text(text)
        path.chmod(0o644)
        files[role] = path
    for fname in cs.extra_files:
        text = repath((src / fname).read_text(), fname)
        path = directory / fname
        path.write_text(text)
        path.chmod(0o644)
    if cs.source == "tutorial":
        signing.write_key(directory / "keys" / "sign.example.com" / "mail.private", keys.sign)
        (directory / "keys").chmod(0o755)
        (directory / "keys" / "sign.example.com").chmod(0o755)
    return Materialized(directory, files, sockets, user, harness)


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


def message(from_: str | None = "Alice <alice@dkim.example.com>", *, subject: str = "Test",
            to: str = f"Bob <{RCPT}>", date: bool = True, extra_from: Sequence[str] = (),
            body: str = BODY, message_id: str = "<compare@harness.example>") -> bytes:  # fmt: skip
    """A plain message, CRLF; ``from_`` None leaves out From, ``extra_from`` adds more."""
    lines = []
    if from_ is not None:
        lines.append(f"From: {from_}")
    lines += [f"From: {f}" for f in extra_from]
    lines.append(f"To: {to}")
    lines.append(f"Subject: {subject}")
    if date:
        lines.append(f"Date: {DATE}")
    lines += [f"Message-ID: {message_id}", "MIME-Version: 1.0",
              "Content-Type: text/plain; charset=us-ascii"]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("ascii")


Builder = Callable[[Keys], bytes]


@dataclass(frozen=True, slots=True)
class Case:
    """One message through both sides."""

    name: str
    area: Area
    config: str
    describe: str
    build: Builder
    mail_from: str = "bounce@relay.example"
    helo: str = RELAY_HELO
    client_ip: str | None = GOOD
    port: Literal["inbound", "submit"] = "inbound"
    quick: bool = False
    #: a domain whose DKIM signature in the delivered message is checked (signing cases)
    signer: str | None = None


def _plain(from_: str = "Alice <alice@dkim.example.com>", **kw: object) -> Builder:
    def build(keys: Keys) -> bytes:
        return message(from_, **kw)  # type: ignore[arg-type]

    return build


def _signed(from_: str = "Alice <alice@dkim.example.com>", *, key: str = "rsa2048",
            domain: str = "dkim.example.com", selector: str = "s2048",
            after: Callable[[bytes], bytes] | None = None,
            also: Callable[[bytes, Keys], bytes] | None = None,
            **kw: object) -> Builder:  # fmt: skip
    """A message From ``from_`` signed by ``key`` (an attribute of :class:`Keys`) as
    ``d=domain s=selector`` with :func:`signing.sign` options ``kw``; ``after`` alters the
    signed bytes (tampering), ``also`` adds a further signature."""

    def build(keys: Keys) -> bytes:
        signed = sign(message(from_), getattr(keys, key), domain=domain, selector=selector,
                      **kw)  # type: ignore[arg-type]
        if also is not None:
            signed = also(signed, keys)
        return after(signed) if after is not None else signed

    return build


def _append_body(raw: bytes) -> bytes:
    return raw + b"P.S. A line added after signing.\r\n"


def _change_subject(raw: bytes) -> bytes:
    return raw.replace(b"Subject: Test\r\n", b"Subject: Test (changed in transit)\r\n", 1)


def _now() -> int:
    return int(time.time())


DAY = 86400

DKIM_CASES = [
    Case("dkim-rsa-relaxed", "dkim", "debian", "valid RSA-2048 signature, relaxed/relaxed",
         _signed(canonicalization="relaxed/relaxed"), quick=True),
    Case("dkim-rsa-simple", "dkim", "debian", "valid RSA-2048 signature, simple/simple",
         _signed(canonicalization="simple/simple")),
    Case("dkim-ed25519", "dkim", "debian", "valid Ed25519 signature (RFC 8463)",
         _signed(key="ed", selector="sed"), quick=True),
    Case("dkim-rsa-and-ed25519", "dkim", "debian", "two valid signatures: RSA and Ed25519",
         _signed(also=lambda raw, k: sign(raw, k.ed, domain="dkim.example.com", selector="sed"))),
    Case("dkim-body-modified", "dkim", "debian", "body changed after signing",
         _signed(after=_append_body), quick=True),
    Case("dkim-header-modified", "dkim", "debian", "signed Subject changed after signing",
         _signed(after=_change_subject)),
    Case("dkim-missing-key", "dkim", "debian", "selector without a key record (NXDOMAIN)",
         _signed(selector="nokey"), quick=True),
    Case("dkim-revoked-key", "dkim", "debian", "key record with empty p= (revoked)",
         _signed(selector="revoked")),
    Case("dkim-rsa-sha1", "dkim", "debian", "valid rsa-sha1 signature",
         _signed(algorithm="rsa-sha1"), quick=True),
    Case("dkim-rsa-1024", "dkim", "debian", "valid signature with a 1024-bit RSA key",
         _signed(key="rsa1024", selector="s1024")),
    Case("dkim-wrong-key", "dkim", "debian", "signed with a key other than the published one",
         _signed(key="other")),
    Case("dkim-two-sigs-one-bad", "dkim", "debian",
         "a valid d=dkim.example.com signature and a failing d=other.example.org one",
         _signed(also=lambda raw, k: sign(raw, k.rsa2048, domain="other.example.org",
                                          selector="s2048"))),  # fmt: skip
    Case("dkim-l-tag", "dkim", "debian", "l= signature, unchanged body", _signed(length=True)),
    Case("dkim-l-tag-appended", "dkim", "debian", "l= signature, text appended after signing",
         _signed(length=True, after=_append_body)),
    Case("dkim-expired", "dkim", "debian", "x= a day in the past",
         _signed(timestamp=_now() - 3 * DAY, expiration=_now() - DAY), quick=True),
    Case("dkim-future-t", "dkim", "debian", "t= a day in the future",
         _signed(timestamp=_now() + DAY)),
    Case("dkim-testing-key", "dkim", "debian", "valid signature, key record t=y",
         _signed(selector="testing")),
    Case("dkim-testing-key-bad", "dkim", "debian", "body changed, key record t=y",
         _signed(selector="testing", after=_append_body)),
    Case("dkim-key-h-sha1", "dkim", "debian",
         "rsa-sha256 signature, key record restricted to h=sha1", _signed(selector="sha1only")),
    Case("dkim-malformed-no-bh", "dkim", "debian", "signature without the bh= tag",
         _signed(after=lambda raw: drop_tag(raw, "bh"))),
    Case("dkim-third-party", "dkim", "debian",
         "valid signature of another domain (d=other.example.org); From dkim.example.com",
         _signed(key="other", domain="other.example.org")),
    Case("dkim-subdomain-from", "dkim", "debian",
         "From news.dkim.example.com, valid d=dkim.example.com (relaxed alignment)",
         _signed("News <news@news.dkim.example.com>")),
    Case("dkim-unsigned", "dkim", "debian", "no signature; From dkim.example.com (p=reject)",
         _plain(), quick=True),
]


def _spf(name: str, local: str, describe: str, config: str = "debian-spf", *,
         quick: bool = False, client: str = GOOD, helo: str = RELAY_HELO,
         mail_from: str | None = None) -> Case:  # fmt: skip
    domain = f"{local}.spf.example.org"
    return Case(name, "spf", config, describe, _plain(f"Alice <alice@{domain}>"),
                mail_from=f"alice@{domain}" if mail_from is None else mail_from, helo=helo,
                client_ip=client, quick=quick)  # fmt: skip


SPF_CASES = [
    _spf("spf-pass", "pass", "ip4 match", quick=True),
    _spf("spf-fail", "fail", "-all", quick=True),
    _spf("spf-softfail", "softfail", "~all", quick=True),
    _spf("spf-neutral", "neutral", "?all"),
    _spf("spf-none", "nospf", "no SPF record"),
    _spf("spf-permerror-syntax", "permerror", "unknown mechanism"),
    _spf("spf-permerror-include-none", "includenone", "include: of a domain without SPF"),
    _spf("spf-permerror-two-records", "tworecords", "two v=spf1 records"),
    _spf("spf-mx", "mx", "mx mechanism matches"),
    _spf("spf-a", "a", "a mechanism matches"),
    _spf("spf-redirect-fail", "redirect", "redirect= to a -all record"),
    _spf("spf-include-pass", "include", "include: of a passing record"),
    _spf("spf-exists-macro", "exists", "exists:%{i}… macro"),
    _spf("spf-ipv6-pass", "pass", "IPv6 client, ip6 match", client=GOOD6),
    _spf("spf-fail-unauthorized-client", "pass", "ip4 does not match the client",
         client=FORWARDER, helo="mail.attacker.example"),
    _spf("spf-helo-fail", "pass", "HELO name with -all, MAIL FROM passes",
         helo="helofail.spf.example.org", quick=True),
    _spf("spf-null-sender-helo-pass", "pass", "MAIL FROM:<>, HELO passes (not aligned)",
         mail_from=""),
    _spf("spf-null-sender-helo-aligned", "pass", "MAIL FROM:<>, HELO pass.spf.example.org passes "
         "(aligned with From)", mail_from="", helo="pass.spf.example.org"),
    _spf("spf-null-sender-helo-fail", "pass", "MAIL FROM:<>, HELO -all", mail_from="",
         helo="helofail.spf.example.org"),
    _spf("spf-temperror", "temperror", "include: of a name whose server refuses (DNS error)"),
    _spf("spf-temperror-selfvalidate", "temperror", "include: of a name whose server refuses; "
         "OpenDMARC SPFSelfValidate", "tutorial"),
    _spf("spf-fail-no-policyd", "fail", "-all; no policyd-spf file", "debian", quick=True),
    _spf("spf-softfail-no-policyd", "softfail", "~all; no policyd-spf file", "debian"),
    _spf("spf-pass-no-policyd", "pass", "pass; no policyd-spf file", "debian"),
    _spf("spf-softfail-selfvalidate", "softfail", "~all; OpenDMARC SPFSelfValidate",
         "tutorial"),
    _spf("spf-fail-selfvalidate", "fail", "-all; OpenDMARC SPFSelfValidate", "tutorial"),
]


def _dmarc(name: str, describe: str, config: str = "debian-spf", *, org: str,
           from_local: str = "alice", from_host: str | None = None, dkim: bool = False,
           dkim_domain: str | None = None, mail_from: str = "bounce@relay.example",
           client: str = GOOD, helo: str = RELAY_HELO, quick: bool = False) -> Case:  # fmt: skip
    """From ``<from_local>@<from_host or org>``; signed (valid) by ``dkim_domain or org`` when
    ``dkim``; envelope ``mail_from`` (default: the unaligned, SPF-passing relay)."""
    from_ = f"Alice <{from_local}@{from_host or org}>"
    build = (_signed(from_, domain=dkim_domain or org) if dkim else _plain(from_))
    return Case(name, "dmarc", config, describe, build, mail_from=mail_from, helo=helo,
                client_ip=client, quick=quick)  # fmt: skip


#: The config sets of the quick subset (each set costs a start and stop of both sides).
QUICK_SETS = ("debian", "debian-spf", "debian-strict", "tutorial")


def _dmarc_sets(name: str, describe: str, configs: Sequence[str], *, quick: bool = False,
                **kw: object) -> list[Case]:  # fmt: skip
    """The case under each of ``configs`` (named ``name@config`` after the first)."""
    return [_dmarc(f"{name}@{c}" if c != configs[0] else name, describe, c,
                   quick=quick and c in QUICK_SETS, **kw)  # type: ignore[arg-type]
            for c in configs]  # fmt: skip


DMARC_CASES = [
    _dmarc("dmarc-pass-dkim", "aligned DKIM pass, SPF unaligned (p=reject)",
           org="preject.example.com",
           dkim=True, quick=True),
    _dmarc("dmarc-pass-spf", "aligned SPF pass, no DKIM (p=reject)", org="preject.example.com",
           mail_from="bounce@preject.example.com", quick=True),
    _dmarc("dmarc-pass-relaxed-spf",
           "SPF pass for bounce.relaxeds.example.com, From relaxeds.example.com",
           org="relaxeds.example.com", mail_from="x@bounce.relaxeds.example.com"),
    *_dmarc_sets("dmarc-fail-p-none", "no aligned pass, p=none",
                 ["debian-spf", "debian-strict"], org="pnone.example.com"),
    *_dmarc_sets("dmarc-fail-p-quarantine", "no aligned pass, p=quarantine",
                 ["debian-spf", "debian-strict", "tutorial", "debian-hold", "debian-strict-hold"],
                 org="pquar.example.com", quick=True),
    *_dmarc_sets("dmarc-fail-p-reject", "no aligned pass, p=reject",
                 ["debian-spf", "debian-strict", "tutorial", "debian", "debian-hold",
                  "debian-strict-hold"], org="preject.example.com",
                 quick=True),
    *_dmarc_sets("dmarc-pct0", "no aligned pass, p=reject pct=0",
                 ["debian-spf", "debian-strict", "debian-strict-hold"], org="pct0.example.com"),
    *_dmarc_sets("dmarc-sp-subdomain", "From news.example.com (no record of its own); org "
                 "example.com p=reject sp=quarantine", ["debian-spf", "debian-strict"],
                 org="example.com", from_host="news.example.com"),
    _dmarc("dmarc-no-record", "From domain without any DMARC record", org="nodmarc.example.org",
           quick=True),
    *_dmarc_sets("dmarc-org-fallback", "From a.b.example.net, record only at example.net "
                 "(p=reject)", ["debian-spf", "debian-strict"], org="example.net",
                 from_host="a.b.example.net"),
    _dmarc("dmarc-strict-dkim", "adkim=s; d=strictd.example.com, From mail.strictd.example.com",
           "debian-strict", org="strictd.example.com", from_host="mail.strictd.example.com",
           dkim=True),
    _dmarc("dmarc-strict-spf",
           "aspf=s; SPF pass for bounce.stricts.example.com, From stricts.example.com",
           "debian-strict", org="stricts.example.com", mail_from="x@bounce.stricts.example.com"),
    *_dmarc_sets("dmarc-forwarded", "aligned DKIM pass, SPF fail (forwarder not authorized)",
                 ["debian-spf", "debian", "tutorial"], org="preject.example.com", dkim=True,
                 mail_from="alice@preject.example.com", client=FORWARDER,
                 helo="mail.attacker.example", quick=True),
    _dmarc("dmarc-bad-record", "record v=DMARC1; p=bogus", org="badrec.example.org"),
    _dmarc("dmarc-not-dmarc-record", "TXT at _dmarc is not v=DMARC1", org="notdmarc.example.org"),
    _dmarc("dmarc-two-records", "two v=DMARC1 records", "debian-strict", org="tworec.example.org"),
    _dmarc("dmarc-rua-without-p", "v=DMARC1 with rua= and no p=", org="ruaonly.example.org"),
    _dmarc("dmarc-upper-case-from", "From PREJECT.EXAMPLE.COM, d=preject.example.com",
           "debian-strict", org="preject.example.com", from_host="PREJECT.EXAMPLE.COM", dkim=True),
    _dmarc("dmarc-dkim-fail-spf-fail", "p=reject; bad DKIM and SPF fail", "debian-strict",
           org="preject.example.com", mail_from="alice@fail.spf.example.org"),
]


def _hdr(name: str, describe: str, build: Builder, quick: bool = False) -> list[Case]:
    return [Case(name, "headers", "debian", describe, build, quick=quick),
            Case(f"{name}@debian-strict", "headers", "debian-strict", describe, build,
                 quick=quick)]  # fmt: skip


HEADER_CASES = [
    *_hdr("hdr-no-from", "no From field", _plain(None), quick=True),  # type: ignore[arg-type]
    *_hdr("hdr-two-from", "two From fields, same domain",
          _plain("Alice <alice@hdr.example.com>", extra_from=["Bob <bob@hdr.example.com>"])),
    *_hdr("hdr-two-from-two-domains", "two From fields, hdr.example.com and preject.example.com",
          _plain("Alice <alice@hdr.example.com>", extra_from=["Eve <eve@preject.example.com>"]),
          quick=True),
    *_hdr("hdr-from-two-domains",
          "one From with mailboxes of hdr.example.com and preject.example.com",
          _plain("Alice <alice@hdr.example.com>, Eve <eve@preject.example.com>")),
    *_hdr("hdr-from-group-empty", "From: undisclosed-recipients:;",
          _plain("undisclosed-recipients:;"), quick=True),
    *_hdr("hdr-from-null", "From: <>", _plain("<>")),
    *_hdr("hdr-from-no-domain", "From: alice (no domain)", _plain("alice")),
    *_hdr("hdr-no-date", "no Date field", _plain("Alice <alice@hdr.example.com>", date=False)),
    *_hdr("hdr-display-name-address", 'From: "eve@preject.example.com" <alice@hdr.example.com>',
          _plain('"eve@preject.example.com" <alice@hdr.example.com>')),
]


def _sign(name: str, describe: str, from_: str, *, client: str | None = None,
          port: Literal["inbound", "submit"] = "submit", signer: str | None = "sign.example.com",
          quick: bool = False) -> Case:  # fmt: skip
    return Case(name, "signing", "tutorial", describe, _plain(from_),
                mail_from=from_.split("<")[-1].rstrip(">"), helo="client.sign.example.com",
                client_ip=client, port=port, signer=signer, quick=quick)  # fmt: skip


SIGNING_CASES = [
    _sign("sign-from-127.0.0.1", "From sign.example.com, client 127.0.0.1 (TrustedHosts line)",
          "Alice <alice@sign.example.com>", quick=True),
    _sign("sign-from-127.0.0.2", "From sign.example.com, client 127.0.0.2 (not listed)",
          "Alice <alice@sign.example.com>", client="127.0.0.2", quick=True),
    _sign("sign-not-in-signing-table", "From other.example.org, client 127.0.0.1",
          "Alice <alice@other.example.org>", signer="other.example.org"),
    _sign("sign-subdomain-not-matched",
          "From news.sign.example.com (SigningTable *@sign.example.com)",
          "Alice <alice@news.sign.example.com>"),
    _sign("sign-from-trusted-cidr", "From sign.example.com, outside client 198.51.100.7 "
          "(TrustedHosts 198.51.100.0/24, refile)", "Alice <alice@sign.example.com>",
          client=TRUSTED_RELAY, port="inbound", quick=True),
    _sign("sign-from-outside", "From sign.example.com, outside client 192.0.2.10 (not listed)",
          "Alice <alice@sign.example.com>", client=GOOD, port="inbound"),
    Case("tutorial-verify-dkim-pass", "signing", "tutorial",
         "inbound valid signature of dkim.example.com through the tutorial set", _signed()),
    Case("tutorial-no-from", "headers", "tutorial", "no From field (RequiredHeaders true)",
         _plain(None)),  # type: ignore[arg-type]
]

CASES: dict[str, Case] = {c.name: c for c in
                          DKIM_CASES + SPF_CASES + DMARC_CASES + HEADER_CASES + SIGNING_CASES}


def select(names: Sequence[str] | None = None, *, quick: bool = False) -> list[Case]:
    """The cases named (``area:`` prefixes and ``*`` wildcards allowed), or the quick subset."""
    if not names:
        return [c for c in CASES.values() if c.quick or not quick]
    chosen: list[Case] = []
    for pattern in names:
        rx = re.compile("^" + re.escape(pattern).replace(r"\*", ".*") + "$")
        hits = [c for c in CASES.values() if rx.match(c.name) or c.area == pattern
                or c.config == pattern.removeprefix("config:")]  # fmt: skip
        if not hits:
            raise KeyError(f"no case matches {pattern!r}")
        chosen += [c for c in hits if c not in chosen]
    return chosen
