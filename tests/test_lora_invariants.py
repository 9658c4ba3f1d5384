"""LoRA and per-task LoRA on tiny GPT-2 / Llama / BERT / T5: init equals base, only adapters train,
the base stays bit-identical, adapters stay fp32 on a bf16 base, meta-device construction works."""

import copy

import pytest
import torch
from tiny_models import BUILDERS, batch_for, main_output

import mtpeft

ARCHS = ["gpt2", "llama", "bert", "t5"]


def make(arch, method="lora", **kw):
    base = BUILDERS[arch]()
    ref = copy.deepcopy(base)
    if method == "lora":
        cfg = mtpeft.LoraConfig(r=4, lora_alpha=8, **kw)
    else:
        cfg = mtpeft.TaskLoraConfig(r=4, lora_alpha=8, n_tasks=3, **kw)
    return ref, mtpeft.get_model(base, cfg)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lora", "task_lora"])
def test_output_equals_base_at_init(arch, method):
    ref, model = make(arch, method)
    batch = batch_for(arch)
    task_ids = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        want = main_output(ref(**batch))
        got = main_output(model(**batch, task_ids=task_ids))
    assert torch.equal(want, got)


@pytest.mark.parametrize("arch", ARCHS)
def test_only_adapters_train_and_base_is_bit_identical(arch):
    ref, model = make(arch, "task_lora", target_modules="all-linear")
    model.train()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = batch_for(arch)
    for _ in range(3):
        out = model(**batch, task_ids=torch.tensor([0, 1, 2, 0]))
        main_output(out).float().pow(2).mean().backward()
        for name, p in model.named_parameters():
            is_adapter = model.parameter_role(name) is not None
            assert p.requires_grad == is_adapter, name
            if not is_adapter:
                assert p.grad is None, name
        opt.step()
        opt.zero_grad()
    base_state = model.unload().state_dict()
    for key, value in before.items():
        assert torch.equal(base_state[key], value), key


def test_adapters_moved_after_training():
    _, model = make("llama", "lora")
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = batch_for("llama")
    main_output(model(**batch)).pow(2).mean().backward()
    opt.step()
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))


def test_all_linear_skips_the_output_layer_and_exclude_removes():
    _, model = make("llama", target_modules="all-linear", exclude_modules=["o_proj"])
    names = model.adapted_names
    assert "lm_head" not in names
    assert not any(n.endswith("o_proj") for n in names)
    assert any(n.endswith("gate_proj") for n in names)


def test_target_matching_exact_suffix_regex():
    base = BUILDERS["bert"]()
    m1 = mtpeft.get_model(copy.deepcopy(base), mtpeft.LoraConfig(target_modules=["query"]))
    assert m1.adapted_names == ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"]
    m2 = mtpeft.get_model(copy.deepcopy(base),
                          mtpeft.LoraConfig(target_modules=["encoder.layer.1.attention.self.query"]))
    assert m2.adapted_names == ["encoder.layer.1.attention.self.query"]
    m3 = mtpeft.get_model(copy.deepcopy(base), mtpeft.LoraConfig(target_modules=r".*\.0\..*(key|value)"))
    assert m3.adapted_names == ["encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.value"]
    # the default for BERT is query and value
    m4 = mtpeft.get_model(copy.deepcopy(base), mtpeft.LoraConfig())
    assert sorted(n.rsplit(".", 1)[1] for n in m4.adapted_names) == ["query", "query", "value", "value"]


def test_adapters_are_fp32_on_a_bf16_base_and_output_keeps_base_dtype():
    base = BUILDERS["llama"]().to(torch.bfloat16)
    model = mtpeft.get_model(base, mtpeft.LoraConfig(r=4))
    dtypes = {p.dtype for n, p in model.named_parameters() if model.parameter_role(n)}
    assert dtypes == {torch.float32}
    out = model(**batch_for("llama"))
    assert out.logits.dtype == torch.bfloat16
    bf16 = mtpeft.get_model(BUILDERS["llama"]().to(torch.bfloat16),
                            mtpeft.LoraConfig(r=4, adapter_dtype="bfloat16"))
    assert {p.dtype for n, p in bf16.named_parameters() if bf16.parameter_role(n)} == {torch.bfloat16}


def test_meta_device_construction_then_reset_parameters():
    with torch.device("meta"):
        base = BUILDERS["llama"]()
    model = mtpeft.get_model(base, mtpeft.TaskLoraConfig(r=4, n_tasks=2))
    assert all(p.device.type == "meta" for p in model.parameters())
    model.to_empty(device="cpu")
    for _, layer in model.adapted_layers():
        layer.reset_parameters()
    a = model.adapted_layers()[0][1].lora_A
    assert a.device.type == "cpu" and torch.isfinite(a).all() and a.abs().max() <= 1 / 32 ** 0.5 + 1e-7
    assert torch.equal(model.adapted_layers()[0][1].lora_B, torch.zeros_like(model.adapted_layers()[0][1].lora_B))


def test_print_trainable_parameters_breakdown(capsys):
    _, model = make("bert", "task_lora")
    model.print_trainable_parameters()
    text = capsys.readouterr().out
    # 4 adapted layers (query, value x 2 layers), 3 tasks, r=4, d=32: 4 * 3 * 4 * (32 + 32)
    assert "task: 3,072" in text
    assert model.trainable_parameter_breakdown() == {"task": 3072}
    _, lora = make("bert", "lora")
    assert lora.trainable_parameter_breakdown() == {"shared": 4 * 4 * 64}
