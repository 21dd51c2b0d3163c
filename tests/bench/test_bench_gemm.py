"""moeops bench --suite gemm (python/moeops/bench/gemm.py): structure, correctness gating and
the table, on the CPU at a tiny layer shape; and the run-count rules of the benchmarks' timing
helper (moeops._timing.time_calls). Nothing here asserts on time."""

import subprocess
import sys
import time

import pytest
import torch

from moeops import models
from moeops._timing import time_calls
from moeops.bench import gemm as bg


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(models, "LAYERS", {**models.LAYERS, "tiny": models.LayerShape(
        "tiny", "qwen3_moe", E=4, K=2, H=64, I=32)})
    return "tiny"


def _run(**kw):
    return bg.run_gemm_bench(models=["tiny"], tokens=[5, 40], dtype="bf16", device="cpu",
                             min_runs=1, max_runs=2, time_budget=0.0, **kw)


def test_routed_offsets_are_uniform_top_k():
    off = bg.routed_offsets(100, 8, 2, seed=1)
    assert off.dtype == torch.int32 and off.shape == (9,)
    assert off[0] == 0 and off[-1] == 200 and bool((off[1:] >= off[:-1]).all())
    assert torch.equal(off, bg.routed_offsets(100, 8, 2, seed=1))


def test_gemm_dims():
    assert bg.gemm_dims("qwen3-30b-a3b", "up") == (128, 8, 1536, 2048)
    assert bg.gemm_dims("qwen3-30b-a3b", "down") == (128, 8, 2048, 768)
    with pytest.raises(ValueError, match="projection"):
        bg.gemm_dims("qwen3-30b-a3b", "gate")


def test_suite_runs_and_checks_every_peer(tiny):
    r = _run()
    assert r["ok"] and r["suite"] == "gemm"
    assert {"moeops", "torch", "dense"} <= set(r["peers"])
    assert "triton" not in r["peers"]  # CUDA only
    assert len(r["cases"]) == 2 * 2  # 2 projections x 2 token counts
    for c in r["cases"]:
        assert c["rows"] == c["tokens"] * 2 and c["flops"] == 2 * c["rows"] * c["N"] * c["K"]
        for p in r["peers"]:
            res = c["results"][p]
            assert res["median_s"] > 0 and res["flops_per_s"] > 0
            assert (res["rel_err"] is None) == (p == "dense")
            if p != "dense":
                assert res["rel_err"] <= bg.TOLERANCE["bf16"]
        assert c["results"]["torch"]["vs_torch"] == 1.0
    table = bg.format_gemm_bench(r)
    assert "x torch" in table and "all implementations match" in table


def test_opt_in_peers_run_only_when_named(tiny, monkeypatch):
    """triton-tuned (autotuning compiles and times every candidate) is left out of the default
    peers even where it could run; named in --peers it runs, and its choices are reported."""
    monkeypatch.setattr(bg, "available_peers", lambda dev: ["moeops", "triton-tuned", "dense"])
    real = bg._peer_fn
    monkeypatch.setattr(bg, "_peer_fn",
                        lambda p, x, w, o: real("moeops" if p == "triton-tuned" else p, x, w, o))
    assert "triton-tuned" not in _run()["peers"]
    r = _run(peers=["moeops", "triton-tuned"])
    assert r["peers"] == ["moeops", "triton-tuned"] and r["ok"]
    assert all("median_s" in c["results"]["triton-tuned"] for c in r["cases"])
    r["triton_tuned"] = {"class<=16 rows~2^5 N=64 K=32": [16, 64, 64, 4, 3]}
    assert "autotuner's choices" in bg.format_gemm_bench(r)


def test_a_wrong_implementation_fails_the_run(tiny, monkeypatch):
    real = bg._peer_fn

    def broken(peer, x, w, offsets):
        fn = real(peer, x, w, offsets)
        return (lambda: fn() * 1.1) if peer == "moeops" else fn
    monkeypatch.setattr(bg, "_peer_fn", broken)
    r = _run(peers=["moeops", "torch"])
    assert not r["ok"]
    assert "FAILED checks" in bg.format_gemm_bench(r)


def test_unknown_names_are_rejected(tiny):
    with pytest.raises(ValueError, match="unknown model"):
        bg.run_gemm_bench(models=["nope"], device="cpu")
    with pytest.raises(ValueError, match="unknown implementation"):
        _run(peers=["cublas"])


def test_cli_reports_bad_model():
    p = subprocess.run([sys.executable, "-m", "moeops", "bench", "--suite", "gemm",
                        "--models", "nope"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "unknown model" in p.stderr


def test_time_calls_run_counts_on_the_cpu():
    """min_runs when the budget is spent at once, max_runs when it never is, 1 run past the cap."""
    cpu = torch.device("cpu")
    assert len(time_calls(lambda: None, cpu, min_runs=3, max_runs=7, budget=0.0, cap=1e9)) == 3
    assert len(time_calls(lambda: None, cpu, min_runs=3, max_runs=7, budget=1e9)) == 7
    slow = time_calls(lambda: time.sleep(0.02), cpu, min_runs=3, max_runs=7, budget=0.001,
                      cap=0.001)
    assert len(slow) == 1 and slow[0] > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_time_calls_on_a_gpu_uses_events_and_the_same_run_counts():
    """The GPU path (CUDA events, L2 flush between runs, batched runs) returns one positive time
    per run with the CPU path's run-count rules."""
    dev = torch.device("cuda")
    x = torch.zeros(1 << 20, device=dev)
    ts = time_calls(lambda: x.add_(1), dev, min_runs=3, max_runs=12, budget=1e9)
    assert len(ts) == 12 and all(t > 0 for t in ts)
    assert torch.equal(x, torch.full_like(x, 12))  # every timed run ran once
    assert len(time_calls(lambda: x.add_(1), dev, min_runs=3, max_runs=12, budget=0.0,
                          cap=1e9)) == 3


def test_deadline_stops_starting_cases_and_names_them(tiny):
    r = _run(peers=["moeops"], deadline_s=0.0)
    assert r["cases"] == [] and len(r["not_run"]) == 4  # 2 projections x 2 token counts
    assert "tiny up T=5" in r["not_run"] and any("deadline" in n for n in r["notes"])
    assert "deadline" in bg.format_gemm_bench(r)
    r = _run(peers=["moeops"], deadline_s=1e9)
    assert len(r["cases"]) == 4 and r["not_run"] == []
