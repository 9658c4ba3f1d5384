"""Temperature mixing: weights, empirical proportions, within-task order, exact resume."""

import collections
import math

import pytest
import torch
from torch.utils.data import DataLoader

from mtpeft.app.data import MultiTaskDataset, MultiTaskSampler, mixing_weights


def test_weights_follow_temperature():
    sizes = {"big": 900, "small": 100}
    assert mixing_weights(sizes, 1.0) == pytest.approx({"big": 0.9, "small": 0.1})
    assert mixing_weights(sizes, 2.0) == pytest.approx({"big": 30 / 40, "small": 10 / 40})
    hot = mixing_weights(sizes, 1e6)
    assert hot["big"] == pytest.approx(0.5, abs=1e-4)
    assert sum(mixing_weights({"a": 3, "b": 7, "c": 11}, 3.0).values()) == pytest.approx(1.0)


@pytest.mark.parametrize("sizes, temperature, msg", [({"a": 5}, 0.0, "temperature"), ({"a": 5, "b": 0}, 1.0, "'b'"),
                                                     ({}, 1.0, "at least one")])
def test_bad_mixtures_are_refused(sizes, temperature, msg):
    with pytest.raises(ValueError, match=msg):
        mixing_weights(sizes, temperature)


def _frequencies(sampler):
    counts = collections.Counter(t for t, _ in sampler.pairs())
    return [counts[t] / sampler.num_samples for t in range(len(sampler.sizes))]


@pytest.mark.parametrize("temperature, expected", [(1.0, [1000 / 1110, 100 / 1110, 10 / 1110]), (1000.0, [1 / 3] * 3)])
def test_empirical_proportions(temperature, expected):
    sampler = MultiTaskSampler([1000, 100, 10], temperature=temperature, num_samples=60_000, seed=0)
    for got, want in zip(_frequencies(sampler), expected):
        assert got == pytest.approx(want, abs=0.01)


def test_within_task_without_replacement_then_cycles():
    sampler = MultiTaskSampler({"a": 7, "b": 50}, temperature=1000.0, num_samples=200, seed=5)
    a_seq = [i for t, i in sampler.pairs() if t == 0]
    assert len(a_seq) > 21
    for k in range(3):  # every block of 7 draws of task a is a permutation of its 7 examples
        assert sorted(a_seq[7 * k: 7 * k + 7]) == list(range(7))
    assert a_seq[:7] != a_seq[7:14] or a_seq[7:14] != a_seq[14:21]  # each pass reshuffles


def test_stream_is_deterministic_per_seed_and_epoch():
    make = lambda seed: MultiTaskSampler([30, 20, 10], temperature=2.0, seed=seed)  # noqa: E731
    assert make(1).indices() == make(1).indices()
    assert make(1).indices() != make(2).indices()
    s = make(1)
    assert s.indices(epoch=0) != s.indices(epoch=1)
    s.set_epoch(1)
    assert list(s) == make(1).indices(epoch=1)


def test_indices_are_flat_offsets_into_the_dataset():
    tasks = {"x": [{"text": f"x{i}"} for i in range(4)], "y": [{"text": f"y{i}"} for i in range(6)]}
    ds = MultiTaskDataset(tasks)
    sampler = MultiTaskSampler({k: len(v) for k, v in tasks.items()}, temperature=1.0, num_samples=50, seed=0)
    for flat, (t, i) in zip(sampler.indices(), sampler.pairs()):
        item = ds[flat]
        assert ds.locate(flat) == (t, i)
        assert item["task_id"] == t and item["task"] == ["x", "y"][t] and item["text"] == f"{'xy'[t]}{i}"
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_resume_continues_the_exact_same_stream():
    tasks = {n: [{"n": f"{n}{i}"} for i in range(size)] for n, size in (("a", 40), ("b", 13), ("c", 5))}
    ds = MultiTaskDataset(tasks)
    sizes = {n: len(v) for n, v in tasks.items()}
    ref = MultiTaskSampler(sizes, temperature=2.0, num_samples=64, seed=11)
    ref.set_epoch(2)
    full = [b["n"] for b in DataLoader(ds, sampler=ref, batch_size=8, collate_fn=lambda xs: {"n": [x["n"] for x in xs]})]

    # Train 3 steps, checkpoint, throw the sampler away, resume in a new one.
    first = MultiTaskSampler(sizes, temperature=2.0, num_samples=64, seed=11)
    first.set_epoch(2)
    loader = iter(DataLoader(ds, sampler=first, batch_size=8, collate_fn=lambda xs: [x["n"] for x in xs]))
    seen = [next(loader) for _ in range(3)]
    state = first.state_dict(consumed=3 * 8)

    resumed = MultiTaskSampler(sizes, temperature=2.0, num_samples=64, seed=0)
    resumed.load_state_dict(state)
    assert len(resumed) == 64 - 24
    rest = list(DataLoader(ds, sampler=resumed, batch_size=8, collate_fn=lambda xs: [x["n"] for x in xs]))
    assert seen + rest == full
    assert len(resumed) == 64  # the next epoch starts from its beginning again


def test_resume_refuses_a_changed_mixture():
    state = MultiTaskSampler([10, 20], temperature=1.0).state_dict(consumed=5)
    with pytest.raises(ValueError, match="sizes"):
        MultiTaskSampler([10, 21], temperature=1.0).load_state_dict(state)


def test_batches_mix_tasks():
    sampler = MultiTaskSampler([500, 500, 500, 500], temperature=1.0, num_samples=1600, seed=3)
    tasks = [t for t, _ in sampler.pairs()]
    batches = [tasks[i: i + 16] for i in range(0, len(tasks), 16)]
    assert all(len(set(b)) >= 2 for b in batches)
    assert sum(len(set(b)) == 4 for b in batches) / len(batches) > 0.8
    assert math.isclose(sum(1 for _ in sampler), 1600)
    assert isinstance(next(iter(sampler)), int) and torch.is_tensor(sampler.weights)
