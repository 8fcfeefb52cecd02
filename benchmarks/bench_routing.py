"""Measure every backend per route key on this GPU and write the routing table ``auto`` follows.

For each key of ``ptkernels.backends.routing.ROUTE_KEYS`` one representative call (``SETUPS``)
runs on every backend that is available for it (eager, triton, cuda): CUDA-event timings, the
median of ``--reps`` after ``--warmup`` calls. The backends are ranked fastest first and the table
is written atomically to the path ``backends.resolve`` reads (``routing.default_path``, or
``--out``), with a copy and a Markdown summary under ``benchmarks/results/`` to commit. The table
applies only to this GPU name and these torch / CUDA / triton / ptkernels versions; elsewhere
``auto`` keeps the estimated order.

    python benchmarks/bench_routing.py --gpu [--reps 20] [--out PATH]

``make gpu-check`` runs it. Without a CUDA GPU it exits with a message (nothing to measure: the
CPU always runs eager).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

# One call per route key: what a prompt-tuned model runs most. Training attention: causal GQA,
# forward + the prompt-only backward (the frozen model's q, k, v need no gradient); decode: one
# new token per sequence against a long cache; the GPC cell: one layer's prompt rows, forward +
# backward to the cell's weights.
SETUPS = {
    "prefix_attention": dict(b=4, hq=16, hkv=4, nq=1024, nk=1024, p=64, d=128, causal=True,
                             grad="prefix"),
    "prefix_attention/decode": dict(b=16, hq=32, hkv=8, nq=1, nk=4096, p=64, d=128,
                                    causal=True, grad=None),
    "gpc_cell": dict(b=16, m=64, d=1024, variant="lstm"),
}


def describe(key: str, dtype) -> str:
    s = SETUPS[key]
    if key == "gpc_cell":
        return f"B={s['b']} m={s['m']} d={s['d']} {s['variant']} {dtype}, forward + backward"
    mode = "forward + prompt-only backward" if s["grad"] else "forward"
    return (f"B={s['b']} Hq={s['hq']} Hkv={s['hkv']} Nq={s['nq']} Nk={s['nk']} P={s['p']} "
            f"D={s['d']} {'causal' if s['causal'] else 'non-causal'} {dtype}, {mode}")


def make_call(key: str, backend: str, device, dtype):
    """A zero-argument function that runs the key's call once on ``backend``."""
    import torch

    import ptkernels
    from ptkernels.backends.eager_gpc import num_gates

    s = SETUPS[key]
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, grad=False):
        t = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    if key == "gpc_cell":
        n = num_gates(s["variant"])
        u, st = rand(s["b"], s["m"], s["d"]), rand(s["m"], s["d"])
        w = rand(2 * s["d"], n * s["d"], grad=True)
        bias = rand(n * s["d"], grad=True)
        go = rand(s["b"], s["m"], s["d"])

        def call():
            out = ptkernels.gpc_cell(u, st, w, bias, variant=s["variant"], backend=backend)
            torch.autograd.grad(out, (w, bias), go)
        return call
    q = rand(s["b"], s["hq"], s["nq"], s["d"])
    k, v = rand(s["b"], s["hkv"], s["nk"], s["d"]), rand(s["b"], s["hkv"], s["nk"], s["d"])
    pk = rand(s["hkv"], s["p"], s["d"], grad=bool(s["grad"]))
    pv = rand(s["hkv"], s["p"], s["d"], grad=bool(s["grad"]))
    go = rand(s["b"], s["hq"], s["nq"], s["d"])

    def call():
        out = ptkernels.prefix_attention(q, k, v, pk, pv, causal=s["causal"], backend=backend)
        if s["grad"]:
            torch.autograd.grad(out, (pk, pv), go)
    return call


def time_ms(call, reps: int, warmup: int) -> float:
    """Median CUDA-event time of ``call`` in ms."""
    import torch

    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(keys, backends_of, run_timed) -> tuple[dict, dict]:
    """{key: {backend: ms or None}} and {(key, backend): error} for every key; ``backends_of(key)``
    lists the backends available for it, ``run_timed(key, backend)`` times one (an exception
    there records None and the error: the backend is left out of the route)."""
    timings, errors = {}, {}
    for key in keys:
        timings[key] = {}
        for name in backends_of(key):
            try:
                timings[key][name] = float(run_timed(key, name))
            except Exception as exc:  # noqa: BLE001 - reported, the route skips the backend
                timings[key][name] = None
                errors[(key, name)] = f"{type(exc).__name__}: {exc}"[:300]
    return timings, errors


def render(table: dict, errors: dict) -> str:
    lines = [f"# Backend routing measured on {table['device']}", "",
             f"Generated by `python benchmarks/bench_routing.py --gpu` at {table['created']}; "
             "versions: " + ", ".join(f"{k} {v}" for k, v in sorted(table["versions"].items()))
             + ". Median CUDA-event time per call; `auto` tries the route's backends in order on "
             "this GPU with these versions.", "",
             "| route key | setup | backend | median ms | route |", "|---|---|---|---:|---|"]
    for key, t in table["timings_ms"].items():
        route = " > ".join(table["routes"][key]) or "-"
        for name, ms in t.items():
            cell = f"{ms:.3f}" if ms is not None else "failed: " + errors.get((key, name), "?")
            lines.append(f"| {key} | {table['setup'].get(key, '')} | {name} | {cell} | {route} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="measure on the CUDA GPU (required)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--out", default=None, help="table path (default: where auto reads it)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_routing: no CUDA GPU (torch.cuda.is_available() is False): nothing to "
              "measure, the CPU always runs eager", file=sys.stderr)
        return 1
    sys.path.insert(0, ROOT)
    from ptkernels import backends
    from ptkernels.backends import routing

    device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device)

    def backends_of(key):
        op = key.split("/")[0]
        return [b for b in backends.BACKENDS if backends.availability(b, op, device)[0]]

    def run_timed(key, backend):
        return time_ms(make_call(key, backend, device, dtype), args.reps, args.warmup)

    timings, errors = measure(routing.ROUTE_KEYS, backends_of, run_timed)
    table = routing.build_table(name, timings, {k: describe(k, dtype) for k in timings})
    path = routing.write_table(table, args.out or routing.default_path(name))
    slug = routing.device_slug(name)
    routing.write_table(table, os.path.join(RESULTS, f"routing-{slug}.json"))
    text = render(table, errors)
    md = os.path.join(RESULTS, f"routing-{slug}.md")
    tmp = md + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, md)
    routing.clear_cache()
    print(text)
    print(f"routing table written to {path} (auto reads it); copies in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
