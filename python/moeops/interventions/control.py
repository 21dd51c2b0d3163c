"""Expert interventions of :mod:`moeops.interventions`: set / clear them per MoE layer (masks,
gains, forced experts, rank-subset and top-p routing, external routing), a context manager, and
the papers' one-line forms (MoTE switch-off and forced activation, Super Experts pruning)."""

from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import torch

from moeops.interventions._state import MASK_MODES, MASK_STAGES, select_layers, states, sync

__all__ = ["set_intervention", "clear_interventions", "intervene", "switch_off", "force_experts",
           "prune_experts"]


def _as_mask(value, E, device, name):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        t = value.to(device)
        if t.dtype != torch.bool:
            raise TypeError(f"moeops.interventions: {name} must be a bool tensor [E] or [T, E], "
                            f"got {t.dtype}")
        if t.shape[-1] != E or t.dim() not in (1, 2):
            raise ValueError(f"moeops.interventions: {name} must be [E={E}] or [T, E], got "
                             f"{tuple(t.shape)}")
        return t
    m = torch.zeros(E, dtype=torch.bool, device=device)
    for e in value:
        if not 0 <= int(e) < E:
            raise ValueError(f"moeops.interventions: {name} lists expert {e}, outside [0, {E})")
        m[int(e)] = True
    return m


def _per_layer(value, i):
    return value.get(i) if isinstance(value, dict) else value


def set_intervention(model, layers=None, *, mask=None, mask_mode: str = "reroute",
                     mask_stage: str = "post_score", forced=None, forced_ids=None, gain=None,
                     ranks: Sequence[int] | None = None,
                     rank_groups: Sequence[Sequence[int]] | None = None,
                     ranks_renormalize: bool | None = None, top_p: float | None = None,
                     top_p_max_k: int | None = None, routing=None) -> None:
    """Set interventions on MoE layers ``layers`` (an index, a list, or None = all). Replaces
    what was set on those layers before. Each value may be a dict ``{layer: value}``.

    * ``mask``: bool ``[E]`` / ``[T, E]`` or a list of expert ids; ``mask_mode`` ``"reroute"``
      (next best expert fills the slot), ``"drop"`` (slot emptied, other weights unchanged),
      ``"drop_renorm"`` (survivors rescaled to the original sum). ``mask_stage="pre_score"``
      removes masked experts before scoring (softmax denominator without them: equals deleting
      them from the model).
    * ``forced``: bool ``[E]`` / ``[T, E]`` or list of ids; ``forced_ids [T]``: one forced id per
      token (-1 none). A forced expert always gets a slot (evicting the lowest-ranked one),
      weighted by its own routing score (then the model's normal renormalisation).
    * ``gain [E]``: per-expert output multiplier (0 = expert switched off, not computed).
    * ``ranks``: route each token to the experts at these ranks of its sorted order (e.g.
      ``(2,)`` = the third best), weights renormalised over them when the model renormalises
      (``ranks_renormalize`` overrides). ``rank_groups``: one rank list per contiguous equal
      group of the layer's token rows (SCMoE: strong and weak routing in one batched forward;
      shorter lists are padded with empty slots).
    * ``top_p``: keep each token's best experts until their probability mass reaches ``top_p``
      (at least one; ``top_p_max_k`` caps the count); renormalised as ``ranks``.
    * ``routing``: external routing, ``(ids [T, k], weights [T, k] or None)`` (None: weight 1),
      or a callable ``(layer_index, hidden_states, router_logits) -> (ids, weights)``.
    """
    if mask_mode not in MASK_MODES:
        raise ValueError(f"moeops.interventions: mask_mode must be one of {MASK_MODES}, got "
                         f"{mask_mode!r}")
    if mask_stage not in MASK_STAGES:
        raise ValueError(f"moeops.interventions: mask_stage must be one of {MASK_STAGES}, got "
                         f"{mask_stage!r}")
    if ranks is not None and rank_groups is not None:
        raise ValueError("moeops.interventions: give ranks or rank_groups, not both")
    if ranks is not None:
        rank_groups = (tuple(ranks),)
    if rank_groups is not None:
        rank_groups = tuple(tuple(int(r) for r in g) for g in rank_groups)
        if not rank_groups or any(not g or min(g) < 0 for g in rank_groups):
            raise ValueError(f"moeops.interventions: ranks must be non-empty lists of ranks >= 0, "
                             f"got {rank_groups}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"moeops.interventions: top_p must be in (0, 1], got {top_p}")
    if top_p is not None and rank_groups is not None:
        raise ValueError("moeops.interventions: give ranks or top_p, not both")
    known = states(model)
    for i in select_layers(model, layers):
        st = known[i]
        E = st.E
        st.clear_interventions()
        st.mask = _as_mask(_per_layer(mask, i), E, st.device, "mask")
        st.mask_mode, st.mask_stage = mask_mode, mask_stage
        st.forced = _as_mask(_per_layer(forced, i), E, st.device, "forced")
        fid = _per_layer(forced_ids, i)
        if fid is not None:
            fid = torch.as_tensor(fid, device=st.device)
            if fid.dim() != 1:
                raise ValueError(f"moeops.interventions: forced_ids must be [T], got "
                                 f"{tuple(fid.shape)}")
        st.forced_ids = fid
        g = _per_layer(gain, i)
        if g is not None:
            g = torch.as_tensor(g, dtype=torch.float32, device=st.device)
            if g.shape != (E,):
                raise ValueError(f"moeops.interventions: gain must be [E={E}], got "
                                 f"{tuple(g.shape)}")
        st.gain = g
        rg = _per_layer(rank_groups, i) if isinstance(rank_groups, dict) else rank_groups
        if rg is not None and max(max(r) for r in rg) >= E:
            raise ValueError(f"moeops.interventions: ranks {rg} out of range for E={E}")
        st.rank_groups = rg
        st.ranks_renormalize = ranks_renormalize
        st.top_p, st.top_p_max_k = top_p, top_p_max_k
        st.routing = _per_layer(routing, i)
    sync(model)


def clear_interventions(model, layers=None) -> None:
    """Remove every intervention (statistics stay as they are)."""
    known = states(model, create=False)
    for i in (known if layers is None else select_layers(model, layers)):
        known[i].clear_interventions()
    if known:
        sync(model)


@contextlib.contextmanager
def intervene(model, layers=None, **kwargs):
    """Context manager around :func:`set_intervention` (same arguments); cleared on exit."""
    set_intervention(model, layers, **kwargs)
    try:
        yield model
    finally:
        clear_interventions(model, layers)


def _group_by_layer(experts: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    by = {}
    for layer, e in experts:
        by.setdefault(int(layer), []).append(int(e))
    return by


def switch_off(model, experts: Iterable[tuple[int, int]], mode: str = "reroute") -> None:
    """MoTE (Dahlke et al., 2025, arXiv 2502.11096) "switch off" of ``(layer, expert)`` pairs.

    The paper's exact arithmetic is not published; ``mode`` chooses the reading: ``"reroute"``
    (masked before top-k, the next best expert takes the slot), ``"drop"`` (slot emptied, other
    weights unchanged), ``"drop_renorm"`` (slot emptied, survivors rescaled to the original
    sum) or ``"gain0"`` (output multiplied by 0, which equals ``drop``). Replaces the
    interventions of the layers concerned; undo with :func:`clear_interventions`.
    """
    by = _group_by_layer(experts)
    known = states(model)
    if mode == "gain0":
        gains = {}
        for i, es in by.items():
            g = torch.ones(known[i].E) if i in known else None
            if g is not None:
                g[es] = 0.0
            gains[i] = g
        set_intervention(model, list(by), gain=gains)
        return
    set_intervention(model, list(by), mask={i: es for i, es in by.items()}, mask_mode=mode)


def force_experts(model, experts: Iterable[tuple[int, int]]) -> None:
    """MoTE "forced expert activation": the ``(layer, expert)`` pairs always get a slot."""
    by = _group_by_layer(experts)
    set_intervention(model, list(by), forced=by)


def prune_experts(model, experts: Iterable[tuple[int, int]], mode: str = "drop") -> None:
    """Super Experts (Su et al., 2025, arXiv 2507.23279) pruning of ``(layer, expert)`` pairs.

    The paper zeroes the expert's down projection: the router still selects it, it contributes
    0 and the other weights are not renormalised: ``mode="drop"`` is that arithmetic (and
    skips the expert's compute). Other masking modes are accepted for comparison.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"moeops.interventions: mode must be one of {MASK_MODES}, got {mode!r}")
    by = _group_by_layer(experts)
    set_intervention(model, list(by), mask=by, mask_mode=mode)
