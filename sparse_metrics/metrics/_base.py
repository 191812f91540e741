"""The member protocol every metric of this package speaks, and the state machinery the per-item means share.

A metric reads one step through a :class:`~sparse_metrics._batch.SaeBatch` and implements four methods over it:

- ``_contribution(batch)``: what this batch adds (validated; built from the batch's shared statistics);
- ``_finite_items(batch, contribution)``: which items are finite, for ``nan_strategy`` (None: nothing to screen);
- ``_record(contribution)``: add it to the state;
- ``_value(contribution)``: the batch value that ``forward`` returns (differentiable where the metric is).

``update``/``forward`` of a metric used alone and :class:`~sparse_metrics.SparseAutoencoderLoss` run the same
helpers over these methods (:func:`batch_contributions`, :func:`recording`), so a metric behaves the same alone and
in a collection.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import warnings
from abc import abstractmethod
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence, Sized
from contextlib import contextmanager
from typing import Any, ClassVar, NamedTuple, TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import Module
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors
from torchmetrics.utilities.exceptions import TorchMetricsUserError

from sparse_metrics._batch import SAE_INPUTS, SaeBatch, check_input_names, inputs_of
from sparse_metrics._config import NanStrategy
from sparse_metrics._distributed import sync_states
from sparse_metrics._sharding import FeatureSharding, resolve_sharding
from sparse_metrics._validation import check_nan_strategy

__all__ = [
    "ACCUMULATOR_DTYPE",
    "DeferredState",
    "DeferredSum",
    "DerivedOutput",
    "ItemMeanMetric",
    "SaeMetric",
    "batch_contributions",
    "recording",
    "supports_float64",
]

#: Sums are accumulated in float64: a float32 sum of a million batch means drifts visibly.
ACCUMULATOR_DTYPE = torch.float64


def supports_float64(device: torch.device) -> bool:
    """Whether tensors on ``device`` can be float64 (Apple's MPS backend has no float64)."""
    return device.type != "mps"


def batch_contributions(
    members: Sequence[SaeMetric], batch: SaeBatch, nan_strategy: NanStrategy, owner: str
) -> list[Any]:
    """Every member's contribution to ``batch``, after ``nan_strategy`` has screened the items once for all of them.

    An item is non-finite when any member finds it so; "ignore" drops it from every member by building the
    contributions again from the finite items, "error" raises before any state changes.
    """
    contributions = [batch.contribution(member) for member in members]
    if nan_strategy == "propagate" or batch.batch_size == 0:
        return contributions
    masks = [
        mask
        for member, contribution in zip(members, contributions, strict=True)
        if (mask := member._finite_items(batch, contribution)) is not None
    ]
    if not masks:
        return contributions
    finite = torch.stack(masks).all(dim=0)
    if batch.sharding is not None and batch.sharding.size > 1:
        # An item non-finite on one shard is dropped (or refused) on every shard: they must keep the same items.
        finite = batch.sharding.sum({"finite": (~finite).to(torch.float32)})["finite"] == 0
    if not bool(finite.all()):  # the one synchronisation of nan_strategy "error" and "ignore"
        if nan_strategy == "error":
            given = batch.names
            raise ValueError(
                f"{owner}: {int((~finite).sum())} of {batch.batch_size} items have a NaN or infinite value; check the "
                f"inputs {', '.join(f'`{name}`' for name in given)}. This is nan_strategy='error'; pass "
                "nan_strategy='ignore' to drop such items or 'propagate' to let them through."
            )
        batch = batch.select(finite)
        contributions = [batch.contribution(member) for member in members]
    return contributions


def _set_plain(metric: Metric, **values: Any) -> None:
    """Set torchmetrics' per-step attributes (``_update_count``, ``_computed``, ``_forward_cache``) of ``metric``.

    They are plain attributes, never parameters, buffers or submodules: writing them into the instance dict skips
    ``nn.Module.__setattr__``'s checks for those (a ``Parameter`` instance check among them), which at small batch
    sizes cost more per step than the arithmetic.
    """
    vars(metric).update(values)


def _detached(value: Tensor) -> Tensor:
    """``value`` without its autograd graph (itself when it has none: a count, a value computed without grad)."""
    return value.detach() if value.requires_grad else value


#: Where a metric keeps what is queued for its :class:`DeferredState` states: state name -> queued items.
_PENDING = "_pending_additions"
#: Items of one :class:`DeferredState` queue folded at once, at most (the default): a bound on a queue between reads.
_MAX_PENDING = 256


class DeferredState:
    """A tensor state whose per-batch contributions wait in a queue until the state is read, then fold in at once.

    :meth:`SaeMetric._queue` appends a batch's contribution instead of replacing the state at every step; the queue
    is folded into the state (:meth:`fold`) when the state is next read (``compute``, a sync, ``metric_state``,
    ``state_dict`` of a persistent state, a copy, a device move) or once it holds :attr:`max_pending` items. Any
    read folds the queue first, so no reader sees a stale value; any write (``reset``, a sync, ``load_state_dict``)
    replaces the state and drops the queue. The state itself lives in the instance's ``__dict__`` under its name.
    Subclasses say how a queue folds.
    """

    #: Queued items folded at once, at most: a bound on what a queue holds between reads.
    max_pending: int = _MAX_PENDING

    def __init__(self, name: str) -> None:
        self.name = name

    def fold(self, value: Tensor, queued: list[Any]) -> Tensor:
        """The state after every queued item, in order (``queued`` is never empty)."""
        raise NotImplementedError

    def fits(self, queued: list[Any], item: Any) -> bool:
        """Whether ``item`` can join the (non-empty) queue; if not, the queue is folded first."""
        return True

    def queued_item(self, queued: list[Any], item: Any) -> Any:
        """What the queue keeps of ``item`` (``item`` itself)."""
        return item

    def full(self, queued: list[Any]) -> bool:
        """Whether ``queued`` is to be folded now: once it holds :attr:`max_pending` items."""
        return len(queued) >= self.max_pending

    def __get__(self, metric: SaeMetric | None, owner: type | None = None) -> Any:
        if metric is None:
            return self
        stored = metric.__dict__
        if self.name not in stored:
            raise AttributeError(f"{type(metric).__name__} has no state {self.name!r} yet")
        value = stored[self.name]
        pending = stored.get(_PENDING, {})
        if pending.get(self.name):
            value = stored[self.name] = self.fold(value, pending[self.name])  # first: a failed fold loses nothing
            del pending[self.name]
        return value

    def __set__(self, metric: SaeMetric, value: Any) -> None:
        metric.__dict__.get(_PENDING, {}).pop(self.name, None)
        metric.__dict__[self.name] = value


class Slots:
    """Rows of one tensor made for a stretch of a queue, each with its view made once: a step writes into the next.

    A queue must not keep the small tensors its steps made: kept for many steps, they sit between the large
    temporaries that the next steps free and reuse, and on a CPU the heap grows instead (to 10 GB within 320 steps
    of the training collection at batch 4096, with glibc's heap never returned). Made outside inference mode, so that
    rows first made under ``torch.inference_mode`` can be written to after it.
    """

    __slots__ = ("rows", "views")

    def __init__(self, capacity: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
        with torch.inference_mode(False):
            self.rows = torch.empty(capacity, *shape, dtype=dtype, device=device)
            self.views = self.rows.unbind(0)

    def __len__(self) -> int:
        return len(self.views)


#: Rows of a queue's first stretch of :class:`Slots`; each later stretch has twice the rows of the one before.
_FIRST_STRETCH = 4

_Stretch = TypeVar("_Stretch", bound=Sized)


def next_row(last: tuple[_Stretch, int] | None, room: int, stretch: Callable[[int], _Stretch]) -> tuple[_Stretch, int]:
    """Where a queued item is written: a stretch of rows and a row of it.

    The row after ``last`` (the previous item's stretch and row) while its stretch has one; else row 0 of a new
    ``stretch(rows)``, of :data:`_FIRST_STRETCH` rows at first and then twice the last's, at most ``room``: a queue
    that is read often makes few rows, and one that fills makes a handful of stretches.
    """
    if last is not None and last[1] + 1 < len(last[0]):
        return last[0], last[1] + 1
    rows = _FIRST_STRETCH if last is None else 2 * len(last[0])
    return stretch(min(rows, room)), 0


class _Addition(NamedTuple):
    """A queued tensor addition of a :class:`DeferredSum`: row ``row`` of ``slots``."""

    slots: Slots
    row: int


class DeferredSum(DeferredState):
    """A state reduced by ``"sum"`` whose per-batch additions wait in a queue (see :class:`DeferredState`).

    :meth:`SaeMetric._add_to_state` queues a batch's addition, a Python int for a count (no operation per batch) or
    a batch's rows summed straight into the next row of the queue's :class:`Slots`; the queued tensors are added in
    the order they came, so the value is bitwise the one that adding each batch at once gives, whenever it is read.
    """

    def queued_item(self, queued: list[_Addition | int], item: tuple[Tensor, torch.dtype] | int) -> _Addition | int:
        if isinstance(item, int):
            return item
        rows, dtype = item
        last = queued[-1] if queued else None
        if last is not None and not isinstance(last, _Addition):  # a count between: the last tensor addition
            last = next((addition for addition in reversed(queued) if isinstance(addition, _Addition)), None)
        room = self.max_pending - len(queued)  # the queue is folded once it holds max_pending items
        slots, row = next_row(last, room, lambda size: Slots(size, rows.shape[1:], dtype, rows.device))
        torch.sum(rows, dim=0, dtype=dtype, out=slots.views[row])
        return _Addition(slots, row)

    def fold(self, value: Tensor, queued: list[_Addition | int]) -> Tensor:
        """``value`` plus every queued addition, in order (the rounding of one addition per batch), then the ints."""
        for addition in queued:
            if isinstance(addition, _Addition):
                value = value + addition.slots.views[addition.row]
        count = sum(addition for addition in queued if isinstance(addition, int))
        return value + count if count else value


@functools.cache
def _deferred_state(cls: type, name: str) -> DeferredState | None:
    """The :class:`DeferredState` that class ``cls`` declares as ``name`` (None if it is something else).

    Looked up once per class and name: every step queues into these states, and a class attribute fetch through
    ``DeferredState.__get__`` is a Python call each time. States are declared when a class is made (in its body or
    by ``__init_subclass__``), never later.
    """
    state = getattr(cls, name, None)
    return state if isinstance(state, DeferredState) else None


def _copied_queues(stored: Mapping[str, Any]) -> dict[str, list[Any]]:
    """A copy of the :class:`DeferredState` queues in a metric's ``__dict__`` (their items shared, not folded)."""
    return {name: list(queued) for name, queued in stored.get(_PENDING, {}).items()}


class _Snapshot(NamedTuple):  # a tuple: made for every member at every step, and a frozen dataclass's init is slow
    update_count: int
    computed: Any
    forward_cache: Any
    states: dict[str, Any]
    #: The :class:`DeferredState` queues and the list states of this package's metrics: each list and its length.
    lists: dict[str, tuple[list[Any], int]] | None = None
    pending: dict[str, tuple[list[Any], int]] | None = None


def _snapshot(metric: Metric) -> _Snapshot:
    """What ``_restore`` needs to undo a batch.

    This package's metrics replace their tensor states, never change them in place, so references do; their list
    states and the queues of :class:`DeferredState` states only grow by appending, so each list's length does (a copy
    would cost a step time that grows with the epoch). Any other metric's states are copied, since its update may
    change them in place.
    """
    if isinstance(metric, SaeMetric):
        stored = metric.__dict__
        states, lists = {}, {}
        for name in metric._defaults:
            value = stored[name]
            if isinstance(value, list):
                lists[name] = (value, len(value))
            else:
                states[name] = value
        queues = stored.get(_PENDING)
        pending = {name: (additions, len(additions)) for name, additions in queues.items()} if queues else {}
        return _Snapshot(metric._update_count, metric._computed, metric._forward_cache, states, lists, pending)
    states = {
        name: list(value) if isinstance(value, list) else value.clone() for name, value in metric.metric_state.items()
    }
    return _Snapshot(metric._update_count, metric._computed, metric._forward_cache, states)


def _truncated(saved: tuple[list[Any], int]) -> list[Any]:
    """The saved list, cut back to its saved length (what was appended since is dropped)."""
    values, length = saved
    del values[length:]
    return values


def _restore(metric: Metric, snapshot: _Snapshot) -> None:
    metric._update_count, metric._computed = snapshot.update_count, snapshot.computed
    metric._forward_cache = snapshot.forward_cache
    for name, value in snapshot.states.items():
        setattr(metric, name, value)
    for name, saved in (snapshot.lists or {}).items():
        setattr(metric, name, _truncated(saved))
    if snapshot.pending is not None:  # after the states: setting a DeferredState state drops its queue
        metric.__dict__[_PENDING] = {name: _truncated(saved) for name, saved in snapshot.pending.items()}


@contextmanager
def recording(metrics: Sequence[Metric]) -> Iterator[None]:
    """Record one batch into ``metrics`` as one transaction: if anything in the block raises, none of them changed."""
    snapshots = [_snapshot(metric) for metric in metrics]
    try:
        yield
    except BaseException:
        for metric, snapshot in zip(metrics, snapshots, strict=True):
            _restore(metric, snapshot)
        raise


class SaeMetric(Metric):
    """Base of every metric of this package: the member protocol, packed sync, and rejected updates that change nothing.

    - ``update(*inputs, **inputs)`` and ``forward`` take the SAE inputs by keyword (or positionally, in the order of
      the class's ``update``); a keyword that is not an SAE input raises ``TypeError``, an input that the metric does
      not read is accepted and ignored, so one ``**inputs`` dict feeds any metric.
    - ``compute()`` syncs every state by ``all_reduce`` in at most three collective calls, two without a max stage
      (see :mod:`sparse_metrics._distributed`); with a custom ``dist_sync_fn``, by two calls of that gather.
    - An ``update`` or ``forward`` that raises leaves the metric exactly as it was.
    - ``dist_sync_on_step=True`` is refused: ``forward`` returns this process's batch value.
    - ``feature_group=`` (beside torchmetrics' ``process_group=``, the data group) or ``device_mesh=`` (2-D, dims
      ``("data", "feature")``): the dictionary is sharded over features; see :mod:`sparse_metrics._sharding`.
    """

    full_state_update = False

    #: The inputs ``update`` takes positionally, in order (every SAE input is accepted by keyword).
    _positional_inputs: ClassVar[tuple[str, ...]] = ()
    #: Shared statistics of the batch this metric reads, so that a collection can take the cheapest route to them.
    _uses: ClassVar[frozenset[Hashable]] = frozenset()
    #: Whether the value has a feature axis ``[*component, d_sae]`` (and so is no scalar to log).
    per_feature: ClassVar[bool] = False
    #: Whether this metric is a loss term: a per-component value that :class:`TotalLoss` can weight and sum, through
    #: :meth:`_batch_mean` and :meth:`_epoch_mean`.
    is_loss_term: ClassVar[bool] = False
    #: Attributes caching values computed from a batch or from the states (keyed by weak references to them): a copy
    #: starts without them.
    _caches: ClassVar[tuple[str, ...]] = ()

    def __init__(self, num_components: int = 1, *, nan_strategy: str = "propagate", **kwargs: Any) -> None:
        check_nan_strategy(nan_strategy)
        sharding = resolve_sharding(kwargs, type(self).__name__)
        self.__dict__[_PENDING] = {}  # the queues of the DeferredState states, before add_state sets them
        super().__init__(**kwargs)
        self.__dict__["_feature_sharding"] = sharding
        if self.dist_sync_on_step:
            raise ValueError(
                f"`dist_sync_on_step=True` is not supported by {type(self).__name__}: its forward returns this "
                "process's batch value; compute() returns the value synced across processes."
            )
        self.num_components = num_components
        self.nan_strategy = cast(NanStrategy, nan_strategy)
        # The inputs this metric reads, as the signature torchmetrics inspects (``update`` takes ``*args, **kwargs``).
        self._update_signature = self._inputs_signature()

    @property
    def feature_sharding(self) -> FeatureSharding | None:
        """The feature group of a dictionary sharded over features (``feature_group=``/``device_mesh=``), or None.

        Per-item values summed over features (L0, L1, sparsity, Matryoshka decodes) are then summed over the shards;
        per-feature values (densities, dead masks) are this shard's slice: see :func:`sparse_metrics.gather_features`.
        """
        sharding: FeatureSharding | None = self.__dict__.get("_feature_sharding")
        return sharding

    def _move_list_states_to_cpu(self) -> None:
        """Move the list states to the CPU as torchmetrics does (``compute_on_cpu``), reading no other state.

        torchmetrics reads every state to find the lists; reading a :class:`DeferredState` would fold its queue at
        every step.
        """
        for name in self._defaults:
            rows = self.__dict__.get(name)
            if isinstance(rows, list):
                setattr(self, name, [row.to("cpu") for row in rows])

    def reset(self) -> None:
        """Reset the states to their defaults; what the :class:`DeferredState` queues hold is dropped, not folded."""
        self.__dict__.get(_PENDING, {}).clear()
        super().reset()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (``clone``, ``deepcopy``, ``copy.copy``) with every :class:`DeferredState` queue folded first.

        A queue's rows are written by the steps to come: a copy must not share them, nor carry them. The caches
        (``_caches``) stay behind: what they are keyed by is not the copy's.
        """
        for name, queued in list(self.__dict__.get(_PENDING, {}).items()):
            if queued:
                getattr(self, name)
        state: dict[str, Any] = super().__getstate__()
        return {**state, **dict.fromkeys(name for name in self._caches if name in state)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle (``clone``, ``deepcopy``, ``copy.copy``), keeping the signature of the inputs this metric reads.

        The list states (per-item rows) are copied: a shallow copy must not share them, or its updates would append
        to the original's. The queues were folded before (:meth:`__getstate__`). A cache missing from ``state``
        (pickled before the class had it) starts empty.
        """
        super().__setstate__({**dict.fromkeys(self._caches), **state})
        self.__dict__[_PENDING] = _copied_queues(state)
        for name in state.get("_defaults", {}):
            if isinstance(state.get(name), list):
                self.__dict__[name] = list(state[name])
        self._update_signature = self._inputs_signature()

    def _inputs_signature(self) -> inspect.Signature:
        return inspect.Signature(
            [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in self._positional_inputs]
        )

    # Configuration: what makes two metrics of one class compute different things.

    def _configuration(self) -> dict[str, Any]:
        """The settings that decide what the states hold (JSON-able); checkpoints and compute groups compare them."""
        return {"num_components": self.num_components}

    def _add_configuration_marker(self) -> None:
        """Add an empty state whose name carries a digest of the configuration (call once the states are added).

        torchmetrics' compute groups merge two metrics whose state names and values are equal after a first batch;
        two metrics of one class configured differently (a mean and a sum, two coefficients) can have equal states on
        a batch and would then report each other's values. Their marker names differ, so they are never merged.
        """
        settings = json.dumps([type(self).__name__, self._configuration(), self._merge_guard()], sort_keys=True)
        digest = hashlib.sha1(settings.encode(), usedforsecurity=False).hexdigest()[:12]
        self._marker_state = f"configuration_{digest}"
        self.add_state(self._marker_state, torch.zeros(0, dtype=torch.int64), dist_reduce_fx="sum")

    def persistent(self, mode: bool = False) -> None:
        """Change whether the states are saved in ``state_dict`` (the configuration marker never is)."""
        super().persistent(mode)
        if hasattr(self, "_marker_state"):
            self._persistent[self._marker_state] = False

    def _merge_guard(self) -> Any:
        """Settings that are not part of the checkpointed configuration but still forbid a compute-group merge."""
        return None

    # The protocol.

    def _make_batch(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> SaeBatch:
        """The validated batch of one ``update``/``forward`` call."""
        owner = type(self).__name__
        inputs = inputs_of(args, kwargs, self._positional_inputs, owner)
        return SaeBatch(
            inputs,
            num_components=self.num_components,
            owner=owner,
            uses=self._batch_uses(),
            sharding=self.feature_sharding,
        )

    def _batch_uses(self) -> frozenset[Hashable]:
        """The shared statistics this metric reads (see :class:`~sparse_metrics._batch.SaeBatch`)."""
        return self._uses

    @abstractmethod
    def _contribution(self, batch: SaeBatch) -> Any:
        """Validate what this metric reads of ``batch`` and return what it adds to the state."""

    def _finite_items(self, batch: SaeBatch, contribution: Any) -> Tensor | None:
        """``[batch]`` booleans: the items whose contribution is finite; None if this metric screens nothing."""
        return None

    @abstractmethod
    def _record(self, contribution: Any) -> None:
        """Add a contribution to the state (out of place, with no autograd graph)."""

    @abstractmethod
    def _value(self, contribution: Any) -> Tensor:
        """The value of the batch alone (after :meth:`_record`), as ``forward`` returns it."""

    def _forward_value(self, contribution: Any, batch_means: dict[int, Tensor]) -> Tensor:
        """The batch value in a collection's ``forward``: :meth:`_value`, sharing work through ``batch_means``.

        ``batch_means`` maps ``id(term)`` to a loss term's :meth:`_batch_mean` on this batch (0-d for one component),
        for the members computed so far: a term whose value is that mean stores it there, and :class:`TotalLoss`
        reads it instead of computing (and differentiating) the same mean again.
        """
        return self._value(contribution)

    def _reads(self) -> tuple[SaeMetric, ...]:
        """The other members whose contributions and states this one reads (its loss terms, its source)."""
        return ()

    # What TotalLoss reads of a loss term (``is_loss_term``): per-component values, whatever ``keep_batch_dim``.

    def _batch_mean(self, contribution: Any) -> Tensor:
        """The term's value on the batch alone, ``[component]``, differentiable (the batch mean for a per-item term)."""
        raise TypeError(f"{type(self).__name__} is not a loss term.")

    def _epoch_mean(self) -> Tensor:
        """The term's value over every item accumulated (or synced), ``[component]``."""
        raise TypeError(f"{type(self).__name__} is not a loss term.")

    def _check_not_synced(self) -> None:
        if self._is_synced:
            raise TorchMetricsUserError(
                f"{type(self).__name__} is synced: call `unsync()` before `forward`, or its batch would be lost when "
                "the local state is restored."
            )

    def _record_counted(self, contribution: Any) -> None:
        """Record a batch and count it as torchmetrics counts an update (``forward`` and collections).

        Called under ``torch.no_grad()`` (entered once by the caller, for every member it records): no autograd graph
        is built, so ``_record`` needs no ``detach`` of its own.
        """
        self._record(contribution)
        if self.compute_on_cpu:
            self._move_list_states_to_cpu()
        _set_plain(self, _update_count=self._update_count + 1, _computed=None)

    def _add_to_state(self, name: str, addition: Tensor | int) -> None:
        """Add to a :class:`DeferredSum` state: ``addition`` summed over its first axis (a batch's rows), or an int.

        The rows are summed now, in the state's dtype and with no autograd graph, into the state's queue.
        """
        if not isinstance(_deferred_state(type(self), name), DeferredSum):
            raise TypeError(f"{type(self).__name__}.{name} is not a DeferredSum state: its additions would be lost.")
        if isinstance(addition, Tensor):
            recorded = addition.requires_grad and torch.is_grad_enabled()
            rows = addition.detach() if recorded else addition  # an out= sum records no graph
            self._queue(name, (rows, self.__dict__[name].dtype))
        else:
            self._queue(name, addition)

    def _queue(self, name: str, item: Any) -> None:
        """Queue ``item`` for :class:`DeferredState` state ``name``, folding the queue once it is full."""
        state = _deferred_state(type(self), name)
        if state is None:
            raise TypeError(f"{type(self).__name__}.{name} is not a DeferredState: what is queued would be lost.")
        queues = self.__dict__.setdefault(_PENDING, {})
        pending = queues.setdefault(name, [])
        if pending and not state.fits(pending, item):
            getattr(self, name)  # fold what is queued first
            pending = queues.setdefault(name, [])
        pending.append(state.queued_item(pending, item))
        if state.full(pending):
            getattr(self, name)  # fold the queue into the state

    def _filter_kwargs(self, **kwargs: Any) -> dict[str, Any]:
        """The SAE inputs among ``kwargs`` (a ``torchmetrics.MetricCollection`` routes its inputs through this)."""
        return {name: value for name, value in kwargs.items() if name in SAE_INPUTS}

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Accumulate a batch (see the class for the inputs), building no autograd graph."""
        with torch.no_grad():
            batch = self._make_batch(args, kwargs)
            (contribution,) = batch_contributions([self], batch, self.nan_strategy, type(self).__name__)
        self._record(contribution)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Accumulate a batch and return its own value, differentiable with respect to the inputs.

        Unlike torchmetrics' default, the batch is computed once and feeds both the state and the returned value; the
        global state is neither copied nor reset.
        """
        self._check_not_synced()
        batch = self._make_batch(args, kwargs)
        (contribution,) = batch_contributions([self], batch, self.nan_strategy, type(self).__name__)
        with recording([self]), torch.no_grad():
            self._record_counted(contribution)
        value = self._value(contribution)
        # Detached: the cache outlives the step, and must not keep its autograd graph alive.
        _set_plain(self, _forward_cache=_detached(value))
        return value

    def _wrap_update(self, update: Callable[..., None]) -> Callable[..., None]:
        """Make a rejected ``update`` leave the metric exactly as it was.

        torchmetrics' wrapper counts the call and drops the cached ``compute`` result before ``update`` runs; those,
        and the states, are restored if it raises.
        """
        wrapped = super()._wrap_update(update)

        @functools.wraps(update)
        def update_or_restore(*args: Any, **kwargs: Any) -> None:
            with recording([self]):
                wrapped(*args, **kwargs)

        return update_or_restore

    @property
    def _value_has_axis(self) -> bool:
        """Whether the value keeps an axis (items, features) even when that axis has one element."""
        return self.per_feature

    def _wrap_compute(self, compute: Callable[..., Any]) -> Callable[..., Any]:
        """The ``compute`` of torchmetrics, with two changes.

        - Under ``torch.distributed`` the cached result is never returned: a process with no new batch would return
          it without joining the collective that the others, with new batches, enter (they would wait for it until
          the timeout), and its value would be stale. Every process joins every ``compute()``.
        - The item or feature axis of a one-element value is kept: torchmetrics squeezes every such result to 0-d.
        """
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def compute_keeping_axis(*args: Any, **kwargs: Any) -> Any:
            if self._to_sync and self.distributed_available_fn():
                self._computed = None
            value = wrapped(*args, **kwargs)
            if self._value_has_axis and isinstance(value, Tensor) and value.ndim == 0:
                return value.reshape(1)  # one item (or feature) of a one-component metric, as forward returns it
            return value

        return compute_keeping_axis

    def _sync_dist(self, dist_sync_fn: Any = gather_all_tensors, process_group: Any | None = None) -> None:
        """Sync every state in at most three collective calls (see :mod:`sparse_metrics._distributed`).

        If a collective fails halfway, the local states are put back before the error propagates.
        """
        local = {name: getattr(self, name) for name in self._defaults}
        try:
            sync_states([self], process_group or self.process_group, gather=dist_sync_fn)
        except BaseException:
            for name, value in local.items():
                setattr(self, name, value)
            raise

    def _apply(self, fn: Callable[..., Any], exclude_state: Sequence[str] = ()) -> Module:
        """Move the states and buffers with the metric, but never change their dtypes.

        torchmetrics casts states on ``.to(dtype)`` (e.g. a parent model's ``.to(torch.bfloat16)``) and
        ``set_dtype``: float64 sums and int64 counts would become half-precision floats, losing precision and
        counts for good; buffers (a sparsity coefficient, prefix weights) would be rounded. They follow the
        metric's device only; float64 ones become float32 on a device without float64 (MPS).
        """
        own = [name for name in self._defaults if name not in exclude_state]
        target = fn(torch.zeros((), device=self.device)).device
        without_float64 = not supports_float64(target)
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

    def _check_device(self, batch: SaeBatch) -> None:
        """Refuse inputs on another device than the states (torchmetrics would move the states silently or fail)."""
        device = batch.device
        if device is not None and device != self.device:
            raise ValueError(
                f"{type(self).__name__}: the inputs are on {device} but the metric's states are on {self.device}; "
                f"move the metric there first (`metric.to({str(device)!r})`)."
            )

    def _empty_list_state(self, name: str) -> Tensor:
        """An empty tensor with the dtype, device and trailing shape of the rows of list state ``name``."""
        raise NotImplementedError(f"{type(self).__name__} has list state `{name}`: implement `_empty_list_state`.")

    # Checkpoints: the configuration travels in the extra state, and everything is checked before anything loads.

    def get_extra_state(self) -> dict[str, Any]:
        """What a checkpoint must match to load: the class, its configuration, and whose items the states hold."""
        distributed = dist.is_available() and dist.is_initialized()
        return {
            "class": type(self).__name__,
            "configuration": self._configuration(),
            "world_size": dist.get_world_size(self.process_group) if distributed else 1,
            "rank": dist.get_rank(self.process_group) if distributed else 0,
            "synced": self._is_synced,
        }

    def set_extra_state(self, state: Any) -> None:
        """Nothing to restore: :meth:`check_state_dict` compared the saved extra state before loading."""

    def check_state_dict(self, state_dict: Mapping[str, Any], prefix: str = "", strict: bool = True) -> None:
        """Raise ``ValueError`` if ``state_dict`` cannot load into this metric exactly; load nothing.

        Refused: a checkpoint of another class or configuration (``num_components``, prefix sizes and weights,
        ``feature_reduction``, ``keep_batch_dim``, ...), states of another shape, a floating state for an integer
        counter, with ``strict`` a state that is missing, and one process's share of a run on other processes (rank
        1's items would be lost when resuming on one process; save the synced states for that, see the robustness
        guide).
        """
        owner = type(self).__name__
        where = prefix.rstrip(".") or owner
        present = [name for name in self._defaults if prefix + name in state_dict]
        for name in present:
            self._check_saved_state(name, state_dict[prefix + name], prefix + name)
        if strict:
            missing = [prefix + name for name in self._defaults if self._persistent[name] and name not in present]
            if missing:
                raise ValueError(f"Cannot load `{where}` into {owner}: the checkpoint has no state {missing} (strict).")
        saved_extra = state_dict.get(prefix + "_extra_state")
        if saved_extra is None:
            return
        wanted = {"class": owner, "configuration": self._configuration()}
        saved = {key: saved_extra.get(key) for key in wanted}
        if saved != json.loads(json.dumps(wanted)):
            raise ValueError(
                f"Cannot load `{where}` into {owner}: the checkpoint comes from {saved['class']} configured "
                f"{saved['configuration']}, this metric is configured {wanted['configuration']}."
            )
        if present:
            self._check_processes(saved_extra, where)

    def _check_processes(self, saved: Mapping[str, Any], where: str) -> None:
        here = self.get_extra_state()
        if saved.get("synced"):
            if here["world_size"] > 1:
                raise ValueError(
                    f"Cannot load `{where}` on {here['world_size']} processes: the checkpoint holds the synced states "
                    "of every process, which every process would count again. Load it into one process."
                )
            return
        if saved.get("world_size", 1) == here["world_size"] and saved.get("rank", 0) != here["rank"]:
            # Lightning saves rank 0's checkpoint and loads it on every rank: each rank resumes with rank 0's items.
            warnings.warn(
                f"`{where}`: this process ({here['rank']} of {here['world_size']}) loads the states of process "
                f"{saved.get('rank')}; its epoch values count that process's items again and none of its own. Save "
                "each rank's state, or reset() the metrics after loading.",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        if saved.get("world_size", 1) != here["world_size"]:
            raise ValueError(
                f"Cannot load `{where}`: the checkpoint holds the states of process {saved.get('rank')} of "
                f"{saved.get('world_size')}, this is process {here['rank']} of {here['world_size']}; the other "
                "processes' items would be lost or counted twice. To resume on another number of processes, save "
                "the synced states (`metric.sync()`, `state_dict()`, `metric.unsync()`) and load them into one process."
            )

    def _check_saved_state(self, name: str, saved: Any, key: str) -> None:
        default = self._defaults[name]
        like = default if isinstance(default, Tensor) else self._empty_list_state(name)
        rows = saved if isinstance(saved, list) else [saved]
        if isinstance(default, Tensor) != isinstance(saved, Tensor) or not all(isinstance(r, Tensor) for r in rows):
            raise ValueError(f"Cannot load state `{key}` into {type(self).__name__}: got a {type(saved).__name__}.")
        for row in rows:
            shape = list(row.shape) if isinstance(default, Tensor) else ["*", *row.shape[1:]]
            expected = list(like.shape) if isinstance(default, Tensor) else ["*", *like.shape[1:]]
            if shape != expected:
                raise ValueError(
                    f"Cannot load state `{key}` into {type(self).__name__}: expected shape {expected}, got {shape}. "
                    "The checkpoint comes from a metric configured differently (num_components, prefix_sizes, ...)."
                )
            if row.is_floating_point() and not like.is_floating_point():
                raise ValueError(
                    f"Cannot load state `{key}` into {type(self).__name__}: an exact {like.dtype} count was saved as "
                    f"{row.dtype}."
                )

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a checkpoint after :meth:`check_state_dict` has accepted all of it (with ``strict``)."""
        self.check_state_dict(state_dict, "", strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

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
        """Check the whole checkpoint first; then load the states in this metric's dtypes and on its device.

        torchmetrics assigns saved states as they are: a half-precision copy would stay half-precision, a checkpoint of
        another configuration with the same shapes would load silently, and a missing state would go unnoticed.
        """
        # torch passes strict=True to every module here and applies the caller's `strict` only at the end:
        # load_state_dict (below) checks strictly first; missing states are reported as torch reports keys.
        self.check_state_dict(state_dict, prefix, strict=False)
        for name, default in self._defaults.items():
            saved = state_dict.pop(prefix + name, None)
            if saved is None:
                if self._persistent[name]:
                    missing_keys.append(prefix + name)
                continue
            like = default if isinstance(default, Tensor) else self._empty_list_state(name)
            convert = functools.partial(Tensor.to, device=self.device, dtype=like.dtype)
            setattr(self, name, convert(saved) if isinstance(saved, Tensor) else [convert(row) for row in saved])
        self._computed = None  # computed from the states before they were replaced
        self._forward_cache = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # A checkpoint written before metrics saved their configuration has no extra state: not a missing key.
        if prefix + "_extra_state" in missing_keys:
            missing_keys.remove(prefix + "_extra_state")

    def _synced(self) -> Any:
        """A block in which the states are synced across processes (as in ``compute``), unless they are already."""
        return self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        )

    def _squeeze(self, value: Tensor) -> Tensor:
        """Drop the component axis ``[component, ...]`` of a single-component metric's value."""
        return value.squeeze(0) if self.num_components == 1 else value

    # Outputs a collection reports beside this metric's own value (see DerivedOutput).

    def _derived_outputs(self) -> dict[str, bool | None]:
        """Names of the values derived from this metric's state, each with its ``higher_is_better``."""
        return {}

    def _derived_value(self, name: str, contribution: Any) -> Tensor:
        """Batch value of derived output ``name``."""
        raise KeyError(name)

    def _derived_compute(self, name: str) -> Tensor:
        """Epoch value of derived output ``name`` (synced)."""
        raise KeyError(name)

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


class ItemMeanMetric(SaeMetric):
    """A metric whose value is, per component, the mean over every item seen of a per-item value.

    Subclasses supply ``_per_item(batch)`` (per-item values ``[batch, component]``, or ``[batch, component, k]``
    reduced by ``_item_values``, through the functional core). This class owns the state:

    - ``<prefix>_sum``: ``[component]`` float64 sum of the per-item values, reduced by ``"sum"``;
    - ``<prefix>_count``: int64 number of items, reduced by ``"sum"``;
    - ``<prefix>_per_item``: list of detached ``[batch, component]`` float64 rows, reduced by ``"cat"``, filled only
      with ``keep_batch_dim=True``.

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

    is_differentiable = True
    higher_is_better = False
    is_loss_term = True
    plot_lower_bound = 0.0

    #: Prefix of this class's state names.
    _state_prefix: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Make the sum and the count of a class that names its state prefix :class:`DeferredSum` states."""
        super().__init_subclass__(**kwargs)
        prefix = cls.__dict__.get("_state_prefix")
        if prefix is not None:
            for name in (f"{prefix}_sum", f"{prefix}_count"):
                setattr(cls, name, DeferredSum(name))

    def __init__(self, num_components: int = 1, *, keep_batch_dim: bool = False, **kwargs: Any) -> None:
        super().__init__(num_components, **kwargs)
        self._keep_batch_dim = keep_batch_dim
        self._sum_state = f"{self._state_prefix}_sum"
        self._count_state = f"{self._state_prefix}_count"
        self._per_item_state = f"{self._state_prefix}_per_item"
        self.add_state(self._sum_state, torch.zeros(num_components, dtype=ACCUMULATOR_DTYPE), dist_reduce_fx="sum")
        self.add_state(self._count_state, torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state(self._per_item_state, [], dist_reduce_fx="cat")

    def _configuration(self) -> dict[str, Any]:
        return {**super()._configuration(), "keep_batch_dim": self._keep_batch_dim}

    @property
    def _value_has_axis(self) -> bool:
        return self._keep_batch_dim

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
    def _per_item(self, batch: SaeBatch) -> Tensor:
        """Validate what this metric reads and return its per-item values ``[batch, component, ...]``."""

    def _item_values(self, per_item: Tensor) -> Tensor:
        """The ``[batch, component]`` values averaged by this metric, from what ``_per_item`` returned."""
        return per_item

    def _contribution(self, batch: SaeBatch) -> Tensor:
        self._check_device(batch)
        return self._per_item(batch)

    def _finite_items(self, batch: SaeBatch, contribution: Tensor) -> Tensor | None:
        return contribution.detach().isfinite().flatten(1).all(dim=1)

    def _record(self, contribution: Tensor) -> None:
        if contribution.shape[0] == 0:
            return
        per_item = self._item_values(contribution)
        self._add_to_state(self._sum_state, per_item)
        self._add_to_state(self._count_state, per_item.shape[0])
        if self._keep_batch_dim:
            dtype = self.__dict__[self._sum_state].dtype
            getattr(self, self._per_item_state).append(_detached(per_item).to(dtype))

    def _value(self, contribution: Tensor) -> Tensor:
        """The batch's value: the mean of its per-item values, or themselves with ``keep_batch_dim``.

        The component axis is dropped for a single-component metric.
        """
        values = self._item_values(contribution)
        if not self._keep_batch_dim:
            values = values.mean(dim=0)
        return values.squeeze(-1) if self.num_components == 1 else values

    def _batch_mean(self, contribution: Tensor) -> Tensor:
        """Batch mean ``[component]`` of the per-item values (differentiable)."""
        return self._item_values(contribution).mean(dim=0)

    def _forward_value(self, contribution: Tensor, batch_means: dict[int, Tensor]) -> Tensor:
        """The batch mean, computed once for this value and the collection's total loss (see the base class)."""
        cls = type(self)
        if self._keep_batch_dim or cls._value is not ItemMeanMetric._value or cls._batch_mean is not _ITEM_MEAN:
            return self._value(contribution)
        if self.num_components == 1:  # the 0-d mean at once: the same value as the squeezed [1] mean, fewer ops
            mean = batch_means[id(self)] = self._item_values(contribution).mean()
            return mean
        mean = batch_means[id(self)] = self._batch_mean(contribution)
        return mean

    def _epoch_mean(self) -> Tensor:
        """Mean ``[component]`` over every item accumulated (or synced)."""
        return self._tensor_state(self._sum_state) / self._tensor_state(self._count_state)

    def _tensor_state(self, name: str) -> Tensor:
        value: Tensor = getattr(self, name)
        return value

    def compute(self) -> Tensor:
        """Mean over every item seen (synced across processes), or the per-item values with ``keep_batch_dim``.

        Returns ``[component]``, a 0-d tensor for one component, float64. With no item seen the mean is NaN.
        """
        if self._keep_batch_dim:
            rows = getattr(self, self._per_item_state)
            values = dim_zero_cat(rows) if rows else self._empty_list_state(self._per_item_state)
            return values.squeeze(-1) if self.num_components == 1 else values
        return self._epoch_mean()

    def _empty_list_state(self, name: str) -> Tensor:
        """An empty ``[0, component]`` tensor: the rows of a rank that kept no per-item values."""
        dtype = self._tensor_state(self._sum_state).dtype  # float64, or float32 on a device without float64
        return torch.zeros(0, self.num_components, dtype=dtype, device=self.device)


_ITEM_MEAN = ItemMeanMetric._batch_mean


class DerivedOutput(SaeMetric):
    """A value derived from another member's state, as a metric of its own (``explained_variance`` from ``fvu``, say).

    A member of a collection that also holds (and updates) its source: alone, it records nothing.

    A collection adds one for each output its members derive, so that every key it reports is a metric: Lightning's
    ``log_dict``, nesting in a ``MetricCollection`` and ``MetricTracker`` see every key. It keeps no state: its batch
    value is read from the source's contribution, its epoch value from the source's (synced) state. The source is
    the collection's member, not a child module of this one.
    """

    def __init__(self, source: SaeMetric, name: str, **kwargs: Any) -> None:
        outputs = source._derived_outputs()
        if name not in outputs:
            raise ValueError(f"{type(source).__name__} derives no output {name!r}; it derives {sorted(outputs)}.")
        super().__init__(source.num_components, **{"nan_strategy": source.nan_strategy, **kwargs})
        self.__dict__["_source"] = source  # a plain attribute: the source stays the collection's child only
        self.output_name = name
        self._higher_is_better = outputs[name]

    # Class attributes in torchmetrics; here they depend on the output and the source.
    @property
    def higher_is_better(self) -> bool | None:  # type: ignore[override]
        """Whether a higher value is better, as the source says for this output."""
        return self._higher_is_better

    @property
    def is_differentiable(self) -> bool:  # type: ignore[override]
        """Whether the batch value is differentiable: as the source's."""
        return bool(self.source.is_differentiable)

    def _reads(self) -> tuple[SaeMetric, ...]:
        return (self.source,)

    @property
    def source(self) -> SaeMetric:
        """The metric whose state this output is derived from."""
        source: SaeMetric = self.__dict__["_source"]
        return source

    def _make_batch(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> SaeBatch:
        return self.source._make_batch(args, kwargs)

    def _batch_uses(self) -> frozenset[Hashable]:
        return self.source._batch_uses()

    def _contribution(self, batch: SaeBatch) -> Any:
        return batch.contribution(self.source)

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to accumulate: the source records the batch (only the keywords are checked)."""
        owner = type(self).__name__
        check_input_names(inputs_of(args, kwargs, self.source._positional_inputs, owner), owner)

    def _record(self, contribution: Any) -> None:
        """Nothing: the source records the batch."""

    def _value(self, contribution: Any) -> Tensor:
        return self.source._derived_value(self.output_name, contribution)

    def compute(self) -> Tensor:
        """The derived value of the source's epoch state."""
        return self.source._derived_compute(self.output_name)

    def extra_repr(self) -> str:
        """Show the source and the output in ``repr``."""
        return f"{type(self.source).__name__}, {self.output_name!r}"
