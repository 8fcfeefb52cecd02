"""The README's benchmark numbers are exactly the committed result files (never typed by hand)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import render_readme  # noqa: E402


def test_readme_block_matches_result_files():
    with open(render_readme.README) as f:
        text = f.read()
    assert render_readme.updated_readme(text) == text, \
        "README.md's results block differs from benchmarks/results/: run benchmarks/render_readme.py"


def test_every_shown_number_comes_from_a_file():
    block = render_readme.render()
    shown = [n for n in render_readme.SHOWN if os.path.exists(os.path.join(render_readme.RESULTS, n))]
    assert shown, "no result file is shown in the README"
    for name in shown:
        assert f"benchmarks/results/{name}" in block
