"""`ptkernels bench`: kernel microbenchmarks (every ptkernels backend available here against SDPA on
the concatenation with a materialized mask, SDPA lower-right causal, FlexAttention, flash-attn)
and end-to-end training steps (ptkernels vs PEFT vs PEFT patched vs unpatched, llama-like and
bert-like, attention dropout off and on), with a progress bar; writes CSV + Markdown + PNG.

All paths of one comparison run interleaved (one repetition of each in turn); the result files
record the machine, its load and the exact setup. On a CUDA device the kernel table also gives
TFLOP/s and the share of the device's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os

DEFAULT_OUT = os.path.join("benchmarks", "results")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--what", choices=("all", "kernels", "e2e"), default="all")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--reps", type=int, default=15, help="repetitions per kernel path (default 15)")
    p.add_argument("--steps", type=int, default=8, help="timed training steps per path (default 8)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and models (a quick check)")
    p.add_argument("--configs", default=None,
                   help="end to end: comma list of configs to run (default: all of llama-like, bert-like)")
    p.add_argument("--label", default="",
                   help="appended to the result file names (to keep several runs side by side)")
    p.add_argument("--no-dropout-variant", action="store_true",
                   help="end to end: attention dropout off only (default: off and 0.1)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default: {DEFAULT_OUT})")
    p.add_argument("--no-progress", action="store_true")


def _fmt(v, spec="{:.2f}"):
    return "-" if v is None else spec.format(v)


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _kernel_md(rows, setup, gpu):
    head = "| shape | mode | path | median ms | quartiles ms | peak MiB | speed-up vs concat+mask |"
    sep = "|---|---|---|---:|---:|---:|---:|"
    if gpu:
        head += " TFLOP/s | % of peak |"
        sep += "---:|---:|"
    lines = [head + " note |", sep + "---|"]
    for r in rows:
        line = (f"| {r['shape']} | {r['mode']} | {r['path']} | {_fmt(r['median_ms'])} | "
                f"{_fmt(r['q1_ms'])}–{_fmt(r['q3_ms'])} | {_fmt(r['peak_mib'], '{:.1f}')} | "
                f"{_fmt(r['speedup'], '{:.2f}x')} |")
        if gpu:
            line += f" {_fmt(r['tflops'], '{:.1f}')} | {_fmt(r['pct_peak'], '{:.0f}%')} |"
        lines.append(line + f" {r['note']} |")
    return lines


def _e2e_md(rows):
    lines = ["| config | attention dropout | path | median ms/step | quartiles ms | peak MiB | "
             "speed-up vs PEFT | memory vs PEFT | trainable | note |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['dropout']} | {r['path']} | {_fmt(r['median_ms'], '{:.1f}')} | "
                     f"{_fmt(r['q1_ms'], '{:.1f}')}–{_fmt(r['q3_ms'], '{:.1f}')} | "
                     f"{_fmt(r['peak_mib'], '{:.1f}')} | {_fmt(r['speedup_vs_peft'], '{:.2f}x')} | "
                     f"{_fmt(r['memory_vs_peft'], '{:.2f}')} | {_fmt(r['trainable'], '{:,}')} | {r['note']} |")
    return lines


def _plot(kernel_rows, e2e_rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = []
    if kernel_rows:
        panels.append(("kernels: speed-up vs concat+mask SDPA", [
            (f"{r['shape']} {r['mode']}\n{r['path']}", r["speedup"]) for r in kernel_rows
            if r["speedup"] is not None]))
    if e2e_rows:
        panels.append(("training step: speed-up vs PEFT", [
            (f"{r['config']} drop {r['dropout']}\n{r['path']}", r["speedup_vs_peft"]) for r in e2e_rows
            if r["speedup_vs_peft"] is not None]))
        panels.append(("training step: peak memory vs PEFT", [
            (f"{r['config']} drop {r['dropout']}\n{r['path']}", r["memory_vs_peft"]) for r in e2e_rows
            if r["memory_vs_peft"] is not None]))
    panels = [p for p in panels if p[1]]
    if not panels:
        return False
    height = max(len(items) for _, items in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 1.5 + 0.36 * height), dpi=100,
                             squeeze=False)
    for ax, (name, items) in zip(axes[0], panels):
        labels = [lab.replace("\n", " · ") for lab, _ in items][::-1]
        vals = [v for _, v in items][::-1]
        colors = ["C7" if abs(v - 1.0) < 1e-9 else "C2" if (v > 1.0) != ("memory" in name) else "C3"
                  for v in vals]
        ax.barh(labels, vals, color=colors)
        ax.axvline(1.0, color="k", linewidth=1)
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.2f}", (v, i), va="center", fontsize=7, xytext=(2, 0),
                        textcoords="offset points")
        ax.set_title(name + (" (lower is better)" if "memory" in name else " (higher is better)"),
                     fontsize=10)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def run(args) -> dict:
    import torch
    from tqdm.auto import tqdm

    from ptkernels.bench import e2e, kernels
    from ptkernels.measure import machine
    for name in ("reps", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    shapes = kernels.TINY_SHAPES if args.tiny else kernels.SHAPES
    configs = e2e.TINY_CONFIGS if args.tiny else e2e.CONFIGS
    if args.configs:
        names = [c.strip() for c in args.configs.split(",") if c.strip()]
        bad = [c for c in names if c not in configs]
        if bad or not names:
            raise ValueError(f"--configs: unknown {bad or names}; choose from {', '.join(configs)}")
        configs = {c: configs[c] for c in names}
    dropouts = (0.0,) if args.no_dropout_variant else (0.0, 0.1)
    do_k, do_e = args.what in ("all", "kernels"), args.what in ("all", "e2e") and not gpu
    total = (len(shapes) * 2 * args.reps if do_k else 0) + (len(configs) * len(dropouts) * args.steps if do_e else 0)
    bar = tqdm(total=total, desc="ptkernels bench", disable=args.no_progress, unit="rep")
    mach = machine(device)
    kernel_rows = kernels.measure(shapes, reps=args.reps, device=device, dtype=dtype, progress=bar) if do_k else []
    e2e_rows = e2e.measure(configs, steps=args.steps, dropouts=dropouts, progress=bar) if do_e else []
    bar.close()
    mach_after = machine(device)
    os.makedirs(args.out, exist_ok=True)
    tag = f"{device.type}{'_tiny' if args.tiny else ''}{'_' + args.label if args.label else ''}"
    base = "bench" if args.what == "all" else f"bench_{args.what}"
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    setup = (f"{mach.get('gpu') or mach['cpu']}, {mach['cpu_count']} CPU cores, torch {mach['torch']} "
             f"({mach['torch_threads']} threads), {str(dtype).replace('torch.', '')}; 1-min load average "
             f"{mach.get('load_average_1min')} before, {mach_after.get('load_average_1min')} after "
             f"(other processes share the machine: the interleaving is what keeps the ratios fair)")
    files = {}
    md = [f"# `ptkernels bench` on {device.type.upper()}", "",
          f"Generated by `ptkernels bench{' --tiny' if args.tiny else ''} --what {args.what} --reps {args.reps} "
          f"--steps {args.steps}{' --configs ' + args.configs if args.configs else ''}"
          f"{' --no-dropout-variant' if args.no_dropout_variant else ''}` at {stamp}.", "",
          f"Setup: {setup}.", ""]
    if kernel_rows:
        files["kernels_csv"] = os.path.join(args.out, f"bench_kernels_{tag}.csv")
        _write_csv(files["kernels_csv"], kernel_rows)
        md += ["## Kernel: one attention layer with a shared prefix", "",
               f"Shapes: {kernels.shape_text(shapes)}. Paths interleaved, {args.reps} repetitions each "
               "after 2 warm-ups; median and quartiles. Peak memory: one separate run (growth above "
               "the inputs). Speed-up = concat+mask time / this path's time.", ""]
        md += _kernel_md(kernel_rows, setup, gpu) + [""]
    if e2e_rows:
        files["e2e_csv"] = os.path.join(args.out, f"bench_e2e_{tag}.csv")
        _write_csv(files["e2e_csv"], e2e_rows)
        md += ["## End to end: one training step (forward, backward, AdamW)", "",
               f"Configs (random init, frozen, prefix-tuning): {e2e.config_text(configs)}. Paths "
               f"interleaved step by step, {args.steps} timed steps each after {e2e.WARMUP} warm-ups; "
               "peak memory of one separate step (live heap growth). `unpatched` trains the input "
               "embeddings instead of a prefix (same backward depth, no prefix).", ""]
        md += _e2e_md(e2e_rows) + [""]
    elif gpu and args.what in ("all", "e2e"):
        md += ["End-to-end steps run on CPU only in this version.", ""]
    files["png"] = os.path.join(args.out, f"{base}_{tag}.png")
    title = (f"ptkernels bench on {mach.get('gpu') or mach['cpu']} ({mach['cpu_count']} cores, "
             f"load average {mach.get('load_average_1min')}), {str(dtype).replace('torch.', '')}")
    if not _plot(kernel_rows, e2e_rows, files["png"], title):
        del files["png"]
    files["md"] = os.path.join(args.out, f"{base}_{tag}.md")
    if "png" in files:
        md += [f"![speed-ups and memory ratios]({os.path.basename(files['png'])})", ""]
    with open(files["md"], "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    print("results: " + ", ".join(files.values()))
    return {"kernels": kernel_rows, "e2e": e2e_rows, "files": files, "machine": mach}
