"""Logits only where a loss reads them: the causal LM's vocabulary projection at the labelled positions.

A causal-LM batch here is a prompt with the loss on its answer tokens only (a few tokens of ~150). The
model computes the (batch, seq, vocab) logits for every position and the loss then ignores all but the
answer's; on SmolLM2 (vocabulary 49,152) that projection is ~20 % of a training step's matmuls, and the
fp32 logits, their log-softmax and its gradient are ~240 MB each at 8 x 150 tokens. transformers' causal
LMs take ``logits_to_keep`` (positions whose logits to compute) and their loss takes ``shift_labels``
(the next-token targets of those positions), so the same loss is computed from the kept positions alone:
``num_items_in_batch``, gradient accumulation and token averaging across processes stay transformers'.
"""

from __future__ import annotations

import inspect

import torch

from .data.collate import IGNORE_INDEX
from ..lib.model import MultiTaskModel


def _forward_parameters(model) -> frozenset[str]:
    """The keyword names the underlying transformers model's ``forward`` takes."""
    # A transformers model's own ``base_model`` is its backbone (no head): unwrap ours only.
    base = model.base_model if isinstance(model, MultiTaskModel) else model
    return frozenset(inspect.signature(base.forward).parameters)


def accepts_logits_to_keep(model) -> bool:
    """Whether ``model`` (an mtpeft wrapper or a bare transformers model) slices its logits on request."""
    return "logits_to_keep" in _forward_parameters(model)


def accepts_prompt_cache(model) -> bool:
    """Whether the model takes a key/value ``cache`` and ``logits_to_keep`` (transformers' causal LMs)."""
    return {"cache", "logits_to_keep"} <= _forward_parameters(model)


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions p of a (batch, seq) label tensor whose next token p + 1 is a label in any row: (P,)."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(-1)


def keep_label_logits(batch: dict) -> dict:
    """``batch`` plus ``logits_to_keep`` (P,) and ``shift_labels`` (batch, P): the model then computes the
    logits of the labelled positions only, and its loss equals the full one. Unchanged without labels."""
    labels = batch.get("labels")
    if labels is None or labels.dim() != 2:
        return batch
    positions = label_positions(labels)
    if positions.numel() == 0:
        return batch  # nothing to learn from: leave the model's own (empty) loss as it is
    return {**batch, "logits_to_keep": positions, "shift_labels": labels[:, positions + 1]}
