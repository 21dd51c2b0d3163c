"""Long prompts: permute and combine over more than 2^31 elements (T*K*H), where 32-bit index
arithmetic would overflow. bf16 on CPU, about 5.5 GB of memory; marked slow."""

import pytest
import torch

import moeops
from moeops import reference


@pytest.mark.slow
def test_permute_combine_beyond_2_31_elements():
    T, K, E, H = 16384, 8, 64, 16400  # T*K*H = 2.15e9 > 2^31 elements in the permuted rows
    assert T * K * H > 2**31
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(64)]).int().repeat(T // 64, 1)
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
