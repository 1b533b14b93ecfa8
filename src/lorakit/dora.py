"""DoRA's math (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. 5 and §4.3):
the weight is split into a magnitude and a direction, LoRA adapts the direction and the magnitude
``m`` (one value per output feature) is trained directly::

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_c

``‖·‖_c`` is the norm of each output feature's slice of the weight (a row of a Linear weight, a
column of a transformers ``Conv1D`` or ``nn.Embedding`` weight, an output channel of a Conv2d
kernel). The norm is detached from the graph (§4.3: it moves with ``B·A`` but gets no gradient),
so with ``g = m / ‖W + s·B·A‖_c`` the layer adds ``(g − 1)·(W x) + g·s·B A x`` to its base output,
which is how PEFT computes it (``peft.tuners.lora.dora``); lorakit's files and outputs match PEFT's.
"""

from __future__ import annotations

import torch

from .versions import watch_optimizer_steps


def column_norm(w: torch.Tensor, out_axis: int) -> torch.Tensor:
    """``‖w‖_c``: the L2 norm of each slice of ``w`` along ``out_axis``, shape (w.shape[out_axis],)."""
    dims = tuple(d for d in range(w.dim()) if d != out_axis)
    return torch.linalg.vector_norm(w, dim=dims)


def along(v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """The 1-D ``v`` shaped to broadcast along ``axis`` of an ``ndim``-dimensional tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def writable(out: torch.Tensor) -> torch.Tensor:
    """A fresh view of ``out`` for in-place writes. ``out`` may itself be a view (a transformers
    ``Conv1D`` output) whose autograd history went stale when an earlier adapter wrote through another
    view of it (a fused ``addmm_``); torch then refuses a direct in-place op on it as on a leaf."""
    return out.view(out.shape)


def initial_magnitude(weight: torch.Tensor, delta: torch.Tensor, out_axis: int) -> torch.Tensor:
    """``m₀ = ‖W + s·B·A‖_c`` (eq. 5 at initialisation: W' = W while B·A = 0), in ``delta``'s dtype."""
    with torch.no_grad():
        return column_norm(weight.to(delta.dtype) + delta, out_axis)


class NormCache:
    """``‖W + s·B·A‖_c`` of one adapter, recomputed only when A, B, W (their objects, storage, version
    counters, dtypes, devices) or the scaling changed: generation and evaluation compute it once,
    training once per step. ``clear`` drops it (``LoRAAdapter._apply``: a move or cast; ``train()`` /
    ``eval()``). An in-place edit through ``.data`` bumps no version counter, so it is seen only after
    one of those (as with PEFT's DoRA cache, which is keyed on the adapter name alone)."""

    def __init__(self) -> None:
        watch_optimizer_steps()  # fused optimizer steps move no version counter by themselves (lorakit.versions)
        self._tensors: tuple = ()
        self._stamp: tuple = ()
        self._pins: tuple = ()
        self._norm: torch.Tensor | None = None

    def clear(self) -> None:
        self._tensors, self._stamp, self._pins, self._norm = (), (), (), None

    def get(self, tensors: tuple, extra: tuple, compute) -> torch.Tensor:
        """The cached norm, or ``compute()`` (run without grad) when ``tensors`` or ``extra`` changed."""
        stamp = tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors) + extra
        same = len(tensors) == len(self._tensors) and all(x is y for x, y in zip(tensors, self._tensors))
        stale = self._norm is None or (self._norm.is_inference() and not torch.is_inference_mode_enabled())
        if stale or not same or stamp != self._stamp:  # an inference tensor cannot be saved for backward
            with torch.no_grad():  # detached (§4.3): no gradient flows through the norm
                self._norm = compute()
            # the stored tensors kept (the same storage), so no later tensor gets an address compared here:
            # ``p.data = t`` bumps no version counter (``bank.AdapterBank._stamp``)
            self._tensors, self._stamp, self._pins = tensors, stamp, tuple(t.detach() for t in tensors)
        return self._norm


def scale(layer, ad) -> torch.Tensor:
    """``g = m / ‖W + s·B·A‖_c`` of adapter ``ad`` on ``layer``, shape (out,), in the adapter dtype;
    the norm is detached (§4.3) and cached, ``g`` carries the gradient of ``m``."""
    a, b = ad._parameters["lora_A"], ad._parameters["lora_B"]
    w = layer.base_layer.weight

    def norm() -> torch.Tensor:
        return column_norm(layer.dense_weight(a.dtype) + ad.delta(layer._product, a.dtype), layer.weight_out_axis)

    n = ad.norm_cache.get((a, b, w), (ad.scaling,), norm)
    return ad.lora_magnitude_vector.reshape(-1) / n


def add_dora_(layer, ad, out: torch.Tensor, x: torch.Tensor) -> None:
    """``out += (g − 1)·(W x) + g·s·B A x`` in place, ``out`` being ``layer``'s base output (or the
    sum so far: adapters apply in turn, as in PEFT). ``W x`` is ``out`` without the bias; while
    training with dropout it is recomputed on the dropped input, which the bypass also sees (PEFT)."""
    a = ad._parameters["lora_A"]
    dtype = a.dtype
    g = scale(layer, ad)
    if x.is_floating_point() and x.dtype is not dtype:
        x = x.to(dtype)
    if ad._dropout and layer.training:
        x = ad.lora_dropout(x)
        base = layer.base_without_bias(x, layer.dense_weight(dtype))
    else:
        bias = getattr(layer.base_layer, "bias", None)  # a copy either way: out is added to in place below
        base = out.to(dtype, copy=True) if bias is None else (out - along(bias, out.dim(), layer.output_axis)).to(dtype)
    lora = layer._up(layer._down(x, a) * ad.scaling, ad._parameters["lora_B"])
    g = along(g, out.dim(), layer.output_axis)
    writable(out).add_(((g - 1) * base + g * lora).to(out.dtype))

