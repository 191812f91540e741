r"""The running inference threshold of a BatchTopK SAE: a moving average of each step's smallest positive activation.

A BatchTopK SAE keeps the largest ``k * batch`` activations of a batch; at inference it replaces that batch-coupled
selection by a JumpReLU with one threshold :math:`\theta`, estimated during training from
:math:`m_t = \min\{f > 0\}` (over the items and features of step :math:`t`, per component):

.. math:: \theta_t = (1 - \mu)\, \theta_{t-1} + \mu\, m_t

The three peers differ in the details, each reproduced by a ``convention``:

- ``"saelens"``: :math:`\mu` = 0.01 (``topk_threshold_lr``), float64, :math:`\theta_0 = 0`, every step; a step with
  no positive activation leaves :math:`\theta` as it is.
- ``"dictionary_learning"``: :math:`\mu = 1 - \beta` with :math:`\beta` = 0.999 (``threshold_beta``), float32,
  only on steps after ``threshold_start_step`` = 1000; :math:`\theta` is -1 (unset) until its first update, which
  sets it to :math:`m_t`; a step with no positive activation has :math:`m_t = 0` (at the first update the peer
  fails assigning a float to its buffer; here :math:`\theta` becomes 0).
- ``"saev"``: :math:`\mu` = 0.1 (``BatchTopK.momentum``), float32 (the term :math:`\mu m_t` in the activations'
  dtype), :math:`\theta_0 = 0`, every step; a step with no positive activation leaves :math:`\theta` as it is
  (saev raises: the minimum of an empty tensor).
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from sparse_metrics._validation import to_components

__all__ = ["CONVENTIONS", "batchtopk_threshold"]

Convention = Literal["saelens", "dictionary_learning", "saev"]
#: The conventions, each with its (momentum, start step, initial threshold) defaults.
CONVENTIONS: dict[str, tuple[float, int, float]] = {
    "saelens": (0.01, -1, 0.0),  # topk_threshold_lr
    "dictionary_learning": (1 - 0.999, 1000, -1.0),  # 1 - threshold_beta, threshold_start_step
    "saev": (0.1, -1, 0.0),  # BatchTopK.momentum
}


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(
            f"`convention` must be one of {', '.join(repr(name) for name in CONVENTIONS)}, got {convention!r}."
        )


def _min_positive(learned: Float[Tensor, "batch component d_sae"]) -> Float[Tensor, " component"]:
    """Smallest positive activation per component, float64 (exact for every input dtype); inf where there is none."""
    components = learned.shape[1]
    if learned.shape[0] == 0:  # a shape, not data: no synchronisation
        return torch.full((components,), torch.inf, dtype=torch.float64, device=learned.device)
    values = learned.detach()
    positive = torch.where(values > 0, values, torch.full_like(values, torch.inf))
    return positive.amin(dim=(0, 2)).to(torch.float64)


def _threshold_step(
    threshold: Float[Tensor, " component"],
    min_positive: Float[Tensor, " component"],
    apply: Tensor | bool,
    *,
    convention: str,
    momentum: float,
    input_dtype: torch.dtype,
) -> Float[Tensor, " component"]:
    """One update of the float64 ``threshold`` state by a step whose minimum positive activation is ``min_positive``.

    Each convention runs the peer's arithmetic in the peer's dtype and order, so that the result is bitwise the
    peer's; a float32 value is held exactly in the float64 state. ``apply`` (a bool or 0-d bool tensor) says whether
    the step counts (dictionary_learning's start step); nothing here reads a tensor's value on the host.
    """
    found = min_positive.isfinite()
    if convention == "saelens":
        updated = (1 - momentum) * threshold + momentum * min_positive
        keep = ~found
    elif convention == "dictionary_learning":
        current = threshold.to(torch.float32)
        minimum = torch.where(found, min_positive, torch.zeros_like(min_positive)).to(torch.float32)
        beta = 1 - momentum
        updated = torch.where(current < 0, minimum, (beta * current) + ((1 - beta) * minimum)).to(torch.float64)
        keep = torch.zeros_like(found)
    else:  # saev: the EMA in its float32 buffer, the new term in the activations' dtype
        current = threshold.to(torch.float32)
        term = momentum * min_positive.to(input_dtype)
        updated = (current * (1 - momentum) + term).to(torch.float32).to(torch.float64)  # its buffer is float32
        keep = ~found
    keep = keep | ~torch.as_tensor(apply, device=threshold.device)
    return torch.where(keep, threshold, updated)


def batchtopk_threshold(
    learned_activations: Float[Tensor, "batch *component d_sae"],
    threshold: Float[Tensor, "*component"] | None = None,
    *,
    convention: Convention = "saelens",
    momentum: float | None = None,
) -> Float[Tensor, "*component"]:
    """The BatchTopK inference threshold after one more training step (float64; no start step: the step counts).

    Args:
        learned_activations: The step's BatchTopK activations, ``[batch, d_sae]`` or ``[batch, component, d_sae]``.
        threshold: The threshold before the step, ``[*component]``; None: the convention's initial value.
        convention: ``"saelens"``, ``"dictionary_learning"`` or ``"saev"`` (see the module).
        momentum: The weight of the step's minimum; None: the convention's (0.01, 1 - 0.999, 0.1).

    Example:
        >>> import torch
        >>> from sparse_metrics.functional import batchtopk_threshold
        >>> f = torch.tensor([[0.0, 2.0, 0.5], [1.0, 0.0, 0.0]])
        >>> batchtopk_threshold(f)  # 0.99 * 0 + 0.01 * 0.5
        tensor(0.0050, dtype=torch.float64)
        >>> batchtopk_threshold(f, convention="dictionary_learning")  # the first update takes the minimum
        tensor(0.5000, dtype=torch.float64)
    """
    _check_convention(convention)
    default_momentum, _, initial = CONVENTIONS[convention]
    learned = to_components("learned_activations", learned_activations, None)
    components = learned.shape[1]
    if threshold is None:
        state = torch.full((components,), initial, dtype=torch.float64, device=learned.device)
    else:
        state = threshold.to(torch.float64).reshape(components)
    updated = _threshold_step(
        state,
        _min_positive(learned),
        True,
        convention=convention,
        momentum=default_momentum if momentum is None else momentum,
        input_dtype=learned.dtype,
    )
    return updated if learned_activations.ndim == 3 else updated.squeeze(0)
