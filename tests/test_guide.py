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
    csv_task = namespace["task"]  # the csv: source example
    assert csv_task.spec.labels == ["business", "sport", "tech"]
    assert (len(csv_task.train), len(csv_task.validation), len(csv_task.test)) == (24, 3, 3)
    assert "['business', 'sport', 'tech'] 24 3 3" in printed
