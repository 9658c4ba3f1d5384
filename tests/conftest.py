"""Test-wide settings: no network, deterministic threads, tiny-model builders importable everywhere."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(__file__))  # so tests in sub-folders can `import tiny_models`

import torch  # noqa: E402

torch.set_num_threads(2)
