"""Model-level bad inputs and silent-wrong-result cases of issue 15 (docs/reliability.md, "Bad inputs").

Each case: the error type, the message naming the problem and the fix, and (via ``refused``) the models
and files left exactly as they were. Each failed on the code before the fix.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_reliability import randomise, refused, wrapped
from tiny_models import BUILDERS, batch_for, tiny_gpt2
from transformers import LlamaConfig, LlamaForCausalLM

import mtpeft
from mtpeft.lib.io import AdapterFileError, WEIGHTS_NAME, CONFIG_NAME, load_adapter_weights

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------- 1. merged state
def test_loading_adapter_weights_into_a_merged_model_is_refused(tmp_path):
    other = wrapped()
    randomise(other, seed=7)
    other.save_pretrained(tmp_path / "a")
    model = wrapped()
    model.merge(task=1)
    refused(lambda: load_adapter_weights(model, tmp_path / "a"), ValueError,
            r"merged for task 1; call model.unmerge\(\) before load_adapter_weights", model, tmp_path)


def test_copying_tensors_into_a_merged_model_is_refused():
    from mtpeft.lib.io import copy_tensors_into

    model = wrapped()
    model.merge(task=0)
    tensors = {k: torch.zeros_like(v) for k, v in model.adapter_state_dict().items()}
    refused(lambda: copy_tensors_into(model, tensors), ValueError, r"merged for task 0.*unmerge", model)


def test_add_tasks_while_merged_is_refused():
    model = wrapped()
    model.merge(task=2)
    refused(lambda: model.add_tasks(1), ValueError, r"merged for task 2; call model.unmerge\(\) before add_tasks",
            model)


def test_a_training_forward_while_merged_names_merge_and_unmerge():
    model = wrapped(mtpeft.LoraConfig(r=4))
    model.merge()
    model.train()
    refused(lambda: model(**batch_for("llama")), RuntimeError,
            r"the adapter is merged, so a training forward.*model.unmerge\(\) before training", model)
    with torch.no_grad():  # inference while merged still works, in train mode too
        model(**batch_for("llama"))


# ----------------------------------------------------------------------------------- 2. tied weights
def tied_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merging_into_a_tied_lm_head_is_refused(arch):
    base = tied_llama() if arch == "llama" else tiny_gpt2()
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    model = mtpeft.get_model(base, mtpeft.TaskLoraConfig(r=4, n_tasks=2, target_modules=["lm_head"]))
    randomise(model)
    embeddings = base.get_input_embeddings().weight.detach().clone()
    refused(lambda: model.merge(task=1), ValueError, r"cannot merge into lm_head: its weight is tied to \[.*wte|"
            r"cannot merge into lm_head: its weight is tied to \[.*embed_tokens", model)
    assert torch.equal(base.get_input_embeddings().weight, embeddings)


# ----------------------------------------------------------------------------------- 3. bit-exact unmerge
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_then_unmerge_restores_the_base_bit_for_bit(dtype, arch):
    base = BUILDERS[arch]().to(dtype)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = mtpeft.get_model(base, mtpeft.TaskLoraConfig(r=4, n_tasks=3, adapter_dtype="base"))
    randomise(model)
    for task in (0, 2, 1):  # several cycles: no drift accumulates
        model.merge(task=task)
        assert any(not torch.equal(v, before[k.replace(".base_layer", "")])
                   for k, v in model.base_model.state_dict().items() if "base_layer" in k)  # merged changed W
        model.unmerge()
    after = model.unload().state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# ----------------------------------------------------------------------------------- 6. ids without n_tasks
@pytest.mark.parametrize("ids, match", [
    ([0, -1, 0, 1], r"task id -1 is out of range: task ids are >= 0"),
    ([0, 20_000_000, 0, 1], r"task id 20000000 is too large for an adapter built without n_tasks.*set n_tasks"),
], ids=["negative", "huge"])
def test_token_routed_ids_without_n_tasks_are_bounded(ids, match):
    model = wrapped(mtpeft.HydraLoraConfig(r=4, n_experts=2))
    model.train()
    refused(lambda: model(**batch_for("llama"), task_ids=torch.tensor(ids)), ValueError, match, model)
    model(**batch_for("llama"), task_ids=torch.tensor([0, 5, 0, 1]))  # small ids still size the stats
    assert model.router_stats()


def test_task_ids_on_the_meta_device_are_refused():
    model = wrapped()
    refused(lambda: model(**batch_for("llama"), task_ids=torch.zeros(4, dtype=torch.long, device="meta")),
            ValueError, r"task_ids are on the meta device", model)


# ----------------------------------------------------------------------------------- 7. NaN / Inf
FLOAT_FIELDS = [(cls, f) for cls, fields in [
    (mtpeft.LoraConfig, ["lora_alpha", "lora_dropout"]),
    (mtpeft.TaskLoraConfig, ["lora_alpha"]),
    (mtpeft.MTLLoraConfig, ["lora_alpha", "lora_dropout", "temperature"]),
    (mtpeft.HydraLoraConfig, ["lora_alpha", "lora_dropout", "balance_weight"]),
    (mtpeft.MoELoraConfig, ["lora_alpha", "balance_weight", "contrastive_weight", "contrastive_temperature"]),
    (mtpeft.MoSLDConfig, ["lora_alpha", "dropconnect", "balance_weight"]),
    (mtpeft.TeamLoraConfig, ["lora_alpha", "interaction_init", "balance_weight", "normalizer_eps"]),
] for f in fields]


def _needs_tasks(cls):
    return {"n_tasks": 2} if cls.task_routed else {}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("cls, field", FLOAT_FIELDS, ids=[f"{c.__name__}.{f}" for c, f in FLOAT_FIELDS])
def test_non_finite_float_fields_are_refused(cls, field, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field} must be"):
        cls(**_needs_tasks(cls), **{field: value})


def test_a_float_field_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match=r"LoraConfig.lora_alpha must be a number, got str '16'"):
        mtpeft.LoraConfig(lora_alpha="16")


def test_non_finite_lora_alpha_in_adapter_config_json_is_refused(tmp_path):
    wrapped().save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    config["lora_alpha"] = float("nan")
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(config))  # json writes NaN
    base = BUILDERS["llama"]()
    refused(lambda: mtpeft.MultiTaskModel.from_pretrained(base, tmp_path / "a"), AdapterFileError,
            r"TaskLoraConfig.lora_alpha must be a finite number, got nan", base, tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_tensors_in_an_adapter_file_are_refused(tmp_path, bad):
    wrapped().save_pretrained(tmp_path / "a")
    tensors = load_file(tmp_path / "a" / WEIGHTS_NAME)
    key = sorted(tensors)[1]
    tensors[key][0, 0, 0] = bad
    save_file(tensors, tmp_path / "a" / WEIGHTS_NAME)
    base, model = BUILDERS["llama"](), wrapped()
    refused(lambda: mtpeft.MultiTaskModel.from_pretrained(base, tmp_path / "a"), AdapterFileError,
            rf"tensor '{key}' holds 1 NaN or infinite values", base, tmp_path)
    refused(lambda: load_adapter_weights(model, tmp_path / "a"), AdapterFileError,
            rf"tensor '{key}' holds 1 NaN or infinite values", model, tmp_path)


# ----------------------------------------------------------------------------------- 8. already adapted base
def test_wrapping_a_base_that_already_carries_mtpeft_adapters_is_refused():
    base = BUILDERS["llama"]()
    mtpeft.get_model(base, mtpeft.LoraConfig(r=4))  # adapts base in place
    for config in (mtpeft.LoraConfig(r=4), mtpeft.LoraConfig(r=4, target_modules="all-linear")):
        refused(lambda: mtpeft.get_model(base, config), TypeError,
                r"already carries mtpeft adapters .*q_proj.*Call model.unload\(\).*fresh base", base)


def test_wrapping_a_peft_model_is_refused():
    import peft

    base = peft.get_peft_model(BUILDERS["llama"](), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    refused(lambda: mtpeft.get_model(base.base_model.model, mtpeft.LoraConfig(r=4)), TypeError,
            r"carries PEFT adapters.*merge_and_unload", base)


# ----------------------------------------------------------------------------------- 9. meta-device init
def meta_wrapped():
    with torch.device("meta"):
        base = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, pad_token_id=0))
        model = mtpeft.get_model(base, mtpeft.LoraConfig(r=4))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if model.parameter_role(name) is None:
                p.normal_(0, 0.02)  # stands for loading the base weights
            else:  # to_empty leaves arbitrary memory (NaN possible); a fixed non-zero pattern stands for it
                p.fill_(0.5)
    return model


def test_adapters_materialised_from_meta_are_refused_until_initialised(tmp_path):
    model = meta_wrapped()
    model.eval()
    refused(lambda: model(**batch_for("llama")), RuntimeError,
            r"adapters of model.layers.0.self_attn.q_proj were never initialised.*reset_adapter_parameters", model)
    refused(lambda: model.save_pretrained(tmp_path / "a"), RuntimeError, r"never initialised.*before saving",
            model, tmp_path / "a")
    model.reset_adapter_parameters()
    for _, layer in model.adapted_layers():
        assert torch.count_nonzero(layer.lora_B) == 0  # ΔW = 0 at init holds again
    with torch.no_grad(), model.disable_adapters():
        plain = model(**batch_for("llama")).logits
    assert torch.equal(model(**batch_for("llama")).logits, plain)
    model.save_pretrained(tmp_path / "a")


def test_loading_saved_weights_initialises_meta_materialised_adapters(tmp_path):
    wrapped(mtpeft.LoraConfig(r=4)).save_pretrained(tmp_path / "a")
    model = meta_wrapped()
    load_adapter_weights(model, tmp_path / "a")
    model.eval()(**batch_for("llama"))


# ----------------------------------------------------------------------------------- 10. file modes
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_follow_the_umask(tmp_path, umask, mode):
    """save_pretrained and atomic_write_bytes (config.yaml, metrics.json) give new files 0o666 & ~umask."""
    from mtpeft.lib.io import atomic_write_bytes

    model = wrapped()
    previous = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "a")
        atomic_write_bytes(tmp_path / "metrics.json", b"{}")
    finally:
        os.umask(previous)
    for path in (tmp_path / "a" / WEIGHTS_NAME, tmp_path / "a" / CONFIG_NAME, tmp_path / "metrics.json"):
        assert path.stat().st_mode & 0o777 == mode, path


def test_overwriting_a_file_keeps_its_mode(tmp_path):
    from mtpeft.lib.io import atomic_write_bytes

    path = tmp_path / "f.json"
    path.write_bytes(b"old")
    path.chmod(0o640)
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o640


# ----------------------------------------------------------------------------------- unclear errors
def test_save_pretrained_onto_a_file_names_the_path(tmp_path):
    target = tmp_path / "adapter"
    target.write_text("not a folder")
    model = wrapped()
    refused(lambda: model.save_pretrained(target), AdapterFileError,
            rf"cannot save the adapter to {target}: it is a file, not a folder", model, tmp_path)


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules", "modules_to_save"])
@pytest.mark.parametrize("value", [5, [5], {"q_proj": 1}], ids=["int", "list_of_int", "dict"])
def test_module_name_fields_of_the_wrong_type(field, value):
    with pytest.raises(TypeError, match=rf"LoraConfig.{field} must be a list of module names"):
        mtpeft.LoraConfig(**{field: value})
