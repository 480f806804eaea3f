"""ARC Sets shaped like other writers', through the real verifier and the rescue.

Two kinds of chains, all verified by :func:`authmilter.arc_verify.verify_chain` (and by
dkimpy's ``dkim.arc_verify`` as a second opinion where it applies):

- **Sealed with our sealer, their AAR text**: :func:`authmilter.arc_sign.seal` writes
  ``i=N; <authserv_id>; <ar_value>``, so the writers' AAR payloads (Microsoft 365, Gmail, one
  without authserv-id, one folded with comments, quotes and upper case) go in as they are.
- **Written by hand, field for field**: the exact AAR text and folding a writer uses, an
  ARC-Message-Signature without a space after any ``;`` (nor after the colon), or one folded
  with tabs and carrying a tag we do not know (``fh=``), and ARC-Seals with the writers' tag
  order. Both signatures are computed here (``cryptography`` over dkimpy's relaxed
  canonicalization, :func:`arc_verify.feed_seal` for the seal), so what is signed is exactly
  the text on the wire; a control shows that the same text *not* re-signed fails.

Each chain must verify ``pass``, :func:`parse_aar` must read its AAR, and
:func:`find_rescue` must use it to rescue a DMARC fail of the From domain.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy

from authmilter.arc_sign import seal
from authmilter.arc_trust import AarResults, Rescue, find_rescue, parse_aar
from authmilter.arc_verify import ArcOutcome, arc_set_fields, feed_seal, verify_chain
from authmilter.body_hash import BodyHashes
from authmilter.keys import PrivateKey, generate_private_key
from authmilter.results import DkimOutcome, DkimResult, SpfIdentity, SpfOutcome, SpfResult
from fakedns import ZoneResolver
from helpers import make_message
from test_arc_trust import FOLDED, GMAIL, MICROSOFT, NO_AUTHSERV_ID, Dmarc, trust
from test_arc_verify import ORIGIN, resolver, split

NOW = 1_700_000_000
MSFT = f"microsoft.{ORIGIN}"  # sealer domains (their keys are in the arc.test zone)
GOOGLE = f"google.{ORIGIN}"
LISTS = f"lists.{ORIGIN}"
RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


@pytest.fixture(scope="module")
def key() -> PrivateKey:
    return generate_private_key("rsa", 1024)


def payload(aar: str) -> tuple[int, str, str]:
    """Split an AAR text into seal()'s pieces: instance, authserv_id, ar_value. Without an
    authserv-id the first clause takes its place, so the text comes out the same."""
    head, aid, rest = (part.strip() for part in aar.split(";", 2))
    return int(head.removeprefix("i=")), aid, rest


def sealed(key: PrivateKey, aars: Sequence[tuple[str, str]], from_domain: str) -> bytes:
    """One :func:`seal` per ``(sealer, AAR text)``, each after verifying the chain so far."""
    message = make_message(from_=f"Someone <someone@{from_domain}>")
    dns = resolver([(sealer, key) for sealer, _aar in aars])
    for n, (sealer, aar) in enumerate(aars, start=1):
        instance, aid, ar_value = payload(aar)
        assert instance == n, aar
        headers, body = split(message)
        chain = verify_chain(headers, body, dns, now=NOW)
        fields = seal(headers, body, (sealer, "sel", key), authserv_id=aid, ar_value=ar_value,
                      chain=chain, now=NOW)  # fmt: skip
        message = b"".join(f"{name}: {value}\r\n".encode() for name, value in fields) + message
    return message


def verdict(message: bytes, dns: ZoneResolver) -> tuple[ArcOutcome, list[tuple[bytes, bytes]]]:
    headers, body = split(message)
    return verify_chain(headers, body, dns, now=NOW), headers


def aar_of(headers: list[tuple[bytes, bytes]], instance: int) -> AarResults | None:
    values = [v.decode() for n, v in headers if n.lower() == b"arc-authentication-results"]
    reads = [parse_aar(v) for v in values]
    found = [r for r in reads if r is not None and r.instance == instance]
    assert len(found) == 1, values
    return found[0]


# -- sealed with seal(), the writers' AAR payloads ----------------------------------------------

SEALED: dict[str, tuple[list[str], str, int, str, DkimOutcome, SpfOutcome | None]] = {
    # name: (AAR texts, oldest first; From domain; instance used; method; DKIM; SPF read)
    "microsoft-365": (
        [MICROSOFT], "contoso.example", 1, "dkim",
        DkimOutcome(result=DkimResult.PASS, domain="contoso.example", reason="ARC i=1"),
        SpfOutcome(result=SpfResult.PASS, identity=SpfIdentity.MAILFROM,
                   sender="contoso.example", domain="contoso.example", client_ip="",
                   comment="ARC i=1"),
    ),
    "gmail": (
        [GMAIL], "example.org", 1, "dkim",
        DkimOutcome(result=DkimResult.PASS, domain="example.org", selector="20230601",
                    identity="@example.org", reason="ARC i=1"),
        SpfOutcome(result=SpfResult.PASS, identity=SpfIdentity.MAILFROM,
                   sender="a@example.org", domain="example.org", client_ip="",
                   comment="ARC i=1"),
    ),
    "no-authserv-id": (
        [GMAIL, NO_AUTHSERV_ID], "a.example", 2, "dkim",
        DkimOutcome(result=DkimResult.PASS, domain="a.example", reason="ARC i=2"),
        SpfOutcome(result=SpfResult.PASS, identity=SpfIdentity.MAILFROM,
                   sender="list.example", domain="list.example", client_ip="",
                   comment="ARC i=2"),
    ),
    "folded-nested-quoted-upper": (
        [GMAIL, NO_AUTHSERV_ID, FOLDED], "b.example", 3, "dkim",
        DkimOutcome(result=DkimResult.PASS, domain="b.example", selector="sel1",
                    identity='"news letter"@b.example', reason="ARC i=3"),
        SpfOutcome(result=SpfResult.SOFTFAIL, identity=SpfIdentity.MAILFROM,
                   sender="bounce@c.example", domain="c.example", client_ip="2001:db8::25",
                   comment="ARC i=3"),
    ),
}  # fmt: skip
SEALERS = (GOOGLE, LISTS, MSFT)


@pytest.mark.parametrize("name", list(SEALED))
def test_sealed_writer_shapes_verify_parse_and_rescue(key: PrivateKey, name: str) -> None:
    aars, from_domain, used, method, dkim_read, spf_read = SEALED[name]
    sealers = [MSFT] if name == "microsoft-365" else list(SEALERS[: len(aars)])
    message = sealed(key, list(zip(sealers, aars, strict=True)), from_domain)
    dns = resolver([(s, key) for s in sealers])
    outcome, headers = verdict(message, dns)
    assert outcome.result == "pass", outcome
    assert dkim.arc_verify(message, dnsfunc=dns.dkimpy_dnsfunc)[0] == b"pass"

    read = aar_of(headers, used)
    assert read is not None and read.dkim == (dkim_read,) and read.spf == spf_read
    dmarc = Dmarc(domain=from_domain)
    rescue = find_rescue(outcome, headers, trusted=trust(*sealers), passes=dmarc)
    assert rescue is not None
    assert (rescue.instance, rescue.sealer, rescue.method) == (used, sealers[used - 1], method)
    sets = " ".join(f"as[{i}].d={sealers[i - 1]} as[{i}].s=sel" for i in range(len(aars), 0, -1))
    remote = f" remote-ip[{used}]={read.remote_ip}" if read.remote_ip else ""
    assert rescue.comment == f"arc=pass {sets}{remote}"
    assert len(dmarc.calls) == 1


def test_the_no_authserv_id_text_reaches_the_wire_unchanged(key: PrivateKey) -> None:
    message = sealed(key, [(GOOGLE, GMAIL), (LISTS, NO_AUTHSERV_ID)], "a.example")
    headers, _body = split(message)
    values = [" ".join(v.decode().split()) for n, v in headers
              if n == b"ARC-Authentication-Results"]  # fmt: skip
    assert NO_AUTHSERV_ID in values


# -- written by hand, field for field -----------------------------------------------------------

# Microsoft 365's layout: AAR folded with one space; here an AMS without any space after ";".
MS_AAR = (
    "i={i}; mx.microsoft.com 1; spf=pass (sender ip is 192.0.2.7)\r\n"
    " smtp.rcpttodomain=example.net smtp.mailfrom=contoso.example; dmarc=pass\r\n"
    " (p=reject sp=reject pct=100) action=none header.from=contoso.example;\r\n"
    " dkim=pass (signature was verified) header.d=contoso.example; arc=none"
)
MS_AMS = ("i={i};a=rsa-sha256;c=relaxed/relaxed;d={d};s={s};"
          "h=From:Date:Subject:Message-ID:To;bh={bh};b=")  # fmt: skip
MS_AS = "i={i}; a=rsa-sha256; s={s}; d={d}; cv={cv};\r\n b="
# Gmail's layout, folded with tabs: the AAR one clause a line, the AMS with an fh= tag.
GMAIL_AAR = (
    "i={i}; mx.google.com;\r\n\tdkim=pass header.i=@example.org header.s=20230601 "
    "header.b=AbCdEf12;\r\n\tspf=pass (google.com: domain of a@example.org designates "
    "192.0.2.9 as permitted sender) smtp.mailfrom=a@example.org;\r\n\tdmarc=pass "
    "(p=NONE sp=NONE dis=NONE) header.from=example.org"
)
GMAIL_AMS = ("i={i}; a=rsa-sha256; c=relaxed/relaxed; d={d}; s={s};\r\n"
             "\th=to:subject:message-id:date:from;\r\n"
             "\tfh=Qm9ndXMgZmggdGFnLCBpZ25vcmVkIGJ5IHRoZSB2ZXJpZmllcg==;\r\n"
             "\tbh={bh};\r\n\tb=")  # fmt: skip
GMAIL_AS = "i={i}; a=rsa-sha256; t={t}; cv={cv};\r\n\td={d}; s={s};\r\n\tb="


def _fold_b64(value: str, fold: str) -> str:
    return fold.join(value[n : n + 64] for n in range(0, len(value), 64))


def hand_set(message: bytes, *, key: PrivateKey, sealer: str, instance: int, aar: str,
             ams: str, seal_: str, colon_space: bool = True, b_fold: str = "",
             after_ams_signed: Callable[[str], str] | None = None) -> bytes:  # fmt: skip
    """Add one ARC Set written in the given layouts (``{i} {d} {s} {bh} {t} {cv}``; the AMS
    and AS layouts end with an empty ``b=``). ``after_ams_signed`` rewrites the AMS text
    once it is signed (the AS then covers the rewritten text): the not-re-signed control."""
    headers, body = split(message)
    bodies = BodyHashes()
    bodies.add("relaxed", "sha256", None)
    bodies.update(body)
    body_hash = bodies.get("relaxed", "sha256", None)
    assert body_hash is not None
    values = {"i": str(instance), "d": sealer, "s": "sel", "t": str(NOW),
              "cv": "none" if instance == 1 else "pass",
              "bh": base64.b64encode(body_hash.digest()).decode()}  # fmt: skip
    lead = " " if colon_space else ""

    def field(name: str, text: str) -> tuple[bytes, bytes]:
        return name.encode(), (lead + text + "\r\n").encode()

    def signed(text: str, feed: Callable[[Any, tuple[bytes, bytes]], None],
               name: str) -> str:  # fmt: skip
        hasher = hashlib.sha256()
        feed(hasher, field(name, text))
        assert isinstance(key.key, rsa.RSAPrivateKey)  # ARC is rsa-sha256 only
        signature = key.key.sign(hasher.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        return text + _fold_b64(base64.b64encode(signature).decode(), b_fold)

    aar_field = field("ARC-Authentication-Results", aar.format(**values))
    ams_text = ams.format(**values)
    h_tag = re.search(r"(?:^|;)\s*h=([^;]*)", ams_text)
    assert h_tag is not None
    include = [n.strip().lower().encode() for n in h_tag.group(1).split(":")]
    canonical = RELAXED.canonicalize_headers(headers)
    ams_text = signed(ams_text, lambda hasher, f: dkim.hash_headers(
        hasher, RELAXED, canonical, include, f, None), "ARC-Message-Signature")  # fmt: skip
    if after_ams_signed is not None:
        ams_text = after_ams_signed(ams_text)
    ams_field = field("ARC-Message-Signature", ams_text)
    sets = arc_set_fields(headers)
    older = [f for i in sorted(sets) for f in sets[i]]
    as_text = signed(seal_.format(**values),
                     lambda hasher, f: feed_seal(hasher, [*older, aar_field, ams_field], f),
                     "ARC-Seal")  # fmt: skip
    new = [field("ARC-Seal", as_text), ams_field, aar_field]
    return b"".join(name + b":" + value for name, value in new) + message


def ms_hop(message: bytes, key: PrivateKey, instance: int, *, colon_space: bool = True) -> bytes:
    return hand_set(message, key=key, sealer=MSFT, instance=instance, aar=MS_AAR, ams=MS_AMS,
                    seal_=MS_AS, colon_space=colon_space)  # fmt: skip


def gmail_hop(message: bytes, key: PrivateKey, instance: int) -> bytes:
    return hand_set(message, key=key, sealer=GOOGLE, instance=instance, aar=GMAIL_AAR,
                    ams=GMAIL_AMS, seal_=GMAIL_AS, b_fold="\r\n\t ")  # fmt: skip


@pytest.mark.parametrize("colon_space", [True, False], ids=["space-after-colon", "no-space"])
def test_ams_without_spaces_verifies_and_rescues(key: PrivateKey, colon_space: bool) -> None:
    message = ms_hop(make_message(from_="Ops <ops@contoso.example>"), key, 1,
                     colon_space=colon_space)  # fmt: skip
    ams = [line for line in message.split(b"\r\n") if line.startswith(b"ARC-Message-Signature:")]
    lead = b" " if colon_space else b""
    assert len(ams) == 1 and ams[0].startswith(b"ARC-Message-Signature:" + lead + b"i=1;a=rsa-")
    assert b"; " not in ams[0] and b" b=" not in ams[0]
    dns = resolver([(MSFT, key)])
    outcome, headers = verdict(message, dns)
    assert outcome.result == "pass", outcome
    if colon_space:  # dkimpy finds an AMS only by " i=<n>;" with the space (dkimpy 1.1)
        assert dkim.arc_verify(message, dnsfunc=dns.dkimpy_dnsfunc)[0] == b"pass"
    read = aar_of(headers, 1)
    assert read is not None and read.authserv_id == "mx.microsoft.com"
    assert [d.domain for d in read.dkim] == ["contoso.example"]
    rescue = find_rescue(outcome, headers, trusted=trust(MSFT),
                         passes=Dmarc(domain="contoso.example"))  # fmt: skip
    assert rescue == Rescue(1, MSFT, "dkim", f"arc=pass as[1].d={MSFT} as[1].s=sel")


def test_removing_the_spaces_without_re_signing_fails(key: PrivateKey) -> None:
    """The control: the AMS text really is signed as written (relaxed canonicalization
    keeps the difference between "; " and ";")."""
    spaced = MS_AMS.replace(";", "; ")
    message = hand_set(make_message(from_="Ops <ops@contoso.example>"), key=key, sealer=MSFT,
                       instance=1, aar=MS_AAR, ams=spaced, seal_=MS_AS,
                       after_ams_signed=lambda text: text.replace("; ", ";"))  # fmt: skip
    outcome, _headers = verdict(message, resolver([(MSFT, key)]))
    assert outcome.result == "fail" and "AMS i=1: signature verification failed" in outcome.reason


def test_ams_folded_with_tabs_and_an_unknown_tag_verifies_and_rescues(key: PrivateKey) -> None:
    message = gmail_hop(make_message(from_="A <a@example.org>"), key, 1)
    assert b"\r\n\tfh=" in message and b"\r\n\tb=" in message
    dns = resolver([(GOOGLE, key)])
    outcome, headers = verdict(message, dns)
    assert outcome.result == "pass", outcome
    assert dkim.arc_verify(message, dnsfunc=dns.dkimpy_dnsfunc)[0] == b"pass"
    read = aar_of(headers, 1)
    assert read is not None and read.authserv_id == "mx.google.com"
    assert [(d.domain, d.selector) for d in read.dkim] == [("example.org", "20230601")]
    rescue = find_rescue(outcome, headers, trusted=trust(GOOGLE),
                         passes=Dmarc(domain="example.org"))  # fmt: skip
    assert rescue is not None and (rescue.instance, rescue.method) == (1, "dkim")


def test_a_hand_written_two_writer_chain(key: PrivateKey) -> None:
    """Gmail's set under Microsoft's: both writers' layouts in one chain, then a seal() on
    top; the rescue walks down to whichever trusted AAR aligns with the From domain."""
    message = gmail_hop(make_message(from_="A <a@example.org>"), key, 1)
    message = ms_hop(message, key, 2)
    dns = resolver([(GOOGLE, key), (MSFT, key), (LISTS, key)])
    headers, body = split(message)
    chain = verify_chain(headers, body, dns, now=NOW)
    assert chain.result == "pass", chain
    fields = seal(headers, body, (LISTS, "sel", key), authserv_id="lists.example",
                  ar_value="dkim=pass header.d=lists.example; arc=pass",
                  chain=chain, now=NOW)  # fmt: skip
    message = b"".join(f"{n}: {v}\r\n".encode() for n, v in fields) + message
    outcome, headers = verdict(message, dns)
    assert outcome.result == "pass" and outcome.instances == 3, outcome
    assert dkim.arc_verify(message, dnsfunc=dns.dkimpy_dnsfunc)[0] == b"pass"

    dmarc = Dmarc(domain="example.org")  # only Gmail's AAR (i=1) aligns with it
    rescue = find_rescue(outcome, headers, trusted=trust(LISTS, MSFT, GOOGLE), passes=dmarc)
    assert rescue == Rescue(1, GOOGLE, "dkim", f"arc=pass as[3].d={LISTS} as[3].s=sel "
                            f"as[2].d={MSFT} as[2].s=sel as[1].d={GOOGLE} as[1].s=sel")  # fmt: skip
    assert len(dmarc.calls) == 3
    assert find_rescue(outcome, headers, trusted=trust(LISTS, GOOGLE), passes=dmarc) is None
