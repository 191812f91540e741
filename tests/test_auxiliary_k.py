"""AuxiliaryKLoss against each peer's AuxK, written here in float64 the way that peer writes it (value and gradients).

The registry (tests/tester.py, ``auxk_*`` cases) runs the generic checks (uneven batches, checkpoints, nan_strategy, two
ranks); this file checks each convention against its peer's own formula, the degenerate batches and the options.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.nn.functional import embedding_bag

import sparse_metrics as sm
from sparse_metrics.functional import auxiliary_k, auxiliary_k_loss

D_MODEL, D_SAE = 6, 14
CONVENTIONS = ("openai", "sparsify", "dictionary_learning", "saelens", "saev")
RATIOS = ("openai", "sparsify", "dictionary_learning")
FLOAT32_MAX = torch.finfo(torch.float32).max


def _step(batch: int, seed: int, dead: Tensor | None = None) -> dict[str, Tensor]:
    """One float64 step without a component axis; ``dead`` marks 5 of 14 latents dead by default (k_aux 3 < 5)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(D_SAE, D_MODEL, generator=generator, dtype=torch.float64)
    bias = torch.randn(D_MODEL, generator=generator, dtype=torch.float64)
    pre = torch.randn(batch, D_SAE, generator=generator, dtype=torch.float64)
    top = pre.relu().topk(3, dim=-1)
    learned = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    source = torch.randn(batch, D_MODEL, generator=generator, dtype=torch.float64) + 0.5
    if dead is None:
        dead = torch.zeros(D_SAE, dtype=torch.bool)
        dead[[0, 3, 5, 8, 13]] = True
    return {
        "source_activations": source,
        "decoded_activations": learned @ weight + bias,
        "pre_activations": pre,
        "decoder_weight": weight,
        "dead_mask": dead,
        "decoder_bias": bias,
        "learned_activations": learned,
    }


def _leaves(step: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: value.clone().requires_grad_(value.is_floating_point()) for name, value in step.items()}


# --- each peer's AuxK, as the peer writes it ------------------------------------------------------------------------


def _dense(indices: Tensor, values: Tensor) -> Tensor:
    return torch.zeros(indices.shape[0], D_SAE, dtype=values.dtype).scatter(-1, indices, values)


def openai(x, x_hat, h, w_dec, b, dead, k):  # train.py: normalized_mse(decode_sparse(auxk), x - recons.detach() + b)
    vals, inds = torch.topk(h * dead, k=k, dim=-1)
    e_hat = _dense(inds, vals.relu()) @ w_dec + b
    xs = x - x_hat.detach() + b.detach()
    # the Triton mse's backward reaches its first argument only: the target gets none (detached here), and the
    # denominator's first argument (the batch mean) gets gradients that sum to 0
    mse = ((e_hat - xs.detach()) ** 2).mean(dim=1).mean()
    variance = ((xs.mean(dim=0) - xs) ** 2).mean(dim=1).mean().detach()
    return (mse / variance).nan_to_num(0)


def sparsify(x, x_hat, h, w_dec, b, dead, k=None):  # sparse_coder.py forward (its fused encoder: no grad to pre_acts)
    pre_acts = h.detach().relu()
    num_dead = int(dead.sum())
    if num_dead == 0:
        return x.new_tensor(0.0)
    k_aux = x.shape[-1] // 2 if k is None else k
    scale = min(num_dead / k_aux, 1.0)
    k_aux = min(k_aux, num_dead)
    acts, indices = torch.where(dead[None], pre_acts, -torch.inf).topk(k_aux, sorted=False)
    e_hat = _dense(indices, acts) @ w_dec
    e = x - x_hat
    total_variance = (x - x.mean(0)).pow(2).sum()
    return scale * (e_hat - e.detach()).pow(2).sum() / total_variance


def dictionary_learning(
    x, x_hat, h, w_dec, b, dead, k=None
):  # trainers/top_k.py get_auxiliary_loss(e.detach(), relu(h))
    residual = (x - x_hat).detach()
    post_relu = h.relu()
    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_tensor(0.0)
    k_aux = min(x.shape[-1] // 2 if k is None else k, n_dead)
    acts, indices = torch.where(dead[None], post_relu, -torch.inf).topk(k_aux, sorted=False)
    l2 = (residual - _dense(indices, acts) @ w_dec).pow(2).sum(dim=-1).mean()
    denominator = (residual - residual.mean(dim=0)[None, :]).pow(2).sum(dim=-1).mean()
    return (l2 / denominator).nan_to_num(0.0)


def saelens(x, x_hat, h, w_dec, b, dead, k=None):  # topk_sae.py calculate_topk_aux_loss (aux_loss_coefficient 1)
    num_dead = int(dead.sum())
    if num_dead == 0:
        return x.new_tensor(0.0)
    residual = (x - x_hat).detach()
    k_aux = x.shape[-1] // 2 if k is None else k
    scale = min(num_dead / k_aux, 1.0)
    k_aux = min(k_aux, num_dead)
    top = torch.where(dead[None], h, -torch.inf).topk(k_aux, sorted=False)
    recons = _dense(top.indices, top.values) @ w_dec
    return scale * (recons - residual).pow(2).sum(dim=-1).mean()


def saev(x, x_hat, h, w_dec, b, dead, k=512):  # nn/modeling.py AuxK.loss (alpha 1)
    residual = (x - x_hat).detach()
    k_use = min(k, int(dead.sum()))
    if k_use == 0:
        return residual.new_zeros(())
    _, top_i = h.masked_fill(~dead, float("-inf")).topk(k_use, dim=-1)
    aux_recon = torch.zeros_like(h).scatter(-1, top_i, h.gather(-1, top_i)) @ w_dec + b
    return (aux_recon - residual).pow(2).mean()


PEERS = {
    "openai": openai,
    "sparsify": sparsify,
    "dictionary_learning": dictionary_learning,
    "saelens": saelens,
    "saev": saev,
}


def _peer(convention: str, step: dict[str, Tensor], k: int | None) -> Tensor:
    args = [step[name] for name in sm.AuxiliaryKLoss._positional_inputs]
    return PEERS[convention](*args[:4], args[5], args[4], **({} if k is None else {"k": k}))


def _metric(convention: str, k: int | None, **kwargs) -> sm.AuxiliaryKLoss:
    d_model = {"d_model": D_MODEL} if convention in RATIOS else {}
    return sm.AuxiliaryKLoss(k_aux=k, convention=convention, **d_model, **kwargs)


def _inputs(step: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: step[name] for name in sm.AuxiliaryKLoss._positional_inputs}


# k_aux: below the 5 dead latents, above them (the cap and the scale), the default (d_model // 2, 256 or 512)
K_AUX = {"openai": [3, 9, None], "saev": [2, 9, None]}


@pytest.mark.parametrize(
    ("convention", "k_aux"),
    [(c, k) for c in CONVENTIONS for k in K_AUX.get(c, [2, 9, None]) if not (c == "openai" and k is None)],
)
@pytest.mark.parametrize("decode", ["dense", "bag"])
def test_forward_value_and_gradients_equal_the_peer(convention, k_aux, decode, monkeypatch):
    # every pick count decoded by the dense product (fraction 0), or by the embedding bag (fraction 1)
    monkeypatch.setattr(auxiliary_k, "SPARSE_DECODE_FRACTION", 0.0 if decode == "dense" else 1.0)
    bags = []
    monkeypatch.setattr(auxiliary_k, "embedding_bag", lambda *a, **kw: bags.append(1) or embedding_bag(*a, **kw))
    step = _step(8, seed=1)
    ours, theirs = _leaves(step), _leaves(step)
    metric = _metric(convention, k_aux)
    value = metric(**_inputs(ours))
    expected = _peer(convention, theirs, k_aux)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    value.backward()
    expected.backward()
    for name in sm.AuxiliaryKLoss._positional_inputs:
        got = ours[name].grad if ours[name].grad is not None else torch.zeros_like(step[name])
        want = theirs[name].grad if theirs[name].grad is not None else torch.zeros_like(step[name])
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda text, name=name: f"{name}: {text}")
    assert ours["decoder_weight"].grad.abs().sum() > 0
    no_grad = {"sparsify": "pre_activations"}.get(convention)
    if no_grad:  # its fused encoder's backward drops the auxiliary gradient
        assert ours[no_grad].grad is None or not ours[no_grad].grad.any()
    else:
        assert ours["pre_activations"].grad.abs().sum() > 0
    assert ours["decoded_activations"].grad is None or not ours["decoded_activations"].grad.any()  # detached
    assert bool(bags) == (decode == "bag")


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_the_bag_and_the_dense_decode_agree_for_several_components(convention, monkeypatch):
    """Each component's picks index its own rows of the stacked decoder, in the bag as in the dense product."""
    steps = [_step(8, seed=seed) for seed in (3, 4, 5)]
    stacked = {name: torch.stack([step[name] for step in steps], dim=1) for name in steps[0]}
    for name in ("decoder_weight", "decoder_bias", "dead_mask"):  # per-component parameters: [component, ...]
        stacked[name] = torch.stack([step[name] for step in steps])
    stacked["dead_mask"][1, :4] = ~stacked["dead_mask"][1, :4]  # the components' dead latents differ
    results = []
    for fraction in (0.0, 1.0):
        monkeypatch.setattr(auxiliary_k, "SPARSE_DECODE_FRACTION", fraction)
        leaves = _leaves(stacked)
        value = sm.AuxiliaryKLoss(3, k_aux=4, convention=convention, d_model=D_MODEL)(**_inputs(leaves))
        value.sum().backward()
        results.append((value.detach(), leaves["decoder_weight"].grad, leaves["pre_activations"].grad))
    (dense_value, *dense_grads), (bag_value, *bag_grads) = results
    torch.testing.assert_close(bag_value, dense_value, rtol=1e-12, atol=0)
    for bag, dense in zip(bag_grads, dense_grads, strict=True):
        if dense is None:  # sparsify: no gradient to the pre-activations
            assert bag is None or not bag.any()
        else:
            torch.testing.assert_close(bag, dense, rtol=1e-10, atol=1e-12)
    assert dense_grads[0].abs().sum() > 0


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_compute_over_uneven_batches_is_the_peer_over_every_item(convention):
    """Items of every batch pooled: the per-item mean, or the ratio of sums over every item (one dead mask)."""
    shared = ("decoder_weight", "decoder_bias", "dead_mask")
    steps = [_step(size, seed=size) for size in (5, 1, 0, 7)]
    steps = [{**step, **{name: steps[0][name] for name in shared}} for step in steps]
    every = {name: steps[0][name] if name in shared else torch.cat([s[name] for s in steps]) for name in steps[0]}
    metric = _metric(convention, 4 if convention != "openai" else 3)
    for index, step in enumerate(steps):
        (metric.update if index % 2 else metric.forward)(**_inputs(step))
    expected = _peer(convention, every, 4 if convention != "openai" else 3)
    torch.testing.assert_close(metric.compute(), expected, rtol=1e-12, atol=0)


def test_the_conventions_differ_on_one_batch():
    step = _step(8, seed=2)
    values = [_metric(c, 4 if c != "openai" else 3)(**_inputs(step)).item() for c in CONVENTIONS]
    assert len({round(v, 9) for v in values}) == len(values), values


def test_a_varying_dead_count_scales_each_step_as_the_peer_does():
    """SAELens: each step's items carry that step's min(n_dead / k_aux, 1); compute() is the mean over items."""
    few = torch.zeros(D_SAE, dtype=torch.bool)
    few[[2]] = True
    steps = [_step(4, seed=3), _step(6, seed=4, dead=few), _step(3, seed=5, dead=torch.zeros(D_SAE, dtype=torch.bool))]
    metric = _metric("saelens", 3)
    for step in steps:
        metric.update(**_inputs(step))
    per_step = [
        saelens(
            *[
                s[n]
                for n in (
                    "source_activations",
                    "decoded_activations",
                    "pre_activations",
                    "decoder_weight",
                    "decoder_bias",
                    "dead_mask",
                )
            ],
            k=3,
        )
        for s in steps
    ]
    expected = sum(value * len(s["source_activations"]) for value, s in zip(per_step, steps, strict=True)) / 13
    torch.testing.assert_close(metric.compute(), expected, rtol=1e-12, atol=0)
    assert per_step[2] == 0


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_no_dead_latent_gives_what_the_peer_gives(convention):
    """0, except OpenAI: its top-k of h·dead picks zeros and its value is the residual's own normalised error."""
    step = _step(6, seed=6, dead=torch.zeros(D_SAE, dtype=torch.bool))
    value = _metric(convention, 3)(**_inputs(step))
    torch.testing.assert_close(value, _peer(convention, step, 3), rtol=1e-12, atol=0)
    assert (value != 0) == (convention == "openai")


@pytest.mark.parametrize(
    ("convention", "expected"),
    [("openai", FLOAT32_MAX), ("sparsify", torch.inf), ("dictionary_learning", FLOAT32_MAX)],
)
def test_a_one_item_batch_gives_what_the_peer_gives(convention, expected):
    """The normaliser of one item is 0: the peers' nan_to_num gives float32's max (they compute in float32), sparsify
    divides by 0; the per-item conventions stay finite."""
    step = _step(1, seed=7)
    value = _metric(convention, 3)(**_inputs(step))
    assert value.item() == expected
    if convention != "openai":  # the float64 formula's nan_to_num gives float64's max
        assert _peer(convention, step, 3).item() in (expected, torch.finfo(torch.float64).max)
    for per_item in ("saelens", "saev"):
        assert torch.isfinite(_metric(per_item, 3)(**_inputs(step)))


def test_k_aux_above_d_sae():
    """The capped conventions pick every dead latent; OpenAI's top-k over every latent cannot: an error."""
    step = _step(5, seed=8)
    torch.testing.assert_close(_metric("saelens", 40)(**_inputs(step)), _peer("saelens", step, 40))
    with pytest.raises(ValueError, match="`k_aux`=40 exceeds d_sae=14"):
        _metric("openai", 40)(**_inputs(step))


def test_multiple_components_are_independent():
    steps = [_step(5, seed=9), _step(5, seed=10)]
    stacked = {
        name: torch.stack(
            [s[name] for s in steps],
            dim=1 if name in ("source_activations", "decoded_activations", "pre_activations") else 0,
        )
        for name in sm.AuxiliaryKLoss._positional_inputs
    }
    for convention in CONVENTIONS:
        value = _metric(convention, 3, num_components=2)(**stacked)
        expected = torch.stack([_peer(convention, s, 3) for s in steps])
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
        functional = auxiliary_k_loss(**stacked, k_aux=3, convention=convention)
        torch.testing.assert_close(functional, expected, rtol=1e-12, atol=0)


# --- SAELens' Matryoshka AuxK ---------------------------------------------------------------------------------------


def saelens_matryoshka(x, f, h, w_dec, b, dead, widths, k=None):  # matryoshka_batchtopk_sae.py, rescale off
    k_aux = x.shape[-1] // 2 if k is None else k
    losses, prev, decoded = [], 0, b
    for width in widths:
        decoded = f[:, prev:width] @ w_dec[prev:width] + decoded
        level_dead = dead[prev:width]
        n = int(level_dead.sum())
        if n == 0:
            prev = width
            continue
        scale = min(n / k_aux, 1.0)
        residual = (x - decoded).detach()
        top = torch.where(level_dead[None], h[:, prev:width], -torch.inf).topk(min(k_aux, n), sorted=False)
        acts = torch.zeros_like(h[:, prev:width]).scatter(-1, top.indices, top.values)
        losses.append(scale * (acts @ w_dec[prev:width] - residual).pow(2).sum(dim=-1).mean())
        prev = width
    return torch.stack(losses).sum() if losses else x.new_tensor(0.0)


@pytest.mark.parametrize(("prefix_sizes", "widths"), [([4, 9, D_SAE], [4, 9, D_SAE]), ([6], [6, D_SAE])])
def test_matryoshka_is_the_sum_over_levels_as_saelens(prefix_sizes, widths):
    """Each level's dead latents decode the residual of the prefix through that level; the full width is appended."""
    step = _step(7, seed=11)
    ours, theirs = _leaves(step), _leaves(step)
    metric = sm.AuxiliaryKLoss(k_aux=2, convention="saelens", prefix_sizes=prefix_sizes)
    names = (
        "source_activations",
        "learned_activations",
        "pre_activations",
        "decoder_weight",
        "dead_mask",
        "decoder_bias",
    )
    value = metric(**{n: ours[n] for n in names})
    expected = saelens_matryoshka(
        *[theirs[n] for n in names[:4]], theirs["decoder_bias"], theirs["dead_mask"], widths, k=2
    )
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    value.backward()
    expected.backward()
    for name in ("pre_activations", "decoder_weight", "decoder_bias", "learned_activations"):
        got = ours[name].grad if ours[name].grad is not None else torch.zeros_like(step[name])
        torch.testing.assert_close(got, theirs[name].grad if theirs[name].grad is not None else torch.zeros_like(got))
    with pytest.raises(TypeError, match="`learned_activations`"):
        metric(**{n: step[n] for n in names if n != "learned_activations"})
    with pytest.raises(TypeError, match="`decoder_bias`"):
        metric(**{n: step[n] for n in names if n != "decoder_bias"})


def test_saelens_decoder_norm_rescaling_is_the_normalised_decoder():
    """SAELens decodes (f / ‖W_i‖) W: passing W / ‖W‖ (row-wise) gives the same value and gradients w.r.t. W."""
    step = _step(6, seed=12)
    weight = step["decoder_weight"].clone().requires_grad_()
    theirs_weight = step["decoder_weight"].clone().requires_grad_()
    normalised = weight / weight.norm(dim=-1, keepdim=True)
    value = _metric("saelens", None)(**{**_inputs(step), "decoder_weight": normalised})
    x, x_hat, h = (step[n] for n in ("source_activations", "decoded_activations", "pre_activations"))
    dead = step["dead_mask"]
    top = torch.where(dead[None], h, -torch.inf).topk(min(D_MODEL // 2, int(dead.sum())), sorted=False)
    acts = _dense(top.indices, top.values) * (1 / theirs_weight.norm(dim=-1))  # act_times_W_dec, rescale on
    expected = min(int(dead.sum()) / (D_MODEL // 2), 1.0) * (acts @ theirs_weight - (x - x_hat)).pow(2).sum(-1).mean()
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    value.backward()
    expected.backward()
    torch.testing.assert_close(weight.grad, theirs_weight.grad, rtol=1e-10, atol=1e-12)


# --- options and errors ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric TotalLoss")  # TotalLoss records nothing itself
def test_total_loss_weights_it_with_the_peers_coefficient():
    steps = [_step(5, seed=13), _step(3, seed=14)]
    for convention in ("dictionary_learning", "saev"):
        term = _metric(convention, 3)
        total = sm.TotalLoss({"auxk": term}, coefficients={"auxk": 1 / 32})
        values = []
        for step in steps:
            batch = term._make_batch((), _inputs(step))
            contribution = batch.contribution(term)
            with torch.no_grad():
                term._record_counted(contribution)
            values.append(total._value((contribution,)))
            torch.testing.assert_close(values[-1], _peer(convention, step, 3) / 32, rtol=1e-12, atol=0)
        torch.testing.assert_close(total.compute(), term.compute() / 32, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"convention": "anthropic"}, ValueError, "'openai', 'sparsify', 'dictionary_learning', 'saelens' or 'saev'"),
        ({"convention": "saev", "prefix_sizes": [4]}, ValueError, "`prefix_sizes`"),
        ({"convention": "openai"}, ValueError, "pass `d_model`"),
        ({"convention": "sparsify", "d_model": D_MODEL, "keep_batch_dim": True}, ValueError, "`keep_batch_dim=True`"),
        ({"convention": "saelens", "k_aux": 0}, ValueError, "k_aux"),
        ({"convention": "saelens", "prefix_sizes": [5, 3]}, ValueError, "`prefix_sizes`"),
    ],
)
def test_impossible_options_raise_at_construction(kwargs, error, fragment):
    with pytest.raises(error, match=None) as raised:
        sm.AuxiliaryKLoss(**kwargs)
    assert fragment in str(raised.value)


@pytest.mark.parametrize("convention", ["openai", "saev"])
def test_decoder_bias_is_required_where_it_enters(convention):
    step = _step(4, seed=15)
    metric = _metric(convention, 3)
    with pytest.raises(TypeError, match="`decoder_bias`"):
        metric(**{**_inputs(step), "decoder_bias": None})
    assert metric.update_count == 0


def test_functional_keep_batch_dim_and_its_errors():
    step = _step(5, seed=16)
    rows = auxiliary_k_loss(**_inputs(step), k_aux=3, convention="saev", keep_batch_dim=True)
    assert rows.shape == (5,)
    torch.testing.assert_close(rows.mean(), _peer("saev", step, 3), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="`keep_batch_dim=True`"):
        auxiliary_k_loss(**_inputs(step), k_aux=3, convention="openai", keep_batch_dim=True)
    metric = _metric("saelens", 3)
    with pytest.raises(ValueError, match=r"`dead_mask` must have shape \[\*component, d_sae\] = \[14\]"):
        metric(**{**_inputs(step), "dead_mask": step["dead_mask"][:5]})
    with pytest.raises(TypeError, match="`dead_mask` must be a torch\\.bool tensor"):
        metric(**{**_inputs(step), "dead_mask": step["dead_mask"].float()})
    assert metric.update_count == 0
