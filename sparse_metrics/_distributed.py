"""Packed synchronisation of metric states across processes.

torchmetrics syncs each state of each metric with its own ``all_gather`` (plus a barrier and a shape exchange), about
five collective calls per metric. Here every state of every metric given is exchanged in two calls:

1. one ``all_gather`` of three integers: a fingerprint of the layout (every metric's class, configuration and state
   shapes) and the sizes of the payload. Its size never depends on the configuration, so ranks configured differently
   learn it here and all raise the same ``ValueError``, where a gather of buffers of different sizes would abort one
   process and hand the others bytes they never fully received;
2. one ``all_gather`` of every tensor state, the row count of every list state and the list states' rows, padded to
   the longest rank's rows.

Bytes are exchanged, not values, so integer counts and float64 sums cross the wire exactly, and every rank reduces
the same per-rank values in the same order: the result is bitwise identical on all ranks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat, dim_zero_max, dim_zero_min, dim_zero_sum
from torchmetrics.utilities.distributed import gather_all_tensors

__all__ = ["sync_states", "synced_states"]

_TENSOR_REDUCTIONS: dict[Any, Callable[..., Tensor]] = {
    dim_zero_sum: torch.sum,
    dim_zero_max: torch.amax,
    dim_zero_min: torch.amin,
}
#: (metric, state name, value): a tensor state, or a list state's rows concatenated.
_State = tuple[Metric, str, Tensor]
#: torchmetrics' ``dist_sync_fn`` signature: ``gather(tensor, group=...)`` returns every rank's tensor, in rank order.
Gather = Callable[..., list[Tensor]]


def _as_bytes(tensor: Tensor) -> Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _from_bytes(buffer: Tensor, like: Tensor, shape: Sequence[int]) -> Tensor:
    # clone: a view at an arbitrary byte offset may be misaligned for a wider dtype.
    return buffer.clone().view(like.dtype).reshape(shape)


def _all_gather(buffer: Tensor, group: Any, gather: Gather | None) -> list[Tensor]:
    """Every rank's ``buffer`` (the same length on every rank), in rank order, through ``gather`` where given."""
    if gather is not None and gather is not gather_all_tensors:
        gathered = list(gather(buffer, group=group))
    else:  # torchmetrics' default would first exchange the shapes, which are known equal here
        gathered = [torch.empty_like(buffer) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, buffer, group=group)
    return gathered


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
    """What every rank must agree on: each state's owner, configuration, name, dtype and (row) shape, in order."""
    parts = []
    for kind, states in (("tensor", tensor_states), ("rows", list_states)):
        for metric, name, value in states:
            configuration: Any = getattr(metric, "_configuration", dict)()
            shape = list(value.shape) if kind == "tensor" else ["*", *value.shape[1:]]
            parts.append([kind, type(metric).__name__, configuration, name, str(value.dtype), shape])
    return json.dumps(parts, sort_keys=True, default=str)


def _fingerprint(layout: str) -> int:
    return int.from_bytes(hashlib.sha1(layout.encode(), usedforsecurity=False).digest()[:8], "little", signed=True)


def _check_layouts(meta_by_rank: list[list[int]], metrics: Sequence[Metric]) -> None:
    """Raise the same error on every rank when the ranks' metrics are laid out (configured) differently."""
    fingerprints = [meta[0] for meta in meta_by_rank]
    if len(set(fingerprints)) > 1:
        names = ", ".join(sorted({type(metric).__name__ for metric in metrics}))
        different = [rank for rank, fingerprint in enumerate(fingerprints) if fingerprint != fingerprints[0]]
        raise ValueError(
            f"Cannot sync {names}: the processes hold metrics configured differently (ranks {different} differ from "
            "rank 0 in the classes, arguments or state shapes). Construct the metrics with the same arguments on "
            "every process."
        )


def _reduce_tensor_states(tensor_states: list[_State], buffers: list[Tensor]) -> None:
    """Reduce every tensor state over the ranks' buffers, in rank order (bitwise identical on every rank)."""
    values_by_state: list[list[Tensor]] = [[] for _ in tensor_states]
    for rank_buffer in buffers:
        offset = 0
        for values, (_, _, value) in zip(values_by_state, tensor_states, strict=True):
            end = offset + value.numel() * value.element_size()
            values.append(_from_bytes(rank_buffer[offset:end], value, value.shape))
            offset = end
    for (metric, name, value), values in zip(tensor_states, values_by_state, strict=True):
        # A custom reduction gets the per-rank values stacked on a new first axis, as torchmetrics gives them.
        reduction = cast(Callable[[Tensor], Tensor], metric._reductions[name])  # checked by _collect
        stacked = torch.stack(values)
        if reduction in _TENSOR_REDUCTIONS:
            reduced = _TENSOR_REDUCTIONS[reduction](stacked, dim=0)
        else:
            reduced = reduction(stacked)
        setattr(metric, name, reduced.to(value.dtype))


def _concatenate_list_states(list_states: list[_State], buffers: list[Tensor], rows_by_rank: list[list[int]]) -> None:
    """Concatenate every list state over the ranks' row bytes, in rank order."""
    row_nbytes = [rows.shape[1:].numel() * rows.element_size() for _, _, rows in list_states]
    for index, (metric, name, rows) in enumerate(list_states):
        pieces = []
        for rank_buffer, rows_of_rank in zip(buffers, rows_by_rank, strict=True):
            offset = sum(n * b for n, b in zip(rows_of_rank[:index], row_nbytes[:index], strict=True))
            chunk = rank_buffer[offset : offset + rows_of_rank[index] * row_nbytes[index]]
            pieces.append(_from_bytes(chunk, rows, (rows_of_rank[index], *rows.shape[1:])))
        setattr(metric, name, [torch.cat(pieces)])


def sync_states(metrics: Sequence[Metric], process_group: Any = None, gather: Gather | None = None) -> None:
    """Replace the states of ``metrics`` in place by their reduction over ``process_group``.

    Tensor states need a reduction: ``"sum"``, ``"max"``, ``"min"`` or a callable taking the per-rank values stacked on
    a new first axis (torchmetrics' convention); list states must be reduced by ``"cat"``, and a metric with
    list states provides ``_empty_list_state(name)``: an empty tensor with the dtype, device and trailing shape of
    that state's rows (a rank may have none). Every rank must call this with the same metrics, configured alike; a
    difference raises ``ValueError`` on every rank. ``gather`` is torchmetrics' ``dist_sync_fn`` (default:
    ``torch.distributed.all_gather``), called on byte buffers. No state changes unless both collectives succeed.
    """
    tensor_states, list_states = _collect(metrics)
    if not tensor_states and not list_states:
        return
    device = (tensor_states or list_states)[0][2].device
    row_counts = torch.tensor([rows.shape[0] for _, _, rows in list_states], dtype=torch.int64, device=device)
    fixed = torch.cat([_as_bytes(value) for _, _, value in tensor_states] + [_as_bytes(row_counts)])
    rows = [_as_bytes(rows) for _, _, rows in list_states]
    local_rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.uint8, device=device)
    # Collective 1, a fixed size whatever the configuration: the layout's fingerprint and the payload's sizes.
    meta = torch.tensor(
        [_fingerprint(_layout(tensor_states, list_states)), fixed.numel(), local_rows.numel()], device=device
    )
    meta_by_rank = [rank_meta.tolist() for rank_meta in _all_gather(meta, process_group, gather)]
    _check_layouts(meta_by_rank, metrics)
    # Collective 2: every state's bytes, the rows padded to the longest rank's.
    payload = torch.zeros(fixed.numel() + max(meta[2] for meta in meta_by_rank), dtype=torch.uint8, device=device)
    payload[: fixed.numel()] = fixed
    payload[fixed.numel() : fixed.numel() + local_rows.numel()] = local_rows
    buffers = _all_gather(payload, process_group, gather)
    counts_offset = fixed.numel() - row_counts.numel() * row_counts.element_size()
    rows_by_rank = [
        _from_bytes(buffer[counts_offset : fixed.numel()], row_counts, row_counts.shape).tolist() for buffer in buffers
    ]
    _reduce_tensor_states(tensor_states, buffers)
    if list_states:
        _concatenate_list_states(list_states, [buffer[fixed.numel() :] for buffer in buffers], rows_by_rank)


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
    # when a collective fails halfway (the tensor states already reduced, the list states not).
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
