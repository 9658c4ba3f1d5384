"""The run config: what ``mtpeft train CONFIG.yaml [key=value ...]`` reads.

Plain dataclasses in four groups (model, data, train, adapter) so that a YAML file, command-line
overrides (``train.steps=50 adapter.r=4``) and Python code all build the same object. A misspelt key
is an error that names it and suggests the nearest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml



@dataclass
class ModelSection:
    """name: "minilm", "smollm2", or a local model folder. kind: "encoder" (one classification head
    per task), "causal" (a decoder-only LM: chat prompts, loss on the answer tokens) or "seq2seq" (an
    encoder-decoder LM such as T5: the prompt to the encoder, the answer as the decoder's target);
    None reads it from the model folder's config.json (mtpeft.app.base_models.kind_from_config)."""

    name: str = "minilm"
    kind: str | None = None
    max_length: int = 96
    gradient_checkpointing: bool = False


@dataclass
class DataSection:
    """tasks: registered task names, or task dicts (see mtpeft.app.data.task_from_dict)."""

    tasks: list = field(default_factory=lambda: ["bbc_news", "multiemo", "intent_recognition"])
    seed: int = 0
    temperature: float = 2.0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    max_eval_examples: int | None = 300


@dataclass
class TrainSection:
    steps: int = 160  # the embedded default run: about 4 min on 2 cores, evaluation and report included
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 2e-3
    routing_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    seed: int = 0
    logging_steps: int = 10
    save_steps: int = 80
    save_total_limit: int = 2
    threads: int | None = None


@dataclass
class RunConfig:
    method: str = "teamlora"
    adapter: dict = field(default_factory=dict)  # the method config's fields (r, n_experts, ...)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = "runs/default"

    def __post_init__(self) -> None:
        if not isinstance(self.method, str):
            raise RunConfigError(f"method must be a method name (a string), got {self.method!r}.")
        from ..lib.config import get_config_class  # (lazy: importing the library loads torch; --help must not)

        get_config_class(self.method)  # unknown method: clear error now, not after loading data
        validate_run_config(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        from ..lib.io import atomic_write_bytes  # a kill mid-write leaves the previous config.yaml whole

        atomic_write_bytes(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False).encode())


class RunConfigError(ValueError):
    """A run config (a field's value, or the config file itself) is unusable; the message names the key
    or the file and what to write instead."""


class InvalidYAMLError(RunConfigError, yaml.YAMLError):
    """A config file that YAML cannot read (also a yaml.YAMLError, as before it was given a message)."""


# Every field's allowed values: (type, lower bound, upper bound, None allowed), checked before anything is
# loaded or written. "int" refuses bools and floats that are not whole; "float" refuses NaN and +-Inf.
# Upper bounds exist where a larger value cannot work: seeds go to numpy (< 2**32), fractions are parts.
_SEED_MAX = 2**32 - 1
_RULES: dict[str, tuple[str, float | None, float | None, bool]] = {
    "model.max_length": ("int", 1, None, False),
    "data.seed": ("int", 0, _SEED_MAX, False),
    "data.temperature": ("float", 0, None, False),  # > 0, see _EXCLUSIVE_MIN
    "data.val_fraction": ("float", 0, 1, False),  # [0, 1)
    "data.test_fraction": ("float", 0, 1, False),
    "data.max_eval_examples": ("int", 1, None, True),
    "train.steps": ("int", 1, None, False),
    "train.batch_size": ("int", 1, None, False),
    "train.eval_batch_size": ("int", 1, None, False),
    "train.lr": ("float", 0, None, False),
    "train.routing_lr": ("float", 0, None, True),
    "train.weight_decay": ("float", 0, None, False),
    "train.warmup_ratio": ("float", 0, 1, False),  # [0, 1]
    "train.seed": ("int", 0, _SEED_MAX, False),
    "train.logging_steps": ("int", 1, None, False),
    "train.save_steps": ("int", 1, None, False),
    "train.save_total_limit": ("int", 1, None, True),
    "train.threads": ("int", 1, 1024, True),
}
_EXCLUSIVE_MIN = {"data.temperature", "train.lr", "train.routing_lr"}
_EXCLUSIVE_MAX = {"data.val_fraction", "data.test_fraction"}
_HINTS = {
    "data.max_eval_examples": " (null evaluates every example)",
    "train.save_total_limit": " (null keeps every checkpoint)",
    "train.threads": " (null keeps torch's default)",
    "train.routing_lr": " (null uses train.lr)",
}
# The sampler builds one epoch of steps x batch_size indices in memory (about 100 bytes per sample).
MAX_SAMPLES = 10**8


def _check_number(key: str, value: Any) -> None:
    kind, low, high, optional = _RULES[key]
    if value is None:
        if optional:
            return
        raise RunConfigError(f"{key} must be {'an integer' if kind == 'int' else 'a number'}, got null.")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "int" and not isinstance(value, int)):
        raise RunConfigError(f"{key} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}.")
    if not math.isfinite(value):
        raise RunConfigError(f"{key} must be a finite number, got {value!r}.")
    too_low = low is not None and (value <= low if key in _EXCLUSIVE_MIN else value < low)
    too_high = high is not None and (value >= high if key in _EXCLUSIVE_MAX else value > high)
    if too_low or too_high:
        lo = "" if low is None else (f"> {low}" if key in _EXCLUSIVE_MIN else f">= {low}")
        hi = "" if high is None else (f"< {high}" if key in _EXCLUSIVE_MAX else f"<= {high}")
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise RunConfigError(f"{key} must be {bounds}, got {value!r}{_HINTS.get(key, '')}.")


def validate_run_config(run: "RunConfig") -> None:
    """Refuse every value the run cannot use, naming the key: called when a RunConfig is built, so
    ``mtpeft train`` fails here, before it loads data or creates the run folder."""
    for key in _RULES:
        section, name = key.split(".")
        _check_number(key, getattr(getattr(run, section), name))
    if not isinstance(run.model.name, str) or not run.model.name.strip():
        raise RunConfigError(f"model.name must name a model ('minilm', 'smollm2' or a model folder), got "
                             f"{run.model.name!r}.")
    if run.model.kind not in (None, "encoder", "causal", "seq2seq"):
        raise RunConfigError(f"model.kind must be 'encoder', 'causal' or 'seq2seq' (or unset: read from the "
                             f"model's config.json), got {run.model.kind!r}.")
    if not isinstance(run.model.gradient_checkpointing, bool):
        raise RunConfigError(f"model.gradient_checkpointing must be true or false, got "
                             f"{run.model.gradient_checkpointing!r}.")
    if not isinstance(run.data.tasks, list):
        raise RunConfigError(f"data.tasks must be a list of task names or task mappings, got {run.data.tasks!r}.")
    if run.data.val_fraction + run.data.test_fraction >= 1:
        raise RunConfigError(f"data.val_fraction + data.test_fraction must be < 1 to leave training data, got "
                             f"{run.data.val_fraction} + {run.data.test_fraction}.")
    if run.train.steps * run.train.batch_size > MAX_SAMPLES:
        raise RunConfigError(f"train.steps x train.batch_size = {run.train.steps * run.train.batch_size} samples; "
                             f"the sampler holds one epoch of them in memory, so at most {MAX_SAMPLES} are allowed.")
    if not isinstance(run.adapter, dict):
        raise RunConfigError(f"adapter must be a mapping of the method's fields (e.g. {{r: 8}}), got {run.adapter!r}.")
    if not isinstance(run.output_dir, str) or not run.output_dir.strip():
        raise RunConfigError(f"output_dir must name the run folder, got {run.output_dir!r}.")


_SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection}


def _check_keys(kind: str, data: dict, cls) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"unknown config key {kind}{key!r}.{hint} Known keys: {known}.")


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    data = dict(data or {})
    from ..lib.config import coerce_numbers  # (lazy, as every library import here: `--help` loads no torch)

    _check_keys("", data, RunConfig)
    sections = {}
    for name, cls in _SECTIONS.items():
        section = data.pop(name, None)
        section = {} if section is None else section
        if not isinstance(section, dict):
            raise ValueError(f"config section {name!r} must be a mapping, got {section!r}.")
        _check_keys(f"{name}.", section, cls)
        sections[name] = cls(**coerce_numbers(name, cls, section))
    return RunConfig(**data, **sections)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML: numbers, lists, null...)."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}  # deep copy
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. train.steps=50).")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section.")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (None: the embedded default) and apply overrides."""
    if path is None:
        data = {}
    else:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist.")
        data = read_yaml_mapping(path)
    return run_config_from_dict(apply_overrides(data, overrides or []))


def read_yaml_mapping(path: Path) -> dict:
    """A YAML file's mapping, or a RunConfigError naming the file (not valid YAML, not text, a folder)."""
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except IsADirectoryError:
        raise RunConfigError(f"{path} is a folder, not a YAML config file.") from None
    except UnicodeDecodeError:
        raise RunConfigError(f"{path} is not a text file (not UTF-8); pass a YAML run config.") from None
    except yaml.YAMLError as err:
        raise InvalidYAMLError(f"{path} is not valid YAML ({' '.join(str(err).split())}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RunConfigError(f"{path} must hold a YAML mapping of config keys, got {type(data).__name__}.")
    return data


def adapter_config(run: RunConfig, n_tasks: int, modules_to_save: list[str] | None):
    """The method config for this run: the YAML's adapter fields plus what the run knows."""
    from ..lib.config import coerce_numbers, get_config_class

    cls = get_config_class(run.method)
    known = {f.name for f in dataclasses.fields(cls)}
    fields = dict(run.adapter)
    _check_keys("adapter.", fields, cls)
    if fields.get("n_tasks") not in (None, n_tasks):  # task ids 0..n_tasks-1 come from data.tasks
        raise RunConfigError(f"adapter.n_tasks={fields['n_tasks']!r} but data.tasks names {n_tasks} tasks; "
                             f"remove adapter.n_tasks (it is set from data.tasks).")
    fields["n_tasks"] = n_tasks
    if modules_to_save and "modules_to_save" in known:
        fields["modules_to_save"] = list(fields.get("modules_to_save") or []) + modules_to_save
    return cls(**coerce_numbers("adapter", cls, fields))
