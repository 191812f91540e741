"""The hand-written CPU pass for the L0, the L1 and the activity statistics (``functional/_activity_kernel``)."""

import ctypes
import math
import os
import re
import shutil
import sys
import warnings

import jaxtyping
import pytest
import torch

import sparse_metrics as sm
from sparse_metrics import _batch
from sparse_metrics.functional import _activity_kernel as activity_kernel
from sparse_metrics.functional.feature_density import _active_mask, _feature_activity

HAS_COMPILER = bool(os.environ.get("CXX")) or any(shutil.which(name) for name in ("g++", "c++", "clang++"))
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler to build the activity kernel")
operator = torch.ops.sparse_metrics.activity_statistics


def _activations(batch, components, d_sae, dtype, generator):
    """Mostly zeros, negative and positive values, values at the thresholds 0.5 and 0.1, and NaN and infinities."""
    values = torch.randn(batch, components, d_sae, generator=generator, dtype=dtype)
    values = values * (torch.rand(batch, components, d_sae, generator=generator) < 0.3)
    values[:, :, :3] = 0.0
    values[-1, :, 1] = 2.0  # fires on the last item only (feature 0 never fires)
    values[0, :, 2] = -1.0  # fires on the first item only, and only as "!= 0" (below both thresholds)
    values[:, :, 3] = 0.5  # at the threshold 0.5: fires for "!= 0" and 0.0 only
    values[:, :, 6] = 0.1  # at the threshold 0.1 in float32: fires only where compared in double (as it must not)
    values[batch // 2, 0, 4] = math.nan
    values[0, -1, 5] = math.inf
    return values


def _on_threads(threads, learned, thresholds):
    """The operator's outputs with torch's intra-op threads set to ``threads`` for the call."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return operator(learned, activity_kernel.operator_thresholds(thresholds))
    finally:
        torch.set_num_threads(previous)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("batch", "components", "threads"), [(1, 1, 1), (7, 3, 2), (130, 1, 2), (300, 2, 4)])
def test_kernel_matches_the_direct_statistics(generator, monkeypatch, dtype, batch, components, threads):
    """Every statistic of every mask, on one thread and on several (each with its rows and counters)."""
    monkeypatch.setattr(activity_kernel, "MIN_ROWS_PER_THREAD", 2)  # small batches split too
    learned = _activations(batch, components, 40, dtype, generator)
    thresholds = [None, 0.5, 0.0, 0.1]
    assert activity_kernel.applies(learned)
    l0, l1, fire_counts, items_since_fired = _on_threads(threads, learned, thresholds)
    assert l0.dtype == l1.dtype == dtype
    assert l0.shape == l1.shape == (batch, components)
    torch.testing.assert_close(l0, (learned != 0).sum(dim=-1).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(l1, learned.abs().sum(dim=-1), equal_nan=True)
    assert fire_counts.shape == items_since_fired.shape == (len(thresholds), components, 40)
    for index, threshold in enumerate(thresholds):
        expected = _feature_activity(_active_mask(learned, threshold))
        assert torch.equal(fire_counts[index], expected.fire_count), threshold
        assert torch.equal(items_since_fired[index], expected.items_since_fired), threshold
    # the masks differ: feature 2 fires (-1) only where f != 0, feature 3 (0.5) not above 0.5
    assert fire_counts[:, 0, 2].tolist() == [1, 0, 0, 0]
    assert fire_counts[3, 0, 6] == 0 < fire_counts[0, 0, 6]
    assert fire_counts[1, 0, 3] == 0 < fire_counts[2, 0, 3]


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("thresholds", [[0.5], [None], [0.1, None]])
@pytest.mark.parametrize(("batch", "threads"), [(3, 1), (4, 1), (11, 1), (22, 2)])
def test_kernel_takes_rows_in_blocks_of_four_and_then_one_by_one(
    generator, monkeypatch, dtype, thresholds, batch, threads
):
    """Each first mask (read with the L0 and L1) over every firing pattern of four rows, in blocks and after them.

    Features 8 to 23 fire in the rows given by the bits of a pattern that changes from one four rows to the next:
    each block (the second part of 22 rows on two threads starts at row 11, not at a multiple of four) sees all 16
    patterns, so the count and the last firing of each block position are compared, as are the rows after the blocks.
    """
    monkeypatch.setattr(activity_kernel, "MIN_ROWS_PER_THREAD", 2)
    learned = _activations(batch, 2, 40, dtype, generator)
    rows, features = torch.arange(batch).unsqueeze(-1), torch.arange(16)
    patterns = (features + rows // 4) % 16
    learned[:, :, 8:24] = (patterns >> (rows % 4) & 1).to(dtype).unsqueeze(1) * 3.0
    l0, l1, fire_counts, items_since_fired = _on_threads(threads, learned, thresholds)
    torch.testing.assert_close(l0, (learned != 0).sum(dim=-1).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(l1, learned.double().abs().sum(dim=-1).to(dtype), equal_nan=True)
    for index, threshold in enumerate(thresholds):
        expected = _feature_activity(_active_mask(learned, threshold))
        assert torch.equal(fire_counts[index], expected.fire_count), threshold
        assert torch.equal(items_since_fired[index], expected.items_since_fired), threshold


@needs_compiler
def test_kernel_gradient_is_the_l1_gradient_and_the_counts_carry_none(generator):
    learned = _activations(9, 2, 16, torch.float64, generator)[:, :, 6:]  # no NaN or infinity
    learned = learned.contiguous().requires_grad_()
    weights = torch.randn(9, 2, generator=generator, dtype=torch.float64)
    l0, l1, fire_counts, items_since_fired = operator(learned, [activity_kernel.NONZERO])
    assert not any(value.requires_grad for value in (l0, fire_counts, items_since_fired))
    (gradient,) = torch.autograd.grad((l1 * weights).sum(), learned)
    (expected,) = torch.autograd.grad((learned.abs().sum(dim=-1) * weights).sum(), learned)
    assert torch.equal(gradient, expected)  # sgn(f) times the L1's gradient, 0 where f is 0


@needs_compiler
def test_operator_passes_torch_library_checks(generator):
    """Schema, fake (tracing) implementation, autograd registration and dispatch, as torch.library checks them."""
    learned = _activations(6, 2, 12, torch.float64, generator)[:, :, 6:].contiguous().requires_grad_()
    torch.library.opcheck(operator, (learned, [activity_kernel.NONZERO, 0.25]))


@needs_compiler
def test_applies_only_to_what_the_kernel_reads(generator):
    learned = torch.rand(4, 2, 8, generator=generator)
    assert activity_kernel.applies(learned)
    assert activity_kernel.applies(learned.double())
    assert not activity_kernel.applies(learned.to(torch.bfloat16))  # the traced path accumulates half in float32
    assert not activity_kernel.applies(learned.transpose(0, 1))  # not contiguous
    assert not activity_kernel.applies(learned[0])  # not [batch, component, d_sae]
    assert not activity_kernel.applies(torch.empty(4, 2, 8, device="meta"))
    primal = learned.clone()
    with torch.autograd.forward_ad.dual_level():  # the operator has no forward-mode derivative
        assert not activity_kernel.applies(torch.autograd.forward_ad.make_dual(primal, torch.ones_like(primal)))


def test_a_kernel_that_cannot_be_built_warns_once_and_is_not_used(monkeypatch):
    monkeypatch.setattr(activity_kernel, "_build_state", activity_kernel._Build())
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    learned = torch.ones(4, 1, 8)
    with pytest.warns(RuntimeWarning, match="could not build its CPU activity kernel.*FileNotFoundError"):
        assert not activity_kernel.applies(learned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not activity_kernel.applies(learned)  # once
    with pytest.raises(RuntimeError, match="not built"):
        operator(learned, [activity_kernel.NONZERO])


@pytest.mark.parametrize(
    ("learned", "thresholds", "error", "match"),
    [
        (torch.ones(4, 1, 8), [], ValueError, "at least one activity mask"),
        (torch.ones(4, 1, 8, dtype=torch.float16), [0.0], TypeError, "float32 or float64, got torch.float16"),
        (torch.ones(4, 8), [0.0], ValueError, r"\[batch < 2\*\*31, component, d_sae\], got shape \[4, 8\]"),
        (torch.ones(8, 1, 4).transpose(0, 2), [0.0], ValueError, "contiguous, got strides"),
    ],
)
def test_operator_refuses_what_the_kernel_cannot_read(learned, thresholds, error, match):
    with pytest.raises(error, match=match):
        operator(learned, thresholds)


@needs_compiler
def test_each_part_zeroes_its_own_counters():
    """The kernel fills counters it is handed uninitialised: garbage in them must not reach the statistics."""
    assert activity_kernel.applies(torch.ones(1, 1, 1))
    kernel = activity_kernel._build_state.functions[torch.float32]
    learned = torch.tensor([[[0.0, 2.0, 0.0]], [[1.0, 0.0, 0.0]], [[0.0, 3.0, 0.0]], [[0.0, 0.0, 0.0]]])
    l0, l1 = torch.full((4, 1), 9.0), torch.full((4, 1), 9.0)
    counters = torch.full((2, 2, 1, 1, 3), 7, dtype=torch.int32)  # [counts, last] x 2 parts of 2 rows
    levels = (ctypes.c_double * 1)(activity_kernel.NONZERO)
    pointers = [counters[0].data_ptr(), counters[1].data_ptr()]
    kernel(learned.data_ptr(), 4, 1, 3, ctypes.addressof(levels), 1, 2, l0.data_ptr(), l1.data_ptr(), *pointers)
    assert l0.flatten().tolist() == [1.0, 1.0, 1.0, 0.0]
    assert l1.flatten().tolist() == [2.0, 1.0, 3.0, 0.0]
    assert counters[0, :, 0, 0].tolist() == [[1, 1, 0], [0, 1, 0]]  # per part: rows 1-2, rows 3-4
    assert counters[1, :, 0, 0].tolist() == [[2, 1, 0], [0, 3, 0]]  # the last row that fired, from 1; 0 for none


@needs_compiler
@pytest.mark.skipif(
    not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info(),
    reason="torch's own OpenMP runtime is found in /proc/self/maps, on Linux builds of torch that use it",
)
def test_the_parts_run_on_torchs_openmp_threads():
    """Built with OpenMP, into the runtime torch loaded: its threads, not a second pool competing for the cores."""
    assert activity_kernel.applies(torch.ones(1, 1, 1))
    assert activity_kernel._build_state.parallel
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if re.search(r"lib(g|i|)omp[^/]*\.so", line)}
    assert len(runtimes) == 1, runtimes


def test_a_cxx_that_cannot_be_parsed_warns_once_and_is_not_used(monkeypatch):
    monkeypatch.setattr(activity_kernel, "_build_state", activity_kernel._Build())
    monkeypatch.setenv("CXX", '"g++')
    with pytest.warns(RuntimeWarning, match="could not build its CPU activity kernel.*ValueError"):
        assert not activity_kernel.applies(torch.ones(4, 1, 8))


@pytest.fixture
def _no_runtime_type_checks():
    """The suite's run-time jaxtyping checks cannot be traced by dynamo (as in test_compile.py)."""
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)


@needs_compiler
@pytest.mark.usefixtures("_no_runtime_type_checks")
def test_compiled_collection_reads_the_activations_once_for_density_and_dead_features(generator, monkeypatch):
    """compiled=True on a CPU: the L0, L1, density and dead features come from the kernel, as eager computes them."""
    calls = []
    assert activity_kernel.applies(torch.ones(1, 1, 1))
    functions = activity_kernel._build_state.functions
    for dtype, function in dict(functions).items():
        monkeypatch.setitem(functions, dtype, lambda *args, _f=function: calls.append(args[1]) or _f(*args))
    # SaeBatch.activity calls it only if the compiled function left the activity out of the batch's memo
    monkeypatch.setattr(_batch, "_feature_activity", None)

    def collection(compiled):
        return sm.SparseAutoencoderLoss(
            2, 0.1, feature_density=True, dead_feature_window=200, num_features=24, firing_threshold=0.05,
            compiled=compiled,
        )  # fmt: skip

    eager, compiled = collection(False), collection(True)
    for batch in (130, 7):
        x = torch.randn(batch, 2, 6, generator=generator)
        f = torch.relu(torch.randn(batch, 2, 24, generator=generator) - 0.5).requires_grad_()
        x_hat = (x + 0.1 * torch.randn(batch, 2, 6, generator=generator)).requires_grad_()
        inputs = {"source_activations": x, "learned_activations": f, "decoded_activations": x_hat}
        monkeypatch.setattr(_batch, "_feature_activity", _feature_activity)
        expected = eager(**inputs)
        monkeypatch.setattr(_batch, "_feature_activity", None)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fall-back to eager
            actual = compiled(**inputs)
        torch.testing.assert_close(actual, expected)
        gradients = torch.autograd.grad(actual["loss"], [f, x_hat])
        torch.testing.assert_close(gradients, torch.autograd.grad(expected["loss"], [f, x_hat]))
    assert calls == [130, 7]  # one call per batch, with all its rows (split over threads in the kernel)
    monkeypatch.setattr(_batch, "_feature_activity", _feature_activity)
    torch.testing.assert_close(compiled.compute(), eager.compute())


@needs_compiler
def test_cxx_is_split_as_a_shell_splits_it(monkeypatch):
    """CXX may carry words of its own (a launcher, flags), as build tools read it."""
    compiler = os.environ.get("CXX") or next(
        shutil.which(name) for name in ("g++", "c++", "clang++") if shutil.which(name)
    )
    monkeypatch.setattr(activity_kernel, "_build_state", activity_kernel._Build())
    monkeypatch.setenv("CXX", f"{compiler} -Wall")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert activity_kernel.applies(torch.ones(4, 1, 8))
    l0, *_ = operator(torch.ones(4, 1, 8), [activity_kernel.NONZERO])
    assert l0.tolist() == [[8.0]] * 4
