"""pytest-benchmark suite: one MoE experts layer, moeops.fused_experts vs Hugging Face
transformers' experts implementations (eager, grouped_mm, batched_mm) and the torch reference,
on real model shapes (``shapes.py``). The same cases as ``moeops bench`` (the experts suite).

Run: ``python -m pytest bench/test_bench_experts.py -q --benchmark-only
--benchmark-group-by=param:layer,param:tokens --benchmark-columns=median,rounds``.

Small T only by default; environment variables widen it (comma-separated lists):
``MOEOPS_BENCH_TOKENS`` (default 1,4; the full set is 1,4,16,64,256,1024),
``MOEOPS_BENCH_MODELS`` (default all five), ``MOEOPS_BENCH_DTYPES`` (fp32,bf16),
``MOEOPS_BENCH_PEERS`` (moeops,reference,eager,grouped_mm,batched_mm; triton needs CUDA),
``MOEOPS_BENCH_BACKEND`` (fused_experts backend for "moeops": auto, cpp or reference).
Each layer is built once (the real HF module, random weights; Mixtral's fp32 layer is 5.6 GB) and
freed before the next. Correctness is checked once per case before timing; extra_info records the
case, the distinct experts touched, bytes, FLOPs and the fraction of the machine limit (bandwidth
and fp32 GEMM rate measured once per session). Nothing here asserts on time.
"""

import os

import pytest
import torch

from moeops import bench_experts as be

from shapes import EXPERTS_DTYPES, EXPERTS_MODELS, EXPERTS_TOKENS_SMALL, MODELS


def _env_list(name, default, kind=str):
    v = os.environ.get(name)
    return [kind(x) for x in v.replace(",", " ").split()] if v else list(default)


TOKENS = _env_list("MOEOPS_BENCH_TOKENS", EXPERTS_TOKENS_SMALL, int)
MODEL_NAMES = _env_list("MOEOPS_BENCH_MODELS", EXPERTS_MODELS)
DTYPE_NAMES = _env_list("MOEOPS_BENCH_DTYPES", EXPERTS_DTYPES)
PEER_NAMES = _env_list("MOEOPS_BENCH_PEERS", be.default_peers("cpu"))
BACKEND = os.environ.get("MOEOPS_BENCH_BACKEND", "auto")
LAYER_PARAMS = [f"{m}:{d}" for m in MODEL_NAMES for d in DTYPE_NAMES]


def test_shapes_agree_with_moeops_bench():
    """bench/shapes.py and the installed benchmark's own table describe the same layers (the
    GPU-only ones, too big for this CPU suite, are checked against MODELS as well)."""
    assert set(EXPERTS_MODELS) == set(be.LAYERS) - be.GPU_ONLY
    for name in be.LAYERS:
        want = {k: MODELS[name].get(k, 0) for k in ("E", "K", "H", "I", "I_shared")}
        assert want == {k: be.LAYERS[name][k] for k in want}, name


@pytest.fixture(scope="session")
def machine():
    return be.measure_machine("cpu")


@pytest.fixture(scope="session")
def moeops_backend():
    return be.moeops_backend_for("cpu", BACKEND)


@pytest.fixture(scope="module", params=LAYER_PARAMS)
def layer(request):
    model, dtype = request.param.split(":")
    lay = be.Layer(model, dtype, "cpu")
    lay.checked = {}  # tokens -> (inputs, reference output)
    yield lay
    del lay.checked


@pytest.mark.parametrize("impl", PEER_NAMES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_experts(benchmark, layer, tokens, impl, machine, moeops_backend):
    if impl == "batched_mm" and tokens > 4:
        pytest.skip("HF batched_mm copies the weights of every routed token: tiny T only")
    backend, note = moeops_backend
    with torch.inference_mode():
        if tokens not in layer.checked:
            layer.checked.clear()
            x = layer.inputs(tokens)
            layer.checked[tokens] = (x, layer.peer_fn("reference")(x))
        x, ref = layer.checked[tokens]
        fn = layer.peer_fn(impl, backend)
        err = be.rel_err(fn(x), ref)
        assert err <= be.tolerance(layer.dtype, impl), f"{impl}: max rel err {err:.2e}"
        cost = be.layer_cost(layer.model, layer.dtype, tokens, x["unique_experts"])
        benchmark.extra_info.update(
            model=layer.model, dtype=layer.dtype, tokens=tokens, impl=impl,
            moeops_backend=backend if impl == "moeops" else None, note=note or None,
            shared_expert=bool(layer.shape["I_shared"]), unique_experts=x["unique_experts"],
            rel_err=err, threads=torch.get_num_threads(),
            bandwidth=machine["bandwidth"], gemm_flops=machine["gemm_flops"], **cost)
        benchmark(fn, x)
    if not getattr(benchmark, "stats", None):  # --benchmark-disable
        return
    med = benchmark.stats.stats.median
    t_bw = cost["bytes"] / machine["bandwidth"]
    t_gemm = cost["flops"] / machine["gemm_flops"]
    benchmark.extra_info.update(frac_bw=t_bw / med, frac_gemm=t_gemm / med,
                                frac_limit=max(t_bw, t_gemm) / med,
                                bound="bw" if t_bw >= t_gemm else "gemm")
