"""Tiny random models built from configs (no downloads) for fast tests: GPT-2 (Conv1D), Llama,
BERT and T5, each with 2 layers and hidden size 32."""

from __future__ import annotations

import torch
from transformers import (BertConfig, BertForSequenceClassification, BertModel, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration)

VOCAB = 96


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0, n_layers: int = 2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0, classifier: bool = False, n_layers: int = 2):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return (BertForSequenceClassification(cfg) if classifier else BertModel(cfg)).eval()


def tiny_t5(seed: int = 0):
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert, "t5": tiny_t5}


def batch_for(name: str, batch: int = 4, seq: int = 8, seed: int = 0) -> dict:
    """A batch of inputs that the named tiny model accepts, with some right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 2:] = 0  # one padded example
    out = {"input_ids": ids, "attention_mask": mask}
    if name == "t5":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return out


def main_output(out) -> torch.Tensor:
    """The tensor a test compares: logits, or the encoder's last hidden state."""
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
