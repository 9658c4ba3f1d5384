"""Every method registers its config and layer on import."""

from .lora import LoraConfig, LoraLayer
from .task_lora import TaskLoraConfig, TaskLoraLayer

__all__ = ["LoraConfig", "LoraLayer", "TaskLoraConfig", "TaskLoraLayer"]
from .mtl_lora import MTLLoraConfig, MTLLoraLayer  # noqa: E402  (task-routed methods)
from .poly import PolyConfig, PolyLayer  # noqa: E402
from .cpoly import CPolyConfig, CPolyLayer  # noqa: E402
__all__ += ["MTLLoraConfig", "MTLLoraLayer", "PolyConfig", "PolyLayer", "CPolyConfig", "CPolyLayer"]
from .moelora import MoELoraConfig, MoELoraLayer  # noqa: E402  (token-routed methods)
from .mosld import MoSLDConfig, MoSLDLayer  # noqa: E402
from .teamlora import TeamLoraConfig, TeamLoraLayer  # noqa: E402
from .hydralora import HydraLoraConfig, HydraLoraLayer  # noqa: E402
__all__ += ["MoELoraConfig", "MoELoraLayer", "MoSLDConfig", "MoSLDLayer", "TeamLoraConfig", "TeamLoraLayer",
            "HydraLoraConfig", "HydraLoraLayer"]
