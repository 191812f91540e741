"""Each statistic is computed once per step: no member reads the activations again for what another computed."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import sparse_metrics as sm
from sparse_metrics.functional import _blocks
from tests import reference

BATCH, COMPONENTS, D_MODEL, D_SAE = 6, 2, 5, 40


class FullSizeOperations(TorchDispatchMode):
    """Record every non-view operation that takes or makes a tensor of ``numel`` elements.

    With ``numel`` the size of the ``[batch, component, d_sae]`` activations, this lists each pass over them.
    """

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel = numel
        self.operations: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not func.is_view:
            tensors = [t for t in tree_leaves((args, kwargs, result)) if isinstance(t, torch.Tensor)]
            if any(t.numel() == self.numel for t in tensors):
                self.operations[func.overloadpacket.__name__] += 1
        return result


#: The passes of each statistic over the activations on a CPU (see sparse_metrics.functional._blocks): the L0 writes
#: ``f != 0`` into one float buffer and sums it, the L1 sums ``|f|`` (elsewhere each is one fused ``vector_norm``).
L0_PASSES = Counter({"new_empty": 1, "ne": 1, "sum": 1})
L1_PASSES = Counter({"abs": 1, "sum": 1})


def _inputs(generator, requires_grad):
    """One step of the shared builder; ``decoded_activations`` is not ``f W + b`` (a skip connection, say)."""
    inputs = reference.sae_inputs(BATCH, components=COMPONENTS, d_model=D_MODEL, d_sae=D_SAE, generator=generator)
    inputs["decoded_activations"] = inputs["source_activations"] + torch.randn(
        BATCH, COMPONENTS, D_MODEL, generator=generator
    )
    inputs["learned_activations"].requires_grad_(requires_grad)
    return inputs


@pytest.mark.parametrize("matryoshka", [False, True])
@pytest.mark.parametrize("step", ["forward", "update"])
def test_two_passes_over_the_activations_per_step(generator, matryoshka, step):
    """One pass for L0 and one for L1, which also feeds the sparsity penalty; Matryoshka reads only prefix blocks."""
    prefix_sizes = [10, 20, D_SAE] if matryoshka else None
    loss_fn = sm.SparseAutoencoderLoss(COMPONENTS, 0.1, matryoshka_prefix_sizes=prefix_sizes)
    inputs = _inputs(generator, requires_grad=step == "forward")
    with FullSizeOperations(BATCH * COMPONENTS * D_SAE) as recorded:
        getattr(loss_fn, step)(**inputs)
    assert recorded.operations == L0_PASSES + L1_PASSES


@pytest.mark.parametrize("log_l1", [False, True])
def test_without_a_sparsity_penalty_only_the_logged_statistics_read_the_activations(generator, log_l1):
    """``sparsity_penalty=False`` (TopK, JumpReLU): the L1 pass runs only for a logged ``"l1"``; no backward pass."""
    loss_fn = sm.SparseAutoencoderLoss(COMPONENTS, sparsity_penalty=False)
    if not log_l1:
        del loss_fn["l1"]
    inputs = _inputs(generator, requires_grad=True)
    with FullSizeOperations(BATCH * COMPONENTS * D_SAE) as recorded:
        loss = loss_fn(**inputs)["loss"]
    assert recorded.operations == (L0_PASSES + L1_PASSES if log_l1 else L0_PASSES)
    assert not loss.requires_grad  # the decoded activations here are no function of f: nothing reads f for the loss


def test_backward_makes_one_full_size_gradient(generator, monkeypatch):
    """The gradient of the L1 term is written into one new tensor (sign, then an in-place product).

    As for a large input: a small one (up to ``_blocks.SMALL`` elements) takes autograd's own ``abs`` and ``sum``.
    """
    monkeypatch.setattr(_blocks, "SMALL", 0)
    loss_fn = sm.SparseAutoencoderLoss(COMPONENTS, 0.1)
    inputs = _inputs(generator, requires_grad=True)
    loss = loss_fn(**inputs)["loss"]
    with FullSizeOperations(BATCH * COMPONENTS * D_SAE) as recorded:
        loss.backward()
    assert recorded.operations == Counter({"sign": 1, "mul_": 1})


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("step", ["forward", "update"])
def test_whole_dictionary_error_is_shared_by_l2_and_matryoshka_on_request(generator, step, reuse):
    """By default every prefix is decoded (P + 1 errors with L2's); with the opt-in the last prefix reuses L2's (P)."""
    prefix_sizes = [10, 20, D_SAE]
    loss_fn = sm.SparseAutoencoderLoss(
        COMPONENTS, 0.1, matryoshka_prefix_sizes=prefix_sizes, matryoshka_reuse_decoded_activations=reuse
    )
    inputs = _inputs(generator, requires_grad=step == "forward")
    with FullSizeOperations(BATCH * COMPONENTS * D_MODEL) as recorded:
        getattr(loss_fn, step)(**inputs)
    assert recorded.operations["sub"] == len(prefix_sizes) + (0 if reuse else 1)


def test_the_default_decodes_the_whole_dictionary_prefix(generator):
    """decoded_activations that are not f W + b (a skip connection, say) do not leak into the Matryoshka loss."""
    prefix_sizes = [10, 20, D_SAE]
    inputs = _inputs(generator, requires_grad=False)  # decoded_activations is unrelated to f W + b here
    loss_fn = sm.SparseAutoencoderLoss(COMPONENTS, 0.1, matryoshka_prefix_sizes=prefix_sizes)
    loss_fn.update(**inputs)
    expected = sm.functional.matryoshka_prefix_errors(
        inputs["source_activations"],
        inputs["learned_activations"],
        inputs["decoder_weight"],
        inputs["decoder_bias"],
        prefix_sizes=prefix_sizes,
    ).mean(0)
    torch.testing.assert_close(loss_fn["matryoshka"].compute_prefix_losses(), expected.double())


def test_whole_dictionary_prefix_equals_the_standalone_metric(generator):
    """With decoded_activations = f W + b (what an SAE outputs), sharing the error changes no value."""
    prefix_sizes = [10, 20, D_SAE]
    inputs = _inputs(generator, requires_grad=False)
    inputs["decoded_activations"] = (
        torch.einsum("bcf,cfd->bcd", inputs["learned_activations"], inputs["decoder_weight"]) + inputs["decoder_bias"]
    )
    loss_fn = sm.SparseAutoencoderLoss(
        COMPONENTS, 0.1, matryoshka_prefix_sizes=prefix_sizes, matryoshka_reuse_decoded_activations=True
    )
    standalone = sm.MatryoshkaReconstructionLoss(prefix_sizes, COMPONENTS)
    loss_fn.update(**inputs)
    standalone.update(**inputs)
    # The same value up to float32 rounding: the einsum above and the metric's incremental decode sum differently.
    torch.testing.assert_close(loss_fn.compute()["matryoshka"], standalone.compute(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        loss_fn["matryoshka"].compute_prefix_losses(), standalone.compute_prefix_losses(), rtol=1e-6, atol=1e-6
    )
