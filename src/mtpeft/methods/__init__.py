"""Every method registers its config and layer on import."""

from .lora import LoraConfig, LoraLayer
from .task_lora import TaskLoraConfig, TaskLoraLayer

__all__ = ["LoraConfig", "LoraLayer", "TaskLoraConfig", "TaskLoraLayer"]
