"""Constructor-argument validation, shared by every metric and the collection.

Constructors are wrapped in :func:`validate_arguments`, a strict pydantic ``validate_call``: no silent coercion
(``"3"`` is not a component count, ``1`` is not ``True``), and a bad argument raises ``pydantic.ValidationError``
(a ``ValueError``) naming the argument, the expected type or range, and the received value.
"""

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, cast

from pydantic import ConfigDict, Field, ValidationError, validate_call

__all__ = [
    "ComponentReduction",
    "FeatureReduction",
    "FiringThreshold",
    "NanStrategy",
    "NumComponents",
    "NumFeatures",
    "PositiveInt",
    "WindowUnit",
    "validate_arguments",
]

NumComponents = Annotated[int, Field(ge=1, description="How many SAEs are trained side by side.")]
NumFeatures = Annotated[int, Field(ge=1, description="The dictionary size d_sae.")]
PositiveInt = Annotated[int, Field(ge=1)]
#: A latent fires where its activation is above this (strictly); ``None`` means non-zero.
FiringThreshold = Annotated[float, Field(ge=0, allow_inf_nan=False)]
#: Whether the dead-feature window counts items (tokens) or steps (updates).
WindowUnit = Literal["items", "steps"]
FeatureReduction = Literal["mean", "sum"]
ComponentReduction = Literal["mean", "sum"]
#: What a metric does with an item whose value is NaN or infinite (see ``ItemMeanMetric``).
NanStrategy = Literal["propagate", "ignore", "error"]
#: The input a reconstruction metric reads as the reconstruction of ``source_activations``.
Reconstruction = Literal["decoded_activations", "multi_topk_decoded_activations"]

_Function = TypeVar("_Function", bound=Callable[..., Any])
_strict_call = validate_call(config=ConfigDict(strict=True, arbitrary_types_allowed=True))


def validate_arguments(function: _Function) -> _Function:
    """Validate a constructor's arguments strictly, naming positional arguments by name in the error.

    pydantic locates an error in a positional argument by its index (``1``); the error raised here says
    ``num_components`` instead, so that a call such as ``SparseAutoencoderLoss(0.1)`` points at the argument.
    """
    validated = _strict_call(function)
    names = list(inspect.signature(function).parameters)

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return validated(*args, **kwargs)
        except ValidationError as error:
            errors = []
            for line in error.errors():
                location = line["loc"]
                if location and isinstance(location[0], int) and location[0] < len(names):
                    location = (names[location[0]], *location[1:])
                errors.append({**line, "loc": location})
            raise ValidationError.from_exception_data(error.title, errors) from None  # type: ignore[arg-type]

    return cast(_Function, call)
