"""opcheck samples for every op: (args, kwargs) lists, built for a device.

The registry test fails if an op registered in torch.ops.moeops has no entry here.
"""

import torch


def _ids(T, K, E, device, empty_every=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else \
        torch.empty(0, K, dtype=torch.long)
    ids = ids.int()
    if empty_every:
        ids.view(-1)[::empty_every] = -1
    return ids.to(device)


def gating_samples(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 8, generator=g).to(device)
    xb = torch.randn(5, 16, generator=g).to(device=device, dtype=torch.bfloat16)
    mask = torch.zeros(8, dtype=torch.bool, device=device)
    mask[2] = True
    forced = torch.zeros(6, 8, dtype=torch.bool, device=device)
    forced[:, 5] = True
    bias = (torch.randn(16, generator=g) * 0.1).to(device)
    return [
        ((x, 2), {}),
        ((x, 2), dict(renormalize=True, return_probs=True, return_counts=True)),
        ((x, 3), dict(mask=mask, mask_mode="drop_renorm", forced=forced)),
        ((xb, 4), dict(scoring="sigmoid", bias=bias, n_group=4, topk_group=2,
                       routed_scaling_factor=2.5, renormalize=True)),
        ((x[:0], 2), {}),
        ((x.clone().requires_grad_(), 3), dict(renormalize=True, return_probs=True)),
    ]


def route_plan_samples(device):
    return [
        ((_ids(6, 2, 8, device), 8), {}),
        ((_ids(9, 3, 5, device, empty_every=4), 5), {}),
        ((_ids(0, 2, 4, device), 4), {}),
    ]


def _plan(T, K, E, device, empty_every=0):
    from moeops import reference
    ids = _ids(T, K, E, device, empty_every)
    return reference.route_plan(ids, E)


def permute_samples(device):
    g = torch.Generator().manual_seed(2)
    _, ss, _ = _plan(6, 2, 8, device, empty_every=5)
    h = torch.randn(6, 12, generator=g).to(device)
    hb = h.to(torch.bfloat16)
    scale = torch.rand(12, generator=g).to(device)
    return [
        ((h, ss, 2), {}),
        ((hb, ss, 2), {}),
        ((h, ss, 2), dict(slot_scale=scale)),
        ((h.clone().requires_grad_(), ss, 2), dict(slot_scale=scale.clone().requires_grad_())),
    ]


def combine_samples(device):
    g = torch.Generator().manual_seed(3)
    _, _, inv = _plan(6, 2, 8, device, empty_every=5)
    x = torch.randn(12, 10, generator=g).to(device)
    w = torch.rand(6, 2, generator=g).to(device)
    return [
        ((x, w, inv), {}),
        ((x.half(), w, inv), {}),
        ((x.clone().requires_grad_(), w.clone().requires_grad_(), inv), {}),
    ]


def grouped_gemm_samples(device):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 12, generator=g).to(device)
    w = (torch.randn(3, 10, 12, generator=g) * 0.3).to(device)  # [E, N, K]
    wt = w.transpose(1, 2).contiguous()  # [E, K, N]
    # expert 1 has no rows, row 6 is past offsets[E] (padding)
    off = torch.tensor([0, 2, 2, 6], dtype=torch.int32, device=device)
    return [
        ((x, w, off), {}),
        ((x, wt, off), dict(w_transposed=True)),
        ((x.bfloat16(), w.bfloat16(), off), {}),
        ((x, w.bfloat16(), off), dict(w_transposed=False)),
        ((x[:0], w, torch.zeros(4, dtype=torch.int32, device=device)), {}),
        ((x.clone().requires_grad_(), w.clone().requires_grad_(), off), {}),
        ((x.clone().requires_grad_(), wt.clone().requires_grad_(), off), dict(w_transposed=True)),
    ]


def fused_experts_samples(device):
    g = torch.Generator().manual_seed(5)
    T, H, I, E, K = 6, 12, 8, 4, 2
    h = torch.randn(T, H, generator=g).to(device)
    # expert 2 gets no token; slot (1, 1) and (4, 0) are empty
    ids = torch.tensor([[0, 1], [3, -1], [1, 3], [0, 3], [-1, 1], [3, 0]], dtype=torch.int32,
                       device=device)
    w = torch.rand(T, K, generator=g).to(device)
    w_up = (torch.randn(E, 2 * I, H, generator=g) * 0.3).to(device)
    w_up1 = (torch.randn(E, I, H, generator=g) * 0.3).to(device)
    w_down = (torch.randn(E, H, I, generator=g) * 0.3).to(device)
    b_up = (torch.randn(E, 2 * I, generator=g) * 0.1).to(device)
    b_up1 = (torch.randn(E, I, generator=g) * 0.1).to(device)
    b_down = (torch.randn(E, H, generator=g) * 0.1).to(device)
    gain = torch.tensor([1.0, 0.0, 0.5, 2.0], device=device)
    bf = torch.bfloat16
    return [
        ((h, ids, w, w_up, w_down), {}),
        ((h, ids, w, w_up, w_down, b_up, b_down), dict(activation="gelu_tanh", gain=gain)),
        ((h.to(bf), ids, w, w_up1.to(bf), w_down.to(bf), b_up1, b_down),
         dict(activation="relu2", gated=False)),
        ((h, ids, w, w_up1.to(bf), w_down.to(bf)), dict(activation="gelu", gated=False)),
        ((h[:0], ids[:0], w[:0], w_up, w_down), {}),
        ((h.clone().requires_grad_(), ids, w.clone().requires_grad_(),
          w_up.clone().requires_grad_(), w_down.clone().requires_grad_(),
          b_up.clone().requires_grad_(), b_down.clone().requires_grad_()), dict(activation="silu")),
    ]


SAMPLES = {
    "topk_gating": gating_samples,
    "route_plan": route_plan_samples,
    "permute": permute_samples,
    "combine": combine_samples,
    "grouped_gemm": grouped_gemm_samples,
    "fused_experts": fused_experts_samples,
}


def fused_experts_list_samples(device):
    g = torch.Generator().manual_seed(7)
    T, H, I, E, K = 6, 16, 8, 3, 2
    h = torch.randn(T, H, generator=g).to(device)
    ids = _ids(T, K, E, device, empty_every=5)
    w = torch.rand(T, K, generator=g).to(device)
    wg = [(torch.randn(I, H, generator=g) * 0.2).to(device) for _ in range(E)]
    wu = [(torch.randn(I, H, generator=g) * 0.2).to(device) for _ in range(E)]
    wd = [(torch.randn(H, I, generator=g) * 0.2).to(device) for _ in range(E)]
    return [
        ((h, ids, w, wg, wu, wd), {}),
        ((h.bfloat16(), ids, w, [t.bfloat16() for t in wg], [t.bfloat16() for t in wu],
          [t.bfloat16() for t in wd]), dict(activation="gelu")),
        ((h.clone().requires_grad_(), ids, w.clone().requires_grad_(),
          [t.clone().requires_grad_() for t in wg], wu,
          [t.clone().requires_grad_() for t in wd]), {}),
    ]


SAMPLES["fused_experts_list"] = fused_experts_list_samples


def _fused_experts_shared_samples(device):
    g = torch.Generator().manual_seed(9)
    T, H, I, E, K = 5, 16, 8, 3, 2
    h = torch.randn(T, H, generator=g).to(device)
    ids = _ids(T, K, E, device, empty_every=4)
    w = torch.rand(T, K, generator=g).to(device)
    wu = (torch.randn(E, 2 * I, H, generator=g) * 0.2).to(device)
    wd = (torch.randn(E, H, I, generator=g) * 0.2).to(device)
    so = torch.randn(T, H, generator=g).to(device)
    sg = torch.rand(T, 1, generator=g).to(device)
    return [((h, ids, w, wu, wd), dict(shared_out=so, shared_gate=sg)),
            ((h.clone().requires_grad_(), ids, w, wu, wd),
             dict(shared_out=so.clone().requires_grad_(), shared_gate=sg.clone().requires_grad_()))]


_fused_plain = SAMPLES["fused_experts"]
SAMPLES["fused_experts"] = lambda device: (_fused_plain(device)
                                           + _fused_experts_shared_samples(device))


def _fused_experts_stats_samples(device):
    # the fused_experts samples without gradients (the stats op is not differentiable), plus a
    # ReLU plain-expert case (active units) and a shared expert
    out = [s for s in _fused_plain(device)
           if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in s[0])]
    out += [s for s in _fused_experts_shared_samples(device)
            if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in s[0])]
    g = torch.Generator().manual_seed(7)
    h = torch.randn(5, 12, generator=g).to(device)
    ids = torch.tensor([[0, 2], [2, 1], [-1, 0], [1, 2], [0, -1]], dtype=torch.int32, device=device)
    w = torch.rand(5, 2, generator=g).to(device)
    out.append(((h, ids, w, (torch.randn(3, 8, 12, generator=g) * 0.3).to(device),
                 (torch.randn(3, 12, 8, generator=g) * 0.3).to(device)),
                dict(activation="relu", gated=False)))
    return out


SAMPLES["fused_experts_stats"] = _fused_experts_stats_samples
# ----------------------------------------------------------------------------- MoE-X

def _moex_weights(device, M=4, D=12, d=8, seed=11):
    g = torch.Generator().manual_seed(seed)
    w_enc = (torch.randn(M, D, d, generator=g) * 0.4 + torch.randn(M, 1, d, generator=g) * 0.2)
    b_enc = torch.randn(M, D, generator=g) * 0.3
    w_dec = torch.randn(M, D, d, generator=g) * 0.3
    b_dec = torch.randn(M, d, generator=g) * 0.1
    return [t.to(device) for t in (w_enc, b_enc, w_dec, b_dec)]


def moex_router_stats_samples(device):
    w_enc, b_enc, _, _ = _moex_weights(device)
    return [
        ((w_enc,), {}),
        ((w_enc, b_enc), {}),
        ((w_enc.bfloat16(), b_enc.bfloat16()), {}),
        ((w_enc.clone().requires_grad_(), b_enc.clone().requires_grad_()), {}),
    ]


def moex_route_samples(device):
    from moeops import reference
    w_enc, b_enc, _, _ = _moex_weights(device)
    mu, var, bm = reference.moex_router_stats(w_enc, b_enc)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(6, 8, generator=g).to(device)
    mask = torch.zeros(4, dtype=torch.bool, device=device)
    mask[1] = True
    forced = torch.zeros(6, 4, dtype=torch.bool, device=device)
    forced[:, 3] = True
    return [
        ((x, mu, var, bm, 2), {}),
        ((x, mu, var, bm, 2), dict(select="densest", return_density=True)),
        ((x.bfloat16(), mu, var, bm, 3), dict(mask=mask, mask_mode="drop_renorm", forced=forced)),
        ((x, mu, var, bm, 2), dict(mask=mask)),
        ((x[:0], mu, var, bm, 2), {}),
        ((x.clone().requires_grad_(), mu.clone().requires_grad_(), var.clone().requires_grad_(),
          bm.clone().requires_grad_(), 2), dict(return_density=True)),
    ]


def moex_experts_samples(device):
    w_enc, b_enc, w_dec, b_dec = _moex_weights(device)
    g = torch.Generator().manual_seed(13)
    h = torch.randn(6, 8, generator=g).to(device)
    ids = torch.tensor([[0, 1], [3, -1], [1, 3], [0, 3], [-1, 1], [3, 0]], dtype=torch.int32,
                       device=device)
    w = torch.rand(6, 2, generator=g).to(device)
    bf = torch.bfloat16
    return [
        ((h, ids, w, w_enc, b_enc, w_dec, b_dec), {}),
        ((h, ids, w, w_enc, None, w_dec), dict(down="dense", return_active=True)),
        ((h.to(bf), ids, w, w_enc.to(bf), b_enc, w_dec.to(bf), b_dec), dict(down="sparse")),
        ((h[:0], ids[:0], w[:0], w_enc, b_enc, w_dec, b_dec), dict(return_active=True)),
        ((h.clone().requires_grad_(), ids, w.clone().requires_grad_(),
          w_enc.clone().requires_grad_(), b_enc.clone().requires_grad_(),
          w_dec.clone().requires_grad_(), b_dec.clone().requires_grad_()), {}),
    ]


def moex_code_samples(device):
    w_enc, b_enc, _, _ = _moex_weights(device)
    g = torch.Generator().manual_seed(14)
    h = torch.randn(5, 8, generator=g).to(device)
    ids = torch.tensor([[0, 1], [3, -1], [2, 2], [0, 3], [-1, -1]], dtype=torch.int32,
                       device=device)
    w = torch.rand(5, 2, generator=g).to(device)
    return [
        ((h, ids, w, w_enc, b_enc), {}),
        ((h.bfloat16(), ids, w, w_enc, None), {}),
    ]


SAMPLES["moex_router_stats"] = moex_router_stats_samples
SAMPLES["moex_route"] = moex_route_samples
SAMPLES["moex_experts"] = moex_experts_samples
SAMPLES["moex_code"] = moex_code_samples
