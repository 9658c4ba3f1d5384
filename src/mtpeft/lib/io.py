"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``.

Writing is atomic (temp file in the same folder, then ``os.replace``), so a crash mid-save leaves
the previous files intact. Loading is strict and never unpickles: the config must name a known
method with known fields, and the tensors must match the model's adapter keys and shapes exactly.
On any error the base model is left as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import AdapterConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")


class AdapterFileError(ValueError):
    """An adapter folder that does not fit the model, or is not a valid mtpeft adapter."""


def _version() -> str:
    from .._version import __version__

    return __version__


def _current_umask() -> int:
    """The process umask. POSIX has no read-only call, so set it and put it back; a file another thread
    creates in that instant gets 0o077, the strict mask, never a looser one."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _new_file_mode(path: Path) -> int:
    """The mode a plain ``open(path, "w")`` would leave: an existing file keeps its mode, a new one gets
    0o666 minus the umask. (mkstemp creates 0o600 whatever the umask, which left saved adapters
    unreadable to a serving process running as another user.)"""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_current_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``), with
    the permissions a plain write would give (see :func:`_new_file_mode`)."""
    path = Path(path)
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8 (results tables, reports, JSON)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    # clone: safetensors refuses views and shared storage
    data = save({k: v.detach().contiguous().clone() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def save_adapter(model, path) -> None:
    """Write ``model``'s adapter into the folder ``path``: a MultiTaskModel, or mtpeft.lib.distributed's
    holder of gathered tensors (only ``config`` and ``adapter_state_dict``)."""
    path = Path(path)
    if hasattr(model, "adapted_layers"):  # a MultiTaskModel (io does not import model: model imports io)
        model.check_usable("save adapters")
        for _, layer in model.adapted_layers():
            layer.check_initialised("saving")
    if path.exists() and not path.is_dir():
        raise AdapterFileError(f"cannot save the adapter to {path}: it is a file, not a folder. Pass a folder "
                               f"path (save_pretrained writes {CONFIG_NAME} and {WEIGHTS_NAME} into it).")
    path.mkdir(parents=True, exist_ok=True)
    config = {"mtpeft_version": _version(), **model.config.to_dict()}
    atomic_save_safetensors(model.adapter_state_dict(), path / WEIGHTS_NAME,
                            metadata={"format": "pt", "mtpeft_method": model.config.method})
    atomic_write_bytes(path / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def read_adapter_config(path) -> AdapterConfig:
    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(f"{path} is not a folder; pass the folder that save_pretrained wrote.")
    config_file = path / CONFIG_NAME
    if not config_file.exists():
        raise AdapterFileError(f"{path} has no {CONFIG_NAME}; is it an mtpeft adapter folder?")
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{config_file} is not valid JSON ({err}).") from None
    if not isinstance(data, dict) or "method" not in data:
        if isinstance(data, dict) and data.get("peft_type"):
            raise AdapterFileError(
                f"{path} is a PEFT adapter (peft_type={data['peft_type']}), not an mtpeft one; load it "
                f"with peft.PeftModel.from_pretrained.")
        raise AdapterFileError(f"{config_file} does not name a method; it was not written by mtpeft.")
    try:
        return AdapterConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise AdapterFileError(f"{config_file}: {err}") from None


def read_adapter_tensors(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    weights = path / WEIGHTS_NAME
    if not weights.exists():
        pickled = [n for n in PICKLE_NAMES if (path / n).exists()]
        if pickled:
            raise AdapterFileError(
                f"{path} holds {pickled[0]} (a pickle) but no {WEIGHTS_NAME}; mtpeft never unpickles "
                f"(a pickle can run code). Convert it to safetensors from a trusted source first.")
        raise AdapterFileError(f"{path} has no {WEIGHTS_NAME}.")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(
            f"{weights} is not a readable safetensors file ({err}); it may be truncated or corrupted. "
            f"Save the adapter again.") from None
    check_tensors_finite(tensors, weights)
    return tensors


def check_tensors_finite(tensors: dict[str, torch.Tensor], source) -> None:
    """Refuse NaN / ±Inf in loaded weights: they would make every output NaN without an error."""
    for key, value in tensors.items():
        if (value.dtype.is_floating_point or value.dtype.is_complex) and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise AdapterFileError(f"{source}: tensor {key!r} holds {bad} NaN or infinite values; the adapter "
                                   f"was saved from a diverged run or is corrupted. Use an earlier checkpoint.")


def check_tensors_fit(model, tensors: dict[str, torch.Tensor], source) -> None:
    expected = model.adapter_state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        raise AdapterFileError(
            f"{source} does not fit this model: {'; '.join(parts)}. Was it saved from another base model "
            f"or with other target_modules?")
    for key, value in tensors.items():
        want = tuple(expected[key].shape)
        if tuple(value.shape) != want:
            raise AdapterFileError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)} but this model expects {want}; "
                f"the adapter was saved with another rank, expert or task count, or another base model.")


@torch.no_grad()
def copy_tensors_into(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checked tensors into the model's adapter parameters (which every one of them then covers, so
    the layers count as initialised). Refused while merged: the merged base would keep the old ΔW."""
    model.check_not_merged("loading adapter weights")
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        param = params[f"base_model.{key}"]
        param.copy_(value.to(device=param.device, dtype=param.dtype))
    for _, layer in model.adapted_layers():
        layer.adapters_initialised = True


def load_adapter_weights(model, path) -> None:
    """Load a saved adapter into an already wrapped model whose config must equal the saved one."""
    model.check_usable("load adapter weights")
    model.check_not_merged("load_adapter_weights")
    config = read_adapter_config(path)
    mine, theirs = model.config.to_dict(), config.to_dict()
    differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if differ:
        detail = ", ".join(f"{k}: model={mine.get(k)!r} file={theirs.get(k)!r}" for k in differ)
        raise AdapterFileError(f"{path} was saved with another adapter config ({detail}). Build the model "
                               f"from the folder with MultiTaskModel.from_pretrained instead.")
    tensors = read_adapter_tensors(path)
    check_tensors_fit(model, tensors, path)
    copy_tensors_into(model, tensors)
