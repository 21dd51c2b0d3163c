"""Typed Python wrappers of the ``torch.ops.moeops`` ops, their fake (meta) kernels and autograd
formulas, one module per kernel family (the same families as ``csrc/``):

* :mod:`moeops.ops.gating`: ``topk_gating`` (``csrc/gating/``);
* :mod:`moeops.ops.permute`: ``route_plan``, ``permute``, ``combine`` (``csrc/permute/``);
* :mod:`moeops.ops.experts`: ``grouped_gemm``, ``fused_experts``, ``fused_experts_list``,
  ``fused_experts_stats`` (``csrc/experts/``);
* :mod:`moeops.ops.moex`: ``moex_router_stats``, ``moex_route``, ``moex_experts``,
  ``moex_code`` (``csrc/moex/``).

Each wrapper picks a backend (``"auto"``, ``"cpp"``, ``"reference"``, or ``"triton"`` for
grouped_gemm / fused_experts; see :mod:`moeops._dispatch`). Each op also has a
``register_fake`` kernel (shapes only, for ``torch.compile`` and meta tensors) and, where
differentiable, a ``register_autograd`` formula. Schemas are defined once, in
``csrc/torch_bindings.cpp``; semantics in :mod:`moeops.reference`.
"""

from moeops.ops.experts import (
                                ExpertsStatsResult,
                                fused_experts,
                                fused_experts_list,
                                fused_experts_stats,
                                grouped_gemm,
)
from moeops.ops.gating import GatingResult, topk_gating
from moeops.ops.moex import (
                                MoexCode,
                                MoexExpertsResult,
                                MoexRouting,
                                MoexStats,
                                moex_code,
                                moex_experts,
                                moex_route,
                                moex_router_stats,
)
from moeops.ops.permute import RoutingPlan, combine, permute, route_plan

__all__ = [
    "GatingResult", "topk_gating",
    "RoutingPlan", "route_plan", "permute", "combine",
    "ExpertsStatsResult", "grouped_gemm", "fused_experts", "fused_experts_list",
    "fused_experts_stats",
    "MoexStats", "MoexRouting", "MoexExpertsResult", "MoexCode", "moex_router_stats",
    "moex_route", "moex_experts", "moex_code",
]
