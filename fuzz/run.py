#!/usr/bin/env python3
"""Fuzz the whole pipeline: mutated messages through Connection/Transaction, sign and verify.

A seeded mutator starts from a corpus of real messages (unsigned, signed by dkimpy with RSA and
Ed25519 keys, with l=, i=, every canonicalization, forged and trusted Authentication-Results)
and changes each input 1-4 times: flips and inserts bytes (NUL, CR, LF, 8-bit), duplicates,
drops and reorders header fields, splices DKIM-Signature tags, swaps in hostile From values,
adds huge lines, re-ends body lines. Each input also gets a random SMTP envelope (client address
and name, HELO, MAIL FROM, recipients, SMTP AUTH and daemon macros, header leading-space
negotiation) and one of several configurations, and is driven exactly as the milter adapter
drives it: connect, helo, envfrom, rcpt…, header…, eoh, body chunks, eom (sometimes an abort and
a second message on the same connection). DNS answers come from an in-process zone
(tests/fakedns.py) holding DKIM keys, SPF and DMARC records and SERVFAIL/timeout/malformed
markers, so every result is reachable: pass, fail, policy, neutral, none, permerror, temperror.

A failure is any exception escaping the pipeline, or a verdict the adapter could not apply
(a header value or SMTP reply pymilter cannot send: NUL, a bare CR or LF, a lone surrogate; a
header name that is not a field name; a malformed reply code), a log line with a line break, or
a clean message that we signed and our own verifier does not pass. Each failure is written to
``fuzz/crashes/<hash>.json`` (``--replay FILE`` runs it again) and the run exits 1.

    fuzz/run.py [--seconds 300] [--max-inputs N] [--seed N] [--replay FILE]

Prints inputs tried, inputs/s, failures, and the breakdown of actions and results.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import random
import re
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "milter")]

import dkim  # noqa: E402

from authmilter.addresses import FromStatus, author_domain  # noqa: E402
from authmilter.config import Action, Config  # noqa: E402
from authmilter.dkim_verify import verify_message  # noqa: E402
from authmilter.keys import (  # noqa: E402
    KeyAlgorithm,
    PrivateKey,
    generate_private_key,
    key_record_text,
)
from authmilter.pipeline import (  # noqa: E402
    AddHeader,
    Connection,
    Context,
    DeleteHeader,
    Reply,
    Verdict,
)
from authmilter.results import DkimResult  # noqa: E402
from dnsserver import make_zone, txt_rdata  # noqa: E402
from fakedns import ZoneResolver, failure_marker  # noqa: E402

CRASH_DIR = ROOT / "fuzz" / "crashes"
AID = "mx.fuzz.test"
OURS = "example.com"
REMOTE = "remote.test"

Field = tuple[str, bytes]  # name, value as on the wire after the colon (CRLF folding kept)


# -- the world: keys, zones, configurations ---------------------------------------------------


@dataclass
class World:
    """Everything built once: keys on disk, the zone resolver, one Context per profile."""

    keys: dict[str, PrivateKey]
    resolver: ZoneResolver
    contexts: list[Context]
    corpus: list[tuple[list[Field], bytes]]
    now: float


def _zones(keys: dict[str, PrivateKey]) -> dict[str, str]:
    def dkim_txt(name: str, **kw: Any) -> str:
        return txt_rdata(key_record_text(keys[name], **kw))

    return {
        OURS: make_zone(OURS, [
            ("rsa._domainkey", "TXT", dkim_txt("ours")),
            ("ed._domainkey", "TXT", dkim_txt("ours_ed")),
            ("@", "TXT", txt_rdata("v=spf1 ip4:10.0.0.0/8 ip4:203.0.113.0/24 -all")),
            ("_dmarc", "TXT", txt_rdata("v=DMARC1; p=reject; rua=mailto:d@example.com")),
        ]),
        REMOTE: make_zone(REMOTE, [
            ("sel._domainkey", "TXT", dkim_txt("remote")),
            ("ed._domainkey", "TXT", dkim_txt("remote_ed")),
            ("weak._domainkey", "TXT", dkim_txt("weak")),
            ("testing._domainkey", "TXT", dkim_txt("remote", testmode=True)),
            ("strict._domainkey", "TXT", dkim_txt("remote", no_subdomains=True)),
            ("revoked._domainkey", "TXT", txt_rdata("v=DKIM1; k=rsa; p=")),
            ("junk._domainkey", "TXT", txt_rdata("v=DKIM1; p=not*base64")),
            ("broken._domainkey", "TXT", failure_marker("SERVFAIL")),
            ("slow._domainkey", "TXT", failure_marker("TIMEOUT")),
            ("bad._domainkey", "TXT", failure_marker("MALFORMED")),
            ("@", "TXT", txt_rdata("v=spf1 ip4:198.51.100.0/24 ~all")),
            ("@", "MX", "10 mx"),
            ("mx", "A", "198.51.100.25"),
            ("_dmarc", "TXT", txt_rdata("v=DMARC1; p=quarantine; pct=50; adkim=r")),
            ("sub", "TXT", txt_rdata("v=spf1 a:mx.remote.test -all")),
        ]),
        "strict.test": make_zone("strict.test", [
            ("@", "TXT", txt_rdata("v=spf1 ip4:203.0.113.5 -all")),
            ("_dmarc", "TXT", txt_rdata("v=DMARC1; p=reject; aspf=s; adkim=s; sp=none")),
        ]),
        "perm.test": make_zone("perm.test", [
            ("@", "TXT", txt_rdata("v=spf1 include:nothing.perm.test -all")),
            ("@", "TXT", txt_rdata("v=spf1 -all")),
            ("_dmarc", "TXT", txt_rdata("v=DMARC1; p=bogus")),
        ]),
        "broken.test": make_zone("broken.test", [
            ("@", "TXT", failure_marker("TIMEOUT")),
            ("_dmarc", "TXT", failure_marker("SERVFAIL")),
        ]),
        "none.test": make_zone("none.test", [("@", "A", "192.0.2.1")]),
        "neutral.test": make_zone("neutral.test", [
            ("@", "TXT", txt_rdata("v=spf1 ?all")),
            ("_dmarc", "TXT", txt_rdata("v=DMARC1; p=none; t=y")),
        ]),
        # The parents, so that a DMARC tree walk or a name outside the zones above gets
        # NXDOMAIN, as from real DNS, instead of the fake's REFUSED (a temperror).
        "test": make_zone("test"),
        "com": make_zone("com"),
    }  # fmt: skip


#: Configurations the inputs rotate through (appended to the key tables and AuthservID).
PROFILES = [
    "",
    "\n".join([
        "MultipleSignatures yes", "Canonicalization relaxed/relaxed", "SignatureTTL 3600",
        "AlwaysAddARHeader yes", "AuthservIDWithJobID yes", "NoHeaderB yes",
        "RejectFailures yes", "HoldQuarantinedMessages yes", "On-BadSignature reject",
        "On-KeyNotFound tempfail", "TrustedAuthservIDs border.fuzz.test",
        "RemoveARFrom .fuzz.test", "RejectMultiValueFrom yes", "MaximumSignaturesToVerify 0",
        "TestOnly 0", "Mail_From_reject Softfail", "HELO_reject SPF_Not_Pass",
        "PermError_reject true", "TempError_Defer true", "MaximumHeaders 8192",
    ]),
    "\n".join([
        "Mode v", "OrganizationalDomainMethod treewalk", "SPFIgnoreResults yes",
        "MinimumKeyBits 2048", "ClockDrift 0", "Header_Type AR", "On-Default quarantine",
        "RequiredHeaders yes", "SPFSelfValidate yes", "IgnoreMailFrom strict.test",
    ]),
    "\n".join([
        "Canonicalization simple/simple", "OversignHeaders From,Subject,To", "On-NoSignature d",
        "SignHeaders *,+X-Fuzz", "On-SignatureError tempfail", "Hide_Receiver yes",
        "Skip_Addresses 127.0.0.0/8", "Whitelist 192.0.2.128/25", "RemoveARAll yes",
    ]),
]  # fmt: skip


def build_world(tmp: Path, now: float) -> World:
    keys = {
        "ours": generate_private_key(KeyAlgorithm.RSA, 2048),
        "ours_ed": generate_private_key(KeyAlgorithm.ED25519),
        "remote": generate_private_key(KeyAlgorithm.RSA, 2048),
        "remote_ed": generate_private_key(KeyAlgorithm.ED25519),
        "weak": generate_private_key(KeyAlgorithm.RSA, 1024),
    }
    for name in ("ours", "ours_ed"):
        path = tmp / f"{name}.private"
        path.write_bytes(keys[name].pem())
        path.chmod(0o600)
    (tmp / "key.table").write_text(
        f"rsa {OURS}:rsa:{tmp}/ours.private\ned {OURS}:ed:{tmp}/ours_ed.private\n"
        f"sub {OURS}:rsa:{tmp}/ours.private\n")
    (tmp / "signing.table").write_text(f"*@{OURS} rsa\n*@{OURS} ed\n*@*.{OURS} sub\n")
    resolver = ZoneResolver.from_zones(_zones(keys))
    contexts = []
    for extra in PROFILES:
        cfg = Config.from_text(
            f"KeyTable file:{tmp}/key.table\nSigningTable refile:{tmp}/signing.table\n"
            f"AuthservID {AID}\nInternalHosts 127.0.0.1, 10.0.0.0/8\n{extra}\n",
            path="fuzz.conf")  # fmt: skip
        contexts.append(Context.build(cfg, resolver=resolver, clock=lambda: now,
                                      rand=_RAND.random))  # fmt: skip
    return World(keys, resolver, contexts, build_corpus(keys), now)


#: The source of pct= sampling; reseeded for every input so a replay decides the same.
_RAND = random.Random(0)


# -- the corpus -------------------------------------------------------------------------------


BODY = b"Hello,\r\n\r\nthe numbers are attached.\r\n  indented line \t\r\n\r\n\r\n"


def _message(from_: str, *, extra: Iterable[str] = (), body: bytes = BODY) -> bytes:
    lines = [f"From: {from_}", "To: Bob <bob@example.net>", "Subject: quarterly numbers",
             "Date: Mon, 23 Nov 2026 03:00:00 +0000", "Message-ID: <1@fuzz.test>", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body  # fmt: skip


def _dkim_sign(message: bytes, key: PrivateKey, selector: str, domain: str, **kw: Any) -> bytes:
    algorithm = b"ed25519-sha256" if key.algorithm is KeyAlgorithm.ED25519 else b"rsa-sha256"
    signature: bytes = dkim.sign(message, selector.encode(), domain.encode(),
                                 key.dkimpy_private(), signature_algorithm=algorithm,
                                 include_headers=[b"from", b"to", b"subject", b"date"], **kw)
    return signature + message


def split(message: bytes) -> tuple[list[Field], bytes]:
    """Header fields (value after the colon, CRLF folding kept) and body."""
    head, _, body = message.partition(b"\r\n\r\n")
    fields: list[Field] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
        else:
            name_b, _, value = line.partition(b":")
            fields.append((name_b.decode("ascii", "surrogateescape"), value))
    return fields, body


def build_corpus(keys: dict[str, PrivateKey]) -> list[tuple[list[Field], bytes]]:
    remote, ours = f"Carol <carol@{REMOTE}>", f"Alice <alice@{OURS}>"
    messages = [
        _message(ours), _message(f"dave@sub.{OURS}"), _message(f"carol@{REMOTE}"),
        _message("eve@strict.test"), _message("x@perm.test"), _message("y@broken.test"),
        _message("z@none.test"), _message("n@neutral.test"),
        _message(f"a@{REMOTE}, b@strict.test"),
        _message(f"undisclosed:; , {remote}"), _message("=?utf-8?q?J=C3=B6rg?= <j@remote.test>"),
        _message(remote, body=b""), _message(remote, body=b"no final newline"),
        _message(remote, body=b"bare\nline feeds\n\n"),
        _message(remote, body=b"8-bit \xe9\xff\r\n"),
        _message(remote, extra=[f"Authentication-Results: {AID}; dkim=pass header.d=bank.test"]),
        _message(remote, extra=["Authentication-Results: border.fuzz.test; dkim=pass "
                                f"header.d={REMOTE}; spf=pass smtp.mailfrom=c@{REMOTE}"]),
        _message(remote, extra=["Authentication-Results: other.fuzz.test; none"]),
    ]  # fmt: skip
    signed = [
        _dkim_sign(_message(remote), keys["remote"], "sel", REMOTE),
        _dkim_sign(_message(remote), keys["remote_ed"], "ed", REMOTE),
        _dkim_sign(_message(remote), keys["remote"], "sel", REMOTE, length=True,
                   canonicalize=(b"relaxed", b"relaxed"), identity=f"@sub.{REMOTE}".encode()),
        _dkim_sign(_message(remote), keys["remote"], "testing", REMOTE,
                   canonicalize=(b"simple", b"simple")),
        _dkim_sign(_message(remote), keys["weak"], "weak", REMOTE),
        _dkim_sign(_message(remote), keys["remote"], "strict", REMOTE,
                   identity=f"@sub.{REMOTE}".encode()),
        _dkim_sign(_message(ours), keys["ours"], "rsa", OURS),
        _dkim_sign(_message(ours), keys["ours_ed"], "ed", OURS),
        _dkim_sign(_message("eve@strict.test"), keys["remote"], "sel", REMOTE),
    ]  # fmt: skip
    for selector in ("revoked", "junk", "broken", "slow", "bad", "missing"):
        signed.append(_dkim_sign(_message(remote), keys["remote"], selector, REMOTE))
    signed.append(_dkim_sign(signed[0], keys["remote_ed"], "ed", REMOTE))  # two signatures
    return [split(m) for m in messages + signed]


# -- one input --------------------------------------------------------------------------------


@dataclass
class Case:
    """One input: profile, SMTP envelope, header fields, body and how it is delivered."""

    profile: int
    ip: str | None
    hostname: str | None
    helo: str | None
    mail_from: str
    rcpts: list[str]
    macros: dict[str, str]
    leading_space: bool
    fields: list[Field]
    body: bytes
    chunk: int  # body chunk size
    abort_after: int | None = None  # abort the first message after this many chunks, then resend
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["fields"] = [[n, base64.b64encode(v).decode()] for n, v in self.fields]
        data["body"] = base64.b64encode(self.body).decode()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Case:
        data = dict(data)
        data["fields"] = [(n, base64.b64decode(v)) for n, v in data["fields"]]
        data["body"] = base64.b64decode(data["body"])
        return cls(**data)


IPS = ["198.51.100.25", "203.0.113.5", "192.0.2.99", "192.0.2.200", "10.1.2.3", "127.0.0.1",
       "2001:db8::25", "::ffff:198.51.100.25", "fe80::1%eth0", None, "not an address", ""]
HOSTNAMES = [None, "client.example", "mx.remote.test", "[198.51.100.25]", "unknown", "",
             "h\udcffst.test", "a;b c"]
HELOS = [None, "mx.remote.test", "mail.strict.test", "client.relay.test", "[192.0.2.1]", "",
         "x@y.test;dkim=pass header.d=bank.test", "h\udce9lo.test", "a b (c", "localhost",
         "perm.test", "broken.test", "..", "-.test"]  # fmt: skip
MAIL_FROMS = ["<>", "<carol@remote.test>", "<alice@example.com>", "<eve@strict.test>",
              "<x@perm.test>", "<y@broken.test>", "<z@none.test>", "<n@neutral.test>",
              '<"q p;dkim=pass"@remote.test>',
              "<a b@remote.test;dkim=pass header.d=bank.test>", "<c\udce9@remote.test>",
              "<@route.test:carol@remote.test>", "carol@remote.test", "<", "<x@>",
              "<postmaster>", "<a@b@c.test>", "<j\u00f6rg@remote.test>"]  # fmt: skip
MACROS = [{}, {"auth_type": "PLAIN", "auth_authen": "alice"}, {"daemon_name": "ORIGINATING"},
          {"i": ""}, {"i": "4BqFUZZ%s"}, {"auth_authen": "bob\udcff"}]  # fmt: skip

FROM_VALUES = [
    "a@remote.test, b@remote.test", "a@remote.test, b@strict.test", "group: a@remote.test;",
    "empty-group:;", "", " ", "<>", "x", "\"a@strict.test\" <b@remote.test>",
    "(a@strict.test) b@remote.test", "a@[192.0.2.1]", "a@remote.test.", "a@xn--mnchen-3ya.test",
    "a@münchen.test", "a@REMOTE.TEST", "a@sub.example.com", "alice@evil.test (\r.example.com)",
    "=?utf-8?b?YUBzdHJpY3QudGVzdA==?= <c@remote.test>", "a@remote .test", "a.@remote.test",
    "<a@remote.test", "a@remote.test>", "\"unterminated <a@remote.test>", "a@b@c.test",
    "alice@example.com\r\n (comment)", "\udcff@remote.test", "a@" + "l" * 70 + ".test",
    "(" * 3000 + "x" + ")" * 3000 + " a@remote.test", "a@remote.test " + "(" * 5000,
    "alice@evil.test (x).example.com", "a@example.com\n.evil.test",
]  # fmt: skip
AR_VALUES = [
    f"{AID}; dkim=pass header.d=bank.test", f"{AID.upper()}; spf=pass", f"sub{AID}; none",
    "border.fuzz.test; dkim=pass header.d=strict.test; spf=pass smtp.mailfrom=x@strict.test",
    "border.fuzz.test; spf=fail smtp.mailfrom=", "border.fuzz.test (c; dkim=pass",
    f'"{AID}"; dkim=pass', f"(comment) {AID}; dmarc=pass", "i=1; x; y", ";", "", "\x00",
    "(" * 3000 + f"{AID}; dkim=pass", f"border.fuzz.test; dkim=pass header.d=x.test {'(' * 3000}",
]  # fmt: skip
TAG_VALUES = {
    "v": ["1", "2", ""], "a": ["rsa-sha256", "ed25519-sha256", "rsa-sha1", "hmac", ""],
    "c": ["relaxed/relaxed", "simple", "relaxed/", "x/y", ""],
    "d": [REMOTE, OURS, "strict.test", "sub.remote.test", "nx.test", ".", "a..b", "x" * 300],
    "s": ["sel", "ed", "broken", "slow", "bad", "revoked", "junk", "weak", "testing", "nx", ""],
    "h": ["from", "from:to:subject", "to", "from:from:from", "from : to", ":", ""],
    "l": ["0", "1", "10", "999999999", "-1", "1" * 80], "t": ["0", str(2**40), "x", ""],
    "x": ["1", str(2**40), "", "9" * 13], "i": [f"@{REMOTE}", f"a@sub.{REMOTE}", "@other.test",
                                                 "a(@remote.test", '"@remote.test', "no-at"],
    "q": ["dns/txt", "dns", ""],
    "bh": ["", "AAAA", "not base64!", "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="],
    "b": ["", "AAAA", "====", "a" * 500], "z": ["From:a@b|To:c", "x"], "zz": ["1", "(" * 3000],
}  # fmt: skip


class Mutator:
    """Seeded structural and byte-level mutations of a corpus message."""

    def __init__(self, rng: random.Random, corpus: list[tuple[list[Field], bytes]]) -> None:
        self.rng = rng
        self.corpus = corpus

    def case(self, seed: int, profiles: int) -> Case:
        rng = self.rng
        rng.seed(seed)
        fields, body = rng.choice(self.corpus)
        fields = list(fields)
        for _ in range(rng.choice([0, 1, 1, 2, 3, 4])):
            fields, body = rng.choice(self.MUTATIONS)(self, fields, body)
        return Case(
            profile=rng.randrange(profiles), ip=rng.choice(IPS), hostname=rng.choice(HOSTNAMES),
            helo=rng.choice(HELOS), mail_from=rng.choice(MAIL_FROMS),
            rcpts=rng.choice([["<bob@example.net>"], ["<a@x.test>", "<b@y.test>"], ["x"]]),
            macros={"i": f"Q{seed:08X}", **rng.choice(MACROS)} if rng.random() < 0.9 else {},
            leading_space=rng.random() < 0.8, fields=fields, body=body,
            # Postfix and Sendmail send up to 64 KiB per chunk; tiny chunks on small bodies.
            chunk=rng.choice([1, 7, 64, 65535]) if len(body) < 4096 else 65535,
            abort_after=rng.choice([None] * 9 + [0, 1]), seed=seed,
        )  # fmt: skip

    # Each mutation takes and returns (fields, body).

    def flip_byte(self, fields: list[Field], body: bytes) -> tuple[list[Field], bytes]:
        if fields and self.rng.random() < 0.7:
            i = self.rng.randrange(len(fields))
            name, value = fields[i]
            fields[i] = (name, _flip(self.rng, value))
            return fields, body
        return fields, _flip(self.rng, body)

    def insert_special(self, fields: list[Field], body: bytes) -> tuple[list[Field], bytes]:
        special = self.rng.choice([b"\x00", b"\r", b"\n", b"\r\n", b"\r\n ", b"\xff", b"\xc3",
                                   b";", b"=", b":", b"(", b'"', b"\\", b"@", b"\t", b" "])
        if fields and self.rng.random() < 0.8:
            i = self.rng.randrange(len(fields))
            name, value = fields[i]
            at = self.rng.randrange(len(value) + 1)
            fields[i] = (name, value[:at] + special + value[at:])
            return fields, body
        at = self.rng.randrange(len(body) + 1)
        return fields, body[:at] + special + body[at:]

    def duplicate_field(self, fields: list[Field], body: bytes) -> tuple[list[Field], bytes]:
        if fields:
            f = self.rng.choice(fields)
            fields.insert(self.rng.randrange(len(fields) + 1), f)
        return fields, body

    def drop_field(self, fields: list[Field], body: bytes) -> tuple[list[Field], bytes]:
        if fields:
            del fields[self.rng.randrange(len(fields))]
        return fields, body

    def reorder(self, fields: list[Field], body: bytes) -> tuple[list[Field], bytes]:
        self.rng.shuffle(fields)
        return fields, body

    def splice_dkim_tag(self, fields: list[Field], body: bytes) -> tuple[list[Field], bytes]:
        sigs = [i for i, (n, _) in enumerate(fields) if n.lower() == "dkim-signature"]
        if not sigs:
            return self.other_signature(fields, body)
        i = self.rng.choice(sigs)
        tags = fields[i][1].split(b";")
        name = self.rng.choice(list(TAG_VALUES))
        new = f" {name}={self.rng.choice(TAG_VALUES[name])}".encode()
        op = self.rng.randrange(4)
        at = self.rng.randrange(len(tags))
        if op == 0:
            tags.insert(at, new)  # maybe a duplicate tag
        elif op == 1:
            del tags[at]
        elif op == 2:
            tags[at] = new
        else:
            tags = [t for t in tags if not t.strip().startswith(name.encode() + b"=")] + [new]
        fields[i] = (fields[i][0], b";".join(tags))
        return fields, body

    def other_signature(self, fields: list[Field], body: bytes) -> tuple[list[Field], bytes]:
        donor, _ = self.rng.choice(self.corpus)
        sigs = [f for f in donor if f[0].lower() == "dkim-signature"]
        if sigs:
            fields.insert(self.rng.randrange(len(fields) + 1), self.rng.choice(sigs))
        return fields, body

    def hostile_from(self, fields: list[Field], body: bytes) -> tuple[list[Field], bytes]:
        value = (" " + self.rng.choice(FROM_VALUES)).encode("utf-8", "surrogateescape")
        froms = [i for i, (n, _) in enumerate(fields) if n.lower() == "from"]
        if froms and self.rng.random() < 0.7:
            fields[self.rng.choice(froms)] = ("From", value)
        else:
            fields.insert(self.rng.randrange(len(fields) + 1), ("From", value))
        return fields, body

    def authentication_results(self, fields: list[Field], body: bytes) -> tuple[list[Field], bytes]:
        value = (" " + self.rng.choice(AR_VALUES)).encode()
        fields.insert(self.rng.randrange(len(fields) + 1), ("Authentication-Results", value))
        return fields, body

    def odd_name(self, fields: list[Field], body: bytes) -> tuple[list[Field], bytes]:
        if fields:
            i = self.rng.randrange(len(fields))
            name = self.rng.choice([fields[i][0].upper(), fields[i][0] + " ", "", "X\udcff",
                                    fields[i][0].lower(), "From\x00", "a" * 300])  # fmt: skip
            value = fields[i][1]
            fields[i] = (name, value.lstrip(b" ") if self.rng.random() < 0.3 else value)
        return fields, body

    def huge_line(self, fields: list[Field], body: bytes) -> tuple[list[Field], bytes]:
        blob = self.rng.choice([b"x", b"ab ", b"\t", b"=?utf-8?q?", b"a@b."]) * self.rng.choice(
            [1000, 20000, 100_000])
        if self.rng.random() < 0.5:
            fields.insert(self.rng.randrange(len(fields) + 1), ("X-Huge", b" " + blob))
            return fields, body
        return fields, body + blob + b"\r\n"

    def line_ends(self, fields: list[Field], body: bytes) -> tuple[list[Field], bytes]:
        choice = self.rng.randrange(4)
        if choice == 0:
            return fields, body.replace(b"\r\n", b"\n")
        if choice == 1:
            return fields, body.rstrip(b"\r\n")
        if choice == 2:
            return fields, body + b"\r\n" * self.rng.randrange(1, 5)
        return fields, body[: self.rng.randrange(len(body) + 1)]

    def crossover(self, fields: list[Field], body: bytes) -> tuple[list[Field], bytes]:
        other_fields, other_body = self.rng.choice(self.corpus)
        if self.rng.random() < 0.5:
            return fields, other_body
        return fields + list(other_fields[: self.rng.randrange(len(other_fields) + 1)]), body

    MUTATIONS: list[Callable[[Mutator, list[Field], bytes], tuple[list[Field], bytes]]] = [
        flip_byte, insert_special, duplicate_field, drop_field, reorder, splice_dkim_tag,
        splice_dkim_tag, other_signature, hostile_from, hostile_from, authentication_results,
        odd_name, huge_line, line_ends, crossover,
    ]  # fmt: skip


def _flip(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    at = rng.randrange(len(data))
    return data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :]


# -- driving the pipeline ---------------------------------------------------------------------


class Failure(Exception):
    """A verdict the adapter could not apply, or a broken promise (not an escaped exception).

    ``kind`` names the broken rule (failures are told apart by it), ``detail`` shows the case.
    """

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


@dataclass
class Outcome:
    """What one input did, for the breakdown."""

    labels: list[str] = field(default_factory=list)


_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
_BAD_VALUE = re.compile(r"[\x00\r]|\n(?![ \t])")
_CODE = re.compile(r"[45][0-9][0-9]")
_XCODE = re.compile(r"[45]\.[0-9]{1,3}\.[0-9]{1,3}")
_RESULTS = re.compile(r"\b(dkim|spf|dmarc)=([a-z]+)")


def _sendable(what: str, text: str) -> None:
    """pymilter passes strings to libmilter as UTF-8 C strings ("s" arguments)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Failure(f"{what} is not UTF-8", f"{e}: {text!r}") from None
    if "\x00" in text:
        raise Failure(f"{what} holds NUL", repr(text))


def check_reply(reply: Reply, where: str) -> None:
    if not _CODE.fullmatch(reply.code) or not _XCODE.fullmatch(reply.xcode):
        raise Failure(f"{where}: malformed reply code", f"{reply.code} {reply.xcode}")
    if reply.code[0] != reply.xcode[0]:
        raise Failure(f"{where}: reply class mismatch", f"{reply.code} {reply.xcode}")
    _sendable(f"{where} reply text", reply.text)
    if "\r" in reply.text or "\n" in reply.text:
        raise Failure(f"{where}: reply text with a line break", repr(reply.text))


def check_verdict(verdict: Verdict, fields: list[Field]) -> None:
    if not isinstance(verdict.action, Action):
        raise Failure("action is not an Action", repr(verdict.action))
    if verdict.reply is not None:
        check_reply(verdict.reply, "eom")
    if verdict.quarantine_reason is not None:
        _sendable("quarantine reason", verdict.quarantine_reason)
    if "\n" in verdict.log or "\r" in verdict.log:
        raise Failure("log line with a line break", repr(verdict.log))
    for edit in verdict.edits:
        if isinstance(edit, AddHeader):
            if not _FIELD_NAME.fullmatch(edit.name):
                raise Failure("added field name is not a field name", repr(edit.name))
            _sendable(f"added {edit.name}", edit.value)
            if _BAD_VALUE.search(edit.value):
                raise Failure(f"added {edit.name} with a bare CR/LF or NUL", repr(edit.value))
            if edit.index < 0:
                raise Failure(f"added {edit.name} at a negative index", str(edit.index))
        elif isinstance(edit, DeleteHeader):
            count = sum(1 for n, _ in fields if n.lower() == edit.name.lower())
            if not 1 <= edit.occurrence <= count:
                raise Failure(f"deletes a {edit.name} field that is not there",
                              f"#{edit.occurrence} of {count}")


def _milter_value(value: bytes, leading_space: bool) -> bytes:
    """As the MTA hands a value to the milter: LF folding, and without HDR_LEADSPC the first
    space gone."""
    value = value.replace(b"\r\n", b"\n")
    return value if leading_space or not value.startswith(b" ") else value[1:]


def run_case(world: World, case: Case, outcome: Outcome) -> None:
    """Drive one input exactly as the adapter does; raise on any failure."""
    ctx = world.contexts[case.profile]
    _RAND.seed(case.seed)
    conn = Connection(ctx, hostname=case.hostname, ip=case.ip, macros=case.macros,
                      leading_space=case.leading_space)  # fmt: skip
    if conn.peer:
        outcome.labels.append("peer")
        return
    if case.helo is not None:
        conn.set_helo(case.helo)
    for attempt in range(2 if case.abort_after is not None else 1):
        txn = conn.transaction()
        txn.update_macros(case.macros)
        txn.envfrom(case.mail_from)
        reply = None
        for rcpt in case.rcpts:
            reply = txn.rcpt(rcpt).reply
            if reply is not None:
                check_reply(reply, "rcpt")
        if txn.spf is not None:
            outcome.labels.append(f"spf={txn.spf.result.value}")
        if reply is not None:
            outcome.labels.append(f"rcpt={'reject' if reply.code[0] == '5' else 'tempfail'}")
            txn.close()
            return
        for name, value in case.fields:
            txn.header(name, _milter_value(value, case.leading_space))
        txn.eoh()
        chunks = [case.body[i : i + case.chunk] for i in range(0, len(case.body), case.chunk)]
        if attempt == 0 and case.abort_after is not None:
            for chunk in chunks[: case.abort_after]:
                txn.body(chunk)
            txn.close()  # the MTA aborted: only the transaction goes
            outcome.labels.append("aborted")
            continue
        for chunk in chunks:
            txn.body(chunk)
        txn.update_macros(case.macros)
        verdict = txn.eom()
        check_verdict(verdict, case.fields)
        outcome.labels.append(f"action={verdict.action.value}")
        signed = [e for e in verdict.edits
                  if isinstance(e, AddHeader) and e.name == "DKIM-Signature"]  # fmt: skip
        if signed:
            outcome.labels.append("signed")
            froms = [re.sub(r"\r?\n", "", v.decode("utf-8", "surrogateescape")).strip()
                     for n, v in case.fields if n.lower() == "from"]  # fmt: skip
            if froms and not author_domain(froms[:1]).addresses:
                # The signer is chosen by the strict parser; a From it refuses (a comment in
                # the domain, obsolete syntax) must choose no key at all.
                raise Failure("signed a From field the strict parser refuses", repr(froms[0]))
            if author_domain(froms).status is not FromStatus.OK:
                outcome.labels.append("signed-from-not-single")  # several From or domains
            check_signed(world, case, verdict, signed, outcome)
        elif "signing error" in verdict.log:
            outcome.labels.append("sign-error")
        else:
            labels = _RESULTS.findall(verdict.log)
            outcome.labels += [f"{m}={r}" for m, r in labels if m != "spf" or txn.spf is None]


def applied(fields: list[Field], body: bytes, verdict: Verdict) -> bytes:
    """The message as the MTA writes it after the verdict's header edits."""
    out = [(n, v) for n, v in fields]
    for edit in verdict.edits:
        if isinstance(edit, DeleteHeader):
            hits = [i for i, (n, _) in enumerate(out) if n.lower() == edit.name.lower()]
            del out[hits[edit.occurrence - 1]]
        elif isinstance(edit, AddHeader):
            out.insert(edit.index, (edit.name, b" " + edit.value.replace("\n", "\r\n").encode()))
    head = b"".join(n.encode("ascii", "surrogateescape") + b":" + v + b"\r\n" for n, v in out)
    return head + b"\r\n" + body


def _clean_message(case: Case) -> bool:
    """Header fields a relaying MTA passes unchanged, so that a signature must verify."""
    if not case.leading_space and any(not v.startswith(b" ") for _, v in case.fields):
        return False  # the MTA would have restored a space that was never there
    return all(
        _FIELD_NAME.fullmatch(name)
        and not re.search(rb"[\x00\r\n]", re.sub(rb"\r\n(?=[ \t])", b"", value))
        for name, value in case.fields
    )


def check_signed(world: World, case: Case, verdict: Verdict, signed: list[AddHeader],
                 outcome: Outcome) -> None:  # fmt: skip
    """Our own signatures on a clean message must pass our own verifier."""
    if not _clean_message(case):
        outcome.labels.append("signed-unclean")
        return
    message = applied(case.fields, case.body, verdict)
    results = verify_message(message, world.resolver, max_signatures=len(signed),
                             now=world.now)  # fmt: skip
    bad = [r for r in results if r.result is not DkimResult.PASS]
    if bad:
        raise Failure("our signature on a clean message does not verify", repr(bad))
    outcome.labels.append("signed-verified")


# -- the run ----------------------------------------------------------------------------------


#: An input slower than this (seconds) is a failure: a denial of service.
SLOW = 10.0


def run_one(world: World, case: Case, outcome: Outcome) -> tuple[str, str]:
    """Run one input; return ``(kind, report)`` of its failure, or two empty strings."""
    try:
        run_case(world, case, outcome)
    except Failure as e:
        return e.kind, f"Failure: {e}"
    except Exception as e:  # noqa: BLE001 - anything escaping the pipeline is what we look for
        frame = traceback.extract_tb(e.__traceback__)[-1]
        return (f"{type(e).__name__} at {Path(frame.filename).name}:{frame.lineno}",
                traceback.format_exc())  # fmt: skip
    return "", ""


def save(directory: Path, case: Case, kind: str, error: str, now: float) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = {"kind": kind, "error": error, "now": now, "case": case.to_json()}
    path = directory / f"{hashlib.sha1(kind.encode()).hexdigest()[:12]}.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=300.0, help="time bound (default 300)")
    parser.add_argument("--max-inputs", type=int, default=None, help="stop after this many")
    parser.add_argument("--seed", type=int, default=None, help="first seed (default: random)")
    parser.add_argument("--replay", type=Path, help="run one saved crash again, with traceback")
    parser.add_argument("--summary", type=Path, help="also write the summary as JSON here")
    parser.add_argument("--crash-dir", type=Path, default=CRASH_DIR,
                        help="where reproducers go (default fuzz/crashes)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="authmilter-fuzz-") as tmp:
        replay = json.loads(args.replay.read_text()) if args.replay else None
        # A minute ahead: the corpus dkimpy signs below must not be from the future (ClockDrift 0).
        now = float(replay["now"] if replay else int(time.time()) + 60)
        world = build_world(Path(tmp), now)
        setup = time.monotonic() - started
        if replay is not None:
            case = Case.from_json(replay["case"])
            outcome = Outcome()
            run_case(world, case, outcome)  # raises with the full traceback
            print(f"replay: no failure ({', '.join(outcome.labels)})")
            return 0
        return fuzz(world, args, setup)


def fuzz(world: World, args: argparse.Namespace, setup: float) -> int:
    seed0 = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    mutator = Mutator(random.Random(), world.corpus)
    counts: Counter[str] = Counter()
    failures: dict[str, Path] = {}
    slowest = (0.0, -1)
    tried = 0
    begin = time.monotonic()
    deadline = begin + args.seconds
    while time.monotonic() < deadline and (args.max_inputs is None or tried < args.max_inputs):
        seed = seed0 + tried
        case = mutator.case(seed, len(world.contexts))
        outcome = Outcome()
        t0 = time.monotonic()
        key, error = run_one(world, case, outcome)
        elapsed = time.monotonic() - t0
        if not key and elapsed > SLOW:
            key = error = f"an input took {elapsed:.1f} s (more than {SLOW:g} s)"
        slowest = max(slowest, (elapsed, seed))
        tried += 1
        counts.update(outcome.labels)
        if key:
            if key not in failures:
                failures[key] = save(args.crash_dir, case, key, error, world.now)
                print(f"FAILURE (seed {seed}): {error.strip().splitlines()[-1][:300]}\n"
                      f"  reproducer: {failures[key]}", flush=True)  # fmt: skip
            counts["failures"] += 1
    duration = time.monotonic() - begin
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seed": seed0,
        "setup_seconds": round(setup, 1),
        "seconds": round(duration, 1),
        "inputs": tried,
        "inputs_per_second": round(tried / duration, 1) if duration else 0.0,
        "failures": counts.pop("failures", 0),
        "distinct_failures": len(failures),
        "slowest_input": {"seconds": round(slowest[0], 3), "seed": slowest[1]},
        "breakdown": dict(sorted(counts.items())),
    }
    print(report(summary))
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=1) + "\n")
    return 1 if failures else 0


def report(summary: dict[str, Any]) -> str:
    lines = [
        f"inputs tried: {summary['inputs']} in {summary['seconds']} s "
        f"({summary['inputs_per_second']} inputs/s; seed {summary['seed']}; "
        f"setup {summary['setup_seconds']} s)",
        f"failures: {summary['failures']} ({summary['distinct_failures']} distinct)",
        f"slowest input: {summary['slowest_input']['seconds']} s "
        f"(seed {summary['slowest_input']['seed']})",
        "breakdown:",
    ]
    groups: dict[str, list[str]] = {}
    for label, n in summary["breakdown"].items():
        head, _, tail = label.partition("=")
        groups.setdefault(head if tail else "other", []).append(f"{tail or head} {n}")
    lines += [f"  {head:8} {', '.join(items)}" for head, items in sorted(groups.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
