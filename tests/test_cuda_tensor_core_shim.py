"""The host harness's emulation of the sm_80 tensor-core primitives (csrc/kernels/mma_sm80.cuh,
emulated by tests/host_harness/tensor_core_shim.h), and proof that it catches the bugs it exists
to catch.

* Layouts: ``mma.sync.m16n8k16`` with fragments built by direct indexing from the PTX ISA's table
  equals the matrix product; ``ldmatrix`` .x1/.x2/.x4 (and .trans) hands each lane exactly the
  elements the PTX ISA names (expected values computed here, independently of the C++ code).
* Planted bugs in the real FlashAttention-2 forward (prefix_attention_fwd_mma.cuh), each built as
  its own harness variant: a swapped P fragment register (wrong output), a missing
  ``cp.async.wait_group`` and a missing barrier before a K/V stage is refilled (both reported as
  shared-memory hazards by the shim's epoch tracking, whatever order the host threads run in);
  and in the D = 256 backward (prefix_attention_bwd_mma_wide.cuh) a missing barrier between the
  P / dS stores of a warp pair and their reads.
"""
from __future__ import annotations

import ctypes
import subprocess

import pytest
import torch

from attention_cases import Case, check_against_reference
from host_harness import harness
from ptkernels import backends

pytestmark = pytest.mark.skipif(
    harness.compiler() is None or not harness.cuda_headers_present(),
    reason="needs g++ and the CUDA toolkit headers (cuda_fp16.h) for the host harness")

NAME = "cuda_harness"
DT = {torch.float16: 1, torch.bfloat16: 2}


def _build(*defines):
    try:
        return harness.build(defines=defines)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"host harness failed to compile:\n{exc.stderr}")


@pytest.fixture(scope="module")
def lib():
    return _build()


def _selftest(lib, dtype, mode, inp, out_f=None):
    out_f = torch.zeros(16 * 8, dtype=torch.float32) if out_f is None else out_f
    out_u32 = torch.zeros(32 * 4, dtype=torch.int32)  # uint32 registers, read back as int32 bits
    rc = lib.ptk_tc_selftest(ctypes.c_int(DT[dtype]), ctypes.c_int(mode), ctypes.c_void_p(inp.data_ptr()),
                             ctypes.c_void_p(out_f.data_ptr()), ctypes.c_void_p(out_u32.data_ptr()))
    assert rc == 0
    return out_f, out_u32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mma_m16n8k16_fragment_layout(lib, dtype):
    """D = A B + C with fp32 accumulation; A, B rounded to the 16-bit type as the tensor cores see them."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen).to(dtype)
    b = torch.randn(16, 8, generator=gen).to(dtype)
    c = torch.randn(16, 8, generator=gen)
    inp = torch.cat([a.reshape(-1), b.reshape(-1)]).view(torch.int16).contiguous()
    d, _ = _selftest(lib, dtype, 0, inp, out_f=c.reshape(-1).clone())
    want = a.double() @ b.double() + c.double()
    assert (d.reshape(16, 8).double() - want).abs().max() < 1e-5
    # a transposed B (a layout slip) would not pass
    assert (a.double() @ b.double().flip(0) + c.double() - want).abs().max() > 1e-2


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
@pytest.mark.parametrize("num", [1, 2, 4], ids=lambda n: f"x{n}")
def test_ldmatrix_fragment_layout(lib, num, trans):
    """Lane l gets r[i] = M_i[l/4][2(l%4) .. +1] (.trans: M_i[2(l%4) .. +1][l/4]), matrix i being
    rows 8i..8i+7 (their addresses supplied by lanes 8i..8i+7)."""
    m = torch.arange(32 * 8, dtype=torch.int16).reshape(32, 8)  # value = 8 * row + col
    mode = {1: 1, 2: 2, 4: 3}[num] + (3 if trans else 0)
    _, regs = _selftest(lib, torch.float16, mode, m.reshape(-1).contiguous())
    regs = regs.reshape(32, 4)
    for lane in range(32):
        for i in range(4):
            got = regs[lane, i].item() & 0xFFFFFFFF
            if i >= num:
                assert got == 0
                continue
            if trans:
                lo, hi = m[8 * i + 2 * (lane % 4), lane // 4], m[8 * i + 2 * (lane % 4) + 1, lane // 4]
            else:
                lo, hi = m[8 * i + lane // 4, 2 * (lane % 4)], m[8 * i + lane // 4, 2 * (lane % 4) + 1]
            assert got == (int(lo) | int(hi) << 16), (lane, i)


def _register(monkeypatch, lib):
    backend = harness.HarnessBackend(lib)
    monkeypatch.setattr(backends, "BACKENDS", backends.BACKENDS + (NAME,))
    monkeypatch.setitem(backends._MODULES, NAME, NAME)
    monkeypatch.setitem(backends._loaded, NAME, backend)
    return backend


# 4 key tiles of 64 (prefix + sequence): the 2-stage K/V ring is refilled twice
PIPELINE_CASE = Case(nq=37, nk=150, p=40, d=32, causal=True)


def test_real_forward_is_hazard_free(monkeypatch, lib):
    _register(monkeypatch, lib)
    check_against_reference(PIPELINE_CASE, torch.float16, backend=NAME, seed=1, grad_for=("__forward_only__",))


def test_planted_swapped_fragment_register_is_caught(monkeypatch):
    _register(monkeypatch, _build("PTK_PLANT_SWAP_P_FRAGMENT=1"))
    with pytest.raises(AssertionError, match="out: error"):
        check_against_reference(PIPELINE_CASE, torch.float16, backend=NAME, seed=1, grad_for=("__forward_only__",))


def test_planted_missing_cp_async_wait_is_caught(monkeypatch):
    _register(monkeypatch, _build("PTK_PLANT_NO_CP_ASYNC_WAIT=1"))
    with pytest.raises(RuntimeError, match="missing cp.async.wait_group"):
        check_against_reference(PIPELINE_CASE, torch.bfloat16, backend=NAME, seed=1, grad_for=("__forward_only__",))


def test_planted_missing_stage_reuse_barrier_is_caught(monkeypatch):
    _register(monkeypatch, _build("PTK_PLANT_NO_REUSE_BARRIER=1"))
    with pytest.raises(RuntimeError, match="missing barrier before reusing a stage's buffer"):
        check_against_reference(PIPELINE_CASE, torch.float16, backend=NAME, seed=1, grad_for=("__forward_only__",))


def test_planted_missing_exchange_barrier_is_caught(monkeypatch):
    """The D = 256 backward hands P / dS between the two warps of a pair through shared memory;
    without the barrier between the stores and the ldmatrix reads the shim reports the hazard.
    The shim runs one OS thread per CUDA thread, so which side of the race it sees first depends
    on scheduling: a read of data the partner warp just wrote, or a store over data the partner
    warp just read (the next exchange). Both are this missing barrier; either must be reported."""
    _register(monkeypatch, _build("PTK_PLANT_NO_EXCHANGE_BARRIER=1"))
    with pytest.raises(RuntimeError, match="(read shared data|overwrote shared data another warp "
                                           "read) .*since the last __syncthreads"):
        check_against_reference(Case(nq=9, nk=11, p=5, d=136, hq=2, hkv=1), torch.float16, backend=NAME,
                                seed=1)
