"""Triton grouped GEMM over expert-grouped rows, and ``fused_experts`` built from it.

Semantics are those of :func:`moeops.reference.grouped_gemm` and
:func:`moeops.reference.fused_experts`.

Tile schedule (no host sync): the rows past ``offsets[E]`` are treated as one more group,
"expert" ``E``, whose tiles store zeros (so the output needs no memset). Each group ``g`` gets
``ceil(rows_g / BLOCK_M)`` M-tiles; a device-side prefix sum of those counts and a
``searchsorted`` map M-tile ``t`` to ``(group, m-tile within group)``. The host only needs an
upper bound of the tile count, ``ceil(R / BLOCK_M) + E + 1``, which is known without reading
``offsets``; programs past the real tile count exit at once, so experts without rows cost nothing
but one idle program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------- kernel


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
def _grouped_gemm_kernel(
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
    # cp.async pipeline (tests/test_triton.py::test_kernel_compiles_for_sm90_and_sm80).
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


# ----------------------------------------------------------------------------- configs

# Shape classes: (max average rows per expert, candidate configs), a config being (BLOCK_M,
# BLOCK_N, BLOCK_K, num_warps, num_stages). The first class whose bound is >= R / E applies.
# Without autotuning each class runs its first candidate (starting points chosen without a GPU:
# decode-like shapes, few rows per expert, want a short M tile and wide N/K tiles; prefill-like
# shapes square-ish 64-128 tiles). With autotuning (set_autotune(True) or
# MOEOPS_TRITON_AUTOTUNE=1) the first call of each shape key on a GPU times every candidate
# that compiles and keeps the fastest (tuned_configs()).
_CANDIDATES = (
    (16, ((16, 64, 64, 4, 3), (16, 128, 64, 4, 4), (16, 64, 128, 4, 4), (32, 64, 64, 4, 4))),
    (64, ((64, 64, 64, 4, 3), (64, 128, 64, 4, 4), (32, 128, 64, 4, 4), (64, 64, 128, 4, 4))),
    (float("inf"), ((128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                    (128, 128, 64, 4, 4), (64, 128, 64, 4, 4))),
)
# (bound, default config) per class, flattened
_CONFIGS = tuple((bound, *cands[0]) for bound, cands in _CANDIDATES)
# The interpreter runs every program in numpy: small tiles keep CPU tests quick.
_INTERPRET_CONFIG = (16, 32, 32, 1, 1)

_AUTOTUNE: bool | None = None  # None: follow MOEOPS_TRITON_AUTOTUNE
_TUNED: dict = {}


def set_autotune(enabled: bool | None) -> None:
    """Turns the Triton grouped GEMM's autotuner on or off for this process (``None``: follow
    the environment variable ``MOEOPS_TRITON_AUTOTUNE=1``). Tuning happens on the first call of
    each shape key (shape class, rows rounded to a power of two, N, K, dtypes, bias, layout,
    device): every candidate of the class is compiled and timed (median of 5 CUDA-event
    timings), which synchronises with the host once; later calls reuse the choice. Calls made
    while a CUDA graph is being captured never tune (they use a tuned config if there is one,
    else the class default)."""
    global _AUTOTUNE
    _AUTOTUNE = enabled


def tuned_configs() -> dict:
    """The autotuner's choices so far: ``{shape key: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
    num_stages)}``."""
    return dict(_TUNED)


def _autotune_enabled() -> bool:
    if _AUTOTUNE is not None:
        return _AUTOTUNE
    import os
    return os.environ.get("MOEOPS_TRITON_AUTOTUNE", "0").lower() in ("1", "true", "on", "yes")


def _cuda_time_ms(fn, reps: int = 5) -> float:
    """Median CUDA-event time of ``fn()`` over ``reps`` runs (after the caller's warm-up)."""
    from moeops.benchmark import _timer
    times = _timer(torch.device("cuda"))(fn, reps)
    return 1e3 * sorted(times)[len(times) // 2]


def _tune(key, candidates, launch, timer=_cuda_time_ms):
    """The fastest of ``candidates`` for ``key`` by ``timer(lambda: launch(cfg))``, cached in
    _TUNED. A candidate whose compile or launch fails (e.g. too much shared memory for fp32
    operands) is skipped; if none runs, the first candidate is returned uncached so that its
    error surfaces from the real launch."""
    if key in _TUNED:
        return _TUNED[key]
    best = None
    for cfg in candidates:
        try:
            launch(cfg)  # compile and warm up
        except Exception:  # noqa: BLE001 - triton raises several compile/resource error types
            continue
        t = timer(lambda: launch(cfg))
        if best is None or t < best[0]:
            best = (t, cfg)
    if best is None:
        return candidates[0]
    _TUNED[key] = best[1]
    return best[1]


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _interpreting() -> bool:
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except Exception:  # older triton
        import os
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _shape_class(R: int, E: int):
    """(class bound, candidate configs) for R rows over E experts."""
    avg = R / max(E, 1)
    for bound, cands in _CANDIDATES:
        if avg <= bound:
            return bound, cands
    return _CANDIDATES[-1]


def _pick_config(R: int, E: int):
    if _interpreting():
        return _INTERPRET_CONFIG
    return _shape_class(R, E)[1][0]


# ----------------------------------------------------------------------------- wrappers


def _schedule(offsets: torch.Tensor, R: int, E: int, block_m: int):
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
        if t.dtype not in _TL_DTYPES:
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
    if x.dtype == w.dtype and not _interpreting():
        cdt = _TL_DTYPES[x.dtype]
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
        bounds, tile_group, tile_m, max_tiles = _schedule(offsets, R, E, bm)
        grid = (max_tiles, triton.cdiv(N, bn))
        _grouped_gemm_kernel[grid](
            x, w, out, b, bounds, tile_group, tile_m,
            N, K, E,
            x.stride(0), x.stride(1),
            s_we, s_wn, s_wk,
            out.stride(0), out.stride(1),
            s_be, s_bn,
            HAS_BIAS=bias is not None, COMPUTE_DTYPE=cdt, IEEE=cdt == tl.float32,
            K_STATIC=K if _interpreting() else 0,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )

    if x.is_cuda and not _interpreting() and _autotune_enabled():
        bound, cands = _shape_class(R, E)
        key = (bound, R.bit_length(), N, K, x.dtype, w.dtype, out.dtype, bias is not None,
               w_transposed, x.device.index)
        if torch.cuda.is_current_stream_capturing():  # never tune inside a graph
            cfg = _TUNED.get(key, cands[0])
        else:
            cfg = _tune(key, cands, launch)
    else:
        cfg = _pick_config(R, E)
    launch(cfg)
    return out


class _GroupedGemmFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets, w_transposed):
        ctx.w_transposed = w_transposed
        ctx.save_for_backward(x, w, offsets)
        return _grouped_gemm(x, w, offsets, w_transposed)

    @staticmethod
    def backward(ctx, grad):
        from moeops.ops import _grouped_gemm_backward  # the analytic fp32 torch backward
        x, w, offsets = ctx.saved_tensors
        gx, gw = _grouped_gemm_backward(grad, x, w, offsets, ctx.w_transposed)
        return gx, gw, None, None


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


class _FusedExpertsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        (hidden, ids, weights, w_up, w_down, b_up, b_down, activation, gated, gain, shared_out,
         shared_gate) = args
        ctx.activation, ctx.gated = activation, gated
        ctx.save_for_backward(hidden, ids, weights, w_up, w_down, b_up, b_down, gain,
                              shared_out, shared_gate)
        return _fused_experts(*args)

    @staticmethod
    def backward(ctx, grad):
        from moeops.ops import _fused_experts_backward  # the analytic fp32 torch backward
        hidden, ids, weights, w_up, w_down, b_up, b_down, gain, shared_out, shared_gate = \
            ctx.saved_tensors
        gh, gw, gup, gdown, gbu, gbd, gso, gsg = _fused_experts_backward(
            grad.contiguous(), hidden, ids, weights, w_up, w_down, b_up, b_down, ctx.activation,
            ctx.gated, gain, shared_out, shared_gate)
        return (gh, None, gw, gup, gdown, gbu if b_up is not None else None,
                gbd if b_down is not None else None, None, None, None,
                gso if shared_out is not None else None,
                gsg if shared_out is not None and shared_gate is not None else None)


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
    from moeops import ops, reference

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
    plan = ops.route_plan(idl, E)
    rows = ops.permute(hidden, plan.sorted_slots, top_k)  # [T*K, H], padding rows zero
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
    out = ops.combine(y, w_slot.contiguous(), plan.inverse)  # fp32, slot order
    if shared_out is not None:
        sg = shared_gate.float().reshape(T, 1) if shared_gate is not None else 1.0
        out = out + sg * shared_out.float()
    return out.to(hidden.dtype)
