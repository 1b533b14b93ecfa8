"""lorakit: exact, fast LoRA for PyTorch models.

Data flow: model -> ``inject`` -> train -> ``save_adapter`` -> ``load_adapter`` /
``merge`` / ``unload`` -> serve.
"""

from .adapters import (
    active_adapters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    merge,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
)
from .combine import add_weighted_adapter
from .config import LoRAConfig
from .errors import (
    AdapterExistsError,
    AdapterLoadError,
    AdapterNotFoundError,
    ConfigError,
    LoRAError,
    MergeStateError,
    MixedBatchError,
    TargetModuleError,
)
from .inject import find_targets, inject, lora_layers
from .io import load_adapter, read_adapter, save_adapter
from .layers import LoRALayer, LoRALinear
from .mixed import mixed_batch

__version__ = "0.1.0"

__all__ = [
    "LoRAConfig",
    "LoRALayer",
    "LoRALinear",
    "inject",
    "find_targets",
    "lora_layers",
    "merge",
    "unmerge",
    "unload",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "trainable_parameters",
    "list_adapters",
    "active_adapters",
    "set_adapter",
    "delete_adapter",
    "disable_adapters",
    "LoRAError",
    "ConfigError",
    "TargetModuleError",
    "AdapterExistsError",
    "AdapterNotFoundError",
    "AdapterLoadError",
    "MergeStateError",
    "MixedBatchError",
    "add_weighted_adapter",
    "mixed_batch",
]

# --- layer types, modules_to_save (issue 5) ---
from .layer_types import LoRAConv1D, LoRAConv2d, LoRAEmbedding, TiedLoRALinear  # noqa: E402
from .modules_to_save import ModulesToSaveWrapper  # noqa: E402

__all__ += ["LoRAConv1D", "LoRAConv2d", "LoRAEmbedding", "TiedLoRALinear", "ModulesToSaveWrapper"]
