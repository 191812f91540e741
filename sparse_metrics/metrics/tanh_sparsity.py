"""tanh sparsity penalty metric (Anthropic; SAELens' ``"tanh"`` sparsity mode)."""

from collections.abc import Hashable
from typing import Annotated, Any, ClassVar

from pydantic import Field
from torch import Tensor

from sparse_metrics._batch import FeatureSum, SaeBatch
from sparse_metrics._compile import CompiledWithFallback
from sparse_metrics._config import NumComponents, validate_arguments
from sparse_metrics.functional.tanh_sparsity import _tanh_penalty
from sparse_metrics.metrics._base import ItemMeanMetric

__all__ = ["TanhSparsityLoss"]


def _tanh_partial(batch: SaeBatch, owner: str, scale: float, decoder_norm_weighting: bool) -> Tensor:
    """The tanh penalty's sum over this process's features."""
    row_norms = batch.decoder_row_norms(owner) if decoder_norm_weighting else None
    penalty = _compiled_tanh_penalty if batch.compiled else _tanh_penalty
    return penalty(batch.require("learned_activations", owner), row_norms, scale)


# The collection's compiled=True path (compiled at its first call).
_compiled_tanh_penalty = CompiledWithFallback(_tanh_penalty)


class TanhSparsityLoss(ItemMeanMetric):
    r"""The tanh sparsity penalty, a smooth L0: averaged over items.

    .. math:: \mathrm{tanh\_sparsity}_c = \frac{1}{N} \sum_{b=1}^{N} \sum_{i=1}^{d_{sae}}
       \tanh\!\big(s\, f_{bci}\, \lVert W_{ci} \rVert_2\big)

    ``update(learned_activations, decoder_weight=None)`` takes the activations ``[batch, *component, d_sae]`` and,
    with ``decoder_norm_weighting=True`` (the default, as SAELens), the feature-major decoder
    ``[*component, d_sae, d_model]``. As in SAELens there is no absolute value (JumpReLU activations are
    non-negative): the gradient at :math:`f = 0` is :math:`s \lVert W_i \rVert_2 / N`. ``forward`` is
    differentiable with respect to the activations and the decoder.

    Args:
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        scale: The scale ``s`` (SAELens' ``jumprelu_tanh_scale``).
        decoder_norm_weighting: Weight each activation by its decoder row's L2 norm.
        keep_batch_dim: Keep per-item values.
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from sparse_metrics import TanhSparsityLoss
        >>> metric = TanhSparsityLoss()
        >>> decoder_weight = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # row norms 5, 1
        >>> metric(learned_activations=torch.tensor([[0.0, 0.25], [1.0, 0.0]]), decoder_weight=decoder_weight)
        tensor(0.8808)
    """

    _state_prefix: ClassVar[str] = "tanh_sparsity"
    _positional_inputs: ClassVar[tuple[str, ...]] = ("learned_activations", "decoder_weight")

    @validate_arguments
    def __init__(
        self,
        num_components: NumComponents = 1,
        *,
        scale: Annotated[float, Field(gt=0)] = 4.0,
        decoder_norm_weighting: bool = True,
        keep_batch_dim: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_components, keep_batch_dim=keep_batch_dim, **kwargs)
        self.scale = float(scale)
        self.decoder_norm_weighting = decoder_norm_weighting
        self._add_configuration_marker()

    def _configuration(self) -> dict[str, Any]:
        return {**super()._configuration(), "scale": self.scale, "decoder_norm_weighting": self.decoder_norm_weighting}

    @property
    def _feature_sum(self) -> FeatureSum:
        return FeatureSum(_tanh_partial, (self.scale, self.decoder_norm_weighting))

    def _batch_uses(self) -> frozenset[Hashable]:
        return frozenset({self._feature_sum})

    def _per_item(self, batch: SaeBatch) -> Tensor:
        owner = type(self).__name__
        batch.check_given("learned_activations", owner)
        if self.decoder_norm_weighting:
            why = "It is required with `decoder_norm_weighting=True`: the feature-major decoder [*component, d_sae, "
            batch.decoder_row_norms(owner, why + "d_model].")
        return batch.sum_over_features(self._feature_sum, owner)

    def _finite_items(self, batch: SaeBatch, contribution: Tensor) -> Tensor | None:
        """Items with a finite value and a finite `learned_activations` (an infinite one can give a finite penalty)."""
        finite = super()._finite_items(batch, contribution)
        assert finite is not None
        return finite & batch.finite_items("learned_activations", type(self).__name__)

    def extra_repr(self) -> str:
        """Show the options in ``repr``."""
        return (
            f"num_components={self.num_components}, scale={self.scale}, "
            f"decoder_norm_weighting={self.decoder_norm_weighting}"
        )
