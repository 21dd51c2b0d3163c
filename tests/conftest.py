import pytest
import torch

import moeops


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and bool(moeops._C.with_cuda)


CUDA_SKIP_REASON = ("needs a CUDA GPU and moeops built with CUDA kernels "
                    f"(cuda available: {torch.cuda.is_available()}, "
                    f"built with CUDA: {bool(moeops._C.with_cuda)})")

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not _cuda_ready(), reason=CUDA_SKIP_REASON)]),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=["avx2", "portable"])
def cpu_isa(request):
    """Runs a test once per CPU code path (the AVX2 one only where the CPU has it)."""
    if request.param == "avx2" and not moeops._C.cpu_supports_avx2():
        pytest.skip("this CPU has no AVX2/FMA/F16C")
    before = moeops._C.cpu_isa()
    moeops._C.set_cpu_isa(request.param)
    yield request.param
    moeops._C.set_cpu_isa(before)
