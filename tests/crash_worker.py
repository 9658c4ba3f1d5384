"""The `mtpeft` command line with crash hooks, for tests/test_crash_safety.py (run in its own process so the
test can SIGKILL it, or so that it can SIGKILL itself).

    python tests/crash_worker.py train CONFIG.yaml --no-eval        (any `mtpeft` arguments)

runs ``mtpeft.app.cli.main`` unchanged, plus the hook named by one environment variable:

* ``MTPEFT_CRASH_PAUSE=STEP:READY_FILE``: after optimizer step STEP, write READY_FILE and sleep; the test
  then SIGKILLs the process (a kill between two checkpoints, at a point the test controls).
* ``MTPEFT_CRASH_KILL=STEP:WHERE``: SIGKILL itself while checkpoint-STEP is being written, at WHERE:
  ``adapter``  half-way through adapter_model.safetensors (its temp file holds half the bytes);
  ``marker``   once every file of the checkpoint is written, just before COMPLETE;
  ``rotate``   after COMPLETE, half-way through deleting the older checkpoint (save_total_limit=1).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_pause(step: int, ready: Path) -> None:
    from transformers import TrainerCallback

    import mtpeft.app.pipeline

    class Pause(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                ready.write_text(str(os.getpid()))
                time.sleep(600)

    train_run = mtpeft.app.pipeline.train_run

    def with_pause(run, **kwargs):
        return train_run(run, **{**kwargs, "callbacks": [*(kwargs.get("callbacks") or []), Pause()]})

    mtpeft.app.pipeline.train_run = with_pause  # cli.cmd_train imports it at call time


def install_kill(step: int, where: str) -> None:
    import shutil

    import mtpeft.lib.io
    import mtpeft.app.trainer

    folder = f"checkpoint-{step}"
    if where == "adapter":
        real = mtpeft.lib.io.atomic_write_bytes

        def half_then_die(path, data):
            path = Path(path)
            if path.parent.name == folder and path.name == "adapter_model.safetensors":
                fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                with os.fdopen(fd, "wb") as handle:  # what atomic_write_bytes does, interrupted
                    handle.write(data[: len(data) // 2])
                    handle.flush()
                    os.fsync(handle.fileno())
                die()
            real(path, data)

        mtpeft.lib.io.atomic_write_bytes = half_then_die  # atomic_save_safetensors looks it up here
    elif where == "marker":
        real = mtpeft.app.trainer.atomic_write_bytes

        def die_before_marker(path, data):
            path = Path(path)
            if path.parent.name == folder and path.name == mtpeft.app.trainer.COMPLETE_MARKER:
                die()
            real(path, data)

        mtpeft.app.trainer.atomic_write_bytes = die_before_marker
    elif where == "rotate":
        def rmtree(path, *args, **kwargs):
            done = mtpeft.app.trainer.complete_checkpoints(Path(path).parent)
            if done and done[-1].name == folder:  # rotating older checkpoints out after COMPLETE of STEP
                files = sorted(p for p in Path(path).rglob("*") if p.is_file())
                if files:
                    files[0].unlink()
                die()
            shutil.rmtree(path, *args, **kwargs)

        mtpeft.app.trainer.shutil = types.SimpleNamespace(rmtree=rmtree)
    else:
        raise SystemExit(f"unknown crash point {where!r}")


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    pause = os.environ.get("MTPEFT_CRASH_PAUSE")
    kill = os.environ.get("MTPEFT_CRASH_KILL")
    if pause:
        step, ready = pause.split(":", 1)
        install_pause(int(step), Path(ready))
    if kill:
        step, where = kill.split(":", 1)
        install_kill(int(step), where)
    from mtpeft.app.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
