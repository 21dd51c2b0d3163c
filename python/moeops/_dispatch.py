"""Backend choice that explains itself, and the one check for the Triton interpreter.

``backend="auto"`` picks the compiled kernels (``"cpp"``: C++ on CPU, CUDA on GPU) when they
can run on the tensor's device, else the pure-torch ``"reference"``. Asking explicitly for a
backend that cannot run raises a ``RuntimeError`` that says why. ``"triton"`` (grouped_gemm and
fused_experts only) runs the Triton kernels of :mod:`moeops._triton` on CUDA tensors, or on CPU
tensors under the Triton interpreter (``TRITON_INTERPRET=1``, for testing).

The Triton implementations live above the ops in the package's layers (``docs/design.md``), so
this module does not import them: :mod:`moeops._triton` registers a loader per op with
:func:`register_triton` (without importing triton), and :func:`resolve` calls it when the
Triton backend is chosen.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

from moeops import reference

BACKENDS = ("auto", "cpp", "reference", "triton")
TRITON_OPS = ("grouped_gemm", "fused_experts")  # ops with a Triton implementation

_TRITON_LOADERS: dict[str, Callable[[], Callable]] = {}


def register_triton(op: str, loader: Callable[[], Callable]) -> None:
    """Registers ``loader() -> implementation`` as the Triton backend of ``op`` (one of
    :data:`TRITON_OPS`). The loader imports triton only when called."""
    if op not in TRITON_OPS:
        raise ValueError(f"moeops: {op!r} is not one of the Triton ops {TRITON_OPS}")
    _TRITON_LOADERS[op] = loader


def _built_with_cuda() -> bool:
    from moeops import _C
    return bool(_C.with_cuda)


def why_not_cpp(device: torch.device, op: str | None = None) -> str | None:
    """None if the compiled kernels (of ``op``, if given) run on ``device``, else why not."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not _built_with_cuda():
            from moeops import _C
            return (f"moeops was built without CUDA kernels ({_C.cuda_skip_reason}); rebuild "
                    "with a CUDA build of torch and nvcc on PATH (MOEOPS_CUDA=ON to insist)")
        if op is not None and not torch._C._dispatch_has_kernel_for_dispatch_key(
                f"moeops::{op}", "CUDA"):
            return f"moeops::{op} has no CUDA kernel yet (CPU and reference only)"
        return None
    if device.type == "meta":
        return None
    return f"moeops has no compiled kernels for device type '{device.type}'"


def triton_interpreting() -> bool:
    """True when Triton kernels run in the interpreter on CPU tensors (``TRITON_INTERPRET=1``
    set before triton was imported)."""
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except Exception:
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def why_not_triton(device: torch.device, op: str) -> str | None:
    """None if the Triton kernel of ``op`` runs on ``device``, else why not."""
    if op not in TRITON_OPS:
        return f"moeops::{op} has no Triton kernel (Triton covers {', '.join(TRITON_OPS)})"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if triton_interpreting():
            return None
        return ("tensor on CPU: Triton kernels need a CUDA device (set TRITON_INTERPRET=1 "
                "before importing triton to run them in the interpreter on CPU for testing)")
    return f"Triton kernels need a CUDA device, the tensor is on '{device.type}'"


def _triton_op(op: str):
    if op not in _TRITON_LOADERS:
        raise RuntimeError(f"moeops.{op}: no Triton implementation is registered (moeops._triton "
                           "registers them when moeops is imported)")
    return _TRITON_LOADERS[op]()


@functools.cache
def _warn_fallback(op: str, reason: str) -> None:
    warnings.warn(f"moeops.{op}: using the slow reference backend: {reason}", stacklevel=4)


def resolve(op: str, backend: str, tensor: torch.Tensor):
    """The callable implementing ``op`` with ``backend`` for inputs living like ``tensor``."""
    if backend not in BACKENDS:
        raise ValueError(f"moeops: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return getattr(reference, op)
    if backend == "triton":
        reason = why_not_triton(tensor.device, op)
        if reason is not None:
            raise RuntimeError(f"moeops.{op}: backend 'triton' cannot run: {reason}")
        return _triton_op(op)
    reason = why_not_cpp(tensor.device, op)
    if reason is None:
        return getattr(torch.ops.moeops, op)
    if backend == "cpp":
        raise RuntimeError(f"moeops.{op}: backend 'cpp' cannot run: {reason}")
    # "auto": the compiled kernels are preferred wherever they exist. Only on a CUDA tensor
    # whose op has no compiled CUDA kernel (e.g. a build without them) do grouped_gemm and
    # fused_experts fall back to Triton, which beats the per-expert reference loop. Never on
    # CPU: there the C++ kernels always exist, and the interpreter is a debugging tool.
    if tensor.device.type == "cuda" and why_not_triton(tensor.device, op) is None:
        return _triton_op(op)
    _warn_fallback(op, reason)
    return getattr(reference, op)
