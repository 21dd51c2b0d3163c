"""The Triton grouped GEMM kernel over expert-grouped rows (``backend="triton"``).

Tile schedule (no host sync): the rows past ``offsets[E]`` are treated as one more group,
"expert" ``E``, whose tiles store zeros (so the output needs no memset). Each group ``g`` gets
``ceil(rows_g / BLOCK_M)`` M-tiles; a device-side prefix sum of those counts and a
``searchsorted`` map M-tile ``t`` to ``(group, m-tile within group)``
(:func:`moeops._triton.grouped_gemm.schedule`). The host only needs an upper bound of the tile
count, ``ceil(R / BLOCK_M) + E + 1``, which is known without reading ``offsets``; programs past
the real tile count exit at once, so experts without rows cost nothing but one idle program.
Block sizes come from :mod:`moeops._triton.tuning`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["grouped_gemm_kernel", "TL_DTYPES"]

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _k_step(acc, x_ptrs, w_ptrs, k_idx, k_len, row_ok, col_ok, COMPUTE_DTYPE: tl.constexpr,
            IEEE: tl.constexpr):
    """acc += x[rows, k_idx] @ w[k_idx, cols] for the K indices below k_len."""
    k_ok = k_idx < k_len
    a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(COMPUTE_DTYPE)
    b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(COMPUTE_DTYPE)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def grouped_gemm_kernel(
    x_ptr, w_ptr, out_ptr, bias_ptr, offsets_ptr, tile_group_ptr, tile_m_ptr,
    N, K, E,
    stride_xm, stride_xk,
    stride_we, stride_wn, stride_wk,
    stride_om, stride_on,
    stride_be, stride_bn,
    HAS_BIAS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    K_STATIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.load(tile_group_ptr + pid_t)
    live = g <= E  # g == E + 1: past the real tile count, the program does nothing
    g = tl.minimum(g, E)
    mt = tl.load(tile_m_ptr + pid_t)
    row_start = tl.load(offsets_ptr + g)
    row_end = tl.where(live, tl.load(offsets_ptr + g + 1), row_start)
    rows = (row_start + mt * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < row_end
    col_ok = cols < N
    # Group E holds the padding rows: no K loop, no bias, the tile stores zeros. Straight-line
    # code (no early return, the loop under no runtime `if`). Compiled for sm_90 as a launch on
    # contiguous 16-bit tensors specialises it, the loop becomes wgmma fed by a num_stages-deep
    # cp.async pipeline (tests/ops/test_triton.py::test_kernel_compiles_for_sm90_and_sm80).
    is_expert = g < E
    k_len = tl.where(is_expert & live, K, 0)
    ge = tl.minimum(g, E - 1).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk
    w_ptrs = w_ptr + ge * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    # The interpreter of triton 3.6 with numpy >= 2.5 cannot take a tensor loop bound: there K
    # comes as a constant (K_STATIC) and the padding programs' loads are masked off instead.
    if K_STATIC > 0:
        for k0 in range(0, K_STATIC, BLOCK_K):
            acc = _k_step(acc, x_ptrs + k0 * stride_xk, w_ptrs + k0 * stride_wk, ks + k0, k_len,
                          row_ok, col_ok, COMPUTE_DTYPE, IEEE)
    else:
        for k0 in range(0, k_len, BLOCK_K):
            acc = _k_step(acc, x_ptrs + k0 * stride_xk, w_ptrs + k0 * stride_wk, ks + k0, k_len,
                          row_ok, col_ok, COMPUTE_DTYPE, IEEE)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ge * stride_be + cols * stride_bn, mask=col_ok & is_expert,
                       other=0.0)
        acc += bias.to(tl.float32)[None, :]
    o_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
