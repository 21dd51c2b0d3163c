"""Per-layer state of :mod:`moeops.interventions`: the MoE layers of a patched model
(:class:`MoeLayer`, :func:`moe_layers`), what is switched on for each (:class:`LayerState`, the
object the patched forwards of :mod:`moeops.integrations.hf` call), the statistics accumulators
(:class:`Stats`), attaching the states to the modules (:func:`sync`) and layer selection.

Package-internal API of :mod:`moeops.interventions` (its other submodules, and the benchmarks,
use the names here); users import from :mod:`moeops.interventions`.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F

from moeops.integrations import hf
from moeops.ops import fused_experts, fused_experts_list, fused_experts_stats, topk_gating

STATS_LEVELS = ("counts", "weights", "probs", "outputs")
MASK_MODES = ("reroute", "drop", "drop_renorm")
MASK_STAGES = ("post_score", "pre_score")
#: the attribute of a router / experts / block module the patched forwards look up
ATTR = "_moeops_iv"


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
    if not hf.is_patched(model):
        raise ValueError("moeops.interventions: the model is not patched; call moeops.patch(model) "
                         "first")
    named = dict(model.named_modules())
    layers = []
    if hf.transformers_major() < 5:  # 4.x: the sparse MoE block routes; experts: ModuleList
        block_cls = hf.v4_block_class(model.config.model_type)
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
    router_cls, experts_cls = hf.model_classes(model.config.model_type)
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


# ----------------------------------------------------------------------------- state

class Stats:
    """Per-layer statistics accumulators of ``level`` (one of :data:`STATS_LEVELS`) for ``E``
    experts: device tensors, updated in place."""

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


class LayerState:
    """What is switched on for one MoE layer; the object the patched forwards of
    :mod:`moeops.integrations.hf` call (:meth:`route`, :meth:`run_experts`,
    :meth:`v4_block_forward`) when it is attached to the layer's modules (:func:`sync`).

    ``gating`` / ``cast``: the layer router's :func:`moeops.integrations.hf.gating_params`;
    ``stats``: the layer's :class:`Stats`, or None when statistics are off."""

    def __init__(self, layer: MoeLayer):
        self.index = layer.index
        self.E = layer.num_experts
        self.device = next(layer.experts.parameters()).device
        self.v4 = isinstance(layer.experts, torch.nn.ModuleList)
        # the 4.x block routes itself (and casts the weights to the hidden dtype itself)
        self.gating, self.cast = hf.gating_params(layer.block if self.v4 else layer.router)
        self.top_k = int(layer.block.top_k if self.v4 else layer.router.top_k)
        self.stats: Stats | None = None
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
        p = self.gating
        E = self.E
        st = self.stats
        if self.routing is not None:
            ids, w = self._external(hidden_states, router_logits)
            self.record_routing(ids, w, None, None, router_logits)
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
        self.record_routing(ids, w, probs if need_probs else None, counts, router_logits)
        if self.cast:
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

    def record_routing(self, ids, w, probs, counts, router_logits):
        """Adds one routing of ``router_logits [T, E]`` to the statistics (no-op when they are
        off): ``ids``/``w [T, k]`` the selected slots (-1 empty) and weights, ``probs [T, E]``
        the full scores when the gating returned them (else recomputed when the level needs
        them), ``counts [E]`` the gating's per-expert counts (or None: counted from ``ids``)."""
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
                probs = full_scores(router_logits, self.gating["scoring"])
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
        statistics (same arithmetic as the 4.x block forward :func:`moeops.patch` sets when
        nothing is on). Gains scale the routing weights (gain 0 empties the slot); the
        ``outputs`` statistics and EASY-EP stack the experts' weights for the call (a temporary
        copy)."""
        batch, seq, hidden_dim = hidden_states.shape  # (router jitter applied by the caller)
        x = hidden_states.view(-1, hidden_dim)
        router_logits = block.gate(x)
        _, w, ids = self.route(block, x, router_logits)
        w = w.to(x.dtype).float()  # HF casts the routing weights to the hidden dtype
        ids = ids.to(torch.int32)
        g, u, d = hf.v4_weight_names(block)
        shared = gate = None
        if hasattr(block, "shared_expert"):
            shared = block.shared_expert(x)
            gate = torch.sigmoid(block.shared_expert_gate(x))
        act = hf.v4_activation(block.experts[0])
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


def full_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """The router's full fp32 scores ``[T, E]``: softmax, or sigmoid (``scoring`` of
    :func:`moeops.topk_gating`)."""
    x = logits.float()
    return torch.softmax(x, -1) if scoring == "softmax" else torch.sigmoid(x)


def states(model, create: bool = True) -> dict[int, LayerState]:
    """``{decoder-layer index: LayerState}`` of a patched model's MoE layers, created (all off)
    on first use unless ``create`` is False (then ``{}`` until created)."""
    known = model.__dict__.get("_moeops_iv_states")
    if known is None:
        if not create:
            return {}
        found = moe_layers(model)
        known = {layer.index: LayerState(layer) for layer in found}
        model.__dict__["_moeops_iv_states"] = known
        model.__dict__["_moeops_iv_layers"] = {layer.index: layer for layer in found}
    return known


def layer_map(model) -> dict[int, MoeLayer]:
    """``{decoder-layer index: MoeLayer}`` of the layers :func:`states` were created for."""
    states(model)
    return model.__dict__["_moeops_iv_layers"]


def sync(model) -> None:
    """Attach each layer's state to its router, experts and block if anything is on for it, else
    None (the patched forwards then run exactly as without :mod:`moeops.interventions`)."""
    found = model.__dict__.get("_moeops_iv_layers", {})
    for idx, st in states(model).items():
        layer = found[idx]
        value = st if st.active() else None
        for m in (layer.router, layer.experts, layer.block):
            m.__dict__[ATTR] = value


def forget(model) -> None:
    """Detach and drop every layer state (statistics and interventions with them): the next use
    rebuilds them from the model as it is now (after its experts changed)."""
    found = model.__dict__.pop("_moeops_iv_layers", {})
    model.__dict__.pop("_moeops_iv_states", None)
    for layer in found.values():
        for m in (layer.router, layer.experts, layer.block):
            m.__dict__[ATTR] = None


def select_layers(model, layers) -> list[int]:
    """The MoE layer indices named by ``layers`` (an index, a list, or None = all); ValueError
    for an index that is not an MoE layer."""
    known = states(model)
    if layers is None:
        return list(known)
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for i in layers:
        if i not in known:
            raise ValueError(f"moeops.interventions: layer {i} is not an MoE layer; MoE layers: "
                             f"{sorted(known)}")
        out.append(i)
    return out


def layer_indices(model) -> list[int]:
    """Decoder-layer indices of the MoE layers of a patched model."""
    return list(states(model))
