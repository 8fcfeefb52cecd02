"""Prompt methods: prefix-tuning, P-Tuning v2, prompt tuning with the Global Prompt Cell."""
from ptkernels.prompts.bank import check_task_ids, extract_task, insert_task, select_prompts
from ptkernels.prompts.build import build_prompt_module, trainable_head_names
from ptkernels.prompts.configs import GPCConfig, PrefixTuningConfig, PromptTuningConfig, PTuningV2Config
from ptkernels.prompts.gpc import GlobalPromptCell
from ptkernels.prompts.prefix import PrefixEncoder, PrefixPromptModule, kv_to_peft, peft_to_kv
from ptkernels.prompts.prompt_tuning import InputPromptModule
from ptkernels.prompts.report import ParameterReport, model_report, parameter_report
from ptkernels.prompts.spec import ModelSpec, SiteSpec

__all__ = ["ModelSpec", "SiteSpec", "build_prompt_module", "trainable_head_names", "GPCConfig",
           "PrefixTuningConfig", "PromptTuningConfig", "PTuningV2Config", "GlobalPromptCell",
           "PrefixEncoder", "PrefixPromptModule", "InputPromptModule", "kv_to_peft", "peft_to_kv",
           "ParameterReport", "parameter_report", "model_report", "check_task_ids", "select_prompts", "extract_task",
           "insert_task"]
