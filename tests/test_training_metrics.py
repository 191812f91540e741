"""The training metrics' own behaviour (FVU / explained variance, feature density, dead features), the functional
forms of the training metrics and decoder-norm weighted sparsity, plot() on every metric, bad constructor arguments.

What every metric shares (uneven and empty batches, forward, gradients, checkpoints, copies, reset, bad input,
nan_strategy, two ranks) is checked for every registered case, these included, in ``test_tester.py``.
"""

import matplotlib
import matplotlib.pyplot as plt
import pydantic
import pytest
import torch
from matplotlib.figure import Figure

import sparse_metrics as sm
from sparse_metrics import functional
from sparse_metrics.metrics.dead_features import _LockstepCounters
from tests import reference, tester
from tests.tester import D_MODEL, D_SAE

matplotlib.use("Agg")  # no display in CI

#: compute() on a restored or empty metric: torchmetrics warns that update was never called, which is the point.
_NO_UPDATE = pytest.mark.filterwarnings("ignore:The ``compute`` method")


# --- FVU and explained variance ---------------------------------------------------------------------------------


def test_fvu_peer_example_is_the_pooled_ratio():
    metric = sm.FractionOfVarianceUnexplained(d_model=1)
    metric.update(torch.tensor([[1.0], [1.0]]), torch.tensor([[0.0], [2.0]]))
    metric.update(torch.tensor([[5.0], [5.0]]), torch.tensor([[4.0], [6.0]]))
    assert torch.equal(metric.compute(), torch.tensor(0.2, dtype=torch.float64))


def _offset(batches: list[tester.Batch], offset: float) -> list[tester.Batch]:
    """The same steps moved by ``offset`` (and a different amount per dimension): the same errors and variances."""
    shift = offset + torch.linspace(-2, 2, D_MODEL, dtype=torch.float64)
    moved = ("source_activations", "decoded_activations")
    return [{name: value + shift if name in moved else value for name, value in step.items()} for step in batches]


def test_fvu_is_exact_with_a_large_offset():
    # Sum(x^2) - n * mean^2 in float64 loses ~4 digits at a 1e6 offset; the Chan merge loses none.
    batches = _offset(tester.batches([50, 3, 200, 17, 1], 2, dtype=torch.float64), 1e6)
    metric = sm.FractionOfVarianceUnexplained(2, d_model=D_MODEL)
    for batch in batches:
        metric.update(**batch)
    every = tester.concatenated(batches)
    expected = reference.fvu(every["decoded_activations"], every["source_activations"])
    torch.testing.assert_close(metric.compute(), expected, rtol=1e-11, atol=0)


@pytest.mark.parametrize("component_axis", [True, False])
def test_functional_forms_match_the_reference(component_axis):
    """The functional FVU, explained variance, density, dead-feature mask and weighted sparsity of one batch."""
    components = 3 if component_axis else 1
    step = tester.batches([11], components, dtype=torch.float64)[0]
    inputs = tester.layout(step, component_axis)
    decoded, source = inputs["decoded_activations"], inputs["source_activations"]
    learned, weight = inputs["learned_activations"], inputs["decoder_weight"]
    fvu = reference.fvu(step["decoded_activations"], step["source_activations"])
    density = reference.feature_density(step["learned_activations"])
    weighted = reference.per_item_sparsity(step["learned_activations"], 0.3, step["decoder_weight"]).mean(0)

    def squeezed(value: torch.Tensor) -> torch.Tensor:
        return value if component_axis else value[0]

    torch.testing.assert_close(functional.fraction_of_variance_unexplained(decoded, source), squeezed(fvu))
    torch.testing.assert_close(functional.explained_variance(decoded, source), squeezed(1 - fvu))
    torch.testing.assert_close(functional.feature_density(learned), squeezed(density))
    torch.testing.assert_close(
        functional.mean_log10_feature_density(squeezed(density)), squeezed(reference.mean_log10_density(density))
    )
    since = reference.items_since_fired(step["learned_activations"])
    torch.testing.assert_close(functional.dead_feature_mask(learned, 4), squeezed(since >= 4))
    torch.testing.assert_close(functional.sparsity_loss(learned, 0.3, decoder_weight=weight), squeezed(weighted))
    assert not torch.allclose(weighted, 0.3 * reference.per_item_l1(step["learned_activations"]).mean(0))


# --- feature density ---------------------------------------------------------------------------------------------


def test_mean_log10_density_epsilon_is_documented_value():
    metric = sm.FeatureDensity(2)
    metric.update(torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(metric.mean_log10_density(), torch.tensor(-5.0, dtype=torch.float64))
    torch.testing.assert_close(
        metric.mean_log10_density(epsilon=1e-4), torch.log10(torch.tensor([1 + 1e-4, 1e-4], dtype=torch.float64)).mean()
    )
    with pytest.raises(ValueError, match="epsilon"):
        metric.mean_log10_density(epsilon=0.0)


# --- dead features -----------------------------------------------------------------------------------------------


def _fires(*positions, length, features=1):
    """A ``[length, 1, features]`` stream in which feature 0 fires at ``positions``."""
    stream = torch.zeros(length, 1, features)
    for position in positions:
        stream[position, 0, 0] = 1.0
    return stream


@pytest.mark.parametrize("window", [1, 3, 5])
def test_dead_feature_window_edges(window):
    # Fired exactly `window` items ago (window items after it): dead. window - 1 items ago: alive.
    for after, dead in ((window, True), (window - 1, False)):
        length = after + 2
        metric = sm.DeadFeatures(1, window=window)
        metric.update(_fires(length - 1 - after, length=length)[:, 0])
        assert metric.items_since_fired().tolist() == [after]
        assert metric.dead_mask().tolist() == [dead]
        assert int(metric.compute()) == int(dead)
        assert functional.dead_feature_mask(_fires(length - 1 - after, length=length)[:, 0], window).tolist() == [dead]


def test_never_fired_feature_dies_after_window_items():
    metric = sm.DeadFeatures(1, window=4)
    metric.update(torch.zeros(3, 1))
    assert not metric.dead_mask().item()
    metric.update(torch.zeros(1, 1))
    assert metric.dead_mask().item()
    assert metric.items_since_fired().tolist() == [4]


def test_dead_features_counters_across_batch_boundaries(generator):
    # Sparse enough that some features stay silent for a while; the counters cross batch boundaries.
    stream = reference.sparse_activations(40, 2, D_SAE, density=0.08, generator=generator)
    metric = sm.DeadFeatures(D_SAE, 2, window=9)
    start = 0
    for size in (7, 1, 0, 15, 17):
        chunk = stream[start : start + size]
        metric(chunk) if size % 2 else metric.update(chunk)
        start += size
        expected = reference.items_since_fired(stream[:start])
        assert torch.equal(metric.items_since_fired(), expected)
        assert torch.equal(metric.dead_mask(), expected >= 9)
        assert torch.equal(metric.compute(), (expected >= 9).sum(-1))


@pytest.mark.parametrize(("dead_feature_window", "batch_size"), [(0, 3), (2, 4), (3, 1)])
def test_window_n_plus_one_batches_reproduces_saelens_steps_rule(generator, dead_feature_window, batch_size):
    # SAELens: a per-feature step counter, +1 every step, 0 on a step where the feature fired; dead when > N.
    metric = sm.DeadFeatures(D_SAE, window=(dead_feature_window + 1) * batch_size)
    steps_since_fired = torch.zeros(D_SAE, dtype=torch.int64)
    for _ in range(12):
        batch = reference.sparse_activations(batch_size, D_SAE, density=0.07, generator=generator)
        steps_since_fired = torch.where((batch != 0).any(0), 0, steps_since_fired + 1)
        metric.update(batch)
        assert torch.equal(metric.dead_mask(), steps_since_fired > dead_feature_window)


@_NO_UPDATE
def test_dead_feature_counters_survive_reset_and_clear_on_reset_counters():
    metric = sm.DeadFeatures(2, window=2)
    metric.update(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    assert metric.compute().item() == 2
    metric.reset()  # an epoch boundary
    assert metric.items_since_fired().tolist() == [2, 3]
    metric.update(torch.tensor([[0.0, 1.0]]))
    assert metric.items_since_fired().tolist() == [3, 0]
    metric.reset_counters()
    assert metric.items_since_fired().tolist() == [0, 0]
    assert metric.compute().item() == 0


def test_dead_features_combine_processes_by_the_lockstep_rule(generator):
    # merge_state treats the other metric as a parallel process, as the distributed sync does.
    streams = [reference.sparse_activations(n, 2, D_SAE, density=0.1, generator=generator) for n in (13, 6, 0)]
    metrics = []
    for stream in streams:
        metric = sm.DeadFeatures(D_SAE, 2, window=4)
        metric.update(stream)
        metrics.append(metric)
    combined = _LockstepCounters()(torch.stack([m.dead_counters for m in metrics]))
    assert torch.equal(combined[:, :-1], reference.lockstep_items_since_fired(streams))
    assert torch.equal(combined[:, -1], torch.full((2,), 19))


@pytest.mark.parametrize(
    ("factory", "argument"),
    [
        (lambda: sm.DeadFeatures(4, window=0), "window"),
        (lambda: sm.DeadFeatures(4, window=True), "window"),
        (lambda: sm.DeadFeatures(4, window=2.5), "window"),
        (lambda: sm.DeadFeatures(num_features=0, window=2), "num_features"),
        (lambda: sm.FeatureDensity(num_features="4"), "num_features"),
        (lambda: sm.FractionOfVarianceUnexplained(num_components=0), "num_components"),
        (lambda: sm.SparsityLoss(0.1, decoder_norm_weighting=1), "decoder_norm_weighting"),
        (lambda: sm.SparseAutoencoderLoss(feature_density=True), "num_features"),
        (lambda: sm.SparseAutoencoderLoss(dead_feature_window=5), "num_features"),
        (lambda: sm.SparseAutoencoderLoss(dead_feature_window=0, num_features=3), "dead_feature_window"),
    ],
)
def test_bad_constructor_arguments(factory, argument):
    with pytest.raises(ValueError, match=argument):
        factory()


def test_window_is_required():
    with pytest.raises(pydantic.ValidationError, match="window"):
        sm.DeadFeatures(4)


# --- plot --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", tester.params(tester.metric_cases()))
def test_every_metric_plots_a_figure(case):
    metric = case(2)
    metric.update(**tester.batches([5], 2)[0])
    figure, axes = metric.plot()
    assert isinstance(figure, Figure)
    assert axes.figure is figure
    if not metric.per_feature:  # a sequence of values, e.g. one per epoch
        figure, _ = metric.plot([metric.compute(), metric.compute()])
        assert isinstance(figure, Figure)
    plt.close("all")


def test_feature_density_plot_is_a_log10_histogram():
    metric = sm.FeatureDensity(4)
    metric.update(torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 3.0, 1.0]]))
    _, axes = metric.plot()
    heights = [patch.get_height() for patch in axes.patches]
    assert sum(heights) == 4  # one count per feature
    assert "log" in axes.get_xlabel()
    lefts = [patch.get_x() for patch, height in zip(axes.patches, heights, strict=True) if height]
    assert min(lefts) < -10 < min(lefts) + 1 / 3  # the never-firing feature sits at log10(1e-10) = -10
    _, existing = plt.subplots()
    _, drawn = metric.plot(ax=existing)
    assert drawn is existing
    plt.close("all")


def test_fvu_updates_never_read_tensor_values():
    """On the meta device reading a value raises: accumulating several batches needs no host synchronisation."""
    metric = sm.FractionOfVarianceUnexplained(2, d_model=3).to("meta")
    for _ in range(3):
        metric.update(torch.empty(4, 2, 3, device="meta"), torch.empty(4, 2, 3, device="meta"))
    assert metric.fvu_statistics.device.type == "meta"


@pytest.mark.parametrize(
    "make",
    [
        lambda: sm.FractionOfVarianceUnexplained(d_model=D_MODEL, dist_sync_on_step=True),
        lambda: sm.ExplainedVariance(d_model=D_MODEL, dist_sync_on_step=True),
        lambda: sm.FeatureDensity(4, dist_sync_on_step=True),
        lambda: sm.DeadFeatures(4, window=8, dist_sync_on_step=True),
    ],
)
def test_dist_sync_on_step_is_refused_where_forward_cannot_honour_it(make):
    with pytest.raises(ValueError, match=r"`dist_sync_on_step=True` is not supported by \w+: its forward returns"):
        make()
