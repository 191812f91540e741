"""Feature density metric: the fraction of items in which each dictionary feature fired."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from sparse_metrics._config import NumComponents, NumFeatures, validate_arguments
from sparse_metrics.functional.feature_density import (
    DENSITY_EPSILON,
    FeatureActivity,
    _density_compute,
    _mean_log10,
)
from sparse_metrics.metrics import _base
from sparse_metrics.metrics._activity import ActivityMetric
from sparse_metrics.metrics._base import ACCUMULATOR_DTYPE

__all__ = ["FeatureDensity"]


class FeatureDensity(ActivityMetric):
    r"""Fraction of items in which each feature is active (non-zero), over every item on every process.

    .. math:: \rho_{ci} = \frac{1}{N} \sum_{b=1}^{N} \mathbb{1}[f_{bci} \neq 0], \qquad
       \overline{\log_{10} \rho}_c = \frac{1}{d_{sae}} \sum_{i} \log_{10}(\rho_{ci} + \epsilon),
       \quad \epsilon = 10^{-10}

    ``update(learned_activations)`` takes ``[batch, num_features]`` or
    ``[batch, component, num_features]``. ``compute()`` returns the densities, float64
    ``[*component, num_features]`` (NaN before any item); :meth:`mean_log10_density` the per-component mean log10
    density for logging (a collection reports it as ``mean_log10_feature_density``); :meth:`plot` the usual
    histogram of log10 densities. Counts are int64 and summed across processes, so the density is exact; they are
    saved in ``state_dict``.

    Args:
        num_features: The dictionary size ``d_sae``.
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        kwargs: Passed to :class:`torchmetrics.Metric` (and ``nan_strategy``).

    Example:
        >>> import torch
        >>> from sparse_metrics import FeatureDensity
        >>> metric = FeatureDensity(num_features=3)
        >>> metric.update(torch.tensor([[1.0, 0.0, 0.0], [2.0, 3.0, 0.0]]))
        >>> metric.compute()
        tensor([1.0000, 0.5000, 0.0000], dtype=torch.float64)
        >>> metric.mean_log10_density()  # (0 + log10(0.5) + log10(1e-10)) / 3
        tensor(-3.4337, dtype=torch.float64)
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0
    per_feature = True

    _fire_count_state: ClassVar[str] = "density_fire_count"
    _item_count_state: ClassVar[str] = "density_item_count"

    density_fire_count: Tensor
    density_item_count: Tensor

    @validate_arguments
    def __init__(self, num_features: NumFeatures, num_components: NumComponents = 1, **kwargs: Any) -> None:
        super().__init__(num_features, num_components, **kwargs)
        self.add_state(
            self._fire_count_state,
            torch.zeros(num_components, self.local_features, dtype=torch.int64),
            dist_reduce_fx="sum",
            persistent=True,
        )
        self.add_state(
            self._item_count_state, torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum", persistent=True
        )
        self._add_configuration_marker()

    def _record(self, contribution: FeatureActivity) -> None:
        self.density_fire_count = self.density_fire_count + contribution.fire_count
        self.density_item_count = self.density_item_count + contribution.batch_size

    def _value(self, contribution: FeatureActivity) -> Tensor:
        return self._squeeze(self._batch_density(contribution))

    def _batch_density(self, activity: FeatureActivity) -> Tensor:
        count = torch.tensor(activity.batch_size, device=activity.fire_count.device)
        return _density_compute(activity.fire_count, count, self._density_dtype)

    def _derived_outputs(self) -> dict[str, bool | None]:
        """``mean_log10_feature_density``: the per-component mean of ``log10(density + 1e-10)``."""
        return {"mean_log10_feature_density": None}

    def _derived_value(self, name: str, contribution: FeatureActivity) -> Tensor:
        if name != "mean_log10_feature_density":
            raise KeyError(name)
        return self._squeeze(self._global_mean(_mean_log10(self._batch_density(contribution), DENSITY_EPSILON)))

    def _global_mean(self, local_mean: Tensor) -> Tensor:
        """The mean over the whole dictionary of a per-shard mean over its (equal) slice of features."""
        shards = 1 if self.feature_sharding is None else self.feature_sharding.size
        return self._sum_over_shards(local_mean) / shards if shards > 1 else local_mean

    def _derived_compute(self, name: str) -> Tensor:
        if name != "mean_log10_feature_density":
            raise KeyError(name)
        return self.mean_log10_density()

    def _density(self) -> Tensor:
        return _density_compute(self.density_fire_count, self.density_item_count, self._density_dtype)

    @property
    def _density_dtype(self) -> torch.dtype:
        """float64, or float32 on a device without float64 (MPS)."""
        return ACCUMULATOR_DTYPE if _base.supports_float64(self.device) else torch.float32

    def compute(self) -> Tensor:
        """Density of every feature, float64 ``[*component, num_features]``, synced across processes.

        With a feature sharding, this shard's features ``[*component, num_features / shards]``: the whole array is
        ``sparse_metrics.gather_features(density, metric)``.
        """
        return self._squeeze(self._density())

    def mean_log10_density(self, epsilon: float = DENSITY_EPSILON) -> Tensor:
        """Mean over features of ``log10(density + epsilon)``, ``[*component]`` (0-d for one component), synced.

        Args:
            epsilon: Added before the log, so that a feature that never fired counts as ``log10(epsilon)``.
        """
        if not (0.0 < epsilon < float("inf")):
            raise ValueError(f"`epsilon` must be a finite positive number, got {epsilon}.")
        with self._synced():
            return self._squeeze(self._global_mean(_mean_log10(self._density(), epsilon)))

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Histogram of ``log10(density + 1e-10)`` over features (one per component); needs matplotlib.

        Args:
            val: Densities ``[*component, num_features]`` (e.g. from ``compute``); None computes them.
            ax: A matplotlib ``Axes`` to draw into; None creates a figure.

        Returns:
            ``(figure, axes)``.

        Example:
            >>> import matplotlib
            >>> matplotlib.use("Agg")
            >>> import torch
            >>> from sparse_metrics import FeatureDensity
            >>> metric = FeatureDensity(num_features=4)
            >>> metric.update(torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 3.0, 1.0]]))
            >>> figure, axes = metric.plot()
        """
        try:
            import matplotlib.pyplot as plt  # noqa: PLC0415  # optional dependency, imported on use
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(
                "FeatureDensity.plot needs matplotlib: `pip install sparse_metrics[plot]`."
            ) from error
        density = (val if val is not None else self.compute()).detach().cpu().to(torch.float64)
        log_density = torch.log10(density + DENSITY_EPSILON).reshape(-1, density.shape[-1])
        if ax is None:
            figure, ax = plt.subplots()
        else:
            figure = ax.get_figure()
        for component, values in enumerate(log_density):
            label = f"component {component}" if log_density.shape[0] > 1 else None
            # Bins of 1/3 decade centred on the integers: the dead-feature spike at -10 and density 1 at 0 inside.
            ax.hist(values.numpy(), bins=33, range=(-10.5, 0.5), alpha=0.6, label=label)
        ax.set_xlabel(r"$\log_{10}$(feature density + $10^{-10}$)")
        ax.set_ylabel("features")
        ax.set_title(type(self).__name__)
        if log_density.shape[0] > 1:
            ax.legend()
        return figure, ax
