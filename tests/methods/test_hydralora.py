"""HydraLoRA: dense softmax gates over the B heads, the shared A computed once per token, the optional
balance loss, and E=1 against mtpeft's LoRA with dropout active."""

from __future__ import annotations

import copy

import pytest
import torch

import mtpeft
from mtpeft.lib.methods.hydralora import HydraLoraConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def test_defaults_and_no_aux_loss_by_default(tr):
    cfg = HydraLoraConfig()
    assert (cfg.n_experts, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.balance_weight) == (4, 8, 16, 0.05, 0.0)
    assert cfg.aux_loss_weights() == {}
    assert HydraLoraConfig(balance_weight=0.1).aux_loss_weights() == {"hydralora_balance": 0.1}
    layer = tr.standalone_layer("hydralora").train()
    layer.routing.recording = True
    layer.adapter_forward(torch.randn(2, 3, 12), tr.route())
    assert layer.routing.aux_losses == {}


def test_dense_gates_sum_to_one_and_every_head_contributes(tr):
    layer = tr.standalone_layer("hydralora", n_experts=5).eval()
    x = torch.randn(4, 6, 12)
    probs = torch.softmax(x @ layer.router.T, -1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 6))
    z = x @ layer.lora_A.T  # the shared A
    want = layer.scaling * sum(probs[..., e:e + 1] * (z @ layer.lora_B[e]) for e in range(5))
    torch.testing.assert_close(layer.adapter_forward(x, tr.route()), want, atol=1e-5, rtol=1e-5)
    layer.routing.recording = True
    layer.adapter_forward(x, tr.route(record=True))
    stats = layer.routing.router_stats["probe"]
    torch.testing.assert_close(stats["gate_mean"], stats["prob_mean"])  # dense: the gate is the softmax
    torch.testing.assert_close(stats["gate_mean"], probs.reshape(-1, 5).mean(0))


def test_shared_A_is_applied_once_per_forward(tr):
    """The A GEMM runs once whatever E (a known bug elsewhere recomputes it per head)."""
    for e in (1, 4, 16):
        layer = tr.standalone_layer("hydralora", n_experts=e).eval()
        gemms = tr.count_gemms(lambda: layer.adapter_forward(torch.randn(3, 7, 12), tr.route()))
        a_gemms = [shapes for shapes in gemms if shapes[1] == (12, layer.r)]  # x (N, d_in) @ Aᵀ (d_in, r)
        assert len(a_gemms) == 1 and len(gemms) == 3, gemms  # A, router, B_cat


def test_optional_balance_loss_uses_the_top_gate(tr):
    layer = tr.standalone_layer("hydralora", n_experts=4, balance_weight=0.5).train()
    x = torch.randn(2, 9, 12)
    layer.routing.recording = True
    layer.adapter_forward(x, tr.route())
    got = layer.routing.aux_losses["hydralora_balance"][0]
    probs = torch.softmax(x.reshape(-1, 12) @ layer.router.T, -1)
    f = torch.nn.functional.one_hot(probs.argmax(-1), 4).float().mean(0)
    torch.testing.assert_close(got, 4 * (f * probs.mean(0)).sum())
    assert layer.routing.aux_weights["hydralora_balance"] == 0.5


def test_one_head_equals_lora_with_dropout(tr):
    """E=1 equals LoRA also in training mode: both draw the same dropout mask on x."""
    base = tr.tiny_llama()
    model = mtpeft.get_model(copy.deepcopy(base), HydraLoraConfig(n_experts=1, r=4, lora_alpha=8, lora_dropout=0.3))
    lora = mtpeft.get_model(base, mtpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3,
                                                    target_modules=list(model.adapted_names)))
    tr.randomise(model)
    with torch.no_grad():
        for (_, a), (_, b) in zip(model.adapted_layers(), lora.adapted_layers()):
            b.lora_A.copy_(a.lora_A)
            b.lora_B.copy_(a.lora_B[0].T)
    model.train()
    lora.train()
    batch = tr.token_batch()
    torch.manual_seed(5)
    got = model(**batch).logits
    torch.manual_seed(5)
    want = lora(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
