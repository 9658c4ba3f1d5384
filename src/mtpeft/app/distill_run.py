"""Distil a trained run folder into a plain PEFT LoRA folder with its fidelity (``mtpeft export --task``).

Calibration rows come from the task's training split (the first ``calibration`` examples; every task's with
``all_tasks``), the reported output error from its validation split, and fidelity.json also holds the test
metric of the mixture (the mtpeft model) and of the exported LoRA loaded with stock ``peft.PeftModel``.
The folder is built next to ``out`` and renamed into place, so a crash leaves no half folder.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from ..lib.distill import (DEFAULT_RIDGE, check_rank, collect_statistics, fidelity_line,
                      fidelity_report, fit_factors, write_distilled_folder)
from ..lib.export import check_target_folder
from ..lib.io import atomic_write_bytes


def _batches(collate, rows: list[dict], size: int, keep_labels: bool):
    """Model inputs for ``rows``. The adapter's output is all the fit needs, so labels are dropped, except
    for an encoder-decoder: its decoder inputs (and the decoder's padding mask) are built from them."""
    for i in range(0, len(rows), size):
        batch = collate(rows[i:i + size])
        if not keep_labels:
            batch.pop("labels", None)
        yield batch


def _rows(tasks, indices, split: str, limit: int | None) -> list[dict]:
    rows = []
    for i in indices:
        part = tasks[i].splits[split]
        rows += [{**r, "task_id": i} for r in (part[:limit] if limit else part)]
    return rows


class _StockForEvaluation(nn.Module):
    """A stock PEFT model seen through mtpeft's evaluators, which pass ``task_ids``: only a base that
    declares it (the encoder classifier, for its per-task heads) receives them."""

    def __init__(self, model: nn.Module, takes_task_ids: bool):
        super().__init__()
        self.model, self.takes_task_ids = model, takes_task_ids

    def _kwargs(self, kwargs: dict) -> dict:
        if not self.takes_task_ids:
            kwargs.pop("task_ids", None)
        return kwargs

    def forward(self, **kwargs):
        return self.model(**self._kwargs(kwargs))

    def generate(self, **kwargs):
        return self.model.generate(**self._kwargs(kwargs))


def evaluate_tasks(model, tokenizer, kind, tasks, run, only) -> dict:
    """Test scores of the tasks named in ``only`` (each routed with its own id)."""
    from .evaluate import evaluate_causal, evaluate_encoder, evaluate_seq2seq

    kwargs = dict(split="test", limit=run.data.max_eval_examples, max_length=run.model.max_length, only=only)
    if kind == "encoder":
        return evaluate_encoder(model, tokenizer, tasks, batch_size=run.train.eval_batch_size, **kwargs)
    evaluate = evaluate_seq2seq if kind == "seq2seq" else evaluate_causal
    return evaluate(model, tokenizer, tasks, batch_size=max(1, run.train.eval_batch_size // 4), **kwargs)


def stock_peft_model(model, folder: Path) -> nn.Module:
    """The exported folder loaded with stock ``peft.PeftModel`` onto the stock model inside a copy of the
    run's bare base (target names in the folder are paths inside that stock model). An encoder run keeps
    its trained heads around the PEFT-wrapped encoder: they are the tensors head.safetensors holds."""
    from peft import PeftModel

    from ..lib.export import stock_base

    copied = copy.deepcopy(model)  # the run's model stays as it is
    stock, prefix = stock_base(copied)
    bare = copied.unload()  # the original layers back, inside the same stock module
    peft_stock = PeftModel.from_pretrained(stock, str(folder)).eval()
    if prefix:  # "encoder.": the classifier calls its encoder, now the PEFT model
        setattr(bare, prefix.rstrip("."), peft_stock)
        peft_stock = bare
    return _StockForEvaluation(peft_stock, model._base_takes_task_ids).eval()


def task_statistics(model, tokenizer, kind, tasks, run, indices: list[int], calibration: int | None,
                    task_id: int | None):
    """The calibration statistics (the first ``calibration`` training examples of each task in ``indices``),
    the held-out ones (as many validation examples; None if the split is empty) and the example counts.
    ``task_id``: count only that task's rows (None: pool every row)."""
    from .pipeline import make_collator

    calib_rows = _rows(tasks, indices, "train", calibration)
    if not calib_rows:
        raise ValueError(f"no calibration examples: the training split of {[tasks[i].name for i in indices]} "
                         f"is empty; distil a task that has training examples.")
    held_rows = _rows(tasks, indices, "validation", calibration)
    collate = make_collator(kind, tokenizer, run, tasks)
    size = run.train.eval_batch_size
    keep_labels = kind == "seq2seq"
    calib = collect_statistics(model, _batches(collate, calib_rows, size, keep_labels), task_id)
    held = collect_statistics(model, _batches(collate, held_rows, size, keep_labels), task_id) if held_rows else None
    return calib, held, {"calibration_examples": len(calib_rows), "held_out_examples": len(held_rows)}


def distill_run(run_dir, out, task: str | None = None, all_tasks: bool = False, rank: int | None = None,
                calibration: int | None = None, *, mode: str = "least_squares", ridge: float = DEFAULT_RIDGE,
                log=print) -> Path:
    """Distil ``run_dir``'s adapter for ``task`` (or every task pooled) into the PEFT LoRA folder ``out``."""
    from .pipeline import load_run

    out = Path(out)
    if (task is None) == (not all_tasks):
        raise ValueError("name the task to distil (--task NAME) or pass --all-tasks for one LoRA of the mixture.")
    if calibration is not None and (isinstance(calibration, bool) or not isinstance(calibration, int)
                                    or calibration <= 0):
        raise ValueError(f"--calibration {calibration!r} must be a positive number of examples per task.")
    check_target_folder(out)
    model, tokenizer, kind, tasks, run = load_run(run_dir)
    names = [t.name for t in tasks]
    if task is not None and task not in names:
        raise ValueError(f"the run has no task {task!r}; its tasks are {names}.")
    if all_tasks and kind == "encoder" and len(tasks) > 1:
        raise ValueError(f"--all-tasks makes one LoRA for a mixture served without task ids, but this encoder "
                         f"run has one classification head per task ({names}): serving needs the task anyway. "
                         f"Export one task at a time (--task NAME).")
    check_rank(rank, model.adapted_layers())
    indices = list(range(len(tasks))) if all_tasks else [names.index(task)]
    task_id = None if all_tasks else indices[0]
    calib, held, counts = task_statistics(model, tokenizer, kind, tasks, run, indices, calibration, task_id)
    factors, details = fit_factors(model, calib, task=task_id, rank=rank, ridge=ridge, mode=mode)
    report = fidelity_report(model, factors, details, calib, held, mode=mode, task=task_id, ridge=ridge)
    report.update(task="all" if all_tasks else task, run=str(run_dir), **counts)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; the folder is meant to be shared
    try:
        labels = list(tasks[task_id].spec.labels or []) or None if task_id is not None else None
        write_distilled_folder(model, staging, factors, report, task=task_id, labels=labels)
        scored = names if all_tasks else [task]
        mixture = evaluate_tasks(model, tokenizer, kind, tasks, run, scored)
        distilled = evaluate_tasks(stock_peft_model(model, staging), tokenizer, kind, tasks, run, scored)
        report["test"] = {"mixture": {n: mixture["tasks"][n] for n in scored},
                          "distilled_lora": {n: distilled["tasks"][n] for n in scored}}
        key = "average" if all_tasks else task
        pick = (lambda r: r["average"]) if all_tasks else (lambda r: r["tasks"][task]["score"])
        report["scores"] = {f"mixture {key}": pick(mixture), f"distilled {key}": pick(distilled)}
        atomic_write_bytes(staging / "fidelity.json", (json.dumps(report, indent=2) + "\n").encode())
        if out.exists():
            out.rmdir()  # empty (checked above): rename cannot replace it portably
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(fidelity_line(report))
    return out
