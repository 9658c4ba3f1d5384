"""What every part of ``mtpeft bench`` shares: the section names, the task count, rounding, progress."""

from __future__ import annotations

import sys
import time

SECTIONS = ("layer", "train", "infer", "memory")
N_TASKS = 4  # tasks of the task-routed cases (mixed batches spread the rows over them)
# The layer section's methods with --quick (a default: --methods names any registered method).
QUICK_METHODS = ("moelora", "poly")


def log(args, msg: str) -> None:
    if not args.silent:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rounded(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


def rounded_ci(bounds: list[float]) -> list[float]:
    return [rounded(b) for b in bounds]
