"""``mtpeft report``: report.md and PNG plots for one or more run folders, side by side.

Plots: per-task scores (one bar group per task, one bar per run), training loss curves, and per run
the task x expert load heatmap (token-routed methods) or task x skill weights (task-routed methods).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from ..lib.io import atomic_write_text  # noqa: E402


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def read_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    metrics = _read_json(run_dir / "metrics.json")
    if metrics is None:
        raise FileNotFoundError(f"{run_dir} has no metrics.json; run `mtpeft train` (with evaluation) first.")
    if "tasks" not in metrics:
        raise ValueError(f"{run_dir}/metrics.json has no per-task scores (trained with --no-eval?); run "
                         f"`mtpeft eval {run_dir}` first.")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    return {"dir": run_dir, "label": _label(run_dir, metrics), "metrics": metrics, "config": config,
            "log": _read_json(run_dir / "log_history.json") or [], "routing": _read_json(run_dir / "routing.json")}


def _label(run_dir: Path, metrics: dict) -> str:
    return f"{run_dir.name} ({metrics.get('method', '?')})"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def plot_bar_groups(columns: list[str], bars: dict[str, tuple[list[float], list[float] | None]], path: Path,
                    ylabel: str, title: str | None = None, references: tuple[str, ...] = ()) -> None:
    """Write :func:`bar_groups_figure` to ``path``."""
    fig = bar_groups_figure(columns, bars, ylabel, title, references)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bar_groups_figure(columns: list[str], bars: dict[str, tuple[list[float], list[float] | None]], ylabel: str,
                      title: str | None = None, references: tuple[str, ...] = ()):
    """One group of bars per column, one bar per label (``bars``: label -> (heights, error bars or None));
    NaN heights leave a gap. Scores live in [0, 1]; each bar is labelled with its value. The labels in
    ``references`` (a majority class, chance) are drawn grey and hatched, apart from the methods' colours.
    The legend sits below the axes, where no bar can be, in as many columns as fit."""
    width = 0.85 / len(bars)
    many = len(bars) > 4  # then the values stand upright, so that neighbours' values do not collide
    fig, ax = plt.subplots(figsize=(max(7.0, len(columns) * max(1.6, 0.3 * len(bars))),
                                    4.2 + 0.25 * ((len(bars) + 2) // 3)), layout="constrained")
    # tab10 repeats its colours from the 11th bar on; tab20 gives up to 20 distinct ones
    methods = [label for label in bars if label not in references]
    colors = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20").colors
    for i, (label, (heights, errors)) in enumerate(bars.items()):
        style = (dict(color="0.8", hatch="///", edgecolor="0.45") if label in references
                 else dict(color=colors[methods.index(label) % len(colors)]))
        container = ax.bar(np.arange(len(columns)) + i * width, heights, width, yerr=errors,
                           capsize=1.5 if errors else 0, label=label, **style)
        ax.bar_label(container, labels=["" if np.isnan(h) else f"{h:.2f}" for h in heights],
                     padding=2, fontsize=6 if many else 7, rotation=90 if many else 0)
    ax.set_xticks(np.arange(len(columns)) + width * (len(bars) - 1) / 2, columns, rotation=15, ha="right")
    ax.set_ylim(0, 1.15 if many else 1.08)  # room for the value above a bar at 1.0
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.legend(loc="outside lower center", fontsize=7, ncol=min(len(bars), 3), frameon=False)
    return fig


def plot_scores(runs: list[dict], path: Path) -> None:
    tasks = list(dict.fromkeys(t for r in runs for t in r["metrics"]["tasks"]))
    bars = {run["label"]: ([run["metrics"]["tasks"].get(t, {}).get("score", np.nan) for t in tasks]
                           + [run["metrics"]["average"]], None) for run in runs}
    plot_bar_groups(tasks + ["average"], bars, path, ylabel="score", title="per-task test score")


def plot_losses(runs: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        points = [(e["step"], e["loss"]) for e in run["log"] if "loss" in e and "step" in e]
        if points:
            ax.plot(*zip(*points), label=run["label"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (task + weighted aux)")
    ax.set_title("loss curves")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_routing(run: dict, path: Path) -> None:
    """Write :func:`routing_figure` to ``path``."""
    fig = routing_figure(run)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def routing_figure(run: dict):
    """Task x expert (or skill) heatmap; the title is wrapped to the figure's width, which follows the
    matrix size."""
    import textwrap

    routing = run["routing"]
    matrix = np.array(routing["matrix"])
    fig_width = max(4.5, 1.8 + 0.7 * matrix.shape[1])
    fig, ax = plt.subplots(figsize=(fig_width, 1.6 + 0.5 * matrix.shape[0]), layout="constrained")
    image = ax.imshow(matrix, cmap="viridis", aspect="auto")
    ax.set_xticks(range(matrix.shape[1]), routing["cols"], rotation=30, ha="right")
    ax.set_yticks(range(matrix.shape[0]), routing["rows"])
    middle = (matrix.min() + matrix.max()) / 2
    for (i, j), value in np.ndenumerate(matrix):  # dark text on viridis' bright (yellow) end
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="k" if value > middle else "w", fontsize=7)
    # ~0.55 em per character at 8 pt: characters that fit on one line of the figure's width
    chars = int(fig_width * 72 / (8 * 0.55))
    title = "\n".join(textwrap.fill(line, chars) for line in (run["label"], routing["title"]))
    fig.suptitle(title, fontsize=8)
    fig.colorbar(image, ax=ax)
    return fig


def score_table(runs: list[dict]) -> str:
    tasks = list(dict.fromkeys(t for r in runs for t in r["metrics"]["tasks"]))
    header = "| run | " + " | ".join(tasks) + " | average | trainable params | s/step |"
    lines = [header, "|" + "---|" * (len(tasks) + 4)]
    for run in runs:
        m = run["metrics"]
        cells = [f"{m['tasks'][t]['score']:.4f}" if t in m["tasks"] else "–" for t in tasks]
        params = sum((m.get("trainable_parameters") or {}).values())
        step = m.get("seconds_per_step")
        lines.append(f"| {run['label']} | " + " | ".join(cells) + f" | {m['average']:.4f} | {params:,} | "
                     + (f"{step:.3f}" if step else "–") + " |")
    metrics = {t: r["metrics"]["tasks"][t]["metric"] for r in runs for t in r["metrics"]["tasks"]}
    lines.append("")
    lines.append("Metrics: " + ", ".join(f"{t}: {m}" for t, m in metrics.items()) + ".")
    return "\n".join(lines)


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """Write ``out/report.md`` and its PNGs; returns the report's path."""
    runs = [read_run(d) for d in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_scores(runs, out / "scores.png")
    plot_losses(runs, out / "loss.png")
    lines = ["# mtpeft report", "", "## Per-task test scores", "", score_table(runs), "",
             "![scores](scores.png)", "", "## Training loss", "", "![loss](loss.png)", ""]
    routed = [r for r in runs if r["routing"]]
    if routed:
        lines += ["## How tasks use the experts / skills", ""]
        for run in routed:
            name = f"routing_{_slug(run['dir'].name)}.png"
            plot_routing(run, out / name)
            lines += [f"### {run['label']}", "", run["routing"]["title"] + ".", "", f"![routing]({name})", ""]
    lines += ["## Runs", ""]
    for run in runs:
        cfg = run["config"]
        lines.append(f"- `{run['dir']}`: method `{cfg.get('method')}`, model `{(cfg.get('model') or {}).get('name')}`, "
                     f"adapter {cfg.get('adapter') or {}}, {(cfg.get('train') or {}).get('steps')} steps")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
