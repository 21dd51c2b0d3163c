"""The one timer of moeops: every benchmark suite, demo, the Triton autotuner and the expert-
parallel phase timings measure time through this module (``docs/design.md``: no other module
defines a timing loop).

* :func:`time_calls`: per-call seconds of one callable with adaptive repeats (or exactly
  ``runs``): wall clock on the CPU; on a GPU the GPU's own time from CUDA events around each
  call, with the L2 cache flushed before every call (as ``triton.testing.do_bench`` measures)
  unless asked not to.
* :func:`time_interleaved`: several callables timed round-robin (one call of each per round,
  optionally in a rotating order), so that a shared machine's drift hits all of them alike and
  their ratios stay comparable; an untimed ``before`` hook runs ahead of every timed call
  (switching a model's state, flushing the CPU caches).
* :func:`time_loop`: the mean time of a call too short to time alone (nanoseconds), from tight
  loops.
* :class:`Laps`: cumulative seconds per named phase of one piece of code (host clock, with a
  device synchronisation at each lap on a GPU).
* :class:`Stopwatch`: seconds since a start, and whether a deadline has passed (a benchmark's
  ``--deadline``, its wall time, a progress line's elapsed seconds).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = ["sync", "median", "time_calls", "time_interleaved", "time_loop",
           "flush_cpu_caches", "Laps", "Stopwatch"]


def sync(device: torch.device | str | None) -> None:
    """Waits for the work queued on ``device`` (a no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median(times: Sequence[float]) -> float:
    """The median of a list of times (``statistics.median``)."""
    return statistics.median(times)


def time_calls(fn: Callable[[], object], device: torch.device | str = "cpu", *,
               min_runs: int = 3, max_runs: int = 30, budget: float = 2.0,
               cap: float | None = None, warmup: int = 0, flush_l2: bool = True,
               runs: int | None = None) -> list[float]:
    """Per-call seconds of ``fn()``, after ``warmup`` untimed calls.

    Runs until ``max_runs`` runs are done, or ``min_runs`` runs are done and ``budget`` seconds
    were spent; never starts a run once ``cap`` seconds (default 3 x ``budget``) were spent, so
    a call taking seconds gets one or two runs, not ``min_runs``. ``runs=n`` gives exactly n
    runs (no budget, no cap), one at a time.

    On the CPU: wall clock around each call. On a CUDA device: the GPU's time for each call
    from CUDA events around it; with ``flush_l2`` the L2 cache is flushed (written, twice its
    size) before every call, and runs are queued in batches of up to 5 with no host round trip
    between them (once a run takes under a tenth of the budget), so the host's launch overhead
    is hidden whenever it is shorter than the flush.
    """
    device = torch.device(device)
    if runs is not None:
        min_runs = max_runs = runs
        budget, cap = 0.0, float("inf")
    for _ in range(warmup):
        fn()
    cap = 3 * budget if cap is None else cap
    if device.type == "cuda":
        return _time_cuda(fn, device, min_runs, max_runs, budget, cap, flush_l2)
    times: list[float] = []
    spent = 0.0
    while len(times) < max_runs and (len(times) < min_runs or spent < budget):
        if times and spent >= cap:
            break
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return times


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """A buffer of twice the GPU's L2 size: zeroing it evicts the L2 cache."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
    return torch.empty(2 * l2 // 4, dtype=torch.int32, device=device)


def _time_cuda(fn, device, min_runs, max_runs, budget, cap, flush_l2) -> list[float]:
    flush = _l2_flush_buffer(device) if flush_l2 else None
    times: list[float] = []
    spent = 0.0
    torch.cuda.synchronize(device)
    while len(times) < max_runs and (len(times) < min_runs or spent < budget):
        if times and spent >= cap:
            break
        # one run first, then batches of up to 5 while a run takes under a tenth of the budget
        n = 1 if not times or times[-1] > budget / 10 else min(5, max_runs - len(times))
        events = []
        for _ in range(n):
            if flush is not None:
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
    return times


def time_interleaved(fns: Mapping[str, Callable[[int], object]], *, min_rounds: int = 7,
                     max_rounds: int = 60, budget: float = 2.0, warmup: int = 2,
                     rotate: bool = False,
                     before: Callable[[str], object] | None = None) -> dict[str, list[float]]:
    """Per-call seconds of each callable in ``fns`` (wall clock; CPU), timed round-robin: each
    round calls every callable once, in the order given or, with ``rotate``, starting one later
    each round. Each callable takes the round number (inputs may rotate with it). Runs
    ``warmup`` untimed rounds, then at least ``min_rounds`` and at most ``max_rounds`` rounds,
    stopping once ``budget`` seconds have passed. ``before(name)`` runs untimed before each
    timed call. Returns ``{name: [seconds per round]}``."""
    names = list(fns)
    for r in range(warmup):
        for name in names:
            fns[name](r)
    out: dict[str, list[float]] = {name: [] for name in names}
    t_end = time.perf_counter() + budget
    n = 0
    while n < max_rounds and (n < min_rounds or time.perf_counter() < t_end):
        order = names[n % len(names):] + names[:n % len(names)] if rotate and names else names
        for name in order:
            if before is not None:
                before(name)
            t0 = time.perf_counter()
            fns[name](n)
            out[name].append(time.perf_counter() - t0)
        n += 1
    return out


def time_loop(fn: Callable[[], object], n: int, repeats: int = 7, warmup: int = 1) -> list[float]:
    """Mean seconds per call of ``fn`` over tight loops of ``n`` calls, one value per repeat
    (for calls too short to time one by one)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t0) / n)
    return out


_FLUSH: torch.Tensor | None = None


def flush_cpu_caches() -> None:
    """Evicts the CPU caches (reads and writes a 128 MiB buffer, more than the L3 of the CPUs
    moeops is measured on), so the next call reads its operands from memory, as a layer of a
    large model does."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.ones(32 * 2**20)
    _FLUSH.add_(1.0)


class Laps:
    """Cumulative seconds per phase: ``lap(name)`` adds the time since the previous lap (or the
    start) to ``timings[name]``. A no-op when ``timings`` is None. On a CUDA ``device`` each lap
    synchronises first, so the phase's GPU work is counted in it."""

    def __init__(self, timings: dict | None, device: torch.device | str | None = None):
        self.timings = timings
        self.device = torch.device(device) if device is not None else None
        self.t = time.perf_counter() if timings is not None else 0.0

    def lap(self, phase: str) -> None:
        if self.timings is None:
            return
        sync(self.device)
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self.t
        self.t = now


class Stopwatch:
    """Seconds since it was made (host clock). ``deadline_s`` (None: none) is what
    :meth:`past_deadline` compares them with."""

    def __init__(self, deadline_s: float | None = None):
        self.deadline_s = deadline_s
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def past_deadline(self) -> bool:
        """True once more than ``deadline_s`` seconds have passed (never without one)."""
        return self.deadline_s is not None and self.elapsed() > self.deadline_s
