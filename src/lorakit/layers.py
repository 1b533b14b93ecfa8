"""LoRA layers: ``LoRALayer`` (a base module plus one ``LoRAAdapter`` per adapter, exact
merge / unmerge) and ``LoRALinear``, an ``nn.Linear`` with low-rank bypasses. Other base types
(Conv1D, Embedding, Conv2d) live in ``layer_types.py``.

In memory an adapter's factors are ``<module>.adapters.<adapter>.lora_A`` and ``.lora_B``;
files use PEFT's keys (``<module>.lora_A.weight``; see ``lorakit.io``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import dora, fold, fused
from . import lora_bias as lora_bias_
from .adapter import HALF, LoRAAdapter, adapter_key, init_factors, stored_adapter
from .bank import AdapterBank
from .errors import AdapterExistsError, AdapterNotFoundError, MergeStateError
from .state import AdapterModule


MAGNITUDE = "lora_magnitude_vector"  # PEFT's key suffix of DoRA's magnitude
B_BIAS = "lora_B.bias"  # PEFT's key suffix of B's bias (lora_bias=True)


class LoRALayer(AdapterModule):
    """A base module with named LoRA adapters, merged into its weight on demand.

    A subclass wraps one base module type and defines how A and B act on its input
    (``_down``, ``_up``), how ``B @ A`` is laid out like its weight (``_product``), the
    factor shapes (``factor_shapes``) and PEFT's key suffixes for them (``peft_suffixes``).

    ``forward(x) = base_layer(x) + sum over active, unmerged adapters of s·B(A(dropout(x)))``,
    the bypass cast to the base output dtype. Inside ``lorakit.mixed_batch`` the state's row
    router adds each row's own adapter instead.

    Merging adds the deltas to the base weight, summed in float32 from the original weight and
    rounded once, and keeps the original tensor aside, so ``unmerge`` restores it bit for bit
    whatever the dtype (that copy costs the weight's size while merged). A base weight tied to
    another module (``tied_with``, set by ``inject``: GPT-2's ``lm_head`` and ``wte``) is untied
    while merged and never written through; ``unmerge`` re-ties it.

    Raises:
        TypeError: the base module is not of the subclass's type.
    """

    base_type: type = nn.Module
    peft_suffixes = ("lora_A.weight", "lora_B.weight")  # file keys of A and B under the module's name
    supports_dropout = True
    supports_lora_bias = True  # PEFT's lora_bias (a bias of B)
    supports_dora = True  # DoRA needs the dense base weight (its column norm)
    linear_up = True  # _up is F.linear, so _up_add may fuse it into one addmm_
    fused = False  # forward may take lorakit.fused.plain_linear (LoRALinear)
    tied_with: tuple[str, ...] = ()
    weight_out_axis = 0  # the output-feature axis of the base weight (DoRA's norm is taken across the others)
    output_axis = -1  # the output-feature axis of the layer's output
    _base_out = staticmethod(lambda out: out)  # the base output, which forward adds the bypasses to in place

    def __init__(self, base_layer: nn.Module) -> None:
        if not isinstance(base_layer, self.base_type):
            raise TypeError(f"{type(self).__name__} wraps {self.base_type.__name__}, got {type(base_layer).__name__}")
        self.check_base(base_layer, repr(base_layer))
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.in_features, self.out_features = self.features(base_layer)
        self.merged_adapters: list[str] = []
        self._original_weight: torch.Tensor | None = None
        self._original_bias: torch.Tensor | None = None
        self._shared_weight: nn.Parameter | None = None
        self._adapters_version = 0  # bumped when an adapter is added or deleted (AdapterBank.sync)
        self._bank: AdapterBank | None = None  # built on first use by a mixed batch
        self._hot = None  # HotBank (lorakit.hot): the last mixes' adapters, when many more are resident (mixed)
        self._held: tuple | None = None  # (adapters version, segments, segments held) of the last mix (mixed)
        self._names: tuple | None = None  # (adapters version, names held, DoRA / lora_bias adapters) (mixed)

    @classmethod
    def from_base(cls, base_layer: nn.Module) -> "LoRALayer":
        """Wrap ``base_layer`` (no adapter yet)."""
        return cls(base_layer)

    # --- per layer type -------------------------------------------------------------------

    @staticmethod
    def check_base(base_layer: nn.Module, name: str) -> None:
        """Raise ``TargetModuleError`` naming ``name`` if this base module cannot be adapted."""

    def check_merge(self, name: str, names: list[str] | None = None) -> None:
        """Raise if adapters ``names`` (default: the active ones) cannot be merged into this layer's base
        (``name``: the module's, for the message); ``merge`` / ``unload`` ask every layer before changing any.

        Raises:
            AdapterNotFoundError: a name this layer does not have.
            MergeStateError: an adapter with ``lora_bias`` on a base layer without a bias.
        """
        names = self.active_adapters if names is None else list(names)
        for n in names:
            if n not in self.merged_adapters and self.adapter(n).lora_B_bias is not None \
                    and getattr(self.base_layer, "bias", None) is None:
                raise MergeStateError(f"adapter {n!r} has lora_bias=True but {name!r} ({type(self.base_layer).__name__}) "
                                      "has no bias to merge it into; keep it unmerged")

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        """``(in, out)`` sizes of the base module."""
        return base_layer.in_features, base_layer.out_features

    @classmethod
    def factor_shapes(cls, base_layer: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B for rank ``r``: (r, in) and (out, r) here."""
        n_in, n_out = cls.features(base_layer)
        return (r, n_in), (n_out, r)

    @classmethod
    def magnitude_shape(cls, base_layer: nn.Module) -> tuple[int, ...]:
        """Shape of DoRA's ``lora_magnitude_vector`` (PEFT's): (out,) here."""
        return (cls.features(base_layer)[1],)

    @classmethod
    def peft_shapes(cls, base_layer: nn.Module, r: int, use_dora: bool = False,
                    lora_bias: bool = False) -> dict[str, tuple[int, ...]]:
        """PEFT key suffix -> shape, for the tensors an adapter of rank ``r`` has on ``base_layer``."""
        shapes = dict(zip(cls.peft_suffixes, cls.factor_shapes(base_layer, r)))
        if use_dora:
            shapes[MAGNITUDE] = cls.magnitude_shape(base_layer)
        if lora_bias:
            shapes[B_BIAS] = (cls.features(base_layer)[1],)
        return shapes

    def _init(self, a: torch.Tensor, b: torch.Tensor, r: int, init_lora_weights) -> None:
        init_factors(a, b, r, init_lora_weights)

    def _down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return F.linear(x, a)

    def _up(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(h, b)

    def _up_add(self, out: torch.Tensor, h: torch.Tensor, b: torch.Tensor, s: float) -> None:
        """``out += s · _up(h, b)``; one ``addmm_`` where ``_up`` is a linear map and the dtypes agree."""
        if self.linear_up and out.dtype is h.dtype is b.dtype and out.is_contiguous():
            out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b.t(), alpha=s)
        else:
            out.add_((self._up(h, b) * s).to(out.dtype))

    def _product(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return b @ a

    def base_without_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base op with ``weight`` and no bias (DoRA's ``W x`` on a dropped input)."""
        return F.linear(x, weight)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight as a dense ``dtype`` tensor (DoRA's norm), detached."""
        return self.base_layer.weight.detach().to(dtype)

    # --- adapters -------------------------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:  # code that reads .weight of the wrapped layer keeps working
        return self.base_layer.weight

    @property
    def adapter_dtype(self) -> torch.dtype:
        w = self.base_layer.weight
        return torch.float32 if w.dtype in HALF else w.dtype

    @property
    def adapter_names(self) -> list[str]:
        return [ad.name for ad in self.adapters.values()]

    def has_adapter(self, name: str) -> bool:
        return adapter_key(name) in self.adapters

    def adapter(self, name: str) -> LoRAAdapter:
        """The ``LoRAAdapter`` of ``name``.

        Raises:
            AdapterNotFoundError: this layer has no adapter ``name``.
        """
        try:
            return self.adapters[adapter_key(name)]
        except KeyError:
            raise AdapterNotFoundError(f"adapter {name!r} not found; this layer has {self.adapter_names}") from None

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: bool | str | None = True,
                    use_dora: bool = False, lora_bias: bool = False) -> LoRAAdapter:
        """Create adapter ``name`` with rank ``r`` and scaling alpha/r (alpha/sqrt(r) with rsLoRA).

        ``init_lora_weights``: see ``adapter.init_factors``; None leaves A and B (and DoRA's
        magnitude) uninitialised. ``use_dora``: add DoRA's magnitude, ``‖W + s·B·A‖_c`` of the
        initial factors (Liu et al. 2024, eq. 5; ``lorakit.dora``). ``lora_bias``: give B a bias
        (PEFT's ``lora_bias``), zeros unless ``init_lora_weights`` is False (then nn.Linear's uniform
        init with fan-in r).

        Raises:
            AdapterExistsError: ``name`` already exists on this layer.
        """
        if self.has_adapter(name):
            raise AdapterExistsError(f"adapter {name!r} is already injected into this layer")
        w = self.base_layer.weight
        a_shape, b_shape = self.factor_shapes(self.base_layer, r)
        a = torch.empty(a_shape, device=w.device, dtype=self.adapter_dtype)
        b = torch.empty(b_shape, device=w.device, dtype=self.adapter_dtype)
        self._init(a, b, r, init_lora_weights)
        dropout = lora_dropout if self.supports_dropout else 0.0
        m = torch.empty(self.magnitude_shape(self.base_layer), device=w.device, dtype=a.dtype) if use_dora else None
        bias = lora_bias_.initial(self.out_features, a, r, init_lora_weights) if lora_bias else None
        ad = LoRAAdapter(name, a, b, r, lora_alpha, dropout, use_rslora, m, bias)
        ad.train(self.training)  # an adapter added to an eval-mode model (a server loading one) drops nothing
        if use_dora and init_lora_weights is not None:
            with torch.no_grad():
                m.copy_(dora.initial_magnitude(self.dense_weight(a.dtype), ad.delta(self._product, a.dtype),
                                               self.weight_out_axis).reshape(m.shape))
        self.adapters[adapter_key(name)] = ad
        self._adapters_version += 1
        return ad

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` from this layer.

        Raises:
            AdapterNotFoundError: no such adapter.
            MergeStateError: it is merged (unmerge first).
        """
        self.adapter(name)
        if name in self.merged_adapters:
            raise MergeStateError(f"adapter {name!r} is merged; unmerge before deleting it")
        del self.adapters[adapter_key(name)]
        self._adapters_version += 1

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        ad = self.adapter(name)
        extra = [p for p in (ad.lora_magnitude_vector, ad.lora_B_bias) if p is not None]
        return [ad.lora_A, ad.lora_B, *extra]

    def lora_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` Parameters of adapter ``name``, as stored (PEFT's layout)."""
        ad = self.adapter(name)
        return ad.lora_A, ad.lora_B

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT key suffix -> tensor of adapter ``name`` (the live Parameters; DoRA's magnitude too)."""
        ad = self.adapter(name)
        out = dict(zip(self.peft_suffixes, (ad.lora_A, ad.lora_B)))
        if ad.use_dora:
            out[MAGNITUDE] = ad.lora_magnitude_vector
        if ad.lora_B_bias is not None:
            out[B_BIAS] = ad.lora_B_bias
        return out

    def unwrapped(self, merge: bool) -> nn.Module:
        """The base module, holding ``W + deltas`` of the active adapters (``merge``) or ``W``."""
        if merge:
            self.merge()
        else:
            self.unmerge()
        self._original_weight = self._original_bias = None  # the merged weight is now the weight
        self._shared_weight = None  # a merged tied head keeps its private weight
        return self.base_layer

    # --- forward --------------------------------------------------------------------------

    def bypass(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``s·B(A(dropout(x)))`` of adapter ``name`` in the adapter dtype."""
        return self.adapter(name).bypass(x, self._down, self._up)

    def add_bypass_(self, out: torch.Tensor, name: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Add adapter ``name``'s bypass of ``x`` to ``out`` in place (to rows ``rows`` of it, if given).

        In place is safe under autograd: the base op's backward never needs its output.
        """
        if rows is None:
            self.adapter(name).add_bypass_(out, x, self._down, self._up_add)
        else:
            out.index_add_(0, rows, self.bypass(name, x).to(out.dtype))

    def bank(self, names: list[str]) -> AdapterBank:
        """Every adapter of this layer stacked (``AdapterBank``), with the slots of ``names`` current."""
        if self._bank is None:
            self._bank = AdapterBank()
        self._bank.sync(self.adapters._modules, self._adapters_version, names, self.adapter_dtype)
        return self._bank

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        state = self.lora_state
        if self.fused and state.rows is None and not args and not kwargs:
            out = fused.plain_linear(self, x, state.active)  # one plain adapter: one op (lorakit.fused)
            if out is not None:
                return out
        out = self._base_out(self.base_layer(x, *args, **kwargs))
        if state.rows is not None:  # mixed batch: the router adds each row's adapter
            return state.rows.run(state.rows.add_bypass, self, x, out)
        adapters = self.adapters._modules
        for name in state.active:
            ad = stored_adapter(adapters, name)
            if ad is not None and name not in self.merged_adapters:
                if ad.use_dora:
                    dora.add_dora_(self, ad, out, x)
                else:
                    ad.add_bypass_(out, x, self._down, self._up_add)
                    if ad.lora_B_bias is not None:
                        lora_bias_.add_(out, ad, self.output_axis)
        return out

    # --- merge ----------------------------------------------------------------------------

    def delta_weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``s · B A`` of adapter ``name`` in ``dtype`` (float32 by default), shaped like the base weight."""
        return self.adapter(name).delta(self._product, dtype)

    def merge(self, names: list[str] | None = None) -> None:
        """Add the deltas of ``names`` (default: the active adapters) to the base weight.

        Already merged adapters are skipped, so merging twice adds nothing twice. The weight
        becomes ``W + sum of all merged deltas``, formed in float32 (float64 for a float64
        weight) from the original W and rounded once to the weight dtype. A DoRA adapter rescales
        the sum so far instead: ``m/‖W + ΔW‖_c · (sum + ΔW)`` (Liu et al. 2024, eq. 5), in the
        order the adapters merge, as the forward applies them (``lorakit.fold``). A ``lora_bias``
        adds ``s·b_B`` to the base bias the same way (the original bias is kept aside too).

        Raises:
            AdapterNotFoundError: a name this layer does not have.
            MergeStateError: an adapter with ``lora_bias`` on a base layer without a bias.
        """
        names = self.active_adapters if names is None else list(names)
        todo = [n for n in dict.fromkeys(names) if n not in self.merged_adapters]
        self.check_merge(type(self.base_layer).__name__, todo)
        if not todo:
            return
        with torch.no_grad():  # a block, not a decorator: mutation testing (mutmut) skips decorated functions
            if self.tied_with and self._shared_weight is None:
                self._untie()
            w = self.base_layer.weight
            if self._original_weight is None:
                self._original_weight = w.detach().clone()
                b = getattr(self.base_layer, "bias", None)
                self._original_bias = b.detach().clone() if b is not None else None
            acc = torch.promote_types(w.dtype, torch.float32)
            weight, bias = fold.merged(self, self.merged_adapters + todo, self._original_weight, self._original_bias, acc)
            w.copy_(weight)
            if bias is not None:
                self.base_layer.bias.copy_(bias)
        self.merged_adapters.extend(todo)

    def unmerge(self) -> None:
        """Restore the original base weight bit for bit (and its tie); a no-op when nothing is merged."""
        with torch.no_grad():
            if self._original_weight is not None:
                self.base_layer.weight.copy_(self._original_weight)
            if self._original_bias is not None:
                self.base_layer.bias.copy_(self._original_bias)
        self._original_weight = self._original_bias = None
        self.merged_adapters = []
        if self._shared_weight is not None:  # tie back: the base module gets the shared Parameter again
            self.base_layer.weight = self._shared_weight
            object.__setattr__(self, "_shared_weight", None)

    def _untie(self) -> None:
        """Give the base module a private copy of its shared weight, so merging never writes the other module."""
        shared = self.base_layer.weight
        object.__setattr__(self, "_shared_weight", shared)  # a plain reference, not a parameter of this layer
        self.base_layer.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)

    def _apply(self, fn, recurse=True):  # keep the saved weight on the model's device/dtype
        super()._apply(fn, recurse)
        if self._original_weight is not None:
            self._original_weight = fn(self._original_weight)
        if self._original_bias is not None:
            self._original_bias = fn(self._original_bias)
        self._bank = self._hot = None  # restacked on the new device / dtype when next needed
        return self

    def extra_repr(self) -> str:
        ranks = {ad.name: ad.r for ad in self.adapters.values()}
        return f"in_features={self.in_features}, out_features={self.out_features}, r={ranks}"


class LoRALinear(LoRALayer):
    """``nn.Linear`` plus low-rank bypasses (Hu et al. 2021, eq. 3).

    ``forward(x) = base_layer(x) + sum over active, unmerged adapters of s·B(A(dropout(x)))``
    with A (r × in_features), B (out_features × r) and ``s = lora_alpha / r`` or
    ``lora_alpha / sqrt(r)`` (rsLoRA, Kalajdzievski 2023). The merged delta is ``s·B @ A``,
    shape (out_features, in_features).

    Shapes: x ``(..., in_features)`` -> ``(..., out_features)``. Adapter weights are float32
    when the base weight is float16/bfloat16, else the base dtype; the bypass is cast back to
    the base output dtype. With B = 0 the output equals the base output exactly.

    Raises:
        TypeError: ``base_layer`` is not an ``nn.Linear``.
    """

    base_type = nn.Linear
    fused = True
    batched = True  # mixed batches may run several adapters in one batched matmul pair (adapter.stack)
