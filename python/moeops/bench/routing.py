"""Routing pipeline benchmark (gating -> plan -> permute -> combine), moeops vs reference
(``moeops bench --suite routing``).

Used by ``moeops bench`` and ``bench/test_routing_benchmark.py`` (:class:`CppOps`). Timings are
medians of repeated runs; the byte count of each stage is compared with the copy bandwidth
measured in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeops import (
    _C,  # noqa: F401  (torch.ops.moeops: the compiled ops)
    reference,
)
from moeops._timing import median, time_calls
from moeops.bench.harness import DTYPES


@dataclass
class Shape:
    tokens: int = 4096
    experts: int = 128
    top_k: int = 8
    hidden: int = 2048
    dtype: str = "bf16"


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write counted), median of ``repeats``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / median(time_calls(lambda: dst.copy_(src), device, runs=repeats, warmup=1,
                                          flush_l2=False))


def make_inputs(shape: Shape, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = DTYPES[shape.dtype]
    logits = torch.randn(shape.tokens, shape.experts, generator=g).to(device=device, dtype=dt)
    hidden = torch.randn(shape.tokens, shape.hidden, generator=g).to(device=device, dtype=dt)
    return logits, hidden


def pipeline(impl, logits, hidden, k):
    """Gating + plan + permute + (identity experts) + combine with ``impl``'s functions."""
    w, ids, _, _ = impl.topk_gating(logits, k, "softmax", True)
    offsets, sorted_slots, inverse = impl.route_plan(ids, logits.shape[1])
    rows = impl.permute(hidden, sorted_slots, k)
    return impl.combine(rows, w, inverse), ids


class CppOps:
    """The compiled ops (``torch.ops.moeops``) under :mod:`moeops.reference`'s names and
    positional signatures."""

    topk_gating = staticmethod(torch.ops.moeops.topk_gating)
    route_plan = staticmethod(torch.ops.moeops.route_plan)
    permute = staticmethod(torch.ops.moeops.permute)
    combine = staticmethod(torch.ops.moeops.combine)


def stage_bytes(shape: Shape) -> dict:
    el = torch.empty(0, dtype=DTYPES[shape.dtype]).element_size()
    T, E, K, H = shape.tokens, shape.experts, shape.top_k, shape.hidden
    gating = T * E * el + T * K * 8
    plan = T * K * 4 * 3 + (E + 1) * 4
    permute = 2 * T * K * H * el
    combine = T * K * H * el + T * H * el + T * K * 8
    return {"gating": gating, "route_plan": plan, "permute": permute, "combine": combine,
            "total": gating + plan + permute + combine}


def run_routing_bench(shape: Shape, device: str = "cpu", repeats: int = 10, warmup: int = 2):
    """Times each stage and the whole pipeline for moeops and reference. Returns a dict."""
    dev = torch.device(device)
    logits, hidden = make_inputs(shape, dev)
    k = shape.top_k
    # correctness once, before timing
    out_m, ids_m = pipeline(CppOps, logits, hidden, k)
    out_r, ids_r = pipeline(reference, logits, hidden, k)
    ids_equal = bool(torch.equal(ids_m, ids_r))
    max_err = (out_m.float() - out_r.float()).abs().max().item() if out_m.numel() else 0.0

    results = {}
    for name, impl in (("moeops", CppOps), ("reference", reference)):
        w, ids, _, _ = impl.topk_gating(logits, k, "softmax", True)
        offsets, sorted_slots, inverse = impl.route_plan(ids, shape.experts)
        rows = impl.permute(hidden, sorted_slots, k)
        stages = {
            "gating": lambda impl=impl: impl.topk_gating(logits, k, "softmax", True),
            "route_plan": lambda impl=impl: impl.route_plan(ids, shape.experts),
            "permute": lambda impl=impl: impl.permute(hidden, sorted_slots, k),
            "combine": lambda impl=impl: impl.combine(rows, w, inverse),
            "total": lambda impl=impl: pipeline(impl, logits, hidden, k),
        }
        res = {}
        for stage, fn in stages.items():
            # CUDA: events around each run, one run at a time (no L2 flush)
            res[stage] = median(time_calls(fn, dev, runs=repeats, warmup=warmup, flush_l2=False))
        results[name] = res
    bw = measure_copy_bandwidth(dev)
    return {"shape": shape, "device": device, "threads": torch.get_num_threads(),
            "ids_equal": ids_equal, "max_abs_err": max_err, "times": results,
            "bytes": stage_bytes(shape), "copy_bandwidth": bw}


def format_routing_bench(r: dict) -> str:
    s = r["shape"]
    lines = [
        f"routing pipeline: T={s.tokens} E={s.experts} K={s.top_k} H={s.hidden} {s.dtype} on "
        f"{r['device']} ({r['threads']} threads); ids equal to reference: {r['ids_equal']}, "
        f"max |out - ref| = {r['max_abs_err']:.3g}",
        f"measured copy bandwidth (read+write): {r['copy_bandwidth'] / 1e9:.1f} GB/s",
        f"{'stage':<11} {'moeops ms':>10} {'reference ms':>13} {'speedup':>8} {'moeops GB/s':>12} "
        f"{'of copy bw':>10}",
    ]
    for stage in ("gating", "route_plan", "permute", "combine", "total"):
        m, ref = r["times"]["moeops"][stage], r["times"]["reference"][stage]
        gbs = r["bytes"][stage] / m / 1e9
        lines.append(f"{stage:<11} {m * 1e3:>10.2f} {ref * 1e3:>13.2f} {ref / m:>7.1f}x "
                     f"{gbs:>12.1f} {gbs * 1e9 / r['copy_bandwidth']:>9.0%}")
    return "\n".join(lines)
