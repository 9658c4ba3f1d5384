"""Temperature mixing of several tasks into one training stream.

Task ``t`` with ``n_t`` training examples is drawn with probability ``p_t ∝ n_t ** (1 / T)``:
T = 1 samples in proportion to size (big tasks dominate), T → ∞ samples tasks uniformly (small tasks
are repeated more). Every position of the stream draws its task independently, so every batch mixes
tasks, which the multi-task adapters (task routing, per-task experts) need to see.

The stream is a pure function of ``(sizes, temperature, seed, epoch)``: an epoch is a fixed-length
list of indices made with a ``torch.Generator``, so resuming after ``k`` consumed samples is just
"rebuild that epoch's list and skip ``k``", bit-for-bit identical to an uninterrupted run.
"""

from __future__ import annotations

import bisect
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["mixing_weights", "MultiTaskDataset", "MultiTaskSampler"]



def _generator(*keys: int) -> torch.Generator:
    """A torch generator seeded from several integers (seed, epoch, task) without collisions."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def mixing_weights(sizes: Mapping[str, int], temperature: float) -> dict[str, float]:
    """Sampling probability of each task: ``n_t ** (1/T)`` normalised to sum to 1."""
    if not sizes:
        raise ValueError("mixing_weights needs at least one task.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (1 = proportional to size, large = uniform), got {temperature}.")
    for name, n in sizes.items():
        if n < 1:
            raise ValueError(f"Task {name!r} has {n} training examples; a task in the mixture needs at least one.")
    scaled = {name: float(n) ** (1.0 / temperature) for name, n in sizes.items()}
    total = sum(scaled.values())
    return {name: v / total for name, v in scaled.items()}


class MultiTaskDataset(Dataset):
    """Several tasks' examples behind one flat index; each item gets its ``task_id`` (and ``task``).

    Flat index ``offsets[t] + i`` is example ``i`` of task ``t``, in the order of ``tasks``. The task id
    is that position, unless ``task_ids`` names another (a task added to a trained adapter trains
    alone under its own id, after the tasks the adapter already has: mtpeft.app.adapt).
    """

    def __init__(self, tasks: Mapping[str, Sequence[dict]], task_ids: Mapping[str, int] | None = None):
        if not tasks:
            raise ValueError("MultiTaskDataset needs at least one task.")
        if task_ids is not None and set(task_ids) != set(tasks):
            raise ValueError(f"task_ids names {sorted(task_ids)}, the tasks are {sorted(tasks)}: give one id per task.")
        self.names: list[str] = list(tasks)
        self.ids: list[int] = [task_ids[n] for n in self.names] if task_ids is not None else list(range(len(tasks)))
        self.tasks: list[Sequence[dict]] = [tasks[n] for n in self.names]
        self.sizes: list[int] = [len(t) for t in self.tasks]
        self.offsets: list[int] = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """``(task_index, example_index)`` of a flat index."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        task = bisect.bisect_right(self.offsets, index) - 1
        return task, index - self.offsets[task]

    def __getitem__(self, index: int) -> dict:
        task, i = self.locate(index)
        return {**self.tasks[task][i], "task_id": self.ids[task], "task": self.names[task]}


class MultiTaskSampler(Sampler[int]):
    """Flat indices into a :class:`MultiTaskDataset`, tasks drawn with temperature ``T``.

    Each epoch is ``num_samples`` long (default: the total number of examples). Within a task the
    examples are taken in a random order without replacement, and a new random order starts when the
    task is exhausted (small tasks cycle). Use with ``DataLoader(dataset, sampler=..., batch_size=...)``.

    Resuming: ``load_state_dict(sampler.state_dict(consumed))`` (or ``set_position(epoch, consumed)``)
    makes the next ``__iter__`` continue right after the ``consumed``-th sample of that epoch.
    """

    def __init__(self, sizes: Sequence[int] | Mapping[str, int], temperature: float = 1.0,
                 num_samples: int | None = None, seed: int = 0):
        named = dict(sizes) if isinstance(sizes, Mapping) else {str(i): int(n) for i, n in enumerate(sizes)}
        self.sizes = list(named.values())
        self.weights = torch.tensor(list(mixing_weights(named, temperature).values()), dtype=torch.float64)
        self.temperature = temperature
        self.num_samples = int(num_samples) if num_samples is not None else sum(self.sizes)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0  # samples of the current epoch already consumed (for resuming)
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)

    # -- the stream ------------------------------------------------------------------------------
    def pairs(self, epoch: int | None = None) -> list[tuple[int, int]]:
        """The whole epoch as ``(task_index, example_index)`` pairs; a pure function of seed and epoch."""
        epoch = self.epoch if epoch is None else epoch
        gen = _generator(self.seed, epoch)
        task_seq = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=gen)  # (num_samples,)
        counts = torch.bincount(task_seq, minlength=len(self.sizes)).tolist()
        per_task: list[list[int]] = []
        for t, (n, need) in enumerate(zip(self.sizes, counts)):
            tgen = _generator(self.seed, epoch, t + 1)
            order: list[int] = []
            while len(order) < need:  # one fresh permutation per pass over the task
                order.extend(torch.randperm(n, generator=tgen).tolist())
            per_task.append(order)
        cursor = [0] * len(self.sizes)
        out = []
        for t in task_seq.tolist():
            out.append((t, per_task[t][cursor[t]]))
            cursor[t] += 1
        return out

    def indices(self, epoch: int | None = None) -> list[int]:
        """The whole epoch as flat indices into the concatenated dataset."""
        return [self.offsets[t] + i for t, i in self.pairs(epoch)]

    def __iter__(self) -> Iterator[int]:
        start, self.position = self.position, 0  # a resumed position applies to one iteration only
        yield from self.indices()[start:]

    def __len__(self) -> int:
        return self.num_samples - self.position

    # -- epochs and resuming ---------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose stream the next ``__iter__`` yields (as DistributedSampler does)."""
        self.epoch = int(epoch)

    def set_position(self, epoch: int, consumed: int) -> None:
        """Continue epoch ``epoch`` after its first ``consumed`` samples (``consumed = step * batch_size``)."""
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"consumed must be in [0, {self.num_samples}], got {consumed}.")
        self.epoch, self.position = int(epoch), int(consumed)

    def state_dict(self, consumed: int = 0) -> dict[str, Any]:
        """What a checkpoint needs to resume: pass the number of samples of this epoch already trained on."""
        return {"seed": self.seed, "epoch": self.epoch, "position": int(consumed), "temperature": self.temperature,
                "sizes": list(self.sizes), "num_samples": self.num_samples}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("sizes", "num_samples", "temperature"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"Cannot resume: the checkpoint's sampler had {key}={state[key]!r}, this one has "
                                 f"{getattr(self, key)!r}; the task mixture changed since the checkpoint.")
        self.seed = int(state["seed"])
        self.set_position(int(state["epoch"]), int(state["position"]))
