"""Acceptance for "one declaration per method": DenseMix (tests/new_method.py) is defined and registered
outside src/ in one MethodSpec, and the shared suites run it from the registry with no other file
edited (tests/method_cases.py lists it after the package's methods, in a fixed order). Here: what the
registry derives and refuses, that the probe is in the shared case lists, and ``mtpeft bench --quick``."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

import method_cases
import mtpeft
from mtpeft.app.cli import main as cli_main
from mtpeft.lib.config import MethodSpec, get_method_spec, package_methods, register_method
from mtpeft.lib.methods.lora import LoraConfig, LoraLayer
from new_method import DenseMixConfig, DenseMixLayer


def test_the_probe_is_registered_with_its_capabilities():
    spec = get_method_spec("dense_mix")
    assert (spec.config_class, spec.layer_class) == (DenseMixConfig, DenseMixLayer)
    assert (spec.routing, spec.export, spec.can_add_tasks, spec.mergeable) == ("token", "distilled", False, False)
    assert DenseMixConfig(balance_weight=0.25).aux_loss_weights() == {"dense_mix_balance": 0.25}
    assert spec.unknown_task(DenseMixConfig()) == "error" and not spec.from_package
    assert DenseMixLayer.config_class is DenseMixConfig


def test_shared_case_lists_hold_the_package_methods_then_the_probe():
    assert method_cases.methods() == package_methods() + ["dense_mix"]
    assert "dense_mix" in method_cases.methods(routing="token", export="distilled")
    assert "dense_mix" not in method_cases.methods(routing="task") + method_cases.methods(package_only=True)
    assert {"lora", "task_lora", "mtl_lora", "poly", "cpoly", "moelora", "mosld", "teamlora",
            "hydralora"} == set(package_methods())


def test_aux_loss_weight_comes_from_the_declared_field(tr):
    """The recorded weight is the config field the spec names (no second source in the layer)."""
    model = mtpeft.get_model(tr.tiny_llama(), DenseMixConfig(balance_weight=0.3, n_tasks=3))
    tr.randomise(model)
    model.train()
    model(**tr.token_batch())
    assert model.routing.aux_weights == {"dense_mix_balance": 0.3}


def test_old_two_argument_registration_derives_the_capabilities():
    @dataclass
    class PlainConfig(LoraConfig):
        method = "registry_probe_plain"

    class PlainLayer(LoraLayer):
        pass

    spec = register_method(PlainConfig, PlainLayer)
    assert (spec.routing, spec.export, spec.can_add_tasks, dict(spec.aux_losses)) == ("none", "exact", False, {})
    assert get_method_spec("registry_probe_plain") is spec and "registry_probe_plain" not in method_cases.methods()


def test_inconsistent_declarations_are_refused():
    with pytest.raises(ValueError, match="routing='task' but DenseMixConfig.task_routed=False"):
        MethodSpec(DenseMixConfig, DenseMixLayer, routing="task")
    with pytest.raises(ValueError, match="an exact export needs a mergeable layer"):
        MethodSpec(DenseMixConfig, DenseMixLayer, export="exact")
    with pytest.raises(ValueError, match="'no_such_field', which is not a field of DenseMixConfig"):
        MethodSpec(DenseMixConfig, DenseMixLayer, aux_losses={"dense_mix_balance": "no_such_field"})
    with pytest.raises(ValueError, match="can_add_tasks=True but DenseMixLayer has no add_tasks"):
        MethodSpec(DenseMixConfig, DenseMixLayer, can_add_tasks=True)
    with pytest.raises(ValueError, match="routing must be one of"):
        MethodSpec(DenseMixConfig, DenseMixLayer, routing="sometimes")


def test_bench_quick_layer_runs_the_probe(tmp_path, capsys):
    """``mtpeft bench layer --quick --methods dense_mix``: the probe's fast path timed against its loop."""
    out = tmp_path / "quick.json"
    assert cli_main(["bench", "layer", "--quick", "--silent", "--methods", "dense_mix", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["layer"]["rows"]
    assert [(r["method"], r["routing"]) for r in rows] == [("dense_mix", "token")]
    for r in rows:
        assert r["fast_ms"] > 0 and r["ref_vs_fast"] > 0 and r["adapter_fast_vs_lora"] > 0
    capsys.readouterr()
    assert cli_main(["bench", "layer", "--quick", "--silent", "--methods", "dense_mixx"]) != 0
    assert "unknown method 'dense_mixx'. Did you mean 'dense_mix'?" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_quick_train_adds_the_probe(tmp_path):
    """``mtpeft bench train --quick --methods dense_mix``: a MiniLM training-step case for the probe beside
    the curated quick cases (about a minute on a loaded machine)."""
    out = tmp_path / "quick.json"
    assert cli_main(["bench", "train", "--quick", "--silent", "--methods", "dense_mix", "--out", str(out)]) == 0
    train = {r["name"]: r for r in json.loads(out.read_text())["train"]["minilm"]["rows"]}
    assert train["dense_mix"]["routing"] == "token" and train["dense_mix"]["lora_ref"] == "lora_r8"
    assert train["dense_mix"]["vs_floor"] > 0 and train["dense_mix"]["vs_equal_rank_lora"] > 0
    assert {"lora_r8", "moelora", "task_lora"} <= set(train)  # the curated quick cases stay


def test_routing_report_reads_the_task_table_from_the_spec(tr):
    """routing_summary's task x skill matrix comes from MethodSpec.task_table: for Poly, the eval-mode
    weights sigmoid(Z_t) / Σ_s sigmoid(Z_t,s) averaged over modules; a method without a table (LoRA, or a
    token-routed one with no router statistics) has nothing to show."""
    import torch

    from mtpeft.app.routing_report import routing_summary

    poly = mtpeft.get_model(tr.tiny_llama(), method_cases.config("poly", n_tasks=3))
    tr.randomise(poly)
    names = ["a", "b", "c"]
    summary = routing_summary(poly.eval(), None, names)
    v = [torch.sigmoid(layer.module_logits.detach().float()) for _, layer in poly.adapted_layers()]  # (T, S) each
    expected = torch.stack([x / x.sum(-1, keepdim=True) for x in v]).mean(0)
    assert summary["kind"] == "task" and summary["rows"] == names and len(summary["cols"]) == 3
    torch.testing.assert_close(torch.tensor(summary["matrix"]), expected)
    for method in ("lora", "dense_mix"):
        assert routing_summary(mtpeft.get_model(tr.tiny_llama(), method_cases.config(method, n_tasks=3)), None,
                               names) is None
