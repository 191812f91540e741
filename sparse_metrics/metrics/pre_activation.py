"""Pre-activation loss metric (Anthropic; SAELens ``calculate_pre_act_loss``)."""

from collections.abc import Hashable
from typing import Any, ClassVar

from torch import Tensor

from sparse_metrics._batch import FeatureSum, SaeBatch
from sparse_metrics._compile import CompiledWithFallback
from sparse_metrics._config import NumComponents, validate_arguments
from sparse_metrics.functional.pre_activation import _pre_activation_penalty
from sparse_metrics.metrics._base import ItemMeanMetric

__all__ = ["PreActivationLoss"]


def _pre_activation_partial(batch: SaeBatch, owner: str, dead_only: bool, decoder_norm_weighting: bool) -> Tensor:
    """The pre-activation penalty's sum over this process's features."""
    row_norms = batch.decoder_row_norms(owner) if decoder_norm_weighting else None
    dead_mask = batch.require("dead_mask", owner) if dead_only else None
    pre_activations, threshold = batch.require("pre_activations", owner), batch.require("threshold", owner)
    penalty = _compiled_pre_activation_penalty if batch.compiled else _pre_activation_penalty
    return penalty(pre_activations, threshold, row_norms, dead_mask)


# The collection's compiled=True path (compiled at its first call).
_compiled_pre_activation_penalty = CompiledWithFallback(_pre_activation_penalty)


class PreActivationLoss(ItemMeanMetric):
    r"""The pre-activation loss: how far below threshold the (dead) latents' pre-activations sit, averaged over items.

    .. math:: \mathrm{pre\_act}_c = \frac{1}{N} \sum_{b=1}^{N} \sum_{i=1}^{d_{sae}}
       \mathrm{relu}(\theta_{ci} - h_{bci})\, d_{ci}\, \lVert W_{ci} \rVert_2

    ``update(pre_activations, threshold, decoder_weight=None, dead_mask=None)``: the pre-activations
    ``[batch, *component, d_sae]``, the threshold ``[*component, d_sae]``, with ``decoder_norm_weighting=True`` the
    feature-major decoder ``[*component, d_sae, d_model]``, and with ``dead_only=True`` (SAELens) the boolean
    ``dead_mask`` ``[*component, d_sae]`` (True for a dead latent, e.g. :meth:`DeadFeatures.dead_mask`);
    ``dead_only=False`` counts every latent (lm_saes). ``forward`` is differentiable with respect to the
    pre-activations, the threshold and the decoder (SAELens detaches none of them).

    Args:
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        dead_only: Count only the latents of ``dead_mask``.
        decoder_norm_weighting: Weight each latent by its decoder row's L2 norm.
        keep_batch_dim: Keep per-item values.
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from sparse_metrics import PreActivationLoss
        >>> metric = PreActivationLoss()
        >>> metric(
        ...     pre_activations=torch.tensor([[-1.0, 0.5], [0.0, 2.0]]),
        ...     threshold=torch.tensor([0.5, 1.0]),
        ...     decoder_weight=torch.tensor([[3.0, 4.0], [0.0, 1.0]]),  # row norms 5, 1
        ...     dead_mask=torch.tensor([True, False]),
        ... )  # 5 * (1.5 + 0.5) / 2
        tensor(5.)
    """

    _state_prefix: ClassVar[str] = "pre_activation"
    _positional_inputs: ClassVar[tuple[str, ...]] = ("pre_activations", "threshold", "decoder_weight", "dead_mask")

    @validate_arguments
    def __init__(
        self,
        num_components: NumComponents = 1,
        *,
        dead_only: bool = True,
        decoder_norm_weighting: bool = True,
        keep_batch_dim: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_components, keep_batch_dim=keep_batch_dim, **kwargs)
        self.dead_only = dead_only
        self.decoder_norm_weighting = decoder_norm_weighting
        self._add_configuration_marker()

    def _configuration(self) -> dict[str, Any]:
        return {
            **super()._configuration(),
            "dead_only": self.dead_only,
            "decoder_norm_weighting": self.decoder_norm_weighting,
        }

    @property
    def _feature_sum(self) -> FeatureSum:
        return FeatureSum(_pre_activation_partial, (self.dead_only, self.decoder_norm_weighting))

    def _batch_uses(self) -> frozenset[Hashable]:
        return frozenset({self._feature_sum})

    def _per_item(self, batch: SaeBatch) -> Tensor:
        owner = type(self).__name__
        batch.check_given("pre_activations", owner)
        batch.check_given("threshold", owner)
        if self.decoder_norm_weighting:
            why = "It is required with `decoder_norm_weighting=True`: the feature-major decoder [*component, d_sae, "
            batch.decoder_row_norms(owner, why + "d_model].")
        if self.dead_only:
            why = "It is required with `dead_only=True` (True for a dead latent); `dead_only=False` counts all latents."
            batch.check_given("dead_mask", owner, why)
        return batch.sum_over_features(self._feature_sum, owner)

    def _finite_items(self, batch: SaeBatch, contribution: Tensor) -> Tensor | None:
        """Items with a finite value and a finite `pre_activations` (an infinite one can give a finite penalty)."""
        finite = super()._finite_items(batch, contribution)
        assert finite is not None
        return finite & batch.finite_items("pre_activations", type(self).__name__)

    def extra_repr(self) -> str:
        """Show the options in ``repr``."""
        return (
            f"num_components={self.num_components}, dead_only={self.dead_only}, "
            f"decoder_norm_weighting={self.decoder_norm_weighting}"
        )
