"""Opt-in ``torch.compile`` of hot functions, falling back to eager execution where compiling fails."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch
from torch._dynamo.exc import TorchDynamoException

_Result = TypeVar("_Result")


class CompiledWithFallback(Generic[_Result]):
    """Call ``torch.compile(function, fullgraph=True)``; if compiling fails, warn once and run eagerly for good.

    The compiled function is built at the first call, so importing the package never imports the compiler stack.
    What counts as a failure to compile: the compiler stack's own errors (dynamo's, which wrap the backend's, such as
    a missing C++ compiler for inductor's CPU code) and ``OSError`` (a compiler that cannot be run). Anything else,
    an out-of-memory error say, is the caller's to see and is raised as it is.

    One instance is shared by every caller in the process; whether compiling works does not depend on the caller.
    """

    def __init__(self, function: Callable[..., _Result]) -> None:
        self._function = function
        self._compiled: Callable[..., _Result] | None = None
        self._failed = False
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> _Result:
        if not self._failed:
            try:
                return self._compiled_function()(*args, **kwargs)
            except (TorchDynamoException, OSError) as error:
                self._fail(error)
        return self._function(*args, **kwargs)

    def _compiled_function(self) -> Callable[..., _Result]:
        with self._lock:
            if self._compiled is None:
                self._compiled = torch.compile(self._function, fullgraph=True)
            return self._compiled

    def _fail(self, error: Exception) -> None:
        self._failed = True
        name = getattr(self._function, "__qualname__", repr(self._function))
        # A backend failure wraps the backend's own error, which says what went wrong; compiler output can run to
        # pages, and its first line is enough here.
        cause = getattr(error, "inner_exception", None) or error
        reason = next(iter(str(cause).splitlines()), "")
        warnings.warn(
            f"torch.compile could not compile {name} ({type(cause).__name__}: {reason}); "
            "running it eagerly from now on.",
            RuntimeWarning,
            stacklevel=3,
        )
