"""Launch configurations of the Triton attention kernels, per GPU architecture.

A configuration is ``Config(block_m, block_n, num_warps, num_stages)``. ``candidates(kernel, arch,
dtype, d, features)`` lists, best guess first, what a kernel ("fwd" = the main forward, "decode" =
the split-K decode forward) may run with on sm_<arch> (``table_arch``: 80 = A100, 86 = A10 / L4 /
L40S / RTX 30-40 with 99 KB of shared memory per block, 90 = H100) for a dtype, head dim and
feature class (``feature_class``: light, one of bias / softcap / dropout, or heavy). The
first candidate the GPU can hold runs (no timing: deterministic); later ones are fallbacks. The
AOT test compiles every one of them for its arch as the JIT specializes a contiguous call (head
dim constexpr) and requires zero register spills, shared memory within the arch limit and
asynchronous loads in pipelined loops, so this table is the single place to edit when tuning.

Under the Triton interpreter one fixed small configuration is used (``INTERPRET``): autotuning
there is far too slow, and 32-wide tiles still leave tails in every odd test shape.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"


INTERPRET = {"fwd": Config(32, 32, 4, 1), "decode": Config(16, 32, 4, 1)}

# Head-dim buckets (upper bounds of BLOCK_D) -> candidates, best guess first, per feature class
# (``feature_class``): "16bit" serves calls without bias / soft-capping / dropout; "16bit_softcap",
# "16bit_bias" and "16bit_dropout" the calls with exactly one of them; "16bit_heavy" the calls
# with two or more (the bias tile, the tanh and the Philox state each cost registers, together
# they shrink the tiles); fp32 tiles serve every class (the tf32x3 products split every operand
# in two). Every entry compiles without spills for its arch with its class's feature set
# (tests/test_triton_aot.py). A one-feature table holds its heavy table's first entry, a
# fallback the GPU can always hold.
_C = Config
_FP32 = {64: [_C(32, 16, 4, 2)], 128: [_C(32, 16, 8, 2), _C(16, 16, 4, 2)], 256: [_C(16, 16, 8, 2)]}
_FWD = {
    90: {
        "16bit": {64: [_C(128, 64, 8, 3), _C(128, 128, 8, 2)],
                  128: [_C(128, 64, 8, 3), _C(64, 64, 4, 3)],
                  256: [_C(64, 32, 8, 3), _C(32, 32, 4, 3)]},
        # 160-224 registers, 64-192 KB (the pipelined fp32 bias tile: 32 KB a stage at 128x64)
        "16bit_softcap": {64: [_C(128, 64, 8, 3), _C(128, 64, 8, 2)],
                          128: [_C(128, 64, 8, 3), _C(64, 32, 4, 2)],
                          256: [_C(64, 32, 8, 3), _C(32, 32, 4, 2)]},
        "16bit_bias": {64: [_C(128, 64, 8, 3), _C(128, 64, 8, 2)],
                       128: [_C(128, 64, 8, 3), _C(64, 32, 4, 2)],
                       256: [_C(64, 32, 8, 3), _C(32, 32, 4, 2)]},
        "16bit_dropout": {64: [_C(128, 64, 8, 3), _C(128, 64, 8, 2)],
                          128: [_C(128, 64, 8, 3), _C(64, 32, 4, 2)],
                          256: [_C(64, 32, 8, 3), _C(32, 32, 4, 2)]},
        "16bit_heavy": {64: [_C(128, 64, 8, 2), _C(64, 64, 8, 2)],
                        128: [_C(64, 32, 4, 2), _C(32, 32, 4, 2)],
                        256: [_C(32, 32, 4, 2)]},
        # 32x16 w4 spills 8 B on sm_90 (it does not on sm_80): 8 warps
        "fp32": {**_FP32, 64: [_C(32, 16, 8, 2)]},
    },
    # sm_86 / sm_89: 99 KB of shared memory per block (sm_80's 128x64 s3 at D = 256 needs 100 KB)
    86: {
        "16bit": {64: [_C(128, 64, 8, 3), _C(64, 64, 4, 3)],
                  128: [_C(128, 32, 8, 3), _C(64, 32, 4, 3)],
                  256: [_C(64, 32, 8, 2), _C(32, 32, 4, 3)]},
        "16bit_softcap": {64: [_C(128, 64, 8, 3), _C(128, 64, 8, 2)],
                          128: [_C(128, 32, 8, 3), _C(64, 64, 8, 2)],
                          256: [_C(64, 32, 8, 2), _C(32, 32, 4, 2)]},
        # the bias tile's stages: 128x64 s3 needs 128 KB at D = 64, 128x32 s3 105 KB at 128
        "16bit_bias": {64: [_C(128, 64, 8, 2), _C(64, 64, 8, 2)],
                       128: [_C(128, 32, 8, 2), _C(64, 64, 8, 2)],
                       256: [_C(64, 32, 8, 2), _C(32, 32, 4, 2)]},
        "16bit_dropout": {64: [_C(128, 64, 8, 3), _C(128, 64, 8, 2)],
                          128: [_C(128, 32, 8, 3), _C(64, 64, 8, 2)],
                          256: [_C(64, 32, 8, 2), _C(32, 32, 4, 2)]},
        "16bit_heavy": {64: [_C(128, 64, 8, 2), _C(64, 64, 8, 2)],
                        128: [_C(64, 64, 8, 2), _C(32, 32, 4, 2)],
                        256: [_C(32, 32, 4, 2)]},
        "fp32": _FP32,
    },
    80: {
        "16bit": {64: [_C(128, 64, 8, 3), _C(64, 64, 4, 3)],
                  128: [_C(128, 64, 8, 2), _C(128, 32, 8, 3), _C(64, 32, 4, 3)],
                  256: [_C(64, 32, 8, 3), _C(32, 32, 4, 3)]},
        "16bit_softcap": {64: [_C(128, 64, 8, 3), _C(128, 64, 8, 2)],
                          128: [_C(128, 32, 8, 3), _C(64, 64, 8, 2)],
                          256: [_C(64, 32, 8, 3), _C(32, 32, 4, 2)]},
        "16bit_bias": {64: [_C(128, 64, 8, 3), _C(128, 64, 8, 2)],
                       128: [_C(128, 32, 8, 3), _C(64, 64, 8, 2)],
                       256: [_C(64, 32, 8, 3), _C(32, 32, 4, 2)]},
        # 128x64 w8 s2 at D = 128 spills 20 B with dropout (56 B on sm_86)
        "16bit_dropout": {64: [_C(128, 64, 8, 3), _C(128, 64, 8, 2)],
                          128: [_C(128, 32, 8, 3), _C(64, 64, 8, 2)],
                          256: [_C(64, 32, 8, 3), _C(32, 32, 4, 2)]},
        "16bit_heavy": {64: [_C(128, 64, 8, 2), _C(64, 64, 8, 2)],
                        128: [_C(64, 64, 8, 2), _C(32, 32, 4, 2)],
                        256: [_C(32, 32, 4, 2)]},
        "fp32": _FP32,
    },
}
# Decode: BLOCK_M covers the packed query rows (G * Nq: the G query heads of a KV head times the
# few query rows, decode.py); the work is spread over splits of the keys instead. Each K/V tile
# is read once per block of BLOCK_M packed rows, so a call with more than 16 of them (GQA-8 with
# Nq = 4: 32 rows) runs the smallest BLOCK_M that holds them all (``decode_candidates``): 16 for
# single-token GQA up to G = 16, else 64 rows (32 at D = 256 and in fp32, whose per-row state
# spills at 64), and 128 for calls without bias, softcap or dropout (GQA-8 with Nq = 9 to 16:
# speculative decoding), which a 64-row block would make read K and V twice. The larger blocks
# need 8 warps: with 4, 64x64 spills on sm_80 (16-972 B). 128 rows: 128x64 w8 s2 at D = 64
# (sm_80 177 registers, 64 KB), 128x32 w8 s2 at D = 128 (196, 112 KB: one block per SM, as
# the 64-row block already is on sm_80; sm_86's 99 KB do not hold it); with every feature
# 128x64 spills 8 B on sm_80, so heavier calls stop at 64 rows. float32 at D = 256 has only
# 16-row blocks (32x16 spills 3.7-12 KB). 16x128 w4 s2 at D = 128 compiles clean with every
# feature (200 registers) but spills 4-12 B without them (128 registers).
_DECODE_HEAVY = {64: [_C(16, 64, 4, 3), _C(16, 128, 4, 3), _C(64, 64, 8, 2)],
                 128: [_C(16, 64, 4, 3), _C(16, 64, 4, 2), _C(64, 32, 8, 2)],
                 256: [_C(16, 32, 4, 2), _C(32, 32, 8, 2)]}
_DECODE_ANY = {
    "16bit": {64: _DECODE_HEAVY[64] + [_C(128, 64, 8, 2)],
              128: _DECODE_HEAVY[128] + [_C(128, 32, 8, 2)], 256: _DECODE_HEAVY[256]},
    "fp32": {64: [_C(16, 64, 4, 2), _C(32, 32, 8, 2)], 128: [_C(16, 32, 8, 2), _C(32, 16, 8, 2)],
             256: [_C(16, 16, 8, 2)]},
}
# sm_86: the decode kernel's two pipelined loops (prefix and sequence chunks) double its buffers;
# 99 KB allows 16x64 s3 at D = 64 and s2 at D = 128.
_DECODE_86_HEAVY = {64: [_C(16, 64, 4, 3), _C(64, 64, 8, 2)],
                    128: [_C(16, 64, 4, 2), _C(64, 32, 8, 2)],
                    256: [_C(16, 32, 4, 2), _C(32, 32, 8, 2)]}
_DECODE_86 = {**_DECODE_ANY, "16bit": {**_DECODE_86_HEAVY,
                                       64: _DECODE_86_HEAVY[64] + [_C(128, 64, 8, 2)]}}
# Calls with bias, softcap or dropout: the same tiles up to 64 rows, less sm_90's 16x128 w4 s3
# at D = 64, which spills 8 B with every feature (the dropout mask's layout change, dropout.py).
_DECODE_90_HEAVY = {**_DECODE_HEAVY, 64: [_C(16, 64, 4, 3), _C(64, 64, 8, 2)]}
_DECODE = {arch: dict(table, **{f"16bit_{c}": heavy for c in ("softcap", "bias", "dropout",
                                                              "heavy")})
           for arch, table, heavy in ((80, _DECODE_ANY, _DECODE_HEAVY),
                                      (86, _DECODE_86, _DECODE_86_HEAVY),
                                      (90, _DECODE_ANY, _DECODE_90_HEAVY))}
TABLES = {"fwd": _FWD, "decode": _DECODE}
ARCHS = (80, 86, 90)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIM_BUCKETS = (64, 128, 256)   # BLOCK_D upper bounds; 16 and 32 use the 64 bucket


def table_arch(arch: int) -> int:
    """The table serving sm_<arch>: 90 for Hopper and newer, 86 for the consumer / inference
    Ampere and Ada parts (sm_86, sm_87, sm_89: 99 KB of shared memory per block), 80 for A100
    (163 KB)."""
    if arch >= 90:
        return 90
    if arch >= 86:
        return 86
    return 80


_arch_key = table_arch


# A call's feature class (``feature_class``), lightest first. The AOT check compiles each class's
# table with its features (FEATURES); a class whose features hold another's covers it.
FEATURE_CLASSES = ("light", "softcap", "bias", "dropout", "heavy")
FEATURES = {"light": (), "softcap": ("HAS_SOFTCAP",), "bias": ("HAS_BIAS",),
            "dropout": ("HAS_DROPOUT",), "heavy": ("HAS_BIAS", "HAS_SOFTCAP", "HAS_DROPOUT")}


def feature_class(has_bias: bool, has_softcap: bool, has_dropout: bool) -> str:
    """The table class of a call: "light" (none of the three), the one feature it has, or
    "heavy" (two or more)."""
    on = [name for name, flag in (("bias", has_bias), ("softcap", has_softcap),
                                  ("dropout", has_dropout)) if flag]
    return "light" if not on else (on[0] if len(on) == 1 else "heavy")


def _dtype_key(dtype: torch.dtype, features: str) -> str:
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURE_CLASSES}, got {features!r}")
    if dtype == torch.float32:
        return "fp32"
    return "16bit" if features == "light" else f"16bit_{features}"


def aot_dtype(dtype: torch.dtype) -> str:
    """The dtype the AOT check compiles a table in: fp16 and bf16 share the 16-bit tables (their
    code differs only in conversions), so 16-bit tables are compiled once, in bf16."""
    return "fp32" if dtype == torch.float32 else "bf16"


def _bucket(block_d: int) -> int:
    for ub in HEAD_DIM_BUCKETS:
        if block_d <= ub:
            return ub
    raise ValueError(f"head dim block {block_d} > 256 is not supported")


def decode_candidates(cands: list[Config], packed_rows: int) -> list[Config]:
    """The decode candidates of the row block for ``packed_rows`` (G * Nq) packed query rows:
    those with the smallest BLOCK_M that holds them all, else with the largest BLOCK_M (order
    kept: the first that fits runs), then those of the smaller blocks, largest first: fallbacks
    for a GPU that cannot hold the wide block (the rows then take several blocks, each reading
    K and V)."""
    blocks = sorted({c.block_m for c in cands})
    block = next((m for m in blocks if m >= packed_rows), blocks[-1])
    smaller = [c for m in reversed(blocks) if m < block for c in cands if c.block_m == m]
    return [c for c in cands if c.block_m == block] + smaller


def candidates(kernel: str, arch: int, dtype: torch.dtype, block_d: int,
               features: str = "light") -> list[Config]:
    """Every configuration the config picker may run ``kernel`` with on sm_<arch>, best guess
    first; ``features`` = the call's ``feature_class``."""
    return list(TABLES[kernel][_arch_key(arch)][_dtype_key(dtype, features)][_bucket(block_d)])
