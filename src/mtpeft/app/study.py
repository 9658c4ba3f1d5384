"""``mtpeft study CONFIG.yaml``: every method x every seed on one task suite, plus the single-task
baseline, summarised in one table (mean and standard deviation per task and on average, trainable
parameters, time per step).

A study config::

    output_dir: results/study-encoder
    seeds: [0, 1, 2]
    base: {model: ..., data: ..., train: ...}     # a run config without method / adapter
    methods:
      - {name: lora, method: lora, adapter: {r: 8}}
      - {name: mhr, method: poly, adapter: {n_splits: 8}}
    single_task: {name: lora-single-task, method: lora, adapter: {r: 8}}   # one run per task

The study is resumable: a run whose metrics.json exists is skipped, and an interrupted run resumes
from its newest complete checkpoint. The single-task baseline trains one adapter per task alone with
the same number of steps as a multi-task run, and reports each task from its own run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

from .run_config import apply_overrides, run_config_from_dict

# .pipeline (torch, transformers, datasets) is imported where a run starts, so that
# `mtpeft study --help` answers at once.

_STUDY_KEYS = {"output_dir", "seeds", "base", "methods", "single_task", "name"}


def load_study(path, overrides=None) -> dict:
    data = yaml.safe_load(Path(path).read_text()) or {}
    return validate_study(apply_overrides(data, overrides or []), path)


def validate_study(data: dict, path) -> dict:
    """A study config's dict, checked (``path`` names it in errors), with its defaults filled in."""
    unknown = set(data) - _STUDY_KEYS
    if unknown:
        raise ValueError(f"unknown study keys {sorted(unknown)}; known: {sorted(_STUDY_KEYS)}.")
    for key in ("output_dir", "base", "methods"):
        if key not in data:
            raise ValueError(f"study config {path} needs {key!r}.")
    data.setdefault("seeds", [0])
    return data


def _run_dict(study: dict, entry: dict, seed: int, out: Path, tasks=None) -> dict:
    run = yaml.safe_load(yaml.safe_dump(study["base"]))  # deep copy
    run["method"] = entry["method"]
    run["adapter"] = dict(entry.get("adapter") or {})
    run["output_dir"] = str(out)
    run.setdefault("train", {})["seed"] = seed
    run.setdefault("data", {})["seed"] = seed
    if tasks is not None:
        run["data"]["tasks"] = tasks
    return run


def planned_runs(study: dict) -> list[dict]:
    """Every run of the study: {"label", "seed", "task" (single-task only), "config" (a dict)}."""
    root = Path(study["output_dir"])
    runs = []
    for seed in study["seeds"]:
        for entry in study["methods"]:
            out = root / f"{entry['name']}-seed{seed}"
            runs.append({"label": entry["name"], "seed": seed, "task": None,
                         "config": _run_dict(study, entry, seed, out)})
        single = study.get("single_task")
        if single:
            for task in study["base"]["data"]["tasks"]:
                name = task if isinstance(task, str) else task["name"]
                out = root / f"{single['name']}-{name}-seed{seed}"
                runs.append({"label": single["name"], "seed": seed, "task": name,
                             "config": _run_dict(study, {**single, "adapter": {**(single.get("adapter") or {}),
                                                                                "n_tasks": 1}},
                                                 seed, out, tasks=[task])})
    return runs


def run_study(study: dict, log=print, train: bool = True) -> Path:
    """Train every planned run that has no metrics.json yet (``train=False``: none), then write the
    table of the finished ones."""
    from .pipeline import train_run, write_json
    from .reference_scores import LEARNED_MARGIN, unlearned_tasks
    from .significance import comparisons_markdown, study_comparisons

    root = Path(study["output_dir"])
    root.mkdir(parents=True, exist_ok=True)
    runs = planned_runs(study)
    for i, planned in enumerate(runs if train else [], 1):
        out = Path(planned["config"]["output_dir"])
        if (out / "metrics.json").exists():
            continue
        log(f"mtpeft study: run {i}/{len(runs)}: {out.name}")
        started = time.perf_counter()
        train_run(run_config_from_dict(planned["config"]), log=log)
        log(f"mtpeft study: {out.name} took {time.perf_counter() - started:.0f} s")
    table = summarise(runs)
    references = study_references(runs, table)
    write_json(root / "results.json", table)
    write_json(root / "references.json", references)
    comparisons = study_comparisons(table, baselines(study))
    write_json(root / "comparisons.json", comparisons)
    from ..lib.io import atomic_write_text  # torch: not at import (`mtpeft study --help` stays light)

    atomic_write_text(root / "comparisons.md", comparisons_markdown(comparisons) + "\n")
    atomic_write_text(root / "results.md", results_markdown(table, references) + "\n")
    if table:
        plot_results(table, root / "results.png", references)
        unlearned = unlearned_tasks(table, {t: r["mean"] for t, r in references["majority"].items()})
        if unlearned:
            log(f"mtpeft study: no method is {100 * LEARNED_MARGIN:.0f} points above the majority class on "
                f"{unlearned}: those columns compare noise (see references.json).")
    return root


def baselines(study: dict) -> list[str]:
    """What every method is compared with: the study's first method (the suites' multi-task LoRA) and its
    single-task baseline."""
    names = [study["methods"][0]["name"]]
    if study.get("single_task"):
        names.append(study["single_task"]["name"])
    return names


def study_references(runs: list[dict], table: dict) -> dict:
    """The majority class and chance per task (mean / std over the seeds that have a finished run; each
    seed splits the data its own way), on the examples every run of that seed is scored on."""
    from .reference_scores import reference_scores

    seeds = sorted({seed for row in table.values() for seed in row["seeds"]})
    per_seed = []
    for seed in seeds:
        # every multi-task run of a seed shares its data settings; the single-task runs see one task each
        planned = next(r for r in runs if r["seed"] == seed and r["task"] is None)
        per_seed.append(reference_scores(run_config_from_dict(planned["config"])))
    references = {"majority": {}, "chance": {}, "seeds": seeds}
    for kind in ("majority", "chance"):
        for task in dict.fromkeys(t for scores in per_seed for t in scores):
            values = [scores[task][kind] for scores in per_seed if task in scores]
            if values and None not in values:
                references[kind][task] = _mean_std(values)
    return references


def summarise(runs: list[dict]) -> dict:
    """Per method: per-task and average mean / std over seeds, parameters, seconds per step (the median
    over the method's runs: a run that shared the CPUs with another job is slower, and the median of
    three seeds ignores one such run where a mean would not)."""
    by_label: dict[str, dict] = {}
    for planned in runs:
        path = Path(planned["config"]["output_dir"]) / "metrics.json"
        if not path.exists():
            continue
        metrics = json.loads(path.read_text())
        entry = by_label.setdefault(planned["label"], {"scores": {}, "norm": {}, "params": [], "step": [],
                                                        "seeds": set()})
        entry["seeds"].add(planned["seed"])
        for task, result in metrics["tasks"].items():
            entry["scores"].setdefault(task, {}).setdefault(planned["seed"], result["score"])
            if "accuracy_norm" in result:  # scored options (causal LMs): the per-character reading too
                entry["norm"].setdefault(task, []).append(result["accuracy_norm"])
        entry["params"].append(sum(metrics["trainable_parameters"].values()))
        entry["step"].append(metrics["seconds_per_step"])
    table = {}
    for label, entry in by_label.items():
        tasks = {t: _mean_std(list(s.values())) for t, s in entry["scores"].items()}
        seeds = sorted(entry["seeds"])
        # The average over tasks, per seed, only for seeds with every task finished (the single-task
        # baseline is one run per task: a seed part-way through would average a subset of the tasks).
        complete = [s for s in seeds if all(s in by_seed for by_seed in entry["scores"].values())]
        averages = [statistics.fmean(by_seed[s] for by_seed in entry["scores"].values()) for s in complete]
        table[label] = {"tasks": tasks, "average": _mean_std(averages) if averages else None, "seeds": seeds,
                        "trainable_parameters": max(entry["params"]),
                        "seconds_per_step": statistics.median(entry["step"]),
                        # the scores themselves, for comparisons paired over seeds (mtpeft.app.significance)
                        "per_seed": {"tasks": entry["scores"], "average": dict(zip(complete, averages))}}
        if entry["norm"]:
            table[label]["accuracy_norm"] = {t: _mean_std(v) for t, v in entry["norm"].items()}
    return table


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


_REFERENCE_ROWS = {"majority": "majority class", "chance": "chance"}


def results_markdown(table: dict, references: dict | None = None) -> str:
    """The study's table; ``references`` (:func:`study_references`) adds the majority-class and chance
    rows below the methods, each averaged over the tasks only when every task has one."""
    tasks = list(dict.fromkeys(t for row in table.values() for t in row["tasks"]))
    lines = ["| method | " + " | ".join(tasks) + " | average | trainable params | s/step (median) | seeds |",
             "|" + "---|" * (len(tasks) + 5)]
    for label, row in table.items():
        cells = [f"{100 * row['tasks'][t]['mean']:.1f} ± {100 * row['tasks'][t]['std']:.1f}"
                 if t in row["tasks"] else "–" for t in tasks]
        avg = row["average"]
        avg_cell = f"{100 * avg['mean']:.1f} ± {100 * avg['std']:.1f}" if avg else "–"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {avg_cell} | "
                     f"{row['trainable_parameters']:,} | {row['seconds_per_step']:.3f} | {len(row['seeds'])} |")
    for kind, name in _REFERENCE_ROWS.items():
        scores = (references or {}).get(kind) or {}
        if not scores:
            continue
        cells = [f"{100 * scores[t]['mean']:.1f}" if t in scores else "–" for t in tasks]
        avg = f"{100 * statistics.fmean(scores[t]['mean'] for t in tasks):.1f}" if all(t in scores for t in tasks) else "–"
        lines.append(f"| *{name}* | " + " | ".join(cells) + f" | {avg} | | | {len(references['seeds'])} |")
    norm_tasks = list(dict.fromkeys(t for row in table.values() for t in row.get("accuracy_norm", {})))
    if norm_tasks:
        lines += ["", "Accuracy with the log-likelihood per character of each option (acc_norm):", "",
                  "| method | " + " | ".join(norm_tasks) + " |", "|" + "---|" * (len(norm_tasks) + 1)]
        for label, row in table.items():
            norm = row.get("accuracy_norm", {})
            lines.append(f"| {label} | " + " | ".join(
                f"{100 * norm[t]['mean']:.1f} ± {100 * norm[t]['std']:.1f}" if t in norm else "–"
                for t in norm_tasks) + " |")
    return "\n".join(lines)


def plot_results(table: dict, path: Path, references: dict | None = None) -> None:
    """One group of bars per task (and the average), one bar per method, the seeds' std as error bars;
    the majority class as the last bar of each group."""
    from .report import plot_bar_groups

    tasks = list(dict.fromkeys(t for row in table.values() for t in row["tasks"]))
    bars = {}
    for label, row in table.items():
        cells = [row["tasks"].get(t) for t in tasks] + [row["average"]]
        bars[label] = ([c["mean"] if c else float("nan") for c in cells], [c["std"] if c else 0.0 for c in cells])
    majority = (references or {}).get("majority") or {}
    if majority:
        heights = [majority[t]["mean"] if t in majority else float("nan") for t in tasks]
        average = statistics.fmean(heights) if all(t in majority for t in tasks) else float("nan")
        bars[_REFERENCE_ROWS["majority"]] = (heights + [average], None)
    plot_bar_groups(tasks + ["average"], bars, path, ylabel="test score (mean ± std over seeds)",
                    references=(_REFERENCE_ROWS["majority"],))


def main(argv: list[str] | None = None) -> int:
    # the description is the docstring's first paragraph (its first line alone stops mid-sentence)
    parser = argparse.ArgumentParser(prog="mtpeft study", description=" ".join(__doc__.split("\n\n")[0].replace("``", "").split()))
    parser.add_argument("config", help="study YAML (see configs/study-*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seeds=[0]")
    parser.add_argument("--summary-only", action="store_true",
                        help="train nothing: write the table of the runs finished so far")
    args = parser.parse_args(argv)
    root = run_study(load_study(args.config, args.overrides), train=not args.summary_only)
    print((root / "results.md").read_text())
    return 0
