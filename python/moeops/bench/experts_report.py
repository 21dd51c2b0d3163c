"""The experts suite's output (:mod:`moeops.bench.experts`): the terminal table of a
:func:`~moeops.bench.experts.run_experts_bench` result and its chart (``moeops bench --plot``)."""

from __future__ import annotations

from moeops.bench.experts import GEMM_PATH_PEERS, PEERS

__all__ = ["format_experts_bench", "plot_experts_bench"]

_SHORT = {"moeops": "moeops", "moeops-mma": "mma", "moeops-sm90": "sm90", "triton": "triton",
          "reference": "ref", "eager": "eager", "grouped_mm": "grouped", "batched_mm": "batched"}


def _ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def format_experts_bench(r: dict) -> str:
    """The terminal table of a :func:`moeops.bench.experts.run_experts_bench` result."""
    m = r["machine"]
    peers = r["settings"]["peers"]
    others = [p for p in peers if p != "moeops"]
    v = r["versions"]
    lines = [
        f"moeops bench --suite experts: {r['device']}, {r['threads']} threads, torch {v['torch']}, "
        f"transformers {v['transformers']}, moeops {v['moeops']}"
        + (f" (fused_experts backend: {r['moeops_backend']})" if "moeops" in peers else ""),
        f"limits measured in this run (higher of the medians of 5 at the start / end): "
        f"bandwidth {m['bandwidth'] / 1e9:.1f} GB/s ({m['measurements'][0]['bandwidth_kind']} "
        f"of 1 GiB: " + " / ".join(f"{x['bandwidth'] / 1e9:.1f}" for x in m["measurements"])
        + f"), GEMM {m['gemm_flops'] / 1e9:.1f} GFLOP/s ({m['measurements'][0]['gemm_kind']}: "
        + " / ".join(f"{x['gemm_flops'] / 1e9:.1f}" for x in m["measurements"]) + ")"
        + (f", bf16 GEMM {m['gemm_flops_bf16'] / 1e9:.1f} GFLOP/s (bf16 mm 2048^3, the limit of "
           f"bf16 cases)" if m.get("gemm_flops_bf16") else ""),
    ]
    cpu = r.get("cpu") or {}
    if r["device"] == "cpu" and cpu:
        lines.append(f"cpu: {cpu.get('name')} (family/model {cpu.get('family_model', '?')}), "
                     f"{cpu.get('cpus')} CPUs, ISA: {' '.join(cpu.get('isa', [])) or '?'}; "
                     f"moeops kernels use: {cpu.get('moeops_isa', '?')}; transparent huge "
                     f"pages: {cpu.get('thp', '?')} (THP_MEM_ALLOC_ENABLE "
                     f"{cpu.get('torch_thp_alloc')})")
    lines += [f"NOTE: {n}" for n in r["notes"]]
    head = (f"{'model':<21}{'dtype':>5}{'T':>6}{'exp':>5}{'limit ms':>11}  "
            + "".join(f"{_SHORT[p]:>13}" for p in peers)
            + "".join(f"{'x' + _SHORT[p]:>9}" for p in others if "moeops" in peers)
            + (f"{'%bw':>6}{'%gemm':>7}" if "moeops" in peers else "") + f"{'oth':>5}  check")
    lines += ["", head, "-" * len(head)]
    for c in r["cases"]:
        name = c["model"] + ("+sh" if c["shared_expert"] else "")
        row = (f"{name:<21}{c['dtype']:>5}{c['tokens']:>6}{c['unique_experts']:>5}"
               f"{_ms(c['limit_s']):>7} {c['bound']:<4}" + "  ")
        res = c["results"]
        for p in peers:
            cell = f"{_ms(res[p]['median_s'])}[{res[p]['runs']}]" if p in res else "-"
            row += f"{cell:>13}"
        if "moeops" in res:
            for p in others:
                row += f"{res[p]['moeops_speedup']:>8.2f}x" if p in res else f"{'-':>9}"
            mo = res["moeops"]
            bw = f"{mo['frac_bw']:.0%}" + ("*" if c["bound"] == "bw" else " ")
            gm = f"{mo['frac_gemm']:.0%}" + ("*" if c["bound"] == "gemm" else " ")
            row += f"{bw:>6}{gm:>7}"
        oth = c.get("other_cpu_load")
        row += f"{'?' if oth is None else format(oth, '.0%'):>5}"
        row += "  " + ("ok" if c["ok"] else "FAIL: " + ", ".join(
            f"{p} {c['rel_err'][p]:.1e}" for p in c["failed"]))
        lines.append(row)
    lines += [
        "",
        "moeops, ref, eager, grouped, batched: median ms [number of timed runs] of moeops."
        "fused_experts, the pure-torch reference, HF eager, HF grouped_mm, HF batched_mm "
        "(after one correctness call and, when cheap, one more warm-up)"
        + ("; GPU time from CUDA events, L2 cache flushed before every call."
           if str(r.get("device", "")).startswith("cuda")
           else "."),
        "xPEER: PEER's time / moeops' time (>1: moeops is faster). exp: distinct experts the "
        "random routing touches.",
    ]
    if any(p in GEMM_PATH_PEERS for p in peers):
        lines.append("mma, sm90: moeops' CUDA layer with its grouped GEMMs forced onto the "
                     "mma.sync / CUTLASS sm_90a kernel (moeops: auto's choice).")
    lines += [
        "limit: the larger of bytes/bandwidth (bw; bytes = weights of the distinct experts) and "
        "FLOPs/GEMM rate (gemm; FLOPs = 2*T*K*3*H*I).",
        "%bw, %gemm: moeops' fraction of each limit (* = the binding one; >100% is possible: "
        "torch.sum's bandwidth is not the hardware ceiling).",
        "oth: share of all CPUs used by other processes during the case (/proc/stat minus "
        "this process).",
        "check: each output vs the reference, once per case (max|out-ref|/max|ref|; tolerance "
        "fp32 1e-4; bf16 2e-2 moeops, 6e-2 HF, which rounds intermediates to bf16).",
    ]
    if any(c["shared_expert"] for c in r["cases"]):
        lines.append("+sh: Qwen1.5-MoE with its shared expert (dense Qwen2MoeMLP + sigmoid gate, "
                     "plain torch, outside fused_experts) in every implementation's time and in "
                     "the limits.")
    fails = [c for c in r["cases"] if not c["ok"]]
    lines.append(f"total wall time {r['wall_s']:.1f} s; correctness: "
                 + ("all ok" if not fails else f"{len(fails)} case(s) FAILED"))
    return "\n".join(lines)


def plot_experts_bench(r: dict, path: str) -> None:
    """Two charts in one PNG: moeops' speedup over each peer, and each implementation's
    fraction of the machine limit, per case."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:
        raise RuntimeError("moeops bench --plot needs matplotlib (pip install matplotlib)") from e
    cases = r["cases"]
    peers = r["settings"]["peers"]
    others = [p for p in peers if p != "moeops"]
    labels = [f"{c['model']}{'+sh' if c['shared_expert'] else ''}\n{c['dtype']} T={c['tokens']}"
              for c in cases]
    n = len(cases)
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.3 * n + 2), 9), constrained_layout=True)
    x = list(range(n))

    colors = {p: f"C{i}" for i, p in enumerate(PEERS)}

    def bars(ax, series, title, ylabel, line):
        width = 0.8 / max(len(series), 1)
        for j, (name, vals) in enumerate(series):
            xs = [i - 0.4 + width * (j + 0.5) for i in x]
            ax.bar(xs, [v if v is not None else float("nan") for v in vals], width, label=name,
                   color=colors[name])
        ax.axhline(line, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="y", alpha=0.3)

    if "moeops" in peers and others:
        sp = [(p, [c["results"][p]["moeops_speedup"] if p in c["results"] else None
                   for c in cases]) for p in others]
        bars(axes[0], sp, "moeops speedup over each implementation (its time / moeops' time)",
             "speedup (x, log scale)", 1.0)
    else:
        axes[0].set_axis_off()
    fr = [(p, [100 * c["results"][p]["frac_limit"] if p in c["results"] else None
               for c in cases]) for p in peers]
    m = r["machine"]
    bars(axes[1], fr, f"% of the machine limit: bytes / {m['bandwidth'] / 1e9:.1f} GB/s or "
         f"FLOPs / {m['gemm_flops'] / 1e9:.0f} GFLOP/s, whichever is larger",
         "% of limit (log scale)", 100.0)
    fig.suptitle(f"moeops bench (experts): {r['device']}, {r['threads']} threads, torch "
                 f"{r['versions']['torch']}, transformers {r['versions']['transformers']}",
                 fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)
