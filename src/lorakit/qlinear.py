"""LoRA on a quantised linear base (QLoRA): ``LoRAQuantLinear``, and how to recognise such a base.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", eq. 5:
``Y = dequant(W_q) X + s·X A^T B^T`` (here in ``nn.Linear``'s layout: ``h = W_q x + s·B A x``),
the quantised weight frozen, the adapters trained in a higher precision. This module needs only
torch: a quantised base is any ``nn.Linear`` subclass whose weight is stored in an integer dtype
(bitsandbytes' ``Linear4bit``: packed uint8 NF4 codes, ``Linear8bitLt``: int8 rows), whoever built
it (``lorakit.quantize_base`` or transformers' ``BitsAndBytesConfig``).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import QuantizedBaseError
from .layers import LoRALinear


def is_quantized_linear(module: nn.Module) -> bool:
    """True for an ``nn.Linear`` subclass whose weight is not floating point (a quantised base)."""
    w = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and isinstance(w, torch.Tensor) and not w.is_floating_point()


def keep_cpu_layout(layer: nn.Module) -> nn.Module:
    """Turn off bitsandbytes' CPU inference layout of a 4-bit layer (and return the layer).

    On a CPU with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit`` rewrites its weight in place, on its
    first forward in eval mode without gradients, into a packed layout computed in bfloat16: the
    outputs then differ from dequant(W)·x by bfloat16 rounding, weights with fewer than 64 inputs
    fail, and a later training forward fails (its bias is added in place). With the layout off, every
    forward multiplies by dequant(W) in the compute dtype, as in training.
    """
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False
    return layer


class LoRAQuantLinear(LoRALinear):
    """``LoRALinear`` on a quantised ``nn.Linear`` (QLoRA, Dettmers et al. 2023, eq. 5).

    ``forward(x) = base_layer(x) + sum over active adapters of s·B(A(dropout(x)))``: the base
    computes with its quantised weight (in its compute dtype), A (r × in_features) and
    B (out_features × r) are float32 whatever the stored weight dtype (uint8 / int8), and the bypass
    is cast to the base output dtype. Mixed batches and ``set_adapter`` work as on ``LoRALinear``.
    A bitsandbytes 4-bit base keeps the plain CPU layout (``keep_cpu_layout``).

    Merging is refused while the base weight is quantised: ``dequant(W) + s·B A`` would have to be
    re-quantised, which rounds most of the delta away (an NF4 step is far larger than a typical
    entry of s·B A). ``lorakit.dequantize`` gives the layer a full-precision ``nn.Linear`` holding
    ``dequant(W)``; from then on it merges and unmerges exactly like ``LoRALinear``.

    Raises:
        TypeError: ``base_layer`` is not an ``nn.Linear``.
    """

    supports_dora = False  # the norm of dequant(W) would need bitsandbytes, which this module does not import

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(keep_cpu_layout(base_layer))

    @staticmethod
    def _base_out(out: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' output, a view its autograd Function made when the layer has a bias, must not be
        changed in place under autograd: a copy of it then (PEFT adds out of place)."""
        return out.clone() if torch.is_grad_enabled() and out._is_view() else out

    @property
    def adapter_dtype(self) -> torch.dtype:
        w = self.base_layer.weight
        return w.dtype if w.is_floating_point() and w.dtype is torch.float64 else torch.float32

    def check_merge(self, name: str, names: list[str] | None = None) -> None:
        """Raise ``QuantizedBaseError`` naming module ``name`` if adapters ``names`` (default: the active
        ones) would be merged into a quantised weight."""
        names = self.active_adapters if names is None else names
        super().check_merge(name, names)
        todo = [n for n in names if n not in self.merged_adapters]
        w = self.base_layer.weight
        if todo and not w.is_floating_point():
            raise QuantizedBaseError(
                f"cannot merge adapter {todo[0]!r} into {name!r}: its base {type(self.base_layer).__name__} holds a "
                f"quantised {w.dtype} weight, and merging would re-quantise W + s·B·A; call "
                "lorakit.dequantize(model) first for a full-precision base, or keep the adapter unmerged"
            )

    def merge(self, names: list[str] | None = None) -> None:
        """``LoRALinear.merge`` once the base is full precision (see the class docstring).

        Raises:
            QuantizedBaseError: the base weight is quantised (nothing is changed).
            AdapterNotFoundError: a name this layer does not have.
        """
        self.check_merge(repr(self.base_layer), names)
        super().merge(names)
