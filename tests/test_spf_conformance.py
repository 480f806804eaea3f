"""The RFC 7208 SPF test suite (openspf.org, release 2014.04) through :class:`SpfChecker`.

Each scenario of ``rfc7208-tests.yml`` brings its own zone data; a
:class:`SuiteResolver` serves it with the contract of :class:`authmilter.resolver.Resolver`
(records, ``[]`` for NODATA, :class:`DNSNameNotFound`, :class:`DNSTempError`), so the suite
exercises the same pyspf-on-our-resolver path the milter runs. One pytest case per suite test,
named ``scenario::test``.

How the suite's zone data reads (as its drivers, pyspf's included, interpret it):

- a name maps to a list of entries ``{TYPE: value}``; ``TXT``/``SPF`` values are a string or a
  list of character-strings of one record; ``MX`` is ``[preference, exchange]``;
- ``SPF`` records are also served as ``TXT`` unless the name lists any ``TXT`` entry
  (``TXT: NONE`` says "no TXT here" and is not a record);
- a bare ``TIMEOUT`` entry makes every query at the name time out unless a record of the
  queried type comes before it; ``TYPE: TIMEOUT`` times out queries of that type;
- a name not listed does not exist (NXDOMAIN).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.SPF
import dns.rdtypes.ANY.TXT
import pytest
import spf
import yaml

from authmilter.errors import DNSNameNotFound, DNSTempError
from authmilter.results import SpfResult
from authmilter.spf_check import SpfChecker, SpfCheckOutcome

#: The suite as pyspf's source distribution ships it (``test/rfc7208-tests.yml``); ``make test``
#: fetches that from the package registry into build/ (Makefile target ``conformance``).
SUITE = Path(__file__).resolve().parents[1] / "build" / "conformance" / "rfc7208-tests.yml"

_TIMEOUT = "TIMEOUT"
_MAX_CNAMES = 10


class SuiteResolver:
    """Answer ``query(name, rdtype)`` from one scenario's ``zonedata``."""

    def __init__(self, zonedata: Mapping[str, Sequence[Any]]) -> None:
        self._zone = {_key(name): _entries(records) for name, records in zonedata.items()}
        self.log: list[tuple[str, str]] = []

    def query(self, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
        """Records of ``rdtype`` at ``name``, CNAMEs followed as a recursive resolver does."""
        self.log.append((name, rdtype))
        key = _key(name)
        for _ in range(_MAX_CNAMES):
            entries = self._zone.get(key)
            if entries is None:
                raise DNSNameNotFound(f"{name} {rdtype}: no such domain (NXDOMAIN)")
            found: list[dns.rdata.Rdata] = []
            cname: str | None = None
            for entry in entries:
                if entry == _TIMEOUT:
                    if not found:
                        raise DNSTempError(f"{name} {rdtype}: timed out (suite TIMEOUT)")
                    break
                rtype, value = entry
                if rtype == "CNAME" and cname is None:
                    cname = str(value)
                if rtype != rdtype:
                    continue
                if value == _TIMEOUT:
                    raise DNSTempError(f"{name} {rdtype}: timed out (suite TIMEOUT)")
                record = _rdata(rtype, value)
                if record is not None:
                    found.append(record)
            if found or cname is None or rdtype == "CNAME":
                return found
            key = _key(cname)
        # A CNAME loop: a recursive resolver gives up with SERVFAIL.
        raise DNSTempError(f"{name} {rdtype}: CNAME chain too long (SERVFAIL)")


def _key(name: str) -> str:
    return name.rstrip(".").lower()


def _entries(records: Sequence[Any]) -> list[Any]:
    """The entries of one name, with the suite's SPF→TXT duplication applied."""
    has_txt = any(isinstance(r, dict) and "TXT" in r for r in records)
    entries: list[Any] = []
    generated: list[tuple[str, Any]] = []
    for record in records:
        if record == _TIMEOUT:
            entries.append(_TIMEOUT)
            continue
        for rtype, value in record.items():
            if rtype == "SPF" and not has_txt:
                generated.append(("TXT", value))
            if value != "NONE":
                entries.append((rtype, value))
    return entries + generated


def _rdata(rtype: str, value: Any) -> dns.rdata.Rdata | None:
    """One suite record as dnspython rdata; None for the record-less null text."""
    if rtype in ("TXT", "SPF"):
        texts = [value] if isinstance(value, str) else list(value)
        if not texts:
            return None  # "SPF: [ ]": no character-string at all, unrepresentable in DNS
        strings = [
            chunk
            for text in texts
            for data in [str(text).encode("utf-8")]
            for chunk in [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
        ]
        cls = dns.rdtypes.ANY.TXT.TXT if rtype == "TXT" else dns.rdtypes.ANY.SPF.SPF
        return cls(dns.rdataclass.IN, dns.rdatatype.from_text(rtype), strings)
    if rtype == "MX":
        preference, exchange = value
        return dns.rdtypes.ANY.MX.MX(  # type: ignore[no-untyped-call]
            dns.rdataclass.IN, dns.rdatatype.MX, int(preference), dns.name.from_text(exchange)
        )
    if rtype == "PTR":
        return dns.rdtypes.ANY.PTR.PTR(  # type: ignore[no-untyped-call]
            dns.rdataclass.IN, dns.rdatatype.PTR, dns.name.from_text(str(value))
        )
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rtype), str(value))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cases() -> list[Any]:
    if not SUITE.is_file():
        return [pytest.param(None, None, id="suite-missing")]
    with SUITE.open("rb") as fp:
        scenarios = list(yaml.safe_load_all(fp))
    cases = []
    for scenario in scenarios:
        name = _slug(scenario["description"])
        for test_name, test in scenario["tests"].items():
            cases.append(pytest.param(scenario["zonedata"], test, id=f"{name}::{test_name}"))
    return cases


@pytest.mark.parametrize(("zonedata", "test"), _cases())
def test_rfc7208_suite(zonedata: Mapping[str, Sequence[Any]] | None, test: dict[str, Any]) -> None:
    if zonedata is None:
        pytest.fail(f"the RFC 7208 suite is missing: {SUITE}; `make conformance` fetches it "
                    "(make test does)", pytrace=False)
    checker = SpfChecker(SuiteResolver(zonedata), timeout=20.0, void_limit=2)

    outcome = checker.check_mailfrom(str(test["host"]), test["mailfrom"], test["helo"])

    expected = test["result"] if isinstance(test["result"], list) else [test["result"]]
    assert outcome.result.value in expected, (
        f"{outcome.result.value} not in {expected}: {outcome.problem or outcome.comment}"
    )
    if "explanation" in test:
        assert isinstance(outcome, SpfCheckOutcome)
        assert outcome.result is SpfResult.FAIL
        wanted = test["explanation"]
        if wanted == "DEFAULT":  # the suite's name for "the implementation's own text"
            wanted = spf.EXPLANATIONS["fail"]
        assert outcome.explanation == wanted


def test_suite_is_complete() -> None:
    """All 16 scenarios and 203 tests of the 2014.04 release are run."""
    cases = _cases()
    assert len(cases) == 203
    assert len({case.id.split("::")[0] for case in cases}) == 16
