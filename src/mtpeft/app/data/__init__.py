"""Data layer of mtpeft: tasks (registry, loading, splits), BIG-bench access, task mixing, collators.

Heavy modules (``datasets``, ``transformers``) are imported only when a function that needs them runs.
"""

from mtpeft.app.data.bigbench import (
    UnknownBigBenchTaskError,
    bigbench_task_names,
    load_bigbench_examples,
    prefetch_bigbench_tasks,
    read_bigbench_task,
)
from mtpeft.app.data.collate import IGNORE_INDEX, CausalLMCollator, EncoderClassificationCollator, Seq2SeqCollator
from mtpeft.app.data.mixing import MultiTaskDataset, MultiTaskSampler, mixing_weights
from mtpeft.app.data.tasks import (
    KINDS,
    METRICS,
    TaskData,
    TaskDataError,
    TaskSpec,
    TaskSpecError,
    UnknownTaskError,
    get_task,
    list_tasks,
    load_task,
    load_tasks,
    register_task,
    task_from_dict,
)

__all__ = [
    "UnknownBigBenchTaskError",
    "bigbench_task_names",
    "load_bigbench_examples",
    "prefetch_bigbench_tasks",
    "read_bigbench_task",
    "IGNORE_INDEX",
    "CausalLMCollator",
    "EncoderClassificationCollator",
    "Seq2SeqCollator",
    "MultiTaskDataset",
    "MultiTaskSampler",
    "mixing_weights",
    "KINDS",
    "METRICS",
    "TaskData",
    "TaskDataError",
    "TaskSpec",
    "TaskSpecError",
    "UnknownTaskError",
    "get_task",
    "list_tasks",
    "load_task",
    "load_tasks",
    "register_task",
    "task_from_dict",
]
