"""The SAE training loss: every loss term as one ``MetricCollection`` that also returns a differentiable total."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from sparse_metrics._compile import CompiledWithFallback
from sparse_metrics._config import (
    ComponentReduction,
    FeatureReduction,
    NanStrategy,
    NumComponents,
    NumFeatures,
    PositiveInt,
    validate_arguments,
)
from sparse_metrics._distributed import synced_states
from sparse_metrics._validation import check_sae_inputs, computation_dtype
from sparse_metrics.functional._statistics import _sae_loss_statistics
from sparse_metrics.functional.feature_density import (
    DENSITY_EPSILON,
    FeatureActivity,
    _feature_activity,
    _l0_from_active,
    _mean_log10,
)
from sparse_metrics.functional.l1_absolute import _absolute_sum
from sparse_metrics.functional.l2_reconstruction import _l2_reconstruction_error
from sparse_metrics.metrics._base import ItemMeanMetric, PackedSyncMetric, finite_items, screen_items
from sparse_metrics.metrics.dead_features import DeadFeatures
from sparse_metrics.metrics.explained_variance import FractionOfVarianceUnexplained
from sparse_metrics.metrics.feature_density import FeatureDensity
from sparse_metrics.metrics.l0_norm import L0NormMetric
from sparse_metrics.metrics.l1_absolute import L1AbsoluteLoss
from sparse_metrics.metrics.l2_reconstruction import L2ReconstructionLoss
from sparse_metrics.metrics.matryoshka import MatryoshkaReconstructionLoss
from sparse_metrics.metrics.sparsity import SparsityLoss

__all__ = ["SparseAutoencoderLoss"]

# Shared by every collection built with compiled=True; compiled at its first call.
_compiled_sae_loss_statistics = CompiledWithFallback(_sae_loss_statistics)

#: Members whose value is a per-item mean (and may enter "loss").
_LOSS_KEYS = ("l2", "l0", "l1", "sparsity", "matryoshka")


class _Batch:
    """One validated batch: per-item values of the loss members and the statistics of the training metrics."""

    def __init__(self, per_item: dict[str, Tensor]) -> None:
        self.per_item = per_item
        self.source: Tensor | None = None
        self.squared_error: Tensor | None = None
        self.activity: FeatureActivity | None = None


class SparseAutoencoderLoss(MetricCollection):
    r"""Every SAE loss term in one collection, plus the differentiable total loss.

    Members, by key: ``"l2"`` (:class:`L2ReconstructionLoss`), ``"l0"`` (:class:`L0NormMetric`), ``"l1"``
    (:class:`L1AbsoluteLoss`), ``"sparsity"`` (:class:`SparsityLoss`) and, when ``matryoshka_prefix_sizes`` is
    given, ``"matryoshka"`` (:class:`MatryoshkaReconstructionLoss`).

    .. math:: \mathrm{loss} = \operatorname{reduce}_c \big(\mathrm{reconstruction}_c + \mathrm{sparsity}_c\big)

    where the reconstruction is the Matryoshka loss when configured, else L2, and ``reduce`` is
    ``component_reduction`` over the components.

    - ``forward(**inputs)`` accumulates the batch and returns each member's value on it, ``"loss"`` (a
      differentiable scalar) and, with Matryoshka, ``"matryoshka_prefix_<m>"`` for each prefix width ``m``.
    - ``update(**inputs)`` accumulates without building an autograd graph.
    - ``compute()`` returns the epoch values of the same keys, synced across processes.

    Training metrics, by option (none of them enters ``"loss"``):

    - ``explained_variance=True`` adds member ``"fvu"`` (:class:`FractionOfVarianceUnexplained`) and output keys
      ``"fvu"`` and ``"explained_variance"`` (``1 - fvu``), ``[*component]``. Each item's squared error is the
      L2 member's, reused (times ``d_model`` for the mean reduction).
    - ``feature_density=True`` adds member ``"feature_density"`` (:class:`FeatureDensity`) and keys
      ``"feature_density"`` (per feature, ``[*component, num_features]``) and ``"mean_log10_feature_density"``
      (``[*component]``, epsilon 1e-10).
    - ``dead_feature_window=w`` adds member ``"dead_features"`` (:class:`DeadFeatures`, window ``w`` items) and
      key ``"dead_features"``, the number of dead features ``[*component]``; its counters survive ``reset()``.

    The density and dead features both need ``num_features``. One activity mask ``f != 0`` per batch gives the
    per-item L0, the per-feature firing counts and the items since each feature fired: the ``[batch, d_sae]``
    activations are not read again for them. All members sync together in ``compute()``: one collective, two when
    some member keeps rows (``keep_batch_dim`` or the FVU, whose per-process statistics travel as rows).

    Inputs (keywords): ``source_activations``, ``learned_activations``, ``decoded_activations``, and for Matryoshka
    ``decoder_weight`` (feature-major ``[*component, d_sae, d_model]``) and optionally ``decoder_bias``. Every
    input is validated before any member's state changes, so a rejected batch leaves the collection untouched.
    Each statistic is computed once per batch: the L1 also feeds the sparsity penalty, and when the largest Matryoshka
    prefix is the whole dictionary (``d_sae``), its error is the L2 error of ``decoded_activations``, the SAE's own
    reconstruction ``f W + b`` — which the collection therefore takes to be the whole dictionary's decode.

    Args:
        sparsity_coefficient: Non-negative number or ``[component]`` tensor; change it between steps through the
            :attr:`sparsity_coefficient` property.
        num_components: Number of SAEs trained side by side.
        matryoshka_prefix_sizes: Cumulative prefix widths; adds the ``"matryoshka"`` member and makes it the
            reconstruction term of the loss.
        matryoshka_prefix_weights: One weight per prefix (default ``1/P``).
        sparsity_decoder_norm_weighting: Weight each ``|f_i|`` of the sparsity penalty by the L2 norm of decoder
            row ``i`` (SAELens style; ``decoder_weight`` becomes a required input). ``"l1"`` stays the plain L1.
        explained_variance: Add the FVU / explained variance.
        feature_density: Add the feature density (needs ``num_features``).
        dead_feature_window: Add the dead-feature count with this window in items (needs ``num_features``).
        num_features: The dictionary size ``d_sae``, for the density and dead features.
        feature_reduction: ``"mean"`` or ``"sum"`` of squared errors over ``d_model`` (L2 and Matryoshka).
        component_reduction: ``"mean"`` or ``"sum"`` of the per-component loss into the scalar ``"loss"``.
        keep_batch_dim: Members keep per-item values (``"loss"`` stays a scalar mean).
        prefix: Prefix for every output key (torchmetrics' convention).
        postfix: Postfix for every output key.
        compiled: Compute each batch's per-item L2, L0 and L1 with ``torch.compile`` (``fullgraph=True``), which
            fuses the passes over the ``[batch, d_sae]`` activations. The first batch of each new shape pays the
            compilation; where compiling fails (say, no C++ compiler for the CPU backend), a ``RuntimeWarning``
            says why and the collection runs eagerly from then on, with the same results. With
            ``feature_density`` or ``dead_feature_window``, the activity mask those share with L0 is computed eagerly.
        nan_strategy: ``"propagate"`` (default), ``"ignore"`` or ``"error"`` for items with a NaN or infinite value
            in any member (see :class:`~sparse_metrics.metrics._base.ItemMeanMetric`); "ignore" drops such an item
            from every member and from ``"loss"``.
        kwargs: Passed to every member (``process_group``, ``sync_on_compute``, ...; not ``dist_sync_on_step``).

    Example:
        >>> import torch
        >>> from sparse_metrics import SparseAutoencoderLoss
        >>> loss_fn = SparseAutoencoderLoss(sparsity_coefficient=0.1)
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> f = torch.tensor([[0.5, 0.0, 1.5]], requires_grad=True)
        >>> x_hat = torch.tensor([[1.0, 1.0]])
        >>> out = loss_fn(source_activations=x, learned_activations=f, decoded_activations=x_hat)
        >>> {name: round(value.item(), 4) for name, value in out.items()}
        {'l2': 0.5, 'l0': 2.0, 'l1': 2.0, 'sparsity': 0.2, 'loss': 0.7}
        >>> out["loss"].backward()
        >>> f.grad
        tensor([[0.1000, 0.0000, 0.1000]])
    """

    @validate_arguments
    def __init__(
        self,
        sparsity_coefficient: float | Tensor = 1e-3,
        num_components: NumComponents = 1,
        *,
        matryoshka_prefix_sizes: Sequence[int] | None = None,
        matryoshka_prefix_weights: Sequence[float] | None = None,
        sparsity_decoder_norm_weighting: bool = False,
        explained_variance: bool = False,
        feature_density: bool = False,
        dead_feature_window: PositiveInt | None = None,
        num_features: NumFeatures | None = None,
        feature_reduction: FeatureReduction = "mean",
        component_reduction: ComponentReduction = "mean",
        keep_batch_dim: bool = False,
        prefix: str | None = None,
        postfix: str | None = None,
        compiled: bool = False,
        nan_strategy: NanStrategy = "propagate",
        **kwargs: Any,
    ) -> None:
        if matryoshka_prefix_weights is not None and matryoshka_prefix_sizes is None:
            raise ValueError("`matryoshka_prefix_weights` needs `matryoshka_prefix_sizes`, which is None.")
        if (feature_density or dead_feature_window is not None) and num_features is None:
            raise ValueError(
                "`num_features` (the dictionary size d_sae) is required with `feature_density=True` or "
                "`dead_feature_window`, got None."
            )
        if kwargs.get("dist_sync_on_step"):
            raise ValueError(
                "`dist_sync_on_step=True` is not supported: forward returns this process's batch values and its "
                "differentiable loss; compute() returns the values synced across processes."
            )
        common: dict[str, Any] = {"keep_batch_dim": keep_batch_dim, "nan_strategy": nan_strategy, **kwargs}
        members: dict[str, Metric | MetricCollection] = {
            "l2": L2ReconstructionLoss(num_components, feature_reduction=feature_reduction, **common),
            "l0": L0NormMetric(num_components, **common),
            "l1": L1AbsoluteLoss(num_components, **common),
            "sparsity": SparsityLoss(
                sparsity_coefficient, num_components, decoder_norm_weighting=sparsity_decoder_norm_weighting, **common
            ),
        }
        if matryoshka_prefix_sizes is not None:
            members["matryoshka"] = MatryoshkaReconstructionLoss(
                matryoshka_prefix_sizes,
                num_components,
                feature_reduction=feature_reduction,
                prefix_weights=matryoshka_prefix_weights,
                **common,
            )
        if explained_variance:
            members["fvu"] = FractionOfVarianceUnexplained(num_components, **kwargs)
        if feature_density and num_features is not None:
            members["feature_density"] = FeatureDensity(num_features, num_components, **kwargs)
        if dead_feature_window is not None and num_features is not None:
            members["dead_features"] = DeadFeatures(num_features, num_components, window=dead_feature_window, **kwargs)
        # No torchmetrics compute groups: the collection already shares each statistic between its members.
        super().__init__(members, prefix=prefix, postfix=postfix, compute_groups=False)
        self.num_components = num_components
        self.feature_reduction = feature_reduction
        self.component_reduction = component_reduction
        self.compiled = compiled

    @property
    def reconstruction_key(self) -> str:
        """The member whose value is the reconstruction term of ``"loss"``: ``"matryoshka"`` or ``"l2"``."""
        return "matryoshka" if "matryoshka" in self._modules else "l2"

    @property
    def sparsity_coefficient(self) -> float | Tensor:
        """The sparsity member's coefficient; set it to change the penalty from the next step on."""
        return self._sparsity.sparsity_coefficient

    @sparsity_coefficient.setter
    def sparsity_coefficient(self, value: float | Tensor) -> None:
        self._sparsity.sparsity_coefficient = value

    def _members(self) -> dict[str, ItemMeanMetric]:
        """The per-item-mean members (the loss terms), by key."""
        return {key: cast(ItemMeanMetric, module) for key, module in self._modules.items() if key in _LOSS_KEYS}

    def _all_members(self) -> list[PackedSyncMetric]:
        return [cast(PackedSyncMetric, module) for module in self._modules.values()]

    @property
    def _fvu(self) -> FractionOfVarianceUnexplained | None:
        return cast(FractionOfVarianceUnexplained | None, self._modules.get("fvu"))

    @property
    def _density(self) -> FeatureDensity | None:
        return cast(FeatureDensity | None, self._modules.get("feature_density"))

    @property
    def _dead(self) -> DeadFeatures | None:
        return cast(DeadFeatures | None, self._modules.get("dead_features"))

    @property
    def _sparsity(self) -> SparsityLoss:
        return cast(SparsityLoss, self._modules["sparsity"])

    @property
    def _matryoshka(self) -> MatryoshkaReconstructionLoss | None:
        return cast(MatryoshkaReconstructionLoss | None, self._modules.get("matryoshka"))

    def _batch(
        self,
        source_activations: Tensor,
        learned_activations: Tensor,
        decoded_activations: Tensor,
        decoder_weight: Tensor | None = None,
        decoder_bias: Tensor | None = None,
    ) -> _Batch:
        """Every member's values for one batch, after ``nan_strategy``; raises before any state is touched.

        One check covers every member: with "ignore", an item non-finite for any of them is dropped from all of them
        (and from ``"loss"``) by computing the batch again on the finite items only.
        """
        batch = self._batch_values(
            source_activations, learned_activations, decoded_activations, decoder_weight, decoder_bias
        )
        nan_strategy = self._sparsity.nan_strategy
        if nan_strategy == "propagate":
            return batch
        inputs = ["source_activations", "learned_activations", "decoded_activations"]
        if self._matryoshka is not None or self._sparsity.decoder_norm_weighting:
            inputs += ["decoder_weight", "decoder_bias"]
        if nan_strategy == "error":
            screen_items(batch.per_item, nan_strategy, type(self).__name__, inputs)  # raises if any is non-finite
            return batch
        finite = finite_items(batch.per_item.values())
        if bool(finite.all()):  # the one synchronisation of "ignore"
            return batch
        rows = (source_activations[finite], learned_activations[finite], decoded_activations[finite])
        return self._batch_values(*rows, decoder_weight, decoder_bias)

    def _batch_values(
        self,
        source_activations: Tensor,
        learned_activations: Tensor,
        decoded_activations: Tensor,
        decoder_weight: Tensor | None = None,
        decoder_bias: Tensor | None = None,
    ) -> _Batch:
        """Every member's values for one batch; raises before any state is touched."""
        source, learned, decoded = check_sae_inputs(
            source_activations, learned_activations, decoded_activations, self.num_components
        )
        activity: FeatureActivity | None = None
        if self._density is not None or self._dead is not None:
            # One activity mask f != 0 gives the per-item L0, the per-feature firing counts and the items since each
            # feature fired, in place of the L0 pass of the loss statistics (this path is not compiled).
            member = self._density if self._density is not None else cast(DeadFeatures, self._dead)
            active = member._active(learned_activations)
            activity = _feature_activity(active)
            l2 = _l2_reconstruction_error(decoded, source, self.feature_reduction)
            l0, l1 = _l0_from_active(active, computation_dtype(learned)), _absolute_sum(learned)
        else:
            statistics = _compiled_sae_loss_statistics if self.compiled else _sae_loss_statistics
            l2, l0, l1 = statistics(source, learned, decoded, self.feature_reduction)
        if self._sparsity.decoder_norm_weighting:
            sparsity = self._sparsity._per_item(learned_activations, decoder_weight)
        else:
            sparsity = self._sparsity._from_l1(l1)
        batch = _Batch({"l2": l2, "l0": l0, "l1": l1, "sparsity": sparsity})
        batch.activity = activity
        if self._matryoshka is not None:
            if decoder_weight is None:
                raise ValueError(
                    "`decoder_weight` is required when `matryoshka_prefix_sizes` is set: pass the feature-major "
                    "decoder [*component, d_sae, d_model]."
                )
            # decoded_activations is the SAE's reconstruction from its whole dictionary: its error is the last
            # prefix's when that prefix is d_sae, so that prefix is not decoded a second time.
            batch.per_item["matryoshka"] = self._matryoshka._per_item(
                source_activations, learned_activations, decoder_weight, decoder_bias, full_dictionary_error=l2
            )
        if self._fvu is not None:
            # The L2 member's per-item error, already validated, summed (not averaged) over d_model.
            batch.source = source
            squared_error = batch.per_item["l2"]
            batch.squared_error = (
                squared_error * source.shape[-1] if self.feature_reduction == "mean" else squared_error
            )
        return batch

    def _record(self, batch: _Batch) -> None:
        """Record a validated batch into every member, or, if any member fails, into none."""
        snapshots = [(member, member._snapshot()) for member in self._all_members()]
        try:
            self._record_members(batch)
        except Exception:
            for member, snapshot in snapshots:
                member._restore(snapshot)
            raise

    def _record_members(self, batch: _Batch) -> None:
        members = self._members()
        for key, values in batch.per_item.items():
            members[key]._record_batch(values)
        if self._fvu is not None and batch.source is not None and batch.squared_error is not None:
            self._fvu._record_batch(batch.source, batch.squared_error)
        if batch.activity is not None:
            for member in (self._density, self._dead):
                if member is not None:
                    member._record_batch(batch.activity)

    def update(  # type: ignore[override]
        self,
        source_activations: Tensor,
        learned_activations: Tensor,
        decoded_activations: Tensor,
        decoder_weight: Tensor | None = None,
        decoder_bias: Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        """Accumulate a batch into every member, building no autograd graph. Extra keywords are ignored."""
        with torch.no_grad():
            batch = self._batch(
                source_activations, learned_activations, decoded_activations, decoder_weight, decoder_bias
            )
        self._record(batch)

    def forward(
        self,
        source_activations: Tensor,
        learned_activations: Tensor,
        decoded_activations: Tensor,
        decoder_weight: Tensor | None = None,
        decoder_bias: Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Tensor]:
        """Accumulate a batch and return its values, ``"loss"`` included (differentiable)."""
        batch = self._batch(source_activations, learned_activations, decoded_activations, decoder_weight, decoder_bias)
        self._record(batch)
        per_item = batch.per_item
        members = self._members()
        values = {key: members[key]._output(values) for key, values in per_item.items()}
        if self._matryoshka is not None:
            values.update(self._prefix_values(self._matryoshka._prefix_output(per_item["matryoshka"])))
        reconstruction = members[self.reconstruction_key]._batch_mean(per_item[self.reconstruction_key])
        values["loss"] = self._total(reconstruction, members["sparsity"]._batch_mean(per_item["sparsity"]))
        if self._fvu is not None and batch.source is not None and batch.squared_error is not None:
            fvu = self._fvu._batch_value(batch.source, batch.squared_error)
            values.update({"fvu": fvu, "explained_variance": 1 - fvu})
        if batch.activity is not None:
            if self._density is not None:
                density = self._density._batch_value(batch.activity)
                values.update(self._density_values(density))
            if self._dead is not None:
                values["dead_features"] = self._dead._batch_value(batch.activity)
        return self._named(values)

    def compute(self) -> dict[str, Tensor]:
        """Epoch values of every member, the per-prefix Matryoshka errors and ``"loss"``, synced across ranks."""
        members = self._members()
        every_member: list[Metric] = [module for module in self._modules.values() if isinstance(module, Metric)]
        with synced_states(every_member, every_member[0].process_group):
            values = {key: member.compute() for key, member in members.items()}
            if self._matryoshka is not None:
                values.update(self._prefix_values(self._matryoshka.compute_prefix_losses()))
            values["loss"] = self._total(members[self.reconstruction_key]._mean(), members["sparsity"]._mean())
            if self._fvu is not None:
                fvu = self._fvu.compute()
                values.update({"fvu": fvu, "explained_variance": 1 - fvu})
            if self._density is not None:
                values.update(self._density_values(self._density.compute()))
            if self._dead is not None:
                values["dead_features"] = self._dead.compute()
        return self._named(values)

    @staticmethod
    def _density_values(density: Tensor) -> dict[str, Tensor]:
        return {"feature_density": density, "mean_log10_feature_density": _mean_log10_density(density)}

    def _prefix_values(self, prefix_values: Tensor) -> dict[str, Tensor]:
        sizes = self._matryoshka.prefix_sizes if self._matryoshka is not None else ()
        return {f"matryoshka_prefix_{size}": prefix_values[..., index] for index, size in enumerate(sizes)}

    def _total(self, reconstruction: Tensor, sparsity: Tensor) -> Tensor:
        per_component = reconstruction + sparsity
        return per_component.mean() if self.component_reduction == "mean" else per_component.sum()

    def _named(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        return {self._set_name(key): value for key, value in values.items()}


def _mean_log10_density(density: Tensor) -> Tensor:
    return _mean_log10(density, DENSITY_EPSILON)
