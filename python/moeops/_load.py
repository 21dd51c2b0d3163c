"""Loads the compiled extension ``moeops._C`` and explains failures in plain words."""

from __future__ import annotations

import importlib
import json
import os

import torch

_BUILD_FILE = os.path.join(os.path.dirname(__file__), "_build.json")


def build_record() -> dict:
    """What the installed build was made with (written by CMake at build time), or {}."""
    try:
        with open(_BUILD_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _explain(err: BaseException) -> str:
    msg = str(err)
    rec = build_record()
    built = rec.get("torch_version", "unknown")
    lines = [f"moeops: cannot load the compiled extension moeops._C: {msg}"]
    if isinstance(err, ModuleNotFoundError) or "No module named" in msg:
        lines.append(
            "Why: the extension is not built. You may be importing moeops from the source tree "
            "(python/moeops) instead of an installed copy, or the build failed.")
        lines.append("What to do: `pip install --no-build-isolation .` from the checkout "
                     "(see README), then import moeops outside the source folder.")
    elif "undefined symbol" in msg or "version `" in msg:
        lines.append(
            f"Why: ABI mismatch: moeops was built against torch {built} but torch "
            f"{torch.__version__} is installed (C++ symbols differ between torch releases).")
        lines.append("What to do: rebuild against the installed torch: "
                     "`pip install --no-build-isolation --force-reinstall --no-deps .`")
    elif "libcudart" in msg or "libc10_cuda" in msg or "libtorch_cuda" in msg or "libcuda" in msg:
        lines.append(
            "Why: moeops was built with CUDA kernels but the CUDA libraries it links are missing "
            f"(torch {torch.__version__}, torch CUDA {torch.version.cuda}).")
        lines.append("What to do: install the CUDA build of torch it was built with "
                     f"({built}), or rebuild CPU-only: `MOEOPS_CUDA=OFF pip install "
                     "--no-build-isolation --force-reinstall --no-deps .`")
    else:
        lines.append(f"Built with torch {built}; running torch {torch.__version__}. "
                     "Rebuild with `pip install --no-build-isolation --force-reinstall "
                     "--no-deps .`")
    return "\n".join(lines)


def load_extension():
    try:
        return importlib.import_module("moeops._C")
    except ImportError as err:
        raise ImportError(_explain(err)) from err
