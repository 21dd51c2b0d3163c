"""Command line: ``moeops info``, ``moeops bench``, ``moeops profile`` and ``moeops moex-demo``."""

from __future__ import annotations

import argparse
import json
import sys


def _emit(args, result: dict, table) -> None:
    """--json -: the result as JSON on stdout; otherwise the table (``table()``), and the JSON
    written to the --json path when one is given."""
    if args.json == "-":
        print(json.dumps(result, indent=2))
        return
    print(table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def _routing_bench(args) -> int:
    import torch

    from moeops.bench.routing import Shape, format_routing_bench, run_routing_bench

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("moeops bench: --device cuda asked but torch sees no CUDA device")
    tokens = args.tokens[0] if args.tokens else 4096
    shape = Shape(tokens, args.experts, args.top_k, args.hidden, args.dtype)
    r = run_routing_bench(shape, args.device, repeats=args.repeats or 10)
    if args.json is not None:
        text = json.dumps(dict(r, shape=vars(shape)), indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
            print(format_routing_bench(r))
    else:
        print(format_routing_bench(r))
    return 0 if r["ids_equal"] else 1


def _experts_bench(args) -> int:
    import torch

    from moeops.bench import experts as be
    from moeops.bench import experts_report

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("moeops bench: --device cuda asked but torch sees no CUDA device")
    try:
        cases = be.select_cases(args.models, args.tokens, args.dtypes, args.full,
                                device=args.device)
    except ValueError as e:
        raise SystemExit(f"moeops bench: {e}") from None
    if args.plot:  # fail early, not after minutes of measuring
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit(
                "moeops bench: --plot needs matplotlib (pip install matplotlib)") from None
    try:
        r = be.run_experts_bench(
            cases, peers=args.peers or be.default_peers(args.device), device=args.device,
            moeops_backend=args.backend, min_runs=args.min_runs,
            max_runs=args.repeats or 30, time_budget=args.time_budget,
            batched_mm_max_tokens=args.batched_mm_max_tokens, progress=not args.quiet,
            deadline_s=args.deadline)
    except ValueError as e:  # unknown implementation names
        raise SystemExit(f"moeops bench: {e}") from None
    except RuntimeError as e:
        if "moeops bench" in str(e):
            raise SystemExit(str(e)) from None
        raise
    table = experts_report.format_experts_bench(r)
    if args.json == "-":
        print(json.dumps(r, indent=2))
    else:
        print(table)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(r, f, indent=2)
            print(f"results written to {args.json}")
    if args.plot:
        experts_report.plot_experts_bench(r, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr if args.json == "-" else sys.stdout)
    return 0 if r["ok"] else 1


def _bench(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite == "routing":
        return _routing_bench(args)
    if args.suite == "model":
        return _model_bench(args)
    if args.suite == "interventions":
        return _interventions_bench(args)
    if args.suite == "moex":
        return _moex_bench(args)
    if args.suite == "gemm":
        return _gemm_bench(args)
    return _experts_bench(args)


def _gemm_bench(args) -> int:
    from moeops.bench.gemm import format_gemm_bench, run_gemm_bench

    try:
        r = run_gemm_bench(models=args.models, tokens=args.tokens, dtype=args.dtype,
                           peers=args.peers, device=args.device, min_runs=args.min_runs,
                           max_runs=args.repeats or 50, time_budget=args.time_budget,
                           deadline_s=args.deadline,
                           progress=None if args.quiet or args.json == "-" else
                           (lambda line: print(line, file=sys.stderr)))
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"moeops bench --suite gemm: {e}") from None
    _emit(args, r, lambda: format_gemm_bench(r))
    return 0 if r["ok"] else 1


def _moex_bench(args) -> int:
    from moeops.bench.moex import HEADER, format_moex_bench, run_moex_bench

    if args.device != "cpu":
        raise SystemExit("moeops bench --suite moex: CPU only for now")
    if not args.quiet and args.json != "-":
        print(HEADER, file=sys.stderr)
    res = run_moex_bench(tokens=tuple(args.tokens or (1, 4, 16, 64, 256)),
                         densities=tuple(args.densities), budget=args.time_budget,
                         cold=not args.warm,
                         progress=None if args.quiet or args.json == "-" else
                         (lambda line: print(line, file=sys.stderr)))
    _emit(args, res, lambda: format_moex_bench(res))
    return 0 if res["ok"] else 1


def _model_bench(args) -> int:
    from moeops.bench.model import format_model_bench, run_model_bench

    if args.device != "cpu":
        raise SystemExit("moeops bench --suite model: CPU only for now")
    r = run_model_bench(layers=args.layers, dtype=args.dtype if args.dtype != "fp16" else "bf16",
                        prompt=args.tokens[0] if args.tokens else 128,
                        new_tokens=args.new_tokens, runs=args.repeats or 3)
    _emit(args, r, lambda: format_model_bench(r))
    return 0 if r["same_tokens"] else 1


def _interventions_bench(args) -> int:
    from moeops.bench.interventions import format_result, run

    if args.device != "cpu":
        raise SystemExit("moeops bench --suite interventions: CPU only for now")
    r = run(tokens=args.tokens[0] if args.tokens else 256,
            dtype=args.dtype if args.dtype != "fp16" else "bf16", rounds=args.repeats or 15)
    _emit(args, r, lambda: format_result(r))
    return 0 if r["stats_outputs_equal"] else 1


def _csv(kind):
    def parse(s: str):
        try:
            return [kind(v) for v in s.replace(",", " ").split()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list, got {s!r}") from None
    return parse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moeops", description="moeops: MoE kernels for PyTorch")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, build facts, registered ops, backends, CPU features")
    b = sub.add_parser(
        "bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="benchmark moeops against Hugging Face and the torch reference",
        description=(
            "Suite 'experts' (default): moeops.fused_experts vs Hugging Face transformers'\n"
            "experts implementations (eager, grouped_mm; batched_mm for tiny T) and the\n"
            "pure-torch reference on real MoE layer shapes, after one correctness check per\n"
            "case. Reports median times, speedups and the fraction of the machine's limits\n"
            "(read bandwidth, fp32 GEMM rate) measured in the same run. Without case options\n"
            "it runs the built-in default: Qwen3-30B-A3B fp32 T=1,16,256 and bf16 T=1,256,\n"
            "Mixtral-8x7B bf16 T=1 (a few minutes at most on 2 cores).\n\n"
            "Suite 'model': a Qwen3-MoE with Qwen3-30B-A3B's layer shape (--layers, random\n"
            "weights), patched with moeops vs unpatched: prefill and decode tokens/s\n"
            "(--tokens = prompt length, --new-tokens, --dtype bf16|fp32).\n\n"
            "Suite 'gemm': the grouped expert GEMM alone (up and down projections of\n"
            "--models at --tokens, --dtype) vs torch's grouped_mm, moeops' Triton backend and a\n"
            "dense mm of the same FLOPs; TFLOP/s and % of the dense bf16 rate. GPU default:\n"
            "Qwen3-30B-A3B, Mixtral-8x7B, DeepSeek-V3 at T=512,4096,16384.\n\n"
            "Suite 'routing': the routing pipeline (gating -> plan -> permute -> combine) vs\n"
            "the reference on one shape (--tokens N --experts --top-k --hidden --dtype)."))
    b.add_argument("--suite", default="experts",
                   choices=["experts", "gemm", "routing", "model", "interventions", "moex"])
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    b.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="print the raw results as JSON instead of the table, or with PATH "
                        "write them there (and print the table)")
    b.add_argument("--repeats", type=int, default=0,
                   help="routing: timed runs per stage (10); experts: most timed runs per "
                        "implementation and case (30)")
    b.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="experts and gemm suites: start no case after this many seconds and "
                        "report the ones finished (the rest are named in the notes)")
    g = b.add_argument_group("experts suite")
    g.add_argument("--full", action="store_true",
                   help="every model x T in 1,4,16,64,256,1024 x fp32,bf16 (long)")
    g.add_argument("--models", type=_csv(str), default=None,
                   help="comma-separated, from: qwen3-30b-a3b, olmoe-1b-7b, qwen1.5-moe-a2.7b, "
                        "mixtral-8x7b, deepseek-v2-lite (default with other case options: all)")
    g.add_argument("--tokens", type=_csv(int), default=None,
                   help="token counts T, comma-separated (default with other case options: "
                        "1,4,16,64,256,1024); routing suite: one T (4096)")
    g.add_argument("--dtypes", type=_csv(str), default=None,
                   help="fp32,bf16 (default with other case options: both)")
    g.add_argument("--peers", type=_csv(str), default=None,
                   help="implementations to run; experts suite: moeops,triton (CUDA),"
                        "reference,eager,grouped_mm,batched_mm (default: these) and, named "
                        "only, moeops-mma,moeops-sm90 (CUDA: GEMM path forced); gemm suite: "
                        "moeops,moeops-sm90,moeops-mma,triton,torch,dense (default: those "
                        "available) and, named only, triton-tuned")
    g.add_argument("--backend", default="auto", choices=["auto", "cpp", "reference"],
                   help="fused_experts backend timed as 'moeops' (auto falls back to the "
                        "reference, with a note, when the compiled kernel is missing)")
    g.add_argument("--min-runs", type=int, default=3, help="fewest timed runs per implementation")
    g.add_argument("--time-budget", type=float, default=2.0,
                   help="seconds of timed runs per implementation and case after which it stops "
                        "(once --min-runs are done)")
    g.add_argument("--batched-mm-max-tokens", type=int, default=4,
                   help="run HF batched_mm (copies the weights per routed token) only up to this T")
    g.add_argument("--plot", default=None, metavar="OUT.png",
                   help="write speedup and %%-of-limit charts (needs matplotlib)")
    g.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    md = b.add_argument_group("model suite")
    md.add_argument("--layers", type=int, default=2, help="decoder layers of the demo model")
    md.add_argument("--new-tokens", type=int, default=16, help="greedy decode steps")
    mx = b.add_argument_group("moex suite (MoE-X-S sparse vs dense down-projection; --tokens, "
                              "--time-budget also apply)")
    mx.add_argument("--densities", type=_csv(float), default=[0.1, 0.5],
                    help="target ReLU densities, comma-separated (0.1,0.5)")
    mx.add_argument("--warm", action="store_true",
                    help="keep the caches warm (default: flush them before every timed call)")
    r = b.add_argument_group("routing suite")
    r.add_argument("--experts", type=int, default=128)
    r.add_argument("--top-k", type=int, default=8)
    r.add_argument("--hidden", type=int, default=2048)
    r.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    pr = sub.add_parser(
        "profile", help="routing statistics of a model on prompts: JSON + layers x experts heatmap",
        description="Run prompts through a moeops-patched MoE model with statistics on and write "
                    "per layer and expert selection counts/frequencies, weight and probability "
                    "sums, per-class fTRI maps (JSON) and a selection-frequency heatmap (PNG). "
                    "Default: a built-in tiny random Qwen3-MoE and built-in prompts.")
    pr.add_argument("--model-config", default=None, metavar="CONFIG.json",
                    help="Hugging Face config JSON with model_type (random weights)")
    pr.add_argument("--model", default=None, metavar="PATH",
                    help="local Hugging Face checkpoint to load instead (from_pretrained)")
    pr.add_argument("--prompts", default=None, metavar="FILE",
                    help="JSON {class: [prompts]} (prompt = list of ids or string), a JSON list, "
                         "or one prompt per line (default: built-in id prompts)")
    pr.add_argument("--json", default="moeops_profile.json", metavar="PATH")
    pr.add_argument("--png", default="moeops_profile.png", metavar="PATH",
                    help="heatmap path ('' for none; needs matplotlib)")
    pr.add_argument("--top-n", type=int, default=10, help="most distinctive experts per class")
    pr.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    demo = sub.add_parser("moex-demo", help="MoE-X worked example: upcycle a GPT-2-shaped model, "
                          "train briefly, report density / ||z||_0 / sparse speed")
    from moeops.tools import moex_demo
    moex_demo.add_arguments(demo)
    args = p.parse_args(argv)
    if args.cmd == "profile":
        from moeops.tools.profile import main as profile_main
        return profile_main(args)
    if args.cmd == "moex-demo":
        return moex_demo.run_from_args(args)
    if args.cmd == "info":
        from moeops.info import main as info_main
        return info_main()
    return _bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
