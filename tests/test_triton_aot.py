"""Every Triton kernel configuration compiles ahead of time for sm_80 and sm_90, without spills.

Discovers each module of ``ptkernels.backends.triton`` that exposes ``AOT_SPECS`` (format in
``tests/triton_aot.py``), compiles every variant for both archs in 2 worker processes (no GPU,
TRITON_INTERPRET unset there), and asserts: zero register spills, shared memory within the arch
limit (sm_80 163 KB, sm_90 227 KB), tensor-core instructions in kernels with matrix products. The
table (kernel, arch, variant, config, regs, smem, spills) is printed (``pytest -s`` shows it).
"""
from __future__ import annotations

import pytest

from tests import triton_aot
from ptkernels.backends.triton import configs


@pytest.fixture(scope="module")
def modules():
    return triton_aot.discover_modules()


@pytest.fixture(scope="module")
def results(modules):
    rows = triton_aot.run_jobs(triton_aot.list_jobs(modules), processes=2)
    print("\n" + triton_aot.table(rows))
    return rows


def test_discovery_finds_the_forward_kernels(modules):
    for name in ("attention_fwd", "decode", "dropout"):
        assert f"{triton_aot.PACKAGE}.{name}" in modules


@pytest.mark.parametrize("kernel_kind", ["fwd", "decode"])
@pytest.mark.parametrize("arch", configs.ARCHS)
def test_specs_cover_every_autotune_candidate(kernel_kind, arch):
    from ptkernels.backends.triton import attention_fwd, decode

    spec = (attention_fwd if kernel_kind == "fwd" else decode).AOT_SPECS[0]
    compiled = {(v["dtype"], v["block_d"], v["config"], v["heavy"]) for v in spec["variants"](arch)}
    for dtype in configs.DTYPES:
        for bd in configs.HEAD_DIM_BUCKETS:
            for heavy in (False, True):
                for cfg in configs.candidates(kernel_kind, arch, dtype, bd, heavy):
                    key = (configs.aot_dtype(dtype), bd, str(cfg))
                    # a light config may be covered by the same config compiled with every feature
                    assert key + (heavy,) in compiled or key + (True,) in compiled, \
                        f"{kernel_kind} sm_{arch}: {key} (heavy={heavy}) is never compiled"


def test_no_spills_smem_within_limits_tensor_cores(results):
    assert results, "no AOT variants found"
    problems = [f"{r['kernel']} sm_{r['arch']} {r['label']} {r['config']}: {p}"
                for r in results for p in triton_aot.check(r)]
    assert not problems, "\n".join(problems)
    archs = {r["arch"] for r in results}
    assert archs == {80, 90}
    assert any(r["mma"] == "wgmma" for r in results if r["arch"] == 90), \
        "no sm_90 kernel uses wgmma"
