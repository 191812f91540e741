"""Bad input particular to a configuration, bad constructor arguments, and failures while recording.

Every kind of bad input that any metric or collection refuses (wrong shapes, dtypes, component counts, batch sizes,
decoder layouts, misspelt keywords, a missing input), with its message and an unchanged state, is a generic check of
every registered case in ``test_tester.py``.
"""

import pydantic
import pytest
import torch

import sparse_metrics as sm
from tests import reference, tester
from tests.tester import CASES, D_MODEL, D_SAE


def _has(case: tester.Case, classes: tuple[type, ...]) -> bool:
    return any(isinstance(member, classes) for member in tester.members(case(2)))


def _wider(name: str, axis_size: int) -> tester.Batch:
    """Consistent inputs whose ``d_sae`` (``name="d_sae"``) or ``d_model`` is ``axis_size``: valid for any metric that
    was not told that size at construction."""
    generator = torch.Generator().manual_seed(0)
    d_sae, d_model = (axis_size, D_MODEL) if name == "d_sae" else (D_SAE, axis_size)
    return reference.sae_inputs(4, components=2, d_model=d_model, d_sae=d_sae, generator=generator)


@pytest.mark.parametrize(
    "case", tester.params([c for c in CASES.values() if _has(c, (sm.FeatureDensity, sm.DeadFeatures))])
)
def test_another_dictionary_size_than_num_features_is_rejected(case):
    metric = case(2)
    metric.update(**tester.batches([3], 2)[0])
    fragments = ["`learned_activations`", f"num_features={D_SAE}", f"[4, 2, {D_SAE + 1}]"]
    tester.assert_rejected(metric, _wider("d_sae", D_SAE + 1), ValueError, fragments)


@pytest.mark.parametrize(
    "case", tester.params([c for c in CASES.values() if _has(c, (sm.FractionOfVarianceUnexplained,))])
)
def test_another_width_than_d_model_is_rejected(case):
    metric = case(2)
    metric.update(**tester.batches([3], 2)[0])
    fragments = [f"`source_activations` must have d_model={D_MODEL} in its last axis", f"[4, 2, {D_MODEL + 1}]"]
    tester.assert_rejected(metric, _wider("d_model", D_MODEL + 1), ValueError, fragments)


def test_prefix_larger_than_dictionary_is_rejected_at_update():
    metric = sm.MatryoshkaReconstructionLoss([4, D_SAE + 4], 2)
    with pytest.raises(ValueError, match=rf"prefix_sizes.*d_sae={D_SAE}.*{D_SAE + 4}"):
        metric.update(**tester.batches([4], 2)[0])
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


@pytest.mark.parametrize("case", tester.params())
def test_inputs_on_another_device_than_the_states_change_nothing(case):
    """Shapes are valid, but the states are elsewhere: refused before recording, every member as it was."""
    good = tester.batches([4], 2)[0]
    metric = case(2, **({"keep_batch_dim": True} if case.keep_batch_dim else {}))
    metric.update(**good)
    on_meta = {name: value.to("meta") for name, value in good.items()}
    for method in (metric.update, metric.forward):
        before = tester.state(metric)
        with pytest.raises(ValueError, match="inputs are on meta but the metric's states are on cpu"):
            method(**on_meta)
        tester.assert_same_state(before, tester.state(metric))


def test_a_member_failing_to_record_rolls_back_the_others(monkeypatch):
    good = tester.batches([4], 2)[0]
    collection = tester.CASES["collection_training"](2, keep_batch_dim=True)
    collection.update(**good)
    before = tester.state(collection)

    def fail(self, activity):
        raise RuntimeError("simulated failure while recording")

    monkeypatch.setattr(sm.FeatureDensity, "_record", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        collection(**good)
    tester.assert_same_state(before, tester.state(collection))
    assert {member.update_count for member in tester.members(collection)} == {1}
