"""Per-task LoRA: a mixed-task batch equals each task's examples run alone (outputs and gradients)."""

import torch
from tiny_models import BUILDERS, batch_for
from test_peft_parity import randomise_adapters

import mtpeft


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_mixed_batch_equals_tasks_alone():
    model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.TaskLoraConfig(r=4, n_tasks=3, target_modules="all-linear"))
    randomise_adapters(model)
    batch = batch_for("llama", batch=6)
    task_ids = torch.tensor([2, 0, 1, 2, 0, 0])
    out = model(**batch, task_ids=task_ids).logits
    out.pow(2).sum().backward()
    mixed = grads(model)
    model.zero_grad()
    alone_logits = torch.empty_like(out)
    for task in range(3):
        rows = (task_ids == task).nonzero().flatten()
        sub = {k: v[rows] for k, v in batch.items()}
        logits = model(**sub, task_ids=task_ids[rows]).logits
        logits.pow(2).sum().backward()  # gradients accumulate over the three calls
        alone_logits[rows] = logits.detach()
    alone = grads(model)
    assert (out - alone_logits).abs().max() < 1e-5
    assert mixed.keys() == alone.keys() and len(mixed) > 0
    for name in mixed:
        assert torch.allclose(mixed[name], alone[name], atol=1e-5), name


def test_tasks_are_independent():
    """Training only task 0's examples leaves task 1's adapter untouched."""
    model = mtpeft.get_model(BUILDERS["bert"](), mtpeft.TaskLoraConfig(r=4, n_tasks=2))
    randomise_adapters(model)
    batch = batch_for("bert")
    model(**batch, task_ids=torch.zeros(4, dtype=torch.long)).last_hidden_state.sum().backward()
    for name, layer in model.adapted_layers():
        assert layer.lora_B.grad[0].abs().sum() > 0
        assert layer.lora_B.grad[1].abs().sum() == 0
