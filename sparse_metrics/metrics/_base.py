"""The state and update/forward/compute machinery shared by every per-item-mean metric."""

from __future__ import annotations

import functools
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors
from torchmetrics.utilities.exceptions import TorchMetricsUserError

from sparse_metrics._distributed import sync_states

__all__ = ["ACCUMULATOR_DTYPE", "ItemMeanMetric", "PackedSyncMetric"]

#: Sums are accumulated in float64: a float32 sum of a million batch means drifts visibly.
ACCUMULATOR_DTYPE = torch.float64


def _supports_float64(device: torch.device) -> bool:
    """Whether tensors on ``device`` can be float64 (Apple's MPS backend has no float64)."""
    return device.type != "mps"


class _WithoutFloat64:
    """A module ``_apply`` function that first turns float64 tensors into float32, for a device without float64.

    It prints as the function it wraps: torchmetrics tells dtype conversions (``.half()``, ``.double()``, ...) from
    device moves by the printed form of the function, and those must still be told apart.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn

    def __call__(self, tensor: Tensor) -> Tensor:
        return self.fn(tensor.float() if tensor.dtype == torch.float64 else tensor)

    def __str__(self) -> str:
        return str(self.fn)


class PackedSyncMetric(Metric):
    """Base of every sparse_metrics metric: packed distributed sync, and rejected updates that change nothing.

    - ``compute()`` syncs every state in at most two collective calls (see :mod:`sparse_metrics._distributed`):
      tensor states reduced by sum/max/min or a callable, list states by ``"cat"``. A subclass with list states
      implements ``_empty_list_state(name)``.
    - An ``update`` that raises leaves the metric exactly as it was, provided it validates everything before it
      touches a state (the update count and cached result torchmetrics changes first are restored).
    """

    def _wrap_update(self, update: Callable[..., None]) -> Callable[..., None]:
        """Make a rejected ``update`` leave the metric exactly as it was.

        ``_per_item`` validates everything before any state changes; torchmetrics' wrapper, however, counts the call
        and drops the cached ``compute`` result before ``update`` runs. Those are restored if it raises.
        """
        wrapped = super()._wrap_update(update)

        @functools.wraps(update)
        def update_or_restore(*args: Any, **kwargs: Any) -> None:
            update_count, computed = self._update_count, self._computed
            try:
                wrapped(*args, **kwargs)
            except Exception:
                self._update_count, self._computed = update_count, computed
                raise

        return update_or_restore

    def _apply(self, fn: Callable[[Tensor], Tensor], exclude_state: Sequence[str] = "") -> torch.nn.Module:
        """Move or convert the states like torchmetrics, float64 ones to float32 on a device without float64."""
        target = fn(torch.zeros((), device=self.device)).device
        if not _supports_float64(target):
            fn = _WithoutFloat64(fn)
        return super()._apply(fn, exclude_state)

    def _sync_dist(self, dist_sync_fn: Any = gather_all_tensors, process_group: Any | None = None) -> None:
        """Sync every state in at most two collective calls (see :mod:`sparse_metrics._distributed`)."""
        if dist_sync_fn is not gather_all_tensors:  # a user-supplied sync function keeps torchmetrics' path
            super()._sync_dist(dist_sync_fn, process_group=process_group)
            return
        sync_states([self], process_group or self.process_group)

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Plot a value, or a sequence of values, of this metric (torchmetrics' plot API; needs matplotlib).

        Args:
            val: A result of ``compute``/``forward``, or a sequence of them (e.g. one per epoch); None computes it.
            ax: A matplotlib ``Axes`` to draw into; None creates a figure.

        Returns:
            ``(figure, axes)``.

        Example:
            >>> import matplotlib
            >>> matplotlib.use("Agg")
            >>> import torch
            >>> from sparse_metrics import L0NormMetric
            >>> metric = L0NormMetric()
            >>> values = [metric(torch.tensor([[1.0, 0.0], [2.0, 3.0]])) for _ in range(3)]
            >>> figure, axes = metric.plot(values)
        """
        return self._plot(val, ax)


class ItemMeanMetric(PackedSyncMetric):
    """A metric whose value is, per component, the mean over every item seen of a per-item value.

    Subclasses supply ``_per_item`` (validate the inputs and return ``[batch, component]`` values, through the
    functional core) and an ``update`` with their argument names. This class owns the state:

    - ``<prefix>_sum``: ``[component]`` float64 sum of the per-item values, reduced by ``"sum"``;
    - ``<prefix>_count``: int64 number of items, reduced by ``"sum"``;
    - ``<prefix>_per_item``: list of detached ``[batch, component]`` float64 rows, reduced by ``"cat"``, filled only
      with ``keep_batch_dim=True``.

    State names carry the class's prefix so that torchmetrics' compute groups can never merge two different metrics.
    """

    full_state_update = False
    is_differentiable = True
    higher_is_better = False
    plot_lower_bound = 0.0

    #: Prefix of this class's state names.
    _state_prefix: ClassVar[str]

    def __init__(self, num_components: int = 1, *, keep_batch_dim: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_components = num_components
        self._keep_batch_dim = keep_batch_dim
        self._sum_state = f"{self._state_prefix}_sum"
        self._count_state = f"{self._state_prefix}_count"
        self._per_item_state = f"{self._state_prefix}_per_item"
        self.add_state(self._sum_state, torch.zeros(num_components, dtype=ACCUMULATOR_DTYPE), dist_reduce_fx="sum")
        self.add_state(self._count_state, torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state(self._per_item_state, [], dist_reduce_fx="cat")

    @property
    def keep_batch_dim(self) -> bool:
        """Whether ``compute``/``forward`` return per-item values ``[item, *component]`` instead of means.

        Setting a different value resets the metric (the states kept differ); setting the same value does nothing.
        """
        return self._keep_batch_dim

    @keep_batch_dim.setter
    def keep_batch_dim(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"`keep_batch_dim` must be a bool, got {type(value).__name__}.")
        if value != self._keep_batch_dim:
            self._keep_batch_dim = value
            self.reset()

    @abstractmethod
    def _per_item(self, *args: Any, **kwargs: Any) -> Tensor:
        """Validate the inputs (the arguments of ``update``) and return per-item values ``[batch, component]``."""

    def _item_values(self, per_item: Tensor) -> Tensor:
        """The ``[batch, component]`` values averaged by this metric, from what ``_per_item`` returned."""
        return per_item

    def _accumulate(self, per_item: Tensor) -> None:
        """Add validated per-item values to the state (out of place, with no graph)."""
        if per_item.shape[0] == 0:
            return
        per_item = self._item_values(per_item).detach()
        total = self._tensor_state(self._sum_state)
        setattr(self, self._sum_state, total + per_item.sum(dim=0, dtype=total.dtype))
        setattr(self, self._count_state, self._tensor_state(self._count_state) + per_item.shape[0])
        if self._keep_batch_dim:
            getattr(self, self._per_item_state).append(per_item.to(total.dtype))

    def _output(self, per_item: Tensor) -> Tensor:
        """The value reported for per-item values: their mean, or themselves with ``keep_batch_dim``.

        The component axis is dropped for a single-component metric.
        """
        values = self._item_values(per_item)
        if not self._keep_batch_dim:
            values = values.mean(dim=0)
        return values.squeeze(-1) if self.num_components == 1 else values

    def _batch_mean(self, per_item: Tensor) -> Tensor:
        """Batch mean ``[component]`` of per-item values, whatever ``keep_batch_dim`` (the collection's loss)."""
        return self._item_values(per_item).mean(dim=0)

    def _mean(self) -> Tensor:
        """Mean ``[component]`` over every item accumulated (or synced), whatever ``keep_batch_dim``."""
        return self._tensor_state(self._sum_state) / self._tensor_state(self._count_state)

    def _tensor_state(self, name: str) -> Tensor:
        value: Tensor = getattr(self, name)
        return value

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Accumulate the batch and return its value, differentiable with respect to the inputs.

        Unlike torchmetrics' default, the per-item values are computed once and feed both the state and the
        returned batch value; the global state is neither copied nor reset.
        """
        if self._is_synced:
            raise TorchMetricsUserError(
                "The metric shouldn't be synced when performing ``forward``. HINT: Did you forget to call ``unsync``?"
            )
        if self.dist_sync_on_step:
            # The batch value must be synced across ranks: torchmetrics' generic path does that. Validate first,
            # since that path resets the state before calling ``update``.
            self._per_item(*args, **kwargs)
            synced_value: Tensor = super().forward(*args, **kwargs)
            return synced_value
        per_item = self._per_item(*args, **kwargs)
        self._record_batch(per_item)
        value = self._output(per_item)
        self._forward_cache = value  # type: ignore[assignment]  # torchmetrics annotates it as None
        return value

    def _record_batch(self, per_item: Tensor) -> None:
        """Accumulate already validated per-item values, as ``update`` would (used by forward and the collection)."""
        self._update_count += 1
        self._computed = None
        self._accumulate(per_item)
        if self.compute_on_cpu:
            self._move_list_states_to_cpu()

    def compute(self) -> Tensor:
        """Mean over every item seen (synced across processes), or the per-item values with ``keep_batch_dim``.

        Returns ``[component]``, a 0-d tensor for one component, float64. With no item seen the mean is NaN.
        """
        if self._keep_batch_dim:
            rows = getattr(self, self._per_item_state)
            values = dim_zero_cat(rows) if rows else self._empty_list_state(self._per_item_state)
            return values.squeeze(-1) if self.num_components == 1 else values
        return self._mean()

    def _empty_list_state(self, name: str) -> Tensor:
        """An empty ``[0, component]`` tensor: the rows of a rank that kept no per-item values."""
        dtype = self._tensor_state(self._sum_state).dtype  # float64, or float32 on a device without float64
        return torch.zeros(0, self.num_components, dtype=dtype, device=self.device)
