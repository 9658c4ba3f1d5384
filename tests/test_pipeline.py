"""End to end on real data: MiniLM on real tasks through the HF Trainer; resume; the CLI."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from mtpeft.app.pipeline import train_run
from mtpeft.app.run_config import load_run_config, run_config_from_dict


def tiny_run(out, method="lora", steps=20, **adapter):
    return run_config_from_dict({
        "method": method, "adapter": adapter, "output_dir": str(out),
        "model": {"name": "minilm", "max_length": 48},
        "data": {"tasks": ["bbc_news", "intent_recognition"], "max_eval_examples": 40},
        "train": {"steps": steps, "batch_size": 8, "lr": 3e-3, "logging_steps": 5, "save_steps": 10,
                  "warmup_ratio": 0.0},
    })


def losses(run_dir):
    return {e["step"]: e["loss"] for e in json.loads((run_dir / "log_history.json").read_text()) if "loss" in e}


def test_short_real_run_loss_falls_and_writes_the_run_folder(tmp_path):
    out = train_run(tiny_run(tmp_path / "run"), log=lambda *a: None)
    curve = losses(out)
    assert curve[20] < curve[5]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"bbc_news", "intent_recognition"}
    assert 0.0 <= metrics["average"] <= 1.0
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "checkpoint-20" / "COMPLETE").exists()


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_equals_uninterrupted(tmp_path):
    """TeamLoRA (dropout 0.05: the RNG state matters) stopped at step 10 and resumed."""
    quiet = lambda *a: None  # noqa: E731
    full = train_run(tiny_run(tmp_path / "full", "teamlora"), evaluate=False, log=quiet)
    part = tmp_path / "part"
    train_run(tiny_run(part, "teamlora"), evaluate=False, log=quiet, callbacks=[StopAt(10)])
    assert not (part / "checkpoint-20").exists() and (part / "checkpoint-10" / "COMPLETE").exists()
    train_run(tiny_run(part, "teamlora"), evaluate=False, log=quiet)  # resumes from checkpoint-10
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert losses(full)[15] == losses(part)[15] and losses(full)[20] == losses(part)[20]


def test_run_config_errors():
    with pytest.raises(ValueError, match="unknown config key 'trian'. Did you mean 'train'"):
        run_config_from_dict({"trian": {}})
    with pytest.raises(ValueError, match=r"unknown config key train.'stpes'. Did you mean 'steps'"):
        run_config_from_dict({"train": {"stpes": 3}})
    with pytest.raises(ValueError, match="unknown method 'teamlor'. Did you mean 'teamlora'"):
        run_config_from_dict({"method": "teamlor"})


def test_overrides_parse_yaml_values(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"method": "lora", "train": {"steps": 5}}))
    run = load_run_config(cfg, ["train.steps=7", "adapter.r=4", "data.tasks=[bbc_news]"])
    assert run.train.steps == 7 and run.adapter == {"r": 4} and run.data.tasks == ["bbc_news"]
    # YAML 1.1 reads 1e-4 (no dot) as a string: number fields take it as the number it spells.
    cfg.write_text("method: lora\ntrain: {lr: 1e-4, steps: 5}\nadapter: {lora_dropout: 5e-2}\n")
    run = load_run_config(cfg, ["train.weight_decay=1e-2"])
    assert run.train.lr == 1e-4 and run.train.weight_decay == 1e-2 and isinstance(run.train.lr, float)
    from mtpeft.lib.config import AdapterConfig
    assert AdapterConfig.from_dict({"method": "lora", **run.adapter}).lora_dropout == 0.05


def mtpeft_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mtpeft", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_cli_end_to_end(tmp_path):
    for command in ("train", "eval", "report", "export"):
        result = mtpeft_cli(command, "--help", cwd=tmp_path)
        assert result.returncode == 0 and "usage: mtpeft " + command in result.stdout
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "method": "task_lora", "adapter": {"r": 4},
        "model": {"name": "minilm", "max_length": 32},
        "data": {"tasks": ["intent_recognition", "bbc_news"], "max_eval_examples": 16},
        "train": {"steps": 4, "batch_size": 4, "logging_steps": 2, "save_steps": 4}}))
    run = tmp_path / "run"
    result = mtpeft_cli("train", config, f"output_dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "intent_recognition" in result.stdout and "average" in result.stdout
    assert (run / "report" / "report.md").exists() and (run / "report" / "scores.png").exists()
    result = mtpeft_cli("eval", run, "--split", "validation", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run / "eval_validation.json").read_text())["split"] == "validation"
    result = mtpeft_cli("report", run, run, "--out", tmp_path / "both", cwd=tmp_path)
    assert result.returncode == 0 and "| run (task_lora) |" in (tmp_path / "both" / "report.md").read_text()
    result = mtpeft_cli("export", run, "--task", "bbc_news", "--out", tmp_path / "peft", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    result = mtpeft_cli("train", config, "train.stpes=3", cwd=tmp_path)
    assert result.returncode == 2 and "Did you mean 'steps'" in result.stderr
    result = mtpeft_cli("export", run, "--task", "nope", "--out", tmp_path / "x", cwd=tmp_path)
    assert result.returncode != 0 and "unknown task 'nope'" in result.stderr


def test_every_shipped_config_parses_and_builds_its_adapter_config():
    from pathlib import Path

    from mtpeft.lib.config import package_methods
    from mtpeft.app.run_config import adapter_config

    import yaml

    # study configs (and the adaptation study's) list methods over a base: checked in test_study and
    # test_adaptation_study
    configs = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")
                     if "methods" not in yaml.safe_load(p.read_text()))
    assert len(configs) >= 10
    methods = set()
    for path in configs:
        run = load_run_config(path)
        methods.add(run.method)
        assert adapter_config(run, n_tasks=3, modules_to_save=["heads"]).n_tasks == 3
    assert methods >= set(package_methods())  # a shipped config for every method the package registers
