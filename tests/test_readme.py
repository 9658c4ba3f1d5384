"""Run every Python block of README.md as written: each on its own (a fresh namespace, an empty
working folder), on the real SmolLM2 that scripts/setup.sh installs."""

import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the blocks write out/ relative to the working folder
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(BLOCKS[index], f"{README}:python-block-{index}", "exec"), namespace)  # noqa: S102 - our docs
    written = sorted(p.name for p in (tmp_path / "out").rglob("*.safetensors"))
    assert written, "each README block saves or exports an adapter under out/"
    if "out" in namespace:  # the first block: a real loss with aux losses
        assert namespace["out"].loss.isfinite() and namespace["out"].aux_losses
    if "served" in namespace:  # the export block: stock PEFT loaded the exported folder
        import peft

        assert isinstance(namespace["served"], peft.PeftModel)
