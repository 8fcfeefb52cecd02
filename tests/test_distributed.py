"""Data-parallel training of a patched model on real processes over gloo (no mocks): DDP, FSDP2
(``fully_shard``) and the HF Trainer under ``torchrun`` reproduce a single process after 3 AdamW
steps. The workers live in ``distributed_workers.py``; each run has a hard deadline and every
process it started is killed on failure."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import distributed_workers as dw

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

DEADLINE_S = 240
WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_workers.py")


def _spawn(fn, tmp_path):
    """Run ``fn(rank, world, init_file, out_dir)`` on ``dw.WORLD`` spawned processes."""
    init_file = tmp_path / "rendezvous"
    ctx = mp.start_processes(fn, args=(dw.WORLD, str(init_file), str(tmp_path)), nprocs=dw.WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"{fn.__name__} did not finish within {DEADLINE_S} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def _assert_same(got: dict, expected: dict, what: str, tol=1e-5):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=tol, atol=tol,
                                   msg=lambda m: f"{what}, {name}: {m}")


@pytest.fixture(scope="module")
def single_process():
    return dw.train_single()


def test_prompts_moved(single_process):
    """The comparison below means something: 3 steps move every prompt parameter."""
    fresh = dw.prompt_state(dw.patched_model())
    for name, value in single_process.items():
        assert (value - fresh[name]).abs().max() > 1e-3, f"{name} did not train"


@pytest.fixture(scope="module")
def data_parallel_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("data_parallel")
    _spawn(dw.data_parallel_worker, out)
    return out


@pytest.mark.parametrize("name", ["ddp", "fsdp"], ids=["ddp", "fsdp2"])
def test_data_parallel_equals_single_process(name, single_process, data_parallel_runs):
    _assert_same(torch.load(data_parallel_runs / f"{name}.pt"), single_process, name)


def _run(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    # A new session: on timeout the whole process tree (torchrun and its workers) is killed.
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish within {DEADLINE_S} s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-4000:]}"


def test_trainer_torchrun_two_processes_equals_one(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _run([sys.executable, WORKERS, "trainer", str(one)], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
          f"--nproc-per-node={dw.WORLD}", WORKERS, "trainer", str(two)], tmp_path)
    expected = torch.load(one)
    fresh = dw.prompt_state(dw.patched_model())
    assert all((expected[n] - fresh[n]).abs().max() > 1e-3 for n in fresh), "Trainer did not train"
    _assert_same(torch.load(two), expected, "Trainer on 2 processes")
