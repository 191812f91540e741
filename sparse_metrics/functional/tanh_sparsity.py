r"""tanh sparsity penalty (Anthropic, SAELens ``jumprelu_sparsity_loss_mode="tanh"``): a smooth, saturating L0.

.. math:: \mathrm{tanh\_sparsity}_{bc} = \sum_i \tanh\!\big(s\, f_{bci}\, \lVert W_{ci} \rVert_2\big)

with scale :math:`s` (4 by default) and, unless ``decoder_norm_weighting=False``, each activation weighted by the L2
norm of its feature-major decoder row. As in SAELens there is no absolute value (JumpReLU activations are
non-negative): the gradient at :math:`f = 0` is :math:`s \lVert W_{ci} \rVert_2` per item, and a negative activation
lowers the penalty.
"""

from jaxtyping import Float
from torch import Tensor

from sparse_metrics._validation import (
    autocast_disabled,
    computation_dtype,
    to_components,
)
from sparse_metrics.functional._output import batch_output
from sparse_metrics.functional.sparsity import _checked_row_norms

__all__ = ["tanh_sparsity_loss"]


def _tanh_penalty(
    learned: Float[Tensor, "batch component d_sae"], row_norms: Tensor | None, scale: float
) -> Float[Tensor, "batch component"]:
    """Per-item ``sum_i tanh(scale * f_i * ||W_i||)`` (no weight without ``row_norms``), float32/64."""
    dtype = row_norms.dtype if row_norms is not None else computation_dtype(learned)
    with autocast_disabled(learned.device):
        scaled = scale * learned.to(dtype)
        if row_norms is not None:
            scaled = scaled * row_norms
        return scaled.tanh().sum(dim=-1)


def check_scale(scale: object) -> float:
    """The tanh scale: a number > 0."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
        raise ValueError(f"`scale` must be a number > 0, got {scale!r}.")
    return float(scale)


def _tanh_sparsity_update(
    learned_activations: Tensor, decoder_weight: Tensor | None, scale: float, num_components: int | None = None
) -> Float[Tensor, "batch component"]:
    """Validate the inputs; the per-item penalty ``[batch, component]``."""
    learned = to_components("learned_activations", learned_activations, num_components)
    if decoder_weight is None:
        return _tanh_penalty(learned, None, scale)
    return _tanh_penalty(learned, _checked_row_norms(decoder_weight, learned, learned_activations.ndim == 3), scale)


def tanh_sparsity_loss(
    learned_activations: Float[Tensor, "batch *component d_sae"],
    *,
    decoder_weight: Float[Tensor, "*component d_sae d_model"] | None = None,
    scale: float = 4.0,
    keep_batch_dim: bool = False,
) -> Float[Tensor, "..."]:
    """Tanh sparsity penalty of a batch: the mean over items of ``sum_i tanh(scale * f_i * ||W_dec,i||)``.

    Args:
        learned_activations: The SAE's feature activations, ``[batch, d_sae]`` or ``[batch, component, d_sae]``.
        decoder_weight: The feature-major decoder ``[*component, d_sae, d_model]``: each activation is weighted by
            its row's L2 norm (SAELens); ``None``: no weight.
        scale: The scale ``s`` inside the tanh (SAELens' ``jumprelu_tanh_scale``, 4 by default).
        keep_batch_dim: Return the per-item values ``[batch, *component]`` instead of their batch mean.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import tanh_sparsity_loss
        >>> decoder_weight = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # row norms 5, 1
        >>> tanh_sparsity_loss(torch.tensor([[0.0, 0.25], [1.0, 0.0]]), decoder_weight=decoder_weight)
        tensor(0.8808)
    """
    per_item = _tanh_sparsity_update(learned_activations, decoder_weight, check_scale(scale))
    return batch_output(per_item, learned_activations.ndim == 3, keep_batch_dim)
