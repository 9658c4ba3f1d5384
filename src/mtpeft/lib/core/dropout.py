"""Dropout for adapter inputs that costs about p·n random draws instead of n.

Why: on CPU, torch's dropout draws one Bernoulli number per element (``bernoulli_``, ~5 ms for a
2048 x 384 activation on one core, more than the LoRA GEMMs of rank 32 on that input). At the small p
adapters use (0.05), almost every draw says "keep". This module instead draws the *gaps* between
dropped elements: for i.i.d. Bernoulli(p) drops, the number of kept elements before the next drop is
Geometric(p), sampled by inversion, G = floor(log(1 - U) / log(1 - p)) with U ~ U[0, 1) in float64.
The cumulative sums of G + 1 are the dropped positions. That is the same distribution as
``torch.nn.Dropout`` (each element dropped independently with probability p, kept ones scaled by
1/(1 - p)), with a different random stream: the same seed gives a different mask than torch's. The
number of gaps is fixed in advance (no host read), enough except with probability < 1e-20.

    mask = full(n, 1/(1-p)); mask[dropped positions] = 0;   y = x * mask   (backward: g * mask)

The mask is built as a float tensor, so forward and backward are one multiply each (a bool mask
would make both mixed-dtype, which on CPU is several times slower) and autograd saves only the mask
(n floats, as torch's dropout). Shapes are static (positions past the end go to a spare slot that is
cut off), so torch.compile traces it without graph breaks.

:func:`dropout_linear` fuses the dropout with the linear map that follows it (a LoRA's A): the same
dropped elements, but autograd keeps the input and the dropped positions rather than the dropped
copy and its mask (8 bytes per input element and adapted layer).

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


def dropped_positions(n: int, p: float, device) -> torch.Tensor:
    """Flat positions (int64) of the elements dropped out of n, each independently with probability p.
    Entries equal to n are padding (overshoot past the end): index an (n + 1)-element buffer with them.

    One draw of ``_draw_count(n, p)`` gaps, never a second: whether they reached the end could only be
    known by reading ``ends[-1]`` on the host, a device sync inside the layer (and a graph break). They
    fall short with probability < 1e-20; the elements past the last drop would then all be kept."""
    log_keep = math.log1p(-p)  # log(1 - p) < 0
    u = torch.rand(_draw_count(n, p), dtype=torch.float64, device=device)  # U[0, 1)
    gaps = torch.floor(torch.log1p(-u) / log_keep).to(torch.int64) + 1  # Geometric(p) + 1, >= 1
    ends = torch.cumsum(gaps, 0)  # one past each dropped position
    return (ends - 1).clamp_(max=n)


def dropout_mask(shape: torch.Size, p: float, dtype: torch.dtype, device) -> torch.Tensor:
    """A dropout mask of ``shape``: 0 with probability p (i.i.d.), else 1/(1-p), in ``dtype``."""
    n = math.prod(shape)
    mask = torch.full((n + 1,), 1.0 / (1.0 - p), dtype=dtype, device=device)  # slot n: padding
    mask[dropped_positions(n, p, device)] = 0.0
    return mask[:n].view(shape)


def _zeroed(t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """A copy of t (contiguous) with the flat positions ``pos`` set to 0 (padding entries land in a spare slot)."""
    n = t.numel()
    buf = torch.empty(n + 1, dtype=t.dtype, device=t.device)
    buf[:n].view(t.shape).copy_(t)
    buf[pos] = 0
    return buf[:n].view(t.shape)


class _DroppedLinear(torch.autograd.Function):
    """z = scale · (x with the flat positions ``pos`` zeroed) @ Wᵀ for x (N, d), W (r, d).

    Autograd keeps x (the adapted layer's input, which a LoRA's A keeps anyway when there is no
    dropout) and the dropped positions (~p·N·d int64), instead of the dropped copy and a float mask
    (8 bytes per input element); backward rebuilds the dropped copy for W's gradient (one copy)."""

    @staticmethod
    def forward(ctx, x2d, weight, pos, scale):
        ctx.save_for_backward(x2d, weight, pos)
        ctx.scale = scale
        return (_zeroed(x2d, pos) @ weight.T).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        x2d, weight, pos = ctx.saved_tensors
        grad = grad * ctx.scale  # (N, r)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            n = x2d.numel()
            buf = torch.empty(n + 1, dtype=grad.dtype, device=grad.device)
            torch.mm(grad, weight.to(grad.dtype), out=buf[:n].view(x2d.shape))
            buf[pos] = 0  # the dropped inputs get no gradient
            grad_x = buf[:n].view(x2d.shape)
        if ctx.needs_input_grad[1]:
            grad_w = grad.T @ _zeroed(x2d, pos)  # (r, d)
        return grad_x, grad_w, None, None


def dropout_linear(dropout: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``dropout(x) @ weight.T`` for x (..., d) and weight (r, d) -> (..., r), lean in memory.

    With mtpeft's :class:`Dropout` in training (p < 0.5) this drops exactly the elements that
    ``dropout(x)`` would drop from the same random state (same draws), so a loop reference that calls
    ``dropout(x)`` sees the same mask; but autograd keeps x and the dropped positions instead of the
    dropped copy and its mask. Otherwise it is ``dropout(x) @ weight.T``.
    """
    if not isinstance(dropout, Dropout) or not dropout.training or dropout.p == 0.0 or dropout.p >= SPARSE_BELOW:
        return dropout(x) @ weight.T
    x2d = x.reshape(-1, x.shape[-1])
    pos = dropped_positions(x2d.numel(), dropout.p, x.device)
    z = _DroppedLinear.apply(x2d, weight, pos, 1.0 / (1.0 - dropout.p))
    return z.view(*x.shape[:-1], weight.shape[0])


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


def make_dropout(p: float) -> nn.Module:
    """The adapters' dropout: same distribution as nn.Dropout(p), about p·n random draws instead of n
    (see this module's docstring: on CPU torch's per-element Bernoulli draws cost more than a LoRA's
    GEMMs); the identity when p = 0."""
    return Dropout(p) if p > 0 else nn.Identity()
