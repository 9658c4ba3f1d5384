"""One routing plan per forward (issue 17 §2): the wrapper reads the task ids once and the adapted layers
only read their Route, for every registered method, on a 2-layer tiny Llama.

(a) No op that reads a tensor on the host or has a data-dependent shape runs inside an adapted layer
    (forward of a mixed-task training step with labels, its whole backward, and an eval forward).
(b) torch._dynamo.explain finds at most one graph break (the entry's read of the ids), and the inner
    forward (``forward_with_plan``, the plan built outside) compiles with fullgraph=True, gives eager's
    loss and gradients, and is not specialised on the ids (a new batch with as many task groups reuses it).
(c) Scopes nest (the inner one restores the outer); a layer input whose rows do not line up with the
    batch is an error, also when their count is a multiple of the batch.
Plus the plan itself: groups, sort order and inverse permutation, unknown ids, rows per call.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import mtpeft
from mtpeft.lib.config import get_config_class, known_methods
from mtpeft.lib.core.context import RoutingState
from mtpeft.lib.core.plan import CallDims, RoutingPlan, call_dims, group_tasks
from tiny_models import batch_for, tiny_llama

N_TASKS = 3
MIXED = torch.tensor([0, 2, 1, 2])  # 3 tasks in a batch of 4
MIXED_UNKNOWN = torch.tensor([0, -1, 1, 7])  # unseen ids next to known ones


def _cases():
    """Every registered method at its defaults, and with unknown_task="average" where it has that option
    (read from the config's fields, not from a list of names). Only the package's own methods: a test file
    may register a probe method of its own (tests/test_aux_channel.py), and which ones are registered would
    otherwise depend on what pytest collected first."""
    for method in known_methods():
        cls = get_config_class(method)
        if not cls.__module__.startswith("mtpeft."):
            continue
        yield pytest.param(method, {}, MIXED, id=method)
        if "unknown_task" in {f.name for f in dataclasses.fields(cls)}:
            yield pytest.param(method, {"unknown_task": "average"}, MIXED_UNKNOWN, id=f"{method}-average")


CASES = list(_cases())


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _model(method: str, overrides: dict):
    model = mtpeft.get_model(tiny_llama(seed=0), get_config_class(method)(n_tasks=N_TASKS, **overrides))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero adapters everywhere (B = 0 at init would hide a wrong update)
        for name, p in model.named_parameters():
            if model.parameter_role(name) is not None:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# ------------------------------------------------------------------------ (a) no sync inside a layer
def _is_sync(func, args) -> bool:
    """An op that reads a tensor's values on the host or whose output shape depends on them."""
    name = func.overloadpacket.__name__
    if name in {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "argwhere",
                "_unique", "_unique2", "unique_dim", "unique_consecutive", "masked_select", "bincount",
                "histc", "repeat_interleave", "masked_scatter"}:
        return name != "repeat_interleave" or len(args) < 2 or not isinstance(args[1], int)  # int repeats: static
    if name in {"index", "index_put", "index_put_", "_index_put_impl_"} and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
    return False


class SyncCounter(TorchDispatchMode):
    """Counts sync ops dispatched while ``inside`` > 0 (set by hooks around every adapted layer's forward),
    and every sync op in a backward run with ``everywhere``."""

    def __init__(self):
        super().__init__()
        self.inside = 0
        self.everywhere = False
        self.layer_calls = 0
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if (self.inside or self.everywhere) and _is_sync(func, args):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))

    def watch(self, model) -> None:
        def enter(*_):
            self.inside += 1
            self.layer_calls += 1

        def leave(*_):
            self.inside -= 1

        for _, layer in model.adapted_layers():
            layer.register_forward_pre_hook(enter)
            layer.register_forward_hook(leave)


@pytest.mark.parametrize("method, overrides, task_ids", CASES)
def test_no_host_sync_inside_the_layers(method, overrides, task_ids):
    model = _model(method, overrides)
    counter = SyncCounter()
    counter.watch(model)
    batch = batch_for("llama")
    with counter:
        model.train()
        out = model(**batch, labels=batch["input_ids"], task_ids=task_ids)
        counter.everywhere = True  # the whole backward: the layers' and the base model's
        out.loss.backward()
        counter.everywhere = False
        model.eval()
        with torch.no_grad():
            model(**batch, task_ids=task_ids)
    assert counter.layer_calls == 2 * len(model.adapted_names)
    assert counter.seen == []
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if model.parameter_role(n) is not None)


def test_the_counter_sees_a_read_inside_a_layer():
    """The counter is live: a layer that reads a value on the host (as torch.unique + int() did) is caught."""
    model = _model("lora", {})
    counter = SyncCounter()
    counter.watch(model)
    name, layer = model.adapted_layers()[0]
    layer.register_forward_pre_hook(lambda module, args: int(args[0].sum() > 0) and None)
    with counter, torch.no_grad():
        model(**batch_for("llama"))
    assert counter.seen == ["aten._local_scalar_dense.default"]


# ------------------------------------------------------------------------ (b) graph breaks, fullgraph
@pytest.mark.parametrize("method, overrides, task_ids", CASES)
def test_at_most_one_graph_break_in_train_and_eval(method, overrides, task_ids):
    model = _model(method, overrides)
    batch = batch_for("llama")
    model(**batch, task_ids=task_ids)  # an eager call first, as a training loop's first step would be
    torch._dynamo.reset()
    model.train()
    train = torch._dynamo.explain(model)(**batch, labels=batch["input_ids"], task_ids=task_ids)
    torch._dynamo.reset()
    model.eval()
    with torch.no_grad():
        evaluation = torch._dynamo.explain(model)(**batch, task_ids=task_ids)
    torch._dynamo.reset()
    assert train.graph_break_count <= 1, train.break_reasons
    assert evaluation.graph_break_count <= 1, evaluation.break_reasons


def _loss_and_grads(step, model, batch, task_ids, seed):
    torch.manual_seed(seed)  # the same dropout / Gumbel noise on both sides
    out = step(model.routing_plan(**batch, labels=batch["input_ids"], task_ids=task_ids),
               **batch, labels=batch["input_ids"])
    params = [p for p in model.parameters() if p.requires_grad]
    return out.loss.detach(), torch.autograd.grad(out.loss, params)


@pytest.mark.parametrize("method, overrides, task_ids", CASES)
def test_inner_forward_compiles_with_fullgraph(method, overrides, task_ids):
    """The plan built eagerly, the rest as one graph: train loss and gradients and eval logits equal eager's;
    a batch of other ids with as many task groups runs the same graph (no recompilation)."""
    model = _model(method, overrides)
    batch = batch_for("llama")
    torch._dynamo.reset()
    compiled = torch.compile(model.forward_with_plan, fullgraph=True, backend="aot_eager")
    model.train()
    loss_e, grads_e = _loss_and_grads(model.forward_with_plan, model, batch, task_ids, seed=3)
    loss_c, grads_c = _loss_and_grads(compiled, model, batch, task_ids, seed=3)
    torch.testing.assert_close(loss_c, loss_e, atol=1e-6, rtol=1e-5)
    for g_c, g_e in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(g_c, g_e, atol=1e-6, rtol=1e-5)
    model.eval()
    with torch.no_grad():
        for ids in (task_ids, task_ids.roll(1)):  # the same tasks, other examples
            plan = model.routing_plan(**batch, task_ids=ids)
            torch.testing.assert_close(compiled(plan, **batch).logits, model(**batch, task_ids=ids).logits,
                                       atol=1e-6, rtol=1e-5)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        compiled(model.routing_plan(**batch, task_ids=task_ids.flip(0)), **batch)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    torch._dynamo.reset()


# ------------------------------------------------------------------------ (c) nested scopes, rows
def test_nested_scopes_restore_the_outer_one():
    state = RoutingState()
    outer_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    with state.scope(torch.tensor([0, 1]), outer_mask, record=True) as outer:
        state.add_aux_loss("balance", torch.tensor(1.0), 0.5)
        with state.scope(torch.tensor([2, 2, 0]), None, record=False) as inner:
            assert torch.equal(state.route_for(torch.zeros(3, 4, 5)).row_task_ids, torch.tensor([2, 2, 0]))
            assert state.route_for(torch.zeros(3, 4, 5)).token_mask is None and not state.recording
            state.add_aux_loss("balance", torch.tensor(9.0), 0.5)  # not recording: dropped
            with state.scope(torch.tensor([1]), None, record=True) as innermost:
                state.add_aux_loss("balance", torch.tensor(4.0), 0.25)
            assert torch.equal(state.route_for(torch.zeros(3, 4, 5)).row_task_ids, torch.tensor([2, 2, 0]))
            assert state.open and not state.recording and state.aux_losses == {}
        route = state.route_for(torch.zeros(2, 3, 5))
        assert torch.equal(route.row_task_ids, torch.tensor([0, 1]))
        assert torch.equal(route.token_mask, outer_mask.bool()) and state.recording
        state.add_aux_loss("balance", torch.tensor(2.0), 0.5)
    assert not state.open
    assert inner.aux_losses == {}
    assert innermost.summed_aux_losses() == {"balance": torch.tensor(4.0)}
    assert outer.summed_aux_losses() == {"balance": torch.tensor(3.0)}
    assert outer.weighted_aux_total(outer.summed_aux_losses()) == torch.tensor(1.5)
    # the outermost scope leaves its plan for a checkpointed recomputation
    assert torch.equal(state.task_ids, torch.tensor([0, 1]))


def test_a_model_called_inside_its_own_scope():
    """A forward inside an open scope of the same model (e.g. a teacher pass during a student step): it
    routes its own ids, returns its own aux losses, and leaves the outer scope's plan and losses in place."""
    model = _model("moelora", {})
    batch = batch_for("llama")
    alone = model(**batch, task_ids=MIXED)
    outer_plan = model.routing_plan(**batch, task_ids=torch.tensor([1, 1, 0, 0]))
    with model.routing.scope(plan=outer_plan, record=True) as outer:
        model.routing.add_aux_loss("outer_probe", torch.tensor(1.0), 1.0)
        nested = model(**batch, task_ids=MIXED)
        assert model.routing.plan is outer_plan and model.routing.recording
    torch.testing.assert_close(nested.logits, alone.logits)
    assert nested.aux_losses.keys() == alone.aux_losses.keys() and "outer_probe" not in nested.aux_losses
    for name in alone.aux_losses:
        torch.testing.assert_close(nested.aux_losses[name], alone.aux_losses[name])
    assert set(outer.aux_losses) == {"outer_probe"}


class _Tokens(nn.Module):
    """A tiny model whose adapted linear sees tokens batch-first (B, S, d), sequence-first (S, B, d), or
    flattened to rows (B·S, d)."""

    def __init__(self, layout: str, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, d)
        self.proj = nn.Linear(d, d)
        self.layout = layout

    def forward(self, input_ids):
        h = self.embed(input_ids)  # (B, S, d)
        if self.layout == "sequence_first":
            return self.proj(h.transpose(0, 1)).transpose(0, 1)  # the layer sees (S, B, d)
        if self.layout == "flat":
            return self.proj(h.reshape(-1, h.shape[-1])).view(h.shape)  # the layer sees (B·S, d)
        return self.proj(h)


def _task_lora(layout: str):
    model = mtpeft.get_model(_Tokens(layout), mtpeft.TaskLoraConfig(r=2, n_tasks=2, target_modules=["proj"]))
    with torch.no_grad():
        model.base_model.proj.lora_B.normal_()
    return model


def test_rows_that_are_a_multiple_of_the_batch_for_another_reason_are_an_error():
    """Sequence-first inputs with S = 2·B: 2·B rows, which the old rows % batch rule took for two copies
    of each example (rows 0-1 example 0) although row s holds token s of every example."""
    input_ids = torch.randint(0, 20, (2, 4), generator=torch.Generator().manual_seed(0))
    task_ids = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"proj received an input of shape \(4, 2, 8\).*do not line up"):
        _task_lora("sequence_first")(input_ids, task_ids=task_ids)


def test_flattened_tokens_are_routed_by_their_example():
    """Rows = batch × tokens of the call (known from input_ids), each example's tokens adjacent: every row
    gets its example's task, as running each example alone."""
    model = _task_lora("flat")
    input_ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0))
    task_ids = torch.tensor([1, 0, 1])
    with torch.no_grad():
        mixed = model(input_ids, task_ids=task_ids)
        for i in range(3):
            torch.testing.assert_close(mixed[i:i + 1], model(input_ids[i:i + 1], task_ids=task_ids[i:i + 1]))
        other = model(input_ids, task_ids=1 - task_ids)
    assert not torch.allclose(mixed, other)


def test_declared_rows_per_example_and_the_bare_scope():
    """With the call's rows per example declared (the wrapper), only batch·m rows (and, for a 2-D input,
    batch·m·tokens) line up; a bare scope (no wrapper) keeps taking whole multiples."""
    state = RoutingState()
    plan = RoutingPlan(task_ids=torch.tensor([0, 1]), batch=2, dims=CallDims(rows_per_example=1, input_tokens=3))
    with state.scope(plan=plan):
        assert torch.equal(state.route_for(torch.zeros(2, 3, 4)).row_task_ids, torch.tensor([0, 1]))
        flat = state.route_for(torch.zeros(6, 4))
        assert torch.equal(flat.row_task_ids, torch.tensor([0, 0, 0, 1, 1, 1])) and flat.rows_per_example == 3
        with pytest.raises(ValueError, match=r"expected 2 \(= 2 examples × 1 rows each\), or for a 2-D input 6"):
            state.route_for(torch.zeros(4, 3, 4), layer="q_proj")
        with pytest.raises(ValueError, match="q_proj received"):
            state.route_for(torch.zeros(4, 4), layer="q_proj")
    with state.scope(plan=dataclasses.replace(plan, dims=CallDims(rows_per_example=2))):  # beams
        assert torch.equal(state.route_for(torch.zeros(4, 1, 4)).row_task_ids, torch.tensor([0, 0, 1, 1]))
    with state.scope(torch.tensor([0, 1]), None):
        assert torch.equal(state.route_for(torch.zeros(4, 3, 4)).row_task_ids, torch.tensor([0, 0, 1, 1]))
        with pytest.raises(ValueError, match="a multiple of 2"):
            state.route_for(torch.zeros(3, 3, 4))


def test_call_dims_read_the_call_shapes():
    ids = torch.zeros(6, 1, dtype=torch.long)
    assert call_dims((), {"input_ids": ids}, 3, False) == CallDims(2, 1, None)
    enc_dec = call_dims((), {"input_ids": torch.zeros(2, 7, dtype=torch.long), "labels": torch.zeros(2, 4)}, 2, True)
    assert enc_dec == CallDims(1, 7, 4)
    step = call_dims((), {"decoder_input_ids": torch.zeros(4, 1, dtype=torch.long)}, 2, True, previous=enc_dec)
    assert step == CallDims(2, 7, 1)  # a decoding step with 2 beams keeps the encoder's length
    with pytest.raises(ValueError, match="called with 5 rows for a batch of 2"):
        call_dims((), {"input_ids": torch.zeros(5, 3, dtype=torch.long)}, 2, False)


# ------------------------------------------------------------------------ the plan
def test_task_groups_sort_order_and_inverse():
    groups = group_tasks([2, 0, 2, 1, 0, 2], n_tasks=3, unknown_task="error", device="cpu")
    assert groups.tasks.tolist() == [0, 1, 2] and groups.sizes == (2, 1, 3) and groups.n_groups == 3
    assert torch.equal(groups.tasks[groups.example_group], groups.example_slot)
    assert groups.example_slot.tolist() == [2, 0, 2, 1, 0, 2]
    assert groups.order.tolist() == [1, 4, 3, 0, 2, 5]  # by group, ties in batch order
    assert torch.equal(groups.order[groups.restore], torch.arange(6))
    with pytest.raises(ValueError, match="task id 3 is out of range.*unknown_task='average'"):
        group_tasks([0, 3], n_tasks=3, unknown_task="error", device="cpu")
    unknown = group_tasks([5, 0, -1], n_tasks=3, unknown_task="average", device="cpu")
    assert unknown.tasks.tolist() == [0, 3] and unknown.example_slot.tolist() == [3, 0, 3]
    assert unknown.example_group.tolist() == [1, 0, 1]


def test_the_wrapper_plan():
    """The plan of a forward: validated ids, groups (task-routed only), masks as bool, rows declared."""
    batch = batch_for("llama")
    plan = _model("mtl_lora", {}).routing_plan(**batch, task_ids=MIXED)
    assert plan.batch == 4 and plan.dims == CallDims(1, 8, None) and plan.n_task_rows == N_TASKS
    assert plan.groups.tasks.tolist() == [0, 1, 2] and plan.groups.example_group.tolist() == [0, 2, 1, 2]
    assert plan.input_mask.dtype == torch.bool and torch.equal(plan.input_mask, batch["attention_mask"].bool())
    token_routed = _model("moelora", {}).routing_plan(**batch, task_ids=MIXED)
    assert token_routed.groups is None and token_routed.n_task_rows == N_TASKS
    with pytest.raises(ValueError, match="task id 3 is out of range.*n_tasks=3"):
        _model("mtl_lora", {}).routing_plan(**batch, task_ids=torch.tensor([0, 3, 1, 1]))
    model = _model("poly", {})
    with pytest.raises(ValueError, match="routing plan is for a batch of 4 examples, these inputs have 2"):
        model.forward_with_plan(model.routing_plan(**batch, task_ids=MIXED),
                                **{k: v[:2] for k, v in batch.items()})
