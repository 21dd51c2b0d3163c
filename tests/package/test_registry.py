"""Every op is registered completely: schema, CPU kernel, fake, reference, opcheck samples."""

import subprocess
import sys

import pytest
import torch

import moeops
from moeops import reference
from moeops.info import registered_ops
from support.samples import SAMPLES

OPS = registered_ops()
# Ops without a CUDA kernel (transformers 4.x per-expert lists; the statistics variant); on CUDA
# tensors backend="auto" falls back to the reference with a warning and backend="cpp" says why.
CPU_ONLY_OPS = {"fused_experts_list"}
# MoE-X wide-code export: data-dependent output size, CPU kernel only (docs/moex.md).
CPU_ONLY_OPS |= {"moex_code"}


def test_expected_ops_registered():
    assert {"topk_gating", "route_plan", "permute", "combine", "grouped_gemm",
            "fused_experts"} <= set(OPS)


@pytest.mark.parametrize("name", OPS)
def test_op_is_complete(name):
    qual = f"moeops::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CPU"), f"{qual} has no CPU kernel"
    if moeops._C.with_cuda and name not in CPU_ONLY_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CUDA"), (
            f"{qual}: no CUDA kernel")
    fake = torch._library.simple_registry.singleton.find(qual).fake_impl.kernel
    assert fake is not None, f"{qual} has no fake kernel (register_fake in ops.py)"
    assert callable(getattr(reference, name, None)), f"{qual} has no reference in reference.py"
    assert name in SAMPLES, f"{qual} has no opcheck samples in tests/support/samples.py"
    assert callable(getattr(moeops, name, None)), f"{qual} has no public wrapper"
    assert getattr(moeops, name).__doc__, f"moeops.{name} has no docstring"


def test_info_cli_reports_build():
    out = subprocess.run([sys.executable, "-m", "moeops.info"], capture_output=True, text=True,
                         check=True).stdout
    for name in OPS:
        assert f"moeops::{name} [CPU" in out
    assert "cuda_kernels_built" in out and "cpu_isa_in_use" in out
    built = "True" if moeops._C.with_cuda else "False"
    assert any(line.split() == ["cuda_kernels_built", built] for line in out.splitlines()), out


def test_cli_entry_point_info():
    out = subprocess.run([sys.executable, "-m", "moeops", "info"], capture_output=True, text=True,
                         check=True).stdout
    assert "moeops::topk_gating" in out


def test_load_error_explains_abi_mismatch():
    from moeops._load import _explain
    msg = _explain(ImportError("/x/_C.so: undefined symbol: _ZN3c104impl"))
    assert "ABI mismatch" in msg and "rebuild" in msg.lower()
    msg = _explain(ImportError("libcudart.so.13: cannot open shared object file"))
    assert "CUDA libraries" in msg and "MOEOPS_CUDA=OFF" in msg
    msg = _explain(ModuleNotFoundError("No module named 'moeops._C'"))
    assert "not built" in msg and "pip install" in msg


def test_cpu_isa_switch():
    before = moeops._C.cpu_isa()
    try:
        assert moeops._C.set_cpu_isa("portable") == "portable"
        assert moeops._C.cpu_isa() == "portable"
        with pytest.raises(ValueError, match="cpu isa"):
            moeops._C.set_cpu_isa("avx512")
    finally:
        moeops._C.set_cpu_isa(before)


@pytest.mark.skipif(not moeops._C.with_cuda, reason="moeops built without CUDA kernels")
def test_cuda_gemm_path_setting():
    """The Hopper GEMM kernel choice (auto / sm90 = CUTLASS / mma) is a checked setting."""
    before = moeops._C.cuda_gemm_path()
    with pytest.raises(ValueError, match="auto"):
        moeops._C.set_cuda_gemm_path("cutlass3")
    try:
        assert moeops._C.set_cuda_gemm_path("mma") == "mma" and moeops._C.cuda_gemm_path() == "mma"
    finally:
        moeops._C.set_cuda_gemm_path(before)
