"""L1 absolute loss metric."""

from collections.abc import Hashable
from typing import Any, ClassVar

from torch import Tensor

from sparse_metrics._batch import SaeBatch
from sparse_metrics._config import NumComponents, validate_arguments
from sparse_metrics.metrics._base import ItemMeanMetric

__all__ = ["L1AbsoluteLoss"]


class L1AbsoluteLoss(ItemMeanMetric):
    r"""Sum over dictionary features of the absolute learned activation, averaged over items.

    .. math:: \mathrm{L1} = \frac{1}{N} \sum_{b=1}^{N} \sum_{i=1}^{d_{sae}} |f_{bi}|

    ``update(learned_activations)`` takes ``[batch, d_sae]`` or ``[batch, component, d_sae]``.
    ``compute()`` returns ``[component]`` (0-d for one component), or per-item values with ``keep_batch_dim=True``.

    Args:
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        keep_batch_dim: Keep per-item values.
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from sparse_metrics import L1AbsoluteLoss
        >>> metric = L1AbsoluteLoss()
        >>> metric.update(learned_activations=torch.tensor([[1.0, -2.0, 0.0]]))
        >>> metric.update(learned_activations=torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
        >>> metric.compute()
        tensor(1.3333, dtype=torch.float64)
    """

    _state_prefix: ClassVar[str] = "l1"
    _positional_inputs: ClassVar[tuple[str, ...]] = ("learned_activations",)
    _uses: ClassVar[frozenset[Hashable]] = frozenset({"l1"})

    @validate_arguments
    def __init__(self, num_components: NumComponents = 1, *, keep_batch_dim: bool = False, **kwargs: Any) -> None:
        super().__init__(num_components, keep_batch_dim=keep_batch_dim, **kwargs)
        self._add_configuration_marker()

    def _per_item(self, batch: SaeBatch) -> Tensor:
        return batch.l1(type(self).__name__)
