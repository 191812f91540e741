"""Fraction of variance unexplained and explained variance metrics, pooled over every item on every process."""

from __future__ import annotations

import itertools
from typing import Any, ClassVar, NamedTuple, cast

import torch
from torch import Tensor

from sparse_metrics._batch import SaeBatch
from sparse_metrics._config import NumComponents, PositiveInt, Reconstruction, validate_arguments
from sparse_metrics._distributed import NO_KEY, Reduction, from_order_key, order_key
from sparse_metrics.functional.explained_variance import (
    BatchMoments,
    VarianceStatistics,
    _about,
    _batch_centred_fvu,
    _batch_fvu,
    _centred_batch,
    _fold_moments,
    _from_about,
    _fvu_compute,
    _merge_stacked,
)
from sparse_metrics.metrics._base import (
    ACCUMULATOR_DTYPE,
    DeferredState,
    SaeMetric,
    Slots,
    _detached,
    next_row,
)

__all__ = ["ExplainedVariance", "FractionOfVarianceUnexplained"]


def _pack(statistics: VarianceStatistics, residual: VarianceStatistics | None = None) -> Tensor:
    """One row per component: ``[count, mean (d_model), M2, squared error]``, ``[component, d_model + 3]``.

    With the residual's statistics (``centred_residual``), its mean and M2 follow: ``[component, 2 d_model + 4]``.
    """
    columns = [statistics.item_count.unsqueeze(-1), statistics.mean]
    columns += [statistics.m2.unsqueeze(-1), statistics.squared_error.unsqueeze(-1)]
    if residual is not None:
        columns += [residual.mean, residual.m2.unsqueeze(-1)]
    return torch.cat(columns, dim=-1)


def _unpack(packed: Tensor, d_model: int) -> tuple[VarianceStatistics, VarianceStatistics | None]:
    """The source's statistics and, in a centred-residual row, the residual's (same count, no squared error)."""
    count = packed[..., 0]
    source = VarianceStatistics(count, packed[..., 1 : d_model + 1], packed[..., d_model + 1], packed[..., d_model + 2])
    if packed.shape[-1] == d_model + 3:
        return source, None
    residual_m2 = packed[..., -1]
    return source, VarianceStatistics(count, packed[..., d_model + 3 : -1], residual_m2, torch.zeros_like(residual_m2))


#: A :class:`DeferredStatistics` queue holds at most this many elements of moments (16 MiB of float32).
QUEUED_ELEMENTS = 1 << 22


class _MomentSlots:
    """The rows one stretch of a :class:`DeferredStatistics` queue writes into: moments, squared errors, counts."""

    __slots__ = ("counts", "errors", "moments")

    def __init__(self, capacity: int, moments: tuple[BatchMoments, ...]) -> None:
        first, error = moments[0].shift, moments[0].squared_error
        self.moments = Slots(capacity, (_row_width(moments),), first.dtype, first.device)
        self.errors = Slots(capacity, error.shape, error.dtype, error.device)
        self.counts = Slots(capacity, (), error.dtype, error.device)  # written by a fill: no copy from the host

    def __len__(self) -> int:
        return len(self.counts)


class _QueuedBatch(NamedTuple):
    """A batch queued for a :class:`DeferredStatistics` state: row ``row`` of ``slots``."""

    slots: _MomentSlots  # moments: every group's [Σ‖d‖² (component), a (component·d_model), Σ d (same)] in turn
    row: int
    groups: int  # 1, or 2 with the residual's moments


class DeferredStatistics(DeferredState):
    """A packed statistics state (see :func:`_pack`) whose batches' moments wait in a queue and merge at once.

    A step queues a tuple of :class:`~sparse_metrics.functional.explained_variance.BatchMoments`, one per group of
    the packed row (the source's, then the residual's with ``centred_residual``). Folding turns every queued batch
    into float64 statistics and merges them with the state in one vectorised merge (``_fold_moments``): about thirty
    small operations per fold instead of per step. The result is the pooled statistics to float64 rounding, though
    not bitwise the same whenever the state is read (a merge of several sets rounds differently from merging them
    one at a time).

    The moments of a queue are copied into rows made for it (:class:`~sparse_metrics.metrics._base.Slots`, in
    stretches of 4, 8, 16, ... rows), not kept as the step made them: kept, a step's small tensors fragment a CPU's
    heap (3.5 GB after 256 steps at batch 4096, d_model 512; a kept 8-byte tensor per step was enough for 2 GB). A
    queue holds at most :data:`QUEUED_ELEMENTS` elements of moments and
    :attr:`~sparse_metrics.metrics._base.DeferredState.max_pending` batches; it is folded once full, or first when a
    batch's moments differ in dtype, device or width from the queue's.
    """

    def fits(self, queued: list[_QueuedBatch], moments: tuple[BatchMoments, ...]) -> bool:
        rows = queued[0].slots.moments.rows
        return (
            rows.dtype == moments[0].shift.dtype
            and rows.device == moments[0].shift.device
            and rows.shape[1] == _row_width(moments)
        )

    def _capacity(self, width: int) -> int:
        """Batches a queue of rows of ``width`` elements holds at most."""
        return max(1, min(self.max_pending, QUEUED_ELEMENTS // width))

    def queued_item(self, queued: list[_QueuedBatch], moments: tuple[BatchMoments, ...]) -> _QueuedBatch:
        last = (queued[-1].slots, queued[-1].row) if queued else None
        room = self._capacity(_row_width(moments)) - len(queued)
        slots, row = next_row(last, room, lambda size: _MomentSlots(size, moments))
        torch.cat([part.reshape(-1) for group in moments for part in group[1:4]], out=slots.moments.views[row])
        slots.errors.views[row].copy_(moments[0].squared_error)
        slots.counts.views[row].fill_(moments[0].item_count)
        return _QueuedBatch(slots, row, len(moments))

    def full(self, queued: list[_QueuedBatch]) -> bool:
        return len(queued) >= self._capacity(queued[0].slots.moments.rows.shape[1])

    def fold(self, value: Tensor, queued: list[_QueuedBatch]) -> Tensor:
        stretches = [(slots, len(list(batches))) for slots, batches in itertools.groupby(queued, lambda b: b.slots)]

        def used(part: str) -> Tensor:
            rows = [getattr(slots, part).rows[:count] for slots, count in stretches]
            return rows[0] if len(rows) == 1 else torch.cat(rows)

        rows, squared_error, counts = used("moments"), used("errors"), used("counts")
        components, groups = value.shape[0], queued[0].groups
        d_model = (rows.shape[1] // (groups * components) - 1) // 2
        states = [group for group in _unpack(value, d_model) if group is not None]
        folded, start = [], 0
        for index, state in enumerate(states):
            sizes = [components, components * d_model, components * d_model]
            sums, shift, residual = torch.split(rows[:, start : start + sum(sizes)], sizes, dim=1)
            start += sum(sizes)
            error = squared_error if index == 0 else torch.zeros_like(squared_error)
            moments = BatchMoments(
                counts, sums, shift.view(-1, components, d_model), residual.view(-1, components, d_model), error
            )
            folded.append(_fold_moments(state, moments))
        return _pack(*folded)


def _row_width(moments: tuple[BatchMoments, ...]) -> int:
    return sum(group.sum_of_squares.numel() + 2 * group.shift.numel() for group in moments)


class _ChanMerge(Reduction):
    r"""Cross-process reduction of the packed statistics (see :func:`_pack`), exact at any offset, in two stages.

    Max stage: a shift :math:`c`, per dimension the largest mean of the processes that saw items (0 if none did), for
    the source and, when kept, the residual. Sum stage: each process's statistics about :math:`c`, :math:`n_r`,
    :math:`n_r \delta_r` and :math:`M_{2,r} + n_r \lVert\delta_r\rVert^2` with :math:`\delta_r = \bar x_r - c`, and its
    squared error. Then :math:`\bar x = c + \sum_r n_r \delta_r / n` and
    :math:`M_2 = \sum_r (M_{2,r} + n_r \lVert\delta_r\rVert^2) - \lVert\sum_r n_r \delta_r\rVert^2 / n`: an offset
    common to all items cancels in :math:`\delta_r` exactly, as in Chan's merge, and with one process that saw items
    its statistics come back unchanged. ``__call__`` merges gathered statistics the same way, all at once
    (``_merge_stacked``). A class, not a closure, so that the metric pickles.
    """

    def __init__(self, d_model: int) -> None:
        self.d_model = d_model

    def _groups(self, packed: Tensor) -> list[VarianceStatistics]:
        source, residual = _unpack(packed, self.d_model)
        return [source] if residual is None else [source, residual]

    def max_part(self, local: Tensor) -> Tensor:
        return torch.cat(
            [torch.where(g.item_count.unsqueeze(-1) > 0, order_key(g.mean), NO_KEY) for g in self._groups(local)], -1
        )

    def _shifts(self, maxed: Tensor | None) -> tuple[Tensor, ...]:
        keys = cast(Tensor, maxed)
        shift = torch.where(keys == NO_KEY, 0.0, from_order_key(keys, torch.float64))
        return tuple(torch.split(shift, self.d_model, dim=-1))

    def sum_part(self, local: Tensor, maxed: Tensor | None) -> Tensor:
        shifted = [_about(g, c) for g, c in zip(self._groups(local), self._shifts(maxed), strict=True)]
        return _pack(*shifted)

    def finish(self, local: Tensor, maxed: Tensor | None, summed: Tensor | None) -> Tensor:
        groups = self._groups(cast(Tensor, summed))
        return _pack(*[_from_about(g, c) for g, c in zip(groups, self._shifts(maxed), strict=True)])

    def __call__(self, stacked: Tensor) -> Tensor:
        return _pack(*[_merge_stacked(group) for group in self._groups(stacked)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(d_model={self.d_model})"


def _exact_moments(values: Tensor, squared_error: Tensor | None, dtype: torch.dtype) -> BatchMoments:
    """A batch's moments computed in ``dtype`` (float64 copies: exact to its rounding), for ``centred_residual``."""
    variance, mean, residual_sum = _centred_batch(values.detach(), dtype)
    error = torch.zeros_like(variance) if squared_error is None else squared_error
    return BatchMoments(values.shape[0], variance, mean, residual_sum, error)


class _VarianceContribution(NamedTuple):
    moments: tuple[BatchMoments, ...]  # the source's (and with centred_residual the residual's), detached
    source: Tensor  # [batch, component, d_model]
    squared_error: Tensor  # [batch, component], differentiable
    decoded: Tensor | None = None  # [batch, component, d_model], with centred_residual
    variance: Tensor | None = None  # [component] Σ (x - x̄)² of the batch, differentiable (not centred_residual)


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
    parallel formula, exact for data with a large offset; processes are merged the same way, so every process gets
    the bitwise identical result. A step queues its batch's moments, merged into the state at once when the state
    is read or its queue is full (a ``DeferredStatistics`` state). A collection reports ``explained_variance``
    (``1 - fvu``) beside it.

    With ``centred_residual=True`` the residual :math:`e = \hat x - x` is centred too (dictionary_learning's
    ``evaluate``: ``1 - sum_d Var(e_d) / sum_d Var(x_d)``, the ``n - 1`` of the unbiased variances cancelling):

    .. math:: \mathrm{FVU}_c = \frac{\sum_{b,d} (e_{bcd} - \bar e_{cd})^2}{\sum_{b,d} (x_{bcd} - \bar x_{cd})^2}

    so that a constant offset of the reconstruction costs nothing; one item gives NaN (0/0). The residual's
    (mean, M2) are kept and merged as the source's are, so the value is pooled exactly over items and processes
    (dictionary_learning averages per-batch values instead).

    Args:
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        d_model: The width of the activations (the state's per-dimension mean has this size).
        reconstruction: The input read as the reconstruction: ``"decoded_activations"``, or
            ``"multi_topk_decoded_activations"`` for sparsify's multi-TopK FVU (the decode of the top ``4k``
            latents).
        centred_residual: Centre the residual by its own mean (see above).
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
    is_loss_term = True  # sparsify trains on the FVU of each batch
    plot_lower_bound: float | None = 0.0
    plot_upper_bound: float | None = None

    _state_prefix: ClassVar[str] = "fvu"
    fvu_statistics = DeferredStatistics("fvu_statistics")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Make the statistics of a subclass that names its own state prefix a :class:`DeferredStatistics` state."""
        super().__init_subclass__(**kwargs)
        prefix = cls.__dict__.get("_state_prefix")
        if prefix is not None:
            setattr(cls, f"{prefix}_statistics", DeferredStatistics(f"{prefix}_statistics"))

    @validate_arguments
    def __init__(
        self,
        num_components: NumComponents = 1,
        *,
        d_model: PositiveInt,
        centred_residual: bool = False,
        reconstruction: Reconstruction = "decoded_activations",
        **kwargs: Any,
    ) -> None:
        self.reconstruction = reconstruction  # before the base class reads the inputs' signature
        super().__init__(num_components, **kwargs)
        self.d_model = d_model
        self.centred_residual = centred_residual
        self._state_name = f"{self._state_prefix}_statistics"
        width = 2 * d_model + 4 if centred_residual else d_model + 3
        self.add_state(
            self._state_name,
            torch.zeros(num_components, width, dtype=ACCUMULATOR_DTYPE),
            dist_reduce_fx=_ChanMerge(d_model),
            persistent=True,
        )
        self._add_configuration_marker()

    def _configuration(self) -> dict[str, Any]:
        configuration = {**super()._configuration(), "d_model": self.d_model}
        if self.centred_residual:  # absent by default: checkpoints from before the option still load
            configuration["centred_residual"] = True
        if self.reconstruction != "decoded_activations":  # likewise
            configuration["reconstruction"] = self.reconstruction
        return configuration

    @property
    def _positional_inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.reconstruction, "source_activations")

    @property
    def _statistics(self) -> Tensor:
        value: Tensor = getattr(self, self._state_name)
        return value

    def _contribution(self, batch: SaeBatch) -> _VarianceContribution:
        owner = type(self).__name__
        source = batch.require_width("source_activations", self.d_model, "d_model", owner)
        self._check_device(batch)
        squared_error = batch.squared_error(owner, self.reconstruction)
        dtype = self.__dict__[self._state_name].dtype  # not the attribute: that would fold the queue
        summed_error = batch.memo(
            ("summed_squared_error", self.reconstruction, dtype),
            lambda: squared_error.detach().sum(dim=0, dtype=dtype),
        )
        if not self.centred_residual:
            # One pass over the batch gives both the batch's FVU denominator and the moments of the float64 state
            # (shared by the FVU and the explained variance of one collection).
            compute_dtype = squared_error.dtype
            variance, mean, residual_sum = batch.memo(
                ("centred_source", compute_dtype), lambda: _centred_batch(source, compute_dtype)
            )
            moments = BatchMoments(source.shape[0], _detached(variance), mean, residual_sum, summed_error)
            return _VarianceContribution((moments,), source, squared_error, variance=variance)
        decoded = batch.require(self.reconstruction, owner)
        both = batch.memo(
            ("centred_moments", self.reconstruction, dtype),
            lambda: (
                _exact_moments(source, summed_error, dtype),
                _exact_moments(decoded.detach().to(dtype) - source.detach().to(dtype), None, dtype),
            ),
        )
        return _VarianceContribution(both, source, squared_error, decoded)

    def _finite_items(self, batch: SaeBatch, contribution: _VarianceContribution) -> Tensor | None:
        source_finite = contribution.source.detach().isfinite().flatten(1).all(dim=1)
        return source_finite & contribution.squared_error.detach().isfinite().all(dim=1)

    def _record(self, contribution: _VarianceContribution) -> None:
        if contribution.source.shape[0] == 0:
            return
        self._queue(self._state_name, contribution.moments)

    def _value(self, contribution: _VarianceContribution) -> Tensor:
        return self._squeeze(self._batch_fvu(contribution))

    @staticmethod
    def _batch_fvu(contribution: _VarianceContribution) -> Tensor:
        if contribution.decoded is not None:
            return _batch_centred_fvu(contribution.source, contribution.decoded)
        if contribution.variance is not None:
            return contribution.squared_error.sum(dim=0) / contribution.variance
        return _batch_fvu(contribution.source, contribution.squared_error)

    def _fvu(self) -> Tensor:
        """Pooled FVU ``[component]`` of every item in the (possibly synced) state."""
        statistics, residual = _unpack(self._statistics, self.d_model)
        if residual is not None:
            return _fvu_compute(residual.m2, statistics.m2)
        return _fvu_compute(statistics.squared_error, statistics.m2)

    def _batch_mean(self, contribution: _VarianceContribution) -> Tensor:
        """The batch's own FVU ``[component]`` (as a loss term: sparsify's per-batch ``fvu``)."""
        return self._batch_fvu(contribution)

    def _epoch_mean(self) -> Tensor:
        return self._fvu()

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

    With ``centred_residual=True`` it is dictionary_learning's ``frac_variance_explained``,
    ``1 - sum_d Var(e_d) / sum_d Var(x_d)``, pooled over every item.

    Args:
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        d_model: The width of the activations.
        centred_residual: Centre the residual by its own mean (see :class:`FractionOfVarianceUnexplained`).
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
    is_loss_term = False  # higher is better: weight `FractionOfVarianceUnexplained` instead
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
