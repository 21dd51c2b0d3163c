"""topk_gating: parity with reference.py over shapes, dtypes and every routing option,
edge cases (ties, NaN, masks, forced experts, groups), gradients and bad inputs."""

import itertools

import pytest
import torch

import moeops
from moeops import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check(device, logits, k, **kw):
    """Run kernel and reference with the same arguments and compare everything."""
    got = moeops.topk_gating(logits.to(device), k, backend="cpp", **{
        n: (v.to(device) if isinstance(v, torch.Tensor) else v) for n, v in kw.items()})
    want = reference.topk_gating(logits, k, **kw)
    assert got.ids.dtype == torch.int32 and got.weights.dtype == torch.float32
    assert torch.equal(got.ids.cpu(), want[1]), (got.ids.cpu(), want[1])
    torch.testing.assert_close(got.weights.cpu(), want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.probs.cpu(), want[2], rtol=1e-5, atol=1e-7)
    assert torch.equal(got.counts.cpu(), want[3])
    return got


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("E", [3, 8, 60, 128, 160, 256, 512])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_sweep(device, E, dtype):
    for T, k, scoring, renorm in itertools.product(
            [0, 1, 37], sorted({1, 2, min(8, E), E}), ["softmax", "sigmoid"], [False, True]):
        x = randn(T, E, dtype=dtype, seed=T * 1000 + E + k, scale=2.0)
        check(device, x, k, scoring=scoring, renormalize=renorm,
              routed_scaling_factor=1.0 if scoring == "softmax" else 2.5,
              return_probs=True, return_counts=True)


def test_ties_pick_lower_index(device):
    # integer logits: many exact ties; bf16 makes them even more common
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (64, 16), generator=g).float()
    for k in (1, 3, 16):
        got = check(device, x, k, return_counts=True)
    x = torch.zeros(4, 10)
    got = check(device, x, 4)
    assert got.ids.cpu().tolist() == [[0, 1, 2, 3]] * 4


def test_all_tokens_to_one_expert_and_empty_experts(device):
    x = randn(50, 16)
    x[:, 3] += 100.0
    got = check(device, x, 1, return_counts=True)
    counts = got.counts.cpu()
    assert counts[3] == 50 and counts.sum() == 50 and (counts == 0).sum() == 15


@pytest.mark.parametrize("mode", ["reroute", "drop", "drop_renorm"])
@pytest.mark.parametrize("per_token", [False, True])
def test_masks(device, mode, per_token):
    T, E, k = 40, 12, 3
    x = randn(T, E, seed=5)
    g = torch.Generator().manual_seed(7)
    mask = torch.rand((T, E) if per_token else (E,), generator=g) < 0.3
    for renorm in (False, True):
        got = check(device, x, k, mask=mask, mask_mode=mode, renormalize=renorm,
                    return_counts=True)
        ids = got.ids.cpu().long()
        m = mask.expand(T, E)
        chosen_masked = m.gather(1, ids.clamp(min=0)) & (ids >= 0)
        assert not chosen_masked.any(), "a masked expert kept its slot"
    if mode == "reroute":  # enough unmasked experts: every slot filled
        assert (got.ids >= 0).all() or (mask.expand(T, E).sum(1) > E - k).any()


@pytest.mark.parametrize("mode", ["reroute", "drop", "drop_renorm"])
def test_every_slot_masked(device, mode):
    x = randn(9, 8)
    mask = torch.ones(8, dtype=torch.bool)
    got = check(device, x, 3, mask=mask, mask_mode=mode, renormalize=True, return_counts=True)
    assert (got.ids.cpu() == -1).all() and (got.weights.cpu() == 0).all()
    assert (got.counts.cpu() == 0).all()


def test_fewer_experts_left_than_k(device):
    x = randn(5, 6)
    mask = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)
    got = check(device, x, 4, mask=mask)
    ids = got.ids.cpu()
    assert (ids[:, 2:] == -1).all() and set(ids[:, :2].flatten().tolist()) <= {4, 5}


def test_drop_renorm_keeps_total_weight(device):
    x = randn(30, 10, seed=3)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[1, 4]] = True
    full = moeops.topk_gating(x.to(device), 4, renormalize=True).weights.cpu()
    got = check(device, x, 4, mask=mask, mask_mode="drop_renorm", renormalize=True)
    some_left = (got.ids.cpu() >= 0).any(1)
    torch.testing.assert_close(got.weights.cpu().sum(1)[some_left], full.sum(1)[some_left])
    dropped = check(device, x, 4, mask=mask, mask_mode="drop", renormalize=True)
    keep = dropped.ids.cpu() >= 0
    torch.testing.assert_close(dropped.weights.cpu()[keep], full[keep])  # drop: no renorm


@pytest.mark.parametrize("per_token", [False, True])
def test_forced_experts(device, per_token):
    T, E, k = 20, 16, 4
    x = randn(T, E, seed=11)
    forced = torch.zeros((T, E) if per_token else (E,), dtype=torch.bool)
    if per_token:
        forced[torch.arange(T), torch.arange(T) % E] = True
    else:
        forced[[2, 9]] = True
    got = check(device, x, k, forced=forced, renormalize=True)
    f = forced.expand(T, E)
    ids = got.ids.cpu().long()
    assert f.gather(1, ids).sum(1).eq(f.sum(1)).all(), "a forced expert has no slot"
    # forced experts come first
    nf = f.sum(1)
    for t in range(T):
        assert f[t, ids[t, : nf[t]]].all()
    # forcing wins over masking; more forced than k keeps the best-scored forced ones
    mask = forced.clone()
    check(device, x, k, forced=forced, mask=mask, mask_mode="reroute")
    check(device, x, k, forced=forced, mask=mask, mask_mode="drop_renorm")
    many = torch.ones(E, dtype=torch.bool)
    many[:3] = False
    check(device, x, k, forced=many)


@pytest.mark.parametrize("E,n_group,topk_group,k", [(256, 8, 4, 8), (64, 8, 3, 6), (16, 4, 1, 2),
                                                    (60, 30, 5, 4)])
def test_group_limited_with_bias(device, E, n_group, topk_group, k):
    T = 33
    x = randn(T, E, seed=E)
    bias = randn(E, seed=1, scale=0.05)
    for renorm in (False, True):
        got = check(device, x, k, scoring="sigmoid", bias=bias, n_group=n_group,
                    topk_group=topk_group, renormalize=renorm, routed_scaling_factor=2.5,
                    return_counts=True)
        groups = got.ids.cpu().long() // (E // n_group)
        assert max(len(set(r.tolist())) for r in groups) <= topk_group
    # masked experts reroute within the group limits too
    mask = torch.zeros(E, dtype=torch.bool)
    mask[::3] = True
    check(device, x, k, scoring="sigmoid", bias=bias, n_group=n_group, topk_group=topk_group,
          mask=mask)


def test_bias_chooses_but_does_not_weigh(device):
    x = torch.zeros(2, 4)
    bias = torch.tensor([0.0, 0.0, 1.0, 0.0])
    got = check(device, x, 1, scoring="sigmoid", bias=bias)
    assert got.ids.cpu().tolist() == [[2], [2]]
    torch.testing.assert_close(got.weights.cpu(), torch.full((2, 1), 0.5))


def test_nan_and_inf_logits(device):
    x = randn(6, 8)
    x[0, 3] = float("nan")  # softmax: whole row NaN -> all slots empty
    x[1, :] = float("-inf")  # softmax of all -inf is NaN -> empty
    x[2, 5] = float("-inf")  # probability 0: still selectable, ranks last
    got = check(device, x, 3)
    ids = got.ids.cpu()
    assert (ids[0] == -1).all() and (ids[1] == -1).all() and (ids[2] >= 0).all()
    got = check(device, x, 8)
    assert (got.ids.cpu()[2] == 5).any()
    # sigmoid: a NaN expert is never selected, the rest are
    got = check(device, x, 8, scoring="sigmoid")
    assert 3 not in got.ids.cpu()[0].tolist() and (got.ids.cpu()[0] == -1).sum() == 1


def test_non_contiguous_logits(device):
    base = randn(16, 40)
    x = base.t()[:, :16]  # [40, 16] strided
    assert not x.is_contiguous()
    check(device, x, 3, renormalize=True)
    check(device, base[:, ::2], 2)


def test_gradient_matches_reference(device):
    x = randn(12, 10, seed=4)
    bias = randn(10, seed=6, scale=0.1)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[1] = True
    for kw in (dict(renormalize=True),
               dict(scoring="sigmoid", bias=bias, routed_scaling_factor=2.0),
               dict(mask=mask, mask_mode="drop_renorm", renormalize=True)):
        a = x.clone().to(device).requires_grad_()
        b = x.clone().requires_grad_()
        ga = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
        w = moeops.topk_gating(a, 3, **{n: (v.to(device) if isinstance(v, torch.Tensor) else v)
                                        for n, v in kw.items()}).weights
        (w * ga.to(device)).sum().backward()
        (reference.topk_gating(b, 3, **kw)[0] * ga).sum().backward()
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-5, atol=1e-7)


def test_gradcheck_through_probs():
    x = randn(4, 6, seed=2).double()

    def f(logits):
        r = moeops.topk_gating(logits.float(), 2, renormalize=True, return_probs=True)
        return r.weights.double(), r.probs.double()

    # float32 kernel: check the analytic gradient against finite differences loosely
    x.requires_grad_()
    torch.autograd.gradcheck(f, (x,), eps=1e-3, atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("bad,match", [
    (lambda x: dict(logits=x[0]), "logits must be 2-D"),
    (lambda x: dict(logits=x.int()), "logits must be float32, float16 or bfloat16"),
    (lambda x: dict(logits=x.double()), "logits must be float32"),
    (lambda x: dict(k=9), r"k must be in \[1, E=8\]"),
    (lambda x: dict(k=0), r"k must be in \[1, E=8\]"),
    (lambda x: dict(logits=torch.zeros(2, 513)), "1..512 experts"),
    (lambda x: dict(scoring="relu"), "scoring must be"),
    (lambda x: dict(mask_mode="zap", mask=torch.zeros(8, dtype=torch.bool)), "mask_mode must be"),
    (lambda x: dict(mask=torch.zeros(7, dtype=torch.bool)), r"mask must have shape \[E\]"),
    (lambda x: dict(mask=torch.zeros(8)), "mask must be a bool tensor"),
    (lambda x: dict(forced=torch.zeros(3, 8, dtype=torch.bool)), "forced must have shape"),
    (lambda x: dict(bias=torch.zeros(7)), r"bias must have shape \[E\]"),
    (lambda x: dict(n_group=3), "n_group must divide E"),
    (lambda x: dict(n_group=8), "at least 2 experts per group"),
    (lambda x: dict(n_group=2, topk_group=3), "topk_group must be in"),
    (lambda x: dict(mask=torch.zeros(8, dtype=torch.bool, device="meta")), "mask is on meta"),
    (lambda x: dict(bias=torch.zeros(8, device="meta")), "bias is on meta"),
])
def test_bad_inputs(bad, match):
    x = randn(5, 8)
    kw = dict(logits=x, k=2)
    kw.update(bad(x))
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        moeops.topk_gating(kw.pop("logits"), kw.pop("k"), backend="cpp", **kw)


def test_backend_choice():
    x = randn(3, 8)
    a = moeops.topk_gating(x, 2, backend="reference")
    b = moeops.topk_gating(x, 2, backend="cpp")
    assert torch.equal(a.ids, b.ids)
    with pytest.raises(ValueError, match="backend must be one of"):
        moeops.topk_gating(x, 2, backend="fast")
    if not moeops._C.with_cuda:
        from moeops._dispatch import why_not_cpp
        assert "built without CUDA" in why_not_cpp(torch.device("cuda"))
