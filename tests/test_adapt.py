"""mtpeft adapt: a trained run grows a new task trained from k examples (routing only, full, further,
fresh), on real MiniLM runs; what each mode trains, what it leaves alone, and what it refuses."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mtpeft.app.adapt import AdaptError, AdaptSettings, adapt_run
from mtpeft.app.pipeline import load_run, train_run
from mtpeft.app.run_config import run_config_from_dict

SOURCE_TASKS = ["intent_recognition", "multiemo"]
TINY = AdaptSettings(steps=2, batch_size=4, seed=0)


def _source(root, method, **adapter):
    out = root / method
    train_run(run_config_from_dict({
        "method": method, "adapter": {"r": 2, "target_modules": ["query", "value"], **adapter},
        "output_dir": str(out), "model": {"name": "minilm", "max_length": 32},
        "data": {"tasks": SOURCE_TASKS, "max_eval_examples": 12},
        "train": {"steps": 3, "batch_size": 4, "logging_steps": 1, "save_steps": 3}}), evaluate=False,
        log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {"poly": _source(root, "poly"), "lora": _source(root, "lora")}


def _tensors(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_routing_mode_trains_only_the_new_tasks_routing_and_head(sources, tmp_path):
    out = tmp_path / "routing"
    metrics = adapt_run(sources["poly"], "bbc_news", shots=8, mode="routing", out=out, settings=TINY,
                        log=lambda *a: None)
    before, after = _tensors(sources["poly"]), _tensors(out)
    logits = [k for k in after if k.endswith("module_logits")]
    assert logits and all(after[k].shape[0] == before[k].shape[0] + 1 for k in logits)  # one task more
    for key, value in after.items():
        if key.endswith("module_logits"):
            assert torch.equal(value[:2], before[key])  # the old tasks' routing is untouched
        elif key.startswith("heads.2."):
            assert key not in before  # the new task's head
        else:
            assert torch.equal(value, before[key]), key  # skills and old heads: frozen
    # the new row starts in U(-1e-3, 1e-3) (Poly's init) and two Adam steps of lr 2e-3 and 1e-3 move it out
    assert max(float(after[k][2].abs().max()) for k in logits) > 2e-3
    assert metrics["task"] == "bbc_news" and metrics["shots"] == 8 and 0.0 <= metrics["score"] <= 1.0
    assert metrics["result"]["n"] == 12  # the source's max_eval_examples
    # what trained: the new task's row of every logits tensor and its head, not the old tasks' rows
    new_head = sum(v.numel() for k, v in after.items() if k.startswith("heads.2."))
    assert metrics["trained_parameters"] == sum(after[k][2].numel() for k in logits) + new_head
    # the folder is a run folder: its config describes the grown adapter, and the old tasks score as before
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"]["tasks"] == SOURCE_TASKS + ["bbc_news"] and config["output_dir"] == str(out)
    assert not list(out.glob("checkpoint-*")) and not list(tmp_path.glob(".*partial"))
    grown, tokenizer, _, tasks, _ = load_run(out)
    source, _, _, _, _ = load_run(sources["poly"])
    batch = tokenizer(["play some jazz please", "what a lovely day"], return_tensors="pt", padding=True)
    for task_id in (0, 1):
        ids = torch.full((2,), task_id)
        with torch.no_grad():
            assert torch.equal(grown(**batch, task_ids=ids).logits, source(**batch, task_ids=ids).logits)


def test_full_mode_trains_the_shared_skills_too(sources, tmp_path):
    out = tmp_path / "full"
    adapt_run(sources["poly"], "bbc_news", shots=8, mode="full", out=out, settings=TINY, log=lambda *a: None)
    before, after = _tensors(sources["poly"]), _tensors(out)
    skills = [k for k in before if "poly_lora_B" in k]
    assert any(not torch.equal(after[k], before[k]) for k in skills)
    assert torch.equal(after["heads.0.weight"], before["heads.0.weight"])  # old heads see no example: frozen


def test_further_and_fresh_modes_of_a_lora_run(sources, tmp_path):
    further = adapt_run(sources["lora"], "bbc_news", shots=8, mode="further", out=tmp_path / "further",
                        settings=TINY, log=lambda *a: None)
    fresh = adapt_run(sources["lora"], "bbc_news", shots=8, mode="fresh", out=tmp_path / "fresh",
                      settings=TINY, log=lambda *a: None)
    grown = json.loads((tmp_path / "further" / "adapter" / "adapter_config.json").read_text())
    alone = json.loads((tmp_path / "fresh" / "adapter" / "adapter_config.json").read_text())
    assert grown["n_tasks"] == 3 and alone["n_tasks"] == 1
    assert set(k for k in _tensors(tmp_path / "fresh") if k.startswith("heads.")) == {"heads.0.weight", "heads.0.bias"}
    before = _tensors(sources["lora"])
    lora_b = [k for k in before if "lora_B" in k]
    assert any(not torch.equal(_tensors(tmp_path / "further")[k], before[k]) for k in lora_b)  # trained on
    assert all(float(_tensors(tmp_path / "fresh")[k].abs().max()) < 0.5 for k in lora_b)  # from B = 0, 2 steps
    # both score the same examples of the new task
    assert further["result"]["n"] == fresh["result"]["n"] == 12
    assert yaml.safe_load((tmp_path / "fresh" / "config.yaml").read_text())["data"]["tasks"] == ["bbc_news"]


@pytest.mark.parametrize("source, kwargs, message", [
    ("lora", dict(mode="routing"), r"lora does not route by task; use --mode further"),
    ("poly", dict(mode="further"), r"poly routes by task: use --mode routing or full"),
    ("poly", dict(mode="sideways"), r"mode 'sideways' is not one of"),
    ("poly", dict(shots=0), r"shots must be a positive number"),
    ("poly", dict(shots=10**6), r"fewer than --shots 1000000; ask for at most"),
    ("poly", dict(task="multiemo"), r"'multiemo' is one of the source run's tasks"),
    ("poly", dict(settings=AdaptSettings(steps=0)), r"train.steps must be >= 1, got 0. Fix the option"),
])
def test_refused_adaptations_write_nothing(sources, tmp_path, source, kwargs, message):
    args = {"task": "bbc_news", "shots": 8, "mode": "full", "settings": TINY, **kwargs}
    out = tmp_path / "out"
    with pytest.raises(AdaptError, match=message):
        adapt_run(sources[source], args.pop("task"), out=out, log=lambda *a: None, **args)
    assert list(tmp_path.iterdir()) == []


def test_adapting_into_a_finished_folder_is_refused(sources, tmp_path):
    out = tmp_path / "done"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(AdaptError, match="exists and is not empty"):
        adapt_run(sources["poly"], "bbc_news", shots=8, mode="routing", out=out, settings=TINY)
    assert [p.name for p in out.iterdir()] == ["metrics.json"]


def test_a_dataset_can_give_its_task_the_id_it_has_in_a_grown_adapter():
    from mtpeft.app.data import MultiTaskDataset

    dataset = MultiTaskDataset({"new": [{"text": "a", "label": 0}]}, task_ids={"new": 5})
    assert dataset[0]["task_id"] == 5 and dataset[0]["task"] == "new"
    with pytest.raises(ValueError, match="one id per task"):
        MultiTaskDataset({"new": []}, task_ids={"other": 1})
