"""SPF checks on our resolver, policyd-spf's decisions and whitelists, Received-SPF text.

Unit tests publish SPF records with :func:`dnsserver.make_zone` and read them through
:class:`fakedns.ZoneResolver`; the last tests serve zone text from a real NSD and time out
against a black-hole server through :class:`authmilter.resolver.Resolver`.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping

import dns.rdata
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import authmilter.spf_check
from authmilter.resolver import Resolver
from authmilter.results import SpfIdentity, SpfOutcome, SpfResult
from authmilter.spf_check import (
    HeloReject,
    MailFromReject,
    SpfChecker,
    SpfCheckOutcome,
    SpfDecision,
    SpfPolicy,
    SpfWhitelist,
    decide,
    received_spf,
    whitelist_comment,
    whitelisted,
)
from dnsserver import BlackholeDns, NsdServer, SeenQuery, make_zone, txt_rdata
from fakedns import ZoneResolver, failure_marker

NsdFactory = Callable[[Mapping[str, str]], NsdServer]

GOOD_IP = "192.0.2.1"  # inside example.com's ip4:192.0.2.0/24
BAD_IP = "198.51.100.1"
RECEIVER = "mx.example.net"

RECORDS = [
    ("@", "TXT", txt_rdata("v=spf1 ip4:192.0.2.0/24 -all")),
    ("@", "TXT", txt_rdata("google-site-verification=abc")),
    ("soft", "TXT", txt_rdata("v=spf1 ip4:192.0.2.0/24 ~all")),
    ("neutral", "TXT", txt_rdata("v=spf1 ip4:192.0.2.0/24 ?all")),
    ("nomail", "TXT", txt_rdata("v=spf1 -all")),
    ("broken", "TXT", txt_rdata("v=spf1 ip4:192.0.2.0/24 moo -all")),
    ("twice", "TXT", txt_rdata("v=spf1 -all")),
    ("twice", "TXT", txt_rdata("v=spf1 +all")),
    ("slow", "TXT", failure_marker("TIMEOUT")),
    ("servfail", "TXT", failure_marker("SERVFAIL")),
    ("garbled", "TXT", failure_marker("MALFORMED")),
    ("incl", "TXT", txt_rdata("v=spf1 include:servfail.example.com -all")),
    ("explained", "TXT", txt_rdata("v=spf1 -all exp=why.example.com")),
    ("why", "TXT", txt_rdata("%{i} is not one of %{d}'s designated mail servers.")),
    ("mail", "TXT", txt_rdata("v=spf1 a -all")),
    ("mail", "A", "192.0.2.1"),
    ("nospf", "A", "192.0.2.1"),
    ("voids", "TXT", txt_rdata("v=spf1 a:nx1.example.com a:nx2.example.com a:nx3.example.com")),
    ("six", "TXT", txt_rdata("v=spf1 ip6:2001:db8::/32 -all")),
    ("many", "TXT", txt_rdata("v=spf1 " + " ".join(f"a:h{i}.example.com" for i in range(9)))),
    *[(f"h{i}", "A", "203.0.113.99") for i in range(9)],
    ("relay", "A", "192.0.2.25"),
    ("relay", "AAAA", "2001:db8::25"),
    ("pobox", "TXT", txt_rdata("v=spf1 ip4:203.0.113.0/24 -all")),
    ("xn--bcher-kva", "TXT", txt_rdata("v=spf1 ip4:192.0.2.0/24 -all")),
    ("ptr", "TXT", txt_rdata("v=spf1 ptr:example.com -all")),
]
REVERSE = [
    ("1.2.0.192", "PTR", "mail.example.com."),
]


@pytest.fixture(scope="module")
def zone() -> ZoneResolver:
    resolver = ZoneResolver(make_zone("example.com", RECORDS), "example.com")
    resolver.add_zone(make_zone("in-addr.arpa", REVERSE), "in-addr.arpa")
    return resolver


@pytest.fixture(scope="module")
def checker(zone: ZoneResolver) -> SpfChecker:
    return SpfChecker(zone, receiver=RECEIVER)


# -- SpfChecker: results ------------------------------------------------------------------


def test_mailfrom_pass_says_who_designates_whom(checker: SpfChecker) -> None:
    outcome = checker.check_mailfrom(GOOD_IP, "a@example.com", "mail.example.org")

    assert outcome == SpfCheckOutcome(
        result=SpfResult.PASS,
        identity=SpfIdentity.MAILFROM,
        sender="a@example.com",
        domain="example.com",
        client_ip=GOOD_IP,
        helo="mail.example.org",
        comment="mx.example.net: domain of a@example.com designates 192.0.2.1 as permitted sender",
        explanation="sender SPF authorized",
        record="v=spf1 ip4:192.0.2.0/24 -all",
    )


def test_comment_has_no_receiver_prefix_without_a_receiver(zone: ZoneResolver) -> None:
    outcome = SpfChecker(zone).check_mailfrom(BAD_IP, "a@example.com", "h.example.org")
    expected = "domain of a@example.com does not designate 198.51.100.1 as permitted sender"
    assert outcome.comment == expected


@pytest.mark.parametrize(
    ("mail_from", "ip", "result", "comment"),
    [
        (
            "a@example.com",
            BAD_IP,
            SpfResult.FAIL,
            "domain of a@example.com does not designate 198.51.100.1 as permitted sender",
        ),
        (
            "a@soft.example.com",
            BAD_IP,
            SpfResult.SOFTFAIL,
            "transitioning domain of a@soft.example.com does not designate 198.51.100.1 as "
            "permitted sender",
        ),
        (
            "a@neutral.example.com",
            BAD_IP,
            SpfResult.NEUTRAL,
            "198.51.100.1 is neither permitted nor denied by domain of a@neutral.example.com",
        ),
        (
            "a@nospf.example.com",
            BAD_IP,
            SpfResult.NONE,
            "domain of a@nospf.example.com does not designate permitted sender hosts",
        ),
        (
            "a@nx.example.com",
            BAD_IP,
            SpfResult.NONE,
            "domain of a@nx.example.com does not designate permitted sender hosts",
        ),
    ],
)
def test_mailfrom_results(
    checker: SpfChecker, mail_from: str, ip: str, result: SpfResult, comment: str
) -> None:
    outcome = checker.check_mailfrom(ip, mail_from, "h.example.org")
    assert outcome.result is result
    assert outcome.comment == f"{RECEIVER}: {comment}"
    assert outcome.problem is None


@pytest.mark.parametrize(
    ("mail_from", "result", "problem"),
    [
        ("a@broken.example.com", SpfResult.PERMERROR, "Unknown mechanism found: moo"),
        ("a@twice.example.com", SpfResult.PERMERROR, "Two or more type TXT spf records found."),
        ("a@garbled.example.com", SpfResult.PERMERROR, "malformed answer"),
        ("a@slow.example.com", SpfResult.TEMPERROR, "timed out"),
        ("a@servfail.example.com", SpfResult.TEMPERROR, "SERVFAIL"),
        ("a@incl.example.com", SpfResult.TEMPERROR, "servfail.example.com TXT: SERVFAIL"),
    ],
)
def test_errors_carry_the_problem(
    checker: SpfChecker, mail_from: str, result: SpfResult, problem: str
) -> None:
    outcome = checker.check_mailfrom(BAD_IP, mail_from, "h.example.org")
    assert outcome.result is result
    assert outcome.problem is not None and problem in outcome.problem
    if result is SpfResult.PERMERROR:
        assert outcome.comment is not None and outcome.comment.endswith(outcome.problem)


def test_fail_explanation_is_the_domains_exp_text(checker: SpfChecker) -> None:
    outcome = checker.check_mailfrom(BAD_IP, "a@explained.example.com", "h.example.org")
    assert isinstance(outcome, SpfCheckOutcome)
    assert outcome.result is SpfResult.FAIL
    expected = "198.51.100.1 is not one of explained.example.com's designated mail servers."
    assert outcome.explanation == expected


@pytest.mark.parametrize("null", ["", "<>", " <> "])
def test_null_sender_checks_postmaster_at_helo_as_helo_identity(
    checker: SpfChecker, null: str
) -> None:
    outcome = checker.check_mailfrom(GOOD_IP, null, "mail.example.com")
    assert outcome.identity is SpfIdentity.HELO
    assert outcome.result is SpfResult.PASS
    assert outcome.sender == "postmaster@mail.example.com"
    assert outcome.domain == "mail.example.com"
    assert outcome.comment == (
        f"{RECEIVER}: domain of mail.example.com designates 192.0.2.1 as permitted sender"
    )
    assert outcome == checker.check_helo(GOOD_IP, "mail.example.com")


def test_helo_check_fails_a_host_not_in_its_own_record(checker: SpfChecker) -> None:
    outcome = checker.check_helo(BAD_IP, "mail.example.com")
    assert (outcome.identity, outcome.result) == (SpfIdentity.HELO, SpfResult.FAIL)


@pytest.mark.parametrize("helo", ["[192.0.2.1]", "localhost", "192.0.2.1", "", "a..example.com"])
def test_helo_that_is_no_domain_gives_none_without_dns(zone: ZoneResolver, helo: str) -> None:
    before = zone.queries
    outcome = SpfChecker(zone).check_helo(GOOD_IP, helo)
    assert outcome.result is SpfResult.NONE
    assert zone.queries == before


def test_ipv4_mapped_client_is_checked_as_ipv4(checker: SpfChecker) -> None:
    outcome = checker.check_mailfrom("::ffff:192.0.2.1", "a@example.com", "h.example.org")
    assert outcome.result is SpfResult.PASS
    assert outcome.client_ip == "192.0.2.1"


@pytest.mark.parametrize(
    ("ip", "result"), [("2001:db8::7", SpfResult.PASS), ("2001:db9::7", SpfResult.FAIL)]
)
def test_ipv6_client_matches_ip6_mechanism(checker: SpfChecker, ip: str, result: SpfResult) -> None:
    assert checker.check_mailfrom(ip, "a@six.example.com", "h.example.org").result is result


def test_ipv6_client_does_not_match_ip4_mechanism(checker: SpfChecker) -> None:
    assert checker.check_mailfrom("2001:db8::7", "a@example.com", "h").result is SpfResult.FAIL


def test_idn_sender_domain_is_looked_up_as_a_label(checker: SpfChecker, zone: ZoneResolver) -> None:
    outcome = checker.check_mailfrom(GOOD_IP, "a@bücher.example.com", "h.example.org")
    assert outcome.result is SpfResult.PASS
    assert outcome.domain == "xn--bcher-kva.example.com"
    assert ("xn--bcher-kva.example.com", "TXT") in zone.query_log


def test_ptr_mechanism_validates_through_forward_lookup(checker: SpfChecker) -> None:
    assert checker.check_mailfrom(GOOD_IP, "a@ptr.example.com", "h").result is SpfResult.PASS
    assert checker.check_mailfrom("192.0.2.2", "a@ptr.example.com", "h").result is SpfResult.FAIL


def test_void_lookup_limit_is_two_by_default_and_configurable(zone: ZoneResolver) -> None:
    default = SpfChecker(zone).check_mailfrom(BAD_IP, "a@voids.example.com", "h")
    assert default.result is SpfResult.PERMERROR
    assert default.problem == "Void lookup limit of 2 exceeded"
    relaxed = SpfChecker(zone, void_limit=3).check_mailfrom(BAD_IP, "a@voids.example.com", "h")
    assert relaxed.result is SpfResult.NEUTRAL


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SlowResolver:
    """Our resolver contract, each answer ``delay`` seconds late on ``clock``."""

    def __init__(self, inner: ZoneResolver, clock: FakeClock, delay: float) -> None:
        self.inner, self.clock, self.delay = inner, clock, delay
        self.asked: list[tuple[str, str]] = []

    def query(self, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
        self.asked.append((name, rdtype))
        self.clock.now += self.delay
        return self.inner.query(name, rdtype)


def test_evaluation_time_limit_gives_temperror_and_stops_asking(
    zone: ZoneResolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """many.example.com needs 10 lookups (its TXT and nine a:); at 1/16 s each, the 1/4 s of
    the evaluation is spent after four, and the fifth is not made.

    SpfChecker takes no clock, so the test gives authmilter.spf_check a ``time`` of its own.
    """
    clock = FakeClock()
    monkeypatch.setattr(authmilter.spf_check, "time", types.SimpleNamespace(monotonic=clock))
    slow = SlowResolver(zone, clock, 0.0625)
    checker = SpfChecker(slow, timeout=0.25)
    outcome = checker.check_mailfrom(BAD_IP, "a@many.example.com", "h.example.org")
    assert outcome.result is SpfResult.TEMPERROR
    assert outcome.problem == "SPF evaluation exceeded 0.25s"
    assert slow.asked == [("many.example.com", "TXT")] + [
        (f"h{i}.example.com", "A") for i in range(3)]  # fmt: skip


def test_record_of_the_checked_domain_is_kept_for_no_mail(checker: SpfChecker) -> None:
    nomail = checker.check_mailfrom(BAD_IP, "a@nomail.example.com", "h")
    assert isinstance(nomail, SpfCheckOutcome)
    assert nomail.record == "v=spf1 -all" and nomail.sends_no_mail
    other = checker.check_mailfrom(BAD_IP, "a@example.com", "h")
    assert isinstance(other, SpfCheckOutcome) and not other.sends_no_mail


def test_checker_rejects_nonsense_limits(zone: ZoneResolver) -> None:
    with pytest.raises(ValueError, match="timeout"):
        SpfChecker(zone, timeout=0)
    with pytest.raises(ValueError, match="void"):
        SpfChecker(zone, void_limit=-1)


# -- SpfChecker: hostile input never raises -----------------------------------------------

FIXTURE_REUSE = HealthCheck.function_scoped_fixture  # the checker is stateless


def assert_handled(outcome: SpfOutcome) -> None:
    """A result, and one that pyspf reached itself (not our last-resort handler)."""
    assert isinstance(outcome.result, SpfResult)
    assert not (outcome.problem or "").startswith("SPF evaluation failed"), outcome.problem


HOSTILE_SENDERS = [
    "a@",
    "@",
    "a",
    "a@b",
    "foo@[192.0.2.1]",
    "foo@[IPv6:2001:db8::1]",
    "\x00@example.com",
    "a@exa mple.com",
    "a@" + "x" * 300 + ".com",
    "a@" + ".".join(["x" * 63] * 5),
    "🙂@example.com",
    "a@🙂.example.com",
    "a@xn--.example.com",
    '"a@b"@example.com',
    "a@example.com\r\nX-Evil: 1",
    "%{l}@example.com",
    "a@%{d}.example.com",
    "a@.example.com",
    "a@example..com",
    "a@-.example.com",
    "a@example.com.",
    "<a@example.com>",
    "a@1.2.3.4",
]
HOSTILE_IPS = [
    "",
    "unknown",
    "999.1.1.1",
    "::ffff:999.1.1.1",
    "fe80::1%eth0",
    "[192.0.2.1]",
    "IPv6:2001:db8::1",
    "192.0.2.1\n",
]


@pytest.mark.parametrize("sender", HOSTILE_SENDERS)
def test_hostile_mail_from_never_raises(checker: SpfChecker, sender: str) -> None:
    outcome = checker.check_mailfrom(GOOD_IP, sender, "h.example.org")
    assert_handled(outcome)


@pytest.mark.parametrize("ip", HOSTILE_IPS)
def test_hostile_client_address_never_raises(checker: SpfChecker, ip: str) -> None:
    outcome = checker.check_mailfrom(ip, "a@example.com", "h.example.org")
    assert_handled(outcome)


def test_missing_helo_is_no_error(checker: SpfChecker) -> None:
    assert checker.check_mailfrom(GOOD_IP, "a@example.com", None).result is SpfResult.PASS
    assert checker.check_helo(GOOD_IP, None).result is SpfResult.NONE
    assert checker.check_mailfrom(GOOD_IP, "", None).result is SpfResult.NONE


def test_unparsable_client_address_gives_none_with_a_problem(checker: SpfChecker) -> None:
    outcome = checker.check_mailfrom("unknown", "a@example.com", "h.example.org")
    assert outcome.result is SpfResult.NONE
    assert outcome.problem == "client address 'unknown' is not an IP address"


def test_scoped_and_bracketed_client_addresses_are_understood(checker: SpfChecker) -> None:
    assert checker.check_mailfrom("[192.0.2.1]", "a@example.com", "h").result is SpfResult.PASS
    six = checker.check_mailfrom("IPv6:2001:db8::7", "a@six.example.com", "h")
    assert six.result is SpfResult.PASS and six.client_ip == "2001:db8::7"


@settings(max_examples=150, deadline=None, suppress_health_check=[FIXTURE_REUSE])
@given(ip=st.text(max_size=50), sender=st.text(max_size=80), helo=st.text(max_size=80))
def test_any_text_gives_a_result(checker: SpfChecker, ip: str, sender: str, helo: str) -> None:
    outcome = checker.check_mailfrom(ip, sender, helo)
    assert_handled(outcome)
    if outcome.comment is not None:
        assert "\r" not in outcome.comment and "\n" not in outcome.comment


TERMS = st.sampled_from(
    [
        "a",
        "mx",
        "ptr",
        "+all",
        "-all",
        "~all",
        "?all",
        "a:nx.hostile.test",
        "mx:hostile.test/24",
        "include:hostile.test",
        "include:loop.hostile.test",
        "redirect=hostile.test",
        "exp=e.hostile.test",
        "exists:%{i}.%{l}.%{d}",
        "ip4:192.0.2.0/33",
        "ip6:::/129",
        "a//200",
        "%{",
        "%{z}",
        "ip4:",
        "exists:%{ir}.%{v}._spf.%{d2}",
        "a:%{p}.hostile.test",
        "include:%{h}",
        "\u00e9",
        "=",
        "a:-",
        "redirect=",
        "exp=%{c}%{r}%{t}",
        "a:" + "x" * 70 + ".test",
        "v=spf1",
    ]
)


@settings(max_examples=120, deadline=None)
@given(terms=st.lists(TERMS, max_size=12), extra=st.text(max_size=20))
def test_hostile_records_never_raise(terms: list[str], extra: str) -> None:
    record = "v=spf1 " + " ".join(terms) + extra
    zone = ZoneResolver(
        make_zone(
            "hostile.test",
            [
                ("@", "TXT", txt_rdata(record)),
                ("@", "MX", "10 @"),
                ("@", "A", "192.0.2.9"),
                ("loop", "TXT", txt_rdata("v=spf1 include:loop.hostile.test")),
                ("e", "TXT", txt_rdata(extra or "x")),
            ],
        ),
        "hostile.test",
    )
    outcome = SpfChecker(zone).check_mailfrom(GOOD_IP, "a@hostile.test", "mail.hostile.test")
    assert_handled(outcome)
    if isinstance(outcome, SpfCheckOutcome) and outcome.explanation is not None:
        assert not any(ord(c) < 0x20 for c in outcome.explanation)


# -- decide: policyd-spf options ----------------------------------------------------------


def mailfrom(
    result: SpfResult,
    *,
    domain: str = "example.com",
    record: str | None = None,
    explanation: str | None = None,
    problem: str | None = None,
) -> SpfCheckOutcome:
    return SpfCheckOutcome(
        result=result,
        identity=SpfIdentity.MAILFROM,
        sender=f"a@{domain}",
        domain=domain,
        client_ip=BAD_IP,
        helo="mail.example.org",
        problem=problem,
        explanation=explanation,
        record=record,
    )


def helo_(
    result: SpfResult,
    *,
    name: str = "mail.example.org",
    record: str | None = None,
    problem: str | None = None,
) -> SpfCheckOutcome:
    return SpfCheckOutcome(
        result=result,
        identity=SpfIdentity.HELO,
        sender=f"postmaster@{name}",
        domain=name,
        client_ip=BAD_IP,
        helo=name,
        problem=problem,
        record=record,
    )


R = SpfResult
ALL_RESULTS = list(SpfResult)
HELO_REJECTS = {
    HeloReject.FAIL: {R.FAIL},
    HeloReject.SOFTFAIL: {R.FAIL, R.SOFTFAIL},
    HeloReject.SPF_NOT_PASS: {R.FAIL, R.SOFTFAIL, R.NEUTRAL},
    HeloReject.NULL: set(),  # with a non-null sender
    HeloReject.FALSE: set(),
    HeloReject.NO_CHECK: set(),
}
MAIL_FROM_REJECTS = {
    MailFromReject.FAIL: {R.FAIL},
    MailFromReject.SOFTFAIL: {R.FAIL, R.SOFTFAIL},
    MailFromReject.SPF_NOT_PASS: {R.FAIL, R.SOFTFAIL, R.NEUTRAL},
    MailFromReject.FALSE: set(),
    MailFromReject.NO_CHECK: set(),
}


@pytest.mark.parametrize("setting", list(HeloReject))
@pytest.mark.parametrize("result", ALL_RESULTS)
def test_helo_reject_settings(setting: HeloReject, result: SpfResult) -> None:
    policy = SpfPolicy(helo_reject=setting)
    decision = decide(policy, helo_(result), mailfrom(R.PASS))
    expected = "reject" if result in HELO_REJECTS[setting] else "accept"
    assert decision.action == expected
    if expected == "reject":
        assert decision.identity is SpfIdentity.HELO
        assert (decision.code, decision.xcode) == ("550", "5.7.23")


@pytest.mark.parametrize("setting", list(HeloReject))
@pytest.mark.parametrize("result", ALL_RESULTS)
def test_helo_reject_settings_for_the_null_sender(setting: HeloReject, result: SpfResult) -> None:
    null = helo_(result)
    decision = decide(SpfPolicy(helo_reject=setting), null, null)
    rejected = HELO_REJECTS[setting] | ({R.FAIL} if setting is HeloReject.NULL else set())
    assert decision.action == ("reject" if result in rejected else "accept")


@pytest.mark.parametrize("setting", list(MailFromReject))
@pytest.mark.parametrize("result", ALL_RESULTS)
def test_mail_from_reject_settings(setting: MailFromReject, result: SpfResult) -> None:
    decision = decide(SpfPolicy(mail_from_reject=setting), helo_(R.NONE), mailfrom(result))
    expected = "reject" if result in MAIL_FROM_REJECTS[setting] else "accept"
    assert decision.action == expected
    if expected == "reject":
        assert decision.identity is SpfIdentity.MAILFROM


def test_null_sender_ignores_mail_from_reject() -> None:
    null = helo_(R.SOFTFAIL)
    policy = SpfPolicy(helo_reject=HeloReject.FALSE, mail_from_reject=MailFromReject.SOFTFAIL)
    assert decide(policy, null, null).action == "accept"


def test_helo_reject_wins_over_a_mail_from_pass() -> None:
    decision = decide(SpfPolicy(), helo_(R.FAIL), mailfrom(R.PASS))
    assert decision.action == "reject"
    assert decision.identity is SpfIdentity.HELO
    assert "s=helo;id=mail.example.org" in decision.text


def test_permerror_reject_rejects_with_validation_error_code() -> None:
    policy = SpfPolicy(permerror_reject=True)
    decision = decide(policy, None, mailfrom(R.PERMERROR, problem="Unknown mechanism found: moo"))
    assert decision == SpfDecision(
        "reject",
        "550",
        "5.7.24",
        "Message rejected due to: SPF Permanent Error: Unknown mechanism found: moo. Please see "
        "http://www.openspf.net/Why?s=mfrom;id=a@example.com;ip=198.51.100.1;r=<UNKNOWN>",
        SpfIdentity.MAILFROM,
    )
    assert decide(SpfPolicy(), None, mailfrom(R.PERMERROR)).action == "accept"


def test_permerror_reject_applies_to_helo_too() -> None:
    decision = decide(SpfPolicy(permerror_reject=True), helo_(R.PERMERROR), mailfrom(R.PASS))
    assert (decision.action, decision.xcode, decision.identity) == (
        "reject",
        "5.7.24",
        SpfIdentity.HELO,
    )


def test_temperror_defer_defers_with_4_7_24() -> None:
    policy = SpfPolicy(temperror_defer=True)
    decision = decide(policy, None, mailfrom(R.TEMPERROR, problem="DNS example.com TXT: SERVFAIL"))
    assert (decision.action, decision.code, decision.xcode) == ("defer", "450", "4.7.24")
    assert decision.text.startswith("Message deferred due to: SPF Temporary Error: DNS example.com")
    assert decide(SpfPolicy(), None, mailfrom(R.TEMPERROR)).action == "accept"


@pytest.mark.parametrize("field", ["helo_reject", "mail_from_reject"])
def test_false_setting_overrides_permerror_reject_and_temperror_defer(field: str) -> None:
    policy = SpfPolicy(permerror_reject=True, temperror_defer=True)
    if field == "helo_reject":
        policy = dataclasses.replace(policy, helo_reject=HeloReject.FALSE)
    else:
        policy = dataclasses.replace(policy, mail_from_reject=MailFromReject.FALSE)
    for result in (R.PERMERROR, R.TEMPERROR, R.FAIL):
        outcome = helo_(result) if field == "helo_reject" else mailfrom(result)
        helo_arg = outcome if field == "helo_reject" else None
        mf_arg = mailfrom(R.PASS) if field == "helo_reject" else outcome
        assert decide(policy, helo_arg, mf_arg).action == "accept"


def test_enhanced_status_codes_off_uses_5_7_1_and_4_7_1() -> None:
    policy = SpfPolicy(enhanced_status_codes=False, temperror_defer=True, permerror_reject=True)
    assert decide(policy, None, mailfrom(R.FAIL)).xcode == "5.7.1"
    assert decide(policy, None, mailfrom(R.PERMERROR)).xcode == "5.7.1"
    assert decide(policy, None, mailfrom(R.TEMPERROR)).xcode == "4.7.1"


def test_reject_text_names_sender_domain_and_client() -> None:
    decision = decide(SpfPolicy(), helo_(R.NONE), mailfrom(R.FAIL))
    assert decision.text == (
        "Message rejected due to: SPF fail - not authorized. Please see "
        "http://www.openspf.net/Why?s=mfrom;id=a@example.com;ip=198.51.100.1;r=<UNKNOWN>"
    )
    assert "example.com" in decision.text


def test_reject_text_uses_the_domains_explanation_and_receiver() -> None:
    outcome = mailfrom(R.FAIL, explanation="Mail from example.com comes from our servers only")
    decision = decide(SpfPolicy(), None, outcome, receiver="example.net")
    assert decision.text == (
        "Message rejected due to: Mail from example.com comes from our servers only. Please see "
        "http://www.openspf.net/Why?s=mfrom;id=a@example.com;ip=198.51.100.1;r=example.net"
    )


def test_custom_reason_message() -> None:
    policy = SpfPolicy(reason_message="SPF {spf} ({rejectdefer})")
    decision = decide(policy, None, mailfrom(R.FAIL))
    assert decision.text == "SPF SPF fail - not authorized (rejected)"


def test_policy_takes_the_option_text_of_policyd_spf_conf() -> None:
    policy = SpfPolicy(helo_reject="SPF_Not_Pass", mail_from_reject="Softfail")  # type: ignore[arg-type]
    assert policy.helo_reject is HeloReject.SPF_NOT_PASS
    assert policy.mail_from_reject is MailFromReject.SOFTFAIL
    with pytest.raises(ValueError, match="Null"):
        SpfPolicy(mail_from_reject="Null")  # type: ignore[arg-type]


@pytest.mark.parametrize("message", ["{nope}", "{spf", "{0}", "{url.x}"])
def test_unusable_reason_message_is_refused(message: str) -> None:
    with pytest.raises(ValueError, match="Reason_Message"):
        SpfPolicy(reason_message=message)


def test_reply_text_is_one_printable_ascii_line() -> None:
    outcome = mailfrom(R.FAIL, explanation="bad\r\nX-Injected: yes \u00e9")
    text = decide(SpfPolicy(), None, outcome).text
    assert "\r" not in text and "\n" not in text and text.isascii()


def test_reject_not_pass_domains_rejects_softfail_and_neutral_for_listed_domains() -> None:
    policy = SpfPolicy(reject_not_pass_domains=("Example.com", "aol.com"))
    for result in (R.SOFTFAIL, R.NEUTRAL, R.FAIL):
        decision = decide(policy, None, mailfrom(result))
        assert decision.action == "reject"
        assert f"due to: Receiver policy for SPF {result.value.capitalize()}." in decision.text
    assert decide(policy, None, mailfrom(R.SOFTFAIL, domain="other.com")).action == "accept"
    assert decide(policy, None, mailfrom(R.SOFTFAIL, domain="sub.example.com")).action == "accept"
    assert decide(policy, None, mailfrom(R.PASS)).action == "accept"


def test_reject_not_pass_domains_overrides_false_but_not_no_check() -> None:
    listed = ("example.com",)
    false = SpfPolicy(mail_from_reject=MailFromReject.FALSE, reject_not_pass_domains=listed)
    assert decide(false, None, mailfrom(R.NEUTRAL)).action == "reject"
    no_check = SpfPolicy(mail_from_reject=MailFromReject.NO_CHECK, reject_not_pass_domains=listed)
    assert decide(no_check, None, mailfrom(R.NEUTRAL)).action == "accept"


def test_reject_not_pass_domains_applies_to_helo_names() -> None:
    policy = SpfPolicy(reject_not_pass_domains=("mail.example.org",))
    decision = decide(policy, helo_(R.SOFTFAIL), mailfrom(R.PASS))
    assert (decision.action, decision.identity) == ("reject", SpfIdentity.HELO)


def test_no_mail_rejects_only_v_spf1_minus_all() -> None:
    policy = SpfPolicy(no_mail=True)
    nomail = mailfrom(R.FAIL, record="v=spf1 -all")
    assert decide(policy, None, nomail).action == "reject"
    other = mailfrom(R.FAIL, record="v=spf1 ip4:192.0.2.0/24 -all")
    assert decide(policy, None, other).action == "accept"
    plain = SpfOutcome(
        result=R.FAIL,
        identity=SpfIdentity.MAILFROM,
        sender="a@example.com",
        domain="example.com",
        client_ip=BAD_IP,
    )
    assert decide(policy, None, plain).action == "accept"


def test_no_mail_applies_to_helo_and_falls_through_to_mail_from() -> None:
    policy = SpfPolicy(no_mail=True)
    assert decide(policy, helo_(R.FAIL, record="v=spf1 -all"), mailfrom(R.PASS)).action == "reject"
    decision = decide(
        policy, helo_(R.FAIL, record="v=spf1 a -all"), mailfrom(R.FAIL, record="v=spf1 -all")
    )
    assert (decision.action, decision.identity) == ("reject", SpfIdentity.MAILFROM)


def test_no_mail_does_not_stop_a_defer() -> None:
    policy = SpfPolicy(no_mail=True, temperror_defer=True)
    assert decide(policy, None, mailfrom(R.TEMPERROR)).action == "defer"


def test_test_only_0_never_rejects_but_says_what_it_would_do() -> None:
    policy = SpfPolicy(test_only=False, temperror_defer=True)
    decision = decide(policy, None, mailfrom(R.FAIL))
    assert (decision.action, decision.code, decision.xcode) == ("accept", "", "")
    assert decision.text.startswith("TestOnly=0, not applied: 550 5.7.23 Message rejected")
    assert decide(policy, None, mailfrom(R.TEMPERROR)).action == "accept"


@pytest.mark.parametrize(
    ("helo_result", "mailfrom_result", "identity"),
    [
        (R.PASS, R.PASS, SpfIdentity.MAILFROM),
        (R.PASS, R.NONE, SpfIdentity.HELO),
        (R.NONE, R.NONE, SpfIdentity.MAILFROM),
        (None, R.NONE, SpfIdentity.MAILFROM),
        (R.NEUTRAL, None, SpfIdentity.HELO),
        (None, None, None),
    ],
)
def test_accept_names_the_identity_policyd_spf_records(
    helo_result: SpfResult | None, mailfrom_result: SpfResult | None, identity: SpfIdentity | None
) -> None:
    helo_arg = helo_(helo_result) if helo_result is not None else None
    mf_arg = mailfrom(mailfrom_result) if mailfrom_result is not None else None
    assert decide(SpfPolicy(), helo_arg, mf_arg) == SpfDecision("accept", "", "", "", identity)


# -- whitelisting -------------------------------------------------------------------------

DEFAULT_WL = SpfWhitelist()


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("127.0.0.1", "skip_addresses 127.0.0.0/8"),
        ("::ffff:127.0.0.1", "skip_addresses 127.0.0.0/8"),
        ("::1", "skip_addresses ::1"),
        (GOOD_IP, None),
        ("::2", None),
    ],
)
def test_skip_addresses(checker: SpfChecker, ip: str, reason: str | None) -> None:
    assert whitelisted(DEFAULT_WL, checker, ip, "h.example.org") == reason


def test_ipv4_mapped_skip_entry_matches_plain_ipv4(checker: SpfChecker) -> None:
    wl = SpfWhitelist(skip_addresses=("::ffff:127.0.0.0/104",))
    assert whitelisted(wl, checker, "127.0.0.5", None) == "skip_addresses ::ffff:127.0.0.0/104"


def test_whitelist_cidr(checker: SpfChecker) -> None:
    wl = SpfWhitelist(whitelist=("198.51.100.0/24", "2001:db8::/32"))
    assert whitelisted(wl, checker, BAD_IP, None) == "Whitelist 198.51.100.0/24"
    assert whitelisted(wl, checker, "2001:db8::1", None) == "Whitelist 2001:db8::/32"
    assert whitelisted(wl, checker, "203.0.113.1", None) is None


def test_whitelist_refuses_entries_that_are_no_network() -> None:
    with pytest.raises(ValueError, match="Whitelist: 'relay.example.com' is not an IP network"):
        SpfWhitelist(whitelist=("relay.example.com",))


def test_helo_whitelist_needs_forward_confirmation(checker: SpfChecker) -> None:
    wl = SpfWhitelist(helo_whitelist=("relay.example.com",))
    assert whitelisted(wl, checker, "192.0.2.25", "relay.example.com") == (
        "HELO_Whitelist relay.example.com"
    )
    assert whitelisted(wl, checker, "192.0.2.25", "RELAY.example.com.") == (
        "HELO_Whitelist relay.example.com"
    )
    assert whitelisted(wl, checker, "2001:db8::25", "relay.example.com") == (
        "HELO_Whitelist relay.example.com"
    )
    # A forged HELO: the name is listed but does not point at the client.
    assert whitelisted(wl, checker, "192.0.2.26", "relay.example.com") is None
    assert whitelisted(wl, checker, "192.0.2.25", "other.example.com") is None
    assert whitelisted(wl, checker, "192.0.2.25", None) is None


def test_helo_whitelist_with_dns_failure_does_not_whitelist(checker: SpfChecker) -> None:
    wl = SpfWhitelist(helo_whitelist=("servfail.example.com", "gone.example.com"))
    assert whitelisted(wl, checker, "192.0.2.25", "servfail.example.com") is None
    assert whitelisted(wl, checker, "192.0.2.25", "gone.example.com") is None


def test_domain_whitelist_needs_a_pass_of_the_domains_record(checker: SpfChecker) -> None:
    wl = SpfWhitelist(domain_whitelist=("nomail.example.com", "pobox.example.com"))
    assert whitelisted(wl, checker, "203.0.113.5", None) == "Domain_Whitelist pobox.example.com"
    assert whitelisted(wl, checker, BAD_IP, None) is None


def test_whitelisted_ignores_garbage_client_address(checker: SpfChecker) -> None:
    assert whitelisted(DEFAULT_WL, checker, "unknown", "h") is None


@pytest.mark.parametrize(
    ("reason", "comment"),
    [
        ("skip_addresses 127.0.0.0/8", "SPF check N/A for local connections"),
        ("Whitelist 192.0.2.0/24", "SPF skipped for whitelisted relay"),
        ("Domain_Whitelist pobox.com", "SPF skipped for whitelisted relay domain"),
        ("HELO_Whitelist relay.example.com", "SPF skipped for whitelisted HELO domain"),
    ],
)
def test_whitelist_comment(reason: str, comment: str) -> None:
    assert whitelist_comment(
        reason, "192.0.2.25", "relay.example.com", "a@example.com", RECEIVER
    ) == (
        "X-Comment",
        f"{comment} - client-ip=192.0.2.25; helo=relay.example.com; "
        "envelope-from=a@example.com; receiver=mx.example.net",
    )


def test_whitelist_comment_for_null_sender_and_missing_helo() -> None:
    _, value = whitelist_comment("Whitelist 192.0.2.0/24", "192.0.2.25", None, "<>", "<UNKNOWN>")
    assert value == (
        "SPF skipped for whitelisted relay - client-ip=192.0.2.25; helo=<UNKNOWN>; "
        "envelope-from=<>; receiver=<UNKNOWN>"
    )


# -- Received-SPF -------------------------------------------------------------------------


def outcome_for(result: SpfResult, **changes: object) -> SpfOutcome:
    base = SpfOutcome(
        result=result,
        identity=SpfIdentity.MAILFROM,
        sender="a@example.org",
        domain="example.org",
        client_ip="192.0.2.1",
        helo="mail.example.org",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


TAIL = (
    "identity=mailfrom; client-ip=192.0.2.1; helo=mail.example.org; "
    'envelope-from="a@example.org"; receiver=mx.example.com'
)


@pytest.mark.parametrize(
    ("result", "problem", "expected"),
    [
        (R.PASS, None, f"Pass (mailfrom) {TAIL}"),
        (R.FAIL, None, f"Fail (mailfrom) {TAIL}"),
        (R.SOFTFAIL, None, f"Softfail (mailfrom) {TAIL}"),
        (R.NEUTRAL, None, f"Neutral (mailfrom) {TAIL}"),
        (R.NONE, None, f"None (mailfrom) {TAIL}"),
        (
            R.PERMERROR,
            "Unknown mechanism found: moo",
            f'Permerror (mailfrom) {TAIL}; problem="Unknown mechanism found: moo"',
        ),
        (
            R.TEMPERROR,
            "DNS example.org TXT: SERVFAIL",
            f'Temperror (mailfrom) {TAIL}; problem="DNS example.org TXT: SERVFAIL"',
        ),
    ],
)
def test_received_spf_mailfrom(result: SpfResult, problem: str | None, expected: str) -> None:
    outcome = outcome_for(result, problem=problem)
    assert received_spf(outcome, receiver="mx.example.com") == expected


def test_received_spf_helo_identity_carries_the_explanation(checker: SpfChecker) -> None:
    outcome = checker.check_helo(GOOD_IP, "mail.example.com")
    assert received_spf(outcome, receiver="<UNKNOWN>") == (
        "Pass (sender SPF authorized) identity=helo; client-ip=192.0.2.1; helo=mail.example.com; "
        'envelope-from="<>"; receiver="<UNKNOWN>"'
    )
    none = checker.check_helo(GOOD_IP, "nospf.example.com")
    assert received_spf(none, receiver="mx.example.com", envelope_from="a@example.org") == (
        "None (no SPF record) identity=helo; client-ip=192.0.2.1; helo=nospf.example.com; "
        'envelope-from="a@example.org"; receiver=mx.example.com'
    )


def test_received_spf_quotes_what_is_no_dot_atom() -> None:
    outcome = outcome_for(
        R.FAIL,
        client_ip="2001:db8::1",
        sender='"odd \\ \\"name"@example.org',
        helo="[192.0.2.1]",
    )
    assert received_spf(outcome, receiver="mx.example.com") == (
        'Fail (mailfrom) identity=mailfrom; client-ip="2001:db8::1"; helo="[192.0.2.1]"; '
        'envelope-from="\\"odd \\\\ \\\\\\"name\\"@example.org"; receiver=mx.example.com'
    )


def test_received_spf_never_breaks_the_header_line() -> None:
    outcome = outcome_for(R.PERMERROR, helo="evil\r\nX-Injected: 1", problem="a\nb")
    value = received_spf(outcome, receiver="mx\r\n.example.com")
    assert "\r" not in value and "\n" not in value


def test_received_spf_helo_comment_has_no_parentheses() -> None:
    outcome = SpfCheckOutcome(
        result=R.FAIL,
        identity=SpfIdentity.HELO,
        sender="postmaster@h.example.org",
        domain="h.example.org",
        client_ip=BAD_IP,
        helo="h.example.org",
        explanation="see (and weep) \\o/",
    )
    assert received_spf(outcome, receiver="mx.example.com").startswith(
        "Fail (see and weep o/) identity=helo;"
    )


# -- through a real NSD -------------------------------------------------------------------

NSD_ZONE = "spf.test"


def nsd_zone() -> str:
    return make_zone(
        NSD_ZONE,
        [
            ("@", "TXT", txt_rdata("v=spf1 a:mail.spf.test ip4:192.0.2.0/25 -all")),
            ("mail", "A", "198.51.100.20"),
            ("mail", "TXT", txt_rdata("v=spf1 a -all")),
            ("short", "TXT", txt_rdata("v=spf1 ip4:192.0.2.0/25 -all")),
            ("explained", "TXT", txt_rdata("v=spf1 -all exp=why.spf.test")),
            ("why", "TXT", txt_rdata("%{i} may not send for %{d}.")),
        ],
    ).replace("short\tIN\tTXT", "short\t30\tIN\tTXT")


@pytest.mark.dns
def test_pass_and_fail_through_nsd(nsd_server: NsdFactory) -> None:
    server = nsd_server({NSD_ZONE: nsd_zone()})
    checker = SpfChecker(Resolver([server.nameserver], timeout=2.0), receiver=RECEIVER)

    assert checker.check_mailfrom("192.0.2.1", "a@spf.test", "x").result is SpfResult.PASS
    assert checker.check_mailfrom("198.51.100.20", "a@spf.test", "x").result is SpfResult.PASS
    assert checker.check_mailfrom("192.0.2.200", "a@spf.test", "x").result is SpfResult.FAIL
    assert checker.check_helo("198.51.100.20", "mail.spf.test").result is SpfResult.PASS
    assert checker.check_mailfrom("192.0.2.1", "a@nx.spf.test", "x").result is SpfResult.NONE


@pytest.mark.dns
def test_blackhole_server_gives_temperror_after_one_lookup_with_the_resolver_timeout(
    blackhole_dns: BlackholeDns,
) -> None:
    checker = SpfChecker(Resolver([blackhole_dns.nameserver], timeout=1.0), timeout=20.0)
    outcome = checker.check_mailfrom("192.0.2.1", "a@spf.test", "mail.spf.test")
    assert outcome.result is SpfResult.TEMPERROR
    # The resolver's 1 s bounded the lookup, not the 20 s of the evaluation.
    assert outcome.problem is not None and "timed out after 1s" in outcome.problem
    # The temperror ended the evaluation: the record's lookup was the only one, made once.
    assert blackhole_dns.received() == [SeenQuery("spf.test", "TXT", False)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.dns
def test_a_result_is_reused_while_its_records_are_fresh(nsd_server: NsdFactory) -> None:
    """The same check again costs no DNS and no evaluation until the first record it read
    expires (short.spf.test: TTL 30 s); then it is evaluated again, from fresh answers."""
    server = nsd_server({NSD_ZONE: nsd_zone()})
    clock = Clock()
    resolver = Resolver([server.nameserver], timeout=2.0, clock=clock)
    checker = SpfChecker(resolver, receiver=RECEIVER)
    first = checker.check_mailfrom("192.0.2.1", "a@short.spf.test", "mail.spf.test")
    assert first.result is SpfResult.PASS
    asked = resolver.stats.misses + resolver.stats.hits
    again = checker.check_mailfrom("192.0.2.1", "a@short.spf.test", "mail.spf.test")
    assert again == first
    assert resolver.stats.misses + resolver.stats.hits == asked  # not even the cache asked
    # Any other input is another check: another sender, client or HELO.
    other = checker.check_mailfrom("192.0.2.1", "b@short.spf.test", "mail.spf.test")
    assert other.sender == "b@short.spf.test" and other.result is SpfResult.PASS
    assert checker.check_mailfrom("192.0.2.200", "a@short.spf.test",
                                  "mail.spf.test").result is SpfResult.FAIL  # fmt: skip
    clock.now += 31
    misses = resolver.stats.misses
    assert checker.check_mailfrom("192.0.2.1", "a@short.spf.test", "mail.spf.test") == first
    assert resolver.stats.misses == misses + 1  # the record, asked again


@pytest.mark.dns
def test_a_temperror_or_a_domains_own_explanation_is_never_reused(
    nsd_server: NsdFactory, blackhole_dns: BlackholeDns
) -> None:
    checker = SpfChecker(Resolver([blackhole_dns.nameserver], timeout=0.5), timeout=20.0)
    for _ in range(2):
        assert checker.check_mailfrom("192.0.2.1", "a@spf.test",
                                      "x").result is SpfResult.TEMPERROR  # fmt: skip
    assert len(blackhole_dns.received()) == 2  # asked again: the failure was not kept
    # exp= text may expand %{t} (the time of the check): evaluated every time.
    server = nsd_server({NSD_ZONE: nsd_zone()})
    resolver = Resolver([server.nameserver], timeout=2.0)
    checker = SpfChecker(resolver, receiver=RECEIVER)
    outcomes = [checker.check_mailfrom("192.0.2.9", "a@explained.spf.test", "x")
                for _ in range(2)]  # fmt: skip
    assert [o.explanation for o in outcomes] == ["192.0.2.9 may not send for "
                                                 "explained.spf.test."] * 2  # fmt: skip
    assert outcomes[0] is not outcomes[1]
    # A plain fail is kept: the same object comes back.
    fails = [checker.check_mailfrom("192.0.2.200", "a@spf.test", "x") for _ in range(2)]
    assert fails[0].result is SpfResult.FAIL and fails[0] is fails[1]
