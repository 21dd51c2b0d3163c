"""Small and boundary cases of every CUDA op, for compute-sanitizer (memcheck / racecheck).

Run: compute-sanitizer --tool memcheck python scripts/gpu_sanitize_cases.py
Each case is also compared with the reference so a sanitizer run doubles as a smoke test.
"""

import sys

import torch

import moeops
from moeops import reference


def gating_cases():
    g = torch.Generator().manual_seed(0)
    for T, E, k, dt in [(0, 8, 2, torch.float32), (1, 3, 3, torch.bfloat16), (5, 512, 512, torch.float16),
                        (33, 60, 4, torch.float32), (17, 256, 8, torch.bfloat16)]:
        x = torch.randn(T, E, generator=g).to(dt)
        mask = torch.rand(T, E, generator=g) < 0.3
        forced = torch.zeros(E, dtype=torch.bool)
        forced[E - 1] = True
        yield dict(logits=x, k=k, return_probs=True, return_counts=True)
        yield dict(logits=x, k=k, mask=mask, mask_mode="drop_renorm", forced=forced, renormalize=True)
        if E % 4 == 0:
            yield dict(logits=x, k=min(k, E // 2), scoring="sigmoid", bias=torch.randn(E, generator=g) * 0.1,
                       n_group=4, topk_group=2, routed_scaling_factor=2.5, renormalize=True)


def hopper_gemm_cases(dev) -> int:
    """The 16-bit grouped GEMM on each Hopper kernel (CUTLASS sm_90a where built and on an
    sm_90 GPU, and mma.sync): tile tails, an empty expert, rows outside the offsets, the fused
    prefill layer (gate|up GEMM + activation pass + down GEMM)."""
    paths = ["mma"]
    if moeops._C.sm90_grouped_gemm and torch.cuda.get_device_capability()[0] == 9:
        paths.insert(0, "sm90")
    failures = 0
    g = torch.Generator().manual_seed(7)
    for path in paths:
        moeops._C.set_cuda_gemm_path(path)
        try:
            for R, K, N, E, dt in [(1, 64, 8, 1, torch.bfloat16), (300, 128, 136, 5, torch.float16),
                                   (520, 64, 264, 3, torch.bfloat16)]:
                x = torch.randn(R + 2, K, generator=g).to(dt)
                offs = torch.linspace(1, R, E + 1).round().int()
                if E > 2:
                    offs[2] = offs[1]
                w = (torch.randn(E, N, K, generator=g) * K ** -0.5).to(dt)
                got = moeops.grouped_gemm(x.to(dev), w.to(dev), offs.to(dev), backend="cpp")
                want = reference.grouped_gemm(x, w, offs)
                failures += not torch.allclose(got.cpu().float(), want.float(), rtol=2e-2, atol=2e-2)
            T, K, E, H, I = 200, 2, 4, 64, 40
            ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
            ids[3, 1] = -1
            w = torch.rand(T, K, generator=g)
            h = torch.randn(T, H, generator=g).to(torch.bfloat16)
            wu = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(torch.bfloat16)
            wd = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(torch.bfloat16)
            got = moeops.fused_experts(*(t.to(dev) for t in (h, ids, w, wu, wd)), backend="cpp")
            want = reference.fused_experts(h, ids, w, wu, wd)
            failures += not torch.allclose(got.cpu().float(), want.float(), rtol=2e-2, atol=2e-2)
        finally:
            moeops._C.set_cuda_gemm_path("auto")
    return failures


def moex_cases(dev) -> int:
    """MoE-X: router statistics, sparsity-aware routing (masks, forced), ReLU experts on each
    down-projection path."""
    failures = 0
    g = torch.Generator().manual_seed(11)
    for T, M, D, d, k in [(0, 4, 8, 16, 2), (1, 3, 5, 7, 1), (37, 8, 64, 48, 2)]:
        w_enc = torch.randn(M, D, d, generator=g) * d ** -0.5
        b_enc = torch.randn(M, D, generator=g) * 0.1
        w_dec = torch.randn(M, D, d, generator=g) * D ** -0.5
        x = torch.randn(T, d, generator=g)
        st = moeops.moex_router_stats(w_enc.to(dev), b_enc.to(dev), backend="cpp")
        want_st = reference.moex_router_stats(w_enc, b_enc)
        failures += not all(torch.allclose(a.cpu(), b, rtol=1e-4, atol=1e-5) for a, b in zip(st, want_st))
        mask = torch.rand(T, M, generator=g) < 0.2
        r = moeops.moex_route(x.to(dev), *(t.to(dev) for t in want_st), k, mask=mask.to(dev),
                              mask_mode="drop_renorm", backend="cpp")
        want_r = reference.moex_route(x, *want_st, k, mask=mask, mask_mode="drop_renorm")
        failures += not torch.equal(r.ids.cpu().long(), want_r[1].long())
        for down in ("sparse", "dense", "auto"):
            out = moeops.moex_experts(x.to(dev), r.ids, r.weights, w_enc.to(dev), b_enc.to(dev), w_dec.to(dev),
                                      down=down, backend="cpp")
            want = reference.moex_experts(x, want_r[1], want_r[0], w_enc, b_enc, w_dec)
            failures += not torch.allclose(out.out.cpu(), want[0], rtol=1e-4, atol=1e-4)
    return failures


def main() -> int:
    dev = "cuda"
    failures = 0
    for case in gating_cases():
        kw = {n: (v.to(dev) if isinstance(v, torch.Tensor) else v) for n, v in case.items()}
        got = moeops.topk_gating(kw.pop("logits"), kw.pop("k"), backend="cpp", **kw)
        want = reference.topk_gating(case.pop("logits"), case.pop("k"), **case)
        failures += not torch.equal(got.ids.cpu(), want[1])
    for T, K, E, H, dt in [(0, 2, 4, 8, torch.float32), (1, 1, 3, 1, torch.bfloat16),
                           (37, 8, 128, 7, torch.float16), (64, 2, 8, 4096, torch.bfloat16),
                           (300, 4, 16, 8, torch.float32)]:  # > 1024 slots: the radix-sort plan
        g = torch.Generator().manual_seed(T)
        ids = torch.randint(-1, E, (T, K), generator=g).int()
        got = moeops.route_plan(ids.to(dev), E, backend="cpp")
        want = reference.route_plan(ids, E)
        failures += not all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
        h = torch.randn(T, H, generator=g).to(dt)
        scale = torch.rand(T * K, generator=g)
        rows = moeops.permute(h.to(dev), got.sorted_slots, K, scale.to(dev), backend="cpp")
        failures += not torch.equal(rows.cpu(), reference.permute(h, want[1], K, scale))
        w = torch.rand(T, K, generator=g)
        out = moeops.combine(rows, w.to(dev), got.inverse, backend="cpp")
        ref = reference.combine(rows.cpu(), w, want[2])
        failures += not torch.allclose(out.cpu().float(), ref.float(), rtol=1e-2, atol=1e-2)
    # grouped_gemm / fused_experts: decode (T <= 16; fewer rows than experts: blocks find the
    # experts with rows), tensor-core and SIMT paths, empty experts,
    # odd sizes (tails of every tile), gated and plain experts, biases, gain 0, a shared expert
    # (gated cases; the plain ones combine straight into the 16-bit hidden dtype, with 8-, 2-
    # and 1-element vectors at H = 64, 66, 65)
    for T, K, E, H, I, dt in [(1, 2, 8, 64, 32, torch.bfloat16), (5, 2, 4, 40, 24, torch.float32),
                              (37, 4, 6, 72, 40, torch.float16), (130, 2, 8, 256, 96, torch.bfloat16),
                              (70, 1, 3, 36, 20, torch.float32),
                              (2, 4, 300, 64, 40, torch.bfloat16),  # decode: expert scan in 2 rounds
                              (3, 2, 5, 66, 24, torch.float16), (4, 1, 5, 65, 20, torch.bfloat16)]:
        g = torch.Generator().manual_seed(T + H)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
        ids[0, 0] = -1
        w = torch.rand(T, K, generator=g)
        h = torch.randn(T, H, generator=g).to(dt)
        for gated in (True, False):
            wu = (torch.randn(E, (2 if gated else 1) * I, H, generator=g) * H ** -0.5).to(dt)
            wd = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dt)
            bu = torch.randn(E, wu.shape[1], generator=g) * 0.1
            gain = torch.rand(E, generator=g)
            gain[E - 1] = 0.0
            so = torch.randn(T, H, generator=g).to(dt)
            kw = dict(b_up=bu, gain=gain, gated=gated, activation="silu" if gated else "gelu",
                      shared_out=so if gated else None)
            got = moeops.fused_experts(*(t.to(dev) for t in (h, ids, w, wu, wd)), backend="cpp",
                                       **{n: (v.to(dev) if isinstance(v, torch.Tensor) else v) for n, v in kw.items()})
            want = reference.fused_experts(h, ids, w, wu, wd, **kw)
            failures += not torch.allclose(got.cpu().float(), want.float(), rtol=2e-2, atol=2e-2)
            st = moeops.fused_experts_stats(*(t.to(dev) for t in (h, ids, w, wu, wd)), backend="cpp",
                                            **{n: (v.to(dev) if isinstance(v, torch.Tensor) else v)
                                               for n, v in kw.items()})
            failures += not torch.equal(st.out, got)
        plan = reference.route_plan(ids, E)
        x = reference.permute(h, plan[1], K)
        for wt in (False, True):
            ww = (torch.randn(E, H, I, generator=g) if wt else torch.randn(E, I, H, generator=g)).to(dt) * 0.1
            got = moeops.grouped_gemm(x.to(dev), ww.to(dev), plan[0].to(dev), w_transposed=wt, backend="cpp")
            want = reference.grouped_gemm(x, ww, plan[0], w_transposed=wt)
            failures += not torch.allclose(got.cpu().float(), want.float(), rtol=2e-2, atol=2e-2)
    failures += hopper_gemm_cases(dev)
    failures += moex_cases(dev)
    torch.cuda.synchronize()
    print(f"sanitizer cases done, mismatches vs reference: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
