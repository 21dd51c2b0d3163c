"""End-to-end model benchmark: a small but real-shaped Hugging Face MoE model, patched with
moeops vs unpatched, prefill and greedy-decode tokens/s (``moeops bench --suite model``).

The model is a Qwen3-MoE with Qwen3-30B-A3B's layer shape (``moeops.models.LAYERS
["qwen3-30b-a3b"]``: H=2048, 32 heads / 4 KV heads of 128, 128 experts of width 768, top-8) but
only a few layers and a small vocabulary, random weights.
"""

from __future__ import annotations

import torch

from moeops import models
from moeops._timing import median, time_calls
from moeops.integrations import hf

SHAPE = models.LAYERS["qwen3-30b-a3b"]


def build_model(layers: int, dtype: torch.dtype, seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    s = SHAPE
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=4096, hidden_size=s.H, intermediate_size=6144,
                         moe_intermediate_size=s.I, num_hidden_layers=layers,
                         num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         head_dim=s.head_dim, num_experts=s.E, num_experts_per_tok=s.K,
                         norm_topk_prob=True, max_position_embeddings=4096, pad_token_id=0,
                         eos_token_id=1, bos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():  # several MoE parameters are created as zeros
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model


def _median_of(fn, runs: int) -> tuple[float, object]:
    """(median seconds of ``runs`` timed calls, the output of the untimed warm-up call before
    them, which is also the correctness sample)."""
    out = fn()
    return median(time_calls(fn, runs=runs)), out


def run_model_bench(layers: int = 2, dtype: str = "bf16", prompt: int = 128, new_tokens: int = 16,
                    runs: int = 3) -> dict:
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    model = build_model(layers, dt)
    ids = torch.randint(3, 4096, (1, prompt), generator=torch.Generator().manual_seed(1))
    gen = dict(max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    res = {"layers": layers, "dtype": dtype, "prompt": prompt, "new_tokens": new_tokens,
           "threads": torch.get_num_threads(),
           "hf_experts_implementation": getattr(model.config, "_experts_implementation", None)}
    for name in ("huggingface", "moeops"):
        if name == "moeops":
            hf.patch(model)
        with torch.no_grad():
            t_pre, logits = _median_of(lambda: model(ids).logits, runs)
            t_gen, out = _median_of(lambda: model.generate(ids, **gen), max(1, runs - 1))
        # decode time = generate minus one prefill (generate's first step is the prompt)
        t_dec = max(t_gen - t_pre, 1e-9)
        res[name] = {"prefill_s": t_pre, "prefill_tok_s": prompt / t_pre,
                     "decode_s": t_dec, "decode_tok_s": (new_tokens - 1) / t_dec,
                     "tokens": out[0, prompt:].tolist(), "logits": logits.float()}
    hf.unpatch(model)
    a, b = res["huggingface"].pop("logits"), res["moeops"].pop("logits")
    res["max_abs_logit_diff"] = (a - b).abs().max().item()
    res["same_tokens"] = res["huggingface"]["tokens"] == res["moeops"]["tokens"]
    return res


def format_model_bench(r: dict) -> str:
    h, m = r["huggingface"], r["moeops"]
    lines = [
        f"model: Qwen3-MoE, Qwen3-30B-A3B layer shape, {r['layers']} layers, vocab 4096, random "
        f"weights, {r['dtype']}, {r['threads']} threads; HF experts implementation: "
        f"{r['hf_experts_implementation'] or 'default'}",
        f"prompt {r['prompt']} tokens, greedy decode {r['new_tokens']} tokens; same tokens: "
        f"{r['same_tokens']}, max |logit diff| {r['max_abs_logit_diff']:.3g}",
        f"{'':<12} {'prefill tok/s':>14} {'decode tok/s':>13}",
        f"{'huggingface':<12} {h['prefill_tok_s']:>14.1f} {h['decode_tok_s']:>13.2f}",
        f"{'moeops':<12} {m['prefill_tok_s']:>14.1f} {m['decode_tok_s']:>13.2f}",
        f"{'speedup':<12} {m['prefill_tok_s'] / h['prefill_tok_s']:>13.2f}x "
        f"{m['decode_tok_s'] / h['decode_tok_s']:>12.2f}x",
    ]
    return "\n".join(lines)
