"""Token routing shared by the token-routed methods (those registered with routing="token").

Every function works on flattened tokens: a layer input x of shape (..., d_in) is viewed as
(N, d_in) with N = prod(x.shape[:-1]); the padding mask (``Route.token_mask``, shape x.shape[:-1])
becomes a float weight per token (1 = real token, 0 = padding), so no boolean indexing (and no
device sync) is needed in the hot path.

Pieces:
    ``router_probs``          bias-free linear router + softmax (in fp32 for bf16 / fp16 adapters)
    ``top_k_gates``           keep the k largest probabilities, renormalise them to sum 1, as a dense
                              (N, E) gate matrix with zeros elsewhere ("dense masked gates"), so the
                              experts run as two GEMMs whatever E and k are
    ``gate_expert_blocks``    scale each expert's rank block of an (N, E·r) intermediate by its gate
    ``gate_shared_block``     the same for a shared A: one (N, r) block gated once per expert
    ``switch_balance_loss``   Switch Transformer load balance E·Σ_e f_e·P_e over non-padding tokens
    ``router_statistics``     per-expert and per-task routing statistics (no_grad)
    ``task_expert_load``      the task × expert load matrix, aggregated over modules
    ``TokenRoutedLayer``      the small base class the token-routed layers share (flattening, masks, recording)

When aux losses are built: in training mode always, and in eval mode when the forward records (a
wrapper forward, so validation can log them; ``generate`` does not record). Why "training mode" and
not just "recording": gradient checkpointing (non-reentrant) recomputes a layer's forward during
backward with recording off, and matches the tensors it saves to the original ones by order; skipping
the aux-loss ops there would shift that order (and the random draws of the contrastive sampler).
Checkpointing only runs in training mode, where both passes build them. Statistics are computed under
no_grad and only when recording, so they save nothing for backward.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch

from .context import Route
from .layer import AdaptedLayer

# ----------------------------------------------------------------------------------- routing ops


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """The routing precision: at least fp32 (bf16 / fp16 adapters route in fp32, fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def router_probs(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """softmax(x Wᵀ) for x (N, d_in) and a bias-free router W (E, d_in) -> (N, E), in at least fp32."""
    logits = x @ weight.T
    return torch.softmax(logits.to(router_dtype(logits.dtype)), dim=-1)


def top_k_gates(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing as dense masked gates.

    Args:
        probs: (N, E) router probabilities.
        k: experts kept per token (1 <= k <= E).
    Returns:
        gates (N, E): the kept probabilities renormalised to sum 1 per token, 0 for the others
            (differentiable w.r.t. probs through the kept entries);
        selected (N, E) bool: the experts each token was routed to.
    """
    n_experts = probs.shape[-1]
    if k >= n_experts:  # every expert kept: renormalising a softmax changes nothing
        return probs, torch.ones_like(probs, dtype=torch.bool)
    values, index = probs.topk(k, dim=-1)  # (N, k)
    # The largest of E probabilities is >= 1/E, so this sum never vanishes.
    values = values / values.sum(dim=-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(-1, index, values)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, index, True)
    return gates, selected


def one_hot(index: torch.Tensor, n: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """(M,) indices in [0, n) -> (M, n) one-hot rows in ``dtype``, the values of ``F.one_hot(index, n)``.

    By comparison with arange(n): F.one_hot checks the indices' range by reading them on the host (on
    CPU), which inside a layer would be a sync; here the indices are in range by construction."""
    return (index.unsqueeze(-1) == torch.arange(n, device=index.device)).to(dtype)


def argmax_selected(gates: torch.Tensor) -> torch.Tensor:
    """(N, E) bool marking each token's largest gate: the "routed" expert of a dense router."""
    index = gates.detach().argmax(-1, keepdim=True)
    return torch.zeros_like(gates, dtype=torch.bool).scatter(-1, index, True)


def gate_expert_blocks(z: torch.Tensor, gates: torch.Tensor, scale: float) -> torch.Tensor:
    """Scale expert e's rank block of z (N, E·r) by scale·g_e -> (N, E·r)."""
    n, n_experts = gates.shape
    g = (gates.to(z.dtype) * scale).unsqueeze(-1)  # (N, E, 1)
    return (z.view(n, n_experts, -1) * g).view(n, -1)  # (N, E, r) -> (N, E·r)


def gate_shared_block(z: torch.Tensor, gates: torch.Tensor, scale: float) -> torch.Tensor:
    """A shared rank block z (N, r) gated once per expert: block e = scale·g_e·z -> (N, E·r)."""
    n, n_experts = gates.shape
    g = (gates.to(z.dtype) * scale).unsqueeze(-1)  # (N, E, 1)
    return (z.unsqueeze(1) * g).reshape(n, -1)  # (N, 1, r) * (N, E, 1) -> (N, E, r) -> (N, E·r)


def masked_mean(values: torch.Tensor, token_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens (dim 0) of values (N, ...), counting only tokens with weight 1."""
    if token_weight is None:
        return values.mean(dim=0)
    w = token_weight.to(values.dtype)
    shape = (-1,) + (1,) * (values.dim() - 1)
    return (values * w.view(shape)).sum(dim=0) / w.sum().clamp_min(1.0)


def switch_balance_loss(probs: torch.Tensor, selected: torch.Tensor, k: int,
                        token_weight: torch.Tensor | None) -> torch.Tensor:
    """Switch Transformer load balance, E·Σ_e f_e·P_e, over non-padding tokens.

    f_e = share of the routed slots (k per token) that went to expert e (not differentiable),
    P_e = mean router probability of expert e. Equals 1 for perfectly balanced routing.
    """
    n_experts = probs.shape[-1]
    f = masked_mean(selected.to(probs.dtype), token_weight) / k  # (E,)
    p = masked_mean(probs, token_weight)  # (E,)
    return n_experts * (f * p).sum()


# ----------------------------------------------------------------------------------- statistics


def token_weights(route: Route, n_tokens: int) -> torch.Tensor | None:
    """The padding mask as a float weight per flattened token (N,), or None when every token counts."""
    if route.token_mask is None:
        return None
    mask = route.token_mask.reshape(-1)
    if mask.numel() != n_tokens:
        return None
    return mask.float()


def token_task_ids(route: Route, lead_shape: torch.Size) -> torch.Tensor | None:
    """The task id of every flattened token (N,), from one id per leading row."""
    ids = route.row_task_ids
    if ids is None or len(lead_shape) == 0 or ids.shape[0] != lead_shape[0]:
        return None
    view = (lead_shape[0],) + (1,) * (len(lead_shape) - 1)
    return ids.view(view).expand(lead_shape).reshape(-1)


@torch.no_grad()
def router_statistics(probs: torch.Tensor, gates: torch.Tensor, selected: torch.Tensor, k: int,
                      token_weight: torch.Tensor | None, task_ids: torch.Tensor | None,
                      n_tasks: int | None) -> dict[str, torch.Tensor]:
    """One module's routing statistics for one forward, over non-padding tokens.

    Args:
        probs: (N, E) router probabilities; gates: (N, E) mixing weights (sum 1 per token);
        selected: (N, E) bool, the experts each token was routed to (k per token);
        token_weight: (N,) 1 for real tokens, 0 for padding, or None;
        task_ids: (N,) task of each token, or None; n_tasks: rows of the per-task tables
            (None: the largest id + 1).
    Returns a dict of tensors:
        ``tokens`` () real tokens; ``top_k`` () slots per token;
        ``prob_mean`` (E,) mean router probability; ``gate_mean`` (E,) mean mixing weight;
        ``topk_count`` (E,) tokens routed to each expert;
        with task ids also ``task_tokens`` (T,), ``task_gate_sum`` (T, E), ``task_topk_count`` (T, E).
    """
    probs, gates, sel = probs.float(), gates.detach().float(), selected.float()
    w = torch.ones(probs.shape[0], device=probs.device) if token_weight is None else token_weight.float()
    stats = {
        "tokens": w.sum(),
        "top_k": torch.tensor(float(k)),
        "prob_mean": (probs * w[:, None]).sum(0) / w.sum().clamp_min(1.0),
        "gate_mean": (gates * w[:, None]).sum(0) / w.sum().clamp_min(1.0),
        "topk_count": (sel * w[:, None]).sum(0),
    }
    if task_ids is not None:
        # a host read, only without n_tasks (a hand-built Route: the wrapper's plan gives n_task_rows)
        n_tasks = int(task_ids.max()) + 1 if n_tasks is None else n_tasks
        n_experts = probs.shape[-1]
        ids = task_ids.to(probs.device).long()
        zeros = probs.new_zeros(n_tasks, n_experts)
        stats["task_tokens"] = probs.new_zeros(n_tasks).index_add_(0, ids, w)
        stats["task_gate_sum"] = zeros.index_add(0, ids, gates * w[:, None])
        stats["task_topk_count"] = zeros.index_add(0, ids, sel * w[:, None])
    return stats


def _stats_of(model_or_stats) -> dict[str, dict[str, torch.Tensor]]:
    stats = getattr(model_or_stats, "router_stats", None)  # a model output, or a MultiTaskModel
    if callable(stats):
        stats = stats()
    if stats is None and isinstance(model_or_stats, dict):
        stats = model_or_stats  # the router_stats dict itself
    if not isinstance(stats, dict) or not all(isinstance(v, dict) for v in stats.values()):
        raise TypeError("task_expert_load takes a MultiTaskModel, a model output with .router_stats, or the "
                        f"router_stats dict itself; got {type(model_or_stats).__name__}.")
    return stats


def task_expert_load(model_or_stats, kind: str = "count", normalize: bool = True,
                     modules: Iterable[str] | str | None = None) -> torch.Tensor:
    """The task × expert load matrix of the last forward, aggregated over adapted modules.

    Args:
        model_or_stats: a MultiTaskModel (its last forward), a model output carrying
            ``router_stats``, or that dict (module name -> statistics).
        kind: "count": tokens of task t routed to expert e, summed over modules (with
            ``normalize``, divided by the task's routed slots, so each row sums to 1: the share of
            task t's routing that went to e). "gate": mean mixing weight of expert e over task t's
            tokens, averaged over modules weighted by tokens (rows sum to 1).
        normalize: only for "count".
        modules: restrict to these module names (an iterable of names, or a substring).
    Returns:
        (T, E) fp32. Modules with fewer experts (MoSLD's per-layer schedule) align experts by index
        and contribute zeros to the experts they lack; pass ``modules`` to look at one group.
    Raises:
        ValueError when the last forward had no task ids (no per-task statistics were recorded).
    """
    if kind not in ("count", "gate"):
        raise ValueError(f"kind must be 'count' or 'gate', got {kind!r}.")
    stats = _stats_of(model_or_stats)
    if isinstance(modules, str):
        stats = {n: s for n, s in stats.items() if modules in n}
    elif modules is not None:
        wanted = set(modules)
        stats = {n: s for n, s in stats.items() if n in wanted}
    per_task = [s for s in stats.values() if "task_topk_count" in s]
    if not per_task:
        raise ValueError(
            "no per-task router statistics: run a forward with task_ids=... (token-routed methods do not "
            "route by task, but record a task × expert load when task ids are given)."
        )
    n_tasks = max(s["task_topk_count"].shape[0] for s in per_task)
    n_experts = max(s["task_topk_count"].shape[1] for s in per_task)
    key = "task_topk_count" if kind == "count" else "task_gate_sum"
    total = torch.zeros(n_tasks, n_experts)
    slots = torch.zeros(n_tasks)
    for s in per_task:
        table = s[key].float().cpu()
        total[: table.shape[0], : table.shape[1]] += table
        tokens = s["task_tokens"].float().cpu()
        slots[: tokens.shape[0]] += tokens * (float(s["top_k"]) if kind == "count" else 1.0)
    if kind == "gate" or normalize:
        total = total / slots.clamp_min(1.0)[:, None]
    return total


# ----------------------------------------------------------------------------------- base layer
_WARNED_NO_GRAD = False


def _warn_no_grad_aux_once() -> None:
    """Reentrant gradient checkpointing runs the recorded forward under no_grad: the aux losses then
    carry no gradient (their values are still right). Say so once instead of training silently
    without them."""
    global _WARNED_NO_GRAD
    if not _WARNED_NO_GRAD:
        _WARNED_NO_GRAD = True
        warnings.warn(
            "mtpeft: aux losses (load balance / contrastive) were recorded in a training-mode forward "
            "without gradients, so they will not train the routers. This happens with reentrant gradient "
            "checkpointing (use gradient_checkpointing_enable(gradient_checkpointing_kwargs="
            "{'use_reentrant': False}), the transformers default) or a training-mode forward under "
            "torch.no_grad().", stacklevel=3)



class TokenRoutedLayer(AdaptedLayer):
    """Shared plumbing of the token-routed layers: flatten tokens, read the mask, record losses/stats.

    Subclasses implement the AdaptedLayer hooks plus ``reference_forward(x, route)`` (a plain loop
    over experts that the fast path is tested against) and use ``_flatten``, ``_record_aux`` and
    ``_record_stats``.
    """

    mergeable = False

    def _flatten(self, x: torch.Tensor, route: Route):
        """x (..., d_in) -> (x2d (N, d_in), lead shape, token weights (N,) or None)."""
        lead = x.shape[:-1]
        x2d = x.reshape(-1, x.shape[-1])
        return x2d, lead, token_weights(route, x2d.shape[0])

    def _wants_aux(self, route: Route) -> bool:
        """Build aux losses in training mode, or when recording (see the module docstring for why both)."""
        return self.training or route.record

    def _record_aux(self, name: str, value: torch.Tensor) -> None:
        """Record this module's aux loss ``name``, weighted as ``config.aux_loss_weights()`` says (the
        config field the method's MethodSpec names: the one source of the weight)."""
        if self.training and self.routing.recording and not torch.is_grad_enabled():
            _warn_no_grad_aux_once()
        self.routing.add_aux_loss(name, value, self.config.aux_loss_weights()[name])

    def _record_stats(self, route: Route, lead: torch.Size, probs: torch.Tensor, gates: torch.Tensor,
                      selected: torch.Tensor, k: int, token_weight: torch.Tensor | None) -> None:
        if not route.record:
            return
        # the per-task tables' size: n_tasks, else the plan's largest id + 1 (read at the wrapper's entry)
        n_tasks = self.config.n_tasks if self.config.n_tasks is not None else route.n_task_rows
        stats = router_statistics(probs.detach(), gates, selected, k, token_weight,
                                  token_task_ids(route, lead), n_tasks)
        self.routing.add_router_stats(self.module_name, stats)


def closed_form_parameter_count(config, shapes: Iterable[tuple[int, int]]) -> int:
    """Σ over (d_in, d_out[, layer_index, n_layers]) of ``config.parameters_per_layer``: the adapter's
    parameter count from shapes alone (e.g. a 7B model's, without building it)."""
    total = 0
    for shape in shapes:
        if not hasattr(config, "parameters_per_layer"):  # a method's config declares its closed form
            raise TypeError(f"{type(config).__name__} has no closed-form parameter count.")
        total += config.parameters_per_layer(*shape)
    return total


__all__: list[str] = [
    "router_dtype", "router_probs", "top_k_gates", "one_hot", "argmax_selected", "gate_expert_blocks", "gate_shared_block",
    "masked_mean", "switch_balance_loss", "token_weights", "token_task_ids", "router_statistics",
    "task_expert_load", "TokenRoutedLayer", "closed_form_parameter_count",
]
