"""Expert parallelism demo and benchmark: one MoE layer, experts sharded over the ranks.

    torchrun --nproc-per-node 2 examples/ep_demo.py            # demo + correctness check
    torchrun --nproc-per-node 2 examples/ep_demo.py --bench    # tokens/s, time per phase

(with this moeops importable: installed, or ``PYTHONPATH=python`` in a source checkout).

Uses gloo on CPU (``--backend nccl --device cuda`` on GPUs: one GPU per rank). The demo writes
the layer's full weights to a safetensors file on rank 0, then every rank reads only its own
experts' rows from it (``ExpertParallelMoE.from_state_dict`` on ``safe_open``), runs a forward and
a backward on its own tokens, and checks its output and gradients against the single-process
layer. The benchmark generates each rank's experts directly (no full copy anywhere) on a real
layer shape (default Qwen3-30B-A3B: E=128, K=8, H=2048, I=768, bf16) and reports tokens/s and the
split dispatch / experts / combine (of the median step, per rank). See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import moeops
from moeops.distributed import PHASES, ExpertParallelMoE, ExpertPlacement


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", action="store_true", help="benchmark instead of the demo")
    p.add_argument("--backend", default="gloo", help="torch.distributed backend (gloo, nccl)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (rank i uses GPU i)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--experts", type=int, default=None, help="E (demo 10, bench 128)")
    p.add_argument("--top-k", type=int, default=None, help="K (demo 2, bench 8)")
    p.add_argument("--hidden", type=int, default=None, help="H (demo 64, bench 2048)")
    p.add_argument("--intermediate", type=int, default=None, help="I (demo 32, bench 768)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (demo 16, bench 128)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (demo float32, bench bf16)")
    p.add_argument("--repeats", type=int, default=7,
                   help="timed forwards (bench); each rank reports its median step")
    p.add_argument("--fp32-return", action="store_true",
                   help="bench: expert outputs travel back in fp32 (combine_dtype=torch.float32)")
    p.add_argument("--sync-phases", action="store_true",
                   help="bench: barrier before each exchange; waiting for the slowest rank is "
                        "reported as 'wait' instead of inside dispatch/combine")
    p.add_argument("--single", action="store_true",
                   help="bench: also time the single-process layer on rank 0 (all ranks' tokens, "
                        "all experts) for comparison")
    return p.parse_args()


def setup(args):
    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        torch.set_num_threads(args.threads)
        device = torch.device("cpu")
    return rank, world, device


def log(rank, *msg):
    if rank == 0:
        print(*msg, flush=True)


# ----------------------------------------------------------------------------- demo

def demo(args, rank, world, device):
    from safetensors import safe_open
    from safetensors.torch import save_file

    E, K = args.experts or 10, args.top_k or 2
    H, I, T = args.hidden or 64, args.intermediate or 32, args.tokens or 16
    dtype = getattr(torch, args.dtype or "float32")
    # 1. rank 0 writes the single-process layer (all experts) to a checkpoint
    port = os.environ.get("MASTER_PORT", "0")
    path = os.path.join(tempfile.gettempdir(), f"moeops_ep_demo_{port}.safetensors")
    if rank == 0:
        g = torch.Generator().manual_seed(0)
        save_file({"router_weight": torch.randn(E, H, generator=g) * 0.3,
                   "w_up": (torch.randn(E, 2 * I, H, generator=g) * 0.1).to(dtype),
                   "w_down": (torch.randn(E, H, I, generator=g) * 0.1).to(dtype)}, path)
    dist.barrier()
    # 2. every rank reads only its experts' rows (uneven when world does not divide E)
    with safe_open(path, "pt") as f:
        layer = ExpertParallelMoE.from_state_dict(f, K, renormalize=True).to(device)
    print(f"rank {rank}/{world}: experts {layer.local_experts}, w_up {tuple(layer.w_up.shape)}",
          flush=True)
    # 3. forward + backward on this rank's own tokens (a different count per rank)
    g = torch.Generator().manual_seed(100 + rank)
    x = (torch.randn(T + 3 * rank, H, generator=g)).to(dtype).to(device).requires_grad_(True)
    timings = {}
    out = layer(x, timings=timings)
    out.float().square().sum().backward()
    # 4. check against the single-process layer (reads the full checkpoint: check only)
    with safe_open(path, "pt") as f:
        full = {k: f.get_tensor(k).to(device) for k in f.keys()}
    xr = x.detach().clone().requires_grad_(True)
    wu = full["w_up"].clone().requires_grad_(True)
    r = moeops.topk_gating(xr @ full["router_weight"].to(dtype).t(), K, renormalize=True)
    ref = moeops.fused_experts(xr, r.ids, r.weights, wu, full["w_down"])
    ref.float().square().sum().backward()
    # this rank's expert gradient covers every rank's tokens: sum the reference over ranks
    gw = wu.grad.clone()
    dist.all_reduce(gw)
    def err(a, b):  # max |a - b| / (1 + |b|)
        return ((a.float() - b.float()).abs() / (1 + b.float().abs())).max().item() \
            if a.numel() else 0.0

    err_out, err_gx = err(out, ref), err(x.grad, xr.grad)
    err_gw = err(layer.w_up.grad, gw[layer.local_experts])
    print(f"rank {rank}: T={x.shape[0]} sent {timings['rows_sent']} rows, received "
          f"{timings['rows_received']}; max |diff|/(1+|ref|) vs single process: out {err_out:.2e}, "
          f"grad hidden {err_gx:.2e}, grad w_up {err_gw:.2e}", flush=True)
    dist.barrier()
    if rank == 0:
        os.remove(path)
    ok = torch.tensor([max(err_out, err_gx, err_gw) <= (1e-5 if dtype == torch.float32 else 5e-2)])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    log(rank, "OK: expert-parallel layer equals the single-process layer" if ok.item()
        else "MISMATCH")
    return 0 if ok.item() else 1


# ----------------------------------------------------------------------------- bench

def local_expert_weights(placement, rank, H, I, dtype, device):
    """Each expert's weights from its own seed: every rank makes only its own experts."""
    ups, downs = [], []
    for e in placement.local_experts(rank):
        g = torch.Generator().manual_seed(1000 + e)
        ups.append((torch.randn(2 * I, H, generator=g) * 0.02).to(dtype))
        downs.append((torch.randn(H, I, generator=g) * 0.02).to(dtype))
    if not ups:
        return (torch.empty(0, 2 * I, H, dtype=dtype, device=device),
                torch.empty(0, H, I, dtype=dtype, device=device))
    return torch.stack(ups).to(device), torch.stack(downs).to(device)


def bench(args, rank, world, device):
    E, K = args.experts or 128, args.top_k or 8
    H, I, T = args.hidden or 2048, args.intermediate or 768, args.tokens or 128
    dtype = getattr(torch, args.dtype or "bfloat16")
    placement = ExpertPlacement.contiguous(E, world)
    router = torch.randn(E, H, generator=torch.Generator().manual_seed(7)) * 0.05
    w_up, w_down = local_expert_weights(placement, rank, H, I, dtype, device)
    layer = ExpertParallelMoE(router.to(device), w_up, w_down, K, placement=placement,
                              renormalize=True,
                              combine_dtype=torch.float32 if args.fp32_return else None
                              ).requires_grad_(False)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(rank)).to(dtype).to(device)
    steps = []
    with torch.no_grad():
        for i in range(args.repeats + 1):  # the first is a warm-up
            dist.barrier()
            t = {}
            t0 = time.perf_counter()
            layer(x, timings=t, sync_phases=args.sync_phases)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t["total"] = time.perf_counter() - t0
            if i:
                steps.append(t)
    for st in steps:
        st.setdefault("wait", 0.0)
    med = sorted(steps, key=lambda s: s["total"])[len(steps) // 2]  # the median step's split
    every = [None] * world
    dist.all_gather_object(every, med)
    if rank == 0:
        elt = torch.tensor([], dtype=dtype).element_size()
        slowest = max(every, key=lambda m: m["total"])
        print(f"expert parallelism, {world} ranks ({args.backend}, {device.type}, "
              f"{args.threads if device.type == 'cpu' else '-'} thread(s)/rank): E={E} K={K} "
              f"H={H} I={I} {dtype} T={T} tokens/rank, expert outputs back in "
              f"{'fp32' if args.fp32_return else dtype}, median of {args.repeats}", flush=True)
        for r, m in enumerate(every):
            other = m["total"] - sum(m[p] for p in PHASES)
            print(f"  rank {r}: total {m['total'] * 1e3:8.2f} ms = dispatch "
                  f"{m['dispatch'] * 1e3:7.2f} + experts {m['experts'] * 1e3:8.2f} + combine "
                  f"{m['combine'] * 1e3:7.2f} + wait {m['wait'] * 1e3:6.2f} "
                  f"(+ other {other * 1e3:.2f}); "
                  f"rows sent {m['rows_sent']} ({m['rows_sent'] * H * elt / 2**20:.2f} MiB), "
                  f"received {m['rows_received']}", flush=True)
        print(f"  step (slowest rank) {slowest['total'] * 1e3:.2f} ms: "
              f"{world * T / slowest['total']:.0f} tokens/s over {world} ranks", flush=True)
    if args.single:
        dist.barrier()
        if rank == 0:  # every expert, every rank's tokens, in this one process
            full = ExpertPlacement.contiguous(E, 1)
            wu, wd = local_expert_weights(full, 0, H, I, dtype, device)
            xs = torch.cat([torch.randn(T, H, generator=torch.Generator().manual_seed(r))
                            for r in range(world)]).to(dtype).to(device)
            times = []
            with torch.no_grad():
                for i in range(args.repeats + 1):
                    t0 = time.perf_counter()
                    rr = moeops.topk_gating(xs @ router.to(dtype).t(), K, renormalize=True)
                    moeops.fused_experts(xs, rr.ids, rr.weights, wu, wd)
                    if i:
                        times.append(time.perf_counter() - t0)
            s = statistics.median(times)
            print(f"  single process ({torch.get_num_threads()} thread(s)), all {world * T} "
                  f"tokens: {s * 1e3:.2f} ms, {world * T / s:.0f} tokens/s", flush=True)
        dist.barrier()
    return 0


def main():
    args = parse_args()
    rank, world, device = setup(args)
    try:
        rc = bench(args, rank, world, device) if args.bench else demo(args, rank, world, device)
    finally:
        dist.destroy_process_group()
    raise SystemExit(rc)


if __name__ == "__main__":
    main()
