r"""Reconstruction-quality metrics of an SAE, each a function of per-item sums over the model dimension.

With :math:`x_b` the source and :math:`\hat x_b` the reconstruction of item :math:`b`, every metric here is built from
three per-item statistics, computed once and shared (see :class:`~sparse_metrics._batch.SaeBatch`): the norms
:math:`\lVert x_b \rVert`, :math:`\lVert \hat x_b \rVert` (``torch.linalg.vector_norm``, whose gradient at a zero
vector is 0, as the peers' ``torch.norm``) and :math:`\langle x_b, \hat x_b \rangle`, plus the squared error
:math:`\lVert \hat x_b - x_b \rVert^2`.

- cosine similarity :math:`\cos(x_b, \hat x_b) = \langle x_b, \hat x_b \rangle / (\lVert x_b \rVert
  \lVert \hat x_b \rVert)` (no epsilon: a zero vector gives NaN, as in SAELens and dictionary_learning);
- norm ratio :math:`\lVert \hat x_b \rVert / \lVert x_b \rVert`, where a source norm below ``1e-4`` is replaced by 1
  (SAELens' ``l2_ratio`` guard; no gradient flows through a replaced norm);
- relative reconstruction bias :math:`\gamma = \sum_b \lVert \hat x_b \rVert^2 / \sum_b \langle x_b, \hat x_b
  \rangle` (the Gated SAE paper's shrinkage measure, eq. 10), pooled over items;
- normalised MSE :math:`\operatorname{mean}_d e_{bd}^2 / \operatorname{mean}_d x_{bd}^2 = \lVert \hat x_b - x_b
  \rVert^2 / \lVert x_b \rVert^2` per item (OpenAI's ``normalized_mean_squared_error``).
"""

import torch
from jaxtyping import Float
from torch import Tensor

from sparse_metrics._validation import check_same_shape, computation_dtype, to_components
from sparse_metrics.functional._output import batch_output
from sparse_metrics.functional.l2_reconstruction import _squared_error_sum

#: SAELens' ``l2_ratio`` replaces a source norm below this by 1.
NORM_RATIO_GUARD = 1e-4


def _item_norm(values: Float[Tensor, "batch component d_model"]) -> Float[Tensor, "batch component"]:
    """Per-item L2 norm over ``d_model``, in float32 or float64 (gradient 0 at a zero vector)."""
    norm: Tensor = torch.linalg.vector_norm(values, dim=-1, dtype=computation_dtype(values))
    return norm


def _inner_product(
    decoded: Float[Tensor, "batch component d_model"], source: Float[Tensor, "batch component d_model"]
) -> Float[Tensor, "batch component"]:
    r"""Per-item :math:`\langle x, \hat x \rangle` over ``d_model``, in float32 or float64."""
    dtype = computation_dtype(decoded, source)
    return (decoded.to(dtype) * source.to(dtype)).sum(dim=-1)


def _cosine_similarity(
    source_norm: Tensor, decoded_norm: Tensor, inner_product: Tensor
) -> Float[Tensor, "batch component"]:
    """Per-item cosine similarity from the shared statistics (NaN where either vector is zero)."""
    return inner_product / (source_norm * decoded_norm)


def _norm_ratio(source_norm: Tensor, decoded_norm: Tensor) -> Float[Tensor, "batch component"]:
    """Per-item ``||x_hat|| / ||x||``, a source norm below :data:`NORM_RATIO_GUARD` replaced by 1 (no gradient)."""
    guarded = torch.where(source_norm.detach() < NORM_RATIO_GUARD, torch.ones_like(source_norm), source_norm)
    return decoded_norm / guarded


def _relative_reconstruction_bias_sums(
    decoded_norm: Tensor, inner_product: Tensor
) -> Float[Tensor, "batch component 2"]:
    """Per-item numerator and denominator of the relative reconstruction bias: ``[||x_hat||^2, <x, x_hat>]``."""
    return torch.stack([decoded_norm.square(), inner_product], dim=-1)


def _normalized_mse(squared_error: Tensor, source_norm: Tensor) -> Float[Tensor, "batch component"]:
    """Per-item ``mean_d e^2 / mean_d x^2`` (the ``1/d_model`` factors cancel)."""
    return squared_error / source_norm.square()


def _validated(decoded_activations: Tensor, source_activations: Tensor) -> tuple[Tensor, Tensor]:
    """``[batch, component, d_model]`` views of the inputs, checked to have one shape."""
    source = to_components("source_activations", source_activations, None)
    check_same_shape("decoded_activations", decoded_activations, "source_activations", source_activations)
    return decoded_activations.view(source.shape), source


def reconstruction_cosine_similarity(
    decoded_activations: Float[Tensor, "batch *component d_model"],
    source_activations: Float[Tensor, "batch *component d_model"],
    *,
    keep_batch_dim: bool = False,
) -> Float[Tensor, "..."]:
    """Mean over items of the cosine similarity between each source and its reconstruction.

    Args:
        decoded_activations: The reconstruction, shaped as ``source_activations``.
        source_activations: The SAE's input, ``[batch, d_model]`` or ``[batch, component, d_model]``.
        keep_batch_dim: Return the per-item values ``[batch, *component]`` instead of their batch mean.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import reconstruction_cosine_similarity
        >>> source = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
        >>> decoded = torch.tensor([[1.0, 1.0], [6.0, 8.0]])
        >>> reconstruction_cosine_similarity(decoded, source, keep_batch_dim=True)
        tensor([0.7071, 1.0000])
    """
    decoded, source = _validated(decoded_activations, source_activations)
    per_item = _cosine_similarity(_item_norm(source), _item_norm(decoded), _inner_product(decoded, source))
    return batch_output(per_item, source_activations.ndim == 3, keep_batch_dim)


def reconstruction_norm_ratio(
    decoded_activations: Float[Tensor, "batch *component d_model"],
    source_activations: Float[Tensor, "batch *component d_model"],
    *,
    keep_batch_dim: bool = False,
) -> Float[Tensor, "..."]:
    """Mean over items of ``||x_hat|| / ||x||`` (a source norm below ``1e-4`` counts as 1, as in SAELens).

    Args:
        decoded_activations: The reconstruction, shaped as ``source_activations``.
        source_activations: The SAE's input, ``[batch, d_model]`` or ``[batch, component, d_model]``.
        keep_batch_dim: Return the per-item values ``[batch, *component]`` instead of their batch mean.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import reconstruction_norm_ratio
        >>> source = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
        >>> decoded = torch.tensor([[0.0, 2.5], [0.5, 0.0]])
        >>> reconstruction_norm_ratio(decoded, source, keep_batch_dim=True)
        tensor([0.5000, 0.5000])
    """
    decoded, source = _validated(decoded_activations, source_activations)
    per_item = _norm_ratio(_item_norm(source), _item_norm(decoded))
    return batch_output(per_item, source_activations.ndim == 3, keep_batch_dim)


def relative_reconstruction_bias(
    decoded_activations: Float[Tensor, "batch *component d_model"],
    source_activations: Float[Tensor, "batch *component d_model"],
) -> Float[Tensor, "*component"]:
    r"""Relative reconstruction bias of a batch: ``sum_b ||x_hat_b||^2 / sum_b <x_b, x_hat_b>``.

    1 for an unbiased reconstruction, below 1 when the SAE shrinks its reconstructions (the Gated SAE paper's
    :math:`\gamma`; NaN for an empty batch).

    Args:
        decoded_activations: The reconstruction, shaped as ``source_activations``.
        source_activations: The SAE's input, ``[batch, d_model]`` or ``[batch, component, d_model]``.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import relative_reconstruction_bias
        >>> source = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
        >>> relative_reconstruction_bias(0.5 * source, source)  # a reconstruction shrunk by half
        tensor(0.5000)
    """
    decoded, source = _validated(decoded_activations, source_activations)
    sums = _relative_reconstruction_bias_sums(_item_norm(decoded), _inner_product(decoded, source)).sum(dim=0)
    ratio = sums[..., 0] / sums[..., 1]
    return ratio if source_activations.ndim == 3 else ratio.squeeze(-1)


def normalized_mse(
    decoded_activations: Float[Tensor, "batch *component d_model"],
    source_activations: Float[Tensor, "batch *component d_model"],
    *,
    keep_batch_dim: bool = False,
) -> Float[Tensor, "..."]:
    """OpenAI's normalised MSE: the mean over items of ``mean_d (x_hat - x)^2 / mean_d x^2``.

    Args:
        decoded_activations: The reconstruction, shaped as ``source_activations``.
        source_activations: The SAE's input, ``[batch, d_model]`` or ``[batch, component, d_model]``.
        keep_batch_dim: Return the per-item values ``[batch, *component]`` instead of their batch mean.

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import normalized_mse
        >>> source = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
        >>> decoded = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> normalized_mse(decoded, source, keep_batch_dim=True)
        tensor([0.2500, 0.0000])
    """
    decoded, source = _validated(decoded_activations, source_activations)
    per_item = _normalized_mse(_squared_error_sum(decoded, source), _item_norm(source))
    return batch_output(per_item, source_activations.ndim == 3, keep_batch_dim)
