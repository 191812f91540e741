"""The TopK auxiliary loss (AuxK) as a metric: per-item means, or a ratio pooled over every item on every rank."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple, cast

import torch
from torch import Tensor
from torchmetrics.utilities.data import dim_zero_cat

from sparse_metrics._batch import SaeBatch
from sparse_metrics._config import NumComponents, PositiveInt, validate_arguments
from sparse_metrics.functional.auxiliary_k import (
    AuxiliaryKConvention,
    AuxiliaryKTerms,
    batch_ratio,
    batch_terms,
    check_convention,
    finish_ratio,
)
from sparse_metrics.functional.explained_variance import BatchMoments, _centred_batch
from sparse_metrics.metrics._base import ACCUMULATOR_DTYPE, SaeMetric, _detached
from sparse_metrics.metrics.explained_variance import DeferredStatistics, _ChanMerge, _unpack

__all__ = ["AuxiliaryKLoss"]


class _Contribution(NamedTuple):
    terms: AuxiliaryKTerms
    moments: BatchMoments | None  # the normaliser's, of a normalised convention, detached
    variance: Tensor | None = None  # the normaliser's batch variance Σ_{b,d} (v - v̄)², differentiable


class AuxiliaryKLoss(SaeMetric):
    r"""The TopK auxiliary loss: the top-``k_aux`` dead latents reconstruct the (detached) residual.

    .. math:: \hat e = \operatorname{act}\big(\operatorname{topk}_{k_{aux}}(h_{\text{dead}})\big)\, W_{dec}
       \,(+\, b_{dec}), \qquad \mathrm{AuxK} = s\cdot\frac{\operatorname{reduce}\,(\hat e - r)^2}{\text{normaliser}},
       \qquad r = x - \hat x

    Each ``convention`` reproduces one peer's value and gradients, including its own scale
    :math:`s = \min(n_{dead}/k_{aux}, 1)` and normaliser, without its outer coefficient (weight it in
    :class:`TotalLoss`); see :func:`~sparse_metrics.functional.auxiliary_k_loss` and ``docs/metrics/auxk.md``:

    ======================= ======== ============== ===================== ======= ====================== ==============
    convention              ReLU(h)  ``b_dec``      ``k_aux`` (default)   scale   normaliser             reduce
    ======================= ======== ============== ===================== ======= ====================== ==============
    ``"openai"``            yes      decode, target 256, all latents      no      residual variance      mean (b, d)
    ``"sparsify"``          yes      no             min(d_model//2, dead) yes     source variance        sum (b, d)
    ``"dictionary_learning"`` yes    no             min(d_model//2, dead) no      residual variance      mean_b Σ_d
    ``"saelens"``           no       no             min(d_model//2, dead) yes     none                   mean_b Σ_d
    ``"saev"``              no       decode         min(512, dead)        no      none                   mean (b, d)
    ======================= ======== ============== ===================== ======= ====================== ==============

    ``update(source_activations, decoded_activations, pre_activations, decoder_weight, dead_mask,
    decoder_bias=None)``: activations ``[batch, *component, width]``, the feature-major decoder
    ``[*component, d_sae, d_model]``, ``dead_mask`` ``[*component, d_sae]`` (e.g. :class:`DeadFeatures`'
    ``dead_mask()``). ``decoder_bias`` is required by ``"openai"`` (its gradient) and ``"saev"`` (its value).

    - ``"saelens"`` and ``"saev"`` are per-item means: ``compute()`` is the mean over every item seen (each item
      scaled by its step's dead count), ``keep_batch_dim=True`` keeps the per-item values.
    - ``"openai"``, ``"sparsify"`` and ``"dictionary_learning"`` are batch ratios: ``forward`` returns the batch's
      ratio (differentiable as the peer's), ``compute()`` the ratio pooled over every item on every process
      (numerator summed, normaliser a pooled variance kept as Chan-merged (count, mean, M2) in float64, so
      ``d_model`` is required); ``keep_batch_dim`` is refused.

    Degenerate batches give what the peer gives: 0 without a dead latent (except ``"openai"``, whose value does not
    vanish), float32's max for ``"openai"``/``"dictionary_learning"`` where the normaliser is 0 (one item), inf for
    ``"sparsify"``. ``prefix_sizes`` (``"saelens"`` only; needs ``learned_activations`` and ``decoder_bias``) gives
    SAELens' Matryoshka AuxK, the sum over levels of each level's AuxK. SAELens' TopK SAEs decode
    ``f / ‖W_dec,i‖`` by default: pass ``W_dec / W_dec.norm(dim=-1, keepdim=True)`` as ``decoder_weight`` then.

    Args:
        num_components: Number of SAEs trained side by side (the ``component`` axis).
        k_aux: How many dead latents decode; None takes the convention's default.
        convention: The peer whose AuxK this is.
        d_model: The activations' width: required by the ratio conventions (the size of their state).
        prefix_sizes: SAELens' Matryoshka widths (cumulative, global feature indices).
        keep_batch_dim: Keep per-item values (per-item conventions only).
        kwargs: Passed to :class:`torchmetrics.Metric` (and ``nan_strategy``).

    Example:
        >>> import torch
        >>> from sparse_metrics import AuxiliaryKLoss
        >>> metric = AuxiliaryKLoss(k_aux=1, convention="saelens")
        >>> source = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> decoded = torch.zeros(2, 2)
        >>> pre = torch.tensor([[3.0, 1.0, -1.0], [0.0, 2.0, 5.0]])
        >>> decoder = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> dead = torch.tensor([False, True, True])
        >>> metric(source, decoded, pre, decoder, dead)
        tensor(18.)
    """

    is_differentiable = True
    higher_is_better = False
    is_loss_term = True
    plot_lower_bound = 0.0

    #: The normalised conventions' pooled statistics, as the FVU keeps its own (queued, then merged at once).
    auxk_statistics = DeferredStatistics("auxk_statistics")

    _positional_inputs: ClassVar[tuple[str, ...]] = (
        "source_activations",
        "decoded_activations",
        "pre_activations",
        "decoder_weight",
        "dead_mask",
        "decoder_bias",
    )

    @validate_arguments
    def __init__(
        self,
        num_components: NumComponents = 1,
        *,
        k_aux: PositiveInt | None = None,
        convention: AuxiliaryKConvention = "openai",
        d_model: PositiveInt | None = None,
        prefix_sizes: Sequence[int] | None = None,
        keep_batch_dim: bool = False,
        **kwargs: Any,
    ) -> None:
        self._rule = check_convention(convention, prefix_sizes)
        if self._rule.normaliser is not None:
            if keep_batch_dim:
                raise ValueError(
                    f"`keep_batch_dim=True` needs a per-item value, which convention={convention!r} (a batch ratio) "
                    "lacks; it is defined for 'saelens' and 'saev'."
                )
            if d_model is None:
                raise ValueError(
                    f"convention={convention!r} is a ratio pooled over every item: pass `d_model` (the width of the "
                    "activations), the size of its variance statistics."
                )
        super().__init__(num_components, **kwargs)
        self.k_aux = k_aux
        self.convention = convention
        self.d_model = d_model
        self.prefix_sizes = None if prefix_sizes is None else tuple(prefix_sizes)
        self._keep_batch_dim = keep_batch_dim
        if self._normalised:
            assert d_model is not None
            self.add_state(
                "auxk_statistics",
                torch.zeros(num_components, d_model + 3, dtype=ACCUMULATOR_DTYPE),
                dist_reduce_fx=_ChanMerge(d_model),
            )
        else:
            self.add_state("auxk_sum", torch.zeros(num_components, dtype=ACCUMULATOR_DTYPE), dist_reduce_fx="sum")
            self.add_state("auxk_count", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
            self.add_state("auxk_per_item", [], dist_reduce_fx="cat")
        self._add_configuration_marker()

    @property
    def _normalised(self) -> bool:
        return self._rule.normaliser is not None

    def _configuration(self) -> dict[str, Any]:
        return {
            **super()._configuration(),
            "k_aux": self.k_aux,
            "convention": self.convention,
            "d_model": self.d_model,
            "prefix_sizes": None if self.prefix_sizes is None else list(self.prefix_sizes),
            "keep_batch_dim": self._keep_batch_dim,
        }

    @property
    def keep_batch_dim(self) -> bool:
        """Whether ``compute``/``forward`` return per-item values ``[item, *component]`` (fixed at construction)."""
        return self._keep_batch_dim

    @property
    def _value_has_axis(self) -> bool:
        return self._keep_batch_dim

    def _contribution(self, batch: SaeBatch) -> _Contribution:
        owner = type(self).__name__
        self._check_device(batch)
        if self.d_model is not None:
            batch.require_width("source_activations", self.d_model, "d_model", owner)
        terms = batch_terms(batch, self._rule, self.convention, self.k_aux, self.prefix_sizes, owner)
        if not self._normalised:
            return _Contribution(terms, None)
        values = terms.normaliser_input
        assert values is not None
        # One centring pass gives the batch ratio's denominator and (shifted in float64) the pooled state.
        variance, mean, residual_sum = _centred_batch(values, values.dtype)
        numerator = terms.squared_error.detach().sum(dim=0, dtype=self.__dict__["auxk_statistics"].dtype)
        if self._rule.feature_mean:  # OpenAI's means over (b, d): the ratio of sums, d cancels
            numerator = numerator * values.shape[-1]
        moments = BatchMoments(values.shape[0], _detached(variance), mean, residual_sum, numerator)
        return _Contribution(terms, moments, variance)

    def _finite_items(self, batch: SaeBatch, contribution: _Contribution) -> Tensor | None:
        """The items whose inputs are all finite (a live latent's NaN included: the peers' masks may hide it)."""
        owner = type(self).__name__
        finite = contribution.terms.squared_error.detach().isfinite().all(dim=1)
        for name in self._batched_inputs():
            finite = finite & batch.finite_items(name, owner)
        return finite

    def _batched_inputs(self) -> tuple[str, ...]:
        if self.prefix_sizes is not None:
            return ("source_activations", "learned_activations", "pre_activations")
        return ("source_activations", "decoded_activations", "pre_activations")

    def _record(self, contribution: _Contribution) -> None:
        squared = contribution.terms.squared_error
        if squared.shape[0] == 0:
            return
        if contribution.moments is not None:
            self._queue("auxk_statistics", (contribution.moments,))
            return
        per_item = squared.detach()
        total = self._state("auxk_sum")
        self.auxk_sum = total + per_item.sum(dim=0, dtype=total.dtype)
        self.auxk_count = self._state("auxk_count") + per_item.shape[0]
        if self._keep_batch_dim:
            self._rows().append(per_item.to(total.dtype))

    def _rows(self) -> list[Tensor]:
        rows: list[Tensor] = getattr(self, "auxk_per_item")  # noqa: B009  # a list state
        return rows

    def _state(self, name: str) -> Tensor:
        value: Tensor = getattr(self, name)
        return value

    def _batch_mean(self, contribution: _Contribution) -> Tensor:
        """The batch's value ``[component]``, differentiable: the batch ratio, or the batch mean."""
        if self._normalised:
            return batch_ratio(contribution.terms, self._rule, contribution.variance)
        return contribution.terms.squared_error.mean(dim=0)

    def _value(self, contribution: _Contribution) -> Tensor:
        if self._keep_batch_dim:
            values = contribution.terms.squared_error
            return values.squeeze(-1) if self.num_components == 1 else values
        return self._squeeze(self._batch_mean(contribution))

    def _epoch_mean(self) -> Tensor:
        """The value ``[component]`` over every item accumulated (or synced): the pooled ratio, or the mean."""
        if self._normalised:
            statistics, _ = _unpack(self._state("auxk_statistics"), cast(int, self.d_model))
            return finish_ratio(statistics.squared_error, statistics.m2, self._rule)
        return self._state("auxk_sum") / self._state("auxk_count")

    def compute(self) -> Tensor:
        """The value over every item seen on every process, float64 ``[component]`` (0-d for one component).

        With ``keep_batch_dim``, every per-item value ``[item, *component]``. NaN before any item.
        """
        if self._keep_batch_dim:
            rows = self._rows()
            values = dim_zero_cat(rows) if rows else self._empty_list_state("auxk_per_item")
            return values.squeeze(-1) if self.num_components == 1 else values
        return self._squeeze(self._epoch_mean())

    def _empty_list_state(self, name: str) -> Tensor:
        """An empty ``[0, component]`` tensor: the rows of a rank that kept no per-item values."""
        return torch.zeros(0, self.num_components, dtype=self._state("auxk_sum").dtype, device=self.device)

    def extra_repr(self) -> str:
        """Show the convention and ``k_aux`` in ``repr``."""
        prefixes = "" if self.prefix_sizes is None else f", prefix_sizes={list(self.prefix_sizes)}"
        return f"convention={self.convention!r}, k_aux={self.k_aux}, num_components={self.num_components}{prefixes}"
