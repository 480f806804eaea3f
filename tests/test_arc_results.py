"""The ``arc=`` clause of our Authentication-Results (RFC 8617 §10.2): the pipeline validates
the ARC chain of inbound mail (streamed body, the milter's resolver and clock) and reports it
between SPF and DMARC; mail without ARC fields gets no ``arc=`` clause."""

from __future__ import annotations

import re

import pytest

from authmilter.config import Config
from authmilter.keys import PrivateKey, generate_private_key
from authmilter.pipeline import Context
from helpers import ATTACKER_IP, make_message, run
from test_arc_verify import ORIGIN, chain, resolver

AID = "mx.ours.test"


@pytest.fixture(scope="module")
def key() -> PrivateKey:
    return generate_private_key("rsa", 2048)


def ar_of(verdict_log: str, edits: object) -> str:
    values = [e.value for e in edits if getattr(e, "name", "") == "Authentication-Results"]
    assert len(values) == 1, (verdict_log, edits)
    return " ".join(str(values[0]).split())


def ctx(dns: object) -> Context:
    cfg = Config.from_text(f"AuthservID {AID}\nMode v\n")
    return Context.build(cfg, resolver=dns)  # type: ignore[arg-type]


def test_a_valid_chain_is_arc_pass_with_oldest_pass_and_the_client(key: PrivateKey) -> None:
    hops = [(f"list.{ORIGIN}", key), (f"fwd.{ORIGIN}", key)]
    verdict = run(ctx(resolver(hops)), chain(hops))
    ar = ar_of(verdict.log, verdict.edits)
    assert re.search(rf"; arc=pass \(i=2 as\[2\]\.d=fwd\.{ORIGIN} as\[2\]\.s=sel\) "
                     rf"header\.oldest-pass=0 smtp\.remote-ip={re.escape(ATTACKER_IP)}", ar), ar
    assert ar.index("spf=") < ar.index("arc=") < ar.index("dmarc=")
    assert "arc=pass" in verdict.log and ("arc", "pass") in verdict.results  # the metric


def test_a_body_changed_after_the_last_seal_is_arc_fail_with_why(key: PrivateKey) -> None:
    hops = [(f"list.{ORIGIN}", key)]
    sealed = chain(hops)
    verdict = run(ctx(resolver(hops)), sealed.replace(b"\r\n\r\n", b"\r\n\r\nadded line\r\n", 1))
    ar = ar_of(verdict.log, verdict.edits)
    assert re.search(r"; arc=fail \([^)]*body hash", ar), ar
    assert "header.oldest-pass" not in ar and "arc=fail" in verdict.log
    assert ("arc", "fail") in verdict.results


def test_mail_without_arc_fields_gets_no_arc_clause(key: PrivateKey) -> None:
    verdict = run(ctx(resolver([])), make_message())
    ar = ar_of(verdict.log, verdict.edits)
    assert "dmarc=" in ar and not re.search(r"\barc=", ar) and not re.search(r"\barc=", verdict.log)
    assert ("arc", "none") in verdict.results  # counted as none, not reported
