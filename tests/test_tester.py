"""The generic checks: every case of the shared registry (``tests/tester.py``) through the same scenarios.

Each check compares with the case's float64 reference, so a metric that agrees with itself but computes the wrong
thing fails too: uneven and empty batches; ``forward`` against a fresh ``update`` + ``compute``; ``keep_batch_dim``
rows; gradients; ``state_dict``, pickle and ``clone``; ``reset``; every kind of bad input; the three
``nan_strategy`` values; two gloo ranks against one process.
"""

import copy
import io
import pickle
import traceback
from typing import Any

import pytest
import torch

from tests import tester
from tests.distributed import run_on_ranks
from tests.tester import CASES, D_MODEL, D_SAE, Case

# compute() on a metric that saw no update (restored, or fed only empty batches): torchmetrics warns, as it should.
pytestmark = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")

#: name -> (num_components, with a component axis)
LAYOUTS = {"1": (1, False), "1_axis": (1, True), "3": (3, True)}


def _with_keep_batch_dim(cases: list[Case] | None = None) -> list[Any]:
    """(case, keep_batch_dim) for every case, ``keep_batch_dim=True`` too where the case takes it."""
    out = []
    for case in cases or CASES.values():
        for keep_batch_dim in (False, True) if case.keep_batch_dim else (False,):
            out.append(pytest.param(case, keep_batch_dim, id=f"{case.name}-{'rows' if keep_batch_dim else 'mean'}"))
    return out


def _make(case: Case, components: int = 2, keep_batch_dim: bool = False, **kwargs: Any) -> Any:
    return case(components, **({"keep_batch_dim": True} if keep_batch_dim else {}), **kwargs)


def _feed(metric: Any, steps: list[tester.Batch], component_axis: bool = True) -> list[dict[str, torch.Tensor]]:
    """Update with the even steps and forward the odd ones (both paths accumulate); the forward values."""
    values = []
    for index, step in enumerate(steps):
        inputs = tester.layout(step, component_axis)
        if index % 2:
            values.append(tester.forward_outputs(metric(**inputs)))
        else:
            metric.update(**inputs)
    return values


def _update_counts(metric: Any) -> list[int]:
    return [member.update_count for member in tester.members(metric)]


def _only(inputs: tester.Batch, names: tuple[str, ...]) -> tester.Batch:
    return {name: value for name, value in inputs.items() if name in names}


# --- accumulation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(("case", "keep_batch_dim"), _with_keep_batch_dim())
def test_uneven_and_empty_batches_equal_one_batch_and_the_reference(case, keep_batch_dim, layout):
    components, component_axis = LAYOUTS[layout]
    steps = tester.batches([5, 1, 0, 7, 3], components, seed=1)
    metric = _make(case, components, keep_batch_dim)
    _feed(metric, steps, component_axis)
    result = tester.outputs(case, metric)
    tester.assert_close(result, case.expected(steps, keep_batch_dim=keep_batch_dim))

    one_batch = _make(case, components, keep_batch_dim)
    one_batch.update(**tester.layout(tester.concatenated(steps), component_axis))
    tester.assert_close(result, tester.outputs(case, one_batch))

    # The inputs a metric does not read are ignored: only the required ones give the reference of only those.
    required = [_only(step, case.requires) for step in steps]
    alone = _make(case, components, keep_batch_dim)
    for step in required:
        alone.update(**tester.layout(step, component_axis))
    tester.assert_close(tester.outputs(case, alone), case.expected(required, keep_batch_dim=keep_batch_dim))

    # Sums float64, counts int64, whatever the inputs.
    for member in tester.members(metric):
        for name, value in member.metric_state.items():
            for row in value if isinstance(value, list) else [value]:
                assert row.dtype in (torch.float64, torch.int64), (name, row.dtype)
    assert _update_counts(metric) == [len(steps)] * len(tester.members(metric))


@pytest.mark.parametrize(("case", "keep_batch_dim"), _with_keep_batch_dim())
def test_only_empty_batches_give_the_value_of_no_items(case, keep_batch_dim):
    """NaN means, no rows, zero densities' NaN, no dead feature: the value of no items, not an error."""
    steps = tester.batches([0, 0], 2)
    metric = _make(case, 2, keep_batch_dim)
    forward = _feed(metric, steps)[0]
    expected = case.expected(steps, keep_batch_dim=keep_batch_dim)
    tester.assert_close(tester.outputs(case, metric), expected)
    tester.assert_close(forward, {key: expected[key] for key in forward})


@pytest.mark.parametrize("case", tester.params())
def test_forward_equals_a_fresh_update_and_compute(case):
    """forward's value is the batch's alone, whatever came before (the dead-feature counters: the running value)."""
    for layout in ("1", "3"):
        components, component_axis = LAYOUTS[layout]
        for keep_batch_dim in (False, True) if case.keep_batch_dim else (False,):
            for history in ([], [5, 0, 2]):
                steps = tester.batches([*history, 1, 0, 4], components, seed=len(history))
                metric = _make(case, components, keep_batch_dim)
                for step in steps[: len(history)]:
                    metric.update(**tester.layout(step, component_axis))
                for index in range(len(history), len(steps)):
                    inputs = tester.layout(steps[index], component_axis)
                    counts = _update_counts(metric)
                    value = tester.forward_outputs(metric(**inputs))
                    assert _update_counts(metric) == [count + 1 for count in counts]
                    fresh = _make(case, components, keep_batch_dim)
                    fresh.update(**inputs)
                    expected = tester.forward_outputs(fresh.compute())
                    reference = case.expected([steps[index]], keep_batch_dim=keep_batch_dim)
                    so_far = case.expected(steps[: index + 1], keep_batch_dim=keep_batch_dim)
                    for key in case.lifetime & set(value):
                        expected[key] = tester.forward_outputs(metric.compute())[key]
                        reference[key] = so_far[key]
                    message = f"layout={layout} keep_batch_dim={keep_batch_dim} history={history} step={index}"
                    tester.assert_close(value, expected, msg=message)
                    tester.assert_close(value, {key: reference[key] for key in value}, msg=message)


#: The keys that hold per-item rows with keep_batch_dim=True (a metric's value; the collection's loss terms).
ROW_KEYS = ("value", "l2", "l0", "l1", "sparsity", "matryoshka")


@pytest.mark.parametrize("layout", ["1", "3"])
@pytest.mark.parametrize("case", tester.params([case for case in CASES.values() if case.keep_batch_dim]))
def test_keep_batch_dim_rows(case, layout):
    """One row per item, in order: forward gives the batch's rows, compute every row; one item stays ``[1]``."""
    components, component_axis = LAYOUTS[layout]
    steps = tester.batches([4, 1, 0, 6], components, seed=2)
    metric = _make(case, components, keep_batch_dim=True)
    row = () if components == 1 else (components,)
    for index, step in enumerate(steps):
        value = tester.forward_outputs(metric(**tester.layout(step, component_axis)))
        items = len(step["learned_activations"])
        for key in set(ROW_KEYS) & set(value):
            assert value[key].shape == (items, *row), key
        so_far = case.expected(steps[: index + 1], keep_batch_dim=True)
        batch = case.expected([step], keep_batch_dim=True) | {key: so_far[key] for key in case.lifetime}
        tester.assert_close(value, {key: batch[key] for key in value})
    result = tester.outputs(case, metric)
    for key in set(ROW_KEYS) & set(result):
        assert result[key].shape == (11, *row), key
    tester.assert_close(result, case.expected(steps, keep_batch_dim=True))


# --- autograd -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "keep_batch_dim"), _with_keep_batch_dim())
def test_gradients_equal_the_reference_and_states_keep_no_graph(case, keep_batch_dim):
    """forward is differentiable where the metric says so, with the reference's gradients; no state keeps a graph."""
    step = tester.batches([6], 2, dtype=torch.float64)[0]
    ours = {name: value.clone().requires_grad_(value.is_floating_point()) for name, value in step.items()}
    theirs = {name: value.clone().requires_grad_(value.is_floating_point()) for name, value in step.items()}
    metric = _make(case, 2, keep_batch_dim)
    value = tester.forward_outputs(metric(**ours))
    keyed = dict(metric.items(keep_base=True, copy_state=False)) if case.is_collection else {"value": metric}
    differentiable = [key for key in value if keyed[key].is_differentiable]
    for key in set(value) - set(differentiable):
        assert not value[key].requires_grad, key
    if differentiable:
        sum(value[key].sum() for key in differentiable).backward()
        expected = case.expected([theirs], keep_batch_dim=keep_batch_dim)
        sum(expected[key].sum() for key in differentiable).backward()
        for name in step:
            got, want = ours[name].grad, theirs[name].grad
            got = torch.zeros_like(step[name]) if got is None else got
            want = torch.zeros_like(step[name]) if want is None else want
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10, msg=lambda text, name=name: f"{name}: {text}")
        assert any(ours[name].grad is not None and ours[name].grad.abs().sum() > 0 for name in step)
    metric.update(**ours)  # builds no graph
    for member in tester.members(metric):
        for name, state in member.metric_state.items():
            for tensor in state if isinstance(state, list) else [state]:
                assert not tensor.requires_grad, name
                assert tensor.grad_fn is None, name
        assert member._forward_cache is None or not member._forward_cache.requires_grad
    for key, computed in tester.outputs(case, metric).items():
        assert not computed.requires_grad, key


# --- checkpoints and copies -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "keep_batch_dim"), _with_keep_batch_dim())
def test_state_dict_round_trip(case, keep_batch_dim):
    """Every state is saved (with ``persistent(True)``; the configuration marker never is: its name says it all), and a
    fresh metric loads it and goes on exactly as the original."""
    steps = tester.batches([4, 0, 3, 5], 2, seed=3)
    metric = _make(case, 2, keep_batch_dim)
    metric.persistent(True)
    _feed(metric, steps[:3])
    saved = metric.state_dict()
    if case.is_collection:
        members = metric.items(keep_base=True, copy_state=False)
        names = {f"{key}.{n}" for key, m in members for n in m._defaults if not n.startswith("configuration_")}
    else:
        names = {n for n in metric._defaults if not n.startswith("configuration_")}
    assert names <= set(saved)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    restored = _make(case, 2, keep_batch_dim)
    restored.persistent(True)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    tester.assert_identical(tester.outputs(case, restored), tester.outputs(case, metric))
    for target in (metric, restored):
        target.update(**steps[3])
    tester.assert_identical(tester.outputs(case, restored), tester.outputs(case, metric))
    tester.assert_close(tester.outputs(case, restored), case.expected(steps, keep_batch_dim=keep_batch_dim))


@pytest.mark.parametrize("case", tester.params())
def test_pickle_deepcopy_and_clone(case):
    """Copies compute the same, keep working and are independent of the original."""
    steps = tester.batches([3, 4, 2], 2, seed=4)
    metric = _make(case, 2, case.keep_batch_dim)
    metric(**steps[0])
    copies = {
        "pickle": pickle.loads(pickle.dumps(metric)),
        "deepcopy": copy.deepcopy(metric),
        "clone": metric.clone(),
    }
    if case.is_collection:
        copies["clone(prefix)"] = metric.clone(prefix="val_")
    for copied in copies.values():
        copied.update(**steps[1])
    metric.update(**steps[1])
    expected = tester.outputs(case, metric)
    tester.assert_close(expected, case.expected(steps[:2], keep_batch_dim=case.keep_batch_dim))
    for name, copied in copies.items():
        result = tester.outputs(case, copied)
        if name == "clone(prefix)":
            assert all(key.startswith("val_") for key in result)
            result = {key.removeprefix("val_"): value for key, value in result.items()}
        tester.assert_identical(result, expected, msg=name)
    copies["pickle"].update(**steps[2])
    copies["clone"].reset()
    tester.assert_identical(tester.outputs(case, metric), expected)


@pytest.mark.parametrize("case", tester.params())
def test_reset_starts_a_new_epoch(case):
    """After ``reset()`` only the new batches count; the dead-feature counters go on (their lifetime is the run)."""
    steps = tester.batches([5, 3, 4], 2, seed=5)
    metric = _make(case, 2, case.keep_batch_dim)
    _feed(metric, steps[:2])
    metric.reset()
    metric.update(**steps[2])
    expected = case.expected(steps[2:], keep_batch_dim=case.keep_batch_dim)
    run = case.expected(steps, keep_batch_dim=case.keep_batch_dim)
    tester.assert_close(tester.outputs(case, metric), expected | {key: run[key] for key in case.lifetime})


# --- bad input ------------------------------------------------------------------------------------------------------


def _replace(name: str, value: Any):
    return lambda inputs: {**inputs, name: value}


#: kind -> (change to valid inputs of 4 items and 2 components, error, fragments of the message)
BAD_INPUTS = {
    "learned_without_component_axis": (
        _replace("learned_activations", torch.rand(4, D_SAE)),
        ValueError,
        ["`learned_activations`", "[batch, 2, feature] (num_components=2)", f"got [4, {D_SAE}]"],
    ),
    "learned_other_component_count": (
        _replace("learned_activations", torch.rand(4, 3, D_SAE)),
        ValueError,
        ["`learned_activations`", "num_components=2", f"got [4, 3, {D_SAE}]"],
    ),
    "learned_extra_axis": (
        _replace("learned_activations", torch.rand(4, 2, D_SAE, 1)),
        ValueError,
        ["`learned_activations`", f"got [4, 2, {D_SAE}, 1]"],
    ),
    "learned_other_batch": (
        _replace("learned_activations", torch.rand(5, 2, D_SAE)),
        ValueError,
        ["`learned_activations` and `source_activations` must agree", f"[5, 2, {D_SAE}]", f"[4, 2, {D_MODEL}]"],
    ),
    "learned_int64": (
        _replace("learned_activations", torch.ones(4, 2, D_SAE, dtype=torch.int64)),
        TypeError,
        ["`learned_activations` must be a floating-point tensor", "torch.int64"],
    ),
    "learned_bool": (
        _replace("learned_activations", torch.ones(4, 2, D_SAE, dtype=torch.bool)),
        TypeError,
        ["`learned_activations`", "torch.bool"],
    ),
    "learned_list": (
        _replace("learned_activations", [[0.0] * D_SAE] * 4),
        TypeError,
        ["`learned_activations` must be a torch.Tensor, got list"],
    ),
    "source_other_d_model": (
        _replace("source_activations", torch.rand(4, 2, D_MODEL + 2)),
        ValueError,
        [
            "`decoded_activations` must have the shape of `source_activations`",
            f"[4, 2, {D_MODEL + 2}]",
            f"got [4, 2, {D_MODEL}]",
        ],
    ),
    "source_other_component_count": (
        _replace("source_activations", torch.rand(4, 3, D_MODEL)),
        ValueError,
        ["`source_activations`", "num_components=2"],
    ),
    "decoded_other_batch": (
        _replace("decoded_activations", torch.rand(5, 2, D_MODEL)),
        ValueError,
        ["`decoded_activations`", f"[4, 2, {D_MODEL}], got [5, 2, {D_MODEL}]"],
    ),
    "decoded_int32": (
        _replace("decoded_activations", torch.ones(4, 2, D_MODEL, dtype=torch.int32)),
        TypeError,
        ["`decoded_activations`", "torch.int32"],
    ),
    "decoder_weight_model_major": (
        _replace("decoder_weight", torch.rand(2, D_MODEL, D_SAE)),
        ValueError,
        ["`decoder_weight` must be feature-major", f"[2, {D_SAE}, {D_MODEL}]", "transpose"],
    ),
    "decoder_weight_without_component_axis": (
        _replace("decoder_weight", torch.rand(D_SAE, D_MODEL)),
        ValueError,
        ["`decoder_weight`", f"got [{D_SAE}, {D_MODEL}]"],
    ),
    "decoder_weight_int64": (
        _replace("decoder_weight", torch.ones(2, D_SAE, D_MODEL, dtype=torch.int64)),
        TypeError,
        ["`decoder_weight`", "torch.int64"],
    ),
    "decoder_bias_other_d_model": (
        _replace("decoder_bias", torch.rand(2, D_MODEL + 1)),
        ValueError,
        [f"`decoder_bias` must have shape [*component, d_model] = [2, {D_MODEL}]", f"got [2, {D_MODEL + 1}]"],
    ),
    "pre_activations_other_d_sae": (
        _replace("pre_activations", torch.rand(4, 2, D_SAE + 1)),
        ValueError,
        ["`pre_activations` must have the shape of `learned_activations`", f"[4, 2, {D_SAE}]"],
    ),
    "threshold_without_component_axis": (
        _replace("threshold", torch.rand(D_SAE)),
        ValueError,
        [f"`threshold` must have shape [*component, d_sae] = [2, {D_SAE}]", f"got [{D_SAE}]"],
    ),
    "dead_mask_float": (
        _replace("dead_mask", torch.zeros(2, D_SAE)),
        TypeError,
        ["`dead_mask` must be a torch.bool tensor", "torch.float32"],
    ),
    "misspelt_decoder_bias": (
        lambda inputs: {**inputs, "decoder_bais": inputs["decoder_bias"]},
        TypeError,
        ["unexpected keyword argument `decoder_bais`", "Did you mean `decoder_bias`?"],
    ),
    "misspelt_learned_activations": (
        lambda inputs: {
            **{k: v for k, v in inputs.items() if k != "learned_activations"},
            "learned_activation": inputs["learned_activations"],
        },
        TypeError,
        ["`learned_activation`", "Did you mean `learned_activations`?"],
    ),
}


def _good_then_bad_then_good(case: Case, make_bad, error: type, fragments: list[str]) -> None:
    steps = tester.batches([4, 3], 2, seed=6)
    metric = _make(case, 2, case.keep_batch_dim)
    metric.update(**steps[0])
    computed = tester.outputs(case, metric)
    tester.assert_rejected(metric, make_bad(steps[0]), error, fragments)
    tester.assert_identical(tester.outputs(case, metric), computed)
    metric(**steps[1])  # still usable, as if the bad batch had never come
    tester.assert_close(tester.outputs(case, metric), case.expected(steps, keep_batch_dim=case.keep_batch_dim))


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
@pytest.mark.parametrize("case", tester.params())
def test_bad_input_raises_naming_the_argument_and_changes_nothing(case, kind):
    make_bad, error, fragments = BAD_INPUTS[kind]
    _good_then_bad_then_good(case, make_bad, error, fragments)


@pytest.mark.parametrize(
    ("case", "missing"),
    [pytest.param(case, name, id=f"{case.name}-{name}") for case in CASES.values() for name in case.requires],
)
def test_a_missing_required_input_raises_naming_it_and_changes_nothing(case, missing):
    def without(inputs: tester.Batch) -> tester.Batch:
        return {name: value for name, value in inputs.items() if name != missing}

    steps = tester.batches([4, 3], 2, seed=6)
    metric = _make(case, 2, case.keep_batch_dim)
    metric.update(**steps[0])
    computed = tester.outputs(case, metric)
    for method in (metric.update, metric.forward):
        before = tester.state(metric)
        with pytest.raises((TypeError, ValueError), match=f"`{missing}`"):
            method(**without(steps[1]))
        tester.assert_same_state(before, tester.state(metric))
    tester.assert_identical(tester.outputs(case, metric), computed)


# --- nan_strategy ---------------------------------------------------------------------------------------------------

BAD_ITEMS = (1, 4)
#: Cases whose value counts non-zero activations: a NaN activation counts as active, the value stays finite.
COUNTING = {"l0", "feature_density", "dead_features"}
#: The JumpReLU L0 counts pre-activations above threshold: a NaN one is not above, the value stays finite.
COUNTING |= {"jumprelu_l0", "jumprelu_l0_ste_to_input_quadratic", "jumprelu_l0_dictionary_learning_target"}


def _poisoned(step: tester.Batch, name: str, *, infinite: bool = True) -> tester.Batch:
    """Item 1 gets a NaN in one component, item 4 an infinity (or a second NaN) in the other.

    Both in the first feature, which every Matryoshka prefix reads (a metric screens the values it computes: an
    activation that only a reused whole-dictionary prefix would read leaves its item finite).
    """
    value = step[name].clone()
    value[BAD_ITEMS[0], 1, 0] = float("nan")
    value[BAD_ITEMS[1], 0, 0] = float("-inf") if infinite else float("nan")
    return {**step, name: value}


_POISON_PARAMS = [
    pytest.param(case, name, id=f"{case.name}-{name.split('_')[0]}")
    for case in CASES.values()
    for name in case.requires
    if name in tester.ACTIVATIONS
]


@pytest.mark.parametrize(("case", "poisoned"), _POISON_PARAMS)
def test_nan_strategy_propagate_lets_the_values_through(case, poisoned):
    steps = tester.batches([3, 6], 2, seed=7)
    steps[1] = _poisoned(steps[1], poisoned, infinite=False)
    metric = _make(case, 2, case.keep_batch_dim)
    assert {member.nan_strategy for member in tester.members(metric)} == {"propagate"}  # the default
    forward = _feed(metric, steps)[0]
    expected = case.expected(steps, keep_batch_dim=case.keep_batch_dim)
    if case.name not in COUNTING:
        assert any(value.isnan().any() for value in expected.values())
    tester.assert_close(tester.outputs(case, metric), expected)
    batch = case.expected(steps[1:], keep_batch_dim=case.keep_batch_dim) | {key: expected[key] for key in case.lifetime}
    tester.assert_close(forward, {key: batch[key] for key in forward})


@pytest.mark.parametrize(("case", "poisoned"), _POISON_PARAMS)
def test_nan_strategy_ignore_drops_whole_items(case, poisoned):
    steps = tester.batches([3, 6], 2, seed=7)
    kept = tester.rows(steps[1], [index for index in range(6) if index not in BAD_ITEMS])
    for keep_batch_dim in (False, True) if case.keep_batch_dim else (False,):
        metric = _make(case, 2, keep_batch_dim, nan_strategy="ignore")
        forward = _feed(metric, [steps[0], _poisoned(steps[1], poisoned)])[0]
        expected = case.expected([steps[0], kept], keep_batch_dim=keep_batch_dim)
        tester.assert_close(tester.outputs(case, metric), expected, msg=f"keep_batch_dim={keep_batch_dim}")
        batch = case.expected([kept], keep_batch_dim=keep_batch_dim) | {key: expected[key] for key in case.lifetime}
        tester.assert_close(forward, {key: batch[key] for key in forward}, msg=f"keep_batch_dim={keep_batch_dim}")


@pytest.mark.parametrize(("case", "poisoned"), _POISON_PARAMS)
def test_nan_strategy_error_raises_and_changes_nothing(case, poisoned):
    steps = tester.batches([3, 6], 2, seed=7)
    metric = _make(case, 2, case.keep_batch_dim, nan_strategy="error")
    metric.update(**steps[0])
    computed = tester.outputs(case, metric)
    fragments = ["2 of 6 items have a NaN or infinite value", f"`{poisoned}`", "nan_strategy='error'"]
    tester.assert_rejected(metric, _poisoned(steps[1], poisoned), ValueError, fragments)
    tester.assert_identical(tester.outputs(case, metric), computed)
    metric(**steps[1])
    tester.assert_close(tester.outputs(case, metric), case.expected(steps, keep_batch_dim=case.keep_batch_dim))


# --- two gloo ranks -------------------------------------------------------------------------------------------------

#: split -> batch sizes of each rank: uneven counts and sizes, a rank without any batch, a rank with an empty batch.
SPLITS = {"uneven": [[5, 3], [7]], "empty_rank": [[4, 1, 6], []], "zero_rows": [[2], [0, 3]]}


def _on_this_rank(case: Case, rank: int, split: list[list[int]], layout: str, keep_batch_dim: bool) -> Any:
    components, component_axis = LAYOUTS[layout]
    every = tester.batches([size for sizes in split for size in sizes], components, seed=components)
    by_rank, start = [], 0
    for sizes in split:
        by_rank.append(every[start : start + len(sizes)])
        start += len(sizes)
    metric = _make(case, components, keep_batch_dim)
    _feed(metric, by_rank[rank], component_axis)
    local = tester.state(metric)
    synced = tester.outputs(case, metric)
    tester.assert_same_state(local, tester.state(metric))  # compute() put the rank's own state back
    tester.assert_close(synced, case.expected(*by_rank, keep_batch_dim=keep_batch_dim))
    single = _make(case, components, keep_batch_dim, sync_on_compute=False)
    for step in every:
        single.update(**tester.layout(step, component_axis))
    one_process = tester.outputs(case, single)  # the dead-feature counters combine ranks in lockstep, not in series
    tester.assert_close(
        {k: v for k, v in synced.items() if k not in case.lifetime},
        {k: v for k, v in one_process.items() if k not in case.lifetime},
    )
    if by_rank[rank]:  # accumulation goes on rank-locally after compute()
        metric.update(**tester.layout(by_rank[rank][0], component_axis))
    return synced


def _every_case_on_two_ranks(rank: int, world_size: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    for case in CASES.values():
        for layout in ("1", "3"):
            for keep_batch_dim in (False, True) if case.keep_batch_dim else (False,):
                for split_name, split in SPLITS.items():
                    key = f"{case.name}/{layout}/keep_batch_dim={keep_batch_dim}/{split_name}"
                    try:
                        results[key] = _on_this_rank(case, rank, split, layout, keep_batch_dim)
                    except Exception:  # reported by the parent, with every other failure
                        failures[key] = traceback.format_exc()
    return {"results": results, "failures": failures}


@pytest.mark.distributed
def test_two_gloo_ranks_equal_one_process():
    """Every case, on 2 real processes (one spawn): uneven and empty ranks give the one-process value, bit for bit
    the same on both ranks."""
    ranks = run_on_ranks(_every_case_on_two_ranks)
    failures = {f"rank {rank}: {key}": text for rank, out in enumerate(ranks) for key, text in out["failures"].items()}
    assert not failures, "\n".join(f"{key}\n{text}" for key, text in failures.items())
    first, second = (out["results"] for out in ranks)
    assert first.keys() == second.keys()
    assert len(first) == sum(
        len(SPLITS) * 2 * (2 if case.keep_batch_dim else 1) for case in CASES.values()
    )  # every configuration ran
    for key, values in first.items():
        tester.assert_identical(second[key], values, msg=key)
