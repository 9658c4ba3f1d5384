"""A method defined outside ``src/``: the worked example of docs/guide.md ("Adding a method").

DenseMix: one shared down-projection A (r × d_in), E up-projections B_e (d_out × r) and a dense softmax
router with a temperature τ (no top-k):

    g = softmax(W_g x / τ),     Δy = s · Σ_e g_e(x) · B_e A drop(x),     s = lora_alpha / r

with an optional Switch balance loss "dense_mix_balance" (each token's largest gate counts as its
expert). One expert is plain LoRA (g = 1). Registering it is all it takes for the shared suites
(tests/method_cases.py lists it after the package's methods) and ``mtpeft bench --methods dense_mix``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtpeft.lib.config import (LowRankConfig, MethodSpec, check_non_negative, check_positive_int, check_positive_number,
                           field_help, register_method)
from mtpeft.lib.core.dropout import dropout_linear, make_dropout
from mtpeft.lib.core.init import kaiming_uniform_
from mtpeft.lib.core.routing import TokenRoutedLayer, argmax_selected, gate_shared_block, switch_balance_loss


@dataclass
class DenseMixConfig(LowRankConfig):
    method = "dense_mix"

    r: int = field_help("rank of the shared A and of every B_e", 4)
    n_experts: int = field_help("number of up-projections E", 3)
    temperature: float = field_help("τ of the router softmax", 1.0)
    balance_weight: float = field_help("weight of the Switch balance loss 'dense_mix_balance'", 0.01)

    def __post_init__(self) -> None:
        super().__post_init__()  # r, lora_alpha, lora_dropout are checked by LowRankConfig
        check_positive_int(type(self).__name__, "n_experts", self.n_experts)
        check_positive_number(type(self).__name__, "temperature", self.temperature)
        check_non_negative(type(self).__name__, "balance_weight", self.balance_weight)

    def parameters_per_layer(self, d_in: int, d_out: int, layer_index: int = 0, n_layers: int = 1) -> int:
        """Closed form: r·d_in + E·r·d_out + E·d_in (shared A, heads, router)."""
        return self.r * d_in + self.n_experts * (self.r * d_out + d_in)


class DenseMixLayer(TokenRoutedLayer):
    parameter_roles = {"lora_A": "shared", "lora_B": "expert", "router": "router"}

    def create_parameters(self, factory: dict) -> None:
        e, r = self.config.n_experts, self.config.r
        self.n_experts, self.r, self.scaling = e, r, self.config.scaling
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))  # (r, d_in), shared
        self.lora_B = nn.Parameter(torch.empty(e, r, self.out_features, **factory))  # (E, r, d_out)
        self.router = nn.Parameter(torch.empty(e, self.in_features, **factory))  # (E, d_in)
        self.dropout = make_dropout(self.config.lora_dropout)

    def reset_parameters(self) -> None:
        kaiming_uniform_(self.lora_A, fan_in=self.in_features)
        nn.init.zeros_(self.lora_B)
        kaiming_uniform_(self.router, fan_in=self.in_features)

    def gates(self, x2d: torch.Tensor) -> torch.Tensor:
        """g = softmax(W_g x / τ) for tokens (N, d_in) -> (N, E), in at least fp32."""
        logits = (x2d @ self.router.T).to(torch.promote_types(x2d.dtype, torch.float32))
        return torch.softmax(logits / self.config.temperature, dim=-1)

    def delta_factors(self, x: torch.Tensor, route):
        x2d, lead, weight = self._flatten(x, route)  # (N, d_in)
        z = dropout_linear(self.dropout, x2d, self.lora_A)  # (N, r): A once per token
        probs = self.gates(x2d)  # (N, E)
        selected = argmax_selected(probs)
        if self._wants_aux(route) and self.config.balance_weight > 0:
            self._record_aux("dense_mix_balance", switch_balance_loss(probs, selected, 1, weight))
        self._record_stats(route, lead, probs, probs, selected, 1, weight)
        # (N, E·r) gated copies of z, (E·r, d_out) every B_e stacked: the base layer adds their product
        return gate_shared_block(z, probs, self.scaling), self.lora_B.view(-1, self.out_features)

    def expert_gates(self, x2d: torch.Tensor) -> torch.Tensor:
        return self.gates(x2d)

    def expert_factors(self):
        return [(self.lora_A, self.scaling * self.lora_B[e].T) for e in range(self.n_experts)]

    def reference_forward(self, x: torch.Tensor, route=None) -> torch.Tensor:
        """The definition as a loop over experts (the same dropout mask when the seed is the same)."""
        z = self.dropout(x) @ self.lora_A.T  # (..., r)
        g = self.gates(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)  # (..., E)
        return sum(g[..., e:e + 1].to(x.dtype) * self.scaling * (z @ self.lora_B[e]) for e in range(self.n_experts))


SPEC = register_method(MethodSpec(
    DenseMixConfig, DenseMixLayer, routing="token", export="distilled", can_add_tasks=False,
    aux_losses={"dense_mix_balance": "balance_weight"},
    test_config=DenseMixConfig,
    degenerate=lambda r, alpha, dropout, **kw: DenseMixConfig(n_experts=1, r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                              **kw),
    sized_config=lambda e, r, **kw: DenseMixConfig(n_experts=e, r=r, lora_alpha=2 * r, balance_weight=0.0, **kw),
    test_cases={"dense_mix_e1": dict(n_experts=1), "dense_mix_e2": dict(n_experts=2),
                "dense_mix_e5_r3": dict(n_experts=5, r=3)},
))
