"""The `ptkernels` command: `ptkernels demo` (prompt tuning on a real pretrained model, ptkernels vs
PEFT), `ptkernels bench` (kernel and training-step benchmarks), `ptkernels info` (what is installed and which backend runs each op) and `ptkernels check` (a
small prefix-attention call checked against the float64 reference)."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import sys

# ptkernels._C registers its CUDA kernels under the kernel entries ptkernels::<op>_cuda
# (TORCH_LIBRARY_IMPL(ptkernels, CUDA, m)); their schemas come from ptkernels/ops/_kernel_entries.py.
CUDA_PROBE_OP = "ptkernels::prefix_attention_fwd_cuda"
DISPATCH_KEYS = ("CPU", "CUDA", "Meta")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _native_library() -> dict:
    """Whether ptkernels._C imports, from where, and which dispatch keys its ops have kernels for."""
    import torch

    import ptkernels  # noqa: F401  (defines the kernel entries the library registers kernels for)

    info = {"built": False, "path": None, "error": None, "ops": {}, "cuda_kernels": False}
    try:
        mod = importlib.import_module("ptkernels._C")
    except Exception as err:  # not built (pure install) or built against another torch
        info["error"] = f"{type(err).__name__}: {err}"
        return info
    info["built"] = True
    info["path"] = getattr(mod, "__file__", None)
    # kernel entry -> the dispatch keys it has kernels for (e.g. prefix_attention_fwd_cuda: CUDA)
    info["ops"] = {
        name.split("::", 1)[1]: [key for key in DISPATCH_KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(name, key)]
        for name in sorted(torch._C._dispatch_get_all_op_names())
        if name.startswith("ptkernels::") and name.endswith("_cuda")
    }
    info["cuda_kernels"] = "CUDA" in info["ops"].get(CUDA_PROBE_OP.split("::", 1)[1], [])
    return info


def _gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [f"{i}: {torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(torch.cuda.device_count())]


def _backend_rows() -> tuple[list[dict], str | None]:
    try:
        from ptkernels import backends

        return list(backends.describe()), None
    except Exception as err:  # report, do not crash `info`
        return [], f"{type(err).__name__}: {err}"


def collect_info() -> dict:
    import torch

    versions = {"python": platform.python_version()}
    for dist in ("torch", "triton", "transformers", "peft", "ptkernels"):
        versions[dist] = _dist_version(dist)
    rows, rows_error = _backend_rows()
    return {
        "versions": versions,
        "torch_cuda": torch.version.cuda,  # None for a CPU build of torch
        "native": _native_library(),
        "gpus": _gpus(),
        "env": {name: os.environ.get(name) for name in ("PTKERNELS_BACKEND", "PTKERNELS_DETERMINISTIC",
                                                        "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")},
        "backends": rows,
        "backends_error": rows_error,
        "cuda_dropout": _cuda_dropout_route(),
        "triton_backward": _triton_backward_path(),
    }


def _triton_backward_path() -> str | None:
    """Which backward the Triton kernels run for a light full backward (fused 5-product or the
    deterministic 7-product one); None without Triton."""
    try:
        from ptkernels.backends.triton import attention_bwd
    except Exception:  # report, do not crash `info`
        return None
    return attention_bwd.backward_path()


def _cuda_dropout_route() -> str | None:
    try:
        from ptkernels.backends import cuda
    except Exception:  # report, do not crash `info`
        return None
    return cuda.DROPOUT_ROUTE


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _print_info(info: dict) -> None:
    v = info["versions"]
    print("ptkernels " + (v["ptkernels"] or "(not installed as a distribution)"))
    print("versions: " + ", ".join(f"{k} {v[k] or '-'}" for k in ("python", "torch", "triton", "transformers", "peft")))
    print(f"torch build: {'CUDA ' + info['torch_cuda'] if info['torch_cuda'] else 'CPU only'}")
    native = info["native"]
    if native["built"]:
        print(f"ptkernels._C: built ({native['path']})")
        for op, keys in native["ops"].items():
            print(f"  torch.ops.ptkernels.{op}: kernels for {', '.join(keys) or 'no dispatch key'}")
        print(f"CUDA kernels in ptkernels._C: {'yes' if native['cuda_kernels'] else 'no'}")
        if native["cuda_kernels"]:
            print(f"  note: {info['cuda_dropout']}")
    else:
        print(f"ptkernels._C: not available ({native['error']})")
        print("CUDA kernels in ptkernels._C: no")
    print("GPUs: " + ("; ".join(info["gpus"]) if info["gpus"] else "none visible"))
    env = info["env"]
    print("PTKERNELS_BACKEND=" + (env["PTKERNELS_BACKEND"] or "(unset: auto)"))
    if env["TRITON_INTERPRET"]:
        print(f"TRITON_INTERPRET={env['TRITON_INTERPRET']}")
    if info["triton_backward"]:
        print(f"triton backward: {info['triton_backward']}")
    print()
    if info["backends_error"]:
        print(f"backend table unavailable: {info['backends_error']}")
        return
    print("backends (what backend='auto' runs):")
    table = [["op", "device", "backend", "reason"]]
    for row in info["backends"]:
        table.append([str(row.get("op")), str(row.get("device")), str(row.get("backend") or "none"),
                      str(row.get("reason", ""))])
    print(_table(table))
    routes = {row["device"]: row["routing"] for row in info["backends"] if row.get("routing")
              and str(row.get("device", "")).startswith("cuda")}
    for device, route in routes.items():
        print(f"routing on {device}: {route}")
    unavailable = []
    for row in info["backends"]:
        for name, status in (row.get("backends") or {}).items():
            if not status.get("available"):
                unavailable.append(f"  {row['op']} on {row['device']}: {name}: {status.get('reason')}")
    if unavailable:
        print("unavailable backends:")
        print("\n".join(unavailable))


def cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print_info(info)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ptkernels.demo.data import DemoInputError
    from ptkernels.demo.run import run
    try:
        run(args)
    except DemoInputError as err:  # the user's input: a message, not a traceback
        print(f"ptkernels demo: error: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ptkernels.bench.run import run
    try:
        run(args)
    except ValueError as err:
        print(f"ptkernels bench: error: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    import torch

    import ptkernels
    from ptkernels import backends
    from ptkernels.backends.eager import reference_prefix_attention

    device = torch.device(args.device)
    torch.manual_seed(0)
    # A small GQA call: batch 2, 4 query heads sharing 2 key/value heads, 5 queries over 9 keys,
    # a shared prefix of 3 virtual tokens, causal, the first row left-padded by 2.
    b, hq, hkv, nq, nk, p, d = 2, 4, 2, 5, 9, 3, 32
    dtype = torch.float32
    q = torch.randn(b, hq, nq, d, device=device, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, device=device, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, device=device, dtype=dtype)
    prefix_k = torch.randn(hkv, p, d, device=device, dtype=dtype, requires_grad=True)
    prefix_v = torch.randn(hkv, p, d, device=device, dtype=dtype, requires_grad=True)
    mask = torch.ones(b, nk, dtype=torch.bool, device=device)
    mask[0, :2] = False

    backend = backends.resolve("prefix_attention", device, args.backend)
    print(f"prefix_attention on {device}: backend {backend!r} (requested {args.backend!r}, "
          f"PTKERNELS_BACKEND={os.environ.get('PTKERNELS_BACKEND') or 'unset'})")
    print(f"shapes: q {tuple(q.shape)}, k/v {tuple(k.shape)}, prefix {tuple(prefix_k.shape)}, causal, left padding")

    out = ptkernels.prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, attention_mask=mask,
                                     backend=args.backend)
    # Prompt-only backward: q, k, v need no gradient, only the prefix does.
    grad_out = torch.randn_like(out)
    dpk, dpv = torch.autograd.grad(out, (prefix_k, prefix_v), grad_out)

    f64 = [t.detach().double().requires_grad_(t.requires_grad) for t in (q, k, v, prefix_k, prefix_v)]
    ref, _ = reference_prefix_attention(*f64, causal=True, attention_mask=mask)
    ref_dpk, ref_dpv = torch.autograd.grad(ref, (f64[3], f64[4]), grad_out.double())

    def maxdiff(a, b_):
        return (a.double() - b_).abs().max().item()

    errs = {"out": maxdiff(out, ref), "d prefix_k": maxdiff(dpk, ref_dpk), "d prefix_v": maxdiff(dpv, ref_dpv)}
    for name, err in errs.items():
        print(f"max |{name} - float64 reference| = {err:.3e}")
    tol = 1e-4
    ok = all(err <= tol for err in errs.values())
    print("OK" if ok else f"MISMATCH (tolerance {tol})")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptkernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, native library, GPUs and the backend each op uses")
    p_info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p_info.set_defaults(func=cmd_info)
    from ptkernels.demo.run import __doc__ as demo_doc, add_arguments as demo_arguments
    p_demo = sub.add_parser("demo", help="prompt-tune a real pretrained model offline: ptkernels vs PEFT",
                            description=demo_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo_arguments(p_demo)
    p_demo.set_defaults(func=cmd_demo)
    from ptkernels.bench.run import __doc__ as bench_doc, add_arguments as bench_arguments
    p_bench = sub.add_parser("bench", help="kernel microbenchmarks and end-to-end training steps "
                             "(CSV + Markdown + PNG)", description=bench_doc,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_arguments(p_bench)
    p_bench.set_defaults(func=cmd_bench)
    p_check = sub.add_parser("check", help="run a small prefix attention and compare it with the float64 reference")
    p_check.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p_check.add_argument("--backend", default="auto", help="auto, eager, triton or cuda (default: auto)")
    p_check.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `ptkernels info | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
