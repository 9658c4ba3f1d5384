"""Test-wide settings: no network, deterministic threads, tiny-model builders importable everywhere."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(__file__))  # so tests in sub-folders can `import tiny_models`

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """Single-threaded torch for the test (exact, repeatable sums; two suites sharing the machine don't
    wait on each other's OpenMP threads); the previous setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer: from the converted cache folder when it exists (0.3 s), else from the GGUF (~5 s)."""
    from transformers import AutoTokenizer

    from mtpeft.app.assets import cache_dir, smollm2_gguf

    converted = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (converted / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(converted))
    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
