"""``moeops bench --suite gemm``: the grouped expert GEMM on its own, side by side with the
CUTLASS grouped GEMM PyTorch ships (``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``)
and a dense matmul of the same size, on real MoE layer shapes. This is where the GPU issue's
prefill target is measured: grouped GEMM throughput >= 1.0x ``torch._grouped_mm`` and >= 60% of
the measured dense bf16 matmul rate.

One case = (model, T, projection). The ``T x K`` routed rows of T tokens are spread over the E
experts as uniform random top-K routing would (fixed seed) and sorted by expert, so the expert
sizes are realistic, not equal. Projections: ``up`` (rows ``[R, H]`` times ``w_up [E, 2I, H]^T``)
and ``down`` (rows ``[R, I]`` times ``w_down [E, H, I]^T``), R = T x K.

Implementations (``--peers``):

* ``moeops``: ``moeops.ops.grouped_gemm(backend="cpp")``, the kernel choice ``auto``;
* ``moeops-sm90`` / ``moeops-mma``: the same forced onto the CUTLASS sm_90a kernel / the mma.sync
  kernel (CUDA builds; sm90 needs a Hopper GPU and a build with the CUTLASS kernels);
* ``triton``: ``moeops.ops.grouped_gemm(backend="triton")`` (CUDA), each shape class's default
  config;
* ``triton-tuned``: the same with the Triton autotuner on (``moeops._triton.set_autotune``):
  the correctness call tunes the shape, timing uses the choice. Not in the default peers (tuning
  compiles and times every candidate once); ask for it with ``--peers``;
* ``torch``: ``torch.nn.functional.grouped_mm`` (``torch._grouped_mm`` on older torch) with
  ``offs`` = the experts' cumulative row ends;
* ``dense``: one ``torch.mm`` of ``[R, Kd] x [Kd, N]``: the same FLOPs with no grouping.

Every implementation is checked once against a per-expert fp32 matmul before it is timed. Times
are medians of CUDA-event (GPU) or wall-clock (CPU) runs after a warm-up; the FLOP rate is
``2 R N Kd / median`` and is reported against the dense rate measured in the same run
(:func:`moeops.bench.harness.measure_machine`: bf16 ``torch.mm`` 8192^3 on a GPU). Shapes come
from :data:`moeops.models.LAYERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from moeops import _C, _triton
from moeops import models as model_table
from moeops._timing import Stopwatch, median, time_calls
from moeops._version import __version__
from moeops.bench.harness import DTYPES, deadline_note, gemm_path, measure_machine, rel_err
from moeops.ops import grouped_gemm

PEERS = ("moeops", "moeops-sm90", "moeops-mma", "triton", "triton-tuned", "torch", "dense")
OPT_IN_PEERS = ("triton-tuned",)  # run only when named in --peers
GPU_MODELS = ("qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v3")
GPU_TOKENS = (512, 4096, 16384)
CPU_MODELS = ("qwen3-30b-a3b",)
CPU_TOKENS = (64,)
PROJECTIONS = ("up", "down")
TOLERANCE = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 1e-4}


def gemm_dims(model: str, projection: str) -> tuple[int, int, int, int]:
    """(E, top-k, N, Kd) of one projection of ``model``'s MoE layer."""
    s = model_table.LAYERS[model]
    if projection == "up":
        return s.E, s.K, 2 * s.I, s.H
    if projection == "down":
        return s.E, s.K, s.H, s.I
    raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")


def routed_offsets(tokens: int, E: int, K: int, seed: int = 0) -> torch.Tensor:
    """Offsets [E+1] (int32) of the T*K rows of uniform random top-K routing, sorted by expert."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, E, generator=g).topk(K, dim=1).indices
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)


def _torch_grouped_mm() -> Callable | None:
    fn = getattr(torch.nn.functional, "grouped_mm", None)
    return fn or getattr(torch, "_grouped_mm", None)


def available_peers(device: torch.device) -> list[str]:
    """The implementations that can run on ``device`` in this build."""
    out = ["moeops"]
    cuda_build = device.type == "cuda" and bool(_C.with_cuda)
    if cuda_build:
        if _C.sm90_grouped_gemm and torch.cuda.get_device_capability(device)[0] == 9:
            out.append("moeops-sm90")
        out.append("moeops-mma")
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
            out += ["triton", "triton-tuned"]
        except ImportError:
            pass
    if _torch_grouped_mm() is not None:
        out.append("torch")
    out.append("dense")
    return out


def _peer_fn(peer: str, x: torch.Tensor, w: torch.Tensor,
             offsets: torch.Tensor) -> Callable[[], torch.Tensor]:
    if peer in ("moeops", "moeops-sm90", "moeops-mma"):
        path = {"moeops": "auto", "moeops-sm90": "sm90", "moeops-mma": "mma"}[peer]

        def fn():
            with gemm_path(path):
                return grouped_gemm(x, w, offsets, backend="cpp")
        return fn
    if peer == "triton":
        return lambda: grouped_gemm(x, w, offsets, backend="triton")
    if peer == "triton-tuned":
        def tuned():
            _triton.set_autotune(True)
            try:
                return grouped_gemm(x, w, offsets, backend="triton")
            finally:
                _triton.set_autotune(None)
        return tuned
    if peer == "torch":
        gmm = _torch_grouped_mm()
        wt = w.transpose(1, 2)  # [E, Kd, N], K-major like the moeops kernels read it
        ends = offsets[1:].contiguous()
        return lambda: gmm(x, wt, offs=ends)
    if peer == "dense":
        w0 = w[0].t()
        return lambda: torch.mm(x, w0)
    raise ValueError(f"unknown implementation {peer!r}; known: {', '.join(PEERS)}")


def _reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float32, device=x.device)
    off = offsets.tolist()
    for e in range(w.shape[0]):
        if off[e + 1] > off[e]:
            out[off[e]:off[e + 1]] = x[off[e]:off[e + 1]].float() @ w[e].float().t()
    return out


def run_gemm_bench(models: Sequence[str] | None = None, tokens: Sequence[int] | None = None,
                   dtype: str = "bf16", projections: Sequence[str] = PROJECTIONS,
                   peers: Sequence[str] | None = None, device: str | torch.device = "cuda",
                   min_runs: int = 5, max_runs: int = 50, time_budget: float = 0.5,
                   progress: Callable[[str], None] | None = None,
                   deadline_s: float | None = None) -> dict:
    """Runs the suite; returns a JSON-able dict (cases with per-peer medians, FLOP rates, the
    ratio to ``torch`` and the fraction of the dense rate). ``ok`` is False when an
    implementation failed its correctness check. ``deadline_s``: no case starts after this
    many seconds; the cases left are listed in ``not_run`` and the notes."""
    clock = Stopwatch(deadline_s)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked but torch sees no CUDA device")
    if dtype not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"dtype must be bf16, fp16 or fp32, got {dtype!r}")
    on_gpu = dev.type == "cuda"
    models = list(models or (GPU_MODELS if on_gpu else CPU_MODELS))
    for m in models:
        if m not in model_table.LAYERS:
            raise ValueError(f"unknown model {m!r}; known: {', '.join(model_table.LAYERS)}")
    tokens = list(tokens or (GPU_TOKENS if on_gpu else CPU_TOKENS))
    can = available_peers(dev)
    wanted = list(peers or [p for p in can if p not in OPT_IN_PEERS])
    for p in wanted:
        if p not in PEERS:
            raise ValueError(f"unknown implementation {p!r}; known: {', '.join(PEERS)}")
    notes = [f"{p}: not available on this device/build, skipped" for p in wanted if p not in can]
    wanted = [p for p in wanted if p in can]
    machine = measure_machine(dev)
    # the dense ceiling: bf16 mm on a GPU; on a CPU the bf16 rate where it was measured
    # (AVX512-BF16)
    dense_rate = machine["gemm_flops"]
    if dtype == "bf16" and machine.get("gemm_flops_bf16"):
        dense_rate = max(dense_rate, machine["gemm_flops_bf16"])
    machine["dense_rate"] = dense_rate
    dt = DTYPES[dtype]
    g = torch.Generator(device=dev).manual_seed(0)
    cases, ok, not_run = [], True, []

    for model in models:
        for proj in projections:
            if clock.past_deadline():  # not even the weights
                not_run += [f"{model} {proj} T={T}" for T in tokens]
                continue
            E, K, N, Kd = gemm_dims(model, proj)
            w = torch.randn(E, N, Kd, device=dev, generator=g, dtype=dt) * Kd ** -0.5
            for T in tokens:
                if clock.past_deadline():
                    not_run.append(f"{model} {proj} T={T}")
                    continue
                offsets_cpu = routed_offsets(T, E, K, seed=T)
                offsets = offsets_cpu.to(dev)
                R = T * K
                x = torch.randn(R, Kd, device=dev, generator=g, dtype=dt)
                flops = 2 * R * N * Kd
                ref = _reference(x, w, offsets_cpu) if any(p != "dense" for p in wanted) else None
                case = dict(model=model, projection=proj, tokens=T, rows=R, E=E, N=N, K=Kd,
                            flops=flops,
                            max_rows_per_expert=int((offsets_cpu[1:] - offsets_cpu[:-1]).max()),
                            results={})
                for p in wanted:
                    if progress:
                        progress(f"{model} {proj} T={T}: {p}")
                    try:
                        fn = _peer_fn(p, x, w, offsets)
                        err = None
                        if p != "dense":
                            err = rel_err(fn(), ref)
                            if not err <= TOLERANCE[dtype]:
                                ok = False
                        # two warm-up calls; at least min_runs runs (no time cap)
                        ts = time_calls(fn, dev, min_runs=min_runs, max_runs=max_runs,
                                        budget=time_budget, cap=float("inf"), warmup=2)
                        med = median(ts)
                        case["results"][p] = dict(median_s=med, runs=len(ts), rel_err=err,
                                                  flops_per_s=flops / med,
                                                  frac_dense=flops / med / dense_rate)
                    except Exception as e:  # an implementation that cannot run this shape
                        case["results"][p] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
                        if p.startswith("moeops"):
                            ok = False
                base = case["results"].get("torch", {}).get("median_s")
                for r in case["results"].values():
                    if base and "median_s" in r:
                        r["vs_torch"] = base / r["median_s"]
                cases.append(case)
                del x
            del w
    tuned = {}
    if "triton-tuned" in wanted:
        try:
            tuned = {f"class<={k[0]} rows~2^{k[1] - 1} N={k[2]} K={k[3]}": list(v)
                     for k, v in _triton.tuned_configs().items()}
        except ImportError:  # no triton: nothing was tuned
            pass
    if not_run:
        notes.append(deadline_note(deadline_s, not_run))
    return dict(suite="gemm", device=str(dev), dtype=dtype, ok=ok, notes=notes, machine=machine,
                peers=wanted, cases=cases, not_run=not_run, triton_tuned=tuned,
                gpu=torch.cuda.get_device_name(dev) if on_gpu else None,
                versions=dict(torch=torch.__version__, moeops=__version__,
                              cuda_gemm_auto_sm90=bool(getattr(_C, "sm90_grouped_gemm", False))))


_SHORT = {"moeops": "moeops", "moeops-sm90": "sm90", "moeops-mma": "mma", "triton": "triton",
          "triton-tuned": "tri-tuned", "torch": "torch", "dense": "dense"}


def format_gemm_bench(r: dict) -> str:
    """The terminal table: TFLOP/s per implementation, then moeops' ratio to torch and its % of
    the dense rate."""
    m = r["machine"]
    peers = r["peers"]
    lines = [f"moeops bench --suite gemm: {r['gpu'] or r['device']}, {r['dtype']}, torch "
             f"{r['versions']['torch']}, moeops {r['versions']['moeops']}",
             f"dense limit measured in this run: {m['dense_rate'] / 1e12:.3g} TFLOP/s "
             f"({'bf16 mm 2048^3' if m['dense_rate'] != m['gemm_flops'] else m['gemm_kind']})"]
    lines += [f"NOTE: {n}" for n in r["notes"]]
    head = (f"{'model':<15}{'proj':>5}{'T':>7}{'rows/e max':>11}  "
            + "".join(f"{_SHORT[p]:>9}" for p in peers)
            + f"{'x torch':>9}{'%dense':>8}  (TFLOP/s; moeops = auto)")
    lines += ["", head, "-" * len(head)]
    for c in r["cases"]:
        cells = []
        for p in peers:
            res = c["results"].get(p, {})
            cells.append(f"{res['flops_per_s'] / 1e12:>9.3g}" if "flops_per_s" in res
                         else f"{'err':>9}")
        mo = c["results"].get("moeops", {})
        vs = f"{mo['vs_torch']:>9.2f}" if "vs_torch" in mo else f"{'-':>9}"
        fd = f"{100 * mo['frac_dense']:>7.0f}%" if "frac_dense" in mo else f"{'-':>8}"
        lines.append(f"{c['model'][:15]:<15}{c['projection']:>5}{c['tokens']:>7}"
                     f"{c['max_rows_per_expert']:>11}  " + "".join(cells) + vs + fd)
    bad = [f"{c['model']} {c['projection']} T={c['tokens']} {p}: "
           f"{res.get('error') or 'rel err ' + format(res['rel_err'], '.2e')}"
           for c in r["cases"] for p, res in c["results"].items()
           if "error" in res or (res.get("rel_err") is not None
                                 and not res["rel_err"] <= TOLERANCE[r["dtype"]])]
    lines += ["", "all implementations match the fp32 reference" if not bad else "FAILED checks:"]
    lines += [f"  {b}" for b in bad]
    if r.get("triton_tuned"):
        lines += ["", "Triton autotuner's choices (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages):"]
        lines += [f"  {k}: {tuple(v)}" for k, v in r["triton_tuned"].items()]
    return "\n".join(lines)
