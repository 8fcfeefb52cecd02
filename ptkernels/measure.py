"""Measurement helpers shared by `ptkernels demo` and `ptkernels bench`: the machine's description,
summary statistics and the peak memory of one piece of work.

Peak memory on a CPU: torch's CPU allocator uses malloc, so the live heap (glibc ``mallinfo2``:
bytes in use in the arenas + mmapped blocks) sampled after every ATen op sees every tensor a step
allocates (temporaries inside one kernel excepted, for every path alike). On CUDA:
``torch.cuda.max_memory_allocated``. Both report the growth above what was live before the work.
"""
from __future__ import annotations

import ctypes
import os
import platform
import statistics
from typing import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device | str = "cpu") -> dict:
    """What a result file records about where it was measured."""
    device = torch.device(device)
    info = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    try:
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def summary(values: Sequence[float]) -> dict:
    """Median, quartiles (the spread), min, max and count of ``values``."""
    vals = sorted(values)
    if not vals:
        return {"median": None, "q1": None, "q3": None, "min": None, "max": None, "n": 0}
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = vals[0]
    return {"median": statistics.median(vals), "q1": q1, "q3": q3, "min": vals[0], "max": vals[-1],
            "n": len(vals)}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = list(values)
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            lib = ctypes.CDLL("libc.so.6")
            lib.mallinfo2.restype = _MallInfo2
            _LIBC = lib
        except (OSError, AttributeError):  # not glibc (macOS, musl): no heap probe
            _LIBC = False
    return _LIBC


def live_heap() -> int | None:
    """Bytes malloc has handed out and not freed (None where glibc's mallinfo2 is missing)."""
    lib = _libc()
    if not lib:
        return None
    info = lib.mallinfo2()
    return info.uordblks + info.hblkhd


class _PeakHeap(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.base = self.peak = live_heap()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, live_heap())
        return out


def peak_memory(work: Callable[[], object], device: torch.device | str = "cpu") -> int | None:
    """Peak memory growth (bytes) while ``work()`` runs, above what was live before it; None when
    the platform offers no probe. The CPU probe slows ``work`` down: never time the same run."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if live_heap() is None:
        work()
        return None
    with _PeakHeap() as probe:
        work()
    return probe.peak - probe.base
