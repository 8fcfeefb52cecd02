"""End-to-end training steps: a frozen randomly initialized model (no download) with a trainable
prefix, one forward + backward + AdamW step per measurement.

Paths per config:
* ``unpatched``: the plain model, no prefix, frozen except its input embeddings (and head) so
  that the backward crosses every layer as with a prefix (the floor);
* ``peft``: stock PEFT prefix tuning (the prefix as ``past_key_values``, concatenated per layer);
* ``peft+ptkernels``: the same PEFT model after ``ptkernels.patch_model(peft_model)``;
* ``ptkernels``: ``ptkernels.patch_model(model, PrefixTuningConfig(P))``.

Each config runs with attention dropout off and on (``dropout`` column), interleaved step by step
across the paths (the order rotating) so machine noise lands on all alike; medians and quartiles
of the steps after warm-up; peak memory of one separate step.
"""
from __future__ import annotations

import time

import torch

from ptkernels.measure import peak_memory, summary

CONFIGS = {
    "llama-like": dict(model_type="llama", hidden=512, layers=8, heads=8, b=8, n=512, p=64,
                       task="causal_lm"),
    "bert-like": dict(model_type="bert", hidden=384, layers=6, heads=12, b=32, n=64, p=16,
                      task="seq_cls", padding=True),
}
TINY_CONFIGS = {
    "tiny-llama": dict(model_type="llama", hidden=32, layers=2, heads=4, b=2, n=16, p=4,
                       task="causal_lm"),
    "tiny-bert": dict(model_type="bert", hidden=32, layers=2, heads=4, b=2, n=16, p=4,
                      task="seq_cls", padding=True),
}
PATHS = ("unpatched", "peft", "peft+ptkernels", "ptkernels")
WARMUP = 2


def _model(cfg, dropout: float, seed: int = 0):
    import transformers
    torch.manual_seed(seed)
    h = cfg["hidden"]
    if cfg["model_type"] == "llama":
        conf = transformers.LlamaConfig(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=cfg["layers"],
                                        num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"],
                                        vocab_size=1000, max_position_embeddings=2 * (cfg["n"] + cfg["p"]),
                                        attention_dropout=dropout)
        model = transformers.LlamaForCausalLM(conf)
    else:
        conf = transformers.BertConfig(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=cfg["layers"],
                                       num_attention_heads=cfg["heads"], vocab_size=1000,
                                       max_position_embeddings=2 * (cfg["n"] + cfg["p"]),
                                       attention_probs_dropout_prob=dropout, hidden_dropout_prob=0.0,
                                       num_labels=3)
        model = transformers.BertForSequenceClassification(conf)
    model.config._attn_implementation = "sdpa"
    return model


def _batch(cfg, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, n = cfg["b"], cfg["n"]
    ids = torch.randint(3, 1000, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    if cfg.get("padding"):
        for i in range(b):
            mask[i, n - (i * n) // (2 * b):] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if cfg["task"] == "causal_lm":
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    else:
        batch["labels"] = torch.randint(0, 3, (b,), generator=g)
    return batch


def build(path: str, cfg: dict, dropout: float):
    import peft

    import ptkernels
    model = _model(cfg, dropout)
    task = "CAUSAL_LM" if cfg["task"] == "causal_lm" else "SEQ_CLS"
    if path == "unpatched":
        # no prefix; the input embeddings (and a head) train, so that the backward runs through
        # every layer as it does for a prefix
        emb = model.get_input_embeddings().weight
        for name, p in model.named_parameters():
            p.requires_grad_(p is emb or name.startswith("classifier"))
        return model
    if path == "ptkernels":
        return ptkernels.patch_model(model, ptkernels.PrefixTuningConfig(cfg["p"]))
    pm = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=cfg["p"]))
    from ptkernels.demo.methods import _pass_prefix_cache
    _pass_prefix_cache(pm)   # stock PEFT vs transformers-5 BERT (see there)
    if path == "peft+ptkernels":
        ptkernels.patch_model(pm)
    return pm


def _step(model, opt, batch):
    opt.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    opt.step()


def measure(configs: dict, *, steps: int, dropouts=(0.0, 0.1), paths=PATHS, progress=None):
    rows = []
    for cfg_name, cfg in configs.items():
        batch = _batch(cfg)
        for dropout in dropouts:
            runs, notes = {}, {}
            for path in paths:
                try:
                    model = build(path, cfg, dropout)
                    model.train()
                    params = [p for p in model.parameters() if p.requires_grad]
                    opt = torch.optim.AdamW(params, lr=1e-3)
                    for _ in range(WARMUP):
                        _step(model, opt, batch)
                    runs[path] = (model, opt)
                except Exception as err:  # noqa: BLE001  (a path that cannot run is a result)
                    notes[path] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
            times = {p: [] for p in runs}
            names = list(runs)
            for s in range(steps):
                k = s % len(names) if names else 0
                for path in names[k:] + names[:k]:
                    t0 = time.perf_counter()
                    _step(*runs[path], batch)
                    times[path].append(time.perf_counter() - t0)
                if progress is not None:
                    progress.update(1)
            base = summary(times["peft"])["median"] if "peft" in times else None
            for path in paths:
                row = dict(config=cfg_name, dropout=dropout, path=path, median_ms=None, q1_ms=None,
                           q3_ms=None, n=0, peak_mib=None, speedup_vs_peft=None,
                           memory_vs_peft=None, trainable=None, note=notes.get(path, ""))
                if path in runs:
                    st = summary(times[path])
                    model, opt = runs[path]
                    mem = peak_memory(lambda: _step(model, opt, batch))
                    row.update(median_ms=1e3 * st["median"], q1_ms=1e3 * st["q1"],
                               q3_ms=1e3 * st["q3"], n=st["n"],
                               peak_mib=None if mem is None else mem / 2 ** 20,
                               speedup_vs_peft=base / st["median"] if base else None,
                               trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
                rows.append(row)
            peft_mem = next((r["peak_mib"] for r in rows if r["config"] == cfg_name
                             and r["dropout"] == dropout and r["path"] == "peft"), None)
            for r in rows:
                if (r["config"] == cfg_name and r["dropout"] == dropout and peft_mem
                        and r["peak_mib"] is not None):
                    r["memory_vs_peft"] = r["peak_mib"] / peft_mem
            del runs
    return rows


def config_text(configs: dict) -> str:
    return "; ".join(f"{k}: {c['model_type']} hidden {c['hidden']}, {c['layers']} layers, "
                     f"{c['heads']} heads, B={c['b']} N={c['n']} P={c['p']}"
                     f"{', right padding' if c.get('padding') else ''}" for k, c in configs.items())
