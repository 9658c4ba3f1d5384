"""LoRA (Hu et al., 2021), the baseline every multi-task method is compared against.

    Δy = s · B A drop(x),   s = α / r   (rsLoRA: s = α / √r)

A ∈ R^{r×d_in} (kaiming-uniform, a=√5), B ∈ R^{d_out×r} (zeros), so ΔW = 0 at init. Parameters are
named and laid out as PEFT's ``lora_A.weight`` / ``lora_B.weight`` so that weights copy across and
export is a rename. The scale is applied to the rank-r intermediate (cheaper than to the output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import LowRankConfig, MethodSpec, field_help, register_method
from ..core.context import Route
from ..core.dropout import dropout_linear, make_dropout
from ..core.init import kaiming_uniform_
from ..core.layer import AdaptedLayer


@dataclass
class LoraConfig(LowRankConfig):
    method = "lora"

    use_rslora: bool = field_help("rank-stabilised scale s = lora_alpha / sqrt(r)", False)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def parameters_per_layer(self, d_in: int, d_out: int, layer_index: int = 0, n_layers: int = 1) -> int:
        """Closed form: r·(d_in + d_out)."""
        return self.r * (d_in + d_out)


class LoraLayer(AdaptedLayer):
    mergeable = True
    parameter_roles = {"lora_A": "shared", "lora_B": "shared"}

    def create_parameters(self, factory: dict) -> None:
        r = self.config.r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))  # (d_out, r)
        self.dropout = make_dropout(self.config.lora_dropout)
        self.scaling = self.config.scaling

    def reset_parameters(self) -> None:
        kaiming_uniform_(self.lora_A, fan_in=self.in_features)
        nn.init.zeros_(self.lora_B)

    def delta_factors(self, x: torch.Tensor, route: Route) -> tuple[torch.Tensor, torch.Tensor]:
        z = dropout_linear(self.dropout, x, self.lora_A) * self.scaling  # (..., r): drop(x) Aᵀ s
        return z.reshape(-1, z.shape[-1]), self.lora_B.T  # (N, r), (r, d_out)

    def lora_factors(self, task: int | None):
        return self.lora_A, self.lora_B * self.scaling


register_method(MethodSpec(
    LoraConfig, LoraLayer, routing="none", export="exact",
    test_config=lambda **kw: LoraConfig(**{"r": 4, "lora_dropout": 0.0, **kw}),
    degenerate=lambda r, alpha, dropout, **kw: LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, **kw),
))
