"""Triton kernels of moeops (``backend="triton"``): ``grouped_gemm`` and ``fused_experts``.

Importing this package imports triton. The kernels need a CUDA device, or the Triton
interpreter (``TRITON_INTERPRET=1`` set before triton is imported) to run on CPU tensors for
testing. Same positional signatures as :mod:`moeops.reference`. :func:`set_autotune` /
``MOEOPS_TRITON_AUTOTUNE=1`` turn on per-shape autotuning of the grouped GEMM on GPUs.
"""

from moeops._triton.grouped_gemm import fused_experts, grouped_gemm, set_autotune, tuned_configs

__all__ = ["grouped_gemm", "fused_experts", "set_autotune", "tuned_configs"]
