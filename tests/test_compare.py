"""``make compare`` in small: a few cases of each area through both sides, every difference
either absent or listed as deliberate (compare/deliberate.py, docs/migration.md).

The full comparison (``make compare``, over 100 messages, about two minutes) rewrites the table
in docs/migration.md; this module runs ``compare/run.py --quick`` — the cases marked ``quick``
in compare/corpus.py, two to six per area — against the real OpenDKIM, OpenDMARC, policyd-spf,
Postfix and NSD, and fails on any difference that no deliberate rule explains. It needs root
(NSD on port 53, mount namespaces), as the rest of the end-to-end suite does.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import postfix_fixture

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from compare import corpus, deliberate, run  # noqa: E402
from compare.outcome import FIELDS, Outcome  # noqa: E402

DOC = REPO / "docs" / "migration.md"
#: A bound on the whole quick run (it takes about 40 s on 2 cores).
RUN_TIMEOUT = 400


def test_the_quick_subset_covers_every_area_and_config_set() -> None:
    quick = corpus.select(quick=True)
    areas = {c.area for c in quick}
    assert areas == {"dkim", "spf", "dmarc", "headers", "signing"}, areas
    configs = {c.config for c in quick}
    assert {"debian", "debian-spf", "debian-strict", "tutorial"} <= configs, configs
    assert 15 <= len(quick) <= 40, len(quick)


def test_the_corpus_has_at_least_sixty_messages_in_every_area() -> None:
    assert len(corpus.CASES) >= 60
    for area in ("dkim", "spf", "dmarc", "headers", "signing"):
        assert sum(1 for c in corpus.CASES.values() if c.area == area) >= 5, area


def test_every_record_of_the_corpus_falls_in_a_zone_nsd_serves() -> None:
    keys = corpus.Keys.make()
    zones = corpus.zones(keys)
    assert set(zones) == set(corpus.ORIGINS)
    for owner, _rtype, _text in corpus.records(keys):
        assert any(owner == o or owner.endswith("." + o) for o in corpus.ORIGINS), owner


def test_an_unlisted_difference_is_reported_as_unexplained() -> None:
    """The check can fail: a difference no rule covers stays unexplained."""
    case = corpus.CASES["dkim-rsa-relaxed"]
    same = {f: "-" for f in FIELDS} | {"smtp": "accepted", "dkim": "pass d=dkim.example.com"}
    other = dict(same, dkim="fail d=dkim.example.com")
    row = run.make_row(case, Outcome(values=dict(same)), Outcome(values=other))
    assert row.differences() == ["dkim"]
    assert row.unexplained() == ["dkim"]
    row = run.make_row(case, Outcome(values=dict(same)), Outcome(values=dict(same)))
    assert row.differences() == [] and row.unexplained() == []


def test_a_deliberate_rule_explains_only_the_shape_it_names() -> None:
    case = corpus.CASES["dkim-missing-key"]
    base = {f: "-" for f in FIELDS} | {"smtp": "accepted"}
    explained = run.make_row(case, Outcome(values=base | {"dkim": "fail d=dkim.example.com"}),
                             Outcome(values=base | {"dkim": "permerror d=dkim.example.com"}))
    assert explained.unexplained() == []
    reversed_ = run.make_row(case, Outcome(values=base | {"dkim": "permerror d=dkim.example.com"}),
                             Outcome(values=base | {"dkim": "fail d=dkim.example.com"}))
    assert reversed_.unexplained() == ["dkim"]


def _deliberate_section() -> str:
    text = DOC.read_text()
    start = text.index("## Deliberate differences")
    return text[start:text.index(run.MARKER)]


def test_every_deliberate_rule_is_documented_with_its_rfc_sections() -> None:
    section = _deliberate_section()
    for rule in deliberate.RULES:
        for ref in rule.why.rfc.split(";"):
            ref = ref.strip()
            assert re.search(re.escape(ref) + r"\b", section), (
                f"rule {rule.key}: {ref} is not in the Deliberate differences of {DOC}")
    assert section.count("(RFC ") >= len({r.why.rfc for r in deliberate.RULES})


def test_the_migration_doc_has_the_generated_table_marker() -> None:
    text = DOC.read_text()
    assert text.count(run.MARKER) == 1


@pytest.fixture(scope="module")
def quick_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[subprocess.CompletedProcess[str]]:
    """``compare/run.py --quick``, output to files. On timeout it gets SIGTERM first, so that
    it stops every daemon it started (NSD, Postfix, the milters) before it is killed."""
    postfix_fixture.require_postfix()
    if os.geteuid() != 0:
        pytest.fail("the comparison needs root (NSD on port 53, unshare -m)", pytrace=False)
    doc_before = DOC.read_bytes()
    out_dir = tmp_path_factory.mktemp("compare-quick")
    argv = [sys.executable, str(REPO / "compare" / "run.py"), "--quick"]
    with (out_dir / "stdout").open("w") as out, (out_dir / "stderr").open("w") as err:
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err)  # fmt: skip
        try:
            proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    stdout, stderr = (out_dir / "stdout").read_text(), (out_dir / "stderr").read_text()
    assert DOC.read_bytes() == doc_before, "--quick must not rewrite docs/migration.md"
    yield subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def _rows(output: str) -> dict[str, str]:
    """case → verdict cell of the results table."""
    rows = {}
    for line in output.splitlines():
        m = re.match(r"^\| `([^`]+)` \|.*\| ([^|]+) \|$", line)
        if m:
            rows[m[1]] = m[2].strip()
    return rows


def test_quick_comparison_runs_every_quick_case(
    quick_run: subprocess.CompletedProcess[str],
) -> None:
    rows = _rows(quick_run.stdout)
    expected = {c.name for c in corpus.select(quick=True)}
    assert set(rows) == expected, (
        f"missing {sorted(expected - set(rows))}\n{quick_run.stdout[-3000:]}\n"
        f"{quick_run.stderr[-5000:]}")


def test_quick_comparison_has_no_unexplained_difference(
    quick_run: subprocess.CompletedProcess[str],
) -> None:
    rows = _rows(quick_run.stdout)
    unexplained = {case: v for case, v in rows.items() if "DIFFERENT" in v}
    details = quick_run.stdout.split("### Differences in detail", 1)[-1]
    listing = "\n".join(f"  {case}: {verdict}" for case, verdict in unexplained.items())
    assert not unexplained, (
        "differences between the anchors and authmilter that compare/deliberate.py does not "
        f"list:\n{listing}\n{details[-8000:]}")
    assert quick_run.returncode == 0, quick_run.stderr[-5000:]
