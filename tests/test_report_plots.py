"""The report's PNGs, drawn at the size they are written: every score bar carries its value, the
legend covers no bar when runs are compared, the routing title fits inside its figure."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest

from mtpeft.app.report import bar_groups_figure, plot_bar_groups, routing_figure

TASKS = ["bbc_news", "multiemo", "intent_recognition", "average"]


def drawn(fig):
    fig.canvas.draw()  # lays the figure out exactly as savefig does
    return fig.canvas.get_renderer()


def bar_patches(fig):
    return [p for p in fig.axes[0].patches if p.get_height() > 0]


@pytest.mark.parametrize("n_runs", [1, 2, 11])
def test_score_bars_carry_values_and_the_legend_covers_none(n_runs):
    rng = np.random.default_rng(n_runs)
    bars = {f"run{i} (method{i})": (list(rng.uniform(0.2, 1.0, len(TASKS))), None) for i in range(n_runs)}
    first = next(iter(bars))
    bars[first][0][0] = 1.0  # a perfect score still has room for its value
    bars[first][0][1] = math.nan  # a task the run lacks: a gap, no "nan" label
    fig = bar_groups_figure(TASKS, bars, ylabel="score", title="per-task test score")
    try:
        renderer = drawn(fig)
        texts = [t.get_text() for t in fig.axes[0].texts]
        expected = [f"{h:.2f}" for heights, _ in bars.values() for h in heights if not math.isnan(h)]
        assert sorted(t for t in texts if t) == sorted(expected) and "nan" not in texts
        legend = fig.legends[0].get_window_extent(renderer)
        for patch in bar_patches(fig):
            assert not legend.overlaps(patch.get_window_extent(renderer)), patch
        figure_box = fig.bbox
        for text in [t for t in fig.axes[0].texts if t.get_text()]:  # every value inside axes and figure
            box = text.get_window_extent(renderer)
            assert fig.axes[0].bbox.contains(box.x0, box.y1) and figure_box.contains(box.x1, box.y1), text
        colors = {tuple(p.get_facecolor()) for p in bar_patches(fig)}
        assert len(colors) == n_runs  # one colour per run, none repeated
    finally:
        plt.close(fig)


@pytest.mark.parametrize("n_cols", [2, 4, 8])
def test_routing_title_fits_inside_the_figure(n_cols):
    run = {"label": "poly-with-a-long-run-name (poly)",
           "routing": {"title": "task x skill weights (eval mode), averaged over adapted modules",
                       "matrix": np.full((3, n_cols), 1 / n_cols).tolist(), "rows": TASKS[:3],
                       "cols": [f"skill {j}" for j in range(n_cols)]}}
    fig = routing_figure(run)
    try:
        renderer = drawn(fig)
        title = fig._suptitle
        box = title.get_window_extent(renderer)
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1, (box, fig.bbox)
        assert "averaged over adapted modules" in " ".join(title.get_text().split())
    finally:
        plt.close(fig)


def test_plot_bar_groups_writes_the_png(tmp_path):
    path = tmp_path / "scores.png"
    plot_bar_groups(TASKS, {"a (lora)": ([0.5, 0.6, 0.7, 0.6], None)}, path, ylabel="score")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
