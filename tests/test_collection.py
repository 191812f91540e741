"""SparseAutoencoderLoss: its keys, the differentiable total loss through the decode, the coefficient schedule.

Epoch values over uneven batches, per-item rows, one-component shapes and states without a graph are generic
checks of the registered collections in ``test_tester.py``.
"""

import pytest
import torch

import sparse_metrics as sm
from tests import reference


def _data(generator, batch=6, components=3, d_model=5, d_sae=12, requires_grad=False):
    """One SAE step (the shared builder's); with ``requires_grad`` the activations and the decoder are leaves and
    ``decoded_activations`` is their decode ``f W + b``, so that gradients flow through it too."""
    inputs = reference.sae_inputs(batch, components=components, d_model=d_model, d_sae=d_sae, generator=generator)
    if requires_grad:
        for name in ("learned_activations", "decoder_weight", "decoder_bias"):
            inputs[name].requires_grad_()
        inputs["decoded_activations"] = (
            torch.einsum("bcf,cfd->bcd", inputs["learned_activations"], inputs["decoder_weight"])
            + inputs["decoder_bias"]
        )
    return inputs


def _reference_loss(
    inputs, coefficient, component_reduction, prefix_sizes=None, prefix_weights=None, feature_reduction="mean"
):
    """The total loss written out by hand, in float64, differentiable."""
    source, learned = inputs["source_activations"], inputs["learned_activations"]
    if prefix_sizes is None:
        reconstruction = reference.per_item_l2(inputs["decoded_activations"], source, feature_reduction)
    else:
        reconstruction = reference.per_item_matryoshka(
            source,
            learned,
            inputs["decoder_weight"],
            inputs["decoder_bias"],
            prefix_sizes,
            prefix_weights,
            feature_reduction,
        )
    per_component = (reconstruction + coefficient * reference.per_item_l1(learned)).mean(0)
    return per_component.mean() if component_reduction == "mean" else per_component.sum()


def test_keys_of_forward_and_compute(generator):
    inputs = _data(generator)
    plain = sm.SparseAutoencoderLoss(num_components=3)
    assert set(plain.keys()) == {"l2", "l0", "l1", "sparsity", "loss"}  # every key is a member
    assert set(plain(**inputs)) == {"l2", "l0", "l1", "sparsity", "loss"}
    assert set(plain.compute()) == {"l2", "l0", "l1", "sparsity", "loss"}
    matryoshka = sm.SparseAutoencoderLoss(num_components=3, matryoshka_prefix_sizes=[4, 12])
    expected = {"l2", "l0", "l1", "sparsity", "matryoshka", "matryoshka_prefix_4", "matryoshka_prefix_12", "loss"}
    assert set(matryoshka(**inputs)) == expected
    assert set(matryoshka.compute()) == expected
    assert set(matryoshka.keys()) == expected


@pytest.mark.parametrize("component_reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    ("prefix_sizes", "prefix_weights", "feature_reduction"),
    [(None, None, "mean"), (None, None, "sum"), ([3, 6, 12], None, "mean"), ([6, 12], [1.0, 1.0], "sum")],
)
def test_loss_and_its_gradients_equal_the_reference(
    generator, component_reduction, prefix_sizes, prefix_weights, feature_reduction
):
    inputs = _data(generator, requires_grad=True)
    loss_fn = sm.SparseAutoencoderLoss(
        3,
        0.05,
        matryoshka_prefix_sizes=prefix_sizes,
        matryoshka_prefix_weights=prefix_weights,
        feature_reduction=feature_reduction,
        component_reduction=component_reduction,
    )
    out = loss_fn(**inputs)
    assert out["loss"].shape == ()
    assert out["loss"].requires_grad
    # The leaves: decoded_activations is computed from them.
    differentiable = {k: inputs[k] for k in ("learned_activations", "decoder_weight", "decoder_bias")}
    # The graph of decoded_activations is shared with the reference's: keep it for the second grad call.
    ours = torch.autograd.grad(out["loss"], list(differentiable.values()), allow_unused=True, retain_graph=True)
    expected_loss = _reference_loss(inputs, 0.05, component_reduction, prefix_sizes, prefix_weights, feature_reduction)
    theirs = torch.autograd.grad(expected_loss, list(differentiable.values()), allow_unused=True)
    torch.testing.assert_close(out["loss"].double(), expected_loss, rtol=1e-5, atol=1e-6)
    for name, mine, expected in zip(differentiable, ours, theirs, strict=True):
        if expected is None:
            assert mine is None or not mine.abs().sum(), name
        else:
            torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-6, msg=name)
    if prefix_sizes is not None:  # the Matryoshka term trains the decoder
        for gradient in ours[1:]:
            assert gradient is not None
            assert gradient.abs().sum() > 0


def test_sparsity_coefficient_schedule_through_the_collection(generator):
    inputs = _data(generator)
    loss_fn = sm.SparseAutoencoderLoss(3, 0.0)
    assert loss_fn(**inputs)["sparsity"].abs().sum() == 0
    loss_fn.sparsity_coefficient = torch.tensor([0.0, 1.0, 2.0])
    out = loss_fn(**inputs)
    expected = reference.per_item_l1(inputs["learned_activations"]).mean(0) * torch.tensor([0.0, 1.0, 2.0]).double()
    torch.testing.assert_close(out["sparsity"].double(), expected, rtol=1e-6, atol=1e-6)
    assert isinstance(loss_fn.sparsity_coefficient, torch.Tensor)


def test_without_a_sparsity_penalty_the_loss_is_the_reconstruction(generator):
    inputs = _data(generator, requires_grad=True)
    loss_fn = sm.SparseAutoencoderLoss(3, sparsity_penalty=False)
    out = loss_fn(**inputs)
    assert list(out) == ["l2", "l0", "l1", "loss"]
    expected = _reference_loss(inputs, 0.0, "mean")
    torch.testing.assert_close(out["loss"].double(), expected, rtol=1e-6, atol=1e-6)
    leaves = [inputs[name] for name in ("learned_activations", "decoder_weight", "decoder_bias")]
    got_grads = torch.autograd.grad(out["loss"], leaves, retain_graph=True)  # the decode's graph is shared
    for got, want in zip(got_grads, torch.autograd.grad(expected, leaves), strict=True):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)
    assert list(loss_fn.compute()) == ["l2", "l0", "l1", "loss"]


@pytest.mark.parametrize(
    "options",
    [{"sparsity_coefficient": 0.1}, {"l1_coefficient": 0.0}, {"sparsity_decoder_norm_weighting": True}],
    ids=lambda options: next(iter(options)),
)
def test_a_sparsity_option_without_the_penalty_is_refused(options):
    with pytest.raises(ValueError, match=f"`{next(iter(options))}` configures the sparsity penalty"):
        sm.SparseAutoencoderLoss(3, sparsity_penalty=False, **options)


def test_without_a_sparsity_penalty_there_is_no_coefficient_and_no_sparsity_key(generator):
    loss_fn = sm.SparseAutoencoderLoss(3, sparsity_penalty=False)
    with pytest.raises(AttributeError, match="built with `sparsity_penalty=False`"):
        loss_fn.sparsity_coefficient  # noqa: B018
    with pytest.raises(AttributeError, match="built with `sparsity_penalty=False`"):
        loss_fn.sparsity_coefficient = 0.1
    assert "sparsity" not in loss_fn
    with pytest.raises(ValueError, match="key 'sparsity' is taken"):  # the key stays the penalty's
        sm.SparseAutoencoderLoss(3, sparsity_penalty=False, loss_terms={"sparsity": sm.L1AbsoluteLoss(3)})
    with pytest.raises(ValueError, match=r"Cannot weight 'sparsity'.*sparsity_penalty=False"):
        loss_fn.set_loss_coefficient("sparsity", 0.1)
    with pytest.raises(ValueError, match="no sparsity penalty"):
        sm.SparseAutoencoderLoss(3, sparsity_penalty=False, loss_coefficients={"sparsity": 0.1})
    # a SparsityLoss added afterwards would be logged but no term of "loss": refused, however it is added
    with pytest.raises(ValueError, match="keeps the key 'sparsity' for its L1 penalty"):
        loss_fn["sparsity"] = sm.SparsityLoss(0.1, 3)
    with pytest.raises(ValueError, match="keeps the key 'sparsity' for its L1 penalty"):
        loss_fn.add_metrics({"sparsity": sm.SparsityLoss(0.1, 3)})
    assert "sparsity" not in loss_fn


def test_a_one_term_loss_is_not_an_alias_of_its_term(generator):
    """With the reconstruction as its only term, "loss" is a new tensor: changing it in place leaves "l2" as it was."""
    loss_fn = sm.SparseAutoencoderLoss(sparsity_penalty=False)
    source = torch.randn(4, 3, generator=generator)
    out = loss_fn(source_activations=source, learned_activations=torch.rand(4, 5), decoded_activations=source + 1)
    torch.testing.assert_close(out["loss"], out["l2"])
    assert out["loss"] is not out["l2"]
    computed = loss_fn.compute()
    torch.testing.assert_close(computed["loss"], computed["l2"])
    assert computed["loss"] is not computed["l2"]


def test_prefix_and_postfix_name_every_key(generator):
    loss_fn = sm.SparseAutoencoderLoss(num_components=3, prefix="train/", postfix="_epoch")
    assert set(loss_fn(**_data(generator))) == {f"train/{k}_epoch" for k in ("l2", "l0", "l1", "sparsity", "loss")}


def test_dist_sync_on_step_is_rejected():
    with pytest.raises(ValueError, match="`dist_sync_on_step=True` is not supported"):
        sm.SparseAutoencoderLoss(sparsity_coefficient=0.1, dist_sync_on_step=True)


# --- composing the loss: loss_terms, loss_coefficients, reconstruction="fvu" ----------------------------------------


def test_loss_terms_are_weighted_members_of_the_loss_with_their_gradients(generator):
    inputs = _data(generator, requires_grad=True)
    extra = sm.L1AbsoluteLoss(3)
    loss_fn = sm.SparseAutoencoderLoss(
        3, 0.05, loss_terms={"extra_l1": extra}, loss_coefficients={"l2": 2.0, "extra_l1": 0.25}
    )
    out = loss_fn(**inputs)
    assert list(out) == ["l2", "l0", "l1", "sparsity", "extra_l1", "loss"]
    assert loss_fn["extra_l1"] is extra
    learned = inputs["learned_activations"]
    l2 = reference.per_item_l2(inputs["decoded_activations"], inputs["source_activations"]).mean(0)
    per_component = 2.0 * l2 + (0.05 + 0.25) * reference.per_item_l1(learned).mean(0)
    expected = per_component.mean()
    torch.testing.assert_close(out["loss"].double(), expected, rtol=1e-6, atol=1e-7)
    (ours,) = torch.autograd.grad(out["loss"], [learned], retain_graph=True)
    (theirs,) = torch.autograd.grad(expected, [learned])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    # compute() weights the epoch means the same way
    torch.testing.assert_close(loss_fn.compute()["loss"], expected.detach(), rtol=1e-6, atol=1e-7)


def test_set_loss_coefficient_applies_from_the_next_step(generator):
    steps = [_data(generator) for _ in range(2)]
    loss_fn = sm.SparseAutoencoderLoss(3, 0.0, loss_terms={"extra_l1": sm.L1AbsoluteLoss(3)})
    assert loss_fn.loss_coefficients == {"l2": 1.0, "extra_l1": 1.0}
    first = loss_fn(**steps[0])
    torch.testing.assert_close(first["loss"], (first["l2"] + first["extra_l1"]).mean())
    loss_fn.set_loss_coefficient("extra_l1", 0.0)  # a warm-up from zero
    second = loss_fn(**steps[1])
    torch.testing.assert_close(second["loss"], second["l2"].mean())
    assert loss_fn.loss_coefficients["extra_l1"] == 0.0
    with pytest.raises(ValueError, match="finite number >= 0, got -1"):
        loss_fn.set_loss_coefficient("extra_l1", -1.0)
    with pytest.raises(ValueError, match="`sparsity_coefficient`"):
        loss_fn.set_loss_coefficient("sparsity", 1.0)
    with pytest.raises(KeyError, match="no term 'l1'"):
        loss_fn.set_loss_coefficient("l1", 1.0)


def test_reconstruction_fvu_trains_on_each_batch_fvu_and_computes_the_pooled_one(generator):
    steps = [_data(generator, batch=size) for size in (5, 3)]
    loss_fn = sm.SparseAutoencoderLoss(3, 0.0, explained_variance=True, d_model=5, reconstruction="fvu")
    assert loss_fn.reconstruction_key == "fvu"
    values = [loss_fn(**step) for step in steps]
    for step, value in zip(steps, values, strict=True):
        batch_fvu = reference.fvu(step["decoded_activations"], step["source_activations"])
        torch.testing.assert_close(value["loss"].double(), batch_fvu.mean(), rtol=1e-5, atol=1e-7)
    pooled = reference.fvu(
        *(torch.cat([s[name] for s in steps]) for name in ("decoded_activations", "source_activations"))
    )
    torch.testing.assert_close(loss_fn.compute()["loss"], pooled.mean(), rtol=1e-6, atol=1e-9)


def test_a_second_reconstruction_term_reads_multi_topk_decoded_activations(generator):
    """sparsify's multi-TopK FVU: an FVU member reading the second reconstruction; its derived key names its source."""
    step = _data(generator)
    multi = step["decoded_activations"] * 0.5 + step["source_activations"] * 0.5
    term = sm.FractionOfVarianceUnexplained(3, d_model=5, reconstruction="multi_topk_decoded_activations")
    loss_fn = sm.SparseAutoencoderLoss(
        3,
        0.0,
        explained_variance=True,
        d_model=5,
        reconstruction="fvu",
        loss_terms={"multi_topk_fvu": term},
        loss_coefficients={"multi_topk_fvu": 1 / 8},
    )
    out = loss_fn(**step, multi_topk_decoded_activations=multi)
    assert "multi_topk_fvu_explained_variance" in out
    expected = (
        reference.fvu(step["decoded_activations"], step["source_activations"])
        + reference.fvu(multi, step["source_activations"]) / 8
    )
    torch.testing.assert_close(out["loss"].double(), expected.mean(), rtol=1e-5, atol=1e-7)
    with pytest.raises(TypeError, match="`multi_topk_decoded_activations`, which was not given"):
        loss_fn(**step)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"loss_terms": {"density": sm.FeatureDensity(12, 3)}}, TypeError, "must be a sparse_metrics loss term"),
        ({"loss_terms": {"l1": sm.L1AbsoluteLoss(3)}}, ValueError, "key 'l1' is taken"),
        ({"loss_terms": {"extra": sm.L1AbsoluteLoss(2)}}, ValueError, "num_components=2"),
        ({"loss_terms": {"extra": sm.L1AbsoluteLoss(3, nan_strategy="ignore")}}, ValueError, "nan_strategy='ignore'"),
        ({"loss_coefficients": {"l1": 0.5}}, ValueError, r"names \['l1'\], which are not weighted terms"),
        ({"loss_coefficients": {"sparsity": 0.5}}, ValueError, "its own `sparsity_coefficient`"),
        ({"loss_coefficients": {"l2": -0.5}}, ValueError, "finite number >= 0"),
        ({"reconstruction": "fvu"}, ValueError, "needs `explained_variance=True`"),
    ],
)
def test_a_loss_that_cannot_be_composed_is_refused(options, error, match):
    with pytest.raises(error, match=match):
        sm.SparseAutoencoderLoss(3, 0.1, **options)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("l2", r"'l2': it is read by \['loss'\]"),
        ("sparsity", r"'sparsity': it is read by \['loss'\]"),
        ("fvu", r"'fvu': it is read by \['explained_variance'\]"),
        ("loss", "it is the collection's loss"),
    ],
)
def test_a_member_that_another_reads_cannot_be_removed(key, message):
    loss_fn = sm.SparseAutoencoderLoss(sparsity_coefficient=0.1, explained_variance=True, d_model=3)
    with pytest.raises(ValueError, match=message):
        del loss_fn[key]
    with pytest.raises(ValueError, match=message):
        loss_fn.pop(key)
    with pytest.raises(ValueError, match=message):
        delattr(loss_fn, key)
    replacement = sm.L2ReconstructionLoss()
    with pytest.raises(ValueError, match=message):
        loss_fn[key] = replacement
    with pytest.raises(ValueError, match=message):
        setattr(loss_fn, key, replacement)
    with pytest.raises(ValueError, match="cannot be cleared"):
        loss_fn.clear()
    assert key in loss_fn
    assert loss_fn[key] is not replacement


def test_a_member_nobody_reads_can_be_removed(generator):
    loss_fn = sm.SparseAutoencoderLoss(sparsity_coefficient=0.1, explained_variance=True, d_model=3)
    del loss_fn["l1"]
    loss_fn.pop("explained_variance")
    del loss_fn["fvu"]  # its reader is gone
    source = torch.randn(4, 3, generator=generator)
    inputs = {"source_activations": source, "learned_activations": torch.rand(4, 5), "decoded_activations": source}
    assert list(loss_fn(**inputs)) == ["l2", "l0", "sparsity", "loss"]
    assert list(loss_fn.compute()) == ["l2", "l0", "sparsity", "loss"]
