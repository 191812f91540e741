"""Each preset's "loss" equals its peer's whole training loss, value and gradients (the peer's code, by hand, float64).

Every reference below is written from the peer's source (named in each docstring) and never imports the peer. The
inputs are leaves (``f``, ``W_dec``, ``b_dec``, ``h``, ``theta``) with the reconstruction decoded from them in the
graph, so a gradient is checked wherever an input enters the peer's loss. ``compute()`` over two uneven batches is
compared with the peer's loss of both batches at once: its terms are item means or ratios pooled over the items.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

from sparse_metrics import SparseAutoencoderLoss, presets

D_MODEL, D_SAE = 6, 10
F64 = torch.float64
LEAVES = ("f", "W", "b", "h", "theta")


def _parameters(seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(D_SAE, D_MODEL, generator=g, dtype=F64) * (0.5 + 2 * torch.rand(D_SAE, 1, generator=g))
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 3, 4, 7, 8]] = True  # 5 dead: more than d_model // 2 = 3 in all, fewer in some Matryoshka levels
    return {
        "W": weight.requires_grad_(),
        "b": (0.3 * torch.randn(D_MODEL, generator=g, dtype=F64)).requires_grad_(),
        "theta": (0.1 + 0.2 * torch.rand(D_SAE, generator=g, dtype=F64)).requires_grad_(),
        "dead": dead,
    }


def _batch(batch_size: int, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = 0.2 + 0.5 * torch.randn(batch_size, D_SAE, generator=g, dtype=F64)
    f = h.relu() * (torch.rand(batch_size, D_SAE, generator=g) < 0.5)
    return {
        "x": 1.5 + torch.randn(batch_size, D_MODEL, generator=g, dtype=F64),  # an offset: the variances are not x^2
        "f": f.requires_grad_(),
        "h": h.requires_grad_(),
    }


def _unit_rows(weight: Tensor) -> Tensor:
    return weight / weight.norm(dim=-1, keepdim=True)


# What each preset is given: the library's inputs from the leaves (decoded in the graph).


def _inputs(step: dict[str, Tensor], *, weight: Tensor | None = None, relu_h: bool = False) -> dict[str, Tensor]:
    weight = step["W"] if weight is None else weight
    return {
        "source_activations": step["x"],
        "learned_activations": step["f"],
        "decoded_activations": step["f"] @ weight + step["b"],
        "decoder_weight": weight,
        "decoder_bias": step["b"],
        "pre_activations": step["h"].relu() if relu_h else step["h"],
        "threshold": step["theta"],
        "dead_mask": step["dead"],
    }


def plain_inputs(step: dict[str, Tensor]) -> dict[str, Tensor]:
    return _inputs(step)


def saelens_topk_inputs(step: dict[str, Tensor]) -> dict[str, Tensor]:
    """rescale_acts_by_decoder_norm=True: W_dec / ||W_dec,i|| as the decoder (SAELens decodes f / ||W_dec,i||)."""
    return _inputs(step, weight=_unit_rows(step["W"]))


def relu_inputs(step: dict[str, Tensor]) -> dict[str, Tensor]:
    """sparsify's ``pre_acts`` and dictionary_learning's ``post_relu_acts_BF`` are after the ReLU."""
    return _inputs(step, relu_h=True)


# Shared pieces of the peers' formulas.


def _x_hat(step: dict[str, Tensor]) -> Tensor:
    return step["f"] @ step["W"] + step["b"]


def _saelens_x_hat(step: dict[str, Tensor]) -> Tensor:
    """SAELens act_times_W_dec with rescale: ``f * (1 / ||W_dec,i||) @ W_dec + b_dec``."""
    return (step["f"] * (1 / step["W"].norm(dim=-1))) @ step["W"] + step["b"]


def _mse_sum(x_hat: Tensor, x: Tensor) -> Tensor:
    return (x_hat - x).pow(2).sum(dim=-1).mean()


def _topk_dead(values: Tensor, dead: Tensor, k: int) -> Tensor:
    """SAELens calculate_topk_aux_acts / sparsify / dictionary_learning: the top-k dead values, zeros elsewhere."""
    top = torch.where(dead[None], values, -torch.inf).topk(k, sorted=False)
    return torch.zeros_like(values).scatter(-1, top.indices, top.values)


def _ste(value: Tensor, x: Tensor, theta: Tensor, bandwidth: float, *, to_input: bool) -> Tensor:
    """``value`` with the rectangle straight-through gradient ``-(1/eps) rect((x - theta)/eps)`` to theta."""
    kernel = (((x - theta) / bandwidth).abs() < 0.5).to(x).detach() / bandwidth
    surrogate = -(kernel * theta)
    if to_input:
        surrogate = surrogate + kernel * x
    return value.detach() + surrogate - surrogate.detach()


# SAELens (sae_lens/saes/*.py): training_forward_pass = mse_loss + sum of calculate_aux_loss.


def saelens_standard(step: dict[str, Tensor], l1_coefficient: float = 1.0, lp_norm: float = 1.0) -> Tensor:
    """standard_sae.py: ``(l1 * (f * W_dec.norm(dim=1)).norm(p=lp_norm, dim=-1)).mean()``."""
    sparsity = (step["f"] * step["W"].norm(dim=1)).norm(p=lp_norm, dim=-1)
    return _mse_sum(_x_hat(step), step["x"]) + (l1_coefficient * sparsity).mean()


def _saelens_auxk(step: dict[str, Tensor], sae_out: Tensor, h: Tensor, dead: Tensor, weight: Tensor) -> Tensor:
    """topk_sae.py calculate_topk_aux_loss without its coefficient (``weight`` already unit-row)."""
    num_dead = int(dead.sum())
    if num_dead == 0:
        return sae_out.new_tensor(0.0)
    residual = (step["x"] - sae_out).detach()
    k_aux = step["x"].shape[-1] // 2
    scale = min(num_dead / k_aux, 1.0)
    acts = _topk_dead(h, dead, min(k_aux, num_dead))
    return scale * (acts @ weight - residual).pow(2).sum(dim=-1).mean()


def saelens_topk(step: dict[str, Tensor], aux_loss_coefficient: float = 1.0) -> Tensor:
    sae_out = _saelens_x_hat(step)
    auxk = _saelens_auxk(step, sae_out, step["h"], step["dead"], _unit_rows(step["W"]))
    return _mse_sum(sae_out, step["x"]) + aux_loss_coefficient * auxk


def saelens_matryoshka(
    step: dict[str, Tensor], widths: tuple[int, ...], use_matryoshka_aux_loss: bool, aux_loss_coefficient: float = 1.0
) -> Tensor:
    """matryoshka_batchtopk_sae.py: inner MSEs added to the full one; per-level AuxK with use_matryoshka_aux_loss."""
    sae_out = _saelens_x_hat(step)
    f = step["f"] * (1 / step["W"].norm(dim=-1))
    decoded, previous, partial_outs = step["b"], 0, []
    for width in widths:
        decoded = f[:, previous:width] @ step["W"][previous:width] + decoded
        partial_outs.append((previous, width, decoded))
        previous = width
    loss = _mse_sum(sae_out, step["x"]) + sum(_mse_sum(out, step["x"]) for _, _, out in partial_outs[:-1])
    scaled = _unit_rows(step["W"])
    if not use_matryoshka_aux_loss:
        return loss + aux_loss_coefficient * _saelens_auxk(step, sae_out, step["h"], step["dead"], scaled)
    levels = [
        _saelens_auxk(step, out, step["h"][:, lo:hi], step["dead"][lo:hi], scaled[lo:hi])
        for lo, hi, out in partial_outs
        if step["dead"][lo:hi].any()
    ]
    return loss + aux_loss_coefficient * torch.stack(levels).sum()


def saelens_jumprelu(
    step: dict[str, Tensor],
    mode: str = "step",
    l0_coefficient: float = 1.0,
    bandwidth: float = 0.05,
    ste_to_input: bool = False,
    target_l0: float | None = None,
    tanh_scale: float = 4.0,
    pre_act_loss_coefficient: float | None = None,
) -> Tensor:
    """jumprelu_sae.py calculate_aux_loss: l0_loss (step / quadratic / tanh) and calculate_pre_act_loss."""
    h, theta, norms = step["h"], step["theta"], step["W"].norm(dim=1)
    if mode == "tanh":
        per_item = torch.tanh(tanh_scale * step["f"] * norms).sum(dim=-1)
    else:
        l0 = _ste((h > theta).to(h), h, theta, bandwidth, to_input=ste_to_input).sum(dim=-1)
        per_item = l0 if mode == "step" else 2 / target_l0 * (l0 - target_l0) ** 2  # type: ignore[operator]
    loss = _mse_sum(_x_hat(step), step["x"]) + (l0_coefficient * per_item).mean()
    if pre_act_loss_coefficient is not None:
        pre_act = ((theta - h).relu() * step["dead"] * norms).sum(dim=-1)
        loss = loss + pre_act_loss_coefficient * pre_act.mean()
    return loss


# EleutherAI sparsify (sparse_coder.py forward, trainer.py: fvu + auxk_alpha * auxk_loss + multi_topk_fvu / 8).


def _multi_topk_decode(step: dict[str, Tensor]) -> Tensor:
    """decode(*pre_acts.topk(4 k)) with k = 1: the top 4 post-ReLU pre-activations.

    ``pre_acts`` carries no gradient: ``fused_encoder``'s backward drops ``grad_preacts``.
    """
    top = step["h"].relu().detach().topk(4, sorted=False)
    return torch.zeros_like(step["h"]).scatter(-1, top.indices, top.values) @ step["W"] + step["b"]


def sparsify_inputs(step: dict[str, Tensor]) -> dict[str, Tensor]:
    return {**relu_inputs(step), "multi_topk_decoded_activations": _multi_topk_decode(step)}


def sparsify_loss(step: dict[str, Tensor], auxk_alpha: float = 0.0, multi_topk: bool = False) -> Tensor:
    """``pre_acts`` is detached: fused_encoder's backward ignores its gradient, so AuxK trains only the decoder."""
    y, sae_out, pre_acts, dead = step["x"], _x_hat(step), step["h"].relu().detach(), step["dead"]
    e = y - sae_out
    total_variance = (y - y.mean(0)).pow(2).sum()
    auxk_loss = sae_out.new_tensor(0.0)
    if auxk_alpha > 0 and (num_dead := int(dead.sum())) > 0:
        k_aux = y.shape[-1] // 2
        scale = min(num_dead / k_aux, 1.0)
        e_hat = _topk_dead(pre_acts, dead, min(k_aux, num_dead)) @ step["W"]
        auxk_loss = scale * (e_hat - e.detach()).pow(2).sum() / total_variance
    fvu = e.pow(2).sum() / total_variance
    multi = (_multi_topk_decode(step) - y).pow(2).sum() / total_variance if multi_topk else 0.0
    return fvu + auxk_alpha * auxk_loss + multi / 8


# dictionary_learning (trainers/<trainer>.py, the trainer's loss).


def _dictionary_learning_auxk(residual: Tensor, post_relu: Tensor, dead: Tensor, weight: Tensor) -> Tensor:
    """top_k.py get_auxiliary_loss (``residual`` detached by the caller)."""
    num_dead = int(dead.sum())
    if num_dead == 0:
        return residual.new_tensor(0.0)
    acts = _topk_dead(post_relu, dead, min(residual.shape[-1] // 2, num_dead))
    l2_loss_aux = (residual - acts @ weight).pow(2).sum(dim=-1).mean()
    denominator = (residual - residual.mean(dim=0)[None, :]).pow(2).sum(dim=-1).mean()
    return (l2_loss_aux / denominator).nan_to_num(0.0)


def dictionary_learning_standard(step: dict[str, Tensor], l1_penalty: float = 0.1, april: bool = False) -> Tensor:
    f = step["f"]
    x_hat = _x_hat(step)
    l1 = (f * step["W"].norm(p=2, dim=1)).sum(dim=-1).mean() if april else f.norm(p=1, dim=-1).mean()
    return _mse_sum(x_hat, step["x"]) + l1_penalty * l1


def dictionary_learning_top_k(step: dict[str, Tensor], auxk_alpha: float = 1 / 32) -> Tensor:
    e = step["x"] - _x_hat(step)
    auxk = _dictionary_learning_auxk(e.detach(), step["h"].relu(), step["dead"], step["W"]) if auxk_alpha > 0 else 0
    return e.pow(2).sum(dim=-1).mean() + auxk_alpha * auxk


def dictionary_learning_matryoshka(
    step: dict[str, Tensor], group_sizes: list[int], group_weights: list[float], auxk_alpha: float = 1 / 32
) -> Tensor:
    """matryoshka_batch_top_k.py: mean over groups of w_g * err_g, plus the AuxK of the full reconstruction."""
    x, x_reconstruct = step["x"], torch.zeros_like(step["x"]) + step["b"]
    losses = []
    for w_chunk, f_chunk, weight in zip(
        step["W"].split(group_sizes), step["f"].split(group_sizes, dim=1), group_weights, strict=True
    ):
        x_reconstruct = x_reconstruct + f_chunk @ w_chunk
        losses.append((x - x_reconstruct).pow(2).sum(dim=-1).mean() * weight)
    auxk = _dictionary_learning_auxk((x - x_reconstruct).detach(), step["h"].relu(), step["dead"], step["W"])
    return torch.stack(losses).mean() + auxk_alpha * auxk


def dictionary_learning_jumprelu(
    step: dict[str, Tensor], sparsity_penalty: float = 1.0, target_l0: float = 20.0, bandwidth: float = 0.001
) -> Tensor:
    """jumprelu.py: StepFunction(f, threshold) with f the JumpReLU output; zero gradient to f."""
    h, theta = step["h"], step["theta"]
    f_jump = (h * (h > theta)).detach()
    l0 = _ste((f_jump > theta).to(h), f_jump, theta, bandwidth, to_input=False).sum(dim=-1).mean()
    return _mse_sum(_x_hat(step), step["x"]) + sparsity_penalty * ((l0 / target_l0) - 1).pow(2)


# OpenAI sparse_autoencoder (train.py loss_fn, kernels.py normalized_mse).


def openai_loss(step: dict[str, Tensor], mse_scale: float, auxk: int | None = 256, auxk_coef: float = 1 / 32) -> Tensor:
    x, recons, pre_bias = step["x"], _x_hat(step), step["b"]
    loss = mse_scale * (recons - x).pow(2).mean()
    if auxk is None:
        return loss
    top = (step["h"] * step["dead"]).topk(auxk)  # auxk_mask_fn zeroes the live latents, then sharded_topk
    vals = torch.zeros_like(step["h"]).scatter(-1, top.indices, top.values.relu())
    aux_recons = vals @ step["W"] + pre_bias
    target = x - recons.detach() + pre_bias.detach()
    normalized = (aux_recons - target).pow(2).mean() / (target.mean(dim=0)[None, :] - target).pow(2).mean()
    return loss + auxk_coef * normalized.nan_to_num(0)


# saev (saev/nn/objectives.py: mse + sparsity + aux; modeling.py L1Sparsity, AuxK).


def saev_loss(
    step: dict[str, Tensor],
    sparsity_coeff: float,
    auxk: bool,
    k_aux: int = 512,
    alpha: float = 1 / 32,
    prefix_sizes: tuple[int, ...] | None = None,
) -> Tensor:
    x, f = step["x"], step["f"]
    x_hat = _x_hat(step)
    if prefix_sizes is None:
        mse = (x_hat - x).pow(2).mean()
    else:
        x_hats = torch.stack([f[:, :m] @ step["W"][:m] + step["b"] for m in prefix_sizes], dim=1)
        mse = (x_hats - x[:, None]).pow(2).mean()
    loss = mse + f.abs().sum(dim=1).mean(dim=0) * sparsity_coeff
    if auxk:
        residual = (x - x_hat).detach()
        h, dead = step["h"], step["dead"]
        top_i = h.masked_fill(~dead, float("-inf")).topk(min(k_aux, int(dead.sum())), dim=-1).indices
        aux_acts = torch.zeros_like(h).scatter(-1, top_i, h.gather(-1, top_i))
        loss = loss + alpha * ((aux_acts @ step["W"] + step["b"]) - residual).pow(2).mean()
    return loss


# The configurations.


@dataclass(frozen=True)
class Config:
    name: str
    build: Callable[[], SparseAutoencoderLoss]
    inputs: Callable[[dict[str, Tensor]], dict[str, Tensor]]
    reference: Callable[[dict[str, Tensor]], Tensor]
    # The gradient to f compared only where f != 0: the peer's penalty f * ||W_i|| has slope ||W_i|| at f = 0, ours
    # |f| * ||W_i|| slope 0; a ReLU SAE's f = 0 passes no gradient on (relu'(0) = 0), so its parameters' agree.
    f_grad_where_active: bool = False


WIDTHS = (3, 6, 10)

CONFIGS = [
    Config("saelens-standard", lambda: presets.saelens("standard"), plain_inputs, saelens_standard),
    Config(
        "saelens-standard-l1",
        lambda: presets.saelens("standard", l1_coefficient=0.3),
        plain_inputs,
        lambda s: saelens_standard(s, l1_coefficient=0.3),
    ),
    Config(
        "saelens-standard-lp2",
        lambda: presets.saelens("standard", l1_coefficient=0.3, lp_norm=2.0),
        plain_inputs,
        lambda s: saelens_standard(s, l1_coefficient=0.3, lp_norm=2.0),
    ),
    Config("saelens-topk", lambda: presets.saelens("topk"), saelens_topk_inputs, saelens_topk),
    Config(
        "saelens-batchtopk",
        lambda: presets.saelens("batchtopk", aux_loss_coefficient=0.25),
        saelens_topk_inputs,
        lambda s: saelens_topk(s, 0.25),
    ),
    Config(
        "saelens-matryoshka",
        lambda: presets.saelens("matryoshka_batchtopk", matryoshka_widths=WIDTHS, d_sae=D_SAE),
        saelens_topk_inputs,
        lambda s: saelens_matryoshka(s, WIDTHS, False),
    ),
    Config(
        "saelens-matryoshka-aux",
        lambda: presets.saelens(
            "matryoshka_batchtopk",
            matryoshka_widths=WIDTHS,
            d_sae=D_SAE,
            use_matryoshka_aux_loss=True,
            aux_loss_coefficient=0.5,
        ),
        saelens_topk_inputs,
        lambda s: saelens_matryoshka(s, WIDTHS, True, 0.5),
    ),
    Config("saelens-jumprelu", lambda: presets.saelens("jumprelu"), plain_inputs, saelens_jumprelu),
    Config(
        "saelens-jumprelu-ste-pre-act",
        lambda: presets.saelens(
            "jumprelu",
            l0_coefficient=0.1,
            jumprelu_bandwidth=0.2,
            jumprelu_ste_to_input=True,
            pre_act_loss_coefficient=0.7,
        ),
        plain_inputs,
        lambda s: saelens_jumprelu(
            s, l0_coefficient=0.1, bandwidth=0.2, ste_to_input=True, pre_act_loss_coefficient=0.7
        ),
    ),
    Config(
        "saelens-jumprelu-quadratic",
        lambda: presets.saelens("jumprelu", jumprelu_sparsity_loss_mode="quadratic", target_l0=3.0),
        plain_inputs,
        lambda s: saelens_jumprelu(s, mode="quadratic", target_l0=3.0),
    ),
    Config(
        "saelens-jumprelu-tanh",
        lambda: presets.saelens("jumprelu", jumprelu_sparsity_loss_mode="tanh", jumprelu_tanh_scale=2.0),
        plain_inputs,
        lambda s: saelens_jumprelu(s, mode="tanh", tanh_scale=2.0),
    ),
    Config("sparsify", lambda: presets.sparsify(D_MODEL), sparsify_inputs, sparsify_loss),
    Config(
        "sparsify-auxk-multi-topk",
        lambda: presets.sparsify(D_MODEL, auxk_alpha=0.5, multi_topk=True),
        sparsify_inputs,
        lambda s: sparsify_loss(s, auxk_alpha=0.5, multi_topk=True),
    ),
    Config(
        "dictionary_learning-standard",
        lambda: presets.dictionary_learning("standard"),
        plain_inputs,
        dictionary_learning_standard,
    ),
    Config(
        "dictionary_learning-standard-april",
        lambda: presets.dictionary_learning("standard_april_update", l1_penalty=0.4),
        plain_inputs,
        lambda s: dictionary_learning_standard(s, 0.4, april=True),
        f_grad_where_active=True,
    ),
    Config(
        "dictionary_learning-top_k",
        lambda: presets.dictionary_learning("top_k", d_model=D_MODEL),
        relu_inputs,
        dictionary_learning_top_k,
    ),
    Config(
        "dictionary_learning-batch_top_k",
        lambda: presets.dictionary_learning("batch_top_k", d_model=D_MODEL, auxk_alpha=0.5),
        relu_inputs,
        lambda s: dictionary_learning_top_k(s, 0.5),
    ),
    Config(
        "dictionary_learning-matryoshka",
        lambda: presets.dictionary_learning(
            "matryoshka_batch_top_k", d_model=D_MODEL, dict_size=D_SAE, group_fractions=[0.3, 0.3, 0.4]
        ),
        relu_inputs,
        lambda s: dictionary_learning_matryoshka(s, [3, 3, 4], [1 / 3] * 3),
    ),
    Config(
        "dictionary_learning-matryoshka-weights",
        lambda: presets.dictionary_learning(
            "matryoshka_batch_top_k",
            d_model=D_MODEL,
            dict_size=D_SAE,
            group_fractions=[0.25, 0.25, 0.5],
            group_weights=[0.5, 0.2, 1.0],
            auxk_alpha=0.3,
        ),
        relu_inputs,
        lambda s: dictionary_learning_matryoshka(s, [2, 2, 6], [0.5, 0.2, 1.0], 0.3),
    ),
    Config(
        "dictionary_learning-jumprelu",
        lambda: presets.dictionary_learning("jumprelu", target_l0=3.0, bandwidth=0.2, sparsity_penalty=0.5),
        plain_inputs,
        lambda s: dictionary_learning_jumprelu(s, 0.5, 3.0, 0.2),
    ),
    Config(
        "openai",
        lambda: presets.openai(D_MODEL, mse_scale=0.7, auxk=4),
        plain_inputs,
        lambda s: openai_loss(s, 0.7, auxk=4),
    ),
    Config(
        "saev-relu",
        lambda: presets.saev("relu", sparsity_coeff=0.05),
        plain_inputs,
        lambda s: saev_loss(s, 0.05, False),
    ),
    Config("saev-top-k", lambda: presets.saev("top-k"), plain_inputs, lambda s: saev_loss(s, 0.0, True)),
    Config(
        "saev-batch-top-k-k_aux",
        lambda: presets.saev("batch-top-k", k_aux=3, alpha=0.5, sparsity_coeff=0.01),
        plain_inputs,
        lambda s: saev_loss(s, 0.01, True, k_aux=3, alpha=0.5),
    ),
    Config(
        "saev-matryoshka",
        lambda: presets.saev("relu", sparsity_coeff=0.05, prefix_sizes=(4, 10)),
        plain_inputs,
        lambda s: saev_loss(s, 0.05, False, prefix_sizes=(4, 10)),
    ),
]


def _step(parameters: dict[str, Tensor], batch_size: int, seed: int) -> dict[str, Tensor]:
    return {**parameters, **_batch(batch_size, seed)}


def _gradients(value: Tensor, step: dict[str, Tensor]) -> dict[str, Tensor]:
    leaves = [step[name] for name in LEAVES]
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return {
        name: torch.zeros_like(leaf) if g is None else g for name, leaf, g in zip(LEAVES, leaves, grads, strict=True)
    }


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_forward_equals_the_peers_loss_and_gradients(config: Config) -> None:
    step = _step(_parameters(0), 7, 1)
    expected = config.reference(step)
    loss = config.build()(**config.inputs(step))["loss"]
    torch.testing.assert_close(loss, expected.to(loss.dtype))
    want, got = _gradients(expected, step), _gradients(loss, step)
    assert any(g.abs().sum() > 0 for g in want.values())
    if config.f_grad_where_active:
        active = step["f"].detach() != 0
        want["f"], got["f"] = want["f"] * active, got["f"] * active
    for name in LEAVES:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"gradient of {n}: {m}")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_compute_over_uneven_batches_is_the_peers_loss_of_all_items(config: Config) -> None:
    parameters = _parameters(2)
    first, second = _step(parameters, 5, 3), _step(parameters, 3, 4)
    loss_fn = config.build()
    with torch.no_grad():
        for step in (first, second):
            loss_fn.update(**config.inputs(step))
        both = {**parameters, **{name: torch.cat([first[name], second[name]]) for name in ("x", "f", "h")}}
        expected = config.reference(both)
    torch.testing.assert_close(loss_fn.compute()["loss"], expected.to(torch.float64))


def test_the_data_tells_the_conventions_apart() -> None:
    """Each reference differs from the others' on the test data: a wrong convention would fail its test."""
    step = _step(_parameters(0), 7, 1)
    with torch.no_grad():
        values = [float(config.reference(step)) for config in CONFIGS]
    for i, a in enumerate(values):
        for j, b in enumerate(values[:i]):
            assert not math.isclose(a, b, rel_tol=1e-9), (CONFIGS[i].name, CONFIGS[j].name)


# Options and errors.


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: presets.saelens("standard", aux_loss_coefficient=1.0), r"'standard' has no config \['aux_loss_coe"),
        (lambda: presets.saelens("topk", l1_coefficient=1.0), r"'topk' has no config \['l1_coefficient'\]"),
        (lambda: presets.saelens("gated"), r"no architecture 'gated'.*'standard'"),
        (lambda: presets.saelens("jumprelu", jumprelu_sparsity_loss_mode="quadratic"), "target_l0"),
        (lambda: presets.saelens("matryoshka_batchtopk", matryoshka_widths=[2, 4]), "d_sae"),
        (lambda: presets.dictionary_learning("top_k"), "needs `d_model`"),
        (lambda: presets.dictionary_learning("jumprelu", l1_penalty=0.1), r"'jumprelu' has no config \['l1_penalty'\]"),
        (lambda: presets.dictionary_learning("matryoshka_batch_top_k", d_model=4, dict_size=8), "group_fractions"),
        (
            lambda: presets.dictionary_learning(
                "matryoshka_batch_top_k", d_model=4, dict_size=8, group_fractions=[0.5, 0.4]
            ),
            "sum to 1.0",
        ),
        (
            lambda: presets.dictionary_learning(
                "matryoshka_batch_top_k", d_model=4, dict_size=8, group_fractions=[0.5, 0.5], group_weights=[1.0]
            ),
            "one weight per group",
        ),
        (lambda: presets.saev("jumprelu"), "no architecture 'jumprelu'"),
        (lambda: presets.saev(aux="topk"), "no aux 'topk'"),
        (lambda: presets.saev(feature_reduction="sum"), r"\['feature_reduction'\] are set by the preset"),
        (lambda: presets.openai(4, mse_scale=1.0, sparsity_coefficient=0.1), "set by the preset"),
    ],
)
def test_options_the_peer_does_not_have_raise(build: Callable[[], Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_saelens_appends_d_sae_to_the_widths_as_saelens_does() -> None:
    with pytest.warns(UserWarning, match="final matryoshka width 6 is not d_sae=10"):
        loss_fn = presets.saelens("matryoshka_batchtopk", matryoshka_widths=[3, 6], d_sae=10)
    assert loss_fn["matryoshka"].prefix_sizes == (3, 6, 10)


def test_warm_up_coefficients_change_the_loss() -> None:
    """SAELens' l1 warm-up is the sparsity coefficient; a term's (l0, auxk) goes through set_loss_coefficient."""
    step = _step(_parameters(0), 7, 1)
    loss_fn = presets.saelens("standard")
    loss_fn.sparsity_coefficient = 0.3
    torch.testing.assert_close(loss_fn(**plain_inputs(step))["loss"], saelens_standard(step, 0.3))
    loss_fn = presets.saelens("jumprelu")
    loss_fn.set_loss_coefficient("l0_loss", 0.25)
    torch.testing.assert_close(loss_fn(**plain_inputs(step))["loss"], saelens_jumprelu(step, l0_coefficient=0.25))


def test_defaults_are_the_peers() -> None:
    assert presets.saelens("standard").sparsity_coefficient == 1.0
    assert presets.saelens("topk").loss_coefficients == {"l2": 1.0, "auxk": 1.0}
    assert presets.dictionary_learning("standard").sparsity_coefficient == 0.1
    assert presets.dictionary_learning("top_k", d_model=4).loss_coefficients["auxk"] == 1 / 32
    assert "auxk" not in presets.dictionary_learning("top_k", d_model=4, auxk_alpha=0.0)
    jumprelu = presets.dictionary_learning("jumprelu")["sparsity_loss"]
    assert jumprelu.target_l0 == 20.0
    assert math.isclose(jumprelu.bandwidth, 0.001, rel_tol=1e-6)  # kept as float32 rounds it, as its StepFunction
    openai = presets.openai(4, mse_scale=2.0)
    assert openai["auxk"].k_aux == 256
    assert openai.loss_coefficients == {"l2": 2.0, "auxk": 1 / 32}
    assert presets.saev().sparsity_coefficient == 4e-4
    assert "auxk" not in presets.saev()
    assert presets.saev("top-k")["auxk"].k_aux == 512
    assert presets.saev("top-k").sparsity_coefficient == 0.0
    sparsify = presets.sparsify(4)
    assert "auxk" not in sparsify
    assert "multi_topk_fvu" not in sparsify


@pytest.mark.parametrize(
    ("build", "has_penalty"),
    [
        (lambda: presets.saelens("standard"), True),
        (lambda: presets.saelens("standard", lp_norm=2.0), False),  # its p-norm is the term "lp_sparsity"
        (lambda: presets.saelens("topk"), False),
        (lambda: presets.saelens("jumprelu"), False),
        (lambda: presets.dictionary_learning("standard_april_update"), True),
        (lambda: presets.dictionary_learning("top_k", d_model=4), False),
        (lambda: presets.dictionary_learning("jumprelu"), False),
        (lambda: presets.sparsify(4), False),
        (lambda: presets.openai(4, mse_scale=1.0), False),
        (lambda: presets.saev("top-k"), True),  # saev logs its (zero-weighted) L1Sparsity for every activation
    ],
)
def test_only_a_peer_with_an_l1_penalty_has_the_sparsity_member(build: Callable[[], Any], has_penalty: bool) -> None:
    """A loss without an L1 penalty has no zero-weighted "sparsity" term: no key, no pass, no coefficient."""
    loss_fn = build()
    assert ("sparsity" in loss_fn) == has_penalty
    assert ("sparsity" in loss_fn["loss"].terms) == has_penalty
    assert hasattr(loss_fn, "sparsity_coefficient") == has_penalty
