"""mtpeft's library: the adapted layers and their routing (``core``), the methods (``methods``, one file
each), configs and the method registry (``config``), the wrapped model (``model``), adapter files
(``io``), per-task heads of an encoder classifier (``heads``), plain-LoRA exports (``export``, exact) and
distillation (``distill``), task addition (``tasks_api``), optimiser groups (``optim``) and DDP / FSDP2
(``distributed``). It imports nothing of the application (``mtpeft.app``: data, training, evaluation,
reports, the CLI), which builds on it (tests/test_layout.py checks both, and that no two modules import
each other).

Importing this package registers the built-in methods, so that every look-up by name
(:func:`mtpeft.lib.config.get_method_spec`, ``AdapterConfig.from_dict``) finds them without the registry
importing the methods, which import it.
"""

from . import methods  # noqa: F401  (each method file registers its MethodSpec)
