"""MoELoRA: top-k gates, the Switch balance loss, the expert contrastive loss (against a plain loop),
pair sampling, and the degenerate E=1 case against mtpeft's LoRA."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import mtpeft
from mtpeft.lib.core.routing import switch_balance_loss, top_k_gates
from mtpeft.lib.methods.moelora import MoELoraConfig, expert_contrastive_loss, sample_pairs

pytestmark = pytest.mark.usefixtures("single_thread")


def test_defaults_follow_the_spec():
    cfg = MoELoraConfig()
    assert (cfg.n_experts, cfg.top_k, cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 2, 4, 8, 0.05)
    assert cfg.n_experts * cfg.r == 32 and cfg.lora_alpha == 2 * cfg.r and cfg.scaling == 2.0
    assert cfg.aux_loss_weights() == {"moelora_balance": 0.01, "moelora_contrastive": 0.1}
    assert (cfg.contrastive_temperature, cfg.contrastive_sample_size, cfg.contrastive_pairs) == (0.1, 512, "all")
    assert cfg.default_targets == "attention_qv"
    with pytest.raises(ValueError, match="top_k=3 exceeds n_experts=2"):
        MoELoraConfig(n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="contrastive_pairs"):
        MoELoraConfig(contrastive_pairs="some")
    with pytest.raises(ValueError, match="temperature"):
        MoELoraConfig(contrastive_temperature=0)


@pytest.mark.parametrize("e,k", [(8, 2), (5, 1), (4, 3), (3, 3)])
def test_top_k_weights_sum_to_one(e, k):
    probs = torch.softmax(torch.randn(50, e), -1)
    gates, selected = top_k_gates(probs, k)
    assert (selected.sum(-1) == k).all() and ((gates > 0) == selected).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(50))
    top = probs.topk(k, -1)
    torch.testing.assert_close(gates.gather(-1, top.indices), top.values / top.values.sum(-1, keepdim=True))


def test_switch_balance_loss_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(30, 6, generator=g), -1)
    _, selected = top_k_gates(probs, 2)
    mask = torch.rand(30, generator=g) > 0.4
    real = mask.nonzero().flatten().tolist()
    f = [sum(float(selected[t, e]) for t in real) / (2 * len(real)) for e in range(6)]
    p = [sum(float(probs[t, e]) for t in real) / len(real) for e in range(6)]
    want = 6 * sum(fe * pe for fe, pe in zip(f, p))
    torch.testing.assert_close(switch_balance_loss(probs, selected, 2, mask.float()).item(), want, rtol=1e-6, atol=1e-6)
    # balanced routing gives 1
    uniform = torch.full((8, 4), 0.25)
    sel = torch.zeros(8, 4, dtype=torch.bool)
    sel[torch.arange(8), torch.arange(8) % 4] = True
    torch.testing.assert_close(switch_balance_loss(uniform, sel, 1, None), torch.tensor(1.0))


def _contrastive_loop(outputs, experts, ok, tau):
    """SupCon over valid pairs: the definition, one anchor and one pair at a time."""
    u = F.normalize(outputs.double(), dim=-1)
    idx = [i for i in range(len(ok)) if ok[i]]
    total, anchors = 0.0, 0
    for i in idx:
        others = [j for j in idx if j != i]
        positives = [j for j in others if experts[j] == experts[i]]
        if not positives:
            continue
        denom = sum(math.exp(float(u[i] @ u[a]) / tau) for a in others)
        total += -sum(float(u[i] @ u[p]) / tau - math.log(denom) for p in positives) / len(positives)
        anchors += 1
    return total / max(anchors, 1)


@pytest.mark.parametrize("m,e,tau", [(12, 3, 0.1), (20, 4, 0.5), (7, 7, 0.1), (9, 2, 1.0)])
def test_contrastive_loss_matches_a_loop(m, e, tau):
    g = torch.Generator().manual_seed(m)
    outputs = torch.randn(m, 5, generator=g)
    experts = torch.randint(0, e, (m,), generator=g)
    ok = torch.rand(m, generator=g) > 0.2
    got = expert_contrastive_loss(outputs, experts, ok, tau)
    assert abs(got.item() - _contrastive_loop(outputs, experts, ok, tau)) < 1e-5
    # all pairs invalid (or no positives): 0, finite, no nan gradient
    outputs.requires_grad_(True)
    zero = expert_contrastive_loss(outputs, torch.arange(m), ok, tau)
    zero.backward()
    assert zero.item() == 0.0 and torch.isfinite(outputs.grad).all()


def test_contrastive_loss_pulls_same_expert_outputs_together():
    experts = torch.tensor([0, 0, 0, 1, 1, 1])
    ok = torch.ones(6, dtype=torch.bool)
    clustered = torch.tensor([[1.0, 0], [1, 0.1], [1, -0.1], [0, 1], [0.1, 1], [-0.1, 1]])
    mixed = clustered[[0, 3, 1, 4, 2, 5]]
    assert expert_contrastive_loss(clustered, experts, ok, 0.1) < expert_contrastive_loss(mixed, experts, ok, 0.1)


def test_sample_pairs_respects_validity_and_size():
    torch.manual_seed(0)
    valid = torch.rand(40, 8) > 0.5
    token, expert, ok = sample_pairs(40, 8, 64, valid, "cpu")
    assert token.shape == expert.shape == ok.shape == (64,)
    assert ok.all() and valid[token, expert].all()
    assert len(set(zip(token.tolist(), expert.tolist()))) == 64  # distinct pairs
    token, expert, ok = sample_pairs(5, 3, 512, None, "cpu")  # fewer pairs than the budget: all of them
    assert ok.all() and len(set(zip(token.tolist(), expert.tolist()))) == 15
    few = torch.zeros(5, 3, dtype=torch.bool)
    few[1, 2] = few[3, 0] = True
    token, expert, ok = sample_pairs(5, 3, 10, few, "cpu")
    assert int(ok.sum()) == 2 and set(zip(token[ok].tolist(), expert[ok].tolist())) == {(1, 2), (3, 0)}


def _layer_aux(layer, x, mask, tr, seed=0):
    layer.routing.recording = True
    layer.routing.aux_losses = {}
    torch.manual_seed(seed)
    layer.adapter_forward(x, tr.route(mask))
    return {k: v[0] for k, v in layer.routing.aux_losses.items()}


def test_contrastive_loss_at_init_is_constant_with_zero_gradient(tr):
    layer = tr.standalone_layer("moelora", randomise_b=False).train()
    x = torch.randn(2, 5, 12)
    aux = _layer_aux(layer, x, None, tr)
    m = min(512, 10 * 8)
    torch.testing.assert_close(aux["moelora_contrastive"].item(), math.log(m - 1), atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(aux["moelora_contrastive"], [layer.lora_A, layer.lora_B])
    assert all(torch.isfinite(g).all() and g.abs().sum() == 0 for g in grads)


def test_contrastive_loss_reaches_experts_not_router_and_ignores_padding(tr):
    layer = tr.standalone_layer("moelora", contrastive_sample_size=24).train()
    x = torch.randn(3, 6, 12)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 2:] = False
    aux = _layer_aux(layer, x, mask, tr)
    loss = aux["moelora_contrastive"]
    ga, gb, gr = torch.autograd.grad(loss, [layer.lora_A, layer.lora_B, layer.router], allow_unused=True)
    assert ga.abs().sum() > 0 and gb.abs().sum() > 0 and gr is None
    x2 = x.clone()
    x2[1, 2:] = 100.0  # padded tokens: never sampled
    torch.testing.assert_close(_layer_aux(layer, x2, mask, tr)["moelora_contrastive"], loss)


def test_routed_pairs_only_sample_top_k_experts(tr, monkeypatch):
    import mtpeft.lib.methods.moelora as mod

    seen = {}
    original = mod.sample_pairs

    def spy(n, e, size, valid, device):
        seen["valid"] = valid
        out = original(n, e, size, valid, device)
        seen["out"] = out
        return out

    monkeypatch.setattr(mod, "sample_pairs", spy)
    layer = tr.standalone_layer("moelora", contrastive_pairs="routed").train()
    x = torch.randn(2, 7, 12)
    _layer_aux(layer, x, None, tr)
    probs = torch.softmax(x.reshape(-1, 12) @ layer.router.T, -1)
    _, selected = top_k_gates(probs, 2)
    assert torch.equal(seen["valid"], selected)
    token, expert, ok = seen["out"]
    assert selected[token[ok], expert[ok]].all() and int(ok.sum()) == 14 * 2


def test_balance_loss_summed_over_modules_from_router_stats(tr):
    """The recorded total equals Σ_modules E·Σ_e f_e·P_e rebuilt from each module's statistics."""
    model = mtpeft.get_model(tr.tiny_llama(), tr.make_config("moelora"))
    tr.randomise(model)
    model.train()
    out = model(**tr.token_batch())
    want = 0.0
    for s in out.router_stats.values():
        f = s["topk_count"] / (s["top_k"] * s["tokens"])
        want += len(f) * float((f * s["prob_mean"]).sum())
    torch.testing.assert_close(out.aux_losses["moelora_balance"].item(), want, rtol=1e-5, atol=1e-5)


def test_one_expert_top_one_equals_lora_on_bert(tr):
    base = tr.tiny_bert()
    model = mtpeft.get_model(copy.deepcopy(base), MoELoraConfig(n_experts=1, top_k=1, r=4, lora_alpha=8))
    lora = mtpeft.get_model(base, mtpeft.LoraConfig(r=4, lora_alpha=8, target_modules=list(model.adapted_names)))
    tr.randomise(model)
    with torch.no_grad():
        for (_, a), (_, b) in zip(model.adapted_layers(), lora.adapted_layers()):
            b.lora_A.copy_(a.lora_A[0])
            b.lora_B.copy_(a.lora_B[0].T)
    model.eval()
    lora.eval()
    batch = tr.token_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state, lora(**batch).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ok_share", [1.0, 0.5, 0.0])
def test_masked_logsumexp_of_products_equals_autograd_logsumexp(ok_share):
    """The hand-written forward and backward equal autograd's logsumexp over the masked (M, M) logits,
    and pass torch's gradcheck in fp64; rows without any candidate (ok_share = 0) pass no gradient."""
    from mtpeft.lib.methods.moelora import masked_logsumexp_of_products

    g = torch.Generator().manual_seed(3)
    m, k, scale = 37, 6, 10.0
    a = torch.randn(m, k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(m, k, generator=g, dtype=torch.float64, requires_grad=True)
    ok = torch.rand(m, generator=g) < ok_share
    excluded = torch.eye(m, dtype=torch.bool) | ~ok[None, :]
    want = torch.logsumexp((a @ b.T * scale).masked_fill(excluded, -1e9), dim=1)
    got = masked_logsumexp_of_products(a, b, ok, scale)
    # A row without candidates: near -1e9 (exactly which value is unspecified), with no gradient.
    none = excluded.all(1)
    assert bool((got[none] < -0.9e9).all()) and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got[~none], want[~none])
    want = torch.where(none, got.detach(), want)
    cot = torch.randn(m, generator=g, dtype=torch.float64)
    for x, y in zip(torch.autograd.grad(got, (a, b), cot), torch.autograd.grad(want, (a, b), cot)):
        torch.testing.assert_close(x, y)
    if not none.any():  # in fp64 a no-candidate row still varies with a, b (by design, not in fp32)
        assert torch.autograd.gradcheck(lambda a, b: masked_logsumexp_of_products(a, b, ok, scale), (a, b))
