"""A model's transformer blocks, and what the training loop does per block: ``torch.compile`` and
activation (gradient) checkpointing. (Sharding them across processes: ``distributed.shard_blocks``.)"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def blocks(model) -> list[torch.nn.Module]:
    """The model's transformer blocks: the longest ``nn.ModuleList`` whose entries share one type."""
    best: list[torch.nn.Module] = []
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > len(best) and len({type(b) for b in m}) == 1:
            best = list(m)
    return best


@contextmanager
def compile_blocks(model, on: bool = True):
    """``torch.compile`` each transformer block (``blocks``) inside the context; eager again after.

    One compiled graph serves every block (same code, parameters are graph inputs) and dynamic
    shapes cover the packed rows' changing length. The compiled graph fuses the blocks' elementwise
    work (norms, rotary embedding, activation, residual adds and their backward), which on CPU
    costs per op rather than per FLOP. Outputs equal eager within float rounding.
    """
    compiled = blocks(model) if on else []
    for b in compiled:
        b.compile(dynamic=True)
    try:
        yield
    finally:
        for b in compiled:
            b._compiled_call_impl = None  # what nn.Module.compile set: back to eager


def set_checkpointing(model, on: bool) -> None:
    """Switch activation (gradient) checkpointing of a transformers model on or off.

    Non-reentrant checkpointing, so LoRA layers inside checkpointed blocks get gradients
    even though the (frozen) embedding output does not require grad.
    """
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


@contextmanager
def checkpointed(model, on: bool):
    """Activation checkpointing on inside the block when ``on`` (off again after, even on an error)."""
    if not on:
        yield
        return
    set_checkpointing(model, True)
    try:
        yield
    finally:
        set_checkpointing(model, False)
