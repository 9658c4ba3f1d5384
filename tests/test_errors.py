"""Bad input gets a clear error that names the problem and the fix, and changes nothing."""

import pytest
import torch
from tiny_models import BUILDERS, batch_for

import mtpeft


def test_unknown_target_lists_candidates():
    with pytest.raises(ValueError, match=r"'qproj' matches no adaptable layer.*q_proj"):
        mtpeft.get_model(BUILDERS["llama"](), mtpeft.LoraConfig(target_modules=["qproj"]))
    with pytest.raises(ValueError, match=r"matches no adaptable layer.*c_attn"):
        mtpeft.get_model(BUILDERS["gpt2"](), mtpeft.LoraConfig(target_modules=r".*nothing.*"))


def test_failed_injection_leaves_the_model_untouched():
    base = BUILDERS["llama"]()
    with pytest.raises(ValueError):
        mtpeft.get_model(base, mtpeft.LoraConfig(target_modules=["q_proj", "nope"]))
    assert all(p.requires_grad for p in base.parameters())
    assert type(base.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_non_linear_target_is_an_error():
    with pytest.raises(ValueError, match="is a Embedding; mtpeft adapts torch.nn.Linear"):
        mtpeft.get_model(BUILDERS["llama"](), mtpeft.LoraConfig(target_modules=["embed_tokens"]))


def test_unknown_architecture_without_targets():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="no default target_modules.*proj"):
        mtpeft.get_model(Tiny(), mtpeft.LoraConfig())
    assert mtpeft.get_model(Tiny(), mtpeft.LoraConfig(target_modules=["proj"])).adapted_names == ["proj"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=2.5), "r must be a positive integer"),
    (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
    (dict(target_modules=[]), "empty list"),
    (dict(adapter_dtype="fp8"), "adapter_dtype must be one of"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mtpeft.LoraConfig(**kwargs)


@pytest.mark.parametrize("config_cls, kwargs, message", [
    ("MoELoraConfig", dict(balance_weight=-0.1), "balance_weight must be a number >= 0"),
    ("MoELoraConfig", dict(contrastive_weight=float("nan")), "contrastive_weight must be a number >= 0"),
    ("MoELoraConfig", dict(contrastive_temperature=0), "contrastive_temperature must be a positive number"),
    ("MoSLDConfig", dict(balance_weight="0.1"), "balance_weight must be a number >= 0"),
    ("HydraLoraConfig", dict(balance_weight=-1), "balance_weight must be a number >= 0"),
    ("TeamLoraConfig", dict(interaction_init=-0.1), "interaction_init must be a number >= 0"),
    ("TeamLoraConfig", dict(normalizer_eps=0.0), "normalizer_eps must be a positive number"),
    ("MTLLoraConfig", dict(n_tasks=2, temperature=True), "temperature must be a positive number"),
])
def test_method_config_validation(config_cls, kwargs, message):
    """Weights may be 0 (off) but not negative, NaN or a string; temperatures and epsilons must be > 0."""
    with pytest.raises(ValueError, match=message):
        getattr(mtpeft, config_cls)(**kwargs)


def test_task_routed_config_needs_n_tasks():
    with pytest.raises(ValueError, match="set n_tasks"):
        mtpeft.TaskLoraConfig()


@pytest.mark.parametrize("task_ids, error, message", [
    (None, ValueError, "pass task_ids"),
    (torch.tensor([0.0, 1.0, 0.0, 1.0]), TypeError, "must hold integers"),
    (torch.tensor([True, False, True, True]), TypeError, "must hold integers"),
    ([0, 1, 0, 1], TypeError, "torch.LongTensor"),
    (torch.tensor([0, 1, 0]), ValueError, "3 entries but the batch has 4"),
    (torch.tensor([[0, 1, 0, 1]]), ValueError, r"shape \(batch,\)"),
    (torch.tensor([0, 1, 3, 1]), ValueError, r"task id 3 is out of range.*\[0, 2\]"),
    (torch.tensor([0, -1, 0, 1]), ValueError, "task id -1 is out of range"),
])
def test_bad_task_ids(task_ids, error, message):
    model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.TaskLoraConfig(n_tasks=3))
    with pytest.raises(error, match=message):
        model(**batch_for("llama"), task_ids=task_ids)


def test_token_routed_style_methods_do_not_need_task_ids_but_still_validate_them():
    model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.LoraConfig(n_tasks=2))
    model(**batch_for("llama"))
    with pytest.raises(ValueError, match="out of range"):
        model(**batch_for("llama"), task_ids=torch.tensor([0, 1, 2, 0]))


def test_wrapping_twice_and_wrong_config_type():
    model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.LoraConfig())
    with pytest.raises(TypeError, match="already wrapped"):
        mtpeft.get_model(model, mtpeft.LoraConfig())
    with pytest.raises(TypeError, match="mtpeft method config"):
        mtpeft.get_model(BUILDERS["llama"](), {"r": 8})


def test_merge_of_non_task_routed_with_a_task():
    model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.LoraConfig())
    with pytest.raises(ValueError, match="does not route by task"):
        model.merge(task=0)
