"""pytest-benchmark suite: routing stages, moeops vs the torch reference, real model shapes
(``moeops.models.LAYERS``; ``moeops bench --suite routing`` is :mod:`moeops.bench.routing`).

Run: ``python -m pytest bench -q --benchmark-only --benchmark-group-by=param:model,param:stage``.
Correctness is checked once per case before timing; nothing here asserts on time.
"""

import pytest
import torch

from moeops import models, reference
from moeops.bench.routing import CppOps

TOKENS = int(__import__("os").environ.get("MOEOPS_BENCH_TOKENS", "1024"))
IMPLS = {"moeops": CppOps, "reference": reference}


@pytest.fixture(scope="module", params=sorted(models.LAYERS))
def case(request):
    s = models.LAYERS[request.param]
    m = dict(E=s.E, K=s.K, H=s.H, I=s.I, I_shared=s.I_shared, n_group=s.n_group,
             topk_group=s.topk_group)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(TOKENS, m["E"], generator=g)
    hidden = torch.randn(TOKENS, m["H"], generator=g).bfloat16()
    gkw = dict(n_group=s.n_group, topk_group=s.topk_group)
    scoring = "sigmoid" if models.FAMILIES[s.family].sigmoid_router else "softmax"
    w, ids, _, _ = reference.topk_gating(logits, m["K"], scoring, True, 1.0, None, **gkw)
    plan = reference.route_plan(ids, m["E"])
    rows = reference.permute(hidden, plan[1], m["K"])
    return dict(model=request.param, m=m, logits=logits, hidden=hidden, gkw=gkw, scoring=scoring,
                w=w, ids=ids, plan=plan, rows=rows)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("stage", ["gating", "route_plan", "permute", "combine"])
def test_routing_stage(benchmark, case, impl, stage):
    ops, m, K = IMPLS[impl], case["m"], case["m"]["K"]
    calls = {
        "gating": lambda: ops.topk_gating(case["logits"], K, case["scoring"], True, 1.0, None,
                                          **case["gkw"]),
        "route_plan": lambda: ops.route_plan(case["ids"], m["E"]),
        "permute": lambda: ops.permute(case["hidden"], case["plan"][1], K),
        "combine": lambda: ops.combine(case["rows"], case["w"], case["plan"][2]),
    }
    fn = calls[stage]
    out, want = fn(), getattr(reference, stage if stage != "gating" else "topk_gating")
    ref = {"gating": lambda: want(case["logits"], K, case["scoring"], True, 1.0, None,
                                  **case["gkw"]),
           "route_plan": lambda: want(case["ids"], m["E"]),
           "permute": lambda: want(case["hidden"], case["plan"][1], K),
           "combine": lambda: want(case["rows"], case["w"], case["plan"][2])}[stage]()
    if stage in ("gating", "route_plan"):
        assert torch.equal(out[1], ref[1])
    else:
        torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    benchmark.extra_info.update(model=case["model"], tokens=TOKENS, **m)
    benchmark(fn)
