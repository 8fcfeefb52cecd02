"""Model integrations: transformers (``patch_model``), PEFT interop and adapter files."""
from ptkernels.integrations.adapters import load_prompts, save_prompts
from ptkernels.integrations.patch import patch_model, unpatch_model

__all__ = ["patch_model", "unpatch_model", "save_prompts", "load_prompts"]
