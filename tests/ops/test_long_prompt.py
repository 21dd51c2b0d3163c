"""Long prompts: permute, combine and fused experts over more than 2^31 elements (T*K*H), where
32-bit index arithmetic would overflow. bf16 on CPU; permute/combine need about 5.5 GB of memory,
fused experts about 2.5 GB (its fp32 scratch is bounded by the workspace limit: token chunks).
Marked slow."""

import pytest
import torch

import moeops
from moeops import reference


@pytest.mark.slow
def test_permute_combine_beyond_2_31_elements():
    T, K, E, H = 16384, 8, 64, 16400  # T*K*H = 2.15e9 > 2^31 elements in the permuted rows
    assert T * K * H > 2**31
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(E, generator=g)[:K]
                       for _ in range(64)]).int().repeat(T // 64, 1)
    hidden = torch.empty(T, H, dtype=torch.bfloat16)
    hidden.view(torch.int16).copy_(torch.arange(T, dtype=torch.int16).unsqueeze(1))  # row-id bits
    hidden[:, -1] = torch.arange(T).float().bfloat16()
    plan = moeops.route_plan(ids, E)
    rows = moeops.permute(hidden, plan.sorted_slots, K)
    assert rows.shape == (T * K, H)
    # spot-check rows whose byte offsets are far beyond 2^31 elements against the reference
    idx = torch.tensor([0, T * K // 2, T * K - 3, T * K - 1])
    want = reference.permute(hidden, plan.sorted_slots[idx], K)
    assert torch.equal(rows[idx], want)
    w = torch.full((T, K), 1.0 / K)
    out = moeops.combine(rows, w, plan.inverse)
    del rows
    assert out.shape == (T, H)
    # every token's K rows are copies of itself with weights summing to 1: out == hidden
    assert torch.equal(out[:, -1], hidden[:, -1])
    assert torch.equal(out[-4:], hidden[-4:]) and torch.equal(out[:4], hidden[:4])


@pytest.mark.slow
def test_fused_experts_beyond_2_31_elements():
    T, K, E, H, I = 65600, 8, 8, 4096, 16  # T*K*H = 2.15e9 > 2^31 slot elements
    assert T * K * H > 2**31
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(T, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:K]
                       for _ in range(64)]).int().repeat(T // 64 + 1, 1)[:T]
    ids[-1, 3] = -1  # an empty slot at the far end
    weights = torch.rand(T, K, generator=g)
    w_up = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).bfloat16()
    w_down = (torch.randn(E, H, I, generator=g) * I ** -0.5).bfloat16()
    out = moeops.fused_experts(hidden, ids, weights, w_up, w_down, backend="cpp")
    assert out.shape == (T, H)
    # tokens at both ends, around the 2^31/(K*H) boundary and at random, against the reference
    edge = 2**31 // (K * H)
    idx = torch.cat([torch.arange(3), torch.arange(edge - 2, edge + 2), torch.arange(T - 3, T),
                     torch.randint(0, T, (24,), generator=g)])
    want = reference.fused_experts(hidden[idx], ids[idx], weights[idx], w_up, w_down)
    torch.testing.assert_close(out[idx].float(), want.float(), rtol=1.6e-2, atol=1e-2)
    assert torch.isfinite(out[::97].float()).all()
