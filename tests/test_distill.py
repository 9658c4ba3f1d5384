"""Distilled export (METHODS.md §10): the fit, the data-norm truncation, fidelity.json, stock PEFT loading."""

from __future__ import annotations

import json
from pathlib import Path
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import method_cases
import mtpeft
from mtpeft.lib.distill import LayerStatistics, data_norm_truncate, output_error, ridge_value
from tiny_models import VOCAB, tiny_llama


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


CHOSEN = {
    "moelora": lambda **kw: mtpeft.MoELoraConfig(**{"n_experts": 4, "top_k": 2, "r": 2, "n_tasks": 2, **kw}),
    "mosld": lambda **kw: mtpeft.MoSLDConfig(**{"r": 2, "n_tasks": 2, **kw}),  # per-layer E: 2 and 6
    "teamlora": lambda **kw: mtpeft.TeamLoraConfig(**{"n_experts": 3, "r": 2, "n_tasks": 2, **kw}),
    "hydralora": lambda **kw: mtpeft.HydraLoraConfig(**{"n_experts": 3, "r": 2, "n_tasks": 2, **kw}),
}
CHOSEN_ONE_EXPERT = {
    "moelora": dict(n_experts=1, top_k=1),
    "mosld": dict(expert_schedule="flat", n_experts=1, top_k=1),
    "teamlora": dict(n_experts=1),
    "hydralora": dict(n_experts=1),
}


def _registry_config(method: str):
    spec = method_cases.spec(method)
    return lambda **kw: spec.small_config(**{"n_tasks": 2, **kw})


# Every registered method with a distilled export (tests/method_cases.py); these four with the configs above,
# the others with their MethodSpec.test_config.
TOKEN_ROUTED = {m: CHOSEN.get(m) or _registry_config(m) for m in method_cases.methods(export="distilled")}


def one_expert_config(method: str):
    """The method's one-expert config (plain LoRA in disguise): the overrides above, or MethodSpec.degenerate."""
    if method in CHOSEN_ONE_EXPERT:
        return TOKEN_ROUTED[method](**CHOSEN_ONE_EXPERT[method])
    return method_cases.spec(method).degenerate(2, 4.0, 0.0, n_tasks=2)


def batches(n: int, seed: int, size: int = 4, seq: int = 12, task_ids: bool = True) -> list[dict]:
    """``n`` batches of random tokens, two examples of each padded at the end, task ids 0/1 alternating."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(size, seq, dtype=torch.long)
        mask[0, seq - 3:] = 0
        mask[2, seq - 5:] = 0
        batch = {"input_ids": torch.randint(3, VOCAB, (size, seq), generator=g), "attention_mask": mask}
        if task_ids:
            batch["task_ids"] = torch.arange(size) % 2
        out.append(batch)
    return out


@torch.no_grad()
def randomise(model, seed: int = 1, scale: float = 0.3) -> None:
    """Non-zero adapter weights (B starts at 0) and routers that really route."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in model.adapted_layers():
        for name, p in layer.named_parameters():
            if not name.startswith("base_layer"):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def wrap(config, seed: int = 0):
    model = mtpeft.get_model(tiny_llama(seed), config)
    randomise(model)
    return model.eval()


@torch.no_grad()
def logits_with_factors(factors, batch, seed: int = 0) -> torch.Tensor:
    """The stock base model with (x Aᵀ) Bᵀ added to each adapted layer's output: what the factors mean."""
    base = tiny_llama(seed)
    handles = [base.get_submodule(name).register_forward_hook(
        lambda module, args, out, a=a, b=b: out + (args[0] @ a.T) @ b.T) for name, (a, b) in factors.items()]
    try:
        return base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def peft_logits(folder, batch, seed: int = 0) -> torch.Tensor:
    peft_model = PeftModel.from_pretrained(tiny_llama(seed), str(folder)).eval()
    return peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ------------------------------------------------------------------------------------------- the fit


def test_full_rank_fit_of_a_mergeable_update_returns_that_update(tmp_path):
    """LoRA: δ(x) = ΔW x. With R = min(d_in, d_out) and 8·12 rows spanning d_in = 32, the fit gives ΔW."""
    model = wrap(mtpeft.LoraConfig(r=4, lora_alpha=8))
    result = model.distill_lora(tmp_path / "out", batches(8, seed=0, task_ids=False), rank=16, ridge=1e-12)
    for name, layer in model.adapted_layers():
        a, b = result.factors[name]
        torch.testing.assert_close(b @ a, layer.delta_weight(None), atol=1e-5, rtol=1e-4)
        assert result.fidelity["layers"][name]["calibration_error"] < 1e-5


def test_data_norm_truncation_beats_weight_space_svd():
    """Anisotropic inputs: directions of ΔW that the data rarely excites matter little to the output. The
    data-norm rank-2 truncation has a strictly smaller output error than truncating ΔW's own SVD."""
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n = 6, 5, 400
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) * torch.tensor([10, 5, 2, 1, 0.1, 0.05],
                                                                                 dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    w[:, 4:] *= 30  # large weights on the rarely excited inputs: the weight SVD keeps those
    y = x @ w.T
    stats = LayerStatistics.empty(d_in, d_out)
    stats.add(x, y, None)
    lam = ridge_value(stats.gram, 1e-12)
    a, b = data_norm_truncate(w, stats.gram, lam, 2)
    u, s, vh = torch.linalg.svd(w)
    weight_svd = (vh[:2], u[:, :2] * s[:2])
    data_err, weight_err = output_error(a, b, stats), output_error(*weight_svd, stats)
    direct = torch.linalg.norm(y - x @ (b @ a).T) / torch.linalg.norm(y)  # the formula vs the rows
    assert data_err == pytest.approx(float(direct), rel=1e-9)
    assert data_err < 0.5 * weight_err


# ---------------------------------------------------------------------------------------- fidelity


def test_fidelity_json_matches_a_recomputation_from_stored_rows(tmp_path):
    model = wrap(TOKEN_ROUTED["moelora"]())
    held = batches(3, seed=7)
    result = model.distill_lora(tmp_path / "out", batches(16, seed=0), task=1, held_out=held)
    report = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    assert report["task"] == 1 and report["mode"] == "least_squares" and report["error_on"] == "held_out"
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")

    # Store the held-out rows of task 1 (non-padding) and the update each layer added: output − base output.
    rows = {name: ([], []) for name, _ in model.adapted_layers()}

    def hook(layer, args, output):
        x = args[0]
        keep = (mask.bool() & (ids == 1)[:, None]).reshape(-1)  # (B·S,)
        rows[layer.module_name][0].append(x.reshape(-1, x.shape[-1])[keep])
        rows[layer.module_name][1].append((output - layer.base_layer(x)).reshape(-1, output.shape[-1])[keep])

    handles = [layer.register_forward_hook(hook) for _, layer in model.adapted_layers()]
    with torch.no_grad():
        for batch in held:
            mask, ids = batch["attention_mask"], batch["task_ids"]
            model(**batch)
    for h in handles:
        h.remove()
    tokens = int(sum(((b["attention_mask"].bool()) & (b["task_ids"] == 1)[:, None]).sum() for b in held))
    assert report["held_out_tokens"] == tokens
    for name, layer in model.adapted_layers():
        x, y = torch.cat(rows[name][0]).double(), torch.cat(rows[name][1]).double()
        a = tensors[f"base_model.model.{name}.lora_A.weight"].double()
        b = tensors[f"base_model.model.{name}.lora_B.weight"].double()
        expected = float(torch.linalg.norm(y - x @ (b @ a).T) / torch.linalg.norm(y))
        assert report["layers"][name]["error"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert report["layers"][name]["rank"] == 8  # E·r_e
        assert 0 < expected < 1  # distillation is not exact for a router mixture, and not useless


# -------------------------------------------------------------------------------- every distilled method


@pytest.mark.parametrize("method", sorted(TOKEN_ROUTED))
def test_distilled_folder_loads_in_stock_peft(method, tmp_path):
    model = wrap(TOKEN_ROUTED[method]())
    result = model.distill_lora(tmp_path / "out", batches(16, seed=0), task=0, held_out=batches(2, seed=3))
    probe = batches(1, seed=9)[0]
    torch.testing.assert_close(peft_logits(tmp_path / "out", probe), logits_with_factors(result.factors, probe),
                               atol=1e-5, rtol=1e-5)
    report = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    assert report["method"] == method
    for name, layer in model.adapted_layers():
        entry = report["layers"][name]
        assert entry["rank"] == min(sum(a.shape[0] for a, _ in layer.expert_factors()), layer.in_features, layer.out_features)
        assert result.factors[name][0].shape == (entry["rank"], layer.in_features)
        assert math.isfinite(entry["error"]) and entry["error"] > 0


@pytest.mark.parametrize("method", sorted(TOKEN_ROUTED))
def test_expert_factors_and_gates_give_the_layer_update(method):
    """Σ_e g_e(x) B_e A_e x (the accessors the routing-folded baseline uses) = the layer's eval update."""
    model = wrap(TOKEN_ROUTED[method]())
    _, layer = model.adapted_layers()[-1]
    x = torch.randn(10, layer.in_features)
    gates = layer.expert_gates(x)
    expected = sum(gates[:, e:e + 1] * (x @ (b @ a).T) for e, (a, b) in enumerate(layer.expert_factors()))
    with torch.no_grad():
        torch.testing.assert_close(layer.reference_forward(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(TOKEN_ROUTED))
def test_routing_folded_with_one_expert_is_the_exact_lora(method, tmp_path):
    model = wrap(one_expert_config(method))
    result = model.distill_lora(tmp_path / "out", batches(3, seed=0), mode="routing_folded")
    probe = batches(1, seed=5)[0]
    with torch.no_grad():
        mixture = model(**probe).logits
    torch.testing.assert_close(peft_logits(tmp_path / "out", probe), mixture, atol=1e-5, rtol=1e-5)
    assert result.fidelity["max_error"] < 1e-5


def test_all_tasks_pools_every_row_and_a_task_only_its_own(tmp_path):
    model = wrap(TOKEN_ROUTED["hydralora"]())
    calib = batches(3, seed=0)
    pooled = model.distill_lora(tmp_path / "all", calib)
    one = model.distill_lora(tmp_path / "one", calib, task=0)
    non_pad = int(sum(b["attention_mask"].sum() for b in calib))
    task0 = int(sum(b["attention_mask"][b["task_ids"] == 0].sum() for b in calib))
    assert pooled.fidelity["calibration_tokens"] == non_pad
    assert one.fidelity["calibration_tokens"] == task0 < non_pad


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank=0 is out of range"),
    (dict(rank=33), "rank=33 is out of range"),
    (dict(mode="svd"), "mode='svd'"),
    (dict(ridge=0.0), "ridge=0.0"),
])
def test_bad_arguments_write_nothing(kwargs, message, tmp_path):
    model = wrap(TOKEN_ROUTED["teamlora"]())
    with pytest.raises(ValueError, match=message):
        model.distill_lora(tmp_path / "out", batches(1, seed=0), **kwargs)
    assert not (tmp_path / "out").exists()


def test_no_calibration_rows_and_missing_task_ids_write_nothing(tmp_path):
    model = wrap(TOKEN_ROUTED["mosld"]())
    with pytest.raises(ValueError, match="no calibration rows"):
        model.distill_lora(tmp_path / "out", [], task=0)
    with pytest.raises(ValueError, match="carry no task_ids"):
        model.distill_lora(tmp_path / "out", batches(1, seed=0, task_ids=False), task=0)
    assert not (tmp_path / "out").exists()


def test_a_non_empty_folder_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    model = wrap(TOKEN_ROUTED["moelora"]())
    with pytest.raises(FileExistsError, match="not empty"):
        model.distill_lora(tmp_path / "out", batches(1, seed=0))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------------------------- a run folder


@pytest.fixture(scope="module")
def teamlora_run(tmp_path_factory):
    """A TeamLoRA run on MiniLM, a few steps (the real model and tasks, as `mtpeft train` writes it)."""
    from mtpeft.app.pipeline import train_run
    from mtpeft.app.run_config import run_config_from_dict

    out = tmp_path_factory.mktemp("runs") / "teamlora"
    run = run_config_from_dict({
        "method": "teamlora", "adapter": {"n_experts": 2, "r": 2}, "output_dir": str(out),
        "model": {"name": "minilm", "max_length": 32},
        "data": {"tasks": ["bbc_news", "intent_recognition"], "max_eval_examples": 12},
        "train": {"steps": 4, "batch_size": 8, "lr": 3e-3, "logging_steps": 2, "save_steps": 4,
                  "warmup_ratio": 0.0, "eval_batch_size": 16},
    })
    return train_run(run, evaluate=False, log=lambda *a: None)


def test_distill_run_writes_a_folder_with_fidelity_and_test_scores(teamlora_run, tmp_path):
    from mtpeft.app.distill_run import distill_run

    lines = []
    out = distill_run(teamlora_run, tmp_path / "lora", task="intent_recognition", calibration=24, log=lines.append)
    report = json.loads((out / "fidelity.json").read_text())
    assert report["task"] == "intent_recognition" and report["error_on"] == "held_out"
    assert report["calibration_examples"] == 24 and 0 < report["held_out_examples"] <= 24
    assert all(math.isfinite(v["error"]) for v in report["layers"].values())
    for side in ("mixture", "distilled_lora"):
        scored = report["test"][side]["intent_recognition"]
        assert scored["n"] == 12 and 0 <= scored["score"] <= 1
    assert len(lines) == 1 and "distilled teamlora" in lines[0] and "mixture intent_recognition" in lines[0]
    from mtpeft.app.pipeline import eval_run  # the mixture's score is the run's own evaluation
    own = eval_run(teamlora_run, log=lambda *a: None)["tasks"]["intent_recognition"]
    assert report["test"]["mixture"]["intent_recognition"] == own
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)
    # the task's trained head goes with the LoRA (stock AutoModel + PEFT + head, docs/guide.md)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "fidelity.json", "head.safetensors", "head_config.json"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "FEATURE_EXTRACTION" and not any(
        t.startswith("encoder.encoder.") for t in config["target_modules"])
    assert json.loads((out / "head_config.json").read_text())["task"] == "intent_recognition"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(task="sports"), ValueError, r"no task 'sports'; its tasks are \['bbc_news', 'intent_recognition'\]"),
    (dict(task="bbc_news", rank=0), ValueError, "rank=0 is out of range"),
    (dict(task="bbc_news", rank=385), ValueError, "rank=385 is out of range: use 1 <= rank <= 384"),
    (dict(task="bbc_news", calibration=0), ValueError, "--calibration 0 must be a positive"),
    (dict(), ValueError, "name the task"),
])
def test_distill_run_bad_input_writes_nothing(teamlora_run, tmp_path, kwargs, error, message):
    from mtpeft.app.distill_run import distill_run

    with pytest.raises(error, match=message):
        distill_run(teamlora_run, tmp_path / "lora", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_distill_run_refuses_a_run_without_an_adapter(teamlora_run, tmp_path):
    import shutil

    from mtpeft.app.distill_run import distill_run

    bare = tmp_path / "run"
    bare.mkdir()
    shutil.copy(teamlora_run / "config.yaml", bare / "config.yaml")
    with pytest.raises(FileNotFoundError, match="neither adapter/ nor a complete checkpoint"):
        distill_run(bare, tmp_path / "lora", task="bbc_news")
    assert not (tmp_path / "lora").exists()


def test_the_printed_export_command_distils_a_token_routed_run(teamlora_run, capsys):
    """The export command `mtpeft train` prints works on a token-routed run (the README's main job is
    TeamLoRA): the CLI distils; the folder, served with the guide's stock snippet (transformers + peft +
    safetensors only), gives the logits that fidelity.json's "distilled_lora" scores were computed from."""
    import shlex
    import shutil

    from test_export_stock import guide_snippet

    from mtpeft.app.cli import main as cli_main
    from mtpeft.app.distill_run import stock_peft_model
    from mtpeft.app.export_run import export_command
    from mtpeft.app.pipeline import load_run
    from mtpeft.app.run_config import load_run_config

    argv = shlex.split(export_command(teamlora_run, load_run_config(teamlora_run / "config.yaml")))[1:]
    out = Path(argv[argv.index("--out") + 1])
    try:
        assert cli_main([*argv, "--calibration", "16"]) == 0
        printed = capsys.readouterr().out
        assert "mtpeft: distilled teamlora" in printed and "wrote a distilled PEFT LoRA" in printed
        assert json.loads((out / "fidelity.json").read_text())["task"] == "bbc_news"

        texts = ["the striker scored twice in the final", "shares fell after the bank's results"]
        namespace = {"export": str(out), "texts": texts}
        exec(compile(guide_snippet("# serve an encoder export"), "guide:encoder", "exec"), namespace)  # noqa: S102
        model, tokenizer, _, tasks, _ = load_run(teamlora_run)
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        n_labels = len(tasks[0].spec.labels)
        with torch.no_grad():
            want = stock_peft_model(model, out)(**batch, task_ids=torch.zeros(2, dtype=torch.long)).logits
            mixture = model(**batch, task_ids=torch.zeros(2, dtype=torch.long)).logits
        assert namespace["logits"].shape == (2, n_labels)
        assert (namespace["logits"] - want[:, :n_labels]).abs().max() < 1e-5
        assert (namespace["logits"] - mixture[:, :n_labels]).abs().max() > 0  # a fit, not the mixture itself
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_all_tasks_on_an_encoder_run_is_refused_in_one_line(teamlora_run, tmp_path, capsys):
    """An encoder run has one head per task, so a task-free mixture LoRA cannot be served: refused
    before anything is written."""
    from mtpeft.app.cli import main as cli_main

    assert cli_main(["export", str(teamlora_run), "--all-tasks", "--out", str(tmp_path / "lora")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the load bars
    assert len(err) == 1 and err[0].startswith("mtpeft export: error: --all-tasks")
    assert "one classification head per task" in err[0] and "--task NAME" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_factors_are_balanced_whatever_the_calibration_size(tmp_path):
    """B A is the data-norm truncation; its factors do not grow with the number of calibration rows."""
    model = wrap(TOKEN_ROUTED["teamlora"]())
    small = model.distill_lora(tmp_path / "small", batches(4, seed=0), ridge=1e-3)
    large = model.distill_lora(tmp_path / "large", batches(4, seed=0) * 25, ridge=1e-3)  # same rows, 25x
    for name, (a, b) in large.factors.items():
        torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0), rtol=1e-4, atol=1e-6)
        sa, sb = small.factors[name]
        torch.testing.assert_close(b @ a, sb @ sa, rtol=1e-3, atol=1e-4)  # G, H scale together: same fit
        assert float(b.abs().max()) < 1e3


def test_a_rank_per_layer_fits_each_layer_at_its_own_rank(tmp_path):
    """fit_factors(rank={layer: R}) (how the fidelity study scales each MoSLD layer's own total rank): each
    layer gets its R, and a layer asked for its default rank gets the same factors as rank=None."""
    from mtpeft.lib.distill import collect_statistics, default_rank, fit_factors

    model = wrap(TOKEN_ROUTED["mosld"]())
    stats = collect_statistics(model, batches(4, seed=0), task=0)
    defaults = {name: default_rank(layer, 0) for name, layer in model.adapted_layers()}
    assert len(set(defaults.values())) > 1  # MoSLD's expert count, so its rank, differs between layers
    halves = {name: max(1, r // 2) for name, r in defaults.items()}
    half, _ = fit_factors(model, stats, task=0, rank=halves, ridge=1e-3, mode="least_squares")
    assert {name: a.shape[0] for name, (a, _) in half.items()} == halves
    full, _ = fit_factors(model, stats, task=0, rank=defaults, ridge=1e-3, mode="least_squares")
    default, _ = fit_factors(model, stats, task=0, rank=None, ridge=1e-3, mode="least_squares")
    for name, (a, b) in full.items():
        torch.testing.assert_close(b @ a, default[name][1] @ default[name][0])
