"""scripts/kernel_ab.sh, the interleaved A/B harness for the CPU expert GEMM (docs/performance.md).

Run A/A (HEAD against HEAD, so uncommitted kernel changes do not matter) on tiny cases: the
harness must build both copies into one process, run them, and find their outputs bit-equal.
No timing is checked. The script reads the kernels with ``git archive``, so it needs a git
checkout and a C++ compiler; elsewhere (an installed package) it is skipped.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "kernel_ab.sh"


def _git_head_ok() -> bool:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return False
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "HEAD"],
                       capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(sys.platform != "linux", reason="the harness is a bash script for Linux")
@pytest.mark.skipif(not SCRIPT.exists(), reason="scripts/kernel_ab.sh is not in this tree")
@pytest.mark.skipif(not _git_head_ok(),
                    reason="needs a git checkout with a commit (reads HEAD's csrc)")
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                    reason="needs a C++ compiler")
def test_kernel_ab_runs_both_builds_and_compares_outputs():
    env = dict(os.environ, PYTHON=sys.executable, MOEOPS_AB_NEW="HEAD")
    env.pop("LD_PRELOAD", None)  # the sanitizer run preloads ASan; the compiler needs none of it
    cases = ["4 16 64 1 fp32", "3 8 40 2 bf16", "1 9 20 1 fp32"]  # K tails, an N tail, decode
    r = subprocess.run(["bash", str(SCRIPT), "HEAD", *cases], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if "GFLOP/s" in ln]
    assert len(lines) == len(cases), r.stdout
    for ln in lines:
        assert "outputs bit-equal" in ln, ln


def _cpu_has_avx512bf16() -> bool:
    try:
        return "avx512_bf16" in pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="the harness is a bash script for Linux")
@pytest.mark.skipif(not SCRIPT.exists(), reason="scripts/kernel_ab.sh is not in this tree")
@pytest.mark.skipif(not _git_head_ok(),
                    reason="needs a git checkout with a commit (reads HEAD's csrc)")
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                    reason="needs a C++ compiler")
@pytest.mark.skipif(not _cpu_has_avx512bf16(),
                    reason="bf16x runs gemm_dot_bf16: needs an AVX512-BF16 CPU")
def test_kernel_ab_bf16x_and_a_bad_kind():
    """The bf16 x bf16 GEMM (gemm_dot_bf16) A/A on a K tail, a row remainder and decode; an
    unknown weight kind fails that case with a message and makes the script exit 1."""
    env = dict(os.environ, PYTHON=sys.executable, MOEOPS_AB_NEW="HEAD", MOEOPS_AB_ISA="avx512bf16")
    env.pop("LD_PRELOAD", None)
    cases = ["7 8 40 1 bf16x", "1 9 20 1 bf16x", "2 8 16 1 int8"]
    r = subprocess.run(["bash", str(SCRIPT), "HEAD", *cases], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the weight kind must be fp32, bf16 or bf16x, not 'int8'" in r.stderr
    lines = [ln for ln in r.stdout.splitlines() if "GFLOP/s" in ln]
    assert len(lines) == 2 and all(ln.startswith("bf16x") and "outputs bit-equal" in ln
                                   for ln in lines), r.stdout
