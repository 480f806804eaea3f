"""The benchmark itself must not rot: ``bench/run.py --quick`` runs end to end.

A few dozen messages, one repeat, two scenarios (Postfix alone, authmilter signing), real
Postfix and smtp-sink on loopback, in well under a minute. The table must have both rows with a
positive msgs/s, and quick mode must leave docs/performance.md alone.

The ARC scenarios get a quick run of their own (plain verifying, verifying mail with ARC
chains of 1 and 3 sets, and verifying then sealing with ``ARCSign inbound``, against a real NSD
on port 53 of a random loopback address), which also runs the ARC micro-benchmark
(``bench/arc_seal.py``) with a handful of calls.

rspamd's two scenarios (``rspamd_proxy`` as the milter, signing on the submit port and
checking DKIM, SPF and DMARC on the inbound port) get one too: each sample must carry rspamd's
valid signature, or its Authentication-Results with all three ``pass``.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import postfix_fixture
import rspamd_fixture

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "bench" / "run.py"
DOC = REPO / "docs" / "performance.md"


def tables(output: str) -> list[list[str]]:
    """The Markdown tables in ``output``, each as its lines (runs of lines starting "| ")."""
    found: list[list[str]] = []
    previous = False
    for line in output.splitlines():
        is_row = line.startswith("| ")
        if is_row and not previous:
            found.append([])
        if is_row:
            found[-1].append(line)
        previous = is_row
    return found


def table_rows(output: str, index: int = 0) -> dict[str, dict[str, str]]:
    """Table ``index`` of ``output`` (the main one first): first column → {header: cell}."""
    found = tables(output)
    assert len(found) > index, f"no table {index} in the output:\n{output}"
    lines = found[index]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if set(cells[0]) <= {"-", ":"}:
            continue  # the separator row
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def random_loopback() -> str:
    """A loopback address for this run's NSD on port 53 (runs may overlap)."""
    return f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"


Rows = dict[str, dict[str, str]]


def quick_run(scenarios: list[str]) -> tuple[subprocess.CompletedProcess[str], Rows]:
    """``bench/run.py --quick`` of ``scenarios``: it succeeded, its table has exactly those
    rows, each with a rate and the milter's CPU, and docs/performance.md is untouched."""
    doc_before = DOC.read_bytes() if DOC.exists() else None
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--scenarios", ",".join(scenarios),
         "--dns-address", random_loopback()],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"bench/run.py --quick failed:\n{proc.stdout}\n{proc.stderr}"
    rows = table_rows(proc.stdout)
    assert set(rows) == set(scenarios), proc.stdout
    for name in scenarios:
        assert float(rows[name]["msgs/s"].split()[0]) > 0, proc.stdout
        assert float(rows[name]["milter CPU ms/msg"]) > 0, proc.stdout
    doc_after = DOC.read_bytes() if DOC.exists() else None
    assert doc_after == doc_before, "--quick must not touch docs/performance.md"
    return proc, rows


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


def test_quick_arc_benchmark_runs() -> None:
    """ARC verify scenarios, each sample with dkim, spf, dmarc and arc all pass, and in the seal
    scenario our one ARC Set verifying (the run stops otherwise); their ratio to plain
    verifying is there; the micro-benchmark table follows."""
    postfix_fixture.require_postfix()
    scenarios = ["authmilter-verify", "authmilter-verify-arc1", "authmilter-verify-arc3",
                 "authmilter-verify-seal"]  # fmt: skip
    proc, rows = quick_run(scenarios)
    for name in scenarios[1:]:  # taken to authmilter-verify within the repeat
        assert float(rows[name]["× OpenDKIM(+DMARC)"]) > 0, proc.stdout
    assert ("of authmilter-verify-arc1, authmilter-verify-arc3, authmilter-verify-seal is taken "
            "to authmilter-verify") in proc.stdout  # fmt: skip
    micro = table_rows(proc.stdout, 1)
    seals = [case for case in micro if case.startswith("arc_sign.seal, instance ")]
    verifies = [case for case in micro if case.startswith("arc_verify.verify_chain, chain of ")]
    assert len(seals) == 3 and len(verifies) == 2, proc.stdout
    for case in seals + verifies:
        assert float(micro[case]["CPU ms/call"].split()[0]) > 0, proc.stdout


def test_quick_rspamd_benchmark_runs() -> None:
    """rspamd signs (the sample's one DKIM-Signature verifies) and verifies (its
    Authentication-Results say dkim, spf and dmarc pass), or the run stops; rspamd's whole
    process tree is measured: the main process, one proxy worker per CPU and hs_helper."""
    postfix_fixture.require_postfix()
    rspamd_fixture.require_rspamd()
    scenarios = ["rspamd-sign", "rspamd-verify"]
    proc, rows = quick_run(scenarios)
    for name in scenarios:
        # at least the main process and a proxy worker per CPU (hs_helper is the usual +1)
        assert int(rows[name]["procs"]) >= (os.cpu_count() or 1) + 1, proc.stdout
    assert "rspamd 3." in proc.stdout, proc.stdout  # the Software line names its version


def test_cpu_profile_runs_the_worker_code_on_signed_and_verified_mail() -> None:
    """bench/cpu_profile.py drives the adapter in-process (it stops unless the mail came out
    signed, or with dkim, spf and dmarc pass) and splits the CPU into its stages."""
    postfix_fixture.require_postfix()  # NSD and the bench's helpers, as the runs above
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "cpu_profile.py"), "--cases", "sign,verify",
         "--messages", "20", "--warmup", "3", "--rounds", "1", "--dns-address",
         random_loopback()],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"cpu_profile.py failed:\n{proc.stdout}\n{proc.stderr}"
    sign, _sep, verify = proc.stdout.partition("Mode v")
    for table, stage in ((sign, "| DKIM sign"), (verify, "| SPF:"), (verify, "| DMARC:")):
        assert stage in table, proc.stdout
    totals = [float(m) for m in re.findall(r"one thread\*\* \| \*\*(\d+)\*\*", proc.stdout)]
    assert len(totals) == 2 and all(t > 0 for t in totals), proc.stdout


def test_quick_full_verify_benchmark_runs() -> None:
    """authmilter-verify-full: every sample passes dkim, spf and dmarc and carries our one
    verifying ARC Set (the run stops otherwise), with ReportDatabase configured."""
    postfix_fixture.require_postfix()
    quick_run(["authmilter-verify-full"])
