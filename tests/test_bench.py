"""``mtpeft bench``: a smoke test of ``--quick`` (structure of the JSON, never a time), the timing helper,
and the exactness of the fast paths the benchmark led to (cheap adapter dropout, MoELoRA's contrastive
similarities through a Gram matrix)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mtpeft.app import bench
from mtpeft.app.cli import main as cli_main


# ------------------------------------------------------------------------------- smoke: --quick


def test_quick_layer_and_train_through_the_cli(tmp_path, capsys):
    out = tmp_path / "quick.json"
    assert cli_main(["bench", "layer", "train", "--quick", "--silent", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    meta = res["meta"]
    assert meta["quick"] and meta["torch_threads"] == 1 and meta["sections"] == ["layer", "train"]
    assert len(meta["load_average_start"]) == 3 and meta["repeats"] >= 2
    assert "infer" not in res and "memory" not in res

    rows = res["layer"]["rows"]
    assert {r["method"] for r in rows} == {"moelora", "poly"}
    for r in rows:
        for key in ("fast_ms", "ref_ms", "lora_ms", "base_ms", "ref_vs_fast", "fast_vs_lora",
                    "adapter_ref_vs_fast", "adapter_fast_vs_lora"):
            assert isinstance(r[key], float) and r[key] > 0, key

    train = res["train"]["minilm"]
    names = [r["name"] for r in train["rows"]]
    assert names[0] == "floor" and {"lora_r8", "peft_lora_r8", "moelora", "lora_r32", "task_lora"} <= set(names)
    rows = {r["name"]: r for r in train["rows"]}
    assert rows["floor"]["vs_floor"] == 1.0 and rows["floor"]["trainable_params"] == 0
    assert rows["lora_r8"]["trainable_params"] == rows["peft_lora_r8"]["trainable_params"] == 6 * 2 * 8 * (384 + 384)
    assert rows["lora_r8"]["peft_ref"] == "peft_lora_r8" and rows["lora_r8"]["vs_peft"] > 0
    assert rows["moelora"]["lora_ref"] == "lora_r32" and rows["moelora"]["vs_equal_rank_lora"] > 0
    assert rows["moelora"]["flop_predicted_vs_floor"] > rows["lora_r32"]["flop_predicted_vs_floor"] > 0
    assert all(g[0] == "floor" for g in train["groups"]) and ["floor", "lora_r8", "peft_lora_r8"] in train["groups"]
    for timing in train["timings"]:  # every sample kept, with its contention flag
        for name, samples in timing["samples_s"].items():
            assert len(samples) == len(timing["contended"][name]) >= meta["repeats"]

    targets = {(t["target"], t["subject"]) for t in res["targets"]}
    assert ("lora_vs_floor", "minilm: lora_r8") in targets
    assert any(t == "reference_loop_vs_fast_path_E8" for t, _ in targets)
    for t in res["targets"]:
        assert set(t) == {"target", "subject", "value", "ci", "bound", "met", "verdict"} and isinstance(t["met"], bool)
    lora_floor = next(t for t in res["targets"] if t["target"] == "lora_vs_floor")
    assert lora_floor["ci"] == rows["lora_r8"]["vs_floor_ci"]
    assert lora_floor["ci"][0] <= lora_floor["value"] <= lora_floor["ci"][1]
    assert lora_floor["verdict"] in ("met", "missed", "noise")

    printed = capsys.readouterr().out
    assert "train step, minilm" in printed and "targets" in printed

    # The saved JSON re-renders without measuring, also as markdown (what docs/performance.md holds).
    assert bench.main(["--show", str(out), "--markdown"]) == 0
    markdown = capsys.readouterr().out
    assert "**train step, minilm 4x64" in markdown and "| name | median s | vs floor |" in markdown
    lora = rows["lora_r8"]
    assert f"| lora_r8 | {lora['median_s']:.3f} | {lora['vs_floor']:.3f} |" in markdown

    # A run saved before intervals were reported gets them from its raw samples, and its verdicts.
    old = json.loads(out.read_text())
    for row in old["train"]["minilm"]["rows"]:
        for key in [k for k in row if k.endswith("_ci")]:
            del row[key]
    old["targets"] = [{k: v for k, v in t.items() if k not in ("ci", "verdict")} for t in old["targets"]]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert bench.main(["--show", str(tmp_path / "old.json"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["train"]["minilm"]["rows"] == res["train"]["minilm"]["rows"]
    assert shown["targets"] == res["targets"]


def test_quick_infer_and_memory(tmp_path):
    out = tmp_path / "quick.json"
    assert bench.main(["infer", "memory", "--quick", "--silent", "--json", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {r["name"]: r for r in res["infer"]["minilm"]["rows"]}
    assert {"base", "lora_merged", "task_lora_merged", "lora_unmerged", "task_lora_mixed", "peft_lora_mixed"} <= set(rows)
    assert rows["base"]["vs_base"] == 1.0 and rows["task_lora_mixed"]["vs_peft_mixed"] > 0
    mem = {r["name"]: r for r in res["memory"]["minilm"]["rows"]}
    assert mem["task_lora"]["lora_ref"] == "lora_r8"
    for r in mem.values():
        assert r["step_peak_mb"] > 0 and r["peak_rss_mb"] > r["step_peak_mb"]
    assert {t["target"] for t in res["targets"]} >= {"merged_vs_base_inference", "peak_train_memory_vs_lora"}


def test_unknown_section_is_an_error():
    with pytest.raises(ValueError, match="unknown sub-benchmark"):
        bench.main(["speed", "--quick", "--silent"])


# ------------------------------------------------------------------------------- timing helper


def test_interleaved_alternates_the_order_and_pairs_rounds():
    calls = []
    cases = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    t = bench.interleaved(cases, repeats=3, warmup=1, extra_rounds=0)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == list("abc") + list("cba") + list("abc")
    assert all(len(v) == 3 for v in t.samples.values())

    t = bench.Timings({"a": [2.0, 4.0, 9.0], "b": [1.0, 2.0, 1.0]}, {"a": [False] * 3, "b": [False] * 3})
    assert t.ratio("a", "b") == 2.0  # median of the per-round ratios 2, 2, 9 (not 4 / 1)
    t.contended["a"] = [False, False, True]
    assert t.median("a") == 3.0 and t.clean_count("a") == 2  # the contended sample is left out


def test_median_interval_is_the_sign_test_interval_and_decides_targets_only_when_clear_of_the_bound():
    values = [1.0, 1.3, 0.9, 1.1, 1.2, 0.95, 1.05]
    # n = 7: P(all 7 on one side of the median) = 2 / 128 < 5 %, P(<= 1 on one side) = 16 / 128 > 5 %.
    assert bench.median_ci(values) == [0.9, 1.3]
    twenty = [float(i) for i in range(20)]
    # n = 20: P(Binomial(20, 1/2) <= 5) = 2.07 % <= 2.5 % < P(<= 6) = 5.77 %, so the 6th value from each end.
    assert bench.median_ci(twenty) == [5.0, 14.0]
    assert bench.median_ci([2.0, 1.0]) == [1.0, 2.0]  # too few for 95 %: min and max

    assert bench.verdict("<=", 1.05, [0.98, 1.04]) == "met"
    assert bench.verdict("<=", 1.05, [1.06, 1.20]) == "missed"
    assert bench.verdict("<=", 1.05, [1.00, 1.10]) == "noise"
    assert bench.verdict(">=", 2.0, [2.1, 2.5]) == "met" and bench.verdict(">=", 2.0, [1.5, 1.9]) == "missed"
    assert bench.verdict("<=", 1.05, None) is None

    t = bench.Timings({"a": [2.0, 4.0, 9.0, 3.0], "b": [1.0, 2.0, 1.0, 1.0]})
    assert t.ratio_ci("a", "b") == [2.0, 9.0] and t.ratio("a", "b") == 2.5


def test_only_keeps_the_groups_of_the_named_subjects_and_names_a_typo():
    groups = [["floor", "lora_r8", "peft_lora_r8"], ["floor", "moelora", "lora_r32"], ["floor", "poly", "lora_r8"]]
    assert bench.only_groups(groups, None) == groups
    assert bench.only_groups(groups, ["poly", "lora_r8"]) == [groups[0], groups[2]]
    with pytest.raises(ValueError, match="'polly'.*choose from.*'moelora'"):
        bench.only_groups(groups, ["polly"], "minilm")
    with pytest.raises(ValueError, match="lora_r32"):  # a reference case is no group's subject
        bench.only_groups(groups, ["lora_r32"], "minilm")


def test_only_through_the_cli_times_and_reports_just_those_groups(tmp_path):
    out = tmp_path / "only.json"
    assert bench.main(["train", "--quick", "--silent", "--json", "--only", "lora_r8", "--out", str(out)]) == 0
    train = json.loads(out.read_text())["train"]["minilm"]
    assert train["groups"] == [["floor", "lora_r8", "peft_lora_r8"]]
    assert [r["name"] for r in train["rows"]] == ["floor", "lora_r8", "peft_lora_r8"]
    with pytest.raises(ValueError, match="no minilm train group has the subject 'lora_r9'"):
        bench.main(["train", "--quick", "--silent", "--only", "lora_r9"])


# ------------------------------------------------------------------------------- exactness of the fast paths


def test_adapter_dropout_has_torch_dropouts_distribution():
    from mtpeft.lib.core.dropout import Dropout, dropout_mask

    torch.manual_seed(0)
    p, n, draws = 0.05, 997, 3000
    masks = torch.stack([dropout_mask((n,), p, torch.float32, "cpu") for _ in range(draws)])
    values = torch.unique(masks).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p))
    keep = (masks > 0).float()
    sd = math.sqrt(p * (1 - p) / (n * draws))
    assert abs(keep.mean().item() - (1 - p)) < 5 * sd
    per_position = keep.mean(0)  # no position is favoured, the last ones included
    assert (per_position - (1 - p)).abs().max() < 6 * math.sqrt(p * (1 - p) / draws)
    assert abs(per_position[-50:].mean() - (1 - p)) < 6 * math.sqrt(p * (1 - p) / (50 * draws))
    a, b = keep[:, :-1], keep[:, 1:]  # neighbours independent
    assert abs(((a * b).mean() - a.mean() * b.mean()).item()) < 1e-3
    for size in (1, 2, 3):  # tiny inputs are covered too
        m = torch.stack([dropout_mask((size,), 0.3, torch.float32, "cpu") for _ in range(4000)])
        assert ((m > 0).float().mean(0) - 0.7).abs().max() < 0.04

    drop = Dropout(p)
    x = torch.randn(4, 6, 8, requires_grad=True)
    torch.manual_seed(1)
    y = drop(x)
    torch.manual_seed(1)
    mask = dropout_mask(x.shape, p, x.dtype, x.device)
    torch.testing.assert_close(y, x * mask)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, mask)  # backward: the same mask, scaled
    assert drop.eval()(x) is x
    torch.manual_seed(2)  # p >= 0.5: torch's own dropout, the same random stream
    y = Dropout(0.5).train()(x)
    torch.manual_seed(2)
    torch.testing.assert_close(y, F.dropout(x, 0.5, training=True))


def test_dropout_linear_drops_what_dropout_drops_and_keeps_less_for_backward():
    from mtpeft.lib.core.dropout import Dropout, dropout_linear

    drop = Dropout(0.1).train()
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        x = torch.randn(3, 50, 16, dtype=dtype, requires_grad=True)
        w = torch.randn(4, 16, dtype=dtype, requires_grad=True)
        g = torch.randn(3, 50, 4, dtype=dtype)
        torch.manual_seed(5)
        want = drop(x) @ w.T
        grads_want = torch.autograd.grad(want, [x, w], g)
        torch.manual_seed(5)  # the same draws: the same dropped elements
        got = dropout_linear(drop, x, w)
        grads_got = torch.autograd.grad(got, [x, w], g)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        for a, b in zip(grads_got, grads_want):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(4, 32, requires_grad=True)
    for module in (Dropout(0.0), Dropout(0.1).eval(), torch.nn.Identity()):  # no dropout: x @ wᵀ
        torch.testing.assert_close(dropout_linear(module, x, w), x @ w.T)

    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dropout_linear(drop, x, w)
    float_bytes = sum(t.numel() * t.element_size() for t in saved if t.is_floating_point())
    assert float_bytes == (x.numel() + w.numel()) * 4  # x itself and w; no dropped copy, no float mask
    assert any(t.data_ptr() == x.data_ptr() for t in saved)


def test_moelora_contrastive_from_blocks_equals_the_loss_on_normalised_outputs():
    from mtpeft.lib.methods.moelora import contrastive_loss_from_blocks, expert_contrastive_loss

    torch.manual_seed(0)
    m, e, r, d = 96, 8, 4, 40
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        for ok_share in (0.8, 1.0, 0.03):  # some pairs unusable; all usable; anchors without positives
            z = torch.randn(m, r, dtype=dtype)
            experts = torch.randint(0, e, (m,))
            one_hot = F.one_hot(experts, e).to(dtype).unsqueeze(-1)
            blocks = (one_hot * z.unsqueeze(1)).view(m, -1).requires_grad_()
            b_cat = torch.randn(e * r, d, dtype=dtype, requires_grad=True)
            ok = torch.rand(m) < ok_share
            want = expert_contrastive_loss(blocks @ b_cat, experts, ok, 0.1)
            got = contrastive_loss_from_blocks(blocks, b_cat, experts, ok, 0.1, e)
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
            g_got = torch.autograd.grad(got, [blocks, b_cat], allow_unused=True)
            g_want = torch.autograd.grad(want, [blocks, b_cat], allow_unused=True)
            for a, b in zip(g_got, g_want):
                torch.testing.assert_close(a, b, atol=tol * 10, rtol=tol * 10)
    zero = torch.zeros(e * r, d, requires_grad=True)  # B = 0 at init: log(M - 1), finite, zero gradient
    blocks = blocks.detach().float().requires_grad_()
    ok = torch.ones(m, dtype=torch.bool)
    loss = contrastive_loss_from_blocks(blocks, zero, experts, ok, 0.1, e)
    assert loss.item() == pytest.approx(math.log(m - 1), abs=1e-5)
    grads = torch.autograd.grad(loss, [blocks, zero])
    assert all(torch.isfinite(g).all() and g.abs().sum() == 0 for g in grads)


def test_merged_layers_check_the_task_ids_once_per_tensor_but_see_in_place_changes():
    """Merged layers skip the per-call task check for a task-id tensor already checked (generate's
    decoding steps), yet an in-place change of that tensor is checked again."""
    import mtpeft
    from tiny_models import batch_for, tiny_llama

    model = mtpeft.get_model(tiny_llama(), mtpeft.TaskLoraConfig(r=4, n_tasks=3))
    model.merge(task=1)
    batch = batch_for("llama")
    ids = torch.ones(4, dtype=torch.long)
    with torch.no_grad():
        model(**batch, task_ids=ids)
        model(**batch, task_ids=ids)
        ids[2] = 0  # the same tensor, changed in place
        with pytest.raises(ValueError, match="merged for task 1"):
            model(**batch, task_ids=ids)
        with pytest.raises(ValueError, match="merged for task 1"):
            model(**batch, task_ids=torch.tensor([1, 2, 1, 1]))
        model(**batch, task_ids=torch.ones(4, dtype=torch.long))


def test_answer_loss_pair_trains_on_the_last_tokens_with_and_without_full_logits():
    from mtpeft.app.bench import ANSWER_TOKENS, MODELS, batch_for, train_groups, train_variants
    from tiny_models import VOCAB, tiny_llama

    base = tiny_llama()
    variants = {v.name: v for v in train_variants(MODELS["smollm2"], base, quick=False)}
    assert ["floor", "lora_r8@answers_kept", "lora_r8@answers"] in train_groups(list(variants.values()))
    batch = bench.make_batch(MODELS["smollm2"], VOCAB, 3, 16)
    assert batch_for(batch, variants["lora_r8"]) is batch
    answers = batch_for(batch, variants["lora_r8@answers"])
    assert (answers["labels"] != -100).sum(1).tolist() == [ANSWER_TOKENS] * 3 and "logits_to_keep" not in answers
    kept = batch_for(batch, variants["lora_r8@answers_kept"])
    assert kept["logits_to_keep"].tolist() == list(range(16 - ANSWER_TOKENS - 1, 15))
    model = variants["lora_r8@answers"].build(base).eval()  # no dropout: one loss for the same input
    full_loss = model(**answers).loss
    assert model(**kept).logits.shape[1] == ANSWER_TOKENS
    torch.testing.assert_close(model(**kept).loss, full_loss)
