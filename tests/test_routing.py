"""Measured backend routing (ptkernels/backends/routing.py, benchmarks/bench_routing.py): the
table's ranking, atomic writes, when a table applies, and that ``auto`` follows it on a CUDA
device. No GPU needed: the device name and the backends' availability are stubbed."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from ptkernels import backends
from ptkernels.backends import routing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_routing  # noqa: E402

GPU = "Fake GPU 80GB"
CUDA = torch.device("cuda", 0)


@pytest.fixture
def table_path(tmp_path, monkeypatch):
    """A routing table path for the stubbed GPU, and every backend available on it."""
    path = str(tmp_path / "routing.json")
    monkeypatch.setenv(routing.ENV_PATH, path)
    monkeypatch.delenv("PTKERNELS_BACKEND", raising=False)
    monkeypatch.setattr(routing, "_device_name", lambda device: GPU)
    monkeypatch.setattr(backends, "availability", lambda name, op, device: (True, "stub"))
    routing.clear_cache()
    yield path
    routing.clear_cache()


def _table(routes_ms: dict, device=GPU, versions=None):
    return routing.build_table(device, routes_ms, versions=versions)


def test_rank_fastest_first_without_failures():
    assert routing.rank({"eager": 9.0, "triton": 1.5, "cuda": 2.0}) == ["triton", "cuda", "eager"]
    assert routing.rank({"triton": None, "cuda": 3.0}) == ["cuda"]
    assert routing.rank({"cuda": 1.0, "triton": 1.0}) == ["triton", "cuda"]  # ties: BACKENDS order
    with pytest.raises(ValueError, match="backend"):
        routing.rank({"flash": 1.0})
    with pytest.raises(ValueError, match="timings"):
        routing.rank({"cuda": -1.0})


def test_build_table_records_what_it_measured():
    t = _table({"prefix_attention": {"triton": 1.0, "cuda": 2.0, "eager": None}},
               versions={"torch": "x"})
    assert t["routes"] == {"prefix_attention": ["triton", "cuda"]}
    assert t["timings_ms"]["prefix_attention"]["eager"] is None
    assert t["device"] == GPU and t["versions"] == {"torch": "x"} and t["format"] == routing.FORMAT
    with pytest.raises(ValueError, match="route key"):
        _table({"attention": {"triton": 1.0}})


def test_write_table_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "sub" / "t.json")
    first = _table({"gpc_cell": {"cuda": 1.0}})
    routing.write_table(first, path)
    assert routing.load_table(path) == first
    # a write that fails half-way leaves the old table and no temporary file
    real_dump = json.dump

    def broken_dump(obj, f, **kw):
        f.write('{"format": 1, "dev')
        raise OSError("disk full")
    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        routing.write_table(_table({"gpc_cell": {"triton": 1.0}}), path)
    monkeypatch.setattr(json, "dump", real_dump)
    assert routing.load_table(path) == first
    assert os.listdir(os.path.dirname(path)) == ["t.json"]


def test_status_says_why_a_table_does_not_apply(table_path):
    assert routing.status(CUDA).table is None
    assert "no routing table" in routing.status(CUDA).reason
    cases = [("{not json", "not valid JSON"),
             (json.dumps({"format": 99}), "format"),
             (json.dumps(_table({"gpc_cell": {"cuda": 1.0}}, device="Other GPU")), "Other GPU"),
             (json.dumps(_table({"gpc_cell": {"cuda": 1.0}}, versions={"torch": "0.0"})),
              "other versions")]
    for text, why in cases:
        with open(table_path, "w") as f:
            f.write(text)
        routing.clear_cache()
        st = routing.status(CUDA)
        assert st.table is None and why in st.reason, (why, st.reason)
    routing.write_table(_table({"gpc_cell": {"cuda": 1.0}}), table_path)
    routing.clear_cache()
    assert routing.status(CUDA).table is not None
    assert "measured routing table" in routing.status(CUDA).reason


def test_a_device_without_a_name_keeps_the_estimates(monkeypatch):
    def no_driver(device):
        raise RuntimeError("Found no NVIDIA driver")
    monkeypatch.setattr(routing, "_device_name", no_driver)
    routing.clear_cache()
    st = routing.status(CUDA)
    assert st.table is None and "no NVIDIA driver" in st.reason
    routing.clear_cache()


def test_default_path_is_per_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert routing.default_path("NVIDIA H100 80GB HBM3") == \
        str(tmp_path / "ptkernels" / "routing" / "nvidia-h100-80gb-hbm3.json")
    with pytest.raises(ValueError, match="device_name"):
        routing.device_slug("  ")


def test_auto_follows_the_measured_table(table_path, monkeypatch):
    # without a table: the estimated order (AUTO_ORDER)
    assert backends.resolve("prefix_attention", CUDA) == backends.AUTO_ORDER["cuda"]["prefix_attention"][0]
    assert backends.resolve("gpc_cell", CUDA) == backends.AUTO_ORDER["cuda"]["gpc_cell"][0]
    routing.write_table(_table({"prefix_attention": {"triton": 2.0, "cuda": 1.0},
                                "prefix_attention/decode": {"triton": 1.0, "cuda": 3.0},
                                "gpc_cell": {"triton": 1.0, "cuda": None}}), table_path)
    routing.clear_cache()
    assert backends.resolve("prefix_attention", CUDA) == "cuda"
    assert backends.resolve("prefix_attention", CUDA, variant="decode") == "triton"
    assert backends.resolve("gpc_cell", CUDA) == "triton"
    # a measured backend that is not available for the call is passed over, then the estimates
    # fill in what the measurement could not run
    monkeypatch.setattr(backends, "availability",
                        lambda name, op, device: (name != "triton", "stub"))
    assert backends.resolve("gpc_cell", CUDA) == "cuda"
    # explicit choices and PTKERNELS_BACKEND still win; the CPU never reads a table
    assert backends.resolve("prefix_attention", CUDA, "eager") == "eager"
    monkeypatch.setenv("PTKERNELS_BACKEND", "eager")
    assert backends.resolve("prefix_attention", CUDA) == "eager"
    monkeypatch.delenv("PTKERNELS_BACKEND")
    assert backends.resolve("prefix_attention", torch.device("cpu")) == "eager"


def test_measure_and_render_keep_failures_out_of_the_route():
    def run_timed(key, name):
        if name == "cuda":
            raise RuntimeError("no kernel for this shape")
        return {"eager": 5.0, "triton": 1.0}[name]

    timings, errors = bench_routing.measure(["prefix_attention"], lambda k: ["eager", "triton", "cuda"],
                                            run_timed)
    assert timings == {"prefix_attention": {"eager": 5.0, "triton": 1.0, "cuda": None}}
    table = routing.build_table(GPU, timings, {"prefix_attention": "setup"})
    assert table["routes"]["prefix_attention"] == ["triton", "eager"]
    text = bench_routing.render(table, errors)
    assert "failed: RuntimeError: no kernel for this shape" in text and "triton > eager" in text
    for key in routing.ROUTE_KEYS:
        assert bench_routing.describe(key, torch.bfloat16)


def test_bench_routing_without_a_gpu_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_routing.main(["--gpu"]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err


def test_gpu_check_runs_the_benchmarks_that_take_gpu():
    """make gpu-check passes --gpu to the benchmarks whose parser has it: the GPU-capable ones
    must all have it (an unknown --gpu would fail the lent GPU's run)."""
    with open(os.path.join(ROOT, "Makefile")) as f:
        assert "grep -l -- '\"--gpu\"' benchmarks/bench_*.py" in f.read()
    for name in ("bench_attention.py", "bench_routing.py", "bench_vs_peft_concat.py"):
        with open(os.path.join(ROOT, "benchmarks", name)) as f:
            assert '"--gpu"' in f.read(), name


def test_info_rows_carry_the_routing():
    rows = backends.describe()
    assert rows and all("routing" in row for row in rows)
