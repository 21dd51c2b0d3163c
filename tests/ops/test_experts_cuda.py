"""CUDA grouped_gemm / fused_experts: each kernel path (decode, tensor cores, SIMT fallback)
against the reference, no host synchronisation, CUDA-graph capture, 64-bit row offsets.
The parity sweeps of tests/ops/test_experts.py also run on CUDA; this file pins down the paths."""

import pytest
import torch

import moeops
from moeops import reference
from support import CUDA_SKIP_REASON, cuda_ready

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not cuda_ready(), reason=CUDA_SKIP_REASON)]

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=4e-3, atol=4e-3)}


def _routing(T, K, E, seed, empty=0.1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
    ids[torch.rand(T, K, generator=g) < empty] = -1
    return ids, torch.rand(T, K, generator=g)


def _params(E, H, I, gated, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w_up = (torch.randn(E, (2 if gated else 1) * I, H, generator=g) * H ** -0.5).to(dtype)
    w_down = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype)
    return w_up, w_down


# (T, H, I): T <= 16 takes the decode kernel; H % 8 == 0 with 16-bit weights the tensor cores;
# fp32, or H % 8 != 0, the SIMT kernel. Sizes leave tails in every tile dimension.
PATHS = [(1, 128, 64), (16, 72, 40), (17, 128, 96), (300, 256, 200), (90, 36, 20)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("T,H,I", PATHS)
@pytest.mark.parametrize("gated", [True, False])
def test_fused_experts_paths(dtype, T, H, I, gated):
    E, K = 8, 2
    ids, w = _routing(T, K, E, T + H)
    ids[:, :] = torch.where(ids == 5, -1, ids)  # expert 5 has no rows at all
    hidden = torch.randn(T, H, generator=torch.Generator().manual_seed(1)).to(dtype)
    w_up, w_down = _params(E, H, I, gated, dtype, T)
    b_up = torch.randn(E, w_up.shape[1]) * 0.1
    b_down = torch.randn(E, H) * 0.1
    gain = torch.rand(E) + 0.5
    gain[3] = 0.0
    act = "silu" if gated else "relu"
    cpu = (hidden, ids, w, w_up, w_down, b_up, b_down)
    got = moeops.fused_experts(*(t.cuda() for t in cpu), activation=act, gated=gated,
                               gain=gain.cuda(), backend="cpp")
    want = reference.fused_experts(*cpu, activation=act, gated=gated, gain=gain)
    assert got.dtype == dtype and got.shape == (T, H)
    torch.testing.assert_close(got.cpu().float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("R,K,N,transposed", [(5, 64, 48, False), (200, 128, 136, False),
                                              (200, 40, 30, True), (130, 20, 33, False)])
def test_grouped_gemm_paths(dtype, R, K, N, transposed):
    E = 5
    g = torch.Generator().manual_seed(R + K)
    x = torch.randn(R + 3, K, generator=g).to(dtype)
    cuts = torch.sort(torch.randint(2, R + 1, (E - 1,), generator=g)).values
    offsets = torch.cat([torch.tensor([2]), cuts, torch.tensor([R])]).int()
    offsets[2] = offsets[1]  # an empty expert
    w = (torch.randn(E, K, N, generator=g) if transposed
         else torch.randn(E, N, K, generator=g)) * K ** -0.5
    w = w.to(dtype)
    got = moeops.grouped_gemm(x.cuda(), w.cuda(), offsets.cuda(), w_transposed=transposed,
                              backend="cpp")
    want = reference.grouped_gemm(x, w, offsets, w_transposed=transposed)
    torch.testing.assert_close(got.cpu().float(), want.float(), **TOL[dtype])
    assert torch.equal(got[:2].cpu(), torch.zeros(2, N, dtype=dtype))  # rows before offsets[0]
    assert torch.equal(got[R:].cpu(), torch.zeros(3, N, dtype=dtype))  # rows after offsets[E]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_decode_grouped_gemm_blocks_find_the_experts_with_rows(dtype):
    """The decode kernel launches min(E, R) expert blocks; block y finds the y-th expert with rows
    by a block scan over the offsets in rounds of 256 experts. Experts with rows in the first,
    second and third round, empty experts between them, and fewer experts with rows than blocks;
    N = 44 leaves a last column block whose warps stream one column, not two."""
    E, Kd, N = 600, 64, 44
    rows = {0: 2, 255: 1, 256: 3, 257: 1, 511: 2, 512: 1, 599: 2}  # 12 rows, 7 experts
    counts = torch.zeros(E, dtype=torch.int32)
    for e, n in rows.items():
        counts[e] = n
    offsets = torch.cat([torch.zeros(1, dtype=torch.int32), counts.cumsum(0).int()]) + 1
    R = int(offsets[-1]) + 2  # one row before offsets[0], two after offsets[E]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(R, Kd, generator=g).to(dtype)
    w = (torch.randn(E, N, Kd, generator=g) * Kd ** -0.5).to(dtype)
    got = moeops.grouped_gemm(x.cuda(), w.cuda(), offsets.cuda(), backend="cpp")
    want = reference.grouped_gemm(x, w, offsets)
    torch.testing.assert_close(got.cpu().float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("gated", [True, False])
def test_decode_fused_experts_with_more_experts_than_one_scan_round(gated):
    """A decode step over E = 300 experts (two scan rounds), slots in both rounds, empty slots."""
    E, K, T, H, I = 300, 3, 2, 64, 40
    ids = torch.tensor([[299, 5, 256], [-1, 255, 299]], dtype=torch.int32)
    w = torch.rand(T, K, generator=torch.Generator().manual_seed(3))
    hidden = torch.randn(T, H, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    w_up, w_down = _params(E, H, I, gated, torch.bfloat16, 5)
    act = "silu" if gated else "relu"
    got = moeops.fused_experts(*(t.cuda() for t in (hidden, ids, w, w_up, w_down)),
                               activation=act, gated=gated, backend="cpp")
    want = reference.fused_experts(hidden, ids, w, w_up, w_down, activation=act, gated=gated)
    torch.testing.assert_close(got.cpu().float(), want.float(), **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("gated", [True, False])
def test_decode_reads_hidden_in_place_like_permuted_rows(dtype, gated):
    """A decode step folds the permute into the up projection (the kernel reads each slot's token
    row of hidden) when hidden is 16-byte aligned with a row stride of whole 16-byte vectors, and
    permutes first otherwise (here a view one element off). Same bits either way, and with a
    wider row stride."""
    T, E, K, H, I = 5, 8, 2, 64, 48
    ids, w = _routing(T, K, E, 9)
    h = torch.randn(T, H, generator=torch.Generator().manual_seed(9)).to(dtype)
    w_up, w_down = _params(E, H, I, gated, dtype, 9)
    act = "silu" if gated else "relu"
    buf = torch.zeros(T * H + 1, dtype=dtype, device="cuda")
    buf[1:] = h.flatten().cuda()
    wide = torch.zeros(T, H + 8, dtype=dtype, device="cuda")
    wide[:, :H] = h.cuda()

    def layer(hidden):
        return moeops.fused_experts(hidden, ids.cuda(), w.cuda(), w_up.cuda(), w_down.cuda(),
                                    activation=act, gated=gated, backend="cpp")

    in_place = layer(h.cuda())
    assert torch.equal(layer(buf[1:].view(T, H)), in_place)  # misaligned: permuted first
    assert torch.equal(layer(wide[:, :H]), in_place)
    want = reference.fused_experts(h, ids, w, w_up, w_down, activation=act, gated=gated)
    torch.testing.assert_close(in_place.cpu().float(), want.float(), **TOL[dtype])


def _cuda_kernels(fn) -> list[str]:
    """Names of the CUDA kernels that ``fn()`` launches (torch.profiler over CUPTI)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def test_decode_skips_the_permute_pass_only_when_hidden_is_aligned():
    """The in-place read above gives the same bits as permuting first by design, so only the
    launched kernels tell whether the decode layer really skipped the permute pass."""
    T, E, K, H, I = 3, 8, 2, 64, 32
    ids, w = _routing(T, K, E, 4)
    h = torch.randn(T, H, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).cuda()
    w_up, w_down = (t.cuda() for t in _params(E, H, I, True, torch.bfloat16, 4))
    buf = torch.zeros(T * H + 1, dtype=torch.bfloat16, device="cuda")
    buf[1:] = h.flatten()
    ids, w = ids.cuda(), w.cuda()
    # grouped GEMMs on their default path (a forced sm90 path never reads hidden in place)
    moeops._C.set_cuda_gemm_path("auto")

    def layer(hidden):
        return lambda: moeops.fused_experts(hidden, ids, w, w_up, w_down, backend="cpp")

    layer(h)()  # warm-up: lazy CUDA initialisation launches kernels of its own
    aligned, misaligned = _cuda_kernels(layer(h)), _cuda_kernels(layer(buf[1:].view(T, H)))
    if not aligned:
        pytest.skip("the profiler recorded no CUDA kernels here (CUPTI unavailable)")
    assert not [k for k in aligned if "permute_kernel" in k], aligned
    assert [k for k in misaligned if "permute_kernel" in k], misaligned


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("H", [64, 66, 65])
def test_combine_rounds_to_the_hidden_dtype_once(dtype, H):
    """Without a shared expert the combine kernel writes the hidden dtype itself (fp32 sum, one
    rounding); with a zero shared term the layer sums in fp32 and casts after. Both must agree
    bit for bit, for every vector width of the 16-bit store (4, 2 and 1 elements)."""
    T, E, K, I = 40, 6, 2, 24
    ids, w = _routing(T, K, E, H)
    hidden = torch.randn(T, H, generator=torch.Generator().manual_seed(H)).to(dtype).cuda()
    w_up, w_down = (t.cuda() for t in _params(E, H, I, True, dtype, H))
    args = (hidden, ids.cuda(), w.cuda(), w_up, w_down)
    direct = moeops.fused_experts(*args, backend="cpp")
    zeros = torch.zeros(T, H, dtype=dtype, device="cuda")
    via_fp32 = moeops.fused_experts(*args, shared_out=zeros, backend="cpp")
    assert direct.dtype == dtype
    assert torch.equal(direct, via_fp32)


@pytest.mark.parametrize("xdt,wdt", [(torch.bfloat16, torch.float32),
                                     (torch.float32, torch.bfloat16),
                                     (torch.float16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("T", [3, 40])
def test_mixed_dtypes(xdt, wdt, T):
    """Activations and weights of different dtypes (fp32 accumulation, output in x's dtype)."""
    E, K, H, I = 4, 2, 48, 24
    ids, w = _routing(T, K, E, T)
    hidden = torch.randn(T, H, generator=torch.Generator().manual_seed(2)).to(xdt)
    w_up, w_down = _params(E, H, I, True, wdt, T)
    got = moeops.fused_experts(*(t.cuda() for t in (hidden, ids, w, w_up, w_down)), backend="cpp")
    want = reference.fused_experts(hidden, ids, w, w_up, w_down)
    assert got.dtype == xdt
    tol = TOL[torch.bfloat16 if torch.bfloat16 in (xdt, wdt) else xdt]
    torch.testing.assert_close(got.cpu().float(), want.float(), **tol)
    offsets = torch.tensor([0, T // 2, T // 2, T, T], dtype=torch.int32)
    gg = moeops.grouped_gemm(hidden.cuda(), w_down.transpose(1, 2).contiguous().cuda(),
                             offsets.cuda(), backend="cpp")
    want = reference.grouped_gemm(hidden, w_down.transpose(1, 2).contiguous(), offsets)
    assert gg.dtype == xdt
    torch.testing.assert_close(gg.cpu().float(), want.float(), **tol)


@pytest.mark.parametrize("T", [4, 256])
def test_whole_layer_without_host_sync_and_in_a_cuda_graph(T):
    """gating -> fused experts never waits for the host (sync debug mode raises if it did) and
    replays from a captured CUDA graph."""
    E, K, H, I = 16, 4, 256, 128
    dev = "cuda"
    logits = torch.randn(T, E, device=dev)
    hidden = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    w_up, w_down = (t.to(dev) for t in _params(E, H, I, True, torch.bfloat16, 0))

    def layer():
        r = moeops.topk_gating(logits, K, renormalize=True, backend="cpp")
        return moeops.fused_experts(hidden, r.ids, r.weights, w_up, w_down, backend="cpp")

    want = layer()  # warm-up: allocations, lazy CUDA initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = layer()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, want)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer()
    logits.copy_(torch.randn(T, E, device=dev))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, layer())


def _sm90_ready():
    return (cuda_ready() and bool(moeops._C.sm90_grouped_gemm)
            and torch.cuda.get_device_capability()[0] == 9)


SM90_SKIP = "needs a Hopper GPU (sm_90) and moeops built with the CUTLASS sm_90a kernels"


@pytest.fixture(params=["sm90", "mma"])
def gemm_path(request):
    """Runs the test once per 16-bit GEMM kernel on Hopper (sm90 = CUTLASS); restores auto."""
    if request.param == "sm90" and not _sm90_ready():
        pytest.skip(SM90_SKIP)
    moeops._C.set_cuda_gemm_path(request.param)
    yield request.param
    moeops._C.set_cuda_gemm_path("auto")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("R,K,N,E", [(7, 64, 48, 3), (300, 128, 136, 5), (1000, 256, 264, 8),
                                     (2000, 128, 264, 4), (4100, 512, 512, 2)])
def test_grouped_gemm_each_path(gemm_path, dtype, R, K, N, E):
    """Both Hopper kernels against the reference: tile tails in M and N, an empty expert, rows
    before offsets[0] and after offsets[E] left zero, and a row stride wider than K. On sm90 the
    first three shapes take the narrow (64 x 128, ping-pong) tiles, the last two the wide ones."""
    g = torch.Generator().manual_seed(R + E)
    wide = torch.randn(R + 3, K + 8, generator=g).to(dtype)
    x = wide[:, :K]  # lda = K + 8
    cuts = torch.sort(torch.randint(2, R + 1, (E - 1,), generator=g)).values
    offsets = torch.cat([torch.tensor([2]), cuts, torch.tensor([R])]).int()
    if E > 2:
        offsets[2] = offsets[1]  # an empty expert
    w = (torch.randn(E, N, K, generator=g) * K ** -0.5).to(dtype)
    got = moeops.grouped_gemm(x.cuda(), w.cuda(), offsets.cuda(), backend="cpp")
    want = reference.grouped_gemm(x, w, offsets)
    torch.testing.assert_close(got.cpu().float(), want.float(), **TOL[dtype])
    assert torch.equal(got[:2].cpu(), torch.zeros(2, N, dtype=dtype))
    assert torch.equal(got[R:].cpu(), torch.zeros(3, N, dtype=dtype))


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_experts_prefill_each_path(gemm_path, gated, dtype):
    """The prefill layer (gate|up GEMM, separate activation pass, down GEMM into fp32) on both
    Hopper kernels, with empty slots, an expert with no rows and a zero gain."""
    T, E, K, H, I = 700, 8, 2, 256, 192
    ids, w = _routing(T, K, E, 3)
    ids[:, :] = torch.where(ids == 5, -1, ids)
    hidden = torch.randn(T, H, generator=torch.Generator().manual_seed(2)).to(dtype)
    w_up, w_down = _params(E, H, I, gated, dtype, 4)
    gain = torch.rand(E) + 0.5
    gain[3] = 0.0
    act = "silu" if gated else "gelu"
    cpu = (hidden, ids, w, w_up, w_down)
    got = moeops.fused_experts(*(t.cuda() for t in cpu), activation=act, gated=gated,
                               gain=gain.cuda(), backend="cpp")
    want = reference.fused_experts(*cpu, activation=act, gated=gated, gain=gain)
    torch.testing.assert_close(got.cpu().float(), want.float(), **TOL[dtype])


@pytest.mark.skipif(not _sm90_ready(), reason=SM90_SKIP)
def test_sm90_layer_without_host_sync_and_in_a_cuda_graph():
    """The CUTLASS path keeps the layer free of host syncs and capturable in a CUDA graph."""
    moeops._C.set_cuda_gemm_path("sm90")
    try:
        test_whole_layer_without_host_sync_and_in_a_cuda_graph(512)
    finally:
        moeops._C.set_cuda_gemm_path("auto")


@pytest.mark.slow
def test_grouped_gemm_rows_beyond_2_31_elements(gemm_path):
    """Row offsets times K beyond 2^31 elements: 64-bit address arithmetic in every kernel."""
    K, N, E = 4096, 64, 2
    R = 2**31 // K + 1000  # x holds R*K > 2^31 bf16 elements (4.3 GB)
    x = torch.zeros(R, K, device="cuda", dtype=torch.bfloat16)
    x[-5:] = 1.0
    w = torch.ones(E, N, K, device="cuda", dtype=torch.bfloat16) * 0.5
    offsets = torch.tensor([0, R // 2, R], device="cuda", dtype=torch.int32)
    out = moeops.grouped_gemm(x, w, offsets, backend="cpp")
    assert torch.equal(out[-5:].float().cpu(), torch.full((5, N), K * 0.5))
    assert not out[: R - 5].any()


@pytest.mark.parametrize("dtype,gated,act", [(torch.float32, True, "silu"),
                                             (torch.bfloat16, False, "relu"),
                                             (torch.float16, True, "gelu")], ids=str)
@pytest.mark.parametrize("T", [5, 300])
def test_fused_experts_stats_cuda(dtype, gated, act, T):
    """The CUDA statistics against the reference: out bit-identical to fused_experts, norms and
    maxima to the matmul tolerances, the no-rows / gain-0 channel marker exactly, active units
    exactly (ReLU: within 1 + 1% where a pre-activation rounds across 0)."""
    E, K, H, I = 6, 3, 72, 40
    ids, w = _routing(T, K, E, T)
    ids[ids == 4] = -1  # expert 4 has no rows
    h = torch.randn(T, H, generator=torch.Generator().manual_seed(3)).to(dtype)
    w_up, w_down = _params(E, H, I, gated, dtype, 5)
    gain = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 1.0])
    args = (ids, w, w_up, w_down)
    got = moeops.fused_experts_stats(h.cuda(), *(t.cuda() for t in args), activation=act,
                                     gated=gated, gain=gain.cuda(), backend="cpp")
    plain = moeops.fused_experts(h.cuda(), *(t.cuda() for t in args), activation=act, gated=gated,
                                 gain=gain.cuda(), backend="cpp")
    want = reference.fused_experts_stats(h, *args, activation=act, gated=gated, gain=gain)
    assert torch.equal(got.out, plain)
    tol = TOL[dtype]
    for g, r in zip(got[1:3], want[1:3]):  # slot norms, out_absmax
        torch.testing.assert_close(g.cpu(), r, rtol=tol["rtol"], atol=tol["atol"] * H ** 0.5)
    torch.testing.assert_close(got.in_absmax.cpu(), want[4], **tol)
    ch = got.out_absmax_channel.cpu()
    assert int(ch[4]) == -1 and int(ch[2]) == -1 and torch.equal(ch < 0, want[3] < 0)
    assert bool(((got.active_units.cpu() - want[5]).abs() <= 1 + 0.01 * want[5]).all())
