"""generate with task ids: a mixed-task batch with beams equals generating each task alone."""

import pytest
import torch
from tiny_models import BUILDERS
from test_peft_parity import randomise_adapters

import mtpeft


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_generate_mixed_tasks_with_beams_equals_each_task_alone(arch):
    model = mtpeft.get_model(BUILDERS[arch](), mtpeft.TaskLoraConfig(r=4, n_tasks=3, target_modules="all-linear"))
    randomise_adapters(model, scale=0.5)
    input_ids = torch.randint(3, 96, (3, 5), generator=torch.Generator().manual_seed(0))
    task_ids = torch.tensor([2, 0, 1])
    kwargs = dict(max_new_tokens=6, num_beams=2, num_return_sequences=2, do_sample=False,
                  attention_mask=torch.ones_like(input_ids))
    mixed = model.generate(input_ids=input_ids, task_ids=task_ids, **kwargs)
    assert mixed.shape[0] == 6
    for i in range(3):
        alone = model.generate(input_ids=input_ids[i:i + 1], task_ids=task_ids[i:i + 1],
                               **{**kwargs, "attention_mask": kwargs["attention_mask"][i:i + 1]})
        assert torch.equal(mixed[2 * i:2 * i + 2], alone)
    # and the tasks really differ: the same prompt under another task gives other tokens
    other = model.generate(input_ids=input_ids, task_ids=(task_ids + 1) % 3, **kwargs)
    assert not torch.equal(mixed, other)


def test_generate_requires_task_ids_for_task_routed_methods():
    model = mtpeft.get_model(BUILDERS["gpt2"](), mtpeft.TaskLoraConfig(n_tasks=2))
    with pytest.raises(ValueError, match="pass task_ids"):
        model.generate(input_ids=torch.ones(1, 3, dtype=torch.long), max_new_tokens=2)
