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

from ..config import AdapterConfig, check_positive_int, check_probability, field_help, register_method
from ..core.context import Route
from ..core.dropout import Dropout, dropout_linear
from ..core.init import kaiming_uniform_
from ..core.layer import AdaptedLayer


@dataclass
class LoraConfig(AdapterConfig):
    method = "lora"

    r: int = field_help("rank of the update", 8)
    lora_alpha: float = field_help("scale numerator: s = lora_alpha / r", 16)
    lora_dropout: float = field_help("dropout on the adapter input x", 0.0)
    use_rslora: bool = field_help("rank-stabilised scale s = lora_alpha / sqrt(r)", False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(type(self).__name__, "r", self.r)
        check_probability(type(self).__name__, "lora_dropout", self.lora_dropout)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def make_dropout(p: float) -> nn.Module:
    """The adapters' dropout: same distribution as nn.Dropout(p), about p·n random draws instead of n
    (see mtpeft.core.dropout: on CPU torch's per-element Bernoulli draws cost more than a LoRA's GEMMs)."""
    return Dropout(p) if p > 0 else nn.Identity()


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


register_method(LoraConfig, LoraLayer)
