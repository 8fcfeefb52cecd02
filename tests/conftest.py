"""Shared pytest configuration: the Triton interpreter on machines without CUDA, and the markers.

Keep this file small; fixtures for one area belong in that area's test modules.
"""

import os

import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is visible. It must be switched
# on before any @triton.jit decorator runs, i.e. before a test module imports ptkernels' Triton kernels;
# conftest.py is imported first. An explicit TRITON_INTERPRET in the environment wins.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # property tests: no per-example deadline (the interpreter and a 2-core CI are slow and noisy)
    from hypothesis import settings

    settings.register_profile("ptkernels", deadline=None, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ptkernels"))
except ImportError:
    pass


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one (run them with `make gpu-check`)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on the 2-core CI machine")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    import pytest

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
