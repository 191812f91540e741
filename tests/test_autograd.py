"""Autograd of the L1 term's custom function: gradients, double backward and torch.func transforms."""

import pytest
import torch

from sparse_metrics.functional import l1_absolute_loss, sparsity_loss


def _reference(learned):
    return learned.abs().sum(-1)


def _activations(generator, dtype=torch.float64):
    # No exact zeros: |f| is not differentiable there, and gradcheck's finite differences would disagree.
    values = torch.randn(4, 2, 6, generator=generator, dtype=torch.float64)
    return (values + values.sign() * 0.1).to(dtype)


def _ours(learned):
    return l1_absolute_loss(learned, keep_batch_dim=True)


def test_gradcheck_and_double_backward(generator):
    learned = _activations(generator).requires_grad_()
    assert torch.autograd.gradcheck(_ours, (learned,))
    assert torch.autograd.gradgradcheck(_ours, (learned,))


def test_gradient_at_zero_is_zero():
    learned = torch.tensor([[0.0, -2.0, 3.0]], requires_grad=True)
    sparsity_loss(learned, 0.5).backward()
    torch.testing.assert_close(learned.grad, torch.tensor([[0.0, -0.5, 0.5]]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradient_has_the_input_dtype(generator, dtype):
    learned = _activations(generator, dtype).requires_grad_()
    _ours(learned).sum().backward()
    assert learned.grad.dtype == dtype
    torch.testing.assert_close(learned.grad, learned.detach().sign())


def test_torch_func_transforms(generator):
    learned = _activations(generator)
    grad = torch.func.grad(lambda f: _ours(f).sum())
    torch.testing.assert_close(grad(learned), torch.func.grad(lambda f: _reference(f).sum())(learned))
    torch.testing.assert_close(torch.func.vmap(_ours)(learned), _reference(learned))
    torch.testing.assert_close(torch.func.vmap(grad)(learned), learned.sign())
