"""Method configs: one dataclass per method, registered by name together with its layer class.

Every config serialises to the JSON written as ``adapter_config.json`` and back, strictly: an unknown
field is an error that names it and suggests the nearest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
        """Name -> weight of the aux losses this method adds (empty for most)."""
        return {}


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
_METHODS: dict[str, tuple[type[AdapterConfig], type]] = {}


def register_method(config_cls: type[AdapterConfig], layer_cls: type) -> None:
    """Register a method: its config class (whose ``method`` names it) and its layer class."""
    if not config_cls.method:
        raise ValueError(f"{config_cls.__name__}.method must name the method")
    _METHODS[config_cls.method] = (config_cls, layer_cls)
    layer_cls.config_class = config_cls


def _register_builtin_methods() -> None:
    # The built-in methods register themselves when mtpeft.methods is imported; `import mtpeft` no
    # longer does that eagerly (it stays light for `mtpeft --help`), so look-ups import it first.
    from . import methods  # noqa: F401


def known_methods() -> list[str]:
    _register_builtin_methods()
    return sorted(_METHODS)


def _lookup(method: str) -> tuple[type[AdapterConfig], type]:
    if method not in _METHODS:
        _register_builtin_methods()
    if method not in _METHODS:
        near = difflib.get_close_matches(str(method), list(_METHODS), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown method {method!r}.{hint} Known methods: {known_methods()}.")
    return _METHODS[method]


def get_config_class(method: str) -> type[AdapterConfig]:
    return _lookup(method)[0]


def get_layer_class(method: str) -> type:
    return _lookup(method)[1]


def field_help(text: str, default: Any = dataclasses.MISSING, **kwargs):
    """A dataclass field with help metadata (as PEFT's configs carry)."""
    if default is dataclasses.MISSING:
        return field(metadata={"help": text}, **kwargs)
    return field(default=default, metadata={"help": text}, **kwargs)
