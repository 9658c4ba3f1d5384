"""scripts/adaptation_study.py: sources trained, every held-out task x k x arm adapted, one table and plot;
resumable."""

import importlib.util
import json
from pathlib import Path

import yaml

SCRIPT = Path(__file__).parent.parent / "scripts" / "adaptation_study.py"


def _script():
    spec = importlib.util.spec_from_file_location("adaptation_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adaptation_study_adapts_every_arm_and_resumes(tmp_path):
    script = _script()
    config = tmp_path / "adapt.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "seeds": [0],
        "base": {"model": {"name": "minilm", "max_length": 32},
                 "data": {"tasks": ["intent_recognition", "multiemo"], "max_eval_examples": 12},
                 "train": {"steps": 2, "batch_size": 4, "logging_steps": 1, "save_steps": 2}},
        "methods": [{"name": "lora", "method": "lora", "adapter": {"r": 2}},
                    {"name": "poly", "method": "poly", "adapter": {"r": 2}}],
        "held_out": ["bbc_news"], "shots": [4], "adapt": {"steps": 2, "batch_size": 4}}))
    study, adaptation = script.load_adaptation_study(config)
    rows = script.adaptation_study(study, adaptation, log=lambda *a: None)
    assert sorted(r["arm"] for r in rows) == ["lora: fresh", "lora: further", "poly: full", "poly: routing"]
    out = tmp_path / "out"
    table = json.loads((out / "adaptation.json").read_text())["table"]
    assert table["bbc_news"]["poly: routing"]["4"]["n"] == 1  # JSON keys: k as a string
    assert "| poly: routing |" in (out / "adaptation.md").read_text()
    assert (out / "adaptation.png").read_bytes()[:4] == b"\x89PNG"
    finished = out / "adapt" / "bbc_news" / "k4" / "poly-routing-seed0" / "metrics.json"
    before = finished.stat().st_mtime_ns
    assert len(script.adaptation_study(study, adaptation, log=lambda *a: None)) == 4
    assert finished.stat().st_mtime_ns == before  # a finished adaptation is skipped


def test_an_adaptation_config_without_its_keys_is_refused(tmp_path):
    import pytest

    config = tmp_path / "adapt.yaml"
    config.write_text(yaml.safe_dump({"output_dir": "x", "base": {}, "methods": [], "shots": [4]}))
    with pytest.raises(SystemExit, match=r"needs \['held_out', 'adapt'\]"):
        _script().load_adaptation_study(config)


def test_the_shipped_adaptation_config_plans_valid_sources():
    from mtpeft.app.run_config import run_config_from_dict
    from mtpeft.app.study import planned_runs

    study, adaptation = _script().load_adaptation_study(SCRIPT.parent.parent / "configs" / "adapt-encoder.yaml")
    for planned in planned_runs(study):
        run_config_from_dict(planned["config"])
    held_out = set(adaptation["held_out"])
    assert held_out and not held_out & set(study["base"]["data"]["tasks"])  # held out: not in the sources
