"""New tasks after multi-task training (issue 19): a suite's multi-task runs adapted to tasks held out from
it with k examples each, against a fresh LoRA on the same k examples and the multi-task LoRA trained
further (mtpeft.app.adapt; the Polytropon / C-Poly claim of sample efficiency on unseen tasks).

    python scripts/adaptation_study.py configs/adapt-encoder.yaml          (resumable: rerun to continue)
    python scripts/adaptation_study.py configs/adapt-encoder.yaml --summary-only

The config is a study config (mtpeft study: output_dir, seeds, base, methods; the sources) plus
``held_out`` (task names), ``shots`` (k values) and ``adapt`` (steps, batch_size, lr: the same for every
arm and every k). Seed by seed: the sources are trained into OUT/sources (the study's own settings), then
every held-out task x k x arm is adapted into OUT/adapt/TASK/kK/ARM-seedS; a folder with metrics.json is
skipped. Arms: per task-routed source ``routing`` and ``full``; per other source ``further`` and ``fresh``.
OUT/adaptation.json, .md and .png hold the table (mean ± std over seeds) and the plot of score against k.
Times depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

from mtpeft.app.study import planned_runs, validate_study
from mtpeft.lib.io import atomic_write_bytes

ADAPT_KEYS = ("held_out", "shots", "adapt")


def load_adaptation_study(path) -> tuple[dict, dict]:
    """(the sources' study, the adaptation settings) of an adaptation config."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    missing = [k for k in ADAPT_KEYS if k not in data]
    if missing:
        raise SystemExit(f"{path}: an adaptation config needs {missing} beside the study keys.")
    adaptation = {k: data.pop(k) for k in ADAPT_KEYS}
    return validate_study(data, path), adaptation


def arms(method: str) -> list[str]:
    from mtpeft.lib.config import get_method_spec

    return ["routing", "full"] if get_method_spec(method).routing == "task" else ["further", "fresh"]


def adaptation_study(study: dict, adaptation: dict, log=print, train: bool = True) -> list[dict]:
    from mtpeft.app.adapt import AdaptSettings, adapt_run
    from mtpeft.app.pipeline import train_run
    from mtpeft.app.run_config import run_config_from_dict

    out = Path(study["output_dir"])
    sources = {**study, "output_dir": str(out / "sources")}
    sources.pop("single_task", None)
    rows = []
    for planned in planned_runs(sources):  # seed by seed, method by method
        source = Path(planned["config"]["output_dir"])
        seed, label = planned["seed"], planned["label"]
        if train and not (source / "adapter").exists():  # committed runs keep their small files only
            log(f"adaptation: training source {source.name}")
            train_run(run_config_from_dict(planned["config"]), evaluate=False, log=log)
        for task in adaptation["held_out"]:
            for shots in adaptation["shots"]:
                for mode in arms(planned["config"]["method"]):
                    run_dir = out / "adapt" / task / f"k{shots}" / f"{label}-{mode}-seed{seed}"
                    if train and not (run_dir / "metrics.json").exists():
                        started = time.perf_counter()
                        adapt_run(source, task, shots=shots, mode=mode, out=run_dir,
                                  settings=AdaptSettings(seed=seed, **adaptation["adapt"]), log=log)
                        log(f"adaptation: {run_dir.relative_to(out)} took {time.perf_counter() - started:.0f} s")
                    if (run_dir / "metrics.json").exists():
                        metrics = json.loads((run_dir / "metrics.json").read_text())
                        rows.append({"task": task, "shots": shots, "arm": f"{label}: {mode}", "seed": seed,
                                     "score": metrics["score"], "metric": metrics["result"]["metric"],
                                     "trained_parameters": metrics["trained_parameters"],
                                     "seconds_per_step": metrics["seconds_per_step"]})
    write_results(out, rows, adaptation)
    return rows


def summarise(rows: list[dict]) -> dict:
    """{task: {arm: {shots: {"mean", "std", "n", "seeds"}}}}."""
    cells: dict = {}
    for r in rows:
        cells.setdefault(r["task"], {}).setdefault(r["arm"], {}).setdefault(r["shots"], {})[r["seed"]] = r["score"]
    return {task: {arm: {k: {"mean": statistics.fmean(s.values()),
                             "std": statistics.stdev(s.values()) if len(s) > 1 else 0.0,
                             "n": len(s), "seeds": sorted(s)} for k, s in sorted(by_k.items())}
                   for arm, by_k in by_arm.items()}
            for task, by_arm in cells.items()}


def markdown(table: dict, rows: list[dict]) -> str:
    metric = {r["task"]: r["metric"] for r in rows}
    lines = []
    for task, by_arm in table.items():
        shots = sorted({k for by_k in by_arm.values() for k in by_k})
        lines += [f"{task} (test {metric[task]}, mean ± std over seeds; seeds per cell in brackets):", "",
                  "| arm | " + " | ".join(f"k = {k}" for k in shots) + " |", "|" + "---|" * (len(shots) + 1)]
        for arm, by_k in by_arm.items():
            lines.append(f"| {arm} | " + " | ".join(
                f"{100 * by_k[k]['mean']:.1f} ± {100 * by_k[k]['std']:.1f} ({by_k[k]['n']})" if k in by_k else "–"
                for k in shots) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() if lines else "No adaptation run has finished yet."


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(5.2 * len(table), 4.4), squeeze=False, layout="constrained")
    colors = plt.get_cmap("tab10").colors
    for ax, (task, by_arm) in zip(axes[0], table.items()):
        for i, (arm, by_k) in enumerate(by_arm.items()):
            ks = sorted(by_k)
            ax.errorbar(ks, [by_k[k]["mean"] for k in ks], yerr=[by_k[k]["std"] for k in ks], marker="o",
                        capsize=2, label=arm, color=colors[i % len(colors)],
                        linestyle="--" if arm.endswith(("fresh", "further")) else "-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({k for by_k in by_arm.values() for k in by_k}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("k (training examples of the new task)")
        ax.set_ylabel("test score (mean ± std over seeds)")
        ax.set_title(task)
        ax.set_ylim(0, 1)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out: Path, rows: list[dict], adaptation: dict) -> None:
    table = summarise(rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "adaptation.json", (json.dumps({"settings": adaptation, "rows": rows, "table": table},
                                                            indent=2) + "\n").encode())
    atomic_write_bytes(out / "adaptation.md", (markdown(table, rows) + "\n").encode())
    if table:
        plot(table, out / "adaptation.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="an adaptation config (configs/adapt-encoder.yaml)")
    parser.add_argument("--summary-only", action="store_true", help="train nothing: the table of what has finished")
    args = parser.parse_args()
    study, adaptation = load_adaptation_study(args.config)
    adaptation_study(study, adaptation, train=not args.summary_only)
    print((Path(study["output_dir"]) / "adaptation.md").read_text())


if __name__ == "__main__":
    main()
