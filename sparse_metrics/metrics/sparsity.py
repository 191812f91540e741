"""Sparsity penalty metric: coefficient times L1."""

from collections.abc import Hashable
from typing import Any, ClassVar

import torch
from torch import Tensor

from sparse_metrics._batch import FeatureSum, SaeBatch
from sparse_metrics._config import NumComponents, validate_arguments
from sparse_metrics._validation import check_sparsity_coefficient
from sparse_metrics.functional.sparsity import _lp, _lp_power_sum, _p_root, _sparsity_from_l1, check_p
from sparse_metrics.metrics._base import ItemMeanMetric

__all__ = ["SparsityLoss"]


def _lp_partial(batch: SaeBatch, owner: str, p: float, decoder_norm_weighting: bool) -> Tensor:
    """``sum_i a_i^p`` over this process's features (the Lp penalty's feature sum, before any root)."""
    row_norms = batch.decoder_row_norms(owner) if decoder_norm_weighting else None
    return _lp_power_sum(batch.require("learned_activations", owner), row_norms, p)


class SparsityLoss(ItemMeanMetric):
    r"""Sparsity penalty: the coefficient times the L1 absolute loss, averaged over items.

    .. math:: \mathrm{sparsity}_c = \frac{1}{N} \sum_{b=1}^{N} \lambda_c \sum_{i=1}^{d_{sae}} |f_{bci}|

    The coefficient is read at every update, so a warm-up schedule can change it between steps
    (``metric.sparsity_coefficient = value``); the epoch value is then the mean of each step's penalty. 0 is
    allowed, negative values are rejected. A ``[component]`` tensor gives each component its own coefficient.
    A tensor coefficient is checked (one read of its values) when set, never during updates.

    ``update(learned_activations, decoder_weight=None)`` takes ``[batch, d_sae]`` or
    ``[batch, component, d_sae]``. With ``decoder_norm_weighting=True`` each ``|f_i|`` is weighted by the L2 norm
    of decoder row ``i`` (SAELens / Anthropic style) and ``decoder_weight``, feature-major
    ``[*component, d_sae, d_model]``, is required; ``forward`` is then differentiable with respect to it too:

    .. math:: \mathrm{sparsity}_c = \frac{1}{N} \sum_{b=1}^{N} \lambda_c \sum_{i=1}^{d_{sae}} |f_{bci}|\,
       \lVert W_{ci} \rVert_2

    Args:
        sparsity_coefficient: A non-negative number, or a ``[component]`` tensor.
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        keep_batch_dim: Keep per-item values.
        decoder_norm_weighting: Weight each activation by its decoder row's L2 norm.
        p: The exponent of an Lp penalty (``p > 0``; 1, the default: the L1 above, bit for bit). With ``p_root``
            the per-item value is the p-norm :math:`\lambda_c (\sum_i (|f_{bci}| \lVert W_{ci} \rVert_2)^p)^{1/p}`
            (SAELens' ``lp_norm``, which always weights by the decoder norms; dictionary_learning's p-annealing
            ``"Lp"``), without it :math:`\lambda_c \sum_i (|f_{bci}| \lVert W_{ci} \rVert_2)^p`
            (dictionary_learning's ``"Lp^p"``); the weight is 1 without ``decoder_norm_weighting``.
        p_root: Take the p-th root (see ``p``).
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from sparse_metrics import SparsityLoss
        >>> metric = SparsityLoss(sparsity_coefficient=0.5)
        >>> metric(learned_activations=torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 3.0]]))
        tensor(1.5000)
        >>> metric.sparsity_coefficient = 0.0  # e.g. a warm-up from zero
        >>> metric(learned_activations=torch.tensor([[1.0, 1.0, 1.0]]))
        tensor(0.)
        >>> metric.compute()  # mean over the three items seen
        tensor(1., dtype=torch.float64)
        >>> weighted = SparsityLoss(sparsity_coefficient=0.5, decoder_norm_weighting=True)
        >>> decoder_weight = torch.tensor([[3.0, 4.0], [0.0, 1.0], [2.0, 0.0]])  # row norms 5, 1, 2
        >>> weighted(learned_activations=torch.tensor([[1.0, -2.0, 0.0]]), decoder_weight=decoder_weight)
        tensor(3.5000)
    """

    _state_prefix: ClassVar[str] = "sparsity"
    _positional_inputs: ClassVar[tuple[str, ...]] = ("learned_activations", "decoder_weight")

    _coefficient_tensor: Tensor | None

    @property
    def _lp_sum(self) -> FeatureSum:
        return FeatureSum(_lp_partial, (self.p, self.decoder_norm_weighting))

    def _batch_uses(self) -> frozenset[Hashable]:
        if self.p != 1:
            return frozenset({self._lp_sum})
        return frozenset({"weighted_l1" if self.decoder_norm_weighting else "l1"})

    @validate_arguments
    def __init__(
        self,
        sparsity_coefficient: float | Tensor = 1e-3,
        num_components: NumComponents = 1,
        *,
        keep_batch_dim: bool = False,
        decoder_norm_weighting: bool = False,
        p: float = 1.0,
        p_root: bool = True,
        **kwargs: Any,
    ) -> None:
        p = check_p(p)
        super().__init__(num_components, keep_batch_dim=keep_batch_dim, **kwargs)
        self.decoder_norm_weighting = decoder_norm_weighting
        self.p = p
        self.p_root = p_root
        # A tensor coefficient lives in a (non-persistent) buffer so that it follows the metric across devices.
        self.register_buffer("_coefficient_tensor", None, persistent=False)
        self._coefficient_number = 0.0
        self.sparsity_coefficient = sparsity_coefficient
        self._add_configuration_marker()

    def _configuration(self) -> dict[str, Any]:
        configuration = {**super()._configuration(), "decoder_norm_weighting": self.decoder_norm_weighting}
        if self.p != 1:  # the L1's configuration (and so its checkpoints and compute groups) stays as it was
            configuration |= {"p": self.p, "p_root": self.p_root}
        return configuration

    def _merge_guard(self) -> Any:
        """The initial coefficient: a schedule may change it, so checkpoints do not compare it, compute groups do."""
        coefficient = self.sparsity_coefficient
        return coefficient.tolist() if isinstance(coefficient, Tensor) else coefficient

    @property
    def sparsity_coefficient(self) -> float | Tensor:
        """The coefficient applied at the next update: a float, or a ``[component]`` / 0-d tensor."""
        tensor: Tensor | None = self._coefficient_tensor
        return self._coefficient_number if tensor is None else tensor

    @sparsity_coefficient.setter
    def sparsity_coefficient(self, value: float | Tensor) -> None:
        value = check_sparsity_coefficient(value, self.num_components, check_values=True)
        if isinstance(value, Tensor):
            # A copy: an in-place edit of the caller's tensor must not bypass the check above.
            self._coefficient_tensor = value.detach().to(device=self.device, copy=True)
        else:
            self._coefficient_tensor = None
            self._coefficient_number = value

    def _per_item(self, batch: SaeBatch) -> Tensor:
        owner = type(self).__name__
        if not self.decoder_norm_weighting and self.p == 1:
            return self._from_l1(batch.l1(owner))  # the batch's shared L1
        why = (
            "It is required with `decoder_norm_weighting=True`: the feature-major decoder [*component, d_sae, d_model]."
        )
        if self.p == 1:
            return self._from_l1(batch.weighted_l1(owner, why))
        row_norms = batch.decoder_row_norms(owner, why) if self.decoder_norm_weighting else None
        learned = batch.require("learned_activations", owner)
        if batch.sharding is None:
            return self._from_l1(_lp(learned, row_norms, self.p, self.p_root))
        # Sharded: the shards' sums of a_i^p cross the feature group, the root is taken of the whole sum.
        power_sum = batch.sum_over_features(self._lp_sum, owner)
        return self._from_l1(_p_root(power_sum, self.p) if self.p_root else power_sum)

    def _from_l1(self, l1_per_item: Tensor) -> Tensor:
        """The per-item penalty from per-item (weighted) L1 values."""
        return _sparsity_from_l1(l1_per_item, self.sparsity_coefficient)

    def extra_repr(self) -> str:
        """Show the coefficient in ``repr``."""
        coefficient = self.sparsity_coefficient
        shown = coefficient.tolist() if isinstance(coefficient, torch.Tensor) else coefficient
        weighting = ", decoder_norm_weighting=True" if self.decoder_norm_weighting else ""
        lp = f", p={self.p}" + ("" if self.p_root else ", p_root=False") if self.p != 1 else ""
        return f"sparsity_coefficient={shown}, num_components={self.num_components}{weighting}{lp}"
