"""Poly and MHR: parity with PEFT's Poly (copied weights; eval, and training with the same Gumbel noise),
a plain-loop reference, S = 1 equals LoRA with scale 1/r, init, split checks, noise granularity."""

import copy
import os
import sys

import peft
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import BUILDERS, NoiseQueue, batch, out, randomise  # noqa: E402
from _tiny import one_thread  # noqa: E402,F401  (autouse fixture)

import mtpeft  # noqa: E402
from mtpeft.lib.core.context import Route  # noqa: E402

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj", "down_proj"]}


def pair(arch, n_splits, n_tasks=3, seed=1):
    """(ours, theirs): the same base with Poly / MHR, ours randomised and copied into PEFT's."""
    base = BUILDERS[arch]()
    kw = dict(r=4, n_skills=3, n_splits=n_splits, n_tasks=n_tasks, target_modules=TARGETS[arch])
    ours = mtpeft.get_model(copy.deepcopy(base), mtpeft.PolyConfig(**kw))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PolyConfig(**kw))
    randomise(ours, seed=seed, scale=0.5)
    with torch.no_grad():
        for name, layer in ours.adapted_layers():
            t = theirs.base_model.model.get_submodule(name)
            t.poly_lora_A["default"].copy_(layer.poly_lora_A)
            t.poly_lora_B["default"].copy_(layer.poly_lora_B)
            t.poly_router["default"].module_logits.copy_(layer.module_logits)
    return ours, theirs, base


def peft_forward(theirs, b, task_ids):
    return out(theirs.base_model(**b, task_ids=task_ids))  # PolyModel.forward passes task_ids on


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("n_splits", [1, 2, 4])
def test_equals_peft_poly_in_eval(arch, n_splits):
    ours, theirs, base = pair(arch, n_splits)
    ours.eval(), theirs.eval()
    b, ids = batch(), torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        want = peft_forward(theirs, b, ids)
        got = out(ours(**b, task_ids=ids))
        plain = out(base(**b))
    assert (want - got).abs().max() < 1e-5
    assert (want - plain).abs().max() > 1e-3


def _peft_param(theirs, our_name):
    """PEFT's parameter for one of ours (base_model.<module>.<poly_lora_A|poly_lora_B|module_logits>)."""
    module, kind = our_name[len("base_model."):].rsplit(".", 1)
    layer = theirs.base_model.model.get_submodule(module)
    if kind == "module_logits":
        return layer.poly_router["default"].module_logits
    return getattr(layer, kind)["default"]


@pytest.mark.parametrize("arch,n_splits,injection", [("bert", 1, "seed"), ("bert", 2, "queue"),
                                                     ("llama", 1, "queue"), ("llama", 2, "seed")])
def test_equals_peft_poly_in_training_with_the_same_noise(arch, n_splits, injection, monkeypatch):
    """Both routers draw their uniforms with torch.rand((examples, h, S)) in the same layer order; give
    both the same draws (a shared seed, or an explicit queue standing in for torch.rand)."""
    ours, theirs, _ = pair(arch, n_splits)
    ours.train(), theirs.train()
    b, ids = batch(), torch.tensor([1, 1, 0, 2])
    n_layers = len(ours.adapted_names)
    draws = [torch.rand(4, n_splits, 3) for _ in range(n_layers)]

    def run(model, fn):
        if injection == "seed":
            torch.manual_seed(1234)
            return fn()
        with monkeypatch.context() as m:
            queue = NoiseQueue(draws)
            m.setattr(torch, "rand", queue)
            result = fn()
            assert not queue.draws  # every layer drew exactly once
            return result

    got = run(ours, lambda: out(ours(**b, task_ids=ids)))
    want = run(theirs, lambda: peft_forward(theirs, b, ids))
    assert (want - got).abs().max() < 1e-5
    got.pow(2).sum().backward()
    want.pow(2).sum().backward()
    for name, p in ours.named_parameters():
        if ours.parameter_role(name) is not None:
            theirs_grad = _peft_param(theirs, name).grad
            assert torch.allclose(p.grad, theirs_grad, atol=1e-5, rtol=1e-4), name
    # and the noise matters: another draw gives another output
    torch.manual_seed(99)
    assert (out(ours(**b, task_ids=ids)) - got).abs().max() > 1e-4


def _reference_delta(layer, x, task, weights):
    """Plain loops over splits and skills: block q of A_t / B_t mixes head q's weights (h, S)."""
    h, s, r = layer.config.n_splits, layer.config.n_skills, layer.config.r
    din, dout = layer.in_features // h, layer.out_features // h
    a = torch.zeros(layer.in_features, r)
    b = torch.zeros(r, layer.out_features)
    for q in range(h):
        for k in range(s):
            a[q * din:(q + 1) * din] += weights[q, k] * layer.poly_lora_A[q, k]
            b[:, q * dout:(q + 1) * dout] += weights[q, k] * layer.poly_lora_B[q, k]
    return x @ a @ b / r


@pytest.mark.parametrize("n_splits", [1, 2])
def test_layer_equals_a_plain_loop_reference(n_splits):
    model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.PolyConfig(r=3, n_skills=4, n_splits=n_splits, n_tasks=3))
    randomise(model, scale=0.5)
    model.eval()
    _, layer = model.adapted_layers()[0]
    x = torch.randn(5, 6, layer.in_features)
    ids = torch.tensor([2, 0, 2, 1, 0])
    with torch.no_grad():
        got = layer.adapter_forward(x, Route(ids, None, False))
        for i, t in enumerate(ids.tolist()):
            v = torch.sigmoid(layer.module_logits[t].view(n_splits, 4))
            w = v / (v.sum(-1, keepdim=True) + 1e-12)
            assert (got[i] - _reference_delta(layer, x[i], t, w)).abs().max() < 1e-5


def test_one_skill_equals_lora_with_scale_one_over_r():
    base = BUILDERS["llama"]()
    poly = mtpeft.get_model(copy.deepcopy(base), mtpeft.PolyConfig(r=4, n_skills=1, n_tasks=3))
    lora = mtpeft.get_model(copy.deepcopy(base), mtpeft.LoraConfig(r=4, lora_alpha=1))  # s = 1 / r
    randomise(poly, scale=0.5)
    with torch.no_grad():
        for (name, p_layer), (_, l_layer) in zip(poly.adapted_layers(), lora.adapted_layers()):
            l_layer.lora_A.copy_(p_layer.poly_lora_A[0, 0].T)  # (d_in, r) -> (r, d_in)
            l_layer.lora_B.copy_(p_layer.poly_lora_B[0, 0].T)  # (r, d_out) -> (d_out, r)
    b, ids = batch(), torch.tensor([0, 2, 1, 0])
    for mode in ("eval", "train"):  # with one skill the weight is 1 whatever the noise
        getattr(poly, mode)(), getattr(lora, mode)()
        with torch.no_grad():
            assert (out(poly(**b, task_ids=ids)) - out(lora(**b))).abs().max() < 1e-5


def test_init_matches_the_spec():
    model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.PolyConfig(r=4, n_skills=3, n_splits=2, n_tasks=5))
    for _, layer in model.adapted_layers():
        h, d_in = 2, layer.in_features
        assert layer.poly_lora_A.shape == (h, 3, d_in // h, 4)
        assert layer.poly_lora_B.shape == (h, 3, 4, layer.out_features // h)
        assert layer.module_logits.shape == (5, h * 3)
        assert torch.all(layer.poly_lora_B == 0)
        assert layer.poly_lora_A.abs().max() <= (d_in // h) ** -0.5 and layer.poly_lora_A.std() > 0
        assert layer.module_logits.abs().max() <= 1e-3 and layer.module_logits.std() > 0
    roles = model.trainable_parameter_breakdown()
    assert set(roles) == {"shared", "router"}


def test_splits_must_divide_the_layer_dimensions():
    with pytest.raises(ValueError, match=r"n_splits=3 .*in_features=32 and out_features=32.*divides both"):
        mtpeft.get_model(BUILDERS["bert"](), mtpeft.PolyConfig(n_splits=3, n_tasks=2))


@pytest.mark.parametrize("granularity", ["example", "task"])
def test_noise_granularity(granularity):
    """Training: per-example noise gives two identical examples of one task different outputs; per-task
    noise gives them the same. Eval: no noise either way."""
    model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.PolyConfig(
        r=4, n_skills=3, n_tasks=2, noise_granularity=granularity))
    randomise(model, scale=0.5)
    b = batch(2, pad=False)
    b = {k: v[:1].repeat(3, 1) for k, v in b.items()}  # three copies of one example
    ids = torch.tensor([1, 1, 0])
    model.train()
    with torch.no_grad():
        o = out(model(**b, task_ids=ids))
    same = (o[0] - o[1]).abs().max() < 1e-6
    assert same == (granularity == "task")
    assert (o[0] - o[2]).abs().max() > 1e-4
    model.eval()
    with torch.no_grad():
        o = out(model(**b, task_ids=ids))
    assert torch.equal(o[0], o[1])


def test_config_defaults_and_validation():
    cfg = mtpeft.PolyConfig(n_tasks=4)
    assert (cfg.r, cfg.n_skills, cfg.n_splits, cfg.poly_type, cfg.unknown_task) == (8, 4, 1, "poly", "error")
    assert mtpeft.AdapterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="n_tasks"):
        mtpeft.PolyConfig()
    with pytest.raises(ValueError, match="poly_type"):
        mtpeft.PolyConfig(n_tasks=2, poly_type="mhr")
    with pytest.raises(ValueError, match="n_splits"):
        mtpeft.PolyConfig(n_tasks=2, n_splits=0)
    with pytest.raises(ValueError, match="noise_granularity"):
        mtpeft.PolyConfig(n_tasks=2, noise_granularity="batch")
