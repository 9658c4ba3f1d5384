"""Run the Python examples of docs/guide.md, in order, in one namespace."""

import re
from pathlib import Path

GUIDE = Path(__file__).parent.parent / "docs" / "guide.md"


def test_guide_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) >= 6
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{GUIDE}:block{i}", "exec"), namespace)  # noqa: S102 - our own docs
    printed = capsys.readouterr().out
    assert "task id 7 is out of range" in printed
    assert "teamlora_balance" in printed
    assert namespace["poly"].config.n_tasks == 4
