"""Hand-written float64 reference formulas, independent of the package, one item at a time where it is cheap.

Every input is ``[batch, component, feature]``; every per-item result ``[batch, component]``.
"""

from collections.abc import Sequence

import torch
from torch import Tensor


def per_item_l2(decoded: Tensor, source: Tensor, feature_reduction: str = "mean") -> Tensor:
    squared = (decoded.double() - source.double()) ** 2
    return squared.mean(-1) if feature_reduction == "mean" else squared.sum(-1)


def per_item_l1(learned: Tensor) -> Tensor:
    return learned.double().abs().sum(-1)


def per_item_l0(learned: Tensor) -> Tensor:
    return (learned != 0).double().sum(-1)


def per_item_matryoshka_prefixes(
    source: Tensor,
    learned: Tensor,
    decoder_weight: Tensor,
    decoder_bias: Tensor | None,
    prefix_sizes: Sequence[int],
    feature_reduction: str = "mean",
) -> Tensor:
    """``[batch, component, prefix]``: one separate, full decode per prefix (the SAELens way)."""
    source, learned, weight = source.double(), learned.double(), decoder_weight.double()
    errors = []
    for size in prefix_sizes:
        decoded = torch.einsum("bcf,cfd->bcd", learned[..., :size], weight[:, :size])
        if decoder_bias is not None:
            decoded = decoded + decoder_bias.double()
        errors.append(per_item_l2(decoded, source, feature_reduction))
    return torch.stack(errors, dim=-1)


def per_item_matryoshka(
    source: Tensor,
    learned: Tensor,
    decoder_weight: Tensor,
    decoder_bias: Tensor | None,
    prefix_sizes: Sequence[int],
    prefix_weights: Sequence[float] | None = None,
    feature_reduction: str = "mean",
) -> Tensor:
    errors = per_item_matryoshka_prefixes(
        source, learned, decoder_weight, decoder_bias, prefix_sizes, feature_reduction
    )
    weights = prefix_weights if prefix_weights is not None else [1.0 / len(prefix_sizes)] * len(prefix_sizes)
    return (errors * torch.tensor(weights, dtype=torch.float64)).sum(-1)


def sparse_activations(*shape: int, density: float = 0.3, generator: torch.Generator | None = None) -> Tensor:
    """Random activations with exact zeros, as a ReLU SAE produces."""
    values = torch.randn(*shape, generator=generator).abs()
    mask = torch.rand(*shape, generator=generator) < density
    return values * mask


def fvu(decoded: Tensor, source: Tensor) -> Tensor:
    """``[component]`` pooled FVU of every item, two-pass in float64: the mean first, then the deviations."""
    source, decoded = source.double(), decoded.double()
    squared_error = ((decoded - source) ** 2).sum(dim=(0, 2))
    variance = ((source - source.mean(dim=0)) ** 2).sum(dim=(0, 2))
    return squared_error / variance


def feature_density(learned: Tensor) -> Tensor:
    """``[component, feature]`` fraction of items in which each feature is non-zero."""
    return (learned != 0).double().mean(dim=0)


def items_since_fired(stream: Tensor) -> Tensor:
    """``[component, feature]`` items after the last firing in one ordered stream, walking it item by item."""
    _, components, features = stream.shape
    since = torch.zeros(components, features, dtype=torch.int64)
    for item in stream:
        since = torch.where(item != 0, 0, since + 1)
    return since


def lockstep_items_since_fired(streams: Sequence[Tensor]) -> Tensor:
    """Global items since fired when the k-th most recent item of every stream is simultaneous.

    Walks back from the most recent item: the feature's age is the smallest position-from-the-end at which it
    fired on any stream; the answer counts the items of every stream younger than that age.
    """
    components, features = next(s.shape[1:] for s in streams if s.ndim == 3)
    result = torch.zeros(components, features, dtype=torch.int64)
    for c in range(components):
        for i in range(features):
            ages = [position for stream in streams for position, item in enumerate(stream.flip(0)) if item[c, i] != 0]
            age = min(ages) if ages else None
            result[c, i] = sum(len(stream) if age is None else min(age, len(stream)) for stream in streams)
    return result


def sae_batches(
    sizes: Sequence[int], seed: int, *, components: int, d_model: int, d_sae: int
) -> list[dict[str, Tensor]]:
    """Seeded SAE steps of the given batch sizes sharing one decoder: inputs of the collection, by keyword."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(components, d_sae, d_model, generator=generator)
    batches = []
    for size in sizes:
        source = torch.randn(size, components, d_model, generator=generator)
        batches.append(
            {
                "source_activations": source,
                "decoded_activations": source + 0.3 * torch.randn(size, components, d_model, generator=generator),
                "learned_activations": sparse_activations(size, components, d_sae, generator=generator),
                "decoder_weight": weight,
            }
        )
    return batches


def as_dict(value: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
    """A metric's or a collection's compute() result as a dict, to compare both the same way."""
    return value if isinstance(value, dict) else {"value": value}
