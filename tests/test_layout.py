"""The package's shape (issue 17 §3): mtpeft.lib is the library and mtpeft.app the application built on it.
Every import counts, at module level or inside a function (a lazy import is still a dependency): the
library never imports the application, no two modules depend on each other through any chain of imports,
and the HF Trainer's private methods that mtpeft's Trainer overrides still exist in the installed
transformers (an override of a renamed method would silently stop running)."""

import ast
import importlib.util
from pathlib import Path

import pytest

SRC = Path(importlib.util.find_spec("mtpeft").origin).parent


def module_name(path: Path) -> str:
    parts = ["mtpeft", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imports_of(source: str, name: str, is_package: bool) -> set[str]:
    """The mtpeft modules that module ``name`` (with this source) imports anywhere in its file, lazy
    imports included (``from X import y`` counts as X.y when that is a module, else as X)."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & set(MODULES)
            found |= subs if subs else {target}
    return {m for m in found if m in MODULES and m != name}


def cycles_in(graph: dict[str, set[str]]) -> list[list[str]]:
    """Depth-first search: a module reached again while it is still on the path closes a cycle."""
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


GRAPH = {name: imports_of(path.read_text(), name, path.name == "__init__.py") for name, path in MODULES.items()}


def test_the_layout_has_a_library_and_an_application():
    assert "mtpeft.lib.model" in MODULES and "mtpeft.app.cli" in MODULES
    top = {n.split(".")[1] for n in MODULES if n.count(".") >= 1}
    assert top <= {"lib", "app", "_version", "__main__"}, top  # nothing else beside the two subpackages


def test_the_library_never_imports_the_application():
    wrong = {n: sorted(d for d in deps if d.startswith("mtpeft.app")) for n, deps in GRAPH.items()
             if n.startswith("mtpeft.lib")}
    assert {n: d for n, d in wrong.items() if d} == {}


def test_no_import_cycle():
    assert cycles_in(GRAPH) == []


def test_the_checks_see_lazy_and_relative_imports():
    """The checks above can fail: a function-level relative import back from io to model is an edge, and
    with it the graph has the io <-> model cycle this layout removed."""
    lazy = imports_of("def f():\n    from .model import MultiTaskModel\n", "mtpeft.lib.io", False)
    assert lazy == {"mtpeft.lib.model"}
    assert imports_of("from ..app import cli\n", "mtpeft.lib.io", False) == {"mtpeft.app.cli"}
    assert "mtpeft.lib.io" in GRAPH["mtpeft.lib.model"]
    assert cycles_in({**GRAPH, "mtpeft.lib.io": GRAPH["mtpeft.lib.io"] | lazy}) != []


# The private HF Trainer methods mtpeft.app.trainer overrides (each says why in a comment there).
PRIVATE_OVERRIDES = {"_get_train_sampler", "_save", "_save_checkpoint", "_load_from_checkpoint", "_load_best_model"}


def test_the_trainer_overrides_only_private_methods_that_exist():
    transformers = pytest.importorskip("transformers")
    from mtpeft.app.trainer import MultiTaskTrainer

    overridden = {name for name in vars(MultiTaskTrainer) if name.startswith("_") and not name.startswith("__")
                  and hasattr(transformers.Trainer, name)}
    assert overridden == PRIVATE_OVERRIDES
    lines = MODULES["mtpeft.app.trainer"].read_text().splitlines()
    for name in sorted(PRIVATE_OVERRIDES):
        assert callable(getattr(transformers.Trainer, name)), name
        at = next(i for i, line in enumerate(lines) if line.startswith(f"    def {name}("))
        comment = []
        while lines[at - 1 - len(comment)].strip().startswith("#"):
            comment.append(lines[at - 1 - len(comment)])
        text = " ".join(comment)
        assert "Private override" in text and "checked against transformers" in text, (name, text)
