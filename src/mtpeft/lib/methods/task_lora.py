"""Per-task LoRA: T independent LoRAs in one model; example i uses LoRA t_i.

    Δy_i = s · B_{t_i} A_{t_i} drop(x_i),   s = α / r

The "one adapter per task" baseline of every multi-task paper, trained on mixed-task batches (which
PEFT supports only at inference). A and B are stacked over tasks, (T, r, d_in) and (T, d_out, r);
a batch gathers each example's factors and runs two batched GEMMs, so the cost does not grow with
the number of distinct tasks in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import MethodSpec, register_method
from ..core.context import Route
from ..core.dropout import make_dropout
from ..core.init import kaiming_uniform_
from ..core.layer import AdaptedLayer
from ..core.task_ids import require_task_ids
from ..tasks_api import grow_task_parameter
from .lora import LoraConfig


@dataclass
class TaskLoraConfig(LoraConfig):
    method = "task_lora"
    task_routed = True

    def parameters_per_layer(self, d_in: int, d_out: int, layer_index: int = 0, n_layers: int = 1) -> int:
        """Closed form: T·r·(d_in + d_out), one LoRA per task."""
        return self.n_tasks * self.r * (d_in + d_out)


class TaskLoraLayer(AdaptedLayer):
    mergeable = True
    parameter_roles = {"lora_A": "task", "lora_B": "task"}

    def create_parameters(self, factory: dict) -> None:
        t, r = self.config.n_tasks, self.config.r
        self.lora_A = nn.Parameter(torch.empty(t, r, self.in_features, **factory))  # (T, r, d_in)
        self.lora_B = nn.Parameter(torch.empty(t, self.out_features, r, **factory))  # (T, d_out, r)
        self.dropout = make_dropout(self.config.lora_dropout)
        self.scaling = self.config.scaling

    def reset_parameters(self) -> None:
        kaiming_uniform_(self.lora_A, fan_in=self.in_features)
        nn.init.zeros_(self.lora_B)

    def add_tasks(self, n: int) -> None:
        """Append n fresh LoRAs (A kaiming, B zero), as at construction."""
        grow_task_parameter(self, "lora_A", n, lambda a: kaiming_uniform_(a, fan_in=self.in_features))
        grow_task_parameter(self, "lora_B", n, nn.init.zeros_)

    def adapter_forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        ids = require_task_ids(route, self.config.method).to(x.device)
        rows = x.reshape(x.shape[0], -1, x.shape[-1])  # (rows, tokens, d_in)
        a = self.lora_A[ids]  # (rows, r, d_in)
        b = self.lora_B[ids]  # (rows, d_out, r)
        z = torch.bmm(self.dropout(rows), a.transpose(1, 2)) * self.scaling  # (rows, tokens, r)
        return torch.bmm(z, b.transpose(1, 2)).reshape(*x.shape[:-1], self.out_features)

    def lora_factors(self, task: int | None):
        if task is None:
            raise ValueError("per-task LoRA holds one LoRA per task: pass task=t to merge or export.")
        return self.lora_A[task], self.lora_B[task] * self.scaling


register_method(MethodSpec(
    TaskLoraConfig, TaskLoraLayer, routing="task", export="exact", can_add_tasks=True,
    test_config=lambda **kw: TaskLoraConfig(**{"r": 4, "lora_dropout": 0.0, **kw}),
    sized_config=lambda e, r, **kw: TaskLoraConfig(r=r, **kw),  # the bench sets n_tasks
    # one task: every example uses the same LoRA
    degenerate=lambda r, alpha, dropout, **kw: TaskLoraConfig(
        **{"r": r, "lora_alpha": alpha, "lora_dropout": dropout, **kw, "n_tasks": 1}),
))
