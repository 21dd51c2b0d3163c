"""Fused top-k gating: the typed wrapper of ``torch.ops.moeops.topk_gating``, its fake (meta)
kernel and its autograd formula. Schema: ``csrc/torch_bindings.cpp``; kernels:
``csrc/gating/``; semantics: :func:`moeops.reference.topk_gating`."""

from __future__ import annotations

from typing import NamedTuple

import torch

from moeops import reference
from moeops._dispatch import resolve
from moeops.ops._checks import check_devices, named_inputs

__all__ = ["GatingResult", "topk_gating"]


class GatingResult(NamedTuple):
    """Result of :func:`topk_gating`."""

    weights: torch.Tensor  #: [T, k] float32 routing weights (0 for empty slots)
    ids: torch.Tensor  #: [T, k] int32 expert ids, -1 for empty slots
    probs: torch.Tensor  #: [T, E] float32 scores if requested, else an empty [0] tensor
    counts: torch.Tensor  #: [E] int32 non-empty slots per expert if requested, else [0]


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
    return GatingResult(*fn(logits, k, scoring=scoring, renormalize=renormalize,
                            routed_scaling_factor=routed_scaling_factor, bias=bias,
                            n_group=n_group, topk_group=topk_group, mask=mask,
                            mask_mode=mask_mode, forced=forced, return_probs=return_probs,
                            return_counts=return_counts))


# ----------------------------------------------------------------------------- fake kernel

@torch.library.register_fake("moeops::topk_gating")
def _topk_gating_fake(logits, k, scoring="softmax", renormalize=False, routed_scaling_factor=1.0,
                      bias=None, n_group=1, topk_group=1, mask=None, mask_mode="reroute",
                      forced=None, return_probs=False, return_counts=False):
    torch._check(logits.dim() == 2, lambda: f"moeops: logits must be [T, E], got {logits.shape}")
    check_devices("logits", logits, bias=bias, mask=mask, forced=forced)
    T, E = logits.shape
    torch._check(1 <= k <= E, lambda: f"moeops: k must be in [1, E={E}], got k={k}")
    f32 = dict(dtype=torch.float32, device=logits.device)
    i32 = dict(dtype=torch.int32, device=logits.device)
    return (logits.new_empty((T, k), **f32), logits.new_empty((T, k), **i32),
            logits.new_empty((T, E) if return_probs else (0,), **f32),
            logits.new_empty((E,) if return_counts else (0,), **i32))


# ----------------------------------------------------------------------------- autograd

def _gating_setup(ctx, inputs, output):
    ctx.args = named_inputs("topk_gating", inputs)
    ctx.save_for_backward(ctx.args["logits"])


def _gating_backward(ctx, g_weights, g_ids, g_probs, g_counts):
    # The weights are a differentiable function of the logits given the selection; replaying
    # the reference (same semantics, same selection) under autograd gives their exact gradient.
    (logits,) = ctx.saved_tensors
    args = dict(ctx.args)
    with torch.enable_grad():
        x = logits.detach().requires_grad_(True)
        args["logits"] = x
        args["return_probs"] = g_probs is not None and g_probs.numel() > 0
        w, _, probs, _ = reference.topk_gating(**args)
        outs, grads = [w], [g_weights]
        if args["return_probs"]:
            outs.append(probs)
            grads.append(g_probs)
        (gx,) = torch.autograd.grad(outs, [x], grads, allow_unused=True)
    if gx is None:
        gx = torch.zeros_like(logits)
    return (gx.to(logits.dtype),) + (None,) * (len(ctx.args) - 1)


torch.library.register_autograd("moeops::topk_gating", _gating_backward,
                                setup_context=_gating_setup)
