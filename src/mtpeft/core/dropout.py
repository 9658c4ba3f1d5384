"""Dropout for adapter inputs that costs about p·n random draws instead of n.

Why: on CPU, torch's dropout draws one Bernoulli number per element (``bernoulli_``, ~5 ms for a
2048 x 384 activation on one core, more than the LoRA GEMMs of rank 32 on that input). At the small p
adapters use (0.05), almost every draw says "keep". This module instead draws the *gaps* between
dropped elements: for i.i.d. Bernoulli(p) drops, the number of kept elements before the next drop is
Geometric(p), sampled by inversion, G = floor(log(1 - U) / log(1 - p)) with U ~ U[0, 1) in float64.
The cumulative sums of G + 1 are the dropped positions. That is exactly the same distribution as
``torch.nn.Dropout`` (each element dropped independently with probability p, kept ones scaled by
1/(1 - p)), with a different random stream: the same seed gives a different mask than torch's.

    mask = full(n, 1/(1-p)); mask[dropped positions] = 0;   y = x * mask   (backward: g * mask)

The mask is built as a float tensor, so forward and backward are one multiply each (a bool mask
would make both mixed-dtype, which on CPU is several times slower) and autograd saves only the mask
(n floats, as torch's dropout). Shapes are static (positions past the end go to a spare slot that is
cut off), so torch.compile traces it without graph breaks.

For p >= 0.5 the gaps save little: torch's own dropout is used (the same random stream as
``torch.nn.functional.dropout``). Draws come from torch's global generator, so seeding, gradient
checkpointing's RNG restore and ``torch.manual_seed`` work as usual.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SPARSE_BELOW = 0.5  # p below this: sample the dropped positions; otherwise torch's dropout


def _draw_count(n: int, p: float) -> int:
    """Gaps to draw so that they cover n elements except with probability < 1e-20 (and always if the
    count reaches n + 1, since every gap is >= 1): the mean number of drops plus 10 standard deviations."""
    mean = n * p
    return min(n + 1, int(mean + 10.0 * math.sqrt(mean * (1.0 - p)) + 10))


def dropout_mask(shape: torch.Size, p: float, dtype: torch.dtype, device) -> torch.Tensor:
    """A dropout mask of ``shape``: 0 with probability p (i.i.d.), else 1/(1-p), in ``dtype``."""
    n = math.prod(shape)
    scale = 1.0 / (1.0 - p)
    log_keep = math.log1p(-p)  # log(1 - p) < 0
    mask = torch.full((n + 1,), scale, dtype=dtype, device=device)  # slot n: where overshoot lands
    start = torch.zeros((), dtype=torch.int64, device=device)
    while True:
        u = torch.rand(_draw_count(n, p), dtype=torch.float64, device=device)  # U[0, 1)
        gaps = torch.floor(torch.log1p(-u) / log_keep).to(torch.int64) + 1  # Geometric(p) + 1, >= 1
        ends = start + torch.cumsum(gaps, 0)  # one past each dropped position
        mask[(ends - 1).clamp_(max=n)] = 0.0
        # Covered (the last drop lies at or past the end) except with probability < 1e-20. On CPU the
        # check is free, so draw more if needed (exact); elsewhere it would cost a device sync.
        if mask.device.type != "cpu" or torch.compiler.is_compiling() or int(ends[-1]) > n:
            break
        start = ends[-1]
    return mask[:n].view(shape)


class Dropout(nn.Module):
    """Drop-in for ``torch.nn.Dropout(p)`` on adapter inputs (same distribution, cheaper for p < 0.5)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p!r}.")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= SPARSE_BELOW:
            return F.dropout(x, self.p, training=True)
        return x * dropout_mask(x.shape, self.p, x.dtype, x.device)

    def extra_repr(self) -> str:
        return f"p={self.p}"
