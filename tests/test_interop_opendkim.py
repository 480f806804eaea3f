"""Interoperability with OpenDKIM 2.11 (Debian), both ways, through real Postfix and real NSD.

1. authmilter signs → OpenDKIM verifies: stage A is a Postfix whose ``smtpd_milters`` is
   ``authmilter run`` (signing for the internal client 127.0.0.1 on the ``submit`` port); the
   message it delivers is sent as is into stage B, a Postfix whose milter is ``opendkim`` in
   verify mode (``Mode v``), on the ``inbound`` port from a claimed outside client. OpenDKIM's
   Authentication-Results must say ``dkim=pass`` for our d=, s= and a=: RSA-2048 with
   relaxed/simple and simple/simple, and Ed25519 (Debian's OpenDKIM 2.11, built with OpenSSL 3,
   verifies ed25519-sha256 with an RFC 8463 raw ``p=`` key).
2. OpenDKIM signs → authmilter verifies: stage A's milter is ``opendkim`` in sign mode with a
   KeyTable/SigningTable (RSA key made by ``opendkim-genkey``; Ed25519 key by ``authmilter
   genkey``, which OpenDKIM 2.11 signs with under ``SignatureAlgorithm ed25519-sha256``), stage
   B's is ``authmilter run`` in verify mode; its Authentication-Results must say ``dkim=pass``
   with header.d, header.s and header.a of OpenDKIM's signature.

Controls keep the passes honest: OpenDKIM signs → OpenDKIM verifies (the fixtures, the zone, the
resolver set-up and both message shapes are sound), and a message altered after signing fails
in both verifiers. When a verifier disagrees, the failure message adds dkimpy's verdict on the
same bytes as a third opinion.

Each case runs with two message shapes (:data:`SHAPES`): ``tidy`` headers, and ``quirky`` ones
that separate ``simple`` from ``relaxed`` and a careful milter from a careless one (a signed
header without a space after the colon, a tab after another, runs of whitespace, a folded
Subject). Both have body lines with trailing whitespace, a line starting with a dot and blank
lines at the end. The signing domains are ``.example``-style names: libunbound (OpenDKIM's
resolver) answers NXDOMAIN for ``.test`` by itself.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import itertools
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import authres
import dkim
import dkim.util
import dns.message
import dns.query
import dns.rdatatype
import pytest

import opendkim_fixture
import postfix_fixture
from dnsserver import NsdServer, make_zone
from opendkim_fixture import (
    KeySpec,
    OpenDkim,
    OpenDkimStarter,
    opendkim_genkey,
    split_nameserver,
)
from postfix_fixture import (
    HarnessTimeout,
    PostfixInstance,
    PostfixStarter,
    new_socket_dir,
    wait_for_socket,
)

# Fixtures from the harness modules (assigned, not imported by name: ruff F811 otherwise).
opendkim_factory_module = opendkim_fixture.opendkim_factory_module
postfix_factory_module = postfix_fixture.postfix_factory_module

#: Our signing domain (authmilter signs it) and OpenDKIM's (OpenDKIM signs it).
OUR_DOMAIN = "example.net"
THEIR_DOMAIN = "example.org"
RECIPIENT = "bob@example.com"
#: The client stage B sees, claimed on its ``inbound`` port (RFC 5737 TEST-NET-3).
OUTSIDE_CLIENT = "203.0.113.25"
AUTHMILTER_ID = "authmilter.test"
DELIVERY_TIMEOUT = 10.0
OPENDKIM_ID = opendkim_fixture.DEFAULT_AUTHSERV_ID
#: Selectors: authmilter's keys (example.net) and OpenDKIM's (example.org).
AM_RSA, AM_ED, ODK_RSA, ODK_ED = "amrsa", "amed", "odkrsa", "odked"


# --------------------------------------------------------------------------------------------
# authmilter as a subprocess
# --------------------------------------------------------------------------------------------


class Authmilter:
    """``python -m authmilter run -c CONF`` on a ``local:`` socket Postfix can reach.

    The configuration, key and signing tables and the process output live in one 0755
    directory under /run; ``output()`` is what the milter wrote (stdout and stderr).
    """

    def __init__(self, settings: dict[str, str], *, signing_key: KeySpec | None = None):
        self.dir = new_socket_dir("authmilter-interop-")
        self.socket_path = self.dir / "authmilter.sock"
        self.conf_path = self.dir / "authmilter.conf"
        self.out_path = self.dir / "authmilter.out"
        # Syslog is on by default; the output file keeps the lines for failure reports.
        conf = {"Socket": f"local:{self.socket_path}", "UMask": "000", "Syslog": "no", **settings}
        if signing_key is not None:
            key_table, signing_table = self.dir / "key.table", self.dir / "signing.table"
            key_table.write_text(signing_key.keytable_line() + "\n")
            signing_table.write_text(f"*@{signing_key.domain} {signing_key.name}\n")
            conf["KeyTable"] = f"file:{key_table}"
            conf["SigningTable"] = f"refile:{signing_table}"
        self.conf_path.write_text("".join(f"{k} {v}\n" for k, v in conf.items()))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return f"unix:{self.socket_path}"

    def start(self) -> Authmilter:
        with self.out_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "authmilter", "run", "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc = self.proc
        try:
            wait_for_socket(self.socket, timeout=20, alive=lambda: proc.poll() is None)
        except BaseException as exc:
            self.stop()
            exc.add_note(self.diagnostics())
            raise
        return self

    def terminate(self) -> None:
        """Send SIGTERM (libmilter then takes up to ~5 s to return: stop several at once)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL after 10 s."""
        proc = self.proc
        self.terminate()
        self.proc = None
        if proc is None:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def output(self) -> str:
        try:
            return self.out_path.read_text(errors="replace")
        except OSError:
            return ""

    def diagnostics(self) -> str:
        return (
            f"--- authmilter.conf ---\n{self.conf_path.read_text()}"
            f"--- authmilter output ---\n{self.output()}"
        )


# --------------------------------------------------------------------------------------------
# Keys, DNS, and the Postfix stages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    am_rsa: KeySpec  # authmilter genkey, RSA-2048, example.net
    am_ed: KeySpec  # authmilter genkey, Ed25519, example.net
    odk_rsa: KeySpec  # opendkim-genkey, RSA-2048, example.org
    odk_ed: KeySpec  # authmilter genkey, Ed25519, example.org (opendkim-genkey makes RSA only)
    zones: dict[str, str]  # origin → zone text with the key records, as the tools wrote them


def authmilter_genkey(directory: Path, domain: str, selector: str, *args: str) -> KeySpec:
    proc = subprocess.run(
        [sys.executable, "-m", "authmilter", "genkey", "-D", str(directory), "-d", domain,
         "-s", selector, *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"authmilter genkey failed: {proc.stdout}{proc.stderr}"
    return KeySpec(domain, selector, directory / f"{selector}.private")


@pytest.fixture(scope="module")
def keys() -> Iterator[Keys]:
    opendkim_fixture.require_opendkim()
    directory = new_socket_dir("interop-keys-")
    try:
        am_rsa = authmilter_genkey(directory, OUR_DOMAIN, AM_RSA, "-b", "2048")
        am_ed = authmilter_genkey(directory, OUR_DOMAIN, AM_ED, "--algorithm", "ed25519")
        odk_rsa = opendkim_genkey(directory, domain=THEIR_DOMAIN, selector=ODK_RSA)
        odk_ed = authmilter_genkey(directory, THEIR_DOMAIN, ODK_ED, "--algorithm", "ed25519")

        def records(*specs: KeySpec) -> str:
            return "".join((directory / f"{k.selector}.txt").read_text() for k in specs)

        zones = {
            OUR_DOMAIN: make_zone(OUR_DOMAIN, raw=records(am_rsa, am_ed)),
            THEIR_DOMAIN: make_zone(THEIR_DOMAIN, raw=records(odk_rsa, odk_ed)),
        }
        yield Keys(am_rsa, am_ed, odk_rsa, odk_ed, zones)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Stage:
    """One Postfix with one milter; ``diagnostics`` describes the milter for failures."""

    postfix: PostfixInstance
    diagnostics: Callable[[], str]

    def relay(self, message: bytes, *, sender: str, port: postfix_fixture.Port) -> bytes:
        """Send ``message`` (``send``: CRLF kept, dots stuffed); return it as delivered.

        The delivery is found by its Message-ID, so a straggler from an earlier test cannot
        be taken for it.
        """
        pf = self.postfix
        [message_id] = header_values(message, "Message-ID")
        client = OUTSIDE_CLIENT if port == "inbound" else None
        try:
            pf.send(message, mail_from=sender, rcpt_to=[RECIPIENT], port=port, client_ip=client)
            deadline = time.monotonic() + DELIVERY_TIMEOUT
            while time.monotonic() < deadline:
                for raw in pf.delivered():
                    if header_values(raw, "Message-ID") == [message_id]:
                        return raw
                time.sleep(0.02)
            raise HarnessTimeout(f"{message_id} not delivered after {DELIVERY_TIMEOUT}s")
        except Exception as exc:
            exc.add_note(self.explain())
            raise

    def explain(self) -> str:
        return f"{self.diagnostics()}{self.postfix.log_tail(20)}"


@dataclass
class Lab:
    """Module-wide: NSD with the key records, and the stages, each started on first use."""

    keys: Keys
    nsd: NsdServer
    start_postfix: PostfixStarter
    start_opendkim: OpenDkimStarter
    _stages: dict[str, Stage] = field(default_factory=dict)
    _authmilters: list[Authmilter] = field(default_factory=list)
    _opendkims: list[OpenDkim] = field(default_factory=list)

    def _cached(self, name: str, make: Callable[[], Stage]) -> Stage:
        if name not in self._stages:
            self._stages[name] = make()
        return self._stages[name]

    def opendkim_stage(
        self, mode: str, key: KeySpec | None = None, canonicalization: str = "relaxed/simple"
    ) -> Stage:
        """Postfix + OpenDKIM: ``Mode v`` verifying, or ``Mode s`` signing with ``key``."""

        def make() -> Stage:
            signing: dict[str, object] = {}
            if key is not None:
                signing = {"keys": [key], "signing_table": {f"*@{key.domain}": key.name}}
                if key.selector == ODK_ED:
                    # One algorithm for all keys in 2.11 (rsa-sha256 unless told).
                    signing["settings"] = {"SignatureAlgorithm": "ed25519-sha256"}
            milter = self.start_opendkim(
                mode=mode,
                nameserver=self.nsd.nameserver,
                dns_zones=[OUR_DOMAIN, THEIR_DOMAIN],
                canonicalization=canonicalization,
                **signing,
            )
            self._opendkims.append(milter)
            return Stage(self.start_postfix(milter.socket), milter.diagnostics)

        name = f"opendkim-{mode}-{key.selector if key else ''}-{canonicalization}"
        return self._cached(name, make)

    def authmilter_stage(
        self, mode: str, key: KeySpec | None = None, canonicalization: str = "relaxed/simple"
    ) -> Stage:
        """Postfix + authmilter: ``Mode s`` signing example.net with ``key``, or ``Mode v``."""

        def make() -> Stage:
            settings = {
                "Mode": mode,
                "AuthservID": AUTHMILTER_ID,
                "Canonicalization": canonicalization,
                "Nameservers": self.nsd.nameserver,
                "SyslogSuccess": "yes",
            }
            milter = Authmilter(settings, signing_key=key)
            self._authmilters.append(milter)
            milter.start()
            return Stage(self.start_postfix(milter.socket), milter.diagnostics)

        name = f"authmilter-{mode}-{key.selector if key else ''}-{canonicalization}"
        return self._cached(name, make)

    def third_opinion(self, signed: bytes) -> str:
        """dkimpy's verdict on the (first) signature of ``signed``, keys from our NSD."""
        host, port = split_nameserver(self.nsd.nameserver)

        def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
            query = dns.message.make_query(name.decode("ascii"), dns.rdatatype.TXT)
            answer = dns.query.udp(query, host, port=port, timeout=timeout)
            return b"".join(b"".join(rr.strings) for rrset in answer.answer for rr in rrset)

        try:
            verdict = "pass" if dkim.verify(signed, dnsfunc=dnsfunc) else "fail"
        except Exception as exc:  # a third opinion must not hide the real failure
            verdict = f"error: {exc!r}"
        return f"--- dkimpy, a third verifier, on the same signed bytes: {verdict}\n"

    def close(self) -> None:
        """Stop the milters: SIGTERM to all first (each takes ~5 s to exit), then wait."""
        for milter in [*self._authmilters, *self._opendkims]:
            milter.terminate()
        for milter in self._authmilters:
            milter.stop()
            shutil.rmtree(milter.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(
    keys: Keys,
    nsd_server_module: Callable[[dict[str, str]], NsdServer],
    postfix_factory_module: PostfixStarter,
    opendkim_factory_module: OpenDkimStarter,
) -> Iterator[Lab]:
    nsd = nsd_server_module(keys.zones)
    the_lab = Lab(keys, nsd, postfix_factory_module, opendkim_factory_module)
    try:
        yield the_lab
    finally:
        the_lab.close()


# --------------------------------------------------------------------------------------------
# Messages and headers
# --------------------------------------------------------------------------------------------

_serial = itertools.count(1)


#: ``tidy`` headers have one space after every colon; ``quirky`` ones are as valid but not
#: so neat: a signed header without a space after the colon, a tab after another, runs of
#: whitespace and a folded Subject. The body (trailing whitespace, a leading dot, blank lines
#: at the end) is the same in both.
SHAPES = ("tidy", "quirky")


def make_message(sender: str, subject: str, shape: str) -> bytes:
    """A message whose bytes differ between ``simple`` and ``relaxed``, in header and body."""
    domain = sender.rpartition("@")[2]
    if shape == "tidy":
        to, subject_lines = f"To: {RECIPIENT}", [f"Subject: interop {subject}"]
    else:
        to = f"To:{RECIPIENT}"  # simple canonicalization must keep this as it is
        subject_lines = [f"Subject:\t{subject}  with   runs of\tspace", "  and a folded line"]
    lines = [
        f"From: Alice Example <{sender}>",
        to,
        *subject_lines,
        f"Date: {email.utils.formatdate(localtime=False)}",
        f"Message-ID: <interop.{next(_serial)}.{uuid.uuid4().hex}@{domain}>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "Hello Bob,",
        "this line ends in spaces   ",
        "and this one in a tab\t",
        ".a line that starts with a dot",
        "",
        "  indented   line  with    runs",
        "",
        "",
    ]
    return "\r\n".join(lines).encode("ascii") + b"\r\n"


def header_values(raw: bytes, name: str) -> list[str]:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [str(v) for v in msg.get_all(name, [])]


def signature_tags(raw: bytes) -> list[dict[str, str]]:
    """The tags of each DKIM-Signature field (values with folding whitespace removed)."""
    found = []
    for value in header_values(raw, "DKIM-Signature"):
        tags = dkim.util.parse_tag_value(value.encode("ascii"))
        found.append({k.decode(): re.sub(r"\s+", "", v.decode()) for k, v in tags.items()})
    return found


def dkim_results(raw: bytes, authserv_id: str) -> list[authres.DKIMAuthenticationResult]:
    """The ``dkim`` results of the Authentication-Results fields made by ``authserv_id``."""
    results = []
    for value in header_values(raw, "Authentication-Results"):
        unfolded = re.sub(r"\r?\n(?=[ \t])", "", value)
        parsed = authres.AuthenticationResultsHeader.parse(f"Authentication-Results: {unfolded}")
        if parsed.authserv_id == authserv_id:
            results += [r for r in parsed.results if r.method == "dkim"]
    return results


def header_property(result: authres.AuthenticationResult, name: str) -> str:
    """The value of ``header.<name>`` (authres has attributes for d, i, a, s; not for b)."""
    values = [p.value for p in result.properties if p.type == "header" and p.name == name]
    assert len(values) == 1, f"header.{name} in {result}"
    return str(values[0])


def describe(results: list[authres.DKIMAuthenticationResult], raw: bytes) -> str:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii", "replace")
    return f"results: {[str(r) for r in results]}\n--- delivered header ---\n{head}\n"


def tamper(raw: bytes) -> bytes:
    """The message with one body character changed after signing."""
    altered = raw.replace(b"Hello Bob,", b"Hello Bub,")
    assert altered != raw
    return altered


# --------------------------------------------------------------------------------------------
# Controls: OpenDKIM ↔ OpenDKIM
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("canon", ["relaxed/simple", "simple/simple"])
def test_opendkim_signs_and_verifies_itself(lab: Lab, canon: str, shape: str) -> None:
    """Control: the fixtures, the zone, the resolver set-up and the message shapes are sound."""
    sender = f"alice@{THEIR_DOMAIN}"
    signer = lab.opendkim_stage("s", lab.keys.odk_rsa, canon)
    signed = signer.relay(make_message(sender, "control", shape), sender=sender, port="submit")
    [sig] = signature_tags(signed)
    assert (sig["d"], sig["s"], sig["c"]) == (THEIR_DOMAIN, ODK_RSA, canon), signer.explain()

    verifier = lab.opendkim_stage("v")
    final = verifier.relay(signed, sender=sender, port="inbound")
    results = dkim_results(final, OPENDKIM_ID)
    why = describe(results, final) + verifier.explain()
    assert [r.result for r in results] == ["pass"], why
    assert (results[0].header_d, results[0].header_s) == (THEIR_DOMAIN, ODK_RSA), why


def test_opendkim_verifier_fails_altered_message(lab: Lab) -> None:
    """Control: OpenDKIM's pass is no rubber stamp; a body changed after signing fails."""
    sender = f"alice@{THEIR_DOMAIN}"
    signer = lab.opendkim_stage("s", lab.keys.odk_rsa)
    signed = signer.relay(make_message(sender, "altered", "tidy"), sender=sender, port="submit")
    verifier = lab.opendkim_stage("v")
    final = verifier.relay(tamper(signed), sender=sender, port="inbound")
    results = dkim_results(final, OPENDKIM_ID)
    assert [r.result for r in results] == ["fail"], describe(results, final) + verifier.explain()


# --------------------------------------------------------------------------------------------
# 1. authmilter signs → OpenDKIM verifies
# --------------------------------------------------------------------------------------------

#: case → (Keys attribute, Canonicalization, expected a=)
SIGN_CASES = {
    "rsa2048-relaxed/simple": ("am_rsa", "relaxed/simple", "rsa-sha256"),
    "rsa2048-simple/simple": ("am_rsa", "simple/simple", "rsa-sha256"),
    "ed25519-relaxed/simple": ("am_ed", "relaxed/simple", "ed25519-sha256"),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", list(SIGN_CASES))
def test_authmilter_signs_opendkim_verifies(lab: Lab, case: str, shape: str) -> None:
    key_attr, canon, algorithm = SIGN_CASES[case]
    key: KeySpec = getattr(lab.keys, key_attr)
    sender = f"alice@{OUR_DOMAIN}"
    signer = lab.authmilter_stage("s", key, canon)
    signed = signer.relay(make_message(sender, case, shape), sender=sender, port="submit")

    sigs = signature_tags(signed)
    assert len(sigs) == 1, f"expected one DKIM-Signature from authmilter\n{signer.explain()}"
    [sig] = sigs
    assert (sig["d"], sig["s"], sig["a"]) == (OUR_DOMAIN, key.selector, algorithm)
    assert sig.get("c", "simple/simple") == canon

    verifier = lab.opendkim_stage("v")
    final = verifier.relay(signed, sender=sender, port="inbound")
    results = dkim_results(final, OPENDKIM_ID)
    why = describe(results, final) + lab.third_opinion(signed) + verifier.explain()
    assert [r.result for r in results] == ["pass"], why
    [result] = results
    assert result.header_d == OUR_DOMAIN, why
    assert result.header_s == key.selector, why
    assert result.header_a == algorithm, why
    assert sig["b"].startswith(header_property(result, "b")), why


# --------------------------------------------------------------------------------------------
# 2. OpenDKIM signs → authmilter verifies
# --------------------------------------------------------------------------------------------

#: case → (Keys attribute, OpenDKIM's Canonicalization)
VERIFY_CASES = {
    "rsa2048-relaxed/simple": ("odk_rsa", "relaxed/simple"),
    "rsa2048-simple/simple": ("odk_rsa", "simple/simple"),
    "ed25519-relaxed/simple": ("odk_ed", "relaxed/simple"),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", list(VERIFY_CASES))
def test_opendkim_signs_authmilter_verifies(lab: Lab, case: str, shape: str) -> None:
    key_attr, canon = VERIFY_CASES[case]
    key: KeySpec = getattr(lab.keys, key_attr)
    sender = f"alice@{THEIR_DOMAIN}"
    signer = lab.opendkim_stage("s", key, canon)
    signed = signer.relay(make_message(sender, case, shape), sender=sender, port="submit")
    [sig] = signature_tags(signed)
    assert (sig["d"], sig["s"], sig["c"]) == (THEIR_DOMAIN, key.selector, canon), signer.explain()

    verifier = lab.authmilter_stage("v")
    final = verifier.relay(signed, sender=sender, port="inbound")
    results = dkim_results(final, AUTHMILTER_ID)
    why = describe(results, final) + lab.third_opinion(signed) + verifier.explain()
    assert [r.result for r in results] == ["pass"], why
    [result] = results
    assert result.header_d == sig["d"], why
    assert result.header_s == sig["s"], why
    assert result.header_a == sig["a"], why


def test_authmilter_verifier_fails_altered_message(lab: Lab) -> None:
    sender = f"alice@{THEIR_DOMAIN}"
    signer = lab.opendkim_stage("s", lab.keys.odk_rsa)
    signed = signer.relay(make_message(sender, "altered", "tidy"), sender=sender, port="submit")
    verifier = lab.authmilter_stage("v")
    final = verifier.relay(tamper(signed), sender=sender, port="inbound")
    results = dkim_results(final, AUTHMILTER_ID)
    why = describe(results, final) + verifier.explain()
    assert [r.result for r in results] == ["fail"], why
    assert (results[0].header_d, results[0].header_s) == (THEIR_DOMAIN, ODK_RSA), why
