"""Model-level adapter operations: list, activate, disable, delete, merge, unmerge, unload.

Rules (one place, so the layers stay simple):
- ``inject`` and ``load_adapter`` make the new adapter the only active one, so "trainable"
  always means "the adapter being added".
- Only active adapters take part in forward and have ``requires_grad=True``.
- While any adapter is merged, changing the active set is refused (``MergeStateError``): a
  merged weight never silently mixes with a switch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from .errors import MergeStateError
from .tree import (
    activate, adapter_modules, check_known, drop_state, is_merged, lora_layers, model_state, name_list,
    outside_mixed_batch, set_submodule,
)


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters injected into ``model``, in injection order."""
    return list(model_state(model).configs)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters (empty inside ``disable_adapters``)."""
    return list(model_state(model).active)


def set_adapter(model: nn.Module, name_or_names: str | list[str]) -> None:
    """Make ``name_or_names`` the active adapter(s); several active adapters add their deltas.

    Active adapters' A and B get ``requires_grad=True``, all others False. O(1) in the base
    size: no base weight is touched.

    Raises:
        ConfigError: a name that is not a str.
        AdapterNotFoundError: an unknown name.
        MergeStateError: adapters are merged and the active set would change.
    """
    names = name_list(name_or_names)
    check_known(model, names)
    if is_merged(model) and names != active_adapters(model):
        raise MergeStateError("cannot switch adapters while merged; call unmerge(model) first")
    activate(model, names)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager in which ``model`` gives base-model outputs.

    Merged adapters are unmerged on entry and merged again on exit (bitwise the same
    weights). The previous active set is restored on exit, also after an exception; nesting
    is allowed.

    Raises:
        MixedBatchError: inside ``mixed_batch`` (pass None rows there instead).
    """
    outside_mixed_batch(model, "disable_adapters inside mixed_batch is not supported; pass None rows instead")
    previous = active_adapters(model)
    was_merged = is_merged(model)
    if was_merged:
        unmerge(model)
    activate(model, [], set_grad=False)
    try:
        yield model
    finally:
        known = set(list_adapters(model))  # an adapter deleted inside the block stays deleted
        activate(model, [n for n in previous if n in known], set_grad=False)
        if was_merged:
            merge(model)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer; LoRA layers left with no adapter stay wrapped,
    ``modules_to_save`` wrappers left with no copy are replaced by their original module.

    Raises:
        ConfigError: ``name`` is not a str.
        AdapterNotFoundError: unknown name.
        MergeStateError: the adapter is merged (unmerge first).
        MixedBatchError: called inside ``mixed_batch``.
    """
    check_known(model, [name])
    outside_mixed_batch(model, f"cannot delete adapter {name!r} inside mixed_batch")
    if any(name in module.merged_adapters for _, module in adapter_modules(model)):
        raise MergeStateError(f"adapter {name!r} is merged; call unmerge(model) before deleting it")
    for mname, module in list(adapter_modules(model)):
        if module.has_adapter(name):
            module.delete_adapter(name)
            if module.unwrap_when_empty and not module.adapter_names:
                set_submodule(model, mname, module.unwrapped(merge=False))
    state = model_state(model)
    del state.configs[name]
    state.active = [n for n in state.active if n != name]


def merge(model: nn.Module) -> nn.Module:
    """Merge the active adapters into the base weights: ``W' = W + s·B A``.

    Idempotent: an adapter already merged is not added again. Merged outputs equal unmerged
    ones within float rounding (Hu et al. 2021, Sec. 4.1: no inference latency). Returns
    ``model``.

    Raises:
        QuantizedBaseError: a base weight is quantised (``lorakit.dequantize`` first); nothing is merged.
        MixedBatchError: inside ``mixed_batch`` (every row would get the merged adapters); nothing is merged.
    """
    outside_mixed_batch(model, "cannot merge inside mixed_batch: every row would get the merged adapters")
    check_merge(model)
    for _, module in adapter_modules(model):
        module.merge()
    return model


def check_merge(model: nn.Module) -> None:
    """Ask every LoRA layer whether its active adapters can be merged, before any weight changes."""
    for name, layer in lora_layers(model):
        layer.check_merge(name)


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every base weight bit for bit; a no-op on an unmerged model. Returns ``model``."""
    for _, module in adapter_modules(model):
        module.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRA layer with its plain base module and return ``model``.

    With ``merge=True`` the active adapters are merged first (``W' = W + s·B A``) and a
    ``modules_to_save`` module keeps the active adapter's copy; with ``merge=False`` the
    original weights and modules come back. Afterwards no LoRA class or parameter is left and
    ``state_dict()`` keys equal the original model's. A merged adapter on one of a tied embedding / head pair
    leaves the two apart: a transformers config then says ``tie_word_embeddings: false``.

    Raises:
        QuantizedBaseError: ``merge=True`` and a base weight is quantised; nothing is changed.
        MixedBatchError: inside ``mixed_batch``; nothing is changed.
    """
    outside_mixed_batch(model, "cannot unload inside mixed_batch: its rows route through the LoRA layers")
    if merge:
        check_merge(model)
    for name, module in list(adapter_modules(model)):
        set_submodule(model, name, module.unwrapped(merge))
    drop_state(model)
    _untied(model)
    return model


def _untied(model: nn.Module) -> None:
    """A config saying ``tie_word_embeddings`` set False where the input embedding and the head no longer share
    their weight (an adapter on either of a tied pair, merged: the other keeps the base weight), so a saved
    checkpoint, or a GGUF written from it, does not give the head the embedding's merged rows."""
    config = getattr(model, "config", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (getattr(config, "tie_word_embeddings", False) and emb is not None and head is not None
            and getattr(emb, "weight", None) is not getattr(head, "weight", None)):
        config.tie_word_embeddings = False


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; shared (tied) tensors count once.

    After ``inject`` on a frozen model, trainable = sum of r·(in + out) over the adapted layers. A
    bitsandbytes 4-bit weight counts the weights it stands for (its quantised shape: out · in), not its
    packed bytes (two codes a byte), as PEFT counts it.
    """
    params = list(model.parameters())  # deduplicated by identity
    return sum(_numel(p) for p in params if p.requires_grad), sum(_numel(p) for p in params)


def _numel(p: torch.Tensor) -> int:
    if type(p).__name__ == "Params4bit":
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        if shape is not None:
            return math.prod(shape)
        return p.numel() * 2 * getattr(getattr(p, "quant_storage", None), "itemsize", 1)  # PEFT's rule
    return p.numel()
