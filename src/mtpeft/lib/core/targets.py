"""Which modules of a model to adapt: PEFT's matching rules, plus per-architecture defaults."""

from __future__ import annotations

import re

from torch import nn

from .layer import SUPPORTED_BASE_LAYERS

# Default targets per architecture (config.model_type) and role, as full-match regexes.
# Why regexes: BERT's MLP output is "<i>.output.dense" while its attention output is
# "<i>.attention.output.dense"; a suffix rule cannot tell them apart.
_LLAMA_LIKE = {
    "attention_qv": r".*\.(q_proj|v_proj)",
    "attention_all": r".*\.(q_proj|k_proj|v_proj|o_proj)",
    "mlp": r".*\.(gate_proj|up_proj|down_proj)",
}
DEFAULT_TARGETS: dict[str, dict[str, str]] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                                "olmo", "olmo2", "smollm3", "granite", "stablelm")},
    # Mixtral's experts are one fused 3-D parameter per block, not Linear layers: no "mlp" default.
    "mixtral": {k: v for k, v in _LLAMA_LIKE.items() if k != "mlp"},
    "phi3": {  # fused q, k, v (and gate, up): as GPT-2's c_attn, one layer holds q and v
        "attention_qv": r".*\.self_attn\.qkv_proj",
        "attention_all": r".*\.self_attn\.(qkv_proj|o_proj)",
        "mlp": r".*\.mlp\.(gate_up_proj|down_proj)",
    },
    "bert": {
        "attention_qv": r".*\.attention\.self\.(query|value)",
        "attention_all": r".*\.attention\.(self\.(query|key|value)|output\.dense)",
        "mlp": r".*\.layer\.\d+\.(intermediate\.dense|output\.dense)",
    },
    "gpt2": {
        "attention_qv": r".*\.attn\.c_attn",
        "attention_all": r".*\.attn\.(c_attn|c_proj)",
        "mlp": r".*\.mlp\.(c_fc|c_proj)",
    },
    "t5": {
        "attention_qv": r".*\.(SelfAttention|EncDecAttention)\.(q|v)",
        "attention_all": r".*\.(SelfAttention|EncDecAttention)\.(q|k|v|o)",
        "mlp": r".*\.DenseReluDense\.(wi|wi_0|wi_1|wo)",
    },
    # BART-like: encoder-decoders and OPT share "<i>.self_attn.{q,k,v,out}_proj" and "<i>.fc1/fc2";
    # the attention names are anchored to their block because BartForSequenceClassification's head
    # has an "out_proj" too.
    "bart": {
        "attention_qv": r".*\.(self_attn|encoder_attn)\.(q_proj|v_proj)",
        "attention_all": r".*\.(self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)",
        "mlp": r".*\.layers\.\d+\.(fc1|fc2)",
    },
    "distilbert": {
        "attention_qv": r".*\.attention\.(q_lin|v_lin)",
        "attention_all": r".*\.attention\.(q_lin|k_lin|v_lin|out_lin)",
        "mlp": r".*\.ffn\.(lin1|lin2)",
    },
    "deberta-v2": {
        "attention_qv": r".*\.attention\.self\.(query_proj|value_proj)",
        "attention_all": r".*\.attention\.(self\.(query_proj|key_proj|value_proj)|output\.dense)",
        "mlp": r".*\.layer\.\d+\.(intermediate\.dense|output\.dense)",
    },
    "gpt_neox": {  # fused q, k, v in one layer, as GPT-2's c_attn
        "attention_qv": r".*\.attention\.query_key_value",
        "attention_all": r".*\.attention\.(query_key_value|dense)",
        "mlp": r".*\.mlp\.(dense_h_to_4h|dense_4h_to_h)",
    },
    "gpt_neo": {
        "attention_qv": r".*\.attn\.attention\.(q_proj|v_proj)",
        "attention_all": r".*\.attn\.attention\.(q_proj|k_proj|v_proj|out_proj)",
        "mlp": r".*\.mlp\.(c_fc|c_proj)",
    },
}
for _alias, _of in (("roberta", "bert"), ("xlm-roberta", "bert"), ("electra", "bert"), ("mt5", "t5"),
                    ("mbart", "bart"), ("pegasus", "bart"), ("opt", "bart")):
    DEFAULT_TARGETS[_alias] = DEFAULT_TARGETS[_of]


def default_target_regex(model: nn.Module, role: str) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"no default target_modules for model type {model_type!r}; set target_modules explicitly "
            f"(names, a regex, or 'all-linear'). Candidates: {candidate_names(model)}"
        )
    if role not in DEFAULT_TARGETS[model_type]:
        raise ValueError(
            f"model type {model_type!r} has no default {role!r} targets (its {role} is not made of linear "
            f"layers); set target_modules explicitly. Candidates: {candidate_names(model)}"
        )
    return DEFAULT_TARGETS[model_type][role]


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SUPPORTED_BASE_LAYERS) and n]


def candidate_names(model: nn.Module, limit: int = 30) -> list[str]:
    """Distinct last-component names of adaptable layers, to show in errors."""
    seen = []
    for name, _ in linear_modules(model):
        short = name.rsplit(".", 1)[-1]
        if short not in seen:
            seen.append(short)
    return seen[:limit]


def _matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _output_layer_names(model: nn.Module) -> set[str]:
    """The LM / classification output layer, which "all-linear" leaves out (as PEFT does)."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out is not None and module is out:
            names.add(name)
    return names


def find_targets(model: nn.Module, target_modules, exclude_modules=None, *,
                 default_role: str = "attention_qv") -> list[str]:
    """Names of the modules to adapt, in model order. Errors name the problem and list candidates."""
    if target_modules is None:
        target_modules = default_target_regex(model, default_role)
    candidates = linear_modules(model)
    if target_modules == "all-linear":
        skip = _output_layer_names(model)
        selected = [n for n, _ in candidates if n not in skip]
    else:
        selected = [n for n, _ in candidates if _matches(n, target_modules)]
        _check_no_unsupported_match(model, target_modules)
        if isinstance(target_modules, list):
            for t in target_modules:
                if not any(_matches(n, [t]) for n, _ in candidates):
                    raise ValueError(
                        f"target module {t!r} matches no adaptable layer in {type(model).__name__}. "
                        f"Adaptable layer names: {candidate_names(model)}"
                    )
    if exclude_modules:
        selected = [n for n in selected if not _matches(n, exclude_modules)]
    if not selected:
        raise ValueError(
            f"target_modules={target_modules!r} (minus exclude_modules={exclude_modules!r}) matches no "
            f"adaptable layer in {type(model).__name__}. Adaptable layer names: {candidate_names(model)}"
        )
    return selected


def _check_no_unsupported_match(model: nn.Module, spec) -> None:
    """A target that names a module mtpeft cannot adapt (e.g. an Embedding) is an error, not a skip."""
    for name, module in model.named_modules():
        if name and _matches(name, spec) and not isinstance(module, SUPPORTED_BASE_LAYERS):
            if any(isinstance(c, SUPPORTED_BASE_LAYERS) for c in module.modules()):
                continue  # a container whose linear children may be matched separately
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}; mtpeft adapts torch.nn.Linear and "
                f"transformers' Conv1D only. Adaptable layer names: {candidate_names(model)}"
            )
