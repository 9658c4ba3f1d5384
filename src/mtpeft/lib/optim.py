"""Optimizer parameter groups that give routing logits their own learning rate.

Task-routed methods (MTL-LoRA, Poly / MHR, C-Poly) learn a small table of routing logits beside the
adapter weights, and it is common to train that table with its own (often larger) learning rate.
``parameter_groups`` splits a wrapped model's trainable parameters by the role each layer declares
("router" vs everything else):

    groups = mtpeft.parameter_groups(model, lr=1e-4, routing_lr=1e-2, weight_decay=0.01)
    optimizer = torch.optim.AdamW(groups)
"""

from __future__ import annotations


def parameter_groups(model, lr: float, routing_lr: float | None = None, weight_decay: float = 0.0, *,
                     routing_weight_decay: float = 0.0) -> list[dict]:
    """Optimizer param groups for an mtpeft ``MultiTaskModel``.

    Args:
        model: the wrapped model; only parameters with ``requires_grad`` are included.
        lr: learning rate of every trainable parameter that is not a routing logit (adapter weights,
            per-task parameters, modules_to_save, anything else left trainable).
        routing_lr: learning rate of the routing logits (role "router"); None uses ``lr``.
        weight_decay: weight decay of the non-routing group.
        routing_weight_decay: weight decay of the routing logits, 0 by default: decay pulls logits
            toward uniform routing, and AdamW decays even rows whose gradient is masked to zero
            (``add_tasks(..., train_only_routing=True)`` relies on those rows staying put).

    Returns:
        up to two groups, ``{"name": "adapter", ...}`` and ``{"name": "router", ...}``, each with
        ``params``, ``lr`` and ``weight_decay``; empty groups are left out.
    """
    if not hasattr(model, "parameter_role"):
        raise TypeError(f"parameter_groups expects an mtpeft MultiTaskModel, got {type(model).__name__}.")
    router, other = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (router if model.parameter_role(name) == "router" else other).append(param)
    groups = []
    if other:
        groups.append({"name": "adapter", "params": other, "lr": lr, "weight_decay": weight_decay})
    if router:
        groups.append({"name": "router", "params": router, "lr": lr if routing_lr is None else routing_lr,
                       "weight_decay": routing_weight_decay})
    if not groups:
        raise ValueError("the model has no trainable parameters (loaded for inference? use "
                         "MultiTaskModel.from_pretrained(..., is_trainable=True)).")
    return groups
