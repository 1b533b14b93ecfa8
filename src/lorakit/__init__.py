"""lorakit: exact, fast LoRA for PyTorch models.

Data flow: model -> ``inject`` -> train -> ``save_adapter`` -> ``load_adapter`` /
``merge`` / ``unload`` -> serve.

This package is the core and needs only torch and safetensors. Its modules are layered one
way (each imports only those below it; checked by tests/test_architecture.py)::

    quantize                    quantised bases: quantize_base / dequantize (bitsandbytes, imported lazily)
    io | combine | mixed        files, adapter arithmetic, per-row adapters
    adapters                    model-level verbs: set / disable / delete / merge / unload
    inject                      find targets, wrap modules, add adapters
    modules_to_save             fully trained module copies
    | trainable_tokens          embedding rows trained in place (trainable_token_indices)
    | param_wrapper             LoRA on nn.Parameter weights (target_parameters)
    tree                        walking the model; its one AdapterState (the active set)
    layer_types                 Conv1D, Embedding, Conv2d; the type registry
    qlinear                     LoRAQuantLinear: float32 adapters on a quantised Linear, merge refused
    layers                      LoRALayer (merge / unmerge / forward), LoRALinear
    config                      LoRAConfig (PEFT's adapter_config.json)
    adapter                     the math: scaling, bypass s·B·A·x, delta s·B·A (LoRAAdapter)
    state, rows                 AdapterState, AdapterModule; row plans of mixed batches
    errors                      every exception

The app (CLI, training, data, evaluation, model loading) lives in ``lorakit.app`` and imports
the core; the core never imports it.
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
    LoRAWarning,
    MergeStateError,
    MixedBatchError,
    QuantizedBaseError,
    TargetModuleError,
)
from .adapter import LoRAAdapter
from .inject import find_targets, inject
from .io import load_adapter, load_adapter_tensors, read_adapter, save_adapter
from .layer_types import LoRAConv1D, LoRAConv2d, LoRAEmbedding, TiedLoRALinear
from .layers import LoRALayer, LoRALinear
from .mixed import mixed_batch, set_rows
from .qlinear import LoRAQuantLinear
from .quantize import dequantize, quantization, quantize_base
from .modules_to_save import ModulesToSaveWrapper
from .param_wrapper import ParamWrapper
from .trainable_tokens import TrainableTokensWrapper
from .tree import lora_layers

__version__ = "0.1.0"

__all__ = [
    "LoRAConfig",
    "LoRAAdapter",
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
    "load_adapter_tensors",
    "read_adapter",
    "trainable_parameters",
    "list_adapters",
    "active_adapters",
    "set_adapter",
    "delete_adapter",
    "disable_adapters",
    "LoRAError",
    "LoRAWarning",
    "ConfigError",
    "TargetModuleError",
    "AdapterExistsError",
    "AdapterNotFoundError",
    "AdapterLoadError",
    "MergeStateError",
    "MixedBatchError",
    "QuantizedBaseError",
    "add_weighted_adapter",
    "mixed_batch",
    "set_rows",
    "LoRAConv1D",
    "LoRAConv2d",
    "LoRAEmbedding",
    "TiedLoRALinear",
    "ModulesToSaveWrapper",
    "TrainableTokensWrapper",
    "ParamWrapper",
    "LoRAQuantLinear",
    "quantize_base",
    "dequantize",
    "quantization",
]
