"""TeamLoRA: the interaction matrix, the normaliser guard, uniform routing, dropout on z, the balance
loss, default MLP targets, and the paper's parameter percentages for a LLaMA-2-7B FFN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mtpeft
from mtpeft.lib.core.routing import closed_form_parameter_count, masked_mean
from mtpeft.lib.methods.teamlora import TeamLoraConfig, interaction_weights

pytestmark = pytest.mark.usefixtures("single_thread")


# Shape helpers for the paper-percentage test (they lived in the library, which never used them).
def ffn_shapes(d_model: int, d_ff: int, n_layers: int) -> list[tuple[int, int]]:
    """(d_in, d_out) of every gated-MLP projection (gate, up, down) of a LLaMA-style stack."""
    return [(d_model, d_ff), (d_model, d_ff), (d_ff, d_model)] * n_layers


def trainable_percent(adapter_params: int, base_params: int) -> float:
    """Adapter share in %, counted as PEFT's print_trainable_parameters does: adapter / (base + adapter)."""
    return 100.0 * adapter_params / (base_params + adapter_params)


def test_defaults_follow_the_spec():
    cfg = TeamLoraConfig()
    assert (cfg.n_experts, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.balance_weight) == (4, 8, 16, 0.05, 1.0)
    assert cfg.scaling == 16 / 8 and cfg.default_targets == "mlp" and cfg.use_interaction
    assert cfg.aux_loss_weights() == {"teamlora_balance": 1.0}


@pytest.mark.parametrize("builder,want", [
    ("tiny_llama", {"gate_proj", "up_proj", "down_proj"}),
    ("tiny_bert", {"intermediate.dense", "output.dense"}),
    ("tiny_gpt2", {"mlp.c_fc", "mlp.c_proj"}),
])
def test_default_targets_are_the_mlp(builder, want, tr):
    model = mtpeft.get_model(getattr(tr, builder)(), TeamLoraConfig())
    names = model.adapted_names
    assert names and all(any(n.endswith(w) for w in want) for n in names)
    assert not any("attention" in n or "attn" in n for n in names)


def test_interaction_init_and_option(tr):
    layer = tr.standalone_layer("teamlora", n_experts=6, randomise_b=False)
    m = layer.interaction
    assert m.shape == (6, 6) and torch.equal(m.diagonal(), torch.zeros(6))
    off = m[~torch.eye(6, dtype=torch.bool)]
    assert off.abs().max() < 0.1 and off.abs().min() > 0 and off.std() > 0.02
    assert layer.parameter_roles["interaction"] == "router"
    plain = tr.standalone_layer("teamlora", n_experts=6, use_interaction=False)
    assert plain.interaction is None and "interaction" not in dict(plain.named_parameters())
    x = torch.randn(5, 12)
    phi, w = plain.gate_weights(x)
    torch.testing.assert_close(w, 6 * phi)  # ψ = φ


def test_weights_sum_to_e_and_uniform_routing_gives_one(tr):
    layer = tr.standalone_layer("teamlora", n_experts=4).eval()
    x = torch.randn(3, 5, 12)
    phi, w = layer.gate_weights(x.reshape(-1, 12))
    torch.testing.assert_close(w.sum(-1), torch.full((15,), 4.0))
    torch.testing.assert_close(w, 4 * (phi + phi @ layer.interaction) / (phi + phi @ layer.interaction).sum(-1, keepdim=True))
    with torch.no_grad():
        layer.router.zero_()
        layer.interaction.zero_()
    _, w = layer.gate_weights(x.reshape(-1, 12))
    torch.testing.assert_close(w, torch.ones(15, 4))
    # uniform routing: every expert at weight 1, i.e. one LoRA of rank E·r_B with scale α / r_B
    want = layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.reshape(-1, layer.out_features)
    torch.testing.assert_close(layer.adapter_forward(x, tr.route()), want, atol=1e-5, rtol=1e-5)


def test_normaliser_guard():
    phi = torch.softmax(torch.randn(6, 3), -1).requires_grad_()
    interaction = (-torch.eye(3)).requires_grad_()  # ψ = φ(I − I) = 0: the sum is exactly 0
    w = interaction_weights(phi, interaction, 1e-6)
    assert torch.isfinite(w).all() and torch.equal(w.detach(), torch.zeros(6, 3))
    w.sum().backward()
    assert torch.isfinite(phi.grad).all() and torch.isfinite(interaction.grad).all()
    # a tiny negative sum keeps its sign and is pushed to at least eps in magnitude
    tiny_neg = -(1 + 1e-9) * torch.eye(3)
    w = interaction_weights(phi.detach(), tiny_neg, 1e-6)
    assert torch.isfinite(w).all()
    psi = phi.detach() @ (torch.eye(3) + tiny_neg)
    torch.testing.assert_close(w, 3 * psi / -1e-6)
    # an ordinary negative sum is used as is
    neg = -3 * torch.eye(3)
    torch.testing.assert_close(interaction_weights(phi.detach(), neg, 1e-6).sum(-1), torch.full((6,), 3.0))


def test_dropout_acts_on_z_not_on_x(tr):
    layer = tr.standalone_layer("teamlora", n_experts=3, lora_dropout=0.5).train()
    x = torch.randn(2, 4, 12)
    torch.manual_seed(3)
    got = layer.adapter_forward(x, tr.route())
    torch.manual_seed(3)
    z = F.dropout(x.reshape(-1, 12) @ layer.lora_A.T, 0.5, training=True)  # (N, E·r_B): the mask's shape
    _, w = layer.gate_weights(x.reshape(-1, 12))
    gated = z * w.repeat_interleave(layer.r, dim=-1) * layer.scaling
    want = (gated @ layer.lora_B.reshape(-1, layer.out_features)).view(2, 4, -1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_balance_loss_definition(tr):
    layer = tr.standalone_layer("teamlora", n_experts=4).train()
    x = torch.randn(3, 5, 12)
    mask = torch.rand(3, 5) > 0.3
    layer.routing.recording = True
    layer.routing.aux_losses = {}
    layer.adapter_forward(x, tr.route(mask))
    got = layer.routing.aux_losses["teamlora_balance"][0]
    _, w = layer.gate_weights(x.reshape(-1, 12))
    real = w[mask.reshape(-1)]
    torch.testing.assert_close(got, ((real.mean(0) - 1) ** 2).mean())
    torch.testing.assert_close(masked_mean(w, mask.reshape(-1).float()), real.mean(0))
    with torch.no_grad():
        layer.router.zero_()
        layer.interaction.zero_()
    layer.routing.aux_losses = {}
    layer.adapter_forward(x, tr.route(mask))
    assert layer.routing.aux_losses["teamlora_balance"][0].item() == 0.0  # uniform load


def test_llama2_7b_ffn_percentages():
    """TeamLoRA's reported shares on LLaMA-2-7B's FFN (gate/up/down, 32 layers), from shapes alone.
    Shares are adapter / (base + adapter), as PEFT prints them; LoRA-32 comes out 0.68 % against the
    paper's 0.67 %, the other two match to the reported digits."""
    shapes = ffn_shapes(4096, 11008, 32)
    base = 6.74e9
    lora32 = closed_form_parameter_count(mtpeft.LoraConfig(r=32), shapes)
    lora128 = closed_form_parameter_count(mtpeft.LoraConfig(r=128), shapes)
    team = closed_form_parameter_count(TeamLoraConfig(n_experts=4, r=32), shapes)
    assert lora32 == 32 * 15104 * 96 and lora128 == 4 * lora32
    assert team == lora128 + 32 * 4 * (4096 + 4096 + 11008) + 32 * 3 * 16
    assert abs(trainable_percent(lora32, base) - 0.67) < 0.02
    assert abs(trainable_percent(lora128, base) - 2.68) < 0.005
    assert abs(trainable_percent(team, base) - 2.71) < 0.01


def test_closed_form_matches_a_real_llama_mlp(tr):
    cfg = TeamLoraConfig(n_experts=3, r=5)
    model = mtpeft.get_model(tr.tiny_llama(n_layers=3), cfg)
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert real == closed_form_parameter_count(cfg, ffn_shapes(32, 64, 3))
    cfg = TeamLoraConfig(n_experts=3, r=5, use_interaction=False)
    model = mtpeft.get_model(tr.tiny_llama(n_layers=3), cfg)
    real_plain = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert real_plain == closed_form_parameter_count(cfg, ffn_shapes(32, 64, 3)) == real - 9 * 9
