"""The task registry: what a task is (:class:`TaskSpec`), the built-in tasks, and loading a task into
deterministic train / validation / test splits of normalised examples.

Every source (BIG-bench JSON tasks, the BBC News files, local json/csv/parquet files, ``datasets``
names) ends up in one of three normalised shapes, so the collators and the trainer never see the
source's own format:

* classification:   ``{"text": str, "label": int}``  (label indexes ``TaskData.labels``)
* multiple_choice:  ``{"text": str, "choices": list[str], "label": int}``
* generation:       ``{"text": str, "target": str, "references": list[str]}``

Splits come from the seed alone (same seed, same split), so experiments are reproducible and two
methods compared on one seed see exactly the same examples.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mtpeft.app.assets import bbc_news_dir, cache_dir as _cache_root

__all__ = [
    "KINDS",
    "METRICS",
    "TaskSpec",
    "TaskData",
    "TaskSpecError",
    "TaskDataError",
    "UnknownTaskError",
    "register_task",
    "get_task",
    "list_tasks",
    "task_from_dict",
    "load_task",
    "load_tasks",
    "check_unique_names",
]

KINDS = ("classification", "multiple_choice", "generation")
METRICS = ("accuracy", "macro_f1", "exact_match")
_METRICS_FOR_KIND = {
    "classification": ("accuracy", "macro_f1"),
    "multiple_choice": ("accuracy",),
    "generation": ("exact_match",),
}
_FILE_SCHEMES = ("json", "csv", "parquet")


class UnknownTaskError(KeyError):
    """No task is registered under that name; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class TaskSpecError(ValueError):
    """A task definition (a TaskSpec or a config dict) is malformed; the message names the field."""


class TaskDataError(ValueError):
    """A task's data cannot be turned into examples (empty, bad label, missing column, ...)."""


def _nearest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.4)
    return f" Did you mean {close[0]!r}?" if close else ""


@dataclass
class TaskSpec:
    """What a task is and where its data comes from.

    ``source`` is one of ``"bigbench:<task>"`` (``"bigbench:multiemo/all_text_en"``; ``"bigbench:arithmetic/*"``
    joins all subtasks), ``"bbc_news"``, ``"json:<file>"`` / ``"csv:<file>"`` / ``"parquet:<file>"``
    (several files separated by commas) or ``"hf:<dataset name or folder>[:<config>]"`` (a folder written
    by ``save_to_disk`` works too).
    ``template`` is a ``str.format`` pattern over the example's fields (``{input}`` and ``{text}`` both
    name the main text). ``labels`` are the class names (classification); left as None they are filled
    in when loading (sorted label strings). ``max_examples`` subsamples the whole task (from the seed)
    before splitting. ``instruction`` is what a chat model is told (BIG-bench tasks default to their
    ``task_prefix``). ``split`` picks one split of a ``datasets`` source (default: all, pooled).
    """

    name: str
    source: str
    kind: str = "classification"
    metric: str = "accuracy"
    text_field: str = "text"
    label_field: str = "label"
    choices_field: str = "choices"
    target_field: str = "target"
    labels: list[str] | None = None
    template: str = "{input}"
    max_examples: int | None = None
    instruction: str | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TaskSpecError(f"TaskSpec.name must be a non-empty string, got {self.name!r}.")
        if not isinstance(self.source, str) or not self.source:
            raise TaskSpecError(f"Task {self.name!r}: source must be a non-empty string, got {self.source!r}.")
        if self.kind not in KINDS:
            raise TaskSpecError(f"Task {self.name!r}: kind {self.kind!r} is not one of {KINDS}.{_nearest(self.kind, KINDS)}")
        if self.metric not in METRICS:
            raise TaskSpecError(f"Task {self.name!r}: metric {self.metric!r} is not one of {METRICS}.{_nearest(self.metric, METRICS)}")
        if self.metric not in _METRICS_FOR_KIND[self.kind]:
            raise TaskSpecError(f"Task {self.name!r}: metric {self.metric!r} does not fit kind {self.kind!r}; "
                                f"use one of {_METRICS_FOR_KIND[self.kind]}.")
        if self.max_examples is not None and (isinstance(self.max_examples, bool) or not isinstance(self.max_examples, int)
                                              or self.max_examples < 1):
            raise TaskSpecError(f"Task {self.name!r}: max_examples must be a positive integer or None, got {self.max_examples!r}.")
        if self.labels is not None:
            if not isinstance(self.labels, (list, tuple)) or not self.labels:  # a string would split into letters
                raise TaskSpecError(f"Task {self.name!r}: labels must be a non-empty list of class names, got "
                                    f"{self.labels!r}.")
            self.labels = [str(x) for x in self.labels]
            if self.kind == "classification" and len(self.labels) < 2:
                raise TaskSpecError(f"Task {self.name!r}: a classification task needs at least 2 labels, got "
                                    f"{self.labels}.")
            if len(set(self.labels)) != len(self.labels):
                raise TaskSpecError(f"Task {self.name!r}: labels contain duplicates: {self.labels}.")
        _parse_source(self.name, self.source)  # fail early on a malformed source
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f}
        except ValueError as err:
            raise TaskSpecError(f"Task {self.name!r}: template {self.template!r} is not a valid format string: {err}") from err
        if not fields:
            raise TaskSpecError(f"Task {self.name!r}: template {self.template!r} uses no field; write e.g. '{{input}}'.")


@dataclass
class TaskData:
    """A loaded task: its spec (labels filled in), the three splits, and the instruction for chat models."""

    spec: TaskSpec
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    instruction: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def labels(self) -> list[str] | None:
        return self.spec.labels

    @property
    def num_labels(self) -> int | None:
        return None if self.spec.labels is None else len(self.spec.labels)

    @property
    def splits(self) -> dict[str, list[dict]]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


# ---------------------------------------------------------------------------------------------------
# registry

_REGISTRY: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, overwrite: bool = False) -> TaskSpec:
    """Add ``spec`` to the registry under ``spec.name`` (an existing name needs ``overwrite=True``)."""
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"register_task expects a TaskSpec, got {type(spec).__name__}; build one with task_from_dict().")
    if spec.name in _REGISTRY and not overwrite:
        raise TaskSpecError(f"A task named {spec.name!r} is already registered; pass overwrite=True to replace it.")
    _REGISTRY[spec.name] = spec
    return spec


def list_tasks() -> list[str]:
    """Names of all registered tasks, sorted."""
    return sorted(_REGISTRY)


def get_task(name: str) -> TaskSpec:
    """A copy of the registered spec ``name`` (edit it freely: the registry keeps its own)."""
    if name not in _REGISTRY:
        raise UnknownTaskError(f"Unknown task {name!r}.{_nearest(name, _REGISTRY)} Known tasks: {', '.join(list_tasks())}. "
                               "Define a new one with register_task(TaskSpec(...)) or a source in the config.")
    return dataclasses.replace(_REGISTRY[name], labels=None if _REGISTRY[name].labels is None else list(_REGISTRY[name].labels))


_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(TaskSpec))


def task_from_dict(d: Mapping[str, Any] | str) -> TaskSpec:
    """A TaskSpec from a config entry (YAML). A bare string, or a dict with a registered ``name`` and no
    ``source``, means the built-in task, with the dict's other keys overriding its fields."""
    if isinstance(d, str):
        return get_task(d)
    if not isinstance(d, Mapping):
        raise TaskSpecError(f"A task entry must be a task name or a mapping, got {type(d).__name__}: {d!r}.")
    for key in d:
        if key not in _SPEC_FIELDS:
            raise TaskSpecError(f"Unknown task field {key!r} in {dict(d)!r}.{_nearest(str(key), _SPEC_FIELDS)} "
                                f"Valid fields: {', '.join(_SPEC_FIELDS)}.")
    if "name" not in d:
        raise TaskSpecError(f"Task entry {dict(d)!r} has no 'name'.")
    if "source" not in d:
        if d["name"] not in _REGISTRY:
            raise TaskSpecError(f"Task entry {dict(d)!r} has no 'source' and {d['name']!r} is not a built-in task."
                                f"{_nearest(str(d['name']), _REGISTRY)} Known tasks: {', '.join(list_tasks())}.")
        base = dataclasses.asdict(get_task(d["name"]))
        return TaskSpec(**{**base, **d})
    return TaskSpec(**d)


# ---------------------------------------------------------------------------------------------------
# sources


def _parse_source(task: str, source: str) -> tuple[str, str, str | None]:
    """``(scheme, location, config)`` of a source string."""
    if source == "bbc_news":
        return "bbc_news", "", None
    scheme, sep, rest = source.partition(":")
    if not sep or not rest:
        raise TaskSpecError(f"Task {task!r}: source {source!r} is not understood. Use 'bigbench:<task>', 'bbc_news', "
                            "'json:<file>', 'csv:<file>', 'parquet:<file>' or 'hf:<name>[:<config>]'.")
    if scheme == "bigbench":
        return scheme, rest, None
    if scheme in _FILE_SCHEMES:
        return scheme, rest, None
    if scheme == "hf":
        name, _, config = rest.partition(":")
        return scheme, name, config or None
    raise TaskSpecError(f"Task {task!r}: unknown source scheme {scheme!r} in {source!r}.{_nearest(scheme, ('bigbench', 'hf', *_FILE_SCHEMES))} "
                        f"Known: bigbench, bbc_news, hf, {', '.join(_FILE_SCHEMES)}.")


def _read_bbc() -> tuple[list[dict], list[str]]:
    """All BBC News articles as ``{"text", "label"}`` rows (label = topic folder name)."""
    root = Path(bbc_news_dir())
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = []
    for label in labels:
        for path in sorted((root / label).glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article in the corpus is Latin-1
                text = raw.decode("latin-1")
            rows.append({"text": text.strip(), "label": label})
    return rows, labels


def _read_datasets(spec: TaskSpec, scheme: str, location: str, config: str | None, cache: str) -> tuple[list[dict], list[str] | None]:
    """Rows of a local file or a ``datasets`` name, plus class names when the label column is a ClassLabel."""
    import datasets

    if scheme in _FILE_SCHEMES:
        files = [f.strip() for f in location.split(",") if f.strip()]
        for f in files:
            if not any(c in f for c in "*?[") and not os.path.exists(f):
                raise TaskDataError(f"Task {spec.name!r}: data file {f!r} does not exist.")
            if os.path.isfile(f) and os.path.getsize(f) == 0:  # datasets fails on it with a bare StopIteration
                raise TaskDataError(f"Task {spec.name!r}: source {spec.source!r} gave no examples (data file {f!r} "
                                    f"is empty).")
        args, kwargs = (scheme,), {"data_files": files}
    else:
        args, kwargs = (location,) + ((config,) if config else ()), {}
    saved = scheme == "hf" and any(Path(location, f).is_file() for f in ("dataset_dict.json", "state.json"))
    try:
        # A folder written by save_to_disk is read with load_from_disk; anything else with load_dataset.
        loaded = datasets.load_from_disk(location) if saved else datasets.load_dataset(*args, cache_dir=cache, **kwargs)
    except Exception as err:  # datasets raises many types; all mean "could not load"
        if "corresponds to no data" in str(err):  # datasets' way of saying the files hold no rows
            raise TaskDataError(f"Task {spec.name!r}: source {spec.source!r} gave no examples (no rows in the data).") from err
        hint = (" Without network the Hugging Face Hub cannot be reached: point 'hf:' at a local dataset folder, "
                "or use json:/csv:/parquet: files.") if scheme == "hf" else ""
        raise TaskDataError(f"Task {spec.name!r}: could not load {spec.source!r}: {type(err).__name__}: {err}.{hint}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if spec.split is not None:
            if spec.split not in loaded:
                raise TaskDataError(f"Task {spec.name!r}: split {spec.split!r} not in {spec.source!r}; it has {sorted(loaded)}.")
            parts = [loaded[spec.split]]
        else:
            parts = [loaded[k] for k in sorted(loaded)]
    else:
        parts = [loaded]
    rows: list[dict] = []
    class_names = None
    for part in parts:
        feat = part.features.get(spec.label_field)
        if isinstance(feat, datasets.ClassLabel):
            class_names = list(feat.names)
        rows.extend(part.to_list())
    return rows, class_names


# ---------------------------------------------------------------------------------------------------
# normalisation


def _render(spec: TaskSpec, row: Mapping[str, Any], text: Any) -> str:
    if not isinstance(text, str):
        raise TaskDataError(f"Task {spec.name!r}: the text field {spec.text_field!r} holds {type(text).__name__}, not str: {text!r:.80}.")
    try:
        return spec.template.format(**{**row, "input": text, "text": text})
    except KeyError as err:
        raise TaskDataError(f"Task {spec.name!r}: template {spec.template!r} names field {err.args[0]!r}, "
                            f"which the examples do not have (fields: {', '.join(sorted(row))}).") from err


def _label_index(spec: TaskSpec, value: Any, labels: list[str]) -> int:
    """Index of one raw label in ``labels``; ints are indices, strings are names."""
    if isinstance(value, (bool, np.bool_)):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, np.integer)):
        if not 0 <= int(value) < len(labels):
            raise TaskDataError(f"Task {spec.name!r}: label {int(value)} is out of range for its {len(labels)} labels {labels}.")
        return int(value)
    if isinstance(value, str):
        if value not in labels:
            raise TaskDataError(f"Task {spec.name!r}: label {value!r} is not one of its labels {labels}.{_nearest(value, labels)}")
        return labels.index(value)
    raise TaskDataError(f"Task {spec.name!r}: label {value!r} ({type(value).__name__}) is neither an int nor a string.")


def _label_names(spec: TaskSpec, values: Sequence[Any], class_names: list[str] | None) -> list[str]:
    """Class names: the spec's, else the ClassLabel's, else the sorted string labels, else 0..max."""
    if spec.labels is not None:
        return list(spec.labels)
    if class_names is not None:
        return class_names
    if all(isinstance(v, str) for v in values):
        return sorted(set(values))
    try:
        ints = [int(v) for v in values]
    except (TypeError, ValueError) as err:
        raise TaskDataError(f"Task {spec.name!r}: labels mix strings and numbers ({values[:5]!r}...); give the label names in 'labels'.") from err
    if min(ints) < 0:
        raise TaskDataError(f"Task {spec.name!r}: label {min(ints)} is negative; give the label names in 'labels'.")
    return [str(i) for i in range(max(ints) + 1)]


def _best_choice(scores: Mapping[str, float]) -> str:
    """The choice with the highest score (BIG-bench marks the right answer with 1)."""
    return max(scores, key=lambda k: scores[k])


def _targets(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _normalise_bigbench(spec: TaskSpec, rows: list[dict], seed: int) -> list[dict]:
    rows = [{**r, "text": r["input"]} for r in rows]
    kind = spec.kind
    if kind == "classification":
        if all("target_scores" in r for r in rows):
            keysets = collections.Counter(frozenset(r["target_scores"]) for r in rows)
            if len(keysets) > 1 and spec.labels is None:
                raise TaskDataError(f"Task {spec.name!r}: its examples have {len(keysets)} different choice sets, so it is not a "
                                    "classification task; use kind='multiple_choice'.")
            raw = [_best_choice(r["target_scores"]) for r in rows]
            if spec.labels is None:
                spec.labels = sorted(next(iter(keysets)))
        else:
            raw = [_targets(r["target"])[0] for r in rows]
            spec.labels = _label_names(spec, raw, None)
        return [{"text": _render(spec, r, r["input"]), "label": _label_index(spec, v, spec.labels)} for r, v in zip(rows, raw)]
    if kind == "multiple_choice":
        rng = np.random.default_rng([seed, 7])  # shuffles the choices: BIG-bench files may put the answer at a fixed place
        out = []
        for r in rows:
            if "target_scores" not in r:
                raise TaskDataError(f"Task {spec.name!r}: an example has no target_scores, so it cannot be multiple choice; "
                                    "use kind='generation'.")
            choices = list(r["target_scores"])
            answer = _best_choice(r["target_scores"])
            choices = [choices[i] for i in rng.permutation(len(choices))]
            out.append({"text": _render(spec, r, r["input"]), "choices": choices, "label": choices.index(answer)})
        return out
    out = []
    for r in rows:
        refs = _targets(r["target"]) if "target" in r else [_best_choice(r["target_scores"])]
        out.append({"text": _render(spec, r, r["input"]), "target": refs[0], "references": refs})
    return out


def _column(spec: TaskSpec, row: Mapping[str, Any], name: str, role: str) -> Any:
    if name not in row:
        raise TaskDataError(f"Task {spec.name!r}: the examples have no {role} column {name!r} (columns: {', '.join(sorted(row))}). "
                            f"Set '{role}_field' in the task definition.{_nearest(name, row)}")
    return row[name]


def _normalise_rows(spec: TaskSpec, rows: list[dict], class_names: list[str] | None) -> list[dict]:
    """Normalise rows of a file, a ``datasets`` source or BBC News."""
    texts = [_render(spec, r, _column(spec, r, spec.text_field, "text")) for r in rows]
    if spec.kind == "classification":
        raw = [_column(spec, r, spec.label_field, "label") for r in rows]
        spec.labels = _label_names(spec, raw, class_names)
        return [{"text": t, "label": _label_index(spec, v, spec.labels)} for t, v in zip(texts, raw)]
    if spec.kind == "multiple_choice":
        out = []
        for t, r in zip(texts, rows):
            choices = _column(spec, r, spec.choices_field, "choices")
            if not isinstance(choices, (list, tuple)) or len(choices) < 2:
                raise TaskDataError(f"Task {spec.name!r}: choices must be a list of at least 2 strings, got {choices!r:.120}.")
            choices = [str(c) for c in choices]
            label = _label_index(spec, _column(spec, r, spec.label_field, "label"), choices)
            out.append({"text": t, "choices": choices, "label": label})
        return out
    out = []
    for t, r in zip(texts, rows):
        refs = _targets(_column(spec, r, spec.target_field, "target"))
        out.append({"text": t, "target": refs[0], "references": refs})
    return out


# ---------------------------------------------------------------------------------------------------
# loading


def _split_sizes(n: int, val_fraction: float, test_fraction: float, task: str) -> tuple[int, int, int]:
    for what, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{what} must be in [0, 1), got {frac}.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1 to leave training data, got {val_fraction + test_fraction}.")
    n_val = int(round(n * val_fraction))
    n_test = int(round(n * test_fraction))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise TaskDataError(f"Task {task!r}: {n} examples are too few for val_fraction={val_fraction}, test_fraction={test_fraction}.")
    return n_train, n_val, n_test


def load_task(
    spec: TaskSpec | str,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    cache_dir: str | os.PathLike | None = None,
) -> TaskData:
    """Load a task and split it into train / validation / test from ``seed``.

    The examples are shuffled with ``numpy.random.default_rng(seed)``, cut to ``spec.max_examples`` if
    set, then split into ``round(n * val_fraction)`` validation and ``round(n * test_fraction)`` test
    examples, the rest being training data. ``cache_dir`` is where ``datasets`` keeps its caches
    (default ``<mtpeft cache>/datasets``). The returned spec is a copy with ``labels`` filled in.
    """
    spec = get_task(spec) if isinstance(spec, str) else dataclasses.replace(spec)
    scheme, location, config = _parse_source(spec.name, spec.source)
    if scheme == "bigbench":
        from mtpeft.app.data.bigbench import load_bigbench_examples

        rows = load_bigbench_examples(location)
        prefixes = collections.Counter(r.get("task_prefix") for r in rows if r.get("task_prefix"))
        default_instruction = prefixes.most_common(1)[0][0].strip() if prefixes else None
        examples = _normalise_bigbench(spec, rows, seed) if rows else []
    else:
        default_instruction = None
        if scheme == "bbc_news":
            rows, class_names = _read_bbc()
        else:
            cache = str(cache_dir) if cache_dir is not None else str(_cache_root() / "datasets")
            rows, class_names = _read_datasets(spec, scheme, location, config, cache)
        examples = _normalise_rows(spec, rows, class_names) if rows else []
    if not examples:
        raise TaskDataError(f"Task {spec.name!r}: source {spec.source!r} gave no examples.")
    if spec.kind == "classification" and len(spec.labels) < 2:  # every score would be 1.0
        raise TaskDataError(f"Task {spec.name!r}: its data has only the label {spec.labels}; a classification "
                            f"task needs at least 2 (give all class names in 'labels').")

    order = np.random.default_rng(seed).permutation(len(examples))
    if spec.max_examples is not None:
        order = order[: spec.max_examples]
    n_train, n_val, _ = _split_sizes(len(order), val_fraction, test_fraction, spec.name)
    picked = [examples[i] for i in order]
    return TaskData(
        spec=spec,
        train=picked[:n_train],
        validation=picked[n_train : n_train + n_val],
        test=picked[n_train + n_val :],
        instruction=spec.instruction if spec.instruction is not None else default_instruction,
    )


def check_unique_names(specs: Sequence[TaskSpec]) -> None:
    """Refuse two tasks with one name: datasets, heads and metrics are keyed by it, so one task's data
    would silently replace the other's."""
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.name in seen:
            raise TaskSpecError(
                f"Tasks {seen[spec.name]} and {i} are both named {spec.name!r}; every task needs its own name "
                f"(one's data would replace the other's). Rename one with a task entry such as "
                f"{{name: {spec.name}_2, source: {spec.source!r}}}.")
        seen[spec.name] = i


def load_tasks(specs: Sequence[TaskSpec | str], **kwargs: Any) -> list[TaskData]:
    """Load several tasks; the BIG-bench ones are pulled out of the tarball in a single pass first."""
    specs = [get_task(s) if isinstance(s, str) else s for s in specs]
    check_unique_names(specs)
    bb = [_parse_source(s.name, s.source)[1] for s in specs if _parse_source(s.name, s.source)[0] == "bigbench"]
    if bb:
        from mtpeft.app.data.bigbench import prefetch_bigbench_tasks

        prefetch_bigbench_tasks(bb)
    return [load_task(s, **kwargs) for s in specs]


# ---------------------------------------------------------------------------------------------------
# built-in tasks

for _spec in (
    TaskSpec("bbc_news", "bbc_news", kind="classification", metric="macro_f1",
             instruction="Classify the topic of this BBC News article."),
    TaskSpec("multiemo", "bigbench:multiemo/all_text_en", kind="classification", metric="accuracy"),
    TaskSpec("intent_recognition", "bigbench:intent_recognition", kind="classification", metric="accuracy"),
    TaskSpec("vitaminc_fact_verification", "bigbench:vitaminc_fact_verification", kind="classification",
             metric="accuracy", max_examples=3000),
    TaskSpec("social_iqa", "bigbench:social_iqa", kind="multiple_choice", metric="accuracy",
             instruction="Answer the question about the social situation."),
    TaskSpec("elementary_math_qa", "bigbench:elementary_math_qa/question_only", kind="multiple_choice",
             metric="accuracy", max_examples=3000, instruction="What is the answer to the following math word problem?"),
    TaskSpec("sports_understanding", "bigbench:sports_understanding", kind="classification", metric="accuracy"),
    # fact_checker_fever: in the encoder suite v2 (issue 19), learned by a single-task LoRA on MiniLM in
    # 100 steps, unlike vitaminc_fact_verification and social_iqa. winowhy: learned alone (+9.4 points
    # in 100 steps) but by no multi-task method in a 5-task mixture at 200 steps, so left out of v2.
    TaskSpec("fact_checker_fever", "bigbench:fact_checker/fever", kind="classification", metric="accuracy",
             instruction="Is this claim true or false?"),
    TaskSpec("winowhy", "bigbench:winowhy", kind="classification", metric="accuracy",
             instruction="Is the reason given for the pronoun's referent correct?"),
    TaskSpec("arithmetic", "bigbench:arithmetic/*", kind="generation", metric="exact_match",
             instruction="Answer with the number only."),
):
    register_task(_spec)
del _spec
