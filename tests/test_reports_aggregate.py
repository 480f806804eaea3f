"""The DMARC event record and the RFC 9990 aggregate report builder.

Every report built here is read back with parsedmarc (the report consumer most domain owners
use), and what it reads must equal the events: counts, policy, dispositions, override reasons,
DKIM/SPF results and identifiers.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import random
import re
import time
import xml.etree.ElementTree as ET
from collections import Counter
from typing import Any

import pytest

from authmilter.reports.aggregate import (
    MAX_DKIM_RESULTS,
    NAMESPACE,
    AggregateReport,
    ReportingOrg,
    daily_reports,
    day_bounds,
    mailto_recipients,
)
from authmilter.reports.record import DmarcEvent

parsedmarc = pytest.importorskip("parsedmarc")

DAY = dt.date(2026, 3, 14)
BEGIN = 1773446400  # 2026-03-14T00:00:00Z
ORG = ReportingOrg("Receiver Example Inc", "receiver.example", "dmarc-reports@receiver.example")


def ev(**kw: Any) -> DmarcEvent:
    base: dict[str, Any] = dict(
        time=BEGIN + 3600, reporter="mx1.receiver.example", source_ip="192.0.2.1",
        header_from="example.com", envelope_from="example.com",
        envelope_to=("receiver.example",), policy_domain="example.com", p="reject", sp=None,
        np=None, adkim="r", aspf="r", fo="0", testing=False, discovery_method="treewalk",
        disposition="none", overrides=(), dkim_aligned="pass", spf_aligned="pass",
        dkim=(("example.com", "s1", "pass"),), spf=("example.com", "mfrom", "pass"),
        rua=("mailto:dmarc@example.com",), ruf=(),
    )
    base.update(kw)
    return DmarcEvent(**base)


def parse(report: AggregateReport) -> dict[str, Any]:
    out = parsedmarc.parse_report_file(report.to_gzip(), offline=True,
                                       always_use_local_files=True)
    assert out["report_type"] == "aggregate"
    return dict(out["report"])


def parsed_rows(parsed: dict[str, Any]) -> Counter[tuple[Any, ...]]:
    rows: Counter[tuple[Any, ...]] = Counter()
    for r in parsed["records"]:
        pe = r["policy_evaluated"]
        ids = r["identifiers"]
        key = (
            r["source"]["ip_address"], pe["disposition"], pe["dkim"], pe["spf"],
            tuple((x["type"], x.get("comment") or "") for x in pe["policy_override_reasons"]),
            ids["header_from"], ids["envelope_from"], ids["envelope_to"],
            tuple((d["domain"], d["selector"], d["result"]) for d in r["auth_results"]["dkim"]),
            tuple((s["domain"], s["scope"], s["result"]) for s in r["auth_results"]["spf"]),
        )
        rows[key] += r["count"]
    return rows


def event_rows(events: list[DmarcEvent]) -> Counter[tuple[Any, ...]]:
    rows: Counter[tuple[Any, ...]] = Counter()
    for e in events:
        # parsedmarc fills an empty envelope_from with the SPF domain
        efrom = e.envelope_from or (e.spf[0] if e.spf else None)
        eto = e.envelope_to[0] if len(e.envelope_to) == 1 else None
        rows[(e.source_ip, e.disposition, e.dkim_aligned, e.spf_aligned, e.overrides,
              e.header_from, efrom, eto, e.dkim, (e.spf,) if e.spf else ())] += 1
    return rows


def mixed_events() -> list[DmarcEvent]:
    return [
        ev(),
        ev(time=BEGIN + 10),
        ev(time=BEGIN + 86399.5, source_ip="198.51.100.7"),
        ev(source_ip="203.0.113.9", disposition="reject", dkim_aligned="fail",
           spf_aligned="fail", dkim=(("evil.example", "x", "pass"),),
           spf=("evil.example", "mfrom", "fail"), envelope_from="evil.example"),
        ev(source_ip="203.0.113.9", disposition="none", dkim_aligned="fail",
           spf_aligned="fail", overrides=(("local_policy", "allowlisted sender"),),
           dkim=(), spf=("evil.example", "mfrom", "softfail"), envelope_from="evil.example"),
        ev(source_ip="2001:DB8:0:0::25", header_from="news.example.com", envelope_from="",
           spf=("mta.example.net", "helo", "none"), spf_aligned="fail",
           dkim=(("example.com", "s1", "pass"), ("esp.example", "k2", "temperror"))),
        ev(source_ip="192.0.2.55", envelope_to=("a.example", "b.example"),
           overrides=(("mailing_list", ""), ("trusted_forwarder", "arc")),
           disposition="none", dkim_aligned="fail", spf_aligned="fail",
           dkim=(("example.com", "s1", "fail"),), spf=("lists.example", "mfrom", "permerror")),
        ev(policy_domain="other.example", header_from="other.example", p="none",
           sp="quarantine", np="reject", testing=True, fo="1:d", adkim="s", aspf="s",
           discovery_method="psl", source_ip="192.0.2.200",
           dkim=(("other.example", "sel", "neutral"),), spf=None, spf_aligned="fail",
           overrides=(("policy_test_mode", ""),)),
    ]


# --- the record -----------------------------------------------------------------------------

def test_event_json_round_trip() -> None:
    for e in mixed_events():
        data = e.to_json()
        assert data["v"] == 1
        again = DmarcEvent.from_json(json.loads(json.dumps(data)))
        assert again == e
        assert again.to_json() == data


def test_event_normalizes_and_validates() -> None:
    e = ev(source_ip=" 2001:DB8:0::1 ", header_from="Example.COM.", fo="",
           envelope_to=("A.example", "a.example."))
    assert (e.source_ip, e.header_from, e.fo, e.envelope_to) == (
        "2001:db8::1", "example.com", "0", ("a.example",))
    for bad in (dict(source_ip="300.1.1.1"), dict(p="monitor"), dict(disposition="pass"),
                dict(adkim="x"), dict(discovery_method="dns"), dict(overrides=(("other", ""),)),
                dict(dkim=(("example.com", "s", "softfail"),)),
                dict(dkim=(("a.example", "", "pass"),)),
                dict(spf=("example.com", "pra", "pass")), dict(time=float("nan")),
                dict(testing="n"), dict(dkim_aligned="none"), dict(rua="mailto:x@y")):
        with pytest.raises(ValueError):
            ev(**bad)
    with pytest.raises(ValueError, match="format version"):
        DmarcEvent.from_json({**ev().to_json(), "v": 2})
    with pytest.raises(ValueError, match="malformed"):
        DmarcEvent.from_json({"v": 1})


# --- reports read by parsedmarc ---------------------------------------------------------------

def test_parsedmarc_reads_every_report_as_the_events_say() -> None:
    events = mixed_events()
    reports = daily_reports(events, DAY, ORG)
    assert [r.policy.domain for r in reports] == ["example.com", "other.example"]
    for report in reports:
        mine = [e for e in events if e.policy_domain == report.policy.domain]
        parsed = parse(report)
        assert parsed["xml_namespace"] == NAMESPACE
        assert parsed["xml_schema"] == "1.0"
        meta = parsed["report_metadata"]
        assert meta["report_id"] == report.report_id
        assert meta["org_name"] == ORG.org_name
        assert meta["org_email"] == ORG.email
        assert meta["begin_date"] == "2026-03-14 00:00:00"
        assert meta["end_date"] == "2026-03-14 23:59:59"
        assert meta["generator"] == ORG.generator
        assert meta["errors"] == []
        assert parsed_rows(parsed) == event_rows(mine)
        assert sum(r["count"] for r in parsed["records"]) == len(mine)
    pol_a = parse(reports[0])["policy_published"]
    assert {k: pol_a[k] for k in ("domain", "p", "sp", "np", "adkim", "aspf", "fo", "testing",
                                  "discovery_method")} == {
        "domain": "example.com", "p": "reject", "sp": "reject", "np": "reject", "adkim": "r",
        "aspf": "r", "fo": "0", "testing": "n", "discovery_method": "treewalk"}
    pol_b = parse(reports[1])["policy_published"]
    assert {k: pol_b[k] for k in ("p", "sp", "np", "adkim", "aspf", "fo", "testing",
                                  "discovery_method")} == {
        "p": "none", "sp": "quarantine", "np": "reject", "adkim": "s", "aspf": "s",
        "fo": "1:d", "testing": "y", "discovery_method": "psl"}


def test_parsedmarc_reads_the_email() -> None:
    [report, _] = daily_reports(mixed_events(), DAY, ORG)
    msg = report.to_email()
    out = parsedmarc.parse_report_file(msg.as_bytes(), offline=True, always_use_local_files=True)
    assert out["report_type"] == "aggregate"
    assert out["report"]["report_metadata"]["report_id"] == report.report_id
    [part] = list(msg.iter_attachments())
    assert part.get_content_type() == "application/gzip"
    assert part.get_filename() == report.filename
    assert part.get_content() == report.to_gzip()
    assert msg["From"] == ORG.email and msg["To"] == "dmarc@example.com"
    assert msg["Subject"] == report.subject
    assert msg["Message-ID"] == f"<{report.report_id}@receiver.example>"
    assert msg["Date"] == "Sat, 14 Mar 2026 23:59:59 +0000"
    other = report.to_email(sender="postmaster@receiver.example", now=BEGIN + 90000)
    assert other["From"] == "postmaster@receiver.example"
    assert other["Date"] == "Sun, 15 Mar 2026 01:00:00 +0000"


def test_null_sender_is_an_empty_envelope_from() -> None:
    [report] = daily_reports([ev(envelope_from="", spf=("helo.example", "helo", "pass"))],
                             DAY, ORG)
    ids = ET.fromstring(report.to_xml()).find(f".//{{{NAMESPACE}}}identifiers")
    assert ids is not None
    efrom = ids.find(f"{{{NAMESPACE}}}envelope_from")
    assert efrom is not None and not efrom.text


# --- grouping, DKIM cap, IPv6 ----------------------------------------------------------------

def test_grouping_and_counts() -> None:
    events = [ev() for _ in range(5)] + [ev(source_ip="192.0.2.2")] * 3 + [
        ev(dkim_aligned="fail", dkim=(("example.com", "s1", "fail"),))] * 2 + [
        ev(envelope_to=("other.example",))]
    [report] = daily_reports(events, DAY, ORG)
    assert sorted(r.count for r in report.records) == [1, 2, 3, 5]
    assert parsed_rows(parse(report)) == event_rows(events)


def test_dkim_capped_at_100_in_rfc_order() -> None:
    sigs = [(f"d{i}.example", f"s{i}", "fail") for i in range(150)]
    sigs += [("third.example", "t", "pass"), ("mail.example.com", "relaxed", "pass"),
             ("example.com", "strict", "pass")]
    [report] = daily_reports([ev(dkim=tuple(sigs))], DAY, ORG)
    [rec] = report.records
    assert len(rec.dkim) == MAX_DKIM_RESULTS
    assert [s[1] for s in rec.dkim[:4]] == ["strict", "relaxed", "t", "s0"]
    parsed = parse(report)
    assert len(parsed["records"][0]["auth_results"]["dkim"]) == MAX_DKIM_RESULTS
    # with an organizational-domain function, siblings count as relaxed-aligned
    [r2] = daily_reports([ev(dkim=(("x.example", "a", "pass"), ("b.example.com", "b", "pass")),
                             header_from="a.example.com")], DAY, ORG,
                         org_domain=lambda d: ".".join(d.split(".")[-2:]))
    assert [s[1] for s in r2.records[0].dkim] == ["b", "a"]


def test_ipv6_sources() -> None:
    events = [ev(source_ip="2001:db8::25"), ev(source_ip="2001:0DB8:0000::0025"),
              ev(source_ip="::ffff:192.0.2.1")]
    [report] = daily_reports(events, DAY, ORG)
    assert [(r.source_ip, r.count) for r in report.records] == [
        ("192.0.2.1", 1), ("2001:db8::25", 2)]
    assert parsed_rows(parse(report)) == event_rows(events)


# --- days and time zones ---------------------------------------------------------------------

def test_day_bounds_and_other_days_ignored() -> None:
    assert day_bounds(DAY) == (BEGIN, BEGIN + 86399)
    events = [ev(time=BEGIN - 0.5), ev(time=BEGIN), ev(time=BEGIN + 86399.9),
              ev(time=BEGIN + 86400)]
    [report] = daily_reports(events, DAY, ORG)
    assert (report.begin, report.end) == (BEGIN, BEGIN + 86399)
    assert sum(r.count for r in report.records) == 2
    assert daily_reports(events, dt.date(2026, 3, 20), ORG) == []


@pytest.mark.usefixtures("restore_tz")
def test_time_zone_independent() -> None:
    outputs = []
    # POSIX TZ strings (no tzdata needed): UTC+14, UTC-12, US Eastern with DST
    for tz in ("UTC0", "LINT-14", "AOE+12", "EST5EDT,M3.2.0,M11.1.0"):
        os.environ["TZ"] = tz
        time.tzset()
        reports = daily_reports(mixed_events(), DAY, ORG)
        outputs.append([(r.begin, r.end, r.filename, r.to_gzip(), r.to_email().as_bytes())
                        for r in reports])
    assert time.timezone != 0  # the last zone really was not UTC
    assert all(o == outputs[0] for o in outputs)
    assert outputs[0][0][:2] == (BEGIN, BEGIN + 86399)


def test_policy_change_mid_day_uses_latest() -> None:
    events = [ev(time=BEGIN + 100, p="none", rua=("mailto:old@example.com",)),
              ev(time=BEGIN + 50000, p="quarantine", disposition="quarantine",
                 dkim_aligned="fail", spf_aligned="fail", rua=("mailto:new@example.com",)),
              ev(time=BEGIN + 200, p="none")]
    [report] = daily_reports(events, DAY, ORG)
    assert (report.policy.p, report.policy.sp, report.rua) == (
        "quarantine", "quarantine", ("mailto:new@example.com",))
    parsed = parse(report)
    assert parsed["policy_published"]["p"] == "quarantine"
    assert parsed_rows(parsed) == event_rows(events)  # dispositions stay as applied


# --- determinism, identifiers ----------------------------------------------------------------

def test_resend_is_identical() -> None:
    events = mixed_events()
    first = daily_reports(events, DAY, ORG)
    shuffled = list(events)
    random.Random(7).shuffle(shuffled)
    again = daily_reports(shuffled, DAY, ORG)
    for a, b in zip(first, again, strict=True):
        assert a.report_id == b.report_id
        assert a.to_xml() == b.to_xml()
        assert a.to_gzip() == b.to_gzip()
        assert a.to_email().as_bytes() == b.to_email().as_bytes()
        assert gzip.decompress(a.to_gzip()) == a.to_xml()
    ids = {r.report_id for r in first}
    assert len(ids) == 2
    # another day, another receiver, or another MX reporting on its own: another ID
    assert daily_reports(events, dt.date(2026, 3, 15), ORG) == []
    moved = [ev(time=e.time + 86400) for e in events[:1]]
    assert daily_reports(moved, dt.date(2026, 3, 15), ORG)[0].report_id not in ids
    other = ReportingOrg("Other", "other-receiver.example", "r@other-receiver.example")
    assert daily_reports(events, DAY, other)[0].report_id not in ids
    mx2 = [ev(reporter="mx2.receiver.example")]
    assert daily_reports(mx2, DAY, ORG)[0].report_id not in ids


def test_filename_subject_and_id_agree() -> None:
    [report, _] = daily_reports(mixed_events(), DAY, ORG)
    rid = report.report_id
    assert re.fullmatch(r"[0-9a-f]{32}", rid)  # unique-id = 1*(ALPHA / DIGIT), no "@"
    assert report.filename == f"receiver.example!example.com!{BEGIN}!{BEGIN + 86399}!{rid}.xml.gz"
    assert report.subject == (
        f"Report Domain: example.com Submitter: receiver.example Report-ID: <{rid}>")
    root = ET.fromstring(report.to_xml())
    assert root.findtext(f"{{{NAMESPACE}}}report_metadata/{{{NAMESPACE}}}report_id") == rid


def test_mailto_recipients() -> None:
    uris = ["mailto:a@example.com", "https://x.example/r", "mailto:b@example.com!10k",
            "mailto:A@EXAMPLE.com", "mailto:c%40x@example.net", "mailto:d@example.org?subject=x",
            "mailto:e@example.org!junk", "mailto:not-an-address"]
    assert mailto_recipients(uris) == ["a@example.com", "b@example.com", "d@example.org"]
    assert mailto_recipients(uris, size=20000) == ["a@example.com", "d@example.org"]
    [report] = daily_reports([ev(rua=())], DAY, ORG)
    with pytest.raises(ValueError, match="no usable mailto"):
        report.to_email()


# --- structure (RFC 9990 tables, in their order) ----------------------------------------------

# element: [(child, min, max)] in the order written; None = unbounded
SCHEMA: dict[str, list[tuple[str, int, int | None]]] = {
    "feedback": [("version", 1, 1), ("report_metadata", 1, 1), ("policy_published", 1, 1),
                 ("extension", 0, 1), ("record", 1, None)],
    "report_metadata": [("org_name", 1, 1), ("email", 1, 1), ("extra_contact_info", 0, 1),
                        ("report_id", 1, 1), ("date_range", 1, 1), ("error", 0, None),
                        ("generator", 0, 1)],
    "date_range": [("begin", 1, 1), ("end", 1, 1)],
    "policy_published": [("domain", 1, 1), ("discovery_method", 0, 1), ("p", 1, 1),
                         ("sp", 0, 1), ("np", 0, 1), ("fo", 0, 1), ("adkim", 0, 1),
                         ("aspf", 0, 1), ("testing", 0, 1)],
    "record": [("row", 1, 1), ("identifiers", 1, 1), ("auth_results", 1, 1)],
    "row": [("source_ip", 1, 1), ("count", 1, 1), ("policy_evaluated", 1, 1)],
    "policy_evaluated": [("disposition", 1, 1), ("dkim", 1, 1), ("spf", 1, 1),
                         ("reason", 0, None)],
    "reason": [("type", 1, 1), ("comment", 0, 1)],
    "identifiers": [("header_from", 1, 1), ("envelope_from", 0, 1), ("envelope_to", 0, 1)],
    "auth_results": [("dkim", 0, None), ("spf", 0, 1)],
    "auth_dkim": [("domain", 1, 1), ("selector", 1, 1), ("result", 1, 1),
                  ("human_result", 0, 1)],
    "auth_spf": [("domain", 1, 1), ("scope", 0, 1), ("result", 1, 1), ("human_result", 0, 1)],
}
ENUMS = {
    "disposition": {"none", "pass", "quarantine", "reject"},
    "p": {"none", "quarantine", "reject"}, "sp": {"none", "quarantine", "reject"},
    "np": {"none", "quarantine", "reject"}, "adkim": {"r", "s"}, "aspf": {"r", "s"},
    "testing": {"n", "y"}, "discovery_method": {"psl", "treewalk"}, "scope": {"mfrom", "helo"},
    "type": {"local_policy", "mailing_list", "other", "policy_test_mode", "trusted_forwarder"},
}


def check(elem: ET.Element, kind: str) -> None:
    assert elem.tag.startswith(f"{{{NAMESPACE}}}"), elem.tag
    names = [c.tag.removeprefix(f"{{{NAMESPACE}}}") for c in elem]
    pos = 0
    for name, lo, hi in SCHEMA[kind]:
        n = 0
        while pos < len(names) and names[pos] == name:
            pos, n = pos + 1, n + 1
        assert n >= lo and (hi is None or n <= hi), (kind, name, names)
    assert pos == len(names), (kind, names, "unexpected or out of order")
    for child, name in zip(elem, names, strict=True):
        sub = {("auth_results", "dkim"): "auth_dkim", ("auth_results", "spf"): "auth_spf"}.get(
            (kind, name), name)
        if sub in SCHEMA:
            check(child, sub)
        else:
            assert len(child) == 0
            if name in ENUMS:
                assert child.text in ENUMS[name], (name, child.text)
            if name in ("begin", "end", "count"):
                assert child.text is not None and child.text.isdigit()


def test_structure_follows_rfc_9990() -> None:
    for report in daily_reports(mixed_events(), DAY, ORG):
        xml = report.to_xml()
        assert xml.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n'
                              b'<feedback xmlns="urn:ietf:params:xml:ns:dmarc-2.0">')
        assert b"ns0:" not in xml and b"xmlns:" not in xml  # default namespace, no prefix
        root = ET.fromstring(xml)
        assert root.tag == f"{{{NAMESPACE}}}feedback"
        assert root.findtext(f"{{{NAMESPACE}}}version") == "1.0"
        check(root, "feedback")
