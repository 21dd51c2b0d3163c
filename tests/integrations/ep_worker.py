"""One rank of the expert-parallel tests (tests/integrations/test_distributed.py launches W of
these).

``python tests/integrations/ep_worker.py SUITES OUT_DIR`` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in the environment. Runs every scenario of SUITES (``layer``, ``hf`` or ``layer,hf``)
on a gloo group and writes ``OUT_DIR/rank{r}.json``: per scenario, the largest differences from the
single-process result (computed on every rank from the same seeds, over the tokens of all
ranks) or an error.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

# tests/ (for the shared helpers in tests/support)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import moeops  # noqa: E402
from moeops.distributed import ExpertParallelMoE, ExpertPlacement  # noqa: E402


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / (1 + |b|): relative for large values, absolute for small ones."""
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    return float(((a.double() - b.double()).abs() / (1 + b.double().abs())).max())


# ----------------------------------------------------------------------------- layer scenarios
# name -> config; tokens[r] = tokens of rank r (index by world size - 2 when a list of lists)

def scenarios(world: int) -> dict:
    not_rank0 = "not_rank0"
    return {
        # E divisible by 2, not by 3 (3/3/2); softmax + renormalise, SwiGLU
        "contiguous": dict(E=8, K=2, tokens=[7, 5, 9], renormalize=True),
        # E=7: uneven everywhere; plain relu2 experts with biases and a per-expert gain
        "uneven_bias_gain": dict(E=7, K=3, tokens=[6, 8, 4], gated=False, activation="relu2",
                                 bias=True, gain=True),
        # a user map, non-contiguous, with the last rank owning no expert
        "user_map": dict(E=8, K=2, tokens=[5, 6, 7],
                         expert_to_rank=[(e * 5) % max(world - 1, 1) for e in range(8)]),
        # masks: expert 1 dropped for all tokens, every expert masked for some tokens
        "masked_drop": dict(E=8, K=2, tokens=[9, 6, 5], mask="drop"),
        "masked_drop_renorm": dict(E=6, K=3, tokens=[4, 7, 6], mask="drop_renorm"),
        # rank 1 has no tokens at all
        "no_tokens_rank1": dict(E=8, K=2, tokens=[6, 0, 5]),
        # every token picks rank-0 experts only (others masked, reroute): ranks > 0 get no rows
        "only_rank0_experts": dict(E=8, K=2, tokens=[5, 4, 6], mask=not_rank0),
        # DeepSeek-V3 style gating: sigmoid, selection bias, group-limited, scaling
        "sigmoid_grouped": dict(E=8, K=3, tokens=[6, 5, 7], scoring="sigmoid", n_group=4,
                                topk_group=2, renormalize=True, routed_scaling_factor=2.5,
                                gating_bias=True),
        # bf16 activations/weights; expert outputs return in fp32 (combine_dtype)
        # bf16 with the expert outputs returned in bf16 (the default)
        "bf16": dict(E=8, K=2, tokens=[5, 7, 6], dtype=torch.bfloat16),
        # inputs that do not require grad (only the router and experts do), with a rank that
        # owns no expert: every rank must still run both backward exchanges
        "hidden_without_grad": dict(E=8, K=2, tokens=[6, 5, 4], hidden_grad=False,
                                    expert_to_rank=[(e * 5) % max(world - 1, 1)
                                                    for e in range(8)]),
        "bf16_fp32_return": dict(E=8, K=2, tokens=[8, 6, 7], dtype=torch.bfloat16,
                                 combine_dtype=torch.float32),
    }


def make_inputs(cfg, world, seed):
    g = torch.Generator().manual_seed(seed)
    dtype = cfg.get("dtype", torch.float32)
    E, H, I = cfg["E"], 32, 16
    gated = cfg.get("gated", True)
    n_up = 2 * I if gated else I

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    full = dict(router=rnd(E, H, std=0.3).float(), w_up=rnd(E, n_up, H, std=0.2),
                w_down=rnd(E, H, I, std=0.2))
    if cfg.get("bias"):
        full["b_up"], full["b_down"] = rnd(E, n_up, std=0.1), rnd(E, H, std=0.1)
    if cfg.get("gain"):
        full["gain"] = torch.rand(E, generator=g) + 0.5
        full["gain"][E // 2] = 0.0  # a skipped expert
    if cfg.get("gating_bias"):
        full["gating_bias"] = torch.randn(E, generator=g) * 0.1
    tokens = cfg["tokens"][:world]
    xs = [rnd(t, H) for t in tokens]
    grads = [torch.randn(t, H, generator=g).to(dtype) for t in tokens]
    masks = None
    if cfg.get("mask") == "drop":
        m = torch.zeros(E, dtype=torch.bool)
        m[1] = True
        masks = [(m, "drop")] * world
    elif cfg.get("mask") == "drop_renorm":
        masks = []
        for t in tokens:
            m = torch.rand(t, E, generator=g) < 0.3
            m[::3] = True  # every third token: all experts masked, every slot empty
            masks.append((m, "drop_renorm"))
    return full, xs, grads, masks, tokens


def gating_kwargs(cfg):
    return dict(scoring=cfg.get("scoring", "softmax"), renormalize=cfg.get("renormalize", False),
                routed_scaling_factor=cfg.get("routed_scaling_factor", 1.0),
                n_group=cfg.get("n_group", 1), topk_group=cfg.get("topk_group", 1))


def expert_kwargs(cfg):
    return dict(activation=cfg.get("activation", "silu"), gated=cfg.get("gated", True))


def reference(cfg, full, x, grad_out, mask):
    """The single-process layer over all tokens: router, topk_gating, fused_experts."""
    p = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in full.items()
         if k != "gating_bias"}
    x = x.clone().requires_grad_(True)
    logits = torch.nn.functional.linear(x, p["router"].to(x.dtype))
    m, mode = mask if mask is not None else (None, "reroute")
    r = moeops.topk_gating(logits, cfg["K"], bias=full.get("gating_bias"), mask=m,
                           mask_mode=mode, **gating_kwargs(cfg))
    out = moeops.fused_experts(x, r.ids, r.weights, p["w_up"], p["w_down"], p.get("b_up"),
                               p.get("b_down"), gain=p.get("gain"), **expert_kwargs(cfg))
    (out.float() * grad_out.float()).sum().backward()
    return out.detach(), x.grad, {k: v.grad for k, v in p.items()}


def run_layer_scenario(name, cfg, rank, world, seed):
    full, xs, grads, masks, tokens = make_inputs(cfg, world, seed)
    E = cfg["E"]
    e2r = cfg.get("expert_to_rank")
    mask_cfg = cfg.get("mask")
    placement = ExpertPlacement.make(E, world, e2r)
    if mask_cfg == "not_rank0":  # every expert not on rank 0 is masked (reroute)
        m = torch.tensor([r != 0 for r in placement.expert_to_rank])
        masks = [(m, "reroute")] * world
    # single process, all tokens (the same on every rank)
    x_all, g_all = torch.cat(xs), torch.cat(grads)
    if masks is not None and masks[0][0].dim() == 2:
        mask_all = (torch.cat([m for m, _ in masks]), masks[0][1])
    else:
        mask_all = masks[0] if masks is not None else None
    ref_out, ref_gx, ref_gp = reference(cfg, full, x_all, g_all, mask_all)

    layer = ExpertParallelMoE.from_full(
        full["router"], full["w_up"], full["w_down"], cfg["K"], group=None, expert_to_rank=e2r,
        b_up=full.get("b_up"), b_down=full.get("b_down"), gain=full.get("gain"),
        gating_bias=full.get("gating_bias"), combine_dtype=cfg.get("combine_dtype"),
        **gating_kwargs(cfg), **expert_kwargs(cfg))
    x = xs[rank].clone().requires_grad_(cfg.get("hidden_grad", True))
    m, mode = masks[rank] if masks is not None else (None, "reroute")
    out = layer(x, mask=m, mask_mode=mode)
    (out.float() * grads[rank].float()).sum().backward()
    # outputs without grad mode too (no exchanges recorded)
    with torch.no_grad():
        out_ng = layer(xs[rank], mask=m, mask_mode=mode)

    lo = sum(tokens[:rank])
    sl = slice(lo, lo + tokens[rank])
    local = placement.local_experts(rank)
    res = {"out": maxdiff(out.detach(), ref_out[sl]), "out_no_grad": maxdiff(out_ng, ref_out[sl]),
           "local_experts": local}
    if x.requires_grad:
        res["grad_hidden"] = maxdiff(x.grad, ref_gx[sl])
    for k in ("w_up", "w_down", "b_up", "b_down"):
        param = getattr(layer, k)
        if param is None:
            continue
        ref = ref_gp[k][local] if local else ref_gp[k][:0]
        got = param.grad if param.grad is not None else torch.zeros_like(param)
        res["grad_" + k] = maxdiff(got, ref)
    router_grad = layer.router_weight.grad.clone()
    dist.all_reduce(router_grad)  # replicated router: sum of every rank's tokens
    res["grad_router"] = maxdiff(router_grad, ref_gp["router"])
    # rows this rank sent and received, and the non-empty slots of its tokens
    t = {}
    with torch.no_grad():
        out_sync = layer(xs[rank], mask=m, mask_mode=mode, timings=t, sync_phases=True)
    res["out_sync_phases"] = maxdiff(out_sync, ref_out[sl])
    res["phases"] = sorted(k for k, v in t.items() if isinstance(v, float) and v >= 0)
    with torch.no_grad():
        logits = torch.nn.functional.linear(xs[rank], layer.router_weight.to(xs[rank].dtype))
        r = moeops.topk_gating(logits, cfg["K"], bias=full.get("gating_bias"), mask=m,
                               mask_mode=mode, **gating_kwargs(cfg))
    res["rows_sent"], res["rows_received"] = t["rows_sent"], t["rows_received"]
    res["nonempty_slots"] = int((r.ids >= 0).sum())
    owner = torch.tensor(placement.expert_to_rank)
    res["token_rank_pairs"] = len({(t, int(owner[e])) for t, row in enumerate(r.ids.tolist())
                                   for e in row if e >= 0})
    return res


# ----------------------------------------------------------------------------- HF scenarios

HF_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3")


def run_hf_scenario(family, rank, world, out_dir):
    from moeops.distributed import load_pretrained_expert_parallel
    from support import hf_tiny

    model = hf_tiny.tiny_model(family, seed=3)
    ckpt = os.path.join(out_dir, f"ckpt_{family}")
    if rank == 0:  # hub layout: one tensor per expert and projection
        model.save_pretrained(ckpt)
    # different prompts (and batch sizes) per rank; no early stop, so every rank runs the same
    # number of forwards (each forward is collective)
    ids, mask = hf_tiny.batch(seed=10 + rank, batch_size=1 + rank % 3, seq_len=9 + rank,
                              left_pad=True)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False,
               pad_token_id=hf_tiny.PAD_ID)
    with torch.no_grad():
        ref_hf = model.generate(ids, attention_mask=mask, **gen)
        moeops.patch(model)
        ref_moeops = model.generate(ids, attention_mask=mask, **gen)
        logits_ref = model(ids, attention_mask=mask).logits
    # training: one loss + backward on this rank's batch (moeops, no expert parallelism)
    labels = ids.masked_fill(mask == 0, -100)
    model.zero_grad()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        moeops.unpatch(model)
        full_params = sum(p.numel() for p in model.parameters())
        full_experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        moeops.patch(model, ep_group="world")
        moeops.patch(model, ep_group="world")  # idempotent: shards once
        ep = model.generate(ids, attention_mask=mask, **gen)
        logits_ep = model(ids, attention_mask=mask).logits
    ep_params = sum(p.numel() for p in model.parameters())
    # the same training step with expert parallelism: replicated parameters get this rank's
    # gradient; each expert shard gets the gradient of every rank's tokens (sum over ranks)
    model.zero_grad()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    grad_err, n_expert_grads = 0.0, 0
    for n, p in model.named_parameters():
        ref = ref_grads[n]
        if ".experts." in n:
            dist.all_reduce(ref)
            placement = model.get_submodule(n.rsplit(".", 1)[0])._moeops_ep_shard[0]
            ref = ref[placement.local_experts(rank)]
            n_expert_grads += 1
        grad_err = max(grad_err, maxdiff(p.grad, ref))
    ep_experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    # load the checkpoint straight into an expert-parallel model (a non-contiguous map): each
    # rank reads only its experts' tensors
    dist.barrier()
    experts = [m for m in model.modules() if hasattr(m, "_moeops_ep_shard")]
    E = experts[0]._moeops_ep_shard[0].num_experts
    e2r = [(e + 1) % world for e in range(E)]
    loaded = load_pretrained_expert_parallel(ckpt, expert_to_rank=e2r)
    with torch.no_grad():
        ep_loaded = loaded.generate(ids, attention_mask=mask, **gen)
    unpatch_refused = False
    try:
        moeops.unpatch(model)
    except ValueError:
        unpatch_refused = True
    return {"same_as_hf": bool(torch.equal(ep, ref_hf)),
            "same_as_moeops": bool(torch.equal(ep, ref_moeops)),
            "new_tokens": int(ep.shape[1] - ids.shape[1]),
            "logits": maxdiff(logits_ep, logits_ref), "grads": grad_err,
            "expert_grads_checked": n_expert_grads,
            "params_full": full_params, "params_ep": ep_params,
            "expert_params_full": full_experts, "expert_params_ep": ep_experts,
            "unpatch_refused": unpatch_refused,
            "loaded_same": bool(torch.equal(ep_loaded, ref_hf)), "load": loaded._moeops_ep_load,
            "loaded_local": [m._moeops_ep_shard[0].local_experts(rank)
                             for m in loaded.modules() if hasattr(m, "_moeops_ep_shard")],
            "num_experts": E, "moe_layers": len(experts)}


def main():
    suites, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for suite in suites.split(","):
            if suite == "layer":
                for i, (name, cfg) in enumerate(scenarios(world).items()):
                    try:
                        results[name] = run_layer_scenario(name, cfg, rank, world, seed=100 + i)
                    except Exception:  # report it; a collective mismatch ends in the timeout
                        results[name] = {"error": traceback.format_exc()}
                    dist.barrier()
            elif suite == "hf":
                for family in HF_FAMILIES:
                    try:
                        results[family] = run_hf_scenario(family, rank, world, out_dir)
                    except Exception:
                        results[family] = {"error": traceback.format_exc()}
                    dist.barrier()
            else:
                raise SystemExit(f"unknown suite {suite!r}")
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    # Every rank has its results written: leave together and without tearing the process group
    # or the interpreter down. With 3 gloo ranks on 2 loaded cores one rank was once aborted at
    # exit ("terminate called without an active exception", exit -6) after every collective had
    # completed (CI, 2026-11-29).
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
