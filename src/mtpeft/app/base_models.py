"""Build the base model and tokenizer a run config names, in one of three kinds:

* ``encoder``: an encoder (BERT, MiniLM) with one classification head per task;
* ``causal``: a decoder-only LM (GPT-2, Llama, SmolLM2) on chat-formatted prompts, loss on the answer;
* ``seq2seq``: an encoder-decoder LM (T5, BART): the prompt goes to the encoder, the answer is the
  decoder's target.

Models come from local folders or the offline asset packages (see mtpeft.app.assets). A folder's kind is
read from its ``config.json`` (:func:`kind_from_config`); ``model.kind`` in the run config overrides it.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
from transformers.models.auto import modeling_auto

from .assets import minilm_path, smollm2_path
from ..lib.heads import MultiTaskEncoderClassifier

KINDS = ("encoder", "causal", "seq2seq")
NAMED_MODELS = {"minilm": minilm_path, "smollm2": smollm2_path}
NAMED_KINDS = {"minilm": "encoder", "smollm2": "causal"}

# What loads the bare base model of each kind, and the PEFT task type of an adapter on it: what an
# exported adapter names so that peft.AutoPeftModel* rebuilds the same model (the encoder's per-task
# heads are mtpeft's own, so it has no stock task type).
AUTO_CLASS = {"encoder": AutoModel, "causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM}
PEFT_TASK_TYPE = {"encoder": None, "causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}


def model_folder(name: str) -> str:
    return NAMED_MODELS[name]() if name in NAMED_MODELS else name


def _class_names(mapping) -> set[str]:
    """The class names of a transformers ``*_MAPPING_NAMES`` table (a value may be a tuple of names)."""
    names = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (tuple, list)) else (value,))
    return names


_CAUSAL_LM = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
_SEQ2SEQ_LM = modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
_MASKED_LM = modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
# A bare backbone or a classifier says nothing about attention direction by its class name alone
# (GPT2Model, LlamaForSequenceClassification are decoders): it is an encoder when its family has a
# masked-LM head (BERT, RoBERTa, ...), i.e. was trained bidirectionally.
_CAUSAL_LM_CLASSES, _SEQ2SEQ_LM_CLASSES, _MASKED_LM_CLASSES = map(_class_names, (_CAUSAL_LM, _SEQ2SEQ_LM, _MASKED_LM))
_BACKBONE_OR_CLASSIFIER = (_class_names(modeling_auto.MODEL_MAPPING_NAMES)
                           | _class_names(modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
                           | _class_names(modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES))


def _kind_of_architecture(arch: str, model_type: str | None, encoder_decoder: bool) -> str | None:
    if arch in _CAUSAL_LM_CLASSES:
        return "causal"  # *ForCausalLM, GPT2LMHeadModel, ...
    if arch in _SEQ2SEQ_LM_CLASSES:
        return "seq2seq"  # T5ForConditionalGeneration, BartForConditionalGeneration, ...
    if encoder_decoder:
        return None  # T5Model, T5EncoderModel, BartForSequenceClassification: no kind of ours loads them as saved
    if arch in _MASKED_LM_CLASSES:
        return "encoder"
    if arch in _BACKBONE_OR_CLASSIFIER and model_type in _MASKED_LM:
        return "encoder"
    return None


def kind_from_config(config) -> str | None:
    """The model kind a transformers config describes, or None when it cannot be told.

    From ``architectures`` (the class the checkpoint was saved from), in transformers' own tables: a
    causal-LM class (``*ForCausalLM``, ``GPT2LMHeadModel``) is ``causal``; a sequence-to-sequence LM
    (``T5ForConditionalGeneration``, ``BartForConditionalGeneration``) is ``seq2seq``; a masked LM, or
    a backbone / classifier of a family that has one (``BertModel``, ``RobertaForSequenceClassification``),
    is ``encoder``. A config without ``architectures`` is judged by its ``model_type`` the same way.
    """
    model_type = getattr(config, "model_type", None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        kinds = {_kind_of_architecture(a, model_type, encoder_decoder) for a in archs} - {None}
        return kinds.pop() if len(kinds) == 1 else None  # several different kinds: not ours to pick
    if encoder_decoder:
        return "seq2seq" if model_type in _SEQ2SEQ_LM else None
    if model_type in _MASKED_LM:  # before causal: BERT also has a causal-LM head class
        return "encoder"
    return "causal" if model_type in _CAUSAL_LM else None


def _load_config(name: str):
    return AutoConfig.from_pretrained(model_folder(name), trust_remote_code=False)


def model_kind(name: str, kind: str | None) -> str:
    """``kind`` when given (``model.kind``), else the named model's, else read from the folder's config."""
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"model.kind must be one of {KINDS}, got {kind!r}.")
        return kind
    if name in NAMED_KINDS:
        return NAMED_KINDS[name]
    config = _load_config(name)
    found = kind_from_config(config)
    if found is None:
        raise ValueError(
            f"cannot tell which kind of model {name} is (architectures "
            f"{getattr(config, 'architectures', None)}, model_type {getattr(config, 'model_type', None)!r}); "
            f"set model.kind to 'encoder' (classification heads on the encoder), 'causal' (a decoder-only LM) "
            f"or 'seq2seq' (an encoder-decoder LM).")
    return found


def check_kind_fits(name: str, kind: str, config) -> None:
    """Refuse a ``model.kind`` its model cannot be loaded as, before anything is built."""
    model_type = getattr(config, "model_type", None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if kind == "encoder" and encoder_decoder:
        raise ValueError(f"model.kind=encoder, but {name} is an encoder-decoder model ({model_type}); "
                         f"use model.kind: seq2seq (or leave model.kind unset).")
    if kind == "causal" and model_type not in _CAUSAL_LM:
        hint = "use model.kind: seq2seq, or leave model.kind unset" if encoder_decoder else "set model.kind to its kind"
        raise ValueError(f"model.kind=causal, but {name} ({model_type}) has no causal-LM class in "
                         f"transformers (AutoModelForCausalLM cannot load it): {hint}.")
    if kind == "seq2seq" and not (encoder_decoder and model_type in _SEQ2SEQ_LM):
        raise ValueError(f"model.kind=seq2seq, but {name} ({model_type}) is not an encoder-decoder LM "
                         f"(AutoModelForSeq2SeqLM cannot load it); leave model.kind unset to infer it.")


def build_base(name: str, kind: str, tasks, seed: int = 0):
    """(model, tokenizer) for the run; ``tasks`` are loaded TaskData (heads need their label counts)."""
    if kind not in KINDS:
        raise ValueError(f"model.kind must be one of {KINDS}, got {kind!r}.")
    folder = model_folder(name)
    if name not in NAMED_KINDS:
        check_kind_fits(name, kind, _load_config(name))
    # trust_remote_code=False: a model folder's own Python code (auto_map) is refused with an error,
    # never run; left unset, transformers asks on stdin, and a piped "y" would run it.
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if kind == "encoder":
        not_classification = [t.name for t in tasks if t.kind == "generation"]
        if not_classification:
            raise ValueError(
                f"tasks {not_classification} are free-text tasks; an encoder model scores classes with one "
                f"head per task. Use a causal model (model.name=smollm2) or a seq2seq model (a T5 folder) "
                f"for free-text tasks.")
        encoder = AutoModel.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
        torch.manual_seed(seed)  # the heads' init
        model = MultiTaskEncoderClassifier(encoder, [t.num_labels for t in tasks], [t.name for t in tasks])
        return model.eval(), tokenizer
    if kind == "causal" and getattr(tokenizer, "chat_template", None) is None:
        # Checked here, before the run folder exists: the prompts are chat turns (mtpeft.app.data.collate).
        raise ValueError(
            f"{name}'s tokenizer has no chat_template, which a causal run formats its prompts with. Save one "
            f"with the model: tokenizer.chat_template = '<Jinja template>'; tokenizer.save_pretrained(folder).")
    model = AUTO_CLASS[kind].from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
