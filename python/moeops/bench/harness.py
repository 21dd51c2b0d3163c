"""What several benchmark suites share: the dtypes by name, the machine's limits measured in
the run (:func:`measure_machine`, :func:`combine_machine`), the load other processes put on the
CPUs (:class:`CpuMeter`, :func:`other_cpu_load`), the CPU's model and ISA (:func:`cpu_info`), a
progress bar, the relative error of the correctness checks, the note of a suite cut by its
deadline, and forcing moeops' CUDA grouped-GEMM path (:func:`gemm_path`).

Timing itself is :mod:`moeops._timing`'s; model shapes are :mod:`moeops.models`'.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from collections.abc import Sequence

import torch

from moeops._timing import Stopwatch, median, time_calls

__all__ = ["DTYPES", "measure_machine", "combine_machine", "CpuMeter", "other_cpu_load",
           "cpu_info", "Progress", "rel_err", "deadline_note", "gemm_path"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- machine limits

def measure_machine(device: str | torch.device = "cpu", repeats: int = 5,
                    nbytes: int = 1 << 30) -> dict:
    """The machine's limits: medians of ``repeats`` runs after one warm-up each (and the best
    runs, for the record). CPU: read bandwidth (bytes/s, torch ``sum`` over ``nbytes`` of fp32)
    and fp32 GEMM rate (FLOP/s, ``torch.mm`` 2048^3). CUDA: copy bandwidth (bytes read +
    written per second, a device-to-device copy of ``nbytes``) and the dense bf16 matmul rate
    (``torch.mm`` 8192^3), the ceilings the GPU targets are stated against."""
    device = torch.device(device)

    def timed(fn) -> list[float]:  # wall clock on the CPU, CUDA events on a GPU
        return time_calls(fn, device, runs=repeats, warmup=1, flush_l2=False)

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
        return {"bandwidth": 2 * nbytes / median(t_copy),
                "bandwidth_best": 2 * nbytes / min(t_copy),
                "gemm_flops": flop / median(t_mm), "gemm_flops_best": flop / min(t_mm),
                "bandwidth_kind": "device copy (read + write)", "gemm_kind": "bf16 mm 8192^3"}
    # distinct values on every page (a page-deduplicating host cannot serve them from cache)
    buf = torch.arange(nbytes // 4, dtype=torch.float32, device=device)
    t_read = timed(lambda buf=buf: buf.sum())
    del buf
    n = 2048
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    c = torch.empty(n, n, device=device)
    t_mm = timed(lambda: torch.mm(a, b, out=c))
    flop = 2 * n ** 3
    out = {"bandwidth": nbytes / median(t_read),
           "bandwidth_best": nbytes / min(t_read),
           "gemm_flops": flop / median(t_mm), "gemm_flops_best": flop / min(t_mm),
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
        out.update(gemm_flops_bf16=flop / median(t16), gemm_flops_bf16_best=flop / min(t16))
    return out


def combine_machine(*ms: dict) -> dict:
    """The limits used for the fractions: the higher of several :func:`measure_machine` medians
    (taken at the start and the end of a run, so one noisy moment does not lower the ceiling)."""
    bf16 = [m["gemm_flops_bf16"] for m in ms if m.get("gemm_flops_bf16")]
    return {"bandwidth": max(m["bandwidth"] for m in ms),
            "gemm_flops": max(m["gemm_flops"] for m in ms),
            **({"gemm_flops_bf16": max(bf16)} if bf16 else {}),
            "bandwidth_method": f"{ms[0]['bandwidth_kind']} of 1 GiB, median of 5, "
                                "higher of start/end",
            "gemm_method": f"{ms[0]['gemm_kind']}, median of 5, higher of start/end",
            "measurements": list(ms)}


# ----------------------------------------------------------------------------- the CPUs

class CpuMeter:
    """Share of all CPUs used by *other* processes between two points of time: /proc/stat's busy
    time minus this process' CPU time. None where /proc/stat is unavailable (non-Linux)."""

    def __init__(self):
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


# ----------------------------------------------------------------------------- reporting

class Progress:
    """tqdm if installed and stderr is a terminal, else one plain line per step on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.bar = None
        self.total, self.n, self.enabled = total, 0, enabled
        self.clock = Stopwatch()  # for the elapsed seconds each plain line shows
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
            print(f"[{self.n}/{self.total} {self.clock.elapsed():6.1f}s] {text}",
                  file=sys.stderr, flush=True)

    def step(self) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (in fp32)."""
    o, r = out.float(), ref.float()
    if not torch.isfinite(o).all():
        return float("inf")
    return (o - r).abs().max().item() / max(r.abs().max().item(), 1e-30)


def deadline_note(deadline_s: float, not_run: Sequence[str]) -> str:
    """The note a suite adds when its ``deadline_s`` left the cases ``not_run`` unstarted."""
    return (f"deadline of {deadline_s:g} s reached: {len(not_run)} case(s) not run "
            f"({', '.join(not_run)})")


# ----------------------------------------------------------------------------- CUDA GEMM path

@contextlib.contextmanager
def gemm_path(path: str):
    """Runs the body with moeops' CUDA grouped GEMMs on ``path`` ("auto", "mma" or "sm90";
    ``moeops._C.set_cuda_gemm_path``), back to "auto" after. A no-op in builds without CUDA."""
    from moeops import _C
    setter = getattr(_C, "set_cuda_gemm_path", None)
    if setter is not None:
        setter(path)
    try:
        yield
    finally:
        if setter is not None:
            setter("auto")
