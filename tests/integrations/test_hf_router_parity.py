"""Parity of ``moeops.topk_gating`` with the real Hugging Face ``transformers`` 5.x routers.

Issue acceptance: with the same logits, gating reproduces the routers of Mixtral, Qwen2-MoE,
Qwen3-MoE (``norm_topk_prob`` on and off), OLMoE and DeepSeek-V3 exactly: same expert ids,
weights equal to rounding.

Each test builds the actual router module class of a family (``MixtralTopKRouter``,
``Qwen2MoeTopKRouter``, ``Qwen3MoeTopKRouter``, ``OlmoeTopKRouter``, ``DeepseekV3TopkRouter``)
from a tiny config (no download), gives it random weights (they default to zeros) and, for
DeepSeek-V3, a random ``e_score_correction_bias``. It feeds random hidden states, takes the
router's ``(router_logits, top_k_weights, top_k_index)`` and calls ``moeops.topk_gating`` on
``router_logits`` with the options that family's router implies. Then:

* ids: ``moeops`` returns slots sorted by selection score descending (ties: lower index).
  The HF ids are put in that canonical order (a no-op for the ``topk(sorted=True)`` routers
  when there are no ties; needed for DeepSeek-V3, which uses ``topk(sorted=False)``) and must
  equal ``moeops``'s ids exactly, and the HF weights are permuted the same way.
* Exact ties. In fp32 there are none in the data used here, and the tests insist on it, so
  the fp32 comparison is exact. bf16 routers (softmax of bf16 logits) produce exactly equal
  probabilities often, and CPU ``torch.topk`` does not order equal values by index (it is
  implementation-defined), so HF's tie order is arbitrary. On rows with an exact tie among
  the competing scores the ids are compared as a choice up to those ties: the selected score
  vectors must be bitwise equal (same experts up to swapping exactly-equal ones) and moeops
  must break each tie by lower index. Rows without ties (required to be most rows) are
  compared exactly as in fp32.
* weights: fp32 outputs to ``rtol=1e-5, atol=1e-6``; routers that return bf16 weights
  (Qwen2/3-MoE and OLMoE in bf16) against ``moeops``'s weights cast to bf16, within one bf16
  ulp.

It also checks what dtype each router computes in (so a change upstream is noticed), and
that the DeepSeek-V3 bias and group limit really change the selection in the data used (so
passing those options is not vacuous). Runs on CPU, and on CUDA where moeops has kernels,
with the compiled backend and the reference.
"""

from __future__ import annotations

import functools
import zlib

import pytest
import torch

pytest.importorskip(
    "transformers",
    reason="the HF router parity tests need Hugging Face transformers (pip install "
           "'moeops[test]') to build the real router modules",
)

import moeops  # noqa: E402

HIDDEN = 64
BF16_ULP_RTOL = 2.0 ** -7  # one bf16 ulp, relative to the value (worst case)


pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tiny models: threads only add noise


# ---------------------------------------------------------------------------------------------
# Router cases: (id, family, config kwargs, matching moeops.topk_gating kwargs)
# ---------------------------------------------------------------------------------------------

def _case(cid, family, k, cfg, gating):
    return pytest.param((family, k, tuple(sorted(cfg.items())), tuple(sorted(gating.items()))),
                        id=cid)


CASES = [
    # Mixtral always renormalises the top-k softmax probabilities.
    _case("mixtral-E8-k2", "mixtral", 2, dict(num_local_experts=8), dict(renormalize=True)),
    _case("mixtral-E8-k1", "mixtral", 1, dict(num_local_experts=8), dict(renormalize=True)),
    _case("mixtral-E64-k4", "mixtral", 4, dict(num_local_experts=64), dict(renormalize=True)),
    # Qwen2-MoE (Qwen1.5-MoE-A2.7B: 60 experts, top-4, no renorm; Qwen2-57B: 64, top-8).
    _case("qwen2moe-E60-k4-norm0", "qwen2_moe", 4, dict(num_experts=60, norm_topk_prob=False),
          dict(renormalize=False)),
    _case("qwen2moe-E60-k4-norm1", "qwen2_moe", 4, dict(num_experts=60, norm_topk_prob=True),
          dict(renormalize=True)),
    _case("qwen2moe-E64-k8-norm0", "qwen2_moe", 8, dict(num_experts=64, norm_topk_prob=False),
          dict(renormalize=False)),
    # Qwen3-MoE (128 experts, top-8, norm_topk_prob on in the released models).
    _case("qwen3moe-E128-k8-norm1", "qwen3_moe", 8, dict(num_experts=128, norm_topk_prob=True),
          dict(renormalize=True)),
    _case("qwen3moe-E128-k8-norm0", "qwen3_moe", 8, dict(num_experts=128, norm_topk_prob=False),
          dict(renormalize=False)),
    _case("qwen3moe-E8-k2-norm1", "qwen3_moe", 2, dict(num_experts=8, norm_topk_prob=True),
          dict(renormalize=True)),
    # OLMoE (64 experts, top-8, no renorm).
    _case("olmoe-E64-k8-norm0", "olmoe", 8, dict(num_experts=64, norm_topk_prob=False),
          dict(renormalize=False)),
    _case("olmoe-E64-k8-norm1", "olmoe", 8, dict(num_experts=64, norm_topk_prob=True),
          dict(renormalize=True)),
    # DeepSeek-V3: sigmoid scores, selection bias, group-limited routing, scaling factor.
    _case("dsv3-E256-k8-g8t4-norm1-rsf2.5", "deepseek_v3", 8,
          dict(n_routed_experts=256, n_group=8, topk_group=4, norm_topk_prob=True,
               routed_scaling_factor=2.5),
          dict(scoring="sigmoid", n_group=8, topk_group=4, renormalize=True,
               routed_scaling_factor=2.5)),
    _case("dsv3-E64-k8-g8t4-norm0-rsf2.5", "deepseek_v3", 8,
          dict(n_routed_experts=64, n_group=8, topk_group=4, norm_topk_prob=False,
               routed_scaling_factor=2.5),
          dict(scoring="sigmoid", n_group=8, topk_group=4, renormalize=False,
               routed_scaling_factor=2.5)),
    _case("dsv3-E64-k4-g8t4-norm1-rsf2.5", "deepseek_v3", 4,
          dict(n_routed_experts=64, n_group=8, topk_group=4, norm_topk_prob=True,
               routed_scaling_factor=2.5),
          dict(scoring="sigmoid", n_group=8, topk_group=4, renormalize=True,
               routed_scaling_factor=2.5)),
    _case("dsv3-E64-k6-g1-norm1-rsf1", "deepseek_v3", 6,
          dict(n_routed_experts=64, n_group=1, topk_group=1, norm_topk_prob=True,
               routed_scaling_factor=1.0),
          dict(scoring="sigmoid", n_group=1, topk_group=1, renormalize=True,
               routed_scaling_factor=1.0)),
    _case("dsv3-E64-k8-g1-norm0-rsf2.5", "deepseek_v3", 8,
          dict(n_routed_experts=64, n_group=1, topk_group=1, norm_topk_prob=False,
               routed_scaling_factor=2.5),
          dict(scoring="sigmoid", n_group=1, topk_group=1, renormalize=False,
               routed_scaling_factor=2.5)),
]

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
TOKENS = [1, 17, 256]
BACKENDS = ["cpp", "reference"]

# What each router computes in, for hidden states / router weights of dtype `d`:
# (router_logits dtype, top_k_weights dtype).
_FP32 = torch.float32
EXPECTED_DTYPES = {
    "mixtral": lambda d: (d, _FP32),        # softmax(logits.float()), weights stay fp32
    "qwen2_moe": lambda d: (d, d),          # weights cast back to the logits' dtype
    "qwen3_moe": lambda d: (d, d),
    "olmoe": lambda d: (d, d),
    "deepseek_v3": lambda d: (_FP32, _FP32),  # linear computed in fp32 from cast inputs
}


def _router_class_and_config(family):
    if family == "mixtral":
        from transformers.models.mixtral.configuration_mixtral import MixtralConfig as C
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter as R
    elif family == "qwen2_moe":
        from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig as C
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter as R
    elif family == "qwen3_moe":
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig as C
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter as R
    elif family == "olmoe":
        from transformers.models.olmoe.configuration_olmoe import OlmoeConfig as C
        from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter as R
    elif family == "deepseek_v3":
        from transformers.models.deepseek_v3.configuration_deepseek_v3 import (
            DeepseekV3Config as C,
        )
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
            DeepseekV3TopkRouter as R,
        )
    else:  # pragma: no cover
        raise ValueError(family)
    return R, C


@functools.cache
def _router(case, dtype):
    """The HF router module of ``case`` with random weights, in ``dtype``; built once."""
    family, k, cfg, _ = case
    R, C = _router_class_and_config(family)
    config = C(hidden_size=HIDDEN, num_experts_per_tok=k, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
               vocab_size=32, **dict(cfg))
    router = R(config).eval()
    g = torch.Generator().manual_seed(zlib.crc32(repr((family, k, cfg)).encode()))
    E = router.weight.shape[0]
    with torch.no_grad():
        # logits ~ N(0, 1) for unit-variance hidden states (the default init is all zeros,
        # which makes every score tie)
        router.weight.copy_(torch.randn(E, HIDDEN, generator=g) * HIDDEN ** -0.5)
        if family == "deepseek_v3":
            router.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.05)
    if dtype != torch.float32:
        # Like a bf16 checkpoint: the router weight in bf16; DeepSeek-V3's bias stays fp32
        # (DeepseekV3PreTrainedModel._keep_in_fp32_modules_strict).
        router.weight.data = router.weight.data.to(dtype)
    return router


def _hf_route(case, dtype, T):
    family = case[0]
    router = _router(case, dtype)
    g = torch.Generator().manual_seed(1000 + T)
    hidden = torch.randn(T, HIDDEN, generator=g).to(dtype)
    with torch.no_grad():
        logits, weights, ids = router(hidden)
    bias = router.e_score_correction_bias if family == "deepseek_v3" else None
    return router, logits, weights, ids, bias


def _selection_scores(family, logits, bias):
    """The scores each HF router ranks experts by (fp32), computed as the router does."""
    if family == "deepseek_v3":
        return logits.sigmoid() + bias
    return torch.softmax(logits.float(), dim=-1)


def _canonical(ids, sel):
    """Permutation putting each row of ``ids`` in (sel descending, id ascending) order."""
    by_id = ids.argsort(dim=-1, stable=True)
    s = sel.gather(1, ids.gather(1, by_id))
    return by_id.gather(1, torch.sort(s, dim=-1, descending=True, stable=True).indices)


def _tied_rows(sel, hf_ids):
    """Rows in which two experts competing for the chosen slots have exactly equal scores.

    The competitors are the experts whose score is at least the smallest chosen one; an exact
    duplicate among them means HF's choice or order depended on torch.topk's tie handling.
    """
    floor = sel.gather(1, hf_ids).min(dim=-1, keepdim=True).values
    s = sel.sort(dim=-1, descending=True).values
    return ((s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= floor)).any(dim=-1)


def _gate(case, logits, bias, device, backend):
    family, k, _, gating = case
    kw = dict(gating)
    if bias is not None:
        kw["bias"] = bias.to(device)
    out = moeops.topk_gating(logits.to(device), k, backend=backend, **kw)
    return out.weights.cpu(), out.ids.cpu()


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_router_parity(case, dtype, T, backend, device):
    family, k, _, _ = case
    router, logits, hf_w, hf_ids, bias = _hf_route(case, dtype, T)
    assert (logits.dtype, hf_w.dtype) == EXPECTED_DTYPES[family](dtype), \
        f"{type(router).__name__} no longer computes in the dtypes this test assumes"
    assert hf_ids.shape == (T, k)
    if T > 1:
        assert logits.float().std() > 0.5, "router logits barely vary: weights not initialised?"

    mo_w, mo_ids = _gate(case, logits, bias, device, backend)
    assert mo_ids.dtype == torch.int32 and mo_w.dtype == torch.float32
    assert mo_ids.shape == (T, k) and mo_w.shape == (T, k)
    assert (mo_ids >= 0).all(), "moeops left a slot empty although every expert is available"

    sel = _selection_scores(family, logits, bias)
    perm = _canonical(hf_ids, sel)
    hf_ids_c = hf_ids.gather(1, perm)
    hf_w_c = hf_w.gather(1, perm)
    mo_ids_l = mo_ids.long()
    tied = _tied_rows(sel, hf_ids)

    if dtype == torch.float32 or family == "deepseek_v3":
        # fp32 scores: the data has no exact ties, so the comparison below is fully exact
        assert not tied.any(), f"unexpected exact score tie in rows {tied.nonzero().flatten()}"
    elif T > 1:
        assert (~tied).sum() >= T // 2, "too many tied rows for a meaningful test"

    # exact ids on rows whose HF result does not depend on tie handling
    ok = ~tied
    bad = ok & (mo_ids_l != hf_ids_c).any(-1)
    assert not bad.any(), (
        f"id mismatch in rows {bad.nonzero().flatten().tolist()}: "
        f"hf={hf_ids_c[bad][:4].tolist()} moeops={mo_ids_l[bad][:4].tolist()}")
    if family != "deepseek_v3":
        # topk(sorted=True) routers: HF's own order must already be the canonical one
        assert torch.equal(mo_ids_l[ok], hf_ids[ok])

    if tied.any():
        # same choice up to exactly-equal scores; moeops breaks ties by lower index
        s_hf = sel.gather(1, hf_ids_c)[tied]
        s_mo = sel.gather(1, mo_ids_l)[tied]
        assert torch.equal(s_mo, s_hf), "moeops chose experts with different scores than HF"
        ids_t = mo_ids_l[tied]
        assert (ids_t.sort(-1).values.diff(dim=-1) != 0).all(), "duplicate expert in a row"
        same = s_mo[:, 1:] == s_mo[:, :-1]
        assert (ids_t[:, 1:] > ids_t[:, :-1])[same].all(), "tie not broken by lower index"
        floor = s_mo[:, -1:]
        sel_t = sel[tied]
        left_out = torch.ones_like(sel_t, dtype=torch.bool).scatter_(1, ids_t, False)
        at_floor = left_out & (sel_t == floor)
        expert = torch.arange(sel.shape[1]).expand_as(sel_t)
        assert (~at_floor | (expert > ids_t[:, -1:])).all(), \
            "a lower-index expert with the same score as the last slot was left out"

    # weights (positionally: on tied rows, slots holding equal scores carry equal weights)
    if hf_w.dtype == torch.float32:
        torch.testing.assert_close(mo_w, hf_w_c, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(mo_w.to(hf_w.dtype).float(), hf_w_c.float(),
                                   rtol=BF16_ULP_RTOL, atol=1e-6)


DSV3_CASES = [c for c in CASES if c.values[0][0] == "deepseek_v3"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DSV3_CASES)
def test_deepseek_v3_options_matter(case, dtype):
    """The bias and the group limit change HF's choice on the data used above (not vacuous),
    and leaving either out of the moeops call breaks parity."""
    _, k, cfg, gating = case
    _, logits, _, hf_ids, bias = _hf_route(case, dtype, 256)
    assert bias.abs().max() > 0
    hf_set = hf_ids.sort(-1).values

    def chosen(**overrides):
        kw = dict(gating)
        kw.update(overrides)
        return moeops.topk_gating(logits, k, bias=kw.pop("bias", bias), **kw).ids.long() \
            .sort(-1).values

    assert torch.equal(chosen(), hf_set)
    assert not torch.equal(chosen(bias=None), hf_set), "bias does not change any selection"
    assert not torch.equal(hf_set, logits.sigmoid().topk(k, dim=-1).indices.sort(-1).values)
    if dict(cfg)["n_group"] > 1:
        assert not torch.equal(chosen(n_group=1, topk_group=1), hf_set), \
            "group limit does not change any selection"
