"""The benchmark's section selection (each section runs alone; CI runs the whole smoke run, ``--quick``) and summary."""

import importlib.util
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


def _bench_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_loss", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_loss", module)  # a dataclass looks its module up while it is made
    spec.loader.exec_module(module)
    return module


def test_the_summary_counts_judged_rows_and_names_the_failed(monkeypatch):
    bench = _bench_module(monkeypatch)
    rows = [
        bench.Row("1a met", 1.0, 2.0, 0.5, 1.0),
        bench.Row("2b missed", 3.0, 1.0, 3.0, 2.0),
        bench.Row("8e informational", 1.0, 1.0, 1.0, None),
        bench.Row("9 skipped", None, None, None, 1.0),
    ]
    assert bench.summary(rows).startswith("1/2 targets met (failed: 2b);")
    assert bench.summary(rows[:1]).startswith("1/1 targets met;")
    # A selection with nothing to judge (``--only sync``) says so instead of "0/0 targets met".
    assert bench.summary(rows[2:]) == "no ratio targets in this selection"
    assert bench.summary([]) == "no ratio targets in this selection"
