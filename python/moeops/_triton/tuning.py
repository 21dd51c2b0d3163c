"""Block sizes of the Triton grouped GEMM: a default per shape class, and the optional
autotuner that times a class's candidates on the first call of each shape on a GPU.

:func:`set_autotune` / ``MOEOPS_TRITON_AUTOTUNE=1`` turn the autotuner on; :func:`tuned_configs`
lists its choices.
"""

from __future__ import annotations

import os

from moeops._dispatch import triton_interpreting
from moeops._timing import median, time_calls

__all__ = ["CANDIDATES", "CONFIGS", "INTERPRET_CONFIG", "set_autotune", "tuned_configs",
           "autotune_enabled", "shape_class", "pick_config", "tune", "cuda_time_ms"]

# Shape classes: (max average rows per expert, candidate configs), a config being (BLOCK_M,
# BLOCK_N, BLOCK_K, num_warps, num_stages). The first class whose bound is >= R / E applies.
# Without autotuning each class runs its first candidate (starting points chosen without a GPU:
# decode-like shapes, few rows per expert, want a short M tile and wide N/K tiles; prefill-like
# shapes square-ish 64-128 tiles). With autotuning (set_autotune(True) or
# MOEOPS_TRITON_AUTOTUNE=1) the first call of each shape key on a GPU times every candidate
# that compiles and keeps the fastest (tuned_configs()).
CANDIDATES = (
    (16, ((16, 64, 64, 4, 3), (16, 128, 64, 4, 4), (16, 64, 128, 4, 4), (32, 64, 64, 4, 4))),
    (64, ((64, 64, 64, 4, 3), (64, 128, 64, 4, 4), (32, 128, 64, 4, 4), (64, 64, 128, 4, 4))),
    (float("inf"), ((128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                    (128, 128, 64, 4, 4), (64, 128, 64, 4, 4))),
)
# (bound, default config) per class, flattened
CONFIGS = tuple((bound, *cands[0]) for bound, cands in CANDIDATES)
# The interpreter runs every program in numpy: small tiles keep CPU tests quick.
INTERPRET_CONFIG = (16, 32, 32, 1, 1)

_AUTOTUNE: bool | None = None  # None: follow MOEOPS_TRITON_AUTOTUNE
_TUNED: dict = {}


def set_autotune(enabled: bool | None) -> None:
    """Turns the Triton grouped GEMM's autotuner on or off for this process (``None``: follow
    the environment variable ``MOEOPS_TRITON_AUTOTUNE=1``). Tuning happens on the first call of
    each shape key (shape class, rows rounded to a power of two, N, K, dtypes, bias, layout,
    device): every candidate of the class is compiled and timed (median of 5 CUDA-event
    timings), which synchronises with the host once; later calls reuse the choice. Calls made
    while a CUDA graph is being captured never tune (they use a tuned config if there is one,
    else the class default)."""
    global _AUTOTUNE
    _AUTOTUNE = enabled


def tuned_configs() -> dict:
    """The autotuner's choices so far: ``{shape key: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
    num_stages)}``."""
    return dict(_TUNED)


def autotune_enabled() -> bool:
    """Whether the autotuner is on (:func:`set_autotune`, else ``MOEOPS_TRITON_AUTOTUNE``)."""
    if _AUTOTUNE is not None:
        return _AUTOTUNE
    return os.environ.get("MOEOPS_TRITON_AUTOTUNE", "0").lower() in ("1", "true", "on", "yes")


def cuda_time_ms(fn, reps: int = 5) -> float:
    """Median CUDA-event time of ``fn()`` over ``reps`` runs (after the caller's warm-up)."""
    return 1e3 * median(time_calls(fn, "cuda", runs=reps, flush_l2=False))


def tune(key, candidates, launch, timer=cuda_time_ms):
    """The fastest of ``candidates`` for ``key`` by ``timer(lambda: launch(cfg))``, cached in
    _TUNED. A candidate whose compile or launch fails (e.g. too much shared memory for fp32
    operands) is skipped; if none runs, the first candidate is returned uncached so that its
    error surfaces from the real launch."""
    if key in _TUNED:
        return _TUNED[key]
    best = None
    for cfg in candidates:
        try:
            launch(cfg)  # compile and warm up
        except Exception:  # noqa: BLE001 - triton raises several compile/resource error types
            continue
        t = timer(lambda: launch(cfg))
        if best is None or t < best[0]:
            best = (t, cfg)
    if best is None:
        return candidates[0]
    _TUNED[key] = best[1]
    return best[1]


def shape_class(R: int, E: int):
    """(class bound, candidate configs) for R rows over E experts."""
    avg = R / max(E, 1)
    for bound, cands in CANDIDATES:
        if avg <= bound:
            return bound, cands
    return CANDIDATES[-1]


def pick_config(R: int, E: int):
    """The default config for R rows over E experts (small tiles under the interpreter)."""
    if triton_interpreting():
        return INTERPRET_CONFIG
    return shape_class(R, E)[1][0]
