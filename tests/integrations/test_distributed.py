"""Expert parallelism (moeops.distributed) over gloo on 127.0.0.1.

Each launch starts W rank processes of tests/integrations/ep_worker.py (one CPU thread each),
which run every scenario of a suite and compare against the single-process layer computed from
the same seeds.
A launch has a deadline; on a timeout or a failed rank every process is killed. There is one
launch per world size (W=2 with the Hugging Face suite too, W=3), shared by the tests of this
module; each scenario is its own test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import moeops
from moeops.distributed import ExpertPlacement, shard_state_dict

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "ep_worker.py")
TOL = 1e-5  # fp32: max |a - b| / (1 + |b|)
LAUNCH_TIMEOUT_S = 150  # per launch; ~15-30 s on a loaded 2-core machine

pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(suites: str, world: int, tmp_path) -> list[dict]:
    """Run ``world`` ranks of the worker; returns each rank's results. Kills every rank it
    started if one fails or the deadline passes."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(moeops.__path__[0]), HERE,
                                           os.environ.get("PYTHONPATH", "")]))
    procs, logs = [], []
    try:
        for r in range(world):
            log = open(tmp_path / f"rank{r}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, WORKER, suites, str(tmp_path)],
                                          env=dict(env, RANK=str(r)), stdout=log,
                                          stderr=subprocess.STDOUT))
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    out = []
    for r, p in enumerate(procs):
        logs[r].seek(0)
        text = logs[r].read()
        logs[r].close()
        path = tmp_path / f"rank{r}.json"
        if p.returncode != 0 or not path.exists():
            pytest.fail(f"{suites} W={world}: rank {r} exited with {p.returncode} "
                        f"(killed if still running after {LAUNCH_TIMEOUT_S} s); log tail:\n"
                        f"{text[-3000:]}")
        out.append(json.loads(path.read_text()))
    return out


def _hf_ok() -> str | None:
    try:
        from moeops.integrations import hf
        if hf.transformers_major() < 5:
            return "expert parallelism patches transformers 5.x models (stacked experts)"
    except ImportError:
        return "transformers is not installed"
    return None


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """One launch per world size, run on first use: W=2 runs the layer and Hugging Face suites
    (one process start for both), W=3 the layer suite."""
    cache = {}

    def get(world):
        if world not in cache:
            suites = "layer,hf" if world == 2 and _hf_ok() is None else "layer"
            try:
                cache[world] = launch(suites, world, tmp_path_factory.mktemp(f"ep_w{world}"))
            except BaseException as e:  # pytest.fail: fail the other tests too, don't relaunch
                cache[world] = e
        if isinstance(cache[world], BaseException):
            raise cache[world]
        return cache[world]
    return get


@pytest.fixture(params=[2, 3], ids=lambda w: f"W{w}")
def layer_results(request, launches):
    return request.param, launches(request.param)


@pytest.fixture
def hf_results(launches):
    reason = _hf_ok()
    if reason:
        pytest.skip(reason)
    return launches(2)


LAYER_SCENARIOS = ["contiguous", "uneven_bias_gain", "user_map", "masked_drop",
                   "masked_drop_renorm", "no_tokens_rank1", "only_rank0_experts",
                   "sigmoid_grouped", "bf16", "hidden_without_grad", "bf16_fp32_return"]


@pytest.mark.parametrize("name", LAYER_SCENARIOS)
def test_layer_matches_single_process(layer_results, name):
    """Outputs (with and without grad mode, with sync_phases timing) and gradients of hidden,
    every expert tensor and the router equal the single-process layer's on every rank."""
    world, ranks = layer_results
    bf16 = name.startswith("bf16")
    tol = 1e-2 if bf16 else TOL  # bf16: one rounding of the output
    for r, res in enumerate(ranks):
        got = res[name]
        assert "error" not in got, f"rank {r}: {got.get('error')}"
        for key, val in got.items():
            if key.startswith(("out", "grad_")):
                # bf16 gradients: the backward replays in fp32 and rounds once per tensor
                limit = 5e-2 if bf16 and key.startswith("grad") else tol
                assert val <= limit, f"W={world} rank {r} {name}: {key} differs by {val}"
        assert got["phases"] == sorted(moeops.distributed.PHASES), got["phases"]
        # one row per (token, rank holding any of its experts); empty slots are never sent
        assert got["rows_sent"] == got["token_rank_pairs"] <= got["nonempty_slots"], (r, got)
    total_sent = sum(res[name]["rows_sent"] for res in ranks)
    total_recv = sum(res[name]["rows_received"] for res in ranks)
    assert total_sent == total_recv


def test_placement_shapes_in_launch(layer_results):
    world, ranks = layer_results
    got = [res["contiguous"]["local_experts"] for res in ranks]
    assert got == [ExpertPlacement.contiguous(8, world).local_experts(r) for r in range(world)]
    assert sorted(e for ids in got for e in ids) == list(range(8))
    # the user map leaves the last rank without experts
    assert ranks[-1]["user_map"]["local_experts"] == []


def test_ranks_without_tokens_or_rows(layer_results):
    world, ranks = layer_results
    assert ranks[1]["no_tokens_rank1"]["rows_sent"] == 0
    assert ranks[1]["no_tokens_rank1"]["rows_received"] > 0  # it still serves its experts
    for r in range(1, world):
        assert ranks[r]["only_rank0_experts"]["rows_received"] == 0
    assert ranks[0]["only_rank0_experts"]["rows_received"] == sum(
        res["only_rank0_experts"]["token_rank_pairs"] for res in ranks)
    # masks: some tokens of drop_renorm have every slot empty, so fewer rows than T*K
    assert ranks[0]["masked_drop_renorm"]["nonempty_slots"] < 4 * 3


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3"])
def test_hf_generation_identical(hf_results, family):
    """moeops.patch(model, ep_group=...) on 2 ranks: the same greedy tokens as the unpatched
    model and as moeops.patch without expert parallelism, each rank with its own prompts; the
    same logits and the same gradients of a training step."""
    for r, res in enumerate(hf_results):
        got = res[family]
        assert "error" not in got, f"rank {r}: {got.get('error')}"
        assert got["new_tokens"] == 6
        assert got["same_as_moeops"], (r, got)
        assert got["same_as_hf"], (r, got)
        assert got["logits"] <= TOL, (r, got)
        # one training step: every parameter's gradient (expert shards: summed over ranks)
        assert got["grads"] <= TOL, (r, got)
        # every MoE layer's gate_up_proj and down_proj
        assert got["expert_grads_checked"] == 2 * got["moe_layers"] == 4
        assert got["params_ep"] < got["params_full"]  # only local experts kept
        assert got["unpatch_refused"]
        # load_pretrained_expert_parallel: same tokens, and only local experts' tensors read
        # (E experts x 3 projections x 2 MoE layers in the checkpoint, map e -> (e + 1) % 2)
        E = got["num_experts"]
        assert got["loaded_same"], (r, got)
        assert got["loaded_local"] == [[e for e in range(E) if (e + 1) % 2 == r]] * 2
        assert got["load"]["expert_tensors_read"] == E // 2 * 3 * 2
        assert got["load"]["expert_tensors_skipped"] == E // 2 * 3 * 2
    # the two ranks together hold every expert exactly once; nothing else changed size
    full = hf_results[0][family]["expert_params_full"]
    assert sum(res[family]["expert_params_ep"] for res in hf_results) == full
    for res in hf_results:
        got = res[family]
        assert got["params_full"] - got["params_ep"] == full - got["expert_params_ep"]

# ----------------------------------------------------------------------------- in-process

def test_placement_contiguous_and_uneven():
    p = ExpertPlacement.contiguous(7, 3)
    assert [p.local_experts(r) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert p.experts_per_rank() == [3, 2, 2]
    p = ExpertPlacement.make(4, 2, [1, 0, 1, 0])
    owner, local = p.lookup_tables()
    assert owner.tolist() == [1, 0, 1, 0] and local.tolist() == [0, 0, 1, 1]
    assert ExpertPlacement.contiguous(2, 3).experts_per_rank() == [1, 1, 0]


@pytest.mark.parametrize("bad, match", [
    (dict(num_experts=4, world_size=2, expert_to_rank=[0, 1, 2, 0]), "ranks in"),
    (dict(num_experts=4, world_size=2, expert_to_rank=[0, 1, 1]), "covers 3 experts"),
    (dict(num_experts=0, world_size=2), "num_experts"),
    (dict(num_experts=4, world_size=0), "world_size"),
])
def test_placement_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        ExpertPlacement.make(**bad)


def test_shard_state_dict_tensor_and_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"layer.experts.gate_up_proj": torch.randn(5, 6, 4, generator=g),
          "layer.experts.down_proj": torch.randn(5, 4, 3, generator=g),
          "layer.router.weight": torch.randn(5, 4, generator=g)}
    for e2r, rank in ((None, 1), ([1, 0, 1, 0, 1], 1), ([1, 0, 1, 0, 1], 0)):
        p = ExpertPlacement.make(5, 2, e2r)
        local = p.local_experts(rank)
        got = shard_state_dict(sd, 5, rank=rank, world_size=2, expert_to_rank=e2r)
        assert torch.equal(got["layer.experts.gate_up_proj"],
                           sd["layer.experts.gate_up_proj"][local])
        assert torch.equal(got["layer.experts.down_proj"], sd["layer.experts.down_proj"][local])
        assert got["layer.router.weight"] is sd["layer.router.weight"]  # replicated, untouched
    safetensors = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open
    path = tmp_path / "m.safetensors"
    safetensors.save_file(sd, str(path))
    with safe_open(str(path), "pt") as f:
        for e2r in (None, [1, 0, 1, 0, 1]):
            got = shard_state_dict(f, 5, rank=1, world_size=2, expert_to_rank=e2r)
            local = ExpertPlacement.make(5, 2, e2r).local_experts(1)
            assert torch.equal(got["layer.experts.down_proj"],
                               sd["layer.experts.down_proj"][local])
            assert torch.equal(got["layer.router.weight"], sd["layer.router.weight"])
    with pytest.raises(KeyError, match="missing"):
        shard_state_dict(sd, 5, rank=0, world_size=2, keys=["missing"])


def test_needs_a_group():
    if torch.distributed.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(ValueError, match="init_process_group"):
        moeops.distributed.ep_fused_experts(
            torch.zeros(1, 4), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1),
            torch.zeros(1, 2, 4), torch.zeros(1, 4, 1), ExpertPlacement.contiguous(1, 1))
    with pytest.raises(ValueError, match="expert_to_rank needs ep_group"):
        moeops.patch(torch.nn.Linear(2, 2), expert_to_rank=[0])


@pytest.mark.parametrize("T, R", [(0, 0), (3, 0), (3, 2)])
def test_combine_permute_backward_with_no_rows(T, R):
    """combine/permute backward with T=0 or no rows (every slot empty), as EP ranks see them."""
    H, K = 4, 2
    y = torch.randn(R, H, requires_grad=True)
    w = torch.rand(T, K, requires_grad=True)
    inv = torch.full((T * K,), -1, dtype=torch.int32)
    if R:
        inv[0], inv[3] = 1, 0
    out = moeops.combine(y, w, inv)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    ref_w = torch.zeros(T, K)
    if R:
        ref_w[0, 0] = (y[1] * g[0]).sum()
        ref_w[1, 1] = (y[0] * g[1]).sum()
    torch.testing.assert_close(w.grad, ref_w)
    assert y.grad.shape == (R, H)
    h = torch.randn(T, H, requires_grad=True)
    sc = torch.rand(T * K, requires_grad=True)
    ss = torch.full((R,), -1, dtype=torch.int32)
    if R:
        ss[0], ss[1] = 3, 0
    moeops.permute(h, ss, K, sc).sum().backward()
    ref_sc = torch.zeros(T * K)
    if R:
        ref_sc[3], ref_sc[0] = h[1].sum(), h[0].sum()
    torch.testing.assert_close(sc.grad, ref_sc.detach())


def test_drop_renorm_gradient_finite_when_every_slot_is_dropped():
    """A token whose every slot is dropped (drop_renorm) has zero gradient, not NaN (EP tests
    mask whole tokens)."""
    logits = torch.randn(3, 6, requires_grad=True)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0] = True
    mask[1, :2] = True
    r = moeops.topk_gating(logits, 3, mask=mask, mask_mode="drop_renorm")
    assert (r.ids[0] == -1).all()
    r.weights.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[0] == 0).all()


@pytest.fixture
def world_of_one():
    """A one-rank gloo group in this process (destroyed afterwards)."""
    if torch.distributed.is_initialized():
        pytest.skip("a default process group already exists in this process")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                                         rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def _layer_inputs(E=5, K=2, H=8, I=4, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, H, generator=g), torch.randn(E, 2 * I, H, generator=g) * 0.3,
            torch.randn(E, H, I, generator=g) * 0.3, torch.randn(T, H, generator=g))


def test_one_rank_equals_fused_experts(world_of_one):
    """W=1: every expert local, the exchanges are local copies; same output and gradients."""
    router, w_up, w_down, x = _layer_inputs()
    layer = moeops.distributed.ExpertParallelMoE.from_full(router, w_up, w_down, 2,
                                                           renormalize=True)
    xe = x.clone().requires_grad_(True)
    out = layer(xe.view(2, 3, -1))  # any leading shape
    assert out.shape == (2, 3, 8)
    out.square().sum().backward()
    xr, wu = x.clone().requires_grad_(True), w_up.clone().requires_grad_(True)
    r = moeops.topk_gating(xr @ router.t(), 2, renormalize=True)
    ref = moeops.fused_experts(xr, r.ids, r.weights, wu, w_down)
    ref.square().sum().backward()
    torch.testing.assert_close(out.view(6, 8), ref, rtol=0, atol=0)
    torch.testing.assert_close(xe.grad, xr.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.w_up.grad, wu.grad, rtol=1e-6, atol=1e-6)


def test_ep_errors_name_the_argument(world_of_one):
    from moeops.distributed import ep_fused_experts
    router, w_up, w_down, x = _layer_inputs()
    p1 = ExpertPlacement.contiguous(5, 1)
    ids = torch.zeros(6, 2, dtype=torch.int32)
    w = torch.ones(6, 2)
    with pytest.raises(ValueError, match="placement is for 2 ranks"):
        ep_fused_experts(x, ids, w, w_up, w_down, ExpertPlacement.contiguous(5, 2))
    with pytest.raises(ValueError, match="hidden must be"):
        ep_fused_experts(x[0], ids, w, w_up, w_down, p1)
    with pytest.raises(ValueError, match="ids and weights"):
        ep_fused_experts(x, ids[:3], w, w_up, w_down, p1)
    with pytest.raises(ValueError, match="owns 5 experts"):
        ep_fused_experts(x, ids, w, w_up[:4], w_down, p1)
    with pytest.raises(ValueError, match=r"ids must be in \[-1, 5\)"):
        ep_fused_experts(x, ids + 5, w, w_up, w_down, p1)
    with pytest.raises(ValueError, match="router_weight"):
        moeops.distributed.ExpertParallelMoE(router[:3], w_up, w_down, 2, placement=p1)
    with pytest.raises(ValueError, match="must be stacked per expert"):
        moeops.distributed.ExpertParallelMoE.from_full(router, w_up, w_down[:4], 2)
    with pytest.raises(KeyError, match="w_down"):
        moeops.distributed.ExpertParallelMoE.from_state_dict(
            {"router_weight": router, "w_up": w_up}, 2)


def test_from_state_dict_roundtrip_through_safetensors(world_of_one, tmp_path):
    """A layer's state_dict saved to safetensors and read back lazily gives the same layer."""
    safetensors = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open
    router, w_up, w_down, x = _layer_inputs(seed=1)
    g = torch.Generator().manual_seed(2)
    b_up, b_down = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    layer = moeops.distributed.ExpertParallelMoE.from_full(
        router, w_up, w_down, 2, b_up=b_up, b_down=b_down, scoring="sigmoid",
        gating_bias=torch.randn(5, generator=g))
    safetensors.save_file({"moe." + k: v for k, v in layer.state_dict().items()},
                          str(tmp_path / "l.safetensors"))
    with safe_open(str(tmp_path / "l.safetensors"), "pt") as f:
        again = moeops.distributed.ExpertParallelMoE.from_state_dict(
            f, 2, prefix="moe.", scoring="sigmoid")
    assert torch.equal(again.gating_bias, layer.gating_bias)
    with torch.no_grad():
        torch.testing.assert_close(again(x), layer(x), rtol=0, atol=0)
