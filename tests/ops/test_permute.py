"""route_plan / permute / combine: parity with reference.py, empty slots, determinism,
both CPU code paths, gradients and bad inputs."""

import pytest
import torch

import moeops
from moeops import reference
from support.samples import _ids

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_ids(T, K, E, seed=0, empty_frac=0.0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, K), generator=g).int()
    if empty_frac:
        ids[torch.rand(T, K, generator=g) < empty_frac] = -1
    return ids


@pytest.mark.parametrize("T,K,E,empty", [(0, 2, 4, 0.0), (1, 1, 3, 0.0), (37, 8, 128, 0.0),
                                         (50, 4, 60, 0.3), (20, 3, 512, 1.0), (64, 2, 8, 0.0)])
def test_route_plan(device, T, K, E, empty):
    ids = random_ids(T, K, E, seed=T + E, empty_frac=empty)
    got = moeops.route_plan(ids.to(device), E, backend="cpp")
    want = reference.route_plan(ids, E)
    for a, b, name in zip(got, want, ("offsets", "sorted_slots", "inverse")):
        assert a.dtype == torch.int32, name
        assert torch.equal(a.cpu(), b), name


def test_route_plan_one_expert_and_unused_experts(device):
    ids = torch.full((30, 2), 5, dtype=torch.int32)
    ids[:, 1] = -1
    off, ss, inv = moeops.route_plan(ids.to(device), 8)
    assert off.cpu().tolist() == [0] * 6 + [30] * 3
    assert ss.cpu()[:30].tolist() == list(range(0, 60, 2)) and (ss.cpu()[30:] == -1).all()
    assert (inv.cpu()[1::2] == -1).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", [1, 7, 64, 200])
def test_permute_and_combine(device, cpu_isa, dtype, H):
    for T, K, E, empty in [(0, 2, 4, 0.0), (1, 1, 3, 0.0), (33, 4, 16, 0.25), (16, 8, 8, 1.0)]:
        ids = random_ids(T, K, E, seed=H, empty_frac=empty)
        _, ss, inv = reference.route_plan(ids, E)
        g = torch.Generator().manual_seed(T)
        h = torch.randn(T, H, generator=g).to(dtype)
        scale = torch.rand(T * K, generator=g)
        for sc in (None, scale):
            got = moeops.permute(h.to(device), ss.to(device), K,
                                 None if sc is None else sc.to(device), backend="cpp")
            want = reference.permute(h, ss, K, sc)
            assert got.dtype == dtype
            torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
        rows = torch.randn(T * K, H, generator=g).to(dtype)
        w = torch.rand(T, K, generator=g)
        got = moeops.combine(rows.to(device), w.to(device), inv.to(device), backend="cpp")
        want = reference.combine(rows, w, inv)
        assert got.dtype == dtype and got.shape == (T, H)
        # fp32 accumulation in slot order: at most one rounding of the output dtype apart
        tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
        torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)


def test_pipeline_roundtrip_identity_experts(device, cpu_isa):
    """gating -> plan -> permute -> combine with identity experts gives sum(w) * x."""
    T, E, K, H = 64, 16, 4, 48
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=g).to(device)
    x = torch.randn(T, H, generator=g).to(device)
    r = moeops.topk_gating(logits, K, renormalize=True)
    plan = moeops.route_plan(r.ids, E)
    rows = moeops.permute(x, plan.sorted_slots, K)
    out = moeops.combine(rows, r.weights, plan.inverse)
    torch.testing.assert_close(out, x * r.weights.sum(1, keepdim=True), rtol=1e-5, atol=1e-5)


def test_combine_is_deterministic(device, cpu_isa):
    T, K, H = 256, 8, 512
    ids = random_ids(T, K, 32, seed=3)
    _, _, inv = reference.route_plan(ids, 32)
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(T * K, H, generator=g).to(device)
    w = torch.rand(T, K, generator=g).to(device)
    outs = [moeops.combine(rows, w, inv.to(device)) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    torch.set_num_threads(1)
    try:
        one = moeops.combine(rows, w, inv.to(device))
    finally:
        torch.set_num_threads(2)
    assert torch.equal(outs[0], one)


def test_non_contiguous_hidden(device):
    T, K, E, H = 10, 2, 4, 16
    ids = random_ids(T, K, E)
    _, ss, inv = reference.route_plan(ids, E)
    base = torch.randn(T, 2 * H)
    h = base[:, ::2]
    torch.testing.assert_close(moeops.permute(h.to(device), ss.to(device), K).cpu(),
                               reference.permute(h, ss, K))
    ht = torch.randn(H, T).t()
    torch.testing.assert_close(moeops.permute(ht.to(device), ss.to(device), K).cpu(),
                               reference.permute(ht, ss, K))


def test_gradients_match_reference(device):
    T, K, E, H = 12, 3, 6, 8
    ids = random_ids(T, K, E, seed=2, empty_frac=0.2)
    _, ss, inv = reference.route_plan(ids, E)
    g = torch.Generator().manual_seed(0)
    h, scale = torch.randn(T, H, generator=g), torch.rand(T * K, generator=g)
    rows, w = torch.randn(T * K, H, generator=g), torch.rand(T, K, generator=g)
    gp, gc = torch.randn(T * K, H, generator=g), torch.randn(T, H, generator=g)

    def grads(fn_p, fn_c, dev):
        hh, ss_, rr, ww = (t.clone().to(dev).requires_grad_() for t in (h, scale, rows, w))
        (fn_p(hh, ss.to(dev), K, ss_) * gp.to(dev)).sum().backward()
        (fn_c(rr, ww, inv.to(dev)) * gc.to(dev)).sum().backward()
        return [t.grad.cpu() for t in (hh, ss_, rr, ww)]

    got = grads(moeops.permute, moeops.combine, device)
    want = grads(reference.permute, reference.combine, "cpu")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64_reference_semantics():
    """The autograd formulas are checked against finite differences through the fp32 kernels."""
    T, K, E, H = 5, 2, 4, 3
    ids = _ids(T, K, E, "cpu", empty_every=3)
    _, ss, inv = reference.route_plan(ids, E)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(T * K, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, K, generator=g, dtype=torch.float64, requires_grad=True)
    f = lambda r, ww: moeops.combine(r.float(), ww.float(), inv).double()  # noqa: E731
    torch.autograd.gradcheck(f, (rows, w), eps=1e-3, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("call,match", [
    (lambda: moeops.route_plan(torch.zeros(4, dtype=torch.int32), 4), "ids must be 2-D"),
    (lambda: moeops.route_plan(torch.zeros(2, 2, dtype=torch.int64), 4), "ids must be Int"),
    (lambda: moeops.route_plan(torch.tensor([[0, 4]], dtype=torch.int32), 4), "ids must be in"),
    (lambda: moeops.route_plan(torch.tensor([[0, -2]], dtype=torch.int32), 4), "ids must be in"),
    (lambda: moeops.route_plan(torch.zeros(2, 2, dtype=torch.int32), 0), "num_experts must be"),
    (lambda: moeops.permute(torch.zeros(4), torch.zeros(4, dtype=torch.int32), 1),
     "hidden must be 2-D"),
    (lambda: moeops.permute(torch.zeros(2, 4), torch.tensor([0, 5], dtype=torch.int32), 2),
     "out of range"),
    (lambda: moeops.permute(torch.zeros(2, 4, dtype=torch.int32),
                            torch.zeros(2, dtype=torch.int32), 1),
     "hidden must be float32"),
    (lambda: moeops.permute(torch.zeros(2, 4), torch.zeros(2, dtype=torch.int32), 1,
                            torch.zeros(3)), "slot_scale must have"),
    (lambda: moeops.combine(torch.zeros(4, 3), torch.zeros(2, 2), torch.tensor([0, 1, 2, 4],
                                                                               dtype=torch.int32)),
     "out of range"),
    (lambda: moeops.combine(torch.zeros(4, 3), torch.zeros(2, 2),
                            torch.zeros(3, dtype=torch.int32)),
     "inverse must have"),
    (lambda: moeops.combine(torch.zeros(4, 3), torch.zeros(2, 2, dtype=torch.float16),
                            torch.zeros(4, dtype=torch.int32)), "weights must be Float"),
])
def test_bad_inputs(call, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call()
