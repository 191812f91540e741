r"""L2 reconstruction loss: the squared error between an SAE's reconstruction and its input.

.. math:: \mathrm{L2}_b = \operatorname{reduce}_{d}\,(\hat x_{bd} - x_{bd})^2,
   \qquad \operatorname{reduce} \in \{\text{mean}, \text{sum}\}
"""

import torch
from jaxtyping import Float
from torch import Tensor

from sparse_metrics._config import FeatureReduction
from sparse_metrics._validation import check_feature_reduction, check_same_shape, computation_dtype, to_components
from sparse_metrics.functional._output import batch_output
from sparse_metrics.functional._squares import squared_norms


def _reduce_squared_error(
    error: Float[Tensor, "*batch_component d_model"], feature_reduction: FeatureReduction
) -> Float[Tensor, "*batch_component"]:
    """Square ``error`` and reduce it over the model dimension (the last axis)."""
    return squared_norms(error, mean=feature_reduction == "mean")


def _elementwise_squared_error(
    decoded_activations: Float[Tensor, "*batch d_model"],
    source_activations: Float[Tensor, "*batch d_model"],
    *,
    normalize: bool,
    rescale: bool,
) -> Float[Tensor, "*batch d_model"]:
    r"""Element-wise squared error, optionally divided by each item's source norm :math:`\lVert x_b \rVert_2`.

    With ``rescale`` both inputs are first divided by :math:`u = \max |x|` (at least ``1e-12``) and the result is
    multiplied back by :math:`u^2` (or by :math:`u` when normalised, since the norm scales by :math:`u` too). The
    value is the same, but the norm is computed from numbers near 1, so it stays finite where :math:`\sum_d x_d^2`
    overflows (:math:`x = 3 \cdot 10^{28}` in float32).
    """
    dtype = computation_dtype(decoded_activations, source_activations)
    source = source_activations.to(dtype)
    decoded = decoded_activations.to(dtype)
    scale = source.detach().abs().amax().clamp_min(1e-12) if rescale else None
    if scale is not None:
        source, decoded = source / scale, decoded / scale
    squared = (decoded - source).square()
    if normalize:
        squared = squared / torch.linalg.vector_norm(source, dim=-1, keepdim=True)
    if scale is None:
        return squared
    return squared * scale if normalize else squared * scale.square()


def _l2_reconstruction_update(
    decoded_activations: Tensor,
    source_activations: Tensor,
    num_components: int | None = None,
    feature_reduction: FeatureReduction = "mean",
) -> Float[Tensor, "batch component"]:
    """Validate the inputs and return the per-item error, ``[batch, component]``."""
    check_feature_reduction(feature_reduction)
    source = to_components("source_activations", source_activations, num_components)
    decoded = check_same_shape("decoded_activations", decoded_activations, "source_activations", source_activations)
    return _l2_reconstruction_error(decoded.view(source.shape), source, feature_reduction)


def _squared_error_sum(
    decoded: Float[Tensor, "batch *component d_model"], source: Float[Tensor, "batch *component d_model"]
) -> Float[Tensor, "batch component"]:
    """Per-item squared error summed over ``d_model`` of validated inputs, in float32 or float64.

    The inputs are ``[batch, component, d_model]`` (the result ``[batch, component]``), or ``[batch, d_model]`` for
    one component (the result ``[batch, 1]``).
    """
    dtype = computation_dtype(decoded, source)
    return squared_norms(decoded.to(dtype) - source.to(dtype), keepdim=decoded.ndim == 2)


def _reduce_over_model(
    squared_error_sum: Float[Tensor, "*batch_component"], d_model: int, feature_reduction: FeatureReduction
) -> Float[Tensor, "*batch_component"]:
    """The per-item error under ``feature_reduction``, from the squared error summed over ``d_model``."""
    return squared_error_sum / d_model if feature_reduction == "mean" else squared_error_sum


def _l2_reconstruction_error(
    decoded: Float[Tensor, "batch component d_model"],
    source: Float[Tensor, "batch component d_model"],
    feature_reduction: FeatureReduction,
) -> Float[Tensor, "batch component"]:
    """Per-item error of validated inputs, computed in float32 or float64."""
    return _reduce_over_model(_squared_error_sum(decoded, source), source.shape[-1], feature_reduction)


def l2_reconstruction_loss(
    decoded_activations: Float[Tensor, "batch *component d_model"],
    source_activations: Float[Tensor, "batch *component d_model"],
    *,
    feature_reduction: FeatureReduction = "mean",
    keep_batch_dim: bool = False,
) -> Float[Tensor, "..."]:
    """L2 reconstruction loss of a batch.

    Args:
        decoded_activations: The SAE's reconstruction, ``[batch, feature]`` or ``[batch, component, feature]``.
        source_activations: The SAE's input, same shape.
        feature_reduction: ``"mean"`` (prior-art package, saev) or ``"sum"`` (SAELens) over the model dimension.
        keep_batch_dim: Return the per-item values ``[batch, *component]`` instead of their batch mean.

    Returns:
        The batch mean ``[*component]`` (0-d without a component axis), or per-item values.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import l2_reconstruction_loss
        >>> source = torch.tensor([[4.0, 2.0], [2.0, 0.0]])
        >>> decoded = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
        >>> l2_reconstruction_loss(decoded, source)
        tensor(3.)
        >>> l2_reconstruction_loss(decoded, source, feature_reduction="sum", keep_batch_dim=True)
        tensor([8., 4.])
    """
    per_item = _l2_reconstruction_update(decoded_activations, source_activations, None, feature_reduction)
    return batch_output(per_item, source_activations.ndim == 3, keep_batch_dim)
