"""Exact exports load with stock tools and nothing of mtpeft: peft.AutoPeftModel* on the folder alone,
PeftModel.from_pretrained on the stock transformers model, stock merge_and_unload, and the docs' encoder
snippet; mtpeft export on CLI runs of every exact method; bad input refused with nothing written."""

import copy
import json
import re
import shlex
import warnings
from pathlib import Path

import peft
import pytest
import torch
import yaml
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM)

import mtpeft
from mtpeft.app.cli import main as cli_main
from mtpeft.lib.export import ExportError, write_peft_lora

GUIDE = Path(__file__).parent.parent / "docs" / "guide.md"
VOCAB = 96
N_TASKS = 3
METHODS = {  # every exact method, small
    "lora": lambda t: mtpeft.LoraConfig(r=4, lora_alpha=8, target_modules=t),
    "task_lora": lambda t: mtpeft.TaskLoraConfig(r=4, n_tasks=N_TASKS, target_modules=t),
    "mtl_lora": lambda t: mtpeft.MTLLoraConfig(r=4, n_up=2, lora_dropout=0.0, n_tasks=N_TASKS, target_modules=t),
    "poly": lambda t: mtpeft.PolyConfig(r=4, n_skills=3, n_tasks=N_TASKS, target_modules=t),
    "mhr": lambda t: mtpeft.PolyConfig(r=4, n_skills=3, n_splits=2, n_tasks=N_TASKS, target_modules=t),
    "cpoly": lambda t: mtpeft.CPolyConfig(r=4, n_exclusive=2, n_splits=2, n_tasks=N_TASKS, target_modules=t),
}


def randomise(model, seed=1, scale=0.15):
    """Random adapter values (B is zero at init, which would hide a wrong export)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if model.parameter_role(name) is not None:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def ids(seed=0, n=3, seq=7):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": torch.randint(3, VOCAB, (n, seq), generator=g), "attention_mask": mask}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny causal LMs saved to disk: Llama, GPT-2 with its tied head, GPT-2 with an untied head."""
    root = tmp_path_factory.mktemp("bases")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 pad_token_id=0)).save_pretrained(root / "llama")
    for name, tied in (("gpt2", True), ("gpt2_untied", False)):
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                   tie_word_embeddings=tied)).save_pretrained(root / name)
    return root


def export_and_compare(base_dir, method, targets, out, task=2):
    """Export the mtpeft model for ``task`` and load it three stock ways; returns (ours, autopeft, peft on
    the stock model, merged) logits and the folder's config."""
    model = mtpeft.get_model(AutoModelForCausalLM.from_pretrained(base_dir), METHODS[method](targets)).eval()
    randomise(model)
    routed = model.config.task_routed
    model.export_lora(out, task=task if routed else None)
    b = ids()
    with torch.no_grad():
        ours = model(**b, task_ids=torch.full((3,), task) if routed else None).logits
        auto = peft.AutoPeftModelForCausalLM.from_pretrained(out).eval()
        on_stock = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
        got = (auto(**b).logits, on_stock(**b).logits)
        merged = on_stock.merge_and_unload()(**b).logits
        base = AutoModelForCausalLM.from_pretrained(base_dir)(**b).logits
    assert (ours - base).abs().max() > 1e-3  # the adapter does something
    return ours, got, merged, json.loads((Path(out) / "adapter_config.json").read_text())


@pytest.mark.parametrize("method", list(METHODS))
def test_causal_export_loads_with_auto_peft_and_merges(saved, method, tmp_path):
    ours, (auto, on_stock), merged, config = export_and_compare(
        saved / "llama", method, ["q_proj", "v_proj", "down_proj"], tmp_path / "out")
    for got in (auto, on_stock, merged):
        assert (got - ours).abs().max() < 1e-5
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(saved / "llama")
    assert config["modules_to_save"] is None and config["fan_in_fan_out"] is False
    assert all(name.startswith("model.layers.") for name in config["target_modules"])
    namespace = {"export": str(tmp_path / "out")}  # the docs' causal snippet, as written
    exec(compile(guide_snippet("# serve a causal export"), f"{GUIDE}:causal", "exec"), namespace)  # noqa: S102
    with torch.no_grad():
        assert (namespace["merged"](**ids()).logits - ours).abs().max() < 1e-5


def test_gpt2_conv1d_blocks_and_linear_head_forward_and_merge(saved, tmp_path):
    """c_attn (Conv1D) + lm_head (nn.Linear) in one adapter, one fan_in_fan_out flag: PEFT sets the flag
    per layer from the module type, so forward and merge_and_unload both equal mtpeft (untied head)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours, (auto, on_stock), merged, config = export_and_compare(
            saved / "gpt2_untied", "mtl_lora", ["c_attn", "lm_head"], tmp_path / "out")
    for got in (auto, on_stock, merged):
        assert (got - ours).abs().max() < 1e-5
    assert sorted(config["target_modules"]) == ["lm_head", "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert config["fan_in_fan_out"] is True  # the Conv1D blocks' truth; PEFT corrects lm_head (it warns):
    assert any("target module is `torch.nn.Linear`. Setting fan_in_fan_out to False" in str(w.message) for w in caught)


def test_gpt2_tied_head_runs_exactly_and_stock_merge_needs_untying(saved, tmp_path):
    """GPT-2's lm_head is wte: PEFT runs the export exactly, but its merge_and_unload adds the head's update
    to the shared weight, so the input embeddings change too (stock behaviour; PEFT warns). The export
    warns; the docs' recipe (untie the head before merging) gives the exact merged model."""
    base_dir = saved / "gpt2"
    model = mtpeft.get_model(AutoModelForCausalLM.from_pretrained(base_dir),
                             METHODS["task_lora"](["c_attn", "lm_head"])).eval()
    randomise(model)
    with pytest.warns(UserWarning, match="lm_head shares its weight with the input embeddings"):
        model.export_lora(tmp_path / "out", task=1)
    b = ids()
    with torch.no_grad():
        ours = model(**b, task_ids=torch.full((3,), 1)).logits
        served = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        assert (served(**b).logits - ours).abs().max() < 1e-5
        stock_merged = served.merge_and_unload()(**b).logits
        assert (stock_merged - ours).abs().max() > 1e-2  # stock merge into a tied head is wrong
        # the recipe in docs/guide.md: load the base untied, the head a copy of the embeddings, then merge
        untied = AutoModelForCausalLM.from_pretrained(base_dir, tie_word_embeddings=False)
        untied.lm_head.weight = torch.nn.Parameter(untied.get_input_embeddings().weight.clone())
        merged = peft.PeftModel.from_pretrained(untied, tmp_path / "out").merge_and_unload()(**b).logits
    assert (merged - ours).abs().max() < 1e-5


def test_seq2seq_export_is_seq_2_seq_lm(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                        decoder_start_token_id=0, pad_token_id=0)).save_pretrained(tmp_path / "t5")
    model = mtpeft.get_model(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "t5"),
                             METHODS["poly"](["q", "v"])).eval()
    randomise(model)
    model.export_lora(tmp_path / "out", task=0)
    b = {**ids(), "decoder_input_ids": ids(seed=1)["input_ids"][:, :4]}
    with torch.no_grad():
        ours = model(**b, task_ids=torch.zeros(3, dtype=torch.long)).logits
        served = peft.AutoPeftModelForSeq2SeqLM.from_pretrained(tmp_path / "out").eval()
        assert (served(**b).logits - ours).abs().max() < 1e-5
        assert (served.merge_and_unload()(**b).logits - ours).abs().max() < 1e-5
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM"


# ------------------------------------------------------------------------------------- write_peft_lora
def test_write_peft_lora_refuses_bad_factors_and_a_non_empty_folder(saved, tmp_path):
    model = mtpeft.get_model(AutoModelForCausalLM.from_pretrained(saved / "llama"), METHODS["lora"](["q_proj"]))
    factors = {n: layer.lora_factors(None) for n, layer in model.adapted_layers()}
    first = next(iter(factors))
    with pytest.raises(ExportError, match="missing"):
        write_peft_lora(model, tmp_path / "a", {first: factors[first]})
    with pytest.raises(ExportError, match=r"do not fit a layer 32 -> 32"):
        write_peft_lora(model, tmp_path / "a", {**factors, first: (factors[first][0][:, :5], factors[first][1])})
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine.txt").write_text("keep")
    with pytest.raises(ExportError, match="exists and is not empty; choose a new folder"):
        write_peft_lora(model, tmp_path / "b", factors)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["mine.txt"]
    (tmp_path / "c").mkdir()  # an empty folder is fine, and extra files go with the export
    out = write_peft_lora(model, tmp_path / "c", factors, extra_files={"fidelity.json": b"{}\n"})
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "fidelity.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_trained_modules_to_save_of_a_causal_lm_are_refused_not_dropped(saved, tmp_path):
    model = mtpeft.get_model(AutoModelForCausalLM.from_pretrained(saved / "llama"),
                             mtpeft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ExportError, match=r"modules_to_save \['lm_head'\].*cannot carry them"):
        model.export_lora(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- CLI runs
@pytest.fixture(scope="module")
def encoder_fixture(tmp_path_factory):
    from dist_worker import make_fixture

    folder, tasks = make_fixture(tmp_path_factory.mktemp("enc"))
    return folder, tasks


def train_cli(folder, tasks, out, method, capsys, **adapter):
    from dist_worker import tiny_run_dict

    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(tiny_run_dict(folder, tasks, out, method=method, steps=3, **adapter)))
    previous = torch.get_num_threads()
    assert cli_main(["train", str(config)]) == 0
    torch.set_num_threads(previous)
    return capsys.readouterr().out


def guide_snippet(marker: str) -> str:
    """The docs/guide.md code block that starts with ``marker`` (a comment line)."""
    blocks = re.findall(r"```(?:python|py)\n(.*?)```", GUIDE.read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith(marker)]
    assert len(found) == 1, f"docs/guide.md has {len(found)} blocks starting with {marker!r}"
    return found[0]


@pytest.mark.parametrize("method,adapter", [("lora", {}), ("task_lora", {}), ("mtl_lora", {"n_up": 2}),
                                            ("poly", {"n_skills": 2}), ("mhr", {"n_skills": 2, "n_splits": 2}),
                                            ("cpoly", {"n_skills": 2, "n_exclusive": 1})])
def test_cli_export_of_every_exact_method_runs_the_guides_encoder_snippet(
        encoder_fixture, method, adapter, tmp_path, capsys):
    """mtpeft train prints the export command; running it writes the LoRA + head; the guide's snippet
    (stock transformers + peft + safetensors) gives the mtpeft model's logits for that task."""
    from mtpeft.app.pipeline import load_run

    folder, tasks = encoder_fixture
    run = tmp_path / "run"
    printed = train_cli(folder, tasks, run, "poly" if method == "mhr" else method, capsys, **adapter)
    command = re.search(r"to serve it with stock PEFT / vLLM: (mtpeft export .*)", printed).group(1)
    assert command == f"mtpeft export {run} --task task0 --out {run / 'export-task0'}"
    argv = shlex.split(command)[1:]
    argv[argv.index("--task") + 1] = "task1"  # the second task: its own head
    argv[argv.index("--out") + 1] = str(tmp_path / "export")
    assert cli_main(argv) == 0
    assert "load it with peft.AutoPeftModelForFeatureExtraction" in capsys.readouterr().out
    export = tmp_path / "export"
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["task_type"] == "FEATURE_EXTRACTION" and config["base_model_name_or_path"] == str(folder)
    assert all(n.startswith("encoder.layer.") for n in config["target_modules"])  # inside the stock BertModel
    assert json.loads((export / "head_config.json").read_text())["labels"] == ["0", "1", "2"]

    texts = ["alpha beta red green cat", "gamma dog"]
    namespace = {"export": str(export), "texts": texts}
    exec(compile(guide_snippet("# serve an encoder export"), f"{GUIDE}:encoder", "exec"), namespace)  # noqa: S102
    model, tokenizer, _, _, _ = load_run(run)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**batch, task_ids=torch.ones(2, dtype=torch.long)).logits[:, :3]
    assert namespace["logits"].shape == (2, 3)
    assert (namespace["logits"] - want).abs().max() < 1e-5


def test_cli_bad_input_one_line_nothing_written(encoder_fixture, tmp_path, capsys):
    folder, tasks = encoder_fixture
    named = [{**tasks[0], "name": "1"}, {**tasks[1], "name": "0"}]  # names that look like indices
    run = tmp_path / "run"
    train_cli(folder, named, run, "task_lora", capsys)

    def refused(argv, match):
        before = sorted(tmp_path.rglob("*"))
        with pytest.raises(SystemExit, match=match):
            cli_main(["export", *map(str, argv)])
        assert sorted(tmp_path.rglob("*")) == before  # nothing written

    refused([run, "--task", "nope", "--out", tmp_path / "x"], r"unknown task 'nope'; this run's tasks are \['1', '0'\]")
    refused([run, "--task", "2", "--out", tmp_path / "x"], r"takes a task's name, not its index")
    refused([run, "--out", tmp_path / "x"], r"task_lora has one adapter per task: pass --task NAME")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    refused([run, "--task", "1", "--out", tmp_path / "full"], r"exists and is not empty")
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.yaml").write_text((run / "config.yaml").read_text())
    refused([tmp_path / "empty_run", "--task", "1", "--out", tmp_path / "x"], r"no trained adapter yet")
    refused([tmp_path / "nowhere", "--task", "1", "--out", tmp_path / "x"], r"has no config.yaml")

    # "--task 1" is the task *named* "1" (index 0), not index 1
    assert cli_main(["export", str(run), "--task", "1", "--out", str(tmp_path / "one")]) == 0
    assert json.loads((tmp_path / "one" / "head_config.json").read_text())["task"] == "1"
    head = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "one" / "head.safetensors"))
    assert head["weight"].shape == (2, 32)  # task "1" is the 2-label task


def test_cli_causal_run_exports_for_auto_peft(tmp_path, capsys, smollm2_tokenizer, encoder_fixture):
    """A CLI run on a tiny Llama saved to disk (SmolLM2's tokenizer), then the printed export command:
    AutoPeftModelForCausalLM on the folder alone gives the run's logits for that task."""
    from dist_worker import tiny_run_dict

    from mtpeft.app.pipeline import load_run

    folder = tmp_path / "tiny_llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128, architectures=["LlamaForCausalLM"])
                     ).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    run = tmp_path / "run"
    config = tiny_run_dict(folder, encoder_fixture[1], run, method="mtl_lora", steps=2, n_up=2)
    config["model"] = {"name": str(folder), "kind": "causal", "max_length": 64}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["train", str(tmp_path / "run.yaml"), "--no-eval"]) == 0
    command = re.search(r"to serve it with stock PEFT / vLLM: (mtpeft export .*)", capsys.readouterr().out).group(1)
    assert cli_main(shlex.split(command)[1:]) == 0
    export = run / "export-task0"
    assert "peft.AutoPeftModelForCausalLM.from_pretrained" in capsys.readouterr().out
    model, tokenizer, _, _, _ = load_run(run)
    b = tokenizer(["alpha beta red", "cat dog fish tree"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**b, task_ids=torch.zeros(2, dtype=torch.long)).logits
        got = peft.AutoPeftModelForCausalLM.from_pretrained(export).eval()(**b).logits
        base = AutoModelForCausalLM.from_pretrained(folder)(**b).logits
    assert (got - want).abs().max() < 1e-5 and (want - base).abs().max() > 0


def test_printed_export_folder_stays_inside_the_run(tmp_path):
    from mtpeft.app.export_run import export_command
    from mtpeft.app.run_config import run_config_from_dict

    run = run_config_from_dict({"data": {"tasks": [{"name": "../../evil", "source": "json:x.json"}]}})
    argv = shlex.split(export_command(tmp_path / "run", run))
    assert argv[argv.index("--task") + 1] == "../../evil"
    out = Path(argv[argv.index("--out") + 1])
    assert out.parent == tmp_path / "run" and out.name == "export-.._.._evil"


@pytest.mark.slow  # converts SmolLM2 from its GGUF on the first run (~30 s); ~8 s afterwards
def test_smollm2_export_names_the_cached_hf_folder_and_loads_with_auto_peft(tmp_path):
    """SmolLM2 ships as GGUF; build_base loads the converted HF folder in mtpeft's cache, and that folder is
    the export's base. Logits agree to fp32 rounding at SmolLM2's size (|logits| ~ 30, 30 layers): the
    tolerance is the mtpeft model's own merged-vs-unmerged difference (measured ~3e-5), not a guess."""
    from mtpeft.app.assets import smollm2_path
    from mtpeft.app.base_models import build_base

    base, tokenizer = build_base("smollm2", "causal", [])
    model = mtpeft.get_model(base, mtpeft.PolyConfig(r=4, n_skills=2, n_tasks=2, target_modules=["q_proj", "v_proj"]))
    randomise(model.eval(), scale=0.05)
    model.export_lora(tmp_path / "out", task=1)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == smollm2_path() and config["task_type"] == "CAUSAL_LM"
    b = tokenizer(["Hello there", "What is 2+2?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = model(**b, task_ids=torch.ones(2, dtype=torch.long)).logits
        model.merge(task=1)
        noise = (model(**b).logits - ours).abs().max()
        model.unmerge()
        got = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out").eval()(**b).logits
        base_out = AutoModelForCausalLM.from_pretrained(smollm2_path())(**b).logits
    assert (got - ours).abs().max() <= 2 * noise + 1e-5
    assert (ours - base_out).abs().max() > 100 * (2 * noise + 1e-5)  # the adapter does something


def test_a_failure_mid_export_leaves_no_folder(saved, tmp_path, monkeypatch):
    """The folder is written beside its place and renamed in: an error while writing its second file
    (a full disk, say) leaves neither the export folder nor the temporary one."""
    import mtpeft.lib.export as export

    model = mtpeft.get_model(AutoModelForCausalLM.from_pretrained(saved / "llama"), METHODS["lora"](["q_proj"]))
    written = []

    def failing_write(path, data):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        path.write_bytes(data)

    monkeypatch.setattr(export, "atomic_write_bytes", failing_write)
    with pytest.raises(OSError, match="No space left"):
        model.export_lora(tmp_path / "out")
    assert written and list(tmp_path.iterdir()) == []
