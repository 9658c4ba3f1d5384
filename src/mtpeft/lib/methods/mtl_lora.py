"""MTL-LoRA (Yang et al., "MTL-LoRA: Low-Rank Adaptation for Multi-Task Learning", AAAI 2025).

    π_t  = softmax(w_t / τ)                 (computed in fp32)
    B̃_t  = Σ_i π_{t,i} B^i
    Δy   = s · B̃_t Λ_t A drop(x),           s = α / r

Shapes (per adapted linear, T tasks, n up-projections):
    A (lora_A)          (r, d_in)      shared by all tasks, kaiming-uniform U(±1/√d_in)
    Λ (lora_lambda)     (T, r, r)      per task, init identity     [lambda_type="diagonal": (T, r), init ones]
    B (lora_B)          (n, d_out, r)  a pool shared by all tasks, zero init (so ΔW = 0 at init)
    w (task_logits)     (T, n)         per task, init kaiming U(±1/√n)   [router_init="zeros": uniform start]

Parameters: r·d_in + n·r·d_out + T·r² + T·n (diagonal Λ: T·r instead of T·r²).

How it runs: z = drop(x) Aᵀ is computed once for the whole batch (A is shared). For each of the G
tasks present in the batch, C_t = B̃_t Λ_t (d_out × r) is built once. A single-task batch is then
LoRA's second GEMM, s·z C_tᵀ; in a mixed batch each token's s·z is placed in its task's r-column block
of an (N, G·r) matrix (zeros elsewhere) and one GEMM with [C_1ᵀ; …; C_Gᵀ] (G·r × d_out) gives Δy,
added into the base output in place (faster on CPU than a gathered C per row and a batched GEMM, at
G·r extra columns). For a fixed task the update is the rank-≤r matrix s · C_t A, so the layer merges
into W0 and exports as a plain LoRA (A, s·C_t).

Choices between readings (this module follows mtpeft's METHODS.md §7):
* Λ_t is a full r×r matrix initialised to the identity (the paper's "task-specific transformation");
  ``lambda_type="diagonal"`` keeps only a per-task diagonal (initialised to ones) for a cheaper
  variant.
* The mixing logits start kaiming-uniform U(±1/√n) (fan-in n), so tasks start with slightly
  different mixtures; ``router_init="zeros"`` starts every task from uniform mixing instead.
* The softmax temperature τ divides the logits (τ < 1 sharpens); default 0.1.
* Dropout acts on the input x, as in LoRA. No auxiliary loss.
* ``unknown_task="average"``: an unseen task id (outside [0, T)) uses the mean Λ over tasks and the
  mean mixing weights π over tasks (means of the per-task quantities, not of the logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import (LowRankConfig, MethodSpec, check_choice, check_positive_int, check_positive_number,
                      field_help, register_method)
from ..core.context import Route, expand_rows
from ..core.init import kaiming_uniform_
from ..core.layer import AdaptedLayer
from ..core.routing import gate_shared_block, one_hot
from ..tasks_api import UNKNOWN_TASK_CHOICES, UNKNOWN_TASK_HELP, grow_task_parameter, routing_table
from ..core.dropout import dropout_linear, make_dropout
from ..core.task_ids import require_task_ids


@dataclass
class MTLLoraConfig(LowRankConfig):
    method = "mtl_lora"
    task_routed = True
    default_targets = "attention_all"

    # r, lora_alpha, lora_dropout (and their checks, and scaling = α / r) come from LowRankConfig;
    # redeclared here only for this method's defaults and help.
    r: int = field_help("rank of the shared down-projection A and of Λ_t", 8)
    lora_dropout: float = field_help("dropout on the adapter input x", 0.05)
    n_up: int = field_help("n: number of up-projections B^1..B^n shared by all tasks", 3)
    temperature: float = field_help("τ of the per-task softmax over up-projections: π_t = softmax(w_t / τ)", 0.1)
    lambda_type: str = field_help('"full": Λ_t is r×r, init identity; "diagonal": per-task diagonal, init ones',
                                  "full")
    router_init: str = field_help('init of the task logits w_t: "kaiming" U(±1/√n), or "zeros" (uniform start)',
                                  "kaiming")
    unknown_task: str = field_help(UNKNOWN_TASK_HELP + " (MTL-LoRA: mean Λ and mean mixing weights)", "error")

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_positive_int(name, "n_up", self.n_up)
        check_positive_number(name, "temperature", self.temperature)
        check_choice(name, "lambda_type", self.lambda_type, ("full", "diagonal"))
        check_choice(name, "router_init", self.router_init, ("kaiming", "zeros"))
        check_choice(name, "unknown_task", self.unknown_task, UNKNOWN_TASK_CHOICES)


class MTLLoraLayer(AdaptedLayer):
    mergeable = True
    parameter_roles = {"lora_A": "shared", "lora_B": "shared", "lora_lambda": "task", "task_logits": "router"}

    def create_parameters(self, factory: dict) -> None:
        cfg = self.config
        t, r, n = cfg.n_tasks, cfg.r, cfg.n_up
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.empty(n, self.out_features, r, **factory))  # (n, d_out, r)
        lam_shape = (t, r, r) if cfg.lambda_type == "full" else (t, r)
        self.lora_lambda = nn.Parameter(torch.empty(*lam_shape, **factory))  # (T, r, r) or (T, r)
        self.task_logits = nn.Parameter(torch.empty(t, n, **factory))  # (T, n)
        self.dropout = make_dropout(cfg.lora_dropout)
        self.scaling = cfg.scaling

    # ------------------------------------------------------------------ init
    def _init_lambda(self, lam: torch.Tensor) -> None:
        with torch.no_grad():
            if lam.dim() == 3:  # (t, r, r): identity per task
                lam.copy_(torch.eye(lam.shape[-1], dtype=lam.dtype, device=lam.device).expand_as(lam))
            else:  # (t, r): diagonal, ones
                lam.fill_(1.0)

    def _init_logits(self, logits: torch.Tensor) -> None:
        if self.config.router_init == "zeros":
            nn.init.zeros_(logits)
        else:
            kaiming_uniform_(logits, fan_in=logits.shape[-1])  # U(±1/√n)

    def reset_parameters(self) -> None:
        kaiming_uniform_(self.lora_A, fan_in=self.in_features)
        nn.init.zeros_(self.lora_B)
        self._init_lambda(self.lora_lambda)
        self._init_logits(self.task_logits)

    def add_tasks(self, n: int) -> None:
        grow_task_parameter(self, "lora_lambda", n, self._init_lambda)
        grow_task_parameter(self, "task_logits", n, self._init_logits)

    @property
    def n_tasks(self) -> int:
        return self.task_logits.shape[0]

    # ------------------------------------------------------------------ per-task weights
    def mixing_weights(self, tasks: torch.Tensor) -> torch.Tensor:
        """π for each entry of ``tasks`` (G,), in fp32: (G, n). Slot n_tasks = unknown (mean π)."""
        logits = routing_table(self, self.task_logits).float()  # (T, n)
        table = torch.softmax(logits / self.config.temperature, dim=-1)  # (T, n)
        if self.config.unknown_task == "average":
            table = torch.cat([table, table.mean(0, keepdim=True)])  # (T+1, n)
        return table[tasks]

    def lambdas(self, tasks: torch.Tensor) -> torch.Tensor:
        """Λ for each entry of ``tasks``: (G, r, r), or (G, r) when diagonal. Slot n_tasks = mean Λ."""
        table = self.lora_lambda
        if self.config.unknown_task == "average":
            table = torch.cat([table, table.mean(0, keepdim=True)])
        return table[tasks]

    def task_matrices(self, tasks: torch.Tensor) -> torch.Tensor:
        """C_t = B̃_t Λ_t for each entry of ``tasks`` (G,): (G, d_out, r), in the adapter dtype."""
        return self.transposed_task_matrices(tasks).transpose(1, 2)

    def transposed_task_matrices(self, tasks: torch.Tensor) -> torch.Tensor:
        """C_tᵀ = Λ_tᵀ B̃_tᵀ for each entry of ``tasks`` (G,): (G, r, d_out), contiguous (the forward's
        right factor as a free view)."""
        n, d_out, r = self.lora_B.shape
        pi = self.mixing_weights(tasks).to(self.lora_B.dtype)  # (G, n)
        b_mix_t = (pi @ self.lora_B.reshape(n, d_out * r)).view(-1, d_out, r).transpose(1, 2)  # (G, r, d_out)
        lam = self.lambdas(tasks)
        if lam.dim() == 2:  # diagonal Λ: scale B̃'s columns
            return lam[:, :, None] * b_mix_t
        return lam.transpose(1, 2) @ b_mix_t  # (G, r, r) @ (G, r, d_out)

    # ------------------------------------------------------------------ forward
    def delta_factors(self, x: torch.Tensor, route: Route) -> tuple[torch.Tensor, torch.Tensor]:
        require_task_ids(route, self.config.method)
        groups = route.task_groups(self.n_tasks, self.config.unknown_task, x.device)  # the wrapper's plan
        c_t = self.transposed_task_matrices(groups.tasks)  # (G, r, d_out)
        g, r = c_t.shape[0], c_t.shape[1]
        right = c_t.reshape(g * r, self.out_features)  # (G·r, d_out): every C_tᵀ stacked
        x2d = x.reshape(-1, x.shape[-1])  # (N, d_in), N = rows · tokens, rows first
        z = dropout_linear(self.dropout, x2d, self.lora_A)  # (N, r): A is shared, computed once
        if g == 1:  # a single-task batch: exactly LoRA's two GEMMs
            return z * self.scaling, right
        # A mixed batch: each token's z goes to its task's block of an (N, G·r) matrix, zeros elsewhere,
        # so one GEMM with every task's C (as in the token-routed mixtures) replaces a gather of one C
        # per row and a batched GEMM, and the base layer adds it into its output in place.
        row_group = route.row_groups(groups)  # (rows,)
        token_group = expand_rows(row_group, x2d.shape[0] // row_group.shape[0])  # (N,): rows first, then tokens
        return gate_shared_block(z, one_hot(token_group, g), self.scaling), right  # (N, G·r), (G·r, d_out)

    def lora_factors(self, task: int | None):
        if task is None:
            raise ValueError("MTL-LoRA has per-task weights: pass task=t to merge or export.")
        c = self.task_matrices(torch.tensor([task], device=self.lora_A.device))[0]  # (d_out, r)
        return self.lora_A, c * self.scaling

    def extra_repr(self) -> str:
        cfg = self.config
        return f"{super().extra_repr()}, r={cfg.r}, n_up={cfg.n_up}, n_tasks={self.n_tasks}"


register_method(MethodSpec(
    MTLLoraConfig, MTLLoraLayer, routing="task", export="exact", can_add_tasks=True,
    task_table=lambda layer, tasks: layer.mixing_weights(tasks),  # (G, n): π_t over the up-projections
    unknown_task_field="unknown_task",
    test_config=lambda **kw: MTLLoraConfig(**{"r": 4, "n_up": 3, "lora_dropout": 0.0, **kw}),
    sized_config=lambda e, r, **kw: MTLLoraConfig(r=r, n_up=e, lora_dropout=0.0, **kw),
    test_cases={"mtl_lora": {}, "mtl_lora_diag": {"n_up": 2, "lambda_type": "diagonal"}},
))
