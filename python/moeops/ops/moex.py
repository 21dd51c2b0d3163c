"""MoE-X ops: typed wrappers, fake (meta) kernels and autograd of ``torch.ops.moeops.moex_*``.

Schemas: ``csrc/torch_bindings.cpp``; kernels: ``csrc/moex/``; semantics:
:mod:`moeops.reference` (MoE-X section);
method and API: ``docs/moex.md``. The layer built on them is :mod:`moeops.moex`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moeops import reference
from moeops._dispatch import resolve
from moeops.ops._autograd import fused_experts_backward
from moeops.ops._checks import check_devices, named_inputs

__all__ = ["MoexStats", "MoexRouting", "MoexExpertsResult", "MoexCode", "moex_router_stats",
           "moex_route", "moex_experts", "moex_code"]


class MoexStats(NamedTuple):
    """Result of :func:`moex_router_stats`."""

    mu: torch.Tensor  #: [M, d] f32 column means of each expert's encoder
    var: torch.Tensor  #: [M, d] f32 population column variances (over the D rows)
    bias_mean: torch.Tensor  #: [M] f32 mean encoder bias (0 without biases)


class MoexRouting(NamedTuple):
    """Result of :func:`moex_route`."""

    weights: torch.Tensor  #: [T, k] f32 softmax over the selected scores (0 for empty slots)
    ids: torch.Tensor  #: [T, k] int32 expert ids, -1 for empty slots
    density: torch.Tensor  #: [T, M] f32 predicted active fraction if requested, else [0]


class MoexExpertsResult(NamedTuple):
    """Result of :func:`moex_experts`."""

    out: torch.Tensor  #: [T, d] in hidden.dtype
    active: torch.Tensor  #: [T, K] int32 active units per slot if requested, else [0]


class MoexCode(NamedTuple):
    """Result of :func:`moex_code`: the wide code z [T, M*D] as CSR."""

    indptr: torch.Tensor  #: [T+1] int64
    indices: torch.Tensor  #: [nnz] int64 global unit index j*D + i, ascending per token
    values: torch.Tensor  #: [nnz] f32 omega_j * h_{j,i}
    l0: torch.Tensor  #: [T] int32 ||z_t||_0


def moex_router_stats(w_enc: torch.Tensor, b_enc: torch.Tensor | None = None, *,
                      backend: str = "auto") -> MoexStats:
    """Routing statistics of MoE-X experts: ``w_enc [M, D, d]`` (and ``b_enc [M, D]``) ->
    ``(mu [M, d], var [M, d], bias_mean [M])`` in fp32: per-expert column mean and population
    variance over the D rows, and the mean encoder bias. Compute once per weight version and
    pass to :func:`moex_route`. Differentiable with respect to ``w_enc`` and ``b_enc`` (so the
    routing gradient reaches the encoders).
    """
    fn = resolve("moex_router_stats", backend, w_enc)
    return MoexStats(*fn(w_enc, b_enc=b_enc))


def moex_route(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, bias_mean: torch.Tensor,
               k: int, *, select: str = "sparsest", mask: torch.Tensor | None = None,
               mask_mode: str = "reroute", forced: torch.Tensor | None = None,
               return_density: bool = False, backend: str = "auto") -> MoexRouting:
    """MoE-X sparsity-aware routing of ``x [T, d]`` (any float dtype; fp32 arithmetic).

    Predicted active fraction of expert j: ``Phi(mu_h / sigma_h)`` with
    ``mu_h = x . mu_j + bias_mean_j`` and ``sigma_h = sqrt((x*x) . var_j)`` (``sigma_h = 0``:
    1 / 0 / 0.5 for ``mu_h`` > / < / == 0). ``select="sparsest"`` (the paper's rule) ranks by
    ``-density``, ``"densest"`` by ``+density`` (ablation). Top-k with ties to the lower index,
    ``weights`` = softmax of the scores over the selected experts. ``mask``/``forced``
    (bool ``[M]`` or ``[T, M]``) and ``mask_mode`` (``reroute``/``drop``/``drop_renorm``) work as
    in :func:`moeops.topk_gating`. Returns :class:`MoexRouting` ``(weights [T,k] f32,
    ids [T,k] i32, density [T,M] or [0])``. Differentiable with respect to x, mu, var and
    bias_mean (weights and density).
    """
    fn = resolve("moex_route", backend, x)
    return MoexRouting(*fn(x, mu, var, bias_mean, k, select=select, mask=mask,
                           mask_mode=mask_mode, forced=forced, return_density=return_density))


def moex_experts(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 w_enc: torch.Tensor, b_enc: torch.Tensor | None, w_dec: torch.Tensor,
                 b_dec: torch.Tensor | None = None, *, down: str = "auto",
                 return_active: bool = False, backend: str = "auto") -> MoexExpertsResult:
    """MoE-X ReLU experts with a sparse down-projection: ``hidden [T, d] -> out [T, d]``.

    Expert e: ``h = ReLU(x @ w_enc[e].T + b_enc[e])``, ``y = h @ w_dec[e] + b_dec[e]`` with
    ``w_enc``, ``w_dec`` both ``[M, D, d]`` (the decoder stored unit-major: an active unit is
    one contiguous row; from an ``nn.Linear(D, d)`` pass ``weight.T``). ``ids``/``weights
    [T, K]`` as from :func:`moex_route` (-1 = empty slot, no compute). ``out[t] = sum_k
    weights[t,k] * y`` in fp32, slot order. ``down``: ``"auto"`` (per tile of rows: gather the
    active decoder rows or skip units inactive for the whole tile; per expert, a dense GEMM
    when that is estimated cheaper, i.e. at high density), ``"sparse"`` (never dense) or
    ``"dense"``. The sparse paths are exact for finite decoder weights (each output the same fp32
    FMA chain as a dense loop over the units, zeros skipped; a skipped unit's ``0 * inf`` would
    be NaN in the dense loop); the dense GEMM agrees to fp32 rounding. With ``d = 0`` the output
    is empty and ``active`` counts the units with ``ReLU(b_enc[e]) != 0``.
    ``return_active`` adds ``active [T, K]`` int32, the number of non-zero units per slot.
    Differentiable with respect to hidden, weights and all expert parameters.
    """
    fn = resolve("moex_experts", backend, hidden)
    return MoexExpertsResult(*fn(hidden, ids, weights, w_enc, b_enc, w_dec, b_dec=b_dec,
                                 down=down, return_active=return_active))


def moex_code(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
              w_enc: torch.Tensor, b_enc: torch.Tensor | None = None, *,
              backend: str = "auto") -> MoexCode:
    """Wide-code export: the MoE-X layer's hidden code ``z [T, M*D]`` as CSR.

    ``z[t, j*D + i] = omega_j h_{j,i}`` (``omega_j`` the token's weight for expert j, summed
    over duplicate slots; 0 for experts not routed to), the interpretable sparse code that
    replaces an SAE. Returns :class:`MoexCode` ``(indptr [T+1] i64, indices [nnz] i64 ascending
    per token, values [nnz] f32, l0 [T] i32 = ||z_t||_0)``. CPU kernel (not differentiable).
    """
    fn = resolve("moex_code", backend, hidden)
    return MoexCode(*fn(hidden, ids, weights, w_enc, b_enc=b_enc))


# ----------------------------------------------------------------------------- fake kernels

@torch.library.register_fake("moeops::moex_router_stats")
def _moex_router_stats_fake(w_enc, b_enc=None):
    check_devices("w_enc", w_enc, b_enc=b_enc)
    torch._check(w_enc.dim() == 3, lambda: f"moeops: w_enc must be [M, D, d], got {w_enc.shape}")
    M, _, d = w_enc.shape
    f32 = dict(dtype=torch.float32)
    return w_enc.new_empty((M, d), **f32), w_enc.new_empty((M, d), **f32), \
        w_enc.new_empty((M,), **f32)


@torch.library.register_fake("moeops::moex_route")
def _moex_route_fake(x, mu, var, bias_mean, k, select="sparsest", mask=None,
                     mask_mode="reroute", forced=None, return_density=False):
    check_devices("x", x, mu=mu, var=var, bias_mean=bias_mean, mask=mask, forced=forced)
    torch._check(x.dim() == 2 and mu.dim() == 2, lambda: "moeops: x must be [T, d], mu [M, d]")
    T, M = x.shape[0], mu.shape[0]
    torch._check(1 <= k <= M, lambda: f"moeops: k must be in [1, M={M}], got k={k}")
    return (x.new_empty((T, k), dtype=torch.float32), x.new_empty((T, k), dtype=torch.int32),
            x.new_empty((T, M) if return_density else (0,), dtype=torch.float32))


@torch.library.register_fake("moeops::moex_experts")
def _moex_experts_fake(hidden, ids, weights, w_enc, b_enc, w_dec, b_dec=None, down="auto",
                       return_active=False):
    check_devices("hidden", hidden, ids=ids, weights=weights, w_enc=w_enc, b_enc=b_enc,
                   w_dec=w_dec, b_dec=b_dec)
    torch._check(hidden.dim() == 2 and ids.dim() == 2,
                 lambda: "moeops: hidden must be [T, d], ids [T, K]")
    return hidden.new_empty(hidden.shape), \
        ids.new_empty(ids.shape if return_active else (0,), dtype=torch.int32)


@torch.library.register_fake("moeops::moex_code")
def _moex_code_fake(hidden, ids, weights, w_enc, b_enc=None):
    check_devices("hidden", hidden, ids=ids, weights=weights, w_enc=w_enc, b_enc=b_enc)
    T = hidden.shape[0]
    nnz = torch.library.get_ctx().new_dynamic_size()
    return (hidden.new_empty((T + 1,), dtype=torch.int64),
            hidden.new_empty((nnz,), dtype=torch.int64),
            hidden.new_empty((nnz,), dtype=torch.float32),
            hidden.new_empty((T,), dtype=torch.int32))


# ----------------------------------------------------------------------------- autograd

def _stats_setup(ctx, inputs, output):
    w_enc, b_enc = inputs
    ctx.has_b = b_enc is not None
    ctx.b_dtype = b_enc.dtype if b_enc is not None else None
    ctx.save_for_backward(w_enc, output[0])


def _stats_backward(ctx, g_mu, g_var, g_bmean):
    # mu = mean_i w_i, var = mean_i (w_i - mu)^2  =>  dvar/dw_i = 2 (w_i - mu) / D
    w_enc, mu = ctx.saved_tensors
    D = w_enc.shape[1]
    w = w_enc.float()
    g = torch.zeros_like(w)
    if g_mu is not None:
        g = g + g_mu.float().unsqueeze(1) / D
    if g_var is not None:
        g = g + g_var.float().unsqueeze(1) * 2.0 * (w - mu.unsqueeze(1)) / D
    gb = None
    if ctx.has_b and g_bmean is not None:
        gb = (g_bmean.float() / D).unsqueeze(1).expand(w.shape[0], D).to(ctx.b_dtype).contiguous()
    return g.to(w_enc.dtype), gb


torch.library.register_autograd("moeops::moex_router_stats", _stats_backward,
                                setup_context=_stats_setup)


_ROUTE_DIFF = ("x", "mu", "var", "bias_mean")  # the differentiable inputs


def _route_setup(ctx, inputs, output):
    ctx.args = named_inputs("moex_route", inputs)
    ctx.save_for_backward(*(ctx.args[n] for n in _ROUTE_DIFF))


def _route_backward(ctx, g_weights, g_ids, g_density):
    # weights and density are differentiable functions of (x, mu, var, bias_mean) given the
    # selection; replaying the reference under autograd gives their exact gradient.
    saved = ctx.saved_tensors
    args = dict(ctx.args)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in saved]
        args.update(zip(_ROUTE_DIFF, leaves))
        want_density = g_density is not None and g_density.numel() > 0
        args["return_density"] = want_density
        w, _, dens = reference.moex_route(**args)
        outs, grads = [w], [g_weights]
        if want_density:
            outs.append(dens)
            grads.append(g_density)
        gs = torch.autograd.grad(outs, leaves, grads, allow_unused=True)
    res = [torch.zeros_like(t) if g is None else g.to(t.dtype) for g, t in zip(gs, saved)]
    return tuple(res) + (None,) * (len(ctx.args) - len(_ROUTE_DIFF))


torch.library.register_autograd("moeops::moex_route", _route_backward, setup_context=_route_setup)


def _experts_setup(ctx, inputs, output):
    hidden, ids, weights, w_enc, b_enc, w_dec, b_dec, down, return_active = inputs
    ctx.has = (b_enc is not None, b_dec is not None)
    ctx.save_for_backward(hidden, ids, weights, w_enc, b_enc, w_dec, b_dec)


def _experts_backward(ctx, grad, g_active):
    hidden, ids, weights, w_enc, b_enc, w_dec, b_dec = ctx.saved_tensors
    # the same math as fused_experts with non-gated ReLU experts and w_down = w_dec^T (a
    # contiguous copy: that op's fake kernel assumes its outputs have its inputs' strides)
    gh, gw, genc, gdec_t, gbe, gbd, _, _ = fused_experts_backward(
        grad.contiguous(), hidden, ids, weights, w_enc, w_dec.transpose(1, 2).contiguous(), b_enc,
        b_dec, "relu", False, None, None, None)
    has_be, has_bd = ctx.has
    return (gh, None, gw, genc, gbe if has_be else None, gdec_t.transpose(1, 2).contiguous(),
            gbd if has_bd else None, None, None)


torch.library.register_autograd("moeops::moex_experts", _experts_backward,
                                setup_context=_experts_setup)


@torch.library.register_fake("moeops::_moex_down")
def _moex_down_fake(h, offsets, w_dec, down="auto"):
    return h.new_empty((h.shape[0], w_dec.shape[2]))
