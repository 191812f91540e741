"""torch.compile: the functional core captures whole graphs, and the collection's opt-in compiled path."""

import functools
import shutil
import sys
import sysconfig
import warnings
from pathlib import Path

import jaxtyping
import pytest
import torch

import sparse_metrics as sm
import sparse_metrics.functional as smf
from sparse_metrics import _batch, _compile
from sparse_metrics.functional import _activity_kernel as activity_kernel
from sparse_metrics.functional._statistics import _sae_loss_statistics, _sae_training_statistics
from sparse_metrics.functional.auxiliary_k import RULES, auxiliary_k_terms
from sparse_metrics.functional.feature_density import _ACTIVITY_BLOCK, _COMPILED_ACTIVITY_BLOCK, _feature_activity
from tests import reference
from tests.processes import run_process_tree

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
    "sae_training_statistics": lambda i: _training_statistics(i, one_pass=False),
    "sae_training_statistics_one_pass": lambda i: _training_statistics(i, one_pass=True),
    "tanh_sparsity_loss": lambda i: smf.tanh_sparsity_loss(
        i["learned_activations"], decoder_weight=i["decoder_weight"]
    ),
    "pre_activation_loss": lambda i: smf.pre_activation_loss(
        i["pre_activations"], i["threshold"], decoder_weight=i["decoder_weight"], dead_mask=i["dead_mask"]
    ),
    "jumprelu_l0_loss": lambda i: smf.jumprelu_l0_loss(i["pre_activations"], i["threshold"], target_l0=3.0),
    # The terms the collection compiles (the functional twin builds a validating SaeBatch first, which is not).
    "auxiliary_k_terms_dictionary_learning": lambda i: _auxiliary_k_terms(i, "dictionary_learning", 3, bias=False),
    "auxiliary_k_terms_openai": lambda i: _auxiliary_k_terms(i, "openai", 4, bias=True),
}


def _auxiliary_k_terms(inputs, convention, k_aux, *, bias):
    """The per-item AuxK of one convention, as the collection's compiled path calls it."""
    names = ("source_activations", "decoded_activations", "pre_activations", "decoder_weight", "dead_mask")
    terms = auxiliary_k_terms(
        *(inputs[name] for name in names),
        inputs["decoder_bias"] if bias else None,
        rule=RULES[convention],
        k_aux=k_aux,
    )
    return terms.squared_error


def _training_statistics(inputs, *, one_pass):
    """Every statistic of the compiled training function, flattened, with or without the hand-written CPU pass."""
    names = ("source_activations", "learned_activations", "decoded_activations")
    statistics = _sae_training_statistics(*(inputs[name] for name in names), (None, 0.1), one_pass=one_pass)
    return torch.cat([value.reshape(-1).double() for value in _flatten(statistics)])


def _flatten(values):
    """The tensors of nested tuples, in order."""
    for value in values:
        if isinstance(value, tuple):
            yield from _flatten(value)
        else:
            yield value


@pytest.mark.parametrize("name", FUNCTIONS)
def test_functional_core_compiles_without_graph_breaks(generator, name):
    """fullgraph=True raises on any graph break; aot_eager also traces the backward, with no C++ compiler needed."""
    function = FUNCTIONS[name]
    inputs = _inputs(generator)
    if name.endswith("_one_pass") and not activity_kernel.applies(inputs["learned_activations"]):
        pytest.skip("the CPU activity kernel cannot be built here (no C++ compiler)")
    expected = function(inputs)
    torch._dynamo.reset()
    actual = torch.compile(function, fullgraph=True, backend="aot_eager")(inputs)
    torch.testing.assert_close(actual, expected)
    if name.endswith("_one_pass"):  # the hand-written pass gives what the traced reductions give
        torch.testing.assert_close(actual, FUNCTIONS[name.removesuffix("_one_pass")](inputs))
    if actual.requires_grad:
        (gradient,) = torch.autograd.grad(actual.sum(), inputs["learned_activations"], allow_unused=True)
        (expected_gradient,) = torch.autograd.grad(expected.sum(), inputs["learned_activations"], allow_unused=True)
        if expected_gradient is not None:
            torch.testing.assert_close(gradient, expected_gradient)


@pytest.mark.parametrize("batch", [40, 100, 128, 130])
def test_compiled_feature_activity_matches_a_direct_count(generator, batch):
    """The traced activity (blocks of items as an axis of their own on a CPU, then the rest) counts every firing and
    finds each feature's last one: a batch reduced at once, blocks and a rest, whole blocks only, blocks and a rest
    of two items."""
    # the cases above with the block sizes: 40 at once, 100 in 6 blocks and 4 more, 128 in blocks, 130 with 2 more
    assert 40 <= _ACTIVITY_BLOCK < 100
    assert [size % _COMPILED_ACTIVITY_BLOCK for size in (100, 128, 130)] == [4, 0, 2]
    active = torch.rand(batch, 2, 24, generator=generator) < 0.2
    active[:, :, 0] = False  # never fires
    active[:, :, 1] = False
    active[-1, :, 1] = True  # fires on the last item only (in the rest for 100 and 130)
    active[:, :, 2] = False
    active[0, :, 2] = True  # fires on the first item only
    active[:, :, 3] = True  # fires on every item
    items = torch.arange(batch).view(-1, 1, 1)
    expected_count = active.sum(dim=0)
    expected_since = batch - 1 - torch.where(active, items, -1).amax(dim=0)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda mask: tuple(_feature_activity(mask)[:2]), fullgraph=True, backend="aot_eager", dynamic=False
    )
    fire_count, items_since_fired = compiled(active)
    assert fire_count.dtype == items_since_fired.dtype == torch.int64
    assert torch.equal(fire_count, expected_count)
    assert torch.equal(items_since_fired, expected_since)
    assert torch.equal(items_since_fired[:, :4], torch.tensor([[batch, 0, batch - 1, 0]] * 2))


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
@pytest.mark.parametrize("convention", ["dictionary_learning", "sparsify"])
@pytest.mark.parametrize("decode", ["dense", "bag"])
def test_compiled_auxiliary_k_decodes_as_eager(generator, monkeypatch, convention, decode):
    """Both AuxK decodes (fraction 0: the dense product; 1: the embedding bag) compile to eager's values and grads."""
    monkeypatch.setattr(smf.auxiliary_k, "SPARSE_DECODE_FRACTION", 0.0 if decode == "dense" else 1.0)
    bags = []
    bag = smf.auxiliary_k.embedding_bag
    monkeypatch.setattr(smf.auxiliary_k, "embedding_bag", lambda *a, **kw: bags.append(1) or bag(*a, **kw))

    def collection(compiled):
        auxk = sm.AuxiliaryKLoss(2, k_aux=4, convention=convention, d_model=6)
        return sm.SparseAutoencoderLoss(2, sparsity_penalty=False, loss_terms={"auxk": auxk}, compiled=compiled)

    eager, compiled = collection(False), collection(True)
    torch._dynamo.reset()
    inputs = _inputs(generator)
    inputs["pre_activations"].requires_grad_()
    leaves = [inputs[name] for name in ("decoder_weight", "pre_activations", "decoded_activations")]
    expected = eager(**inputs)
    expected_gradients = torch.autograd.grad(expected["loss"], leaves, allow_unused=True, materialize_grads=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would pass the comparisons unseen
        actual = compiled(**inputs)
    gradients = torch.autograd.grad(actual["loss"], leaves, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(gradients, expected_gradients)
    assert smf.auxiliary_k._compiled_auxiliary_k_terms._compiled is not None  # AuxK ran compiled
    assert not smf.auxiliary_k._compiled_auxiliary_k_terms._failed
    assert bool(bags) == (decode == "bag")


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


def _training_collection(compiled: bool) -> sm.SparseAutoencoderLoss:
    """Every training metric and the TopK/JumpReLU terms, so that compiled=True covers each of their statistics."""
    return sm.SparseAutoencoderLoss(
        2,
        0.1,
        explained_variance=True,
        d_model=6,
        feature_density=True,
        dead_feature_window=4,
        num_features=24,
        firing_threshold=0.05,
        loss_terms={
            "tanh": sm.TanhSparsityLoss(2),
            "pre_activation": sm.PreActivationLoss(2),
            "jumprelu_l0": sm.JumpReLUL0Loss(2, target_l0=3.0),
            "auxk": sm.AuxiliaryKLoss(2, convention="dictionary_learning", d_model=6),
        },
        compiled=compiled,
    )


def compiled_training_check() -> None:
    """compiled=True vs eager on the training collection (run by the test below in a process of its own)."""
    generator = torch.Generator().manual_seed(0)
    eager, compiled = _training_collection(False), _training_collection(True)
    eager_activity = _batch._feature_activity

    def refuse(*args, **kwargs):
        raise AssertionError("the compiled path computed the activity eagerly")

    for batch in (8, 5, 130):  # 130: the blocked reduction of the activity over the items, and a rest of 2 items
        inputs = _inputs(generator, batch=batch)
        inputs["pre_activations"].requires_grad_()
        inputs["threshold"].requires_grad_()
        leaves = [inputs[name] for name in ("learned_activations", "decoder_weight", "pre_activations", "threshold")]
        expected = eager(**inputs)
        expected_gradients = torch.autograd.grad(expected["loss"], leaves)
        _batch._feature_activity = refuse
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would pass the comparisons unseen
                actual = compiled(**inputs)
        finally:
            _batch._feature_activity = eager_activity
        gradients = torch.autograd.grad(actual["loss"], leaves)
        torch.testing.assert_close(actual, expected)
        torch.testing.assert_close(gradients, expected_gradients)
    torch.testing.assert_close(compiled.compute(), eager.compute())
    for function in (
        _batch._compiled_sae_training_statistics,
        sm.metrics.tanh_sparsity._compiled_tanh_penalty,
        sm.metrics.pre_activation._compiled_pre_activation_penalty,
        sm.metrics.jumprelu_l0._compiled_jumprelu_l0,
        smf.auxiliary_k._compiled_auxiliary_k_terms,
    ):
        assert function._compiled is not None, function
        assert not function._failed, function


@pytest.mark.slow
@needs_cpu_compiler
def test_compiled_training_metrics_and_new_terms_match_eager():
    """compiled=True also computes the activity statistics (density, dead features) in the compiled function, and
    the tanh, pre-activation, JumpReLU L0 and AuxK terms compiled: the same values, gradients and compute() as eager,
    with no fallback and no eager pass for the activity.

    In a process of its own: the suite's run-time jaxtyping checks wrap every function of the package, and dynamo
    cannot trace those wrappers inside an ``autograd.Function`` (JumpReLU's straight-through step) that needs grad.
    """
    code = "from tests.test_compile import compiled_training_check; compiled_training_check()"
    done = run_process_tree([sys.executable, "-c", code], timeout=600, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]


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
