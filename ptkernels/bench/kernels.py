"""Kernel microbenchmarks of ``prefix_attention``: every ptkernels backend available on the device
against what the ecosystem runs for a prefix.

Paths (one attention layer, a prefix (H, P, D) shared by the batch):
* ``concat+mask SDPA``: HF + PEFT today: the prefix expanded over the batch and concatenated in
  front of K/V, a materialized (B, 1, N, P + N) bool mask, ``scaled_dot_product_attention``;
* ``concat SDPA lower-right causal``: the concatenation with SDPA's ``causal_lower_right`` bias
  instead of a mask (causal shapes without padding only; it cannot express padding);
* ``FlexAttention``: ``flex_attention`` on the concatenation with a block mask (prefix visible,
  causal, padding); where it cannot run, the row says why;
* ``flash-attn``: ``flash_attn_func`` on the concatenation (CUDA, installed, causal without padding);
* ``ptkernels <backend>``: ``ptkernels.prefix_attention(..., backend=...)`` for each backend
  ``ptkernels.backends`` reports available for the op on the device (the Triton interpreter is
  not timed: it measures Python, not kernels).

A/B design: the paths run interleaved (one repetition of each in turn, the order rotating), so
machine noise lands on all of them alike; medians and quartiles of the repetitions; peak memory
from one separate run per path (``ptkernels.measure.peak_memory``).
"""
from __future__ import annotations

import importlib.util
import time

import torch

from ptkernels.measure import peak_memory, summary

SHAPES = {
    "decoder": dict(b=4, h=8, n=512, p=64, d=64, causal=True, padding=False),
    "bert-like": dict(b=16, h=12, n=128, p=32, d=64, causal=False, padding=True),
}
TINY_SHAPES = {
    "tiny-decoder": dict(b=2, h=2, n=32, p=4, d=16, causal=True, padding=False),
    "tiny-bert": dict(b=2, h=2, n=16, p=4, d=16, causal=False, padding=True),
}
BASELINE = "concat+mask SDPA"
# Dense bf16 tensor-core peak, TFLOP/s, by device-name fragment (for the "% of peak" column).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
               "L4": 121.0, "RTX 4090": 165.0}


def make_inputs(shape, grad, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, n, p, d = shape["b"], shape["h"], shape["n"], shape["p"], shape["d"]

    def t(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
    mask = torch.ones(b, n, dtype=torch.bool)
    if shape["padding"]:  # right padding of varying length, as a tokenizer batch has
        for i in range(b):
            mask[i, n - (i * n) // (2 * b):] = False
    return dict(q=t(b, h, n, d), k=t(b, h, n, d), v=t(b, h, n, d), prefix_k=t(h, p, d),
                prefix_v=t(h, p, d), mask=mask.to(device))


def _concat(x):
    b = x["q"].shape[0]
    keys = torch.cat([x["prefix_k"].unsqueeze(0).expand(b, -1, -1, -1), x["k"]], 2)
    values = torch.cat([x["prefix_v"].unsqueeze(0).expand(b, -1, -1, -1), x["v"]], 2)
    return keys, values


def concat_mask_sdpa(x, shape):
    q = x["q"]
    b, _, n, _ = q.shape
    p = x["prefix_k"].shape[1]
    keys, values = _concat(x)
    full = torch.ones(b, 1, n, p + n, dtype=torch.bool, device=q.device)
    if shape["causal"]:
        full[..., p:] &= torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    full[..., p:] &= x["mask"].view(b, 1, 1, n)
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=full)


def concat_lower_right(x, shape):
    from torch.nn.attention.bias import causal_lower_right
    keys, values = _concat(x)
    n, nk = x["q"].shape[2], keys.shape[2]
    return torch.nn.functional.scaled_dot_product_attention(
        x["q"], keys, values, attn_mask=causal_lower_right(n, nk))


def flex(x, shape):
    import warnings

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    # eager flex_attention (no torch.compile) is the unfused reference; the row's note says so
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    keys, values = _concat(x)
    b, h, n, _ = x["q"].shape
    p = x["prefix_k"].shape[1]
    pad = x["mask"]
    causal = shape["causal"]

    def mask_mod(bi, hi, qi, ki):
        j = ki - p
        seen = (j <= qi) if causal else (j >= 0) | (j < 0)
        return (ki < p) | (seen & pad[bi, j.clamp(min=0)])
    block = create_block_mask(mask_mod, b, None, n, p + n, device=str(x["q"].device))
    return flex_attention(x["q"], keys, values, block_mask=block)


def flash_attn(x, shape):
    from flash_attn import flash_attn_func
    keys, values = _concat(x)
    out = flash_attn_func(x["q"].transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                          causal=shape["causal"])
    return out.transpose(1, 2)


def _ptkernels(backend):
    def run(x, shape):
        import ptkernels
        return ptkernels.prefix_attention(x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"],
                                          causal=shape["causal"], attention_mask=x["mask"],
                                          backend=backend)
    return run


def paths_for(device: torch.device, shape: dict) -> dict:
    """{name: callable or the reason it cannot run here}."""
    from ptkernels import backends
    paths = {BASELINE: concat_mask_sdpa}
    if shape["causal"] and not shape["padding"]:
        paths["concat SDPA lower-right causal"] = concat_lower_right
    else:
        paths["concat SDPA lower-right causal"] = "not applicable: padding or not causal"
    paths["FlexAttention"] = flex
    if device.type != "cuda":
        paths["flash-attn"] = "needs CUDA"
    elif importlib.util.find_spec("flash_attn") is None:
        paths["flash-attn"] = "not installed"
    elif shape["padding"]:
        paths["flash-attn"] = "not applicable: the dense flash_attn_func has no key padding"
    else:
        paths["flash-attn"] = flash_attn
    for row in backends.describe():
        if row.get("op") != "prefix_attention" or row.get("device") != device.type:
            continue
        for name, status in (row.get("backends") or {}).items():
            label = f"ptkernels {name}"
            if not status.get("available"):
                paths[label] = f"unavailable: {status.get('reason')}"
            elif name == "triton" and device.type != "cuda":
                paths[label] = "not timed: the Triton interpreter on CPU measures Python"
            else:
                paths[label] = _ptkernels(name)
    return paths


def flops(shape, mode) -> float:
    """Matmul FLOPs of one call: 4 B H N (P + visible keys) D forward; backward 2.5x forward."""
    b, h, n, p, d = shape["b"], shape["h"], shape["n"], shape["p"], shape["d"]
    keys = p + ((n + 1) / 2 if shape["causal"] else n)
    fwd = 4.0 * b * h * n * keys * d
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def device_peak_tflops(device: torch.device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for frag, peak in PEAK_TFLOPS.items():
        if frag in name:
            return peak
    return None


def _run_once(fn, x, shape, mode, device):
    if mode == "fwd+bwd":
        for t in ("q", "k", "v", "prefix_k", "prefix_v"):
            x[t].grad = None
        out = fn(x, shape)
        out.backward(torch.ones_like(out))
    else:
        with torch.no_grad():
            fn(x, shape)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(shapes: dict, *, reps: int, device, dtype, modes=("fwd", "fwd+bwd"), progress=None,
            only=None):
    """Rows: dict(shape, mode, path, median_ms, q1_ms, q3_ms, min_ms, max_ms, n, peak_mib,
    speedup, tflops, pct_peak, note)."""
    device = torch.device(device)
    peak = device_peak_tflops(device)
    rows = []
    for shape_name, shape in shapes.items():
        paths = paths_for(device, shape)
        if only is not None:
            paths = {k: v for k, v in paths.items() if k in only or k == BASELINE}
        for mode in modes:
            grad = mode == "fwd+bwd"
            runnable, inputs, notes = {}, {}, {}
            for name, fn in paths.items():
                if isinstance(fn, str):
                    notes[name] = fn
                    continue
                x = make_inputs(shape, grad, device, dtype)
                try:  # two warm-ups (and: can this path run here at all?)
                    for _ in range(2):
                        _run_once(fn, x, shape, mode, device)
                except Exception as err:  # noqa: BLE001  (a path that cannot run is a result)
                    notes[name] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
                    continue
                runnable[name], inputs[name] = fn, x
            times = {name: [] for name in runnable}
            names = list(runnable)
            for r in range(reps):
                k = r % len(names) if names else 0
                for name in names[k:] + names[:k]:   # rotate the order every repetition
                    t0 = time.perf_counter()
                    _run_once(runnable[name], inputs[name], shape, mode, device)
                    times[name].append(time.perf_counter() - t0)
                if progress is not None:
                    progress.update(1)
            base = summary(times[BASELINE])["median"] if BASELINE in times else None
            for name in paths:
                row = dict(shape=shape_name, mode=mode, path=name, median_ms=None, q1_ms=None,
                           q3_ms=None, min_ms=None, max_ms=None, n=0, peak_mib=None, speedup=None,
                           tflops=None, pct_peak=None, note=notes.get(name, ""))
                if name in times:
                    s = summary(times[name])
                    row.update(median_ms=1e3 * s["median"], q1_ms=1e3 * s["q1"], q3_ms=1e3 * s["q3"],
                               min_ms=1e3 * s["min"], max_ms=1e3 * s["max"], n=s["n"])
                    row["speedup"] = base / s["median"] if base else None
                    row["tflops"] = flops(shape, mode) / s["median"] / 1e12
                    row["pct_peak"] = 100 * row["tflops"] / peak if peak else None
                    x = inputs[name]
                    try:
                        mem = peak_memory(lambda: _run_once(runnable[name], x, shape, mode, device),
                                          device)
                    except Exception as err:  # noqa: BLE001  e.g. SDPA's CausalBias subclass
                        mem = None            # cannot run under the CPU probe's dispatch mode
                        row["note"] = f"memory not probed ({type(err).__name__})"
                    row["peak_mib"] = None if mem is None else mem / 2 ** 20
                if name == "FlexAttention" and row["median_ms"] is not None and device.type != "cuda":
                    row["note"] = (row["note"] + "; " if row["note"] else "") + \
                        "eager (uncompiled) FlexAttention: unfused, materializes the scores"
                rows.append(row)
            del inputs
    return rows


def shape_text(shapes: dict) -> str:
    return "; ".join(f"{k}: B={s['b']} H={s['h']} N={s['n']} P={s['p']} D={s['d']} "
                     f"{'causal' if s['causal'] else 'not causal'}{', right padding' if s['padding'] else ''}"
                     for k, s in shapes.items())


def check_shapes():
    """Sanity: every path agrees with the baseline on a tiny input (used by the tests)."""
    out = {}
    for shape_name, shape in TINY_SHAPES.items():
        x = make_inputs(shape, False, torch.device("cpu"), torch.float32)
        ref = concat_mask_sdpa(x, shape)
        for name, fn in paths_for(torch.device("cpu"), shape).items():
            if isinstance(fn, str):
                continue
            try:
                got = fn(x, shape)
            except Exception:  # noqa: BLE001
                continue
            # padded rows: SDPA and the kernels agree on visible keys; compare all rows
            out[(shape_name, name)] = (got - ref).abs().max().item()
    return out


