"""Model-level adapter operations: activate, disable, delete, merge, unmerge, unload.

Rules (one place, so the layers stay simple):
- ``inject`` and ``load_adapter`` make the new adapter the only active one, so
  "trainable" always means "the adapter being added".
- Only active adapters take part in forward and have ``requires_grad=True``.
- While any adapter is merged, changing the active set is refused
  (``MergeStateError``): a merged weight never silently mixes with a switch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .errors import AdapterNotFoundError, ConfigError, MergeStateError, MixedBatchError
from . import modules_to_save
from .inject import lora_layers, set_submodule


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters injected into ``model``, in injection order."""
    return list(getattr(model, "lora_configs", {}))


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters (empty inside ``disable_adapters``)."""
    return list(getattr(model, "lora_active", []))


def check_adapter_name(name) -> str:
    """``name`` if it is a str, else ``ConfigError`` (before anything is changed)."""
    if not isinstance(name, str):
        raise ConfigError(f"adapter name must be a str, got {type(name).__name__} {name!r}")
    return name


def _name_list(name_or_names) -> list[str]:
    """A name or a list of names -> a list without repeats (an adapter is active once)."""
    if isinstance(name_or_names, str):
        return [name_or_names]
    if not isinstance(name_or_names, (list, tuple)):
        raise ConfigError(f"expected an adapter name or a list of names, got {type(name_or_names).__name__}")
    return list(dict.fromkeys(check_adapter_name(n) for n in name_or_names))


def _check_names(model: nn.Module, names: list[str]) -> None:
    known = list_adapters(model)
    for n in names:
        if n not in known:
            raise AdapterNotFoundError(f"adapter {n!r} not found; the model has {known}")


def _is_merged(model: nn.Module) -> bool:
    return any(layer.merged_adapters for _, layer in lora_layers(model))


def set_adapter(model: nn.Module, name_or_names: str | list[str]) -> None:
    """Make ``name_or_names`` the active adapter(s); several active adapters add their deltas.

    Active adapters' A and B get ``requires_grad=True``, all others False. O(1) in
    the base size: no base weight is touched.

    Raises:
        AdapterNotFoundError: an unknown name.
        MergeStateError: adapters are merged and the active set would change.
    """
    names = _name_list(name_or_names)
    _check_names(model, names)
    if _is_merged(model) and names != active_adapters(model):
        raise MergeStateError("cannot switch adapters while merged; call unmerge(model) first")
    _apply_active(model, names)


def _apply_active(model: nn.Module, names: list[str]) -> None:
    # Only adapters whose state changes are touched, so switching costs the same
    # with 100 resident adapters as with 2.
    was = set(active_adapters(model)) if hasattr(model, "lora_active") else set(list_adapters(model))
    touched = was | set(names)
    model.lora_active = list(names)
    for _, layer in lora_layers(model):
        layer.active_adapters = [n for n in names if n in layer.r]
        for n in touched:
            if n in layer.r:
                for p in layer.adapter_parameters(n):
                    p.requires_grad_(n in names)
    modules_to_save.apply_active(model, names)  # full copies (e.g. a classifier head) follow the active set


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager in which ``model`` gives base-model outputs.

    Merged adapters are unmerged on entry and merged again on exit (bitwise the
    same weights). The previous active set is restored on exit, also after an
    exception; nesting is allowed.
    """
    if any(layer._row_plan is not None for _, layer in lora_layers(model)):
        raise MixedBatchError("disable_adapters inside mixed_batch is not supported; pass None rows instead")
    previous = active_adapters(model)
    was_merged = _is_merged(model)
    if was_merged:
        unmerge(model)
    for _, layer in lora_layers(model):
        layer.active_adapters = []
    modules_to_save.apply_active(model, [], set_grad=False)  # wrappers use their original module
    model.lora_active = []
    try:
        yield model
    finally:
        known = set(list_adapters(model))  # an adapter deleted inside the block stays deleted
        _apply_active(model, [n for n in previous if n in known])
        if was_merged:
            merge(model)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer; LoRA layers left with no adapter stay wrapped.

    Raises:
        AdapterNotFoundError: unknown name.
        MergeStateError: the adapter is merged (unmerge first).
    """
    _check_names(model, [name])
    layers = [layer for _, layer in lora_layers(model) if name in layer.r]
    if any(name in layer.merged_adapters for layer in layers):
        raise MergeStateError(f"adapter {name!r} is merged; call unmerge(model) before deleting it")
    for layer in layers:
        layer.delete_adapter(name)
    modules_to_save.delete_adapter(model, name)  # drops its copies; a wrapper left empty is unwrapped
    del model.lora_configs[name]
    model.lora_active = [n for n in active_adapters(model) if n != name]


def merge(model: nn.Module) -> nn.Module:
    """Merge the active adapters into the base weights: ``W' = W + s * B @ A``.

    Idempotent: an adapter already merged is not added again. Merged outputs equal
    unmerged ones within float rounding (Hu et al. 2021, Sec. 4.1: no inference
    latency). Returns ``model``.
    """
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every base weight bit for bit; a no-op on an unmerged model. Returns ``model``."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRA layer with its plain base module and return ``model``.

    With ``merge=True`` the active adapters are merged first (``W' = W + s B A``);
    with ``merge=False`` the original weights come back. Afterwards no LoRA class
    or parameter is left and ``state_dict()`` keys equal the original model's.
    """
    for name, layer in list(lora_layers(model)):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        layer._original_weight = None  # the merged weight is now the weight
        set_submodule(model, name, layer.base_layer)
    modules_to_save.unload(model, merge)  # merge=True: the active copy stays; False: the original
    for attr in ("lora_configs", "lora_active"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; shared (tied) tensors count once.

    After ``inject`` on a frozen model, trainable = sum of r * (in + out) over the
    adapted layers.
    """
    params = list(model.parameters())  # deduplicated by identity
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
