"""The scripts in examples/ run as a user would run them (a fresh process, from the repository
root) and finish without error; what each one checks about itself is in ``EXPECTED_OUTPUT``."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py"))
# script -> (text its stdout must contain, how many times)
EXPECTED_OUTPUT = {"serve_prefix_bank.py": ("same as serving the row alone: True", 4)}


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs(script):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, os.path.join("examples", script)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    if script in EXPECTED_OUTPUT:
        text, count = EXPECTED_OUTPUT[script]
        assert result.stdout.count(text) == count, result.stdout
