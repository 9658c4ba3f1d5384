"""How the experts or skills are used, as a task × expert (or task × skill) matrix for reports.

Token-routed methods record router statistics per forward; :class:`RoutingAccumulator` sums them over
an evaluation pass, and ``task_expert_load`` turns the sums into the share of each task's routing
that went to each expert. Task-routed methods have their task × skill weights in parameters, read in
eval mode through their MethodSpec's ``task_table`` (methods without one have nothing to show).
"""

from __future__ import annotations

import torch

from ..lib.config import spec_of
from ..lib.core.routing import task_expert_load

# statistics that are sums over tokens, so they add up over batches
_SUMMABLE = ("tokens", "topk_count", "task_tokens", "task_gate_sum", "task_topk_count")


class RoutingAccumulator:
    def __init__(self):
        self.stats: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, model) -> None:
        for module, stats in model.router_stats().items():
            into = self.stats.setdefault(module, {})
            if "top_k" in stats:
                into["top_k"] = stats["top_k"]
            for key in _SUMMABLE:
                if key not in stats:
                    continue
                value = stats[key].float().cpu()
                if key in into and into[key].shape != value.shape:  # more tasks seen later: grow
                    grown = torch.zeros(torch.Size(max(a, b) for a, b in zip(into[key].shape, value.shape)))
                    grown[tuple(slice(0, s) for s in into[key].shape)] += into[key]
                    grown[tuple(slice(0, s) for s in value.shape)] += value
                    into[key] = grown
                else:
                    into[key] = into.get(key, 0) + value


def _task_weight_table(layer, n_tasks: int) -> torch.Tensor | None:
    table = spec_of(layer.config).task_table
    if table is None:
        return None
    weights = table(layer, torch.arange(n_tasks)).detach().float().cpu()  # (T, ..., S)
    return weights.reshape(n_tasks, -1, weights.shape[-1]).mean(1)  # (T, S): averaged over splits


@torch.no_grad()
def routing_summary(model, accumulator: RoutingAccumulator | None, task_names: list[str]) -> dict | None:
    """JSON-ready {"kind", "rows", "cols", "matrix"} or None when the method has no routing to show."""
    if accumulator is not None and accumulator.stats and any(
            "task_topk_count" in s for s in accumulator.stats.values()):
        matrix = task_expert_load(accumulator.stats, kind="count")
        return {"kind": "token", "title": "share of each task's tokens routed to each expert",
                "rows": task_names, "cols": [f"expert {e}" for e in range(matrix.shape[1])],
                "matrix": matrix[: len(task_names)].tolist()}
    tables = [t for t in (_task_weight_table(layer, len(task_names)) for _, layer in model.adapted_layers())
              if t is not None]
    if not tables:
        return None
    width = max(t.shape[1] for t in tables)
    tables = [t for t in tables if t.shape[1] == width]
    matrix = torch.stack(tables).mean(0)
    return {"kind": "task", "title": "task x skill weights (eval mode), averaged over adapted modules",
            "rows": task_names, "cols": [f"skill {s}" for s in range(width)], "matrix": matrix.tolist()}
