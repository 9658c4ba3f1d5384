"""Initialisers for stacked adapter weights.

``torch.nn.init.kaiming_uniform_`` derives fan-in from a tensor's second dimension, which is wrong
for stacked banks such as (E, r, d_in). These take the fan-in explicitly.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def kaiming_uniform_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """PEFT's LoRA-A init, kaiming_uniform(a=√5): U(±1/√fan_in), for any stacked shape."""
    bound = 1.0 / math.sqrt(fan_in)
    return tensor.uniform_(-bound, bound)
