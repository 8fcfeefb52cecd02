"""Ahead-of-time compile checks of Triton kernels for sm_80 / sm_90, without a GPU.

``compile_variant`` compiles one kernel variant with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` (no driver needed) and measures it:

* registers and stack from the cubin, read by the ``cuobjdump`` bundled in the triton wheel
  (``--dump-resource-usage``: ``REG:n STACK:n``);
* register spills from the bundled ``ptxas -v`` run on the PTX (``N bytes spill stores, M bytes
  spill loads``; Triton's ``metadata.n_spills`` is only filled when a GPU loads the cubin);
* shared memory from ``metadata.shared`` (the dynamic smem Triton requests);
* tensor-core use: ``mma`` (sm_80 ``mma.sync``) or ``wgmma`` (sm_90) in the PTX;
* asynchronous global->shared loads: ``cp.async`` (Ampere-style) or ``cp.async.bulk`` (TMA) in the
  PTX (what the software pipeline of a ``num_stages > 1`` loop emits);
* blocks per SM (occupancy) from registers, warps and shared memory (``blocks_per_sm``).

Architectures: sm_80 (A100), sm_86 (A10 / RTX 30, also sm_89 L4 / L40S / RTX 40: the same 99 KB
of shared memory per block) and sm_90 (H100). ``configs.table_arch`` maps each to its table; a
variant of the sm_86 table that the sm_80 table also holds (same kernel, label, config) is not
compiled twice: its sm_80 result is checked against the sm_86 limits too (Triton emits the same
code for both; only the limits differ).

Compiles must not run under the interpreter: ``run_jobs`` starts worker processes of this file
with ``TRITON_INTERPRET`` removed from the environment (and a throwaway Triton cache dir, so
nothing is cached in the repo), split over ``processes`` workers.

Spec format (how a kernel module opts in)
----------------------------------------
A module in ``ptkernels.backends.triton`` exposes ``AOT_SPECS``, a list of dicts:

    {"name": "attention_fwd",          # short name for the table
     "kernel": _fwd_kernel,            # the @triton.jit function
     "description": "...",             # one line
     "variants": variants}             # callable: arch (80 or 90) -> list of variant dicts

and each variant dict (one compile) has:

    {"label": "bf16 d128 all-features",  # dtype / head dim / feature set shown in the table
     "config": "128x64 w8 s3",           # the autotune configuration, for the table
     "signature": {"Q": "*bf16", "sqb": "i32", "scale": "fp32", ...},
                                         # every non-constexpr parameter -> Triton type string
     "constexprs": {"BLOCK_M": 128, "INTERPRET": False, "sqd": 1, ...},
                                         # constexpr parameters, and int parameters the JIT
                                         # would specialize to 1 (e.g. a unit stride)
     "div16": ["Q", "sqb", ...],         # parameters the JIT would see 16-divisible (pointers,
                                         # most strides): they get tt.divisibility=16 as in JIT
     "num_warps": 8, "num_stages": 3,
     "tensor_cores": True,               # require mma/wgmma in the PTX (kernels with tl.dot)
     "async_loads": True}                # require cp.async / TMA in the PTX (pipelined loops)

List every configuration the autotuner may pick on that arch (``configs.candidates``), with
the heaviest feature set (most registers) for each. ``tests/test_triton_aot.py`` discovers the
specs, compiles all variants for sm_80 and sm_90, asserts zero spills, smem <= the arch limit and
tensor-core use, and prints the table.

Run by hand: ``python tests/triton_aot.py [module ...]`` prints the table.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time

ARCHS = (80, 86, 90)
# Shared memory one block may use (opt-in maximum), per SM, warps and blocks per SM.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}
SMEM_PER_SM = {80: 164 * 1024, 86: 100 * 1024, 90: 228 * 1024}
MAX_WARPS_PER_SM = {80: 64, 86: 48, 90: 64}
MAX_BLOCKS_PER_SM = {80: 32, 86: 16, 90: 32}
REGS_PER_SM = 65536
PACKAGE = "ptkernels.backends.triton"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def discover_modules() -> list[str]:
    """Modules of ``ptkernels.backends.triton`` that define ``AOT_SPECS`` (imports them)."""
    pkg = importlib.import_module(PACKAGE)
    found = []
    for info in pkgutil.iter_modules(pkg.__path__):
        name = f"{PACKAGE}.{info.name}"
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue  # a kernel module still being written elsewhere; it has no specs yet
        if getattr(mod, "AOT_SPECS", None):
            found.append(name)
    return found


def _variant_key(v: dict) -> tuple:
    return (v["label"], v["config"], json.dumps(v["constexprs"], sort_keys=True))


def list_jobs(modules, archs=ARCHS) -> list[tuple]:
    """(module, spec index, arch, variant index) of every compile. An sm_86 variant identical to
    an sm_80 one is listed as (module, spec index, 86, variant index, "alias-80"): not compiled,
    its sm_80 result is checked against the sm_86 limits."""
    jobs = []
    for name in modules:
        mod = importlib.import_module(name)
        for si, spec in enumerate(mod.AOT_SPECS):
            sm80 = {_variant_key(v) for v in spec["variants"](80)} if 80 in archs else set()
            for arch in archs:
                for vi, v in enumerate(spec["variants"](arch)):
                    if arch == 86 and _variant_key(v) in sm80:
                        jobs.append((name, si, arch, vi, "alias-80"))
                    else:
                        jobs.append((name, si, arch, vi))
    return jobs


def blocks_per_sm(arch: int, regs: int, num_warps: int, smem: int) -> int:
    """Resident blocks per SM: the minimum over registers (allocated per warp in units of 256),
    warps, shared memory (plus 1 KB the driver reserves per block) and the block limit."""
    regs_per_warp = ((max(regs, 1) * 32 + 255) // 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * num_warps)
    by_warps = MAX_WARPS_PER_SM[arch] // num_warps
    by_smem = SMEM_PER_SM[arch] // (smem + 1024) if smem else MAX_BLOCKS_PER_SM[arch]
    return max(0, min(by_regs, by_warps, by_smem, MAX_BLOCKS_PER_SM[arch]))


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_variant(kernel, variant: dict, arch: int) -> dict:
    """Compile one variant for sm_<arch>; return its resource usage (see the module docstring)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "AOT compiles need TRITON_INTERPRET unset"
    signature = dict(variant["signature"])
    for name in variant["constexprs"]:
        signature[name] = "constexpr"
    missing = [a for a in kernel.arg_names if a not in signature]
    if missing:
        raise ValueError(f"{kernel.__name__}: no type or constexpr value for {missing}")
    signature = {a: signature[a] for a in kernel.arg_names}
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in variant.get("div16", ())}
    src = ASTSource(kernel, signature, constexprs=dict(variant["constexprs"]), attrs=attrs)
    t0 = time.time()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": variant["num_warps"],
                                       "num_stages": variant["num_stages"]})
    seconds = time.time() - t0
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path, ptx_path = os.path.join(tmp, "k.cubin"), os.path.join(tmp, "k.ptx")
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        with open(ptx_path, "w") as f:
            f.write(ptx)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin_path],
                               capture_output=True, text=True, check=True).stdout
        target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
        ptxas = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                                f"--gpu-name={target}", ptx_path, "-o", os.path.join(tmp, "o.cubin")],
                               capture_output=True, text=True, check=True)
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas.stderr + ptxas.stdout)
    mma = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else None)
    if "cp.async.bulk" in ptx:
        async_loads = "tma"
    elif "cp.async" in ptx:
        async_loads = "cp.async"
    else:
        async_loads = None
    smem = int(compiled.metadata.shared)
    return {"regs": regs, "stack": stack, "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2)), "smem": smem, "mma": mma,
            "async": async_loads, "num_warps": variant["num_warps"],
            "num_stages": variant["num_stages"],
            "blocks_per_sm": blocks_per_sm(arch, regs, variant["num_warps"], smem),
            "seconds": round(seconds, 2), "target": target}


def _row_head(name, spec, arch, variant) -> dict:
    return {"module": name.rsplit(".", 1)[-1], "kernel": spec["name"], "arch": arch,
            "label": variant["label"], "config": variant["config"],
            "tensor_cores": bool(variant.get("tensor_cores", False)),
            "async_required": bool(variant.get("async_loads", False)),
            "products": spec.get("products_per_tile")}


def _run_local(jobs) -> list[dict]:
    rows = []
    for name, si, arch, vi in jobs:
        spec = importlib.import_module(name).AOT_SPECS[si]
        variant = spec["variants"](arch)[vi]
        row = _row_head(name, spec, arch, variant)
        try:
            row.update(compile_variant(spec["kernel"], variant, arch))
        except Exception as exc:  # noqa: BLE001 - reported per variant
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        rows.append(row)
    return rows


def run_jobs(jobs, processes: int = 2) -> list[dict]:
    """Compile ``jobs`` in ``processes`` worker processes with a clean env; return result rows."""
    aliases = [j for j in jobs if len(j) == 5]
    jobs = [j for j in jobs if len(j) == 4]
    if not jobs:
        return []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        chunks = [jobs[i::processes] for i in range(processes) if jobs[i::processes]]
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
                 for _ in chunks]
        for p, chunk in zip(procs, chunks):
            p.stdin.write(json.dumps(chunk))
            p.stdin.close()
        rows = []
        for p in procs:
            out = p.stdout.read()
            err = p.stderr.read()
            if p.wait() != 0:
                raise RuntimeError(f"AOT worker failed (rc {p.returncode}):\n{err[-4000:]}")
            rows += json.loads(out.strip().splitlines()[-1])
    rows += _alias_rows(aliases, rows)
    return sorted(rows, key=lambda r: (r["kernel"], r["arch"], r["label"], r["config"]))


def _alias_rows(aliases, rows) -> list[dict]:
    """sm_86 rows of variants compiled once for sm_80: the sm_80 result with sm_86 occupancy."""
    by_key = {(r["kernel"], r["arch"], r["label"], r["config"]): r for r in rows}
    out = []
    for name, si, arch, vi, _ in aliases:
        spec = importlib.import_module(name).AOT_SPECS[si]
        variant = spec["variants"](arch)[vi]
        src = by_key.get((spec["name"], 80, variant["label"], variant["config"]))
        row = dict(src) if src is not None else {"error": "sm_80 twin missing"}
        row.update(_row_head(name, spec, arch, variant))
        if "error" not in row:
            row["blocks_per_sm"] = blocks_per_sm(arch, row["regs"], row["num_warps"], row["smem"])
            row["target"] = "sm_86 (sm_80 code)"
        out.append(row)
    return out


def check(row: dict) -> list[str]:
    """The problems of one result row (empty when it passes)."""
    if "error" in row:
        return [f"compile error: {row['error']}"]
    problems = []
    if row["spill_stores"] or row["spill_loads"] or row["stack"]:
        problems.append(f"spills: {row['spill_stores']} B stores / {row['spill_loads']} B loads, "
                        f"stack {row['stack']} B")
    if row["smem"] > SMEM_LIMIT[row["arch"]]:
        problems.append(f"shared memory {row['smem']} B > {SMEM_LIMIT[row['arch']]} B")
    if row["tensor_cores"] and not row["mma"]:
        problems.append("no tensor-core instruction (mma/wgmma) in the PTX")
    if row.get("async_required") and not row.get("async"):
        problems.append("no asynchronous load (cp.async / TMA) in the PTX of a pipelined loop")
    if row.get("blocks_per_sm", 1) < 1:
        problems.append("not one block fits on an SM")
    return problems


def table(rows) -> str:
    head = ("| kernel | arch | variant | config | regs | spills st/ld B | smem B | stages | "
            "blocks/SM | async loads | mma | products/tile |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | sm_{r['arch']} | {r['label']} | {r['config']} | "
                         f"ERROR | | | | | | | |")
            continue
        lines.append(f"| {r['kernel']} | sm_{r['arch']} | {r['label']} | {r['config']} | "
                     f"{r['regs']} | {r['spill_stores']}/{r['spill_loads']} | {r['smem']} | "
                     f"{r['num_stages']} | {r['blocks_per_sm']} | {r['async'] or '-'} | "
                     f"{r['mma'] or '-'} | {r['products'] or '-'} |")
    return "\n".join(lines)


def main(argv) -> int:
    if argv[:1] == ["--worker"]:
        jobs = [tuple(j) for j in json.loads(sys.stdin.read())]
        print(json.dumps(_run_local(jobs)))
        return 0
    sys.path.insert(0, ROOT)
    modules = [a if "." in a else f"{PACKAGE}.{a}" for a in argv] or discover_modules()
    rows = run_jobs(list_jobs(modules))
    print(table(rows))
    bad = [(r, p) for r in rows for p in check(r)]
    for r, p in bad:
        print(f"FAIL {r['kernel']} sm_{r['arch']} {r['label']} {r['config']}: {p}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
