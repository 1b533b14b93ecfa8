"""The model tree and its adapter state: walking a model without entering lorakit's own modules,
replacing a submodule, and reading or changing the one ``AdapterState`` of a model."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .errors import AdapterExistsError, AdapterNotFoundError, ConfigError, MixedBatchError
from .adapter import check_adapter_name
from .layers import LoRALayer
from .state import AdapterModule, AdapterState

STATE_ATTR = "lora_state"  # the model's AdapterState: a plain attribute, so state_dict() is unchanged


def walk(model: nn.Module, into: tuple[type, ...] = ()) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(qualified_name, module)`` like ``named_modules`` (each module once), but without
    descending into lorakit's modules (LoRA layers, ``modules_to_save`` wrappers: their children
    are ours), except through the types listed in ``into``.

    The walk costs the base model's module count however many adapters are resident.
    """
    stack, seen = [("", model)], set()
    while stack:
        prefix, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield prefix, module
        if isinstance(module, AdapterModule) and not isinstance(module, into):
            continue
        children = [(f"{prefix}.{n}" if prefix else n, m) for n, m in module._modules.items() if m is not None]
        stack.extend(reversed(children))


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """Yield ``(qualified_name, module)`` for every LoRA layer and ``modules_to_save`` wrapper."""
    for name, module in walk(model):
        if isinstance(module, AdapterModule):
            yield name, module


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """Yield ``(qualified_name, layer)`` for every LoRA layer in ``model``."""
    for name, module in adapter_modules(model):
        if isinstance(module, LoRALayer):
            yield name, module


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def model_state(model: nn.Module) -> AdapterState:
    """The model's ``AdapterState`` (an empty one, not attached, if nothing was injected)."""
    state = getattr(model, STATE_ATTR, None)
    return state if isinstance(state, AdapterState) else AdapterState()


def outside_mixed_batch(model: nn.Module, refusal: str) -> None:
    """Raise ``MixedBatchError(refusal)`` while a ``mixed_batch`` block is open on ``model``: its rows route
    through the LoRA layers and the factors the block checked, which this change would pull from under it."""
    if model_state(model).rows is not None:
        raise MixedBatchError(refusal)


def attach_state(model: nn.Module) -> AdapterState:
    """The model's ``AdapterState``, created and attached on first use."""
    state = getattr(model, STATE_ATTR, None)
    if not isinstance(state, AdapterState):
        state = AdapterState()
        object.__setattr__(model, STATE_ATTR, state)
    return state


def drop_state(model: nn.Module) -> None:
    """Remove the ``AdapterState`` ``attach_state`` put on ``model`` (set with ``object.__setattr__``, so
    removed from the instance's own attributes: a ``torch.compile`` wrapper forwards ``delattr`` to the
    module it wraps, which does not hold it)."""
    vars(model).pop(STATE_ATTR, None)


def is_merged(model: nn.Module) -> bool:
    """True if any adapter is merged into a base weight of ``model`` (LoRA layers, trainable tokens, parameters)."""
    return any(module.merged_adapters for _, module in adapter_modules(model))


def name_list(name_or_names) -> list[str]:
    """A name or a list of names -> a list without repeats (an adapter is active once).

    Raises:
        ConfigError: not a str or a list / tuple of str.
    """
    if isinstance(name_or_names, str):
        return [name_or_names]
    if not isinstance(name_or_names, (list, tuple)):
        raise ConfigError(f"expected an adapter name or a list of names, got {type(name_or_names).__name__} "
                          f"{name_or_names!r}")
    return list(dict.fromkeys(check_adapter_name(n) for n in name_or_names))


def check_known(model: nn.Module, names: list[str]) -> None:
    """Raise ``ConfigError`` for the first of ``names`` that is not a str, ``AdapterNotFoundError`` for the
    first the model does not have."""
    known = model_state(model).configs
    for n in names:
        if check_adapter_name(n) not in known:
            raise AdapterNotFoundError(f"adapter {n!r} not found; the model has {list(known)}")


def check_new(model: nn.Module, name: str) -> None:
    """Raise ``AdapterExistsError`` if the model already has an adapter ``name`` (on any layer)."""
    if name in model_state(model).configs:
        raise AdapterExistsError(f"adapter {name!r} already exists in the model; delete_adapter it first "
                                 "or choose another name")


def activate(model: nn.Module, names: list[str], set_grad: bool = True) -> None:
    """Make ``names`` the model's active set; with ``set_grad`` their parameters (and only theirs)
    get ``requires_grad=True``.

    Only adapters whose state changes are touched, so switching costs the same with 100
    resident adapters as with 2, and no base weight is touched.
    """
    state = attach_state(model)
    touched = set(state.active) | set(names)
    state.active = list(names)
    if not set_grad:
        return
    for _, module in adapter_modules(model):
        for n in touched:
            if module.has_adapter(n):  # O(1) on a LoRA layer, however many adapters it holds
                for p in module.adapter_parameters(n):
                    p.requires_grad_(n in names)
