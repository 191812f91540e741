"""Each row of docs/conventions.md: a peer library's definition of a term, computed here by hand from its formula,
equals the sparse_metrics metric with the options the page lists.

Peer formulas are written from their published definitions (see the page), one line each, in float64; no peer code.
Batch-mean metrics are checked twice: ``forward`` on one batch against the peer's formula on that batch, and
``compute`` over two batches of different sizes against the peer's formula on all their items (their epoch value).
The data (the shared builder's) has negative activations and decoder rows whose norms are not 1, so that
``sum |f|`` and ``sum f``, ``f != 0`` and ``f > 0``, and a weighted and a plain L1 differ: where a peer's definition
differs from ours the test shows that it does, and that the two agree where the page says (``f >= 0``).
"""

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torchmetrics import Metric

import sparse_metrics as sm
from sparse_metrics.functional import (
    l2_reconstruction_loss,
    matryoshka_reconstruction_loss,
)
from tests import reference

D_MODEL, D_SAE = 6, 10
BATCH_SIZES = (5, 3)


def _batches(generator: torch.Generator) -> list[dict[str, Tensor]]:
    """Batches of one SAE (the shared builder's, one component, float64): x, x_hat = f W_dec + b_dec, sparse f with
    negative activations, the feature-major W_dec (row norms not 1) and b_dec."""
    batches: list[dict[str, Tensor]] = []
    for size in BATCH_SIZES:
        shared = batches[0]["parameters"] if batches else None
        step = reference.sae_inputs(
            size,
            components=1,
            d_model=D_MODEL,
            d_sae=D_SAE,
            generator=generator,
            dtype=torch.float64,
            parameters=shared,
            signed=True,
        )
        parameters = {name: step[name] for name in reference.PARAMETERS}
        step = reference.without_component_axis(step)
        batches.append(
            {
                "x": step["source_activations"],
                "x_hat": step["decoded_activations"],
                "f": step["learned_activations"],
                "w": step["decoder_weight"],
                "b": step["decoder_bias"],
                "parameters": parameters,
            }
        )
    return batches


def _non_negative(batches: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """The same batches with ``f`` through a ReLU, as a ReLU, JumpReLU or TopK SAE gives."""
    return [{**batch, "f": batch["f"].clamp(min=0)} for batch in batches]


def _assert_signed(batches: list[dict[str, Tensor]]) -> None:
    """The data tells ``sum |f|`` from ``sum f`` and ``f != 0`` from ``f > 0``, on each batch and on all of them."""
    for f in [batch["f"] for batch in batches] + [_epoch(batches)["f"]]:
        assert not torch.allclose(f.abs().sum(1).mean(), f.sum(1).mean())
        assert (f != 0).sum() > (f > 0).sum()


def _epoch(batches: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """All items of the batches as one batch (the decoder is shared)."""
    return {
        key: torch.cat([b[key] for b in batches]) if key in ("x", "x_hat", "f") else batches[0][key]
        for key in batches[0]
    }


def _check(
    metric: Metric,
    inputs: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    peer: Callable[[dict[str, Tensor]], Tensor],
    batches: list[dict[str, Tensor]],
) -> None:
    """``forward`` on the first batch and ``compute`` after both equal the peer's formula on the same items."""
    first = metric(**inputs(batches[0]))
    torch.testing.assert_close(first.double(), peer(batches[0]), rtol=1e-12, atol=1e-12)
    metric.update(**inputs(batches[1]))
    torch.testing.assert_close(metric.compute(), peer(_epoch(batches)), rtol=1e-12, atol=1e-12)


def _differs(
    make: Callable[[], Metric],
    inputs: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    peer: Callable[[dict[str, Tensor]], Tensor],
    batches: list[dict[str, Tensor]],
) -> None:
    """Neither ``forward`` nor ``compute`` of the metric equals the peer's formula on these items."""
    metric = make()
    first = metric(**inputs(batches[0]))
    assert not torch.allclose(first.double(), peer(batches[0]))
    metric.update(**inputs(batches[1]))
    assert not torch.allclose(metric.compute(), peer(_epoch(batches)))


def _reconstruction(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"decoded_activations": batch["x_hat"], "source_activations": batch["x"]}


def _error(batch: dict[str, Tensor]) -> Tensor:
    return batch["x_hat"] - batch["x"]


# --- MSE / L2 reconstruction ------------------------------------------------------------------------------------------


def test_prior_art_l2(generator):
    # per item: mean over d_model of e^2; mean over items
    _check(sm.L2ReconstructionLoss(), _reconstruction, lambda b: (_error(b) ** 2).mean(1).mean(0), _batches(generator))


def test_saev_mse(generator):
    # element-wise squared error, mean over every element of [batch, d_model]
    _check(sm.L2ReconstructionLoss(), _reconstruction, lambda b: (_error(b) ** 2).mean(), _batches(generator))


def test_saev_mse_normalised(generator):
    # norm=True: e_bd^2 / ||x_b||_2 (the row norm, not squared), mean over every element
    def peer(b: dict[str, Tensor]) -> Tensor:
        return ((_error(b) ** 2) / b["x"].norm(dim=1, keepdim=True)).mean()

    batches = _batches(generator)
    metric = sm.L2ReconstructionLoss(keep_batch_dim=True)
    for batch in batches:
        metric.update(**_reconstruction(batch))
    norms = torch.cat([b["x"].norm(dim=1) for b in batches])
    torch.testing.assert_close((metric.compute() / norms).mean(), peer(_epoch(batches)), rtol=1e-12, atol=1e-12)


def test_saelens_mse(generator):
    # per item: sum over d_model of e^2; mean over the batch
    _check(
        sm.L2ReconstructionLoss(feature_reduction="sum"),
        _reconstruction,
        lambda b: (_error(b) ** 2).sum(1).mean(),
        _batches(generator),
    )


def test_dictionary_learning_mse(generator):
    # "mse_loss": per item ||e_b||^2 (sum over d_model), mean over the batch
    _check(
        sm.L2ReconstructionLoss(feature_reduction="sum"),
        _reconstruction,
        lambda b: _error(b).pow(2).sum(dim=-1).mean(),
        _batches(generator),
    )


def test_dictionary_learning_l2_norm(generator):
    # "l2_loss": per item the (unsquared) Euclidean norm ||e_b||_2, mean over the batch
    batches = _batches(generator)
    metric = sm.L2ReconstructionLoss(feature_reduction="sum", keep_batch_dim=True)
    for batch in batches:
        metric.update(**_reconstruction(batch))
    epoch = _epoch(batches)
    expected = torch.linalg.vector_norm(_error(epoch), dim=-1).mean()
    torch.testing.assert_close(metric.compute().sqrt().mean(), expected, rtol=1e-12, atol=1e-12)
    # As a training loss, differentiably, with the functional form.
    x_hat = epoch["x_hat"].clone().requires_grad_()
    loss = l2_reconstruction_loss(x_hat, epoch["x"], feature_reduction="sum", keep_batch_dim=True).sqrt().mean()
    reference_x_hat = epoch["x_hat"].clone().requires_grad_()
    torch.linalg.vector_norm(reference_x_hat - epoch["x"], dim=-1).mean().backward()
    loss.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x_hat.grad, reference_x_hat.grad)


def test_openai_normalized_mse(generator):
    # mean over items of (mean_d e^2) / (mean_d x^2)
    batches = _batches(generator)
    error = sm.L2ReconstructionLoss(keep_batch_dim=True)
    power = sm.L2ReconstructionLoss(keep_batch_dim=True)  # the "error" of reconstructing x by 0: mean_d x^2
    for batch in batches:
        error.update(**_reconstruction(batch))
        power.update(decoded_activations=torch.zeros_like(batch["x"]), source_activations=batch["x"])
    epoch = _epoch(batches)
    expected = ((_error(epoch) ** 2).mean(dim=1) / (epoch["x"] ** 2).mean(dim=1)).mean()
    torch.testing.assert_close((error.compute() / power.compute()).mean(), expected, rtol=1e-12, atol=1e-12)


# --- L1 ---------------------------------------------------------------------------------------------------------------


def _learned(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"learned_activations": batch["f"]}


def _l1(b: dict[str, Tensor]) -> Tensor:
    return b["f"].abs().sum(1).mean()


def test_prior_art_l1(generator):
    batches = _batches(generator)
    _assert_signed(batches)
    _check(sm.L1AbsoluteLoss(), _learned, _l1, batches)


def test_saev_l1(generator):
    # mean over items of sum_F f (no absolute value: saev's SAEs are ReLU, their activations non-negative)
    def saev(b: dict[str, Tensor]) -> Tensor:
        return b["f"].sum(1).mean()

    batches = _batches(generator)
    _assert_signed(batches)
    _differs(sm.L1AbsoluteLoss, _learned, saev, batches)  # with negative activations ours is sum |f| ...
    _check(sm.L1AbsoluteLoss(), _learned, _l1, batches)
    _check(sm.L1AbsoluteLoss(), _learned, saev, _non_negative(batches))  # ... which is saev's for f >= 0


def test_dictionary_learning_l1(generator):
    batches = _batches(generator)
    _assert_signed(batches)
    _check(sm.L1AbsoluteLoss(), _learned, lambda b: torch.linalg.vector_norm(b["f"], ord=1, dim=-1).mean(), batches)


def _decoder_weighted(b: dict[str, Tensor]) -> Tensor:
    """SAELens' penalty: sum_i |f_i| * ||W_dec[i]||_2, mean over the batch."""
    return (b["f"].abs() * b["w"].norm(dim=1)).sum(1).mean()


def _learned_and_decoder(b: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"learned_activations": b["f"], "decoder_weight": b["w"]}


def test_saelens_l1_weighted_by_decoder_norm(generator):
    batches = _batches(generator)
    norms = batches[0]["w"].norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=0.1)  # row norms not 1: the weighting shows
    _check(sm.SparsityLoss(1.0, decoder_norm_weighting=True), _learned_and_decoder, _decoder_weighted, batches)
    _differs(lambda: sm.SparsityLoss(1.0), _learned_and_decoder, _decoder_weighted, batches)  # the plain L1 is not


def test_openai_normalized_l1(generator):
    # mean over items of sum_i |f_bi| / ||x_b||_2: each item's L1 (keep_batch_dim) over its input's norm
    def openai(b: dict[str, Tensor]) -> Tensor:
        return (b["f"].abs().sum(1) / b["x"].norm(dim=1)).mean()

    batches = _batches(generator)
    _assert_signed(batches)
    metric = sm.L1AbsoluteLoss(keep_batch_dim=True)
    first = metric(**_learned(batches[0]))
    torch.testing.assert_close((first / batches[0]["x"].norm(dim=1)).mean(), openai(batches[0]), rtol=1e-12, atol=0)
    metric.update(**_learned(batches[1]))
    epoch = _epoch(batches)
    torch.testing.assert_close((metric.compute() / epoch["x"].norm(dim=1)).mean(), openai(epoch), rtol=1e-12, atol=0)


# --- L0 ---------------------------------------------------------------------------------------------------------------


def _nonzero_count(b: dict[str, Tensor]) -> Tensor:
    return (b["f"] != 0).double().sum(1).mean()


def test_prior_art_l0(generator):
    batches = _batches(generator)
    _assert_signed(batches)
    _check(sm.L0NormMetric(), _learned, _nonzero_count, batches)


@pytest.mark.parametrize("peer", ["saev", "saelens"])
def test_active_count_l0(generator, peer):
    """saev counts ``f > 0``; SAELens' training log (``metrics/l0``, ``feature_acts.bool()``) counts ``f != 0``.

    With negative activations the two differ: ours is SAELens' count; saev's is the same for non-negative (ReLU,
    JumpReLU, TopK) activations only.
    """
    batches = _batches(generator)
    _assert_signed(batches)
    if peer == "saelens":
        _check(sm.L0NormMetric(), _learned, _nonzero_count, batches)
    else:

        def saev(b: dict[str, Tensor]) -> Tensor:
            return (b["f"] > 0).double().sum(1).mean()

        _differs(sm.L0NormMetric, _learned, saev, batches)
        _check(sm.L0NormMetric(), _learned, saev, _non_negative(batches))


# --- Sparsity penalty and total loss ----------------------------------------------------------------------------------


def _collection_check(loss_fn: sm.SparseAutoencoderLoss, inputs, peer_loss, batches) -> None:
    out = loss_fn(**inputs(batches[0]))
    torch.testing.assert_close(out["loss"].double(), peer_loss(batches[0]), rtol=1e-12, atol=1e-12)
    loss_fn.update(**inputs(batches[1]))
    torch.testing.assert_close(loss_fn.compute()["loss"], peer_loss(_epoch(batches)), rtol=1e-12, atol=1e-12)


def _loss_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"source_activations": batch["x"], "learned_activations": batch["f"], "decoded_activations": batch["x_hat"]}


def test_prior_art_loss(generator):
    # per item: mean_d e^2 + coefficient * sum_i |f_i|; mean over items
    coefficient = 0.01
    batches = _batches(generator)
    _assert_signed(batches)
    _collection_check(
        sm.SparseAutoencoderLoss(sparsity_coefficient=coefficient),
        _loss_inputs,
        lambda b: ((_error(b) ** 2).mean(1) + coefficient * b["f"].abs().sum(1)).mean(),
        batches,
    )


def test_saev_vanilla_loss(generator):
    # mse (element mean) + sparsity_coeff * l1 (mean_b sum_F f, no absolute value), sparsity_coeff = 4e-4 by default
    def peer(b: dict[str, Tensor]) -> Tensor:
        return (_error(b) ** 2).mean() + 4e-4 * b["f"].sum(1).mean()

    def saev_sparsity(b: dict[str, Tensor]) -> Tensor:
        return 4e-4 * b["f"].sum(1).mean()

    relu = _non_negative(_batches(generator))
    _collection_check(sm.SparseAutoencoderLoss(sparsity_coefficient=4e-4), _loss_inputs, peer, relu)
    _check(sm.SparsityLoss(4e-4), _learned, saev_sparsity, relu)
    # With negative activations saev's l1 is not ours (sum |f|).
    _differs(lambda: sm.SparsityLoss(4e-4), _learned, saev_sparsity, _batches(generator))


def test_saelens_standard_loss(generator):
    # sum_d e^2 + l1_coefficient * sum_i |f_i| ||W_dec[i]||, each a mean over the batch
    coefficient = 5.0

    def inputs(b: dict[str, Tensor]) -> dict[str, Tensor]:
        return {**_loss_inputs(b), "decoder_weight": b["w"]}

    def peer(b: dict[str, Tensor]) -> Tensor:
        return (_error(b) ** 2).sum(1).mean() + coefficient * _decoder_weighted(b)

    loss_fn = sm.SparseAutoencoderLoss(
        sparsity_coefficient=coefficient, feature_reduction="sum", sparsity_decoder_norm_weighting=True
    )
    _collection_check(loss_fn, inputs, peer, _batches(generator))


# --- Matryoshka -------------------------------------------------------------------------------------------------------


def _prefix_reconstruction(b: dict[str, Tensor], width: int) -> Tensor:
    """One separate decode of the first ``width`` features, bias added once (as every peer does it)."""
    return b["f"][:, :width] @ b["w"][:width] + b["b"]


def _matryoshka_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {
        "source_activations": batch["x"],
        "learned_activations": batch["f"],
        "decoder_weight": batch["w"],
        "decoder_bias": batch["b"],
    }


def test_saev_matryoshka(generator):
    # element mean over (batch, prefix, d_model) of (x - x_hat_p)^2
    widths = [2, 5, D_SAE]

    def peer(b: dict[str, Tensor]) -> Tensor:
        stacked = torch.stack([b["x"] - _prefix_reconstruction(b, m) for m in widths], dim=1)
        return (stacked**2).mean()

    _check(sm.MatryoshkaReconstructionLoss(widths), _matryoshka_inputs, peer, _batches(generator))
    # saev draws new prefix widths every step: the functional form takes them per call.
    batch = _batches(generator)[0]
    for drawn in ([3, D_SAE], [1, 4, 8, D_SAE]):
        torch.testing.assert_close(
            matryoshka_reconstruction_loss(batch["x"], batch["f"], batch["w"], batch["b"], prefix_sizes=drawn),
            (torch.stack([batch["x"] - _prefix_reconstruction(batch, m) for m in drawn], dim=1) ** 2).mean(),
        )


def test_saelens_matryoshka(generator):
    # full-width MSE + sum of the inner widths' MSEs (unweighted), each sum_d e^2 averaged over the batch
    inner = [2, 5]

    def peer(b: dict[str, Tensor]) -> Tensor:
        full = (_error(b) ** 2).sum(1).mean()
        return full + sum(
            (((b["x"] - _prefix_reconstruction(b, m)) ** 2).sum(1).mean() for m in inner), torch.zeros(())
        )

    metric = sm.MatryoshkaReconstructionLoss([*inner, D_SAE], feature_reduction="sum", prefix_weights=[1, 1, 1])
    _check(metric, _matryoshka_inputs, peer, _batches(generator))


def test_dictionary_learning_matryoshka(generator):
    # groups of features with weights w_g (default 1/G); the loss is l2_losses.mean() of the already-weighted
    # l2_losses[g] = w_g * mean_b sum_d (x - x_hat_g)^2 (x_hat_g decoding every group up to and including g),
    # i.e. sum_g (w_g / G) err_g: prefix_weights = w / G (1/G^2 each by default)
    group_sizes = [2, 3, 5]
    widths = torch.tensor(group_sizes).cumsum(0).tolist()
    groups = len(group_sizes)
    for weights in (None, [0.5, 0.3, 0.2]):
        used = weights or [1 / groups] * groups

        def peer(b: dict[str, Tensor], used: list[float] = used) -> Tensor:
            l2_losses = torch.stack(
                [
                    w * ((b["x"] - _prefix_reconstruction(b, m)) ** 2).sum(1).mean()
                    for w, m in zip(used, widths, strict=True)
                ]
            )
            return l2_losses.mean()

        metric = sm.MatryoshkaReconstructionLoss(
            widths, feature_reduction="sum", prefix_weights=[w / groups for w in used]
        )
        _check(metric, _matryoshka_inputs, peer, _batches(generator))
        # The weights as given (w_g, not w_g / G) give G times the peer's loss.
        _differs(
            lambda used=used: sm.MatryoshkaReconstructionLoss(widths, feature_reduction="sum", prefix_weights=used),
            _matryoshka_inputs,
            peer,
            _batches(generator),
        )


def test_saelens_matryoshka_normalised_decoder(generator):
    # SAELens' TopK-family SAEs (rescale_acts_by_decoder_norm=True, the default) decode f_i / ||W_dec,i||: each
    # prefix reconstruction is f[:, :m] @ (W_dec / ||W_dec||)[:m] + b_dec, so feed the row-normalised decoder
    inner = [2, 5]

    def rescaled(b: dict[str, Tensor], width: int) -> Tensor:
        return (b["f"][:, :width] / b["w"][:width].norm(dim=1)) @ b["w"][:width] + b["b"]

    def peer(b: dict[str, Tensor]) -> Tensor:
        return sum((((b["x"] - rescaled(b, m)) ** 2).sum(1).mean() for m in [*inner, D_SAE]), torch.zeros(()))

    def normalised(b: dict[str, Tensor]) -> dict[str, Tensor]:
        return {**_matryoshka_inputs(b), "decoder_weight": b["w"] / b["w"].norm(dim=1, keepdim=True)}

    def make() -> sm.MatryoshkaReconstructionLoss:
        return sm.MatryoshkaReconstructionLoss([*inner, D_SAE], feature_reduction="sum", prefix_weights=[1, 1, 1])

    batches = _batches(generator)
    _check(make(), normalised, peer, batches)
    _differs(make, _matryoshka_inputs, peer, batches)  # the raw decoder is not what SAELens decodes with


# --- Other terms -------------------------------------------------------------------------------------------------


def test_sparsify_fvu_is_pooled_here():
    """sparsify's DDP value averages per-rank ratios (1.0 here); the pooled ratio over every item is 0.2."""
    ranks = [
        (torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [1.0]])),
        (torch.tensor([[4.0], [6.0]]), torch.tensor([[5.0], [5.0]])),
    ]

    def sparsify_fvu(x, x_hat):
        return ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()

    assert torch.stack([sparsify_fvu(x, x_hat) for x, x_hat in ranks]).mean() == 1.0
    metric = sm.FractionOfVarianceUnexplained(d_model=1)
    for x, x_hat in ranks:  # the ranks' batches as updates: the same pooled statistics as two ranks
        metric.update(decoded_activations=x_hat, source_activations=x)
    x, x_hat = (torch.cat(parts) for parts in zip(*ranks, strict=True))
    torch.testing.assert_close(metric.compute(), sparsify_fvu(x, x_hat).double())
    torch.testing.assert_close(metric.compute(), torch.tensor(0.2, dtype=torch.float64))


def test_saelens_explained_variance(generator):
    def saelens(batch):
        x, error = batch["x"], _error(batch)
        return 1 - (error**2).sum(-1).mean() / ((x - x.mean(0)) ** 2).sum(-1).mean()

    _check(sm.ExplainedVariance(d_model=D_MODEL), _reconstruction, saelens, _batches(generator))


def test_dictionary_learning_explained_variance(generator):
    # evaluate's frac_variance_explained: 1 - sum_d Var(e_d) / sum_d Var(x_d), unbiased variances, per batch
    # (evaluate averages the batches' values; compute() pools every item instead)
    def peer(b: dict[str, Tensor]) -> Tensor:
        return 1 - torch.var(_error(b), dim=0).sum() / torch.var(b["x"], dim=0).sum()

    batches = _batches(generator)
    _check(sm.ExplainedVariance(d_model=D_MODEL, centred_residual=True), _reconstruction, peer, batches)
    # The residual is not centred by default: with an offset in x_hat the two differ.
    offset = [{**b, "x_hat": b["x_hat"] + 0.5} for b in batches]
    _differs(lambda: sm.ExplainedVariance(d_model=D_MODEL), _reconstruction, peer, offset)
    # One item: NaN, as torch.var of one item.
    single = {**batches[0], "x": batches[0]["x"][:1], "x_hat": batches[0]["x_hat"][:1]}
    metric = sm.ExplainedVariance(d_model=D_MODEL, centred_residual=True)
    assert metric(**_reconstruction(single)).isnan()


def _firing_steps(generator, steps, batch_size):
    """Non-negative activations where each feature fires rarely, so that features die and revive within the run."""
    return [reference.sparse_activations(batch_size, D_SAE, density=0.04, generator=generator) for _ in range(steps)]


@pytest.mark.parametrize("threshold", [0, 2])
def test_saelens_dead_features(generator, threshold):
    """SAELens: ``n_forward_passes_since_fired > dead_feature_window`` (N steps): ``window=N + 1`` steps, or
    ``(N + 1) * batch_size`` items with a constant batch size. Its firing is ``feature_acts.bool()`` (f != 0)."""
    batch_size = 4
    steps = sm.DeadFeatures(D_SAE, window=threshold + 1, window_unit="steps")
    items = sm.DeadFeatures(D_SAE, window=(threshold + 1) * batch_size)
    n_forward_passes_since_fired = torch.zeros(D_SAE, dtype=torch.int64)
    for f in _firing_steps(generator, 12, batch_size):
        n_forward_passes_since_fired += 1
        n_forward_passes_since_fired[f.bool().any(0)] = 0
        steps.update(learned_activations=f)
        items.update(learned_activations=f)
        assert torch.equal(steps.steps_since_fired(), n_forward_passes_since_fired)
        assert torch.equal(steps.dead_mask(), n_forward_passes_since_fired > threshold)
        assert torch.equal(items.dead_mask(), n_forward_passes_since_fired > threshold)


def test_openai_dead_features(generator):
    """OpenAI: ``stats_last_nonzero`` grows by one per step and restarts where a top-k value is ``> 1e-3``; dead
    when it is ``> T`` (``T = 10M // batch`` steps): ``window=T, window_unit="steps", firing_threshold=1e-3``.

    The same for every feature that fired; one that never fired is dead one step later there (its counter equals
    that of a feature that fired on the first step), i.e. the two differ only at exactly ``T`` steps seen.
    """
    window, batch_size = 3, 3
    metric = sm.DeadFeatures(D_SAE, window=window, window_unit="steps", firing_threshold=1e-3)
    stats_last_nonzero = torch.zeros(D_SAE, dtype=torch.int64)
    steps = _firing_steps(generator, 10, batch_size)
    steps[1] = steps[1] + 5e-4 * (steps[1] == 0)  # activations in (0, 1e-3]: no firing for OpenAI
    never = torch.ones(D_SAE, dtype=torch.bool)
    for seen, f in enumerate(steps, start=1):
        fired = (f > 1e-3).any(0)
        stats_last_nonzero = stats_last_nonzero * (~fired) + 1
        never &= ~fired
        metric.update(learned_activations=f)
        openai = stats_last_nonzero > window
        ours = metric.dead_mask()
        assert torch.equal(ours[~never], openai[~never])
        assert torch.equal(ours[never], torch.full_like(openai[never], seen >= window))
        assert torch.equal(openai[never], torch.full_like(openai[never], seen > window))
        assert torch.equal(torch.minimum(metric.steps_since_fired() + 1, torch.tensor(seen)), stats_last_nonzero)
    assert never.any()
    assert (~never).any()
    # f != 0 (the default) would count the activations below 1e-3 as firings.
    default = sm.DeadFeatures(D_SAE, window=window, window_unit="steps")
    for f in steps[:2]:
        default.update(learned_activations=f)
    assert default.steps_since_fired().amax() <= 1


def _density_steps(generator) -> list[Tensor]:
    """Features of very different densities over 2000 items: some above 1e-1, some near 1e-2, some never."""
    rates = torch.tensor([0.5, 0.2, 0.05, 0.011, 0.009, 0.002, 0.0, 0.0, 0.3, 0.0])
    return [(torch.rand(1000, D_SAE, generator=generator) < rates).double() for _ in range(2)]


def test_saelens_density_bands(generator):
    # SAELens' trainer logs sparsity/below_1e-5 and below_1e-6: counts of features with density < t (strict);
    # here fractions of num_features
    steps = _density_steps(generator)
    loss_fn = sm.SparseAutoencoderLoss(feature_density=True, num_features=D_SAE)
    for f in steps:
        loss_fn.update(learned_activations=f, source_activations=f[:, :2], decoded_activations=f[:, :2])
    out = loss_fn.compute()
    density = torch.cat(steps).sum(0) / 2000
    for t in ("1e-5", "1e-6"):
        count = (density < float(t)).sum()
        assert count > 0
        torch.testing.assert_close(out[f"feature_density_below_{t}"] * D_SAE, count.double())
    torch.testing.assert_close(out["feature_density_never_fired"] * D_SAE, (density == 0).sum().double())


def test_lm_saes_density_bands(generator):
    # lm_saes logs sparsity/above_1e-1, above_1e-2 (density > t), below_1e-5, below_1e-6 (density < t), counts
    steps = _density_steps(generator)
    metric = sm.FeatureDensity(D_SAE)
    for f in steps:
        metric.update(learned_activations=f)
    density = torch.cat(steps).sum(0) / 2000
    bands = metric.density_bands()
    expected = {
        "above_1e-1": density > 1e-1,
        "above_1e-2": density > 1e-2,
        "below_1e-5": density < 1e-5,
        "below_1e-6": density < 1e-6,
    }
    for name, inside in expected.items():
        torch.testing.assert_close(bands[f"feature_density_{name}"] * D_SAE, inside.sum().double())
    assert bands["feature_density_above_1e-1"] != bands["feature_density_above_1e-2"]


def test_the_conventions_page_names_exactly_these_tests():
    """Every test of this file is on the page, and every test the page names exists: a bare name is one of this file's,
    ``file.py::name`` one of that file's."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "conventions.md").read_text(encoding="utf-8")
    qualified = re.findall(r"`(test_[a-z0-9_]+)\.py::(test_[a-z0-9_]+)", page)
    bare = set(re.findall(r"(?<![:\w])`(test_[a-z0-9_]+)(?:\[[a-z0-9_*-]+\])?`", page))
    here = {name for name in globals() if name.startswith("test_")} - {
        "test_the_conventions_page_names_exactly_these_tests"
    }
    assert bare == here
    for module, name in qualified:
        source = (Path(__file__).resolve().parent / f"{module}.py").read_text(encoding="utf-8")
        assert re.search(rf"^def {name}\(", source, flags=re.MULTILINE), f"{module}.py::{name}"
