"""The benchmark itself must not rot: ``bench/run.py --quick`` runs end to end.

A few dozen messages, one repeat, two scenarios (Postfix alone, authmilter signing), real
Postfix and smtp-sink on loopback, in well under a minute. The table must have both rows with a
positive msgs/s, and quick mode must leave docs/performance.md alone.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import postfix_fixture

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "bench" / "run.py"
DOC = REPO / "docs" / "performance.md"


def table_rows(output: str) -> dict[str, dict[str, str]]:
    """The Markdown table in ``output``: scenario → {column header: cell}."""
    lines = [line for line in output.splitlines() if line.startswith("| ")]
    assert lines, f"no table in the output:\n{output}"
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if set(cells[0]) <= {"-", ":"}:
            continue  # the separator row
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_quick_benchmark_runs() -> None:
    postfix_fixture.require_postfix()
    doc_before = DOC.read_bytes() if DOC.exists() else None
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick"],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"bench/run.py --quick failed:\n{proc.stdout}\n{proc.stderr}"
    rows = table_rows(proc.stdout)
    assert set(rows) == {"no-milter", "authmilter-sign"}, proc.stdout
    for name, row in rows.items():
        rate = float(row["msgs/s"].split()[0])
        assert rate > 0, f"{name}: msgs/s {row['msgs/s']}\n{proc.stdout}"
        assert int(row["msgs"]) > 0, f"{name}: {row}"
    assert float(rows["authmilter-sign"]["milter CPU ms/msg"]) > 0, proc.stdout
    doc_after = DOC.read_bytes() if DOC.exists() else None
    assert doc_after == doc_before, "--quick must not touch docs/performance.md"
