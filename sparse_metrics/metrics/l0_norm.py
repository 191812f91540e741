"""L0 norm metric: active features per item."""

from typing import Any, ClassVar

import torch
from torch import Tensor

from sparse_metrics._config import NumComponents, validate_arguments
from sparse_metrics.functional.l0_norm import _l0_norm_update
from sparse_metrics.metrics._base import ItemMeanMetric

__all__ = ["L0NormMetric"]


class L0NormMetric(ItemMeanMetric):
    r"""Number of active (non-zero) dictionary features, averaged over items.

    .. math:: \mathrm{L0} = \frac{1}{N} \sum_{b=1}^{N} \sum_{i=1}^{d_{sae}} \mathbb{1}[f_{bi} \neq 0]

    ``update(learned_activations, **kwargs)`` takes ``[batch, d_sae]`` or ``[batch, component, d_sae]``.
    ``compute()`` returns ``[component]`` (0-d for one component), or per-item counts with ``keep_batch_dim=True``.
    A feature counts as active when it is non-zero, negative values included (saev counts ``f > 0``, the same
    thing after a ReLU).

    Args:
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        keep_batch_dim: Keep per-item values.
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from sparse_metrics import L0NormMetric
        >>> metric = L0NormMetric()
        >>> metric(learned_activations=torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 3.0]]))
        tensor(1.5000)
    """

    is_differentiable = False

    _state_prefix: ClassVar[str] = "l0"

    @validate_arguments
    def __init__(self, num_components: NumComponents = 1, *, keep_batch_dim: bool = False, **kwargs: Any) -> None:
        super().__init__(num_components, keep_batch_dim=keep_batch_dim, **kwargs)

    def update(self, learned_activations: Tensor, **kwargs: Any) -> None:
        """Accumulate a batch. Extra keyword arguments are ignored, so one call can feed a whole collection."""
        self._accumulate(self._per_item(learned_activations))

    def _per_item(self, learned_activations: Tensor, **kwargs: Any) -> Tensor:
        per_item = _l0_norm_update(learned_activations, self.num_components)
        if self.nan_strategy != "propagate":
            # A count of non-zeros is finite even for NaN inputs: mark those items for the strategy to see.
            finite = learned_activations.detach().isfinite().all(dim=-1).view(per_item.shape)
            per_item = torch.where(finite, per_item, torch.nan)
        return per_item
