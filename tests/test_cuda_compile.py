"""Every CUDA kernel in csrc/kernels compiles with nvcc for sm_80 and sm_90 without register
spills; prints the resource table (registers, stack, spills, static shared memory). The SASS of
every mma.sync (FlashAttention-2-style) 16-bit kernel contains tensor-core MMA (HMMA), ldmatrix
(LDSM) and cp.async (LDGSTS) instructions: a refactor that loses one fails here.

The torch-free .cuh headers are compiled through tiny kernel-only .cu files (explicit
instantiations of the launchers, which instantiate every kernel), so this check takes seconds
and does not depend on the full extension build. Dynamic shared memory is checked at compile
time by static_asserts in the headers.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "csrc" / "kernels"
ARCHS = ("80", "90")
DTYPES = ("float", "__half", "__nv_bfloat16")


def _nvcc():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    cand = Path(home, "bin", "nvcc")
    return str(cand) if cand.exists() else shutil.which("nvcc")


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)")

# One translation unit per kernel family: the instantiations the extension uses.
UNITS = {
    "prefix_attention_fwd": ['#include "prefix_attention_launch.cuh"'] + [
        f"template void ptk::launch_prefix_attention_fwd<{t}>(const ptk::AttnParams&, ptk_stream_t);"
        for t in DTYPES],
    "prefix_attention_bwd": ['#include "prefix_attention_launch.cuh"'] + [
        f"template void ptk::launch_prefix_attention_bwd<{t}>(const ptk::AttnParams&, bool, ptk_stream_t);"
        for t in DTYPES],
}
if (KERNELS / "gpc_cell.cuh").exists():
    UNITS["gpc_cell"] = ['#include "gpc_cell_launch.cuh"'] + [
        f"template void ptk::launch_gpc_cell_fwd<{t}>(const ptk::GpcParams&, ptk_stream_t);"
        for t in DTYPES] + [
        f"template void ptk::launch_gpc_cell_bwd<{t}>(const ptk::GpcParams&, ptk_stream_t);"
        for t in DTYPES]

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+a?)'")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return dict(zip(names, names))
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def parse_ptxas(log: str):
    """{(kernel, arch): {"regs", "stack", "spill_st", "spill_ld", "smem"}} from `-Xptxas -v`."""
    rows, cur = {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = (m.group(1), m.group(2))
            rows[cur] = {"regs": None, "stack": 0, "spill_st": 0, "spill_ld": 0, "smem": 0}
            continue
        if cur is None:
            continue
        m = _STACK.search(line)
        if m:
            rows[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = _USED.search(line)
        if m:
            rows[cur]["regs"] = int(m.group(1))
            rows[cur]["smem"] = int(m.group(2) or 0)
    return rows


def _cuobjdump():
    """cuobjdump from the CUDA toolkit, PATH, or the copy every Triton wheel ships."""
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    cand = [Path(home, "bin", "cuobjdump"), shutil.which("cuobjdump")]
    try:
        import triton
        cand.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in cand if c and Path(c).exists()), None)


def sass_by_kernel(obj: Path) -> dict:
    """{mangled kernel name: SASS text} of an object file."""
    out = subprocess.run([_cuobjdump(), "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    kernels, cur = {}, None
    for line in out.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            kernels[cur] = []
        elif cur is not None:
            kernels[cur].append(line)
    return {k: "\n".join(v) for k, v in kernels.items()}


# The FlashAttention-2-style attention kernels (mma_sm80.cuh; the backward's D = 256 bucket is
# the *_wide_kernel) and the instructions each must contain. The GPC cell's tensor-core GEMMs all
# need HMMA and LDSM; the forward's (X = [U, S] and W operands) also cp.async (LDGSTS), while the
# backward's read the fp32 dA and gather it element-wise.
MMA_KERNEL = re.compile(r"(fwd|dq|dkdv)_(mma|wide)_kernel")
MMA_OPCODES = ("HMMA", "LDSM", "LDGSTS")
GEMM_MMA_KERNEL = re.compile(r"gemm_mma_kernel")
GEMM_MMA_OPCODES = ("HMMA", "LDSM")
GEMM_FWD_OPERAND = re.compile(r"gpc::XOperand<")
GEMM_MMA_FWD_OPCODES = ("HMMA", "LDSM", "LDGSTS")


def _compile(unit, arch, tmp):
    src = tmp / f"{unit}.cu"
    if not src.exists():
        src.write_text("\n".join(UNITS[unit]) + "\n")
    cmd = [NVCC, "-std=c++20", "-O3", "--use_fast_math", "-Xptxas", "-v",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-I{KERNELS}", "-c", str(src),
           "-o", str(tmp / f"{unit}.sm_{arch}.o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    return unit, arch, res


def test_every_kernel_compiles_without_spills(tmp_path):
    jobs = [(u, a) for u in UNITS for a in ARCHS]
    for u in UNITS:
        (tmp_path / f"{u}.cu").write_text("\n".join(UNITS[u]) + "\n")
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda ua: _compile(ua[0], ua[1], tmp_path), jobs))
    table = {}
    for unit, arch, res in results:
        assert res.returncode == 0, f"nvcc failed for {unit} sm_{arch}:\n{res.stderr[-4000:]}"
        rows = parse_ptxas(res.stdout + res.stderr)
        assert rows, f"no ptxas report for {unit} sm_{arch}"
        table.update(rows)
    names = _demangle(sorted({k for k, _ in table}))
    print(f"\n{'kernel':<72} {'arch':<6} {'REG':>4} {'STACK':>5} {'SPILL st/ld':>11} {'SMEM':>5}")
    for (kernel, arch), r in sorted(table.items(), key=lambda kv: (names[kv[0][0]], kv[0][1])):
        print(f"{names[kernel][:72]:<72} {arch:<6} {r['regs']:>4} {r['stack']:>5} "
              f"{r['spill_st']:>5}/{r['spill_ld']:<5} {r['smem']:>5}")
    spilling = {f"{names[k]} {a}": r for (k, a), r in table.items()
                if r["spill_st"] or r["spill_ld"] or r["stack"]}
    assert not spilling, f"kernels with spills / stack: {spilling}"
    for arch in ARCHS:
        kernels = {k for k, a in table if a == f"sm_{arch}"}
        # float32: CUDA-core forward (3 buckets) + backward (3 buckets x dq, dk/dv, dprefix);
        # the CUDA-core split-K forward + merge for every dtype; delta kernels
        assert len(kernels) >= 39, f"sm_{arch}: only {len(kernels)} kernels compiled"
        assert all(table[(k, f'sm_{arch}')]["regs"] <= 255 for k in kernels)
        # mma.sync: forward 2 dtypes x 3 buckets x (per head, packed GQA decode); backward
        # 2 dtypes x 3 buckets x (dQ, dK/dV, dprefix), the D = 256 bucket as the *_wide_kernel
        n_mma = sum(bool(MMA_KERNEL.search(k)) for k in kernels)
        assert n_mma == 30, f"sm_{arch}: {n_mma} mma.sync kernels, expected 30"
        n_wide = sum("_wide_kernel" in k for k in kernels)
        assert n_wide == 6, f"sm_{arch}: {n_wide} D = 256 backward kernels, expected 6"
        # GPC GEMMs on mma.sync: 2 dtypes x (4 forward variants + backward dX, dW)
        n_gemm = sum(bool(GEMM_MMA_KERNEL.search(k)) for k in kernels)
        assert n_gemm == 12, f"sm_{arch}: {n_gemm} mma.sync GPC GEMM kernels, expected 12"
    if _cuobjdump() is None:
        # CI builds the CUDA kernels (PTKERNELS_BUILD_CUDA=1): there the SASS check must run
        if os.environ.get("PTKERNELS_BUILD_CUDA") == "1":
            pytest.fail("no cuobjdump (CUDA toolkit or Triton wheel): the SASS check cannot run")
        pytest.skip("no cuobjdump (CUDA toolkit or Triton wheel) for the SASS check")
    for unit in UNITS:
        for arch in ARCHS:
            for kernel, sass in sass_by_kernel(tmp_path / f"{unit}.sm_{arch}.o").items():
                need = (MMA_OPCODES if MMA_KERNEL.search(kernel)
                        else GEMM_MMA_FWD_OPCODES if GEMM_MMA_KERNEL.search(kernel)
                        and GEMM_FWD_OPERAND.search(names.get(kernel, ""))
                        else GEMM_MMA_OPCODES if GEMM_MMA_KERNEL.search(kernel) else ())
                missing = [op for op in need if not re.search(rf"\b{op}\b", sass)]
                assert not missing, f"{names.get(kernel, kernel)} sm_{arch}: SASS lacks {missing}"
