"""The metric classes' own behaviour: the prior-art example, keep_batch_dim and coefficient setters, compute groups.

What every metric shares (accumulation over uneven batches, forward, per-item rows, gradients, checkpoints and copies,
bad input) is checked for every registered case by the generic checks in ``test_tester.py``.
"""

import pytest
import torch
from torchmetrics import MetricCollection

import sparse_metrics as sm
from sparse_metrics.metrics._base import SaeMetric
from tests import reference, tester


def test_prior_art_documented_example():
    metric = sm.L2ReconstructionLoss(num_components=1)
    source_activations = torch.tensor([[[4.0, 2.0]], [[2.0, 0.0]]])
    decoded_activations = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])
    result = metric.forward(decoded_activations=decoded_activations, source_activations=source_activations)
    assert torch.equal(result, torch.tensor(3.0))
    assert torch.equal(
        sm.L2ReconstructionLoss.calculate_mse(decoded_activations, source_activations), torch.tensor([[4.0], [2.0]])
    )


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
    """A collection holds every class side by side: no two classes may name a state alike."""
    by_class = {type(metric): set(metric._defaults) for metric in (case(2) for case in tester.metric_cases())}
    public = {getattr(sm, name) for name in sm.__all__ if isinstance(getattr(sm, name), type)}
    metric_classes = {cls for cls in public if issubclass(cls, SaeMetric)} - {sm.TotalLoss, sm.DerivedOutput}
    assert set(by_class) == metric_classes  # every public metric class
    names = list(by_class.values())
    for index, first in enumerate(names):
        for second in names[index + 1 :]:
            assert not first & second


def test_sparsity_coefficient_tensor_is_copied():
    """An in-place edit of the caller's tensor cannot slip a negative coefficient past the setter's check."""
    coefficient = torch.tensor([0.1, 0.2])
    metric = sm.SparsityLoss(coefficient, 2)
    coefficient.fill_(-1.0)
    torch.testing.assert_close(metric.sparsity_coefficient, torch.tensor([0.1, 0.2]))
