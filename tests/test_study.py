"""mtpeft study: every method x seed plus the single-task baseline, one table; resumable."""

import json

import yaml

from mtpeft.app.study import load_study, run_study


def test_study_runs_summarises_and_resumes(tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "study"), "seeds": [0],
        "base": {"model": {"name": "minilm", "max_length": 32},
                 "data": {"tasks": ["intent_recognition", "social_iqa"], "max_eval_examples": 12},
                 "train": {"steps": 3, "batch_size": 4, "logging_steps": 1, "save_steps": 3}},
        "methods": [{"name": "mhr", "method": "poly", "adapter": {"n_splits": 2, "r": 2}}],
        "single_task": {"name": "single", "method": "lora", "adapter": {"r": 2}}}))
    study = load_study(config)
    root = run_study(study, log=lambda *a: None)
    table = json.loads((root / "results.json").read_text())
    assert set(table) == {"mhr", "single"}
    assert set(table["single"]["tasks"]) == {"intent_recognition", "social_iqa"}  # one run per task
    assert (root / "single-social_iqa-seed0" / "metrics.json").exists()
    assert "| mhr |" in (root / "results.md").read_text()
    assert (root / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the bar plot
    # the majority class and chance of the scored test examples, per task, as reference rows
    references = json.loads((root / "references.json").read_text())
    assert set(references["majority"]) == {"intent_recognition", "social_iqa"} and references["seeds"] == [0]
    assert "| *majority class* |" in (root / "results.md").read_text()
    assert (root / "comparisons.md").read_text().startswith("No comparison yet")  # one seed: no spread
    # social_iqa is multiple choice: the encoder scores option letters
    run_config = yaml.safe_load((root / "mhr-seed0" / "config.yaml").read_text())
    assert run_config["adapter"]["n_splits"] == 2
    # --summary-only: the table of what is finished, nothing trained (a second seed is planned, not run)
    from mtpeft.app.study import main as study_main

    assert study_main([str(config), "seeds=[0,1]", "--summary-only"]) == 0
    assert not (root / "mhr-seed1").exists()
    assert json.loads((root / "results.json").read_text())["mhr"]["seeds"] == [0]
    before = (root / "mhr-seed0" / "metrics.json").stat().st_mtime_ns
    run_study(study, log=lambda *a: None)  # resumable: finished runs are skipped
    assert (root / "mhr-seed0" / "metrics.json").stat().st_mtime_ns == before


def test_shipped_study_configs_plan_every_method():
    from pathlib import Path

    from mtpeft.lib.config import package_methods
    from mtpeft.app.run_config import run_config_from_dict
    from mtpeft.app.study import planned_runs

    root = Path(__file__).parent.parent / "configs"
    encoders = []
    for name, n_tasks in (("study-encoder.yaml", 5), ("study-encoder-v2.yaml", 4)):
        encoder = planned_runs(load_study(root / name))
        labels = {r["label"] for r in encoder}
        assert labels >= set(package_methods()) | {"mhr", "lora-single-task"}  # every package method is planned
        assert len(encoder) == 3 * (10 + n_tasks)  # 3 seeds x (10 methods + one single-task run per task)
        encoders.append(encoder)
    ablation = load_study(root / "ablation-moelora.yaml")
    assert ablation["base"] == load_study(root / "study-encoder-v2.yaml")["base"]  # the same suite, re-run
    assert len(planned_runs(ablation)) == 3 * 6
    for planned in (encoders[0] + encoders[1] + planned_runs(load_study(root / "study-causal.yaml"))
                    + planned_runs(ablation)):
        run_config_from_dict(planned["config"])  # every planned run is a valid run config


def test_cli_hands_study_and_bench_their_own_options(capsys):
    """`mtpeft bench --quick` / `mtpeft study --help`: a remainder starting with an option reaches the
    sub-command's parser (argparse.REMAINDER alone refuses it)."""
    import pytest

    from mtpeft.app.cli import main

    for command in ("study", "bench"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: mtpeft {command}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--no-such-option"])
    assert exit_info.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err


def test_summary_mean_std_over_seeds_and_median_time_per_step(tmp_path):
    """Scores: mean and sample std over seeds, per task and on the per-seed average; time per step: the
    median over runs, so one run slowed by another job on the machine does not move it."""
    from mtpeft.app.study import summarise

    runs = []
    for seed, (a, b, sps) in enumerate([(0.5, 0.7, 1.0), (0.6, 0.9, 1.1), (0.7, 0.8, 3.9)]):
        out = tmp_path / f"m-seed{seed}"
        out.mkdir()
        (out / "metrics.json").write_text(json.dumps({
            "tasks": {"t1": {"score": a}, "t2": {"score": b}}, "trainable_parameters": {"adapter": 10, "heads": 2},
            "seconds_per_step": sps}))
        runs.append({"label": "m", "seed": seed, "config": {"output_dir": str(out)}})
    row = summarise(runs)["m"]
    assert row["seconds_per_step"] == 1.1
    assert abs(row["tasks"]["t1"]["mean"] - 0.6) < 1e-12 and abs(row["tasks"]["t1"]["std"] - 0.1) < 1e-12
    assert abs(row["average"]["mean"] - 0.7) < 1e-12  # per-seed averages 0.6, 0.75, 0.75
    assert row["trainable_parameters"] == 12 and row["seeds"] == [0, 1, 2]
    # A seed with only some tasks finished (the single-task baseline part-way) counts in those tasks'
    # columns but not in the average.
    out = tmp_path / "m-seed3"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({
        "tasks": {"t1": {"score": 1.0}}, "trainable_parameters": {"adapter": 10}, "seconds_per_step": 1.0}))
    row = summarise(runs + [{"label": "m", "seed": 3, "config": {"output_dir": str(out)}}])["m"]
    assert row["tasks"]["t1"]["n"] == 4 and row["tasks"]["t2"]["n"] == 3
    assert abs(row["average"]["mean"] - 0.7) < 1e-12 and row["average"]["n"] == 3
    assert "accuracy_norm" not in row  # encoder runs: one reading only


def test_summary_reports_acc_norm_of_scored_options_in_a_second_table(tmp_path):
    from mtpeft.app.study import results_markdown, summarise

    runs = []
    for label, norm in (("a", 0.25), ("b", None)):
        out = tmp_path / label
        out.mkdir()
        task = {"score": 0.5, **({"accuracy_norm": norm} if norm is not None else {})}
        (out / "metrics.json").write_text(json.dumps({
            "tasks": {"siqa": task}, "trainable_parameters": {"shared": 4}, "seconds_per_step": 1.0}))
        runs.append({"label": label, "seed": 0, "config": {"output_dir": str(out)}})
    table = summarise(runs)
    assert table["a"]["accuracy_norm"]["siqa"]["mean"] == 0.25 and "accuracy_norm" not in table["b"]
    text = results_markdown(table)
    assert "(acc_norm)" in text and "| a | 25.0 ± 0.0 |" in text and "| b | – |" in text


def test_reference_scores_are_those_of_the_scored_test_examples():
    """Majority class: the most frequent gold label's share (accuracy) or its F1 over the classes present
    (macro-F1: 2p / (1 + p) for that class, 0 for the others); chance: 1 / the options, for accuracy only."""
    import collections

    from mtpeft.app.pipeline import load_run_tasks
    from mtpeft.app.reference_scores import reference_scores
    from mtpeft.app.run_config import run_config_from_dict

    run = run_config_from_dict({"method": "lora", "output_dir": "unused", "model": {"name": "minilm"},
                                "data": {"tasks": ["bbc_news", "intent_recognition", "social_iqa"],
                                         "max_eval_examples": 40, "seed": 1}})
    references = reference_scores(run)
    for task in load_run_tasks(run):
        gold = [r["label"] for r in task.splits["test"][:40]]
        counts = collections.Counter(gold)
        p = counts.most_common(1)[0][1] / len(gold)
        got = references[task.name]
        assert got["n"] == len(gold) == 40
        if task.name == "bbc_news":  # macro-F1 over the classes present in gold
            assert abs(got["majority"] - 2 * p / (1 + p) / len(counts)) < 1e-12 and got["chance"] is None
        else:
            assert abs(got["majority"] - p) < 1e-12
            assert abs(got["chance"] - 1 / task.num_labels) < 1e-12  # encoders: the options as letters


def test_unlearned_tasks_are_those_no_method_beats_the_majority_class_by_ten_points():
    from mtpeft.app.reference_scores import unlearned_tasks

    table = {"a": {"tasks": {"t1": {"mean": 0.62}, "t2": {"mean": 0.55}}},
             "b": {"tasks": {"t1": {"mean": 0.40}, "t2": {"mean": 0.59}}}}
    assert unlearned_tasks(table, {"t1": 0.5, "t2": 0.5}) == ["t2"]  # t1: 0.62 >= 0.60; t2: 0.59 < 0.60
    assert unlearned_tasks(table, {"t1": 0.5, "t2": 0.5}, margin=0.05) == []


def test_paired_comparison_over_seeds_is_the_paired_t_test():
    """d_s = a_s - b_s; t = mean(d) / (std(d) / sqrt(n)); p two-sided with n - 1 degrees of freedom.
    For n = 3 (2 degrees of freedom) the t distribution has a closed form: p = 1 - |t| / sqrt(2 + t^2)."""
    import math
    import statistics

    from mtpeft.app.significance import claim, paired_difference

    a, b = {0: 0.70, 1: 0.74, 2: 0.69, 5: 0.9}, {0: 0.66, 1: 0.71, 2: 0.68}
    result = paired_difference(a, b)
    diffs = [0.04, 0.03, 0.01]
    assert result["seeds"] == [0, 1, 2]  # only the seeds both have
    t = statistics.fmean(diffs) / (statistics.stdev(diffs) / math.sqrt(3))
    assert abs(result["t"] - t) < 1e-9 and abs(result["p"] - (1 - abs(t) / math.sqrt(2 + t * t))) < 1e-9
    sentence = claim("x", "y", "average", result)
    assert sentence.startswith("x vs y on average: +2.7 points (per seed +4.0/+3.0/+1.0")
    assert ("not larger" in sentence) == (result["p"] >= 0.05)
    assert paired_difference({0: 0.5}, {0: 0.4}) is None  # one shared seed: no spread
    same = paired_difference({0: 0.5, 1: 0.6}, {0: 0.4, 1: 0.5})  # the same difference on every seed
    assert same["p"] == 0.0 and same["t"] == math.inf
    assert paired_difference({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6})["p"] == 1.0


def test_study_compares_every_method_with_its_baselines_paired_over_seeds(tmp_path):
    from mtpeft.app.significance import comparisons_markdown, study_comparisons
    from mtpeft.app.study import summarise

    runs = []
    scores = {"lora": [0.60, 0.62, 0.61], "m": [0.70, 0.73, 0.71]}
    for label, values in scores.items():
        for seed, value in enumerate(values):
            out = tmp_path / f"{label}-seed{seed}"
            out.mkdir()
            (out / "metrics.json").write_text(json.dumps({
                "tasks": {"t1": {"score": value}, "t2": {"score": 0.5}}, "trainable_parameters": {"a": 1},
                "seconds_per_step": 1.0}))
            runs.append({"label": label, "seed": seed, "config": {"output_dir": str(out)}})
    table = summarise(runs)
    comparisons = study_comparisons(table, ["lora", "absent-baseline"])
    assert set(comparisons) == {"lora"} and set(comparisons["lora"]) == {"m"}
    t1 = comparisons["lora"]["m"]["t1"]
    assert [round(d, 9) for d in t1["diffs"]] == [0.1, 0.11, 0.1] and t1["p"] < 0.05
    assert comparisons["lora"]["m"]["t2"]["p"] == 1.0  # equal on every seed
    average = comparisons["lora"]["m"]["average"]
    assert abs(average["mean"] - (0.05 + 0.055 + 0.05) / 3) < 1e-12  # the per-seed averages' differences
    text = comparisons_markdown(comparisons)
    assert "Against `lora`:" in text and "| m | **+10.3 ± 0.6 (p 0.00)** | +0.0 ± 0.0 (p 1.00) |" in text
