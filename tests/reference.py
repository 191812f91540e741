"""Hand-written float64 reference formulas, independent of the package, one item at a time where it is cheap.

Every input is ``[batch, component, feature]``; every per-item result ``[batch, component]``.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def per_item_l2(decoded: Tensor, source: Tensor, feature_reduction: str = "mean") -> Tensor:
    squared = (decoded.double() - source.double()) ** 2
    return squared.mean(-1) if feature_reduction == "mean" else squared.sum(-1)


def per_item_cosine_similarity(decoded: Tensor, source: Tensor) -> Tensor:
    """cos(x, x_hat) per item, float64, no epsilon (SAELens and dictionary_learning: x / ||x|| . x_hat / ||x_hat||)."""
    x, x_hat = source.double(), decoded.double()
    return ((x / x.norm(dim=-1, keepdim=True)) * (x_hat / x_hat.norm(dim=-1, keepdim=True))).sum(-1)


def per_item_norm_ratio(decoded: Tensor, source: Tensor) -> Tensor:
    """||x_hat|| / ||x|| per item, float64, a source norm below 1e-4 replaced by 1 (SAELens' l2_ratio)."""
    norm = source.double().norm(dim=-1)
    guarded = torch.where(norm < 1e-4, torch.ones_like(norm), norm)
    return decoded.double().norm(dim=-1) / guarded


def per_item_normalized_mse(decoded: Tensor, source: Tensor) -> Tensor:
    """OpenAI's normalised MSE per item, float64: mean_d (x_hat - x)^2 / mean_d x^2."""
    x, x_hat = source.double(), decoded.double()
    return ((x_hat - x) ** 2).mean(-1) / (x**2).mean(-1)


def relative_reconstruction_bias(decoded: Tensor, source: Tensor) -> Tensor:
    """The Gated SAE paper's gamma over every item, float64: mean_b ||x_hat||^2 / mean_b <x, x_hat>, [component]."""
    x, x_hat = source.double(), decoded.double()
    return (x_hat.norm(dim=-1) ** 2).mean(0) / (x * x_hat).sum(-1).mean(0)


def per_item_l1(learned: Tensor) -> Tensor:
    return learned.double().abs().sum(-1)


def per_item_l0(learned: Tensor) -> Tensor:
    return (learned != 0).double().sum(-1)


def per_item_matryoshka_prefixes(
    source: Tensor,
    learned: Tensor,
    decoder_weight: Tensor,
    decoder_bias: Tensor | None,
    prefix_sizes: Sequence[int],
    feature_reduction: str = "mean",
    decoded: Tensor | None = None,
) -> Tensor:
    """``[batch, component, prefix]``: one separate, full decode per prefix (the SAELens way).

    With ``decoded`` (``reuse_decoded_activations=True``), the whole-dictionary prefix's error is that of ``decoded``.
    """
    source, learned, weight = source.double(), learned.double(), decoder_weight.double()
    errors = []
    for size in prefix_sizes:
        if decoded is not None and size == learned.shape[-1]:
            errors.append(per_item_l2(decoded, source, feature_reduction))
            continue
        prefix_decoded = torch.einsum("bcf,cfd->bcd", learned[..., :size], weight[:, :size])
        if decoder_bias is not None:
            prefix_decoded = prefix_decoded + decoder_bias.double()
        errors.append(per_item_l2(prefix_decoded, source, feature_reduction))
    return torch.stack(errors, dim=-1)


def per_item_matryoshka(
    source: Tensor,
    learned: Tensor,
    decoder_weight: Tensor,
    decoder_bias: Tensor | None,
    prefix_sizes: Sequence[int],
    prefix_weights: Sequence[float] | None = None,
    feature_reduction: str = "mean",
    decoded: Tensor | None = None,
) -> Tensor:
    errors = per_item_matryoshka_prefixes(
        source, learned, decoder_weight, decoder_bias, prefix_sizes, feature_reduction, decoded
    )
    weights = prefix_weights if prefix_weights is not None else [1.0 / len(prefix_sizes)] * len(prefix_sizes)
    return (errors * torch.tensor(weights, dtype=torch.float64)).sum(-1)


def per_item_sparsity(learned: Tensor, coefficient: float | Tensor, decoder_weight: Tensor | None = None) -> Tensor:
    """``coefficient * sum_i |f_i|`` per item, each ``|f_i|`` weighted by ``||W_dec[i]||_2`` when a decoder is given."""
    weights = decoder_weight.double().norm(dim=-1) if decoder_weight is not None else 1.0
    scale = coefficient.double() if isinstance(coefficient, Tensor) else coefficient
    return scale * (learned.double().abs() * weights).sum(-1)


def sparse_activations(*shape: int, density: float = 0.3, generator: torch.Generator | None = None) -> Tensor:
    """Random activations with exact zeros, as a ReLU SAE produces."""
    values = torch.randn(*shape, generator=generator).abs()
    mask = torch.rand(*shape, generator=generator) < density
    return values * mask


def fvu(decoded: Tensor, source: Tensor) -> Tensor:
    """``[component]`` pooled FVU of every item, two-pass in float64: the mean first, then the deviations."""
    source, decoded = source.double(), decoded.double()
    squared_error = ((decoded - source) ** 2).sum(dim=(0, 2))
    variance = ((source - source.mean(dim=0)) ** 2).sum(dim=(0, 2))
    return squared_error / variance


def fired(learned: Tensor, threshold: float | None = None) -> Tensor:
    """Where each feature fires: ``f != 0``, or ``f > threshold``; a NaN fires either way."""
    return learned != 0 if threshold is None else (learned > threshold) | learned.isnan()


def feature_density(learned: Tensor, threshold: float | None = None) -> Tensor:
    """``[component, feature]`` fraction of items in which each feature fires (NaN counts: NaN != 0)."""
    return fired(learned, threshold).double().mean(dim=0)


def density_bands(density: Tensor) -> dict[str, Tensor]:
    """``[component]`` fraction of features above 1e-1 and 1e-2, below 1e-5 and 1e-6, and of density 0."""
    bands = {
        "feature_density_above_1e-1": density > 0.1,
        "feature_density_above_1e-2": density > 0.01,
        "feature_density_below_1e-5": density < 1e-5,
        "feature_density_below_1e-6": density < 1e-6,
        "feature_density_never_fired": density == 0,
    }
    undefined = density.isnan().any(dim=-1)
    return {name: torch.where(undefined, torch.nan, inside.double().mean(dim=-1)) for name, inside in bands.items()}


def lockstep_steps_since_fired(ranks: Sequence[Sequence[Tensor]], threshold: float | None = None) -> Tensor:
    """``[component, feature]`` global steps since each feature fired; each rank's steps ``[batch, component,
    feature]`` in order, the k-th most recent step of every rank simultaneous (a step counted once, not per rank).

    Walks back from the most recent step: the age is the smallest position-from-the-end of a step in which the
    feature fired on any rank; the most steps any rank took if it never fired.
    """
    components, features = next(step.shape[1:] for rank in ranks for step in rank)
    result = torch.zeros(components, features, dtype=torch.int64)
    for c in range(components):
        for i in range(features):
            ages = [
                position
                for rank in ranks
                for position, step in enumerate(reversed(rank))
                if fired(step[:, c, i], threshold).any()
            ]
            result[c, i] = min(ages) if ages else max(len(rank) for rank in ranks)
    return result


def centred_fvu(decoded: Tensor, source: Tensor) -> Tensor:
    """``[component]`` pooled ``sum_d Var(e_d) / sum_d Var(x_d)`` (unbiased, as dictionary_learning's ``evaluate``)."""
    source, error = source.double(), decoded.double() - source.double()

    def variance(values: Tensor) -> Tensor:  # torch.var(values, dim=0), without its warning for one item
        return ((values - values.mean(dim=0)) ** 2).sum(dim=0) / (values.shape[0] - 1)

    return variance(error).sum(dim=-1) / variance(source).sum(dim=-1)


def mean_log10_density(density: Tensor, epsilon: float = 1e-10) -> Tensor:
    """``[component]`` mean over features of ``log10(density + epsilon)``."""
    return torch.log10(density + epsilon).mean(dim=-1)


def dead_features(streams: Sequence[Tensor], window: int) -> Tensor:
    """``[component]`` number of features not fired within the last ``window`` items (lockstep across streams)."""
    return (lockstep_items_since_fired(streams) >= window).sum(dim=-1)


def items_since_fired(stream: Tensor, threshold: float | None = None) -> Tensor:
    """``[component, feature]`` items after the last firing in one ordered stream, walking it item by item."""
    _, components, features = stream.shape
    since = torch.zeros(components, features, dtype=torch.int64)
    for item in stream:
        since = torch.where(fired(item, threshold), 0, since + 1)
    return since


def lockstep_items_since_fired(streams: Sequence[Tensor], threshold: float | None = None) -> Tensor:
    """Global items since fired when the k-th most recent item of every stream is simultaneous.

    Walks back from the most recent item: the feature's age is the smallest position-from-the-end at which it
    fired on any stream; the answer counts the items of every stream younger than that age.
    """
    components, features = next(s.shape[1:] for s in streams if s.ndim == 3)
    result = torch.zeros(components, features, dtype=torch.int64)
    for c in range(components):
        for i in range(features):
            ages = [
                position
                for stream in streams
                for position, item in enumerate(stream.flip(0))
                if fired(item[c, i], threshold)
            ]
            age = min(ages) if ages else None
            result[c, i] = sum(len(stream) if age is None else min(age, len(stream)) for stream in streams)
    return result


def sae_inputs(
    batch_size: int,
    *,
    components: int,
    d_model: int,
    d_sae: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    parameters: dict[str, Tensor] | None = None,
    density: float = 0.3,
    signed: bool = False,
) -> dict[str, Tensor]:
    """One seeded SAE step, every input by keyword, ``[batch, component, ...]`` (the one input builder of the tests).

    ``source_activations`` is the decode plus unit noise; ``learned_activations`` are sparse (exact zeros at rate
    ``1 - density``; with ``signed`` a third of the non-zero ones negative, as a non-ReLU SAE gives);
    ``decoded_activations`` is the SAE's decode ``f W + b``; ``decoder_weight`` is feature-major
    ``[component, d_sae, d_model]`` with row norms far from 1, ``decoder_bias`` ``[component, d_model]``.
    ``pre_activations`` ``[batch, component, d_sae]`` are spread around the JumpReLU ``threshold`` ``[component,
    d_sae]`` (in (0.1, 0.3)), so that some fall within a bandwidth of it; ``dead_mask`` ``[component, d_sae]`` marks
    about 40% of the latents dead. Pass ``parameters`` (the :func:`sae_parameters` of an earlier step) to share the
    decoder, threshold and dead mask between steps.
    """
    if parameters is None:
        parameters = sae_parameters(components=components, d_model=d_model, d_sae=d_sae, generator=generator)
    weight, bias = (parameters[name].double() for name in ("decoder_weight", "decoder_bias"))
    learned = sparse_activations(batch_size, components, d_sae, density=density, generator=generator).double()
    if signed:
        learned = learned * torch.where(torch.rand(learned.shape, generator=generator) < 1 / 3, -1.0, 1.0).double()
    decoded = torch.einsum("bcf,cfd->bcd", learned, weight) + bias
    # The decode plus unit noise: a reconstruction correlated with its source, as an SAE's is. With an independent
    # source, sums of <x, x_hat> over a few random items can cancel to almost 0, and ratios over them (the relative
    # reconstruction bias) become dominated by the float32 rounding of the inputs.
    source = decoded + torch.randn(batch_size, components, d_model, generator=generator, dtype=torch.float64)
    pre_activations = 0.2 + 0.5 * torch.randn(batch_size, components, d_sae, generator=generator, dtype=torch.float64)
    inputs = {
        "source_activations": source,
        "learned_activations": learned,
        "decoded_activations": decoded,
        "decoder_weight": weight,
        "decoder_bias": bias,
        "pre_activations": pre_activations,
        "threshold": parameters["threshold"].double(),
    }
    return {**cast(inputs, dtype), "dead_mask": parameters["dead_mask"]}


def cast(inputs: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """The inputs with every floating-point tensor in ``dtype`` (a boolean ``dead_mask`` stays boolean)."""
    return {name: value.to(dtype) if value.is_floating_point() else value for name, value in inputs.items()}


def sae_parameters(*, components: int, d_model: int, d_sae: int, generator: torch.Generator) -> dict[str, Tensor]:
    """The SAE's parameters that steps share: the decoder, the JumpReLU threshold and the dead-latent mask."""
    return {
        "decoder_weight": torch.randn(components, d_sae, d_model, generator=generator, dtype=torch.float64),
        "decoder_bias": torch.randn(components, d_model, generator=generator, dtype=torch.float64),
        "threshold": 0.1 + 0.2 * torch.rand(components, d_sae, generator=generator, dtype=torch.float64),
        "dead_mask": torch.rand(components, d_sae, generator=generator) < 0.4,
    }


#: The inputs that :func:`sae_parameters` gives and steps share.
PARAMETERS = ("decoder_weight", "decoder_bias", "threshold", "dead_mask")


def sae_batches(sizes: Sequence[int], seed: int, **kwargs: Any) -> list[dict[str, Tensor]]:
    """Seeded SAE steps of the given batch sizes sharing one decoder (:func:`sae_inputs`'s keywords)."""
    generator = torch.Generator().manual_seed(seed)
    batches: list[dict[str, Tensor]] = []
    for size in sizes:
        shared = {name: batches[0][name] for name in PARAMETERS} if batches else None
        batches.append(sae_inputs(size, generator=generator, parameters=shared, **kwargs))
    return batches


def without_component_axis(inputs: dict[str, Tensor], component: int = 0) -> dict[str, Tensor]:
    """One component's inputs in the layout without a component axis (``[batch, feature]``, ``[d_sae, d_model]``)."""
    return {
        name: value[:, component] if name.endswith("_activations") else value[component]
        for name, value in inputs.items()
    }


def as_dict(value: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
    """A metric's or a collection's compute() result as a dict, to compare both the same way."""
    return value if isinstance(value, dict) else {"value": value}


class StraightThroughStep(torch.autograd.Function):
    """H(x - t) forward; backward -(1/eps) 1[|x - t| < eps/2] to t summed over items (+ the negation to x if asked)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, t: Tensor, eps: float, to_x: bool) -> Tensor:
        ctx.save_for_backward(x, t)
        ctx.eps, ctx.to_x = eps, to_x
        return torch.heaviside(x - t, torch.zeros((), dtype=x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        x, t = ctx.saved_tensors
        kernel = ((x - t).abs() / ctx.eps < 0.5).to(grad.dtype) / ctx.eps
        return (kernel * grad if ctx.to_x else None), -(kernel * grad).sum(0), None, None


def per_item_jumprelu_l0(
    pre: Tensor,
    threshold: Tensor,
    bandwidth: float,
    convention: str = "saelens",
    ste_to_input: bool = False,
    target_l0: float | None = None,
) -> Tensor:
    """Per-item straight-through L0; SAELens' quadratic ``2/T (L0 - T)^2`` with a SAELens target.

    dictionary_learning's step reads the JumpReLU output ``f = h 1[h > t]`` (no gradient to it); its batch target is
    applied to the mean by the caller.
    """
    h, t = pre.double(), threshold.double()
    if convention == "dictionary_learning":
        h = torch.where(h.detach() > t.detach(), h.detach(), torch.zeros((), dtype=h.dtype))
    l0 = StraightThroughStep.apply(h, t, bandwidth, ste_to_input).sum(-1)
    if target_l0 is not None and convention == "saelens":
        return 2.0 * (l0 - target_l0) ** 2 / target_l0
    return l0


def per_item_tanh_sparsity(learned: Tensor, decoder_weight: Tensor | None, scale: float) -> Tensor:
    """``sum_i tanh(scale f_i ||W_i||)`` per item (no absolute value)."""
    weights = decoder_weight.double().norm(dim=-1) if decoder_weight is not None else 1.0
    return torch.tanh(scale * learned.double() * weights).sum(-1)


def per_item_pre_activation(
    pre: Tensor, threshold: Tensor, decoder_weight: Tensor | None, dead_mask: Tensor | None
) -> Tensor:
    """``sum_i relu(t_i - h_i) dead_i ||W_i||`` per item (every latent without a mask, weight 1 without a decoder)."""
    weights = decoder_weight.double().norm(dim=-1) if decoder_weight is not None else 1.0
    dead = dead_mask.double() if dead_mask is not None else 1.0
    return (torch.clamp(threshold.double() - pre.double(), min=0) * dead * weights).sum(-1)


def per_item_lp(learned: Tensor, decoder_weight: Tensor | None, p: float, root: bool) -> Tensor:
    """``(sum_i a_i^p)^(1/p)`` or ``sum_i a_i^p`` of ``a_i = |f_i| ||W_i||`` per item; a zero term has gradient 0."""
    weights = decoder_weight.double().norm(dim=-1) if decoder_weight is not None else 1.0
    a = learned.double().abs() * weights
    nonzero = a != 0
    terms = torch.where(nonzero, torch.where(nonzero, a, 1.0) ** p, 0.0)
    total = terms.sum(-1)
    if not root:
        return total
    some = total != 0
    return torch.where(some, torch.where(some, total, 1.0) ** (1 / p), 0.0)


# --- the TopK auxiliary loss (AuxK), one peer at a time ------------------------------------------------------------

#: convention -> (ReLU the picks, pick min(k_aux, n_dead) dead latents, scale min(n_dead / k_aux, 1), b_dec in the
#: auxiliary decode, normaliser, mean over d, gradient to the pre-activations, default k_aux (None: d_model // 2)).
AUXK = {
    "openai": (True, False, False, True, "residual", True, True, 256),
    "sparsify": (True, True, True, False, "source", False, False, None),
    "dictionary_learning": (True, True, False, False, "residual", False, True, None),
    "saelens": (False, True, True, False, None, False, True, None),
    "saev": (False, True, False, True, None, True, True, 512),
}


def auxk_activations(pre: Tensor, dead: Tensor, k: int, relu: bool, cap: bool) -> Tensor:
    """``[batch, component, d_sae]``: the top-``k`` dead latents' pre-activations (``min(k, n_dead)`` of them with
    ``cap``; else OpenAI's top-``k`` of ``h * dead``), ReLU'd with ``relu``, 0 elsewhere; one component at a time."""
    out = []
    for c in range(pre.shape[1]):
        dense = torch.zeros_like(pre[:, c])
        if cap:
            candidates = dead[c].nonzero().squeeze(-1)
            count = min(k, candidates.numel())
            if count:
                top = pre[:, c, candidates].topk(count, dim=-1)
                values = top.values.relu() if relu else top.values
                dense = dense.scatter(-1, candidates[top.indices], values)
        else:
            top = (pre[:, c] * dead[c]).topk(k, dim=-1)
            dense = dense.scatter(-1, top.indices, top.values.relu() if relu else top.values)
        out.append(dense)
    return torch.stack(out, dim=1)


def auxk_terms(
    step: dict[str, Tensor], convention: str, k_aux: int | None = None, prefix_sizes: Sequence[int] | None = None
) -> tuple[Tensor, Tensor | None]:
    """A step's per-item AuxK numerator ``[batch, component]`` (scaled, 0 without a dead latent where the peer returns
    0) and the values whose variance normalises it (None for the per-item conventions), float64, differentiable."""
    relu, cap, scaled, bias_in_decode, normaliser, feature_mean, grad_to_pre, default_k = AUXK[convention]
    source = step["source_activations"].double()
    pre = step["pre_activations"].double()
    weight = step["decoder_weight"].double()
    dead = step["dead_mask"]
    bias = step["decoder_bias"].double() if bias_in_decode or prefix_sizes is not None else None
    k = k_aux if k_aux is not None else default_k if default_k is not None else source.shape[-1] // 2
    pre = pre if grad_to_pre else pre.detach()

    def squared(auxiliary: Tensor, target: Tensor, level_dead: Tensor) -> Tensor:
        error = (auxiliary - target) ** 2
        per_item = error.mean(-1) if feature_mean else error.sum(-1)
        n_dead = level_dead.sum(-1).double()
        if scaled:
            per_item = per_item * torch.clamp(n_dead / k, max=1.0)
        return per_item if convention == "openai" else torch.where(n_dead > 0, per_item, 0.0)

    if prefix_sizes is not None:  # SAELens' Matryoshka: one AuxK per level, on the residual of the prefix through it
        learned = step["learned_activations"].double()
        d_sae = pre.shape[-1]
        widths = list(prefix_sizes) if prefix_sizes[-1] == d_sae else [*prefix_sizes, d_sae]
        total, start = torch.zeros(source.shape[:2], dtype=torch.float64), 0
        for end in widths:
            prefix = torch.einsum("bcf,cfd->bcd", learned[..., :end], weight[:, :end]) + bias
            residual = (source - prefix).detach()
            picks = auxk_activations(pre[..., start:end], dead[:, start:end], k, relu, cap)
            auxiliary = torch.einsum("bcf,cfd->bcd", picks, weight[:, start:end])
            total = total + squared(auxiliary, residual, dead[:, start:end])
            start = end
        return total, None
    residual = (source - step["decoded_activations"].double()).detach()
    auxiliary = torch.einsum("bcf,cfd->bcd", auxk_activations(pre, dead, k, relu, cap), weight)
    target = residual
    if bias_in_decode:
        auxiliary = auxiliary + bias
        if convention == "openai":  # x - x̂.detach() + b_pre.detach()
            target = residual + bias.detach()
    return squared(auxiliary, target, dead), {"residual": target, "source": source, None: None}[normaliser]


def auxk_pooled_ratio(numerators: Tensor, values: Tensor, convention: str) -> Tensor:
    """``[component]``: the numerators of every item over the variance of every item's ``values`` (the batch ratio
    for one batch); OpenAI's means over ``(b, d)`` make it ``Σ e² / Σ (v - v̄)²`` too."""
    numerator = numerators.sum(0) * (values.shape[-1] if convention == "openai" else 1)
    variance = ((values - values.mean(0)) ** 2).sum((0, 2))
    ratio = numerator / variance
    if convention in ("openai", "dictionary_learning"):  # .nan_to_num(0) (in float32, as the peers compute) of x/0
        degenerate = numerator.isfinite() & variance.isfinite()
        ratio = torch.where(degenerate, ratio.nan_to_num(0.0, posinf=torch.finfo(torch.float32).max), ratio)
    return ratio
