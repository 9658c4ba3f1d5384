"""The HF Trainer, taught three things: our sampler (tasks mixed by temperature, resumable), our
adapter files (checkpoints hold adapter_config.json + adapter_model.safetensors, never a pickle of
the model), and logging of the aux losses. Everything else is the stock Trainer: optimizer,
scheduler, RNG and data-order restore on resume.

Checkpoints are crash-safe: the Trainer writes ``checkpoint-N/`` and we add ``COMPLETE`` last
(written atomically). Resume picks the newest checkpoint that has it, so a kill mid-save falls back to
the previous, intact checkpoint.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from .io import atomic_write_bytes, load_adapter_weights

COMPLETE_MARKER = "COMPLETE"


def complete_checkpoints(output_dir) -> list[Path]:
    """Checkpoint folders that were fully written, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and (path / COMPLETE_MARKER).exists():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def remove_incomplete_checkpoints(output_dir) -> None:
    root = Path(output_dir)
    if not root.is_dir():
        return
    for path in root.glob("checkpoint-*"):
        if path.is_dir() and not (path / COMPLETE_MARKER).exists():
            shutil.rmtree(path)


class NonFiniteLossError(RuntimeError):
    pass


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop with a clear message when the loss becomes NaN or Inf; the last good checkpoint stays."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            last = complete_checkpoints(args.output_dir)
            where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"training loss became {loss} at step {state.global_step}; stopping ({where}). Lower the "
                f"learning rate or check the data.")


class MultiTaskTrainer(Trainer):
    def __init__(self, *args, train_sampler=None, param_groups=None, **kwargs):
        self._mt_sampler = train_sampler
        self._param_groups = param_groups
        self._aux_sums: dict[str, float] = defaultdict(float)
        self._aux_count = 0
        super().__init__(*args, **kwargs)
        self.add_callback(StopOnNonFiniteLoss())

    # ------------------------------------------------------------------ data order
    def _get_train_sampler(self, train_dataset=None):
        return self._mt_sampler if self._mt_sampler is not None else super()._get_train_sampler(train_dataset)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is None and self._param_groups is not None:
            self.optimizer = torch.optim.AdamW(self._param_groups, lr=self.args.learning_rate,
                                               weight_decay=self.args.weight_decay)
        return super().create_optimizer()

    # ------------------------------------------------------------------ aux losses in the logs
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        aux = getattr(outputs, "aux_losses", None) or {}
        if model.training and aux:
            for name, value in aux.items():
                self._aux_sums[name] += float(value.detach())
            self._aux_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        if "loss" in logs and self._aux_count:
            for name, total in self._aux_sums.items():
                logs[f"aux/{name}"] = round(total / self._aux_count, 6)
            self._aux_sums.clear()
            self._aux_count = 0
        super().log(logs, start_time)

    # ------------------------------------------------------------------ adapter checkpoints
    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _save(self, output_dir=None, state_dict=None):
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        self._unwrapped().save_pretrained(output_dir)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and folder.is_dir():
            atomic_write_bytes(folder / COMPLETE_MARKER, b"ok\n")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        load_adapter_weights(self._unwrapped() if model is None else model, resume_from_checkpoint)

    def _load_best_model(self):  # pragma: no cover - best-model tracking is not used by mtpeft runs
        path = self.state.best_model_checkpoint
        if path and os.path.isdir(path):
            load_adapter_weights(self._unwrapped(), path)
