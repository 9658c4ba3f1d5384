"""Entry point that tests/test_distributed.py runs under ``torchrun --nproc_per_node=2`` (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py MODE OUT.json [ARGS]

Modes (rank 0 writes a JSON report to OUT.json; a failed check raises, so the job fails):

* ``ddp_methods``: every method on a tiny Llama wrapped in DDP with ``find_unused_parameters=False``,
  batches in which a task is absent on one rank (or on both) and top-1 routing leaves experts idle.
  In eval mode (no dropout / noise / aux loss) the DDP parameters after 3 AdamW steps must equal a
  single-process model trained on the global batch; then 3 train-mode steps (dropout, Gumbel noise,
  aux losses) must simply run (DDP raises on the next step when a parameter got no gradient).
* ``fsdp2``: base + adapters built on the meta device, ``fully_shard`` per decoder layer and root,
  materialised with adapters initialised by ``reset_parameters()``; the initial adapters, and the
  adapters after 3 steps, must equal the unsharded single-process model; save from rank 0, load in
  every rank.
* ``pipeline CONFIG [STOP_AT]``: ``train_run`` of a run config, optionally stopped after STOP_AT steps
  (for the resume test).
* ``cli CONFIG``: ``mtpeft train CONFIG --no-eval`` through the command line's ``main``; reports its
  exit code and whether the process group still exists once the command has returned.

Also importable: ``make_fixture(root)`` builds the tiny encoder folder and two json tasks the pipeline
tests train on.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

N_TASKS = 3
METHOD_OVERRIDES = {
    # small ranks; top_k=1 over 4 experts so that some experts get no token in a step (a method not
    # named here runs at its defaults)
    "lora": dict(r=4, lora_dropout=0.1),
    "task_lora": dict(r=4, lora_dropout=0.1),
    "mtl_lora": dict(r=4, n_up=3, lora_dropout=0.1),
    "poly": dict(r=2, n_skills=4),
    "cpoly": dict(r=2, n_skills=3, n_exclusive=1),
    "moelora": dict(r=2, n_experts=4, top_k=1, lora_dropout=0.1, contrastive_sample_size=8),
    "mosld": dict(r=4, expert_schedule="flat", n_experts=4, top_k=1, dropconnect=0.1),
    "teamlora": dict(r=2, n_experts=4, lora_dropout=0.1),
    "hydralora": dict(r=4, n_experts=4, lora_dropout=0.1),
}


def _package_methods() -> list[str]:
    from mtpeft.lib.config import package_methods

    return package_methods()


# Every method the package registers (the registry, not a hand-kept list), with the overrides above.
METHOD_CONFIGS = {m: METHOD_OVERRIDES.get(m, {}) for m in _package_methods()}
# Global batches of 4 rows; rank 0 takes rows 0-1, rank 1 rows 2-3. Task 2 never appears in the
# first step, task 0 is absent from rank 1 in the second, rank 0 sees only task 1 in the third.
TASK_IDS = [[0, 1, 0, 1], [0, 2, 1, 1], [1, 1, 0, 2]]
STEPS = len(TASK_IDS)


# ----------------------------------------------------------------------------------- fixtures
def make_fixture(root) -> tuple[Path, list[dict]]:
    """A 2-layer BERT (hidden 32, dropout 0) with MiniLM's tokenizer, and two small json tasks."""
    from transformers import BertConfig, BertModel

    from mtpeft.app.assets import minilm_path

    root = Path(root)
    folder = root / "tiny_bert"
    folder.mkdir(parents=True, exist_ok=True)
    src = Path(minilm_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, architectures=["BertModel"])
    BertModel(config).save_pretrained(folder)
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "red", "green", "blue", "cat", "dog", "fish", "tree"]
    tasks = []
    for t, n_labels in enumerate([2, 3]):
        rows = []
        for _ in range(40):
            label = rng.randrange(n_labels)
            rows.append({"text": " ".join(rng.choice(words) for _ in range(5)) + " " + words[label + 3 * t],
                         "label": label})
        path = root / f"task{t}.json"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        tasks.append({"name": f"task{t}", "source": f"json:{path}", "labels": [str(i) for i in range(n_labels)]})
    return folder, tasks


def tiny_run_dict(folder, tasks, out, method="task_lora", steps=6, batch_size=4, **adapter) -> dict:
    """A run config for the tiny fixture (dropout 0 everywhere, so ranks' RNGs do not matter)."""
    return {
        "method": method, "adapter": {"r": 4, **adapter}, "output_dir": str(out),
        "model": {"name": str(folder), "kind": "encoder", "max_length": 16},
        "data": {"tasks": tasks, "max_eval_examples": 8},
        "train": {"steps": steps, "batch_size": batch_size, "lr": 1e-2, "logging_steps": 1, "save_steps": 3,
                  "warmup_ratio": 0.0, "threads": 1},
    }


# ----------------------------------------------------------------------------------- helpers
AUX_WEIGHTS = ("balance_weight", "contrastive_weight")


def _config(method: str, aux: bool = True):
    """The method's config; ``aux=False`` zeroes the aux-loss weights. Aux losses (load balance,
    contrastive) are computed per process over its own tokens, as in every MoE implementation, and
    are not linear in the batch, so the exact DDP == one-process comparisons run without them."""
    import dataclasses

    from mtpeft.lib.config import get_config_class

    cls = get_config_class(method)
    fields = dict(METHOD_CONFIGS[method], n_tasks=N_TASKS)
    if not aux:
        fields.update({f.name: 0.0 for f in dataclasses.fields(cls) if f.name in AUX_WEIGHTS})
    return cls(**fields)


def _batch(step: int):
    from tiny_models import batch_for

    b = batch_for("llama", batch=4, seq=6, seed=step)
    b["attention_mask"] = torch.ones_like(b["input_ids"])  # equal token counts on both ranks
    b["labels"] = b["input_ids"].clone()
    b["task_ids"] = torch.tensor(TASK_IDS[step % STEPS])
    return b


def _rows(batch: dict, rank: int, world: int) -> dict:
    per = batch["input_ids"].shape[0] // world
    return {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}


def _adapter_tensors(model) -> dict[str, torch.Tensor]:
    from mtpeft.lib.distributed import full_adapter_state_dict

    return full_adapter_state_dict(model)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _build(method: str, seed: int = 0, aux: bool = False):
    import mtpeft
    from tiny_models import tiny_llama

    base = tiny_llama(seed=0)
    torch.manual_seed(seed)
    return mtpeft.get_model(base, _config(method, aux))


def _idle_experts(model) -> int:
    """(layer, expert) pairs that got no token in the model's last forward (token-routed methods)."""
    return sum(int((stats["topk_count"] == 0).sum()) for stats in model.router_stats().values()
               if "topk_count" in stats)


def _train(model, step_model, batches, world, rank, sgd=True):
    """A few steps on this rank's rows of each global batch. SGD for the exact comparisons: AdamW
    divides by sqrt(v), which blows float rounding in a near-zero gradient (e.g. a top-1 router, whose
    renormalised gate is 1 whatever the logits) up to a step of size lr."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5) if sgd else torch.optim.AdamW(params, lr=1e-2)
    for batch in batches:
        rows = _rows(batch, rank, world)
        loss = step_model(**rows).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


# ----------------------------------------------------------------------------------- modes
def gloo_threads() -> list[str]:
    """Names of this process's gloo threads (its worker and socket-loop threads), from /proc."""
    tasks = Path("/proc/self/task")
    names = [(tasks / t / "comm").read_text().strip() for t in os.listdir(tasks)]
    return sorted(n for n in names if "gloo" in n)


def leave_process_group() -> None:
    """Every rank leaves the process group and checks that no gloo thread is left to die during
    interpreter shutdown (what made these jobs abort now and then with SIGABRT: see
    mtpeft.lib.distributed.destroy_distributed). The caller has dropped its models by now."""
    from mtpeft.lib.distributed import destroy_distributed

    destroy_distributed()
    left = gloo_threads()
    if left:
        raise RuntimeError(f"gloo threads still running after destroy_distributed(): {left}; something still "
                           f"references the process group.")


def ddp_methods(out: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mtpeft.lib.distributed import destroy_distributed, init_distributed, is_main_process, rank, world_size

    init_distributed("gloo")
    r, world = rank(), world_size()
    report = {}
    for method in METHOD_CONFIGS:
        started = time.perf_counter()
        reference = _build(method)
        initial = _adapter_tensors(reference)
        model = copy.deepcopy(reference)
        # Which adapter parameters does a one-process backward leave without a gradient, on rank 0's
        # rows of the first batch (task 2 absent) with top-1 routing? None would break DDP.
        probe = _build(method, aux=True).train()
        probe(**_rows(_batch(0), 0, 2)).loss.backward()
        no_grad = [n for n, p in probe.named_parameters() if p.requires_grad and p.grad is None]
        idle = _idle_experts(probe)

        ddp = DDP(model, find_unused_parameters=False)
        model.eval(), reference.eval()  # exact comparison: no dropout, no Gumbel noise
        batches = [_batch(s) for s in range(STEPS)]
        _train(model, ddp, batches, world, r)
        _train(reference, reference, batches, 1, 0)
        final = _adapter_tensors(reference)
        diff = _max_diff(_adapter_tensors(model), final)

        # Everything random and every aux loss on: it only has to run (without find_unused_parameters
        # DDP raises on the step after a parameter got no gradient, or hangs).
        noisy = _build(method, aux=True).train()
        _train(noisy, DDP(noisy, find_unused_parameters=False), [_batch(s) for s in range(2 * STEPS)], world, r,
               sgd=False)
        dist.barrier()
        report[method] = {"max_abs_diff": diff, "moved": _max_diff(final, initial),
                          "params_without_grad_single_process": no_grad, "idle_experts": idle,
                          "seconds": round(time.perf_counter() - started, 2)}
    if is_main_process():
        out.write_text(json.dumps(report, indent=2))
    # DDP's reducers keep this gloo group alive past destroy_process_group whatever we drop here, so
    # this mode does not check for leftover threads (fsdp2 does); it has not been seen to abort.
    destroy_distributed()


FSDP_METHODS = list(METHOD_CONFIGS)  # every package method


def fsdp2(out: Path) -> None:
    from transformers import LlamaForCausalLM

    import mtpeft
    from mtpeft.lib.distributed import (init_distributed, is_main_process, load_adapter_weights, materialize_sharded,
                                    rank, save_adapter, shard_model, world_size)
    from tiny_models import tiny_llama

    init_distributed("gloo")
    r, world = rank(), world_size()
    report = {}
    for method in FSDP_METHODS:
        started = time.perf_counter()
        reference = _build(method, seed=1)  # unsharded, single process, adapters from seed 1
        full = tiny_llama(seed=0)
        base_weights = {**full.state_dict(), **dict(full.named_buffers())}  # + rotary inv_freq
        with torch.device("meta"):
            base = LlamaForCausalLM(full.config)
        model = mtpeft.get_model(base, _config(method, aux=False))
        on_meta = all(p.is_meta for _, layer in model.adapted_layers() for p in layer.parameters(recurse=False))
        shard_model(model)
        torch.manual_seed(1)
        materialize_sharded(model, "cpu", base_weights)
        initial = _adapter_tensors(reference)
        init_diff = _max_diff(_adapter_tensors(model), initial)
        sharded = sum(type(p).__name__ == "DTensor" for p in model.parameters())
        model.eval(), reference.eval()
        batches = [_batch(s) for s in range(STEPS)]
        _train(model, model, batches, world, r)
        _train(reference, reference, batches, 1, 0)
        final = _adapter_tensors(reference)
        diff = _max_diff(_adapter_tensors(model), final)
        model.train()
        _train(model, model, [_batch(s) for s in range(STEPS, 2 * STEPS)], world, r, sgd=False)

        folder = out.parent / f"fsdp_{method}"
        save_adapter(model, folder)  # rank 0 writes, every rank returns after
        saved = _adapter_tensors(model)
        with torch.device("meta"):
            other = mtpeft.get_model(LlamaForCausalLM(full.config), _config(method, aux=False))
        shard_model(other)
        torch.manual_seed(123)
        materialize_sharded(other, "cpu", base_weights)
        load_adapter_weights(other, folder)  # every rank reads the file, keeps its shard
        load_diff = _max_diff(_adapter_tensors(other), saved)
        report[method] = {"adapters_on_meta": on_meta, "dtensor_parameters": sharded, "init_max_abs_diff": init_diff,
                          "max_abs_diff": diff, "moved": _max_diff(final, initial), "load_max_abs_diff": load_diff,
                          "seconds": round(time.perf_counter() - started, 2)}
    if is_main_process():
        out.write_text(json.dumps(report, indent=2))
    del reference, base, model, other  # sharded modules hold the process group (see leave_process_group)
    leave_process_group()


def pipeline(out: Path, config: str, stop_at: str | None = None) -> None:
    from transformers import TrainerCallback

    from mtpeft.app.pipeline import train_run
    from mtpeft.app.run_config import load_run_config

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(stop_at):
                control.should_training_stop = True

    run = load_run_config(config)
    train_run(run, evaluate=False, log=lambda *a: None, callbacks=[StopAt()] if stop_at else None)
    from mtpeft.lib.distributed import is_main_process

    if is_main_process():
        out.write_text(json.dumps({"ok": True}))


def cli(out: Path, config: str) -> None:
    import torch.distributed as dist

    from mtpeft.app.cli import main

    code = main(["train", config, "--no-eval"])
    if os.environ.get("RANK") == "0":  # the group is gone: rank from the launcher's environment
        out.write_text(json.dumps({"code": code, "in_process_group": dist.is_initialized()}))


if __name__ == "__main__":
    mode, target, *rest = sys.argv[1:]
    torch.set_num_threads(1)
    {"ddp_methods": ddp_methods, "fsdp2": fsdp2, "pipeline": pipeline, "cli": cli}[mode](Path(target), *rest)
