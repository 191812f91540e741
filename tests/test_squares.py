"""Sums of squares over the last axis: the CPU dot product gives autograd's values and gradients, elsewhere none."""

import pytest
import torch

import sparse_metrics as sm
from sparse_metrics.functional import _blocks, _squares
from sparse_metrics.functional._squares import squared_norms
from tests.operations import Operations


@pytest.fixture
def dot(monkeypatch):
    """Every input takes the dot product, however small and narrow (the suite's inputs are below both thresholds)."""
    monkeypatch.setattr(_blocks, "SMALL", 0)
    monkeypatch.setattr(_squares, "DOT_MIN_WIDTH", 0)


def _reference(values, keepdim=False, mean=False):
    """Autograd's square and sum (or mean): what the dot product must reproduce."""
    squares = values.square()
    return squares.mean(dim=-1, keepdim=keepdim) if mean else squares.sum(dim=-1, keepdim=keepdim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("shape", [(37, 6), (37, 3, 6)])
def test_the_dot_gives_the_square_and_sum(generator, dot, dtype, keepdim, mean, shape):
    values = torch.randn(*shape, generator=generator, dtype=dtype)
    grad_shape = (*shape[:-1], 1) if keepdim else shape[:-1]
    grad = torch.randn(*grad_shape, generator=generator, dtype=dtype)

    ours = values.clone().requires_grad_()
    with Operations() as recorded:
        value = squared_norms(ours, keepdim, mean)
        value.backward(grad)
    assert "bmm" in recorded.names, recorded.names
    assert "pow" not in recorded.names, recorded.names

    theirs = values.clone().requires_grad_()
    expected = _reference(theirs, keepdim, mean)
    expected.backward(grad)
    assert value.shape == expected.shape
    tolerance = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(value, expected, rtol=tolerance, atol=0)
    assert torch.equal(ours.grad, theirs.grad)  # values * 2 grad, bitwise: doubling is exact


def test_integer_sums_stay_exact(generator, dot):
    values = torch.randint(-50, 50, (64, 2, 33), generator=generator).float()
    with Operations() as recorded:  # no gradient to keep: the product itself, with no autograd Function
        value = squared_norms(values)
    assert recorded.names == ["view", "transpose", "bmm", "view"]
    assert torch.equal(value, _reference(values))
    # The prior-art package's documented example, through the collection's squared error.
    source = torch.tensor([[4.0, 2.0], [2.0, 0.0]])
    decoded = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    assert sm.functional.l2_reconstruction_loss(decoded, source).item() == 3.0


def test_second_derivatives(generator, dot):
    values = torch.randn(9, 2, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(squared_norms, (values,))
    assert torch.autograd.gradgradcheck(squared_norms, (values,))


def _half_precision(values):
    return squared_norms(values.half())


def _non_contiguous(values):
    return squared_norms(values.transpose(0, 1))


def _cpu_autocast(values):
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bmm here would run in bfloat16
        return squared_norms(values)


def _forward_mode(values):
    return torch.func.jvp(squared_norms, (values,), (torch.ones_like(values),))[0]


def _vmapped(values):
    return torch.vmap(squared_norms)(values)


FALLBACKS = {
    "half precision": (_half_precision, lambda v: _reference(v.half())),
    "non-contiguous": (_non_contiguous, lambda v: _reference(v.transpose(0, 1))),
    "cpu autocast": (_cpu_autocast, _reference),
    "forward-mode AD": (_forward_mode, _reference),
    "vmap": (_vmapped, _reference),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_elsewhere_the_square_and_sum(generator, dot, case):
    values = torch.randn(8, 3, 5, generator=generator)
    run, expected = FALLBACKS[case]
    with Operations() as recorded:
        value = run(values)
    assert "bmm" not in recorded.names, recorded.names
    torch.testing.assert_close(value, expected(values), rtol=0, atol=0)


def test_small_inputs_take_the_square_and_sum(generator):
    values = torch.randn(8, 5, generator=generator)
    assert values.numel() <= _blocks.SMALL
    with Operations() as recorded:
        squared_norms(values)
    assert "bmm" not in recorded.names


def test_narrow_rows_take_the_square_and_sum(generator, monkeypatch):
    monkeypatch.setattr(_blocks, "SMALL", 0)
    values = torch.randn(8, _squares.DOT_MIN_WIDTH - 1, generator=generator)
    with Operations() as recorded:
        squared_norms(values)
    assert "bmm" not in recorded.names
    wide = torch.randn(8, _squares.DOT_MIN_WIDTH, generator=generator)
    with Operations() as recorded:
        squared_norms(wide)
    assert "bmm" in recorded.names


def test_inexact_sums_are_squared_norms_unless_a_gradient_is_kept(generator, dot):
    values = torch.randn(9, 2, 5, generator=generator, dtype=torch.float64)
    with Operations() as recorded:
        value = squared_norms(values, exact=False)
    assert recorded.names == ["linalg_vector_norm", "pow"]
    torch.testing.assert_close(value, _reference(values), rtol=1e-14, atol=0)
    tracked = values.clone().requires_grad_()
    with Operations() as recorded:
        squared_norms(tracked, exact=False)
    assert "bmm" in recorded.names  # twice differentiable where the norm is not (at 0)
    assert torch.autograd.gradgradcheck(lambda v: squared_norms(v, exact=False), (tracked,))


def test_the_metrics_read_through_the_dot(generator, dot):
    """The L2 loss and the FVU through the dot give the values and gradients of the square and sum."""
    source = torch.randn(16, 2, 6, generator=generator)
    decoded = source + 0.3 * torch.randn(16, 2, 6, generator=generator)

    def values_and_grads():
        x_hat = decoded.clone().requires_grad_()
        metrics = [sm.L2ReconstructionLoss(2), sm.FractionOfVarianceUnexplained(2, d_model=6)]
        values = [metric(x_hat, source) for metric in metrics]
        torch.stack(values).sum().backward()
        return [*values, x_hat.grad, *(metric.compute() for metric in metrics)]

    through_dot = values_and_grads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_blocks, "SMALL", 1 << 16)
        with Operations() as recorded:
            plain = values_and_grads()
        assert "bmm" not in recorded.names
    torch.testing.assert_close(through_dot, plain, rtol=1e-6, atol=1e-7)
