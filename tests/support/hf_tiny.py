"""Tiny random Hugging Face MoE models (built from configs, nothing downloaded) for the
``moeops`` integration tests, plus a dispatch-level counter of the ops a forward runs.

Every family moeops supports gets a 2-3 layer model with 64-wide hidden states, a 128-token
vocabulary and fixed special ids inside it (pad 0, bos 1, eos 2). Several Hugging Face MoE
parameters start as zeros (routers, DeepSeek-V3's ``e_score_correction_bias``), which would make
routing degenerate (all experts tied): :func:`tiny_model` re-initialises every router weight,
every experts tensor and the DeepSeek-V3 bias from a seeded generator, so routing is spread
and the experts' contribution is not negligible next to the residual stream.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

VOCAB = 128
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
# families whose CausalLM returns router logits and a load-balancing loss
ROUTER_LOGITS_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, pad_token_id=PAD_ID,
               bos_token_id=BOS_ID, eos_token_id=EOS_ID, attention_dropout=0.0,
               tie_word_embeddings=False, max_position_embeddings=256)


def tiny_config(family: str):
    """A tiny config of ``family`` (fp32 eager attention so CPU results are deterministic)."""
    import transformers as tf

    if family == "mixtral":
        cfg = tf.MixtralConfig(**_COMMON, intermediate_size=32, num_hidden_layers=2,
                               num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                               router_jitter_noise=0.0)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**_COMMON, intermediate_size=128, moe_intermediate_size=32,
                                shared_expert_intermediate_size=64, num_hidden_layers=2,
                                num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                                norm_topk_prob=False)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**_COMMON, intermediate_size=128, moe_intermediate_size=32,
                                num_hidden_layers=2, num_key_value_heads=2, num_experts=8,
                                num_experts_per_tok=2, norm_topk_prob=True, head_dim=16)
    elif family == "olmoe":
        cfg = tf.OlmoeConfig(**_COMMON, intermediate_size=32, num_hidden_layers=2,
                             num_key_value_heads=4, num_experts=8, num_experts_per_tok=2)
    elif family == "deepseek_v3":
        # first_k_dense_replace < num_hidden_layers: layers 1 and 2 are MoE layers
        cfg = tf.DeepseekV3Config(**_COMMON, intermediate_size=128, moe_intermediate_size=32,
                                  num_hidden_layers=3, first_k_dense_replace=1,
                                  num_key_value_heads=4, n_routed_experts=16,
                                  num_experts_per_tok=4, n_group=4, topk_group=2,
                                  q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                                  qk_nope_head_dim=8, v_head_dim=16, n_shared_experts=1)
    else:
        raise KeyError(family)
    cfg._attn_implementation = "eager"
    return cfg


def router_and_experts_classes(family: str):
    from moeops.integrations import hf

    return hf.model_classes(family)


def num_moe_layers(model) -> int:
    router_cls, _ = router_and_experts_classes(model.config.model_type)
    return sum(isinstance(m, router_cls) for m in model.modules())


@torch.no_grad()
def _reinit(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    router_cls, experts_cls = router_and_experts_classes(model.config.model_type)

    def normal_(t, std):
        t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32).mul_(std).to(t.dtype))

    for module in model.modules():
        if isinstance(module, router_cls):
            normal_(module.weight, 0.15)  # logits with std ~1: spread routing, no near-ties
            if hasattr(module, "e_score_correction_bias"):
                normal_(module.e_score_correction_bias, 0.05)
        elif isinstance(module, experts_cls):
            for _name, p in module.named_parameters(recurse=False):
                normal_(p, 0.12)
    for p in model.parameters():  # anything else still all-zero (gates, biases of 2-D params)
        if p.dim() > 1 and not p.abs().sum():
            normal_(p, 0.05)


def tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               config=None, **from_config_kwargs):
    """A fresh tiny ``...ForCausalLM`` of ``family`` in eval mode, deterministic in ``seed``."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family) if config is None else config
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, **from_config_kwargs)
    _reinit(model, seed + 1)
    return model.to(dtype).eval()


def batch(seed: int = 0, batch_size: int = 3, seq_len: int = 12, *, left_pad: bool):
    """``input_ids``, ``attention_mask`` with padding: rows 1 and 2 are 3 and 5 tokens shorter,
    padded on the left (``left_pad``) or the right. Padded positions hold ``PAD_ID``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=g)
    ids[:, 0] = BOS_ID
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    for row, n_pad in ((1, 3), (2, 5)):
        if row >= batch_size:
            break
        if left_pad:
            ids[row, n_pad:] = ids[row, :seq_len - n_pad].clone()
            ids[row, :n_pad] = PAD_ID
            mask[row, :n_pad] = 0
        else:
            ids[row, seq_len - n_pad:] = PAD_ID
            mask[row, seq_len - n_pad:] = 0
    return ids, mask


class OpCounter(TorchDispatchMode):
    """Counts every op that reaches the dispatcher's Python key (below autograd), by name,
    e.g. ``counts["moeops::fused_experts"]``, ``counts["aten::_grouped_mm"]``."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func._schema.name] += 1
        return func(*args, **(kwargs or {}))

    def moeops(self) -> dict[str, int]:
        return {k: v for k, v in self.counts.items() if k.startswith("moeops::")}
