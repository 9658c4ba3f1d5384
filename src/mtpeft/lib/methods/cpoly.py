"""C-Poly (Wang et al., "Customizable Combination of Parameter-Efficient Modules for Multi-Task
Learning", ICLR 2024): Poly's shared skills plus skills that belong to one task only.

    w^c_t  = Poly's weights over the S common skills       (Gumbel-sigmoid in training, sigmoid in eval,
                                                             normalised to sum 1 per split)
    w^e_t  = 1 with one exclusive skill; with several, a per-task logit table through the same
             Gumbel-sigmoid / sigmoid, normalised among the task's own exclusive skills
    A_t    = Σ_s w^c_{t,s} A_s + Σ_j w^e_{t,j} A^t_j ,   B_t likewise      (parameter space)
    Δy     = (x A_t) B_t / r

A task never uses another task's exclusive skills. The two sums are normalised separately (each to
1; METHODS.md §9), so a task's update is "common mixture + own mixture", not one mixture over S + E.
With n_exclusive = 0 this is exactly Poly (same parameters, same computation); n_splits > 1 applies
MHR's splits to both kinds.

Layout (common part identical to Poly / PEFT's poly):
    poly_lora_A         (h, S, d_in/h, r)          shared, kaiming per (split, skill)
    poly_lora_B         (h, S, r, d_out/h)         shared, zeros
    module_logits       (T, h·S)                   router, U(±1e-3)
    exclusive_lora_A    (T, h, E, d_in/h, r)       per task, kaiming per (task, split, skill)
    exclusive_lora_B    (T, h, E, r, d_out/h)      per task, zeros
    exclusive_logits    (T, h·E)                   router, U(±1e-3); only when E > 1
Parameters: S·r(d_in+d_out) + T·h·S + T·E·r(d_in+d_out) (+ T·h·E when E > 1).

Choices between readings: as Poly (noise per example by default; see ``mtpeft.lib.methods.poly``).
``unknown_task="average"``: an unseen task uses the common skills with uniform weights 1/S and no
exclusive skill. With ``add_tasks(n, train_only_routing=True)`` the new tasks' exclusive skills stay
frozen at their init and only their routing logits train. Mixing is in parameter space, so a frozen
exclusive skill still matters: its B = 0 adds nothing to B_t, but its random A enters A_t and meets
the common B's (the same holds for every task at construction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import field_help, register_method
from ..core.init import kaiming_uniform_
from ..tasks_api import grow_task_parameter, routing_table
from .poly import LOGIT_INIT, PolyConfig, PolyLayer, normalised_skill_weights, poly_spec


@dataclass
class CPolyConfig(PolyConfig):
    method = "cpoly"

    r: int = field_help("rank of each skill's LoRA (common and exclusive)", 2)
    n_skills: int = field_help("S_common: number of skills shared by all tasks", 3)
    n_exclusive: int = field_help("E: number of skills each task owns alone (0 gives Poly)", 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.n_exclusive, bool) or not isinstance(self.n_exclusive, int) or self.n_exclusive < 0:
            raise ValueError(f"{type(self).__name__}.n_exclusive must be an integer >= 0, got {self.n_exclusive!r}.")


class CPolyLayer(PolyLayer):
    parameter_roles = {**PolyLayer.parameter_roles, "exclusive_lora_A": "task", "exclusive_lora_B": "task",
                       "exclusive_logits": "router"}

    def create_parameters(self, factory: dict) -> None:
        super().create_parameters(factory)
        cfg = self.config
        t, h, e, r = cfg.n_tasks, cfg.n_splits, cfg.n_exclusive, cfg.r
        if e == 0:
            return
        d_in, d_out = self.in_features // h, self.out_features // h
        self.exclusive_lora_A = nn.Parameter(torch.empty(t, h, e, d_in, r, **factory))  # (T, h, E, d_in/h, r)
        self.exclusive_lora_B = nn.Parameter(torch.empty(t, h, e, r, d_out, **factory))  # (T, h, E, r, d_out/h)
        if e > 1:
            self.exclusive_logits = nn.Parameter(torch.empty(t, h * e, **factory))  # (T, h·E)

    def _init_exclusive_A(self, a: torch.Tensor) -> None:
        kaiming_uniform_(a, fan_in=self.in_features // self.config.n_splits)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.config.n_exclusive == 0:
            return
        self._init_exclusive_A(self.exclusive_lora_A)
        nn.init.zeros_(self.exclusive_lora_B)
        if self.config.n_exclusive > 1:
            nn.init.uniform_(self.exclusive_logits, -LOGIT_INIT, LOGIT_INIT)

    def add_tasks(self, n: int) -> None:
        super().add_tasks(n)
        if self.config.n_exclusive == 0:
            return
        grow_task_parameter(self, "exclusive_lora_A", n, self._init_exclusive_A)
        grow_task_parameter(self, "exclusive_lora_B", n, nn.init.zeros_)
        if self.config.n_exclusive > 1:
            grow_task_parameter(self, "exclusive_logits", n,
                                lambda t: nn.init.uniform_(t, -LOGIT_INIT, LOGIT_INIT))

    def exclusive_weights(self, tasks: torch.Tensor, sample: bool) -> torch.Tensor:
        """Weights of each task's own skills, fp32: (G, h, E); zero for the unknown slot."""
        cfg = self.config
        h, e, n_tasks = cfg.n_splits, cfg.n_exclusive, self.n_tasks
        if e == 1:
            w = torch.ones(tasks.shape[0], h, 1, device=tasks.device)
        else:
            table = routing_table(self, self.exclusive_logits).float()  # (T, h·E)
            logits = table[tasks.clamp(max=n_tasks - 1)].view(-1, h, e)
            w = normalised_skill_weights(logits, sample)
        if cfg.unknown_task == "average":
            w = w * (tasks < n_tasks).to(w.dtype)[:, None, None]
        return w

    def add_task_skills(self, tasks, a, b, sample):
        if self.config.n_exclusive == 0:
            return a, b
        w = self.exclusive_weights(tasks, sample).to(a.dtype)  # (G, h, E)
        own = tasks.clamp(max=self.n_tasks - 1)  # the unknown slot has weight 0
        a = a + torch.einsum("gqe,gqedr->gqdr", w, self.exclusive_lora_A[own])  # (G, h, d_in/h, r)
        b = b + torch.einsum("gqe,gqerd->gqrd", w, self.exclusive_lora_B[own])  # (G, h, r, d_out/h)
        return a, b

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_exclusive={self.config.n_exclusive}"


register_method(poly_spec(
    CPolyConfig, CPolyLayer,
    test_config=lambda **kw: CPolyConfig(**kw),  # its defaults are small (r=2, S=3, E=1)
    sized_config=lambda e, r, **kw: CPolyConfig(r=r, n_skills=e, **kw),
    test_cases={"cpoly": {}, "cpoly_e2": {"n_exclusive": 2, "n_splits": 2}},
))
