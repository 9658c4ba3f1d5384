"""HydraLoRA (Tian et al., NeurIPS 2024, "HydraLoRA: An Asymmetric LoRA Architecture for Efficient
Fine-Tuning"), the asymmetric-LoRA baseline.

One A (r×d_in) shared by E heads B_e (d_out×r); a dense, bias-free softmax router on the token:

    g = softmax(W_g x),     Δy = s · Σ_e g_e(x) · B_e A drop(x),     s = α / r

A is computed once per token (a known performance bug elsewhere recomputes it per head): z = A drop(x)
(N, r); the gates scale E broadcast copies of z (N, E·r); one GEMM with B_cat (E·r, d_out) (B stored
input-major (E, r, d_out) so B_cat is a free view). ``reference_forward`` is the loop over heads.

Choices between readings: the paper has no auxiliary loss; ``balance_weight`` (default 0) optionally
adds a Switch balance loss "hydralora_balance" with each token's largest gate as its routed head.
The router is initialised like torch's nn.Linear (U(±1/√d_in)), A kaiming-uniform, B zeros. Router
statistics count each token's largest gate as its routed head (the router is dense). Defaults (not
fixed by the spec): E=4 heads, r=8, α=16, dropout 0.05 on x, targets q and v like LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import LowRankConfig, MethodSpec, check_non_negative, check_positive_int, field_help, register_method
from ..core.context import Route
from ..core.init import kaiming_uniform_
from ..core.routing import (TokenRoutedLayer, argmax_selected, gate_shared_block, router_dtype, router_probs,
                            switch_balance_loss)
from ..core.dropout import dropout_linear, make_dropout


@dataclass
class HydraLoraConfig(LowRankConfig):
    method = "hydralora"

    n_experts: int = field_help("number of B heads E", 4)
    # r, lora_alpha, lora_dropout (and their checks, and scaling = α / r) come from LowRankConfig;
    # redeclared here only for this method's defaults and help.
    r: int = field_help("rank of the shared A and of every B_e", 8)
    lora_dropout: float = field_help("dropout on the adapter input x", 0.05)
    balance_weight: float = field_help(
        "weight of an optional Switch balance loss 'hydralora_balance' (0: off, as in the paper)", 0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_positive_int(name, "n_experts", self.n_experts)
        check_non_negative(name, "balance_weight", self.balance_weight)

    def aux_loss_weights(self) -> dict[str, float]:
        """The balance loss is opt-in (the paper has none): listed only when its weight is > 0."""
        return {k: w for k, w in super().aux_loss_weights().items() if w > 0}

    def parameters_per_layer(self, d_in: int, d_out: int, layer_index: int = 0, n_layers: int = 1) -> int:
        """Closed form: r·d_in + E·r·d_out + E·d_in (shared A, heads, router)."""
        e = self.n_experts
        return self.r * d_in + e * self.r * d_out + e * d_in


class HydraLoraLayer(TokenRoutedLayer):
    parameter_roles = {"lora_A": "shared", "lora_B": "expert", "router": "router"}

    def create_parameters(self, factory: dict) -> None:
        cfg = self.config
        e, r = cfg.n_experts, cfg.r
        self.n_experts, self.r = e, r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))  # (r, d_in), shared
        self.lora_B = nn.Parameter(torch.empty(e, r, self.out_features, **factory))  # (E, r, d_out)
        self.router = nn.Parameter(torch.empty(e, self.in_features, **factory))  # (E, d_in)
        self.dropout = make_dropout(cfg.lora_dropout)
        self.scaling = cfg.scaling

    def reset_parameters(self) -> None:
        kaiming_uniform_(self.lora_A, fan_in=self.in_features)
        nn.init.zeros_(self.lora_B)
        kaiming_uniform_(self.router, fan_in=self.in_features)

    # ------------------------------------------------------------------ fast path
    def delta_factors(self, x: torch.Tensor, route: Route) -> tuple[torch.Tensor, torch.Tensor]:
        x2d, lead, weight = self._flatten(x, route)  # (N, d_in)
        e, r = self.n_experts, self.r
        z = dropout_linear(self.dropout, x2d, self.lora_A)  # (N, r): A once per token, on drop(x)
        probs = router_probs(x2d, self.router)  # (N, E) fp32, dense
        gated = gate_shared_block(z, probs, self.scaling)  # (N, E·r)
        need_selected = route.record or (self._wants_aux(route) and self.config.balance_weight > 0)
        selected = argmax_selected(probs) if need_selected else None
        if self._wants_aux(route) and self.config.balance_weight > 0:
            self._record_aux("hydralora_balance", switch_balance_loss(probs, selected, 1, weight))
        if route.record:
            self._record_stats(route, lead, probs, probs, selected, 1, weight)
        # Δy = gated blocks (N, E·r) @ B_cat (E·r, d_out): the base layer adds it into its output (addmm_)
        return gated, self.lora_B.view(e * r, -1)

    # ------------------------------------------------------------------ export (distillation)
    def expert_gates(self, x2d: torch.Tensor) -> torch.Tensor:
        """Eval-mode weight of each head per token (N, E): the dense softmax g."""
        return router_probs(x2d, self.router)

    def expert_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per head (A (r, d_in) shared, B_e (d_out, r) with s folded in): Δy = Σ_e g_e(x) B_e A x at eval."""
        return [(self.lora_A, self.scaling * self.lora_B[e].T) for e in range(self.n_experts)]

    # ------------------------------------------------------------------ reference
    def reference_forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        """Plain loop over heads (the definition), for tests. Draws the same dropout mask first."""
        xd = self.dropout(x)
        probs = torch.softmax((x @ self.router.T).to(router_dtype(x.dtype)), dim=-1)  # (..., E)
        out = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
        for e in range(self.n_experts):
            head = (xd @ self.lora_A.T) @ self.lora_B[e]  # B_e A drop(x)
            out = out + probs[..., e:e + 1].to(x.dtype) * self.scaling * head
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads={self.n_experts}, r={self.r}"


register_method(MethodSpec(
    HydraLoraConfig, HydraLoraLayer, routing="token", export="distilled", can_add_tasks=False,
    aux_losses={"hydralora_balance": "balance_weight"},
    test_config=HydraLoraConfig,
    degenerate=lambda r, alpha, dropout, **kw: HydraLoraConfig(n_experts=1, r=r, lora_alpha=alpha,
                                                               lora_dropout=dropout, **kw),
    sized_config=lambda e, r, **kw: HydraLoraConfig(n_experts=e, r=r, lora_alpha=2 * r, **kw),
    test_cases={"hydralora_e1": dict(n_experts=1), "hydralora_e2_r3": dict(n_experts=2, r=3),
                "hydralora_e4": dict(n_experts=4), "hydralora_e7_r1": dict(n_experts=7, r=1)},
))
