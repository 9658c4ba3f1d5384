"""MoELoRA (Luo et al., 2024, "MoELoRA: Contrastive Learning Guided Mixture of Experts on
Parameter-Efficient Fine-Tuning for Large Language Models", arXiv:2402.12851).

E LoRA experts, each its own A_e (r_e×d_in) and B_e (d_out×r_e), a bias-free softmax router on the
token's hidden state, top-k with the kept weights renormalised to sum 1:

    g(x) = renorm_topk(softmax(W_g x)),     Δy = Σ_{e∈topk(x)} g_e(x) · s · B_e A_e drop(x),   s = α / r_e

Fast path (two GEMMs whatever E and k): A is stored stacked (E, r_e, d_in), i.e. A_cat (E·r_e, d_in);
B stacked input-major (E, r_e, d_out), i.e. B_cat (E·r_e, d_out) as a free view:

    z = drop(x) · A_catᵀ  (N, E·r_e)  →  z_e ← s·g_e·z_e  (dense masked gates, 0 off the top-k)  →  z · B_cat

Unselected experts are multiplied by a zero gate rather than skipped (cheaper than a gather for the
small ranks used here; exactly the same result). ``reference_forward`` is the plain loop over experts.

Aux losses, summed over adapted modules by the wrapper:
  * "moelora_balance" (weight λ_lb = 0.01): Switch load balance E·Σ_e f_e·P_e over non-padding tokens.
  * "moelora_contrastive" (weight λ_cl = 0.1): the paper's expert contrastive loss. Form chosen here
    (the spec's reading): expert outputs o_{t,e} = B_e A_e drop(x_t) (no gate, no scale: they are
    L2-normalised), on at most ``contrastive_sample_size`` (512) sampled (token, expert) pairs of
    non-padding tokens; for an anchor (t, e) the positives are the sampled outputs of the same expert
    e on other tokens, every other sampled pair is in the denominator (supervised-contrastive
    "L_out" form, Khosla et al. 2020), negatives are therefore the outputs of the other experts,
    including on the same token:

        L = mean_{anchors i with ≥1 positive}  −1/|P(i)| Σ_{p∈P(i)} log( exp(u_i·u_p/τ) / Σ_{a≠i} exp(u_i·u_a/τ) )

    with u = o/‖o‖ and τ = 0.1. Choices between readings: pairs are sampled uniformly among all
    (non-padding token, expert) pairs (``contrastive_pairs="all"``, the spec's wording), or among
    the routed (top-k) pairs only (``"routed"``); the loss is computed in (at least) fp32; it reaches A and B,
    not the router. At init B = 0, so every o is 0 and the loss is the constant log(M−1) with zero
    gradient; the cosine form then has gradients ∝ 1/‖o‖ while B is tiny, which Adam-style
    optimisers absorb (plain SGD would need a smaller λ_cl early on).
Aux losses are built in training mode and in any recorded forward (not in ``generate``).

Other choices: the router is initialised like torch's nn.Linear (kaiming-uniform, U(±1/√d_in)), so
ties between experts are broken from the first step; A_e kaiming-uniform per expert, B_e zeros.
Defaults: E=8, top-2, r_e=4 (E·r_e = 32, the equal-budget LoRA-32 setting), α = 2·r_e = 8,
dropout 0.05, targets the attention q and v projections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import (LowRankConfig, MethodSpec, check_choice, check_non_negative, check_positive_int,
                      check_positive_number, field_help, register_method)
from ..core.context import Route
from ..core.init import kaiming_uniform_
from ..core.routing import (TokenRoutedLayer, gate_expert_blocks, one_hot, router_dtype, router_probs,
                            switch_balance_loss, top_k_gates)
from ..core.dropout import dropout_linear, make_dropout


@dataclass
class MoELoraConfig(LowRankConfig):
    method = "moelora"

    n_experts: int = field_help("number of LoRA experts E per adapted layer", 8)
    top_k: int = field_help("experts per token; the kept router weights are renormalised to sum 1", 2)
    # r, lora_alpha, lora_dropout (and their checks, and scaling = α / r) come from LowRankConfig;
    # redeclared here only for this method's defaults and help.
    r: int = field_help("rank r_e of each expert (equal budget with LoRA-r: E·r_e = r)", 4)
    lora_alpha: float = field_help("scale numerator: s = lora_alpha / r (the paper: α = 2·r_e)", 8)
    lora_dropout: float = field_help("dropout on the adapter input x (one mask shared by all experts)", 0.05)
    balance_weight: float = field_help("λ_lb of the Switch load-balance loss 'moelora_balance'", 0.01)
    contrastive_weight: float = field_help("λ_cl of the expert contrastive loss 'moelora_contrastive'", 0.1)
    contrastive_temperature: float = field_help("temperature τ of the contrastive loss", 0.1)
    contrastive_sample_size: int = field_help(
        "at most this many (token, expert) pairs per module enter the O(n²) contrastive loss", 512)
    contrastive_pairs: str = field_help(
        "which (token, expert) pairs are sampled: 'all' non-padding pairs, or only 'routed' (top-k) ones",
        "all")

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        for f in ("n_experts", "top_k", "contrastive_sample_size"):
            check_positive_int(name, f, getattr(self, f))
        if self.top_k > self.n_experts:
            raise ValueError(f"{name}.top_k={self.top_k} exceeds n_experts={self.n_experts}.")
        for f in ("balance_weight", "contrastive_weight"):
            check_non_negative(name, f, getattr(self, f))
        check_positive_number(name, "contrastive_temperature", self.contrastive_temperature)
        check_choice(name, "contrastive_pairs", self.contrastive_pairs, ("all", "routed"))

    def parameters_per_layer(self, d_in: int, d_out: int, layer_index: int = 0, n_layers: int = 1) -> int:
        """Closed form: E·r_e·(d_in + d_out) + E·d_in (experts + router)."""
        return self.n_experts * self.r * (d_in + d_out) + self.n_experts * d_in


def sample_pairs(n_tokens: int, n_experts: int, size: int, valid: torch.Tensor | None,
                 device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to ``size`` distinct (token, expert) pairs drawn uniformly among the valid ones, without a sync.

    Args:
        valid: (N, E) bool of eligible pairs, or None for all.
    Returns:
        token (M,), expert (M,), ok (M,) bool — M = min(size, N·E); pairs beyond the number of valid
        ones come back with ok=False and must be ignored.
    """
    total = n_tokens * n_experts
    m = min(size, total)
    scores = torch.rand(total, device=device)  # in [0, 1)
    if valid is not None:
        scores = scores.masked_fill(~valid.reshape(-1), -1.0)
    top, index = scores.topk(m)
    return index // n_experts, index % n_experts, top >= 0


def expert_contrastive_loss(outputs: torch.Tensor, experts: torch.Tensor, ok: torch.Tensor,
                            temperature: float) -> torch.Tensor:
    """Supervised-contrastive InfoNCE over expert outputs (see the module docstring).

    Args:
        outputs: (M, d) expert outputs o; experts: (M,) expert of each; ok: (M,) bool, pairs to use.
    Returns:
        scalar: mean over valid anchors with at least one positive (0 when there is none).
    Pairs are distinct (token, expert) pairs, so "same expert" already implies "another token".
    """
    u = F.normalize(outputs.to(router_dtype(outputs.dtype)), dim=-1)  # (M, d), at least fp32
    return info_nce(u @ u.T, experts, ok, temperature)


class _MaskedLogSumExpOfProducts(torch.autograd.Function):
    """lse_i = log Σ_{j ≠ i, ok_j} exp(scale · a_i·b_j) for a, b (M, k), with a hand-written backward.

    Why: autograd's logsumexp over the (M, M) logits makes about nine passes over them (the max, a
    subtraction, exp, the sum, then in backward another subtraction, exp and a product, plus copies)
    and keeps the (M, M) logits for backward; at M = 512 these cost more than the GEMMs. Here the
    forward is a GEMM, a max and one fused softmax, and only a, b and lse (M × k, M) are kept: backward
    rebuilds the softmax P with one GEMM and one softmax (~0.7 ms at M = 512, one thread), instead
    of keeping P (1 MB per adapted module, 60 MB over SmolLM2's 60, which put MoELoRA's step memory
    above 1.10 × LoRA-32's). With g the incoming gradient (M,):
        ∂/∂a = scale · diag(g) · P b,    ∂/∂b = scale · Pᵀ · diag(g) a
    (row scalings of (M, k) matrices, so P itself is only read by the two GEMMs).
    Excluded entries get a logit near -1e9 (finite, not -inf; the product plus a -1e9 bias, which in fp32
    is -1e9 itself): their exp is exactly 0 beside any candidate, and a row with no candidate at all
    comes out near -1e9 (finite) and passes no gradient, as if its logits were constants.
    """

    @staticmethod
    def _logits(a: torch.Tensor, b: torch.Tensor, ok: torch.Tensor, scale: float) -> torch.Tensor:
        column_bias = torch.where(ok, 0.0, -1e9).to(a.dtype)  # (M,): pairs that are not ok are no candidates
        logits = torch.addmm(column_bias, a, b.T, alpha=scale)  # (M, M), the bias broadcast over rows
        logits.diagonal().fill_(-1e9)  # nor is an anchor its own candidate
        return logits

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, ok: torch.Tensor, scale: float) -> torch.Tensor:
        logits = _MaskedLogSumExpOfProducts._logits(a, b, ok, scale)  # (M, M)
        top, where_top = logits.max(dim=1)  # (M,) each
        # P at a row's largest logit is exp(0) / Σ_j exp(logit_j - top) = 1 / Σ, so lse = top - log P_top
        # (read at the argmax: no second pass over P). torch.logsumexp is ~7x slower here: its exp runs
        # into denormals (logits spread over hundreds at τ = 0.1), which softmax's vectorised exp avoids.
        p_top = torch.softmax(logits, dim=1).gather(1, where_top.unsqueeze(1)).squeeze(1)  # (M,)
        lse = top - p_top.log()
        ctx.save_for_backward(a, b, ok, lse)
        ctx.scale = scale
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        a, b, ok, lse = ctx.saved_tensors
        probs = torch.softmax(_MaskedLogSumExpOfProducts._logits(a, b, ok, ctx.scale), dim=1)  # (M, M)
        # A row without any candidate has a uniform P over constants: it must pass no gradient back.
        g = (grad * (lse > -0.5e9)).unsqueeze(1) * ctx.scale  # (M, 1)
        grad_a = g * (probs @ b)  # (M, k)
        grad_b = probs.T @ (g * a)  # (M, k)
        return grad_a, grad_b, None, None


def masked_logsumexp_of_products(a: torch.Tensor, b: torch.Tensor, ok: torch.Tensor, scale: float) -> torch.Tensor:
    """(M,): log Σ_{j ≠ i, ok_j} exp(scale · a_i·b_j); see :class:`_MaskedLogSumExpOfProducts`. Tested
    against autograd's logsumexp over the masked logits."""
    return _MaskedLogSumExpOfProducts.apply(a, b, ok, scale)


def contrastive_loss_from_blocks(blocks: torch.Tensor, b_cat: torch.Tensor, experts: torch.Tensor,
                                 ok: torch.Tensor, temperature: float, n_experts: int,
                                 eps: float = 1e-12) -> torch.Tensor:
    """:func:`expert_contrastive_loss` of the outputs o = blocks · B_cat, without forming them or any
    (M, M) mask. Equal up to rounding (same eps: ‖o‖ is clamped at eps); at least fp32. Tested.

    Why: at MiniLM's defaults the (M=512)² similarity over d_out=384 features and the dozen (M, M)
    mask / product passes of the direct form cost ~10 ms per layer on one core, more than the layer.
    Here, with the (E·r)² Gram matrix G = B_cat B_catᵀ and n_i = max(‖o_i‖, eps):
        o_i·o_j = b_i G b_jᵀ,   w_i = b_i G / n_i,   v_j = b_j / n_j,   cos_ij = w_i·v_j
        logits_ij = cos_ij / τ, excluded (-1e9) on the diagonal and for pairs j that are not ok
        Σ_{positives j of i} cos_ij = w_i · (c_{e_i} - v_i)  with c_e = Σ_{ok j of expert e} v_j
    so the only (M, M) work is :func:`masked_logsumexp_of_products`: one GEMM, a softmax, and two GEMMs in
    backward.

    Args:
        blocks: (M, E·r), row i zero outside expert e_i's rank block; b_cat: (E·r, d_out);
        experts: (M,) expert of each pair (< n_experts); ok: (M,) bool, pairs to use.
    """
    dtype = router_dtype(blocks.dtype)
    blocks, b_cat = blocks.to(dtype), b_cat.to(dtype)
    m = blocks.shape[0]
    p = blocks @ (b_cat @ b_cat.T)  # (M, E·r)
    norms = (p * blocks).sum(-1).clamp_min(eps * eps).sqrt()  # (M,): max(‖o‖, eps); no NaN gradient at 0
    w = p / norms[:, None]  # (M, E·r)
    v = blocks / norms[:, None]  # (M, E·r)
    okf = ok.to(dtype)
    lse = masked_logsumexp_of_products(w, v, ok, 1.0 / temperature)  # (M,)
    members = one_hot(experts, n_experts, dtype) * okf[:, None]  # (M, E): ok pairs of each expert
    centroid = members.T @ v  # (E, E·r): Σ of the ok v_j of each expert
    pos_sum = (w * (centroid[experts] - okf[:, None] * v)).sum(-1)  # (M,): Σ_j cos_ij over positives
    n_pos = okf * (members.sum(0)[experts] - 1.0)  # (M,): positives of each anchor (0 if not ok)
    per_anchor = lse - pos_sum / (temperature * n_pos.clamp_min(1.0))
    has = (n_pos > 0).to(dtype)
    return (per_anchor * has).sum() / has.sum().clamp_min(1.0)


def info_nce(sim: torch.Tensor, experts: torch.Tensor, ok: torch.Tensor, temperature: float) -> torch.Tensor:
    """The loss of :func:`expert_contrastive_loss` from the (M, M) cosine similarities."""
    sim = sim / temperature  # (M, M)
    m = sim.shape[0]
    eye = torch.eye(m, dtype=torch.bool, device=sim.device)
    candidate = ok[None, :] & ok[:, None] & ~eye  # (anchor i, other j)
    positive = candidate & (experts[None, :] == experts[:, None])
    # A large finite fill (not -inf): rows without candidates stay finite and carry zero weight.
    logits = sim.masked_fill(~candidate, -1e9)
    log_prob = sim - torch.logsumexp(logits, dim=1, keepdim=True)
    n_pos = positive.sum(1)
    per_anchor = -(log_prob * positive).sum(1) / n_pos.clamp_min(1)
    has = (n_pos > 0).float()
    return (per_anchor * has).sum() / has.sum().clamp_min(1.0)


class MoELoraLayer(TokenRoutedLayer):
    parameter_roles = {"lora_A": "expert", "lora_B": "expert", "router": "router"}

    def create_parameters(self, factory: dict) -> None:
        cfg = self.config
        e, r = cfg.n_experts, cfg.r
        self.n_experts, self.top_k, self.r = e, cfg.top_k, r
        self.lora_A = nn.Parameter(torch.empty(e, r, self.in_features, **factory))  # (E, r_e, d_in)
        self.lora_B = nn.Parameter(torch.empty(e, r, self.out_features, **factory))  # (E, r_e, d_out)
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
        probs = router_probs(x2d, self.router)  # (N, E) fp32
        gates, selected = top_k_gates(probs, self.top_k)  # (N, E), (N, E) bool
        z = dropout_linear(self.dropout, x2d, self.lora_A.view(e * r, -1))  # (N, E·r): one GEMM, every expert's A
        zg = gate_expert_blocks(z, gates, self.scaling)  # (N, E·r)
        if self._wants_aux(route):
            cfg = self.config
            if cfg.balance_weight > 0:
                self._record_aux("moelora_balance", switch_balance_loss(probs, selected, self.top_k, weight))
            if cfg.contrastive_weight > 0:
                self._record_aux("moelora_contrastive", self._contrastive(z, selected, weight))
        self._record_stats(route, lead, probs, gates, selected, self.top_k, weight)
        # Δy = gated blocks (N, E·r) @ B_cat (E·r, d_out): the base layer adds it into its output (addmm_)
        return zg, self.lora_B.view(e * r, -1)

    def _contrastive(self, z: torch.Tensor, selected: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """The contrastive loss on sampled pairs, o_{t,e} = z_{t,e} B_e, through the Gram matrix of B_cat."""
        cfg = self.config
        n, e, r = z.shape[0], self.n_experts, self.r
        valid = None if weight is None else (weight > 0)[:, None].expand(n, e)
        if cfg.contrastive_pairs == "routed":
            valid = selected if valid is None else valid & selected
        token, expert, ok = sample_pairs(n, e, cfg.contrastive_sample_size, valid, z.device)
        z_pairs = z.view(n, e, r)[token, expert]  # (M, r)
        expert_one_hot = one_hot(expert, e, z.dtype)  # (M, E)
        blocks = (expert_one_hot.unsqueeze(-1) * z_pairs.unsqueeze(1)).view(-1, e * r)  # (M, E·r), block e only
        # = expert_contrastive_loss(blocks @ B_cat, ...) through B_cat's Gram matrix, without (M, M) masks.
        return contrastive_loss_from_blocks(blocks, self.lora_B.view(e * r, -1), expert, ok,
                                            cfg.contrastive_temperature, e)

    # ------------------------------------------------------------------ export (distillation)
    def expert_gates(self, x2d: torch.Tensor) -> torch.Tensor:
        """Eval-mode weight of each expert per token (N, E): top-k renormalised gates, 0 off the top-k."""
        return top_k_gates(router_probs(x2d, self.router), self.top_k)[0]

    def expert_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per expert (A_e (r_e, d_in), B_e (d_out, r_e) with s folded in): Δy = Σ_e g_e(x) B_e A_e x at eval."""
        return [(self.lora_A[e], self.scaling * self.lora_B[e].T) for e in range(self.n_experts)]

    # ------------------------------------------------------------------ reference
    def reference_forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        """Plain loop over experts (the definition), for tests. Draws the same dropout mask first."""
        xd = self.dropout(x)
        probs = torch.softmax((x @ self.router.T).to(router_dtype(x.dtype)), dim=-1)  # (..., E)
        top_vals, top_idx = probs.topk(self.top_k, dim=-1)
        denom = top_vals.sum(-1)  # (...,)
        out = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
        for e in range(self.n_experts):
            chosen = (top_idx == e).any(-1)  # (...,)
            g = torch.where(chosen, probs[..., e] / denom, torch.zeros_like(denom)).to(x.dtype)
            expert = (xd @ self.lora_A[e].T) @ self.lora_B[e]  # B_e A_e drop(x): (..., d_out)
            out = out + g.unsqueeze(-1) * self.scaling * expert
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.n_experts}, top_k={self.top_k}, r={self.r}"


register_method(MethodSpec(
    MoELoraConfig, MoELoraLayer, routing="token", export="distilled", can_add_tasks=False,
    aux_losses={"moelora_balance": "balance_weight", "moelora_contrastive": "contrastive_weight"},
    test_config=MoELoraConfig,  # its defaults fit the tiny models
    degenerate=lambda r, alpha, dropout, **kw: MoELoraConfig(n_experts=1, top_k=1, r=r, lora_alpha=alpha,
                                                             lora_dropout=dropout, **kw),
    sized_config=lambda e, r, **kw: MoELoraConfig(n_experts=e, r=r, lora_alpha=2 * r, balance_weight=0.0,
                                                  contrastive_weight=0.0, **kw),
    test_cases={"moelora_e1_k1": dict(n_experts=1, top_k=1), "moelora_e2_k1": dict(n_experts=2, top_k=1),
                "moelora_e3_k2": dict(n_experts=3, top_k=2), "moelora_e8_k2": dict(n_experts=8, top_k=2),
                "moelora_e5_k5": dict(n_experts=5, top_k=5)},
))
