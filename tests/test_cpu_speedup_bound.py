"""benchmarks/cpu_speedup_bound.py compares the concatenation path with the same SDPA call on
inputs prepared beforehand: both must compute the same attention (else the bound compares
different work), and the script must run and write its table."""
from __future__ import annotations

import importlib.util
import os

import torch

from ptkernels.bench import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location(
        "cpu_speedup_bound", os.path.join(ROOT, "benchmarks", "cpu_speedup_bound.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prepared_call_computes_the_concatenation_path():
    mod = _script()
    for shape in kernels.TINY_SHAPES.values():
        x = kernels.make_inputs(shape, True, "cpu", torch.float64, seed=3)
        want = kernels.concat_mask_sdpa(x, shape)
        got = mod._prepared(x, shape)()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        got.sum().backward()   # the prepared path's backward runs (its fwd+bwd row times one)


def test_script_writes_its_table(tmp_path):
    out = tmp_path / "bound.md"
    _script().main(["--tiny", "--reps", "1", "--inner", "1", "--out", str(out)])
    text = out.read_text()
    for name in kernels.TINY_SHAPES:
        assert f"| {name} | fwd+bwd |" in text
    assert "1 thread, process CPU time" in text
