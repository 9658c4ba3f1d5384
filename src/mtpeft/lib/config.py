"""Method configs: one dataclass per method, registered by name together with its layer class.

Every config serialises to the JSON written as ``adapter_config.json`` and back, strictly: an unknown
field is an error that names it and suggests the nearest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Mapping

ADAPTER_DTYPES = ("float32", "bfloat16", "base")


def check_positive_int(config_name: str, field_name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{config_name}.{field_name} must be a positive integer, got {value!r}.")


def check_probability(config_name: str, field_name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{config_name}.{field_name} must be in [0, 1), got {value!r}.")


def check_positive_number(config_name: str, field_name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{config_name}.{field_name} must be a positive number, got {value!r}.")


def check_non_negative(config_name: str, field_name: str, value: Any) -> None:
    """A weight or scale that may be 0 (off) but not negative; NaN and Inf are refused too."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{config_name}.{field_name} must be a number >= 0, got {value!r}.")


def check_float_fields(config) -> None:
    """Every field annotated ``float`` (of any method's config) holds a finite int or float: NaN or ±Inf
    in e.g. lora_alpha would make every output NaN without an error. Range checks stay with each field."""
    name = type(config).__name__
    for f in dataclasses.fields(config):
        if str(f.type).split("|")[0].strip() != "float":
            continue
        value = getattr(config, f.name)
        if value is None and "None" in str(f.type):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}.{f.name} must be a number, got {type(value).__name__} {value!r}.")
        if not math.isfinite(value):
            raise ValueError(f"{name}.{f.name} must be a finite number, got {value!r}.")


def check_module_names(config_name: str, field_name: str, value: Any, *, allow_regex: bool) -> None:
    """A list of module names (or, where allowed, one regex string / "all-linear"), or None."""
    if value is None or (allow_regex and isinstance(value, str)):
        return
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return
    kinds = "a list of module names" + (", a regex string or 'all-linear'" if allow_regex else "")
    raise TypeError(f"{config_name}.{field_name} must be {kinds}, or None; got {type(value).__name__} {value!r}.")


def check_choice(config_name: str, field_name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{config_name}.{field_name} must be one of {list(choices)}, got {value!r}.")


def unknown_key_error(kind: str, key: str, known) -> ValueError:
    near = difflib.get_close_matches(key, list(known), n=1)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    return ValueError(f"unknown {kind} field {key!r}.{hint} Known fields: {sorted(known)}.")


def field_help(text: str, default: Any = dataclasses.MISSING, **kwargs):
    """A dataclass field with help metadata (as PEFT's configs carry)."""
    if default is dataclasses.MISSING:
        return field(metadata={"help": text}, **kwargs)
    return field(default=default, metadata={"help": text}, **kwargs)


@dataclass
class AdapterConfig:
    """Fields shared by every method.

    Attributes:
        target_modules: which linear layers to adapt: a list of names (exact or suffix match, as in
            PEFT), a regex string (full match), ``"all-linear"``, or None for the method's default
            for known architectures.
        exclude_modules: names or a regex removed from the targets.
        modules_to_save: extra modules (e.g. classification heads) made trainable and saved with
            the adapter.
        n_tasks: number of tasks. Required by task-routed methods; optional for token-routed ones,
            where it only sizes the per-task router statistics and validates task ids.
        adapter_dtype: dtype of adapter parameters: "float32" (default, as PEFT), "bfloat16", or
            "base" (the adapted layer's dtype).
    """

    method: ClassVar[str] = ""
    task_routed: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        """After the whole ``__post_init__`` chain of a method config (so each field's own range check
        speaks first), check every float field is a finite number (:func:`check_float_fields`)."""
        super().__init_subclass__(**kwargs)
        body = cls.__dict__.get("__post_init__")
        if body is None:
            return

        def __post_init__(self, _body=body):
            _body(self)
            if type(self).__post_init__ is __post_init__:  # the outermost call only
                check_float_fields(self)

        cls.__post_init__ = __post_init__
    # Default target role when target_modules is None: "attention_qv", "attention_all" or "mlp".
    default_targets: ClassVar[str] = "attention_qv"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    n_tasks: int | None = None
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_module_names(name, "target_modules", self.target_modules, allow_regex=True)
        check_module_names(name, "exclude_modules", self.exclude_modules, allow_regex=True)
        check_module_names(name, "modules_to_save", self.modules_to_save, allow_regex=False)
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ValueError(f"{name}.target_modules is an empty list; name at least one module.")
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if self.n_tasks is not None:
            check_positive_int(name, "n_tasks", self.n_tasks)
        elif self.task_routed:
            raise ValueError(f"{name} routes by task: set n_tasks (the number of tasks).")
        check_choice(name, "adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        data = dict(data)
        method = data.pop("method", cls.method)
        data.pop("mtpeft_version", None)
        config_cls = get_config_class(method) if cls is AdapterConfig else cls
        known = {f.name for f in dataclasses.fields(config_cls)}
        for key in data:
            if key not in known:
                raise unknown_key_error(config_cls.__name__, key, known)
        return config_cls(**coerce_numbers(config_cls.__name__, config_cls, data))

    # ------------------------------------------------------------------ aux losses
    def aux_loss_weights(self) -> dict[str, float]:
        """Name -> weight of the aux losses this method adds (empty for most): each weight is read from
        the config field its :class:`MethodSpec` names in ``aux_losses`` (the one source of the weights;
        a method may leave out a loss that is off, as HydraLoRA's opt-in balance loss)."""
        return {name: getattr(self, f) for name, f in spec_of(self).aux_losses.items()}


@dataclass
class ScaledRankConfig(AdapterConfig):
    """Rank and scale, shared by every method whose update is s · B A x with s = lora_alpha / r
    (LoRA and its multi-task variants; MoSLD, whose dropout is a DropConnect of its own). Poly / MHR
    keep their own ``r``: their scale is 1/r, with no alpha.

    Attributes:
        r: rank of the update (per expert for the mixtures).
        lora_alpha: scale numerator: s = lora_alpha / r.
    """

    r: int = field_help("rank of the update", 8)
    lora_alpha: float = field_help("scale numerator: s = lora_alpha / r", 16)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(type(self).__name__, "r", self.r)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


@dataclass
class LowRankConfig(ScaledRankConfig):
    """:class:`ScaledRankConfig` plus ``lora_dropout``, the adapter's dropout probability (on x, unless
    the method's docstring says where else)."""

    lora_dropout: float = field_help("dropout on the adapter input x", 0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_probability(type(self).__name__, "lora_dropout", self.lora_dropout)


def coerce_numbers(owner: str, cls, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its number fields (annotated ``int`` / ``float``, optionally ``| None``) as numbers.

    YAML 1.1 reads ``1e-4`` (no dot) as the string "1e-4": a float field accepts such a string; any
    other value that is not a number is a clear error naming the key, not a TypeError deep inside."""
    kinds = {f.name: str(f.type).split("|")[0].strip() for f in dataclasses.fields(cls)}
    out = dict(data)
    for key, value in data.items():
        kind = kinds.get(key)
        if kind not in ("int", "float") or value is None or isinstance(value, bool):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or (kind == "int" and not number.is_integer()):
            raise ValueError(f"{owner}.{key} must be {'an integer' if kind == 'int' else 'a number'}, "
                             f"got {value!r}.")
        out[key] = int(number) if kind == "int" else (value if isinstance(value, (int, float)) else number)
    return out


# ---------------------------------------------------------------------- registry
ROUTING_KINDS = ("none", "task", "token")
EXPORT_KINDS = ("exact", "distilled")


@dataclass(frozen=True)
class MethodSpec:
    """Everything the rest of mtpeft (wrapper, export, reports, bench, the shared tests) knows about a
    method, declared once beside its config and layer (``register_method(MethodSpec(...))`` at the end
    of the method's file). Nothing outside ``mtpeft.lib.methods`` names a method; it reads these fields.

    Attributes:
        config_class, layer_class: the method's :class:`AdapterConfig` subclass (whose ``method`` names
            it) and its ``AdaptedLayer`` subclass.
        routing: "none" (one update for every input: LoRA), "task" (each example by its task id; the
            config has ``task_routed = True``) or "token" (a router on each token's hidden state).
            Derived when not given: "task" if the config is task-routed, else "none" if the layer is
            mergeable, else "token".
        export: "exact" (for a fixed task the update is a fixed low-rank matrix: merge and the PEFT
            export are exact; the layer is ``mergeable`` and implements ``lora_factors``) or "distilled"
            (the update depends on the token: shipped through the distilled export, METHODS.md §10; the
            layer implements ``expert_gates`` / ``expert_factors``). Derived from ``layer.mergeable``.
        can_add_tasks: ``MultiTaskModel.add_tasks`` applies (the layer implements ``add_tasks``).
            Derived from the layer.
        aux_losses: aux-loss name -> the config field holding its weight. The ONE source of the
            weights: ``config.aux_loss_weights()`` reads these fields, and a layer records a loss by
            name only (``TokenRoutedLayer._record_aux(name, value)`` looks the weight up there).
        task_table: ``(layer, tasks (G,) LongTensor) -> (G, ..., K)`` eval-mode weights of each task
            over the layer's K skills / up-projections (reports average the middle dims), or None.
        unknown_task_field: the config field holding the policy for task ids outside [0, n_tasks)
            ("error" or "average"), or None when the method has no such option (always "error").
        test_config: ``(**overrides) -> config``: a small config for the tiny test models (hidden
            size 32). Tests pass n_tasks and any field they vary.
        degenerate: ``(r, alpha, dropout, **overrides) -> config`` whose model equals plain LoRA of
            rank r, lora_alpha alpha and dropout p (e.g. one expert; per-task LoRA with n_tasks=1), or None.
        sized_config: ``(E, r, **overrides) -> config`` with E experts / skills / up-projections of rank
            r and its aux losses off (``mtpeft bench layer``'s grid), or None to leave the method out.
        test_cases: named config overrides (over ``test_config``) that cover the method's structural
            choices (number of experts, top-k, splits, ...): case name -> overrides. The shared tests run
            each (the names are their test IDs); empty means one case named after the method.
    """

    config_class: type
    layer_class: type
    routing: str | None = None
    export: str | None = None
    can_add_tasks: bool | None = None
    aux_losses: Mapping[str, str] = field(default_factory=dict)
    task_table: Callable | None = None
    unknown_task_field: str | None = None
    test_config: Callable[..., "AdapterConfig"] | None = None
    degenerate: Callable[..., "AdapterConfig"] | None = None
    sized_config: Callable[..., "AdapterConfig"] | None = None
    test_cases: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cfg, layer = self.config_class, self.layer_class
        if not cfg.method:
            raise ValueError(f"{cfg.__name__}.method must name the method")
        derived = {
            "routing": "task" if cfg.task_routed else ("none" if layer.mergeable else "token"),
            "export": "exact" if layer.mergeable else "distilled",
            "can_add_tasks": callable(getattr(layer, "add_tasks", None)),
        }
        for key, value in derived.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.routing not in ROUTING_KINDS:
            raise ValueError(f"{cfg.method}: routing must be one of {list(ROUTING_KINDS)}, got {self.routing!r}.")
        if self.export not in EXPORT_KINDS:
            raise ValueError(f"{cfg.method}: export must be one of {list(EXPORT_KINDS)}, got {self.export!r}.")
        if (self.routing == "task") != bool(cfg.task_routed):
            raise ValueError(f"{cfg.method}: routing={self.routing!r} but {cfg.__name__}.task_routed="
                             f"{cfg.task_routed}; set task_routed = True exactly for task-routed methods.")
        if (self.export == "exact") != bool(layer.mergeable):
            raise ValueError(f"{cfg.method}: export={self.export!r} but {layer.__name__}.mergeable="
                             f"{layer.mergeable}; an exact export needs a mergeable layer (lora_factors).")
        if self.can_add_tasks and not callable(getattr(layer, "add_tasks", None)):
            raise ValueError(f"{cfg.method}: can_add_tasks=True but {layer.__name__} has no add_tasks(n).")
        names = {f.name for f in dataclasses.fields(cfg)}
        for loss, weight_field in self.aux_losses.items():
            if weight_field not in names:
                raise ValueError(f"{cfg.method}: aux loss {loss!r} takes its weight from {weight_field!r}, "
                                 f"which is not a field of {cfg.__name__}.")
        if self.unknown_task_field is not None and self.unknown_task_field not in names:
            raise ValueError(f"{cfg.method}: unknown_task_field {self.unknown_task_field!r} is not a field of "
                             f"{cfg.__name__}.")
        object.__setattr__(self, "aux_losses", MappingProxyType(dict(self.aux_losses)))
        cases = {str(k): MappingProxyType(dict(v)) for k, v in self.test_cases.items()} or {cfg.method: {}}
        object.__setattr__(self, "test_cases", MappingProxyType(cases))

    @property
    def name(self) -> str:
        return self.config_class.method

    @property
    def mergeable(self) -> bool:
        return self.export == "exact"

    @property
    def parameter_roles(self) -> Mapping[str, str]:
        """Param name -> "shared" | "expert" | "router" | "task" (the layer's ``parameter_roles``)."""
        return self.layer_class.parameter_roles

    @property
    def from_package(self) -> bool:
        """Registered by mtpeft itself (not by a user's or a test's own module)."""
        return self.config_class.__module__.startswith("mtpeft.")

    def unknown_task(self, config: "AdapterConfig") -> str:
        """The policy for task ids outside [0, n_tasks): "error" or "average"."""
        return "error" if self.unknown_task_field is None else getattr(config, self.unknown_task_field)

    def small_config(self, **overrides) -> "AdapterConfig":
        """``test_config(**overrides)``, or the config class's defaults with the overrides."""
        return (self.test_config or self.config_class)(**overrides)


_METHODS: dict[str, MethodSpec] = {}


def register_method(config_cls: "type[AdapterConfig] | MethodSpec", layer_cls: type | None = None,
                    **capabilities) -> MethodSpec:
    """Register a method: a :class:`MethodSpec`, or (as before) its config class and layer class, with
    any capability as a keyword (the others are derived, see :class:`MethodSpec`). Returns the spec."""
    if isinstance(config_cls, MethodSpec):
        if layer_cls is not None or capabilities:
            raise TypeError("register_method(spec) takes the MethodSpec alone.")
        spec = config_cls
    else:
        if layer_cls is None:
            raise TypeError("register_method needs the layer class: register_method(config_cls, layer_cls).")
        spec = MethodSpec(config_cls, layer_cls, **capabilities)
    _METHODS[spec.name] = spec
    spec.layer_class.config_class = spec.config_class
    return spec


# The built-in methods register themselves when mtpeft.lib.methods is imported; `import mtpeft` no
    # longer does that eagerly (it stays light for `mtpeft --help`), so look-ups import it first.
    from .. import methods  # noqa: F401


# The built-in methods register themselves when mtpeft.lib.methods is imported, which importing the
# package mtpeft.lib does (before any of its modules, this one included, can be used): the look-ups below
# find them without this module importing the methods, which import it.
def known_methods() -> list[str]:
    return sorted(_METHODS)


def package_methods() -> list[str]:
    """The methods mtpeft itself registers (sorted): what the shared tests, bench and docs iterate,
    whatever else a test or a user registered in this process."""
    return sorted(name for name, spec in _METHODS.items() if spec.from_package)


def get_method_spec(method: str) -> MethodSpec:
    if method not in _METHODS:
        near = difflib.get_close_matches(str(method), list(_METHODS), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown method {method!r}.{hint} Known methods: {known_methods()}.")
    return _METHODS[method]


def spec_of(config: "AdapterConfig") -> MethodSpec:
    """The registered spec of a config instance's method."""
    return get_method_spec(config.method)


def get_config_class(method: str) -> type[AdapterConfig]:
    return get_method_spec(method).config_class


def get_layer_class(method: str) -> type:
    return get_method_spec(method).layer_class
