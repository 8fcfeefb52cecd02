"""Where the CPU time of ``prefix_attention`` forward+backward goes: torch.profiler tables of the
eager backend and of the HF + PEFT concatenation path at the kernel shapes of ``ptkernels bench``
(decoder B4 H8 N512 P64 causal; bert-like B16 H12 N128 P32 padded), attention dropout off and 0.1.

    python benchmarks/profile_eager_cpu.py [--reps 3] [--out benchmarks/results/cpu_profile_eager.md]
"""
from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from ptkernels.bench import kernels
from ptkernels.measure import machine

FINDINGS = """## Findings (what the tables showed, what changed)

Earlier rounds (commit 2d50159 and after) removed `delta = rowsum(dO * O)` where only the flash
backward needed it, the all-ones padding mask, the seven-pass logsumexp merge (now one `lerp`
into the output) and the separate dQ sum. What the tables showed next, and what changed:

* Causal shapes: the sequence segment's flash backward cost as much as the concatenation's,
  because the CPU flash backward skips no block above the diagonal (and its forward skips none
  when causality comes as a mask). The causal segment now runs block by block: two query
  chunks (of at least 128 rows) against only the keys they can see, a square chunk split into
  its unmasked keys and an `is_causal` diagonal block; the gradients of disjoint key blocks add
  up because every call takes the merged out and lse. Compare the `_backward` rows of the
  decoder tables. More chunks skip more blocks but add calls: with OpenMP's default spinning
  barriers every extra parallel region is expensive when other processes hold the cores.
* Layout copies: the CPU flash kernel returns (B, N, H, D)-strided results, HF reshapes the
  attention output token-major, and the op used to return contiguous tensors: a copy in the op
  and another in HF's `reshape`, for the output and for dK/dV. The eager backend now returns
  `out`, `dq`, `dk`, `dv` token-major (the op's fake implementation says so). In this op-level
  profile the leaves are contiguous, so `AccumulateGrad` copies the gradients (in a model they
  flow into HF's transposed views without a copy); the concatenation path pays the same.
* The prefix segment as explicit GEMMs (P = 32-64) instead of a second flash call: measured no
  faster (fewer FLOPs are hidden by more, smaller parallel regions) and slower when other
  processes compete for the cores; the flash call stays when dropout and soft-capping are off.
* Attention dropout (the dropout tables): the concatenation path runs SDPA's math kernel
  (`bernoulli_` mask, full softmax, probabilities saved). The eager math segments drew the
  uniform mask twice (forward and backward), converted it to float twice, folded q for the
  prefix with copies and built `~mask` over (B, H, Nq, Nk). Now: one `masked_fill` per drop
  with 1 / (1 - p) applied to the small results, the forward's mask kept for its backward
  (bounded cache), causal query chunks that skip invisible keys, and the prefix products per
  head over all B * Nq rows for token-major q.

Not changed: the non-causal, padded (bert-like) shape still pays two flash calls (the prefix one
at P = 32 is mostly per-block overhead) plus the merge; no block is invisible there to skip.
"""

def _dropout(fn, p=0.1):
    """``fn`` with attention dropout ``p`` on (SDPA's math kernel / the eager math segments)."""
    def run(x, shape):
        import ptkernels
        if fn is kernels.concat_mask_sdpa:
            keys, values = kernels._concat(x)
            q = x["q"]
            b, _, n, _ = q.shape
            full = torch.ones(b, 1, n, keys.shape[2], dtype=torch.bool)
            pl = x["prefix_k"].shape[1]
            if shape["causal"]:
                full[..., pl:] &= torch.ones(n, n, dtype=torch.bool).tril()
            full[..., pl:] &= x["mask"].view(b, 1, 1, n)
            return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=full,
                                                                    dropout_p=p)
        return ptkernels.prefix_attention(x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"],
                                          causal=shape["causal"], attention_mask=x["mask"],
                                          dropout_p=p)
    return run


PATHS = {"hf+peft (cat + mask + SDPA)": kernels.concat_mask_sdpa,
         "ptkernels eager": kernels._ptkernels("eager"),
         "hf+peft (cat + mask + SDPA), attention dropout 0.1": _dropout(kernels.concat_mask_sdpa),
         "ptkernels eager, attention dropout 0.1": _dropout(kernels._ptkernels("eager"))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "cpu_profile_eager.md"))
    args = ap.parse_args(argv)
    cpu = torch.device("cpu")
    m = machine(cpu)
    lines = ["# CPU profile: prefix_attention forward + backward", "",
             f"Generated by `benchmarks/profile_eager_cpu.py --reps {args.reps}`: torch.profiler "
             f"over {args.reps} forward+backward calls after 2 warm-ups, ops sorted by self CPU time.",
             "", f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']} "
             f"({m['torch_threads']} threads), 1-min load average {m.get('load_average_1min')} "
             "(shared with other processes: absolute times are inflated; compare the shares).", "",
             FINDINGS]
    for shape_name, shape in kernels.SHAPES.items():
        for path, fn in PATHS.items():
            x = kernels.make_inputs(shape, True, cpu, torch.float32)
            for _ in range(2):
                kernels._run_once(fn, x, shape, "fwd+bwd", cpu)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(args.reps):
                    kernels._run_once(fn, x, shape, "fwd+bwd", cpu)
            table = prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48,
                max_shapes_column_width=60)
            lines += [f"## {shape_name}: {path}", "", "```", table.strip(), "```", ""]
            print(f"profiled {shape_name} / {path}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
