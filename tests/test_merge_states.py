"""The states of a wrapped model x its public operations: docs/reliability.md, "States of a wrapped model".

``TABLE`` below is that table: for each operation, what it does in each state ("works", or the error type
and a phrase of its message). ``test_the_docs_table_is_this_table`` parses the docs' table and requires it
to equal ``TABLE``, and ``test_state_table`` runs every cell on a tiny Llama with per-task LoRA (3 tasks,
merged state = merged on task 1): a refusal is checked with ``refused`` (type, message, model untouched).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_reliability import randomise, refused
from tiny_models import BUILDERS, batch_for

import mtpeft
from mtpeft.lib.io import load_adapter_weights

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
STATES = ("unmerged", "merged on task t", "unloaded")
UNLOADED = ("RuntimeError", "was unloaded")
WORKS = "works"
ERRORS = {"ValueError": ValueError, "RuntimeError": RuntimeError}

TABLE = {  # operation: (unmerged, merged on task t = 1, unloaded)
    "forward (eval), ids of task t or none": (WORKS, WORKS, UNLOADED),
    "forward with ids of another task": (WORKS, ("ValueError", "merged for task 1, but the batch has task ids"),
                                         UNLOADED),
    "training step (train mode, gradients on)": (WORKS, ("RuntimeError", "the adapter is merged, so a training "
                                                         "forward"), UNLOADED),
    "generate": (WORKS, WORKS, UNLOADED),
    "merge(task=t)": (WORKS, WORKS, UNLOADED),
    "merge(task=another)": (WORKS, ("ValueError", "already merged for task 1; call unmerge()"), UNLOADED),
    "unmerge()": (WORKS, WORKS, WORKS),
    "save_pretrained": (WORKS, WORKS, UNLOADED),
    "load_adapter_weights": (WORKS, ("ValueError", "merged for task 1; call model.unmerge() before "
                                                   "load_adapter_weights"), UNLOADED),
    "add_tasks": (WORKS, ("ValueError", "merged for task 1; call model.unmerge() before add_tasks"), UNLOADED),
    "export_lora(task=t)": (WORKS, WORKS, UNLOADED),
    "disable_adapters()": (WORKS, ("ValueError", "merged for task 1; call model.unmerge() before "
                                                 "disable_adapters"), UNLOADED),
    "reset_adapter_parameters()": (WORKS, ("ValueError", "merged for task 1; call model.unmerge() before "
                                                         "reset_adapter_parameters"), UNLOADED),
    "unload()": (WORKS, WORKS, WORKS),
}


def _saved(tmp_path: Path) -> Path:
    model = mtpeft.get_model(BUILDERS["llama"](seed=3), mtpeft.TaskLoraConfig(r=4, n_tasks=3))
    randomise(model, seed=5)
    model.save_pretrained(tmp_path / "other")
    return tmp_path / "other"


def _train_step(model):  # the model is put in train mode before (refused checks the mode is unchanged)
    ids = batch_for("llama")["input_ids"]
    model(**batch_for("llama"), labels=ids, task_ids=torch.tensor([1, 1, 1, 1])).loss.backward()


def _disabled_forward(model):
    with torch.no_grad(), model.disable_adapters():
        model(**batch_for("llama"), task_ids=torch.tensor([1] * 4))


ACTIONS = {
    "forward (eval), ids of task t or none": lambda m, d: m(**batch_for("llama"), task_ids=torch.tensor([1] * 4)),
    "forward with ids of another task": lambda m, d: m(**batch_for("llama"), task_ids=torch.tensor([1, 0, 1, 2])),
    "training step (train mode, gradients on)": lambda m, d: _train_step(m),
    "generate": lambda m, d: m.generate(input_ids=batch_for("llama")["input_ids"], max_new_tokens=2,
                                        do_sample=False, task_ids=torch.tensor([1] * 4)),
    "merge(task=t)": lambda m, d: m.merge(task=1),
    "merge(task=another)": lambda m, d: m.merge(task=2),
    "unmerge()": lambda m, d: m.unmerge(),
    "save_pretrained": lambda m, d: m.save_pretrained(d / "saved"),
    "load_adapter_weights": lambda m, d: load_adapter_weights(m, d / "other"),
    "add_tasks": lambda m, d: m.add_tasks(1),
    "export_lora(task=t)": lambda m, d: m.export_lora(d / "export", task=1),
    "disable_adapters()": lambda m, d: _disabled_forward(m),
    "reset_adapter_parameters()": lambda m, d: m.reset_adapter_parameters(),
    "unload()": lambda m, d: m.unload(),
}


def model_in(state: str):
    model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.TaskLoraConfig(r=4, n_tasks=3))
    randomise(model)
    model.eval()
    if state == "merged on task t":
        model.merge(task=1)
    elif state == "unloaded":
        model.unload()
    return model


def _docs_table() -> dict[str, tuple]:
    """The table under "## States of a wrapped model": op -> one cell per state, each WORKS or (error, phrase)
    from a cell written `works ...` or `ErrorType: "phrase" ...`."""
    text = DOCS.read_text()
    section = text.split("## States of a wrapped model", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    table = {}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        op, cells = cells[0].strip("`"), cells[1:]
        parsed = []
        for cell in cells:
            if cell.startswith("works"):
                parsed.append(WORKS)
            else:
                m = re.match(r'(\w+): "(.+?)"', cell)
                assert m, f"docs cell {cell!r} of {op!r} is neither `works ...` nor `Error: \"phrase\"`"
                parsed.append((m.group(1), m.group(2).replace("\\|", "|")))
        table[op] = tuple(parsed)
    return table


def test_the_docs_table_is_this_table():
    assert _docs_table() == TABLE


CELLS = [(op, state) for op in TABLE for state in STATES]


@pytest.mark.parametrize("op, state", CELLS, ids=[f"{op}-{state}" for op, state in CELLS])
def test_state_table(tmp_path, op, state):
    if op == "load_adapter_weights":
        _saved(tmp_path)  # written before the snapshot
    model = model_in(state)
    if op.startswith("training step"):
        model.train()
    expected = TABLE[op][STATES.index(state)]
    if expected == WORKS:
        ACTIONS[op](model, tmp_path)
        return
    error, phrase = expected
    refused(lambda: ACTIONS[op](model, tmp_path), ERRORS[error], re.escape(phrase), model, tmp_path)
