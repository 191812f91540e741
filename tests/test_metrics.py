"""The metric classes: accumulation, per-item values, forward, state handling."""

import copy
import pickle

import pytest
import torch
from torchmetrics import MetricCollection

import sparse_metrics as sm
from tests import reference


def test_prior_art_documented_example():
    metric = sm.L2ReconstructionLoss(num_components=1)
    source_activations = torch.tensor([[[4.0, 2.0]], [[2.0, 0.0]]])
    decoded_activations = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])
    result = metric.forward(decoded_activations=decoded_activations, source_activations=source_activations)
    assert torch.equal(result, torch.tensor(3.0))
    assert torch.equal(
        sm.L2ReconstructionLoss.calculate_mse(decoded_activations, source_activations), torch.tensor([[4.0], [2.0]])
    )


def _batches(generator, sizes, components, d_model=6, d_sae=20):
    """Uneven batches of (source, decoded, learned, decoder weight, decoder bias) for ``components`` SAEs."""
    weight = torch.randn(components, d_sae, d_model, generator=generator)
    bias = torch.randn(components, d_model, generator=generator)
    out = []
    for size in sizes:
        source = torch.randn(size, components, d_model, generator=generator)
        decoded = source + 0.3 * torch.randn(size, components, d_model, generator=generator)
        learned = reference.sparse_activations(size, components, d_sae, generator=generator)
        out.append((source, decoded, learned))
    return out, weight, bias


# (metric factory, reference per-item function of (source, decoded, learned, weight, bias))
METRICS = {
    "l2_mean": (
        sm.L2ReconstructionLoss,
        lambda s, d, f, w, b: reference.per_item_l2(d, s, "mean"),
    ),
    "l2_sum": (
        lambda c, **kw: sm.L2ReconstructionLoss(c, feature_reduction="sum", **kw),
        lambda s, d, f, w, b: reference.per_item_l2(d, s, "sum"),
    ),
    "l1": (sm.L1AbsoluteLoss, lambda s, d, f, w, b: reference.per_item_l1(f)),
    "l0": (sm.L0NormMetric, lambda s, d, f, w, b: reference.per_item_l0(f)),
    "sparsity": (
        lambda c, **kw: sm.SparsityLoss(0.3, c, **kw),
        lambda s, d, f, w, b: 0.3 * reference.per_item_l1(f),
    ),
    "matryoshka": (
        lambda c, **kw: sm.MatryoshkaReconstructionLoss([5, 10, 20], c, **kw),
        lambda s, d, f, w, b: reference.per_item_matryoshka(s, f, w, b, [5, 10, 20]),
    ),
    "matryoshka_weighted_sum": (
        lambda c, **kw: sm.MatryoshkaReconstructionLoss(
            [3, 20], c, feature_reduction="sum", prefix_weights=[2.0, 0.5], **kw
        ),
        lambda s, d, f, w, b: reference.per_item_matryoshka(s, f, w, b, [3, 20], [2.0, 0.5], "sum"),
    ),
}


def _inputs(source, decoded, learned, weight, bias, squeeze):
    if squeeze:
        source, decoded, learned, weight, bias = source[:, 0], decoded[:, 0], learned[:, 0], weight[0], bias[0]
    return {
        "source_activations": source,
        "decoded_activations": decoded,
        "learned_activations": learned,
        "decoder_weight": weight,
        "decoder_bias": bias,
    }


@pytest.mark.parametrize("name", list(METRICS))
@pytest.mark.parametrize(("components", "squeeze"), [(1, True), (1, False), (3, False)])
def test_accumulates_item_weighted_mean_over_uneven_batches(generator, name, components, squeeze):
    factory, per_item_reference = METRICS[name]
    batches, weight, bias = _batches(generator, [5, 1, 12, 0, 3], components)
    metric = factory(components)
    for source, decoded, learned in batches:
        metric.update(**_inputs(source, decoded, learned, weight, bias, squeeze))
    expected = torch.cat([per_item_reference(s, d, f, weight, bias) for s, d, f in batches]).mean(0)
    result = metric.compute()
    assert result.dtype == torch.float64
    assert result.shape == (() if components == 1 else (components,))
    torch.testing.assert_close(result, expected.squeeze(0) if components == 1 else expected, rtol=1e-5, atol=1e-6)
    # The batch-mean of means would differ: the epoch value weights each item, not each batch.
    batch_means = torch.stack([per_item_reference(s, d, f, weight, bias).mean(0) for s, d, f in batches if len(s)])
    assert not torch.allclose(batch_means.mean(0), expected)


@pytest.mark.parametrize("name", list(METRICS))
@pytest.mark.parametrize("components", [1, 3])
def test_keep_batch_dim_concatenates_per_item_values(generator, name, components):
    factory, per_item_reference = METRICS[name]
    batches, weight, bias = _batches(generator, [4, 2, 0, 7], components)
    metric = factory(components, keep_batch_dim=True)
    for source, decoded, learned in batches:
        batch_value = metric(**_inputs(source, decoded, learned, weight, bias, False))
        expected_batch = per_item_reference(source, decoded, learned, weight, bias)
        expected_batch = expected_batch.squeeze(-1) if components == 1 else expected_batch
        torch.testing.assert_close(batch_value.double(), expected_batch, rtol=1e-5, atol=1e-5)
    expected = torch.cat([per_item_reference(s, d, f, weight, bias) for s, d, f in batches])
    result = metric.compute()
    assert result.shape == ((13,) if components == 1 else (13, components))
    torch.testing.assert_close(result, expected.squeeze(-1) if components == 1 else expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(METRICS))
def test_forward_returns_batch_value_and_accumulates(generator, name):
    factory, per_item_reference = METRICS[name]
    batches, weight, bias = _batches(generator, [6, 3], 2)
    metric = factory(2)
    for index, (source, decoded, learned) in enumerate(batches):
        batch_value = metric(**_inputs(source, decoded, learned, weight, bias, False))
        fresh = factory(2)
        fresh.update(**_inputs(source, decoded, learned, weight, bias, False))
        torch.testing.assert_close(batch_value.double(), fresh.compute(), rtol=1e-6, atol=1e-6)
        assert metric.update_count == index + 1
    expected = torch.cat([per_item_reference(s, d, f, weight, bias) for s, d, f in batches]).mean(0)
    torch.testing.assert_close(metric.compute(), expected, rtol=1e-5, atol=1e-6)


def test_forward_is_differentiable_and_state_keeps_no_graph(generator):
    source = torch.randn(5, 4, generator=generator)
    decoded = torch.randn(5, 4, generator=generator, requires_grad=True)
    metric = sm.L2ReconstructionLoss(keep_batch_dim=True)
    metric(decoded_activations=decoded, source_activations=source).sum().backward()
    assert decoded.grad is not None
    for value in metric.metric_state.values():
        for tensor in value if isinstance(value, list) else [value]:
            assert not tensor.requires_grad
            assert tensor.grad_fn is None


def test_update_builds_no_graph(generator):
    learned = torch.randn(5, 4, generator=generator, requires_grad=True)
    metric = sm.L1AbsoluteLoss()
    metric.update(learned_activations=learned)
    assert not metric.compute().requires_grad


def test_keep_batch_dim_setter_is_idempotent_and_resets_on_change(generator):
    learned = torch.randn(4, 6, generator=generator)
    metric = sm.L1AbsoluteLoss()
    metric.update(learned_activations=learned)
    metric.keep_batch_dim = False  # same value: nothing is lost
    assert metric.l1_count == 4
    metric.keep_batch_dim = True
    assert metric.l1_count == 0  # changed: the states kept differ, so the metric restarts
    metric.keep_batch_dim = True
    metric.keep_batch_dim = True
    metric.update(learned_activations=learned)
    torch.testing.assert_close(metric.compute(), reference.per_item_l1(learned[:, None]).squeeze(-1))
    with pytest.raises(TypeError, match="keep_batch_dim"):
        metric.keep_batch_dim = 1


def test_sparsity_coefficient_is_read_at_each_update(generator):
    learned = [torch.randn(n, 2, 5, generator=generator) for n in (3, 5, 2)]
    coefficients = [0.0, 1e-3, torch.tensor([0.5, 2.0])]
    metric = sm.SparsityLoss(0.0, num_components=2)
    expected = []
    for f, coefficient in zip(learned, coefficients, strict=True):
        metric.sparsity_coefficient = coefficient
        metric.update(learned_activations=f)
        scale = coefficient.double() if isinstance(coefficient, torch.Tensor) else coefficient
        expected.append(reference.per_item_l1(f) * scale)
    torch.testing.assert_close(metric.compute(), torch.cat(expected).mean(0))


@pytest.mark.parametrize(
    ("coefficient", "error", "match"),
    [
        (-1e-3, ValueError, "non-negative"),
        (float("nan"), ValueError, "finite"),
        (torch.tensor([0.1, -0.1]), ValueError, "non-negative"),
        (torch.tensor([0.1, 0.2, 0.3]), ValueError, r"shape \[2\]"),
        (torch.tensor([1, 2]), TypeError, "floating-point"),
        ("0.1", TypeError, "sparsity_coefficient"),
    ],
)
def test_sparsity_coefficient_validation(coefficient, error, match):
    metric = sm.SparsityLoss(0.5, num_components=2)
    with pytest.raises(error, match=match):
        metric.sparsity_coefficient = coefficient
    assert metric.sparsity_coefficient == 0.5


def test_matryoshka_prefix_losses(generator):
    batches, weight, bias = _batches(generator, [5, 8], 2)
    metric = sm.MatryoshkaReconstructionLoss([5, 10, 20], num_components=2)
    for source, _, learned in batches:
        metric.update(source, learned, weight, bias)
    expected = torch.cat(
        [reference.per_item_matryoshka_prefixes(s, f, weight, bias, [5, 10, 20]) for s, _, f in batches]
    ).mean(0)
    prefix_losses = metric.compute_prefix_losses()
    assert prefix_losses.shape == (2, 3)
    torch.testing.assert_close(prefix_losses, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metric.compute(), expected.mean(-1), rtol=1e-5, atol=1e-6)


def test_matryoshka_gradients_reach_decoder_weight_and_bias(generator):
    source = torch.randn(6, 4, generator=generator)
    learned = reference.sparse_activations(6, 8, generator=generator).requires_grad_()
    weight = torch.randn(8, 4, generator=generator, requires_grad=True)
    bias = torch.randn(4, generator=generator, requires_grad=True)
    metric = sm.MatryoshkaReconstructionLoss([2, 8], prefix_weights=[0.25, 0.75])
    metric(source, learned, weight, bias).backward()
    inputs = (
        learned.detach().clone().requires_grad_(),
        weight.detach().clone().requires_grad_(),
        bias.detach().clone().requires_grad_(),
    )
    expected = reference.per_item_matryoshka(
        source[:, None], inputs[0][:, None], inputs[1][None], inputs[2][None], [2, 8], [0.25, 0.75]
    ).mean()
    expected.backward()
    for ours, theirs in zip((learned, weight, bias), inputs, strict=True):
        torch.testing.assert_close(ours.grad.double(), theirs.grad.double(), rtol=1e-5, atol=1e-6)
    assert weight.grad[2:].abs().sum() > 0  # features past the first prefix are trained by the larger one


@pytest.mark.parametrize("name", list(METRICS))
def test_state_dict_round_trip_with_persistent_states(generator, name):
    factory, _ = METRICS[name]
    batches, weight, bias = _batches(generator, [4, 3], 2)
    metric = factory(2, keep_batch_dim=True)
    metric.persistent(True)
    metric.update(**_inputs(*batches[0], weight, bias, False))
    state = metric.state_dict()
    assert any(key.endswith("_sum") for key in state)
    restored = factory(2, keep_batch_dim=True)
    restored.persistent(True)
    restored.load_state_dict(copy.deepcopy(state))
    for m in (metric, restored):
        m.update(**_inputs(*batches[1], weight, bias, False))
    torch.testing.assert_close(restored.compute(), metric.compute())


def test_pickle_and_clone_round_trip(generator):
    batches, weight, bias = _batches(generator, [4], 1)
    metric = sm.SparseAutoencoderLoss(sparsity_coefficient=0.1, matryoshka_prefix_sizes=[10, 20])
    metric.update(**_inputs(*batches[0], weight, bias, False))
    for copied in (pickle.loads(pickle.dumps(metric)), metric.clone(), copy.deepcopy(metric)):
        for key, value in metric.compute().items():
            torch.testing.assert_close(copied.compute()[key], value)


def test_empty_batch_is_a_no_op(generator):
    metric = sm.L2ReconstructionLoss(keep_batch_dim=True)
    source = torch.randn(3, 4, generator=generator)
    metric.update(source + 1, source)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else list(v)) for k, v in metric.metric_state.items()}
    metric.update(torch.zeros(0, 4), torch.zeros(0, 4))
    assert torch.equal(metric.l2_sum, before["l2_sum"])
    assert torch.equal(metric.l2_count, before["l2_count"])
    assert len(metric.l2_per_item) == len(before["l2_per_item"])


def test_compute_groups_never_merge_l0_and_l1(generator):
    """The prior-art bug: an L0 and an L1 metric agree on a 0/1 batch; compute groups then merged them."""
    binary = (torch.rand(6, 10, generator=generator) < 0.5).float()
    later = torch.randn(6, 10, generator=generator) * 3
    results = {}
    for compute_groups in (True, False):
        collection = MetricCollection(
            {"l0": sm.L0NormMetric(), "l1": sm.L1AbsoluteLoss()}, compute_groups=compute_groups
        )
        collection.update(learned_activations=binary)
        collection.update(learned_activations=later)
        results[compute_groups] = collection.compute()
    for key in ("l0", "l1"):
        torch.testing.assert_close(results[True][key], results[False][key])
    assert not torch.allclose(results[True]["l0"], results[True]["l1"])
    torch.testing.assert_close(
        results[True]["l1"], reference.per_item_l1(torch.cat([binary, later])[:, None]).mean().squeeze()
    )


def test_state_names_are_unique_per_class():
    names = [
        set(metric._defaults)
        for metric in (
            sm.L2ReconstructionLoss(),
            sm.L1AbsoluteLoss(),
            sm.L0NormMetric(),
            sm.SparsityLoss(),
            sm.MatryoshkaReconstructionLoss([1]),
        )
    ]
    for index, first in enumerate(names):
        for second in names[index + 1 :]:
            assert not first & second


def test_counts_are_int64_and_sums_float64(generator):
    metric = sm.L0NormMetric(num_components=2)
    metric.update(learned_activations=torch.randn(3, 2, 5, generator=generator))
    assert metric.l0_count.dtype == torch.int64
    assert metric.l0_sum.dtype == torch.float64


def test_sparsity_coefficient_tensor_is_copied():
    """An in-place edit of the caller's tensor cannot slip a negative coefficient past the setter's check."""
    coefficient = torch.tensor([0.1, 0.2])
    metric = sm.SparsityLoss(coefficient, 2)
    coefficient.fill_(-1.0)
    torch.testing.assert_close(metric.sparsity_coefficient, torch.tensor([0.1, 0.2]))
