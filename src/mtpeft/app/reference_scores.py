"""What a run's scored test examples allow without learning anything, per task:

* ``majority``: always predicting the most frequent gold label of those examples, scored with the task's
  own metric (accuracy, or macro-F1 for which this is one class's F1 over the classes present);
* ``chance``: the expected accuracy of a uniform guess among the options (1 / the number of labels, or
  of an example's choices for multiple choice); None for a macro-F1 task, whose expected score under a
  uniform guess is not an accuracy.

The result suites call a task *learned* when some method scores at least 10 points above its majority
class (issue 19): a suite column where every method sits at the majority class compares noise. Free-text
tasks (exact match of generated text) have neither reference and are left out.
"""

from __future__ import annotations

import collections
import statistics

from .evaluate import score_predictions, scored_rows
from .pipeline import load_run_tasks
from .run_config import RunConfig

LEARNED_MARGIN = 0.10  # a method this far above the majority class has learned the task


def reference_scores(run: RunConfig) -> dict[str, dict]:
    """``{task: {"majority": score, "chance": accuracy or None, "n": examples}}`` on the examples the
    run's final evaluation scores (the test split, the first ``data.max_eval_examples``)."""
    references = {}
    for task in load_run_tasks(run):
        rows = scored_rows(task, "test", run.data.max_eval_examples)
        if task.kind == "generation" or not rows:
            continue
        gold = [int(r["label"]) for r in rows]
        most_common = collections.Counter(gold).most_common(1)[0][0]
        majority = score_predictions(task, gold, [most_common] * len(gold))["score"]
        chance = None
        if task.spec.metric == "accuracy":
            chance = statistics.fmean(1 / len(r["choices"]) if "choices" in r else 1 / task.num_labels for r in rows)
        references[task.name] = {"majority": majority, "chance": chance, "n": len(rows)}
    return references


def unlearned_tasks(table: dict, majority: dict[str, float], margin: float = LEARNED_MARGIN) -> list[str]:
    """The tasks on which no row of a study table (mean over seeds) is ``margin`` above the majority class."""
    return [task for task, floor in majority.items()
            if not any(row["tasks"][task]["mean"] >= floor + margin for row in table.values() if task in row["tasks"])]
