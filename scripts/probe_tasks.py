"""Probe candidate tasks for a suite (issue 19): one single-task LoRA per BIG-bench task, at a suite's
adapter, learning rate, batch and length, scored on the task's test split against its majority class.

    python scripts/probe_tasks.py --steps 100 --out runs/probes hyperbaton epistemic_reasoning winowhy

A task is "learned" in the suites' sense when some method scores at least 10 points above the majority
class of its test split. Each probe is a run folder OUT/TASK-STEPS (skipped when it has metrics.json);
one line per task is printed and appended to OUT/probes.txt. The settings are the encoder suite's
(configs/study-encoder.yaml): MiniLM, LoRA r=8 on query and value, lr 0.002, batch 16, 96 tokens.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from mtpeft.app.data import load_tasks, task_from_dict
from mtpeft.app.pipeline import train_run
from mtpeft.app.run_config import run_config_from_dict


def probe(task: str, steps: int, out: Path, max_eval: int = 300) -> str:
    spec = {"name": task.replace("/", "_"), "source": f"bigbench:{task}", "kind": "classification",
            "metric": "accuracy"}
    run_dir = out / f"{spec['name']}-{steps}"
    if not (run_dir / "metrics.json").exists():
        train_run(run_config_from_dict({
            "method": "lora", "adapter": {"r": 8, "target_modules": ["query", "value"]},
            "output_dir": str(run_dir), "model": {"name": "minilm", "max_length": 96},
            "data": {"tasks": [spec], "seed": 0, "max_eval_examples": max_eval},
            "train": {"steps": steps, "batch_size": 16, "lr": 0.002, "seed": 0, "save_steps": 10 * steps,
                      "logging_steps": 50}}), log=lambda *a: None)
    score = json.loads((run_dir / "metrics.json").read_text())["tasks"][spec["name"]]["score"]
    data = load_tasks([task_from_dict(spec)], seed=0)[0]
    labels = [example["label"] for example in data.test[:max_eval]]  # the examples the run was scored on
    majority = collections.Counter(labels).most_common(1)[0][1] / len(labels)
    return (f"{task}: score {100 * score:.1f} %, majority {100 * majority:.1f} % ({100 * (score - majority):+.1f}), "
            f"{len(labels)} test examples, {len(data.train)} training examples, {steps} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="+", help="BIG-bench task names (subtasks as parent/sub)")
    parser.add_argument("--steps", type=int, default=100, help="training steps of 16 examples (100)")
    parser.add_argument("--out", default="runs/probes", help="folder for the probe runs (runs/probes)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        line = probe(task, args.steps, out)
        print(line, flush=True)
        with open(out / "probes.txt", "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
