"""Typed Python wrappers of the ``torch.ops.moeops`` ops, their fake (meta) kernels and autograd.

Each op has three parts here: a wrapper that picks a backend (``"auto"``, ``"cpp"``,
``"reference"``, or ``"triton"`` for grouped_gemm / fused_experts; see :mod:`moeops.backends`), a ``register_fake`` kernel (shapes only, for ``torch.compile`` and
meta tensors) and, where differentiable, a ``register_autograd`` formula. Schemas are defined
once, in ``csrc/torch_bindings.cpp``; semantics in :mod:`moeops.reference`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moeops import reference
from moeops.backends import resolve

_ops = torch.ops.moeops


class GatingResult(NamedTuple):
    """Result of :func:`topk_gating`."""

    weights: torch.Tensor  #: [T, k] float32 routing weights (0 for empty slots)
    ids: torch.Tensor  #: [T, k] int32 expert ids, -1 for empty slots
    probs: torch.Tensor  #: [T, E] float32 scores if requested, else an empty [0] tensor
    counts: torch.Tensor  #: [E] int32 non-empty slots per expert if requested, else [0]


class RoutingPlan(NamedTuple):
    """Result of :func:`route_plan`: how slots map to expert-grouped rows."""

    offsets: torch.Tensor  #: [E+1] int32, rows of expert e are offsets[e]:offsets[e+1]
    sorted_slots: torch.Tensor  #: [T*K] int32 slot of each row, -1 for padding rows
    inverse: torch.Tensor  #: [T*K] int32 row of each slot, -1 for empty slots


# ----------------------------------------------------------------------------- wrappers

def topk_gating(logits: torch.Tensor, k: int, *, scoring: str = "softmax",
                renormalize: bool = False, routed_scaling_factor: float = 1.0,
                bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1,
                mask: torch.Tensor | None = None, mask_mode: str = "reroute",
                forced: torch.Tensor | None = None, return_probs: bool = False,
                return_counts: bool = False, backend: str = "auto") -> GatingResult:
    """Fused top-k gating from router logits ``[T, E]`` (E <= 512, 1 <= k <= E).

    ``scoring`` is ``"softmax"`` (Mixtral, Qwen, OLMoE) or ``"sigmoid"`` (DeepSeek-V3), always
    computed in fp32. ``bias [E]`` only chooses experts (DeepSeek-V3's
    ``e_score_correction_bias``); the unbiased scores weigh them. ``n_group``/``topk_group``
    enable group-limited selection (group score = sum of its top-2). ``mask`` (bool ``[E]`` or
    ``[T, E]``, True = masked) applies with ``mask_mode`` ``"reroute"`` (masked experts cannot be
    chosen), ``"drop"`` (their slots become empty, other weights unchanged) or
    ``"drop_renorm"`` (survivors rescaled to the original total). ``forced`` (same shapes)
    experts always get a slot, ahead of the others. Ties go to the lower expert index.
    The full semantics are in :func:`moeops.reference.topk_gating`.

    Returns a :class:`GatingResult` ``(weights [T,k] f32, ids [T,k] i32, probs, counts)``.
    Differentiable with respect to ``logits`` (weights and probs).
    """
    fn = resolve("topk_gating", backend, logits)
    return GatingResult(*fn(logits, k, scoring, renormalize, routed_scaling_factor, bias, n_group,
                            topk_group, mask, mask_mode, forced, return_probs, return_counts))


def route_plan(ids: torch.Tensor, num_experts: int, *, backend: str = "auto") -> RoutingPlan:
    """Group the slots of ids ``[T, K]`` (int32, -1 = empty) by expert.

    Returns a :class:`RoutingPlan` ``(offsets [E+1], sorted_slots [T*K], inverse [T*K])``, all
    int32. Within an expert, rows follow slot order, so the plan is deterministic. On CPU an id
    outside ``[-1, num_experts)`` raises; on CUDA (no host sync) it is treated as an empty slot.
    """
    fn = resolve("route_plan", backend, ids)
    return RoutingPlan(*fn(ids, num_experts))


def permute(hidden: torch.Tensor, sorted_slots: torch.Tensor, top_k: int,
            slot_scale: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Gather token rows ``hidden [T, H]`` into expert-grouped rows ``[len(sorted_slots), H]``.

    Row ``r`` is ``hidden[sorted_slots[r] // top_k]``, optionally multiplied by
    ``slot_scale[sorted_slots[r]]`` (float32 ``[T*K]``); padding rows (slot -1) are zero.
    Differentiable with respect to ``hidden`` and ``slot_scale``.
    """
    fn = resolve("permute", backend, hidden)
    return fn(hidden, sorted_slots, top_k, slot_scale)


def combine(expert_out: torch.Tensor, weights: torch.Tensor, inverse: torch.Tensor, *,
            backend: str = "auto") -> torch.Tensor:
    """Weighted sum of each token's expert rows: ``expert_out [R, H] -> [T, H]``.

    ``out[t] = sum_k weights[t, k] * expert_out[inverse[t*K + k]]`` over non-empty slots,
    accumulated in fp32 in slot order (deterministic; no atomics), returned in
    ``expert_out.dtype``. Differentiable with respect to ``expert_out`` and ``weights``.
    """
    fn = resolve("combine", backend, expert_out)
    return fn(expert_out, weights, inverse)


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *,
                 w_transposed: bool = False, backend: str = "auto") -> torch.Tensor:
    """Per-expert matmul over expert-grouped rows ``x [R, K] -> [R, N]`` (in ``x.dtype``).

    ``w`` is ``[E, N, K]`` (nn.Linear / Hugging Face layout, ``out = x @ w[e].T``) or, with
    ``w_transposed=True``, ``[E, K, N]`` (``out = x @ w[e]``). Rows ``offsets[e]:offsets[e+1]``
    (int32 ``[E+1]``, e.g. from :func:`route_plan`) use expert ``e``; rows past ``offsets[E]`` are
    zero; experts without rows cost nothing. fp32/fp16/bf16 inputs (x and w may differ), fp32
    accumulation. Differentiable with respect to ``x`` and ``w``.
    """
    fn = resolve("grouped_gemm", backend, x)
    return fn(x, w, offsets, w_transposed)


def fused_experts(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                  w_up: torch.Tensor, w_down: torch.Tensor, b_up: torch.Tensor | None = None,
                  b_down: torch.Tensor | None = None, *, activation: str = "silu",
                  gated: bool = True, gain: torch.Tensor | None = None,
                  shared_out: torch.Tensor | None = None, shared_gate: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """The whole expert computation of an MoE layer: ``hidden [T, H] -> [T, H]``.

    ``ids``/``weights [T, K]`` come from :func:`topk_gating` (-1 = empty slot, skipped).
    ``w_up [E, N_up, H]``: gated experts (``gated=True``; SwiGLU with ``activation="silu"``,
    GeGLU with ``"gelu"``/``"gelu_tanh"``) use Hugging Face's concatenated ``gate_up_proj`` with
    ``N_up = 2I`` (gate rows first); plain experts (``gated=False``; ``"relu"``, ``"gelu"``,
    ``"relu2"``...) use ``up_proj`` with ``N_up = I``. ``w_down [E, H, I]``. Optional biases
    ``b_up [E, N_up]``, ``b_down [E, H]``, and a per-expert output ``gain [E]`` (0 skips the
    expert's compute). A shared expert's output ``shared_out [T, H]`` times ``shared_gate``
    (``[T]``/``[T, 1]``; Qwen2-MoE's sigmoid gate) is added inside the same combine.
    Intermediates stay fp32; each token's weighted sum is accumulated in fp32 in slot order
    (deterministic). Semantics: :func:`moeops.reference.fused_experts`. Differentiable with
    respect to hidden, weights, w_up, w_down, the biases, shared_out and shared_gate.
    """
    fn = resolve("fused_experts", backend, hidden)
    return fn(hidden, ids, weights, w_up, w_down, b_up, b_down, activation, gated, gain,
              shared_out, shared_gate)


def fused_experts_list(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                       w_gate: list[torch.Tensor], w_up: list[torch.Tensor],
                       w_down: list[torch.Tensor], *, activation: str = "silu",
                       shared_out: torch.Tensor | None = None,
                       shared_gate: torch.Tensor | None = None,
                       backend: str = "auto") -> torch.Tensor:
    """:func:`fused_experts` for gated experts kept as per-expert tensors (transformers 4.x
    ModuleLists): ``w_gate[e]``, ``w_up[e]`` ``[I, H]``, ``w_down[e]`` ``[H, I]``, each
    contiguous. The kernel reads every expert's weights where they are: nothing is stacked or
    copied. Differentiable with respect to hidden, weights and every weight tensor (the backward
    stacks the weights temporarily). ``shared_out``/``shared_gate`` as in :func:`fused_experts`.
    """
    fn = resolve("fused_experts_list", backend, hidden)
    return fn(hidden, ids, weights, list(w_gate), list(w_up), list(w_down), activation,
              shared_out, shared_gate)


class ExpertsStatsResult(NamedTuple):
    """Result of :func:`fused_experts_stats`."""

    out: torch.Tensor  #: [T, H] exactly fused_experts' output
    slot_norms: torch.Tensor  #: [T, K] f32 L2 norm of each slot's unweighted expert output
    out_absmax: torch.Tensor  #: [E] f32 max |down-projection output| per expert
    out_absmax_channel: torch.Tensor  #: [E] int64 channel of that maximum, -1 without rows
    in_absmax: torch.Tensor  #: [E] f32 max |down-projection input| per expert
    active_units: torch.Tensor  #: [E] int64 non-zero down-projection inputs, summed over rows


def fused_experts_stats(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                        w_up: torch.Tensor, w_down: torch.Tensor, b_up: torch.Tensor | None = None,
                        b_down: torch.Tensor | None = None, *, activation: str = "silu",
                        gated: bool = True, gain: torch.Tensor | None = None,
                        shared_out: torch.Tensor | None = None,
                        shared_gate: torch.Tensor | None = None,
                        backend: str = "auto") -> ExpertsStatsResult:
    """:func:`fused_experts` that also returns statistics of the expert outputs, computed by the
    C++ kernel right after its down projection (from the rows it just wrote, no recomputation):
    per-slot L2 norms of the unweighted expert output ``[T, K]``, per-expert ``max |y|`` with its
    channel, ``max |h|`` of the down input and the number of non-zero down inputs (active units
    of ReLU experts). Used by :mod:`moeops.interventions` (Super Experts, EASY-EP). Not
    differentiable. Semantics: :func:`moeops.reference.fused_experts_stats`. Returns an
    :class:`ExpertsStatsResult`.
    """
    fn = resolve("fused_experts_stats", backend, hidden)
    return ExpertsStatsResult(*fn(hidden, ids, weights, w_up, w_down, b_up, b_down, activation,
                                  gated, gain, shared_out, shared_gate))


# ----------------------------------------------------------------------------- fake kernels

def _check_devices(ref_name: str, ref: torch.Tensor, **others) -> None:
    """Same check as the C++ kernels, for calls that dispatch to the fake (meta) kernels."""
    for name, t in others.items():
        if t is not None:
            torch._check(t.device == ref.device, lambda: (
                f"moeops: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                "move them to one device"))


@torch.library.register_fake("moeops::topk_gating")
def _topk_gating_fake(logits, k, scoring="softmax", renormalize=False, routed_scaling_factor=1.0,
                      bias=None, n_group=1, topk_group=1, mask=None, mask_mode="reroute",
                      forced=None, return_probs=False, return_counts=False):
    torch._check(logits.dim() == 2, lambda: f"moeops: logits must be [T, E], got {logits.shape}")
    _check_devices("logits", logits, bias=bias, mask=mask, forced=forced)
    T, E = logits.shape
    torch._check(1 <= k <= E, lambda: f"moeops: k must be in [1, E={E}], got k={k}")
    f32 = dict(dtype=torch.float32, device=logits.device)
    i32 = dict(dtype=torch.int32, device=logits.device)
    return (logits.new_empty((T, k), **f32), logits.new_empty((T, k), **i32),
            logits.new_empty((T, E) if return_probs else (0,), **f32),
            logits.new_empty((E,) if return_counts else (0,), **i32))


@torch.library.register_fake("moeops::route_plan")
def _route_plan_fake(ids, num_experts):
    n = ids.numel()
    return (ids.new_empty((num_experts + 1,)), ids.new_empty((n,)), ids.new_empty((n,)))


@torch.library.register_fake("moeops::permute")
def _permute_fake(hidden, sorted_slots, top_k, slot_scale=None):
    _check_devices("hidden", hidden, sorted_slots=sorted_slots, slot_scale=slot_scale)
    return hidden.new_empty((sorted_slots.shape[0], hidden.shape[1]))


@torch.library.register_fake("moeops::combine")
def _combine_fake(expert_out, weights, inverse):
    _check_devices("expert_out", expert_out, weights=weights, inverse=inverse)
    return expert_out.new_empty((weights.shape[0], expert_out.shape[1]))


@torch.library.register_fake("moeops::grouped_gemm")
def _grouped_gemm_fake(x, w, offsets, w_transposed=False):
    _check_devices("x", x, w=w, offsets=offsets)
    torch._check(x.dim() == 2 and w.dim() == 3, lambda: "moeops: x must be [R, K], w [E, N, K]")
    return x.new_empty((x.shape[0], w.shape[2] if w_transposed else w.shape[1]))


@torch.library.register_fake("moeops::fused_experts")
def _fused_experts_fake(hidden, ids, weights, w_up, w_down, b_up=None, b_down=None,
                        activation="silu", gated=True, gain=None, shared_out=None,
                        shared_gate=None):
    _check_devices("hidden", hidden, ids=ids, weights=weights, w_up=w_up, w_down=w_down,
                   b_up=b_up, b_down=b_down, gain=gain, shared_out=shared_out,
                   shared_gate=shared_gate)
    torch._check(hidden.dim() == 2, lambda: f"moeops: hidden must be [T, H], got {hidden.shape}")
    return hidden.new_empty(hidden.shape)


@torch.library.register_fake("moeops::fused_experts_list")
def _fused_experts_list_fake(hidden, ids, weights, w_gate, w_up, w_down, activation="silu",
                             shared_out=None, shared_gate=None):
    _check_devices("hidden", hidden, ids=ids, weights=weights, shared_out=shared_out,
                   shared_gate=shared_gate, **{
        f"w_{n}[{e}]": t for n, ts in (("gate", w_gate), ("up", w_up), ("down", w_down))
        for e, t in enumerate(ts)})
    torch._check(hidden.dim() == 2, lambda: f"moeops: hidden must be [T, H], got {hidden.shape}")
    return hidden.new_empty(hidden.shape)


@torch.library.register_fake("moeops::fused_experts_stats")
def _fused_experts_stats_fake(hidden, ids, weights, w_up, w_down, b_up=None, b_down=None,
                              activation="silu", gated=True, gain=None, shared_out=None,
                              shared_gate=None):
    out = _fused_experts_fake(hidden, ids, weights, w_up, w_down, b_up, b_down, activation, gated,
                              gain, shared_out, shared_gate)
    E = w_up.shape[0]
    f32 = dict(dtype=torch.float32)
    i64 = dict(dtype=torch.int64)
    return (out, hidden.new_empty(tuple(ids.shape), **f32), hidden.new_empty((E,), **f32),
            hidden.new_empty((E,), **i64), hidden.new_empty((E,), **f32),
            hidden.new_empty((E,), **i64))


# ----------------------------------------------------------------------------- autograd

_GATING_ARGS = ("logits", "k", "scoring", "renormalize", "routed_scaling_factor", "bias",
                "n_group", "topk_group", "mask", "mask_mode", "forced", "return_probs",
                "return_counts")


def _gating_setup(ctx, inputs, output):
    ctx.args = inputs
    ctx.save_for_backward(inputs[0])


def _gating_backward(ctx, g_weights, g_ids, g_probs, g_counts):
    # The weights are a differentiable function of the logits given the selection; replaying
    # the reference (same semantics, same selection) under autograd gives their exact gradient.
    (logits,) = ctx.saved_tensors
    args = list(ctx.args)
    with torch.enable_grad():
        x = logits.detach().requires_grad_(True)
        args[0] = x
        args[11] = g_probs is not None and g_probs.numel() > 0
        w, _, probs, _ = reference.topk_gating(*args)
        outs, grads = [w], [g_weights]
        if args[11]:
            outs.append(probs)
            grads.append(g_probs)
        (gx,) = torch.autograd.grad(outs, [x], grads, allow_unused=True)
    if gx is None:
        gx = torch.zeros_like(logits)
    return (gx.to(logits.dtype),) + (None,) * (len(_GATING_ARGS) - 1)


torch.library.register_autograd("moeops::topk_gating", _gating_backward,
                                setup_context=_gating_setup)


def _sorted_from_inverse(inverse: torch.Tensor, num_rows: int) -> torch.Tensor:
    """sorted_slots [num_rows] (row -> slot, -1 padding) from inverse [T*K] (slot -> row)."""
    sorted_slots = torch.full((num_rows,), -1, dtype=torch.int32, device=inverse.device)
    slots = torch.arange(inverse.numel(), dtype=torch.int32, device=inverse.device)
    valid = inverse >= 0
    sorted_slots[inverse[valid].long()] = slots[valid]
    return sorted_slots


def _inverse_from_sorted(sorted_slots: torch.Tensor, num_slots: int) -> torch.Tensor:
    """inverse [num_slots] (slot -> row, -1 empty) from sorted_slots [R] (row -> slot)."""
    inverse = torch.full((num_slots,), -1, dtype=torch.int32, device=sorted_slots.device)
    rows = torch.arange(sorted_slots.numel(), dtype=torch.int32, device=sorted_slots.device)
    valid = sorted_slots >= 0
    inverse[sorted_slots[valid].long()] = rows[valid]
    return inverse


def _rows_of_slots(rows: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """fp32 ``[T*K, H]``: the row of each slot, zeros for empty slots (safe when T or R is 0)."""
    out = torch.zeros((inverse.numel(), rows.shape[1]), dtype=torch.float32, device=rows.device)
    valid = inverse >= 0
    out[valid] = rows.float()[inverse[valid].long()]
    return out


def _permute_setup(ctx, inputs, output):
    hidden, sorted_slots, top_k, slot_scale = inputs
    ctx.top_k = top_k
    ctx.has_scale = slot_scale is not None
    ctx.save_for_backward(hidden, sorted_slots, slot_scale)


def _permute_backward(ctx, grad_rows):
    hidden, sorted_slots, slot_scale = ctx.saved_tensors
    T, K = hidden.shape[0], ctx.top_k
    inverse = _inverse_from_sorted(sorted_slots, T * K)
    grad_hidden = grad_scale = None
    if ctx.needs_input_grad[0]:
        w = slot_scale.view(T, K) if ctx.has_scale else \
            torch.ones(T, K, dtype=torch.float32, device=hidden.device)
        grad_hidden = _ops.combine(grad_rows.contiguous(), w.contiguous(), inverse)
    if ctx.has_scale and ctx.needs_input_grad[3]:
        rows = _rows_of_slots(grad_rows, inverse)  # [T*K, H]
        tok = hidden.float().repeat_interleave(K, dim=0)
        grad_scale = torch.where(inverse >= 0, (rows * tok).sum(-1), 0.0)
    return grad_hidden, None, None, grad_scale


torch.library.register_autograd("moeops::permute", _permute_backward, setup_context=_permute_setup)


def _combine_setup(ctx, inputs, output):
    expert_out, weights, inverse = inputs
    ctx.save_for_backward(expert_out, weights, inverse)


def _combine_backward(ctx, grad_out):
    expert_out, weights, inverse = ctx.saved_tensors
    T, K = weights.shape
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        sorted_slots = _sorted_from_inverse(inverse, expert_out.shape[0])
        grad_x = _ops.permute(grad_out.contiguous(), sorted_slots, K,
                              weights.reshape(-1).contiguous())
    if ctx.needs_input_grad[1]:
        rows = _rows_of_slots(expert_out, inverse).view(T, K, expert_out.shape[1])
        dots = (rows * grad_out.float().unsqueeze(1)).sum(-1)
        grad_w = torch.where(inverse.view(T, K) >= 0, dots, 0.0)
    return grad_x, grad_w, None


torch.library.register_autograd("moeops::combine", _combine_backward, setup_context=_combine_setup)


# Backward of grouped_gemm and fused_experts: analytic per-expert formulas in fp32 (pure torch),
# wrapped in their own custom ops with fake kernels, so torch.compile / AOT autograd see one
# opaque node instead of tracing into the data-dependent per-expert loops.

@torch.library.custom_op("moeops::_grouped_gemm_backward", mutates_args=())
def _grouped_gemm_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                           offsets: torch.Tensor, w_transposed: bool
                           ) -> tuple[torch.Tensor, torch.Tensor]:
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


@_grouped_gemm_backward.register_fake
def _(grad, x, w, offsets, w_transposed):
    return torch.empty_like(x), torch.empty_like(w)


def _gg_setup(ctx, inputs, output):
    x, w, offsets, w_transposed = inputs
    ctx.w_transposed = w_transposed
    ctx.save_for_backward(x, w, offsets)


def _gg_backward(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    gx, gw = _grouped_gemm_backward(grad, x, w, offsets, ctx.w_transposed)
    return gx, gw, None, None


torch.library.register_autograd("moeops::grouped_gemm", _gg_backward, setup_context=_gg_setup)


def _activation_and_grad(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
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
def _fused_experts_backward(grad: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor,
                            weights: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                            b_up: torch.Tensor | None, b_down: torch.Tensor | None,
                            activation: str, gated: bool, gain: torch.Tensor | None,
                            shared_out: torch.Tensor | None, shared_gate: torch.Tensor | None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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
            act, dact = _activation_and_grad(u[:, :i], activation)
            a = act * u[:, i:]
        else:
            act, dact = _activation_and_grad(u, activation)
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


@_fused_experts_backward.register_fake
def _(grad, hidden, ids, weights, w_up, w_down, b_up, b_down, activation, gated, gain, shared_out,
      shared_gate):
    def like(t):  # the real op returns contiguous tensors, whatever the inputs' strides
        return t.new_empty(t.shape) if t is not None else hidden.new_empty(0)
    return (like(hidden), like(weights), like(w_up), like(w_down), like(b_up), like(b_down),
            like(shared_out), like(shared_gate if shared_out is not None else None))


def _fe_setup(ctx, inputs, output):
    (hidden, ids, weights, w_up, w_down, b_up, b_down, activation, gated, gain, shared_out,
     shared_gate) = inputs
    ctx.activation, ctx.gated = activation, gated
    ctx.has = (b_up is not None, b_down is not None, shared_out is not None,
               shared_out is not None and shared_gate is not None)
    ctx.save_for_backward(hidden, ids, weights, w_up, w_down, b_up, b_down, gain, shared_out,
                          shared_gate)


def _fe_backward(ctx, grad):
    hidden, ids, weights, w_up, w_down, b_up, b_down, gain, shared_out, shared_gate = \
        ctx.saved_tensors
    gh, gw, gup, gdown, gbu, gbd, gso, gsg = _fused_experts_backward(
        grad, hidden, ids, weights, w_up, w_down, b_up, b_down, ctx.activation, ctx.gated, gain,
        shared_out, shared_gate)
    hb_up, hb_down, h_so, h_sg = ctx.has
    return (gh, None, gw, gup, gdown, gbu if hb_up else None, gbd if hb_down else None, None,
            None, None, gso if h_so else None, gsg if h_sg else None)


torch.library.register_autograd("moeops::fused_experts", _fe_backward, setup_context=_fe_setup)


def _fel_setup(ctx, inputs, output):
    hidden, ids, weights, w_gate, w_up, w_down, activation, shared_out, shared_gate = inputs
    ctx.activation = activation
    ctx.E = len(w_down)
    ctx.has = (shared_out is not None, shared_out is not None and shared_gate is not None)
    ctx.save_for_backward(hidden, ids, weights, shared_out, shared_gate, *w_gate, *w_up, *w_down)


def _fel_backward(ctx, grad):
    hidden, ids, weights, shared_out, shared_gate, *ws = ctx.saved_tensors
    E = ctx.E
    w_gate, w_up, w_down = ws[:E], ws[E:2 * E], ws[2 * E:]
    gate_up = torch.cat([torch.stack(w_gate), torch.stack(w_up)], dim=1)  # temporary, backward only
    gh, gw, gup, gdown, _, _, gso, gsg = _fused_experts_backward(
        grad, hidden, ids, weights, gate_up, torch.stack(w_down), None, None, ctx.activation, True,
        None, shared_out, shared_gate)
    i = gup.shape[1] // 2
    out = (gh, None, gw, list(gup[:, :i].unbind(0)), list(gup[:, i:].unbind(0)),
           list(gdown.unbind(0)), None, gso if ctx.has[0] else None,
           gsg if ctx.has[1] else None)
    # torch < 2.14 expects one gradient per argument as passed (trailing defaults left out)
    return out[:len(ctx.needs_input_grad)]


torch.library.register_autograd("moeops::fused_experts_list", _fel_backward,
                                setup_context=_fel_setup)
