"""The CPU passes in blocks of items (L0, L1, the weighted penalty) give the whole batch's values and gradients."""

import pytest
import torch

from sparse_metrics.functional import _blocks, l0_norm, l1_absolute_loss, sparsity_loss


def _activations(generator, shape):
    values = torch.randn(*shape, generator=generator, dtype=torch.float64)
    values[torch.rand(*shape, generator=generator) < 0.6] = 0.0
    values.view(-1, shape[-1])[3, 1] = float("nan")  # NaN counts as active and propagates, in its block
    return values


TERMS = {
    "l0": lambda f, w: l0_norm(f, keep_batch_dim=True),
    "l1": lambda f, w: l1_absolute_loss(f, keep_batch_dim=True),
    "weighted": lambda f, w: sparsity_loss(f, 0.5, decoder_weight=w, keep_batch_dim=True),
}


@pytest.mark.parametrize("term", TERMS)
@pytest.mark.parametrize("shape", [(37, 6), (37, 2, 6)])
def test_blocks_give_the_whole_batch(generator, monkeypatch, term, shape):
    learned = _activations(generator, shape)
    weight = torch.randn(*shape[1:], 3, generator=generator, dtype=torch.float64)

    def value_and_grads():
        f, w = learned.clone().requires_grad_(), weight.clone().requires_grad_()
        value = TERMS[term](f, w)
        if not value.requires_grad:  # a count
            return (value,)
        value.backward(torch.arange(value.numel(), dtype=value.dtype).view_as(value))
        return value.detach(), f.grad, w.grad

    whole = value_and_grads()  # small: its temporaries simply allocated
    per_item = 2 * 6 if len(shape) == 3 else 6
    monkeypatch.setattr(_blocks, "SMALL", 0)
    monkeypatch.setattr(_blocks, "ITEM_BLOCK", per_item * 5)  # blocks of 5 items, the last of 2
    assert _blocks.block_rows(learned) == 5
    blocked = value_and_grads()
    torch.testing.assert_close(blocked, whole, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_the_scratch_buffer_is_reused_and_survives_inference_mode(generator, monkeypatch):
    monkeypatch.setattr(_blocks, "SMALL", 0)
    monkeypatch.setattr(_blocks, "ITEM_BLOCK", 12 * 4)
    monkeypatch.setattr(_blocks, "_thread", type(_blocks._thread)())  # this test's own buffers
    learned = _activations(generator, (9, 2, 6))
    expected = learned.abs().sum(-1)
    with torch.inference_mode():  # the buffer is made here first ...
        torch.testing.assert_close(l1_absolute_loss(learned, keep_batch_dim=True), expected, equal_nan=True)
    buffer = _blocks._thread.buffers[(torch.float64, learned.device)]
    assert not buffer.is_inference()
    f = learned.clone().requires_grad_()
    torch.testing.assert_close(l1_absolute_loss(f, keep_batch_dim=True), expected, equal_nan=True)  # ... written here
    assert _blocks._thread.buffers[(torch.float64, learned.device)] is buffer  # the same buffer, not a new one
    assert buffer.numel() == 4 * 12


def test_block_rows_bounds():
    def rows(*shape):
        return _blocks.block_rows(torch.empty(*shape, device="meta"))  # from the shape alone

    assert rows(0, 4) == 1
    assert rows(3, 4) == 3
    assert rows(3 * _blocks.ITEM_BLOCK, 1) == _blocks.ITEM_BLOCK
    assert rows(2, 2 * _blocks.ITEM_BLOCK) == 1  # one item larger than a block


def test_double_backward_through_the_blocks(generator, monkeypatch):
    """A backward that autograd records (create_graph) reads no reused buffer: the next block would overwrite it."""
    monkeypatch.setattr(_blocks, "SMALL", 0)
    monkeypatch.setattr(_blocks, "ITEM_BLOCK", 2 * 6 * 2)
    learned = torch.randn(5, 2, 6, generator=generator, dtype=torch.float64)
    learned = (learned + learned.sign() * 0.1).requires_grad_()
    weight = torch.randn(2, 6, 3, generator=generator, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(TERMS["weighted"], (learned, weight))
    assert torch.autograd.gradgradcheck(TERMS["l1"], (learned, weight))
    # Only the decoder differentiated twice: the norms' gradient Σ_b |f| grad is what autograd records.
    (grad,) = torch.autograd.grad(TERMS["weighted"](learned.detach(), weight).pow(2).sum(), weight, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), weight)
    reference = torch.func.grad(
        lambda w: torch.func.grad(lambda v: (0.5 * _reference_weighted(learned.detach(), v)).pow(2).sum())(w).sum()
    )(weight.detach())
    torch.testing.assert_close(second, reference)


def _reference_weighted(learned, weight):
    return torch.einsum("bcf,cf->bc", learned.abs(), torch.linalg.vector_norm(weight, dim=-1))


def test_fake_tensors_do_not_reach_the_buffer(generator, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

    monkeypatch.setattr(_blocks, "SMALL", 0)
    monkeypatch.setattr(_blocks, "_thread", type(_blocks._thread)())
    learned = _activations(generator, (9, 2, 6))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(learned)
        assert l1_absolute_loss(fake, keep_batch_dim=True).shape == (9, 2)
        assert l0_norm(fake, keep_batch_dim=True).shape == (9, 2)
    assert not _blocks._thread.__dict__.get("buffers")
    torch.testing.assert_close(l1_absolute_loss(learned, keep_batch_dim=True), learned.abs().sum(-1), equal_nan=True)


def test_torch_func_transforms_take_the_fused_kernels(generator, monkeypatch):
    """vmap cannot batch an ``out=`` operation: inside a transform the L0 is counted by the fused 0-"norm"."""
    monkeypatch.setattr(_blocks, "SMALL", 0)
    monkeypatch.setattr(_blocks, "ITEM_BLOCK", 6)  # every item its own block, were the blocks used
    learned = _activations(generator, (2, 37, 6))
    expected = torch.stack([l0_norm(item) for item in learned])
    torch.testing.assert_close(torch.func.vmap(l0_norm)(learned), expected, equal_nan=True)
    torch.testing.assert_close(
        torch.func.vmap(l1_absolute_loss)(learned),
        torch.stack([l1_absolute_loss(item) for item in learned]),
        equal_nan=True,
    )


def test_blocks_on_cpu_only_eagerly():
    assert _blocks.blocks_on_cpu(torch.zeros(2, 2))
    assert not _blocks.blocks_on_cpu(torch.zeros(2, 2, device="meta"))
    seen = []

    def record(values):
        seen.append(_blocks.blocks_on_cpu(values))
        return values

    torch.func.vmap(record)(torch.zeros(3, 2))
    assert seen == [False]
