"""A patched model on the Triton backend (TRITON_INTERPRET=1 on CPU, set by conftest) gives the
eager backend's logits and prompt gradients: a few small cases (the interpreter is slow)."""
import peft
import pytest
import torch

import ptkernels
import tiny_models as tm
from ptkernels.integrations import patch_model

TASK_TYPE = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}


def _run(model_type, backend, make_model):
    model = make_model()
    patch_model(model, backend=backend)
    task = tm.default_task(model_type)
    batch = tm.batch(model_type, b=2, n=5, pad="left" if task == "causal_lm" else "right")
    if task == "seq_cls":
        batch["labels"] = torch.tensor([0, 2])
    elif task == "seq2seq":
        batch["labels"] = batch.pop("decoder_input_ids")
    else:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch)
    out.loss.backward()
    logits = out.logits
    if task == "causal_lm":
        logits = logits[batch["attention_mask"].bool()]
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("model_type", ["llama", "bert", "t5"])
def test_peft_prefix_triton_equals_eager(model_type):
    assert ptkernels.backends.availability("triton", "prefix_attention", torch.device("cpu"))[0]
    task = tm.default_task(model_type)

    def make():
        torch.manual_seed(0)
        return peft.get_peft_model(tm.make(model_type), peft.PrefixTuningConfig(
            task_type=TASK_TYPE[task], num_virtual_tokens=3))
    ref_logits, ref_grads = _run(model_type, "eager", make)
    logits, grads = _run(model_type, "triton", make)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)
