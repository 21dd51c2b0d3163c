"""Checks and argument plumbing shared by the op families' Python parts (fake kernels,
autograd formulas)."""

from __future__ import annotations

import functools

import torch

__all__ = ["check_devices", "schema_args", "named_inputs"]


def check_devices(ref_name: str, ref: torch.Tensor, **others) -> None:
    """Same check as the C++ kernels, for calls that dispatch to the fake (meta) kernels: every
    tensor in ``others`` (None is skipped) lives on ``ref``'s device."""
    for name, t in others.items():
        if t is not None:
            torch._check(t.device == ref.device, lambda: (
                f"moeops: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                "move them to one device"))


@functools.cache
def schema_args(op: str) -> tuple[str, ...]:
    """Argument names of ``torch.ops.moeops.<op>`` in schema order (the one definition is in
    ``csrc/torch_bindings.cpp``)."""
    return tuple(a.name for a in getattr(torch.ops.moeops, op).default._schema.arguments)


def named_inputs(op: str, inputs: tuple) -> dict:
    """The ``inputs`` tuple an autograd ``setup_context`` receives (every schema argument, in
    order) as a dict keyed by argument name."""
    names = schema_args(op)
    if len(inputs) != len(names):
        raise RuntimeError(f"moeops::{op}: expected {len(names)} inputs {names}, got "
                           f"{len(inputs)}")
    return dict(zip(names, inputs))
