"""Properties of every registered case (``tests/tester.py``), checked by hypothesis on random configurations.

- Any split of the same items into batches, and of the batches over 1-3 ranks, gives the reference ``compute()``.
  Ranks are simulated by threads exchanging bytes through the packed sync's own code path
  (:func:`sparse_metrics._distributed.sync_states` with a stand-in for ``torch.distributed``); real gloo runs are in
  ``test_tester.py`` and ``test_distributed_faults.py``.
- Per-item values are equivariant, pooled values invariant, under permuting the items.
- Component ``c`` of a multi-component metric equals a one-component metric fed only component ``c``.

(``forward``'s batch value equals a fresh metric's ``update`` + ``compute``: a generic check in ``test_tester.py``.)
"""

import threading
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparse_metrics as sm
from sparse_metrics import _distributed
from tests import reference, tester

pytestmark = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning")  # a rank with no batch
PROPERTY_SETTINGS = settings(
    deadline=None, max_examples=30, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
#: The keys that hold per-item rows with keep_batch_dim=True (a metric's value; the collection's loss terms).
ROW_KEYS = {"value", "l2", "l0", "l1", "sparsity", "matryoshka"}


def _synced_in_threads(rank_metrics: list[Any]) -> None:
    """Reduce the states of one metric (or collection) per simulated rank, in place, as ``compute()`` would.

    Each rank runs :func:`sync_states` in its own thread; the stand-in ``all_gather`` hands every rank the buffers of
    all ranks, in rank order, as gloo does, and the stand-in ``all_reduce`` their sum or maximum.
    """
    world_size = len(rank_metrics)
    barrier = threading.Barrier(world_size)
    slots: list[Any] = [None] * world_size
    errors: list[BaseException] = []

    def all_gather(gathered: list[torch.Tensor], buffer: torch.Tensor, group: int) -> None:
        slots[group] = buffer.clone()
        barrier.wait()
        for index, slot in enumerate(slots):
            gathered[index].copy_(slot)
        barrier.wait()  # nobody overwrites a slot before every rank has read it

    def all_reduce(buffer: torch.Tensor, op: str, group: int) -> None:
        slots[group] = buffer.clone()
        barrier.wait()
        stacked = torch.stack(slots)
        buffer.copy_(stacked.amax(dim=0) if op == "max" else stacked.sum(dim=0))  # the same order on every rank
        barrier.wait()

    fake_dist = SimpleNamespace(
        get_world_size=lambda group: world_size,
        get_rank=lambda group: group,
        all_gather=all_gather,
        all_reduce=all_reduce,
        ReduceOp=SimpleNamespace(MAX="max", SUM="sum"),
    )

    def run(rank: int) -> None:
        try:  # the "process group" is the rank: the stand-in needs it
            _distributed.sync_states(tester.members(rank_metrics[rank]), rank)
        except BaseException as error:  # surfaced in the main thread
            errors.append(error)
            barrier.abort()

    original = _distributed.dist
    _distributed.dist = fake_dist  # type: ignore[assignment]
    try:
        threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        _distributed.dist = original
    if errors:
        raise errors[0]


@st.composite
def _splits(draw: Any) -> list[list[int]]:
    """Batch sizes per rank: 1-12 items cut into batches (empty ones allowed), the batches dealt in order to 1-3
    ranks (a rank may get none)."""
    items = draw(st.integers(1, 12))
    cuts = sorted(draw(st.lists(st.integers(0, items), max_size=5)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, items], strict=True)]
    world_size = draw(st.integers(1, 3))
    rank_cuts = sorted(draw(st.lists(st.integers(0, len(sizes)), min_size=world_size - 1, max_size=world_size - 1)))
    return [sizes[a:b] for a, b in zip([0, *rank_cuts], [*rank_cuts, len(sizes)], strict=True)]


def _kwargs(case: tester.Case, keep_batch_dim: bool) -> dict[str, Any]:
    return {"keep_batch_dim": keep_batch_dim} if case.keep_batch_dim else {}


@pytest.mark.parametrize("case", tester.params())
@PROPERTY_SETTINGS
@given(
    split=_splits(),
    components=st.integers(1, 3),
    keep_batch_dim=st.booleans(),
    use_forward=st.lists(st.booleans(), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_any_split_over_batches_and_ranks_gives_the_reference(
    case, split, components, keep_batch_dim, use_forward, seed
):
    sizes = [size for rank_sizes in split for size in rank_sizes]
    inputs = tester.batches([sum(sizes)], components, seed=seed)[0]
    keep_batch_dim = keep_batch_dim and case.keep_batch_dim
    rank_metrics, by_rank, start, step = [], [], 0, 0
    for rank_sizes in split:
        metric = case(components, sync_on_compute=False, **_kwargs(case, keep_batch_dim))
        by_rank.append([])
        for size in rank_sizes:
            batch = tester.rows(inputs, slice(start, start + size))
            metric(**batch) if use_forward[step % len(use_forward)] else metric.update(**batch)
            by_rank[-1].append(batch)
            start, step = start + size, step + 1
        rank_metrics.append(metric)
    if len(split) > 1:
        _synced_in_threads(rank_metrics)
    if not any(by_rank):  # no batch anywhere: the reference needs one (empty) to know the component count
        by_rank[0].append(tester.rows(inputs, slice(0, 0)))
    expected = case.expected(*by_rank, keep_batch_dim=keep_batch_dim)
    for metric in rank_metrics:  # every rank holds the same reduced state
        tester.assert_close(tester.outputs(case, metric), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", tester.params())
@PROPERTY_SETTINGS
@given(data=st.data(), items=st.integers(1, 9), components=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_per_item_values_are_equivariant_and_pooled_values_invariant_under_permutation(
    case, data, items, components, seed
):
    permutation = data.draw(st.permutations(range(items)))
    inputs = tester.batches([items], components, seed=seed)[0]
    kwargs = _kwargs(case, keep_batch_dim=True)
    original = tester.forward_outputs(case(components, **kwargs)(**inputs))
    permuted = tester.forward_outputs(case(components, **kwargs)(**tester.rows(inputs, torch.tensor(permutation))))
    for key, value in original.items():
        if key in case.lifetime:  # the dead-feature counters depend on the order of the items, by definition
            continue
        expected = value[list(permutation)] if case.keep_batch_dim and key in ROW_KEYS else value
        torch.testing.assert_close(permuted[key], expected, rtol=1e-5, atol=1e-6, equal_nan=True, msg=key)


@pytest.mark.parametrize("case", tester.params())
@PROPERTY_SETTINGS
@given(
    batches=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    components=st.integers(2, 3),
    keep_batch_dim=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_each_component_equals_a_one_component_metric(case, batches, components, keep_batch_dim, seed):
    inputs = tester.batches([sum(batches)], components, seed=seed)[0]
    kwargs = _kwargs(case, keep_batch_dim)
    many = case(components, **kwargs)
    singles = [case(1, **kwargs) for _ in range(components)]
    coefficient = getattr(many, "sparsity_coefficient", None)
    if isinstance(coefficient, torch.Tensor):  # one coefficient per component: the single one gets its own
        for component, single in enumerate(singles):
            single.sparsity_coefficient = coefficient[component : component + 1]
    start = 0
    for size in batches:
        batch = tester.rows(inputs, slice(start, start + size))
        many.update(**batch)
        for component, single in enumerate(singles):
            single.update(**reference.without_component_axis(batch, component))
        start += size
    together = tester.outputs(case, many)
    alone = [tester.outputs(case, single) for single in singles]
    for key in set(together) - {"loss"}:  # "loss" reduces the per-component totals: below
        axis = 1 if keep_batch_dim and case.keep_batch_dim and key in ROW_KEYS else 0  # after the item axis of rows
        for component, outputs in enumerate(alone):
            torch.testing.assert_close(
                together[key].select(axis, component), outputs[key], rtol=1e-6, atol=1e-9, equal_nan=True, msg=key
            )
    if isinstance(many, sm.SparseAutoencoderLoss):
        per_component = torch.stack([outputs["loss"] for outputs in alone])
        reduced = per_component.mean() if many["loss"].component_reduction == "mean" else per_component.sum()
        torch.testing.assert_close(together["loss"], reduced, rtol=1e-6, atol=1e-9, equal_nan=True)
