"""torch.compile works for training and inference with every method, on a tiny Llama built from a config.

For each method at its defaults (dropout, DropConnect, Gumbel noise and aux losses on): the compiled
model's eval output equals eager's, and a training forward + backward from the same seed gives the
same loss and the same gradient for every adapter parameter. Graph breaks are allowed (task-id
validation reads values); what is checked is that compiling changes nothing.

Backends: "aot_eager" (Dynamo + AOTAutograd, the parts that trace mtpeft's code; a few seconds per
method) in the default run; "inductor" (generated kernels, ~1-2 min per method on two cores) marked
slow. With inductor, ``fallback_random`` makes its random ops draw from torch's generator as eager does.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import method_cases
import mtpeft
from tiny_models import batch_for, tiny_llama

N_TASKS = 3
# Every registered method (tests/method_cases.py) at its defaults, with these overrides (dropout on, so the
# compiled graph draws masks too), plus MHR (Poly with splits).
OVERRIDES = {"lora": dict(r=4, lora_dropout=0.1), "task_lora": dict(r=4, lora_dropout=0.1)}
VARIANTS = {"mhr": ("poly", dict(n_splits=2))}


def _config_factory(method: str, **overrides):
    cls = method_cases.spec(method).config_class
    return lambda: cls(**{**OVERRIDES.get(method, {}), **overrides, "n_tasks": N_TASKS})


METHODS = {m: _config_factory(m) for m in method_cases.methods()}
METHODS.update({name: _config_factory(m, **kw) for name, (m, kw) in VARIANTS.items()})
TOLERANCE = {"aot_eager": dict(atol=1e-6, rtol=1e-5), "inductor": dict(atol=1e-4, rtol=1e-3)}


@pytest.fixture(autouse=True)
def _fresh_dynamo(one_thread):  # tiny shapes: threads only add noise on a shared machine
    # torch's own config.patch, not monkeypatch: newer pytest restores a module attribute it did not find
    # in the module's __dict__ by deleting it, and torch's config modules keep their values elsewhere, so
    # the first test's teardown deleted the setting and every later test failed (seen in a fresh venv)
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=16), inductor_config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


def _model(method: str):
    model = mtpeft.get_model(tiny_llama(seed=0, n_layers=1), METHODS[method]())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero adapters everywhere (B = 0 at init would hide a wrong update)
        for name, p in model.named_parameters():
            if model.parameter_role(name) is not None:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _train_step(model, batch, task_ids, seed):
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    out = model(**batch, labels=batch["input_ids"], task_ids=task_ids)
    grads = torch.autograd.grad(out.loss, params)
    return out.loss.detach(), grads, out.aux_losses


def _check(method: str, backend: str) -> None:
    model = _model(method)
    compiled = torch.compile(model, backend=backend)
    batch = batch_for("llama", batch=4, seq=8)
    task_ids = torch.tensor([0, 2, 1, 2])
    tol = TOLERANCE[backend]

    model.eval()
    with torch.no_grad():
        want = model(**batch, task_ids=task_ids).logits
        got = compiled(**batch, task_ids=task_ids).logits
    torch.testing.assert_close(got, want, **tol)

    model.train()
    loss_e, grads_e, aux_e = _train_step(model, batch, task_ids, seed=7)
    loss_c, grads_c, aux_c = _train_step(compiled, batch, task_ids, seed=7)
    torch.testing.assert_close(loss_c, loss_e, **tol)
    assert aux_c.keys() == aux_e.keys()
    for name in aux_e:
        torch.testing.assert_close(aux_c[name].detach(), aux_e[name].detach(), **tol)
    assert len(grads_c) == len(grads_e) > 0
    for g_c, g_e in zip(grads_c, grads_e):
        assert torch.isfinite(g_c).all()
        torch.testing.assert_close(g_c, g_e, **tol)
    assert any(g.abs().sum() > 0 for g in grads_c)


@pytest.mark.parametrize("method", list(METHODS))
def test_compile_aot_eager_train_and_eval(method):
    _check(method, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_compile_inductor_train_and_eval(method):
    _check(method, "inductor")
