"""mtpeft: multi-task parameter-efficient fine-tuning on any Hugging Face model.

    model = mtpeft.get_model(base, mtpeft.TeamLoraConfig(...))
    out = model(input_ids=..., labels=..., task_ids=torch.tensor([0, 2, 1, 0]))
"""

__version__ = "0.1.0"

from .config import AdapterConfig, known_methods, register_method
from .io import AdapterFileError
from .methods import LoraConfig, TaskLoraConfig
from .model import MultiTaskModel, get_model

__all__ = [
    "AdapterConfig", "AdapterFileError", "LoraConfig", "MultiTaskModel", "TaskLoraConfig",
    "get_model", "known_methods", "register_method",
]
from .methods import CPolyConfig, MTLLoraConfig, PolyConfig  # noqa: E402  (task-routed methods)
from .optim import parameter_groups  # noqa: E402
__all__ += ["CPolyConfig", "MTLLoraConfig", "PolyConfig", "parameter_groups"]
from .methods import HydraLoraConfig, MoELoraConfig, MoSLDConfig, TeamLoraConfig  # noqa: E402  (token-routed)
from .core.routing import task_expert_load  # noqa: E402
__all__ += ["HydraLoraConfig", "MoELoraConfig", "MoSLDConfig", "TeamLoraConfig", "task_expert_load"]
