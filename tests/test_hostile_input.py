"""Hostile input (issue 6): each test is named after a known class of attack on DKIM/DMARC filters.

Every test drives a real message through :mod:`authmilter.pipeline` (Connection, then a
Transaction: MAIL FROM, RCPT TO, each header field, end of header, body chunks, end of message)
and asserts two things: the milter answered (a :class:`Verdict` came back, with its log line,
and nothing escaped), and the documented result, read from the Authentication-Results field the
verdict adds. ``docs/hostile-input.md`` maps every class to its test, its result and why.

The cast (:mod:`helpers`, shared with the Postfix and drop-in tests), in zone text that NSD
could serve as well (:mod:`fakedns`):

- ``bank.example`` is the victim: ``p=reject``, SPF only for 203.0.113.5, a DKIM key ``sel``;
- ``evil.example`` is the attacker's own domain: SPF covers the attacker's address, a DKIM key
  ``sel`` the attacker holds, ``p=none``.

So the attacker can always get SPF and DKIM passes for evil.example; the question each test asks
is whether some trick turns them into ``dmarc=pass`` for bank.example. It never may.
"""

from __future__ import annotations

import base64
import re
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim
import pytest

import helpers
from authmilter.arc_sign import seal as arc_seal
from authmilter.arc_verify import verify_chain
from authmilter.config import Action, Config
from authmilter.dkim_verify import verify_message
from authmilter.dmarc import parse_record
from authmilter.pipeline import AddHeader, Context, DeleteHeader, Verdict
from helpers import (
    AID,
    ATTACKER_IP,
    BANK,
    BOUNCE,
    DMARC_HUGE_RUA_TEXT,
    DMARC_RECORDS,
    EVIL,
    FORGED_SPF,
    HUGE_RUA,
    IDN,
    INJECTED_AR,
    Header,
    Keys,
    Mutation,
    Tags,
    World,
    added,
    apply,
    ar_fields,
    assert_no_pass_for_bank,
    compose,
    dkim_of,
    dkim_sign,
    dmarc_of,
    drive,
    field_values,
    garbage_signatures,
    keys,
    milter_view,
    nested_comments,
    our_ar,
    receiver_of,
    run,
    set_tag,
    sig_field,
    sig_tags,
    signed_by_evil,
    spf_of,
    world,
)
from helpers import HOSTILE_BODY as BODY

__all__ = ["keys", "world"]  # the shared fixtures (tests/helpers.py), used here by name


@pytest.fixture(autouse=True)
def _fresh_now() -> None:
    """Re-read the clock for each test: dkimpy signs with the real time, and a value frozen at
    import goes stale (t= "in the future") once the suite has run longer than ClockDrift."""
    helpers.refresh_now()


# -- reading the verdict ----------------------------------------------------------------------


def deletes(verdict: Verdict, name: str = "Authentication-Results") -> list[int]:
    return [e.occurrence for e in verdict.edits if isinstance(e, DeleteHeader) and e.name == name]


# -- 1. the From field ------------------------------------------------------------------------

# (From values, dmarc=, header.from=). The attacker signs every message with d=evil.example and
# passes SPF for evil.example: only the reading of From stands between it and a bank.example pass.
FROM_CASES: list[tuple[str, list[str | bytes], str, str | None]] = [
    # RFC 7489 §6.6.1 / RFC 5322 §3.6: exactly one From; anything else is out of DMARC's reach.
    ("multiple-from-fields", [f"x@{EVIL}", f"ceo@{BANK}"], "permerror", None),
    ("multiple-from-fields-same", [f"ceo@{BANK}", f"ceo@{BANK}"], "permerror", None),
    ("no-from-field", [], "permerror", None),
    ("several-addresses-one-domain", [f"ceo@{BANK}, cfo@Bank.Example"], "fail", BANK),
    ("several-addresses-two-domains", [f"x@{EVIL}, ceo@{BANK}"], "permerror", None),
    ("quoted-comma-display-name", [f'"Doe, John" <j@{EVIL}>'], "pass", EVIL),
    # CVE-2023-27043 (Python's getaddresses): an address inside a quoted display name.
    ("quoted-address-in-display-name", [f'"ceo@{BANK}, " <x@{EVIL}>'], "pass", EVIL),
    ("unbalanced-angle-open", [f"CEO <ceo@{BANK}"], "permerror", None),
    ("unbalanced-angle-close", [f"ceo@{BANK}> <x@{EVIL}>"], "permerror", None),
    ("two-angle-addresses", [f"CEO <ceo@{BANK}> <x@{EVIL}>"], "permerror", None),
    ("addr-spec-then-angle-address", [f"ceo@{BANK} <x@{EVIL}>"], "permerror", None),
    ("comment-holds-attacker", [f"ceo@{BANK} (x@{EVIL})"], "fail", BANK),
    ("comment-holds-victim", [f"x@{EVIL} (ceo@{BANK})"], "pass", EVIL),
    ("group-syntax", [f"undisclosed: ceo@{BANK};"], "fail", BANK),
    ("empty-group", ["undisclosed-recipients:;"], "permerror", None),
    ("group-two-domains", [f"g: x@{EVIL}, ceo@{BANK};"], "permerror", None),
    # RFC 2047 §5: an encoded word is display text, never decoded into an address.
    ("encoded-word-raw-at", [f"=?utf-8?q?ceo@{BANK}?= <x@{EVIL}>"], "permerror", None),
    ("encoded-word-q", [f"=?utf-8?q?ceo=40bank=2Eexample?= <x@{EVIL}>"], "pass", EVIL),
    ("encoded-word-b", ["=?utf-8?b?" + base64.b64encode(f"ceo@{BANK}".encode()).decode()
                        + f"?= <x@{EVIL}>"], "pass", EVIL),  # fmt: skip
    ("empty-address", ["<>"], "permerror", None),
    ("display-name-empty-address", ["CEO <>"], "permerror", None),
    ("no-domain", ["ceo"], "permerror", None),
    ("at-without-domain", ["ceo@"], "permerror", None),
    ("address-literal", ["ceo@[203.0.113.5]"], "permerror", None),
    ("space-inside-domain", ["ceo@bank .example"], "permerror", None),
    ("quoted-local-part-with-at", [f'"x@{EVIL}"@{BANK}'], "fail", BANK),
    ("source-route", [f"<@{BANK}:x@{EVIL}>"], "pass", EVIL),
    ("trailing-dot", [f"ceo@{BANK}."], "fail", BANK),
    ("two-at-signs", [f"x@{EVIL}@{BANK}"], "permerror", None),
]


@pytest.mark.parametrize("froms,result,header_from",
                         [pytest.param(f, r, h, id=i) for i, f, r, h in FROM_CASES])  # fmt: skip
def test_from_field_tricks_get_dmarc_for_the_displayed_domain_or_permerror(
        world: World, froms: list[str | bytes], result: str,
        header_from: str | None) -> None:  # fmt: skip
    raw = compose(*froms)
    if froms:  # dkimpy cannot sign a message without From
        raw = signed_by_evil(raw, world.keys)
    verdict = run(world.ctx(), raw)
    assert verdict.action is Action.ACCEPT  # RejectFailures, RequiredHeaders… are off
    assert dmarc_of(verdict) == (result, header_from)
    assert spf_of(verdict) == ("pass", BOUNCE)
    assert_no_pass_for_bank(verdict)


@pytest.mark.parametrize("froms,conf,xcode", [
    pytest.param([f"x@{EVIL}", f"ceo@{BANK}"], "RequiredHeaders yes", "5.6.0", id="two-fields"),
    pytest.param([], "RequiredHeaders yes", "5.6.0", id="no-field"),
    pytest.param([f"x@{EVIL}, ceo@{BANK}"], "RejectMultiValueFrom yes", "5.7.1",
                 id="two-domains"),
    pytest.param([f"g: x@{EVIL}, ceo@{BANK};"], "RejectMultiValueFrom yes", "5.7.1",
                 id="group-two-domains"),
])  # fmt: skip
def test_from_field_tricks_are_rejected_when_configured(world: World, froms: list[str],
                                                        conf: str, xcode: str) -> None:  # fmt: skip
    verdict = run(world.ctx(conf + "\n"), compose(*froms))
    assert verdict.action is Action.REJECT and verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.xcode) == ("550", xcode)
    assert verdict.edits == () and "action=reject" in verdict.log


@pytest.mark.parametrize("conf", ["", "MaximumSignaturesToVerify 0\n"], ids=["default", "max-0"])
def test_deeply_nested_comments_in_from(world: World, bank_signed, conf: str) -> None:
    """RFC 5322 §3.2.2 comments nest without limit; a parser that recurses per level
    (``email.utils.getaddresses``) dies with RecursionError at about 500 levels."""
    tags, _ = bank_signed
    raw = sig_field(tags) + compose(f"{nested_comments(1000)} ceo@{BANK}")
    verdict = run(world.ctx(conf), raw)
    assert dmarc_of(verdict) == ("fail", BANK)
    assert dkim_of(verdict) == [("fail", BANK)]  # the signed From was different


def test_deeply_nested_comments_in_from_when_verifying_author_signatures(world: World,
                                                                        keys: Keys) -> None:
    """MaximumSignaturesToVerify 0 picks signatures by the author domain: same parser."""
    raw = compose(f"{nested_comments(1000)} ceo@{BANK}")
    signed = dkim_sign(raw, keys.bank, BANK) + raw
    outcomes = verify_message(signed, world.resolver, max_signatures=0, now=helpers.NOW)
    assert [(o.result.value, o.domain) for o in outcomes] == [("pass", BANK)]


# -- 2. Authentication-Results injection ------------------------------------------------------


@pytest.mark.parametrize("value,claims",
                         [pytest.param(v, c, id=i) for i, v, c in INJECTED_AR])  # fmt: skip
def test_injected_authentication_results_claiming_our_id_is_deleted(
        world: World, value: str, claims: bool) -> None:  # fmt: skip
    raw = signed_by_evil(compose(f"ceo@{BANK}", top=ar_fields([value])), world.keys)
    verdict = run(world.ctx(), raw)
    assert deletes(verdict) == ([1] if claims else [])
    # The injected pass never becomes ours.
    assert dmarc_of(verdict) == ("fail", BANK)
    assert dkim_of(verdict) == [("pass", EVIL)]
    assert_no_pass_for_bank(verdict)


def test_all_injected_authentication_results_at_once_leave_only_ours(world: World) -> None:
    values = [v for _i, v, _c in INJECTED_AR]
    raw = compose(f"ceo@{BANK}", top=ar_fields(values[: len(values) // 2]),
                  extra=ar_fields(values[len(values) // 2 :]))  # fmt: skip
    verdict = run(world.ctx(), raw)
    claimed = [n for n, (_i, _v, c) in enumerate(INJECTED_AR, start=1) if c]
    assert deletes(verdict) == sorted(claimed, reverse=True)  # bottom-up: indexes stay valid
    delivered = apply(raw, verdict)
    kept = [v for _i, v, c in INJECTED_AR if not c]
    seen = [" ".join(v.split()) for v in field_values(delivered, "Authentication-Results")]
    assert seen[0].startswith(f"{AID}; spf=pass")  # ours, on top
    assert seen[1:] == kept
    assert dmarc_of(verdict) == ("fail", BANK)


TRUSTED = "border.example.net"


@pytest.mark.parametrize("authserv_id,trusted", [
    pytest.param(TRUSTED, True, id="trusted"),
    pytest.param(TRUSTED.upper(), True, id="trusted-upper-case"),
    pytest.param(f"{TRUSTED}.{EVIL}", False, id="suffix-look-alike"),
    pytest.param(f"x{TRUSTED}", False, id="prefix-look-alike"),
    pytest.param(f"{TRUSTED}.", False, id="absolute-name"),
    pytest.param(f'"{TRUSTED}"', False, id="quoted"),
    pytest.param(f"{TRUSTED}/123", False, id="job-id-form"),
    pytest.param(f"{EVIL} ({TRUSTED})", False, id="in-comment-after"),
    pytest.param(f"({TRUSTED}) {EVIL}", False, id="in-comment-before"),
    pytest.param(f"{TRUSTED}(", False, id="unbalanced-comment"),
])  # fmt: skip
def test_trusted_authserv_id_look_alike_is_not_trusted(world: World, authserv_id: str,
                                                       trusted: bool) -> None:  # fmt: skip
    """TrustedAuthservIDs: only the exact id (any case) vouches for DKIM and SPF results."""
    forged = f"{authserv_id}; dkim=pass header.d={BANK}; spf=pass smtp.mailfrom=ceo@{BANK}"
    # Our SPF check is skipped for a whitelisted relay: the upstream SPF result would count.
    ctx = world.ctx(f"Whitelist {ATTACKER_IP}/32\nTrustedAuthservIDs {TRUSTED}\n")
    verdict = run(ctx, compose(f"ceo@{BANK}", top=ar_fields([forged])), mail_from=f"ceo@{BANK}")
    assert dmarc_of(verdict) == ("pass" if trusted else "fail", BANK)


@pytest.mark.parametrize("mail_from", [
    pytest.param(f'"x;dmarc=pass header.from={BANK}"@{EVIL}', id="quoted-local-part"),
    pytest.param(f"x(dmarc=pass;@{EVIL}", id="unbalanced-comment-in-local-part"),
    pytest.param(f"x(dmarc=pass)@{EVIL}", id="comment-in-local-part"),
    pytest.param(f"jörg;dmarc=pass@{EVIL}", id="8bit-and-semicolon"),
])  # fmt: skip
def test_envelope_sender_with_result_syntax_does_not_add_or_hide_results(world: World,
                                                                         mail_from: str) -> None:
    """The envelope sender is written into our field (smtp.mailfrom): it stays one value, and
    cannot open a comment that hides the clauses after it."""
    verdict = run(world.ctx(), compose(f"ceo@{BANK}"), mail_from=mail_from)
    (value,) = added(verdict, "Authentication-Results")
    if mail_from.isascii():  # authres reads ASCII only (RFC 8601 predates RFC 6532 there)
        assert [r.method for r in our_ar(verdict).results] == ["spf", "dmarc"]
        assert spf_of(verdict)[0] == "pass"
        assert dmarc_of(verdict) == ("fail", BANK)
    assert value.endswith(f"; dmarc=fail (p=reject dis=none) header.from={BANK} "
                          "policy.dmarc=reject")


@pytest.mark.parametrize("identity", ["x(@bank.example", "x;dmarc=pass@bank.example",
                                      'x"(@bank.example'])  # fmt: skip
def test_signature_identity_cannot_hide_the_clauses_after_it(world: World, bank_signed,
                                                             identity: str) -> None:  # fmt: skip
    """i= is copied into header.i: "(" in it must not comment out our spf= and dmarc=."""
    tags, raw = bank_signed
    verdict = run(world.ctx(), sig_field(set_tag("i", identity)(tags)) + raw)
    assert [r.method for r in our_ar(verdict).results] == ["dkim", "spf", "dmarc"]
    assert dkim_of(verdict)[0][0] in ("fail", "permerror")
    assert dmarc_of(verdict) == ("fail", BANK)


# -- 3. forged Received-SPF -------------------------------------------------------------------


@pytest.mark.parametrize("mail_from,conf,spf", [
    pytest.param(BOUNCE, "", "pass", id="spf-pass-unaligned"),
    pytest.param(f"ceo@{BANK}", "Mail_From_reject False\n", "fail", id="spf-fail"),
])  # fmt: skip
@pytest.mark.parametrize("value,claims",
                         [pytest.param(v, c, id=i) for i, v, c in FORGED_SPF])  # fmt: skip
def test_forged_received_spf_does_not_change_our_result(world: World, value: str, claims: bool,
                                                        mail_from: str, conf: str,
                                                        spf: str) -> None:  # fmt: skip
    raw = compose(f"ceo@{BANK}", top=[("Received-SPF", value)])
    verdict = run(world.ctx(conf), raw, mail_from=mail_from)
    assert spf_of(verdict) == (spf, mail_from)
    assert dmarc_of(verdict) == ("fail", BANK)
    # Received-SPF that claims our receiver= is removed (as a forged A-R); others are trace.
    assert deletes(verdict, "Received-SPF") == ([1] if claims else [])
    values = field_values(apply(raw, verdict), "Received-SPF")
    ours = [v for v in values if receiver_of(v) == AID]
    assert len(ours) == 1 and values[0] == ours[0]  # ours alone, on top
    assert ours[0].lower().startswith(spf) and f"client-ip={ATTACKER_IP};" in ours[0]
    assert (value in values) is not claims


def test_several_forged_received_spf_are_deleted_bottom_up(world: World) -> None:
    extra = [("Received-SPF", v) for _i, v, _c in FORGED_SPF]
    raw = compose(f"ceo@{BANK}", top=extra[:3], extra=extra[3:] + extra[:1])
    verdict = run(world.ctx(), raw)
    claimed = [n for n, (_i, _v, c) in enumerate(FORGED_SPF + FORGED_SPF[:1], start=1) if c]
    assert deletes(verdict, "Received-SPF") == sorted(claimed, reverse=True)
    values = field_values(apply(raw, verdict), "Received-SPF")
    assert [receiver_of(v) == AID for v in values] == [True] + [False] * sum(
        not c for _i, _v, c in FORGED_SPF)


# -- 4. hostile ARC headers ---------------------------------------------------------------------

ARC_GARBAGE: dict[str, list[Header]] = {
    "plausible-but-broken": [
        ("ARC-Seal", f"i=1; a=rsa-sha256; cv=none; d={BANK}; s=sel; t=1; b=!!!not base64!!!"),
        ("ARC-Message-Signature", f"i=1; a=rsa-sha256; c=relaxed/relaxed; d={BANK}; s=sel; "
                                  "h=from:from:from; bh=; b="),
        ("ARC-Authentication-Results", f"i=1; {AID}; dkim=pass header.d={BANK}; spf=pass "
                                       f"smtp.mailfrom=ceo@{BANK}; dmarc=pass header.from={BANK}"),
    ],
    "binary-and-huge": [
        ("ARC-Seal", b"i=18446744073709551617; cv=pass; \xff\xfe\x01; b=" + b"A" * 5000),
        ("ARC-Message-Signature", b"i=0; i=1; i=2; d=;;;; ==="),
        ("ARC-Authentication-Results", b"(unbalanced; \xc3\xa9; dmarc=pass"),
        ("ARC-Authentication-Results", f"i=1; {TRUSTED}; dkim=pass header.d={BANK}; spf=pass "
                                       f"smtp.mailfrom=ceo@{BANK}"),
    ],
    "seal-x": [("ARC-Seal", "x")],
    "instance-out-of-range": [
        ("ARC-Seal", f"i=51; a=rsa-sha256; cv=pass; d={BANK}; s=sel; b=AAAA"),
        ("ARC-Message-Signature", f"i=51; a=rsa-sha256; d={BANK}; s=sel; h=from; bh=AAAA; b=AAAA"),
        ("ARC-Authentication-Results", f"i=51; {AID}; dmarc=pass header.from={BANK}"),
    ],
    "duplicate-instances": [
        ("ARC-Seal", f"i=1; a=rsa-sha256; cv=none; d={BANK}; s=sel; b=AAAA"),
        ("ARC-Seal", f"i=1; a=rsa-sha256; cv=none; d={BANK}; s=sel; b=AAAA"),
        ("ARC-Message-Signature", f"i=1; a=rsa-sha256; d={BANK}; s=sel; h=from; bh=AAAA; b=AAAA"),
        ("ARC-Authentication-Results", f"i=1; {AID}; dmarc=pass header.from={BANK}"),
    ],
    "long-b": [
        ("ARC-Seal", f"i=1; a=rsa-sha256; cv=none; d={BANK}; s=sel; b={'QUFB' * 4000}"),
        ("ARC-Message-Signature", f"i=1; a=rsa-sha256; d={BANK}; s=sel; h=from; bh=AAAA; "
                                  f"b={'QUFB' * 4000}"),
        ("ARC-Authentication-Results", f"i=1; {AID}; dmarc=pass header.from={BANK}"),
    ],
}  # fmt: skip


@pytest.mark.parametrize("conf", ["", f"TrustedAuthservIDs {TRUSTED}\n"], ids=["plain", "trusted"])
@pytest.mark.parametrize("arc", list(ARC_GARBAGE), ids=list(ARC_GARBAGE))
def test_arc_headers_with_garbage_are_arc_fail_and_change_nothing_else(world: World, arc: str,
                                                                       conf: str) -> None:
    """Hostile ARC fields (RFC 8617) give ``arc=fail`` with a reason, never an exception; the
    fields are neither removed nor trusted, whatever authserv-id an ARC-Authentication-Results
    names, and the DKIM, SPF and DMARC results are those of the same message without them."""
    plain = signed_by_evil(compose(f"ceo@{BANK}"), world.keys)
    with_arc = signed_by_evil(compose(f"ceo@{BANK}", top=ARC_GARBAGE[arc]), world.keys)
    baseline, verdict = run(world.ctx(conf), plain), run(world.ctx(conf), with_arc)
    assert not [e for e in verdict.edits if e.name.lower().startswith("arc-")]
    (clause,) = [r for r in our_ar(verdict).results if r.method == "arc"]
    (value,) = added(verdict, "Authentication-Results")
    assert str(clause.result) == "fail" and re.search(r"\barc=fail \([^)]+\)", value), value
    assert not [r for r in our_ar(baseline).results if r.method == "arc"]
    assert (dkim_of(verdict), spf_of(verdict), dmarc_of(verdict)) == (
        dkim_of(baseline), spf_of(baseline), dmarc_of(baseline))
    assert dmarc_of(verdict) == ("fail", BANK)
    assert_no_pass_for_bank(verdict)


@pytest.mark.parametrize("aid", [TRUSTED, AID, EVIL], ids=["trusted-aid", "our-aid", "own-aid"])
def test_an_attackers_own_valid_arc_set_never_rescues_dmarc(world: World, aid: str) -> None:
    """The attacker seals with the key it holds (a valid chain: ``arc=pass``) an
    ARC-Authentication-Results claiming that bank.example passed DKIM and SPF, under the
    trusted sealer's authserv-id, ours, or its own. Only the ARC-Seal's ``d=`` names a
    sealer, and evil.example is not in ARCTrustedSealers: DMARC stays ``fail`` and the mail
    is rejected. The control: a receiver that does list evil.example would be rescued."""
    raw = compose(f"ceo@{BANK}")
    headers, body = _split(raw)
    chain = verify_chain(headers, body, world.resolver, now=helpers.NOW)
    assert chain.result == "none", chain
    fields = arc_seal(headers, body, (EVIL, "sel", world.keys.evil), authserv_id=aid,
                      ar_value=f"dkim=pass header.d={BANK} header.s=sel; spf=pass "
                               f"smtp.mailfrom=ceo@{BANK}; dmarc=pass header.from={BANK}",
                      chain=chain, now=helpers.NOW)  # fmt: skip
    forged = b"".join(f"{n}: {v}\r\n".encode() for n, v in fields) + raw
    verdict = run(world.ctx(f"ARCTrustedSealers {TRUSTED}\nRejectFailures true\n"), forged)
    assert verdict.action is Action.REJECT and verdict.reply is not None, verdict.log
    assert {("arc", "pass"), ("dmarc", "fail")} <= set(verdict.results), verdict.results
    assert "overridden" not in verdict.log and "ARC override" not in verdict.log, verdict.log
    trusting_evil = run(world.ctx(f"ARCTrustedSealers {EVIL}\nRejectFailures true\n"), forged)
    assert trusting_evil.action is Action.ACCEPT, trusting_evil.log  # the control: it can rescue
    assert "DMARC failure overridden: trusted ARC sealer" in trusting_evil.log


def _split(raw: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    headers, body = dkim.rfc822_parse(raw)
    return [(bytes(n), bytes(v)) for n, v in headers], bytes(body)


# -- 5. hostile DKIM-Signature fields ---------------------------------------------------------


def drop_tag(name: str) -> Mutation:
    return lambda tags: [(n, v) for n, v in tags if n != name]


def add_tag(name: str, value: str | Callable[[Tags], str]) -> Mutation:
    return lambda tags: [*tags, (name, value(tags) if callable(value) else value)]


def _t(tags: Tags) -> int:
    return int(dict(tags)["t"])


DKIM_MUTATIONS: list[tuple[str, Mutation, str]] = [
    # RFC 6376 §3.2: a duplicate tag invalidates the whole tag-list.
    ("duplicate-d", add_tag("d", EVIL), "permerror"),
    ("duplicate-bh", add_tag("bh", lambda t: dict(t)["bh"]), "permerror"),
    ("duplicate-b", add_tag("b", lambda t: dict(t)["b"]), "permerror"),
    # RFC 6376 §3.5 l=: a count beyond the canonicalized body does not describe this message.
    ("l-beyond-body", set_tag("l", lambda v: str(int(v) + 1)), "permerror"),
    ("l-2-to-the-64", set_tag("l", str(2**64)), "permerror"),
    ("l-77-digits", set_tag("l", "9" * 77), "permerror"),
    ("l-negative", set_tag("l", "-1"), "permerror"),
    ("b-not-base64", set_tag("b", "!!!!"), "permerror"),
    ("b-bad-padding", set_tag("b", "abc"), "permerror"),
    ("bh-not-base64", set_tag("bh", "####"), "permerror"),
    ("b-wrong-but-well-formed", set_tag("b", base64.b64encode(bytes(256)).decode()), "fail"),
    ("a-unknown", set_tag("a", "rsa-sha512"), "permerror"),
    ("a-ed448", set_tag("a", "ed448-sha512"), "permerror"),
    # RFC 6376 §5.4: From MUST be signed.
    ("h-without-from", set_tag("h", "to : subject : date"), "permerror"),
    ("h-garbage", set_tag("h", ":::"), "permerror"),
    ("v-2", set_tag("v", "2"), "permerror"),
    ("x-before-t", add_tag("x", lambda t: str(_t(t) - 1)), "permerror"),
    ("x-equal-t", add_tag("x", lambda t: str(_t(t))), "permerror"),
    ("i-outside-d", set_tag("i", f"@{EVIL}"), "permerror"),
    ("c-unknown", set_tag("c", "relaxed/fancy"), "permerror"),
    ("q-unknown", set_tag("q", "dns/xml"), "permerror"),
    ("d-8bit", set_tag("d", "bänk.example"), "permerror"),
    *[(f"missing-{n}", drop_tag(n), "permerror") for n in ("v", "a", "b", "bh", "d", "h", "s")],
    *[(f"empty-{n}", set_tag(n, ""), "permerror")
      for n in ("v", "a", "b", "bh", "d", "h", "s", "c", "i", "l", "q", "t")],  # fmt: skip
]


@pytest.fixture(scope="module")
def bank_signed(keys: Keys) -> tuple[Tags, bytes]:
    """A genuine bank.example signature (with l=) and its message, replayed by the attacker."""
    raw = compose(f"ceo@{BANK}")
    return sig_tags(dkim_sign(raw, keys.bank, BANK, length=True)), raw


def test_control_the_replayed_bank_signature_verifies_unmodified(world: World,
                                                                 bank_signed) -> None:  # fmt: skip
    """The control for the mutations below: re-serialized, untouched, the signature passes."""
    tags, raw = bank_signed
    verdict = run(world.ctx(), sig_field(tags) + raw)
    assert dkim_of(verdict) == [("pass", BANK)]
    assert dmarc_of(verdict) == ("pass", BANK)


@pytest.mark.parametrize("mutate,result",
                         [pytest.param(m, r, id=i) for i, m, r in DKIM_MUTATIONS])  # fmt: skip
def test_hostile_dkim_signature_is_never_a_pass(world: World, bank_signed, mutate: Mutation,
                                                result: str) -> None:  # fmt: skip
    tags, raw = bank_signed
    verdict = run(world.ctx(), sig_field(mutate(tags)) + raw)
    assert verdict.action is Action.ACCEPT  # On-BadSignature: accept (OpenDKIM's default)
    (got,) = dkim_of(verdict)
    assert got[0] == result
    assert f"dkim={result}" in verdict.log
    assert dmarc_of(verdict) == ("fail", BANK)
    assert_no_pass_for_bank(verdict)


def test_thousand_signatures_cost_maximum_signatures_to_verify_lookups(world: World) -> None:
    raw = garbage_signatures(1000) + compose(f"ceo@{BANK}")
    # The 100 kB header is over MaximumHeaders (64 KiB by default): refused before any work.
    refused = run(world.ctx(), raw)
    assert refused.action is Action.REJECT and refused.reply is not None
    assert (refused.reply.code, refused.reply.xcode) == ("552", "5.3.4")
    # Without the header limit, MaximumSignaturesToVerify (3) bounds the work.
    since = len(world.resolver.query_log)
    verdict = run(world.ctx("MaximumHeaders 0\n"), raw)
    assert len(world.key_queries(since)) == 3
    assert dkim_of(verdict) == [("permerror", BANK)] * 3
    assert dmarc_of(verdict) == ("fail", BANK)


# -- 6. hostile DMARC records -----------------------------------------------------------------


@pytest.mark.parametrize("label", list(DMARC_RECORDS))
def test_hostile_dmarc_record_gives_its_documented_result(world: World, label: str) -> None:
    _records, result, policy = DMARC_RECORDS[label]
    domain = f"{label}.example"
    verdict = run(world.ctx(), signed_by_evil(compose(f"ceo@{domain}"), world.keys))
    (clause,) = [r for r in our_ar(verdict).results if r.method == "dmarc"]
    assert (clause.result, clause.header_from, clause.policy) == (result, domain, policy)


def test_dmarc_record_with_ten_thousand_report_uris_is_read_once_and_enforced(
        world: World) -> None:  # fmt: skip
    """The record is parsed whole (every URI kept for the reports), fetched once, and its
    p=reject applies. Its cost is in make bench, not here."""
    record = parse_record(DMARC_HUGE_RUA_TEXT)
    assert len(record.rua) == HUGE_RUA
    since = len(world.resolver.query_log)
    verdict = run(world.ctx("RejectFailures yes\n"), compose("ceo@huge-rua.example"))
    dmarc_queries = [q for q in world.resolver.query_log[since:]
                     if q[0].rstrip(".") == "_dmarc.huge-rua.example"]  # fmt: skip
    assert len(dmarc_queries) == 1
    assert verdict.action is Action.REJECT and verdict.reply is not None
    assert verdict.reply.text.endswith("huge-rua.example")
    assert "dmarc=fail header.from=huge-rua.example p=reject dis=reject" in verdict.log


# -- 7. malformed messages --------------------------------------------------------------------


def test_header_lines_longer_than_998_octets(world: World) -> None:
    """RFC 5322 §2.1.1 caps lines at 998 octets; longer ones are processed as they are."""
    raw = signed_by_evil(compose(f'"{"B" * 1500}" <ceo@{BANK}>', subject="A" * 2000), world.keys)
    verdict = run(world.ctx(), raw)
    assert dkim_of(verdict) == [("pass", EVIL)]
    assert dmarc_of(verdict) == ("fail", BANK)


def test_hundred_kilobyte_header_field(world: World) -> None:
    big = "\r\n\t".join(["x" * 98] * 1000)
    raw = signed_by_evil(compose(f"ceo@{BANK}", extra=[("X-Big", big)]), world.keys)
    refused = run(world.ctx(), raw)
    assert refused.action is Action.REJECT and refused.reply is not None
    assert refused.reply.code == "552" and "MaximumHeaders 65536" in refused.log
    verdict = run(world.ctx("MaximumHeaders 0\n"), raw)
    assert dkim_of(verdict) == [("pass", EVIL)]
    assert dmarc_of(verdict) == ("fail", BANK)


@pytest.mark.parametrize("froms,subject,body,dmarc", [
    pytest.param([f"ceo@{BANK}"], b"a\x00b", BODY, ("fail", BANK), id="nul-in-subject"),
    pytest.param([f"ceo@{BANK}"], b"urgent", b"wire\x00money\r\n\x00\r\n", ("fail", BANK),
                 id="nul-in-body"),
    pytest.param([f"ceo@{BANK}\x00x@{EVIL}".encode()], b"urgent", BODY, ("permerror", None),
                 id="nul-in-from"),
    pytest.param([f"ceo@{BANK}"], b"urgent", b"bare\rCR\r\nand\rmore\r\r\n", ("fail", BANK),
                 id="bare-cr-in-body"),
    pytest.param([f"ceo@{BANK}"], b"urgent", b"bare\nLF\nlines\r\nmixed\n\n", ("fail", BANK),
                 id="bare-lf-in-body"),
    pytest.param([f"ceo@{BANK}"], b"a\rb", BODY, ("fail", BANK), id="bare-cr-in-subject"),
    pytest.param([f"ceo@{BANK}\r<x@{EVIL}>".encode()], b"urgent", BODY, ("permerror", None),
                 id="bare-cr-in-from"),
    pytest.param([f"ceo@{BANK}"], "Grüße, Jörg".encode(), BODY, ("fail", BANK),
                 id="utf8-subject"),
    pytest.param([f"ceo@{BANK}"], b"\xff\xfe\xc3(", BODY, ("fail", BANK),
                 id="invalid-utf8-subject"),
    pytest.param([f"Jörg Bänk <ceo@{BANK}>".encode()], b"urgent", BODY, ("fail", BANK),
                 id="utf8-from-display-name"),
    pytest.param([b"\xff\xfe <ceo@" + BANK.encode() + b">"], b"urgent", BODY, ("fail", BANK),
                 id="invalid-utf8-from-display-name"),
    pytest.param(["ceo@bänk.example".encode()], b"urgent", BODY, ("none", IDN),
                 id="idn-look-alike-from"),
    pytest.param([b"ceo@bank\xff.example"], b"urgent", BODY, ("permerror", None),
                 id="invalid-utf8-from-domain"),
])  # fmt: skip
def test_control_characters_and_8bit_data(world: World, froms: list[str | bytes],
                                          subject: bytes, body: bytes,
                                          dmarc: tuple[str, str | None]) -> None:  # fmt: skip
    """NUL, bare CR, bare LF, UTF-8 and invalid UTF-8, as a milter may be handed them.
    The attacker's own signature over the same bytes still verifies (the canonicalization
    agrees with dkimpy's), and no trick makes the From domain pass."""
    raw = signed_by_evil(compose(*froms, subject=subject, body=body), world.keys)
    verdict = run(world.ctx(), raw)
    assert dkim_of(verdict) == [("pass", EVIL)]
    assert dmarc_of(verdict) == dmarc
    assert_no_pass_for_bank(verdict)


@pytest.mark.parametrize("name,value,dmarc", [
    ("Subject", b" a\nX-Injected: b", ("fail", BANK)),
    # Not folding (RFC 5322 §2.2.3: CRLF then WSP): the LF is a control character in the
    # mailbox, so permerror. Joining the lines instead would evaluate bank.example.evil.example,
    # a name the attacker controls, while a reader that ends the line at LF shows bank.example.
    ("From", b" ceo@" + BANK.encode() + b"\n." + EVIL.encode(), ("permerror", None)),
], ids=["subject", "from"])  # fmt: skip
def test_bare_lf_inside_a_header_value(world: World, name: str, value: bytes,
                                       dmarc: tuple[str, str | None]) -> None:  # fmt: skip
    """The milter protocol folds with LF; a bare LF not followed by white space cannot come
    from Postfix (there it starts a new field), but must not break anything either."""
    fields, body = milter_view(compose(f"ceo@{BANK}"))
    fields = [(n, value if n == name else v) for n, v in fields]
    verdict = drive(world.ctx(), fields, [body])
    assert dmarc_of(verdict) == dmarc
    assert_no_pass_for_bank(verdict)


@pytest.mark.parametrize("canon", [(b"relaxed", b"simple"), (b"relaxed", b"relaxed"),
                                   (b"simple", b"simple")], ids=lambda c: b"/".join(c).decode())
def test_header_only_message_without_body(world: World, canon: tuple[bytes, bytes]) -> None:
    """No blank line, no body: the body callback never comes (RFC 6376 §3.4.3/§3.4.4)."""
    raw = signed_by_evil(compose(f"ceo@{BANK}", body=None), world.keys, canon=canon)
    fields, body = milter_view(raw)
    assert body == b""
    verdict = drive(world.ctx(), fields, [])
    assert dkim_of(verdict) == [("pass", EVIL)]
    assert dmarc_of(verdict) == ("fail", BANK)


FIFTY_MB = 50 << 20


def hostile_stream(total: int, size: int) -> Iterator[bytes]:
    """``total`` bytes of body made lazily in ``size`` chunks: runs of white space, trailing
    blanks, bare CR, NUL, 8-bit; never held whole."""
    line = b"wire \t the  money\x00 \xc3\xa9 \xff today\r  \tplease \t \r\n"
    block = line * ((1 << 20) // len(line)) + b"\r\n" * 3
    ring = block + block
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        start = sent % len(block)
        yield ring[start : start + n]
        sent += n


def test_fifty_megabyte_message_is_hashed_as_it_streams(world: World, tmp_path: Path) -> None:
    """The attacker signs 50 MB (relaxed body) with its own key; the body is never held: the
    signature is made and verified from chunks of different sizes, in bounded memory."""
    key_file = tmp_path / "evil.private"
    key_file.write_bytes(world.keys.evil.pem())
    key_file.chmod(0o600)
    (tmp_path / "key.table").write_text(f"evil {EVIL}:sel:{key_file}\n")
    (tmp_path / "signing.table").write_text(f"*@{BANK} evil\n")
    signer = Context.build(Config.from_text(
        f"AuthservID {AID}\nKeyTable file:{tmp_path}/key.table\n"
        f"SigningTable refile:{tmp_path}/signing.table\nCanonicalization relaxed/relaxed\n"),
        resolver=world.resolver, clock=lambda: helpers.NOW)  # fmt: skip
    fields, _ = milter_view(compose(f"ceo@{BANK}"))
    signed = drive(signer, fields, hostile_stream(FIFTY_MB, 65536), ip="127.0.0.1")
    (signature,) = added(signed, "DKIM-Signature")
    fields = [("DKIM-Signature", b" " + signature.encode()), *fields]
    tracemalloc.start()
    try:
        verdict = drive(world.ctx(), fields, hostile_stream(FIFTY_MB, 65521))
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak} bytes while verifying a {FIFTY_MB}-byte body"
    assert dkim_of(verdict) == [("pass", EVIL)]
    assert dmarc_of(verdict) == ("fail", BANK)


def test_verdict_edits_are_plain_header_operations(world: World) -> None:
    """Whatever came in, the edits are ours: one A-R and one Received-SPF, both on top."""
    raw = signed_by_evil(compose(f"ceo@{BANK}", top=ar_fields([f"{AID}; dkim=pass"])),
                         world.keys)  # fmt: skip
    verdict = run(world.ctx(), raw)
    adds = [e for e in verdict.edits if isinstance(e, AddHeader)]
    assert sorted(e.name for e in adds) == ["Authentication-Results", "Received-SPF"]
    assert all(e.index == 0 and "\r" not in e.value for e in adds)
