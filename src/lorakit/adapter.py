"""The LoRA math, written once: the scaling, the bypass ``s·B·A·x``, the delta ``s·B·A``, their
batched (stacked) form, and PEFT's initialisation. One ``LoRAAdapter`` per adapter per layer.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3:
``h = W x + s·B A x`` with A (r × in), B (out × r) and ``s = lora_alpha / r``; rsLoRA
(Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA",
Thm. 3.2) uses ``s = lora_alpha / sqrt(r)``.

A layer type supplies only how A and B act on its input (``down``, ``up``: a linear map,
an embedding lookup, a convolution) and how their product is laid out like its weight
(``product``); forward, merge, mixed batches and ``add_weighted_adapter`` all go through
the functions here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .dora import NormCache
from .errors import ConfigError
from .hot import a_slots

HALF = (torch.float16, torch.bfloat16)  # base dtypes whose adapters are kept in float32
Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
UpAdd = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], None]


def scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """``lora_alpha / r`` (Hu et al. 2021, eq. 3), or ``lora_alpha / sqrt(r)`` with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def check_adapter_name(name) -> str:
    """``name`` if it is a str.

    Raises:
        ConfigError: any other type (the type and value named).
    """
    if not isinstance(name, str):
        raise ConfigError(f"adapter name must be a str, got {type(name).__name__} {name!r}")
    return name


@functools.lru_cache(maxsize=4096)
def _key(name: str) -> str:
    if (
        name and "." not in name and not name.startswith("_x")
        and not hasattr(nn.ModuleDict, name) and not hasattr(nn.ParameterDict, name)
    ):
        return name
    return "_x" + name.encode().hex()


def adapter_key(name: str) -> str:
    """The ``nn.ModuleDict`` key of adapter ``name``.

    ModuleDict keys cannot contain ``"."``, be empty or shadow a ModuleDict attribute
    (``"keys"``, ``"update"``, ...), but adapter names may be any string. Such names (and
    names starting with the escape prefix ``"_x"``) are stored hex-escaped; ordinary names
    like ``"default"`` stay readable.

    Under ``torch.compile`` the key is computed without the cache (Dynamo warns at an ``lru_cache``).

    Raises:
        ConfigError: ``name`` is not a str.
    """
    name = check_adapter_name(name)
    return _key.__wrapped__(name) if torch.compiler.is_compiling() else _key(name)


def stored_adapter(modules: Mapping[str, nn.Module], name: str) -> LoRAAdapter | None:
    """The adapter ``name`` in a layer's ``adapters._modules``, or None: looked up under the name itself
    first (an ordinary name is its own key), then under its escaped key."""
    ad = modules.get(name)
    if ad is None or ad.name != name:  # not there, or another adapter whose escaped key is this name
        ad = modules.get(adapter_key(name))
    return ad


def init_factors(a: torch.Tensor, b: torch.Tensor, r: int, init_lora_weights: bool | str | None) -> None:
    """Initialise A and B in place as PEFT's ``reset_lora_parameters`` does for Linear and Conv.

    True: A Kaiming-uniform (a = sqrt(5): bound 1/sqrt(fan_in)), B zeros, so the adapter
    starts at the base output; ``"gaussian"``: A ~ N(0, 1/r²) (std 1/r), B zeros; False: both
    Kaiming-uniform (for tests: a non-zero delta); None: left as allocated (weights are
    copied in next).
    """
    with torch.no_grad():
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
            nn.init.zeros_(b)
        elif init_lora_weights is False:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))


class LoRAAdapter(nn.Module):
    """One adapter on one layer: ``lora_A``, ``lora_B``, its dropout and its scaling.

    Attributes:
        lora_A: Parameter (r, in, ...), e.g. (r, in_features) for a linear layer.
        lora_B: Parameter (out, r, ...), e.g. (out_features, r).
        name: the adapter's name.
        r, lora_alpha, use_rslora: as in ``LoRAConfig``; ``scaling`` = ``scaling(r, lora_alpha, use_rslora)``.
        lora_dropout: dropout on the bypass input (``nn.Identity`` when p = 0).
        lora_magnitude_vector: DoRA's magnitude ``m`` (Liu et al. 2024, eq. 5), a Parameter with one
            value per output feature in PEFT's shape ((out,), or (1, out, 1, 1) on a Conv2d); None
            for plain LoRA. ``use_dora`` tells which.
        lora_B_bias: PEFT's ``lora_bias=True``: a bias (out,) of B, scaled like the bypass
            (``s·(B A x + b_B)``), saved as ``lora_B.bias``; None without it.

    Dtypes: A and B are float32 on a float16/bfloat16 base, so small updates are not lost to
    rounding, also after the model is cast with ``.to(dtype)``, ``.half()`` or ``.bfloat16()``
    (``_apply``); on other bases they follow the base dtype (float64 with ``.double()``).
    ``bypass`` casts a floating input to their dtype.
    """

    def __init__(self, name: str, a: torch.Tensor, b: torch.Tensor, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, use_rslora: bool = False, magnitude: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(b)
        self.use_dora = magnitude is not None
        self.lora_magnitude_vector = nn.Parameter(magnitude) if self.use_dora else None
        self.norm_cache = NormCache()  # DoRA's detached ‖W + s·B·A‖_c
        self.lora_B_bias = nn.Parameter(bias) if bias is not None else None
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._dropout = lora_dropout > 0
        self.name = name
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = use_rslora
        self.scaling = scaling(r, lora_alpha, use_rslora)

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (``.to()``, ``.half()``, ``.bfloat16()``, ``.cuda()``, ...) with the
        precision policy: a cast to float16 / bfloat16 moves A and B (and their gradients) to the new
        device but keeps them float32, cast from their own values, never rounded through the half
        type. Other casts (float64, float32) and device moves apply as usual."""

        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if out.dtype in HALF and t.is_floating_point() and t.dtype not in HALF:
                return t.to(device=out.device, dtype=torch.float32)
            return out

        self.norm_cache.clear()
        return super()._apply(keep_float32, recurse)

    def train(self, mode: bool = True) -> "LoRAAdapter":
        self.norm_cache.clear()  # model.train() / model.eval(): the next forward recomputes DoRA's norm
        return super().train(mode)

    def _down(self, x: torch.Tensor, down: Op) -> torch.Tensor:
        """``A(dropout(x))``: (..., r) in the adapter dtype (a floating input is cast to it)."""
        a = self._parameters["lora_A"]  # the hot path of every forward: no nn.Module.__getattr__
        if x.dtype is not a.dtype and x.is_floating_point():
            x = x.to(a.dtype)
        if self._dropout:  # the module is not even called when p = 0
            x = self.lora_dropout(x)
        return down(x, a)

    def bypass(self, x: torch.Tensor, down: Op, up: Op) -> torch.Tensor:
        """``s · B(A(dropout(x)))`` in the adapter dtype (Hu et al. 2021, eq. 3).

        The scaling multiplies the rank-r activations, the smallest tensor of the chain, in
        the forward and (as its gradient) in the backward.
        """
        return up(self._down(x, down) * self.scaling, self.lora_B)

    def add_bypass_(self, out: torch.Tensor, x: torch.Tensor, down: Op, up_add: UpAdd) -> None:
        """``out += s · B(A(dropout(x)))`` in place: ``bypass`` with its last product fused into the
        sum, ``up_add(out, h, B, s)`` (for a linear layer one ``addmm_`` with ``alpha = s``).

        In place is safe under autograd: the base op's backward never needs its output.
        """
        up_add(out, self._down(x, down), self._parameters["lora_B"], self.scaling)

    def folded(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, s·B)``: the factors with the scaling folded into B, detached, in ``dtype``
        (default: the adapter's). ``s·B @ A`` is the delta; stacking and combining use these."""
        dtype = dtype or self.lora_A.dtype
        return self.lora_A.detach().to(dtype), self.lora_B.detach().to(dtype) * self.scaling

    def delta(self, product: Op, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``s · B A`` in ``dtype`` (float32 by default), laid out by ``product(B, A)`` like the base weight."""
        a, sb = self.folded(dtype)
        return product(sb, a)

    def extra_repr(self) -> str:
        dora = ", use_dora=True" if self.use_dora else ""
        return f"name={self.name!r}, r={self.r}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}{dora}"


def stack(adapters: Sequence[LoRAAdapter], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear adapters stacked for batched bypasses: ``(A^T (k, in, r_max), (s·B)^T (k, r_max, out))``;
    ``A^T`` is a transposed view of (k, r_max, in) storage (``a_slots``).

    Ranks are zero-padded to the largest, which is exact: the extra rank components are 0. Adapters of
    one rank (the usual case) are stacked in a few ops, not one slot at a time.
    """
    r_max = max(ad.r for ad in adapters)
    if all(ad.r == r_max for ad in adapters):
        a = torch.stack([ad._parameters["lora_A"].detach() for ad in adapters]).to(dtype)  # (k, r, in): A's layout
        b = torch.stack([ad._parameters["lora_B"].detach() for ad in adapters]).to(dtype)  # (k, out, r)
        s = torch.tensor([ad.scaling for ad in adapters], dtype=dtype, device=b.device)
        return a.transpose(1, 2), b.mul_(s.view(-1, 1, 1)).transpose(1, 2).contiguous()
    a0, b0 = adapters[0].lora_A, adapters[0].lora_B
    a_t = a_slots(a0, len(adapters), a0.shape[1], r_max, dtype)
    b_t = b0.new_zeros((len(adapters), r_max, b0.shape[0]), dtype=dtype)
    for j, ad in enumerate(adapters):
        a, sb = ad.folded(dtype)
        a_t[j, :, : ad.r] = a.t()
        b_t[j, : ad.r] = sb.t()
    return a_t, b_t


def stacked_bypass(xs: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor,
                   keep: torch.Tensor | None = None) -> torch.Tensor:
    """The bypass of k linear adapters at once: ``xs`` (k, M, in) -> (k, M, out), row block j
    through adapter j (``stack``'s factors, scaling folded; ``a_t`` (k, in, r_max)). ``keep`` (k, M, 1), if given,
    zeroes padding rows at rank r (exactly 0 bypass there)."""
    h = torch.bmm(xs, a_t)  # (k, M, r_max)
    if keep is not None:
        h = h.mul_(keep)
    return torch.bmm(h, b_t)


def masked_bypass_(out: torch.Tensor, x: torch.Tensor, a_cat: torch.Tensor, mask: torch.Tensor,
                   b_cat: torch.Tensor) -> None:
    """The bypasses of k linear adapters on every row, each row keeping only its own:
    ``out += ((x A_cat) * mask) B_cat`` with ``a_cat`` (in, k·r_max) and ``b_cat`` (k·r_max, out)
    (``stack``'s factors side by side, scaling folded), ``mask`` (N, 1, k·r_max) 1 on the columns
    of row n's adapter. Exact: the masked products are 0. ``x`` (N, ..., in), ``out`` (N, ..., out),
    contiguous, in the factors' dtype."""
    n = x.shape[0]
    h = torch.matmul(x.reshape(n, -1, x.shape[-1]), a_cat)  # (N, T, k·r)
    h.mul_(mask)
    out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b_cat)
