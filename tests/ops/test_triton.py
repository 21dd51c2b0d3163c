"""Triton backend (``backend="triton"``): grouped_gemm and fused_experts against the reference.

On CPU the kernels run in the Triton interpreter, in a subprocess started with
``TRITON_INTERPRET=1`` (the variable must be set before triton is imported, and other tests may
have imported triton in this process already). The subprocess is this file run as a script: it
runs every case once and prints a JSON verdict per case; each pytest case reads its verdict.
Shapes are small: the interpreter executes every program in numpy. On a CUDA device the same
cases run in-process (``@pytest.mark.cuda``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback
import warnings
import zlib

import pytest
import torch

import moeops
from moeops import reference
from moeops._dispatch import resolve

HAVE_TRITON = importlib.util.find_spec("triton") is not None
NO_TRITON = "triton is not importable (pip install triton)"
OPS = ("topk_gating", "route_plan", "permute", "combine", "grouped_gemm", "fused_experts",
       "fused_experts_list")

# ----------------------------------------------------------------------------- cases

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def _offsets(counts, device):
    off = [0]
    for c in counts:
        off.append(off[-1] + c)
    return torch.tensor(off, dtype=torch.int32, device=device)


# name -> (E, K, N, rows per expert, padding rows)
GG_SHAPES = {
    "mixed": (4, 40, 50, [7, 0, 33, 5], 3),  # empty expert, non-multiple-of-block everything
    "r0": (3, 24, 20, [0, 0, 0], 0),  # R = 0
    "all_empty": (3, 24, 20, [0, 0, 0], 5),  # only padding rows: all zero
    "one_expert": (1, 16, 3, [17], 0),
    "many_experts": (9, 8, 16, [0, 1, 0, 2, 0, 0, 1, 0, 3], 1),  # decode-like
    "k1n1": (2, 1, 1, [3, 2], 1),  # K = N = 1 (triton specializes ints equal to 1)
    "k0": (2, 0, 5, [3, 2], 1),  # K = 0: zero rows
}


def run_grouped_gemm(device, shape, dtype, transposed, wdtype=None, strided=False):
    g = torch.Generator().manual_seed(zlib.crc32(f"{shape}{dtype}{transposed}".encode()))
    E, K, N, counts, pad = GG_SHAPES[shape]
    R = sum(counts) + pad
    x = torch.randn(R, K, generator=g).to(device=device, dtype=DTYPES[dtype])
    wd = DTYPES[wdtype or dtype]
    if strided:  # a non-contiguous view: the kernel takes strides
        w = torch.randn(E, N, K, generator=g).to(device=device, dtype=wd)
        w = w.transpose(1, 2) if transposed else w.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        w = torch.randn(*((E, K, N) if transposed else (E, N, K)), generator=g).to(
            device=device, dtype=wd)
    off = _offsets(counts, device)
    out = moeops.grouped_gemm(x, w, off, w_transposed=transposed, backend="triton")
    ref = reference.grouped_gemm(x, w, off, transposed)
    assert out.dtype == x.dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
    torch.testing.assert_close(out.float(), ref.float(), **_tol(x.dtype))
    assert bool((out[sum(counts):] == 0).all()), "padding rows must be zero"


GG_CASES = (
    [f"gg-{s}-{d}-{'t' if t else 'nt'}" for s in GG_SHAPES for d in ("fp32", "bf16")
     for t in (False, True)]
    + ["gg-mixed-fp16-nt", "gg-mixed-bf16w_fp32-nt", "gg-mixed-fp32-t-strided",
       "gg-mixed-fp32-nt-strided"]
)


def run_gg_case(name, device):
    parts = name.split("-")
    shape, dt, layout = parts[1], parts[2], parts[3]
    wdtype = None
    if "w_" in dt:
        dt, wdtype = dt.split("w_")
    run_grouped_gemm(device, shape, dt, layout == "t", wdtype, strided="strided" in parts)


def run_gpu_configs_case(name, device):
    """Every tile config of the shape-class table (not only the interpreter's small one)."""
    tuning = importlib.import_module("moeops._triton.tuning")
    pick = tuning.pick_config
    try:
        for _, *cfg in tuning.CONFIGS:
            tuning.pick_config = lambda R, E, cfg=tuple(cfg): cfg
            for dt in ("fp32", "bf16"):
                for t in (False, True):
                    run_grouped_gemm(device, "mixed", dt, t)
                    run_grouped_gemm(device, "many_experts", dt, t)
    finally:
        tuning.pick_config = pick


def run_fe_case(name, device):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    opts = set(name.split("-")[1:])
    dtype = torch.bfloat16 if "bf16" in opts else torch.float32
    T = 0 if "t0" in opts else 11
    H, I, E, K = 24, 20, 5, 2
    gated = "plain" not in opts
    act = "relu2" if "plain" in opts else ("gelu" if "gelu" in opts else "silu")
    n_up = 2 * I if gated else I

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device)

    hidden = rnd(T, H).to(dtype)
    logits = rnd(T, E)
    weights, ids = torch.softmax(logits, -1).topk(K, -1)
    ids = ids.to(torch.int32)
    weights = weights.float().contiguous()
    if T:
        ids[:, 1] = torch.where(ids[:, 1] == 3, 2, ids[:, 1])  # expert 3 only in slot 0
        ids[0, 1] = -1  # an empty slot
        ids = torch.where(ids == 4, 1, ids)  # expert 4: no rows
        weights[0, 1] = 0.0
    w_up = rnd(E, n_up, H, scale=0.2).to(dtype)
    w_down = rnd(E, H, I, scale=0.2).to(dtype)
    kw = {}
    if "bias" in opts:
        kw["b_up"] = rnd(E, n_up, scale=0.1)
        kw["b_down"] = rnd(E, H, scale=0.1)
    if "gain" in opts:
        kw["gain"] = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0], device=device)
    if "shared" in opts:
        kw["shared_out"] = rnd(T, H).to(dtype)
        kw["shared_gate"] = torch.sigmoid(rnd(T, 1))
    out = moeops.fused_experts(hidden, ids, weights, w_up, w_down, activation=act, gated=gated,
                               backend="triton", **kw)
    ref = reference.fused_experts(hidden, ids, weights, w_up, w_down, kw.get("b_up"),
                                  kw.get("b_down"), act, gated, kw.get("gain"),
                                  kw.get("shared_out"), kw.get("shared_gate"))
    assert out.dtype == hidden.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), **_tol(dtype))


FE_CASES = ["fe-fp32", "fe-bf16", "fe-fp32-bias-gain", "fe-fp32-plain-gain",
            "fe-bf16-gelu-bias-shared", "fe-fp32-shared", "fe-fp32-t0"]


def run_grad_case(name, device):
    """The Triton path is differentiable with the compiled op's backward formulas."""
    g = torch.Generator().manual_seed(7)
    E, K, N, counts, pad = GG_SHAPES["mixed"]
    x = torch.randn(sum(counts) + pad, K, generator=g).to(device).requires_grad_()
    w = torch.randn(E, N, K, generator=g).to(device).requires_grad_()
    off = _offsets(counts, device)
    go = torch.randn(x.shape[0], N, generator=g).to(device)
    gx, gw = torch.autograd.grad(moeops.grouped_gemm(x, w, off, backend="triton"), (x, w), go)
    rx, rw = torch.autograd.grad(reference.grouped_gemm(x, w, off), (x, w), go)
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4)
    T, H, I = 6, 16, 8
    h = torch.randn(T, H, generator=g).to(device).requires_grad_()
    ids = torch.tensor([[0, 2], [1, -1], [2, 0], [0, 1], [2, 2], [1, 0]], dtype=torch.int32,
                       device=device)
    wt = torch.rand(T, 2, generator=g).to(device).requires_grad_()
    wu = (torch.randn(3, 2 * I, H, generator=g) * 0.3).to(device).requires_grad_()
    wdn = (torch.randn(3, H, I, generator=g) * 0.3).to(device).requires_grad_()
    got = torch.autograd.grad(moeops.fused_experts(h, ids, wt, wu, wdn, backend="triton"),
                              (h, wt, wu, wdn), go[:T, :H])
    want = torch.autograd.grad(reference.fused_experts(h, ids, wt, wu, wdn), (h, wt, wu, wdn),
                               go[:T, :H])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def run_auto_case(name, device):
    """Even with the interpreter on, "auto" never picks Triton for a CPU tensor."""
    t = torch.zeros(1, device=device)
    for op in OPS:
        assert not resolve(op, "auto", t).__module__.startswith("moeops._triton"), op


CASES = {**{c: run_gg_case for c in GG_CASES}, **{c: run_fe_case for c in FE_CASES},
         "grad": run_grad_case, "gg-every-config": run_gpu_configs_case}
CPU_ONLY_CASES = {"auto-cpu-interpreting": run_auto_case}

# ----------------------------------------------------------------------------- CPU: interpreter


@pytest.fixture(scope="module")
def interpreter_verdicts():
    if not HAVE_TRITON:
        pytest.skip(NO_TRITON)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter subprocess failed (rc {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


@pytest.mark.parametrize("case", list(CASES) + list(CPU_ONLY_CASES))
def test_cpu_interpreter(interpreter_verdicts, case):
    assert case in interpreter_verdicts, f"case {case} did not run"
    err = interpreter_verdicts[case]
    if err is not None:
        pytest.fail(f"{case} under TRITON_INTERPRET=1:\n{err}")


# ----------------------------------------------------------------------------- backend choice


@pytest.mark.skipif(not HAVE_TRITON, reason=NO_TRITON)
def test_triton_on_cpu_without_interpreter_explains():
    from moeops._dispatch import triton_interpreting
    if triton_interpreting():
        pytest.skip("this process runs with TRITON_INTERPRET=1")
    x = torch.randn(4, 8)
    w = torch.randn(2, 3, 8)
    off = torch.tensor([0, 2, 4], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="tensor on CPU: Triton kernels need a CUDA device"
                       ".*TRITON_INTERPRET=1"):
        moeops.grouped_gemm(x, w, off, backend="triton")
    with pytest.raises(RuntimeError, match="Triton kernels need a CUDA device"):
        resolve("fused_experts", "triton", x)


def test_triton_op_without_kernel_explains():
    with pytest.raises(RuntimeError, match="has no Triton kernel"):
        moeops.permute(torch.randn(2, 4), torch.tensor([0, 1], dtype=torch.int32), 1,
                       backend="triton")


def test_triton_missing_explains(monkeypatch):
    import importlib.util as iu
    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda n, *a: None if n == "triton" else real(n, *a))
    with pytest.raises(RuntimeError, match="triton is not installed"):
        resolve("grouped_gemm", "triton", torch.zeros(1))


def test_auto_never_picks_triton_on_cpu():
    run_auto_case("auto", "cpu")


class _FakeCuda:
    """Only ``.device`` is read by ``resolve``: lets CPU-only hosts test the CUDA choice."""
    device = torch.device("cuda", 0)


@pytest.mark.skipif(not HAVE_TRITON, reason=NO_TRITON)
@pytest.mark.parametrize("op", OPS)
def test_auto_on_cuda_prefers_compiled_then_triton(monkeypatch, op):
    from moeops import _dispatch
    monkeypatch.setattr(_dispatch, "why_not_cpp", lambda device, op=None: None)
    assert resolve(op, "auto", _FakeCuda()) is getattr(torch.ops.moeops, op)
    monkeypatch.setattr(_dispatch, "why_not_cpp", lambda device, op=None: "no CUDA kernel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference fallback warns (once per reason)
        fn = resolve(op, "auto", _FakeCuda())
    if op in _dispatch.TRITON_OPS:  # no compiled CUDA kernel: Triton, not the slow reference
        assert fn.__module__ == "moeops._triton.grouped_gemm", fn
    else:
        assert fn is getattr(reference, op)


# ----------------------------------------------------------------------------- AOT compile

_TLNAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _compile_for_gpu(xdt, wdt, odt, cfg, has_bias, arch):
    """Compiles the kernel to a cubin for ``arch`` with triton's bundled ptxas: no GPU needed.
    Specialised as a launch on contiguous tensors is: K_STATIC = 0 (the runtime K loop), unit
    inner strides, and 16-divisible pointers, sizes and row strides (what triton's launcher
    infers for such arguments; without these hints the K loop is not software-pipelined)."""
    import inspect

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kernels = importlib.import_module("moeops._triton.kernels")
    kern = kernels.grouped_gemm_kernel
    names = list(inspect.signature(kern.fn).parameters)
    ptrs = {"x_ptr": xdt, "w_ptr": wdt, "out_ptr": odt, "bias_ptr": torch.float32}
    cdt = kernels.TL_DTYPES[xdt] if xdt == wdt else tl.float32
    bm, bn, bk, warps, stages = cfg
    const = dict(HAS_BIAS=has_bias, COMPUTE_DTYPE=cdt, IEEE=cdt == tl.float32, K_STATIC=0,
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, stride_xk=1, stride_wk=1, stride_on=1)
    if has_bias:
        const["stride_bn"] = 1
    sig = {n: "constexpr" if n in const else
           ("*" + _TLNAME[ptrs[n]] if n in ptrs else "*i32") if n.endswith("_ptr") else "i32"
           for n in names}
    div16 = [n for n in names if n not in const and (n.endswith("_ptr") or n in (
        "N", "K", "stride_xm", "stride_we", "stride_wn", "stride_om", "stride_be"))]
    src = ASTSource(fn=kern, signature=sig,
                    constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div16})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps, num_stages=stages))


@pytest.mark.skipif(not HAVE_TRITON, reason=NO_TRITON)
@pytest.mark.parametrize("dtypes", ["bf16", "fp16", "fp32", "bf16x_fp32w"])
def test_kernel_compiles_for_sm90_and_sm80(dtypes):
    """Every config of the shape-class table (and, in bf16, every autotuning candidate) compiles
    to a cubin (catches what the interpreter cannot: layouts, shared memory, dot operand types),
    on hosts without a GPU too."""
    from moeops._dispatch import triton_interpreting
    if triton_interpreting():
        pytest.skip("this process runs with TRITON_INTERPRET=1")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this triton has no ahead-of-time compile API: {e}")
    tuning = importlib.import_module("moeops._triton.tuning")
    if "x" in dtypes:
        xdt, wdt = torch.bfloat16, torch.float32
    else:
        xdt = wdt = DTYPES[dtypes]
    # every class default in both output variants; for bf16 also the autotuner's other candidates
    runs = [(tuple(cfg), i == 0, ((xdt, False), (torch.float32, True)))
            for i, (_, *cfg) in enumerate(tuning.CONFIGS)]
    if dtypes == "bf16":
        runs += [(cfg, False, ((xdt, False),))
                 for _, cands in tuning.CANDIDATES for cfg in cands[1:]]
    for cfg, with_sm80, variants in runs:
        stages = cfg[4]
        for odt, has_bias in variants:
            for arch in (90, 80) if with_sm80 else (90,):
                try:
                    ck = _compile_for_gpu(xdt, wdt, odt, tuple(cfg), has_bias, arch)
                except RuntimeError as e:
                    if "ptxas" in str(e).lower() and "not found" in str(e).lower():
                        pytest.skip(f"no ptxas: {e}")
                    raise
                assert "cubin" in ck.asm, (cfg, odt, arch)
                if arch == 90 and xdt == wdt and xdt != torch.float32 and stages > 1:
                    # 16-bit on Hopper: tensor cores (wgmma from 64-row tiles, mma.sync below)
                    # fed by a cp.async multi-stage pipeline
                    ptx = ck.asm["ptx"]
                    mma = "wgmma.mma_async" if cfg[0] >= 64 else "mma.sync"
                    assert mma in ptx and "cp.async" in ptx, (cfg, odt, mma)


# ----------------------------------------------------------------------------- autotuner


@pytest.mark.skipif(not HAVE_TRITON, reason=NO_TRITON)
def test_autotuner_keeps_the_fastest_candidate_that_runs(monkeypatch):
    tuning = importlib.import_module("moeops._triton.tuning")
    monkeypatch.setattr(tuning, "_TUNED", {})
    cands = ((1,), (2,), (3,), (4,))
    cost = {(1,): 3.0, (2,): 1.0, (3,): 0.5, (4,): 2.0}
    launched = []

    def launch(cfg):
        launched.append(cfg)
        if cfg == (3,):  # fastest on paper, but does not compile (e.g. too much shared memory)
            raise RuntimeError("out of resources")

    timer = lambda fn: (fn(), cost[launched[-1]])[1]  # noqa: E731
    assert tuning.tune("k", cands, launch, timer) == (2,)
    assert tuning.tuned_configs() == {"k": (2,)}
    n = len(launched)
    assert tuning.tune("k", cands, launch, timer) == (2,) and len(launched) == n  # cached
    # nothing runs: the class default comes back, uncached, so the real launch raises
    assert tuning.tune("bad", cands, lambda cfg: (_ for _ in ()).throw(RuntimeError("x")),
                       timer) == (1,)
    assert "bad" not in tuning.tuned_configs()


@pytest.mark.skipif(not HAVE_TRITON, reason=NO_TRITON)
def test_autotuner_switch_follows_the_environment_unless_set(monkeypatch):
    tuning = importlib.import_module("moeops._triton.tuning")
    monkeypatch.setattr(tuning, "_AUTOTUNE", None)
    monkeypatch.delenv("MOEOPS_TRITON_AUTOTUNE", raising=False)
    assert not tuning.autotune_enabled()
    monkeypatch.setenv("MOEOPS_TRITON_AUTOTUNE", "1")
    assert tuning.autotune_enabled()
    tuning.set_autotune(False)
    assert not tuning.autotune_enabled()
    tuning.set_autotune(True)
    monkeypatch.delenv("MOEOPS_TRITON_AUTOTUNE")
    assert tuning.autotune_enabled()
    tuning.set_autotune(None)
    assert not tuning.autotune_enabled()
    # every candidate of a class is a 5-tuple and each class's default is its first candidate
    for (bound, cands), (b2, *default) in zip(tuning.CANDIDATES, tuning.CONFIGS):
        assert bound == b2 and tuple(default) == cands[0] and all(len(c) == 5 for c in cands)


@pytest.mark.cuda
@pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()),
                    reason=f"needs a CUDA GPU and triton "
                           f"(cuda available: {torch.cuda.is_available()})")
def test_autotuned_grouped_gemm_matches_reference_and_skips_tuning_in_graph_capture(monkeypatch):
    tuning = importlib.import_module("moeops._triton.tuning")
    monkeypatch.setattr(tuning, "_TUNED", {})
    monkeypatch.setattr(tuning, "_AUTOTUNE", True)
    g = torch.Generator().manual_seed(5)
    E, K, N = 8, 256, 192
    for R in (40, 3000):  # a decode-like and a prefill-like shape class
        x = torch.randn(R, K, generator=g).to(torch.bfloat16)
        w = (torch.randn(E, N, K, generator=g) * K ** -0.5).to(torch.bfloat16)
        offsets = _offsets([R // E] * E, "cpu")
        got = moeops.grouped_gemm(x.cuda(), w.cuda(), offsets.cuda(), backend="triton")
        want = reference.grouped_gemm(x, w, offsets)
        torch.testing.assert_close(got.cpu().float(), want.float(), **_tol(torch.bfloat16))
    assert len(tuning.tuned_configs()) == 2
    tuned_before = tuning.tuned_configs()
    # a new shape key met during capture is not tuned (no host sync inside the graph)
    x = torch.randn(500, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16)
    offsets = _offsets([500 // E] * E, "cuda")
    tuning.set_autotune(False)
    moeops.grouped_gemm(x, w, offsets, backend="triton")  # compile the default outside
    tuning.set_autotune(True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moeops.grouped_gemm(x, w, offsets, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    assert tuning.tuned_configs() == tuned_before
    torch.testing.assert_close(out.float(), reference.grouped_gemm(x, w, offsets).float(),
                               **_tol(torch.bfloat16))


# ----------------------------------------------------------------------------- CUDA

CUDA_SKIP = f"needs a CUDA GPU and triton (cuda available: {torch.cuda.is_available()}, " \
            f"triton importable: {HAVE_TRITON})"


@pytest.mark.cuda
@pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason=CUDA_SKIP)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda(case):
    CASES[case](case, "cuda")


# ----------------------------------------------------------------------------- subprocess


def _main() -> None:
    from moeops._dispatch import triton_interpreting
    assert triton_interpreting(), "run with TRITON_INTERPRET=1"
    verdicts = {}
    for name, fn in {**CASES, **CPU_ONLY_CASES}.items():
        try:
            fn(name, "cpu")
            verdicts[name] = None
        except Exception:
            verdicts[name] = traceback.format_exc()[-4000:]
    print(json.dumps(verdicts))


if __name__ == "__main__":
    _main()
