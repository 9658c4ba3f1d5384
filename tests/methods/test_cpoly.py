"""C-Poly: n_exclusive = 0 is exactly Poly; exclusive skills belong to one task; a plain-loop reference for
one and several exclusive skills; defaults."""

import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import BUILDERS, batch, grads, out, randomise  # noqa: E402
from _tiny import one_thread  # noqa: E402,F401  (autouse fixture)

import mtpeft  # noqa: E402
from mtpeft.lib.core.context import Route  # noqa: E402


@pytest.mark.parametrize("n_splits", [1, 2])
def test_no_exclusive_skills_is_exactly_poly(n_splits):
    base = BUILDERS["llama"]()
    kw = dict(r=4, n_skills=3, n_splits=n_splits, n_tasks=3)
    cpoly = mtpeft.get_model(copy.deepcopy(base), mtpeft.CPolyConfig(n_exclusive=0, **kw))
    poly = mtpeft.get_model(copy.deepcopy(base), mtpeft.PolyConfig(**kw))
    randomise(poly, scale=0.5)
    assert poly.adapter_state_dict().keys() == cpoly.adapter_state_dict().keys()
    with torch.no_grad():
        for key, value in poly.adapter_state_dict().items():
            cpoly.get_parameter(f"base_model.{key}").copy_(value)
    b, ids = batch(), torch.tensor([2, 0, 1, 2])
    for mode in ("eval", "train"):
        getattr(poly, mode)(), getattr(cpoly, mode)()
        torch.manual_seed(7)
        want = out(poly(**b, task_ids=ids))
        torch.manual_seed(7)
        got = out(cpoly(**b, task_ids=ids))
        assert torch.equal(want, got), mode


def test_a_task_never_uses_another_tasks_exclusive_skills():
    model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.CPolyConfig(n_tasks=3, n_exclusive=2))
    randomise(model, scale=0.5)
    model.eval()
    b, ids = batch(), torch.tensor([0, 2, 2, 0])
    o = out(model(**b, task_ids=ids))
    o.pow(2).sum().backward()
    g = grads(model)
    for name, layer in model.adapted_layers():
        for kind in ("exclusive_lora_A", "exclusive_lora_B", "exclusive_logits"):
            grad = g[f"base_model.{name}.{kind}"]
            assert grad[1].abs().sum() == 0, (name, kind)  # task 1 is absent
            assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
    # changing task 1's exclusive skills leaves tasks 0 and 2 unchanged
    with torch.no_grad():
        for _, layer in model.adapted_layers():
            layer.exclusive_lora_A[1].normal_()
            layer.exclusive_lora_B[1].normal_()
        assert torch.equal(out(model(**b, task_ids=ids)), o.detach())


@pytest.mark.parametrize("n_exclusive,n_splits", [(1, 1), (2, 1), (3, 2)])
def test_layer_equals_a_plain_loop_reference(n_exclusive, n_splits):
    cfg = mtpeft.CPolyConfig(r=3, n_skills=2, n_exclusive=n_exclusive, n_splits=n_splits, n_tasks=3)
    model = mtpeft.get_model(BUILDERS["llama"](), cfg)
    randomise(model, scale=0.5)
    model.eval()
    _, layer = model.adapted_layers()[0]
    h, r = n_splits, 3
    din, dout = layer.in_features // h, layer.out_features // h
    x = torch.randn(4, 5, layer.in_features)
    ids = torch.tensor([1, 0, 2, 1])

    def norm(logits):
        v = torch.sigmoid(logits)
        return v / (v.sum(-1, keepdim=True) + 1e-12)

    with torch.no_grad():
        got = layer.adapter_forward(x, Route(ids, None, False))
        for i, t in enumerate(ids.tolist()):
            wc = norm(layer.module_logits[t].view(h, 2))
            we = torch.ones(h, 1) if n_exclusive == 1 else norm(layer.exclusive_logits[t].view(h, n_exclusive))
            a, b = torch.zeros(layer.in_features, r), torch.zeros(r, layer.out_features)
            for q in range(h):
                rows, cols = slice(q * din, (q + 1) * din), slice(q * dout, (q + 1) * dout)
                for k in range(2):
                    a[rows] += wc[q, k] * layer.poly_lora_A[q, k]
                    b[:, cols] += wc[q, k] * layer.poly_lora_B[q, k]
                for j in range(n_exclusive):
                    a[rows] += we[q, j] * layer.exclusive_lora_A[t, q, j]
                    b[:, cols] += we[q, j] * layer.exclusive_lora_B[t, q, j]
            assert (got[i] - x[i] @ a @ b / r).abs().max() < 1e-5


def test_exclusive_logits_only_with_several_exclusive_skills():
    one = mtpeft.get_model(BUILDERS["bert"](), mtpeft.CPolyConfig(n_tasks=2, n_exclusive=1))
    two = mtpeft.get_model(BUILDERS["bert"](), mtpeft.CPolyConfig(n_tasks=2, n_exclusive=2))
    _, layer1 = one.adapted_layers()[0]
    _, layer2 = two.adapted_layers()[0]
    assert not hasattr(layer1, "exclusive_logits")
    assert layer2.exclusive_logits.shape == (2, 2) and layer2.exclusive_logits.abs().max() <= 1e-3
    assert torch.all(layer1.exclusive_lora_B == 0)
    assert layer1.exclusive_lora_A.abs().max() <= layer1.in_features ** -0.5
    roles = {n.rsplit(".", 1)[-1]: two.parameter_role(n) for n, _ in two.named_parameters() if two.parameter_role(n)}
    assert roles == {"poly_lora_A": "shared", "poly_lora_B": "shared", "module_logits": "router",
                     "exclusive_lora_A": "task", "exclusive_lora_B": "task", "exclusive_logits": "router"}


def test_defaults():
    cfg = mtpeft.CPolyConfig(n_tasks=4)
    assert (cfg.n_skills, cfg.n_exclusive, cfg.r, cfg.n_splits, cfg.unknown_task) == (3, 1, 2, 1, "error")
    model = mtpeft.get_model(BUILDERS["llama"](), cfg)
    assert [n.rsplit(".", 1)[-1] for n in model.adapted_names] == ["q_proj", "v_proj"] * 2
    assert mtpeft.AdapterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="n_exclusive"):
        mtpeft.CPolyConfig(n_tasks=2, n_exclusive=-1)
