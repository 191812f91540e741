"""L0 norm metric: active features per item."""

from collections.abc import Hashable
from typing import Any, ClassVar

from torch import Tensor

from sparse_metrics._batch import SaeBatch
from sparse_metrics._config import NumComponents, validate_arguments
from sparse_metrics.metrics._base import ItemMeanMetric

__all__ = ["L0NormMetric"]


class L0NormMetric(ItemMeanMetric):
    r"""Number of active (non-zero) dictionary features, averaged over items.

    .. math:: \mathrm{L0} = \frac{1}{N} \sum_{b=1}^{N} \sum_{i=1}^{d_{sae}} \mathbb{1}[f_{bi} \neq 0]

    ``update(learned_activations)`` takes ``[batch, d_sae]`` or ``[batch, component, d_sae]``.
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
    _positional_inputs: ClassVar[tuple[str, ...]] = ("learned_activations",)
    _uses: ClassVar[frozenset[Hashable]] = frozenset({"l0"})

    @validate_arguments
    def __init__(self, num_components: NumComponents = 1, *, keep_batch_dim: bool = False, **kwargs: Any) -> None:
        super().__init__(num_components, keep_batch_dim=keep_batch_dim, **kwargs)
        self._add_configuration_marker()

    def _per_item(self, batch: SaeBatch) -> Tensor:
        return batch.l0(type(self).__name__)

    def _finite_items(self, batch: SaeBatch, contribution: Tensor) -> Tensor | None:
        """A count of non-zeros is finite even for NaN inputs: the items with a non-finite activation are screened."""
        return batch.finite_items("learned_activations", type(self).__name__)
