"""Backend registry and per-op backend selection.

A backend is a module that implements the raw kernels of the custom ops (see
``ptkernels/ops``): ``prefix_attention_fwd``, ``prefix_attention_bwd``, ``gpc_cell_fwd``,
``gpc_cell_bwd``, each with the signature of the op schema, plus
``is_available(op, device) -> (bool, reason)``.

Selection: ``backend="auto"`` picks per op and device: on a CUDA device from its measured
routing table when one matches the GPU and the software versions (``routing``), else from the
estimated ``AUTO_ORDER``; the environment variable ``PTKERNELS_BACKEND`` overrides ``auto`` (not
an explicit choice). An explicit choice that is not available raises ``BackendUnavailableError``
with the reason.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from ptkernels.backends import routing

BACKENDS = ("eager", "triton", "cuda")
OPS = ("prefix_attention", "gpc_cell")

_MODULES = {
    "eager": "ptkernels.backends.eager",
    "triton": "ptkernels.backends.triton",
    "cuda": "ptkernels.backends.cuda",
}

# Estimated preference per op on a CUDA device, best first (until ``make gpu-check`` has
# measured this GPU: routing.py). Decode-sized attention (few query rows
# against many keys: ``is_decode_shape``) and the GPC cell prefer the CUDA extension until
# benchmarks say otherwise; the Triton kernels carry the training-time attention. CPU tensors
# always use eager under auto (the Triton interpreter is a test vehicle, not a fast path).
AUTO_ORDER = {
    "cuda": {
        "prefix_attention": ("triton", "cuda", "eager"),
        "prefix_attention/decode": ("cuda", "triton", "eager"),
        "gpc_cell": ("cuda", "triton", "eager"),
    },
    "cpu": {
        "prefix_attention": ("eager",),
        "prefix_attention/decode": ("eager",),
        "gpc_cell": ("eager",),
    },
}

DECODE_MAX_NQ = 16
DECODE_MIN_KEYS = 512


def is_decode_shape(nq: int, nkeys: int) -> bool:
    """Generation with a KV cache: a few query rows against many keys (prefix + sequence).

    Such calls take split-K kernels (one program per row block would leave the GPU idle)."""
    return nq <= DECODE_MAX_NQ and nkeys >= DECODE_MIN_KEYS


class BackendUnavailableError(RuntimeError):
    """Raised when an explicitly requested backend cannot run the op on the given device."""


_loaded: dict[str, ModuleType | Exception] = {}


def load(name: str) -> ModuleType:
    """Import a backend module; raises ``BackendUnavailableError`` if it cannot be imported."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    mod = _loaded.get(name)
    if mod is None:
        try:
            mod = importlib.import_module(_MODULES[name])
        except Exception as exc:  # noqa: BLE001 - the reason is reported to the user
            mod = exc
        _loaded[name] = mod
    if isinstance(mod, Exception):
        raise BackendUnavailableError(f"backend {name!r} cannot be imported: {mod!r}")
    return mod


def availability(name: str, op: str, device: torch.device) -> tuple[bool, str]:
    """Whether backend ``name`` can run ``op`` on ``device``, and why (not)."""
    try:
        mod = load(name)
    except BackendUnavailableError as exc:
        return False, str(exc)
    return mod.is_available(op, torch.device(device))


def resolve(op: str, device: torch.device, requested: str = "auto", variant: str | None = None) -> str:
    """Return the backend name that runs ``op`` on ``device`` for the user's request.

    ``variant`` ("decode") selects the op's shape-specific preference order under auto.

    Under ``torch.compile`` the answer is computed at trace time and baked into the graph as a
    constant: the lookup (a first-call backend import, ``os.environ``) would otherwise break the
    graph in every attention layer. A changed ``PTKERNELS_BACKEND`` needs a fresh compile."""
    return _resolve_constant(op, device, requested, variant)


@torch.compiler.assume_constant_result
def _resolve_constant(op: str, device: torch.device, requested, variant) -> str:
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    device = torch.device(device)
    if requested is None:
        requested = "auto"
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string, got {type(requested).__name__}")
    if requested == "auto":
        env = os.environ.get("PTKERNELS_BACKEND", "auto").strip().lower() or "auto"
        if env != "auto":
            if env not in BACKENDS:
                raise ValueError(
                    f"PTKERNELS_BACKEND must be one of {('auto',) + BACKENDS}, got {env!r}")
            requested = env
    if requested == "auto":
        kind = "cuda" if device.type == "cuda" else "cpu"
        reasons = []
        key = f"{op}/{variant}" if variant and f"{op}/{variant}" in AUTO_ORDER[kind] else op
        order = AUTO_ORDER[kind][key]
        if kind == "cuda":
            order = routing.measured_order(key, device, order) or order
        for name in order:
            ok, why = availability(name, op, device)
            if ok:
                return name
            reasons.append(f"{name}: {why}")
        raise BackendUnavailableError(
            f"no backend can run {op} on {device}: " + "; ".join(reasons))
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {requested!r}")
    ok, why = availability(requested, op, device)
    if not ok:
        raise BackendUnavailableError(
            f"backend {requested!r} is not available for {op} on {device}: {why}")
    return requested


def get(name: str) -> ModuleType:
    """The backend module for a name returned by ``resolve``."""
    return load(name)


def describe() -> list[dict]:
    """One row per (op, device kind): which backend ``auto`` picks, and each backend's status.

    Used by ``ptkernels info``.
    """
    rows = []
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    for op in OPS:
        for dev in devices:
            status = {name: availability(name, op, dev) for name in BACKENDS}
            try:
                chosen, reason = resolve(op, dev, "auto"), "auto"
            except (BackendUnavailableError, ValueError) as exc:
                chosen, reason = None, str(exc)
            route = routing.status(dev).reason if dev.type == "cuda" else "eager on CPU"
            rows.append({
                "op": op,
                "device": str(dev),
                "backend": chosen,
                "reason": reason,
                "routing": route,
                "backends": {n: {"available": ok, "reason": why} for n, (ok, why) in status.items()},
            })
    return rows
