"""Autograd of the custom functions (L1, decoder row norms, weighted penalty): gradients, double backward, func."""

import pytest
import torch

from sparse_metrics.functional import _blocks, fraction_of_variance_unexplained, l1_absolute_loss, sparsity_loss


def _reference(learned):
    return learned.abs().sum(-1)


def _activations(generator, dtype=torch.float64):
    # No exact zeros: |f| is not differentiable there, and gradcheck's finite differences would disagree.
    values = torch.randn(4, 2, 6, generator=generator, dtype=torch.float64)
    return (values + values.sign() * 0.1).to(dtype)


def _ours(learned):
    return l1_absolute_loss(learned, keep_batch_dim=True)


@pytest.fixture(params=["autograd", "function"])
def l1_route(request, monkeypatch):
    """The L1 of a small input (autograd's abs and sum), then of a large one (the custom Function), on test inputs."""
    if request.param == "function":
        monkeypatch.setattr(_blocks, "SMALL", 0)
    return request.param


def test_the_routes_are_the_ones_named(generator, l1_route):
    learned = _activations(generator).requires_grad_()
    node = _ours(learned).grad_fn.name()
    assert ("AbsoluteSum" in node) == (l1_route == "function"), node


@pytest.mark.usefixtures("l1_route")
def test_gradcheck_and_double_backward(generator):
    learned = _activations(generator).requires_grad_()
    assert torch.autograd.gradcheck(_ours, (learned,))
    assert torch.autograd.gradgradcheck(_ours, (learned,))


def test_gradient_at_zero_is_zero():
    learned = torch.tensor([[0.0, -2.0, 3.0]], requires_grad=True)
    sparsity_loss(learned, 0.5).backward()
    torch.testing.assert_close(learned.grad, torch.tensor([[0.0, -0.5, 0.5]]))


@pytest.mark.usefixtures("l1_route")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradient_has_the_input_dtype(generator, dtype):
    learned = _activations(generator, dtype).requires_grad_()
    _ours(learned).sum().backward()
    assert learned.grad.dtype == dtype
    torch.testing.assert_close(learned.grad, learned.detach().sign())


@pytest.mark.usefixtures("l1_route")
def test_torch_func_transforms(generator):
    learned = _activations(generator)
    grad = torch.func.grad(lambda f: _ours(f).sum())
    torch.testing.assert_close(grad(learned), torch.func.grad(lambda f: _reference(f).sum())(learned))
    torch.testing.assert_close(torch.func.vmap(_ours)(learned), _reference(learned))
    torch.testing.assert_close(torch.func.vmap(grad)(learned), learned.sign())


# The decoder-weighted penalty: its row norms and its weighted sum are custom functions too.


def _weighted(learned, weight):
    return sparsity_loss(learned, 0.5, decoder_weight=weight, keep_batch_dim=True)


def _weighted_reference(learned, weight):
    return 0.5 * torch.einsum("bcf,cf->bc", learned.abs(), torch.linalg.vector_norm(weight, dim=-1))


def _decoder(generator, dtype=torch.float64):
    return torch.randn(2, 6, 3, generator=generator, dtype=torch.float64).to(dtype)


def test_weighted_penalty_gradcheck_and_double_backward(generator):
    learned = _activations(generator).requires_grad_()
    weight = _decoder(generator).requires_grad_()
    assert torch.autograd.gradcheck(_weighted, (learned, weight))
    assert torch.autograd.gradgradcheck(_weighted, (learned, weight))


def test_weighted_penalty_gradients_match_autograd(generator):
    learned = _activations(generator)
    weight = _decoder(generator)
    ours = torch.func.grad(lambda f, w: _weighted(f, w).sum(), argnums=(0, 1))(learned, weight)
    expected = torch.func.grad(lambda f, w: _weighted_reference(f, w).sum(), argnums=(0, 1))(learned, weight)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(
        torch.func.vmap(_weighted)(learned[None], weight[None]), _weighted_reference(learned, weight)[None]
    )


def test_a_zero_decoder_row_has_zero_gradient(generator):
    """autograd's vector_norm backward gives 0 at a zero norm (not NaN): the row-norm function does too."""
    learned = _activations(generator)
    weight = _decoder(generator)
    weight[1, 2] = 0.0
    weight.requires_grad_()
    _weighted(learned, weight).sum().backward()
    assert torch.isfinite(weight.grad).all()
    assert torch.equal(weight.grad[1, 2], torch.zeros(3, dtype=weight.dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weighted_penalty_half_gradients_have_the_input_dtypes(generator, dtype):
    learned = _activations(generator, dtype).requires_grad_()
    weight = _decoder(generator, dtype).requires_grad_()
    _weighted(learned, weight).sum().backward()
    assert learned.grad.dtype == dtype
    assert weight.grad.dtype == dtype
    expected = torch.func.grad(lambda f, w: _weighted_reference(f, w).sum(), argnums=(0, 1))(
        learned.detach().double(), weight.detach().double()
    )
    torch.testing.assert_close(learned.grad.double(), expected[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(weight.grad.double(), expected[1], rtol=1e-2, atol=1e-2)


def test_weighted_penalty_under_forward_mode_and_jacobians(generator):
    """No jvp of its own: forward-mode AD and the torch.func jacobians run autograd's operations, same values."""
    learned = _activations(generator)
    weight = _decoder(generator)
    tangents = (torch.randn_like(learned), torch.randn_like(weight))
    ours = torch.func.jvp(_weighted, (learned, weight), tangents)
    expected = torch.func.jvp(_weighted_reference, (learned, weight), tangents)
    torch.testing.assert_close(ours, expected)
    for jacobian in (torch.func.jacrev, torch.func.jacfwd):
        torch.testing.assert_close(
            jacobian(_weighted, argnums=(0, 1))(learned, weight),
            jacobian(_weighted_reference, argnums=(0, 1))(learned, weight),
        )
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(weight, tangents[1])
        tangent = torch.autograd.forward_ad.unpack_dual(_weighted(learned, dual)).tangent
    _, expected_tangent = torch.func.jvp(lambda w: _weighted_reference(learned, w), (weight,), (tangents[1],))
    torch.testing.assert_close(tangent, expected_tangent)


def test_fvu_second_derivative_at_an_item_equal_to_the_mean():
    """With a gradient the variance is the sum of squares (a norm is not differentiable twice at zero)."""
    source = torch.tensor(
        [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], dtype=torch.float64, requires_grad=True
    )  # item 1 = mean
    decoded = torch.tensor([[0.5, 1.0], [2.0, 2.5], [4.5, 5.0]], dtype=torch.float64)

    def reference(x):
        return ((decoded - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()

    def second(fvu):
        (grad,) = torch.autograd.grad(fvu(source), source, create_graph=True)
        return torch.autograd.grad(grad.pow(2).sum(), source)[0]

    ours = second(lambda x: fraction_of_variance_unexplained(decoded, x))
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, second(reference))
