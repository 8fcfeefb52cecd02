"""The CUDA kernels' logic on the CPU: csrc/kernels/*.cuh compiled by g++ with the SIMT shim of
tests/host_harness (one host thread per CUDA thread, barriers for __syncthreads, an exchange
buffer for warp shuffles) and judged against the float64 eager reference with DESIGN.md's rule.

What this proves: indexing and strides, masking and tails, block skipping, the online-softmax
math, reductions (shuffle lane math), barrier placement logic, dtype conversions, and for the
mma.sync kernels the per-lane fragment layouts and the cp.async pipeline order (emulated by
tests/host_harness/tensor_core_shim.h, see tests/test_cuda_tensor_core_shim.py). What it cannot:
timing, the hardware memory model beyond the tracked shared-memory hazards, fast-math ULPs.
"""
from __future__ import annotations

import ctypes
import subprocess

import pytest
import torch

from attention_cases import CORE_CASES, Case, check_against_reference
from host_harness import harness
from ptkernels import backends

pytestmark = pytest.mark.skipif(
    harness.compiler() is None or not harness.cuda_headers_present(),
    reason="needs g++ and the CUDA toolkit headers (cuda_fp16.h) for the host harness")

NAME = "cuda_harness"


def _register(monkeypatch, lib, **kw):
    backend = harness.HarnessBackend(lib, **kw)
    monkeypatch.setattr(backends, "BACKENDS", backends.BACKENDS + (NAME,))
    monkeypatch.setitem(backends._MODULES, NAME, NAME)
    monkeypatch.setitem(backends._loaded, NAME, backend)
    return backend


@pytest.fixture(scope="module")
def lib():
    try:
        return harness.build()
    except subprocess.CalledProcessError as exc:  # show the compiler's message, not just the code
        pytest.fail(f"host harness failed to compile:\n{exc.stderr}")


@pytest.fixture
def backend(monkeypatch, lib):
    return _register(monkeypatch, lib)


NO_GRAD = ("__forward_only__",)  # no input requires grad: forward only

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("case", CORE_CASES, ids=[c.id() for c in CORE_CASES])
def test_core_cases_forward_and_backward(backend, case):
    """Output, lse and all five gradients of DESIGN.md's shape list (float32)."""
    check_against_reference(case, torch.float32, backend=NAME, seed=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    Case(nq=37, nk=53, p=7, d=80, causal=True, padding="left"),
    Case(nq=19, nk=31, p=64, d=160, form="bank", b=3, t=2, hq=4, hkv=1),
], ids=lambda c: c.id() if isinstance(c, Case) else None)
def test_dtypes_and_head_dim_buckets(backend, case, dtype):
    """float16 / bfloat16 storage with float32 accumulation; D = 80 and 160 (buckets 128, 256)."""
    check_against_reference(case, dtype, backend=NAME, seed=2)


TC_CASES = [CORE_CASES[i] for i in (3, 4, 10, 11, 14, 15, 19, 23)] + [
    Case(nq=37, nk=53, p=64, d=80, padding="left", causal=True)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TC_CASES, ids=[c.id() for c in TC_CASES])
def test_tensor_core_forward_cases(backend, case, dtype):
    """float16 / bfloat16 take the mma.sync forward (fragments emulated by the shim): prefix forms,
    padding, empty rows, window, softcap + bias; the backward runs on the same inputs."""
    check_against_reference(case, dtype, backend=NAME, seed=3)


# The float16 / bfloat16 backward runs on tensor cores (prefix_attention_bwd_mma.cuh): dQ, the
# sequence dK/dV and the batch-reduced prefix gradients, with tails in every tile dimension (keys
# and queries not multiples of 16/32, D not a multiple of 16) and every masking feature.
TC_BWD_CASES = [CORE_CASES[i] for i in (4, 5, 12, 16, 17, 22)] + [
    Case(nq=23, nk=41, p=9, d=64, causal=True, padding="right", form="per_row"),
    Case(nq=35, nk=19, p=70, d=64, b=3, t=2, hq=4, hkv=1, form="bank", softcap=4.0),
    Case(nq=21, nk=37, p=5, d=120, causal=True, window=9, bias="heads"),
    Case(nq=17, nk=17, p=33, d=128, hq=2, hkv=2, padding="full_row", causal=True)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TC_BWD_CASES, ids=[c.id() for c in TC_BWD_CASES])
def test_tensor_core_backward_cases(backend, case, dtype):
    """All five gradients from the mma.sync backward kernels against the float64 reference (3x
    the eager same-dtype error + atol)."""
    check_against_reference(case, dtype, backend=NAME, seed=7)


# The head-dim bucket 256 (prefix_attention_bwd_mma_wide.cuh: warp pairs split the head dim and
# exchange P / dS through shared memory): D = 256 exactly, D = 200 (the second half-row partly
# zero-padded), D = 136 (the second half owns one 16-column step); key and query tails against the
# 32-key / 16-query tiles, prefix splits, GQA, every masking feature.
TC_WIDE_BWD_CASES = [
    Case(nq=37, nk=45, p=20, d=256, causal=True, padding="left"),
    Case(nq=21, nk=19, p=40, d=200, b=3, t=2, hq=4, hkv=2, form="bank", causal=True, window=7,
         softcap=4.0),
    Case(nq=19, nk=33, p=9, d=136, hq=2, hkv=1, form="per_row", bias="heads", padding="right")]


@pytest.mark.parametrize("case,dtype", list(zip(TC_WIDE_BWD_CASES, [torch.bfloat16, torch.float16, torch.bfloat16])),
                         ids=[c.id() for c in TC_WIDE_BWD_CASES])
def test_tensor_core_backward_head_dim_256(backend, case, dtype):
    """All five gradients of the D = 256 bucket's mma.sync backward against the float64 reference
    (one dtype per case: each emulated D = 256 run takes ~20 s on one core)."""
    check_against_reference(case, dtype, backend=NAME, seed=9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tensor_core_prompt_only_backward_is_deterministic(backend, dtype):
    """Prompt-only backward on tensor cores: only the prefix gradients come back, they match the
    reference, and two runs are bitwise equal (batch reduction in a fixed order, no atomics)."""
    case = Case(nq=19, nk=23, p=40, d=64, form="bank", b=3, t=4, hq=4, hkv=2, causal=True, padding="left")
    check_against_reference(case, dtype, backend=NAME, seed=8, grad_for=("prefix_k", "prefix_v"))
    torch.manual_seed(2)
    b, hq, hkv, nq, nk, p, d = 3, 4, 2, 21, 13, 37, 72
    q, k, v = (torch.randn(b, h, n, d).to(dtype) for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
    pk, pv = torch.randn(1, hkv, p, d).to(dtype), torch.randn(1, hkv, p, d).to(dtype)
    out, lse = backend.prefix_attention_fwd(q, k, v, pk, pv, None, None, None, None, True, -1, 0.0,
                                            d ** -0.5, 0.0)
    go = torch.randn_like(out)
    runs = [backend.prefix_attention_bwd(go, None, q, k, v, pk, pv, None, None, None, None, out, lse,
                                         True, -1, 0.0, d ** -0.5, 0.0,
                                         [False, False, False, True, True]) for _ in range(2)]
    assert [g.numel() for g in runs[0][:3]] == [0, 0, 0]
    for a, b_ in zip(runs[0][3:], runs[1][3:]):
        assert a.dtype == dtype and torch.isfinite(a).all() and torch.equal(a, b_)


DECODE_CASES = [Case(nq=1, nk=200, p=7, causal=True), Case(nq=3, nk=150, p=64, padding="left"),
                Case(nq=5, nk=90, p=70, form="bank", b=3, t=2, window=20, causal=True),
                Case(nq=16, nk=130, p=0, form="none", padding="full_row", causal=True)]


@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("case", DECODE_CASES, ids=[c.id() for c in DECODE_CASES])
def test_split_k_decode(monkeypatch, lib, case, splits):
    """Split-K forward (each split a share of the prefix-then-sequence keys, merged by lse),
    including splits that see no key at all (empty partials) and rows with no key."""
    _register(monkeypatch, lib, force_splits=splits)
    check_against_reference(case, torch.float16, backend=NAME, seed=10, grad_for=NO_GRAD)


PACKED_DECODE_CASES = [Case(nq=1, nk=600, p=20, hq=8, hkv=1, causal=True),          # MQA, auto split
                       Case(nq=3, nk=90, p=70, hq=8, hkv=2, window=30, causal=True, bias="heads"),
                       Case(nq=16, nk=77, p=7, hq=8, hkv=1, padding="left", softcap=4.0)]  # 128 packed rows


@pytest.mark.parametrize("splits", [0, 3])
@pytest.mark.parametrize("case", PACKED_DECODE_CASES, ids=[c.id() for c in PACKED_DECODE_CASES])
def test_packed_gqa_decode(monkeypatch, lib, case, splits):
    """Decode on tensor cores: the GQA group's query heads packed into one block's rows (several
    heads per block, and blocks that split a group), with the launcher's split count (0) or 3."""
    _register(monkeypatch, lib, force_splits=splits)
    check_against_reference(case, torch.bfloat16, backend=NAME, seed=12, grad_for=NO_GRAD)


def test_lse_gradient(backend):
    """A gradient flowing into the returned lse enters through delta."""
    check_against_reference(Case(nq=19, nk=23, p=7, causal=True, padding="left"), torch.float32,
                            backend=NAME, seed=5, use_lse_grad=True)


@pytest.mark.parametrize("case", [Case(nq=19, nk=23, p=7, causal=True, padding="right"),
                                  Case(nq=19, nk=23, p=7, form="bank", b=3, t=4, hq=4, hkv=1)],
                         ids=lambda c: c.id())
def test_prompt_only_backward(backend, case):
    """q, k, v frozen: only the prefix gradients are computed (the dQ and sequence kernels are
    not launched: their outputs come back empty), and they match the reference."""
    check_against_reference(case, torch.float32, backend=NAME, seed=6,
                            grad_for=("prefix_k", "prefix_v"))
    torch.manual_seed(0)
    b, hq, hkv, nq, nk, p, d = 2, 4, 2, 9, 11, 5, 16
    q, k, v = torch.randn(b, hq, nq, d), torch.randn(b, hkv, nk, d), torch.randn(b, hkv, nk, d)
    pk, pv = torch.randn(1, hkv, p, d), torch.randn(1, hkv, p, d)
    out, lse = backend.prefix_attention_fwd(q, k, v, pk, pv, None, None, None, None, False, -1,
                                            0.0, d ** -0.5, 0.0)
    grads = backend.prefix_attention_bwd(torch.randn_like(out), None, q, k, v, pk, pv, None, None,
                                         None, None, out, lse, False, -1, 0.0, d ** -0.5, 0.0,
                                         [False, False, False, True, True])
    assert [g.numel() for g in grads[:3]] == [0, 0, 0]
    assert grads[3].shape == pk.shape and torch.isfinite(grads[3]).all()


def test_unused_bank_rows_get_zero_gradient(backend):
    torch.manual_seed(1)
    b, hq, hkv, nq, nk, p, d, t = 2, 2, 1, 7, 9, 3, 8, 4
    q, k, v = torch.randn(b, hq, nq, d), torch.randn(b, hkv, nk, d), torch.randn(b, hkv, nk, d)
    pk, pv = torch.randn(t, hkv, p, d), torch.randn(t, hkv, p, d)
    idx = torch.tensor([2, 0])
    out, lse = backend.prefix_attention_fwd(q, k, v, pk, pv, idx, None, None, None, True, -1, 0.0,
                                            d ** -0.5, 0.0)
    grads = backend.prefix_attention_bwd(torch.randn_like(out), None, q, k, v, pk, pv, idx, None,
                                         None, None, out, lse, True, -1, 0.0, d ** -0.5, 0.0,
                                         [False, False, False, True, True])
    for g in grads[3:]:
        assert (g[[1, 3]] == 0).all() and (g[[0, 2]] != 0).any()


def test_forward_non_contiguous_inputs(backend):
    """Strided q/k/v (a (B, N, H, D) layout seen through a transpose) are read by their strides."""
    torch.manual_seed(3)
    b, hq, hkv, nq, nk, p, d = 2, 4, 2, 11, 15, 5, 24
    q = torch.randn(b, nq, hq, d).transpose(1, 2)
    k = torch.randn(b, nk, hkv, d).transpose(1, 2)
    v = torch.randn(b, nk, hkv, d).transpose(1, 2)
    pk, pv = torch.randn(1, hkv, p, d), torch.randn(1, hkv, p, d)
    out, lse = backend.prefix_attention_fwd(q, k, v, pk, pv, None, None, None, None, True, -1, 0.0,
                                            d ** -0.5, 0.0)
    from ptkernels.backends.eager import reference_prefix_attention
    ro, rl = reference_prefix_attention(q.double(), k.double(), v.double(), pk[0].double(),
                                        pv[0].double(), causal=True)
    assert (out.double() - ro).abs().max() < 1e-5
    assert (lse.double() - rl).abs().max() < 1e-5


def test_planted_causal_off_by_one_is_caught(monkeypatch):
    """Proof the harness can fail: the same kernels built with the causal bound shifted by one
    (PTK_PLANTED_CAUSAL_SHIFT=1) must be rejected by the same check."""
    bad = harness.build(defines=("PTK_PLANTED_CAUSAL_SHIFT=1",))
    _register(monkeypatch, bad)
    with pytest.raises(AssertionError, match="out: error"):
        check_against_reference(Case(nq=21, nk=29, p=7, causal=True), torch.float32, backend=NAME,
                                seed=4, grad_for=NO_GRAD)


# ---- GPC cell -------------------------------------------------------------------------------

def _gpc_grads(fn, inputs, grad):
    out = fn(*inputs)
    gs = torch.autograd.grad((out.double() * grad).sum(), inputs)
    return out, gs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shared_state", [False, True], ids=["state-per-row", "state-shared"])
@pytest.mark.parametrize("variant", ["lstm", "candidate", "gru", "reinject"])
def test_gpc_cell_forward_and_backward(backend, variant, shared_state, dtype):
    """One fused GEMM + gating epilogue and its backward (dU, dS incl. the batch reduction of a
    shared state, dW, db) against the float64 reference, with DESIGN.md's error rule. 16-bit
    dtypes run every product on mma.sync; bfloat16 (d = 40) copies X = [U, S] and W with
    cp.async, float16 (d = 36, not a multiple of 8) gathers them element-wise."""
    import ptkernels
    from attention_cases import ATOL, max_err
    from ptkernels.backends.eager_gpc import GATES, reference_gpc_cell

    gen = torch.Generator().manual_seed(11)
    # d not a multiple of the 32-column tile; 2d not of the K chunk
    b, m, d = 3, 5, (36 if dtype == torch.float16 else 40)
    n = GATES[variant]
    base = [torch.randn(b, m, d, generator=gen, dtype=torch.float64),
            torch.randn(*((m, d) if shared_state else (b, m, d)), generator=gen, dtype=torch.float64),
            torch.randn(2 * d, n * d, generator=gen, dtype=torch.float64) * d ** -0.5,
            torch.randn(n * d, generator=gen, dtype=torch.float64)]
    grad = torch.randn(b, m, d, generator=gen, dtype=torch.float64)

    def leaves(dt):
        return [x.detach().to(dt).requires_grad_(True) for x in base]

    out_k, g_k = _gpc_grads(lambda *a: ptkernels.gpc_cell(*a, variant=variant, backend=NAME),
                            leaves(dtype), grad)
    out_x, g_x = _gpc_grads(lambda *a: reference_gpc_cell(*a, variant=variant), leaves(torch.float64), grad)
    out_l, g_l = _gpc_grads(lambda *a: reference_gpc_cell(*a, variant=variant), leaves(dtype), grad)
    assert out_k.dtype == dtype
    e_k, e_l = max_err(out_k, out_x), max_err(out_l, out_x)
    assert e_k <= 2 * e_l + ATOL[dtype], f"new_state: {e_k:.3g} vs eager {e_l:.3g}"
    for name, gk, gx, gl in zip(("update", "state", "weight", "bias"), g_k, g_x, g_l):
        assert gk.shape == gx.shape
        e_k, e_l = max_err(gk, gx), max_err(gl, gx)
        atol = ATOL[dtype] * max(1.0, gx.abs().max().item())
        assert e_k <= 3 * e_l + atol, f"d{name}: {e_k:.3g} vs eager {e_l:.3g}"


@pytest.mark.parametrize("sms", [108, 132])
def test_prefix_gradient_split_fills_the_gpu(lib, sms):
    """The prompt-only backward's prefix kernel gets >= 2 blocks per SM at B=8, H=32, N=2048,
    P=32 (shared prefix) from the device's SM count; small problems are not over-split."""
    def splits(b, hq, hkv, nq, p, t, mode):
        blocks = ctypes.c_int64(0)
        arr = (ctypes.c_int64 * 7)(b, hq, hkv, nq, p, t, mode)
        s = lib.ptk_prefix_grad_splits(arr, ctypes.c_int(sms), ctypes.byref(blocks))
        return s, blocks.value

    s, blocks = splits(8, 32, 32, 2048, 32, 1, 1)
    assert s > 1 and blocks >= 2 * sms
    assert splits(1, 1, 1, 10, 32, 1, 1)[0] == 1           # one (row, head, query tile) item
    assert splits(8, 32, 8, 2048, 32, 1, 1)[1] >= 2 * sms   # GQA
    assert splits(8, 32, 32, 2048, 32, 8, 2)[1] >= 2 * sms  # per-row prefixes (T = B)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nq", [5, 1], ids=["main", "decode"])
def test_nan_in_one_query_row_stays_in_that_row(backend, dtype, nq):
    """As the op documents it: the corrupted query row's output is NaN, every other row equals
    the clean run (fmaxf drops NaN, so a kernel could silently read the row as "no key")."""
    import ptkernels
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, nq, 64, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 9, 64, generator=g).to(dtype) for _ in range(2))
    pk = torch.randn(2, 3, 64, generator=g).to(dtype)
    clean = ptkernels.prefix_attention(q, k, v, pk, pk, causal=True, backend=NAME)
    q[1, 2, nq - 1, 0] = float("nan")
    out = ptkernels.prefix_attention(q, k, v, pk, pk, causal=True, backend=NAME)
    row = torch.zeros(out.shape[:-1], dtype=torch.bool)
    row[1, 2, nq - 1] = True
    assert torch.equal(out[~row], clean[~row])
    assert bool(torch.isnan(out[1, 2, nq - 1]).all())
