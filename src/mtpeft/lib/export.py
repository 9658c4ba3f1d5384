"""Export a (task's) adapter as a plain PEFT LoRA folder that stock PEFT, vLLM and LoRAX load.

For every adapted layer the caller gives the LoRA factors A (r, d_in) and B (d_out, r) with the
method's scale already folded into B (ΔW = B A, in nn.Linear's (d_out, d_in) layout), so the folder
uses ``lora_alpha = r`` (PEFT scale α/r = 1) and no rsLoRA. Layers may differ in rank; those go into
``rank_pattern`` / ``alpha_pattern``, as PEFT expects.

The folder names the *stock* base model, so that it loads with nothing of mtpeft:

* ``base_model_name_or_path``: the folder (or Hub id) the base was loaded from (for SmolLM2, the
  converted HF folder in mtpeft's cache);
* ``task_type``: the stock transformers class (CAUSAL_LM -> AutoModelForCausalLM, SEQ_2_SEQ_LM ->
  AutoModelForSeq2SeqLM, FEATURE_EXTRACTION -> AutoModel), so ``peft.AutoPeftModelFor*`` loads it;
* ``target_modules`` and tensor keys: module paths inside that stock model. mtpeft's
  :class:`~mtpeft.lib.heads.MultiTaskEncoderClassifier` holds the HF AutoModel as ``.encoder``; that
  prefix is stripped and the task's classification head is written beside the LoRA as
  ``head.safetensors`` (``weight``, ``bias``) + ``head_config.json`` (pooling, label count, names):
  stock ``AutoModelForSequenceClassification`` pools BERT's CLS token through its pooler, which is
  not the masked mean pooling the head was trained on (docs/guide.md gives the serving snippet).

``fan_in_fan_out``: PEFT's LoRA weights have the same layout for nn.Linear and GPT-2's Conv1D
(lora_A.weight (r, d_in), lora_B.weight (d_out, r)); the flag only says how to transpose ΔW when
merging. PEFT (tuners/lora/layer.py ``dispatch_default``) overrides the config's flag per layer from
the module type (False for nn.Linear, True for Conv1D) before building each layer, so a mix of
Conv1D blocks and a Linear head loads, runs and merges correctly whatever the flag. The folder writes
the flag that is true for its layers (True when every target is a Conv1D, False when every target is
an nn.Linear); for a mix no single value is true for every layer, and it writes True, which PEFT
corrects for the Linear layers with a warning (tests/test_export_stock.py checks forward and
``merge_and_unload`` on such a mix).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch
from .io import atomic_write_bytes

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head_config.json"


class ExportError(ValueError):
    """An export that cannot be written correctly; the message names the problem and the fix."""


class TargetFolderTakenError(ExportError, FileExistsError):
    """The folder asked for holds files (or is a file): an export or a distillation writes only into a new
    or empty folder, never over or beside other files."""


# ---------------------------------------------------------------------------- the stock base model
def stock_base(model) -> tuple[torch.nn.Module, str]:
    """(the stock HF model inside ``model``, the prefix of its module paths in mtpeft's base model)."""
    from .heads import MultiTaskEncoderClassifier

    base = model.base_model
    if isinstance(base, MultiTaskEncoderClassifier):
        return base.encoder, "encoder."
    return base, ""


def has_task_heads(model) -> bool:
    """Whether ``model`` wraps an encoder with one classification head per task."""
    return stock_base(model)[1] != ""


def stock_task_type(stock: torch.nn.Module) -> str | None:
    """PEFT's task_type for a transformers model class (None: not a class PEFT's auto classes load)."""
    from transformers.models.auto import modeling_auto as auto

    def names(mapping) -> set[str]:
        out = set()
        for value in mapping.values():
            out.update(value if isinstance(value, (tuple, list)) else [value])
        return out

    cls = type(stock).__name__
    if cls in names(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return "CAUSAL_LM"
    if cls in names(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES):
        return "SEQ_2_SEQ_LM"
    if cls in names(auto.MODEL_MAPPING_NAMES):  # a bare encoder/decoder body: AutoModel
        return "FEATURE_EXTRACTION"
    return None


def stock_name_or_path(stock: torch.nn.Module) -> str | None:
    """The folder or Hub id stock transformers loads the base from (None when built in memory)."""
    name = getattr(stock, "name_or_path", None) or getattr(getattr(stock, "config", None), "_name_or_path", None)
    return str(name) if name else None


def _tied_to_input_embeddings(stock: torch.nn.Module, module: torch.nn.Module) -> bool:
    get = getattr(stock, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(getattr(module, "base_layer", module), "weight", None)
    return embeddings is not None and weight is not None and weight is getattr(embeddings, "weight", None)


# ---------------------------------------------------------------------------- the folder
def check_target_folder(path: Path) -> None:
    """Refuse a target folder that is a file or holds files (:class:`TargetFolderTakenError`)."""
    if path.exists() and not path.is_dir():
        raise TargetFolderTakenError(f"export folder {path} exists and is a file; choose another folder.")
    if path.is_dir() and any(path.iterdir()):
        raise TargetFolderTakenError(f"export folder {path} exists and is not empty; choose a new folder (or "
                                     f"delete this one first): an export never overwrites or mixes with other files.")


def _write_folder_atomically(path: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into a temporary folder beside ``path`` and rename it to ``path``: a crash
    leaves either no folder or the complete one (an empty existing folder is replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is a folder like any other
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
        check_target_folder(path)  # again: something may have been written there meanwhile
        os.replace(tmp, path)  # POSIX rename replaces an empty folder
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().float().contiguous().clone() for k, v in tensors.items()},
                metadata={"format": "pt"})


def _head_files(model, task: int | None, labels: list[str] | None) -> dict[str, bytes]:
    """The task's classification head of an encoder classifier (nothing for other models)."""
    from .heads import MultiTaskEncoderClassifier

    base = model.base_model
    if not isinstance(base, MultiTaskEncoderClassifier):
        return {}
    if task is None:
        if len(base.heads) != 1:
            raise ExportError(f"this encoder has one classification head per task ({base.task_names}); pass "
                              f"task=<index> (CLI: --task NAME) to export that task's head with the LoRA.")
        task = 0
    if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < len(base.heads):
        raise ExportError(f"task={task!r} has no head: use an int in [0, {len(base.heads) - 1}].")
    head = base.heads[task]
    n = base.n_labels[task]
    if labels is not None and len(labels) != n:
        raise ExportError(f"{len(labels)} label names given for task {base.task_names[task]!r}, whose head has "
                          f"{n} classes.")
    config = {"task": base.task_names[task], "num_labels": n, "labels": list(labels) if labels else None,
              "pooling": "mean",  # attention-masked mean of last_hidden_state (mtpeft.lib.heads)
              "hidden_size": head.in_features,
              "logits": "pooled @ weight.T + bias"}
    return {HEAD_WEIGHTS: _safetensors_bytes({"weight": head.weight, "bias": head.bias}),
            HEAD_CONFIG: (json.dumps(config, indent=2) + "\n").encode()}


def write_peft_lora(model, path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
                    extra_files: dict[str, bytes] | None = None, task: int | None = None,
                    labels: list[str] | None = None) -> Path:
    """Write a complete stock-PEFT LoRA folder for ``model`` (a MultiTaskModel) from ``factors``.

    factors: adapted layer name (as in ``model.adapted_names``) -> (A (r, d_in), B (d_out, r)) with the
    scale folded into B, for every adapted layer. ``task``: the task whose classification head goes
    with it (encoder classifiers). ``labels``: that task's label names, written to head_config.json.
    ``extra_files``: more files for the folder (e.g. ``{"fidelity.json": ...}``).
    The folder is written atomically and an existing non-empty folder is refused. Returns the folder.
    """
    path = Path(path)
    check_target_folder(path)
    stock, prefix = stock_base(model)
    layers = dict(model.adapted_layers())
    missing, unknown = sorted(set(layers) - set(factors)), sorted(set(factors) - set(layers))
    if missing or unknown:
        raise ExportError(f"factors must cover exactly the adapted layers: missing {missing[:3]}, "
                          f"unknown {unknown[:3]}.")
    trained_extra = [n for n in getattr(model, "saved_module_names", []) if not (prefix and n == "heads")]
    if trained_extra:
        raise ExportError(f"modules_to_save {trained_extra} were trained with the adapter; a plain LoRA export "
                          f"cannot carry them (vLLM and LoRAX refuse modules_to_save), so it would not give the "
                          f"trained model's outputs. Save the run with model.save_pretrained instead.")
    tensors, ranks, conv1d = {}, {}, {}
    for name, layer in layers.items():
        a, b = factors[name]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1 \
                or a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise ExportError(f"{name}: factors of shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit a "
                              f"layer {layer.in_features} -> {layer.out_features} (want A (r, "
                              f"{layer.in_features}), B ({layer.out_features}, r), r >= 1).")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ExportError(f"{name}: the LoRA factors hold NaN or inf; the adapter is broken, not exported.")
        if not name.startswith(prefix):
            raise ExportError(f"{name} is not inside the stock base model ({prefix!r}...); only layers of it export.")
        stock_name = name[len(prefix):]
        tensors[f"base_model.model.{stock_name}.lora_A.weight"] = a
        tensors[f"base_model.model.{stock_name}.lora_B.weight"] = b
        ranks[stock_name] = a.shape[0]
        conv1d[stock_name] = layer.fan_in_fan_out
        if _tied_to_input_embeddings(stock, layer):
            warnings.warn(
                f"{stock_name} shares its weight with the input embeddings: PEFT loads and runs this export "
                f"exactly, but stock merge_and_unload would add the update to the embeddings too. Before "
                f"merging, untie the head (docs/guide.md, 'Exporting').", stacklevel=2)
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: r for name, r in ranks.items() if r != rank}
    task_type = stock_task_type(stock)
    base_name = stock_name_or_path(stock)
    if task_type is None:
        warnings.warn(f"{type(stock).__name__} is not a transformers auto class PEFT's AutoPeftModel* load; the "
                      f"export has task_type null: load it with peft.PeftModel.from_pretrained(base, folder).",
                      stacklevel=2)
    if base_name is None:
        warnings.warn("the base model was not loaded from a folder or Hub id (config._name_or_path is empty): "
                      "base_model_name_or_path is null, so load the export with "
                      "peft.PeftModel.from_pretrained(base, folder) on your own base.", stacklevel=2)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_name,
        "r": rank,
        "lora_alpha": rank,  # scale 1: the method's scale is folded into lora_B
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        # one flag for the whole adapter; PEFT sets it per layer from the module type (module docstring)
        "fan_in_fan_out": any(conv1d.values()),
        "target_modules": sorted(ranks),
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    files = {"adapter_model.safetensors": _safetensors_bytes(tensors),
             "adapter_config.json": (json.dumps(config, indent=2) + "\n").encode(),
             **_head_files(model, task, labels)}
    for name, data in (extra_files or {}).items():
        if name in files or "/" in name or name.startswith("."):
            raise ExportError(f"extra file name {name!r} is taken or not a plain file name.")
        files[name] = data
    _write_folder_atomically(path, files)
    return path


def export_peft_lora(model, path, task: int | None, labels: list[str] | None = None) -> Path:
    """The exact export: each layer's ``lora_factors(task)`` (``task`` None for methods that do not route
    by task; it still picks an encoder classifier's head)."""
    routed_task = task if model.config.task_routed else None
    with torch.no_grad():
        factors = {name: layer.lora_factors(routed_task) for name, layer in model.adapted_layers()}
    return write_peft_lora(model, path, factors, task=task, labels=labels)
