"""What the per-feature activity metrics (feature density, dead features) share: input, contribution, output shape."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, ClassVar

import torch
from torch import Tensor

from sparse_metrics._batch import ACTIVITY_THRESHOLD, SaeBatch
from sparse_metrics.functional.feature_density import FeatureActivity
from sparse_metrics.metrics import _base
from sparse_metrics.metrics._base import ACCUMULATOR_DTYPE, SaeMetric

__all__ = ["ActivityMetric"]


class ActivityMetric(SaeMetric):
    """A metric of which features fire on which items of ``learned_activations`` ``[batch, *component, d_sae]``.

    Its contribution is the batch's :class:`~sparse_metrics.functional.feature_density.FeatureActivity`, which a
    collection computes once for every such member (and counts the L0 from). A feature fires where it is non-zero
    (``firing_threshold=None``), or where it is above ``firing_threshold`` (strictly); members with different
    thresholds read different masks, and the collection's L0 always counts ``f != 0``. A NaN activation counts as
    firing; with ``nan_strategy`` other than "propagate", an item with a non-finite activation is screened like any
    other.
    """

    _positional_inputs: ClassVar[tuple[str, ...]] = ("learned_activations",)

    def _batch_uses(self) -> frozenset[Hashable]:
        return frozenset({(ACTIVITY_THRESHOLD, self.firing_threshold)})

    def __init__(
        self, num_features: int, num_components: int, *, firing_threshold: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(num_components, **kwargs)
        self.num_features = num_features
        self.firing_threshold = None if firing_threshold is None else float(firing_threshold)
        sharding = self.feature_sharding
        #: The features this process holds: ``num_features`` (the whole dictionary) over the feature shards.
        self.local_features = (
            num_features
            if sharding is None
            else sharding.local_features(num_features, "num_features", type(self).__name__)
        )

    def _configuration(self) -> dict[str, Any]:
        configuration = {**super()._configuration(), "num_features": self.num_features}
        if self.firing_threshold is not None:  # absent by default: checkpoints from before the option still load
            configuration["firing_threshold"] = self.firing_threshold
        return configuration

    def _contribution(self, batch: SaeBatch) -> FeatureActivity:
        owner = type(self).__name__
        setting = "num_features" if self.feature_sharding is None else "num_features / feature shards"
        batch.require_width("learned_activations", self.local_features, setting, owner)
        self._check_device(batch)
        return batch.activity(owner, self.firing_threshold)

    def _sum_over_shards(self, value: Tensor) -> Tensor:
        """``value`` summed over the feature shards (a count or sum over features: the whole dictionary's)."""
        sharding = self.feature_sharding
        return value if sharding is None else sharding.sum({"value": value})["value"]

    @property
    def _fraction_dtype(self) -> torch.dtype:
        """The dtype of densities and fractions of the dictionary: float64, or float32 without float64 (MPS)."""
        return ACCUMULATOR_DTYPE if _base.supports_float64(self.device) else torch.float32

    def _finite_items(self, batch: SaeBatch, contribution: Any) -> Tensor | None:
        return batch.finite_items("learned_activations", type(self).__name__)
