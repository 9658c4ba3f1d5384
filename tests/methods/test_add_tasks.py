"""add_tasks: old tasks unchanged, new tasks initialised as at construction, train_only_routing trains
only the new routing logits, save / load and export after growing, errors."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import BUILDERS, N_TASKS, VARIANTS, batch, out, randomise  # noqa: E402
from _tiny import one_thread  # noqa: E402,F401  (autouse fixture)

import mtpeft  # noqa: E402
from mtpeft.lib.core.context import Route  # noqa: E402

GROWABLE = {**{k: VARIANTS[k] for k in ("mtl_lora", "mtl_lora_diag", "poly", "mhr", "cpoly", "cpoly_e2")},
            "task_lora": lambda **kw: mtpeft.TaskLoraConfig(**{"r": 4, "n_tasks": N_TASKS, **kw})}


def grown(variant, n=2, **kw):
    model = mtpeft.get_model(BUILDERS["llama"](), GROWABLE[variant]())
    randomise(model)
    model.eval()
    b = batch()
    with torch.no_grad():
        before = out(model(**b, task_ids=torch.tensor([0, 2, 1, 2])))
    model.add_tasks(n, **kw)
    return model, b, before


@pytest.mark.parametrize("variant", list(GROWABLE))
def test_old_tasks_unchanged_and_new_rows_initialised_as_at_construction(variant):
    model, b, before = grown(variant, n=2)
    assert model.config.n_tasks == N_TASKS + 2
    with torch.no_grad():
        after = out(model(**b, task_ids=torch.tensor([0, 2, 1, 2])))
        new = out(model(**b, task_ids=torch.tensor([3, 4, 4, 3])))
    assert torch.equal(before, after)
    assert torch.isfinite(new).all()
    new_rows = slice(N_TASKS, N_TASKS + 2)
    for _, layer in model.adapted_layers():
        if variant == "task_lora":
            assert torch.all(layer.lora_B[new_rows] == 0) and layer.lora_A.shape[0] == 5
            assert layer.lora_A[new_rows].abs().max() <= layer.in_features ** -0.5
            continue
        if variant.startswith("mtl_lora"):
            lam = layer.lora_lambda[new_rows]
            want = torch.eye(4).expand(2, 4, 4) if variant == "mtl_lora" else torch.ones(2, 4)
            assert torch.equal(lam, want)
            bound = layer.task_logits.shape[1] ** -0.5
            assert layer.task_logits[new_rows].abs().max() <= bound and layer.task_logits[new_rows].std() > 0
            continue
        assert layer.module_logits.shape[0] == 5
        assert layer.module_logits[new_rows].abs().max() <= 1e-3 and layer.module_logits[new_rows].std() > 0
        if variant.startswith("cpoly"):
            assert torch.all(layer.exclusive_lora_B[new_rows] == 0)
            assert layer.exclusive_lora_A[new_rows].abs().max() <= (layer.in_features // layer.config.n_splits) ** -0.5
            if variant == "cpoly_e2":
                assert layer.exclusive_logits[new_rows].abs().max() <= 1e-3


@pytest.mark.parametrize("variant", ["mtl_lora", "poly", "mhr", "cpoly", "task_lora"])
def test_new_task_output_at_init(variant):
    """The new task's update follows the formula with its fresh parameters: per-task LoRA adds nothing
    (B = 0); MTL-LoRA uses Λ = I and its fresh mixing weights; Poly / MHR start from near-uniform skill
    weights (logits U(±1e-3)); C-Poly adds its fresh exclusive skill (A random, B = 0) to that mixture."""
    model, b, _ = grown(variant, n=1)
    _, layer = model.adapted_layers()[0]
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        got = layer.adapter_forward(x, Route(torch.tensor([N_TASKS, N_TASKS]), None, False))
        if variant == "task_lora":
            want = torch.zeros_like(got)
        elif variant == "mtl_lora":
            pi = torch.softmax(layer.task_logits[N_TASKS] / layer.config.temperature, -1)
            b_mix = torch.einsum("n,nor->or", pi, layer.lora_B)
            want = layer.scaling * x @ layer.lora_A.T @ b_mix.T  # Λ = I
        else:
            h, s, r = layer.config.n_splits, layer.config.n_skills, layer.config.r
            a_t = layer.poly_lora_A.mean(1)  # uniform weights 1/S: (h, d_in/h, r)
            b_t = layer.poly_lora_B.mean(1)  # (h, r, d_out/h)
            if variant == "cpoly":
                a_t = a_t + layer.exclusive_lora_A[N_TASKS, :, 0]
                b_t = b_t + layer.exclusive_lora_B[N_TASKS, :, 0]  # zeros
            a_t = a_t.reshape(layer.in_features, r)
            b_t = b_t.transpose(0, 1).reshape(r, layer.out_features)
            want = x @ a_t @ b_t / r
            tolerance = 2e-3 * want.abs().max()  # logits U(±1e-3): weights within ~1e-3 of uniform
            assert (got - want).abs().max() < tolerance
            return
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("variant", ["mtl_lora", "poly", "mhr", "cpoly_e2"])
def test_train_only_routing_trains_only_the_new_logits(variant):
    model, b, before = grown(variant, n=1, train_only_routing=True)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable <= {"task_logits", "module_logits", "exclusive_logits"}
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if model.parameter_role(n)}
    # weight decay on every group: the masked rows must not move even so
    opt = torch.optim.AdamW(mtpeft.parameter_groups(model, lr=5e-2, weight_decay=0.1, routing_weight_decay=0.0))
    model.train()
    ids = torch.tensor([N_TASKS, 0, N_TASKS, 1])
    for _ in range(3):
        model(**b, labels=b["input_ids"], task_ids=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    for name, p in model.named_parameters():
        if name not in snapshot:
            continue
        if p.requires_grad:
            assert torch.equal(p[:N_TASKS], snapshot[name][:N_TASKS]), name
            assert not torch.equal(p[N_TASKS:], snapshot[name][N_TASKS:]), name
        else:
            assert torch.equal(p, snapshot[name]), name
    with torch.no_grad():
        assert torch.equal(out(model(**b, task_ids=torch.tensor([0, 2, 1, 2]))), before)


def test_train_only_routing_needs_routing_logits_and_other_errors():
    model = mtpeft.get_model(BUILDERS["llama"](), GROWABLE["task_lora"]())
    with pytest.raises(ValueError, match="no routing logits"):
        model.add_tasks(1, train_only_routing=True)
    assert model.config.n_tasks == N_TASKS  # nothing grew
    with pytest.raises(ValueError, match="positive integer"):
        model.add_tasks(0)
    model.merge(task=0)
    with pytest.raises(ValueError, match="unmerge"):
        model.add_tasks(1)
    lora = mtpeft.get_model(BUILDERS["llama"](), mtpeft.LoraConfig(r=2))
    with pytest.raises(TypeError, match="task-routed"):
        lora.add_tasks(1)


@pytest.mark.parametrize("variant", ["mtl_lora", "cpoly_e2", "task_lora"])
def test_save_load_and_export_after_growing(variant, tmp_path):
    model, b, _ = grown(variant, n=2)
    randomise(model, seed=5, scale=0.15)
    model.save_pretrained(tmp_path / "a")
    loaded = mtpeft.MultiTaskModel.from_pretrained(BUILDERS["llama"](), tmp_path / "a")
    assert loaded.config.n_tasks == N_TASKS + 2
    ids = torch.tensor([4, 0, 3, 2])
    with torch.no_grad():
        want = out(model(**b, task_ids=ids))
        assert torch.equal(want, out(loaded(**b, task_ids=ids)))
        loaded.merge(task=4)
        assert (out(loaded(**b))[0] - want[0]).abs().max() < 1e-5


def test_routing_only_mask_survives_deepcopy():
    """The row mask is a plain layer attribute, so a deep copy keeps training only the new rows."""
    import copy

    model, b, _ = grown("poly", n=1, train_only_routing=True)
    clone = copy.deepcopy(model)
    clone.train()
    clone(**b, labels=b["input_ids"], task_ids=torch.tensor([N_TASKS, 0, N_TASKS, 1])).loss.backward()
    for name, p in clone.named_parameters():
        if p.grad is not None:
            assert p.grad[:N_TASKS].abs().sum() == 0 and p.grad[N_TASKS:].abs().sum() > 0, name
    clone.add_tasks(1)  # a later add_tasks without train_only_routing lifts the row mask
    assert all(layer.frozen_task_rows is None for _, layer in clone.adapted_layers())


def test_an_optimizer_built_before_add_tasks_trains_the_grown_parameters():
    """Growing keeps the Parameter objects, so param groups / an optimizer built earlier (not yet
    stepped) still point at the live tensors."""
    model = mtpeft.get_model(BUILDERS["llama"](), GROWABLE["poly"]())
    randomise(model)
    params_before = [p for _, p in model.named_parameters()]
    opt = torch.optim.AdamW(mtpeft.parameter_groups(model, lr=1e-2, routing_lr=5e-2))
    model.add_tasks(1, train_only_routing=True)
    assert [p for _, p in model.named_parameters()] == params_before  # same objects
    _, layer = model.adapted_layers()[0]
    start = layer.module_logits.detach().clone()
    b = batch()
    model.train()
    model(**b, labels=b["input_ids"], task_ids=torch.tensor([N_TASKS, 0, N_TASKS, 1])).loss.backward()
    opt.step()
    assert layer.module_logits.shape[0] == N_TASKS + 1
    assert torch.equal(layer.module_logits[:N_TASKS], start[:N_TASKS])
    assert not torch.equal(layer.module_logits[N_TASKS:], start[N_TASKS:])
