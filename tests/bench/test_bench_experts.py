"""moeops bench --suite experts (python/moeops/bench/experts.py, the README's main job): structure,
correctness gating, the table and the implementation choices, on the CPU at a tiny layer shape
built through Hugging Face's real experts module. The machine limits are stubbed (measuring them
takes seconds); nothing here asserts on time."""

import pytest
import torch

from moeops import models
from moeops.bench import experts as be
from moeops.bench import experts_report

pytest.importorskip("transformers", minversion="5",
                    reason="the experts suite needs transformers >= 5")


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(models, "LAYERS", {**models.LAYERS, "tiny": models.LayerShape(
        "tiny", "qwen3_moe", E=4, K=2, H=64, I=32)})
    stub = {"bandwidth": 1e10, "gemm_flops": 1e11, "gemm_flops_bf16": 2e11,
            "bandwidth_kind": "stub", "gemm_kind": "stub"}
    monkeypatch.setattr(be, "measure_machine", lambda device="cpu", **kw: dict(stub))
    return "tiny"


def _run(peers, **kw):
    cases = [be.Case("tiny", "bf16", 5), be.Case("tiny", "fp32", 1)]
    return be.run_experts_bench(cases, peers=peers, device="cpu", min_runs=1, max_runs=2,
                                time_budget=0.0, progress=False, **kw)


def test_suite_runs_and_checks_every_default_peer(tiny):
    peers = be.default_peers("cpu")
    assert "triton" not in peers and not set(be.GEMM_PATH_PEERS) & set(peers)
    r = _run(peers)
    assert r["ok"] and r["suite"] == "experts" and r["settings"]["peers"] == list(peers)
    for c in r["cases"]:
        want = {p for p in peers if p != "batched_mm" or c["tokens"] <= 4}
        assert set(c["results"]) == want
        assert c["bytes"] > 0 and c["flops"] > 0 and c["bound"] in ("bw", "gemm")
        for p, res in c["results"].items():
            assert res["median_s"] > 0 and 1 <= res["runs"] <= 2
            assert res["frac_limit"] == pytest.approx(c["limit_s"] / res["median_s"])
            if p != "reference":
                assert c["rel_err"][p] <= be.tolerance(c["dtype"], p)
    table = experts_report.format_experts_bench(r)
    assert "xgrouped" in table and "all ok" in table and "mma, sm90" not in table


def test_a_wrong_implementation_fails_the_case(tiny, monkeypatch):
    real = be.Layer.moeops_fn

    def off_by_a_bit(self, backend):
        fn = real(self, backend)
        return lambda x: fn(x) * 1.5 if backend != "reference" else fn(x)
    monkeypatch.setattr(be.Layer, "moeops_fn", off_by_a_bit)
    r = _run(["moeops", "reference"])
    assert not r["ok"] and all(c["failed"] == ["moeops"] for c in r["cases"])
    assert "FAIL: moeops" in experts_report.format_experts_bench(r)


def test_gemm_path_implementations_are_cuda_only_and_named_only(tiny):
    assert set(be.GEMM_PATH_PEERS) <= set(be.PEERS)
    with pytest.raises(ValueError, match="moeops-mma.*--device cuda"):
        _run(["moeops", "moeops-mma"])
    with pytest.raises(ValueError, match="moeops-sm90"):
        _run(["moeops-sm90"])
    with pytest.raises(ValueError, match="unknown implementation 'mma'"):
        _run(["mma"])
    if torch.cuda.is_available():
        assert not set(be.GEMM_PATH_PEERS) & set(be.default_peers("cuda"))


def test_table_has_columns_for_the_gemm_path_implementations(tiny):
    r = _run(["moeops", "reference"])  # then dressed as a GPU run with a forced path as well
    r["settings"]["peers"] = ["moeops", "moeops-mma", "reference"]
    for c in r["cases"]:
        c["results"]["moeops-mma"] = dict(c["results"]["moeops"], moeops_speedup=1.25)
    table = experts_report.format_experts_bench(r)
    assert "xmma" in table and "1.25x" in table and "mma, sm90: moeops' CUDA layer" in table


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gemm_path_implementations_run_on_a_gpu(tiny):
    import moeops
    if not moeops._C.with_cuda:
        pytest.skip("moeops built without CUDA kernels")
    peers = ["moeops", "moeops-mma"]
    if moeops._C.sm90_grouped_gemm and torch.cuda.get_device_capability()[0] == 9:
        peers.append("moeops-sm90")
    cases = [be.Case("tiny", "bf16", t) for t in (5, 200)]
    r = be.run_experts_bench(cases, peers=peers + ["reference"], device="cuda", min_runs=1,
                             max_runs=2, time_budget=0.0, progress=False)
    assert r["ok"], experts_report.format_experts_bench(r)
    assert all(set(peers) <= set(c["results"]) for c in r["cases"])
    assert "mma, sm90" in experts_report.format_experts_bench(r)


def test_deadline_stops_starting_cases_and_names_them(tiny):
    """A deadline already past: no case runs, each is named in not_run and in a note, and the
    table still prints (what gpu_check.sh relies on when it caps a benchmark step)."""
    r = _run(["moeops"], deadline_s=0.0)
    assert r["cases"] == [] and r["not_run"] == ["tiny bf16 T=5", "tiny fp32 T=1"]
    assert any("deadline of 0 s reached: 2 case(s) not run" in n for n in r["notes"])
    assert "deadline" in experts_report.format_experts_bench(r)
    r = _run(["moeops"], deadline_s=1e9)
    assert len(r["cases"]) == 2 and r["not_run"] == []
