"""CPU benchmark: ptkernels' eager fast path vs what HF + PEFT run today for a prefix.

The HF + PEFT path, per attention layer: the prefix (Hkv, P, D) expanded over the batch and
concatenated in front of the layer's keys/values, a (B, 1, N, P + N) boolean mask (prefix
columns visible, bottom-right causal, key padding), and ``scaled_dot_product_attention``.
ptkernels' path: ``prefix_attention(q, k, v, prefix_k, prefix_v, causal=..., attention_mask=...)``
on the eager backend (prefix as one batched GEMM, sequence through SDPA, merged by logsumexp).

Measured per (shape, path, mode): the median wall time of repeated runs (after warm-up) and the
peak memory of one run (peak live heap during the run minus the heap before it, sampled after every ATen op, backward
included).

What a CPU number predicts: the relative cost of the extra copies, the mask and the unfused
backward on a CPU. It does NOT predict GPU speed (different kernels, memory hierarchy and
bottlenecks); GPU numbers come from ``benchmarks/bench_attention.py`` on a GPU machine.

    python benchmarks/bench_vs_peft_concat.py [--reps 15] [--out benchmarks/results/cpu_prefix_attention.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from ptkernels.measure import cpu_name  # noqa: F401  (bench_training_serving_memory imports it from here)

SHAPES = {
    "decoder": dict(b=4, h=8, n=512, p=64, d=64, causal=True, padding=False),
    "bert-like": dict(b=16, h=12, n=128, p=32, d=64, causal=False, padding=True),
}


DEVICE = "cpu"


def make_inputs(shape, grad):
    g = torch.Generator().manual_seed(0)
    b, h, n, p, d = shape["b"], shape["h"], shape["n"], shape["p"], shape["d"]
    t = lambda *s: torch.randn(*s, generator=g).to(DEVICE).requires_grad_(grad)  # noqa: E731
    mask = torch.ones(b, n, dtype=torch.bool)
    if shape["padding"]:  # right padding of varying length, as a tokenizer batch has
        for i in range(b):
            mask[i, n - (i * n) // (2 * b):] = False
    return dict(q=t(b, h, n, d), k=t(b, h, n, d), v=t(b, h, n, d), prefix_k=t(h, p, d),
                prefix_v=t(h, p, d), mask=mask.to(DEVICE))


def hf_peft_path(x, causal):
    q, k, v, pk, pv, mask = x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], x["mask"]
    b, _, n, _ = q.shape
    p = pk.shape[1]
    keys = torch.cat([pk.unsqueeze(0).expand(b, -1, -1, -1), k], 2)
    values = torch.cat([pv.unsqueeze(0).expand(b, -1, -1, -1), v], 2)
    full = torch.ones(b, 1, n, p + n, dtype=torch.bool, device=q.device)
    if causal:
        full[..., p:] &= torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    full[..., p:] &= mask.view(b, 1, 1, n)
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=full)


def ptkernels_path(x, causal):
    import ptkernels
    return ptkernels.prefix_attention(x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"],
                                      causal=causal, attention_mask=x["mask"], backend="eager")


PATHS = {"hf+peft (cat + mask + SDPA)": hf_peft_path, "ptkernels eager": ptkernels_path}


def run_once(path, shape, mode, x=None):
    grad = mode == "fwd+bwd"
    x = x if x is not None else make_inputs(shape, grad)
    if grad:
        out = PATHS[path](x, shape["causal"])
        out.backward(torch.ones_like(out))
    else:
        with torch.no_grad():
            PATHS[path](x, shape["causal"])
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_it(path, shape, mode, reps):
    grad = mode == "fwd+bwd"
    x = make_inputs(shape, grad)
    for _ in range(2):
        run_once(path, shape, mode, x)
    times = []
    for _ in range(reps):
        for t in (x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"]):
            t.grad = None
        t0 = time.perf_counter()
        run_once(path, shape, mode, x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


class _PeakHeap(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak live heap bytes (glibc ``mallinfo2``: arena + mmapped) sampled after every ATen op.

    torch's CPU allocator uses malloc, so this sees every tensor a path allocates (at op
    granularity: temporaries inside one kernel are not seen, for both paths alike).
    """

    def __init__(self):
        super().__init__()
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                         "uordblks", "fordblks", "keepcost")]

        self._libc = ctypes.CDLL("libc.so.6")
        self._libc.mallinfo2.restype = MallInfo2
        self.base = self.peak = self.now()

    def now(self):
        info = self._libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.now())
        return out


def peak_memory(path, shape, mode):
    """Peak memory growth of one run above what existed before it (inputs already allocated)."""
    x = make_inputs(shape, mode == "fwd+bwd")
    run_once(path, shape, mode, x)  # lazy initializations out of the way
    for t in (x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"]):
        t.grad = None
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(path, shape, mode, x)
        return torch.cuda.max_memory_allocated() - base
    with _PeakHeap() as probe:
        run_once(path, shape, mode, x)
    return probe.peak - probe.base


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--gpu", action="store_true",
                    help="run the same comparison on CUDA tensors (backend auto: the kernels)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = "cuda" if args.gpu else "cpu"
    if args.out is None:
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                f"{DEVICE}_prefix_attention.md")
    import ptkernels
    if args.gpu:
        PATHS["ptkernels auto"] = lambda x, causal: ptkernels.prefix_attention(
            x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], causal=causal,
            attention_mask=x["mask"], backend="auto")
    rows = []
    for shape_name, shape in SHAPES.items():
        for mode in ("fwd", "fwd+bwd"):
            for path in PATHS:
                med, _ = time_it(path, shape, mode, args.reps)
                mem = peak_memory(path, shape, mode)
                rows.append((shape_name, mode, path, med, mem))
                print(f"{shape_name:10s} {mode:8s} {path:30s} {med * 1e3:9.2f} ms  {mem / 2**20:8.1f} MiB",
                      flush=True)
    lines = [
        f"# {DEVICE.upper()}: ptkernels vs the HF + PEFT concatenation path",
        "",
        f"Generated by `benchmarks/bench_vs_peft_concat.py --reps {args.reps}`.",
        "",
        f"Setup: {torch.cuda.get_device_name() if DEVICE == 'cuda' else cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, ptkernels {ptkernels.__version__}, float32, one "
        f"attention layer. Time: median of {args.reps} runs after 2 warm-ups. Memory: peak live "
        "heap growth during one run (glibc mallinfo2 sampled after every ATen op, backward "
        "included; inputs allocated before).",
        "",
        "Shapes: " + "; ".join(
            f"**{k}** B={s['b']} H={s['h']} N={s['n']} P={s['p']} D={s['d']} "
            f"{'causal' if s['causal'] else 'not causal'}{', right padding' if s['padding'] else ''}"
            for k, s in SHAPES.items()),
        "",
        "| shape | mode | path | median ms | peak MiB | speed-up | memory ratio |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    base = {(r[0], r[1]): r for r in rows if r[2].startswith("hf+peft")}
    for shape_name, mode, path, med, mem in rows:
        b = base[(shape_name, mode)]
        lines.append(f"| {shape_name} | {mode} | {path} | {med * 1e3:.2f} | {mem / 2**20:.1f} | "
                     f"{b[3] / med:.2f}x | {mem / b[4]:.2f} |" if b[4] else
                     f"| {shape_name} | {mode} | {path} | {med * 1e3:.2f} | {mem / 2**20:.1f} | "
                     f"{b[3] / med:.2f}x | - |")
    lines += ["", "Speed-up = HF + PEFT time / this path's time (>1 is faster). Memory ratio = this "
              "path's peak / HF + PEFT's (<1 is leaner).",
              "", "What this predicts: on a CPU, the cost of the per-layer concatenation, the "
              "materialized (N, P + N) mask and the backward through the concatenation. It does "
              "not predict GPU timings, where the kernels, the memory system and the bottlenecks "
              "differ; GPU numbers come from `benchmarks/bench_attention.py` on a GPU machine.", ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
