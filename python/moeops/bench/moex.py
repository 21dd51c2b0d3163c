"""``moeops bench --suite moex``: MoE-X sparse vs dense down-projection and whole-layer speed
on the MoE-X-S shape (d=768, D=3072, M=8, k=2, fp32) at chosen ReLU densities, CPU.

Weights are GPT-2-initialised (N(0, 0.02)) experts whose encoder biases are set so that a
fraction ``density`` of each expert's units fire for N(0, I) inputs (b_i = Phi^-1(density) *
||w_i||); the realised density is measured and reported. Everything in one run, medians.
"""

from __future__ import annotations

import statistics

import torch

from moeops._timing import flush_cpu_caches, median, time_interleaved
from moeops.moex import MoEXLayer
from moeops.ops import moex_experts

MOEX_S = dict(d=768, D=3072, M=8, k=2)


def _medians_ms(fns: dict, budget: float, cold: bool) -> dict:
    """Median ms of each callable (taking the round number: inputs rotate), timed round-robin
    by :func:`moeops._timing.time_interleaved` (7 to 60 rounds after 2 warm-up rounds) so that
    the machine's load drifts equally over all of them and their ratios stay comparable;
    ``cold`` flushes the CPU caches before every timed call (not timed)."""
    ts = time_interleaved(fns, min_rounds=7, max_rounds=60, budget=budget, warmup=2,
                          before=(lambda name: flush_cpu_caches()) if cold else None)
    return {name: median(v) * 1e3 for name, v in ts.items()}


def make_layer(density: float, d=768, D=3072, M=8, k=2, seed=0) -> MoEXLayer:
    """A MoE-X layer whose experts fire at about ``density`` for N(0, I) inputs."""
    g = torch.Generator().manual_seed(seed)
    layer = MoEXLayer(d, D, M, k).eval()
    with torch.no_grad():
        layer.w_enc.copy_(torch.randn(M, D, d, generator=g) * 0.02)
        layer.w_dec.copy_(torch.randn(M, D, d, generator=g) * 0.02)
        z = float(torch.special.ndtri(torch.tensor(density)))
        layer.b_enc.copy_(z * layer.w_enc.norm(dim=2))
        layer.b_dec.zero_()
    return layer


N_INPUTS = 4


def run_moex_bench(tokens=(1, 4, 16, 64, 256), densities=(0.1, 0.5), budget=2.0, seed=0,
                   cold=True, progress=None) -> dict:
    rows = []
    for dens in densities:
        layer = make_layer(dens, seed=seed, **MOEX_S)
        d, D, M = layer.d_model, layer.d_expert, layer.num_experts
        for T in tokens:
            sets = []  # N_INPUTS different token batches, rotated between timed calls
            for j in range(N_INPUTS):
                x = torch.randn(T, d, generator=torch.Generator().manual_seed(seed + 1000 * j + T))
                with torch.no_grad():
                    r = layer.route(x)
                    _, active = moex_experts(x, r.ids, r.weights, layer.w_enc, layer.b_enc,
                                             layer.w_dec, layer.b_dec, return_active=True)
                    # expert-grouped activation rows for the down-projection alone
                    order = torch.argsort(r.ids.flatten().long(), stable=True)
                    e_sorted = r.ids.flatten().long()[order]
                    tok = order // layer.top_k
                    u = (torch.einsum("rd,rkd->rk", x[tok], layer.w_enc[e_sorted])
                         + layer.b_enc[e_sorted])
                    h = torch.relu(u).contiguous()
                    offsets = torch.zeros(M + 1, dtype=torch.int32)
                    offsets[1:] = torch.cumsum(torch.bincount(e_sorted, minlength=M), 0)
                sets.append(dict(x=x, h=h, offsets=offsets, off=offsets.tolist(),
                                 density=float(active[r.ids >= 0].float().mean()) / D))
            realised = statistics.mean(st["density"] for st in sets)
            wdec = layer.w_dec.detach()
            down = torch.ops.moeops._moex_down
            same = all(torch.allclose(down(st["h"], st["offsets"], wdec, "auto"),
                                      down(st["h"], st["offsets"], wdec, "dense"),
                                      rtol=1e-5, atol=1e-5)
                       for st in sets)

            def down_with(mode):
                return lambda n: down(sets[n % N_INPUTS]["h"], sets[n % N_INPUTS]["offsets"],
                                      wdec, mode)

            def torch_dense(n):
                st = sets[n % N_INPUTS]
                h, off = st["h"], st["off"]
                return [h[off[e]:off[e + 1]] @ wdec[e] for e in range(M) if off[e + 1] > off[e]]

            def layer_with(mode):
                def run(n):
                    layer.down = mode
                    return layer(sets[n % N_INPUTS]["x"])
                return run
            with torch.no_grad():
                t = _medians_ms({"down_auto": down_with("auto"),
                                 "down_sparse": down_with("sparse"),
                                 "down_dense": down_with("dense"),
                                 "down_torch": torch_dense}, budget=budget, cold=cold)
                t.update(_medians_ms({"layer_auto": layer_with("auto"),
                                      "layer_dense": layer_with("dense")},
                                     budget=budget, cold=cold))
            layer.down = "auto"
            row = dict(T=T, density_target=dens, density=realised, down_equal=same, **t,
                       down_speedup=t["down_dense"] / t["down_auto"],
                       layer_speedup=t["layer_dense"] / t["layer_auto"])
            rows.append(row)
            if progress:
                progress(format_row(row))
    return dict(shape=MOEX_S, threads=torch.get_num_threads(), cold=cold, rows=rows,
                ok=all(r["down_equal"] for r in rows))


HEADER = (f"{'T':>5} {'density':>8} {'down auto':>10} {'sparse':>8} {'dense':>8} {'torch':>8} "
          f"{'speedup':>8} {'layer auto':>11} {'dense':>8} {'speedup':>8}")


def format_row(r: dict) -> str:
    return (f"{r['T']:>5} {r['density']:>8.3f} {r['down_auto']:>10.3f} {r['down_sparse']:>8.3f} "
            f"{r['down_dense']:>8.3f} {r['down_torch']:>8.3f} {r['down_speedup']:>7.2f}x "
            f"{r['layer_auto']:>11.3f} {r['layer_dense']:>8.3f} {r['layer_speedup']:>7.2f}x")


def format_moex_bench(res: dict) -> str:
    s = res["shape"]
    lines = [f"MoE-X-S layer d={s['d']} D={s['D']} M={s['M']} k={s['k']} fp32, "
             f"{res['threads']} threads; median ms (down = down-projection alone: moeops auto / "
             f"forced sparse / dense mode (torch GEMM per expert, in the op) / torch matmul per "
             f"expert from Python; layer = route + experts); "
             f"{N_INPUTS} token batches rotated, caches {'flushed' if res['cold'] else 'warm'} "
             f"before every timed call",
             HEADER]
    lines += [format_row(r) for r in res["rows"]]
    lines.append("auto and dense down-projections equal (rtol = atol = 1e-5): " +
                 ("yes" if res["ok"] else "NO"))
    return "\n".join(lines)
