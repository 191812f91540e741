"""The state and update/forward/compute machinery shared by every per-item-mean metric."""

from __future__ import annotations

import dataclasses
import functools
from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import Tensor
from torch.nn import Module
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors
from torchmetrics.utilities.exceptions import TorchMetricsUserError

from sparse_metrics._config import NanStrategy
from sparse_metrics._distributed import sync_states
from sparse_metrics._validation import check_nan_strategy

__all__ = ["ACCUMULATOR_DTYPE", "ItemMeanMetric", "PackedSyncMetric", "finite_items", "screen_items"]

#: Sums are accumulated in float64: a float32 sum of a million batch means drifts visibly.
ACCUMULATOR_DTYPE = torch.float64


def finite_items(per_item: Iterable[Tensor]) -> Tensor:
    """``[batch]`` booleans: whether every value of each item, in every tensor ``[batch, ...]``, is finite."""
    return torch.stack([values.detach().isfinite().flatten(1).all(dim=1) for values in per_item]).all(dim=0)


def screen_items(
    per_item: dict[str, Tensor], nan_strategy: NanStrategy, owner: str, inputs: list[str]
) -> dict[str, Tensor]:
    """Apply ``nan_strategy`` to the per-item values ``[batch, ...]`` of one batch, all at once.

    An item is non-finite when any of its values, in any of the tensors, is NaN or infinite; "ignore" drops it from
    every tensor, so all of them keep the same items.

    Args:
        per_item: Per-item values by name, all with the same batch size.
        nan_strategy: ``"propagate"``, ``"ignore"`` or ``"error"``.
        owner: The metric's name, for the error.
        inputs: The argument names to blame in the error.
    """
    batch = next(iter(per_item.values())).shape[0]
    if nan_strategy == "propagate" or batch == 0:
        return per_item
    finite = finite_items(per_item.values())
    if nan_strategy == "ignore":
        return {name: values[finite] for name, values in per_item.items()}
    if not bool(finite.all()):  # the one synchronisation of nan_strategy="error"
        raise ValueError(
            f"{owner}: {int((~finite).sum())} of {batch} items have a NaN or infinite value; check the inputs "
            f"{', '.join(f'`{name}`' for name in inputs)}. This is nan_strategy='error'; pass "
            "nan_strategy='ignore' to drop such items or 'propagate' to let them through."
        )
    return per_item


def _supports_float64(device: torch.device) -> bool:
    """Whether tensors on ``device`` can be float64 (Apple's MPS backend has no float64)."""
    return device.type != "mps"


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    update_count: int
    computed: Any
    states: dict[str, Any]


class PackedSyncMetric(Metric):
    """Base of every sparse_metrics metric: packed distributed sync, and rejected updates that change nothing.

    - ``compute()`` syncs every state in at most two collective calls (see :mod:`sparse_metrics._distributed`):
      tensor states reduced by sum/max/min or a callable, list states by ``"cat"``. A subclass with list states
      implements ``_empty_list_state(name)``.
    - An ``update`` that raises leaves the metric exactly as it was, provided it validates everything before it
      touches a state (the update count and cached result torchmetrics changes first are restored).
    - ``dist_sync_on_step=True`` is refused unless the subclass's ``forward`` honours it.
    """

    #: Whether ``forward`` honours ``dist_sync_on_step=True``; where it returns this process's own batch value, the
    #: option is refused rather than silently ignored.
    _forward_syncs_on_step: ClassVar[bool] = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.dist_sync_on_step and not self._forward_syncs_on_step:
            raise ValueError(
                f"`dist_sync_on_step=True` is not supported by {type(self).__name__}: its forward returns this "
                "process's batch value; compute() returns the value synced across processes."
            )

    def _wrap_update(self, update: Callable[..., None]) -> Callable[..., None]:
        """Make a rejected ``update`` leave the metric exactly as it was.

        ``_per_item`` validates everything before any state changes; torchmetrics' wrapper, however, counts the call
        and drops the cached ``compute`` result before ``update`` runs. Those, and the states, are restored if it
        raises.
        """
        wrapped = super()._wrap_update(update)

        @functools.wraps(update)
        def update_or_restore(*args: Any, **kwargs: Any) -> None:
            snapshot = self._snapshot()
            try:
                wrapped(*args, **kwargs)
            except Exception:
                self._restore(snapshot)
                raise

        return update_or_restore

    def _snapshot(self) -> _Snapshot:
        """What ``_restore`` needs to undo a batch: states are replaced, never changed in place, so references do."""
        states = {name: list(value) if isinstance(value, list) else value for name, value in self.metric_state.items()}
        return _Snapshot(self._update_count, self._computed, states)

    def _restore(self, snapshot: _Snapshot) -> None:
        self._update_count, self._computed = snapshot.update_count, snapshot.computed
        for name, value in snapshot.states.items():
            setattr(self, name, value)

    def _count_update(self) -> None:
        """Count a batch recorded outside ``update`` (by ``forward`` or a collection), as torchmetrics counts updates.

        Callers record the batch first and count it after, so a batch that fails to record (on another device than
        the states, say) leaves the count as it was.
        """
        self._update_count += 1
        self._computed = None

    def _sync_dist(self, dist_sync_fn: Any = gather_all_tensors, process_group: Any | None = None) -> None:
        """Sync every state in at most two collective calls (see :mod:`sparse_metrics._distributed`)."""
        if dist_sync_fn is not gather_all_tensors:  # a user-supplied sync function keeps torchmetrics' path
            super()._sync_dist(dist_sync_fn, process_group=process_group)
            return
        sync_states([self], process_group or self.process_group)

    def _apply(self, fn: Callable[..., Any], exclude_state: Sequence[str] = ()) -> Module:
        """Move the states and buffers with the metric, but never change their dtypes.

        torchmetrics casts states on ``.to(dtype)`` (e.g. a parent model's ``.to(torch.bfloat16)``) and
        ``set_dtype``: float64 sums and int64 counts would become half-precision floats, losing precision and
        counts for good; buffers (a sparsity coefficient, prefix weights) would be rounded. They follow the
        metric's device only; float64 ones become float32 on a device without float64 (MPS).
        """
        own = [name for name in self._defaults if name not in exclude_state]
        target = fn(torch.zeros((), device=self.device)).device
        without_float64 = not _supports_float64(target)
        buffers = dict(self._buffers)
        self._buffers.clear()  # moved below, keeping their dtype
        try:
            super()._apply(fn, exclude_state=[*exclude_state, *own])  # sets self.device
        finally:
            self._buffers.update(buffers)

        def move(tensor: Tensor) -> Tensor:
            if without_float64 and tensor.dtype == torch.float64:  # e.g. MPS: float32 sums there
                tensor = tensor.float()
            if tensor.device.type == "meta" and target.type != "meta":  # no data to copy: what ``to_empty`` does
                return torch.empty_like(tensor, device=target)
            return tensor.to(device=target)

        for name, buffer in buffers.items():
            if buffer is not None:
                self._buffers[name] = move(buffer)
        for name in own:
            default, value = self._defaults[name], getattr(self, name)
            if isinstance(default, Tensor):
                self._defaults[name] = move(default)
            setattr(self, name, move(value) if isinstance(value, Tensor) else [move(row) for row in value])
        self._computed = None  # torchmetrics cast the cached result too: compute it again from the states
        return self

    def _empty_list_state(self, name: str) -> Tensor:
        """An empty tensor with the dtype, device and trailing shape of the rows of list state ``name``."""
        raise NotImplementedError(f"{type(self).__name__} has list state `{name}`: implement `_empty_list_state`.")

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
        """Refuse states shaped for another configuration before loading any of them.

        torchmetrics assigns saved states as they are: a checkpoint of a metric with another ``num_components`` or
        other prefix sizes would load silently and give wrong results, or fail much later.
        """
        for name, default in self._defaults.items():
            saved = state_dict.get(prefix + name)
            if saved is None:
                continue
            expected: list[int | str]
            got: list[int | str] | None
            if isinstance(default, Tensor):
                expected, got = list(default.shape), list(saved.shape) if isinstance(saved, Tensor) else None
            else:  # a list state: rows [n, *trailing]; compare the trailing shape
                expected = ["*", *self._empty_list_state(name).shape[1:]]
                got = next((["*", *row.shape[1:]] for row in saved if ["*", *row.shape[1:]] != expected), expected)
            if got != expected:
                raise ValueError(
                    f"Cannot load state `{prefix + name}` into {type(self).__name__}: expected shape {expected}, "
                    f"got {got}. The checkpoint comes from a metric configured differently (num_components, "
                    "prefix_sizes, ...)."
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

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

    ``nan_strategy`` says what happens to an item whose per-item value is NaN or infinite (in any component, or
    any Matryoshka prefix; for L0, an item with a non-finite input activation):

    - ``"propagate"`` (default): it is accumulated like any other, so the epoch value becomes NaN/Inf, visibly, as
      the training loss would. No check runs: no extra pass, no host-device synchronisation.
    - ``"ignore"``: the whole item (every component) is left out of the sums, the count and the per-item values,
      and out of ``forward``'s batch value. Dropping rows needs their number on the host: one synchronisation per
      update.
    - ``"error"``: ``update``/``forward`` raise ``ValueError`` and leave the state untouched. Reading the check's
      result synchronises with the device once per update.
    """

    full_state_update = False
    is_differentiable = True
    higher_is_better = False
    plot_lower_bound = 0.0

    _forward_syncs_on_step = True

    #: Prefix of this class's state names.
    _state_prefix: ClassVar[str]

    def __init__(
        self,
        num_components: int = 1,
        *,
        keep_batch_dim: bool = False,
        nan_strategy: str = "propagate",  # checked here: subclasses pass it through their **kwargs
        **kwargs: Any,
    ) -> None:
        check_nan_strategy(nan_strategy)
        super().__init__(**kwargs)
        self.num_components = num_components
        self.nan_strategy = cast(NanStrategy, nan_strategy)
        self._keep_batch_dim = keep_batch_dim
        self._sum_state = f"{self._state_prefix}_sum"
        self._count_state = f"{self._state_prefix}_count"
        self._per_item_state = f"{self._state_prefix}_per_item"
        self.add_state(self._sum_state, torch.zeros(num_components, dtype=ACCUMULATOR_DTYPE), dist_reduce_fx="sum")
        self.add_state(self._count_state, torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state(self._per_item_state, [], dist_reduce_fx="cat")

    def _wrap_compute(self, compute: Callable[..., Any]) -> Callable[..., Any]:
        """Keep the item axis of a single per-item value: torchmetrics squeezes every one-element result to 0-d."""
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def compute_keeping_items(*args: Any, **kwargs: Any) -> Any:
            value = wrapped(*args, **kwargs)
            if self._keep_batch_dim and isinstance(value, Tensor) and value.ndim == 0:
                return value.reshape(1)  # one item of a one-component metric: [item], as forward returns it
            return value

        return compute_keeping_items

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

    def _screen(self, per_item: Tensor) -> Tensor:
        """Apply ``nan_strategy`` to per-item values ``[batch, ...]``: drop, reject or keep non-finite items."""
        if self.nan_strategy == "propagate":
            return per_item
        inputs = [name for name in self._update_signature.parameters if name != "kwargs"]
        return screen_items({"": per_item}, self.nan_strategy, type(self).__name__, inputs)[""]

    def _accumulate(self, per_item: Tensor) -> None:
        """Apply ``nan_strategy`` to validated per-item values, then add them to the state (``update``'s path)."""
        self._add(self._screen(per_item))

    def _add(self, per_item: Tensor) -> None:
        """Add screened per-item values to the state (out of place, with no graph)."""
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
        per_item = self._screen(self._per_item(*args, **kwargs))
        self._record_batch(per_item)
        value = self._output(per_item)
        # Detached: the cache outlives the step, and must not keep its autograd graph alive.
        self._forward_cache = value.detach()  # type: ignore[assignment]  # torchmetrics annotates it as None
        return value

    def _record_batch(self, per_item: Tensor) -> None:
        """Accumulate validated, screened per-item values, as ``update`` would (used by forward and the collection)."""
        self._add(per_item)
        if self.compute_on_cpu:
            self._move_list_states_to_cpu()
        self._count_update()

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
