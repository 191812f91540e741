"""Matryoshka reconstruction loss metric."""

from collections.abc import Hashable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from sparse_metrics._batch import FeatureSum, SaeBatch
from sparse_metrics._config import FeatureReduction, NumComponents, validate_arguments
from sparse_metrics._validation import check_prefix_sizes, check_prefix_weights
from sparse_metrics.functional.matryoshka import (
    _combine_prefixes,
    _local_prefix_widths,
    _partial_prefix_decodes,
    _prefix_errors,
    _prefix_errors_from_partials,
)
from sparse_metrics.metrics._base import ACCUMULATOR_DTYPE, DeferredSum, ItemMeanMetric

__all__ = ["MatryoshkaReconstructionLoss"]


def _decoded_sizes(batch: SaeBatch, owner: str, sizes: Sequence[int], reuse: bool) -> tuple[int, ...]:
    """The prefixes decoded from the decoder: all, or all but the whole dictionary where ``x_hat``'s error is reused."""
    d_sae = batch.require("learned_activations", owner).shape[-1] * batch.num_shards
    return tuple(sizes[:-1] if reuse and sizes[-1] == d_sae else sizes)


def _prefix_decodes_partial(batch: SaeBatch, owner: str, sizes: tuple[int, ...], reuse: bool) -> Tensor:
    """This shard's part of each decoded prefix (global widths), ``[prefix, batch, component, d_model]``, no bias."""
    learned = batch.require("learned_activations", owner)
    weight = batch.require("decoder_weight", owner)
    decoded = _decoded_sizes(batch, owner, sizes, reuse)
    if not decoded:  # one prefix, the whole dictionary, whose error is x_hat's
        source = batch.require("source_activations", owner)
        return source.new_zeros(0, *source.shape)
    local_sizes = _local_prefix_widths(decoded, batch.feature_offset, learned.shape[-1])
    return _partial_prefix_decodes(learned, weight, local_sizes, batch.get("decoder_bias"))


class MatryoshkaReconstructionLoss(ItemMeanMetric):
    r"""Weighted reconstruction error of nested prefixes of the dictionary (Matryoshka SAEs).

    .. math:: \mathrm{loss} = \frac{1}{N} \sum_{b=1}^{N} \sum_{p=1}^{P} w_p
       \operatorname{reduce}_d \big(x_{bd} - \hat x^{(p)}_{bd}\big)^2, \qquad
       \hat x^{(p)} = f_{:, :m_p} W_{:m_p} + b

    ``prefix_sizes`` are cumulative widths :math:`m_1 < \dots < m_P \le d_{sae}`; the full dictionary counts only
    if ``d_sae`` is listed. The defaults (mean over ``d_model``, weights ``1/P``) reproduce saev;
    ``feature_reduction="sum"`` with ``prefix_weights=[1] * P`` reproduces SAELens. The prefixes are decoded
    incrementally: all of them together cost one full decode.

    Every prefix is decoded from ``decoder_weight`` by default. With ``reuse_decoded_activations=True`` and the
    largest prefix the whole dictionary (``d_sae``), the error of ``decoded_activations`` is taken as that prefix's,
    which saves one block of the decode; this is right only when ``decoded_activations`` is exactly ``f W + b``
    (not with a skip connection, an output normalisation, or a decode run in another precision).

    ``update(source_activations, learned_activations, decoder_weight, decoder_bias=None)``: the decoder is
    feature-major, ``[*component, d_sae, d_model]`` (as SAELens and saev store ``W_dec``), the bias
    ``[*component, d_model]``. ``compute()`` returns the weighted loss, ``[component]`` (0-d for one component);
    :meth:`compute_prefix_losses` returns each prefix's epoch error, ``[*component, prefix]``.

    Args:
        prefix_sizes: Cumulative prefix widths.
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        keep_batch_dim: Keep per-item values of the weighted loss.
        feature_reduction: ``"mean"`` or ``"sum"`` over the model dimension.
        prefix_weights: One non-negative weight per prefix; ``None`` gives ``1/P`` each.
        reuse_decoded_activations: Take the error of ``decoded_activations`` as the whole-dictionary prefix's (then
            ``decoded_activations`` is a required input).
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
    _positional_inputs: ClassVar[tuple[str, ...]] = (
        "source_activations",
        "learned_activations",
        "decoder_weight",
        "decoder_bias",
    )

    _prefix_weights: Tensor
    matryoshka_prefix_sum = DeferredSum("matryoshka_prefix_sum")
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
        reuse_decoded_activations: bool = False,
        **kwargs: Any,
    ) -> None:
        sizes = check_prefix_sizes(prefix_sizes)
        weights = check_prefix_weights(prefix_weights, len(sizes))
        super().__init__(num_components, keep_batch_dim=keep_batch_dim, **kwargs)
        self.prefix_sizes = sizes
        self.prefix_weights = weights
        self.feature_reduction = feature_reduction
        self.reuse_decoded_activations = reuse_decoded_activations
        # float64, cast to the errors' dtype when combined: float32 weights would cost float64 inputs their precision.
        self.register_buffer("_prefix_weights", torch.tensor(weights, dtype=torch.float64), persistent=False)
        self.add_state(
            "matryoshka_prefix_sum",
            torch.zeros(num_components, len(sizes), dtype=ACCUMULATOR_DTYPE),
            dist_reduce_fx="sum",
        )
        self._add_configuration_marker()

    def _configuration(self) -> dict[str, Any]:
        return {
            **super()._configuration(),
            "prefix_sizes": list(self.prefix_sizes),
            "prefix_weights": list(self.prefix_weights),
            "feature_reduction": self.feature_reduction,
            "reuse_decoded_activations": self.reuse_decoded_activations,
        }

    def _per_item(self, batch: SaeBatch) -> Tensor:
        """Per-item error of every prefix, ``[batch, component, prefix]``."""
        owner = type(self).__name__
        source = batch.require("source_activations", owner)
        learned = batch.require("learned_activations", owner)
        weight = batch.require("decoder_weight", owner, "It decodes the prefixes: the feature-major decoder.")
        sizes = check_prefix_sizes(self.prefix_sizes, d_sae=learned.shape[-1] * batch.num_shards)
        full_error = batch.squared_error(owner) if self.reuse_decoded_activations else None
        key = ("prefix_errors", sizes, self.feature_reduction, self.reuse_decoded_activations)
        if batch.sharding is not None:
            return batch.memo(key, lambda: self._sharded_prefix_errors(batch, sizes, full_error))
        return batch.memo(
            key,
            lambda: _prefix_errors(
                source, learned, weight, batch.get("decoder_bias"), sizes, self.feature_reduction, full_error
            ),
        )

    @property
    def _feature_sum(self) -> FeatureSum:
        return FeatureSum(_prefix_decodes_partial, (self.prefix_sizes, self.reuse_decoded_activations))

    def _batch_uses(self) -> frozenset[Hashable]:
        return frozenset({self._feature_sum})

    def _sharded_prefix_errors(self, batch: SaeBatch, sizes: Sequence[int], full_error: Tensor | None) -> Tensor:
        """Each prefix decoded from the features this shard owns, summed over the shards, the bias added once."""
        owner = type(self).__name__
        decodes = batch.sum_over_features(self._feature_sum, owner)
        reuse = len(_decoded_sizes(batch, owner, sizes, self.reuse_decoded_activations)) < len(sizes)
        return _prefix_errors_from_partials(
            batch.require("source_activations", owner),
            decodes if decodes.shape[0] else None,
            batch.get("decoder_bias"),
            self.feature_reduction,
            full_error if reuse else None,
        )

    def _item_values(self, per_item: Tensor) -> Tensor:
        """The weighted loss ``[batch, component]`` from the per-prefix errors."""
        return _combine_prefixes(per_item, self._prefix_weights)

    def _record(self, contribution: Tensor) -> None:
        super()._record(contribution)
        if contribution.shape[0]:
            self._add_to_state("matryoshka_prefix_sum", contribution)

    def _prefix_key(self, index: int) -> str:
        return f"matryoshka_prefix_{self.prefix_sizes[index]}"

    def _derived_outputs(self) -> dict[str, bool | None]:
        """``matryoshka_prefix_<m>``: the error of each prefix of width ``m``."""
        return {self._prefix_key(index): False for index in range(len(self.prefix_sizes))}

    def _derived_value(self, name: str, contribution: Tensor) -> Tensor:
        index = self._prefix_index(name)
        return self._squeeze(contribution[..., index].mean(dim=0))

    def _derived_compute(self, name: str) -> Tensor:
        return self.compute_prefix_losses()[..., self._prefix_index(name)]

    def _prefix_index(self, name: str) -> int:
        keys = [self._prefix_key(index) for index in range(len(self.prefix_sizes))]
        if name not in keys:
            raise KeyError(name)
        return keys.index(name)

    def compute_prefix_losses(self) -> Tensor:
        """Epoch mean of each prefix's reconstruction error, ``[*component, prefix]`` (synced across processes)."""
        with self._synced():
            values: Tensor = self.matryoshka_prefix_sum / self.matryoshka_count
        return values.squeeze(0) if self.num_components == 1 else values
