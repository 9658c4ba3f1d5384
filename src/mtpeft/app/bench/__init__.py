"""``mtpeft bench``: speed and memory of every method, measured side by side in one run.

    mtpeft bench                          every sub-benchmark (layer, train, infer, memory), full size
    mtpeft bench train --models minilm    one sub-benchmark, one model
    mtpeft bench layer train --quick      small shapes, few repeats: under a minute (the smoke test)
    mtpeft bench --out benchmarks/results/full.json

What is measured (see docs/performance.md for the results and where the time goes):

* ``layer``  forward + backward of one adapted linear layer (base included, x requiring grad, a fixed
  random output gradient) on 2048 tokens, at d = 384 / 576 / 768, E in {4, 8}, r in {4, 8, 16}: each
  method's fast path vs its loop reference vs a plain LoRA of equal total rank, plus the same three
  without the base layer ("adapter only").
* ``train``  one optimizer step (forward, backward, AdamW step, zero_grad) of MiniLM (16 x 128 tokens,
  sequence classification) and SmolLM2-135M (4 x 128, causal LM): the floor, our LoRA, PEFT's LoRA,
  every method at its defaults, each method's LoRA of equal total rank, PEFT's Poly / MHR, task-routed
  methods on mixed- and single-task batches, with the FLOP-predicted ratio (torch's FlopCounterMode on
  the same step) beside each measured one.
* ``infer``  eval forward (and SmolLM2 ``generate``): the bare base model, merged per task, unmerged,
  and mixed-task batches of per-task LoRA vs PEFT's ``adapter_names`` path.
* ``memory`` peak resident memory of one training step, each method in a fresh subprocess.

How: ``torch.set_num_threads`` fixed (2 by default); every case of a group is warmed up, then the cases
are run round-robin (A B C, C B A, A B C, ...) so that a drift of the machine's speed hits all of them
alike; a ratio is the median over rounds of the ratio *within* a round, with a 95 % distribution-free
(sign-test) interval; a target's verdict is "met" or "missed" only when that interval lies on one side of
its bound, else "noise". Times are medians. Tests never assert a time; this package only reports.

Files: ``timing`` (rounds, contention, ratios and intervals), ``cases`` (models, batches, every variant),
one file per section (``train``, ``layer``, ``infer``, ``memory``), ``report`` (targets, tables) and
``cli`` (the command line).
"""

import importlib

# public name -> the submodule that defines it; imported on first use (PEP 562), so that
# `mtpeft bench --help` does not wait for torch and the models.
_EXPORTS = {
    **dict.fromkeys(("ANSWER_TOKENS", "MODELS", "Variant", "batch_for", "make_batch", "train_variants"), "cases"),
    **dict.fromkeys(("build_parser", "main", "run", "summary"), "cli"),
    "memory_child": "memory",
    **dict.fromkeys(("TARGETS", "evaluate_targets", "markdown_tables", "tables", "verdict"), "report"),
    **dict.fromkeys(("Timings", "interleaved", "median_ci"), "timing"),
    **dict.fromkeys(("only_groups", "train_groups"), "train"),
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "ANSWER_TOKENS", "MODELS", "TARGETS", "Timings", "Variant", "batch_for", "build_parser", "evaluate_targets",
    "interleaved", "main", "make_batch", "markdown_tables", "median_ci", "memory_child", "only_groups", "run",
    "summary", "tables", "train_groups", "train_variants", "verdict",
]
