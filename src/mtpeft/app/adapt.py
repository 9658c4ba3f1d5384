"""Adapt a trained multi-task run to a new task from k examples (issue 19; the sample-efficiency claim of
Polytropon [Ponti et al. 2022] and C-Poly [Wang et al. 2024] on tasks unseen in multi-task training).

    mtpeft adapt RUN_DIR --task winowhy --shots 64 --mode routing --out DIR

The new task trains alone, on the first ``shots`` examples of its training split (shuffled from the
seed, so 16 examples are a subset of 64), for the same number of steps whatever ``shots`` is, and is
scored on its test split as a run's own evaluation scores it. An encoder gets a new classification
head for it (every mode trains that head: nothing else can output the new labels); the source's other
heads are frozen. Modes:

* ``routing`` (task-routed methods with routing logits: Poly, MHR, C-Poly, MTL-LoRA): ``add_tasks(1,
  train_only_routing=True)``, so only the new task's routing logits train over the frozen modules
  (Poly-z / MHR-z [Caccia et al. 2023]); MTL-LoRA's new Λ and C-Poly's new exclusive skill stay at init.
* ``full`` (every task-routed method): ``add_tasks(1)``, then every adapter parameter trains on the new
  task (routing plus what the method allows: shared modules, its own Λ or exclusive skill).
* ``further`` (methods that do not route by task, e.g. the multi-task LoRA): the whole adapter goes on
  training on the new task.
* ``fresh``: the source run's method, model and adapter settings, freshly initialised and trained on the
  k examples alone (from the LoRA source: a fresh LoRA, the baseline every transfer must beat).

The output folder (written whole, or not at all: it is renamed into place when complete) holds ``adapter/`` (the grown adapter: the source's tasks plus the new one, last),
``config.yaml`` (the grown adapter's run config: the source's tasks and the new one, so that ``mtpeft eval``,
``report`` and ``export`` take OUT like any run folder; ``mtpeft train`` on it would train all tasks from
scratch, which is not how it was made), ``log_history.json`` and ``metrics.json`` (the new task's score, the
settings, the source). A folder
with ``metrics.json`` is finished: adapting into an existing non-empty folder is refused.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import torch

from .data import MultiTaskDataset, MultiTaskSampler, load_tasks, task_from_dict
from .data.choices import choices_as_classification
from .run_config import RunConfig

MODES = ("routing", "full", "further", "fresh")


class AdaptError(ValueError):
    """An adaptation that cannot be done as asked; the message names the problem and the fix."""


@dataclasses.dataclass
class AdaptSettings:
    """How the new task trains: the same for every mode and every number of shots."""

    steps: int = 50
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0  # of training (the new head's and a fresh adapter's init, the example order); the
    # new task is split with the source run's data.seed


def check_adaptation(source: RunConfig, task_name: str, mode: str, shots: int, task_routed: bool) -> None:
    """What can be refused before any data or model loads (``task_routed``: the source method routes by task)."""
    if mode not in MODES:
        raise AdaptError(f"mode {mode!r} is not one of {list(MODES)}.")
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise AdaptError(f"shots must be a positive number of training examples, got {shots!r}.")
    names = [t if isinstance(t, str) else t.get("name") for t in source.data.tasks]
    if task_name in names:
        raise AdaptError(f"task {task_name!r} is one of the source run's tasks {names}: adapting to it is not a "
                         f"new task. Pick a task the run was not trained on.")
    if mode in ("routing", "full") and not task_routed:
        raise AdaptError(f"mode {mode!r} adds a task to a task-routed adapter, but {source.method} does not "
                         f"route by task; use --mode further (train the whole adapter on the new task) or fresh.")
    if mode == "further" and task_routed:
        raise AdaptError(f"{source.method} routes by task: use --mode routing or full (add_tasks), not further.")


def adapt_run(source_dir, task, *, shots: int, mode: str, out, settings: AdaptSettings | None = None,
              log=print) -> dict:
    """Adapt the run in ``source_dir`` to ``task`` (a registered name or a task dict) from ``shots``
    examples; write ``out`` and return its metrics. Everything checkable is checked before ``out`` exists."""
    from .pipeline import check_splits_not_empty, load_run, read_run_folder_config, run_adapter_folder, write_json

    settings = settings or AdaptSettings()
    source_dir, out = Path(source_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise AdaptError(f"{out} exists and is not empty; pass a new --out folder (or remove it).")
    source = read_run_folder_config(source_dir)
    run_adapter_folder(source_dir)  # a run without a trained adapter fails here, before any data loads
    spec = task_from_dict(task)
    from ..lib.config import get_method_spec

    check_adaptation(source, spec.name, mode, shots, get_method_spec(source.method).routing == "task")
    train = _train_section(source, settings)  # a bad step count or learning rate is refused here
    data = source.data
    # the source's own split seed: `mtpeft eval OUT` then splits every task, old and new, as this run did
    new = load_tasks([spec], seed=data.seed, val_fraction=data.val_fraction, test_fraction=data.test_fraction)[0]
    if len(new.train) < shots:
        raise AdaptError(f"task {spec.name!r} has {len(new.train)} training examples at this split, fewer than "
                         f"--shots {shots}; ask for at most {len(new.train)}.")
    check_splits_not_empty([new], "test", "the new task's evaluation")

    torch.manual_seed(settings.seed)
    if mode == "fresh":
        model, tokenizer, kind, tasks, run = _fresh_model(source, task, settings, out)
    else:
        model, tokenizer, kind, tasks, run = load_run(source_dir, is_trainable=True)
        if kind == "encoder":
            new = choices_as_classification(new)
        tasks = _grow(model, kind, tasks, new, mode, settings.seed)
        # config.yaml describes the grown adapter: the source's tasks, then the new one
        run = dataclasses.replace(run, data=dataclasses.replace(run.data, tasks=[*run.data.tasks, task]))
    task_id = len(tasks) - 1
    run = dataclasses.replace(run, output_dir=str(out), train=train)
    rows = tasks[task_id].train[:shots]  # the first k of the seed's shuffle: 16 examples are a subset of 64
    log(f"mtpeft adapt: {source.method} ({source_dir}) -> {new.name} from {shots} examples, mode {mode}, "
        f"{settings.steps} steps")

    # Everything is written into a partial folder beside OUT, renamed to OUT once complete: a crash leaves
    # no half OUT (only the partial folder, which the next attempt at OUT removes).
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    run.save(partial / "config.yaml")  # output_dir: OUT, where the folder ends up
    metrics = _train_and_score(model, tokenizer, kind, tasks, task_id, rows,
                               dataclasses.replace(run, output_dir=str(partial)), partial)
    metrics.update({"source": str(source_dir), "source_method": source.method, "task": new.name, "shots": shots,
                    "mode": mode, "settings": dataclasses.asdict(settings)})
    model.save_pretrained(partial / "adapter")
    write_json(partial / "metrics.json", metrics)
    if out.exists():
        out.rmdir()  # empty (checked above); rename onto it is not portable
    partial.rename(out)
    return metrics


def _train_section(source: RunConfig, settings: AdaptSettings):
    """The source's training settings with the adaptation's steps, batch, lr and seed, checked as a run
    config's are; no checkpoint (save_steps past the end: an adaptation is short and restarts whole)."""
    train = dataclasses.replace(source.train, steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
                                seed=settings.seed, save_steps=settings.steps + 1,
                                logging_steps=max(1, min(source.train.logging_steps, settings.steps)))
    try:
        return dataclasses.replace(source, train=train).train  # RunConfig's checks run on construction
    except ValueError as err:
        raise AdaptError(f"{err} Fix the option that sets it (--steps, --batch-size, --lr, --seed).") from None


def _fresh_model(source: RunConfig, task, settings: AdaptSettings, out: Path):
    """The source's method, model and adapter settings, freshly initialised for the new task alone."""
    from .pipeline import build_model, load_run_tasks

    run = dataclasses.replace(source, output_dir=str(out), data=dataclasses.replace(source.data, tasks=[task]),
                              train=dataclasses.replace(source.train, seed=settings.seed))  # the adapter's init
    tasks = load_run_tasks(run)
    model, tokenizer, kind = build_model(run, tasks)
    return model, tokenizer, kind, tasks, run


def _grow(model, kind: str, tasks: list, new, mode: str, seed: int) -> list:
    """Give the loaded source model a slot for the new task (last) and set what trains."""
    n_old = len(tasks)
    if mode == "further":
        model.config.n_tasks = n_old + 1  # the new id is valid; nothing in the adapter is per task
    else:
        model.add_tasks(1, train_only_routing=mode == "routing")
    if kind == "encoder":
        classifier = model.base_model
        torch.manual_seed(seed)
        classifier.add_head(new.num_labels, new.name)
        for i, head in enumerate(classifier.heads):  # the old heads see no example of theirs: frozen
            head.requires_grad_(i == n_old)
    return [*tasks, new]


def _train_and_score(model, tokenizer, kind: str, tasks: list, task_id: int, rows: list, run: RunConfig,
                     out: Path) -> dict:
    from ..lib.optim import parameter_groups
    from ..lib.tasks_api import trained_parameter_count
    from .distill_run import evaluate_tasks
    from .pipeline import make_collator, training_arguments, write_json
    from .trainer import MultiTaskTrainer

    new = tasks[task_id]
    dataset = MultiTaskDataset({new.name: rows}, task_ids={new.name: task_id})
    sampler = MultiTaskSampler(dataset.sizes, temperature=1.0, num_samples=run.train.steps * run.train.batch_size,
                               seed=run.train.seed)
    groups = parameter_groups(model, lr=run.train.lr, routing_lr=run.train.routing_lr,
                              weight_decay=run.train.weight_decay)
    trainer = MultiTaskTrainer(model=model, args=training_arguments(run, out), train_dataset=dataset,
                               data_collator=make_collator(kind, tokenizer, run, tasks), train_sampler=sampler,
                               param_groups=groups)
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    write_json(out / "log_history.json", trainer.state.log_history)
    for checkpoint in out.glob("checkpoint-*"):  # the Trainer's save at the last step: OUT has adapter/
        shutil.rmtree(checkpoint)
    scores = evaluate_tasks(model, tokenizer, kind, tasks, run, [new.name])
    return {"score": scores["tasks"][new.name]["score"], "result": scores["tasks"][new.name],
            "train_loss": result.training_loss, "seconds_per_step": seconds / run.train.steps,
            "trainable_parameters": model.trainable_parameter_breakdown(),
            # what this mode trains (routing: the new task's routing logits and its head only)
            "trained_parameters": trained_parameter_count(model)}
