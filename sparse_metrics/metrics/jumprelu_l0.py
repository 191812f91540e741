"""JumpReLU L0 penalty metric: latents above threshold, with a straight-through gradient to the threshold."""

from collections.abc import Hashable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field
from torch import Tensor

from sparse_metrics._batch import FeatureSum, SaeBatch
from sparse_metrics._compile import CompiledWithFallback
from sparse_metrics._config import NumComponents, validate_arguments
from sparse_metrics.functional.jumprelu_l0 import (
    _batch_target,
    _jumprelu_l0,
    _per_item_target,
    check_jumprelu_options,
)
from sparse_metrics.metrics._base import ItemMeanMetric

__all__ = ["JumpReLUL0Loss"]

_Positive = Annotated[float, Field(gt=0)]


def _jumprelu_l0_partial(batch: SaeBatch, owner: str, bandwidth: float, convention: str, ste_to_input: bool) -> Tensor:
    """The straight-through L0's count over this process's features."""
    pre_activations, threshold = batch.require("pre_activations", owner), batch.require("threshold", owner)
    count = _compiled_jumprelu_l0 if batch.compiled else _jumprelu_l0
    return count(pre_activations, threshold, bandwidth=bandwidth, convention=convention, ste_to_input=ste_to_input)


# The collection's compiled=True path (compiled at its first call).
_compiled_jumprelu_l0 = CompiledWithFallback(_jumprelu_l0)


class JumpReLUL0Loss(ItemMeanMetric):
    r"""The JumpReLU L0 penalty: the number of latents above threshold, averaged over items.

    .. math:: \mathrm{L0}_c = \frac{1}{N} \sum_{b=1}^{N} \sum_{i=1}^{d_{sae}} H(h_{bci} - \theta_{ci})

    ``update(pre_activations, threshold)`` takes the encoder's pre-activations ``[batch, *component, d_sae]`` and the
    threshold ``[*component, d_sae]``. ``forward`` is differentiable with respect to the threshold through the
    rectangle-kernel straight-through estimator of the convention (see
    :func:`~sparse_metrics.functional.jumprelu_l0_loss`), and with respect to the pre-activations as well with
    ``ste_to_input=True`` (SAELens' ``jumprelu_ste_to_input``).

    - ``convention="saelens"`` (SAELens ``Step``): bandwidth 0.05 by default; with ``target_l0`` :math:`T` each
      item's value is SAELens' quadratic mode :math:`\frac{2}{T}(\mathrm{L0}_b - T)^2`.
    - ``convention="dictionary_learning"`` (its ``StepFunction``): bandwidth 0.001 by default; the step reads the
      JumpReLU output :math:`f = h\,\mathbb{1}[h > \theta]`; only the threshold gets a gradient. With ``target_l0``
      the value is :math:`(\overline{\mathrm{L0}}/T - 1)^2` of the mean L0: ``forward`` applies it to the batch
      mean, ``compute()`` to the mean over every item on every process (no per-item value: ``keep_batch_dim=True``
      is refused).

    An item with a non-finite pre-activation counts as non-finite for ``nan_strategy`` (its count stays finite).

    Args:
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        bandwidth: The kernel's width ``ε``; ``None``: the convention's default.
        target_l0: A target L0 (see the conventions); ``None``: the plain L0.
        convention: ``"saelens"`` or ``"dictionary_learning"``.
        ste_to_input: Pass the estimate to the pre-activations too (SAELens only).
        keep_batch_dim: Keep per-item values.
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from sparse_metrics import JumpReLUL0Loss
        >>> metric = JumpReLUL0Loss()
        >>> threshold = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
        >>> loss = metric(pre_activations=torch.tensor([[0.51, 0.2, 0.9], [0.0, 0.7, 0.3]]), threshold=threshold)
        >>> loss
        tensor(1.5000, grad_fn=<SqueezeBackward1>)
        >>> loss.backward()
        >>> threshold.grad  # -(1 / 0.05) / 2 items, for the one pre-activation within 0.025 of its threshold
        tensor([-10.,  -0.,  -0.])
    """

    _state_prefix: ClassVar[str] = "jumprelu_l0"
    _positional_inputs: ClassVar[tuple[str, ...]] = ("pre_activations", "threshold")

    @validate_arguments
    def __init__(
        self,
        num_components: NumComponents = 1,
        *,
        bandwidth: _Positive | None = None,
        target_l0: _Positive | None = None,
        convention: Literal["saelens", "dictionary_learning"] = "saelens",
        ste_to_input: bool = False,
        keep_batch_dim: bool = False,
        **kwargs: Any,
    ) -> None:
        width = check_jumprelu_options(convention, bandwidth, target_l0, ste_to_input, keep_batch_dim)
        super().__init__(num_components, keep_batch_dim=keep_batch_dim, **kwargs)
        self.bandwidth = width
        self.target_l0 = None if target_l0 is None else float(target_l0)
        self.convention = convention
        self.ste_to_input = ste_to_input
        self._add_configuration_marker()

    @property
    def _batch_target(self) -> bool:
        """Whether the value is dictionary_learning's function of a mean L0 (not a mean of per-item values)."""
        return self.target_l0 is not None and self.convention == "dictionary_learning"

    @property
    def keep_batch_dim(self) -> bool:
        """Whether ``compute``/``forward`` return per-item values (refused with dictionary_learning's target)."""
        return self._keep_batch_dim

    @keep_batch_dim.setter
    def keep_batch_dim(self, value: bool) -> None:
        if value is True and self._batch_target:
            check_jumprelu_options(self.convention, self.bandwidth, self.target_l0, self.ste_to_input, value)
        ItemMeanMetric.keep_batch_dim.fset(self, value)  # type: ignore[attr-defined]

    def _configuration(self) -> dict[str, Any]:
        return {
            **super()._configuration(),
            "bandwidth": self.bandwidth,
            "target_l0": self.target_l0,
            "convention": self.convention,
            "ste_to_input": self.ste_to_input,
        }

    @property
    def _feature_sum(self) -> FeatureSum:
        return FeatureSum(_jumprelu_l0_partial, (self.bandwidth, self.convention, self.ste_to_input))

    def _batch_uses(self) -> frozenset[Hashable]:
        return frozenset({self._feature_sum})

    def _per_item(self, batch: SaeBatch) -> Tensor:
        owner = type(self).__name__
        batch.check_given("pre_activations", owner)
        batch.check_given("threshold", owner)
        return _per_item_target(batch.sum_over_features(self._feature_sum, owner), self.target_l0, self.convention)

    def _finite_items(self, batch: SaeBatch, contribution: Tensor) -> Tensor | None:
        """A count is finite even for NaN inputs: the items with a non-finite pre-activation are screened."""
        return batch.finite_items("pre_activations", type(self).__name__)

    def _value(self, contribution: Tensor) -> Tensor:
        if not self._batch_target:
            return super()._value(contribution)
        return self._squeeze(self._batch_mean(contribution))

    def _batch_mean(self, contribution: Tensor) -> Tensor:
        return _batch_target(super()._batch_mean(contribution), self.target_l0, self.convention)

    def _epoch_mean(self) -> Tensor:
        return _batch_target(super()._epoch_mean(), self.target_l0, self.convention)

    def extra_repr(self) -> str:
        """Show the convention and the options in ``repr``."""
        target = f", target_l0={self.target_l0}" if self.target_l0 is not None else ""
        ste = ", ste_to_input=True" if self.ste_to_input else ""
        return f"num_components={self.num_components}, convention={self.convention!r}, bandwidth={self.bandwidth}" + (
            target + ste
        )
