"""The model's kind is read from its checkpoint; a T5 and a GPT-2 (LM head) saved to disk train,
evaluate, report and export from the CLI with no ``model.kind`` given."""

import json
import math
from pathlib import Path

import pytest
import peft
import torch
import yaml
from transformers import (BertConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, T5Config,
                          T5ForConditionalGeneration)

from mtpeft.app.base_models import build_base, kind_from_config, model_kind
from mtpeft.app.cli import main
from mtpeft.lib.heads import MultiTaskEncoderClassifier
from mtpeft.app.pipeline import load_run
from mtpeft.app.run_config import run_config_from_dict
from tiny_lm_folders import save_tiny_gpt2, save_tiny_t5, write_tasks


def config_folder(tmp_path, config, architectures) -> str:
    """A folder holding only config.json, as a checkpoint saved from ``architectures`` has."""
    config.architectures = architectures
    folder = tmp_path / "_".join(architectures or ["none"]) / type(config).__name__
    config.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("config, architectures, kind", [
    (T5Config(), ["T5ForConditionalGeneration"], "seq2seq"),
    (GPT2Config(), ["GPT2LMHeadModel"], "causal"),
    (LlamaConfig(), ["LlamaForCausalLM"], "causal"),
    (BertConfig(), ["BertModel"], "encoder"),
    (BertConfig(), ["BertForMaskedLM"], "encoder"),
    (BertConfig(), ["BertForSequenceClassification"], "encoder"),
    (T5Config(), None, "seq2seq"),  # no architectures: the model type decides
    (BertConfig(), None, "encoder"),
    (GPT2Config(), None, "causal"),
])
def test_kind_is_read_from_the_checkpoint_config(tmp_path, config, architectures, kind):
    folder = config_folder(tmp_path, config, architectures)
    assert model_kind(folder, None) == kind


@pytest.mark.parametrize("config, architectures", [
    (GPT2Config(), ["GPT2Model"]),  # a decoder backbone without its LM head: not an encoder, not an LM
    (LlamaConfig(), ["LlamaForSequenceClassification"]),
    (T5Config(), ["T5EncoderModel"]),
    (GPT2Config(), ["MyOwnGPT"]),
])
def test_unknown_kind_asks_for_model_kind(tmp_path, config, architectures):
    folder = config_folder(tmp_path, config, architectures)
    assert kind_from_config(config) is None
    with pytest.raises(ValueError, match=r"cannot tell which kind of model.*set model\.kind to 'encoder'.*'seq2seq'"):
        model_kind(folder, None)
    assert model_kind(folder, "causal") == "causal"  # model.kind overrides the inference


def test_model_kind_overrides_and_mismatches_are_refused_before_loading(tmp_path):
    t5 = config_folder(tmp_path, T5Config(), ["T5ForConditionalGeneration"])
    gpt2 = config_folder(tmp_path, GPT2Config(), ["GPT2LMHeadModel"])
    # config.json only: a mismatch must be refused before the tokenizer or weights are read
    with pytest.raises(ValueError, match="model.kind=causal, but .* use model.kind: seq2seq"):
        build_base(t5, "causal", [])
    with pytest.raises(ValueError, match="model.kind=encoder, but .* encoder-decoder model .* seq2seq"):
        build_base(t5, "encoder", [])
    with pytest.raises(ValueError, match="model.kind=seq2seq, but .* not an encoder-decoder LM"):
        build_base(gpt2, "seq2seq", [])
    assert model_kind("minilm", None) == "encoder" and model_kind("smollm2", None) == "causal"
    assert run_config_from_dict({"model": {"kind": "seq2seq"}}).model.kind == "seq2seq"
    with pytest.raises(ValueError, match="model.kind must be 'encoder', 'causal' or 'seq2seq'"):
        run_config_from_dict({"model": {"kind": "decoder"}})


def test_causal_model_without_chat_template_is_refused_before_the_run_folder(tmp_path):
    from mtpeft.app.pipeline import train_run

    folder = save_tiny_gpt2(tmp_path / "gpt2")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    run = run_config_from_dict({"method": "lora", "model": {"name": str(folder)}, "output_dir": str(tmp_path / "run"),
                                "data": {"tasks": write_tasks(tmp_path / "data")[:1]}})
    with pytest.raises(ValueError, match="tokenizer has no chat_template"):
        train_run(run, log=lambda *a: None)
    assert not (tmp_path / "run").exists()


# -- end to end from the CLI, no model.kind --------------------------------------------------------------

def cli_run(tmp_path, folder: Path, method: str, name: str, capsys) -> tuple[Path, str]:
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "method": method, "adapter": {"r": 4}, "model": {"name": str(folder), "max_length": 64},
        "data": {"tasks": write_tasks(tmp_path / "data"), "max_eval_examples": 6, "test_fraction": 0.2},
        "train": {"steps": 6, "batch_size": 4, "logging_steps": 2, "save_steps": 6, "eval_batch_size": 16},
        "output_dir": str(tmp_path / name)}))
    assert "kind" not in yaml.safe_load(config.read_text())["model"]
    capsys.readouterr()
    assert main(["train", str(config)]) == 0
    return tmp_path / name, capsys.readouterr().out


def check_metrics(scores: dict) -> None:
    tasks = scores["tasks"]
    assert set(tasks) == {"colours", "sums", "moods"}
    assert tasks["colours"]["metric"] == "accuracy" and "accuracy_norm" in tasks["colours"]  # scored options
    assert tasks["sums"]["metric"] == "exact_match"  # generated
    assert all(t["n"] > 0 and 0.0 <= t["score"] <= 1.0 for t in tasks.values())


def test_gpt2_and_t5_folders_train_evaluate_report_and_export_from_the_cli(tmp_path, capsys):
    from peft import PeftModel

    gpt2_run, printed = cli_run(tmp_path, save_tiny_gpt2(tmp_path / "gpt2"), "task_lora", "gpt2_run", capsys)
    assert "(causal)" in printed  # not trained as an encoder with classification heads
    t5_run, printed = cli_run(tmp_path, save_tiny_t5(tmp_path / "t5"), "moelora", "t5_run", capsys)
    assert "(seq2seq)" in printed
    for run_dir in (gpt2_run, t5_run):
        check_metrics(json.loads((run_dir / "metrics.json").read_text()))
        assert main(["eval", str(run_dir), "--split", "validation"]) == 0
        check_metrics(json.loads((run_dir / "eval_validation.json").read_text()))
    assert (t5_run / "routing.json").exists()  # token-routed: the task x expert load over both streams

    model, _, kind, tasks, _ = load_run(gpt2_run)
    assert kind == "causal" and isinstance(model.base_model, GPT2LMHeadModel)
    assert not any(isinstance(m, MultiTaskEncoderClassifier) for m in model.modules())
    assert model.trainable_parameter_breakdown().keys() == {"task"}  # no per-task heads
    model, _, kind, _, _ = load_run(t5_run)
    assert kind == "seq2seq" and isinstance(model.base_model, T5ForConditionalGeneration)

    assert main(["report", str(gpt2_run), str(t5_run), "--out", str(tmp_path / "both")]) == 0
    report = (tmp_path / "both" / "report.md").read_text()
    assert "| gpt2_run (task_lora) |" in report and "| t5_run (moelora) |" in report
    assert "routing_t5_run.png" in report

    # the GPT-2 run's adapter for one task, exported, loads in stock PEFT and gives the same logits
    assert main(["export", str(gpt2_run), "--task", "sums", "--out", str(tmp_path / "peft")]) == 0
    model, _, _, tasks, _ = load_run(gpt2_run)
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    with torch.no_grad():
        ours = model(input_ids=ids, task_ids=torch.tensor([1])).logits
        stock = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), tmp_path / "peft")
        assert torch.allclose(stock(input_ids=ids).logits, ours, atol=1e-5)
        # from the folder alone: the base it names, the stock class its task_type names
        auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft")
        assert torch.allclose(auto(input_ids=ids).logits, ours, atol=1e-5)

    # the T5 run (MoELoRA, token-routed) ships through the distilled export, per task and for the mixture
    t5_ids = torch.tensor([[5, 6, 7, 8, 9]])
    decoder_ids = torch.tensor([[0, 11, 12]])
    for argv, out in ((["--task", "colours"], tmp_path / "t5_colours"), (["--all-tasks"], tmp_path / "t5_all")):
        assert main(["export", str(t5_run), *argv, "--calibration", "8", "--out", str(out)]) == 0
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_2_SEQ_LM" and config["base_model_name_or_path"] == str(tmp_path / "t5")
        fidelity = json.loads((out / "fidelity.json").read_text())
        assert fidelity["method"] == "moelora" and all(math.isfinite(v["error"]) for v in fidelity["layers"].values())
        auto = peft.AutoPeftModelForSeq2SeqLM.from_pretrained(out)
        plain = T5ForConditionalGeneration.from_pretrained(tmp_path / "t5")
        with torch.no_grad():
            served = auto(input_ids=t5_ids, decoder_input_ids=decoder_ids).logits
            bare = plain(input_ids=t5_ids, decoder_input_ids=decoder_ids).logits
            merged = auto.merge_and_unload()(input_ids=t5_ids, decoder_input_ids=decoder_ids).logits
        assert (served - bare).abs().max() > 0  # the fitted update is applied, not dropped
        assert torch.allclose(merged, served, atol=1e-5)
