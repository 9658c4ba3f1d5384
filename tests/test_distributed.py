"""Several processes: DDP under torchrun and accelerate launch, FSDP2, distributed resume.

Everything runs on CPU with 2 processes on gloo. The pipeline runs train a tiny BERT (2 layers,
hidden 32, dropout 0: the ranks' RNG streams do not matter) on two small json tasks; one process with
global batch 4 must equal 2 processes with 2 examples each. tests/dist_worker.py holds the code that
runs inside the launched processes.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist_worker import METHOD_CONFIGS, make_fixture, tiny_run_dict
from mtpeft.lib import distributed as D
from mtpeft.app.data import MultiTaskSampler
from mtpeft.app.pipeline import train_run
from mtpeft.app.run_config import run_config_from_dict

WORKER = Path(__file__).with_name("dist_worker.py")
BIN = Path(sys.executable).parent
TIMEOUT = 300  # a DDP job that waits for a gradient that never comes hangs: fail instead


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    return env


def torchrun(*args, cwd) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (the torchrun of this interpreter)."""
    exe = [str(BIN / "torchrun")] if (BIN / "torchrun").exists() else [sys.executable, "-m", "torch.distributed.run"]
    result = subprocess.run([*exe, "--standalone", "--nproc_per_node=2", *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-6000:])
    return result


def adapter(run_dir) -> dict:
    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def step_losses(run_dir) -> dict:
    return {e["step"]: e["loss"] for e in json.loads((Path(run_dir) / "log_history.json").read_text()) if "loss" in e}


def assert_same_adapter(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    folder, tasks = make_fixture(root)
    return root, folder, tasks


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def single_run(fixture_dir):
    """The one-process reference: global batch 4, 6 steps, checkpoints at 3 and 6."""
    root, folder, tasks = fixture_dir
    threads = torch.get_num_threads()
    try:
        out = train_run(run_config_from_dict(tiny_run_dict(folder, tasks, root / "single")), evaluate=False,
                        log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)  # the run config asks for 1 thread
    return out


# ----------------------------------------------------------------------------------- in-process
def test_rank_helpers_read_the_launcher_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert (D.rank(), D.world_size(), D.is_main_process(), D.is_distributed()) == (0, 1, True, False)
    assert D.init_distributed() is False  # one process: no process group
    D.barrier()
    with D.main_process_first():
        pass
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (D.rank(), D.world_size(), D.local_rank(), D.is_main_process()) == (3, 4, 1, False)


def test_global_batch_is_split_between_processes():
    assert D.per_device_batch_size(16, world=1) == 16
    assert D.per_device_batch_size(16, world=4) == 4
    with pytest.raises(ValueError, match=r"train.batch_size=10 .* divisible by the number of processes \(4\)"):
        D.per_device_batch_size(10, world=4)


def test_ranks_take_the_global_stream_in_turn():
    """What accelerate does to our sampler inside the Trainer (and rank_batch_sampler in custom loops):
    at every step the ranks' batches together are exactly the one-process global batch."""
    sampler = MultiTaskSampler([30, 7, 12], temperature=2.0, num_samples=5 * 8, seed=3)
    single = list(torch.utils.data.BatchSampler(sampler, 8, drop_last=False))
    ranks = [list(D.rank_batch_sampler(sampler, 2, process_index=r, num_processes=4)) for r in range(4)]
    assert all(len(batches) == 5 for batches in ranks)
    for step, batch in enumerate(single):
        assert [i for r in range(4) for i in ranks[r][step]] == batch


def test_unwrap_model_sees_through_wrappers():
    inner = torch.nn.Linear(2, 2)
    wrapper = torch.nn.Module()
    wrapper.module = inner
    assert D.unwrap_model(wrapper) is inner and D.unwrap_model(inner) is inner


# ----------------------------------------------------------------------------------- 2 processes
def test_torchrun_ddp_equals_one_process(fixture_dir, single_run):
    """The CI test: `torchrun --nproc_per_node=2 -m mtpeft train CONFIG` with per-task LoRA and per-task
    heads (tasks absent from a rank's half batch), DDP without find_unused_parameters."""
    root, folder, tasks = fixture_dir
    config = write_config(root / "ddp.yaml", tiny_run_dict(folder, tasks, root / "ddp"))
    result = torchrun("-m", "mtpeft", "train", config, "--no-eval", cwd=root)
    run = root / "ddp"
    assert result.stdout.count("mtpeft: run folder") == 2  # both processes finished
    assert (run / "checkpoint-6" / "COMPLETE").exists()
    assert {p.name for p in (run / "checkpoint-6").glob("rng_state_*.pth")} == {"rng_state_0.pth",
                                                                                "rng_state_1.pth"}
    assert_same_adapter(adapter(run), adapter(single_run))
    moved = max(float(v.abs().max()) for k, v in adapter(single_run).items() if "lora_B" in k)
    assert moved > 1e-3  # B starts at zero: the comparison is not between two untrained adapters
    ddp_losses, one_losses = step_losses(run), step_losses(single_run)
    assert ddp_losses.keys() == one_losses.keys() == set(range(1, 7))
    for step in one_losses:
        assert ddp_losses[step] == pytest.approx(one_losses[step], rel=1e-5), step


def test_torchrun_train_command_leaves_the_process_group(fixture_dir):
    """`mtpeft train` under torchrun destroys the process group it joined before it returns (as
    torchtune's recipes do), so no gloo / NCCL thread runs on into interpreter shutdown."""
    root, folder, tasks = fixture_dir
    config = write_config(root / "cli.yaml", tiny_run_dict(folder, tasks, root / "cli"))
    torchrun(WORKER, "cli", root / "cli.json", config, cwd=root)
    assert json.loads((root / "cli.json").read_text()) == {"code": 0, "in_process_group": False}
    assert (root / "cli" / "checkpoint-6" / "COMPLETE").exists()  # it trained (in two processes)


def test_ddp_every_method_without_find_unused_parameters(tmp_path):
    """Every method in DDP(find_unused_parameters=False): tasks absent from a rank or from the whole
    step, top-1 routing leaving experts idle. Exact vs one process (SGD, eval mode, no aux); then
    train mode with dropout, noise and aux losses must run."""
    out = tmp_path / "ddp_methods.json"
    torchrun(WORKER, "ddp_methods", out, cwd=tmp_path)
    report = json.loads(out.read_text())
    assert set(report) == set(METHOD_CONFIGS)
    for method, r in report.items():
        assert r["params_without_grad_single_process"] == [], method  # every parameter takes part
        assert r["max_abs_diff"] < 1e-5, (method, r)
        assert r["moved"] > 1e-3, (method, r)
    assert report["moelora"]["idle_experts"] + report["mosld"]["idle_experts"] + report["teamlora"]["idle_experts"] > 0


def test_fsdp2_meta_init_train_save_load(tmp_path):
    """fully_shard over an adapted tiny Llama built on the meta device (gloo, CPU)."""
    out = tmp_path / "fsdp2.json"
    torchrun(WORKER, "fsdp2", out, cwd=tmp_path)
    report = json.loads(out.read_text())
    assert set(report) == set(METHOD_CONFIGS)
    for method, r in report.items():
        assert r["adapters_on_meta"] and r["dtensor_parameters"] > 0, method
        assert r["init_max_abs_diff"] == 0.0, (method, r)  # reset_parameters() == unsharded init
        assert r["max_abs_diff"] < 1e-5 and r["moved"] > 1e-3, (method, r)
        assert r["load_max_abs_diff"] == 0.0, (method, r)  # saved by rank 0, loaded by both
        assert (tmp_path / f"fsdp_{method}" / "adapter_model.safetensors").exists()


def test_ddp_resume_equals_uninterrupted(fixture_dir, single_run):
    """Stopped after step 3 under torchrun, resumed under torchrun: equals the one-process run."""
    root, folder, tasks = fixture_dir
    run = root / "resumed"
    config = write_config(root / "resumed.yaml", tiny_run_dict(folder, tasks, run))
    torchrun(WORKER, "pipeline", root / "part1.json", config, 3, cwd=root)
    assert (run / "checkpoint-3" / "COMPLETE").exists() and not (run / "checkpoint-6").exists()
    torchrun(WORKER, "pipeline", root / "part2.json", config, cwd=root)
    assert (run / "checkpoint-6" / "COMPLETE").exists()
    assert_same_adapter(adapter(run), adapter(single_run))
    resumed, one = step_losses(run), step_losses(single_run)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(one[step], rel=1e-5), step


def test_accelerate_launch_ddp_equals_one_process(fixture_dir, single_run):
    """`accelerate launch --multi_gpu --num_processes 2 -m mtpeft train` on a CPU-only machine: the
    torchrun launcher; the pipeline sees no GPU and uses gloo. (accelerate 1.15's `--cpu` starts
    several processes only through mpirun; without MPI it runs one process.)"""
    root, folder, tasks = fixture_dir
    config = write_config(root / "acc.yaml", tiny_run_dict(folder, tasks, root / "acc"))
    exe = [str(BIN / "accelerate")] if (BIN / "accelerate").exists() else [sys.executable, "-m",
                                                                            "accelerate.commands.accelerate_cli"]
    cmd = [*exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "mtpeft", "train", str(config), "--no-eval"]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-6000:])
    assert result.stdout.count("mtpeft: run folder") == 2
    assert (root / "acc" / "checkpoint-6" / "rng_state_1.pth").exists()
    assert_same_adapter(adapter(root / "acc"), adapter(single_run))
