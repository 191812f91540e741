"""The SAE training loss: every loss term as one ``MetricCollection`` that also returns a differentiable total."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn import Module
from torchmetrics import Metric, MetricCollection

from sparse_metrics._batch import SAE_INPUTS, SaeBatch, inputs_of
from sparse_metrics._config import (
    ComponentReduction,
    FeatureReduction,
    FiringThreshold,
    NanStrategy,
    NumComponents,
    NumFeatures,
    PositiveInt,
    WindowUnit,
    validate_arguments,
)
from sparse_metrics._distributed import synced_states
from sparse_metrics._sharding import FeatureSharding, resolve_sharding
from sparse_metrics.metrics._base import (
    DerivedOutput,
    SaeMetric,
    _detached,
    _set_plain,
    batch_contributions,
    recording,
)
from sparse_metrics.metrics.dead_features import DeadFeatures
from sparse_metrics.metrics.explained_variance import FractionOfVarianceUnexplained
from sparse_metrics.metrics.feature_density import FeatureDensity
from sparse_metrics.metrics.l0_norm import L0NormMetric
from sparse_metrics.metrics.l1_absolute import L1AbsoluteLoss
from sparse_metrics.metrics.l2_reconstruction import L2ReconstructionLoss
from sparse_metrics.metrics.matryoshka import MatryoshkaReconstructionLoss
from sparse_metrics.metrics.sparsity import SparsityLoss
from sparse_metrics.metrics.total_loss import TotalLoss

__all__ = ["SparseAutoencoderLoss"]

_NO_SPARSITY_PENALTY = (
    "This SparseAutoencoderLoss was built with `sparsity_penalty=False`: its loss has no sparsity penalty, so no "
    "`sparsity_coefficient`."
)


class SparseAutoencoderLoss(MetricCollection):
    r"""Every SAE loss term in one collection, plus the differentiable total loss.

    Members, by key: ``"l2"`` (:class:`L2ReconstructionLoss`), ``"l0"`` (:class:`L0NormMetric`), ``"l1"``
    (:class:`L1AbsoluteLoss`), ``"sparsity"`` (:class:`SparsityLoss`; not with ``sparsity_penalty=False``),
    ``"loss"`` (:class:`TotalLoss`) and the options below. Every key that ``forward`` and ``compute`` return is a
    member, so Lightning's ``log_dict(collection)``, nesting in a ``MetricCollection`` and ``MetricTracker`` see all
    of them.

    .. math:: \mathrm{loss} = \operatorname{reduce}_c \big(\alpha_0\,\mathrm{reconstruction}_c + \mathrm{sparsity}_c
       + \textstyle\sum_t \alpha_t\, \mathrm{term}_{t,c}\big)

    where the reconstruction is the Matryoshka loss when configured, else L2 (or the FVU), the terms :math:`t` are
    the ``loss_terms`` with their ``loss_coefficients`` :math:`\alpha_t`, and ``reduce`` is ``component_reduction``
    over the components.

    - ``forward(**inputs)`` accumulates the batch and returns each member's value on it, ``"loss"`` (a
      differentiable scalar) included; every member's ``_forward_cache`` holds its (detached) batch value.
    - ``update(**inputs)`` accumulates without building an autograd graph.
    - ``compute()`` returns the epoch values of the same keys, synced across processes in at most two collectives.
    - :meth:`loggable` turns either result into the scalars a logger takes.

    Options and the keys they add:

    - ``matryoshka_prefix_sizes``: ``"matryoshka"`` (:class:`MatryoshkaReconstructionLoss`, then the reconstruction
      term of ``"loss"``) and ``"matryoshka_prefix_<m>"``, the error of each prefix of width ``m``.
    - ``explained_variance=True`` (needs ``d_model``): ``"fvu"`` (:class:`FractionOfVarianceUnexplained`) and
      ``"explained_variance"`` (``1 - fvu``).
    - ``feature_density=True`` (needs ``num_features``): ``"feature_density"`` (:class:`FeatureDensity`, per feature
      ``[*component, num_features]``), ``"mean_log10_feature_density"`` and the density bands (fractions of the
      features): ``"feature_density_above_1e-1"``, ``"feature_density_above_1e-2"``,
      ``"feature_density_below_1e-5"``, ``"feature_density_below_1e-6"``, ``"feature_density_never_fired"``.
    - ``dead_feature_window=w`` (needs ``num_features``): ``"dead_features"`` (:class:`DeadFeatures`, window ``w``
      items; its counters survive ``reset()``) and ``"dead_feature_fraction"``.

    Inputs (keywords, or positionally in this order): ``source_activations``, ``learned_activations``,
    ``decoded_activations``, ``decoder_weight`` (feature-major ``[*component, d_sae, d_model]``; required for
    Matryoshka and decoder-norm weighting) and ``decoder_bias``. A keyword that is not one of these raises
    ``TypeError``. The batch is validated once, before any member's state changes, and every statistic the members
    share (the squared error, the L1, the activity mask) is computed once: the L1 also feeds the sparsity penalty, and
    one activity mask ``f != 0`` gives the L0, the densities and the dead-feature counters.

    Args:
        num_components: Number of SAEs trained side by side (the first positional argument, as in the prior-art
            ``sparse_autoencoder`` package).
        sparsity_coefficient: Non-negative number or ``[component]`` tensor; change it between steps through the
            :attr:`sparsity_coefficient` property.
        l1_coefficient: The prior-art package's name for ``sparsity_coefficient``; give one of the two.
        matryoshka_prefix_sizes: Cumulative prefix widths; adds the Matryoshka member and makes it the
            reconstruction term of the loss.
        matryoshka_prefix_weights: One weight per prefix (default ``1/P``).
        matryoshka_reuse_decoded_activations: Take the error of ``decoded_activations`` as the whole-dictionary
            prefix's instead of decoding it again: right only where ``decoded_activations`` is exactly ``f W + b``.
        sparsity_decoder_norm_weighting: Weight each ``|f_i|`` of the sparsity penalty by the L2 norm of decoder
            row ``i`` (SAELens style; ``decoder_weight`` becomes a required input). ``"l1"`` stays the plain L1.
        sparsity_penalty: ``False`` leaves the ``"sparsity"`` member and its term of ``"loss"`` out, for an SAE
            whose loss has no L1 penalty (TopK, BatchTopK, JumpReLU): no pass over the activations for a penalty
            weighted by zero. ``sparsity_coefficient``, ``l1_coefficient`` and ``sparsity_decoder_norm_weighting``
            then raise, and so does the :attr:`sparsity_coefficient` property. ``"l1"`` stays (delete it if unused).
        explained_variance: Add the FVU and explained variance (needs ``d_model``).
        d_model: The width of the activations, for the explained variance.
        feature_density: Add the feature density (needs ``num_features``).
        dead_feature_window: Add the dead-feature count with this window in items (needs ``num_features``).
        num_features: The dictionary size ``d_sae``, for the density and dead features.
        firing_threshold: Where the density and dead features count a firing: ``None`` (default) ``f != 0``, a
            number ``t >= 0`` ``f > t`` (OpenAI: ``1e-3``). ``"l0"`` always counts ``f != 0``.
        dead_feature_window_unit: ``"items"`` (default) or ``"steps"``: what ``dead_feature_window`` counts.
        explained_variance_centred_residual: Centre the residual of the FVU and explained variance
            (dictionary_learning's ``evaluate``; see :class:`FractionOfVarianceUnexplained`).
        feature_reduction: ``"mean"`` or ``"sum"`` of squared errors over ``d_model`` (L2 and Matryoshka).
        component_reduction: ``"mean"`` or ``"sum"`` of the per-component loss into the scalar ``"loss"``.
        keep_batch_dim: The loss terms keep per-item values (``"loss"`` stays a scalar mean).
        prefix: Prefix for every output key (torchmetrics' convention).
        postfix: Postfix for every output key.
        compiled: Compute each batch's squared error, L0 and L1, and with ``feature_density`` or
            ``dead_feature_window`` the features' firing counts and items since fired, in one ``torch.compile``'d
            function (``fullgraph=True``), which fuses the passes over the ``[batch, d_sae]`` activations; the
            ``loss_terms`` :class:`TanhSparsityLoss`, :class:`PreActivationLoss`, :class:`JumpReLUL0Loss` and
            :class:`AuxiliaryKLoss` run compiled too. The first batch of each new shape pays the compilation; where
            compiling fails (say, no C++ compiler for the CPU backend), a ``RuntimeWarning`` says why and that
            function runs eagerly from then on, with the same results. Under a feature sharding the squared error,
            L0, L1, activity statistics and AuxK run eagerly (around their collectives); the tanh, pre-activation
            and JumpReLU L0 partial sums still run compiled.
        nan_strategy: ``"propagate"`` (default), ``"ignore"`` or ``"error"`` for items with a NaN or infinite value
            in any member (see :class:`~sparse_metrics.metrics._base.ItemMeanMetric`); "ignore" drops such an item
            from every member and from ``"loss"``.
        reconstruction: The reconstruction term of ``"loss"`` without Matryoshka prefixes: ``"l2"``, or ``"fvu"``
            (sparsify trains on the FVU of each batch; needs ``explained_variance=True``).
        loss_terms: More loss terms by key (metrics with ``is_loss_term``, such as :class:`AuxiliaryKLoss` or
            :class:`JumpReLUL0Loss`), each a member summed into ``"loss"``; of this collection's
            ``num_components`` and ``nan_strategy``.
        loss_coefficients: A coefficient for the reconstruction term or any of ``loss_terms`` (default 1); change
            one between steps with :meth:`set_loss_coefficient`.
        kwargs: Passed to every member (``process_group``, ``sync_on_compute``, ``dist_sync_fn``, ...; not
            ``dist_sync_on_step``). A dictionary sharded over features takes ``feature_group=`` beside
            ``process_group=`` (the data group), or ``device_mesh=`` (2-D, dims ``("data", "feature")``): see the
            DDP guide's sharding section.

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
        num_components: NumComponents = 1,
        sparsity_coefficient: float | Tensor | None = None,
        *,
        l1_coefficient: float | Tensor | None = None,
        matryoshka_prefix_sizes: Sequence[int] | None = None,
        matryoshka_prefix_weights: Sequence[float] | None = None,
        matryoshka_reuse_decoded_activations: bool = False,
        sparsity_decoder_norm_weighting: bool = False,
        sparsity_penalty: bool = True,
        explained_variance: bool = False,
        d_model: PositiveInt | None = None,
        feature_density: bool = False,
        dead_feature_window: PositiveInt | None = None,
        num_features: NumFeatures | None = None,
        firing_threshold: FiringThreshold | None = None,
        dead_feature_window_unit: WindowUnit = "items",
        explained_variance_centred_residual: bool = False,
        feature_reduction: FeatureReduction = "mean",
        component_reduction: ComponentReduction = "mean",
        keep_batch_dim: bool = False,
        prefix: str | None = None,
        postfix: str | None = None,
        compiled: bool = False,
        nan_strategy: NanStrategy = "propagate",
        reconstruction: Literal["l2", "fvu"] = "l2",
        loss_terms: Mapping[str, SaeMetric] | None = None,
        loss_coefficients: Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        coefficient = _coefficient(
            sparsity_coefficient, l1_coefficient, sparsity_decoder_norm_weighting, sparsity_penalty
        )
        if reconstruction == "fvu" and (not explained_variance or matryoshka_prefix_sizes is not None):
            raise ValueError(
                "`reconstruction='fvu'` makes the FVU the reconstruction term of the loss: it needs "
                "`explained_variance=True` (and `d_model`) and no `matryoshka_prefix_sizes`, got "
                f"explained_variance={explained_variance}, matryoshka_prefix_sizes={matryoshka_prefix_sizes}."
            )
        _check_options(
            matryoshka=matryoshka_prefix_sizes is not None,
            matryoshka_options=matryoshka_prefix_weights is not None or matryoshka_reuse_decoded_activations,
            explained_variance=explained_variance,
            d_model=d_model,
            activity=feature_density or dead_feature_window is not None,
            num_features=num_features,
            dist_sync_on_step=bool(kwargs.get("dist_sync_on_step")),
        )
        sharding = resolve_sharding(kwargs, type(self).__name__)  # one feature sharding shared by every member
        if sharding is not None:
            kwargs["feature_group"] = sharding
        common: dict[str, Any] = {"nan_strategy": nan_strategy, **kwargs}
        term_options: dict[str, Any] = {"keep_batch_dim": keep_batch_dim, **common}
        members: dict[str, SaeMetric] = {
            "l2": L2ReconstructionLoss(num_components, feature_reduction=feature_reduction, **term_options),
            "l0": L0NormMetric(num_components, **term_options),
            "l1": L1AbsoluteLoss(num_components, **term_options),
        }
        if coefficient is not None:
            members["sparsity"] = SparsityLoss(
                coefficient, num_components, decoder_norm_weighting=sparsity_decoder_norm_weighting, **term_options
            )
        if matryoshka_prefix_sizes is not None:
            members["matryoshka"] = MatryoshkaReconstructionLoss(
                matryoshka_prefix_sizes,
                num_components,
                feature_reduction=feature_reduction,
                prefix_weights=matryoshka_prefix_weights,
                reuse_decoded_activations=matryoshka_reuse_decoded_activations,
                **term_options,
            )
        if explained_variance and d_model is not None:
            members["fvu"] = FractionOfVarianceUnexplained(
                num_components, d_model=d_model, centred_residual=explained_variance_centred_residual, **common
            )
        activity = {"firing_threshold": firing_threshold, **common}
        if feature_density and num_features is not None:
            members["feature_density"] = FeatureDensity(num_features, num_components, **activity)
        if dead_feature_window is not None and num_features is not None:
            members["dead_features"] = DeadFeatures(
                num_features,
                num_components,
                window=dead_feature_window,
                window_unit=dead_feature_window_unit,
                **activity,
            )
        reconstruction_key = "matryoshka" if matryoshka_prefix_sizes is not None else reconstruction
        loss_keys: list[str] = [reconstruction_key, *(["sparsity"] if coefficient is not None else [])]
        for key, term in (loss_terms or {}).items():
            _check_loss_term(key, term, members, num_components, nan_strategy, sharding)
            members[key] = term
            loss_keys.append(key)
        weighted = set(loss_keys) - {"sparsity"}
        if loss_coefficients is not None and (unknown := sorted(set(loss_coefficients) - weighted)):
            raise ValueError(
                f"`loss_coefficients` names {unknown}, which are not weighted terms of the loss; the terms are "
                f"{sorted(weighted)}"
                + (
                    " (the sparsity penalty has its own `sparsity_coefficient`)."
                    if coefficient is not None
                    else " (`sparsity_penalty=False`: no sparsity penalty)."
                )
            )
        loss = TotalLoss(
            {name: members[name] for name in loss_keys}, component_reduction, coefficients=loss_coefficients, **common
        )
        # No torchmetrics compute groups: the members share each statistic through the batch already.
        super().__init__({}, prefix=prefix, postfix=postfix, compute_groups=False)
        for key, member in members.items():  # in this order (MetricCollection would sort a dict's keys)
            self[key] = member
            for name in member._derived_outputs():  # each derived value right after its source
                # a second source of one output (a loss term's FVU beside the collection's) keys it by its source
                self[name if name not in self._modules else f"{key}_{name}"] = DerivedOutput(member, name, **common)
        self["loss"] = loss
        self.num_components = num_components
        self.nan_strategy = nan_strategy
        self.compiled = compiled
        self.__dict__["feature_sharding"] = sharding

    @property
    def sparsity_coefficient(self) -> float | Tensor:
        """The sparsity member's coefficient; set it to change the penalty from the next step on."""
        return self._sparsity().sparsity_coefficient

    @sparsity_coefficient.setter
    def sparsity_coefficient(self, value: float | Tensor) -> None:
        self._sparsity().sparsity_coefficient = value

    def _sparsity(self) -> SparsityLoss:
        member = self._total.terms.get("sparsity")
        if member is None:
            raise AttributeError(_NO_SPARSITY_PENALTY)
        assert isinstance(member, SparsityLoss)
        return member

    def __getattr__(self, name: str) -> Tensor | Module:
        # Python falls back here when a property raises AttributeError, which would drop the reason
        built = "_modules" in self.__dict__  # before Module.__init__ there is nothing to tell
        if name == "sparsity_coefficient" and built and "sparsity" not in self._modules:
            raise AttributeError(_NO_SPARSITY_PENALTY)
        return super().__getattr__(name)

    @property
    def reconstruction_key(self) -> str:
        """The member whose value is the reconstruction term of ``"loss"``: ``"matryoshka"``, ``"l2"`` or ``"fvu"``."""
        return next(iter(self._total.terms))

    @property
    def _total(self) -> TotalLoss:
        member = self._modules["loss"]
        assert isinstance(member, TotalLoss)
        return member

    @property
    def loss_coefficients(self) -> dict[str, float]:
        """The coefficient of each term of ``"loss"`` but the sparsity penalty (see :attr:`sparsity_coefficient`)."""
        return {key: value for key, value in self._total.coefficients.items() if key != "sparsity"}

    def set_loss_coefficient(self, key: str, value: float) -> None:
        """Weight loss term ``key`` by ``value`` from the next step on (a warm-up schedule, say)."""
        if key == "sparsity":
            if "sparsity" not in self._total.terms:
                raise ValueError(f"Cannot weight 'sparsity': {_NO_SPARSITY_PENALTY}")
            raise ValueError("The sparsity penalty is weighted by `sparsity_coefficient`; set that instead.")
        self._total.set_coefficient(key, value)

    def add_metrics(self, metrics: Any, *additional_metrics: Metric) -> None:
        """Add members (as ``torchmetrics.MetricCollection.add_metrics`` does).

        This package's metrics read the shared batch and are screened with the collection's ``nan_strategy`` (which
        they must share); any other metric is fed the inputs as given, through its own ``update`` signature
        (torchmetrics' ``_filter_kwargs``), and reports its own ``forward``/``compute`` values.

        Raises:
            ValueError: A key is taken already, or a metric syncs on step (its values could not be recorded in the
                collection's transaction and then returned).
        """
        for metric in _metrics_of(metrics, additional_metrics):
            strategy = getattr(metric, "nan_strategy", None)
            if isinstance(metric, SaeMetric) and hasattr(self, "nan_strategy") and strategy != self.nan_strategy:
                raise ValueError(
                    f"{type(metric).__name__} has nan_strategy={strategy!r}, the collection {self.nan_strategy!r}: the "
                    "collection screens every member's items once, with its own strategy."
                )
            if metric.dist_sync_on_step:
                raise ValueError(
                    f"{type(metric).__name__} has `dist_sync_on_step=True`, which a SparseAutoencoderLoss member "
                    "cannot honour: forward returns this process's batch values."
                )
        if isinstance(metrics, Mapping) and (taken := sorted(set(metrics) & set(self._modules))):
            raise ValueError(f"SparseAutoencoderLoss has members {taken} already; choose other keys.")
        super().add_metrics(metrics, *additional_metrics)

    def __delitem__(self, key: str) -> None:
        """Remove member ``key`` (``del loss_fn["l1"]``, ``pop``), unless ``"loss"`` or another member reads it.

        A loss term, the source of a derived output (``"fvu"`` of ``"explained_variance"``) and ``"loss"`` itself stay:
        without them the loss, or the derived value, would be computed from a metric no longer fed. Replacing such a
        member (``loss_fn["l2"] = ...``, ``loss_fn.l2 = ...``) and ``clear()`` are refused for the same reason.
        """
        self._check_removable(key)
        super().__delitem__(key)

    def __setitem__(self, key: str, module: Module) -> None:
        if key in self._modules:  # a replacement removes the member it replaces
            self._check_removable(key)
        elif key == "sparsity" and "loss" in self._modules:  # built: "sparsity" could only be a penalty outside "loss"
            raise ValueError(
                "SparseAutoencoderLoss keeps the key 'sparsity' for its L1 penalty, which `sparsity_penalty=False` "
                "left out of 'loss'; add this member under another key (or build the collection with the penalty)."
            )
        super().__setitem__(key, module)

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, Module) and name in self.__dict__.get("_modules", {}):
            self._check_removable(name)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in self.__dict__.get("_modules", {}):
            self._check_removable(name)
        super().__delattr__(name)

    def clear(self) -> None:
        """Refused: ``"loss"`` and its terms stay (remove the members nobody reads one by one, with ``del``)."""
        raise ValueError("SparseAutoencoderLoss cannot be cleared: 'loss' and its terms stay; `del` other members.")

    def _check_removable(self, key: str) -> None:
        member = self._modules.get(key)
        readers = [
            name
            for name, other in self._modules.items()
            if name != key and isinstance(other, SaeMetric) and any(read is member for read in other._reads())
        ]
        if key == "loss" or readers:
            reason = "it is the collection's loss" if key == "loss" else f"it is read by {readers}"
            raise ValueError(f"SparseAutoencoderLoss cannot remove member {key!r}: {reason}.")

    def check_state_dict(self, state_dict: Mapping[str, Any], prefix: str = "", strict: bool = True) -> None:
        """Raise ``ValueError`` if any member's part of ``state_dict`` cannot load (``SaeMetric.check_state_dict``)."""
        for key, member in self._modules.items():
            if isinstance(member, SaeMetric):
                member.check_state_dict(state_dict, f"{prefix}{key}.", strict)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a checkpoint after every member's part of it has been checked (with ``strict``)."""
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
        """Check every member's part of the checkpoint before any member loads (they load after, one by one)."""
        self.check_state_dict(state_dict, prefix, strict=False)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # One step.

    def _members(self) -> tuple[list[tuple[str, SaeMetric]], list[tuple[str, Metric]]]:
        """This package's members, which read the shared batch, and any others, fed through their signatures."""
        own: list[tuple[str, SaeMetric]] = []
        foreign: list[tuple[str, Metric]] = []
        for key, member in self._modules.items():  # items(keep_base=True) without compute groups (refused here)
            if isinstance(member, SaeMetric):
                own.append((key, member))
            else:
                foreign.append((key, member))
        return own, foreign

    def _step(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], *, forward: bool) -> dict[str, Tensor]:
        """Validate the batch, screen it once, record it into every member as one transaction; the batch values."""
        inputs = inputs_of(args, kwargs, SAE_INPUTS, type(self).__name__)
        own, foreign = self._members()
        uses = frozenset().union(*(member._batch_uses() for _, member in own))
        batch = SaeBatch(
            inputs,
            num_components=self.num_components,
            owner=type(self).__name__,
            uses=uses,
            compiled=self.compiled,
            sharding=self.__dict__.get("feature_sharding"),
        )
        members = [member for _, member in own]
        if forward:
            for member in members:
                member._check_not_synced()
        contributions = batch_contributions(members, batch, self.nan_strategy, type(self).__name__)
        values: dict[str, Tensor] = {}
        with recording([member for _, member in [*own, *foreign]]):
            with torch.no_grad():
                for member, contribution in zip(members, contributions, strict=True):
                    member._record_counted(contribution)
            for key, other in foreign:
                given = other._filter_kwargs(**inputs)
                if forward:
                    values[key] = other(**given)
                else:
                    other.update(**given)
        if forward:
            batch_means: dict[int, Tensor] = {}  # each loss term's batch mean, computed once for it and for "loss"
            for (key, member), contribution in zip(own, contributions, strict=True):
                value = member._forward_value(contribution, batch_means)
                _set_plain(member, _forward_cache=_detached(value))
                values[key] = value
        return values

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Accumulate a batch into every member, building no autograd graph."""
        with torch.no_grad():
            self._step(args, kwargs, forward=False)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Accumulate a batch and return its values, ``"loss"`` included (differentiable)."""
        values = self._step(args, kwargs, forward=True)
        # In the members' order: ``items(keep_base=True)``'s, without its compute-group pass (groups are refused here).
        return {self._set_name(key): values[key] for key in self._modules}

    def compute(self) -> dict[str, Tensor]:
        """Epoch values of every member, ``"loss"`` included, synced across processes (one packed sync)."""
        own, _ = self._members()
        stateful = [member for _, member in own if member._defaults]
        with synced_states(stateful, stateful[0].process_group if stateful else None):
            for _, member in own:  # computed from the synced states: a cached result may predate another rank's batch
                member._computed = None
            values = {key: member.compute() for key, member in self.items(keep_base=True, copy_state=False)}
        return {self._set_name(key): value for key, value in values.items()}

    def loggable(self, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The scalars of a ``forward`` or ``compute`` result, for a logger (``log_dict``, ``{k: v.item()}``).

        A one-element value is kept as a 0-d tensor; a per-component value ``[component]`` becomes one key per
        component, ``"<key>/<c>"``; per-feature values (``feature_density``) and per-item values (``keep_batch_dim``)
        are left out: log those as histograms.

        Example:
            >>> import torch
            >>> from sparse_metrics import SparseAutoencoderLoss
            >>> loss_fn = SparseAutoencoderLoss(2, feature_density=True, num_features=3)
            >>> x = torch.zeros(4, 2, 5)
            >>> out = loss_fn(source_activations=x, learned_activations=torch.ones(4, 2, 3), decoded_activations=x)
            >>> scalars = loss_fn.loggable(out)
            >>> print(*(key for key in scalars if key.startswith(("l0", "l1"))))
            l0/0 l0/1 l1/0 l1/1
            >>> "feature_density" in scalars  # per feature: a histogram, not a scalar
            False
        """
        scalars: dict[str, Tensor] = {}
        for key, member in self.items(keep_base=False, copy_state=False):
            value = values.get(key)
            if value is None or getattr(member, "_value_has_axis", False):  # per-item or per-feature values
                continue
            if value.numel() == 1:
                scalars[key] = value.reshape(())
            elif value.ndim == 1:
                scalars.update({f"{key}/{component}": item for component, item in enumerate(value.unbind())})
        return scalars


def _check_loss_term(
    key: str,
    term: object,
    members: Mapping[str, SaeMetric],
    num_components: int,
    nan_strategy: str,
    sharding: FeatureSharding | None,
) -> None:
    """Refuse a ``loss_terms`` entry that could not be summed into the loss as the collection's own terms are."""
    if not isinstance(term, SaeMetric) or not term.is_loss_term:
        raise TypeError(
            f"`loss_terms[{key!r}]` must be a sparse_metrics loss term (a metric with is_loss_term=True, such as "
            f"AuxiliaryKLoss), got {type(term).__name__}."
        )
    # "sparsity" stays the collection's own L1 penalty's key, also where `sparsity_penalty=False` leaves it out
    taken = {*members, *(name for member in members.values() for name in member._derived_outputs()), "loss", "sparsity"}
    if key in taken:
        raise ValueError(
            f"`loss_terms` key {key!r} is taken: the collection's own keys are {sorted(taken)} ('sparsity' and 'loss' "
            "are reserved for its L1 penalty and its total)."
        )
    if term.num_components != num_components or term.nan_strategy != nan_strategy:
        raise ValueError(
            f"`loss_terms[{key!r}]` has num_components={term.num_components}, nan_strategy={term.nan_strategy!r}; the "
            f"collection {num_components}, {nan_strategy!r}: every member reads the same screened batch."
        )
    if term.dist_sync_on_step:
        raise ValueError(f"`loss_terms[{key!r}]` has `dist_sync_on_step=True`, which no member supports.")
    own = term.feature_sharding
    if (own is None) != (sharding is None) or (
        own is not None and sharding is not None and own.group != sharding.group
    ):
        raise ValueError(
            f"`loss_terms[{key!r}]` is {'not ' if own is None else ''}feature-sharded, the collection "
            f"{'is' if sharding is not None else 'is not'}: construct the term with the collection's `feature_group` "
            "(or `device_mesh`), so that it reads, reduces and checks the same slice of the dictionary."
        )


def _coefficient(
    sparsity_coefficient: float | Tensor | None,
    l1_coefficient: float | Tensor | None,
    decoder_norm_weighting: bool,
    penalty: bool,
) -> float | Tensor | None:
    """The sparsity penalty's coefficient (default 1e-3), or None where the collection has no penalty."""
    if sparsity_coefficient is not None and l1_coefficient is not None:
        raise ValueError("Give `sparsity_coefficient` or its prior-art name `l1_coefficient`, not both.")
    if not penalty:
        options = {
            "sparsity_coefficient": sparsity_coefficient is not None,
            "l1_coefficient": l1_coefficient is not None,
            "sparsity_decoder_norm_weighting": decoder_norm_weighting,
        }
        if given := [name for name, is_given in options.items() if is_given]:
            raise ValueError(
                f"`{given[0]}` configures the sparsity penalty, which `sparsity_penalty=False` leaves out; give one or "
                "the other."
            )
        return None
    return next((c for c in (sparsity_coefficient, l1_coefficient) if c is not None), 1e-3)


def _check_options(
    *,
    matryoshka: bool,
    matryoshka_options: bool,
    explained_variance: bool,
    d_model: int | None,
    activity: bool,
    num_features: int | None,
    dist_sync_on_step: bool,
) -> None:
    """Refuse options that need another one, and options that nothing would use."""
    if matryoshka_options and not matryoshka:
        raise ValueError(
            "`matryoshka_prefix_weights` and `matryoshka_reuse_decoded_activations` need `matryoshka_prefix_sizes`, "
            "which is None."
        )
    if explained_variance != (d_model is not None):
        raise ValueError(
            "`d_model` (the width of the activations) goes with `explained_variance=True`: give both or neither, got "
            f"explained_variance={explained_variance}, d_model={d_model}."
        )
    if activity != (num_features is not None):
        raise ValueError(
            "`num_features` (the dictionary size d_sae) goes with `feature_density=True` or `dead_feature_window`: "
            f"give both or neither, got num_features={num_features}."
        )
    if dist_sync_on_step:
        raise ValueError(
            "`dist_sync_on_step=True` is not supported: forward returns this process's batch values and its "
            "differentiable loss; compute() returns the values synced across processes."
        )


def _metrics_of(metrics: Any, additional: Sequence[Metric]) -> Iterator[Metric]:
    """Every metric in an ``add_metrics`` argument (a metric, a sequence or dict of them, or a collection)."""
    groups = [metrics, *additional]
    for group in groups:
        if isinstance(group, MetricCollection):
            yield from group.values(copy_state=False)
        elif isinstance(group, Metric):
            yield group
        elif isinstance(group, Mapping):
            yield from (m for m in group.values() if isinstance(m, Metric))
        elif isinstance(group, Sequence):
            yield from (m for m in group if isinstance(m, Metric))
