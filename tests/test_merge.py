"""merge / unmerge / disable_adapters for LoRA (Linear and Conv1D) and per-task LoRA."""

import pytest
import torch
from tiny_models import BUILDERS, batch_for, main_output
from test_peft_parity import randomise_adapters

import mtpeft


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_lora_merge_equals_unmerged_and_unmerge_restores(arch):
    base = BUILDERS[arch]()
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = mtpeft.get_model(base, mtpeft.LoraConfig(r=4, target_modules="all-linear"))
    randomise_adapters(model, scale=0.05)
    batch = batch_for(arch)
    with torch.no_grad():
        unmerged = main_output(model(**batch))
        model.merge()
        merged = main_output(model(**batch))
        model.merge()  # a second merge is a no-op
        again = main_output(model(**batch))
        model.unmerge()
        restored = model.unload().state_dict()
    assert (unmerged - merged).abs().max() < 1e-5
    assert torch.equal(merged, again)
    for key, value in weights.items():
        assert (restored[key] - value).abs().max() <= 1e-6, key


def test_task_lora_merge_per_task_and_other_task_is_an_error():
    model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.TaskLoraConfig(r=4, n_tasks=3))
    randomise_adapters(model)
    batch = batch_for("llama")
    with torch.no_grad():
        want = model(**batch, task_ids=torch.full((4,), 1)).logits
        model.merge(task=1)
        got_with_ids = model(**batch, task_ids=torch.full((4,), 1)).logits
        got_without = model(**batch).logits  # merged: ids are optional
        with pytest.raises(ValueError, match="merged for task 1"):
            model(**batch, task_ids=torch.tensor([1, 0, 1, 1]))
        with pytest.raises(ValueError, match="call unmerge"):
            model.merge(task=2)
        model.unmerge()
        other = model(**batch, task_ids=torch.full((4,), 2)).logits
    assert (want - got_with_ids).abs().max() < 1e-5
    assert (want - got_without).abs().max() < 1e-5
    assert (want - other).abs().max() > 1e-3
    with pytest.raises(ValueError, match="pass task=t"):
        model.merge()


def test_disable_adapters_gives_base_output():
    base = BUILDERS["bert"]()
    batch = batch_for("bert")
    with torch.no_grad():
        want = base(**batch).last_hidden_state.clone()
    model = mtpeft.get_model(base, mtpeft.LoraConfig(r=4))
    randomise_adapters(model)
    with torch.no_grad():
        with model.disable_adapters():
            off = model(**batch).last_hidden_state
        on = model(**batch).last_hidden_state
    assert torch.equal(want, off)
    assert (on - want).abs().max() > 1e-3
