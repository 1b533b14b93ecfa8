"""Merged weights: the adapters of one layer folded into its base weight (and bias), in turn.

Plain LoRA adds ``ΔW = s·B·A`` (Hu et al. 2021, eq. 3) and, with PEFT's ``lora_bias``, ``s·b_B`` to
the bias; DoRA rescales what is there so far, ``m/‖W + ΔW‖_c · (W_sofar + ΔW)`` with the norm of the
original weight (Liu et al. 2024, eq. 5), and its bias term ``(g − 1)`` applies to the adapters'
bias shifts only, never to the base bias. The order is the order the forward applies the adapters,
so merged and unmerged outputs agree. Everything is formed in ``acc`` (float32, or float64 for a
float64 weight) from the original tensors and rounded once by the caller.
"""

from __future__ import annotations

import torch

from . import dora


def merged(layer, names: list[str], weight: torch.Tensor, bias: torch.Tensor | None,
           acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W', b')`` of ``layer`` with adapters ``names`` merged into the original ``weight`` and ``bias``
    (``b'`` is None when no adapter has a ``lora_bias``), in dtype ``acc``."""
    original = weight.to(acc)
    total = original.clone()
    shifts = None  # the adapters' bias shifts (lora_bias), relative to the base bias
    for n in names:
        ad = layer.adapter(n)
        delta = ad.delta(layer._product, acc).to(total.device)
        if ad.use_dora:
            g = ad.lora_magnitude_vector.detach().reshape(-1).to(total) / dora.column_norm(original + delta,
                                                                                           layer.weight_out_axis)
            total = (total + delta) * dora.along(g, total.dim(), layer.weight_out_axis)
            if shifts is not None:
                shifts = shifts * g
        else:
            total += delta
            if ad.lora_B_bias is not None:
                shift = ad.lora_B_bias.detach().to(total) * ad.scaling
                shifts = shift if shifts is None else shifts + shift
    if shifts is None:
        return total, None
    return total, bias.to(acc) + shifts
