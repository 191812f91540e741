"""Fraction of variance unexplained and explained variance metrics, pooled over every item on every process."""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple, cast

import torch
from torch import Tensor

from sparse_metrics._batch import SaeBatch
from sparse_metrics._config import NumComponents, PositiveInt, validate_arguments
from sparse_metrics._distributed import NO_KEY, Reduction, from_order_key, order_key
from sparse_metrics.functional.explained_variance import (
    VarianceStatistics,
    _batch_fvu,
    _batch_statistics,
    _fvu_compute,
    _merge_statistics,
)
from sparse_metrics.metrics._base import ACCUMULATOR_DTYPE, SaeMetric

__all__ = ["ExplainedVariance", "FractionOfVarianceUnexplained"]


def _pack(statistics: VarianceStatistics) -> Tensor:
    """One row per component: ``[count, mean (d_model), M2, squared error]``, ``[component, d_model + 3]``."""
    columns = [statistics.item_count.unsqueeze(-1), statistics.mean]
    columns += [statistics.m2.unsqueeze(-1), statistics.squared_error.unsqueeze(-1)]
    return torch.cat(columns, dim=-1)


def _unpack(packed: Tensor) -> VarianceStatistics:
    return VarianceStatistics(packed[..., 0], packed[..., 1:-2], packed[..., -2], packed[..., -1])


class _ChanMerge(Reduction):
    r"""Cross-process reduction of the ``[component, d_model + 3]`` statistics, exact at any offset, in two stages.

    Max stage: a shift :math:`c`, per dimension the largest mean of the processes that saw items (0 if none did).
    Sum stage: each process's statistics about :math:`c`, :math:`n_r`, :math:`n_r \delta_r` and
    :math:`M_{2,r} + n_r \lVert\delta_r\rVert^2` with :math:`\delta_r = \bar x_r - c`, and its squared error. Then
    :math:`\bar x = c + \sum_r n_r \delta_r / n` and
    :math:`M_2 = \sum_r (M_{2,r} + n_r \lVert\delta_r\rVert^2) - \lVert\sum_r n_r \delta_r\rVert^2 / n`: an offset
    common to all items cancels in :math:`\delta_r` exactly, as in Chan's merge, and with one process that saw items
    its statistics come back unchanged. ``__call__`` is Chan's merge of stacked statistics in rank order.
    """

    def max_part(self, local: Tensor) -> Tensor:
        statistics = _unpack(local)
        return torch.where(statistics.item_count.unsqueeze(-1) > 0, order_key(statistics.mean), NO_KEY)

    @staticmethod
    def _shift(maxed: Tensor | None) -> Tensor:
        keys = cast(Tensor, maxed)
        return torch.where(keys == NO_KEY, 0.0, from_order_key(keys, torch.float64))

    def sum_part(self, local: Tensor, maxed: Tensor | None) -> Tensor:
        statistics = _unpack(local)
        count = statistics.item_count.unsqueeze(-1)
        delta = torch.where(count > 0, statistics.mean - self._shift(maxed), 0.0)
        moment = statistics.m2 + statistics.item_count * delta.square().sum(dim=-1)
        return _pack(VarianceStatistics(statistics.item_count, count * delta, moment, statistics.squared_error))

    def finish(self, local: Tensor, maxed: Tensor | None, summed: Tensor | None) -> Tensor:
        shifted = _unpack(cast(Tensor, summed))
        safe_count = shifted.item_count.clamp(min=1)
        mean = self._shift(maxed) + shifted.mean / safe_count.unsqueeze(-1)
        m2 = (shifted.m2 - shifted.mean.square().sum(dim=-1) / safe_count).clamp(min=0)
        return _pack(VarianceStatistics(shifted.item_count, mean, m2, shifted.squared_error))

    def __call__(self, stacked: Tensor) -> Tensor:
        merged = _unpack(stacked[0])
        for statistics in stacked[1:]:
            merged = _merge_statistics(merged, _unpack(statistics))
        return _pack(merged)


class _VarianceContribution(NamedTuple):
    statistics: Tensor  # packed [component, d_model + 3], detached
    source: Tensor  # [batch, component, d_model]
    squared_error: Tensor  # [batch, component], differentiable


class FractionOfVarianceUnexplained(SaeMetric):
    r"""Fraction of the source's variance the reconstruction misses, pooled over every item seen.

    .. math:: \mathrm{FVU}_c = \frac{\sum_{b=1}^{N} \sum_{d} (x_{bcd} - \hat x_{bcd})^2}
       {\sum_{b=1}^{N} \sum_{d} (x_{bcd} - \bar x_{cd})^2}, \qquad
       \bar x_{cd} = \frac{1}{N} \sum_{b=1}^{N} x_{bcd}

    where :math:`N` runs over every item of every update on every process: one pooled ratio, not the mean of
    per-batch or per-process ratios (EleutherAI's sparsify logs the latter under DDP). Rank 0 with
    ``x = [0, 2], x̂ = [1, 1]`` and rank 1 with ``x = [4, 6], x̂ = [5, 5]`` give 0.2; the mean of the per-rank
    ratios would be 1.0.

    ``update(decoded_activations, source_activations)`` takes ``[batch, d_model]`` or
    ``[batch, component, d_model]``. ``compute()`` returns ``[component]`` float64 (0-d for one component): NaN
    before any item (or for a constant source reconstructed exactly), inf for a constant source with an error.
    ``forward`` returns the FVU of the batch alone, differentiable with respect to the inputs.

    The denominator is kept as (count, per-dimension mean, M2) in float64 and batches are merged with Chan's
    parallel formula, exact for data with a large offset; processes are merged the same way, in rank order, so every
    process gets the bitwise identical result. A collection reports ``explained_variance`` (``1 - fvu``) beside it.

    Args:
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        d_model: The width of the activations (the state's per-dimension mean has this size).
        kwargs: Passed to :class:`torchmetrics.Metric` (and ``nan_strategy``).

    Example:
        >>> import torch
        >>> from sparse_metrics import FractionOfVarianceUnexplained
        >>> metric = FractionOfVarianceUnexplained(d_model=1)
        >>> metric.update(torch.tensor([[1.0], [1.0]]), torch.tensor([[0.0], [2.0]]))
        >>> metric.update(torch.tensor([[5.0], [5.0]]), torch.tensor([[4.0], [6.0]]))
        >>> metric.compute()  # 4 / 20, pooled over both batches
        tensor(0.2000, dtype=torch.float64)
    """

    full_state_update = False
    is_differentiable = True
    higher_is_better = False
    plot_lower_bound: float | None = 0.0
    plot_upper_bound: float | None = None

    _positional_inputs: ClassVar[tuple[str, ...]] = ("decoded_activations", "source_activations")
    _state_prefix: ClassVar[str] = "fvu"

    @validate_arguments
    def __init__(self, num_components: NumComponents = 1, *, d_model: PositiveInt, **kwargs: Any) -> None:
        super().__init__(num_components, **kwargs)
        self.d_model = d_model
        self._state_name = f"{self._state_prefix}_statistics"
        self.add_state(
            self._state_name,
            torch.zeros(num_components, d_model + 3, dtype=ACCUMULATOR_DTYPE),
            dist_reduce_fx=_ChanMerge(),
            persistent=True,
        )
        self._add_configuration_marker()

    def _configuration(self) -> dict[str, Any]:
        return {**super()._configuration(), "d_model": self.d_model}

    @property
    def _statistics(self) -> Tensor:
        value: Tensor = getattr(self, self._state_name)
        return value

    def _contribution(self, batch: SaeBatch) -> _VarianceContribution:
        owner = type(self).__name__
        source = batch.require_width("source_activations", self.d_model, "d_model", owner)
        self._check_device(batch)
        squared_error = batch.squared_error(owner)
        statistics = batch.memo(
            ("variance_statistics", self._statistics.dtype),
            lambda: _pack(_batch_statistics(source, squared_error, self._statistics.dtype)),
        )
        return _VarianceContribution(statistics, source, squared_error)

    def _finite_items(self, batch: SaeBatch, contribution: _VarianceContribution) -> Tensor | None:
        source_finite = contribution.source.detach().isfinite().flatten(1).all(dim=1)
        return source_finite & contribution.squared_error.detach().isfinite().all(dim=1)

    def _record(self, contribution: _VarianceContribution) -> None:
        if contribution.source.shape[0] == 0:
            return
        merged = _merge_statistics(_unpack(self._statistics), _unpack(contribution.statistics))
        setattr(self, self._state_name, _pack(merged))

    def _value(self, contribution: _VarianceContribution) -> Tensor:
        return self._squeeze(self._batch_fvu(contribution))

    @staticmethod
    def _batch_fvu(contribution: _VarianceContribution) -> Tensor:
        return _batch_fvu(contribution.source, contribution.squared_error)

    def _fvu(self) -> Tensor:
        """Pooled FVU ``[component]`` of every item in the (possibly synced) state."""
        statistics = _unpack(self._statistics)
        return _fvu_compute(statistics.squared_error, statistics.m2)

    def compute(self) -> Tensor:
        """Pooled FVU over every item seen on every process, float64 ``[component]`` (0-d for one component)."""
        return self._squeeze(self._fvu())

    def _derived_outputs(self) -> dict[str, bool | None]:
        """``explained_variance``: ``1 - fvu``."""
        return {"explained_variance": True}

    def _derived_value(self, name: str, contribution: _VarianceContribution) -> Tensor:
        if name != "explained_variance":
            raise KeyError(name)
        return self._squeeze(1 - self._batch_fvu(contribution))

    def _derived_compute(self, name: str) -> Tensor:
        if name != "explained_variance":
            raise KeyError(name)
        return 1 - self.compute()


class ExplainedVariance(FractionOfVarianceUnexplained):
    r"""Explained variance, ``1 - FVU``, pooled over every item seen (see :class:`FractionOfVarianceUnexplained`).

    .. math:: \mathrm{EV}_c = 1 - \frac{\sum_{b,d} (x_{bcd} - \hat x_{bcd})^2}{\sum_{b,d} (x_{bcd} - \bar x_{cd})^2}

    This is SAELens' ``explained_variance`` with the means over items taken inside the ratio, so it never exceeds
    1 and does not depend on how items were batched.

    Args:
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        d_model: The width of the activations.
        kwargs: Passed to :class:`torchmetrics.Metric` (and ``nan_strategy``).

    Example:
        >>> import torch
        >>> from sparse_metrics import ExplainedVariance
        >>> metric = ExplainedVariance(d_model=1)
        >>> metric.update(torch.tensor([[1.0], [1.0], [5.0], [5.0]]), torch.tensor([[0.0], [2.0], [4.0], [6.0]]))
        >>> metric.compute()
        tensor(0.8000, dtype=torch.float64)
    """

    higher_is_better = True
    plot_lower_bound = None
    plot_upper_bound = 1.0

    _state_prefix: ClassVar[str] = "explained_variance"

    def _value(self, contribution: _VarianceContribution) -> Tensor:
        return self._squeeze(1 - self._batch_fvu(contribution))

    def _derived_outputs(self) -> dict[str, bool | None]:
        return {}

    def compute(self) -> Tensor:
        """Pooled explained variance, float64 ``[component]`` (0-d for one component)."""
        return self._squeeze(1 - self._fvu())
