"""Run folders and the command line: bad run configs, reruns with changed settings, broken checkpoints,
unusable output folders, empty splits and broken run folders under `mtpeft eval`.

Every refusal is checked with test_reliability's ``refused``: the error type and message, and the run
folder and the fixture (data files, model folder) byte for byte and mtime unchanged (a folder that did
not exist must still not exist). docs/reliability.md ("Run folders and the command line") lists each
case. Runs are real `train_run` / `mtpeft` calls on the tiny BERT fixture of tests/dist_worker.py.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_reliability import Unchanged, refused

from mtpeft.app.cli import main
from mtpeft.app.data import TaskDataError, TaskSpecError
from mtpeft.lib.io import AdapterFileError
from mtpeft.app.pipeline import eval_run, train_run
from mtpeft.app.run_config import RunConfigError, load_run_config, run_config_from_dict
from mtpeft.app.run_folder import HONOURED_ON_RESUME, RunFolderError
from mtpeft.app.trainer import complete_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")
quiet = lambda *a, **k: None  # noqa: E731


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dist_worker import make_fixture

    root = tmp_path_factory.mktemp("tiny")
    folder, tasks = make_fixture(root)
    return root, folder, tasks


def run_dict(tiny, out, steps=4, **train) -> dict:
    from dist_worker import tiny_run_dict

    _, folder, tasks = tiny
    data = tiny_run_dict(folder, copy.deepcopy(tasks), out, method="lora", steps=steps)
    data["train"].update({"save_steps": 2, "save_total_limit": None, **train})
    return data


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A finished 4-step run (checkpoints 2 and 4, adapter, metrics); tests work on copies of it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train_run(run_config_from_dict(run_dict(tiny, out)), log=quiet)
    return out


def copy_of(trained, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def with_changes(data: dict, changes: dict) -> dict:
    data = copy.deepcopy(data)
    for key, value in changes.items():
        node = data
        *sections, last = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = value
    return data


def cli(*args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code, err, command, match):
    """Exit code 2, one line `mtpeft COMMAND: error: ...` matching ``match``, no traceback (the other
    stderr lines are progress bars)."""
    import re

    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in re.split(r"[\r\n]", err) if "mtpeft" in line or "rror" in line]
    assert len(lines) == 1, err
    line = lines[0][lines[0].find("mtpeft"):]  # after a progress bar's last update, if any
    assert line.startswith(f"mtpeft {command}: error: ") and re.search(match, line), line


# ----------------------------------------------------------------------------------- run-config numbers
BAD_NUMBERS = {
    "steps_zero": ({"train.steps": 0}, r"train.steps must be >= 1, got 0"),
    "steps_negative": ({"train.steps": -40}, r"train.steps must be >= 1, got -40"),
    "steps_bool": ({"train.steps": True}, r"train.steps must be an integer, got True"),
    "steps_null": ({"train.steps": None}, r"train.steps must be an integer, got null"),
    "steps_float": ({"train.steps": 2.5}, r"train.steps must be an integer, got 2.5"),
    "steps_inf": ({"train.steps": float("inf")}, r"train.steps must be an integer, got inf"),
    "steps_empty_string": ({"train.steps": ""}, r"train.steps must be an integer, got ''"),
    "steps_huge": ({"train.steps": 10**12}, r"train.steps x train.batch_size = .* at most 100000000"),
    "batch_zero": ({"train.batch_size": 0}, r"train.batch_size must be >= 1, got 0"),
    "batch_negative": ({"train.batch_size": -4}, r"train.batch_size must be >= 1, got -4"),
    "eval_batch_zero": ({"train.eval_batch_size": 0}, r"train.eval_batch_size must be >= 1"),
    "lr_zero": ({"train.lr": 0}, r"train.lr must be > 0, got 0"),
    "lr_negative": ({"train.lr": -1e-3}, r"train.lr must be > 0"),
    "lr_nan": ({"train.lr": float("nan")}, r"train.lr must be a finite number, got nan"),
    "lr_inf": ({"train.lr": float("inf")}, r"train.lr must be a finite number, got inf"),
    "lr_bool": ({"train.lr": False}, r"train.lr must be a number, got False"),
    "routing_lr_zero": ({"train.routing_lr": 0.0}, r"train.routing_lr must be > 0.*null uses train.lr"),
    "weight_decay_negative": ({"train.weight_decay": -0.1}, r"train.weight_decay must be >= 0"),
    "weight_decay_nan": ({"train.weight_decay": float("nan")}, r"train.weight_decay must be a finite number"),
    "warmup_above_one": ({"train.warmup_ratio": 1.5}, r"train.warmup_ratio must be >= 0 and <= 1, got 1.5"),
    "warmup_negative": ({"train.warmup_ratio": -0.1}, r"train.warmup_ratio must be >= 0"),
    "seed_negative": ({"train.seed": -1}, r"train.seed must be >= 0 and <= 4294967295, got -1"),
    "seed_huge": ({"train.seed": 2**40}, r"train.seed must be >= 0 and <= 4294967295"),
    "data_seed_negative": ({"data.seed": -3}, r"data.seed must be >= 0"),
    "logging_steps_zero": ({"train.logging_steps": 0}, r"train.logging_steps must be >= 1"),
    "save_steps_zero": ({"train.save_steps": 0}, r"train.save_steps must be >= 1"),
    "save_total_limit_zero": ({"train.save_total_limit": 0}, r"save_total_limit must be >= 1.*null keeps every"),
    "threads_zero": ({"train.threads": 0}, r"train.threads must be >= 1 and <= 1024"),
    "threads_huge": ({"train.threads": 10**6}, r"train.threads must be >= 1 and <= 1024"),
    "temperature_zero": ({"data.temperature": 0}, r"data.temperature must be > 0, got 0"),
    "temperature_nan": ({"data.temperature": float("nan")}, r"data.temperature must be a finite number"),
    "temperature_negative": ({"data.temperature": -2.0}, r"data.temperature must be > 0"),
    "val_fraction_one": ({"data.val_fraction": 1.0}, r"data.val_fraction must be >= 0 and < 1"),
    "test_fraction_negative": ({"data.test_fraction": -0.1}, r"data.test_fraction must be >= 0"),
    "fractions_sum_to_one": ({"data.val_fraction": 0.5, "data.test_fraction": 0.5},
                             r"val_fraction \+ data.test_fraction must be < 1"),
    "max_eval_examples_zero": ({"data.max_eval_examples": 0}, r"max_eval_examples must be >= 1.*null evaluates"),
    "max_length_zero": ({"model.max_length": 0}, r"model.max_length must be >= 1"),
    "max_length_string": ({"model.max_length": "long"}, r"model.max_length must be an integer, got 'long'"),
    "gradient_checkpointing_string": ({"model.gradient_checkpointing": "yes"},
                                      r"gradient_checkpointing must be true or false, got 'yes'"),
    "model_name_empty": ({"model.name": ""}, r"model.name must name a model"),
    "output_dir_empty": ({"output_dir": ""}, r"output_dir must name the run folder, got ''"),
    "tasks_not_a_list": ({"data.tasks": "bbc_news"}, r"data.tasks must be a list"),
    "adapter_not_a_mapping": ({"adapter": 4}, r"adapter must be a mapping"),
    "adapter_n_tasks_mismatch": ({"adapter.n_tasks": 5}, r"adapter.n_tasks=5 but data.tasks names 2 tasks"),
    "method_not_a_string": ({"method": 3}, r"method must be a method name"),
}


@pytest.mark.parametrize("case", list(BAD_NUMBERS))
def test_bad_run_config_values_are_refused_before_the_run_folder_exists(tiny, tmp_path, case):
    """Before the fix, steps 0 / batch_size 0 failed in the sampler ("num_samples must be >= 1") after
    the run folder and config.yaml were written; NaN, bools, null and negative seeds went further."""
    changes, match = BAD_NUMBERS[case]
    out = tmp_path / "run"
    data = with_changes(run_dict(tiny, out), changes)
    if changes.get("output_dir") == "":
        out = Path.cwd()  # the empty path is the working folder: nothing may be written there
    refused(lambda: train_run(run_config_from_dict(data), log=quiet), ValueError, match, out, tiny[0])


def test_cli_refuses_a_bad_number_in_one_line_before_writing(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(run_dict(tiny, out)))
    snapshot = Unchanged(out, tiny[0])
    code, _, err = cli("train", config, "train.steps=-40", capsys=capsys)
    one_line_error(code, err, "train", r"train.steps must be >= 1, got -40")
    snapshot.check()


# ----------------------------------------------------------------------------------- task names
def test_two_tasks_with_one_name_are_refused(tiny, tmp_path):
    """Before the fix the second task's data replaced the first's in MultiTaskDataset (keyed by name)
    while n_tasks was 2: metrics showed one row."""
    out = tmp_path / "run"
    data = run_dict(tiny, out)
    data["data"]["tasks"][1]["name"] = "task0"
    refused(lambda: train_run(run_config_from_dict(data), log=quiet), TaskSpecError,
            r"Tasks 0 and 1 are both named 'task0'.*Rename one with a task entry such as \{name: task0_2, source:",
            out, tiny[0])


def test_two_entries_of_one_builtin_task_are_refused(tiny, tmp_path):
    out = tmp_path / "run"
    data = with_changes(run_dict(tiny, out), {"data.tasks": ["bbc_news", {"name": "bbc_news", "max_examples": 50}]})
    refused(lambda: train_run(run_config_from_dict(data), log=quiet), TaskSpecError,
            r"both named 'bbc_news'", out)


# ----------------------------------------------------------------------------------- reruns
REFUSED_CHANGES = {
    "method": ({"method": "task_lora"}, r"method: 'lora' -> 'task_lora'"),
    "adapter_r": ({"adapter.r": 8}, r"adapter.r: 4 -> 8"),
    "task_added": (None, r"adapter.n_tasks: 2 -> 3.*data.tasks: "),
    "lr": ({"train.lr": 0.05}, r"train.lr: 0.01 -> 0.05 \(another learning rate"),
    "seed": ({"train.seed": 1}, r"train.seed: 0 -> 1"),
    "temperature": ({"data.temperature": 1.0}, r"data.temperature: 2.0 -> 1.0"),
    "data_seed": ({"data.seed": 3}, r"data.seed: 0 -> 3"),
    "batch_size": ({"train.batch_size": 2}, r"train.batch_size: 4 -> 2"),
    "warmup": ({"train.warmup_ratio": 0.5}, r"train.warmup_ratio: 0.0 -> 0.5"),
    "max_length": ({"model.max_length": 24}, r"model.max_length: 16 -> 24"),
    "val_fraction": ({"data.val_fraction": 0.2}, r"data.val_fraction: 0.1 -> 0.2"),
}


@pytest.mark.parametrize("case", list(REFUSED_CHANGES))
def test_a_rerun_with_a_setting_resume_cannot_honour_is_refused_and_writes_nothing(tiny, trained, tmp_path, case):
    """Before the fix config.yaml was rewritten first: a task added failed on the checkpoint's adapter
    config but left config.yaml describing 3 tasks (then `mtpeft eval` failed on "missing keys"), and a
    changed lr / seed / temperature resumed silently."""
    out = copy_of(trained, tmp_path)
    changes, match = REFUSED_CHANGES[case]
    data = run_dict(tiny, out)
    if changes is None:
        data["data"]["tasks"].append({**data["data"]["tasks"][0], "name": "task_extra"})
    else:
        data = with_changes(data, changes)
    refused(lambda: train_run(run_config_from_dict(data), log=quiet), RunFolderError,
            rf"holds a run with other settings, which resuming cannot honour: .*{match}.*"
            r"Use a new output_dir for the new settings, or rerun with --no-resume", out, tiny[0])


def test_several_changed_settings_are_all_named(tiny, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    data = with_changes(run_dict(tiny, out), {"train.lr": 0.05, "train.seed": 2, "adapter.r": 2})
    err = refused(lambda: train_run(run_config_from_dict(data), log=quiet), RunFolderError, r"train.lr", out)
    assert all(key in str(err) for key in ("adapter.r: 4 -> 2", "train.lr: 0.01 -> 0.05", "train.seed: 0 -> 2"))


def test_a_rerun_with_changes_resume_honours_warns_and_resumes(tiny, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    changes = {"train.eval_batch_size": 7, "train.logging_steps": 2, "train.threads": 2,
               "data.max_eval_examples": 3, "train.save_total_limit": 3}
    messages = []
    train_run(run_config_from_dict(with_changes(run_dict(tiny, out), changes)), log=messages.append)
    text = "\n".join(map(str, messages))
    for key in changes:
        assert f"warning: resuming {out} with {key} changed" in text, key
        assert key in HONOURED_ON_RESUME
    assert f"resuming from {out / 'checkpoint-4'}" in text
    saved = load_run_config(out / "config.yaml")
    assert saved.train.eval_batch_size == 7 and saved.data.max_eval_examples == 3
    assert json.loads((out / "metrics.json").read_text())["tasks"]["task0"]["n"] == 3
    torch.set_num_threads(1)


def test_a_rerun_with_more_steps_trains_on_with_a_warning(tiny, trained, tmp_path):
    """train.steps raised: the run trains on from the last checkpoint to the new length; the warning
    says that the learning-rate schedule changed."""
    out = copy_of(trained, tmp_path)
    messages = []
    train_run(run_config_from_dict(run_dict(tiny, out, steps=6)), evaluate=False, log=messages.append)
    text = "\n".join(map(str, messages))
    assert "warning: resuming" in text and "train.steps changed from 4 to 6 (the linear learning-rate schedule" in text
    assert f"resuming from {out / 'checkpoint-4'}" in text
    assert complete_checkpoints(out)[-1] == out / "checkpoint-6"


def test_a_rerun_with_fewer_steps_than_the_checkpoint_is_refused(tiny, trained, tmp_path):
    """Before the fix: 0 steps trained and the 4-step adapter saved as the 2-step run's."""
    out = copy_of(trained, tmp_path)
    refused(lambda: train_run(run_config_from_dict(run_dict(tiny, out, steps=2)), log=quiet), RunFolderError,
            r"checkpoint-4 is already past train.steps=2; resuming would train 0 steps.*--no-resume", out, tiny[0])


def test_a_rerun_of_a_run_folder_without_config_yaml_is_refused(tiny, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    (out / "config.yaml").unlink()
    refused(lambda: train_run(run_config_from_dict(run_dict(tiny, out)), log=quiet), RunFolderError,
            r"holds checkpoints but no config.yaml.*Restore config.yaml, or rerun with --no-resume", out)


def test_a_rerun_onto_a_garbage_config_yaml_is_refused(tiny, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    (out / "config.yaml").write_text("method: [unclosed\n")
    refused(lambda: train_run(run_config_from_dict(run_dict(tiny, out)), log=quiet), RunFolderError,
            r"config.yaml cannot be read as a run config \(.*is not valid YAML.*--no-resume", out)


def test_no_resume_starts_afresh_and_leaves_no_stale_checkpoint(tiny, trained, tmp_path):
    """--no-resume over a finished 4-step run with a 2-step config: before the fix the old run's
    COMPLETE checkpoint-4 stayed, and a later plain rerun resumed from it (another run's optimizer)."""
    out = copy_of(trained, tmp_path)
    data = with_changes(run_dict(tiny, out, steps=2), {"train.lr": 0.05})
    messages = []
    train_run(run_config_from_dict(data), resume=False, evaluate=False, log=messages.append)
    assert complete_checkpoints(out) == [out / "checkpoint-2"]
    assert "--no-resume: removed the previous run's adapter, checkpoint-2, checkpoint-4" in "\n".join(messages)
    assert "tasks" not in json.loads((out / "metrics.json").read_text())  # the old run's scores are gone
    assert load_run_config(out / "config.yaml").train.lr == 0.05
    fresh = tmp_path / "fresh"
    train_run(run_config_from_dict({**data, "output_dir": str(fresh)}), evaluate=False, log=quiet)
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(fresh / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same as a run in a new folder


# ----------------------------------------------------------------------------------- broken checkpoints
def _break(path: Path, how: str) -> None:
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00garbage" * 20)
    elif how == "missing":
        path.unlink()
    else:
        raise AssertionError(how)


BROKEN = {
    "adapter_truncated": ("adapter_model.safetensors", "truncated", r"adapter_model.safetensors is not a readable"),
    "optimizer_garbage": ("optimizer.pt", "garbage", r"optimizer.pt is not a readable torch file"),
    "optimizer_truncated": ("optimizer.pt", "truncated", r"optimizer.pt is not a readable torch file"),
    "optimizer_missing": ("optimizer.pt", "missing", r"optimizer.pt is missing"),
    "scheduler_truncated": ("scheduler.pt", "truncated", r"scheduler.pt is not a readable torch file"),
    "rng_garbage": ("rng_state.pth", "garbage", r"rng_state.pth is not a readable torch file"),
    "trainer_state_garbage": ("trainer_state.json", "garbage", r"trainer_state.json is not the Trainer's state"),
    "trainer_state_truncated": ("trainer_state.json", "truncated", r"trainer_state.json is not the Trainer's state"),
    "adapter_config_missing": ("adapter_config.json", "missing", r"adapter_config.json is missing"),
}


@pytest.mark.parametrize("case", ["adapter_truncated", "optimizer_garbage", "trainer_state_garbage"])
def test_a_broken_newest_checkpoint_is_moved_aside_and_resume_falls_back(tiny, trained, tmp_path, case):
    """Before the fix a truncated adapter stopped the rerun; a garbage optimizer.pt or trainer_state.json
    gave a traceback without the file's name. Now checkpoint-4 is moved to checkpoint-4.corrupt (kept,
    bytes unchanged), the run resumes from checkpoint-2, and ends bit-identical to the uninterrupted run."""
    name, how, reason = BROKEN[case]
    out = copy_of(trained, tmp_path)
    _break(out / "checkpoint-4" / name, how)
    broken_bytes = (out / "checkpoint-4" / name).read_bytes()
    messages = []
    train_run(run_config_from_dict(run_dict(tiny, out)), evaluate=False, log=messages.append)
    text = "\n".join(map(str, messages))
    assert "warning: checkpoint-4 cannot be resumed (" in text and "moved it to checkpoint-4.corrupt" in text
    assert f"resuming from {out / 'checkpoint-2'}" in text
    import re
    assert re.search(reason, text), text
    assert (out / "checkpoint-4.corrupt" / name).read_bytes() == broken_bytes
    assert complete_checkpoints(out) == [out / "checkpoint-2", out / "checkpoint-4"]
    a = load_file(str(trained / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", list(BROKEN))
def test_no_checkpoint_that_reads_back_is_an_error_naming_the_file(tiny, trained, tmp_path, case, capsys):
    name, how, reason = BROKEN[case]
    out = copy_of(trained, tmp_path)
    shutil.rmtree(out / "checkpoint-2")
    _break(out / "checkpoint-4" / name, how)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(run_dict(tiny, out)))
    snapshot = Unchanged(out, tiny[0])
    code, _, err = cli("train", config, capsys=capsys)
    one_line_error(code, err, "train", rf"no checkpoint of .* can be resumed \(checkpoint-4: {reason}.*"
                                       r"Delete the broken checkpoint folders, or rerun with --no-resume")
    snapshot.check()


# ----------------------------------------------------------------------------------- output folders
@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs (options given) under tmp_path; unmounted afterwards. Needs root (tests run as root)."""
    mounts = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)
        mounts.append(point)
        return point

    yield mount
    for point in mounts:  # lazy: a failed test's traceback may still hold a file open there
        subprocess.run(["umount", "-l", str(point)], check=True)


def _bad_output_dir(tmp_path, tmpfs, case) -> tuple[Path, Path, str]:
    """(output_dir, the path to check untouched, message)"""
    if case == "is_a_file":
        path = tmp_path / "run"
        path.write_text("not a folder")
        return path, path, r"output_dir .*run is a file, not a folder; choose another output_dir"
    if case == "under_a_file":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file" / "run", tmp_path / "file", r"cannot be created: .*file is a file"
    if case == "read_only":
        point = tmpfs("ro,size=64k")
        return point / "run", point, r"cannot be written: .* is not writable \(permissions or a read-only file system\)"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["is_a_file", "under_a_file", "read_only"])
def test_an_unusable_output_dir_is_one_line_and_nothing_is_written(tiny, tmp_path, tmpfs, capsys, case):
    """Before the fix each was a raw OSError traceback (FileExistsError, NotADirectoryError, EROFS) after
    data and model had loaded."""
    out, untouched, match = _bad_output_dir(tmp_path, tmpfs, case)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(run_dict(tiny, out)))
    snapshot = Unchanged(untouched, tiny[0])
    code, _, err = cli("train", config, capsys=capsys)
    one_line_error(code, err, "train", match)
    snapshot.check()


def test_a_full_disk_before_config_yaml_leaves_no_run_folder(tiny, tmp_path, tmpfs, capsys):
    point = tmpfs("size=64k")
    filler = point / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill the file system to the last byte
        while os.write(fd, b"\0" * 512):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(run_dict(tiny, point / "run")))
    code, _, err = cli("train", config, capsys=capsys)
    one_line_error(code, err, "train", r"cannot write: No space left on device; free disk space there")
    assert sorted(p.name for p in point.iterdir()) == ["filler"]


def test_a_full_disk_during_a_checkpoint_is_one_line_and_resumes_later(tiny, tmp_path, tmpfs, capsys):
    """The Trainer's torch.save reports a full disk as `RuntimeError: ... unexpected pos 10734 vs 10704`
    (a traceback before the fix); now one line naming the checkpoint, which has no COMPLETE marker."""
    point = tmpfs("size=24k")  # config.yaml fits, checkpoint-2 (~43 kB) does not
    out = point / "run"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(run_dict(tiny, out)))
    code, _, err = cli("train", config, "--no-eval", capsys=capsys)
    one_line_error(code, err, "train", r"cannot use .*checkpoint-2: No space left on device while writing "
                                       r"checkpoint-2 \(it has no COMPLETE marker.*free disk space there")
    assert (out / "config.yaml").exists() and complete_checkpoints(out) == []
    subprocess.run(["mount", "-o", "remount,size=1m", str(point)], check=True)  # space freed: the rerun works
    code, _, err = cli("train", config, "--no-eval", capsys=capsys)
    assert code == 0, err
    assert complete_checkpoints(out) == [out / "checkpoint-2", out / "checkpoint-4"]


# ----------------------------------------------------------------------------------- data and splits
def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"json:{path}"


def test_an_empty_test_split_is_refused_before_writing(tiny, tmp_path):
    """4 examples with test_fraction 0.1 leave round(0.4) = 0 test examples: before the fix the run
    trained and reported the task's score as 0 over n = 0 examples, averaged with the others."""
    out = tmp_path / "run"
    data = run_dict(tiny, out)
    data["data"]["tasks"].append({"name": "small", "source": _jsonl(tmp_path / "small.json",
                                                                   [{"text": f"t{i}", "label": i % 2} for i in range(4)])})
    refused(lambda: train_run(run_config_from_dict(data), log=quiet), TaskDataError,
            r"tasks \['small'\] have no test examples \(the final evaluation\); raise data.test_fraction, give them "
            r"more data, or train with --no-eval", out, tiny[0])
    train_run(run_config_from_dict(data), evaluate=False, log=quiet)  # without evaluation it trains
    assert complete_checkpoints(out)


def test_test_fraction_zero_needs_no_eval(tiny, tmp_path):
    out = tmp_path / "run"
    data = with_changes(run_dict(tiny, out), {"data.test_fraction": 0.0})
    refused(lambda: train_run(run_config_from_dict(data), log=quiet), TaskDataError,
            r"tasks \['task0', 'task1'\] have no test examples", out)


FOREIGN = {
    "binary_as_json": (lambda p: p.write_bytes(bytes(range(256)) * 8), "json", r"Task 'x': could not load"),
    "csv_as_json": (lambda p: p.write_text("text,label\na,0\nb,1\n"), "json", r"Task 'x': could not load"),
    "json_scalar": (lambda p: p.write_text("42\n"), "json", r"Task 'x': could not load"),
    "garbage_parquet": (lambda p: p.write_bytes(b"PAR1 not really"), "parquet", r"Task 'x': could not load"),
    "a_folder": (lambda p: p.mkdir(), "json", r"Task 'x': could not load|Task 'x': .*gave no examples"),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_a_foreign_task_file_is_refused_before_writing(tiny, tmp_path, case):
    write, scheme, match = FOREIGN[case]
    path = tmp_path / f"x.{scheme}"
    write(path)
    out = tmp_path / "run"
    data = run_dict(tiny, out)
    data["data"]["tasks"].append({"name": "x", "source": f"{scheme}:{path}"})
    refused(lambda: train_run(run_config_from_dict(data), log=quiet), TaskDataError, match, out, tiny[0])


# ----------------------------------------------------------------------------------- mtpeft eval
def _break_run(out: Path, case: str) -> str:
    if case == "no_config":
        (out / "config.yaml").unlink()
        return r"has no config.yaml; pass a folder written by `mtpeft train`"
    if case == "config_not_yaml":
        (out / "config.yaml").write_text("method: [unclosed\n")
        return r"config.yaml: .*config.yaml is not valid YAML.*Restore it"
    if case == "config_binary":
        (out / "config.yaml").write_bytes(b"\xff\xfe\x00garbage")
        return r"config.yaml is not a text file"
    if case == "config_a_list":
        (out / "config.yaml").write_text("- 1\n- 2\n")
        return r"must hold a YAML mapping of config keys, got list"
    if case == "config_other_tasks":
        data = yaml.safe_load((out / "config.yaml").read_text())
        data["data"]["tasks"].append({**data["data"]["tasks"][0], "name": "extra"})
        (out / "config.yaml").write_text(yaml.safe_dump(data))
        return r"adapter was trained on 2 tasks but .*config.yaml names 3"
    if case == "adapter_truncated":
        _break(out / "adapter" / "adapter_model.safetensors", "truncated")
        return r"adapter_model.safetensors is not a readable safetensors file"
    if case == "adapter_config_missing":
        (out / "adapter" / "adapter_config.json").unlink()
        return r"adapter has no adapter_config.json"
    if case == "no_adapter_no_checkpoint":
        for path in [out / "adapter", *out.glob("checkpoint-*")]:
            shutil.rmtree(path)
        return r"has neither adapter/ nor a complete checkpoint; train it"
    if case == "run_dir_missing":
        shutil.rmtree(out)
        return r"run folder .* does not exist"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["no_config", "config_not_yaml", "config_binary", "config_a_list",
                                  "config_other_tasks", "adapter_truncated", "adapter_config_missing",
                                  "no_adapter_no_checkpoint", "run_dir_missing"])
def test_eval_of_a_broken_run_folder_is_one_line(tiny, trained, tmp_path, capsys, case):
    out = copy_of(trained, tmp_path)
    match = _break_run(out, case)
    snapshot = Unchanged(out)
    code, _, err = cli("eval", out, capsys=capsys)
    one_line_error(code, err, "eval", match)
    snapshot.check()


def test_eval_of_an_empty_split_is_refused(tiny, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    data = yaml.safe_load((out / "config.yaml").read_text())
    data["data"]["val_fraction"] = 0.0
    (out / "config.yaml").write_text(yaml.safe_dump(data))
    refused(lambda: eval_run(out, split="validation", log=quiet), TaskDataError,
            r"have no validation examples \(`mtpeft eval --split validation`\); raise data.val_fraction", out)


# ----------------------------------------------------------------------------------- the CLI's error lines
def test_only_errors_that_explain_themselves_become_one_line(monkeypatch):
    """A bug keeps its traceback: a RuntimeError, or an OSError that names no path and is not a full or
    read-only disk, is re-raised by main; MTPEFT_DEBUG=1 re-raises the known ones too."""
    import errno

    from mtpeft.app import cli as cli_module

    def failing(error):
        def run(args):
            raise error
        return run

    for error in (RuntimeError("a bug"), OSError("no errno"), AttributeError("x")):
        monkeypatch.setattr(cli_module, "cmd_report", failing(error))
        with pytest.raises(type(error)):
            cli_module.main(["report", "somewhere"])
    monkeypatch.setattr(cli_module, "cmd_report", failing(OSError(errno.EACCES, "Permission denied", "/x/y")))
    assert cli_module.main(["report", "somewhere"]) == 2
    monkeypatch.setenv("MTPEFT_DEBUG", "1")
    with pytest.raises(PermissionError):
        cli_module.main(["report", "somewhere"])


def test_run_config_errors_are_value_errors():
    assert issubclass(RunConfigError, ValueError) and issubclass(RunFolderError, ValueError)
    assert issubclass(AdapterFileError, ValueError)


# ----------------------------------------------------------------------------------- task entries at their edges
BAD_TASK_ENTRIES = {
    "max_examples_bool": ({"max_examples": True}, TaskSpecError, r"max_examples must be a positive integer or None, got True"),
    "labels_a_string": ({"labels": "01"}, TaskSpecError, r"labels must be a non-empty list of class names, got '01'"),
    "labels_empty": ({"labels": []}, TaskSpecError, r"labels must be a non-empty list"),
    "one_label": ({"labels": ["0"]}, TaskSpecError, r"a classification task needs at least 2 labels"),
    "one_class_in_the_data": ({"labels": None, "source": "ONE_CLASS"}, TaskDataError,
                              r"its data has only the label \['0'\]; a classification task needs at least 2"),
}


@pytest.mark.parametrize("case", list(BAD_TASK_ENTRIES))
def test_task_entries_at_their_edges_are_refused_before_writing(tiny, tmp_path, case):
    """Before the fix `max_examples: true` kept 1 example, `labels: "01"` became the labels ['0', '1'] by
    splitting the string, and a one-class task trained and scored 1.0."""
    fields, error, match = BAD_TASK_ENTRIES[case]
    out = tmp_path / "run"
    data = run_dict(tiny, out)
    if fields.get("source") == "ONE_CLASS":
        fields = {**fields, "source": _jsonl(tmp_path / "one.json", [{"text": f"t{i}", "label": 0} for i in range(12)])}
    data["data"]["tasks"][0].update(fields)
    refused(lambda: train_run(run_config_from_dict(data), log=quiet), error, match, out, tiny[0])


BAD_CONFIG_FILES = {
    "missing": (lambda p: None, r"config file .*c.yaml does not exist"),
    "not_yaml": (lambda p: p.write_text("train: {steps: [\n"), r"c.yaml is not valid YAML \(while parsing"),
    "binary": (lambda p: p.write_bytes(b"\xff\xfe\x00\x01"), r"c.yaml is not a text file \(not UTF-8\)"),
    "a_list": (lambda p: p.write_text("- method\n"), r"c.yaml must hold a YAML mapping of config keys, got list"),
    "a_folder": (lambda p: p.mkdir(), r"c.yaml is a folder, not a YAML config file"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIG_FILES))
def test_a_bad_config_file_is_one_line(tmp_path, capsys, case):
    """Before the fix a config that is not YAML, not text or a folder gave a yaml / Unicode / IsADirectory
    traceback."""
    write, match = BAD_CONFIG_FILES[case]
    config = tmp_path / "c.yaml"
    write(config)
    snapshot = Unchanged(tmp_path)
    code, _, err = cli("train", config, capsys=capsys)
    one_line_error(code, err, "train", match)
    snapshot.check()


@pytest.mark.parametrize("case", ["no_such_folder", "folder_without_config"])
def test_a_model_name_that_is_no_model_is_one_line(tiny, tmp_path, capsys, case):
    """Before the fix transformers took the path for a Hub repo id: an OSError traceback."""
    name = tmp_path / "nothing"
    if case == "folder_without_config":
        name.mkdir()
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(with_changes(run_dict(tiny, out), {"model.name": str(name), "model.kind": None})))
    snapshot = Unchanged(tmp_path)
    code, _, err = cli("train", config, capsys=capsys)
    match = (r"is neither one of \['minilm', 'smollm2'\] nor a model folder" if case == "no_such_folder"
             else r"is not a model folder transformers can read")
    one_line_error(code, err, "train", match)
    snapshot.check()
