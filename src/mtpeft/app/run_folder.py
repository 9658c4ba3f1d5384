"""What ``mtpeft train`` checks in the run folder before it writes a byte of it.

A rerun of a run folder resumes it, so the new run config must describe the same training as the one
the checkpoints came from: every setting is compared with the folder's ``config.yaml`` and with the
resumed checkpoint's ``adapter_config.json``. A changed setting that resume cannot honour (the result
would not be the result of any one uninterrupted run) is refused, naming each key; one that only
changes how the run is watched (logging, evaluation, checkpoint frequency, threads) is accepted with a
warning naming it (:data:`HONOURED_ON_RESUME`). The checkpoint to resume is the newest complete one
whose files all read back (:func:`checkpoint_problem`); newer ones that do not are moved aside, with
a warning, not deleted. Nothing is written until every check has passed (:meth:`RunFolderPlan.apply`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .trainer import COMPLETE_MARKER, complete_checkpoints


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (not writable, another run's settings, no checkpoint that
    loads); the message names the folder or the keys and the fix."""


# Changes that resume honours: they change what is logged, evaluated or kept, not what is trained.
HONOURED_ON_RESUME = {
    "output_dir": "the run folder was moved or copied; the new path is used",
    "model.gradient_checkpointing": "memory only: the gradients are the same",
    "data.max_eval_examples": "evaluation only",
    "train.eval_batch_size": "evaluation only",
    "train.logging_steps": "what is logged, not what is trained",
    "train.save_steps": "when checkpoints are written",
    "train.save_total_limit": "how many checkpoints are kept",
    "train.threads": "speed only (sums may differ in the last bits)",
    # Training on from a checkpoint to a new length (the sample stream's prefix does not depend on its
    # length); refused when the checkpoint is already past the new train.steps.
    "train.steps": "the linear learning-rate schedule is recomputed over the new train.steps, so the steps "
                   "after the checkpoint follow it and the result is not that of one uninterrupted run",
}
# Why the others are refused (by key prefix; anything not listed is refused too).
REFUSED_ON_RESUME = {
    "method": "the checkpoint holds another method's adapter",
    "adapter": "the checkpoint's adapter was built with other fields",
    "model": "another base model or tokenisation than the checkpoint was trained on",
    "data.tasks": "other tasks: other task ids, heads and data stream",
    "data.seed": "other train / validation / test splits and another data stream",
    "data.temperature": "another task mixture from the checkpoint's step on",
    "data.val_fraction": "other splits",
    "data.test_fraction": "other splits",
    "train.batch_size": "another sample stream and step size",
    "train.lr": "another learning rate than the steps already trained",
    "train.routing_lr": "another learning rate than the steps already trained",
    "train.weight_decay": "another optimizer than the steps already trained",
    "train.warmup_ratio": "another learning-rate schedule",
    "train.seed": "another data order and dropout stream",
}

# The files the Trainer needs to resume exactly; without optimizer.pt or scheduler.pt it would silently
# start a fresh optimizer or schedule.
_REQUIRED = ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "optimizer.pt",
             "scheduler.pt")
_FRESH_START_OUTPUTS = ("adapter", "metrics.json", "log_history.json", "routing.json", "eval_train.json",
                        "eval_validation.json", "eval_test.json", "report")


def check_output_dir(path: Path) -> None:
    """The run folder can be created (or is a folder) and written: refuse a file, a path under a file,
    or a folder without write permission or on a read-only file system, before anything is written.
    (``os.access`` reports a read-only file system also for root, whose writes no mode bit blocks.)"""
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"output_dir {path} is a file, not a folder; choose another output_dir.")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise RunFolderError(f"output_dir {path} cannot be created: {existing} is a file; choose another "
                             f"output_dir.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(f"output_dir {path} cannot be written: {existing} is not writable (permissions or "
                             f"a read-only file system); choose another output_dir.")


def checkpoint_problem(folder: Path) -> str | None:
    """Why this complete checkpoint cannot be resumed exactly (a missing or unreadable file), or None.

    Reads without unpickling: the safetensors file is parsed, ``trainer_state.json`` must be the
    Trainer's state at this step, and the torch files (zip archives) must pass their CRC checks."""
    from safetensors.torch import load_file
    from transformers import TrainerState

    for name in _REQUIRED:
        if not (folder / name).is_file():
            return f"{name} is missing"
    if not list(folder.glob("rng_state*.pth")):
        return "rng_state.pth is missing"
    try:
        load_file(str(folder / "adapter_model.safetensors"))
    except Exception as err:  # safetensors raises several types; all mean "unreadable"
        return f"adapter_model.safetensors is not a readable safetensors file ({err})"
    try:
        json.loads((folder / "adapter_config.json").read_text())
    except (ValueError, OSError) as err:
        return f"adapter_config.json is not valid JSON ({err})"
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        TrainerState(**state)
    except (ValueError, TypeError, OSError) as err:
        return f"trainer_state.json is not the Trainer's state ({type(err).__name__}: {err})"
    step = int(folder.name.split("-")[1])
    if state.get("global_step") != step:
        return f"trainer_state.json is at step {state.get('global_step')!r}, not {step}"
    for path in [folder / "optimizer.pt", folder / "scheduler.pt", *sorted(folder.glob("rng_state*.pth"))]:
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            return f"{path.name} is not a readable torch file ({err}); it may be truncated"
        if bad is not None:
            return f"{path.name} is corrupted (its member {bad} fails its CRC check)"
    return None


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "adapter":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _reason(key: str) -> str:
    for prefix in (key, key.split(".")[0]):
        if prefix in REFUSED_ON_RESUME:
            return REFUSED_ON_RESUME[prefix]
    return "the run would no longer be one run"


def changed_settings(saved: dict, new: dict) -> dict[str, tuple]:
    """``{dotted key: (saved value, new value)}`` for every setting that differs (``adapter.<field>`` for
    the resolved adapter configs, ``method``, ``train.lr`` ...)."""
    a, b = _flatten(saved), _flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


@dataclass
class RunFolderPlan:
    """What train_run does to the folder once every check has passed."""

    out: Path
    checkpoint: Path | None = None  # resume from it (None: from scratch)
    corrupt: list[tuple[Path, str]] = field(default_factory=list)  # moved aside, with the reason
    warnings: list[str] = field(default_factory=list)
    fresh_start: bool = False  # --no-resume on a folder that holds a run: its outputs are removed

    def apply(self, run, log=print) -> None:
        """Create the folder, move corrupt checkpoints aside, write config.yaml (rank 0 only)."""
        created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            for message in self.warnings:
                log(f"mtpeft: warning: {message}")
            if self.fresh_start:
                removed = _remove_previous_run(self.out)
                if removed:
                    log(f"mtpeft: --no-resume: removed the previous run's {', '.join(removed)} from {self.out}")
            for folder, reason in self.corrupt:
                aside = _aside_name(folder)
                folder.rename(aside)
                log(f"mtpeft: warning: {folder.name} cannot be resumed ({reason}); moved it to {aside.name} "
                    f"(not deleted) and resuming from {self.checkpoint.name if self.checkpoint else 'scratch'}.")
            run.save(self.out / "config.yaml")
        except BaseException:
            if created and not any(self.out.iterdir()):
                self.out.rmdir()  # a write that failed (e.g. a full disk) leaves no empty run folder
            raise


def _aside_name(folder: Path) -> Path:
    candidate = folder.with_name(f"{folder.name}.corrupt")
    n = 2
    while candidate.exists():
        candidate = folder.with_name(f"{folder.name}.corrupt-{n}")
        n += 1
    return candidate


def _remove_previous_run(out: Path) -> list[str]:
    """The files mtpeft wrote for the previous run (checkpoints, adapter, metrics, logs, report): a
    fresh start must not leave a stale checkpoint that a later resume would pick up, nor an adapter
    that config.yaml no longer describes."""
    removed = []
    for path in sorted(out.iterdir()):
        ours = re.fullmatch(r"checkpoint-\d+", path.name) or path.name in _FRESH_START_OUTPUTS
        if not ours or path.is_symlink():
            continue
        if path.is_dir():
            (path / COMPLETE_MARKER).unlink(missing_ok=True)  # an interrupted removal is never "complete"
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path.name)
    return removed


def plan_run_folder(run, resumed_adapter: dict, *, resume: bool) -> RunFolderPlan:
    """Check the run folder for ``run`` without writing to it.

    ``resumed_adapter`` is the adapter config the run will build (``to_dict()``), compared with the
    folder's config.yaml and the checkpoint's adapter_config.json.
    """
    from .run_config import adapter_config, load_run_config

    out = Path(run.output_dir)
    check_output_dir(out)
    plan = RunFolderPlan(out)
    config_file = out / "config.yaml"
    checkpoints = complete_checkpoints(out)
    fix = (f"Use a new output_dir for the new settings, or rerun with --no-resume to discard {out}'s run and "
           f"start afresh there.")
    if not resume:
        plan.fresh_start = config_file.exists() or bool(checkpoints)
        return plan
    if not config_file.exists():
        if checkpoints:
            raise RunFolderError(f"{out} holds checkpoints but no config.yaml, so their settings cannot be checked "
                                 f"against this run's. Restore config.yaml, or rerun with --no-resume to start "
                                 f"afresh.")
        return plan
    if not config_file.is_file():
        raise RunFolderError(f"{config_file} is not a file. {fix}")
    try:
        saved = load_run_config(config_file)
        saved_adapter = adapter_config(saved, len(saved.data.tasks), None).to_dict()
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise RunFolderError(f"{config_file} cannot be read as a run config ({err}), so this run cannot be checked "
                             f"against it. {fix}") from None
    new_adapter = dict(resumed_adapter)
    new_adapter.pop("modules_to_save", None)  # added by the run (encoder heads), not a user setting
    saved_adapter.pop("modules_to_save", None)
    old = {**saved.to_dict(), "adapter": None, **{f"adapter.{k}": v for k, v in saved_adapter.items()}}
    new = {**run.to_dict(), "adapter": None, **{f"adapter.{k}": v for k, v in new_adapter.items()}}
    for folder in reversed(checkpoints):  # newest first
        problem = checkpoint_problem(folder)
        if problem is None:
            plan.checkpoint = folder
            break
        plan.corrupt.append((folder, problem))
    if plan.corrupt and plan.checkpoint is None:
        listed = "; ".join(f"{f.name}: {p}" for f, p in plan.corrupt)
        raise RunFolderError(f"no checkpoint of {out} can be resumed ({listed}). Delete the broken checkpoint "
                             f"folders, or rerun with --no-resume to start afresh.")
    _check_changes(plan, changed_settings(old, new), config_file, fix)
    if plan.checkpoint is not None:
        step = int(plan.checkpoint.name.split("-")[1])
        if step > run.train.steps:
            raise RunFolderError(f"{plan.checkpoint} is already past train.steps={run.train.steps}; resuming would "
                                 f"train 0 steps and keep its {step}-step weights. {fix}")
        _check_checkpoint_adapter(plan.checkpoint, resumed_adapter, fix)
    return plan


def _check_changes(plan: RunFolderPlan, changes: dict, config_file: Path, fix: str) -> None:
    refused = {k: v for k, v in changes.items() if k not in HONOURED_ON_RESUME}
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r} ({_reason(k)})" for k, (a, b) in refused.items())
        raise RunFolderError(f"{config_file.parent} holds a run with other settings, which resuming cannot honour: "
                             f"{listed}. {fix}")
    for key, (a, b) in changes.items():
        plan.warnings.append(f"resuming {config_file.parent} with {key} changed from {a!r} to {b!r} "
                             f"({HONOURED_ON_RESUME[key]}).")


def _check_checkpoint_adapter(checkpoint: Path, resumed_adapter: dict, fix: str) -> None:
    from ..lib.config import AdapterConfig

    try:
        saved = AdapterConfig.from_dict(json.loads((checkpoint / "adapter_config.json").read_text())).to_dict()
    except (ValueError, TypeError, KeyError) as err:
        raise RunFolderError(f"{checkpoint / 'adapter_config.json'} is not an mtpeft adapter config ({err}). "
                             f"{fix}") from None
    changes = changed_settings({"adapter": None, **{f"adapter.{k}": v for k, v in saved.items()}},
                               {"adapter": None, **{f"adapter.{k}": v for k, v in resumed_adapter.items()}})
    if changes:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        raise RunFolderError(f"{checkpoint} was saved with another adapter config than this run builds ({listed}). "
                             f"{fix}")


__all__ = ["HONOURED_ON_RESUME", "REFUSED_ON_RESUME", "RunFolderError", "RunFolderPlan", "changed_settings",
           "check_output_dir", "checkpoint_problem", "plan_run_folder"]
