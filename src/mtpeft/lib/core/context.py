"""The per-forward routing context: how task ids, the padding mask, aux losses and router
statistics travel between the model wrapper and the adapted layers.

Why a context object rather than new forward arguments: the wrapped Hugging Face model must stay
unmodified, so its signature cannot carry ``task_ids``. The wrapper validates the ids once, builds one
:class:`~mtpeft.lib.core.plan.RoutingPlan` per call (task groups, padding masks, the call's row layout:
core.plan) and opens a scope around the call; every adapted layer holds a reference to the same
:class:`RoutingState` (one per wrapped model, never module-global) and reads what it needs through
its :class:`Route`: nothing inside a layer reads a tensor's values on the host.

Rows. A layer input x has B·k leading rows, k consecutive rows per example, where k is known from the
call, never guessed from x: k = m, the call's rows per example (1 in a forward; beams times return
sequences in generate, from a pre-hook on the wrapped model that reads each call's input shape), or,
for a 2-D input, also m·t with t the call's tokens per row (tokens flattened to rows). Any other row
count is an error when there are task ids to route (the padding mask is then not applied either). Only
a bare scope around a standalone layer (no wrapper, so nobody declared m) takes any whole multiple of B.

Encoder-decoder models (T5, BART) run two token streams of different lengths in one forward: the
encoder's tokens (``attention_mask``) and the decoder's (``decoder_attention_mask``). Each adapted
layer says which stream it is in (``AdaptedLayer.token_stream``, set by the wrapper): "input" for
every layer of a one-stream model and for an encoder-decoder's encoder, "decoder" for the rest of an
encoder-decoder (its decoder and LM head). A decoder layer reads the decoder's mask, except when its
input is the encoder's output itself (the keys and values of cross-attention), recorded by a pre-hook
on the decoder as ``encoder_states``: those tokens are the encoder's. A mask that does not line up
with an input's rows and tokens is not applied (every token counts) rather than applied to the wrong
tokens.

Scopes are re-entrant: a scope opened inside another (the same model called from within its own
forward) collects its own aux losses and statistics, and on closing restores the outer scope's plan
and collections. The outermost scope leaves its plan and collections in place when it closes.

Gradient checkpointing re-runs layer forwards *during backward*. The state therefore keeps the last
call's plan after the scope closes, and a layer uses it only while a scope is open or while
autograd is executing a backward pass (the recomputation). Aux losses and statistics are recorded
only while a scope is open, so a recomputation never counts them twice.
"""

from __future__ import annotations

import inspect
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .plan import STREAMS, UNDECLARED, CallDims, RoutingPlan, TaskGroups, as_bool_mask, call_dims, group_tasks


def in_backward_pass() -> bool:
    """True while autograd executes a backward graph (e.g. a checkpointed recomputation).

    torch (2.13) has no public way to ask this: its own FSDP and ``torch.utils.module_tracker`` use
    this same private call. ``torch.utils.checkpoint``'s public ``context_fn`` would tell a recomputation
    apart, but transformers calls checkpoint itself, so the library cannot pass one. Should the call
    disappear, a recomputation sees no task ids and a task-routed layer raises "pass task_ids" (loudly,
    never a silent misroute)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def expand_rows(t: torch.Tensor, k: int) -> torch.Tensor:
    """(B, ...) -> (B·k, ...): each row repeated k times in place (= repeat_interleave(k, 0), as a view
    and one copy: no repeats tensor, nothing read on the host)."""
    if k == 1:
        return t
    return t.unsqueeze(1).expand(t.shape[0], k, *t.shape[1:]).reshape(t.shape[0] * k, *t.shape[1:])


@dataclass
class Route:
    """What one adapted layer needs to know about the rows of its input.

    ``row_task_ids`` has one entry per leading-dimension row of the layer input (shape (x.shape[0],)),
    ``token_mask`` one bool per token (shape x.shape[:-1], True = real token) or None when the mask
    cannot be aligned with the input (then every token counts). From the wrapper's plan also:
    ``groups``, the batch's task groups (per example); ``rows_per_example``, the consecutive input rows
    of each example; ``n_task_rows``, rows of the per-task router statistics.
    """

    row_task_ids: torch.Tensor | None
    token_mask: torch.Tensor | None
    record: bool
    groups: TaskGroups | None = None
    rows_per_example: int = 1
    n_task_rows: int | None = None

    def task_groups(self, n_tasks: int, unknown_task: str, device) -> TaskGroups:
        """The task groups of the batch for a layer with ``n_tasks`` tasks, tensors on ``device``.

        From the wrapper's plan (no host read). A Route built by hand (tests, a benchmark of one layer)
        has none: its rows are grouped here, which reads them on the host."""
        groups = self.groups
        if groups is None:
            ids = self.row_task_ids[:: self.rows_per_example]  # one per example: its rows are adjacent
            groups = group_tasks(ids.tolist(), n_tasks, unknown_task, ids.device)
        elif groups.n_tasks != n_tasks or groups.unknown_task != unknown_task:
            raise ValueError(
                f"the routing plan was built for n_tasks={groups.n_tasks} (unknown_task={groups.unknown_task!r}) "
                f"but this layer has n_tasks={n_tasks} (unknown_task={unknown_task!r}); build the plan again "
                f"(model.routing_plan) after changing the tasks."
            )
        return groups.to(device)

    def row_groups(self, groups: TaskGroups) -> torch.Tensor:
        """(rows,) each input row's index into ``groups.tasks``."""
        return expand_rows(groups.example_group, self.rows_per_example)

    def row_examples(self, n_examples: int, device) -> torch.Tensor:
        """(rows,) each input row's example, for ``n_examples`` examples."""
        return expand_rows(torch.arange(n_examples, device=device), self.rows_per_example)


def summed_aux_losses(aux_losses: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.stack(values).sum() for name, values in aux_losses.items()}


def weighted_aux_total(summed: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor | None:
    total = None
    for name, value in summed.items():
        term = weights[name] * value
        total = term if total is None else total + term
    return total


@dataclass
class ScopeRecord:
    """What the layers recorded during one scope (yielded by :meth:`RoutingState.scope`): still this
    scope's after a nested scope restored its outer one."""

    aux_losses: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    aux_weights: dict[str, float] = field(default_factory=dict)
    router_stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def summed_aux_losses(self) -> dict[str, torch.Tensor]:
        return summed_aux_losses(self.aux_losses)

    def weighted_aux_total(self, summed: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return weighted_aux_total(summed, self.aux_weights)


def bare_plan(task_ids, attention_mask, decoder_attention_mask) -> RoutingPlan:
    """The plan of a bare scope (a standalone layer, no wrapper): ids and masks as given, no groups, and
    the row layout undeclared (any whole multiple of the batch, each example's rows adjacent)."""
    batch = next((t.shape[0] for t in (task_ids, attention_mask, decoder_attention_mask)
                  if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    return RoutingPlan(task_ids=task_ids, batch=batch, input_mask=as_bool_mask(attention_mask),
                       decoder_mask=as_bool_mask(decoder_attention_mask), dims=UNDECLARED)


_SCOPE_FIELDS = ("plan", "call", "encoder_states", "open", "recording", "aux_losses", "aux_weights", "router_stats")


@dataclass
class RoutingState:
    """Shared by the wrapper and all of its adapted layers."""

    plan: RoutingPlan | None = None  # the current (or last) call's plan
    call: CallDims = UNDECLARED  # the current call of the wrapped model (generate makes several)
    # a weak reference to the (batch, seq, d) encoder output the decoder reads as cross-attention input: it
    # neither keeps that tensor alive after the step nor gets in the way of copy.deepcopy
    encoder_states: weakref.ref | None = None
    open: bool = False
    recording: bool = False
    aux_losses: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    aux_weights: dict[str, float] = field(default_factory=dict)
    router_stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def task_ids(self) -> torch.Tensor | None:
        """(batch,) as given to the wrapper."""
        return None if self.plan is None else self.plan.task_ids

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """(batch, seq) bool: the input (an encoder-decoder's encoder) tokens."""
        return None if self.plan is None else self.plan.input_mask

    @property
    def decoder_attention_mask(self) -> torch.Tensor | None:
        """(batch, target seq) bool: an encoder-decoder's decoder tokens."""
        return None if self.plan is None else self.plan.decoder_mask

    @contextmanager
    def scope(self, task_ids=None, attention_mask=None, record: bool = False, decoder_attention_mask=None, *,
              plan: RoutingPlan | None = None):
        """Open a forward scope around one call; yields its :class:`ScopeRecord`. Resets what the
        previous call collected; re-entrant (an inner scope restores the outer one when it closes).

        The wrapper passes its ``plan``; a bare scope around a standalone layer passes task ids and masks
        instead (see :func:`bare_plan`)."""
        if plan is None:
            plan = bare_plan(task_ids, attention_mask, decoder_attention_mask)
        elif task_ids is not None or attention_mask is not None or decoder_attention_mask is not None:
            raise TypeError("RoutingState.scope takes a plan, or task ids and masks, not both.")
        outer = tuple(getattr(self, name) for name in _SCOPE_FIELDS) if self.open else None
        record_of_scope = ScopeRecord()
        self.plan, self.call, self.encoder_states = plan, plan.dims, None  # encoder_states: the decoder's pre-hook
        self.aux_losses = record_of_scope.aux_losses
        self.aux_weights = record_of_scope.aux_weights
        self.router_stats = record_of_scope.router_stats
        self.open = True
        self.recording = record
        try:
            yield record_of_scope
        finally:
            if outer is None:  # the outermost scope: its plan stays for a checkpointed recomputation
                self.open = False
                self.recording = False
            else:
                for name, value in zip(_SCOPE_FIELDS, outer):
                    setattr(self, name, value)

    # ----------------------------------------------------------------------------- layer side
    def route_for(self, x: torch.Tensor, stream: str = "input", layer: str = "an adapted layer") -> Route:
        """Align the call's task ids and padding mask with a layer input ``x`` of shape (rows, ..., d).

        ``stream``: "input" (the model's input tokens; an encoder-decoder's encoder) or "decoder".
        ``layer``: the layer's name, for the error a misaligned row count raises."""
        if not (self.open or in_backward_pass()):
            return Route(None, None, False)
        if stream not in STREAMS:
            raise ValueError(f"unknown token stream {stream!r}: 'input' or 'decoder'.")
        plan = self.plan
        per_example = self._rows_per_example(x, stream)
        ids = plan.task_ids
        if ids is not None and per_example is None:
            raise ValueError(self._misaligned(x, stream, layer))
        return Route(
            row_task_ids=None if ids is None else expand_rows(ids, per_example),
            token_mask=self._token_mask(x, stream, per_example),
            record=self.recording,
            groups=plan.groups,
            rows_per_example=per_example if per_example else 1,
            n_task_rows=plan.n_task_rows,
        )

    def _rows_per_example(self, x: torch.Tensor, stream: str) -> int | None:
        """k, the consecutive rows of x per example (x has batch·k rows), or None if x's rows do not line up."""
        batch, m = self.plan.batch, self.call.rows_per_example
        if batch is None or x.dim() == 0:
            return None
        rows = x.shape[0]
        if m is None:  # undeclared (a bare scope): any whole multiple of the batch
            if batch == 0:
                return 1 if rows == 0 else None
            return rows // batch if rows % batch == 0 else None
        if x.dim() >= 2 and rows == batch * m:
            return m
        tokens = self.call.tokens(stream)
        if x.dim() == 2 and tokens is not None and rows == batch * m * tokens:
            return m * tokens  # the call's tokens flattened to rows, each example's rows adjacent
        return None

    def _misaligned(self, x: torch.Tensor, stream: str, layer: str) -> str:
        batch, m = self.plan.batch, self.call.rows_per_example
        tokens = self.call.tokens(stream)
        allowed = f"{batch * m} (= {batch} examples × {m} rows each)" if m is not None else f"a multiple of {batch}"
        if m is not None and tokens is not None:
            allowed += f", or for a 2-D input {batch * m * tokens} (those rows' {tokens} tokens flattened)"
        return (f"{layer} received an input of shape {tuple(x.shape)}, whose {x.shape[0] if x.dim() else 0} rows do "
                f"not line up with the batch: expected {allowed}. mtpeft gives each row its example's task id "
                f"and refuses to guess another layout (e.g. sequence-first inputs, or rows that are not the "
                f"examples): adapt only layers whose inputs are batch-first, or pass one task id per row.")

    def _token_mask(self, x: torch.Tensor, stream: str, per_example: int | None) -> torch.Tensor | None:
        """The stream's padding mask as one bool per token of a (rows, seq, d) x, or None if it cannot align."""
        mask = self._mask_of_stream(x, stream)
        if mask is None or per_example is None or mask.dim() != 2 or x.dim() != 3:
            return None
        if x.shape[1] != mask.shape[1] or x.shape[0] != mask.shape[0] * per_example:
            return None  # e.g. cached decoding (one new token) or a decoder with its own length
        return expand_rows(mask.to(device=x.device, dtype=torch.bool), per_example)

    def _mask_of_stream(self, x: torch.Tensor, stream: str) -> torch.Tensor | None:
        if stream == "input":
            return self.plan.input_mask
        states = self.encoder_states() if self.encoder_states is not None else None
        if states is not None and _same_tensor(x, states):
            return self.plan.input_mask  # cross-attention keys / values: the encoder's tokens
        return self.plan.decoder_mask

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
        return summed_aux_losses(self.aux_losses)

    def weighted_aux_total(self, summed: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return weighted_aux_total(summed, self.aux_weights)


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


class RecordCallDims:
    """Forward pre-hook on the wrapped model: each call's rows per example and token counts (from its
    arguments' shapes, :func:`mtpeft.lib.core.plan.call_dims`), so that layers know the row layout of
    generate's calls (beams, return sequences, one new token per step) without guessing it.

    A small object rather than a closure, so that ``copy.deepcopy`` of the model points the copy's
    hook at the copy's routing state."""

    def __init__(self, routing: RoutingState, encoder_decoder: bool):
        self.routing = routing
        self.encoder_decoder = encoder_decoder

    def __call__(self, module, args, kwargs):
        routing = self.routing
        if routing.open and routing.plan is not None and routing.plan.batch is not None:
            routing.call = call_dims(args, kwargs, routing.plan.batch, self.encoder_decoder, previous=routing.call)
        return None
