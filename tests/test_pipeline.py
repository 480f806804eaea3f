"""The per-message pipeline without a socket: named scenarios for every decision.

Messages are fed as the milter protocol delivers them (header values with their leading space
and LF folding, CRLF body chunks); DNS answers come from the same zone text NSD would serve.
"""

from __future__ import annotations

import time
from pathlib import Path

import authres
import dkim
import pytest

from authmilter.config import Action, Config
from authmilter.keys import KeyAlgorithm, PrivateKey, generate_private_key, key_record_text
from authmilter.pipeline import Connection, Context, DeleteHeader, Verdict
from authmilter.results import DkimResult
from dnsserver import make_zone, txt_rdata
from fakedns import ZoneResolver, failure_marker
from helpers import added, apply

AID = "mx.pipeline.test"
NOW = float(int(time.time()))  # the verifier's clock; dkimpy puts the real clock in t=


@pytest.fixture(autouse=True)
def _fresh_now() -> None:
    """Re-read the clock for each test: dkimpy signs with the real time, and a value frozen at
    import goes stale (t= "in the future") once the suite has run longer than ClockDrift."""
    global NOW
    NOW = float(int(time.time()))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PrivateKey]:
    return {"ours": generate_private_key(KeyAlgorithm.RSA, 2048),
            "ours_ed": generate_private_key(KeyAlgorithm.ED25519),
            "remote": generate_private_key(KeyAlgorithm.RSA, 2048),
            "weak": generate_private_key(KeyAlgorithm.RSA, 1024)}  # fmt: skip


@pytest.fixture()
def keydir(tmp_path: Path, keys: dict[str, PrivateKey]) -> Path:
    for name in ("ours", "ours_ed"):
        p = tmp_path / f"{name}.private"
        p.write_bytes(keys[name].pem())
        p.chmod(0o600)
    return tmp_path


def zone_resolver(keys: dict[str, PrivateKey]) -> ZoneResolver:
    ours = make_zone("example.com", [
        ("rsa._domainkey", "TXT", txt_rdata(key_record_text(keys["ours"]))),
        ("ed._domainkey", "TXT", txt_rdata(key_record_text(keys["ours_ed"]))),
    ])  # fmt: skip
    remote = make_zone("remote.test", [
        ("sel._domainkey", "TXT", txt_rdata(key_record_text(keys["remote"]))),
        ("weak._domainkey", "TXT", txt_rdata(key_record_text(keys["weak"]))),
        ("testing._domainkey", "TXT", txt_rdata(key_record_text(keys["remote"], testmode=True))),
        ("broken._domainkey", "TXT", failure_marker("SERVFAIL")),
    ])  # fmt: skip
    return ZoneResolver.from_zones({"example.com": ours, "remote.test": remote})


def make_context(keydir: Path, keys: dict[str, PrivateKey], conf: str = "",
                 signing: str = "*@example.com rsa\n") -> Context:  # fmt: skip
    (keydir / "key.table").write_text(
        f"rsa example.com:rsa:{keydir}/ours.private\ned example.com:ed:{keydir}/ours_ed.private\n")
    (keydir / "signing.table").write_text(signing)
    cfg = Config.from_text(
        f"KeyTable file:{keydir}/key.table\nSigningTable refile:{keydir}/signing.table\n"
        f"AuthservID {AID}\nInternalHosts 127.0.0.1, 10.0.0.0/8\n{conf}")
    return Context.build(cfg, resolver=zone_resolver(keys), clock=lambda: NOW)


MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@remote.test\r\n"
    b"Subject: a test\r\n"
    b"  folded subject\r\n"
    b"Date: Mon, 23 Nov 2026 03:00:00 +0000\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"\r\n"
    b"Hello,\r\n\r\nbody line\r\n"
)


def feed(ctx: Context, message: bytes, *, ip: str = "198.51.100.25",
         macros: dict[str, str] | None = None) -> Verdict:  # fmt: skip
    """Drive a connection and one transaction as the adapter would."""
    conn = Connection(ctx, hostname="client.example", ip=ip)
    txn = conn.transaction()
    txn.update_macros({"i": "4BqTEST", **(macros or {})})
    txn.envfrom("<sender@example.org>")
    txn.rcpt("<rcpt@example.net>")
    head, _, body = message.partition(b"\r\n\r\n")
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            name, value = fields[-1]
            fields[-1] = (name, value + b"\n" + line)
        else:
            name, _, value = line.partition(b":")
            fields.append((name.decode(), value))
    for name, value in fields:
        txn.header(name, value)
    for i in range(0, len(body), 7):
        txn.body(body[i : i + 7])
    return txn.eom()


def remote_signed(keys: dict[str, PrivateKey], message: bytes = MESSAGE,
                  selector: str = "sel", key: str = "remote", **kw: object) -> bytes:  # fmt: skip
    msg = message.replace(b"alice@example.com", b"carol@remote.test")
    return dkim.sign(msg, selector.encode(), b"remote.test", keys[key].dkimpy_private(),
                     include_headers=[b"from", b"to", b"subject", b"date"], **kw) + msg


def dkim_results(verdict: Verdict) -> list[tuple[str, str | None]]:
    (value,) = added(verdict, "Authentication-Results")
    parsed = authres.AuthenticationResultsHeader.parse_value(" ".join(value.split()))
    assert parsed.authserv_id == AID
    return [(r.result, r.header_d) for r in parsed.results if r.method == "dkim"]


# -- signing ----------------------------------------------------------------------------------


def test_internal_client_is_signed_and_signature_verifies(keydir: Path, keys) -> None:
    ctx = make_context(keydir, keys)
    verdict = feed(ctx, MESSAGE, ip="10.1.2.3")
    assert verdict.action is Action.ACCEPT
    (sig,) = added(verdict, "DKIM-Signature")
    assert "d=example.com" in sig and "s=rsa" in sig and "\r" not in sig
    signed = apply(MESSAGE, verdict)
    resolver = zone_resolver(keys)
    assert dkim.verify(signed, dnsfunc=resolver.dkimpy_dnsfunc)
    assert verdict.log == "4BqTEST: signed d=example.com s=rsa a=rsa-sha256, action=accept"


@pytest.mark.parametrize("from_", [
    b"alice@evil.test (x).example.com",  # obsolete CFWS inside the domain: a spoofing vector
    b"alice@evil.test\r\n .example.com",
    b"Alice <alice@example.com",  # unbalanced
])  # fmt: skip
def test_a_from_the_strict_parser_refuses_chooses_no_signing_key(keydir: Path, keys,
                                                                 from_: bytes) -> None:  # fmt: skip
    """email.utils would read "alice@evil.test.example.com", which *@*.example.com signs."""
    ctx = make_context(keydir, keys, signing="*@example.com rsa\n*@*.example.com rsa\n")
    message = MESSAGE.replace(b"Alice <alice@example.com>", from_)
    verdict = feed(ctx, message, ip="10.1.2.3")
    assert verdict.direction.value == "verify"
    assert added(verdict, "DKIM-Signature") == []
    good = feed(ctx, MESSAGE.replace(b"alice@example.com", b"alice@mail.example.com"),
                ip="10.1.2.3")  # fmt: skip
    assert verdict.action is Action.ACCEPT and len(added(good, "DKIM-Signature")) == 1


def test_authenticated_client_is_signed_from_anywhere(keydir: Path, keys) -> None:
    verdict = feed(make_context(keydir, keys), MESSAGE, macros={"auth_type": "PLAIN"})
    assert len(added(verdict, "DKIM-Signature")) == 1


def test_mta_daemon_name_and_macrolist_mark_mail_as_originating(keydir: Path, keys) -> None:
    ctx = make_context(keydir, keys, "MTA ORIGINATING\n")
    assert added(feed(ctx, MESSAGE, macros={"daemon_name": "ORIGINATING"}), "DKIM-Signature")
    assert not added(feed(ctx, MESSAGE, macros={"daemon_name": "INBOUND"}), "DKIM-Signature")
    ctx = make_context(keydir, keys, "MacroList daemon_name=SUBMIT|ORIGINATING\n")
    assert added(feed(ctx, MESSAGE, macros={"daemon_name": "SUBMIT"}), "DKIM-Signature")
    assert not added(feed(ctx, MESSAGE, macros={"daemon_name": "submit"}), "DKIM-Signature")


def test_external_client_with_our_from_domain_is_verified_not_signed(keydir: Path, keys) -> None:
    verdict = feed(make_context(keydir, keys, "AlwaysAddARHeader yes\n"), MESSAGE)
    assert not added(verdict, "DKIM-Signature")
    assert dkim_results(verdict) == [("none", None)]
    assert "external host client.example tried to send as example.com" in verdict.log


def test_external_ignore_list_silences_the_external_sender_note(keydir: Path, keys) -> None:
    verdict = feed(make_context(keydir, keys, "ExternalIgnoreList 198.51.100.0/24\n"), MESSAGE)
    assert "tried to send" not in verdict.log


def test_multiple_signatures_rsa_and_ed25519_both_verify(keydir: Path, keys) -> None:
    ctx = make_context(keydir, keys, "MultipleSignatures yes\n",
                       signing="*@example.com rsa\n*@example.com ed\n")
    verdict = feed(ctx, MESSAGE, ip="127.0.0.1")
    sigs = added(verdict, "DKIM-Signature")
    assert [("a=rsa-sha256" in s, "a=ed25519-sha256" in s) for s in sigs] == [
        (False, True), (True, False)]  # inserted at the top in reverse: RSA ends up first
    signed = apply(MESSAGE, verdict)
    d = dkim.DKIM(signed)
    resolver = zone_resolver(keys)
    assert [d.verify(idx=i, dnsfunc=resolver.dkimpy_dnsfunc) for i in range(2)] == [True, True]
    assert b"a=rsa-sha256" in signed.split(b"DKIM-Signature")[1]


@pytest.mark.parametrize("canon", ["simple/simple", "relaxed/relaxed", "simple/relaxed"])
def test_every_canonicalization_signs_verifiably(keydir: Path, keys, canon: str) -> None:
    verdict = feed(make_context(keydir, keys, f"Canonicalization {canon}\n"), MESSAGE,
                   ip="127.0.0.1")  # fmt: skip
    signed = apply(MESSAGE, verdict)
    assert f"c={canon}".encode() in signed
    assert dkim.verify(signed, dnsfunc=zone_resolver(keys).dkimpy_dnsfunc)


def test_oversigned_from_is_listed_once_more_and_ttl_sets_x(keydir: Path, keys) -> None:
    verdict = feed(make_context(keydir, keys, "SignatureTTL 3600\nOversignHeaders From,Reply-To\n"),
                   MESSAGE, ip="127.0.0.1")  # fmt: skip
    (sig,) = added(verdict, "DKIM-Signature")
    flat = "".join(sig.split())
    h = flat.split("h=")[1].split(";")[0].split(":")
    assert h.count("from") == 2 and h.count("reply-to") == 1
    assert "received" not in h and "subject" in h
    assert f"t={int(NOW)};" in flat and f"x={int(NOW) + 3600};" in flat


def test_signed_mail_is_not_also_verified(keydir: Path, keys) -> None:
    verdict = feed(make_context(keydir, keys, "AlwaysAddARHeader yes\n"), MESSAGE, ip="10.0.0.1")
    assert added(verdict, "DKIM-Signature") and not added(verdict, "Authentication-Results")


def test_mode_v_never_signs(keydir: Path, keys) -> None:
    verdict = feed(make_context(keydir, keys, "Mode v\nAlwaysAddARHeader yes\n"), MESSAGE,
                   ip="10.0.0.1")  # fmt: skip
    assert not added(verdict, "DKIM-Signature")
    assert dkim_results(verdict) == [("none", None)]


def test_unusable_signing_key_gives_on_signature_error(keydir: Path, keys) -> None:
    (keydir / "key.table").write_text("x example.com:rsa:/nonexistent/%.private\n")
    (keydir / "signing.table").write_text("*@example.com x\n")
    cfg = Config.from_text(f"KeyTable file:{keydir}/key.table\n"
                           f"SigningTable refile:{keydir}/signing.table\nAuthservID {AID}\n")
    ctx = Context.build(cfg, resolver=zone_resolver(keys), clock=lambda: NOW)
    verdict = feed(ctx, MESSAGE, ip="127.0.0.1")
    assert verdict.action is Action.REJECT  # OpenDKIM's default for On-SignatureError
    assert verdict.reply is not None and verdict.reply.code == "550"
    assert "signing error" in verdict.log


# -- verifying --------------------------------------------------------------------------------


def test_valid_external_signature_passes(keydir: Path, keys) -> None:
    verdict = feed(make_context(keydir, keys), remote_signed(keys))
    assert verdict.action is Action.ACCEPT
    assert dkim_results(verdict) == [("pass", "remote.test")]
    assert verdict.log.startswith("4BqTEST: dkim=pass d=remote.test s=sel")


def test_bad_signature_is_fail_and_on_badsignature_applies(keydir: Path, keys) -> None:
    tampered = remote_signed(keys).replace(b"body line", b"BODY LINE")
    assert dkim_results(feed(make_context(keydir, keys), tampered)) == [("fail", "remote.test")]
    verdict = feed(make_context(keydir, keys, "On-BadSignature reject\n"), tampered)
    assert verdict.action is Action.REJECT and verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.xcode) == ("550", "5.7.1")
    assert "d=remote.test" in verdict.reply.text
    quarantined = feed(make_context(keydir, keys, "On-BadSignature quarantine\n"), tampered)
    assert quarantined.action is Action.QUARANTINE and quarantined.quarantine_reason
    assert added(quarantined, "Authentication-Results")


def test_testing_key_never_makes_the_message_suffer(keydir: Path, keys) -> None:
    tampered = remote_signed(keys, selector="testing").replace(b"body line", b"X")
    verdict = feed(make_context(keydir, keys, "On-BadSignature reject\n"), tampered)
    assert verdict.action is Action.ACCEPT
    assert dkim_results(verdict) == [("fail", "remote.test")]


def test_missing_key_uses_on_keynotfound(keydir: Path, keys) -> None:
    msg = remote_signed(keys, selector="nokey")
    assert dkim_results(feed(make_context(keydir, keys), msg)) == [("permerror", "remote.test")]
    verdict = feed(make_context(keydir, keys, "On-KeyNotFound tempfail\n"), msg)
    assert verdict.action is Action.TEMPFAIL


def test_dns_failure_is_temperror_and_tempfail_by_default(keydir: Path, keys) -> None:
    msg = remote_signed(keys, selector="broken")
    verdict = feed(make_context(keydir, keys), msg)
    assert verdict.action is Action.TEMPFAIL and verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.xcode) == ("451", "4.4.3")
    accepted = feed(make_context(keydir, keys, "On-DNSError accept\n"), msg)
    assert dkim_results(accepted) == [("temperror", "remote.test")]


def test_weak_key_gives_policy(keydir: Path, keys) -> None:
    msg = remote_signed(keys, selector="weak", key="weak")
    verdict = feed(make_context(keydir, keys, "MinimumKeyBits 2048\n"), msg)
    assert dkim_results(verdict) == [("policy", "remote.test")]


def test_on_default_is_a_blanket_for_every_failure(keydir: Path, keys) -> None:
    ctx = make_context(keydir, keys, "On-Default discard\n")
    assert feed(ctx, remote_signed(keys, selector="nokey")).action is Action.DISCARD
    assert feed(ctx, MESSAGE).action is Action.DISCARD  # On-NoSignature too


def test_no_signature_with_on_nosignature_reject(keydir: Path, keys) -> None:
    verdict = feed(make_context(keydir, keys, "On-NoSignature reject\n"), MESSAGE)
    assert verdict.action is Action.REJECT


def test_one_passing_signature_accepts_despite_a_failing_one(keydir: Path, keys) -> None:
    good = remote_signed(keys)
    bad = remote_signed(keys, message=MESSAGE.replace(b"body line", b"other"), selector="nokey")
    both = bad.split(b"From:")[0] + good  # the failing signature on top of a valid one
    verdict = feed(make_context(keydir, keys, "On-KeyNotFound reject\n"), both)
    assert verdict.action is Action.ACCEPT
    assert dkim_results(verdict) == [("permerror", "remote.test"), ("pass", "remote.test")]


def test_header_b_and_authserv_id_with_job_id(keydir: Path, keys) -> None:
    verdict = feed(make_context(keydir, keys, "AuthservIDWithJobID yes\nNoHeaderB yes\n"),
                   remote_signed(keys))  # fmt: skip
    (value,) = added(verdict, "Authentication-Results")
    # "/" is not a token character (RFC 2045): the id is quoted; the queue id keeps its case.
    assert value.startswith(f'"{AID}/4BqTEST";')
    assert "header.b" not in value


# -- forged Authentication-Results -----------------------------------------------------------


FORGERIES: list[tuple[str, bool]] = [
    (f"{AID}; dkim=pass header.d=remote.test", True),
    (f"{AID.upper()}; spf=pass smtp.mailfrom=a@remote.test", True),
    (f"{AID} 1; dmarc=pass", True),
    (f" {AID} (comment); none", True),
    (f"{AID}(; dkim=pass", True),  # unbalanced comment: unparseable, names us
    (f"{AID}; garbage without equals", True),
    ("upstream.example.org; dkim=pass header.d=remote.test", False),
    (f"other-{AID}; dkim=pass", False),
]


@pytest.mark.parametrize("value,removed", FORGERIES)
def test_forged_ar_with_our_authserv_id_is_removed(keydir: Path, keys, value: str,
                                                   removed: bool) -> None:  # fmt: skip
    msg = f"Authentication-Results: {value}\r\n".encode() + MESSAGE
    for ip in ("198.51.100.25", "127.0.0.1"):  # inbound and outbound alike
        verdict = feed(make_context(keydir, keys), msg, ip=ip)
        deletes = [e for e in verdict.edits if isinstance(e, DeleteHeader)]
        assert deletes == ([DeleteHeader("Authentication-Results", 1)] if removed else [])


def test_remove_ar_from_covers_listed_hosts_and_domains(keydir: Path, keys) -> None:
    msg = (b"Authentication-Results: a.example.net; dkim=pass\r\n"
           b"Authentication-Results: keep.example.org; dkim=pass\r\n"
           b"Authentication-Results: relay.internal.test; spf=pass smtp.mailfrom=x@y\r\n"
           + MESSAGE)  # fmt: skip
    ctx = make_context(keydir, keys, "RemoveARFrom .example.net, relay.internal.test\n")
    deletes = [e for e in feed(ctx, msg).edits if isinstance(e, DeleteHeader)]
    # Bottom-up, so earlier indexes stay valid while deleting.
    assert deletes == [DeleteHeader("Authentication-Results", 3),
                       DeleteHeader("Authentication-Results", 1)]  # fmt: skip


def test_peer_list_connection_is_not_processed(keydir: Path, keys) -> None:
    ctx = make_context(keydir, keys, "PeerList 192.0.2.0/24\n")
    assert Connection(ctx, hostname=None, ip="192.0.2.9").peer
    assert not Connection(ctx, hostname=None, ip="192.0.3.9").peer


def test_oversized_header_block_is_rejected(keydir: Path, keys) -> None:
    big = b"X-Big: " + b"a" * 2000 + b"\r\n"
    verdict = feed(make_context(keydir, keys, "MaximumHeaders 1000\n"), big + MESSAGE)
    assert verdict.action is Action.REJECT and verdict.reply is not None
    assert verdict.reply.code == "552"


def test_dkim_result_enum_values_are_rfc_tokens() -> None:
    assert [r.value for r in DkimResult] == [
        "none", "pass", "fail", "policy", "neutral", "temperror", "permerror"]


QUIRKY = (b"From: Alice <alice@example.com>\r\n"
          b"To:bob@remote.test\r\n"
          b"Subject:\ttabbed   and  spaced\r\n"
          b"Date: Mon, 23 Nov 2026 03:00:00 +0000\r\n"
          b"\r\nbody\r\n")  # fmt: skip


def test_simple_header_canonicalization_keeps_a_missing_space_after_the_colon(
        keydir: Path, keys) -> None:  # fmt: skip
    """With HDR_LEADSPC the values arrive exactly as on the wire: `To:bob` stays `To:bob`."""
    verdict = feed(make_context(keydir, keys, "Canonicalization simple/simple\n"), QUIRKY,
                   ip="127.0.0.1")  # fmt: skip
    signed = apply(QUIRKY, verdict)
    assert b"\r\nTo:bob@remote.test\r\n" in signed
    assert dkim.verify(signed, dnsfunc=zone_resolver(keys).dkimpy_dnsfunc)


def test_without_leading_space_negotiation_one_stripped_space_is_restored(
        keydir: Path, keys) -> None:  # fmt: skip
    """An MTA without HDR_LEADSPC strips one space after the colon; it is put back."""
    ctx = make_context(keydir, keys, "Canonicalization simple/simple\n")
    txn = Connection(ctx, hostname=None, ip="127.0.0.1", leading_space=False).transaction()
    txn.update_macros({"i": "Q"})
    for name, value in ((b"From", b"Alice <alice@example.com>"), (b"To", b"bob@remote.test"),
                        (b"Subject", b"hi")):  # fmt: skip
        txn.header(name.decode(), value)
    txn.body(b"body\r\n")
    verdict = txn.eom()
    message = (b"From: Alice <alice@example.com>\r\nTo: bob@remote.test\r\nSubject: hi\r\n"
               b"\r\nbody\r\n")  # fmt: skip
    assert dkim.verify(apply(message, verdict), dnsfunc=zone_resolver(keys).dkimpy_dnsfunc)


@pytest.mark.parametrize("direction", ["sign", "verify"])
def test_fifty_megabyte_message_is_processed_in_bounded_memory(keydir: Path, keys,
                                                               direction: str) -> None:  # fmt: skip
    """The body is hashed as it streams in and never kept: memory stays flat."""
    import tracemalloc

    ctx = make_context(keydir, keys)
    chunk = (b"0123456789" * 99 + b"\r\n") * 64  # ~64 KiB, Postfix's body chunk size
    count = (50 << 20) // len(chunk)
    header = remote_signed(keys).split(b"\r\n\r\n")[0] if direction == "verify" else None
    conn = Connection(ctx, hostname=None, ip="127.0.0.1" if direction == "sign" else
                      "198.51.100.25")  # fmt: skip
    txn = conn.transaction()
    txn.update_macros({"i": "BIG"})
    txn.envfrom("<a@example.com>")
    txn.rcpt("<b@example.net>")
    fields = MESSAGE.split(b"\r\n\r\n")[0] if header is None else header
    for line in fields.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            name, value = txn.headers.pop()
            txn.headers.append((name, value + b"\n" + line))
        else:
            name, _, value = line.partition(b":")
            txn.header(name.decode(), value)
    txn.eoh()
    tracemalloc.start()
    for _ in range(count):
        txn.body(chunk)
    verdict = txn.eom()
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak} bytes for a {count * len(chunk)}-byte body"
    if direction == "sign":
        assert added(verdict, "DKIM-Signature")
    else:
        assert dkim_results(verdict) == [("fail", "remote.test")]  # the body was replaced


def test_a_signing_library_failure_keeps_its_traceback(keydir: Path, keys,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """On-SignatureError answers, and the adapter logs the traceback below the line."""
    import authmilter.pipeline

    def boom(*_args: object, **_kwargs: object) -> bytes:
        raise RuntimeError("boom: simulated signing bug")

    monkeypatch.setattr(authmilter.pipeline, "sign", boom)
    verdict = feed(make_context(keydir, keys), MESSAGE, ip="127.0.0.1")
    assert verdict.action is Action.REJECT and "signing error" in verdict.log
    assert verdict.traceback is not None
    assert verdict.traceback.endswith("RuntimeError: boom: simulated signing bug")
