"""The JumpReLU terms (and the Lp option of SparsityLoss) against each peer's formula, value and gradients.

Each peer's definition is written here by hand in float64, its straight-through gradient in closed form (no peer
code): ``forward`` on one batch against the formula on that batch (value, and the gradients to ``h``, ``theta``,
``f`` and ``W_dec``), ``compute()`` over uneven batches against the formula on all their items. The data puts
pre-activations within a bandwidth of their threshold (so that the estimators are not zero), thresholds below half
a bandwidth (where dictionary_learning's step on ``f`` and SAELens' step on ``h`` differ), negative activations (no
absolute value in the tanh penalty) and decoder rows whose norms are not 1.
"""

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import sparse_metrics as sm
from sparse_metrics.functional import jumprelu_l0_loss, pre_activation_loss, sparsity_loss, tanh_sparsity_loss

D_MODEL, D_SAE = 5, 16
BATCH_SIZES = (6, 1, 9)


def _kernel(u: Tensor) -> Tensor:
    """The rectangle kernel 1[-1/2 < u < 1/2]."""
    return ((u > -0.5) & (u < 0.5)).double()


def _parameters(generator: torch.Generator, bandwidth: float) -> dict[str, Tensor]:
    theta = 0.1 + 0.3 * torch.rand(D_SAE, generator=generator, dtype=torch.float64)
    theta[:3] = bandwidth * torch.tensor([0.1, 0.3, 0.45], dtype=torch.float64)  # below half a bandwidth
    weight = torch.randn(D_SAE, D_MODEL, generator=generator, dtype=torch.float64)
    weight = weight * (0.3 + 2 * torch.rand(D_SAE, 1, generator=generator, dtype=torch.float64))
    return {"theta": theta, "w": weight, "dead": torch.rand(D_SAE, generator=generator) < 0.5}


def _batches(bandwidth: float, seed: int = 0) -> list[dict[str, Tensor]]:
    """Uneven float64 batches of one SAE: h around theta (a third within a bandwidth), f signed and sparse."""
    generator = torch.Generator().manual_seed(seed)
    shared = _parameters(generator, bandwidth)
    out = []
    for size in BATCH_SIZES:
        theta = shared["theta"]
        h = theta + 0.5 * torch.randn(size, D_SAE, generator=generator, dtype=torch.float64)
        near = torch.rand(size, D_SAE, generator=generator) < 0.35
        offsets = bandwidth * 1.6 * (torch.rand(size, D_SAE, generator=generator, dtype=torch.float64) - 0.5)
        h = torch.where(near, theta + offsets, h)
        h[:, :3] = -0.5  # inactive latents whose threshold is below half a bandwidth
        f = torch.randn(size, D_SAE, generator=generator, dtype=torch.float64)
        f = f * (torch.rand(size, D_SAE, generator=generator) < 0.5)
        out.append({"h": h, **shared, "f": f})
    return out


def _leaves(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in batch.items()}


def _grads(leaves: dict[str, Tensor], names: tuple[str, ...]) -> dict[str, Tensor]:
    return {n: torch.zeros_like(leaves[n]) if leaves[n].grad is None else leaves[n].grad for n in names}


def _check(
    make: Callable[[], Any],
    feed: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    peer_per_item: Callable[[dict[str, Tensor]], Tensor],
    peer_grads: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    batches: list[dict[str, Tensor]],
    *,
    reduce: Callable[[Tensor], Tensor] = lambda per_item: per_item.mean(),
) -> None:
    """forward on one batch: value and gradients as the peer's; compute() over uneven batches as its formula."""
    leaves = _leaves(batches[0])
    value = make()(**feed(leaves))
    torch.testing.assert_close(value, reduce(peer_per_item(batches[0])), rtol=1e-12, atol=1e-12)
    value.backward()
    expected = peer_grads(batches[0])
    got = _grads(leaves, tuple(expected))
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-12, atol=1e-12, msg=lambda t, n=name: f"{n}: {t}")
    assert any(grad.abs().sum() > 0 for grad in expected.values())
    metric = make()
    for batch in batches:
        metric.update(**feed(batch))
    every = {k: torch.cat([b[k] for b in batches]) if k in ("h", "f") else batches[0][k] for k in batches[0]}
    torch.testing.assert_close(metric.compute(), reduce(peer_per_item(every)), rtol=1e-12, atol=1e-12)


def _jumprelu_inputs(b: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"pre_activations": b["h"], "threshold": b["theta"]}


# --- JumpReLU L0 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ste_to_input", [False, True])
def test_saelens_step_l0(ste_to_input):
    """SAELens ``Step`` (mode "step"): mean_b sum_i H(h - theta); theta gets -(1/eps) K((h - theta)/eps) / B summed
    over items, h gets the negation with ``jumprelu_ste_to_input`` and nothing without; eps = 0.05."""
    eps = 0.05
    batches = _batches(eps)

    def per_item(b: dict[str, Tensor]) -> Tensor:
        return (b["h"] > b["theta"]).double().sum(-1)

    def grads(b: dict[str, Tensor]) -> dict[str, Tensor]:
        estimate = _kernel((b["h"] - b["theta"]) / eps) / eps / len(b["h"])
        return {"theta": -estimate.sum(0), "h": estimate if ste_to_input else torch.zeros_like(b["h"])}

    _check(lambda: sm.JumpReLUL0Loss(ste_to_input=ste_to_input), _jumprelu_inputs, per_item, grads, batches)


def test_saelens_quadratic_target():
    """SAELens mode "quadratic" (Gemma Scope 2): mean_b 2/T (L0_b - T)^2, a per-item value; its gradient to theta
    is the Step estimate times 4/T (L0_b - T) / B."""
    eps, target = 0.05, 5.0
    batches = _batches(eps, seed=1)

    def l0(b: dict[str, Tensor]) -> Tensor:
        return (b["h"] > b["theta"]).double().sum(-1)

    def grads(b: dict[str, Tensor]) -> dict[str, Tensor]:
        outer = 4 / target * (l0(b) - target) / len(b["h"])
        return {"theta": -(_kernel((b["h"] - b["theta"]) / eps) / eps * outer[:, None]).sum(0)}

    _check(
        lambda: sm.JumpReLUL0Loss(target_l0=target),
        _jumprelu_inputs,
        lambda b: 2 / target * (l0(b) - target) ** 2,
        grads,
        batches,
    )
    # Not dictionary_learning's (mean L0 / T - 1)^2: the data tells them apart.
    metric = sm.JumpReLUL0Loss(target_l0=target, keep_batch_dim=True)
    assert metric(**_jumprelu_inputs(batches[0])).shape == (len(batches[0]["h"]),)


@pytest.mark.parametrize("target_l0", [None, 6.0])
def test_dictionary_learning_step_on_f(target_l0):
    """dictionary_learning ``StepFunction(f, threshold, 0.001)`` on the JumpReLU output f = h 1[h > theta]:
    theta gets -(1/eps) K((f - theta)/eps) g_b summed over items (an inactive latent at (0 - theta)/eps), f and so h
    get nothing; with ``target_l0`` (its trainer without the coefficient) the value is (mean_b L0 / T - 1)^2 of the
    mean over every item, so g_b = 2 (L0/T - 1) / (T B). Its bandwidth is stored as float32."""
    eps = float(torch.tensor(0.001, dtype=torch.float32))
    batches = _batches(0.001, seed=2)

    def f_of(b: dict[str, Tensor]) -> Tensor:
        return b["h"] * (b["h"] > b["theta"]).double()

    def per_item(b: dict[str, Tensor]) -> Tensor:
        return (f_of(b) > b["theta"]).double().sum(-1)

    def reduce(values: Tensor) -> Tensor:
        return values.mean() if target_l0 is None else (values.mean() / target_l0 - 1) ** 2

    def grads(b: dict[str, Tensor]) -> dict[str, Tensor]:
        mean = per_item(b).mean()
        outer = 1.0 if target_l0 is None else 2 * (mean / target_l0 - 1) / target_l0
        estimate = _kernel((f_of(b) - b["theta"]) / eps) / eps * outer / len(b["h"])
        return {"theta": -estimate.sum(0), "h": torch.zeros_like(b["h"])}

    def make() -> sm.JumpReLUL0Loss:
        return sm.JumpReLUL0Loss(convention="dictionary_learning", target_l0=target_l0)

    _check(make, _jumprelu_inputs, per_item, grads, batches, reduce=reduce)
    # The latents whose threshold is below half a bandwidth get a gradient while inactive: SAELens' step on h gives
    # them none, so the two conventions differ on this data.
    leaves = _leaves(batches[0])
    make()(**_jumprelu_inputs(leaves)).backward()
    assert leaves["theta"].grad[:3].abs().min() > 0
    saelens = _leaves(batches[0])
    sm.JumpReLUL0Loss(bandwidth=0.001)(**_jumprelu_inputs(saelens)).backward()
    assert torch.equal(saelens["theta"].grad[:3], torch.zeros(3, dtype=torch.float64))


def test_dictionary_learning_target_is_of_the_pooled_mean():
    """forward: the target form of the batch's mean L0; compute(): of the mean over every item, not a mean of the
    batches' values."""
    batches = _batches(0.001, seed=3)
    metric = sm.JumpReLUL0Loss(convention="dictionary_learning", target_l0=4.0)
    values = [metric(**_jumprelu_inputs(b)) for b in batches]
    l0 = [(b["h"] > b["theta"]).double().sum(-1) for b in batches]
    for value, counts in zip(values, l0, strict=True):
        torch.testing.assert_close(value, (counts.mean() / 4.0 - 1) ** 2)
    pooled = (torch.cat(l0).mean() / 4.0 - 1) ** 2
    torch.testing.assert_close(metric.compute(), pooled)
    assert not torch.isclose(torch.stack(values).mean(), pooled)


def test_default_bandwidth_is_the_conventions():
    assert sm.JumpReLUL0Loss().bandwidth == 0.05
    assert sm.JumpReLUL0Loss(convention="dictionary_learning").bandwidth == float(
        torch.tensor(0.001, dtype=torch.float32)
    )
    assert sm.JumpReLUL0Loss(bandwidth=0.2).bandwidth == 0.2


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"convention": "openai"}, ["convention", "saelens", "dictionary_learning"]),
        ({"convention": "dictionary_learning", "ste_to_input": True}, ["ste_to_input", "saelens"]),
        (
            {"convention": "dictionary_learning", "target_l0": 3.0, "keep_batch_dim": True},
            ["keep_batch_dim", "batch-mean L0"],
        ),
        ({"bandwidth": 0.0}, ["bandwidth", "greater than 0"]),
        ({"target_l0": -1.0}, ["target_l0", "greater than 0"]),
    ],
)
def test_jumprelu_options_a_peer_does_not_define_are_refused(kwargs, fragments):
    with pytest.raises(ValueError, match=fragments[0]) as raised:
        sm.JumpReLUL0Loss(**kwargs)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_keep_batch_dim_setter_refuses_the_batch_target():
    metric = sm.JumpReLUL0Loss(convention="dictionary_learning", target_l0=3.0)
    with pytest.raises(ValueError, match="keep_batch_dim"):
        metric.keep_batch_dim = True
    assert metric.keep_batch_dim is False
    plain = sm.JumpReLUL0Loss()
    plain.keep_batch_dim = True
    assert plain.keep_batch_dim is True


# --- tanh -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [4.0, 1.5])
def test_saelens_tanh_sparsity(scale):
    """SAELens mode "tanh": mean_b sum_i tanh(c f_i ||W_i||), no absolute value: at f = 0 the gradient is
    c ||W_i|| / B, and a negative activation lowers the penalty."""
    batches = _batches(0.05, seed=4)

    def per_item(b: dict[str, Tensor]) -> Tensor:
        return torch.tanh(scale * b["f"] * b["w"].norm(dim=-1)).sum(-1)

    def grads(b: dict[str, Tensor]) -> dict[str, Tensor]:
        norms = b["w"].norm(dim=-1)
        outer = (1 - torch.tanh(scale * b["f"] * norms) ** 2) / len(b["f"])
        unit = b["w"] / norms[:, None]
        return {"f": outer * scale * norms, "w": (outer * scale * b["f"]).sum(0)[:, None] * unit}

    def feed(b: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"learned_activations": b["f"], "decoder_weight": b["w"]}

    _check(lambda: sm.TanhSparsityLoss(scale=scale), feed, per_item, grads, batches)
    absolute = torch.tanh(scale * batches[0]["f"].abs() * batches[0]["w"].norm(dim=-1)).sum(-1).mean()
    assert sm.TanhSparsityLoss(scale=scale)(**feed(batches[0])) < absolute


def test_tanh_sparsity_options_and_errors():
    b = _batches(0.05, seed=5)[0]
    plain = sm.TanhSparsityLoss(decoder_norm_weighting=False)(learned_activations=b["f"])
    torch.testing.assert_close(plain, torch.tanh(4.0 * b["f"]).sum(-1).mean())
    with pytest.raises(TypeError, match=r"`decoder_weight`.*decoder_norm_weighting=True"):
        sm.TanhSparsityLoss()(learned_activations=b["f"])
    with pytest.raises(ValueError, match="scale"):
        sm.TanhSparsityLoss(scale=0.0)
    torch.testing.assert_close(
        tanh_sparsity_loss(b["f"], decoder_weight=b["w"], scale=2.0),
        sm.TanhSparsityLoss(scale=2.0)(learned_activations=b["f"], decoder_weight=b["w"]),
    )


# --- pre-activation loss ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("peer", ["saelens", "lm_saes"])
def test_pre_activation_loss(peer):
    """SAELens ``calculate_pre_act_loss`` (coefficient 1): mean_b sum_i relu(theta_i - h_i) dead_i ||W_i||, nothing
    detached (h, theta and W_dec get gradients); lm_saes applies it to every latent (``dead_only=False``)."""
    batches = _batches(0.05, seed=6)
    dead_only = peer == "saelens"

    def mask(b: dict[str, Tensor]) -> Tensor:
        return b["dead"].double() if dead_only else torch.ones(D_SAE, dtype=torch.float64)

    def per_item(b: dict[str, Tensor]) -> Tensor:
        return (torch.clamp(b["theta"] - b["h"], min=0) * mask(b) * b["w"].norm(dim=-1)).sum(-1)

    def grads(b: dict[str, Tensor]) -> dict[str, Tensor]:
        norms = b["w"].norm(dim=-1)
        below = (b["theta"] > b["h"]).double() * mask(b) / len(b["h"])
        gap = (torch.clamp(b["theta"] - b["h"], min=0) * mask(b) / len(b["h"])).sum(0)
        return {
            "h": -below * norms,
            "theta": (below * norms).sum(0),
            "w": gap[:, None] * b["w"] / norms[:, None],
        }

    def feed(b: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"pre_activations": b["h"], "threshold": b["theta"], "decoder_weight": b["w"], "dead_mask": b["dead"]}

    _check(lambda: sm.PreActivationLoss(dead_only=dead_only), feed, per_item, grads, batches)
    if not dead_only:  # the data tells the two apart
        every = sm.PreActivationLoss(dead_only=False)(**feed(batches[0]))
        assert every > sm.PreActivationLoss()(**feed(batches[0]))


def test_pre_activation_options_and_errors():
    b = _batches(0.05, seed=7)[0]
    inputs = {"pre_activations": b["h"], "threshold": b["theta"], "decoder_weight": b["w"]}
    with pytest.raises(TypeError, match=r"`dead_mask`.*dead_only=True"):
        sm.PreActivationLoss()(**inputs)
    with pytest.raises(TypeError, match=r"`decoder_weight`.*decoder_norm_weighting=True"):
        sm.PreActivationLoss(dead_only=False)(pre_activations=b["h"], threshold=b["theta"])
    unweighted = sm.PreActivationLoss(dead_only=False, decoder_norm_weighting=False)
    value = unweighted(pre_activations=b["h"], threshold=b["theta"])
    torch.testing.assert_close(value, torch.clamp(b["theta"] - b["h"], min=0).sum(-1).mean())
    torch.testing.assert_close(
        pre_activation_loss(b["h"], b["theta"], decoder_weight=b["w"], dead_mask=b["dead"]),
        sm.PreActivationLoss()(**inputs, dead_mask=b["dead"]),
    )
    with pytest.raises(TypeError, match=r"`dead_mask` must be a torch\.bool"):
        sm.PreActivationLoss()(**inputs, dead_mask=b["dead"].double())


# --- Lp sparsity ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.5, 1.5, 2.0])
def test_saelens_lp_norm(p):
    """SAELens StandardTrainingSAE with ``lp_norm=p``: mean_b ||f * ||W_dec||||_p, the p-norm (with its root) of the
    decoder-weighted activations."""
    batches = _batches(0.05, seed=8)

    def per_item(b: dict[str, Tensor]) -> Tensor:
        weighted = (b["f"] * b["w"].norm(dim=-1)).abs()
        return (weighted**p).sum(-1) ** (1 / p)

    def grads(b: dict[str, Tensor]) -> dict[str, Tensor]:
        norms = b["w"].norm(dim=-1)
        a = b["f"] * norms
        total = per_item(b)[:, None]
        # d ||a||_p / d a_i = sign(a_i) |a_i|^(p-1) / ||a||_p^(p-1); 0 at a_i = 0
        safe = torch.where(a == 0, 1.0, a.abs())
        da = torch.where(a == 0, 0.0, torch.sign(a) * safe ** (p - 1) / total ** (p - 1)) / len(b["f"])
        return {"f": da * norms, "w": (da * b["f"]).sum(0)[:, None] * b["w"] / norms[:, None]}

    def feed(b: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"learned_activations": b["f"], "decoder_weight": b["w"]}

    _check(lambda: sm.SparsityLoss(1.0, decoder_norm_weighting=True, p=p), feed, per_item, grads, batches)


@pytest.mark.parametrize("p", [0.5, 2.0])
def test_dictionary_learning_p_anneal(p):
    """dictionary_learning PAnnealTrainer ``sparsity_function="Lp^p"``: mean_b sum_i f_i^p (unweighted; f >= 0 there:
    here |f|); our gradient at an exact zero is 0 (theirs is p 0^(p-1), which its ReLU stops)."""
    batches = [{**b, "f": b["f"].abs()} for b in _batches(0.05, seed=9)]

    def per_item(b: dict[str, Tensor]) -> Tensor:
        return (b["f"] ** p).sum(-1)

    def grads(b: dict[str, Tensor]) -> dict[str, Tensor]:
        safe = torch.where(b["f"] == 0, 1.0, b["f"])
        return {"f": torch.where(b["f"] == 0, 0.0, p * safe ** (p - 1)) / len(b["f"])}

    def feed(b: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"learned_activations": b["f"]}

    _check(lambda: sm.SparsityLoss(1.0, p=p, p_root=False), feed, per_item, grads, batches)
    # "Lp": the root of the same sum.
    b = batches[0]
    torch.testing.assert_close(sm.SparsityLoss(1.0, p=p)(learned_activations=b["f"]), per_item(b).pow(1 / p).mean())


def test_lp_default_is_the_l1_bit_for_bit_and_p_must_be_positive():
    b = _batches(0.05, seed=10)[0]
    for weighting in (False, True):
        inputs = {"learned_activations": b["f"], "decoder_weight": b["w"]}
        default = sm.SparsityLoss(0.3, decoder_norm_weighting=weighting)
        explicit = sm.SparsityLoss(0.3, decoder_norm_weighting=weighting, p=1.0, p_root=False)
        assert torch.equal(default(**inputs), explicit(**inputs))
        assert default._configuration() == explicit._configuration()
        assert list(default.state_dict()) == list(explicit.state_dict())
    torch.testing.assert_close(
        sparsity_loss(b["f"], 0.3, decoder_weight=b["w"], p=2.0),
        sm.SparsityLoss(0.3, decoder_norm_weighting=True, p=2.0)(learned_activations=b["f"], decoder_weight=b["w"]),
    )
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="p"):
            sm.SparsityLoss(0.3, p=bad)
        with pytest.raises(ValueError, match="`p`"):
            sparsity_loss(b["f"], 0.3, p=bad)


# --- functional twins and TotalLoss -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"ste_to_input": True, "target_l0": 4.0},
        {"convention": "dictionary_learning", "target_l0": 4.0, "bandwidth": 0.05},
    ],
)
def test_functional_twin_equals_forward_value_and_gradient(kwargs):
    b = _batches(0.05, seed=11)[0]
    ours, theirs = _leaves(b), _leaves(b)
    value = jumprelu_l0_loss(ours["h"], ours["theta"], **kwargs)
    value.backward()
    metric_value = sm.JumpReLUL0Loss(**kwargs)(pre_activations=theirs["h"], threshold=theirs["theta"])
    metric_value.backward()
    torch.testing.assert_close(value, metric_value)
    for name in ("h", "theta"):
        torch.testing.assert_close(_grads(ours, (name,))[name], _grads(theirs, (name,))[name])


def test_total_loss_sums_the_jumprelu_terms():
    """A JumpReLU objective: the dictionary_learning target term (a function of the mean) next to item means."""
    batches = _batches(0.05, seed=12)
    terms = {
        "l0": sm.JumpReLUL0Loss(convention="dictionary_learning", target_l0=4.0, bandwidth=0.05),
        "pre_act": sm.PreActivationLoss(dead_only=False),
    }
    total = sm.TotalLoss(terms, coefficients={"pre_act": 0.5})
    for b in batches:
        inputs = {"pre_activations": b["h"], "threshold": b["theta"], "decoder_weight": b["w"]}
        contribution = tuple(term._per_item(term._make_batch((), inputs)) for term in terms.values())
        for term, part in zip(terms.values(), contribution, strict=True):
            term._record_counted(part)
        step = total._value(contribution)
        l0 = (b["h"] > b["theta"]).double().sum(-1)
        pre = (torch.clamp(b["theta"] - b["h"], min=0) * b["w"].norm(dim=-1)).sum(-1)
        torch.testing.assert_close(step, (l0.mean() / 4.0 - 1) ** 2 + 0.5 * pre.mean())
    every_h = torch.cat([b["h"] for b in batches])
    theta, w = batches[0]["theta"], batches[0]["w"]
    l0 = (every_h > theta).double().sum(-1)
    pre = (torch.clamp(theta - every_h, min=0) * w.norm(dim=-1)).sum(-1)
    torch.testing.assert_close(total.compute(), (l0.mean() / 4.0 - 1) ** 2 + 0.5 * pre.mean())


def test_the_conventions_page_names_tests_of_this_module():
    page = (Path(__file__).resolve().parents[1] / "docs" / "conventions.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`test_jumprelu\.py::(test_[a-z0-9_]+)`", page))
    assert named, "the JumpReLU rows name their tests"
    assert named <= {name for name in globals() if name.startswith("test_")}
