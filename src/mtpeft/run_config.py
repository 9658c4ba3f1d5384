"""The run config: what ``mtpeft train CONFIG.yaml [key=value ...]`` reads.

Plain dataclasses in four groups (model, data, train, adapter) so that a YAML file, command-line
overrides (``train.steps=50 adapter.r=4``) and Python code all build the same object. A misspelt key
is an error that names it and suggests the nearest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import coerce_numbers, get_config_class


@dataclass
class ModelSection:
    """name: "minilm", "smollm2", or a local model folder. kind: "encoder" (one classification head
    per task), "causal" (a decoder-only LM: chat prompts, loss on the answer tokens) or "seq2seq" (an
    encoder-decoder LM such as T5: the prompt to the encoder, the answer as the decoder's target);
    None reads it from the model folder's config.json (mtpeft.base_models.kind_from_config)."""

    name: str = "minilm"
    kind: str | None = None
    max_length: int = 96
    gradient_checkpointing: bool = False


@dataclass
class DataSection:
    """tasks: registered task names, or task dicts (see mtpeft.data.task_from_dict)."""

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
        get_config_class(self.method)  # unknown method: clear error now, not after loading data
        if self.model.kind not in (None, "encoder", "causal", "seq2seq"):
            raise ValueError(f"model.kind must be 'encoder', 'causal' or 'seq2seq' (or unset: read from the "
                             f"model's config.json), got {self.model.kind!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        from .io import atomic_write_bytes  # a kill mid-write leaves the previous config.yaml whole

        atomic_write_bytes(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False).encode())


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
    _check_keys("", data, RunConfig)
    sections = {}
    for name, cls in _SECTIONS.items():
        section = data.pop(name, None) or {}
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
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a YAML mapping of config keys.")
    return run_config_from_dict(apply_overrides(data, overrides or []))


def adapter_config(run: RunConfig, n_tasks: int, modules_to_save: list[str] | None):
    """The method config for this run: the YAML's adapter fields plus what the run knows."""
    cls = get_config_class(run.method)
    known = {f.name for f in dataclasses.fields(cls)}
    fields = dict(run.adapter)
    _check_keys("adapter.", fields, cls)
    fields.setdefault("n_tasks", n_tasks)
    if modules_to_save and "modules_to_save" in known:
        fields["modules_to_save"] = list(fields.get("modules_to_save") or []) + modules_to_save
    return cls(**coerce_numbers("adapter", cls, fields))
