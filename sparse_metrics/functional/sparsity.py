r"""Sparsity penalty: a coefficient times the L1 absolute loss.

.. math:: \mathrm{sparsity}_{bc} = \lambda_c \sum_{i} |f_{bci}|
"""

from jaxtyping import Float
from torch import Tensor

from sparse_metrics._validation import check_sparsity_coefficient
from sparse_metrics.functional._output import batch_output
from sparse_metrics.functional.l1_absolute import _l1_absolute_update


def _sparsity_from_l1(
    l1_per_item: Float[Tensor, "batch component"], sparsity_coefficient: float | Tensor
) -> Float[Tensor, "batch component"]:
    """Scale per-item L1 values by the coefficient (a number, or one per component)."""
    if isinstance(sparsity_coefficient, Tensor):
        sparsity_coefficient = sparsity_coefficient.to(device=l1_per_item.device, dtype=l1_per_item.dtype)
    return l1_per_item * sparsity_coefficient


def _sparsity_update(
    learned_activations: Tensor, sparsity_coefficient: float | Tensor, num_components: int | None = None
) -> Float[Tensor, "batch component"]:
    """Validate the inputs and return the per-item penalty, ``[batch, component]``.

    The coefficient's shape and type are checked here; its sign only where it is a Python number, since reading a
    tensor's values would synchronise with the device on every call (the metric checks them once, when set).
    """
    l1_per_item = _l1_absolute_update(learned_activations, num_components)
    coefficient = check_sparsity_coefficient(sparsity_coefficient, l1_per_item.shape[1], check_values=False)
    return _sparsity_from_l1(l1_per_item, coefficient)


def sparsity_loss(
    learned_activations: Float[Tensor, "batch *component d_sae"],
    sparsity_coefficient: float | Float[Tensor, "*component"] = 1e-3,
    *,
    keep_batch_dim: bool = False,
) -> Float[Tensor, "..."]:
    """Sparsity penalty of a batch: ``sparsity_coefficient`` times the L1 absolute loss.

    Args:
        learned_activations: The SAE's feature activations, ``[batch, d_sae]`` or ``[batch, component, d_sae]``.
        sparsity_coefficient: A non-negative number, or a ``[component]`` tensor (one coefficient per component).
        keep_batch_dim: Return the per-item values ``[batch, *component]`` instead of their batch mean.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import sparsity_loss
        >>> sparsity_loss(torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 3.0]]), 0.5)
        tensor(1.5000)
    """
    per_item = _sparsity_update(learned_activations, sparsity_coefficient)
    return batch_output(per_item, learned_activations.ndim == 3, keep_batch_dim)
