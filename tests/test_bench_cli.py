"""`ptkernels bench` on its tiny setting: the command runs, the paths agree, the files are written."""
from __future__ import annotations

import csv
import os

import torch

from ptkernels import cli
from ptkernels.bench import kernels


def test_bench_paths_agree_with_the_concatenation():
    errs = kernels.check_shapes()
    assert ("tiny-decoder", "ptkernels eager") in errs and ("tiny-bert", "ptkernels eager") in errs
    for key, err in errs.items():
        assert err < 1e-4, (key, err)


def test_bench_cli_tiny_writes_csv_markdown_png(tmp_path, capsys):
    code = cli.main(["bench", "--tiny", "--reps", "2", "--steps", "1", "--no-dropout-variant",
                     "--no-progress", "--device", "cpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    names = sorted(os.listdir(tmp_path))
    assert names == ["bench_cpu_tiny.md", "bench_cpu_tiny.png", "bench_e2e_cpu_tiny.csv",
                     "bench_kernels_cpu_tiny.csv"]
    with open(tmp_path / "bench_kernels_cpu_tiny.csv") as f:
        krows = list(csv.DictReader(f))
    timed = {(r["shape"], r["mode"], r["path"]) for r in krows if r["median_ms"]}
    for shape in kernels.TINY_SHAPES:
        for mode in ("fwd", "fwd+bwd"):
            assert (shape, mode, "concat+mask SDPA") in timed
            assert (shape, mode, "ptkernels eager") in timed
    # a path that cannot run here says why instead of disappearing
    assert all(r["median_ms"] or r["note"] for r in krows)
    with open(tmp_path / "bench_e2e_cpu_tiny.csv") as f:
        erows = list(csv.DictReader(f))
    assert {(r["config"], r["path"]) for r in erows if r["median_ms"]} == {
        (c, p) for c in ("tiny-llama", "tiny-bert") for p in ("unpatched", "peft", "peft+ptkernels", "ptkernels")}
    md = (tmp_path / "bench_cpu_tiny.md").read_text()
    assert "load average" in md and "| tiny-bert | fwd+bwd | ptkernels eager |" in md
    assert (tmp_path / "bench_cpu_tiny.png").read_bytes()[:4] == b"\x89PNG"
    assert "results:" in out
    assert torch.get_num_threads() >= 1


def test_bench_cli_rejects_bad_reps(tmp_path, capsys):
    assert cli.main(["bench", "--reps", "0", "--out", str(tmp_path)]) == 2
    assert "--reps must be >= 1" in capsys.readouterr().err
