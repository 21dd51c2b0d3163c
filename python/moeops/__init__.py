"""moeops: Mixture-of-Experts kernels for PyTorch.

Compiled C++ (CPU) and CUDA kernels registered as ``torch.ops.moeops.*`` with thin Python
wrappers. See ``docs/ops.md`` for every op and :mod:`moeops.reference` for their exact
semantics.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from moeops._load import load_extension as _load_extension

_C = _load_extension()

from moeops import reference  # noqa: E402
from moeops.backends import BACKENDS  # noqa: E402
from moeops.ops import (  # noqa: E402
    GatingResult,
    RoutingPlan,
    combine,
    fused_experts,
    fused_experts_list,
    grouped_gemm,
    permute,
    route_plan,
    topk_gating,
)
from moeops.moex_ops import (  # noqa: E402
    MoexCode,
    MoexExpertsResult,
    MoexRouting,
    MoexStats,
    moex_code,
    moex_experts,
    moex_route,
    moex_router_stats,
)

__version__ = "0.1.0"


def patch(model):
    """Run a Hugging Face MoE model's routers and experts on moeops (in place, no weight copies).
    See :mod:`moeops.integrations.hf`."""
    from moeops.integrations import hf
    return hf.patch(model)


def unpatch(model):
    """Undo :func:`patch`."""
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
    "BACKENDS", "GatingResult", "patch", "unpatch", "patch_model_type", "unpatch_model_type", "RoutingPlan", "combine", "fused_experts", "fused_experts_list", "grouped_gemm",
    "permute", "reference", "route_plan", "topk_gating", "__version__",
    "MoexCode", "MoexExpertsResult", "MoexRouting", "MoexStats", "moex_code", "moex_experts",
    "moex_route", "moex_router_stats",
]
