import pytest
import torch

import moeops
from support import CUDA_SKIP_REASON, cuda_ready

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not cuda_ready(), reason=CUDA_SKIP_REASON)]),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Module-wide torch.set_num_threads(1) for files of tiny models, where intra-op threading
    only adds overhead and noise. Use with pytestmark = pytest.mark.usefixtures(...)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["avx512bf16", "avx2", "portable"])
def cpu_isa(request):
    """Runs a test once per CPU code path (each only where the CPU has its instructions)."""
    if request.param == "avx2" and not moeops._C.cpu_supports_avx2():
        pytest.skip("this CPU has no AVX2/FMA/F16C")
    if request.param == "avx512bf16" and not moeops._C.cpu_supports_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16 (vdpbf16ps)")
    before = moeops._C.cpu_isa()
    moeops._C.set_cpu_isa(request.param)
    yield request.param
    moeops._C.set_cpu_isa(before)


# ----------------------------------------------------------------------------- hypothesis
# Profiles for the property tests (tests/ops/test_properties.py, docs/reliability.md). "ci" is the
# default: derandomized (same examples every run, so a failure replays without an example
# database) and sized for CI. "deep" is for releases: random seeds, many more examples, and a
# local example database (tests/.hypothesis/, not committed) so failures found there replay:
#   python -m pytest tests/ops/test_properties.py --hypothesis-profile=deep
# Edge cases worth pinning are @example(...) decorators in the tests (run on every profile).
import os as _os  # noqa: E402

from hypothesis import HealthCheck as _HealthCheck  # noqa: E402
from hypothesis import settings as _hsettings  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase as _HDirDB  # noqa: E402

_HEALTH = [_HealthCheck.too_slow, _HealthCheck.data_too_large, _HealthCheck.filter_too_much]
_hsettings.register_profile("ci", max_examples=300, deadline=None, derandomize=True,
                            database=None, print_blob=True, suppress_health_check=_HEALTH)
_hsettings.register_profile(
    "deep", max_examples=10000, deadline=None, print_blob=True, suppress_health_check=_HEALTH,
    database=_HDirDB(_os.path.join(_os.path.dirname(__file__), ".hypothesis")))
# --hypothesis-profile=NAME (hypothesis' pytest plugin) overrides this default afterwards.
_hsettings.load_profile(_os.environ.get("MOEOPS_HYPOTHESIS_PROFILE", "ci"))
