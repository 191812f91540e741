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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat, dim_zero_max, dim_zero_min, dim_zero_sum

__all__ = ["sync_states", "synced_states"]

_TENSOR_REDUCTIONS = {dim_zero_sum: torch.sum, dim_zero_max: torch.amax, dim_zero_min: torch.amin}


def _as_bytes(tensor: Tensor) -> Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _from_bytes(buffer: Tensor, like: Tensor, shape: Sequence[int]) -> Tensor:
    # clone: a view at an arbitrary byte offset may be misaligned for a wider dtype.
    return buffer.clone().view(like.dtype).reshape(shape)


def _all_gather(buffer: Tensor, group: Any, world_size: int) -> list[Tensor]:
    gathered = [torch.empty_like(buffer) for _ in range(world_size)]
    dist.all_gather(gathered, buffer, group=group)
    return gathered


def sync_states(metrics: Sequence[Metric], process_group: Any = None) -> None:
    """Replace the states of ``metrics`` in place by their reduction over ``process_group``.

    Tensor states must be reduced by ``"sum"``, ``"max"`` or ``"min"``; list states by ``"cat"``, and a metric with
    list states provides ``_empty_list_state(name)``: an empty tensor with the dtype, device and trailing shape of
    that state's rows (a rank may have none). Every rank must call this with the same metrics, configured alike.
    """
    world_size = dist.get_world_size(process_group)
    tensor_states: list[tuple[Metric, str, Tensor]] = []
    list_states: list[tuple[Metric, str, Tensor]] = []
    for metric in metrics:
        for name, reduction in metric._reductions.items():
            value = getattr(metric, name)
            if isinstance(value, Tensor) and reduction in _TENSOR_REDUCTIONS:
                tensor_states.append((metric, name, value))
            elif isinstance(value, list) and reduction is dim_zero_cat:
                rows = dim_zero_cat(value) if value else metric._empty_list_state(name)  # type: ignore[attr-defined]
                list_states.append((metric, name, rows))
            else:
                raise TypeError(
                    f"{type(metric).__name__}.{name}: packed sync supports tensor states reduced by sum/max/min "
                    f"and list states reduced by cat, got {type(value).__name__} with {reduction}."
                )
    if not tensor_states and not list_states:
        return
    device = (tensor_states or list_states)[0][2].device

    # 1. Tensor states and the row count of each list state, in one fixed-size buffer.
    row_counts = torch.tensor([rows.shape[0] for _, _, rows in list_states], dtype=torch.int64, device=device)
    header = torch.cat([_as_bytes(value) for _, _, value in tensor_states] + [_as_bytes(row_counts)])
    gathered = _all_gather(header, process_group, world_size)
    parts: list[list[Tensor]] = [[] for _ in tensor_states]
    per_rank_rows: list[list[int]] = []
    for rank_buffer in gathered:
        offset = 0
        for index, (_, _, value) in enumerate(tensor_states):
            end = offset + value.numel() * value.element_size()
            parts[index].append(_from_bytes(rank_buffer[offset:end], value, value.shape))
            offset = end
        per_rank_rows.append(_from_bytes(rank_buffer[offset:], row_counts, row_counts.shape).tolist())
    for (metric, name, value), values_by_rank in zip(tensor_states, parts):
        # Reduced in rank order on every rank, so all ranks hold bitwise identical results.
        reduce = _TENSOR_REDUCTIONS[metric._reductions[name]]
        setattr(metric, name, reduce(torch.stack(values_by_rank), dim=0).to(value.dtype))
    if not list_states:
        return

    # 2. Every list state's rows, as bytes, padded to the longest rank.
    row_nbytes = [rows.shape[1:].numel() * rows.element_size() for _, _, rows in list_states]
    rank_nbytes = [sum(n * b for n, b in zip(rows, row_nbytes)) for rows in per_rank_rows]
    if max(rank_nbytes) == 0:
        for metric, name, rows in list_states:
            setattr(metric, name, [rows])
        return
    payload = torch.zeros(max(rank_nbytes), dtype=torch.uint8, device=device)
    local = torch.cat([_as_bytes(rows) for _, _, rows in list_states])
    payload[: local.numel()] = local
    gathered = _all_gather(payload, process_group, world_size)
    for index, (metric, name, rows) in enumerate(list_states):
        pieces = []
        for rank_buffer, rows_of_rank in zip(gathered, per_rank_rows):
            offset = sum(n * b for n, b in zip(rows_of_rank[:index], row_nbytes[:index]))
            count = rows_of_rank[index]
            chunk = rank_buffer[offset : offset + count * row_nbytes[index]]
            pieces.append(_from_bytes(chunk, rows, (count, *rows.shape[1:])))
        setattr(metric, name, [torch.cat(pieces)])


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
    # Syncing replaces state attributes with new objects, so references are enough to restore the local state.
    local = [{name: getattr(m, name) for name in m._defaults} for m in to_sync]
    sync_states(to_sync, process_group)
    for metric in to_sync:
        metric._to_sync = False
    try:
        yield
    finally:
        for metric, states in zip(to_sync, local):
            for name, value in states.items():
                setattr(metric, name, value)
            metric._to_sync = metric.sync_on_compute
