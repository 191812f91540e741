r"""Dead features: dictionary features that have not fired within the last ``window`` items.

For each feature, :math:`s_i` counts the items seen *after* the last item in which it fired (0 if it fired on the
most recent item; every item seen if it never fired). The rule is

.. math:: \mathrm{dead}_i = \big[\, s_i \geq w \,\big]

in **items** (tokens), not steps: a feature that fired exactly ``window`` items ago (``window`` items came after
it) is dead; one that fired ``window - 1`` items ago is alive; a feature that never fired becomes dead once
``window`` items have been seen.

Across processes, items are taken to advance in lockstep: the :math:`k`-th most recent item of every process's
stream counts as seen at the same time (data-parallel training, where every process takes a batch at each step).
With :math:`n_r` items seen by process :math:`r` and :math:`m` the smallest :math:`s_{ri}` among the processes on
which the feature fired (its most recent firing anywhere; :math:`\infty` if it never fired), the global count is

.. math:: s_i = \sum_r \min(m, n_r)

the items all processes saw since; a feature that never fired has seen every item, :math:`\sum_r n_r`. A process
that saw nothing neither counts nor vetoes. With one process this is its own count.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from sparse_metrics.functional.feature_density import FeatureActivity, _active_features, _feature_activity

__all__ = ["dead_feature_mask", "items_since_fired"]


def _advance(items_since_fired: Tensor, activity: FeatureActivity) -> Tensor:
    """The counters after one more batch: reset by a firing in it, else grown by the batch size."""
    return torch.where(activity.fire_count > 0, activity.items_since_fired, items_since_fired + activity.batch_size)


def _combine_processes(items_since_fired: Tensor, items_seen: Tensor) -> Tensor:
    """Global items since fired from each process's counters (lockstep rule of the module docstring).

    Both inputs are int64 ``[process, ...]`` (the items seen broadcast to the counters' shape).
    """
    # A process's count equals its items seen exactly when the feature never fired there (a firing on its first
    # item leaves n - 1); such a process, or one with no items, says nothing about the most recent firing.
    fired = items_since_fired < items_seen
    never = torch.iinfo(items_since_fired.dtype).max
    most_recent = torch.where(fired, items_since_fired, never).amin(dim=0)
    return torch.minimum(most_recent, items_seen).sum(dim=0)


def _advance_steps(steps_since_fired: Tensor, activity: FeatureActivity) -> Tensor:
    """The step counters after one more step (an update, whatever its items): 0 where it fired, else one more."""
    return torch.where(activity.fire_count > 0, 0, steps_since_fired + 1)


def _combine_processes_steps(steps_since_fired: Tensor, steps_seen: Tensor) -> Tensor:
    """Global steps since fired from each process's step counters: a step is global, counted once, not per process.

    Both inputs are int64 ``[process, ...]``. The most recent steps of the processes are simultaneous (lockstep):
    the global count is the smallest count among the processes where the feature fired, and the most steps any
    process saw where it fired nowhere.
    """
    fired = steps_since_fired < steps_seen
    never = torch.iinfo(steps_since_fired.dtype).max
    most_recent = torch.where(fired, steps_since_fired, never).amin(dim=0)
    return torch.minimum(most_recent, steps_seen.amax(dim=0))


def _dead_compute(items_since_fired: Tensor, window: int) -> Tensor:
    return items_since_fired >= window


def items_since_fired(
    learned_activations: Float[Tensor, "batch *component d_sae"], firing_threshold: float | None = None
) -> Int[Tensor, "*component d_sae"]:
    """Items of the batch after the last one in which each feature fired; the batch size if it never fired.

    Args:
        learned_activations: The SAE's feature activations, ``[batch, d_sae]`` or ``[batch, component, d_sae]``;
            items in order, the most recent last.
        firing_threshold: ``None`` (default): a feature fires where it is non-zero; a number ``t >= 0``: where
            ``f > t``.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import items_since_fired
        >>> items_since_fired(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))
        tensor([2, 1, 3])
    """
    activity = _feature_activity(_active_features(learned_activations, firing_threshold=firing_threshold))
    since = activity.items_since_fired
    return since if learned_activations.ndim == 3 else since.squeeze(0)


def dead_feature_mask(
    learned_activations: Float[Tensor, "batch *component d_sae"], window: int, firing_threshold: float | None = None
) -> Bool[Tensor, "*component d_sae"]:
    """Features that fired in none of the batch's last ``window`` items (``items_since_fired >= window``).

    Args:
        learned_activations: ``[batch, d_sae]`` or ``[batch, component, d_sae]``, the most recent item last.
        window: Positive number of items.
        firing_threshold: ``None`` (default): a feature fires where it is non-zero; a number ``t >= 0``: where
            ``f > t``.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import dead_feature_mask
        >>> f = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
        >>> dead_feature_mask(f, window=2)
        tensor([ True, False,  True])
    """
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"`window` must be a positive int, got {type(window).__name__}.")
    if window < 1:
        raise ValueError(f"`window` must be a positive number of items, got {window}.")
    return _dead_compute(items_since_fired(learned_activations, firing_threshold), window)
