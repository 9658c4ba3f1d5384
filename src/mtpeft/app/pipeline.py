"""One multi-task run end to end: load the tasks, build the model, train with the HF Trainer, evaluate
per task, write the run folder.

Run folder::

    config.yaml          the resolved run config (re-run or evaluate from it)
    checkpoint-N/        Trainer checkpoints (adapter files + optimizer, scheduler, RNG, COMPLETE)
    adapter/             the final adapter (adapter_config.json + adapter_model.safetensors)
    metrics.json         per-task test scores, their average, parameter counts, time per step
    log_history.json     the Trainer's log (loss, aux losses, learning rate per logging step)
    routing.json         task x expert load (token-routed) or task x skill weights (task-routed)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed

from .base_models import NAMED_MODELS, build_base, model_folder, model_kind
from .data import MultiTaskDataset, MultiTaskSampler, load_tasks, task_from_dict
from .data.choices import choices_as_classification
from .data.tasks import TaskDataError, check_unique_names
from .data.collate import CausalLMCollator, EncoderClassificationCollator, Seq2SeqCollator
from ..lib.distributed import (barrier, default_backend, init_distributed, is_distributed, is_main_process,
                          main_process_first, per_device_batch_size)
from .evaluate import evaluate_causal, evaluate_encoder, evaluate_seq2seq
from ..lib.io import AdapterFileError, atomic_write_bytes, read_adapter_config
from ..lib.model import MultiTaskModel, get_model
from ..lib.optim import parameter_groups
from .routing_report import RoutingAccumulator, routing_summary
from .run_config import RunConfig, RunConfigError, adapter_config, load_run_config
from .run_folder import plan_run_folder
from .trainer import MultiTaskTrainer, complete_checkpoints, remove_incomplete_checkpoints


def write_json(path: Path, data) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def run_task_specs(run: RunConfig):
    """The run's task specs, checked before any data is read: at least one, unique names. A name may
    be a number ("1"): ``mtpeft export --task`` takes names only, never an index."""
    specs = [task_from_dict(t) for t in run.data.tasks]
    if not specs:
        raise ValueError("data.tasks is empty: name at least one task (e.g. data.tasks=[bbc_news]).")
    check_unique_names(specs)
    return specs


def check_splits_not_empty(tasks, split: str, why: str) -> None:
    """Refuse to score a split that some task has no examples in (its score would be undefined)."""
    empty = [t.name for t in tasks if not t.splits[split]]
    if empty:
        fraction = {"validation": "data.val_fraction", "test": "data.test_fraction"}.get(split)
        raise TaskDataError(f"tasks {empty} have no {split} examples ({why}); "
                            + (f"raise {fraction}, give them more data" if fraction else "give them data")
                            + (", or train with --no-eval." if split == "test" and why == "the final evaluation"
                               else "."))


def load_run_tasks(run: RunConfig):
    specs = run_task_specs(run)
    tasks = load_tasks(specs, seed=run.data.seed, val_fraction=run.data.val_fraction,
                       test_fraction=run.data.test_fraction)
    if model_kind(run.model.name, run.model.kind) == "encoder":
        tasks = [choices_as_classification(t) for t in tasks]  # encoders pick the option letter
    # causal and seq2seq LMs score each option by its log-likelihood: the tasks stay as they are
    return tasks


def build_model(run: RunConfig, tasks):
    """(wrapped model, tokenizer, kind) for a run; the adapter is freshly initialised."""
    kind = model_kind(run.model.name, run.model.kind)
    base, tokenizer = build_base(run.model.name, kind, tasks, seed=run.train.seed)
    if run.model.gradient_checkpointing and hasattr(base, "gradient_checkpointing_enable"):
        base.gradient_checkpointing_enable()
    torch.manual_seed(run.train.seed)
    config = adapter_config(run, len(tasks), ["heads"] if kind == "encoder" else None)
    return get_model(base, config), tokenizer, kind


def make_collator(kind: str, tokenizer, run: RunConfig, tasks):
    if kind == "encoder":
        return EncoderClassificationCollator(tokenizer, run.model.max_length)
    if kind == "seq2seq":
        return Seq2SeqCollator(tokenizer, run.model.max_length, tasks=tasks)
    return CausalLMCollator(tokenizer, run.model.max_length, tasks=tasks)


def training_arguments(run: RunConfig, output_dir: Path) -> TrainingArguments:
    """Under torchrun / accelerate launch, ``train.batch_size`` stays the global batch of one step (each
    of N processes takes batch_size / N of the same stream) and DDP runs without
    find_unused_parameters: every adapter parameter takes part in every forward (see
    mtpeft.lib.distributed), so the extra autograd-graph walk per step is not needed."""
    t = run.train
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=t.steps,
        per_device_train_batch_size=per_device_batch_size(t.batch_size),
        ddp_find_unused_parameters=False, ddp_backend=default_backend() if is_distributed() else None,
        learning_rate=t.lr, weight_decay=t.weight_decay, warmup_steps=int(t.warmup_ratio * t.steps),
        lr_scheduler_type="linear", logging_steps=t.logging_steps, save_strategy="steps",
        save_steps=t.save_steps, save_total_limit=t.save_total_limit, seed=t.seed, data_seed=t.seed,
        report_to=[], use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=False, save_only_model=False,
    )


def train_run(run: RunConfig, *, resume: bool = True, evaluate: bool = True, log=print,
              callbacks=None) -> Path:
    """Train (resuming from the newest complete checkpoint if any), evaluate, write the run folder.

    Under torchrun / accelerate launch every process calls this; rank 0 writes the run folder and
    evaluates, and every process returns once the folder is complete.
    """
    init_distributed()  # no-op for one process
    main = is_main_process()
    if not main:
        log = lambda *a, **k: None  # noqa: E731  (one copy of the messages, from rank 0)
    out = Path(run.output_dir)
    plan = check_run_before_writing(run, resume=resume)
    if run.train.threads:
        torch.set_num_threads(run.train.threads)
    set_seed(run.train.seed)
    with main_process_first():  # rank 0 fills the data caches, the others then read them
        tasks = load_run_tasks(run)
    if evaluate:
        check_splits_not_empty(tasks, "test", "the final evaluation")
    model, tokenizer, kind = build_model(run, tasks)
    # Only now: a bad config, data, model or run folder fails above without creating (or touching) it.
    barrier()  # every rank has checked the folder before rank 0 changes it
    if main:
        plan.apply(run, log)
    barrier()
    log(f"mtpeft: {run.method} on {run.model.name} ({kind}), tasks: "
        + ", ".join(f"{t.name} ({len(t.train)} train)" for t in tasks))
    if main:
        model.print_trainable_parameters()

    dataset = MultiTaskDataset({t.name: t.train for t in tasks})
    sampler = MultiTaskSampler(dataset.sizes, temperature=run.data.temperature,
                               num_samples=run.train.steps * run.train.batch_size, seed=run.data.seed)
    groups = parameter_groups(model, lr=run.train.lr, routing_lr=run.train.routing_lr,
                              weight_decay=run.train.weight_decay)
    trainer = MultiTaskTrainer(model=model, args=training_arguments(run, out), train_dataset=dataset,
                               data_collator=make_collator(kind, tokenizer, run, tasks),
                               train_sampler=sampler, param_groups=groups, callbacks=callbacks)
    if main:
        remove_incomplete_checkpoints(out)
    barrier()
    checkpoint = plan.checkpoint
    if checkpoint is not None:
        log(f"mtpeft: resuming from {checkpoint}")
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    seconds = time.perf_counter() - started
    if not main:
        barrier()  # wait for rank 0 to save and evaluate
        return out
    model.save_pretrained(out / "adapter")
    write_json(out / "log_history.json", trainer.state.log_history)
    steps_run = max(run.train.steps - (int(checkpoint.name.split("-")[1]) if checkpoint is not None else 0), 1)
    summary = {"method": run.method, "model": run.model.name, "train_loss": result.training_loss,
               "seconds_per_step": seconds / steps_run,
               "trainable_parameters": model.trainable_parameter_breakdown()}
    if evaluate:
        summary.update(evaluate_run_model(model, tokenizer, kind, tasks, run, out))
        print_results(summary, log)
    write_json(out / "metrics.json", summary)
    barrier()
    return out


def checked_model_kind(run: RunConfig) -> str:
    """``model_kind`` with a clear error for a model.name that is neither a named model nor a model folder
    (transformers would take it for a Hub repo id and fail with a traceback)."""
    folder = model_folder(run.model.name)
    if run.model.name not in NAMED_MODELS and not Path(folder).is_dir():
        raise RunConfigError(f"model.name {run.model.name!r} is neither one of {sorted(NAMED_MODELS)} nor a model "
                             f"folder (no such folder); pass a local folder with config.json and the weights.")
    try:
        return model_kind(run.model.name, run.model.kind)
    except (OSError, ValueError) as err:  # no config.json (OSError), or one without model_type (ValueError)
        raise RunConfigError(f"model.name {run.model.name!r} is not a model folder transformers can read "
                             f"({err}).") from None


def check_run_before_writing(run: RunConfig, *, resume: bool):
    """Everything about the run that can be checked before data and model load, without writing: the
    task list, the adapter config it will build, and the run folder (writable; on a resume, the same
    settings as its config.yaml and checkpoint, and a checkpoint that reads back). See mtpeft.app.run_folder."""
    specs = run_task_specs(run)
    kind = checked_model_kind(run)
    adapter = adapter_config(run, len(specs), ["heads"] if kind == "encoder" else None)
    return plan_run_folder(run, adapter.to_dict(), resume=resume)


def evaluate_run_model(model, tokenizer, kind, tasks, run: RunConfig, out: Path, split: str = "test") -> dict:
    accumulator = RoutingAccumulator()
    kwargs = dict(split=split, limit=run.data.max_eval_examples, max_length=run.model.max_length,
                  routing=accumulator)
    if kind == "encoder":
        scores = evaluate_encoder(model, tokenizer, tasks, batch_size=run.train.eval_batch_size, **kwargs)
    else:
        evaluate_lm = evaluate_seq2seq if kind == "seq2seq" else evaluate_causal
        scores = evaluate_lm(model, tokenizer, tasks, batch_size=max(1, run.train.eval_batch_size // 4), **kwargs)
    routing = routing_summary(model, accumulator, [t.name for t in tasks])
    if routing is not None:
        write_json(out / "routing.json", routing)
    return {"split": split, **scores}


def run_adapter_folder(run_dir) -> Path:
    """The run's final adapter/ folder, else its newest complete checkpoint."""
    adapter = Path(run_dir) / "adapter"
    if adapter.exists():
        return adapter
    checkpoints = complete_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir} has neither adapter/ nor a complete checkpoint; train it first "
                                f"(`mtpeft train {run_dir}/config.yaml`): it holds no trained adapter yet. Or pass "
                                f"another run folder.")
    return checkpoints[-1]


def read_run_folder_config(run_dir: Path) -> RunConfig:
    """A run folder's config.yaml, with errors that say what the folder lacks."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist (or is not a folder); pass a folder "
                                f"written by `mtpeft train`.")
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} has no config.yaml; pass a folder written by `mtpeft train`.")
    try:
        return load_run_config(run_dir / "config.yaml")
    except ValueError as err:
        raise type(err)(f"{run_dir}/config.yaml: {err} Restore it from the run's command, or train the run "
                        f"again.") from None


def load_run(run_dir, is_trainable: bool = False) -> tuple[MultiTaskModel, object, str, list, RunConfig]:
    """The trained model of a run folder, ready to evaluate (``is_trainable``: to train further)."""
    run_dir = Path(run_dir)
    run = read_run_folder_config(run_dir)
    adapter = run_adapter_folder(run_dir)  # before loading data and model: a run without one fails fast
    saved = read_adapter_config(adapter)  # a clear AdapterFileError before data and model load
    tasks = load_run_tasks(run)
    if saved.n_tasks is not None and saved.n_tasks != len(tasks):
        raise AdapterFileError(f"{adapter} was trained on {saved.n_tasks} tasks but {run_dir}/config.yaml names "
                               f"{len(tasks)} ({[t.name for t in tasks]}); config.yaml does not describe this "
                               f"adapter. Restore the run's config.yaml.")
    kind = model_kind(run.model.name, run.model.kind)
    base, tokenizer = build_base(run.model.name, kind, tasks, seed=run.train.seed)
    model = MultiTaskModel.from_pretrained(base, adapter, is_trainable=is_trainable)
    return model, tokenizer, kind, tasks, run


def eval_run(run_dir, split: str = "test", log=print) -> dict:
    if split not in ("train", "validation", "test"):  # also names the file written below
        raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}.")
    model, tokenizer, kind, tasks, run = load_run(run_dir)
    check_splits_not_empty(tasks, split, f"`mtpeft eval --split {split}`")
    scores = evaluate_run_model(model, tokenizer, kind, tasks, run, Path(run_dir), split)
    print_results(scores, log)
    write_json(Path(run_dir) / f"eval_{split}.json", scores)
    return scores


def print_results(summary: dict, log=print) -> None:
    width = max(len(n) for n in summary["tasks"]) + 2
    log(f"{'task'.ljust(width)}metric        score    n")
    for name, r in summary["tasks"].items():
        log(f"{name.ljust(width)}{r['metric'].ljust(12)}{r['score']:7.4f} {r['n']:4d}")
    log(f"{'average'.ljust(width)}{'':12}{summary['average']:7.4f}")
