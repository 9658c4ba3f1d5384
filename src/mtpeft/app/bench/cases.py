"""What is measured: the two models, their batches, and every variant (the floor, our methods, PEFT's
counterparts, LoRA of equal total rank) as a builder; one train step and its FLOP count."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch

import mtpeft as mt

from .common import N_TASKS


def shared_copy(model):
    """A deep copy that shares every parameter and buffer with ``model`` (base weights are frozen and
    never written in the train benchmark, so the copies can share them: N models, one set of weights)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


@dataclass
class ModelSpec:
    name: str
    batch: int
    seq: int
    loader: Callable[[], Any]
    qv: list[str]  # PEFT target names of the attention query / value projections
    model_type: str


def _load_minilm(classifier: bool = True):
    from transformers import AutoModel, AutoModelForSequenceClassification

    from ..assets import minilm_path

    if classifier:
        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=N_TASKS,
                                                                  dtype=torch.float32)
    return AutoModel.from_pretrained(minilm_path(), dtype=torch.float32)


def _load_smollm2():
    from transformers import AutoModelForCausalLM

    from ..assets import smollm2_path

    return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)


MODELS = {
    "minilm": ModelSpec("minilm", 16, 128, _load_minilm, ["query", "value"], "bert"),
    "smollm2": ModelSpec("smollm2", 4, 128, _load_smollm2, ["q_proj", "v_proj"], "llama"),
}


def make_batch(spec: ModelSpec, vocab: int, batch: int, seq: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if spec.model_type == "bert":
        out["labels"] = torch.randint(0, N_TASKS, (batch,), generator=g)
    else:
        out["labels"] = ids.clone()
    return out


def task_ids_for(batch: int, mode: str):
    if mode == "mixed":
        return torch.arange(batch) % N_TASKS
    return torch.zeros(batch, dtype=torch.long)


@dataclass
class Variant:
    """One configuration of the train / infer benchmarks."""

    name: str
    kind: str  # "floor" | "ours" | "peft" | "base"
    build: Callable[[Any], Any]  # base model (a shared copy) -> runnable model
    task_mode: str | None = None  # "mixed" | "single" | None (no task ids)
    lora_ref: str | None = None  # name of our LoRA of equal total rank
    peft_ref: str | None = None  # name of PEFT's counterpart
    routing: str = ""  # "token" | "task" | "" (LoRA / floor)
    note: str = ""
    labels: str = "all"  # "all": LM loss on every token; "answers" / "answers_kept": on the last few only


ANSWER_TOKENS = 4  # the "answers" batches: loss on each row's last 4 tokens, as on a short answer


def batch_for(batch: dict, variant: Variant) -> dict:
    """The benchmark batch, with the labels a variant trains on (a causal LM's loss on a short answer,
    with all logits computed, or only those the loss reads)."""
    if variant.labels == "all":
        return batch
    from ..data.collate import IGNORE_INDEX
    from ..label_logits import keep_label_logits

    labels = batch["labels"].clone()
    labels[:, :-ANSWER_TOKENS] = IGNORE_INDEX
    answers = {**batch, "labels": labels}
    return keep_label_logits(answers) if variant.labels == "answers_kept" else answers


def target_regex(model, role: str) -> str:
    from ...lib.core.targets import default_target_regex

    return default_target_regex(model, role)


def build_floor(base):
    """Every base weight frozen; the embedding output requires grad so backward runs through all layers."""
    for p in base.parameters():
        p.requires_grad_(False)
    emb = base.get_input_embeddings()
    emb.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
    return base


def build_ours(config_fn: Callable[[Any], Any], loop: bool = False):
    def build(base):
        model = mt.get_model(base, config_fn(base))
        if loop:  # the papers' way: a Python loop over experts (the layer's reference implementation)
            for _, layer in model.adapted_layers():
                layer.adapter_forward = (lambda x, route, _l=layer: _l.reference_forward(x, route))
        return model

    return build


def build_peft_lora(targets: list[str], r: int = 8, alpha: float = 16, n_adapters: int = 1):
    def build(base):
        import peft

        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))
        model = peft.get_peft_model(base, cfg, adapter_name="t0")
        for t in range(1, n_adapters):
            model.add_adapter(f"t{t}", peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                       target_modules=list(targets)))
        return model

    return build


def build_peft_poly(targets: list[str], n_splits: int):
    def build(base):
        import peft

        cfg = peft.PolyConfig(r=8, n_tasks=N_TASKS, n_skills=4, n_splits=n_splits, target_modules=list(targets))
        # The PolyModel itself: its forward takes task_ids (PeftModel's generic forward drops them).
        return peft.get_peft_model(base, cfg).base_model

    return build


def mosld_equal_rank(base) -> int:
    """Our LoRA of equal total rank for MoSLD's per-layer schedule: mean over adapted layers of E_l·r."""
    cfg = mt.MoSLDConfig(n_tasks=N_TASKS)
    n_layers = getattr(base.config, "num_hidden_layers")
    ranks = [cfg.experts_for_layer(i, n_layers) * cfg.r for i in range(n_layers)]
    return round(sum(ranks) / len(ranks))


def registry_variants(names: list[str], have: set[str]) -> list[Variant]:
    """A case for each registered method in ``names`` that the curated list (``_curated_variants``) does
    not hold (e.g. one a user or a test registered, named with ``--methods``): its config at its defaults, mixed task batches,
    compared with our LoRA r=8."""
    from ...lib.config import get_method_spec

    out = []
    for name in names:
        spec = get_method_spec(name)  # an unknown name is an error listing the known ones
        if name in have or spec.routing == "none":
            continue
        extra = {"n_tasks": N_TASKS}
        out.append(Variant(name, "ours", build_ours(lambda b, spec=spec: spec.config_class(**extra)), "mixed",
                           "lora_r8", routing=spec.routing, note="registered method at its defaults"))
    return out


def train_variants(spec: ModelSpec, base, quick: bool, methods: list[str] | None = None) -> list[Variant]:
    """The train / memory cases: the curated list below, plus :func:`registry_variants` for ``methods``."""
    v = _curated_variants(spec, base, quick)
    return v + registry_variants(list(methods or []), {x.name for x in v})


def _curated_variants(spec: ModelSpec, base, quick: bool) -> list[Variant]:
    qv = spec.qv
    mlp = target_regex(base, "mlp")
    qkvo = target_regex(base, "attention_all")
    r_mosld = mosld_equal_rank(base)

    def lora(r, targets=None):
        return build_ours(lambda b: mt.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))

    v = [
        Variant("floor", "floor", build_floor),
        Variant("lora_r8", "ours", lora(8), peft_ref="peft_lora_r8"),
        Variant("peft_lora_r8", "peft", build_peft_lora(qv)),
        Variant("moelora", "ours", build_ours(lambda b: mt.MoELoraConfig(n_tasks=N_TASKS)), "mixed", "lora_r32",
                routing="token", note="E=8 top-2 r_e=4, dropout 0.05, balance + contrastive losses"),
        Variant("lora_r32", "ours", lora(32)),
    ]
    if quick:
        return v + [
            Variant("task_lora", "ours", build_ours(lambda b: mt.TaskLoraConfig(r=8, n_tasks=N_TASKS)), "mixed",
                    "lora_r8", routing="task"),
        ]
    v += [
        Variant("moelora_loop", "ours", build_ours(lambda b: mt.MoELoraConfig(n_tasks=N_TASKS), loop=True), "mixed",
                "lora_r32", routing="token", note="MoELoRA's reference loop over experts (no aux losses): the papers' code"),
        Variant("mosld", "ours", build_ours(lambda b: mt.MoSLDConfig(n_tasks=N_TASKS)), "mixed", f"lora_r{r_mosld}",
                routing="token", note="r=8, E=(2,4,6,8) by quarter, top-2, DropConnect 0.1"),
        Variant("hydralora", "ours", build_ours(lambda b: mt.HydraLoraConfig(n_tasks=N_TASKS)), "mixed", "lora_r32",
                routing="token", note="E=4 heads, r=8, dropout 0.05"),
        Variant("teamlora", "ours", build_ours(lambda b: mt.TeamLoraConfig(n_tasks=N_TASKS)), "mixed",
                "lora_mlp_r32", routing="token", note="E=4, r_B=8 on the MLP, dropout 0.05"),
        Variant("task_lora", "ours", build_ours(lambda b: mt.TaskLoraConfig(r=8, n_tasks=N_TASKS)), "mixed",
                "lora_r8", routing="task"),
        Variant("task_lora@single", "ours", build_ours(lambda b: mt.TaskLoraConfig(r=8, n_tasks=N_TASKS)), "single",
                "lora_r8", routing="task"),
        Variant("mtl_lora", "ours", build_ours(lambda b: mt.MTLLoraConfig(n_tasks=N_TASKS)), "mixed",
                "lora_qkvo_r8", routing="task", note="r=8, n=3, q,k,v,o, dropout 0.05"),
        Variant("mtl_lora@single", "ours", build_ours(lambda b: mt.MTLLoraConfig(n_tasks=N_TASKS)), "single",
                "lora_qkvo_r8", routing="task"),
        Variant("poly", "ours", build_ours(lambda b: mt.PolyConfig(r=8, n_skills=4, n_tasks=N_TASKS)), "mixed",
                "lora_r8", "peft_poly", routing="task", note="r=8, S=4"),
        Variant("poly@single", "ours", build_ours(lambda b: mt.PolyConfig(r=8, n_skills=4, n_tasks=N_TASKS)),
                "single", "lora_r8", routing="task"),
        Variant("peft_poly", "peft", build_peft_poly(qv, 1), "mixed"),
        Variant("mhr", "ours", build_ours(lambda b: mt.PolyConfig(r=8, n_skills=4, n_splits=4, n_tasks=N_TASKS)),
                "mixed", "lora_r8", "peft_mhr", routing="task", note="r=8, S=4, h=4"),
        Variant("peft_mhr", "peft", build_peft_poly(qv, 4), "mixed"),
        Variant("cpoly", "ours", build_ours(lambda b: mt.CPolyConfig(n_tasks=N_TASKS)), "mixed", "lora_r2",
                routing="task", note="r=2, S=3 common + 1 exclusive"),
        Variant("cpoly@single", "ours", build_ours(lambda b: mt.CPolyConfig(n_tasks=N_TASKS)), "single", "lora_r2",
                routing="task"),
        Variant(f"lora_r{r_mosld}", "ours", lora(r_mosld)),
        Variant("lora_mlp_r32", "ours", lora(32, mlp)),
        Variant("lora_qkvo_r8", "ours", lora(8, qkvo)),
        Variant("lora_r2", "ours", lora(2)),
    ]
    if spec.model_type != "bert":
        v += [
            Variant("lora_r8@answers_kept", "ours", lora(8), lora_ref="lora_r8@answers", labels="answers_kept",
                    note=f"loss on the last {ANSWER_TOKENS} tokens, logits there only; vs its full-logits twin"),
            Variant("lora_r8@answers", "ours", lora(8), labels="answers",
                    note=f"loss on the last {ANSWER_TOKENS} tokens, logits everywhere"),
        ]
    return v


def _forward_kwargs(batch: dict, variant: Variant, with_labels: bool = True) -> dict:
    kw = dict(batch) if with_labels else {k: v for k, v in batch.items() if k != "labels"}
    if variant.task_mode is not None:
        kw["task_ids"] = task_ids_for(batch["input_ids"].shape[0], variant.task_mode)
    return kw


def train_step_fn(model, batch: dict, variant: Variant) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    kwargs = _forward_kwargs(batch, variant)

    def step():
        out = model(**kwargs)
        out.loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def count_flops(fn: Callable[[], None]) -> int:
    """Matmul and attention FLOPs of one call (torch's FlopCounterMode; it has no formula for the CPU
    flash-attention kernels, so those are added here)."""
    from torch.utils.flop_counter import (
        FlopCounterMode,
        sdpa_backward_flop_count,
        sdpa_flop_count,
    )

    def fwd(query, key, value, *args, out_val=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_val=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
