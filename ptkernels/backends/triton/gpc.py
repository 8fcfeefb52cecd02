"""Triton kernels of ``ptkernels.gpc_cell``: the Global Prompt Cell's gated update.

Shapes: U (B, m, d); S (B, m, d) or (m, d) (a batch stride of 0 shares it); W (2d, G*d); b (G*d,);
any outer strides, unit last stride (the wrappers copy otherwise);
G = number of gates (lstm 2, candidate 3, gru 1, reinject 2; blocks in ``eager_gpc`` order).
Rows are flattened, M = B*m; row r reads S at ((r // m) * stride_b + (r % m) * stride_m).

Forward (``_fwd_kernel``, one program per (BLOCK_M rows, BLOCK_N state columns)): one fused GEMM
``[U, S] @ W`` done as two K-halves (U against W[:d], S against W[d:]; [U, S] is never built in
memory), G accumulators (one per gate block of the same columns, so the epilogue has every gate of
an output element in registers), then bias + sigmoid/tanh + the gated combination. Writes S'
(input dtype) and the float32 pre-activations A (M, G*d), which the backward reuses instead of
redoing the GEMM.

Backward, three kernels:
1. ``_bwd_gates_kernel`` (elementwise): dA = dS' * d(epilogue)/dA (M, G*d, fp32) and the direct
   terms dS'*d(epilogue)/dU, /dS (fp32).
2. ``_bwd_dx_kernel``: dU = direct_U + dA @ W[:d]^T and dS = direct_S + dA @ W[d:]^T; for a shared
   (m, d) state each program also loops over the batch, so the batch reduction is in-kernel.
3. ``_bwd_dw_kernel``: dW[half] = X_half^T @ dA with X_half = U or S (one launch per half), and
   db = colsum(dA) in the U launch. Each program owns one output tile and loops over all M rows
   in order: no atomics, so dW and db are deterministic.
The backward GEMMs take fp32 operands (dA is fp32; U/S/W are upcast): the gradients keep
fp32 accuracy, which the error rule (3x the eager fp32-accumulated error) needs for 16-bit inputs.

Under ``TRITON_INTERPRET=1`` bf16 is upcast right after every load (``_common.mma``); the GPU
path keeps 16-bit operands in the forward GEMM for the tensor cores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ptkernels.backends.eager_gpc import num_gates
from ptkernels.backends.triton._common import INTERPRET, SIG_DTYPE, alloc, mma, tanh

VARIANT_CODE = {"lstm": 0, "candidate": 1, "gru": 2, "reinject": 3}

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per kernel and dtype class, on the GPU. The
# interpreter uses one small config (programs run one at a time in Python there).
GPU_CONFIGS = {
    ("fwd", "16bit"): (64, 32, 32, 4, 3),
    ("fwd", "fp32"): (32, 32, 16, 4, 2),   # tf32x3 splits operands: BLOCK_K 32 spills
    ("dx", "16bit"): (64, 32, 32, 4, 2),
    ("dx", "fp32"): (64, 32, 32, 4, 2),
    ("dw", "16bit"): (32, 32, 64, 4, 2),
    ("dw", "fp32"): (32, 32, 64, 4, 2),
    ("gates", "16bit"): (32, 32, 0, 4, 1),
    ("gates", "fp32"): (32, 32, 0, 4, 1),
}
INTERPRET_CONFIG = {"fwd": (32, 32, 32, 4, 1), "dx": (32, 32, 32, 4, 1), "dw": (32, 32, 32, 4, 1),
                    "gates": (32, 64, 0, 4, 1)}


def _config(kernel: str, dtype: torch.dtype, device: torch.device):
    if INTERPRET and device.type == "cpu":
        return INTERPRET_CONFIG[kernel]
    return GPU_CONFIGS[(kernel, "fp32" if dtype == torch.float32 else "16bit")]


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _row_offsets(rows, m, stride_b, stride_m):
    return (rows // m) * stride_b + (rows % m) * stride_m


@triton.jit
def _fwd_kernel(U, S, W, Bias, Out, A,
                M, m, d,
                su_b, su_m, ss_b, ss_m, sw_k,
                NG: tl.constexpr, VARIANT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                INTERPRET: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < d
    u_row = _row_offsets(rows, m, su_b, su_m)
    s_row = _row_offsets(rows, m, ss_b, ss_m)
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < d
        xm = rmask[:, None] & kmask[None, :]
        wm = kmask[:, None] & cmask[None, :]
        u = tl.load(U + u_row[:, None] + ks[None, :], mask=xm, other=0.0)
        s = tl.load(S + s_row[:, None] + ks[None, :], mask=xm, other=0.0)
        # K-half 1: U against W[:d]; K-half 2: S against W[d:]
        wu = W + ks[:, None] * sw_k + cols[None, :]
        ws = wu + d * sw_k
        acc0 = mma(u, tl.load(wu, mask=wm, other=0.0), acc0, INTERPRET)
        acc0 = mma(s, tl.load(ws, mask=wm, other=0.0), acc0, INTERPRET)
        if NG >= 2:
            acc1 = mma(u, tl.load(wu + d, mask=wm, other=0.0), acc1, INTERPRET)
            acc1 = mma(s, tl.load(ws + d, mask=wm, other=0.0), acc1, INTERPRET)
        if NG >= 3:
            acc2 = mma(u, tl.load(wu + 2 * d, mask=wm, other=0.0), acc2, INTERPRET)
            acc2 = mma(s, tl.load(ws + 2 * d, mask=wm, other=0.0), acc2, INTERPRET)

    om = rmask[:, None] & cmask[None, :]
    acc0 += tl.load(Bias + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if NG >= 2:
        acc1 += tl.load(Bias + d + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if NG >= 3:
        acc2 += tl.load(Bias + 2 * d + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    u = tl.load(U + u_row[:, None] + cols[None, :], mask=om, other=0.0).to(tl.float32)
    s = tl.load(S + s_row[:, None] + cols[None, :], mask=om, other=0.0).to(tl.float32)
    if VARIANT == 0:      # lstm: sigmoid(f) * S + sigmoid(r) * U
        new = _sigmoid(acc0) * s + _sigmoid(acc1) * u
    elif VARIANT == 1:    # candidate: sigmoid(f) * S + sigmoid(r) * tanh(c)
        new = _sigmoid(acc0) * s + _sigmoid(acc1) * tanh(acc2)
    elif VARIANT == 2:    # gru: g * U + (1 - g) * S
        g = _sigmoid(acc0)
        new = g * u + (1.0 - g) * s
    else:                 # reinject: sigmoid(f) * U + sigmoid(r) * S
        new = _sigmoid(acc0) * u + _sigmoid(acc1) * s
    out_off = rows[:, None] * d + cols[None, :]
    tl.store(Out + out_off, new.to(Out.dtype.element_ty), mask=om)
    a_off = rows[:, None] * (NG * d) + cols[None, :]
    tl.store(A + a_off, acc0, mask=om)
    if NG >= 2:
        tl.store(A + a_off + d, acc1, mask=om)
    if NG >= 3:
        tl.store(A + a_off + 2 * d, acc2, mask=om)


@triton.jit
def _bwd_gates_kernel(G, A, U, S, DA, DU, DS,
                      M, m, d,
                      sg_b, sg_m, su_b, su_m, ss_b, ss_m, NG, VARIANT,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # NG and VARIANT are runtime values: one elementwise kernel (one AOT compile) per dtype
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    om = (rows < M)[:, None] & (cols < d)[None, :]
    g = tl.load(G + _row_offsets(rows, m, sg_b, sg_m)[:, None] + cols[None, :],
                mask=om, other=0.0).to(tl.float32)
    u = tl.load(U + _row_offsets(rows, m, su_b, su_m)[:, None] + cols[None, :],
                mask=om, other=0.0).to(tl.float32)
    s = tl.load(S + _row_offsets(rows, m, ss_b, ss_m)[:, None] + cols[None, :],
                mask=om, other=0.0).to(tl.float32)
    a_off = rows[:, None] * (NG * d) + cols[None, :]
    x_off = rows[:, None] * d + cols[None, :]
    if VARIANT == 2:      # gru
        gt = _sigmoid(tl.load(A + a_off, mask=om, other=0.0))
        tl.store(DA + a_off, g * (u - s) * gt * (1.0 - gt), mask=om)
        tl.store(DU + x_off, g * gt, mask=om)
        tl.store(DS + x_off, g * (1.0 - gt), mask=om)
    else:
        f = _sigmoid(tl.load(A + a_off, mask=om, other=0.0))
        r = _sigmoid(tl.load(A + a_off + d, mask=om, other=0.0))
        if VARIANT == 0:      # lstm
            tl.store(DA + a_off, g * s * f * (1.0 - f), mask=om)
            tl.store(DA + a_off + d, g * u * r * (1.0 - r), mask=om)
            tl.store(DU + x_off, g * r, mask=om)
            tl.store(DS + x_off, g * f, mask=om)
        elif VARIANT == 3:    # reinject
            tl.store(DA + a_off, g * u * f * (1.0 - f), mask=om)
            tl.store(DA + a_off + d, g * s * r * (1.0 - r), mask=om)
            tl.store(DU + x_off, g * f, mask=om)
            tl.store(DS + x_off, g * r, mask=om)
        else:                 # candidate
            c = tanh(tl.load(A + a_off + 2 * d, mask=om, other=0.0))
            tl.store(DA + a_off, g * s * f * (1.0 - f), mask=om)
            tl.store(DA + a_off + d, g * c * r * (1.0 - r), mask=om)
            tl.store(DA + a_off + 2 * d, g * r * (1.0 - c * c), mask=om)
            tl.store(DU + x_off, tl.zeros_like(g), mask=om)
            tl.store(DS + x_off, g * f, mask=om)


@triton.jit
def _bwd_dx_kernel(DA, Direct, W, Out,
                   R, NB, d, w_off, sw_k, NG,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   INTERPRET: tl.constexpr):
    """Out[r, c] = sum_{b < NB} Direct[b*R + r, c] + DA[b*R + r, :] @ W[w_off + c, :]^T."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < R
    cmask = cols < d
    om = rmask[:, None] & cmask[None, :]
    n = NG * d
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(0, NB):
        brow = b * R + rows
        acc += tl.load(Direct + brow[:, None] * d + cols[None, :], mask=om, other=0.0)
        for k0 in range(0, n, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < n
            da = tl.load(DA + brow[:, None] * n + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            wt = tl.load(W + (w_off + cols)[None, :] * sw_k + ks[:, None],
                         mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            acc = mma(da, wt, acc, INTERPRET)
    tl.store(Out + rows[:, None] * d + cols[None, :], acc.to(Out.dtype.element_ty), mask=om)


@triton.jit
def _bwd_dw_kernel(X, DA, DW, DB,
                   M, m, d, sx_b, sx_m, w_off, NG, DO_BIAS,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   INTERPRET: tl.constexpr):
    """DW[w_off + k, c] = sum_r X[r, k] * DA[r, c]; DB[c] = sum_r DA[r, c] (DO_BIAS, k-block 0).
    One program per (BLOCK_K rows of this half of W, BLOCK_N columns), rows of X in order."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n = NG * d
    kmask = ks < d
    cmask = cols < n
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, M, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < M
        xt = tl.load(X + _row_offsets(rows, m, sx_b, sx_m)[None, :] + ks[:, None],
                     mask=kmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
        da = tl.load(DA + rows[:, None] * n + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc = mma(xt, da, acc, INTERPRET)
        bias_acc += tl.sum(da, axis=0)   # cheap next to the GEMM; stored only where DO_BIAS
    tl.store(DW + (w_off + ks)[:, None] * n + cols[None, :], acc.to(DW.dtype.element_ty),
             mask=kmask[:, None] & cmask[None, :])
    if (DO_BIAS != 0) & (pid_k == 0):
        tl.store(DB + cols, bias_acc.to(DB.dtype.element_ty), mask=cmask)


def _state_strides(state: torch.Tensor) -> tuple[int, int]:
    """(batch stride, row stride); 0 batch stride for an (m, d) state shared by the batch."""
    if state.dim() == 2:
        return 0, state.stride(0)
    return state.stride(0), state.stride(1)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """Kernels take any outer strides but a unit last stride (contiguous, vectorized rows)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def gpc_cell_fwd(update, state, weight, bias, variant):
    """(S' (B, m, d) in update's dtype, A (B, m, G*d) float32)."""
    ng, code = num_gates(variant), VARIANT_CODE[variant]
    update, state, weight, bias = (_unit_last(x) for x in (update, state, weight, bias))
    b, m, d = update.shape
    rows = b * m
    out = alloc((b, m, d), update.dtype, update.device)
    preact = alloc((b, m, ng * d), torch.float32, update.device)
    bm, bn, bk, warps, stages = _config("fwd", update.dtype, update.device)
    grid = (triton.cdiv(rows, bm), triton.cdiv(d, bn))
    _fwd_kernel[grid](update, state, weight, bias, out, preact, rows, m, d,
                      *update.stride()[:2], *_state_strides(state), weight.stride(0),
                      NG=ng, VARIANT=code, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, INTERPRET=INTERPRET,
                      num_warps=warps, num_stages=stages)
    return out, preact


def gpc_cell_bwd(grad_new_state, update, state, weight, bias, preact, variant, output_mask):
    need_du, need_ds, need_dw, need_db = (bool(x) for x in output_mask)
    ng, code = num_gates(variant), VARIANT_CODE[variant]
    update, state, weight = _unit_last(update), _unit_last(state), _unit_last(weight)
    grad_new_state = _unit_last(grad_new_state)
    b, m, d = update.shape
    rows, dev = b * m, update.device
    preact = preact.contiguous()
    da = torch.empty((rows, ng * d), dtype=torch.float32, device=dev)
    direct_u = torch.empty((rows, d), dtype=torch.float32, device=dev)
    direct_s = torch.empty((rows, d), dtype=torch.float32, device=dev)
    bm, bn, _, warps, stages = _config("gates", update.dtype, dev)
    _bwd_gates_kernel[(triton.cdiv(rows, bm), triton.cdiv(d, bn))](
        grad_new_state, preact, update, state, da, direct_u, direct_s, rows, m, d,
        *grad_new_state.stride()[:2], *update.stride()[:2], *_state_strides(state), ng, code,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)

    # unneeded gradients are distinct empty tensors (a custom op's outputs must not alias)
    grad_u, grad_s = update.new_empty(0), update.new_empty(0)
    grad_w = grad_b = None
    bm, bn, bk, warps, stages = _config("dx", update.dtype, dev)
    common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, INTERPRET=INTERPRET, num_warps=warps,
                  num_stages=stages)
    if need_du:
        grad_u = alloc((b, m, d), update.dtype, dev)
        _bwd_dx_kernel[(triton.cdiv(rows, bm), triton.cdiv(d, bn))](
            da, direct_u, weight, grad_u, rows, 1, d, 0, weight.stride(0), ng, **common)
    if need_ds:
        shared = state.dim() == 2   # (m, d) shared by the batch: reduce over it in the kernel
        r, nb = (m, b) if shared else (rows, 1)
        grad_s = alloc(tuple(state.shape), state.dtype, dev)
        _bwd_dx_kernel[(triton.cdiv(r, bm), triton.cdiv(d, bn))](
            da, direct_s, weight, grad_s, r, nb, d, d, weight.stride(0), ng, **common)
    if need_dw or need_db:
        bm, bn, bk, warps, stages = _config("dw", update.dtype, dev)
        grad_w = alloc(tuple(weight.shape), weight.dtype, dev)
        grad_b = alloc(tuple(bias.shape), bias.dtype, dev)
        grid = (triton.cdiv(d, bk), triton.cdiv(ng * d, bn))
        common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, INTERPRET=INTERPRET,
                      num_warps=warps, num_stages=stages)
        _bwd_dw_kernel[grid](update, da, grad_w, grad_b, rows, m, d, *update.stride()[:2], 0, ng, 1, **common)
        _bwd_dw_kernel[grid](state, da, grad_w, grad_b, rows, m, d, *_state_strides(state), d, ng, 0,
                             **common)
    if not need_dw:
        grad_w = update.new_empty(0)
    if not need_db:
        grad_b = update.new_empty(0)
    return grad_u, grad_s, grad_w, grad_b


# ---- ahead-of-time compile specs (format: tests/triton_aot.py; compiled for sm_80 and sm_90) ----

def _variant(label, tdt, cfg, signature, constexprs, tensor_cores):
    bm, bn, bk, warps, stages = cfg
    block = dict(BLOCK_M=bm, BLOCK_N=bn) | ({"BLOCK_K": bk} if bk else {})
    return {"label": label, "config": f"{bm}x{bn}x{bk} w{warps} s{stages}",
            "signature": signature, "constexprs": {**block, **constexprs},
            "div16": [k for k, v in signature.items() if v.startswith("*") or k.startswith("s")],
            "num_warps": warps, "num_stages": stages, "tensor_cores": tensor_cores}


def _per_dtype(kernel: str, build):
    def variants(arch: int) -> list[dict]:   # the same launch configs on sm_80 and sm_90
        out = []
        for dtype, tdt in SIG_DTYPE.items():
            cfg = GPU_CONFIGS[(kernel, "fp32" if dtype == torch.float32 else "16bit")]
            out += build(tdt, cfg)
        return out
    return variants


def _fwd_variants(tdt, cfg):
    sig = {"U": f"*{tdt}", "S": f"*{tdt}", "W": f"*{tdt}", "Bias": f"*{tdt}", "Out": f"*{tdt}",
           "A": "*fp32", "M": "i32", "m": "i32", "d": "i32", "su_b": "i32", "su_m": "i32",
           "ss_b": "i32", "ss_m": "i32", "sw_k": "i32"}
    return [_variant(f"{tdt} {variant}", tdt, cfg, sig,
                     dict(NG=num_gates(variant), VARIANT=code, INTERPRET=False), True)
            for variant, code in VARIANT_CODE.items()]


def _gates_variants(tdt, cfg):
    sig = {"G": f"*{tdt}", "A": "*fp32", "U": f"*{tdt}", "S": f"*{tdt}", "DA": "*fp32", "DU": "*fp32",
           "DS": "*fp32", "M": "i32", "m": "i32", "d": "i32", "sg_b": "i32", "sg_m": "i32",
           "su_b": "i32", "su_m": "i32", "ss_b": "i32", "ss_m": "i32", "NG": "i32", "VARIANT": "i32"}
    return [_variant(f"{tdt} all variants", tdt, cfg, sig, {}, False)]


def _dx_variants(tdt, cfg):
    sig = {"DA": "*fp32", "Direct": "*fp32", "W": f"*{tdt}", "Out": f"*{tdt}", "R": "i32", "NB": "i32",
           "d": "i32", "w_off": "i32", "sw_k": "i32", "NG": "i32"}
    return [_variant(f"{tdt} all gates", tdt, cfg, sig, dict(INTERPRET=False), True)]


def _dw_variants(tdt, cfg):
    sig = {"X": f"*{tdt}", "DA": "*fp32", "DW": f"*{tdt}", "DB": f"*{tdt}", "M": "i32", "m": "i32",
           "d": "i32", "sx_b": "i32", "sx_m": "i32", "w_off": "i32", "NG": "i32", "DO_BIAS": "i32"}
    return [_variant(f"{tdt} all gates", tdt, cfg, sig, dict(INTERPRET=False), True)]


AOT_SPECS = [
    {"name": "gpc_fwd", "kernel": _fwd_kernel, "variants": _per_dtype("fwd", _fwd_variants),
     "description": "GPC forward: [U, S] @ W as two K-halves + gate epilogue, per variant"},
    {"name": "gpc_bwd_gates", "kernel": _bwd_gates_kernel, "variants": _per_dtype("gates", _gates_variants),
     "description": "GPC backward epilogue: dA and the direct dU/dS terms (elementwise)"},
    {"name": "gpc_bwd_dx", "kernel": _bwd_dx_kernel, "variants": _per_dtype("dx", _dx_variants),
     "description": "GPC backward dU / dS = direct + dA @ W_half^T (batch-reduced for an (m, d) state)"},
    {"name": "gpc_bwd_dw", "kernel": _bwd_dw_kernel, "variants": _per_dtype("dw", _dw_variants),
     "description": "GPC backward dW_half = X^T @ dA and db, one program per tile (deterministic)"},
]
