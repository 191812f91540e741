"""Two real processes on the gloo backend give the answer one process gives on all the data."""

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torchmetrics import Metric

import sparse_metrics as sm
from sparse_metrics import _distributed
from tests import reference
from tests.distributed import run_on_ranks

pytestmark = pytest.mark.distributed

D_MODEL, D_SAE = 6, 16

#: name -> factory(num_components, keep_batch_dim, **metric kwargs)
FACTORIES = {
    "l2_mean": lambda c, k, **kw: sm.L2ReconstructionLoss(c, keep_batch_dim=k, **kw),
    "l2_sum": lambda c, k, **kw: sm.L2ReconstructionLoss(c, keep_batch_dim=k, feature_reduction="sum", **kw),
    "l1": lambda c, k, **kw: sm.L1AbsoluteLoss(c, keep_batch_dim=k, **kw),
    "l0": lambda c, k, **kw: sm.L0NormMetric(c, keep_batch_dim=k, **kw),
    "sparsity": lambda c, k, **kw: sm.SparsityLoss(0.2, c, keep_batch_dim=k, **kw),
    "matryoshka": lambda c, k, **kw: sm.MatryoshkaReconstructionLoss([4, 8, 16], c, keep_batch_dim=k, **kw),
    "collection": lambda c, k, **kw: sm.SparseAutoencoderLoss(
        c, 0.2, matryoshka_prefix_sizes=[4, 16], keep_batch_dim=k, **kw
    ),
}

#: rank -> batch sizes; "empty": rank 1 sees no batch at all.
SPLITS = {"uneven": [[5, 3], [7]], "empty": [[4, 1, 6], []], "zero_rows": [[2], [0, 3]]}


def _batches(components: int, sizes: list[int], seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(components, D_SAE, D_MODEL, generator=generator)
    bias = torch.randn(components, D_MODEL, generator=generator)
    batches = []
    for size in sizes:
        source = torch.randn(size, components, D_MODEL, generator=generator)
        batch = {
            "source_activations": source,
            "decoded_activations": source + 0.3 * torch.randn(size, components, D_MODEL, generator=generator),
            "learned_activations": reference.sparse_activations(size, components, D_SAE, generator=generator),
            "decoder_weight": weight,
            "decoder_bias": bias,
        }
        if components == 1:
            batch = {k: v.squeeze(1) if k.endswith("activations") else v.squeeze(0) for k, v in batch.items()}
        batches.append(batch)
    return batches


def _as_dict(value: Any) -> dict[str, torch.Tensor]:
    return value if isinstance(value, dict) else {"value": value}


def _compare_with_one_process(rank: int, world_size: int, split: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, factory in FACTORIES.items():
        for components in (1, 3):
            for keep_batch_dim in (False, True):
                sizes_by_rank = SPLITS[split]
                all_batches = _batches(components, [n for sizes in sizes_by_rank for n in sizes], seed=components)
                start = sum(len(sizes) for sizes in sizes_by_rank[:rank])
                mine = all_batches[start : start + len(sizes_by_rank[rank])]
                metric = factory(components, keep_batch_dim)
                for index, batch in enumerate(mine):  # mix forward and update
                    metric(**batch) if index % 2 else metric.update(**batch)
                synced = _as_dict(metric.compute())
                single = factory(components, keep_batch_dim, sync_on_compute=False)
                for batch in all_batches:
                    single.update(**batch)
                expected = _as_dict(single.compute())
                assert synced.keys() == expected.keys()
                for key, value in expected.items():
                    torch.testing.assert_close(synced[key], value, rtol=1e-6, atol=1e-9, msg=f"{name} {key}")
                if name == "matryoshka":
                    torch.testing.assert_close(
                        metric.compute_prefix_losses(), single.compute_prefix_losses(), rtol=1e-6, atol=1e-9
                    )
                # compute() restored the local state: accumulation goes on rank-locally.
                if mine:
                    metric.update(**mine[0])
                results[f"{name}/{components}/{keep_batch_dim}"] = synced
    return results


@pytest.mark.parametrize("split", list(SPLITS))
def test_two_ranks_equal_one_process(split):
    rank0, rank1 = run_on_ranks(_compare_with_one_process, split)
    # Every rank reduces the same bytes in the same order: results are bitwise identical.
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        for name, value in rank0[key].items():
            assert torch.equal(value, rank1[key][name]), (key, name)


_COLLECTIVES = (
    "all_gather",
    "all_reduce",
    "barrier",
    "broadcast",
    "all_gather_object",
    "all_gather_into_tensor",
    "reduce_scatter",
    "gather",
    "scatter",
    "all_to_all",
    "broadcast_object_list",
)


def _count_collectives(rank: int, world_size: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}

    def counting(name: str):
        def call(*args: Any, **kwargs: Any) -> Any:
            counts[name] = counts.get(name, 0) + 1
            return originals[name](*args, **kwargs)

        return call

    calls: dict[str, int] = {}
    for keep_batch_dim in (False, True):
        batches = _batches(3, [4 + rank, 2], seed=0)
        loss_fn = sm.SparseAutoencoderLoss(3, 0.1, matryoshka_prefix_sizes=[8, 16], keep_batch_dim=keep_batch_dim)
        # Every training metric on top; rank 1 sees no batch at all.
        training = sm.SparseAutoencoderLoss(
            3,
            0.1,
            matryoshka_prefix_sizes=[8, 16],
            keep_batch_dim=keep_batch_dim,
            explained_variance=True,
            d_model=D_MODEL,
            feature_density=True,
            dead_feature_window=4,
            num_features=D_SAE,
        )
        for batch in batches:
            loss_fn(**batch)
            if rank == 0:
                training(**batch)
        for name in _COLLECTIVES:
            setattr(dist, name, counting(name))
        try:
            counts.clear()
            loss_fn.compute()
            calls[f"collection keep_batch_dim={keep_batch_dim}"] = sum(counts.values())
            counts.clear()
            training.compute()
            calls[f"training collection keep_batch_dim={keep_batch_dim}"] = sum(counts.values())
            metric = sm.MatryoshkaReconstructionLoss([8, 16], 3, keep_batch_dim=keep_batch_dim)
            metric.update(**batches[0])
            counts.clear()
            metric.compute()
            calls[f"metric keep_batch_dim={keep_batch_dim}"] = sum(counts.values())
        finally:
            for name, original in originals.items():
                setattr(dist, name, original)
    return calls


def test_compute_makes_at_most_two_collective_calls():
    for calls in run_on_ranks(_count_collectives):
        assert calls == {  # the layout check, then every state of every member in one buffer
            "collection keep_batch_dim=False": 2,
            "metric keep_batch_dim=False": 2,
            "collection keep_batch_dim=True": 2,  # the per-item rows travel in the same buffer
            "metric keep_batch_dim=True": 2,
            "training collection keep_batch_dim=False": 2,
            "training collection keep_batch_dim=True": 2,
        }


def _local_and_synced(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    batch = _batches(1, [3], seed=rank)[0]
    local = sm.L2ReconstructionLoss(sync_on_compute=False)
    synced = sm.L2ReconstructionLoss()
    for metric in (local, synced):
        metric.update(**batch)
    expected_local = reference.per_item_l2(batch["decoded_activations"][:, None], batch["source_activations"][:, None])
    torch.testing.assert_close(local.compute(), expected_local.mean())
    return {"local": local.compute(), "synced": synced.compute()}


def test_sync_on_compute_false_gives_rank_local_values():
    rank0, rank1 = run_on_ranks(_local_and_synced)
    assert not torch.equal(rank0["local"], rank1["local"])
    assert torch.equal(rank0["synced"], rank1["synced"])
    torch.testing.assert_close(rank0["synced"], (rank0["local"] + rank1["local"]) / 2)


def test_packed_sync_rejects_a_tensor_state_reduced_by_cat():
    """Such a state would need the same shape on every rank; the packed sync says so instead of hanging."""

    class Rows(Metric):
        def __init__(self) -> None:
            super().__init__()
            self.add_state("rows", torch.zeros(0), dist_reduce_fx="cat")

        def update(self) -> None: ...

        def compute(self) -> torch.Tensor:
            return self.rows

    with pytest.raises(TypeError, match=r"Rows\.rows: packed sync supports .* got a Tensor state"):
        _distributed._collect([Rows()])
