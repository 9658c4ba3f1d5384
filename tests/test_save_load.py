"""save_pretrained / from_pretrained: round trip, strictness, files left untouched on errors."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import BUILDERS, batch_for, main_output
from test_peft_parity import randomise_adapters

import mtpeft
from mtpeft.lib.io import AdapterFileError, load_adapter_weights


def saved(tmp_path, arch="llama", cfg=None):
    cfg = cfg or mtpeft.TaskLoraConfig(r=4, n_tasks=3, lora_alpha=8)
    model = mtpeft.get_model(BUILDERS[arch](), cfg)
    randomise_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "t5"])
def test_round_trip_equal(tmp_path, arch):
    model, path = saved(tmp_path, arch)
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = mtpeft.MultiTaskModel.from_pretrained(BUILDERS[arch](), path)
    batch, ids = batch_for(arch), torch.tensor([0, 2, 1, 0])
    with torch.no_grad():
        assert torch.equal(main_output(model(**batch, task_ids=ids)), main_output(loaded(**batch, task_ids=ids)))
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default, as PEFT
    trainable = mtpeft.MultiTaskModel.from_pretrained(BUILDERS[arch](), path, is_trainable=True)
    assert all(p.requires_grad for n, p in trainable.named_parameters() if trainable.parameter_role(n))


def test_config_file_records_method_and_every_field(tmp_path):
    _, path = saved(tmp_path)
    data = json.loads((path / "adapter_config.json").read_text())
    assert data["method"] == "task_lora" and data["r"] == 4 and data["n_tasks"] == 3
    assert data["mtpeft_version"] == mtpeft.__version__


def _assert_base_untouched(base, reference):
    assert not any(type(m).__name__.endswith("Layer") and hasattr(m, "base_layer") for m in base.modules())
    for (k, v), (k2, v2) in zip(base.state_dict().items(), reference.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert all(p.requires_grad for p in base.parameters())


def test_shape_mismatch_is_a_clear_error_and_leaves_the_base_untouched(tmp_path):
    _, path = saved(tmp_path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = next(iter(tensors))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    save_file(tensors, str(path / "adapter_model.safetensors"))
    base = BUILDERS["llama"]()
    reference = copy.deepcopy(base)
    with pytest.raises(AdapterFileError, match="has shape"):
        mtpeft.MultiTaskModel.from_pretrained(base, path)
    _assert_base_untouched(base, reference)


def test_missing_and_unexpected_keys(tmp_path):
    _, path = saved(tmp_path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = next(iter(tensors))
    tensors["model.layers.9.extra.lora_A"] = tensors.pop(key)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError, match="1 missing keys.*1 unexpected keys"):
        mtpeft.MultiTaskModel.from_pretrained(BUILDERS["llama"](), path)


def test_adapter_from_another_base_model_is_refused(tmp_path):
    _, path = saved(tmp_path, "llama", mtpeft.TaskLoraConfig(r=4, n_tasks=3, target_modules=["q_proj"]))
    base = BUILDERS["bert"]()
    with pytest.raises(ValueError, match="matches no adaptable layer"):
        mtpeft.MultiTaskModel.from_pretrained(base, path)


def test_mismatched_config_when_loading_into_a_wrapped_model(tmp_path):
    _, path = saved(tmp_path)
    other = mtpeft.get_model(BUILDERS["llama"](), mtpeft.TaskLoraConfig(r=8, n_tasks=3, lora_alpha=8))
    before = {k: v.clone() for k, v in other.adapter_state_dict().items()}
    with pytest.raises(AdapterFileError, match="r: model=8 file=4"):
        load_adapter_weights(other, path)
    assert all(torch.equal(before[k], v) for k, v in other.adapter_state_dict().items())


def test_truncated_safetensors_and_pickles_are_refused(tmp_path):
    _, path = saved(tmp_path)
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterFileError, match="truncated or corrupted"):
        mtpeft.MultiTaskModel.from_pretrained(BUILDERS["llama"](), path)
    weights.unlink()
    torch.save({"x": torch.zeros(1)}, path / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="never unpickles"):
        mtpeft.MultiTaskModel.from_pretrained(BUILDERS["llama"](), path)


def test_unknown_method_or_field_in_config(tmp_path):
    _, path = saved(tmp_path)
    data = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**data, "method": "tasklora"}))
    with pytest.raises(AdapterFileError, match="unknown method 'tasklora'. Did you mean 'task_lora'"):
        mtpeft.MultiTaskModel.from_pretrained(BUILDERS["llama"](), path)
    (path / "adapter_config.json").write_text(json.dumps({**data, "lora_alhpa": 3}))
    with pytest.raises(AdapterFileError, match="Did you mean 'lora_alpha'"):
        mtpeft.MultiTaskModel.from_pretrained(BUILDERS["llama"](), path)


def test_save_overwrites_atomically(tmp_path):
    model, path = saved(tmp_path)
    randomise_adapters(model, seed=7)
    model.save_pretrained(path)
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(str(path / "adapter_model.safetensors"))
    assert all(torch.equal(tensors[k], v) for k, v in model.adapter_state_dict().items())


def test_modules_to_save_are_trainable_and_saved(tmp_path):
    base = BUILDERS["bert"](classifier=True)
    model = mtpeft.get_model(base, mtpeft.LoraConfig(r=4, modules_to_save=["classifier"]))
    assert model.base_model.classifier.weight.requires_grad
    assert model.trainable_parameter_breakdown()["saved"] == 32 * 3 + 3
    with torch.no_grad():
        model.base_model.classifier.weight.fill_(0.5)
    model.save_pretrained(tmp_path / "a")
    loaded = mtpeft.MultiTaskModel.from_pretrained(BUILDERS["bert"](classifier=True), tmp_path / "a")
    assert torch.all(loaded.base_model.classifier.weight == 0.5)
