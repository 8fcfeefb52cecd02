"""benchmarks/lr_sweep_summary.py: the table the demo's default learning rates are chosen from."""
from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    spec = importlib.util.spec_from_file_location(
        "lr_sweep_summary", os.path.join(ROOT, "benchmarks", "lr_sweep_summary.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _report(lr, accs, method="prefix-tuning"):
    setup = {"model_type": "bert", "steps": 10, "batch_size": 4, "max_len": 8,
             "num_virtual_tokens": 2, "optimizer": "AdamW", "seeds": [0, 1, 2], "test_rows": 20,
             "lr": lr}
    summary = [{"method": method, "accuracies": accs, "loss_first_tenth": 1.1,
                "loss_last_tenth": 0.9}]
    if not isinstance(lr, dict):  # a shared-rate report of several methods
        summary.append({"method": "other", "accuracies": [0.9] * 3, "loss_first_tenth": 1.0,
                        "loss_last_tenth": 0.5})
    return {"setup": setup, "majority_accuracy": 0.4, "summary": summary}


def test_rows_sorted_by_rate_filtered_and_counted(tmp_path):
    for name, report in {"lr_1e-2": _report(1e-2, [0.4, 0.41, 0.4]),
                         "lr_3e-4": _report({"prefix-tuning": 3e-4}, [0.6, 0.46, 0.4])}.items():
        os.makedirs(tmp_path / name)
        (tmp_path / name / "report.json").write_text(json.dumps(report))
    mod = _module()
    assert mod.main([str(tmp_path), "--method", "prefix-tuning"]) == 0
    table = (tmp_path / "summary.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| 0")]
    assert [r.split(" | ")[0] for r in rows] == ["| 0.0003", "| 0.01"]
    assert "2 of 3" in rows[0] and "0 of 3" in rows[1]  # above majority + 5 points
    assert "48.7% ± 10.3" in rows[0]
    assert not any("90.0%" in line for line in table)  # the other method is filtered out
