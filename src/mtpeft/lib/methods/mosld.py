"""MoSLD (Zhao et al., COLING 2025, "MoSLD: An Extremely Parameter-Efficient Mixture-of-Shared LoRAs
for Multi-Task Learning").

One down-projection A (r×d_in) shared by all experts of the module, one up-projection B_e (d_out×r)
per expert, a bias-free softmax router per module with top-k (k=2) and renormalised weights:

    z = Ã x  (once per token),     Δy = s · Σ_{e∈topk(x)} g_e(x) · B_e z,     s = α / r

Dropout is DropConnect on the shared A's weights, not on activations: in training a Bernoulli mask
of A's shape with keep probability 1−p, Ã = mask ⊙ A / (1−p), one mask per forward of the module
(shared by all tokens and experts); at eval Ã = A. p = 0.1; p = 0 gives "MoSL".

The number of experts may differ per layer: ``expert_schedule="increasing"`` gives the layers in
the k-th quarter of the layer stack ``expert_counts[k]`` experts, default (2, 4, 6, 8) from the
lowest to the highest layers; "decreasing" uses the counts reversed (8, 6, 4, 2); "flat" gives every
layer ``n_experts``. Quarter of layer i of n: ⌊4·i / n⌋ (with fewer than 4 layers some quarters are
empty, e.g. 2 layers get 2 and 6 experts).

Fast path, two GEMMs whatever E is: z = x·Ãᵀ (N, r); the gates scale E copies of z formed by
broadcasting (N, E·r); one GEMM with B_cat (E·r, d_out) (B stored input-major (E, r, d_out), so
B_cat is a free view). Unselected experts get a zero gate. ``reference_forward`` is the loop.

Loss "mosld_balance" (weight 0.001): Switch load balance E·Σ_e f_e·P_e over non-padding tokens per
module, summed over modules (layers with different E each use their own E).

Choices between readings: the router is initialised like torch's nn.Linear (U(±1/√d_in)); A
kaiming-uniform, B_e zeros; there is no activation dropout (the paper's dropout is the DropConnect);
with a per-layer schedule the router statistics of layers with different E are aligned by index in
``task_expert_load``. Defaults: r=8, α=16, k=2, p=0.1, schedule (2,4,6,8) increasing, targets q,v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import (MethodSpec, ScaledRankConfig, check_choice, check_non_negative, check_positive_int,
                      check_probability, field_help, register_method)
from ..core.context import Route
from ..core.init import kaiming_uniform_
from ..core.routing import (TokenRoutedLayer, gate_shared_block, router_dtype, router_probs, switch_balance_loss,
                            top_k_gates)

SCHEDULES = ("increasing", "decreasing", "flat")


@dataclass
class MoSLDConfig(ScaledRankConfig):
    """No ``lora_dropout``: MoSLD's dropout is the DropConnect on A (``dropconnect``)."""

    method = "mosld"

    r: int = field_help("rank of the shared A and of every B_e", 8)  # redeclared for its help (ScaledRankConfig)
    top_k: int = field_help("experts per token; the kept router weights are renormalised to sum 1", 2)
    dropconnect: float = field_help("DropConnect probability p on the shared A's weights (0 = MoSL)", 0.1)
    expert_schedule: str = field_help(
        "experts per layer: 'increasing' (expert_counts over the four quarters of the layer stack, low "
        "to high), 'decreasing' (the counts reversed) or 'flat' (n_experts everywhere)", "increasing")
    expert_counts: list[int] = field_help("experts in the four quarters of the layer stack, lowest first",
                                          default_factory=lambda: [2, 4, 6, 8])
    n_experts: int = field_help("experts per layer when expert_schedule='flat'", 4)
    balance_weight: float = field_help("weight of the Switch load-balance loss 'mosld_balance'", 0.001)

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        for f in ("top_k", "n_experts"):
            check_positive_int(name, f, getattr(self, f))
        check_probability(name, "dropconnect", self.dropconnect)
        check_choice(name, "expert_schedule", self.expert_schedule, SCHEDULES)
        self.expert_counts = list(self.expert_counts)
        if len(self.expert_counts) != 4:
            raise ValueError(f"{name}.expert_counts must give 4 counts (one per quarter of the layer stack), "
                             f"got {self.expert_counts!r}.")
        for count in self.expert_counts:
            check_positive_int(name, "expert_counts[...]", count)
        used = [self.n_experts] if self.expert_schedule == "flat" else self.expert_counts
        if self.top_k > min(used):
            raise ValueError(f"{name}.top_k={self.top_k} exceeds the smallest expert count {min(used)} of "
                             f"the {self.expert_schedule!r} schedule.")
        check_non_negative(name, "balance_weight", self.balance_weight)

    def experts_for_layer(self, layer_index: int, n_layers: int) -> int:
        """Experts of a layer at ``layer_index`` in a stack of ``n_layers`` (see the module docstring)."""
        if self.expert_schedule == "flat":
            return self.n_experts
        quarter = min(3, max(0, 4 * layer_index // max(n_layers, 1)))
        counts = self.expert_counts if self.expert_schedule == "increasing" else self.expert_counts[::-1]
        return counts[quarter]

    def parameters_per_layer(self, d_in: int, d_out: int, layer_index: int = 0, n_layers: int = 1) -> int:
        """Closed form: r·d_in + E·r·d_out + E·d_in (shared A, experts' B, router)."""
        e = self.experts_for_layer(layer_index, n_layers)
        return self.r * d_in + e * self.r * d_out + e * d_in


class MoSLDLayer(TokenRoutedLayer):
    parameter_roles = {"lora_A": "shared", "lora_B": "expert", "router": "router"}

    def create_parameters(self, factory: dict) -> None:
        cfg = self.config
        e = cfg.experts_for_layer(self.layer_index, self.n_layers)
        self.n_experts, self.top_k, self.r = e, cfg.top_k, cfg.r
        self.lora_A = nn.Parameter(torch.empty(cfg.r, self.in_features, **factory))  # (r, d_in), shared
        self.lora_B = nn.Parameter(torch.empty(e, cfg.r, self.out_features, **factory))  # (E, r, d_out)
        self.router = nn.Parameter(torch.empty(e, self.in_features, **factory))  # (E, d_in)
        self.dropconnect = cfg.dropconnect
        self.scaling = cfg.scaling

    def reset_parameters(self) -> None:
        kaiming_uniform_(self.lora_A, fan_in=self.in_features)
        nn.init.zeros_(self.lora_B)
        kaiming_uniform_(self.router, fan_in=self.in_features)

    def shared_A(self) -> torch.Tensor:
        """Ã: A with a fresh DropConnect mask in training (one per call), A itself at eval."""
        p = self.dropconnect
        if not self.training or p == 0:
            return self.lora_A
        # Uniforms in fp32 whatever A's dtype: bf16 uniforms are coarse (steps of 2^-9 near 1), and the same
        # seed then draws the same mask in fp32 and bf16.
        keep = torch.rand(self.lora_A.shape, device=self.lora_A.device) >= p  # Bernoulli(1 − p), A's shape
        return self.lora_A * keep.to(self.lora_A.dtype) / (1.0 - p)

    # ------------------------------------------------------------------ fast path
    def delta_factors(self, x: torch.Tensor, route: Route) -> tuple[torch.Tensor, torch.Tensor]:
        x2d, lead, weight = self._flatten(x, route)  # (N, d_in)
        e, r = self.n_experts, self.r
        a = self.shared_A()  # (r, d_in)
        probs = router_probs(x2d, self.router)  # (N, E) fp32
        gates, selected = top_k_gates(probs, self.top_k)
        z = x2d @ a.T  # (N, r): the shared A once per token
        gated = gate_shared_block(z, gates, self.scaling)  # (N, E·r)
        if self._wants_aux(route) and self.config.balance_weight > 0:
            self._record_aux("mosld_balance", switch_balance_loss(probs, selected, self.top_k, weight))
        self._record_stats(route, lead, probs, gates, selected, self.top_k, weight)
        # Δy = gated blocks (N, E·r) @ B_cat (E·r, d_out): the base layer adds it into its output (addmm_)
        return gated, self.lora_B.view(e * r, -1)

    # ------------------------------------------------------------------ export (distillation)
    def expert_gates(self, x2d: torch.Tensor) -> torch.Tensor:
        """Eval-mode weight of each expert per token (N, E): top-k renormalised gates, 0 off the top-k."""
        return top_k_gates(router_probs(x2d, self.router), self.top_k)[0]

    def expert_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per expert (A (r, d_in) shared, no DropConnect at eval; B_e (d_out, r) with s folded in)."""
        return [(self.lora_A, self.scaling * self.lora_B[e].T) for e in range(self.n_experts)]

    # ------------------------------------------------------------------ reference
    def reference_forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        """Plain loop over experts (the definition), for tests. Draws the same DropConnect mask first."""
        a = self.shared_A()
        probs = torch.softmax((x @ self.router.T).to(router_dtype(x.dtype)), dim=-1)  # (..., E)
        top_vals, top_idx = probs.topk(self.top_k, dim=-1)
        denom = top_vals.sum(-1)
        out = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
        for e in range(self.n_experts):
            chosen = (top_idx == e).any(-1)
            g = torch.where(chosen, probs[..., e] / denom, torch.zeros_like(denom)).to(x.dtype)
            out = out + g.unsqueeze(-1) * self.scaling * ((x @ a.T) @ self.lora_B[e])
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.n_experts}, top_k={self.top_k}, r={self.r}"


register_method(MethodSpec(
    MoSLDConfig, MoSLDLayer, routing="token", export="distilled", can_add_tasks=False,
    aux_losses={"mosld_balance": "balance_weight"},
    test_config=MoSLDConfig,
    degenerate=lambda r, alpha, dropout, **kw: MoSLDConfig(expert_schedule="flat", n_experts=1, top_k=1, r=r,
                                                           lora_alpha=alpha, dropconnect=dropout, **kw),
    sized_config=lambda e, r, **kw: MoSLDConfig(expert_schedule="flat", n_experts=e, r=r, lora_alpha=2 * r,
                                                balance_weight=0.0, **kw),
    test_cases={"mosld_flat_e1_k1": dict(expert_schedule="flat", n_experts=1, top_k=1),
                "mosld_flat_e3_k2": dict(expert_schedule="flat", n_experts=3, top_k=2),
                "mosld_flat_e8_k2": dict(expert_schedule="flat", n_experts=8, top_k=2),
                "mosld_flat_e4_k4": dict(expert_schedule="flat", n_experts=4, top_k=4),
                "mosld_increasing_k2": dict(expert_schedule="increasing", top_k=2)},
))
