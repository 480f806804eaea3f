"""ARC in the milter's end of message: sealing (``ARCSign``/``ARCSealKey``) and trusted sealers
rescuing DMARC (``ARCTrustedSealers``, OpenDMARC's ``DomainWhitelist``), driven through the
pipeline event by event with a zone resolver; the sealed messages are checked by our verifier
and by dkimpy's ``arc_verify``.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import dkim
import pytest

from authmilter.arc_sign import seal as arc_seal
from authmilter.arc_verify import ArcOutcome, verify_chain
from authmilter.config import Config, load_config
from authmilter.errors import ConfigError
from authmilter.keys import PrivateKey, generate_private_key, key_record_text
from authmilter.pipeline import AddHeader, Context, Verdict
from dnsserver import make_zone, txt_rdata
from fakedns import ZoneResolver
from helpers import added, apply, drive, make_message, milter_view, pieces
from test_arc_verify import split

ORIGIN = "arc.test"
AUTHOR = f"origin.{ORIGIN}"  # p=reject
LIST = f"list.{ORIGIN}"  # a forwarder that seals
OURS = f"mx.ours.{ORIGIN}"
UP = f"up.{ORIGIN}"  # a sealer before the list  # our authserv-id and sealing domain
P_NONE = "v=DMARC1; p=none"
ARC_FIELDS = ("ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results")


@pytest.fixture(scope="module")
def key() -> PrivateKey:
    return generate_private_key("rsa", 2048)


def zone(key: PrivateKey, *, dmarc: str = "v=DMARC1; p=reject") -> ZoneResolver:
    record = txt_rdata(key_record_text(key))
    records = [(f"sel._domainkey.{d.removesuffix('.' + ORIGIN)}", "TXT", record)
               for d in (LIST, OURS, AUTHOR, UP)]  # fmt: skip
    records.append((f"_dmarc.{AUTHOR.removesuffix('.' + ORIGIN)}", "TXT", txt_rdata(dmarc)))
    return ZoneResolver(make_zone(ORIGIN, records), ORIGIN)


def context(tmp_path: Path, key: PrivateKey, extra: str = "", *,
            dns: ZoneResolver | None = None) -> Context:  # fmt: skip
    pem = tmp_path / "seal.pem"
    pem.write_bytes(key.pem())
    pem.chmod(0o600)
    (tmp_path / "keytable").write_text(f"sealer {OURS}:sel:{pem}\nlister {LIST}:sel:{pem}\n")
    (tmp_path / "signingtable").write_text(f"*@{LIST} lister\n")
    text = (f"AuthservID {OURS}\nMode sv\nKeyTable file:{tmp_path}/keytable\n"
            f"SigningTable refile:{tmp_path}/signingtable\nARCSealKey sealer\n"
            f"RejectFailures yes\n{extra}")  # fmt: skip
    cfg = Config.from_text(text, path=str(tmp_path / "authmilter.conf"))
    return Context.build(cfg, resolver=dns or zone(key), clock=time.time)  # type: ignore[arg-type]


def upstream_seal(message: bytes, domain: str, key: PrivateKey, ar_value: str, *,
                  authserv_id: str | None = None) -> bytes:  # fmt: skip
    """One forwarder's ARC Set on top of ``message`` (its chain judged by our verifier)."""
    headers, body = split(message)
    chain = verify_chain(headers, body, zone(key), now=time.time())
    fields = arc_seal(headers, body, (domain, "sel", key),
                      authserv_id=authserv_id or f"mx.{domain}", ar_value=ar_value,
                      chain=chain, now=time.time())  # fmt: skip
    return b"".join(f"{n}: {v}\r\n".encode() for n, v in fields) + message


def delivered(message: bytes, verdict: Verdict) -> bytes:
    return apply(message, verdict)


def arc_of(message: bytes, key: PrivateKey) -> ArcOutcome:
    headers, body = split(message)
    return verify_chain(headers, body, zone(key), now=time.time())


def dkimpy_arc(message: bytes, key: PrivateKey) -> bytes:
    dns = zone(key)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return b"".join(dns.txt(name.decode().rstrip(".")))

    cv, _results, _reason = dkim.arc_verify(message, dnsfunc=dnsfunc)
    return bytes(cv)


def inbound(ctx: Context, message: bytes, ip: str = "198.51.100.7") -> Verdict:
    fields, body = milter_view(message)
    return drive(ctx, fields, pieces(body), mail_from=f"bounce@{LIST}", ip=ip)


def arc_edits(verdict: Verdict) -> list[str]:
    return [e.name for e in verdict.edits if isinstance(e, AddHeader) and e.name in ARC_FIELDS]


# -- configuration ----------------------------------------------------------------------------


def test_arcsign_without_a_seal_key_is_an_error_at_its_line(tmp_path: Path) -> None:
    conf = tmp_path / "a.conf"
    conf.write_text("Mode sv\nARCSign inbound\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(conf))
    assert f"{conf}:2" in str(err.value) and "ARCSealKey" in str(err.value)


def test_a_seal_key_the_keytable_lacks_is_an_error_naming_the_keys(tmp_path: Path,
                                                                   key: PrivateKey) -> None:
    with pytest.raises(ConfigError) as err:
        context(tmp_path, key, "ARCSign inbound\nARCSealKey nosuch\n")
    assert "nosuch" in str(err.value) and "sealer" in str(err.value)
    assert "authmilter.conf:" in str(err.value)


def test_an_ed25519_seal_key_is_refused(tmp_path: Path, key: PrivateKey) -> None:
    ed = generate_private_key("ed25519")
    pem = tmp_path / "ed.pem"
    pem.write_bytes(ed.pem())
    pem.chmod(0o600)
    (tmp_path / "kt2").write_text(f"ed {OURS}:ed:{pem}\n")
    cfg = Config.from_text(f"AuthservID {OURS}\nMode sv\nKeyTable file:{tmp_path}/kt2\n"
                           "ARCSign inbound\n"
                           "ARCSealKey ed\n", path=str(tmp_path / "x.conf"))  # fmt: skip
    with pytest.raises(ConfigError, match="rsa-sha256 only"):
        Context.build(cfg, resolver=zone(key))  # type: ignore[arg-type]


def test_opendmarc_domainwhitelist_is_read_as_trusted_sealers_with_a_warning(
        tmp_path: Path, key: PrivateKey) -> None:  # fmt: skip
    listed = tmp_path / "sealers"
    listed.write_text(f"other.{ORIGIN}\n")
    conf = tmp_path / "opendmarc.conf"
    conf.write_text(f"DomainWhitelist {LIST},b.example\nDomainWhitelistFile {listed}\n"
                    "DomainWhitelistSize 100\n")  # fmt: skip
    loaded = load_config(str(conf))
    warnings = [str(w) for w in loaded.warnings]
    assert any(w.startswith(f"{conf}:1: DomainWhitelist ") and "ARCTrustedSealers" in w
               for w in warnings), warnings  # fmt: skip
    assert any(w.startswith(f"{conf}:2: DomainWhitelistFile ") for w in warnings), warnings
    assert any(w.startswith(f"{conf}:3: DomainWhitelistSize ") for w in warnings), warnings
    cfg = dataclasses.replace(loaded.config, authserv_id=OURS)
    ctx = Context.build(cfg, resolver=zone(key))  # type: ignore[arg-type]
    assert ctx.trusts_sealer(LIST) and ctx.trusts_sealer(f"OTHER.{ORIGIN}.")
    assert ctx.trusts_sealer("b.example") and not ctx.trusts_sealer(f"x.{LIST}")


# -- sealing inbound mail ---------------------------------------------------------------------


def test_inbound_mail_is_sealed_with_our_results_and_the_seal_verifies(
        tmp_path: Path, key: PrivateKey) -> None:  # fmt: skip
    ctx = context(tmp_path, key, "ARCSign inbound\n", dns=zone(key, dmarc=P_NONE))
    message = make_message(from_=f"Alice <alice@{AUTHOR}>")
    verdict = inbound(ctx, message)
    # Each edit goes to the top: the ARC-Seal is inserted last, so it ends on top.
    assert arc_edits(verdict) == ["ARC-Authentication-Results", "ARC-Message-Signature",
                                  "ARC-Seal"]  # fmt: skip
    (ar,) = added(verdict, "Authentication-Results")
    (aar,) = added(verdict, "ARC-Authentication-Results")
    assert " ".join(aar.split()) == f"i=1; {' '.join(ar.split())}"
    out = delivered(message, verdict)
    assert out.startswith(b"ARC-Seal: i=1; a=rsa-sha256; cv=none")
    outcome = arc_of(out, key)
    assert outcome.result == "pass" and outcome.instances == 1, outcome
    assert dkimpy_arc(out, key) == b"pass"
    assert f"ARC-sealed i=1 d={OURS} s=sel" in verdict.log


def test_a_forwarded_chain_gets_the_next_instance_with_cv_pass(tmp_path: Path,
                                                               key: PrivateKey) -> None:
    ctx = context(tmp_path, key, "ARCSign inbound\n", dns=zone(key, dmarc=P_NONE))
    message = upstream_seal(make_message(from_=f"Alice <alice@{AUTHOR}>"), LIST, key,
                            f"spf=pass smtp.mailfrom={LIST}")  # fmt: skip
    verdict = inbound(ctx, message)
    out = delivered(message, verdict)
    assert re.search(rb"^ARC-Seal: i=2; a=rsa-sha256; cv=pass", out), out[:200]
    outcome = arc_of(out, key)
    assert outcome.result == "pass" and outcome.instances == 2, outcome
    assert dkimpy_arc(out, key) == b"pass"


def test_a_broken_chain_is_sealed_once_with_cv_fail_and_never_again(tmp_path: Path,
                                                                    key: PrivateKey) -> None:
    ctx = context(tmp_path, key, "ARCSign inbound\n", dns=zone(key, dmarc=P_NONE))
    message = upstream_seal(make_message(from_=f"Alice <alice@{AUTHOR}>"), LIST, key,
                            f"spf=pass smtp.mailfrom={LIST}")  # fmt: skip
    broken = message.replace(b"\r\n\r\n", b"\r\n\r\nadded after sealing\r\n", 1)
    verdict = inbound(ctx, broken)
    (ar,) = added(verdict, "Authentication-Results")
    assert "arc=fail" in ar
    out = delivered(broken, verdict)
    assert re.search(rb"^ARC-Seal: i=2; a=rsa-sha256; cv=fail", out)
    assert arc_of(out, key).result == "fail"
    # The next hop finds the chain ended by cv=fail: no further set, said in the log.
    again = inbound(ctx, out)
    assert arc_edits(again) == [] and "not ARC-sealed" in again.log and "cv=fail" in again.log
    assert again.action.value == "accept"


def test_rejected_mail_is_not_sealed(tmp_path: Path, key: PrivateKey) -> None:
    ctx = context(tmp_path, key, "ARCSign inbound\n")
    # From the p=reject domain without its signature: DMARC fails and RejectFailures rejects.
    verdict = inbound(ctx, make_message(from_=f"Alice <alice@{AUTHOR}>"))
    assert verdict.action.value == "reject" and arc_edits(verdict) == []


def test_arcsign_outbound_does_not_seal_inbound_mail(tmp_path: Path, key: PrivateKey) -> None:
    ctx = context(tmp_path, key, "ARCSign outbound\n", dns=zone(key, dmarc="v=DMARC1; p=none"))
    verdict = inbound(ctx, make_message(from_=f"Alice <alice@{AUTHOR}>"))
    assert verdict.action.value == "accept" and arc_edits(verdict) == []


# -- sealing outbound mail (a list resending) -------------------------------------------------


def list_copy(key: PrivateKey, *, arc: str = "arc=pass") -> bytes:
    """What a list on our host resends: the message as it arrived (one ARC Set from upstream,
    our Authentication-Results from its arrival), with a footer and a subject tag."""
    original = upstream_seal(make_message(from_=f"Alice <alice@{LIST}>"), UP, key,
                             f"dkim=pass header.d={AUTHOR}")  # fmt: skip
    ours = (f"Authentication-Results: {OURS}; dkim=pass header.d={AUTHOR}; "
            f"spf=pass smtp.mailfrom={AUTHOR}; {arc} smtp.remote-ip=192.0.2.1\r\n").encode()
    resent = ours + original
    resent = resent.replace(b"Subject: Quarterly", b"Subject: [list] Quarterly")
    return resent + b"-- \r\nthe list footer\r\n"


def outbound(ctx: Context, message: bytes) -> Verdict:
    fields, body = milter_view(message)
    return drive(ctx, fields, pieces(body), mail_from=f"list-bounces@{LIST}", ip="127.0.0.1")


def test_a_list_resending_is_signed_and_sealed_with_its_arrival_results(
        tmp_path: Path, key: PrivateKey) -> None:  # fmt: skip
    ctx = context(tmp_path, key, "ARCSign outbound\n")
    message = list_copy(key)
    verdict = outbound(ctx, message)
    assert "signed d=" in verdict.log and "ARC-sealed i=2" in verdict.log, verdict.log
    # Top down: ARC-Seal, AMS, AAR, then the DKIM-Signature made in the same pass.
    names = [e.name for e in verdict.edits if isinstance(e, AddHeader)]
    assert names == ["DKIM-Signature", *ARC_FIELDS[::-1]], names
    (aar,) = added(verdict, "ARC-Authentication-Results")
    assert " ".join(aar.split()).startswith(f"i=2; {OURS}; dkim=pass header.d={AUTHOR}")
    (ams,) = added(verdict, "ARC-Message-Signature")
    assert "dkim-signature" in re.sub(r"\s", "", ams).lower()  # the seal covers the signature
    out = delivered(message, verdict)
    # The upstream AMS no longer matches (footer, tag): the chain passes on the newest AMS
    # and every seal, as RFC 8617 §5.2 asks; oldest-pass says where the breakage was.
    outcome = arc_of(out, key)
    assert outcome.result == "pass", outcome
    assert outcome.instances == 2 and outcome.oldest_pass == 2, outcome
    assert dkimpy_arc(out, key) == b"pass"


def test_outbound_mail_without_our_results_is_signed_not_sealed(tmp_path: Path,
                                                                key: PrivateKey) -> None:
    ctx = context(tmp_path, key, "ARCSign both\n")
    forged = (f"Authentication-Results: mx.elsewhere.example; dkim=pass header.d={AUTHOR}\r\n"
              ).encode() + make_message(from_=f"Bob <bob@{LIST}>")  # fmt: skip
    verdict = outbound(ctx, forged)
    assert "signed d=" in verdict.log and arc_edits(verdict) == []


def test_outbound_results_whose_arc_was_fail_seal_cv_fail(tmp_path: Path,
                                                          key: PrivateKey) -> None:
    ctx = context(tmp_path, key, "ARCSign outbound\n")
    message = list_copy(key, arc="arc=fail")
    out = delivered(message, outbound(ctx, message))
    assert re.search(rb"^ARC-Seal: i=2; a=rsa-sha256; cv=fail", out)


# -- trusted sealers rescue DMARC ---------------------------------------------------------------


def forwarded(key: PrivateKey, aar: str) -> bytes:
    """Mail from the p=reject domain, changed by the list after it checked the author's
    DKIM (which therefore fails here), sealed by the list with results ``aar``."""
    message = make_message(from_=f"Alice <alice@{AUTHOR}>", subject="[list] Quarterly numbers")
    return upstream_seal(message, LIST, key, aar)


RESCUING = f"dkim=pass header.d={AUTHOR} header.s=sel; spf=pass smtp.mailfrom={LIST}"


def test_a_trusted_sealer_with_aligned_dkim_overrides_the_reject(tmp_path: Path,
                                                                 key: PrivateKey) -> None:
    ctx = context(tmp_path, key, f"ARCTrustedSealers {LIST}\n")
    verdict = inbound(ctx, forwarded(key, RESCUING))
    assert verdict.action.value == "accept", verdict.log
    (ar,) = added(verdict, "Authentication-Results")
    ar = " ".join(ar.split())
    assert re.search(rf"dmarc=fail \(p=reject dis=none; ARC override: arc=pass "
                     rf"as\[1\]\.d={re.escape(LIST)} as\[1\]\.s=sel", ar), ar
    assert "arc=pass" in ar
    assert f"overridden: trusted ARC sealer {LIST}, i=1, dkim" in verdict.log


def test_an_untrusted_sealer_changes_nothing(tmp_path: Path, key: PrivateKey) -> None:
    ctx = context(tmp_path, key, f"ARCTrustedSealers other.{ORIGIN}\n")
    verdict = inbound(ctx, forwarded(key, RESCUING))
    assert verdict.action.value == "reject" and "override" not in verdict.log


def test_a_trusted_sealer_whose_results_do_not_pass_dmarc_changes_nothing(
        tmp_path: Path, key: PrivateKey) -> None:  # fmt: skip
    # Strict alignment: the list shares the author's organizational domain (arc.test).
    strict = zone(key, dmarc="v=DMARC1; p=reject; adkim=s; aspf=s")
    ctx = context(tmp_path, key, f"ARCTrustedSealers {LIST}\n", dns=strict)
    verdict = inbound(ctx, forwarded(key, f"dkim=pass header.d={LIST}; spf=fail "
                                          f"smtp.mailfrom={AUTHOR}"))  # fmt: skip
    assert verdict.action.value == "reject"


def test_a_broken_chain_from_a_trusted_sealer_changes_nothing(tmp_path: Path,
                                                              key: PrivateKey) -> None:
    ctx = context(tmp_path, key, f"ARCTrustedSealers {LIST}\n")
    broken = forwarded(key, RESCUING).replace(b"Subject: [list]", b"Subject: [LIST]")
    verdict = inbound(ctx, broken)
    assert verdict.action.value == "reject"
    (ar,) = [" ".join(v.split()) for v in added(verdict, "Authentication-Results")] or [""]
    assert ar == ""  # a reject adds no header fields


def test_the_report_record_keeps_the_failures_and_says_local_policy(
        tmp_path: Path, key: PrivateKey) -> None:  # fmt: skip
    db = tmp_path / "dmarc.db"
    ctx = context(tmp_path, key, f"ARCTrustedSealers {LIST}\nReportDatabase sqlite:///{db}\n")
    verdict = inbound(ctx, forwarded(key, RESCUING))
    event = verdict.dmarc_event
    assert event is not None and event.disposition == "none"
    assert event.dkim_aligned == "fail" and event.spf_aligned == "fail"  # RFC 9990
    (reason,) = event.overrides
    assert reason[0] == "local_policy"
    assert re.fullmatch(rf"arc=pass as\[1\]\.d={re.escape(LIST)} as\[1\]\.s=sel "
                        rf"remote-ip\[1\]=\S+", reason[1]) or reason[1].startswith(
        f"arc=pass as[1].d={LIST} as[1].s=sel"), reason


def test_p_none_failures_are_not_overridden(tmp_path: Path, key: PrivateKey) -> None:
    dns = zone(key, dmarc="v=DMARC1; p=none")
    ctx = context(tmp_path, key, f"ARCTrustedSealers {LIST}\n", dns=dns)
    verdict = inbound(ctx, forwarded(key, RESCUING))
    assert verdict.action.value == "accept" and "override" not in verdict.log



def test_a_rescue_also_drops_an_spf_reject_held_for_dmarc(tmp_path: Path, key: PrivateKey) -> None:
    # The list's envelope sender has "-all" for the forwarder's address: SPF fails, and
    # SPFRejectAfterDMARC holds the reject until DMARC; the trusted sealer's results win.
    spf = (f"list.{ORIGIN}".removesuffix("." + ORIGIN), "TXT", txt_rdata("v=spf1 -all"))
    record = txt_rdata(key_record_text(key))
    records = [(f"sel._domainkey.{d.removesuffix('.' + ORIGIN)}", "TXT", record)
               for d in (LIST, OURS, AUTHOR)]  # fmt: skip
    records += [(f"_dmarc.{AUTHOR.removesuffix('.' + ORIGIN)}", "TXT",
                 txt_rdata("v=DMARC1; p=reject")), spf]  # fmt: skip
    dns = ZoneResolver(make_zone(ORIGIN, records), ORIGIN)
    extra = f"ARCTrustedSealers {LIST}\nMail_From_reject Fail\nSPFRejectAfterDMARC yes\n"
    ctx = context(tmp_path, key, extra, dns=dns)
    verdict = inbound(ctx, forwarded(key, RESCUING))
    assert verdict.action.value == "accept", verdict.log
    assert "spf=fail" in verdict.log
    assert "SPF reject dropped: a trusted ARC sealer's results pass DMARC" in verdict.log
    untrusted = context(tmp_path, key, extra.replace(LIST, f"other.{ORIGIN}"), dns=dns)
    assert inbound(untrusted, forwarded(key, RESCUING)).action.value == "reject"
