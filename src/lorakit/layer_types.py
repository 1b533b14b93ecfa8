"""LoRA for the other layer types users bring: transformers ``Conv1D``, ``nn.Embedding``, ``nn.Conv2d``.

Each class builds on ``LoRALayer`` (layers.py), which keeps the adapters, the
active set and the exact merge/unmerge. The layouts and initialisations are
PEFT's (``peft.tuners.lora.layer``), so adapters saved by either library load in
the other:

==============  ==============================  =====================================  ================
base            A (PEFT key)                    B (PEFT key)                           delta, shaped
==============  ==============================  =====================================  ================
``Conv1D``      ``lora_A.weight`` (r, in)       ``lora_B.weight`` (out, r)             (in, out)
``Embedding``   ``lora_embedding_A`` (r, num)   ``lora_embedding_B`` (dim, r)          (num, dim)
``Conv2d``      ``lora_A.weight`` (r, in, kh, kw)  ``lora_B.weight`` (out, r, 1, 1)    (out, in, kh, kw)
==============  ==============================  =====================================  ================

Source: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
eq. 3 (``h = W x + B A x``); the embedding and convolution forms follow loralib
(microsoft/LoRA) and PEFT.

The module also holds ``TiedLoRALinear``: an ``nn.Linear`` LoRA layer whose base
weight is shared with another module (a tied ``lm_head``); see ``UntieOnMerge``.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from .errors import TargetModuleError
from .layers import LoRALayer, LoRALinear, _init_pair, adapter_key


def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` class if transformers is already imported, else None.

    A model containing a ``Conv1D`` has imported ``transformers.pytorch_utils``, so
    looking in ``sys.modules`` finds the class without lorakit importing transformers.
    """
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


def _transposed_delta(layer: LoRALayer, name: str) -> torch.Tensor:
    """``s * (B @ A).T`` in float32: the delta for weights stored (in, out), as Conv1D and Embedding do."""
    layer._check(name)
    a, b = layer.lora_weights(name)
    return (b.detach().float() @ a.detach().float()).T * layer.scaling[name]


class UntieOnMerge:
    """Mixin: a layer whose base weight is tied to another module's unties it while merged.

    ``inject`` sets ``tied_with`` (the other qualified names sharing the weight)
    when it wraps such a module, e.g. GPT-2's ``lm_head`` (tied to
    ``transformer.wte``). Merging would otherwise write ``W + delta`` into the
    shared tensor and change the other module too. Policy: **untie**. At merge
    the layer gives its base module a private copy of the weight and merges into
    that; the shared tensor is never written. ``unmerge`` restores the copy bit
    for bit and then re-ties (the base module gets the shared Parameter object
    back), so an unmerged model is tied exactly as before. After
    ``unload(merge=True)`` the head keeps its private merged weight: the model is
    untied from then on (costs one more vocab x hidden matrix).
    """

    tied_with: tuple[str, ...] = ()
    _shared_weight: nn.Parameter | None = None

    def merge(self, names: list[str] | None = None) -> None:
        untied_here = False
        if self.tied_with and self._shared_weight is None:
            shared = self.base_layer.weight
            object.__setattr__(self, "_shared_weight", shared)  # a plain reference, not a parameter of this layer
            self.base_layer.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
            untied_here = True
        try:
            super().merge(names)
        finally:
            if untied_here and not self.merged_adapters:  # nothing was merged: tie back
                self._retie()

    def unmerge(self) -> None:
        super().unmerge()
        self._retie()

    def _retie(self) -> None:
        if self._shared_weight is not None:
            self.base_layer.weight = self._shared_weight
            object.__setattr__(self, "_shared_weight", None)


class TiedLoRALinear(UntieOnMerge, LoRALinear):
    """``LoRALinear`` on an ``nn.Linear`` whose weight is tied to another module (see ``UntieOnMerge``)."""


class LoRAConv1D(UntieOnMerge, LoRALayer):
    """transformers ``Conv1D`` (GPT-2's fused ``c_attn``, ``c_proj``, ``c_fc``) plus low-rank bypasses.

    ``Conv1D`` computes ``y = x @ W + b`` with ``W`` stored (in_features,
    out_features), the transpose of ``nn.Linear`` (PEFT's ``fan_in_fan_out``).
    The bypass is the same as ``LoRALinear``'s: ``s * B(A(dropout(x)))`` with
    ``lora_A[name]`` an ``nn.Linear(in, r)`` (weight r x in) and ``lora_B[name]``
    an ``nn.Linear(r, out)`` (weight out x r); the merged delta is transposed to the
    stored layout: ``delta = s * (B @ A).T``, shape (in, out) (Hu et al. 2021, eq. 3).
    Non-square fused weights (c_attn: (d, 3d)) merge and unmerge exactly.

    Shapes: x ``(..., in_features)`` -> ``(..., out_features)``. Adapter weights are
    float32 when the base weight is float16/bfloat16, else the base dtype.

    Raises:
        TypeError: ``base_layer`` is not a transformers ``Conv1D``.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        cls = conv1d_type()
        if cls is None or not isinstance(base_layer, cls):
            raise TypeError(f"LoRAConv1D wraps transformers' Conv1D, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.weight.shape  # stored (in, out)

    @staticmethod
    def adapter_shapes(base_layer: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        """PEFT key suffix -> shape of adapter tensors for rank ``r``."""
        n_in, n_out = base_layer.weight.shape
        return {"lora_A.weight": (r, n_in), "lora_B.weight": (n_out, r)}

    # the bypass itself is LoRALinear's; only the merged delta's layout differs
    _make_adapter = LoRALinear._make_adapter
    lora_output = LoRALinear.lora_output
    add_lora_ = LoRALinear.add_lora_

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT key suffix -> tensor of adapter ``name``, as stored."""
        a, b = self.lora_weights(name)
        return {"lora_A.weight": a, "lora_B.weight": b}

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s * (B @ A).T`` of adapter ``name`` in float32, shape (in_features, out_features)."""
        return _transposed_delta(self, name)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features} (fan_in_fan_out), r={self.r}"


class LoRAEmbedding(UntieOnMerge, LoRALayer):
    """``nn.Embedding`` plus low-rank bypasses (Hu et al. 2021; loralib's ``Embedding``).

    ``lora_embedding_A[name]`` is a Parameter (r x num_embeddings) and
    ``lora_embedding_B[name]`` a Parameter (embedding_dim x r), PEFT's layout and
    key names. For token ids ``x`` (any integer shape ``(...)``)::

        forward(x) = base_layer(x) + s * F.embedding(x, A.T) @ B.T     # (..., embedding_dim)

    where ``F.embedding`` uses the base layer's ``padding_idx``, ``max_norm``,
    ``norm_type``, ``scale_grad_by_freq`` and ``sparse``, as PEFT does. No dropout is
    applied to token ids (PEFT neither). The merged delta is ``s * (B @ A).T``,
    shape (num_embeddings, embedding_dim). With ``max_norm`` set, the base layer
    renormalises rows inside forward, so merged and unmerged outputs differ (as in PEFT).

    Init (PEFT's): True or "gaussian": A zeros, B ~ N(0, 1) (output equals the
    base output); False: both ~ N(0, 1).

    Raises:
        TypeError: ``base_layer`` is not an ``nn.Embedding``.
    """

    adapter_parts = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"LoRAEmbedding wraps nn.Embedding, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.in_features = base_layer.num_embeddings
        self.out_features = base_layer.embedding_dim

    @staticmethod
    def adapter_shapes(base_layer: nn.Embedding, r: int) -> dict[str, tuple[int, ...]]:
        """PEFT key suffix -> shape of adapter tensors for rank ``r``."""
        return {"lora_embedding_A": (r, base_layer.num_embeddings), "lora_embedding_B": (base_layer.embedding_dim, r)}

    def _make_adapter(self, key: str, r: int, init_lora_weights) -> None:
        w = self.base_layer.weight
        a = torch.empty(r, self.in_features, device=w.device, dtype=self.adapter_dtype)
        b = torch.empty(self.out_features, r, device=w.device, dtype=self.adapter_dtype)
        with torch.no_grad():
            if init_lora_weights is True or init_lora_weights == "gaussian":
                nn.init.zeros_(a)
                nn.init.normal_(b)
            elif init_lora_weights is False:
                nn.init.normal_(a)
                nn.init.normal_(b)
        self.lora_embedding_A[key] = nn.Parameter(a)
        self.lora_embedding_B[key] = nn.Parameter(b)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        key = adapter_key(name)
        return [self.lora_embedding_A[key], self.lora_embedding_B[key]]

    def lora_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of adapter ``name``: (r, num_embeddings) and (embedding_dim, r)."""
        key = adapter_key(name)
        return self.lora_embedding_A[key], self.lora_embedding_B[key]

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT key suffix -> tensor of adapter ``name`` (PEFT saves these without ``.weight``)."""
        a, b = self.lora_weights(name)
        return {"lora_embedding_A": a, "lora_embedding_B": b}

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s * (B @ A).T`` of adapter ``name`` in float32, shape (num_embeddings, embedding_dim)."""
        return _transposed_delta(self, name)

    def lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_weights(name)
        base = self.base_layer
        after_a = F.embedding(  # (..., r)
            x, a.T, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
        )
        return (after_a @ b.T) * self.scaling[name]

    def extra_repr(self) -> str:
        return f"num_embeddings={self.in_features}, embedding_dim={self.out_features}, r={self.r}"


class LoRAConv2d(UntieOnMerge, LoRALayer):
    """``nn.Conv2d`` plus low-rank bypasses (loralib's ``ConvLoRA``; PEFT's ``lora.Conv2d``).

    ``lora_A[name]`` is an ``nn.Conv2d(in_channels, r)`` with the base layer's
    kernel size, stride, padding, dilation and padding mode (weight r x in x kh x
    kw); ``lora_B[name]`` is a 1x1 ``nn.Conv2d(r, out_channels)`` (weight out x r x
    1 x 1). ``forward(x) = base_layer(x) + s * B(A(dropout(x)))``, x ``(N, in, H,
    W)`` -> ``(N, out, H', W')``. Both are linear in x, so the merged delta is
    ``s * einsum("or,rihw->oihw", B[:, :, 0, 0], A)`` (shape of the base weight).

    PEFT builds A without the base dilation and padding mode; for the default
    ``dilation=1, padding_mode="zeros"`` both libraries compute the same thing,
    otherwise lorakit's bypass is the one its merge reproduces.

    Raises:
        TypeError: ``base_layer`` is not an ``nn.Conv2d``.
        TargetModuleError: ``groups > 1`` (a grouped kernel has no single low-rank delta).
    """

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if not isinstance(base_layer, nn.Conv2d):
            raise TypeError(f"LoRAConv2d wraps nn.Conv2d, got {type(base_layer).__name__}")
        self.check_base(base_layer, repr(base_layer))
        super().__init__(base_layer)
        self.in_features = base_layer.in_channels
        self.out_features = base_layer.out_channels

    @staticmethod
    def check_base(base_layer: nn.Conv2d, name: str) -> None:
        """Raise ``TargetModuleError`` naming ``name`` if LoRA cannot adapt this conv."""
        if base_layer.groups > 1:
            raise TargetModuleError(
                f"target module {name!r} is an nn.Conv2d with groups={base_layer.groups}; "
                "lorakit adapts only convolutions with groups=1"
            )

    @staticmethod
    def adapter_shapes(base_layer: nn.Conv2d, r: int) -> dict[str, tuple[int, ...]]:
        """PEFT key suffix -> shape of adapter tensors for rank ``r``."""
        kh, kw = base_layer.kernel_size
        return {"lora_A.weight": (r, base_layer.in_channels, kh, kw), "lora_B.weight": (base_layer.out_channels, r, 1, 1)}

    def _make_adapter(self, key: str, r: int, init_lora_weights) -> None:
        base = self.base_layer
        kw = dict(bias=False, device=base.weight.device, dtype=self.adapter_dtype)
        a = skip_init(
            nn.Conv2d, self.in_features, r, base.kernel_size, stride=base.stride, padding=base.padding,
            dilation=base.dilation, padding_mode=base.padding_mode, **kw,
        )
        b = skip_init(nn.Conv2d, r, self.out_features, (1, 1), stride=(1, 1), **kw)
        _init_pair(a.weight, b.weight, r, init_lora_weights, a.reset_parameters, b.reset_parameters)
        self.lora_A[key] = a
        self.lora_B[key] = b

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT key suffix -> tensor of adapter ``name``, as stored."""
        a, b = self.lora_weights(name)
        return {"lora_A.weight": a, "lora_B.weight": b}

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s * B . A`` of adapter ``name`` in float32, shape (out, in, kh, kw) like the base weight."""
        self._check(name)
        a, b = self.lora_weights(name)
        return torch.einsum("or,rihw->oihw", b.detach().float()[:, :, 0, 0], a.detach().float()) * self.scaling[name]

    def lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        key = adapter_key(name)
        a = self.lora_A[key]
        h = self.lora_dropout[key](x.to(a.weight.dtype))
        return self.lora_B[key](a(h)) * self.scaling[name]

    def extra_repr(self) -> str:
        return f"in_channels={self.in_features}, out_channels={self.out_features}, r={self.r}"


def base_features(base_layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a base layer of any supported type."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    if isinstance(base_layer, nn.Embedding):
        return base_layer.num_embeddings, base_layer.embedding_dim
    if isinstance(base_layer, nn.Conv2d):
        return base_layer.in_channels, base_layer.out_channels
    n_in, n_out = base_layer.weight.shape  # Conv1D: stored (in, out)
    return int(n_in), int(n_out)


def adapter_shapes(lora_cls: type, base_layer: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
    """PEFT key suffix -> tensor shape that ``lora_cls`` creates on ``base_layer`` for rank ``r``."""
    fn = getattr(lora_cls, "adapter_shapes", None)
    if fn is not None:
        return fn(base_layer, r)
    n_in, n_out = base_features(base_layer)  # LoRALinear
    return {"lora_A.weight": (r, n_in), "lora_B.weight": (n_out, r)}


def peft_tensors(layer: LoRALayer, name: str) -> dict[str, torch.Tensor]:
    """PEFT key suffix -> tensor of adapter ``name`` on ``layer`` (any LoRA layer class)."""
    fn = getattr(layer, "peft_tensors", None)
    if fn is not None:
        return fn(name)
    a, b = layer.lora_weights(name)
    return {"lora_A.weight": a, "lora_B.weight": b}
