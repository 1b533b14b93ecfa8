"""Find the modules a ``LoRAConfig`` targets and wrap them with LoRA layers."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from torch import nn

from .config import ALL_LINEAR, LoRAConfig
from .errors import AdapterExistsError, MergeStateError, TargetModuleError
from .layers import LoRALayer, LoRALinear
from .layer_types import LoRAConv1D, LoRAConv2d, LoRAEmbedding, TiedLoRALinear, adapter_shapes, base_features, conv1d_type
from . import modules_to_save as mts

# Layer types lorakit can wrap, and the LoRA class wrapping each. transformers'
# Conv1D is added on first use (``_lora_classes``) so lorakit does not import transformers.
LORA_CLASSES: dict[type, type] = {nn.Linear: LoRALinear, nn.Embedding: LoRAEmbedding, nn.Conv2d: LoRAConv2d}


def _lora_classes() -> dict[type, type]:
    conv1d = conv1d_type()
    if conv1d is not None and conv1d not in LORA_CLASSES:
        LORA_CLASSES[conv1d] = LoRAConv1D
    return LORA_CLASSES


def walk(model: nn.Module, into=()):
    """Yield ``(qualified_name, module)`` like ``named_modules`` (each module once), but
    without descending into LoRA layers and ``ModulesToSaveWrapper`` s (their children
    are ours), except through the module types listed in ``into``.

    The walk costs the base model's module count however many adapters are resident.
    """
    stack, seen = [("", model)], set()
    stop = (LoRALayer, mts.ModulesToSaveWrapper)
    while stack:
        prefix, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield prefix, module
        if isinstance(module, stop) and not isinstance(module, into):
            continue
        children = [(f"{prefix}.{n}" if prefix else n, m) for n, m in module._modules.items() if m is not None]
        stack.extend(reversed(children))


def lora_layers(model: nn.Module):
    """Yield ``(qualified_name, layer)`` for every LoRA layer in ``model``."""
    for name, module in walk(model):
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
    shapes: dict = field(default_factory=dict, compare=False)  # PEFT key suffix -> adapter tensor shape


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

    ``"all-linear"`` covers ``nn.Linear`` and transformers' ``Conv1D`` (as in PEFT),
    except the output head and modules inside ``modules_to_save`` modules.

    Raises:
        TargetModuleError: a ``target_modules`` list entry matches no module (the
            message lists available Linear names), a regex or ``layers_to_transform``
            leaves nothing to adapt, a matched module has an unsupported type (or is
            an ``nn.Conv2d`` with groups > 1), or lies in a ``modules_to_save`` module.
        AdapterExistsError: a matched module already has an adapter ``adapter_name``.
    """
    classes = _lora_classes()
    linear_types = tuple(t for t in classes if classes[t] in (LoRALinear, LoRAConv1D))
    tm = config.target_modules
    head = _output_head(model) if tm == ALL_LINEAR else None
    saved = [n + "." for n in mts.find_modules_to_save(model, config, adapter_name)] if config.modules_to_save else []
    used_entries: set[str] = set()
    targets: list[Target] = []
    linear_names: list[str] = []
    for name, module in walk(model):  # never enters LoRA layers or wrappers: their children are ours
        if not name:
            continue
        is_lora = isinstance(module, LoRALayer)
        base = module.base_layer if is_lora else module
        if type(base) in classes:
            linear_names.append(name)
        if tm == ALL_LINEAR:
            hit = isinstance(base, linear_types) and base is not head and not any((name + ".").startswith(p) for p in saved)
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
        if any((name + ".").startswith(p) for p in saved):
            raise TargetModuleError(
                f"target module {name!r} lies in modules_to_save module {saved[0][:-1]!r}: a module is either "
                "adapted with LoRA or saved in full, not both"
            )
        if isinstance(module, mts.ModulesToSaveWrapper):
            raise TargetModuleError(f"target module {name!r} is a modules_to_save module of another adapter")
        if type(base) not in classes:
            raise TargetModuleError(
                f"target module {name!r} is a {type(module).__name__}, which lorakit cannot adapt "
                f"(supported: {', '.join(t.__name__ for t in classes)})"
            )
        cls = type(module) if is_lora else classes[type(base)]
        check = getattr(cls, "check_base", None)
        if check is not None:
            check(base, name)
        if is_lora and adapter_name in module.r:
            raise AdapterExistsError(f"adapter {adapter_name!r} is already injected into {name!r}")
        r = config.rank_for(name)
        n_in, n_out = base_features(base)
        targets.append(Target(name, r, config.alpha_for(name), n_in, n_out, adapter_shapes(cls, base, r)))
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


def inject(model: nn.Module, config: LoRAConfig, adapter_name: str = "default", *, init_weights: bool = True) -> nn.Module:
    """Freeze ``model`` and attach a LoRA adapter to every module ``config`` targets.

    Each matched module is replaced in place by the LoRA class ``LORA_CLASSES``
    maps its type to (``nn.Linear`` -> ``LoRALinear``, transformers ``Conv1D`` ->
    ``LoRAConv1D``, ``nn.Embedding`` -> ``LoRAEmbedding``, ``nn.Conv2d`` ->
    ``LoRAConv2d``); a module already wrapped gets a further adapter. Modules in
    ``config.modules_to_save`` get a full trainable copy for this adapter
    (``lorakit.modules_to_save``). A module whose weight is tied to another
    module's (GPT-2's ``lm_head`` and ``transformer.wte``) is untied while merged,
    never written through (``layer_types.UntieOnMerge``). Every parameter that
    existed before is frozen, the new adapter is the active one and its A and B
    (and its modules_to_save copies) are the only trainable parameters. Nothing
    changes if an error is raised.

    ``init_weights=False`` leaves A and B uninitialised, for callers that copy
    every adapter weight in right after (``load_adapter``).

    Returns:
        the same ``model`` object.

    Raises:
        TargetModuleError, AdapterExistsError: see ``find_targets``.
    """
    from .adapters import _is_merged, check_adapter_name, set_adapter  # adapters.py builds on this module

    check_adapter_name(adapter_name)
    if _is_merged(model):
        raise MergeStateError("cannot inject an adapter while adapters are merged; call unmerge(model) first")
    targets = find_targets(model, config, adapter_name)
    saved = mts.find_modules_to_save(model, config, adapter_name)
    conv1d = conv1d_type()
    if conv1d is not None and not config.fan_in_fan_out:
        if any(isinstance(_base(model.get_submodule(t.name)), conv1d) for t in targets):
            config = dataclasses.replace(config, fan_in_fan_out=True)  # as PEFT records it for Conv1D models
    shared = _shared_weights(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for t in targets:
        module = model.get_submodule(t.name)
        if not isinstance(module, LoRALayer):
            owners = shared.get(id(getattr(module, "weight", None)), ())
            tied = tuple(n for n in owners if model.get_submodule(n) is not module)
            cls = LORA_CLASSES[type(module)]
            if tied and cls is LoRALinear:
                cls = TiedLoRALinear
            module = cls.from_base(module)
            if tied:
                module.tied_with = tied  # merge unties (layer_types.UntieOnMerge)
            set_submodule(model, t.name, module)
        module.add_adapter(
            adapter_name,
            r=t.r,
            lora_alpha=t.lora_alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            init_lora_weights=config.init_lora_weights if init_weights else None,
        )
    if not hasattr(model, "lora_configs"):
        model.lora_configs = {}  # a plain dict attribute: state_dict stays unchanged
    model.lora_configs[adapter_name] = config
    mts.add_copies(model, saved, adapter_name)
    set_adapter(model, adapter_name)
    return model


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoRALayer) else module


def _shared_weights(model: nn.Module) -> dict[int, tuple[str, ...]]:
    """id(parameter) -> the qualified names of every module owning it, for parameters owned twice or more (tied).

    Only base parameters are looked at (LoRA layers are entered through their base layer), so
    the cost does not grow with the number of resident adapters.
    """
    owners: dict[int, list[str]] = {}
    for name, module in walk(model):
        if isinstance(module, LoRALayer):
            module, name = module.base_layer, f"{name}.base_layer" if name else "base_layer"
        elif isinstance(module, mts.ModulesToSaveWrapper):
            module, name = module.original_module, f"{name}.original_module"
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(name)
    return {k: tuple(v) for k, v in owners.items() if len(v) > 1}
