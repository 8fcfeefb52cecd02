"""ptkernels: fast prefix-tuning, P-Tuning v2 and Global-Prompt-Cell prompt tuning kernels."""
from __future__ import annotations

import torch

__version__ = "0.1.0"

try:  # the compiled extension registers CUDA kernels for torch.ops.ptkernels.*_cuda when built with them
    from ptkernels import _C  # noqa: F401
    HAS_EXTENSION = True
except ImportError:
    HAS_EXTENSION = False

from ptkernels.backends import BackendUnavailableError  # noqa: E402
from ptkernels.ops import gpc_cell, prefix_attention  # noqa: E402

# After the ops: they define the kernel entries (ptkernels::<op>_cuda) that _C registers kernels for.
HAS_CUDA_KERNELS = HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(
    "ptkernels::prefix_attention_fwd_cuda", "CUDA")
from ptkernels.integrations import load_prompts, patch_model, save_prompts, unpatch_model  # noqa: E402
from ptkernels.prompts.configs import (GPCConfig, PrefixTuningConfig,  # noqa: E402
                                       PromptTuningConfig, PTuningV2Config)

__all__ = ["prefix_attention", "gpc_cell", "patch_model", "unpatch_model", "save_prompts",
           "load_prompts", "PrefixTuningConfig", "PTuningV2Config", "PromptTuningConfig",
           "GPCConfig", "BackendUnavailableError", "HAS_EXTENSION", "HAS_CUDA_KERNELS",
           "__version__"]
