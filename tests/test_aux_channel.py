"""The aux-loss / router-statistics channel: returned with the output, added once to the loss,
correct under gradient checkpointing and under an unmodified HF Trainer.

A small probe method (a LoRA that records ``mean(z²)`` of its rank intermediate as an aux loss)
exercises the channel the way the token-routed methods use it.
"""

from dataclasses import dataclass

import torch
from datasets import Dataset
from tiny_models import BUILDERS, batch_for
from transformers import Trainer, TrainingArguments

import mtpeft
from mtpeft.lib.methods.lora import LoraConfig, LoraLayer

PROBE_WEIGHT = 0.5


@dataclass
class ProbeConfig(LoraConfig):
    method = "probe_for_tests"


class ProbeLayer(LoraLayer):
    calls = 0

    def adapter_forward(self, x, route):
        ProbeLayer.calls += 1
        z = self.dropout(x) @ self.lora_A.T  # (..., r)
        self.routing.add_aux_loss("probe", z.pow(2).mean(), PROBE_WEIGHT)
        self.routing.add_router_stats(self.module_name, {"tokens": torch.tensor(z.shape[:-1].numel())})
        return (z * self.scaling) @ self.lora_B.T


mtpeft.register_method(ProbeConfig, ProbeLayer)


def probe_model(seed=0):
    return mtpeft.get_model(BUILDERS["llama"](seed), ProbeConfig(r=4, target_modules=["q_proj", "v_proj"]))


def test_aux_losses_are_returned_and_added_once_to_the_loss():
    model = probe_model()
    batch = batch_for("llama")
    out = model(**batch, labels=batch["input_ids"])
    assert len(model.router_stats()) == 4  # q and v in 2 layers
    with model.disable_adapters():
        task_loss = model(**batch, labels=batch["input_ids"]).loss  # B = 0: same task loss
    assert model.last_aux_losses == {}  # each forward starts afresh
    assert set(out.aux_losses) == {"probe"}
    assert torch.allclose(out.loss, task_loss + PROBE_WEIGHT * out.aux_losses["probe"])
    assert "aux_losses" not in out.keys()  # not a dict key: the HF Trainer would treat it as logits
    assert out.aux_losses["probe"] > 0


def test_no_double_counting_under_gradient_checkpointing():
    results = []
    for checkpointing in (False, True):
        model = probe_model()
        if checkpointing:
            model.base_model.gradient_checkpointing_enable()
        model.train()
        batch = batch_for("llama")
        ProbeLayer.calls = 0
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        assert ProbeLayer.calls == (8 if checkpointing else 4)  # the recomputation did run
        assert len(model.routing.aux_losses["probe"]) == 4  # one entry per module, not more
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), out.aux_losses["probe"].detach(), grads))
    (loss_a, aux_a, grads_a), (loss_b, aux_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6) and torch.allclose(aux_a, aux_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and any("lora_A" in k for k in grads_a)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name


def test_task_ids_reach_checkpointed_recomputation():
    """Per-task LoRA under gradient checkpointing: gradients equal the un-checkpointed ones."""
    grads = []
    for checkpointing in (False, True):
        model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.TaskLoraConfig(r=4, n_tasks=2))
        with torch.no_grad():
            for _, layer in model.adapted_layers():
                layer.lora_B.normal_()
        if checkpointing:
            model.base_model.gradient_checkpointing_enable()
        model.train()
        batch = batch_for("llama")
        model(**batch, labels=batch["input_ids"], task_ids=torch.tensor([0, 1, 1, 0])).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_unmodified_hf_trainer_adds_aux_losses(tmp_path):
    model = probe_model()
    batch = batch_for("llama", batch=4)
    rows = [{"input_ids": batch["input_ids"][i].tolist(), "attention_mask": batch["attention_mask"][i].tolist(),
             "labels": batch["input_ids"][i].tolist(), "task_ids": i % 2} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1,
                             learning_rate=0.0, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows))
    result = trainer.train()
    # the Trainer kept input_ids and task_ids (forward's signature lists them) and used our loss
    model.eval()
    out = model(**batch, labels=batch["input_ids"], task_ids=torch.tensor([0, 1, 0, 1]))
    assert abs(result.training_loss - out.loss.item()) < 1e-4
    assert out.aux_losses["probe"].item() > 0
