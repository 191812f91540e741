r"""L1 absolute loss: the sum over dictionary features of the absolute learned activation.

.. math:: \mathrm{L1}_b = \sum_{i} |f_{bi}|
"""

import torch
from jaxtyping import Float
from torch import Tensor

from sparse_metrics._validation import computation_dtype, to_components
from sparse_metrics.functional._output import batch_output


def _l1_absolute_update(
    learned_activations: Tensor, num_components: int | None = None
) -> Float[Tensor, "batch component"]:
    """Validate the input and return the per-item L1 norm, ``[batch, component]``."""
    learned = to_components("learned_activations", learned_activations, num_components)
    # One fused pass over [batch, d_sae], accumulating in float32 even for half inputs; no |f| temporary.
    per_item: Tensor = torch.linalg.vector_norm(learned, ord=1, dim=-1, dtype=computation_dtype(learned))
    return per_item


def l1_absolute_loss(
    learned_activations: Float[Tensor, "batch *component d_sae"], *, keep_batch_dim: bool = False
) -> Float[Tensor, "..."]:
    """L1 absolute loss of a batch.

    Args:
        learned_activations: The SAE's feature activations, ``[batch, d_sae]`` or ``[batch, component, d_sae]``.
        keep_batch_dim: Return the per-item values ``[batch, *component]`` instead of their batch mean.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import l1_absolute_loss
        >>> l1_absolute_loss(torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 3.0]]), keep_batch_dim=True)
        tensor([3., 3.])
    """
    per_item = _l1_absolute_update(learned_activations)
    return batch_output(per_item, learned_activations.ndim == 3, keep_batch_dim)
