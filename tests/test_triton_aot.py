"""Every Triton kernel configuration compiles ahead of time for sm_80, sm_86 and sm_90 as the JIT
specializes it, without spills, within each architecture's shared memory, with asynchronous loads.

Discovers each module of ``ptkernels.backends.triton`` that exposes ``AOT_SPECS`` (format in
``tests/triton_aot.py``), compiles every variant for each architecture's table in 2 worker
processes (no GPU, TRITON_INTERPRET unset there; sm_86 variants equal to sm_80 ones are checked
from the sm_80 compile), and asserts: zero register spills, shared memory within the arch limit
(sm_80 163 KB, sm_86/89 99 KB, sm_90 227 KB), tensor-core instructions in kernels with matrix
products, cp.async / TMA in pipelined (num_stages > 1) loops, at least one resident block per SM.
Besides every shipped configuration, the first bf16 D = 128 configuration of each attention
kernel is compiled for the other shapes the JIT specializes (``_common.AOT_SHAPES``: head dim 80
and 96, odd lengths, MHA, MQA). The table is printed (``pytest -s`` shows it).

It also checks the committed static kernel report (``benchmarks/kernel_report.py``): it covers
every shipped bf16 configuration at head dim 64 / 128 and none of its rows has a problem.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests import triton_aot
from ptkernels.backends.triton import configs

REPORT = os.path.join(triton_aot.ROOT, "benchmarks", "results", "triton_kernel_report.json")


@pytest.fixture(scope="module")
def modules():
    return triton_aot.discover_modules()


@pytest.fixture(scope="module")
def results(modules):
    rows = triton_aot.run_jobs(triton_aot.list_jobs(modules), processes=2)
    print("\n" + triton_aot.table(rows))
    return rows


def test_discovery_finds_the_forward_kernels(modules):
    for name in ("attention_fwd", "decode", "dropout", "attention_bwd"):
        assert f"{triton_aot.PACKAGE}.{name}" in modules


@pytest.mark.parametrize("kernel_kind", ["fwd", "decode"])
@pytest.mark.parametrize("arch", configs.ARCHS)
def test_specs_cover_every_candidate(kernel_kind, arch):
    from ptkernels.backends.triton import attention_fwd, decode

    spec = (attention_fwd if kernel_kind == "fwd" else decode).AOT_SPECS[0]
    compiled: dict = {}
    for v in spec["variants"](arch):
        key = (v["dtype"], v["block_d"], v["config"])
        compiled.setdefault(key, []).append(set(configs.FEATURES[v["features"]]))
        if "shape" not in v:
            assert v["constexprs"]["D"] == v["block_d"], "the head dim must be specialized as at runtime"
            for flag in ("HAS_BIAS", "HAS_SOFTCAP", "HAS_DROPOUT"):
                assert v["constexprs"][flag] == (flag in configs.FEATURES[v["features"]]), (v, flag)
    for dtype in configs.DTYPES:
        for bd in configs.HEAD_DIM_BUCKETS:
            for cls in configs.FEATURE_CLASSES:
                for cfg in configs.candidates(kernel_kind, arch, dtype, bd, cls):
                    key = (configs.aot_dtype(dtype), bd, str(cfg))
                    feats = set(configs.FEATURES[cls])
                    if cls == "light" and dtype != torch.float32:
                        # the common call: compiled exactly as it runs, never covered by a heavier compile
                        assert feats in compiled.get(key, ()), \
                            f"{kernel_kind} sm_{arch}: {key} is never compiled light"
                    else:
                        # covered by the same config compiled with more features
                        assert any(feats <= f for f in compiled.get(key, ())), \
                            f"{kernel_kind} sm_{arch}: {key} ({cls}) is never compiled with its features"


def test_feature_class():
    """A call's table: light without bias / softcap / dropout, the one it has, heavy for two or
    more; an unknown class is refused."""
    fc = configs.feature_class
    assert fc(False, False, False) == "light"
    assert (fc(True, False, False), fc(False, True, False), fc(False, False, True)) == \
        ("bias", "softcap", "dropout")
    assert {fc(True, True, False), fc(True, False, True), fc(False, True, True),
            fc(True, True, True)} == {"heavy"}
    with pytest.raises(ValueError, match="features"):
        configs.candidates("fwd", 90, torch.bfloat16, 64, "everything")
    # each one-feature table holds the config its heavy table starts with (always holdable)
    for arch in configs.ARCHS:
        for bd in configs.HEAD_DIM_BUCKETS:
            heavy = configs.candidates("fwd", arch, torch.bfloat16, bd, "heavy")
            for cls in ("bias", "softcap", "dropout"):
                assert heavy[0] in configs.candidates("fwd", arch, torch.bfloat16, bd, cls)


@pytest.mark.parametrize("arch", (80, 90))
def test_other_shapes_are_compiled(arch):
    """Every attention kernel is also compiled as the JIT specializes other call shapes (its
    first bf16 D = 128 configuration, light and all-features): D = 80 with odd sequence lengths
    and MHA head counts (G == 1 a constant), D = 96 with one KV head (MQA)."""
    import importlib

    from ptkernels.backends.triton._common import AOT_SHAPES

    for mod, name in (("attention_fwd", "attention_fwd"), ("decode", "decode_fwd"),
                      ("attention_bwd", "attention_bwd_dq"), ("attention_bwd", "attention_bwd_dkdv"),
                      ("attention_bwd", "attention_bwd_dkdv_dq"),
                      ("attention_bwd", "attention_bwd_dq_prefix"),
                      ("attention_bwd", "attention_bwd_dprefix")):
        module = importlib.import_module(f"{triton_aot.PACKAGE}.{mod}")
        spec = next(s for s in module.AOT_SPECS if s["name"] == name)
        shaped = [v for v in spec["variants"](arch) if "shape" in v]
        assert {v["shape"] for v in shaped} == set(AOT_SHAPES), name
        for v in shaped:
            shape = AOT_SHAPES[v["shape"]]
            cx, sig = v["constexprs"], v["signature"]
            assert cx["D"] == shape["D"] and cx["BLOCK_D"] == 128, (name, v["label"])
            assert ("Nq" in v["div16"]) != shape["odd_lengths"], (name, v["label"])
            one = "G" if shape["heads"] == "mha" else "Hkv"
            names = spec["kernel"].arg_names
            assert one not in names or (cx[one] == 1 and one not in sig), (name, v["label"])
    assert not [v for v in spec["variants"](86) if "shape" in v]  # sm_86 runs sm_80's code


def test_table_arch():
    assert [configs.table_arch(a) for a in (80, 86, 87, 89, 90, 100)] == [80, 86, 86, 86, 90, 90]


def _row(**kw):
    row = {"kernel": "k", "arch": 86, "label": "l", "config": "c", "regs": 128, "stack": 0,
           "spill_stores": 0, "spill_loads": 0, "smem": 64 * 1024, "mma": "mma",
           "tensor_cores": True, "async": "cp.async", "async_required": True, "blocks_per_sm": 1}
    row.update(kw)
    return row


def test_check_fails_on_spills_smem_and_lost_async_loads():
    """The checks below can fail: each planted defect is reported."""
    assert triton_aot.check(_row()) == []
    assert "spills" in triton_aot.check(_row(spill_stores=8, stack=8))[0]
    assert "shared memory" in triton_aot.check(_row(smem=100 * 1024))[0]  # > 99 KB on sm_86
    assert triton_aot.check(_row(smem=100 * 1024, arch=80)) == []          # fits sm_80
    assert "asynchronous" in triton_aot.check(_row(**{"async": None}))[0]
    assert "tensor-core" in triton_aot.check(_row(mma=None))[0]
    assert triton_aot.blocks_per_sm(80, 255, 8, 98304) == 1
    assert triton_aot.blocks_per_sm(90, 128, 4, 0) == 4


def test_no_spills_smem_within_limits_tensor_cores_async_loads(results):
    assert results, "no AOT variants found"
    problems = [f"{r['kernel']} sm_{r['arch']} {r['label']} {r['config']}: {p}"
                for r in results for p in triton_aot.check(r)]
    assert not problems, "\n".join(problems)
    archs = {r["arch"] for r in results}
    assert archs == set(triton_aot.ARCHS)
    assert any(r["mma"] == "wgmma" for r in results if r["arch"] == 90), \
        "no sm_90 kernel uses wgmma"


def test_committed_kernel_report_covers_every_shipped_config():
    """benchmarks/results/triton_kernel_report.json lists every shipped bf16 d64 / d128
    attention configuration for each architecture, and none of its rows has a problem
    (regenerate it with ``python benchmarks/kernel_report.py`` after editing a table)."""
    import importlib

    with open(REPORT) as f:
        rows = json.load(f)
    have = {(r["kernel"], r["arch"], r["label"], r["config"]) for r in rows}
    for r in rows:
        assert not triton_aot.check(r), (r, triton_aot.check(r))
    for mod in ("attention_fwd", "decode", "attention_bwd"):
        for spec in importlib.import_module(f"{triton_aot.PACKAGE}.{mod}").AOT_SPECS:
            for arch in triton_aot.ARCHS:
                for v in spec["variants"](arch):
                    if v["label"].startswith(("bf16 d64 ", "bf16 d128 ")):
                        key = (spec["name"], arch, v["label"], v["config"])
                        assert key in have, f"{key} missing from the kernel report: regenerate it"
