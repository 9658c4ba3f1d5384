"""mtpeft: multi-task parameter-efficient fine-tuning on any Hugging Face model.

    model = mtpeft.get_model(base, mtpeft.TeamLoraConfig(...))
    out = model(input_ids=..., labels=..., task_ids=torch.tensor([0, 2, 1, 0]))

The public names are imported on first use (PEP 562 ``__getattr__``): ``import mtpeft`` itself loads
nothing heavy, so that ``mtpeft --help`` (whose entry point lives in this package) answers at once
instead of after torch and transformers have loaded. ``mtpeft.get_model`` imports torch as usual.
"""

from __future__ import annotations

import importlib

from ._version import __version__

# public name -> the submodule that defines it
_EXPORTS = {
    "AdapterConfig": "lib.config", "register_method": "lib.config", "known_methods": "lib.config",
    "AdapterFileError": "lib.io",
    "MultiTaskModel": "lib.model", "get_model": "lib.model",
    "parameter_groups": "lib.optim",
    "task_expert_load": "lib.core.routing",
    **{name: "lib.methods" for name in (
        "LoraConfig", "TaskLoraConfig",  # baselines
        "CPolyConfig", "MTLLoraConfig", "PolyConfig",  # task-routed methods
        "HydraLoraConfig", "MoELoraConfig", "MoSLDConfig", "TeamLoraConfig",  # token-routed methods
    )},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    # `import mtpeft; mtpeft.lib` (or `.app`) works without importing the subpackage first
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise  # the submodule exists but one of its own imports is missing: say that
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
