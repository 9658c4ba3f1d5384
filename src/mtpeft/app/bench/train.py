"""Section ``train``: one optimizer step of every variant, in small interleaved groups."""

from __future__ import annotations

import gc
from typing import Any

import torch

from .cases import (
    MODELS,
    Variant,
    batch_for,
    count_flops,
    make_batch,
    shared_copy,
    train_step_fn,
    train_variants,
    trainable_count,
)
from .common import log, rounded, rounded_ci
from .timing import Timings, interleaved, raw_samples


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
    results: dict[str, Any] = {}
    for model_name in args.models:
        spec = MODELS[model_name]
        batch_size, seq = (4, 64) if args.quick else (spec.batch, spec.seq)
        base = spec.loader().train()
        for p in base.parameters():
            p.requires_grad_(False)
        vocab = base.config.vocab_size
        batch = make_batch(spec, vocab, batch_size, seq)
        methods = getattr(args, "methods", None)
        variants = train_variants(spec, base, args.quick, methods.split(",") if isinstance(methods, str) else methods)
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
        log(args, f"train/{model_name}: {len(steps)} cases in {len(groups)} groups, batch {batch_size}x{seq}, "
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
                "group": gi, "trainable_params": params[v.name], "median_s": rounded(t.median(v.name), 4),
                "spread": rounded(t.spread(v.name)), "clean_samples": t.clean_count(v.name),
                "vs_floor": rounded(t.ratio(v.name, "floor")),
                "flop_predicted_vs_floor": rounded(flops[v.name] / flops["floor"]),
                "gflops": rounded(flops[v.name] / 1e9, 2),
            }
            if v.lora_ref and v.lora_ref in group:
                row["lora_ref"] = v.lora_ref
                row["vs_equal_rank_lora"] = rounded(t.ratio(v.name, v.lora_ref))
                row["flop_predicted_vs_equal_rank_lora"] = rounded(flops[v.name] / flops[v.lora_ref])
            if v.peft_ref and v.peft_ref in group:
                row["peft_ref"] = v.peft_ref
                row["vs_peft"] = rounded(t.ratio(v.name, v.peft_ref))
            single = v.name + "@single"
            if single in group:
                row["mixed_vs_single"] = rounded(t.ratio(v.name, single))
            add_intervals(row, t)
            rows.append(row)
        results[model_name] = {"batch": [batch_size, seq], "rows": rows, "groups": groups,
                               "timings": [raw_samples(t) for t in timings]}
        del steps, base
        gc.collect()
    return results


# A row's ratios that get a 95 % interval, each with the row field naming what it is against.
INTERVAL_REFERENCES = {"vs_floor": None, "vs_equal_rank_lora": "lora_ref", "vs_peft": "peft_ref"}


def add_intervals(row: dict, t: Timings) -> None:
    """Set ``<ratio>_ci`` beside every ratio of ``row`` that has one, from the group's timings ``t``."""
    for key, ref_field in INTERVAL_REFERENCES.items():
        if key in row:
            ref = "floor" if ref_field is None else row[ref_field]
            row[key + "_ci"] = rounded_ci(t.ratio_ci(row["name"], ref))


def fill_intervals(res: dict) -> bool:
    """Give the train rows of a run saved before intervals were reported their 95 % intervals, from the
    raw samples the JSON keeps (the same computation as when measuring). Returns whether any was added."""
    added = False
    for data in res.get("train", {}).values():
        timings = [Timings(t["samples_s"], t["contended"], t.get("calls_per_sample", {}),
                           t.get("foreign_cpu_share", {})) for t in data.get("timings", [])]
        for row in data["rows"]:
            if "vs_floor_ci" in row or row.get("group") is None or row["group"] >= len(timings):
                continue
            add_intervals(row, timings[row["group"]])
            added = True
    return added
