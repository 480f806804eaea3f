"""Helpers that several test modules share, kept here so no test module imports another.

- **Pipeline verdicts**: :func:`added` (the values of the fields a verdict adds) and
  :func:`apply` (a verdict's header edits applied the way Postfix applies them).
- **The hostile-input world** (``test_hostile_input``, ``test_hostile_postfix``,
  ``test_dropin``): ``bank.example``, the victim, publishes ``p=reject``, SPF for 203.0.113.5
  only and a DKIM key ``sel``; ``evil.example`` is the attacker's own domain. The zones
  (:func:`core_zones`, :func:`dmarc_zones`), the pytest fixtures ``keys`` and ``world`` (a
  module that uses them imports them by name), message builders (:func:`compose`,
  :func:`dkim_sign`, :func:`signed_by_evil`), one transaction through the pipeline
  (:func:`drive`, :func:`run`), readers of our Authentication-Results (:func:`our_ar`,
  :func:`dmarc_of`, …) and the hostile values (forged Authentication-Results and
  Received-SPF fields, DKIM-Signature tag editing, deeply nested comments). :data:`NOW` is the
  verifier's clock; :func:`refresh_now` re-reads it.
- **DKIM verification** (``test_dkim_verify``, ``test_properties``): :func:`make_message` and
  :class:`NoKeys`, a resolver where no key exists.
- **DMARC** (``test_dmarc``, ``test_properties``): :func:`assert_plausible`, that an author
  domain found in random From text is a host name that really is in the text.
- **End to end** (``test_e2e_dmarc``, ``test_metrics``): :data:`OUTSIDE`, the client address
  the PROXY header claims, and :func:`message`, a plain message as a sender submits it.
- **systemd** (``test_service``, ``test_deploy``): :class:`Notifications`, the socket a
  ``Type=notify`` service reports READY=1 / RELOADING=1 / STOPPING=1 to.
"""

from __future__ import annotations

import base64
import contextlib
import email.policy
import email.utils
import encodings.idna
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import authres
import dkim
import pytest

from authmilter.addresses import AuthorDomain
from authmilter.config import Config
from authmilter.errors import DNSNameNotFound
from authmilter.keys import KeyAlgorithm, PrivateKey, generate_private_key, key_record_text
from authmilter.pipeline import AddHeader, Connection, Context, DeleteHeader, Verdict
from dnsserver import make_zone, txt_rdata
from fakedns import ZoneResolver

# -- pipeline verdicts -----------------------------------------------------------------------


def added(verdict: Verdict, name: str) -> list[str]:
    return [e.value for e in verdict.edits if isinstance(e, AddHeader) and e.name == name]


def apply(message: bytes, verdict: Verdict) -> bytes:
    """Apply a verdict's header edits the way Postfix does, for verification in tests."""
    head, _, body = message.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    for edit in verdict.edits:
        if isinstance(edit, DeleteHeader):
            idx = [i for i, f in enumerate(fields)
                   if f.split(b":", 1)[0].lower() == edit.name.lower().encode()]  # fmt: skip
            del fields[idx[edit.occurrence - 1]]
        else:
            fields.insert(edit.index, f"{edit.name}: {edit.value}".replace("\n", "\r\n").encode())
    return b"\r\n".join(fields) + b"\r\n\r\n" + body


# -- the hostile-input world: the cast -------------------------------------------------------

AID = "example.net"  # our authserv-id
BANK = "bank.example"
EVIL = "evil.example"
IDN = "xn--bnk-qla.example"  # "bänk.example": a look-alike of the victim, no DMARC record
ATTACKER_IP = "198.51.100.25"
HELO = f"mail.{EVIL}"
BOUNCE = f"bounce@{EVIL}"
QID = "4HOSTILE"
NOW = float(int(time.time()))  # the verifier's clock; dkimpy puts the real clock in t=
HOSTILE_BODY = b"Please wire the money today.\r\n"
SIGNED = (b"from", b"to", b"subject", b"date")


def refresh_now() -> None:
    """Re-read the clock: dkimpy signs with the real time, and a value frozen at import goes
    stale (t= "in the future") once the suite has run longer than ClockDrift."""
    global NOW
    NOW = float(int(time.time()))


@dataclass(frozen=True)
class Keys:
    bank: PrivateKey
    evil: PrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(bank=generate_private_key(KeyAlgorithm.RSA, 2048),
                evil=generate_private_key(KeyAlgorithm.RSA, 2048))  # fmt: skip


def core_zones(keys: Keys) -> dict[str, str]:
    """The victim, the attacker and the look-alike (NSD serves the same text end to end)."""
    return {
        BANK: make_zone(BANK, [
            ("@", "TXT", '"v=spf1 ip4:203.0.113.5 -all"'),
            ("_dmarc", "TXT", '"v=DMARC1; p=reject"'),
            ("sel._domainkey", "TXT", txt_rdata(key_record_text(keys.bank))),
        ]),
        EVIL: make_zone(EVIL, [
            ("@", "TXT", '"v=spf1 ip4:198.51.100.0/24 -all"'),
            ("_dmarc", "TXT", '"v=DMARC1; p=none"'),
            ("sel._domainkey", "TXT", txt_rdata(key_record_text(keys.evil))),
            ("mail", "A", ATTACKER_IP),
        ]),
        IDN: make_zone(IDN, [("@", "A", "192.0.2.1")]),
    }  # fmt: skip


#: Hostile DMARC records: domain label → (TXT records at _dmarc, result, policy.dmarc).
DMARC_RECORDS: dict[str, tuple[list[str | bytes], str, str | None]] = {
    # A v=DMARC1 record that is broken is permerror (RFC 7489 §6.6.3, OpenDMARC's reading).
    "garbage-adkim": (["v=DMARC1; p=reject; adkim=q"], "permerror", None),
    "garbage-duplicate": (["v=DMARC1; p=reject; p=none"], "permerror", None),
    "garbage-no-policy": (["v=DMARC1;;; =;p"], "permerror", None),
    # Junk that is not name=value is discarded (RFC 7489 §6.3); the valid p= stands.
    "garbage-binary": ([b"v=DMARC1; p=reject; \xff\xfe\x00junk; \x01"], "fail", "reject"),
    # Not a DMARC record at all (RFC 7489 §6.6.3 step 3: discarded): no policy.
    "garbage-no-separator": (["v=DMARC1 p=reject"], "none", None),
    "garbage-version-case": (["v=dmarc1; p=reject"], "none", None),
    # RFC 7489 §6.6.3 step 5: several records: DMARC is not applied.
    "two-records": (["v=DMARC1; p=none", "v=DMARC1; p=reject"], "none", None),
    # RFC 7489 §6.3: p= must be none/quarantine/reject; with a valid rua it reads as p=none.
    "unknown-p": (["v=DMARC1; p=bogus"], "permerror", None),
    "unknown-p-with-rua": ([f"v=DMARC1; p=bogus; rua=mailto:d@{BANK}"], "fail", "none"),
    # RFC 7489 §6.3: pct is 0..100.
    "pct-999": (["v=DMARC1; p=reject; pct=999"], "permerror", None),
    # RFC 7489 §6.6.3 step 3: a TXT that is not DMARC beside the DMARC one is discarded.
    "non-dmarc-beside": (["v=spf1 -all", "hello world", "v=DMARC1; p=reject"], "fail", "reject"),
}
HUGE_RUA = 10_000
DMARC_HUGE_RUA_TEXT = "v=DMARC1; p=reject; rua=" + ",".join(
    f"mailto:r{i}@huge-rua.example" for i in range(HUGE_RUA))


def dmarc_zones() -> dict[str, str]:
    zones = {f"{label}.example": make_zone(f"{label}.example",
                                           [("_dmarc", "TXT", txt_rdata(r)) for r in records])
             for label, (records, _result, _policy) in DMARC_RECORDS.items()}  # fmt: skip
    # A TXT record of 300 kB cannot travel in DNS (RDATA ≤ 64 KiB); the fake resolver carries it
    # anyway, so the parser's cost is bounded here rather than by the transport.
    zones["huge-rua.example"] = make_zone("huge-rua.example", [
        ("_dmarc", "TXT", txt_rdata(DMARC_HUGE_RUA_TEXT))])  # fmt: skip
    return zones


@dataclass
class World:
    """One resolver for the module and one Context per configuration (Context.build is slow)."""

    keys: Keys
    resolver: ZoneResolver
    contexts: dict[str, Context] = field(default_factory=dict)

    def ctx(self, conf: str = "") -> Context:
        if conf not in self.contexts:
            cfg = Config.from_text(f"AuthservID {AID}\nMode v\n{conf}")
            self.contexts[conf] = Context.build(cfg, resolver=self.resolver, clock=lambda: NOW,
                                                rand=lambda: 0.0)  # fmt: skip
        return self.contexts[conf]

    def key_queries(self, since: int) -> list[str]:
        return [name for name, _type in self.resolver.query_log[since:] if "._domainkey." in name]


@pytest.fixture(scope="module")
def world(keys: Keys) -> World:
    return World(keys, ZoneResolver.from_zones({**core_zones(keys), **dmarc_zones()}))


# -- the hostile-input world: messages -------------------------------------------------------


Header = tuple[str, str | bytes]


def compose(*froms: str | bytes, top: Sequence[Header] = (), extra: Sequence[Header] = (),
            body: bytes | None = HOSTILE_BODY,
            subject: str | bytes = "urgent") -> bytes:  # fmt: skip
    """A message: ``top`` fields, then each From, To, Subject, Date, ``extra``; ``body=None``
    leaves out the blank line and the body (a header-only message)."""
    fields: list[Header] = [*top, *(("From", f) for f in froms), ("To", "user@ours.test"),
                            ("Subject", subject), ("Date", "Mon, 23 Nov 2026 03:00:00 +0000"),
                            *extra]  # fmt: skip
    head = b"".join(name.encode() + b": " + (v if isinstance(v, bytes) else v.encode()) + b"\r\n"
                    for name, v in fields)  # fmt: skip
    return head if body is None else head + b"\r\n" + body


def dkim_sign(raw: bytes, key: PrivateKey, domain: str, *, canon: tuple[bytes, bytes] = (
        b"relaxed", b"simple"), length: bool = False) -> bytes:  # fmt: skip
    """The DKIM-Signature field dkimpy (an independent signer) makes for ``raw``."""
    return bytes(dkim.sign(raw, b"sel", domain.encode(), key.dkimpy_private(),
                           include_headers=list(SIGNED), canonicalize=canon,
                           length=length))  # fmt: skip


def signed_by_evil(raw: bytes, keys: Keys, **kw: object) -> bytes:
    """The attacker signs with the key of the domain it controls (valid d=evil.example)."""
    return dkim_sign(raw, keys.evil, EVIL, **kw) + raw  # type: ignore[arg-type]


def milter_view(raw: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """The header fields as the milter protocol carries them (value with its leading space,
    continuation lines joined by LF) and the body."""
    head, blank, body = raw.partition(b"\r\n\r\n")
    if not blank:
        head, body = raw.removesuffix(b"\r\n"), b""
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n"):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] = (fields[-1][0], fields[-1][1] + b"\n" + line)
            continue
        name, _, value = line.partition(b":")
        fields.append((name.decode("ascii", "surrogateescape"), value))
    return fields, body


def pieces(data: bytes, size: int = 13) -> Iterator[bytes]:
    """Odd-sized body chunks, so CRLF pairs and runs of white space straddle chunk borders."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


def drive(ctx: Context, fields: Iterable[tuple[str, bytes]], chunks: Iterable[bytes], *,
          mail_from: str = BOUNCE, ip: str = ATTACKER_IP) -> Verdict:  # fmt: skip
    """One SMTP transaction through the pipeline, event by event as the adapter feeds it."""
    conn = Connection(ctx, hostname=None, ip=ip)
    conn.set_helo(HELO)
    txn = conn.transaction()
    txn.update_macros({"i": QID})
    txn.envfrom(f"<{mail_from}>")
    assert txn.rcpt("<user@ours.test>").reply is None, "the transaction must reach DATA"
    for name, value in fields:
        txn.header(name, value)
    txn.eoh()
    for chunk in chunks:
        txn.body(chunk)
    verdict = txn.eom()
    # The milter answered: a verdict with its one log line, keyed by the queue id.
    assert isinstance(verdict, Verdict)
    assert verdict.log.startswith(f"{QID}: ") and f"action={verdict.action.value}" in verdict.log
    return verdict


def run(ctx: Context, raw: bytes, **kw: str) -> Verdict:
    fields, body = milter_view(raw)
    return drive(ctx, fields, pieces(body), **kw)


# -- the hostile-input world: reading the verdict --------------------------------------------


def our_ar(source: Verdict | str) -> authres.AuthenticationResultsHeader:
    """Our one Authentication-Results field, parsed (RFC 8601, with the DMARC method), from a
    verdict or from the field's value as delivered."""
    if isinstance(source, Verdict):
        (source,) = added(source, "Authentication-Results")
    parsed = authres.all_features().parse_value(" ".join(source.split()))
    assert parsed.authserv_id == AID
    return parsed


def dmarc_of(source: Verdict | str) -> tuple[str, str | None]:
    """(result, header.from) of our dmarc= clause."""
    (clause,) = [r for r in our_ar(source).results if r.method == "dmarc"]
    return str(clause.result), clause.header_from


def dkim_of(source: Verdict | str) -> list[tuple[str, str | None]]:
    return [(str(r.result), r.header_d) for r in our_ar(source).results if r.method == "dkim"]


def spf_of(source: Verdict | str) -> tuple[str, str | None]:
    (clause,) = [r for r in our_ar(source).results if r.method == "spf"]
    return str(clause.result), clause.smtp_mailfrom


def assert_no_pass_for_bank(source: Verdict | str) -> None:
    """The key property: never dmarc=pass (or a DKIM pass) for a domain the attacker lacks."""
    result, header_from = dmarc_of(source)
    assert not (result == "pass" and header_from != EVIL), (result, header_from)
    assert ("pass", BANK) not in dkim_of(source)


# -- the hostile-input world: hostile values -------------------------------------------------


def nested_comments(depth: int) -> str:
    """``depth`` nested comments, folded into lines of 70 characters (FWS is allowed there)."""
    text = "(" * depth + ")" * depth
    return "\r\n ".join(text[i : i + 70] for i in range(0, len(text), 70))


# (value of an incoming A-R, whether it claims our authserv-id "example.net"). RFC 8601 §2.2:
# authres-payload = [CFWS] authserv-id [CFWS authres-version] …; authserv-id is an RFC 2045
# value (token or quoted-string), compared case-insensitively. §5: one that claims our id is
# a forgery and must go, whatever it says.
INJECTED_AR: list[tuple[str, str, bool]] = [
    ("our-id", f"{AID}; dkim=pass header.d={BANK}; dmarc=pass header.from={BANK}", True),
    ("upper-case", f"{AID.upper()}; dmarc=pass header.from={BANK}", True),
    ("unbalanced-comment", f"{AID}(.example.com; dkim=pass header.d={BANK}", True),
    ("absolute-name", f"{AID}.; dkim=pass header.d={BANK}", True),
    ("comment-before-id", f"(trust me) {AID}; dkim=pass header.d={BANK}", True),
    ("quoted-id", f'"{AID}"; dmarc=pass header.from={BANK}', True),
    ("quoted-pair-id", '"exa\\mple.net"; dmarc=pass header.from=' + BANK, True),
    ("version-1", f"{AID} 1; dkim=pass header.d={BANK}", True),
    ("unknown-version", f"{AID} 2; dkim=pass header.d={BANK}", True),
    ("job-id-form", f"{AID}/4BqFORGED; dmarc=pass header.from={BANK}", True),
    ("no-results", f"{AID}; none", True),
    ("unparseable", f"{AID}; dkim=pass dmarc", True),
    ("folded", f"{AID};\n\tdkim=pass header.d={BANK}", True),
    ("suffix-look-alike", f"{AID}.evil.example; dkim=pass header.d={BANK}", False),
    ("prefix-look-alike", f"x{AID}; dkim=pass header.d={BANK}", False),
    ("our-name-as-property", f"{EVIL}; dkim=pass header.d={AID}", False),
    ("our-name-in-comment-after", f"{EVIL} ({AID}); dkim=pass header.d={BANK}", False),
]


def ar_fields(values: Iterable[str]) -> list[Header]:
    return [("Authentication-Results", v.replace("\n", "\r\n")) for v in values]


def field_values(message: bytes, name: str) -> list[str]:
    head = message.partition(b"\r\n\r\n")[0].decode("utf-8", "surrogateescape")
    fields = re.finditer(rf"(?im)^{name}:[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head)
    return [m.group(1) for m in fields]


# (value, whether its receiver= is our authserv-id: a claim to be our own SPF result).
FORGED_SPF: list[tuple[str, str, bool]] = [
    ("our-receiver", f"Pass (mailfrom) identity=mailfrom; client-ip=203.0.113.5; "
                     f"helo=mail.{BANK}; envelope-from=ceo@{BANK}; receiver={AID}", True),
    ("upper-case-receiver", f"pass ({AID}: domain of ceo@{BANK} designates 203.0.113.5 as "
                            f"permitted sender) client-ip=203.0.113.5; envelope-from=ceo@{BANK}; "
                            f"receiver={AID.upper()};", True),
    # RFC 7208 §9.1: a value is a dot-atom or a quoted-string; both mean the same.
    ("quoted-receiver", f'Pass receiver="{AID}"; identity=mailfrom; envelope-from="ceo@{BANK}"',
     True),
    ("other-receiver", "Pass (mailfrom) identity=mailfrom; client-ip=203.0.113.5; "
                       "receiver=mx.upstream.example", False),
    ("suffix-look-alike", f"Pass (mailfrom) identity=mailfrom; receiver={AID}.{EVIL}", False),
    ("prefix-look-alike", f"Pass (mailfrom) identity=mailfrom; receiver=x{AID}", False),
    ("absolute-name", f"Pass (mailfrom) identity=mailfrom; receiver={AID}.", True),
    ("no-receiver", f"Pass (mailfrom) identity=mailfrom; envelope-from=ceo@{BANK}", False),
    ("receiver-only-in-comment", f"Pass (receiver={AID}) identity=mailfrom; "
                                 "receiver=mx.upstream.example", False),
]  # fmt: skip


def receiver_of(value: str) -> str | None:
    while re.search(r"\([^()]*\)", value):
        value = re.sub(r"\([^()]*\)", " ", value)  # comments (RFC 5322 CFWS) name nobody
    m = re.search(r'receiver\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]+)', value)
    return m.group(1).strip('"').lower().rstrip(".") if m else None


Tags = list[tuple[str, str]]
Mutation = Callable[[Tags], Tags]


def sig_tags(field_bytes: bytes) -> Tags:
    """The tags of a DKIM-Signature field, values as written (inner white space kept)."""
    value = field_bytes.split(b":", 1)[1].decode().replace("\r\n", "")
    specs = [s for s in value.split(";") if s.strip()]
    return [(n.strip(), v.strip()) for n, _, v in (s.partition("=") for s in specs)]


def sig_field(tags: Tags) -> bytes:
    return ("DKIM-Signature: " + "; ".join(f"{n}={v}" for n, v in tags) + "\r\n").encode()


def set_tag(name: str, value: str | Callable[[str], str]) -> Mutation:
    return lambda tags: [(n, (value(v) if callable(value) else value) if n == name else v)
                         for n, v in tags]  # fmt: skip


def garbage_signatures(count: int) -> bytes:
    bh, b = base64.b64encode(bytes(32)).decode(), base64.b64encode(bytes(8)).decode()
    return b"".join(f"DKIM-Signature: v=1; a=rsa-sha256; d={BANK}; s=s{i}; h=from; bh={bh}; "
                    f"b={b}\r\n".encode() for i in range(count))  # fmt: skip


# -- DKIM verification -----------------------------------------------------------------------

DKIM_BODY = b"Hello Bob,\r\n\r\nthe  quarterly   numbers are attached.\t \r\n-- \r\nAlice\r\n"


def make_message(
    *,
    from_: str = "Alice <alice@example.test>",
    subject: str = "Quarterly numbers",
    body: bytes = DKIM_BODY,
    extra: Sequence[str] = (),
) -> bytes:
    """A plain message with CRLF line ends, as the milter reassembles it."""
    lines = [
        f"From: {from_}",
        "To: Bob <bob@example.net>",
        f"Subject: {subject}",
        "Date: Mon, 04 Mar 2024 10:00:00 +0000",
        "Message-ID: <20240304100000.1@example.test>",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class NoKeys:
    """A resolver where no key exists (NXDOMAIN for every name)."""

    def txt(self, name: str) -> list[bytes]:
        raise DNSNameNotFound(f"{name} TXT: no such domain (NXDOMAIN)")


# -- DMARC -----------------------------------------------------------------------------------

_HOSTNAME = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9-]*[a-z-][a-z0-9-]*\Z")


def assert_plausible(value: str, author: AuthorDomain) -> None:
    assert author.domain is not None
    domain = author.domain
    assert len(domain) <= 253
    assert _HOSTNAME.match(domain), domain
    assert "@" in value
    lowered = value.lower()
    for label in domain.split("."):
        unicode_label = encodings.idna.ToUnicode(label) if label.startswith("xn--") else label
        assert label in lowered or unicode_label in lowered, (label, value)


# -- end to end ------------------------------------------------------------------------------

OUTSIDE = "198.51.100.25"  # a client the PROXY header claims; in relay.test's SPF only


def message(from_: str, subject: str, *, extra_from: str | None = None) -> bytes:
    """A plain message as a sender submits it (CRLF line ends); ``extra_from`` is a second
    From field put on top."""
    msg = EmailMessage()
    msg["From"] = from_
    msg["To"] = "user@ours.test"
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = email.utils.make_msgid(domain="sender.test")
    msg.set_content("Please wire the money today.\n")
    raw = msg.as_bytes(policy=email.policy.SMTP)
    if extra_from:
        raw = f"From: {extra_from}\r\n".encode() + raw
    return raw


# -- systemd's side of Type=notify (test_service, test_deploy) -----------------------------


def only_signature(delivered: bytes, dnsfunc: Callable[..., bytes]) -> tuple[str, str]:
    """(d=, s=) of the one DKIM-Signature of a delivered message, after checking there is
    exactly one and that dkimpy verifies it with ``dnsfunc`` (its key-record lookup)."""
    assert len(re.findall(rb"^DKIM-Signature:", delivered, re.M)) == 1, delivered[:1500]
    assert dkim.verify(delivered, dnsfunc=dnsfunc), delivered.decode(errors="replace")[:2000]
    field = re.search(rb"^DKIM-Signature:(.*?)\r?\n(?![ \t])", delivered, re.M | re.S)
    assert field is not None
    tags = dict(re.findall(r"\b([ds])=([^;\s]+)", field.group(1).decode()))
    return tags["d"], tags["s"]


class Notifications:
    """systemd's side of ``Type=notify``: a datagram socket named by ``NOTIFY_SOCKET``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[str] = []
        self.seen = 0

    def wait(self, state: str, timeout: float = 30.0) -> list[str]:
        """Wait for a message holding the line ``state``, among those not yet waited for;
        returns all received so far."""
        deadline = time.monotonic() + timeout
        while not any(state in m.splitlines() for m in self.received[self.seen:]):
            left = deadline - time.monotonic()
            assert left > 0, f"no {state!r} from the service; got {self.received}"
            self.sock.settimeout(left)
            with contextlib.suppress(TimeoutError):
                self.received.append(self.sock.recv(4096).decode())
        self.seen = next(i for i in range(self.seen, len(self.received))
                         if state in self.received[i].splitlines()) + 1  # fmt: skip
        return self.received


def recording_zones() -> dict[str, str]:
    """The zones of the DMARC-recording tests through Postfix: good.test (``p=none``, SPF
    allows 198.51.100.0/24, where OUTSIDE is) and spoofed.test (``p=reject``, SPF elsewhere),
    both with an rua."""
    return {
        "good.test": make_zone("good.test", [
            ("@", "TXT", '"v=spf1 ip4:198.51.100.0/24 -all"'),
            ("_dmarc", "TXT", '"v=DMARC1; p=none; rua=mailto:agg@good.test"'),
        ]),
        "spoofed.test": make_zone("spoofed.test", [
            ("@", "TXT", '"v=spf1 ip4:203.0.113.5 -all"'),
            ("_dmarc", "TXT", '"v=DMARC1; p=reject; rua=mailto:agg@spoofed.test"'),
        ]),
    }  # fmt: skip
