"""Moving metrics between devices: float64 sums where the device has float64, float32 where it has not (MPS)."""

import pytest
import torch

import sparse_metrics as sm
from sparse_metrics.metrics import _base


@pytest.fixture
def meta_without_float64(monkeypatch):
    """Let the meta device stand in for MPS, which has no float64 and is absent from CI machines."""
    monkeypatch.setattr(_base, "supports_float64", lambda device: device.type != "meta")


def _float_states(metric):
    for name in metric._defaults:
        value = getattr(metric, name)
        for tensor in value if isinstance(value, list) else [value]:
            if tensor.is_floating_point():
                yield name, tensor


def _inputs(device):
    return {
        "source_activations": torch.zeros(5, 2, 3, device=device),
        "decoded_activations": torch.zeros(5, 2, 3, device=device),
        "learned_activations": torch.zeros(5, 2, 8, device=device),
        "decoder_weight": torch.zeros(2, 8, 3, device=device),
    }


def test_sums_become_float32_on_a_device_without_float64(meta_without_float64):
    loss_fn = sm.SparseAutoencoderLoss(2, 0.1, matryoshka_prefix_sizes=[4, 8], keep_batch_dim=True)
    loss_fn.update(**_inputs("cpu"))
    assert {t.dtype for m in loss_fn.values() for _, t in _float_states(m)} == {torch.float64}
    loss_fn = loss_fn.to("meta")
    for member in loss_fn.values(copy_state=False):
        for name, tensor in _float_states(member):
            assert (tensor.device.type, tensor.dtype) == ("meta", torch.float32), name
        assert all(
            t.dtype == torch.float32
            for t in member._defaults.values()
            if isinstance(t, torch.Tensor) and t.is_floating_point()
        )
    loss_fn.update(**_inputs("meta"))  # new per-item rows and prefix sums follow the state's dtype
    assert loss_fn["l2"].compute().dtype == torch.float32
    loss_fn.reset()
    assert loss_fn["l2"].l2_sum.dtype == torch.float32


def test_sums_stay_float64_on_devices_with_float64():
    metric = sm.L2ReconstructionLoss(2).to("meta")
    assert metric.l2_sum.dtype == torch.float64
    assert metric.l2_count.dtype == torch.int64


def test_dtype_conversions_keep_torchmetrics_guard(meta_without_float64):
    """``.half()`` leaves states alone in torchmetrics (only ``set_dtype`` converts), on any device."""
    metric = sm.L1AbsoluteLoss().to("meta").half()
    assert metric.l1_sum.dtype == torch.float32
    assert metric.l1_count.dtype == torch.int64


def test_training_metrics_follow_the_device_float64_support(meta_without_float64):
    fvu = sm.FractionOfVarianceUnexplained(2, d_model=3).to("meta")
    fvu.update(torch.zeros(5, 2, 3, device="meta"), torch.ones(5, 2, 3, device="meta"))
    assert (fvu.fvu_statistics.device.type, fvu.fvu_statistics.dtype) == ("meta", torch.float32)
    density = sm.FeatureDensity(8, 2).to("meta")
    density.update(torch.zeros(5, 2, 8, device="meta"))
    assert density.compute().dtype == torch.float32
    assert density.density_fire_count.dtype == torch.int64
    on_cpu = sm.FractionOfVarianceUnexplained(2, d_model=3)
    on_cpu.update(torch.zeros(5, 2, 3), torch.ones(5, 2, 3))
    assert on_cpu.fvu_statistics.dtype == torch.float64


def test_dead_feature_fraction_follows_the_device_float64_support(meta_without_float64):
    """The dead fraction of forward and of compute() is float64 where the device has it, float32 where not (MPS)."""
    inputs = _inputs("cpu")
    del inputs["decoder_weight"]
    loss_fn = sm.SparseAutoencoderLoss(2, 0.1, dead_feature_window=4, num_features=8)
    assert loss_fn(**inputs)["dead_feature_fraction"].dtype == torch.float64
    assert loss_fn.compute()["dead_feature_fraction"].dtype == torch.float64
    loss_fn = loss_fn.to("meta")
    values = loss_fn(**{name: value.to("meta") for name, value in inputs.items()})
    assert (values["dead_feature_fraction"].device.type, values["dead_feature_fraction"].dtype) == (
        "meta",
        torch.float32,
    )
    assert loss_fn.compute()["dead_feature_fraction"].dtype == torch.float32
