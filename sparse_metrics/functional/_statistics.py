"""The per-item statistics one step of the SAE loss needs, in one function: what the compiled path compiles."""

import torch
from jaxtyping import Float
from torch import Tensor

from sparse_metrics.functional._activity_kernel import operator_thresholds
from sparse_metrics.functional.feature_density import _active_mask, _feature_activity
from sparse_metrics.functional.l0_norm import _count_active
from sparse_metrics.functional.l1_absolute import _absolute_sum
from sparse_metrics.functional.l2_reconstruction import _squared_error_sum


def _sae_loss_statistics(
    source: Float[Tensor, "batch component d_model"],
    learned: Float[Tensor, "batch component d_sae"],
    decoded: Float[Tensor, "batch component d_model"],
) -> tuple[Float[Tensor, "batch component"], Float[Tensor, "batch component"], Float[Tensor, "batch component"]]:
    """Per-item squared error (summed over ``d_model``), L0 and L1 of validated inputs.

    Pure tensor code with no data-dependent Python branches, so ``torch.compile(fullgraph=True)`` captures it whole
    and can fuse the L0 and L1 reductions into one pass over the ``[batch, d_sae]`` activations.
    """
    return (
        _squared_error_sum(decoded, source),
        _count_active(learned),
        _absolute_sum(learned),
    )


def _sae_training_statistics(
    source: Float[Tensor, "batch component d_model"],
    learned: Float[Tensor, "batch component d_sae"],
    decoded: Float[Tensor, "batch component d_model"],
    firing_thresholds: tuple[float | None, ...],
    *,
    one_pass: bool,
) -> tuple[Tensor, Tensor, Tensor, tuple[tuple[Tensor, Tensor], ...]]:
    """:func:`_sae_loss_statistics` and, per firing threshold, the features' firing counts and items since fired.

    That is ``FeatureActivity`` without the batch size: one function for the compiler to fuse. The compiler fuses
    reductions along one axis at a time, so the activity (over the items) is a second pass over the ``[batch, d_sae]``
    activations; with ``one_pass`` (where :func:`~sparse_metrics.functional._activity_kernel.applies`) the L0, the L1
    and the activity come from the hand-written CPU pass instead, one read of the activations.
    """
    if one_pass:
        l0, l1, fire_counts, items_since_fired = torch.ops.sparse_metrics.activity_statistics(
            learned, operator_thresholds(firing_thresholds)
        )
        masks = tuple(zip(fire_counts.unbind(), items_since_fired.unbind(), strict=True))
        return _squared_error_sum(decoded, source), l0, l1, masks
    squared_error, l0, l1 = _sae_loss_statistics(source, learned, decoded)
    activities = []
    for threshold in firing_thresholds:
        activity = _feature_activity(_active_mask(learned, threshold))
        activities.append((activity.fire_count, activity.items_since_fired))
    return squared_error, l0, l1, tuple(activities)
