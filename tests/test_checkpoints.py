"""Checkpoints: save mid-epoch, resume in a fresh process, get exactly the uninterrupted result; copies."""

import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import sparse_metrics as sm
from tests import reference
from tests.distributed import run_on_ranks

ROOT = Path(__file__).resolve().parent.parent
C, D_MODEL, D_SAE = 2, 5, 12

#: name -> factory(keep_batch_dim): each metric configured away from its defaults, so that config mix-ups show.
FACTORIES = {
    "l2": lambda k: sm.L2ReconstructionLoss(C, keep_batch_dim=k, feature_reduction="sum"),
    "l1": lambda k: sm.L1AbsoluteLoss(C, keep_batch_dim=k),
    "l0": lambda k: sm.L0NormMetric(C, keep_batch_dim=k),
    "sparsity": lambda k: sm.SparsityLoss(torch.tensor([0.1, 0.3]), C, keep_batch_dim=k),
    "matryoshka": lambda k: sm.MatryoshkaReconstructionLoss([4, 12], C, keep_batch_dim=k, prefix_weights=[2.0, 1.0]),
    "collection": lambda k: sm.SparseAutoencoderLoss(C, 0.2, matryoshka_prefix_sizes=[6, 12], keep_batch_dim=k),
}


def _batches(seed: int, sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    return reference.sae_batches(sizes, seed, components=C, d_model=D_MODEL, d_sae=D_SAE)


def _metric(name: str, keep_batch_dim: bool, **kwargs: Any) -> Any:
    metric = FACTORIES[name](keep_batch_dim)
    for key, value in kwargs.items():
        for member in metric.values(copy_state=False) if isinstance(metric, sm.SparseAutoencoderLoss) else [metric]:
            setattr(member, key, value)
    metric.persistent(True)  # states are in the state_dict only when persistent (torchmetrics' default: not)
    return metric


BATCH_SIZES = [4, 3, 0, 5, 2]
SAVE_AFTER = 2


def _save_mid_epoch(directory: str, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Run every metric over the first batches, save it, go on uninterrupted; return the uninterrupted results."""
    batches = _batches(seed, BATCH_SIZES)
    results = {}
    for name in FACTORIES:
        for keep_batch_dim in (False, True):
            metric = _metric(name, keep_batch_dim)
            for batch in batches[:SAVE_AFTER]:
                metric(**batch)
            torch.save(metric.state_dict(), os.path.join(directory, f"{name}_{keep_batch_dim}.pt"))
            for batch in batches[SAVE_AFTER:]:
                metric.update(**batch)
            results[f"{name}_{keep_batch_dim}"] = reference.as_dict(metric.compute())
    return results


def _resume(directory: str, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """In a fresh process: load every saved state (weights only) into a fresh metric and finish the epoch."""
    batches = _batches(seed, BATCH_SIZES)
    results = {}
    for name in FACTORIES:
        for keep_batch_dim in (False, True):
            metric = _metric(name, keep_batch_dim)
            state = torch.load(os.path.join(directory, f"{name}_{keep_batch_dim}.pt"), weights_only=True)
            metric.load_state_dict(state)
            for batch in batches[SAVE_AFTER:]:
                metric.update(**batch)
            results[f"{name}_{keep_batch_dim}"] = reference.as_dict(metric.compute())
    return results


def _assert_identical(resumed: dict[str, Any], uninterrupted: dict[str, Any]) -> None:
    assert resumed.keys() == uninterrupted.keys()
    for key, values in uninterrupted.items():
        assert resumed[key].keys() == values.keys(), key
        for name, value in values.items():
            assert torch.equal(resumed[key][name], value), (key, name)


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


@pytest.mark.parametrize("name", list(FACTORIES))
def test_pickle_deepcopy_and_clone_round_trips(name):
    batches = _batches(1, [3, 4])
    metric = FACTORIES[name](True)
    metric(**batches[0])
    renamed = metric.clone(prefix="val_") if name == "collection" else metric.clone()
    copies = [pickle.loads(pickle.dumps(metric)), copy.deepcopy(metric), metric.clone(), renamed]
    for copied in copies:
        copied.update(**batches[1])
    metric.update(**batches[1])
    expected = reference.as_dict(metric.compute())
    for copied in copies:
        result = reference.as_dict(copied.compute())
        if name == "collection" and copied is copies[-1]:
            result = {key.removeprefix("val_"): value for key, value in result.items()}
            assert all(key.startswith("val_") for key in reference.as_dict(copied.compute()))
        _assert_identical({"": result}, {"": expected})
    # Copies are independent: updating one leaves the original alone.
    copies[0].update(**batches[0])
    _assert_identical({"": reference.as_dict(metric.compute())}, {"": expected})
