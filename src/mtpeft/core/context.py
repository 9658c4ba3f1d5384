"""The per-forward routing context: how task ids, the padding mask, aux losses and router
statistics travel between the model wrapper and the adapted layers.

Why a context object rather than new forward arguments: the wrapped Hugging Face model must stay
unmodified, so its signature cannot carry ``task_ids``. The wrapper opens a scope around each call;
every adapted layer holds a reference to the same :class:`RoutingState` (one per wrapped model,
never module-global) and reads the task ids from it.

Encoder-decoder models (T5, BART) run two token streams of different lengths in one forward: the
encoder's tokens (``attention_mask``) and the decoder's (``decoder_attention_mask``). Each adapted
layer says which stream it is in (``AdaptedLayer.token_stream``, set by the wrapper): "input" for
every layer of a one-stream model and for an encoder-decoder's encoder, "decoder" for the rest of an
encoder-decoder (its decoder and LM head). A decoder layer reads the decoder's mask, except when its
input is the encoder's output itself (the keys and values of cross-attention), recorded by a pre-hook
on the decoder as ``encoder_states``: those tokens are the encoder's. A mask that does not line up
with an input's rows and tokens is not applied (every token counts) rather than applied to the wrong
tokens.

Gradient checkpointing re-runs layer forwards *during backward*. The state therefore keeps the last
call's task ids after the scope closes, and a layer uses them only while a scope is open or while
autograd is executing a backward pass (the recomputation). Aux losses and statistics are recorded
only while a scope is open, so a recomputation never counts them twice.
"""

from __future__ import annotations

import inspect
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


def in_backward_pass() -> bool:
    """True while autograd executes a backward graph (e.g. a checkpointed recomputation)."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class Route:
    """What one adapted layer needs to know about the rows of its input.

    ``row_task_ids`` has one entry per leading-dimension row of the layer input (shape (x.shape[0],)),
    ``token_mask`` one bool per token (shape x.shape[:-1], True = real token) or None when the mask
    cannot be aligned with the input (then every token counts).
    """

    row_task_ids: torch.Tensor | None
    token_mask: torch.Tensor | None
    record: bool


@dataclass
class RoutingState:
    """Shared by the wrapper and all of its adapted layers."""

    task_ids: torch.Tensor | None = None  # (batch,) as given to the wrapper
    attention_mask: torch.Tensor | None = None  # (batch, seq) as given to the wrapper (the encoder's tokens)
    decoder_attention_mask: torch.Tensor | None = None  # (batch, target seq): an encoder-decoder's decoder tokens
    # a weak reference to the (batch, seq, d) encoder output the decoder reads as cross-attention input: it
    # neither keeps that tensor alive after the step nor gets in the way of copy.deepcopy
    encoder_states: weakref.ref | None = None
    open: bool = False
    recording: bool = False
    aux_losses: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    aux_weights: dict[str, float] = field(default_factory=dict)
    router_stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @contextmanager
    def scope(self, task_ids, attention_mask, record: bool, decoder_attention_mask=None):
        """Open a forward scope. Resets what the previous call collected."""
        self.task_ids = task_ids
        self.attention_mask = attention_mask
        self.decoder_attention_mask = decoder_attention_mask
        self.encoder_states = None  # set by the decoder's pre-hook during this call
        self.aux_losses = {}
        self.aux_weights = {}
        self.router_stats = {}
        self.open = True
        self.recording = record
        try:
            yield self
        finally:
            self.open = False
            self.recording = False

    # ----------------------------------------------------------------------------- layer side
    def route_for(self, x: torch.Tensor, stream: str = "input") -> Route:
        """Align the call's task ids and padding mask with a layer input ``x`` of shape (rows, ..., d).

        ``stream``: "input" (the model's input tokens; an encoder-decoder's encoder) or "decoder"."""
        if not (self.open or in_backward_pass()):
            return Route(None, None, False)
        rows = x.shape[0]
        return Route(
            row_task_ids=_expand_rows(self.task_ids, rows),
            token_mask=_align_mask(self._mask_of_stream(x, stream), x),
            record=self.recording,
        )

    def _mask_of_stream(self, x: torch.Tensor, stream: str) -> torch.Tensor | None:
        if stream == "input":
            return self.attention_mask
        if stream != "decoder":
            raise ValueError(f"unknown token stream {stream!r}: 'input' or 'decoder'.")
        states = self.encoder_states() if self.encoder_states is not None else None
        if states is not None and _same_tensor(x, states):
            return self.attention_mask  # cross-attention keys / values: the encoder's tokens
        return self.decoder_attention_mask

    def add_aux_loss(self, name: str, value: torch.Tensor, weight: float) -> None:
        """Record one module's auxiliary loss; the wrapper sums each name over modules."""
        if not self.recording:
            return
        self.aux_losses.setdefault(name, []).append(value)
        self.aux_weights[name] = float(weight)

    def add_router_stats(self, module_name: str, stats: dict[str, torch.Tensor]) -> None:
        if not self.recording:
            return
        self.router_stats[module_name] = {k: v.detach() for k, v in stats.items()}

    # --------------------------------------------------------------------------- wrapper side
    def summed_aux_losses(self) -> dict[str, torch.Tensor]:
        return {name: torch.stack(values).sum() for name, values in self.aux_losses.items()}

    def weighted_aux_total(self, summed: dict[str, torch.Tensor]) -> torch.Tensor | None:
        total = None
        for name, value in summed.items():
            term = self.aux_weights[name] * value
            total = term if total is None else total + term
        return total


def _expand_rows(task_ids: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """Task ids for ``rows`` leading rows.

    Generation expands each example into ``num_beams * num_return_sequences`` consecutive rows
    (``repeat_interleave``), and some layers see (batch*seq, d) flattened inputs; both are an
    integer multiple of the batch with each example's rows adjacent, so one rule covers them.
    """
    if task_ids is None:
        return None
    batch = task_ids.shape[0]
    if rows == batch:
        return task_ids
    if batch == 0 or rows % batch != 0:
        raise ValueError(
            f"an adapted layer received {rows} rows but task_ids has {batch} entries; rows must be a "
            f"multiple of the batch (one task id per example). Pass one task id per example."
        )
    return task_ids.repeat_interleave(rows // batch)


def _same_tensor(x: torch.Tensor, ref: torch.Tensor) -> bool:
    """``x`` is ``ref``, or a detached alias of it (same data, same shape: what a reentrant checkpoint's
    recomputation passes in place of the original input)."""
    if x is ref:
        return True
    if torch.compiler.is_compiling():
        return False  # data pointers cannot be read while tracing; the original call matched by identity
    return x.shape == ref.shape and x.dtype == ref.dtype and x.data_ptr() == ref.data_ptr()


class RecordEncoderStates:
    """Forward pre-hook on an encoder-decoder's decoder: keeps the encoder output it is given
    (``encoder_hidden_states``), so that layers can tell cross-attention inputs from decoder tokens.

    A small object rather than a closure, so that ``copy.deepcopy`` of the model points the copy's
    hook at the copy's routing state."""

    def __init__(self, routing: RoutingState):
        self.routing = routing

    def __call__(self, module, args, kwargs):
        states = kwargs.get("encoder_hidden_states")
        if states is None and args:
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
            states = bound.get("encoder_hidden_states")
        if self.routing.open:
            self.routing.encoder_states = weakref.ref(states) if isinstance(states, torch.Tensor) else None
        return None


def _align_mask(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The padding mask as one bool per token of ``x`` (shape x.shape[:-1]), or None if it cannot align."""
    if mask is None or mask.dim() != 2 or x.dim() != 3:
        return None
    batch, seq = mask.shape
    rows, x_seq = x.shape[0], x.shape[1]
    if x_seq != seq or rows % batch != 0:
        return None  # e.g. cached decoding (one new token) or a decoder with its own length
    mask = mask.to(device=x.device, dtype=torch.bool)
    return mask if rows == batch else mask.repeat_interleave(rows // batch, dim=0)
