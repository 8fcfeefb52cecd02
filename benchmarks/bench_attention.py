"""Kernel microbenchmark of prefix attention: ptkernels' Triton (and CUDA) backends vs the baselines.

Providers (each computes causal attention of N queries over P prefix keys + N sequence keys):

* ``triton`` / ``cuda`` (and ``eager`` on CPU): ``ptkernels.prefix_attention`` (the prefix is passed once, shared by the
  batch; no concatenation, no mask tensor). Forward-only when a backend has no backward yet.
* ``sdpa_mask``: what HF + PEFT run: the prefix expanded over the batch and concatenated to K/V
  (inside the timed region, as every layer does it) and SDPA with a materialized boolean
  (B, 1, N, P + N) mask (built once, outside the timed region, as HF builds it once per forward).
* ``sdpa_lower_right``: the same concatenation, SDPA with ``causal_lower_right`` (no mask tensor).
* ``flex``: FlexAttention (compiled on GPU) with a prefix ``mask_mod`` on the concatenation.
* ``flash_attn``: ``flash_attn_func(causal=True)`` on the concatenation (bottom-right), if installed.

* ``triton_prompt_only``: ``ptkernels.prefix_attention`` with q, k, v frozen (only the prefix
  requires grad): its backward runs the prompt-only kernels.

Modes: ``fwd``, ``bwd`` (backward only, from a retained graph), ``fwd+bwd``. Timing: median of
``triton.testing.do_bench`` on GPU. Work and traffic per call are exact (``attention_cost.py``:
matrix-product FLOPs of the visible (query, key) pairs, 2 products per pair forward, 7 backward,
4 for the prompt-only backward; compulsory HBM bytes); the table reports TFLOP/s and GB/s and,
on a GPU with a known data sheet, both as a percentage of the device peak.

``--cpu-smoke`` runs everything on CPU on a tiny shape, with the Triton kernels in the interpreter
(TRITON_INTERPRET=1), timing with ``time.perf_counter`` (median of a few runs), and writes
``benchmarks/results/attention_cpu_smoke.md``. Without it (on a GPU) the table goes to
``benchmarks/results/attention_<gpu>.md``.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention_cost import Shape, cost, device_peak, prompt_only_saving  # noqa: E402


def call_cost(b, h, d, n, p, name, mode, elem_bytes):
    """Exact useful FLOPs and compulsory bytes of one timed call of ``name`` in ``mode``."""
    shape = Shape(b, h, h, n, n, p, d, causal=True, elem_bytes=elem_bytes)
    if name == "triton_prompt_only" and mode != "fwd":
        c_b = cost(shape, "bwd_prompt")
        if mode == "bwd":
            return c_b
        c_f = cost(shape, "fwd")
        return {k: c_f[k] + c_b[k] for k in c_f}
    return cost(shape, mode)


def make_providers(torch, b, h, n, p, d, dtype, device, cpu):
    import ptkernels
    from ptkernels import backends

    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)

    q, k, v = rnd(b, h, n, d), rnd(b, h, n, d), rnd(b, h, n, d)
    pk, pv = rnd(h, p, d), rnd(h, p, d)
    providers = {}

    # eager = ptkernels' fast CPU path (only meaningful as a CPU reference point)
    for name in ("triton", "cuda") + (("eager",) if cpu else ()):
        ok, why = backends.availability(name, "prefix_attention", torch.device(device))
        if ok:
            providers[name] = (lambda name=name: ptkernels.prefix_attention(
                q, k, v, pk, pv, causal=True, backend=name), True)
            if name == "triton":
                qf, kf, vf = q.detach(), k.detach(), v.detach()
                providers["triton_prompt_only"] = (lambda: ptkernels.prefix_attention(
                    qf, kf, vf, pk, pv, causal=True, backend="triton"), True)
        elif name == "triton":
            try:  # forward kernels alone (the backward may not exist yet)
                from ptkernels.backends.triton import _common
                from ptkernels.backends.triton.attention_fwd import prefix_attention_fwd
                if _common.INTERPRET == (torch.device(device).type == "cpu"):
                    providers[name] = (lambda: prefix_attention_fwd(
                        q, k, v, pk.unsqueeze(0), pv.unsqueeze(0), None, None, None, None, True,
                        -1, 0.0, d ** -0.5, 0.0)[0], False)
            except ImportError:
                pass

    def cat():
        return (torch.cat([pk.unsqueeze(0).expand(b, -1, -1, -1), k], 2),
                torch.cat([pv.unsqueeze(0).expand(b, -1, -1, -1), v], 2))

    i = torch.arange(n, device=device).view(n, 1)
    j = torch.arange(p + n, device=device).view(1, p + n)
    mask = ((j < p) | (j - p <= i)).view(1, 1, n, p + n).expand(b, 1, n, p + n).contiguous()
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa_mask():
        kc, vc = cat()
        return sdpa(q, kc, vc, attn_mask=mask)
    providers["sdpa_mask"] = (sdpa_mask, True)

    from torch.nn.attention.bias import causal_lower_right
    lower_right = causal_lower_right(n, p + n)

    def sdpa_lr():
        kc, vc = cat()
        return sdpa(q, kc, vc, attn_mask=lower_right)
    providers["sdpa_lower_right"] = (sdpa_lr, True)

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(bb, hh, qi, kj):
            return (kj < p) | (kj - p <= qi)
        block_mask = create_block_mask(mask_mod, None, None, n, p + n, device=device)
        flex = flex_attention if cpu else torch.compile(flex_attention)

        def flex_fn():
            kc, vc = cat()
            if cpu:  # FlexAttention has no CPU backward and refuses inputs that require grad
                return flex(q.detach(), kc.detach(), vc.detach(), block_mask=block_mask)
            return flex(q, kc, vc, block_mask=block_mask)
        providers["flex"] = (flex_fn, not cpu)
    except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
        print(f"flex attention unavailable: {exc!r}", file=sys.stderr)

    try:
        from flash_attn import flash_attn_func

        def fa():
            kc, vc = cat()
            return flash_attn_func(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2),
                                   causal=True).transpose(1, 2)
        if not cpu:
            providers["flash_attn"] = (fa, True)
    except ImportError:
        pass
    return providers, [q, k, v, pk, pv]


def timer(torch, cpu, reps):
    if not cpu:
        import triton.testing

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        return bench

    def bench(fn):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    return bench


def run(args):
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is imported
    sys.path.insert(0, ROOT)
    import torch

    cpu = args.cpu_smoke
    device = "cpu" if cpu else "cuda"
    dtype = torch.float32 if cpu else torch.bfloat16
    if cpu:
        shapes = [(1, 2, 64, 8, 32)]
    else:
        shapes = [(16384 // n, 16, n, 64, 128) for n in args.seqlens]
    bench = timer(torch, cpu, args.reps)
    rows = []
    for b, h, n, p, d in shapes:
        providers, leaves = make_providers(torch, b, h, n, p, d, dtype, device, cpu)
        for name, (fn, has_bwd) in providers.items():
            for mode in ("fwd", "bwd", "fwd+bwd"):
                if mode != "fwd" and not has_bwd:
                    rows.append((b, h, n, p, d, name, mode, None, "no backward here"))
                    continue
                try:
                    if mode == "fwd":
                        with torch.no_grad():
                            ms = bench(fn)
                    else:
                        out = fn()
                        g = torch.randn_like(out)

                        def step(out=out, g=g):
                            for x in leaves:
                                x.grad = None
                            if mode == "bwd":
                                out.backward(g, retain_graph=True)
                            else:
                                fn().backward(g)
                        ms = bench(step)
                    rows.append((b, h, n, p, d, name, mode, ms, ""))
                except Exception as exc:  # noqa: BLE001 - one failing baseline must not stop the table
                    rows.append((b, h, n, p, d, name, mode, None, f"{type(exc).__name__}: {exc}"[:80]))
                print(rows[-1], file=sys.stderr)
    return rows, dtype, device


def render(rows, dtype, device, args) -> str:
    import torch

    lines = []
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if args.cpu_smoke:
        lines += ["# prefix attention microbenchmark: CPU smoke run", "",
                  f"Run: `python benchmarks/bench_attention.py --cpu-smoke` ({when}).", "",
                  f"Setup: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
                  f"(shared with other jobs), torch {torch.__version__}, Python "
                  f"{platform.python_version()}, {str(dtype).replace('torch.', '')}, Triton kernels "
                  f"in the interpreter (TRITON_INTERPRET=1), median of {args.reps} runs "
                  f"(`time.perf_counter`).", "",
                  "**What these numbers do not predict.** The Triton interpreter runs each program "
                  "sequentially in Python/numpy, so its times measure interpreter overhead (number of "
                  "programs x loop iterations), not kernel quality; the CPU SDPA / FlexAttention "
                  "baselines run optimized C++ or eager PyTorch. Nothing here says anything about GPU "
                  "speed, memory traffic, tensor-core use or the ranking of providers on a GPU: this "
                  "run only proves that the benchmark and every provider run end to end. GPU numbers "
                  "come from `python benchmarks/bench_attention.py` on a CUDA machine "
                  "(`make gpu-check`).", ""]
    else:
        lines += [f"# prefix attention microbenchmark: {torch.cuda.get_device_name()}", "",
                  f"Run: `python benchmarks/bench_attention.py` ({when}); torch {torch.__version__}, "
                  f"{str(dtype).replace('torch.', '')}, causal, `triton.testing.do_bench` median.", ""]
    peak = None if args.cpu_smoke else device_peak(torch.cuda.get_device_name())
    elem = torch.tensor([], dtype=dtype).element_size()
    lines += ["GFLOP and MB per call are exact (`benchmarks/attention_cost.py`): matrix-product "
              "FLOPs of the visible (query, key) pairs (forward 4 D per pair, backward 10 D as "
              "FlashAttention counts, "
              "prompt-only backward 8 D per prefix pair) and the compulsory HBM traffic. "
              + (f"Peaks: {peak[0]:g} TFLOP/s, {peak[1]:g} GB/s (data sheet)." if peak else
                 "No device peak known here: no percentages."), ""]
    for b, h, n, p, d in sorted({r[:5] for r in rows}):
        lines.append(f"- B={b} H={h} N={n} P={p} D={d}: "
                     + prompt_only_saving(Shape(b, h, h, n, n, p, d, elem_bytes=elem)))
    lines += ["", "| B | H | N | P | D | provider | mode | ms | GFLOP | MB | TFLOP/s | GB/s | "
              "% peak FLOP | % peak BW | note |", "|" + "---|" * 15]
    for b, h, n, p, d, name, mode, ms, note in rows:
        c = call_cost(b, h, d, n, p, name, mode, elem)
        head = (f"| {b} | {h} | {n} | {p} | {d} | {name} | {mode} | "
                f"{'-' if ms is None else f'{ms:.3f}'} | {c['useful'] / 1e9:.4g} | "
                f"{c['bytes'] / 1e6:.4g} |")
        if ms is None:
            lines.append(f"{head} - | - | - | - | {note} |")
            continue
        tf = c["useful"] / (ms * 1e-3) / 1e12
        gbs = c["bytes"] / (ms * 1e-3) / 1e9
        pf = f"{100 * tf / peak[0]:.1f}" if peak else "-"
        pb = f"{100 * gbs / peak[1]:.1f}" if peak else "-"
        lines.append(f"{head} {tf:.4g} | {gbs:.4g} | {pf} | {pb} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run (Triton interpreter)")
    ap.add_argument("--gpu", action="store_true",
                    help="run on the CUDA GPU (the default without --cpu-smoke; make gpu-check)")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--reps", type=int, default=5, help="CPU repetitions (GPU uses do_bench)")
    ap.add_argument("--out", default=None, help="output markdown path")
    args = ap.parse_args(argv)
    if args.gpu and args.cpu_smoke:
        ap.error("--gpu and --cpu-smoke exclude each other")
    rows, dtype, device = run(args)
    text = render(rows, dtype, device, args)
    if args.out:
        path = args.out
    elif args.cpu_smoke:
        path = os.path.join(RESULTS, "attention_cpu_smoke.md")
    else:
        import torch
        gpu = torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
        path = os.path.join(RESULTS, f"attention_{gpu}.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
