"""The shared metric tester: one registry of every metric and the collection, and what the generic checks need.

In the style of torchmetrics' ``MetricTester``: every public metric and :class:`~sparse_metrics.SparseAutoencoderLoss`
is registered once in :data:`CASES`, in several configurations, each with a float64 reference of its ``compute()``
written from the formulas in :mod:`tests.reference`. The generic checks in ``tests/test_tester.py`` run every case
through the same scenarios (uneven and empty batches, forward, ``keep_batch_dim``, checkpoints and copies, bad input,
``nan_strategy``, two gloo ranks); tests of one metric's own behaviour take their metrics and inputs from here too.

A case's outputs are a dict: ``compute()`` (``{"value": ...}`` for a metric, the collection's keys for a collection)
plus the case's extra methods (``compute_prefix_losses``, ``mean_log10_density``, ``items_since_fired``,
``dead_mask``), so that one comparison covers everything a user reads from the metric.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

import sparse_metrics as sm
from tests import reference

D_MODEL, D_SAE = 5, 12
#: Dead-feature window in items: short enough that features die and revive within a test's few batches.
WINDOW = 4
#: Dead-feature window in steps (``window_unit="steps"``).
WINDOW_STEPS = 2
#: A firing threshold above the smallest activations (``firing_threshold`` cases): it excludes negative ones too.
FIRING_THRESHOLD = 0.5
#: Tolerance of float32 inputs against the float64 reference (per-item values are computed in float32).
RTOL, ATOL = 2e-5, 1e-6

#: Every input a metric reads, spelt out here rather than taken from the package.
SAE_INPUTS = (
    "source_activations",
    "learned_activations",
    "decoded_activations",
    "decoder_weight",
    "decoder_bias",
    "pre_activations",
    "threshold",
    "dead_mask",
)
ACTIVATIONS = ("source_activations", "learned_activations", "decoded_activations", "pre_activations")

Batch = dict[str, Tensor]
Ranks = Sequence[Sequence[Batch]]  # the batches of each rank, in order; one process is one rank


def sae_inputs(
    batch_size: int,
    components: int = 2,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    parameters: dict[str, Tensor] | None = None,
) -> Batch:
    """One step of this registry's SAE (``D_MODEL``, ``D_SAE``, signed sparse activations), every input."""
    return reference.sae_inputs(
        batch_size,
        components=components,
        d_model=D_MODEL,
        d_sae=D_SAE,
        generator=generator,
        dtype=dtype,
        parameters=parameters,
        signed=True,
    )


def batches(sizes: Sequence[int], components: int = 2, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> list:
    """Steps of the given sizes (0 allowed) sharing one decoder, ``[batch, component, ...]``."""
    generator = torch.Generator().manual_seed(seed)
    out: list[Batch] = []
    for size in sizes:
        shared = {name: out[0][name] for name in reference.PARAMETERS} if out else None
        out.append(sae_inputs(size, components, generator=generator, dtype=dtype, parameters=shared))
    return out


def layout(batch: Batch, component_axis: bool) -> Batch:
    """The inputs as fed: with their component axis, or (one component) without it."""
    return dict(batch) if component_axis else reference.without_component_axis(batch)


def rows(batch: Batch, items: Any) -> Batch:
    """The items ``items`` (an index, slice or mask) of a step; the decoder is shared."""
    return {name: value[items] if name in ACTIVATIONS else value for name, value in batch.items()}


def concatenated(steps: Sequence[Batch]) -> Batch:
    """Every item of ``steps`` as one step (they share the decoder of the first)."""
    return {
        name: torch.cat([step[name] for step in steps]) if name in ACTIVATIONS else steps[0][name] for name in steps[0]
    }


# --- the references -----------------------------------------------------------------------------------------------


def _squeeze(value: Tensor, axis: int) -> Tensor:
    """Drop the component axis of a one-component value, as the metrics do."""
    return value.squeeze(axis) if value.shape[axis] == 1 else value


def _streams(ranks: Ranks) -> list[Tensor]:
    """Each rank's activations ``[items, component, d_sae]``, in order."""
    components = next(step["learned_activations"].shape[1] for rank in ranks for step in rank)
    return [
        torch.cat([step["learned_activations"] for step in rank]) if rank else torch.zeros(0, components, D_SAE)
        for rank in ranks
    ]


def _all_items(ranks: Ranks) -> list[Batch]:
    return [step for rank in ranks for step in rank]


PerItem = Callable[[Batch], Tensor]  # a step -> per-item values [batch, component]


def l2(feature_reduction: str = "mean") -> PerItem:
    return lambda b: reference.per_item_l2(b["decoded_activations"], b["source_activations"], feature_reduction)


def l0(b: Batch) -> Tensor:
    return reference.per_item_l0(b["learned_activations"])


def l1(b: Batch) -> Tensor:
    return reference.per_item_l1(b["learned_activations"])


def sparsity(coefficient: float | Callable[[int], Tensor], decoder_norm_weighting: bool = False) -> PerItem:
    """``coefficient``: a number, or a function of the component count giving one coefficient per component."""

    def per_item(b: Batch) -> Tensor:
        learned = b["learned_activations"]
        scale = coefficient(learned.shape[1]) if callable(coefficient) else coefficient
        return reference.per_item_sparsity(learned, scale, b["decoder_weight"] if decoder_norm_weighting else None)

    return per_item


def jumprelu_l0(
    bandwidth: float, convention: str = "saelens", ste_to_input: bool = False, target_l0: float | None = None
) -> PerItem:
    return lambda b: reference.per_item_jumprelu_l0(
        b["pre_activations"], b["threshold"], bandwidth, convention, ste_to_input, target_l0
    )


def _mean_l0_target(bandwidth: float, target_l0: float) -> Callable[[Ranks, bool], dict[str, Tensor]]:
    """dictionary_learning's ``(mean L0 / T - 1)^2`` of the mean over every item (no per-item value)."""
    per_item = jumprelu_l0(bandwidth, "dictionary_learning")

    def expected(ranks: Ranks, keep_batch_dim: bool) -> dict[str, Tensor]:
        assert not keep_batch_dim
        mean = _per_item(per_item, ranks).mean(0)
        return {"value": _squeeze((mean / target_l0 - 1) ** 2, 0)}

    return expected


def tanh_sparsity(scale: float, decoder_norm_weighting: bool = True) -> PerItem:
    return lambda b: reference.per_item_tanh_sparsity(
        b["learned_activations"], b["decoder_weight"] if decoder_norm_weighting else None, scale
    )


def pre_activation(dead_only: bool = True, decoder_norm_weighting: bool = True) -> PerItem:
    return lambda b: reference.per_item_pre_activation(
        b["pre_activations"],
        b["threshold"],
        b["decoder_weight"] if decoder_norm_weighting else None,
        b["dead_mask"] if dead_only else None,
    )


def lp_sparsity(coefficient: float, p: float, root: bool, decoder_norm_weighting: bool) -> PerItem:
    return lambda b: (
        coefficient
        * reference.per_item_lp(
            b["learned_activations"], b["decoder_weight"] if decoder_norm_weighting else None, p, root
        )
    )


def matryoshka_prefixes(prefix_sizes: Sequence[int], feature_reduction: str, reuse: bool) -> PerItem:
    """Per-item error of every prefix, ``[batch, component, prefix]``."""
    return lambda b: reference.per_item_matryoshka_prefixes(
        b["source_activations"],
        b["learned_activations"],
        b["decoder_weight"],
        b.get("decoder_bias"),
        prefix_sizes,
        feature_reduction,
        b["decoded_activations"] if reuse else None,
    )


def quality(formula: Callable[[Tensor, Tensor], Tensor]) -> PerItem:
    """A per-item reconstruction-quality formula of ``reference`` on a step."""
    return lambda b: formula(b["decoded_activations"], b["source_activations"])


def _relative_reconstruction_bias(ranks: Ranks, keep_batch_dim: bool) -> dict[str, Tensor]:
    every = concatenated(_all_items(ranks))
    bias = reference.relative_reconstruction_bias(every["decoded_activations"], every["source_activations"])
    return {"value": _squeeze(bias, 0)}


def _weights(prefix_sizes: Sequence[int], prefix_weights: Sequence[float] | None) -> Tensor:
    return torch.tensor(prefix_weights or [1 / len(prefix_sizes)] * len(prefix_sizes), dtype=torch.float64)


def _per_item(per_item: PerItem, ranks: Ranks) -> Tensor:
    return torch.cat([per_item(step) for step in _all_items(ranks)])


def _item_mean(per_item: PerItem) -> Callable[[Ranks, bool], dict[str, Tensor]]:
    def expected(ranks: Ranks, keep_batch_dim: bool) -> dict[str, Tensor]:
        values = _per_item(per_item, ranks)
        return {"value": _squeeze(values, 1) if keep_batch_dim else _squeeze(values.mean(0), 0)}

    return expected


def _matryoshka(
    prefix_sizes: Sequence[int], prefix_weights: Sequence[float] | None, feature_reduction: str, reuse: bool
) -> Callable[[Ranks, bool], dict[str, Tensor]]:
    prefixes = matryoshka_prefixes(prefix_sizes, feature_reduction, reuse)
    weights = _weights(prefix_sizes, prefix_weights)

    def expected(ranks: Ranks, keep_batch_dim: bool) -> dict[str, Tensor]:
        errors = _per_item(prefixes, ranks)  # [items, component, prefix]
        values = (errors * weights).sum(-1)
        return {
            "value": _squeeze(values, 1) if keep_batch_dim else _squeeze(values.mean(0), 0),
            "compute_prefix_losses": _squeeze(errors.mean(0), 0),
        }

    return expected


def _fvu(explained: bool, centred: bool = False) -> Callable[[Ranks, bool], dict[str, Tensor]]:
    def expected(ranks: Ranks, keep_batch_dim: bool) -> dict[str, Tensor]:
        every = concatenated(_all_items(ranks))
        formula = reference.centred_fvu if centred else reference.fvu
        fvu = formula(every["decoded_activations"], every["source_activations"])
        return {"value": _squeeze(1 - fvu if explained else fvu, 0)}

    return expected


def _density(threshold: float | None = None) -> Callable[[Ranks, bool], dict[str, Tensor]]:
    def expected(ranks: Ranks, keep_batch_dim: bool) -> dict[str, Tensor]:
        density = reference.feature_density(torch.cat(_streams(ranks)), threshold)
        bands = {name: _squeeze(value, 0) for name, value in reference.density_bands(density).items()}
        return {
            "value": _squeeze(density, 0),
            "mean_log10_density": _squeeze(reference.mean_log10_density(density), 0),
            **bands,  # density_bands(), by band
        }

    return expected


def _auxk(
    convention: str, k_aux: int | None = None, prefix_sizes: Sequence[int] | None = None
) -> Callable[[Ranks, bool], dict[str, Tensor]]:
    """The AuxK reference: per-item means, or the ratio pooled over every item of every rank."""

    def expected(ranks: Ranks, keep_batch_dim: bool) -> dict[str, Tensor]:
        terms = [reference.auxk_terms(step, convention, k_aux, prefix_sizes) for step in _all_items(ranks)]
        numerators = torch.cat([numerator for numerator, _ in terms])
        if terms[0][1] is None:
            return {"value": _squeeze(numerators, 1) if keep_batch_dim else _squeeze(numerators.mean(0), 0)}
        values = torch.cat([value for _, value in terms if value is not None])
        return {"value": _squeeze(reference.auxk_pooled_ratio(numerators, values, convention), 0)}

    return expected


def _dead(threshold: float | None = None, steps: bool = False) -> Callable[[Ranks, bool], dict[str, Tensor]]:
    window = WINDOW_STEPS if steps else WINDOW

    def expected(ranks: Ranks, keep_batch_dim: bool) -> dict[str, Tensor]:
        if steps:
            learned = [[step["learned_activations"] for step in rank] for rank in ranks]
            since = reference.lockstep_steps_since_fired(learned, threshold)
        else:
            since = reference.lockstep_items_since_fired(_streams(ranks), threshold)
        return {
            "value": _squeeze((since >= window).sum(-1), 0),
            "steps_since_fired" if steps else "items_since_fired": _squeeze(since, 0),
            "dead_mask": _squeeze(since >= window, 0),
        }

    return expected


def collection_reference(
    coefficient: float | Callable[[int], Tensor],
    *,
    prefix_sizes: Sequence[int] | None = None,
    prefix_weights: Sequence[float] | None = None,
    feature_reduction: str = "mean",
    component_reduction: str = "mean",
    decoder_norm_weighting: bool = False,
    training: bool = False,
) -> Callable[[Ranks, bool], dict[str, Tensor]]:
    """The reference ``(ranks, keep_batch_dim) -> outputs`` of a collection configured so: every key, from the same
    per-item formulas as the metrics'."""

    def expected(ranks: Ranks, keep_batch_dim: bool) -> dict[str, Tensor]:
        terms: dict[str, PerItem] = {
            "l2": l2(feature_reduction),
            "l0": l0,
            "l1": l1,
            "sparsity": sparsity(coefficient, decoder_norm_weighting),
        }
        per_item = {key: _per_item(fn, ranks) for key, fn in terms.items()}
        out: dict[str, Tensor] = {}
        if prefix_sizes is not None:
            errors = _per_item(matryoshka_prefixes(prefix_sizes, feature_reduction, reuse=False), ranks)
            per_item["matryoshka"] = (errors * _weights(prefix_sizes, prefix_weights)).sum(-1)
            for index, size in enumerate(prefix_sizes):
                out[f"matryoshka_prefix_{size}"] = _squeeze(errors[..., index].mean(0), 0)
        for key, values in per_item.items():
            out[key] = _squeeze(values, 1) if keep_batch_dim else _squeeze(values.mean(0), 0)
        if training:
            every = concatenated(_all_items(ranks))
            fvu = reference.fvu(every["decoded_activations"], every["source_activations"])
            density = reference.feature_density(torch.cat(_streams(ranks)))
            dead = reference.dead_features(_streams(ranks), WINDOW)
            out |= {name: _squeeze(value, 0) for name, value in reference.density_bands(density).items()}
            out |= {
                "fvu": _squeeze(fvu, 0),
                "explained_variance": _squeeze(1 - fvu, 0),
                "feature_density": _squeeze(density, 0),
                "mean_log10_feature_density": _squeeze(reference.mean_log10_density(density), 0),
                "dead_features": _squeeze(dead, 0),
                "dead_feature_fraction": _squeeze(dead / D_SAE, 0),
            }
        reconstruction = per_item["matryoshka" if prefix_sizes is not None else "l2"].mean(0)
        total = reconstruction + per_item["sparsity"].mean(0)
        out["loss"] = total.mean() if component_reduction == "mean" else total.sum()
        return out

    return expected


def saelens_jumprelu_preset_reference(
    l0_coefficient: float, pre_act_loss_coefficient: float, bandwidth: float = 0.05
) -> Callable[[Ranks, bool], dict[str, Tensor]]:
    """``presets.saelens("jumprelu", ...)``: summed-over-d MSE + l0_coefficient * L0 + pre_act coefficient * pre-act."""

    def expected(ranks: Ranks, keep_batch_dim: bool) -> dict[str, Tensor]:
        assert not keep_batch_dim
        terms: dict[str, PerItem] = {
            "l2": l2("sum"),
            "l0": l0,
            "l1": l1,
            "l0_loss": jumprelu_l0(bandwidth),
            "pre_act_loss": pre_activation(),
        }
        out = {key: _squeeze(_per_item(fn, ranks).mean(0), 0) for key, fn in terms.items()}
        # no sparsity penalty: SAELens' JumpReLU loss has none (`sparsity_penalty=False`)
        total = out["l2"] + l0_coefficient * out["l0_loss"] + pre_act_loss_coefficient * out["pre_act_loss"]
        out["loss"] = total.mean()
        return out

    return expected


# --- the registry -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One metric (or collection) configuration and its reference.

    Attributes:
        name: The test id.
        factory: ``factory(num_components, **kwargs)``: a fresh metric; kwargs are ``keep_batch_dim``,
            ``nan_strategy``, ``sync_on_compute`` and other torchmetrics arguments.
        reference: ``reference(ranks, keep_batch_dim)``: the float64 outputs (see :func:`outputs`) of the metric fed
            ``ranks``, the batches of each process (one process: one rank).
        requires: The inputs it cannot do without (it reads these; it accepts and ignores the others it is not
            configured to read).
        keep_batch_dim: Whether it takes ``keep_batch_dim``.
        methods: Methods whose values are outputs too (synced like ``compute``).
        lifetime: Output keys that outlive ``reset()`` and whose ``forward`` value is the metric's running value
            after the batch (the dead-feature counters), not the batch's alone.
        per_step: Output keys that depend on how the items are split into steps (a window in steps), so that
            one batch of every item is not the same as the steps.
    """

    name: str
    factory: Callable[..., Any]
    reference: Callable[[Ranks, bool], dict[str, Tensor]]
    requires: tuple[str, ...]
    keep_batch_dim: bool = False
    methods: tuple[str, ...] = ()
    lifetime: frozenset[str] = frozenset()
    per_step: frozenset[str] = frozenset()

    @property
    def is_collection(self) -> bool:
        return self.name.startswith("collection")

    def __call__(self, num_components: int = 2, **kwargs: Any) -> Any:
        return self.factory(num_components, **kwargs)

    def expected(self, *ranks: Sequence[Batch], keep_batch_dim: bool = False) -> dict[str, Tensor]:
        """The reference outputs after ``ranks`` (each the batches of one process, in order)."""
        return self.reference(ranks, keep_batch_dim)


def _coefficients(components: int) -> Tensor:
    """A different sparsity coefficient for each component."""
    return torch.linspace(0.2, 0.6, components)


MATRYOSHKA = ([4, D_SAE], [0.7, 0.3])
MATRYOSHKA_SUM = [3, 7, D_SAE]
COLLECTION_PREFIXES = ([4, D_SAE], [0.25, 0.75])

_TRAINING = {
    "explained_variance": True,
    "d_model": D_MODEL,
    "feature_density": True,
    "dead_feature_window": WINDOW,
    "num_features": D_SAE,
}
_RECONSTRUCTION = ("source_activations", "decoded_activations")
JUMPRELU_INPUTS = ("pre_activations", "threshold")
_COLLECTION_INPUTS = ("source_activations", "learned_activations", "decoded_activations")
_AUXK_INPUTS = (
    "source_activations",
    "decoded_activations",
    "pre_activations",
    "decoder_weight",
    "dead_mask",
    "decoder_bias",
)

_CASES = [
    Case(
        "l2_mean",
        sm.L2ReconstructionLoss,
        _item_mean(l2("mean")),
        _RECONSTRUCTION,
        keep_batch_dim=True,
    ),
    Case(
        "l2_sum",
        lambda c, **kw: sm.L2ReconstructionLoss(c, feature_reduction="sum", **kw),
        _item_mean(l2("sum")),
        _RECONSTRUCTION,
        keep_batch_dim=True,
    ),
    Case("l0", sm.L0NormMetric, _item_mean(l0), ("learned_activations",), keep_batch_dim=True),
    Case("l1", sm.L1AbsoluteLoss, _item_mean(l1), ("learned_activations",), keep_batch_dim=True),
    Case(
        "sparsity",
        lambda c, **kw: sm.SparsityLoss(0.3, c, **kw),
        _item_mean(sparsity(0.3)),
        ("learned_activations",),
        keep_batch_dim=True,
    ),
    Case(
        "sparsity_decoder_norm",
        lambda c, **kw: sm.SparsityLoss(_coefficients(c), c, decoder_norm_weighting=True, **kw),
        _item_mean(sparsity(_coefficients, decoder_norm_weighting=True)),
        ("learned_activations", "decoder_weight"),
        keep_batch_dim=True,
    ),
    Case(
        "sparsity_lp_norm",
        lambda c, **kw: sm.SparsityLoss(0.3, c, decoder_norm_weighting=True, p=1.5, **kw),
        _item_mean(lp_sparsity(0.3, 1.5, root=True, decoder_norm_weighting=True)),
        ("learned_activations", "decoder_weight"),
        keep_batch_dim=True,
    ),
    Case(
        "sparsity_lp_power",
        lambda c, **kw: sm.SparsityLoss(0.3, c, p=0.5, p_root=False, **kw),
        _item_mean(lp_sparsity(0.3, 0.5, root=False, decoder_norm_weighting=False)),
        ("learned_activations",),
        keep_batch_dim=True,
    ),
    Case(
        "jumprelu_l0",
        sm.JumpReLUL0Loss,
        _item_mean(jumprelu_l0(0.05)),
        JUMPRELU_INPUTS,
        keep_batch_dim=True,
    ),
    Case(
        "jumprelu_l0_ste_to_input_quadratic",
        lambda c, **kw: sm.JumpReLUL0Loss(c, bandwidth=0.1, target_l0=4.0, ste_to_input=True, **kw),
        _item_mean(jumprelu_l0(0.1, ste_to_input=True, target_l0=4.0)),
        JUMPRELU_INPUTS,
        keep_batch_dim=True,
    ),
    Case(
        "jumprelu_l0_dictionary_learning_target",
        lambda c, **kw: sm.JumpReLUL0Loss(c, bandwidth=0.05, target_l0=4.0, convention="dictionary_learning", **kw),
        _mean_l0_target(float(torch.tensor(0.05, dtype=torch.float32)), 4.0),  # dictionary_learning rounds it
        JUMPRELU_INPUTS,
    ),
    Case(
        "tanh_sparsity",
        lambda c, **kw: sm.TanhSparsityLoss(c, scale=3.0, **kw),
        _item_mean(tanh_sparsity(3.0)),
        ("learned_activations", "decoder_weight"),
        keep_batch_dim=True,
    ),
    Case(
        "tanh_sparsity_unweighted",
        lambda c, **kw: sm.TanhSparsityLoss(c, decoder_norm_weighting=False, **kw),
        _item_mean(tanh_sparsity(4.0, decoder_norm_weighting=False)),
        ("learned_activations",),
        keep_batch_dim=True,
    ),
    Case(
        "pre_activation",
        sm.PreActivationLoss,
        _item_mean(pre_activation()),
        ("pre_activations", "threshold", "decoder_weight", "dead_mask"),
        keep_batch_dim=True,
    ),
    Case(
        "pre_activation_every_latent",
        lambda c, **kw: sm.PreActivationLoss(c, dead_only=False, decoder_norm_weighting=False, **kw),
        _item_mean(pre_activation(dead_only=False, decoder_norm_weighting=False)),
        JUMPRELU_INPUTS,
        keep_batch_dim=True,
    ),
    Case(
        "matryoshka",
        lambda c, **kw: sm.MatryoshkaReconstructionLoss(MATRYOSHKA[0], c, prefix_weights=MATRYOSHKA[1], **kw),
        _matryoshka(*MATRYOSHKA, "mean", reuse=False),
        ("source_activations", "learned_activations", "decoder_weight"),
        keep_batch_dim=True,
        methods=("compute_prefix_losses",),
    ),
    Case(
        "matryoshka_sum_reuse",
        lambda c, **kw: sm.MatryoshkaReconstructionLoss(
            MATRYOSHKA_SUM, c, feature_reduction="sum", reuse_decoded_activations=True, **kw
        ),
        _matryoshka(MATRYOSHKA_SUM, None, "sum", reuse=True),
        ("source_activations", "learned_activations", "decoded_activations", "decoder_weight"),
        keep_batch_dim=True,
        methods=("compute_prefix_losses",),
    ),
    Case(
        "fvu",
        lambda c, **kw: sm.FractionOfVarianceUnexplained(c, d_model=D_MODEL, **kw),
        _fvu(explained=False),
        _RECONSTRUCTION,
    ),
    Case(
        "explained_variance",
        lambda c, **kw: sm.ExplainedVariance(c, d_model=D_MODEL, **kw),
        _fvu(explained=True),
        _RECONSTRUCTION,
    ),
    Case(
        "feature_density",
        lambda c, **kw: sm.FeatureDensity(D_SAE, c, **kw),
        _density(),
        ("learned_activations",),
        methods=("mean_log10_density", "density_bands"),
    ),
    Case(
        "dead_features",
        lambda c, **kw: sm.DeadFeatures(D_SAE, c, window=WINDOW, **kw),
        _dead(),
        ("learned_activations",),
        methods=("items_since_fired", "dead_mask"),
        lifetime=frozenset({"value", "items_since_fired", "dead_mask"}),
    ),
    # AuxK: k_aux above the ~5 dead latents of 12 (the cap and the scale apply), or OpenAI's top-3 of every latent.
    Case(
        "auxk_openai",
        lambda c, **kw: sm.AuxiliaryKLoss(c, k_aux=3, convention="openai", d_model=D_MODEL, **kw),
        _auxk("openai", 3),
        _AUXK_INPUTS,
    ),
    Case(
        "auxk_sparsify",
        lambda c, **kw: sm.AuxiliaryKLoss(c, k_aux=8, convention="sparsify", d_model=D_MODEL, **kw),
        _auxk("sparsify", 8),
        _AUXK_INPUTS[:-1],
    ),
    Case(
        "auxk_dictionary_learning",
        lambda c, **kw: sm.AuxiliaryKLoss(c, k_aux=7, convention="dictionary_learning", d_model=D_MODEL, **kw),
        _auxk("dictionary_learning", 7),
        _AUXK_INPUTS[:-1],
    ),
    Case(
        "auxk_saelens",
        lambda c, **kw: sm.AuxiliaryKLoss(c, k_aux=6, convention="saelens", **kw),
        _auxk("saelens", 6),
        _AUXK_INPUTS[:-1],
        keep_batch_dim=True,
    ),
    Case(
        "auxk_saelens_default_k",
        lambda c, **kw: sm.AuxiliaryKLoss(c, convention="saelens", **kw),
        _auxk("saelens"),
        _AUXK_INPUTS[:-1],
        keep_batch_dim=True,
    ),
    Case(
        "auxk_saelens_matryoshka",
        lambda c, **kw: sm.AuxiliaryKLoss(c, k_aux=3, convention="saelens", prefix_sizes=[4, 9], **kw),
        _auxk("saelens", 3, [4, 9]),
        ("source_activations", "learned_activations", "pre_activations", "decoder_weight", "dead_mask", "decoder_bias"),
        keep_batch_dim=True,
    ),
    Case(
        "auxk_saev",
        lambda c, **kw: sm.AuxiliaryKLoss(c, k_aux=4, convention="saev", **kw),
        _auxk("saev", 4),
        _AUXK_INPUTS,
        keep_batch_dim=True,
    ),
    Case(
        "feature_density_threshold",
        lambda c, **kw: sm.FeatureDensity(D_SAE, c, firing_threshold=FIRING_THRESHOLD, **kw),
        _density(FIRING_THRESHOLD),
        ("learned_activations",),
        methods=("mean_log10_density", "density_bands"),
    ),
    Case(
        "dead_features_threshold",
        lambda c, **kw: sm.DeadFeatures(D_SAE, c, window=WINDOW, firing_threshold=FIRING_THRESHOLD, **kw),
        _dead(FIRING_THRESHOLD),
        ("learned_activations",),
        methods=("items_since_fired", "dead_mask"),
        lifetime=frozenset({"value", "items_since_fired", "dead_mask"}),
    ),
    Case(
        "dead_features_steps",
        lambda c, **kw: sm.DeadFeatures(D_SAE, c, window=WINDOW_STEPS, window_unit="steps", **kw),
        _dead(steps=True),
        ("learned_activations",),
        methods=("steps_since_fired", "dead_mask"),
        lifetime=frozenset({"value", "steps_since_fired", "dead_mask"}),
        per_step=frozenset({"value", "steps_since_fired", "dead_mask"}),
    ),
    Case(
        "fvu_centred",
        lambda c, **kw: sm.FractionOfVarianceUnexplained(c, d_model=D_MODEL, centred_residual=True, **kw),
        _fvu(explained=False, centred=True),
        _RECONSTRUCTION,
    ),
    Case(
        "explained_variance_centred",
        lambda c, **kw: sm.ExplainedVariance(c, d_model=D_MODEL, centred_residual=True, **kw),
        _fvu(explained=True, centred=True),
        _RECONSTRUCTION,
    ),
    Case(
        "cosine_similarity",
        sm.ReconstructionCosineSimilarity,
        _item_mean(quality(reference.per_item_cosine_similarity)),
        _RECONSTRUCTION,
        keep_batch_dim=True,
    ),
    Case(
        "norm_ratio",
        sm.ReconstructionNormRatio,
        _item_mean(quality(reference.per_item_norm_ratio)),
        _RECONSTRUCTION,
        keep_batch_dim=True,
    ),
    Case(
        "normalized_mse",
        sm.NormalizedMSE,
        _item_mean(quality(reference.per_item_normalized_mse)),
        _RECONSTRUCTION,
        keep_batch_dim=True,
    ),
    Case("relative_reconstruction_bias", sm.RelativeReconstructionBias, _relative_reconstruction_bias, _RECONSTRUCTION),
    Case(
        "collection",
        lambda c, **kw: sm.SparseAutoencoderLoss(c, 0.2, **kw),
        collection_reference(0.2),
        _COLLECTION_INPUTS,
        keep_batch_dim=True,
    ),
    Case(
        "collection_matryoshka",
        lambda c, **kw: sm.SparseAutoencoderLoss(
            c,
            0.2,
            matryoshka_prefix_sizes=COLLECTION_PREFIXES[0],
            matryoshka_prefix_weights=COLLECTION_PREFIXES[1],
            feature_reduction="sum",
            component_reduction="sum",
            **kw,
        ),
        collection_reference(
            0.2,
            prefix_sizes=COLLECTION_PREFIXES[0],
            prefix_weights=COLLECTION_PREFIXES[1],
            feature_reduction="sum",
            component_reduction="sum",
        ),
        (*_COLLECTION_INPUTS, "decoder_weight"),
        keep_batch_dim=True,
    ),
    Case(
        "collection_training",
        lambda c, **kw: sm.SparseAutoencoderLoss(
            c, _coefficients(c), sparsity_decoder_norm_weighting=True, **_TRAINING, **kw
        ),
        collection_reference(_coefficients, decoder_norm_weighting=True, training=True),
        (*_COLLECTION_INPUTS, "decoder_weight"),
        keep_batch_dim=True,
        lifetime=frozenset({"dead_features", "dead_feature_fraction"}),
    ),
    Case(
        "collection_preset_saelens_jumprelu",
        lambda c, **kw: sm.presets.saelens(
            "jumprelu", l0_coefficient=0.3, pre_act_loss_coefficient=0.7, num_components=c, **kw
        ),
        saelens_jumprelu_preset_reference(0.3, 0.7),
        (*_COLLECTION_INPUTS, *JUMPRELU_INPUTS, "decoder_weight", "dead_mask"),
    ),
]


#: Every case by name.
CASES: dict[str, Case] = {case.name: case for case in _CASES}


def params(cases: Sequence[Case] | None = None, *, marks: dict[str, Any] | None = None) -> list[Any]:
    """``pytest.param(case, id=name)`` for each case (every case by default), with ``marks`` by name."""
    marks = marks or {}
    return [pytest.param(case, id=case.name, marks=marks.get(case.name, ())) for case in cases or CASES.values()]


def metric_cases() -> list[Case]:
    """The cases that are one metric, not a collection."""
    return [case for case in CASES.values() if not case.is_collection]


# --- reading and comparing ----------------------------------------------------------------------------------------


def members(metric: Any) -> list[Any]:
    """The metrics whose states make up ``metric``: its members for a collection, else itself."""
    return list(metric.values(copy_state=False)) if isinstance(metric, sm.SparseAutoencoderLoss) else [metric]


def outputs(case: Case, metric: Any) -> dict[str, Tensor]:
    """What a user reads from the metric: ``compute()`` and the case's methods (a dict-valued one by its keys)."""
    values = dict(reference.as_dict(metric.compute()))
    for name in case.methods:
        value = getattr(metric, name)()
        values |= value if isinstance(value, dict) else {name: value}
    return values


def forward_outputs(value: Any) -> dict[str, Tensor]:
    return reference.as_dict(value)


def assert_close(actual: dict[str, Tensor], expected: dict[str, Tensor], *, msg: str = "", **tolerance: Any) -> None:
    """Same keys, shapes and values (``RTOL``/``ATOL`` by default; NaN equals NaN)."""
    tolerance = {"rtol": RTOL, "atol": ATOL, "equal_nan": True} | tolerance
    assert set(actual) == set(expected), msg
    for key, value in expected.items():
        got = actual[key]
        assert got.shape == value.shape, f"{msg} {key}: shape {list(got.shape)} != {list(value.shape)}"
        if value.dtype == torch.bool:
            assert torch.equal(got, value), f"{msg} {key}"
        else:
            torch.testing.assert_close(
                got.double(), value.double(), msg=lambda text, key=key: f"{msg} {key}: {text}", **tolerance
            )


def assert_identical(actual: dict[str, Tensor], expected: dict[str, Tensor], *, msg: str = "") -> None:
    """Same keys, dtypes and bits."""
    assert set(actual) == set(expected), msg
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, f"{msg} {key}"
        assert torch.equal(actual[key], value) or (
            actual[key].isnan().equal(value.isnan()) and torch.equal(actual[key].nan_to_num(), value.nan_to_num())
        ), f"{msg} {key}: {actual[key]} != {value}"


def state(metric: Any) -> list[tuple[str, Any]]:
    """Every state of every member (cloned) and each update count, to check that nothing changed."""
    snapshot: list[tuple[str, Any]] = []
    for index, member in enumerate(members(metric)):
        for name, value in member.metric_state.items():
            cloned = [row.clone() for row in value] if isinstance(value, list) else value.clone()
            snapshot.append((f"{index}.{name}", cloned))
        snapshot.append((f"{index}.update_count", member.update_count))
    return snapshot


def assert_same_state(before: list[tuple[str, Any]], after: list[tuple[str, Any]]) -> None:
    assert [name for name, _ in before] == [name for name, _ in after]
    for (name, old), (_, new) in zip(before, after, strict=True):
        if isinstance(old, list):
            assert len(old) == len(new), name
            assert all(torch.equal(a, b) for a, b in zip(old, new, strict=True)), name
        elif isinstance(old, Tensor):
            assert old.dtype == new.dtype, name
            assert torch.equal(old, new), name
        else:
            assert old == new, name


def assert_rejected(metric: Any, inputs: Batch, error: type[Exception], fragments: Sequence[str]) -> None:
    """Both ``update`` and ``forward`` raise ``error`` whose message has ``fragments``, and change no state or count."""
    for method in (metric.update, metric.forward):
        before = state(metric)
        with pytest.raises(error) as raised:
            method(**inputs)
        for fragment in fragments:
            assert fragment in str(raised.value), (method.__name__, str(raised.value))
        assert_same_state(before, state(metric))
