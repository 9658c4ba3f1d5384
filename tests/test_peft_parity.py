"""mtpeft's LoRA against PEFT's LoRA with copied weights, and PEFT loading mtpeft's exports."""

import copy

import peft
import pytest
import torch
from tiny_models import BUILDERS, batch_for, main_output

import mtpeft

TARGETS = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value"]}


def randomise_adapters(model, seed=1, scale=0.2):
    """Give every adapter tensor random values (B is zero at init, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if model.parameter_role(name) is not None:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_equals_peft_lora_with_copied_weights(arch, use_rslora):
    base = BUILDERS[arch]()
    ours = mtpeft.get_model(copy.deepcopy(base), mtpeft.LoraConfig(
        r=4, lora_alpha=6, target_modules=TARGETS[arch], use_rslora=use_rslora))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=TARGETS[arch], use_rslora=use_rslora, lora_dropout=0.0))
    randomise_adapters(ours)
    state = ours.adapter_state_dict()
    with torch.no_grad():
        for key, value in state.items():
            module, kind = key.rsplit(".", 1)  # kind: lora_A / lora_B
            theirs.base_model.model.get_submodule(f"{module}.{kind}.default").weight.copy_(value)
    batch = batch_for(arch)
    ours.eval(), theirs.eval()
    want = main_output(theirs(**batch))
    got = main_output(ours(**batch))
    assert (want - got).abs().max() < 1e-5
    assert (want - main_output(base(**batch))).abs().max() > 1e-3  # the adapters do something


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["lora", "task_lora"])
def test_export_loads_in_peft_with_equal_outputs(tmp_path, arch, method):
    base = BUILDERS[arch]()
    cfg = (mtpeft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=TARGETS[arch]) if method == "lora"
           else mtpeft.TaskLoraConfig(r=4, lora_alpha=8, n_tasks=3, target_modules=TARGETS[arch]))
    ours = mtpeft.get_model(copy.deepcopy(base), cfg)
    randomise_adapters(ours)
    task = None if method == "lora" else 2
    ours.export_lora(tmp_path / "export", task=task)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "export").eval()
    batch = batch_for(arch)
    task_ids = None if task is None else torch.full((4,), task)
    with torch.no_grad():
        want = main_output(ours(**batch, task_ids=task_ids))
        got = main_output(theirs(**batch))
    assert (want - got).abs().max() < 1e-5
    assert (want - main_output(base(**batch))).abs().max() > 1e-3


def test_export_of_task_routed_adapter_needs_a_task(tmp_path):
    model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.TaskLoraConfig(n_tasks=2))
    with pytest.raises(ValueError, match="pass task=t"):
        model.export_lora(tmp_path / "x")
    with pytest.raises(ValueError, match="not a task of this adapter"):
        model.export_lora(tmp_path / "x", task=5)
    assert not (tmp_path / "x").exists()
