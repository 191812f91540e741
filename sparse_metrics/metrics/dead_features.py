"""Dead-feature metric: features that have not fired within the last ``window`` items, with a lifetime of its own."""

from __future__ import annotations

import weakref
from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from sparse_metrics._config import (
    FiringThreshold,
    NumComponents,
    NumFeatures,
    PositiveInt,
    WindowUnit,
    validate_arguments,
)
from sparse_metrics._distributed import NO_KEY, Reduction
from sparse_metrics.functional.dead_features import (
    _advance,
    _advance_steps,
    _combine_processes,
    _combine_processes_steps,
    _dead_compute,
)
from sparse_metrics.functional.feature_density import FeatureActivity
from sparse_metrics.metrics._activity import ActivityMetric

__all__ = ["DeadFeatures"]


class _LockstepCounters(Reduction):
    """Cross-process reduction of the ``[component, num_features + 1]`` counters (the lockstep rule), in two stages.

    Max stage: the most recent firing anywhere, the minimum of the counts of the processes where the feature fired
    (the maximum of their complements; a process where it never fired adds the identity). Sum stage: each process's
    items since then, ``min(most_recent, items_seen)``, and its items seen. Exact int64, and equal to
    :func:`~sparse_metrics.functional.dead_features._combine_processes` on the stacked counters (``__call__``).
    """

    def max_part(self, local: Tensor) -> Tensor:
        since, seen = local[..., :-1], local[..., -1:]
        return torch.where(since < seen, ~since, NO_KEY)

    def sum_part(self, local: Tensor, maxed: Tensor | None) -> Tensor:
        most_recent = ~cast(Tensor, maxed)  # the identity's complement is int64's max: never fired anywhere
        seen = local[..., -1:]
        return torch.cat([torch.minimum(most_recent, seen), seen], dim=-1)

    def finish(self, local: Tensor, maxed: Tensor | None, summed: Tensor | None) -> Tensor:
        return cast(Tensor, summed)

    def __call__(self, stacked: Tensor) -> Tensor:
        since, seen = stacked[..., :-1], stacked[..., -1:]
        combined = _combine_processes(since, seen.expand_as(since))
        return torch.cat([combined, seen.sum(dim=0)], dim=-1)


class _LockstepStepCounters(Reduction):
    """Cross-process reduction of the step counters, in one max stage: a step is global, counted once.

    The most recent firing anywhere is the smallest count of the processes where the feature fired (the maximum of
    their complements); the steps seen, the most any process saw. Equal to
    :func:`~sparse_metrics.functional.dead_features._combine_processes_steps` on the stacked counters (``__call__``).
    """

    def max_part(self, local: Tensor) -> Tensor:
        since, seen = local[..., :-1], local[..., -1:]
        return torch.cat([torch.where(since < seen, ~since, NO_KEY), seen], dim=-1)

    def finish(self, local: Tensor, maxed: Tensor | None, summed: Tensor | None) -> Tensor:
        keys = cast(Tensor, maxed)
        most_recent, seen = ~keys[..., :-1], keys[..., -1:]  # never fired anywhere: the complement is int64's max
        return torch.cat([torch.minimum(most_recent, seen), seen], dim=-1)

    def __call__(self, stacked: Tensor) -> Tensor:
        since, seen = stacked[..., :-1], stacked[..., -1:]
        combined = _combine_processes_steps(since, seen.expand_as(since))
        return torch.cat([combined, seen.amax(dim=0)], dim=-1)


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

    **Steps.** With ``window_unit="steps"`` the counters count *steps* (updates: one per ``update``/``forward``,
    whatever its number of items, an empty one included): :math:`s_i` is the number of steps after the last step
    in which feature :math:`i` fired (0 if it fired in the latest one; every step seen if it never fired) and
    :math:`\mathrm{dead}_i = [\, s_i \geq w \,]`. SAELens' ``dead_feature_window=N`` (dead when
    ``n_forward_passes_since_fired > N``) is ``window=N + 1``; OpenAI's ``dead_steps_threshold = T = 10M // batch``
    (dead when ``stats_last_nonzero > T``) is ``window=T`` for every feature that has fired, while a feature that
    never fired is dead one step later there (after ``T + 1`` steps: OpenAI counts a feature that never fired as one
    that fired on the first step). Across processes a step is global: every process takes each step, so the steps
    are counted once (the most any process saw), and the steps since a feature fired are the fewest among the
    processes where it fired (OpenAI's all-reduce MIN); :meth:`steps_since_fired` gives them.

    Args:
        num_features: The dictionary size ``d_sae``.
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        window: Positive number of items (tokens), or of steps with ``window_unit="steps"``.
        window_unit: ``"items"`` (default) or ``"steps"``.
        firing_threshold: ``None`` (default: a feature fires where it is non-zero) or a finite number ``>= 0``
            (it fires where ``f > firing_threshold``; OpenAI's is ``1e-3``).
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
    _caches: ClassVar[tuple[str, ...]] = ("_batch_count",)
    is_differentiable = False
    higher_is_better = False
    plot_lower_bound = 0.0

    _counter_state: ClassVar[str] = "dead_counters"

    dead_counters: Tensor

    @validate_arguments
    def __init__(
        self,
        num_features: NumFeatures,
        num_components: NumComponents = 1,
        *,
        window: PositiveInt,
        window_unit: WindowUnit = "items",
        firing_threshold: FiringThreshold | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, num_components, firing_threshold=firing_threshold, **kwargs)
        self.window = window
        self.window_unit = window_unit
        # [component, num_features + 1]: items (or steps) since each feature fired, then the items (steps) seen
        # (repeated per component). One state, so that the cross-process reduction sees both together.
        self.add_state(
            self._counter_state,
            torch.zeros(num_components, self.local_features + 1, dtype=torch.int64),
            dist_reduce_fx=_LockstepStepCounters() if window_unit == "steps" else _LockstepCounters(),
            persistent=True,
        )
        self._add_configuration_marker()
        #: The dead count after the latest batch (of the whole dictionary, summed once when sharded), for forward's
        #: value and the dead fraction: (the batch's counts, the counters it left, the dead count), the first two by
        #: weak reference (a cache holds no state alive). See _value.
        self._batch_count: tuple[weakref.ref[Tensor], weakref.ref[Tensor], Tensor] | None = None

    def _configuration(self) -> dict[str, Any]:
        configuration = {**super()._configuration(), "window": self.window}
        if self.window_unit != "items":  # absent by default: checkpoints from before the option still load
            configuration["window_unit"] = self.window_unit
        return configuration

    def _record(self, contribution: FeatureActivity) -> None:
        since, seen = self.dead_counters[:, :-1], self.dead_counters[:, -1:]
        if self.window_unit == "steps":  # one step per update, whatever its items (an empty one included)
            advanced, seen = _advance_steps(since, contribution), seen + 1
        else:
            advanced, seen = _advance(since, contribution), seen + contribution.batch_size
        self.dead_counters = torch.cat([advanced, seen], dim=-1)

    def _value(self, contribution: FeatureActivity) -> Tensor:
        """Dead features on this process after the batch (forward's value), of the whole dictionary when sharded."""
        # Counted once per batch for the value and the dead fraction (sharded: one all-reduce per batch). The
        # counters are part of the key: the count is of the state that this batch's record left.
        cached, counters = self._batch_count, self.dead_counters
        if cached is None or cached[0]() is not contribution.fire_count or cached[1]() is not counters:
            count = self._squeeze(self._sum_over_shards(self._mask().sum(dim=-1)))
            cached = self._batch_count = (weakref.ref(contribution.fire_count), weakref.ref(counters), count)
        return cached[2]

    def _derived_outputs(self) -> dict[str, bool | None]:
        """``dead_feature_fraction``: the dead features' share of the dictionary."""
        return {"dead_feature_fraction": False}

    def _derived_value(self, name: str, contribution: FeatureActivity) -> Tensor:
        if name != "dead_feature_fraction":
            raise KeyError(name)
        return self._value(contribution).to(self._fraction_dtype) / self.num_features  # the dtype of compute's

    def _derived_compute(self, name: str) -> Tensor:
        if name != "dead_feature_fraction":
            raise KeyError(name)
        return self.compute().to(self._fraction_dtype) / self.num_features

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
        """Global items since each feature fired, int64 ``[*component, num_features]``, synced (a shard's slice).

        With ``window_unit="steps"`` the counters are steps, not items: read :meth:`steps_since_fired`.
        """
        if self.window_unit != "items":
            raise TypeError("DeadFeatures(window_unit='steps') counts steps, not items: call `steps_since_fired()`.")
        with self._synced():
            return self._squeeze(self.dead_counters[:, :-1].clone())

    def steps_since_fired(self) -> Tensor:
        """Global steps (updates) since each feature fired, int64 ``[*component, num_features]``, synced.

        With a feature sharding, this shard's slice. 0 for a feature that fired in the latest step; the steps seen for
        one that never fired. Only with ``window_unit="steps"``.
        """
        if self.window_unit != "steps":
            raise TypeError("DeadFeatures(window_unit='items') counts items, not steps: call `items_since_fired()`.")
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
