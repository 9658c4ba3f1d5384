"""Test scores of a run's base model with no adapter training, scored as the run's evaluation scores.

    python scripts/zero_shot.py results/study-causal/lora-seed0/config.yaml results/study-causal/zero-shot

The model is wrapped in a LoRA at its initialisation (B = 0: exactly the bare model) so that the
evaluation code is the one every run uses. Writes OUT/eval_test.json.
"""

import argparse
import json
from pathlib import Path

import torch

import mtpeft
from mtpeft.app.base_models import build_base, model_kind
from mtpeft.app.pipeline import evaluate_run_model, load_run_tasks
from mtpeft.app.run_config import load_run_config
from mtpeft.lib.io import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a run's config.yaml (model, tasks, evaluation settings)")
    parser.add_argument("out", help="folder for eval_test.json")
    args = parser.parse_args()
    run = load_run_config(args.config)
    kind = model_kind(run.model.name, run.model.kind)
    if kind != "causal":
        raise SystemExit("zero_shot.py scores causal LMs (an encoder's task heads are untrained without a run).")
    tasks = load_run_tasks(run)
    base, tokenizer = build_base(run.model.name, kind, tasks, seed=run.train.seed)
    model = mtpeft.get_model(base, mtpeft.LoraConfig(r=8))
    with torch.no_grad():
        assert all(float(p.abs().max()) == 0 for n, p in model.named_parameters() if "lora_B" in n)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scores = evaluate_run_model(model, tokenizer, kind, tasks, run, out)
    atomic_write_text(out / "eval_test.json", json.dumps(scores, indent=2) + "\n")
    print(json.dumps({t: r["score"] for t, r in scores["tasks"].items()}))


if __name__ == "__main__":
    main()
