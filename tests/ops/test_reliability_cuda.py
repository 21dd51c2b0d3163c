"""The CUDA side of the reliability suite (docs/reliability.md), run by scripts/gpu_check.sh:

* the property tests of tests/ops/test_properties.py (same strategies, same reference) driving the
  CUDA kernels, with CUDA's tolerances for 16-bit intermediates;
* the documented CUDA behaviour for out-of-range indices (no host synchronisation, so no raise:
  ids outside [-1, E) are empty slots, bad permute slots give zero rows, bad combine entries
  are skipped, grouped GEMM offsets are clamped);
* bad inputs that CUDA rejects on the host (device mismatches, bad k, shapes) raise an
  exception naming the argument, in a subprocess so a crash fails one test;
* determinism (bit-identical repeated runs) and device memory flat over 10,000 layer calls.

Everything here needs a GPU (marked ``cuda``; skipped otherwise).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import test_properties as tp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeops  # noqa: F401
from moeops import reference as ref
from support import CUDA_SKIP_REASON, cuda_ready

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not cuda_ready(), reason=CUDA_SKIP_REASON)]

_ops = torch.ops.moeops
# CUDA's tensor-core path stores the activation in the 16-bit dtype (as Hugging Face does)
CUDA_MM_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4),
               torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
               torch.float16: dict(rtol=4e-3, atol=4e-3)}


def _cu(v):
    return v.cuda() if isinstance(v, torch.Tensor) else v


def _cpu(v):
    return v.cpu() if isinstance(v, torch.Tensor) else v


# ----------------------------------------------------------------------------- properties

@settings(max_examples=tp._examples(0.2))
@given(c=tp.gating_cases())
def test_topk_gating_cuda_matches_reference(c):
    logits, bias, mask, forced = tp._gating_inputs(c)
    args = (c["k"], c["scoring"], c["renormalize"], c["scale"], bias, c["n_group"],
            c["topk_group"], mask, c["mask_mode"], forced, True, True)
    got = [t.cpu() for t in _ops.topk_gating(tp._layout(logits.cuda(), c["layout"]),
                                             *map(_cu, args))]
    want = ref.topk_gating(logits, *args)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6, equal_nan=True)
    tp.check_gating_invariants(logits, c["k"], got, c["scoring"], mask, c["mask_mode"], forced)
    tp._assert_ids_exact(got[1], want[1], "ids")
    tp._assert_ids_exact(got[3], want[3], "counts")
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)


@settings(max_examples=tp._examples(0.2))
@given(T=st.integers(0, 40), K=st.integers(1, 8), E=st.integers(1, 64),
       empty=st.sampled_from([0.0, 0.3, 1.0]), unique=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_route_plan_cuda_matches_reference(T, K, E, empty, unique, seed):
    ids = tp._random_ids(T, K, E, empty, tp._gen(seed), unique)
    got = [t.cpu() for t in _ops.route_plan(ids.cuda(), E)]
    for name, a, b in zip(("offsets", "sorted_slots", "inverse"), got, ref.route_plan(ids, E)):
        tp._assert_ids_exact(a, b, name)
    tp.check_plan_invariants(ids, E, got)


@pytest.mark.parametrize("n,E", [(1024, 64), (1025, 64), (1024, 4095), (1024, 4096), (1, 1),
                                 (7, 300)])
def test_route_plan_cuda_both_paths_match_reference(n, E):
    """Plans of up to 1024 slots over fewer than 4096 experts take the one-block kernel, larger
    ones the radix sort: both give the reference's plan (ties in slot order, empty slots last)."""
    g = tp._gen(n + E)
    ids = torch.randint(-1, E + 2, (n, 1), generator=g, dtype=torch.int32)  # empties, out of range
    ids[: n // 3] = min(3, E - 1)  # a long run of one expert
    got = [t.cpu() for t in _ops.route_plan(ids.cuda(), E)]
    want = ref.route_plan(torch.where((ids >= 0) & (ids < E), ids, -1), E)
    for name, a, b in zip(("offsets", "sorted_slots", "inverse"), got, want):
        tp._assert_ids_exact(a, b, name)


@settings(max_examples=tp._examples(0.2))
@given(c=tp.permute_cases(), wpattern=st.sampled_from(["random", "negative"]))
def test_permute_and_combine_cuda_match_reference(c, wpattern):
    g = tp._gen(c["seed"])
    T, K, H, dt = c["T"], c["K"], c["H"], c["dtype"]
    ids = tp._random_ids(T, K, c["E"], c["empty"], g, unique=False)
    _, sorted_slots, inverse = ref.route_plan(ids, c["E"])
    hidden = tp._randn((T, H), dt, g)
    scale = torch.rand(T * K, generator=g) * 2 - 0.5 if c["scale"] else None
    got = _ops.permute(tp._layout(hidden.cuda(), c["layout"]), sorted_slots.cuda(), K,
                       _cu(scale)).cpu()
    want = ref.permute(hidden, sorted_slots, K, scale)
    torch.testing.assert_close(got, want, **(dict(rtol=0, atol=0) if scale is None
                                             else tp.ROUND_TOL[dt]))
    weights = torch.rand(T, K, generator=g) * (1 if wpattern == "random" else -3)
    rows = tp._randn((T * K, H), dt, g)
    got = _ops.combine(tp._layout(rows.cuda(), c["layout"]), weights.cuda(), inverse.cuda()).cpu()
    torch.testing.assert_close(got, ref.combine(rows, weights, inverse), **tp.ROUND_TOL[dt])


@pytest.mark.parametrize("path", ["auto", "mma", "sm90"])
@settings(max_examples=tp._examples(0.15))
@given(R=st.integers(0, 300), Kd=st.integers(0, 72), N=st.integers(1, 72), E=st.integers(1, 8),
       pad=st.integers(0, 5), xdt=st.sampled_from(tp.DTYPES), wdt=st.sampled_from(tp.DTYPES),
       w_transposed=st.booleans(), layout=st.sampled_from(["contig", "padded", "every_other"]),
       seed=st.integers(0, 2**31 - 1))
def test_grouped_gemm_cuda_matches_reference(path, R, Kd, N, E, pad, xdt, wdt, w_transposed,
                                             layout, seed):
    """Every Hopper kernel choice (sm90 falls back where CUTLASS does not take the problem)."""
    g = tp._gen(seed)
    used = max(0, R - pad)
    cuts = torch.sort(torch.randint(0, used + 1, (E - 1,), generator=g)).values
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), cuts,
                         torch.full((1,), used)]).to(torch.int32)
    x = tp._randn((R, Kd), xdt, g)
    w = tp._randn((E, Kd, N) if w_transposed else (E, N, Kd), wdt, g, 1.0 / math.sqrt(max(Kd, 1)))
    moeops._C.set_cuda_gemm_path(path)
    try:
        got = _ops.grouped_gemm(tp._layout(x.cuda(), layout), w.cuda(), offsets.cuda(),
                                w_transposed).cpu()
    finally:
        moeops._C.set_cuda_gemm_path("auto")
    want = ref.grouped_gemm(x, w, offsets, w_transposed)
    assert got.dtype == xdt and got.shape == (R, N)
    dt = torch.float32 if wdt == xdt == torch.float32 else (xdt if xdt != torch.float32 else wdt)
    torch.testing.assert_close(got.float(), want.float(), **CUDA_MM_TOL[dt])
    assert bool((got[used:] == 0).all()), "rows past offsets[E] must be zero"


@settings(max_examples=tp._examples(0.2))
@given(c=tp.expert_cases())
def test_fused_experts_cuda_matches_reference(c):
    hidden, *rest = tp._expert_inputs(c)
    ids, weights, w_up, w_down, b_up, b_down, gain, so, sg = rest
    args = (ids, weights, w_up, w_down, b_up, b_down, c["activation"], c["gated"], gain, so, sg)
    got = _ops.fused_experts(tp._layout(hidden.cuda(), c["layout"]), *map(_cu, args)).cpu()
    want = ref.fused_experts(hidden, *args)
    assert got.dtype == c["hdt"] and got.shape == hidden.shape
    dt = c["hdt"] if c["hdt"] != torch.float32 else c["wdt"]
    torch.testing.assert_close(got.float(), want.float(), **CUDA_MM_TOL[dt])


@settings(max_examples=tp._examples(0.15))
@given(c=tp.moex_expert_cases())
def test_moex_experts_cuda_matches_reference(c):
    g = tp._gen(c["seed"])
    T, d, D, M, K = c["T"], c["d"], c["D"], c["M"], c["K"]
    hidden = tp._randn((T, d), c["hdt"], g)
    ids = tp._random_ids(T, K, M, c["empty"], g)
    weights = torch.where(ids >= 0, torch.rand(T, K, generator=g), 0.0)
    w_enc = tp._randn((M, D, d), c["wdt"], g, 1 / math.sqrt(d))
    w_dec = tp._randn((M, D, d), c["wdt"], g, 1 / math.sqrt(D))
    b_enc = tp._randn((M, D), c["wdt"], g, 0.5) if c["bias"] else None
    b_dec = tp._randn((M, d), c["wdt"], g, 0.1) if c["bias"] else None
    args = (ids, weights, w_enc, b_enc, w_dec, b_dec)
    want, want_active = ref.moex_experts(hidden, *args, "auto", True)
    dt = c["hdt"] if c["hdt"] != torch.float32 else c["wdt"]
    for down in ("auto", "dense", "sparse"):
        out, active = _ops.moex_experts(tp._layout(hidden.cuda(), c["layout"]), *map(_cu, args),
                                        down, True)
        torch.testing.assert_close(out.cpu().float(), want.float(), **CUDA_MM_TOL[dt])
        # active counts: exact except ReLU units whose pre-activation rounds across 0
        assert bool(((active.cpu() - want_active).abs() <= 1 + 0.01 * want_active).all())


@settings(max_examples=tp._examples(0.15))
@given(c=tp.moex_route_cases())
def test_moex_route_cuda_matches_reference(c):
    g = tp._gen(c["seed"])
    T, d, M, k = c["T"], c["d"], c["M"], c["k"]
    w_enc = torch.randn(M, 8, d, generator=g) * 0.5
    b_enc = torch.randn(M, 8, generator=g) * 0.5
    mu, var, bm = ref.moex_router_stats(w_enc, b_enc)
    got_stats = [t.cpu() for t in _ops.moex_router_stats(w_enc.cuda(), b_enc.cuda())]
    for a, b in zip(got_stats, (mu, var, bm)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    x = torch.randn(T, d, generator=g).to(c["xdt"])
    mask = tp._bool_tensor(c["mask"], T, M, 0.3, g)
    forced = tp._bool_tensor(c["forced"], T, M, 0.2, g)
    args = (mu, var, bm, k, c["select"], mask, c["mask_mode"], forced, True)
    w, ids, dens = (t.cpu() for t in _ops.moex_route(tp._layout(x.cuda(), c["layout"]),
                                                     *map(_cu, args)))
    rw, rids, rdens = ref.moex_route(x, *args)
    torch.testing.assert_close(dens, rdens, rtol=1e-5, atol=1e-6, equal_nan=True)
    if torch.equal(ids, rids):
        torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)
    else:  # only where two experts' scores are within rounding of each other
        s = -rdens if c["select"] == "sparsest" else rdens
        for t in torch.nonzero((ids != rids).any(1)).flatten().tolist():
            a, b = s[t, ids[t].clamp(min=0).long()], s[t, rids[t].clamp(min=0).long()]
            assert bool(((a - b).abs() <= 1e-6).all()), (t, ids[t], rids[t])


# ----------------------------------------------------------------------------- out of range

def test_out_of_range_indices_follow_the_documented_cuda_behaviour():
    """CUDA cannot raise without a host sync: ids outside [-1, E) are empty slots (route_plan,
    fused_experts, moex_experts), a bad permute slot gives a zero row, a bad combine entry is
    skipped, grouped GEMM offsets are clamped to [0, R]."""
    g = tp._gen(5)
    T, K, E, H, I = 6, 2, 4, 16, 8
    ids = torch.tensor([[0, 1], [2, E], [3, -7], [2**31 - 1, 0], [-2**31, 1], [1, 2]],
                       dtype=torch.int32)
    clean = torch.where((ids >= 0) & (ids < E), ids, -1)
    for a, b in zip(_ops.route_plan(ids.cuda(), E), ref.route_plan(clean, E)):
        assert torch.equal(a.cpu(), b)
    hidden = torch.randn(T, H, generator=g)
    weights = torch.rand(T, K, generator=g)
    w_up = torch.randn(E, 2 * I, H, generator=g) * 0.2
    w_down = torch.randn(E, H, I, generator=g) * 0.2
    got = _ops.fused_experts(*(t.cuda() for t in (hidden, ids, weights, w_up, w_down)))
    want = ref.fused_experts(hidden, clean, weights, w_up, w_down)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    w_enc, w_dec = torch.randn(E, 8, H, generator=g), torch.randn(E, 8, H, generator=g)
    got = _ops.moex_experts(hidden.cuda(), ids.cuda(), weights.cuda(), w_enc.cuda(), None,
                            w_dec.cuda(), None, "auto", False)[0]
    want = ref.moex_experts(hidden, clean, weights, w_enc, None, w_dec)[0]
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    slots = torch.tensor([0, 5, T * K, -9, 2**31 - 1, 3], dtype=torch.int32)
    rows = _ops.permute(hidden.cuda(), slots.cuda(), K).cpu()
    want = ref.permute(hidden, torch.where((slots >= 0) & (slots < T * K), slots, -1), K)
    assert torch.equal(rows, want)
    inverse = torch.tensor([0, 1, 2, 99, -5, 5, 6, 7, 8, 9, 10, 2**31 - 1], dtype=torch.int32)
    expert_out = torch.randn(12, H, generator=g)
    got = _ops.combine(expert_out.cuda(), weights.cuda(), inverse.cuda()).cpu()
    want = ref.combine(expert_out, weights,
                       torch.where((inverse >= 0) & (inverse < 12), inverse, -1))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    x = torch.randn(10, H, generator=g)
    w = torch.randn(3, 5, H, generator=g)
    offsets = torch.tensor([-4, 3, 3, 99], dtype=torch.int32)  # below 0 and above R
    got = _ops.grouped_gemm(x.cuda(), w.cuda(), offsets.cuda()).cpu()
    want = ref.grouped_gemm(x, w, torch.tensor([0, 3, 3, 10], dtype=torch.int32))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- bad inputs

CUDA_BATTERY = textwrap.dedent(r'''
import torch, moeops
ops = torch.ops.moeops
T, K, E, H, I = 4, 2, 4, 8, 6
c = lambda t: t.cuda()
g = torch.Generator().manual_seed(0)
hidden = torch.randn(T, H, generator=g)
logits = torch.randn(T, E, generator=g)
ids = torch.tensor([[0, 1], [2, 3], [1, -1], [3, 0]], dtype=torch.int32)
wts = torch.rand(T, K, generator=g)
w_up = torch.randn(E, 2 * I, H, generator=g)
w_down = torch.randn(E, H, I, generator=g)
offsets, ss, inv = ops.route_plan(ids, E)
rows = torch.randn(ss.numel(), H, generator=g)
gw = torch.randn(E, I, H, generator=g)
w_enc = torch.randn(E, 5, H, generator=g)
cases = [
    ("gating_k_gt_E", "k", lambda: ops.topk_gating(c(logits), E + 1)),
    ("gating_mask_cpu", "mask",
     lambda: ops.topk_gating(c(logits), 1, mask=torch.zeros(E, dtype=torch.bool))),
    ("gating_E_too_big", "logits", lambda: ops.topk_gating(c(torch.zeros(2, 513)), 1)),
    ("plan_ids_int64", "ids", lambda: ops.route_plan(c(ids.long()), E)),
    ("permute_slots_cpu", "sorted_slots", lambda: ops.permute(c(hidden), ss, K)),
    ("combine_weights_cpu", "weights", lambda: ops.combine(c(rows), wts, c(inv))),
    ("combine_weights_shape", "weights", lambda: ops.combine(c(rows), c(wts[:, :1]), c(inv))),
    ("gg_w_cpu", "w", lambda: ops.grouped_gemm(c(rows), gw, c(offsets))),
    ("gg_offsets_wrong", "offsets", lambda: ops.grouped_gemm(c(rows), c(gw), c(offsets[:-1]))),
    ("gg_k_mismatch", "w", lambda: ops.grouped_gemm(c(rows), c(gw[:, :, :-1]), c(offsets))),
    ("fe_ids_cpu", "ids", lambda: ops.fused_experts(c(hidden), ids, c(wts), c(w_up), c(w_down))),
    ("fe_w_down_shape", "w_down",
     lambda: ops.fused_experts(c(hidden), c(ids), c(wts), c(w_up), c(w_down[:, :-1]))),
    ("fe_bad_activation", "activation",
     lambda: ops.fused_experts(c(hidden), c(ids), c(wts), c(w_up), c(w_down), activation="tanh")),
    ("mexp_w_dec_cpu", "w_dec",
     lambda: ops.moex_experts(c(hidden), c(ids), c(wts), c(w_enc), None, w_enc, None, "auto",
                              False)),
    ("mstats_w_int", "w_enc", lambda: ops.moex_router_stats(c(w_enc.int()), None)),
]
if torch.cuda.device_count() > 1:
    cases.append(("fe_two_gpus", "w_up",
                  lambda: ops.fused_experts(c(hidden), c(ids), c(wts), w_up.to("cuda:1"),
                                            c(w_down))))
ALLOWED = (ValueError, TypeError, RuntimeError, IndexError)
for name, arg, fn in cases:
    try:
        fn()
        torch.cuda.synchronize()
    except ALLOWED as e:
        ok = arg.lower() in str(e).lower()
        print(("ok " if ok else f"FAIL message does not name {arg!r}: ") + name
              + ("" if ok else " " + str(e).splitlines()[0]), flush=True)
    except BaseException as e:
        print(f"FAIL {name} unexpected {type(e).__name__}: {e}", flush=True)
    else:
        print(f"FAIL {name} accepted the bad input", flush=True)
torch.cuda.synchronize()
print(f"cases {len(cases)}", flush=True)
''')


def test_cuda_bad_inputs_raise_naming_the_argument():
    proc = subprocess.run([sys.executable, "-c", CUDA_BATTERY], capture_output=True, text=True,
                          timeout=180)
    out = proc.stdout.splitlines()
    assert proc.returncode == 0, (proc.returncode, out[-3:], proc.stderr[-3000:])
    fails = [line for line in out if line.startswith("FAIL")]
    assert not fails, "\n".join(fails)
    n = int(out[-1].split()[1])
    assert sum(line.startswith("ok ") for line in out) == n >= 15


# ----------------------------------------------------------------------------- determinism, memory

def _layer(seed=0, T=64, H=256, I=128, E=16, K=4, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = dict(hidden=torch.randn(T, H, generator=g).to(dtype), router=torch.randn(E, H, generator=g),
             w_up=(torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dtype),
             w_down=(torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype))
    x = {n: v.cuda() for n, v in x.items()}

    def step():
        w, ids, _, _ = _ops.topk_gating(x["hidden"].float() @ x["router"].t(), K, "softmax", True)
        return _ops.fused_experts(x["hidden"], ids, w, x["w_up"], x["w_down"])
    return step


@pytest.mark.parametrize("path", ["mma", "sm90"])
def test_cuda_layer_is_bit_identical_across_runs(path):
    moeops._C.set_cuda_gemm_path(path)
    try:
        step = _layer(T=1024)  # prefill-sized: the sm90 path where it is built
        first = step()
        for _ in range(5):
            assert torch.equal(step().view(torch.int16), first.view(torch.int16))
    finally:
        moeops._C.set_cuda_gemm_path("auto")


def test_cuda_memory_flat_over_10k_layer_calls():
    step = _layer(T=8)
    for _ in range(200):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(10_000):
        out = step()
    torch.cuda.synchronize()
    del out
    after = torch.cuda.memory_allocated()
    print(f"CUDA memory allocated {before} -> {after} bytes over 10k calls")
    assert after == before, (before, after)


@pytest.mark.parametrize("path", ["mma", "sm90"])
def test_cuda_degenerate_shapes_match_the_cpu(path):
    """Shapes at the edge of every kernel's preconditions give the CPU's result: no experts at
    all (E = 0, every slot empty, with and without a gain), a zero-width expert MLP (I = 0, only
    the down bias remains) at a prefill size that would pick the CUTLASS path, and a K = 0 view
    whose row stride passes the tensor cores' alignment test."""
    T, K, H, I = 512, 2, 64, 16
    g = tp._gen(7)
    h = tp._randn((T, H), torch.bfloat16, g)
    w = torch.rand(T, K, generator=g)
    shared = tp._randn((T, H), torch.bfloat16, g)
    cases = []
    ids0 = torch.full((T, K), -1, dtype=torch.int32)
    up0, down0 = (torch.zeros(0, 2 * I, H, dtype=torch.bfloat16),
                  torch.zeros(0, H, I, dtype=torch.bfloat16))
    cases.append(((h, ids0, w, up0, down0), dict()))
    cases.append(((h, ids0, w, up0, down0), dict(gain=torch.zeros(0), shared_out=shared)))
    E = 4
    ids = torch.randint(0, E, (T, K), generator=g, dtype=torch.int32)
    upz, downz = (torch.zeros(E, 0, H, dtype=torch.bfloat16),
                  torch.zeros(E, H, 0, dtype=torch.bfloat16))
    cases.append(((h, ids, w, upz, downz), dict(b_down=torch.randn(E, H, generator=g))))
    moeops._C.set_cuda_gemm_path(path)
    try:
        for args, kw in cases:
            want = _ops.fused_experts(*args, **kw)
            got = _ops.fused_experts(*(a.cuda() for a in args),
                                     **{k: v.cuda() for k, v in kw.items()})
            torch.testing.assert_close(got.cpu().float(), want.float(),
                                       **CUDA_MM_TOL[torch.bfloat16])
        # K = 0 with a row stride of 8: zeros, from the SIMT kernel (the tensor-core kernel's
        # cp.async pipeline needs K > 0; its result would be zeros too, so memcheck is the guard)
        x = torch.randn(40, 8, device="cuda").to(torch.bfloat16)[:, :0]
        offsets = torch.tensor([0, 10, 10, 40], dtype=torch.int32, device="cuda")
        out = _ops.grouped_gemm(x, torch.zeros(3, 24, 0, dtype=torch.bfloat16, device="cuda"),
                                offsets, False)
        torch.cuda.synchronize()
        assert out.shape == (40, 24) and bool((out == 0).all())
    finally:
        moeops._C.set_cuda_gemm_path("auto")


def test_moex_experts_cuda_long_prompt_runs_in_chunks():
    """moex_experts on CUDA bounds its fp32 scratch (512 MiB) by running token chunks: a prompt
    of two chunks gives bit for bit what the two halves give alone (each one chunk), and the
    CPU kernel's result to rounding (active counts may differ where a unit's pre-activation is
    within rounding of 0: the CUDA and CPU dot products add in different orders)."""
    T, K, M, D, d = 4100, 4, 4, 8192, 64  # 4 * (8192 + 64) * 4 bytes a token: chunks of 4064
    g = tp._gen(3)
    hidden = torch.randn(T, d, generator=g)
    w_enc = torch.randn(M, D, d, generator=g) * d ** -0.5
    b_enc = torch.randn(M, D, generator=g) * 0.5 - 0.5
    w_dec = torch.randn(M, D, d, generator=g) * D ** -0.5
    ids = torch.stack([torch.randperm(M, generator=g) for _ in range(T)]).int()
    ids[:, -1] = -1  # one empty slot per token
    w = torch.rand(T, K, generator=g)
    experts = (w_enc, b_enc, w_dec, None, "sparse", True)
    dev = [t.cuda() if isinstance(t, torch.Tensor) else t for t in experts]
    got, active = _ops.moex_experts(hidden.cuda(), ids.cuda(), w.cuda(), *dev)
    h = T // 2
    for sl in (slice(0, h), slice(h, T)):
        part, part_active = _ops.moex_experts(hidden[sl].cuda(), ids[sl].cuda(), w[sl].cuda(), *dev)
        assert torch.equal(part, got[sl]) and torch.equal(part_active, active[sl])
    want, want_active = _ops.moex_experts(hidden, ids, w, *experts)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    diff = (active.cpu() - want_active).abs()
    assert int(diff.sum()) <= 1 + 0.01 * float(want_active.sum()), int(diff.sum())


def test_cuda_layer_runs_in_token_chunks_above_the_workspace_limit():
    """A fused_experts call whose device scratch would pass moeops._C.cuda_workspace_limit()
    runs in token chunks (the last one small enough for the decode kernel here): same result as
    one pass to rounding, shared expert and its [T] gate sliced with the tokens."""
    T, K, E, H, I = 50, 2, 8, 64, 32
    g = tp._gen(11)
    h = tp._randn((T, H), torch.bfloat16, g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
    w = torch.rand(T, K, generator=g)
    w_up = tp._randn((E, 2 * I, H), torch.bfloat16, g, H ** -0.5)
    w_down = tp._randn((E, H, I), torch.bfloat16, g, I ** -0.5)
    shared, gate = tp._randn((T, H), torch.bfloat16, g), torch.rand(T, generator=g)
    args = [t.cuda() for t in (h, ids, w, w_up, w_down)]
    kw = dict(shared_out=shared.cuda(), shared_gate=gate.cuda())
    whole = _ops.fused_experts(*args, **kw)
    per_token = K * (H * 2 + 2 * I * 2 + I * 4 + H * 4) + H * 4
    before = moeops._C.set_cuda_workspace_limit(20 * per_token)  # chunks of 20, 20, 10 tokens
    try:
        chunked = _ops.fused_experts(*args, **kw)
    finally:
        moeops._C.set_cuda_workspace_limit(before)
    want = ref.fused_experts(h, ids, w, w_up, w_down, shared_out=shared, shared_gate=gate)
    for got in (whole, chunked):
        torch.testing.assert_close(got.cpu().float(), want.float(), **CUDA_MM_TOL[torch.bfloat16])
    torch.testing.assert_close(chunked.float(), whole.float(), rtol=1e-2, atol=1e-2)
