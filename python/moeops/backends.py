"""Backend choice that explains itself.

``backend="auto"`` picks the compiled kernels (``"cpp"``: C++ on CPU, CUDA on GPU) when they
can run on the tensor's device, else the pure-torch ``"reference"``. Asking explicitly for a
backend that cannot run raises a ``RuntimeError`` that says why.
"""

from __future__ import annotations

import functools
import warnings

import torch

from moeops import reference

BACKENDS = ("auto", "cpp", "reference")


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


@functools.cache
def _warn_fallback(op: str, reason: str) -> None:
    warnings.warn(f"moeops.{op}: using the slow reference backend: {reason}", stacklevel=4)


def resolve(op: str, backend: str, tensor: torch.Tensor):
    """The callable implementing ``op`` with ``backend`` for inputs living like ``tensor``."""
    if backend not in BACKENDS:
        raise ValueError(f"moeops: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return getattr(reference, op)
    reason = why_not_cpp(tensor.device, op)
    if reason is None:
        return getattr(torch.ops.moeops, op)
    if backend == "cpp":
        raise RuntimeError(f"moeops.{op}: backend 'cpp' cannot run: {reason}")
    _warn_fallback(op, reason)
    return getattr(reference, op)
