"""The functional core against the hand-written float64 reference."""

import jaxtyping
import pytest
import torch

from sparse_metrics.functional import (
    l0_norm,
    l1_absolute_loss,
    l2_reconstruction_loss,
    matryoshka_prefix_errors,
    matryoshka_prefix_reconstructions,
    matryoshka_reconstruction_loss,
    sparsity_loss,
)
from tests import reference

SHAPES = [(7, None, 5), (7, 1, 5), (6, 3, 4), (1, 2, 9)]  # (batch, component or None, feature)


def _shape(batch: int, components: int | None, features: int) -> tuple[int, ...]:
    return (batch, features) if components is None else (batch, components, features)


def _as_3d(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.ndim == 3 else tensor.unsqueeze(1)


def _expected(per_item: torch.Tensor, has_component: bool, keep_batch_dim: bool) -> torch.Tensor:
    values = per_item if keep_batch_dim else per_item.mean(0)
    return values if has_component else values.squeeze(-1)


@pytest.mark.parametrize(("batch", "components", "features"), SHAPES)
@pytest.mark.parametrize("feature_reduction", ["mean", "sum"])
@pytest.mark.parametrize("keep_batch_dim", [False, True])
def test_l2_matches_reference(generator, batch, components, features, feature_reduction, keep_batch_dim):
    source = torch.randn(_shape(batch, components, features), generator=generator)
    decoded = torch.randn(_shape(batch, components, features), generator=generator)
    result = l2_reconstruction_loss(decoded, source, feature_reduction=feature_reduction, keep_batch_dim=keep_batch_dim)
    per_item = reference.per_item_l2(_as_3d(decoded), _as_3d(source), feature_reduction)
    expected = _expected(per_item, components is not None, keep_batch_dim)
    assert result.shape == expected.shape
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("batch", "components", "features"), SHAPES)
@pytest.mark.parametrize("keep_batch_dim", [False, True])
def test_l0_l1_sparsity_match_reference(generator, batch, components, features, keep_batch_dim):
    learned = reference.sparse_activations(*_shape(batch, components, features), generator=generator)
    learned = learned * torch.where(torch.rand(learned.shape, generator=generator) < 0.5, -1.0, 1.0)
    has_component = components is not None
    l1 = reference.per_item_l1(_as_3d(learned))
    cases = [
        (l0_norm(learned, keep_batch_dim=keep_batch_dim), reference.per_item_l0(_as_3d(learned))),
        (l1_absolute_loss(learned, keep_batch_dim=keep_batch_dim), l1),
        (sparsity_loss(learned, 0.25, keep_batch_dim=keep_batch_dim), 0.25 * l1),
    ]
    for result, per_item in cases:
        expected = _expected(per_item, has_component, keep_batch_dim)
        assert result.shape == expected.shape
        torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-6)


def test_sparsity_per_component_coefficient(generator):
    learned = reference.sparse_activations(5, 3, 8, generator=generator)
    coefficient = torch.tensor([0.0, 1.0, 2.5])
    expected = reference.per_item_l1(learned).mean(0) * coefficient.double()
    torch.testing.assert_close(sparsity_loss(learned, coefficient).double(), expected)


MATRYOSHKA_CASES = [
    # (components, d_sae, d_model, prefix_sizes, with_bias)
    (None, 12, 5, [3, 12], True),
    (None, 12, 5, [1, 2, 6], False),  # full dictionary not listed: it does not count
    (1, 8, 4, [8], True),
    (3, 16, 6, [2, 4, 8, 16], True),
]


@pytest.mark.parametrize(("components", "d_sae", "d_model", "prefix_sizes", "with_bias"), MATRYOSHKA_CASES)
@pytest.mark.parametrize("feature_reduction", ["mean", "sum"])
def test_matryoshka_matches_separate_decodes(
    generator, components, d_sae, d_model, prefix_sizes, with_bias, feature_reduction
):
    batch = 9
    component_shape = [] if components is None else [components]
    source = torch.randn(batch, *component_shape, d_model, generator=generator)
    learned = reference.sparse_activations(batch, *component_shape, d_sae, generator=generator)
    weight = torch.randn(*component_shape, d_sae, d_model, generator=generator)
    bias = torch.randn(*component_shape, d_model, generator=generator) if with_bias else None
    prefix_errors = matryoshka_prefix_errors(
        source, learned, weight, bias, prefix_sizes=prefix_sizes, feature_reduction=feature_reduction
    )
    weight3 = weight if components is not None else weight.unsqueeze(0)
    bias3 = None if bias is None else (bias if components is not None else bias.unsqueeze(0))
    expected = reference.per_item_matryoshka_prefixes(
        _as_3d(source), _as_3d(learned), weight3, bias3, prefix_sizes, feature_reduction
    )
    expected = expected if components is not None else expected.squeeze(1)
    torch.testing.assert_close(prefix_errors.double(), expected, rtol=1e-4, atol=1e-5)

    prefix_weights = [float(i + 1) for i in range(len(prefix_sizes))]
    for weights in (None, prefix_weights):
        loss = matryoshka_reconstruction_loss(
            source,
            learned,
            weight,
            bias,
            prefix_sizes=prefix_sizes,
            prefix_weights=weights,
            feature_reduction=feature_reduction,
        )
        per_item = reference.per_item_matryoshka(
            _as_3d(source), _as_3d(learned), weight3, bias3, prefix_sizes, weights, feature_reduction
        )
        torch.testing.assert_close(
            loss.double(), _expected(per_item, components is not None, False), rtol=1e-4, atol=1e-5
        )


def test_matryoshka_conventions_saev_and_saelens(generator):
    """Defaults reproduce saev (mean over d_model and prefixes); sum + unit weights reproduce SAELens."""
    source = torch.randn(10, 6, generator=generator)
    learned = reference.sparse_activations(10, 16, generator=generator)
    weight = torch.randn(16, 6, generator=generator)
    bias = torch.randn(6, generator=generator)
    sizes = [4, 8, 16]
    decodes = [learned[:, :m] @ weight[:m] + bias for m in sizes]
    saev = torch.stack([((d - source) ** 2).mean() for d in decodes]).mean()
    saelens = sum(((d - source) ** 2).sum(-1).mean() for d in decodes)
    torch.testing.assert_close(
        matryoshka_reconstruction_loss(source, learned, weight, bias, prefix_sizes=sizes), saev, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        matryoshka_reconstruction_loss(
            source, learned, weight, bias, prefix_sizes=sizes, prefix_weights=[1.0] * 3, feature_reduction="sum"
        ),
        saelens,
        rtol=1e-5,
        atol=1e-5,
    )


def test_prefix_reconstructions_are_incremental_decodes(generator):
    learned = reference.sparse_activations(4, 2, 10, generator=generator)
    weight = torch.randn(2, 10, 3, generator=generator)
    bias = torch.randn(2, 3, generator=generator)
    sizes = [3, 7, 10]
    reconstructions = list(matryoshka_prefix_reconstructions(learned, weight, bias, prefix_sizes=sizes))
    assert len(reconstructions) == len(sizes)
    for reconstruction, size in zip(reconstructions, sizes, strict=True):
        expected = torch.einsum("bcf,cfd->bcd", learned[..., :size], weight[:, :size]) + bias
        torch.testing.assert_close(reconstruction, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(generator, dtype):
    source = torch.randn(32, 64, generator=generator)
    decoded = source + 0.01 * torch.randn(32, 64, generator=generator)
    learned = reference.sparse_activations(32, 256, generator=generator)
    l2 = l2_reconstruction_loss(decoded.to(dtype), source.to(dtype))
    l1 = l1_absolute_loss(learned.to(dtype))
    assert l2.dtype == torch.float32
    assert l1.dtype == torch.float32
    # The reference sees the same rounded inputs: only the arithmetic differs.
    expected_l2 = reference.per_item_l2(decoded.to(dtype)[:, None], source.to(dtype)[:, None]).mean()
    expected_l1 = reference.per_item_l1(learned.to(dtype)[:, None]).mean()
    torch.testing.assert_close(l2.double(), expected_l2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(l1.double(), expected_l1, rtol=1e-5, atol=1e-5)


def test_float64_inputs_stay_float64(generator):
    source = torch.randn(4, 3, dtype=torch.float64, generator=generator)
    assert l2_reconstruction_loss(source + 1, source).dtype == torch.float64
    assert l0_norm(source).dtype == torch.float64


def test_l1_gradient_is_sign(generator):
    learned = torch.randn(3, 5, generator=generator).requires_grad_()
    l1_absolute_loss(learned).backward()
    torch.testing.assert_close(learned.grad, learned.detach().sign() / 3)


def test_jaxtyping_annotations_are_checked_in_the_test_suite(generator):
    """The suite runs with jaxtyping's import hook: mismatched annotated shapes fail at the call boundary."""
    with pytest.raises(jaxtyping.TypeCheckError):
        # decoded and source must share "batch *component d_model".
        l2_reconstruction_loss(torch.zeros(3, 4), torch.zeros(3, 5))
