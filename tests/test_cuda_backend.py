"""The ``cuda`` backend: availability rules, the ``torch.ops.ptkernels.*_cuda`` registrations of the built
extension (CUDA kernels present, Meta/fake implementations usable), and, on a GPU, the real
kernels against the float64 reference (``@pytest.mark.gpu``, skipped without CUDA)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attention_cases import CORE_CASES, Case, check_against_reference
from ptkernels.backends import cuda as cuda_backend

ROOT = Path(__file__).resolve().parents[1]


def _extension_file():
    try:
        import ptkernels._C as ext
    except ImportError:
        return None
    return Path(ext.__file__)


def test_not_available_on_cpu():
    ok, why = cuda_backend.is_available("prefix_attention", torch.device("cpu"))
    assert not ok and why
    ok, why = cuda_backend.is_available("gpc_cell", torch.device("cpu"))
    assert not ok and why


def _expects_cuda_kernels(ext: Path) -> bool:
    """A CUDA build of torch + nvcc builds the kernels (setup.py); a .so older than the .cu
    sources is a stale local build, not a failure."""
    from torch.utils.cpp_extension import CUDA_HOME
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    newest = max(p.stat().st_mtime for p in ROOT.glob("csrc/*.cu"))
    return ext.stat().st_mtime >= newest


@pytest.mark.parametrize("op", ["prefix_attention", "gpc_cell"])
def test_extension_registers_cuda_kernels(op):
    ext = _extension_file()
    if ext is None:
        pytest.skip("ptkernels._C is not built")
    has = cuda_backend.has_cuda_kernels(op)
    if not has and not _expects_cuda_kernels(ext):
        pytest.skip("ptkernels._C was built without CUDA kernels (CPU torch / no nvcc / stale build)")
    assert has, f"ptkernels._C was built with CUDA but has no CUDA kernel for ptkernels::{op}_*_cuda"


def test_meta_implementations_give_shapes():
    if _extension_file() is None:
        pytest.skip("ptkernels._C is not built")
    m = dict(device="meta", dtype=torch.float16)
    q, k, v = torch.empty(2, 4, 5, 16, **m), torch.empty(2, 2, 7, 16, **m), torch.empty(2, 2, 7, 16, **m)
    pk = torch.empty(1, 2, 3, 16, **m)
    out, lse = torch.ops.ptkernels.prefix_attention_fwd_cuda(q, k, v, pk, pk, None, None, None, None, True,
                                                  -1, 0.0, 0.25, 0.0)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (2, 4, 5) and lse.dtype == torch.float32
    grads = torch.ops.ptkernels.prefix_attention_bwd_cuda(out, None, q, k, v, pk, pk, None, None, None, None,
                                               out, lse, True, -1, 0.0, 0.25, 0.0,
                                               [False, False, False, True, True])
    assert [g.numel() for g in grads[:3]] == [0, 0, 0]
    assert grads[3].shape == pk.shape and grads[4].shape == pk.shape


# ---- GPU: the real kernels ---------------------------------------------------------------

def _need_cuda_backend():
    ok, why = cuda_backend.is_available("prefix_attention", torch.device("cuda"))
    if not ok:
        pytest.skip(why)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CORE_CASES, ids=[c.id() for c in CORE_CASES])
def test_gpu_core_cases(case, dtype):
    _need_cuda_backend()
    check_against_reference(case, dtype, backend="cuda", device="cuda", seed=7)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [160, 256])
def test_gpu_large_head_dims(d):
    _need_cuda_backend()
    check_against_reference(Case(nq=67, nk=131, p=33, d=d, causal=True, padding="left"),
                            torch.bfloat16, backend="cuda", device="cuda", seed=8)


@pytest.mark.gpu
def test_gpu_prompt_only_backward():
    _need_cuda_backend()
    check_against_reference(Case(nq=113, nk=203, p=64, d=64, causal=True, form="bank", b=4, t=3),
                            torch.float16, backend="cuda", device="cuda", seed=9,
                            grad_for=("prefix_k", "prefix_v"))


@pytest.mark.gpu
def test_gpu_dropout_is_rejected_by_the_op_and_routed_by_the_backend():
    _need_cuda_backend()
    q = torch.randn(1, 2, 8, 16, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 2, 8, 16, device="cuda", dtype=torch.float16)
    seed = torch.tensor([5])
    with pytest.raises(RuntimeError, match="dropout"):
        torch.ops.ptkernels.prefix_attention_fwd_cuda(q, k, k, None, None, None, None, None, seed, False, -1,
                                           0.0, 0.25, 0.1)
    out, lse = cuda_backend.prefix_attention_fwd(q, k, k, None, None, None, None, None, seed,
                                                 False, -1, 0.0, 0.25, 0.1)
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shared_state", [False, True], ids=["state-per-row", "state-shared"])
@pytest.mark.parametrize("variant", ["lstm", "candidate", "gru", "reinject"])
def test_gpu_gpc_cell(variant, shared_state, dtype):
    ok, why = cuda_backend.is_available("gpc_cell", torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    import ptkernels
    from attention_cases import ATOL, max_err
    from ptkernels.backends.eager_gpc import GATES, reference_gpc_cell

    gen = torch.Generator().manual_seed(12)
    b, m, d = 4, 20, 96
    n = GATES[variant]
    base = [torch.randn(b, m, d, generator=gen, dtype=torch.float64),
            torch.randn(*((m, d) if shared_state else (b, m, d)), generator=gen, dtype=torch.float64),
            torch.randn(2 * d, n * d, generator=gen, dtype=torch.float64) * d ** -0.5,
            torch.randn(n * d, generator=gen, dtype=torch.float64)]
    grad = torch.randn(b, m, d, generator=gen, dtype=torch.float64)

    def run(fn, dt, device):
        xs = [x.detach().to(device=device, dtype=dt).requires_grad_(True) for x in base]
        out = fn(*xs)
        gs = torch.autograd.grad((out.double() * grad.to(device)).sum(), xs)
        return out.cpu(), [g.cpu() for g in gs]

    out_k, g_k = run(lambda *a: ptkernels.gpc_cell(*a, variant=variant, backend="cuda"), dtype, "cuda")
    out_x, g_x = run(lambda *a: reference_gpc_cell(*a, variant=variant), torch.float64, "cpu")
    out_l, g_l = run(lambda *a: reference_gpc_cell(*a, variant=variant), dtype, "cpu")
    assert max_err(out_k, out_x) <= 2 * max_err(out_l, out_x) + ATOL[dtype]
    for gk, gx, gl in zip(g_k, g_x, g_l):
        atol = ATOL[dtype] * max(1.0, gx.abs().max().item())
        assert max_err(gk, gx) <= 3 * max_err(gl, gx) + atol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_gpu_split_k_decode(dtype):
    """Nq = 1 against ~2k keys with a small (b, h) grid takes the split-K forward + merge."""
    _need_cuda_backend()
    check_against_reference(Case(b=1, hq=4, hkv=1, nq=1, nk=1999, p=64, d=128, causal=True,
                                 padding="left"), dtype, backend="cuda", device="cuda", seed=13)
