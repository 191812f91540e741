"""Feature density metric: the fraction of items in which each dictionary feature fired."""

from __future__ import annotations

import weakref
from typing import Any, ClassVar

import torch
from torch import Tensor

from sparse_metrics._config import FiringThreshold, NumComponents, NumFeatures, validate_arguments
from sparse_metrics.functional.feature_density import (
    DENSITY_BANDS,
    DENSITY_EPSILON,
    FeatureActivity,
    _density_band_fractions,
    _density_compute,
    _mean_log10,
)
from sparse_metrics.metrics._activity import ActivityMetric

__all__ = ["FeatureDensity"]


def _feature_summaries(density: Tensor) -> dict[str, Tensor]:
    """Every derived output of the per-feature densities: the mean log10 density and the density bands' fractions."""
    return {"mean_log10_feature_density": _mean_log10(density, DENSITY_EPSILON), **_density_band_fractions(density)}


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

    A feature fires where it is non-zero (``firing_threshold=None``, SAELens' ``f.bool()``), or, with
    ``firing_threshold=t``, where ``f > t`` (OpenAI counts a latent as fired above ``1e-3``; ``t = 0`` is saev's
    ``f > 0``). :meth:`density_bands` gives the fractions of features above ``1e-1`` and ``1e-2``, below ``1e-5``
    and ``1e-6``, and never fired; a collection reports each as a key of its own.

    Args:
        num_features: The dictionary size ``d_sae``.
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        firing_threshold: ``None`` (default: a feature fires where it is non-zero) or a finite number ``>= 0``
            (it fires where ``f > firing_threshold``).
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
    _caches: ClassVar[tuple[str, ...]] = ("_batch_summaries", "_state_summaries")
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
    def __init__(
        self,
        num_features: NumFeatures,
        num_components: NumComponents = 1,
        *,
        firing_threshold: FiringThreshold | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, num_components, firing_threshold=firing_threshold, **kwargs)
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
        #: The latest batch's densities and summaries (of the whole dictionary, summed once when sharded), computed
        #: once for forward's value and every derived output of the batch (see _batch_density, _derived_value).
        #: The batch's counts are held by weak reference: the cache keeps no more alive than forward's own value.
        self._batch_summaries: tuple[weakref.ref[Tensor], Tensor, dict[str, Tensor]] | None = None
        #: The same for the synced states (see _sharded_summaries_of_states), by weak references to the states.
        self._state_summaries: tuple[tuple[weakref.ref[Tensor], ...], dict[str, Tensor]] | None = None

    def _record(self, contribution: FeatureActivity) -> None:
        self.density_fire_count = self.density_fire_count + contribution.fire_count
        self.density_item_count = self.density_item_count + contribution.batch_size

    def _value(self, contribution: FeatureActivity) -> Tensor:
        return self._squeeze(self._batch_density(contribution))

    def _batch_density(self, activity: FeatureActivity) -> Tensor:
        return self._batch_cache(activity)[1]

    def _batch_cache(self, activity: FeatureActivity) -> tuple[weakref.ref[Tensor], Tensor, dict[str, Tensor]]:
        """The batch's densities and the summaries computed of them so far, made once per batch."""
        cached = self._batch_summaries
        if cached is None or cached[0]() is not activity.fire_count:
            count = torch.tensor(activity.batch_size, device=activity.fire_count.device)
            density = _density_compute(activity.fire_count, count, self._fraction_dtype)
            cached = self._batch_summaries = (weakref.ref(activity.fire_count), density, {})
        return cached

    def _derived_outputs(self) -> dict[str, bool | None]:
        """``mean_log10_feature_density`` and the density bands (fractions of the features, see ``DENSITY_BANDS``)."""
        return {"mean_log10_feature_density": None, **dict.fromkeys(DENSITY_BANDS)}

    def _derived_value(self, name: str, contribution: FeatureActivity) -> Tensor:
        if name not in self._derived_outputs():
            raise KeyError(name)
        # Every summary of the batch at once, the first time one is read (sharded: in one all-reduce over the group).
        _, density, summaries = self._batch_cache(contribution)
        if not summaries:
            summaries.update(self._whole_summaries(density))
        return self._squeeze(summaries[name])

    def _whole_summaries(self, density: Tensor) -> dict[str, Tensor]:
        """Every derived output of this shard's densities, for the whole dictionary (one all-reduce when sharded)."""
        return self._global_means(_feature_summaries(density))

    def _global_means(self, local_means: dict[str, Tensor]) -> dict[str, Tensor]:
        """Means over the whole dictionary of per-shard means over their (equal) slices of features, in one reduce."""
        sharding = self.feature_sharding
        if sharding is None or sharding.size == 1:
            return local_means
        return {key: total / sharding.size for key, total in sharding.sum(local_means).items()}

    def _derived_compute(self, name: str) -> Tensor:
        if name not in self._derived_outputs():
            raise KeyError(name)
        if self.feature_sharding is not None:
            return self._sharded_summaries_of_states()[name]
        if name == "mean_log10_feature_density":
            return self.mean_log10_density()
        return self.density_bands()[name]

    def _sharded_summaries_of_states(self) -> dict[str, Tensor]:
        """Every derived output of the (synced) states, the shards' summaries summed in ONE all-reduce.

        Computed once per set of synced states: a collection's ``compute()`` reads them for each derived key. The
        shards of a feature group hold the same items, so they hold new states (and recompute) at the same calls.
        """
        with self._synced():
            states = (self.density_fire_count, self.density_item_count)
            cached = self._state_summaries
            if cached is not None and all(ref() is state for ref, state in zip(cached[0], states, strict=True)):
                return cached[1]
            summaries = {key: self._squeeze(value) for key, value in self._whole_summaries(self._density()).items()}
            self._state_summaries = (tuple(weakref.ref(state) for state in states), summaries)
            return summaries

    def density_bands(self) -> dict[str, Tensor]:
        """The fraction of features in each density band, by name (``DENSITY_BANDS``), ``[*component]``, synced.

        ``feature_density_above_1e-1`` and ``..._above_1e-2`` count ``density > t``; ``..._below_1e-5`` and
        ``..._below_1e-6`` count ``density < t`` (strict comparisons, as SAELens and lm_saes log them, but as
        fractions of ``num_features`` rather than counts); ``feature_density_never_fired`` counts ``density == 0``.
        NaN before any item.
        """
        with self._synced():
            density = self._density()
            bands = self._global_means(_density_band_fractions(density))
            return {name: self._squeeze(fraction) for name, fraction in bands.items()}

    def _density(self) -> Tensor:
        return _density_compute(self.density_fire_count, self.density_item_count, self._fraction_dtype)

    def compute(self) -> Tensor:
        """Density of every feature, float64 (float32 without float64: MPS) ``[*component, num_features]``, synced.

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
            mean = self._global_means({"mean": _mean_log10(self._density(), epsilon)})["mean"]
            return self._squeeze(mean)

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
