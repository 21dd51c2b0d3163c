"""moeops.interventions on transformers 4.x (4.57) Mixtral and Qwen2-MoE, whose experts are
ModuleLists: the patched sparse block hands over to the layer's intervention state. Compared with
a pure-torch block (tests/support/iv_torch.py routing + Hugging Face's own per-expert MLP modules).
Runs in CI's transformers-4.57 environment; skipped under transformers 5.x
(tests/integrations/test_interventions.py covers 5.x)."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) >= 5:
    pytest.skip(f"transformers {transformers.__version__} is 5.x; this file tests the 4.x "
                "integration (CI runs it in a transformers 4.57 environment)",
                allow_module_level=True)

import moeops  # noqa: E402
from moeops import interventions as iv  # noqa: E402
from support.hf_tiny import OpCounter  # noqa: E402
from support.iv_torch import torch_route  # noqa: E402

VOCAB = 96
FAMILIES = ["mixtral", "qwen2_moe"]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def tiny(model_type: str, seed: int = 0, num_experts: int = 6):
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                  attn_implementation="eager")
    if model_type == "mixtral":
        cfg = MixtralConfig(intermediate_size=40, num_local_experts=num_experts,
                            num_experts_per_tok=2, router_jitter_noise=0.0, **common)
    else:
        cfg = Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=24,
                             shared_expert_intermediate_size=32, num_experts=num_experts,
                             num_experts_per_tok=2, norm_topk_prob=False, **common)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for p in model.parameters():
        if p.dim() >= 2:
            p.normal_(0, 0.1)
    return model


IDS = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(4))


def _logits(model, ids=IDS):
    return model(ids, use_cache=False).logits


def _moe(layer):
    """The sparse MoE block of a 4.x decoder layer (Mixtral: block_sparse_moe, Qwen2: mlp)."""
    return layer.block_sparse_moe if hasattr(layer, "block_sparse_moe") else layer.mlp


def _params(block):
    return dict(sigmoid=False, renorm=bool(getattr(block, "norm_topk_prob", True)), scale=1.0,
                bias=None, G=1, TG=1, k=int(block.top_k))


def torch_model(family, spec_by_layer=None, gain_by_layer=None, on_slots=None, model=None):
    model = tiny(family) if model is None else model
    for idx, layer in enumerate(model.model.layers):
        block = _moe(layer)
        p = _params(block)
        spec = (spec_by_layer or {}).get(idx, {})
        gain = (gain_by_layer or {}).get(idx)

        def fwd(hs, block=block, p=p, spec=spec, gain=gain, idx=idx):
            b, s, h = hs.shape
            x = hs.reshape(-1, h)
            logits = block.gate(x)
            w, ids = torch_route(logits, p, spec)
            E = len(block.experts)
            g = torch.ones(E) if gain is None else gain
            y = torch.zeros(*ids.shape, h)
            for t in range(ids.shape[0]):
                for k in range(ids.shape[1]):
                    if ids[t, k] >= 0:
                        y[t, k] = block.experts[int(ids[t, k])](x[t:t + 1])[0]
            coef = torch.where(ids >= 0, w * g[ids.clamp(min=0)], 0.0)
            routed = (coef.unsqueeze(-1) * y).sum(1)
            if on_slots is not None:
                on_slots(idx, x, logits, w, ids, y, routed)
            out = routed
            if hasattr(block, "shared_expert"):
                out = out + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
            return out.reshape(b, s, h), logits
        block.forward = fwd
    return model


def patched(family, **kw):
    return moeops.patch(tiny(family, **kw))


SPECS = {
    "reroute": dict(mask=[0, 3], mask_mode="reroute"),
    "pre_score": dict(mask=[0, 3], mask_mode="reroute", mask_stage="pre_score"),
    "drop": dict(mask=[0, 3], mask_mode="drop"),
    "drop_renorm": dict(mask=[0, 3], mask_mode="drop_renorm"),
    "forced": dict(forced=[5]),
    "ranks": dict(ranks=(1, 2)),
    "top_p": dict(top_p=0.5),
    "external": dict(routing=(torch.arange(27).reshape(27, 1) % 6, None)),
}


@pytest.mark.parametrize("case", list(SPECS))
@pytest.mark.parametrize("family", FAMILIES)
def test_intervention_matches_pure_torch(family, case):
    model = patched(family)
    spec = SPECS[case]
    iv.set_intervention(model, 1, **spec)
    want = _logits(torch_model(family, {1: spec}))
    torch.testing.assert_close(_logits(model), want, atol=5e-5, rtol=1e-5)
    iv.clear_interventions(model)
    torch.testing.assert_close(_logits(model), _logits(torch_model(family)), atol=5e-5, rtol=1e-5)
    assert not torch.allclose(_logits(model), want, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_gain_and_off_ops(family):
    model = patched(family)

    def ops():
        with OpCounter() as c:
            _logits(model)
        return c.counts

    before = ops()
    gain = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0, 0.0])
    with iv.intervene(model, gain=gain):
        got = _logits(model)
    torch.testing.assert_close(got, _logits(torch_model(family, gain_by_layer={0: gain, 1: gain})),
                               atol=5e-5, rtol=1e-5)
    assert ops() == before


@pytest.mark.parametrize("family", FAMILIES)
def test_stats_match_pure_torch(family):
    rec = {}
    torch_model(family,
                on_slots=lambda i, x, lg, w, ids, y, r: rec.__setitem__(i, (lg, w, ids, y)))(
        IDS, use_cache=False)
    model = patched(family)
    with iv.collect_stats(model, "outputs") as read:
        _logits(model)
        s = read()
    assert s["layers"] == [0, 1]
    for j in (0, 1):
        lg, w, ids, y = rec[j]
        v = ids >= 0
        torch.testing.assert_close(s["counts"][j], torch.bincount(ids[v], minlength=6))
        torch.testing.assert_close(s["weight_sum"][j],
                                   torch.zeros(6).index_add_(0, ids[v], w[v].float()),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s["prob_sum"][j], torch.softmax(lg.float(), -1).sum(0),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s["norm_sum"][j],
                                   torch.zeros(6).index_add_(0, ids[v], y.norm(dim=-1)[v]),
                                   atol=1e-4, rtol=1e-5)
        absmax = torch.stack([y[ids == e].abs().max() if (ids == e).any() else torch.tensor(0.)
                              for e in range(6)])
        torch.testing.assert_close(s["out_absmax"][j], absmax, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_easy_ep_and_keep_top_experts(family):
    model = patched(family)
    demos = [IDS]
    sc = iv.easy_ep_scores(model, demos)
    # pure torch score
    resid, scores = {}, {}
    ref = tiny(family)
    for i, layer in enumerate(ref.model.layers):
        layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, a, i=i: resid.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))

    def on_slots(i, x, lg, w, ids, y, routed):
        h = resid[i]
        c = (1 - F.cosine_similarity(h, h + routed, dim=-1)).clamp_min(0)
        v = ids >= 0
        contrib = (w * y.norm(dim=-1) * c.unsqueeze(1))[v]
        scores[i] = torch.zeros(6).index_add_(0, ids[v], contrib)
    torch_model(family, on_slots=on_slots, model=ref)(IDS, use_cache=False)
    torch.testing.assert_close(sc["scores"], torch.stack([scores[0], scores[1]]), atol=1e-4,
                               rtol=1e-4)
    masked, pruned = patched(family), patched(family)
    iv.keep_top_experts(masked, 3, sc, mode="reroute")
    keep = iv.keep_top_experts(pruned, 3, sc, mode="remove")
    assert all(len(_moe(pruned.model.layers[i]).experts) == 3 for i in keep)
    assert _moe(pruned.model.layers[0]).gate.weight.shape[0] == 3
    torch.testing.assert_close(_logits(pruned), _logits(masked), atol=2e-5, rtol=1e-5)
    assert pruned.generate(IDS[:1], max_new_tokens=3, do_sample=False).shape == (1, 12)


@pytest.mark.parametrize("family", FAMILIES)
def test_self_contrast_generate(family):
    model = patched(family)
    got = iv.self_contrast_generate(model, IDS[:2, :5], max_new_tokens=3, alpha=0.5)
    s_model = torch_model(family, {0: dict(ranks=(0, 1)), 1: dict(ranks=(0, 1))})
    w_model = torch_model(family, {0: dict(ranks=(2,)), 1: dict(ranks=(2,))})
    seq = IDS[:2, :5]
    for _ in range(3):
        zs = s_model(seq, use_cache=False).logits[:, -1]
        zw = w_model(seq, use_cache=False).logits[:, -1]
        seq = torch.cat([seq, iv.contrast_scores(zs, zw, alpha=0.5).argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq)
