"""The grouped expert GEMM and the fused expert MLP: typed wrappers of
``torch.ops.moeops.grouped_gemm`` / ``fused_experts`` / ``fused_experts_list`` /
``fused_experts_stats``, their fake (meta) kernels and autograd formulas (the backward math is
in :mod:`moeops.ops._autograd`, shared with the Triton backend). Schemas:
``csrc/torch_bindings.cpp``; kernels: ``csrc/experts/``; semantics: :mod:`moeops.reference`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moeops._dispatch import resolve
from moeops.ops._autograd import (
    fused_experts_backward,
    fused_experts_grads,
    grouped_gemm_grads,
    save_fused_experts,
    save_grouped_gemm,
)
from moeops.ops._checks import check_devices, named_inputs

__all__ = ["ExpertsStatsResult", "grouped_gemm", "fused_experts", "fused_experts_list",
           "fused_experts_stats"]


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
    return fn(x, w, offsets, w_transposed=w_transposed)


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
    return fn(hidden, ids, weights, w_up, w_down, b_up=b_up, b_down=b_down,
              activation=activation, gated=gated, gain=gain, shared_out=shared_out,
              shared_gate=shared_gate)


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
    return fn(hidden, ids, weights, list(w_gate), list(w_up), list(w_down),
              activation=activation, shared_out=shared_out, shared_gate=shared_gate)


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
    return ExpertsStatsResult(*fn(hidden, ids, weights, w_up, w_down, b_up=b_up, b_down=b_down,
                                  activation=activation, gated=gated, gain=gain,
                                  shared_out=shared_out, shared_gate=shared_gate))


# ----------------------------------------------------------------------------- fake kernels

@torch.library.register_fake("moeops::grouped_gemm")
def _grouped_gemm_fake(x, w, offsets, w_transposed=False):
    check_devices("x", x, w=w, offsets=offsets)
    torch._check(x.dim() == 2 and w.dim() == 3, lambda: "moeops: x must be [R, K], w [E, N, K]")
    return x.new_empty((x.shape[0], w.shape[2] if w_transposed else w.shape[1]))


@torch.library.register_fake("moeops::fused_experts")
def _fused_experts_fake(hidden, ids, weights, w_up, w_down, b_up=None, b_down=None,
                        activation="silu", gated=True, gain=None, shared_out=None,
                        shared_gate=None):
    check_devices("hidden", hidden, ids=ids, weights=weights, w_up=w_up, w_down=w_down,
                   b_up=b_up, b_down=b_down, gain=gain, shared_out=shared_out,
                   shared_gate=shared_gate)
    torch._check(hidden.dim() == 2, lambda: f"moeops: hidden must be [T, H], got {hidden.shape}")
    return hidden.new_empty(hidden.shape)


@torch.library.register_fake("moeops::fused_experts_list")
def _fused_experts_list_fake(hidden, ids, weights, w_gate, w_up, w_down, activation="silu",
                             shared_out=None, shared_gate=None):
    check_devices("hidden", hidden, ids=ids, weights=weights, shared_out=shared_out,
                   shared_gate=shared_gate, **{
        f"w_{n}[{e}]": t for n, ts in (("gate", w_gate), ("up", w_up), ("down", w_down))
        for e, t in enumerate(ts)})
    torch._check(hidden.dim() == 2, lambda: f"moeops: hidden must be [T, H], got {hidden.shape}")
    return hidden.new_empty(hidden.shape)


@torch.library.register_fake("moeops::fused_experts_stats")
def _fused_experts_stats_fake(hidden, ids, weights, w_up, w_down, b_up=None, b_down=None,
                              activation="silu", gated=True, gain=None, shared_out=None,
                              shared_gate=None):
    out = _fused_experts_fake(hidden, ids, weights, w_up, w_down, b_up=b_up, b_down=b_down,
                              activation=activation, gated=gated, gain=gain,
                              shared_out=shared_out, shared_gate=shared_gate)
    E = w_up.shape[0]
    f32 = dict(dtype=torch.float32)
    i64 = dict(dtype=torch.int64)
    return (out, hidden.new_empty(tuple(ids.shape), **f32), hidden.new_empty((E,), **f32),
            hidden.new_empty((E,), **i64), hidden.new_empty((E,), **f32),
            hidden.new_empty((E,), **i64))


# ----------------------------------------------------------------------------- autograd

def _gg_setup(ctx, inputs, output):
    save_grouped_gemm(ctx, *inputs)


def _gg_backward(ctx, grad):
    return grouped_gemm_grads(ctx, grad)


torch.library.register_autograd("moeops::grouped_gemm", _gg_backward, setup_context=_gg_setup)


def _fe_setup(ctx, inputs, output):
    save_fused_experts(ctx, named_inputs("fused_experts", inputs))


def _fe_backward(ctx, grad):
    return fused_experts_grads(ctx, grad)


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
    gh, gw, gup, gdown, _, _, gso, gsg = fused_experts_backward(
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
