"""pytest-benchmark suite: one MoE experts layer, moeops.fused_experts vs Hugging Face
transformers' experts implementations (eager, grouped_mm, batched_mm) and the torch reference,
on real model shapes (``moeops.models.LAYERS``). The same cases as ``moeops bench`` (the experts
suite, :mod:`moeops.bench.experts`, whose layers, inputs, checks and limits this wraps).

Run: ``python -m pytest bench/test_experts_benchmark.py -q --benchmark-only
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

from moeops import models
from moeops.bench import experts as be
from moeops.bench.harness import measure_machine, rel_err

# the models of the experts benchmark: those small enough for a CPU (not gpu_only)
EXPERTS_MODELS = tuple(name for name, s in models.LAYERS.items() if not s.gpu_only)
EXPERTS_TOKENS_SMALL = (1, 4)  # the full set is be.FULL_TOKENS


def _env_list(name, default, kind=str):
    v = os.environ.get(name)
    return [kind(x) for x in v.replace(",", " ").split()] if v else list(default)


TOKENS = _env_list("MOEOPS_BENCH_TOKENS", EXPERTS_TOKENS_SMALL, int)
MODEL_NAMES = _env_list("MOEOPS_BENCH_MODELS", EXPERTS_MODELS)
DTYPE_NAMES = _env_list("MOEOPS_BENCH_DTYPES", be.FULL_DTYPES)
PEER_NAMES = _env_list("MOEOPS_BENCH_PEERS", be.default_peers("cpu"))
BACKEND = os.environ.get("MOEOPS_BENCH_BACKEND", "auto")
LAYER_PARAMS = [f"{m}:{d}" for m in MODEL_NAMES for d in DTYPE_NAMES]


def test_shapes_agree_with_moeops_bench():
    """Every layer of moeops.models.LAYERS (the one table this suite and ``moeops bench`` read)
    names a model family whose config fields map onto the layer's shape, so the experts suite
    can build its real Hugging Face experts module."""
    fields = set(models.LayerShape.__dataclass_fields__)
    for name, s in models.LAYERS.items():
        fam = models.FAMILIES[s.family]
        assert set(fam.shape_fields.values()) <= fields, name
        assert s.I_shared == 0 or "I_shared" in fam.shape_fields.values(), name


@pytest.fixture(scope="session")
def machine():
    return measure_machine("cpu")


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
        err = rel_err(fn(x), ref)
        assert err <= be.tolerance(layer.dtype, impl), f"{impl}: max rel err {err:.2e}"
        cost = be.layer_cost(layer.model, layer.dtype, tokens, x["unique_experts"])
        benchmark.extra_info.update(
            model=layer.model, dtype=layer.dtype, tokens=tokens, impl=impl,
            moeops_backend=backend if impl == "moeops" else None, note=note or None,
            shared_expert=bool(layer.shape.I_shared), unique_experts=x["unique_experts"],
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
