r"""The auxiliary-K (AuxK) loss of TopK / BatchTopK SAEs: dead latents reconstruct the residual of the live ones.

.. math:: \hat e = \operatorname{act}\big(\operatorname{topk}_{k_{aux}}(h \text{ over dead latents})\big)\, W_{dec}
   \;(+\, b_{dec}), \qquad \mathrm{AuxK} = s \cdot \frac{\operatorname{reduce}\,(\hat e - r)^2}{\text{normaliser}}

with :math:`r = x - \hat x` detached. Each convention reproduces one peer's value and gradients (its outer
coefficient left out):

- ``"openai"`` (``sparse_autoencoder/train.py``): ``k_aux`` 256 over every latent with live ones set to 0, ReLU,
  ``b_dec`` added to the decode and (detached) to the target, normalised by the target's batch variance, means over
  ``(batch, d)``; ``nan_to_num`` (a zero-variance batch gives float32's max). No gradient to the source.
- ``"sparsify"`` (``sparse_coder.py``): ReLU'd pre-activations, ``k = min(d_model // 2, n_dead)``, scale
  ``min(n_dead / k_aux, 1)``, no ``b_dec``, sums over ``(batch, d)`` over the source's total variance
  :math:`\sum (y - \bar y)^2`. Its fused encoder drops the auxiliary gradient: none reaches ``pre_activations``.
- ``"dictionary_learning"`` (``trainers/top_k.py``): ReLU, ``k = min(d_model // 2, n_dead)``, no scale, no
  ``b_dec``, ``mean_b Σ_d`` over the residual's variance ``mean_b Σ_d (r - r̄)²``, ``nan_to_num``; 0 without dead.
- ``"saelens"`` (``topk_sae.py``): raw pre-activations, ``k = min(d_model // 2, n_dead)``, scale, no ``b_dec``,
  ``mean_b Σ_d``, no normaliser; with ``prefix_sizes`` the Matryoshka sum over levels.
- ``"saev"`` (``nn/modeling.py AuxK``): raw pre-activations, ``k = min(512, n_dead)``, no scale, ``b_dec`` in the
  decode, mean over ``(batch, d)``, no normaliser.

The top-k runs over a fixed ``min(k_aux, d_sae)`` latents with the live ones masked; the picks that are not dead are
then zeroed, so a varying number of dead latents never changes a shape nor synchronises with the device.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from torch.nn.functional import embedding_bag

# A module, not its class: _batch imports this package's modules (read at call time, not while importing).
from sparse_metrics import _batch as batch_module
from sparse_metrics._compile import CompiledWithFallback
from sparse_metrics._sharding import FeatureSharding
from sparse_metrics._validation import autocast_disabled, check_prefix_sizes, computation_dtype
from sparse_metrics.functional._squares import squared_norms
from sparse_metrics.functional.explained_variance import _squared_deviation
from sparse_metrics.functional.matryoshka import _local_prefix_widths, _partial_prefix_decodes

__all__ = ["AUXILIARY_K_CONVENTIONS", "AuxiliaryKConvention", "auxiliary_k_loss"]

AuxiliaryKConvention = Literal["openai", "sparsify", "dictionary_learning", "saelens", "saev"]
#: The conventions, each a peer's AuxK.
AUXILIARY_K_CONVENTIONS: tuple[str, ...] = get_args(AuxiliaryKConvention)

_FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclasses.dataclass(frozen=True)
class _Rule:
    """How one peer forms its AuxK."""

    relu: bool  # ReLU the picked pre-activations
    cap: bool  # pick min(k_aux, n_dead) dead latents (OpenAI: k_aux latents, the live ones at 0)
    scale: bool  # times min(n_dead / k_aux, 1)
    bias_in_decode: bool  # b_dec added to the auxiliary decode (with its gradient)
    normaliser: Literal["residual", "source"] | None
    feature_mean: bool  # mean over d (else sum)
    nan_to_num: bool  # the peer's .nan_to_num(0): NaN -> 0, inf -> float32 max
    zero_without_dead: bool  # the peer returns 0 when no latent is dead
    grad_to_pre_activations: bool
    default_k_aux: int | None  # None: d_model // 2


RULES: dict[str, _Rule] = {
    "openai": _Rule(True, False, False, True, "residual", True, True, False, True, 256),
    "sparsify": _Rule(True, True, True, False, "source", False, False, True, False, None),
    "dictionary_learning": _Rule(True, True, False, False, "residual", False, True, True, True, None),
    "saelens": _Rule(False, True, True, False, None, False, False, True, True, None),
    "saev": _Rule(False, True, False, True, None, True, False, True, True, 512),
}
#: The conventions whose value is a batch-level ratio (no per-item value).
NORMALISED = tuple(name for name, rule in RULES.items() if rule.normaliser is not None)
#: The conventions that define a Matryoshka AuxK (``prefix_sizes``).
MATRYOSHKA_CONVENTIONS = ("saelens",)


class AuxiliaryKTerms(NamedTuple):
    """One batch's AuxK, per item.

    Attributes:
        squared_error: ``[batch, component]``: each item's (scaled) squared error of the auxiliary decode, reduced
            over ``d`` as the convention does, differentiable; the convention's value is its batch mean (per-item
            conventions) or its batch sum over the normaliser (normalised ones).
        normaliser_input: ``[batch, component, d_model]``: the values whose spread normalises (the residual or the
            source), or None.
    """

    squared_error: Tensor
    normaliser_input: Tensor | None
    any_dead: Tensor | None = None


def check_convention(convention: object, prefix_sizes: Sequence[int] | None) -> _Rule:
    """The rule of ``convention``; ``ValueError`` naming the valid ones, or where ``prefix_sizes`` is undefined."""
    if convention not in RULES:
        raise ValueError(f"`convention` must be one of {list(AUXILIARY_K_CONVENTIONS)}, got {convention!r}.")
    if prefix_sizes is not None:
        if convention not in MATRYOSHKA_CONVENTIONS:
            raise ValueError(
                "`prefix_sizes` (a Matryoshka AuxK) is defined only by the convention(s) "
                f"{list(MATRYOSHKA_CONVENTIONS)} (SAELens' matryoshka_batchtopk), got convention={convention!r}."
            )
        check_prefix_sizes(prefix_sizes)
    return RULES[str(convention)]


def resolve_k_aux(rule: _Rule, k_aux: int | None, d_model: int, d_sae: int, convention: str) -> int:
    """The convention's ``k_aux`` (its default where None), checked against the widths."""
    value = k_aux if k_aux is not None else rule.default_k_aux if rule.default_k_aux is not None else d_model // 2
    if value < 1:
        raise ValueError(
            f"`k_aux` must be at least 1; convention={convention!r} defaults to d_model // 2 = {value} for "
            f"d_model={d_model}: pass `k_aux`."
        )
    if not rule.cap and value > d_sae:
        raise ValueError(
            f"`k_aux`={value} exceeds d_sae={d_sae}: convention={convention!r} takes the top k_aux of every latent "
            "(torch.topk fails there); pass a smaller `k_aux`."
        )
    return value


def _masked(pre: Tensor, dead: Tensor, rule: _Rule) -> Tensor:
    """The values the top-k ranks, the live latents masked.

    OpenAI multiplies the live latents' pre-activations by 0 (a NaN there stays NaN); the others mask them to -inf.
    """
    if not rule.grad_to_pre_activations:
        pre = pre.detach()
    return torch.where(dead, pre, -torch.inf) if rule.cap else pre * dead


def _picked_values(masked: Tensor, dead: Tensor, indices: Tensor, values: Tensor, rule: _Rule) -> Tensor:
    """The activations of the picks ``indices`` (``values`` are ``masked`` there): live picks zeroed, the ReLU."""
    if rule.cap:  # fewer dead latents than k: the live picks (at -inf) are not picks
        picked_dead = dead.unsqueeze(0).expand(masked.shape[0], -1, -1).gather(-1, indices)
        values = torch.where(picked_dead, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return values.relu() if rule.relu else values


#: The picks are decoded alone (an embedding bag, as sparsify's and OpenAI's kernels do) where they are at most
#: this fraction of the latents, else scattered into a dense ``[batch, d_sae]`` product (as dictionary_learning,
#: SAELens and saev write it). The two give the same values and gradients (every decoder row gets one, zero where no
#: latent of it is picked), up to rounding; they differ in cost: on a CPU the bag's backward (an index-add per pick)
#: overtakes the product's near k/d_sae = 1/32 (batch 4096, d_model 512: k 256 of 16384 latents, bag 3x faster; 256
#: of 1024, the product 2x faster).
SPARSE_DECODE_FRACTION = 1 / 32


def _decode_picks(shape: torch.Size, indices: Tensor, values: Tensor, weight: Tensor) -> Tensor:
    """``[batch, component, d_model]``: the picks' activations ``values`` at latents ``indices`` decoded (no bias).

    Picks of value 0 may repeat an index (a shard's picks that another shard owns): they add nothing.
    """
    batch, components, width = shape
    k = indices.shape[-1]
    if k > width * SPARSE_DECODE_FRACTION:
        dense = torch.zeros(shape, dtype=values.dtype, device=values.device).scatter_add_(
            -1, indices, values
        )  # in place: no copy
        return _decode(dense, weight)
    offsets = torch.arange(components, device=indices.device).mul_(width).view(1, components, 1)
    bags = embedding_bag(
        (indices + offsets).reshape(batch * components, k),
        weight.reshape(components * width, weight.shape[-1]),
        per_sample_weights=values.reshape(batch * components, k),
        mode="sum",
    )
    return bags.view(batch, components, weight.shape[-1])


def _auxiliary_decode(
    pre: Float[Tensor, "batch component width"],
    dead: Bool[Tensor, "component width"],
    weight: Float[Tensor, "component width d_model"],
    k_aux: int,
    rule: _Rule,
) -> Tensor:
    """``[batch, component, d_model]``: the decode of the picked dead latents' activations (no bias)."""
    masked = _masked(pre, dead, rule)
    values, indices = masked.topk(min(k_aux, pre.shape[-1]), dim=-1, sorted=False)
    return _decode_picks(pre.shape, indices, _picked_values(masked, dead, indices, values, rule), weight)


def _sharded_auxiliary_decodes(
    pre: Float[Tensor, "batch component d_local"],
    dead: Bool[Tensor, "component d_local"],
    weight: Float[Tensor, "component d_local d_model"],
    k_aux: int,
    rule: _Rule,
    levels: Sequence[tuple[int, int]],
    sharding: FeatureSharding,
    prefix_decodes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Each level's auxiliary decode over the WHOLE dictionary, from this shard's slice of the features.

    ``levels`` are global feature ranges ``[start, stop)`` (one, ``[0, d_sae)``, without Matryoshka). Per level, each
    shard proposes its own top ``k`` (the live ones masked), the candidates of every shard are gathered with the
    shards' dead counts (ONE all-gather: values, global indices and counts, exactly), and the top ``k`` of
    them are the global top ``k``; each shard decodes the picks it owns, from its own (differentiable) activations,
    and the partial decodes are summed over the shards in ONE all-reduce with identity backward (together with the
    Matryoshka prefixes' partial decodes ``prefix_decodes``, when given). Returns the decodes ``[level, batch,
    component, d_model]``, the dead counts ``[level, component]`` and the summed ``prefix_decodes``.
    """
    width = pre.shape[-1]
    offset = sharding.offset(width)
    masked = _masked(pre, dead, rule)
    # Values, global indices and counts travel exactly in one dtype: float32 holds every integer up to 2**24 and
    # every float32/16 value; float64 inputs or a larger dictionary take float64.
    exact = width * sharding.size <= 2**24 and pre.dtype != torch.float64
    wire = torch.float32 if exact else torch.float64
    candidates, counts, spans = [], [], []
    for start, stop in levels:
        local_start, local_stop = (min(max(bound - offset, 0), width) for bound in (start, stop))
        k = min(k_aux, stop - start)
        values, indices = masked[..., local_start:local_stop].detach().topk(min(k, local_stop - local_start), dim=-1)
        padding = k - values.shape[-1]  # a shard with fewer of the level's latents than k: never-chosen fillers
        values = torch.nn.functional.pad(values.to(wire), (0, padding), value=-torch.inf)
        indices = torch.nn.functional.pad((indices + offset + local_start).to(wire), (0, padding), value=-1)
        candidates.append(torch.stack([values, indices]))
        counts.append(dead[:, local_start:local_stop].sum(dim=-1, dtype=wire))
        spans.append((local_start, local_stop, k))
    local = torch.cat([*(candidate.reshape(-1) for candidate in candidates), *counts])
    gathered = sharding.gather(local.unsqueeze(0), dim=0)  # [shard, everything]
    partials, at = [], 0
    for candidate, (local_start, local_stop, k) in zip(candidates, spans, strict=True):
        pieces = gathered[:, at : at + candidate.numel()].reshape(sharding.size, *candidate.shape)
        at += candidate.numel()
        every_value = torch.cat(list(pieces[:, 0]), dim=-1)  # [batch, component, shard * k]
        every_index = torch.cat(list(pieces[:, 1]), dim=-1)
        where = every_value.topk(k, dim=-1).indices
        chosen = every_index.gather(-1, where).long() - offset
        owned = (chosen >= local_start) & (chosen < local_stop)
        local_indices = torch.where(owned, chosen, 0)
        values = torch.where(owned, masked.gather(-1, local_indices), 0.0)
        partials.append(
            _decode_picks(pre.shape, local_indices, _picked_values(masked, dead, local_indices, values, rule), weight)
        )
    level_counts = gathered[:, at:].reshape(sharding.size, len(levels), dead.shape[0]).sum(dim=0)
    sums = {"auxiliary": torch.stack(partials)}
    if prefix_decodes is not None:
        sums["prefixes"] = prefix_decodes
    summed = sharding.sum(sums)
    return summed["auxiliary"], level_counts.to(pre.dtype), summed.get("prefixes")


def _decode(activations: Tensor, weight: Tensor) -> Tensor:
    return torch.einsum("bcf,cfd->bcd", activations, weight)


def _scale(n_dead: Tensor, k_aux: int, rule: _Rule, dtype: torch.dtype) -> Tensor | None:
    """``[component]``: ``min(n_dead / k_aux, 1)`` where the convention scales, 0 where none is dead and it says so."""
    n_dead = n_dead.to(dtype)
    scale = (n_dead / k_aux).clamp(max=1) if rule.scale else None
    if rule.zero_without_dead:
        live_only = n_dead == 0
        scale = torch.where(live_only, 0.0, 1.0 if scale is None else scale).to(dtype)
    return scale


def _squared(auxiliary: Tensor, target: Tensor, scale: Tensor | None, rule: _Rule) -> Tensor:
    per_item = squared_norms(auxiliary - target, mean=rule.feature_mean)
    if scale is None:
        return per_item
    # where, not a product: a 0 scale must give 0 even for an infinite error, as the peers' early return does
    return torch.where(scale > 0, per_item * scale, torch.zeros((), dtype=per_item.dtype, device=per_item.device))


def auxiliary_k_terms(
    source: Tensor,
    decoded: Tensor | None,
    pre_activations: Tensor,
    decoder_weight: Tensor,
    dead_mask: Tensor,
    decoder_bias: Tensor | None,
    *,
    rule: _Rule,
    k_aux: int,
    learned: Tensor | None = None,
    prefix_sizes: Sequence[int] | None = None,
    sharding: FeatureSharding | None = None,
) -> AuxiliaryKTerms:
    """The per-item terms of validated ``[batch, component, ...]`` inputs (decoder ``[component, d_sae, d_model]``).

    Under a feature ``sharding`` the per-feature inputs are this shard's slice; the terms are the whole dictionary's.
    """
    tensors = [t for t in (source, decoded, pre_activations, decoder_weight, decoder_bias, learned) if t is not None]
    dtype = computation_dtype(*tensors)
    with autocast_disabled(source.device):
        source = source.to(dtype)
        pre = pre_activations.to(dtype)
        weight = decoder_weight.to(dtype)
        bias = None if decoder_bias is None else decoder_bias.to(dtype)
        if prefix_sizes is not None:
            return _matryoshka_terms(source, pre, weight, dead_mask, bias, learned, rule, k_aux, prefix_sizes, sharding)
        assert decoded is not None
        residual = (source - decoded.to(dtype)).detach()
        if sharding is None:
            auxiliary = _auxiliary_decode(pre, dead_mask, weight, k_aux, rule)
            n_dead = dead_mask.sum(dim=-1, dtype=dtype)
        else:
            d_sae = pre.shape[-1] * sharding.size
            decodes, counts, _ = _sharded_auxiliary_decodes(pre, dead_mask, weight, k_aux, rule, [(0, d_sae)], sharding)
            auxiliary, n_dead = decodes[0], counts[0]
        target = residual
        if rule.bias_in_decode:
            assert bias is not None
            auxiliary = auxiliary + bias
            if rule.normaliser is not None:  # OpenAI: x - x̂.detach() + b_dec.detach(), b_dec cancels in the value
                target = residual + bias.detach()
        squared = _squared(auxiliary, target, _scale(n_dead, k_aux, rule, dtype), rule)
        normaliser_input = {"residual": target, "source": source, None: None}[rule.normaliser]
        any_dead = n_dead > 0 if rule.zero_without_dead else None
        return AuxiliaryKTerms(squared, normaliser_input, any_dead)


def _matryoshka_terms(
    source: Tensor,
    pre: Tensor,
    weight: Tensor,
    dead: Tensor,
    bias: Tensor | None,
    learned: Tensor | None,
    rule: _Rule,
    k_aux: int,
    prefix_sizes: Sequence[int],
    sharding: FeatureSharding | None = None,
) -> AuxiliaryKTerms:
    """SAELens' Matryoshka AuxK: per level, its dead latents reconstruct the residual of the prefix through it."""
    assert learned is not None
    assert bias is not None
    d_sae = pre.shape[-1] * (1 if sharding is None else sharding.size)
    widths = [*prefix_sizes] if prefix_sizes[-1] == d_sae else [*prefix_sizes, d_sae]
    features = learned.to(pre.dtype)
    if sharding is not None:
        return _sharded_matryoshka_terms(source, pre, weight, dead, bias, features, rule, k_aux, widths, sharding)
    prefix_decoded = bias  # decoded = f_level W_level + decoded, level by level, as SAELens' _iterable_decode
    total: Tensor | None = None
    start = 0
    for end in widths:
        level_weight = weight[:, start:end]
        prefix_decoded = _decode(features[..., start:end], level_weight) + prefix_decoded
        residual = (source - prefix_decoded).detach()
        level_dead = dead[:, start:end]
        auxiliary = _auxiliary_decode(pre[..., start:end], level_dead, level_weight, k_aux, rule)
        n_dead = level_dead.sum(dim=-1, dtype=pre.dtype)
        squared = _squared(auxiliary, residual, _scale(n_dead, k_aux, rule, pre.dtype), rule)
        total = squared if total is None else total + squared
        start = end
    assert total is not None
    return AuxiliaryKTerms(total, None)


def _sharded_matryoshka_terms(
    source: Tensor,
    pre: Tensor,
    weight: Tensor,
    dead: Tensor,
    bias: Tensor,
    features: Tensor,
    rule: _Rule,
    k_aux: int,
    widths: Sequence[int],
    sharding: FeatureSharding,
) -> AuxiliaryKTerms:
    """:func:`_matryoshka_terms` from a shard's slice of the features.

    The levels' prefix decodes and auxiliary decodes cross the feature group together: one all-gather of top-k
    candidates, one all-reduce of the partial decodes.
    """
    local_widths = _local_prefix_widths(widths, sharding.offset(pre.shape[-1]), pre.shape[-1])
    levels = list(itertools.pairwise([0, *widths]))
    partial_prefixes = _partial_prefix_decodes(features, weight, local_widths, bias)
    auxiliaries, counts, prefixes = _sharded_auxiliary_decodes(
        pre, dead, weight, k_aux, rule, levels, sharding, prefix_decodes=partial_prefixes
    )
    assert prefixes is not None
    total: Tensor | None = None
    for auxiliary, n_dead, prefix_decoded in zip(auxiliaries, counts, prefixes, strict=True):
        residual = (source - (prefix_decoded + bias)).detach()
        squared = _squared(auxiliary, residual, _scale(n_dead, k_aux, rule, pre.dtype), rule)
        total = squared if total is None else total + squared
    assert total is not None
    return AuxiliaryKTerms(total, None)


def batch_ratio(terms: AuxiliaryKTerms, rule: _Rule, variance: Tensor | None = None) -> Float[Tensor, " component"]:
    """The normalised conventions' batch value ``[component]``, differentiable as the peer's.

    ``variance`` is the normaliser's ``Σ_{b,d} (v - v̄)²`` ``[component]`` where the caller has it (computed here
    otherwise): sparsify sums over ``(batch, d)``, dictionary_learning sums over ``d`` and OpenAI means over ``d``
    per item, each summed over the batch (0/0 for no item).
    """
    assert terms.normaliser_input is not None
    values = terms.normaliser_input
    if variance is None:
        variance = _squared_deviation(values, values.mean(dim=0))
    denominator = variance / values.shape[-1] if rule.feature_mean else variance
    ratio = finish_ratio(terms.squared_error.sum(dim=0), denominator, rule)
    if terms.any_dead is None:
        return ratio
    return torch.where(terms.any_dead, ratio, torch.zeros((), dtype=ratio.dtype, device=ratio.device))


def finish_ratio(numerator: Tensor, variance: Tensor, rule: _Rule) -> Tensor:
    """Numerator over the normaliser, with the peer's ``nan_to_num`` where both are finite.

    A zero normaliser gives float32's max (x/0) or 0 (0/0), as the peers; a NaN or infinite input still shows (the
    peers' ``nan_to_num`` would hide it as 0).
    """
    ratio = numerator / variance
    if not rule.nan_to_num:
        return ratio
    finite_parts = numerator.isfinite() & variance.isfinite()
    return torch.where(finite_parts, ratio.nan_to_num(0.0, posinf=_FLOAT32_MAX), ratio)


def auxiliary_k_loss(
    source_activations: Float[Tensor, "batch *component d_model"],
    decoded_activations: Float[Tensor, "batch *component d_model"] | None,
    pre_activations: Float[Tensor, "batch *component d_sae"],
    decoder_weight: Float[Tensor, "*component d_sae d_model"],
    dead_mask: Bool[Tensor, "*component d_sae"],
    decoder_bias: Float[Tensor, "*component d_model"] | None = None,
    *,
    k_aux: int | None = None,
    convention: AuxiliaryKConvention = "openai",
    learned_activations: Float[Tensor, "batch *component d_sae"] | None = None,
    prefix_sizes: Sequence[int] | None = None,
    keep_batch_dim: bool = False,
) -> Float[Tensor, "..."]:
    """The AuxK loss of one batch, as the convention's peer computes it (without its outer coefficient).

    Args:
        source_activations: The SAE's input ``x``, ``[batch, d_model]`` or ``[batch, component, d_model]``.
        decoded_activations: Its reconstruction ``x̂`` (same shape); unused with ``prefix_sizes``.
        pre_activations: The encoder's pre-activations ``h`` (before TopK and ReLU), ``[batch, *component, d_sae]``.
        decoder_weight: Feature-major ``W_dec`` ``[*component, d_sae, d_model]``. SAELens' TopK SAEs decode
            ``f / ‖W_dec,i‖`` by default: pass ``W_dec / W_dec.norm(dim=-1, keepdim=True)`` to reproduce them.
        dead_mask: ``[*component, d_sae]`` booleans, True for a dead latent.
        decoder_bias: ``b_dec`` ``[*component, d_model]``; required by ``"openai"``, ``"saev"`` and Matryoshka.
        k_aux: How many dead latents decode; None takes the convention's default (256; ``d_model // 2``; 512).
        convention: ``"openai"``, ``"sparsify"``, ``"dictionary_learning"``, ``"saelens"`` or ``"saev"``.
        learned_activations: The SAE's activations ``f``, required with ``prefix_sizes``.
        prefix_sizes: SAELens' Matryoshka widths (cumulative, global feature indices; d_sae appended when
            missing): the sum over levels of each level's AuxK. ``"saelens"`` only.
        keep_batch_dim: Per-item values ``[batch, *component]`` (``"saelens"`` and ``"saev"`` only).

    Returns:
        ``[*component]`` (0-d without a component axis), ``[batch, *component]`` with ``keep_batch_dim``,
        differentiable as the peer's loss.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import auxiliary_k_loss
        >>> source = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> decoded = torch.zeros(2, 2)  # the residual is the source
        >>> pre = torch.tensor([[3.0, 1.0, -1.0], [0.0, 2.0, 5.0]])
        >>> decoder = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> dead = torch.tensor([False, True, True])
        >>> auxiliary_k_loss(source, decoded, pre, decoder, dead, k_aux=1, convention="saelens")
        tensor(18.)
    """
    rule = check_convention(convention, prefix_sizes)
    inputs = {
        "source_activations": source_activations,
        "decoded_activations": decoded_activations,
        "pre_activations": pre_activations,
        "decoder_weight": decoder_weight,
        "dead_mask": dead_mask,
        "decoder_bias": decoder_bias,
        "learned_activations": learned_activations,
    }
    batch = batch_module.SaeBatch(inputs, num_components=None, owner="auxiliary_k_loss")
    terms = batch_terms(batch, rule, str(convention), k_aux, prefix_sizes, "auxiliary_k_loss")
    if keep_batch_dim and rule.normaliser is not None:
        raise ValueError(
            f"`keep_batch_dim=True` needs a per-item value, which convention={convention!r} (a batch ratio) lacks; "
            "it is defined for 'saelens' and 'saev'."
        )
    if rule.normaliser is not None:
        value = batch_ratio(terms, rule)
    else:
        value = terms.squared_error if keep_batch_dim else terms.squared_error.mean(dim=0)
    return value if batch.has_component_axis else value.squeeze(-1)


def batch_terms(
    batch: batch_module.SaeBatch,
    rule: _Rule,
    convention: str,
    k_aux: int | None,
    prefix_sizes: Sequence[int] | None,
    owner: str,
) -> AuxiliaryKTerms:
    """Read and check the inputs of a :class:`~sparse_metrics._batch.SaeBatch`; the per-item terms."""
    source = batch.require("source_activations", owner)
    pre = batch.require("pre_activations", owner)
    weight = batch.require("decoder_weight", owner)
    dead = batch.require("dead_mask", owner)
    learned = decoded = None
    needs_bias = rule.bias_in_decode or prefix_sizes is not None
    why = (
        "It enters the value and gradient of the Matryoshka AuxK (each level's prefix decode)."
        if prefix_sizes is not None
        else f"It enters the auxiliary decode of convention={convention!r}."
    )
    bias = batch.require("decoder_bias", owner, why) if needs_bias else None
    if prefix_sizes is not None:
        learned = batch.require("learned_activations", owner, "It gives each Matryoshka level's residual.")
        check_prefix_sizes(prefix_sizes, pre.shape[-1] * batch.num_shards)
    else:
        decoded = batch.require("decoded_activations", owner)
    if weight.shape[-1] != source.shape[-1]:
        raise ValueError(
            f"`decoder_weight` must have d_model={source.shape[-1]} (the width of `source_activations`) in its last "
            f"axis, got shape {batch.shape('decoder_weight')}."
        )
    resolved = resolve_k_aux(rule, k_aux, source.shape[-1], pre.shape[-1] * batch.num_shards, convention)
    terms = _compiled_auxiliary_k_terms if batch.compiled and batch.sharding is None else auxiliary_k_terms
    return terms(
        source,
        decoded,
        pre,
        weight,
        dead,
        bias,
        rule=rule,
        k_aux=resolved,
        learned=learned,
        prefix_sizes=prefix_sizes,
        sharding=batch.sharding,
    )


# The collection's compiled=True path (compiled at its first call; not under a feature sharding, whose collectives
# stay eager).
_compiled_auxiliary_k_terms = CompiledWithFallback(auxiliary_k_terms)
