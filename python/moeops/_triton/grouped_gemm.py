"""Triton ``grouped_gemm`` and ``fused_experts`` built on the kernel of
:mod:`moeops._triton.kernels`. Semantics are those of :func:`moeops.reference.grouped_gemm` and
:func:`moeops.reference.fused_experts`; gradients use the same pure-torch backward as the
compiled ops (:mod:`moeops.ops._autograd`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeops import reference
from moeops._dispatch import triton_interpreting
from moeops._triton import tuning
from moeops._triton.kernels import TL_DTYPES, grouped_gemm_kernel
from moeops.ops import combine, permute, route_plan
from moeops.ops._autograd import (
    fused_experts_grads,
    grouped_gemm_grads,
    save_fused_experts,
    save_grouped_gemm,
)

__all__ = ["grouped_gemm", "fused_experts", "schedule"]


def schedule(offsets: torch.Tensor, R: int, E: int, block_m: int):
    """Device-side tile map: (groups' row bounds [E+2], tile_group [T], tile_m [T])."""
    dev = offsets.device
    off = offsets.to(torch.int32)
    bounds = torch.cat([off, torch.full((1,), R, dtype=torch.int32, device=dev)])
    rows = (bounds[1:] - bounds[:-1]).clamp(min=0)  # [E+1]; group E = padding rows
    tiles = (rows + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)  # [E+1], exclusive end of each group's tiles
    max_tiles = triton.cdiv(R, block_m) + E + 1
    t = torch.arange(max_tiles, device=dev, dtype=tile_end.dtype)
    group = torch.searchsorted(tile_end, t, right=True)  # E+1 past the last real tile
    start = torch.cat([tile_end.new_zeros(1), tile_end])[group.clamp(max=E)]
    return bounds, group.to(torch.int32), (t - start).to(torch.int32), max_tiles


def _check(x, w, offsets, w_transposed):
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"moeops.grouped_gemm: x must be [R, K] and w [E, N, K] "
                         f"(or [E, K, N]), got {tuple(x.shape)} and {tuple(w.shape)}")
    E = w.shape[0]
    Kw = w.shape[1] if w_transposed else w.shape[2]
    if Kw != x.shape[1]:
        raise ValueError(f"moeops.grouped_gemm: x has K={x.shape[1]} but w has K={Kw}")
    if offsets.dim() != 1 or offsets.numel() != E + 1:
        raise ValueError(f"moeops.grouped_gemm: offsets must be [E+1] = [{E + 1}], "
                         f"got {tuple(offsets.shape)}")
    for name, t in (("x", x), ("w", w)):
        if t.dtype not in TL_DTYPES:
            raise TypeError(f"moeops.grouped_gemm: {name} must be fp32/fp16/bf16, got {t.dtype}")
    for name, t in (("w", w), ("offsets", offsets)):
        if t.device != x.device:
            raise RuntimeError(f"moeops: {name} is on {t.device} but x is on {x.device}; "
                               "move them to one device")


def _grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                  w_transposed: bool = False, bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """grouped_gemm with an optional per-expert bias ``[E, N]`` and output dtype (fp32 for
    fused_experts' unrounded intermediates)."""
    _check(x, w, offsets, w_transposed)
    R, K = x.shape
    E = w.shape[0]
    N = w.shape[2] if w_transposed else w.shape[1]
    out = torch.empty(R, N, dtype=out_dtype or x.dtype, device=x.device)
    if R == 0 or N == 0:
        return out
    if K == 0:
        out.zero_()
        if bias is not None:  # rows of expert e are bias[e]; padding rows zero
            out.copy_(_grouped_gemm(x.new_zeros(R, 1), w.new_zeros(E, 1, N) if w_transposed
                                    else w.new_zeros(E, N, 1), offsets, w_transposed, bias,
                                    out.dtype))
        return out
    if w_transposed:  # [E, K, N]
        s_we, s_wk, s_wn = w.stride()
    else:  # [E, N, K]
        s_we, s_wn, s_wk = w.stride()
    if x.dtype == w.dtype and not triton_interpreting():
        cdt = TL_DTYPES[x.dtype]
    else:
        # Mixed inputs: exact up-cast of both, fp32 products. The interpreter's tl.dot
        # multiplies bf16 bit patterns (triton-lang/triton#11584, unsupported upstream), so
        # under the interpreter 16-bit inputs are up-cast too (their products are exact in
        # fp32: same result as a 16-bit dot with fp32 accumulation).
        cdt = tl.float32
    b = bias if bias is not None else out  # dummy pointer when absent
    s_be, s_bn = (bias.stride() if bias is not None else (0, 0))

    def launch(cfg):
        bm, bn, bk, warps, stages = cfg
        bounds, tile_group, tile_m, max_tiles = schedule(offsets, R, E, bm)
        grid = (max_tiles, triton.cdiv(N, bn))
        grouped_gemm_kernel[grid](
            x, w, out, b, bounds, tile_group, tile_m,
            N, K, E,
            x.stride(0), x.stride(1),
            s_we, s_wn, s_wk,
            out.stride(0), out.stride(1),
            s_be, s_bn,
            HAS_BIAS=bias is not None, COMPUTE_DTYPE=cdt, IEEE=cdt == tl.float32,
            K_STATIC=K if triton_interpreting() else 0,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )

    if x.is_cuda and not triton_interpreting() and tuning.autotune_enabled():
        bound, cands = tuning.shape_class(R, E)
        key = (bound, R.bit_length(), N, K, x.dtype, w.dtype, out.dtype, bias is not None,
               w_transposed, x.device.index)
        if torch.cuda.is_current_stream_capturing():  # never tune inside a graph
            cfg = tuning.tuned_configs().get(key, cands[0])
        else:
            cfg = tuning.tune(key, cands, launch)
    else:
        cfg = tuning.pick_config(R, E)
    launch(cfg)
    return out


class _GroupedGemmFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets, w_transposed):
        save_grouped_gemm(ctx, x, w, offsets, w_transposed)
        return _grouped_gemm(x, w, offsets, w_transposed)

    @staticmethod
    def backward(ctx, grad):
        return grouped_gemm_grads(ctx, grad)


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                 w_transposed: bool = False) -> torch.Tensor:
    """Triton :func:`moeops.reference.grouped_gemm`: ``[R, K] -> [R, N]`` in ``x.dtype``.

    fp32 accumulation with ``tl.dot``; fp32 inputs use IEEE fp32 products (no TF32), so results
    match the reference to rounding. Differentiable with respect to ``x`` and ``w`` (the
    backward is the same pure-torch formula as the compiled op's).
    """
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _GroupedGemmFn.apply(x, w, offsets, w_transposed)
    return _grouped_gemm(x, w, offsets, w_transposed)


_FE_ARGS = ("hidden", "ids", "weights", "w_up", "w_down", "b_up", "b_down", "activation",
            "gated", "gain", "shared_out", "shared_gate")  # fused_experts' schema order


class _FusedExpertsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        save_fused_experts(ctx, dict(zip(_FE_ARGS, args)))
        return _fused_experts(*args)

    @staticmethod
    def backward(ctx, grad):
        return fused_experts_grads(ctx, grad)


def fused_experts(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                  w_up: torch.Tensor, w_down: torch.Tensor, b_up: torch.Tensor | None = None,
                  b_down: torch.Tensor | None = None, activation: str = "silu",
                  gated: bool = True, gain: torch.Tensor | None = None,
                  shared_out: torch.Tensor | None = None,
                  shared_gate: torch.Tensor | None = None) -> torch.Tensor:
    """Triton :func:`moeops.reference.fused_experts`: plan, gather, up GEMM (+ bias, fp32
    out), activation in torch (fp32), down GEMM (+ bias, fp32 out), weighted combine in slot
    order, shared expert; the output is rounded once. When hidden and w_down are both bf16 (or
    both fp16) the activation is rounded to that dtype before the down GEMM (tensor cores), as
    Hugging Face's experts and the CUDA kernels do; otherwise intermediates stay fp32.
    Differentiable like the compiled op (same pure-torch backward)."""
    args = (hidden, ids, weights, w_up, w_down, b_up, b_down, activation, gated, gain,
            shared_out, shared_gate)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in args):
        return _FusedExpertsFn.apply(*args)
    return _fused_experts(*args)


def _fused_experts(hidden, ids, weights, w_up, w_down, b_up, b_down, activation, gated, gain,
                   shared_out, shared_gate) -> torch.Tensor:
    """Forward of :func:`fused_experts` (arguments as there, all positional; no autograd)."""
    if hidden.dim() != 2:
        raise ValueError(f"moeops.fused_experts: hidden must be [T, H], got {tuple(hidden.shape)}")
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")
    T, H = hidden.shape
    E = w_up.shape[0]
    top_k = ids.shape[1]
    idl = ids.to(torch.int32)
    w_slot = weights.float()
    if gain is not None:  # gain 0: the slot is emptied before planning (no rows, no compute)
        g = gain.float()[idl.long().clamp(min=0)]
        idl = torch.where((idl >= 0) & (g != 0), idl, -1)
        w_slot = w_slot * g
    idl = idl.contiguous()
    # The other ops via their wrappers: compiled kernels where present, else the reference.
    plan = route_plan(idl, E)
    rows = permute(hidden, plan.sorted_slots, top_k)  # [T*K, H], padding rows zero
    u = _grouped_gemm(rows, w_up, plan.offsets, False, b_up, torch.float32)
    if gated:
        i = u.shape[1] // 2
        h = reference.apply_activation(u[:, :i], activation) * u[:, i:]
    else:
        h = reference.apply_activation(u, activation)
    if hidden.dtype == w_down.dtype and w_down.dtype in (torch.bfloat16, torch.float16):
        # 16-bit layers: the activation is rounded to the weights' dtype, so the down GEMM runs
        # on 16-bit tensor cores (as Hugging Face's experts and the CUDA kernels do)
        h = h.to(w_down.dtype)
    y = _grouped_gemm(h, w_down, plan.offsets, False, b_down, torch.float32)
    out = combine(y, w_slot.contiguous(), plan.inverse)  # fp32, slot order
    if shared_out is not None:
        sg = shared_gate.float().reshape(T, 1) if shared_gate is not None else 1.0
        out = out + sg * shared_out.float()
    return out.to(hidden.dtype)
