"""Multiple choice for encoders: score the options by position.

An encoder with one classification head per task cannot score free-form options one by one without a
second model shape, so a multiple-choice task becomes classification over option positions: the text
carries the question followed by its lettered options, and the head predicts the letter. With
options shuffled per example (mtpeft.app.data.tasks does this from the seed), the position carries no
prior. Causal LMs do not need this: they score each option by log-likelihood.
"""

from __future__ import annotations

import dataclasses
import string

from .tasks import TaskData


def _as_positions(row: dict, sep: str) -> dict:
    options = " ".join(f"({string.ascii_uppercase[i]}) {c}" for i, c in enumerate(row["choices"]))
    return {"text": f"{row['text']}{sep}{options}", "label": int(row["label"])}


def choices_as_classification(task: TaskData, sep: str = " [SEP] ") -> TaskData:
    """The same task as classification over option letters (A, B, ...); other kinds pass through."""
    if task.kind != "multiple_choice":
        return task
    width = max(len(r["choices"]) for split in task.splits.values() for r in split)
    spec = dataclasses.replace(task.spec, kind="classification", metric="accuracy",
                               labels=list(string.ascii_uppercase[:width]))
    splits = {name: [_as_positions(r, sep) for r in rows] for name, rows in task.splits.items()}
    return TaskData(spec=spec, instruction=task.instruction, **splits)
