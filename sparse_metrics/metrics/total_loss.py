"""The differentiable total of a collection's loss terms, as a member of its own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from sparse_metrics._batch import SAE_INPUTS, SaeBatch, check_input_names, inputs_of
from sparse_metrics._config import ComponentReduction
from sparse_metrics._distributed import synced_states
from sparse_metrics.metrics._base import ItemMeanMetric, SaeMetric

__all__ = ["TotalLoss"]


class TotalLoss(SaeMetric):
    r"""The differentiable total of loss terms, reduced over components: a :class:`SparseAutoencoderLoss` member.

    .. math:: \mathrm{loss} = \operatorname{reduce}_c \sum_t \overline{\mathrm{term}}_{t,c}

    where :math:`\overline{\mathrm{term}}_{t,c}` is term :math:`t`'s mean over the batch (``forward``) or over every
    item seen on every process (``compute``). The terms are the collection's members, which record the batch: this
    metric keeps no state of its own, and alone it records nothing.
    """

    is_differentiable = True
    higher_is_better = False

    _positional_inputs: ClassVar[tuple[str, ...]] = SAE_INPUTS

    def __init__(
        self, terms: Sequence[ItemMeanMetric], component_reduction: ComponentReduction = "mean", **kwargs: Any
    ) -> None:
        if not terms or len({term.num_components for term in terms}) != 1:
            counts = [term.num_components for term in terms]
            raise ValueError(f"`terms` must be one or more loss terms of one component count, got counts {counts}.")
        if component_reduction not in ("mean", "sum"):
            raise ValueError(f"`component_reduction` must be 'mean' or 'sum', got {component_reduction!r}.")
        super().__init__(terms[0].num_components, **kwargs)
        self.__dict__["_terms"] = tuple(terms)  # plain attribute: the terms are the collection's children
        self.component_reduction = component_reduction

    def _configuration(self) -> dict[str, Any]:
        return {**super()._configuration(), "component_reduction": self.component_reduction}

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to accumulate: the terms record the batch (only the keywords are checked)."""
        check_input_names(inputs_of(args, kwargs, self._positional_inputs, type(self).__name__), type(self).__name__)

    @property
    def terms(self) -> tuple[ItemMeanMetric, ...]:
        """The members summed into the loss."""
        terms: tuple[ItemMeanMetric, ...] = self.__dict__["_terms"]
        return terms

    def _batch_uses(self) -> frozenset[str]:
        return frozenset().union(*(term._batch_uses() for term in self.terms))

    def _contribution(self, batch: SaeBatch) -> tuple[Tensor, ...]:
        return tuple(batch.contribution(term) for term in self.terms)

    def _record(self, contribution: tuple[Tensor, ...]) -> None:
        """Nothing: the terms record the batch."""

    def _value(self, contribution: tuple[Tensor, ...]) -> Tensor:
        parts = [term._batch_mean(part) for term, part in zip(self.terms, contribution, strict=True)]
        return self._reduce(parts)

    def compute(self) -> Tensor:
        """The loss of every item seen on every process (a collective under ``torch.distributed``)."""
        with synced_states(self.terms, self.terms[0].process_group):
            return self._reduce([term._epoch_mean() for term in self.terms])

    def _reduce(self, parts: Sequence[Tensor]) -> Tensor:
        per_component = torch.stack(list(parts)).sum(dim=0)
        return per_component.mean() if self.component_reduction == "mean" else per_component.sum()

    def extra_repr(self) -> str:
        """Show the terms in ``repr``."""
        return f"terms=[{', '.join(type(term).__name__ for term in self.terms)}], {self.component_reduction!r}"
