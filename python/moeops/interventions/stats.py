"""Routing and expert statistics of :mod:`moeops.interventions`: switch collection on and off
per MoE layer, zero, read (plain dicts of device tensors) and a context manager around them."""

from __future__ import annotations

import contextlib

import torch

from moeops.interventions._state import STATS_LEVELS, Stats, select_layers, states, sync

__all__ = ["enable_stats", "disable_stats", "reset_stats", "read_stats", "collect_stats"]


def enable_stats(model, level: str = "weights", layers=None) -> None:
    """Switch statistics collection on (``level`` in :data:`STATS_LEVELS`, cumulative) for the
    given MoE layers (default all), with zeroed accumulators."""
    if level not in STATS_LEVELS:
        raise ValueError(f"moeops.interventions: level must be one of {STATS_LEVELS}, got "
                         f"{level!r}")
    known = states(model)
    for i in select_layers(model, layers):
        st = known[i]
        st.stats = Stats(level, st.E, st.device)
    sync(model)


def disable_stats(model, layers=None) -> None:
    """Switch statistics collection off (zero overhead again); accumulators are discarded."""
    known = states(model, create=False)
    for i in (known if layers is None else select_layers(model, layers)):
        known[i].stats = None
    if known:
        sync(model)


def reset_stats(model, layers=None) -> None:
    """Zero the accumulators (start a new segment, e.g. a new prompt)."""
    known = states(model, create=False)
    for i in (known if layers is None else select_layers(model, layers)):
        if known[i].stats is not None:
            known[i].stats.reset()


def read_stats(model, *, stacked: bool = True, clone: bool = True) -> dict:
    """The accumulated statistics as a plain dict.

    ``stacked=True`` (and every layer has the same E): ``{"layers": [i, ...], name: tensor
    [L, E] (tokens: [L]), ...}``; else ``{layer_index: {name: tensor [E]}}``. Names: ``counts``,
    ``weight_sum``, ``prob_sum``, ``tokens``, ``norm_sum``, ``out_absmax``,
    ``out_absmax_channel``, ``in_absmax``, ``active_units`` (those of the level). Tensors stay on
    the model's device (reading them is the only synchronisation).
    """
    known = states(model, create=False)
    per = {i: st.stats.as_dict() for i, st in known.items() if st.stats is not None}
    if clone:
        per = {i: {k: v.clone() for k, v in d.items()} for i, d in per.items()}
    if not stacked:
        return per
    if not per:
        return {"layers": []}
    if len({d["counts"].shape[0] for d in per.values()}) != 1 or \
            len({tuple(d) for d in per.values()}) != 1:
        raise ValueError("moeops.interventions: layers differ in E or level; use stacked=False")
    names = next(iter(per.values())).keys()
    out = {"layers": list(per)}
    for n in names:
        out[n] = torch.stack([per[i][n] for i in per])
    return out


@contextlib.contextmanager
def collect_stats(model, level: str = "weights", layers=None):
    """Context manager: statistics on (fresh accumulators) inside, off after. Yields a callable
    returning :func:`read_stats`."""
    enable_stats(model, level, layers)
    try:
        yield lambda **kw: read_stats(model, **kw)
    finally:
        disable_stats(model, layers)
