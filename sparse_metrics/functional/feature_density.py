r"""Feature density: the fraction of items in which each dictionary feature is active (non-zero).

.. math:: \rho_{ci} = \frac{1}{N} \sum_{b=1}^{N} \mathbb{1}[f_{bci} \neq 0], \qquad
   \overline{\log_{10} \rho}_c = \frac{1}{d_{sae}} \sum_{i=1}^{d_{sae}} \log_{10}(\rho_{ci} + \epsilon)

with :math:`\epsilon = 10^{-10}` (:data:`DENSITY_EPSILON`), so that a feature that never fired counts as
:math:`10^{-10}` instead of :math:`-\infty`. Features that never fire show as a spike at -10 in the usual
log10-density histogram.

One boolean activity mask per batch feeds everything that looks at which features fired: the per-item L0, the
per-feature firing counts of the density and the items since each feature last fired (dead features).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from sparse_metrics._validation import to_components

__all__ = ["DENSITY_BANDS", "DENSITY_EPSILON", "feature_density", "mean_log10_feature_density"]

#: Added to every density before the log10, so that a dead feature gives -10 rather than -inf.
DENSITY_EPSILON = 1e-10

#: The density bands practitioners log (SAELens, lm_saes): name -> (comparison, threshold), strict comparisons.
DENSITY_BANDS: dict[str, tuple[str, float]] = {
    "feature_density_above_1e-1": (">", 1e-1),
    "feature_density_above_1e-2": (">", 1e-2),
    "feature_density_below_1e-5": ("<", 1e-5),
    "feature_density_below_1e-6": ("<", 1e-6),
    "feature_density_never_fired": ("==", 0.0),
}


class FeatureActivity(NamedTuple):
    """What one batch says about each feature's firing.

    Attributes:
        fire_count: Number of items in which each feature is non-zero, ``[component, d_sae]`` int64.
        items_since_fired: Number of items of the batch after the last one in which the feature fired (0 if it
            fired on the last item); the batch size if it did not fire. ``[component, d_sae]`` int64.
        batch_size: Number of items in the batch.
    """

    fire_count: Tensor
    items_since_fired: Tensor
    batch_size: int


def _active_mask(learned: Tensor, firing_threshold: float | None = None) -> Tensor:
    """Where each feature fires: ``f != 0``, or ``f > firing_threshold``; NaN fires either way."""
    values = learned.detach()
    return values != 0 if firing_threshold is None else ~(values <= firing_threshold)


def _check_firing_threshold(firing_threshold: float | None) -> None:
    if firing_threshold is None:
        return
    if isinstance(firing_threshold, bool) or not isinstance(firing_threshold, (int, float)):
        raise TypeError(f"`firing_threshold` must be a number or None, got {type(firing_threshold).__name__}.")
    if not (0.0 <= firing_threshold < float("inf")):
        raise ValueError(f"`firing_threshold` must be a finite number >= 0, got {firing_threshold}.")


def _active_features(
    learned_activations: Tensor,
    num_components: int | None = None,
    num_features: int | None = None,
    firing_threshold: float | None = None,
) -> Bool[Tensor, "batch component d_sae"]:
    """Validate the activations and return which features fire on each item (see :func:`_active_mask`)."""
    _check_firing_threshold(firing_threshold)
    learned = to_components("learned_activations", learned_activations, num_components)
    if num_features is not None and learned.shape[-1] != num_features:
        raise ValueError(
            f"`learned_activations` must have num_features={num_features} features in its last axis, "
            f"got shape {list(learned_activations.shape)}."
        )
    return _active_mask(learned, firing_threshold)


def _feature_activity(active: Bool[Tensor, "batch component d_sae"]) -> FeatureActivity:
    """Firing counts and items since the last firing of every feature, from the batch's activity mask."""
    batch_size = active.shape[0]
    # The last item in which each feature fired, counted from 1 (0: it did not fire): the maximum over the items of
    # ``index where active``; the items after it are ``batch_size - last``, the whole batch for a feature that did not
    # fire. Indices are int16 while the batch allows (half the memory traffic of int32).
    index_dtype = torch.int16 if batch_size < 2**15 else torch.int32
    positions = torch.arange(1, batch_size + 1, dtype=index_dtype, device=active.device).view(-1, 1, 1)
    if batch_size <= _ACTIVITY_BLOCK or active.device.type != "cpu":
        fire_count = active.sum(dim=0, dtype=torch.int64)
        last = torch.where(active, positions, 0).amax(dim=0) if batch_size else torch.zeros_like(fire_count)
        return FeatureActivity(fire_count, batch_size - last.to(torch.int64), batch_size)
    # On a CPU a reduction over the leading (item) axis of a large mask is several times faster in blocks of items,
    # each block's rows reduced while they are in the cache: the compiler is given the blocks as an axis of their own
    # (one fused pass over the mask for both statistics, then a small pass over the blocks' partial results), eager
    # code reduces one block at a time.
    if torch.compiler.is_compiling():
        # int32 indices: inductor's CPU code vectorises a reduction whose accumulators share one integer type. Its
        # loop reads a few features of every row of a block before moving on, one memory stream per row: blocks of
        # _COMPILED_ACTIVITY_BLOCK rows keep the streams few enough for the hardware prefetcher.
        positions = positions.int()
        blocked = batch_size // _COMPILED_ACTIVITY_BLOCK * _COMPILED_ACTIVITY_BLOCK
        blocks = active[:blocked].reshape(-1, _COMPILED_ACTIVITY_BLOCK, *active.shape[1:])
        block_positions = positions[:blocked].reshape(-1, _COMPILED_ACTIVITY_BLOCK, 1, 1)
        fire_count32 = blocks.sum(dim=1, dtype=torch.int32).sum(dim=0)
        last = torch.where(blocks, block_positions, 0).amax(dim=1).amax(dim=0)
        if blocked < batch_size:
            rest = active[blocked:]
            fire_count32 = fire_count32 + rest.sum(dim=0, dtype=torch.int32)
            last = torch.maximum(last, torch.where(rest, positions[blocked:], 0).amax(dim=0))
        return FeatureActivity(fire_count32.to(torch.int64), batch_size - last.to(torch.int64), batch_size)
    fire_count32 = torch.zeros(active.shape[1:], dtype=torch.int32, device=active.device)
    last = torch.zeros(active.shape[1:], dtype=index_dtype, device=active.device)
    for start in range(0, batch_size, _ACTIVITY_BLOCK):
        block = active[start : start + _ACTIVITY_BLOCK]
        fire_count32 += block.sum(dim=0, dtype=torch.int32)
        torch.maximum(last, torch.where(block, positions[start : start + _ACTIVITY_BLOCK], 0).amax(dim=0), out=last)
    return FeatureActivity(fire_count32.to(torch.int64), batch_size - last.to(torch.int64), batch_size)


#: Items per block of :func:`_feature_activity` on a CPU; a batch of at most this many is reduced at once.
_ACTIVITY_BLOCK = 64
#: Items per block of the traced (``torch.compile``) activity on a CPU. At batch 4096, d_sae 16384 (2 cores, fp32)
#: the fused blocked pass took 22-24 ms in blocks of 16 items, 25-36 ms of 32, 27-44 ms of 64 and 67 ms of 8 (the
#: blocks' partial results grow as the blocks shrink), against 9-11 ms for one ``f.sum()``.
_COMPILED_ACTIVITY_BLOCK = 16


def _l0_from_active(active: Bool[Tensor, "batch component d_sae"], dtype: torch.dtype) -> Tensor:
    """Per-item L0 ``[batch, component]`` from the activity mask (equal to ``_l0_norm_update``)."""
    return active.sum(dim=-1, dtype=dtype)


def _density_compute(fire_count: Tensor, item_count: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Fraction of items in which each feature fired (float64 unless told otherwise); NaN with no item."""
    return fire_count.to(dtype) / item_count


#: The comparison of each kind of band in ``DENSITY_BANDS``.
_BAND_COMPARISONS = {">": torch.gt, "<": torch.lt, "==": torch.eq}


def _density_band_fractions(density: Tensor) -> dict[str, Tensor]:
    """Fraction ``[*component]`` of the features whose density is in each band of ``DENSITY_BANDS``, by name.

    Every band is compared into one stacked mask and counted by one reduction (a fraction is its count over
    ``d_sae``, as a mean of 0/1 values gives it). NaN where the density is NaN (no item seen): a band of no items is
    undefined, as the mean log density is.
    """
    inside = torch.stack(
        [_BAND_COMPARISONS[comparison](density, threshold) for comparison, threshold in DENSITY_BANDS.values()]
    )
    fractions = inside.sum(dim=-1, dtype=density.dtype) / density.shape[-1]
    fractions = torch.where(density.isnan().any(dim=-1), torch.nan, fractions)
    return dict(zip(DENSITY_BANDS, fractions.unbind(), strict=True))


def _mean_log10(density: Tensor, epsilon: float) -> Tensor:
    return torch.log10(density + epsilon).mean(dim=-1)


def feature_density(
    learned_activations: Float[Tensor, "batch *component d_sae"], firing_threshold: float | None = None
) -> Float[Tensor, "*component d_sae"]:
    """Fraction of the batch's items in which each feature fires (is non-zero, or above ``firing_threshold``).

    Args:
        learned_activations: The SAE's feature activations, ``[batch, d_sae]`` or ``[batch, component, d_sae]``.
        firing_threshold: ``None`` (default): a feature fires where it is non-zero; a number ``t >= 0``: where
            ``f > t`` (OpenAI counts a latent as fired above ``1e-3``).

    Returns:
        ``[*component, d_sae]`` float64.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import feature_density
        >>> feature_density(torch.tensor([[1.0, 0.0, 0.0], [2.0, 3.0, 0.0]]))
        tensor([1.0000, 0.5000, 0.0000], dtype=torch.float64)
    """
    active = _active_features(learned_activations, firing_threshold=firing_threshold)
    fire_count = active.sum(dim=0, dtype=torch.int64)
    density = _density_compute(fire_count, torch.tensor(active.shape[0]))
    return density if learned_activations.ndim == 3 else density.squeeze(0)


def mean_log10_feature_density(
    density: Float[Tensor, "*component d_sae"], epsilon: float = DENSITY_EPSILON
) -> Float[Tensor, "*component"]:
    r"""Mean over features of :math:`\log_{10}(\rho + \epsilon)`, the summary SAE dashboards log.

    Args:
        density: Feature densities, ``[*component, d_sae]`` (e.g. from ``feature_density``).
        epsilon: Added before the log so that a never-firing feature counts as ``log10(epsilon)``; default 1e-10.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import mean_log10_feature_density
        >>> mean_log10_feature_density(torch.tensor([1.0, 0.01, 0.0], dtype=torch.float64))
        tensor(-4.0000, dtype=torch.float64)
    """
    if not isinstance(density, Tensor) or not density.is_floating_point():
        raise TypeError(f"`density` must be a floating-point tensor, got {getattr(density, 'dtype', type(density))}.")
    if not (0.0 < epsilon < float("inf")):
        raise ValueError(f"`epsilon` must be a finite positive number, got {epsilon}.")
    return _mean_log10(density, epsilon)
