"""The reconstruction-quality metrics against each peer's formula, written here in float64: value and gradients of
``forward`` on one batch, and ``compute()`` over uneven batches; the functional twins; options and errors."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import sparse_metrics as sm
import sparse_metrics.functional as smf
from sparse_metrics._batch import SaeBatch

Formula = Callable[[Tensor, Tensor], Tensor]  # (x_hat, x) -> the peer's batch value


def _data(batch: int, seed: int, *, tiny_item: bool = True) -> tuple[Tensor, Tensor]:
    """float64 ``x, x_hat`` [batch, 6] with items of very different norms (so per-item means and ratios of means
    differ), a shrunk reconstruction and, with ``tiny_item``, one source of norm below 1e-4 (SAELens' guard)."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, batch, dtype=torch.float64).unsqueeze(-1)
    x = torch.randn(batch, 6, generator=generator, dtype=torch.float64) * scale + 0.5
    x_hat = 0.7 * x + 0.2 * torch.randn(batch, 6, generator=generator, dtype=torch.float64)
    if tiny_item:
        x[1] = 1e-5
    return x, x_hat


# The peers' formulas (their batch values), float64.


def saelens_cossim(x_hat: Tensor, x: Tensor) -> Tensor:  # evals.py: x/||x|| . x_hat/||x_hat||, mean over tokens
    return (
        ((x / torch.norm(x, dim=-1, keepdim=True)) * (x_hat / torch.norm(x_hat, dim=-1, keepdim=True))).sum(-1).mean()
    )


def dictionary_learning_cossim(x_hat: Tensor, x: Tensor) -> Tensor:  # evaluation.py: the same, batch mean
    x_normed = x / torch.linalg.norm(x, dim=-1, keepdim=True)
    return (x_normed * (x_hat / torch.linalg.norm(x_hat, dim=-1, keepdim=True))).sum(dim=-1).mean()


def saelens_l2_ratio(x_hat: Tensor, x: Tensor) -> Tensor:  # ||x|| < 1e-4 replaced by 1 (index assignment)
    norm_in = torch.norm(x, dim=-1)
    for_div = norm_in.clone()
    for_div[torch.abs(for_div) < 0.0001] = 1
    return (torch.norm(x_hat, dim=-1) / for_div).mean()


def dictionary_learning_l2_ratio(x_hat: Tensor, x: Tensor) -> Tensor:  # no guard
    return (torch.linalg.norm(x_hat, dim=-1) / torch.linalg.norm(x, dim=-1)).mean()


def relative_reconstruction_bias(x_hat: Tensor, x: Tensor) -> Tensor:  # SAELens and dictionary_learning, per batch
    return (torch.linalg.norm(x_hat, dim=-1, ord=2) ** 2).mean() / (x * x_hat).sum(dim=-1).mean()


def openai_normalized_mse(x_hat: Tensor, x: Tensor) -> Tensor:  # loss.py: per-item ratio of means, then the mean
    return (((x_hat - x) ** 2).mean(dim=1) / (x**2).mean(dim=1)).mean()


PEERS = [
    pytest.param(sm.ReconstructionCosineSimilarity, saelens_cossim, id="saelens_cossim"),
    pytest.param(sm.ReconstructionCosineSimilarity, dictionary_learning_cossim, id="dictionary_learning_cossim"),
    pytest.param(sm.ReconstructionNormRatio, saelens_l2_ratio, id="saelens_l2_ratio"),
    pytest.param(sm.RelativeReconstructionBias, relative_reconstruction_bias, id="relative_reconstruction_bias"),
    pytest.param(sm.NormalizedMSE, openai_normalized_mse, id="openai_normalized_mse"),
]


def _grads(value: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(value, inputs)


@pytest.mark.parametrize(("cls", "peer"), PEERS)
def test_forward_value_and_gradients_equal_the_peer(cls, peer):
    x, x_hat = _data(9, seed=0)
    ours_x, ours_hat = x.clone().requires_grad_(), x_hat.clone().requires_grad_()
    peer_x, peer_hat = x.clone().requires_grad_(), x_hat.clone().requires_grad_()
    ours = cls()(ours_hat, ours_x)
    theirs = peer(peer_hat, peer_x)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    for got, want in zip(_grads(ours, ours_x, ours_hat), _grads(theirs, peer_x, peer_hat), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("cls", "peer"), PEERS)
def test_compute_over_uneven_batches_equals_the_peer_on_every_item(cls, peer):
    """compute() is the peer's formula over all items at once (not the mean of its per-batch values)."""
    x, x_hat = _data(17, seed=1)
    metric = cls()
    per_batch = []
    for start, stop in [(0, 2), (2, 3), (3, 3), (3, 17)]:
        metric.update(x_hat[start:stop], x[start:stop])
        if stop > start:
            per_batch.append(peer(x_hat[start:stop], x[start:stop]))
    torch.testing.assert_close(metric.compute(), peer(x_hat, x), rtol=1e-12, atol=1e-14)
    if cls is sm.RelativeReconstructionBias:  # pooled, unlike the peers' mean over batches of batch ratios
        assert not torch.allclose(metric.compute(), torch.stack(per_batch).mean(), rtol=1e-3)


def test_the_norm_ratio_guard_is_saelens_not_dictionary_learning():
    x, x_hat = _data(9, seed=2)
    ours = sm.ReconstructionNormRatio()(x_hat, x)
    torch.testing.assert_close(ours, saelens_l2_ratio(x_hat, x), rtol=1e-12, atol=0)
    assert not torch.allclose(ours, dictionary_learning_l2_ratio(x_hat, x), rtol=1e-3)
    # Without a tiny source, dictionary_learning's unguarded ratio is the same, value and gradients.
    x, x_hat = _data(9, seed=2, tiny_item=False)
    x.requires_grad_()
    torch.testing.assert_close(sm.ReconstructionNormRatio()(x_hat, x), dictionary_learning_l2_ratio(x_hat, x))
    torch.testing.assert_close(
        _grads(sm.ReconstructionNormRatio()(x_hat, x), x)[0], _grads(dictionary_learning_l2_ratio(x_hat, x), x)[0]
    )


def test_a_zero_source_gets_no_gradient_through_the_guard():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    x_hat = torch.tensor([[1.0, 0.0], [0.0, 5.0]], dtype=torch.float64, requires_grad=True)
    value = sm.ReconstructionNormRatio()(x_hat, x)
    assert value.item() == pytest.approx((1.0 + 1.0) / 2)
    grad_x, grad_hat = _grads(value, x, x_hat)
    assert torch.equal(grad_x[0], torch.zeros(2, dtype=torch.float64))  # replaced by 1: no gradient, and no NaN
    assert grad_hat.isfinite().all()


def test_normalized_mse_is_a_mean_of_ratios_not_a_ratio_of_means():
    x, x_hat = _data(9, seed=3, tiny_item=False)
    ratio_of_means = ((x_hat - x) ** 2).mean() / (x**2).mean()
    value = sm.NormalizedMSE()(x_hat, x)
    torch.testing.assert_close(value, openai_normalized_mse(x_hat, x))
    assert not torch.allclose(value, ratio_of_means, rtol=1e-2)


def test_cosine_of_a_zero_vector_is_nan_as_the_peers_and_ignore_drops_it():
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    x_hat = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert torch.isnan(sm.ReconstructionCosineSimilarity()(x_hat, x))
    assert torch.isnan(saelens_cossim(x_hat.double(), x.double()))
    ignoring = sm.ReconstructionCosineSimilarity(nan_strategy="ignore")
    ignoring.update(x_hat, x)
    torch.testing.assert_close(ignoring.compute(), torch.tensor(2**-0.5, dtype=torch.float64))


FUNCTIONAL = [
    (sm.ReconstructionCosineSimilarity, smf.reconstruction_cosine_similarity),
    (sm.ReconstructionNormRatio, smf.reconstruction_norm_ratio),
    (sm.NormalizedMSE, smf.normalized_mse),
]


@pytest.mark.parametrize(("cls", "function"), FUNCTIONAL, ids=lambda value: getattr(value, "__name__", ""))
def test_functional_twins_equal_the_metrics_with_components(cls, function):
    x, x_hat = _data(8, seed=4)
    x3, x_hat3 = x.view(4, 2, 6), x_hat.view(4, 2, 6)
    torch.testing.assert_close(function(x_hat3, x3), cls(2)(x_hat3, x3))
    torch.testing.assert_close(function(x_hat3, x3, keep_batch_dim=True), cls(2, keep_batch_dim=True)(x_hat3, x3))
    assert function(x_hat, x).shape == ()


def test_relative_reconstruction_bias_functional_and_components():
    x, x_hat = _data(8, seed=5)
    x3, x_hat3 = x.view(4, 2, 6), x_hat.view(4, 2, 6)
    value = sm.RelativeReconstructionBias(2)(x_hat3, x3)
    torch.testing.assert_close(value, smf.relative_reconstruction_bias(x_hat3, x3))
    expected = torch.stack([relative_reconstruction_bias(x_hat3[:, c], x3[:, c]) for c in range(2)])
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(smf.relative_reconstruction_bias(0.5 * x, x), torch.tensor(0.5, dtype=torch.float64))


def test_the_metrics_share_the_batch_statistics():
    """One SaeBatch computes each per-item norm and the inner product once for all four metrics."""
    x, x_hat = _data(5, seed=6)
    batch = SaeBatch({"source_activations": x, "decoded_activations": x_hat}, num_components=1, owner="test")
    metrics = [
        sm.ReconstructionCosineSimilarity(),
        sm.ReconstructionNormRatio(),
        sm.RelativeReconstructionBias(),
        sm.NormalizedMSE(),
    ]
    for metric in metrics:
        batch.contribution(metric)
    memo_keys = set(batch._memo)
    assert {("item_norm", "source_activations"), ("item_norm", "decoded_activations"), "inner_product"} <= memo_keys
    assert batch.item_norm("source_activations", "test") is batch.item_norm("source_activations", "test")


def test_bad_inputs_raise_naming_the_argument():
    x, x_hat = _data(5, seed=7)
    for cls in (sm.ReconstructionCosineSimilarity, sm.RelativeReconstructionBias, sm.NormalizedMSE):
        with pytest.raises(ValueError, match="decoded_activations"):
            cls().update(x_hat[:, :4], x)
        with pytest.raises(TypeError, match="`decoded_activations`"):
            cls().update(source_activations=x)
        with pytest.raises(TypeError, match="`source_activations`"):
            cls().update(decoded_activations=x_hat)
    with pytest.raises(ValueError, match="num_components"):
        sm.ReconstructionNormRatio(0)


def test_updates_never_read_tensor_values():
    """On the meta device reading a value raises: accumulating needs no host synchronisation."""
    for cls in (
        sm.ReconstructionCosineSimilarity,
        sm.ReconstructionNormRatio,
        sm.RelativeReconstructionBias,
        sm.NormalizedMSE,
    ):
        metric = cls(2).to("meta")
        for _ in range(2):
            metric.update(torch.empty(4, 2, 3, device="meta"), torch.empty(4, 2, 3, device="meta"))
        metric(torch.empty(4, 2, 3, device="meta"), torch.empty(4, 2, 3, device="meta"))
