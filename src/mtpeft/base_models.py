"""Build the base model and tokenizer a run config names: an encoder with one head per task, or a
causal LM. Models come from local folders or the offline asset packages (see mtpeft.assets)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .assets import minilm_path, smollm2_path
from .heads import MultiTaskEncoderClassifier

NAMED_MODELS = {"minilm": minilm_path, "smollm2": smollm2_path}


def model_folder(name: str) -> str:
    return NAMED_MODELS[name]() if name in NAMED_MODELS else name


def model_kind(name: str, kind: str | None) -> str:
    if kind is not None:
        return kind
    if name == "smollm2":
        return "causal"
    if name == "minilm":
        return "encoder"
    config = AutoConfig.from_pretrained(model_folder(name), trust_remote_code=False)
    archs = getattr(config, "architectures", None) or []
    return "causal" if any("CausalLM" in a for a in archs) else "encoder"


def build_base(name: str, kind: str, tasks, seed: int = 0):
    """(model, tokenizer) for the run; ``tasks`` are loaded TaskData (heads need their label counts)."""
    folder = model_folder(name)
    # trust_remote_code=False: a model folder's own Python code (auto_map) is refused with an error,
    # never run; left unset, transformers asks on stdin, and a piped "y" would run it.
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if kind == "encoder":
        not_classification = [t.name for t in tasks if t.kind == "generation"]
        if not_classification:
            raise ValueError(
                f"tasks {not_classification} are free-text tasks; an encoder model scores classes with one "
                f"head per task. Use a causal model (model.name=smollm2) for free-text tasks.")
        encoder = AutoModel.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
        torch.manual_seed(seed)  # the heads' init
        model = MultiTaskEncoderClassifier(encoder, [t.num_labels for t in tasks], [t.name for t in tasks])
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
