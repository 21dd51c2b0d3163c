"""Backward formulas of the grouped expert GEMM and the fused experts, shared by the compiled
ops (:mod:`moeops.ops.experts`, :mod:`moeops.ops.moex`) and the Triton backend
(:mod:`moeops._triton`), so both differentiate the same way.

The formulas are analytic per-expert fp32 computations in plain torch, wrapped in their own
custom ops (``moeops::_grouped_gemm_backward``, ``moeops::_fused_experts_backward``) with fake
kernels, so torch.compile / AOT autograd see one opaque node instead of tracing into the
data-dependent per-expert loops.
"""

from __future__ import annotations

import torch

from moeops import reference
from moeops.ops._checks import schema_args

__all__ = ["grouped_gemm_backward", "fused_experts_backward", "activation_and_grad",
           "save_grouped_gemm", "grouped_gemm_grads", "save_fused_experts", "fused_experts_grads"]


@torch.library.custom_op("moeops::_grouped_gemm_backward", mutates_args=())
def grouped_gemm_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                          offsets: torch.Tensor, w_transposed: bool
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_w) of :func:`moeops.grouped_gemm` for the output gradient ``grad``."""
    gx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    off = offsets.tolist()
    for e in range(w.shape[0]):
        a, b = off[e], off[e + 1]
        if b <= a:
            continue
        ge, xe, we = grad[a:b].float(), x[a:b].float(), w[e].float()
        if w_transposed:  # out = x @ we, we [K, N]
            gx[a:b] = ge @ we.t()
            gw[e] = xe.t() @ ge
        else:  # out = x @ we.T, we [N, K]
            gx[a:b] = ge @ we
            gw[e] = ge.t() @ xe
    return gx.to(x.dtype), gw.to(w.dtype)


@grouped_gemm_backward.register_fake
def _(grad, x, w, offsets, w_transposed):
    return torch.empty_like(x), torch.empty_like(w)


def activation_and_grad(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """act(x) and act'(x) in fp32 for the expert activations of reference.apply_activation."""
    if name == "silu":
        sg = torch.sigmoid(x)
        return x * sg, sg * (1 + x * (1 - sg))
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(x * 0.7071067811865476))
        pdf = torch.exp(-0.5 * x * x) * 0.3989422804014327
        return x * cdf, cdf + x * pdf
    if name == "gelu_tanh":
        c = 0.7978845608028654
        inner = c * (x + 0.044715 * x.pow(3))
        th = torch.tanh(inner)
        d = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * c * (1 + 3 * 0.044715 * x * x)
        return 0.5 * x * (1 + th), d
    if name == "relu":
        return torch.relu(x), (x > 0).float()
    if name == "relu2":
        r = torch.relu(x)
        return r * r, 2 * r
    raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {name!r}")


@torch.library.custom_op("moeops::_fused_experts_backward", mutates_args=())
def fused_experts_backward(grad: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor,
                           weights: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                           b_up: torch.Tensor | None, b_down: torch.Tensor | None,
                           activation: str, gated: bool, gain: torch.Tensor | None,
                           shared_out: torch.Tensor | None, shared_gate: torch.Tensor | None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`moeops.fused_experts` for the output gradient ``grad``:
    ``(hidden, weights, w_up, w_down, b_up, b_down, shared_out, shared_gate)``, with an empty
    tensor in place of each absent optional input."""
    f32 = dict(dtype=torch.float32, device=hidden.device)
    g_h = torch.zeros(hidden.shape, **f32)
    g_w = torch.zeros(weights.shape, **f32)
    g_up, g_down = torch.zeros(w_up.shape, **f32), torch.zeros(w_down.shape, **f32)
    g_bu = torch.zeros(b_up.shape, **f32) if b_up is not None else hidden.new_empty(0)
    g_bd = torch.zeros(b_down.shape, **f32) if b_down is not None else hidden.new_empty(0)
    x_all, go_all, idl = hidden.float(), grad.float(), ids.long()
    for e in range(w_up.shape[0]):
        ge = 1.0 if gain is None else float(gain[e])
        t_idx, k_idx = torch.nonzero(idl == e, as_tuple=True)
        if t_idx.numel() == 0 or ge == 0.0:
            continue
        x, go = x_all[t_idx], go_all[t_idx]
        wu, wd = w_up[e].float(), w_down[e].float()
        u = x @ wu.t() + (b_up[e].float() if b_up is not None else 0.0)
        if gated:
            i = u.shape[1] // 2
            act, dact = activation_and_grad(u[:, :i], activation)
            a = act * u[:, i:]
        else:
            act, dact = activation_and_grad(u, activation)
            a = act
        y = a @ wd.t() + (b_down[e].float() if b_down is not None else 0.0)
        s = weights[t_idx, k_idx].float() * ge
        g_w[t_idx, k_idx] = (go * y).sum(-1) * ge
        gy = go * s.unsqueeze(1)
        g_down[e] = gy.t() @ a
        if b_down is not None:
            g_bd[e] = gy.sum(0)
        ga = gy @ wd
        gu = torch.cat([ga * u[:, i:] * dact, ga * act], 1) if gated else ga * dact
        g_up[e] = gu.t() @ x
        if b_up is not None:
            g_bu[e] = gu.sum(0)
        g_h.index_add_(0, t_idx, gu @ wu)
    g_so, g_sg = hidden.new_empty(0), hidden.new_empty(0)
    if shared_out is not None:
        sg = shared_gate.float().reshape(-1, 1) if shared_gate is not None else 1.0
        g_so = (go_all * sg).to(shared_out.dtype)
        if shared_gate is not None:
            g_sg = (go_all * shared_out.float()).sum(-1).reshape(shared_gate.shape).to(
                shared_gate.dtype)
    return (g_h.to(hidden.dtype), g_w, g_up.to(w_up.dtype), g_down.to(w_down.dtype),
            g_bu.to(b_up.dtype) if b_up is not None else g_bu,
            g_bd.to(b_down.dtype) if b_down is not None else g_bd, g_so, g_sg)


@fused_experts_backward.register_fake
def _(grad, hidden, ids, weights, w_up, w_down, b_up, b_down, activation, gated, gain, shared_out,
      shared_gate):
    def like(t):  # the real op returns contiguous tensors, whatever the inputs' strides
        return t.new_empty(t.shape) if t is not None else hidden.new_empty(0)
    return (like(hidden), like(weights), like(w_up), like(w_down), like(b_up), like(b_down),
            like(shared_out), like(shared_gate if shared_out is not None else None))


# ----------------------------------------------------------------------------- autograd glue
# The same save / backward for torch.library.register_autograd (compiled ops) and for the
# Triton backend's torch.autograd.Function.

def save_grouped_gemm(ctx, x, w, offsets, w_transposed) -> None:
    """Saves what :func:`grouped_gemm_grads` needs."""
    ctx.w_transposed = w_transposed
    ctx.save_for_backward(x, w, offsets)


def grouped_gemm_grads(ctx, grad) -> tuple:
    """Gradients of ``grouped_gemm(x, w, offsets, w_transposed)``, one per argument."""
    x, w, offsets = ctx.saved_tensors
    gx, gw = grouped_gemm_backward(grad, x, w, offsets, ctx.w_transposed)
    return gx, gw, None, None


_FE_TENSORS = ("hidden", "ids", "weights", "w_up", "w_down", "b_up", "b_down", "gain",
               "shared_out", "shared_gate")


def save_fused_experts(ctx, args: dict) -> None:
    """Saves what :func:`fused_experts_grads` needs; ``args``: fused_experts' arguments by
    name (all of them)."""
    ctx.activation, ctx.gated = args["activation"], args["gated"]
    ctx.save_for_backward(*(args[n] for n in _FE_TENSORS))


def fused_experts_grads(ctx, grad) -> tuple:
    """Gradients of ``fused_experts``, one per argument in schema order (None for ids, the
    non-tensor arguments, gain, and the optional inputs that were not given)."""
    t = dict(zip(_FE_TENSORS, ctx.saved_tensors))
    gh, gw, gup, gdown, gbu, gbd, gso, gsg = fused_experts_backward(
        grad.contiguous(), t["hidden"], t["ids"], t["weights"], t["w_up"], t["w_down"],
        t["b_up"], t["b_down"], ctx.activation, ctx.gated, t["gain"], t["shared_out"],
        t["shared_gate"])
    has_so = t["shared_out"] is not None
    grads = {"hidden": gh, "weights": gw, "w_up": gup, "w_down": gdown,
             "b_up": gbu if t["b_up"] is not None else None,
             "b_down": gbd if t["b_down"] is not None else None,
             "shared_out": gso if has_so else None,
             "shared_gate": gsg if has_so and t["shared_gate"] is not None else None}
    return tuple(grads.get(name) for name in schema_args("fused_experts"))
