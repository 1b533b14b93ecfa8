"""Quantised bases in the commands: ``lorakit train --quantize nf4|int8`` quantises the loaded base
(``lorakit.quantize_base``), the adapter's ``lorakit.json`` records the kind under ``"quantize"``, and
``eval`` / ``generate`` rebuild the same quantised base for it; ``merge`` rebuilds it, then dequantises
(``lorakit.dequantize``) and writes a full-precision checkpoint holding dequant(W) + s·B·A.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from lorakit import dequantize, merge, quantization, quantize_base

from .console import quiet_bitsandbytes


def quantize_loaded(model: nn.Module, kind: str) -> None:
    """``quantize_base(model, kind)`` on a freshly loaded model (output head and embeddings kept), then
    give every remaining tensor its own memory and return freed memory to the OS (``_trim``).

    transformers loads safetensors through one memory map per file; the kept tensors (the embedding,
    norms) would hold that whole map, and every page the quantisation read, resident. Copying them lets
    the map go, so the float32 linear weights leave memory once quantised.

    Raises:
        QuantizedBaseError: bitsandbytes is missing.
    """
    quiet_bitsandbytes()
    quantize_base(model, kind, each=lambda name, layer: _trim())
    _own_memory(model)
    _trim()


def _trim() -> None:
    """Hand the C allocator's free memory back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    Quantising frees a float32 weight and bitsandbytes' temporaries per layer; glibc keeps such freed
    blocks, so without this SmolLM2-135M's process stays ~270 MiB larger after quantising."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _own_memory(model: nn.Module) -> None:
    """Replace every floating parameter and buffer by a copy (the quantised weights are new tensors already)."""
    copies: dict[int, torch.Tensor] = {}  # tied tensors stay tied

    def copy(t: torch.Tensor, param: bool) -> torch.Tensor:
        if id(t) not in copies:
            c = t.detach().clone()
            copies[id(t)] = nn.Parameter(c, requires_grad=t.requires_grad) if param else c
        return copies[id(t)]

    with torch.no_grad():
        for m in model.modules():
            for store, param in ((m._parameters, True), (m._buffers, False)):
                for n, t in store.items():
                    if t is not None and t.is_floating_point():
                        store[n] = copy(t, param)


def merge_unless_quantized(model: nn.Module) -> None:
    """Merge the active adapters for faster decoding, except on a quantised base: there the adapters
    stay unmerged (a merge would re-quantise; ``lorakit merge`` dequantises instead)."""
    if quantization(model) is None:
        merge(model)


def full_precision(model: nn.Module) -> str | None:
    """Dequantise ``model`` if its base is quantised (float32 nn.Linear holding dequant(W)); the kind it had."""
    kind = quantization(model)
    if kind is not None:
        dequantize(model, torch.float32)
    return kind
