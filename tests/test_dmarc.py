"""DMARC: the author domain, records, discovery (PSL and tree walk), alignment and disposition.

Most scenarios run on :class:`fakedns.ZoneResolver` over a zone for the whole ``.example`` TLD
(the tree walk asks up to ``_dmarc.example``); a few run the same zone text through a real NSD.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authmilter.addresses import AuthorDomain, FromStatus, author_domain, normalize_domain
from authmilter.dmarc import (
    MAX_TREEWALK_QUERIES,
    DmarcRecord,
    DmarcRecordError,
    NotDmarcRecord,
    OrgDomainMethod,
    PublicSuffix,
    discover,
    domain_exists,
    evaluate,
    parse_record,
    treewalk_names,
    treewalk_org_domain,
)
from authmilter.errors import ConfigError, DNSTempError
from authmilter.resolver import Resolver
from authmilter.results import (
    DkimOutcome,
    DkimResult,
    DmarcOutcome,
    DmarcPolicy,
    DmarcResult,
    SpfIdentity,
    SpfOutcome,
    SpfResult,
)
from dnsserver import NsdServer, make_zone, txt_rdata
from fakedns import ZoneResolver, failure_marker
from helpers import assert_plausible

NsdFactory = Callable[[Mapping[str, str]], NsdServer]
PSL = PublicSuffix()
TLD = "example"
PSL_METHOD = OrgDomainMethod.PSL
WALK = OrgDomainMethod.TREEWALK
BOTH_METHODS = pytest.mark.parametrize("method", [PSL_METHOD, WALK])

Record = tuple[str, str, str]


# -- helpers ----------------------------------------------------------------------------------


def dmarc(owner: str, text: str) -> Record:
    """A TXT record at ``_dmarc.<owner>`` (owner relative to the ``.example`` zone)."""
    name = "_dmarc" if owner in ("", "@") else f"_dmarc.{owner}"
    return (name, "TXT", txt_rdata(text))


def host(owner: str, rtype: str = "A", rdata: str = "192.0.2.1") -> Record:
    return (owner, rtype, rdata)


def zone_text(records: Iterable[Record], origin: str = TLD) -> str:
    return make_zone(origin, list(records))


def resolver(*records: Record, origin: str = TLD) -> ZoneResolver:
    return ZoneResolver(zone_text(records, origin), origin)


def dkim_pass(domain: str) -> DkimOutcome:
    return DkimOutcome(result=DkimResult.PASS, domain=domain, selector="sel")


def dkim_fail(domain: str) -> DkimOutcome:
    return DkimOutcome(result=DkimResult.FAIL, domain=domain, selector="sel")


def spf(
    domain: str,
    result: SpfResult = SpfResult.PASS,
    identity: SpfIdentity = SpfIdentity.MAILFROM,
) -> SpfOutcome:
    return SpfOutcome(
        result=result,
        identity=identity,
        sender=f"bounce@{domain}",
        domain=domain,
        client_ip="192.0.2.25",
    )


def never() -> float:
    raise AssertionError("rand() must not be called here")


def check(
    res: ZoneResolver | Resolver,
    from_domain: str,
    dkim: Sequence[DkimOutcome] = (),
    spf_outcome: SpfOutcome | None = None,
    *,
    method: OrgDomainMethod = PSL_METHOD,
    rand: Callable[[], float] = never,
) -> DmarcOutcome:
    author = author_domain([f"Someone <someone@{from_domain}>"])
    assert author.status is FromStatus.OK, author
    return evaluate(res, author, dkim, spf_outcome, method=method, psl=PSL, rand=rand)


def dmarc_queries(res: ZoneResolver) -> list[str]:
    return [name for name, rtype in res.query_log if rtype == "TXT"]


# =============================================================================================
# 1. The author domain
# =============================================================================================

OK_FROM = [
    ("plain addr-spec", "a@x.example", "x.example"),
    ("angle-addr", "<a@x.example>", "x.example"),
    ("display name", "Alice Doe <a@x.example>", "x.example"),
    ("domain case folded", "Alice <a@X.EXAMPLE>", "x.example"),
    ("quoted name with comma and quotes", r'"Doe, John \"JD\"" <jd@x.example>', "x.example"),
    ("quoted name holding an address", '"ceo@bank.example" <a@x.example>', "x.example"),
    ("quoted name with angle brackets", '"<ceo@bank.example>" <a@x.example>', "x.example"),
    ("comment after", "a@x.example (Alice)", "x.example"),
    ("comment before", "(comment) <a@x.example>", "x.example"),
    ("nested comment with an address", "(a (ceo@bank.example) b) a@x.example", "x.example"),
    ("comment holding a quote", '(it\'s "odd") a@x.example', "x.example"),
    ("encoded-word display name", "=?utf-8?q?D=C3=B6e?= <d@x.example>", "x.example"),
    ("encoded-word base64 name", "=?utf-8?b?Y2VvQGJhbmsuZXhhbXBsZQ==?= <d@x.example>", "x.example"),
    ("quoted encoded word", '"=?utf-8?q?ceo=40bank.example?=" <d@x.example>', "x.example"),
    ("raw UTF-8 display name", "Jürgen Müller <j@x.example>", "x.example"),
    ("obs-phrase with a dot", "Dr. Who <who@x.example>", "x.example"),
    ("quoted local part", '"john doe"@x.example', "x.example"),
    ("quoted local part with @", '"a@bank.example"@x.example', "x.example"),
    ("dotted local part", "first.last@x.example", "x.example"),
    ("CFWS around @ (RFC 5322 §3.4.1)", "a @ x.example", "x.example"),
    ("spaces inside angle brackets", "Alice < a@x.example >", "x.example"),
    ("route addr", "<@relay.example:a@x.example>", "x.example"),
    ("route addr, two hops", "<@r1.example,@r2.example:a@x.example>", "x.example"),
    ("group with mailboxes", "grp: a@x.example, b@x.example;", "x.example"),
    ("group and mailbox", "grp: a@x.example;, b@x.example", "x.example"),
    ("two mailboxes, one domain", "a@x.example, B <b@X.example>", "x.example"),
    ("empty list elements (RFC 5322 §4.4)", ", a@x.example, ,", "x.example"),
    ("IDN U-label", "a@bücher.example", "xn--bcher-kva.example"),
    ("IDN U-label, capitalised", "a@Bücher.Example", "xn--bcher-kva.example"),
    ("IDN A-label", "a@XN--BCHER-KVA.example", "xn--bcher-kva.example"),
    ("trailing dot", "a@x.example.", "x.example"),
    ("trailing dot in angle-addr", "<a@x.example.>", "x.example"),
    ("folded value", "Alice\r\n <a@x.example>", "x.example"),
    ("tab white space", "Alice\t<a@x.example>", "x.example"),
    ("single-label domain", "root@localhost", "localhost"),
]


@pytest.mark.parametrize(("value", "domain"), [c[1:] for c in OK_FROM], ids=[c[0] for c in OK_FROM])
def test_from_edge_cases_that_yield_one_domain(value: str, domain: str) -> None:
    author = author_domain([value])
    assert author.status is FromStatus.OK, author.detail
    assert author.domain == domain
    assert all(address.endswith("@" + domain) for address in author.addresses)


BAD_FROM = [
    ("unbalanced <", "Alice <a@x.example"),
    ("unbalanced >", "a@x.example>"),
    ("two angle-addrs", "<a@x.example> <b@x.example>"),
    ("unbalanced quote", '"Alice <a@x.example>'),
    ("unbalanced (", "(Alice <a@x.example>"),
    ("unbalanced )", "Alice) <a@x.example>"),
    ("no @", "alice"),
    ("no @ in angle-addr", "Alice <alice>"),
    ("empty angle-addr", "Alice <>"),
    ("empty local part", "@x.example"),
    ("empty quoted local part", '""@x.example'),
    ("empty domain", "a@"),
    ("empty domain in angle-addr", "<a@>"),
    ("empty label", "a@x..example"),
    ("two trailing dots", "a@x.example.."),
    ("leading dot in domain", "a@.x.example"),
    ("leading dot in local part", ".a@x.example"),
    ("double @", "a@b@x.example"),
    ("addr-spec then angle-addr", "x@evil.example <y@bank.example>"),
    ("word then addr-spec", "Alice a@x.example"),
    ("unquoted @ in display name", "ceo@bank.example <a@x.example>"),
    ("encoded word smuggling an address", "=?utf-8?q?a@bank.example?= <d@x.example>"),
    ("encoded word with a comma", "=?utf-8?q?Doe,_John?= <d@x.example>"),
    ("encoded word as the domain", "a@=?utf-8?q?bank.example?="),
    ("space inside domain", "a@x .example"),
    ("comment inside domain", "a@x(c).example"),
    ("space inside local part", "a .b@x.example"),
    ("address literal", "a@[192.0.2.1]"),
    ("dotted quad", "a@192.0.2.1"),
    ("underscore in domain", "a@x_y.example"),
    ("label starting with hyphen", "a@-x.example"),
    ("label too long", "a@" + "x" * 64 + ".example"),
    ("invalid A-label", "a@xn--zz.example"),
    ("U-label not in normal form (fullwidth)", "a@ｘ.example"),
    ("stray backslash", r"a\b@x.example"),
    ("control character", "a@x.example\x00"),
    ("bare CR", "a@x.example\r"),
    ("nested group", "g1: g2: a@x.example;;"),
    ("unterminated group", "grp: a@x.example"),
    ("group without a display name", ": a@x.example;"),
    ("empty field", ""),
    ("blank field", "  "),
    ("only a comment", "(nobody)"),
    ("stray semicolon", "a@x.example;"),
    ("unbalanced [", "a@[192.0.2.1"),
]


@pytest.mark.parametrize("value", [c[1] for c in BAD_FROM], ids=[c[0] for c in BAD_FROM])
def test_from_edge_cases_that_are_unparseable(value: str) -> None:
    author = author_domain([value])
    assert author.status is FromStatus.UNPARSEABLE, author
    assert author.domain is None
    assert author.addresses == ()
    assert author.detail


def test_no_from_field_is_absent() -> None:
    assert author_domain([]) == AuthorDomain(FromStatus.ABSENT, None, (), "no From field")


@pytest.mark.parametrize("value", ["Undisclosed recipients:;", "grp: ;", "grp:,;"])
def test_from_holding_only_an_empty_group_is_absent(value: str) -> None:
    author = author_domain([value])
    assert author.status is FromStatus.ABSENT
    assert author.domain is None


def test_two_from_fields_are_multiple_fields_even_with_one_domain() -> None:
    author = author_domain(["a@x.example", "b@x.example"])
    assert author.status is FromStatus.MULTIPLE_FIELDS
    assert author.domain is None
    assert "2 From fields" in author.detail


@pytest.mark.parametrize(
    "value",
    [
        "a@x.example, b@y.example",
        "Alice <a@x.example>, Mallory <m@bank.example>",
        "grp: a@x.example, b@sub.x.example;",
    ],
)
def test_one_from_field_with_two_domains_is_multiple_domains(value: str) -> None:
    author = author_domain([value])
    assert author.status is FromStatus.MULTIPLE_DOMAINS
    assert author.domain is None
    assert len(author.addresses) == 2


def test_trailing_dot_is_noted_in_the_detail() -> None:
    assert "trailing dot" in author_domain(["a@x.example."]).detail


def test_addresses_keep_the_local_part_and_normalise_the_domain() -> None:
    author = author_domain(['"J D" <"j d"@Bücher.Example>, k@xn--bcher-kva.example'])
    assert author.addresses == ('"j d"@xn--bcher-kva.example', "k@xn--bcher-kva.example")


# -- hypothesis: random text never raises, and an OK domain is really in the input -----------
# (assert_plausible, in helpers, is shared with test_properties)

_FROM_ALPHABET = st.sampled_from(
    list('aAbz09.-_@<>()"\\,;:[] \t=?') + ["ü", "é", "ｘ", "\r\n ", "\x00", "xn--", "=?utf-8?q?"]
)


@settings(max_examples=1500, deadline=None)
@given(st.text())
def test_author_domain_never_raises_on_random_text(value: str) -> None:
    author = author_domain([value])
    assert isinstance(author.status, FromStatus)
    if author.status is FromStatus.OK:
        assert_plausible(value, author)
    else:
        assert author.domain is None


@settings(max_examples=3000, deadline=None)
@given(st.lists(_FROM_ALPHABET, max_size=40).map("".join))
def test_author_domain_on_address_like_soup_is_plausible_or_refused(value: str) -> None:
    author = author_domain([value])
    if author.status is FromStatus.OK:
        assert_plausible(value, author)


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_DOMAIN = st.lists(_LABEL, min_size=1, max_size=4).map(lambda ls: ".".join([*ls, "example"]))
_LOCAL = st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,10}", fullmatch=True)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.text(max_size=30), local=_LOCAL, domain=_DOMAIN, decoy=_DOMAIN)
def test_quoted_display_names_never_change_the_domain(
    name: str, local: str, domain: str, decoy: str
) -> None:
    # Whatever the display name holds (addresses, quotes, brackets), once quoted it is a name.
    quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + f' <x@{decoy}>"'
    author = author_domain([f"{quoted} <{local}@{domain}>"])
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name if c != "\t"):
        assert author.status is FromStatus.UNPARSEABLE
    else:
        assert author.status is FromStatus.OK, author.detail
        assert author.domain == domain


# =============================================================================================
# 2. Records
# =============================================================================================


def test_record_defaults() -> None:
    record = parse_record("v=DMARC1; p=reject")
    assert record == DmarcRecord(
        p=DmarcPolicy.REJECT,
        sp=None,
        np=None,
        adkim="r",
        aspf="r",
        pct=100,
        rua=(),
        ruf=(),
        fo="0",
        rf="afrf",
        ri=86400,
        testing=False,
        psd="u",
        tags={"v": "DMARC1", "p": "reject"},
    )


def test_record_with_every_tag() -> None:
    record = parse_record(
        "v=DMARC1; p=quarantine; sp=reject; np=none; adkim=s; aspf=s; pct=25; "
        "rua=mailto:agg@x.example,mailto:agg2@y.example!10m; ruf=mailto:f@x.example; "
        "fo=1:d; rf=afrf; ri=3600; t=y; psd=n; future=tag"
    )
    assert record.p is DmarcPolicy.QUARANTINE
    assert record.sp is DmarcPolicy.REJECT
    assert record.np is DmarcPolicy.NONE
    assert (record.adkim, record.aspf, record.pct) == ("s", "s", 25)
    assert record.rua == ("mailto:agg@x.example", "mailto:agg2@y.example!10m")
    assert record.ruf == ("mailto:f@x.example",)
    assert (record.fo, record.rf, record.ri) == ("1:d", "afrf", 3600)
    assert record.testing is True
    assert record.psd == "n"
    assert record.tags["future"] == "tag"
    assert record.warnings == ()


@pytest.mark.parametrize(
    "text",
    [
        "v=DMARC1;p=reject",
        "v = DMARC1 ; p = reject ;",
        "  v=DMARC1;\tp=reject  ",
        "v=DMARC1; p=REJECT",
        "v=DMARC1; P=Reject",
        "V=DMARC1; p=reject",
        "v=DMARC1; ; p=reject;;",
    ],
)
def test_record_parsing_is_white_space_and_case_tolerant(text: str) -> None:
    assert parse_record(text).p is DmarcPolicy.REJECT


@pytest.mark.parametrize(
    "text",
    [
        "",
        "v=spf1 -all",
        "v=dmarc1; p=reject",  # RFC 7489 §6.4: the value is %x-exact
        "v=DMARC2; p=reject",
        "v=DMARC10; p=reject",
        "p=reject; v=DMARC1",  # v must be the first tag
        "v=DMARC1p=reject",
        "DMARC1; p=reject",
        "some verification token",
    ],
)
def test_text_that_is_not_a_dmarc_record(text: str) -> None:
    with pytest.raises(NotDmarcRecord):
        parse_record(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("v=DMARC1", "p= is missing"),
        ("v=DMARC1;", "p= is missing"),
        ("v=DMARC1; p=bogus", "p='bogus'"),
        ("v=DMARC1; p=", "p=''"),
        ("v=DMARC1; p=reject; sp=bogus", "sp='bogus'"),
        ("v=DMARC1; p=reject; np=deny", "np='deny'"),
        ("v=DMARC1; p=reject; pct=200", "pct='200'"),
        ("v=DMARC1; p=reject; pct=-1", "pct='-1'"),
        ("v=DMARC1; p=reject; pct=50.5", "pct='50.5'"),
        ("v=DMARC1; p=reject; pct=", "pct=''"),
        ("v=DMARC1; p=reject; adkim=x", "adkim='x'"),
        ("v=DMARC1; p=reject; aspf=strict", "aspf='strict'"),
        ("v=DMARC1; p=reject; t=yes", "t='yes'"),
        ("v=DMARC1; p=reject; psd=maybe", "psd='maybe'"),
        ("v=DMARC1; p=reject; p=none", "p= appears more than once"),
        ("v=DMARC1; p=reject; P=none", "p= appears more than once"),
        ("v=DMARC1; p=reject; v=DMARC1", "v= appears more than once"),
        ("v=DMARC1; p=reject; x=1; x=2", "x= appears more than once"),
    ],
)
def test_broken_dmarc_records_raise_with_the_tag_named(text: str, message: str) -> None:
    with pytest.raises(DmarcRecordError) as excinfo:
        parse_record(text)
    assert message in str(excinfo.value)


@pytest.mark.parametrize(
    "text",
    [
        "v=DMARC1; rua=mailto:agg@x.example",
        "v=DMARC1; p=bogus; rua=mailto:agg@x.example",
        "v=DMARC1; p=reject; sp=bogus; rua=mailto:agg@x.example",
        "v=DMARC1; p=reject; np=bogus; rua=mailto:agg@x.example, junk",
    ],
)
def test_missing_or_invalid_policy_with_a_valid_rua_acts_as_p_none(text: str) -> None:
    # RFC 7489 §6.6.3: "act as if a record containing a valid 'v' tag and 'p=none' was
    # retrieved" when rua= holds at least one syntactically valid URI.
    record = parse_record(text)
    assert (record.p, record.sp, record.np) == (DmarcPolicy.NONE, None, None)
    assert record.rua == ("mailto:agg@x.example",)
    assert any("RFC 7489 §6.6.3" in w for w in record.warnings)


def test_missing_p_with_only_invalid_rua_is_broken() -> None:
    with pytest.raises(DmarcRecordError, match="p= is missing"):
        parse_record("v=DMARC1; rua=agg@x.example")


def test_invalid_reporting_tags_fall_back_to_defaults_with_warnings() -> None:
    record = parse_record(
        "v=DMARC1; p=reject; rua=mailto:a@x.example, not-a-uri, ; ruf=; fo=2; rf=#; ri=abc; junk"
    )
    assert record.p is DmarcPolicy.REJECT
    assert record.rua == ("mailto:a@x.example",)
    assert record.ruf == ()
    assert (record.fo, record.rf, record.ri) == ("0", "afrf", 86400)
    joined = " | ".join(record.warnings)
    for fragment in ("'not-a-uri'", "fo='2'", "rf='#'", "ri='abc'", "'junk'"):
        assert fragment in joined


def test_pct_with_leading_zeros_and_bounds() -> None:
    assert parse_record("v=DMARC1; p=reject; pct=050").pct == 50
    assert parse_record("v=DMARC1; p=reject; pct=0").pct == 0
    assert parse_record("v=DMARC1; p=reject; pct=100").pct == 100


def test_record_tags_are_read_only() -> None:
    record = parse_record("v=DMARC1; p=none")
    with pytest.raises(TypeError):
        record.tags["p"] = "reject"  # type: ignore[index]


_TAG_SOUP = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "p",
                "sp",
                "np",
                "adkim",
                "aspf",
                "pct",
                "rua",
                "ruf",
                "fo",
                "rf",
                "ri",
                "t",
                "psd",
                "v",
                "x",
                "P",
                " p",
                "1x",
                "",
            ]
        ),
        st.sampled_from(["=", " = ", "", "=="]),
        st.one_of(
            st.sampled_from(
                [
                    "none",
                    "reject",
                    "quarantine",
                    "r",
                    "s",
                    "y",
                    "n",
                    "u",
                    "50",
                    "100",
                    "101",
                    "mailto:a@x.example",
                    "mailto:a@x.example!5k",
                    "0:1:d:s",
                    "afrf",
                    "86400",
                    "",
                    " ",
                ]
            ),
            st.text(max_size=8),
        ),
    ).map("".join),
    max_size=8,
)


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.text(), _TAG_SOUP.map(lambda tags: "v=DMARC1; " + "; ".join(tags))))
def test_parse_record_raises_only_its_two_documented_exceptions(text: str) -> None:
    try:
        record = parse_record(text)
    except (NotDmarcRecord, DmarcRecordError):
        return
    assert isinstance(record.p, DmarcPolicy)
    assert record.sp is None or isinstance(record.sp, DmarcPolicy)
    assert record.np is None or isinstance(record.np, DmarcPolicy)
    assert record.adkim in ("r", "s") and record.aspf in ("r", "s")
    assert 0 <= record.pct <= 100
    assert record.psd in ("y", "n", "u")
    assert 0 <= record.ri < 2**32
    assert all(":" in uri for uri in record.rua + record.ruf)


# =============================================================================================
# 3. Organizational domain and discovery
# =============================================================================================


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("example.com", "example.com"),
        ("Mail.Example.COM.", "example.com"),
        ("a.b.example.co.uk", "example.co.uk"),
        ("co.uk", "co.uk"),  # a public suffix is its own organizational domain
        ("mail.org.example", "org.example"),  # unknown TLD: the list's default "*" rule
        ("x.y.github.io", "y.github.io"),  # the private section is used, as OpenDMARC does
        ("xn--bcher-kva.xn--p1ai", "xn--bcher-kva.xn--p1ai"),
    ],
)
def test_psl_organizational_domain(domain: str, org: str) -> None:
    assert PSL.org_domain(domain) == org


def test_psl_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "psl.dat"
    path.write_text("// tiny list\nexample\ncorp.example\n")
    psl = PublicSuffix(str(path))
    assert psl.org_domain("mail.dept.corp.example") == "dept.corp.example"
    assert PSL.org_domain("mail.dept.corp.example") == "corp.example"


def test_unreadable_psl_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PublicSuffixList"):
        PublicSuffix(str(tmp_path / "missing.dat"))


@pytest.mark.parametrize(
    ("domain", "names"),
    [
        ("example", ["example"]),
        ("org.example", ["org.example", "example"]),
        (
            "a.b.c.d.e.f.g.example",
            [
                "a.b.c.d.e.f.g.example",
                "b.c.d.e.f.g.example",
                "c.d.e.f.g.example",
                "d.e.f.g.example",
                "e.f.g.example",
                "f.g.example",
                "g.example",
                "example",
            ],
        ),
        (
            "a.b.c.d.e.f.g.h.i.example",
            [
                "a.b.c.d.e.f.g.h.i.example",
                "d.e.f.g.h.i.example",
                "e.f.g.h.i.example",
                "f.g.h.i.example",
                "g.h.i.example",
                "h.i.example",
                "i.example",
                "example",
            ],
        ),
    ],
)
def test_tree_walk_names_follow_the_eight_label_rule(domain: str, names: list[str]) -> None:
    # RFC 9989 "DNS Tree Walk": the name itself; over eight labels, then the seven rightmost;
    # then one label less each time, to the TLD; never more than eight queries.
    assert treewalk_names(domain) == names
    assert len(treewalk_names("x." * 40 + "example")) == MAX_TREEWALK_QUERIES


def test_eight_label_rule_skips_records_between_the_name_and_its_seven_rightmost_labels() -> None:
    from_domain = "a.b.c.d.e.f.g.h.i.example"  # 10 labels
    res = resolver(
        dmarc("c.d.e.f.g.h.i", "v=DMARC1; p=reject"),  # 8 labels: skipped by the walk
        dmarc("f.g.h.i", "v=DMARC1; p=quarantine"),  # 5 labels: found
    )
    found = discover(res, from_domain, method=WALK, psl=PSL)
    assert found.record is not None and found.record.p is DmarcPolicy.QUARANTINE
    assert found.record_domain == "f.g.h.i.example"
    queried = dmarc_queries(res)
    assert "_dmarc.c.d.e.f.g.h.i.example" not in queried
    assert queried[:3] == [
        "_dmarc.a.b.c.d.e.f.g.h.i.example",
        "_dmarc.d.e.f.g.h.i.example",
        "_dmarc.e.f.g.h.i.example",
    ]
    assert len(queried) <= MAX_TREEWALK_QUERIES


def test_tree_walk_without_any_record_takes_at_most_eight_queries() -> None:
    res = resolver()
    found = discover(res, "a.b.c.d.e.f.g.h.i.j.k.example", method=WALK, psl=PSL)
    assert found.record is None and found.error is None
    assert found.org_domain == "a.b.c.d.e.f.g.h.i.j.k.example"  # none found: the domain itself
    assert len(dmarc_queries(res)) == MAX_TREEWALK_QUERIES


def test_psl_discovery_falls_back_to_the_organizational_domain() -> None:
    res = resolver(dmarc("org", "v=DMARC1; p=reject"))
    found = discover(res, "mail.org.example", method=PSL_METHOD, psl=PSL)
    assert found.record is not None
    assert (found.record_domain, found.org_domain) == ("org.example", "org.example")
    assert found.detail == (
        "record found at _dmarc.org.example (organizational domain of mail.org.example)"
    )
    assert dmarc_queries(res) == ["_dmarc.mail.org.example", "_dmarc.org.example"]


def test_psl_discovery_asks_once_for_an_organizational_domain() -> None:
    res = resolver()
    found = discover(res, "org.example", method=PSL_METHOD, psl=PSL)
    assert found.record is None and found.error is None
    assert dmarc_queries(res) == ["_dmarc.org.example"]


def test_record_on_an_intermediate_label_is_found_by_the_tree_walk_only() -> None:
    res = resolver(dmarc("b.corp", "v=DMARC1; p=reject"))
    walked = discover(res, "a.b.corp.example", method=WALK, psl=PSL)
    assert walked.record_domain == "b.corp.example"
    assert walked.org_domain == "b.corp.example"  # the highest record found
    by_psl = discover(res, "a.b.corp.example", method=PSL_METHOD, psl=PSL)
    assert by_psl.record is None and by_psl.error is None
    assert by_psl.org_domain == "corp.example"


def test_psd_n_makes_a_subdomain_its_own_organizational_domain_in_the_tree_walk() -> None:
    res = resolver(
        dmarc("corp", "v=DMARC1; p=reject"),
        dmarc("dept.corp", "v=DMARC1; p=reject; psd=n"),
    )
    assert treewalk_org_domain(res, "mail.dept.corp.example") == "dept.corp.example"
    assert treewalk_org_domain(res, "corp.example") == "corp.example"
    assert PSL.org_domain("mail.dept.corp.example") == "corp.example"


def test_psd_y_at_a_public_suffix_makes_the_label_below_it_the_organizational_domain() -> None:
    res = resolver(dmarc("", "v=DMARC1; p=reject; psd=y"))
    found = discover(res, "mail.brand.example", method=WALK, psl=PSL)
    assert found.record_domain == "example"
    assert found.org_domain == "brand.example"
    assert treewalk_org_domain(res, "brand.example") == "brand.example"
    # psd=y at the starting name itself does not count (RFC 9989); the highest record does.
    assert treewalk_org_domain(res, "example") == "example"
    # The PSL method does not look at public suffix domains' records.
    assert discover(res, "mail.brand.example", method=PSL_METHOD, psl=PSL).record is None


def test_tree_walk_org_domain_is_the_highest_record_without_psd() -> None:
    res = resolver(
        dmarc("a.b.corp", "v=DMARC1; p=none"),
        dmarc("corp", "v=DMARC1; p=reject"),
    )
    found = discover(res, "a.b.corp.example", method=WALK, psl=PSL)
    assert found.record_domain == "a.b.corp.example"
    assert found.org_domain == "corp.example"


@BOTH_METHODS
def test_non_dmarc_txt_records_are_ignored(method: OrgDomainMethod) -> None:
    res = resolver(
        dmarc("mail.org", "v=spf1 -all"),
        dmarc("mail.org", "v=dmarc1; p=none"),
        dmarc("mail.org", "google-site-verification=abc"),
        dmarc("org", "v=DMARC1; p=reject"),
    )
    found = discover(res, "mail.org.example", method=method, psl=PSL)
    assert found.record_domain == "org.example"
    assert found.record is not None and found.record.p is DmarcPolicy.REJECT


@BOTH_METHODS
def test_several_dmarc_records_at_a_name_mean_no_policy_and_stop_discovery(
    method: OrgDomainMethod,
) -> None:
    res = resolver(
        dmarc("mail.org", "v=DMARC1; p=none"),
        dmarc("mail.org", "v=DMARC1; p=reject"),
        dmarc("mail.org", "v=spf1 -all"),
        dmarc("org", "v=DMARC1; p=reject"),
    )
    found = discover(res, "mail.org.example", method=method, psl=PSL)
    assert found.record is None and found.error is None
    assert "2 DMARC records at _dmarc.mail.org.example" in found.detail
    assert "_dmarc.org.example" not in dmarc_queries(res)  # RFC 7489 §6.6.3 step 5


@BOTH_METHODS
def test_a_valid_and_a_broken_record_at_one_name_are_two_records(method: OrgDomainMethod) -> None:
    res = resolver(
        dmarc("org", "v=DMARC1; p=reject"),
        dmarc("org", "v=DMARC1; p=bogus"),
    )
    found = discover(res, "org.example", method=method, psl=PSL)
    assert found.record is None and found.error is None


@BOTH_METHODS
def test_a_broken_record_is_permerror_without_fallback(method: OrgDomainMethod) -> None:
    res = resolver(
        dmarc("mail.org", "v=DMARC1; p=bogus"),
        dmarc("org", "v=DMARC1; p=reject"),
    )
    found = discover(res, "mail.org.example", method=method, psl=PSL)
    assert found.error is DmarcResult.PERMERROR
    assert found.record_domain == "mail.org.example"
    assert "p='bogus'" in found.detail
    assert "_dmarc.org.example" not in dmarc_queries(res)


@BOTH_METHODS
@pytest.mark.parametrize("marker", ["SERVFAIL", "TIMEOUT"])
def test_dns_failure_at_the_from_domain_is_temperror_never_none(
    method: OrgDomainMethod, marker: str
) -> None:
    res = resolver(
        ("_dmarc.mail.org", "TXT", failure_marker(marker)),
        dmarc("org", "v=DMARC1; p=reject"),
    )
    found = discover(res, "mail.org.example", method=method, psl=PSL)
    assert found.error is DmarcResult.TEMPERROR
    assert found.record is None
    outcome = check(res, "mail.org.example", method=method)
    assert outcome.result is DmarcResult.TEMPERROR
    assert outcome.disposition is DmarcPolicy.NONE


@BOTH_METHODS
def test_dns_failure_at_the_organizational_domain_is_temperror(method: OrgDomainMethod) -> None:
    res = resolver(("_dmarc.org", "TXT", failure_marker("SERVFAIL")))
    found = discover(res, "mail.org.example", method=method, psl=PSL)
    assert found.error is DmarcResult.TEMPERROR


def test_dns_failure_above_the_policy_record_in_the_tree_walk_is_temperror() -> None:
    # The walk must go on to find the organizational domain; a failure there is not "none".
    res = resolver(
        dmarc("mail.org", "v=DMARC1; p=reject"),
        ("_dmarc.org", "TXT", failure_marker("TIMEOUT")),
    )
    found = discover(res, "mail.org.example", method=WALK, psl=PSL)
    assert found.error is DmarcResult.TEMPERROR


@BOTH_METHODS
def test_a_name_outside_every_zone_refused_is_temperror(method: OrgDomainMethod) -> None:
    res = resolver(origin="org.example")  # the fake, like NSD, refuses names outside its zone
    found = discover(res, "mail.other.example", method=method, psl=PSL)
    assert found.error is DmarcResult.TEMPERROR


@BOTH_METHODS
def test_a_malformed_dns_answer_is_permerror(method: OrgDomainMethod) -> None:
    res = resolver(("_dmarc.org", "TXT", failure_marker("MALFORMED")))
    assert discover(res, "org.example", method=method, psl=PSL).error is DmarcResult.PERMERROR


def test_discover_rejects_an_invalid_domain() -> None:
    found = discover(resolver(), "bad_domain..example", method=PSL_METHOD, psl=PSL)
    assert found.error is DmarcResult.PERMERROR
    assert "invalid domain" in found.detail


def test_discover_normalises_the_domain() -> None:
    res = resolver(dmarc("org", "v=DMARC1; p=none"))
    found = discover(res, "ORG.Example.", method=PSL_METHOD, psl=PSL)
    assert found.record_domain == "org.example"


def test_discover_checks_existence_only_when_np_matters() -> None:
    records = [
        dmarc("org", "v=DMARC1; p=reject; np=quarantine"),
        dmarc("same", "v=DMARC1; p=reject; sp=none; np=none"),
        host("www.org"),
    ]
    res = resolver(*records)
    found = discover(res, "ghost.org.example", method=PSL_METHOD, psl=PSL)
    assert found.from_domain_exists is False
    assert "ghost.org.example does not exist" in found.detail
    found = discover(res, "www.org.example", method=PSL_METHOD, psl=PSL)
    assert found.from_domain_exists is True
    res = resolver(*records)
    assert discover(res, "org.example", method=PSL_METHOD, psl=PSL).from_domain_exists is None
    assert discover(res, "x.same.example", method=PSL_METHOD, psl=PSL).from_domain_exists is None
    assert [q for q in res.query_log if q[1] != "TXT"] == []


@pytest.mark.parametrize(
    ("records", "exists", "queries"),
    [
        ([host("d.org")], True, ["A"]),
        ([host("d.org", "AAAA", "2001:db8::1")], True, ["A", "AAAA"]),
        ([host("d.org", "MX", "10 mx.org.example.")], True, ["A", "AAAA", "MX"]),
        ([host("d.org", "TXT", '"hello"')], False, ["A", "AAAA", "MX"]),  # NODATA ×3
        ([host("x.d.org")], False, ["A", "AAAA", "MX"]),  # an empty non-terminal: NODATA
        ([], False, ["A"]),  # NXDOMAIN settles it at once (RFC 8020)
    ],
)
def test_domain_existence_per_dmarcbis(
    records: list[Record], exists: bool, queries: list[str]
) -> None:
    res = resolver(*records)
    assert domain_exists(res, "d.org.example") is exists
    assert [rtype for _, rtype in res.query_log] == queries


def test_a_malformed_answer_does_not_prove_non_existence() -> None:
    res = resolver(("d.org", "TXT", failure_marker("MALFORMED")))
    assert domain_exists(res, "d.org.example") is True


def test_domain_existence_lookup_failure_raises_temp_error() -> None:
    res = resolver(("d.org", "TXT", failure_marker("SERVFAIL")))
    with pytest.raises(DNSTempError):
        domain_exists(res, "d.org.example")


# =============================================================================================
# 4. Evaluation
# =============================================================================================

FROM = "news.org.example"
IDENTIFIERS = {
    "exact": ("news.org.example", True, True),
    "org-parent": ("org.example", True, False),
    "org-sibling": ("bounce.org.example", True, False),
    "org-child": ("a.news.org.example", True, False),
    "unaligned": ("other.example", False, False),
    "lookalike": ("evilorg.example", False, False),
    "suffix-lookalike": ("news.org.example.evil.example", False, False),
}


def _matrix() -> list[tuple[str, str, str, bool]]:
    cases = []
    for mechanism in ("dkim", "spf"):
        for mode in ("r", "s"):
            for name, (_, relaxed, strict) in IDENTIFIERS.items():
                cases.append((mechanism, mode, name, relaxed if mode == "r" else strict))
    return cases


@BOTH_METHODS
@pytest.mark.parametrize(("mechanism", "mode", "identifier", "aligned"), _matrix())
def test_alignment_matrix(
    method: OrgDomainMethod, mechanism: str, mode: str, identifier: str, aligned: bool
) -> None:
    domain = IDENTIFIERS[identifier][0]
    res = resolver(dmarc("org", f"v=DMARC1; p=reject; adkim={mode}; aspf={mode}"), host("news.org"))
    if mechanism == "dkim":
        outcome = check(res, FROM, [dkim_pass(domain)], method=method)
    else:
        outcome = check(res, FROM, [], spf(domain), method=method)
    assert outcome.result is (DmarcResult.PASS if aligned else DmarcResult.FAIL)
    assert outcome.dkim_aligned is (aligned and mechanism == "dkim")
    assert outcome.spf_aligned is (aligned and mechanism == "spf")
    assert outcome.disposition is (DmarcPolicy.NONE if aligned else DmarcPolicy.REJECT)


def test_relaxed_alignment_in_the_tree_walk_honours_psd_n_below_the_org_domain() -> None:
    res = resolver(
        dmarc("corp", "v=DMARC1; p=reject"),
        dmarc("dept.corp", "v=DMARC1; p=reject; psd=n"),
    )
    walked = check(res, "mail.dept.corp.example", [dkim_pass("corp.example")], method=WALK)
    assert walked.result is DmarcResult.FAIL  # org domains dept.corp.example ≠ corp.example
    assert walked.org_domain == "dept.corp.example"
    by_psl = check(res, "mail.dept.corp.example", [dkim_pass("corp.example")])
    assert by_psl.result is DmarcResult.PASS  # the PSL says corp.example for both


def test_relaxed_alignment_under_a_psd_y_public_suffix_domain() -> None:
    res = resolver(dmarc("", "v=DMARC1; p=reject; psd=y"))
    outcome = check(res, "mail.brand.example", [dkim_pass("brand.example")], method=WALK)
    assert outcome.result is DmarcResult.PASS
    assert (outcome.record_domain, outcome.org_domain) == ("example", "brand.example")
    outcome = check(res, "mail.brand.example", [dkim_pass("other.example")], method=WALK)
    assert outcome.result is DmarcResult.FAIL
    assert outcome.policy is DmarcPolicy.REJECT


def test_unrelated_dkim_domains_cost_no_tree_walk() -> None:
    res = resolver(dmarc("org", "v=DMARC1; p=reject"), host("news.org"))
    check(res, FROM, [dkim_pass("a.b.c.unrelated.example")], method=WALK)
    assert not any("unrelated" in name for name in dmarc_queries(res))


def test_only_passing_dkim_signatures_count() -> None:
    res = resolver(dmarc("org", "v=DMARC1; p=reject"), host("news.org"))
    outcome = check(res, FROM, [dkim_fail(FROM), dkim_pass("other.example")])
    assert outcome.result is DmarcResult.FAIL
    outcome = check(res, FROM, [dkim_fail(FROM), dkim_pass("other.example"), dkim_pass(FROM)])
    assert outcome.result is DmarcResult.PASS
    assert outcome.reason == f"aligned DKIM d={FROM}"


@pytest.mark.parametrize(
    "outcome",
    [
        spf("org.example", SpfResult.SOFTFAIL),
        spf("org.example", SpfResult.NEUTRAL),
        spf("org.example", SpfResult.TEMPERROR, SpfIdentity.HELO),
        spf("other.example", SpfResult.TEMPERROR),  # would not align anyway
        spf("org.example", SpfResult.PASS, SpfIdentity.HELO),  # RFC 7489 §4.1: MAIL FROM only
    ],
)
def test_spf_counts_only_a_mail_from_pass(outcome: SpfOutcome) -> None:
    res = resolver(dmarc("org", "v=DMARC1; p=reject"), host("news.org"))
    assert check(res, FROM, [], outcome).result is DmarcResult.FAIL


def test_temporary_error_of_an_identifier_that_would_align_is_temperror_not_fail() -> None:
    """A DNS hiccup must not become a p=reject bounce: a later try may pass (RFC 7489 §11.2)."""
    res = resolver(dmarc("org", "v=DMARC1; p=reject"), host("news.org"))
    outcome = check(res, FROM, [], spf("org.example", SpfResult.TEMPERROR))
    assert outcome.result is DmarcResult.TEMPERROR
    assert outcome.reason == "alignment unknown: SPF org.example had a temporary error"
    temp = replace(dkim_pass(FROM), result=DkimResult.TEMPERROR)
    outcome = check(res, FROM, [temp, dkim_pass("other.example")])
    assert outcome.result is DmarcResult.TEMPERROR and f"DKIM d={FROM}" in outcome.reason
    # An aligned pass still wins over another identifier's temporary error.
    outcome = check(res, FROM, [temp, dkim_pass(FROM)], spf("org.example", SpfResult.TEMPERROR))
    assert outcome.result is DmarcResult.PASS


@pytest.mark.parametrize(("record", "known"), [
    ("v=DMARC1; p=reject", DmarcPolicy.REJECT),
    ("v=DMARC1; p=none", DmarcPolicy.NONE),
    ("v=DMARC1; p=reject; sp=none", DmarcPolicy.NONE),
    ("v=DMARC1; p=none; np=reject", None),  # np= needs an existence lookup to choose
])  # fmt: skip
def test_temperror_names_the_policy_a_failure_would_get_when_it_is_known(
        record: str, known: DmarcPolicy | None) -> None:  # fmt: skip
    res = resolver(dmarc("org", record), host("news.org"))
    outcome = check(res, FROM, [], spf("org.example", SpfResult.TEMPERROR))
    assert outcome.result is DmarcResult.TEMPERROR and outcome.policy is known


@pytest.mark.parametrize("identity", [SpfIdentity.HELO, SpfIdentity.MAILFROM])
def test_null_sender_spf_identity_postmaster_at_helo_aligns(identity: SpfIdentity) -> None:
    # RFC 7208 §2.4: for the null sender the MAIL FROM identity is postmaster@<HELO>;
    # spf_check reports it with the HELO identity, so the caller says null_sender=True.
    res = resolver(dmarc("org", "v=DMARC1; p=reject"), host("news.org"))
    helo_pass = SpfOutcome(
        result=SpfResult.PASS,
        identity=identity,
        sender="postmaster@mx.org.example",
        domain="mx.org.example",
        client_ip="192.0.2.25",
        helo="mx.org.example",
    )
    author = author_domain([f"MAILER-DAEMON@{FROM}"])
    outcome = evaluate(res, author, [], helo_pass, method=PSL_METHOD, psl=PSL, null_sender=True)
    assert outcome.result is DmarcResult.PASS and outcome.spf_aligned
    outcome = evaluate(res, author, [], helo_pass, method=PSL_METHOD, psl=PSL)
    assert outcome.spf_aligned is (identity is SpfIdentity.MAILFROM)


def test_both_dkim_and_spf_aligned_are_reported() -> None:
    res = resolver(dmarc("org", "v=DMARC1; p=reject"), host("news.org"))
    outcome = check(res, FROM, [dkim_pass("org.example")], spf("bounce.org.example"))
    assert outcome.dkim_aligned and outcome.spf_aligned
    assert outcome.reason == "aligned DKIM d=org.example and SPF bounce.org.example"


@BOTH_METHODS
def test_no_record_is_none(method: OrgDomainMethod) -> None:
    outcome = check(resolver(), FROM, [dkim_pass(FROM)], method=method)
    assert outcome.result is DmarcResult.NONE
    assert outcome.policy is None and outcome.disposition is DmarcPolicy.NONE
    assert outcome.from_domain == FROM
    assert outcome.reason is not None and "no DMARC record" in outcome.reason


@BOTH_METHODS
def test_broken_record_is_permerror_even_when_dkim_aligns(method: OrgDomainMethod) -> None:
    res = resolver(dmarc("org", "v=DMARC1; p=reject; pct=200"))
    outcome = check(res, "org.example", [dkim_pass("org.example")], method=method)
    assert outcome.result is DmarcResult.PERMERROR
    assert outcome.record_domain == "org.example"
    assert outcome.disposition is DmarcPolicy.NONE


def test_several_records_evaluate_to_none() -> None:
    # (Two identical texts would be one record: an RRset holds no duplicate rdata.)
    res = resolver(dmarc("org", "v=DMARC1; p=reject"), dmarc("org", "v=DMARC1;p=reject"))
    outcome = check(res, "org.example")
    assert outcome.result is DmarcResult.NONE
    assert outcome.reason is not None and "2 DMARC records" in outcome.reason


def test_p_missing_with_rua_fails_with_policy_none() -> None:
    res = resolver(dmarc("org", "v=DMARC1; rua=mailto:agg@org.example"))
    outcome = check(res, "org.example")
    assert outcome.result is DmarcResult.FAIL
    assert outcome.policy is DmarcPolicy.NONE and outcome.disposition is DmarcPolicy.NONE


def test_p_missing_without_rua_is_permerror() -> None:
    res = resolver(dmarc("org", "v=DMARC1; adkim=s"))
    assert check(res, "org.example").result is DmarcResult.PERMERROR


# -- policy selection: p, sp, np --------------------------------------------------------------

POLICY_RECORD = "v=DMARC1; p=reject; sp=quarantine; np=none"


@BOTH_METHODS
@pytest.mark.parametrize(
    ("record", "from_domain", "extra", "policy"),
    [
        (POLICY_RECORD, "org.example", [], DmarcPolicy.REJECT),  # the record's own domain: p
        (POLICY_RECORD, "www.org.example", [host("www.org")], DmarcPolicy.QUARANTINE),  # sp
        (POLICY_RECORD, "ghost.org.example", [], DmarcPolicy.NONE),  # NXDOMAIN: np
        (POLICY_RECORD, "txt.org.example", [host("txt.org", "TXT", '"x"')], DmarcPolicy.NONE),
        (POLICY_RECORD, "mx.org.example", [host("mx.org", "MX", "0 .")], DmarcPolicy.QUARANTINE),
        ("v=DMARC1; p=reject; sp=quarantine", "ghost.org.example", [], DmarcPolicy.QUARANTINE),
        ("v=DMARC1; p=reject", "ghost.org.example", [], DmarcPolicy.REJECT),  # np → sp → p
        ("v=DMARC1; p=reject", "www.org.example", [host("www.org")], DmarcPolicy.REJECT),
        ("v=DMARC1; p=none; np=reject", "ghost.org.example", [], DmarcPolicy.REJECT),
        ("v=DMARC1; p=none; np=reject", "www.org.example", [host("www.org")], DmarcPolicy.NONE),
    ],
)
def test_policy_selection_p_sp_np(
    method: OrgDomainMethod,
    record: str,
    from_domain: str,
    extra: list[Record],
    policy: DmarcPolicy,
) -> None:
    res = resolver(dmarc("org", record), *extra)
    outcome = check(res, from_domain, method=method)
    assert outcome.result is DmarcResult.FAIL
    assert outcome.policy is policy
    assert outcome.disposition is policy


def test_np_applies_at_the_from_domains_own_record_never() -> None:
    res = resolver(dmarc("org", "v=DMARC1; p=quarantine; np=reject"))
    assert check(res, "org.example").policy is DmarcPolicy.QUARANTINE
    assert [q for q in res.query_log if q[1] != "TXT"] == []


def test_existence_is_looked_up_only_for_failing_messages() -> None:
    res = resolver(dmarc("org", POLICY_RECORD))
    outcome = check(res, "ghost.org.example", [dkim_pass("org.example")])
    assert outcome.result is DmarcResult.PASS
    assert [q for q in res.query_log if q[1] != "TXT"] == []
    outcome = check(res, "ghost.org.example")
    assert outcome.result is DmarcResult.FAIL
    assert ("ghost.org.example", "A") in res.query_log
    assert outcome.reason is not None and "does not exist" in outcome.reason


def test_existence_is_not_looked_up_when_np_equals_the_fallback() -> None:
    res = resolver(dmarc("org", "v=DMARC1; p=reject; sp=quarantine; np=quarantine"))
    assert check(res, "ghost.org.example").policy is DmarcPolicy.QUARANTINE
    assert [q for q in res.query_log if q[1] != "TXT"] == []


def test_existence_lookup_failure_is_temperror() -> None:
    res = resolver(dmarc("org", POLICY_RECORD), ("flaky.org", "TXT", failure_marker("SERVFAIL")))
    outcome = check(res, "flaky.org.example")
    assert outcome.result is DmarcResult.TEMPERROR
    assert outcome.disposition is DmarcPolicy.NONE


# -- pct and t=y ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "draw", "disposition", "sampled_out"),
    [
        ("p=reject; pct=50", 0.0, DmarcPolicy.REJECT, False),
        ("p=reject; pct=50", 0.49, DmarcPolicy.REJECT, False),
        ("p=reject; pct=50", 0.5, DmarcPolicy.QUARANTINE, True),  # rand >= pct/100
        ("p=reject; pct=50", 0.99, DmarcPolicy.QUARANTINE, True),
        ("p=quarantine; pct=50", 0.99, DmarcPolicy.NONE, True),
        ("p=quarantine; pct=50", 0.0, DmarcPolicy.QUARANTINE, False),
        ("p=reject; pct=0", 0.0, DmarcPolicy.QUARANTINE, True),
        ("p=reject; pct=1", 0.0, DmarcPolicy.REJECT, False),
        ("p=reject; pct=99", 0.99, DmarcPolicy.QUARANTINE, True),
    ],
)
def test_pct_sampling_with_injected_rand(
    record: str, draw: float, disposition: DmarcPolicy, sampled_out: bool
) -> None:
    res = resolver(dmarc("org", f"v=DMARC1; {record}"))
    outcome = check(res, "org.example", rand=lambda: draw)
    assert outcome.result is DmarcResult.FAIL
    assert outcome.disposition is disposition
    assert outcome.sampled_out is sampled_out
    assert outcome.policy is DmarcPolicy(record.split(";")[0].split("=")[1])


@pytest.mark.parametrize("record", ["p=reject", "p=reject; pct=100", "p=none; pct=0"])
def test_rand_is_not_drawn_when_sampling_cannot_matter(record: str) -> None:
    res = resolver(dmarc("org", f"v=DMARC1; {record}"))
    outcome = check(res, "org.example", rand=never)
    assert outcome.sampled_out is False


def test_pct_does_not_touch_passing_mail() -> None:
    res = resolver(dmarc("org", "v=DMARC1; p=reject; pct=0"))
    outcome = check(res, "org.example", [dkim_pass("org.example")], rand=never)
    assert outcome.result is DmarcResult.PASS
    assert outcome.disposition is DmarcPolicy.NONE and not outcome.sampled_out


@pytest.mark.parametrize(
    ("record", "disposition"),
    [
        ("p=reject; t=y", DmarcPolicy.QUARANTINE),
        ("p=quarantine; t=y", DmarcPolicy.NONE),
        ("p=none; t=y", DmarcPolicy.NONE),
        ("p=reject; t=n", DmarcPolicy.REJECT),
        ("p=reject; pct=0; t=y", DmarcPolicy.QUARANTINE),  # one step, not two
    ],
)
def test_testing_mode_t_y_is_one_step_less_strict(record: str, disposition: DmarcPolicy) -> None:
    res = resolver(dmarc("org", f"v=DMARC1; {record}"))
    outcome = check(res, "org.example", rand=never)
    assert outcome.result is DmarcResult.FAIL
    assert outcome.disposition is disposition
    assert outcome.testing is ("t=y" in record)
    assert outcome.sampled_out is False


def test_testing_flag_is_reported_on_pass_too() -> None:
    res = resolver(dmarc("org", "v=DMARC1; p=reject; t=y"))
    outcome = check(res, "org.example", [dkim_pass("org.example")])
    assert outcome.result is DmarcResult.PASS and outcome.testing
    assert outcome.policy is DmarcPolicy.REJECT


# -- the author -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "status"),
    [
        ([], FromStatus.ABSENT),
        (["Undisclosed:;"], FromStatus.ABSENT),
        (["a@org.example", "b@org.example"], FromStatus.MULTIPLE_FIELDS),
        (["a@org.example, ceo@bank.example"], FromStatus.MULTIPLE_DOMAINS),
        (["<a@org.example"], FromStatus.UNPARSEABLE),
    ],
)
def test_unusable_author_is_permerror_never_pass(values: list[str], status: FromStatus) -> None:
    res = resolver(dmarc("org", "v=DMARC1; p=reject"))
    author = author_domain(values)
    assert author.status is status
    outcome = evaluate(
        res, author, [dkim_pass("org.example")], spf("org.example"), method=WALK, psl=PSL
    )
    assert outcome.result is DmarcResult.PERMERROR
    assert outcome.disposition is DmarcPolicy.NONE
    assert outcome.reason is not None and status.value in outcome.reason
    assert res.queries == 0


def test_idn_from_domain_is_looked_up_as_a_labels() -> None:
    res = resolver(dmarc("xn--bcher-kva", "v=DMARC1; p=reject"))
    author = author_domain(["Bücher <info@bücher.example>"])
    outcome = evaluate(
        res, author, [dkim_pass("xn--bcher-kva.example")], None, method=PSL_METHOD, psl=PSL
    )
    assert outcome.result is DmarcResult.PASS
    assert outcome.from_domain == "xn--bcher-kva.example"


def test_every_outcome_field_is_filled_on_fail() -> None:
    res = resolver(dmarc("org", "v=DMARC1; p=reject; sp=quarantine"), host("news.org"))
    outcome = check(res, FROM, [dkim_pass("other.example")], spf("other.example"))
    assert outcome == DmarcOutcome(
        result=DmarcResult.FAIL,
        from_domain=FROM,
        policy=DmarcPolicy.QUARANTINE,
        disposition=DmarcPolicy.QUARANTINE,
        record_domain="org.example",
        org_domain="org.example",
        dkim_aligned=False,
        spf_aligned=False,
        testing=False,
        sampled_out=False,
        reason="no aligned DKIM or SPF identifier (sp=quarantine)",
    )


def test_relaxed_alignment_lookup_failure_is_temperror_unless_something_else_aligns() -> None:
    records = [
        dmarc("org", "v=DMARC1; p=reject"),
        ("_dmarc.bounce.org", "TXT", failure_marker("SERVFAIL")),
    ]
    outcome = check(
        resolver(*records), "org.example", [dkim_pass("bounce.org.example")], method=WALK
    )
    assert outcome.result is DmarcResult.TEMPERROR
    outcome = check(
        resolver(*records),
        "org.example",
        [dkim_pass("bounce.org.example")],
        spf("org.example"),
        method=WALK,
    )
    assert outcome.result is DmarcResult.PASS


def test_normalize_domain() -> None:
    assert normalize_domain("Bücher.Example.") == "xn--bcher-kva.example"
    for bad in ("", ".", "a..b", "a_b.example", "1.2.3.4", "x" * 64 + ".example"):
        with pytest.raises(ValueError):
            normalize_domain(bad)


# =============================================================================================
# Through a real NSD
# =============================================================================================


@pytest.mark.dns
def test_psl_evaluation_through_nsd_applies_sp_for_an_existing_subdomain(
    nsd_server: NsdFactory,
) -> None:
    text = zone_text([dmarc("org", "v=DMARC1; p=reject; sp=quarantine; np=none"), host("www.org")])
    server = nsd_server({TLD: text})
    res = Resolver([server.nameserver], timeout=3)
    outcome = check(res, "www.org.example")
    assert (outcome.result, outcome.policy) == (DmarcResult.FAIL, DmarcPolicy.QUARANTINE)
    assert outcome.record_domain == "org.example"
    # NXDOMAIN from a real server: a non-existent subdomain gets np=.
    assert check(res, "ghost.org.example").policy is DmarcPolicy.NONE
    assert check(res, "www.org.example", [dkim_pass("org.example")]).result is DmarcResult.PASS


@pytest.mark.dns
def test_tree_walk_through_nsd_with_a_public_suffix_domain_record(nsd_server: NsdFactory) -> None:
    text = zone_text(
        [dmarc("", "v=DMARC1; p=reject; psd=y"), dmarc("b.corp", "v=DMARC1; p=quarantine")]
    )
    server = nsd_server({TLD: text})
    res = Resolver([server.nameserver], timeout=3)
    outcome = check(res, "mail.brand.example", [dkim_pass("brand.example")], method=WALK)
    assert outcome.result is DmarcResult.PASS
    assert (outcome.record_domain, outcome.org_domain) == ("example", "brand.example")
    outcome = check(res, "a.b.corp.example", method=WALK)
    assert (outcome.result, outcome.record_domain) == (DmarcResult.FAIL, "b.corp.example")
    assert outcome.disposition is DmarcPolicy.QUARANTINE
    assert check(res, "a.b.corp.example").result is DmarcResult.NONE  # PSL: corp.example


@pytest.mark.dns
def test_refused_by_nsd_is_temperror_not_none(nsd_server: NsdFactory) -> None:
    server = nsd_server({"org.example": make_zone("org.example", [])})
    res = Resolver([server.nameserver], timeout=3)
    outcome = check(res, "mail.other.example", method=WALK)
    assert outcome.result is DmarcResult.TEMPERROR
    outcome = check(res, "mail.org.example")  # inside the zone: NXDOMAIN, a real "none"
    assert outcome.result is DmarcResult.NONE
