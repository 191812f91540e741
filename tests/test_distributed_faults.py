"""Distributed edge cases on real gloo process groups: uneven ranks, empty ranks, misuse, device moves.

Each spawn costs seconds, so one worker runs many scenarios and returns what the parent checks.
"""

import datetime
import re
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

import sparse_metrics as sm
from tests import tester
from tests.distributed import run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")]

C = 2


def _make(case: tester.Case, keep_batch_dim: bool = False, **kwargs: Any) -> Any:
    return case(C, **({"keep_batch_dim": True} if keep_batch_dim and case.keep_batch_dim else {}), **kwargs)


def _batches(sizes: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return tester.batches(sizes, C, seed=seed)


#: scenario -> batch sizes per rank (for 2 or 3 ranks). Ranks call update a different number of times, one may have
#: no update at all, only empty batches, or only items that nan_strategy="ignore" drops (an empty per-item state).
SCENARIOS = {
    "different_counts_and_sizes": [[5, 1, 2, 7], [3], [2, 2]],
    "rank_without_update": [[4, 2], [], [1]],
    "rank_with_only_empty_batches": [[0, 0], [3, 4], []],
    "rank_with_only_dropped_items": [[2, 3], ["nan"], [4]],
}


def _rank_batches(sizes: list[Any], seed: int) -> list[dict[str, torch.Tensor]]:
    batches = _batches([3 if size == "nan" else size for size in sizes], seed)
    for size, batch in zip(sizes, batches, strict=True):
        if size == "nan":  # every item non-finite: all dropped under nan_strategy="ignore"
            for key in tester.ACTIVATIONS:  # every input with a batch axis
                batch[key] = torch.full_like(batch[key], float("nan"))
    return batches


def _scenarios(rank: int, world_size: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for scenario, all_splits in SCENARIOS.items():
        split = all_splits[:world_size]
        for case in tester.CASES.values():
            for keep_batch_dim in (False, True) if case.keep_batch_dim else (False,):
                metric = _make(case, keep_batch_dim, nan_strategy="ignore")
                for index, batch in enumerate(_rank_batches(split[rank], seed=rank)):
                    metric(**batch) if index % 2 else metric.update(**batch)
                synced = tester.outputs(case, metric)
                # The references: every rank's finite batches, by rank; and one process fed them in rank order.
                finite = [
                    [b for b in _rank_batches(split[other], seed=other) if not b["learned_activations"].isnan().any()]
                    for other in range(world_size)
                ]
                if not any(finite):
                    finite[0].append(tester.rows(_batches([1])[0], slice(0, 0)))
                message = f"{scenario} {case.name} keep_batch_dim={keep_batch_dim}"
                tester.assert_close(synced, case.expected(*finite, keep_batch_dim=keep_batch_dim), msg=message)
                single = _make(case, keep_batch_dim, nan_strategy="ignore", sync_on_compute=False)
                for batch in (b for batches in finite for b in batches):
                    single.update(**batch)
                expected = tester.outputs(case, single)
                for key in set(expected) - case.lifetime:  # the dead-feature counters combine ranks in lockstep
                    torch.testing.assert_close(synced[key], expected[key], rtol=1e-6, atol=1e-9, msg=message)
                results[f"{scenario}/{case.name}/{keep_batch_dim}"] = synced
    return results


@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_uneven_and_empty_ranks_give_the_exact_one_process_result(world_size):
    results = run_on_ranks(_scenarios, world_size=world_size)
    for other in results[1:]:  # bitwise identical on every rank
        assert other.keys() == results[0].keys()
        for key, values in results[0].items():
            tester.assert_identical(other[key], values, msg=key)


def _compute_on_one_rank(rank: int, world_size: int) -> str:
    """Rank 0 calls compute(), rank 1 does not: with a short group timeout rank 0 gets an error, not a hang."""
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=2))
    metric = sm.L2ReconstructionLoss(C, process_group=group)
    metric.update(**{k: v for k, v in _batches([3], seed=rank)[0].items() if k != "decoder_weight"})
    outcome = "not called"
    if rank == 0:
        start = time.monotonic()
        try:
            metric.compute()
            outcome = "returned"
        except RuntimeError as error:
            outcome = f"error after {time.monotonic() - start:.1f}s: {type(error).__name__}"
    dist.barrier()  # on the default group: the ranks meet again once rank 0 has timed out
    return outcome


def test_compute_on_only_some_ranks_times_out_instead_of_hanging():
    outcomes = run_on_ranks(_compute_on_one_rank)
    assert outcomes[1] == "not called"
    waited = re.match(r"error after ([\d.]+)s", outcomes[0])
    assert waited is not None, outcomes[0]
    assert float(waited.group(1)) < 60  # the 2 s group timeout, not the default group's 120 s


def _device_moves_and_local_values(rank: int, world_size: int) -> dict[str, Any]:
    batches = _batches([3 + rank, 2], seed=rank)
    results: dict[str, Any] = {}
    for case in tester.CASES.values():
        moved = _make(case, keep_batch_dim=True)
        moved.update(**batches[0])
        # A parent module cast to half precision, then back: states keep float64/int64 and their values.
        parent = torch.nn.ModuleDict({"metric": moved}).to(torch.bfloat16).to("cpu").to(torch.float32)
        moved = parent["metric"]
        for member in tester.members(moved):
            for key, value in member.metric_state.items():
                rows = value if isinstance(value, list) else [value]
                assert all(row.dtype in (torch.float64, torch.int64) for row in rows), (case.name, key)
        moved.update(**batches[1])
        plain = _make(case, keep_batch_dim=True)
        for batch in batches:
            plain.update(**batch)
        tester.assert_identical(tester.outputs(case, moved), tester.outputs(case, plain), msg=case.name)
        local = _make(case, sync_on_compute=False)
        for batch in batches:
            local.update(**batch)
        # This rank's items only: the reference of its own batches.
        tester.assert_close(tester.outputs(case, local), case.expected(batches), msg=case.name)
        results[case.name] = tester.outputs(case, local)
    return results


def test_device_moves_keep_states_and_sync_on_compute_false_is_rank_local():
    rank0, rank1 = run_on_ranks(_device_moves_and_local_values)
    assert rank0.keys() == set(tester.CASES)
    for name, values in rank0.items():
        assert any(not torch.equal(values[key], rank1[name][key]) for key in values), name  # ranks differ


def test_meta_round_trip_keeps_dtypes():
    metric = tester.CASES["collection_matryoshka"](C, keep_batch_dim=True)
    metric.update(**_batches([2])[0])
    metric.to("meta")
    for member in metric.values(copy_state=False):
        for value in member.metric_state.values():
            for row in value if isinstance(value, list) else [value]:
                assert row.device.type == "meta"
                assert row.dtype in (torch.float64, torch.int64)
    metric.to_empty(device="cpu").reset()  # meta tensors hold no data: torch's way back is to_empty
    metric.update(**_batches([2])[0])
    assert all(torch.isfinite(value).all() for value in metric.compute().values())
