"""Dead-feature metric: features that have not fired within the last ``window`` items, with a lifetime of its own."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from sparse_metrics._config import NumComponents, NumFeatures, PositiveInt, validate_arguments
from sparse_metrics.functional.dead_features import _advance, _combine_processes, _dead_compute
from sparse_metrics.functional.feature_density import FeatureActivity
from sparse_metrics.metrics._activity import ActivityMetric

__all__ = ["DeadFeatures"]


def _reduce_counters(stacked: Tensor) -> Tensor:
    """Packed-sync reduction of the ``[process, component, num_features + 1]`` counters (lockstep rule)."""
    since, seen = stacked[..., :-1], stacked[..., -1:]
    combined = _combine_processes(since, seen.expand_as(since))
    return torch.cat([combined, seen.sum(dim=0)], dim=-1)


class DeadFeatures(ActivityMetric):
    r"""Number of features that have not fired within the last ``window`` items (tokens), across processes.

    For feature :math:`i`, :math:`s_i` counts the items seen after the last item in which it was non-zero (every
    item seen if it never fired), and

    .. math:: \mathrm{dead}_i = [\, s_i \geq w \,], \qquad \mathrm{compute}() = \sum_i \mathrm{dead}_i

    - **Items, >=.** A feature that fired exactly ``window`` items ago (``window`` items seen after it) is dead,
      one that fired ``window - 1`` items ago is alive, and one that never fired is dead once ``window`` items
      have been seen. Items inside a batch are in order, the most recent last.
    - **SAELens** counts *steps* since a feature fired and calls it dead when that count is ``> N``: with
      ``batch_size`` items per step, ``window = (N + 1) * batch_size`` gives exactly SAELens' mask (a feature last
      fired at position ``j`` of a batch, then ``k`` silent steps, has ``k * B + B - 1 - j`` items since, which is
      ``>= (N + 1) * B`` exactly when ``k > N``).
    - **saev / OpenAI** count *tokens* since a feature fired: pass that token threshold as ``window``
      (OpenAI's "not fired for 10M tokens" is ``window=10_000_000``).
    - **Across processes** items advance in lockstep (the ``k``-th most recent item of every process at the same
      time, as in data-parallel training): with ``n_r`` items on process ``r`` and ``m`` the smallest count among
      the processes where the feature fired (its most recent firing anywhere), the global count is
      :math:`\sum_r \min(m, n_r)`, the items all processes saw since (:math:`\sum_r n_r` if it never fired).
      OpenAI takes the MIN of per-process counts; this counts the same firing in global tokens. A process that saw
      nothing neither counts nor vetoes. Every process gets the same result.

    **Lifetime.** The counters span the whole run, not an epoch: :meth:`reset` (which
    :class:`torchmetrics.MetricCollection` calls at each epoch end, with the loss metrics') leaves them as they
    are; :meth:`reset_counters` clears them (e.g. after resampling). They are int64, saved in ``state_dict`` and
    restored by ``load_state_dict``.

    ``update(learned_activations)`` takes ``[batch, num_features]`` or ``[batch, component, num_features]``.
    ``compute()`` returns the number of dead features, int64 ``[*component]`` (0-d for one component; a collection
    also reports their fraction as ``dead_feature_fraction``); :meth:`dead_mask` the boolean mask
    ``[*component, num_features]`` (for resampling) and :meth:`items_since_fired` the global counts; all synced
    across processes.

    Args:
        num_features: The dictionary size ``d_sae``.
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        window: Positive number of items (tokens).
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from sparse_metrics import DeadFeatures
        >>> metric = DeadFeatures(num_features=3, window=2)
        >>> metric.update(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))
        >>> metric.items_since_fired()
        tensor([2, 1, 3])
        >>> metric.dead_mask()
        tensor([ True, False,  True])
        >>> metric.compute()
        tensor(2)
        >>> metric.reset()  # an epoch ends: the counters go on
        >>> metric.compute()
        tensor(2)
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False
    plot_lower_bound = 0.0

    _counter_state: ClassVar[str] = "dead_counters"

    dead_counters: Tensor

    @validate_arguments
    def __init__(
        self, num_features: NumFeatures, num_components: NumComponents = 1, *, window: PositiveInt, **kwargs: Any
    ) -> None:
        super().__init__(num_features, num_components, **kwargs)
        self.window = window
        # [component, num_features + 1]: items since each feature fired, then the items seen (repeated per
        # component). One state, so that the cross-process reduction sees both together.
        self.add_state(
            self._counter_state,
            torch.zeros(num_components, self.local_features + 1, dtype=torch.int64),
            dist_reduce_fx=_reduce_counters,
            persistent=True,
        )
        self._add_configuration_marker()

    def _configuration(self) -> dict[str, Any]:
        return {**super()._configuration(), "window": self.window}

    def _record(self, contribution: FeatureActivity) -> None:
        since, seen = self.dead_counters[:, :-1], self.dead_counters[:, -1:]
        self.dead_counters = torch.cat([_advance(since, contribution), seen + contribution.batch_size], dim=-1)

    def _value(self, contribution: FeatureActivity) -> Tensor:
        """Dead features on this process after the batch (forward's value), of the whole dictionary when sharded."""
        return self._squeeze(self._sum_over_shards(self._mask().sum(dim=-1)))

    def _derived_outputs(self) -> dict[str, bool | None]:
        """``dead_feature_fraction``: the dead features' share of the dictionary."""
        return {"dead_feature_fraction": False}

    def _derived_value(self, name: str, contribution: FeatureActivity) -> Tensor:
        if name != "dead_feature_fraction":
            raise KeyError(name)
        return self._value(contribution) / self.num_features

    def _derived_compute(self, name: str) -> Tensor:
        if name != "dead_feature_fraction":
            raise KeyError(name)
        return self.compute().to(torch.float64) / self.num_features

    def _mask(self) -> Tensor:
        return _dead_compute(self.dead_counters[:, :-1], self.window)

    def compute(self) -> Tensor:
        """Number of dead features, int64 ``[*component]`` (0-d for one component), synced across processes.

        With a feature sharding, of the whole dictionary (the shards' counts summed over the feature group).
        """
        return self._squeeze(self._sum_over_shards(self._mask().sum(dim=-1)))

    def dead_mask(self) -> Tensor:
        """Boolean mask of dead features, ``[*component, num_features]``, synced (identical on every process).

        With a feature sharding, this shard's features (see :func:`sparse_metrics.gather_features`).
        """
        with self._synced():
            return self._squeeze(self._mask())

    def items_since_fired(self) -> Tensor:
        """Global items since each feature fired, int64 ``[*component, num_features]``, synced (a shard's slice)."""
        with self._synced():
            return self._squeeze(self.dead_counters[:, :-1].clone())

    def reset(self) -> None:
        """End an epoch: the counters (and the update count) are kept; use :meth:`reset_counters` to clear them."""
        counters, update_count = self.dead_counters, self._update_count
        super().reset()
        self.dead_counters, self._update_count = counters, update_count

    def reset_counters(self) -> None:
        """Clear the counters: every feature starts again from 0 items since it fired."""
        super().reset()
