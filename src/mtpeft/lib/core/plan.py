"""The routing plan: what the model wrapper works out once per forward about the batch, so that the
adapted layers only read it (no host sync and no data-dependent shape inside a layer).

    task_ids (B,) ──one host read──▶ B python ints ──▶ range check, task groups, sort order
                                                        (python ints, one small copy to the device)

Why a plan: a task-routed layer needs the distinct tasks of the batch (their number G sets the size of
its per-task tables and of its mixed-batch GEMM). Finding them on the device is ``torch.unique`` plus a
read of its size: a device-to-host sync and, under torch.compile, a graph break, once in *every* layer.
The wrapper instead reads the ids once, at entry, where it validates them anyway, and hands every layer
the same answer. On a GPU that is one sync per forward; under torch.compile the plan is built outside the
graph (:func:`run_outside_graphs`), and the graph sees only tensors and the python int G.

Pieces:
    :class:`TaskGroups`   the batch's task groups (slots present, each example's group, sort order)
    :class:`CallDims`     rows per example and token counts of one call of the wrapped model
    :class:`RoutingPlan`  ids, groups, padding masks and entry dims of one wrapper call
    :func:`group_tasks`   TaskGroups from ids already on the host
    :func:`plan_task_ids` the one host read, the range check and the groups
    :func:`run_outside_graphs`  how the wrapper keeps building the plan out of torch.compile graphs
    :func:`call_dims`     CallDims from a call's arguments (shapes only: no read)

A plan is built by ``MultiTaskModel.routing_plan`` (and ``RoutingState.scope`` for bare layers, with the
row layout left undeclared); layers see it through their :class:`mtpeft.lib.core.context.Route`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .task_ids import check_merged_task, check_task_id_range, infer_batch_size

STREAMS = ("input", "decoder")


@dataclass(frozen=True, eq=False)
class TaskGroups:
    """The task groups of a batch of B examples, for layers with ``n_tasks`` tasks.

    Slots: an id t in [0, n_tasks) is slot t; with ``unknown_task="average"`` every other id is the one
    slot n_tasks (the method's task-agnostic fallback). G = the number of distinct slots present.

        tasks          (G,)  long: the slots present, ascending (as torch.unique(sorted=True) gives them)
        example_group  (B,)  long: each example's index into ``tasks``; tasks[example_group] = example_slot
        example_slot   (B,)  long: each example's slot
        order          (B,)  long: the examples sorted by group, stable (for kernels that run task by task:
                             x[order] holds each group's examples contiguously, ``sizes`` long)
        restore        (B,)  long: the inverse permutation, order[restore] = arange(B)
        sizes          G python ints: examples per group (sum B)
    """

    tasks: torch.Tensor
    example_group: torch.Tensor
    example_slot: torch.Tensor
    order: torch.Tensor
    restore: torch.Tensor
    sizes: tuple[int, ...]
    n_tasks: int
    unknown_task: str

    @property
    def n_groups(self) -> int:
        return len(self.sizes)

    def to(self, device) -> "TaskGroups":
        """The same groups with their tensors on ``device`` (no copy when already there)."""
        if self.tasks.device == torch.device(device):
            return self
        move = {k: getattr(self, k).to(device) for k in ("tasks", "example_group", "example_slot", "order", "restore")}
        return TaskGroups(**move, sizes=self.sizes, n_tasks=self.n_tasks, unknown_task=self.unknown_task)


def group_tasks(values: list[int], n_tasks: int, unknown_task: str, device) -> TaskGroups:
    """TaskGroups of the ids ``values`` (python ints, one per example), built on the host.

    With ``unknown_task="error"`` an id outside [0, n_tasks) is an error; with "average" it is slot n_tasks.
    The five index tensors reach ``device`` in one copy (one packed tensor, split into views).
    """
    if unknown_task == "average":
        slots = [v if 0 <= v < n_tasks else n_tasks for v in values]
    else:
        bad = [v for v in values if not 0 <= v < n_tasks]
        if bad:
            raise ValueError(
                f"task id {bad[0]} is out of range: this layer has n_tasks={n_tasks}. Set unknown_task='average' "
                f"in the config to accept unseen tasks."
            )
        slots = list(values)
    present = sorted(set(slots))
    index = {slot: g for g, slot in enumerate(present)}
    example_group = [index[s] for s in slots]
    order = sorted(range(len(slots)), key=example_group.__getitem__)  # stable: ties keep batch order
    restore = [0] * len(order)
    for position, example in enumerate(order):
        restore[example] = position
    sizes = [0] * len(present)
    for g in example_group:
        sizes[g] += 1
    b, g = len(slots), len(present)
    packed = torch.tensor(present + example_group + slots + order + restore, dtype=torch.long, device=device)
    tasks, ex_group, ex_slot, order_t, restore_t = packed.split([g, b, b, b, b])
    return TaskGroups(tasks, ex_group, ex_slot, order_t, restore_t, tuple(sizes), n_tasks, unknown_task)


@dataclass(frozen=True)
class CallDims:
    """What the wrapper knows about the rows of one call of the wrapped model, from its arguments' shapes.

    ``rows_per_example`` m: the call runs B·m rows, each example's m rows adjacent (m = 1 for a forward;
    ``num_beams · num_return_sequences`` in generate, whose expansion repeats each example in place), or
    None when nobody declared it (a bare ``RoutingState.scope`` around a standalone layer: then any
    whole multiple of B is taken as that layout). ``input_tokens`` / ``decoder_tokens``: tokens per row of
    the call's two token streams (see core.context), when known; a 2-D layer input of B·m·t rows is the
    call's tokens flattened.
    """

    rows_per_example: int | None = 1
    input_tokens: int | None = None
    decoder_tokens: int | None = None

    def tokens(self, stream: str) -> int | None:
        return self.input_tokens if stream == "input" else self.decoder_tokens


UNDECLARED = CallDims(rows_per_example=None)


@dataclass(frozen=True, eq=False)
class RoutingPlan:
    """Everything the adapted layers read about one wrapper call.

    task_ids      (B,) long, validated, or None
    batch         B (examples), or None when it cannot be told (then rows are not checked)
    input_mask    (B, S) bool padding mask of the input tokens (an encoder-decoder's encoder), or None
    decoder_mask  (B, T) bool padding mask of an encoder-decoder's decoder tokens, or None
    groups        the task groups (task-routed methods, unmerged), or None
    n_task_rows   rows of the per-task router statistics (n_tasks, else the largest id + 1), or None
    dims          the entry call's CallDims (generate's later calls update them: core.context)
    """

    task_ids: torch.Tensor | None = None
    batch: int | None = None
    input_mask: torch.Tensor | None = None
    decoder_mask: torch.Tensor | None = None
    groups: TaskGroups | None = None
    n_task_rows: int | None = None
    dims: CallDims = UNDECLARED

    def mask(self, stream: str) -> torch.Tensor | None:
        return self.input_mask if stream == "input" else self.decoder_mask


def as_bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A (batch, seq) padding mask as bool (True = real token); anything else is kept as given."""
    return mask if mask is None or mask.dtype == torch.bool else mask.to(torch.bool)


def plan_task_ids(task_ids: torch.Tensor, n_tasks: int | None, *, check_range: bool,
                  unknown_task: str | None, merged_task: int | None = None) -> tuple[TaskGroups | None, int | None]:
    """Read validated ``task_ids`` (B,) once and return (task groups, n_task_rows).

    ``check_range``: refuse ids outside [0, n_tasks) (the wrapper's "error" policy). ``unknown_task``:
    build TaskGroups with that policy ("error" / "average"), or None for no groups (token-routed methods,
    merged adapters). ``merged_task``: the task a task-routed adapter is merged for, whose ids alone the
    batch may hold (checked on the same host read, so that merged layers read nothing). The wrapper calls
    it through :func:`run_outside_graphs`.
    """
    values = task_ids.tolist()  # the one device-to-host read of a forward
    if check_range and n_tasks is not None:
        check_task_id_range(values, n_tasks)
    if merged_task is not None:
        check_merged_task(values, merged_task)
    groups = None if unknown_task is None else group_tasks(values, n_tasks, unknown_task, task_ids.device)
    n_rows = n_tasks if n_tasks is not None else (max(values) + 1 if values else 0)
    return groups, n_rows


_OUTSIDE_GRAPHS: dict = {}  # function -> the same function behind torch.compiler.disable


def run_outside_graphs(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, run eagerly even inside a function torch.compile traces.

    The wrapper builds its routing plan this way: under torch.compile the host read and the python
    grouping stay out of the graph (Dynamo runs the call as it is and guards only on what the traced code
    reads of the result: the tensors and the group count G), instead of a graph break in the middle of
    the forward and a graph specialised on every task id.

    torch.compiler.disable imports torch._dynamo (seconds), which ``import mtpeft`` must not pay, so the
    disabled function is made on first need; Dynamo cannot trace the making (a graph break of its own),
    so an eager call made once torch._dynamo is loaded makes it in advance. A compiled forward before any
    eager one pays that break once."""
    if not torch.compiler.is_compiling():
        if fn not in _OUTSIDE_GRAPHS and "torch._dynamo" in sys.modules:
            _OUTSIDE_GRAPHS[fn] = torch.compiler.disable(fn)  # cheap now; a later traced call finds it
        return fn(*args, **kwargs)
    eager = _OUTSIDE_GRAPHS.get(fn)
    if eager is None:
        eager = _OUTSIDE_GRAPHS[fn] = torch.compiler.disable(fn)
    return eager(*args, **kwargs)


_INPUT_TOKEN_KEYS = ("input_ids", "inputs_embeds")
_DECODER_TOKEN_KEYS = ("decoder_input_ids", "decoder_inputs_embeds")


def _tokens(value) -> int | None:
    """Tokens per row of a token-id (rows, seq) or embedding (rows, seq, d) tensor."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2:
        return value.shape[1]
    return None


def call_dims(args: tuple, kwargs: dict, batch: int, encoder_decoder: bool,
              previous: CallDims | None = None) -> CallDims:
    """The CallDims of one call of the wrapped model on a batch of ``batch`` examples (shapes only).

    Rows per example = the call's leading dimension / batch: a call whose rows are not a whole multiple
    of the batch is an error (the task ids cannot be assigned). Token counts come from input_ids /
    inputs_embeds (or a leading positional token-id or embedding tensor) and decoder_input_ids /
    decoder_inputs_embeds (an encoder-decoder building its decoder inputs from ``labels``: the labels'
    length); what a call does not show is kept from ``previous`` (e.g. the encoder's length during
    generate's decoder steps).
    """
    rows = infer_batch_size(args, kwargs)
    previous = previous or CallDims()
    if rows is None:
        return previous
    if batch <= 0 or rows % batch:
        raise ValueError(
            f"the wrapped model was called with {rows} rows for a batch of {batch} examples (task_ids / the "
            f"inputs given to forward or generate): rows must be the examples, each repeated in place a whole "
            f"number of times (beams, return sequences). Pass one task id per example."
        )
    input_tokens = next((_tokens(kwargs[k]) for k in _INPUT_TOKEN_KEYS if kwargs.get(k) is not None), None)
    if input_tokens is None and args and isinstance(args[0], torch.Tensor):
        first = args[0]  # a positional input: token ids (rows, seq) or embeddings (rows, seq, d)
        if first.dim() >= 3 or (first.dim() == 2 and not first.is_floating_point()):
            input_tokens = first.shape[1]
    decoder_tokens = next((_tokens(kwargs[k]) for k in _DECODER_TOKEN_KEYS if kwargs.get(k) is not None), None)
    labels = kwargs.get("labels")
    if decoder_tokens is None and encoder_decoder and isinstance(labels, torch.Tensor) and labels.dim() == 2:
        decoder_tokens = labels.shape[1]  # transformers' seq2seq LMs shift the labels into the decoder inputs
    return CallDims(
        rows_per_example=rows // batch,
        input_tokens=previous.input_tokens if input_tokens is None else input_tokens,
        decoder_tokens=previous.decoder_tokens if decoder_tokens is None else decoder_tokens,
    )
