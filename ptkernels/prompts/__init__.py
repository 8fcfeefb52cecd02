"""Prompt methods: prefix-tuning, P-Tuning v2, prompt tuning with the Global Prompt Cell."""
from ptkernels.prompts.spec import ModelSpec, SiteSpec

__all__ = ["ModelSpec", "SiteSpec"]
