"""`mtpeft --help` answers before torch loads; every sub-command's help is complete; `import mtpeft`
stays light (no matplotlib, datasets or rich until a report or a data set needs them)."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "datasets", "matplotlib", "rich", "peft", "accelerate")


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def help_of(*argv: str) -> tuple[str, list[str]]:
    """The help text of `mtpeft ARGV --help`, and the heavy packages that printing it imported."""
    code = (
        "import io, json, sys, contextlib\n"
        "from mtpeft.app.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try:\n"
        f"        main({[*argv, '--help']!r})\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
        "print(json.dumps({'help': buf.getvalue(), 'heavy': heavy}))\n"
    )
    out = json.loads(run_python(code).strip().splitlines()[-1])
    return out["help"], out["heavy"]


@pytest.mark.parametrize("command", ["", "train", "eval", "report", "export", "adapt", "study", "bench"])
def test_help_imports_no_heavy_package(command):
    text, heavy = help_of(*([command] if command else []))
    assert text.startswith("usage: mtpeft"), text
    assert heavy == [], f"`mtpeft {command} --help` imported {heavy}"


def test_help_texts_are_complete():
    study, _ = help_of("study")
    assert "plus the single-task baseline, summarised in one table" in " ".join(study.split())
    for command in ("eval", "report", "export", "adapt"):
        text, _ = help_of(command)
        words = " ".join(text.split())
        description = words.split("positional arguments:")[0]
        assert len(description.split()) > 12, (command, description)  # a sentence beyond the usage line
        assert "RUN_DIR a run folder written by `mtpeft train`" in words, (command, words)


def test_import_mtpeft_is_light_and_the_api_does_not_pull_report_or_data_packages():
    code = (
        "import json, sys\n"
        "import mtpeft\n"
        "bare = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'matplotlib', 'datasets', 'rich'})\n"
        "from tiny_models import tiny_llama\n"
        "model = mtpeft.get_model(tiny_llama(), mtpeft.TeamLoraConfig(n_experts=2, r=2))\n"
        "assert mtpeft.known_methods() and mtpeft.task_expert_load and mtpeft.MultiTaskModel\n"
        "used = sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'datasets', 'rich'})\n"
        "print(json.dumps({'bare': bare, 'used': used}))\n"
    )
    import os

    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n" + code
    out = json.loads(run_python(code).strip().splitlines()[-1])
    assert out["bare"] == []  # `import mtpeft` alone: nothing heavy
    assert out["used"] == []  # building and wrapping a model: no report / data-set packages


def test_lazy_names_match_the_public_api():
    import mtpeft

    for name in mtpeft.__all__:
        assert getattr(mtpeft, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        mtpeft.NotAThing  # noqa: B018
