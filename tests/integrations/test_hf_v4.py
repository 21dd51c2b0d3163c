"""transformers 4.x (4.57): moeops.patch on Mixtral and Qwen2-MoE, whose experts are ModuleLists
of per-expert MLPs. The patched block runs topk_gating + fused_experts_list over the experts' own
weight tensors (no stacking, no copies). Runs in CI's transformers-4.57 environment; skipped under
transformers 5.x (tests/integrations/test_hf_models.py covers 5.x)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) >= 5:
    pytest.skip(f"transformers {transformers.__version__} is 5.x; this file tests the 4.x "
                "integration (CI runs it in a transformers 4.57 environment)",
                allow_module_level=True)

import moeops  # noqa: E402
from support.hf_tiny import OpCounter  # noqa: E402

VOCAB = 96


def tiny(model_type: str, seed: int = 0):
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                  attn_implementation="eager")
    if model_type == "mixtral":
        cfg = MixtralConfig(intermediate_size=40, num_local_experts=6, num_experts_per_tok=2,
                            router_jitter_noise=0.0, **common)
    else:
        cfg = Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=24,
                             shared_expert_intermediate_size=32, num_experts=6,
                             num_experts_per_tok=2, norm_topk_prob=False, **common)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
    return model


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    ids[0, :3] = 0
    return ids, mask


FAMILIES = ["mixtral", "qwen2_moe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_generate_and_no_copies(family):
    model = tiny(family)
    ids, mask = batch()
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        gen_want = model.generate(ids[1:2], max_new_tokens=32, do_sample=False, min_new_tokens=32)
        moeops.patch(model)
        moeops.patch(model)  # idempotent
        with OpCounter() as c:
            got = model(ids, attention_mask=mask).logits
        gen_got = model.generate(ids[1:2], max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert c.counts["moeops::fused_experts_list"] == 2 and c.counts["moeops::topk_gating"] == 2
    assert c.counts["aten::topk"] == 0
    assert (got - want).abs().max().item() <= 1e-5
    assert torch.equal(gen_got, gen_want)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs, "weights were copied"
    moeops.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match(family):
    ids, mask = batch(1)

    def grads(patch):
        model = tiny(family, seed=3)
        model.train()
        if patch:
            moeops.patch(model)
        out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss_a, ga = grads(False)
    loss_b, gb = grads(True)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0)
    assert ga.keys() == gb.keys()
    for name in ga:
        if ga[name] is None:
            assert gb[name] is None, name
            continue
        scale = ga[name].abs().max().item()
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-5, atol=1e-5 * scale + 1e-12,
                                   msg=name)
    router = [n for n in ga
              if n.endswith("mlp.gate.weight") or n.endswith("block_sparse_moe.gate.weight")]
    assert router and all(gb[n].abs().sum() > 0 for n in router)


def test_unsupported_type_on_v4():
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32, hidden_size=16,
                                                         intermediate_size=32, num_hidden_layers=1,
                                                         num_attention_heads=2))
    with pytest.raises(ValueError, match="mixtral, qwen2_moe"):
        moeops.patch(model)
