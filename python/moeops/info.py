"""``moeops info`` / ``python -m moeops.info``: what this installation has."""

from __future__ import annotations

import platform
import sys


def registered_ops() -> list[str]:
    """Public ops of the ``moeops`` namespace (without the namespace). Names starting with ``_``
    are internal helpers (e.g. backward replays) and are left out."""
    import torch

    names = {n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("moeops::")}
    return sorted(n for n in names if not n.startswith("_"))


def collect() -> dict:
    """Versions, build facts, registered ops, backends and CPU features, as a dict."""
    import torch

    from moeops import _C
    from moeops._dispatch import BACKENDS
    from moeops._load import build_record
    from moeops._version import __version__

    ops = registered_ops()
    kernels = {}
    for name in ops:
        keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(
            f"moeops::{name}", k)]
        kernels[name] = keys
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "moeops": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "built_with_torch": _C.built_with_torch,
        "cuda_kernels_built": bool(_C.with_cuda),
        "cuda_archs": _C.cuda_archs.split(",") if _C.cuda_archs else [],
        "nvcc": _C.cuda_compiler_version or None,
        "sm90_grouped_gemm": bool(_C.sm90_grouped_gemm),
        "sm90_skip_reason": None if _C.sm90_grouped_gemm else _C.sm90_skip_reason,
        "cuda_skip_reason": None if _C.with_cuda else _C.cuda_skip_reason,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton": triton_version,
        "cxx_compiler": _C.cxx_compiler,
        "cpu_supports_avx2_fma_f16c": bool(_C.cpu_supports_avx2()),
        "cpu_supports_avx512bf16": bool(_C.cpu_supports_avx512bf16()),
        "cpu_isa_in_use": _C.cpu_isa(),
        "cpu_threads": torch.get_num_threads(),
        "ops": kernels,
        "backends": list(BACKENDS),
        "build_record": build_record(),
    }


def main(argv=None) -> int:
    info = collect()
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "ops":
            print(f"{'ops':<{width}}  " + ", ".join(
                f"moeops::{n} [{'/'.join(v) or 'no kernel'}]" for n, v in value.items()))
        elif key != "build_record":
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
