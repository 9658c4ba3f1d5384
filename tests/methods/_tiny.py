"""Helpers for the task-routed method tests (MTL-LoRA, Poly / MHR, C-Poly): tiny models built from
configs (no downloads, dropout off so training mode is deterministic; the token-routed tests' conftest
uses the same builders), method configs, and weight randomisation. Imported explicitly (``from _tiny import ...``); not a conftest."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM)

import method_cases  # noqa: E402

VOCAB = 100
N_TASKS = 3


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one intra-op thread, restored afterwards. Import it into a test module to use it.

    With hidden size 32 threading only adds overhead, and when other processes share the two cores,
    two spinning threads made a 30-step training run 6x slower (4.5 s vs 0.7 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_bert(seed: int = 0, n_layers: int = 2):
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=2, intermediate_size=64,
                     vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertModel(cfg).eval()


def tiny_llama(seed: int = 0, n_layers: int = 2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


BUILDERS = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}

def _variant(spec, overrides):
    return lambda **kw: spec.small_config(**{**overrides, "n_tasks": N_TASKS, **kw})


# Method variants under test: name -> config factory (keyword overrides allowed). Every registered
# task-routed method with a per-task mixture and an unknown-task policy (MTL-LoRA, Poly / MHR, C-Poly;
# per-task LoRA has tests/test_task_lora.py), each of its MethodSpec.test_cases by name.
TASK_MIXTURES = [m for m in method_cases.methods(routing="task") if method_cases.spec(m).unknown_task_field]
VARIANTS = {name: _variant(method_cases.spec(m), overrides)
            for m in TASK_MIXTURES for name, overrides in method_cases.spec(m).test_cases.items()}
MAIN_VARIANTS = TASK_MIXTURES + ["mhr"]  # each method's own case, and MHR


def batch(n: int = 4, seq: int = 7, seed: int = 0, pad: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    if pad:
        mask[0, seq - 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def out(o) -> torch.Tensor:
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def randomise(model, seed: int = 1, scale: float = 0.3) -> None:
    """Random values for every adapter tensor (B = 0 at init would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if model.parameter_role(name) is not None:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def adapter_numel(layer) -> int:
    return sum(p.numel() for n, p in layer.named_parameters() if not n.startswith("base_layer."))


class NoiseQueue:
    """Stand-in for ``torch.rand``: hands out pre-drawn tensors in order (the same sequence to two
    models gives both the same Gumbel noise)."""

    def __init__(self, draws: list[torch.Tensor]):
        self.draws = list(draws)

    def __call__(self, *shape, dtype=None, device=None, **kwargs):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        value = self.draws.pop(0)
        assert tuple(value.shape) == shape, (value.shape, shape)
        return value.to(dtype=dtype or value.dtype, device=device)
