"""Routing statistics and expert interventions on a model patched by :func:`moeops.patch`, and
the MoE research papers' workflows built on them (``docs/interventions.md``).

Everything is per MoE layer. A layer is off unless something was switched on for it: the patched
router and experts forwards look at one attribute (``module._moeops_iv``), find ``None`` and run
exactly the ops they run without this module (checked by counting dispatched ops in the tests).

* **Statistics** (:func:`enable_stats`, :func:`collect_stats`, :func:`read_stats`,
  :func:`reset_stats`), cumulative levels:

  - ``"counts"``: selected slots per expert (the gating kernel's ``return_counts`` output);
  - ``"weights"``: + sums of the selected routing weights per expert;
  - ``"probs"``: + sums of the full router probabilities per expert (softmax, or the sigmoid
    scores of DeepSeek-V3) and the number of tokens;
  - ``"outputs"``: + per expert the sum of the per-slot L2 norms of the *unweighted* expert
    output, ``max |down-projection output|`` with its channel, ``max |down-projection input|``
    and the number of non-zero down-projection inputs (active units of ReLU experts), all from
    :func:`moeops.fused_experts_stats` (computed inside the CPU or CUDA kernel after the down
    GEMM).

  Accumulators are tensors on the model's device, updated in place with ``index_add_`` /
  ``maximum`` / ``+=``: no host synchronisation. ``read_stats`` returns plain dicts of tensors.

* **Interventions** (:func:`set_intervention`, :func:`intervene`, :func:`clear_interventions`):
  expert masks (``reroute`` / ``drop`` / ``drop_renorm``, global ``[E]`` or per token ``[T, E]``,
  applied after scoring or, ``mask_stage="pre_score"``, before it), per-expert output ``gain``,
  forced experts (``[E]``/``[T, E]`` bool, or one id per token), rank-subset routing (ranks
  ``[r0, r1, ...]`` of the sorted experts; also one rank list per contiguous group of rows for
  two routings in one batched forward), top-p routing, and externally supplied routing
  (``(ids, weights)`` or a callable). Empty slots (id -1) cost nothing in ``fused_experts``.

Layers are named by their decoder-layer index (``model.model.layers[i]``); only MoE layers
exist here (DeepSeek-V3's leading dense layers do not). transformers 5.x models, and the 4.x
Mixtral / Qwen2-MoE integration (ModuleList experts; see :meth:`_LayerState.v4_block_forward`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from moeops.ops import fused_experts, fused_experts_stats, topk_gating

STATS_LEVELS = ("counts", "weights", "probs", "outputs")
MASK_MODES = ("reroute", "drop", "drop_renorm")
MASK_STAGES = ("post_score", "pre_score")
_ATTR = "_moeops_iv"


# ----------------------------------------------------------------------------- layers

@dataclasses.dataclass
class MoeLayer:
    """One MoE layer of a patched model."""

    index: int  #: decoder-layer index (``model.model.layers[index]``)
    name: str  #: qualified name of the MoE block
    block: torch.nn.Module
    router: torch.nn.Module
    experts: torch.nn.Module
    decoder_layer: torch.nn.Module | None

    @property
    def num_experts(self) -> int:
        if isinstance(self.experts, torch.nn.ModuleList):  # transformers 4.x
            return len(self.experts)
        return int(self.experts.down_proj.shape[0])


def moe_layers(model: torch.nn.Module) -> list[MoeLayer]:
    """The MoE layers of a model patched by :func:`moeops.patch`, in order."""
    from moeops.integrations import hf

    if not hf.is_patched(model):
        raise ValueError("moeops.interventions: the model is not patched; call moeops.patch(model) "
                         "first")
    named = dict(model.named_modules())
    layers = []
    if hf._transformers_major() < 5:  # 4.x: the sparse MoE block routes; experts: ModuleList
        import importlib

        path, block_name_, _ = hf.SUPPORTED_V4[model.config.model_type]
        block_cls = getattr(importlib.import_module(path), block_name_)
        for name, module in named.items():
            if isinstance(module, block_cls):
                dec_name = name.rsplit(".", 1)[0] if "." in name else ""
                nums = re.findall(r"\d+", dec_name)
                index = int(nums[-1]) if nums else len(layers)
                layers.append(MoeLayer(index, name, module, module.gate, module.experts,
                                       named.get(dec_name)))
        if not layers:
            raise ValueError("moeops.interventions: no MoE layer found in the model")
        return layers
    router_cls, experts_cls = hf._classes(model.config.model_type)
    for name, module in named.items():
        if not isinstance(module, router_cls):
            continue
        block_name = name.rsplit(".", 1)[0] if "." in name else ""
        block = named[block_name]
        experts = getattr(block, "experts", None)
        if not isinstance(experts, experts_cls):
            raise ValueError(f"moeops.interventions: router {name} has no experts sibling")
        dec_name = block_name.rsplit(".", 1)[0] if "." in block_name else ""
        decoder = named.get(dec_name)
        nums = re.findall(r"\d+", dec_name)
        index = int(nums[-1]) if nums else len(layers)
        layers.append(MoeLayer(index, block_name, block, module, experts, decoder))
    if not layers:
        raise ValueError("moeops.interventions: no MoE layer found in the model")
    return layers


def _router_params(router) -> dict:
    """The gating arguments that reproduce this router (see hf.py's patched router forwards)."""
    if hasattr(router, "e_score_correction_bias"):  # DeepSeek-V3
        return dict(scoring="sigmoid", renormalize=bool(router.norm_topk_prob),
                    routed_scaling_factor=float(router.routed_scaling_factor),
                    bias=router.e_score_correction_bias, n_group=int(router.num_group),
                    topk_group=int(router.topk_group), cast=False)
    return dict(scoring="softmax", renormalize=bool(getattr(router, "norm_topk_prob", True)),
                routed_scaling_factor=1.0, bias=None, n_group=1, topk_group=1,
                cast=hasattr(router, "norm_topk_prob"))


# ----------------------------------------------------------------------------- state

class _Stats:
    """Per-layer accumulators (device tensors, updated in place)."""

    def __init__(self, level: str, E: int, device):
        self.level = STATS_LEVELS.index(level)
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        self.counts = torch.zeros(E, **i64)
        self.weight_sum = torch.zeros(E, **f32)
        self.prob_sum = torch.zeros(E, **f32)
        self.tokens = torch.zeros((), **i64)
        self.norm_sum = torch.zeros(E, **f32)
        self.out_absmax = torch.zeros(E, **f32)
        self.out_absmax_channel = torch.full((E,), -1, **i64)
        self.in_absmax = torch.zeros(E, **f32)
        self.active_units = torch.zeros(E, **i64)

    def reset(self):
        for t in (self.counts, self.weight_sum, self.prob_sum, self.tokens, self.norm_sum,
                  self.out_absmax, self.in_absmax, self.active_units):
            t.zero_()
        self.out_absmax_channel.fill_(-1)

    def as_dict(self) -> dict:
        d = dict(counts=self.counts)
        if self.level >= 1:
            d["weight_sum"] = self.weight_sum
        if self.level >= 2:
            d.update(prob_sum=self.prob_sum, tokens=self.tokens)
        if self.level >= 3:
            d.update(norm_sum=self.norm_sum, out_absmax=self.out_absmax,
                     out_absmax_channel=self.out_absmax_channel, in_absmax=self.in_absmax,
                     active_units=self.active_units)
        return d


class _LayerState:
    """What is switched on for one MoE layer; the object the patched forwards call."""

    def __init__(self, layer: MoeLayer):
        self.index = layer.index
        self.E = layer.num_experts
        self.device = next(layer.experts.parameters()).device
        self.v4 = isinstance(layer.experts, torch.nn.ModuleList)
        self.params = _router_params(layer.block if self.v4 else layer.router)
        if self.v4:
            self.params["cast"] = False  # the 4.x block casts the weights itself
        self.top_k = int(layer.block.top_k if self.v4 else layer.router.top_k)
        self.stats: _Stats | None = None
        # interventions
        self.mask = None
        self.mask_mode = "reroute"
        self.mask_stage = "post_score"
        self.forced = None
        self.forced_ids = None
        self.gain = None
        self.rank_groups: tuple[tuple[int, ...], ...] | None = None
        self.ranks_renormalize: bool | None = None
        self.top_p: float | None = None
        self.top_p_max_k: int | None = None
        self.routing = None
        # EASY-EP accumulation (set by easy_ep_scores)
        self.easy_ep: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None

    def active(self) -> bool:
        return (self.stats is not None or self.easy_ep is not None or self.mask is not None
                or self.forced is not None or self.forced_ids is not None
                or self.gain is not None or self.rank_groups is not None
                or self.top_p is not None or self.routing is not None)

    def clear_interventions(self):
        self.mask = self.forced = self.forced_ids = self.gain = None
        self.rank_groups = self.ranks_renormalize = self.top_p = self.top_p_max_k = None
        self.routing = None
        self.mask_mode, self.mask_stage = "reroute", "post_score"

    # ------------------------------------------------------------------ router side

    def route(self, router, hidden_states: torch.Tensor, router_logits: torch.Tensor):
        """Replaces the patched router's gating: returns ``(router_logits, weights, ids)``."""
        p = self.params
        E = self.E
        st = self.stats
        if self.routing is not None:
            ids, w = self._external(hidden_states, router_logits)
            self._record_routing(ids, w, None, None, router_logits, p)
            return router_logits, w, ids.long()
        logits = router_logits
        mask = self.mask
        if mask is not None and self.mask_stage == "pre_score":
            logits = logits.masked_fill(mask, float("-inf"))
        forced = self.forced
        if self.forced_ids is not None:
            fid = self.forced_ids.to(device=logits.device).long()
            forced_t = torch.zeros(fid.shape[0], E, dtype=torch.bool, device=logits.device)
            forced_t.scatter_(1, fid.clamp(min=0).unsqueeze(1), (fid >= 0).unsqueeze(1))
            forced = forced_t if forced is None else (forced_t | forced)
        post = self.rank_groups is not None or self.top_p is not None
        if self.rank_groups is not None:
            k = max(max(r) for r in self.rank_groups) + 1
        elif self.top_p is not None:
            k = E if self.top_p_max_k is None else self.top_p_max_k
        else:
            k = self.top_k
        need_probs = (st is not None and st.level >= 2) or self.top_p is not None
        w, ids, probs, counts = topk_gating(
            logits, k, scoring=p["scoring"],
            renormalize=False if post else p["renormalize"],
            routed_scaling_factor=1.0 if post else p["routed_scaling_factor"], bias=p["bias"],
            n_group=p["n_group"], topk_group=p["topk_group"], mask=mask,
            mask_mode=self.mask_mode, forced=forced, return_probs=need_probs,
            return_counts=st is not None and not post)
        if self.rank_groups is not None:
            w, ids = self._select_ranks(w, ids)
        elif self.top_p is not None:
            w, ids = self._select_top_p(w, ids, probs)
        if post:
            renorm = p["renormalize"] if self.ranks_renormalize is None else self.ranks_renormalize
            if renorm:
                w = w / (w.sum(-1, keepdim=True) + 1e-20)
            if p["routed_scaling_factor"] != 1.0:
                w = w * p["routed_scaling_factor"]
            counts = None
        self._record_routing(ids, w, probs if need_probs else None, counts, router_logits, p)
        if p["cast"]:
            w = w.to(router_logits.dtype)
        return router_logits, w, ids.long()

    def _external(self, hidden_states, router_logits):
        r = self.routing
        if callable(r):
            ids, w = r(self.index, hidden_states, router_logits)
        else:
            ids, w = r
        ids = ids.to(device=router_logits.device)
        if ids.dim() == 1:
            ids = ids.unsqueeze(1)
        if w is None:  # Read-ME-style top-1 pre-gating: implicit weight 1
            w = torch.ones(ids.shape, dtype=torch.float32, device=ids.device)
        w = w.to(device=router_logits.device, dtype=torch.float32).reshape(ids.shape)
        T = router_logits.shape[0]
        if ids.shape[0] != T:
            raise ValueError(f"moeops.interventions: external routing of layer {self.index} has "
                             f"{ids.shape[0]} rows but the layer sees {T} tokens")
        ids = ids.to(torch.int32)
        valid = (ids >= 0) & (ids < self.E)
        return torch.where(valid, ids, -1), torch.where(valid, w, 0.0)

    def _select_ranks(self, w, ids):
        groups = self.rank_groups
        if len(groups) == 1:
            idx = torch.tensor(groups[0], device=w.device)
            return w[:, idx], ids[:, idx]
        T = w.shape[0]
        G = len(groups)
        if T % G:
            raise ValueError(f"moeops.interventions: {T} tokens cannot be split into {G} equal "
                             "row groups for per-group rank routing")
        L = max(len(r) for r in groups)
        n = T // G
        ws, is_ = [], []
        for g, r in enumerate(groups):
            idx = torch.tensor(r, device=w.device)
            wg, ig = w[g * n:(g + 1) * n, idx], ids[g * n:(g + 1) * n, idx]
            if len(r) < L:
                wg = F.pad(wg, (0, L - len(r)), value=0.0)
                ig = F.pad(ig, (0, L - len(r)), value=-1)
            ws.append(wg)
            is_.append(ig)
        return torch.cat(ws), torch.cat(is_)

    def _select_top_p(self, w, ids, probs):
        # w: slots in selection order (descending score); probs: full scores [T, E]
        q = w / probs.sum(-1, keepdim=True).clamp_min(1e-20)
        before = torch.cumsum(q, -1) - q  # probability mass of the better-ranked slots
        keep = (before < self.top_p) & (ids >= 0)
        return torch.where(keep, w, 0.0), torch.where(keep, ids, -1)

    def _record_routing(self, ids, w, probs, counts, router_logits, p):
        st = self.stats
        if st is None:
            return
        valid = ids >= 0
        flat = ids.clamp(min=0).reshape(-1).long()
        if counts is not None and counts.numel() == self.E:
            st.counts += counts
        else:
            st.counts.index_add_(0, flat, valid.reshape(-1).long())
        if st.level >= 1:
            st.weight_sum.index_add_(0, flat, (w.float() * valid).reshape(-1))
        if st.level >= 2:
            if probs is None or probs.numel() == 0:
                probs = _full_scores(router_logits, p)
            st.prob_sum += probs.sum(0)
            st.tokens += router_logits.shape[0]

    # ------------------------------------------------------------------ experts side

    def run_experts(self, experts, hidden, ids, weights, w_up, w_down, b_up, b_down, activation,
                    gated, shared_out=None, shared_gate=None):
        """Replaces the patched experts' fused_experts call (gain and output statistics)."""
        st = self.stats
        need_out = st is not None and st.level >= 3
        if not need_out and self.easy_ep is None:
            return fused_experts(hidden, ids, weights, w_up, w_down, b_up, b_down,
                                 activation=activation, gated=gated, gain=self.gain,
                                 shared_out=shared_out, shared_gate=shared_gate)
        split_shared = self.easy_ep is not None and shared_out is not None
        r = fused_experts_stats(hidden, ids, weights, w_up, w_down, b_up, b_down,
                                activation=activation, gated=gated, gain=self.gain,
                                shared_out=None if split_shared else shared_out,
                                shared_gate=None if split_shared else shared_gate)
        valid = ids >= 0
        flat = ids.clamp(min=0).reshape(-1).long()
        if need_out:
            st.norm_sum.index_add_(0, flat, (r.slot_norms * valid).reshape(-1))
            better = r.out_absmax > st.out_absmax
            st.out_absmax_channel.copy_(torch.where(better, r.out_absmax_channel,
                                                    st.out_absmax_channel))
            st.out_absmax.copy_(torch.maximum(st.out_absmax, r.out_absmax))
            st.in_absmax.copy_(torch.maximum(st.in_absmax, r.in_absmax))
            st.active_units += r.active_units
        out = r.out
        if self.easy_ep is not None:
            if self.residual is None:
                raise RuntimeError("moeops.interventions: EASY-EP scoring needs the residual "
                                   "stream (use easy_ep_scores)")
            h = self.residual.reshape(-1, hidden.shape[-1]).float()
            routed = out.float()
            c = (1 - F.cosine_similarity(h, h + routed, dim=-1)).clamp_min(0)
            contrib = weights.float() * r.slot_norms * c.unsqueeze(1) * valid
            self.easy_ep.index_add_(0, flat, contrib.reshape(-1))
            if split_shared:
                sg = shared_gate.float().reshape(-1, 1) if shared_gate is not None else 1.0
                out = (routed + sg * shared_out.float()).to(hidden.dtype)
        return out


    def v4_block_forward(self, block, hidden_states: torch.Tensor):
        """transformers 4.x Mixtral / Qwen2-MoE sparse block with this layer's interventions and
        statistics (same arithmetic as hf._v4_block_forward when nothing is on). Gains scale
        the routing weights (gain 0 empties the slot); the ``outputs`` statistics and EASY-EP
        stack the experts' weights for the call (a temporary copy)."""
        from moeops.integrations import hf
        from moeops.ops import fused_experts_list

        batch, seq, hidden_dim = hidden_states.shape  # (router jitter applied by the caller)
        x = hidden_states.view(-1, hidden_dim)
        router_logits = block.gate(x)
        _, w, ids = self.route(block, x, router_logits)
        w = w.to(x.dtype).float()  # HF casts the routing weights to the hidden dtype
        ids = ids.to(torch.int32)
        g, u, d = hf._V4_WEIGHT_NAMES[type(block).__name__]
        shared = gate = None
        if hasattr(block, "shared_expert"):
            shared = block.shared_expert(x)
            gate = torch.sigmoid(block.shared_expert_gate(x))
        act = hf._v4_activation(block.experts[0])
        wg = [getattr(e, g).weight for e in block.experts]
        wu = [getattr(e, u).weight for e in block.experts]
        wd = [getattr(e, d).weight for e in block.experts]
        if (self.stats is not None and self.stats.level >= 3) or self.easy_ep is not None:
            w_up = torch.cat([torch.stack(wg), torch.stack(wu)], dim=1)
            out = self.run_experts(block.experts, x, ids, w, w_up, torch.stack(wd), None, None,
                                   act, True, shared_out=shared, shared_gate=gate)
        else:
            if self.gain is not None:
                gsel = self.gain[ids.clamp(min=0).long()]
                w = w * gsel
                ids = torch.where(gsel == 0, -1, ids)
            out = fused_experts_list(x, ids, w, wg, wu, wd, activation=act, shared_out=shared,
                                     shared_gate=gate)
        return out.reshape(batch, seq, hidden_dim), router_logits


def _full_scores(logits: torch.Tensor, p: dict) -> torch.Tensor:
    x = logits.float()
    return torch.softmax(x, -1) if p["scoring"] == "softmax" else torch.sigmoid(x)


def _states(model, create: bool = True) -> dict[int, _LayerState]:
    states = model.__dict__.get("_moeops_iv_states")
    if states is None:
        if not create:
            return {}
        states = {layer.index: _LayerState(layer) for layer in moe_layers(model)}
        model.__dict__["_moeops_iv_states"] = states
        model.__dict__["_moeops_iv_layers"] = {layer.index: layer for layer in moe_layers(model)}
    return states


def _sync(model) -> None:
    """Attach each layer's state to its router and experts if anything is on, else None."""
    layers = model.__dict__.get("_moeops_iv_layers", {})
    for idx, st in _states(model).items():
        layer = layers[idx]
        value = st if st.active() else None
        for m in (layer.router, layer.experts, layer.block):
            m.__dict__[_ATTR] = value


def _select_layers(model, layers) -> list[int]:
    states = _states(model)
    if layers is None:
        return list(states)
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for i in layers:
        if i not in states:
            raise ValueError(f"moeops.interventions: layer {i} is not an MoE layer; MoE layers: "
                             f"{sorted(states)}")
        out.append(i)
    return out


def layer_indices(model) -> list[int]:
    """Decoder-layer indices of the MoE layers of a patched model."""
    return list(_states(model))


# ----------------------------------------------------------------------------- statistics

def enable_stats(model, level: str = "weights", layers=None) -> None:
    """Switch statistics collection on (``level`` in :data:`STATS_LEVELS`, cumulative) for the
    given MoE layers (default all), with zeroed accumulators."""
    if level not in STATS_LEVELS:
        raise ValueError(f"moeops.interventions: level must be one of {STATS_LEVELS}, got "
                         f"{level!r}")
    states = _states(model)
    for i in _select_layers(model, layers):
        st = states[i]
        st.stats = _Stats(level, st.E, st.device)
    _sync(model)


def disable_stats(model, layers=None) -> None:
    """Switch statistics collection off (zero overhead again); accumulators are discarded."""
    states = _states(model, create=False)
    for i in (states if layers is None else _select_layers(model, layers)):
        states[i].stats = None
    if states:
        _sync(model)


def reset_stats(model, layers=None) -> None:
    """Zero the accumulators (start a new segment, e.g. a new prompt)."""
    states = _states(model, create=False)
    for i in (states if layers is None else _select_layers(model, layers)):
        if states[i].stats is not None:
            states[i].stats.reset()


def read_stats(model, *, stacked: bool = True, clone: bool = True) -> dict:
    """The accumulated statistics as a plain dict.

    ``stacked=True`` (and every layer has the same E): ``{"layers": [i, ...], name: tensor
    [L, E] (tokens: [L]), ...}``; else ``{layer_index: {name: tensor [E]}}``. Names: ``counts``,
    ``weight_sum``, ``prob_sum``, ``tokens``, ``norm_sum``, ``out_absmax``,
    ``out_absmax_channel``, ``in_absmax``, ``active_units`` (those of the level). Tensors stay on
    the model's device (reading them is the only synchronisation).
    """
    states = _states(model, create=False)
    per = {i: st.stats.as_dict() for i, st in states.items() if st.stats is not None}
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


# ----------------------------------------------------------------------------- interventions

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
    states = _states(model)
    for i in _select_layers(model, layers):
        st = states[i]
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
    _sync(model)


def clear_interventions(model, layers=None) -> None:
    """Remove every intervention (statistics stay as they are)."""
    states = _states(model, create=False)
    for i in (states if layers is None else _select_layers(model, layers)):
        states[i].clear_interventions()
    if states:
        _sync(model)


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
    states = _states(model)
    if mode == "gain0":
        gains = {}
        for i, es in by.items():
            g = torch.ones(states[i].E) if i in states else None
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


# ----------------------------------------------------------------------------- workflows

def _as_batch(x):
    if isinstance(x, dict):
        return x
    if isinstance(x, torch.Tensor):
        return {"input_ids": x.unsqueeze(0) if x.dim() == 1 else x}
    return {"input_ids": torch.as_tensor(x).reshape(1, -1)}


def _device_of(model):
    return next(model.parameters()).device


def _forward(model, batch):
    dev = _device_of(model)
    b = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in _as_batch(batch).items()}
    return model(**b, use_cache=False)


class ActivationProfile(NamedTuple):
    """Result of :func:`expert_activation_profile`."""

    layers: list[int]  #: decoder-layer indices of the rows
    frequency: dict[str, torch.Tensor]  #: class -> [L, E] mean per-prompt selection frequency
    distinctiveness: dict[str, torch.Tensor]  #: class -> [L, E] mean(class) - mean(other classes)
    top_experts: dict[str, list[tuple[int, int]]]  #: class -> most distinctive (layer, expert)


@torch.no_grad()
def expert_activation_profile(model, prompts_by_class: dict[str, Sequence], top_n: int = 10
                              ) -> ActivationProfile:
    """MoTE's fTRI (Dahlke et al., 2025, "Mixture of Tunable Experts", arXiv 2502.11096).

    For each prompt (run alone, so no padding token is counted): per layer and expert the
    number of tokens that selected the expert, divided by the prompt's token count (the
    selection frequency map ``A[layer, expert]``); per class the mean map over its prompts;
    distinctiveness of a class = its mean map minus the mean of the other classes' mean maps
    (the class itself when there is only one); ``top_experts`` = the ``top_n`` largest
    distinctiveness entries. Prompts: token-id tensors ``[S]``/``[1, S]``, lists of ids, or
    model-input dicts. The per-token summation over a prompt is the paper's; normalising by
    the token count is our choice (prompts of different lengths weigh the same).
    """
    if not prompts_by_class:
        raise ValueError("moeops.interventions: prompts_by_class is empty")
    freq = {}
    with collect_stats(model, "counts") as read:
        for cls, prompts in prompts_by_class.items():
            if len(prompts) == 0:
                raise ValueError(f"moeops.interventions: class {cls!r} has no prompts")
            maps = []
            for prompt in prompts:
                reset_stats(model)
                b = _as_batch(prompt)
                _forward(model, b)
                s = read(clone=False)
                n_tok = int(b["attention_mask"].sum()) if "attention_mask" in b else \
                    b["input_ids"].numel()
                maps.append(s["counts"].float() / max(n_tok, 1))
            freq[cls] = torch.stack(maps).mean(0)
        layers = read()["layers"]
    dist, top = {}, {}
    for cls, f in freq.items():
        others = [g for c, g in freq.items() if c != cls]
        d = f - torch.stack(others).mean(0) if others else f.clone()
        dist[cls] = d
        _, flat = d.reshape(-1).topk(min(top_n, d.numel()))
        E = d.shape[1]
        top[cls] = [(layers[int(j) // E], int(j) % E) for j in flat]
    return ActivationProfile(layers, freq, dist, top)


class SuperExperts(NamedTuple):
    """Result of :func:`find_super_experts`."""

    experts: list[tuple[int, int]]  #: (layer, expert) pairs
    layers: list[int]
    out_absmax: torch.Tensor  #: [L, E] max |down_proj output| over the calibration data
    out_absmax_channel: torch.Tensor  #: [L, E]
    in_absmax: torch.Tensor  #: [L, E] max |down_proj input|
    threshold: float  #: the percentile threshold used


@torch.no_grad()
def find_super_experts(model, calibration_batches: Iterable, *, include_layers: float = 0.75,
                       percentile: float = 99.5) -> SuperExperts:
    """Super Experts (Su et al., 2025, "Unveiling Super Experts in Mixture-of-Experts LLMs",
    arXiv 2507.23279): per (layer, expert) the maximum ``|down_proj output|`` (unweighted, over
    all tokens routed to it) over the calibration batches; a Super Expert is in the first
    ``round(include_layers * num_layers)`` decoder layers and has ``output_max >
    P_percentile(output_max)`` and ``output_max > floor(max(output_max) / 10)`` (the released
    code's ``max // 10``). The percentile and the maximum are taken over the (layer, expert)
    values of the included layers (our reading). Shared experts are not profiled here.
    """
    with collect_stats(model, "outputs") as read:
        for b in calibration_batches:
            _forward(model, b)
        s = read()
    layers = s["layers"]
    n_layers = int(model.config.num_hidden_layers)
    limit = round(include_layers * n_layers)
    rows = [j for j, i in enumerate(layers) if i < limit]
    out_max = s["out_absmax"]
    vals = out_max[rows].reshape(-1).double() if rows else out_max.new_zeros(0).double()
    experts = []
    thr = float("nan")
    if vals.numel():
        thr = float(torch.quantile(vals, percentile / 100.0))
        floor_max = math.floor(float(vals.max()) / 10)
        for j in rows:
            for e in range(out_max.shape[1]):
                v = float(out_max[j, e])
                if v > thr and v > floor_max:
                    experts.append((layers[j], e))
    return SuperExperts(experts, layers, out_max, s["out_absmax_channel"], s["in_absmax"], thr)


@torch.no_grad()
def easy_ep_scores(model, demos: Iterable) -> dict:
    """EASY-EP (Dong et al., 2025, "Domain-Specific Pruning of Large MoE Models with Few-shot
    Demonstrations", arXiv 2504.06792) expert importance.

    For each demo token ``t``, MoE layer ``l`` and selected slot with expert ``e``:
    ``Score[l, e] += g_{t,e} * ||E_e(x_t)||_2 * max(1 - cos(h_t, h_t + r_t), 0)`` with ``g`` the
    routing weight as the router outputs it (normalised and scaled), ``||E_e(x_t)||`` the L2
    norm of the unweighted expert output (from :func:`moeops.fused_experts_stats`), ``h_t`` the
    residual stream entering the MoE sub-block (the input of ``post_attention_layernorm``) and
    ``r_t`` the weighted sum of the routed experts' outputs (shared experts excluded). Returns
    ``{"layers": [...], "scores": [L, E]}`` (fp32, on the model's device).
    """
    states = _states(model)
    layers = model.__dict__["_moeops_iv_layers"]
    hooks = []
    for i, st in states.items():
        st.easy_ep = torch.zeros(st.E, dtype=torch.float32, device=st.device)
        norm = getattr(layers[i].decoder_layer, "post_attention_layernorm", None)
        if norm is None:
            raise ValueError(f"moeops.interventions: layer {i} has no post_attention_layernorm "
                             "to read the residual stream from")

        def pre_hook(module, args, st=st):
            st.residual = args[0]
        hooks.append(norm.register_forward_pre_hook(pre_hook))
    _sync(model)
    try:
        for d in demos:
            _forward(model, d)
        scores = torch.stack([st.easy_ep.clone() for st in states.values()])
    finally:
        for h in hooks:
            h.remove()
        for st in states.values():
            st.easy_ep = None
            st.residual = None
        _sync(model)
    return {"layers": list(states), "scores": scores}


def _keep_sets(model, scores, n_per_layer: int) -> dict[int, torch.Tensor]:
    states = _states(model)
    if isinstance(scores, dict):
        layers_, sc = scores["layers"], scores["scores"]
    else:
        layers_, sc = list(states), scores
    keep = {}
    for j, i in enumerate(layers_):
        st = states[i]
        s = sc[j].float().cpu()
        E = st.E
        if not 1 <= n_per_layer <= E:
            raise ValueError(f"moeops.interventions: n_per_layer must be in [1, {E}], got "
                             f"{n_per_layer}")
        G = st.params["n_group"]
        if G > 1:  # keep the group structure: n_per_layer / G best experts of every group
            if n_per_layer % G:
                raise ValueError(f"moeops.interventions: layer {i} routes in {G} groups; "
                                 f"n_per_layer must be a multiple of {G}, got {n_per_layer}")
            per, size = n_per_layer // G, E // G
            ids = [g * size + int(x) for g in range(G)
                   for x in torch.sort(-s[g * size:(g + 1) * size], stable=True)[1][:per]]
        else:
            ids = [int(x) for x in torch.sort(-s, stable=True)[1][:n_per_layer]]
        keep[i] = torch.tensor(sorted(ids), dtype=torch.long)
    return keep


@torch.no_grad()
def keep_top_experts(model, n_per_layer: int, scores, mode: str = "remove") -> dict:
    """EASY-EP's expert selection: keep the ``n_per_layer`` best-scored experts of every MoE
    layer (``scores`` from :func:`easy_ep_scores`, or any ``[L, E]`` tensor).

    ``mode="remove"`` physically removes the others: new, smaller expert tensors, router rows
    (and DeepSeek-V3 selection biases), ids renumbered ``0..n-1`` in the original order, the
    config's expert count updated (any count: 60 -> 30 works). ``mode="reroute"`` keeps the
    model and masks the others with reroute semantics applied before scoring, which computes
    the same function. Group-limited routers (DeepSeek-V3) keep ``n_per_layer / n_group`` experts
    per group so the groups survive (our choice; EASY-EP masks inside the groups and lets masked
    experts still count in the group scores). Returns ``{layer: kept original ids}``.
    """
    if mode not in ("remove", "reroute"):
        raise ValueError(f"moeops.interventions: mode must be 'remove' or 'reroute', got {mode!r}")
    keep = _keep_sets(model, scores, n_per_layer)
    states = _states(model)
    if mode == "reroute":
        masks = {}
        for i, k in keep.items():
            m = torch.ones(states[i].E, dtype=torch.bool)
            m[k] = False
            masks[i] = m
        set_intervention(model, list(keep), mask=masks, mask_mode="reroute",
                         mask_stage="pre_score")
        return keep
    layers = model.__dict__["_moeops_iv_layers"]
    for i, k in keep.items():
        layer = layers[i]
        ex, rt = layer.experts, layer.router
        if isinstance(ex, torch.nn.ModuleList):  # transformers 4.x
            layer.block.experts = torch.nn.ModuleList([ex[int(j)] for j in k])
            new_gate = torch.nn.Linear(rt.in_features, len(k), bias=False, device=rt.weight.device,
                                       dtype=rt.weight.dtype)
            new_gate.weight.data.copy_(rt.weight.data[k.to(rt.weight.device)])
            new_gate.weight.requires_grad_(rt.weight.requires_grad)
            layer.block.gate = new_gate
            if hasattr(layer.block, "num_experts"):
                layer.block.num_experts = len(k)
            continue
        kd = k.to(ex.down_proj.device)
        for name in ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias",
                     "down_proj_bias"):
            p = getattr(ex, name, None)
            if isinstance(p, torch.nn.Parameter):
                setattr(ex, name, torch.nn.Parameter(p.data[kd].clone(),
                                                     requires_grad=p.requires_grad))
        ex.num_experts = len(k)
        rt.weight = torch.nn.Parameter(rt.weight.data[k.to(rt.weight.device)].clone(),
                                       requires_grad=rt.weight.requires_grad)
        if hasattr(rt, "e_score_correction_bias"):
            rt.e_score_correction_bias = rt.e_score_correction_bias[
                k.to(rt.e_score_correction_bias.device)].clone()
        rt.num_experts = len(k)
    counts = {len(k) for k in keep.values()}
    if len(counts) == 1:
        n = counts.pop()
        for attr in ("num_local_experts", "num_experts", "n_routed_experts"):
            if hasattr(model.config, attr):
                setattr(model.config, attr, n)
    # the layer states describe the old expert counts: rebuild them (interventions dropped)
    model.__dict__.pop("_moeops_iv_states", None)
    for layer in layers.values():
        for m in (layer.router, layer.experts, layer.block):
            m.__dict__[_ATTR] = None
    model.__dict__.pop("_moeops_iv_layers", None)
    return keep


class SelfContrastOutput(NamedTuple):
    """Result of :func:`self_contrast_logits`."""

    scores: torch.Tensor  #: [B, V] contrast scores, -inf outside the plausibility head
    strong_logits: torch.Tensor  #: [B, V]
    weak_logits: torch.Tensor  #: [B, V]


def contrast_scores(strong_logits: torch.Tensor, weak_logits: torch.Tensor, alpha: float = 0.1,
                    beta: float = 0.5) -> torch.Tensor:
    """SCMoE's decoding score: ``(1 + beta) * z_s - beta * z_w`` where ``z_s >= log(alpha) +
    max z_s``, else ``-inf`` (fp32)."""
    zs, zw = strong_logits.float(), weak_logits.float()
    cutoff = math.log(alpha) + zs.max(-1, keepdim=True).values
    score = (1 + beta) * zs - beta * zw
    return score.masked_fill(zs < cutoff, float("-inf"))


def _contrast_forward(model, input_ids, strong_ranks, weak_ranks, attention_mask=None,
                      past_key_values=None, use_cache=False):
    states = _states(model)
    saved = {i: (st.rank_groups, st.ranks_renormalize) for i, st in states.items()}
    for st in states.values():
        st.rank_groups = (tuple(strong_ranks), tuple(weak_ranks))
    _sync(model)
    try:
        ids2 = torch.cat([input_ids, input_ids])
        kw = dict(use_cache=use_cache)
        if attention_mask is not None:
            kw["attention_mask"] = torch.cat([attention_mask, attention_mask])
        if past_key_values is not None:
            kw["past_key_values"] = past_key_values
        out = model(input_ids=ids2, **kw)
    finally:
        for i, st in states.items():
            st.rank_groups, st.ranks_renormalize = saved[i]
        _sync(model)
    return out


@torch.no_grad()
def self_contrast_logits(model, input_ids: torch.Tensor, strong_ranks=(0, 1), weak_ranks=(2,),
                         alpha: float = 0.1, beta: float = 0.5,
                         attention_mask: torch.Tensor | None = None) -> SelfContrastOutput:
    """SCMoE (Shi et al., 2024, "Unchosen Experts Can Contribute Too", arXiv 2405.14507):
    next-token scores contrasting a strong routing (ranks ``strong_ranks`` of each token's
    sorted experts) with a weak one (``weak_ranks``), each renormalised over its ranks as the
    model's router does (:func:`set_intervention`'s ``ranks``). One batched forward: the batch
    is duplicated, the first half routed strong and the second weak, so every expert's weights
    are read once for both. Returns the last position's scores ``(1 + beta) * z_s - beta * z_w``
    on ``{v : z_s[v] >= log(alpha) + max z_s}`` (-inf elsewhere) and both logits.
    """
    input_ids = input_ids.to(_device_of(model))
    out = _contrast_forward(model, input_ids, strong_ranks, weak_ranks, attention_mask)
    B = input_ids.shape[0]
    last = out.logits[:, -1].float()
    strong, weak = last[:B], last[B:]
    return SelfContrastOutput(contrast_scores(strong, weak, alpha, beta), strong, weak)


@torch.no_grad()
def self_contrast_generate(model, input_ids: torch.Tensor, max_new_tokens: int = 16,
                           strong_ranks=(0, 1), weak_ranks=(2,), alpha: float = 0.1,
                           beta: float = 0.5, eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy SCMoE decoding (arXiv 2405.14507): each step takes the argmax of
    :func:`contrast_scores`. Strong and weak routings run as the two halves of one batched
    forward with one KV cache of batch 2B (the two halves' caches differ, as in the paper's
    two separate caches). ``input_ids [B, S]`` without padding. Returns ``[B, S + n]``.
    """
    input_ids = input_ids.to(_device_of(model))
    B = input_ids.shape[0]
    seq = input_ids
    step_ids = input_ids
    past = None
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        out = _contrast_forward(model, step_ids, strong_ranks, weak_ranks, past_key_values=past,
                                use_cache=True)
        past = out.past_key_values
        last = out.logits[:, -1].float()
        nxt = contrast_scores(last[:B], last[B:], alpha, beta).argmax(-1)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done = done | (nxt == eos_token_id)
        seq = torch.cat([seq, nxt.unsqueeze(1)], 1)
        step_ids = nxt.unsqueeze(1)
        if eos_token_id is not None and bool(done.all()):
            break
    return seq


@torch.no_grad()
def router_probabilities(model, batch) -> dict:
    """UOE / SEUF (Zhuang et al., 2024, "Unlearning One Expert Is Enough for MoE LLMs", arXiv
    2411.18797) expert attribution: per MoE layer the mean full router probability of every
    expert over the batch's tokens (softmax over all E; DeepSeek-V3: its sigmoid scores), and
    the selection frequency. ``batch``: ids tensor, model-input dict, or a list of them.
    Padding tokens are counted when a padded batch is given (pass unpadded batches to avoid).
    Returns ``{"layers", "mean_prob" [L, E], "frequency" [L, E], "top": [(layer, expert)]}``
    with ``top`` the most engaged expert of each layer by mean probability.
    """
    batches = batch if isinstance(batch, (list, tuple)) else [batch]
    with collect_stats(model, "probs") as read:
        for b in batches:
            _forward(model, b)
        s = read()
    tokens = s["tokens"].clamp_min(1).float().unsqueeze(1)
    mean = s["prob_sum"] / tokens
    freq = s["counts"].float() / tokens
    top = [(s["layers"][j], int(mean[j].argmax())) for j in range(mean.shape[0])]
    return {"layers": s["layers"], "mean_prob": mean, "frequency": freq, "top": top}
