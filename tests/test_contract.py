"""The torchmetrics and Lightning contracts: forward cache, log_dict, compute groups, nesting, sync, keywords."""

from __future__ import annotations

import csv
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torchmetrics import MeanMetric, MetricCollection, MetricTracker
from torchmetrics.utilities.distributed import gather_all_tensors
from torchmetrics.utilities.exceptions import TorchMetricsUserError

import sparse_metrics as sm
from tests.distributed import run_on_ranks
from tests.processes import run_process_tree

ROOT = Path(__file__).resolve().parents[1]
C, D_MODEL, D_SAE = 2, 5, 8


def _inputs(generator: torch.Generator, batch: int = 6, components: int | None = C) -> dict[str, torch.Tensor]:
    shape = (batch, components) if components else (batch,)
    source = torch.randn(*shape, D_MODEL, generator=generator)
    learned = torch.randn(*shape, D_SAE, generator=generator).relu()
    weight = torch.randn(*((components,) if components else ()), D_SAE, D_MODEL, generator=generator)
    return {
        "source_activations": source,
        "learned_activations": learned,
        "decoded_activations": source + 0.3 * torch.randn(*shape, D_MODEL, generator=generator),
        "decoder_weight": weight,
        "decoder_bias": torch.zeros(*weight.shape[:-2], D_MODEL),
    }


#: Every public metric class, configured for C components.
METRICS = {
    "l2": lambda **kw: sm.L2ReconstructionLoss(C, **kw),
    "l0": lambda **kw: sm.L0NormMetric(C, **kw),
    "l1": lambda **kw: sm.L1AbsoluteLoss(C, **kw),
    "sparsity": lambda **kw: sm.SparsityLoss(0.2, C, decoder_norm_weighting=True, **kw),
    "matryoshka": lambda **kw: sm.MatryoshkaReconstructionLoss([3, D_SAE], C, **kw),
    "fvu": lambda **kw: sm.FractionOfVarianceUnexplained(C, d_model=D_MODEL, **kw),
    "explained_variance": lambda **kw: sm.ExplainedVariance(C, d_model=D_MODEL, **kw),
    "feature_density": lambda **kw: sm.FeatureDensity(D_SAE, C, **kw),
    "dead_features": lambda **kw: sm.DeadFeatures(D_SAE, C, window=4, **kw),
}


def _full_collection(**kwargs: Any) -> sm.SparseAutoencoderLoss:
    options: dict[str, Any] = {
        "matryoshka_prefix_sizes": [3, D_SAE],
        "explained_variance": True,
        "d_model": D_MODEL,
        "feature_density": True,
        "dead_feature_window": 4,
        "num_features": D_SAE,
    }
    return sm.SparseAutoencoderLoss(C, 0.2, **{**options, **kwargs})


# --- forward cache -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METRICS)
def test_forward_sets_the_cache_of_every_metric_alone(generator, name):
    metric = METRICS[name]()
    value = metric(**_inputs(generator))
    assert metric._forward_cache is not None
    assert torch.equal(metric._forward_cache, value.detach())
    assert not metric._forward_cache.requires_grad


def test_forward_sets_the_cache_of_every_member(generator):
    loss_fn = _full_collection()
    out = loss_fn(**_inputs(generator))
    assert set(out) == set(loss_fn.keys())  # every key is a member
    for key, member in loss_fn.items(keep_base=True, copy_state=False):
        assert torch.equal(member._forward_cache, out[key].detach()), key


# --- Lightning ---------------------------------------------------------------------------------------------------


def _read_csv(path: Path) -> tuple[list[dict[str, float]], dict[str, float]]:
    """The step rows and the epoch row of Lightning's metrics.csv, by logged key without its suffix."""
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    steps = [{k[: -len("_step")]: float(v) for k, v in row.items() if k.endswith("_step") and v} for row in rows]
    epochs = [{k[: -len("_epoch")]: float(v) for k, v in row.items() if k.endswith("_epoch") and v} for row in rows]
    return [row for row in steps if row], next(row for row in epochs if row)


@pytest.mark.distributed
@pytest.mark.parametrize("processes", [1, 2])
def test_lightning_log_dict_logs_every_step_and_epoch_value(tmp_path, processes):
    """``log_dict(collection, on_step=True, on_epoch=True)``: each key's batch value per step and pooled epoch value."""
    pytest.importorskip("lightning")
    job = str(ROOT / "tests" / "lightning_job.py")
    if processes == 1:
        command = [sys.executable, job, str(tmp_path)]
    else:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1", "--nproc-per-node", "2"]
        command = [sys.executable, *launcher, job, str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    run = run_process_tree(command, timeout=240, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    steps, epoch = _read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    expected = json.loads((tmp_path / "expected.json").read_text())
    keys = set(expected["epoch"])
    assert {"loss", "explained_variance", "matryoshka_prefix_4", "dead_feature_fraction"} <= keys
    assert len(steps) == len(expected["steps"])
    for logged, wanted in zip(steps, expected["steps"], strict=True):
        assert set(logged) == keys
        for key in keys:
            assert logged[key] == pytest.approx(wanted[key], rel=1e-5, abs=1e-6), key
    assert set(epoch) == keys
    for key in keys:
        assert epoch[key] == pytest.approx(expected["epoch"][key], rel=1e-5, abs=1e-6), key


def test_loggable_keeps_the_scalars(generator):
    """With per-feature keys or several components, ``loggable`` gives what ``log_dict`` and ``.item()`` take."""
    loss_fn = _full_collection()
    out = loss_fn(**_inputs(generator))
    scalars = loss_fn.loggable(out)
    assert not {"feature_density", "feature_density/0"} & set(scalars)
    assert torch.equal(scalars["l2/1"], out["l2"][1])
    assert scalars["loss"].ndim == 0
    assert all(value.ndim == 0 for value in scalars.values())
    assert {key for key in scalars if "/" not in key} == {"loss"}
    single = sm.SparseAutoencoderLoss(feature_density=True, num_features=D_SAE, keep_batch_dim=True)
    plain = single.loggable(single(**_inputs(generator, components=None)))
    bands = {
        "feature_density_above_1e-1",
        "feature_density_above_1e-2",
        "feature_density_below_1e-5",
        "feature_density_below_1e-6",
        "feature_density_never_fired",
    }
    # per-item rows and per-feature densities left out; the density bands are scalars
    assert set(plain) == {"mean_log10_feature_density", *bands, "loss"}


# --- compute groups, nesting, tracker, add_metrics ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (sm.L2ReconstructionLoss, lambda: sm.L2ReconstructionLoss(feature_reduction="sum")),
        (lambda: sm.SparsityLoss(0.1), lambda: sm.SparsityLoss(0.2)),
        (
            lambda: sm.MatryoshkaReconstructionLoss([2, 4], prefix_weights=[0.5, 0.5]),
            lambda: sm.MatryoshkaReconstructionLoss([2, 4], prefix_weights=[0.9, 0.1]),
        ),
    ],
)
def test_compute_groups_never_merge_metrics_configured_differently(first, second):
    """A first batch that leaves both states equal (all-zero errors and activations) must not merge them."""
    collection = MetricCollection({"first": first(), "second": second()})  # compute groups on, as by default
    zeros = {
        "source_activations": torch.zeros(3, 1),
        "decoded_activations": torch.zeros(3, 1),
        "learned_activations": torch.zeros(3, 4),
        "decoder_weight": torch.zeros(4, 1),
    }
    collection.update(**zeros)
    assert len(collection.compute_groups) == 2
    batch = {**zeros, "source_activations": torch.ones(3, 1), "learned_activations": torch.ones(3, 4)}
    collection.update(**batch)
    values = collection.compute()
    separate_first, separate_second = first(), second()
    for metric in (separate_first, separate_second):
        metric.update(**zeros)
        metric.update(**batch)
    torch.testing.assert_close(values["first"], separate_first.compute())
    torch.testing.assert_close(values["second"], separate_second.compute())


def test_nested_in_a_metric_collection_keeps_every_key(generator):
    loss_fn = _full_collection()
    outer = MetricCollection({"sae": loss_fn, "mean": MeanMetric()}, compute_groups=False)
    inputs = {**_inputs(generator), "learned_activations": _inputs(generator)["learned_activations"].requires_grad_()}
    out = outer(**inputs, value=torch.tensor(2.0))
    expected = _full_collection()(**inputs)
    assert {f"sae_{key}" for key in expected} <= set(out)
    for key, value in expected.items():
        torch.testing.assert_close(out[f"sae_{key}"], value, msg=key)
    out["sae_loss"].backward()  # the nested total loss is still differentiable
    assert inputs["learned_activations"].grad is not None
    computed = outer.compute()
    assert {f"sae_{key}" for key in expected} <= set(computed)


def test_metric_tracker_finds_the_best_of_every_key(generator):
    tracker = MetricTracker(_full_collection(feature_density=False, num_features=None, dead_feature_window=None))
    for epoch in range(2):
        tracker.increment()
        inputs = _inputs(generator)
        inputs["decoded_activations"] = inputs["source_activations"] * (0.5 + epoch * 0.4)
        tracker.update(**inputs)
    best = tracker.best_metric()
    assert set(best) == set(tracker.compute())
    assert best["loss"] == pytest.approx(float(tracker.compute_all()["loss"].min()))


def test_add_metrics_feeds_this_package_s_metrics_and_foreign_ones(generator):
    loss_fn = sm.SparseAutoencoderLoss(C, 0.1)
    loss_fn.add_metrics({"l2_sum": sm.L2ReconstructionLoss(C, feature_reduction="sum"), "mean": _MeanOfSource()})
    batches = [_inputs(generator), _inputs(generator, batch=3)]
    for batch in batches:
        out = loss_fn(**batch)
        assert {"l2_sum", "mean"} <= set(out)
    expected_sum = sm.L2ReconstructionLoss(C, feature_reduction="sum")
    for batch in batches:
        expected_sum.update(**batch)
    values = loss_fn.compute()
    torch.testing.assert_close(values["l2_sum"], expected_sum.compute())
    sources = torch.cat([b["source_activations"] for b in batches])
    torch.testing.assert_close(values["mean"], sources.mean())
    with pytest.raises(ValueError, match="members \\['l2'\\] already"):
        loss_fn.add_metrics({"l2": sm.L2ReconstructionLoss(C)})


class _MeanOfSource(MeanMetric):
    """A plain torchmetrics metric with its own signature: fed through ``_filter_kwargs``."""

    def update(self, source_activations: torch.Tensor) -> None:  # type: ignore[override]
        super().update(source_activations)


def test_a_foreign_member_failing_rolls_back_every_member(generator):
    loss_fn = sm.SparseAutoencoderLoss(C, 0.1)
    loss_fn.add_metrics({"mean": _MeanOfSource()})
    loss_fn.update(**_inputs(generator))
    before = {
        key: {k: v.clone() for k, v in m.metric_state.items() if torch.is_tensor(v)} for key, m in loss_fn.items()
    }
    bad = {**_inputs(generator), "source_activations": torch.full((6, C, D_MODEL), float("nan"))}
    loss_fn["mean"].nan_strategy = "error"
    with pytest.raises(RuntimeError, match="nan"):
        loss_fn.update(**bad)
    for key, member in loss_fn.items():
        for name, value in before[key].items():
            assert torch.equal(getattr(member, name), value), (key, name)


# --- sync ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METRICS)
def test_forward_while_synced_raises(generator, name):
    metric = METRICS[name]()
    metric.update(**_inputs(generator))
    metric.sync(distributed_available=lambda: True, dist_sync_fn=lambda tensor, group=None: [tensor])
    with pytest.raises(TorchMetricsUserError, match="unsync"):
        metric(**_inputs(generator))
    metric.unsync()
    metric(**_inputs(generator))


def test_forward_of_a_synced_collection_member_raises(generator):
    loss_fn = _full_collection()
    loss_fn.update(**_inputs(generator))
    loss_fn["fvu"].sync(distributed_available=lambda: True, dist_sync_fn=lambda tensor, group=None: [tensor])
    before = loss_fn["l2"].l2_count.clone()
    with pytest.raises(TorchMetricsUserError, match="unsync"):
        loss_fn(**_inputs(generator))
    assert torch.equal(loss_fn["l2"].l2_count, before)


@pytest.mark.parametrize("name", METRICS)
def test_a_synced_state_dict_loads(generator, name):
    metric = METRICS[name](keep_batch_dim=True) if name in ("l2", "l0", "l1", "sparsity") else METRICS[name]()
    metric.persistent(True)
    metric.update(**_inputs(generator))
    metric.update(**_inputs(generator, batch=2))
    metric.sync(distributed_available=lambda: True, dist_sync_fn=lambda tensor, group=None: [tensor])
    state = metric.state_dict()
    metric.unsync()
    restored = METRICS[name](keep_batch_dim=True) if name in ("l2", "l0", "l1", "sparsity") else METRICS[name]()
    restored.persistent(True)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.compute(), metric.compute())
    restored.update(**_inputs(generator))  # and it goes on


def _counting_gather(calls: list[int]) -> Any:
    def gather(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
        calls.append(tensor.numel())
        return gather_all_tensors(tensor, group)

    return gather


def _custom_sync(rank: int, world_size: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(rank)
    results: dict[str, Any] = {}
    for name, factory in METRICS.items():
        kwargs = {"keep_batch_dim": True} if name in ("l2", "l1") else {}
        calls: list[int] = []
        metric, local = factory(dist_sync_fn=_counting_gather(calls), **kwargs), factory(**kwargs)
        for batch in [6, 2] if rank == 0 else [3]:
            inputs = _inputs(generator, batch=batch)
            metric.update(**inputs)
            local.update(**inputs)
        results[name] = (metric.compute(), len(calls))
    calls = []
    loss_fn = _full_collection(dist_sync_fn=_counting_gather(calls))
    loss_fn.update(**_inputs(generator, batch=4 + rank))
    results["collection"] = (loss_fn.compute(), len(calls))
    return results


@pytest.mark.distributed
def test_a_custom_dist_sync_fn_is_used_by_every_metric_and_the_collection():
    rank0, rank1 = run_on_ranks(_custom_sync)
    for name, (value, calls) in rank0.items():
        assert calls >= 1, name  # the given function did the gathering
        other, _ = rank1[name]
        if isinstance(value, dict):
            for key in value:
                assert torch.equal(value[key], other[key]), (name, key)
        else:
            assert torch.equal(value, other), name
    generator0, generator1 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    one_process = METRICS["l2"](keep_batch_dim=True)
    for batch in (_inputs(generator0, batch=6), _inputs(generator0, batch=2)):
        one_process.update(**batch)
    one_process.update(**_inputs(generator1, batch=3))
    torch.testing.assert_close(rank0["l2"][0], one_process.compute())


# --- keywords and positional arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*METRICS, "collection"])
def test_a_misspelt_keyword_raises_and_changes_nothing(generator, name):
    metric = _full_collection() if name == "collection" else METRICS[name]()
    inputs = _inputs(generator)
    metric.update(**inputs)
    state = pickle.dumps(metric)
    bias = inputs.pop("decoder_bias")
    with pytest.raises(TypeError, match=r"unexpected keyword argument `decoder_bais`\. Did you mean `decoder_bias`"):
        metric.update(**inputs, decoder_bais=bias)
    with pytest.raises(TypeError, match="decoder_bais"):
        metric(**inputs, decoder_bais=bias)
    assert pickle.dumps(metric) == state


def test_matryoshka_with_a_misspelt_bias_is_not_silently_unbiased(generator):
    inputs = _inputs(generator)
    inputs["decoder_bias"] = torch.ones(C, D_MODEL)
    metric = sm.MatryoshkaReconstructionLoss([3, D_SAE], C)
    with pytest.raises(TypeError, match="decoder_bais"):
        metric.update(**{**inputs, "decoder_bais": inputs.pop("decoder_bias")})


def test_the_collection_s_positional_arguments_mean_what_the_prior_art_package_s_do():
    assert sm.SparseAutoencoderLoss(1).num_components == 1
    two = sm.SparseAutoencoderLoss(2, 0.01)
    assert two.num_components == 2
    assert two.sparsity_coefficient == 0.01
    assert sm.SparseAutoencoderLoss(3, l1_coefficient=0.5).sparsity_coefficient == 0.5
    with pytest.raises(ValueError, match="num_components"):
        sm.SparseAutoencoderLoss(0.1)  # the coefficient first, as this package used to take it: refused
    with pytest.raises(ValueError, match="not both"):
        sm.SparseAutoencoderLoss(sparsity_coefficient=0.1, l1_coefficient=0.1)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"d_model": 4}, "explained_variance"),
        ({"num_features": 4}, "num_features"),
        ({"explained_variance": True}, "d_model"),
        ({"matryoshka_reuse_decoded_activations": True}, "matryoshka_prefix_sizes"),
    ],
)
def test_an_option_that_cannot_apply_raises(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        sm.SparseAutoencoderLoss(**kwargs)
