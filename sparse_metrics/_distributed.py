"""Synchronisation of metric states across processes: sums, maxima and minima by ``all_reduce``.

torchmetrics syncs each state of each metric with its own ``all_gather`` (plus a barrier and a shape exchange), about
five collective calls per metric, and every rank receives every rank's copy of every state: bytes and memory grow as
world size x state size. Here every state of every metric given is exchanged together, and a state reduced by a sum,
a maximum or a minimum travels by ``all_reduce``: what a rank receives does not grow with the world size.

Each tensor state declares how it is reduced, once, through its ``dist_reduce_fx``: ``"sum"``, ``"max"``, ``"min"``
(torchmetrics' names), or a :class:`Reduction` (an exact merge in stages, such as the FVU's Chan merge or the
dead-feature counters' lockstep rule). A :class:`Reduction` says what it adds to a **max stage** (int64 order keys,
reduced by ``MAX``; a minimum is the maximum of the keys' bitwise complement) and then, knowing the max stage's
result, what it adds to a **sum stage** (reduced by ``SUM``), and how the two give the synced state.

The collective calls, in order (never more than three, and only those needed):

1. one ``all_gather`` of four integers per rank: a fingerprint of the layout (every metric's class, configuration
   and state shapes) and the sizes of the payload. Its size never depends on the configuration, so ranks configured
   differently learn it here and all raise the same ``ValueError``: a collective of buffers of different sizes would
   abort one process (gloo: "Received data size doesn't match expected size") and leave the others waiting. Its 32
   bytes per rank are the only part that grows with the world size. It runs at every sync: skipping it after an
   earlier check would be each rank's own decision, and a rank whose metrics changed configuration since would wait
   in another collective than the others (a hang instead of this error);
2. one ``all_reduce(MAX)`` of an int64 buffer: every max stage (maxima, minima, FVU shifts, most recent firings);
   skipped when no state has one;
3. one ``all_reduce(SUM)`` of a float64 buffer: every sum stage, plus the rows of list states (``"cat"``, e.g.
   ``keep_batch_dim``) and the values of a state with a plain callable reduction, each rank writing into its own slot
   of a zero-filled region (they grow with the data, not with the world size). Skipped when empty.

A loss collection (sums, counts, per-item rows) makes 2 calls; one with the FVU, dead features or a min/max state 3.
Collectives 2 and 3 cannot be one call (one ``all_reduce`` has one operation, and no exact encoding turns a maximum
into a sum or back without a slot per rank), and the layout check cannot ride on either (their sizes depend on the
layout it checks).

Exactness: int64 values enter the float64 sum as two 32-bit halves (each sum of fewer than 2**21 ranks' halves is
an exact float64 integer), so counts are exact int64 sums; float64 order keys make maxima and minima exact; rows are
placed beside zeros (``-0.0`` for float64 rows: ``x + -0.0 == x`` for every ``x``). A float64 sum is rounded in the
backend's order, the same for every rank (gloo and NCCL reduce each element once and hand every rank the result), so
every rank ends with bitwise identical states (tested on gloo).

With a custom ``dist_sync_fn`` (torchmetrics' gather signature) every state instead travels by that gather, as
before: the layout check, then one buffer of every rank's states, reduced on every rank in rank order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat, dim_zero_max, dim_zero_min, dim_zero_sum
from torchmetrics.utilities.distributed import gather_all_tensors

__all__ = ["MaxReduction", "MinReduction", "Reduction", "SumReduction", "sync_states", "synced_states"]

#: torchmetrics' ``dist_sync_fn`` signature: ``gather(tensor, group=...)`` returns every rank's tensor, in rank order.
Gather = Callable[..., list[Tensor]]
#: The identity of the max stage: no order key is smaller.
NO_KEY = torch.iinfo(torch.int64).min
_LOW_BITS = (1 << 32) - 1


# --- order keys: int64 values whose maximum is the maximum of what they encode ------------------------------------


def order_key(value: Tensor) -> Tensor:
    """int64 keys ordered as ``value``: integers (and bools) as they are, floats by their float64 bits.

    A float64's bits read as int64 are ordered like the floats for non-negative floats and reversed for negative
    ones; flipping every bit but the sign of the negative ones orders all (``-0.0`` below ``0.0``, NaN at the ends).
    """
    if not value.is_floating_point():
        return value.to(torch.int64)
    bits = value.to(torch.float64).view(torch.int64)
    return torch.where(bits < 0, bits ^ torch.iinfo(torch.int64).max, bits)


def from_order_key(key: Tensor, dtype: torch.dtype) -> Tensor:
    """The values of ``dtype`` that :func:`order_key` encoded as ``key`` (the encoding is its own inverse)."""
    if not dtype.is_floating_point:
        return key.to(dtype)
    bits = torch.where(key < 0, key ^ torch.iinfo(torch.int64).max, key)
    return bits.view(torch.float64).to(dtype)


# --- declarative reductions ----------------------------------------------------------------------------------------


class Reduction:
    """How one tensor state is reduced across processes, in an exact max stage and a sum stage (either optional).

    Pass an instance as ``add_state(..., dist_reduce_fx=...)``. The sync calls :meth:`max_part` on every rank's
    local state and reduces the int64 order keys it returns by ``MAX``; then :meth:`sum_part` with that result, and
    reduces what it returns (int64, exactly, or float) by ``SUM``; then :meth:`finish` gives the synced state. Calling
    the instance reduces per-rank states stacked on a new first axis (torchmetrics' convention, used with a custom
    ``dist_sync_fn`` and by ``merge_state``), and must agree with the stages.
    """

    def max_part(self, local: Tensor) -> Tensor | None:
        """int64 order keys to reduce by ``MAX`` (see :func:`order_key`); None for no max stage."""
        return None

    def sum_part(self, local: Tensor, maxed: Tensor | None) -> Tensor | None:
        """What this rank adds to the sum stage, given the max stage's result; None for no sum stage."""
        return None

    def finish(self, local: Tensor, maxed: Tensor | None, summed: Tensor | None) -> Tensor:
        """The synced state from the stages' results."""
        raise NotImplementedError

    def __call__(self, stacked: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SumReduction(Reduction):
    """``"sum"``: int64 sums exact, float sums in float64 (cast back to the state's dtype)."""

    def sum_part(self, local: Tensor, maxed: Tensor | None) -> Tensor:
        return local

    def finish(self, local: Tensor, maxed: Tensor | None, summed: Tensor | None) -> Tensor:
        return cast(Tensor, summed)

    def __call__(self, stacked: Tensor) -> Tensor:
        return stacked.sum(dim=0)


class MaxReduction(Reduction):
    """``"max"``: the elementwise maximum, exact."""

    def max_part(self, local: Tensor) -> Tensor:
        return order_key(local)

    def finish(self, local: Tensor, maxed: Tensor | None, summed: Tensor | None) -> Tensor:
        return from_order_key(cast(Tensor, maxed), local.dtype)

    def __call__(self, stacked: Tensor) -> Tensor:
        return stacked.amax(dim=0)


class MinReduction(Reduction):
    """``"min"``: the elementwise minimum, exact (the maximum of the keys' bitwise complement)."""

    def max_part(self, local: Tensor) -> Tensor:
        return ~order_key(local)

    def finish(self, local: Tensor, maxed: Tensor | None, summed: Tensor | None) -> Tensor:
        return from_order_key(~cast(Tensor, maxed), local.dtype)

    def __call__(self, stacked: Tensor) -> Tensor:
        return stacked.amin(dim=0)


_BY_TORCHMETRICS_NAME: dict[Any, Reduction] = {
    dim_zero_sum: SumReduction(),
    dim_zero_max: MaxReduction(),
    dim_zero_min: MinReduction(),
}


def reduction_of(metric: Metric, name: str) -> Reduction | Callable[[Tensor], Tensor]:
    """The declared reduction of a tensor state: a :class:`Reduction`, or a plain callable of the stacked values."""
    reduction = metric._reductions[name]
    if isinstance(reduction, Reduction):
        return reduction
    known = _BY_TORCHMETRICS_NAME.get(reduction)
    return known if known is not None else cast(Callable[[Tensor], Tensor], reduction)


# --- the states of the metrics ---------------------------------------------------------------------------------------

#: (metric, state name, value): a tensor state, or a list state's rows concatenated.
_State = tuple[Metric, str, Tensor]


def _collect(metrics: Sequence[Metric]) -> tuple[list[_State], list[_State]]:
    """Split the metrics' states into tensor states and list states (the latter concatenated into rows)."""
    tensor_states: list[_State] = []
    list_states: list[_State] = []
    for metric in metrics:
        for name, reduction in metric._reductions.items():
            value = getattr(metric, name)
            # A tensor state reduced by cat would need equal shapes on every rank (ranks may hold different
            # numbers of rows): those belong in a list state, gathered with padding.
            if isinstance(value, Tensor) and callable(reduction) and reduction is not dim_zero_cat:
                tensor_states.append((metric, name, value))
            elif isinstance(value, list) and reduction is dim_zero_cat:
                rows = dim_zero_cat(value) if value else metric._empty_list_state(name)  # type: ignore[operator]
                list_states.append((metric, name, rows))
            else:
                raise TypeError(
                    f"{type(metric).__name__}.{name}: packed sync supports tensor states reduced by sum, max, min or a "
                    f"callable, and list states reduced by cat; got a {type(value).__name__} state with {reduction}."
                )
    return tensor_states, list_states


def _layout(tensor_states: list[_State], list_states: list[_State]) -> str:
    """What every rank must agree on: each state's owner, configuration, name, dtype, (row) shape and reduction."""
    parts = []
    for kind, states in (("tensor", tensor_states), ("rows", list_states)):
        for metric, name, value in states:
            configuration: Any = getattr(metric, "_configuration", dict)()
            shape = list(value.shape) if kind == "tensor" else ["*", *value.shape[1:]]
            reduction = type(reduction_of(metric, name)).__name__ if kind == "tensor" else "cat"
            parts.append([kind, type(metric).__name__, configuration, name, str(value.dtype), shape, reduction])
    return json.dumps(parts, sort_keys=True, default=str)


def _fingerprint(layout: str) -> int:
    return int.from_bytes(hashlib.sha1(layout.encode(), usedforsecurity=False).digest()[:8], "little", signed=True)


def _check_layouts(fingerprints: Sequence[Any], metrics: Sequence[Metric]) -> None:
    """Raise the same error on every rank when the ranks' metrics are laid out (configured) differently."""
    if len(set(fingerprints)) > 1:
        names = ", ".join(sorted({type(metric).__name__ for metric in metrics}))
        different = [rank for rank, fingerprint in enumerate(fingerprints) if fingerprint != fingerprints[0]]
        raise ValueError(
            f"Cannot sync {names}: the processes hold metrics configured differently (ranks {different} differ from "
            "rank 0 in the classes, arguments or state shapes). Construct the metrics with the same arguments on "
            "every process."
        )


# --- the collectives (module functions, so that tests can count and fail them) ---------------------------------------


def _all_gather(buffer: Tensor, group: Any, gather: Gather | None) -> list[Tensor]:
    """Every rank's ``buffer`` (the same length on every rank), in rank order, through ``gather`` where given."""
    if gather is not None and gather is not gather_all_tensors:
        gathered = list(gather(buffer, group=group))
    else:  # torchmetrics' default would first exchange the shapes, which are known equal here
        gathered = [torch.empty_like(buffer) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, buffer, group=group)
    return gathered


def _all_reduce(buffer: Tensor, op: str, group: Any) -> Tensor:
    """``buffer`` reduced over the ranks by ``op`` ("max" or "sum"), in place."""
    dist.all_reduce(buffer, op=getattr(dist.ReduceOp, op.upper()), group=group)
    return buffer


def _is_default(gather: Gather | None) -> bool:
    return gather is None or gather is gather_all_tensors


# --- packing: one flat buffer per collective, pieces read back by offset ---------------------------------------------


def _from_int_halves(summed: Tensor, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    pairs = summed.reshape(-1, 2).to(torch.int64)
    return (pairs[:, 0] * (1 << 32) + pairs[:, 1]).reshape(shape).to(dtype)


def _to_words(value: Tensor) -> Tensor:
    """Any tensor's bytes as float64 values of their 32-bit words (exact; summed with zeros, they come back)."""
    raw = value.contiguous().reshape(-1).view(torch.uint8)
    padded = torch.zeros(-(-raw.numel() // 4) * 4, dtype=torch.uint8, device=raw.device)
    padded[: raw.numel()] = raw
    return padded.view(torch.int32).to(torch.float64)


def _from_words(words: Tensor, like: Tensor, shape: Sequence[int]) -> Tensor:
    nbytes = int(torch.Size(shape).numel()) * like.element_size()
    raw = words.to(torch.int32).view(torch.uint8)[:nbytes]
    return raw.clone().view(like.dtype).reshape(shape)


def _sum_decoded(summed: Tensor, like: Tensor) -> Tensor:
    if like.is_floating_point():
        return summed.reshape(like.shape).to(like.dtype)
    return _from_int_halves(summed, like.shape, like.dtype)


def _sum_length(like: Tensor) -> int:
    return like.numel() * (1 if like.is_floating_point() else 2)


def _row_encoded(rows: Tensor) -> Tensor:
    """List-state rows for a slot of the sum stage: float64 as they are, anything else as its 32-bit words."""
    return rows.reshape(-1) if rows.dtype == torch.float64 else _to_words(rows)


def _row_decoded(words: Tensor, like: Tensor, shape: Sequence[int]) -> Tensor:
    return words.reshape(shape) if like.dtype == torch.float64 else _from_words(words, like, shape)


def _row_length(like: Tensor, count: int) -> int:
    if like.dtype == torch.float64:
        return count * like.shape[1:].numel()
    return -(-count * like.shape[1:].numel() * like.element_size() // 4)


@dataclass
class _Plan:
    """This rank's states, split by how they travel."""

    reduced: list[tuple[Metric, str, Tensor, Reduction]] = field(default_factory=list)
    gathered: list[tuple[Metric, str, Tensor, Callable[[Tensor], Tensor]]] = field(default_factory=list)
    rows: list[_State] = field(default_factory=list)

    def local_slot(self, device: torch.device) -> Tensor:
        """This rank's slot: the values of the states with a plain callable, its row counts, then its rows."""
        slot = [_to_words(value) for _, _, value, _ in self.gathered]
        slot.append(torch.tensor([rows.shape[0] for _, _, rows in self.rows], dtype=torch.float64, device=device))
        slot += [_row_encoded(rows) for _, _, rows in self.rows]
        return torch.cat(slot)


def _plan(tensor_states: list[_State], list_states: list[_State]) -> _Plan:
    plan = _Plan(rows=list_states)
    for metric, name, value in tensor_states:
        reduction = reduction_of(metric, name)
        if isinstance(reduction, Reduction):
            plan.reduced.append((metric, name, value, reduction))
        else:
            plan.gathered.append((metric, name, value, reduction))
    return plan


def _split(buffer: Tensor, parts: Sequence[Tensor | None], lengths: Sequence[int]) -> list[Tensor | None]:
    """Consecutive pieces of ``buffer``, one per part that is not None (``lengths`` of those)."""
    pieces: list[Tensor | None] = []
    offset, given = 0, iter(lengths)
    for part in parts:
        if part is None:
            pieces.append(None)
            continue
        length = next(given)
        pieces.append(buffer[offset : offset + length])
        offset += length
    return pieces


def _sum_buffer(sum_parts: Sequence[Tensor | None], local_slot: Tensor, slot_lengths: list[int], rank: int) -> Tensor:
    """The sum stage's buffer: every part encoded in place, then the ranks' slots (this rank's filled)."""
    lengths = [_sum_length(part) for part in sum_parts if part is not None]
    fixed = sum(lengths)
    # -0.0 + x == x for every float64 x (-0.0 and NaN included): a slot's values come back bit for bit.
    buffer = torch.full((fixed + sum(slot_lengths),), -0.0, dtype=torch.float64, device=local_slot.device)
    for part, piece in zip(sum_parts, _split(buffer, sum_parts, lengths), strict=True):
        if part is None or piece is None:
            continue
        if part.is_floating_point():
            piece.copy_(part.reshape(-1))
        else:  # exact int64: the signed high and the low 32 bits, each an exactly summable float64 integer
            flat, pairs = part.reshape(-1).to(torch.int64), piece.view(-1, 2)
            pairs[:, 0].copy_(flat >> 32)
            pairs[:, 1].copy_(flat & _LOW_BITS)
    start = fixed + sum(slot_lengths[:rank])
    buffer[start : start + local_slot.numel()] = local_slot
    return buffer


def _from_slots(plan: _Plan, slots: list[Tensor]) -> list[tuple[Metric, str, Any]]:
    """The states that travelled in the ranks' slots: plain callables of the stacked values, and concatenated rows."""
    results: list[tuple[Metric, str, Any]] = []
    position = 0
    for metric, name, value, function in plan.gathered:  # stacked on a new first axis, as torchmetrics gives them
        length = int(_to_words(value).numel())
        values = [_from_words(rank_slot[position : position + length], value, value.shape) for rank_slot in slots]
        results.append((metric, name, function(torch.stack(values)).to(value.dtype)))
        position += length
    rows_by_state: list[list[Tensor]] = [[] for _ in plan.rows]
    for rank_slot in slots:
        counts = [int(count) for count in rank_slot[position : position + len(plan.rows)].tolist()]
        cursor = position + len(plan.rows)
        for pieces, (_, _, like), count in zip(rows_by_state, plan.rows, counts, strict=True):
            length = _row_length(like, count)
            pieces.append(_row_decoded(rank_slot[cursor : cursor + length], like, (count, *like.shape[1:])))
            cursor += length
    for (metric, name, _), pieces in zip(plan.rows, rows_by_state, strict=True):
        results.append((metric, name, [torch.cat(pieces)]))
    return results


def _reduce_states(tensor_states: list[_State], list_states: list[_State], group: Any) -> list[tuple[Metric, str, Any]]:
    """The synced value of every state, by all_reduce (collectives 1-3 of the module docstring); nothing set yet."""
    plan = _plan(tensor_states, list_states)
    device = (tensor_states or list_states)[0][2].device
    max_parts = [reduction.max_part(value) for _, _, value, reduction in plan.reduced]
    keys = [part.reshape(-1) for part in max_parts if part is not None]
    local_slot = plan.local_slot(device)
    # Collective 1, a fixed size whatever the configuration: the layout's fingerprint and the stages' sizes.
    layout = _fingerprint(_layout(tensor_states, list_states))
    meta = torch.tensor([layout, sum(k.numel() for k in keys), local_slot.numel(), 0], dtype=torch.int64, device=device)
    meta_by_rank = [rank_meta.tolist() for rank_meta in _all_gather(meta, group, None)]
    _check_layouts([(meta[0], meta[1]) for meta in meta_by_rank], [m for m, _, _ in tensor_states + list_states])
    # Collective 2: every max stage (skipped when none has one).
    maxed: list[Tensor | None] = [None] * len(max_parts)
    if keys:
        reduced = _all_reduce(torch.cat(keys), "max", group)
        pieces = _split(reduced, max_parts, [k.numel() for k in keys])
        maxed = [None if p is None else p.view(part.shape) for p, part in zip(pieces, max_parts, strict=True)]  # type: ignore[union-attr]
    # Collective 3: every sum stage, and one slot per rank (skipped when empty).
    sum_parts = [
        reduction.sum_part(value, part) for (_, _, value, reduction), part in zip(plan.reduced, maxed, strict=True)
    ]
    slot_lengths = [meta[2] for meta in meta_by_rank]
    buffer = _sum_buffer(sum_parts, local_slot, slot_lengths, dist.get_rank(group))
    if buffer.numel():
        buffer = _all_reduce(buffer, "sum", group)
    lengths = [_sum_length(part) for part in sum_parts if part is not None]
    results: list[tuple[Metric, str, Any]] = []
    for (metric, name, value, reduction), max_part, part, piece in zip(
        plan.reduced, maxed, sum_parts, _split(buffer, sum_parts, lengths), strict=True
    ):
        summed = None if part is None or piece is None else _sum_decoded(piece, part)
        results.append((metric, name, reduction.finish(value, max_part, summed).to(value.dtype)))
    offset, slots = sum(lengths), []
    for length in slot_lengths:
        slots.append(buffer[offset : offset + length])
        offset += length
    return results + _from_slots(plan, slots)


# --- with a custom gather: every rank's states, reduced in rank order on every rank ---------------------------------


def _as_bytes(tensor: Tensor) -> Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _from_bytes(buffer: Tensor, like: Tensor, shape: Sequence[int]) -> Tensor:
    # clone: a view at an arbitrary byte offset may be misaligned for a wider dtype.
    return buffer.clone().view(like.dtype).reshape(shape)


def _gather_states(
    tensor_states: list[_State], list_states: list[_State], group: Any, gather: Gather
) -> list[tuple[Metric, str, Any]]:
    """The synced value of every state through ``gather``: the layout check, then one buffer of every state."""
    device = (tensor_states or list_states)[0][2].device
    row_counts = torch.tensor([rows.shape[0] for _, _, rows in list_states], dtype=torch.int64, device=device)
    fixed = torch.cat([_as_bytes(value) for _, _, value in tensor_states] + [_as_bytes(row_counts)])
    rows = [_as_bytes(rows) for _, _, rows in list_states]
    local_rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.uint8, device=device)
    meta = torch.tensor(
        [_fingerprint(_layout(tensor_states, list_states)), fixed.numel(), local_rows.numel()], device=device
    )
    meta_by_rank = [rank_meta.tolist() for rank_meta in _all_gather(meta, group, gather)]
    _check_layouts([meta[0] for meta in meta_by_rank], [m for m, _, _ in tensor_states + list_states])
    payload = torch.zeros(fixed.numel() + max(meta[2] for meta in meta_by_rank), dtype=torch.uint8, device=device)
    payload[: fixed.numel()] = fixed
    payload[fixed.numel() : fixed.numel() + local_rows.numel()] = local_rows
    buffers = _all_gather(payload, group, gather)
    results: list[tuple[Metric, str, Any]] = []
    offset = 0
    for metric, name, value in tensor_states:
        end = offset + value.numel() * value.element_size()
        stacked = torch.stack([_from_bytes(buffer[offset:end], value, value.shape) for buffer in buffers])
        reduction = reduction_of(metric, name)  # a callable of the stacked values (a Reduction is one too)
        results.append((metric, name, reduction(stacked).to(value.dtype)))
        offset = end
    counts_by_rank = [
        _from_bytes(buffer[offset : fixed.numel()], row_counts, row_counts.shape).tolist() for buffer in buffers
    ]
    row_nbytes = [rows.shape[1:].numel() * rows.element_size() for _, _, rows in list_states]
    for index, (metric, name, like) in enumerate(list_states):
        pieces = []
        for buffer, counts in zip(buffers, counts_by_rank, strict=True):
            start = fixed.numel() + sum(n * b for n, b in zip(counts[:index], row_nbytes[:index], strict=True))
            chunk = buffer[start : start + counts[index] * row_nbytes[index]]
            pieces.append(_from_bytes(chunk, like, (counts[index], *like.shape[1:])))
        results.append((metric, name, [torch.cat(pieces)]))
    return results


def sync_states(metrics: Sequence[Metric], process_group: Any = None, gather: Gather | None = None) -> None:
    """Replace the states of ``metrics`` in place by their reduction over ``process_group``.

    Tensor states need a reduction: ``"sum"``, ``"max"``, ``"min"``, a :class:`Reduction`, or a plain callable
    taking the per-rank values stacked on a new first axis (torchmetrics' convention; such a state travels in a slot
    per rank, so prefer a :class:`Reduction`); list states must be reduced by ``"cat"``, and a metric with list
    states provides ``_empty_list_state(name)``: an empty tensor with the dtype, device and trailing shape of that
    state's rows (a rank may have none). Every rank must call this with the same metrics, configured alike; a
    difference raises ``ValueError`` on every rank. ``gather`` is torchmetrics' ``dist_sync_fn``: the default
    (None, or torchmetrics' ``gather_all_tensors``) syncs by ``all_reduce``, any other is used for two gathers
    instead. No state changes unless every collective succeeds.
    """
    tensor_states, list_states = _collect(metrics)
    if not tensor_states and not list_states:
        return
    if _is_default(gather):
        results = _reduce_states(tensor_states, list_states, process_group)
    else:
        results = _gather_states(tensor_states, list_states, process_group, cast(Gather, gather))
    for metric, name, value in results:
        setattr(metric, name, value)


@contextmanager
def synced_states(metrics: Sequence[Metric], process_group: Any = None) -> Iterator[None]:
    """Within the block, ``metrics`` hold their states reduced over all ranks; their local states after.

    While synced, each metric's own ``compute`` does not sync again. Nothing is exchanged when no process group is
    initialised or no metric asks to sync on compute.
    """
    to_sync = [m for m in metrics if m._to_sync and m.distributed_available_fn()]
    if not to_sync:
        yield
        return
    # Syncing replaces state attributes with new objects, so references are enough to restore the local state, also
    # when a collective fails halfway.
    local = [{name: getattr(m, name) for name in m._defaults} for m in to_sync]
    try:
        sync_states(to_sync, process_group, gather=to_sync[0].dist_sync_fn)
        for metric in to_sync:
            metric._to_sync = False
        yield
    finally:
        for metric, states in zip(to_sync, local, strict=True):
            for name, value in states.items():
                setattr(metric, name, value)
            metric._to_sync = metric.sync_on_compute
