"""Read BIG-bench JSON tasks straight from the bigbench 1.0.0 sdist, without installing bigbench.

Installing bigbench pulls tensorflow, and the tarball is 358 MB of gzip (1.7 GB inside), so reading it
naively costs ~5 s per look-up. Instead:

* the first call makes ONE pass over the tarball that records every ``task.json`` member with its
  byte offset and size (a small JSON index written next to the tarball) and, in the same pass,
  extracts the task files asked for;
* each task file is then kept under ``<cache>/bigbench/tasks/<task>/task.json`` and later reads are
  plain ``json.load`` calls;
* task files asked for later are extracted together, in one forward pass over the gzip stream using
  the recorded offsets.

Task files carry a canary string asking that the data never enter a training corpus: they are read at
run time only and must never be committed.
"""

from __future__ import annotations

import difflib
import gzip
import json
import os
import tarfile
from pathlib import Path
from typing import Iterable

from mtpeft.app.assets import bigbench_tarball
from mtpeft.lib.io import atomic_write_bytes

__all__ = [
    "UnknownBigBenchTaskError",
    "bigbench_task_names",
    "prefetch_bigbench_tasks",
    "read_bigbench_task",
    "load_bigbench_examples",
]

MEMBER_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
INDEX_VERSION = 1
# A task.json this small next to subtask folders only describes its subtasks (no examples): say so
# without reading it out of the tarball (multiemo's sits 1.4 GB into the stream).
_PARENT_MAX_BYTES = 4096


class UnknownBigBenchTaskError(KeyError):
    """The BIG-bench task name is not in the tarball (the message lists the close names)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def _write_creating_folder(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


class _Tarball:
    """One BIG-bench tarball with its index and its folder of extracted task files."""

    def __init__(self, tarball: str | os.PathLike | None = None):
        self.path = Path(tarball) if tarball is not None else Path(bigbench_tarball())
        self.index_path = self.path.with_name(self.path.name + ".index.json")
        self.tasks_dir = self.path.parent / "tasks"
        self._index: dict | None = None

    # -- index -------------------------------------------------------------------------------
    def _stamp(self) -> dict:
        st = self.path.stat()
        return {"version": INDEX_VERSION, "tarball_size": st.st_size}

    def index(self) -> dict:
        """``{"tasks": {name: [offset, size]}, "programmatic": [names]}``, built by one scan if needed."""
        if self._index is None:
            if self.index_path.is_file():
                data = json.loads(self.index_path.read_text())
                if {k: data.get(k) for k in self._stamp()} == self._stamp():
                    self._index = data
            if self._index is None:
                self._scan(want=())
        return self._index

    def _scan(self, want: Iterable[str], want_parents: Iterable[str] = ()) -> None:
        """One pass over the whole tarball: record every task.json and extract those in ``want`` and
        the direct subtasks of those in ``want_parents``."""
        want = set(want)
        want_parents = set(want_parents)
        tasks: dict[str, list[int]] = {}
        programmatic: set[str] = set()
        with tarfile.open(self.path, mode="r|gz") as tf:  # stream mode: a single forward pass
            for member in tf:
                name = member.name
                if not name.startswith(MEMBER_PREFIX) or not member.isfile():
                    continue
                rel = name[len(MEMBER_PREFIX):]
                if rel.startswith("/") or ".." in rel.split("/"):
                    continue  # a crafted member name would extract outside the cache ("../../x/task.json")
                if rel.endswith("/task.json"):
                    task = rel[: -len("/task.json")]
                    tasks[task] = [member.offset_data, member.size]
                    if task in want or task.rpartition("/")[0] in want_parents:
                        self._store(task, tf.extractfile(member).read())
                elif rel.endswith("/task.py"):
                    programmatic.add(rel[: -len("/task.py")])
        if not tasks:
            raise RuntimeError(f"{self.path} holds no {MEMBER_PREFIX}*/task.json: is it the bigbench 1.0.0 sdist?")
        self._index = {**self._stamp(), "tasks": tasks, "programmatic": sorted(programmatic - set(tasks))}
        _write_creating_folder(self.index_path, json.dumps(self._index).encode())

    # -- extracted task files ------------------------------------------------------------------
    def task_file(self, task: str) -> Path:
        return self.tasks_dir / task / "task.json"

    def _store(self, task: str, raw: bytes) -> None:
        _write_creating_folder(self.task_file(task), raw)

    def has_index(self) -> bool:
        return self._index is not None or self.index_path.is_file()

    def extract(self, tasks: Iterable[str]) -> None:
        """Make sure every named task file is extracted, reading the tarball at most once."""
        missing = sorted({t for t in tasks if not self.task_file(t).is_file()})
        if not missing:
            return
        if not self.has_index():
            self._scan(want=missing)  # builds the index and extracts in the same pass
            return
        entries = self.index()["tasks"]
        todo = sorted(missing, key=lambda t: entries[t][0])
        with gzip.open(self.path, "rb") as gz:  # seek() forward only decompresses what lies between
            for task in todo:
                offset, size = entries[task]
                gz.seek(offset)
                raw = gz.read(size)
                if len(raw) != size:
                    raise RuntimeError(f"{self.path} is truncated: could not read {task}/task.json; delete it to re-download")
                self._store(task, raw)


_TARBALLS: dict[str, _Tarball] = {}


def _tarball(tarball: str | os.PathLike | None) -> _Tarball:
    path = str(tarball) if tarball is not None else bigbench_tarball()
    if path not in _TARBALLS:
        _TARBALLS[path] = _Tarball(path)
    return _TARBALLS[path]


def bigbench_task_names(tarball: str | os.PathLike | None = None) -> list[str]:
    """All JSON task names in the tarball, e.g. ``"intent_recognition"``, ``"multiemo/all_text_en"``."""
    return sorted(_tarball(tarball).index()["tasks"])


def _subtasks(tasks: dict, name: str) -> list[str]:
    depth = name.count("/") + 1
    return sorted(t for t in tasks if t.startswith(name + "/") and t.count("/") == depth)


def _clean(name: str) -> str:
    return name.strip().strip("/")


def _prepare(tb: _Tarball, names: Iterable[str]) -> list[list[str]]:
    """Resolve names to task files and extract them all, with a single pass over the tarball even
    when its index does not exist yet (then the pass that builds the index also extracts them)."""
    names = [_clean(n) for n in names]
    if not tb.has_index():
        tb._scan(want=[n for n in names if not n.endswith("/*")], want_parents=[n[:-2] for n in names if n.endswith("/*")])
    resolved = [_resolve(tb, n) for n in names]
    tb.extract([t for r in resolved for t in r])
    return resolved


def _resolve(tb: _Tarball, name: str) -> list[str]:
    """Task names to read for ``name``; ``"parent/*"`` means every direct subtask of ``parent``."""
    index = tb.index()
    tasks = index["tasks"]
    name = _clean(name)
    if name.endswith("/*"):
        parent = name[:-2]
        subs = _subtasks(tasks, parent)
        if not subs:
            raise UnknownBigBenchTaskError(f"BIG-bench task {parent!r} has no subtasks, so {name!r} matches nothing."
                                           + _suggest(name=parent, names=list(tasks)))
        return subs
    subs = _subtasks(tasks, name)
    if name in tasks and subs and tasks[name][1] < _PARENT_MAX_BYTES:
        raise UnknownBigBenchTaskError(_parent_message(name, subs))
    if name not in tasks:
        if name in index["programmatic"]:
            raise UnknownBigBenchTaskError(
                f"BIG-bench task {name!r} is a programmatic task (task.py, no task.json); only JSON tasks can be read.")
        raise UnknownBigBenchTaskError(f"Unknown BIG-bench task {name!r}." + _suggest(name, list(tasks)))
    return [name]


def _parent_message(name: str, subs: list[str]) -> str:
    shown = ", ".join(subs[:8]) + (f", ... ({len(subs) - 8} more; see bigbench_task_names())" if len(subs) > 8 else "")
    return (f"BIG-bench task {name!r} has no examples of its own but {len(subs)} subtasks: {shown}. "
            f"Name one, e.g. {subs[0]!r}, or use {name + '/*'!r} to join them all.")


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    # A bare subtask name ("all_text_en") or a prefix ("multiemo") also deserves a hint.
    close += [n for n in names if (n.endswith("/" + name) or n.startswith(name + "/")) and n not in close][:5]
    if close:
        return " Close names: " + ", ".join(close) + "."
    return f" {len(names)} JSON tasks exist; see mtpeft.app.data.bigbench_task_names()."


def prefetch_bigbench_tasks(names: Iterable[str], tarball: str | os.PathLike | None = None) -> None:
    """Extract the task files of several tasks (``"x"``, ``"x/y"``, ``"x/*"``) in one pass over the tarball."""
    _prepare(_tarball(tarball), list(names))


def read_bigbench_task(name: str, tarball: str | os.PathLike | None = None) -> dict:
    """The parsed ``task.json`` of one task (with its ``examples``, ``task_prefix``, metadata)."""
    if _clean(name).endswith("/*"):
        raise ValueError(f"read_bigbench_task reads one task file, not {name!r}; use load_bigbench_examples to join subtasks.")
    tb = _tarball(tarball)
    ((task,),) = _prepare(tb, [name])
    return json.loads(tb.task_file(task).read_text(encoding="utf-8"))


def load_bigbench_examples(name: str, tarball: str | os.PathLike | None = None) -> list[dict]:
    """Examples of a BIG-bench JSON task, ``"parent/subtask"`` or ``"parent/*"`` (all subtasks joined).

    Each example is a dict with ``input`` and ``target_scores`` (choice -> score; multiple choice) and/or
    ``target`` (a string or a list of acceptable strings; free text), plus ``task_prefix`` when the task
    has one and ``subtask`` (the task file it came from). A parent task without examples of its own
    (``multiemo``) is an error that lists its subtasks.
    """
    tb = _tarball(tarball)
    (names,) = _prepare(tb, [name])  # one pass for all of them
    examples: list[dict] = []
    for task in names:
        data = json.loads(tb.task_file(task).read_text(encoding="utf-8"))
        raw = data.get("examples") or []
        if not raw:
            subs = _subtasks(tb.index()["tasks"], task)
            if subs:
                raise UnknownBigBenchTaskError(_parent_message(task, subs))
            raise ValueError(f"BIG-bench task {task!r} has no examples.")
        prefix = data.get("task_prefix")
        for ex in raw:
            out = {"input": ex["input"], "subtask": task}
            if "target_scores" in ex:
                out["target_scores"] = ex["target_scores"]
            if "target" in ex:
                out["target"] = ex["target"]
            if prefix:
                out["task_prefix"] = prefix
            examples.append(out)
    return examples
