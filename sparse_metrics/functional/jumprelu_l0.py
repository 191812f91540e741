r"""JumpReLU L0 penalty: the number of latents above their threshold, with a straight-through gradient.

.. math:: \mathrm{L0}_{bc} = \sum_i H(h_{bci} - \theta_{ci})

:math:`H` is the Heaviside step, whose derivative is zero almost everywhere; the backward pass replaces it by the
rectangle-kernel estimate of the JumpReLU paper (Rajamanoharan et al., 2024), with bandwidth :math:`\varepsilon`:

.. math:: \frac{\partial H(h - \theta)}{\partial \theta} \approx -\frac{1}{\varepsilon}
   K\!\left(\frac{h - \theta}{\varepsilon}\right), \qquad K(u) = \mathbb{1}[-\tfrac12 < u < \tfrac12]

Two conventions:

- ``"saelens"`` (SAELens ``Step``, bandwidth 0.05): the step acts on the pre-activations :math:`h`; the threshold
  gets the estimate, :math:`h` gets nothing unless ``ste_to_input=True`` (then :math:`+\frac1\varepsilon K`, the
  negation of the threshold's). With ``target_l0`` :math:`T`, the per-item value is SAELens' quadratic mode
  :math:`\frac{2}{T}(\mathrm{L0}_b - T)^2`.
- ``"dictionary_learning"`` (its ``StepFunction``, bandwidth 0.001): the step acts on the JumpReLU output
  :math:`f = h\,\mathbb{1}[h > \theta]`, so the kernel is evaluated at :math:`(f - \theta)/\varepsilon` (an inactive
  latent sits at :math:`-\theta/\varepsilon`); only the threshold gets a gradient. The bandwidth is rounded to
  float32, as its ``StepFunction`` stores it. With ``target_l0`` the value is
  :math:`(\overline{\mathrm{L0}} / T - 1)^2` of the batch-mean L0 (its trainer multiplies it by its coefficient).
"""

import inspect
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from sparse_metrics._validation import autocast_disabled, check_floating, computation_dtype, to_components
from sparse_metrics.functional._output import batch_output

__all__ = ["jumprelu_l0_loss"]

Convention = Literal["saelens", "dictionary_learning"]
#: Each convention's default bandwidth.
DEFAULT_BANDWIDTH: dict[str, float] = {"saelens": 0.05, "dictionary_learning": 0.001}
CONVENTIONS = tuple(DEFAULT_BANDWIDTH)


def _rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel ``1[-1/2 < u < 1/2]`` in ``u``'s dtype."""
    return ((u > -0.5) & (u < 0.5)).to(u)


class _StraightThroughStep(torch.autograd.Function):
    """``H(x - threshold)``; backward: the rectangle-kernel estimate to the threshold (and to ``x`` if asked)."""

    @staticmethod
    def forward(x: Tensor, threshold: Tensor, bandwidth: float, to_input: bool) -> Tensor:
        return (x > threshold).to(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, threshold, bandwidth, to_input = inputs
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        ctx.to_input = to_input

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, Tensor, None, None]:
        x, threshold = ctx.saved_tensors
        estimate = (1.0 / ctx.bandwidth) * _rectangle((x - threshold) / ctx.bandwidth) * grad_output
        threshold_grad = -estimate.sum(dim=0)  # the threshold is shared by every item
        return (estimate if ctx.to_input else None), threshold_grad, None, None


# A precomputed signature for Function.apply's binding of the arguments (see ``_AbsoluteSum`` in l1_absolute).
_StraightThroughStep.forward.__signature__ = inspect.signature(_StraightThroughStep.forward)  # type: ignore[attr-defined]


def _jumprelu_l0(
    pre_activations: Float[Tensor, "batch component d_sae"],
    threshold: Float[Tensor, "component d_sae"],
    *,
    bandwidth: float,
    convention: str,
    ste_to_input: bool,
) -> Float[Tensor, "batch component"]:
    """Per-item count of latents above threshold, with the convention's straight-through gradient."""
    dtype = computation_dtype(pre_activations, threshold)
    with autocast_disabled(pre_activations.device):
        h, theta = pre_activations.to(dtype), threshold.to(dtype)
        if convention == "dictionary_learning":
            # Its step reads the JumpReLU output f, through which no gradient flows back (its step passes zeros).
            h = h.detach()
            h = h * (h > theta.detach()).to(h)
        step: Tensor = _StraightThroughStep.apply(h, theta, bandwidth, ste_to_input)  # type: ignore[no-untyped-call]
        return step.sum(dim=-1)


def _per_item_target(l0: Tensor, target_l0: float | None, convention: str) -> Tensor:
    """The per-item value: the count, or SAELens' quadratic ``2/T (L0 - T)^2`` with a target."""
    if target_l0 is None or convention != "saelens":
        return l0
    return 2 / target_l0 * (l0 - target_l0) ** 2


def _batch_target(mean_l0: Tensor, target_l0: float | None, convention: str) -> Tensor:
    """dictionary_learning's ``(L0 / T - 1)^2`` of a mean L0 (the identity otherwise)."""
    if target_l0 is None or convention != "dictionary_learning":
        return mean_l0
    return ((mean_l0 / target_l0) - 1).pow(2)


def _jumprelu_l0_update(
    pre_activations: Tensor,
    threshold: Tensor,
    num_components: int | None = None,
    *,
    bandwidth: float,
    target_l0: float | None,
    convention: str,
    ste_to_input: bool,
) -> Float[Tensor, "batch component"]:
    """Validate the inputs; per-item values ``[batch, component]`` (before dictionary_learning's batch target)."""
    h = to_components("pre_activations", pre_activations, num_components)
    expected = list(h.shape[1:]) if pre_activations.ndim == 3 else [h.shape[-1]]
    if not isinstance(threshold, Tensor) or list(threshold.shape) != expected:
        shown = list(threshold.shape) if isinstance(threshold, Tensor) else type(threshold).__name__
        raise ValueError(f"`threshold` must have shape [*component, d_sae] = {expected}, got {shown}.")
    theta = check_floating("threshold", threshold)
    theta = theta if pre_activations.ndim == 3 else theta.unsqueeze(0)
    l0 = _jumprelu_l0(h, theta, bandwidth=bandwidth, convention=convention, ste_to_input=ste_to_input)
    return _per_item_target(l0, target_l0, convention)


def check_jumprelu_options(
    convention: str, bandwidth: float | None, target_l0: float | None, ste_to_input: bool, keep_batch_dim: bool
) -> float:
    """Check the options together; return the bandwidth (the convention's default for ``None``)."""
    if convention not in DEFAULT_BANDWIDTH:
        raise ValueError(f"`convention` must be one of {list(CONVENTIONS)}, got {convention!r}.")
    if ste_to_input and convention != "saelens":
        raise ValueError(
            f"`ste_to_input=True` is SAELens' option (`jumprelu_ste_to_input`); convention {convention!r} passes no "
            "gradient to the pre-activations. Use convention='saelens'."
        )
    if keep_batch_dim and target_l0 is not None and convention == "dictionary_learning":
        raise ValueError(
            "`keep_batch_dim=True` cannot apply with `target_l0` under convention 'dictionary_learning': its "
            "(L0 / target_l0 - 1)^2 is a function of the batch-mean L0, with no per-item value."
        )
    for name, value in (("bandwidth", bandwidth), ("target_l0", target_l0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not value > 0):
            raise ValueError(f"`{name}` must be a number > 0 (or None), got {value!r}.")
    width = float(DEFAULT_BANDWIDTH[convention] if bandwidth is None else bandwidth)
    if convention == "dictionary_learning":
        # Its StepFunction keeps the bandwidth in a float32 tensor and reads it back: 0.001 becomes 0.0010000000475.
        width = float(torch.tensor(width, dtype=torch.float32))
    return width


def jumprelu_l0_loss(
    pre_activations: Float[Tensor, "batch *component d_sae"],
    threshold: Float[Tensor, "*component d_sae"],
    *,
    bandwidth: float | None = None,
    target_l0: float | None = None,
    convention: Convention = "saelens",
    ste_to_input: bool = False,
    keep_batch_dim: bool = False,
) -> Float[Tensor, "..."]:
    """JumpReLU L0 penalty of a batch: the mean number of latents above threshold, with a straight-through gradient.

    Args:
        pre_activations: The encoder's pre-activations ``h``, ``[batch, d_sae]`` or ``[batch, component, d_sae]``.
        threshold: The JumpReLU threshold ``[*component, d_sae]``.
        bandwidth: The kernel's width; ``None``: the convention's (0.05 for SAELens, 0.001 for dictionary_learning).
        target_l0: A target L0: SAELens' per-item quadratic ``2/T (L0 - T)^2``, or dictionary_learning's
            ``(mean L0 / T - 1)^2`` of the batch mean.
        convention: ``"saelens"`` or ``"dictionary_learning"`` (see the module).
        ste_to_input: Also pass the estimate to ``h`` (SAELens' ``jumprelu_ste_to_input``).
        keep_batch_dim: Return per-item values ``[batch, *component]`` (not with dictionary_learning's target).

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import jumprelu_l0_loss
        >>> h = torch.tensor([[0.51, 0.2, 0.9], [0.0, 0.7, 0.3]])
        >>> threshold = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
        >>> loss = jumprelu_l0_loss(h, threshold)
        >>> loss
        tensor(1.5000, grad_fn=<SqueezeBackward1>)
        >>> loss.backward()
        >>> threshold.grad  # -(1/0.05) / 2 items for the one pre-activation within 0.025 of its threshold
        tensor([-10.,  -0.,  -0.])
    """
    width = check_jumprelu_options(convention, bandwidth, target_l0, ste_to_input, keep_batch_dim)
    per_item = _jumprelu_l0_update(
        pre_activations, threshold, None, bandwidth=width, target_l0=target_l0, convention=convention,
        ste_to_input=ste_to_input,
    )  # fmt: skip
    if keep_batch_dim:
        return batch_output(per_item, pre_activations.ndim == 3, True)
    value = _batch_target(per_item.mean(dim=0), target_l0, convention)
    return value if pre_activations.ndim == 3 else value.squeeze(-1)
