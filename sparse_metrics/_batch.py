"""One step's inputs, validated once, and every statistic the metrics share, computed at most once.

Every metric, alone or in a collection, reads its inputs through a :class:`SaeBatch`: the batch checks the keyword
names, the shapes and the devices of whatever it is given, holds ``[batch, component, ...]`` views of the inputs and
memoises each shared statistic (the per-item squared error, the L1, the activity mask, the decoder row norms, each
member's contribution) the first time a metric asks for it. A collection builds one batch per step, so a statistic
that several members need is computed once; a metric used alone builds its own.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from sparse_metrics._compile import CompiledWithFallback
from sparse_metrics._sharding import FeatureSharding
from sparse_metrics._validation import (
    check_batch_shapes,
    check_decoder,
    check_floating,
    check_same_shape,
    component_shape,
    computation_dtype,
    infer_d_model,
)
from sparse_metrics.functional import _activity_kernel as activity_kernel
from sparse_metrics.functional._statistics import _sae_loss_statistics, _sae_training_statistics
from sparse_metrics.functional.feature_density import FeatureActivity, _active_mask, _feature_activity
from sparse_metrics.functional.l0_norm import _count_active
from sparse_metrics.functional.l1_absolute import _absolute_sum
from sparse_metrics.functional.l2_reconstruction import _squared_error_sum
from sparse_metrics.functional.reconstruction_quality import _inner_product, _item_norm
from sparse_metrics.functional.sparsity import _decoder_row_norms, _weighted_l1

if TYPE_CHECKING:
    from sparse_metrics.metrics._base import SaeMetric

__all__ = [
    "BATCHED_INPUTS",
    "FEATURE_INPUTS",
    "FEATURE_SUMS",
    "RECONSTRUCTIONS",
    "SAE_INPUTS",
    "SHARDED_INPUTS",
    "FeatureSum",
    "SaeBatch",
    "check_input_names",
    "inputs_of",
]

#: The keyword names of every input a metric of this package reads; any metric accepts all of them, so that one call
#: (or one ``**inputs`` dict) feeds any metric or collection.
SAE_INPUTS = (
    "source_activations",
    "learned_activations",
    "decoded_activations",
    "decoder_weight",
    "decoder_bias",
    "pre_activations",
    "threshold",
    "dead_mask",
    "multi_topk_decoded_activations",
)
#: The inputs with a batch axis ``[batch, *component, width]``: ``nan_strategy="ignore"`` selects their rows.
BATCHED_INPUTS = (
    "source_activations",
    "learned_activations",
    "decoded_activations",
    "pre_activations",
    "multi_topk_decoded_activations",
)
#: The reconstructions of ``source_activations``: the SAE's, and a second one (sparsify's multi-TopK decode of the
#: top ``4k`` latents) that a reconstruction metric can be configured to read instead.
RECONSTRUCTIONS = ("decoded_activations", "multi_topk_decoded_activations")
#: The per-feature inputs ``[*component, d_sae]`` (a JumpReLU threshold, a dead-latent mask).
FEATURE_INPUTS = ("threshold", "dead_mask")

#: The inputs that a feature-sharded SAE holds one slice of, and the axis of that slice (counted from the end).
SHARDED_INPUTS = {
    "learned_activations": -1,
    "pre_activations": -1,
    "threshold": -1,
    "dead_mask": -1,
    "decoder_weight": -2,
}

# Shared by every batch of a collection built with compiled=True; compiled at their first call.
_compiled_sae_loss_statistics = CompiledWithFallback(_sae_loss_statistics)
_compiled_sae_training_statistics = CompiledWithFallback(_sae_training_statistics)


#: ``(ACTIVITY_THRESHOLD, t)`` in a batch's ``uses``: an activity member reads the firing of threshold ``t`` (None:
#: non-zero), so that the compiled path computes it in the same compiled function as the loss statistics.
ACTIVITY_THRESHOLD = "activity_threshold"

_Value = TypeVar("_Value")


def check_input_names(names: Iterable[str], owner: str) -> None:
    """Raise ``TypeError`` for a keyword that is not an SAE input, suggesting the closest name."""
    for name in names:
        if name not in SAE_INPUTS:
            close = difflib.get_close_matches(name, SAE_INPUTS, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise TypeError(
                f"{owner} got an unexpected keyword argument `{name}`.{hint} The inputs are "
                f"{', '.join(f'`{n}`' for n in SAE_INPUTS)}."
            )


def _check_dtype(name: str, value: object) -> Tensor:
    """Check an input is a tensor of its kind: a boolean ``dead_mask``, floating point for every other input."""
    if name != "dead_mask":
        return check_floating(name, value)
    if not isinstance(value, Tensor) or value.dtype != torch.bool:
        shown = value.dtype if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(f"`dead_mask` must be a torch.bool tensor (True for a dead latent), got {shown}.")
    return value


def inputs_of(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], positional: Sequence[str], owner: str
) -> dict[str, Any]:
    """The inputs of a call by name: ``args`` named by ``positional`` in order, then ``kwargs``."""
    if len(args) > len(positional):
        raise TypeError(
            f"{owner} takes at most {len(positional)} positional inputs ({', '.join(positional) or 'none'}), got "
            f"{len(args)}; pass the others by keyword."
        )
    inputs = dict(zip(positional, args, strict=False))
    for name in kwargs:
        if name in inputs:
            raise TypeError(f"{owner} got multiple values for input `{name}`.")
    return {**inputs, **kwargs}


class SaeBatch:
    """The validated inputs of one step and the statistics shared by the metrics that read them.

    Args:
        inputs: The inputs by keyword (names from :data:`SAE_INPUTS`; ``None`` values count as absent).
        num_components: The component count the inputs must have; ``None`` accepts any.
        owner: The name to put in error messages (the metric or collection being fed).
        uses: What the members will ask for: the feature sums (names in :data:`FEATURE_SUMS`, :class:`FeatureSum`
            objects), all computed together (under a feature sharding, in one all-reduce), and
            ``(ACTIVITY_THRESHOLD, t)`` for each firing threshold an activity member reads.
        compiled: Compute the per-item squared error, L0 and L1 together in one compiled function, with the
            activity statistics of the thresholds in ``uses``.
        sharding: The feature sharding of the dictionary, or None.
    """

    def __init__(
        self,
        inputs: Mapping[str, object],
        *,
        num_components: int | None,
        owner: str,
        uses: frozenset[Hashable] = frozenset(),
        compiled: bool = False,
        sharding: FeatureSharding | None = None,
    ) -> None:
        check_input_names(inputs, owner)
        self.owner = owner
        self.uses = uses
        self.compiled = compiled
        self.sharding = sharding
        self._given = {
            name: _check_dtype(name, _local_of(name, value, sharding, owner))
            for name, value in inputs.items()
            if value is not None
        }
        # The inputs as the metrics read them: batched inputs as [batch, component, ...], made on first use from a
        # [batch, d] input of one component (a view is an operation dispatched); per-feature ones [component, ...].
        self._views: dict[str, Tensor] = {}
        self._shapes: dict[str, torch.Size] = {}  # of every batched input's [batch, component, ...] view
        self._memo: dict[Hashable, Any] = {}
        self._validate(num_components)

    def _validate(self, num_components: int | None) -> None:
        given, shapes = self._given, self._shapes
        reference_name: str | None = None
        for name in BATCHED_INPUTS:
            if name not in given:
                continue
            if reference_name is not None and name in RECONSTRUCTIONS and "source_activations" in given:
                check_same_shape(name, given[name], "source_activations", given["source_activations"])
            if name == "pre_activations" and "learned_activations" in given:
                check_same_shape(name, given[name], "learned_activations", given["learned_activations"])
            _, shape = component_shape(name, given[name], num_components)
            if reference_name is not None:
                check_batch_shapes(name, shape, reference_name, shapes[reference_name])
            else:
                reference_name = name
            num_components = shape[1]
            shapes[name] = shape
        self.num_components = num_components
        self.has_component_axis = reference_name is not None and given[reference_name].ndim == 3
        if "decoder_weight" in given:
            self._validate_decoder()
        for name in FEATURE_INPUTS:
            if name in given:
                self._validate_feature_input(name)
        self._check_devices()
        if self.sharding is not None:
            self._check_shards()

    def _check_shards(self) -> None:
        """Under sharding, check once per shape that every feature shard holds the same items and as many features."""
        assert self.sharding is not None
        learned = self._shapes.get("pre_activations", self._shapes.get("learned_activations"))
        if learned is None:
            return
        self.sharding.check_shapes(
            self.owner, [*learned[:2], learned[-1]], ["batch", "num_components", "d_sae (local)"]
        )

    def _validate_decoder(self) -> None:
        given, views, shapes = self._given, self._views, self._shapes
        # The pre-activations have the activations' shape: either gives d_sae (AuxK and the pre-activation loss read
        # the decoder without f).
        learned = shapes.get("learned_activations", shapes.get("pre_activations"))
        model_input = shapes.get("source_activations", shapes.get("decoded_activations"))
        weight = given["decoder_weight"]
        if learned is None:
            raise ValueError(
                f"{self.owner}: `decoder_weight` was given without `learned_activations` or `pre_activations`, whose "
                "last axis (d_sae) it must match."
            )
        d_sae = learned[-1]
        d_model = model_input[-1] if model_input is not None else infer_d_model(weight, d_sae)
        decoder_weight, decoder_bias = check_decoder(
            weight,
            given.get("decoder_bias"),
            num_components=learned[1],
            source_is_batched_by_component=self.has_component_axis,
            d_sae=d_sae,
            d_model=d_model,
        )
        views["decoder_weight"] = decoder_weight
        if decoder_bias is not None:
            views["decoder_bias"] = decoder_bias

    def _validate_feature_input(self, name: str) -> None:
        """Check a per-feature input is ``[*component, d_sae]``, laid out as the activations are; view it so."""
        features = self._shapes.get("pre_activations", self._shapes.get("learned_activations"))
        if features is None:
            raise ValueError(
                f"{self.owner}: `{name}` was given without `pre_activations` or `learned_activations`, whose "
                "[component, d_sae] it must match."
            )
        value = self._given[name]
        expected = [*features[1:]] if self.has_component_axis else [features[-1]]
        if list(value.shape) != expected:
            raise ValueError(
                f"`{name}` must have shape [*component, d_sae] = {expected}, laid out as the activations are, got "
                f"{list(value.shape)}."
            )
        self._views[name] = value if self.has_component_axis else value.unsqueeze(0)

    def _check_devices(self) -> None:
        devices = {name: tensor.device for name, tensor in self._given.items() if isinstance(tensor, Tensor)}
        if len(set(devices.values())) > 1:
            shown = ", ".join(f"`{name}` on {device}" for name, device in devices.items())
            raise ValueError(f"{self.owner}: the inputs must be on one device, got {shown}.")
        self._device = next(iter(devices.values()), None)

    # The inputs.

    @property
    def device(self) -> torch.device | None:
        """The device of the inputs (None when none was given)."""
        return self._device

    @property
    def batch_size(self) -> int:
        """Number of items."""
        for name in BATCHED_INPUTS:
            if name in self._shapes:
                return int(self._shapes[name][0])
        return 0

    @property
    def names(self) -> list[str]:
        """The names of the inputs given, in the order they were passed."""
        return list(self._given)

    def get(self, name: str) -> Tensor | None:
        """The ``[batch, component, ...]`` view of input ``name`` (``[component, ...]`` for the decoder), or None."""
        view = self._views.get(name)
        if view is None and name in self._shapes:
            given = self._given[name]
            view = self._views[name] = given.unsqueeze(1) if given.ndim == 2 else given
        return view

    def rows(self, name: str, owner: str) -> Tensor:
        """Batched input ``name`` as given: ``[batch, component, d]``, or ``[batch, d]`` for one component.

        For the per-item statistics that reduce the last axis and keep it for a 2-D input (``keepdim``): either
        gives the ``[batch, component]`` result, and a 2-D input needs no view (nor a backward through one).
        """
        if name not in BATCHED_INPUTS:
            raise KeyError(f"`{name}` is not a batched input")
        self.check_given(name, owner)
        return self._given[name]

    def shape(self, name: str) -> list[int]:
        """The shape of input ``name`` as it was passed, for error messages."""
        return list(self._given[name].shape)

    def require(self, name: str, owner: str, why: str = "") -> Tensor:
        """The view of input ``name``; a ``TypeError`` naming ``owner`` if it was not given."""
        self.check_given(name, owner, why)
        view = self.get(name)
        if view is None:  # given but not validated (a decoder bias without its weight): not usable
            raise TypeError(f"{owner} needs the input `{name}` with the inputs it is checked against.")
        return view

    def check_given(self, name: str, owner: str, why: str = "") -> None:
        """:meth:`require` without the view: a ``TypeError`` naming ``owner`` if input ``name`` was not given."""
        if name not in self._given:
            reason = f" {why}" if why else ""
            raise TypeError(f"{owner} needs the input `{name}`, which was not given.{reason}")

    def require_width(self, name: str, width: int, setting: str, owner: str) -> Tensor:
        """The view of input ``name``, whose last axis must have the configured ``width`` (``setting``'s value)."""
        view = self.require(name, owner)
        if view.shape[-1] != width:
            raise ValueError(f"`{name}` must have {setting}={width} in its last axis, got shape {self.shape(name)}.")
        return view

    def select(self, items: Tensor) -> SaeBatch:
        """The batch of the items where the ``[batch]`` mask ``items`` is True (nan_strategy="ignore")."""
        rows = {name: value[items] if name in BATCHED_INPUTS else value for name, value in self._given.items()}
        return SaeBatch(
            rows,
            num_components=self.num_components,
            owner=self.owner,
            uses=self.uses,
            compiled=self.compiled,
            sharding=self.sharding,
        )

    # Shared statistics, each computed at most once.

    def memo(self, key: Hashable, compute: Callable[[], _Value]) -> _Value:
        """``compute()`` the first time ``key`` is asked for; the same object after."""
        if key not in self._memo:
            self._memo[key] = compute()
        value: _Value = self._memo[key]
        return value

    def contribution(self, member: SaeMetric) -> Any:
        """``member``'s contribution to this batch (what it records and reports), computed once."""
        return self.memo(("contribution", id(member)), lambda: member._contribution(self))

    def finite_items(self, name: str, owner: str) -> Tensor:
        """``[batch]`` booleans: the items whose values of input ``name`` are all finite (computed once)."""
        values = self.require(name, owner)
        return self.memo(("finite", name), lambda: values.detach().isfinite().flatten(1).all(dim=1))

    def squared_error(self, owner: str, reconstruction: str = "decoded_activations") -> Tensor:
        """Per-item squared error summed over ``d_model``, ``[batch, component]``, differentiable, float32/64.

        Of ``decoded_activations``, or of another of the :data:`RECONSTRUCTIONS`.
        """
        decoded = self.rows(reconstruction, owner)
        source = self.rows("source_activations", owner)
        if reconstruction != "decoded_activations":
            return self.memo(("squared_error", reconstruction), lambda: _squared_error_sum(decoded, source))
        self._compiled_loss_statistics(owner)
        return self.memo("squared_error", lambda: _squared_error_sum(decoded, source))

    def item_norm(self, name: str, owner: str) -> Tensor:
        """Per-item L2 norm of input ``name`` (the source or the reconstruction), ``[batch, component]``, float32/64.

        Differentiable, with gradient 0 at a zero vector (as ``torch.norm``).
        """
        values = self.require(name, owner)
        return self.memo(("item_norm", name), lambda: _item_norm(values))

    def inner_product(self, owner: str) -> Tensor:
        """Per-item ``<source, decoded>`` over ``d_model``, ``[batch, component]``, differentiable, float32/64."""
        decoded = self.require("decoded_activations", owner)
        source = self.require("source_activations", owner)
        return self.memo("inner_product", lambda: _inner_product(decoded, source))

    def l0(self, owner: str) -> Tensor:
        """Per-item number of non-zero features, ``[batch, component]`` (float32/64, no graph)."""
        self.check_given("learned_activations", owner)
        self._compiled_loss_statistics(owner)
        return self.sum_over_features("l0", owner)

    def l1(self, owner: str) -> Tensor:
        """Per-item sum of ``|f|``, ``[batch, component]``, differentiable, float32/64."""
        self.check_given("learned_activations", owner)
        self._compiled_loss_statistics(owner)
        return self.sum_over_features("l1", owner)

    def weighted_l1(self, owner: str, why: str = "") -> Tensor:
        """Per-item sum of ``|f_i|`` times decoder row ``i``'s L2 norm, ``[batch, component]``, differentiable."""
        self.decoder_row_norms(owner, why)
        return self.sum_over_features("weighted_l1", owner)

    def sum_over_features(self, key: str | FeatureSum, owner: str) -> Tensor:
        """A statistic that sums over the dictionary's features, over the WHOLE dictionary, computed once.

        ``key`` is a :class:`FeatureSum` (or the name of one in :data:`FEATURE_SUMS`), which computes the statistic
        over the features this process holds. Unsharded, that is the value. Under a feature sharding the shards'
        partial values are summed over the feature group, differentiably (each shard gets the unsharded gradient of
        its slice): the first statistic asked for also computes every other one this batch's members will ask for
        (the feature sums in ``uses``), and all of them cross in one all-reduce.
        """
        if key in self._memo:
            return self._memo[key]  # type: ignore[no-any-return]
        if self.sharding is None:
            return self.memo(key, lambda: _feature_sum(key).partial(self, owner))
        partials: dict[Hashable, Tensor] = {key: _feature_sum(key).partial(self, owner)}
        for other in sorted(_feature_sums_in(self.uses), key=_feature_sum_order):
            if other not in self._memo and other not in partials:
                partials[other] = _feature_sum(other).partial(self, owner)
        self._memo.update(self.sharding.sum(partials))
        return self._memo[key]  # type: ignore[no-any-return]

    @property
    def feature_offset(self) -> int:
        """The global index of this process's first feature (0 unsharded)."""
        learned = self._shapes.get("pre_activations", self._shapes.get("learned_activations"))
        if self.sharding is None or learned is None:
            return 0
        return self.sharding.offset(learned[-1])

    @property
    def num_shards(self) -> int:
        """The number of feature shards (1 unsharded)."""
        return 1 if self.sharding is None else self.sharding.size

    def _compiled_loss_statistics(self, owner: str) -> None:
        """With ``compiled``, memoise the squared error, L0 and L1 from one compiled function (one fused pass).

        The firing counts of every firing threshold the activity members use (named in ``uses``) come from it too.
        """
        if not self.compiled or "squared_error" in self._memo or self.sharding is not None:
            return
        source, learned, decoded = (
            self.require(name, owner) for name in ("source_activations", "learned_activations", "decoded_activations")
        )
        thresholds = tuple(
            sorted(
                {key[1] for key in self.uses if isinstance(key, tuple) and key[0] == ACTIVITY_THRESHOLD},
                key=lambda threshold: -1.0 if threshold is None else threshold,
            )
        )
        if thresholds:
            squared_error, l0, l1, activities = _compiled_sae_training_statistics(
                source, learned, decoded, thresholds, one_pass=activity_kernel.applies(learned)
            )
        else:
            (squared_error, l0, l1), activities = _compiled_sae_loss_statistics(source, learned, decoded), ()
        self._memo.update({"squared_error": squared_error, "l0": l0, "l1": l1})
        for threshold, (fire_count, items_since_fired) in zip(thresholds, activities, strict=True):
            key: Hashable = "activity" if threshold is None else ("activity", threshold)
            self._memo[key] = FeatureActivity(fire_count, items_since_fired, learned.shape[0])

    def active(self, owner: str, firing_threshold: float | None = None) -> Tensor:
        """Which features fire on each item, ``[batch, component, d_sae]`` bool (NaN counts as firing).

        A feature fires where it is non-zero (``firing_threshold=None``, the mask the L0 counts), or where it is
        above ``firing_threshold`` (strictly). Each threshold's mask is its own memo: members with different
        thresholds never share one.
        """
        learned = self.require("learned_activations", owner)
        key: Hashable = "active" if firing_threshold is None else ("active", firing_threshold)
        return self.memo(key, lambda: _active_mask(learned, firing_threshold))

    def activity(self, owner: str, firing_threshold: float | None = None) -> FeatureActivity:
        """Per-feature firing counts and items since the last firing, from the activity mask of that threshold."""
        key: Hashable = "activity" if firing_threshold is None else ("activity", firing_threshold)
        if key not in self._memo:
            self._compiled_loss_statistics(owner)
        return self.memo(key, lambda: _feature_activity(self.active(owner, firing_threshold)))

    def decoder_row_norms(self, owner: str, why: str = "") -> Tensor:
        """L2 norm of each feature-major decoder row, ``[component, d_sae]``, differentiable, float32/64."""
        weight = self.require("decoder_weight", owner, why)
        features = self._given.get("learned_activations", self._given.get("pre_activations"))
        if not isinstance(features, Tensor):
            features = self.require("learned_activations", owner)
        return self.memo("decoder_row_norms", lambda: _decoder_row_norms(weight, computation_dtype(features, weight)))


@dataclasses.dataclass(frozen=True)
class FeatureSum:
    """A per-item statistic that sums over the dictionary's features (L0, L1, a penalty, a partial decode).

    ``function(batch, owner, *arguments)`` computes it over the features this process holds (any shape,
    differentiable); :meth:`SaeBatch.sum_over_features` turns that into the whole dictionary's value. A member that
    reads one names it in its ``_batch_uses()``, so that under a feature sharding every feature sum of a step crosses
    the feature group in one all-reduce. ``function`` is a module-level function and ``arguments`` hashable, so that
    two members reading the same statistic share it.

    The sum crosses the shards with an identity backward: each shard's gradient flows to the inputs of its own
    partial. That is the unsharded gradient for the feature-sharded inputs (each shard's slice), so ``function``
    reads only those (``learned_activations``, ``pre_activations``, ``threshold``, ``dead_mask``, the decoder's
    rows) and no replicated input, whose gradient would need a sum over the shards.
    """

    function: Callable[..., Tensor]
    arguments: tuple[Hashable, ...] = ()

    def partial(self, batch: SaeBatch, owner: str) -> Tensor:
        """The statistic over the features this process holds."""
        return self.function(batch, owner, *self.arguments)


def _partial_l0(batch: SaeBatch, owner: str) -> Tensor:
    # Counted from f even where the activity mask exists: summing the bool mask into floats casts all of it first.
    return _count_active(batch.rows("learned_activations", owner))


def _partial_l1(batch: SaeBatch, owner: str) -> Tensor:
    return _absolute_sum(batch.rows("learned_activations", owner))


def _partial_weighted_l1(batch: SaeBatch, owner: str) -> Tensor:
    return _weighted_l1(batch.require("learned_activations", owner), batch.decoder_row_norms(owner))


#: The feature sums that the batch itself offers, by name (``batch.l0``, ``batch.l1``, ``batch.weighted_l1``); a
#: member names them in ``_batch_uses()`` by these names. Any other is a :class:`FeatureSum` of its member's module.
FEATURE_SUMS: dict[str, FeatureSum] = {
    "l0": FeatureSum(_partial_l0),
    "l1": FeatureSum(_partial_l1),
    "weighted_l1": FeatureSum(_partial_weighted_l1),
}


def _feature_sums_in(uses: Iterable[Hashable]) -> list[Hashable]:
    """The feature sums among a batch's ``uses`` (registered names and :class:`FeatureSum` objects)."""
    return [key for key in uses if isinstance(key, FeatureSum) or key in FEATURE_SUMS]


def _feature_sum(key: Hashable) -> FeatureSum:
    return key if isinstance(key, FeatureSum) else FEATURE_SUMS[key]  # type: ignore[index]


def _feature_sum_order(key: Hashable) -> str:
    """The order in which the fused all-reduce concatenates feature sums, the same on every process.

    Hashes of functions differ between processes; the function's qualified name and the arguments' ``repr`` do not.
    """
    statistic = _feature_sum(key)
    return f"{statistic.function.__module__}.{statistic.function.__qualname__}{statistic.arguments!r}"


def _local_of(name: str, value: object, sharding: FeatureSharding | None, owner: str) -> object:
    """A DTensor input as this process's local tensor, checked against the feature sharding; others as they are.

    Over the mesh dimension of the feature group, a feature input (:data:`SHARDED_INPUTS`) must be sharded on its
    feature axis and every other input replicated; over any other mesh dimension (the data dimension) an input is
    replicated, or a batched input split over its items (``Shard(0)``). Anything else (a ``Partial`` decode, a shard
    of the features over the data dimension) is refused: its local value is not what the metric must read.
    """
    if type(value) is Tensor:  # the usual input, never a DTensor (a subclass): no import to look up at each step
        return value
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard  # noqa: PLC0415
    except ImportError:  # pragma: no cover - torch without distributed
        return value
    if not isinstance(value, DTensor):
        return value
    if sharding is None:
        if all(isinstance(placement, Replicate) for placement in value.placements):
            return value.to_local()  # replicated everywhere: the local value is the whole tensor
        raise TypeError(
            f"{owner}: `{name}` is a DTensor with placements {tuple(value.placements)} but the metric has no "
            "`feature_group`/`device_mesh`: its local value would be read as the whole. Construct the metric with "
            f"`device_mesh=` (or `feature_group=`), or pass `{name}.full_tensor()`."
        )
    axis = SHARDED_INPUTS.get(name)
    mesh = value.device_mesh
    feature_ranks = sorted(dist.get_process_group_ranks(sharding.group)) if sharding.size > 1 else None
    feature_dims = [
        dim
        for dim in range(mesh.ndim)
        if mesh.size(dim) > 1 and sorted(dist.get_process_group_ranks(mesh.get_group(dim))) == feature_ranks
    ]
    for dim, placement in enumerate(value.placements):
        if mesh.size(dim) == 1 and not placement.is_partial():
            continue  # a shard of one process is the whole
        is_feature_dim = dim in feature_dims
        if is_feature_dim:
            allowed = (
                isinstance(placement, Shard) and placement.dim % value.ndim == axis % value.ndim
                if axis is not None
                else isinstance(placement, Replicate)
            )
            expected = f"Shard({axis % value.ndim})" if axis is not None else "Replicate()"
        else:
            allowed = isinstance(placement, Replicate) or (
                name in BATCHED_INPUTS and isinstance(placement, Shard) and placement.dim == 0
            )
            expected = "Replicate() or Shard(0)" if name in BATCHED_INPUTS else "Replicate()"
        if not allowed:
            where = "the feature group's" if is_feature_dim else "another (data)"
            raise ValueError(
                f"{owner}: DTensor `{name}` has placement {placement} on mesh dim {dim}, {where} dimension; it must "
                f"be {expected} there. Call `.redistribute(...)` first (or pass `.full_tensor()`)."
            )
    if axis is not None and feature_ranks is not None and not feature_dims:
        raise ValueError(
            f"{owner}: DTensor `{name}` lives on a mesh none of whose dimensions is the metric's feature group "
            f"(ranks {feature_ranks}); shard it over the mesh's 'feature' dim."
        )
    return value.to_local()
