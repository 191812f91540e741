"""What the per-feature activity metrics (feature density, dead features) share: input, recording, output shape."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from torch import Tensor

from sparse_metrics.functional.feature_density import FeatureActivity, _active_features, _feature_activity
from sparse_metrics.metrics._base import PackedSyncMetric

__all__ = ["ActivityMetric"]


class ActivityMetric(PackedSyncMetric):
    """A metric of which features fire on which items of ``learned_activations`` ``[batch, *component, d_sae]``.

    Subclasses add their states and implement ``_record_activity`` (accumulate a batch's
    :class:`~sparse_metrics.functional.feature_density.FeatureActivity`) and ``_batch_value`` (forward's value). The
    collection computes the activity once and hands it to every such member through ``_record_batch``.
    """

    def __init__(self, num_features: int, num_components: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_features = num_features
        self.num_components = num_components

    def update(self, learned_activations: Tensor, **kwargs: Any) -> None:
        """Accumulate a batch. Extra keyword arguments are ignored, so one call can feed a whole collection."""
        self._record_activity(self._activity(learned_activations))

    def forward(self, learned_activations: Tensor, **kwargs: Any) -> Tensor:
        """Accumulate a batch and return this metric's value after it (see the class)."""
        activity = self._activity(learned_activations)
        self._record_batch(activity)
        return self._batch_value(activity)

    def _record_batch(self, activity: FeatureActivity) -> None:
        """Record a validated batch as ``update`` would (used by forward and the collection)."""
        self._record_activity(activity)
        self._count_update()

    def _active(self, learned_activations: Tensor) -> Tensor:
        """Validate the input; its activity mask ``[batch, component, num_features]``."""
        return _active_features(learned_activations, self.num_components, self.num_features)

    def _activity(self, learned_activations: Tensor) -> FeatureActivity:
        """Validate the input and reduce it to per-feature activity."""
        return _feature_activity(self._active(learned_activations))

    def _squeeze(self, value: Tensor) -> Tensor:
        """Drop the component axis of a single-component metric's ``[component, ...]`` value."""
        return value.squeeze(0) if self.num_components == 1 else value

    @abstractmethod
    def _record_activity(self, activity: FeatureActivity) -> None: ...

    @abstractmethod
    def _batch_value(self, activity: FeatureActivity) -> Tensor: ...
