"""``nan_strategy``: items with NaN or infinite values are propagated, dropped, or rejected."""

import pytest
import torch

import sparse_metrics as sm
from tests import reference

C, D_MODEL, D_SAE = 2, 4, 8

#: name -> (factory, update inputs used, reference per-item values of (source, decoded, learned, weight))
METRICS = {
    "l2": (
        lambda **kw: sm.L2ReconstructionLoss(C, **kw),
        ("decoded_activations", "source_activations"),
        lambda s, d, f, w: reference.per_item_l2(d, s),
    ),
    "l1": (
        lambda **kw: sm.L1AbsoluteLoss(C, **kw),
        ("learned_activations",),
        lambda s, d, f, w: reference.per_item_l1(f),
    ),
    "l0": (
        lambda **kw: sm.L0NormMetric(C, **kw),
        ("learned_activations",),
        lambda s, d, f, w: reference.per_item_l0(f),
    ),
    "sparsity": (
        lambda **kw: sm.SparsityLoss(0.5, C, **kw),
        ("learned_activations",),
        lambda s, d, f, w: 0.5 * reference.per_item_l1(f),
    ),
    "matryoshka": (
        lambda **kw: sm.MatryoshkaReconstructionLoss([4, 8], C, **kw),
        ("source_activations", "learned_activations", "decoder_weight"),
        lambda s, d, f, w: reference.per_item_matryoshka(s, f, w, None, [4, 8]),
    ),
}
BAD_ROWS = [1, 4]  # items with a non-finite value


def _batch(generator, poison: str | None) -> dict[str, torch.Tensor]:
    source = torch.randn(6, C, D_MODEL, generator=generator)
    batch = {
        "source_activations": source,
        "decoded_activations": source + 0.2 * torch.randn(6, C, D_MODEL, generator=generator),
        "learned_activations": reference.sparse_activations(6, C, D_SAE, density=0.6, generator=generator),
        "decoder_weight": torch.randn(C, D_SAE, D_MODEL, generator=generator),
    }
    if poison is not None:
        batch[poison] = batch[poison].clone()
        batch[poison][BAD_ROWS[0], 1, 0] = float("nan")  # one component of one item is enough
        batch[poison][BAD_ROWS[1], 0, -1] = float("inf")
    return batch


def _state(metric) -> dict[str, object]:
    return {
        k: (v.clone() if isinstance(v, torch.Tensor) else [t.clone() for t in v])
        for k, v in metric.metric_state.items()
    }


def _kwargs(batch, names):
    return {name: batch[name] for name in names}


@pytest.mark.parametrize("name", list(METRICS))
@pytest.mark.parametrize("use_forward", [False, True])
def test_ignore_drops_whole_items(generator, name, use_forward):
    factory, names, per_item_reference = METRICS[name]
    clean = _batch(generator, None)
    poison = names[0]
    dirty = {**clean, poison: clean[poison].clone()}
    dirty[poison][BAD_ROWS[0], 1, 0] = float("nan")
    dirty[poison][BAD_ROWS[1], 0, -1] = -float("inf")
    keep = [i for i in range(6) if i not in BAD_ROWS]
    metric, per_item = factory(nan_strategy="ignore"), factory(nan_strategy="ignore", keep_batch_dim=True)
    for m in (metric, per_item):
        batch_value = m(**_kwargs(dirty, names)) if use_forward else m.update(**_kwargs(dirty, names))
    expected = per_item_reference(
        clean["source_activations"][keep],
        clean["decoded_activations"][keep],
        clean["learned_activations"][keep],
        clean["decoder_weight"],
    )
    torch.testing.assert_close(metric.compute(), expected.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_item.compute(), expected, rtol=1e-5, atol=1e-6)
    assert metric.metric_state[f"{metric._state_prefix}_count"].item() == 4
    if use_forward:
        torch.testing.assert_close(batch_value.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(METRICS))
def test_error_names_the_inputs_and_leaves_the_state_untouched(generator, name):
    factory, names, _ = METRICS[name]
    metric = factory(nan_strategy="error", keep_batch_dim=True)
    metric.update(**_kwargs(_batch(generator, None), names))
    before, count, computed = _state(metric), metric.update_count, metric.compute()
    dirty = _batch(generator, names[0])
    for call in (metric.update, metric.forward):
        with pytest.raises(ValueError, match=rf"2 of 6 items .*`{names[0]}`.*nan_strategy='error'"):
            call(**_kwargs(dirty, names))
    after = _state(metric)
    for key, value in before.items():
        if isinstance(value, list):
            assert len(after[key]) == len(value)
            assert all(torch.equal(a, b) for a, b in zip(after[key], value, strict=True))
        else:
            assert torch.equal(after[key], value)
    assert metric.update_count == count
    torch.testing.assert_close(metric.compute(), computed)


@pytest.mark.parametrize("name", list(METRICS))
def test_propagate_is_the_default_and_lets_nan_through(generator, name):
    factory, names, _ = METRICS[name]
    metric = factory()
    assert metric.nan_strategy == "propagate"
    metric.update(**_kwargs(_batch(generator, names[0]), names))
    result = metric.compute()
    if name == "l0":  # counting non-zeros is well-defined for NaN: the count is kept as it is (documented)
        assert torch.isfinite(result).all()
    else:
        assert not torch.isfinite(result).all()


def test_the_collection_drops_an_item_from_every_member_and_the_loss(generator):
    clean = _batch(generator, None)
    dirty = _batch(generator, None)
    dirty = {**clean, "decoded_activations": clean["decoded_activations"].clone()}
    dirty["decoded_activations"][3, 1, 2] = float("nan")  # only L2 sees this item as non-finite
    keep = [0, 1, 2, 4, 5]
    ignoring = sm.SparseAutoencoderLoss(C, 0.5, matryoshka_prefix_sizes=[4, 8], nan_strategy="ignore")
    reference_loss = sm.SparseAutoencoderLoss(C, 0.5, matryoshka_prefix_sizes=[4, 8])
    out = ignoring(**dirty)
    expected = reference_loss(**{k: (v[keep] if k.endswith("activations") else v) for k, v in clean.items()})
    for key, value in expected.items():
        torch.testing.assert_close(out[key], value)
    for key, value in reference_loss.compute().items():
        torch.testing.assert_close(ignoring.compute()[key], value)


def test_the_collection_error_names_its_inputs(generator):
    loss_fn = sm.SparseAutoencoderLoss(C, 0.5, nan_strategy="error")
    dirty = _batch(generator, "learned_activations")
    with pytest.raises(ValueError, match=r"SparseAutoencoderLoss: 2 of 6 items.*`learned_activations`"):
        loss_fn(**dirty)
    assert all(member.update_count == 0 for member in loss_fn.values(copy_state=False))


def test_nan_strategy_is_validated():
    with pytest.raises(ValueError, match=r"`nan_strategy` must be 'propagate', 'ignore' or 'error', got 'warn'"):
        sm.L2ReconstructionLoss(nan_strategy="warn")
    with pytest.raises(ValueError, match="nan_strategy"):
        sm.SparseAutoencoderLoss(nan_strategy="skip")


def test_propagate_reads_no_value_and_error_must():
    """On the meta device any read of a value fails: "propagate" never reads; "error" reads once (documented)."""
    inputs = {
        "source_activations": torch.empty(5, C, D_MODEL, device="meta"),
        "learned_activations": torch.empty(5, C, D_SAE, device="meta"),
        "decoded_activations": torch.empty(5, C, D_MODEL, device="meta"),
    }
    sm.SparseAutoencoderLoss(C, 0.1, nan_strategy="propagate").to("meta")(**inputs)
    with pytest.raises(RuntimeError):  # .item()/bool() of a meta tensor
        sm.SparseAutoencoderLoss(C, 0.1, nan_strategy="error").to("meta")(**inputs)


def test_the_collection_drops_an_item_from_the_training_metrics_too(generator):
    """FVU, feature density and dead features see the same items as the loss terms under "ignore"."""
    clean = {k: v for k, v in _batch(generator, None).items() if k != "decoder_weight"}
    dirty = {**clean, "source_activations": clean["source_activations"].clone()}
    dirty["source_activations"][2, 0, 1] = float("inf")
    keep = [0, 1, 3, 4, 5]
    options = {
        "explained_variance": True,
        "d_model": D_MODEL,
        "feature_density": True,
        "num_features": D_SAE,
        "dead_feature_window": 12,
    }
    ignoring = sm.SparseAutoencoderLoss(C, 0.5, nan_strategy="ignore", **options)
    expected_fn = sm.SparseAutoencoderLoss(C, 0.5, **options)
    out = ignoring(**dirty)
    expected = expected_fn(**{k: v[keep] for k, v in clean.items()})
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(out[key], value, msg=key)
    for key, value in expected_fn.compute().items():
        torch.testing.assert_close(ignoring.compute()[key], value, msg=key)
