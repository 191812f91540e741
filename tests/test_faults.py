"""Nothing lost, nothing hung: stale caches, ranks configured differently, failed collectives, checkpoints, autocast."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import sparse_metrics as sm
from sparse_metrics import _distributed
from sparse_metrics.functional import sparsity_loss
from tests.distributed import run_on_ranks

D_MODEL, D_SAE = 4, 8


def _inputs(seed: int, batch: int = 5, components: int = 2, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(batch, components, D_MODEL, generator=generator, dtype=dtype)
    return {
        "source_activations": source,
        "learned_activations": torch.randn(batch, components, D_SAE, generator=generator, dtype=dtype).relu(),
        "decoded_activations": source + 0.5 * torch.randn(batch, components, D_MODEL, generator=generator, dtype=dtype),
        "decoder_weight": torch.randn(components, D_SAE, D_MODEL, generator=generator, dtype=dtype),
    }


def _collection(**kwargs: Any) -> sm.SparseAutoencoderLoss:
    return sm.SparseAutoencoderLoss(
        2, 0.1, explained_variance=True, d_model=D_MODEL, dead_feature_window=6, num_features=D_SAE, **kwargs
    )


# --- 2. a rank with no new batch still joins compute() -------------------------------------------------------------


def _stale(rank: int, world_size: int) -> dict[str, Any]:
    metric, loss_fn = sm.L2ReconstructionLoss(2), _collection()
    metric.update(**_inputs(rank))
    loss_fn.update(**_inputs(rank))
    first = (metric.compute(), loss_fn.compute())
    if rank == 0:  # only rank 0 has a new batch; rank 1 logs compute() again
        metric.update(**_inputs(10))
        loss_fn.update(**_inputs(10))
    return {"first": first, "second": (metric.compute(), loss_fn.compute())}


@pytest.mark.distributed
def test_every_rank_joins_every_compute_and_none_returns_a_stale_value():
    rank0, rank1 = run_on_ranks(_stale)
    one_process, one_collection = sm.L2ReconstructionLoss(2), _collection()
    for seed in (0, 1, 10):
        one_process.update(**_inputs(seed))
        one_collection.update(**_inputs(seed))
    for result in (rank0, rank1):
        metric, values = result["second"]
        torch.testing.assert_close(metric, one_process.compute())
        for key, value in one_collection.compute().items():
            torch.testing.assert_close(values[key], value, msg=key)
    assert not torch.equal(rank1["first"][0], rank1["second"][0])


# --- 3. ranks configured differently all raise the same error ------------------------------------------------------


def _mismatched(rank: int, world_size: int, case: str) -> str:
    if case == "density":
        metric: Any = sm.FeatureDensity(8 if rank == 0 else 16, 2)
        metric.update(torch.rand(3, 2, 8 if rank == 0 else 16))
    elif case == "components":
        metric = sm.L2ReconstructionLoss(2 if rank == 0 else 3)
        metric.update(torch.zeros(3, metric.num_components, 4), torch.ones(3, metric.num_components, 4))
    else:  # same shapes, another reduction
        metric = sm.L2ReconstructionLoss(2, feature_reduction="mean" if rank == 0 else "sum")
        metric.update(torch.zeros(3, 2, 4), torch.ones(3, 2, 4))
    try:
        metric.compute()
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["density", "components", "reduction"])
def test_ranks_configured_differently_raise_the_same_clear_error(case):
    messages = run_on_ranks(_mismatched, case)
    assert messages[0] == messages[1]
    assert "configured differently" in messages[0]
    assert "ranks [1]" in messages[0]


# --- 4. a collective that fails leaves the local state as it was ---------------------------------------------------


def _failing_second_collective(rank: int, world_size: int) -> dict[str, Any]:
    loss_fn = _collection(keep_batch_dim=True)
    loss_fn.update(**_inputs(rank, batch=3 + rank))
    local = {key: dict(member.metric_state) for key, member in loss_fn.items()}
    originals, calls = (_distributed._all_gather, _distributed._all_reduce), []

    def failing_on_the_second(original: Any) -> Any:
        def collective(*args: Any) -> Any:
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("simulated collective failure")
            return original(*args)

        return collective

    _distributed._all_gather = failing_on_the_second(originals[0])  # type: ignore[assignment]
    _distributed._all_reduce = failing_on_the_second(originals[1])  # type: ignore[assignment]
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            loss_fn.compute()
    finally:
        _distributed._all_gather, _distributed._all_reduce = originals  # type: ignore[assignment]
    same = all(
        all(
            (torch.equal(value, local[key][name]) if torch.is_tensor(value) else value == local[key][name])
            for name, value in member.metric_state.items()
        )
        for key, member in loss_fn.items()
    )
    return {"same": same, "synced": any(member._is_synced for member in loss_fn.values()), "after": loss_fn.compute()}


@pytest.mark.distributed
def test_a_failed_collective_restores_the_local_state():
    for result in run_on_ranks(_failing_second_collective):
        assert result["same"]
        assert not result["synced"]
        assert result["after"]["l2"].shape == (7, 2)  # and the next compute() works: 3 + 4 items


# --- 5. checkpoints ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("saved", "loaded"),
    [
        (lambda: sm.MatryoshkaReconstructionLoss([2, 8]), lambda: sm.MatryoshkaReconstructionLoss([4, 8])),
        (
            lambda: sm.MatryoshkaReconstructionLoss([2, 8], prefix_weights=[0.5, 0.5]),
            lambda: sm.MatryoshkaReconstructionLoss([2, 8], prefix_weights=[0.9, 0.1]),
        ),
        (sm.L2ReconstructionLoss, lambda: sm.L2ReconstructionLoss(feature_reduction="sum")),
        (lambda: sm.L1AbsoluteLoss(keep_batch_dim=True), sm.L1AbsoluteLoss),
        (lambda: sm.DeadFeatures(D_SAE, window=3), lambda: sm.DeadFeatures(D_SAE, window=4)),
    ],
)
def test_a_checkpoint_of_another_configuration_with_the_same_shapes_is_refused(saved, loaded):
    source = saved()
    source.persistent(True)
    source.update(**_inputs(0, components=1))
    target = loaded()
    target.persistent(True)
    before = dict(target.metric_state)
    with pytest.raises(ValueError, match="configured"):
        target.load_state_dict(source.state_dict())
    assert all(target.metric_state[name] is value for name, value in before.items())


def test_the_collection_checks_every_member_before_loading_any():
    saved = sm.SparseAutoencoderLoss(2, 0.1, matryoshka_prefix_sizes=[2, 8])
    saved.persistent(True)
    saved.update(**_inputs(0))
    target = sm.SparseAutoencoderLoss(2, 0.1, matryoshka_prefix_sizes=[4, 8])  # only the last member differs
    target.persistent(True)
    before = {key: dict(member.metric_state) for key, member in target.items()}
    with pytest.raises(ValueError, match="matryoshka"):
        target.load_state_dict(saved.state_dict())
    for key, member in target.items():
        assert all(member.metric_state[name] is value for name, value in before[key].items()), key


def test_a_truncated_checkpoint_is_refused_with_strict():
    saved = sm.FeatureDensity(D_SAE, 2)
    saved.update(torch.rand(3, 2, D_SAE))
    state = saved.state_dict()
    del state["density_item_count"]
    with pytest.raises(ValueError, match="no state \\['density_item_count'\\]"):
        sm.FeatureDensity(D_SAE, 2).load_state_dict(state)
    lenient = sm.FeatureDensity(D_SAE, 2)
    lenient.load_state_dict(state, strict=False)
    assert torch.equal(lenient.density_fire_count, saved.density_fire_count)


def test_half_precision_states_load_in_the_metric_s_own_dtype():
    saved = sm.L2ReconstructionLoss(2, keep_batch_dim=True)
    saved.persistent(True)
    saved.update(**_inputs(0))
    state = saved.state_dict()
    state["l2_sum"] = state["l2_sum"].half()
    state["l2_per_item"] = [row.half() for row in state["l2_per_item"]]
    loaded = sm.L2ReconstructionLoss(2, keep_batch_dim=True)
    loaded.persistent(True)
    loaded.load_state_dict(state)
    assert loaded.l2_sum.dtype == torch.float64
    assert loaded.l2_per_item[0].dtype == torch.float64
    counts = {**saved.state_dict(), "l2_count": saved.l2_count.half()}
    with pytest.raises(ValueError, match=r"exact torch\.int64 count"):
        loaded.load_state_dict(counts)


def _save_on_two_ranks(rank: int, world_size: int) -> dict[str, Any]:
    metric = sm.L2ReconstructionLoss(2)
    metric.persistent(True)
    metric.update(**_inputs(rank, batch=3 + rank))
    local = metric.state_dict()
    metric.sync()
    synced = metric.state_dict()
    metric.unsync()
    return {"local": local, "synced": synced}


@pytest.mark.distributed
def test_resuming_two_ranks_on_one_process_is_exact_or_refused():
    rank0, _ = run_on_ranks(_save_on_two_ranks)
    one = sm.L2ReconstructionLoss(2)
    one.persistent(True)
    with pytest.raises(ValueError, match="process 0 of 2"):
        one.load_state_dict(rank0["local"])
    one.load_state_dict(rank0["synced"])  # the synced states: every rank's items
    expected = sm.L2ReconstructionLoss(2)
    expected.update(**_inputs(0, batch=3))
    expected.update(**_inputs(1, batch=4))
    torch.testing.assert_close(one.compute(), expected.compute())


# --- 6. autocast ----------------------------------------------------------------------------------------------------


def test_decoder_norm_weighting_is_float32_under_autocast():
    inputs = _inputs(0)
    eager_metric = sm.SparsityLoss(0.3, 2, decoder_norm_weighting=True)
    eager = eager_metric(**inputs)
    loss_fn = sm.SparseAutoencoderLoss(2, 0.3, sparsity_decoder_norm_weighting=True)
    plain = loss_fn(**inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = sm.SparsityLoss(0.3, 2, decoder_norm_weighting=True)(**inputs)
        functional = sparsity_loss(inputs["learned_activations"], 0.3, decoder_weight=inputs["decoder_weight"])
        collection = sm.SparseAutoencoderLoss(2, 0.3, sparsity_decoder_norm_weighting=True)(**inputs)
    for value in (under, functional, collection["sparsity"], collection["loss"]):
        assert value.dtype == torch.float32
    torch.testing.assert_close(under, eager, rtol=1e-6, atol=0)
    torch.testing.assert_close(functional, eager, rtol=1e-6, atol=0)
    torch.testing.assert_close(collection["loss"], plain["loss"], rtol=1e-6, atol=0)


# --- 7. devices and degenerate shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: sm.FractionOfVarianceUnexplained(2, d_model=D_MODEL),
        lambda: sm.ExplainedVariance(2, d_model=D_MODEL),
        lambda: sm.L2ReconstructionLoss(2),
        lambda: sm.FeatureDensity(D_SAE, 2),
        _collection,
    ],
)
def test_inputs_on_another_device_than_the_states_are_refused(make):
    metric = make()
    mixed = _inputs(0)
    mixed["source_activations"] = mixed["source_activations"].to("meta")
    with pytest.raises(ValueError, match=r"one device, got `source_activations` on meta, `learned_activations` on cpu"):
        metric.update(**mixed)
    elsewhere = {key: value.to("meta") for key, value in _inputs(0).items()}  # a stand-in for another device
    with pytest.raises(ValueError, match=r"inputs are on meta but the metric's states are on cpu"):
        metric.update(**elsewhere)
    members = metric.values() if isinstance(metric, sm.SparseAutoencoderLoss) else [metric]
    assert all(member.update_count == 0 for member in members)


def test_a_zero_width_model_dimension_is_refused():
    with pytest.raises(ValueError, match="non-empty feature axis"):
        sm.L2ReconstructionLoss().update(torch.zeros(3, 0), torch.zeros(3, 0))
    with pytest.raises(ValueError, match="non-empty feature axis"):
        sm.functional.l2_reconstruction_loss(torch.zeros(3, 0), torch.zeros(3, 0))


def test_one_feature_keeps_its_feature_axis():
    density = sm.FeatureDensity(1)
    assert density(torch.ones(3, 1)).shape == (1,)
    assert density.compute().shape == (1,)


# --- 8. nan_strategy is accepted by every metric --------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: sm.FractionOfVarianceUnexplained(2, d_model=D_MODEL, **kw),
        lambda **kw: sm.ExplainedVariance(2, d_model=D_MODEL, **kw),
        lambda **kw: sm.FeatureDensity(D_SAE, 2, **kw),
        lambda **kw: sm.DeadFeatures(D_SAE, 2, window=3, **kw),
    ],
)
def test_the_training_metrics_take_nan_strategy(make):
    inputs = _inputs(0)
    dirty = {key: value.clone() for key, value in inputs.items()}
    dirty["source_activations"][1, 0, 0] = float("nan")
    dirty["learned_activations"][1, 0, 0] = float("nan")
    ignoring, expected = make(nan_strategy="ignore"), make()
    ignoring.update(**dirty)
    expected.update(**{key: value[[0, 2, 3, 4]] if key != "decoder_weight" else value for key, value in inputs.items()})
    torch.testing.assert_close(ignoring.compute(), expected.compute())
    with pytest.raises(ValueError, match="nan_strategy='error'"):
        make(nan_strategy="error").update(**dirty)
