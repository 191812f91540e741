"""A dictionary sharded over features (tensor parallel) with data parallelism on top, on real gloo processes.

Every registered case (``tests/tester.py``) runs on a ``data x feature`` mesh of processes, each holding one slice of
the features (of ``learned_activations``, ``pre_activations``, ``threshold``, ``dead_mask`` and the decoder's rows)
and the replicated reconstructions; it must equal the same case on the full dictionary, data-parallel over the same
data group: forward values and the gradients of each forward value on every shard (of ``"loss"`` for a collection),
and ``compute()`` (per-feature outputs gathered with :func:`sparse_metrics.gather_features`) after uneven batches with
an empty data rank. Then the errors of a bad configuration, raised on every rank.
"""

import pickle
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

import sparse_metrics as sm
from sparse_metrics._batch import SHARDED_INPUTS
from tests import tester
from tests.distributed import run_on_ranks
from tests.tester import CASES, D_SAE, Case

pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")]

#: data ranks' batch sizes: uneven, and the last data rank sees no batch (the 1-rank mesh gets the first only).
SPLIT = [[5, 0, 3, 4], [7, 2], [], [3]]
#: Within the issue's bound of 1e-6 relative.
TOLERANCE = {"rtol": 1e-6, "atol": 1e-7}
#: The inputs whose gradients are compared.
DIFFERENTIABLE = (
    "source_activations",
    "learned_activations",
    "decoded_activations",
    "decoder_weight",
    "pre_activations",
    "threshold",
)


def _mesh(data: int, feature: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415

    return init_device_mesh("cpu", (data, feature), mesh_dim_names=("data", "feature"))


def shard(batch: tester.Batch, rank: int, shards: int) -> tester.Batch:
    """This feature shard's slice of a full-dictionary step (the replicated inputs as they are)."""
    out = {}
    for name, value in batch.items():
        axis = SHARDED_INPUTS.get(name)
        if axis is None:
            out[name] = value
        else:
            width = value.shape[axis] // shards
            out[name] = value.narrow(axis % value.ndim, rank * width, width)
    return out


def _gathered(values: dict[str, Tensor], metric: Any, full: dict[str, Tensor]) -> dict[str, Tensor]:
    """The sharded outputs with each per-feature one (a slice of the reference's feature axis) gathered whole."""
    out = {}
    for key, value in values.items():
        if value.ndim and value.shape != full[key].shape:
            out[key] = sm.gather_features(value, metric)
        else:
            out[key] = value
    return out


def _forward_value(case: Case, value: Any) -> Tensor | None:
    """What backward starts from: a collection's ``"loss"``, a differentiable metric's value."""
    if isinstance(value, dict):
        value = value["loss"]
    return value if value.requires_grad else None


def _check_case(case: Case, mesh: Any, keep_batch_dim: bool) -> None:
    data_rank, feature_rank = mesh.get_local_rank("data"), mesh.get_local_rank("feature")
    shards = mesh.size(1)
    sizes = SPLIT[: mesh.size(0)]
    every = tester.batches([size for rank_sizes in sizes for size in rank_sizes], 2, seed=7, dtype=torch.float64)
    start = sum(len(rank_sizes) for rank_sizes in sizes[:data_rank])
    mine = every[start : start + len(sizes[data_rank])]
    options = {"keep_batch_dim": True} if keep_batch_dim else {}
    sharded = case(2, device_mesh=mesh, **options)
    full = case(2, process_group=mesh.get_group("data"), **options)
    for index, step in enumerate(mine):
        if index % 2:
            sharded.update(**shard(step, feature_rank, shards))
            full.update(**step)
            continue
        full_inputs = {k: v.clone().requires_grad_(k in DIFFERENTIABLE) for k, v in step.items()}
        shard_leaves = {
            k: v.detach().requires_grad_(k in DIFFERENTIABLE)
            for k, v in shard({k: v.detach() for k, v in step.items()}, feature_rank, shards).items()
        }
        expected = full(**full_inputs)
        got = sharded(**shard_leaves)
        expected_values = tester.forward_outputs(expected)
        tester.assert_close(
            _gathered(tester.forward_outputs(got), sharded, expected_values),
            expected_values,
            msg="forward",
            **TOLERANCE,
        )
        start_full, start_shard = _forward_value(case, expected), _forward_value(case, got)
        assert (start_full is None) == (start_shard is None)
        if start_full is None or start_shard is None or step["learned_activations"].shape[0] == 0:
            continue
        names = [name for name in DIFFERENTIABLE if name in full_inputs]
        grads_full = torch.autograd.grad(start_full.sum(), [full_inputs[n] for n in names], allow_unused=True)
        grads_shard = torch.autograd.grad(start_shard.sum(), [shard_leaves[n] for n in names], allow_unused=True)
        full_grads = {
            name: grad if grad is not None else torch.zeros_like(full_inputs[name])
            for name, grad in zip(names, grads_full, strict=True)
        }
        sliced = shard(full_grads, feature_rank, shards)
        for name, grad in zip(names, grads_shard, strict=True):
            got_grad = grad if grad is not None else torch.zeros_like(sliced[name])
            torch.testing.assert_close(
                got_grad, sliced[name], msg=lambda text, n=name: f"gradient of {n}: {text}", **TOLERANCE
            )
    expected_out = tester.outputs(case, full)
    tester.assert_close(_gathered(tester.outputs(case, sharded), sharded, expected_out), expected_out, **TOLERANCE)


def _every_case(rank: int, world_size: int, data: int) -> dict[str, str]:
    mesh = _mesh(data, world_size // data)
    failures = {}
    for case in CASES.values():
        for keep_batch_dim in (False, True) if case.keep_batch_dim else (False,):
            key = f"{case.name}/keep_batch_dim={keep_batch_dim}"
            try:
                _check_case(case, mesh, keep_batch_dim)
            except Exception:
                failures[key] = traceback.format_exc()
    return failures


def _assert_no_failures(ranks: list[dict[str, str]]) -> None:
    failures = {f"rank {rank}: {key}": text for rank, out in enumerate(ranks) for key, text in out.items()}
    assert not failures, "\n".join(f"{key}\n{text}" for key, text in list(failures.items())[:6])


@pytest.mark.slow
@pytest.mark.parametrize("data", [2, 1, 4], ids=["2x2", "1x4", "4x1"])
def test_sharded_mesh_equals_full_dictionary(data: int) -> None:
    """Every case on a data x feature mesh of 4 processes equals the full dictionary over the same data group."""
    _assert_no_failures(run_on_ranks(_every_case, data, world_size=4))


# --- explicit groups, fused collectives, errors on every rank ------------------------------------------------------


def _explicit_groups(rank: int, world_size: int) -> dict[str, Any]:
    feature_group = dist.new_group([0, 1])
    data_group = [dist.new_group([0]), dist.new_group([1])][rank]  # one replica: each shard its own data group
    groups = {"feature_group": feature_group, "process_group": data_group}
    steps = tester.batches([4, 3], 2, seed=3, dtype=torch.float64)
    out: dict[str, Any] = {}
    collection = sm.SparseAutoencoderLoss(
        2, 0.2, sparsity_decoder_norm_weighting=True, feature_density=True, num_features=D_SAE, **groups
    )
    full = sm.SparseAutoencoderLoss(
        2, 0.2, sparsity_decoder_norm_weighting=True, feature_density=True, num_features=D_SAE, sync_on_compute=False
    )
    calls = {"all_reduce": 0}
    original = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls["all_reduce"] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        for step in steps:
            values = collection(**shard(step, rank, 2))
        out["all_reduce_per_forward"] = calls["all_reduce"] / len(steps)
    finally:
        dist.all_reduce = original
    for step in steps:
        expected = full(**step)
    expected_values = tester.forward_outputs(expected)
    tester.assert_close(
        _gathered(tester.forward_outputs(values), collection, expected_values), expected_values, **TOLERANCE
    )
    expected_compute = full.compute()
    tester.assert_close(_gathered(collection.compute(), collection, expected_compute), expected_compute, **TOLERANCE)
    # nan_strategy="ignore": an item non-finite on one shard only is dropped on every shard, as on the full dictionary.
    poisoned = {k: v.clone() for k, v in steps[0].items()}
    poisoned["learned_activations"][1, 0, 0] = float("nan")  # a feature of shard 0
    for strategy in ("ignore", "error"):
        ignoring = sm.L1AbsoluteLoss(2, nan_strategy=strategy, **groups)
        reference = sm.L1AbsoluteLoss(2, nan_strategy=strategy, sync_on_compute=False)
        try:
            got = ignoring(**shard(poisoned, rank, 2))
            tester.assert_close({"value": got}, {"value": reference(**poisoned)}, **TOLERANCE)
            out[f"nan_{strategy}"] = "ok"
        except ValueError as error:
            out[f"nan_{strategy}"] = str(error)
    out["errors"] = {}
    for name, build in {
        # feature_group only: compute() would sync over the default group, which holds both shards of the replica.
        "no_data_group": lambda: sm.FeatureDensity(D_SAE, feature_group=feature_group),
        "indivisible": lambda: sm.FeatureDensity(13, **groups),
        "prefix": lambda: sm.MatryoshkaReconstructionLoss([4, D_SAE + 2], 2, **groups)(**shard(steps[0], rank, 2)),
        "unequal_shards": lambda: sm.L1AbsoluteLoss(2, **groups)(learned_activations=torch.ones(3, 2, 5 + rank)),
        "dtensor_unsharded": lambda: sm.L0NormMetric()(
            learned_activations=_dtensor(steps[0]["learned_activations"], rank)
        ),
        "mesh_1d": lambda: sm.L0NormMetric(device_mesh=_one_d_mesh()),
        "pickle": lambda: pickle.dumps(sm.L0NormMetric(2, feature_group=feature_group, sync_on_compute=False)),
    }.items():
        try:
            build()
            out["errors"][name] = None
        except (TypeError, ValueError) as error:
            out["errors"][name] = f"{type(error).__name__}: {error}"
    # A copy (clone, deepcopy) shares the process group and computes the same.
    original = sm.L1AbsoluteLoss(2, feature_group=feature_group, sync_on_compute=False)  # (a ProcessGroup as
    # process_group cannot be deep-copied: torchmetrics' clone of any metric given one fails)
    copy = original.clone()
    out["clone_equal"] = bool(torch.equal(copy(**shard(steps[0], rank, 2)), original(**shard(steps[0], rank, 2))))
    return out


def _one_d_mesh() -> Any:
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415

    return init_device_mesh("cpu", (2,), mesh_dim_names=("feature",))


def _dtensor(value: Tensor, rank: int) -> Any:
    from torch.distributed.tensor import DTensor, Shard  # noqa: PLC0415

    return DTensor.from_local(
        shard({"learned_activations": value}, rank, 2)["learned_activations"], _one_d_mesh(), [Shard(2)]
    )


def test_explicit_groups_fused_collective_and_errors_on_every_rank() -> None:
    """``feature_group=`` and ``process_group=`` given as groups; per forward one all-reduce for every feature sum and
    one for the density summaries; compute() equals the full dictionary's; each bad setting (a feature group without
    a data group among them) raises on every rank with a message naming it."""
    ranks = run_on_ranks(_explicit_groups, world_size=2)
    for out in ranks:
        assert out["all_reduce_per_forward"] == 2
        assert out["nan_ignore"] == "ok"
        assert "1 of 4 items have a NaN" in out["nan_error"]
        errors = out["errors"]
        assert "process_group" in errors["no_data_group"]
        assert "sync_on_compute=False" in errors["no_data_group"]
        assert "num_features=13" in errors["indivisible"]
        assert "prefix" in errors["prefix"]
        assert str(D_SAE + 2) in errors["prefix"]
        assert "disagree" in errors["unequal_shards"]
        assert "d_sae (local)=5" in errors["unequal_shards"]
        assert "DTensor" in errors["dtensor_unsharded"]
        assert "device_mesh" in errors["dtensor_unsharded"]
        assert "2-D" in errors["mesh_1d"]
        assert errors["pickle"].startswith("TypeError")
        assert "state_dict" in errors["pickle"]
        assert out["clone_equal"]


def _dtensor_inputs(rank: int, world_size: int) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor, Replicate, Shard  # noqa: PLC0415

    mesh = _mesh(1, 2)
    step = tester.batches([4], 2, seed=5, dtype=torch.float64)[0]
    local = shard(step, rank, 2)
    inputs = {}
    for name, value in local.items():
        axis = SHARDED_INPUTS.get(name)
        placement = Shard(axis % value.ndim) if axis is not None else Replicate()
        inputs[name] = DTensor.from_local(value, mesh, [Replicate(), placement], run_check=False)
    metric = sm.SparseAutoencoderLoss(2, 0.2, feature_density=True, num_features=D_SAE, device_mesh=mesh)
    full = sm.SparseAutoencoderLoss(2, 0.2, feature_density=True, num_features=D_SAE, sync_on_compute=False)
    got, expected = metric(**inputs), full(**step)
    tester.assert_close(_gathered(got, metric, expected), expected, **TOLERANCE)
    bad = dict(
        inputs, decoded_activations=DTensor.from_local(local["decoded_activations"], mesh, [Replicate(), Shard(2)])
    )
    try:
        metric(**bad)
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


def test_dtensor_inputs_sharded_on_features() -> None:
    """DTensor inputs sharded on the feature axis over the mesh's feature dim give the full-dictionary values; a
    replicated input given sharded is refused, naming it and the placements expected."""
    for out in run_on_ranks(_dtensor_inputs, world_size=2):
        assert out["error"] is not None
        assert "decoded_activations" in out["error"]
        assert "Replicate()" in out["error"]


def _dtensor_on_a_2x2_mesh(rank: int, world_size: int) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor, Replicate, Shard  # noqa: PLC0415

    mesh = _mesh(2, 2)
    data_rank, feature_rank = mesh.get_local_rank("data"), mesh.get_local_rank("feature")
    every = tester.batches([3, 5], 2, seed=9, dtype=torch.float64)
    local = shard(every[data_rank], feature_rank, 2)
    inputs = {}
    for name, value in local.items():  # items split over the data dim, features over the feature dim
        axis = SHARDED_INPUTS.get(name)
        over_data = Shard(0) if name in ("source_activations", "learned_activations", "decoded_activations") else None
        placements = [over_data or Replicate(), Shard(axis % value.ndim) if axis is not None else Replicate()]
        inputs[name] = DTensor.from_local(value, mesh, placements, run_check=False)
    metric = sm.SparseAutoencoderLoss(2, 0.2, feature_density=True, num_features=D_SAE, device_mesh=mesh)
    got = metric(**inputs)
    full = sm.SparseAutoencoderLoss(2, 0.2, feature_density=True, num_features=D_SAE, sync_on_compute=False)
    expected = full(**every[data_rank])
    tester.assert_close(_gathered(got, metric, expected), expected, **TOLERANCE)
    # The features split over the data dim: the local slice is another shard's than the metric reads.
    learned = local["learned_activations"]
    wrong = DTensor.from_local(learned, mesh, [Shard(2), Replicate()], run_check=False)
    try:
        sm.L1AbsoluteLoss(2, device_mesh=mesh)(learned_activations=wrong)
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


@pytest.mark.slow
def test_dtensor_inputs_on_a_2x2_mesh_are_read_by_mesh_dimension() -> None:
    """On a data x feature mesh, inputs split over items on the data dim and over features on the feature dim give the
    full dictionary's values; features split over the data dim are refused, naming the dim and the placement."""
    for out in run_on_ranks(_dtensor_on_a_2x2_mesh, world_size=4):
        assert out["error"] is not None
        assert "mesh dim 0" in out["error"]
        assert "Replicate() or Shard(0)" in out["error"]


@pytest.mark.slow
def test_example_sharded_runs() -> None:
    """``examples/sharded.py`` (a 2 x 2 mesh) runs and agrees with one process on the full dictionary."""
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from tests.processes import run_process_tree  # noqa: PLC0415

    script = Path(__file__).parent.parent / "examples" / "sharded.py"
    done = run_process_tree([sys.executable, str(script)], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sharded == one process on the full dictionary" in done.stdout


# --- the terms of TopK, BatchTopK and JumpReLU SAEs: collectives per step, the BatchTopK threshold -----------------


#: Whole training losses with the terms that sum over features or pick latents globally, by name.
PRESETS = {
    "saelens_jumprelu": lambda **kw: sm.presets.saelens("jumprelu", num_components=2, **kw),
    "saelens_standard_lp": lambda **kw: sm.presets.saelens("standard", lp_norm=1.5, num_components=2, **kw),
    "dictionary_learning_top_k": lambda **kw: sm.presets.dictionary_learning(
        "top_k", d_model=tester.D_MODEL, num_components=2, **kw
    ),
    "saelens_matryoshka_batchtopk": lambda **kw: sm.presets.saelens(
        "matryoshka_batchtopk", matryoshka_widths=[3, 8, D_SAE], d_sae=D_SAE, num_components=2, **kw
    ),
}


def _counting(op: str, original: Any, calls: dict[str, int]) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        calls[op] += 1
        return original(*args, **kwargs)

    return call


def _presets_on_a_feature_group(rank: int, world_size: int) -> dict[str, Any]:
    feature_group = dist.new_group([0, 1])
    data_group = [dist.new_group([0]), dist.new_group([1])][rank]
    steps = tester.batches([4, 4], 2, seed=11, dtype=torch.float64)  # one shape: its check runs on the first step
    out: dict[str, Any] = {}
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}
    for name, build in PRESETS.items():
        sharded, full = build(feature_group=feature_group, process_group=data_group), build(sync_on_compute=False)
        sharded(**shard(steps[0], rank, 2))  # the first step of a shape also checks the shards' shapes
        calls = dict.fromkeys(originals, 0)
        for op, original in originals.items():
            setattr(dist, op, _counting(op, original, calls))
        try:
            leaves = {k: v.detach().requires_grad_(k in DIFFERENTIABLE) for k, v in shard(steps[1], rank, 2).items()}
            got = sharded(**leaves)
        finally:
            for op, original in originals.items():
                setattr(dist, op, original)
        out[name] = dict(calls)
        full(**steps[0])
        inputs = {k: v.clone().requires_grad_(k in DIFFERENTIABLE) for k, v in steps[1].items()}
        expected = full(**inputs)
        tester.assert_close(tester.forward_outputs(got), tester.forward_outputs(expected), **TOLERANCE)
        names = [n for n in DIFFERENTIABLE if n in inputs]
        grads = torch.autograd.grad(expected["loss"].sum(), [inputs[n] for n in names], allow_unused=True)
        own = torch.autograd.grad(got["loss"].sum(), [leaves[n] for n in names], allow_unused=True)
        full_grads = {n: g if g is not None else torch.zeros_like(inputs[n]) for n, g in zip(names, grads, strict=True)}
        for grad, want in zip(own, shard(full_grads, rank, 2).values(), strict=True):
            torch.testing.assert_close(grad if grad is not None else torch.zeros_like(want), want, **TOLERANCE)
    term = sm.TanhSparsityLoss(2)  # a loss term the collection would read unsharded
    try:
        sm.SparseAutoencoderLoss(
            2, 0.2, loss_terms={"tanh": term}, feature_group=feature_group, process_group=data_group
        )
    except ValueError as error:
        out["unsharded_term"] = str(error)
    return out


@pytest.mark.slow
def test_presets_cross_the_feature_group_in_few_collectives() -> None:
    """Whole training losses (JumpReLU, Lp, TopK + AuxK, Matryoshka BatchTopK + AuxK) on 2 feature shards equal the
    full dictionary, values and gradients; every feature sum of a step crosses in one all-reduce, and AuxK adds one
    all-gather of top-k candidates and one all-reduce of partial decodes (Matryoshka prefixes included)."""
    for out in run_on_ranks(_presets_on_a_feature_group, world_size=2):
        assert out["saelens_jumprelu"] == {"all_reduce": 1, "all_gather": 0}
        assert out["saelens_standard_lp"] == {"all_reduce": 1, "all_gather": 0}
        assert out["dictionary_learning_top_k"] == {"all_reduce": 2, "all_gather": 1}
        assert out["saelens_matryoshka_batchtopk"] == {"all_reduce": 2, "all_gather": 1}
        assert "tanh" in out["unsharded_term"]
        assert "feature_group" in out["unsharded_term"]


def _batchtopk_threshold_on_a_mesh(rank: int, world_size: int) -> dict[str, Tensor]:
    mesh = _mesh(2, 2)
    data_rank, feature_rank = mesh.get_local_rank("data"), mesh.get_local_rank("feature")
    generator = torch.Generator().manual_seed(4)
    steps = [torch.rand(2, 3 + step, 2, D_SAE, generator=generator).mul(4).sub(2).relu() for step in range(4)]
    out = {}
    for convention in ("saelens", "dictionary_learning", "saev"):
        sharded = sm.BatchTopKThreshold(2, convention=convention, start_step=1, device_mesh=mesh)
        for step in steps:
            local = step[data_rank]
            width = D_SAE // 2
            sharded.update(local[..., feature_rank * width : (feature_rank + 1) * width])
        full = sm.BatchTopKThreshold(2, convention=convention, start_step=1, sync_on_compute=False)
        for step in steps:
            full.update(step.flatten(0, 1))  # the global batch of the step, the whole dictionary
        out[convention] = torch.stack([sharded.compute(), full.compute()])
    return out


def test_batchtopk_threshold_is_the_whole_dictionarys_minimum() -> None:
    """On a 2 x 2 mesh every process holds the threshold of the global batch over the WHOLE dictionary."""
    ranks = run_on_ranks(_batchtopk_threshold_on_a_mesh, world_size=4)
    for out in ranks:
        for convention, (sharded, full) in out.items():
            assert torch.equal(sharded, full), convention
