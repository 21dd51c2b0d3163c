"""moeops: Mixture-of-Experts kernels for PyTorch.

Compiled C++ (CPU) and CUDA kernels registered as ``torch.ops.moeops.*`` with thin Python
wrappers. See ``docs/ops.md`` for every op and :mod:`moeops.reference` for their exact
semantics.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from moeops._load import load_extension as _load_extension

_C = _load_extension()

# ruff: noqa: E402  (everything below needs the extension loaded)
# _triton registers the Triton backend with moeops._dispatch (without importing triton);
# interventions: routing statistics and expert interventions (moeops.interventions)
from moeops import _triton, interventions, reference  # noqa: F401
from moeops._dispatch import BACKENDS
from moeops._version import __version__
from moeops.ops import (
    ExpertsStatsResult,
    GatingResult,
    MoexCode,
    MoexExpertsResult,
    MoexRouting,
    MoexStats,
    RoutingPlan,
    combine,
    fused_experts,
    fused_experts_list,
    fused_experts_stats,
    grouped_gemm,
    moex_code,
    moex_experts,
    moex_route,
    moex_router_stats,
    permute,
    route_plan,
    topk_gating,
)


def patch(model, *, ep_group=None, expert_to_rank=None):
    """Run a Hugging Face MoE model's routers and experts on moeops (in place, no weight copies).
    See :mod:`moeops.integrations.hf`. With ``ep_group`` (a ``torch.distributed`` process group,
    or ``"world"`` for the default one) the experts are also sharded over the group's ranks
    (expert parallelism, optional ``expert_to_rank`` map): see
    :func:`moeops.distributed.patch_expert_parallel`."""
    if ep_group is not None:
        from moeops import distributed
        return distributed.patch_expert_parallel(
            model, None if isinstance(ep_group, str) and ep_group == "world" else ep_group,
            expert_to_rank)
    if expert_to_rank is not None:
        raise ValueError("moeops.patch: expert_to_rank needs ep_group")
    from moeops.integrations import hf
    return hf.patch(model)


def unpatch(model):
    """Undo :func:`patch` (not possible for an expert-parallel model: its experts are sharded)."""
    if getattr(model, "_moeops_ep", False):
        raise ValueError("moeops.unpatch: this model was patched with ep_group and each rank now "
                         "holds only its own experts; reload it instead")
    from moeops.integrations import hf
    return hf.unpatch(model)


def patch_model_type(model_type: str) -> None:
    """Patch the router and experts classes of a Hugging Face model type (e.g. ``"mixtral"``)."""
    from moeops.integrations import hf
    hf.patch_model_type(model_type)


def unpatch_model_type(model_type: str) -> None:
    """Undo :func:`patch_model_type`."""
    from moeops.integrations import hf
    hf.unpatch_model_type(model_type)

__all__ = [
    "BACKENDS", "GatingResult", "patch", "unpatch", "patch_model_type", "unpatch_model_type",
    "RoutingPlan", "combine", "fused_experts", "fused_experts_list", "grouped_gemm",
    "permute", "reference", "route_plan", "topk_gating", "__version__",
    "ExpertsStatsResult", "fused_experts_stats", "interventions",
    "MoexCode", "MoexExpertsResult", "MoexRouting", "MoexStats", "moex_code", "moex_experts",
    "moex_route", "moex_router_stats",
]
