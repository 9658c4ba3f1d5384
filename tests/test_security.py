"""Security: no load path unpickles, loading never executes code from the files read, and files derived
from data (task names, checkpoints, reports) are written inside the run folder.

Every "would it run code?" test uses a live payload: a pickle whose ``__reduce__`` opens (creates) a
marker file, and the test first proves that a plain ``pickle.loads`` of it does create the marker.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import BUILDERS

import mtpeft
from mtpeft.lib.io import AdapterFileError, load_adapter_weights

SRC = Path(mtpeft.__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class Payload:
    """Unpickling this creates ``marker`` (a stand-in for any code a pickle can run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def live_payload(tmp_path: Path, marker: Path, save=pickle.dumps) -> bytes:
    """The pickled payload, checked to be live: unpickling a copy of it does create a file."""
    probe = tmp_path / "probe_marker"
    assert not probe.exists()
    pickle.loads(pickle.dumps(Payload(probe))).close()
    assert probe.exists()
    probe.unlink()
    if save is pickle.dumps:
        return pickle.dumps(Payload(marker))
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    return buffer.getvalue()


def saved_adapter(tmp_path: Path) -> Path:
    model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.TaskLoraConfig(r=4, n_tasks=3))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


# ----------------------------------------------------------------------------------- no unpickling
FORBIDDEN = {  # pattern -> why it is not allowed in mtpeft's own code
    r"\btorch\.load\(": "torch.load unpickles",
    r"\bpickle\.(load|loads|Unpickler)\b": "unpickling",
    r"^\s*(import|from) (c?pickle|dill|joblib|cloudpickle|marshal|shelve)\b": "pickle-based libraries",
    r"allow_pickle\s*=\s*True": "numpy pickle loading",
    r"weights_only\s*=\s*False": "unrestricted torch.load",
    r"yaml\.(load|unsafe_load|full_load)\(": "YAML that can build Python objects (use yaml.safe_load)",
    r"trust_remote_code\s*=\s*True": "running a model folder's Python code",
    r"(?<![.\w])(eval|exec)\(": "evaluating strings as code",
}


def test_no_unpickling_or_code_loading_in_the_source():
    hits = []
    for path in sorted(SRC.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, why in FORBIDDEN.items():
                if re.search(pattern, line):
                    hits.append(f"{path.relative_to(SRC)}:{number}: {why}: {line.strip()}")
    assert not hits, "\n".join(hits)


@pytest.fixture
def unpickling_forbidden(monkeypatch):
    """Make every unpickling entry point fail loudly for the duration of a test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a load path unpickled")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)


def test_loading_adapters_never_unpickles(tmp_path, unpickling_forbidden):
    path = saved_adapter(tmp_path)
    torch_save_bin = path / "adapter_model.bin"  # a pickle next to the safetensors is ignored, not read
    torch_save_bin.write_bytes(b"not even read")
    loaded = mtpeft.MultiTaskModel.from_pretrained(BUILDERS["llama"](), path)
    load_adapter_weights(loaded, path)
    model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.TaskLoraConfig(r=4, n_tasks=3))
    load_adapter_weights(model, path)


# ----------------------------------------------------------------------------------- adapter folders
def test_a_pickle_disguised_as_safetensors_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = saved_adapter(tmp_path)
    for save in (pickle.dumps, torch.save):  # a raw pickle, and torch.save's zip with a pickle inside
        (path / "adapter_model.safetensors").write_bytes(live_payload(tmp_path, marker, save))
        with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
            mtpeft.MultiTaskModel.from_pretrained(BUILDERS["llama"](), path)
        model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.TaskLoraConfig(r=4, n_tasks=3))
        with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
            load_adapter_weights(model, path)
        assert not marker.exists()


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt", "pytorch_model.bin"])
def test_a_pickled_adapter_is_refused_and_not_run(tmp_path, name):
    marker = tmp_path / "pwned"
    path = saved_adapter(tmp_path)
    (path / "adapter_model.safetensors").unlink()
    (path / name).write_bytes(live_payload(tmp_path, marker, torch.save))
    with pytest.raises(AdapterFileError, match=rf"holds {re.escape(name)} \(a pickle\).*never unpickles"):
        mtpeft.MultiTaskModel.from_pretrained(BUILDERS["llama"](), path)
    assert not marker.exists()


def test_a_pickle_beside_valid_safetensors_is_ignored(tmp_path):
    marker = tmp_path / "pwned"
    path = saved_adapter(tmp_path)
    (path / "adapter_model.bin").write_bytes(live_payload(tmp_path, marker, torch.save))
    mtpeft.MultiTaskModel.from_pretrained(BUILDERS["llama"](), path)
    assert not marker.exists()


@pytest.mark.parametrize("config", [
    {"method": "__import__('os').system('touch pwned')"},
    {"method": "task_lora", "n_tasks": 3, "target_modules": "__import__('os')"},
    {"method": "task_lora", "n_tasks": 3, "r": {"__reduce__": ["os.system", ["touch pwned"]]}},
    {"method": "task_lora", "n_tasks": 3, "__class__": "os.system"},
], ids=["code_as_method", "code_as_target_regex", "reduce_dict_as_field", "dunder_field"])
def test_adapter_config_json_is_data_only(tmp_path, monkeypatch, config):
    """adapter_config.json is parsed as JSON into known fields of a known method: strings stay strings."""
    monkeypatch.chdir(tmp_path)
    path = saved_adapter(tmp_path)
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError):
        mtpeft.MultiTaskModel.from_pretrained(BUILDERS["llama"](), path)
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------------- run configs, models, data
def test_run_config_yaml_cannot_build_python_objects(tmp_path, monkeypatch):
    from mtpeft.app.run_config import load_run_config

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "evil.yaml"
    config.write_text("method: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(yaml.YAMLError, match="could not determine a constructor"):
        load_run_config(config)
    assert not (tmp_path / "pwned").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dist_worker import make_fixture

    root = tmp_path_factory.mktemp("tiny")
    folder, tasks = make_fixture(root)
    return root, folder, tasks


def test_a_model_folder_with_its_own_code_is_refused_not_run(tiny, tmp_path, monkeypatch):
    """A base-model folder whose config points at Python code in the folder (``auto_map``): refused
    without asking; transformers' default asks on stdin, and a piped "y" used to run the code."""
    from mtpeft.app.base_models import build_base, model_kind
    from mtpeft.app.data import load_tasks, task_from_dict

    _, folder, tasks = tiny
    evil = tmp_path / "model"
    shutil.copytree(folder, evil)
    marker = tmp_path / "pwned"
    config = json.loads((evil / "config.json").read_text())
    config.update(model_type="evil_custom", auto_map={"AutoConfig": "evil_code.EvilConfig",
                                                      "AutoModel": "evil_code.EvilModel",
                                                      "AutoTokenizer": ["evil_code.EvilTokenizer", None]})
    (evil / "config.json").write_text(json.dumps(config))
    (evil / "evil_code.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))  # a user (or a pipe) that answers yes
    loaded = load_tasks([task_from_dict(t) for t in tasks])
    with pytest.raises(ValueError, match="contains custom code"):
        model_kind(str(evil), None)
    with pytest.raises(ValueError, match="contains custom code"):
        build_base(str(evil), "encoder", loaded)
    assert not marker.exists()


def test_a_dataset_folder_with_a_loading_script_is_refused_not_run(tmp_path):
    from mtpeft.app.data import TaskDataError, TaskSpec, load_task

    marker = tmp_path / "pwned"
    folder = tmp_path / "evil_data"
    folder.mkdir()
    (folder / "evil_data.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(TaskDataError, match="could not load 'hf:.*scripts are no longer supported"):
        load_task(TaskSpec("evil", f"hf:{folder}"), cache_dir=tmp_path / "cache")
    assert not marker.exists()


# ----------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpointed_run(tiny, tmp_path_factory):
    """A tiny training with one complete checkpoint (checkpoint-2), to resume from."""
    from dist_worker import tiny_run_dict

    from mtpeft.app.pipeline import train_run
    from mtpeft.app.run_config import run_config_from_dict

    _, folder, tasks = tiny
    out = tmp_path_factory.mktemp("ckpt") / "run"
    previous = torch.get_num_threads()
    train_run(run_config_from_dict(tiny_run_dict(folder, tasks, out, steps=2)), evaluate=False, log=lambda *a: None)
    torch.set_num_threads(previous)
    assert (out / "checkpoint-2" / "COMPLETE").exists()
    return out


def _resume(tiny, run_dir: Path, steps: int = 4):
    from dist_worker import tiny_run_dict

    from mtpeft.app.pipeline import train_run
    from mtpeft.app.run_config import run_config_from_dict

    _, folder, tasks = tiny
    return train_run(run_config_from_dict(tiny_run_dict(folder, tasks, run_dir, steps=steps)), evaluate=False,
                     log=lambda *a: None)


@pytest.mark.parametrize("name", ["rng_state.pth", "optimizer.pt", "scheduler.pt"])
def test_a_malicious_trainer_file_in_a_checkpoint_does_not_run_on_resume(tiny, checkpointed_run, tmp_path, name):
    """The Trainer's own checkpoint files are pickles, read on resume by transformers with
    ``torch.load(weights_only=True)``: a restricted unpickler that refuses the payload's global."""
    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    marker = tmp_path / "pwned"
    (run / "checkpoint-2" / name).write_bytes(live_payload(tmp_path, marker, torch.save))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _resume(tiny, run)
    assert not marker.exists()


def test_files_of_a_checkpoint_that_are_never_read(tiny, checkpointed_run, tmp_path):
    """training_args.bin (a full pickle the Trainer writes) is never read on resume; a pickle disguised
    as the adapter is never unpickled."""
    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    marker = tmp_path / "pwned"
    (run / "checkpoint-2" / "training_args.bin").write_bytes(live_payload(tmp_path, marker, torch.save))
    (run / "checkpoint-2" / "adapter_model.bin").write_bytes(live_payload(tmp_path, marker, torch.save))
    _resume(tiny, run)
    assert (run / "checkpoint-4" / "COMPLETE").exists() and not marker.exists()
    (run / "checkpoint-4" / "adapter_model.safetensors").write_bytes(live_payload(tmp_path, marker, torch.save))
    # Not unpickled: the checkpoint fails its safetensors check, is moved aside (kept) and resume falls
    # back to checkpoint-3 (tests/test_run_reliability.py covers the fallback).
    _resume(tiny, run, steps=6)
    assert (run / "checkpoint-4.corrupt" / "adapter_model.safetensors").exists() and not marker.exists()
    assert (run / "checkpoint-6" / "COMPLETE").exists()


# ----------------------------------------------------------------------------------- written paths
def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_task_names_cannot_write_outside_the_run_folder(tiny, tmp_path, monkeypatch):
    """Tasks named like paths ("../../x", an absolute path, "..") through train (with evaluation: metrics,
    routing), report, eval and export: every new file is inside the run folder (or the data cache)."""
    from dist_worker import tiny_run_dict

    from mtpeft.app.cli import main as cli_main
    from mtpeft.app.pipeline import eval_run, train_run
    from mtpeft.app.report import write_report
    from mtpeft.app.run_config import run_config_from_dict

    _, folder, tasks = tiny
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MTPEFT_CACHE", str(tmp_path / "cache"))
    absolute = tmp_path / "abs_evil"
    names = ["../../evil_up", str(absolute), ".."]
    renamed = [{**tasks[0], "name": names[0]}, {**tasks[1], "name": names[1]}, {**tasks[0], "name": names[2]}]
    run_dir = work / "run"
    before = _all_files(tmp_path)
    out = train_run(run_config_from_dict(tiny_run_dict(folder, renamed, run_dir, method="poly", steps=2,
                                                       n_skills=2)), log=lambda *a: None)
    assert json.loads((out / "routing.json").read_text())["rows"] == names
    assert list(json.loads((out / "metrics.json").read_text())["tasks"]) == names
    write_report([out], out / "report")
    eval_run(out, split="validation", log=lambda *a: None)
    with pytest.raises(ValueError, match="split must be 'train', 'validation' or 'test'"):
        eval_run(out, split="../../evil_split")
    assert cli_main(["export", str(out), "--task", names[0], "--out", str(out / "export")]) == 0
    with pytest.raises(SystemExit, match="unknown task '../evil_nope'"):
        cli_main(["export", str(out), "--task", "../evil_nope", "--out", str(out / "export2")])
    new = _all_files(tmp_path) - before
    cache = tmp_path / "cache"
    outside = sorted(str(p) for p in new if not (p == run_dir or run_dir in p.parents
                                                 or p == cache or cache in p.parents))
    assert not outside, outside
    assert not absolute.exists() and not any("evil" in p.name for p in new)
    assert (out / "report" / "report.md").exists() and (out / "eval_validation.json").exists()
    assert (out / "export" / "adapter_model.safetensors").exists() and not (out / "export2").exists()


def test_checkpoint_clean_up_never_deletes_outside_the_run_folder(checkpointed_run, tmp_path):
    """Checkpoint folders are named checkpoint-<step>; a 'checkpoint-*' symlink to a folder elsewhere
    (complete or not) is never followed by rotation or by the clean-up of incomplete checkpoints."""
    from mtpeft.app.trainer import complete_checkpoints, remove_incomplete_checkpoints, rotate_checkpoints

    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    assert [p.name for p in complete_checkpoints(run)] == ["checkpoint-2"]
    for name, complete in (("checkpoint-1", True), ("checkpoint-0", False)):
        outside = tmp_path / f"outside_{name}"
        outside.mkdir()
        (outside / "keep.txt").write_text("x")
        if complete:
            (outside / "COMPLETE").write_text("ok\n")
        (run / name).symlink_to(outside, target_is_directory=True)
    rotate_checkpoints(run, 1)
    remove_incomplete_checkpoints(run)
    for name in ("checkpoint-1", "checkpoint-0"):
        assert (tmp_path / f"outside_{name}" / "keep.txt").exists(), name
    assert (tmp_path / "outside_checkpoint-1" / "COMPLETE").exists()
    assert (run / "checkpoint-2" / "COMPLETE").exists()


def test_bigbench_tarball_members_cannot_extract_outside_the_cache(tmp_path):
    """A crafted BIG-bench tarball whose member names climb out of the task folder is not extracted."""
    from mtpeft.app.data.bigbench import MEMBER_PREFIX, _Tarball

    tarball = tmp_path / "cache" / "bigbench" / "bigbench-1.0.0.tar.gz"
    tarball.parent.mkdir(parents=True)
    good = json.dumps({"examples": [{"input": "x", "target": "y"}]}).encode()
    with tarfile.open(tarball, "w:gz") as tf:
        for name in ("ok_task/task.json", "../../../../evil_task/task.json", "a/../../../../evil2/task.json"):
            info = tarfile.TarInfo(MEMBER_PREFIX + name)
            info.size = len(good)
            tf.addfile(info, io.BytesIO(good))
    tb = _Tarball(tarball)
    tb._scan(want=["ok_task", "../../../../evil_task", "a/../../../../evil2"])
    assert sorted(tb.index()["tasks"]) == ["ok_task"]
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("task.json")}
    assert written == {"cache/bigbench/tasks/ok_task/task.json"}
    assert not any("evil" in str(p) for p in tmp_path.rglob("*")) and not (tmp_path.parent / "evil_task").exists()
