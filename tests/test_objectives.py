"""sparse_metrics.objectives against saev's formulas, written out by hand here in float64."""

import dataclasses
import inspect

import pydantic
import pytest
import torch
from torch import Tensor

from sparse_metrics.objectives import (
    Matryoshka,
    MatryoshkaLoss,
    MatryoshkaObjective,
    Vanilla,
    VanillaLoss,
    VanillaObjective,
    get_objective,
    mean_squared_err,
    ref_mean_squared_err,
    sample_prefix_sizes,
)
from tests.distributed import run_on_ranks

B, D, F = 6, 5, 12


def batch(generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    x = torch.randn(B, D, generator=generator)
    # ReLU activations with some exact zeros, as saev's SAEs produce.
    f = torch.relu(torch.randn(B, F, generator=generator))
    w_dec = torch.randn(F, D, generator=generator)
    b_dec = torch.randn(D, generator=generator)
    return x, f, f @ w_dec + b_dec, w_dec, b_dec


# saev's definitions (PEERS.md), written directly from the formulas.
def saev_vanilla(x: Tensor, f: Tensor, x_hat: Tensor, coeff: float) -> dict[str, float]:
    x, f, x_hat = x.double(), f.double(), x_hat.double()
    mse = ((x_hat - x) ** 2).mean()  # element mean over (B, D)
    l0 = (f > 0).double().sum(dim=1).mean()
    l1 = f.sum(dim=1).mean()
    return {
        "loss": float(mse + coeff * l1),
        "mse": float(mse),
        "l0": float(l0),
        "l1": float(l1),
        "sparsity": float(coeff * l1),
    }


def saev_matryoshka_mse(x: Tensor, f: Tensor, w_dec: Tensor, b_dec: Tensor, sizes: tuple[int, ...]) -> Tensor:
    x, f, w_dec, b_dec = x.double(), f.double(), w_dec.double(), b_dec.double()
    # Element mean over (B, prefix, D) of each prefix's own decode.
    preds = torch.stack([f[:, :m] @ w_dec[:m] + b_dec for m in sizes], dim=1)
    return ((preds - x[:, None]) ** 2).mean(dim=(0, 2))


def test_vanilla_matches_saev(generator: torch.Generator) -> None:
    x, f, x_hat, _, _ = batch(generator)
    out = get_objective(Vanilla(sparsity_coeff=0.05))(x, f, x_hat)
    assert isinstance(out, VanillaLoss)
    assert out.metrics() == pytest.approx(saev_vanilla(x, f, x_hat, 0.05), rel=1e-6)
    assert Vanilla().sparsity_coeff == 4e-4  # saev's default


def test_vanilla_gradient_matches_saev(generator: torch.Generator) -> None:
    # Through the ReLU encoder: our L1 is sum |f| (gradient 0 at f = 0), saev's is sum f (gradient 1 at f = 0), and
    # ReLU's backward zeroes exactly those entries, so the gradients reaching the SAE's parameters agree.
    x, _, x_hat, _, _ = batch(generator)
    pre = torch.randn(B, F, generator=generator)
    ours_pre, ours_x_hat = pre.clone().requires_grad_(), x_hat.clone().requires_grad_()
    get_objective(Vanilla(sparsity_coeff=0.05))(x, torch.relu(ours_pre), ours_x_hat).loss.backward()
    ref_pre, ref_x_hat = pre.double().requires_grad_(), x_hat.double().requires_grad_()
    (((ref_x_hat - x.double()) ** 2).mean() + 0.05 * torch.relu(ref_pre).sum(dim=1).mean()).backward()
    assert ours_pre.grad is not None
    assert ref_pre.grad is not None
    torch.testing.assert_close(ours_pre.grad.double(), ref_pre.grad)
    assert ours_x_hat.grad is not None
    assert ref_x_hat.grad is not None
    torch.testing.assert_close(ours_x_hat.grad.double(), ref_x_hat.grad)


def test_loss_is_frozen(generator: torch.Generator) -> None:
    out = get_objective(Vanilla())(*batch(generator)[:3])
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.mse = torch.tensor(0.0)  # type: ignore[misc]


def test_compute_is_the_epoch_mean(generator: torch.Generator) -> None:
    objective = get_objective(Vanilla(sparsity_coeff=0.05))
    first, second = batch(generator), batch(generator)
    objective(*first[:3])
    objective(*second[:3])
    epoch = saev_vanilla(*(torch.cat([a, b]) for a, b in zip(first[:3], second[:3], strict=True)), coeff=0.05)
    values = objective.compute()
    assert values == pytest.approx(
        {"l2": epoch["mse"], "l0": epoch["l0"], "l1": epoch["l1"], "sparsity": epoch["sparsity"]}, rel=1e-6
    )
    objective.reset()
    objective(*first[:3])
    assert objective.compute()["l2"] == pytest.approx(saev_vanilla(*first[:3], coeff=0.05)["mse"], rel=1e-6)


def test_matryoshka_fixed_prefixes_match_saev(generator: torch.Generator) -> None:
    x, f, x_hat, w_dec, b_dec = batch(generator)
    sizes = (2, 5, F)
    out = get_objective(Matryoshka(sparsity_coeff=0.05, prefix_sizes=[2, 5, F]))(x, f, x_hat, w_dec, b_dec)
    assert isinstance(out, MatryoshkaLoss)
    expected = saev_matryoshka_mse(x, f, w_dec, b_dec, sizes)
    assert out.prefix_sizes == sizes
    torch.testing.assert_close(out.prefix_mse.double(), expected, rtol=1e-5, atol=1e-6)
    saev = saev_vanilla(x, f, x_hat, 0.05)
    assert out.mse.item() == pytest.approx(expected.mean().item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(expected.mean().item() + saev["sparsity"], rel=1e-5)
    assert out.full_mse.item() == pytest.approx(saev["mse"], rel=1e-5)
    assert set(out.metrics()) == {"loss", "mse", "sparsity", "l0", "l1", "full_mse"}


def test_matryoshka_sampled_prefixes(generator: torch.Generator) -> None:
    x, f, x_hat, w_dec, b_dec = batch(generator)
    objective = get_objective(Matryoshka(n_prefixes=3, seed=7))
    draws = []
    for _ in range(8):
        out = objective(x, f, x_hat, w_dec, b_dec)
        assert len(out.prefix_sizes) == 3
        assert out.prefix_sizes[-1] == F
        torch.testing.assert_close(
            out.prefix_mse.double(), saev_matryoshka_mse(x, f, w_dec, b_dec, out.prefix_sizes), rtol=1e-5, atol=1e-6
        )
        draws.append(out.prefix_sizes)
    assert len(set(draws)) > 1, "the widths must be resampled on every step"
    # Same seed, same sequence; and a state_dict carries the sampler's position.
    again = get_objective(Matryoshka(n_prefixes=3, seed=7))
    assert [again(x, f, x_hat, w_dec).prefix_sizes for _ in range(8)] == draws
    resumed = get_objective(Matryoshka(n_prefixes=3, seed=0))
    resumed.load_state_dict(objective.state_dict())
    fresh = get_objective(Matryoshka(n_prefixes=3, seed=7))
    for _ in range(8):
        fresh(x, f, x_hat, w_dec)
    assert [resumed(x, f, x_hat, w_dec).prefix_sizes for _ in range(3)] == [
        fresh(x, f, x_hat, w_dec).prefix_sizes for _ in range(3)
    ]


def test_sampler_favours_small_prefixes() -> None:
    generator = torch.Generator().manual_seed(0)
    firsts = torch.tensor([sample_prefix_sizes(100, 2, generator)[0] for _ in range(2000)], dtype=torch.float64)
    # P(m) ∝ 1/m on 1..99: the median is far below the uniform one (50).
    assert firsts.median() < 20
    assert sample_prefix_sizes(100, 1, generator) == (100,)
    assert sample_prefix_sizes(5, 5, generator) == (1, 2, 3, 4, 5)


def _sampled_on_rank(rank: int, world_size: int) -> list[tuple[int, ...]]:
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    objective = MatryoshkaObjective(Matryoshka(n_prefixes=4, seed=11))
    sizes = []
    for _ in range(5):
        x, f, x_hat, w_dec, b_dec = batch(generator)
        sizes.append(objective(x, f, x_hat, w_dec, b_dec).prefix_sizes)
    return sizes


@pytest.mark.distributed
def test_sampled_prefixes_agree_across_ranks() -> None:
    rank0, rank1 = run_on_ranks(_sampled_on_rank)
    assert rank0 == rank1
    assert len(set(rank0)) > 1


def test_mean_squared_err_matches_the_formula(generator: torch.Generator) -> None:
    x, _, x_hat, _, _ = batch(generator)
    error = (x_hat.double() - x.double()) ** 2
    norm = torch.linalg.vector_norm(x.double(), dim=-1, keepdim=True)
    for function in (mean_squared_err, ref_mean_squared_err):
        torch.testing.assert_close(function(x_hat, x).double(), error, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(function(x_hat, x, norm=True).double(), error / norm, rtol=1e-5, atol=1e-6)


def test_mean_squared_err_survives_overflow() -> None:
    x = torch.full((2, 4), 3e28)
    x[1] = -1e28
    x_hat = x * 0.5
    expected = ((x_hat.double() - x.double()) ** 2) / torch.linalg.vector_norm(x.double(), dim=-1, keepdim=True)
    safe = mean_squared_err(x_hat, x, norm=True)
    assert safe.dtype == torch.float32
    assert safe.isfinite().all()
    torch.testing.assert_close(safe.double(), expected, rtol=1e-5, atol=0.0)
    assert not ref_mean_squared_err(x_hat, x, norm=True).isfinite().any()


def test_mean_squared_err_gradient_ignores_the_rescaling(generator: torch.Generator) -> None:
    x, _, x_hat, _, _ = batch(generator)
    safe, ref = x_hat.clone().requires_grad_(), x_hat.clone().requires_grad_()
    mean_squared_err(safe, x, norm=True).sum().backward()
    ref_mean_squared_err(ref, x, norm=True).sum().backward()
    assert safe.grad is not None
    assert ref.grad is not None
    torch.testing.assert_close(safe.grad, ref.grad)


@pytest.mark.parametrize(
    ("config", "kwargs", "match"),
    [
        (Vanilla, {"sparsity_coeff": -1.0}, "sparsity_coeff"),
        (Vanilla, {"sparsity_coeff": float("inf")}, "sparsity_coeff"),
        (Vanilla, {"sparsity_coeff": "0.1"}, "sparsity_coeff"),
        (Vanilla, {"sparsity_coef": 0.1}, "sparsity_coef"),
        (Matryoshka, {}, "exactly one"),
        (Matryoshka, {"prefix_sizes": [2, 4], "n_prefixes": 2}, "exactly one"),
        (Matryoshka, {"prefix_sizes": [4, 2]}, "cumulative"),
        (Matryoshka, {"prefix_sizes": []}, "at least one"),
        (Matryoshka, {"n_prefixes": 0}, "n_prefixes"),
        (Matryoshka, {"n_prefixes": 2.0}, "n_prefixes"),
    ],
)
def test_config_rejects(config: type[pydantic.BaseModel], kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=match):
        config(**kwargs)


def test_configs_are_frozen() -> None:
    with pytest.raises(pydantic.ValidationError):
        Vanilla().sparsity_coeff = 1.0  # type: ignore[misc]


def test_bad_inputs(generator: torch.Generator) -> None:
    x, f, x_hat, w_dec, _ = batch(generator)
    with pytest.raises(TypeError, match="cfg"):  # beartype checks it first under the test suite
        get_objective("vanilla")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`x_hat` must have the shape of `x`, \[6, 5\], got \[6, 4\]"):
        # The suite's jaxtyping hook rejects this at the call boundary; the unwrapped function is what users run.
        inspect.unwrap(mean_squared_err)(x_hat[:, :4], x)
    with pytest.raises(TypeError, match="`x` must be a floating-point"):
        inspect.unwrap(ref_mean_squared_err)(x_hat, x.long())
    vanilla = VanillaObjective(Vanilla())
    with pytest.raises(ValueError, match="decoded_activations"):
        vanilla(x, f, x_hat[:, :4])
    matryoshka = MatryoshkaObjective(Matryoshka(n_prefixes=2))
    with pytest.raises(ValueError, match="`decoder_weight` is required"):
        matryoshka(x, f, x_hat)
    with pytest.raises(ValueError, match="n_prefixes"):
        MatryoshkaObjective(Matryoshka(n_prefixes=F + 1))(x, f, x_hat, w_dec)
    with pytest.raises(ValueError, match="prefix_sizes"):
        MatryoshkaObjective(Matryoshka(prefix_sizes=(F + 1,)))(x, f, x_hat, w_dec)
    with pytest.raises(ValueError, match="decoder_weight"):
        matryoshka(x, f, x_hat, w_dec.T)
    # A rejected batch accumulates nothing.
    vanilla(x, f, x_hat)
    before = vanilla.compute()
    with pytest.raises(ValueError, match="learned_activations"):
        vanilla(x, f[:3], x_hat)
    assert vanilla.compute() == before
