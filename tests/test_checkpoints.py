"""Checkpoints: save mid-epoch, resume in a fresh process, get exactly the uninterrupted result; wrong checkpoints.

Every registered case (``tests/tester.py``), with and without per-item rows. The in-process round trip, pickle,
deepcopy and clone of every case are generic checks in ``test_tester.py``.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import sparse_metrics as sm
from tests import tester
from tests.distributed import run_on_ranks

ROOT = Path(__file__).resolve().parent.parent
C = 2
BATCH_SIZES = [4, 3, 0, 5, 2]
SAVE_AFTER = 2


def _configurations() -> list[tuple[str, tester.Case, bool]]:
    return [
        (f"{case.name}_{keep_batch_dim}", case, keep_batch_dim)
        for case in tester.CASES.values()
        for keep_batch_dim in ((False, True) if case.keep_batch_dim else (False,))
    ]


def _metric(case: tester.Case, keep_batch_dim: bool) -> Any:
    metric = case(C, **({"keep_batch_dim": True} if keep_batch_dim else {}))
    metric.persistent(True)  # states are in the state_dict only when persistent (torchmetrics' default: not)
    return metric


def _save_mid_epoch(directory: str, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Run every metric over the first batches, save it, go on uninterrupted; return the uninterrupted results."""
    batches = tester.batches(BATCH_SIZES, C, seed=seed)
    results = {}
    for name, case, keep_batch_dim in _configurations():
        metric = _metric(case, keep_batch_dim)
        for batch in batches[:SAVE_AFTER]:
            metric(**batch)
        torch.save(metric.state_dict(), os.path.join(directory, f"{name}.pt"))
        for batch in batches[SAVE_AFTER:]:
            metric.update(**batch)
        results[name] = tester.outputs(case, metric)
    return results


def _resume(directory: str, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """In a fresh process: load every saved state (weights only) into a fresh metric and finish the epoch."""
    batches = tester.batches(BATCH_SIZES, C, seed=seed)
    results = {}
    for name, case, keep_batch_dim in _configurations():
        metric = _metric(case, keep_batch_dim)
        metric.load_state_dict(torch.load(os.path.join(directory, f"{name}.pt"), weights_only=True))
        for batch in batches[SAVE_AFTER:]:
            metric.update(**batch)
        results[name] = tester.outputs(case, metric)
    return results


def _assert_identical(resumed: dict[str, Any], uninterrupted: dict[str, Any]) -> None:
    assert resumed.keys() == uninterrupted.keys()
    for key, values in uninterrupted.items():
        tester.assert_identical(resumed[key], values, msg=key)


def test_resume_in_a_fresh_process_gives_the_uninterrupted_result(tmp_path):
    uninterrupted = _save_mid_epoch(str(tmp_path))
    script = (
        "import sys, torch; from tests.test_checkpoints import _resume; "
        "torch.save(_resume(sys.argv[1]), sys.argv[1] + '/resumed.pt')"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, check=True, timeout=300)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    _assert_identical(resumed, uninterrupted)


def _two_rank_save(rank: int, world_size: int, directory: str) -> dict[str, Any]:
    rank_directory = os.path.join(directory, f"rank{rank}")
    os.makedirs(rank_directory, exist_ok=True)
    return _save_mid_epoch(rank_directory, seed=rank)


def _two_rank_resume(rank: int, world_size: int, directory: str) -> dict[str, Any]:
    return _resume(os.path.join(directory, f"rank{rank}"), seed=rank)


@pytest.mark.distributed
@pytest.mark.slow  # two rounds of 2 spawned processes
def test_two_ranks_resume_in_fresh_processes_gives_the_uninterrupted_result(tmp_path):
    uninterrupted = run_on_ranks(_two_rank_save, str(tmp_path))
    resumed = run_on_ranks(_two_rank_resume, str(tmp_path))  # new processes, new process group
    for rank in range(2):
        _assert_identical(resumed[rank], uninterrupted[rank])
    _assert_identical(uninterrupted[1], uninterrupted[0])  # synced: the same on every rank


@pytest.mark.parametrize(
    ("saved", "loaded", "state"),
    [
        (lambda: sm.L2ReconstructionLoss(2), lambda: sm.L2ReconstructionLoss(3), "l2_sum"),
        (lambda: sm.L0NormMetric(2, keep_batch_dim=True), lambda: sm.L0NormMetric(1, keep_batch_dim=True), "l0_sum"),
        (
            lambda: sm.MatryoshkaReconstructionLoss([4, 8]),
            lambda: sm.MatryoshkaReconstructionLoss([2, 4, 8]),
            "matryoshka_prefix_sum",
        ),
        (
            lambda: sm.SparseAutoencoderLoss(2, 0.1, matryoshka_prefix_sizes=[4, 8]),
            lambda: sm.SparseAutoencoderLoss(3, 0.1, matryoshka_prefix_sizes=[4, 8]),
            "_sum",
        ),
        *(
            (
                lambda saved=saved: sm.FractionOfVarianceUnexplained(saved, d_model=3),
                lambda loaded=loaded: sm.FractionOfVarianceUnexplained(loaded, d_model=3),
                "fvu_statistics",
            )
            for saved, loaded in ((1, 2), (2, 1), (2, 3))
        ),
        (
            lambda: sm.FractionOfVarianceUnexplained(2, d_model=3),
            lambda: sm.FractionOfVarianceUnexplained(2, d_model=4),
            "fvu_statistics",
        ),
        (lambda: sm.FeatureDensity(8, 2), lambda: sm.FeatureDensity(6, 2), "density_fire_count"),
        (lambda: sm.DeadFeatures(8, 2, window=3), lambda: sm.DeadFeatures(8, 1, window=3), "dead_counters"),
    ],
)
def test_loading_a_state_of_another_configuration_is_an_error(saved, loaded, state):
    source, target = saved(), loaded()
    for metric in (source, target):
        metric.persistent(True)
    before = {key: value.clone() for key, value in target.state_dict().items() if isinstance(value, torch.Tensor)}
    with pytest.raises(ValueError, match=rf"Cannot load state `[\w.]*{state}`.*expected shape.*got"):
        target.load_state_dict(source.state_dict())
    for key, value in target.state_dict().items():
        if key in before:
            assert torch.equal(value, before[key])


def test_loading_per_item_rows_of_another_component_count_is_an_error(generator):
    source, target = sm.L1AbsoluteLoss(2, keep_batch_dim=True), sm.L1AbsoluteLoss(3, keep_batch_dim=True)
    source.update(torch.rand(4, 2, 6, generator=generator))
    for metric in (source, target):
        metric.persistent(True)
    state = source.state_dict()
    state["l1_sum"] = torch.zeros(3, dtype=torch.float64)  # only the per-item rows disagree
    with pytest.raises(
        ValueError, match=r"Cannot load state `l1_per_item`.*expected shape \['\*', 3\], got \['\*', 2\]"
    ):
        target.load_state_dict(state)
    assert target.l1_per_item == []
