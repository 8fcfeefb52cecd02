"""Serve many tasks from one frozen model: a bank of task prefixes, one mixed batch, generate.

One copy of the base model's weights serves every task; each task is only its prefix (a few
thousand numbers per layer). Each row of a batch names its task with ``task_ids``; the prefix is
applied inside attention, outside the KV cache, so the cache holds only real tokens.

    python examples/serve_prefix_bank.py

Runs on CPU in a few seconds with a tiny random Llama (no download). With a real checkpoint, use
``AutoModelForCausalLM.from_pretrained(name)`` and restore trained prompts with
``ptkernels.load_prompts``.
"""
from __future__ import annotations

import torch
import transformers

import ptkernels


def build_model(num_tasks: int = 3):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    ptkernels.patch_model(model, ptkernels.PrefixTuningConfig(num_virtual_tokens=8,
                                                              num_tasks=num_tasks))
    with torch.no_grad():   # stand-in for trained prefixes: every task its own
        for p in model.ptk_prompts.parameters():
            p.normal_(std=2.0)
    return model


def serve(model, prompts: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor,
          new_tokens: int = 6) -> torch.Tensor:
    """Greedy continuation of each row with its own task's prefix: (B, n + new_tokens)."""
    with torch.no_grad():
        return model.generate(input_ids=prompts, attention_mask=mask, task_ids=task_ids,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)


def main():
    model = build_model()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, 96, (4, 5), generator=g)
    mask = torch.ones_like(prompts)
    prompts[1, :2], mask[1, :2] = 0, 0          # a left-padded row
    task_ids = torch.tensor([0, 2, 1, 2])        # one mixed batch, three tasks
    out = serve(model, prompts, mask, task_ids)
    for row, task in enumerate(task_ids.tolist()):
        alone = serve(model, prompts[row:row + 1], mask[row:row + 1], task_ids[row:row + 1])
        same = torch.equal(alone[0], out[row])
        print(f"row {row} task {task}: {out[row, prompts.shape[1]:].tolist()}"
              f"  (same as serving the row alone: {same})")
        if not same:
            raise SystemExit(f"row {row}: the mixed batch and the row alone disagree")
    report = ptkernels.prompts.model_report(model)
    print(f"{report.prompt_parameters} prompt parameters for {model.ptk_prompts.num_tasks} tasks on "
          f"{report.base_parameters} frozen base parameters")


if __name__ == "__main__":
    main()
