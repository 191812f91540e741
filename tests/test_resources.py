"""Memory and synchronisation: what the hot path must never do (counted, not timed)."""

import gc
import warnings

import pytest
import torch

import sparse_metrics as sm
from sparse_metrics.functional import (
    l0_norm,
    l1_absolute_loss,
    l2_reconstruction_loss,
    matryoshka_reconstruction_loss,
    sparsity_loss,
)


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some torch module objects warns about deprecated aliases
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def _state_bytes(collection: sm.SparseAutoencoderLoss) -> int:
    total = 0
    for member in collection.values(copy_state=False):
        for value in member.metric_state.values():
            for tensor in value if isinstance(value, list) else [value]:
                total += tensor.numel() * tensor.element_size()
    return total


def test_ten_thousand_forward_steps_use_constant_memory():
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(4, 2, 3, generator=generator)
    weight = torch.randn(2, 8, 3, generator=generator, requires_grad=True)
    learned = torch.randn(4, 2, 8, generator=generator).relu().requires_grad_()
    loss_fn = sm.SparseAutoencoderLoss(2, 0.1, matryoshka_prefix_sizes=[4, 8])
    inputs = {
        "source_activations": source,
        "learned_activations": learned,
        "decoded_activations": source * 0.5,
        "decoder_weight": weight,
    }
    for _ in range(100):
        loss_fn(**inputs)
    tensors, state_bytes = _live_tensors(), _state_bytes(loss_fn)
    for _ in range(10_000 - 100):
        out = loss_fn(**inputs)
    del out
    assert _state_bytes(loss_fn) == state_bytes
    # Nothing accumulates: no per-step list, no graph kept alive by a state. (Fewer is fine: objects left by earlier
    # tests in the same process, torch.compile's caches say, may be collected meanwhile.)
    assert _live_tensors() <= tensors
    assert loss_fn.compute()["l0"].numel() == 2


def test_update_and_forward_never_read_tensor_values():
    """On the meta device every tensor has a shape but no data: ``.item()``, ``bool(t)`` or ``.tolist()`` on
    anything computed from the inputs would raise. Passing proves update/forward never synchronise with the device
    (validation uses shapes and dtypes only)."""
    loss_fn = sm.SparseAutoencoderLoss(
        2,
        torch.tensor([0.1, 0.2]),
        matryoshka_prefix_sizes=[4, 8],
        keep_batch_dim=True,
        explained_variance=True,
        d_model=3,
        feature_density=True,
        dead_feature_window=4,
        num_features=8,
    ).to("meta")
    inputs = {
        "source_activations": torch.empty(5, 2, 3, device="meta"),
        "learned_activations": torch.empty(5, 2, 8, device="meta", requires_grad=True),
        "decoded_activations": torch.empty(5, 2, 3, device="meta", requires_grad=True),
        "decoder_weight": torch.empty(2, 8, 3, device="meta", requires_grad=True),
        "decoder_bias": torch.empty(2, 3, device="meta"),
    }
    out = loss_fn(**inputs)
    out["loss"].backward()
    loss_fn.update(**inputs)
    assert all(value.device.type == "meta" for value in out.values())
    with pytest.raises(RuntimeError):
        torch.empty(1, device="meta").item()  # the premise: reading a meta tensor fails


def test_functional_core_never_reads_tensor_values():
    x = torch.empty(6, 3, 4, device="meta")
    f = torch.empty(6, 3, 16, device="meta")
    w = torch.empty(3, 16, 4, device="meta")
    for value in (
        l2_reconstruction_loss(x, x),
        l1_absolute_loss(f),
        l0_norm(f),
        sparsity_loss(f, 0.1),
        matryoshka_reconstruction_loss(x, f, w, prefix_sizes=[8, 16]),
    ):
        assert value.shape == (3,)
