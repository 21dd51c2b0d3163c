"""The machine code (SASS) of the built CUDA kernels, read from the extension: no GPU needed.

These checks back statements in docs/design.md that CPU-only CI could otherwise only take on
trust, and catch a build change that silently drops them:

* every CUDA source is compiled for every architecture the build lists, with PTX embedded so a
  newer GPU can JIT it;
* the hand-written grouped GEMM runs on tensor cores (``HMMA.16816``, the bf16 form for bf16),
  with its k-loop unrolled, and fills shared memory with ``cp.async`` (``LDGSTS``);
* the Hopper grouped GEMM (CUTLASS) uses warpgroup MMA (``HGMMA``) and TMA loads (``UTMALDG``);
* the decode kernel's aligned instantiations read weights 16 bytes per load (``LDG.E.128``);
* the GEMM kernels touch no local memory (no register spills, no stack arrays).

Tools: ``cuobjdump`` and ``nvdisasm``, from a CUDA toolkit on PATH or from pip
(``nvidia-cuda-cuobjdump`` and ``nvidia-cuda-nvdisasm``, both in the ``test`` extra).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
from collections import Counter

import pytest

from moeops import _load

BUILD = _load.build_record()
ARCHS = [a for a in BUILD.get("cuda_archs", "").split(",") if a]
# CUDA translation units (the cubin names cuobjdump reports: source file stem + arch)
UNITS = ("gating_kernel", "permute_kernels", "experts_kernels", "moex_kernels")


def _tool_dirs():
    dirs = [os.path.dirname(p) for p in (shutil.which("cuobjdump"), shutil.which("nvdisasm")) if p]
    spec = importlib.util.find_spec("nvidia")  # pip's nvidia-* wheels: nvidia/cu*/bin
    for root in (spec.submodule_search_locations if spec else []) or []:
        dirs += sorted(glob.glob(os.path.join(root, "*", "bin")))
    return dirs


def _find(name):
    for d in _tool_dirs():
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


@pytest.fixture(scope="module")
def sass(tmp_path_factory):
    """{(unit, arch): {mangled function name: its SASS text}} for every cubin in moeops._C."""
    if not BUILD.get("with_cuda"):
        pytest.skip("moeops was built without CUDA kernels "
                    f"({BUILD.get('cuda_skip_reason') or 'no build record'})")
    cuobjdump, nvdisasm = _find("cuobjdump"), _find("nvdisasm")
    if not (cuobjdump and nvdisasm):
        pytest.skip("cuobjdump/nvdisasm not found (pip install nvidia-cuda-cuobjdump "
                    "nvidia-cuda-nvdisasm, or put a CUDA toolkit's bin on PATH)")
    so = importlib.util.find_spec("moeops._C").origin
    env = {**os.environ, "PATH": os.path.dirname(nvdisasm) + os.pathsep + os.environ["PATH"]}
    work = tmp_path_factory.mktemp("cubins")
    subprocess.run([cuobjdump, "-xelf", "all", so], cwd=work, env=env, check=True,
                   capture_output=True)
    out = {}
    for cubin in sorted(work.glob("*.cubin")):
        unit, arch = re.fullmatch(r"(.+)\.sm_(\w+)\.cubin", cubin.name).groups()
        text = subprocess.run([cuobjdump, "-sass", str(cubin)], env=env, check=True,
                              capture_output=True, text=True).stdout
        funcs = {}
        for chunk in text.split("Function : ")[1:]:
            name, _, body = chunk.partition("\n")
            funcs[name.strip()] = body
        out[(unit, arch)] = funcs
    ptx = subprocess.run([cuobjdump, "--list-ptx", so], env=env, check=True, capture_output=True,
                         text=True).stdout
    out["ptx"] = set(re.findall(r"PTX file\s+\d+: (\S+)\.ptx", ptx))
    return out


def _ops(body):
    """Opcode counts of one function's SASS, e.g. {"HMMA.16816.F32.BF16": 32, ...}."""
    return Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", body))


def _has(ops, prefix):
    return sum(n for op, n in ops.items() if op == prefix or op.startswith(prefix + "."))


def _functions(sass, unit, arch, pattern):
    found = {n: b for n, b in sass.get((unit, arch), {}).items() if re.search(pattern, n)}
    assert found, f"no function matching {pattern!r} in {unit} for sm_{arch}"
    return found


def test_every_cuda_source_is_built_for_every_listed_arch_with_ptx(sass):
    assert ARCHS, f"build record lists no CUDA archs: {BUILD}"
    for unit in UNITS:
        for arch in ARCHS:
            assert sass.get((unit, arch)), f"{unit}: no sm_{arch} SASS in the extension"
            assert f"{unit}.sm_{arch}" in sass["ptx"], f"{unit}: no PTX for sm_{arch}"
    if BUILD.get("sm90_grouped_gemm"):
        assert sass.get(("experts_sm90", "90a")), "sm90 grouped GEMM recorded but not in SASS"


def test_parser_reads_opcodes(sass):
    """The opcode parser sees real instructions (guards the other tests against vacuity)."""
    ops = Counter()
    for key, funcs in sass.items():
        if key != "ptx":
            for body in funcs.values():
                ops += _ops(body)
    assert ops["EXIT"] > 0 and _has(ops, "LDG") > 0 and _has(ops, "STG") > 0, ops.most_common(10)


@pytest.mark.parametrize("arch", ["80", "90a"])
def test_mma_grouped_gemm_runs_on_tensor_cores_with_cp_async(sass, arch):
    if arch not in ARCHS:
        pytest.skip(f"sm_{arch} not in this build's archs {ARCHS}")
    funcs = _functions(sass, "experts_kernels", arch, r"grouped_gemm_tc_kernel")
    assert len(funcs) == 4, sorted(funcs)  # {bf16, fp16} in x {same dtype, fp32} out
    for name, body in funcs.items():
        ops = _ops(body)
        mma = "HMMA.16816.F32.BF16" if "nv_bfloat16" in name else "HMMA.16816.F32"
        # one k-tile of 32 = 2 k-steps x (2 x 8) warp fragments: 32 mma, fully unrolled
        assert ops[mma] >= 32, (name, {k: v for k, v in ops.items() if "MMA" in k})
        assert _has(ops, "LDGSTS") >= 6, (name, "cp.async loads", _has(ops, "LDGSTS"))


def test_sm90_grouped_gemm_uses_wgmma_and_tma(sass):
    if not BUILD.get("sm90_grouped_gemm"):
        pytest.skip("this build has no sm90 grouped GEMM (needs 90a and the CUTLASS headers)")
    funcs = _functions(sass, "experts_sm90", "90a", r"cutlass13device_kernel")
    # {bf16, fp16} in x {same dtype, fp32} out x {wide, narrow} tiles
    assert len(funcs) == 8, sorted(funcs)
    kinds = Counter()
    for name, body in funcs.items():
        ops = _ops(body)
        assert _has(ops, "UTMALDG") > 0, (name[:120], "no TMA loads")
        hgmma = {op for op in ops if op.startswith("HGMMA.")}
        shapes = {op.split(".")[1] for op in hgmma}
        assert len(shapes) == 1, (name[:120], "expected one warpgroup MMA shape", hgmma)
        kinds[shapes.pop(), "bf16" if any(op.endswith(".BF16") for op in hgmma) else "fp16"] += 1
    # a warpgroup's share of the CTA tile: wide 128 x 256 x 64 (two consumer warpgroups of
    # 64 x 256), narrow 64 x 128 x 128 (ping-pong: one warpgroup per tile); k = 16 per HGMMA.
    # Each shape and input dtype appears twice (same-dtype and fp32 output).
    assert kinds == {(s, d): 2 for s in ("64x256x16", "64x128x16") for d in ("bf16", "fp16")}, kinds


@pytest.mark.parametrize("arch", ["80", "90a"])
def test_decode_kernel_reads_16_bytes_per_load_when_aligned(sass, arch):
    if arch not in ARCHS:
        pytest.skip(f"sm_{arch} not in this build's archs {ARCHS}")
    funcs = _functions(sass, "experts_kernels", arch, r"grouped_gemm_decode_kernel")
    vec = {n: int(re.search(r"Li(\d+)EEEv", n).group(1)) for n in funcs}
    wide = [n for n, v in vec.items() if (v == 4 and "IfffL" in n) or v == 8]
    assert len(wide) == 5, sorted(vec.items())  # fp32; {bf16, fp16} x {same, fp32} out
    for name, v in vec.items():
        loads = _ops(funcs[name])["LDG.E.128"]
        if name in wide:
            assert loads > 0, (name, "aligned instantiation without 16-byte loads")
        elif v == 1:
            assert loads == 0, (name, "the scalar instantiation cannot issue 16-byte loads")


@pytest.mark.parametrize("arch", ["80", "90a"])
def test_gemm_kernels_touch_no_local_memory(sass, arch):
    if arch not in ARCHS:
        pytest.skip(f"sm_{arch} not in this build's archs {ARCHS}")
    funcs = _functions(sass, "experts_kernels", arch,
                       r"grouped_gemm_(tc|decode)_kernel|tile_start_kernel")
    if arch == "90a" and BUILD.get("sm90_grouped_gemm"):
        funcs.update(_functions(sass, "experts_sm90", arch, r"cutlass13device_kernel"))
    for name, body in funcs.items():
        ops = _ops(body)
        assert not (_has(ops, "LDL") or _has(ops, "STL")), (name[:160], "local memory use")
