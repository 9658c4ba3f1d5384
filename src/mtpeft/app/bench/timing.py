"""The measurement core: interleaved rounds, contention from /proc/stat, per-round ratios and their
confidence intervals, and what the machine is."""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (parallel work has started in this process)
        pass


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return []


def machine_info(threads: int) -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "memory_gb": mem_gb, "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft_version, "torch_threads": threads, "mkldnn": torch.backends.mkldnn.is_available(),
        "git_commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def _busy_jiffies() -> int:
    """CPU time (clock ticks) used by everything on the machine since boot (0 where /proc is missing)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return sum(v) - v[3] - v[4]  # all but idle and iowait
    except (OSError, ValueError, IndexError):
        return 0


def _own_jiffies() -> int:
    """CPU time (clock ticks) used by this process, all threads."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, ValueError, IndexError):
        return 0


HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class Timings:
    """Per-case samples (seconds per call) from one interleaved run, with a contention flag per sample.

    A sample is "contended" when other processes used more than 5% of the machine's CPUs while it ran
    (and at least 2 clock ticks): measured from /proc/stat minus this process's own CPU time. Medians
    and ratios use the clean samples when there are at least 2 of them, else all (and say so).
    """

    samples: dict[str, list[float]]
    contended: dict[str, list[bool]] = field(default_factory=dict)
    inner: dict[str, int] = field(default_factory=dict)
    foreign: dict[str, list[float]] = field(default_factory=dict)

    def _clean(self, name: str) -> list[float]:
        flags = self.contended.get(name) or [False] * len(self.samples[name])
        clean = [x for x, c in zip(self.samples[name], flags) if not c]
        return clean if len(clean) >= 2 else self.samples[name]

    def median(self, name: str) -> float:
        return statistics.median(self._clean(name))

    def round_ratios(self, a: str, b: str) -> list[float]:
        """t_a / t_b measured in the same round, for every round (drift cancels); rounds where either
        sample was contended are left out when at least 2 clean ones remain."""
        fa = self.contended.get(a) or [False] * len(self.samples[a])
        fb = self.contended.get(b) or [False] * len(self.samples[b])
        pairs = list(zip(self.samples[a], self.samples[b], fa, fb))
        clean = [x / y for x, y, ca, cb in pairs if not (ca or cb)]
        return clean if len(clean) >= 2 else [x / y for x, y, _, _ in pairs]

    def ratio(self, a: str, b: str) -> float:
        """Median over rounds of :meth:`round_ratios`."""
        return statistics.median(self.round_ratios(a, b))

    def ratio_ci(self, a: str, b: str, level: float = 0.95) -> list[float]:
        """A distribution-free confidence interval for :meth:`ratio` (the median of per-round ratios),
        from the order statistics of the same rounds (the sign-test interval)."""
        return median_ci(self.round_ratios(a, b), level)

    def spread(self, name: str) -> float:
        """(max - min) / median of the samples used: how noisy the case was."""
        s = self._clean(name)
        return (max(s) - min(s)) / statistics.median(s)

    def clean_count(self, name: str) -> int:
        return sum(not c for c in (self.contended.get(name) or [False] * len(self.samples[name])))


def median_ci(values: list[float], level: float = 0.95) -> list[float]:
    """[lo, hi] holding the median of the distribution ``values`` were drawn from with probability >=
    ``level``: the k-th smallest and k-th largest value, k from the binomial(n, 1/2) tail (no assumption
    on the distribution). Under 6 values no such pair exists at 95 %: then [min, max], which covers less."""
    s = sorted(values)
    n = len(s)
    tail, k = 0.0, 0
    for j in range(n):  # P(fewer than k+1 of n values lie below the median) must stay <= (1 - level) / 2
        tail += math.comb(n, j) / 2**n
        if tail > (1 - level) / 2:
            break
        k = j + 1
    k = max(k, 1)
    return [s[k - 1], s[n - k]]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = {"now": time.perf_counter}


def interleaved(cases: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                min_seconds: float = 0.0, extra_rounds: int | None = None) -> Timings:
    """Time every case ``repeats`` times, round-robin, after ``warmup`` calls each.

    With ``min_seconds`` a case that takes less is called several times per sample (the count is
    fixed after warm-up), so that short layer-level calls are not dominated by timer noise.
    The order alternates (A B C, C B A, ...) so that a linear drift hits every case alike.
    Rounds are added (at most ``extra_rounds``, default ``repeats``) until every case has ``repeats``
    samples taken while no other process competed for the CPUs.
    The clock is wall time (``--clock cpu``: this process's CPU time, for a machine shared with other
    jobs; with one thread it is nearly blind to them, but it hides time spent waiting).
    """
    now = CLOCK["now"]
    ncpu = os.cpu_count() or 1
    inner: dict[str, int] = {}
    for name, fn in cases.items():
        for _ in range(max(warmup, 1)):
            fn()
        k = 1
        if min_seconds > 0:
            t0 = now()
            fn()
            k = max(1, math.ceil(min_seconds / max(now() - t0, 1e-7)))
        inner[name] = k
    t = Timings({n: [] for n in cases}, {n: [] for n in cases}, inner, {n: [] for n in cases})
    names = list(cases)
    extra = repeats if extra_rounds is None else extra_rounds
    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()  # a cyclic-GC pass in the middle of one case's sample is noise, not its cost
    try:
        rep = 0
        while rep < repeats or (rep < repeats + extra and min(t.clean_count(n) for n in names) < repeats):
            for name in (names if rep % 2 == 0 else names[::-1]):
                fn, k = cases[name], inner[name]
                busy0, own0, w0 = _busy_jiffies(), _own_jiffies(), time.perf_counter()
                t0 = now()
                for _ in range(k):
                    fn()
                elapsed = now() - t0
                wall = time.perf_counter() - w0
                foreign = (_busy_jiffies() - busy0) - (_own_jiffies() - own0)
                share = foreign / max(wall * HZ * ncpu, 1e-9)
                t.samples[name].append(elapsed / k)
                t.foreign[name].append(round(share, 3))
                t.contended[name].append(foreign >= 2 and share > 0.05)
            gc.collect()
            rep += 1
    finally:
        if gc_was:
            gc.enable()
    return t


def raw_samples(t: Timings) -> dict:
    """The raw measurements kept in the JSON: every sample, its contention flag and foreign CPU share."""
    return {"samples_s": t.samples, "contended": t.contended, "foreign_cpu_share": t.foreign,
            "calls_per_sample": t.inner}


