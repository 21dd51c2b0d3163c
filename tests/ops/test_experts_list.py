"""fused_experts_list (per-expert weight tensors, transformers 4.x layout): parity with the
reference and with fused_experts on the stacked weights, gradients, bad inputs."""

import pytest
import torch

import moeops
from moeops import reference


def make(T, H, I, E, K, dtype, seed=0, empty=0.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int() if T else \
        torch.zeros(0, K, dtype=torch.int32)
    if empty and T:
        ids[torch.rand(T, K, generator=g) < empty] = -1
    w = torch.rand(T, K, generator=g)
    wg = [(torch.randn(I, H, generator=g) * 0.1).to(dtype) for _ in range(E)]
    wu = [(torch.randn(I, H, generator=g) * 0.1).to(dtype) for _ in range(E)]
    wd = [(torch.randn(H, I, generator=g) * 0.1).to(dtype) for _ in range(E)]
    return h, ids, w, wg, wu, wd


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)], ids=str)
@pytest.mark.parametrize("T,H,I,E,K,act,empty", [(0, 16, 8, 2, 1, "silu", 0.0),
                                                 (1, 40, 24, 4, 2, "silu", 0.0),
                                                 (19, 72, 48, 8, 3, "gelu", 0.3),
                                                 (64, 64, 32, 8, 2, "silu", 0.0)])
def test_parity(cpu_isa, dtype, tol, T, H, I, E, K, act, empty):
    h, ids, w, wg, wu, wd = make(T, H, I, E, K, dtype, seed=T, empty=empty)
    got = moeops.fused_experts_list(h, ids, w, wg, wu, wd, activation=act, backend="cpp")
    want = reference.fused_experts_list(h, ids, w, wg, wu, wd, act)
    assert got.dtype == dtype and got.shape == (T, H)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    stacked = moeops.fused_experts(h, ids, w, torch.cat([torch.stack(wg), torch.stack(wu)], 1),
                                   torch.stack(wd), activation=act)
    assert torch.equal(got, stacked), "list and stacked layouts must run the same arithmetic"


def test_reads_weights_in_place():
    """The weights are used where they live: changing one expert's tensor changes the output."""
    h, ids, w, wg, wu, wd = make(8, 32, 16, 4, 2, torch.float32)
    ids[:, 0] = 1
    before = moeops.fused_experts_list(h, ids, w, wg, wu, wd)
    wd[1].mul_(2.0)
    after = moeops.fused_experts_list(h, ids, w, wg, wu, wd)
    assert not torch.allclose(before, after)


def test_gradients_match_reference():
    h, ids, w, wg, wu, wd = make(10, 24, 12, 4, 2, torch.float32, seed=3, empty=0.2)

    def grads(fn):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        g_, u_, d_ = ([t.clone().requires_grad_() for t in ts] for ts in (wg, wu, wd))
        out = fn(hh, ids, ww, g_, u_, d_)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return [hh.grad, ww.grad] + [t.grad if t.grad is not None else torch.zeros_like(t)
                                     for t in g_ + u_ + d_]

    for a, b in zip(grads(moeops.fused_experts_list), grads(reference.fused_experts_list)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(wg=a["wg"][:-1]), "same number"),
    (lambda a: a.update(wd=[t.t() for t in a["wd"]]), r"w_down\[0\] must be \[H, I\]"),
    (lambda a: a.update(wg=[torch.randn(32, 16).t() for _ in a["wg"]]), "must be contiguous"),
    (lambda a: a.update(wu=[t.half() for t in a["wu"]]), "w_gate and w_up must share a dtype"),
    (lambda a: a.update(ids=a["ids"].long()), "ids must be Int"),
    (lambda a: a.update(act="tanh"), "activation must be one of"),
    (lambda a: a["ids"].__setitem__((0, 0), 9), r"ids must be in \[-1, E=4\)"),
])
def test_bad_inputs(mutate, match):
    h, ids, w, wg, wu, wd = make(6, 32, 16, 4, 2, torch.float32)
    a = dict(h=h, ids=ids, w=w, wg=wg, wu=wu, wd=wd, act="silu")
    mutate(a)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        moeops.fused_experts_list(a["h"], a["ids"], a["w"], a["wg"], a["wu"], a["wd"],
                                  activation=a["act"], backend="cpp")
