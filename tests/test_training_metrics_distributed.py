"""The training metrics on two real gloo processes: equal to one process on all the data, an empty rank included."""

from typing import Any

import pytest
import torch

import sparse_metrics as sm
from tests import reference
from tests.distributed import run_on_ranks

pytestmark = pytest.mark.distributed

D_MODEL, D_SAE = 4, 10

#: rank -> batch sizes; "empty": rank 1 sees no batch at all.
SPLITS = {"uneven": [[5, 3], [7]], "empty": [[4, 1, 6], []], "zero_rows": [[2], [0, 3]]}

POOLED = {
    "fvu": lambda c, **kw: sm.FractionOfVarianceUnexplained(c, d_model=D_MODEL, **kw),
    "explained_variance": lambda c, **kw: sm.ExplainedVariance(c, d_model=D_MODEL, **kw),
    "density": lambda c, **kw: sm.FeatureDensity(D_SAE, c, **kw),
}


def _batches(components: int, sizes: list[int], seed: int, offset: float) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in sizes:
        source = offset + torch.randn(size, components, D_MODEL, generator=generator, dtype=torch.float64)
        batch = {
            "source_activations": source,
            "decoded_activations": source + 0.3 * torch.randn(size, components, D_MODEL, generator=generator),
            "learned_activations": reference.sparse_activations(
                size, components, D_SAE, density=0.1, generator=generator
            ),
        }
        if components == 1:
            batch = {k: v.squeeze(1) for k, v in batch.items()}
        batches.append(batch)
    return batches


def _mine(rank: int, split: str, components: int, offset: float = 0.0):
    sizes_by_rank = SPLITS[split]
    every = _batches(components, [n for sizes in sizes_by_rank for n in sizes], seed=components, offset=offset)
    by_rank, start = [], 0
    for sizes in sizes_by_rank:
        by_rank.append(every[start : start + len(sizes)])
        start += len(sizes)
    return every, by_rank[rank], by_rank


def _with_component_axis(tensor: torch.Tensor, components: int) -> torch.Tensor:
    return tensor.unsqueeze(1) if components == 1 else tensor


def _compare_with_one_process(rank: int, world_size: int, split: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for components in (1, 3):
        for offset in (0.0, 1e6):
            every, mine, _ = _mine(rank, split, components, offset)
            for name, factory in POOLED.items():
                metric, single = factory(components), factory(components, sync_on_compute=False)
                for index, batch in enumerate(mine):  # mix forward and update
                    metric(**batch) if index % 2 else metric.update(**batch)
                for batch in every:
                    single.update(**batch)
                synced = metric.compute()
                tolerance = 1e-11 if name != "density" else 0
                torch.testing.assert_close(synced, single.compute(), rtol=tolerance, atol=0, msg=name)
                if name == "density":
                    torch.testing.assert_close(metric.mean_log10_density(), single.mean_log10_density(), rtol=0, atol=0)
                results[f"{name}/{components}/{offset}"] = synced
        # Dead features: the lockstep rule on the ranks' own streams, checked against a walk over the items.
        _, mine, by_rank = _mine(rank, split, components)
        metric = sm.DeadFeatures(D_SAE, components, window=5)
        for index, batch in enumerate(mine):
            metric(**batch) if index % 2 else metric.update(**batch)
        streams = [
            torch.cat([_with_component_axis(b["learned_activations"], components) for b in batches])
            if batches
            else torch.zeros(0, components, D_SAE)
            for batches in by_rank
        ]
        expected = reference.lockstep_items_since_fired(streams)
        if components == 1:
            expected = expected.squeeze(0)
        assert torch.equal(metric.items_since_fired(), expected)
        assert torch.equal(metric.dead_mask(), expected >= 5)
        assert torch.equal(metric.compute(), (expected >= 5).sum(-1))
        results[f"dead/{components}"] = metric.items_since_fired()
        # compute() left the local counters in place: one more batch goes on from them.
        local = metric.dead_counters.clone()
        metric.update(**_batches(components, [1], seed=99, offset=0.0)[0])
        assert torch.equal(metric.dead_counters[:, -1], local[:, -1] + 1)
    return results


@pytest.mark.parametrize("split", list(SPLITS))
def test_two_ranks_equal_one_process(split):
    rank0, rank1 = run_on_ranks(_compare_with_one_process, split)
    assert rank0.keys() == rank1.keys()
    for key in rank0:  # every rank merges the same packets in the same order: bitwise identical
        assert torch.equal(rank0[key], rank1[key]), key


def _peer_example(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    source = torch.tensor([[0.0], [2.0]]) if rank == 0 else torch.tensor([[4.0], [6.0]])
    decoded = torch.tensor([[1.0], [1.0]]) if rank == 0 else torch.tensor([[5.0], [5.0]])
    fvu, explained = sm.FractionOfVarianceUnexplained(d_model=1), sm.ExplainedVariance(d_model=1)
    local = sm.FractionOfVarianceUnexplained(d_model=1, sync_on_compute=False)
    for metric in (fvu, explained, local):
        metric.update(decoded, source)
    return {"fvu": fvu.compute(), "explained_variance": explained.compute(), "local": local.compute()}


def test_peer_example_pooled_across_ranks():
    for result in run_on_ranks(_peer_example):
        torch.testing.assert_close(result["fvu"], torch.tensor(0.2, dtype=torch.float64))
        torch.testing.assert_close(result["explained_variance"], torch.tensor(0.8, dtype=torch.float64))
        torch.testing.assert_close(result["local"], torch.tensor(1.0, dtype=torch.float64))  # what per-rank gives


def _collection(rank: int, world_size: int, split: str) -> dict[str, torch.Tensor]:
    every, mine, _ = _mine(rank, split, 2)

    def make(**kwargs: Any) -> sm.SparseAutoencoderLoss:
        return sm.SparseAutoencoderLoss(
            2,
            0.1,
            explained_variance=True,
            d_model=D_MODEL,
            feature_density=True,
            dead_feature_window=3,
            num_features=D_SAE,
            **kwargs,
        )

    loss_fn, single = make(), make(sync_on_compute=False)
    for index, batch in enumerate(mine):
        loss_fn(**batch) if index % 2 else loss_fn.update(**batch)
    for batch in every:
        single.update(**batch)
    synced, expected = loss_fn.compute(), single.compute()
    for key, value in expected.items():
        if key != "dead_features":  # lockstep rule, checked above
            torch.testing.assert_close(synced[key], value, rtol=1e-9, atol=1e-12, msg=key)
    return synced


@pytest.mark.parametrize("split", ["empty"])
def test_collection_with_training_metrics_on_two_ranks(split):
    rank0, rank1 = run_on_ranks(_collection, split)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
