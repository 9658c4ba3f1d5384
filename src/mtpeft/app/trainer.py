"""The HF Trainer, taught three things: our sampler (tasks mixed by temperature, resumable), our
adapter files (checkpoints hold adapter_config.json + adapter_model.safetensors, never a pickle of
the model), and logging of the aux losses; a causal LM computes its logits only where the loss
reads them (:mod:`mtpeft.app.label_logits`). Everything else is the stock Trainer: optimizer,
scheduler, RNG and data-order restore on resume.

Checkpoints are crash-safe: the Trainer writes ``checkpoint-N/``, we flush its files to disk and add
``COMPLETE`` last (written atomically); only then are older checkpoints rotated out (the marker of a
folder goes first). Resume picks the newest checkpoint that has it, so a kill mid-save falls back to
the previous, intact checkpoint.

A NaN or Inf loss stops training at once, before that step's optimizer update, with
:class:`NonFiniteLossError` (every step, not only at logging steps); a checkpoint is never written
from non-finite parameters. The last complete checkpoint is the last good one.

Under DDP (torchrun, accelerate launch) rank 0 writes the adapter files and marks a checkpoint
complete only after every rank has written its own files (its RNG state); every rank loads on resume.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback

from ..lib.io import atomic_write_bytes, load_adapter_weights
from .label_logits import accepts_logits_to_keep, keep_label_logits

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
        if path.is_dir() and not path.is_symlink() and not (path / COMPLETE_MARKER).exists():
            shutil.rmtree(path)


def rotate_checkpoints(output_dir, limit: int | None, protect=None) -> None:
    """Keep the newest ``limit`` complete checkpoints (and ``protect``); drop older incomplete leftovers.

    Called once the newest checkpoint is COMPLETE. The Trainer's own rotation runs before our marker
    is written, so with ``save_total_limit=1`` a kill between the two left no complete checkpoint at
    all. A folder loses its marker before its files, so an interrupted deletion is never mistaken for
    a complete checkpoint.
    """
    if not limit or limit <= 0:
        return
    done = complete_checkpoints(output_dir)
    if not done:
        return
    newest = int(done[-1].name.split("-")[1])
    keep = {p.resolve() for p in done[-limit:]} | ({Path(protect).resolve()} if protect else set())
    for path in Path(output_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if not match or not path.is_dir() or path.is_symlink() or path.resolve() in keep:
            continue
        if (path / COMPLETE_MARKER).exists() or int(match.group(1)) < newest:
            (path / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)


def _flush_to_disk(folder: Path) -> None:
    """fsync every file of a checkpoint folder (the Trainer writes optimizer.pt etc. without it) and the
    folder itself, so that after a power loss COMPLETE never stands beside a file whose data was lost."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open a folder (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the disk is full); ``filename`` is its folder."""


def _disk_nearly_full(folder: Path) -> bool:
    """Less free space than one more checkpoint needs (the size of the newest complete one, 64 MiB at least)."""
    previous = complete_checkpoints(folder.parent)
    need = sum(f.stat().st_size for f in previous[-1].iterdir() if f.is_file()) if previous else 0
    try:
        return shutil.disk_usage(folder.parent).free < max(need, 64 * 2**20)
    except OSError:
        return False


class NonFiniteLossError(RuntimeError):
    """The training loss (or a trained parameter) became NaN or Inf; nothing non-finite was saved."""


def _non_finite_message(what: str, step: int, output_dir) -> str:
    last = complete_checkpoints(output_dir)
    where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
    return (f"{what} at step {step}; training stopped before saving anything from it ({where}). Lower the "
            f"learning rate, or check the data and the adapter config.")


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop with a clear message when a logged loss is NaN or Inf.

    A backstop only: MultiTaskTrainer checks every step's loss before the optimizer step (the Trainer's
    default ``logging_nan_inf_filter`` replaces a NaN step loss by the running mean, so a logged loss
    stays finite while the parameters are NaN)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteLossError(_non_finite_message(f"the logged training loss became {loss}",
                                                         state.global_step, args.output_dir))


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
        # transformers' seq2seq LMs (T5, BART) take **kwargs but compute a per-batch mean loss that ignores
        # the count too; without the count every model's mean loss is averaged by DDP, which is right.
        if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
            self.model_accepts_loss_kwargs = False
        self._trainable: list[torch.nn.Parameter] | None = None
        self._label_logits_only = accepts_logits_to_keep(self._unwrapped())

    # ------------------------------------------------------------------ data order
    # Private override: the Trainer has no public hook for the sampler (get_train_dataloader would have to
    # be rewritten whole, accelerate preparation included). Called as _get_train_sampler() up to 4.5x and
    # _get_train_sampler(train_dataset) since; checked against transformers 4.47, 4.50, 4.57 and 5.24.
    def _get_train_sampler(self, train_dataset=None):
        return self._mt_sampler if self._mt_sampler is not None else super()._get_train_sampler(train_dataset)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is None and self._param_groups is not None:
            self.optimizer = torch.optim.AdamW(self._param_groups, lr=self.args.learning_rate,
                                               weight_decay=self.args.weight_decay)
        return super().create_optimizer()

    # ------------------------------------------------------------------ non-finite losses
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._on_any_rank(not bool(torch.isfinite(loss))):
            raise NonFiniteLossError(_non_finite_message(
                f"the training loss became {float(loss)}", self.state.global_step + 1, self.args.output_dir))
        return loss

    def _on_any_rank(self, flag: bool) -> bool:
        """``flag`` or'ed over the processes (one scalar all-reduce under DDP / FSDP), so that every rank
        stops at the same step instead of the others waiting for the one that raised."""
        if self.accelerator.num_processes <= 1 or not torch.distributed.is_initialized():
            return flag
        value = torch.tensor([float(flag)], device=self.args.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item() > 0)

    def _check_finite_parameters(self) -> None:
        """Before a checkpoint is written: a finite loss can still give NaN gradients (and parameters)."""
        bad = []
        for name, param in self._unwrapped().named_parameters():
            if param.requires_grad:
                local = param.to_local() if hasattr(param, "to_local") else param  # FSDP2 shards
                if not bool(torch.isfinite(local.detach()).all()):
                    bad.append(name)
        if self._on_any_rank(bool(bad)):
            raise NonFiniteLossError(_non_finite_message(
                f"trained parameters became NaN or Inf ({', '.join(bad[:3]) or 'on another rank'})",
                self.state.global_step, self.args.output_dir))

    # ------------------------------------------------------------------ aux losses in the logs
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._label_logits_only:
            inputs = keep_label_logits(inputs)
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

    # Private override: save_model() ends in _save(), which writes the whole model's state dict; an mtpeft
    # checkpoint is the adapter alone (save_pretrained). A callback runs only after the full write.
    # Signature (output_dir=None, state_dict=None) checked against transformers 4.47, 4.57 and 5.24.
    def _save(self, output_dir=None, state_dict=None):
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        self._unwrapped().save_pretrained(output_dir)

    # Private override: a checkpoint must be checked finite before it is written, lose its COMPLETE marker
    # while being rewritten, report a full disk as such, and be rotated only once COMPLETE; the on_save
    # callback runs after the Trainer has already rotated (deleting the last complete checkpoint) and cannot
    # wrap the write. _save_checkpoint(model, trial) since transformers 4.47 (4.45-4.46 passed metrics=,
    # hence the floor in pyproject.toml); checked against transformers 4.47, 4.50, 4.57 and 5.24.
    def _save_checkpoint(self, model, trial):
        self._check_finite_parameters()
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:  # rewriting a folder (a fresh start over an old run): never COMPLETE mid-write
            (folder / COMPLETE_MARKER).unlink(missing_ok=True)
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotate below, once this checkpoint is COMPLETE
        try:
            super()._save_checkpoint(model, trial)
        except RuntimeError as err:  # torch.save reports a full disk as "unexpected pos ..."
            if not _disk_nearly_full(folder):
                raise
            raise CheckpointWriteError(errno.ENOSPC, f"No space left on device while writing {folder.name} "
                                       f"(it has no COMPLETE marker and is ignored on resume)",
                                       str(folder)) from err
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's files (rng_state_<rank>.pth) are written
        run_dir = folder.parent
        if self.args.should_save and folder.is_dir():
            _flush_to_disk(folder)
            atomic_write_bytes(folder / COMPLETE_MARKER, b"ok\n")
            rotate_checkpoints(run_dir, limit, protect=self.state.best_model_checkpoint)

    # Private override: resume loads the adapter files of a checkpoint (strict, no pickle) where the Trainer
    # would look for a full model.safetensors and warn that none is there; it runs before any callback.
    # Signature (resume_from_checkpoint, model=None) checked against transformers 4.47, 4.57 and 5.24.
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        load_adapter_weights(self._unwrapped() if model is None else model, resume_from_checkpoint)

    # Private override, as _load_from_checkpoint: the best checkpoint holds the adapter alone. Signature
    # checked against transformers 4.47, 4.57 and 5.24.
    def _load_best_model(self):  # pragma: no cover - best-model tracking is not used by mtpeft runs
        path = self.state.best_model_checkpoint
        if path and os.path.isdir(path):
            load_adapter_weights(self._unwrapped(), path)
