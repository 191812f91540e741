"""One read of the activations for the per-item L0 and L1 and the activity statistics, on a CPU.

The per-item statistics reduce ``f`` over its features, the activity statistics of feature density and dead features
(firing counts, last firing) over its items. Inductor fuses reductions along one axis per loop nest, so the traced
code reads ``[batch, d_sae]`` twice, the second time in blocks of items whose strided rows run below the memory's
bandwidth. The C++ pass in ``_activity_kernel.cpp`` walks the rows once instead, four at a time: their L0, L1 and
first activity mask's per-feature counters (``[component, d_sae]`` int32 per thread, read and written once per four
rows, once per row for the last rows of a part) in one loop, any further mask from the cache.

The library is built at its first use in a process, with the C++ compiler that inductor's CPU backend would use
(``CXX``, else ``g++``, ``c++`` or ``clang++``), into a temporary directory, and loaded with ``ctypes``: a few seconds
once, no cache that could outlive the machine it was built for (on Windows, where a loaded library cannot be
deleted, the directory stays). Where it cannot be built, :func:`applies` warns once and says no: with inductor's own
C++ compiler available the traced reductions are used; without any, ``torch.compile`` itself falls back to eager.

:func:`activity_statistics` is a custom operator (``torch.ops.sparse_metrics.activity_statistics``), opaque to
``torch.compile``, with a fake implementation for tracing and a backward for the L1. Its rows are split over up to
``torch.get_num_threads()`` OpenMP threads, each with counters of its own, merged after (``ctypes`` releases the GIL
for the call). Built with ``-fopenmp`` where the compiler takes it, the library needs ``libgomp.so.1``, which the
loader finds already loaded where torch runs on libgomp (its Linux wheels): the parts run on torch's own intra-op
threads (threads of our own would compete with torch's, which spin for a while after each parallel region). With
another runtime in torch the library brings its own; where only ``-fopenmp-simd`` builds, the parts run one after
another on the calling thread.
"""

from __future__ import annotations

import ctypes
import importlib.resources
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparse_metrics.functional._blocks import custom_backward

__all__ = ["activity_statistics", "applies"]

#: The operator's threshold for the mask ``f != 0`` (firing thresholds are validated ``>= 0``; a NaN would not survive
#: the compiler's generated code as a constant).
NONZERO = -1.0
#: Rows each thread takes at least: its counters (8 bytes per feature and mask) stay a small part of its rows' bytes.
MIN_ROWS_PER_THREAD = 64

_DTYPES = {torch.float32: "float", torch.float64: "double"}


class _Build:
    """The library once built (entry points per dtype, OpenMP or not), or that building failed (not tried again)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.functions: dict[torch.dtype, Any] | None = None
        self.failed = False
        self.parallel = False


_build_state = _Build()


def applies(learned: Tensor) -> bool:
    """Whether :func:`activity_statistics` takes ``learned``, ``[batch, component, d_sae]``, once the library is built.

    It must be a plain contiguous float32/float64 CPU tensor, outside ``torch.func`` transforms and forward-mode AD
    (the operator has no batching rule and no forward derivative). Called eagerly, never while tracing. The first
    call on such a tensor builds the library; if that fails it warns once, and the answer is no from then on.
    """
    suitable = learned.device.type == "cpu" and _operand_error(learned) is None and custom_backward(learned)
    return suitable and _library() is not None


def _library() -> dict[torch.dtype, Any] | None:
    state = _build_state
    if state.functions is not None or state.failed:  # every step asks: no lock once it is settled
        return state.functions
    with state.lock:
        if state.functions is None and not state.failed:
            try:
                state.functions, state.parallel = _build()
            except Exception as error:  # whatever stops the build (a compiler, its flags, CXX), the fallback applies
                state.failed = True
                warnings.warn(
                    f"sparse_metrics could not build its CPU activity kernel ({type(error).__name__}: {error}); "
                    "compiled=True computes the L0, L1 and activity statistics without it.",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return state.functions


def _compiler() -> list[str]:
    """The compiler's command: ``CXX`` (split as a shell would, e.g. ``"ccache g++"``), else the first one found."""
    configured = os.environ.get("CXX")
    if configured:
        return shlex.split(configured, posix=os.name != "nt")  # keep a Windows path's backslashes
    for name in ("g++", "c++", "clang++"):
        found = shutil.which(name)
        if found is not None:
            return [found]
    raise OSError("no C++ compiler found (set CXX)")


def _build() -> tuple[dict[torch.dtype, Any], bool]:
    """Compile ``_activity_kernel.cpp`` for this machine: its entry points, one per dtype, and whether it has OpenMP."""
    source = importlib.resources.files(__package__).joinpath("_activity_kernel.cpp").read_text()
    compiler = _compiler()
    with tempfile.TemporaryDirectory(prefix="sparse_metrics_", ignore_cleanup_errors=True) as directory:
        source_path, library_path = Path(directory, "activity.cpp"), Path(directory, "activity.so")
        source_path.write_text(source)
        command = [*compiler, "-O3", "-std=c++17", "-fPIC", "-shared", str(source_path)]
        errors = []
        # OpenMP threads where the compiler has them, and the machine's vector ISA where it knows it.
        attempts = [[openmp, *target] for openmp in ("-fopenmp", "-fopenmp-simd") for target in (["-march=native"], [])]
        for options in attempts:
            built = subprocess.run(
                [*command, *options, "-o", str(library_path)],
                capture_output=True,
                text=True,
                errors="replace",
                timeout=300,
                check=False,
            )
            if built.returncode == 0:
                break
            errors.append(next(iter(built.stderr.strip().splitlines()), f"exit status {built.returncode}"))
        else:
            raise OSError(f"{shlex.join(compiler)} failed: {errors[-1]}")
        library = ctypes.CDLL(str(library_path))  # mapped: the file may go with the directory
    functions = {}
    for dtype, name in _DTYPES.items():
        function = getattr(library, f"sparse_metrics_activity_{name}")
        pointer, integer = ctypes.c_void_p, ctypes.c_int64
        function.argtypes = [pointer, integer, integer, integer, pointer, integer, integer, *[pointer] * 4]
        function.restype = None
        functions[dtype] = function
    return functions, bool(library.sparse_metrics_activity_parallel())


def _operand_error(learned: Tensor) -> Exception | None:
    """What is wrong with ``learned`` for the C++ pass, or None (:func:`applies` asks, the operator raises it)."""
    if learned.dtype not in _DTYPES:
        return TypeError(f"`learned` must be float32 or float64, got {learned.dtype}.")
    if learned.ndim != 3 or learned.shape[0] >= 2**31:  # item positions and counts are int32
        return ValueError(f"`learned` must be [batch < 2**31, component, d_sae], got shape {list(learned.shape)}.")
    if not learned.is_contiguous():
        return ValueError(f"`learned` must be contiguous, got strides {list(learned.stride())}.")
    return None


def _check_operands(learned: Tensor, thresholds: Sequence[float]) -> None:
    error = _operand_error(learned)
    if error is not None:
        raise error
    if not thresholds:
        raise ValueError("`thresholds` must name at least one activity mask, got none.")


# The schema is written out: inferring it would evaluate this module's (postponed) annotations.
@torch.library.custom_op(
    "sparse_metrics::activity_statistics",
    mutates_args=(),
    device_types="cpu",
    schema="(Tensor learned, float[] thresholds) -> (Tensor, Tensor, Tensor, Tensor)",
)
def activity_statistics(learned: Tensor, thresholds: Sequence[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-item L0 and L1 ``[batch, component]`` and, per firing threshold, firing counts and items since fired.

    ``learned`` is ``[batch, component, d_sae]`` (see :func:`applies`); a feature fires where ``f > t`` for a threshold
    ``t >= 0``, where ``f != 0`` for a negative one (:data:`NONZERO`); NaN fires either way. Returns
    ``(l0, l1, fire_counts, items_since_fired)``, the last two ``[len(thresholds), component, d_sae]`` int64, equal
    to ``_feature_activity`` of each mask. The L0 carries no gradient; the L1's is ``sgn(f)`` times its own, as
    autograd's ``abs().sum()``.
    """
    _check_operands(learned, thresholds)
    functions = _library()
    if functions is None:
        raise RuntimeError("the CPU activity kernel is not built: check `applies(learned)` first")
    rows, components, features = learned.shape
    l0, l1 = learned.new_empty((rows, components)), learned.new_empty((rows, components))
    parts = max(1, min(torch.get_num_threads(), rows // MIN_ROWS_PER_THREAD))
    # [counts, last] x part: each part's zeroed by the thread that fills it (see _activity_kernel.cpp).
    counters = torch.empty((2, parts, len(thresholds), components, features), dtype=torch.int32)
    levels = (ctypes.c_double * len(thresholds))(*thresholds)  # held until the call returns
    functions[learned.dtype](
        learned.data_ptr(),
        rows,
        components,
        features,
        ctypes.addressof(levels),
        len(thresholds),
        parts,
        l0.data_ptr(),
        l1.data_ptr(),
        counters[0].data_ptr(),
        counters[1].data_ptr(),
    )
    fire_counts = counters[0].sum(dim=0, dtype=torch.int64)
    items_since_fired = rows - counters[1].amax(dim=0).to(torch.int64)
    return l0, l1, fire_counts, items_since_fired


@activity_statistics.register_fake
def _(learned: Tensor, thresholds: Sequence[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_operands(learned, thresholds)
    rows, components, features = learned.shape
    per_feature = (len(thresholds), components, features)
    return (
        learned.new_empty((rows, components)),
        learned.new_empty((rows, components)),
        learned.new_empty(per_feature, dtype=torch.int64),
        learned.new_empty(per_feature, dtype=torch.int64),
    )


def _setup_context(ctx: Any, inputs: tuple[Tensor, Sequence[float]], output: tuple[Tensor, ...]) -> None:
    ctx.mark_non_differentiable(output[0], output[2], output[3])
    ctx.save_for_backward(inputs[0])


def _backward(ctx: Any, grad_l0: Tensor, grad_l1: Tensor | None, *_: Tensor) -> tuple[Tensor | None, None]:
    (learned,) = ctx.saved_tensors
    return (None if grad_l1 is None else grad_l1.unsqueeze(-1) * learned.sgn()), None


activity_statistics.register_autograd(_backward, setup_context=_setup_context)


def operator_thresholds(thresholds: Sequence[float | None]) -> list[float]:
    """The operator's thresholds for firing thresholds: ``None`` (fires where ``f != 0``) as :data:`NONZERO`."""
    return [NONZERO if threshold is None else float(threshold) for threshold in thresholds]
