"""The benchmark's section selection: each section runs alone (CI runs the whole smoke run, ``--quick``)."""

import sys
from pathlib import Path

from tests.processes import run_process_tree

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loss.py"


def test_the_sync_section_runs_alone():
    # No timed row then: the table of timed rows is left out instead of failing on an empty list.
    command = [sys.executable, str(BENCH), "--quick", "--only", "sync", "--no-sharding"]
    result = run_process_tree(command, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compute() sync of FeatureDensity + DeadFeatures" in result.stdout
    assert "all_reduce (default)" in result.stdout
    assert "row " not in result.stdout  # no header of an empty table
