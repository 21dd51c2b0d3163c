"""Command line: ``moeops info`` and ``moeops bench``."""

from __future__ import annotations

import argparse
import json


def _bench(args) -> int:
    import torch

    from moeops.benchmark import Shape, format_routing_bench, run_routing_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("moeops bench: --device cuda asked but torch sees no CUDA device")
    shape = Shape(args.tokens, args.experts, args.top_k, args.hidden, args.dtype)
    r = run_routing_bench(shape, args.device, repeats=args.repeats)
    if args.json:
        out = dict(r, shape=vars(shape))
        print(json.dumps(out, indent=2))
    else:
        print(format_routing_bench(r))
    return 0 if r["ids_equal"] else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moeops", description="moeops: MoE kernels for PyTorch")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, build facts, registered ops, backends, CPU features")
    b = sub.add_parser("bench", help="benchmark the routing pipeline against the torch reference")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--tokens", type=int, default=4096)
    b.add_argument("--experts", type=int, default=128)
    b.add_argument("--top-k", type=int, default=8)
    b.add_argument("--hidden", type=int, default=2048)
    b.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    b.add_argument("--repeats", type=int, default=10)
    b.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    b.add_argument("--json", action="store_true", help="print the raw results as JSON")
    args = p.parse_args(argv)
    if args.cmd == "info":
        from moeops.info import main as info_main
        return info_main()
    return _bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
