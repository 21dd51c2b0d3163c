"""Experts benchmark: ``moeops.fused_experts`` against Hugging Face transformers' own experts
implementations (``eager``, ``grouped_mm``, ``batched_mm``) and the pure-torch reference, on the
MoE layer shapes of real models. Used by ``moeops bench`` (the default suite) and by
``bench/test_bench_experts.py``.

What one run does:

1. measures the machine's limits: on the CPU the read bandwidth (torch ``sum`` over a 1 GiB fp32
   tensor) and the fp32 GEMM rate (``torch.mm`` 2048x2048x2048), on a GPU the copy bandwidth
   (read + write of 1 GiB) and the bf16 ``torch.mm`` 8192^3 rate; median of 5 runs each, at the
   start and again at the end of the run (the higher of the two is used);
2. for each (model, dtype): builds the real Hugging Face experts module of that model
   (``Qwen3MoeExperts``, ``MixtralExperts``...) once, with random weights (plus, for
   Qwen1.5-MoE, its shared expert and shared-expert gate);
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

import contextlib
import dataclasses
import gc
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# One MoE layer of each model (values of the models' config.json): routed experts E, top-k K,
# hidden H, expert width I, shared expert width I_shared (0: none). ``hf``: the transformers
# module that holds the routed experts, and the config class / fields that build it.
LAYERS: dict[str, dict] = {
    "qwen3-30b-a3b": dict(E=128, K=8, H=2048, I=768, I_shared=0, hf="qwen3_moe"),
    "olmoe-1b-7b": dict(E=64, K=8, H=2048, I=1024, I_shared=0, hf="olmoe"),
    "qwen1.5-moe-a2.7b": dict(E=60, K=4, H=2048, I=1408, I_shared=5632, hf="qwen2_moe"),
    "mixtral-8x7b": dict(E=8, K=2, H=4096, I=14336, I_shared=0, hf="mixtral"),
    "deepseek-v2-lite": dict(E=64, K=6, H=2048, I=1408, I_shared=0, hf="deepseek_v2"),
    # 256 x 3 x 7168 x 2048 weights: 22.5 GB in bf16, so only in GPU sweeps (GPU_ONLY)
    "deepseek-v3": dict(E=256, K=8, H=7168, I=2048, I_shared=0, hf="deepseek_v3"),
}
GPU_ONLY = {"deepseek-v3"}
MODEL_ORDER = list(LAYERS)

_HF = {  # family -> (module path, config class, experts class, {config kwarg: layer key})
    "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeConfig",
                  "Qwen3MoeExperts", dict(num_experts="E", moe_intermediate_size="I")),
    "olmoe": ("transformers.models.olmoe.modeling_olmoe", "OlmoeConfig", "OlmoeExperts",
              dict(num_experts="E", intermediate_size="I")),
    "qwen2_moe": ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeConfig",
                  "Qwen2MoeExperts", dict(num_experts="E", moe_intermediate_size="I",
                                          shared_expert_intermediate_size="I_shared")),
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralConfig", "MixtralExperts",
                dict(num_local_experts="E", intermediate_size="I")),
    "deepseek_v2": ("transformers.models.deepseek_v2.modeling_deepseek_v2", "DeepseekV2Config",
                    "DeepseekV2Experts", dict(n_routed_experts="E", moe_intermediate_size="I")),
    "deepseek_v3": ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3Config",
                    "DeepseekV3Experts", dict(n_routed_experts="E", moe_intermediate_size="I")),
}

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
# "triton": moeops.fused_experts(backend="triton") (CUDA only); "moeops-mma" / "moeops-sm90":
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
    ``models x dtypes x tokens`` (each list defaults to all models -- without the GPU_ONLY ones
    on the CPU -- / FULL_DTYPES / FULL_TOKENS when any of them or ``full`` is given). Ordered so
    that each (model, dtype) layer is built once."""
    on_gpu = torch.device(device).type == "cuda"
    if not (models or tokens or dtypes or full):
        cases = [Case(*c) for c in (GPU_DEFAULT_CASES if on_gpu else DEFAULT_CASES)]
    else:
        for m in models or ():
            if m not in LAYERS:
                raise ValueError(f"unknown model {m!r}; known: {', '.join(LAYERS)}")
        for d in dtypes or ():
            if d not in DTYPES:
                raise ValueError(f"unknown dtype {d!r}; known: {', '.join(DTYPES)}")
        for t in tokens or ():
            if t < 1:
                raise ValueError(f"token counts must be >= 1, got {t}")
        all_models = [m for m in MODEL_ORDER if on_gpu or m not in GPU_ONLY]
        cases = [Case(m, d, t) for m in (models or all_models) for d in (dtypes or FULL_DTYPES)
                 for t in (tokens or FULL_TOKENS)]
    order = {m: i for i, m in enumerate(MODEL_ORDER)}
    dorder = {d: i for i, d in enumerate(DTYPES)}
    seen, out = set(), []
    for c in sorted(cases, key=lambda c: (order[c.model], dorder[c.dtype], c.tokens)):
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


# ----------------------------------------------------------------------------- machine limits

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_machine(device: str | torch.device = "cpu", repeats: int = 5,
                    nbytes: int = 1 << 30) -> dict:
    """The machine's limits: medians of ``repeats`` runs after one warm-up each (and the best
    runs, for the record). CPU: read bandwidth (bytes/s, torch ``sum`` over ``nbytes`` of fp32)
    and fp32 GEMM rate (FLOP/s, ``torch.mm`` 2048^3). CUDA: copy bandwidth (bytes read +
    written per second, a device-to-device copy of ``nbytes``) and the dense bf16 matmul rate
    (``torch.mm`` 8192^3), the ceilings the GPU targets are stated against."""
    device = torch.device(device)

    def timed(fn) -> list[float]:
        fn()
        ts = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
        return ts

    if device.type == "cuda":
        src = torch.arange(nbytes // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        t_copy = timed(lambda: dst.copy_(src))
        del src, dst
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
        t_mm = timed(lambda: torch.mm(a, b, out=c))
        flop = 2 * n ** 3
        return {"bandwidth": 2 * nbytes / statistics.median(t_copy),
                "bandwidth_best": 2 * nbytes / min(t_copy),
                "gemm_flops": flop / statistics.median(t_mm), "gemm_flops_best": flop / min(t_mm),
                "bandwidth_kind": "device copy (read + write)", "gemm_kind": "bf16 mm 8192^3"}
    # distinct values on every page (a page-deduplicating host cannot serve them from cache)
    buf = torch.arange(nbytes // 4, dtype=torch.float32, device=device)
    t_read = timed(lambda: buf.sum())
    del buf
    n = 2048
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    c = torch.empty(n, n, device=device)
    t_mm = timed(lambda: torch.mm(a, b, out=c))
    flop = 2 * n ** 3
    out = {"bandwidth": nbytes / statistics.median(t_read),
           "bandwidth_best": nbytes / min(t_read),
           "gemm_flops": flop / statistics.median(t_mm), "gemm_flops_best": flop / min(t_mm),
           "bandwidth_kind": "read (torch sum)", "gemm_kind": "fp32 mm 2048^3"}
    # CPUs with AVX512-BF16 multiply bf16 at about twice the fp32 rate (torch's oneDNN and
    # moeops' vdpbf16ps kernels): that is the ceiling of bf16 cases there. (Without it torch's
    # bf16 mm is far slower than fp32 and would take minutes to time.)
    try:
        from moeops import _C
        fast_bf16 = bool(_C.cpu_supports_avx512bf16())
    except Exception:
        fast_bf16 = False
    if fast_bf16:
        a16, b16, c16 = a.bfloat16(), b.bfloat16(), c.bfloat16()
        t16 = timed(lambda: torch.mm(a16, b16, out=c16))
        out.update(gemm_flops_bf16=flop / statistics.median(t16), gemm_flops_bf16_best=flop / min(t16))
    return out


def combine_machine(*ms: dict) -> dict:
    """The limits used for the fractions: the higher of several :func:`measure_machine` medians
    (taken at the start and the end of a run, so one noisy moment does not lower the ceiling)."""
    bf16 = [m["gemm_flops_bf16"] for m in ms if m.get("gemm_flops_bf16")]
    return {"bandwidth": max(m["bandwidth"] for m in ms),
            "gemm_flops": max(m["gemm_flops"] for m in ms),
            **({"gemm_flops_bf16": max(bf16)} if bf16 else {}),
            "bandwidth_method": f"{ms[0]['bandwidth_kind']} of 1 GiB, median of 5, higher of start/end",
            "gemm_method": f"{ms[0]['gemm_kind']}, median of 5, higher of start/end",
            "measurements": list(ms)}


class CpuMeter:
    """Share of all CPUs used by *other* processes between two points of time: /proc/stat's busy
    time minus this process' CPU time. None where /proc/stat is unavailable (non-Linux)."""

    def __init__(self):
        import os
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start = self._snap()

    def _snap(self):
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        total = sum(v[:8]) / self._tick
        idle = (v[3] + (v[4] if len(v) > 4 else 0)) / self._tick
        return total, idle, time.process_time()

    def others(self) -> float | None:
        """Others' share of all CPUs since the start (or the previous call), 0..1."""
        now = self._snap()
        a, self.start = self.start, now
        if a is None or now is None or now[0] <= a[0]:
            return None
        busy = (now[0] - a[0]) - (now[1] - a[1])
        return min(max((busy - (now[2] - a[2])) / (now[0] - a[0]), 0.0), 1.0)


def other_cpu_load(interval: float = 0.3) -> float | None:
    """Others' share of all CPUs over ``interval`` seconds (this process sleeping)."""
    m = CpuMeter()
    time.sleep(interval)
    return m.others()


_ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16",
              "avx_vnni", "avx_ne_convert", "asimd", "sve")


def cpu_info() -> dict:
    """CPU model and the ISA extensions that matter for these kernels (from /proc/cpuinfo where
    there is one), and the ISA path moeops' compiled kernels picked. Machines of the same
    "kind" can differ (e.g. Zen 3 without AVX-512 vs Zen 4 with AVX512_BF16), and torch's
    bf16 matmul speed depends on it."""
    import os
    info: dict = {"name": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read().split("\n\n")[0]
        kv = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        kv = {k.strip(): v.strip() for k, v in kv.items()}
        info["name"] = kv.get("model name", info["name"])
        info["family_model"] = f"{kv.get('cpu family', '?')}/{kv.get('model', '?')}"
        flags = set((kv.get("flags") or kv.get("Features") or "").split())
        info["isa"] = [f for f in _ISA_FLAGS if f in flags]
    except OSError:
        pass
    try:
        from moeops import _C
        info["moeops_isa"] = _C.cpu_isa()
    except Exception:
        pass
    # transparent huge pages change streaming bandwidth a lot on VMs (2-D page walks): torch
    # asks for them on large allocations only with THP_MEM_ALLOC_ENABLE=1
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().split()
        info["thp"] = next((w.strip("[]") for w in thp if w.startswith("[")), " ".join(thp))
    except OSError:
        pass
    info["torch_thp_alloc"] = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    return info


# ----------------------------------------------------------------------------- layer and inputs

def layer_cost(model: str, dtype: str, tokens: int, unique_experts: int) -> dict:
    """Bytes of the weights a call must read (distinct experts touched, shared expert) and the
    FLOPs of the call, for the roofline limits."""
    s = LAYERS[model]
    el = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    H, I, K, Is = s["H"], s["I"], s["K"], s["I_shared"]
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
    random weights) and, for Qwen1.5-MoE, its shared expert (``Qwen2MoeMLP``) and gate."""

    def __init__(self, model: str, dtype: str, device: str | torch.device = "cpu",
                 seed: int = 0):
        import importlib

        self.model, self.dtype, self.device = model, dtype, torch.device(device)
        self.shape = s = LAYERS[model]
        modpath, cfg_name, cls_name, fields = _HF[s["hf"]]
        mod = importlib.import_module(modpath)
        cfg_mod = importlib.import_module(modpath.replace(".modeling_", ".configuration_"))
        cfg = getattr(cfg_mod, cfg_name)(hidden_size=s["H"], num_experts_per_tok=s["K"],
                                         hidden_act="silu",
                                         **{k: s[v] for k, v in fields.items()})
        cfg._experts_implementation = "eager"
        self.config = cfg
        dt = DTYPES[dtype]
        with torch.device("meta"):
            experts = getattr(mod, cls_name)(cfg)
            shared = gate = None
            if s["I_shared"]:
                shared = mod.Qwen2MoeMLP(cfg, intermediate_size=s["I_shared"])
                gate = torch.nn.Linear(s["H"], 1, bias=False)
        gen = torch.Generator().manual_seed(seed)
        self.experts = experts.to(dt).to_empty(device=self.device).requires_grad_(False).eval()
        # unit-variance activations: uniform(+-sqrt(3/fan_in)); chunk length coprime-ish with
        # every expert size, so experts differ from one another
        chunk = (1 << 22) + 7
        _fill_random(self.experts.gate_up_proj, math.sqrt(3 / s["H"]), gen, chunk)
        _fill_random(self.experts.down_proj, math.sqrt(3 / s["I"]), gen, chunk)
        self.shared = self.shared_gate = None
        if shared is not None:
            self.shared = shared.to(dt).to_empty(device=self.device).requires_grad_(False).eval()
            self.shared_gate = gate.to(dt).to_empty(device=self.device).requires_grad_(False)
            for lin in (self.shared.gate_proj, self.shared.up_proj):
                _fill_random(lin.weight, math.sqrt(3 / s["H"]), gen, chunk)
            _fill_random(self.shared.down_proj.weight, math.sqrt(3 / s["I_shared"]), gen, chunk)
            _fill_random(self.shared_gate.weight, math.sqrt(3 / s["H"]), gen, chunk)

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
        hidden = torch.randn(tokens, s["H"], generator=g).to(dt)
        ids = torch.rand(tokens, s["E"], generator=g).topk(s["K"], dim=1).indices
        w = torch.softmax(torch.randn(tokens, s["K"], generator=g), dim=1).to(dt)
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
        """``moeops.fused_experts`` on the module's own parameters (no copies); the shared
        expert, if any, as a plain dense torch MLP outside fused_experts."""
        import moeops

        w_up, w_down = self.experts.gate_up_proj, self.experts.down_proj

        def fn(x):
            out = moeops.fused_experts(x["hidden"], x["ids32"], x["w32"], w_up, w_down,
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


@contextlib.contextmanager
def gemm_path(path: str):
    """Runs the body with moeops' CUDA grouped GEMMs on ``path`` ("auto", "mma" or "sm90";
    ``moeops._C.set_cuda_gemm_path``), back to "auto" after. A no-op in builds without CUDA."""
    import moeops
    setter = getattr(moeops._C, "set_cuda_gemm_path", None)
    if setter is not None:
        setter(path)
    try:
        yield
    finally:
        if setter is not None:
            setter("auto")


def check_gemm_path_peers(peers: Sequence[str], dev: torch.device) -> None:
    """Raises ValueError when a forced-GEMM-path implementation cannot run on ``dev``."""
    named = [p for p in peers if p in GEMM_PATH_PEERS]
    if not named:
        return
    import moeops
    if dev.type != "cuda" or not getattr(moeops._C, "with_cuda", False):
        raise ValueError(f"{', '.join(named)}: need --device cuda and a moeops build with CUDA "
                         "kernels")
    if "moeops-sm90" in named and not (getattr(moeops._C, "sm90_grouped_gemm", False)
                                       and torch.cuda.get_device_capability(dev)[0] == 9):
        raise ValueError("moeops-sm90: needs a Hopper GPU (sm_90) and a build with the CUTLASS "
                         "sm_90a kernel (moeops info: sm90_grouped_gemm)")


def moeops_backend_for(device: str | torch.device, requested: str = "auto") -> tuple[str, str]:
    """(backend to pass to fused_experts, note). Falls back to the reference, with a note, when
    the compiled fused_experts kernel is not available on ``device`` and ``requested`` is auto."""
    device = torch.device(device)
    if requested == "reference":
        return "reference", "moeops timed with backend='reference' (asked for)"
    import moeops  # noqa: F401
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


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (in fp32)."""
    o, r = out.float(), ref.float()
    if not torch.isfinite(o).all():
        return float("inf")
    return (o - r).abs().max().item() / max(r.abs().max().item(), 1e-30)


def tolerance(dtype: str, peer: str) -> float:
    return TOLERANCE[(dtype, "hf" if peer in HF_PEERS else "moeops")]


# ----------------------------------------------------------------------------- timing

def time_adaptive(fn: Callable[[], object], device: torch.device, min_runs: int = 3,
                  max_runs: int = 30, time_budget: float = 2.0,
                  time_cap: float | None = None) -> list[float]:
    """Times ``fn`` (already warmed up): runs until ``max_runs`` runs, or ``min_runs`` runs and
    ``time_budget`` seconds spent; never starts a run once ``time_cap`` (default 3 x budget)
    seconds were spent, so a peer taking seconds per call gets 1-2 runs, not ``min_runs``.
    Returns the per-run seconds: wall clock on the CPU; on a GPU, the GPU's time for the call
    from CUDA events around it, with the L2 cache flushed before each call (as triton's
    ``do_bench`` measures), and runs queued in batches of up to 5 with no host round trip between
    them, so the host's launch overhead is hidden whenever it is shorter than the flush."""
    cap = 3 * time_budget if time_cap is None else time_cap
    if device.type == "cuda":
        return _time_cuda(fn, device, min_runs, max_runs, time_budget, cap)
    times: list[float] = []
    spent = 0.0
    while len(times) < max_runs and (len(times) < min_runs or spent < time_budget):
        if times and spent >= cap:
            break
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return times


def _time_cuda(fn: Callable[[], object], device: torch.device, min_runs: int, max_runs: int,
               time_budget: float, cap: float) -> list[float]:
    """time_adaptive on a GPU (see there): events, L2 flushed by writing twice its size."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
    flush = torch.empty(2 * l2 // 4, dtype=torch.int32, device=device)
    times: list[float] = []
    spent = 0.0
    torch.cuda.synchronize(device)
    while len(times) < max_runs and (len(times) < min_runs or spent < time_budget):
        if times and spent >= cap:
            break
        # one run first, then batches of up to 5 while a run takes under a tenth of the budget
        n = 1 if not times or times[-1] > time_budget / 10 else min(5, max_runs - len(times))
        events = []
        for _ in range(n):
            flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            events.append((a, b))
        torch.cuda.synchronize(device)
        for a, b in events:
            times.append(a.elapsed_time(b) / 1e3)
            spent += times[-1]
    del flush
    return times


class _Progress:
    """tqdm if installed and stderr is a terminal, else one plain line per step on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.bar = None
        self.total, self.n, self.enabled = total, 0, enabled
        self.t0 = time.perf_counter()
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, unit="step", file=sys.stderr, leave=False,
                                dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def set(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text)
        elif self.enabled:
            print(f"[{self.n}/{self.total} {time.perf_counter() - self.t0:6.1f}s] {text}",
                  file=sys.stderr, flush=True)

    def step(self) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- the benchmark

def run_experts_bench(cases: Sequence[Case], peers: Sequence[str] = PEERS,
                      device: str = "cpu", moeops_backend: str = "auto", min_runs: int = 3,
                      max_runs: int = 30, time_budget: float = 2.0,
                      batched_mm_max_tokens: int = 4, progress: bool = True,
                      deadline_s: float | None = None) -> dict:
    """Runs the experts benchmark over ``cases``; returns a JSON-able dict (see module doc).
    ``deadline_s``: no case starts after this many seconds from the start; the cases left are
    listed in the notes (a time-capped run still reports what it finished)."""
    t_start = time.perf_counter()
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
    bar = _Progress(total, progress)
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
                if deadline_s is not None and time.perf_counter() - t_start > deadline_s:
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
                     "python": platform.python_version(), "moeops": _moeops_version()},
        "moeops_backend": backend, "notes": notes,
        "other_cpu_load": {"start": load_start, "end": load_end},
        "machine": machine,
        "settings": {"min_runs": min_runs, "max_runs": max_runs, "time_budget_s": time_budget,
                     "batched_mm_max_tokens": batched_mm_max_tokens, "peers": list(peers)},
        "cases": results,
        "ok": all(r["ok"] for r in results),
        "not_run": not_run,
        "wall_s": time.perf_counter() - t_start,
    }


def deadline_note(deadline_s: float, not_run: Sequence[str]) -> str:
    """The note a suite adds when its ``deadline_s`` left the cases ``not_run`` unstarted."""
    return (f"deadline of {deadline_s:g} s reached: {len(not_run)} case(s) not run "
            f"({', '.join(not_run)})")


def _moeops_version() -> str:
    try:
        import moeops
        return moeops.__version__
    except Exception:  # pragma: no cover
        return "?"


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
              min_runs: int, max_runs: int, time_budget: float, bar: _Progress) -> dict:
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
        _sync(dev)
        t0 = time.perf_counter()
        outs[p] = fns[p](x)
        _sync(dev)
        first[p] = time.perf_counter() - t0
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
        ts = time_adaptive(lambda: fn(x), dev, min_runs, max_runs, time_budget)
        timings[p] = {"median_s": statistics.median(ts), "runs": len(ts), "min_s": min(ts),
                      "max_s": max(ts), "first_call_s": first[p]}
        bar.step()
    if "moeops" in timings:
        m = timings["moeops"]["median_s"]
        for p, r in timings.items():
            r["moeops_speedup"] = r["median_s"] / m
    return {
        "model": c.model, "dtype": c.dtype, "tokens": c.tokens,
        "E": s["E"], "K": s["K"], "H": s["H"], "I": s["I"], "I_shared": s["I_shared"],
        "shared_expert": bool(s["I_shared"]),
        "unique_experts": x["unique_experts"], "bytes": cost["bytes"], "flops": cost["flops"],
        "check_reference": ref_name or "reference (untimed)",
        "rel_err": errors, "tolerance": {p: tolerance(c.dtype, p) for p in errors},
        "failed": failed, "ok": not failed, "results": timings,
        "other_cpu_load": meter.others(),
    }


# ----------------------------------------------------------------------------- output

_SHORT = {"moeops": "moeops", "moeops-mma": "mma", "moeops-sm90": "sm90", "triton": "triton",
          "reference": "ref", "eager": "eager", "grouped_mm": "grouped", "batched_mm": "batched"}


def _ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def format_experts_bench(r: dict) -> str:
    """The terminal table of a :func:`run_experts_bench` result."""
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
        + ("; GPU time from CUDA events, L2 cache flushed before every call." if str(r.get("device", "")).startswith("cuda")
           else "."),
        "xPEER: PEER's time / moeops' time (>1: moeops is faster). exp: distinct experts the "
        "random routing touches.",
    ]
    if any(p in GEMM_PATH_PEERS for p in peers):
        lines.append("mma, sm90: moeops' CUDA layer with its grouped GEMMs forced onto the mma.sync "
                     "/ CUTLASS sm_90a kernel (moeops: auto's choice).")
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
