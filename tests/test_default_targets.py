"""Default target_modules per architecture (mtpeft.lib.core.targets.DEFAULT_TARGETS): every role of
every listed architecture adapts real layers of a model built from its config, and the default
(attention q, v) adapts the same layers as stock PEFT's default where PEFT has one."""

import re

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
from transformers import AutoConfig, AutoModel, BartConfig, BartForSequenceClassification

import mtpeft
from mtpeft.lib.core.layer import SUPPORTED_BASE_LAYERS
from mtpeft.lib.core.targets import DEFAULT_TARGETS

# One layer, width 16: each config takes the names it knows and keeps the rest as plain attributes.
SMALL = dict(vocab_size=96, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             decoder_start_token_id=0,
             hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
             intermediate_size=32, head_dim=8,
             d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
             decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,  # BART-like
             ffn_dim=32, word_embed_proj_dim=16,  # OPT
             num_layers=1, attention_types=[[["global"], 1]],  # GPT-Neo, T5
             d_kv=8, d_ff=32, num_heads=2,  # T5
             n_embd=16, n_layer=1, n_head=2,  # GPT-2
             dim=16, hidden_dim=32, n_layers=1, n_heads=2)  # DistilBERT


def tiny(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModel.from_config(AutoConfig.for_model(model_type, **SMALL)).eval()


def adaptable(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_BASE_LAYERS) and n]


def matched(model, regex: str) -> set[str]:
    return {n for n in adaptable(model) if re.fullmatch(regex, n)}


@pytest.mark.parametrize("model_type", sorted(DEFAULT_TARGETS))
def test_every_default_role_adapts_layers_of_that_architecture(model_type):
    model = tiny(model_type)
    roles = {role: matched(model, regex) for role, regex in DEFAULT_TARGETS[model_type].items()}
    assert all(roles.values()), f"{model_type}: a role matches no layer: {roles}"
    assert roles["attention_qv"] < roles["attention_all"]
    if "mlp" in roles:
        assert not roles["mlp"] & roles["attention_all"], roles
        in_blocks = {n for n in adaptable(model) if re.search(r"\.\d+\.", n)}  # not poolers, projections
        assert roles["mlp"] | roles["attention_all"] == in_blocks, "a block layer is in no role"


@pytest.mark.parametrize("model_type", sorted(set(DEFAULT_TARGETS) & set(PEFT_DEFAULTS)))
def test_default_targets_are_stock_peft_defaults(model_type):
    """mtpeft's LoRA with no target_modules adapts exactly the layers stock PEFT's LoRA adapts with
    PEFT's per-architecture default names. (The names are passed: PEFT's own default lookup finds
    nothing on a Mixtral built from its config, NoMatchingPeftModuleError, in PEFT 0.21.)"""
    ours = mtpeft.get_model(tiny(model_type), mtpeft.LoraConfig(r=2)).adapted_names
    peft_model = get_peft_model(tiny(model_type), PeftLoraConfig(r=2, target_modules=PEFT_DEFAULTS[model_type]))
    theirs = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert set(ours) == theirs


def test_bart_classification_head_is_not_an_attention_target():
    """BartForSequenceClassification's head has an out_proj too; attention_all leaves it to the head."""
    torch.manual_seed(0)
    model = BartForSequenceClassification(BartConfig(**{k: v for k, v in SMALL.items()
                                                        if k not in ("num_hidden_layers", "hidden_size")}))
    names = matched(model, DEFAULT_TARGETS["bart"]["attention_all"])
    assert len(names) == 12 and not any("classification_head" in n for n in names)


def test_a_role_the_architecture_lacks_is_a_clear_error():
    """Mixtral's experts are not Linear layers: the MLP default (TeamLoRA's) names the fix."""
    model = tiny("mixtral")
    with pytest.raises(ValueError, match=r"'mixtral' has no default 'mlp' targets.*set target_modules"):
        mtpeft.get_model(model, mtpeft.TeamLoraConfig(n_tasks=2))
    assert not any("lora" in n for n, _ in model.named_parameters())


def tiny_bart():
    from transformers import BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(**{k: v for k, v in SMALL.items() if k not in ("num_hidden_layers", "hidden_size")},
                        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return BartForConditionalGeneration(config).eval()


def test_bart_with_default_targets_keeps_encoder_and_decoder_tokens_apart():
    """MoELoRA on BART with no target_modules: each layer counts the tokens of the stream it reads (the
    decoder's self-attention and cross-attention queries read decoder tokens, cross-attention values read
    the encoder's), as for T5 in tests/test_seq2seq.py."""
    model = mtpeft.get_model(tiny_bart(), mtpeft.MoELoraConfig(r=2, n_experts=3, lora_dropout=0.0, n_tasks=3))
    ids = torch.randint(6, 90, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 5:] = 0  # 17 real encoder tokens
    labels = torch.randint(6, 90, (3, 6))
    labels[1, 3:] = -100  # 15 real decoder tokens
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=torch.tensor([0, 1, 2]))
    tokens = {name: int(s["tokens"]) for name, s in out.router_stats.items()}
    assert len(tokens) == 6
    for name, n in tokens.items():
        reads_encoder = name.startswith("model.encoder.") or name.endswith("encoder_attn.v_proj")
        assert n == (17 if reads_encoder else 15), name


def test_bart_task_adapter_exports_to_stock_peft(tmp_path):
    from peft import PeftModel

    model = mtpeft.get_model(tiny_bart(), mtpeft.TaskLoraConfig(r=4, n_tasks=3))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random B too: B = 0 at init would hide a wrong export
        for name, p in model.named_parameters():
            if model.parameter_role(name) is not None:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.export_lora(tmp_path / "peft", task=1)
    ids = torch.randint(6, 90, (2, 6))
    labels = torch.randint(6, 90, (2, 4))
    with torch.no_grad():
        ours = model(input_ids=ids, labels=labels, task_ids=torch.tensor([1, 1])).logits
        stock = PeftModel.from_pretrained(tiny_bart(), tmp_path / "peft")(input_ids=ids, labels=labels).logits
    assert not torch.allclose(ours, tiny_bart()(input_ids=ids, labels=labels).logits, atol=1e-3)
    torch.testing.assert_close(stock, ours, atol=1e-5, rtol=0)
