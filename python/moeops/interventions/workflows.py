"""The MoE research papers' workflows of :mod:`moeops.interventions`, built on its statistics
and interventions: MoTE activation profiles, Super Experts detection, EASY-EP scores and expert
removal, SCMoE self-contrast decoding, UOE / SEUF router attribution."""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Sequence

import torch

from moeops.interventions import _state
from moeops.interventions.control import set_intervention
from moeops.interventions.stats import collect_stats, reset_stats

__all__ = ["ActivationProfile", "expert_activation_profile", "SuperExperts", "find_super_experts",
           "easy_ep_scores", "keep_top_experts", "SelfContrastOutput", "contrast_scores",
           "self_contrast_logits", "self_contrast_generate", "router_probabilities"]


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
    states = _state.states(model)
    layers = _state.layer_map(model)
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
    _state.sync(model)
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
        _state.sync(model)
    return {"layers": list(states), "scores": scores}


def _keep_sets(model, scores, n_per_layer: int) -> dict[int, torch.Tensor]:
    states = _state.states(model)
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
        G = st.gating["n_group"]
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
    states = _state.states(model)
    if mode == "reroute":
        masks = {}
        for i, k in keep.items():
            m = torch.ones(states[i].E, dtype=torch.bool)
            m[k] = False
            masks[i] = m
        set_intervention(model, list(keep), mask=masks, mask_mode="reroute",
                         mask_stage="pre_score")
        return keep
    layers = _state.layer_map(model)
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
    _state.forget(model)
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
    states = _state.states(model)
    saved = {i: (st.rank_groups, st.ranks_renormalize) for i, st in states.items()}
    for st in states.values():
        st.rank_groups = (tuple(strong_ranks), tuple(weak_ranks))
    _state.sync(model)
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
        _state.sync(model)
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
