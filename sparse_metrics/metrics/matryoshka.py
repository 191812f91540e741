"""Matryoshka reconstruction loss metric."""

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from sparse_metrics._config import FeatureReduction, NumComponents, validate_arguments
from sparse_metrics._validation import check_prefix_sizes, check_prefix_weights
from sparse_metrics.functional.matryoshka import _combine_prefixes, _matryoshka_update
from sparse_metrics.metrics._base import ACCUMULATOR_DTYPE, ItemMeanMetric

__all__ = ["MatryoshkaReconstructionLoss"]


class MatryoshkaReconstructionLoss(ItemMeanMetric):
    r"""Weighted reconstruction error of nested prefixes of the dictionary (Matryoshka SAEs).

    .. math:: \mathrm{loss} = \frac{1}{N} \sum_{b=1}^{N} \sum_{p=1}^{P} w_p
       \operatorname{reduce}_d \big(x_{bd} - \hat x^{(p)}_{bd}\big)^2, \qquad
       \hat x^{(p)} = f_{:, :m_p} W_{:m_p} + b

    ``prefix_sizes`` are cumulative widths :math:`m_1 < \dots < m_P \le d_{sae}`; the full dictionary counts only
    if ``d_sae`` is listed. The defaults (mean over ``d_model``, weights ``1/P``) reproduce saev;
    ``feature_reduction="sum"`` with ``prefix_weights=[1] * P`` reproduces SAELens. The prefixes are decoded
    incrementally: all of them together cost one full decode.

    ``update(source_activations, learned_activations, decoder_weight, decoder_bias=None, **kwargs)``: the decoder is
    feature-major, ``[*component, d_sae, d_model]`` (as SAELens and saev store ``W_dec``), the bias
    ``[*component, d_model]``. ``compute()`` returns the weighted loss, ``[component]`` (0-d for one component);
    :meth:`compute_prefix_losses` returns each prefix's epoch error, ``[*component, prefix]``.

    Args:
        prefix_sizes: Cumulative prefix widths.
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        keep_batch_dim: Keep per-item values of the weighted loss.
        feature_reduction: ``"mean"`` or ``"sum"`` over the model dimension.
        prefix_weights: One non-negative weight per prefix; ``None`` gives ``1/P`` each.
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from sparse_metrics import MatryoshkaReconstructionLoss
        >>> metric = MatryoshkaReconstructionLoss(prefix_sizes=[1, 2], feature_reduction="sum")
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> f = torch.tensor([[1.0, 2.0]])
        >>> metric(source_activations=x, learned_activations=f, decoder_weight=torch.eye(2))
        tensor(2.)
        >>> metric.compute_prefix_losses()
        tensor([4., 0.], dtype=torch.float64)
    """

    _state_prefix: ClassVar[str] = "matryoshka"

    _prefix_weights: Tensor
    matryoshka_prefix_sum: Tensor
    matryoshka_count: Tensor

    @validate_arguments
    def __init__(
        self,
        prefix_sizes: Sequence[int],
        num_components: NumComponents = 1,
        *,
        keep_batch_dim: bool = False,
        feature_reduction: FeatureReduction = "mean",
        prefix_weights: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        sizes = check_prefix_sizes(prefix_sizes)
        weights = check_prefix_weights(prefix_weights, len(sizes))
        super().__init__(num_components, keep_batch_dim=keep_batch_dim, **kwargs)
        self.prefix_sizes = sizes
        self.prefix_weights = weights
        self.feature_reduction = feature_reduction
        # float64, cast to the errors' dtype when combined: float32 weights would cost float64 inputs their precision.
        self.register_buffer("_prefix_weights", torch.tensor(weights, dtype=torch.float64), persistent=False)
        self.add_state(
            "matryoshka_prefix_sum",
            torch.zeros(num_components, len(sizes), dtype=ACCUMULATOR_DTYPE),
            dist_reduce_fx="sum",
        )

    def update(
        self,
        source_activations: Tensor,
        learned_activations: Tensor,
        decoder_weight: Tensor,
        decoder_bias: Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        """Accumulate a batch. Extra keyword arguments are ignored, so one call can feed a whole collection."""
        self._accumulate(self._per_item(source_activations, learned_activations, decoder_weight, decoder_bias))

    def _per_item(
        self,
        source_activations: Tensor,
        learned_activations: Tensor,
        decoder_weight: Tensor,
        decoder_bias: Tensor | None = None,
        full_dictionary_error: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Per-item error of every prefix, ``[batch, component, prefix]``.

        ``full_dictionary_error``: the per-item error of the whole dictionary's reconstruction where the caller has
        it (the collection's L2 error); it then serves as the last prefix's error when that prefix is ``d_sae``.
        """
        return _matryoshka_update(
            source_activations,
            learned_activations,
            decoder_weight,
            decoder_bias,
            self.prefix_sizes,
            self.num_components,
            self.feature_reduction,
            full_dictionary_error,
        )

    def _item_values(self, per_item: Tensor) -> Tensor:
        """The weighted loss ``[batch, component]`` from the per-prefix errors."""
        return _combine_prefixes(per_item, self._prefix_weights)

    def _add(self, per_item: Tensor) -> None:
        super()._add(per_item)
        if per_item.shape[0]:
            total = self.matryoshka_prefix_sum
            self.matryoshka_prefix_sum = total + per_item.detach().sum(dim=0, dtype=total.dtype)

    def _prefix_output(self, prefix_errors: Tensor) -> Tensor:
        """Batch mean of each prefix's error, ``[*component, prefix]``, from per-item prefix errors."""
        values = prefix_errors.mean(dim=0)
        return values.squeeze(0) if self.num_components == 1 else values

    def compute_prefix_losses(self) -> Tensor:
        """Epoch mean of each prefix's reconstruction error, ``[*component, prefix]`` (synced across processes)."""
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        ):
            values = self.matryoshka_prefix_sum / self.matryoshka_count
        return values.squeeze(0) if self.num_components == 1 else values
