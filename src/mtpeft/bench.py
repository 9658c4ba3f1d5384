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
alike; a ratio is the median over rounds of the ratio *within* a round; times are medians. Tests never
assert a time; this module only reports.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

SECTIONS = ("layer", "train", "infer", "memory")
N_TASKS = 4

# The targets: (name, comparison, bound). "<=": ratio must not exceed it; ">=": at least it.
TARGETS = {
    "lora_vs_floor": ("<=", 1.05),
    "lora_vs_peft_lora": ("<=", 0.98),
    "token_routed_vs_equal_rank_lora": ("<=", 1.10),
    "token_routed_vs_floor": ("<=", 1.15),
    "task_routed_mixed_vs_lora": ("<=", 1.05),
    "poly_mhr_vs_peft": ("<=", 0.98),
    "reference_loop_vs_fast_path_E8": (">=", 2.0),
    "merged_vs_base_inference": ("<=", 1.02),
    "peak_train_memory_vs_lora": ("<=", 1.10),
}


# =============================================================================== measurement core


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

    def ratio(self, a: str, b: str) -> float:
        """Median over rounds of t_a / t_b measured in the same round (drift cancels); rounds where
        either sample was contended are left out when at least 2 clean ones remain."""
        fa = self.contended.get(a) or [False] * len(self.samples[a])
        fb = self.contended.get(b) or [False] * len(self.samples[b])
        pairs = list(zip(self.samples[a], self.samples[b], fa, fb))
        clean = [x / y for x, y, ca, cb in pairs if not (ca or cb)]
        return statistics.median(clean if len(clean) >= 2 else [x / y for x, y, _, _ in pairs])

    def ratio_ci(self, a: str, b: str, level: float = 0.95) -> list[float]:
        """A distribution-free confidence interval for :meth:`ratio` (the median of per-round ratios),
        from the order statistics of the same rounds (the sign-test interval)."""
        fa = self.contended.get(a) or [False] * len(self.samples[a])
        fb = self.contended.get(b) or [False] * len(self.samples[b])
        pairs = list(zip(self.samples[a], self.samples[b], fa, fb))
        clean = [x / y for x, y, ca, cb in pairs if not (ca or cb)]
        return median_ci(clean if len(clean) >= 2 else [x / y for x, y, _, _ in pairs], level)

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


def _raw(t: Timings) -> dict:
    """The raw measurements kept in the JSON: every sample, its contention flag and foreign CPU share."""
    return {"samples_s": t.samples, "contended": t.contended, "foreign_cpu_share": t.foreign,
            "calls_per_sample": t.inner}


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


def _ci(bounds: list[float]) -> list[float]:
    return [_r(b) for b in bounds]


# =============================================================================== models and methods


def _torch():
    import torch

    return torch


def shared_copy(model):
    """A deep copy that shares every parameter and buffer with ``model`` (base weights are frozen and
    never written in the train benchmark, so the copies can share them: N models, one set of weights)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


@dataclass
class ModelSpec:
    name: str
    batch: int
    seq: int
    loader: Callable[[], Any]
    qv: list[str]  # PEFT target names of the attention query / value projections
    model_type: str


def _load_minilm(classifier: bool = True):
    torch = _torch()
    from transformers import AutoModel, AutoModelForSequenceClassification

    from .assets import minilm_path

    if classifier:
        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=N_TASKS,
                                                                  dtype=torch.float32)
    return AutoModel.from_pretrained(minilm_path(), dtype=torch.float32)


def _load_smollm2():
    torch = _torch()
    from transformers import AutoModelForCausalLM

    from .assets import smollm2_path

    return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)


MODELS = {
    "minilm": ModelSpec("minilm", 16, 128, _load_minilm, ["query", "value"], "bert"),
    "smollm2": ModelSpec("smollm2", 4, 128, _load_smollm2, ["q_proj", "v_proj"], "llama"),
}


def make_batch(spec: ModelSpec, vocab: int, batch: int, seq: int, seed: int = 0) -> dict:
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if spec.model_type == "bert":
        out["labels"] = torch.randint(0, N_TASKS, (batch,), generator=g)
    else:
        out["labels"] = ids.clone()
    return out


def task_ids_for(batch: int, mode: str):
    torch = _torch()
    if mode == "mixed":
        return torch.arange(batch) % N_TASKS
    return torch.zeros(batch, dtype=torch.long)


@dataclass
class Variant:
    """One configuration of the train / infer benchmarks."""

    name: str
    kind: str  # "floor" | "ours" | "peft" | "base"
    build: Callable[[Any], Any]  # base model (a shared copy) -> runnable model
    task_mode: str | None = None  # "mixed" | "single" | None (no task ids)
    lora_ref: str | None = None  # name of our LoRA of equal total rank
    peft_ref: str | None = None  # name of PEFT's counterpart
    routing: str = ""  # "token" | "task" | "" (LoRA / floor)
    note: str = ""
    labels: str = "all"  # "all": LM loss on every token; "answers" / "answers_kept": on the last few only


ANSWER_TOKENS = 4  # the "answers" batches: loss on each row's last 4 tokens, as on a short answer


def batch_for(batch: dict, variant: Variant) -> dict:
    """The benchmark batch, with the labels a variant trains on (a causal LM's loss on a short answer,
    with all logits computed, or only those the loss reads)."""
    if variant.labels == "all":
        return batch
    from .data.collate import IGNORE_INDEX
    from .label_logits import keep_label_logits

    labels = batch["labels"].clone()
    labels[:, :-ANSWER_TOKENS] = IGNORE_INDEX
    answers = {**batch, "labels": labels}
    return keep_label_logits(answers) if variant.labels == "answers_kept" else answers


def _mt():
    import mtpeft

    return mtpeft


def target_regex(model, role: str) -> str:
    from .core.targets import default_target_regex

    return default_target_regex(model, role)


def build_floor(base):
    """Every base weight frozen; the embedding output requires grad so backward runs through all layers."""
    for p in base.parameters():
        p.requires_grad_(False)
    emb = base.get_input_embeddings()
    emb.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
    return base


def build_ours(config_fn: Callable[[Any], Any], loop: bool = False):
    def build(base):
        model = _mt().get_model(base, config_fn(base))
        if loop:  # the papers' way: a Python loop over experts (the layer's reference implementation)
            for _, layer in model.adapted_layers():
                layer.adapter_forward = (lambda x, route, _l=layer: _l.reference_forward(x, route))
        return model

    return build


def build_peft_lora(targets: list[str], r: int = 8, alpha: float = 16, n_adapters: int = 1):
    def build(base):
        import peft

        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))
        model = peft.get_peft_model(base, cfg, adapter_name="t0")
        for t in range(1, n_adapters):
            model.add_adapter(f"t{t}", peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                       target_modules=list(targets)))
        return model

    return build


def build_peft_poly(targets: list[str], n_splits: int):
    def build(base):
        import peft

        cfg = peft.PolyConfig(r=8, n_tasks=N_TASKS, n_skills=4, n_splits=n_splits, target_modules=list(targets))
        # The PolyModel itself: its forward takes task_ids (PeftModel's generic forward drops them).
        return peft.get_peft_model(base, cfg).base_model

    return build


def mosld_equal_rank(base) -> int:
    """Our LoRA of equal total rank for MoSLD's per-layer schedule: mean over adapted layers of E_l·r."""
    cfg = _mt().MoSLDConfig(n_tasks=N_TASKS)
    n_layers = getattr(base.config, "num_hidden_layers")
    ranks = [cfg.experts_for_layer(i, n_layers) * cfg.r for i in range(n_layers)]
    return round(sum(ranks) / len(ranks))


def train_variants(spec: ModelSpec, base, quick: bool) -> list[Variant]:
    mt = _mt()
    qv = spec.qv
    mlp = target_regex(base, "mlp")
    qkvo = target_regex(base, "attention_all")
    r_mosld = mosld_equal_rank(base)

    def lora(r, targets=None):
        return build_ours(lambda b: mt.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))

    v = [
        Variant("floor", "floor", build_floor),
        Variant("lora_r8", "ours", lora(8), peft_ref="peft_lora_r8"),
        Variant("peft_lora_r8", "peft", build_peft_lora(qv)),
        Variant("moelora", "ours", build_ours(lambda b: mt.MoELoraConfig(n_tasks=N_TASKS)), "mixed", "lora_r32",
                routing="token", note="E=8 top-2 r_e=4, dropout 0.05, balance + contrastive losses"),
        Variant("lora_r32", "ours", lora(32)),
    ]
    if quick:
        return v + [
            Variant("task_lora", "ours", build_ours(lambda b: mt.TaskLoraConfig(r=8, n_tasks=N_TASKS)), "mixed",
                    "lora_r8", routing="task"),
        ]
    v += [
        Variant("moelora_loop", "ours", build_ours(lambda b: mt.MoELoraConfig(n_tasks=N_TASKS), loop=True), "mixed",
                "lora_r32", routing="token", note="MoELoRA's reference loop over experts (no aux losses): the papers' code"),
        Variant("mosld", "ours", build_ours(lambda b: mt.MoSLDConfig(n_tasks=N_TASKS)), "mixed", f"lora_r{r_mosld}",
                routing="token", note="r=8, E=(2,4,6,8) by quarter, top-2, DropConnect 0.1"),
        Variant("hydralora", "ours", build_ours(lambda b: mt.HydraLoraConfig(n_tasks=N_TASKS)), "mixed", "lora_r32",
                routing="token", note="E=4 heads, r=8, dropout 0.05"),
        Variant("teamlora", "ours", build_ours(lambda b: mt.TeamLoraConfig(n_tasks=N_TASKS)), "mixed",
                "lora_mlp_r32", routing="token", note="E=4, r_B=8 on the MLP, dropout 0.05"),
        Variant("task_lora", "ours", build_ours(lambda b: mt.TaskLoraConfig(r=8, n_tasks=N_TASKS)), "mixed",
                "lora_r8", routing="task"),
        Variant("task_lora@single", "ours", build_ours(lambda b: mt.TaskLoraConfig(r=8, n_tasks=N_TASKS)), "single",
                "lora_r8", routing="task"),
        Variant("mtl_lora", "ours", build_ours(lambda b: mt.MTLLoraConfig(n_tasks=N_TASKS)), "mixed",
                "lora_qkvo_r8", routing="task", note="r=8, n=3, q,k,v,o, dropout 0.05"),
        Variant("mtl_lora@single", "ours", build_ours(lambda b: mt.MTLLoraConfig(n_tasks=N_TASKS)), "single",
                "lora_qkvo_r8", routing="task"),
        Variant("poly", "ours", build_ours(lambda b: mt.PolyConfig(r=8, n_skills=4, n_tasks=N_TASKS)), "mixed",
                "lora_r8", "peft_poly", routing="task", note="r=8, S=4"),
        Variant("poly@single", "ours", build_ours(lambda b: mt.PolyConfig(r=8, n_skills=4, n_tasks=N_TASKS)),
                "single", "lora_r8", routing="task"),
        Variant("peft_poly", "peft", build_peft_poly(qv, 1), "mixed"),
        Variant("mhr", "ours", build_ours(lambda b: mt.PolyConfig(r=8, n_skills=4, n_splits=4, n_tasks=N_TASKS)),
                "mixed", "lora_r8", "peft_mhr", routing="task", note="r=8, S=4, h=4"),
        Variant("peft_mhr", "peft", build_peft_poly(qv, 4), "mixed"),
        Variant("cpoly", "ours", build_ours(lambda b: mt.CPolyConfig(n_tasks=N_TASKS)), "mixed", "lora_r2",
                routing="task", note="r=2, S=3 common + 1 exclusive"),
        Variant("cpoly@single", "ours", build_ours(lambda b: mt.CPolyConfig(n_tasks=N_TASKS)), "single", "lora_r2",
                routing="task"),
        Variant(f"lora_r{r_mosld}", "ours", lora(r_mosld)),
        Variant("lora_mlp_r32", "ours", lora(32, mlp)),
        Variant("lora_qkvo_r8", "ours", lora(8, qkvo)),
        Variant("lora_r2", "ours", lora(2)),
    ]
    if spec.model_type != "bert":
        v += [
            Variant("lora_r8@answers_kept", "ours", lora(8), lora_ref="lora_r8@answers", labels="answers_kept",
                    note=f"loss on the last {ANSWER_TOKENS} tokens, logits there only; vs its full-logits twin"),
            Variant("lora_r8@answers", "ours", lora(8), labels="answers",
                    note=f"loss on the last {ANSWER_TOKENS} tokens, logits everywhere"),
        ]
    return v


def _forward_kwargs(batch: dict, variant: Variant, with_labels: bool = True) -> dict:
    kw = dict(batch) if with_labels else {k: v for k, v in batch.items() if k != "labels"}
    if variant.task_mode is not None:
        kw["task_ids"] = task_ids_for(batch["input_ids"].shape[0], variant.task_mode)
    return kw


def train_step_fn(model, batch: dict, variant: Variant) -> Callable[[], None]:
    torch = _torch()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    kwargs = _forward_kwargs(batch, variant)

    def step():
        out = model(**kwargs)
        out.loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def count_flops(fn: Callable[[], None]) -> int:
    """Matmul and attention FLOPs of one call (torch's FlopCounterMode; it has no formula for the CPU
    flash-attention kernels, so those are added here)."""
    torch = _torch()
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def fwd(query, key, value, *args, out_val=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_val=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# =============================================================================== train


def train_groups(variants: list[Variant]) -> list[list[str]]:
    """Small groups timed together: the floor, one method, and what it is compared with (its single-task
    run, PEFT's counterpart, our LoRA of equal total rank). The machine's speed drifts by 10-20 % over
    seconds here, so a ratio is most precise between steps run seconds apart, not a whole round apart."""
    names = {v.name for v in variants}
    groups = []
    for v in variants:
        if v.kind != "ours" or v.name.endswith("@single") or not (v.routing or v.peft_ref or v.lora_ref):
            continue
        group = ["floor", v.name] + [n for n in (v.name + "@single", v.peft_ref, v.lora_ref) if n and n in names]
        groups.append(list(dict.fromkeys(group)))
    covered = {n for g in groups for n in g}
    rest = [v.name for v in variants if v.name not in covered]
    if rest:
        groups.append(["floor"] + rest)
    return groups


def only_groups(groups: list[list[str]], only: list[str] | None, model: str = "") -> list[list[str]]:
    """The groups whose subject (the case after the floor) is in ``only`` (all groups without it), so that
    a few comparisons can be run for many more rounds than a whole section affords."""
    if not only:
        return groups
    subjects = [g[1] for g in groups if len(g) > 1]
    unknown = [n for n in only if n not in subjects]
    if unknown:
        raise ValueError(f"--only: no {model} train group has the subject {unknown[0]!r}; choose from {subjects}.")
    return [g for g in groups if len(g) > 1 and g[1] in only]


def bench_train(args) -> dict:
    torch = _torch()
    results: dict[str, Any] = {}
    for model_name in args.models:
        spec = MODELS[model_name]
        batch_size, seq = (4, 64) if args.quick else (spec.batch, spec.seq)
        base = spec.loader().train()
        for p in base.parameters():
            p.requires_grad_(False)
        vocab = base.config.vocab_size
        batch = make_batch(spec, vocab, batch_size, seq)
        variants = train_variants(spec, base, args.quick)
        groups = only_groups(train_groups(variants), getattr(args, "only", None), model_name)
        wanted = {n for g in groups for n in g}
        variants = [v for v in variants if v.name in wanted]
        steps, flops, params = {}, {}, {}
        for v in variants:
            torch.manual_seed(0)
            model = v.build(shared_copy(base)).train()
            step = train_step_fn(model, batch_for(batch, v), v)
            flops[v.name] = count_flops(step)  # also the first (warm-up) step
            params[v.name] = trainable_count(model)
            steps[v.name] = step
            for _ in range(max(args.warmup - 1, 0)):
                step()
        _log(args, f"train/{model_name}: {len(steps)} cases in {len(groups)} groups, batch {batch_size}x{seq}, "
                   f"{args.repeats} rounds")
        timings = [interleaved({n: steps[n] for n in g}, repeats=args.repeats, warmup=1,
                               extra_rounds=args.extra_rounds) for g in groups]
        # Each case is reported from the group where it is the subject (else the first one holding it).
        home = {}
        for i, g in enumerate(groups):
            home.setdefault(g[1], i)
        for i, g in enumerate(groups):
            for n in g:
                home.setdefault(n, i)
        rows = []
        for v in variants:
            gi = home[v.name]
            t, group = timings[gi], groups[gi]
            row = {
                "name": v.name, "kind": v.kind, "routing": v.routing, "task_batch": v.task_mode, "note": v.note,
                "group": gi, "trainable_params": params[v.name], "median_s": _r(t.median(v.name), 4),
                "spread": _r(t.spread(v.name)), "clean_samples": t.clean_count(v.name),
                "vs_floor": _r(t.ratio(v.name, "floor")), "vs_floor_ci": _ci(t.ratio_ci(v.name, "floor")),
                "flop_predicted_vs_floor": _r(flops[v.name] / flops["floor"]), "gflops": _r(flops[v.name] / 1e9, 2),
            }
            if v.lora_ref and v.lora_ref in group:
                row["lora_ref"] = v.lora_ref
                row["vs_equal_rank_lora"] = _r(t.ratio(v.name, v.lora_ref))
                row["vs_equal_rank_lora_ci"] = _ci(t.ratio_ci(v.name, v.lora_ref))
                row["flop_predicted_vs_equal_rank_lora"] = _r(flops[v.name] / flops[v.lora_ref])
            if v.peft_ref and v.peft_ref in group:
                row["peft_ref"] = v.peft_ref
                row["vs_peft"] = _r(t.ratio(v.name, v.peft_ref))
                row["vs_peft_ci"] = _ci(t.ratio_ci(v.name, v.peft_ref))
            single = v.name + "@single"
            if single in group:
                row["mixed_vs_single"] = _r(t.ratio(v.name, single))
            rows.append(row)
        results[model_name] = {"batch": [batch_size, seq], "rows": rows, "groups": groups,
                               "timings": [_raw(t) for t in timings]}
        del steps, base
        gc.collect()
    return results


# =============================================================================== layer


def _layer_methods(E: int, r: int, quick: bool = False) -> dict[str, Callable[[], Any]]:
    mt = _mt()
    if quick:
        return {"moelora": lambda: mt.MoELoraConfig(n_experts=E, r=r, lora_alpha=2 * r, balance_weight=0.0,
                                                    contrastive_weight=0.0)}
    return {
        "moelora": lambda: mt.MoELoraConfig(n_experts=E, r=r, lora_alpha=2 * r, balance_weight=0.0,
                                            contrastive_weight=0.0),
        "mosld": lambda: mt.MoSLDConfig(expert_schedule="flat", n_experts=E, r=r, lora_alpha=2 * r,
                                        balance_weight=0.0),
        "hydralora": lambda: mt.HydraLoraConfig(n_experts=E, r=r, lora_alpha=2 * r),
        "teamlora": lambda: mt.TeamLoraConfig(n_experts=E, r=r, lora_alpha=2 * r, balance_weight=0.0),
    }


def _task_layer_methods(E: int, r: int, quick: bool = False) -> dict[str, Callable[[], Any]]:
    mt = _mt()
    if quick:
        return {"poly": lambda: mt.PolyConfig(r=r, n_skills=E, n_tasks=N_TASKS)}
    return {
        "task_lora": lambda: mt.TaskLoraConfig(r=r, n_tasks=N_TASKS),
        "mtl_lora": lambda: mt.MTLLoraConfig(r=r, n_up=E, n_tasks=N_TASKS, lora_dropout=0.0),
        "poly": lambda: mt.PolyConfig(r=r, n_skills=E, n_tasks=N_TASKS),
        "cpoly": lambda: mt.CPolyConfig(r=r, n_skills=E, n_tasks=N_TASKS),
    }


def task_loop_reference(layer, x, ids):
    """A plain loop over the tasks present (what PEFT's mixed-batch path does): each task's factors are
    built, its rows selected, multiplied and written back."""
    torch = _torch()
    xd = layer.dropout(x) if hasattr(layer, "dropout") else x
    out = torch.zeros(*x.shape[:-1], layer.out_features, dtype=x.dtype)
    for t in sorted(set(ids.tolist())):
        rows = ids == t
        a, b = layer.lora_factors(t)  # (r, d_in), (d_out, r), scale folded into b
        out[rows] = (xd[rows] @ a.T) @ b.T
    return out


def _standalone(method_cfg, d: int, seed: int = 0):
    """One adapted layer around a frozen nn.Linear(d, d), with its own routing state."""
    torch = _torch()
    from torch import nn

    from .config import get_layer_class
    from .core.context import RoutingState

    torch.manual_seed(seed)
    base = nn.Linear(d, d)
    base.requires_grad_(False)
    layer = get_layer_class(method_cfg.method)(base, method_cfg, module_name="layers.0.proj",
                                               routing=RoutingState(), layer_index=0, n_layers=1)
    with torch.no_grad():  # non-zero B: nothing degenerate (B = 0 at init)
        for name, p in layer.named_parameters():
            if not name.startswith("base_layer") and "B" in name:
                p.normal_(0, 0.02)
    return layer.train()


def bench_layer(args) -> dict:
    torch = _torch()
    from .core.context import Route

    n_tokens = 2048
    if args.quick:
        grid = [(384, 8, 4)]
        n_tokens = 512
    else:
        grid = [(d, E, r) for d in (384, 576, 768) for E in (4, 8) for r in (4, 8, 16)]
    rows = []
    for d, E, r in grid:
        x = torch.randn(16, n_tokens // 16, d, requires_grad=True)
        g = torch.randn(16, n_tokens // 16, d)
        ids = torch.arange(16) % N_TASKS
        cases: dict[str, Callable[[], None]] = {}

        def fb(fn):
            def run():
                y = fn()
                y.backward(g)
                x.grad = None
            return run

        base = _standalone(_mt().LoraConfig(r=1), d).base_layer
        cases["base"] = fb(lambda: base(x))
        # Token-routed methods (dropout 0.05 at their defaults) against LoRA of rank E·r with dropout 0.05;
        # task-routed ones (no dropout here) against LoRA of rank r without dropout.
        no_route = Route(None, None, False)  # token-routed layers read no task ids
        for name, rank, p in (("lora_equal", E * r, 0.05), ("lora_r", r, 0.0)):
            lay = _standalone(_mt().LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=p), d)
            cases[name] = fb(lambda lay=lay: lay(x))
            cases[f"{name}/adapter"] = fb(lambda lay=lay: lay.adapter_forward(x, no_route))
        for name, cfg_fn in _layer_methods(E, r, args.quick).items():
            lay = _standalone(cfg_fn(), d)
            cases[name] = fb(lambda lay=lay: lay(x))
            cases[f"{name}/ref"] = fb(lambda lay=lay: lay.base_layer(x) + lay.reference_forward(x, no_route))
            cases[f"{name}/adapter"] = fb(lambda lay=lay: lay.adapter_forward(x, no_route))
            cases[f"{name}/ref_adapter"] = fb(lambda lay=lay: lay.reference_forward(x, no_route))
        task_route = Route(ids, None, False)
        for name, cfg_fn in _task_layer_methods(E, r, args.quick).items():
            lay = _standalone(cfg_fn(), d)

            def fast(lay=lay):
                with lay.routing.scope(ids, None, record=False):
                    return lay(x)

            cases[name] = fb(fast)
            cases[f"{name}/ref"] = fb(lambda lay=lay: lay.base_layer(x) + task_loop_reference(lay, x, ids))
            cases[f"{name}/adapter"] = fb(lambda lay=lay: lay.adapter_forward(x, task_route))
            cases[f"{name}/ref_adapter"] = fb(lambda lay=lay: task_loop_reference(lay, x, ids))
        t = interleaved(cases, repeats=args.repeats, warmup=args.warmup, min_seconds=0.0 if args.quick else 0.03,
                        extra_rounds=args.extra_rounds)
        _log(args, f"layer d={d} E={E} r={r}: {len(cases)} cases")
        for name in list(_layer_methods(E, r, args.quick)) + list(_task_layer_methods(E, r, args.quick)):
            token = name in _layer_methods(E, r, args.quick)
            lora_ref = "lora_equal" if token else "lora_r"
            rows.append({
                "d": d, "E": E, "r": r, "tokens": n_tokens, "method": name, "routing": "token" if token else "task",
                "lora_rank": E * r if token else r,
                "fast_ms": _r(t.median(name) * 1e3), "ref_ms": _r(t.median(f"{name}/ref") * 1e3),
                "lora_ms": _r(t.median(lora_ref) * 1e3), "base_ms": _r(t.median("base") * 1e3),
                "ref_vs_fast": _r(t.ratio(f"{name}/ref", name)),
                "fast_vs_lora": _r(t.ratio(name, lora_ref)),
                "adapter_fast_ms": _r(t.median(f"{name}/adapter") * 1e3),
                "adapter_ref_ms": _r(t.median(f"{name}/ref_adapter") * 1e3),
                "adapter_lora_ms": _r(t.median(f"{lora_ref}/adapter") * 1e3),
                "adapter_ref_vs_fast": _r(t.ratio(f"{name}/ref_adapter", f"{name}/adapter")),
                "adapter_fast_vs_lora": _r(t.ratio(f"{name}/adapter", f"{lora_ref}/adapter")),
            })
    return {"rows": rows, "note": "forward + backward of one adapted layer (frozen nn.Linear(d, d) + adapter), x of shape "
                                  "(16, tokens/16, d) requiring grad, a fixed random output gradient, training mode. "
                                  "Token-routed: defaults but aux losses off (the loop references have none), vs "
                                  "LoRA of rank E*r with dropout 0.05; reference = the layer's reference_forward loop "
                                  "over experts. Task-routed (E = skills / up-projections, 4 tasks mixed over 16 rows, "
                                  "dropout 0) vs LoRA of rank r; reference = a loop over the tasks present "
                                  "(lora_factors per task, rows selected and written back, as PEFT's mixed batches). "
                                  "'adapter' columns: the same without the base layer."}


# =============================================================================== infer


def bench_infer(args) -> dict:
    torch = _torch()
    mt = _mt()
    results: dict[str, Any] = {}
    for model_name in args.models:
        spec = MODELS[model_name]
        base = spec.loader().eval()
        batch_size, seq = (4, 64) if args.quick else (spec.batch, spec.seq)
        batch = make_batch(spec, base.config.vocab_size, batch_size, seq)
        fwd = {k: v for k, v in batch.items() if k != "labels"}
        mixed = task_ids_for(batch_size, "mixed")
        single = task_ids_for(batch_size, "single")
        models: dict[str, Any] = {}
        cases: dict[str, Callable[[], None]] = {}

        def own_copy():
            return copy.deepcopy(base)  # merging writes the base weights: no sharing

        def randomised(model):
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.requires_grad:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.01)
            return model.eval()

        lora = randomised(mt.get_model(own_copy(), mt.LoraConfig(r=8)))
        lora_merged = randomised(mt.get_model(own_copy(), mt.LoraConfig(r=8)))
        lora_merged.merge()
        task_lora = randomised(mt.get_model(shared_copy(base), mt.TaskLoraConfig(r=8, n_tasks=N_TASKS)))
        task_merged = randomised(mt.get_model(own_copy(), mt.TaskLoraConfig(r=8, n_tasks=N_TASKS)))
        task_merged.merge(task=0)
        models.update(base=base, lora=lora, lora_merged=lora_merged, task_lora=task_lora,
                      task_lora_merged=task_merged)
        import peft  # noqa: F401

        peft_multi = build_peft_lora(spec.qv, n_adapters=N_TASKS)(shared_copy(base))
        randomised(peft_multi)
        names = [f"t{int(t)}" for t in mixed]

        @torch.no_grad()
        def run(model, **kw):
            return lambda: model(**fwd, **kw)

        cases["base"] = run(base)
        cases["lora_merged"] = run(lora_merged)
        cases["task_lora_merged"] = run(task_merged, task_ids=single)
        cases["lora_unmerged"] = run(lora)
        cases["task_lora_mixed"] = run(task_lora, task_ids=mixed)
        cases["peft_lora_mixed"] = run(peft_multi, adapter_names=names)
        if not args.quick:
            for name, cfg in (("moelora", mt.MoELoraConfig(n_tasks=N_TASKS)), ("teamlora", mt.TeamLoraConfig(n_tasks=N_TASKS)),
                              ("mtl_lora", mt.MTLLoraConfig(n_tasks=N_TASKS)), ("poly", mt.PolyConfig(n_tasks=N_TASKS))):
                m = randomised(mt.get_model(shared_copy(base), cfg))
                cases[f"{name}_mixed"] = run(m, task_ids=mixed)
        _log(args, f"infer/{model_name} forward: {len(cases)} cases")
        t = interleaved(cases, repeats=args.repeats, warmup=args.warmup, extra_rounds=args.extra_rounds)
        rows = [{"name": n, "mode": "forward", "median_s": _r(t.median(n), 4), "vs_base": _r(t.ratio(n, "base")),
                 "vs_base_ci": _ci(t.ratio_ci(n, "base"))} for n in cases]
        for row in rows:
            if row["name"] == "task_lora_mixed":
                row["vs_peft_mixed"] = _r(t.ratio("task_lora_mixed", "peft_lora_mixed"))
        out = {"batch": [batch_size, seq], "rows": rows, **_raw(t)}
        if spec.model_type == "llama":
            new = 8 if args.quick else 32
            prompt = {"input_ids": batch["input_ids"][:, :16], "attention_mask": batch["attention_mask"][:, :16]}
            gen_kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

            def gen(model, **kw):
                return lambda: model.generate(**prompt, **gen_kw, **kw)

            gcases = {
                "base": gen(base), "lora_merged": gen(lora_merged), "task_lora_merged": gen(task_merged, task_ids=single),
                "lora_unmerged": gen(lora), "task_lora_mixed": gen(task_lora, task_ids=mixed),
                "peft_lora_mixed": gen(peft_multi, adapter_names=names),
            }
            _log(args, f"infer/{model_name} generate: {len(gcases)} cases")
            tg = interleaved(gcases, repeats=args.repeats, warmup=1, extra_rounds=args.extra_rounds)
            grows = [{"name": n, "mode": f"generate {batch_size}x16+{new}", "median_s": _r(tg.median(n), 4),
                      "vs_base": _r(tg.ratio(n, "base")), "vs_base_ci": _ci(tg.ratio_ci(n, "base"))} for n in gcases]
            for row in grows:
                if row["name"] == "task_lora_mixed":
                    row["vs_peft_mixed"] = _r(tg.ratio("task_lora_mixed", "peft_lora_mixed"))
            out["rows"] += grows
            out["generate"] = _raw(tg)
        results[model_name] = out
        del models, cases
        gc.collect()
    return results


# =============================================================================== memory


def _rss_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def memory_child(payload: str) -> None:
    """Run in a fresh process: build one variant, run training steps, print peak memory as JSON."""
    opts = json.loads(payload)
    set_threads(opts["threads"])
    torch = _torch()
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
            proc = subprocess.run([sys.executable, "-c", "import sys; from mtpeft.bench import memory_child; "
                                   "memory_child(sys.argv[1])", payload], capture_output=True, text=True, env=env,
                                  timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"memory benchmark of {name} failed:\n{proc.stderr[-3000:]}")
            measured[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            _log(args, f"memory/{model_name}/{name}: {measured[name]}")
        for name in names:
            m = measured[name]
            row = {"name": name, "step_peak_mb": _r(m["step_peak_kb"] / 1024, 1),
                   "peak_rss_mb": _r(m["peak_rss_kb"] / 1024, 1), "rss_before_mb": _r(m["rss_before_kb"] / 1024, 1)}
            ref = refs.get(name)
            if ref and ref in measured:
                row["lora_ref"] = ref
                row["step_peak_vs_lora"] = _r(m["step_peak_kb"] / measured[ref]["step_peak_kb"])
                row["peak_rss_vs_lora"] = _r(m["peak_rss_kb"] / measured[ref]["peak_rss_kb"])
            rows.append(row)
        results[model_name] = {"batch": [batch_size, seq], "rows": rows,
                               "how": "fresh subprocess per variant; VmHWM reset via /proc/self/clear_refs before "
                                      "each step; step_peak = VmHWM - VmRSS at the step's start (max over steps); "
                                      "MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the RSS"}
    return results


# =============================================================================== targets and report


def verdict(op: str, bound: float, ci: list[float] | None) -> str | None:
    """"met" / "missed" when the whole confidence interval is on one side of the bound, "noise" when it
    straddles it (this run cannot tell), None without an interval."""
    if not ci:
        return None
    lo, hi = ci
    good, bad = (hi <= bound, lo > bound) if op == "<=" else (lo >= bound, hi < bound)
    return "met" if good else "missed" if bad else "noise"


def measured(row: dict, key: str) -> tuple[float | None, list[float] | None]:
    """A row's ratio and its confidence interval (None where the row has no interval, e.g. memory)."""
    return row.get(key), row.get(key + "_ci")


def evaluate_targets(res: dict) -> list[dict]:
    out = []

    def add(target, subject, value, ci=None):
        op, bound = TARGETS[target]
        if value is None:
            return
        met = value <= bound if op == "<=" else value >= bound
        out.append({"target": target, "subject": subject, "value": value, "ci": ci, "bound": f"{op} {bound}",
                    "met": met, "verdict": verdict(op, bound, ci)})

    for model, data in res.get("train", {}).items():
        rows = {r["name"]: r for r in data["rows"]}
        if "lora_r8" in rows:
            add("lora_vs_floor", f"{model}: lora_r8", *measured(rows["lora_r8"], "vs_floor"))
            add("lora_vs_peft_lora", f"{model}: lora_r8", *measured(rows["lora_r8"], "vs_peft"))
        for r in data["rows"]:
            if r["routing"] == "token" and not r["name"].endswith("_loop"):
                add("token_routed_vs_equal_rank_lora", f"{model}: {r['name']} vs {r.get('lora_ref')}",
                    *measured(r, "vs_equal_rank_lora"))
                add("token_routed_vs_floor", f"{model}: {r['name']}", *measured(r, "vs_floor"))
            if r["routing"] == "task" and r["task_batch"] == "mixed":
                add("task_routed_mixed_vs_lora", f"{model}: {r['name']} vs {r.get('lora_ref')}",
                    *measured(r, "vs_equal_rank_lora"))
            if r["name"] in ("poly", "mhr"):
                add("poly_mhr_vs_peft", f"{model}: {r['name']} vs {r.get('peft_ref')}", *measured(r, "vs_peft"))
    layer = res.get("layer", {}).get("rows", [])
    for method in sorted({r["method"] for r in layer if r["routing"] == "token"}):
        sel = [r for r in layer if r["method"] == method and r["E"] == 8]
        if sel:
            add("reference_loop_vs_fast_path_E8", f"layer: {method}, worst over d, r (whole layer)",
                min(r["ref_vs_fast"] for r in sel))
            add("reference_loop_vs_fast_path_E8", f"layer: {method}, worst over d, r (adapter only)",
                min(r["adapter_ref_vs_fast"] for r in sel))
    for model, data in res.get("infer", {}).items():
        for r in data["rows"]:
            if r["name"] in ("lora_merged", "task_lora_merged"):
                add("merged_vs_base_inference", f"{model} {r['mode']}: {r['name']}", *measured(r, "vs_base"))
    for model, data in res.get("memory", {}).items():
        for r in data["rows"]:
            if "step_peak_vs_lora" in r and "@answers" not in r["name"]:  # that pair: logits, not adapters
                add("peak_train_memory_vs_lora", f"{model}: {r['name']} vs {r['lora_ref']} (step peak)",
                    *measured(r, "step_peak_vs_lora"))
    return out


def _fmt(v) -> str:
    return "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def tables(res: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """Every result table as (title, column names, formatted rows): one source for the terminal and
    the markdown renderings."""
    out = []

    def add(title, cols, rows):
        out.append((title, [c.replace("_", " ") for c in cols], [[_fmt(r.get(c)) for c in cols] for r in rows]))

    for model, data in res.get("train", {}).items():
        add(f"train step, {model} {data['batch'][0]}x{data['batch'][1]} (ratios: median of per-round ratios)",
            ["name", "median_s", "vs_floor", "flop_predicted_vs_floor", "lora_ref", "vs_equal_rank_lora",
             "flop_predicted_vs_equal_rank_lora", "vs_peft", "mixed_vs_single", "trainable_params"], data["rows"])
    if res.get("layer", {}).get("rows"):
        add("layer level: forward + backward, whole adapted layer (and adapter only)",
            ["method", "d", "E", "r", "lora_rank", "fast_ms", "ref_ms", "lora_ms", "base_ms", "ref_vs_fast",
             "fast_vs_lora", "adapter_ref_vs_fast", "adapter_fast_vs_lora"], res["layer"]["rows"])
    for model, data in res.get("infer", {}).items():
        add(f"inference, {model} {data['batch'][0]}x{data['batch'][1]}",
            ["name", "mode", "median_s", "vs_base", "vs_peft_mixed"], data["rows"])
    for model, data in res.get("memory", {}).items():
        add(f"peak training memory, {model} {data['batch'][0]}x{data['batch'][1]}",
            ["name", "step_peak_mb", "peak_rss_mb", "lora_ref", "step_peak_vs_lora", "peak_rss_vs_lora"],
            data["rows"])
    if res.get("targets"):
        def ci(t):
            return f"{t['ci'][0]:.3f}-{t['ci'][1]:.3f}" if t.get("ci") else ""

        out.append(("targets (met: the median; verdict: where the 95 % interval of the median lies)",
                    ["target", "subject", "value", "95% CI", "bound", "met", "verdict"],
                    [[t["target"], t["subject"], _fmt(t["value"]), ci(t), t["bound"], "yes" if t["met"] else "NO",
                      t.get("verdict") or ""] for t in res["targets"]]))
    return out


def print_tables(res: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=200)
    for title, cols, rows in tables(res):
        tab = Table(title=title)
        for c in cols:
            tab.add_column(c)
        for row in rows:
            tab.add_row(*row)
        console.print(tab)


def markdown_tables(res: dict) -> str:
    parts = []
    for title, cols, rows in tables(res):
        lines = [f"**{title}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _log(args, msg: str) -> None:
    if not args.silent:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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
        _log(args, f"section {s}, load average {load_average()}")
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
    import torch

    args = build_parser().parse_args(argv)
    if args.show:  # a saved run: the same printing, no measuring
        res = json.loads(Path(args.show).read_text())
    else:
        threads = torch.get_num_threads()
        try:
            res = run(args)
        finally:
            torch.set_num_threads(threads)  # in-process callers (tests) get their setting back
        if args.out:
            path = Path(args.out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res, indent=1) + "\n")
            _log(args, f"wrote {path}")
    if args.json:
        print(json.dumps(summary(res), indent=1))
    elif args.markdown:
        print(markdown_tables(res), end="")
    else:
        print_tables(res)
        print(json.dumps({"meta": res["meta"], "targets": res["targets"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
