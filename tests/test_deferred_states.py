"""Per-step costs of recording a batch: queued states (DeferredSum, the variance statistics) and inputs read as given.

A per-item mean queues each batch's float64 sum and its item count (a Python int) instead of replacing its states at
every step; any read folds the queue first and any write drops it. These checks pin what a reader sees, what a write
discards, the bound on the queue, and the operations a step dispatches.
"""

import copy
import pickle
from typing import ClassVar

import pytest
import torch

import sparse_metrics as sm
from sparse_metrics.metrics import explained_variance as explained_variance_metrics
from sparse_metrics.metrics._base import _MAX_PENDING, _PENDING, DeferredSum
from tests.operations import Operations


def _batches(generator, sizes, d_model=5):
    batches = []
    for size in sizes:
        source = torch.randn(size, d_model, generator=generator)
        batches.append({"source_activations": source, "decoded_activations": source + torch.randn(size, d_model)})
    return batches


def _reference_sum(batches):
    """The float64 sum of every item's mean squared error, and the item count."""
    errors = [(b["decoded_activations"] - b["source_activations"]).square().mean(dim=-1) for b in batches]
    return torch.cat(errors).double().sum().reshape(1), sum(len(e) for e in errors)


def _fed(batches):
    metric = sm.L2ReconstructionLoss()
    for batch in batches:
        metric.update(**batch)
    return metric


def test_a_batch_costs_one_reduction_and_nothing_for_its_count(generator):
    metric = sm.L2ReconstructionLoss()
    first, second = _batches(generator, [8, 8])
    contribution = metric._contribution(metric._make_batch((), first))
    with Operations() as recorded:
        metric._record(contribution)
    assert recorded.names == ["empty", "unbind", "sum"]  # the queue's rows, made once per queue
    contribution = metric._contribution(metric._make_batch((), second))
    with Operations() as recorded:
        metric._record(contribution)
    assert recorded.names == ["sum"]  # summed into the next row: nothing new is kept
    assert torch.equal(metric.__dict__["l2_sum"], torch.zeros(1, dtype=torch.float64))  # not folded yet
    assert len(metric.__dict__[_PENDING]["l2_sum"]) == 2


def _sums(metric):
    return metric.l2_sum, metric.l2_count


READERS = {
    "attribute": _sums,
    "metric_state": lambda metric: (metric.metric_state["l2_sum"], metric.metric_state["l2_count"]),
    "state_dict": lambda metric: (metric.state_dict()["l2_sum"], metric.state_dict()["l2_count"]),
    "pickle": lambda metric: _sums(pickle.loads(pickle.dumps(metric))),
    "deepcopy": lambda metric: _sums(copy.deepcopy(metric)),
    "clone": lambda metric: _sums(metric.clone()),
}


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_sees_every_queued_batch(generator, reader):
    batches = _batches(generator, [3, 1, 7, 2])
    metric = _fed(batches)
    expected_sum, expected_count = _reference_sum(batches)
    metric.persistent(True)
    total, count = READERS[reader](metric)
    torch.testing.assert_close(total, expected_sum, rtol=1e-12, atol=0)
    assert count.dtype == torch.int64
    assert int(count) == expected_count
    torch.testing.assert_close(metric.compute(), (expected_sum / expected_count).squeeze(0), rtol=1e-12, atol=0)


def test_a_reset_drops_the_queue(generator):
    metric = _fed(_batches(generator, [4, 4]))
    metric.reset()
    assert metric.l2_count == 0
    assert torch.equal(metric.l2_sum, torch.zeros(1, dtype=torch.float64))


def test_loading_a_checkpoint_replaces_what_was_queued(generator):
    first, second = _batches(generator, [5, 3])
    metric = _fed([first])
    metric.persistent(True)
    saved = copy.deepcopy(metric.state_dict())
    metric.update(**second)  # queued, then replaced by the checkpoint
    metric.load_state_dict(saved)
    torch.testing.assert_close(metric.compute(), _fed([first]).compute(), rtol=0, atol=0)
    assert int(metric.l2_count) == 5


def test_the_queue_is_bounded(generator):
    batches = _batches(generator, [1] * (2 * _MAX_PENDING + 5))
    metric = sm.L2ReconstructionLoss()
    for batch in batches:
        metric.update(**batch)
        assert len(metric.__dict__[_PENDING].get("l2_sum", [])) < _MAX_PENDING
    expected_sum, expected_count = _reference_sum(batches)
    torch.testing.assert_close(metric.l2_sum, expected_sum, rtol=1e-12, atol=0)
    assert int(metric.l2_count) == expected_count


@pytest.mark.parametrize("step", ["update", "forward"])
def test_a_rejected_batch_leaves_the_queue_as_it_was(generator, step):
    batches = _batches(generator, [4, 2])
    metric = _fed(batches)
    queued = {name: list(additions) for name, additions in metric.__dict__[_PENDING].items()}
    bad = {"source_activations": torch.zeros(3, 5), "decoded_activations": torch.zeros(3, 4)}
    with pytest.raises(ValueError, match="decoded_activations"):
        getattr(metric, step)(**bad)
    assert metric.__dict__[_PENDING].keys() == queued.keys()
    for name, additions in queued.items():
        assert all(a is b for a, b in zip(metric.__dict__[_PENDING][name], additions, strict=True))
    torch.testing.assert_close(metric.compute(), _fed(batches).compute(), rtol=0, atol=0)


def test_a_collection_rolls_back_its_members_queues(generator):
    loss_fn = sm.SparseAutoencoderLoss(sparsity_coefficient=0.1)
    inputs = {
        "source_activations": torch.randn(4, 3, generator=generator),
        "learned_activations": torch.rand(4, 6, generator=generator),
        "decoded_activations": torch.randn(4, 3, generator=generator),
    }
    loss_fn(**inputs)
    before = pickle.dumps(loss_fn)
    with pytest.raises(ValueError, match="learned_activations"):
        loss_fn(**{**inputs, "learned_activations": torch.rand(5, 6)})
    assert pickle.dumps(loss_fn) == before


def test_only_a_deferred_state_takes_queued_additions():
    metric = sm.FractionOfVarianceUnexplained(d_model=2)
    with pytest.raises(TypeError, match="fvu_statistics is not a DeferredSum"):
        metric._add_to_state("fvu_statistics", 1)
    with pytest.raises(TypeError, match="num_components is not a DeferredState"):
        metric._queue("num_components", 1)
    assert not metric.__dict__.get(_PENDING)


def test_a_subclass_that_redeclares_a_state_queues_into_its_own():
    """States are looked up once per class along its MRO: a subclass's own declaration wins over its base's."""

    class Counted(DeferredSum):
        queued: ClassVar[list[object]] = []

        def queued_item(self, queued, item):
            type(self).queued.append(item)
            return super().queued_item(queued, item)

    class Shadowing(sm.L0NormMetric):
        l0_count = Counted("l0_count")

    base, shadowing = sm.L0NormMetric(), Shadowing()
    learned = torch.tensor([[1.0, 0.0], [2.0, 3.0]])
    base(learned_activations=learned)
    assert Counted.queued == []
    shadowing(learned_activations=learned)
    assert Counted.queued == [2]
    assert shadowing.compute() == base.compute() == 1.5


def test_one_component_inputs_are_read_without_a_view(generator):
    """[batch, d] inputs: the per-item reductions keep their axis, so no view is made (nor squeezed in backward)."""
    loss_fn = sm.SparseAutoencoderLoss(sparsity_coefficient=0.1)
    source = torch.randn(8, 4, generator=generator)
    learned = torch.rand(8, 16, generator=generator).requires_grad_()
    decoded = (source + 0.1 * torch.randn(8, 4, generator=generator)).requires_grad_()
    inputs = {"source_activations": source, "learned_activations": learned, "decoded_activations": decoded}
    with Operations() as recorded:
        loss_fn(**inputs)["loss"].backward()
    assert not {"unsqueeze", "squeeze", "view"} & set(recorded.names), recorded.names
    with_axis = sm.SparseAutoencoderLoss(sparsity_coefficient=0.1)
    out = with_axis(**{name: value.detach()[:, None] for name, value in inputs.items()})
    for key, value in loss_fn.compute().items():
        torch.testing.assert_close(value, with_axis.compute()[key], rtol=0, atol=0, msg=key)
    assert out.keys() == loss_fn.compute().keys()


def test_the_value_does_not_depend_on_when_it_is_read(generator):
    """The queue is added in order: reading after every batch or once at the end gives the same bits."""
    batches = _batches(generator, [int(n) for n in torch.randint(1, 9, (2 * _MAX_PENDING + 3,), generator=generator)])
    read_often, read_once = sm.L2ReconstructionLoss(), _fed(batches)
    for batch in batches:
        read_often.update(**batch)
        read_often.compute()
    assert torch.equal(read_often.l2_sum, read_once.l2_sum)
    assert torch.equal(read_often.compute(), read_once.compute())


def test_a_shallow_copy_has_its_own_queue(generator):
    first, second = _batches(generator, [3, 4])
    metric = _fed([first, second])
    copied = copy.copy(metric)
    expected_sum, expected_count = _reference_sum([first, second])
    torch.testing.assert_close(copied.l2_sum, expected_sum, rtol=1e-12, atol=0)
    assert int(copied.l2_count) == expected_count
    torch.testing.assert_close(metric.l2_sum, expected_sum, rtol=1e-12, atol=0)  # not folded into the copy only
    assert int(metric.l2_count) == expected_count


def test_a_shallow_copy_has_its_own_per_item_rows(generator):
    first, second = _batches(generator, [3, 4])
    metric = sm.L2ReconstructionLoss(keep_batch_dim=True)
    metric.update(**first)
    copied = copy.copy(metric)
    copied.update(**second)
    assert len(metric.l2_per_item) == 1  # the copy's update appended to its own rows only
    assert len(copied.l2_per_item) == 2
    assert metric.compute().shape == (3,)
    assert copied.compute().shape == (7,)


def test_a_state_not_added_yet_is_an_attribute_error():
    metric = sm.L2ReconstructionLoss.__new__(sm.L2ReconstructionLoss)
    assert not hasattr(metric, "l2_sum")


# --- Pooled variance statistics (FVU, explained variance, AuxK's normaliser): moments queued, merged at once -----


def _fvu_reference(batches):
    """The pooled FVU of every item in float64: Σ (x - x̂)² / Σ (x - x̄)²."""
    source = torch.cat([b["source_activations"] for b in batches]).double()
    decoded = torch.cat([b["decoded_activations"] for b in batches]).double()
    return (decoded - source).square().sum() / (source - source.mean(dim=0)).square().sum()


def _offset_batches(generator, sizes, offset=1e4):
    """float64 steps far from 0: their sums are float64 too, so the pooled value is exact to float64 rounding."""
    batches = _batches(generator, sizes)
    return [{name: value.double() + offset for name, value in batch.items()} for batch in batches]


def test_a_variance_step_queues_its_moments_and_merges_nothing(generator):
    metric = sm.FractionOfVarianceUnexplained(d_model=5)
    first, second = _batches(generator, [8, 8])
    metric._record(metric._contribution(metric._make_batch((), first)))  # makes the queue's rows
    contribution = metric._contribution(metric._make_batch((), second))
    with Operations() as recorded:
        metric._record(contribution)
    assert sorted(recorded.names) == ["cat", "copy_", "fill_", "view", "view", "view"]  # into the next row
    assert torch.equal(metric.__dict__["fvu_statistics"], torch.zeros(1, 8, dtype=torch.float64))  # not folded yet
    assert len(metric.__dict__[_PENDING]["fvu_statistics"]) == 2


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # a loaded copy was never updated itself
@pytest.mark.parametrize("reader", ["compute", "state_dict", "pickle", "clone", "to"])
def test_every_reader_sees_every_queued_variance_batch(generator, reader):
    batches = _offset_batches(generator, [3, 1, 7, 2, 9])
    metric = sm.FractionOfVarianceUnexplained(d_model=5)
    for batch in batches:
        metric.update(**batch)
    read = {
        "compute": lambda m: m,
        "state_dict": _loaded,
        "pickle": lambda m: pickle.loads(pickle.dumps(m)),
        "clone": lambda m: m.clone(),
        "to": lambda m: m.to("cpu"),
    }[reader](metric)
    torch.testing.assert_close(read.compute(), _fvu_reference(batches), rtol=1e-12, atol=0)


def _loaded(metric):
    copy_ = sm.FractionOfVarianceUnexplained(d_model=5)
    copy_.load_state_dict(metric.state_dict())
    assert copy_.__dict__[_PENDING].get("fvu_statistics") is None  # a checkpoint carries the folded state
    return copy_


def test_the_variance_queue_is_bounded_and_reading_often_changes_only_rounding(generator, monkeypatch):
    sizes = [int(n) for n in torch.randint(1, 9, (70,), generator=generator)]
    batches = _offset_batches(generator, sizes)
    # A queued batch's row holds 1 + 2 d_model elements: a budget of 4 rows (the default fits 256 at this width).
    monkeypatch.setattr(explained_variance_metrics, "QUEUED_ELEMENTS", 4 * (1 + 2 * 5))
    read_often, read_once = sm.FractionOfVarianceUnexplained(d_model=5), sm.FractionOfVarianceUnexplained(d_model=5)
    lengths = []
    for batch in batches:
        read_often.update(**batch)
        read_often.compute()
        read_once.update(**batch)
        lengths.append(len(read_once.__dict__[_PENDING].get("fvu_statistics", [])))
    assert max(lengths) == 3
    expected = _fvu_reference(batches)
    torch.testing.assert_close(read_once.compute(), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(read_often.compute(), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("centred_residual", [False, True])
def test_a_rejected_variance_batch_leaves_the_queue_as_it_was(generator, centred_residual):
    batches = _batches(generator, [4, 2])
    metric = sm.ExplainedVariance(d_model=5, centred_residual=centred_residual)
    for batch in batches:
        metric.update(**batch)
    queued = list(metric.__dict__[_PENDING]["explained_variance_statistics"])
    with pytest.raises(ValueError, match="decoded_activations"):
        metric(source_activations=torch.zeros(3, 5), decoded_activations=torch.zeros(3, 4))
    assert all(a is b for a, b in zip(metric.__dict__[_PENDING]["explained_variance_statistics"], queued, strict=True))
    fresh = sm.ExplainedVariance(d_model=5, centred_residual=centred_residual)
    for batch in batches:
        fresh.update(**batch)
    torch.testing.assert_close(metric.compute(), fresh.compute(), rtol=0, atol=0)


def test_auxk_normaliser_statistics_are_queued_too(generator):
    metric = sm.AuxiliaryKLoss(convention="sparsify", d_model=5, k_aux=2)
    weight = torch.randn(7, 5, generator=generator)
    dead = torch.tensor([True, False, True, True, False, False, True])
    steps = []
    for size in (6, 3):
        source = torch.randn(size, 5, generator=generator)
        steps.append(
            {
                "source_activations": source,
                "decoded_activations": source + torch.randn(size, 5, generator=generator),
                "pre_activations": torch.randn(size, 7, generator=generator),
                "decoder_weight": weight,
                "dead_mask": dead,
            }
        )
        metric.update(**steps[-1])
    assert len(metric.__dict__[_PENDING]["auxk_statistics"]) == 2
    one_by_one = []
    for step in steps:
        single = sm.AuxiliaryKLoss(convention="sparsify", d_model=5, k_aux=2)
        single.update(**step)
        one_by_one.append(single)
    merged = one_by_one[0]
    merged.merge_state(one_by_one[1])
    torch.testing.assert_close(metric.compute(), merged.compute(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("copier", [copy.copy, copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
@pytest.mark.parametrize("make", [sm.L2ReconstructionLoss, lambda: sm.FractionOfVarianceUnexplained(d_model=5)])
def test_a_copy_and_its_original_never_write_into_each_others_queue(generator, copier, make):
    """A queue's rows are written by the steps to come: a copy folds the queue and starts rows of its own."""
    first, second, third, fourth = _offset_batches(generator, [3, 4, 5, 6])
    metric = make()
    metric.update(**first)
    metric.update(**second)
    copied = copier(metric)
    metric.update(**third)
    copied.update(**fourth)

    def fed(batches):
        reference = make()
        for batch in batches:
            reference.update(**batch)
        return reference.compute()

    torch.testing.assert_close(metric.compute(), fed([first, second, third]), rtol=1e-12, atol=0)
    torch.testing.assert_close(copied.compute(), fed([first, second, fourth]), rtol=1e-12, atol=0)


def test_forward_records_a_differentiable_batch_with_one_reduction(generator):
    """In forward the per-item values carry the graph: recording them (under no_grad) needs no detach of its own."""
    metric = sm.L2ReconstructionLoss()
    first, second = _batches(generator, [8, 8])
    metric(**first)
    decoded = second["decoded_activations"].requires_grad_()
    contribution = metric._contribution(metric._make_batch((), {**second, "decoded_activations": decoded}))
    assert contribution.requires_grad
    with Operations() as recorded, torch.no_grad():  # as forward and the collections call it
        metric._record_counted(contribution)
    assert recorded.names == ["sum"]


def test_a_subclass_with_its_own_state_prefix_queues_too(generator):
    class Renamed(sm.FractionOfVarianceUnexplained):
        _state_prefix = "renamed"

    batches = _offset_batches(generator, [3, 5])
    metric = Renamed(d_model=5)
    for batch in batches:
        metric.update(**batch)
    assert len(metric.__dict__[_PENDING]["renamed_statistics"]) == 2
    torch.testing.assert_close(metric.compute(), _fvu_reference(batches), rtol=1e-12, atol=0)


def test_reset_drops_the_queue_without_folding_it(generator, monkeypatch):
    metric = sm.FractionOfVarianceUnexplained(d_model=5)
    for batch in _batches(generator, [3, 4]):
        metric.update(**batch)

    def refuse(self, value, queued):
        raise AssertionError("reset folded the queue")

    monkeypatch.setattr(explained_variance_metrics.DeferredStatistics, "fold", refuse)
    metric.reset()
    assert not metric.__dict__[_PENDING]
    assert torch.equal(metric.fvu_statistics, torch.zeros(1, 8, dtype=torch.float64))


@pytest.mark.parametrize("fills", [False, True])
def test_a_batch_rejected_after_it_was_queued_leaves_the_queue_as_it_was(generator, monkeypatch, fills):
    """The failure comes after the queue took the batch (and, with ``fills``, folded into the state)."""
    batches = _offset_batches(generator, [4, 2, 3])
    if fills:  # rows of 11 elements: the third batch fills a queue of 3 and folds it
        monkeypatch.setattr(explained_variance_metrics, "QUEUED_ELEMENTS", 3 * (1 + 2 * 5))
    metric = sm.FractionOfVarianceUnexplained(d_model=5, compute_on_cpu=True)
    for batch in batches[:2]:
        metric.update(**batch)
    state, queued = metric.__dict__["fvu_statistics"], list(metric.__dict__[_PENDING]["fvu_statistics"])

    def fail(self):
        raise RuntimeError("after the queue")

    monkeypatch.setattr(sm.FractionOfVarianceUnexplained, "_move_list_states_to_cpu", fail)
    with pytest.raises(RuntimeError, match="after the queue"):
        metric(**batches[2])
    assert metric.__dict__["fvu_statistics"] is state
    assert metric.__dict__[_PENDING]["fvu_statistics"] == queued
    monkeypatch.undo()
    torch.testing.assert_close(metric.compute(), _fvu_reference(batches[:2]), rtol=1e-12, atol=0)
