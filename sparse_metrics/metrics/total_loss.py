"""The differentiable total of a collection's loss terms, as a member of its own."""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from sparse_metrics._batch import SAE_INPUTS, SaeBatch, check_input_names, inputs_of
from sparse_metrics._config import ComponentReduction
from sparse_metrics._distributed import synced_states
from sparse_metrics.metrics._base import SaeMetric

__all__ = ["TotalLoss"]


class TotalLoss(SaeMetric):
    r"""The differentiable total of weighted loss terms, reduced over components (a collection's ``"loss"``).

    .. math:: \mathrm{loss} = \operatorname{reduce}_c \sum_t \alpha_t\, \overline{\mathrm{term}}_{t,c}

    where :math:`\overline{\mathrm{term}}_{t,c}` is term :math:`t`'s value on the batch (``forward``) or over every
    item seen on every process (``compute``) and :math:`\alpha_t` its coefficient. The terms are the collection's
    members, which record the batch: this metric keeps no state of its own, and alone it records nothing.

    Args:
        terms: The loss terms by name (members with ``is_loss_term``), of one component count.
        component_reduction: ``"mean"`` or ``"sum"`` over the components.
        coefficients: A coefficient for some of the terms (1 for the others); change them between steps with
            :meth:`set_coefficient`.
        kwargs: Passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = True
    higher_is_better = False

    _positional_inputs: ClassVar[tuple[str, ...]] = SAE_INPUTS

    def __init__(
        self,
        terms: Mapping[str, SaeMetric],
        component_reduction: ComponentReduction = "mean",
        *,
        coefficients: Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not terms or len({term.num_components for term in terms.values()}) != 1:
            counts = {name: term.num_components for name, term in terms.items()}
            raise ValueError(f"`terms` must be one or more loss terms of one component count, got counts {counts}.")
        if not_terms := [name for name, term in terms.items() if not term.is_loss_term]:
            raise TypeError(f"`terms` {not_terms} are not loss terms (is_loss_term=False): they have no value to sum.")
        if component_reduction not in ("mean", "sum"):
            raise ValueError(f"`component_reduction` must be 'mean' or 'sum', got {component_reduction!r}.")
        super().__init__(next(iter(terms.values())).num_components, **kwargs)
        self.__dict__["_terms"] = dict(terms)  # plain attribute: the terms are the collection's children
        self.component_reduction = component_reduction
        self._coefficients = dict.fromkeys(terms, 1.0)
        for name, value in (coefficients or {}).items():
            self.set_coefficient(name, value)

    def _configuration(self) -> dict[str, Any]:
        return {**super()._configuration(), "component_reduction": self.component_reduction}

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to accumulate: the terms record the batch (only the keywords are checked)."""
        check_input_names(inputs_of(args, kwargs, self._positional_inputs, type(self).__name__), type(self).__name__)

    def _reads(self) -> tuple[SaeMetric, ...]:
        return tuple(self.terms.values())

    @property
    def terms(self) -> dict[str, SaeMetric]:
        """The members summed into the loss, by name."""
        terms: dict[str, SaeMetric] = self.__dict__["_terms"]
        return dict(terms)

    @property
    def coefficients(self) -> dict[str, float]:
        """Each term's coefficient, by name (a copy: change one with :meth:`set_coefficient`)."""
        return dict(self._coefficients)

    def set_coefficient(self, name: str, value: float) -> None:
        """Weight term ``name`` by ``value`` (a finite, non-negative number) from the next step on."""
        if name not in self._coefficients:
            raise KeyError(f"TotalLoss has no term {name!r}; its terms are {sorted(self._coefficients)}.")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"The coefficient of {name!r} must be a finite number >= 0, got {value!r}.")
        self._coefficients[name] = float(value)

    def _batch_uses(self) -> frozenset[Hashable]:
        return frozenset().union(*(term._batch_uses() for term in self.terms.values()))

    def _contribution(self, batch: SaeBatch) -> tuple[Any, ...]:
        return tuple(batch.contribution(term) for term in self.terms.values())

    def _record(self, contribution: tuple[Any, ...]) -> None:
        """Nothing: the terms record the batch."""

    def _value(self, contribution: tuple[Any, ...]) -> Tensor:
        return self._forward_value(contribution, {})

    def _forward_value(self, contribution: tuple[Any, ...], batch_means: dict[int, Tensor]) -> Tensor:
        """The total of the terms' batch means, each read from ``batch_means`` where its term has put it already."""
        parts = [
            mean if (mean := batch_means.get(id(term))) is not None else term._batch_mean(part)
            for term, part in zip(self.terms.values(), contribution, strict=True)
        ]
        return self._reduce(parts)

    def compute(self) -> Tensor:
        """The loss of every item seen on every process (a collective under ``torch.distributed``)."""
        terms = list(self.terms.values())
        with synced_states(terms, terms[0].process_group):
            return self._reduce([term._epoch_mean() for term in terms])

    def _reduce(self, parts: Sequence[Tensor]) -> Tensor:
        coefficients = self._coefficients.values()
        weighted = [part if alpha == 1.0 else alpha * part for part, alpha in zip(parts, coefficients, strict=True)]
        # Added in order (as a sum over the stacked terms adds them): no stack, and 0-d means broadcast with [1] ones.
        per_component = functools.reduce(torch.add, weighted)
        # Of one component the mean is the sum (x / 1 is x); the sum has the cheaper backward, and a 0-d total (of
        # terms whose batch means came 0-d, see SaeMetric._forward_value) is that one component's already.
        if per_component.ndim == 0:  # a new tensor even of one unweighted term: not an alias of that term's value
            return per_component.clone() if per_component is parts[0] else per_component
        if self.component_reduction == "mean" and per_component.numel() != 1:
            return per_component.mean()
        return per_component.sum()

    def extra_repr(self) -> str:
        """Show the terms and their coefficients in ``repr``."""
        terms = ", ".join(f"{name}: {alpha:g}" for name, alpha in self._coefficients.items())
        return f"terms={{{terms}}}, {self.component_reduction!r}"
