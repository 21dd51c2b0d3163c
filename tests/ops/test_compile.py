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
    torch.testing.assert_close(compiled(x2, router_w, expert_w, 2),
                               routing_layer(x2, router_w, expert_w, 2))


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


def test_compiled_backward_with_non_contiguous_weights():
    """A compiled (inductor) training step with a transposed-view w_down gives eager's gradients
    (the backward op's fake returns contiguous tensors, like the real op)."""
    T, H, I, E, K = 6, 16, 8, 4, 2
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g, requires_grad=True)
    ids = torch.randint(0, E, (T, K), generator=g).int()
    w = torch.rand(T, K, generator=g)
    w_up = (torch.randn(E, 2 * I, H, generator=g) * 0.2).requires_grad_()
    w_down = (torch.randn(E, I, H, generator=g) * 0.2).transpose(1, 2).detach().requires_grad_()
    assert not w_down.is_contiguous()

    def step(h, wu, wd):
        return moeops.fused_experts(h, ids, w, wu, wd).square().sum()

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="inductor")):
        loss = fn(hidden, w_up, w_down)
        grads.append(torch.autograd.grad(loss, (hidden, w_up, w_down)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
