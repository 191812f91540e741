"""The activity options (``firing_threshold``, ``window_unit="steps"``), the density bands and the centred-residual
FVU: their own behaviour, errors and the collection keywords that pass them through.

The generic checks (uneven and empty batches, forward, checkpoints, nan_strategy, two gloo ranks) run on their
registry cases in ``tests/tester.py`` (``feature_density_threshold``, ``dead_features_threshold``,
``dead_features_steps``, ``fvu_centred``, ``explained_variance_centred``); the peers' conventions are in
``tests/test_conventions.py``.
"""

import copy
import pickle

import pydantic
import pytest
import torch

import sparse_metrics as sm
from sparse_metrics.functional import (
    dead_feature_mask,
    explained_variance,
    feature_density,
    fraction_of_variance_unexplained,
    items_since_fired,
)
from sparse_metrics.functional.feature_density import _density_band_fractions
from tests import reference, tester

D_SAE = tester.D_SAE


def _steps(sizes=(5, 3, 0, 4), components=2, seed=3):
    return tester.batches(list(sizes), components, seed=seed)


# --- firing_threshold -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda t: sm.FeatureDensity(D_SAE, firing_threshold=t),
        lambda t: sm.DeadFeatures(D_SAE, window=2, firing_threshold=t),
    ],
)
@pytest.mark.parametrize("bad", [-0.1, float("inf"), float("nan"), "0.1", True])
def test_a_bad_firing_threshold_is_refused_at_construction(make, bad):
    with pytest.raises(pydantic.ValidationError, match="firing_threshold"):
        make(bad)


def test_the_functional_twins_take_the_threshold_and_refuse_a_bad_one():
    f = torch.tensor([[0.5, 2e-3, 1e-3, -1.0], [0.0, 0.0, 5e-4, 0.0]])
    torch.testing.assert_close(feature_density(f), torch.tensor([0.5, 0.5, 1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(
        feature_density(f, firing_threshold=1e-3), torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)
    )
    assert torch.equal(items_since_fired(f, firing_threshold=1e-3), torch.tensor([1, 1, 2, 2]))
    assert torch.equal(dead_feature_mask(f, 2, firing_threshold=0.0), torch.tensor([False, False, False, True]))
    with pytest.raises(ValueError, match="firing_threshold"):
        feature_density(f, firing_threshold=-1.0)
    with pytest.raises(TypeError, match="firing_threshold"):
        items_since_fired(f, firing_threshold="1")


def test_members_with_different_thresholds_share_no_mask_and_l0_counts_nonzero():
    steps = _steps()
    loss_fn = sm.SparseAutoencoderLoss(
        2, feature_density=True, dead_feature_window=tester.WINDOW, num_features=D_SAE, firing_threshold=0.5
    )
    loss_fn.add_metrics(
        {
            "density_nonzero": sm.FeatureDensity(D_SAE, 2),
            "density_high": sm.FeatureDensity(D_SAE, 2, firing_threshold=1.0),
        }
    )
    for step in steps:
        loss_fn.update(**step)
    out = loss_fn.compute()
    learned = torch.cat([step["learned_activations"] for step in steps])
    streams = [learned]
    torch.testing.assert_close(out["feature_density"], reference.feature_density(learned, 0.5))
    torch.testing.assert_close(out["density_nonzero"], reference.feature_density(learned))
    torch.testing.assert_close(out["density_high"], reference.feature_density(learned, 1.0))
    assert not torch.equal(out["feature_density"], out["density_nonzero"])
    assert not torch.equal(out["feature_density"], out["density_high"])
    torch.testing.assert_close(out["l0"], reference.per_item_l0(learned).mean(0))  # f != 0, not f > 0.5
    since = reference.lockstep_items_since_fired(streams, 0.5)
    assert torch.equal(out["dead_features"], (since >= tester.WINDOW).sum(-1))


def test_a_threshold_is_part_of_the_configuration():
    metric = sm.FeatureDensity(D_SAE, firing_threshold=0.5)
    metric.update(learned_activations=torch.ones(2, D_SAE))
    with pytest.raises(ValueError, match="firing_threshold"):
        sm.FeatureDensity(D_SAE).load_state_dict(metric.state_dict())
    restored = sm.FeatureDensity(D_SAE, firing_threshold=0.5)
    restored.load_state_dict(metric.state_dict())
    assert torch.equal(restored.density_fire_count, metric.density_fire_count)


# --- steps ----------------------------------------------------------------------------------------------------------


def test_the_window_unit_is_validated_and_the_counters_are_read_in_their_unit():
    with pytest.raises(pydantic.ValidationError, match="window_unit"):
        sm.DeadFeatures(D_SAE, window=2, window_unit="tokens")
    steps = sm.DeadFeatures(D_SAE, window=2, window_unit="steps")
    items = sm.DeadFeatures(D_SAE, window=2)
    with pytest.raises(TypeError, match="steps_since_fired"):
        steps.items_since_fired()
    with pytest.raises(TypeError, match="items_since_fired"):
        items.steps_since_fired()
    with pytest.raises(ValueError, match="window_unit"):
        steps.load_state_dict(items.state_dict())


def test_a_step_is_an_update_whatever_its_items():
    metric = sm.DeadFeatures(3, window=2, window_unit="steps")
    metric.update(learned_activations=torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(metric.steps_since_fired(), torch.tensor([0, 1, 1]))
    metric.update(learned_activations=torch.zeros(0, 3))  # an empty step still counts
    assert torch.equal(metric.steps_since_fired(), torch.tensor([1, 2, 2]))
    assert torch.equal(metric.dead_mask(), torch.tensor([False, True, True]))
    metric.update(learned_activations=torch.tensor([[0.0, 3.0, 0.0]]))
    assert torch.equal(metric.steps_since_fired(), torch.tensor([2, 0, 3]))
    assert metric.compute() == 2


def test_the_collection_passes_the_window_unit():
    steps = _steps()
    loss_fn = sm.SparseAutoencoderLoss(
        2, dead_feature_window=tester.WINDOW_STEPS, dead_feature_window_unit="steps", num_features=D_SAE
    )
    for step in steps:
        loss_fn.update(**step)
    since = reference.lockstep_steps_since_fired([[step["learned_activations"] for step in steps]])
    assert torch.equal(loss_fn.compute()["dead_features"], (since >= tester.WINDOW_STEPS).sum(-1))
    with pytest.raises(pydantic.ValidationError, match="dead_feature_window_unit"):
        sm.SparseAutoencoderLoss(dead_feature_window=2, num_features=D_SAE, dead_feature_window_unit="epochs")


# --- density bands --------------------------------------------------------------------------------------------------


def test_density_bands_forward_is_the_batch_and_compute_every_item():
    loss_fn = sm.SparseAutoencoderLoss(2, feature_density=True, num_features=D_SAE)
    steps = _steps((6, 4))
    first = loss_fn(**steps[0])
    loss_fn.update(**steps[1])
    out = loss_fn.compute()
    for name, value in reference.density_bands(reference.feature_density(steps[0]["learned_activations"])).items():
        torch.testing.assert_close(first[name], value)
    every = torch.cat([step["learned_activations"] for step in steps])
    for name, value in reference.density_bands(reference.feature_density(every)).items():
        torch.testing.assert_close(out[name], value)
    assert {"feature_density_above_1e-1/0", "feature_density_never_fired/1"} <= set(loss_fn.loggable(out))


def test_density_bands_of_no_item_are_nan():
    bands = sm.FeatureDensity(D_SAE).density_bands()
    assert all(value.isnan() for value in bands.values())


def test_density_bands_compare_strictly_at_their_thresholds():
    # Each band's threshold itself, a value either side of it, and a component with no item (NaN densities).
    at = [0.0, 1e-6, 1e-5, 1e-2, 1e-1]
    near = [value * factor for value in at[1:] for factor in (0.999, 1.001)]
    density = torch.tensor([at + near + [0.5, 1.0], [float("nan")] * 15], dtype=torch.float64)
    ours = _density_band_fractions(density)
    expected = reference.density_bands(density)
    assert list(ours) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(ours[name], value, equal_nan=True, rtol=0, atol=0)
    assert ours["feature_density_above_1e-1"][0] == 3 / 15  # 0.1001, 0.5 and 1, not 0.1 itself


def test_each_forward_derives_the_bands_and_dead_fraction_of_its_own_batch():
    loss_fn = sm.SparseAutoencoderLoss(2, feature_density=True, dead_feature_window=3, num_features=D_SAE)
    dead = sm.DeadFeatures(D_SAE, 2, window=3)
    for step in _steps((6, 4, 5), seed=11):
        out = loss_fn(**step)
        density = reference.feature_density(step["learned_activations"])
        torch.testing.assert_close(out["feature_density"], density, rtol=0, atol=0)
        for name, value in reference.density_bands(density).items():
            torch.testing.assert_close(out[name], value, rtol=0, atol=0)
        alone = dead(learned_activations=step["learned_activations"])
        assert torch.equal(alone, out["dead_features"])
        torch.testing.assert_close(out["dead_feature_fraction"], alone.double() / D_SAE, rtol=0, atol=0)
    assert out["dead_features"].sum() > 0  # the window passed: the steps told dead counts apart


def test_copies_start_without_the_batch_caches():
    """Copies drop the caches (keyed by the original's tensors) and then step and compute as the original does."""
    loss_fn = sm.SparseAutoencoderLoss(2, feature_density=True, dead_feature_window=3, num_features=D_SAE)
    first, second = _steps((6, 5))
    loss_fn(**first)
    loss_fn.compute()
    density, dead = loss_fn["feature_density"], loss_fn["dead_features"]
    assert density._batch_summaries is not None
    assert dead._batch_count is not None
    copies = [copy.deepcopy(loss_fn), pickle.loads(pickle.dumps(loss_fn)), loss_fn.clone()]
    for copied in copies:
        for key in ("feature_density", "dead_features"):
            assert all(getattr(copied[key], name) is None for name in copied[key]._caches), key
    expected_step, expected_epoch = loss_fn(**second), loss_fn.compute()
    for copied in copies:
        step, epoch = copied(**second), copied.compute()
        for key in ("feature_density_never_fired", "mean_log10_feature_density", "dead_feature_fraction"):
            torch.testing.assert_close(step[key], expected_step[key], rtol=0, atol=0)
            torch.testing.assert_close(epoch[key], expected_epoch[key], rtol=0, atol=0)


def test_a_metric_pickled_before_its_caches_existed_starts_them_empty():
    metric = sm.DeadFeatures(D_SAE, 2, window=3)
    state = metric.__getstate__()
    del state["_batch_count"]  # as pickled by a version without the cache
    restored = sm.DeadFeatures.__new__(sm.DeadFeatures)
    restored.__setstate__(state)
    assert restored._batch_count is None
    restored(learned_activations=_steps((4,))[0]["learned_activations"])
    assert restored._batch_count is not None


# --- centred residual -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("explained", [False, True])
def test_the_centred_residual_value_and_gradients_equal_the_formula(explained, generator):
    x = torch.randn(7, 2, 4, generator=generator, dtype=torch.float64)
    x_hat = (x + 0.3 * torch.randn(7, 2, 4, generator=generator, dtype=torch.float64) + 2.0).requires_grad_()
    theirs = x_hat.detach().clone().requires_grad_()
    function = explained_variance if explained else fraction_of_variance_unexplained
    ours = function(x_hat, x, centred_residual=True)
    fvu = reference.centred_fvu(theirs, x)
    expected = 1 - fvu if explained else fvu
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    ours.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x_hat.grad, theirs.grad, rtol=1e-12, atol=1e-12)
    # The offset of 2 costs nothing here; the plain FVU counts it.
    assert (function(x_hat, x) - ours).abs().min() > 1
    with pytest.raises(TypeError, match="centred_residual"):
        function(x_hat, x, centred_residual=1)


def test_the_collection_passes_centred_residual():
    steps = _steps((5, 3))
    loss_fn = sm.SparseAutoencoderLoss(
        2, explained_variance=True, d_model=tester.D_MODEL, explained_variance_centred_residual=True
    )
    for step in steps:
        loss_fn.update(**{**step, "decoded_activations": step["decoded_activations"] + 1.0})
    every = tester.concatenated(steps)
    fvu = reference.centred_fvu(every["decoded_activations"] + 1.0, every["source_activations"])
    out = loss_fn.compute()
    torch.testing.assert_close(out["fvu"], fvu)
    torch.testing.assert_close(out["explained_variance"], 1 - fvu)
    plain = sm.FractionOfVarianceUnexplained(2, d_model=tester.D_MODEL)
    with pytest.raises(ValueError, match="configured differently"):  # a wider state: the residual's statistics
        plain.load_state_dict(loss_fn["fvu"].state_dict())
