"""Find the modules a ``LoRAConfig`` targets and wrap them with LoRA layers."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .config import ALL_LINEAR, LoRAConfig
from .errors import AdapterExistsError, MergeStateError, TargetModuleError
from .layers import LoRALayer, LoRALinear

# Layer types lorakit can wrap, and the LoRA class wrapping each.
LORA_CLASSES: dict[type, type] = {nn.Linear: LoRALinear}


def lora_layers(model: nn.Module):
    """Yield ``(qualified_name, layer)`` for every LoRA layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


@dataclass(frozen=True)
class Target:
    """One module an adapter will be attached to."""

    name: str  # qualified module name, e.g. "model.layers.0.self_attn.q_proj"
    r: int
    lora_alpha: float
    in_features: int
    out_features: int


def _layer_index(name: str, layers_pattern) -> int | None:
    """Block index of ``name``: the first ``.<int>.`` (after ``layers_pattern`` if given)."""
    if layers_pattern:
        pats = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        for p in pats:
            m = re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name)
            if m:
                return int(m.group(1))
        return None
    m = re.match(r"(?:^|.*?\.)[^.]*\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get()
        except (NotImplementedError, AttributeError):
            return None
    return getattr(model, "lm_head", None)


def find_targets(model: nn.Module, config: LoRAConfig, adapter_name: str = "default") -> list[Target]:
    """The modules ``config`` targets in ``model``, without changing anything.

    Raises:
        TargetModuleError: a ``target_modules`` list entry matches no module (the
            message lists available Linear names), a regex or ``layers_to_transform``
            leaves nothing to adapt, or a matched module has an unsupported type.
        AdapterExistsError: a matched module already has an adapter ``adapter_name``.
    """
    tm = config.target_modules
    head = _output_head(model) if tm == ALL_LINEAR else None
    inside_lora: list[str] = []  # prefixes of LoRA layers: their children are ours, never targets
    used_entries: set[str] = set()
    targets: list[Target] = []
    linear_names: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside_lora):
            continue
        is_lora = isinstance(module, LoRALayer)
        if is_lora:
            inside_lora.append(name + ".")
        base = module.base_layer if is_lora else module
        if isinstance(base, nn.Linear):
            linear_names.append(name)
        if tm == ALL_LINEAR:
            hit = isinstance(base, nn.Linear) and base is not head
        elif isinstance(tm, str):
            hit = re.fullmatch(tm, name) is not None
        else:
            entries = [e for e in tm if name == e or name.endswith("." + e)]
            hit = bool(entries)
        if not hit:
            continue
        if config.layers_to_transform is not None:
            idx = _layer_index(name, config.layers_pattern)
            if idx is None or idx not in config.layers_to_transform:
                continue
        if isinstance(tm, list):
            used_entries.update(entries)
        if type(base) not in LORA_CLASSES:
            raise TargetModuleError(
                f"target module {name!r} is a {type(module).__name__}, which lorakit cannot adapt "
                f"(supported: {', '.join(t.__name__ for t in LORA_CLASSES)})"
            )
        if is_lora and adapter_name in module.r:
            raise AdapterExistsError(f"adapter {adapter_name!r} is already injected into {name!r}")
        targets.append(
            Target(name, config.rank_for(name), config.alpha_for(name), base.in_features, base.out_features)
        )
    if isinstance(tm, list):
        missing = [e for e in tm if e not in used_entries]
        if missing:
            sample = ", ".join(linear_names[:8]) + (" ..." if len(linear_names) > 8 else "")
            where = f" in layers {config.layers_to_transform}" if config.layers_to_transform is not None else ""
            raise TargetModuleError(
                f"target_modules entry {missing[0]!r} matches no module{where}; "
                f"available Linear modules include: {sample or '(none)'}"
            )
    if not targets:
        raise TargetModuleError(f"target_modules={tm!r} matches no module in {type(model).__name__}")
    return targets


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(model: nn.Module, config: LoRAConfig, adapter_name: str = "default") -> nn.Module:
    """Freeze ``model`` and attach a LoRA adapter to every module ``config`` targets.

    Each matched ``nn.Linear`` is replaced in place by a ``LoRALinear`` wrapping it
    (a module already wrapped gets a further adapter). Every parameter that existed
    before is frozen, the new adapter is the active one and its A and B are the
    only trainable parameters. Nothing changes if an error is raised.

    Returns:
        the same ``model`` object.

    Raises:
        TargetModuleError, AdapterExistsError: see ``find_targets``.
    """
    if any(layer.merged_adapters for _, layer in lora_layers(model)):
        raise MergeStateError("cannot inject an adapter while adapters are merged; call unmerge(model) first")
    targets = find_targets(model, config, adapter_name)
    for p in model.parameters():
        p.requires_grad_(False)
    for t in targets:
        module = model.get_submodule(t.name)
        if not isinstance(module, LoRALayer):
            module = LORA_CLASSES[type(module)].from_base(module)
            set_submodule(model, t.name, module)
        module.add_adapter(
            adapter_name,
            r=t.r,
            lora_alpha=t.lora_alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            init_lora_weights=config.init_lora_weights,
        )
    if not hasattr(model, "lora_configs"):
        model.lora_configs = {}  # a plain dict attribute: state_dict stays unchanged
    model.lora_configs[adapter_name] = config
    from .adapters import set_adapter  # adapters.py builds on this module

    set_adapter(model, adapter_name)
    return model
