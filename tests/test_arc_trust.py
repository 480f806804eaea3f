"""Trusted ARC sealers rescue DMARC (:mod:`authmilter.arc_trust`).

:func:`parse_aar` is checked on the AAR shapes real sealers write (our own text in their
shapes) and on hostile values; its two readers (authres and the tolerant one) must agree
wherever authres reads. :func:`find_rescue` is checked on real chains: each hop seals with
:func:`authmilter.arc_sign.seal`, :func:`authmilter.arc_verify.verify_chain` judges the
result, and ``passes`` is the real :func:`authmilter.dmarc.evaluate` against a zone that
publishes ``p=reject`` for the author's domain.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authmilter.addresses import author_domain
from authmilter.arc_sign import seal
from authmilter.arc_trust import (
    MAX_AAR_CHARS,
    AarResults,
    Rescue,
    _read_authres,
    _read_lenient,
    find_rescue,
    parse_aar,
)
from authmilter.arc_verify import ArcOutcome, ArcSet, verify_chain
from authmilter.dmarc import OrgDomainMethod, PublicSuffix, evaluate
from authmilter.keys import PrivateKey, generate_private_key
from authmilter.results import (
    DkimOutcome,
    DkimResult,
    DmarcResult,
    SpfIdentity,
    SpfOutcome,
    SpfResult,
)
from dnsserver import make_zone, txt_rdata
from fakedns import ZoneResolver
from helpers import make_message
from test_arc_verify import ORIGIN, drop_field, edit_field, resolver, split

NOW = 1_700_000_000.0
AUTHOR = "contoso.example"
LIST = f"list.{ORIGIN}"
FWD = f"fwd.{ORIGIN}"
RELAY = f"relay.{ORIGIN}"
PSL = PublicSuffix()

# -- the interop shapes (our own text, in each writer's shape) ---------------------------------

MICROSOFT = (
    "i=1; mx.microsoft.com 1; spf=pass (sender ip is 192.0.2.7) "
    "smtp.rcpttodomain=example.net smtp.mailfrom=contoso.example; dmarc=pass "
    "(p=reject sp=reject pct=100) action=none header.from=contoso.example; dkim=pass "
    "(signature was verified) header.d=contoso.example; arc=none"
)
GMAIL = (
    "i=1; mx.google.com; dkim=pass header.i=@example.org header.s=20230601 "
    "header.b=AbCdEf12; spf=pass (google.com: domain of a@example.org designates 192.0.2.9 "
    "as permitted sender) smtp.mailfrom=a@example.org; dmarc=pass (p=NONE sp=NONE dis=NONE) "
    "header.from=example.org"
)
NO_AUTHSERV_ID = "i=2; spf=pass smtp.mailfrom=list.example; dkim=pass header.d=a.example"
FOLDED = (
    "i=3; relay.example.net;\r\n\tDKIM=Pass (2048-bit key (rsa) \"ok\") header.d=b.example\r\n"
    '\theader.s=sel1 header.i="news letter"@b.example;\r\n\tSPF=SoftFail '
    '(sender (\\) x) not listed) smtp.mailfrom=bounce@c.example\r\n\t'
    "smtp.remote-ip=2001:DB8::25; ARC=pass (i=2)"
)


def dkim_pass(domain: str, instance: int, *, selector: str | None = None,
              identity: str | None = None) -> DkimOutcome:  # fmt: skip
    return DkimOutcome(result=DkimResult.PASS, domain=domain, selector=selector,
                       identity=identity, reason=f"ARC i={instance}")  # fmt: skip


def spf_outcome(result: SpfResult, sender: str, domain: str, instance: int,
                client_ip: str = "") -> SpfOutcome:  # fmt: skip
    return SpfOutcome(result=result, identity=SpfIdentity.MAILFROM, sender=sender,
                      domain=domain, client_ip=client_ip, comment=f"ARC i={instance}")  # fmt: skip


SHAPES: dict[str, tuple[str, AarResults]] = {
    "microsoft-365": (MICROSOFT, AarResults(
        instance=1,
        authserv_id="mx.microsoft.com",
        dkim=(dkim_pass("contoso.example", 1),),
        spf=spf_outcome(SpfResult.PASS, "contoso.example", "contoso.example", 1),
        remote_ip=None,
    )),
    "gmail": (GMAIL, AarResults(
        instance=1,
        authserv_id="mx.google.com",
        dkim=(dkim_pass("example.org", 1, selector="20230601", identity="@example.org"),),
        spf=spf_outcome(SpfResult.PASS, "a@example.org", "example.org", 1),
        remote_ip=None,
    )),
    "no-authserv-id": (NO_AUTHSERV_ID, AarResults(
        instance=2,
        authserv_id=None,
        dkim=(dkim_pass("a.example", 2),),
        spf=spf_outcome(SpfResult.PASS, "list.example", "list.example", 2),
        remote_ip=None,
    )),
    "folded-nested-quoted-upper": (FOLDED, AarResults(
        instance=3,
        authserv_id="relay.example.net",
        dkim=(dkim_pass("b.example", 3, selector="sel1", identity='"news letter"@b.example'),),
        spf=spf_outcome(SpfResult.SOFTFAIL, "bounce@c.example", "c.example", 3,
                        client_ip="2001:db8::25"),
        remote_ip="2001:db8::25",
    )),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SHAPES))
def test_writer_shapes_are_read(name: str) -> None:
    value, expected = SHAPES[name]
    assert parse_aar(value) == expected


def test_microsoft_shape_is_read_by_authres_itself() -> None:
    """The authres-version ``1`` and the non-RFC ``action=none`` do not stop authres."""
    read = _read_authres(MICROSOFT.split(";", 1)[1].strip())
    assert read is not None and read[0] == "mx.microsoft.com"
    assert [(m, r) for m, r, _p in read[1]] == [("spf", "pass"), ("dmarc", "pass"),
                                                ("dkim", "pass"), ("arc", "none")]  # fmt: skip


@pytest.mark.parametrize(
    "payload",
    [
        "mx.example; dkim=pass header.d=a.example",  # authres reads these ...
        "mx.example; dkim=pass reason=\"header.d=evil.example\" header.d=a.example",
        # ... and refuses these, which only the tolerant reader takes:
        "dkim=pass header.d=a.example",  # no authserv-id
        "mx.example 2; dkim=pass header.d=a.example",  # an authres-version authres lacks
        "mx.example; spf=pass smtp.mailfrom=x@a.example smtp.remote-ip=2001:db8::1",  # IPv6
    ],
)
def test_text_in_quotes_or_comments_is_never_a_property(payload: str) -> None:
    read = parse_aar(f"i=1; {payload}")
    assert read is not None
    assert [d.domain for d in read.dkim] in ([], ["a.example"])
    assert "evil.example" not in repr(read)


def test_authres_refuses_ipv6_remote_ip_and_the_tolerant_reader_takes_over() -> None:
    payload = "mx.example; spf=pass smtp.mailfrom=x@a.example smtp.remote-ip=2001:db8::1"
    assert _read_authres(payload) is None
    read = parse_aar(f"i=1; {payload}")
    assert read is not None and read.remote_ip == "2001:db8::1"
    assert read.spf is not None and read.spf.client_ip == "2001:db8::1"


def test_only_dkim_pass_and_a_readable_spf_count() -> None:
    read = parse_aar(
        "i=4; mx.example; dkim=fail header.d=bad.example; dkim=pass header.d=good.example; "
        "dkim=pass header.d=-not-a-domain-; dkim=pass header.i=nobody; "
        "spf=hardfail smtp.mailfrom=x@odd.example; spf=pass smtp.helo=mail.helo.example; "
        "spf=neutral smtp.mailfrom=<>; spf=fail smtp.mailfrom=@last.example; "
        "spf=pass smtp.mailfrom=late.example"
    )
    assert read is not None
    assert read.dkim == (dkim_pass("good.example", 4),)
    # hardfail is no RFC 8601 result, a HELO-only clause and "<>" carry no MAIL FROM domain:
    assert read.spf == spf_outcome(SpfResult.FAIL, "@last.example", "last.example", 4)


def test_dkim_results_are_deduplicated_and_domains_normalized() -> None:
    read = parse_aar("i=1; mx.example; dkim=pass header.d=A.Example.; dkim=pass header.d=a.example")
    assert read is not None and read.dkim == (dkim_pass("a.example", 1),)


# -- hostile values: None, or no results, and never an exception --------------------------------

rng = random.Random(8617)
JUNK = "".join(rng.choice('();"\\=@.: \t\r\nx\x00') for _ in range(10_240))

HOSTILE: dict[str, tuple[str, int | None]] = {
    "empty": ("", None),
    "blank": (" \r\n\t", None),
    "i-x": ("i=x; mx.example; dkim=pass header.d=a.example", None),
    "i-0": ("i=0; mx.example; dkim=pass header.d=a.example", None),
    "i-51": ("i=51; mx.example; dkim=pass header.d=a.example", None),
    "i-leading-zero": ("i=01; mx.example; dkim=pass header.d=a.example", None),
    "i-upper": ("I=1; mx.example; dkim=pass header.d=a.example", None),
    "i-without-semicolon": ("i=1 mx.example dkim=pass header.d=a.example", None),
    "i-not-first": ("mx.example; i=1; dkim=pass header.d=a.example", None),
    "junk-10k": (JUNK, None),
    "i-then-junk-10k": ("i=1; " + JUNK, 1),
    "unbalanced-open": ("i=2; mx.example; (dkim=pass header.d=a.example", 2),
    "nul-bytes": ("i=3;\x00 mx.example;\x00dkim\x00=pass header.d\x00=a.example", 3),
    "only-semicolons": ("i=4;;;;;", 4),
    "quote-unclosed": ('i=5; mx.example; spf=pass reason="smtp.mailfrom=a.example', 5),
    "surrogates": ("i=6; mx.\udcff; dkim=pass header.d=\udcfe.example", 6),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_values_read_nothing(name: str) -> None:
    value, instance = HOSTILE[name]
    read = parse_aar(value)
    if instance is None:
        assert read is None
    else:
        assert read is not None and read.instance == instance
        assert (read.dkim, read.spf) == ((), None)


def test_unbalanced_close_and_deep_nesting_cost_only_what_they_hide() -> None:
    deep = parse_aar("i=1; mx.example; dkim=pass header.d=a.example " + "(" * 5000)
    assert deep is not None and deep.dkim == (dkim_pass("a.example", 1),)
    closed = parse_aar("i=1; mx.example; dkim=pass oops) header.d=a.example; spf=pass "
                       "smtp.mailfrom=b.example)")  # fmt: skip
    assert closed is not None and closed.dkim == (dkim_pass("a.example", 1),)
    assert closed.spf is None  # "b.example)" is no domain


def test_a_value_over_the_bound_yields_the_instance_only() -> None:
    clause = "; dkim=pass header.d=a.example"
    ok = "i=1; mx.example" + clause + " " * (MAX_AAR_CHARS - 60)
    assert parse_aar(ok) == AarResults(1, "mx.example", (dkim_pass("a.example", 1),), None, None)
    too_long = "i=1; mx.example" + clause + " " * MAX_AAR_CHARS
    assert parse_aar(too_long) == AarResults(1, None, (), None, None)


def test_control_characters_in_the_authserv_id_are_not_reported() -> None:
    read = parse_aar("i=1; mx\x00.example; dkim=pass header.d=a.example")
    assert read is not None and read.authserv_id is None
    assert read.dkim == (dkim_pass("a.example", 1),)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400), st.sampled_from(["", "i=1;", "i=50; mx.example;"]))
def test_any_text_never_raises(text: str, prefix: str) -> None:
    read = parse_aar(prefix + text)
    assert read is None or 1 <= read.instance <= 50
    if not prefix:
        assert read is None or text.lstrip(" \t\r\n").startswith("i")


# -- the two readers agree wherever authres reads ----------------------------------------------

_atom = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
_domain = st.builds(lambda a, b: f"{a}.{b}", _atom, _atom)
_comment = st.one_of(st.just(""), st.from_regex(r" \([a-z :=;.]{0,12}\)", fullmatch=True))
_prop = st.one_of(
    st.builds(lambda d: f"header.d={d}", _domain),
    st.builds(lambda a, d: f"header.i={a}@{d}", _atom, _domain),
    st.builds(lambda s: f"header.s={s}", _atom),
    st.builds(lambda d: f"smtp.mailfrom={d}", _domain),
    st.builds(lambda a, d: f"smtp.mailfrom={a}@{d}", _atom, _domain),
    st.just("smtp.remote-ip=192.0.2.7"),
    st.builds(lambda d: f'smtp.mailfrom="x y"@{d}', _domain),
)
_clause = st.builds(
    lambda m, r, c, props: f"{m}={r}{c} {' '.join(props)}".rstrip(),
    st.sampled_from(["dkim", "spf", "dmarc", "arc", "DKIM", "Spf"]),
    st.sampled_from(["pass", "fail", "softfail", "none", "PASS"]),
    _comment,
    st.lists(_prop, max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(_domain, st.sampled_from(["", " 1"]), _comment, st.lists(_clause, min_size=1, max_size=4))
def test_readers_agree_where_authres_reads(aid: str, version: str, comment: str,
                                            clauses: list[str]) -> None:  # fmt: skip
    payload = f"{aid}{version}{comment}; " + "; ".join(clauses)
    by_authres = _read_authres(payload)
    assert by_authres is not None, payload
    assert _read_lenient(payload) == by_authres


@pytest.mark.parametrize("name", ["microsoft-365", "gmail"])
def test_readers_agree_on_the_writer_shapes(name: str) -> None:
    payload = SHAPES[name][0].split(";", 1)[1].strip()
    assert _read_authres(payload) is not None
    assert _read_lenient(payload) == _read_authres(payload)


# -- find_rescue on real chains ------------------------------------------------------------------


@pytest.fixture(scope="module")
def key() -> PrivateKey:
    return generate_private_key("rsa", 1024)


@dataclass
class Dmarc:
    """``passes`` for From ``domain``: the real DMARC evaluation against a p=reject record;
    every call is recorded."""

    domain: str = AUTHOR
    calls: list[tuple[tuple[DkimOutcome, ...], SpfOutcome | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        zone = make_zone(self.domain, [("_dmarc", "TXT", txt_rdata("v=DMARC1; p=reject"))])
        self.dns = ZoneResolver(zone, self.domain)
        self.author = author_domain([f"Alice <alice@{self.domain}>"])

    def __call__(self, dkim: Sequence[DkimOutcome], spf: SpfOutcome | None) -> str | None:
        self.calls.append((tuple(dkim), spf))
        outcome = evaluate(self.dns, self.author, dkim, spf, method=OrgDomainMethod.PSL,
                           psl=PSL)  # fmt: skip
        if outcome.result is not DmarcResult.PASS:
            return None
        return "dkim" if outcome.dkim_aligned else "spf"


@dataclass
class Trust:
    """``trusted`` over a set of sealer domains; every question is recorded."""

    domains: frozenset[str]
    asked: list[str] = field(default_factory=list)

    def __call__(self, domain: str) -> bool:
        self.asked.append(domain)
        return domain in self.domains


def trust(*domains: str) -> Trust:
    return Trust(frozenset(domains))


Hop = tuple[str, str]  # (sealer domain, the AAR's results: seal's ar_value)


def sealed(key: PrivateKey, hops: Sequence[Hop], *, from_domain: str = AUTHOR,
           authserv_ids: Sequence[str] | None = None) -> bytes:  # fmt: skip
    """The message after each hop verified the chain and sealed it with ``seal``."""
    message = make_message(from_=f"Alice <alice@{from_domain}>")
    dns = resolver([(domain, key) for domain, _ar in hops])
    for n, (domain, ar_value) in enumerate(hops):
        headers, body = split(message)
        chain = verify_chain(headers, body, dns, now=NOW)
        assert chain.result == ("none" if n == 0 else "pass"), chain
        aid = authserv_ids[n] if authserv_ids else f"mx.{domain}"
        fields = seal(headers, body, (domain, "sel", key), authserv_id=aid, ar_value=ar_value,
                      chain=chain, now=NOW)  # fmt: skip
        message = b"".join(f"{name}: {value}\r\n".encode() for name, value in fields) + message
    return message


def judged(key: PrivateKey, message: bytes, hops: Sequence[Hop]
           ) -> tuple[ArcOutcome, list[tuple[bytes, bytes]]]:  # fmt: skip
    headers, body = split(message)
    outcome = verify_chain(headers, body, resolver([(d, key) for d, _ar in hops]), now=NOW)
    return outcome, headers


def rescue_of(key: PrivateKey, hops: Sequence[Hop], trusted: Trust, dmarc: Dmarc,
              message: bytes | None = None) -> Rescue | None:  # fmt: skip
    message = sealed(key, hops) if message is None else message
    outcome, headers = judged(key, message, hops)
    assert outcome.result == "pass", outcome
    return find_rescue(outcome, headers, trusted=trusted, passes=dmarc)


DKIM_ALIGNED = (f"dkim=pass header.d={AUTHOR} header.s=s2024; spf=fail "
                f"smtp.mailfrom=bounce@{AUTHOR} smtp.remote-ip=192.0.2.1")  # fmt: skip
SPF_ALIGNED = (f"dkim=pass header.d=esp.example; spf=pass smtp.mailfrom=bounce@{AUTHOR} "
               "smtp.remote-ip=192.0.2.2")  # fmt: skip
LIST_OWN = f"dkim=pass header.d={LIST}; spf=pass smtp.mailfrom=owner@{LIST}"  # aligns with nothing
JUNK_RESULTS = "(((;;; === ;"


def test_trusted_newest_sealer_with_a_dkim_aligned_aar_rescues_by_dkim(key: PrivateKey) -> None:
    dmarc = Dmarc()
    rescue = rescue_of(key, [(LIST, DKIM_ALIGNED)], trust(LIST), dmarc)
    assert rescue == Rescue(instance=1, sealer=LIST, method="dkim",
                            comment=f"arc=pass as[1].d={LIST} as[1].s=sel "
                                    "remote-ip[1]=192.0.2.1")  # fmt: skip
    assert len(dmarc.calls) == 1
    dkim, spf = dmarc.calls[0]
    assert [(d.domain, d.selector) for d in dkim] == [(AUTHOR, "s2024")]
    assert spf is not None and (spf.result, spf.domain) == (SpfResult.FAIL, AUTHOR)


def test_an_spf_aligned_aar_rescues_by_spf(key: PrivateKey) -> None:
    rescue = rescue_of(key, [(LIST, SPF_ALIGNED)], trust(LIST), Dmarc())
    assert rescue is not None and (rescue.instance, rescue.method) == (1, "spf")
    assert rescue.comment.endswith(" remote-ip[1]=192.0.2.2")


def test_a_failed_chain_rescues_nothing(key: PrivateKey) -> None:
    hops = [(LIST, DKIM_ALIGNED)]
    message = sealed(key, hops) + b"Appended after sealing.\r\n"
    outcome, headers = judged(key, message, hops)
    assert outcome.result == "fail", outcome
    trusted, dmarc = trust(LIST), Dmarc()
    assert find_rescue(outcome, headers, trusted=trusted, passes=dmarc) is None
    assert (trusted.asked, dmarc.calls) == ([], [])


def test_only_a_pass_verdict_counts_whatever_sets_it_carries(key: PrivateKey) -> None:
    hops = [(LIST, DKIM_ALIGNED)]
    outcome, headers = judged(key, sealed(key, hops), hops)
    assert find_rescue(outcome, headers, trusted=trust(LIST), passes=Dmarc()) is not None
    for result in ("fail", "none"):
        other = replace(outcome, result=result)
        assert find_rescue(other, headers, trusted=trust(LIST), passes=Dmarc()) is None


def test_no_arc_rescues_nothing(key: PrivateKey) -> None:
    headers, body = split(make_message())
    outcome = verify_chain(headers, body, resolver([]), now=NOW)
    assert outcome.result == "none"
    assert find_rescue(outcome, headers, trusted=trust(LIST), passes=Dmarc()) is None


def test_an_untrusted_newest_sealer_stops_the_walk(key: PrivateKey) -> None:
    """A trusted older set whose AAR would pass is not evidence under an untrusted seal."""
    trusted, dmarc = trust(LIST), Dmarc()
    rescue = rescue_of(key, [(LIST, DKIM_ALIGNED), (FWD, DKIM_ALIGNED)], trusted, dmarc)
    assert rescue is None
    assert (trusted.asked, dmarc.calls) == ([FWD], [])


def test_the_newest_passing_aar_of_trusted_sealers_wins(key: PrivateKey) -> None:
    dmarc = Dmarc()
    rescue = rescue_of(key, [(LIST, SPF_ALIGNED), (FWD, DKIM_ALIGNED)], trust(LIST, FWD), dmarc)
    assert rescue is not None and (rescue.instance, rescue.sealer, rescue.method) == (
        2, FWD, "dkim")  # fmt: skip
    assert len(dmarc.calls) == 1


def test_an_older_trusted_aar_rescues_when_the_newest_does_not_pass(key: PrivateKey) -> None:
    dmarc = Dmarc()
    rescue = rescue_of(key, [(LIST, DKIM_ALIGNED), (FWD, LIST_OWN)], trust(LIST, FWD), dmarc)
    assert rescue == Rescue(
        instance=1,
        sealer=LIST,
        method="dkim",
        comment=f"arc=pass as[2].d={FWD} as[2].s=sel as[1].d={LIST} as[1].s=sel "
        "remote-ip[1]=192.0.2.1",
    )
    assert [[d.domain for d in dkim] for dkim, _spf in dmarc.calls] == [[LIST], [AUTHOR]]


def test_passes_is_never_called_for_untrusted_instances(key: PrivateKey) -> None:
    """Newest trusted (does not pass), middle untrusted, oldest trusted (would pass)."""
    trusted, dmarc = trust(LIST, RELAY), Dmarc()
    hops = [(LIST, DKIM_ALIGNED), (FWD, SPF_ALIGNED), (RELAY, LIST_OWN)]
    assert rescue_of(key, hops, trusted, dmarc) is None
    assert trusted.asked == [RELAY, FWD]
    assert len(dmarc.calls) == 1
    dkim, spf = dmarc.calls[0]
    assert [d.reason for d in dkim] == ["ARC i=3"] and spf is not None
    assert spf.comment == "ARC i=3"


def test_an_aar_without_results_is_skipped_under_a_trusted_sealer(key: PrivateKey) -> None:
    hops = [(LIST, DKIM_ALIGNED), (FWD, JUNK_RESULTS)]
    dmarc = Dmarc()
    rescue = rescue_of(key, hops, trust(LIST, FWD), dmarc)
    assert rescue is not None and (rescue.instance, rescue.method) == (1, "dkim")
    assert len(dmarc.calls) == 1  # nothing to evaluate at i=2
    dmarc = Dmarc()
    assert rescue_of(key, hops, trust(LIST), dmarc) is None
    assert dmarc.calls == []


def test_an_aar_missing_or_doubled_in_the_headers_is_skipped(key: PrivateKey) -> None:
    """The outcome says pass but the headers given lack (or double) the AAR of i=2."""
    hops = [(LIST, DKIM_ALIGNED), (FWD, DKIM_ALIGNED)]
    message = sealed(key, hops)
    outcome, _headers = judged(key, message, hops)
    assert outcome.passed
    missing = split(drop_field(message, "ARC-Authentication-Results", 2))[0]
    doubled = split(edit_field(message, "ARC-Authentication-Results", 2,
                               lambda f: f + b"\r\n" + f))[0]  # fmt: skip
    for headers in (missing, doubled):
        dmarc = Dmarc()
        rescue = find_rescue(outcome, headers, trusted=trust(LIST, FWD), passes=dmarc)
        assert rescue is not None and rescue.instance == 1
        assert len(dmarc.calls) == 1
        assert find_rescue(outcome, headers, trusted=trust(FWD), passes=Dmarc()) is None


def test_an_answer_other_than_dkim_or_spf_is_no_rescue(key: PrivateKey) -> None:
    message = sealed(key, [(LIST, DKIM_ALIGNED)])
    outcome, headers = judged(key, message, [(LIST, DKIM_ALIGNED)])
    assert find_rescue(outcome, headers, trusted=trust(LIST),
                       passes=lambda _d, _s: "both") is None  # fmt: skip


def test_a_dkim_pass_of_another_domain_does_not_rescue(key: PrivateKey) -> None:
    dmarc = Dmarc()
    assert rescue_of(key, [(LIST, LIST_OWN)], trust(LIST), dmarc) is None
    assert len(dmarc.calls) == 1


HOSTILE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"ARC-Authentication-Results", b" i=1; \xff\xfe (((\x00\r\n"),
    (b"arc-authentication-results", b""),
    (b"ARC-Authentication-Results", b" i=1; mx; dkim=pass header.d=" + b"a" * 70_000 + b"\r\n"),
    (b"ARC-Authentication-Results", b" i=1; mx; dkim=pass header.d=\x00x.test\r\n"),
    (b"ARC-Authentication-Results ", b" i=1; mx; dkim=pass header.d=x.test\r\n"),  # not an AAR
    (b"", b"\x00"),
    (b"\xff", b" i=1; mx; dkim=pass header.d=x.test\r\n"),
]


@pytest.mark.parametrize("count", [1, len(HOSTILE_HEADERS)])
@pytest.mark.parametrize("start", range(len(HOSTILE_HEADERS)))
def test_hostile_headers_never_raise(start: int, count: int) -> None:
    outcome = ArcOutcome(result="pass", reason="1 ARC set verified", instances=1, oldest_pass=0,
                         sets=(ArcSet(1, "x.test", "s", "192.0.2.1"),))  # fmt: skip
    dmarc = Dmarc(domain="x.test")
    headers = HOSTILE_HEADERS[start : start + count]
    assert find_rescue(outcome, headers, trusted=trust("x.test"), passes=dmarc) is None
    assert dmarc.calls == []  # nothing readable alone; together, several AARs claim i=1
