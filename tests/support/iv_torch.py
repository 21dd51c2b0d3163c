"""Pure-torch routing with interventions, written independently of moeops (per-token Python
loops), the oracle of tests/integrations/test_interventions.py and
tests/integrations/test_interventions_v4.py."""

import torch

NEG_INF = float("-inf")


def torch_gate(logits, p, k, *, renorm, scale, mask=None, mode="reroute", stage="post_score",
               forced=None):
    """Per-token Python routing: returns (weights [T, k] f32, ids [T, k] int64, scores)."""
    T, E = logits.shape
    x = logits.float()
    M = mask.expand(T, E) if mask is not None else torch.zeros(T, E, dtype=torch.bool)
    Fo = forced.expand(T, E) if forced is not None else torch.zeros(T, E, dtype=torch.bool)
    if stage == "pre_score":
        x = x.masked_fill(M, NEG_INF)
    s = torch.sigmoid(x) if p["sigmoid"] else torch.softmax(x, -1)
    key = s + p["bias"] if p["bias"] is not None else s
    W = torch.zeros(T, k)
    ids = torch.full((T, k), -1, dtype=torch.long)
    for t in range(T):
        kt = key[t].tolist()
        avail = [e for e in range(E) if not (mode == "reroute" and M[t, e])]
        if p["G"] > 1:
            size = E // p["G"]
            gs = []
            for g in range(p["G"]):
                vals = sorted((kt[e] for e in avail if e // size == g), reverse=True)
                gs.append(vals[0] + vals[1] if len(vals) >= 2 else NEG_INF)
            kept = sorted(range(p["G"]), key=lambda g: (-gs[g], g))[:p["TG"]]
            avail = [e for e in avail if e // size in kept]
        pool = set(avail) | {e for e in range(E) if Fo[t, e]}
        chosen = sorted(pool, key=lambda e: (not bool(Fo[t, e]), -kt[e], e))[:k]
        for j, e in enumerate(chosen):
            ids[t, j] = e
            W[t, j] = s[t, e]
    if renorm:
        W = W / (W.sum(-1, keepdim=True) + 1e-20)
    W = W * scale
    if mode in ("drop", "drop_renorm") and mask is not None:
        for t in range(T):
            before = float(W[t].sum())
            for j in range(k):
                e = int(ids[t, j])
                if e >= 0 and M[t, e] and not Fo[t, e]:
                    ids[t, j], W[t, j] = -1, 0.0
            after = float(W[t].sum())
            if mode == "drop_renorm" and after > 0:
                W[t] = W[t] / after * before
    return W, ids, s


def torch_route(logits, p, spec):
    """The interventions of ``spec`` (set_intervention's keywords) in pure torch."""
    T, E = logits.shape
    if "routing" in spec:
        ids, w = spec["routing"]
        w = torch.ones(ids.shape) if w is None else w.float()
        return w, ids.long()
    mask = spec.get("mask")
    if mask is not None and not isinstance(mask, torch.Tensor):
        m = torch.zeros(E, dtype=torch.bool)
        m[list(mask)] = True
        mask = m
    forced = spec.get("forced")
    if forced is not None and not isinstance(forced, torch.Tensor):
        f = torch.zeros(E, dtype=torch.bool)
        f[list(forced)] = True
        forced = f
    if "forced_ids" in spec:
        fid = spec["forced_ids"]
        f = torch.zeros(T, E, dtype=torch.bool)
        for t in range(T):
            if fid[t] >= 0:
                f[t, fid[t]] = True
        forced = f
    kw = dict(mask=mask, mode=spec.get("mask_mode", "reroute"),
              stage=spec.get("mask_stage", "post_score"), forced=forced)
    ranks, top_p = spec.get("ranks"), spec.get("top_p")
    if ranks is None and top_p is None:
        return torch_gate(logits, p, p["k"], renorm=p["renorm"], scale=p["scale"], **kw)[:2]
    if ranks is not None:
        w, ids, _ = torch_gate(logits, p, max(ranks) + 1, renorm=False, scale=1.0, **kw)
        w, ids = w[:, list(ranks)], ids[:, list(ranks)]
    else:
        w, ids, s = torch_gate(logits, p, E, renorm=False, scale=1.0, **kw)
        total = s.sum(-1)
        for t in range(T):
            mass = 0.0
            for j in range(E):
                if mass >= top_p or ids[t, j] < 0:
                    ids[t, j], w[t, j] = -1, 0.0
                else:
                    mass += float(w[t, j]) / float(total[t])
    if p["renorm"]:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * p["scale"], ids
