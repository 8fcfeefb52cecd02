"""Argument checks shared by the public ops: each error names the argument and what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def require_tensor(name: str, x, rank: int | tuple[int, ...] | None = None, expected: str = ""):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' of shape ' + expected if expected else ''}, "
                        f"got {type(x).__name__}")
    ranks = (rank,) if isinstance(rank, int) else rank
    if ranks is not None and x.dim() not in ranks:
        raise ValueError(f"{name} must have {' or '.join(map(str, ranks))} dimensions"
                         f"{' ' + expected if expected else ''}, got shape {shape_str(x)}")
    return x


def require_float(name: str, x: torch.Tensor):
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 (or float64 for the eager "
                        f"backend), got {x.dtype}")


def require_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor):
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; "
                         f"all inputs must be on one device")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has dtype {ref.dtype}; "
                        f"inputs must share one dtype (cast them first)")


def require_shape(name: str, x: torch.Tensor, expected: tuple, what: str):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {what} = {tuple(expected)}, got {shape_str(x)}")
