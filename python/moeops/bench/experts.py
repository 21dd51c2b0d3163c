"""Experts benchmark: ``moeops.ops.fused_experts`` against Hugging Face transformers' own experts
implementations (``eager``, ``grouped_mm``, ``batched_mm``) and the pure-torch reference, on the
MoE layer shapes of real models. Used by ``moeops bench`` (the default suite) and by
``bench/test_experts_benchmark.py``; its table and chart are :mod:`moeops.bench.experts_report`'s.

What one run does:

1. measures the machine's limits: on the CPU the read bandwidth (torch ``sum`` over a 1 GiB fp32
   tensor) and the fp32 GEMM rate (``torch.mm`` 2048x2048x2048), on a GPU the copy bandwidth
   (read + write of 1 GiB) and the bf16 ``torch.mm`` 8192^3 rate; median of 5 runs each, at the
   start and again at the end of the run (the higher of the two is used);
2. for each (model, dtype): builds the real Hugging Face experts module of that model
   (``Qwen3MoeExperts``, ``MixtralExperts``...; shapes and classes from :mod:`moeops.models`)
   once, with random weights (plus, for Qwen1.5-MoE, its shared expert and shared-expert gate);
3. for each token count T: draws random routing (distinct experts per token, softmax-normalised
   weights), calls every implementation once and checks its output against the reference, then
   times each with adaptive repeats (at least ``min_runs``, at most ``max_runs``, stopping once
   ``time_budget`` seconds were spent on that implementation) and keeps the median;
4. reports per case: the median time of every implementation, moeops' speedup over each, and
   the fraction of the machine's limit reached: ``max(bytes / bandwidth, FLOPs / GEMM rate) /
   time``, where bytes = the weights of the distinct experts the routing touches (the shared
   expert included where there is one) and FLOPs = 2·T·K·(H·N_up + I·H) (+ the shared expert).

All implementations get the same inputs: ``hidden [T, H]`` in the model dtype, the same expert
ids (int64 for Hugging Face, int32 for moeops) and the same routing weights (rounded to the model
dtype for Hugging Face as its routers do; moeops gets those rounded values in fp32). moeops reads
the module's ``gate_up_proj`` / ``down_proj`` parameters directly (no copies).

On a CUDA device two more implementations run when named in ``peers`` (not by default):
``moeops-mma`` and ``moeops-sm90``, moeops' CUDA layer with its grouped GEMMs forced onto the
``mma.sync`` kernel or the CUTLASS sm_90a one (``moeops._C.set_cuda_gemm_path``), to compare them
with ``auto``'s choice on whole layers (the sm_90a up projection adds an activation pass).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import platform
from collections.abc import Callable, Sequence

import torch

from moeops import _C
from moeops import models as model_table
from moeops._timing import Laps, Stopwatch, median, sync, time_calls
from moeops._version import __version__
from moeops.bench.harness import (
    DTYPES,
    CpuMeter,
    Progress,
    combine_machine,
    cpu_info,
    deadline_note,
    gemm_path,
    measure_machine,
    other_cpu_load,
    rel_err,
)
from moeops.ops import fused_experts

FULL_TOKENS = (1, 4, 16, 64, 256, 1024)
FULL_DTYPES = ("fp32", "bf16")
# The built-in default: about 1.5 minutes on the 2-core test machine (2.5 when others load it).
DEFAULT_CASES = (
    ("qwen3-30b-a3b", "fp32", 1), ("qwen3-30b-a3b", "fp32", 16), ("qwen3-30b-a3b", "fp32", 256),
    ("qwen3-30b-a3b", "bf16", 1), ("qwen3-30b-a3b", "bf16", 256),
    ("mixtral-8x7b", "bf16", 1),
)
# GPU default (moeops bench --device cuda): the shapes and token counts of the GPU issue, bf16
GPU_TOKENS = (1, 8, 64, 512, 4096, 16384)
GPU_DEFAULT_CASES = tuple([("qwen3-30b-a3b", "bf16", t) for t in GPU_TOKENS]
                          + [("mixtral-8x7b", "bf16", t) for t in (1, 8, 512, 4096)]
                          + [("deepseek-v3", "bf16", t) for t in (1, 8, 512, 4096)])
# the layer shapes: moeops.models.LAYERS (those marked gpu_only run only on a CUDA device)
# "triton": moeops.ops.fused_experts(backend="triton") (CUDA only); "moeops-mma" / "moeops-sm90":
# moeops' CUDA kernels with the GEMM path forced (CUDA only, run only when named)
PEERS = ("moeops", "moeops-mma", "moeops-sm90", "triton", "reference", "eager", "grouped_mm",
         "batched_mm")
HF_PEERS = ("eager", "grouped_mm", "batched_mm")
GEMM_PATH_PEERS = {"moeops-mma": "mma", "moeops-sm90": "sm90"}
# relative tolerance (max |out - ref| / max |ref|) of the one-time correctness check
TOLERANCE = {("fp32", "moeops"): 1e-4, ("fp32", "hf"): 1e-4,
             ("bf16", "moeops"): 2e-2, ("bf16", "hf"): 6e-2,
             ("fp16", "moeops"): 5e-3, ("fp16", "hf"): 2e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    dtype: str
    tokens: int

    @property
    def label(self) -> str:
        return f"{self.model} {self.dtype} T={self.tokens}"


def default_peers(device: str | torch.device = "cpu") -> tuple[str, ...]:
    """The implementations run by default on ``device``: all but the GEMM-path ones (named
    only), and Triton only on a CUDA device."""
    cuda = torch.device(device).type == "cuda"
    return tuple(p for p in PEERS if p not in GEMM_PATH_PEERS and (cuda or p != "triton"))


def select_cases(models: Sequence[str] | None = None, tokens: Sequence[int] | None = None,
                 dtypes: Sequence[str] | None = None, full: bool = False,
                 device: str | torch.device = "cpu") -> list[Case]:
    """The built-in default cases (GPU_DEFAULT_CASES on CUDA), or the cross product of
    ``models x dtypes x tokens`` (each list defaults to all models of ``moeops.models.LAYERS``
    -- without the gpu_only ones on the CPU -- / FULL_DTYPES / FULL_TOKENS when any of them or
    ``full`` is given). Ordered so that each (model, dtype) layer is built once."""
    on_gpu = torch.device(device).type == "cuda"
    layers = model_table.LAYERS
    if not (models or tokens or dtypes or full):
        cases = [Case(*c) for c in (GPU_DEFAULT_CASES if on_gpu else DEFAULT_CASES)]
    else:
        for m in models or ():
            if m not in layers:
                raise ValueError(f"unknown model {m!r}; known: {', '.join(layers)}")
        for d in dtypes or ():
            if d not in DTYPES:
                raise ValueError(f"unknown dtype {d!r}; known: {', '.join(DTYPES)}")
        for t in tokens or ():
            if t < 1:
                raise ValueError(f"token counts must be >= 1, got {t}")
        all_models = [m for m, s in layers.items() if on_gpu or not s.gpu_only]
        cases = [Case(m, d, t) for m in (models or all_models) for d in (dtypes or FULL_DTYPES)
                 for t in (tokens or FULL_TOKENS)]
    order = {m: i for i, m in enumerate(layers)}
    dorder = {d: i for i, d in enumerate(DTYPES)}
    seen, out = set(), []
    for c in sorted(cases, key=lambda c: (order[c.model], dorder[c.dtype], c.tokens)):
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


# ----------------------------------------------------------------------------- layer and inputs

def layer_cost(model: str, dtype: str, tokens: int, unique_experts: int) -> dict:
    """Bytes of the weights a call must read (distinct experts touched, shared expert) and the
    FLOPs of the call, for the roofline limits."""
    s = model_table.LAYERS[model]
    el = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    H, I, K, Is = s.H, s.I, s.K, s.I_shared
    per_expert = 3 * H * I  # gate_up [2I, H] + down [H, I]
    nbytes = unique_experts * per_expert * el
    flops = 2 * tokens * K * per_expert
    if Is:
        nbytes += (3 * H * Is + H) * el  # shared expert + its sigmoid gate
        flops += 2 * tokens * (3 * H * Is + H)
    return {"bytes": nbytes, "flops": flops}


def _fill_random(t: torch.Tensor, bound: float, gen: torch.Generator, chunk: int) -> None:
    """Fills ``t`` with uniform(-bound, bound) values quickly: one random chunk of ``chunk``
    elements (not a divisor of an expert's size, so every expert sees a different phase)
    copied over the tensor. Filling GBs with fresh random numbers takes seconds here."""
    flat = t.view(-1)
    src = (torch.rand(chunk, generator=gen) * (2 * bound) - bound).to(t.dtype).to(t.device)
    for i in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - i)
        flat[i:i + n].copy_(src[:n])


class Layer:
    """One model's experts layer in one dtype: the Hugging Face experts module (real class,
    random weights) and, for Qwen1.5-MoE, its shared expert (``Qwen2MoeMLP``) and gate.
    ``shape``: the model's :class:`moeops.models.LayerShape`."""

    def __init__(self, model: str, dtype: str, device: str | torch.device = "cpu",
                 seed: int = 0):
        self.model, self.dtype, self.device = model, dtype, torch.device(device)
        self.shape = s = model_table.LAYERS[model]
        fam = model_table.FAMILIES[s.family]
        mod = fam.modeling()
        cfg = fam.config_class()(hidden_size=s.H, num_experts_per_tok=s.K, hidden_act="silu",
                                 **{k: getattr(s, v) for k, v in fam.shape_fields.items()})
        cfg._experts_implementation = "eager"
        self.config = cfg
        dt = DTYPES[dtype]
        with torch.device("meta"):
            experts = getattr(mod, fam.experts)(cfg)
            shared = gate = None
            if s.I_shared:
                shared = mod.Qwen2MoeMLP(cfg, intermediate_size=s.I_shared)
                gate = torch.nn.Linear(s.H, 1, bias=False)
        gen = torch.Generator().manual_seed(seed)
        self.experts = experts.to(dt).to_empty(device=self.device).requires_grad_(False).eval()
        # unit-variance activations: uniform(+-sqrt(3/fan_in)); chunk length coprime-ish with
        # every expert size, so experts differ from one another
        chunk = (1 << 22) + 7
        _fill_random(self.experts.gate_up_proj, math.sqrt(3 / s.H), gen, chunk)
        _fill_random(self.experts.down_proj, math.sqrt(3 / s.I), gen, chunk)
        self.shared = self.shared_gate = None
        if shared is not None:
            self.shared = shared.to(dt).to_empty(device=self.device).requires_grad_(False).eval()
            self.shared_gate = gate.to(dt).to_empty(device=self.device).requires_grad_(False)
            for lin in (self.shared.gate_proj, self.shared.up_proj):
                _fill_random(lin.weight, math.sqrt(3 / s.H), gen, chunk)
            _fill_random(self.shared.down_proj.weight, math.sqrt(3 / s.I_shared), gen, chunk)
            _fill_random(self.shared_gate.weight, math.sqrt(3 / s.H), gen, chunk)

    @property
    def nbytes(self) -> int:
        mods = [self.experts] + ([self.shared, self.shared_gate] if self.shared is not None else [])
        return sum(p.numel() * p.element_size() for m in mods for p in m.parameters())

    def shared_out(self, hidden: torch.Tensor) -> torch.Tensor:
        """Qwen1.5-MoE's shared expert as Hugging Face computes it (plain dense torch)."""
        return torch.sigmoid(self.shared_gate(hidden)) * self.shared(hidden)

    def inputs(self, tokens: int, seed: int = 0) -> dict:
        """Random hidden states and routing for ``tokens`` tokens: K distinct experts per token,
        softmax-normalised weights."""
        s = self.shape
        g = torch.Generator().manual_seed(seed * 1000003 + tokens)
        dt = DTYPES[self.dtype]
        hidden = torch.randn(tokens, s.H, generator=g).to(dt)
        ids = torch.rand(tokens, s.E, generator=g).topk(s.K, dim=1).indices
        w = torch.softmax(torch.randn(tokens, s.K, generator=g), dim=1).to(dt)
        d = self.device
        return {"hidden": hidden.to(d), "ids64": ids.to(d), "ids32": ids.to(torch.int32).to(d),
                "w_model": w.to(d), "w32": w.float().to(d),
                "unique_experts": int(torch.unique(ids).numel())}

    # -- implementations: each returns fn(inputs) -> [T, H]

    def hf_fn(self, impl: str) -> Callable[[dict], torch.Tensor]:
        """Hugging Face's experts forward dispatched through ``transformers.integrations.moe``
        (``config._experts_implementation = impl``) on the real module."""
        experts, cfg = self.experts, self.config

        def fn(x):
            cfg._experts_implementation = impl
            out = experts(x["hidden"], x["ids64"], x["w_model"])
            if self.shared is not None:
                out = out + self.shared_out(x["hidden"])
            return out
        return fn

    def moeops_fn(self, backend: str) -> Callable[[dict], torch.Tensor]:
        """``moeops.ops.fused_experts`` on the module's own parameters (no copies); the shared
        expert, if any, as a plain dense torch MLP outside fused_experts."""
        w_up, w_down = self.experts.gate_up_proj, self.experts.down_proj

        def fn(x):
            out = fused_experts(x["hidden"], x["ids32"], x["w32"], w_up, w_down,
                                activation="silu", gated=True, backend=backend)
            if self.shared is not None:
                out = out + self.shared_out(x["hidden"])
            return out
        return fn

    def peer_fn(self, peer: str, moeops_backend: str = "auto") -> Callable[[dict], torch.Tensor]:
        if peer == "moeops":
            return self.moeops_fn(moeops_backend)
        if peer == "reference":
            return self.moeops_fn("reference")
        if peer == "triton":
            return self.moeops_fn("triton")
        if peer in GEMM_PATH_PEERS:
            inner, path = self.moeops_fn("cpp"), GEMM_PATH_PEERS[peer]

            def forced(x):
                with gemm_path(path):
                    return inner(x)
            return forced
        if peer in HF_PEERS:
            return self.hf_fn(peer)
        raise ValueError(f"unknown implementation {peer!r}; known: {', '.join(PEERS)}")


def check_gemm_path_peers(peers: Sequence[str], dev: torch.device) -> None:
    """Raises ValueError when a forced-GEMM-path implementation cannot run on ``dev``."""
    named = [p for p in peers if p in GEMM_PATH_PEERS]
    if not named:
        return
    if dev.type != "cuda" or not getattr(_C, "with_cuda", False):
        raise ValueError(f"{', '.join(named)}: need --device cuda and a moeops build with CUDA "
                         "kernels")
    if "moeops-sm90" in named and not (getattr(_C, "sm90_grouped_gemm", False)
                                       and torch.cuda.get_device_capability(dev)[0] == 9):
        raise ValueError("moeops-sm90: needs a Hopper GPU (sm_90) and a build with the CUTLASS "
                         "sm_90a kernel (moeops info: sm90_grouped_gemm)")


def moeops_backend_for(device: str | torch.device, requested: str = "auto") -> tuple[str, str]:
    """(backend to pass to fused_experts, note). Falls back to the reference, with a note, when
    the compiled fused_experts kernel is not available on ``device`` and ``requested`` is auto."""
    device = torch.device(device)
    if requested == "reference":
        return "reference", "moeops timed with backend='reference' (asked for)"
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type, device.type.upper())
    try:
        have = torch._C._dispatch_has_kernel_for_dispatch_key("moeops::fused_experts", key)
    except RuntimeError:  # op not registered at all
        have = False
    if have:
        return "cpp", ""
    why = f"the installed moeops has no compiled fused_experts kernel for {device.type}"
    if requested == "cpp":
        raise RuntimeError(f"moeops bench: --backend cpp asked but {why}")
    return "reference", f"{why}: moeops timed with backend='reference'"


def tolerance(dtype: str, peer: str) -> float:
    return TOLERANCE[(dtype, "hf" if peer in HF_PEERS else "moeops")]


# ----------------------------------------------------------------------------- the benchmark

def run_experts_bench(cases: Sequence[Case], peers: Sequence[str] = PEERS,
                      device: str = "cpu", moeops_backend: str = "auto", min_runs: int = 3,
                      max_runs: int = 30, time_budget: float = 2.0,
                      batched_mm_max_tokens: int = 4, progress: bool = True,
                      deadline_s: float | None = None) -> dict:
    """Runs the experts benchmark over ``cases``; returns a JSON-able dict (see module doc).
    ``deadline_s``: no case starts after this many seconds from the start; the cases left are
    listed in the notes (a time-capped run still reports what it finished)."""
    clock = Stopwatch(deadline_s)
    try:
        import transformers
    except ImportError as e:
        raise RuntimeError("moeops bench (experts suite) needs Hugging Face transformers >= 5 "
                           "(pip install 'transformers>=5'): its experts modules hold the "
                           "weights and are the peers") from e
    dev = torch.device(device)
    for p in peers:
        if p not in PEERS:
            raise ValueError(f"unknown implementation {p!r}; known: {', '.join(PEERS)}")
    peers = [p for p in PEERS if p in peers]  # canonical order
    if "triton" in peers and dev.type != "cuda":
        raise ValueError("the 'triton' implementation needs --device cuda")
    check_gemm_path_peers(peers, dev)
    backend, backend_note = ("auto", "")
    if "moeops" in peers:
        backend, backend_note = moeops_backend_for(dev, moeops_backend)

    def case_peers(c: Case) -> list[str]:
        return [p for p in peers if p != "batched_mm" or c.tokens <= batched_mm_max_tokens]

    total = 2 + sum(len(case_peers(c)) for c in cases)
    bar = Progress(total, progress)
    load_start = other_cpu_load() if dev.type == "cpu" else None
    bar.set("measuring bandwidth and GEMM rate")
    m_start = measure_machine(dev)
    bar.step()

    results = []
    not_run: list[str] = []
    layer: Layer | None = None
    try:
        with torch.inference_mode():
            for c in cases:
                if clock.past_deadline():
                    not_run.append(c.label)
                    continue
                if layer is None or (layer.model, layer.dtype) != (c.model, c.dtype):
                    layer = None
                    gc.collect()
                    bar.set(f"building {c.model} {c.dtype} layer")
                    layer = Layer(c.model, c.dtype, dev)
                results.append(_run_case(layer, c, case_peers(c), backend, dev, min_runs,
                                         max_runs, time_budget, bar))
            layer = None
            gc.collect()
            bar.set("measuring bandwidth and GEMM rate again")
            m_end = measure_machine(dev)
            bar.step()
    finally:
        bar.close()
        layer = None
        gc.collect()
    load_end = other_cpu_load() if dev.type == "cpu" else None
    machine = combine_machine(m_start, m_end)
    for r in results:
        _add_limits(r, machine)
    notes = [backend_note] if backend_note else []
    if not_run:
        notes.append(deadline_note(deadline_s, not_run))
    busy = [x for x in [load_start, load_end] + [r["other_cpu_load"] for r in results]
            if x is not None]
    if busy and max(busy) > 0.1:
        notes.append(
            f"other processes used up to {max(busy):.0%} of the CPUs during this run (column "
            f"'oth'): those timings are skewed, multi-threaded (OpenMP) ones most, up to 10x+")
    return {
        "suite": "experts",
        "device": str(dev), "threads": torch.get_num_threads(),
        "platform": platform.platform(), "cpu": cpu_info(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "moeops": __version__},
        "moeops_backend": backend, "notes": notes,
        "other_cpu_load": {"start": load_start, "end": load_end},
        "machine": machine,
        "settings": {"min_runs": min_runs, "max_runs": max_runs, "time_budget_s": time_budget,
                     "batched_mm_max_tokens": batched_mm_max_tokens, "peers": list(peers)},
        "cases": results,
        "ok": all(r["ok"] for r in results),
        "not_run": not_run,
        "wall_s": clock.elapsed(),
    }


def _add_limits(r: dict, machine: dict) -> None:
    """Adds the limits and each implementation's fraction of them to a case result."""
    t_bw = r["bytes"] / machine["bandwidth"]
    rate = machine["gemm_flops"]
    if r.get("dtype") == "bf16" and machine.get("gemm_flops_bf16"):
        rate = max(rate, machine["gemm_flops_bf16"])  # the bf16 ceiling where bf16 is faster
    t_gemm = r["flops"] / rate
    r.update(limit_bw_s=t_bw, limit_gemm_s=t_gemm, bound="bw" if t_bw >= t_gemm else "gemm",
             limit_s=max(t_bw, t_gemm))
    for t in r["results"].values():
        med = t["median_s"]
        t.update(frac_bw=t_bw / med, frac_gemm=t_gemm / med, frac_limit=max(t_bw, t_gemm) / med)


def _run_case(layer: Layer, c: Case, peers: list[str], backend: str, dev: torch.device,
              min_runs: int, max_runs: int, time_budget: float, bar: Progress) -> dict:
    s = layer.shape
    meter = CpuMeter()
    x = layer.inputs(c.tokens)
    cost = layer_cost(c.model, c.dtype, c.tokens, x["unique_experts"])
    fns = {p: layer.peer_fn(p, backend) for p in peers}

    # correctness once (this call is also each implementation's warm-up)
    outs, first = {}, {}
    ref_name = "reference" if "reference" in peers else None
    for p in ([ref_name] if ref_name else []) + [p for p in peers if p != ref_name]:
        bar.set(f"{c.label}: checking {p}")
        sync(dev)
        lap = Laps(first, dev)  # one interval: synchronised before the call and after it
        outs[p] = fns[p](x)
        lap.lap(p)
    if ref_name is None:  # the reference is not timed: still compare against it
        bar.set(f"{c.label}: computing the reference output")
        ref = layer.peer_fn("reference")(x)
    else:
        ref = outs[ref_name]
    errors = {p: rel_err(o, ref) for p, o in outs.items() if p != ref_name}
    failed = [p for p, e in errors.items() if not e <= tolerance(c.dtype, p)]
    del outs, ref

    timings = {}
    for p in peers:
        bar.set(f"{c.label}: timing {p}")
        fn = fns[p]
        if first[p] < time_budget / 4:  # a second warm-up call when it is cheap
            fn(x)
        ts = time_calls(lambda: fn(x), dev, min_runs=min_runs, max_runs=max_runs,
                        budget=time_budget)
        timings[p] = {"median_s": median(ts), "runs": len(ts), "min_s": min(ts),
                      "max_s": max(ts), "first_call_s": first[p]}
        bar.step()
    if "moeops" in timings:
        m = timings["moeops"]["median_s"]
        for _p, r in timings.items():
            r["moeops_speedup"] = r["median_s"] / m
    return {
        "model": c.model, "dtype": c.dtype, "tokens": c.tokens,
        "E": s.E, "K": s.K, "H": s.H, "I": s.I, "I_shared": s.I_shared,
        "shared_expert": bool(s.I_shared),
        "unique_experts": x["unique_experts"], "bytes": cost["bytes"], "flops": cost["flops"],
        "check_reference": ref_name or "reference (untimed)",
        "rel_err": errors, "tolerance": {p: tolerance(c.dtype, p) for p in errors},
        "failed": failed, "ok": not failed, "results": timings,
        "other_cpu_load": meter.others(),
    }
