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
    grouped_gemm,
    permute,
    route_plan,
    topk_gating,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "GatingResult", "RoutingPlan", "combine", "fused_experts", "grouped_gemm",
    "permute", "reference", "route_plan", "topk_gating", "__version__",
]
