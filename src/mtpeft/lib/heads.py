"""An encoder with one classification head per task (model kind (a) of the training pipeline).

The heads are task-specific parameters: wrap this module with ``get_model(...,
config(modules_to_save=["heads"]))`` and they train and are saved with the adapter. The encoder's
sentence embedding is the attention-masked mean of its last hidden states (how all-MiniLM-L6-v2 was
trained by sentence-transformers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ModelOutput


@dataclass
class MultiTaskClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (batch, max_labels); classes a task lacks are -inf


class MultiTaskEncoderClassifier(nn.Module):
    """``encoder`` (an HF AutoModel) + ``heads[t]``: Linear(hidden, n_labels[t])."""

    def __init__(self, encoder: nn.Module, n_labels: list[int], task_names: list[str] | None = None):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # target defaults and the Trainer read model.config
        hidden = encoder.config.hidden_size
        self.n_labels = list(n_labels)
        self.task_names = list(task_names) if task_names else [str(i) for i in range(len(n_labels))]
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in self.n_labels)

    def add_head(self, n_labels: int, name: str) -> int:
        """Append a head for a new task (initialised as nn.Linear is, from torch's current seed) and
        return its task id. Wrapped with modules_to_save=["heads"], it trains and saves with the adapter."""
        if name in self.task_names:
            raise ValueError(f"the classifier already has a head for task {name!r}; name the new task differently.")
        self.heads.append(nn.Linear(self.encoder.config.hidden_size, n_labels).to(
            device=self.heads[0].weight.device, dtype=self.heads[0].weight.dtype))
        self.n_labels.append(n_labels)
        self.task_names.append(name)
        return len(self.heads) - 1

    @property
    def max_labels(self) -> int:
        return max(self.n_labels)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, task_ids=None,
                **kwargs) -> MultiTaskClassifierOutput:
        if task_ids is None:
            raise ValueError("a multi-task classifier needs task_ids to pick each example's head.")
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state  # (B, S, H)
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, S, 1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)  # (B, H)
        logits = pooled.new_full((pooled.shape[0], self.max_labels), float("-inf"))
        # heads are tiny: one small GEMM per task present in the batch
        for task in task_ids.unique().tolist():
            rows = (task_ids == task).nonzero().flatten()
            logits[rows, : self.n_labels[task]] = self.heads[task](pooled[rows]).to(logits.dtype)
        loss = None
        if labels is not None:
            self._check_labels(labels, task_ids)
            loss = F.cross_entropy(logits.float(), labels)
        return MultiTaskClassifierOutput(loss=loss, logits=logits)

    def _check_labels(self, labels: torch.Tensor, task_ids: torch.Tensor) -> None:
        limits = torch.tensor(self.n_labels, device=labels.device)[task_ids]
        bad = (labels < 0) | (labels >= limits)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            task = int(task_ids[i])
            raise ValueError(
                f"label {int(labels[i])} does not fit task {self.task_names[task]!r}, whose head has "
                f"{self.n_labels[task]} classes (labels 0..{self.n_labels[task] - 1}). Check the task's "
                f"labels list or its data.")
