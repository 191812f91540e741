r"""L0 norm: the number of dictionary features active (non-zero) on an item.

.. math:: \mathrm{L0}_b = \sum_{i} \mathbb{1}[f_{bi} \neq 0]
"""

import torch
from jaxtyping import Float
from torch import Tensor

from sparse_metrics._validation import computation_dtype, to_components
from sparse_metrics.functional._blocks import blocks_on_cpu, small, transformed_blocks
from sparse_metrics.functional._output import batch_output


def _l0_norm_update(learned_activations: Tensor, num_components: int | None = None) -> Float[Tensor, "batch component"]:
    """Validate the input and return the per-item count of active features, ``[batch, component]``."""
    return _count_active(to_components("learned_activations", learned_activations, num_components))


def _count_active(learned: Float[Tensor, "batch *component d_sae"]) -> Float[Tensor, "batch component"]:
    """Per-item count of non-zero features of a validated input (NaN counts as non-zero), with no autograd graph.

    ``learned`` is ``[batch, component, d_sae]``, or ``[batch, d_sae]`` for one component (its counts ``[batch, 1]``
    all the same). A count is not differentiable: it is computed without grad, so autograd keeps nothing of the input
    alive.
    """
    with torch.no_grad():
        return _count_nonzero(learned, computation_dtype(learned))


def _count_nonzero(values: Tensor, dtype: torch.dtype) -> Tensor:
    """Non-zeros over the last axis, in ``dtype``, which a 2-D ``values`` keeps (``[batch, 1]``).

    On a CPU the input is counted in blocks of items (see :mod:`sparse_metrics.functional._blocks`): each block's
    ``f != 0`` is written as 0/1 into one float buffer and summed, two vectorised passes. The fused 0-"norm" is a
    scalar loop with a data-dependent branch: it runs at the speed of the branch predictor, 4-10x slower at a density
    of 50% than at 1%, and 2x slower than the two passes even for a ``[64, 256]`` input. Elsewhere the fused 0-"norm"
    is one kernel and is used as it is.
    """
    keepdim = values.ndim == 2
    if not blocks_on_cpu(values):
        per_item: Tensor = torch.linalg.vector_norm(values, ord=0, dim=-1, keepdim=keepdim, dtype=dtype)
        return per_item
    if small(values):
        fired = torch.ne(values, 0, out=values.new_empty(values.shape, dtype=dtype))
        return torch.sum(fired, dim=-1, keepdim=keepdim)
    counts = values.new_empty((*values.shape[:-1], 1) if keepdim else values.shape[:-1], dtype=dtype)
    for items, fired in transformed_blocks(values, lambda block, out: torch.ne(block, 0, out=out), dtype):
        torch.sum(fired, dim=-1, keepdim=keepdim, out=counts[items])
    return counts


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
