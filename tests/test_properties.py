"""Properties, checked by hypothesis on random configurations.

- Any split of the same items into batches, and of the batches over 1-3 ranks, gives the one-batch ``compute()``.
  Ranks are simulated by threads exchanging bytes through the packed sync's own code path
  (:func:`sparse_metrics._distributed.sync_states` with a stand-in for ``torch.distributed``); real gloo runs with 2
  and 3 processes are in ``test_distributed.py`` and ``test_distributed_faults.py``.
- Per-item values are equivariant under permuting the items.
- Component ``c`` of a multi-component metric equals a one-component metric fed only component ``c``.
- ``forward``'s batch value equals a fresh metric's ``update`` + ``compute`` on that batch.
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
from tests import reference

D_MODEL, D_SAE, PREFIXES = 4, 10, [3, 10]
pytestmark = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning")  # a rank with no batch
PROPERTY_SETTINGS = settings(
    deadline=None, max_examples=30, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

#: name -> factory(num_components, **kwargs)
FACTORIES = {
    "l2": sm.L2ReconstructionLoss,
    "l2_sum": lambda c, **kw: sm.L2ReconstructionLoss(c, feature_reduction="sum", **kw),
    "l1": sm.L1AbsoluteLoss,
    "l0": sm.L0NormMetric,
    "sparsity": lambda c, **kw: sm.SparsityLoss(0.25, c, **kw),
    "matryoshka": lambda c, **kw: sm.MatryoshkaReconstructionLoss(PREFIXES, c, prefix_weights=[0.7, 0.3], **kw),
    "collection": lambda c, **kw: sm.SparseAutoencoderLoss(c, 0.25, matryoshka_prefix_sizes=PREFIXES, **kw),
}


def _items(seed: int, items: int, components: int) -> dict[str, torch.Tensor]:
    """``items`` items for ``components`` SAEs, ``[batch, component, feature]``, plus a shared decoder."""
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(items, components, D_MODEL, generator=generator)
    return {
        "source_activations": source,
        "decoded_activations": source + 0.5 * torch.randn(items, components, D_MODEL, generator=generator),
        "learned_activations": reference.sparse_activations(items, components, D_SAE, generator=generator),
        "decoder_weight": torch.randn(components, D_SAE, D_MODEL, generator=generator),
        "decoder_bias": torch.randn(components, D_MODEL, generator=generator),
    }


def _rows(inputs: dict[str, torch.Tensor], rows: Any) -> dict[str, torch.Tensor]:
    return {key: value[rows] if key.endswith("_activations") else value for key, value in inputs.items()}


def _component(inputs: dict[str, torch.Tensor], component: int) -> dict[str, torch.Tensor]:
    """The inputs of one component, without a component axis."""
    return {
        key: value[:, component] if key.endswith("_activations") else value[component] for key, value in inputs.items()
    }


def _as_dict(value: Any) -> dict[str, torch.Tensor]:
    return value if isinstance(value, dict) else {"value": value}


def _assert_same(actual: Any, expected: Any) -> None:
    actual, expected = _as_dict(actual), _as_dict(expected)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key].double(), value.double(), rtol=1e-6, atol=1e-9, msg=key)


def _synced_in_threads(rank_metrics: list[Any]) -> None:
    """Reduce the states of one metric (or collection) per simulated rank, in place, as ``compute()`` would.

    Each rank runs :func:`sync_states` in its own thread; the stand-in ``all_gather`` hands every rank the buffers of
    all ranks, in rank order, as gloo does.
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

    fake_dist = SimpleNamespace(get_world_size=lambda group: world_size, all_gather=all_gather)

    def run(rank: int) -> None:
        metric = rank_metrics[rank]
        members = list(metric.values(copy_state=False)) if isinstance(metric, sm.SparseAutoencoderLoss) else [metric]
        try:
            _distributed.sync_states(members, rank)  # the "process group" is the rank: the stand-in needs it
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


@pytest.mark.parametrize("name", list(FACTORIES))
@PROPERTY_SETTINGS
@given(
    split=_splits(),
    components=st.integers(1, 3),
    keep_batch_dim=st.booleans(),
    use_forward=st.lists(st.booleans(), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_any_split_over_batches_and_ranks_gives_the_one_batch_result(
    name, split, components, keep_batch_dim, use_forward, seed
):
    factory = FACTORIES[name]
    sizes = [size for rank_sizes in split for size in rank_sizes]
    inputs = _items(seed, sum(sizes), components)
    one_batch = factory(components, keep_batch_dim=keep_batch_dim)
    one_batch.update(**inputs)
    expected = one_batch.compute()

    rank_metrics, start, step = [], 0, 0
    for rank_sizes in split:
        metric = factory(components, keep_batch_dim=keep_batch_dim, sync_on_compute=False)
        for size in rank_sizes:
            batch = _rows(inputs, slice(start, start + size))
            metric(**batch) if use_forward[step % len(use_forward)] else metric.update(**batch)
            start, step = start + size, step + 1
        rank_metrics.append(metric)
    if len(split) > 1:
        _synced_in_threads(rank_metrics)
    for metric in rank_metrics:  # every rank holds the same reduced state
        _assert_same(metric.compute(), expected)
    if name == "matryoshka":
        _assert_same(rank_metrics[-1].compute_prefix_losses(), one_batch.compute_prefix_losses())


@pytest.mark.parametrize("name", list(FACTORIES))
@PROPERTY_SETTINGS
@given(data=st.data(), items=st.integers(1, 9), components=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_per_item_values_are_equivariant_under_permutation(name, data, items, components, seed):
    permutation = data.draw(st.permutations(range(items)))
    inputs = _items(seed, items, components)
    original = _as_dict(FACTORIES[name](components, keep_batch_dim=True)(**inputs))
    permuted = _as_dict(FACTORIES[name](components, keep_batch_dim=True)(**_rows(inputs, torch.tensor(permutation))))
    for key, value in original.items():
        if key == "loss" or key.startswith("matryoshka_prefix_"):  # batch means: invariant
            torch.testing.assert_close(permuted[key], value, rtol=1e-6, atol=1e-7)
        else:
            torch.testing.assert_close(permuted[key], value[list(permutation)], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(FACTORIES))
@PROPERTY_SETTINGS
@given(
    batches=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    components=st.integers(2, 3),
    keep_batch_dim=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_each_component_equals_a_one_component_metric(name, batches, components, keep_batch_dim, seed):
    inputs = _items(seed, sum(batches), components)
    many = FACTORIES[name](components, keep_batch_dim=keep_batch_dim)
    singles = [FACTORIES[name](1, keep_batch_dim=keep_batch_dim) for _ in range(components)]
    start = 0
    for size in batches:
        batch = _rows(inputs, slice(start, start + size))
        many.update(**batch)
        for component, single in enumerate(singles):
            single.update(**_component(batch, component))
        start += size
    together = _as_dict(many.compute())
    for component, single in enumerate(singles):
        alone = _as_dict(single.compute())
        for key, value in alone.items():
            if key == "loss":  # the mean over components of the per-component totals
                continue
            torch.testing.assert_close(together[key][..., component], value, rtol=1e-6, atol=1e-9, equal_nan=True)
    if "loss" in together:
        per_component = torch.stack([_as_dict(single.compute())["loss"] for single in singles])
        torch.testing.assert_close(together["loss"], per_component.mean(), rtol=1e-6, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("name", list(FACTORIES))
@PROPERTY_SETTINGS
@given(
    history=st.integers(0, 5),
    items=st.integers(1, 6),
    components=st.integers(1, 3),
    keep_batch_dim=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_equals_a_fresh_update_and_compute(name, history, items, components, keep_batch_dim, seed):
    inputs = _items(seed, history + items, components)
    metric = FACTORIES[name](components, keep_batch_dim=keep_batch_dim)
    if history:
        metric.update(**_rows(inputs, slice(0, history)))  # forward must not depend on the accumulated state
    batch = _rows(inputs, slice(history, None))
    value = metric(**batch)
    fresh = FACTORIES[name](components, keep_batch_dim=keep_batch_dim)
    fresh.update(**batch)
    _assert_same(value, fresh.compute())


@pytest.mark.parametrize("name", list(FACTORIES))
def test_a_single_item_keeps_its_item_axis(name):
    """torchmetrics squeezes one-element results to 0-d; one item of a one-component metric stays ``[1]``."""
    inputs = _component(_items(0, 1, 1), 0)
    metric = FACTORIES[name](1, keep_batch_dim=True)
    forward = _as_dict(metric(**inputs))
    computed = _as_dict(metric.compute())
    for key, value in computed.items():
        expected_shape = () if key == "loss" or key.startswith("matryoshka_prefix_") else (1,)
        assert value.shape == forward[key].shape == expected_shape, key
