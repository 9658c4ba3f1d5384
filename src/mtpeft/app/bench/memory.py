"""Section ``memory``: peak resident memory of one training step, each variant in a fresh process."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .cases import MODELS, batch_for, make_batch, train_step_fn, train_variants
from .common import log, rounded
from .timing import set_threads


def _rss_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def memory_child(payload: str) -> None:
    """Run in a fresh process: build one variant, run training steps, print peak memory as JSON."""
    opts = json.loads(payload)
    set_threads(opts["threads"])
    spec = MODELS[opts["model"]]
    base = spec.loader().train()
    for p in base.parameters():
        p.requires_grad_(False)
    batch = make_batch(spec, base.config.vocab_size, opts["batch"], opts["seq"])
    variants = {v.name: v for v in train_variants(spec, base, quick=False)}
    v = variants[opts["variant"]]
    torch.manual_seed(0)
    model = v.build(base).train()
    step = train_step_fn(model, batch_for(batch, v), v)
    step()  # warm-up: optimizer state, kernels' first-use buffers, thread pools
    gc.collect()
    before = _rss_kb("VmRSS")
    peaks = []
    for _ in range(opts["steps"]):
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        start = _rss_kb("VmRSS")
        step()
        gc.collect()
        peaks.append((_rss_kb("VmHWM") - start, _rss_kb("VmHWM")))
    print(json.dumps({"rss_before_kb": before, "step_peak_kb": max(p[0] for p in peaks),
                      "peak_rss_kb": max(p[1] for p in peaks)}))


def bench_memory(args) -> dict:
    results: dict[str, Any] = {}
    env = dict(os.environ)
    # Large allocations straight from mmap and back to the OS on free, so resident memory follows
    # what torch holds (glibc's dynamic threshold would otherwise keep freed blocks resident).
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS=str(args.threads))
    for model_name in args.models:
        spec = MODELS[model_name]
        batch_size, seq = (4, 64) if args.quick else (spec.batch, spec.seq)
        if args.quick:
            names = ["lora_r8", "task_lora"]
            refs = {"task_lora": "lora_r8"}
        else:
            base = spec.loader()
            names = [v.name for v in train_variants(spec, base, quick=False) if v.name != "moelora_loop"]
            refs = {v.name: v.lora_ref for v in train_variants(spec, base, quick=False)}
            del base
        rows = []
        measured = {}
        for name in names:
            payload = json.dumps({"model": model_name, "variant": name, "batch": batch_size, "seq": seq,
                                  "threads": args.threads, "steps": 2 if args.quick else 3})
            proc = subprocess.run([sys.executable, "-c", "import sys; from mtpeft.app.bench import memory_child; "
                                   "memory_child(sys.argv[1])", payload], capture_output=True, text=True, env=env,
                                  timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"memory benchmark of {name} failed:\n{proc.stderr[-3000:]}")
            measured[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            log(args, f"memory/{model_name}/{name}: {measured[name]}")
        for name in names:
            m = measured[name]
            row = {"name": name, "step_peak_mb": rounded(m["step_peak_kb"] / 1024, 1),
                   "peak_rss_mb": rounded(m["peak_rss_kb"] / 1024, 1), "rss_before_mb": rounded(m["rss_before_kb"] / 1024, 1)}
            ref = refs.get(name)
            if ref and ref in measured:
                row["lora_ref"] = ref
                row["step_peak_vs_lora"] = rounded(m["step_peak_kb"] / measured[ref]["step_peak_kb"])
                row["peak_rss_vs_lora"] = rounded(m["peak_rss_kb"] / measured[ref]["peak_rss_kb"])
            rows.append(row)
        results[model_name] = {"batch": [batch_size, seq], "rows": rows,
                               "how": "fresh subprocess per variant; VmHWM reset via /proc/self/clear_refs before "
                                      "each step; step_peak = VmHWM - VmRSS at the step's start (max over steps); "
                                      "MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the RSS"}
    return results
