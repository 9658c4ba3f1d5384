"""Validation of the ``task_ids`` argument: one task per example, as a LongTensor of shape (batch,)."""

from __future__ import annotations

import torch

# Without n_tasks (token-routed methods), the largest id sizes the per-task router statistics
# (routing.router_statistics: a (max id + 1, n_experts) load table per module). Ids at or above this cap
# are refused rather than allocating an unbounded table (an id of 2e7 took 8.4 GiB).
MAX_TASK_ID_WITHOUT_N_TASKS = 4096

_BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features",
               "decoder_input_ids")


def infer_batch_size(args: tuple, kwargs: dict) -> int | None:
    for key in _BATCH_KEYS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    for value in args:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def validate_task_ids(task_ids, batch_size: int | None, n_tasks: int | None, *, required: bool,
                      method: str, allow_unknown: bool = False) -> torch.Tensor | None:
    """Check and return task ids as a LongTensor, or raise an error that names the problem and the fix.

    ``allow_unknown`` lets ids outside [0, n_tasks) through (methods with an "average" fallback).
    """
    if task_ids is None:
        if required:
            raise ValueError(
                f"{method} routes each example by its task: pass task_ids=torch.tensor([...]) "
                f"(LongTensor of shape (batch,), values in [0, {n_tasks})) to forward / generate."
            )
        return None
    if not isinstance(task_ids, torch.Tensor):
        raise TypeError(
            f"task_ids must be a torch.LongTensor of shape (batch,), got {type(task_ids).__name__}; "
            f"wrap it: torch.tensor(task_ids, dtype=torch.long)."
        )
    if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
        raise TypeError(
            f"task_ids must hold integers (torch.long), got dtype {task_ids.dtype}; "
            f"convert with task_ids.long() only if the values are whole task indices."
        )
    if task_ids.dim() != 1:
        raise ValueError(
            f"task_ids must have shape (batch,), one task per example; got shape {tuple(task_ids.shape)}."
        )
    if batch_size is not None and task_ids.shape[0] != batch_size:
        raise ValueError(
            f"task_ids has {task_ids.shape[0]} entries but the batch has {batch_size} examples; "
            f"pass exactly one task id per example."
        )
    if task_ids.device.type == "meta":
        raise ValueError("task_ids are on the meta device (they hold no values); pass real ids, e.g. "
                         "torch.tensor([...], device=<the inputs' device>).")
    task_ids = task_ids.long()
    if n_tasks is None and task_ids.numel():
        low, high = int(task_ids.min()), int(task_ids.max())
        if low < 0:
            raise ValueError(f"task id {low} is out of range: task ids are >= 0.")
        if high >= MAX_TASK_ID_WITHOUT_N_TASKS:
            raise ValueError(
                f"task id {high} is too large for an adapter built without n_tasks (ids below "
                f"{MAX_TASK_ID_WITHOUT_N_TASKS} are accepted; the largest id sizes the per-task router "
                f"statistics): set n_tasks in the method config to the number of tasks.")
    if n_tasks is not None and not allow_unknown and task_ids.numel():
        check_task_id_range(task_ids.tolist(), n_tasks)
    return task_ids


def check_task_id_range(values: list[int], n_tasks: int) -> None:
    """Refuse task ids (python ints, already on the host) outside [0, n_tasks)."""
    if not values:
        return
    low, high = min(values), max(values)
    if low < 0 or high >= n_tasks:
        bad = low if low < 0 else high
        raise ValueError(
            f"task id {bad} is out of range: this adapter was built for n_tasks={n_tasks}, so ids "
            f"must be in [0, {n_tasks - 1}]."
        )


def require_task_ids(route, method: str) -> torch.Tensor:
    """The route's per-row task ids (a task-routed layer's input), or an error that says to pass them."""
    if route.row_task_ids is None:
        raise ValueError(
            f"{method} routes by task: pass task_ids (a LongTensor of shape (batch,)) to the model's "
            f"forward or generate."
        )
    return route.row_task_ids


def check_merged_task(values: list[int], task: int) -> None:
    """Refuse task ids (python ints, on the host) of a task other than the one the adapter is merged for."""
    others = sorted(set(values) - {task})
    if others:
        raise ValueError(
            f"the adapter is merged for task {task}, but the batch has task ids {others}. "
            f"Call model.unmerge() first, or run only task {task} while merged."
        )
