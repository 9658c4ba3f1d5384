"""Distilled export: the fixed low-rank update that best reproduces a token-routed adapter on a task's inputs.

A token-routed layer's update δ(x) depends on x through its router, so no fixed matrix is exact
(METHODS.md §10). Per adapted layer, over calibration rows x (padding excluded) with the adapter's
eval-mode output y = δ(x), we accumulate in float64, streamed (one pass, O(d_in² + d_out·d_in)):

    G = Σ x xᵀ  (d_in, d_in),     H = Σ y xᵀ  (d_out, d_in),     Σ‖y‖²,     n rows

and fit
    ΔW = argmin_W ‖Y − X Wᵀ‖²_F + λ‖W‖²_F = H (G + λI)⁻¹,     λ = ridge · tr(G) / d_in.

Rank-R truncation in the data norm: with L Lᵀ = G + λI (Cholesky), ‖Y − X Wᵀ‖² + λ‖W‖² equals a constant
plus ‖(W − ΔW) L‖²_F, so the best rank-R W comes from the SVD ΔW L = U S Vᵀ:

    B = U_R S_R  (d_out, R),     A = V_Rᵀ L⁻¹  (R, d_in)      (a triangular solve, no inverse)

and each rank-1 term is then balanced (‖B_{:,i}‖ = ‖A_{i,:}‖, same product; see data_norm_truncate).

Baseline "routing folded": ΔW = Σ_e ḡ_e B_e A_e with ḡ_e the mean eval gate of expert e over the same
rows (exact only if routing were constant over them), then the same truncation.

Fidelity on held-out rows (their own G_h, H_h, Σ‖y‖²), without storing rows:
    ‖Y − X Wᵀ‖²_F = Σ‖y‖² − 2 tr(W H_hᵀ) + tr(W G_h Wᵀ),   relative error = sqrt(that / Σ‖y‖²).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .config import spec_of
from .core.context import Route
from .core.layer import AdaptedLayer
from .core.routing import token_task_ids
from .export import check_target_folder, write_peft_lora

MODES = ("least_squares", "routing_folded")
DEFAULT_RIDGE = 1e-6


@dataclass
class LayerStatistics:
    """Streamed sums over the rows one adapted layer saw (float64)."""

    gram: torch.Tensor  # G = Σ x xᵀ (d_in, d_in)
    cross: torch.Tensor  # H = Σ δ(x) xᵀ (d_out, d_in)
    output_sq: float = 0.0  # Σ ‖δ(x)‖²
    rows: int = 0
    gate_sum: torch.Tensor | None = None  # Σ g(x) (E,), token-routed layers only

    @classmethod
    def empty(cls, d_in: int, d_out: int, device=None) -> "LayerStatistics":
        zeros = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros(d_in, d_in, **zeros), torch.zeros(d_out, d_in, **zeros))

    def add(self, x: torch.Tensor, y: torch.Tensor, gates: torch.Tensor | None) -> None:
        """x (N, d_in), y (N, d_out), gates (N, E) or None."""
        x, y = x.double(), y.double()
        self.gram.addmm_(x.T, x)
        self.cross.addmm_(y.T, x)
        self.output_sq += float((y * y).sum())
        self.rows += x.shape[0]
        if gates is not None:
            g = gates.double().sum(0)
            self.gate_sum = g if self.gate_sum is None else self.gate_sum + g


def _selected_rows(layer: AdaptedLayer, x: torch.Tensor, route: Route, task: int | None) -> torch.Tensor:
    """(N,) bool over x's flattened rows: real tokens (not padding) of ``task`` (all tasks when None)."""
    n = x.numel() // x.shape[-1]
    keep = torch.ones(n, dtype=torch.bool, device=x.device)
    mask = route.token_mask
    given = layer.routing._mask_of_stream(x, layer.token_stream)  # the mask of the tokens this layer sees
    if mask is None and given is not None:
        if given.numel() == n:  # a layer that sees (batch·seq, d) flattened rows
            mask = given
        elif not bool(given.bool().all()):
            raise ValueError(
                f"{layer.module_name}: its input {tuple(x.shape)} cannot be aligned with the padding mask "
                f"{tuple(given.shape)}, so padding rows cannot be excluded; calibrate with unpadded batches.")
    if mask is not None:
        keep &= mask.reshape(-1).to(device=x.device, dtype=torch.bool)
    if task is not None:
        ids = token_task_ids(route, x.shape[:-1])
        if ids is None:
            raise ValueError(f"task={task} was given but the calibration batches carry no task_ids; add "
                             f"task_ids to each batch or pass task=None to pool every row.")
        keep &= ids.to(x.device) == task
    return keep


@contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def collect_statistics(model, batches: Iterable[dict], task: int | None = None) -> dict[str, LayerStatistics]:
    """Run ``model`` (a MultiTaskModel) in eval mode over ``batches`` (model input dicts) and return each
    adapted layer's streamed statistics. δ(x) is the layer's own eval-mode update (``adapter_forward``,
    the same product ``add_delta`` adds to the base output); no aux losses or statistics are recorded."""
    layers = model.adapted_layers()
    for name, layer in layers:
        if layer.merged or not layer.adapters_enabled:
            raise ValueError(f"{name} is merged or disabled, so its adapter output cannot be observed; "
                             f"call model.unmerge() (and leave disable_adapters) before distilling.")
    stats = {name: LayerStatistics.empty(layer.in_features, layer.out_features, layer.weight.device)
             for name, layer in layers}

    def hook(layer: AdaptedLayer, args, output):
        x = args[0]
        route = layer.routing.route_for(x, layer.token_stream)  # a T5 decoder layer: the decoder's mask
        keep = _selected_rows(layer, x, route, task)
        quiet = Route(route.row_task_ids, route.token_mask, record=False)
        y = layer.adapter_forward(x.to(layer.adapter_dtype), quiet)  # (..., d_out)
        x2d = x.reshape(-1, x.shape[-1])[keep]  # (N, d_in)
        gates = layer.expert_gates(x2d.to(layer.adapter_dtype)) if distilled(layer) else None
        stats[layer.module_name].add(x2d, y.reshape(-1, y.shape[-1])[keep], gates)

    handles = [layer.register_forward_hook(hook) for _, layer in layers]
    try:
        with _eval_mode(model):
            for batch in batches:
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return stats


# ----------------------------------------------------------------------------------------- the fit


def ridge_value(gram: torch.Tensor, ridge: float) -> float:
    """λ = ridge · tr(G)/d_in (relative to the mean input energy; ``ridge`` itself if G = 0)."""
    scale = float(torch.trace(gram)) / gram.shape[0]
    return ridge * scale if scale > 0 else ridge


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, lam: float) -> torch.Tensor:
    """ΔW = H (G + λI)⁻¹ (d_out, d_in), by Cholesky (G + λI is symmetric positive definite for λ > 0)."""
    chol = _cholesky(gram, lam)
    return torch.cholesky_solve(cross.T, chol).T  # (G + λI) Wᵀ = Hᵀ


def _cholesky(gram: torch.Tensor, lam: float) -> torch.Tensor:
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.cholesky(gram + lam * eye)


def data_norm_truncate(delta: torch.Tensor, gram: torch.Tensor, lam: float,
                       rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (R, d_in), B (d_out, R)) minimising ‖(B A − ΔW) L‖_F with L Lᵀ = G + λI: SVD of ΔW L = U S Vᵀ,
    B = U_R S_R, A = V_Rᵀ L⁻¹ (solved as Lᵀ Aᵀ = V_R), then each rank-1 term rescaled so that column i of B
    and row i of A have equal norms (B A unchanged).

    Why the rescaling: L grows as √(rows), so U S grows and V L⁻¹ shrinks with the calibration size; on
    a tiny model with 300 rows |B| reached 2.5e5 (beyond fp16's 65504) with |A| ~ 10. Balanced factors do
    not depend on the number of rows and keep merged and unmerged serving equal in low precision."""
    chol = _cholesky(gram, lam)  # L, lower
    u, s, vh = torch.linalg.svd(delta @ chol, full_matrices=False)
    b = u[:, :rank] * s[:rank]  # (d_out, R)
    a = torch.linalg.solve_triangular(chol.T, vh[:rank].T, upper=True).T  # (R, d_in)
    norm_a, norm_b = a.norm(dim=1), b.norm(dim=0)  # (R,) each
    factor = torch.where((norm_a > 0) & (norm_b > 0), (norm_a / norm_b.clamp_min(1e-300)).sqrt(),
                         torch.ones_like(norm_a))
    return a / factor[:, None], b * factor


def output_error(a: torch.Tensor, b: torch.Tensor, stats: LayerStatistics) -> float | None:
    """‖Y − X (BA)ᵀ‖_F / ‖Y‖_F over the rows ``stats`` summarises; None when Y = 0 and the fit is not 0."""
    w = b.double() @ a.double()  # (d_out, d_in)
    err = stats.output_sq - 2 * float((w * stats.cross).sum()) + float(((w @ stats.gram) * w).sum())
    err = max(err, 0.0)  # rounding can make a perfect fit's error slightly negative
    if stats.output_sq <= 0:
        return 0.0 if err <= 1e-24 else None
    return math.sqrt(err / stats.output_sq)


def distilled(layer: AdaptedLayer) -> bool:
    """Whether the layer's method ships through this distillation (its MethodSpec's export is
    "distilled": the layer has ``expert_gates`` / ``expert_factors``) rather than exactly."""
    return spec_of(layer.config).export == "distilled"


def default_rank(layer: AdaptedLayer, task: int | None) -> int:
    """The layer's total adapter rank (Σ_e rank of expert e: TeamLoRA E·r_B, MoELoRA E·r_e, MoSLD /
    HydraLoRA E·r of that layer; a mergeable layer's LoRA rank), capped at min(d_in, d_out)."""
    if distilled(layer):
        total = sum(a.shape[0] for a, _ in layer.expert_factors())
    else:
        total = layer.lora_factors(task)[0].shape[0]
    return min(total, layer.in_features, layer.out_features)


@torch.no_grad()
def routing_folded_update(layer: AdaptedLayer, stats: LayerStatistics) -> torch.Tensor:
    """ΔW = Σ_e ḡ_e B_e A_e (d_out, d_in) with ḡ the mean eval gate over the calibration rows."""
    if not distilled(layer):
        raise ValueError(f"{layer.module_name}: routing_folded needs a token-routed layer; "
                         f"{layer.config.method} is exported exactly with export_lora().")
    mean_gate = stats.gate_sum / stats.rows  # (E,)
    delta = torch.zeros_like(stats.cross)  # (d_out, d_in) fp64
    for g, (a, b) in zip(mean_gate.tolist(), layer.expert_factors()):
        delta += g * (b.double() @ a.double())
    return delta


def check_rank(rank: int | None, layers) -> None:
    if rank is None:
        return
    limit = min(min(layer.in_features, layer.out_features) for _, layer in layers)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(f"rank={rank!r} is out of range: use 1 <= rank <= {limit} (min(d_in, d_out) over "
                         f"the adapted layers), or leave it unset for each layer's total adapter rank.")


@dataclass
class Distillation:
    """What :func:`distill_lora` produced: the folder, the factors written, and the fidelity report."""

    path: Path
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    fidelity: dict = field(default_factory=dict)


@torch.no_grad()
def fit_factors(model, calibration: dict[str, LayerStatistics], *, task: int | None, rank: int | None,
                ridge: float, mode: str) -> tuple[dict, dict]:
    """Per layer (A, B) in fp32 and its fit details (R, λ). ``rank``: one R for every layer, a mapping
    layer name -> R, or None for each layer's total adapter rank."""
    factors, details = {}, {}
    for name, layer in model.adapted_layers():
        stats = calibration[name]
        if stats.rows == 0:
            raise ValueError(f"no calibration rows reached {name} (every row was padding or another task); "
                             f"give calibration examples of the task.")
        lam = ridge_value(stats.gram, ridge)
        if mode == "least_squares":
            delta = ridge_solve(stats.gram, stats.cross, lam)
        else:
            delta = routing_folded_update(layer, stats)
        if isinstance(rank, Mapping):  # R per layer (a study scaling each layer's own total rank)
            r = rank[name]
        else:
            r = rank if rank is not None else default_rank(layer, task)
        a, b = data_norm_truncate(delta, stats.gram, lam, r)
        factors[name] = (a.float(), b.float())
        details[name] = {"rank": r, "ridge_lambda": lam}
    return factors, details


def _check_arguments(model, mode: str, rank, ridge) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES}.")
    if not (isinstance(ridge, (int, float)) and ridge > 0):
        raise ValueError(f"ridge={ridge!r} must be a positive number (λ = ridge · tr(G)/d_in).")
    check_rank(rank, model.adapted_layers())


def distill_lora(model, path, batches: Iterable[dict], *, task: int | None = None, rank: int | None = None,
                 ridge: float = DEFAULT_RIDGE, held_out: Iterable[dict] | None = None,
                 mode: str = "least_squares", metadata: dict | None = None, log=print) -> Distillation:
    """Fit and write a plain PEFT LoRA folder that reproduces ``model``'s adapter on ``batches``.

    Args:
        batches: model input dicts (with ``task_ids`` when ``task`` is given or the model needs them).
        task: count only rows of this task id (None: every row, one LoRA for the mixture).
        rank: R for every layer (default: each layer's total adapter rank, capped at min(d_in, d_out)).
        ridge: λ relative to tr(G)/d_in.
        held_out: batches of the same task for the reported error (default: the calibration batches,
            which the report then says).
        mode: "least_squares" (the fit) or "routing_folded" (the mean-gate baseline).
        metadata: extra keys for fidelity.json (e.g. the task's name and test metrics).
    """
    _check_arguments(model, mode, rank, ridge)
    out = Path(path)
    check_target_folder(out)
    calibration = collect_statistics(model, batches, task)
    factors, details = fit_factors(model, calibration, task=task, rank=rank, ridge=ridge, mode=mode)
    report = fidelity_report(model, factors, details, calibration,
                             collect_statistics(model, held_out, task) if held_out is not None else None,
                             mode=mode, task=task, ridge=ridge)
    report.update(metadata or {})
    write_distilled_folder(model, out, factors, report, task=task)
    log(fidelity_line(report))
    return Distillation(out, factors, report)


def fidelity_report(model, factors, details, calibration, held_out, *, mode, task, ridge) -> dict:
    evaluated_on = "held_out" if held_out is not None else "calibration"
    held_out = held_out if held_out is not None else calibration
    layers = {}
    for name, (a, b) in factors.items():
        layers[name] = {**details[name], "error": output_error(a, b, held_out[name]),
                        "calibration_error": output_error(a, b, calibration[name])}
    errors = [v["error"] for v in layers.values() if v["error"] is not None]
    first = next(iter(calibration.values()))
    return {
        "method": model.config.method, "mode": mode, "task": task, "ridge": ridge,
        "error_on": evaluated_on,
        "calibration_tokens": first.rows, "held_out_tokens": next(iter(held_out.values())).rows,
        "mean_error": sum(errors) / len(errors) if errors else None,
        "max_error": max(errors) if errors else None,
        "layers": layers,
    }


def fidelity_line(report: dict) -> str:
    mean, worst = report["mean_error"], report["max_error"]
    text = (f"mtpeft: distilled {report['method']} ({report['mode']}, task {report['task']}) into "
            f"{len(report['layers'])} LoRA layers; relative output error on {report['error_on']} tokens "
            f"({report['held_out_tokens']}): mean {mean:.4f}, max {worst:.4f}" if mean is not None else
            f"mtpeft: distilled {report['method']}: the adapter output is 0 on every layer")
    scores = report.get("scores")
    if scores:
        text += "; " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
    return text


# ---------------------------------------------------------------------------------------- the folder


def write_distilled_folder(model, path: Path, factors, report: dict, task: int | None = None,
                           labels: list[str] | None = None) -> Path:
    extra = {"fidelity.json": (json.dumps(report, indent=2) + "\n").encode()}
    return write_peft_lora(model, path, factors, extra_files=extra, task=task, labels=labels)
