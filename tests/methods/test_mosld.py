"""MoSLD: the per-layer expert schedule, DropConnect on the shared A (training only, one mask per
forward, unbiased), the balance loss summed over layers, and configuration errors."""

from __future__ import annotations

import pytest
import torch

import mtpeft
from mtpeft.lib.methods.mosld import MoSLDConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def test_defaults_follow_the_spec():
    cfg = MoSLDConfig()
    assert (cfg.r, cfg.lora_alpha, cfg.top_k, cfg.dropconnect, cfg.balance_weight) == (8, 16, 2, 0.1, 0.001)
    assert cfg.expert_schedule == "increasing" and cfg.expert_counts == [2, 4, 6, 8]
    assert cfg.aux_loss_weights() == {"mosld_balance": 0.001}
    assert cfg.default_targets == "attention_qv"


@pytest.mark.parametrize("n_layers,schedule,want", [
    (4, "increasing", [2, 4, 6, 8]),
    (4, "decreasing", [8, 6, 4, 2]),
    (8, "increasing", [2, 2, 4, 4, 6, 6, 8, 8]),
    (2, "increasing", [2, 6]),
    (4, "flat", [3, 3, 3, 3]),
])
def test_expert_schedule_over_the_layer_stack(n_layers, schedule, want, tr):
    cfg = MoSLDConfig(expert_schedule=schedule, n_experts=3)
    assert [cfg.experts_for_layer(i, n_layers) for i in range(n_layers)] == want
    if n_layers in (2, 4):
        model = mtpeft.get_model(tr.tiny_bert(n_layers=n_layers), cfg)
        got = {}
        for name, layer in model.adapted_layers():
            got.setdefault(layer.layer_index, set()).add(layer.n_experts)
            assert layer.lora_B.shape[0] == layer.router.shape[0] == layer.n_experts
            assert layer.lora_A.shape == (8, 32)  # one shared A whatever E
        assert [got[i] for i in range(n_layers)] == [{n} for n in want]


def test_configuration_errors():
    with pytest.raises(ValueError, match="top_k=3 exceeds the smallest expert count 2"):
        MoSLDConfig(top_k=3)
    MoSLDConfig(top_k=3, expert_counts=[4, 4, 6, 8])
    with pytest.raises(ValueError, match="4 counts"):
        MoSLDConfig(expert_counts=[2, 4, 8])
    with pytest.raises(ValueError, match="expert_schedule"):
        MoSLDConfig(expert_schedule="random")
    with pytest.raises(ValueError, match="dropconnect"):
        MoSLDConfig(dropconnect=1.0)


def test_dropconnect_only_in_training(tr):
    layer = tr.standalone_layer("mosld", expert_schedule="flat", n_experts=4, dropconnect=0.3)
    x = torch.randn(2, 6, 12)
    layer.eval()
    first, second = layer.adapter_forward(x, tr.route()), layer.adapter_forward(x, tr.route())
    assert torch.equal(first, second)  # eval: Ã = A, deterministic
    torch.testing.assert_close(first, layer.reference_forward(x))
    assert layer.shared_A() is layer.lora_A
    layer.train()
    a, b = layer.adapter_forward(x, tr.route()), layer.adapter_forward(x, tr.route())
    assert not torch.allclose(a, b)  # a fresh mask per forward
    assert not torch.allclose(a, first)
    mosl = tr.standalone_layer("mosld", expert_schedule="flat", n_experts=4, dropconnect=0.0).train()
    assert torch.equal(mosl.adapter_forward(x, tr.route()), mosl.adapter_forward(x, tr.route()))  # p=0: "MoSL"


def test_dropconnect_is_one_weight_mask_per_forward(tr):
    """Training output == the eval formula with Ã = mask ⊙ A / (1-p), one Bernoulli mask of A's shape."""
    p = 0.25
    layer = tr.standalone_layer("mosld", expert_schedule="flat", n_experts=3, dropconnect=p).train()
    x = torch.randn(3, 5, 12)
    torch.manual_seed(7)
    got = layer.adapter_forward(x, tr.route())
    torch.manual_seed(7)
    keep = torch.rand_like(layer.lora_A) >= p
    assert keep.shape == layer.lora_A.shape
    with torch.no_grad():
        saved = layer.lora_A.clone()
        layer.lora_A.mul_(keep / (1 - p))
        layer.eval()
        want = layer.adapter_forward(x, tr.route())
        layer.lora_A.copy_(saved)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # the mask multiplies A's weights, so the gradient of A is zero exactly where it dropped
    layer.train()
    torch.manual_seed(7)
    grad = torch.autograd.grad(layer.adapter_forward(x, tr.route()).sum(), layer.lora_A)[0]
    assert (grad[~keep] == 0).all() and (grad[keep] != 0).all()


def test_dropconnect_is_unbiased(tr):
    layer = tr.standalone_layer("mosld", dropconnect=0.1).train()
    torch.manual_seed(0)
    mean = torch.stack([layer.shared_A().detach() for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, layer.lora_A.detach(), atol=0.03, rtol=0.05)


def test_balance_loss_summed_over_layers_with_their_own_expert_counts(tr):
    model = mtpeft.get_model(tr.tiny_llama(n_layers=4), MoSLDConfig(n_tasks=3))
    tr.randomise(model)
    model.train()
    out = model(**tr.token_batch())
    want, counts = 0.0, set()
    for s in out.router_stats.values():
        f = s["topk_count"] / (s["top_k"] * s["tokens"])
        counts.add(len(f))
        want += len(f) * float((f * s["prob_mean"]).sum())
    assert counts == {2, 4, 6, 8}
    torch.testing.assert_close(out.aux_losses["mosld_balance"].item(), want, rtol=1e-5, atol=1e-5)


def test_mosl_equals_mosld_in_eval(tr):
    a = tr.standalone_layer("mosld", dropconnect=0.1, seed=3).eval()
    b = tr.standalone_layer("mosld", dropconnect=0.0, seed=3).eval()
    x = torch.randn(4, 12)
    torch.testing.assert_close(a.adapter_forward(x, tr.route()), b.adapter_forward(x, tr.route()))
