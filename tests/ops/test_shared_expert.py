"""The shared-expert term of fused_experts / fused_experts_list: out += shared_gate * shared_out
inside the same fp32 combine (Qwen2-MoE's sigmoid-gated shared expert)."""

import pytest
import torch

import moeops
from moeops import reference


def make(T=12, H=40, I=24, E=4, K=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
    ids[0, :] = -1  # a token with no routed expert still gets its shared term
    w = torch.rand(T, K, generator=g)
    wu = (torch.randn(E, 2 * I, H, generator=g) * 0.1).to(dtype)
    wd = (torch.randn(E, H, I, generator=g) * 0.1).to(dtype)
    so = torch.randn(T, H, generator=g).to(dtype)
    sg = torch.rand(T, 1, generator=g).to(dtype)
    return h, ids, w, wu, wd, so, sg


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)], ids=str)
@pytest.mark.parametrize("gate_shape", ["none", "T", "T1"])
def test_parity(cpu_isa, dtype, tol, gate_shape):
    h, ids, w, wu, wd, so, sg = make(dtype=dtype)
    gate = {"none": None, "T": sg.reshape(-1), "T1": sg}[gate_shape]
    got = moeops.fused_experts(h, ids, w, wu, wd, shared_out=so, shared_gate=gate, backend="cpp")
    want = reference.fused_experts(h, ids, w, wu, wd, shared_out=so, shared_gate=gate)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    plain = moeops.fused_experts(h, ids, w, wu, wd)
    g = 1.0 if gate is None else gate.float().reshape(-1, 1)
    torch.testing.assert_close(got.float(), plain.float() + g * so.float(), rtol=tol, atol=2 * tol)
    # the list layout runs the same arithmetic
    I = wd.shape[2]
    lst = moeops.fused_experts_list(h, ids, w, list(wu[:, :I]), list(wu[:, I:]), list(wd),
                                    shared_out=so, shared_gate=gate)
    assert torch.equal(lst, got)


def test_gradients_match_reference():
    h, ids, w, wu, wd, so, sg = make(seed=2)

    def grads(fn):
        ts = [t.clone().requires_grad_() for t in (h, w, wu, wd, so, sg)]
        out = fn(ts[0], ids, ts[1], ts[2], ts[3], shared_out=ts[4], shared_gate=ts[5])
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return [t.grad for t in ts]

    for a, b in zip(grads(moeops.fused_experts), grads(reference.fused_experts)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw,match", [
    (lambda so, sg: dict(shared_out=so[:-1]), "shared_out must have the shape of hidden"),
    (lambda so, sg: dict(shared_out=so, shared_gate=sg[:-1]), r"shared_gate must be \[T\]"),
    (lambda so, sg: dict(shared_gate=sg), "shared_gate given without shared_out"),
    (lambda so, sg: dict(shared_out=so.int()), "shared_out must be float32"),
])
def test_bad_inputs(kw, match):
    h, ids, w, wu, wd, so, sg = make()
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        moeops.fused_experts(h, ids, w, wu, wd, backend="cpp", **kw(so, sg))


def test_qwen2_moe_block_fuses_shared_expert():
    """A patched transformers-5 Qwen2-MoE block hands its gated shared expert to fused_experts
    (one op per layer, the block adds nothing itself) and matches the unpatched model, so the
    shared term must be inside the op's combine."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 5.x block layout "
                    "(4.x is covered by tests/integrations/test_hf_v4.py)")
    from moeops.integrations import hf
    from support.hf_tiny import OpCounter, tiny_model

    model = tiny_model("qwen2_moe", seed=5)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        moeops.patch(model)
        blocks = [m for m in model.modules() if type(m).__name__ == "Qwen2MoeSparseMoeBlock"]
        assert blocks and all(m.forward.fn is hf.block_forward("qwen2_moe")[1] for m in blocks)
        with OpCounter() as c:
            got = model(ids).logits
    moeops.unpatch(model)
    assert c.counts["moeops::fused_experts"] == len(blocks)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
