"""Input checks shared by the functional core and the metric classes.

Every check looks only at shapes and dtypes, never at values, so validation costs no host-device
synchronisation on an accelerator. Each error names the argument, what was expected and what was received.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import cast

import torch
from torch import Tensor

__all__ = [
    "autocast_disabled",
    "check_batch_size",
    "check_decoder",
    "check_feature_reduction",
    "check_floating",
    "check_nan_strategy",
    "check_prefix_sizes",
    "check_prefix_weights",
    "check_sae_inputs",
    "check_same_shape",
    "check_sparsity_coefficient",
    "computation_dtype",
    "infer_d_model",
    "to_components",
]


def _shape(tensor: Tensor) -> list[int]:
    return list(tensor.shape)


def check_floating(name: str, tensor: object) -> Tensor:
    """Check ``tensor`` is a floating-point tensor; return it."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}.")
    if not tensor.is_floating_point():
        raise TypeError(
            f"`{name}` must be a floating-point tensor (float16, bfloat16, float32 or float64), got {tensor.dtype}."
        )
    return tensor


def computation_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the math runs in: float64 if any input is float64, else float32 (half precision is upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def autocast_disabled(device: torch.device) -> AbstractContextManager[object]:
    """A region where autocast is off on ``device``: the math of every metric runs in float32 or float64."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def infer_d_model(decoder_weight: object, d_sae: int) -> int:
    """``d_model`` as a decoder shows it where no other input has it, read so that errors point at the real fault.

    A ``[..., d_model, d_sae]`` weight is taken as transposed, so that the error says so.
    """
    if not isinstance(decoder_weight, Tensor) or decoder_weight.ndim == 0:
        return 0
    if decoder_weight.ndim >= 2 and decoder_weight.shape[-2] != d_sae and decoder_weight.shape[-1] == d_sae:
        return int(decoder_weight.shape[-2])
    return int(decoder_weight.shape[-1])


def to_components(name: str, tensor: object, num_components: int | None) -> Tensor:
    """Check ``tensor`` is ``[batch, feature]`` or ``[batch, component, feature]`` and view it as the latter.

    Args:
        name: The argument's name, for error messages.
        tensor: The input.
        num_components: The expected component count; ``None`` accepts any (the functional API).

    Returns:
        A ``[batch, component, feature]`` view of ``tensor`` (no copy).
    """
    tensor, _ = component_shape(name, tensor, num_components)
    return tensor.unsqueeze(1) if tensor.ndim == 2 else tensor


def component_shape(name: str, tensor: object, num_components: int | None) -> tuple[Tensor, torch.Size]:
    """The checks of :func:`to_components` without the view: ``tensor`` and the shape its view would have."""
    tensor = check_floating(name, tensor)
    if tensor.ndim in (2, 3) and tensor.shape[-1] == 0:
        raise ValueError(f"`{name}` must have a non-empty feature axis (its last), got shape {_shape(tensor)}.")
    if tensor.ndim == 2 and num_components in (None, 1):
        return tensor, torch.Size((tensor.shape[0], 1, tensor.shape[1]))
    if tensor.ndim == 3 and num_components in (None, tensor.shape[1]):
        return tensor, tensor.shape
    if num_components is None:
        expected = "[batch, feature] or [batch, component, feature]"
    elif num_components == 1:
        expected = "[batch, feature] or [batch, 1, feature] (num_components=1)"
    else:
        expected = f"[batch, {num_components}, feature] (num_components={num_components})"
    raise ValueError(f"`{name}` must have shape {expected}, got {_shape(tensor)}.")


def check_same_shape(name: str, tensor: object, reference_name: str, reference: Tensor) -> Tensor:
    """Check ``tensor`` is a floating-point tensor of exactly the shape of ``reference``."""
    tensor = check_floating(name, tensor)
    if tensor.shape != reference.shape:
        raise ValueError(
            f"`{name}` must have the shape of `{reference_name}`, {_shape(reference)}, got {_shape(tensor)}."
        )
    return tensor


def check_batch_size(name: str, tensor: Tensor, reference_name: str, reference: Tensor) -> None:
    """Check two ``[batch, component, ...]`` inputs agree on batch and component sizes."""
    check_batch_shapes(name, tensor.shape, reference_name, reference.shape)


def check_batch_shapes(name: str, shape: torch.Size, reference_name: str, reference: torch.Size) -> None:
    """:func:`check_batch_size` of two ``[batch, component, ...]`` shapes."""
    if shape[:2] != reference[:2]:
        raise ValueError(
            f"`{name}` and `{reference_name}` must agree on [batch, component]: "
            f"got {list(shape)} and {list(reference)}."
        )


def check_sae_inputs(
    source_activations: object, learned_activations: object, decoded_activations: object, num_components: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Check one step's inputs of the SAE loss and view them as ``[batch, component, ...]``.

    Returns:
        ``(source, learned, decoded)`` as ``[batch, component, d_model]``, ``[batch, component, d_sae]`` and
        ``[batch, component, d_model]`` views.
    """
    source = to_components("source_activations", source_activations, num_components)
    given_source = cast(Tensor, source_activations)  # to_components has checked it is a tensor
    decoded = check_same_shape("decoded_activations", decoded_activations, "source_activations", given_source)
    learned = to_components("learned_activations", learned_activations, source.shape[1])
    check_batch_size("learned_activations", learned, "source_activations", source)
    return source, learned, decoded.view(source.shape)


def check_decoder(
    decoder_weight: object,
    decoder_bias: object,
    *,
    num_components: int,
    source_is_batched_by_component: bool,
    d_sae: int,
    d_model: int,
) -> tuple[Tensor, Tensor | None]:
    """Check a feature-major decoder and view it as ``[component, d_sae, d_model]`` (bias ``[component, d_model]``).

    The decoder is laid out as SAELens and saev store ``W_dec``: one row per dictionary feature. A weight in the
    ``nn.Linear`` orientation ``[d_model, d_sae]`` is rejected with a hint to transpose it.
    """
    weight = check_floating("decoder_weight", decoder_weight)
    component = [num_components] if source_is_batched_by_component else []
    expected = [*component, d_sae, d_model]
    if _shape(weight) != expected:
        hint = ""
        if _shape(weight) == [*component, d_model, d_sae]:
            hint = " It looks model-major (nn.Linear layout); pass its transpose (`weight.mT`)."
        raise ValueError(
            "`decoder_weight` must be feature-major [*component, d_sae, d_model] = "
            f"{expected}, got {_shape(weight)}.{hint}"
        )
    if decoder_bias is None:
        bias = None
    else:
        bias = check_floating("decoder_bias", decoder_bias)
        if _shape(bias) != [*component, d_model]:
            raise ValueError(
                f"`decoder_bias` must have shape [*component, d_model] = {[*component, d_model]}, got {_shape(bias)}."
            )
    if not source_is_batched_by_component:
        weight = weight.unsqueeze(0)
        bias = None if bias is None else bias.unsqueeze(0)
    return weight, bias


def check_prefix_sizes(prefix_sizes: Sequence[int], d_sae: int | None = None) -> tuple[int, ...]:
    """Check Matryoshka prefix widths are positive and strictly increasing (and at most ``d_sae`` when given)."""
    sizes = tuple(prefix_sizes)
    if not sizes:
        raise ValueError("`prefix_sizes` must list at least one prefix width, got [].")
    if any(isinstance(m, bool) or not isinstance(m, int) for m in sizes):
        raise TypeError(f"`prefix_sizes` must be integers, got {list(sizes)}.")
    if sizes[0] < 1 or any(b <= a for a, b in itertools.pairwise(sizes)):
        raise ValueError(f"`prefix_sizes` must be cumulative widths m_1 < m_2 < ... with m_1 >= 1, got {list(sizes)}.")
    if d_sae is not None and sizes[-1] > d_sae:
        raise ValueError(
            f"`prefix_sizes` must not exceed the dictionary size d_sae={d_sae} of `learned_activations`, "
            f"got largest prefix {sizes[-1]}."
        )
    return sizes


def check_prefix_weights(prefix_weights: Sequence[float] | None, num_prefixes: int) -> tuple[float, ...]:
    """Check per-prefix weights (finite, non-negative, one per prefix); ``None`` gives ``1/P`` each."""
    if prefix_weights is None:
        return (1.0 / num_prefixes,) * num_prefixes
    weights = tuple(float(w) for w in prefix_weights)
    if len(weights) != num_prefixes:
        raise ValueError(
            f"`prefix_weights` must have one weight per prefix ({num_prefixes}), got {len(weights)}: {list(weights)}."
        )
    if any(not (0.0 <= w < float("inf")) for w in weights):
        raise ValueError(f"`prefix_weights` must be finite and non-negative, got {list(weights)}.")
    return weights


def check_feature_reduction(feature_reduction: object) -> None:
    """Check the reduction over the model dimension is ``"mean"`` or ``"sum"``."""
    if feature_reduction not in ("mean", "sum"):
        raise ValueError(f"`feature_reduction` must be 'mean' or 'sum', got {feature_reduction!r}.")


def check_nan_strategy(nan_strategy: object) -> None:
    """Check the handling of non-finite items is ``"propagate"``, ``"ignore"`` or ``"error"``."""
    if nan_strategy not in ("propagate", "ignore", "error"):
        raise ValueError(f"`nan_strategy` must be 'propagate', 'ignore' or 'error', got {nan_strategy!r}.")


def check_sparsity_coefficient(coefficient: object, num_components: int, *, check_values: bool) -> float | Tensor:
    """Check a sparsity coefficient: a non-negative number, or a 0-d / ``[num_components]`` floating tensor.

    Args:
        coefficient: The coefficient.
        num_components: The component count it must match when it is a tensor.
        check_values: Also reject negative or non-finite tensor values. This reads the tensor, which synchronises
            with its device, so it is done when a metric's coefficient is set, not on every update.

    Returns:
        The coefficient as a ``float``, or the (unchanged) tensor.
    """
    if isinstance(coefficient, Tensor):
        if not coefficient.is_floating_point():
            raise TypeError(f"`sparsity_coefficient` must be a floating-point tensor, got {coefficient.dtype}.")
        if coefficient.ndim != 0 and list(coefficient.shape) != [num_components]:
            raise ValueError(
                f"`sparsity_coefficient` must be a number, a 0-d tensor or one value per component, "
                f"shape [{num_components}], got shape {_shape(coefficient)}."
            )
        if check_values and not bool(((coefficient >= 0) & coefficient.isfinite()).all()):
            raise ValueError(f"`sparsity_coefficient` must be finite and non-negative, got {coefficient.tolist()}.")
        return coefficient
    if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float)):
        raise TypeError(
            f"`sparsity_coefficient` must be a non-negative number or a tensor, got {type(coefficient).__name__}."
        )
    if not (0.0 <= coefficient < float("inf")):
        raise ValueError(f"`sparsity_coefficient` must be finite and non-negative, got {coefficient}.")
    return float(coefficient)
