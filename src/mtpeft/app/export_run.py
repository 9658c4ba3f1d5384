"""``mtpeft export RUN_DIR --task NAME --out DIR`` for the exact methods: a run folder's checks (what can be
refused before the model is built), its task names, and the export of its adapter through
:meth:`MultiTaskModel.export_lora` (mtpeft.lib.export writes the folder)."""

from __future__ import annotations

from pathlib import Path

from ..lib.export import ExportError, check_target_folder, has_task_heads


def run_task_names(run) -> list[str]:
    from .data import task_from_dict

    return [task_from_dict(t).name for t in run.data.tasks]


def resolve_task_name(task: str, names: list[str]) -> int:
    """The index of the task *named* ``task``. A task is chosen by name only, never by index: a run
    whose tasks are named "1" and "0" would otherwise make ``--task 1`` ambiguous."""
    if task in names:
        return names.index(task)
    hint = " (--task takes a task's name, not its index)" if task.lstrip("-").isdigit() else ""
    raise ExportError(f"unknown task {task!r}{hint}; this run's tasks are {names}.")


def check_export_request(run_dir, out, task: str | None):
    """Everything that can be refused before the model is built: (run config, task index or None)."""
    from ..lib.config import get_config_class
    from .pipeline import run_adapter_folder
    from .run_config import load_run_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} has no config.yaml; pass a run folder written by `mtpeft train`.")
    run_adapter_folder(run_dir)  # raises when the run has no adapter yet
    check_target_folder(Path(out))
    run = load_run_config(run_dir / "config.yaml")
    names = run_task_names(run)
    index = None if task is None else resolve_task_name(task, names)
    if index is None and get_config_class(run.method).task_routed:
        raise ExportError(f"{run.method} has one adapter per task: pass --task NAME, one of {names}.")
    return run, index, names


def export_run(run_dir, out, task: str | None) -> Path:
    """``mtpeft export RUN_DIR --task NAME --out DIR`` for the exact methods."""
    from .base_models import model_kind
    from .pipeline import load_run

    run, index, names = check_export_request(run_dir, out, task)
    if index is None and model_kind(run.model.name, run.model.kind) == "encoder" and len(names) > 1:
        raise ExportError(f"this encoder run has one classification head per task: pass --task NAME, one of "
                          f"{names}, to export that task's head with the LoRA.")
    model, _, _, tasks, _ = load_run(run_dir)
    if not has_task_heads(model):
        # LoRA has one adapter for every task: the task named (if any) changes nothing in the export
        return model.export_lora(out, task=index if model.config.task_routed else None)
    labels = list(tasks[index if index is not None else 0].spec.labels or []) or None
    return model.export_lora(out, task=index, labels=labels)


def run_exports_exactly(run_dir) -> bool:
    """Whether the run's method has an exact LoRA per task (True too when the folder has no config:
    the exact path then names that problem)."""
    from ..lib.config import get_method_spec
    from .run_config import load_run_config

    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        return True
    return get_method_spec(load_run_config(config).method).export == "exact"


def export_command(run_dir, run) -> str:
    """The ``mtpeft export`` command line that works for a finished run (its first task; token-routed
    methods take the same command, which distils)."""
    import re
    import shlex

    task = run_task_names(run)[0]
    # one folder inside the run whatever the task's name ("../x" or "/abs" stay inside)
    out = Path(run_dir) / ("export-" + re.sub(r"[^A-Za-z0-9_.-]", "_", task))
    return f"mtpeft export {shlex.quote(str(run_dir))} --task {shlex.quote(task)} --out {shlex.quote(str(out))}"
