"""Token permutation: ``route_plan`` (group slots by expert), ``permute`` (gather rows) and
``combine`` (weighted sum back per token): typed wrappers of ``torch.ops.moeops.*``, their fake
(meta) kernels and autograd formulas. Schemas: ``csrc/torch_bindings.cpp``; kernels:
``csrc/permute/``; semantics: :mod:`moeops.reference`."""

from __future__ import annotations

from typing import NamedTuple

import torch

from moeops._dispatch import resolve
from moeops.ops._checks import check_devices

__all__ = ["RoutingPlan", "route_plan", "permute", "combine"]

_ops = torch.ops.moeops


class RoutingPlan(NamedTuple):
    """Result of :func:`route_plan`: how slots map to expert-grouped rows."""

    offsets: torch.Tensor  #: [E+1] int32, rows of expert e are offsets[e]:offsets[e+1]
    sorted_slots: torch.Tensor  #: [T*K] int32 slot of each row, -1 for padding rows
    inverse: torch.Tensor  #: [T*K] int32 row of each slot, -1 for empty slots


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
    return fn(hidden, sorted_slots, top_k, slot_scale=slot_scale)


def combine(expert_out: torch.Tensor, weights: torch.Tensor, inverse: torch.Tensor, *,
            backend: str = "auto") -> torch.Tensor:
    """Weighted sum of each token's expert rows: ``expert_out [R, H] -> [T, H]``.

    ``out[t] = sum_k weights[t, k] * expert_out[inverse[t*K + k]]`` over non-empty slots,
    accumulated in fp32 in slot order (deterministic; no atomics), returned in
    ``expert_out.dtype``. Differentiable with respect to ``expert_out`` and ``weights``.
    """
    fn = resolve("combine", backend, expert_out)
    return fn(expert_out, weights, inverse)


# ----------------------------------------------------------------------------- fake kernels

@torch.library.register_fake("moeops::route_plan")
def _route_plan_fake(ids, num_experts):
    n = ids.numel()
    return (ids.new_empty((num_experts + 1,)), ids.new_empty((n,)), ids.new_empty((n,)))


@torch.library.register_fake("moeops::permute")
def _permute_fake(hidden, sorted_slots, top_k, slot_scale=None):
    check_devices("hidden", hidden, sorted_slots=sorted_slots, slot_scale=slot_scale)
    return hidden.new_empty((sorted_slots.shape[0], hidden.shape[1]))


@torch.library.register_fake("moeops::combine")
def _combine_fake(expert_out, weights, inverse):
    check_devices("expert_out", expert_out, weights=weights, inverse=inverse)
    return expert_out.new_empty((weights.shape[0], expert_out.shape[1]))


# ----------------------------------------------------------------------------- autograd

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
