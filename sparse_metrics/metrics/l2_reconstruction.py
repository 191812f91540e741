"""L2 reconstruction loss metric."""

from typing import Any, ClassVar

from torch import Tensor

from sparse_metrics._batch import SaeBatch
from sparse_metrics._config import FeatureReduction, NumComponents, validate_arguments
from sparse_metrics.functional.l2_reconstruction import _reduce_over_model, l2_reconstruction_loss
from sparse_metrics.metrics._base import ItemMeanMetric

__all__ = ["L2ReconstructionLoss"]


class L2ReconstructionLoss(ItemMeanMetric):
    r"""Squared error between the SAE's reconstruction and its input, reduced over the model dimension.

    .. math:: \mathrm{L2} = \frac{1}{N} \sum_{b=1}^{N} \operatorname{reduce}_{d}\,(\hat x_{bd} - x_{bd})^2

    where ``reduce`` is the mean (default; the prior-art package and saev) or the sum (SAELens) over ``d_model``,
    and the mean runs over every item of every update on every process.

    ``update(decoded_activations, source_activations)`` takes ``[batch, d_model]`` or
    ``[batch, component, d_model]`` tensors. ``compute()`` returns ``[component]`` (0-d for one component), or the
    per-item values ``[item, *component]`` with ``keep_batch_dim=True``.

    Args:
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        keep_batch_dim: Keep per-item values, e.g. for neuron resampling.
        feature_reduction: ``"mean"`` or ``"sum"`` over the model dimension.
        kwargs: Passed to :class:`torchmetrics.Metric` (``process_group``, ``sync_on_compute``, ...).

    Example:
        >>> import torch
        >>> from sparse_metrics import L2ReconstructionLoss
        >>> metric = L2ReconstructionLoss(num_components=1)
        >>> source_activations = torch.tensor([[[4.0, 2.0]], [[2.0, 0.0]]])  # [batch, component, d_model]
        >>> decoded_activations = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])
        >>> metric.forward(decoded_activations=decoded_activations, source_activations=source_activations)
        tensor(3.)
    """

    _state_prefix: ClassVar[str] = "l2"
    _positional_inputs: ClassVar[tuple[str, ...]] = ("decoded_activations", "source_activations")

    @validate_arguments
    def __init__(
        self,
        num_components: NumComponents = 1,
        *,
        keep_batch_dim: bool = False,
        feature_reduction: FeatureReduction = "mean",
        **kwargs: Any,
    ) -> None:
        super().__init__(num_components, keep_batch_dim=keep_batch_dim, **kwargs)
        self.feature_reduction = feature_reduction
        self._add_configuration_marker()

    def _configuration(self) -> dict[str, Any]:
        return {**super()._configuration(), "feature_reduction": self.feature_reduction}

    def _per_item(self, batch: SaeBatch) -> Tensor:
        owner = type(self).__name__
        d_model = batch.rows("source_activations", owner).shape[-1]
        return _reduce_over_model(batch.squared_error(owner), d_model, self.feature_reduction)

    @staticmethod
    def calculate_mse(decoded_activations: Tensor, source_activations: Tensor) -> Tensor:
        """Per-item mean squared error, ``[batch, *component]`` (kept from the prior-art package's API).

        Example:
            >>> import torch
            >>> L2ReconstructionLoss.calculate_mse(torch.tensor([[2.0, 0.0]]), torch.tensor([[4.0, 2.0]]))
            tensor([4.])
        """
        return l2_reconstruction_loss(decoded_activations, source_activations, keep_batch_dim=True)
