"""BatchTopKThreshold: each peer's update rule side by side (written here, in the peer's dtype: bitwise equal), the
dictionary_learning start step with and without ``step=``, resuming, gradient accumulation, reset, components,
errors, and two gloo ranks with different data."""

import pytest
import torch
from torch import Tensor
from torchmetrics import MetricCollection

import sparse_metrics as sm
import sparse_metrics.functional as smf
from tests.distributed import run_on_ranks

pytestmark = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")


def _steps(count: int, seed: int, *, components: int | None = None, dtype: torch.dtype = torch.float32) -> list:
    """BatchTopK-like activations (non-negative, sparse) of varying batch sizes; step 3 has no positive value, step 5
    is empty."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for index in range(count):
        size = 0 if index == 5 else int(torch.randint(1, 7, (1,), generator=generator))
        shape = (size, 10) if components is None else (size, components, 10)
        values = torch.randn(*shape, generator=generator).relu() * (torch.rand(*shape, generator=generator) < 0.4)
        values = values * (0.5 + 4 * torch.rand((), generator=generator))
        out.append(torch.zeros(shape) if index == 3 else values.to(dtype))
    return out


# The peers' update rules, one step, written from their code (the buffer's dtype, their operation order).


def saelens_rule(theta: Tensor, f: Tensor, lr: float = 0.01) -> Tensor:  # batchtopk_sae.update_topk_threshold
    positive = f > 0
    if positive.any():
        theta = (1 - lr) * theta + lr * f[positive].min().to(theta.dtype)
    return theta


def dictionary_learning_rule(theta: Tensor, f: Tensor, beta: float = 0.999) -> Tensor:  # BatchTopKTrainer
    active = f[f > 0]
    minimum = torch.tensor(0.0) if active.size(0) == 0 else active.min().to(torch.float32)
    return minimum.clone() if theta < 0 else (beta * theta) + ((1 - beta) * minimum)


def saev_rule(theta: Tensor, f: Tensor, momentum: float = 0.1) -> Tensor:  # BatchTopKActivation.forward
    positive = f[f > 0]
    if positive.numel() == 0:  # saev raises here (min of an empty tensor); the metric keeps theta
        return theta
    return theta.clone().mul_(1 - momentum).add_(momentum * positive.min())


RULES = {
    "saelens": (saelens_rule, torch.tensor(0.0, dtype=torch.float64)),
    "dictionary_learning": (dictionary_learning_rule, torch.tensor(-1.0)),
    "saev": (saev_rule, torch.tensor(0.0)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("convention", list(RULES))
def test_each_convention_is_bitwise_the_peer_rule(convention, dtype):
    rule, theta = RULES[convention]
    metric = sm.BatchTopKThreshold(convention=convention, start_step=-1)
    for index, f in enumerate(_steps(40, seed=0, dtype=dtype)):
        theta = rule(theta, f)  # an empty batch: no positive value (dictionary_learning then takes 0)
        value = metric(f) if index % 2 else metric.update(f)
        assert torch.equal(metric.compute(), theta.double()), index
        if index % 2:
            assert torch.equal(value, theta.double())
            assert not value.requires_grad
    assert metric.compute().dtype == torch.float64


def test_the_conventions_differ_on_the_same_data():
    steps = _steps(12, seed=1)
    values = {}
    for convention in RULES:
        metric = sm.BatchTopKThreshold(convention=convention, start_step=-1)
        for f in steps:
            metric.update(f)
        values[convention] = metric.compute().item()
    assert len(set(values.values())) == 3, values


def test_defaults_are_the_peers():
    saelens, dictionary_learning, saev = (sm.BatchTopKThreshold(convention=name) for name in RULES)
    assert (saelens.momentum, saelens.start_step, saelens.compute().item()) == (0.01, -1, 0.0)
    assert (1 - dictionary_learning.momentum, dictionary_learning.start_step) == (0.999, 1000)
    assert dictionary_learning.compute().item() == -1.0  # before its first update
    assert (saev.momentum, saev.start_step, saev.compute().item()) == (0.1, -1, 0.0)


def test_dictionary_learning_updates_only_after_its_start_step():
    """Updates at steps > 1000 (trainer steps counted from 0, as its enumerate): the first at the 1002nd step."""
    f = torch.tensor([[0.0, 2.0, 0.5]])
    counted = sm.BatchTopKThreshold(convention="dictionary_learning")
    for _ in range(1001):
        counted.update(f)
    assert counted.compute().item() == -1.0
    assert counted.step == 1001
    counted.update(f)
    assert counted.compute().item() == 0.5
    numbered = sm.BatchTopKThreshold(convention="dictionary_learning")
    numbered.update(f, step=1000)
    assert numbered.compute().item() == -1.0
    numbered.update(f, step=1001)
    assert numbered.compute().item() == 0.5


def test_resuming_from_a_checkpoint_continues_the_steps():
    steps = _steps(30, seed=2)
    whole = sm.BatchTopKThreshold(convention="dictionary_learning", start_step=10)
    for f in steps:
        whole.update(f)
    first = sm.BatchTopKThreshold(convention="dictionary_learning", start_step=10)
    for f in steps[:8]:
        first.update(f)
    resumed = sm.BatchTopKThreshold(convention="dictionary_learning", start_step=10)
    resumed.load_state_dict(first.state_dict())
    assert resumed.step == 8
    for f in steps[8:]:
        resumed.update(f)
    assert torch.equal(resumed.compute(), whole.compute())
    assert whole.compute().item() != -1.0
    # Numbered steps resume the same way.
    numbered = sm.BatchTopKThreshold(convention="dictionary_learning", start_step=10)
    numbered.load_state_dict(first.state_dict())
    for step, f in enumerate(steps[8:], start=8):
        numbered.update(f, step=step)
    assert torch.equal(numbered.compute(), whole.compute())


def test_gradient_accumulation_does_not_shift_the_start_step():
    """Two micro-batches per step with the same step=: the first update is at step start + 1, not earlier."""
    steps = _steps(16, seed=3)
    accumulated = sm.BatchTopKThreshold(convention="dictionary_learning", start_step=4)
    reference = torch.tensor(-1.0)
    for index, f in enumerate(steps):
        step = index // 2
        accumulated.update(f, step=step)
        if step > 4:
            reference = dictionary_learning_rule(reference, f)
        assert torch.equal(accumulated.compute(), reference.double()), index
        if step <= 4:
            assert accumulated.compute().item() == -1.0
    assert accumulated.step == 8


def test_reset_keeps_the_threshold_and_reset_threshold_clears_it():
    metric = sm.BatchTopKThreshold(momentum=0.5)
    metric.update(torch.tensor([[0.0, 2.0]]))
    metric.update(torch.tensor([[4.0, 0.0]]))
    metric.reset()
    assert metric.compute().item() == 2.5
    assert metric.step == 2
    assert metric.update_count == 2
    metric.reset_threshold()
    assert metric.compute().item() == 0.0
    assert metric.step == 0


def test_components_have_their_own_threshold_and_match_the_functional_twin():
    steps = _steps(10, seed=4, components=2)
    metric = sm.BatchTopKThreshold(2, convention="saev")
    theta = torch.zeros(2)
    functional = None
    for f in steps:
        metric.update(f)
        theta = torch.stack([saev_rule(theta[c], f[:, c]) for c in range(2)])
        functional = smf.batchtopk_threshold(f, functional, convention="saev")
        assert torch.equal(metric.compute(), theta.double())
        assert torch.equal(functional, metric.compute())
    assert metric.compute()[0] != metric.compute()[1]


def test_a_metric_collection_routes_step():
    collection = MetricCollection({"theta": sm.BatchTopKThreshold(convention="dictionary_learning", start_step=5)})
    collection.update(learned_activations=torch.tensor([[1.0]]), step=5)
    assert collection.compute()["theta"].item() == -1.0
    collection.update(learned_activations=torch.tensor([[1.0]]), step=6)
    assert collection.compute()["theta"].item() == 1.0


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="'saelens', 'dictionary_learning', 'saev'"):
        sm.BatchTopKThreshold(convention="openai")
    with pytest.raises(ValueError, match="momentum"):
        sm.BatchTopKThreshold(momentum=0.0)
    with pytest.raises(ValueError, match="start_step"):
        sm.BatchTopKThreshold(start_step=-2)
    metric = sm.BatchTopKThreshold()
    f = torch.tensor([[1.0, 0.0]])
    with pytest.raises(TypeError, match="`stpe`"):  # a misspelt keyword still raises
        metric.update(f, stpe=3)
    with pytest.raises(TypeError, match="step"):
        metric.update(f, step=1.0)
    with pytest.raises(TypeError, match="step"):
        metric(f, step=True)
    with pytest.raises(ValueError, match="non-negative"):
        metric.update(f, step=-1)
    with pytest.raises(TypeError, match="`learned_activations`"):
        metric.update(source_activations=f)
    with pytest.raises(ValueError, match="num_components"):
        sm.BatchTopKThreshold(2).update(torch.ones(3, 3, 4))
    assert metric.update_count == 0
    assert metric.step == 0
    assert metric.compute().item() == 0.0


# --- two gloo ranks -------------------------------------------------------------------------------------------------


def _rank_batches(rank: int) -> list[Tensor]:
    """Different data on each rank; at step 2 rank 1's batch is empty, at step 3 rank 0 has no positive value."""
    steps = _steps(8, seed=10 + rank, components=2)
    if rank == 1:
        steps[2] = torch.zeros(0, 2, 10)
    if rank == 0:
        steps[3] = torch.zeros(4, 2, 10)
    return steps


def _threshold_on_rank(rank: int, world_size: int) -> dict[str, Tensor]:
    out = {}
    for convention in RULES:
        metric = sm.BatchTopKThreshold(2, convention=convention, start_step=1)
        values = [metric(f) for f in _rank_batches(rank)]
        out[convention] = torch.stack([*values, metric.compute()])
        out[f"{convention}_state"] = metric.state_dict()["batchtopk_threshold"]
    return out


@pytest.mark.distributed
def test_two_ranks_hold_the_threshold_of_the_global_batch():
    first, second = run_on_ranks(_threshold_on_rank)
    for convention in RULES:
        assert torch.equal(first[convention], second[convention]), convention
        assert torch.equal(first[f"{convention}_state"], second[f"{convention}_state"])
        single = sm.BatchTopKThreshold(2, convention=convention, start_step=1)
        for step, (a, b) in enumerate(zip(_rank_batches(0), _rank_batches(1), strict=True)):
            single.update(torch.cat([a, b]))  # one process fed each step's global batch
            assert torch.equal(first[convention][step], single.compute()), (convention, step)


def test_updates_never_read_tensor_values():
    """On the meta device reading a value raises: an update (with or without step=) needs no host synchronisation."""
    for convention in RULES:
        metric = sm.BatchTopKThreshold(2, convention=convention).to("meta")
        metric.update(torch.empty(4, 2, 10, device="meta"))
        metric(torch.empty(3, 2, 10, device="meta"), step=7)
        metric.update(torch.empty(0, 2, 10, device="meta"))
        assert metric.batchtopk_threshold.device.type == "meta"
