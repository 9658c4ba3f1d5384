"""Section ``layer``: forward + backward of one adapted linear layer, fast path vs loop vs LoRA."""

from __future__ import annotations

from typing import Any, Callable

import torch

import mtpeft as mt

from .common import N_TASKS, QUICK_METHODS, log, rounded
from .timing import interleaved


def _selected_methods(args) -> list[str]:
    """The registered methods the layer section runs: --methods, else the quick pair, else every package
    method that declares a ``sized_config`` and routes (by token or by task)."""
    from ...lib.config import get_method_spec, package_methods

    names = getattr(args, "methods", None)
    if names:
        names = names.split(",") if isinstance(names, str) else list(names)
    else:
        names = list(QUICK_METHODS) if args.quick else package_methods()
    specs = [get_method_spec(n) for n in names]  # an unknown name is an error that lists the known ones
    return [s.name for s in specs if s.sized_config is not None and s.routing in ("token", "task")]


def _methods(E: int, r: int, names: list[str], routing: str) -> dict[str, Callable[[], Any]]:
    """name -> config factory (E experts / skills of rank r, aux losses off) of the methods routed by ``routing``."""
    from ...lib.config import get_method_spec

    out = {}
    for name in names:
        spec = get_method_spec(name)
        if spec.routing == routing:
            extra = {"n_tasks": N_TASKS} if routing == "task" else {}
            out[name] = lambda spec=spec, extra=extra: spec.sized_config(E, r, **extra)
    return out


def task_loop_reference(layer, x, ids):
    """A plain loop over the tasks present (what PEFT's mixed-batch path does): each task's factors are
    built, its rows selected, multiplied and written back."""
    xd = layer.dropout(x) if hasattr(layer, "dropout") else x
    out = torch.zeros(*x.shape[:-1], layer.out_features, dtype=x.dtype)
    for t in sorted(set(ids.tolist())):
        rows = ids == t
        a, b = layer.lora_factors(t)  # (r, d_in), (d_out, r), scale folded into b
        out[rows] = (xd[rows] @ a.T) @ b.T
    return out


def standalone(method_cfg, d: int, seed: int = 0, d_out: int | None = None):
    """One adapted layer around a frozen nn.Linear(d, d_out or d), with its own routing state."""
    from torch import nn

    from ...lib.core.context import RoutingState
    from ...lib.config import get_layer_class

    torch.manual_seed(seed)
    base = nn.Linear(d, d_out or d)
    base.requires_grad_(False)
    layer = get_layer_class(method_cfg.method)(base, method_cfg, module_name="layers.0.proj",
                                               routing=RoutingState(), layer_index=0, n_layers=1)
    with torch.no_grad():  # non-zero B: nothing degenerate (B = 0 at init)
        for name, p in layer.named_parameters():
            if not name.startswith("base_layer") and "B" in name:
                p.normal_(0, 0.02)
    return layer.train()


def bench_layer(args) -> dict:
    from ...lib.core.context import Route

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

        base = standalone(mt.LoraConfig(r=1), d).base_layer
        cases["base"] = fb(lambda: base(x))
        # Token-routed methods (dropout 0.05 at their defaults) against LoRA of rank E·r with dropout 0.05;
        # task-routed ones (no dropout here) against LoRA of rank r without dropout.
        no_route = Route(None, None, False)  # token-routed layers read no task ids
        for name, rank, p in (("lora_equal", E * r, 0.05), ("lora_r", r, 0.0)):
            lay = standalone(mt.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=p), d)
            cases[name] = fb(lambda lay=lay: lay(x))
            cases[f"{name}/adapter"] = fb(lambda lay=lay: lay.adapter_forward(x, no_route))
        names = _selected_methods(args)
        token_methods, task_methods = _methods(E, r, names, "token"), _methods(E, r, names, "task")
        for name, cfg_fn in token_methods.items():
            lay = standalone(cfg_fn(), d)
            cases[name] = fb(lambda lay=lay: lay(x))
            cases[f"{name}/ref"] = fb(lambda lay=lay: lay.base_layer(x) + lay.reference_forward(x, no_route))
            cases[f"{name}/adapter"] = fb(lambda lay=lay: lay.adapter_forward(x, no_route))
            cases[f"{name}/ref_adapter"] = fb(lambda lay=lay: lay.reference_forward(x, no_route))
        task_route = Route(ids, None, False)
        for name, cfg_fn in task_methods.items():
            lay = standalone(cfg_fn(), d)

            def fast(lay=lay):
                with lay.routing.scope(ids, None, record=False):
                    return lay(x)

            cases[name] = fb(fast)
            cases[f"{name}/ref"] = fb(lambda lay=lay: lay.base_layer(x) + task_loop_reference(lay, x, ids))
            cases[f"{name}/adapter"] = fb(lambda lay=lay: lay.adapter_forward(x, task_route))
            cases[f"{name}/ref_adapter"] = fb(lambda lay=lay: task_loop_reference(lay, x, ids))
        t = interleaved(cases, repeats=args.repeats, warmup=args.warmup, min_seconds=0.0 if args.quick else 0.03,
                        extra_rounds=args.extra_rounds)
        log(args, f"layer d={d} E={E} r={r}: {len(cases)} cases")
        for name in list(token_methods) + list(task_methods):
            token = name in token_methods
            lora_ref = "lora_equal" if token else "lora_r"
            rows.append({
                "d": d, "E": E, "r": r, "tokens": n_tokens, "method": name, "routing": "token" if token else "task",
                "lora_rank": E * r if token else r,
                "fast_ms": rounded(t.median(name) * 1e3), "ref_ms": rounded(t.median(f"{name}/ref") * 1e3),
                "lora_ms": rounded(t.median(lora_ref) * 1e3), "base_ms": rounded(t.median("base") * 1e3),
                "ref_vs_fast": rounded(t.ratio(f"{name}/ref", name)),
                "fast_vs_lora": rounded(t.ratio(name, lora_ref)),
                "adapter_fast_ms": rounded(t.median(f"{name}/adapter") * 1e3),
                "adapter_ref_ms": rounded(t.median(f"{name}/ref_adapter") * 1e3),
                "adapter_lora_ms": rounded(t.median(f"{lora_ref}/adapter") * 1e3),
                "adapter_ref_vs_fast": rounded(t.ratio(f"{name}/ref_adapter", f"{name}/adapter")),
                "adapter_fast_vs_lora": rounded(t.ratio(f"{name}/adapter", f"{lora_ref}/adapter")),
            })
    return {"rows": rows, "note": "forward + backward of one adapted layer (frozen nn.Linear(d, d) + adapter), x of shape "
                                  "(16, tokens/16, d) requiring grad, a fixed random output gradient, training mode. "
                                  "Token-routed: defaults but aux losses off (the loop references have none), vs "
                                  "LoRA of rank E*r with dropout 0.05; reference = the layer's reference_forward loop "
                                  "over experts. Task-routed (E = skills / up-projections, 4 tasks mixed over 16 rows, "
                                  "dropout 0) vs LoRA of rank r; reference = a loop over the tasks present "
                                  "(lora_factors per task, rows selected and written back, as PEFT's mixed batches). "
                                  "'adapter' columns: the same without the base layer."}
