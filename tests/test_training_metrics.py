"""The training metrics (FVU / explained variance, feature density, dead features), decoder-norm weighted
sparsity, plot() on every metric, and the collection's options for them."""

import matplotlib
import matplotlib.pyplot as plt
import pydantic
import pytest
import torch
from matplotlib.figure import Figure

import sparse_metrics as sm
from sparse_metrics import functional
from sparse_metrics.metrics.dead_features import _reduce_counters
from tests import reference

matplotlib.use("Agg")  # no display in CI

#: compute() on a restored or empty metric: torchmetrics warns that update was never called, which is the point.
_NO_UPDATE = pytest.mark.filterwarnings("ignore:The ``compute`` method")

D_MODEL, D_SAE = 5, 12


def _stream(generator, sizes, components, *, offset=0.0, dtype=torch.float32):
    """Uneven batches ``(source, decoded, learned)``, each ``[batch, component, feature]``."""
    batches = []
    for size in sizes:
        source = offset + torch.randn(size, components, D_MODEL, generator=generator, dtype=torch.float64)
        source = source + torch.linspace(-2, 2, D_MODEL, dtype=torch.float64)  # per-dimension means differ
        decoded = source + 0.4 * torch.randn(size, components, D_MODEL, generator=generator, dtype=torch.float64)
        learned = reference.sparse_activations(size, components, D_SAE, generator=generator)
        batches.append((source.to(dtype), decoded.to(dtype), learned))
    return batches


def _cat(batches, index):
    return torch.cat([batch[index] for batch in batches])


def _maybe_squeeze(tensor, squeeze):
    return tensor[:, 0] if squeeze else tensor


# --- FVU and explained variance ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("components", "squeeze"), [(1, True), (1, False), (3, False)])
def test_fvu_pools_every_item_over_uneven_batches(generator, components, squeeze):
    batches = _stream(generator, [7, 1, 13, 4], components)
    fvu, explained = (
        sm.FractionOfVarianceUnexplained(components, d_model=D_MODEL),
        sm.ExplainedVariance(components, d_model=D_MODEL),
    )
    for index, (source, decoded, _) in enumerate(batches):
        for metric in (fvu, explained):
            inputs = {
                "decoded_activations": _maybe_squeeze(decoded, squeeze),
                "source_activations": _maybe_squeeze(source, squeeze),
            }
            metric(**inputs) if index % 2 else metric.update(**inputs)
    expected = reference.fvu(_cat(batches, 1), _cat(batches, 0))
    if components == 1:
        expected = expected.squeeze(0)
    torch.testing.assert_close(fvu.compute(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(explained.compute(), 1 - expected, rtol=1e-6, atol=0)
    # Not the mean of per-batch ratios.
    per_batch = torch.stack([reference.fvu(d, s) for s, d, _ in batches]).mean(0)
    assert not torch.allclose(per_batch.squeeze(), expected, rtol=1e-3)


def test_fvu_peer_example_is_the_pooled_ratio():
    metric = sm.FractionOfVarianceUnexplained(d_model=1)
    metric.update(torch.tensor([[1.0], [1.0]]), torch.tensor([[0.0], [2.0]]))
    metric.update(torch.tensor([[5.0], [5.0]]), torch.tensor([[4.0], [6.0]]))
    assert torch.equal(metric.compute(), torch.tensor(0.2, dtype=torch.float64))


def test_fvu_is_exact_with_a_large_offset(generator):
    # Sum(x^2) - n * mean^2 in float64 loses ~4 digits at a 1e6 offset; the Chan merge loses none.
    batches = _stream(generator, [50, 3, 200, 17, 1], 2, offset=1e6, dtype=torch.float64)
    metric = sm.FractionOfVarianceUnexplained(2, d_model=D_MODEL)
    for source, decoded, _ in batches:
        metric.update(decoded, source)
    expected = reference.fvu(_cat(batches, 1), _cat(batches, 0))
    torch.testing.assert_close(metric.compute(), expected, rtol=1e-11, atol=0)


def test_fvu_forward_returns_the_batch_value_differentiably(generator):
    source, decoded, _ = _stream(generator, [9], 2)[0]
    decoded.requires_grad_(True)
    metric = sm.FractionOfVarianceUnexplained(2, d_model=D_MODEL)
    value = metric(decoded, source)
    torch.testing.assert_close(value.double(), reference.fvu(decoded.detach(), source), rtol=1e-5, atol=0)
    value.sum().backward()
    assert decoded.grad is not None
    assert decoded.grad.abs().sum() > 0
    assert not metric.fvu_statistics.requires_grad


def test_fvu_functional_matches_reference(generator):
    source, decoded, _ = _stream(generator, [11], 3, dtype=torch.float64)[0]
    torch.testing.assert_close(
        functional.fraction_of_variance_unexplained(decoded, source), reference.fvu(decoded, source)
    )
    torch.testing.assert_close(functional.explained_variance(decoded, source), 1 - reference.fvu(decoded, source))
    torch.testing.assert_close(
        functional.fraction_of_variance_unexplained(decoded[:, 0], source[:, 0]), reference.fvu(decoded, source)[0]
    )


def test_fvu_components_are_independent(generator):
    batches = _stream(generator, [6, 4], 3)
    joint = sm.FractionOfVarianceUnexplained(3, d_model=D_MODEL)
    single = [sm.FractionOfVarianceUnexplained(d_model=D_MODEL) for _ in range(3)]
    for source, decoded, _ in batches:
        joint.update(decoded, source)
        for c, metric in enumerate(single):
            metric.update(decoded[:, c], source[:, c])
    torch.testing.assert_close(joint.compute(), torch.stack([m.compute() for m in single]))


@_NO_UPDATE
def test_fvu_empty_batches_and_no_data(generator):
    metric = sm.FractionOfVarianceUnexplained(d_model=D_MODEL)
    assert torch.isnan(metric.compute())
    metric.update(torch.zeros(0, D_MODEL), torch.zeros(0, D_MODEL))
    assert not metric.fvu_statistics.any()
    source, decoded, _ = _stream(generator, [5], 1)[0]
    metric.update(decoded[:, 0], source[:, 0])
    before = metric.compute()
    metric.update(torch.zeros(0, D_MODEL), torch.zeros(0, D_MODEL))
    assert torch.equal(metric.compute(), before)


@_NO_UPDATE
def test_fvu_state_dict_round_trip_and_reset(generator):
    batches = _stream(generator, [4, 6], 2)
    metric = sm.FractionOfVarianceUnexplained(2, d_model=D_MODEL)
    for source, decoded, _ in batches:
        metric.update(decoded, source)
    restored = sm.FractionOfVarianceUnexplained(2, d_model=D_MODEL)
    restored.load_state_dict(metric.state_dict())
    assert torch.equal(restored.compute(), metric.compute())
    metric.reset()
    assert not metric.fvu_statistics.any()


# --- feature density ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("components", "squeeze"), [(1, True), (3, False)])
def test_feature_density_over_uneven_batches(generator, components, squeeze):
    batches = _stream(generator, [8, 1, 5], components)
    metric = sm.FeatureDensity(D_SAE, components)
    for index, (_, _, learned) in enumerate(batches):
        value = metric(_maybe_squeeze(learned, squeeze)) if index % 2 else None
        if value is not None:
            torch.testing.assert_close(value, reference.feature_density(learned).squeeze(0) if squeeze else value)
        else:
            metric.update(_maybe_squeeze(learned, squeeze))
    expected = reference.feature_density(_cat(batches, 2))
    expected_log = torch.log10(expected + 1e-10).mean(-1)
    if squeeze:
        expected, expected_log = expected.squeeze(0), expected_log.squeeze(0)
    assert metric.density_fire_count.dtype == torch.int64
    torch.testing.assert_close(metric.compute(), expected)
    torch.testing.assert_close(metric.mean_log10_density(), expected_log)
    torch.testing.assert_close(functional.feature_density(_maybe_squeeze(_cat(batches, 2), squeeze)), expected)
    torch.testing.assert_close(functional.mean_log10_feature_density(expected), expected_log)


def test_mean_log10_density_epsilon_is_documented_value():
    metric = sm.FeatureDensity(2)
    metric.update(torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(metric.mean_log10_density(), torch.tensor(-5.0, dtype=torch.float64))
    torch.testing.assert_close(
        metric.mean_log10_density(epsilon=1e-4), torch.log10(torch.tensor([1 + 1e-4, 1e-4], dtype=torch.float64)).mean()
    )
    with pytest.raises(ValueError, match="epsilon"):
        metric.mean_log10_density(epsilon=0.0)


@_NO_UPDATE
def test_feature_density_state_dict_round_trip(generator):
    metric = sm.FeatureDensity(
        D_SAE,
        2,
    )
    metric.update(_stream(generator, [5], 2)[0][2])
    restored = sm.FeatureDensity(D_SAE, 2)
    restored.load_state_dict(metric.state_dict())
    assert torch.equal(restored.compute(), metric.compute())


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


@_NO_UPDATE
def test_dead_features_state_dict_round_trip(generator):
    metric = sm.DeadFeatures(D_SAE, 2, window=5)
    metric.update(reference.sparse_activations(11, 2, D_SAE, density=0.1, generator=generator))
    state = metric.state_dict()
    assert "dead_counters" in state
    restored = sm.DeadFeatures(D_SAE, 2, window=5)
    restored.load_state_dict(state)
    assert torch.equal(restored.items_since_fired(), metric.items_since_fired())
    assert torch.equal(restored.compute(), metric.compute())


def test_dead_features_combine_processes_by_the_lockstep_rule(generator):
    # merge_state treats the other metric as a parallel process, as the distributed sync does.
    streams = [reference.sparse_activations(n, 2, D_SAE, density=0.1, generator=generator) for n in (13, 6, 0)]
    metrics = []
    for stream in streams:
        metric = sm.DeadFeatures(D_SAE, 2, window=4)
        metric.update(stream)
        metrics.append(metric)
    combined = _reduce_counters(torch.stack([m.dead_counters for m in metrics]))
    assert torch.equal(combined[:, :-1], reference.lockstep_items_since_fired(streams))
    assert torch.equal(combined[:, -1], torch.full((2,), 19))


# --- decoder-norm weighted sparsity ------------------------------------------------------------------------------


@pytest.mark.parametrize(("components", "squeeze"), [(1, True), (3, False)])
def test_decoder_norm_weighted_sparsity(generator, components, squeeze):
    learned = reference.sparse_activations(6, components, D_SAE, generator=generator) * torch.sign(
        torch.randn(6, components, D_SAE, generator=generator)
    )
    weight = torch.randn(components, D_SAE, D_MODEL, generator=generator, requires_grad=True)
    learned.requires_grad_(True)
    metric = sm.SparsityLoss(0.3, components, decoder_norm_weighting=True)
    inputs_learned = _maybe_squeeze(learned, squeeze)
    inputs_weight = weight[0] if squeeze else weight
    value = metric(learned_activations=inputs_learned, decoder_weight=inputs_weight)
    expected_items = 0.3 * (learned.double().abs() * weight.double().norm(dim=-1)).sum(-1)
    torch.testing.assert_close(value.double(), expected_items.mean(0).squeeze(), rtol=1e-6, atol=0)
    value.sum().backward()
    expected_grad = torch.autograd.grad(expected_items.mean(0).sum(), weight)[0]
    torch.testing.assert_close(weight.grad.double(), expected_grad.double(), rtol=1e-5, atol=1e-7)
    batch_value = functional.sparsity_loss(inputs_learned.detach(), 0.3, decoder_weight=inputs_weight.detach())
    torch.testing.assert_close(batch_value.double(), expected_items.mean(0).squeeze().detach(), rtol=1e-6, atol=0)
    # The plain metric ignores the decoder.
    plain = sm.SparsityLoss(0.3, components)(learned_activations=inputs_learned, decoder_weight=inputs_weight)
    torch.testing.assert_close(
        plain.double(), 0.3 * reference.per_item_l1(learned).mean(0).squeeze(), rtol=1e-6, atol=0
    )


def test_decoder_norm_weighting_needs_the_decoder():
    metric = sm.SparsityLoss(0.1, decoder_norm_weighting=True)
    with pytest.raises(TypeError, match="decoder_weight"):
        metric.update(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"decoder_weight.*transpose"):
        metric.update(torch.ones(2, 3), decoder_weight=torch.ones(4, 3))
    assert metric.update_count == 0


# --- bad input ---------------------------------------------------------------------------------------------------


def _state(metric):
    return {
        name: [v.clone() for v in value] if isinstance(value, list) else value.clone()
        for name, value in metric.metric_state.items()
    }


def _same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], list):
            assert len(a[name]) == len(b[name])
            assert all(torch.equal(x, y) for x, y in zip(a[name], b[name], strict=True))
        else:
            assert torch.equal(a[name], b[name])


BAD = [
    (
        lambda: sm.FractionOfVarianceUnexplained(2, d_model=D_MODEL),
        {"decoded_activations": torch.randn(4, 2, 6)},
        ValueError,
        ["decoded_activations", "[4, 2, 6]", "[4, 2, 5]"],
    ),
    (
        lambda: sm.ExplainedVariance(2, d_model=D_MODEL),
        {"source_activations": torch.randn(4, 3, 5)},
        ValueError,
        ["source_activations", "num_components=2"],
    ),
    (
        lambda: sm.FractionOfVarianceUnexplained(2, d_model=D_MODEL),
        {"source_activations": torch.ones(4, 2, 5, dtype=torch.int64)},
        TypeError,
        ["source_activations", "int64"],
    ),
    (
        lambda: sm.FeatureDensity(D_SAE, 2),
        {"learned_activations": torch.randn(4, 2, D_SAE + 1)},
        ValueError,
        ["learned_activations", f"num_features={D_SAE}", f"[4, 2, {D_SAE + 1}]"],
    ),
    (
        lambda: sm.DeadFeatures(D_SAE, 2, window=3),
        {"learned_activations": torch.randn(4, D_SAE)},
        ValueError,
        ["learned_activations", "num_components=2"],
    ),
    (
        lambda: sm.DeadFeatures(D_SAE, 2, window=3),
        {"learned_activations": torch.ones(4, 2, D_SAE, dtype=torch.bool)},
        TypeError,
        ["learned_activations", "bool"],
    ),
]


@pytest.mark.parametrize(("factory", "bad", "error", "fragments"), BAD)
@pytest.mark.parametrize("method", ["update", "forward"])
def test_bad_input_names_the_argument_and_changes_nothing(generator, factory, bad, error, fragments, method):
    source, decoded, learned = _stream(generator, [4], 2)[0]
    good = {"source_activations": source, "decoded_activations": decoded, "learned_activations": learned}
    metric = factory()
    metric.update(**{k: v for k, v in good.items() if k in metric._update_signature.parameters})
    before, count = _state(metric), metric.update_count
    inputs = {k: v for k, v in {**good, **bad}.items() if k in metric._update_signature.parameters}
    with pytest.raises(error) as raised:
        getattr(metric, method)(**inputs)
    for fragment in fragments:
        assert fragment in str(raised.value)
    _same(before, _state(metric))
    assert metric.update_count == count


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


PLOTTED = {
    "l2": (lambda: sm.L2ReconstructionLoss(2), ("decoded_activations", "source_activations")),
    "l1": (lambda: sm.L1AbsoluteLoss(2), ("learned_activations",)),
    "l0": (sm.L0NormMetric, ("learned_activations",)),
    "sparsity": (lambda: sm.SparsityLoss(0.1, 2), ("learned_activations",)),
    "matryoshka": (lambda: sm.MatryoshkaReconstructionLoss([4, D_SAE], 2), ()),
    "fvu": (
        lambda: sm.FractionOfVarianceUnexplained(2, d_model=D_MODEL),
        ("decoded_activations", "source_activations"),
    ),
    "explained_variance": (
        lambda: sm.ExplainedVariance(d_model=D_MODEL),
        ("decoded_activations", "source_activations"),
    ),
    "density": (lambda: sm.FeatureDensity(D_SAE, 2), ("learned_activations",)),
    "dead": (lambda: sm.DeadFeatures(D_SAE, 2, window=3), ("learned_activations",)),
}


@pytest.mark.parametrize("name", list(PLOTTED))
def test_every_metric_plots_a_figure(generator, name):
    factory, _ = PLOTTED[name]
    metric = factory()
    components = metric.num_components
    source, decoded, learned = _stream(generator, [5], components)[0]
    inputs = {
        "source_activations": source,
        "decoded_activations": decoded,
        "learned_activations": learned,
        "decoder_weight": torch.randn(components, D_SAE, D_MODEL, generator=generator),
    }
    if components == 1:
        inputs = {k: v.squeeze(1) if k.endswith("activations") else v[0] for k, v in inputs.items()}
    inputs = {k: v for k, v in inputs.items() if k in metric._update_signature.parameters}
    metric.update(**inputs)
    figure, axes = metric.plot()
    assert isinstance(figure, Figure)
    assert axes.figure is figure
    if name != "density":  # a sequence of values, e.g. one per epoch
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


# --- the collection ----------------------------------------------------------------------------------------------


def _collection_batches(generator, sizes, components):
    weight = torch.randn(components, D_SAE, D_MODEL, generator=generator)
    return [
        {
            "source_activations": source,
            "decoded_activations": decoded,
            "learned_activations": learned,
            "decoder_weight": weight,
        }
        for source, decoded, learned in _stream(generator, sizes, components)
    ]


@pytest.mark.parametrize("feature_reduction", ["mean", "sum"])
def test_collection_training_metrics_equal_the_standalone_metrics(generator, feature_reduction):
    batches = _collection_batches(generator, [6, 2, 9], 2)
    loss_fn = sm.SparseAutoencoderLoss(
        2,
        0.2,
        explained_variance=True,
        d_model=D_MODEL,
        feature_density=True,
        dead_feature_window=4,
        num_features=D_SAE,
        feature_reduction=feature_reduction,
    )
    plain = sm.SparseAutoencoderLoss(2, 0.2, feature_reduction=feature_reduction)
    fvu, density, dead = (
        sm.FractionOfVarianceUnexplained(2, d_model=D_MODEL),
        sm.FeatureDensity(D_SAE, 2),
        sm.DeadFeatures(D_SAE, 2, window=4),
    )
    for index, batch in enumerate(batches):
        if index % 2:
            out = loss_fn(**batch)
            plain_out = plain(**batch)
            for key, value in plain_out.items():  # the loss terms, "loss" included, are untouched
                torch.testing.assert_close(out[key], value)
            torch.testing.assert_close(
                out["fvu"].double(),
                reference.fvu(batch["decoded_activations"], batch["source_activations"]),
                rtol=1e-5,
                atol=0,
            )
            torch.testing.assert_close(out["explained_variance"], 1 - out["fvu"])
            torch.testing.assert_close(out["feature_density"], reference.feature_density(batch["learned_activations"]))
            torch.testing.assert_close(out["l0"].double(), reference.per_item_l0(batch["learned_activations"]).mean(0))
        else:
            loss_fn.update(**batch)
            plain.update(**batch)
        for metric in (fvu, density, dead):
            metric.update(**batch)
    result = loss_fn.compute()
    assert set(result) == {
        "l2",
        "l0",
        "l1",
        "sparsity",
        "loss",
        "fvu",
        "explained_variance",
        "feature_density",
        "mean_log10_feature_density",
        "dead_features",
        "dead_feature_fraction",
    }
    for key, value in plain.compute().items():
        torch.testing.assert_close(result[key], value)
    torch.testing.assert_close(result["fvu"], fvu.compute(), rtol=1e-6, atol=0)
    torch.testing.assert_close(result["explained_variance"], 1 - fvu.compute(), rtol=1e-6, atol=0)
    torch.testing.assert_close(result["feature_density"], density.compute())
    torch.testing.assert_close(result["mean_log10_feature_density"], density.mean_log10_density())
    assert torch.equal(result["dead_features"], dead.compute())
    # An epoch reset clears the epoch metrics; the dead-feature counters go on.
    loss_fn.reset()
    assert not loss_fn["fvu"].fvu_statistics.any()
    assert torch.equal(loss_fn["dead_features"].items_since_fired(), dead.items_since_fired())


def test_collection_decoder_norm_weighting_keeps_plain_l1(generator):
    batch = _collection_batches(generator, [5], 2)[0]
    weight = batch["decoder_weight"].clone().requires_grad_(True)
    loss_fn = sm.SparseAutoencoderLoss(2, 0.5, sparsity_decoder_norm_weighting=True)
    out = loss_fn(**{**batch, "decoder_weight": weight})
    learned = batch["learned_activations"].double()
    torch.testing.assert_close(out["l1"].double(), reference.per_item_l1(learned).mean(0))
    weighted = 0.5 * (learned.abs() * weight.detach().double().norm(dim=-1)).sum(-1).mean(0)
    torch.testing.assert_close(out["sparsity"].double(), weighted, rtol=1e-6, atol=0)
    torch.testing.assert_close(out["loss"].double(), (out["l2"].double() + weighted).mean(), rtol=1e-6, atol=0)
    out["loss"].backward()
    assert weight.grad is not None
    assert weight.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="decoder_weight"):
        loss_fn.update(**{k: v for k, v in batch.items() if k != "decoder_weight"})


def test_collection_rejects_a_bad_batch_before_any_member_changes(generator):
    batch = _collection_batches(generator, [5], 2)[0]
    loss_fn = sm.SparseAutoencoderLoss(
        2,
        0.2,
        explained_variance=True,
        d_model=D_MODEL,
        feature_density=True,
        dead_feature_window=4,
        num_features=D_SAE,
    )
    loss_fn.update(**batch)
    before = {key: _state(member) for key, member in loss_fn.items(keep_base=True)}
    without_decoder = {k: v for k, v in batch.items() if k != "decoder_weight"}
    with pytest.raises(ValueError, match="num_features"):
        loss_fn.update(**{**without_decoder, "learned_activations": torch.rand(5, 2, D_SAE + 1)})
    for key, member in loss_fn.items(keep_base=True):
        _same(before[key], _state(member))


def test_fvu_updates_never_read_tensor_values():
    """On the meta device reading a value raises: accumulating several batches needs no host synchronisation."""
    metric = sm.FractionOfVarianceUnexplained(2, d_model=3).to("meta")
    for _ in range(3):
        metric.update(torch.empty(4, 2, 3, device="meta"), torch.empty(4, 2, 3, device="meta"))
    assert metric.fvu_statistics.device.type == "meta"


def test_fvu_rejects_another_d_model_and_keeps_its_state(generator):
    metric = sm.FractionOfVarianceUnexplained(d_model=3)
    metric.update(torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator))
    before = metric.compute()
    with pytest.raises(
        ValueError, match=r"`source_activations` must have d_model=3 in its last axis, got shape \[4, 5\]"
    ):
        metric.update(torch.randn(4, 5, generator=generator), torch.randn(4, 5, generator=generator))
    torch.testing.assert_close(metric.compute(), before)
    assert metric.update_count == 1


@pytest.mark.parametrize(("saved_components", "loaded_components"), [(1, 2), (2, 1), (2, 3)])
def test_fvu_refuses_a_checkpoint_of_another_component_count(generator, saved_components, loaded_components):
    saved = sm.FractionOfVarianceUnexplained(saved_components, d_model=3)
    saved.persistent(True)
    source = torch.randn(4, saved_components, 3, generator=generator)
    saved.update(source + 1, source)
    fresh = sm.FractionOfVarianceUnexplained(loaded_components, d_model=3)
    fresh.persistent(True)
    with pytest.raises(ValueError, match=r"Cannot load state `fvu_statistics` into FractionOfVarianceUnexplained"):
        fresh.load_state_dict(saved.state_dict())


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
