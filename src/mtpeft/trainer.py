"""The HF Trainer, taught three things: our sampler (tasks mixed by temperature, resumable), our
adapter files (checkpoints hold adapter_config.json + adapter_model.safetensors, never a pickle of
the model), and logging of the aux losses. Everything else is the stock Trainer: optimizer,
scheduler, RNG and data-order restore on resume.

Checkpoints are crash-safe: the Trainer writes ``checkpoint-N/`` and we add ``COMPLETE`` last
(written atomically). Resume picks the newest checkpoint that has it, so a kill mid-save falls back to
the previous, intact checkpoint.

Under DDP (torchrun, accelerate launch) rank 0 writes the adapter files and marks a checkpoint
complete only after every rank has written its own files (its RNG state); every rank loads on resume.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback

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
        # The Trainer passes num_items_in_batch to any model whose forward takes **kwargs, and then
        # multiplies the loss by the number of processes, expecting a loss summed over the items and
        # divided by the global count. Hugging Face models do that; a plain torch base model such as
        # our encoder with per-task heads returns a per-batch mean and ignores the count, so under DDP
        # its gradients came out world_size times too large. Pass the count only to models that use it.
        base = getattr(self._unwrapped(), "base_model", None)
        if base is not None and not isinstance(base, PreTrainedModel) and not hasattr(base, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = False
        self._trainable: list[torch.nn.Parameter] | None = None

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
        if model.training:
            loss = loss + self._zero_touch(model)
        aux = getattr(outputs, "aux_losses", None) or {}
        if model.training and aux:
            for name, value in aux.items():
                self._aux_sums[name] += float(value.detach())
            self._aux_count += 1
        return (loss, outputs) if return_outputs else loss

    def _zero_touch(self, model) -> torch.Tensor:
        """0 · Σ_p sum(p) over the trainable parameters: every one of them gets a (zero) gradient in
        every backward. Adapter parameters always take part (experts and tasks are stacked tensors),
        but a module the model calls only for some batches does not: the encoder's per-task heads
        run only for the tasks present in this process's batch. DDP without find_unused_parameters
        would then wait for that head's gradient forever (or fail on the next step). Applied in one
        process too, so that a head whose task is absent from a step is treated the same way
        (zero gradient: AdamW keeps moving it by its momentum, as it does stacked adapter rows) and
        one process and N processes train identically. Costs one sum per trainable tensor."""
        if self._trainable is None:
            self._trainable = [p for p in model.parameters() if p.requires_grad]
        return sum((p.sum() for p in self._trainable), torch.zeros((), device=self.args.device)) * 0.0

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
        self.accelerator.wait_for_everyone()  # every rank's files (rng_state_<rank>.pth) are written
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and folder.is_dir():
            atomic_write_bytes(folder / COMPLETE_MARKER, b"ok\n")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        load_adapter_weights(self._unwrapped() if model is None else model, resume_from_checkpoint)

    def _load_best_model(self):  # pragma: no cover - best-model tracking is not used by mtpeft runs
        path = self.state.best_model_checkpoint
        if path and os.path.isdir(path):
            load_adapter_weights(self._unwrapped(), path)
