r"""Sparsity penalty: a coefficient times the L1 absolute loss, optionally weighted by decoder row norms.

.. math:: \mathrm{sparsity}_{bc} = \lambda_c \sum_{i} |f_{bci}|
   \qquad \text{or} \qquad
   \mathrm{sparsity}_{bc} = \lambda_c \sum_{i} |f_{bci}| \, \lVert W_{ci} \rVert_2

The weighted form (SAELens, Anthropic's April 2024 update) multiplies each activation by the L2 norm of its
feature-major decoder row :math:`W_{ci} \in \mathbb{R}^{d_{model}}`, so that shrinking activations while growing
decoder rows no longer lowers the penalty. It is differentiable with respect to the decoder as well.
"""

import inspect
from typing import Any, no_type_check

import torch
from jaxtyping import Float
from torch import Tensor

from sparse_metrics._validation import (
    autocast_disabled,
    check_decoder,
    check_sparsity_coefficient,
    computation_dtype,
    infer_d_model,
    to_components,
)
from sparse_metrics.functional._blocks import absolute_blocks, custom_backward
from sparse_metrics.functional._output import batch_output
from sparse_metrics.functional.l1_absolute import _l1_absolute_update


def _sparsity_from_l1(
    l1_per_item: Float[Tensor, "batch component"], sparsity_coefficient: float | Tensor
) -> Float[Tensor, "batch component"]:
    """Scale per-item L1 values by the coefficient (a number, or one per component)."""
    if isinstance(sparsity_coefficient, Tensor):
        sparsity_coefficient = sparsity_coefficient.to(device=l1_per_item.device, dtype=l1_per_item.dtype)
    return l1_per_item * sparsity_coefficient


def _decoder_row_norms(weight: Float[Tensor, "component d_sae d_model"], dtype: torch.dtype) -> Tensor:
    """L2 norm of each feature-major decoder row, ``[component, d_sae]``, in ``dtype``."""
    norms: Tensor
    if custom_backward(weight):
        norms = _RowNorms.apply(weight, dtype)  # type: ignore[no-untyped-call]
    else:
        norms = torch.linalg.vector_norm(weight, dim=-1, dtype=dtype)
    return norms


# no_type_check: as for ``_AbsoluteSum`` (the test suite's jaxtyping hook would wrap ``forward`` in a checker that
# dynamo cannot trace inside an autograd.Function).
@no_type_check
class _RowNorms(torch.autograd.Function):
    """The L2 norm of each row (over the last axis) in ``dtype``, whose backward writes one tensor: the gradient.

    Autograd's backward of ``vector_norm`` divides the input by the norms, fills the zero norms' rows in place and
    multiplies by the gradient: two new tensors of the input's size and three passes over it. For a decoder of
    ``[d_sae, d_model]`` that is every step's largest cost after the ``[batch, d_sae]`` terms (about 20 ms of a 28 ms
    SAELens step at batch 256, d_sae 16384, d_model 512, on a CPU). Here the per-row factor ``grad / norm`` is formed
    first (0 where the norm is 0, as autograd's), and the input is multiplied by it once. Written with
    differentiable operations, in the ``setup_context`` style with a generated vmap rule, like ``_AbsoluteSum``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(weight: Tensor, dtype: torch.dtype) -> Tensor:
        norms: Tensor = torch.linalg.vector_norm(weight, dim=-1, dtype=dtype)
        return norms

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, torch.dtype], output: Tensor) -> None:
        weight, _ = inputs
        ctx.save_for_backward(weight, output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        weight, norms = ctx.saved_tensors
        zero = norms == 0
        # The safe denominator keeps a zero row's factor 0 in a second derivative too (not 0 * inf).
        factor = torch.where(zero, 0.0, grad / torch.where(zero, 1.0, norms)).unsqueeze(-1)
        return torch.mul(weight, factor).to(weight.dtype), None


_RowNorms.forward.__signature__ = inspect.signature(_RowNorms.forward)  # type: ignore[attr-defined]


def _checked_row_norms(decoder_weight: object, activations: Tensor, batched_by_component: bool) -> Tensor:
    """Row norms ``[component, d_sae]`` of a feature-major decoder checked against the activations' shape.

    ``activations`` are ``[batch, component, d_sae]``; ``batched_by_component``: whether they had a component axis.
    """
    weight, _ = check_decoder(
        decoder_weight,
        None,
        num_components=activations.shape[1],
        source_is_batched_by_component=batched_by_component,
        d_sae=activations.shape[-1],
        d_model=infer_d_model(decoder_weight, activations.shape[-1]),
    )
    return _decoder_row_norms(weight, computation_dtype(activations, weight))


def _weighted_l1(
    learned: Float[Tensor, "batch component d_sae"], row_norms: Float[Tensor, "component d_sae"]
) -> Float[Tensor, "batch component"]:
    """Per-item sum of ``|f_i|`` times the norm of decoder row ``i``, in the row norms' dtype.

    Autocast is off: an autocast region would run this contraction in half precision.
    """
    with autocast_disabled(learned.device):
        learned = learned.to(row_norms.dtype)
        if not custom_backward(learned, row_norms):
            return torch.einsum("bcf,cf->bc", learned.abs(), row_norms)
        per_item: Tensor = _WeightedAbsoluteSum.apply(learned, row_norms)  # type: ignore[no-untyped-call]
        return per_item


@no_type_check
class _WeightedAbsoluteSum(torch.autograd.Function):
    """``Σ_i |f_i| n_i`` per item and component: ``[batch, component, d_sae]`` and ``[component, d_sae]`` in.

    Autograd's backward of ``einsum(|f|, n)`` materialises ``grad ⊗ n``, then ``sgn(f)``, then their product: three
    new tensors of the activations' size (at batch 4096, d_sae 16384: 256 MiB each, on a CPU freshly mapped pages
    every step), and it keeps ``|f|`` from the forward. Here the activations' gradient ``sign(f) · grad · n`` is
    written into one new tensor, multiplied in place, and the norms' gradient ``Σ_b |f| grad`` reads ``|f|`` again.
    On a CPU both ``|f|`` are made in blocks of items (see :mod:`sparse_metrics.functional._blocks`), so nothing of
    the activations' size is allocated but the gradient, and nothing is kept from the forward but the inputs (the
    float32 copy of half-precision activations). Written with differentiable operations, in the ``setup_context``
    style with a generated vmap rule, like ``_AbsoluteSum``; autocast stays off in the backward as in the forward.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(learned: Tensor, row_norms: Tensor) -> Tensor:
        parts = [torch.einsum("bcf,cf->bc", magnitude, row_norms) for _, magnitude in absolute_blocks(learned)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        learned, row_norms = ctx.saved_tensors
        grad_learned = grad_norms = None
        with autocast_disabled(learned.device):
            if ctx.needs_input_grad[0]:
                grad_learned = torch.sign(learned).mul_(grad.unsqueeze(-1)).mul_(row_norms)
            if ctx.needs_input_grad[1]:
                for items, magnitude in absolute_blocks(learned):
                    part = torch.einsum("bcf,bc->cf", magnitude, grad[items])
                    grad_norms = part if grad_norms is None else grad_norms + part
        return grad_learned, grad_norms


_WeightedAbsoluteSum.forward.__signature__ = inspect.signature(_WeightedAbsoluteSum.forward)  # type: ignore[attr-defined]


def check_p(p: object) -> float:
    """The exponent of the Lp penalty: a finite number > 0."""
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p < float("inf"):
        raise ValueError(f"`p` must be a finite number > 0, got {p!r}.")
    return float(p)


def _weighted(learned: Tensor, row_norms: Tensor | None) -> Tensor:
    """``f_i ||W_i||`` (or ``f_i`` without row norms) in the row norms' dtype, else the activations' float32/64."""
    dtype = row_norms.dtype if row_norms is not None else computation_dtype(learned)
    return learned.to(dtype) if row_norms is None else learned.to(dtype) * row_norms


def _lp_power_sum(
    learned: Float[Tensor, "batch component d_sae"], row_norms: Tensor | None, p: float
) -> Float[Tensor, "batch component"]:
    """Per-item ``sum_i a_i^p`` of the (weighted) activations ``a_i = |f_i| ||W_i||``, in float32/64.

    Its gradient is 0 (not infinite) at an exact zero for ``p < 1``.
    """
    with autocast_disabled(learned.device):
        magnitude = _weighted(learned, row_norms).abs()
        zero = magnitude == 0
        powered = torch.where(zero, 1.0, magnitude).pow(p)  # no 0 ** (p - 1) in the backward pass
        return torch.where(zero, 0.0, powered).sum(dim=-1)


def _p_root(power_sum: Tensor, p: float) -> Tensor:
    """``power_sum ** (1 / p)``, with value and gradient 0 where the sum is 0 (an item with no active feature)."""
    zero = power_sum == 0
    return torch.where(zero, 0.0, torch.where(zero, 1.0, power_sum).pow(1.0 / p))


def _lp(
    learned: Float[Tensor, "batch component d_sae"], row_norms: Tensor | None, p: float, p_root: bool
) -> Float[Tensor, "batch component"]:
    """Per-item Lp penalty of the (weighted) activations ``a_i = |f_i| ||W_i||``, in float32/64.

    With ``p_root`` the p-norm ``(sum_i a_i^p)^(1/p)`` (``torch.linalg.vector_norm``, as SAELens' ``lp_norm``
    computes it); without, :func:`_lp_power_sum`.
    """
    if not p_root:
        return _lp_power_sum(learned, row_norms, p)
    with autocast_disabled(learned.device):
        norm: Tensor = torch.linalg.vector_norm(_weighted(learned, row_norms), ord=p, dim=-1)
        return norm


def _decoder_weighted_l1_update(
    learned_activations: Tensor, decoder_weight: Tensor, num_components: int | None = None
) -> Float[Tensor, "batch component"]:
    """Validate the inputs; per-item sum of ``|f_i|`` times the L2 norm of decoder row ``i``, ``[batch, component]``."""
    learned = to_components("learned_activations", learned_activations, num_components)
    return _weighted_l1(learned, _checked_row_norms(decoder_weight, learned, learned_activations.ndim == 3))


def _sparsity_update(
    learned_activations: Tensor,
    sparsity_coefficient: float | Tensor,
    num_components: int | None = None,
    decoder_weight: Tensor | None = None,
    p: float = 1.0,
    p_root: bool = True,
) -> Float[Tensor, "batch component"]:
    """Validate the inputs and return the per-item penalty, ``[batch, component]``.

    With ``decoder_weight``, each ``|f_i|`` is weighted by the L2 norm of decoder row ``i``. The coefficient's
    shape and type are checked here; its sign only where it is a Python number, since reading a tensor's values
    would synchronise with the device on every call (the metric checks them once, when set).
    """
    if p != 1:
        learned = to_components("learned_activations", learned_activations, num_components)
        norms = None
        if decoder_weight is not None:
            norms = _checked_row_norms(decoder_weight, learned, learned_activations.ndim == 3)
        l1_per_item = _lp(learned, norms, p, p_root)
    elif decoder_weight is None:
        l1_per_item = _l1_absolute_update(learned_activations, num_components)
    else:
        l1_per_item = _decoder_weighted_l1_update(learned_activations, decoder_weight, num_components)
    coefficient = check_sparsity_coefficient(sparsity_coefficient, l1_per_item.shape[1], check_values=False)
    return _sparsity_from_l1(l1_per_item, coefficient)


def sparsity_loss(
    learned_activations: Float[Tensor, "batch *component d_sae"],
    sparsity_coefficient: float | Float[Tensor, "*component"] = 1e-3,
    *,
    decoder_weight: Float[Tensor, "*component d_sae d_model"] | None = None,
    p: float = 1.0,
    p_root: bool = True,
    keep_batch_dim: bool = False,
) -> Float[Tensor, "..."]:
    r"""Sparsity penalty of a batch: ``sparsity_coefficient`` times the (decoder-norm weighted) L1 absolute loss.

    Args:
        learned_activations: The SAE's feature activations, ``[batch, d_sae]`` or ``[batch, component, d_sae]``.
        sparsity_coefficient: A non-negative number, or a ``[component]`` tensor (one coefficient per component).
        decoder_weight: If given, the feature-major decoder ``[*component, d_sae, d_model]``: each ``|f_i|`` is
            weighted by the L2 norm of row ``i`` (SAELens style); the result is differentiable with respect to it.
        p: The exponent of an Lp penalty (``p > 0``; 1: the L1). With ``p_root`` the p-norm of the (weighted)
            activations, :math:`(\sum_i (|f_i| \lVert W_i \rVert)^p)^{1/p}` (SAELens' ``lp_norm``,
            dictionary_learning's ``"Lp"``); without, :math:`\sum_i (|f_i| \lVert W_i \rVert)^p`
            (dictionary_learning's ``"Lp^p"``).
        p_root: Take the p-th root (see ``p``; no effect for ``p == 1``).
        keep_batch_dim: Return the per-item values ``[batch, *component]`` instead of their batch mean.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import sparsity_loss
        >>> sparsity_loss(torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 3.0]]), 0.5)
        tensor(1.5000)
        >>> decoder_weight = torch.tensor([[3.0, 4.0], [0.0, 1.0], [2.0, 0.0]])  # row norms 5, 1, 2
        >>> sparsity_loss(torch.tensor([[1.0, -2.0, 0.0]]), 0.5, decoder_weight=decoder_weight)
        tensor(3.5000)
        >>> sparsity_loss(torch.tensor([[3.0, -4.0, 0.0]]), 1.0, p=2.0)  # the L2 norm
        tensor(5.)
    """
    per_item = _sparsity_update(learned_activations, sparsity_coefficient, None, decoder_weight, check_p(p), p_root)
    return batch_output(per_item, learned_activations.ndim == 3, keep_batch_dim)
