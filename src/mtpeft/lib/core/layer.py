"""The adapted-layer contract every method plugs into.

An :class:`AdaptedLayer` wraps one frozen linear layer (``torch.nn.Linear`` or transformers' GPT-2
``Conv1D``) and adds a method's update to its output::

    y = base_layer(x) + delta(x)          delta computed by the method in the adapter dtype

A method subclass implements:
    ``create_parameters(factory)``  build its (stacked) parameters with ``torch.empty(..., **factory)``;
                                   it must not read the base weight (meta-device construction works).
    ``reset_parameters()``         initialise them (called after construction off the meta device).
    ``delta_factors(x, route)``    when the update is a product over x's flattened rows: (left (N, K),
                                   right (K, out_features)); the base adds left @ right into the base
                                   output with one addmm_ (no (N, d_out) temporary). Otherwise:
    ``adapter_forward(x, route)``  the update for input rows x (adapter dtype), shape (..., out_features).
    ``parameter_roles``            param name -> "shared" | "expert" | "router" | "task".
Mergeable (task-routed) methods also implement ``lora_factors(task)`` -> (A (r, d_in), B (d_out, r))
with the scale folded into B; merge, unmerge and PEFT export are then generic.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from torch import nn

from .context import Route, RoutingState

try:  # transformers' GPT-2 style Conv1D: y = x @ W + b with W of shape (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()

SUPPORTED_BASE_LAYERS = (nn.Linear,) + ((Conv1D,) if Conv1D else ())


class _NotMerged:
    """The "not merged" marker. A singleton that survives copy.deepcopy and pickle: with a bare
    ``object()`` a deep-copied layer held a new object and reported itself merged."""

    def __repr__(self) -> str:
        return "<not merged>"

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return "_NOT_MERGED"


_NOT_MERGED = _NotMerged()


def base_layer_shape(layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a supported base layer."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, False
    if Conv1D and isinstance(layer, Conv1D):
        d_in, d_out = layer.weight.shape
        return d_in, d_out, True
    raise TypeError(
        f"cannot adapt a {type(layer).__name__}: mtpeft adapts torch.nn.Linear and transformers' Conv1D."
    )


def resolve_dtype(adapter_dtype: str, base_weight: torch.Tensor) -> torch.dtype:
    if adapter_dtype == "base":
        return base_weight.dtype
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[adapter_dtype]


class AdaptedLayer(nn.Module):
    config_class: ClassVar[type] = None  # set by register_method
    mergeable: ClassVar[bool] = False
    parameter_roles: ClassVar[dict[str, str]] = {}
    # Whose padding mask this layer's tokens follow (mtpeft.lib.core.context): "input", or "decoder" for
    # an encoder-decoder's decoder layers (set by the wrapper).
    token_stream: str = "input"

    def __init_subclass__(cls, **kwargs):
        """Mark a layer initialised whenever its ``reset_parameters`` runs, whoever calls it (the
        constructor, ``MultiTaskModel.reset_adapter_parameters``, or FSDP2's meta-init recipe in
        ``mtpeft.lib.distributed``). A layer built on the meta device and then materialised with
        ``to_empty`` holds uninitialised memory until then; forward and save refuse it."""
        super().__init_subclass__(**kwargs)
        reset = cls.__dict__.get("reset_parameters")
        if reset is not None and not getattr(reset, "_marks_initialised", False):
            @functools.wraps(reset)
            def reset_parameters(self, *args, _reset=reset, **kw):
                out = _reset(self, *args, **kw)
                self.adapters_initialised = True
                return out

            reset_parameters._marks_initialised = True
            cls.reset_parameters = reset_parameters

    def __init__(self, base_layer: nn.Module, config, *, module_name: str, routing: RoutingState,
                 layer_index: int = 0, n_layers: int = 1):
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = base_layer_shape(base_layer)
        self.base_layer = base_layer
        self.config = config
        self.module_name = module_name
        # Position of this layer in the model's layer stack (for per-layer schedules such as MoSLD's).
        self.layer_index, self.n_layers = layer_index, n_layers
        object.__setattr__(self, "routing", routing)  # shared plain object, not a submodule
        self.adapters_enabled = True
        self.merged_task = _NOT_MERGED
        self.adapters_initialised = False  # set by reset_parameters (or by loading saved weights)
        weight = base_layer.weight
        self.adapter_dtype = resolve_dtype(config.adapter_dtype, weight)
        self.create_parameters(dict(device=weight.device, dtype=self.adapter_dtype))
        if weight.device.type != "meta":
            self.reset_parameters()
        # A new module starts in training mode; follow the wrapped layer instead, so wrapping an eval
        # model does not switch on adapter dropout (and training-only work) in its next forward.
        self.train(base_layer.training)

    # ------------------------------------------------------------------ method hooks
    def create_parameters(self, factory: dict) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement create_parameters")

    def reset_parameters(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement reset_parameters")

    def delta_factors(self, x: torch.Tensor, route: Route) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The update as left (N, K) @ right (K, out_features) over x's rows flattened to 2-D, both in the
        adapter dtype; None for a method whose update has no such form (it implements adapter_forward).
        Called once per forward: a method records its aux losses and router statistics here."""
        return None

    def adapter_forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        """The update for x (..., in_features) -> (..., out_features); by default from delta_factors."""
        factors = self.delta_factors(x, route)
        if factors is None:
            raise NotImplementedError(f"{type(self).__name__} must implement delta_factors or adapter_forward")
        left, right = factors
        return (left @ right).view(*x.shape[:-1], right.shape[-1])  # (N, d_out) -> (..., d_out)

    def lora_factors(self, task: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError(
            f"{self.config.method} cannot be merged or exported as a plain LoRA: its update depends on "
            f"each token's hidden state through the router, so no fixed weight matrix represents it."
        )

    # ------------------------------------------------------------------ forward
    @property
    def weight(self) -> torch.Tensor:
        """The base weight: model code reads ``layer.weight`` (dtype checks, tied weights)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        return self.merged_task is not _NOT_MERGED

    def check_initialised(self, action: str) -> None:
        """Refuse ``action`` on adapters that hold uninitialised memory (built on the meta device and
        materialised with ``to_empty`` without ``reset_parameters``): ΔW = 0 at init would not hold."""
        if not self.adapters_initialised and self.weight.device.type != "meta":
            raise RuntimeError(
                f"the adapters of {self.module_name} were never initialised (the model was built on the "
                f"meta device and materialised with to_empty()); call model.reset_adapter_parameters() "
                f"or load saved adapter weights before {action}.")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.adapters_enabled:
            return self.base_layer(x, *args, **kwargs)
        if not self.adapters_initialised:
            self.check_initialised("running the model")
        if self.merged:  # (the wrapper's routing plan refused ids of another task than the merged one)
            return self.base_layer(x, *args, **kwargs)
        route = self.routing.route_for(x, self.token_stream, self.module_name)
        # An nn.Linear runs on the flattened rows, so its output is a fresh 2-D tensor rather than a
        # view: the update can then be added in place (the base layer does not save its output for
        # backward), saving an activation-sized allocation. In place on a *view* would instead make
        # autograd clone the gradient and copy it back (CopySlices): several copies per layer.
        flat = x.dim() > 2 and not args and not kwargs and type(self.base_layer) is nn.Linear
        result = self.base_layer(x.reshape(-1, x.shape[-1]) if flat else x, *args, **kwargs)
        result = self.add_delta(result, x.to(self.adapter_dtype), route)
        return result.view(*x.shape[:-1], result.shape[-1]) if flat else result

    def add_delta(self, result: torch.Tensor, x: torch.Tensor, route: Route) -> torch.Tensor:
        """result + the update of x, with result the base output (same rows as x, possibly flattened to
        2-D). A factored update accumulates into a fresh 2-D result of the adapter dtype with one addmm_;
        otherwise adapter_forward's output is added, in place when result is not a view."""
        if self._factored_in_place(result):
            factors = self.delta_factors(x, route)
            if factors is not None:
                return result.addmm_(*factors)  # (N, d_out) += (N, K) (K, d_out)
        delta = self.adapter_forward(x, route).to(result.dtype).reshape(result.shape)
        return result.add_(delta) if result._base is None else result + delta

    def _factored_in_place(self, result: torch.Tensor) -> bool:
        """Whether add_delta may use delta_factors: the method does not define its own adapter_forward
        (a subclass that does, or a benchmark that swaps it on the instance, is called instead), and
        result is a fresh 2-D tensor (not a view: in place on a view costs autograd copies) of the
        adapter dtype."""
        return (type(self).adapter_forward is AdaptedLayer.adapter_forward and "adapter_forward" not in self.__dict__
                and result.dim() == 2 and result._base is None and result.dtype == self.adapter_dtype)

    # ------------------------------------------------------------------ merge / unmerge
    def delta_weight(self, task: int | None) -> torch.Tensor:
        """ΔW in the base weight's layout ((d_out, d_in) for Linear, (d_in, d_out) for Conv1D), fp32."""
        a, b = self.lora_factors(task)
        delta = b.float() @ a.float()  # (d_out, r) @ (r, d_in) -> (d_out, d_in)
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, task: int | None) -> None:
        """W <- W + ΔW_task in place, keeping a copy of the original W so that unmerge restores it bit
        for bit. Why a copy: W + ΔW - ΔW rounds (in bf16 most entries move by an ulp; in fp32 some do),
        so subtracting again would drift the base a little with every merge / unmerge cycle. Cost: one
        extra copy of each merged weight (in its dtype, on its device) while merged."""
        if self.merged:
            if self.merged_task == task:
                return  # merging the same task twice is a no-op
            raise ValueError(
                f"the adapter is already merged for task {self.merged_task}; call unmerge() before "
                f"merging task {task}."
            )
        self.check_initialised("merging")
        weight = self.base_layer.weight
        delta = self.delta_weight(task).to(weight.dtype)
        self.__dict__["_unmerged_weight"] = weight.detach().clone()  # plain attribute: not in state_dict
        weight.add_(delta)
        self.merged_task = task

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        original = self.__dict__.pop("_unmerged_weight", None)
        if original is not None:
            weight.copy_(original)
        else:  # merged by an older copy of this object without the saved weight
            weight.sub_(self.delta_weight(self.merged_task).to(weight.dtype))
        self.merged_task = _NOT_MERGED

    def extra_repr(self) -> str:
        return f"method={self.config.method}, in={self.in_features}, out={self.out_features}"
