"""Poly (Ponti et al., "Combining Modular Skills in Multitask Learning", 2022) and MHR (Caccia et al.,
"Multi-Head Adapter Routing for Cross-Task Generalization", NeurIPS 2023).

    v      = GumbelSigmoid(Z_t; temperature 1)   in training,   sigmoid(Z_t)   in eval     (fp32)
    w      = v / (Σ_s v + 1e-12)                                 (normalised over skills, per split)
    A_t    = Σ_s w_s A_s,   B_t = Σ_s w_s B_s                    (mixing in parameter space)
    Δy     = (x A_t) B_t / r                                     (no α, no dropout)

S skills, each a LoRA (A_s: d_in→r, B_s: r→d_out); per-task logits Z ∈ R^{T×h×S}. MHR (h = n_splits
> 1) cuts every A_s along d_in and every B_s along d_out into h blocks; block q of A_t and of B_t is
mixed with the weights of head q. h = 1 is Poly.

Layout (identical to PEFT's ``tuners/poly`` so weights copy across unchanged):
    poly_lora_A    (h, S, d_in/h, r)    kaiming-uniform per (split, skill): U(±1/√(d_in/h))
    poly_lora_B    (h, S, r, d_out/h)   zeros (ΔW = 0 at init)
    module_logits  (T, h·S)             U(±1e-3)            [PEFT: poly_router.<name>.module_logits]
Parameters: S·r·(d_in + d_out) + T·h·S.

How it runs: the skill weights, and from them A_t (d_in, r) and B_t (r, d_out), are built once per
batch for each task present; every row gathers its task's pair and two batched GEMMs give Δy. The
scale 1/r is applied to the rank-r intermediate. In eval a task's update is the fixed matrix
A_t B_t / r, so the layer merges and exports as a plain LoRA (merge / export use the eval weights,
sigmoid(Z), with no noise).

Choices between readings:
* Gumbel-sigmoid noise: one relaxed-Bernoulli sample per *example* and layer (as PEFT and the
  authors' mttl code draw it: ``noise_granularity="example"``, the default). Uniforms are drawn with
  ``torch.rand`` of shape (examples, h, S), clamped to [eps, 1-eps] like torch's RelaxedBernoulli,
  so a seeded run draws exactly PEFT's noise. ``noise_granularity="task"`` draws one sample per task
  present in the batch and layer (cheaper; all examples of a task share the sample). In eval there is
  no noise and the weights are always built once per task.
* The noise is added to the logits directly, sigmoid((Z + log u − log(1−u)) / 1). torch's
  RelaxedBernoulli goes through probs = clamp(sigmoid(Z)) and back, which is the same up to rounding
  for moderate logits but has zero gradient for saturated ones (|Z| ≳ 16); this form does not.
* ``unknown_task="average"``: an unseen task id uses uniform weights 1/S over the skills.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import AdapterConfig, MethodSpec, check_choice, check_positive_int, field_help, register_method
from ..core.context import Route
from ..core.init import kaiming_uniform_
from ..core.layer import AdaptedLayer
from ..core.task_ids import require_task_ids
from ..tasks_api import UNKNOWN_TASK_CHOICES, UNKNOWN_TASK_HELP, grow_task_parameter, routing_table

EPS = 1e-12  # normaliser guard, as PEFT and mttl
LOGIT_INIT = 1e-3  # routing logits start U(±1e-3): near-uniform skill weights


@dataclass
class PolyConfig(AdapterConfig):
    """Poly's own ``r`` (not :class:`mtpeft.lib.config.LowRankConfig`'s): its scale is 1/r, with no alpha and
    no dropout."""

    method = "poly"
    task_routed = True

    r: int = field_help("rank of each skill's LoRA", 8)
    n_skills: int = field_help("S: number of skills (LoRAs) in each adapted layer", 4)
    n_splits: int = field_help("h: heads per skill; h > 1 is Multi-Head Routing (MHR)", 1)
    poly_type: str = field_help('router type; "poly" is the only one (PEFT compatibility)', "poly")
    noise_granularity: str = field_help(
        'one Gumbel-sigmoid sample per "example" (PEFT, mttl) or per "task" present in the batch', "example")
    unknown_task: str = field_help(UNKNOWN_TASK_HELP + " (Poly: uniform weights over the skills)", "error")

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_positive_int(name, "r", self.r)
        check_positive_int(name, "n_skills", self.n_skills)
        check_positive_int(name, "n_splits", self.n_splits)
        check_choice(name, "poly_type", self.poly_type, ("poly",))
        check_choice(name, "noise_granularity", self.noise_granularity, ("example", "task"))
        check_choice(name, "unknown_task", self.unknown_task, UNKNOWN_TASK_CHOICES)


def gumbel_sigmoid(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """A relaxed-Bernoulli sample sigmoid((logits + log u − log(1−u)) / temperature), u ~ U(0, 1).

    Uniforms come from ``torch.rand`` in the logits' shape and dtype, clamped like torch's
    ``RelaxedBernoulli`` (so the same seed gives the same noise as PEFT's Poly router).
    """
    u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device)
    eps = torch.finfo(u.dtype).eps
    u = u.clamp(min=eps, max=1 - eps)
    return torch.sigmoid((logits + u.log() - (-u).log1p()) / temperature)


def normalised_skill_weights(logits: torch.Tensor, sample: bool) -> torch.Tensor:
    """Poly's skill weights from logits (..., skills), fp32: Gumbel-sigmoid or sigmoid, then w / (Σw + eps)."""
    v = gumbel_sigmoid(logits) if sample else torch.sigmoid(logits)
    return v / (v.sum(dim=-1, keepdim=True) + EPS)


def check_splits(config, module_name: str, d_in: int, d_out: int) -> None:
    h = config.n_splits
    if d_in % h or d_out % h:
        common = math.gcd(d_in, d_out)
        ok = [k for k in range(1, min(common, 64) + 1) if common % k == 0]
        raise ValueError(
            f"{type(config).__name__}.n_splits={h} cuts every skill into {h} blocks along the input and output "
            f"features, but layer {module_name!r} has in_features={d_in} and out_features={d_out}, which "
            f"{h} does not divide. Use an n_splits that divides both (e.g. one of {ok}), or exclude the layer."
        )


class PolyLayer(AdaptedLayer):
    """Poly / MHR. Subclasses (C-Poly) add per-task skills through :meth:`add_task_skills`."""

    mergeable = True
    parameter_roles = {"poly_lora_A": "shared", "poly_lora_B": "shared", "module_logits": "router"}

    def create_parameters(self, factory: dict) -> None:
        cfg = self.config
        check_splits(cfg, self.module_name, self.in_features, self.out_features)
        h, s, r = cfg.n_splits, cfg.n_skills, cfg.r
        self.poly_lora_A = nn.Parameter(torch.empty(h, s, self.in_features // h, r, **factory))  # (h, S, d_in/h, r)
        self.poly_lora_B = nn.Parameter(torch.empty(h, s, r, self.out_features // h, **factory))  # (h, S, r, d_out/h)
        self.module_logits = nn.Parameter(torch.empty(cfg.n_tasks, h * s, **factory))  # (T, h·S)

    def reset_parameters(self) -> None:
        kaiming_uniform_(self.poly_lora_A, fan_in=self.in_features // self.config.n_splits)
        nn.init.zeros_(self.poly_lora_B)
        nn.init.uniform_(self.module_logits, -LOGIT_INIT, LOGIT_INIT)

    def add_tasks(self, n: int) -> None:
        grow_task_parameter(self, "module_logits", n, lambda t: nn.init.uniform_(t, -LOGIT_INIT, LOGIT_INIT))

    @property
    def n_tasks(self) -> int:
        return self.module_logits.shape[0]

    # ------------------------------------------------------------------ per-task weights
    def skill_weights(self, tasks: torch.Tensor, sample: bool) -> torch.Tensor:
        """Normalised common-skill weights for ``tasks`` (G,), fp32: (G, h, S). Slot n_tasks = uniform."""
        h, s = self.config.n_splits, self.config.n_skills
        n_tasks = self.n_tasks
        table = routing_table(self, self.module_logits).float()  # (T, h·S)
        logits = table[tasks.clamp(max=n_tasks - 1)].view(-1, h, s)  # (G, h, S)
        w = normalised_skill_weights(logits, sample)
        if self.config.unknown_task == "average":
            unknown = (tasks >= n_tasks)[:, None, None]
            w = torch.where(unknown, torch.full_like(w, 1.0 / s), w)
        return w

    def add_task_skills(self, tasks: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sample: bool):
        """Hook for per-task skills (C-Poly); Poly has none. a: (G, h, d_in/h, r), b: (G, h, r, d_out/h)."""
        return a, b

    def task_factors(self, tasks: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_t (G, d_in, r), B_t (G, r, d_out)) for each entry of ``tasks``, in the adapter dtype."""
        w = self.skill_weights(tasks, sample).to(self.poly_lora_A.dtype)  # (G, h, S)
        a = torch.einsum("gqs,qsdr->gqdr", w, self.poly_lora_A)  # (G, h, d_in/h, r)
        b = torch.einsum("gqs,qsrd->gqrd", w, self.poly_lora_B)  # (G, h, r, d_out/h)
        a, b = self.add_task_skills(tasks, a, b, sample)
        g = a.shape[0]
        a = a.reshape(g, self.in_features, self.config.r)  # split q owns input block q
        b = b.transpose(1, 2).reshape(g, self.config.r, self.out_features)  # split q owns output block q
        return a, b

    # ------------------------------------------------------------------ forward
    def _groups(self, route: Route, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(group slots (G,), row -> group (rows,)): one group per task present, or per example when
        Gumbel noise is drawn per example (training with noise_granularity="example"). From the
        wrapper's routing plan: the slots already map unknown ids to n_tasks."""
        cfg = self.config
        groups = route.task_groups(self.n_tasks, cfg.unknown_task, device)
        if not (self.training and cfg.noise_granularity == "example"):
            return groups.tasks, route.row_groups(groups)
        # Rows are the examples, or each example's consecutive copies (beams, flattened tokens).
        examples = groups.example_slot  # (B,)
        return examples, route.row_examples(examples.shape[0], device)

    def adapter_forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        require_task_ids(route, self.config.method)
        rows = x.reshape(x.shape[0], -1, x.shape[-1])  # (rows, tokens, d_in)
        tasks, inverse = self._groups(route, x.device)
        a, b = self.task_factors(tasks, sample=self.training)  # (G, d_in, r), (G, r, d_out)
        if a.shape[0] == 1:  # one group: no gather
            y = ((rows @ a[0]) / self.config.r) @ b[0]
        else:
            z = torch.bmm(rows, a[inverse]) / self.config.r  # (rows, tokens, r)
            y = torch.bmm(z, b[inverse])  # (rows, tokens, d_out)
        return y.reshape(*x.shape[:-1], self.out_features)

    def lora_factors(self, task: int | None):
        if task is None:
            raise ValueError(f"{self.config.method} mixes its skills per task: pass task=t to merge or export.")
        a, b = self.task_factors(torch.tensor([task], device=self.poly_lora_A.device), sample=False)
        return a[0].T, b[0].T / self.config.r  # (r, d_in), (d_out, r) with the 1/r folded in

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"{super().extra_repr()}, r={cfg.r}, n_skills={cfg.n_skills}, n_splits={cfg.n_splits}, "
                f"n_tasks={self.n_tasks}")


def poly_spec(config_cls, layer_cls, **kw) -> MethodSpec:
    """The capabilities Poly and C-Poly share (C-Poly registers its own config and layer with them)."""
    return MethodSpec(
        config_cls, layer_cls, routing="task", export="exact", can_add_tasks=True,
        # (G, h, S): each task's eval-mode weights over the common skills, per split
        task_table=lambda layer, tasks: layer.skill_weights(tasks, sample=False),
        unknown_task_field="unknown_task", **kw)


register_method(poly_spec(
    PolyConfig, PolyLayer,
    test_config=lambda **kw: PolyConfig(**{"r": 4, "n_skills": 3, **kw}),
    sized_config=lambda e, r, **kw: PolyConfig(r=r, n_skills=e, **kw),
    test_cases={"poly": {}, "mhr": {"n_splits": 2}},  # n_splits > 1 is MHR
))
