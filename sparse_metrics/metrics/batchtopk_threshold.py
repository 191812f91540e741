"""The BatchTopK inference threshold as a metric: a running model statistic, identical on every process."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from sparse_metrics._batch import SAE_INPUTS, SaeBatch
from sparse_metrics._config import NumComponents, validate_arguments
from sparse_metrics.functional.batchtopk_threshold import (
    CONVENTIONS,
    Convention,
    _check_convention,
    _min_positive,
    _threshold_step,
)
from sparse_metrics.metrics._base import SaeMetric

__all__ = ["BatchTopKThreshold"]


class _ThresholdContribution(NamedTuple):
    min_positive: Tensor  # [component] float64, over the global batch (inf: no positive activation)
    step: Tensor  # 0-d int64: the step this batch belongs to
    input_dtype: torch.dtype


class BatchTopKThreshold(SaeMetric):
    r"""The running inference threshold of a BatchTopK SAE, as SAELens, dictionary_learning or saev estimate it.

    Each update is one training step: with :math:`m_t` the smallest positive activation of the step (over every item
    and feature, per component, and over every process),

    .. math:: \theta_t = (1 - \mu)\, \theta_{t-1} + \mu\, m_t

    ``convention`` picks a peer's defaults and arithmetic (bitwise its value; see
    :func:`~sparse_metrics.functional.batchtopk_threshold.batchtopk_threshold`):

    - ``"saelens"``: ``momentum`` 0.01 (``topk_threshold_lr``), float64, :math:`\theta_0 = 0`, every step; no
      update on a step with no positive activation.
    - ``"dictionary_learning"``: ``momentum`` :math:`1 - \beta`, :math:`\beta = 0.999` (``threshold_beta``), float32,
      only on steps ``step > start_step`` (``threshold_start_step``, 1000); ``compute()`` is -1 until the first
      update, which sets :math:`\theta = m_t`; no positive activation counts as :math:`m_t = 0`.
    - ``"saev"``: ``momentum`` 0.1, float32, :math:`\theta_0 = 0`, every step; no update on a step with no positive
      activation (where saev raises).

    **Steps.** ``update``/``forward`` take an optional ``step=`` keyword (a non-negative int, e.g. the trainer's
    step, counted from 0 as dictionary_learning's ``enumerate``); without it the step is one more than the last
    one (0 first). The start step compares with that number, so resuming from a checkpoint (the step counter is
    saved) and gradient accumulation (several updates with the same ``step=``) do not shift it; each update is one
    moving-average step.

    **Processes.** The minimum is over the global batch of each step: every update runs one ``all_reduce`` (MIN) over
    the metric's ``process_group`` on every process (with ``sync_on_compute=True``, the default), with no
    host-device synchronisation, so every process holds the same threshold; every process must update at every
    step, as data-parallel training does. A checkpoint therefore loads on any number of processes.

    **Lifetime.** The threshold is a running model statistic, like :class:`~sparse_metrics.DeadFeatures`' counters:
    :meth:`reset` (called by :class:`torchmetrics.MetricCollection` at each epoch end) keeps it and the step
    counter; :meth:`reset_threshold` clears both. Both are saved in ``state_dict``.

    Not differentiable and not a loss term: ``forward`` returns the threshold after the step, ``compute()`` the
    current threshold, float64 ``[component]`` (0-d for one component).

    Args:
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        convention: ``"saelens"``, ``"dictionary_learning"`` or ``"saev"``.
        momentum: The weight :math:`\mu` of the step's minimum, in (0, 1]; None: the convention's (SAELens' ``lr``,
            dictionary_learning's ``1 - beta``, saev's ``momentum``).
        start_step: The threshold is updated only at steps ``step > start_step``; None: the convention's (1000 for
            dictionary_learning, -1, i.e. every step, otherwise).
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from sparse_metrics import BatchTopKThreshold
        >>> metric = BatchTopKThreshold(momentum=0.5)
        >>> metric(torch.tensor([[0.0, 2.0], [4.0, 0.0]]))  # 0.5 * 0 + 0.5 * 2
        tensor(1., dtype=torch.float64)
        >>> metric.update(torch.tensor([[0.0, 3.0]]))
        >>> metric.compute()  # 0.5 * 1 + 0.5 * 3
        tensor(2., dtype=torch.float64)
        >>> metric.reset()  # an epoch ends: the threshold stays
        >>> metric.compute()
        tensor(2., dtype=torch.float64)
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    _positional_inputs: ClassVar[tuple[str, ...]] = ("learned_activations",)
    _threshold_state: ClassVar[str] = "batchtopk_threshold"
    _step_state: ClassVar[str] = "batchtopk_step"

    @validate_arguments
    def __init__(
        self,
        num_components: NumComponents = 1,
        *,
        convention: str = "saelens",
        momentum: float | None = None,
        start_step: int | None = None,
        **kwargs: Any,
    ) -> None:
        _check_convention(convention)
        default_momentum, default_start, initial = CONVENTIONS[convention]
        momentum = default_momentum if momentum is None else momentum
        if not 0 < momentum <= 1:
            raise ValueError(f"`momentum` must be in (0, 1], got {momentum}.")
        start_step = default_start if start_step is None else start_step
        if start_step < -1:
            raise ValueError(f"`start_step` must be -1 (every step) or more, got {start_step}.")
        super().__init__(num_components, **kwargs)
        self.convention: Convention = convention  # type: ignore[assignment]  # checked above
        self.momentum = momentum
        self.start_step = start_step
        self.add_state(
            self._threshold_state,
            torch.full((num_components,), initial, dtype=torch.float64),
            dist_reduce_fx="max",  # the same on every process: any of min/max is exact
            persistent=True,
        )
        self.add_state(self._step_state, torch.zeros((), dtype=torch.int64), dist_reduce_fx="max", persistent=True)
        self._step_override: int | None = None
        self._add_configuration_marker()

    def _configuration(self) -> dict[str, Any]:
        return {
            **super()._configuration(),
            "convention": self.convention,
            "momentum": self.momentum,
            "start_step": self.start_step,
        }

    @property
    def _threshold(self) -> Tensor:
        value: Tensor = getattr(self, self._threshold_state)
        return value

    @property
    def _step(self) -> Tensor:
        value: Tensor = getattr(self, self._step_state)
        return value

    # ``step=`` is no SAE input: it is taken here, before the inputs are checked (a misspelt keyword still raises).

    @staticmethod
    def _check_step(step: Any) -> int | None:
        if step is None:
            return None
        if isinstance(step, bool | Tensor | float):
            raise TypeError(f"`step` must be a Python int, got {type(step).__name__}.")
        try:
            value = operator.index(step)
        except TypeError:
            raise TypeError(f"`step` must be a Python int, got {type(step).__name__}.") from None
        if value < 0:
            raise ValueError(f"`step` must be non-negative, got {value}.")
        return value

    def update(self, *args: Any, step: int | None = None, **kwargs: Any) -> None:
        """Record one training step (see the class); ``step`` is the trainer's step number (optional)."""
        self._step_override = self._check_step(step)
        try:
            super().update(*args, **kwargs)
        finally:
            self._step_override = None

    def forward(self, *args: Any, step: int | None = None, **kwargs: Any) -> Tensor:
        """Record one training step and return the threshold after it."""
        self._step_override = self._check_step(step)
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._step_override = None

    def _filter_kwargs(self, **kwargs: Any) -> dict[str, Any]:
        """The SAE inputs and ``step`` among ``kwargs`` (a ``torchmetrics.MetricCollection`` routes its inputs here)."""
        return {name: value for name, value in kwargs.items() if name in SAE_INPUTS or name == "step"}

    # The protocol.

    def _global_min_positive(self, learned: Tensor) -> Tensor:
        minimum = _min_positive(learned)
        sharding = self.feature_sharding
        if sharding is not None and sharding.size > 1:  # the whole dictionary's minimum, whatever the data sync
            dist.all_reduce(minimum, op=dist.ReduceOp.MIN, group=sharding.group)
        if self._to_sync and self.distributed_available_fn():
            group = self.process_group or dist.group.WORLD
            if dist.get_world_size(group) > 1:
                dist.all_reduce(minimum, op=dist.ReduceOp.MIN, group=group)
        return minimum

    def _contribution(self, batch: SaeBatch) -> _ThresholdContribution:
        learned = batch.require("learned_activations", type(self).__name__)
        self._check_device(batch)
        override = self._step_override
        step = self._step if override is None else torch.tensor(override, dtype=torch.int64, device=self.device)
        return _ThresholdContribution(self._global_min_positive(learned), step, learned.dtype)

    def _record(self, contribution: _ThresholdContribution) -> None:
        updated = _threshold_step(
            self._threshold,
            contribution.min_positive.to(self._threshold.device),
            contribution.step > self.start_step,
            convention=self.convention,
            momentum=self.momentum,
            input_dtype=contribution.input_dtype,
        )
        setattr(self, self._threshold_state, updated)
        setattr(self, self._step_state, contribution.step + 1)

    def _value(self, contribution: _ThresholdContribution) -> Tensor:
        return self._squeeze(self._threshold.clone())

    def compute(self) -> Tensor:
        """The threshold, float64 ``[component]`` (0-d for one component); the same on every process."""
        return self._squeeze(self._threshold.clone())

    @property
    def step(self) -> int:
        """The step the next update belongs to when no ``step=`` is given (reads the counter: one synchronisation)."""
        return int(self._step)

    def reset(self) -> None:
        """End an epoch: the threshold, the step counter and the update count are kept (see :meth:`reset_threshold`)."""
        threshold, step, update_count = self._threshold, self._step, self._update_count
        super().reset()
        setattr(self, self._threshold_state, threshold)
        setattr(self, self._step_state, step)
        self._update_count = update_count

    def reset_threshold(self) -> None:
        """Clear the threshold and the step counter: back to the convention's initial value at step 0."""
        super().reset()

    def _check_processes(self, saved: Mapping[str, Any], where: str) -> None:
        """Any number of processes may load a checkpoint: every process holds the same threshold and step."""

    def extra_repr(self) -> str:
        """Show the convention and its settings in ``repr``."""
        return f"convention={self.convention!r}, momentum={self.momentum}, start_step={self.start_step}"
