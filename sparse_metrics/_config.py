"""Constructor-argument validation, shared by every metric and the collection.

Constructors are wrapped in :func:`validate_arguments`, a strict pydantic ``validate_call``: no silent coercion
(``"3"`` is not a component count, ``1`` is not ``True``), and a bad argument raises ``pydantic.ValidationError``
(a ``ValueError``) naming the argument, the expected type or range, and the received value.
"""

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, validate_call

__all__ = [
    "ComponentReduction",
    "FeatureReduction",
    "NanStrategy",
    "NumComponents",
    "NumFeatures",
    "PositiveInt",
    "validate_arguments",
]

NumComponents = Annotated[int, Field(ge=1, description="How many SAEs are trained side by side.")]
NumFeatures = Annotated[int, Field(ge=1, description="The dictionary size d_sae.")]
PositiveInt = Annotated[int, Field(ge=1)]
FeatureReduction = Literal["mean", "sum"]
ComponentReduction = Literal["mean", "sum"]
#: What a metric does with an item whose value is NaN or infinite (see ``ItemMeanMetric``).
NanStrategy = Literal["propagate", "ignore", "error"]

validate_arguments = validate_call(config=ConfigDict(strict=True, arbitrary_types_allowed=True))
