"""``moeops profile``: routing statistics of a model on a prompt set, as JSON and a heatmap.

The model is a Hugging Face MoE model built from a config JSON (``--model-config``, random
weights), loaded from a local checkpoint (``--model``), or a built-in tiny Qwen3-MoE (4 layers,
16 experts, top-2, random weights). Prompts (``--prompts``): a JSON object ``{class: [prompt,
...]}`` where a prompt is a list of token ids or a string (strings need a tokenizer, i.e.
``--model``; without one they are encoded as UTF-8 bytes modulo the vocabulary size), a JSON
list (one class ``"all"``), or a text file with one prompt per line. Default: built-in id
prompts in two classes.

Output: ``--json`` (statistics: per layer and expert selection counts, frequency, sums of
selected weights and of router probabilities, per-class fTRI maps and top experts) and
``--png`` (layers x experts selection frequency; needs matplotlib).
"""

from __future__ import annotations

import json
import sys

import torch

from moeops import interventions as iv
from moeops.integrations import hf

TINY_CONFIG = dict(model_type="qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=128,
                   moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=2,
                   norm_topk_prob=True, max_position_embeddings=512)


def builtin_prompts(vocab: int, seed: int = 0) -> dict[str, list[list[int]]]:
    """Two classes of random token-id prompts drawn from the lower and upper halves of the
    vocabulary (so the classes route differently even in a random model)."""
    g = torch.Generator().manual_seed(seed)
    half = vocab // 2
    out = {}
    for name, lo, hi in (("low_ids", 3, half), ("high_ids", half, vocab)):
        out[name] = [torch.randint(lo, hi, (int(n),), generator=g).tolist()
                     for n in torch.randint(8, 24, (6,), generator=g)]
    return out


def build_model(model_config: str | None = None, model_path: str | None = None, seed: int = 0):
    """(model, tokenizer or None): from a config JSON (random weights, routers re-initialised
    so routing is spread), a local checkpoint, or the built-in tiny config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_path is not None:
        from transformers import AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        try:
            tok = AutoTokenizer.from_pretrained(model_path)
        except Exception:  # a checkpoint without a tokenizer: byte-encoded prompts
            tok = None
        return hf.patch(model), tok
    if model_config is not None:
        with open(model_config) as f:
            cfg_dict = json.load(f)
    else:
        cfg_dict = dict(TINY_CONFIG)
    if "model_type" not in cfg_dict:
        raise SystemExit("moeops profile: the model config JSON needs a 'model_type'")
    cfg_dict = dict(cfg_dict)
    cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    hf.patch(model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in iv.moe_layers(model):
            w = layer.router.weight
            w.copy_(torch.randn(w.shape, generator=g) * w.shape[1] ** -0.5)
            for name in ("gate_up_proj", "down_proj"):
                p = getattr(layer.experts, name)
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    return model, None


def load_prompts(path: str | None, vocab: int, tokenizer=None) -> dict[str, list[list[int]]]:
    if path is None:
        return builtin_prompts(vocab)
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = {"all": [line for line in text.splitlines() if line.strip()]}
    if isinstance(data, list):
        data = {"all": data}
    if not isinstance(data, dict) or not data:
        raise SystemExit("moeops profile: --prompts must hold {class: [prompts]}, a list of "
                         "prompts, or one prompt per line")

    def encode(p):
        if isinstance(p, str):
            if tokenizer is not None:
                return tokenizer(p)["input_ids"]
            return [b % vocab for b in p.encode("utf-8")]
        if isinstance(p, list) and all(isinstance(i, int) for i in p):
            bad = [i for i in p if not 0 <= i < vocab]
            if bad:
                raise SystemExit(f"moeops profile: token id {bad[0]} outside the vocabulary "
                                 f"[0, {vocab})")
            return p
        raise SystemExit(f"moeops profile: a prompt must be a string or a list of ids, got {p!r}")

    out = {}
    for cls, ps in data.items():
        enc = [encode(p) for p in ps]
        enc = [e for e in enc if len(e)]
        if not enc:
            raise SystemExit(f"moeops profile: class {cls!r} has no non-empty prompt")
        out[str(cls)] = enc
    return out


@torch.no_grad()
def profile(model, prompts: dict[str, list[list[int]]], top_n: int = 10) -> dict:
    """Statistics of ``model`` on ``prompts`` as a JSON-ready dict."""
    with iv.collect_stats(model, "probs") as read:
        for ps in prompts.values():
            for p in ps:
                model(torch.tensor([p]), use_cache=False)
        s = read()
    prof = iv.expert_activation_profile(model, {c: [torch.tensor(p) for p in ps]
                                                for c, ps in prompts.items()}, top_n=top_n)
    tokens = s["tokens"].clamp_min(1).unsqueeze(1).float()
    return {
        "model_type": model.config.model_type,
        "layers": s["layers"],
        "num_experts": int(s["counts"].shape[1]),
        "top_k": int(iv.moe_layers(model)[0].router.top_k),
        "tokens": int(s["tokens"][0]),
        "classes": {c: len(ps) for c, ps in prompts.items()},
        "counts": s["counts"].tolist(),
        "frequency": (s["counts"].float() / tokens).tolist(),
        "weight_sum": s["weight_sum"].tolist(),
        "mean_router_prob": (s["prob_sum"] / tokens).tolist(),
        "class_frequency": {c: f.tolist() for c, f in prof.frequency.items()},
        "class_distinctiveness": {c: d.tolist() for c, d in prof.distinctiveness.items()},
        "class_top_experts": {c: [list(t) for t in ts] for c, ts in prof.top_experts.items()},
    }


def heatmap(result: dict, path: str) -> None:
    """Layers x experts selection-frequency heatmap (all prompts, then one panel per class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("all prompts", result["frequency"])] + \
        [(c, f) for c, f in result["class_frequency"].items()][:4]
    width = max(6, result["num_experts"] * 0.25)
    height = 1.2 + 0.5 * len(result["layers"]) * len(panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, height), squeeze=False)
    for ax, (title, data) in zip(axes[:, 0], panels):
        im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(f"selection frequency: {title}", fontsize=9)
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(result["layers"])), [str(i) for i in result["layers"]])
        fig.colorbar(im, ax=ax, fraction=0.03)
    axes[-1, 0].set_xlabel("expert")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> int:
    model, tok = build_model(args.model_config, args.model, args.seed)
    prompts = load_prompts(args.prompts, int(model.config.vocab_size), tok)
    result = profile(model, prompts, top_n=args.top_n)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"statistics of {sum(len(p) for p in prompts.values())} prompts "
          f"({result['tokens']} tokens, {len(result['layers'])} MoE layers x "
          f"{result['num_experts']} experts) written to {args.json}")
    if args.png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("moeops profile: matplotlib is not installed, so no heatmap was written "
                  "(pip install matplotlib); the JSON statistics are complete", file=sys.stderr)
            return 0
        heatmap(result, args.png)
        print(f"heatmap written to {args.png}")
    return 0
