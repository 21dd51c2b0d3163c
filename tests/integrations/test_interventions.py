"""moeops.interventions on tiny random Hugging Face models (Mixtral, Qwen2-MoE, DeepSeek-V3,
plus Qwen3-MoE / OLMoE where cheap).

Every intervention mode and paper workflow is compared with a pure-torch implementation of the
same arithmetic written here, independently of moeops: per-token Python routing (scores, bias,
groups, masks, forced experts, ranks, top-p) and a per-expert torch MLP, swapped into an
*unpatched* copy of the model as its MoE block forward. Zero overhead when off is checked
structurally (the ops dispatched by a forward are counted), not by timing.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the interventions tests need transformers>=5")
import transformers  # noqa: E402

if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("moeops.interventions supports transformers 5.x models only",
                allow_module_level=True)

import moeops  # noqa: E402
from moeops import interventions as iv  # noqa: E402
from moeops.interventions._state import LayerState  # noqa: E402
from support.hf_tiny import OpCounter, batch, tiny_config, tiny_model  # noqa: E402
from support.iv_torch import NEG_INF, torch_route  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield

FAMILIES = ("mixtral", "qwen2_moe", "deepseek_v3")


# ----------------------------------------------------------------------------- pure torch

def _params(router):
    if hasattr(router, "e_score_correction_bias"):
        return dict(sigmoid=True, renorm=bool(router.norm_topk_prob),
                    scale=float(router.routed_scaling_factor),
                    bias=router.e_score_correction_bias.float(), G=int(router.num_group),
                    TG=int(router.topk_group), k=int(router.top_k))
    return dict(sigmoid=False, renorm=bool(getattr(router, "norm_topk_prob", True)), scale=1.0,
                bias=None, G=1, TG=1, k=int(router.top_k))


def expert_outputs(experts, x, ids):
    """Unweighted outputs y [T, K, H] of every slot (zeros for empty slots), pure torch."""
    T, K = ids.shape
    I = experts.down_proj.shape[2]
    y = torch.zeros(T, K, x.shape[1])
    for e in range(experts.down_proj.shape[0]):
        t_idx, k_idx = torch.nonzero(ids == e, as_tuple=True)
        if t_idx.numel():
            gu = x[t_idx].float() @ experts.gate_up_proj[e].float().t()
            h = F.silu(gu[:, :I]) * gu[:, I:]
            y[t_idx, k_idx] = h @ experts.down_proj[e].float().t()
    return y


def torch_block(block, family, hidden_states, route_fn, gain=None, on_slots=None):
    """A pure-torch MoE block forward: route_fn(logits) -> (w, ids); experts as torch MLPs."""
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    if family == "deepseek_v3":
        logits = F.linear(x.float(), block.gate.weight.float())
    else:
        logits = F.linear(x, block.gate.weight)
    w, ids = route_fn(logits)
    y = expert_outputs(block.experts, x, ids)
    g = torch.ones(block.experts.down_proj.shape[0]) if gain is None else gain
    coef = torch.where(ids >= 0, w * g[ids.clamp(min=0)], 0.0)
    routed = (coef.unsqueeze(-1) * y).sum(1)
    if on_slots is not None:
        on_slots(x, logits, w, ids, y, routed)
    out = routed
    if family == "qwen2_moe":
        out = out + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    elif family == "deepseek_v3":
        out = out + block.shared_experts(x)
    return out.to(hidden_states.dtype).reshape(shape)


def torch_model(family, spec_by_layer=None, gain_by_layer=None, on_slots=None, model=None):
    """The unpatched tiny model with every MoE block replaced by :func:`torch_block`."""
    model = tiny_model(family) if model is None else model
    for idx, layer in enumerate(model.model.layers):
        block = layer.mlp
        if not hasattr(block, "experts"):
            continue
        p = _params(block.gate)
        spec = (spec_by_layer or {}).get(idx, {})
        gain = (gain_by_layer or {}).get(idx)

        def fwd(hs, block=block, p=p, spec=spec, gain=gain, idx=idx):
            cb = (lambda *a: on_slots(idx, *a)) if on_slots else None
            return torch_block(block, family, hs, lambda lg: torch_route(lg, p, spec), gain, cb)
        block.forward = fwd
    return model


def patched(family, **kw):
    return moeops.patch(tiny_model(family, **kw))


def moe_indices(model):
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


IDS, MASK = batch(seed=3, left_pad=False)
PROMPT = IDS[:, :8]  # unpadded rows


def _logits(model, ids=PROMPT):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


# ----------------------------------------------------------------------------- the oracle itself

@pytest.mark.parametrize("family", FAMILIES)
def test_pure_torch_model_equals_patched_model(family):
    """The test's own pure-torch layer reproduces the model (so the comparisons below mean
    something)."""
    torch.testing.assert_close(_logits(torch_model(family)), _logits(patched(family)),
                               atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- zero overhead

@pytest.mark.parametrize("family", FAMILIES)
def test_off_runs_exactly_the_same_ops(family):
    model = patched(family)

    def ops():
        with OpCounter() as c, torch.no_grad():
            model(PROMPT, use_cache=False)
        return c.counts

    before = ops()
    iv.enable_stats(model, "outputs")
    iv.set_intervention(model, mask=[1], mask_mode="drop", gain=None)
    on = ops()
    assert on != before  # something did run differently while on
    iv.disable_stats(model)
    iv.clear_interventions(model)
    after = ops()
    assert after == before
    layers = iv.moe_layers(model)
    assert all(m.__dict__.get("_moeops_iv") is None
               for layer in layers for m in (layer.router, layer.experts))


@pytest.mark.parametrize("family", FAMILIES)
def test_stats_add_no_host_sync_ops(family):
    """Counts and weight sums: the extra ops are tensor ops on the device (index_add_, add_);
    no .item()/nonzero-style op (aten::_local_scalar_dense, aten::nonzero) is added."""
    model = patched(family)
    sync_ops = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item")

    def ops():
        with OpCounter() as c, torch.no_grad():
            model(PROMPT, use_cache=False)
        return c.counts

    off = ops()
    iv.enable_stats(model, "probs")
    on = ops()
    for name in sync_ops:
        assert on[name] == off[name], name
    assert on["aten::index_add_"] > off["aten::index_add_"]
    assert on["moeops::fused_experts"] == off["moeops::fused_experts"]


# ----------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("family", FAMILIES)
def test_stats_match_pure_torch(family):
    rec = {}

    def on_slots(idx, x, logits, w, ids, y, routed):
        rec[idx] = (logits, w, ids, y)

    torch_model(family, on_slots=on_slots)(PROMPT, use_cache=False)
    model = patched(family)
    with iv.collect_stats(model, "outputs") as read:
        with torch.no_grad():
            model(PROMPT, use_cache=False)
            model(PROMPT, use_cache=False)  # accumulates over two forwards
        s = read()
    assert s["layers"] == moe_indices(model)
    for j, idx in enumerate(s["layers"]):
        logits, w, ids, y = rec[idx]
        E = logits.shape[1]
        valid = ids >= 0
        counts = torch.bincount(ids[valid], minlength=E)
        wsum = torch.zeros(E).index_add_(0, ids[valid], w[valid].float())
        probs = torch.sigmoid(logits.float()) if family == "deepseek_v3" else \
            torch.softmax(logits.float(), -1)
        norms = y.norm(dim=-1)
        nsum = torch.zeros(E).index_add_(0, ids[valid], norms[valid])
        absmax = torch.zeros(E)
        for e in range(E):
            if (ids == e).any():
                absmax[e] = y[ids == e].abs().max()
        torch.testing.assert_close(s["counts"][j], 2 * counts)
        torch.testing.assert_close(s["weight_sum"][j], 2 * wsum, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s["prob_sum"][j], 2 * probs.sum(0), atol=1e-5, rtol=1e-5)
        assert int(s["tokens"][j]) == 2 * PROMPT.numel()
        torch.testing.assert_close(s["norm_sum"][j], 2 * nsum, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(s["out_absmax"][j], absmax, atol=1e-5, rtol=1e-5)
        for e in range(E):
            if absmax[e] > 0:
                ch = int(s["out_absmax_channel"][j, e])
                assert abs(float(y[ids == e][:, ch].abs().max()) - float(absmax[e])) < 1e-5
            else:
                assert int(s["out_absmax_channel"][j, e]) == -1
    iv.reset_stats(model)  # off now: reset is a no-op
    assert iv.read_stats(model) == {"layers": []}


def test_stats_reset_and_levels():
    model = patched("mixtral")
    iv.enable_stats(model, "counts")
    with torch.no_grad():
        model(PROMPT, use_cache=False)
    s = iv.read_stats(model)
    assert set(s) == {"layers", "counts"}
    assert int(s["counts"].sum()) == PROMPT.numel() * 2 * len(s["layers"])
    iv.reset_stats(model)
    assert int(iv.read_stats(model)["counts"].sum()) == 0
    per = iv.read_stats(model, stacked=False)
    assert set(per) == set(s["layers"])
    iv.disable_stats(model)
    with pytest.raises(ValueError, match="level"):
        iv.enable_stats(model, "everything")


def test_fused_experts_stats_kernel_matches_reference():
    g = torch.Generator().manual_seed(0)
    T, H, I, E, K = 40, 24, 16, 6, 3
    for dtype, act, gated in ((torch.float32, "silu", True), (torch.bfloat16, "relu", False)):
        h = torch.randn(T, H, generator=g).to(dtype)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
        ids[::5, 1] = -1
        ids[ids == 4] = -1  # expert 4 has no rows
        w = torch.rand(T, K, generator=g)
        nu = 2 * I if gated else I
        w_up = (torch.randn(E, nu, H, generator=g) * 0.3).to(dtype)
        w_down = (torch.randn(E, H, I, generator=g) * 0.3).to(dtype)
        gain = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 1.0])
        a = moeops.fused_experts_stats(h, ids, w, w_up, w_down, activation=act, gated=gated,
                                       gain=gain)
        b = moeops.fused_experts_stats(h, ids, w, w_up, w_down, activation=act, gated=gated,
                                       gain=gain, backend="reference")
        torch.testing.assert_close(a.out, moeops.fused_experts(h, ids, w, w_up, w_down,
                                                               activation=act, gated=gated,
                                                               gain=gain), atol=0, rtol=0)
        # bf16: the kernel may round the activation to bf16 (AVX512-BF16 CPUs, docs/ops.md)
        tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
        for x, y in zip(a, b):
            torch.testing.assert_close(x.float(), y.float(), **tol)
        assert int(a.out_absmax_channel[4]) == -1 and float(a.out_absmax[4]) == 0
        assert int(a.out_absmax_channel[2]) == -1  # gain 0: not computed
        if act == "relu":
            assert 0 < int(a.active_units.sum()) < int((ids >= 0).sum()) * I
        # token chunks (scratch over the workspace limit): statistics accumulate across chunks
        for limit in (1, 3 * 4 * K * (2 * H + nu)):  # 1 token per chunk, 3 tokens per chunk
            before = moeops._C.set_cpu_workspace_limit(limit)
            try:
                c = moeops.fused_experts_stats(h, ids, w, w_up, w_down, activation=act,
                                               gated=gated, gain=gain)
            finally:
                moeops._C.set_cpu_workspace_limit(before)
            for x, y in zip(a, c):
                torch.testing.assert_close(x, y, atol=0, rtol=0)


# ----------------------------------------------------------------------------- interventions

def _specs(E, T):
    g = torch.Generator().manual_seed(11)
    tmask = torch.rand(T, E, generator=g) < 0.3
    fid = torch.randint(-1, E, (T,), generator=g)
    ext_ids = torch.randint(-1, E, (T, 2), generator=g)
    ext_w = torch.rand(T, 2, generator=g)
    return {
        "reroute": dict(mask=[0, 3, 5], mask_mode="reroute"),
        "reroute_pre_score": dict(mask=[0, 3, 5], mask_mode="reroute", mask_stage="pre_score"),
        "drop": dict(mask=[0, 3, 5], mask_mode="drop"),
        "drop_renorm": dict(mask=[0, 3, 5], mask_mode="drop_renorm"),
        "token_mask_reroute": dict(mask=tmask, mask_mode="reroute"),
        "token_mask_drop": dict(mask=tmask, mask_mode="drop"),
        "forced": dict(forced=[E - 1]),
        "forced_and_masked": dict(forced=[2], mask=[2, 4], mask_mode="drop_renorm"),
        "forced_ids": dict(forced_ids=fid),
        "ranks_2": dict(ranks=(2,)),
        "ranks_1_3": dict(ranks=(1, 3)),
        "ranks_masked": dict(ranks=(0, 1), mask=[1], mask_mode="reroute"),
        "top_p": dict(top_p=0.6),
        "external": dict(routing=(ext_ids, ext_w)),
        "external_top1": dict(routing=(ext_ids[:, :1], None)),
    }


CASES = list(_specs(8, 4))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_intervention_matches_pure_torch(family, case):
    model = patched(family)
    E = iv.moe_layers(model)[0].num_experts
    T = PROMPT.numel()
    spec = _specs(E, T)[case]
    layers = moe_indices(model)
    target = layers[-1]  # intervene on the last MoE layer only
    iv.set_intervention(model, target, **spec)
    got = _logits(model)
    want = _logits(torch_model(family, {target: spec}))
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-5)
    iv.clear_interventions(model)
    assert not torch.allclose(_logits(model), want, atol=1e-3)  # the intervention mattered


@pytest.mark.parametrize("family", FAMILIES)
def test_gain_matches_pure_torch(family):
    model = patched(family)
    E = iv.moe_layers(model)[0].num_experts
    gain = torch.linspace(0.0, 2.0, E)
    layers = moe_indices(model)
    with iv.intervene(model, gain=gain):
        got = _logits(model)
    want = _logits(torch_model(family, gain_by_layer={i: gain for i in layers}))
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-5)


def test_external_routing_callable_and_errors():
    model = patched("mixtral")
    seen = []

    def router(layer, hidden, logits):
        seen.append(layer)
        return torch.zeros(logits.shape[0], 1, dtype=torch.long), None

    with iv.intervene(model, routing=router):
        got = _logits(model)
    assert seen == moe_indices(model)
    T = PROMPT.numel()
    spec = dict(routing=(torch.zeros(T, 1, dtype=torch.long), None))
    want = _logits(torch_model("mixtral", {i: spec for i in moe_indices(model)}))
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-5)
    with iv.intervene(model, routing=(torch.zeros(T + 1, 1, dtype=torch.long), None)):
        with pytest.raises(ValueError, match="rows"):
            _logits(model)
    with pytest.raises(ValueError, match="mask_mode"):
        iv.set_intervention(model, mask=[0], mask_mode="zero")
    with pytest.raises(ValueError, match="MoE layer"):
        iv.set_intervention(model, 7, mask=[0])
    with pytest.raises(ValueError, match="mask must be"):
        iv.set_intervention(model, mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        iv.set_intervention(model, mask=torch.zeros(8))
    with pytest.raises(ValueError, match="outside"):
        iv.set_intervention(model, mask=[9])
    with pytest.raises(ValueError, match="top_p"):
        iv.set_intervention(model, top_p=1.5)
    with pytest.raises(ValueError, match="gain"):
        iv.set_intervention(model, gain=torch.ones(3))
    with pytest.raises(ValueError, match="not patched"):
        iv.moe_layers(tiny_model("mixtral"))


def test_masked_experts_are_not_computed():
    model = patched("mixtral")
    rec = {}

    def spy(self, experts, hidden, ids, weights, *a, **k):
        rec["ids"] = ids.clone()
        return orig(self, experts, hidden, ids, weights, *a, **k)

    orig = LayerState.run_experts
    LayerState.run_experts = spy
    try:
        with iv.intervene(model, mask=[0, 1, 2, 3], mask_mode="drop"):
            _logits(model)
    finally:
        LayerState.run_experts = orig
    ids = rec["ids"]
    assert not ((ids >= 0) & (ids < 4)).any()  # their slots reach fused_experts empty (-1)
    assert (ids == -1).any()


COMPILE_CASES = {
    "qwen2_moe-masks-gain-weights": ("qwen2_moe", "weights", lambda T: dict(
        mask=[1, 6], mask_mode="drop_renorm", gain=torch.linspace(0.5, 1.5, 8))),
    "deepseek_v3-ranks-forced-outputs": ("deepseek_v3", "outputs", lambda T: dict(
        ranks=(0, 2), forced_ids=torch.arange(T) % 3 - 1)),
}


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_interventions_survive_torch_compile(case):
    family, level, spec = COMPILE_CASES[case]
    model = patched(family)
    iv.set_intervention(model, **spec(PROMPT.numel()))
    iv.enable_stats(model, level)
    eager = _logits(model)
    s_eager = iv.read_stats(model)
    iv.reset_stats(model)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True)
        got = _logits(compiled)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    s = iv.read_stats(model)
    assert set(s) == set(s_eager)
    for name in s_eager:
        if name != "layers":
            torch.testing.assert_close(s[name], s_eager[name], atol=1e-5, rtol=1e-5)
    iv.clear_interventions(model)
    assert not torch.allclose(_logits(model), eager, atol=1e-3)


# ----------------------------------------------------------------------------- workflows

@pytest.mark.parametrize("family", FAMILIES)
def test_expert_activation_profile_and_switch_off(family):
    prompts = {"a": [IDS[0, :6], IDS[1, :9]], "b": [IDS[2, :7]]}
    model = patched(family)
    prof = iv.expert_activation_profile(model, prompts, top_n=4)
    # pure torch: per-prompt selection counts / tokens, class means, difference of means
    maps = {}
    for cls, ps in prompts.items():
        per = []
        for pr in ps:
            rec = {}
            torch_model(family, on_slots=lambda i, x, lg, w, ids, y, r: rec.__setitem__(
                i, ids))(pr.unsqueeze(0), use_cache=False)
            E = iv.moe_layers(model)[0].num_experts
            per.append(torch.stack([torch.bincount(rec[i][rec[i] >= 0], minlength=E).float()
                                    / pr.numel() for i in sorted(rec)]))
        maps[cls] = torch.stack(per).mean(0)
    for cls in prompts:
        torch.testing.assert_close(prof.frequency[cls], maps[cls])
    d = maps["a"] - maps["b"]
    torch.testing.assert_close(prof.distinctiveness["a"], d)
    E = d.shape[1]
    best = d.reshape(-1).topk(4).values
    got = torch.stack([d[prof.layers.index(li), e] for li, e in prof.top_experts["a"]])
    torch.testing.assert_close(got, best)
    # switch the top experts off in each mode; compare with the pure-torch arithmetic
    top = prof.top_experts["a"][:2]
    by = {}
    for li, e in top:
        by.setdefault(li, []).append(e)
    for mode in ("reroute", "drop", "drop_renorm"):
        iv.switch_off(model, top, mode=mode)
        want = _logits(torch_model(family, {li: dict(mask=es, mask_mode=mode)
                                            for li, es in by.items()}))
        torch.testing.assert_close(_logits(model), want, atol=5e-5, rtol=1e-5)
        iv.clear_interventions(model)
    iv.switch_off(model, top, mode="gain0")
    gains = {}
    for li, es in by.items():
        gains[li] = torch.ones(E)
        gains[li][es] = 0
    torch.testing.assert_close(_logits(model), _logits(torch_model(family, gain_by_layer=gains)),
                               atol=5e-5, rtol=1e-5)
    iv.switch_off(model, top, mode="drop")
    drop = _logits(model)
    iv.switch_off(model, top, mode="gain0")
    torch.testing.assert_close(_logits(model), drop, atol=1e-6, rtol=1e-6)  # gain 0 == drop
    iv.clear_interventions(model)
    iv.force_experts(model, top)
    want = _logits(torch_model(family, {li: dict(forced=es) for li, es in by.items()}))
    torch.testing.assert_close(_logits(model), want, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_find_super_experts_and_prune(family):
    calib = [IDS[:, :10], IDS[:2, 2:]]
    model = patched(family)
    se = iv.find_super_experts(model, calib)
    # pure torch: max |down_proj output| per (layer, expert) over both batches
    absmax = {}

    def on_slots(i, x, lg, w, ids, y, r):
        E = lg.shape[1]
        cur = absmax.setdefault(i, torch.zeros(E))
        for e in range(E):
            if (ids == e).any():
                cur[e] = max(cur[e], y[ids == e].abs().max())
    ref = torch_model(family, on_slots=on_slots)
    for b in calib:
        ref(b, use_cache=False)
    want = torch.stack([absmax[i] for i in se.layers])
    torch.testing.assert_close(se.out_absmax, want, atol=1e-5, rtol=1e-5)
    limit = round(0.75 * model.config.num_hidden_layers)
    rows = [j for j, i in enumerate(se.layers) if i < limit]
    vals = want[rows].reshape(-1).double()
    thr = float(torch.quantile(vals, 0.995))
    expect = [(se.layers[j], e) for j in rows for e in range(want.shape[1])
              if want[j, e] > thr and want[j, e] > math.floor(float(vals.max()) / 10)]
    assert se.experts == expect and len(expect) >= 1
    # Super Experts' pruning: zero down_proj in the unpatched model == prune_experts(drop)
    iv.prune_experts(model, se.experts, mode="drop")
    ref = tiny_model(family)
    with torch.no_grad():
        for li, e in se.experts:
            ref.model.layers[li].mlp.experts.down_proj[e].zero_()
    torch.testing.assert_close(_logits(model), _logits(ref), atol=5e-5, rtol=1e-5)


def _easy_ep_pure(family, demos):
    scores = {}
    resid = {}
    model = torch_model(family)
    for i, layer in enumerate(model.model.layers):
        layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, a, i=i: resid.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))

    def on_slots(i, x, lg, w, ids, y, routed):
        h = resid[i].float()
        c = (1 - F.cosine_similarity(h, h + routed, dim=-1)).clamp_min(0)
        E = lg.shape[1]
        s = scores.setdefault(i, torch.zeros(E))
        for t in range(ids.shape[0]):
            for k in range(ids.shape[1]):
                e = int(ids[t, k])
                if e >= 0:
                    s[e] += float(w[t, k]) * float(y[t, k].norm()) * float(c[t])
    model = torch_model(family, on_slots=on_slots, model=model)
    for d in demos:
        model(d, use_cache=False)
    return torch.stack([scores[i] for i in sorted(scores)])


@pytest.mark.parametrize("family", FAMILIES)
def test_easy_ep_scores_and_keep_top_experts(family):
    demos = [IDS[:, :9], IDS[:1]]
    model = patched(family)
    sc = iv.easy_ep_scores(model, demos)
    torch.testing.assert_close(sc["scores"], _easy_ep_pure(family, demos), atol=1e-4, rtol=1e-4)
    assert sc["layers"] == moe_indices(model)
    E = iv.moe_layers(model)[0].num_experts
    n = E // 2
    masked = patched(family)
    keep_m = iv.keep_top_experts(masked, n, sc, mode="reroute")
    pruned = patched(family)
    keep_p = iv.keep_top_experts(pruned, n, sc, mode="remove")
    assert {i: k.tolist() for i, k in keep_m.items()} == {i: k.tolist() for i, k in keep_p.items()}
    for i, k in keep_p.items():
        ex = pruned.model.layers[i].mlp.experts
        assert ex.down_proj.shape[0] == n and ex.gate_up_proj.shape[0] == n
        assert pruned.model.layers[i].mlp.gate.weight.shape[0] == n
        full = tiny_model(family).model.layers[i].mlp.experts
        torch.testing.assert_close(ex.down_proj.data, full.down_proj.data[k])
        if family != "deepseek_v3":
            j = sc["layers"].index(i)
            kept_scores = sc["scores"][j][k]
            assert kept_scores.min() >= sc["scores"][j].sort(descending=True).values[n - 1]
    n_params = sum(p.numel() for p in pruned.parameters())
    assert n_params < sum(p.numel() for p in masked.parameters())
    torch.testing.assert_close(_logits(pruned), _logits(masked), atol=2e-5, rtol=1e-5)
    out = pruned.generate(PROMPT[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, PROMPT.shape[1] + 4)
    # the pruned model keeps working with statistics
    with iv.collect_stats(pruned, "counts") as read:
        _logits(pruned)
        assert read()["counts"].shape[1] == n


def test_keep_top_experts_odd_counts_60_to_30():
    cfg = tiny_config("qwen2_moe")
    cfg.num_experts = 60
    cfg.num_experts_per_tok = 4
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(2, 60, generator=g)
    pruned = moeops.patch(tiny_model("qwen2_moe", config=cfg))
    masked = moeops.patch(tiny_model("qwen2_moe", config=cfg))
    iv.keep_top_experts(pruned, 30, scores, mode="remove")
    iv.keep_top_experts(masked, 30, scores, mode="reroute")
    assert pruned.config.num_experts == 30
    assert pruned.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 30
    torch.testing.assert_close(_logits(pruned), _logits(masked), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="n_per_layer"):
        iv.keep_top_experts(masked, 61, scores)


@pytest.mark.parametrize("family", FAMILIES)
def test_self_contrast_logits_and_generate(family):
    model = patched(family)
    layers = moe_indices(model)
    # alpha 0.5: the tiny random models' logits are flat, alpha 0.1 would keep every token
    res = iv.self_contrast_logits(model, PROMPT, strong_ranks=(0, 1), weak_ranks=(2,),
                                  alpha=0.5, beta=0.5)
    strong = _logits(torch_model(family, {i: dict(ranks=(0, 1)) for i in layers}))[:, -1]
    weak = _logits(torch_model(family, {i: dict(ranks=(2,)) for i in layers}))[:, -1]
    torch.testing.assert_close(res.strong_logits, strong, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(res.weak_logits, weak, atol=5e-5, rtol=1e-5)
    want = (1.5 * strong - 0.5 * weak).masked_fill(
        strong < math.log(0.5) + strong.max(-1, keepdim=True).values, NEG_INF)
    torch.testing.assert_close(res.scores, want, atol=1e-4, rtol=1e-5)
    assert torch.isinf(res.scores).any() and torch.isfinite(res.scores).any()
    # generation: batched strong/weak with a KV cache == pure torch recomputation each step
    got = iv.self_contrast_generate(model, PROMPT[:2, :5], max_new_tokens=4, alpha=0.5)
    s_model = torch_model(family, {i: dict(ranks=(0, 1)) for i in layers})
    w_model = torch_model(family, {i: dict(ranks=(2,)) for i in layers})
    seq = PROMPT[:2, :5]
    with torch.no_grad():
        for _ in range(4):
            zs = s_model(seq, use_cache=False).logits[:, -1]
            zw = w_model(seq, use_cache=False).logits[:, -1]
            nxt = iv.contrast_scores(zs, zw, alpha=0.5).argmax(-1)
            seq = torch.cat([seq, nxt.unsqueeze(1)], 1)
    assert torch.equal(got, seq)
    # no intervention is left behind
    torch.testing.assert_close(_logits(model), _logits(patched(family)))


@pytest.mark.parametrize("family", FAMILIES)
def test_router_probabilities(family):
    model = patched(family)
    batches = [IDS[:, :8], IDS[:1, 3:]]
    r = iv.router_probabilities(model, batches)
    sums, counts = {}, {}
    rec = {}

    def on_slots(i, x, lg, w, ids, y, routed):
        p = torch.sigmoid(lg.float()) if family == "deepseek_v3" else torch.softmax(lg.float(), -1)
        sums[i] = sums.get(i, 0) + p.sum(0)
        counts[i] = counts.get(i, 0) + torch.bincount(ids[ids >= 0], minlength=lg.shape[1])
        rec[i] = rec.get(i, 0) + lg.shape[0]
    ref = torch_model(family, on_slots=on_slots)
    for b in batches:
        ref(b, use_cache=False)
    for j, i in enumerate(r["layers"]):
        torch.testing.assert_close(r["mean_prob"][j], sums[i] / rec[i], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["frequency"][j], counts[i].float() / rec[i])
        assert r["top"][j] == (i, int((sums[i] / rec[i]).argmax()))


# ----------------------------------------------------------------------------- CLI

def test_profile_cli_with_config_and_prompts(tmp_path):
    import json

    from moeops.cli import main

    cfg = tiny_config("mixtral").to_dict()
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(cfg))
    prompts = {"x": [[1, 5, 9, 20], [1, 7, 7]], "y": [[1, 100, 101, 102, 103], "hello"]}
    p_path = tmp_path / "prompts.json"
    p_path.write_text(json.dumps(prompts))
    out_json, out_png = tmp_path / "s.json", tmp_path / "h.png"
    assert main(["profile", "--model-config", str(cfg_path), "--prompts", str(p_path),
                 "--json", str(out_json), "--png", str(out_png)]) == 0
    r = json.loads(out_json.read_text())
    n_tok = 4 + 3 + 5 + len("hello")
    assert r["model_type"] == "mixtral" and r["layers"] == [0, 1] and r["tokens"] == n_tok
    counts = torch.tensor(r["counts"])
    assert counts.shape == (2, 8) and (counts.sum(1) == n_tok * 2).all()
    torch.testing.assert_close(torch.tensor(r["frequency"]), counts.float() / n_tok)
    assert set(r["class_frequency"]) == {"x", "y"}
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the heatmap is optional (the next test checks the message)
        assert not out_png.exists()
    else:
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_cli_builtin_and_without_matplotlib(tmp_path, monkeypatch, capsys):
    import json
    import sys

    from moeops.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out_json, out_png = tmp_path / "s.json", tmp_path / "h.png"
    assert main(["profile", "--json", str(out_json), "--png", str(out_png)]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not out_png.exists()
    r = json.loads(out_json.read_text())
    assert r["model_type"] == "qwen3_moe" and len(r["layers"]) == 4 and r["num_experts"] == 16
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": [[1, 999]]}))
    with pytest.raises(SystemExit, match="outside the vocabulary"):
        main(["profile", "--prompts", str(bad), "--json", str(out_json), "--png", ""])
