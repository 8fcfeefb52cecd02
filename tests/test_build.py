"""The build and the `ptkernels` command: one op namespace with one schema per op (the C++ library
defines none; its CUDA kernels implement the kernel entries ptkernels::<op>_cuda, derived from the
public ops), `ptkernels info` reports the backends, and setup.py fails loudly instead of silently
building nothing."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ptkernels  # noqa: F401  (defines the ops and their kernel entries)

ROOT = Path(__file__).resolve().parents[1]

PUBLIC_OPS = ("prefix_attention_fwd", "prefix_attention_bwd", "gpc_cell_fwd", "gpc_cell_bwd")


def _env(**overrides):
    env = dict(os.environ)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _run(args, timeout=120, **env):
    return subprocess.run(args, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout)


# ---- ptkernels._C -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def native():
    # Built by `make test` / `pip install --no-build-isolation .`; a PTKERNELS_PURE=1 install has no _C.
    if importlib.util.find_spec("ptkernels._C") is None:
        pytest.skip("ptkernels._C is not built (pure-Python install)")
    return importlib.import_module("ptkernels._C")


def _arguments(schema) -> list[tuple[str, str, object]]:
    return [(a.name, str(a.type), a.N) for a in schema.arguments]


@pytest.mark.parametrize("name", PUBLIC_OPS)
def test_kernel_entry_is_the_public_schema_without_backend(name):
    public = getattr(torch.ops.ptkernels, name).default._schema
    kernel = getattr(torch.ops.ptkernels, name + "_cuda").default._schema
    assert _arguments(public)[-1][:2] == ("backend", "str")
    assert _arguments(kernel) == _arguments(public)[:-1]
    assert [str(r.type) for r in kernel.returns] == [str(r.type) for r in public.returns]


def test_native_library_defines_no_schema_of_its_own(native):
    # One namespace: nothing lives under the old ptk:: namespace, and every ptkernels:: op is
    # a public op, its kernel entry, or the bias-gradient helper op.
    names = torch._C._dispatch_get_all_op_names()
    assert not [n for n in names if n.startswith("ptk::")]
    ours = sorted(n.split("::", 1)[1] for n in names if n.startswith("ptkernels::"))
    expected = set(PUBLIC_OPS) | {f"{n}_cuda" for n in PUBLIC_OPS}
    assert expected <= set(ours), ours


def test_cuda_kernel_probe_is_consistent(native):
    # With no .cu sources there can be no CUDA kernel; `ptkernels info` relies on this probe.
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("ptkernels::prefix_attention_fwd_cuda", "CUDA")
    assert ptkernels.HAS_CUDA_KERNELS == has_cuda
    if not list((ROOT / "csrc").glob("*.cu")):
        assert not has_cuda
    if torch.version.cuda is None:
        assert not has_cuda


def _meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("prefix_shape", [None, (2, 3, 64), (4, 2, 3, 64)])
def test_prefix_attention_meta_shapes(prefix_shape):
    q, k, v = _meta(4, 8, 5, 64, dtype=torch.bfloat16), _meta(4, 2, 7, 64, dtype=torch.bfloat16), _meta(4, 2, 7, 64, dtype=torch.bfloat16)
    pk = pv = None if prefix_shape is None else _meta(*prefix_shape, dtype=torch.bfloat16)
    out, lse = torch.ops.ptkernels.prefix_attention_fwd_cuda(q, k, v, pk, pv, None, None, None, None, True, 0, 0.0, 0.125, 0.0)
    assert (out.shape, out.dtype, out.device.type) == (q.shape, q.dtype, "meta")
    assert (lse.shape, lse.dtype) == ((4, 8, 5), torch.float32)

    def bwd(mask):
        return torch.ops.ptkernels.prefix_attention_bwd_cuda(out, None, q, k, v, pk, pv, None, None, None, None, out, lse,
                                                  True, 0, 0.0, 0.125, 0.0, mask)

    grads = bwd([True] * 5)
    expected = [q.shape, k.shape, v.shape] + [(0,) if pk is None else pk.shape] * 2
    assert [g.shape for g in grads] == [torch.Size(s) for s in expected]
    assert all(g.dtype == torch.bfloat16 for g in grads)
    # Prompt-only backward: only the prefix gradients are materialized.
    grads = bwd([False, False, False, True, True])
    assert [g.numel() for g in grads[:3]] == [0, 0, 0]
    assert [g.shape for g in grads[3:]] == [torch.Size((0,) if pk is None else pk.shape)] * 2


@pytest.mark.parametrize("state_shape", [(4, 16), (2, 4, 16)])
def test_gpc_cell_meta_shapes(state_shape):
    u, s, w, b = _meta(2, 4, 16), _meta(*state_shape), _meta(32, 32), _meta(32)
    new_state, preact = torch.ops.ptkernels.gpc_cell_fwd_cuda(u, s, w, b, "lstm")
    assert (new_state.shape, new_state.dtype) == (u.shape, u.dtype)
    assert (preact.shape, preact.dtype) == ((2, 4, 32), torch.float32)
    grads = torch.ops.ptkernels.gpc_cell_bwd_cuda(new_state, u, s, w, b, preact, "lstm", [True, True, True, True])
    assert [g.shape for g in grads] == [u.shape, s.shape, w.shape, b.shape]
    grads = torch.ops.ptkernels.gpc_cell_bwd_cuda(new_state, u, s, w, b, preact, "lstm", [False, True, False, True])
    assert [g.numel() for g in grads] == [0, s.numel(), 0, b.numel()]


@pytest.mark.parametrize("variant,gates", [("gru", 1), ("lstm", 2), ("reinject", 2), ("candidate", 3)])
def test_gpc_cell_meta_preact_has_one_block_per_gate(variant, gates):
    u, s = _meta(2, 4, 16), _meta(4, 16)
    w, b = _meta(32, 16 * gates), _meta(16 * gates)
    _, preact = torch.ops.ptkernels.gpc_cell_fwd_cuda(u, s, w, b, variant)
    assert preact.shape == (2, 4, 16 * gates)


def test_meta_kernels_trace_with_symbolic_shapes():
    from torch.fx.experimental.proxy_tensor import make_fx

    def attn(q, k, v):
        return torch.ops.ptkernels.prefix_attention_fwd_cuda(q, k, v, None, None, None, None, None, None, False, 0, 0.0, 0.125, 0.0)

    def gpc(u, s, w, b):
        return torch.ops.ptkernels.gpc_cell_fwd_cuda(u, s, w, b, "lstm")

    graph = make_fx(attn, tracing_mode="symbolic")(torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8))
    assert "ptkernels.prefix_attention_fwd_cuda" in graph.code
    graph = make_fx(gpc, tracing_mode="symbolic")(torch.randn(2, 3, 4), torch.randn(3, 4), torch.randn(8, 8), torch.randn(8))
    assert "ptkernels.gpc_cell_fwd_cuda" in graph.code


# ---- the ptkernels command ----------------------------------------------------------------------

def test_info_prints_versions_and_backend_table():
    result = _run([sys.executable, "-m", "ptkernels", "info"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for needle in ("torch build:", "ptkernels._C:", "CUDA kernels in ptkernels._C:", "GPUs:", "PTKERNELS_BACKEND="):
        assert needle in out
    if "CUDA kernels in ptkernels._C: yes" in out:
        assert "note: attention dropout (dropout_p > 0) on the cuda backend runs on triton" in out
    assert "backends (what backend='auto' runs):" in out, out
    table = out.split("backends (what backend='auto' runs):", 1)[1]
    for op in ("prefix_attention", "gpc_cell"):
        assert any(line.split()[:2] == [op, "cpu"] for line in table.splitlines() if line.strip()), table


def test_info_json_reports_backend_rows():
    result = _run([sys.executable, "-m", "ptkernels", "info", "--json"])
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["backends_error"] is None
    assert info["versions"]["torch"] and info["versions"]["python"]
    rows = info["backends"]
    assert {(r["op"], r["device"]) for r in rows} >= {("prefix_attention", "cpu"), ("gpc_cell", "cpu")}
    for row in rows:
        assert {"op", "device", "backend", "reason"} <= set(row)
    assert info["native"]["built"] == (importlib.util.find_spec("ptkernels._C") is not None)
    # issue 14: where the CUDA kernels hand dropout to another backend, `info` says so
    assert "dropout" in info["cuda_dropout"] and "triton" in info["cuda_dropout"]
    # issue 11: which Triton backward runs (fused with atomics, or deterministic on request)
    if importlib.util.find_spec("triton") is not None:
        fused_default = os.environ.get("PTKERNELS_DETERMINISTIC", "0") != "1"
        assert info["triton_backward"].startswith("5-product" if fused_default else "7-product")
        again = _run([sys.executable, "-m", "ptkernels", "info", "--json"], PTKERNELS_DETERMINISTIC="1")
        assert json.loads(again.stdout)["triton_backward"].startswith("7-product")


def test_info_honours_ptkernels_backend():
    result = _run([sys.executable, "-m", "ptkernels", "info", "--json"], PTKERNELS_BACKEND="eager")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["env"]["PTKERNELS_BACKEND"] == "eager"
    assert all(r["backend"] == "eager" for r in info["backends"] if r["device"] == "cpu")


def test_check_matches_the_reference():
    result = _run([sys.executable, "-m", "ptkernels", "check"], PTKERNELS_BACKEND=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backend 'eager'" in result.stdout and result.stdout.rstrip().endswith("OK"), result.stdout


# ---- setup.py -----------------------------------------------------------------------------------

# Runs setup.py the way pip's build backend does, with `import torch` made to fail (sys.modules["torch"] = None).
_SETUP_WITHOUT_TORCH = (
    "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
    "runpy.run_path('setup.py', run_name='__main__')"
)


def test_setup_fails_loudly_without_torch():
    result = _run([sys.executable, "-c", _SETUP_WITHOUT_TORCH], timeout=60,
                  PTKERNELS_ALLOW_NO_TORCH=None, PTKERNELS_PURE=None)
    assert result.returncode != 0
    assert "pip install --no-build-isolation ." in result.stderr
    assert "PTKERNELS_ALLOW_NO_TORCH=1" in result.stderr


def test_setup_without_torch_opt_in_builds_pure_python():
    result = _run([sys.executable, "-c", _SETUP_WITHOUT_TORCH], timeout=60,
                  PTKERNELS_ALLOW_NO_TORCH="1", PTKERNELS_PURE=None, PTKERNELS_LOCAL_VERSION=None)
    assert result.returncode == 0, result.stderr
    assert "pure Python build, no ptkernels._C" in result.stdout
    assert result.stdout.splitlines()[-1] == "0.1.0"


def test_setup_local_version_tag():
    result = _run([sys.executable, "setup.py", "--version"], timeout=60,
                  PTKERNELS_PURE="1", PTKERNELS_LOCAL_VERSION="cu130torch2.14")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "0.1.0+cu130torch2.14"
    bad = _run([sys.executable, "setup.py", "--version"], timeout=60, PTKERNELS_PURE="1", PTKERNELS_LOCAL_VERSION="cu 13")
    assert bad.returncode != 0 and "PTKERNELS_LOCAL_VERSION" in bad.stderr


def test_setup_cuda_switch_fails_loudly_when_cuda_cannot_be_built(tmp_path):
    missing = str(tmp_path / "no-cuda-here")
    forced = _run([sys.executable, "setup.py", "--version"], CUDA_HOME=missing, PTKERNELS_BUILD_CUDA="1",
                  PTKERNELS_PURE=None)
    assert forced.returncode != 0
    assert "PTKERNELS_BUILD_CUDA=1 but the CUDA kernels cannot be built" in forced.stderr
    auto = _run([sys.executable, "setup.py", "--version"], CUDA_HOME=missing, PTKERNELS_BUILD_CUDA="auto",
                PTKERNELS_PURE=None)
    assert auto.returncode == 0, auto.stderr
    assert f"ptkernels: torch {torch.__version__}, CUDA kernels OFF (" in auto.stdout


@pytest.mark.slow
def test_isolated_pip_build_fails_with_the_message(tmp_path):
    # The real thing: plain `pip wheel .` builds in an isolated env that has no torch (pip fetches setuptools).
    result = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                   "-w", str(tmp_path), "."], timeout=300, PTKERNELS_ALLOW_NO_TORCH=None, PTKERNELS_PURE=None)
    output = result.stdout + result.stderr
    if "satisfies the requirement setuptools" in output or "No matching distribution found for setuptools" in output:
        pytest.skip("the package index is unreachable, pip cannot create the isolated build env")
    assert result.returncode != 0
    assert "pip install --no-build-isolation ." in output
    assert not list(tmp_path.glob("*.whl"))
