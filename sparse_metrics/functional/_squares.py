"""Sums of squares over the last axis (squared errors, squared deviations) without a temporary of the input's size.

``values.square().sum(-1)`` writes every square to a new tensor and reads it back; on a CPU that tensor is also
freshly mapped memory (see :mod:`sparse_metrics.functional._blocks`). ``torch.linalg.vector_norm`` reads the input
once, but squaring its root loses the exactness of small integer sums (``3.0`` becomes ``3.0000002``). On a CPU each
row's dot product with itself, one batched matrix product, reads the input once and keeps exact sums exact: at
``[4096, 512]`` float32 it took 110 us against 156 us for the square and the sum, and at ``[4096, 4096]`` 1.4 ms against
5.2 ms, as accurate against float64 as either (3e-7 and 5e-7 relative). Narrower rows do not reach BLAS
(:data:`DOT_MIN_WIDTH`).
"""

from __future__ import annotations

import inspect
from typing import Any, no_type_check

import torch
from torch import Tensor

from sparse_metrics.functional._blocks import blocks_on_cpu, custom_backward, small

_DOT_DTYPES = (torch.float32, torch.float64)
#: Rows narrower than this go through torch's unvectorised loop for small products (``bmm`` hands a product to BLAS
#: from 400 multiply-adds): at ``[4096, 256]`` the dot took 231 us against 73 us for the square and the sum.
DOT_MIN_WIDTH = 400


def squared_norms(values: Tensor, keepdim: bool = False, mean: bool = False, exact: bool = True) -> Tensor:
    """``Σ_d values[..., d]²`` over the last axis (``mean``: divided by its size), differentiable (twice, too).

    In ``values``' dtype. On a CPU, for a contiguous float32 or float64 input larger than
    :data:`~sparse_metrics.functional._blocks.SMALL` elements with rows of at least :data:`DOT_MIN_WIDTH` and outside
    CPU autocast (which would run the product in bfloat16), each row's dot product with itself
    (:class:`_SquaredNorms`); elsewhere the square and the sum (or mean), which a GPU or the compiler runs as they
    are. With ``exact=False`` and no gradient to keep, each row's squared ``vector_norm`` instead, on any device: one
    fused read, the fastest, but the root rounds, so small integer sums are no longer exact.
    """
    if not exact and not (values.requires_grad and torch.is_grad_enabled()):
        norms: Tensor = torch.linalg.vector_norm(values, dim=-1, keepdim=keepdim)
        squares = norms.square()
        return squares / values.shape[-1] if mean else squares
    if not _dot_applies(values):
        squares = values.square()
        return squares.mean(dim=-1, keepdim=keepdim) if mean else squares.sum(dim=-1, keepdim=keepdim)
    result: Tensor
    if values.requires_grad and torch.is_grad_enabled():
        result = _SquaredNorms.apply(values, keepdim)  # type: ignore[no-untyped-call]
    else:
        result = _dot(values, keepdim)  # nothing to differentiate: no autograd Function to pass through
    return result / values.shape[-1] if mean else result


def _dot_applies(values: Tensor) -> bool:
    return (
        values.dtype in _DOT_DTYPES
        and values.ndim >= 2
        and values.shape[-1] >= DOT_MIN_WIDTH
        and blocks_on_cpu(values)
        and not small(values)
        and values.is_contiguous()
        and not torch.is_autocast_enabled("cpu")
        and custom_backward(values)
    )


def _dot(values: Tensor, keepdim: bool) -> Tensor:
    """Each row's dot product with itself: one ``bmm`` of ``[rows, 1, d]`` by ``[rows, d, 1]`` (a transposed view)."""
    rows = values.view(-1, 1, values.shape[-1])
    shape = (*values.shape[:-1], 1) if keepdim else values.shape[:-1]
    return torch.bmm(rows, rows.transpose(1, 2)).view(shape)


# no_type_check: as for ``_AbsoluteSum`` (the test suite's jaxtyping hook would wrap ``forward`` in a checker).
@no_type_check
class _SquaredNorms(torch.autograd.Function):
    """Each row's squared norm as its dot product with itself (:func:`_dot`), with autograd's backward.

    The backward is autograd's for ``square().sum(-1)``, ``values * 2 grad``, written as one product of the input by
    the doubled gradient (bitwise the same: doubling is exact), with differentiable operations on the saved input, so
    that a second derivative is right. A ``bmm``'s own backward would run outer products, ten times slower. Written in
    the ``setup_context`` style with a generated vmap rule, like ``_AbsoluteSum``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(values: Tensor, keepdim: bool) -> Tensor:
        return _dot(values, keepdim)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, bool], output: Tensor) -> None:
        values, keepdim = inputs
        ctx.save_for_backward(values)
        ctx.keepdim = keepdim

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (values,) = ctx.saved_tensors
        doubled = 2 * grad
        return values * (doubled if ctx.keepdim else doubled.unsqueeze(-1)), None


# As for ``_AbsoluteSum``: Function.apply binds its arguments to a precomputed signature.
_SquaredNorms.forward.__signature__ = inspect.signature(_SquaredNorms.forward)  # type: ignore[attr-defined]
