"""The model wrapper: inject a method's adapted layers into any torch / Hugging Face model.

``get_model(model, config)`` replaces each targeted linear layer by the method's AdaptedLayer (the
original layer lives on inside it, frozen) and returns a :class:`MultiTaskModel` that

* takes ``task_ids`` in ``forward`` and ``generate``, validates them once and passes them to the layers
  as one routing plan per call through a per-model routing context (the wrapped model's code and
  signature are untouched; see :meth:`MultiTaskModel.routing_plan` to build the plan outside a
  compiled graph);
* returns the auxiliary losses and router statistics the layers recorded during that forward, and
  adds the weighted aux losses to ``output.loss``;
* saves, loads, merges, unmerges and exports its adapters.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections import Counter
from contextlib import contextmanager

import torch
from torch import nn

from .config import AdapterConfig, get_layer_class, spec_of
from .core.context import RecordCallDims, RecordEncoderStates, RoutingState, ScopeRecord
from .core.layer import AdaptedLayer
from .core.plan import RoutingPlan, as_bool_mask, call_dims, plan_task_ids, run_outside_graphs
from .core.targets import find_targets
from .core.task_ids import infer_batch_size, validate_task_ids


def get_model(model: nn.Module, config: AdapterConfig) -> "MultiTaskModel":
    """Wrap ``model`` with the adapters ``config`` describes. The base model is frozen in place."""
    return MultiTaskModel(model, config)


def _layer_index(name: str) -> int:
    """The first integer component of a module name ("encoder.layer.3.attention..." -> 3)."""
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return int(match.group(1)) if match else 0


def _accepts_argument(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class _SignedForward:
    """``MultiTaskModel.forward`` carrying the base model's signature (a plain object, so that
    ``copy.deepcopy`` of the model rebinds it to the copy)."""

    def __init__(self, model: "MultiTaskModel", signature: inspect.Signature):
        self.model = model
        self.__signature__ = signature
        self.__doc__ = MultiTaskModel.forward.__doc__

    def __call__(self, *args, **kwargs):
        return MultiTaskModel.forward(self.model, *args, **kwargs)


def _refuse_adapted_base(base_model: nn.Module) -> None:
    """A base that already carries adapters (mtpeft's, injected in place by an earlier get_model, or
    PEFT's) would get adapters nested inside adapters; refuse it with what to do instead."""
    if isinstance(base_model, MultiTaskModel):
        raise TypeError("this model is already wrapped by mtpeft; wrap the bare base model instead.")
    ours = [n for n, m in base_model.named_modules() if isinstance(m, AdaptedLayer)]
    if ours:
        raise TypeError(
            f"this model already carries mtpeft adapters ({len(ours)} adapted layers, e.g. {ours[0]!r}): it "
            f"was passed to get_model before, which adapts the base in place. Call model.unload() on that "
            f"MultiTaskModel to get the bare base back, or build a fresh base model.")
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return
    theirs = [n for n, m in base_model.named_modules() if isinstance(m, BaseTunerLayer)]
    if theirs:
        raise TypeError(
            f"this model carries PEFT adapters ({len(theirs)} PEFT layers, e.g. {theirs[0]!r}); mtpeft does "
            f"not nest its adapters inside PEFT's. Use peft_model.merge_and_unload() (or .unload()) to get a "
            f"plain base model first.")


def _parameters_by_storage(root: nn.Module) -> dict[int, list[str]]:
    """Storage address -> the names of the parameters of ``root`` living in it. Two names for one address
    are tied weights (the same Parameter, e.g. an LM head tied to the input embeddings) or views of one
    buffer."""
    by_storage: dict[int, list[str]] = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        by_storage.setdefault(param.untyped_storage().data_ptr(), []).append(name)
    return by_storage


class MultiTaskModel(nn.Module):
    def __init__(self, base_model: nn.Module, config: AdapterConfig):
        super().__init__()
        _refuse_adapted_base(base_model)
        if not isinstance(config, AdapterConfig):
            raise TypeError(f"config must be an mtpeft method config (e.g. mtpeft.LoraConfig), got "
                            f"{type(config).__name__}.")
        self.base_model = base_model
        self.config = config
        self.routing = RoutingState()
        self.last_aux_losses: dict[str, torch.Tensor] = {}
        self.last_router_stats: dict[str, dict[str, torch.Tensor]] = {}
        targets = find_targets(base_model, config.target_modules, config.exclude_modules,
                               default_role=config.default_targets)
        saved = self._resolve_modules_to_save(config.modules_to_save)
        encoder_modules = self._encoder_modules()  # before anything changes: it can refuse the model
        flags = {name: param.requires_grad for name, param in base_model.named_parameters()}
        for param in base_model.parameters():
            param.requires_grad_(False)
        layer_cls = get_layer_class(config.method)
        n_layers = max(_layer_index(n) for n in targets) + 1
        self.adapted_names = targets
        self.unloaded = False
        injected = []
        try:
            for name in targets:
                base_layer = base_model.get_submodule(name)
                layer = layer_cls(base_layer, config, module_name=name, routing=self.routing,
                                  layer_index=_layer_index(name), n_layers=n_layers)
                if encoder_modules is not None and id(base_layer) not in encoder_modules:
                    layer.token_stream = "decoder"  # see mtpeft.lib.core.context: its own padding mask
                _set_submodule(base_model, name, layer)
                injected.append((name, base_layer))
        except BaseException:
            # A layer can refuse its shape (e.g. MHR's n_splits) after earlier layers were replaced:
            # put the original layers and requires_grad flags back, so a failed wrap changes nothing.
            for name, base_layer in reversed(injected):
                _set_submodule(base_model, name, base_layer)
            for name, param in base_model.named_parameters():
                param.requires_grad_(flags.get(name, param.requires_grad))
            raise
        for name in saved:
            for param in base_model.get_submodule(name).parameters():
                param.requires_grad_(True)
        self.saved_module_names = saved
        self._encoder_states_hook = None
        if encoder_modules is not None:
            self._encoder_states_hook = base_model.get_decoder().register_forward_pre_hook(
                RecordEncoderStates(self.routing), with_kwargs=True)
        # every call of the base model (generate makes one per step) declares its rows per example
        self._call_dims_hook = base_model.register_forward_pre_hook(
            RecordCallDims(self.routing, encoder_modules is not None), with_kwargs=True)
        # A base model that itself routes by task (e.g. one classification head per task) declares a
        # task_ids parameter; it then receives the validated ids too.
        self._base_takes_task_ids = _accepts_argument(base_model.forward, "task_ids")
        self._expose_forward_signature()

    def _is_encoder_decoder(self) -> bool:
        return bool(getattr(getattr(self.base_model, "config", None), "is_encoder_decoder", False))

    def _encoder_modules(self) -> set[int] | None:
        """ids of the encoder's modules of an encoder-decoder model (T5, BART), None for other models.
        Adapted layers outside the encoder (the decoder's, the LM head) read the decoder's tokens."""
        if not self._is_encoder_decoder():
            return None
        get_encoder, get_decoder = (getattr(self.base_model, n, None) for n in ("get_encoder", "get_decoder"))
        if not (callable(get_encoder) and callable(get_decoder)):
            raise TypeError(f"{type(self.base_model).__name__} is an encoder-decoder model (config."
                            f"is_encoder_decoder) without get_encoder() / get_decoder(); mtpeft needs both to "
                            f"tell the encoder's tokens from the decoder's.")
        return {id(m) for m in get_encoder().modules()}

    def _resolve_modules_to_save(self, names) -> list[str]:
        if not names:
            return []
        found = []
        all_names = [n for n, _ in self.base_model.named_modules() if n]
        for want in names:
            hits = [n for n in all_names if n == want or n.endswith("." + want)]
            if not hits:
                raise ValueError(f"modules_to_save entry {want!r} matches no module of the model. "
                                 f"Top-level modules: {[n for n in all_names if '.' not in n]}")
            found.extend(h for h in hits if h not in found)
        return found

    def _expose_forward_signature(self) -> None:
        """Give ``forward`` the base model's signature plus ``task_ids``.

        The HF Trainer drops dataset columns that are not in ``model.forward``'s signature; with a
        bare ``**kwargs`` it would drop ``input_ids``.
        """
        try:
            base_sig = inspect.signature(self.base_model.forward)
        except (TypeError, ValueError):
            return
        params = [p for p in base_sig.parameters.values() if p.name != "task_ids"]
        task_param = inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
        var_kw = [p for p in params if p.kind == inspect.Parameter.VAR_KEYWORD]
        params = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD] + [task_param] + var_kw
        try:
            signature = base_sig.replace(parameters=params)
        except ValueError:
            return
        self.__dict__["forward"] = _SignedForward(self, signature)

    # ------------------------------------------------------------------ attribute forwarding
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ layers
    def adapted_layers(self) -> list[tuple[str, AdaptedLayer]]:
        return [(n, self.base_model.get_submodule(n)) for n in self.adapted_names]

    def _check_task_ids(self, task_ids, batch_size):
        cfg = self.config
        return validate_task_ids(
            task_ids, batch_size, cfg.n_tasks,
            required=cfg.task_routed and not self._merged_single_task(),
            method=type(cfg).__name__,
            allow_unknown=True,  # the range: routing_plan checks it on the ids it reads once to the host
        )

    def _merged_single_task(self) -> bool:
        """True when every layer is merged: then the merged task needs no ids."""
        layers = self.adapted_layers()
        return bool(layers) and all(layer.merged for _, layer in layers)

    # ------------------------------------------------------------------ forward / generate
    def check_usable(self, action: str) -> None:
        """Refuse ``action`` after ``unload()``: the adapters are gone and the base model stands alone."""
        if self.unloaded:
            raise RuntimeError(f"this MultiTaskModel was unloaded (its adapters removed); it cannot {action}. "
                               f"Use the base model unload() returned, or wrap it again with get_model.")

    def check_not_merged(self, action: str) -> None:
        """Refuse ``action`` (one that changes adapter weights, the task count or the method) while the
        adapter is merged: the merged base weights would no longer match the adapter, and unmerge would
        restore a base that the new adapter never saw."""
        merged = sorted({layer.merged_task for _, layer in self.adapted_layers() if layer.merged}, key=str)
        if merged:
            which = "" if merged == [None] else f" for task {merged[0]}"
            raise ValueError(f"the adapter is merged{which}; call model.unmerge() before {action} "
                             f"(and merge again afterwards if needed).")

    def _check_not_training_merged(self) -> None:
        """A training step while merged would train nothing (the merged layers run the base weights
        only); say so instead of torch's "element 0 of tensors does not require grad"."""
        layers = self.adapted_names
        if layers and self.base_model.get_submodule(layers[0]).merged and any(
                p.requires_grad for n, p in self.named_parameters() if self.parameter_role(n) not in (None, "saved")):
            raise RuntimeError("the adapter is merged, so a training forward (train mode, gradients on) would "
                               "not train it; call model.unmerge() before training, or model.eval() / "
                               "torch.no_grad() for inference.")

    def reset_adapter_parameters(self) -> None:
        """Initialise every adapter as at construction (ΔW = 0 for the LoRA family). Call it after
        materialising a model built on the meta device with ``to_empty(device=...)``: ``to_empty``
        allocates uninitialised memory, and forward / save / merge refuse such adapters until then."""
        self.check_usable("reset its adapters")
        self.check_not_merged("reset_adapter_parameters")
        with torch.no_grad():
            for _, layer in self.adapted_layers():
                layer.reset_parameters()

    def forward(self, *args, task_ids: torch.Tensor | None = None, **kwargs):
        """Call the wrapped model. ``task_ids``: LongTensor (batch,), one task per example."""
        if self.unloaded:
            self.check_usable("run forward")
        if self.base_model.training and torch.is_grad_enabled():  # the base's mode: get_model keeps it
            self._check_not_training_merged()
        if task_ids is None:  # nothing to read: the plan traces like the rest of the forward
            plan = self.routing_plan(*args, **kwargs)
        else:  # built outside any torch.compile graph: its host read splits no graph and specialises none
            plan = run_outside_graphs(MultiTaskModel.routing_plan, self, *args, task_ids=task_ids, **kwargs)
        return self.forward_with_plan(plan, *args, **kwargs)

    def routing_plan(self, *args, task_ids: torch.Tensor | None = None, **kwargs) -> RoutingPlan:
        """Validate ``task_ids`` against these inputs and build the call's routing plan (mtpeft.lib.core.plan):
        the task groups, the padding masks and the row layout, with the one host read of the ids a
        forward makes (none without task ids).

        ``model(**batch, task_ids=ids)`` is ``model.forward_with_plan(model.routing_plan(**batch,
        task_ids=ids), **batch)``. To compile a forward without any graph break, build the plan eagerly and
        compile the rest::

            step = torch.compile(model.forward_with_plan, fullgraph=True)
            out = step(model.routing_plan(**batch, task_ids=ids), **batch)

        A new batch composition changes only the plan's tensors and its number of task groups (at most
        n_tasks + 1 graphs)."""
        cfg = self.config
        batch = infer_batch_size(args, kwargs)
        ids = self._check_task_ids(task_ids, batch)
        groups = n_task_rows = None
        if ids is not None:
            unknown_task = spec_of(cfg).unknown_task(cfg)
            merged = self._merged_single_task()
            routes_by_task = cfg.task_routed and not merged
            merged_task = self.adapted_layers()[0][1].merged_task if cfg.task_routed and merged else None
            groups, n_task_rows = plan_task_ids(ids, cfg.n_tasks, check_range=unknown_task != "average",
                                                unknown_task=unknown_task if routes_by_task else None,
                                                merged_task=merged_task)
            batch = ids.shape[0] if batch is None else batch
        dims = {} if batch is None else {"dims": call_dims(args, kwargs, batch, self._is_encoder_decoder())}
        return RoutingPlan(task_ids=ids, batch=batch, input_mask=as_bool_mask(self._new_tokens_mask(kwargs)),
                           decoder_mask=as_bool_mask(self._decoder_tokens_mask(kwargs)), groups=groups,
                           n_task_rows=n_task_rows, **dims)

    def forward_with_plan(self, plan: RoutingPlan, *args, **kwargs):
        """Call the wrapped model with a plan from :meth:`routing_plan` built from the same inputs (no
        validation here, no host read: the part of a forward that compiles with fullgraph=True)."""
        batch = infer_batch_size(args, kwargs)
        if plan.batch is not None and batch is not None and batch != plan.batch:
            raise ValueError(f"the routing plan is for a batch of {plan.batch} examples, these inputs have {batch}: "
                             f"build the plan from the same inputs (model.routing_plan(**inputs, task_ids=...)).")
        if self._base_takes_task_ids:
            kwargs["task_ids"] = plan.task_ids
        with self.routing.scope(plan=plan, record=True) as record:
            output = self.base_model(*args, **kwargs)
        return self._attach_aux(output, record)

    def _decoder_tokens_mask(self, kwargs: dict) -> torch.Tensor | None:
        """An encoder-decoder's decoder padding mask (batch, target): ``decoder_attention_mask`` when
        given, else ``labels != -100`` when the model builds its decoder inputs from the labels (decoder
        position j predicts labels[:, j]: transformers' seq2seq LMs shift the labels right); None
        otherwise (every decoder token counts)."""
        if not self._is_encoder_decoder():
            return None
        mask = kwargs.get("decoder_attention_mask")
        if mask is not None:
            new = kwargs.get("decoder_input_ids")
            cached = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
            # with a cache the mask covers cached + new decoder tokens; this call runs the last columns
            return mask[:, -new.shape[1]:] if cached and new is not None and mask.dim() == 2 else mask
        labels = kwargs.get("labels")
        if (labels is not None and labels.dim() == 2 and kwargs.get("decoder_input_ids") is None
                and kwargs.get("decoder_inputs_embeds") is None):
            return labels != -100  # transformers' ignore index
        return None

    def _new_tokens_mask(self, kwargs: dict) -> torch.Tensor | None:
        """The padding mask of the tokens this call runs. A decoder-only model given a key/value cache
        takes a mask over cached + new tokens (batch, past + new); its new tokens are the last columns."""
        mask, new = kwargs.get("attention_mask"), kwargs.get("input_ids")
        cached = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
        if (mask is None or new is None or not cached or mask.dim() != 2
                or getattr(getattr(self.base_model, "config", None), "is_encoder_decoder", False)):
            return mask
        return mask[:, -new.shape[1]:]

    def _attach_aux(self, output, record: ScopeRecord):
        aux = record.summed_aux_losses()
        self.last_aux_losses = aux
        self.last_router_stats = record.router_stats
        if aux and isinstance(output, dict) and output.get("loss") is not None:
            output["loss"] = output["loss"] + record.weighted_aux_total(aux)
        if isinstance(output, dict):
            # Attribute only, not a dict key: the HF Trainer turns every output key but "loss" into
            # logits during evaluation.
            object.__setattr__(output, "aux_losses", aux)
            object.__setattr__(output, "router_stats", record.router_stats)
        return output

    def router_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per adapted module, the router statistics of the last forward (token-routed methods)."""
        return self.last_router_stats

    @torch.no_grad()
    def generate(self, *args, task_ids: torch.Tensor | None = None, **kwargs):
        """``base_model.generate`` with task ids; beams and multiple return sequences are handled."""
        self.check_usable("generate")
        # generate's own calls of the model expand each example in place (beams): the call-dims hook
        # declares each call's rows per example
        plan = self.routing_plan(*args, task_ids=task_ids, **kwargs)
        plan = dataclasses.replace(plan, input_mask=None, decoder_mask=None)  # nothing is recorded in generate
        with self.routing.scope(plan=plan, record=False):
            return self.base_model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ parameters
    def parameter_role(self, name: str) -> str | None:
        """"shared" / "expert" / "router" / "task" / "saved" for adapter parameters, else None."""
        for layer_name in self.adapted_names:
            prefix = f"base_model.{layer_name}."
            if name.startswith(prefix):
                local = name[len(prefix):]
                if local.startswith("base_layer."):
                    return None
                layer = self.base_model.get_submodule(layer_name)
                return layer.parameter_roles.get(local.split(".")[0], "shared")
        for saved in self.saved_module_names:
            if name.startswith(f"base_model.{saved}."):
                return "saved"
        return None

    def trainable_parameter_breakdown(self) -> dict[str, int]:
        counts: Counter = Counter()
        for name, param in self.named_parameters():
            role = self.parameter_role(name)
            if role is not None:
                counts[role] += param.numel()
        return dict(counts)

    def print_trainable_parameters(self) -> None:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        parts = ", ".join(f"{role}: {n:,}" for role, n in sorted(self.trainable_parameter_breakdown().items()))
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f} || {parts}")

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter (and modules_to_save) tensors, keyed by base-model module path."""
        state = {}
        for name, param in self.named_parameters():
            if self.parameter_role(name) is not None:
                state[name[len("base_model."):]] = param.detach()
        return state

    # ------------------------------------------------------------------ enable / disable, merge
    @contextmanager
    def disable_adapters(self):
        """Run the bare base model inside this block. Refused while merged: the merged base weights carry
        the adapter, so "disabled" would silently still apply it."""
        self.check_usable("disable its adapters")
        self.check_not_merged("disable_adapters")
        layers = [layer for _, layer in self.adapted_layers()]
        previous = [layer.adapters_enabled for layer in layers]
        for layer in layers:
            layer.adapters_enabled = False
        try:
            yield self
        finally:
            for layer, was in zip(layers, previous):
                layer.adapters_enabled = was

    def merge(self, task: int | None = None) -> None:
        """Fold the adapter (for ``task`` with task-routed methods) into the base weights, in place.

        Refused for a layer whose weight is tied to (shares memory with) another parameter, e.g. an
        ``lm_head`` tied to the input embeddings: merging in place would change the embeddings too.
        mtpeft does not merge out of place there: that would allocate an untied copy of the weight
        (for an LM head a whole vocab x hidden matrix) and silently break the tie. Keep such an adapter
        unmerged (it runs unmerged at the same result) or untie the weights in the base first.
        ``unmerge()`` restores the base weights bit for bit (see ``AdaptedLayer.merge``)."""
        self._check_task_argument(task)
        self.check_usable("merge")
        layers = [layer for _, layer in self.adapted_layers()]
        if not layers[0].mergeable:
            layers[0].lora_factors(task)  # raises the method's explanation
        by_storage = _parameters_by_storage(self.base_model)
        for name, layer in self.adapted_layers():
            own = f"{name}.base_layer.weight"
            shared = [n for n in by_storage.get(layer.weight.untyped_storage().data_ptr(), []) if n != own]
            if shared and not layer.merged:
                raise ValueError(
                    f"cannot merge into {name}: its weight is tied to {shared} (the same memory), so merging "
                    f"in place would change those too. Keep this adapter unmerged (forward gives the same "
                    f"result), or untie the weights of the base model before wrapping it.")
        done = []
        try:
            for layer in layers:
                layer.merge(task)
                done.append(layer)
        except Exception:
            for layer in done:
                layer.unmerge()
            raise

    def unmerge(self) -> None:
        """Restore the base weights exactly as before merge (bit for bit)."""
        for _, layer in self.adapted_layers():
            layer.unmerge()

    def add_tasks(self, n: int, train_only_routing: bool = False) -> None:
        """Grow a task-routed adapter by ``n`` tasks (see :func:`mtpeft.lib.tasks_api.add_tasks`)."""
        from .tasks_api import add_tasks

        add_tasks(self, n, train_only_routing=train_only_routing)

    def _check_task_argument(self, task) -> None:
        cfg = self.config
        if cfg.task_routed:
            if task is None:
                raise ValueError(f"{type(cfg).__name__} has one adapter per task: pass task=t "
                                 f"(0 <= t < {cfg.n_tasks}).")
            if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < cfg.n_tasks:
                raise ValueError(f"task={task!r} is not a task of this adapter: use an int in "
                                 f"[0, {cfg.n_tasks - 1}].")
        elif task is not None:
            raise ValueError(f"{type(cfg).__name__} does not route by task; call merge() / export_lora() "
                             f"without task.")

    # ------------------------------------------------------------------ files
    def save_pretrained(self, path) -> None:
        from .io import save_adapter

        save_adapter(self, path)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path, is_trainable: bool = False) -> "MultiTaskModel":
        """Wrap ``base_model`` with the adapter saved in ``path``; strict, never unpickles. On any error the
        base model is left as it was given."""
        from .io import copy_tensors_into, check_tensors_fit, read_adapter_config, read_adapter_tensors

        config = read_adapter_config(path)
        tensors = read_adapter_tensors(path)
        flags = {name: p.requires_grad for name, p in base_model.named_parameters()}
        model = cls(base_model, config)
        try:
            check_tensors_fit(model, tensors, path)
            copy_tensors_into(model, tensors)
        except BaseException:
            model.unload()  # leave the base model as it was given
            for name, param in base_model.named_parameters():
                param.requires_grad_(flags.get(name, param.requires_grad))
            raise
        if not is_trainable:
            for name, param in model.named_parameters():
                if model.parameter_role(name) is not None:
                    param.requires_grad_(False)
            model.eval()
        return model

    def export_lora(self, path, task: int | None = None, labels: list[str] | None = None):
        """Write a plain PEFT LoRA folder for ``task`` that stock PEFT loads on the stock base model
        (see mtpeft.lib.export). ``task``: the task of a task-routed method, or the task whose head an
        encoder classifier exports; ``labels``: that head's label names. Returns the folder."""
        from .export import export_peft_lora, has_task_heads

        self.check_usable("export")
        if self.config.task_routed or not has_task_heads(self):
            self._check_task_argument(task)
        return export_peft_lora(self, path, task, labels=labels)

    def distill_lora(self, path, batches, *, task: int | None = None, rank: int | None = None,
                     ridge: float | None = None, held_out=None, mode: str = "least_squares", metadata=None):
        """Fit a plain PEFT LoRA folder that reproduces the adapter on ``batches`` (token-routed methods;
        see :func:`mtpeft.lib.distill.distill_lora` and METHODS.md §10). Returns a ``Distillation``."""
        from .distill import DEFAULT_RIDGE, distill_lora

        return distill_lora(self, path, batches, task=task, rank=rank,
                            ridge=DEFAULT_RIDGE if ridge is None else ridge, held_out=held_out, mode=mode,
                            metadata=metadata)

    def unload(self) -> nn.Module:
        """Put the original layers back and return the bare base model (adapters dropped; a merged
        adapter is unmerged first, restoring the base weights exactly). The wrapper is then spent:
        everything but ``unload()`` (which returns the same base again) refuses."""
        for name, layer in self.adapted_layers():
            layer.unmerge()
            _set_submodule(self.base_model, name, layer.base_layer)
        self.adapted_names = []
        if self._encoder_states_hook is not None:
            self._encoder_states_hook.remove()
            self._encoder_states_hook = None
        if self._call_dims_hook is not None:
            self._call_dims_hook.remove()
            self._call_dims_hook = None
        self.unloaded = True
        return self.base_model

    def extra_repr(self) -> str:
        return f"method={self.config.method}, adapted_layers={len(self.adapted_names)}"
