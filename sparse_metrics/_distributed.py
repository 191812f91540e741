"""Packed synchronisation of metric states across processes.

torchmetrics syncs each state of each metric with its own ``all_gather`` (plus a barrier and a shape exchange), about
five collective calls per metric. Here every state of every metric given is exchanged in at most two calls:

1. one ``all_gather`` of a fixed-size byte buffer holding every tensor state and the row count of every list state
   (tensor states have the same shape on every rank, so the buffer has the same length everywhere);
2. only if some rank holds per-item rows, one ``all_gather`` of the list states' bytes, padded to the longest rank.

Bytes are exchanged, not values, so integer counts and float64 sums cross the wire exactly, and every rank reduces
the same per-rank values in the same order: the result is bitwise identical on all ranks.
"""

from __future__ import annotations

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


def _sync_tensor_states(
    tensor_states: list[_State], row_counts: Tensor, group: Any, gather: Gather | None
) -> list[list[int]]:
    """Collective 1: reduce every tensor state in place; return each rank's list-state row counts."""
    header = torch.cat([_as_bytes(value) for _, _, value in tensor_states] + [_as_bytes(row_counts)])
    values_by_state: list[list[Tensor]] = [[] for _ in tensor_states]
    rows_by_rank: list[list[int]] = []
    for rank_buffer in _all_gather(header, group, gather):
        offset = 0
        for values, (_, _, value) in zip(values_by_state, tensor_states, strict=True):
            end = offset + value.numel() * value.element_size()
            values.append(_from_bytes(rank_buffer[offset:end], value, value.shape))
            offset = end
        rows_by_rank.append(_from_bytes(rank_buffer[offset:], row_counts, row_counts.shape).tolist())
    for (metric, name, value), values in zip(tensor_states, values_by_state, strict=True):
        # Reduced in rank order on every rank, so all ranks hold bitwise identical results. A custom reduction gets
        # the per-rank values stacked on a new first axis, as torchmetrics gives them.
        reduction = cast(Callable[[Tensor], Tensor], metric._reductions[name])  # checked by _collect
        stacked = torch.stack(values)
        if reduction in _TENSOR_REDUCTIONS:
            reduced = _TENSOR_REDUCTIONS[reduction](stacked, dim=0)
        else:
            reduced = reduction(stacked)
        setattr(metric, name, reduced.to(value.dtype))
    return rows_by_rank


def _sync_list_states(
    list_states: list[_State], rows_by_rank: list[list[int]], group: Any, gather: Gather | None
) -> None:
    """Collective 2 (only if some rank has rows): concatenate every list state over the ranks, in rank order."""
    row_nbytes = [rows.shape[1:].numel() * rows.element_size() for _, _, rows in list_states]
    rank_nbytes = [sum(n * b for n, b in zip(rows, row_nbytes, strict=True)) for rows in rows_by_rank]
    if max(rank_nbytes) == 0:
        for metric, name, rows in list_states:
            setattr(metric, name, [rows])
        return
    payload = torch.zeros(max(rank_nbytes), dtype=torch.uint8, device=list_states[0][2].device)
    local = torch.cat([_as_bytes(rows) for _, _, rows in list_states])
    payload[: local.numel()] = local
    gathered = _all_gather(payload, group, gather)
    for index, (metric, name, rows) in enumerate(list_states):
        pieces = []
        for rank_buffer, rows_of_rank in zip(gathered, rows_by_rank, strict=True):
            offset = sum(n * b for n, b in zip(rows_of_rank[:index], row_nbytes[:index], strict=True))
            chunk = rank_buffer[offset : offset + rows_of_rank[index] * row_nbytes[index]]
            pieces.append(_from_bytes(chunk, rows, (rows_of_rank[index], *rows.shape[1:])))
        setattr(metric, name, [torch.cat(pieces)])


def sync_states(metrics: Sequence[Metric], process_group: Any = None, gather: Gather | None = None) -> None:
    """Replace the states of ``metrics`` in place by their reduction over ``process_group``.

    Tensor states need a reduction: ``"sum"``, ``"max"``, ``"min"`` or a callable taking the per-rank values stacked on
    a new first axis (torchmetrics' convention); list states must be reduced by ``"cat"``, and a metric with
    list states provides ``_empty_list_state(name)``: an empty tensor with the dtype, device and trailing shape of
    that state's rows (a rank may have none). Every rank must call this with the same metrics, configured alike.
    ``gather`` is torchmetrics' ``dist_sync_fn`` (default: ``torch.distributed.all_gather``), called on byte buffers.
    """
    tensor_states, list_states = _collect(metrics)
    if not tensor_states and not list_states:
        return
    device = (tensor_states or list_states)[0][2].device
    row_counts = torch.tensor([rows.shape[0] for _, _, rows in list_states], dtype=torch.int64, device=device)
    rows_by_rank = _sync_tensor_states(tensor_states, row_counts, process_group, gather)
    if list_states:
        _sync_list_states(list_states, rows_by_rank, process_group, gather)


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
