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


def main() -> int:
    dev = "cuda"
    failures = 0
    for case in gating_cases():
        kw = {n: (v.to(dev) if isinstance(v, torch.Tensor) else v) for n, v in case.items()}
        got = moeops.topk_gating(kw.pop("logits"), kw.pop("k"), backend="cpp", **kw)
        want = reference.topk_gating(case.pop("logits"), case.pop("k"), **case)
        failures += not torch.equal(got.ids.cpu(), want[1])
    for T, K, E, H, dt in [(0, 2, 4, 8, torch.float32), (1, 1, 3, 1, torch.bfloat16),
                           (37, 8, 128, 7, torch.float16), (64, 2, 8, 4096, torch.bfloat16)]:
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
    # grouped_gemm / fused_experts: decode (T <= 16), tensor-core and SIMT paths, empty experts,
    # odd sizes (tails of every tile), gated and plain experts, biases, gain 0, shared expert
    for T, K, E, H, I, dt in [(1, 2, 8, 64, 32, torch.bfloat16), (5, 2, 4, 40, 24, torch.float32),
                              (37, 4, 6, 72, 40, torch.float16), (130, 2, 8, 256, 96, torch.bfloat16),
                              (70, 1, 3, 36, 20, torch.float32)]:
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
            kw = dict(b_up=bu, gain=gain, gated=gated, activation="silu" if gated else "gelu", shared_out=so)
            got = moeops.fused_experts(*(t.to(dev) for t in (h, ids, w, wu, wd)), backend="cpp",
                                       **{n: (v.to(dev) if isinstance(v, torch.Tensor) else v) for n, v in kw.items()})
            want = reference.fused_experts(h, ids, w, wu, wd, **kw)
            failures += not torch.allclose(got.cpu().float(), want.float(), rtol=2e-2, atol=2e-2)
        plan = reference.route_plan(ids, E)
        x = reference.permute(h, plan[1], K)
        for wt in (False, True):
            ww = (torch.randn(E, H, I, generator=g) if wt else torch.randn(E, I, H, generator=g)).to(dt) * 0.1
            got = moeops.grouped_gemm(x.to(dev), ww.to(dev), plan[0].to(dev), w_transposed=wt, backend="cpp")
            want = reference.grouped_gemm(x, ww, plan[0], w_transposed=wt)
            failures += not torch.allclose(got.cpu().float(), want.float(), rtol=2e-2, atol=2e-2)
    torch.cuda.synchronize()
    print(f"sanitizer cases done, mismatches vs reference: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
