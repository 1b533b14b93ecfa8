"""PEFT's ``lora_bias=True``: B gets a bias ``b_B`` (out,), so the bypass is ``s·(B A x + b_B)``,
saved under PEFT's key ``lora_B.bias``; merging adds ``s·b_B`` to the base layer's bias
(``lorakit.fold``). PEFT uses it to train an adapter that can shift the layer's output; its
initialisation is PEFT's (zeros, or nn.Linear's uniform init with fan-in r for
``init_lora_weights=False``)."""

from __future__ import annotations

import torch
from torch import nn

from .dora import along, writable


def initial(out_features: int, like: torch.Tensor, r: int, init_lora_weights) -> torch.Tensor:
    """``b_B`` (out_features,) on ``like``'s device and dtype: zeros, uniform ±1/sqrt(r) for
    ``init_lora_weights=False``, uninitialised for None (weights are copied in next)."""
    bias = torch.empty(out_features, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        if init_lora_weights is False:
            nn.init.uniform_(bias, -1 / r**0.5, 1 / r**0.5)
        elif init_lora_weights is not None:
            nn.init.zeros_(bias)
    return bias


def add_(out: torch.Tensor, ad, axis: int, rows: torch.Tensor | None = None) -> None:
    """``out += s · b_B`` of adapter ``ad`` along output axis ``axis``, on rows ``rows`` of ``out`` if given."""
    bias = along(ad.lora_B_bias * ad.scaling, out.dim(), axis).to(out.dtype)
    if rows is None:
        writable(out).add_(bias)
    else:
        writable(out).index_add_(0, rows, bias.expand(len(rows), *out.shape[1:]))
