"""Tiny random-config transformers models for the integration tests (no downloads).

Every factory builds a 2-layer model with vocab 96 and hidden 32 in float32, eager attention,
dropout off; GQA where the architecture has it. ``make(model_type, task)`` is the entry point;
``task`` is "causal_lm", "seq_cls" or "seq2seq" (the AutoModel class picked accordingly).
"""
from __future__ import annotations

import torch
import transformers

from ptkernels.integrations.architectures import of_family

VOCAB = 96
PAD = 0

_COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)

_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON, **_LLAMA_LIKE),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, **_LLAMA_LIKE, sliding_window=64),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, **_LLAMA_LIKE),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, **_LLAMA_LIKE, head_dim=16),
    "gemma2": lambda: transformers.Gemma2Config(**_COMMON, **_LLAMA_LIKE, head_dim=8,
                                                sliding_window=64, query_pre_attn_scalar=8,
                                                attn_logit_softcapping=30.0),
    "phi3": lambda: transformers.Phi3Config(**_COMMON, **_LLAMA_LIKE, resid_pdrop=0.0,
                                            embd_pdrop=0.0),
    "gpt2": lambda: transformers.GPT2Config(**_COMMON, n_embd=32, n_layer=2, n_head=4,
                                            n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                                            attn_pdrop=0.0),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**_COMMON, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=48,
                                                   max_position_embeddings=128,
                                                   attention_dropout=0.0, hidden_dropout=0.0),
    "opt": lambda: transformers.OPTConfig(**_COMMON, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, ffn_dim=48, word_embed_proj_dim=32,
                                          max_position_embeddings=128, dropout=0.0,
                                          attention_dropout=0.0),
    "bert": lambda: transformers.BertConfig(**_COMMON, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=48,
                                            max_position_embeddings=128,
                                            hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0),
    "roberta": lambda: transformers.RobertaConfig(**dict(_COMMON, pad_token_id=1, bos_token_id=0),
                                                  hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=48,
                                                  max_position_embeddings=130,
                                                  hidden_dropout_prob=0.0,
                                                  attention_probs_dropout_prob=0.0),
    "xlm-roberta": lambda: transformers.XLMRobertaConfig(
        **dict(_COMMON, pad_token_id=1, bos_token_id=0), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=48, max_position_embeddings=130,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "t5": lambda: transformers.T5Config(**_COMMON, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                        num_decoder_layers=2, num_heads=4, dropout_rate=0.0,
                                        decoder_start_token_id=PAD,
                                        relative_attention_num_buckets=8),
    "bart": lambda: transformers.BartConfig(**_COMMON, d_model=32, encoder_layers=2,
                                            decoder_layers=2, encoder_attention_heads=4,
                                            decoder_attention_heads=4, encoder_ffn_dim=48,
                                            decoder_ffn_dim=48, max_position_embeddings=128,
                                            dropout=0.0, attention_dropout=0.0,
                                            activation_dropout=0.0, decoder_start_token_id=2,
                                            forced_eos_token_id=None),
    "deberta-v2": lambda: transformers.DebertaV2Config(**_COMMON, hidden_size=32,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=48,
                                                       max_position_embeddings=128,
                                                       hidden_dropout_prob=0.0,
                                                       attention_probs_dropout_prob=0.0,
                                                       relative_attention=True,
                                                       pos_att_type=["p2c", "c2p"],
                                                       position_buckets=16),
}

# The architecture lists come from ptkernels' registry; every registered model type needs a tiny
# config above (tests/test_integration_registry.py checks both ways).
DECODERS = of_family("decoder")
ENCODERS = of_family("encoder")
SEQ2SEQ = of_family("seq2seq")
ALL = DECODERS + ENCODERS + SEQ2SEQ


def config(model_type: str, **overrides):
    cfg = CONFIGS[model_type]()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def default_task(model_type: str) -> str:
    if model_type in DECODERS:
        return "causal_lm"
    if model_type in SEQ2SEQ:
        return "seq2seq"
    return "seq_cls"


def make(model_type: str, task: str | None = None, *, seed: int = 0, attn="eager", **overrides):
    """A tiny random model of ``model_type`` for ``task`` (default: its natural task), eval mode."""
    task = task or default_task(model_type)
    cfg = config(model_type, **overrides)
    if task == "seq_cls":
        cfg.num_labels = 3
    auto = {"causal_lm": transformers.AutoModelForCausalLM,
            "seq_cls": transformers.AutoModelForSequenceClassification,
            "token_cls": transformers.AutoModelForTokenClassification,
            "seq2seq": transformers.AutoModelForSeq2SeqLM,
            "base": transformers.AutoModel}[task]
    torch.manual_seed(seed)
    model = auto.from_config(cfg, attn_implementation=attn)
    return model.float().eval()


def batch(model_type: str, *, b: int = 3, n: int = 7, pad: str = "left", seed: int = 1):
    """Random inputs: ``input_ids`` (b, n) and ``attention_mask`` with 2 padded tokens on row 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    if pad == "left":
        mask[0, :2] = 0
    elif pad == "right":
        mask[0, -2:] = 0
    pad_id = CONFIGS[model_type]().pad_token_id
    ids = ids.masked_fill(mask == 0, pad_id)
    out = {"input_ids": ids, "attention_mask": mask}
    if model_type in SEQ2SEQ:
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (b, 5), generator=g)
    return out


# PEFT's task_type for each task of make().
PEFT_TASK_TYPE = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}


def labelled_batch(model_type: str, task: str | None = None, *, pad: str = "left", **kw):
    """``batch(model_type)`` plus labels for ``task``: class ids, decoder targets, or the inputs
    themselves with padded positions ignored (-100)."""
    task = task or default_task(model_type)
    out = batch(model_type, pad=pad, **kw)
    if task == "seq_cls":
        out["labels"] = torch.tensor([0, 2, 1])[:out["input_ids"].shape[0]]
    elif task == "seq2seq":
        out["labels"] = out.pop("decoder_input_ids")
    else:
        out["labels"] = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
    return out
