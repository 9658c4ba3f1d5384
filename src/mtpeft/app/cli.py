"""The ``mtpeft`` command line: train, eval, report, export, adapt (and study, bench, see ``mtpeft bench --help``).

``mtpeft train`` with no config runs the embedded default: TeamLoRA on all-MiniLM-L6-v2 over three
real tasks (BBC News topics, BIG-bench multiemo sentiment and intent recognition), a few minutes on
two CPU cores, then prints per-task results and writes a report.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path


def _offline_defaults() -> None:
    # The Hugging Face Hub is never needed: every model and data set is local or a pip package.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_train(args) -> int:
    from .pipeline import train_run
    from .report import write_report
    from .run_config import load_run_config

    run = load_run_config(args.config, args.overrides)
    out = train_run(run, resume=not args.no_resume, evaluate=not args.no_eval)
    from ..lib.distributed import is_main_process

    if not args.no_eval and is_main_process():  # under torchrun, rank 0 writes the report
        report = write_report([out], out / "report")
        print(f"mtpeft: report written to {report}")
    print(f"mtpeft: run folder {out}")
    if is_main_process():
        from .export_run import export_command

        print(f"mtpeft: to serve it with stock PEFT / vLLM: {export_command(out, run)}")
    return 0


def cmd_eval(args) -> int:
    from .pipeline import eval_run

    eval_run(args.run_dir, split=args.split)
    return 0


def cmd_adapt(args) -> int:
    from .adapt import AdaptSettings, adapt_run

    settings = AdaptSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    metrics = adapt_run(args.run_dir, args.task, shots=args.shots, mode=args.mode, out=args.out, settings=settings)
    print(f"mtpeft adapt: {metrics['task']} ({args.shots} examples, mode {args.mode}): test "
          f"{metrics['result']['metric']} {100 * metrics['score']:.1f} %; written to {args.out}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "report"
    path = write_report([Path(d) for d in args.run_dirs], out)
    print(f"mtpeft: report written to {path}")
    return 0


def cmd_export(args) -> int:
    """Exact methods: the run's LoRA for the task (mtpeft.lib.export). Token-routed methods have no exact
    LoRA: they go to the distilled export (mtpeft.app.distill_run)."""
    import json

    from .export_run import ExportError, export_run, run_exports_exactly

    rank, calibration, all_tasks = args.rank, args.calibration, args.all_tasks
    if run_exports_exactly(args.run_dir):
        if rank is not None or calibration is not None or all_tasks or args.mode != "least_squares":
            raise SystemExit("mtpeft export: error: --rank, --calibration, --all-tasks and --mode are for distilled "
                             "exports of token-routed methods; this run's method exports its LoRA exactly: "
                             "leave them out.")
        try:
            out = export_run(args.run_dir, args.out, args.task)
        except (ExportError, FileNotFoundError) as err:  # one line, nothing written
            raise SystemExit(f"mtpeft export: error: {err}") from None
        how = "an exact"
    else:
        from .distill_run import distill_run

        out = distill_run(args.run_dir, args.out, task=args.task, all_tasks=all_tasks, rank=rank,
                          calibration=calibration, mode=args.mode)
        how = "a distilled"
    config = json.loads((Path(out) / "adapter_config.json").read_text())
    loader = {"CAUSAL_LM": "peft.AutoPeftModelForCausalLM.from_pretrained",
              "SEQ_2_SEQ_LM": "peft.AutoPeftModelForSeq2SeqLM.from_pretrained",
              "FEATURE_EXTRACTION": "peft.AutoPeftModelForFeatureExtraction.from_pretrained"}.get(
        config.get("task_type"), "peft.PeftModel.from_pretrained(base, ...)")
    head = " + head.safetensors (the task's classifier; see docs/guide.md)" if (Path(out) / "head.safetensors").exists() else ""
    print(f"mtpeft: wrote {how} PEFT LoRA to {out} for base {config.get('base_model_name_or_path')}; "
          f"load it with {loader}('{out}'){head}")
    return 0


def cmd_study(args) -> int:
    from .study import main as study_main

    return study_main(args.study_args)


def cmd_bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args.bench_args)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message names the problem and the fix: printed as one line, not a traceback.
    (Evaluated when an error is raised; the trainer's error is looked up only once its module is
    loaded, so that `mtpeft --help` does not import torch.)"""
    from .assets import AssetMissingError

    errors = [ValueError, FileNotFoundError, KeyError, TypeError, AssetMissingError]
    trainer = sys.modules.get("mtpeft.app.trainer")
    if trainer is not None:
        errors.append(trainer.NonFiniteLossError)
    return tuple(errors)


_PASS_THROUGH = {"study": cmd_study, "bench": cmd_bench}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtpeft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a multi-task adapter, evaluate it and write a report",
                           description="Train, evaluate per task, write the run folder and report.md. "
                                       "Without CONFIG: the embedded default (TeamLoRA, MiniLM, 3 real tasks).")
    train.add_argument("config", nargs="?", default=None,
                       help="YAML run config (see configs/); omit for the embedded default")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=50 adapter.r=4")
    train.add_argument("--no-resume", action="store_true", help="start afresh even if checkpoints exist")
    train.add_argument("--no-eval", action="store_true", help="skip the final evaluation and report")
    train.set_defaults(func=cmd_train)

    run_dir_help = "a run folder written by `mtpeft train` (it holds config.yaml and adapter/)"
    ev = sub.add_parser("eval", help="evaluate a run folder's adapter per task",
                        description="Load RUN_DIR's base model and final adapter, score every task on one split "
                                    "(the metric each task's config names), print the table and write "
                                    "RUN_DIR/eval_SPLIT.json.")
    ev.add_argument("run_dir", metavar="RUN_DIR", help=run_dir_help)
    ev.add_argument("--split", default="test", choices=["test", "validation", "train"],
                    help="which split to score (default: test)")
    ev.set_defaults(func=cmd_eval)

    rep = sub.add_parser("report", help="write report.md and plots for one or more run folders",
                         description="Write report.md with per-task score and training-loss plots (PNG) and, "
                                     "for routed methods, how each task uses the experts / skills. Several "
                                     "RUN_DIRs are compared side by side. Nothing is trained or evaluated: the "
                                     "runs' metrics.json, log_history.json and routing.json are read.")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help=run_dir_help + "; several to compare them")
    rep.add_argument("--out", default=None, help="output folder (default: the first RUN_DIR/report)")
    rep.set_defaults(func=cmd_report)

    exp = sub.add_parser("export", help="export a run's adapter (for one task) as a plain PEFT LoRA",
                         description="Write RUN_DIR's adapter as a plain PEFT LoRA (adapter_config.json + "
                                     "adapter_model.safetensors) that peft.PeftModel.from_pretrained, vLLM or "
                                     "LoRAX load, on the stock base model. Task-routed methods export one task "
                                     "at a time (--task), exactly. Token-routed methods (TeamLoRA, MoELoRA, "
                                     "MoSLD, HydraLoRA) are distilled: per layer, the fixed rank-R update that "
                                     "best reproduces the adapter's output on the task's training inputs, with "
                                     "fidelity.json (output error on held-out inputs, test scores of both).")
    exp.add_argument("run_dir", metavar="RUN_DIR", help=run_dir_help)
    exp.add_argument("--task", default=None, help="the task's name (never an index: a task may be named '1')")
    exp.add_argument("--out", required=True, help="folder to write adapter_config.json + safetensors to "
                     "(new or empty)")
    exp.add_argument("--rank", type=int, default=None, help="distilled export: rank R of every layer "
                     "(default: the layer's total adapter rank)")
    exp.add_argument("--calibration", type=int, default=None, help="distilled export: number of training "
                     "examples per task to fit on (default: the whole training split)")
    exp.add_argument("--all-tasks", action="store_true", help="distilled export: one LoRA for the whole "
                     "mixture (causal and seq2seq LMs, for serving when the task is unknown)")
    exp.add_argument("--mode", choices=["least_squares", "routing_folded"], default="least_squares",
                     help="distilled export: least-squares fit (default) or the baseline that fixes each "
                     "expert's mean gate weight for the task")
    exp.set_defaults(func=cmd_export)

    adapt = sub.add_parser("adapt", help="adapt a trained run to a new task from k examples",
                           description="Add a task the run was not trained on and train it alone on its first "
                                       "--shots training examples: routing only (task-routed methods), the "
                                       "whole adapter (full / further), or a fresh adapter of the run's method "
                                       "(fresh, the baseline). Scores the new task's test split; writes OUT with "
                                       "adapter/ and metrics.json. See mtpeft.app.adapt.")
    adapt.add_argument("run_dir", metavar="RUN_DIR", help=run_dir_help)
    adapt.add_argument("--task", required=True, help="the new task: a built-in task name (e.g. winowhy)")
    adapt.add_argument("--shots", type=int, required=True, help="number of its training examples to train on")
    adapt.add_argument("--mode", required=True, choices=["routing", "full", "further", "fresh"],
                       help="routing: only the new task's routing logits (Poly, MHR, C-Poly, MTL-LoRA); full: "
                       "add the task and train every adapter parameter; further: train a non-task-routed "
                       "adapter (LoRA) on; fresh: a freshly initialised adapter of the run's method")
    adapt.add_argument("--out", required=True, help="folder to write (new or empty)")
    adapt.add_argument("--steps", type=int, default=50, help="training steps (default 50, whatever --shots is)")
    adapt.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
    adapt.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 0.002)")
    adapt.add_argument("--seed", type=int, default=0, help="seed of the new task's split and of training (0)")
    adapt.set_defaults(func=cmd_adapt)

    study = sub.add_parser("study", help="every method x seed on a task suite, one results table "
                           "(see mtpeft study --help)", add_help=False)
    study.add_argument("study_args", nargs=argparse.REMAINDER)
    study.set_defaults(func=cmd_study)

    bench = sub.add_parser("bench", help="benchmark methods side by side (see mtpeft bench --help)",
                           add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PASS_THROUGH:
        # argparse.REMAINDER refuses a remainder that starts with an option (`mtpeft bench --quick`):
        # these sub-commands parse their own arguments, so hand them everything after their name.
        command, func = argv[0], _PASS_THROUGH[argv[0]]
        args = argparse.Namespace(command=command, func=func, **{f"{command}_args": argv[1:]})
    else:
        args = build_parser().parse_args(argv)
    if args.command == "train" and args.config is not None and "=" in args.config:
        args.overrides.insert(0, args.config)  # `mtpeft train train.steps=5`: overrides on the default
        args.config = None
    try:
        code = args.func(args)
        _leave_process_group()
        return code
    except BaseException as err:
        message = _one_line_message(err)
        if message is None or os.environ.get("MTPEFT_DEBUG"):
            raise  # a bug (or MTPEFT_DEBUG=1): the full traceback
        print(f"mtpeft {args.command}: error: {message}", file=sys.stderr)
        return 2


def _leave_process_group() -> None:
    """Under torchrun a command that trained has joined a process group (pipeline.train_run): leave it
    before Python exits, as torchtune's recipes do, so that no gloo / NCCL thread outlives the
    interpreter and NCCL does not warn of a leak. Only after success: a rank that failed leaves at
    once (torchrun then stops its peers) rather than wait for them at the barrier on the way out.
    Looks in sys.modules so that a command that never imported torch does not import it here."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        from ..lib.distributed import destroy_distributed

        destroy_distributed()


# What to do about an OSError, by errno (the message names the path).
_OS_ERROR_FIXES = {
    errno.ENOSPC: "free disk space there, or choose another output folder",
    errno.EDQUOT: "free disk space there, or choose another output folder",
    errno.EROFS: "the file system is read-only; choose another output folder",
    errno.EACCES: "choose a folder you may write to",
    errno.EPERM: "choose a folder you may write to",
    errno.ENOTDIR: "a part of the path is a file; choose another path",
    errno.EISDIR: "the path is a folder; pass a file",
    errno.EEXIST: "the path exists; choose another one",
    errno.ENOENT: "check the path",
}


def _one_line_message(err: BaseException) -> str | None:
    """The one line to print for an error whose message names the problem and the fix, or None for
    anything else (a bug keeps its traceback). An OSError counts when it names its path."""
    if isinstance(err, _user_errors()):
        return err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, OSError) and (err.filename is not None or err.errno in _FULL_OR_READ_ONLY):
        fix = _OS_ERROR_FIXES.get(err.errno, "check the path")
        where = f"cannot use {err.filename}: " if err.filename is not None else "cannot write: "
        return f"{where}{err.strerror or err}; {fix}. (MTPEFT_DEBUG=1 shows the traceback.)"
    return None


# Errors of the machine, not of mtpeft, even when the OS does not say which file (a write to an open file).
_FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


if __name__ == "__main__":
    sys.exit(main())
