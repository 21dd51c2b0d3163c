"""scripts/gpu_check.sh's own logic, on a machine without a GPU: a fake python, nvidia-smi and
compute-sanitizer record what the script asks of them, so the order of the steps, the prebuilt
wheel's hash check, the step caps and the benchmarks' --deadline inside them, the deadline,
MOEOPS_GPU_STEPS, the summary table and the packing of the logs are checked here instead of on
a GPU machine's scarce minutes. Nothing here runs a kernel."""

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")

FAKE_PY = """#!/usr/bin/env bash
echo "python $*" >> "$CALLS"
if [ "$1" = "-c" ]; then
  case "$2" in
    *moeops._C.with_cuda*) echo 90a; exit 0 ;;
    *sm90_grouped_gemm*) exit 0 ;;
    *) exec {real} "$@" ;;
  esac
fi
if [ "$2" = "pytest" ]; then
  echo "tests/test_x.py::test_a PASSED"
  echo "tests/test_x.py::test_b FAILED"
  echo "FAILED tests/test_x.py::test_b - boom"
  echo "1 failed, 1 passed in 0.10s"
  exit 1
fi
if [ "$2" = "moeops.info" ]; then printf 'torch 2.11.0\\ncuda_archs 90a\\n'; fi
if [ "$2" = "moeops" ]; then echo "table of: $*"; fi
exit 0
"""

FAKE_SANITIZER = """#!/usr/bin/env bash
echo "compute-sanitizer $*" >> "$CALLS"
echo "sanitizer cases done, mismatches vs reference: 0"
echo "========= ERROR SUMMARY: 0 errors"
"""


@pytest.fixture
def repo(tmp_path):
    """A copy of the script and source_hash.sh in a tree that hashes like a checkout, plus fake
    tools first on PATH."""
    r = tmp_path / "repo"
    (r / "scripts").mkdir(parents=True)
    for f in ("gpu_check.sh", "source_hash.sh"):
        shutil.copy(ROOT / "scripts" / f, r / "scripts" / f)
    for d in ("cmake", "csrc", "python"):
        (r / d).mkdir()
        (r / d / "x.txt").write_text(d)
    (r / "CMakeLists.txt").write_text("x")
    (r / "pyproject.toml").write_text("x")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in (("fakepy", FAKE_PY.format(real=sys.executable)),
                       ("compute-sanitizer", FAKE_SANITIZER),
                       ("nvidia-smi", "#!/usr/bin/env bash\necho '|   0  NVIDIA H200   On |'\n")):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    return r


def _prebuild(repo: Path, hash_ok: bool = True) -> None:
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    (repo / "prebuilt").mkdir()
    (repo / "prebuilt" / f"moeops-0.1.0-{tag}-{tag}-linux_x86_64.whl").write_text("wheel")
    h = subprocess.run(["bash", "scripts/source_hash.sh"], cwd=repo, capture_output=True, text=True,
                       check=True).stdout.strip()
    (repo / "prebuilt" / "SOURCE_HASH").write_text(h if hash_ok else "0" * 16)


def _run(repo: Path, **env):
    out = repo.parent / "out"
    calls = repo.parent / "calls.txt"
    e = dict(os.environ, PATH=f"{repo.parent / 'bin'}:{os.environ['PATH']}", PYTHON="fakepy",
             CALLS=str(calls), MOEOPS_GPU_OUT=str(out), **env)
    p = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=repo, env=e, capture_output=True,
                       text=True, timeout=120)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return p, out, lines


def _deadline(line: str) -> int:
    return int(re.search(r"--deadline (\d+)", line).group(1))


def test_full_run_order_caps_and_summary(repo):
    _prebuild(repo)
    p, out, calls = _run(repo)
    assert p.returncode == 0, p.stderr
    steps = [c for c in calls if " -m " in c or c.startswith("compute-sanitizer")]
    kinds = []
    for c in steps:
        if "pip install" in c:
            kinds.append("install")
        elif " -m pytest" in c:
            kinds.append("tests")
        elif "moeops.info" in c:
            kinds.append("info")
        elif "memcheck" in c:
            kinds.append("memcheck")
        elif "racecheck" in c:
            kinds.append("racecheck")
        elif "--suite gemm" in c:
            kinds.append("triton_tune" if "triton-tuned" in c else "bench_gemm")
        elif "moeops bench" in c:
            kinds.append("bench_paths" if "moeops-mma" in c else "bench")
    assert kinds == ["install", "info", "tests", "memcheck", "bench_gemm", "bench", "racecheck",
                     "bench_paths", "triton_tune"]
    assert not any("--no-build-isolation" in c for c in calls)  # the prebuilt wheel, no build
    # each benchmark's own deadline is 70% of its step's cap, so it ends inside the cap
    bench = {k: c for k, c in zip(kinds, steps) if k.startswith("bench") or k == "triton_tune"}
    assert {k: _deadline(c) for k, c in bench.items()} == {
        "bench_gemm": 63, "bench": 84, "bench_paths": 42, "triton_tune": 42}
    assert "moeops-sm90" in bench["bench_paths"]  # the fake says: sm90 kernels on an sm_90 GPU
    text = p.stdout
    summary = text[text.index("================ moeops GPU check"):]
    assert "NVIDIA H200" in summary and "cuda_archs 90a" in summary
    for s in ("prebuilt", "tests", "bench_gemm", "bench", "memcheck", "racecheck", "bench_paths",
              "triton_tune"):
        assert re.search(rf"^{s} +rc=", summary, re.M), s
    assert re.search(r"^tests +rc=1 ", summary, re.M)  # the failing test shows in the status...
    assert "tests passed: 1, failed: 1, skipped: 0" in summary  # ...in the counts...
    assert "FAILED tests/test_x.py::test_b - boom" in summary  # ...and by name
    assert "memcheck.log:========= ERROR SUMMARY: 0 errors" in summary
    assert text.index("table of:") < text.index("================ moeops GPU check")
    assert (out / "tests.log").exists() and (out / "bench.log").exists()


def test_stale_prebuilt_wheel_is_not_installed(repo):
    _prebuild(repo, hash_ok=False)
    p, _, calls = _run(repo, MOEOPS_GPU_STEPS="tests")
    assert p.returncode == 0, p.stderr
    assert not any("prebuilt/" in c for c in calls)
    assert any("pip install -v --no-build-isolation --no-deps ." in c for c in calls)
    assert re.search(r"^build +rc=0 ", p.stdout, re.M)


def test_steps_subset_and_packed_logs(repo):
    _prebuild(repo)
    p, out, calls = _run(repo, MOEOPS_GPU_STEPS="tests,memcheck", MOEOPS_GPU_PACK="1")
    assert p.returncode == 0, p.stderr
    assert not any("moeops bench" in c or "racecheck" in c for c in calls)
    assert any(" -m pytest" in c for c in calls) and any("memcheck" in c for c in calls)
    assert sorted(os.listdir(out)) == ["gpu_check_logs.tar.gz"]  # the device tool returns 8 files
    with tarfile.open(out / "gpu_check_logs.tar.gz") as t:
        names = {Path(n).name for n in t.getnames()}
    assert {"tests.log", "memcheck.log", "commit.txt", "info.log"} <= names


def test_deadline_skips_steps_and_shrinks_caps(repo):
    _prebuild(repo)
    p, _, calls = _run(repo, MOEOPS_GPU_DEADLINE="19")  # under 15 s left for the first step
    assert p.returncode == 0, p.stderr
    assert any("prebuilt/" in c for c in calls)  # installing is never skipped
    assert not any(" -m pytest" in c or "moeops bench" in c or "sanitizer" in c for c in calls)
    assert re.search(r"^tests +skipped \(deadline\)", p.stdout, re.M)
    p, _, calls = _run(repo, MOEOPS_GPU_DEADLINE="60", MOEOPS_GPU_STEPS="bench_gemm")
    # a cap cut to the time left (<= 55 s) also cuts the benchmark's own deadline
    assert _deadline(next(c for c in calls if "--suite gemm" in c)) <= 55 * 7 // 10
