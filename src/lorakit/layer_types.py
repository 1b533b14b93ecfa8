"""LoRA for the other layer types users bring: transformers ``Conv1D``, ``nn.Embedding``,
``nn.Conv2d``; and the registry ``lora_class_for`` that ``inject`` uses.

Each class only says how A and B act on the input and how ``B @ A`` is laid out; the bypass,
the delta and merging are ``LoRALayer``'s (layers.py) and ``LoRAAdapter``'s (adapter.py). The
layouts, PEFT key suffixes and initialisations are PEFT's (``peft.tuners.lora.layer``), so
adapters saved by either library load in the other:

==============  ====================================  =====================================  ================
base            A (PEFT key)                          B (PEFT key)                           delta, shaped
==============  ====================================  =====================================  ================
``Linear``      ``lora_A.weight`` (r, in)             ``lora_B.weight`` (out, r)             (out, in)
``Conv1D``      ``lora_A.weight`` (r, in)             ``lora_B.weight`` (out, r)             (in, out)
``Embedding``   ``lora_embedding_A`` (r, num)         ``lora_embedding_B`` (dim, r)          (num, dim)
``Conv2d``      ``lora_A.weight`` (r, in, kh, kw)     ``lora_B.weight`` (out, r, 1, 1)       (out, in, kh, kw)
==============  ====================================  =====================================  ================

Source: Hu et al. 2021, eq. 3; the embedding and convolution forms follow loralib
(microsoft/LoRA) and PEFT.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TargetModuleError
from .layers import LoRALayer, LoRALinear
from .qlinear import LoRAQuantLinear, is_quantized_linear


def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` class if transformers is already imported, else None.

    A model containing a ``Conv1D`` has imported ``transformers.pytorch_utils``, so looking in
    ``sys.modules`` finds the class without lorakit importing transformers.
    """
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def _transposed(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (b @ a).T


class TiedLoRALinear(LoRALinear):
    """``LoRALinear`` on an ``nn.Linear`` whose weight is tied to another module (a tied ``lm_head``).

    Merging gives the head a private copy of the weight and merges into that, so the shared
    tensor (e.g. the input embedding) is never written; ``unmerge`` re-ties. After
    ``unload(merge=True)`` the head keeps its private merged weight (one more vocab × hidden
    matrix): the model is untied from then on.
    """


class LoRAConv1D(LoRALayer):
    """transformers ``Conv1D`` (GPT-2's fused ``c_attn``, ``c_proj``, ``c_fc``) plus low-rank bypasses.

    ``Conv1D`` computes ``y = x @ W + b`` with W stored (in_features, out_features), the
    transpose of ``nn.Linear`` (PEFT's ``fan_in_fan_out``). The bypass is ``LoRALinear``'s,
    A (r × in) and B (out × r); the merged delta is transposed to the stored layout:
    ``s·(B @ A).T``, shape (in, out). Non-square fused weights (c_attn: (d, 3d)) merge and
    unmerge exactly. x ``(..., in_features)`` -> ``(..., out_features)``.

    Raises:
        TypeError: ``base_layer`` is not a transformers ``Conv1D``.
    """

    batched = True

    def __init__(self, base_layer: nn.Module) -> None:
        cls = conv1d_type()
        if cls is None or not isinstance(base_layer, cls):
            raise TypeError(f"LoRAConv1D wraps transformers' Conv1D, got {type(base_layer).__name__}")
        super().__init__(base_layer)

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        n_in, n_out = base_layer.weight.shape  # stored (in, out)
        return int(n_in), int(n_out)

    _product = staticmethod(_transposed)
    weight_out_axis = 1

    def base_without_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x @ weight


class LoRAEmbedding(LoRALayer):
    """``nn.Embedding`` plus low-rank bypasses (Hu et al. 2021; loralib's ``Embedding``).

    A (r × num_embeddings) and B (embedding_dim × r), saved under PEFT's keys
    ``lora_embedding_A`` / ``lora_embedding_B``. For token ids ``x`` (any integer shape ``(...)``)::

        forward(x) = base_layer(x) + s · F.embedding(x, A.T) @ B.T     # (..., embedding_dim)

    where ``F.embedding`` uses the base layer's ``padding_idx``, ``max_norm``, ``norm_type``,
    and ``scale_grad_by_freq``; the bypass's own gradient is dense even when the base layer is
    ``sparse`` (a sparse gradient of the transposed A cannot be formed; PEFT fails there). No
    dropout on token ids (PEFT neither).
    The merged delta is ``s·(B @ A).T``, shape (num_embeddings, embedding_dim). With ``max_norm``
    set the base layer renormalises rows inside forward, so merged and unmerged outputs differ
    (as in PEFT).

    Init (PEFT's): True or "gaussian": A zeros, B ~ N(0, 1) (output equals the base output);
    False: both ~ N(0, 1).

    Raises:
        TypeError: ``base_layer`` is not an ``nn.Embedding``.
    """

    base_type = nn.Embedding
    peft_suffixes = ("lora_embedding_A", "lora_embedding_B")
    supports_dropout = False
    supports_lora_bias = False

    @staticmethod
    def features(base_layer: nn.Embedding) -> tuple[int, int]:
        return base_layer.num_embeddings, base_layer.embedding_dim

    def _init(self, a: torch.Tensor, b: torch.Tensor, r: int, init_lora_weights) -> None:
        with torch.no_grad():
            if init_lora_weights is True or init_lora_weights == "gaussian":
                nn.init.zeros_(a)
                nn.init.normal_(b)
            elif init_lora_weights is False:
                nn.init.normal_(a)
                nn.init.normal_(b)

    def _down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(  # (..., r)
            x, a.T, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
        )

    _product = staticmethod(_transposed)
    weight_out_axis = 1  # (num_embeddings, embedding_dim): DoRA's magnitude is per embedding dimension

    def base_without_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._down(x, weight.T)


class LoRAConv2d(LoRALayer):
    """``nn.Conv2d`` plus low-rank bypasses (loralib's ``ConvLoRA``; PEFT's ``lora.Conv2d``).

    A (r × in × kh × kw) is applied as a convolution with the base layer's kernel size, stride,
    padding, dilation and padding mode; B (out × r × 1 × 1) as a 1×1 convolution.
    ``forward(x) = base_layer(x) + s·B(A(dropout(x)))``, x ``(N, in, H, W)`` -> ``(N, out, H', W')``.
    Both are linear in x, so the merged delta is ``s·einsum("or,rihw->oihw", B[:, :, 0, 0], A)``,
    the base weight's shape.

    PEFT builds A without the base dilation and padding mode; for the default ``dilation=1,
    padding_mode="zeros"`` both libraries compute the same thing, otherwise lorakit's bypass is
    the one its merge reproduces.

    Raises:
        TypeError: ``base_layer`` is not an ``nn.Conv2d``.
        TargetModuleError: ``groups > 1`` (a grouped kernel has no single low-rank delta).
    """

    base_type = nn.Conv2d
    linear_up = False
    output_axis = 1  # (N, out, H', W')

    @classmethod
    def magnitude_shape(cls, base_layer: nn.Conv2d) -> tuple[int, ...]:
        """DoRA's magnitude as PEFT stores it for a convolution: (1, out, 1, 1)."""
        return (1, base_layer.out_channels, 1, 1)

    def base_without_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, weight, None)

    @staticmethod
    def check_base(base_layer: nn.Conv2d, name: str) -> None:
        if base_layer.groups > 1:
            raise TargetModuleError(
                f"target module {name!r} is an nn.Conv2d with groups={base_layer.groups}; "
                "lorakit adapts only convolutions with groups=1"
            )

    @staticmethod
    def features(base_layer: nn.Conv2d) -> tuple[int, int]:
        return base_layer.in_channels, base_layer.out_channels

    @classmethod
    def factor_shapes(cls, base_layer: nn.Conv2d, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        kh, kw = base_layer.kernel_size
        return (r, base_layer.in_channels, kh, kw), (base_layer.out_channels, r, 1, 1)

    def _down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, a, None)  # the base's stride, padding, dilation, padding mode

    def _up(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, b)

    def _product(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.einsum("or,rihw->oihw", b[:, :, 0, 0], a)


# Base type -> the LoRA class wrapping it. transformers' Conv1D joins on first use (``lora_class_for``).
LORA_CLASSES: dict[type, type[LoRALayer]] = {nn.Linear: LoRALinear, nn.Embedding: LoRAEmbedding, nn.Conv2d: LoRAConv2d}


def lora_classes() -> dict[type, type[LoRALayer]]:
    """Every supported base type and its LoRA class (Conv1D included once transformers is loaded)."""
    conv1d = conv1d_type()
    if conv1d is not None and conv1d not in LORA_CLASSES:
        LORA_CLASSES[conv1d] = LoRAConv1D
    return LORA_CLASSES


def lora_class_for(base_layer: nn.Module, tied: bool = False) -> type[LoRALayer] | None:
    """The LoRA class for ``base_layer``'s exact type (``TiedLoRALinear`` for a tied Linear,
    ``LoRAQuantLinear`` for a quantised ``nn.Linear`` subclass), or None."""
    cls = lora_classes().get(type(base_layer))
    if cls is None and is_quantized_linear(base_layer):
        return LoRAQuantLinear
    return TiedLoRALinear if tied and cls is LoRALinear else cls
