"""Invariants shared by the task-routed methods (MTL-LoRA, Poly, MHR, C-Poly): zero init, frozen base,
mixed-task batches, unknown task ids, merge / unmerge, PEFT export, parameter counts, save / load,
generation with beams, a short training run, and routing learning-rate groups."""

import copy
import os
import sys

import peft
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import (BUILDERS, MAIN_VARIANTS, N_TASKS, VARIANTS, adapter_numel, batch, grads, out,  # noqa: E402
                   randomise)
from _tiny import one_thread  # noqa: E402,F401  (autouse fixture)

import mtpeft  # noqa: E402

ALL = list(VARIANTS)
# Every variant on Llama (nn.Linear); three on GPT-2 (Conv1D, fan_in_fan_out) to keep the run short.
ARCH_VARIANTS = [(v, "llama") for v in ALL] + [(v, "gpt2") for v in ("mtl_lora", "mhr", "cpoly_e2")]


def wrapped(variant, arch="llama", **kw):
    return mtpeft.get_model(BUILDERS[arch](), VARIANTS[variant](**kw))


# ---------------------------------------------------------------------------------------- init
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("variant", ALL)
def test_zero_delta_at_init(variant, arch):
    base = BUILDERS[arch]()
    b = batch()
    with torch.no_grad():
        want = out(base(**b)).clone()
        model = mtpeft.get_model(base, VARIANTS[variant]())
        got = out(model(**b, task_ids=torch.tensor([0, 2, 1, 0])))
    assert torch.equal(want, got)


@pytest.mark.parametrize("variant", MAIN_VARIANTS)
def test_only_adapters_train_and_base_stays_bit_identical(variant):
    base = BUILDERS["llama"]()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = mtpeft.get_model(base, VARIANTS[variant]())
    randomise(model)
    model.train()
    b = batch()
    opt = torch.optim.AdamW(mtpeft.parameter_groups(model, lr=1e-2))
    for _ in range(2):
        loss = model(**b, labels=b["input_ids"], task_ids=torch.tensor([0, 1, 2, 1])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        assert p.requires_grad == (model.parameter_role(name) is not None), name
    for key, value in model.unload().state_dict().items():
        assert torch.equal(value, frozen[key]), key


# ------------------------------------------------------------------------- mixed-task batches
def _mixed_vs_alone(model, b, task_ids):
    o = out(model(**b, task_ids=task_ids))
    o.pow(2).sum().backward()
    mixed = grads(model)
    model.zero_grad()
    alone_out = torch.empty_like(o)
    for task in task_ids.unique().tolist():
        rows = (task_ids == task).nonzero().flatten()
        sub = {k: v[rows] for k, v in b.items()}
        o_t = out(model(**sub, task_ids=task_ids[rows]))
        o_t.pow(2).sum().backward()
        alone_out[rows] = o_t.detach()
    alone = grads(model)
    assert (o - alone_out).abs().max() < 1e-5
    assert mixed.keys() == alone.keys() and len(mixed) > 0
    for name in mixed:
        assert torch.allclose(mixed[name], alone[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("variant,arch", ARCH_VARIANTS)
def test_mixed_batch_equals_each_task_alone(variant, arch):
    """Eval mode (no Gumbel noise); MTL-LoRA also in training mode (dropout 0)."""
    model = wrapped(variant, arch)
    randomise(model)
    model.eval()
    task_ids = torch.tensor([2, 0, 1, 2, 0, 0])
    _mixed_vs_alone(model, batch(6), task_ids)
    if variant.startswith("mtl_lora"):
        model.train()
        model.zero_grad()
        _mixed_vs_alone(model, batch(6), task_ids)


@pytest.mark.parametrize("variant", ["poly", "mhr", "cpoly_e2"])
def test_mixed_batch_in_training_with_fixed_noise(variant, monkeypatch):
    """Training mode with the Gumbel uniforms pinned to a constant: per-example noise grouping gives the
    same outputs and gradients as each task alone."""
    monkeypatch.setattr(torch, "rand", lambda *s, dtype=None, device=None, **k: torch.full(
        s[0] if len(s) == 1 else s, 0.3, dtype=dtype or torch.float32, device=device))
    model = wrapped(variant)
    randomise(model)
    model.train()
    _mixed_vs_alone(model, batch(5), torch.tensor([1, 0, 1, 2, 0]))


# ------------------------------------------------------------------------------- unknown tasks
@pytest.mark.parametrize("variant", MAIN_VARIANTS)
def test_unknown_task_is_an_error_by_default(variant):
    model = wrapped(variant)
    b = batch()
    with pytest.raises(ValueError, match=r"task id 3 is out of range.*n_tasks=3"):
        model(**b, task_ids=torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="task id -1 is out of range"):
        model(**b, task_ids=torch.tensor([0, -1, 2, 0]))
    with pytest.raises(ValueError, match="pass task_ids"):
        model(**b)
    with pytest.raises(ValueError, match="unknown_task must be one of"):
        VARIANTS[variant](unknown_task="ignore")


@pytest.mark.parametrize("variant", MAIN_VARIANTS)
def test_unknown_task_average_equals_an_explicit_average_task(variant):
    """With unknown_task="average", an id outside [0, T) gives the documented fallback. Reference: the
    same model grown by one task whose parameters are set to that fallback by hand."""
    model = wrapped(variant, unknown_task="average")
    randomise(model)
    model.eval()
    b = batch()
    with torch.no_grad():
        got = out(model(**b, task_ids=torch.tensor([-1, 0, 7, 2])))
        known = out(model(**b, task_ids=torch.tensor([1, 0, 1, 2])))
        ref = copy.deepcopy(model)
        ref.add_tasks(1)
        for _, layer in ref.adapted_layers():
            if variant == "mtl_lora":
                tau = layer.config.temperature
                pi = torch.softmax(layer.task_logits[:N_TASKS] / tau, -1).mean(0)
                layer.task_logits[N_TASKS] = tau * pi.log()  # softmax(· / τ) = mean π
                layer.lora_lambda[N_TASKS] = layer.lora_lambda[:N_TASKS].mean(0)
            else:
                layer.module_logits[N_TASKS] = 30.0  # sigmoid = 1 for every skill -> uniform 1/S
                if variant == "cpoly":  # no exclusive skill (A too: A_t B_t has cross terms)
                    layer.exclusive_lora_A[N_TASKS] = 0.0
                    layer.exclusive_lora_B[N_TASKS] = 0.0
        want = out(ref(**b, task_ids=torch.tensor([N_TASKS, 0, N_TASKS, 2])))
    assert (got - want).abs().max() < 1e-5
    assert (got[1:2] - known[1:2]).abs().max() < 1e-6 and (got[3:] - known[3:]).abs().max() < 1e-6
    assert (got[0] - known[0]).abs().max() > 1e-4  # the fallback is not task 1


# ------------------------------------------------------------------------------ merge / export
@pytest.mark.parametrize("variant,arch", ARCH_VARIANTS)
def test_merge_per_task_and_unmerge(variant, arch):
    base = BUILDERS[arch]()
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = mtpeft.get_model(base, VARIANTS[variant]())
    randomise(model, scale=0.15)  # an update of the base weights' size: fp32 rounding stays << 1e-5
    model.eval()
    b = batch()
    task = 1
    ids = torch.full((4,), task)
    with torch.no_grad():
        want = out(model(**b, task_ids=ids))
        model.merge(task=task)
        merged = out(model(**b, task_ids=ids))
        merged_no_ids = out(model(**b))
        with pytest.raises(ValueError, match=f"merged for task {task}.*unmerge"):
            model(**b, task_ids=torch.tensor([1, 0, 1, 1]))
        with pytest.raises(ValueError, match="call unmerge"):
            model.merge(task=2)
        model.unmerge()
        again = out(model(**b, task_ids=ids))
        restored = model.unload().state_dict()
    assert (want - merged).abs().max() < 1e-5
    assert (want - merged_no_ids).abs().max() < 1e-5
    assert (want - again).abs().max() < 1e-5
    for key, value in weights.items():
        assert (restored[key] - value).abs().max() <= 1e-6, key
    with pytest.raises(ValueError, match="pass task=t"):
        model.merge()


@pytest.mark.parametrize("variant,arch", ARCH_VARIANTS)
def test_export_lora_loads_in_peft_with_equal_outputs(variant, arch, tmp_path):
    base = BUILDERS[arch]()
    model = mtpeft.get_model(copy.deepcopy(base), VARIANTS[variant]())
    randomise(model, scale=0.15)
    model.eval()
    task = 2
    model.export_lora(tmp_path / "t2", task=task)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "t2").eval()
    b = batch()
    with torch.no_grad():
        want = out(model(**b, task_ids=torch.full((4,), task)))
        got = out(theirs(**b))
        other = out(model(**b, task_ids=torch.full((4,), 0)))
    assert (want - got).abs().max() < 1e-5
    assert (want - other).abs().max() > 1e-4


# ---------------------------------------------------------------------------- parameter counts
def _closed_form(cfg, d_in, d_out):
    t = cfg.n_tasks
    if cfg.method == "mtl_lora":
        lam = cfg.r * cfg.r if cfg.lambda_type == "full" else cfg.r
        return cfg.r * d_in + cfg.n_up * cfg.r * d_out + t * lam + t * cfg.n_up
    poly = cfg.n_skills * cfg.r * (d_in + d_out) + t * cfg.n_splits * cfg.n_skills
    if cfg.method == "poly":
        return poly
    e = cfg.n_exclusive
    return poly + t * e * cfg.r * (d_in + d_out) + (t * cfg.n_splits * e if e > 1 else 0)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("variant", ALL)
def test_parameter_counts_match_closed_forms(variant, arch):
    model = wrapped(variant, arch)
    total = 0
    for _, layer in model.adapted_layers():
        n = adapter_numel(layer)
        assert n == _closed_form(model.config, layer.in_features, layer.out_features)
        total += n
    assert sum(model.trainable_parameter_breakdown().values()) == total
    roles = model.trainable_parameter_breakdown()
    assert roles["router"] > 0 and roles["shared"] > 0


# ------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("variant", ALL)
def test_save_load_round_trip(variant, tmp_path):
    model = wrapped(variant, "bert", unknown_task="average")
    randomise(model)
    model.eval()
    model.save_pretrained(tmp_path / "a")
    loaded = mtpeft.MultiTaskModel.from_pretrained(BUILDERS["bert"](), tmp_path / "a")
    assert loaded.config == model.config
    b, ids = batch(), torch.tensor([0, 2, -1, 1])
    with torch.no_grad():
        assert torch.equal(out(model(**b, task_ids=ids)), out(loaded(**b, task_ids=ids)))


# ---------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("variant", MAIN_VARIANTS)
def test_generate_mixed_tasks_with_beams_equals_each_task_alone(variant, arch):
    model = wrapped(variant, arch, target_modules="all-linear")
    randomise(model, scale=0.5)
    model.eval()
    input_ids = torch.randint(3, 100, (3, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    task_ids = torch.tensor([2, 0, 1])
    kw = dict(max_new_tokens=5, num_beams=2, num_return_sequences=2, do_sample=False)
    mixed = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=task_ids, **kw)
    assert mixed.shape[0] == 6
    for i in range(3):
        alone = model.generate(input_ids=input_ids[i:i + 1], attention_mask=mask[i:i + 1],
                               task_ids=task_ids[i:i + 1], **kw)
        assert torch.equal(mixed[2 * i:2 * i + 2], alone)
    other = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=(task_ids + 1) % 3, **kw)
    assert not torch.equal(mixed, other)


# ----------------------------------------------------------------------------- training run
@pytest.mark.parametrize("variant", MAIN_VARIANTS)
def test_short_training_run_lowers_the_loss(variant):
    torch.manual_seed(0)
    model = wrapped(variant, "llama", target_modules="all-linear")
    b = batch(6, seq=10, pad=False)
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.AdamW(mtpeft.parameter_groups(model, lr=2e-2, routing_lr=5e-2))

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(**b, labels=b["input_ids"], task_ids=ids).loss.item()

    before = eval_loss()
    model.train()
    for _ in range(30):
        loss = model(**b, labels=b["input_ids"], task_ids=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = eval_loss()
    assert after < before - 0.25, (before, after)  # about 4.59 -> 4.1-4.2 for each method


# ------------------------------------------------------------------------ routing lr groups
@pytest.mark.parametrize("variant", MAIN_VARIANTS)
def test_parameter_groups_give_routing_logits_their_own_lr(variant):
    model = wrapped(variant)
    groups = mtpeft.parameter_groups(model, lr=1e-3, routing_lr=1e-1, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"adapter", "router"}
    assert by_name["router"]["lr"] == 1e-1 and by_name["router"]["weight_decay"] == 0.0
    assert by_name["adapter"]["lr"] == 1e-3 and by_name["adapter"]["weight_decay"] == 0.01
    names = {id(p): n for n, p in model.named_parameters()}
    router = {names[id(p)].rsplit(".", 1)[-1] for p in by_name["router"]["params"]}
    assert router <= {"task_logits", "module_logits", "exclusive_logits"} and router
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == n_trainable
    torch.optim.AdamW(groups)  # the groups are valid optimizer input
    same = mtpeft.parameter_groups(model, lr=1e-3)
    assert all(g["lr"] == 1e-3 for g in same)


def test_parameter_groups_for_a_method_without_routing():
    model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.TaskLoraConfig(r=2, n_tasks=2))
    groups = mtpeft.parameter_groups(model, lr=1e-3, routing_lr=1.0)
    assert [g["name"] for g in groups] == ["adapter"]
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        mtpeft.parameter_groups(model, lr=1e-3)


def test_deepcopy_keeps_the_adapter_active():
    """Regression: the "not merged" marker was a bare object(), so a deep copy reported itself merged
    and silently ran the base model."""
    model = wrapped("mtl_lora")
    randomise(model)
    model.eval()
    clone = copy.deepcopy(model)
    assert not any(layer.merged for _, layer in clone.adapted_layers())
    b, ids = batch(), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        assert torch.equal(out(model(**b, task_ids=ids)), out(clone(**b, task_ids=ids)))


@pytest.mark.parametrize("variant", ["poly", "cpoly_e2", "mtl_lora"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(variant):
    """The recomputation in backward sees the same task ids and (RNG state restored) the same Gumbel
    noise and dropout mask."""
    results = []
    for checkpointing in (False, True):
        base = BUILDERS["llama"]()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        kw = {"lora_dropout": 0.3} if variant == "mtl_lora" else {}
        model = mtpeft.get_model(base, VARIANTS[variant](**kw))
        randomise(model)
        model.train()
        b = batch()
        torch.manual_seed(3)
        loss = model(**b, labels=b["input_ids"], task_ids=torch.tensor([0, 2, 1, 2])).loss
        loss.backward()
        results.append((loss.detach(), grads(model)))
    (loss0, g0), (loss1, g1) = results
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6), name
