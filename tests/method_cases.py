"""The methods the shared suites run, read from the registry: the package's own methods (sorted), then
the methods the tests define (tests/new_method.py), in that fixed order whatever pytest collected first
(a test file that registers a probe of its own, e.g. test_aux_channel.py, is not listed).

Adding a method to the package, or a module here to TEST_DEFINED, is all it takes for every shared
suite to run it: the parametrised IDs are the method names.
"""

from __future__ import annotations

import new_method
from mtpeft.lib.config import MethodSpec, get_method_spec, package_methods

TEST_DEFINED = (new_method.SPEC.name,)


def methods(routing: str | None = None, export: str | None = None, *, package_only: bool = False) -> list[str]:
    """Method names, filtered by the spec's routing ("none" | "task" | "token") and export kind."""
    names = package_methods() + ([] if package_only else [n for n in TEST_DEFINED if n not in package_methods()])
    return [n for n in names if (routing is None or spec(n).routing == routing)
            and (export is None or spec(n).export == export)]


def spec(name: str) -> MethodSpec:
    return get_method_spec(name)


def config(name: str, **overrides):
    """The method's small test config (MethodSpec.test_config) with ``overrides``."""
    return spec(name).small_config(**overrides)


def aux_on(name: str, weight: float = 0.5, base=None) -> dict:
    """Overrides that switch on every aux loss the method declares but leaves off in its test config
    (e.g. HydraLoRA's opt-in balance loss): ``{weight field: weight}``."""
    cfg = base if base is not None else config(name, n_tasks=3)
    return {field: weight for field in spec(name).aux_losses.values() if getattr(cfg, field) == 0}
