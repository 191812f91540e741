"""CPU passes over a batch of activations in blocks of items, through one reused buffer per thread.

On a CPU, glibc maps a large temporary afresh at every call (always above 32 MiB, and often from 128 KiB up,
depending on what the process freed before), a page fault per 4 KiB that costs several times the arithmetic: at
batch 4096, d_sae 16384 each 16 MiB block of ``|f|`` cost 3.6 ms made fresh and 0.4 ms written into memory already
touched. ``torch.linalg.vector_norm``'s fused reductions make no temporary but run slower than ``abs`` and ``sum``
(half the speed for the 1-norm; the 0-"norm" branches on every element). So on a CPU a pass that needs a temporary of
the activations' size writes it block by block into a buffer kept for the thread (:func:`scratch`: at most
:data:`ITEM_BLOCK` elements per dtype, 16 MiB of float32, never freed), and a small input simply allocates it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

#: Elements per block on a CPU (16 MiB of float32). Smaller blocks stay in the cache but each operation is a parallel
#: region: on a machine shared with other processes, every region waits for its threads to be scheduled, so few
#: large blocks beat many small ones.
ITEM_BLOCK = 1 << 22
#: Up to this many elements (256 KiB of float32) a temporary is simply allocated: small blocks come from the
#: allocator's free lists, and a view of the scratch buffer would be one more operation dispatched.
SMALL = 1 << 16

_thread = threading.local()


def plain(values: Tensor) -> bool:
    """Whether ``values`` is a plain eager tensor: no subclass (``DTensor``, a fake tensor), no ``torch.func`` wrapper.

    A parameter counts as plain. Only for plain tensors are the blocks (and the package's custom backward passes)
    used: an ``out=`` operation has no batching rule, a fake tensor must not reach the buffer that later real calls
    reuse, and a subclass dispatches its own kernels.
    """
    return type(values) in _PLAIN_TYPES and not torch._C._functorch.is_functorch_wrapped_tensor(values)


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def custom_backward(*tensors: Tensor) -> bool:
    """Whether this package's custom backward passes (autograd Functions) apply: plain tensors, no forward-mode AD.

    They define no ``jvp`` (dynamo cannot trace a Function that has one, and compiling matters more on the hot paths),
    so under forward-mode AD (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``) and inside the other
    ``torch.func`` transforms (``jacrev`` batches the gradient, which an in-place product cannot take) autograd's own
    operations are used: the same values and gradients, at autograd's cost.
    """
    if torch.compiler.is_compiling():  # the Functions trace; the checks below do not (and dynamo sees no wrappers)
        return True
    return torch.autograd.forward_ad._current_level < 0 and all(plain(tensor) for tensor in tensors)


def blocks_on_cpu(values: Tensor) -> bool:
    """Whether a pass over ``values`` runs in blocks of items: eagerly, on a CPU, for a :func:`plain` tensor.

    Elsewhere the fused kernels are used as they are: on other devices (a caching allocator), under
    ``torch.compile`` (the compiler fuses the temporaries away), inside ``torch.func`` transforms, and for tensor
    subclasses.
    """
    return values.device.type == "cpu" and not torch.compiler.is_compiling() and plain(values)


def small(values: Tensor) -> bool:
    """Whether ``values`` has at most :data:`SMALL` elements: its temporaries are simply allocated."""
    return values.numel() <= SMALL


def block_rows(values: Tensor) -> int:
    """Items per block of at most :data:`ITEM_BLOCK` elements of ``values`` (at least one; all when they fit)."""
    per_item = max(math.prod(values.shape[1:]), 1)  # from the shape: indexing an item would dispatch an operation
    return max(1, min(values.shape[0], ITEM_BLOCK // per_item))


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A buffer of ``shape`` that this thread reuses: valid until the next call, and never returned to a caller.

    Kept per thread, dtype and device, grown to the largest block asked for: at most :data:`ITEM_BLOCK` elements
    (16 MiB of float32, 32 MiB of float64). A larger block (one item wider than that) gets a buffer of its own, not
    kept. It is made outside inference mode, so that a buffer first made under ``torch.inference_mode`` can still
    be written to after it.
    """
    numel = math.prod(shape)
    if numel > ITEM_BLOCK:
        with torch.inference_mode(False):
            return torch.empty(shape, dtype=dtype, device=device)
    buffers: dict[tuple[torch.dtype, torch.device], Tensor] = _thread.__dict__.setdefault("buffers", {})
    flat = buffers.get((dtype, device))
    if flat is None or flat.numel() < numel:
        with torch.inference_mode(False):
            flat = buffers[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return flat[:numel].view(shape)


def transformed_blocks(
    values: Tensor, transform: Callable[[Tensor, Tensor], Tensor], dtype: torch.dtype
) -> Iterator[tuple[slice, Tensor]]:
    """``(items, transform(values[items], buffer))`` block by block, every result written into one :func:`scratch`.

    ``transform(block, out)`` writes an elementwise result of ``block``'s shape (in ``dtype``) into ``out`` and
    returns it. A block's result is valid until the next block is made: reduce it first.
    """
    rows = block_rows(values)
    buffer = scratch((rows, *values.shape[1:]), dtype, values.device)
    for start in range(0, values.shape[0], rows):
        items = slice(start, start + rows)
        block = values[items]
        yield items, transform(block, buffer[: block.shape[0]])


def absolute_blocks(values: Tensor) -> Iterator[tuple[slice, Tensor]]:
    """``(items, |values[items]|)``: block by block (see :func:`transformed_blocks`) where the blocks apply.

    Elsewhere one block of the whole batch, ``|values|`` made anew: off a CPU (:func:`blocks_on_cpu`), for a small
    input, and where autograd records the operations (a backward with ``create_graph=True``), which would save the
    buffer that the next block overwrites.
    """
    if not blocks_on_cpu(values) or small(values) or torch.is_grad_enabled():
        yield slice(None), values.abs()
    else:
        yield from transformed_blocks(values, lambda block, out: torch.abs(block, out=out), values.dtype)
