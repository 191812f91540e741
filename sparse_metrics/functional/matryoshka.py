r"""Matryoshka reconstruction loss: the reconstruction error of nested prefixes of the dictionary.

With cumulative prefix widths :math:`m_1 < \dots < m_P` and a feature-major decoder :math:`W \in
\mathbb{R}^{d_{sae} \times d_{model}}`, prefix :math:`p` reconstructs the input from its first :math:`m_p` features:

.. math:: \hat x^{(p)} = f_{:, :m_p} W_{:m_p} + b, \qquad
   \mathrm{loss}_b = \sum_p w_p \operatorname{reduce}_d \big(x_{bd} - \hat x^{(p)}_{bd}\big)^2

The reconstructions are built incrementally, :math:`\hat x^{(p)} = \hat x^{(p-1)} + f_{:, m_{p-1}:m_p}
W_{m_{p-1}:m_p}`, so all prefixes together cost one full decode rather than one decode each.
"""

from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from sparse_metrics._config import FeatureReduction
from sparse_metrics._validation import (
    autocast_disabled,
    check_batch_size,
    check_decoder,
    check_feature_reduction,
    check_prefix_sizes,
    check_prefix_weights,
    computation_dtype,
    to_components,
)
from sparse_metrics.functional._output import batch_output
from sparse_metrics.functional.l2_reconstruction import _reduce_over_model, _reduce_squared_error


def matryoshka_prefix_reconstructions(
    learned_activations: Float[Tensor, "batch *component d_sae"],
    decoder_weight: Float[Tensor, "*component d_sae d_model"],
    decoder_bias: Float[Tensor, "*component d_model"] | None = None,
    *,
    prefix_sizes: Sequence[int],
) -> Iterator[Float[Tensor, "batch *component d_model"]]:
    """Yield the reconstruction of each nested prefix of the dictionary, smallest first.

    Prefix ``p`` decodes the first ``m_p`` features: ``x_hat_p = f[..., :m_p] @ W[..., :m_p, :] + b``. Each
    reconstruction adds only the next block of features to the previous one, so all of them together cost one decode.

    Args:
        learned_activations: Feature activations, ``[batch, d_sae]`` or ``[batch, component, d_sae]``.
        decoder_weight: Feature-major decoder ``[*component, d_sae, d_model]`` (SAELens' and saev's ``W_dec``).
        decoder_bias: Decoder bias ``[*component, d_model]``, or ``None``.
        prefix_sizes: Cumulative widths ``m_1 < ... < m_P <= d_sae``.

    Yields:
        ``x_hat_p``, ``[batch, *component, d_model]``, for ``p = 1 ... P``.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import matryoshka_prefix_reconstructions
        >>> f = torch.tensor([[1.0, 2.0, 3.0]])
        >>> w_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> list(matryoshka_prefix_reconstructions(f, w_dec, prefix_sizes=[1, 3]))
        [tensor([[1., 0.]]), tensor([[4., 5.]])]
    """
    learned = to_components("learned_activations", learned_activations, None)
    sizes = check_prefix_sizes(prefix_sizes, d_sae=learned.shape[-1])
    d_model = decoder_weight.shape[-1] if isinstance(decoder_weight, Tensor) and decoder_weight.ndim else 0
    weight, bias = check_decoder(
        decoder_weight,
        decoder_bias,
        num_components=learned.shape[1],
        source_is_batched_by_component=learned_activations.ndim == 3,
        d_sae=learned.shape[-1],
        d_model=d_model,
    )
    for reconstruction in _prefix_reconstructions(learned, weight, bias, sizes):
        yield reconstruction if learned_activations.ndim == 3 else reconstruction.squeeze(1)


def _prefix_reconstructions(
    learned: Float[Tensor, "batch component d_sae"],
    weight: Float[Tensor, "component d_sae d_model"],
    bias: Float[Tensor, "component d_model"] | None,
    prefix_sizes: Sequence[int],
) -> Iterator[Float[Tensor, "batch component d_model"]]:
    """:func:`matryoshka_prefix_reconstructions` of validated ``[batch, component, ...]`` inputs."""
    dtype = computation_dtype(learned, weight, *([] if bias is None else [bias]))
    # Blocks of features m_{p-1}:m_p, plus the unused tail after m_P. ``split`` rather than slicing: the backward of a
    # split concatenates the blocks' gradients into one tensor, where each slice's backward would scatter its
    # gradient into a zero tensor of the full [batch, d_sae] size (P full-size allocations and additions).
    widths = [stop - start for start, stop in zip((0, *prefix_sizes[:-1]), prefix_sizes, strict=True)]
    tail = learned.shape[-1] - prefix_sizes[-1]
    widths_with_tail = [*widths, tail] if tail else widths
    # [component, batch, d_sae]: a batched matmul over components per block of features.
    feature_blocks = torch.split(learned.transpose(0, 1), widths_with_tail, dim=-1)
    decoder_blocks = torch.split(weight, widths_with_tail, dim=-2)
    reconstruction: Tensor | None = None
    for features, decoder in zip(feature_blocks[: len(widths)], decoder_blocks, strict=False):
        with autocast_disabled(learned.device):  # an autocast region would run the decode in half precision
            block = torch.matmul(features.to(dtype), decoder.to(dtype))
        if reconstruction is None:
            reconstruction = block if bias is None else block + bias.to(dtype).unsqueeze(1)
        else:
            reconstruction = reconstruction + block
        yield reconstruction.transpose(0, 1)


def _matryoshka_update(
    source_activations: Tensor,
    learned_activations: Tensor,
    decoder_weight: Tensor,
    decoder_bias: Tensor | None,
    prefix_sizes: Sequence[int],
    num_components: int | None = None,
    feature_reduction: FeatureReduction = "mean",
) -> Float[Tensor, "batch component prefix"]:
    """Validate the inputs and return the per-item error of every prefix, ``[batch, component, prefix]``."""
    check_feature_reduction(feature_reduction)
    source = to_components("source_activations", source_activations, num_components)
    learned = to_components("learned_activations", learned_activations, source.shape[1])
    check_batch_size("learned_activations", learned, "source_activations", source)
    sizes = check_prefix_sizes(prefix_sizes, d_sae=learned.shape[-1])
    weight, bias = check_decoder(
        decoder_weight,
        decoder_bias,
        num_components=source.shape[1],
        source_is_batched_by_component=source_activations.ndim == 3,
        d_sae=learned.shape[-1],
        d_model=source.shape[-1],
    )
    return _prefix_errors(source, learned, weight, bias, sizes, feature_reduction)


def _prefix_errors(
    source: Float[Tensor, "batch component d_model"],
    learned: Float[Tensor, "batch component d_sae"],
    weight: Float[Tensor, "component d_sae d_model"],
    bias: Float[Tensor, "component d_model"] | None,
    prefix_sizes: Sequence[int],
    feature_reduction: FeatureReduction,
    full_dictionary_error: Float[Tensor, "batch component"] | None = None,
) -> Float[Tensor, "batch component prefix"]:
    """Per-item error of every prefix of validated inputs.

    ``full_dictionary_error``, the per-item squared error summed over ``d_model`` of a reconstruction from the whole
    dictionary that the caller already has, is taken as the last prefix's error when that prefix is the whole
    dictionary, which is then not decoded again. Only correct where that reconstruction is exactly ``f W + b``.
    """
    reuse = full_dictionary_error is not None and prefix_sizes[-1] == learned.shape[-1]
    decoded_sizes = prefix_sizes[:-1] if reuse else prefix_sizes
    target = source.to(computation_dtype(source, learned, weight, *([] if bias is None else [bias])))
    errors = [
        _reduce_squared_error(reconstruction - target, feature_reduction)
        for reconstruction in (_prefix_reconstructions(learned, weight, bias, decoded_sizes) if decoded_sizes else ())
    ]
    if reuse:
        assert full_dictionary_error is not None  # for the type checker: reuse implies it
        errors.append(_reduce_over_model(full_dictionary_error.to(target.dtype), source.shape[-1], feature_reduction))
    return torch.stack(errors, dim=-1)


def _local_prefix_widths(prefix_sizes: Sequence[int], offset: int, local_features: int) -> list[int]:
    """The number of its features a shard (global features from ``offset``) puts in each prefix."""
    return [min(max(size - offset, 0), local_features) for size in prefix_sizes]


def _partial_prefix_decodes(
    learned: Float[Tensor, "batch component d_local"],
    weight: Float[Tensor, "component d_local d_model"],
    local_sizes: Sequence[int],
    bias: Tensor | None,
) -> Float[Tensor, "prefix batch component d_model"]:
    """This shard's part of each prefix's decode, without the bias: ``f[:, :w_p] W[:w_p]`` for its local widths."""
    dtype = computation_dtype(learned, weight, *([] if bias is None else [bias]))
    widths = [stop - start for start, stop in zip((0, *local_sizes[:-1]), local_sizes, strict=True)]
    tail = learned.shape[-1] - local_sizes[-1]
    feature_blocks = torch.split(learned.transpose(0, 1), [*widths, tail], dim=-1)
    decoder_blocks = torch.split(weight, [*widths, tail], dim=-2)
    partial: Tensor | None = None
    partials = []
    for features, decoder in zip(feature_blocks[: len(widths)], decoder_blocks, strict=False):
        with autocast_disabled(learned.device):
            block = torch.matmul(features.to(dtype), decoder.to(dtype))
        partial = block if partial is None else partial + block
        partials.append(partial.transpose(0, 1))
    return torch.stack(partials)


def _prefix_errors_from_partials(
    source: Float[Tensor, "batch component d_model"],
    decodes: Float[Tensor, "prefix batch component d_model"] | None,
    bias: Float[Tensor, "component d_model"] | None,
    feature_reduction: FeatureReduction,
    full_dictionary_error: Float[Tensor, "batch component"] | None = None,
) -> Float[Tensor, "batch component prefix"]:
    """Per-item error of every prefix from the prefixes' decodes summed over the shards (bias not yet added)."""
    dtype = source.dtype if decodes is None else torch.promote_types(source.dtype, decodes.dtype)
    target = source.to(dtype)
    errors = []
    if decodes is not None:
        reconstructions = decodes if bias is None else decodes + bias.to(decodes.dtype)
        errors = [
            _reduce_squared_error(reconstruction - target, feature_reduction) for reconstruction in reconstructions
        ]
    if full_dictionary_error is not None:
        errors.append(_reduce_over_model(full_dictionary_error.to(target.dtype), source.shape[-1], feature_reduction))
    return torch.stack(errors, dim=-1)


def _combine_prefixes(
    prefix_errors: Float[Tensor, "batch component prefix"], prefix_weights: Float[Tensor, " prefix"]
) -> Float[Tensor, "batch component"]:
    """Weighted sum of the per-prefix errors.

    Elementwise rather than a matmul, which an autocast region would run in half precision.
    """
    return (prefix_errors * prefix_weights.to(prefix_errors.dtype)).sum(dim=-1)


def matryoshka_prefix_errors(
    source_activations: Float[Tensor, "batch *component d_model"],
    learned_activations: Float[Tensor, "batch *component d_sae"],
    decoder_weight: Float[Tensor, "*component d_sae d_model"],
    decoder_bias: Float[Tensor, "*component d_model"] | None = None,
    *,
    prefix_sizes: Sequence[int],
    feature_reduction: FeatureReduction = "mean",
) -> Float[Tensor, "batch *component prefix"]:
    """Per-item reconstruction error of each nested prefix, ``[batch, *component, prefix]``.

    Args:
        source_activations: The SAE's input, ``[batch, d_model]`` or ``[batch, component, d_model]``.
        learned_activations: Feature activations, ``[batch, d_sae]`` or ``[batch, component, d_sae]``.
        decoder_weight: Feature-major decoder ``[*component, d_sae, d_model]`` (SAELens' and saev's ``W_dec``).
        decoder_bias: Decoder bias ``[*component, d_model]``, or ``None``.
        prefix_sizes: Cumulative widths ``m_1 < ... < m_P <= d_sae``; list ``d_sae`` to include the full dictionary.
        feature_reduction: ``"mean"`` or ``"sum"`` of the squared error over the model dimension.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import matryoshka_prefix_errors
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> f = torch.tensor([[1.0, 2.0]])
        >>> w_dec = torch.eye(2)
        >>> matryoshka_prefix_errors(x, f, w_dec, prefix_sizes=[1, 2], feature_reduction="sum")
        tensor([[4., 0.]])
    """
    per_item = _matryoshka_update(
        source_activations, learned_activations, decoder_weight, decoder_bias, prefix_sizes, None, feature_reduction
    )
    return per_item if source_activations.ndim == 3 else per_item.squeeze(1)


def matryoshka_reconstruction_loss(
    source_activations: Float[Tensor, "batch *component d_model"],
    learned_activations: Float[Tensor, "batch *component d_sae"],
    decoder_weight: Float[Tensor, "*component d_sae d_model"],
    decoder_bias: Float[Tensor, "*component d_model"] | None = None,
    *,
    prefix_sizes: Sequence[int],
    prefix_weights: Sequence[float] | None = None,
    feature_reduction: FeatureReduction = "mean",
    keep_batch_dim: bool = False,
) -> Float[Tensor, "..."]:
    """Matryoshka reconstruction loss: the weighted sum over prefixes of each prefix's reconstruction error.

    The defaults (``feature_reduction="mean"``, weights ``1/P``) reproduce saev; ``feature_reduction="sum"`` with
    ``prefix_weights=[1] * P`` reproduces SAELens.

    Args:
        source_activations: The SAE's input, ``[batch, d_model]`` or ``[batch, component, d_model]``.
        learned_activations: Feature activations, ``[batch, d_sae]`` or ``[batch, component, d_sae]``.
        decoder_weight: Feature-major decoder ``[*component, d_sae, d_model]``.
        decoder_bias: Decoder bias ``[*component, d_model]``, or ``None``.
        prefix_sizes: Cumulative widths ``m_1 < ... < m_P <= d_sae``.
        prefix_weights: One non-negative weight per prefix; ``None`` gives ``1/P`` each (the mean over prefixes).
        feature_reduction: ``"mean"`` or ``"sum"`` of the squared error over the model dimension.
        keep_batch_dim: Return the per-item values ``[batch, *component]`` instead of their batch mean.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import matryoshka_reconstruction_loss
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> f = torch.tensor([[1.0, 2.0]])
        >>> matryoshka_reconstruction_loss(x, f, torch.eye(2), prefix_sizes=[1, 2], feature_reduction="sum")
        tensor(2.)
    """
    sizes = check_prefix_sizes(prefix_sizes)
    weights = check_prefix_weights(prefix_weights, len(sizes))
    prefix_errors = _matryoshka_update(
        source_activations, learned_activations, decoder_weight, decoder_bias, sizes, None, feature_reduction
    )
    # Weights built in the errors' dtype: a float32 1/3 would cost float64 inputs their precision.
    per_item = _combine_prefixes(
        prefix_errors, torch.tensor(weights, dtype=prefix_errors.dtype, device=prefix_errors.device)
    )
    return batch_output(per_item, source_activations.ndim == 3, keep_batch_dim)
