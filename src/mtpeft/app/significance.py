"""Is a difference between two methods of a study larger than the noise? A paired comparison over seeds.

Every run of a study with the same seed sees the same data split, the same example order and the same
adapter initialisation seed, so two methods' scores on one seed are a pair, and the seed-to-seed spread
of their difference is the noise a claim has to beat. For methods A and B on one column (a task, or the
average over tasks), over the seeds both finished:

    d_s = score_A(s) - score_B(s),   mean d, sample std of d,   t = mean d / (std d / sqrt(n))

and the two-sided p-value of the paired t-test with n - 1 degrees of freedom (``scipy.stats.ttest_rel``).
A difference is called larger than the noise when p < 0.05. With three seeds that needs t > 4.30: the
seeds must agree closely, and most differences of a point or two will not pass. This is a statement about
the seeds (training noise on these splits), not about other datasets or other test examples. No
correction for multiple comparisons is made: in a table of 60 comparisons about three that are pure noise
come out below 0.05, so a single bold task cell is weak evidence; a claim should rest on the average
column or on the same sign across related cells.
"""

from __future__ import annotations

import math
import statistics

ALPHA = 0.05


def paired_difference(a: dict, b: dict) -> dict | None:
    """``a``, ``b``: seed -> score. None when fewer than two seeds are shared."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    if std == 0.0:  # identical differences on every seed: no spread to test against
        t, p = (math.copysign(math.inf, mean), 0.0) if mean else (0.0, 1.0)
    else:
        result = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
        t, p = float(result.statistic), float(result.pvalue)
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "std": std, "t": t, "p": p}


def claim(a: str, b: str, column: str, result: dict) -> str:
    """The sentence for one comparison, in points (scores x 100)."""
    per_seed = "/".join(f"{100 * d:+.1f}" for d in result["diffs"])
    verdict = ("larger than the seed noise" if result["p"] < ALPHA
               else "not larger than the seed noise")
    return (f"{a} vs {b} on {column}: {100 * result['mean']:+.1f} points (per seed {per_seed}, std "
            f"{100 * result['std']:.1f}; paired t-test over {len(result['seeds'])} seeds, p = {result['p']:.3f}): "
            f"{verdict}.")


def study_comparisons(table: dict, baselines: list[str]) -> dict:
    """Every method against each baseline present in ``table`` (mtpeft.app.study.summarise), per task
    and on the average: ``{baseline: {method: {column: paired_difference}}}``."""
    out = {}
    for baseline in (b for b in baselines if b in table):
        base = table[baseline]["per_seed"]
        for label, row in table.items():
            if label == baseline:
                continue
            columns = {t: (row["per_seed"]["tasks"][t], base["tasks"][t])
                       for t in row["per_seed"]["tasks"] if t in base["tasks"]}
            columns["average"] = (row["per_seed"]["average"], base["average"])
            results = {c: paired_difference(x, y) for c, (x, y) in columns.items()}
            results = {c: r for c, r in results.items() if r is not None}
            if results:
                out.setdefault(baseline, {})[label] = results
    return out


def comparisons_markdown(comparisons: dict) -> str:
    """One table per baseline: mean difference ± std over seeds, in points, with p; bold where p < 0.05."""
    if not comparisons:
        return "No comparison yet: one needs two or more seeds that both methods have finished."
    lines = [f"Paired over seeds (the same seeds, the same splits): mean difference ± std of the per-seed "
             f"differences, in points, and the paired t-test's p. **Bold**: p < {ALPHA} (larger than the seed noise). "
             f"Uncorrected for multiple comparisons: about 1 in 20 cells where nothing differs is bold by chance."]
    for baseline, rows in comparisons.items():
        columns = list(dict.fromkeys(c for results in rows.values() for c in results))
        lines += ["", f"Against `{baseline}`:", "", "| method | " + " | ".join(columns) + " |",
                  "|" + "---|" * (len(columns) + 1)]
        for label, results in rows.items():
            cells = []
            for column in columns:
                r = results.get(column)
                if r is None:
                    cells.append("–")
                    continue
                cell = f"{100 * r['mean']:+.1f} ± {100 * r['std']:.1f} (p {r['p']:.2f})"
                cells.append(f"**{cell}**" if r["p"] < ALPHA else cell)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
