"""CPU benchmark: what a P=64 prefix costs in activation memory (training, with and without
gradient checkpointing) and in KV-cache bytes (generation), ptkernels vs PEFT, B=8.

The model: a randomly initialized Llama (4 layers, hidden 256, 8 heads of 32, MLP 688, vocab 1024,
float32, SDPA attention for the unpatched paths), the same weights for every path. The paths:

* ``peft``: ``peft.get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=64))``: the prefix
  enters every layer as a DynamicCache (expanded over the batch, concatenated with the real keys,
  a (B, 1, n, P + n) mask);
* ``ptkernels on peft``: the same PEFT model after ``ptkernels.patch_model(peft_model)``;
* ``ptkernels config``: ``ptkernels.patch_model(model, ptkernels.PrefixTuningConfig(64))``: the
  prefix stays outside the cache, one copy per layer for the whole batch.

Training: one step (forward, causal-LM loss, backward) on B=8 rows of n=128 tokens, with and
without ``gradient_checkpointing_enable(use_reentrant=False)``. Measured:
* saved for backward: the bytes of the distinct tensors autograd keeps from the forward for the
  backward (``torch.autograd.graph.saved_tensors_hooks``; parameters and buffers excluded), i.e.
  the activation memory the forward leaves behind; exact, the same on every run;
* peak heap: the peak live heap growth during the whole step (glibc mallinfo2 sampled after every
  ATen op, as in ``bench_vs_peft_concat.py``), median of the runs;
* time: median wall time of the step.
Generation: greedy ``generate`` of 32 new tokens after the same B=8 x 128-token prompts. Measured:
the bytes of the KV cache ``generate`` returns, the bytes of the prefix the model holds besides
it, and the median wall time.

    python benchmarks/bench_training_serving_memory.py [--reps 5] [--out benchmarks/results/cpu_training_serving_memory.md]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vs_peft_concat import _PeakHeap, cpu_name  # noqa: E402

B, N, P, NEW_TOKENS = 8, 128, 64, 32
MODEL = dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
PATHS = ("peft", "ptkernels on peft", "ptkernels config")


def base_model():
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**MODEL)
    return transformers.LlamaForCausalLM(cfg).float().eval()


def build(path: str, base):
    import peft
    import ptkernels
    model = copy.deepcopy(base)
    if path == "ptkernels config":
        return ptkernels.patch_model(model, ptkernels.PrefixTuningConfig(P))
    torch.manual_seed(1)
    model = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                               num_virtual_tokens=P))
    if path == "ptkernels on peft":
        ptkernels.patch_model(model)
    return model


def inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, MODEL["vocab_size"], (B, N), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(B, N, dtype=torch.long), "labels": ids}


def _storage(t):
    return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()


def saved_for_backward(model, batch) -> int:
    """Bytes of the distinct non-parameter storages autograd saves during one forward."""
    params = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            ptr, size = _storage(t)
            if ptr not in params and ptr:
                seen[ptr] = size
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    total = sum(seen.values())
    loss.backward()
    return total


def train_step(model, batch):
    loss = model(**batch).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None


def peak_heap(fn) -> int:
    with _PeakHeap() as probe:
        fn()
    return probe.peak - probe.base


def training_rows(base, reps):
    rows = []
    batch = inputs()
    for checkpointing in (False, True):
        for path in PATHS:
            model = build(path, base).train()
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            try:
                train_step(model, batch)   # warm-up (lazy initializations)
            except Exception as exc:  # noqa: BLE001 - a path that cannot train is a result too
                reason = str(exc).splitlines()[0][:120]
                rows.append((checkpointing, path, None, None, None, f"{type(exc).__name__}: {reason}"))
                print(f"checkpointing={checkpointing!s:5} {path:18s} fails: {rows[-1][-1]}", flush=True)
                continue
            saved = saved_for_backward(model, batch)
            for p in model.parameters():
                p.grad = None
            peaks, times = [], []
            for _ in range(reps):
                peaks.append(peak_heap(lambda: train_step(model, batch)))
                t0 = time.perf_counter()
                train_step(model, batch)
                times.append(time.perf_counter() - t0)
            rows.append((checkpointing, path, saved, statistics.median(peaks), statistics.median(times), None))
            print(f"checkpointing={checkpointing!s:5} {path:18s} saved {saved / 2**20:7.2f} MiB  "
                  f"peak {rows[-1][3] / 2**20:7.2f} MiB  {rows[-1][4] * 1e3:8.1f} ms", flush=True)
    return rows


def cache_bytes(cache) -> int:
    """Bytes of every key/value tensor a transformers cache holds (DynamicCache or legacy)."""
    inner = getattr(cache, "self_attention_cache", None)
    cache = inner if inner is not None else cache
    if hasattr(cache, "layers"):
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
    else:
        tensors = [t for layer in cache for t in layer]
    return sum(t.numel() * t.element_size() for t in tensors)


def prefix_bytes(model, path) -> int:
    """Bytes of the prefix the model holds outside the cache while generating."""
    if path == "ptkernels config":
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for k, v in model.ptk_prompts.prefix_kv().values())
    return 0   # PEFT writes its prefix into the cache (counted there), once per batch row


def generation_rows(base, reps):
    from ptkernels.integrations.compat import output_cache
    rows = []
    batch = inputs()
    batch.pop("labels")
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
              return_dict_in_generate=True, pad_token_id=0)
    for path in PATHS:
        model = build(path, base).eval()
        with torch.no_grad():
            out = model.generate(**batch, **kw)
            cache = cache_bytes(output_cache(out))
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                model.generate(**batch, **kw)
                times.append(time.perf_counter() - t0)
        rows.append((path, cache, prefix_bytes(model, path), statistics.median(times),
                     out.sequences.shape[1] - N))
        print(f"{path:18s} cache {cache / 2**20:7.2f} MiB  prefix {rows[-1][2] / 2**20:6.2f} MiB  "
              f"{rows[-1][3] * 1e3:8.1f} ms", flush=True)
    return rows


def report(train, gen, reps) -> str:
    import peft
    import transformers

    import ptkernels
    mib = lambda x: f"{x / 2**20:.2f}"  # noqa: E731
    lines = [
        "# CPU: activation memory and KV-cache bytes of a P=64 prefix, ptkernels vs PEFT",
        "",
        f"Generated by `benchmarks/bench_training_serving_memory.py --reps {reps}`.",
        "",
        f"Setup: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, transformers {transformers.__version__}, peft "
        f"{peft.__version__}, ptkernels {ptkernels.__version__}. Model: random Llama, "
        f"{MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
        f"{MODEL['num_attention_heads']} heads of {MODEL['hidden_size'] // MODEL['num_attention_heads']}, "
        f"vocab {MODEL['vocab_size']}, float32. Prefix P={P} (no MLP) on every layer; batch B={B} "
        f"rows of n={N} tokens. Load average at the end of the run: "
        f"{os.getloadavg()[0]:.1f} (a machine shared with other jobs makes the times noisy; the "
        "byte counts do not depend on it).",
        "",
        "## Training step (forward + causal-LM loss + backward)",
        "",
        "| gradient checkpointing | path | saved for backward MiB | peak heap MiB | median ms |",
        "|---|---|---:|---:|---:|",
    ]
    failures = []
    for ckpt, path, saved, peak, t, error in train:
        if error is not None:
            failures.append(f"{path} with checkpointing {'on' if ckpt else 'off'}: `{error}`")
            lines.append(f"| {'on' if ckpt else 'off'} | {path} | fails (see below) | - | - |")
            continue
        lines.append(f"| {'on' if ckpt else 'off'} | {path} | {mib(saved)} | {mib(peak)} | {t * 1e3:.1f} |")
    lines += [
        "",
        "Saved for backward: distinct non-parameter tensors autograd keeps from the forward "
        "(exact; with checkpointing, what the checkpointed forward keeps; recomputation happens "
        f"layer by layer inside backward and shows in the peak). Peak heap: median over {reps} steps "
        "of the peak live-heap growth (glibc mallinfo2 after every ATen op). Time: median over "
        f"{reps} steps.",
        "",
    ]
    if failures:
        lines += ["Failures (the training step raised): " + "; ".join(failures) + ". Under gradient "
                  "checkpointing transformers drops the cache (`use_cache=False`), and with it the "
                  "prefix PEFT passes as a cache.", ""]
    lines += [
        f"## Generation (greedy, {NEW_TOKENS} new tokens after the {N}-token prompts)",
        "",
        "| path | KV cache MiB | prefix outside the cache MiB | total MiB | median ms |",
        "|---|---:|---:|---:|---:|",
    ]
    per_position = (B * MODEL["num_hidden_layers"] * 2 * MODEL["num_key_value_heads"]
                    * (MODEL["hidden_size"] // MODEL["num_attention_heads"]) * 4)
    real_positions = N + NEW_TOKENS - 1      # the last token is sampled, never cached
    for path, cache, prefix, t, new in gen:
        assert new == NEW_TOKENS
        lines.append(f"| {path} | {mib(cache)} | {mib(prefix)} | {mib(cache + prefix)} | {t * 1e3:.1f} |")
    lines.append(f"| prefix in the cache (PEFT's layout; computed, not measured) | "
                 f"{mib(per_position * (real_positions + P))} | 0.00 | "
                 f"{mib(per_position * (real_positions + P))} | - |")
    lines += [
        "",
        "KV cache: bytes of the keys/values in the cache `generate` returns. Prefix outside the "
        "cache: the one (L, Hkv, P, D) copy of keys and values that ptkernels' layers read. "
        f"Time: median of {reps} generate calls. PEFT's design keeps the prefix in the cache "
        f"(P={P} extra positions per row and layer, B copies): the computed row gives that size. "
        "Measured here, the PEFT cache holds only the real tokens: under this transformers "
        "release PEFT's prefix-tuning `generate` does not carry its prefix into the cache (its "
        "generated tokens differ from its own no-cache forward; tests/test_generation.py).",
        "",
        "What this predicts: the memory numbers are properties of the data layout and carry over "
        "to a GPU (the cache saving is B x L x 2 x Hkv x P x D elements); the times are CPU "
        "times and do not predict GPU speed.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "cpu_training_serving_memory.md"))
    args = ap.parse_args(argv)
    base = base_model()
    train = training_rows(base, args.reps)
    gen = generation_rows(base, args.reps)
    text = report(train, gen, args.reps)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
