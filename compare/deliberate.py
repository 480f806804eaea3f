"""The differences authmilter makes on purpose, each backed by an RFC section.

A :class:`Rule` names the compared fields it explains, the cases it applies to (name patterns
with ``*``) and, where the difference must have a particular shape, a condition on the two
sides' values. docs/migration.md ("Deliberate differences") says the same in prose. A
difference no rule explains is a bug in authmilter (or a missing rule) and fails
``tests/test_compare.py``.

When a rule explains a row's ``smtp`` field, the row's other differences are its consequences
(a message rejected on one side has no results there) and are explained by the same rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from compare.outcome import Deliberate

Values = Mapping[str, str]
Condition = Callable[[Values, Values], bool]


def _always(a: Values, m: Values) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class Rule:
    """``fields`` of the cases matching ``cases`` differ on purpose when ``when(anchors,
    authmilter)`` holds."""

    key: str
    fields: Sequence[str]
    cases: Sequence[str]
    why: Deliberate
    when: Condition = _always
    #: config sets (name patterns) the rule applies to
    sets: Sequence[str] = ("*",)


def _starts(field: str, anchors: str, ours: str) -> Condition:
    def check(a: Values, m: Values) -> bool:
        return a.get(field, "-").startswith(anchors) and m.get(field, "-").startswith(ours)

    return check


RULES: list[Rule] = [
    Rule("spf-always-evaluated", ["spf-ar"], ["*"], Deliberate(
        "authmilter always evaluates SPF itself and reports it in its Authentication-Results; "
        "OpenDMARC writes an spf= clause only when it checked SPF itself (SPFSelfValidate)",
        "RFC 7489 §6.6.2; RFC 8601 §2.7.2"),
        lambda a, m: a.get("spf-ar", "-") == "-" and m.get("spf-ar", "-") != "-"),
    Rule("dmarc-uses-spf", ["dmarc"], ["spf-pass-no-policyd"], Deliberate(
        "without policyd-spf and without SPFSelfValidate OpenDMARC has no SPF result and "
        "decides DMARC on DKIM alone; authmilter checks SPF, so SPF-aligned mail passes",
        "RFC 7489 §6.6.2"), _starts("dmarc", "fail", "pass")),
    Rule("rsa-sha1", ["dkim", "dmarc"], ["dkim-rsa-sha1"], Deliberate(
        "rsa-sha1 signatures are not accepted (dkim=policy, so DMARC has no DKIM pass); "
        "OpenDKIM 2.11 reports pass", "RFC 8301 §3.1")),
    Rule("key-errors-are-permerror", ["dkim"],
         ["dkim-missing-key", "dkim-revoked-key", "dkim-key-h-sha1"], Deliberate(
        "no key record, a revoked key (empty p=) and a key whose h= excludes the signature's "
        "hash are PERMFAIL in RFC 6376, reported as dkim=permerror; OpenDKIM reports fail",
        "RFC 6376 §6.1.2; RFC 8601 §2.7.1"), _starts("dkim", "fail", "permerror")),
    Rule("unsigned-is-not-permerror", ["dkim"], ["hdr-*"], Deliberate(
        "an unsigned message gets no dkim= clause, whatever its From field looks like; "
        "OpenDKIM writes dkim=permerror (bad message/signature format) for an unsigned "
        "message whose From it cannot parse", "RFC 8601 §2.7.1"),
        lambda a, m: a.get("dkim", "-").startswith("permerror") and m.get("dkim", "-") == "-"),
    Rule("unusable-from-is-permerror", ["dmarc", "policy"], ["hdr-*"], Deliberate(
        "a message whose From does not name exactly one domain (none, a group, <>, two From "
        "fields, two domains) gets dmarc=permerror; OpenDMARC writes nothing, or evaluates the "
        "first From field only", "RFC 7489 §6.6.1"),
        lambda a, m: m.get("dmarc", "-") == "permerror"),
    Rule("two-dmarc-records", ["smtp", "dmarc", "policy"], ["dmarc-two-records*"], Deliberate(
        "two v=DMARC1 records: no DMARC policy applies (dmarc=none); OpenDMARC uses one of "
        "them (here p=reject: rejected with RejectFailures)", "RFC 7489 §6.6.3")),
    Rule("rua-without-p", ["dmarc", "policy"], ["dmarc-rua-without-p*"], Deliberate(
        "a record without a valid p= but with a valid rua= is read as p=none; OpenDMARC "
        "reports dmarc=permerror", "RFC 7489 §6.6.3")),
    Rule("pct-next-lower-policy", ["smtp", "policy"], ["dmarc-pct0@*hold*"], Deliberate(
        "a p=reject failure outside pct= gets the next lower policy, quarantine (held when "
        "HoldQuarantinedMessages is on); OpenDMARC delivers it with dis=none",
        "RFC 7489 §6.6.4")),
    Rule("null-sender-helo-identity", ["dmarc"], ["spf-null-sender-helo-aligned*"], Deliberate(
        "with MAIL FROM:<> the SPF identity is postmaster@<HELO>, so an SPF pass of an aligned "
        "HELO name is an aligned SPF pass for DMARC; OpenDMARC reports fail",
        "RFC 7208 §2.4; RFC 7489 §3.1.2"), _starts("dmarc", "fail", "pass")),
    Rule("softfail-is-softfail", ["spf-ar"], ["spf-softfail*"], Deliberate(
        "SPF softfail is reported as spf=softfail; OpenDMARC's own SPF check (SPFSelfValidate) "
        "writes spf=fail", "RFC 7208 §2.6.5; RFC 8601 §2.7.2"),
        _starts("spf-ar", "fail", "softfail")),
    Rule("include-temperror-propagates", ["spf"], ["spf-temperror*"], Deliberate(
        "a DNS error (here REFUSED) while evaluating include: is a temperror of the whole "
        "check; policyd-spf (pyspf) reports permerror", "RFC 7208 §5.2; RFC 7208 §2.6.6"),
        _starts("spf", "permerror", "temperror")),
    Rule("received-spf-without-policyd", ["spf"], ["*"], Deliberate(
        "SPF is always evaluated and recorded in a Received-SPF field as well as in "
        "Authentication-Results, also when no policyd-spf runs (it never rejects then); the "
        "anchors without policyd-spf write no Received-SPF",
        "RFC 7208 §9.1"),
        lambda a, m: a.get("spf", "-") == "-" and m.get("spf", "-") != "-",
        sets=("debian", "tutorial")),  # the sets without a policyd-spf.conf
    Rule("dmarc-temperror", ["dmarc", "policy"], ["spf-temperror*"], Deliberate(
        "when the only identifier that could align had a temporary DNS error, DMARC is "
        "temperror, not fail (a later try may pass); OpenDMARC reports fail",
        "RFC 7489 §11.2"), _starts("dmarc", "fail", "temperror")),
    Rule("spf-temperror-token", ["spf-ar"], ["spf-temperror*"], Deliberate(
        "an SPF temporary error is written spf=temperror, the registered result; OpenDMARC's "
        "own SPF check writes spf=tempfail", "RFC 8601 §2.7.2; RFC 7208 §2.6.6"),
        _starts("spf-ar", "tempfail", "temperror")),
    Rule("internal-hosts-are-outbound", ["smtp"], ["sign-from-trusted-cidr"], Deliberate(
        "mail from an InternalHosts client is outbound: signed and never DMARC-checked. "
        "OpenDKIM signs it too, but OpenDMARC (IgnoreHosts unset: only 127.0.0.1) checks it "
        "without seeing that signature (Postfix hands each milter the message as received) "
        "and rejects the user's own mail on SPF", "RFC 7489 §6.6"),
        _starts("smtp", "5", "accepted")),
    Rule("no-loopback-spf-pass", ["smtp"], ["sign-from-127.0.0.2"], Deliberate(
        "SPF is evaluated for a loopback client like any other; OpenDMARC's libspf2 answers "
        "pass for any 127.0.0.0/8 client (\"localhost is always allowed\"), so own-domain "
        "mail from a loopback address that is not an InternalHosts entry passes DMARC there",
        "RFC 7208 §4")),
]


def unused(explained: Sequence[Mapping[str, Deliberate]]) -> list[str]:
    """Keys of the rules that explain nothing in ``explained`` (each row's field → reason):
    after a full run, candidates for removal."""
    seen = {id(why) for row in explained for why in row.values()}
    return [rule.key for rule in RULES if id(rule.why) not in seen]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.match("^" + re.escape(p).replace(r"\*", ".*") + "$", name) for p in patterns)


def lookup(case: str, anchors: Values, ours: Values,
           differing: Sequence[str], config: str = "") -> dict[str, Deliberate]:  # fmt: skip
    """The deliberate differences of ``case`` run with config set ``config``: differing field
    → reason."""
    found: dict[str, Deliberate] = {}
    for rule in RULES:
        if not _matches(case, rule.cases) or not _matches(config, rule.sets):
            continue
        if not rule.when(anchors, ours):
            continue
        for fld in rule.fields:
            if fld in differing:
                found.setdefault(fld, rule.why)
    if "smtp" in found:
        for fld in differing:
            found.setdefault(fld, found["smtp"])
    return found
