"""Fraction of variance unexplained and explained variance metrics, pooled over every item on every process."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from sparse_metrics._config import NumComponents, validate_arguments
from sparse_metrics.functional.explained_variance import (
    VarianceStatistics,
    _batch_fvu,
    _batch_statistics,
    _fvu_compute,
    _fvu_update,
    _merge_statistics,
)
from sparse_metrics.metrics import _base
from sparse_metrics.metrics._base import ACCUMULATOR_DTYPE, PackedSyncMetric

__all__ = ["ExplainedVariance", "FractionOfVarianceUnexplained"]

#: Packet layout: [d_model, count, mean (component * d_model), m2 (component), squared error (component)].
_HEADER = 2


class FractionOfVarianceUnexplained(PackedSyncMetric):
    r"""Fraction of the source's variance the reconstruction misses, pooled over every item seen.

    .. math:: \mathrm{FVU}_c = \frac{\sum_{b=1}^{N} \sum_{d} (x_{bcd} - \hat x_{bcd})^2}
       {\sum_{b=1}^{N} \sum_{d} (x_{bcd} - \bar x_{cd})^2}, \qquad
       \bar x_{cd} = \frac{1}{N} \sum_{b=1}^{N} x_{bcd}

    where :math:`N` runs over every item of every update on every process: one pooled ratio, not the mean of
    per-batch or per-process ratios (EleutherAI's sparsify logs the latter under DDP). Rank 0 with
    ``x = [0, 2], x̂ = [1, 1]`` and rank 1 with ``x = [4, 6], x̂ = [5, 5]`` give 0.2; the mean of the per-rank
    ratios would be 1.0.

    ``update(decoded_activations, source_activations, **kwargs)`` takes ``[batch, d_model]`` or
    ``[batch, component, d_model]``. ``compute()`` returns ``[component]`` float64 (0-d for one component): NaN
    before any item (or for a constant source reconstructed exactly), inf for a constant source with an error.
    ``forward`` returns the FVU of the batch alone, differentiable with respect to the inputs.

    State, and why it has this form: the denominator is kept as (count, per-dimension mean, M2) in float64 and
    batches are merged with Chan's parallel formula, exact for data with a large offset. ``d_model`` is not a
    constructor argument, so the per-dimension mean is sized by the first batch, and a process that saw no batch
    does not know it. Tensor states must have the same size on every process for the packed sync
    (:mod:`sparse_metrics._distributed`), so the statistics are kept instead as one flat float64 *packet*
    ``[d_model, count, mean, M2, squared error]`` in a ``"cat"`` list state: its rows are scalars whatever
    ``d_model`` is, a process with no data contributes zero rows, and after the gather every process parses the
    packets (each carries its own ``d_model``) and merges them with Chan's formula in rank order, so every process
    gets the bitwise identical result. It travels in the packed sync's second collective (one per collection).

    Args:
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from sparse_metrics import FractionOfVarianceUnexplained
        >>> metric = FractionOfVarianceUnexplained()
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

    _state_name: ClassVar[str] = "fvu_statistics"

    @validate_arguments
    def __init__(self, num_components: NumComponents = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_components = num_components
        self.add_state(self._state_name, [], dist_reduce_fx="cat", persistent=True)

    def update(self, decoded_activations: Tensor, source_activations: Tensor, **kwargs: Any) -> None:
        """Accumulate a batch. Extra keyword arguments are ignored, so one call can feed a whole collection."""
        source, squared_error = _fvu_update(decoded_activations, source_activations, self.num_components)
        self._record_statistics(source, squared_error)

    def forward(self, decoded_activations: Tensor, source_activations: Tensor, **kwargs: Any) -> Tensor:
        """Accumulate a batch and return its own FVU (0-d or ``[component]``), differentiable."""
        source, squared_error = _fvu_update(decoded_activations, source_activations, self.num_components)
        self._record_batch(source, squared_error)
        return self._batch_value(source, squared_error)

    def _record_batch(self, source: Tensor, squared_error_per_item: Tensor) -> None:
        """Record a validated batch as ``update`` would (used by forward and the collection)."""
        self._record_statistics(source, squared_error_per_item)
        self._count_update()

    def _batch_value(self, source: Tensor, squared_error: Tensor) -> Tensor:
        """This class's value on one batch (the collection reports it from forward)."""
        return self._squeeze(_batch_fvu(source, squared_error))

    def _record_statistics(self, source: Tensor, squared_error_per_item: Tensor) -> None:
        """Merge a validated batch (source ``[batch, component, d_model]``, per-item summed squared errors)."""
        if source.shape[0] == 0:
            return
        local = self._local_statistics(source.shape[-1])
        batch = _batch_statistics(source, squared_error_per_item, self._statistics_dtype)
        merged = batch if local is None else _merge_statistics(local, batch)
        setattr(self, self._state_name, [self._pack(merged)])

    def _local_statistics(self, d_model: int) -> VarianceStatistics | None:
        """This process's statistics, to merge a batch of width ``d_model`` into, with no host synchronisation.

        Outside ``compute()`` the state is this process's single packet, whose length gives its width; the width in
        its header would have to be read from the device.
        """
        packets: list[Tensor] = getattr(self, self._state_name)
        if not packets:
            return None
        if len(packets) > 1:  # several packets, e.g. a checkpoint saved from a synced state: read their headers
            statistics = self._statistics()
            held = -1 if statistics is None else statistics.mean.shape[-1]
        else:
            statistics, held = None, self._d_model_of(packets[0])
        if held != d_model:
            raise ValueError(
                f"`source_activations` has d_model {d_model}, but this metric holds items of d_model {held}; "
                "reset() it before feeding activations of another width."
            )
        return statistics if statistics is not None else self._parse(packets[0], d_model)

    def _pack(self, statistics: VarianceStatistics) -> Tensor:
        mean = statistics.mean
        d_model = torch.tensor([mean.shape[-1]], dtype=mean.dtype, device=mean.device)
        return torch.cat(
            [
                d_model,
                statistics.item_count.reshape(1),
                statistics.mean.reshape(-1),
                statistics.m2,
                statistics.squared_error,
            ]
        )

    def _statistics(self) -> VarianceStatistics | None:
        """Parse the packet(s) of the state and merge them; None if empty.

        After a sync the state holds every process's packet, concatenated in rank order, each of its own width (read
        from its header): this runs in ``compute()``, which reads the result anyway.
        """
        packets: list[Tensor] = getattr(self, self._state_name)
        if not packets:
            return None
        flat = torch.cat(packets)
        merged: VarianceStatistics | None = None
        offset = 0
        while offset < flat.numel():
            d_model = int(flat[offset].item())
            end = offset + self._packet_length(d_model)
            statistics = self._parse(flat[offset:end], d_model)
            merged = statistics if merged is None else _merge_statistics(merged, statistics)
            offset = end
        return merged

    def _packet_length(self, d_model: int) -> int:
        """Header, then mean ``[component, d_model]``, M2 ``[component]`` and squared error ``[component]``."""
        return _HEADER + self.num_components * (d_model + 2)

    def _d_model_of(self, packet: Tensor) -> int:
        return (packet.numel() - _HEADER) // self.num_components - 2

    def _parse(self, packet: Tensor, d_model: int) -> VarianceStatistics:
        components = self.num_components
        mean_end = _HEADER + components * d_model
        return VarianceStatistics(
            item_count=packet[1],
            mean=packet[_HEADER:mean_end].reshape(components, d_model),
            m2=packet[mean_end : mean_end + components],
            squared_error=packet[mean_end + components : mean_end + 2 * components],
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Refuse packets written by a metric with another ``num_components`` (their lengths do not fit this one)."""
        for packet in state_dict.get(prefix + self._state_name) or []:
            d_model = self._d_model_of(packet)
            if d_model < 1 or packet.numel() != self._packet_length(d_model) or int(packet[0].item()) != d_model:
                raise ValueError(
                    f"Cannot load state `{prefix + self._state_name}` into {type(self).__name__}"
                    f"(num_components={self.num_components}): a packet of {packet.numel()} values does not fit; the "
                    "checkpoint comes from a metric configured differently."
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _empty_list_state(self, name: str) -> Tensor:
        """No packet: a process that saw no item sends zero scalar rows."""
        return torch.zeros(0, dtype=self._statistics_dtype, device=self.device)

    @property
    def _statistics_dtype(self) -> torch.dtype:
        """float64, or float32 on a device without float64 (MPS), like the sums of the other metrics."""
        return ACCUMULATOR_DTYPE if _base._supports_float64(self.device) else torch.float32

    def _squeeze(self, value: Tensor) -> Tensor:
        return value.squeeze(-1) if self.num_components == 1 else value

    def _fvu(self) -> Tensor:
        """Pooled FVU ``[component]`` of every item in the (possibly synced) state."""
        statistics = self._statistics()
        if statistics is None:
            return torch.full((self.num_components,), float("nan"), dtype=self._statistics_dtype, device=self.device)
        return _fvu_compute(statistics.squared_error, statistics.m2)

    def compute(self) -> Tensor:
        """Pooled FVU over every item seen on every process, float64 ``[component]`` (0-d for one component)."""
        return self._squeeze(self._fvu())


class ExplainedVariance(FractionOfVarianceUnexplained):
    r"""Explained variance, ``1 - FVU``, pooled over every item seen (see :class:`FractionOfVarianceUnexplained`).

    .. math:: \mathrm{EV}_c = 1 - \frac{\sum_{b,d} (x_{bcd} - \hat x_{bcd})^2}{\sum_{b,d} (x_{bcd} - \bar x_{cd})^2}

    This is SAELens' ``explained_variance`` with the means over items taken inside the ratio, so it never exceeds
    1 and does not depend on how items were batched.

    Args:
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from sparse_metrics import ExplainedVariance
        >>> metric = ExplainedVariance()
        >>> metric.update(torch.tensor([[1.0], [1.0], [5.0], [5.0]]), torch.tensor([[0.0], [2.0], [4.0], [6.0]]))
        >>> metric.compute()
        tensor(0.8000, dtype=torch.float64)
    """

    higher_is_better = True
    plot_lower_bound = None
    plot_upper_bound = 1.0

    _state_name: ClassVar[str] = "explained_variance_statistics"

    def _batch_value(self, source: Tensor, squared_error: Tensor) -> Tensor:
        return 1 - super()._batch_value(source, squared_error)

    def compute(self) -> Tensor:
        """Pooled explained variance, float64 ``[component]`` (0-d for one component)."""
        return self._squeeze(1 - self._fvu())
