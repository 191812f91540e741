"""Two real gloo processes: what is particular to the distributed sync beyond the generic check.

That every registered case on 2 ranks (uneven, empty, zero-row ranks) equals one process, bitwise equal on both,
is the generic check ``test_two_gloo_ranks_equal_one_process`` in ``test_tester.py``; rank-local values with
``sync_on_compute=False`` are checked in ``test_distributed_faults.py``. Here: the number of collective calls, the
FVU's pooled ratio across ranks (the peer counter-example and exactness at a large offset), and a state the packed
sync cannot carry.
"""

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torchmetrics import Metric

import sparse_metrics as sm
from sparse_metrics import _distributed
from tests import reference, tester
from tests.distributed import run_on_ranks
from tests.tester import D_MODEL, D_SAE

pytestmark = pytest.mark.distributed


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
        batches = tester.batches([4 + rank, 2], 3)
        loss_fn = sm.SparseAutoencoderLoss(3, 0.1, matryoshka_prefix_sizes=[8, D_SAE], keep_batch_dim=keep_batch_dim)
        # Every training metric on top; rank 1 sees no batch at all.
        training = sm.SparseAutoencoderLoss(
            3,
            0.1,
            matryoshka_prefix_sizes=[8, D_SAE],
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
            metric = sm.MatryoshkaReconstructionLoss([8, D_SAE], 3, keep_batch_dim=keep_batch_dim)
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
        assert calls == {  # the layout check, then one all_reduce(SUM) of every state of every member
            "collection keep_batch_dim=False": 2,
            "metric keep_batch_dim=False": 2,
            "collection keep_batch_dim=True": 2,  # the per-item rows travel in the same buffer
            "metric keep_batch_dim=True": 2,
            # and one all_reduce(MAX) before it: the FVU's shift and the dead features' most recent firings
            "training collection keep_batch_dim=False": 3,
            "training collection keep_batch_dim=True": 3,
        }


def _fvu_on_two_ranks(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    # The peer counter-example: rank 0 with x = [0, 2], x_hat = [1, 1]; rank 1 with x = [4, 6], x_hat = [5, 5].
    source = torch.tensor([[0.0], [2.0]]) if rank == 0 else torch.tensor([[4.0], [6.0]])
    decoded = torch.tensor([[1.0], [1.0]]) if rank == 0 else torch.tensor([[5.0], [5.0]])
    fvu, explained = sm.FractionOfVarianceUnexplained(d_model=1), sm.ExplainedVariance(d_model=1)
    local = sm.FractionOfVarianceUnexplained(d_model=1, sync_on_compute=False)
    for metric in (fvu, explained, local):
        metric.update(decoded, source)
    results = {"fvu": fvu.compute(), "explained_variance": explained.compute(), "local": local.compute()}
    # Exact across ranks at a 1e6 offset: the ranks' statistics are merged with Chan's formula, in float64.
    every = tester.batches([50, 3, 200, 17], 2, seed=8, dtype=torch.float64)
    shift = 1e6 + torch.linspace(-2, 2, D_MODEL, dtype=torch.float64)
    every = [
        {k: v + shift if k in ("source_activations", "decoded_activations") else v for k, v in b.items()} for b in every
    ]
    offset = sm.FractionOfVarianceUnexplained(2, d_model=D_MODEL)
    for batch in every[2 * rank : 2 * rank + 2]:
        offset.update(**batch)
    all_items = tester.concatenated(every)
    expected = reference.fvu(all_items["decoded_activations"], all_items["source_activations"])
    torch.testing.assert_close(offset.compute(), expected, rtol=1e-11, atol=0)
    return results | {"offset": offset.compute()}


def test_fvu_is_the_pooled_ratio_across_ranks():
    """sparsify's DDP value would be the mean of the per-rank ratios (1.0); the pooled ratio is 0.2."""
    rank0, rank1 = run_on_ranks(_fvu_on_two_ranks)
    for result in (rank0, rank1):
        torch.testing.assert_close(result["fvu"], torch.tensor(0.2, dtype=torch.float64))
        torch.testing.assert_close(result["explained_variance"], torch.tensor(0.8, dtype=torch.float64))
        torch.testing.assert_close(result["local"], torch.tensor(1.0, dtype=torch.float64))  # what per-rank gives
    assert torch.equal(rank0["offset"], rank1["offset"])


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
