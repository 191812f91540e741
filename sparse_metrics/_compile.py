"""Opt-in ``torch.compile`` of hot functions, falling back to eager execution where compiling fails."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch

_Result = TypeVar("_Result")


class CompiledWithFallback(Generic[_Result]):
    """Call ``torch.compile(function, fullgraph=True)``; if compiling ever fails, warn once and run eagerly for good.

    The compiled function is built at the first call, so importing the package never imports the compiler stack.
    Callers must pass validated inputs: any exception raised by the compiled call is taken for a failure to compile
    (``torch.compile`` raises many kinds: a missing C++ compiler, an unsupported platform or Python version, a
    backend error), and the same call is then run eagerly, which re-raises a genuine error in the function itself.

    One instance is shared by every caller in the process; whether compiling works does not depend on the caller.
    """

    def __init__(self, function: Callable[..., _Result]) -> None:
        self._function = function
        self._compiled: Callable[..., _Result] | None = None
        self._failed = False
        self._lock = threading.Lock()

    def __call__(self, *args: Any) -> _Result:
        if not self._failed:
            try:
                return self._compiled_function()(*args)
            except Exception as error:
                self._fail(error)
        return self._function(*args)

    def _compiled_function(self) -> Callable[..., _Result]:
        with self._lock:
            if self._compiled is None:
                self._compiled = torch.compile(self._function, fullgraph=True)
            return self._compiled

    def _fail(self, error: Exception) -> None:
        self._failed = True
        name = getattr(self._function, "__qualname__", repr(self._function))
        reason = next(iter(str(error).splitlines()), "")  # compiler errors can run to pages; the first line says what
        warnings.warn(
            f"torch.compile could not compile {name} ({type(error).__name__}: {reason}); "
            "running it eagerly from now on.",
            RuntimeWarning,
            stacklevel=3,
        )
