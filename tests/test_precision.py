"""Numerical precision: half-precision inputs, long runs, exact counts, large magnitudes."""

import math

import pytest
import torch

import sparse_metrics as sm
from sparse_metrics.functional import l2_reconstruction_loss
from sparse_metrics.metrics._base import ACCUMULATOR_DTYPE
from tests import reference, tester

C, D_MODEL, D_SAE, PREFIXES = 3, 64, 256, [64, 256]


def _data(dtype: torch.dtype, batch: int = 512, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A large step (the shared builder's), its activations and decoder bias times ``scale``, in ``dtype``."""
    inputs = reference.sae_inputs(
        batch,
        components=C,
        d_model=D_MODEL,
        d_sae=D_SAE,
        generator=torch.Generator().manual_seed(7),
        dtype=torch.float64,
        density=0.5,
    )
    scaled = {
        name: value * scale if name not in ("decoder_weight", "dead_mask") else value for name, value in inputs.items()
    }
    return reference.cast(scaled, dtype)


#: The float64 reference of every key of the collection below, on given (possibly rounded) inputs.
_reference = tester.collection_reference(0.5, prefix_sizes=PREFIXES)


def _references(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _reference([[{name: value.double() for name, value in inputs.items()}]], False)


def _collection() -> sm.SparseAutoencoderLoss:
    return sm.SparseAutoencoderLoss(C, 0.5, matryoshka_prefix_sizes=PREFIXES)


# Half-precision inputs are upcast and every per-item value is computed in float32, so against the float64 reference
# on the same (rounded) inputs the only error is float32 arithmetic (measured <= 3e-8 here). Against the float64
# result on the unrounded data the rounding of the inputs themselves dominates (measured: fp16 6e-5, bf16 7e-4).
TOLERANCE_SAME_INPUTS = 1e-6
TOLERANCE_UNROUNDED = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_match_the_float64_reference(dtype):
    exact = _data(torch.float64)
    rounded = reference.cast(exact, dtype)
    collection = _collection()
    out = collection(**rounded)
    assert out["l2"].dtype == torch.float32  # per-item math in float32, never in half
    result = collection.compute()
    same_inputs = _references(rounded)
    unrounded = _references(exact)
    for key in same_inputs:
        assert result[key].dtype == torch.float64
        torch.testing.assert_close(result[key], same_inputs[key], rtol=TOLERANCE_SAME_INPUTS, atol=0)
        torch.testing.assert_close(result[key], unrounded[key], rtol=TOLERANCE_UNROUNDED[dtype], atol=0)
    for member in collection.values(copy_state=False):
        for name, value in member.metric_state.items():
            if name.endswith("_sum"):
                assert value.dtype == ACCUMULATOR_DTYPE


def test_half_precision_per_item_states_are_float64():
    rounded = reference.cast(_data(torch.float64, batch=8), torch.bfloat16)
    metric = sm.L2ReconstructionLoss(C, keep_batch_dim=True)
    metric.update(rounded["decoded_activations"], rounded["source_activations"])
    assert metric.l2_per_item[0].dtype == torch.float64
    expected = reference.per_item_l2(rounded["decoded_activations"].double(), rounded["source_activations"].double())
    torch.testing.assert_close(metric.compute(), expected, rtol=TOLERANCE_SAME_INPUTS, atol=0)


def _long_run(updates: int, batch: int) -> None:
    """``updates`` batches of per-item values through the accumulation path; the sum must match ``math.fsum``."""
    generator = torch.Generator().manual_seed(updates)
    # Positive values spread over 12 orders of magnitude: a float32 (or naive) sum would visibly lose the small ones.
    values = (
        torch.rand(updates, batch, 2, generator=generator, dtype=torch.float32)
        * 10 ** torch.randint(-6, 6, (updates, batch, 1), generator=generator).float()
    )
    metric = sm.L1AbsoluteLoss(2)
    for rows in values:
        metric._record(rows)
    for component in range(2):
        exact = math.fsum(values[..., component].double().flatten().tolist())
        assert math.isclose(metric.l1_sum[component].item(), exact, rel_tol=1e-12)
    assert metric.l1_count.item() == updates * batch
    assert metric.l1_count.dtype == torch.int64


def test_many_updates_sum_matches_fsum():
    _long_run(20_000, 3)


@pytest.mark.slow
def test_a_million_updates_sum_matches_fsum():
    _long_run(1_000_000, 2)


def test_update_path_matches_fsum_over_thousands_of_updates(generator):
    metric = sm.L2ReconstructionLoss(feature_reduction="sum")
    per_item = []
    for _ in range(3000):
        decoded, source = torch.randn(2, 2, 4, generator=generator).unbind(0)
        metric.update(decoded, source)
        # The float32 per-item values the metric accumulates: the test is about the accumulation, not their rounding.
        per_item += l2_reconstruction_loss(decoded, source, feature_reduction="sum", keep_batch_dim=True).tolist()
    assert math.isclose(metric.compute().item(), math.fsum(per_item) / len(per_item), rel_tol=1e-12)


@pytest.mark.parametrize("start", [2**24 - 1, 2**31 - 1, 2**53 - 10])
def test_counts_stay_exact_beyond_float_precision(start):
    """A count in float32 stops at 2**24 and an int32 one wraps at 2**31; the int64 count does neither."""
    metric = sm.L0NormMetric()
    metric.l0_count = torch.tensor(start, dtype=torch.int64)
    metric.l0_sum = torch.tensor([float(start)], dtype=torch.float64)
    for _ in range(3):
        metric.update(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]))
    assert metric.l0_count.item() == start + 9
    assert metric.compute().item() == (start + 9) / (start + 9)


def test_fp16_extremes_do_not_overflow():
    """Inputs at the float16 limit: their squares and sums overflow float16, not the float32 math used for them."""
    big = torch.finfo(torch.float16).max
    source = torch.full((4, 8), -big, dtype=torch.float16)
    decoded = torch.full((4, 8), big, dtype=torch.float16)
    learned = torch.full((4, 1024), big, dtype=torch.float16)
    l2, l1 = sm.L2ReconstructionLoss(feature_reduction="sum"), sm.L1AbsoluteLoss()
    l2.update(decoded, source)
    l1.update(learned)
    assert l2.compute().item() == pytest.approx((2 * big) ** 2 * 8, rel=1e-6)  # float32 rounding of the square
    assert l1.compute().item() == big * 1024
    matryoshka = sm.MatryoshkaReconstructionLoss([8], feature_reduction="sum")
    matryoshka.update(source, learned[:, :8], torch.eye(8, dtype=torch.float16))
    assert math.isfinite(matryoshka.compute().item())


def test_float64_accumulator_holds_sums_beyond_float32_range():
    """Per-item values near the float32 maximum: their sum overflows float32 but not the float64 state."""
    near_max = torch.finfo(torch.float32).max / 2
    learned = torch.full((64, 2), near_max, dtype=torch.float32) / 2  # L1 per item == near_max
    metric = sm.L1AbsoluteLoss()
    for _ in range(10):
        metric.update(learned)
    assert metric.l1_sum.item() == pytest.approx(640 * float(near_max), rel=1e-7)
    assert metric.compute().item() == pytest.approx(float(near_max), rel=1e-7)


def test_large_float32_magnitudes_match_float64():
    """float32 inputs of magnitude 1e15: squares near 1e30 are computed without overflow or loss of range."""
    exact = _data(torch.float64, batch=64, scale=1e15)
    rounded = reference.cast(exact, torch.float32)
    result = _collection()
    result.update(**rounded)
    values = result.compute()
    expected = _references(rounded)
    for key, value in expected.items():
        assert torch.isfinite(values[key]).all()
        torch.testing.assert_close(values[key], value, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "cast",
    [
        lambda m: torch.nn.ModuleDict({"metrics": m}).to(torch.bfloat16)["metrics"],  # a model cast to bfloat16
        lambda m: m.to(torch.float16),
        lambda m: m.to(torch.float32),  # float64 sums must not become float32 either
        lambda m: m.set_dtype(torch.float16),
        lambda m: m.half(),
    ],
)
def test_casting_the_metric_changes_no_state_or_configuration_dtype(cast):
    """States stay float64/int64 and the coefficient and prefix weights are not rounded to half precision."""
    batches = [_data(torch.float32, batch=16), _data(torch.float32, batch=8)]

    def make() -> sm.SparseAutoencoderLoss:
        return sm.SparseAutoencoderLoss(
            C,
            torch.tensor([0.1, 0.3, 0.7]),
            matryoshka_prefix_sizes=PREFIXES,
            matryoshka_prefix_weights=[0.1, 0.9],
            keep_batch_dim=True,
        )

    plain, cast_metric = make(), make()
    plain.update(**batches[0])
    cast_metric.update(**batches[0])
    cast_metric = cast(cast_metric)
    for metric in (plain, cast_metric):
        metric.update(**batches[1])
    for member in cast_metric.values(copy_state=False):
        for value in member.metric_state.values():
            assert all(
                row.dtype in (torch.float64, torch.int64) for row in (value if isinstance(value, list) else [value])
            )
    expected = plain.compute()
    for key, value in cast_metric.compute().items():
        assert torch.equal(value, expected[key]), key
