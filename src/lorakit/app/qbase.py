"""Quantised bases in the commands: ``lorakit train --quantize nf4|int8`` quantises the loaded base
(``lorakit.quantize_base``), the adapter's ``lorakit.json`` records the kind under ``"quantize"``, and
``eval`` / ``generate`` rebuild the same quantised base for it; ``merge`` rebuilds it, then dequantises
(``lorakit.dequantize``) and writes a full-precision checkpoint holding dequant(W) + s·B·A.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from lorakit import dequantize, merge, quantization, quantize_base

from .allocator import drop_file_pages, trim
from .console import quiet_bitsandbytes


def quantize_loaded(model: nn.Module, kind: str) -> None:
    """``quantize_base(model, kind)`` on a freshly loaded model (output head and embeddings kept), then
    give every remaining tensor its own memory and return freed memory to the OS (``allocator.trim``).

    transformers loads safetensors through one memory map per file, and every page of it the quantisation
    reads stays in this process's RSS while the map lives: each replaced weight's pages are dropped
    right after its layer is quantised (``allocator.drop_file_pages``), and the kept tensors (the
    embedding, norms) are copied so that the map goes. Measured on SmolLM2-135M (NF4): the load's peak
    RSS 1149 MiB before the pages were dropped, 747 MiB after.

    Raises:
        QuantizedBaseError: bitsandbytes is missing.
    """
    quiet_bitsandbytes()
    replaced = _sole_weights(model)  # held until dropped: the map cannot go (and its range be reused) before

    def each(name: str, layer: nn.Module) -> None:
        weight = replaced.pop(name, None)
        if weight is not None:
            drop_file_pages(weight)
        trim()

    quantize_base(model, kind, each=each)
    replaced.clear()
    _own_memory(model)
    trim()


def _sole_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``name -> weight`` of each ``nn.Linear`` whose weight's storage no other parameter or buffer shares
    (a tied or shared weight may be kept, so its pages are never dropped)."""
    refs = [t for _, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))]
    owners = Counter(t.untyped_storage().data_ptr() for t in refs if t is not None)
    return {n: m.weight for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and owners[m.weight.untyped_storage().data_ptr()] == 1}


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
