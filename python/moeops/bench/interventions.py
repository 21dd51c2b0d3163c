"""Cost of moeops.interventions on one real-shaped MoE layer (``moeops bench --suite
interventions``).

The layer is a Hugging Face Qwen3-MoE sparse block with Qwen3-30B-A3B's shape
(``moeops.models.LAYERS["qwen3-30b-a3b"]``: H=2048, E=128, top-8, expert width 768; random
weights) patched by :func:`moeops.integrations.hf.patch`, fed T tokens. Variants, timed in
interleaved rounds (every round runs each variant once, in a rotating order, so machine noise
hits all of them alike), reported as medians:

* ``off``: statistics and interventions never switched on (the patched forwards check one
  attribute, find None);
* ``off_after_use``: switched on and off again (must be the same code path as ``off``);
* ``counts``, ``weights`` (counts + weight sums), ``probs``, ``outputs``: statistics levels;
* ``drop50``: half of the experts (every other id) masked with ``drop``: their slots are
  emptied and their compute skipped; ``reroute50``: the same mask with ``reroute`` (full
  compute, other experts fill the slots).

The price of the "off" check itself (one ``getattr`` with a default on the router and one on the
experts module) is measured separately with a tight loop and reported per layer call.
"""

from __future__ import annotations

import statistics

import torch

from moeops import interventions as iv
from moeops import models
from moeops._timing import median, time_interleaved, time_loop
from moeops.integrations import hf
from moeops.interventions._state import Stats, states
from moeops.ops import topk_gating

SHAPE = models.LAYERS["qwen3-30b-a3b"]

VARIANTS = ("off", "off_after_use", "counts", "weights", "probs", "outputs", "drop50",
            "reroute50")


def build_layer(dtype: torch.dtype, seed: int = 0):
    """A patched one-layer Qwen3-MoE with Qwen3-30B-A3B's MoE shape; returns (model, block)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    s = SHAPE
    torch.manual_seed(seed)
    # the attention (16 heads, not timed) only makes the one-layer model whole
    cfg = Qwen3MoeConfig(vocab_size=256, hidden_size=s.H, intermediate_size=256,
                         moe_intermediate_size=s.I, num_hidden_layers=1, num_attention_heads=16,
                         num_key_value_heads=s.kv_heads, head_dim=s.head_dim, num_experts=s.E,
                         num_experts_per_tok=s.K, norm_topk_prob=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.gate.weight.normal_(0.0, s.H ** -0.5)
        block.experts.gate_up_proj.normal_(0.0, 0.02)
        block.experts.down_proj.normal_(0.0, 0.02)
    hf.patch(model)
    return model, block


def _setup(model, variant: str, E: int):
    iv.clear_interventions(model)
    iv.disable_stats(model)
    if variant in ("counts", "weights", "probs", "outputs"):
        iv.enable_stats(model, variant)
    elif variant in ("drop50", "reroute50"):
        iv.set_intervention(model, mask=list(range(0, E, 2)), mask_mode=variant[:-2])


def _check_cost(block, n: int = 200_000) -> float:
    """Seconds per layer call spent on the two "is anything on?" checks."""
    r, ex = block.gate, block.experts

    def checks():  # the n checks inline, so no call overhead is counted per check
        for _ in range(n):
            getattr(r, "_moeops_iv", None)
            getattr(ex, "_moeops_iv", None)
    return time_loop(checks, 1, repeats=1, warmup=0)[0] / n


def _loop_median(fn, n: int, repeats: int = 7) -> float:
    """Median over ``repeats`` of the mean time of ``n`` calls of ``fn`` (after one warm-up
    call)."""
    return median(time_loop(fn, n, repeats=repeats, warmup=1))


def _stats_op_cost(model, block, x) -> dict:
    """The work the "counts" and "weights" levels add, timed alone in tight loops: the gating
    kernel with ``return_counts`` vs without, and the accumulator updates."""
    iv.clear_interventions(model)
    iv.disable_stats(model)
    x2 = x.reshape(-1, x.shape[-1])
    logits = torch.nn.functional.linear(x2, block.gate.weight)
    k = int(block.gate.top_k)
    st = states(model)[0]
    # gating without / with return_counts, alternated loop by loop; the added cost is the
    # median of the paired differences (drift on a shared machine cancels)
    plain = lambda: topk_gating(logits, k, renormalize=True)  # noqa: E731
    with_counts = lambda: topk_gating(logits, k, renormalize=True, return_counts=True)  # noqa: E731
    a, b = [], []
    for _ in range(9):
        a.append(_loop_median(plain, 100, repeats=1))
        b.append(_loop_median(with_counts, 100, repeats=1))
    w, ids, _, counts = topk_gating(logits, k, renormalize=True, return_counts=True)
    out = {"gating_s": statistics.median(a), "gating_with_counts_s": statistics.median(b),
           "counts_in_gating_s": statistics.median(y - x for x, y in zip(a, b))}
    for level in ("counts", "weights"):
        st.stats = Stats(level, st.E, st.device)
        out[f"record_{level}_s"] = _loop_median(
            lambda: st.record_routing(ids, w, None, counts, logits), 500)
    st.stats = None
    return out


@torch.no_grad()
def run(tokens: int = 256, dtype: str = "bf16", rounds: int = 15, seed: int = 0) -> dict:
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    model, block = build_layer(dt, seed)
    E = block.experts.down_proj.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, tokens, SHAPE.H, generator=g).to(dt)
    outs = {}
    # warm-up (and the correctness sample of every variant)
    for v in VARIANTS:
        if v == "off_after_use":
            continue
        _setup(model, v, E)
        outs[v] = block(x)
    iv.clear_interventions(model)
    iv.disable_stats(model)
    # the layer states exist now (created by the warm-up), but with nothing on, the attribute
    # the patched forwards check is None: "off" and "off_after_use" run the same code.
    # Rounds in a rotating order, each variant switched on (untimed) before its call.
    times = time_interleaved(
        {v: lambda n: block(x) for v in VARIANTS}, min_rounds=rounds, max_rounds=rounds,
        budget=0.0, warmup=0, rotate=True,
        before=lambda v: _setup(model, "off" if v == "off_after_use" else v, E))
    iv.clear_interventions(model)
    iv.disable_stats(model)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    # paired: each round's time over the same round's "off" time, then the median over rounds
    # (cancels the slow drift of a shared machine better than a ratio of medians)
    paired = {v: statistics.median(t / o for t, o in zip(times[v], times["off"]))
              for v in VARIANTS}
    check = _check_cost(block)
    ops = _stats_op_cost(model, block, x)
    base = med["off"]
    extra = {lvl: max(ops["counts_in_gating_s"], 0.0) + ops[f"record_{lvl}_s"]
             for lvl in ("counts", "weights")}
    return {
        "shape": dict(T=tokens, H=SHAPE.H, E=E, K=SHAPE.K, I=SHAPE.I, dtype=dtype),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "median_s": med,
        "relative_to_off": {v: med[v] / base for v in VARIANTS},
        "paired_relative_to_off": paired,
        "drop50_speedup": med["off"] / med["drop50"],
        "drop50_speedup_paired": 1.0 / paired["drop50"],
        "stats_ops": ops,
        "stats_extra_fraction": {lvl: e / base for lvl, e in extra.items()},
        "off_check_s_per_layer_call": check,
        "off_check_fraction": check / base,
        "stats_outputs_equal": all(torch.equal(outs["off"], outs[v])
                                   for v in ("counts", "weights", "probs", "outputs")),
    }


def format_result(r: dict) -> str:
    s = r["shape"]
    lines = [f"moeops.interventions on a patched Qwen3-MoE block: T={s['T']} H={s['H']} "
             f"E={s['E']} K={s['K']} I={s['I']} {s['dtype']}, {r['threads']} threads, "
             f"medians of {r['rounds']} interleaved rounds",
             f"{'variant':<14} {'median ms':>10} {'vs off':>8} {'paired':>8}"]
    for v, t in r["median_s"].items():
        lines.append(f"{v:<14} {t * 1e3:>10.2f} {r['relative_to_off'][v]:>8.3f} "
                     f"{r['paired_relative_to_off'][v]:>8.3f}")
    lines.append("(vs off: ratio of medians; paired: median over rounds of the round's ratio)")
    lines.append(f"drop 50% of experts: {r['drop50_speedup']:.2f}x faster than unmasked "
                 f"(paired: {r['drop50_speedup_paired']:.2f}x)")
    o = r["stats_ops"]
    lines.append(f"statistics work alone (tight loops): gating {o['gating_s'] * 1e6:.1f} us, with "
                 f"counts {o['gating_with_counts_s'] * 1e6:.1f} us (paired difference "
                 f"{o['counts_in_gating_s'] * 1e6:.1f} us); accumulator updates: counts "
                 f"{o['record_counts_s'] * 1e6:.1f} us, counts+weights "
                 f"{o['record_weights_s'] * 1e6:.1f} us -> extra "
                 f"{100 * r['stats_extra_fraction']['counts']:.4f}% (counts), "
                 f"{100 * r['stats_extra_fraction']['weights']:.4f}% (weights) of the layer")
    lines.append(f"'off' check: {r['off_check_s_per_layer_call'] * 1e9:.0f} ns per layer call = "
                 f"{100 * r['off_check_fraction']:.5f}% of the layer")
    lines.append(f"statistics leave the output bit-identical: {r['stats_outputs_equal']}")
    return "\n".join(lines)
