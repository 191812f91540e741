r"""Fraction of variance unexplained (FVU) and explained variance of an SAE's reconstruction.

.. math:: \mathrm{FVU}_c = \frac{\sum_{b} \sum_{d} (x_{bcd} - \hat x_{bcd})^2}
   {\sum_{b} \sum_{d} (x_{bcd} - \bar x_{cd})^2}, \qquad \mathrm{EV}_c = 1 - \mathrm{FVU}_c

where :math:`\bar x_{cd}` is the mean of dimension :math:`d` over every item. Both sums are pooled over every item:
the ratio is not a mean of per-batch or per-process ratios. The denominator is accumulated as (count, mean, M2)
and merged with Chan et al.'s parallel formula, so a large common offset (e.g. ``1e6 + noise``) does not cancel
catastrophically the way :math:`\sum x^2 - n \bar x^2` would.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from sparse_metrics._validation import check_same_shape, computation_dtype, to_components

__all__ = ["explained_variance", "fraction_of_variance_unexplained"]

#: Statistics are kept in float64 (float32 only on a device without it): the means feed differences of near-equal
#: numbers.
_STATISTICS_DTYPE = torch.float64


class VarianceStatistics(NamedTuple):
    """Sufficient statistics of the FVU over a set of items, per component.

    Attributes:
        item_count: Number of items, ``[component]`` float64 (exact below 2**53; the same for every component).
        mean: Per-dimension mean of the source, ``[component, d_model]`` float64.
        m2: Sum over items and dimensions of the squared deviation from ``mean``, ``[component]`` float64.
        squared_error: Sum over items and dimensions of the squared reconstruction error, ``[component]`` float64.
    """

    item_count: Tensor
    mean: Tensor
    m2: Tensor
    squared_error: Tensor


def _source_statistics(
    source: Float[Tensor, "batch component d_model"], dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Two-pass (count, mean, M2) of a batch: the mean first, then the deviations from it."""
    values = source.detach().to(dtype)
    mean = values.mean(dim=0)
    m2 = _squared_deviation(values, mean)
    count = torch.full((source.shape[1],), float(source.shape[0]), dtype=dtype, device=source.device)
    return count, mean, m2


def _squared_deviation(values: Tensor, mean: Tensor) -> Tensor:
    """``Σ_b Σ_d (values - mean)²`` ``[component]`` of ``[batch, component, d_model]`` values (differentiable)."""
    return _sum_of_squares(values - mean)


def _sum_of_squares(deviations: Tensor) -> Tensor:
    """``Σ_b Σ_d deviations²`` ``[component]`` of ``[batch, component, d_model]`` deviations.

    Without a gradient to keep (the source's activations rarely need one), each item's squared 2-norm, summed over the
    items: one fused read of the deviations, where ``square().sum()`` writes the squares to a new tensor of the
    batch's size and reads them back. Each norm reduces an item's contiguous ``d_model`` axis: against float64 the
    result is as accurate as the sum of squares (2e-8 relative at ``[4096, 512]``; one norm over both axes would
    accumulate sequentially, 7e-5). With a gradient, the sum of squares: the norm is not differentiable twice at an
    item equal to the mean.
    """
    if deviations.requires_grad:
        return deviations.square().sum(dim=(0, 2))
    norms: Tensor = torch.linalg.vector_norm(deviations, dim=-1)
    return norms.square().sum(dim=0)


def _batch_statistics(
    source: Float[Tensor, "batch component d_model"],
    squared_error_per_item: Float[Tensor, "batch component"],
    dtype: torch.dtype = _STATISTICS_DTYPE,
) -> VarianceStatistics:
    """The statistics of one validated batch, given each item's squared error summed over ``d_model``."""
    count, mean, m2 = _source_statistics(source, dtype)
    squared_error = squared_error_per_item.detach().sum(dim=0, dtype=dtype)
    return VarianceStatistics(count, mean, m2, squared_error)


def _centred_batch(
    source: Float[Tensor, "batch component d_model"], dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """One batch's ``Σ (x - x̄)²`` ``[component]`` (differentiable, as :func:`_batch_fvu` computes it) and its mean.

    Returns ``(variance, mean, residual_sum)``: the variance about the batch mean ``x̄`` computed in ``dtype`` (the
    computation dtype), the mean (detached) and ``Σ_b (x_b - x̄)`` (detached, ``[component, d_model]``), the rounding
    left by the mean, from which :func:`_shifted_statistics` recovers the float64 statistics.
    """
    values = source.to(dtype)
    mean = values.mean(dim=0)
    deviations = values - mean
    residual_sum = deviations.detach().sum(dim=0)
    return _sum_of_squares(deviations), mean.detach(), residual_sum


def _shifted_statistics(
    batch_size: int,
    variance: Tensor,
    mean: Tensor,
    residual_sum: Tensor,
    squared_error_per_item: Tensor,
    dtype: torch.dtype = _STATISTICS_DTYPE,
) -> VarianceStatistics:
    r"""The float64 statistics of a batch from :func:`_centred_batch`'s, with no float64 copy of the batch.

    The deviations :math:`d_b = x_b - a` about the rounded mean :math:`a` are what the batch's FVU is computed from;
    :math:`\bar x = a + \sum_b d_b / n` and :math:`M_2 = \sum_b \lVert d_b \rVert^2 - \lVert \sum_b d_b \rVert^2 / n`
    (the shift identity, in float64). Near a large offset :math:`x_b - a` is exact (Sterbenz), so the mean keeps every
    digit the inputs have; the per-batch sums are those of the computation dtype, as every metric's per-item values,
    and batches are merged in float64.
    """
    count = torch.full((mean.shape[0],), float(batch_size), dtype=dtype, device=mean.device)
    correction = residual_sum.to(dtype)
    exact_mean = mean.to(dtype) + correction / batch_size
    m2 = (variance.detach().to(dtype) - correction.square().sum(dim=-1) / batch_size).clamp(min=0)
    squared_error = squared_error_per_item.detach().sum(dim=0, dtype=dtype)
    return VarianceStatistics(count, exact_mean, m2, squared_error)


def _merge_statistics(first: VarianceStatistics, second: VarianceStatistics) -> VarianceStatistics:
    r"""Chan et al.'s parallel merge of two sets' statistics.

    .. math:: n = n_A + n_B, \quad \bar x = \bar x_A + \delta\, n_B / n, \quad
       M_2 = M_{2,A} + M_{2,B} + \textstyle\sum_d \delta_d^2\, n_A n_B / n, \quad \delta = \bar x_B - \bar x_A

    Only differences of means enter, never :math:`\sum x^2`, so an offset common to all items cancels exactly.
    An empty set (count 0) is the identity; merging into an empty set copies the other exactly. No branch on the
    counts' values, so a merge never synchronises with the device.
    """
    count = first.item_count + second.item_count
    safe_count = count.clamp(min=1)  # both empty: every term below is 0 instead of 0/0
    delta = second.mean - first.mean
    mean = first.mean + delta * (second.item_count / safe_count).unsqueeze(-1)
    m2 = first.m2 + second.m2 + delta.square().sum(dim=-1) * (first.item_count * second.item_count / safe_count)
    return VarianceStatistics(count, mean, m2, first.squared_error + second.squared_error)


def _residual_statistics(
    source: Float[Tensor, "batch component d_model"],
    decoded: Float[Tensor, "batch component d_model"],
    dtype: torch.dtype = _STATISTICS_DTYPE,
) -> VarianceStatistics:
    """(count, mean, M2) of the residual ``x_hat - x`` of one batch, as the source's are kept (no squared error)."""
    residual = decoded.detach().to(dtype) - source.detach().to(dtype)
    count, mean, m2 = _source_statistics(residual, dtype)
    return VarianceStatistics(count, mean, m2, torch.zeros_like(m2))


def _batch_centred_fvu(source: Tensor, decoded: Tensor) -> Float[Tensor, " component"]:
    """Differentiable centred-residual FVU ``[component]`` of one batch: ``sum (e - e_bar)^2 / sum (x - x_bar)^2``.

    This is ``sum_d Var(e_d) / sum_d Var(x_d)`` with either variance (the ``n - 1`` cancels); 0/0 (one item) is NaN.
    """
    dtype = computation_dtype(decoded, source)
    values, error = source.to(dtype), decoded.to(dtype) - source.to(dtype)
    return _squared_deviation(error, error.mean(dim=0)) / _squared_deviation(values, values.mean(dim=0))


def _fvu_update(
    decoded_activations: Tensor, source_activations: Tensor, num_components: int | None = None
) -> tuple[Tensor, Tensor]:
    """Validate the inputs; return the source ``[batch, component, d_model]`` and per-item squared errors.

    The per-item error is summed over ``d_model`` in the inputs' computation dtype and stays differentiable.
    """
    source = to_components("source_activations", source_activations, num_components)
    decoded = check_same_shape("decoded_activations", decoded_activations, "source_activations", source_activations)
    dtype = computation_dtype(decoded, source)
    error = decoded.view(source.shape).to(dtype) - source.to(dtype)
    return source, error.square().sum(dim=-1)


def _fvu_compute(squared_error: Tensor, m2: Tensor) -> Tensor:
    """The pooled ratio; 0/0 gives NaN and a non-zero error over zero variance gives inf."""
    return squared_error / m2


def _batch_fvu(source: Tensor, squared_error_per_item: Tensor) -> Float[Tensor, " component"]:
    """Differentiable FVU ``[component]`` of one batch, in the computation dtype of the squared errors."""
    values = source.to(squared_error_per_item.dtype)
    return squared_error_per_item.sum(dim=0) / _squared_deviation(values, values.mean(dim=0))


def fraction_of_variance_unexplained(
    decoded_activations: Float[Tensor, "batch *component d_model"],
    source_activations: Float[Tensor, "batch *component d_model"],
    centred_residual: bool = False,
) -> Float[Tensor, "*component"]:
    """Fraction of the source's variance (around its per-dimension batch mean) the reconstruction misses.

    Args:
        decoded_activations: The SAE's reconstruction, ``[batch, d_model]`` or ``[batch, component, d_model]``.
        source_activations: The SAE's input, same shape.
        centred_residual: Centre the residual too: ``sum_d Var(e_d) / sum_d Var(x_d)`` (dictionary_learning's
            ``evaluate``), which does not count a constant offset of the reconstruction; NaN for one item.

    Returns:
        ``[*component]`` (0-d without a component axis), differentiable with respect to the inputs.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import fraction_of_variance_unexplained
        >>> source = torch.tensor([[0.0], [2.0], [4.0], [6.0]])
        >>> decoded = torch.tensor([[1.0], [1.0], [5.0], [5.0]])
        >>> fraction_of_variance_unexplained(decoded, source)
        tensor(0.2000)
    """
    if not isinstance(centred_residual, bool):
        raise TypeError(f"`centred_residual` must be a bool, got {type(centred_residual).__name__}.")
    source, squared_error = _fvu_update(decoded_activations, source_activations)
    if centred_residual:
        value = _batch_centred_fvu(source, decoded_activations.reshape(source.shape))
    else:
        value = _batch_fvu(source, squared_error)
    return value if source_activations.ndim == 3 else value.squeeze(-1)


def explained_variance(
    decoded_activations: Float[Tensor, "batch *component d_model"],
    source_activations: Float[Tensor, "batch *component d_model"],
    centred_residual: bool = False,
) -> Float[Tensor, "*component"]:
    """Explained variance of a batch: ``1 - fraction_of_variance_unexplained``.

    Args:
        decoded_activations: The SAE's reconstruction, ``[batch, d_model]`` or ``[batch, component, d_model]``.
        source_activations: The SAE's input, same shape.
        centred_residual: ``1 - sum_d Var(e_d) / sum_d Var(x_d)``, dictionary_learning's ``evaluate``.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import explained_variance
        >>> source = torch.tensor([[0.0], [2.0], [4.0], [6.0]])
        >>> explained_variance(torch.tensor([[1.0], [1.0], [5.0], [5.0]]), source)
        tensor(0.8000)
    """
    return 1 - fraction_of_variance_unexplained(decoded_activations, source_activations, centred_residual)
