"""Build script for ptkernels: the Python package plus the native library ptkernels._C.

Install from source with the torch you will run against already installed:

    pip install --no-build-isolation .        # or: pip install --no-build-isolation -e .

Why --no-build-isolation: ptkernels._C is compiled against the installed torch (its headers and ABI). An
isolated build has no torch, and listing torch in [build-system].requires would build against a second,
possibly different torch. So this script fails loudly when torch is not importable (see _fail_no_torch).

What gets built (one line saying which is printed: "ptkernels: torch X, CUDA kernels ON|OFF (...)"):
- CUDA build of torch + nvcc: CUDAExtension ptkernels._C from csrc/ops.cpp and every csrc/*.cu (sorted).
  While csrc/ has no .cu files yet it is still a CUDAExtension (ops.cpp only), so the CUDA link works.
- CPU build of torch, no nvcc, or PTKERNELS_BUILD_CUDA=0: CppExtension ptkernels._C from csrc/ops.cpp.
- PTKERNELS_PURE=1: no extension at all (a pure-Python py3-none-any wheel: eager + Triton backends only).

Environment switches:
  PTKERNELS_BUILD_CUDA=auto|0|1  auto (default): CUDA kernels when possible; 1: fail if they cannot be built
  PTKERNELS_PURE=1               build no extension (torch is not needed at build time)
  PTKERNELS_ALLOW_NO_TORCH=1     if torch is not importable, install pure Python instead of failing
  PTKERNELS_LOCAL_VERSION=TAG    version 0.1.0+TAG (e.g. cu130torch2.14 for a CUDA wheel)
  PTKERNELS_PTXAS_VERBOSE=1      nvcc -Xptxas=-v,-warn-spills,-warn-lmem-usage (registers, spills)
  TORCH_CUDA_ARCH_LIST           default "8.0;8.6;8.9;9.0" (no GPU is needed to build)
  MAX_JOBS                       parallel compile jobs (read by torch's ninja build)
  CUDA_HOME                      CUDA toolkit root; defaults to /usr/local/cuda when that has bin/nvcc
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
BASE_VERSION = "0.1.0"
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0"
CONVENTIONAL_CUDA_HOME = "/usr/local/cuda"


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def _log(msg: str) -> None:
    print(f"ptkernels: {msg}", flush=True)


def _version() -> str:
    tag = _env("PTKERNELS_LOCAL_VERSION")
    if not tag:
        return BASE_VERSION
    if not re.fullmatch(r"[A-Za-z0-9]+(\.[A-Za-z0-9]+)*", tag):
        raise SystemExit(
            f"ptkernels: PTKERNELS_LOCAL_VERSION={tag!r} is not a valid local version label "
            "(letters, digits and dots, e.g. cu130torch2.14)"
        )
    return f"{BASE_VERSION}+{tag}"


def _fail_no_torch(err: BaseException) -> None:
    raise SystemExit(
        "ptkernels: torch is not importable at build time "
        f"({type(err).__name__}: {err}).\n"
        "ptkernels._C is compiled against the torch you run with, so install torch first and build without "
        "build isolation:\n"
        "    pip install torch\n"
        "    pip install --no-build-isolation .      (or: pip install --no-build-isolation -e .)\n"
        "For a pure-Python install with no native extension, set PTKERNELS_ALLOW_NO_TORCH=1 (or PTKERNELS_PURE=1)."
    )


def _rel(paths) -> list[str]:
    # setuptools wants source paths relative to setup.py, with forward slashes.
    return sorted(p.relative_to(ROOT).as_posix() for p in paths)


def _nvidia_include_dirs() -> list[str]:
    # cuBLAS/cuSPARSE/... headers of a pip-installed CUDA (nvidia/cu13/include); a minimal toolkit
    # (nvcc + cudart + CCCL) lacks them and ATen/cuda headers include them.
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for loc in spec.submodule_search_locations:
        dirs += [str(p) for p in sorted(Path(loc).glob("cu[0-9]*/include")) if p.is_dir()]
    return dirs


def _extensions():
    """Return (ext_modules, cmdclass) and print the one-line build summary."""
    if _env("PTKERNELS_PURE") == "1":
        _log("PTKERNELS_PURE=1: pure Python build, no ptkernels._C")
        return [], {}

    want_cuda = _env("PTKERNELS_BUILD_CUDA", "auto").lower()
    if want_cuda not in ("auto", "0", "1"):
        raise SystemExit(f"ptkernels: PTKERNELS_BUILD_CUDA must be auto, 0 or 1, got {want_cuda!r}")

    # cpp_extension reads CUDA_HOME when it is imported: set it first. Left unset, torch guesses the root
    # from the nvcc on PATH, which is wrong when that nvcc is a wrapper script (link fails: -lcudart).
    if not os.environ.get("CUDA_HOME") and Path(CONVENTIONAL_CUDA_HOME, "bin", "nvcc").exists():
        os.environ["CUDA_HOME"] = CONVENTIONAL_CUDA_HOME

    try:
        import torch
    except Exception as err:  # ImportError, or a broken torch install
        if _env("PTKERNELS_ALLOW_NO_TORCH") == "1":
            _log(f"torch not importable ({err}); PTKERNELS_ALLOW_NO_TORCH=1: pure Python build, no ptkernels._C")
            return [], {}
        _fail_no_torch(err)

    from torch.utils import cpp_extension

    reason = None
    if want_cuda == "0":
        reason = "PTKERNELS_BUILD_CUDA=0"
    elif torch.version.cuda is None:
        reason = "torch is a CPU build"
    elif cpp_extension.CUDA_HOME is None:
        reason = "no CUDA toolkit found (set CUDA_HOME)"
    elif not Path(cpp_extension.CUDA_HOME, "bin", "nvcc").exists():
        reason = f"no nvcc in {cpp_extension.CUDA_HOME}/bin"
    if reason is not None and want_cuda == "1":
        raise SystemExit(f"ptkernels: PTKERNELS_BUILD_CUDA=1 but the CUDA kernels cannot be built: {reason}")

    cxx_flags = ["-O3", "-g0"]  # -g0: Python's CFLAGS carry -g (12 MB .so); not an nvcc option
    include_dirs = [str(ROOT / "csrc")]
    depends = _rel([*ROOT.glob("csrc/**/*.h"), *ROOT.glob("csrc/**/*.cuh")])
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}

    if reason is not None:
        _log(f"torch {torch.__version__}, CUDA kernels OFF ({reason})")
        ext = cpp_extension.CppExtension(
            name="ptkernels._C",
            sources=["csrc/ops.cpp"],
            include_dirs=include_dirs,
            depends=depends,
            extra_compile_args={"cxx": cxx_flags},
        )
        return [ext], cmdclass

    # No GPU at build time: torch would query one for the arch list and crash; pick the targets ourselves.
    os.environ["TORCH_CUDA_ARCH_LIST"] = _env("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
    cu_sources = _rel(ROOT.glob("csrc/*.cu"))
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--threads=2"]
    if _env("PTKERNELS_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v,-warn-spills,-warn-lmem-usage")
    _log(
        f"torch {torch.__version__}, CUDA kernels ON (CUDA {torch.version.cuda}, "
        f"CUDA_HOME={cpp_extension.CUDA_HOME}, arch {os.environ['TORCH_CUDA_ARCH_LIST']}, "
        f"{len(cu_sources)} .cu file(s))"
    )
    ext = cpp_extension.CUDAExtension(
        name="ptkernels._C",
        sources=["csrc/ops.cpp", *cu_sources],
        include_dirs=include_dirs + _nvidia_include_dirs(),
        depends=depends,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},  # no -std: torch passes -std=c++20
    )
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()

setup(
    version=_version(),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
