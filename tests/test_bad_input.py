"""Bad input raises a clear error naming the argument, and leaves every state exactly as it was."""

import pydantic
import pytest
import torch

import sparse_metrics as sm
from tests import reference


def _snapshot(metrics):
    """Every state, cloned, plus the update counts."""
    snapshot = []
    for metric in metrics:
        for name, value in metric.metric_state.items():
            snapshot.append((name, [v.clone() for v in value] if isinstance(value, list) else value.clone()))
        snapshot.append(("update_count", metric.update_count))
    return snapshot


def _assert_same(before, after):
    assert len(before) == len(after)
    for (name, old), (name_after, new) in zip(before, after, strict=True):
        assert name == name_after
        if isinstance(old, list):
            assert len(old) == len(new)
            assert all(torch.equal(a, b) for a, b in zip(old, new, strict=True))
        elif isinstance(old, torch.Tensor):
            assert torch.equal(old, new), name
        else:
            assert old == new, name


def _good(components=2, batch=4, d_model=3, d_sae=8, generator=None):
    shape = (batch, components) if components else (batch,)
    return {
        "source_activations": torch.randn(*shape, d_model, generator=generator),
        "decoded_activations": torch.randn(*shape, d_model, generator=generator),
        "learned_activations": reference.sparse_activations(*shape, d_sae, generator=generator),
        "decoder_weight": torch.randn(*shape[1:], d_sae, d_model, generator=generator),
        "decoder_bias": torch.randn(*shape[1:], d_model, generator=generator),
    }


def _metrics(keep_batch_dim):
    return [
        sm.L2ReconstructionLoss(2, keep_batch_dim=keep_batch_dim),
        sm.L1AbsoluteLoss(2, keep_batch_dim=keep_batch_dim),
        sm.L0NormMetric(2, keep_batch_dim=keep_batch_dim),
        sm.SparsityLoss(0.1, 2, keep_batch_dim=keep_batch_dim),
        sm.SparsityLoss(0.1, 2, keep_batch_dim=keep_batch_dim, decoder_norm_weighting=True),
        sm.MatryoshkaReconstructionLoss([4, 8], 2, keep_batch_dim=keep_batch_dim),
    ]


BAD_INPUTS = [
    # (argument, replacement, error type, message fragments)
    ("learned_activations", torch.randn(4, 8), ValueError, ["learned_activations", "[batch, 2, feature]", "[4, 8]"]),
    ("learned_activations", torch.randn(4, 3, 8), ValueError, ["learned_activations", "num_components=2", "[4, 3, 8]"]),
    ("learned_activations", torch.randn(4, 2, 8, 1), ValueError, ["learned_activations", "[4, 2, 8, 1]"]),
    ("learned_activations", torch.ones(4, 2, 8, dtype=torch.int64), TypeError, ["learned_activations", "int64"]),
    ("learned_activations", torch.ones(4, 2, 8, dtype=torch.bool), TypeError, ["learned_activations", "bool"]),
    ("learned_activations", [[0.0] * 8] * 4, TypeError, ["learned_activations"]),
    ("source_activations", torch.randn(4, 2, 5), ValueError, ["decoded_activations", "[4, 2, 5]", "[4, 2, 3]"]),
    ("decoded_activations", torch.randn(5, 2, 3), ValueError, ["decoded_activations", "[5, 2, 3]", "[4, 2, 3]"]),
    ("decoded_activations", torch.ones(4, 2, 3, dtype=torch.int32), TypeError, ["decoded_activations", "int32"]),
    ("decoder_weight", torch.randn(2, 3, 8), ValueError, ["decoder_weight", "feature-major", "[2, 8, 3]", "transpose"]),
    ("decoder_weight", torch.randn(8, 3), ValueError, ["decoder_weight", "[2, 8, 3]", "[8, 3]"]),
    ("decoder_bias", torch.randn(2, 4), ValueError, ["decoder_bias", "[2, 3]", "[2, 4]"]),
]


def _replace(inputs, argument, replacement):
    inputs = dict(inputs)
    inputs[argument] = replacement
    if argument == "source_activations":  # a source that disagrees with decoded, both otherwise valid for L0/L1
        inputs["decoded_activations"] = inputs["decoded_activations"]
    return inputs


def _relevant(metric, argument):
    if isinstance(metric, sm.SparsityLoss) and not metric.decoder_norm_weighting and argument == "decoder_weight":
        return False  # ignored without decoder-norm weighting
    return argument in metric._update_signature.parameters


@pytest.mark.parametrize(("argument", "replacement", "error", "fragments"), BAD_INPUTS)
@pytest.mark.parametrize("keep_batch_dim", [False, True])
@pytest.mark.parametrize("method", ["update", "forward"])
def test_bad_input_to_a_metric_raises_and_loses_nothing(
    generator, argument, replacement, error, fragments, keep_batch_dim, method
):
    good = _good(generator=generator)
    for metric in _metrics(keep_batch_dim):
        if not _relevant(metric, argument):
            continue
        metric.update(**good)
        before = _snapshot([metric])
        with pytest.raises(error) as raised:
            getattr(metric, method)(**_replace(good, argument, replacement))
        message = str(raised.value)
        if not (argument == "source_activations" and "decoded_activations" not in metric._update_signature.parameters):
            for fragment in fragments:
                assert fragment in message, (type(metric).__name__, message)
        _assert_same(before, _snapshot([metric]))
        metric.update(**good)  # still usable
        assert metric.update_count == 2


@pytest.mark.parametrize(("argument", "replacement", "error", "fragments"), BAD_INPUTS)
@pytest.mark.parametrize("method", ["update", "forward"])
def test_bad_input_to_the_collection_raises_and_loses_nothing(
    generator, argument, replacement, error, fragments, method
):
    good = _good(generator=generator)
    collection = sm.SparseAutoencoderLoss(2, 0.1, matryoshka_prefix_sizes=[4, 8], keep_batch_dim=True)
    collection.update(**good)
    members = list(collection.values(copy_state=False))
    before = _snapshot(members)
    with pytest.raises(error) as raised:
        getattr(collection, method)(**_replace(good, argument, replacement))
    assert argument.split("_")[0] in str(raised.value)
    _assert_same(before, _snapshot(members))


def test_missing_decoder_weight_for_matryoshka(generator):
    good = _good(generator=generator)
    del good["decoder_weight"]
    collection = sm.SparseAutoencoderLoss(2, 0.1, matryoshka_prefix_sizes=[4, 8])
    collection.update(**good | {"decoder_weight": _good(generator=generator)["decoder_weight"]})
    members = list(collection.values(copy_state=False))
    before = _snapshot(members)
    with pytest.raises(TypeError, match="decoder_weight"):
        collection(**good)
    _assert_same(before, _snapshot(members))


def test_prefix_larger_than_dictionary_is_rejected_at_update(generator):
    metric = sm.MatryoshkaReconstructionLoss([4, 16], 2)
    good = _good(generator=generator)  # d_sae = 8
    with pytest.raises(ValueError, match=r"prefix_sizes.*d_sae=8.*16"):
        metric.update(**good)
    assert metric.update_count == 0
    assert metric.matryoshka_count == 0


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"prefix_sizes": []}, "at least one"),
        ({"prefix_sizes": [4, 4]}, "m_1 < m_2"),
        ({"prefix_sizes": [8, 4]}, "m_1 < m_2"),
        ({"prefix_sizes": [0, 4]}, "m_1 >= 1"),
        ({"prefix_sizes": [2, 4], "prefix_weights": [1.0]}, "one weight per prefix"),
        ({"prefix_sizes": [2, 4], "prefix_weights": [1.0, -1.0]}, "non-negative"),
    ],
)
def test_bad_matryoshka_configuration(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        sm.MatryoshkaReconstructionLoss(**kwargs)


@pytest.mark.parametrize(
    ("factory", "argument"),
    [
        (lambda: sm.L2ReconstructionLoss(num_components=0), "num_components"),
        (lambda: sm.L2ReconstructionLoss(num_components="3"), "num_components"),
        (lambda: sm.L2ReconstructionLoss(feature_reduction="max"), "feature_reduction"),
        (lambda: sm.L1AbsoluteLoss(keep_batch_dim=1), "keep_batch_dim"),
        (lambda: sm.SparsityLoss(sparsity_coefficient=-1.0), "sparsity_coefficient"),
        (lambda: sm.MatryoshkaReconstructionLoss(prefix_sizes=[1.5, 3]), "prefix_sizes"),
        (lambda: sm.SparseAutoencoderLoss(component_reduction="max"), "component_reduction"),
        (lambda: sm.SparseAutoencoderLoss(matryoshka_prefix_weights=[1.0]), "matryoshka_prefix_sizes"),
    ],
)
def test_constructor_arguments_are_validated(factory, argument):
    with pytest.raises((ValueError, TypeError)) as raised:
        factory()
    assert argument in str(raised.value)
    if isinstance(raised.value, pydantic.ValidationError):
        assert isinstance(raised.value, ValueError)


def test_num_components_one_accepts_both_layouts(generator):
    flat = torch.randn(5, 7, generator=generator)
    for layout in (flat, flat[:, None]):
        metric = sm.L1AbsoluteLoss(1)
        metric.update(learned_activations=layout)
        torch.testing.assert_close(metric.compute(), reference.per_item_l1(flat[:, None]).mean().squeeze())


@pytest.mark.parametrize("method", ["update", "forward"])
def test_collection_rejects_activations_of_another_batch(generator, method):
    """Each metric alone accepts any batch size; the collection checks its inputs describe the same items."""
    good = _good(generator=generator)
    collection = sm.SparseAutoencoderLoss(2, 0.1)
    collection.update(**good)
    members = list(collection.values(copy_state=False))
    before = _snapshot(members)
    with pytest.raises(ValueError, match=r"`learned_activations` and `source_activations` must agree") as raised:
        getattr(collection, method)(**_replace(good, "learned_activations", torch.rand(5, 2, 8)))
    assert "[5, 2, 8]" in str(raised.value)
    assert "[4, 2, 3]" in str(raised.value)
    _assert_same(before, _snapshot(members))


def _on(device, inputs):
    return {key: value.to(device) for key, value in inputs.items()}


@pytest.mark.parametrize("method", ["update", "forward"])
def test_inputs_on_another_device_than_the_states_change_nothing(generator, method):
    """Shapes are valid, but the states are elsewhere: refused before recording, every member as it was."""
    good = _good(generator=generator)
    collection = sm.SparseAutoencoderLoss(2, 0.1, matryoshka_prefix_sizes=[4, 8], keep_batch_dim=True)
    metric = sm.L2ReconstructionLoss(2, keep_batch_dim=True)
    for target in (collection, metric):
        target.update(**good)
        members = list(target.values(copy_state=False)) if target is collection else [target]
        before = _snapshot(members)
        with pytest.raises(ValueError, match="inputs are on meta but the metric's states are on cpu"):
            getattr(target, method)(**_on("meta", good))
        _assert_same(before, _snapshot(members))
        assert {member.update_count for member in members} == {1}


def test_a_member_failing_to_record_rolls_back_the_others(generator, monkeypatch):
    good = _good(generator=generator)
    collection = sm.SparseAutoencoderLoss(2, 0.1, feature_density=True, num_features=8, keep_batch_dim=True)
    collection.update(**good)
    members = list(collection.values(copy_state=False))
    before = _snapshot(members)

    def fail(self, activity):
        raise RuntimeError("simulated failure while recording")

    monkeypatch.setattr(sm.FeatureDensity, "_record", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        collection(**good)
    _assert_same(before, _snapshot(members))
    assert {member.update_count for member in members} == {1}
