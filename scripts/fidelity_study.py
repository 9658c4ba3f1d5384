"""The distilled exports' fidelity: a study's token-routed runs distilled per task into plain LoRAs at
R = r_total/2, r_total, 2·r_total, least squares and routing-folded, each scored on the task's test split
after loading it with stock PEFT (METHODS.md §10; docs/results.md, "Distilled exports").

    python scripts/fidelity_study.py configs/study-encoder.yaml --out results/fidelity-encoder \\
        --methods teamlora moelora mosld hydralora

The study's runs for those methods are trained into OUT/runs (the study's own settings and seeds, seed by
seed; resumable: a trained run is skipped), and each is distilled once per task after its training: one calibration pass
(the first --calibration training examples of the task) and one held-out pass (as many validation
examples) give the statistics every rank and mode is fitted from. Per run, OUT/distill/RUN.json holds
every row (resumable too: a finished run is skipped); OUT/fidelity.json and OUT/fidelity.md the table.
Times (statistics, fit, scoring) are recorded per row; they depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from mtpeft.lib.distill import DEFAULT_RIDGE, MODES, default_rank, fidelity_report, fit_factors, write_distilled_folder
from mtpeft.app.distill_run import evaluate_tasks, stock_peft_model, task_statistics
from mtpeft.lib.io import atomic_write_bytes, atomic_write_text
from mtpeft.app.run_config import run_config_from_dict
from mtpeft.app.study import load_study, planned_runs, run_study

RANK_FACTORS = (0.5, 1.0, 2.0)


def fidelity_study(study: dict, out: Path, methods: list[str], calibration: int, log=print,
                   factors: tuple[float, ...] = RANK_FACTORS) -> dict:
    known = [m["name"] for m in study["methods"]]
    missing = sorted(set(methods) - set(known))
    if missing:
        raise SystemExit(f"the study has no method {missing}; its methods are {known}.")
    study = {**study, "methods": [m for m in study["methods"] if m["name"] in methods],
             "output_dir": str(out / "runs")}
    study.pop("single_task", None)
    rows = []
    for planned in planned_runs(study):  # seed by seed: each run is distilled as soon as it is trained
        run_dir = Path(planned["config"]["output_dir"])
        if not (run_dir / "metrics.json").exists():
            from mtpeft.app.pipeline import train_run

            log(f"fidelity: training {run_dir.name}")
            train_run(run_config_from_dict(planned["config"]), log=log)
        done = out / "distill" / f"{run_dir.name}.json"
        if not done.exists():
            started = time.perf_counter()
            result = distil_every_task(run_dir, calibration, log, factors)
            log(f"fidelity: {run_dir.name} took {time.perf_counter() - started:.0f} s")
            done.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(done, (json.dumps(result, indent=2) + "\n").encode())
        rows += [{"method": planned["label"], "seed": planned["seed"], **r}
                 for r in json.loads(done.read_text())["rows"]]
    run_study(study, log=log, train=False)  # the runs' own table (OUT/runs/results.md)
    table = summarise(rows)
    atomic_write_bytes(out / "fidelity.json", (json.dumps({"rows": rows, "table": table}, indent=2) + "\n").encode())
    atomic_write_text(out / "fidelity.md", markdown(table) + "\n")
    return table


def total_ranks(model) -> dict[str, int]:
    """Each adapted layer's total adapter rank r_total (MoSLD's expert count, so its rank, grows with depth)."""
    return {name: default_rank(layer, None) for name, layer in model.adapted_layers()}


def distil_every_task(run_dir: Path, calibration: int, log, rank_factors: tuple[float, ...] = RANK_FACTORS) -> dict:
    from mtpeft.app.pipeline import load_run

    model, tokenizer, kind, tasks, run = load_run(run_dir)
    r_total = total_ranks(model)
    limits = {name: min(layer.in_features, layer.out_features) for name, layer in model.adapted_layers()}
    rows = []
    for task_id, task in enumerate(tasks):
        started = time.perf_counter()
        calib, held, counts = task_statistics(model, tokenizer, kind, tasks, run, [task_id], calibration, task_id)
        stats_s = time.perf_counter() - started
        mixture = _mixture_score(run_dir, model, tokenizer, kind, tasks, run, task.name)
        for mode in MODES:
            previous = None  # (update per layer, score) of the last rank scored in this mode
            for factor in rank_factors:
                ranks = {n: min(max(1, round(factor * r)), limits[n]) for n, r in r_total.items()}
                started = time.perf_counter()
                factors, details = fit_factors(model, calib, task=task_id, rank=ranks, ridge=DEFAULT_RIDGE, mode=mode)
                fit_s = time.perf_counter() - started
                report = fidelity_report(model, factors, details, calib, held, mode=mode, task=task_id,
                                         ridge=DEFAULT_RIDGE)
                updates = {name: b @ a for name, (a, b) in factors.items()}  # (d_out, d_in) per layer
                started = time.perf_counter()
                if previous is not None and _same_updates(updates, previous[0]):
                    # The update's output lies in the span of the experts' B columns (rank <= r_total), so
                    # a larger R adds only zero singular values: the same LoRA, scored once.
                    score, same = previous[1], True
                else:
                    score, same = _score_distilled(model, factors, report, task_id, task, tokenizer, kind, tasks,
                                                   run), False
                previous = (updates, score)
                score_s = time.perf_counter() - started
                rank = sum(ranks.values()) / len(ranks)  # the mean over layers (one value unless MoSLD)
                rows.append({"task": task.name, "mode": mode, "rank_factor": factor, "rank": rank,
                             "r_total": sum(r_total.values()) / len(r_total), "mixture": mixture, "distilled": score,
                             "same_update_as_smaller_rank": same,
                             "mean_error": report["mean_error"], "max_error": report["max_error"],
                             "statistics_s": stats_s, "fit_s": fit_s, "score_s": score_s, **counts})
                log(f"fidelity: {run_dir.name} {task.name} {mode} R={rank:g}: mixture {mixture:.4f}, distilled "
                    f"{score:.4f}, held-out error {report['mean_error']:.3f}" + (" (same update)" if same else ""))
    return {"run": str(run_dir), "method": model.config.method, "rows": rows}


def _mixture_score(run_dir: Path, model, tokenizer, kind, tasks, run, name: str) -> float:
    """The run's own test score for the task (its metrics.json, written by the same evaluation on the same
    examples right after training); evaluated again only when the run has none."""
    metrics = json.loads((run_dir / "metrics.json").read_text()).get("tasks", {})
    if name in metrics:
        return metrics[name]["score"]
    return evaluate_tasks(model, tokenizer, kind, tasks, run, [name])["tasks"][name]["score"]


def _same_updates(a: dict, b: dict, tolerance: float = 1e-6) -> bool:
    return all(float((a[n] - b[n]).norm()) <= tolerance * max(float(b[n].norm()), 1e-30) for n in a)


def _score_distilled(model, factors, report, task_id, task, tokenizer, kind, tasks, run) -> float:
    """The task's test score of the LoRA written as `mtpeft export` writes it and loaded with stock PEFT."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "lora"
        write_distilled_folder(model, folder, factors, report, task=task_id,
                               labels=list(task.spec.labels or []) or None)
        scored = evaluate_tasks(stock_peft_model(model, folder), tokenizer, kind, tasks, run, [task.name])
    return scored["tasks"][task.name]["score"]


def with_averages(rows: list[dict]) -> list[dict]:
    """``rows`` plus, per method, seed and variant, a row "average" over the tasks (as the suite's table
    averages per seed first)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["seed"], r["mode"], r["rank_factor"]), []).append(r)
    averages = [{"method": m, "seed": s, "mode": mode, "rank_factor": f, "task": "average",
                 "rank": group[0]["rank"],
                 **{k: statistics.mean(r[k] for r in group) for k in ("mixture", "distilled", "mean_error")}}
                for (m, s, mode, f), group in groups.items()]
    return rows + averages


def summarise(rows: list[dict]) -> dict:
    """Per method and task (and their average): the mixture's score and each variant's, mean and std over
    seeds; the paired difference (distilled − mixture, same seed) and the held-out output error."""
    table = {}
    for r in with_averages(rows):
        entry = table.setdefault(r["method"], {}).setdefault(r["task"], {"mixture": {}, "variants": {}})
        entry["mixture"][r["seed"]] = r["mixture"]
        key = f"{r['mode']} x{r['rank_factor']:g}"
        entry["variants"].setdefault(key, {"rank": r["rank"], "score": {}, "error": {}})
        entry["variants"][key]["score"][r["seed"]] = r["distilled"]
        entry["variants"][key]["error"][r["seed"]] = r["mean_error"]
    for tasks in table.values():
        for entry in tasks.values():
            entry["mixture"] = _mean_std(list(entry["mixture"].values())) | {"by_seed": entry["mixture"]}
            for variant in entry["variants"].values():
                seeds = sorted(variant["score"])
                diffs = [variant["score"][s] - entry["mixture"]["by_seed"][s] for s in seeds]
                variant["difference"] = _mean_std(diffs)
                variant["error"] = _mean_std([variant["error"][s] for s in seeds])
                variant["score"] = _mean_std([variant["score"][s] for s in seeds]) | {"by_seed": variant["score"]}
    return table


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


SHORT = {"least_squares": "least squares", "routing_folded": "routing folded"}


def _variants(table: dict) -> list[tuple[str, float]]:
    """The (mode, rank factor) pairs the table holds, modes in MODES' order, ranks ascending."""
    keys = {k for tasks in table.values() for e in tasks.values() for k in e["variants"]}
    pairs = {(k.split(" x")[0], float(k.split(" x")[1])) for k in keys}
    return sorted(pairs, key=lambda p: (MODES.index(p[0]), p[1]))


def _variant_label(mode: str, factor: float) -> str:
    return f"{SHORT[mode]}, R = {'r/2' if factor == 0.5 else ('r' if factor == 1 else f'{factor:g}r')}"


def markdown(table: dict) -> str:
    """Two tables: the test score of the mixture and the change the distilled LoRA makes (points, paired
    by seed), per method and task; then the held-out relative output error, per method (mean over tasks)."""
    variants = _variants(table)
    head = ["method", "task", "mixture (%)"] + [_variant_label(m, f) for m, f in variants]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, tasks in table.items():
        for task, entry in tasks.items():
            cells = [method, task, _pct(entry["mixture"])]
            for mode, factor in variants:
                d = entry["variants"][f"{mode} x{factor:g}"]["difference"]
                cells.append(f"{100 * d['mean']:+.1f} ± {100 * d['std']:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| method | " + " | ".join(_variant_label(m, f) for m, f in variants) + " |",
              "|---|" + "---|" * len(variants)]
    for method, tasks in table.items():
        errors = [statistics.mean(e["variants"][f"{m} x{f:g}"]["error"]["mean"] for e in tasks.values())
                  for m, f in variants]
        lines.append(f"| {method} | " + " | ".join(f"{e:.3f}" for e in errors) + " |")
    return "\n".join(lines)


def _pct(stat: dict) -> str:
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="a study config (configs/study-encoder.yaml)")
    parser.add_argument("overrides", nargs="*", help="study overrides as for `mtpeft study`, e.g. seeds=[0]")
    parser.add_argument("--out", required=True, help="folder for the runs, the per-run rows and the table")
    parser.add_argument("--methods", nargs="+", required=True, help="the study's token-routed method names")
    parser.add_argument("--calibration", type=int, default=256, help="calibration examples per task (256)")
    parser.add_argument("--rank-factors", type=float, nargs="+", default=list(RANK_FACTORS),
                        help="R as multiples of each layer's total rank (0.5 1 2)")
    args = parser.parse_args()
    table = fidelity_study(load_study(args.study, args.overrides), Path(args.out), args.methods, args.calibration,
                           factors=tuple(args.rank_factors))
    print(markdown(table))


if __name__ == "__main__":
    main()
