"""Triton kernels of moeops (``backend="triton"``): ``grouped_gemm`` and ``fused_experts``.

Importing this package does not import triton: it registers the two implementations with
:mod:`moeops._dispatch`, which loads them (and triton) the first time the Triton backend is
chosen; the attributes below load them on first access too. The kernels need a CUDA device, or
the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported) to run on CPU
tensors for testing. Same signatures as :mod:`moeops.reference`. :func:`set_autotune` /
``MOEOPS_TRITON_AUTOTUNE=1`` turn on per-shape autotuning of the grouped GEMM on GPUs.

* :mod:`moeops._triton.kernels`: the ``@triton.jit`` grouped GEMM kernel;
* :mod:`moeops._triton.tuning`: block sizes per shape class and the autotuner;
* :mod:`moeops._triton.grouped_gemm`: the ``grouped_gemm`` / ``fused_experts`` wrappers.
"""

import importlib

from moeops._dispatch import register_triton

__all__ = ["grouped_gemm", "fused_experts", "set_autotune", "tuned_configs"]

_LAZY = {"grouped_gemm": "grouped_gemm", "fused_experts": "grouped_gemm",
         "set_autotune": "tuning", "tuned_configs": "tuning"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"moeops._triton.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'moeops._triton' has no attribute {name!r}")


for _op in ("grouped_gemm", "fused_experts"):
    register_triton(_op, lambda op=_op: __getattr__(op))
