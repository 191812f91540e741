"""torch.compile: the functional core captures whole graphs, and the collection's opt-in compiled path."""

import functools
import shutil
import sysconfig
import warnings

import jaxtyping
import pytest
import torch

import sparse_metrics as sm
import sparse_metrics.functional as smf
from sparse_metrics import _batch, _compile
from sparse_metrics.functional._statistics import _sae_loss_statistics
from tests import reference

# Inductor's CPU backend compiles C++ against the Python headers; without them the compiled path falls back to eager
# (tested below with a simulated failure), so the tests that need real kernels are skipped.
HAS_CPU_COMPILER = shutil.which("c++") is not None and sysconfig.get_paths().get("include") is not None
needs_cpu_compiler = pytest.mark.skipif(not HAS_CPU_COMPILER, reason="no C++ compiler for torch.compile's CPU backend")


def _inputs(generator, batch=8, components=2, d_model=6, d_sae=24):
    """One float64 step of the shared builder, differentiable in everything but the source and the bias."""
    inputs = reference.sae_inputs(
        batch, components=components, d_model=d_model, d_sae=d_sae, generator=generator, dtype=torch.float64
    )
    for name in ("decoded_activations", "learned_activations", "decoder_weight"):
        inputs[name].requires_grad_()
    return inputs


@pytest.fixture(autouse=True)
def _no_runtime_type_checks():
    """The suite checks jaxtyping annotations at run time with beartype (see pyproject), whose checking code dynamo
    cannot trace. Users' code carries no such checks; the eager calls below have been checked in the other tests."""
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)


FUNCTIONS = {
    "l2_reconstruction_loss": lambda i: smf.l2_reconstruction_loss(
        i["decoded_activations"], i["source_activations"], feature_reduction="sum"
    ),
    "l1_absolute_loss": lambda i: smf.l1_absolute_loss(i["learned_activations"]),
    "l0_norm": lambda i: smf.l0_norm(i["learned_activations"], keep_batch_dim=True),
    "sparsity_loss": lambda i: smf.sparsity_loss(i["learned_activations"], torch.tensor([0.1, 0.2])),
    "matryoshka_reconstruction_loss": lambda i: smf.matryoshka_reconstruction_loss(
        i["source_activations"],
        i["learned_activations"],
        i["decoder_weight"],
        i["decoder_bias"],
        prefix_sizes=[6, 12, 24],
    ),
    "sae_loss_statistics": lambda i: torch.stack(
        _sae_loss_statistics(i["source_activations"], i["learned_activations"], i["decoded_activations"])
    ),
}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_functional_core_compiles_without_graph_breaks(generator, name):
    """fullgraph=True raises on any graph break; aot_eager also traces the backward, with no C++ compiler needed."""
    function = FUNCTIONS[name]
    inputs = _inputs(generator)
    expected = function(inputs)
    torch._dynamo.reset()
    actual = torch.compile(function, fullgraph=True, backend="aot_eager")(inputs)
    torch.testing.assert_close(actual, expected)
    if actual.requires_grad:
        (gradient,) = torch.autograd.grad(actual.sum(), inputs["learned_activations"], allow_unused=True)
        (expected_gradient,) = torch.autograd.grad(expected.sum(), inputs["learned_activations"], allow_unused=True)
        if expected_gradient is not None:
            torch.testing.assert_close(gradient, expected_gradient)


def _collection_step(loss_fn, inputs):
    out = loss_fn(**inputs)
    # With Matryoshka configured, the reconstruction term is decoded from the decoder, not decoded_activations.
    gradients = torch.autograd.grad(out["loss"], [inputs["learned_activations"], inputs["decoder_weight"]])
    return out, gradients


@needs_cpu_compiler
def test_compiled_collection_matches_eager(generator):
    eager = sm.SparseAutoencoderLoss(2, 0.1, matryoshka_prefix_sizes=[8, 24])
    compiled = sm.SparseAutoencoderLoss(2, 0.1, matryoshka_prefix_sizes=[8, 24], compiled=True)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would pass the comparisons unseen
        for batch in (8, 5):  # a smaller last batch: a second shape
            inputs = _inputs(generator, batch=batch)
            expected, expected_gradients = _collection_step(eager, inputs)
            actual, gradients = _collection_step(compiled, inputs)
            torch.testing.assert_close(actual, expected)
            torch.testing.assert_close(gradients, expected_gradients)
            compiled.update(**inputs)
            eager.update(**inputs)
    assert not _batch._compiled_sae_loss_statistics._failed
    torch.testing.assert_close(compiled.compute(), eager.compute())


@needs_cpu_compiler
def test_compiled_training_step_matches_eager(generator):
    """A training step (SAE forward, the collection's forward) under torch.compile gives eager's loss and grads."""
    sae = torch.nn.Linear(6, 24, dtype=torch.float64)
    decoder = torch.nn.Linear(24, 6, dtype=torch.float64)

    def step(loss_fn, x):
        f = torch.relu(sae(x))
        return loss_fn(source_activations=x, learned_activations=f, decoded_activations=decoder(f))["loss"]

    x = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    parameters = [*sae.parameters(), *decoder.parameters()]
    eager_fn, compiled_fn = (
        sm.SparseAutoencoderLoss(sparsity_coefficient=0.1),
        sm.SparseAutoencoderLoss(sparsity_coefficient=0.1),
    )
    expected = step(eager_fn, x)
    expected_gradients = torch.autograd.grad(expected, parameters)
    torch._dynamo.reset()
    actual = torch.compile(functools.partial(step, compiled_fn))(x)
    gradients = torch.autograd.grad(actual, parameters)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(gradients, expected_gradients)
    torch.testing.assert_close(compiled_fn.compute(), eager_fn.compute())


class SimulatedCompilerFailure(torch._dynamo.exc.TorchDynamoException):
    """What the compiler stack raises, e.g. BackendCompilerFailed when inductor finds no C++ compiler."""


def test_compile_failure_falls_back_to_eager_with_one_warning(generator, monkeypatch):
    def failing_compile(function, **kwargs):
        def compiled(*args):
            raise SimulatedCompilerFailure("simulated: no C++ compiler\nlong compiler output")

        return compiled

    monkeypatch.setattr(_compile.torch, "compile", failing_compile)
    monkeypatch.setattr(_batch, "_compiled_sae_loss_statistics", _compile.CompiledWithFallback(_sae_loss_statistics))
    eager = sm.SparseAutoencoderLoss(2, 0.1)
    compiled = sm.SparseAutoencoderLoss(2, 0.1, compiled=True)
    inputs = _inputs(generator)
    with pytest.warns(
        RuntimeWarning, match=r"could not compile _sae_loss_statistics \(SimulatedCompilerFailure: simulated: no C"
    ):
        actual = compiled(**inputs)
    torch.testing.assert_close(actual, eager(**inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled.update(**inputs)  # eager from now on, silently


def test_compiled_path_still_validates(generator):
    """Validation runs before the compiled call, so bad input is an error, not a fallback."""
    compiled = sm.SparseAutoencoderLoss(2, 0.1, compiled=True)
    inputs = _inputs(generator)
    inputs["decoded_activations"] = inputs["decoded_activations"][:, :, :-1]
    with pytest.raises(ValueError, match="`decoded_activations` must have the shape of `source_activations`"):
        compiled(**inputs)


def test_errors_other_than_compiling_are_not_swallowed(generator, monkeypatch):
    """An out-of-memory error in the compiled call is the caller's, not a reason to give up compiling."""

    def failing_compile(function, **kwargs):
        def compiled(*args):
            raise torch.OutOfMemoryError("simulated")

        return compiled

    monkeypatch.setattr(_compile.torch, "compile", failing_compile)
    fresh = _compile.CompiledWithFallback(_sae_loss_statistics)
    monkeypatch.setattr(_batch, "_compiled_sae_loss_statistics", fresh)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        sm.SparseAutoencoderLoss(2, 0.1, compiled=True)(**_inputs(generator))
    assert not fresh._failed
