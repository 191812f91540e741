"""Reconstruction-quality metrics: cosine similarity, norm ratio, relative reconstruction bias and normalised MSE.

They read ``decoded_activations`` and ``source_activations`` and share the batch's per-item norms, inner products and
squared error (each computed once per step for all of them, see :class:`~sparse_metrics._batch.SaeBatch`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from sparse_metrics._batch import SaeBatch
from sparse_metrics._config import NumComponents, validate_arguments
from sparse_metrics.functional.reconstruction_quality import (
    _cosine_similarity,
    _norm_ratio,
    _normalized_mse,
    _relative_reconstruction_bias_sums,
)
from sparse_metrics.metrics._base import ACCUMULATOR_DTYPE, ItemMeanMetric, SaeMetric

__all__ = ["NormalizedMSE", "ReconstructionCosineSimilarity", "ReconstructionNormRatio", "RelativeReconstructionBias"]

_RECONSTRUCTION_INPUTS = ("decoded_activations", "source_activations")


def _finite_inputs(batch: SaeBatch, owner: str) -> Tensor:
    """``[batch]``: the items whose source and reconstruction are finite (an infinite source gives a finite ratio 0)."""
    return batch.finite_items("source_activations", owner) & batch.finite_items("decoded_activations", owner)


class _ReconstructionItemMean(ItemMeanMetric):
    """An item mean of a per-item function of ``x`` and ``x_hat``; both inputs are required."""

    _positional_inputs: ClassVar[tuple[str, ...]] = _RECONSTRUCTION_INPUTS

    @validate_arguments
    def __init__(self, num_components: NumComponents = 1, *, keep_batch_dim: bool = False, **kwargs: Any) -> None:
        super().__init__(num_components, keep_batch_dim=keep_batch_dim, **kwargs)
        self._add_configuration_marker()

    def _norms(self, batch: SaeBatch) -> tuple[Tensor, Tensor]:
        owner = type(self).__name__
        # Both are needed: name the missing one first, as update lists them.
        batch.check_given("decoded_activations", owner)
        return batch.item_norm("source_activations", owner), batch.item_norm("decoded_activations", owner)

    def _finite_items(self, batch: SaeBatch, contribution: Tensor) -> Tensor | None:
        finite = contribution.detach().isfinite().flatten(1).all(dim=1)
        return finite & _finite_inputs(batch, type(self).__name__)


class ReconstructionCosineSimilarity(_ReconstructionItemMean):
    r"""Mean over items of the cosine similarity between the source and its reconstruction.

    .. math:: \cos_c = \frac{1}{N} \sum_{b=1}^{N}
       \frac{\langle x_{bc}, \hat x_{bc} \rangle}{\lVert x_{bc} \rVert_2 \, \lVert \hat x_{bc} \rVert_2}

    As SAELens' and dictionary_learning's ``cossim`` (no epsilon: an item whose source or reconstruction is zero is
    NaN; ``nan_strategy="ignore"`` drops it). dictionary_learning averages per batch and then over batches; this is
    the mean over every item, whatever the batching.

    ``update(decoded_activations, source_activations)`` takes ``[batch, d_model]`` or ``[batch, component,
    d_model]``; ``compute()`` returns float64 ``[component]`` (0-d for one component), NaN before any item.

    Args:
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        keep_batch_dim: Keep per-item values.
        kwargs: Passed to :class:`torchmetrics.Metric` (and ``nan_strategy``).

    Example:
        >>> import torch
        >>> from sparse_metrics import ReconstructionCosineSimilarity
        >>> metric = ReconstructionCosineSimilarity()
        >>> metric.update(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
        >>> metric.update(torch.tensor([[6.0, 8.0]]), torch.tensor([[3.0, 4.0]]))
        >>> metric.compute()
        tensor(0.8536, dtype=torch.float64)
    """

    higher_is_better = True
    is_loss_term = False
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0

    _state_prefix: ClassVar[str] = "cosine_similarity"

    def _per_item(self, batch: SaeBatch) -> Tensor:
        source_norm, decoded_norm = self._norms(batch)
        inner = batch.inner_product(type(self).__name__)
        return _cosine_similarity(source_norm, decoded_norm, inner)


class ReconstructionNormRatio(_ReconstructionItemMean):
    r"""Mean over items of the ratio of the reconstruction's norm to the source's (SAELens' ``l2_ratio``).

    .. math:: \rho_c = \frac{1}{N} \sum_{b=1}^{N} \frac{\lVert \hat x_{bc} \rVert_2}{g(\lVert x_{bc} \rVert_2)},
       \qquad g(n) = \begin{cases} 1 & n < 10^{-4} \\ n & \text{otherwise} \end{cases}

    The guard is SAELens': a source norm below ``1e-4`` is replaced by 1, and no gradient flows through it.
    dictionary_learning's ``l2_ratio`` has no guard (it differs only for such items, where it is huge or NaN).
    Below 1, the SAE shrinks its reconstructions.

    ``update(decoded_activations, source_activations)`` takes ``[batch, d_model]`` or ``[batch, component,
    d_model]``; ``compute()`` returns float64 ``[component]`` (0-d for one component), NaN before any item.

    Args:
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        keep_batch_dim: Keep per-item values.
        kwargs: Passed to :class:`torchmetrics.Metric` (and ``nan_strategy``).

    Example:
        >>> import torch
        >>> from sparse_metrics import ReconstructionNormRatio
        >>> metric = ReconstructionNormRatio()
        >>> metric(torch.tensor([[0.0, 2.5], [0.5, 0.0]]), torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        tensor(0.5000)
    """

    higher_is_better = None  # type: ignore[assignment]  # 1 is best: neither higher nor lower
    is_loss_term = False
    plot_lower_bound = 0.0

    _state_prefix: ClassVar[str] = "norm_ratio"

    def _per_item(self, batch: SaeBatch) -> Tensor:
        source_norm, decoded_norm = self._norms(batch)
        return _norm_ratio(source_norm, decoded_norm)


class NormalizedMSE(_ReconstructionItemMean):
    r"""OpenAI's normalised MSE: the mean over items of the squared error relative to the source's mean square.

    .. math:: \mathrm{NMSE}_c = \frac{1}{N} \sum_{b=1}^{N}
       \frac{\operatorname{mean}_d (\hat x_{bcd} - x_{bcd})^2}{\operatorname{mean}_d x_{bcd}^2}

    A per-item ratio, averaged over items (OpenAI's ``normalized_mean_squared_error``), not a ratio of means; it is a
    loss term (OpenAI trains on it), so :class:`~sparse_metrics.TotalLoss` can weight it. An item whose source is
    zero is inf or NaN.

    ``update(decoded_activations, source_activations)`` takes ``[batch, d_model]`` or ``[batch, component,
    d_model]``; ``compute()`` returns float64 ``[component]`` (0-d for one component), NaN before any item.

    Args:
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        keep_batch_dim: Keep per-item values.
        kwargs: Passed to :class:`torchmetrics.Metric` (and ``nan_strategy``).

    Example:
        >>> import torch
        >>> from sparse_metrics import NormalizedMSE
        >>> metric = NormalizedMSE()
        >>> metric(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
        tensor(0.1250)
    """

    _state_prefix: ClassVar[str] = "normalized_mse"

    def _per_item(self, batch: SaeBatch) -> Tensor:
        owner = type(self).__name__
        source_norm, _ = self._norms(batch)
        return _normalized_mse(batch.squared_error(owner), source_norm)


class RelativeReconstructionBias(SaeMetric):
    r"""Relative reconstruction bias :math:`\gamma`: how much the reconstruction is shrunk, pooled over every item.

    .. math:: \gamma_c = \frac{\sum_{b=1}^{N} \lVert \hat x_{bc} \rVert_2^2}{\sum_{b=1}^{N}
       \langle x_{bc}, \hat x_{bc} \rangle}

    The Gated SAE paper's measure (Rajamanoharan et al. 2024, eq. 10): the :math:`\hat x = \gamma^{-1}`-scaled
    reconstruction is the best one; 1 is unbiased, below 1 shrunk. dictionary_learning and SAELens compute it per
    batch (a ratio of batch means, averaged over batches); ``forward`` returns that batch ratio, ``compute()`` the
    ratio of the sums over every item of every update on every process (a fixed ``[component, 2]`` float64 state,
    reduced by sum), which does not depend on how the items were batched.

    ``update(decoded_activations, source_activations)`` takes ``[batch, d_model]`` or ``[batch, component,
    d_model]``; ``compute()`` returns float64 ``[component]`` (0-d for one component), NaN before any item.

    Args:
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        kwargs: Passed to :class:`torchmetrics.Metric` (and ``nan_strategy``).

    Example:
        >>> import torch
        >>> from sparse_metrics import RelativeReconstructionBias
        >>> metric = RelativeReconstructionBias()
        >>> metric.update(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]]))  # 1 / 2
        >>> metric.update(torch.tensor([[0.0, 3.0]]), torch.tensor([[0.0, 3.0]]))  # 9 / 9
        >>> metric.compute()  # (1 + 9) / (2 + 9)
        tensor(0.9091, dtype=torch.float64)
    """

    is_differentiable = True
    higher_is_better = None
    plot_lower_bound = 0.0

    _positional_inputs: ClassVar[tuple[str, ...]] = _RECONSTRUCTION_INPUTS
    _state_name: ClassVar[str] = "relative_reconstruction_bias_sums"

    @validate_arguments
    def __init__(self, num_components: NumComponents = 1, **kwargs: Any) -> None:
        super().__init__(num_components, **kwargs)
        self.add_state(self._state_name, torch.zeros(num_components, 2, dtype=ACCUMULATOR_DTYPE), dist_reduce_fx="sum")
        self._add_configuration_marker()

    @property
    def _sums(self) -> Tensor:
        value: Tensor = getattr(self, self._state_name)
        return value

    def _contribution(self, batch: SaeBatch) -> Tensor:
        """Per-item ``[||x_hat||^2, <x, x_hat>]``, ``[batch, component, 2]``, differentiable."""
        owner = type(self).__name__
        self._check_device(batch)
        decoded_norm = batch.item_norm("decoded_activations", owner)
        inner = batch.inner_product(owner)
        return _relative_reconstruction_bias_sums(decoded_norm, inner)

    def _finite_items(self, batch: SaeBatch, contribution: Tensor) -> Tensor | None:
        return contribution.detach().isfinite().flatten(1).all(dim=1) & _finite_inputs(batch, type(self).__name__)

    def _record(self, contribution: Tensor) -> None:
        if contribution.shape[0] == 0:
            return
        setattr(self, self._state_name, self._sums + contribution.detach().sum(dim=0, dtype=self._sums.dtype))

    def _value(self, contribution: Tensor) -> Tensor:
        """The batch's ratio (a ratio of batch means, as dictionary_learning and SAELens log it)."""
        sums = contribution.sum(dim=0)
        return self._squeeze(sums[..., 0] / sums[..., 1])

    def compute(self) -> Tensor:
        """The pooled ratio over every item seen on every process, float64 ``[component]`` (0-d for one)."""
        sums = self._sums
        return self._squeeze(sums[..., 0] / sums[..., 1])
