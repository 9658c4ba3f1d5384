"""MTL-LoRA: n = 1 with Λ = I equals LoRA, a plain-loop reference, init, fp32 mixing weights, defaults."""

import copy
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import BUILDERS, batch, out, randomise  # noqa: E402
from _tiny import one_thread  # noqa: E402,F401  (autouse fixture)

import mtpeft  # noqa: E402
from mtpeft.lib.core.context import Route  # noqa: E402


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_up_projection_with_identity_lambda_equals_lora(arch):
    base = BUILDERS[arch]()
    mtl = mtpeft.get_model(copy.deepcopy(base), mtpeft.MTLLoraConfig(r=4, lora_alpha=8, n_up=1, n_tasks=3,
                                                                     lora_dropout=0.0))
    lora = mtpeft.get_model(copy.deepcopy(base), mtpeft.LoraConfig(r=4, lora_alpha=8,
                                                                   target_modules=mtl.adapted_names))
    randomise(mtl, scale=0.3)
    with torch.no_grad():
        for (_, m), (_, l) in zip(mtl.adapted_layers(), lora.adapted_layers()):
            m.lora_lambda.copy_(torch.eye(4).expand(3, 4, 4))
            l.lora_A.copy_(m.lora_A)
            l.lora_B.copy_(m.lora_B[0])
        b = batch()
        want = out(lora(**b))
        for ids in ([0, 0, 0, 0], [2, 1, 0, 2]):
            assert (out(mtl(**b, task_ids=torch.tensor(ids))) - want).abs().max() < 1e-5


@pytest.mark.parametrize("lambda_type", ["full", "diagonal"])
def test_layer_equals_a_plain_loop_reference(lambda_type):
    cfg = mtpeft.MTLLoraConfig(r=4, lora_alpha=12, n_up=3, n_tasks=3, temperature=0.5, lora_dropout=0.0,
                               lambda_type=lambda_type)
    model = mtpeft.get_model(BUILDERS["llama"](), cfg)
    randomise(model, scale=0.5)
    _, layer = model.adapted_layers()[0]
    x = torch.randn(5, 6, layer.in_features)
    ids = torch.tensor([2, 0, 2, 1, 0])
    with torch.no_grad():
        got = layer.adapter_forward(x, Route(ids, None, False))
        for i, t in enumerate(ids.tolist()):
            logits = layer.task_logits[t].tolist()
            z = [math.exp(v / 0.5) for v in logits]
            pi = [v / sum(z) for v in z]
            b_mix = sum(pi[k] * layer.lora_B[k] for k in range(3))  # (d_out, r)
            lam = layer.lora_lambda[t] if lambda_type == "full" else torch.diag(layer.lora_lambda[t])
            want = (12 / 4) * x[i] @ (b_mix @ lam @ layer.lora_A).T
            assert (got[i] - want).abs().max() < 1e-5


def test_init_matches_the_spec():
    model = mtpeft.get_model(BUILDERS["bert"](), mtpeft.MTLLoraConfig(n_tasks=4, n_up=3))
    for _, layer in model.adapted_layers():
        assert layer.lora_A.shape == (8, layer.in_features)
        assert layer.lora_B.shape == (3, layer.out_features, 8) and torch.all(layer.lora_B == 0)
        assert torch.equal(layer.lora_lambda, torch.eye(8).expand(4, 8, 8))
        assert layer.task_logits.shape == (4, 3)
        assert layer.task_logits.abs().max() <= 3 ** -0.5 and layer.task_logits.std() > 0
    diag = mtpeft.get_model(BUILDERS["bert"](), mtpeft.MTLLoraConfig(n_tasks=4, lambda_type="diagonal",
                                                                     router_init="zeros"))
    _, layer = diag.adapted_layers()[0]
    assert torch.equal(layer.lora_lambda, torch.ones(4, 8))
    assert torch.equal(layer.task_logits, torch.zeros(4, 3))
    assert torch.allclose(layer.mixing_weights(torch.arange(4)), torch.full((4, 3), 1 / 3))
    assert model.trainable_parameter_breakdown().keys() == {"shared", "task", "router"}


def test_mixing_weights_are_fp32_with_bf16_adapters():
    model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.MTLLoraConfig(n_tasks=2, adapter_dtype="bfloat16"))
    randomise(model)
    _, layer = model.adapted_layers()[0]
    assert layer.lora_A.dtype == torch.bfloat16
    pi = layer.mixing_weights(torch.tensor([0, 1]))
    assert pi.dtype == torch.float32
    assert torch.allclose(pi.sum(-1), torch.ones(2))
    want = torch.softmax(layer.task_logits.float() / 0.1, -1)
    assert torch.equal(pi, want)
    with torch.no_grad():
        o = out(model(**batch(), task_ids=torch.tensor([0, 1, 1, 0])))
    assert o.dtype == torch.float32 and torch.isfinite(o).all()


def test_dropout_acts_in_training_only():
    model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.MTLLoraConfig(n_tasks=2, lora_dropout=0.5))
    randomise(model)
    b, ids = batch(), torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        model.eval()
        e1, e2 = out(model(**b, task_ids=ids)), out(model(**b, task_ids=ids))
        model.train()
        t1 = out(model(**b, task_ids=ids))
    assert torch.equal(e1, e2) and (t1 - e1).abs().max() > 1e-4


def test_defaults_and_validation():
    cfg = mtpeft.MTLLoraConfig(n_tasks=3)
    assert (cfg.r, cfg.lora_alpha, cfg.n_up, cfg.temperature, cfg.lora_dropout) == (8, 16, 3, 0.1, 0.05)
    assert (cfg.lambda_type, cfg.router_init, cfg.unknown_task) == ("full", "kaiming", "error")
    model = mtpeft.get_model(BUILDERS["llama"](), cfg)
    assert [n.rsplit(".", 1)[-1] for n in model.adapted_names] == ["q_proj", "k_proj", "v_proj", "o_proj"] * 2
    assert mtpeft.AdapterConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (dict(temperature=0), dict(lambda_type="lower"), dict(router_init="normal"), dict(n_up=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            mtpeft.MTLLoraConfig(n_tasks=3, **bad)
