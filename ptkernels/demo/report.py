"""The demo's outputs: the summary rows, the printed table, the JSON report and the two PNG plots
(loss curves; step time and peak memory side by side)."""
from __future__ import annotations

import json
import os
from collections import defaultdict

from ptkernels.measure import mean_std

MIB = 2 ** 20


def summarize(runs: list[dict], majority: float) -> list[dict]:
    """One row per (method, engine): accuracy mean and spread over seeds, step-time median (of all
    seeds' post-warm-up steps pooled), peak memory, trainable parameters, first/last loss."""
    groups = defaultdict(list)
    for r in runs:
        groups[(r["method"], r["engine"])].append(r)
    rows = []
    for (method, engine), rs in groups.items():
        accs = [r["test_accuracy"] for r in rs]
        acc_mean, acc_std = mean_std(accs)
        medians = sorted(r["step_time"]["median"] for r in rs)
        mems = [r["peak_memory_bytes"] for r in rs if r["peak_memory_bytes"] is not None]
        tail = max(1, len(rs[0]["losses"]) // 10)
        rows.append({
            "method": method, "engine": engine, "seeds": [r["seed"] for r in rs],
            "accuracy_mean": acc_mean, "accuracy_std": acc_std, "accuracies": accs,
            "gain_over_majority": acc_mean - majority,
            "step_time_median_s": medians[len(medians) // 2],
            "step_time_q1_s": min(r["step_time"]["q1"] for r in rs),
            "step_time_q3_s": max(r["step_time"]["q3"] for r in rs),
            "peak_memory_mib": (max(mems) / MIB) if mems else None,
            "trainable_parameters": rs[0]["trainable_parameters"],
            "loss_first_tenth": mean_std([sum(r["losses"][:tail]) / tail for r in rs])[0],
            "loss_last_tenth": mean_std([sum(r["losses"][-tail:]) / tail for r in rs])[0],
        })
    return rows


def table(rows: list[dict], majority: float) -> str:
    head = ["method", "engine", "test acc", "vs majority", "step ms (median)", "peak MiB",
            "trainable params"]
    lines = [head]
    for r in rows:
        n = len(r["seeds"])
        acc = f"{100 * r['accuracy_mean']:.1f}%" + (f" ± {100 * r['accuracy_std']:.1f} (n={n})" if n > 1 else "")
        mem = "-" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
        lines.append([r["method"], r["engine"], acc, f"{100 * r['gain_over_majority']:+.1f} pts",
                      f"{1e3 * r['step_time_median_s']:.0f}", mem, f"{r['trainable_parameters']:,}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append(f"majority-class baseline: {100 * majority:.1f}%")
    return "\n".join(out)


def _label(row_or_run) -> str:
    return f"{row_or_run['method']} ({row_or_run['engine']})"


def _smooth(values, window):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_losses(runs: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = defaultdict(list)
    for r in runs:
        groups[_label(r)].append(r["losses"])
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    steps = len(next(iter(groups.values()))[0])
    window = max(1, steps // 15)
    for label, curves in groups.items():
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(steps)]
        line, = ax.plot(range(1, steps + 1), _smooth(mean, window), label=label, linewidth=2)
        if len(curves) > 1:
            lo = _smooth([min(c[i] for c in curves) for i in range(steps)], window)
            hi = _smooth([max(c[i] for c in curves) for i in range(steps)], window)
            ax.fill_between(range(1, steps + 1), lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"training loss (moving average of {window} steps)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_costs(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [_label(r).replace(" (", "\n(") for r in rows]
    colors = [f"C{i}" for i in range(len(rows))]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(rows) + 2), 4.5), dpi=110)
    ms = [1e3 * r["step_time_median_s"] for r in rows]
    err = [[1e3 * (r["step_time_median_s"] - r["step_time_q1_s"]) for r in rows],
           [1e3 * (r["step_time_q3_s"] - r["step_time_median_s"]) for r in rows]]
    ax_t.bar(labels, ms, yerr=err, capsize=4, color=colors)
    ax_t.set_ylabel("ms per training step (median, bars: quartiles)")
    ax_t.set_title("step time (lower is better)")
    mem = [r["peak_memory_mib"] or 0.0 for r in rows]
    ax_m.bar(labels, mem, color=colors)
    ax_m.set_ylabel("MiB above the loaded model (one step)")
    ax_m.set_title("peak training memory (lower is better)")
    for ax, vals, fmt in ((ax_t, ms, "{:.0f} ms"), (ax_m, mem, "{:.0f} MiB")):
        for i, v in enumerate(vals):
            ax.annotate(fmt.format(v), (i, v), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(report: dict, out_dir: str, *, plots: bool = True) -> dict:
    """Write report.json (+ loss_curves.png, step_time_memory.png) into ``out_dir``; returns the
    paths written."""
    os.makedirs(out_dir, exist_ok=True)
    files = {"json": os.path.join(out_dir, "report.json")}
    if plots and report["runs"]:
        setup = report["setup"]
        title = (f"{setup['model_type']} · {setup['steps']} steps · batch {setup['batch_size']} · "
                 f"{setup['num_virtual_tokens']} virtual tokens")
        files["loss_png"] = os.path.join(out_dir, "loss_curves.png")
        plot_losses(report["runs"], files["loss_png"], "training loss: " + title)
        files["cost_png"] = os.path.join(out_dir, "step_time_memory.png")
        plot_costs(report["summary"], files["cost_png"], title)
    report["files"] = files
    with open(files["json"], "w") as f:
        json.dump(report, f, indent=1)
    return files
