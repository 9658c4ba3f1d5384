"""``mtpeft bench``'s command line: parse, run the sections, write and print the results."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .common import QUICK_METHODS, SECTIONS, log
from .report import evaluate_targets, markdown_tables, print_tables
from .timing import CLOCK, CLOCKS, load_average, machine_info, set_threads

# The sections (.cases, .layer, .train, .infer, .memory) import torch and the models: they are
# imported where they run, so that `mtpeft bench --help` answers without loading torch.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtpeft bench", description=__doc__.splitlines()[0])
    p.add_argument("sections", nargs="*", default=[], metavar="{layer,train,infer,memory,all}",
                   help="sub-benchmarks to run (default: all)")
    p.add_argument("--quick", action="store_true", help="small shapes, MiniLM only, 2 rounds: under a minute")
    p.add_argument("--models", default=None, help="comma-separated: minilm,smollm2 (default: both; --quick: minilm)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 7; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per case first (default 2; --quick 1)")
    p.add_argument("--extra-rounds", type=int, default=None,
                   help="rounds added at most while samples are contended by other processes (default: "
                        "--repeats; --quick: 0)")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="train: only the groups of these comma-separated cases (e.g. lora_r8,poly,moelora), to give "
                        "a few comparisons many rounds (--repeats 40)")
    p.add_argument("--methods", default=None, metavar="NAMES",
                   help="comma-separated registered methods for the layer section (default: every method with a "
                        "sized_config; --quick: " + ",".join(QUICK_METHODS) + "); the train section adds a case "
                        "for each one it does not already have")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default 2; --quick: 1, as a smoke test on a shared machine, where "
                        "two OpenMP threads competing with other jobs wait on each other)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time (default) or this process's CPU time (for a busy machine, with --threads 1)")
    p.add_argument("--out", default=None, help="write the full results (with every sample) as JSON here")
    p.add_argument("--json", action="store_true", help="print the full results as JSON instead of the tables")
    p.add_argument("--silent", action="store_true", help="no progress messages on stderr")
    p.add_argument("--show", default=None, metavar="FILE.json",
                   help="print the tables of a saved run (--out) instead of measuring")
    p.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    return p


def run(args) -> dict:
    from .cases import MODELS
    from .infer import bench_infer
    from .layer import bench_layer
    from .memory import bench_memory
    from .train import bench_train

    unknown = [s for s in args.sections if s not in SECTIONS + ("all",)]
    if unknown:
        raise ValueError(f"unknown sub-benchmark {unknown[0]!r}; choose from {list(SECTIONS) + ['all']}.")
    sections = [s for s in SECTIONS if s in args.sections or "all" in args.sections or not args.sections]
    args.models = (args.models.split(",") if args.models else (["minilm"] if args.quick else ["minilm", "smollm2"]))
    for m in args.models:
        if m not in MODELS:
            raise ValueError(f"unknown model {m!r}; choose from {sorted(MODELS)}.")
    args.only = args.only.split(",") if isinstance(args.only, str) else args.only
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.extra_rounds is None:
        args.extra_rounds = 0 if args.quick else args.repeats
    args.threads = args.threads or (1 if args.quick else 2)
    set_threads(args.threads)
    CLOCK["now"] = CLOCKS[args.clock]
    res: dict[str, Any] = {"meta": machine_info(args.threads)}
    res["meta"].update(quick=args.quick, clock=args.clock, sections=sections, models=args.models, repeats=args.repeats,
                       warmup=args.warmup, only=args.only, load_average_start=load_average())
    t0 = time.time()
    fns = {"layer": bench_layer, "train": bench_train, "infer": bench_infer, "memory": bench_memory}
    for s in sections:
        log(args, f"section {s}, load average {load_average()}")
        res[s] = fns[s](args)
    res["meta"].update(load_average_end=load_average(), wall_s=round(time.time() - t0, 1))
    res["targets"] = evaluate_targets(res)
    return res


def summary(res: dict) -> dict:
    """The ratios without the raw samples (what is printed as JSON)."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items()
                    if k not in ("samples_s", "contended", "foreign_cpu_share", "calls_per_sample", "generate",
                                 "timings")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip(res)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from .train import fill_intervals

    if args.show:  # a saved run: the same printing, no measuring
        res = json.loads(Path(args.show).read_text())
        if fill_intervals(res):  # saved before intervals were reported: from its raw samples
            res["targets"] = evaluate_targets(res)
    else:
        threads = torch.get_num_threads()
        try:
            res = run(args)
        finally:
            torch.set_num_threads(threads)  # in-process callers (tests) get their setting back
        if args.out:
            path = Path(args.out)
            path.parent.mkdir(parents=True, exist_ok=True)
            from ...lib.io import atomic_write_text  # torch: not at import (`--help` stays light)

            atomic_write_text(path, json.dumps(res, indent=1) + "\n")
            log(args, f"wrote {path}")
    if args.json:
        print(json.dumps(summary(res), indent=1))
    elif args.markdown:
        print(markdown_tables(res), end="")
    else:
        print_tables(res)
        print(json.dumps({"meta": res["meta"], "targets": res["targets"]}, indent=1))
    return 0

