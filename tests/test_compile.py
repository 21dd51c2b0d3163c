"""torch.compile(fullgraph=True) over a routing pipeline: no graph breaks, same results."""

import torch

import moeops


def routing_layer(x, router_w, expert_w, k: int):
    logits = x @ router_w.t()
    w, ids, _, _ = torch.ops.moeops.topk_gating(logits, k, "softmax", True)
    offsets, sorted_slots, inverse = torch.ops.moeops.route_plan(ids, router_w.shape[0])
    rows = torch.ops.moeops.permute(x, sorted_slots, k)
    rows = torch.tanh(rows @ expert_w)  # stand-in experts (one shared matrix)
    return torch.ops.moeops.combine(rows, w, inverse)


def test_compile_fullgraph_matches_eager(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, generator=g).to(device)
    router_w = torch.randn(8, 16, generator=g).to(device)
    expert_w = torch.randn(16, 16, generator=g).to(device)
    eager = routing_layer(x, router_w, expert_w, 2)
    torch._dynamo.reset()
    compiled = torch.compile(routing_layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, router_w, expert_w, 2), eager)
    # and with a different token count (dynamic shapes, no recompiles needed for correctness)
    x2 = torch.randn(5, 16, generator=g).to(device)
    torch.testing.assert_close(compiled(x2, router_w, expert_w, 2), routing_layer(x2, router_w, expert_w, 2))


def test_compile_backward(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 16, generator=g).to(device)
    router_w = torch.randn(8, 16, generator=g).to(device)
    expert_w = torch.randn(16, 16, generator=g).to(device)

    def grads(fn):
        rw = router_w.clone().requires_grad_()
        ew = expert_w.clone().requires_grad_()
        fn(x, rw, ew, 2).square().sum().backward()
        return rw.grad, ew.grad

    want = grads(routing_layer)
    torch._dynamo.reset()
    got = grads(torch.compile(routing_layer, fullgraph=True, backend="aot_eager"))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_wrappers_compile():
    """The public Python wrappers trace too (backend choice happens at trace time)."""
    def f(logits, x):
        r = moeops.topk_gating(logits, 2, renormalize=True)
        plan = moeops.route_plan(r.ids, logits.shape[1])
        return moeops.combine(moeops.permute(x, plan.sorted_slots, 2), r.weights, plan.inverse)

    g = torch.Generator().manual_seed(2)
    logits, x = torch.randn(9, 6, generator=g), torch.randn(9, 4, generator=g)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(logits, x), f(logits, x))
