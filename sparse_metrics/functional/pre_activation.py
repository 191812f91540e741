r"""Pre-activation loss (Anthropic; SAELens ``calculate_pre_act_loss``): pushes dead latents' pre-activations up.

.. math:: \mathrm{pre\_act}_{bc} = \sum_i \mathrm{relu}(\theta_{ci} - h_{bci})\, d_{ci}\, \lVert W_{ci} \rVert_2

with :math:`d_{ci} = 1` for a dead latent (SAELens: only the dead latents, ``dead_mask``), or 1 for every latent
(lm_saes). The pre-activations, the threshold and the decoder all get gradients (SAELens detaches nothing).
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from sparse_metrics._validation import (
    autocast_disabled,
    check_floating,
    computation_dtype,
    to_components,
)
from sparse_metrics.functional._output import batch_output
from sparse_metrics.functional.sparsity import _checked_row_norms

__all__ = ["pre_activation_loss"]


def _pre_activation_penalty(
    pre_activations: Float[Tensor, "batch component d_sae"],
    threshold: Float[Tensor, "component d_sae"],
    row_norms: Tensor | None,
    dead_mask: Bool[Tensor, "component d_sae"] | None,
) -> Float[Tensor, "batch component"]:
    """Per-item ``sum_i relu(theta_i - h_i) * dead_i * ||W_i||`` (each factor optional), float32/64."""
    dtype = computation_dtype(pre_activations, threshold, *([] if row_norms is None else [row_norms]))
    with autocast_disabled(pre_activations.device):
        below = (threshold.to(dtype) - pre_activations.to(dtype)).relu()
        if dead_mask is not None:
            below = below * dead_mask
        if row_norms is not None:
            below = below * row_norms.to(dtype)
        return below.sum(dim=-1)


def _feature_input(name: str, value: object, expected: list[int], component_axis: bool) -> Tensor:
    """A ``[*component, d_sae]`` input viewed as ``[component, d_sae]``."""
    if not isinstance(value, Tensor) or list(value.shape) != expected:
        shown = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"`{name}` must have shape [*component, d_sae] = {expected}, got {shown}.")
    return value if component_axis else value.unsqueeze(0)


def _pre_activation_update(
    pre_activations: Tensor,
    threshold: Tensor,
    decoder_weight: Tensor | None,
    dead_mask: Tensor | None,
    num_components: int | None = None,
) -> Float[Tensor, "batch component"]:
    """Validate the inputs; the per-item loss ``[batch, component]``."""
    h = to_components("pre_activations", pre_activations, num_components)
    axis = pre_activations.ndim == 3
    expected = list(h.shape[1:]) if axis else [h.shape[-1]]
    theta = _feature_input("threshold", check_floating("threshold", threshold), expected, axis)
    mask = None
    if dead_mask is not None:
        if not isinstance(dead_mask, Tensor) or dead_mask.dtype != torch.bool:
            shown = dead_mask.dtype if isinstance(dead_mask, Tensor) else type(dead_mask).__name__
            raise TypeError(f"`dead_mask` must be a torch.bool tensor (True for a dead latent), got {shown}.")
        mask = _feature_input("dead_mask", dead_mask, expected, axis)
    norms = None
    if decoder_weight is not None:
        norms = _checked_row_norms(decoder_weight, h, axis)
    return _pre_activation_penalty(h, theta, norms, mask)


def pre_activation_loss(
    pre_activations: Float[Tensor, "batch *component d_sae"],
    threshold: Float[Tensor, "*component d_sae"],
    *,
    decoder_weight: Float[Tensor, "*component d_sae d_model"] | None = None,
    dead_mask: Bool[Tensor, "*component d_sae"] | None = None,
    keep_batch_dim: bool = False,
) -> Float[Tensor, "..."]:
    """Pre-activation loss of a batch: the mean over items of ``sum_i relu(theta_i - h_i) * dead_i * ||W_dec,i||``.

    Args:
        pre_activations: The encoder's pre-activations ``h``, ``[batch, d_sae]`` or ``[batch, component, d_sae]``.
        threshold: The JumpReLU threshold ``[*component, d_sae]``.
        decoder_weight: The feature-major decoder ``[*component, d_sae, d_model]``: weight each latent by its row's
            L2 norm; ``None``: no weight.
        dead_mask: Boolean ``[*component, d_sae]``, True for a dead latent: only those count (SAELens); ``None``:
            every latent (lm_saes).
        keep_batch_dim: Return the per-item values ``[batch, *component]`` instead of their batch mean.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import pre_activation_loss
        >>> h = torch.tensor([[-1.0, 0.5], [0.0, 2.0]])
        >>> threshold = torch.tensor([0.5, 1.0])
        >>> pre_activation_loss(h, threshold)  # ((1.5 + 0.5) + (0.5 + 0)) / 2
        tensor(1.2500)
        >>> pre_activation_loss(h, threshold, dead_mask=torch.tensor([True, False]))  # (1.5 + 0.5) / 2
        tensor(1.)
    """
    per_item = _pre_activation_update(pre_activations, threshold, decoder_weight, dead_mask)
    return batch_output(per_item, pre_activations.ndim == 3, keep_batch_dim)
