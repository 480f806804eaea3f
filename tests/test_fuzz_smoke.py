"""`make fuzz` keeps working: a short, seeded run of fuzz/run.py finds nothing and reaches
every kind of result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_short_seeded_fuzz_run_passes_and_reaches_many_results(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    crashes = tmp_path / "crashes"
    run = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "run.py"), "--max-inputs", "300", "--seconds", "60",
         "--seed", "20261123", "--summary", str(summary), "--crash-dir", str(crashes)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert not crashes.exists(), run.stdout
    data = json.loads(summary.read_text())
    assert data["inputs"] == 300 and data["failures"] == 0
    assert f"inputs tried: {data['inputs']}" in run.stdout
    labels = data["breakdown"]
    for method, at_least in (("dkim", 4), ("spf", 4), ("dmarc", 3), ("action", 3)):
        seen = {label for label in labels if label.startswith(method + "=")}
        assert len(seen) >= at_least, (method, sorted(labels))
    assert labels.get("signed-verified", 0) > 0, labels  # the sign path, checked by our verifier
    assert labels.get("aborted", 0) > 0, labels
