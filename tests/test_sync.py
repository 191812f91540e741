"""The all_reduce sync (``sparse_metrics/_distributed.py``): exact stages, bytes that do not grow with world size.

- Order keys and the int64 halves are exact (floats' order, -0.0, NaN, infinities, int64 extremes).
- Every :class:`Reduction` (sum, max, min, the FVU's Chan merge, the dead-feature counters) gives by its two stages
  what its ``__call__`` gives on the stacked per-rank states (the gather path's reduction).
- Ranks simulated by threads (the real code path, ``torch.distributed`` stood in for): values, bitwise identity,
  the collectives made and the bytes each rank receives, for 1 to 4 ranks.
- Real gloo processes, 2 ranks (and 4, slow): the same, bitwise identical on every rank; a layout mismatch raises
  the same ValueError on every rank before any data-sized collective.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torchmetrics import Metric

import sparse_metrics as sm
from sparse_metrics import _distributed
from sparse_metrics._distributed import (
    NO_KEY,
    MaxReduction,
    MinReduction,
    Reduction,
    SumReduction,
    from_order_key,
    order_key,
    reduction_of,
)
from tests import reference
from tests.distributed import run_on_ranks

pytestmark = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning")
D_SAE, D_MODEL = 64, 5


# --- encodings -------------------------------------------------------------------------------------------------------


def test_order_keys_order_floats_and_come_back_bit_for_bit():
    tiny = torch.finfo(torch.float64).tiny
    values = torch.tensor(
        [-float("inf"), -1e300, -1.0, -tiny, -5e-324, -0.0, 0.0, 5e-324, tiny, 1.0, 1e300, float("inf")],
        dtype=torch.float64,
    )
    keys = order_key(values)
    assert torch.equal(keys, keys.sort().values)  # strictly increasing with the floats, -0.0 below 0.0
    assert len(set(keys.tolist())) == len(values)
    assert torch.equal(from_order_key(keys, torch.float64).view(torch.int64), values.view(torch.int64))
    nan = torch.tensor([float("nan")], dtype=torch.float64)
    assert from_order_key(order_key(nan), torch.float64).isnan().all()
    assert (order_key(nan) > order_key(torch.tensor([float("inf")], dtype=torch.float64))).all()
    assert (order_key(values) > NO_KEY).all()  # the max stage's identity is below every key
    floats32 = torch.tensor([-2.5, 0.0, 3.25], dtype=torch.float32)
    assert torch.equal(from_order_key(order_key(floats32), torch.float32), floats32)


def test_int64_sums_are_exact_at_the_extremes():
    big = torch.iinfo(torch.int64).max
    ranks = [torch.tensor([big // 3, -(big // 2), 7, -1, 2**62]), torch.tensor([big // 3, -(big // 2), -7, 0, 2**61])]
    ranks.append(torch.tensor([big // 3, 3, 0, -1, 2**60]))
    buffers = [_distributed._sum_buffer([value], torch.zeros(0, dtype=torch.float64), [], 0) for value in ranks]
    summed = _distributed._sum_decoded(torch.stack(buffers).sum(dim=0), ranks[0])
    assert torch.equal(summed, torch.stack(ranks).sum(dim=0))


# --- the stages of every reduction agree with its stacked form -----------------------------------------------------


def _by_stages(reduction: Reduction, stacked: torch.Tensor) -> torch.Tensor:
    """What the sync computes: the max stage's maximum over ranks, then the sum stage's sum, then finish."""
    parts = [reduction.max_part(local) for local in stacked]
    maxed = None if parts[0] is None else torch.stack(parts).amax(dim=0)  # type: ignore[arg-type]
    sums = [reduction.sum_part(local, maxed) for local in stacked]
    summed = None if sums[0] is None else torch.stack(sums).sum(dim=0)  # type: ignore[arg-type]
    return reduction.finish(stacked[0], maxed, summed)


@pytest.mark.parametrize("reduction", [SumReduction(), MaxReduction(), MinReduction()], ids=repr)
def test_plain_reductions_by_stages_equal_the_stacked_reduction(reduction):
    generator = torch.Generator().manual_seed(0)
    floats = torch.randn(4, 3, 5, generator=generator, dtype=torch.float64) * 1e3
    floats[1, 0, 0], floats[2, 0, 1] = -0.0, float("inf")
    integers = torch.randint(-(2**40), 2**40, (4, 3, 5), generator=generator)
    assert torch.equal(_by_stages(reduction, integers), reduction(integers))
    expected = reduction(floats)
    assert torch.equal(_by_stages(reduction, floats).view(torch.int64), expected.view(torch.int64))


def _counters(sizes: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    streams = [reference.sparse_activations(n, 2, D_SAE, density=0.05, generator=generator) for n in sizes]
    metrics = []
    for stream in streams:
        metric = sm.DeadFeatures(D_SAE, 2, window=4)
        metric.update(stream)
        metrics.append(metric)
    return torch.stack([m.dead_counters for m in metrics]), streams


@pytest.mark.parametrize("sizes", [[13, 6, 0], [0, 0], [1, 40, 2, 9], [5]])
def test_dead_feature_counters_by_stages_follow_the_lockstep_rule(sizes):
    stacked, streams = _counters(sizes)
    reduction = reduction_of(sm.DeadFeatures(D_SAE, 2, window=4), "dead_counters")
    assert isinstance(reduction, Reduction)
    synced = _by_stages(reduction, stacked)
    assert torch.equal(synced, reduction(stacked))
    assert torch.equal(synced[:, :-1], reference.lockstep_items_since_fired(streams))
    assert torch.equal(synced[:, -1], torch.full((2,), sum(sizes)))


@pytest.mark.parametrize("sizes", [[50, 3, 200], [0, 7, 0, 1], [0, 0], [9]])
def test_fvu_statistics_by_stages_are_exact_at_a_large_offset(sizes):
    generator = torch.Generator().manual_seed(5)
    shift = 1e6 + torch.linspace(-2, 2, D_MODEL, dtype=torch.float64)
    rows, metrics = [], []
    for index, n in enumerate(sizes):
        source = torch.randn(n, 2, D_MODEL, generator=generator, dtype=torch.float64) * (1 + index) + shift
        decoded = source + 0.1 * torch.randn(n, 2, D_MODEL, generator=generator, dtype=torch.float64)
        metric = sm.FractionOfVarianceUnexplained(2, d_model=D_MODEL)
        metric.update(decoded, source)
        metrics.append(metric)
        rows.append((decoded, source))
    stacked = torch.stack([m.fvu_statistics for m in metrics])
    reduction = reduction_of(metrics[0], "fvu_statistics")
    assert isinstance(reduction, Reduction)
    synced = _by_stages(reduction, stacked)
    chan = reduction(stacked)  # Chan's merge in rank order, as the gather path reduces
    torch.testing.assert_close(synced, chan, rtol=1e-12, atol=0)
    pooled = sm.FractionOfVarianceUnexplained(2, d_model=D_MODEL)
    pooled.fvu_statistics = synced
    decoded, source = (torch.cat([r[i] for r in rows]) for i in (0, 1))
    if decoded.shape[0]:
        torch.testing.assert_close(pooled.compute(), reference.fvu(decoded, source), rtol=1e-11, atol=0)
    if sum(n > 0 for n in sizes) <= 1:  # one rank with items: its statistics come back unchanged
        assert torch.equal(synced, chan)


# --- ranks as threads: the real code path, collectives recorded ------------------------------------------------------


class _Every(Metric):
    """One state of every kind the sync carries: sums (int64, float32), max, min, a plain callable and int rows."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("count", torch.zeros(3, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(2, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("high", torch.full((4,), -float("inf"), dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("low", torch.full((4,), torch.iinfo(torch.int64).max), dist_reduce_fx="min")
        self.add_state("product", torch.ones(2, dtype=torch.float64), dist_reduce_fx=lambda s: s.prod(dim=0))
        self.add_state("rows", [], dist_reduce_fx="cat")

    def update(self, seed: int, items: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.count = self.count + torch.randint(0, 2**40, (3,), generator=generator)
        self.total = self.total + torch.randn(2, generator=generator).float()
        self.high = torch.maximum(self.high, torch.randn(4, generator=generator, dtype=torch.float64))
        self.low = torch.minimum(self.low, torch.randint(-(2**50), 2**50, (4,), generator=generator))
        self.product = self.product * (1 + torch.rand(2, generator=generator, dtype=torch.float64))
        self.rows.append(torch.randint(-(2**62), 2**62, (items, 3), generator=generator))

    def compute(self) -> torch.Tensor:
        return self.count

    def _empty_list_state(self, name: str) -> torch.Tensor:
        return torch.zeros(0, 3, dtype=torch.int64)


def _members(world_size: int, rank: int, d_sae: int = D_SAE) -> list[Metric]:
    """The metrics of one rank: every kind of state, and feature density and dead features; rank 1 saw nothing."""
    every = _Every()
    density, dead = sm.FeatureDensity(d_sae, 2), sm.DeadFeatures(d_sae, 2, window=3)
    if rank != 1:
        every.update(rank, items=2 + rank)
        activations = reference.sparse_activations(
            4 + 3 * rank, 2, d_sae, density=0.05, generator=torch.Generator().manual_seed(rank)
        )
        density.update(activations)
        dead.update(activations)
    return [every, density, dead]


def _expected(world_size: int) -> list[dict[str, Any]]:
    """Every state reduced as torchmetrics would: each reduction of the per-rank states, stacked in rank order."""
    ranks = [_members(world_size, rank) for rank in range(world_size)]
    expected = []
    for index, metric in enumerate(ranks[0]):
        states = {}
        for name in metric._defaults:
            values = [getattr(members[index], name) for members in ranks]
            if isinstance(values[0], list):
                states[name] = torch.cat([torch.cat(v) if v else metric._empty_list_state(name) for v in values])
            else:
                states[name] = reduction_of(metric, name)(torch.stack(values))
        expected.append(states)
    return expected


def _in_threads(world_size: int, members_of: Any) -> tuple[list[list[Metric]], list[list[tuple[str, int]]]]:
    """Sync one rank's members per thread through the stand-in collectives; record (collective, bytes received)."""
    barrier = threading.Barrier(world_size)
    slots: list[Any] = [None] * world_size
    calls: list[list[tuple[str, int]]] = [[] for _ in range(world_size)]

    def all_gather(gathered: list[torch.Tensor], buffer: torch.Tensor, group: int) -> None:
        slots[group] = buffer.clone()
        barrier.wait()
        for index, slot in enumerate(slots):
            gathered[index].copy_(slot)
        barrier.wait()
        calls[group].append(("all_gather", world_size * buffer.numel() * buffer.element_size()))

    def all_reduce(buffer: torch.Tensor, op: str, group: int) -> None:
        slots[group] = buffer.clone()
        barrier.wait()
        stacked = torch.stack(slots)
        buffer.copy_(stacked.amax(dim=0) if op == "max" else stacked.sum(dim=0))
        barrier.wait()
        calls[group].append((f"all_reduce {op}", buffer.numel() * buffer.element_size()))

    fake = SimpleNamespace(
        get_world_size=lambda group: world_size,
        get_rank=lambda group: group,
        all_gather=all_gather,
        all_reduce=all_reduce,
        ReduceOp=SimpleNamespace(MAX="max", SUM="sum"),
    )
    members = [members_of(world_size, rank) for rank in range(world_size)]
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            _distributed.sync_states(members[rank], rank)
        except BaseException as error:
            errors.append(error)
            barrier.abort()

    original, _distributed.dist = _distributed.dist, fake  # type: ignore[assignment]
    try:
        threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        _distributed.dist = original  # type: ignore[assignment]
    if errors:
        raise errors[0]
    return members, calls


def _assert_identical(value: Any, expected: Any, msg: str) -> None:
    value, expected = (torch.cat(v) if isinstance(v, list) else v for v in (value, expected))
    assert value.dtype == expected.dtype, msg
    assert value.shape == expected.shape, msg
    bits = {torch.float64: torch.int64, torch.float32: torch.int32}
    if value.dtype in bits:
        assert torch.equal(value.view(bits[value.dtype]), expected.view(bits[value.dtype])), msg
    else:
        assert torch.equal(value, expected), msg


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_threads_every_state_kind_exact_and_identical_on_every_rank(world_size):
    members, calls = _in_threads(world_size, _members)
    expected = _expected(world_size)
    for rank, rank_members in enumerate(members):
        for metric, states in zip(rank_members, expected, strict=True):
            for name, value in states.items():
                synced = getattr(metric, name)
                if name == "total":  # float32 sums are added in float64, then rounded once
                    torch.testing.assert_close(synced, value, rtol=1e-6, atol=1e-6)
                elif name == "product":  # a plain callable of the stacked values: exactly the rank-order result
                    _assert_identical(synced, value, f"{rank} {name}")
                else:
                    _assert_identical(synced, value, f"rank {rank}: {type(metric).__name__}.{name}")
        for metric, first in zip(rank_members, members[0], strict=True):  # bitwise identical on every rank
            for name in metric._defaults:
                _assert_identical(getattr(metric, name), getattr(first, name), f"rank {rank} vs 0: {name}")
    for rank_calls in calls:  # the layout check, the max stage, the sum stage
        assert [name for name, _ in rank_calls] == ["all_gather", "all_reduce max", "all_reduce sum"]


def _sums_only(world_size: int, rank: int) -> list[Metric]:
    metric = sm.SparseAutoencoderLoss(2, 0.1, feature_density=True, num_features=D_SAE)
    if rank != 1:
        inputs = reference.sae_inputs(
            3 + rank, components=2, d_model=D_MODEL, d_sae=D_SAE, generator=torch.Generator().manual_seed(rank)
        )
        metric.update(**inputs)
    return list(metric.values(copy_state=False))


def test_threads_a_collection_of_sums_makes_two_collective_calls():
    _, calls = _in_threads(3, _sums_only)
    for rank_calls in calls:
        assert [name for name, _ in rank_calls] == ["all_gather", "all_reduce sum"]


def _without_rows(world_size: int, rank: int) -> list[Metric]:
    density, dead = sm.FeatureDensity(4096, 2), sm.DeadFeatures(4096, 2, window=3)
    activations = reference.sparse_activations(3, 2, 4096, density=0.05, generator=torch.Generator().manual_seed(rank))
    density.update(activations)
    dead.update(activations)
    return [density, dead]


def test_threads_bytes_received_do_not_grow_with_world_size():
    received = {}
    for world_size in (2, 3, 4):
        _, calls = _in_threads(world_size, _without_rows)
        assert all(rank_calls == calls[0] for rank_calls in calls)
        received[world_size] = dict(calls[0])
    state_bytes = 2 * 4096 * 8 + 8 + 2 * 4097 * 8  # fire counts, item count, counters
    for world_size, by_call in received.items():
        assert by_call["all_reduce max"] == received[2]["all_reduce max"]
        assert by_call["all_reduce sum"] == received[2]["all_reduce sum"]
        assert by_call["all_gather"] == 32 * world_size  # the layout check: four int64 per rank, all that grows
        assert by_call["all_reduce max"] + by_call["all_reduce sum"] < 3 * state_bytes


# --- real gloo processes --------------------------------------------------------------------------------------------


def _on_gloo(rank: int, world_size: int) -> dict[str, Any]:
    received: list[tuple[str, int]] = []
    originals = {name: getattr(dist, name) for name in ("all_gather", "all_reduce", "broadcast", "barrier")}

    def recording(name: str) -> Any:
        def collective(*args: Any, **kwargs: Any) -> Any:
            tensor = args[1] if name == "all_gather" else args[0] if args else None
            size = 0 if tensor is None else tensor.numel() * tensor.element_size()
            received.append((name, size * (world_size if name == "all_gather" else 1)))
            return originals[name](*args, **kwargs)

        return collective

    members = _members(world_size, rank)
    for name in originals:
        setattr(dist, name, recording(name))
    try:
        _distributed.sync_states(members)
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    states = {f"{index}.{name}": getattr(m, name) for index, m in enumerate(members) for name in m._defaults}
    # A layout mismatch (another dictionary size on the last rank) is caught before any data-sized collective.
    mismatched = _members(world_size, rank, d_sae=D_SAE if rank < world_size - 1 else 2 * D_SAE)
    before = {name: getattr(mismatched[1], name) for name in mismatched[1]._defaults}
    try:
        _distributed.sync_states(mismatched)
        message = "no error"
    except ValueError as error:
        message = str(error)
    unchanged = all(getattr(mismatched[1], name) is value for name, value in before.items())
    # Float64 sums of 2**16 values of every magnitude: the backend's order, the same bits on every rank.
    generator = torch.Generator().manual_seed(rank)
    floats = torch.randn(2**16, generator=generator, dtype=torch.float64)
    floats *= 10.0 ** torch.randint(-8, 8, (2**16,), generator=generator)
    summed = _distributed._all_reduce(floats.clone(), "sum", None)
    return {"states": states, "calls": received, "mismatch": message, "unchanged": unchanged, "sum": summed}


def _check_gloo(world_size: int) -> None:
    results = run_on_ranks(_on_gloo, world_size=world_size)
    expected = _expected(world_size)
    flat = {f"{index}.{name}": value for index, states in enumerate(expected) for name, value in states.items()}
    for rank, result in enumerate(results):
        for key, value in result["states"].items():
            _assert_identical(value, results[0]["states"][key], f"rank {rank} vs 0: {key}")
            if not key.endswith(".total"):
                _assert_identical(value, flat[key], f"rank {rank}: {key}")
        assert torch.equal(result["sum"].view(torch.int64), results[0]["sum"].view(torch.int64))
        assert [name for name, _ in result["calls"]] == ["all_gather", "all_reduce", "all_reduce"]
        assert result["calls"] == results[0]["calls"]
        assert result["mismatch"] == results[0]["mismatch"]
        assert f"ranks [{world_size - 1}] differ from rank 0" in result["mismatch"]
        assert result["unchanged"]


@pytest.mark.distributed
def test_gloo_two_ranks_exact_identical_and_mismatch_refused():
    _check_gloo(2)


@pytest.mark.distributed
@pytest.mark.slow
def test_gloo_four_ranks_exact_identical_and_mismatch_refused():
    _check_gloo(4)
