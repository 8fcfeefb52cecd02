"""The shared Triton helpers (``ptkernels/backends/triton/_common.py``) and the launch rules every
kernel module follows: prefix modes equal to the C++ enum, GPU rounding reproduced under the
interpreter, deterministic configuration choice that skips configurations the GPU cannot hold,
no host synchronization for bank rows, grids without the 65,535 limit on batch x heads, and
one-way imports between the kernel modules. All fast (no attention kernel runs; about 5 s).
"""
from __future__ import annotations

import ast
import os
import re

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter needs it

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ptkernels.backends.triton import _common, attention_bwd, attention_fwd, decode, dropout  # noqa: E402
from ptkernels.backends.triton.configs import Config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_prefix_modes_match_the_cpp_enum():
    with open(os.path.join(ROOT, "csrc", "kernels", "prefix_attention_params.cuh")) as f:
        text = f.read()
    enum = dict(re.findall(r"(k\w+)\s*=\s*(\d+)", re.search(r"enum PrefixMode \{([^}]*)\}", text).group(1)))
    assert {k: int(v) for k, v in enum.items()} == {
        "kNoPrefix": _common.NO_PREFIX, "kShared": _common.SHARED_PREFIX,
        "kPerRow": _common.PER_ROW_PREFIX, "kBank": _common.BANK_PREFIX}
    pk = torch.zeros(1, 2, 3, 16)
    assert _common.prefix_mode(None, None) == _common.NO_PREFIX
    assert _common.prefix_mode(pk[:, :, :0], None) == _common.NO_PREFIX
    assert _common.prefix_mode(pk, None) == _common.SHARED_PREFIX
    assert _common.prefix_mode(pk.expand(4, -1, -1, -1), None) == _common.PER_ROW_PREFIX
    assert _common.prefix_mode(pk, torch.zeros(4, dtype=torch.long)) == _common.BANK_PREFIX


@triton.jit
def _round_kernel(x_ptr, y_ptr, DT: tl.constexpr, FP32_DOTS: tl.constexpr):
    offs = tl.arange(0, 1024)
    y = _common.round_to(tl.load(x_ptr + offs), DT, FP32_DOTS)
    tl.store(y_ptr + offs, y.to(tl.float32))


@triton.jit
def _mma_kernel(a_ptr, b_ptr, c_ptr, FP32_DOTS: tl.constexpr):
    # 32 x 32 fp32 tiles: c = a @ b through _common.mma
    offs = tl.arange(0, 32)
    a = tl.load(a_ptr + offs[:, None] * 32 + offs[None, :])
    b = tl.load(b_ptr + offs[:, None] * 32 + offs[None, :])
    c = _common.mma(a, b, tl.zeros([32, 32], tl.float32), FP32_DOTS)
    tl.store(c_ptr + offs[:, None] * 32 + offs[None, :], c)


def _tf32x3_reference(a, b):
    """Triton's tf32x3 in float64 products of TF32-exact operands (cvt.rna for the big parts,
    the tensor core's truncation for the small ones)."""
    def bits(x, f):
        kept = f(x.view(torch.int32).to(torch.int64)) & 0xFFFFE000
        return kept.to(torch.int32).view(torch.float32)

    a_big, b_big = (bits(x, lambda i: i + 0x1000) for x in (a, b))
    a_small, b_small = bits(a - a_big, lambda i: i), bits(b - b_big, lambda i: i)
    return (a_small.double() @ b_big.double() + a_big.double() @ b_small.double()
            + a_big.double() @ b_big.double())


@pytest.mark.skipif(not _common.INTERPRET, reason="the emulation is the interpreter's")
def test_interpreter_products_model_tf32x3():
    """fp32 products under the interpreter carry tf32x3's error (not exact fp32's), so a
    tolerance failure of fp32 inputs on hardware shows on CPU first; 16-bit values are exact."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 32, generator=gen), torch.randn(32, 32, generator=gen)
    c = torch.empty(32, 32)
    _mma_kernel[(1,)](a, b, c, _common.fp32_dots_mode(torch.float32))
    exact = a.double() @ b.double()
    model = _tf32x3_reference(a, b)
    assert (c.double() - model).abs().max() < 2e-6 * exact.abs().max()  # fp32 accumulation only
    # x = 1 + 2^-12 + 2^-23: big = 1, small read as 2^-12, so x * x counts as 1 + 2^-11 and a
    # 32-term row sums to exactly 32 + 2^-6; exact products give 32 + 2^-6 + 2^-17 + ..., more
    # than one fp32 ulp (2^-18) away
    x = torch.full((32, 32), 1 + 2 ** -12 + 2 ** -23)
    _mma_kernel[(1,)](x, x, c, 2)
    assert torch.all(c == 32 + 2 ** -6)
    assert (x.double() @ x.double())[0, 0] - (32 + 2 ** -6) > 2 ** -18
    for mode in (1, 2):  # 16-bit values: the split is exact (small = 0), both modes agree
        a16, b16 = a.half().float(), b.half().float()
        _mma_kernel[(1,)](a16, b16, c, mode)
        torch.testing.assert_close(c.double(), a16.double() @ b16.double(), rtol=1e-6, atol=1e-5)
    _mma_kernel[(1,)](x, x, c, 1)  # mode 1 (exact fp32 products)
    assert torch.all(c > 32 + 2 ** -6)
    assert _common.fp32_dots_mode(torch.bfloat16) == 1
    assert _common.fp32_dots_mode(torch.float32, exact_on_gpu=True) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_round_to_is_round_to_nearest_even(dtype):
    """The probabilities / dS the kernels feed to 16-bit products are rounded as on the GPU
    (torch's conversion is round to nearest even), also under the interpreter."""
    x = torch.randn(1024, generator=torch.Generator().manual_seed(0)) * 3
    x[:8] = torch.tensor([0.0, -0.0, 1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1e-30, 65504.0, 1 + 2 ** -11])
    x = x.to(DEVICE)
    y = torch.empty_like(x)
    _round_kernel[(1,)](x, y, _common.TL_DTYPE[dtype], _common.INTERPRET)
    assert torch.equal(y, x.to(dtype).float())


def test_first_fitting_config_skips_out_of_resources_and_is_cached():
    from triton.runtime.errors import OutOfResources

    tried = []

    def run(cfg):
        tried.append(cfg)
        if cfg.block_m == 128:
            raise OutOfResources(232448, 101376, "shared memory")
        return cfg

    cache, cands = {}, [Config(128, 64, 8, 3), Config(64, 64, 4, 3), Config(32, 32, 4, 2)]
    assert _common.launch_first_fitting(cache, "k", cands, run) == cands[1]
    assert tried == cands[:2] and cache == {"k": cands[1]}
    tried.clear()
    assert _common.launch_first_fitting(cache, "k", cands, run) == cands[1]
    assert tried == [cands[1]]  # deterministic: no re-trial, no timing
    with pytest.raises(OutOfResources):
        _common.launch_first_fitting({}, "k", cands[:1], run)


def test_bank_rows_without_bincount():
    idx = torch.tensor([2, 0, 2, 4, 0, 2])
    rows, start = attention_bwd._bank_rows(idx, 6)
    counts = torch.bincount(idx, minlength=6)
    assert start.tolist() == [0] + torch.cumsum(counts, 0).tolist()
    assert rows.dtype == start.dtype == torch.int32
    for t in range(6):
        assert sorted(rows[start[t]:start[t + 1]].tolist()) == (idx == t).nonzero().flatten().tolist()


class _GridSpy:
    """Stands in for a @triton.jit kernel: records launch grids, runs nothing."""

    def __init__(self, grids):
        self.grids = grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **kwargs: None


def test_batch_times_heads_above_65535_launches(monkeypatch):
    """(b, h) is folded into grid axis 0 (limit 2**31 - 1); axes 1 and 2 stay small."""
    grids = []
    for mod, names in ((attention_fwd, ["_fwd_kernel"]), (decode, ["_decode_kernel", "_combine_kernel"])):
        for n in names:
            monkeypatch.setattr(mod, n, _GridSpy(grids))
    monkeypatch.setattr(attention_bwd, "_launch", lambda name, kernel, grid, *a, **k: grids.append(grid))
    b, hq, d = 70_000, 1, 16
    q = torch.zeros(b, hq, 2, d)
    k = v = torch.zeros(b, hq, 3, d)
    args = (q, k, v, None, None, None, None, None, None, True, -1, 0.0, 0.25, 0.0)
    attention_fwd.forward_main(*args)
    decode.forward_decode(*args)
    out, lse = torch.zeros_like(q), torch.zeros(b, hq, 2)
    attention_bwd.prefix_attention_bwd(out, None, q, k, v, None, None, None, None, None, None, out,
                                       lse, True, -1, 0.0, 0.25, 0.0, [True, True, True, False, False])
    assert len(grids) == 6
    for grid in grids:
        assert all(g <= 65535 for g in grid[1:]), grid
        assert grid[0] >= b


def test_dropout_mask_grid_folds_batch_and_heads(monkeypatch):
    grids = []
    monkeypatch.setattr(dropout, "_keep_mask_kernel", _GridSpy(grids))
    dropout.dropout_keep_mask(torch.tensor([1]), (70_000, 1, 2, 3), 0.5, "cpu", prefix_len=1)
    assert all(g <= 65535 for g in grids[0][1:])


def test_kernel_modules_import_one_way():
    """No import cycle among the Triton backend modules (issue 10): module-level and function-
    level imports both count."""
    pkg = os.path.join(ROOT, "ptkernels", "backends", "triton")
    graph = {}
    for fname in os.listdir(pkg):
        if not fname.endswith(".py"):
            continue
        mod = fname[:-3]
        tree = ast.parse(open(os.path.join(pkg, fname)).read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("ptkernels.backends.triton."):
                    deps.add(node.module.rsplit(".", 1)[-1])
                elif node.module == "ptkernels.backends.triton":
                    deps.update(a.name for a in node.names)
        graph[mod] = deps & {f[:-3] for f in os.listdir(pkg) if f.endswith(".py")}

    def visit(m, stack):
        assert m not in stack, f"import cycle: {' -> '.join(stack + [m])}"
        for dep in graph.get(m, ()):
            visit(dep, stack + [m])

    for m in graph:
        visit(m, [])
    assert "attention_fwd" not in graph["decode"]


def test_one_tanh():
    """One soft-capping / GPC tanh formula for every kernel module."""
    pkg = os.path.join(ROOT, "ptkernels", "backends", "triton")
    defs = [f for f in os.listdir(pkg) if f.endswith(".py")
            and re.search(r"^def _?tanh\(", open(os.path.join(pkg, f)).read(), re.M)]
    assert defs == ["_common.py"]
