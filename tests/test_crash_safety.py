"""Crash safety: a training killed with SIGKILL (between checkpoints, or while one is being written)
resumes, with the same command, to a final adapter bit-identical to an uninterrupted run; a kill during
a save leaves the previous checkpoint complete and loadable, and the partial one is ignored and removed.

Every run is a real `mtpeft train CONFIG --no-eval` process (tests/crash_worker.py adds the crash
hooks through environment variables) on a tiny BERT with MiniLM's tokenizer and two small JSON tasks,
TeamLoRA with dropout (so the RNG state must be restored too), 12 steps, a checkpoint every 4.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist_worker import make_fixture, tiny_run_dict
from mtpeft.app.trainer import complete_checkpoints

WORKER = Path(__file__).with_name("crash_worker.py")
STEPS, SAVE_EVERY = 12, 4
TIMEOUT = 300


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTPEFT_CRASH_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1", **extra)
    return env


def mtpeft_train(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    """The plain command: `python -m mtpeft train CONFIG --no-eval`."""
    result = subprocess.run([sys.executable, "-m", "mtpeft", "train", str(config), "--no-eval"], cwd=cwd,
                            capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


def crashing_train(config: Path, cwd: Path, **hooks) -> subprocess.Popen:
    """The same command through tests/crash_worker.py, with a crash hook; output goes to files."""
    log = open(cwd / f"{config.stem}.log", "w")
    return subprocess.Popen([sys.executable, str(WORKER), "train", str(config), "--no-eval"], cwd=cwd,
                            stdout=log, stderr=subprocess.STDOUT, env=_env(**hooks))


def killed_by_sigkill(proc: subprocess.Popen, cwd: Path, config: Path) -> None:
    code = proc.wait(timeout=TIMEOUT)
    assert code == -signal.SIGKILL, (code, (cwd / f"{config.stem}.log").read_text()[-4000:])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    folder, tasks = make_fixture(root)
    return root, folder, tasks


def write_config(setup, name: str, save_total_limit) -> tuple[Path, Path]:
    root, folder, tasks = setup
    run = root / name
    data = tiny_run_dict(folder, tasks, run, method="teamlora", steps=STEPS, lora_dropout=0.1)
    data["train"].update(save_steps=SAVE_EVERY, save_total_limit=save_total_limit)
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump(data))
    return config, run


@pytest.fixture(scope="module")
def reference(setup) -> Path:
    """The uninterrupted run (every checkpoint kept)."""
    config, run = write_config(setup, "reference", None)
    mtpeft_train(config, setup[0])
    assert [p.name for p in complete_checkpoints(run)] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    return run


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in json.loads((run / "log_history.json").read_text()) if "loss" in e}


def assert_resumes_to_the_reference(setup, config: Path, run: Path, reference: Path, from_step: int) -> None:
    result = mtpeft_train(config, setup[0])  # the same command again: resumes
    assert f"mtpeft: resuming from {run / f'checkpoint-{from_step}'}" in result.stdout
    assert_bit_identical(tensors(run / "adapter"), tensors(reference / "adapter"))
    assert_bit_identical(tensors(run / f"checkpoint-{STEPS}"), tensors(reference / f"checkpoint-{STEPS}"))
    assert losses(run) == losses(reference)  # every step's loss, before and after the kill
    moved = max(float(v.abs().max()) for k, v in tensors(reference / "adapter").items() if "lora_B" in k)
    assert moved > 1e-3  # B starts at zero: the adapters compared are trained ones
    assert not list(run.rglob("*.tmp"))  # no partial file left behind


def test_sigkill_mid_run_then_resume_is_bit_identical(setup, reference):
    """SIGKILL after step 6 (checkpoint-4 complete, steps 5-6 lost), then the same command again."""
    root = setup[0]
    config, run = write_config(setup, "killed", 2)
    ready = root / "killed.ready"
    proc = crashing_train(config, root, MTPEFT_CRASH_PAUSE=f"6:{ready}")
    deadline = time.monotonic() + TIMEOUT
    while not ready.exists():  # poll: the worker writes it after step 6, then sleeps
        assert proc.poll() is None, (root / "killed.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "the worker never reached step 6"
        time.sleep(0.1)
    assert (run / "checkpoint-4" / "COMPLETE").exists() and not (run / "checkpoint-8").exists()
    os.kill(proc.pid, signal.SIGKILL)
    killed_by_sigkill(proc, root, config)
    assert not (run / "adapter").exists()
    assert_resumes_to_the_reference(setup, config, run, reference, from_step=4)


def _load_in_process(setup, checkpoint: Path):
    """Load a checkpoint both ways (into a wrapped model, and from_pretrained on a fresh base)."""
    from mtpeft.app.base_models import build_base
    from mtpeft.lib.io import load_adapter_weights
    from mtpeft.lib.model import MultiTaskModel
    from mtpeft.app.pipeline import build_model, load_run_tasks
    from mtpeft.app.run_config import run_config_from_dict

    _, folder, tasks = setup
    run = run_config_from_dict(tiny_run_dict(folder, tasks, checkpoint.parent, method="teamlora", lora_dropout=0.1))
    previous = torch.get_num_threads()
    try:
        loaded_tasks = load_run_tasks(run)
        model, _, _ = build_model(run, loaded_tasks)
        load_adapter_weights(model, checkpoint)
        base, _ = build_base(run.model.name, "encoder", loaded_tasks)
        return MultiTaskModel.from_pretrained(base, checkpoint).adapter_state_dict()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("where", ["adapter", "marker", "rotate"])
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(setup, reference, where):
    """Killed while writing checkpoint-8 (save_total_limit=1): half-way through its adapter file, or
    with every file written but COMPLETE, or half-way through rotating checkpoint-4 out after COMPLETE.
    The newest complete checkpoint is intact, equal to the uninterrupted run's, and loadable; the
    partial one is ignored and removed on resume; the final adapter is bit-identical.

    With the Trainer's own rotation (before COMPLETE) the "marker" kill left no complete checkpoint."""
    root = setup[0]
    config, run = write_config(setup, f"save_{where}", 1)
    proc = crashing_train(config, root, MTPEFT_CRASH_KILL=f"8:{where}")
    killed_by_sigkill(proc, root, config)

    last_good = 8 if where == "rotate" else 4
    assert complete_checkpoints(run) == [run / f"checkpoint-{last_good}"]
    good = run / f"checkpoint-{last_good}"
    assert_bit_identical(tensors(good), tensors(reference / good.name))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (good / name).read_bytes() == (reference / good.name / name).read_bytes(), name
    loaded = _load_in_process(setup, good)
    assert_bit_identical({k: v.contiguous() for k, v in loaded.items()}, tensors(good))
    partial = run / ("checkpoint-4" if where == "rotate" else "checkpoint-8")
    assert partial.is_dir() and not (partial / "COMPLETE").exists()
    if where == "adapter":
        assert [p.name.startswith(".adapter_model.safetensors.") for p in partial.iterdir()] == [True]
    if where == "marker":
        assert {"adapter_model.safetensors", "optimizer.pt", "rng_state.pth"} <= {p.name for p in partial.iterdir()}
    assert_resumes_to_the_reference(setup, config, run, reference, from_step=last_good)
    if where == "rotate":
        assert not (run / "checkpoint-4").exists()  # the half-deleted one was removed
