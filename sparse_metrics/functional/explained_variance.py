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
from sparse_metrics.functional._squares import squared_norms
from sparse_metrics.functional.l2_reconstruction import _squared_error_sum

__all__ = ["explained_variance", "fraction_of_variance_unexplained"]


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


def _squared_deviation(values: Tensor, mean: Tensor) -> Tensor:
    """``Σ_b Σ_d (values - mean)²`` ``[component]`` of ``[batch, component, d_model]`` values (differentiable)."""
    return _sum_of_squares(values - mean)


def _sum_of_squares(deviations: Tensor) -> Tensor:
    """``Σ_b Σ_d deviations²`` ``[component]`` of ``[batch, component, d_model]`` deviations.

    Each item's sum of squares over its contiguous ``d_model`` axis (:func:`squared_norms`: one fused read of the
    deviations, its squared norm where no gradient is kept, the sum of squares where one is: a norm is not twice
    differentiable at an item equal to the mean), then the sum over the items: against float64 as accurate as one
    sum over both axes (2e-8 relative at ``[4096, 512]``).
    """
    return squared_norms(deviations, exact=False).sum(dim=0)


def _centred_batch(
    source: Float[Tensor, "batch component d_model"], dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """One batch's ``Σ (x - x̄)²`` ``[component]`` (differentiable, as :func:`_batch_fvu` computes it) and its mean.

    Returns ``(variance, mean, residual_sum)``: the variance about the batch mean ``x̄`` computed in ``dtype`` (the
    computation dtype), the mean (detached) and ``Σ_b (x_b - x̄)`` (detached, ``[component, d_model]``), the rounding
    left by the mean, from which :func:`_statistics_of` recovers the float64 statistics.
    """
    values = source.to(dtype)
    mean = values.mean(dim=0)
    deviations = values - mean
    if not deviations.requires_grad:  # the usual case: no detach to dispatch
        return _sum_of_squares(deviations), mean, deviations.sum(dim=0)
    return _sum_of_squares(deviations), mean.detach(), deviations.detach().sum(dim=0)


class BatchMoments(NamedTuple):
    """Batches' moments as :func:`_centred_batch` leaves them, from which their float64 statistics follow.

    A metric queues one batch's at every step and folds a queue into its state at once (:func:`_fold_moments`, the
    batches stacked on a leading axis), so that a step computes no float64 statistics and merges nothing.

    Attributes:
        item_count: Number of items of each batch: an int, or ``[batch]`` stacked.
        sum_of_squares: ``Σ_b ‖v_b - a‖²`` ``[component]``, detached, in the dtype it was computed in.
        shift: ``a``, the batch mean as computed (rounded to that dtype), ``[component, d_model]``.
        residual_sum: ``Σ_b (v_b - a)`` ``[component, d_model]``, the rounding the mean left.
        squared_error: The batch's float64 sum of squared errors ``[component]`` (zeros where none is kept).
    """

    item_count: int | Tensor
    sum_of_squares: Tensor
    shift: Tensor
    residual_sum: Tensor
    squared_error: Tensor


def _statistics_of(moments: BatchMoments, dtype: torch.dtype) -> VarianceStatistics:
    r"""The statistics ``[batch, component, ...]`` of stacked batches' moments, with no float64 copy of any batch.

    The deviations :math:`d_b = v_b - a` about the rounded mean :math:`a` are what each batch's FVU is computed from;
    :math:`\bar v = a + \sum_b d_b / n` and :math:`M_2 = \sum_b \lVert d_b \rVert^2 - \lVert \sum_b d_b \rVert^2 / n`
    (the shift identity, in ``dtype``). Near a large offset :math:`v_b - a` is exact (Sterbenz), so the mean keeps
    every digit the inputs have; the per-batch sums are those of the computation dtype, as every metric's per-item
    values.
    """
    counts = torch.as_tensor(moments.item_count, dtype=dtype, device=moments.shift.device)
    count = counts.unsqueeze(-1).expand(moments.sum_of_squares.shape)
    correction = moments.residual_sum.to(dtype)
    mean = moments.shift.to(dtype) + correction / count.unsqueeze(-1)
    m2 = (moments.sum_of_squares.to(dtype) - correction.square().sum(dim=-1) / count).clamp(min=0)
    return VarianceStatistics(count, mean, m2, moments.squared_error.to(dtype))


def _about(statistics: VarianceStatistics, shift: Tensor) -> VarianceStatistics:
    """The statistics about ``shift`` instead of their mean: ``n``, ``n δ`` and ``M2 + n‖δ‖²`` with ``δ = mean - c``."""
    count = statistics.item_count.unsqueeze(-1)
    delta = torch.where(count > 0, statistics.mean - shift, 0.0)
    moment = statistics.m2 + statistics.item_count * delta.square().sum(dim=-1)
    return VarianceStatistics(statistics.item_count, count * delta, moment, statistics.squared_error)


def _from_about(shifted: VarianceStatistics, shift: Tensor) -> VarianceStatistics:
    """The inverse of :func:`_about` for summed statistics: the pooled mean and M2."""
    safe_count = shifted.item_count.clamp(min=1)
    mean = shift + shifted.mean / safe_count.unsqueeze(-1)
    m2 = (shifted.m2 - shifted.mean.square().sum(dim=-1) / safe_count).clamp(min=0)
    return VarianceStatistics(shifted.item_count, mean, m2, shifted.squared_error)


def _largest_mean(statistics: VarianceStatistics) -> Tensor:
    """Per dimension, the largest mean of the stacked sets that have items (0 where none has): a merge's shift."""
    present = statistics.item_count.unsqueeze(-1) > 0
    largest = torch.where(present, statistics.mean, -torch.inf).amax(dim=0)
    return torch.where(present.any(dim=0), largest, 0.0)


def _merge_stacked(statistics: VarianceStatistics) -> VarianceStatistics:
    r"""The pooled statistics ``[component, ...]`` of sets stacked on the first axis, in one vectorised merge.

    About a shift :math:`c` (per dimension, the largest mean of the sets with items), each set's :math:`n_s`,
    :math:`n_s \delta_s` and :math:`M_{2,s} + n_s \lVert\delta_s\rVert^2` with :math:`\delta_s = \bar v_s - c` are
    summed; then :math:`\bar v = c + \sum_s n_s \delta_s / n` and
    :math:`M_2 = \sum_s (M_{2,s} + n_s \lVert\delta_s\rVert^2) - \lVert\sum_s n_s \delta_s\rVert^2 / n`: Chan et al.'s
    parallel merge of every set at once. Only differences of means enter, never :math:`\sum v^2`, so an offset common
    to all items cancels exactly, and a single set with items comes back unchanged; empty sets are the identity. No
    branch on the counts' values: a merge never synchronises with the device.
    """
    shift = _largest_mean(statistics)
    shifted = _about(statistics, shift)
    summed = VarianceStatistics(*(value.sum(dim=0) for value in shifted))
    return _from_about(summed, shift)


def _fold_moments(state: VarianceStatistics, moments: BatchMoments) -> VarianceStatistics:
    """``state`` ``[component, ...]`` merged with stacked batches' statistics (see :func:`_statistics_of`)."""
    batches = _statistics_of(moments, state.mean.dtype)
    stacked = VarianceStatistics(*(torch.cat([own.unsqueeze(0), new]) for own, new in zip(state, batches, strict=True)))
    return _merge_stacked(stacked)


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
    return source, _squared_error_sum(decoded.view(source.shape), source)


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
