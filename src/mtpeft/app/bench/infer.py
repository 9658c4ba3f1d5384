"""Section ``infer``: eval forward and ``generate``, merged / unmerged / mixed-task, against the bare base
and PEFT's ``adapter_names`` path."""

from __future__ import annotations

import copy
import gc
from typing import Any, Callable

import torch

import mtpeft as mt

from .cases import MODELS, build_peft_lora, make_batch, shared_copy, task_ids_for
from .common import N_TASKS, log, rounded, rounded_ci
from .timing import interleaved, raw_samples


def bench_infer(args) -> dict:
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
        log(args, f"infer/{model_name} forward: {len(cases)} cases")
        t = interleaved(cases, repeats=args.repeats, warmup=args.warmup, extra_rounds=args.extra_rounds)
        rows = [{"name": n, "mode": "forward", "median_s": rounded(t.median(n), 4), "vs_base": rounded(t.ratio(n, "base")),
                 "vs_base_ci": rounded_ci(t.ratio_ci(n, "base"))} for n in cases]
        for row in rows:
            if row["name"] == "task_lora_mixed":
                row["vs_peft_mixed"] = rounded(t.ratio("task_lora_mixed", "peft_lora_mixed"))
        out = {"batch": [batch_size, seq], "rows": rows, **raw_samples(t)}
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
            log(args, f"infer/{model_name} generate: {len(gcases)} cases")
            tg = interleaved(gcases, repeats=args.repeats, warmup=1, extra_rounds=args.extra_rounds)
            grows = [{"name": n, "mode": f"generate {batch_size}x16+{new}", "median_s": rounded(tg.median(n), 4),
                      "vs_base": rounded(tg.ratio(n, "base")), "vs_base_ci": rounded_ci(tg.ratio_ci(n, "base"))} for n in gcases]
            for row in grows:
                if row["name"] == "task_lora_mixed":
                    row["vs_peft_mixed"] = rounded(tg.ratio("task_lora_mixed", "peft_lora_mixed"))
            out["rows"] += grows
            out["generate"] = raw_samples(tg)
        results[model_name] = out
        del models, cases
        gc.collect()
    return results
