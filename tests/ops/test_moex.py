"""MoE-X: router statistics, sparsity-aware routing, ReLU experts with a sparse
down-projection, wide-code export, the MoEXLayer / upcycling, and the paper's claims as tests
(chosen experts are sparser; the MoE layer is a wide sparse MLP). docs/moex.md."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import moeops
from moeops import reference as ref
from moeops.moex import MoEXLayer, expert_l0, upcycle_gpt2

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

F32 = dict(rtol=1e-5, atol=1e-5)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _offset_experts(M=8, D=256, d=32, seed=0, spread=0.6):
    """Encoders whose column means and biases differ per expert, so experts differ in
    density and the sparsity score has something to rank (seed_papers.md section 1.1)."""
    g = _gen(seed)
    col_mean = torch.randn(M, 1, d, generator=g) * 0.15
    w_enc = torch.randn(M, D, d, generator=g) * 0.2 + col_mean
    beta = torch.linspace(-spread, spread, M)[torch.randperm(M, generator=g)]
    b_enc = torch.randn(M, D, generator=g) * 0.2 + beta.unsqueeze(1)
    w_dec = torch.randn(M, D, d, generator=g) * 0.1
    b_dec = torch.randn(M, d, generator=g) * 0.1
    return w_enc, b_enc, w_dec, b_dec


# ============================================================================ router stats

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_router_stats_match_reference(dtype, with_bias):
    w_enc, b_enc, _, _ = _offset_experts(M=5, D=300, d=70)
    w, b = w_enc.to(dtype), (b_enc.to(dtype) if with_bias else None)
    got = moeops.moex_router_stats(w, b)
    want = ref.moex_router_stats(w.double(), None if b is None else b.double())
    for g_, w_ in zip(got, want):
        assert g_.dtype == torch.float32
        torch.testing.assert_close(g_, w_.float(), rtol=1e-5, atol=1e-6)
    if not with_bias:
        assert torch.equal(got.bias_mean, torch.zeros(5))


def test_router_stats_variance_is_population():
    w = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])  # M=1, D=2, d=2
    mu, var, bm = moeops.moex_router_stats(w, torch.tensor([[1.0, 4.0]]))
    assert mu.tolist() == [[2.0, 4.0]] and var.tolist() == [[1.0, 4.0]] and bm.tolist() == [2.5]


def test_router_stats_gradient():
    w_enc, b_enc, _, _ = _offset_experts(M=3, D=6, d=4)
    w = w_enc.clone().requires_grad_()
    b = b_enc.clone().requires_grad_()
    gm, gv, gb = torch.randn(3, 4, generator=_gen(1)), torch.randn(3, 4, generator=_gen(2)), \
        torch.randn(3, generator=_gen(3))
    mu, var, bm = moeops.moex_router_stats(w, b)
    ((mu * gm).sum() + (var * gv).sum() + (bm * gb).sum()).backward()
    w64 = w_enc.double().requires_grad_()
    b64 = b_enc.double().requires_grad_()
    mu, var, bm = ref.moex_router_stats(w64, b64)
    ((mu * gm).sum() + (var * gv).sum() + (bm * gb).sum()).backward()
    torch.testing.assert_close(w.grad, w64.grad.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, b64.grad.float(), rtol=1e-5, atol=1e-6)
    # finite differences on the fp32 op itself
    torch.autograd.gradcheck(lambda a, c: moeops.moex_router_stats(a, c),
                             (w_enc[:, :4, :3].clone().requires_grad_(),
                              b_enc[:, :4].clone().requires_grad_()),
                             eps=1e-2, atol=2e-3, rtol=1e-2, fast_mode=False)


# ============================================================================ routing

def _stats(w_enc, b_enc):
    return ref.moex_router_stats(w_enc, b_enc)


def _assert_route_equal(got, want, k):
    w, ids, dens = got
    rw, rids, rdens = want
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, rids), (ids, rids)
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dens, rdens, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("M,k", [(1, 1), (4, 2), (8, 2), (8, 8), (60, 4), (512, 3)])
@pytest.mark.parametrize("select", ["sparsest", "densest"])
def test_route_matches_reference(M, k, select, cpu_isa):
    w_enc, b_enc, _, _ = _offset_experts(M=M, D=16, d=24, seed=M)
    mu, var, bm = _stats(w_enc, b_enc)
    x = torch.randn(37, 24, generator=_gen(5))
    got = moeops.moex_route(x, mu, var, bm, k, select=select, return_density=True)
    _assert_route_equal(got, ref.moex_route(x, mu, var, bm, k, select, return_density=True), k)
    assert torch.allclose(got.weights.sum(1), torch.ones(37))


@pytest.mark.parametrize("mask_mode", ["reroute", "drop", "drop_renorm"])
@pytest.mark.parametrize("per_token", [False, True])
def test_route_masks_and_forced_match_reference_and_topk_gating(mask_mode, per_token):
    M, k, T = 8, 3, 40
    w_enc, b_enc, _, _ = _offset_experts(M=M, D=16, d=12, seed=3)
    mu, var, bm = _stats(w_enc, b_enc)
    x = torch.randn(T, 12, generator=_gen(6))
    g = _gen(7)
    shape = (T, M) if per_token else (M,)
    mask = torch.rand(shape, generator=g) < 0.4
    forced = torch.rand(shape, generator=g) < 0.15
    got = moeops.moex_route(x, mu, var, bm, k, mask=mask, mask_mode=mask_mode, forced=forced,
                            return_density=True)
    _assert_route_equal(got, ref.moex_route(x, mu, var, bm, k, "sparsest", mask, mask_mode,
                                            forced, True), k)
    # selection semantics are topk_gating's: same ids for the same selection scores (sigmoid is
    # monotone, so topk_gating on logits = -density ranks exactly like moex_route)
    gating = moeops.topk_gating(-got.density, k, scoring="sigmoid", mask=mask,
                                mask_mode=mask_mode, forced=forced)
    assert torch.equal(gating.ids, got.ids)
    valid = got.ids >= 0
    if mask_mode == "drop_renorm":  # survivors keep the original total (1)
        rows = valid.any(1)
        torch.testing.assert_close(got.weights.sum(1)[rows], torch.ones(int(rows.sum())))
    assert bool((got.weights[~valid] == 0).all())


def test_route_sigma_zero_is_the_limit():
    # x = 0 -> sigma_h = 0 and mu_h = bias_mean: density 1 / 0 / 0.5 for > / < / == 0
    M, d = 3, 4
    mu = torch.randn(M, d, generator=_gen(0))
    var = torch.rand(M, d, generator=_gen(1))
    bm = torch.tensor([0.5, -0.5, 0.0])
    x = torch.zeros(2, d)
    for backend in ("cpp", "reference"):
        w, ids, dens = moeops.moex_route(x, mu, var, bm, 3, return_density=True, backend=backend)
        assert dens.tolist() == [[1.0, 0.0, 0.5]] * 2
        assert ids.tolist() == [[1, 2, 0]] * 2  # sparsest first
    # an expert with all rows equal (var = 0): its pre-activations are exactly mu_h
    var0 = var.clone()
    var0[1] = 0
    x = torch.randn(5, d, generator=_gen(2))
    got = moeops.moex_route(x, mu, var0, bm, 2, return_density=True)
    mu_h = x @ mu[1] + bm[1]
    assert torch.equal(got.density[:, 1], (mu_h > 0).float())
    _assert_route_equal(got, ref.moex_route(x, mu, var0, bm, 2, return_density=True), 2)


def test_route_nan_tokens_get_empty_slots():
    w_enc, b_enc, _, _ = _offset_experts(M=4, D=8, d=6)
    mu, var, bm = _stats(w_enc, b_enc)
    x = torch.randn(3, 6, generator=_gen(0))
    x[1, 2] = float("nan")
    forced = torch.zeros(4, dtype=torch.bool)
    forced[0] = True
    for f in (None, forced):
        w, ids, _ = moeops.moex_route(x, mu, var, bm, 2, forced=f)
        assert ids[1].tolist() == [-1, -1] and w[1].tolist() == [0.0, 0.0]
        assert bool((ids[[0, 2]] >= 0).all())


def test_route_gradients_match_float64_reference():
    w_enc, b_enc, _, _ = _offset_experts(M=6, D=32, d=10, seed=4)
    mu, var, bm = _stats(w_enc, b_enc)
    x = torch.randn(9, 10, generator=_gen(8))
    gw = torch.randn(9, 2, generator=_gen(9))
    gd = torch.randn(9, 6, generator=_gen(10))
    leaves = [t.clone().requires_grad_() for t in (x, mu, var, bm)]
    w, ids, dens = moeops.moex_route(*leaves, 2, return_density=True)
    ((w * gw).sum() + (dens * gd).sum()).backward()
    leaves64 = [t.double().requires_grad_() for t in (x, mu, var, bm)]
    w64, ids64, dens64 = ref.moex_route(*leaves64, 2, return_density=True)
    assert torch.equal(ids, ids64)
    ((w64 * gw).sum() + (dens64 * gd).sum()).backward()
    for a, b in zip(leaves, leaves64):
        assert a.grad is not None and float(a.grad.abs().sum()) > 0
        torch.testing.assert_close(a.grad, b.grad.float(), rtol=1e-4, atol=1e-5)


def test_route_bad_arguments():
    mu, var, bm = torch.zeros(4, 6), torch.ones(4, 6), torch.zeros(4)
    x = torch.randn(3, 6)
    with pytest.raises(ValueError, match="select"):
        moeops.moex_route(x, mu, var, bm, 2, select="random")
    with pytest.raises(ValueError, match="k must be"):
        moeops.moex_route(x, mu, var, bm, 5)
    with pytest.raises(ValueError, match="var"):
        moeops.moex_route(x, mu, var[:, :5], bm, 2)
    with pytest.raises(ValueError, match="mu"):
        moeops.moex_route(x[:, :5], mu, var, bm, 2)
    with pytest.raises(TypeError, match="mu"):
        moeops.moex_route(x, mu.double(), var, bm, 2)
    with pytest.raises(ValueError, match="mask"):
        moeops.moex_route(x, mu, var, bm, 2, mask=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_mode"):
        moeops.moex_route(x, mu, var, bm, 2, mask=torch.zeros(4, dtype=torch.bool), mask_mode="x")


# ============================================================================ experts

def _experts_inputs(T, M=4, D=48, d=40, K=2, density=None, seed=0, empty_every=0):
    w_enc, b_enc, w_dec, b_dec = _offset_experts(M=M, D=D, d=d, seed=seed)
    if density is not None:  # set the encoder bias so that about `density` of units fire
        b_enc = torch.full((M, D), float(torch.special.ndtri(torch.tensor(density)))) * \
            w_enc.norm(dim=2)
    g = _gen(seed + 1)
    x = torch.randn(T, d, generator=g)
    ids = torch.stack([torch.randperm(M, generator=g)[:K] for _ in range(T)]).int() if T else \
        torch.zeros(0, K, dtype=torch.int32)
    if empty_every:
        ids.view(-1)[::empty_every] = -1
    w = torch.rand(T, K, generator=g)
    return x, ids, w, w_enc, b_enc, w_dec, b_dec


@pytest.mark.parametrize("T", [0, 1, 3, 7, 40])
@pytest.mark.parametrize("density", [0.02, 0.1, 0.5, 0.97])
@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16])
def test_experts_match_reference_and_paths_agree(T, density, wdt, cpu_isa):
    x, ids, w, w_enc, b_enc, w_dec, b_dec = _experts_inputs(T, density=density, empty_every=5)
    w_enc, w_dec = w_enc.to(wdt), w_dec.to(wdt)
    want, want_active = ref.moex_experts(x, ids, w, w_enc, b_enc, w_dec, b_dec, return_active=True)
    outs = {}
    for down in ("auto", "dense", "sparse"):
        out, active = moeops.moex_experts(x, ids, w, w_enc, b_enc, w_dec, b_dec, down=down,
                                          return_active=True)
        torch.testing.assert_close(out, want, **F32)
        assert torch.equal(active, want_active)
        outs[down] = out
    if wdt != torch.float32:  # no GEMM fallback: every path is the same FMA chain per output
        assert (torch.equal(outs["auto"], outs["dense"])
                and torch.equal(outs["sparse"], outs["dense"]))
    elif density <= 0.1:  # auto stays on the sparse paths: bit-identical to the forced sparse one
        assert torch.equal(outs["auto"], outs["sparse"])
    if T >= 40:
        frac = want_active[ids >= 0].float().mean() / w_enc.shape[1]
        assert abs(float(frac) - density) < 0.15, frac  # the inputs have the density asked for


@pytest.mark.parametrize("bias", [True, False], ids=["b_enc", "no_b_enc"])
def test_experts_without_features_count_bias_units(device, bias):
    """d = 0: nothing to multiply, but a slot's pre-activation is b_enc[e], so `active` counts
    the units with ReLU(b_enc[e]) != 0 (NaN counts), as the reference does; 0 for empty slots."""
    nan = float("nan")
    b_enc = torch.tensor([[1.0, -1.0, 0.0, 2.0, nan], [-1.0] * 5, [3.0] * 5]) if bias else None
    ids = torch.tensor([[0, 2], [1, -1], [-1, -1], [2, 0]], dtype=torch.int32)
    x, w = torch.zeros(4, 0), torch.rand(4, 2, generator=_gen(0))
    w_enc, w_dec = torch.zeros(3, 5, 0), torch.zeros(3, 5, 0)
    want_out, want_active = ref.moex_experts(x, ids, w, w_enc, b_enc, w_dec, None,
                                             return_active=True)

    def on(t):
        return None if t is None else t.to(device)
    out, active = moeops.moex_experts(*map(on, (x, ids, w, w_enc, b_enc, w_dec)), None,
                                      return_active=True)
    assert out.shape == (4, 0) and out.device.type == device
    assert torch.equal(active.cpu(), want_active)
    assert active.tolist() == ([[3, 5], [0, 0], [0, 0], [5, 3]] if bias else [[0, 0]] * 4)


@pytest.mark.parametrize("density", [0.05, 0.5, 0.97])
def test_down_projection_paths_are_exact(density):
    """The sparse tile paths (rows / union) and the dense tile kernel compute the same FMA chain
    per output, skipping exact zeros: bit-identical (bf16 decoder: no GEMM fallback)."""
    g = _gen(3)
    M, D, d, R = 3, 200, 72, 40
    w_dec = (torch.randn(M, D, d, generator=g) * 0.1).bfloat16()
    h = torch.relu(torch.randn(R, D, generator=g)
                   + float(torch.special.ndtri(torch.tensor(density))))
    offsets = torch.tensor([0, 1, 17, R], dtype=torch.int32)  # 1 row (rows path), 16, 23 rows
    down = torch.ops.moeops._moex_down
    outs = [down(h, offsets, w_dec, mode) for mode in ("auto", "dense", "sparse")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[2], outs[1])
    want = torch.cat([h[a:b] @ w_dec[e].float() for e, (a, b) in
                      enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist()))])
    torch.testing.assert_close(outs[0], want, **F32)
    g32 = [down(h, offsets, w_dec.float(), mode) for mode in ("auto", "dense", "sparse")]
    for o in g32:  # fp32 decoder: the dense fallback is torch's GEMM, equal to rounding
        torch.testing.assert_close(o, want, **F32)


@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hdt", [torch.float32, torch.bfloat16])
def test_experts_dtypes(wdt, hdt):
    x, ids, w, w_enc, b_enc, w_dec, b_dec = _experts_inputs(9, d=37, D=29, empty_every=4)
    args = (x.to(hdt), ids, w, w_enc.to(wdt), b_enc, w_dec.to(wdt), b_dec)
    got = moeops.moex_experts(*args).out
    want = ref.moex_experts(*args)[0]
    assert got.dtype == hdt
    tol = F32 if hdt == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got, moeops.moex_experts(*args, down="sparse").out, **tol)


def test_experts_without_biases_and_unused_experts():
    x, ids, w, w_enc, _, w_dec, _ = _experts_inputs(6, M=5)
    ids[:, :] = torch.tensor([0, 3], dtype=torch.int32)  # experts 1, 2, 4 unused
    got = moeops.moex_experts(x, ids, w, w_enc, None, w_dec)
    torch.testing.assert_close(got.out, ref.moex_experts(x, ids, w, w_enc, None, w_dec)[0], **F32)
    assert got.active.numel() == 0


def test_experts_all_slots_empty_is_zero():
    x, ids, w, w_enc, b_enc, w_dec, b_dec = _experts_inputs(4)
    out, active = moeops.moex_experts(x, torch.full_like(ids, -1), w, w_enc, b_enc, w_dec, b_dec,
                                      return_active=True)
    assert torch.equal(out, torch.zeros_like(x)) and torch.equal(active, torch.zeros_like(ids))


def test_experts_gradients_match_float64_reference():
    x, ids, w, w_enc, b_enc, w_dec, b_dec = _experts_inputs(7, D=20, d=12, empty_every=5)
    go = torch.randn(7, 12, generator=_gen(3))
    leaves = [t.clone().requires_grad_() for t in (x, w, w_enc, b_enc, w_dec, b_dec)]
    xl, wl, el, bel, dl, bdl = leaves
    (moeops.moex_experts(xl, ids, wl, el, bel, dl, bdl).out * go).sum().backward()
    leaves64 = [t.double().requires_grad_() for t in (x, w, w_enc, b_enc, w_dec, b_dec)]
    xl, wl, el, bel, dl, bdl = leaves64
    (ref.moex_experts(xl, ids, wl, el, bel, dl, bdl)[0] * go).sum().backward()
    for a, b in zip(leaves, leaves64):
        assert a.grad is not None
        torch.testing.assert_close(a.grad, b.grad.float(), rtol=1e-4, atol=1e-5)


def test_experts_bad_arguments():
    x, ids, w, w_enc, b_enc, w_dec, b_dec = _experts_inputs(3)
    with pytest.raises(ValueError, match="w_dec"):
        moeops.moex_experts(x, ids, w, w_enc, b_enc, w_dec.transpose(1, 2), b_dec)
    with pytest.raises(ValueError, match="down"):
        moeops.moex_experts(x, ids, w, w_enc, b_enc, w_dec, b_dec, down="fast")
    with pytest.raises(ValueError, match="ids"):
        moeops.moex_experts(x, ids + 10, w, w_enc, b_enc, w_dec, b_dec)
    with pytest.raises(ValueError, match="b_dec"):
        moeops.moex_experts(x, ids, w, w_enc, b_enc, w_dec, b_dec[:, :-1])
    with pytest.raises(ValueError, match="w_enc"):
        moeops.moex_experts(x[:, :-1], ids, w, w_enc, b_enc, w_dec, b_dec)


# ============================================================================ wide code

def test_code_matches_reference_and_wide_code():
    x, ids, w, w_enc, b_enc, _, _ = _experts_inputs(11, M=5, D=30, d=16, empty_every=7)
    ids[2] = torch.tensor([3, 3], dtype=torch.int32)  # duplicate slots: weights add up
    got = moeops.moex_code(x, ids, w, w_enc, b_enc)
    want = ref.moex_code(x, ids, w, w_enc, b_enc)
    for name, a, b in zip(("indptr", "indices", "values", "l0"), got, want):
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, **F32)
        else:
            assert a.dtype == b.dtype and torch.equal(a, b), name
    z = ref.moex_wide_code_dense(x, ids, w, w_enc, b_enc)
    dense = torch.sparse_csr_tensor(got.indptr, got.indices, got.values, z.shape).to_dense()
    torch.testing.assert_close(dense, z, **F32)
    # ||z||_0 = sum of the experts' realised L0 (softmax weights are never 0)
    distinct = ids[[0, 1, 3]]
    act = ref.moex_experts(x, ids, w, w_enc, b_enc, w_enc, None, return_active=True)[1]
    assert torch.equal(got.l0[[0, 1, 3]], act[[0, 1, 3]].sum(1)) or bool((distinct < 0).any())


# ============================================================================ the paper's claims

def test_sparsest_routing_picks_sparser_experts_and_densest_the_opposite():
    """Chosen experts have lower realised L0 than unchosen ones on average (seed_papers.md 1.1d:
    the sparsity score must be negatively correlated with realised L0); 'densest' inverts it."""
    M, D, d, T, k = 8, 512, 48, 400, 2
    w_enc, b_enc, _, _ = _offset_experts(M=M, D=D, d=d, seed=21)
    mu, var, bm = moeops.moex_router_stats(w_enc, b_enc)
    x = torch.randn(T, d, generator=_gen(22))
    l0 = expert_l0(x, w_enc, b_enc).float()  # [T, M] realised, every expert
    res = {}
    for select in ("sparsest", "densest"):
        r = moeops.moex_route(x, mu, var, bm, k, select=select, return_density=True)
        chosen = torch.zeros(T, M, dtype=torch.bool)
        chosen.scatter_(1, r.ids.long(), True)
        res[select] = (float(l0[chosen].mean()), float(l0[~chosen].mean()))
        # the estimator tracks reality: predicted density vs realised fraction, per token
        pred, real = r.density.flatten(), (l0 / D).flatten()
        corr = torch.corrcoef(torch.stack([pred, real]))[0, 1]
        assert corr > 0.95, corr
    (c_s, u_s), (c_d, u_d) = res["sparsest"], res["densest"]
    assert c_s < 0.7 * u_s, res  # chosen experts are clearly sparser
    assert c_d > 1.3 * u_d, res  # and the ablation picks the densest


@pytest.mark.parametrize("mask_mode", ["reroute", "drop"])
def test_moe_path_equals_wide_mlp(mask_mode):
    """y = W_dec_wide z + sum_j omega_j b_dec_j, z the [T, M*D] block- and ReLU-sparse code."""
    M, D, d, T = 8, 96, 40, 33
    w_enc, b_enc, w_dec, b_dec = _offset_experts(M=M, D=D, d=d, seed=5)
    mu, var, bm = moeops.moex_router_stats(w_enc, b_enc)
    x = torch.randn(T, d, generator=_gen(6))
    mask = torch.zeros(M, dtype=torch.bool)
    mask[[1, 6]] = True
    r = moeops.moex_route(x, mu, var, bm, 2, mask=mask, mask_mode=mask_mode)
    if mask_mode == "drop":  # some tokens lose a slot: their weights no longer sum to 1
        assert bool((r.ids < 0).any())
    out = moeops.moex_experts(x, r.ids, r.weights, w_enc, b_enc, w_dec, b_dec).out
    wide = ref.moex_as_wide_mlp(x, r.ids, r.weights, w_enc, b_enc, w_dec, b_dec)
    torch.testing.assert_close(out, wide, **F32)
    assert float((wide - ref.moex_as_wide_mlp(x, r.ids, r.weights, w_enc, b_enc, w_dec,
                                              None)).abs().max()) > 1e-3  # b_dec term matters


# ============================================================================ layer

def _reference_layer_forward(layer, x, stats_grad=True):
    st = ref.moex_router_stats(layer.w_enc, layer.b_enc)
    if not stats_grad:
        st = [t.detach() for t in st]
    w, ids, _ = ref.moex_route(x, *st, layer.top_k, layer.select)
    return ref.moex_experts(x, ids, w, layer.w_enc, layer.b_enc, layer.w_dec, layer.b_dec)[0]


def test_layer_trains_end_to_end_with_router_gradient():
    torch.manual_seed(0)
    layer = MoEXLayer(16, 40, num_experts=4, top_k=2)
    x = torch.randn(2, 7, 16)
    y = layer(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    _reference_layer_forward(layer, x.reshape(-1, 16)).square().sum().backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5)
    # the router statistics carry gradient to w_enc: without them the gradient differs
    layer.zero_grad()
    _reference_layer_forward(layer, x.reshape(-1, 16), stats_grad=False).square().sum().backward()
    assert float((grads["w_enc"] - layer.w_enc.grad).abs().max()) > 1e-6
    assert float((grads["b_enc"] - layer.b_enc.grad).abs().max()) > 1e-6


def test_layer_stats_cache_follows_weight_updates():
    layer = MoEXLayer(8, 16, num_experts=4, top_k=1).eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        a = layer.route(x, return_density=True).density
        assert layer.router_stats() is layer.router_stats()  # cached
        layer.b_enc.add_(1.0)  # in-place update: new version
        b = layer.route(x, return_density=True).density
    assert bool((b > a).all())
    torch.testing.assert_close(b, ref.moex_route(x,
                                                 *ref.moex_router_stats(layer.w_enc, layer.b_enc),
                                                 1, return_density=True)[2])


def test_layer_record_and_code():
    layer = MoEXLayer(12, 24, num_experts=4, top_k=2, record=True).eval()
    x = torch.randn(6, 12)
    with torch.no_grad():
        layer(x)
        code = layer.code(x)
    rec = layer.last
    assert rec.ids.shape == (6, 2) and rec.density.shape == (6, 4)
    assert torch.equal(code.l0, rec.active.sum(1))


@pytest.mark.parametrize("kind", ["sequential", "fc1fc2"])
def test_from_dense_mlp_linear_act_linear(kind):
    torch.manual_seed(1)
    if kind == "sequential":
        mlp = nn.Sequential(nn.Linear(10, 30), nn.ReLU(), nn.Linear(30, 10))
    else:
        mlp = nn.Module()
        mlp.fc1, mlp.fc2 = nn.Linear(10, 30), nn.Linear(30, 10)
    layer = MoEXLayer.from_dense_mlp(mlp, num_experts=4, top_k=2)
    x = torch.randn(9, 10)
    dense = mlp[2](torch.relu(mlp[0](x))) if kind == "sequential" else \
        mlp.fc2(torch.relu(mlp.fc1(x)))
    with torch.no_grad():  # identical copies: weights 1/2 each, the layer is the ReLU MLP
        torch.testing.assert_close(layer(x), dense, **F32)
    noisy = MoEXLayer.from_dense_mlp(mlp, num_experts=4, top_k=2, noise=0.1)
    assert not torch.equal(noisy.w_enc[0], noisy.w_enc[1])
    with pytest.raises(TypeError, match="c_fc"):
        MoEXLayer.from_dense_mlp(nn.ReLU())


def test_upcycle_gpt2_is_a_drop_in_patch():
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16,
                     activation_function="relu", bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    tok = torch.randint(0, 64, (2, 9), generator=_gen(0))
    with torch.no_grad():
        before = model(tok).logits
    layers = upcycle_gpt2(model, num_experts=4, top_k=2)
    assert len(layers) == 2 and all(isinstance(b.mlp, MoEXLayer) for b in model.transformer.h)
    with torch.no_grad():  # ReLU GPT-2, noise 0: the upcycled model computes the same function
        torch.testing.assert_close(model(tok).logits, before, rtol=1e-4, atol=1e-4)
    model.train()
    loss = model(tok, labels=tok).loss
    loss.backward()
    assert all(float(l.w_enc.grad.abs().sum()) > 0 for l in layers)


# ============================================================================ demo

def test_demo_quick_mode_runs():
    proc = subprocess.run([sys.executable, "-m", "moeops", "moex-demo", "--quick"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for needle in ("chosen experts", "unchosen experts", "||z||_0", "sparse down-projection",
                   "loss"):
        assert needle in out, out


def test_layer_compiles_fullgraph():
    torch.manual_seed(0)
    layer = MoEXLayer(16, 32, num_experts=4, top_k=2)
    x = torch.randn(2, 5, 16)
    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    y.sum().backward()
    g = layer.w_enc.grad.clone()
    layer.zero_grad()
    torch.testing.assert_close(y, layer(x), **F32)
    layer(x).sum().backward()
    torch.testing.assert_close(g, layer.w_enc.grad, **F32)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend="aot_eager")(x),
                                   layer(x), **F32)
