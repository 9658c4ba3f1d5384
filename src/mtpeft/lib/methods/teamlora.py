"""TeamLoRA (Lin et al., ACL 2025, "TeamLoRA: Boosting Low-Rank Adaptation with Expert Collaboration
and Competition").

Collaboration: one A of rank r_A = E·r_B shared by the experts; its output z = A x is split into E
contiguous blocks of r_B; expert e owns B_e (d_out×r_B) and reads only block e. Dropout acts on z.
Competition: a dense router with an interaction matrix M (E×E, trainable; off-diagonal U(−0.1, 0.1),
diagonal 0 at init):

    φ = softmax(W_g x),   ψ = φ·(I + M),   ψ ← ψ / Σ_e ψ_e,   w = E·ψ   (uniform routing: w_e = 1)
    Δy = s · Σ_e w_e(x) · B_e drop(z)_e,   s = α / r_B

computed as s · (w ⊗ 1_{r_B} ⊙ drop(z)) · B_cat: one GEMM for A and one for the concatenated B,
the paper's efficiency claim. B is stored input-major (E, r_B, d_out) so B_cat is a free view.
``reference_forward`` is the loop over experts.

Guard: Σ_e ψ_e = 1 + φ·M·1 can approach 0 (or turn negative) once M is trained; the normaliser keeps
its sign and is pushed away from 0 to at least ``normalizer_eps`` in magnitude (a sum of exactly 0
counts as positive).

Loss "teamlora_balance" (weight λ = 1.0): mean_e( mean over non-padding tokens of w_e − 1 )²,
summed over adapted modules. The authors' code instead compares the E-scaled w with 1/E over all
tokens (padding included); both are minimised by the same uniform load; we use the spec's form,
which is scale-free in E and ignores padding.

Choices between readings: W_g is initialised like torch's nn.Linear (U(±1/√d_in)), A kaiming-uniform,
B zeros; ``use_interaction=False`` drops M (ψ = φ); router statistics report φ as the probability,
ψ (sums to 1) as the gate, and each token's largest ψ as its "routed" expert (the router is dense).
Defaults: E=4, r_B=8 (the paper's main table uses r_B=32), α = 2·r_B = 16, dropout 0.05, targets the
MLP projections (gate, up, down).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import (LowRankConfig, MethodSpec, check_non_negative, check_positive_int, check_positive_number,
                      field_help, register_method)
from ..core.context import Route
from ..core.init import kaiming_uniform_
from ..core.routing import (TokenRoutedLayer, argmax_selected, gate_expert_blocks, masked_mean, router_dtype,
                            router_probs)
from ..core.dropout import make_dropout


@dataclass
class TeamLoraConfig(LowRankConfig):
    method = "teamlora"
    default_targets = "mlp"

    n_experts: int = field_help("number of experts E; the shared A has rank r_A = E·r", 4)
    # r, lora_alpha, lora_dropout (and their checks, and scaling = α / r) come from LowRankConfig;
    # redeclared here only for this method's defaults and help.
    r: int = field_help("rank r_B of each expert's B (and of each block of the shared A)", 8)
    lora_alpha: float = field_help("scale numerator: s = lora_alpha / r (per-expert rank)", 16)
    lora_dropout: float = field_help("dropout on z = A x (after A, not on x)", 0.05)
    use_interaction: bool = field_help("learn the E×E interaction matrix M (False: ψ = φ)", True)
    interaction_init: float = field_help("M's off-diagonal entries start in U(−v, v); the diagonal at 0", 0.1)
    balance_weight: float = field_help("λ of the balance loss 'teamlora_balance'", 1.0)
    normalizer_eps: float = field_help("smallest magnitude allowed for the normaliser Σ_e ψ_e", 1e-6)

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_positive_int(name, "n_experts", self.n_experts)
        for f in ("interaction_init", "balance_weight"):
            check_non_negative(name, f, getattr(self, f))
        check_positive_number(name, "normalizer_eps", self.normalizer_eps)

    def parameters_per_layer(self, d_in: int, d_out: int, layer_index: int = 0, n_layers: int = 1) -> int:
        """Closed form: r_A·(d_in + d_out) + E·d_in + E² (shared A, experts' B, router, interaction)."""
        e = self.n_experts
        return e * self.r * (d_in + d_out) + e * d_in + (e * e if self.use_interaction else 0)


def interaction_weights(phi: torch.Tensor, interaction: torch.Tensor | None, eps: float) -> torch.Tensor:
    """w = E · ψ/Σψ with ψ = φ·(I + M), for φ (N, E) -> (N, E). The normaliser keeps its sign, |·| >= eps."""
    n_experts = phi.shape[-1]
    psi = phi if interaction is None else phi + phi @ interaction.to(phi.dtype)  # φ·(I + M)
    total = psi.sum(dim=-1, keepdim=True)
    total = torch.where(total >= 0, total.clamp_min(eps), total.clamp_max(-eps))
    return n_experts * psi / total


class TeamLoraLayer(TokenRoutedLayer):
    parameter_roles = {"lora_A": "shared", "lora_B": "expert", "router": "router", "interaction": "router"}

    def create_parameters(self, factory: dict) -> None:
        cfg = self.config
        e, r = cfg.n_experts, cfg.r
        self.n_experts, self.r = e, r
        self.lora_A = nn.Parameter(torch.empty(e * r, self.in_features, **factory))  # (r_A, d_in), shared
        self.lora_B = nn.Parameter(torch.empty(e, r, self.out_features, **factory))  # (E, r_B, d_out)
        self.router = nn.Parameter(torch.empty(e, self.in_features, **factory))  # W_g (E, d_in)
        if cfg.use_interaction:
            self.interaction = nn.Parameter(torch.empty(e, e, **factory))  # M (E, E)
        else:
            self.register_parameter("interaction", None)
        self.dropout = make_dropout(cfg.lora_dropout)
        self.scaling = cfg.scaling

    @torch.no_grad()
    def reset_parameters(self) -> None:
        kaiming_uniform_(self.lora_A, fan_in=self.in_features)
        nn.init.zeros_(self.lora_B)
        kaiming_uniform_(self.router, fan_in=self.in_features)
        if self.interaction is not None:
            bound = self.config.interaction_init
            self.interaction.uniform_(-bound, bound).fill_diagonal_(0.0)

    def gate_weights(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(φ, w) for tokens x2d (N, d_in): router probabilities and the E-scaled interaction weights."""
        phi = router_probs(x2d, self.router)  # (N, E) fp32
        return phi, interaction_weights(phi, self.interaction, self.config.normalizer_eps)

    # ------------------------------------------------------------------ fast path
    def delta_factors(self, x: torch.Tensor, route: Route) -> tuple[torch.Tensor, torch.Tensor]:
        x2d, lead, weight = self._flatten(x, route)  # (N, d_in)
        e, r = self.n_experts, self.r
        z = self.dropout(x2d @ self.lora_A.T)  # (N, E·r_B): the shared A once, dropout after A
        phi, w = self.gate_weights(x2d)  # (N, E) each
        gated = gate_expert_blocks(z, w, self.scaling)  # (N, E·r)
        if self._wants_aux(route) and self.config.balance_weight > 0:
            balance = ((masked_mean(w, weight) - 1.0) ** 2).mean()
            self._record_aux("teamlora_balance", balance)
        if route.record:
            psi = w.detach() / e  # sums to 1 per token
            self._record_stats(route, lead, phi, psi, argmax_selected(psi), 1, weight)
        # Δy = gated blocks (N, E·r) @ B_cat (E·r, d_out): the base layer adds it into its output (addmm_)
        return gated, self.lora_B.view(e * r, -1)

    # ------------------------------------------------------------------ export (distillation)
    def expert_gates(self, x2d: torch.Tensor) -> torch.Tensor:
        """Eval-mode weight of each expert per token (N, E): w = E·ψ (interaction included)."""
        return self.gate_weights(x2d)[1]

    def expert_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per expert (A_e (r_B, d_in) = block e of the shared A, B_e (d_out, r_B) with s folded in):
        Δy = Σ_e w_e(x) B_e A_e x at eval."""
        r = self.r
        return [(self.lora_A[e * r:(e + 1) * r], self.scaling * self.lora_B[e].T) for e in range(self.n_experts)]

    # ------------------------------------------------------------------ reference
    def reference_forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        """Plain loop over experts (the definition), for tests. Draws the same dropout mask first."""
        e, r = self.n_experts, self.r
        z = self.dropout(x @ self.lora_A.T)  # (..., E·r_B)
        phi = torch.softmax((x @ self.router.T).to(router_dtype(x.dtype)), dim=-1)  # (..., E)
        eye = torch.eye(e, dtype=phi.dtype, device=phi.device)
        mix = eye if self.interaction is None else eye + self.interaction.to(phi.dtype)
        psi = phi @ mix
        total = psi.sum(-1, keepdim=True)
        eps = self.config.normalizer_eps
        total = torch.where(total >= 0, total.clamp_min(eps), total.clamp_max(-eps))
        w = e * psi / total
        out = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
        for i in range(e):
            block = z[..., i * r:(i + 1) * r]  # expert i reads block i of z only
            out = out + w[..., i:i + 1].to(x.dtype) * self.scaling * (block @ self.lora_B[i])
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.n_experts}, r_B={self.r}"


register_method(MethodSpec(
    TeamLoraConfig, TeamLoraLayer, routing="token", export="distilled", can_add_tasks=False,
    aux_losses={"teamlora_balance": "balance_weight"},
    test_config=TeamLoraConfig,
    degenerate=lambda r, alpha, dropout, **kw: TeamLoraConfig(n_experts=1, r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                              **kw),
    sized_config=lambda e, r, **kw: TeamLoraConfig(n_experts=e, r=r, lora_alpha=2 * r, balance_weight=0.0, **kw),
    test_cases={"teamlora_e1": dict(n_experts=1), "teamlora_e3": dict(n_experts=3),
                "teamlora_e4_r2": dict(n_experts=4, r=2), "teamlora_e6_no_interaction": dict(n_experts=6, use_interaction=False)},
))
