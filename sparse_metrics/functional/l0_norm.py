r"""L0 norm: the number of dictionary features active (non-zero) on an item.

.. math:: \mathrm{L0}_b = \sum_{i} \mathbb{1}[f_{bi} \neq 0]
"""

import torch
from jaxtyping import Float
from torch import Tensor

from sparse_metrics._validation import computation_dtype, to_components
from sparse_metrics.functional._output import batch_output


def _l0_norm_update(learned_activations: Tensor, num_components: int | None = None) -> Float[Tensor, "batch component"]:
    """Validate the input and return the per-item count of active features, ``[batch, component]``."""
    return _count_active(to_components("learned_activations", learned_activations, num_components))


def _count_active(learned: Float[Tensor, "batch component d_sae"]) -> Float[Tensor, "batch component"]:
    """Per-item count of non-zero features of a validated input."""
    # The 0-"norm" counts non-zeros in one fused pass, with no [batch, d_sae] boolean temporary. A count is not
    # differentiable, so the input is detached rather than kept alive by autograd.
    per_item: Tensor = torch.linalg.vector_norm(learned.detach(), ord=0, dim=-1, dtype=computation_dtype(learned))
    return per_item


def l0_norm(
    learned_activations: Float[Tensor, "batch *component d_sae"], *, keep_batch_dim: bool = False
) -> Float[Tensor, "..."]:
    """Mean number of active features per item (or per-item counts).

    Args:
        learned_activations: The SAE's feature activations, ``[batch, d_sae]`` or ``[batch, component, d_sae]``.
        keep_batch_dim: Return the per-item counts ``[batch, *component]`` instead of their batch mean.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import l0_norm
        >>> l0_norm(torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 3.0]]))
        tensor(1.5000)
    """
    per_item = _l0_norm_update(learned_activations)
    return batch_output(per_item, learned_activations.ndim == 3, keep_batch_dim)
