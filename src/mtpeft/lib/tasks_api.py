"""Task-level helpers of the task-routed methods (per-task LoRA, MTL-LoRA, Poly / MHR, C-Poly).

* A batch's task groups (the distinct tasks present, each example's group; with
  ``unknown_task="average"`` every id outside [0, n_tasks) is one extra slot, ``n_tasks``, which the
  layer fills with its task-agnostic fallback) are computed once per forward by the wrapper, in its
  routing plan (:func:`mtpeft.lib.core.plan.group_tasks`), and reach the layers through their Route.
* :func:`add_tasks` grows a wrapped model by ``n`` tasks (``MultiTaskModel.add_tasks`` calls it):
  every layer appends per-task rows initialised as at construction, and ``config.n_tasks`` grows.
  With ``train_only_routing=True`` only the new tasks' routing logits train (MHR-z style [Caccia et
  al. 2023]: adapt to a new task by learning only its routing over the frozen skills).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

UNKNOWN_TASK_CHOICES = ("error", "average")
UNKNOWN_TASK_HELP = (
    'what an id outside [0, n_tasks) means: "error" (default) rejects it; "average" accepts it '
    "(e.g. -1 for an unseen task) and uses the method's task-agnostic fallback"
)


@torch.no_grad()
def grow_task_parameter(module: nn.Module, name: str, n: int,
                        init: Callable[[torch.Tensor], object]) -> nn.Parameter:
    """Grow ``module.<name>`` (task dimension first) by ``n`` rows, set by ``init``.

    The old rows are copied unchanged; ``init`` receives the new rows (a view) and fills them in
    place. The Parameter object stays the same (its data is swapped for the larger tensor), so
    references to it (an optimizer built before but not stepped yet, param groups) stay valid; its
    ``.grad`` is cleared. An optimizer that already holds state for it must be rebuilt.
    """
    param = getattr(module, name)
    t = param.shape[0]
    new = torch.empty((t + n, *param.shape[1:]), dtype=param.dtype, device=param.device)
    new[:t] = param
    init(new[t:])
    param.data = new
    param.grad = None
    return param


def routing_table(layer: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` (task dimension first) with the rows of the tasks frozen by
    ``add_tasks(..., train_only_routing=True)`` detached, so only the new tasks' rows get gradients.

    The mask lives on the layer as a plain int (``frozen_task_rows``), not as a tensor hook, so it
    survives ``copy.deepcopy`` and needs no hook bookkeeping.
    """
    n = getattr(layer, "frozen_task_rows", None)
    if not n:
        return logits
    return torch.cat([logits[:n].detach(), logits[n:]])


def trained_parameter_count(model) -> int:
    """How many adapter-model parameters get gradients: those with ``requires_grad``, less the old tasks'
    rows of the routing logits that :func:`routing_table` detaches after ``add_tasks(...,
    train_only_routing=True)`` (they keep ``requires_grad``: the mask is in the forward, not on the tensor)."""
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for _, layer in model.adapted_layers():
        n = getattr(layer, "frozen_task_rows", None)
        if not n:
            continue
        for name, role in layer.parameter_roles.items():
            param = getattr(layer, name, None)
            if role == "router" and isinstance(param, nn.Parameter) and param.requires_grad:
                count -= param[:n].numel()  # task dimension first (grow_task_parameter's layout)
    return count


def add_tasks(model, n: int, train_only_routing: bool = False) -> None:
    """Append ``n`` tasks to every adapted layer of ``model`` and to ``model.config.n_tasks``.

    New per-task parameters are initialised as at construction (for example MTL-LoRA: Λ = I and
    fresh logits; Poly: logits U(±1e-3); C-Poly: also fresh exclusive skills with B = 0; per-task
    LoRA: a fresh LoRA with B = 0). Old tasks' outputs do not change.

    ``train_only_routing=True`` freezes every adapter parameter (and modules_to_save) except the
    routing logits, and detaches the old tasks' rows of the logits in the layers' forward
    (:func:`routing_table`), so only the new tasks' rows get gradients. The new tasks' other
    per-task parameters stay at their init (MTL-LoRA: Λ = I; C-Poly: the fresh exclusive skills).
    This is a training-time setting: it is not saved, and a later ``add_tasks(..., False)`` lifts
    the row mask (``requires_grad`` flags are left as they are).

    The grown tensors keep their Parameter objects, so an optimizer built before this call works
    if it has not stepped yet; one that holds state (Adam moments of the old shape) must be rebuilt.
    Keep weight decay off the logits (as :func:`mtpeft.parameter_groups` does by default): AdamW
    decays parameters even where the gradient is zero.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"add_tasks: n must be a positive integer, got {n!r}.")
    cfg = model.config
    layers = [layer for _, layer in model.adapted_layers()]
    from .config import get_method_spec, package_methods, spec_of

    if not spec_of(cfg).can_add_tasks:
        growable = [m for m in package_methods() if get_method_spec(m).can_add_tasks]
        raise TypeError(f"{type(cfg).__name__} has no per-task parameters: add_tasks applies to task-routed "
                        f"methods that can grow ({', '.join(growable)}).")
    model.check_usable("add tasks")
    model.check_not_merged("add_tasks")
    if train_only_routing and not any(role == "router" for layer in layers
                                      for role in layer.parameter_roles.values()):
        raise ValueError(f"{type(cfg).__name__} has no routing logits, so train_only_routing=True would "
                         f"train nothing; call add_tasks(n) and train the new tasks' parameters.")
    n_old = cfg.n_tasks
    for layer in layers:
        layer.add_tasks(n)
        layer.frozen_task_rows = n_old if train_only_routing else None
    cfg.n_tasks = n_old + n
    if train_only_routing:
        for name, param in model.named_parameters():
            role = model.parameter_role(name)
            if role is not None:
                param.requires_grad_(role == "router")
