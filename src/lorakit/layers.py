"""LoRA layers: ``LoRALayer`` (named adapters, active set, exact merge/unmerge, per-row
adapters) and ``LoRALinear``, an ``nn.Linear`` wrapped with one or more low-rank bypasses.
Other base types (Conv1D, Embedding, Conv2d) live in ``layer_types.py``.

State dict layout matches PEFT's: ``<name>.base_layer.weight``,
``<name>.lora_A.<adapter>.weight`` (r x in), ``<name>.lora_B.<adapter>.weight`` (out x r).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterExistsError, AdapterNotFoundError, MergeStateError

_HALF = (torch.float16, torch.bfloat16)


def adapter_key(name: str) -> str:
    """The ``nn.ModuleDict`` key used for adapter ``name``.

    ModuleDict keys cannot contain ``"."``, be empty or shadow a ModuleDict
    or ParameterDict attribute (``"keys"``, ``"update"``, ``"get"``, ...), but adapter names may be any string.
    Such names (and names starting with the escape prefix ``"_x"``) are stored
    hex-escaped; ordinary names like ``"default"`` stay readable, as in PEFT.
    """
    if not isinstance(name, str):
        raise TypeError(f"adapter name must be a str, got {type(name).__name__}")
    if (
        name and "." not in name and not name.startswith("_x")
        and not hasattr(nn.ModuleDict, name) and not hasattr(nn.ParameterDict, name)
    ):
        return name
    return "_x" + name.encode().hex()


def _init_pair(a: torch.Tensor, b: torch.Tensor, r: int, init_lora_weights, a_default, b_default) -> None:
    """Initialise A and B in place as PEFT's ``reset_lora_parameters`` does for Linear/Conv.

    True: A Kaiming-uniform (a=sqrt(5)), B zeros; "gaussian": A ~ N(0, 1/r), B zeros;
    False: both with the layer type's default init (``a_default`` / ``b_default``);
    None: left as allocated (the caller copies weights in).
    """
    with torch.no_grad():
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
            nn.init.zeros_(b)
        elif init_lora_weights is False:
            a_default()
            b_default()


def bare_linear(in_features: int, out_features: int, device=None, dtype=None) -> nn.Linear:
    """A bias-free ``nn.Linear`` with uninitialised weight (out_features x in_features).

    ``nn.Linear(...)`` always runs its random init and ``torch.nn.utils.skip_init`` goes
    through the meta device; both cost more than loading an adapter's weights.
    """
    m = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(m)
    m.in_features, m.out_features = in_features, out_features
    m.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
    m.register_parameter("bias", None)
    return m


class LoRALayer(nn.Module):
    """Shared bookkeeping of every LoRA layer: named adapters, scaling, active set, merge.

    A subclass wraps one base module type and defines ``_make_adapter`` (create
    the A and B modules), ``delta_weight`` (the merged delta, float32, shaped like
    the base weight) and ``lora_output`` (the bypass output for an input).

    Merging adds the deltas (computed in float32) to the base weight and keeps the
    original weight tensor aside, so ``unmerge`` restores it bit for bit, whatever
    the dtype. That copy costs the weight's own size while merged.
    """

    adapter_parts = ("lora_A", "lora_B")  # ModuleDict attributes holding per-adapter modules

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._original_weight: torch.Tensor | None = None
        self._row_plan = None  # set by lorakit.mixed.mixed_batch: a holder whose .plan is set per forward

    @classmethod
    def from_base(cls, base_layer: nn.Module) -> "LoRALayer":
        return cls(base_layer)

    @property
    def weight(self) -> torch.Tensor:  # code that reads .weight of the wrapped layer keeps working
        return self.base_layer.weight

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    @property
    def adapter_dtype(self) -> torch.dtype:
        w = self.base_layer.weight
        return torch.float32 if w.dtype in _HALF else w.dtype

    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
    ) -> None:
        """Create adapter ``name`` with rank ``r`` and scaling alpha/r (alpha/sqrt(r) with rsLoRA).

        Raises:
            AdapterExistsError: ``name`` already exists on this layer.
        """
        if name in self.r:
            raise AdapterExistsError(f"adapter {name!r} is already injected into this layer")
        key = adapter_key(name)
        self._make_adapter(key, r, init_lora_weights)
        self.lora_dropout[key] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[name] = r
        self.lora_alpha[name] = float(lora_alpha)
        self.scaling[name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r

    def _make_adapter(self, key: str, r: int, init_lora_weights: bool | str) -> None:
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` from this layer (it must not be merged)."""
        self._check(name)
        if name in self.merged_adapters:
            raise MergeStateError(f"adapter {name!r} is merged; unmerge before deleting it")
        key = adapter_key(name)
        for part in (*self.adapter_parts, "lora_dropout"):
            del getattr(self, part)[key]
        for d in (self.r, self.lora_alpha, self.scaling):
            del d[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable parameters of adapter ``name``."""
        key = adapter_key(name)
        return [p for part in self.adapter_parts for p in getattr(self, part)[key].parameters()]

    def lora_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` weights of adapter ``name``, as stored (PEFT's layout)."""
        key = adapter_key(name)
        return self.lora_A[key].weight, self.lora_B[key].weight

    def _check(self, name: str) -> None:
        if name not in self.r:
            raise AdapterNotFoundError(f"adapter {name!r} not found; this layer has {self.adapter_names}")

    # --- merge --------------------------------------------------------------------

    def delta_weight(self, name: str) -> torch.Tensor:
        """The adapter's weight delta in float32, shaped like the base weight."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Add the deltas of ``names`` (default: the active adapters) to the base weight.

        Already merged adapters are skipped, so merging twice adds nothing twice.
        The sum ``W + sum(deltas)`` is formed in float32 from the original W and
        rounded once to the weight dtype.
        """
        names = list(self.active_adapters if names is None else names)
        todo = [n for n in names if n not in self.merged_adapters]
        if not todo:
            return
        for n in todo:
            self._check(n)
        w = self.base_layer.weight
        if self._original_weight is None:
            self._original_weight = w.detach().clone()
        names = self.merged_adapters + todo
        if w.dtype == torch.float32:  # accumulate straight into the weight: no temporaries
            w.copy_(self._original_weight)
            for n in names:
                self._add_delta_(w, n)
        else:  # half precision: sum in float32, round once
            merged = self._original_weight.float()
            for n in names:
                self._add_delta_(merged, n)
            w.copy_(merged)
        self.merged_adapters.extend(todo)

    def _add_delta_(self, target: torch.Tensor, name: str) -> None:
        """``target += delta_weight(name)`` (float32 target); subclasses may fuse it."""
        target.add_(self.delta_weight(name).to(target.device))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original base weight bit for bit; a no-op when nothing is merged."""
        if self._original_weight is not None:
            self.base_layer.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged_adapters = []

    def _apply(self, fn, recurse=True):  # keep the saved weight on the model's device/dtype
        super()._apply(fn, recurse)
        if self._original_weight is not None:
            self._original_weight = fn(self._original_weight)
        return self

    # --- forward ------------------------------------------------------------------

    def lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Bypass output ``s * B(A(dropout(x)))`` of adapter ``name`` in the adapter dtype."""
        raise NotImplementedError

    def add_lora_(self, out: torch.Tensor, name: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Add adapter ``name``'s bypass for input ``x`` to ``out`` in place (to rows ``rows`` of it if given).

        In-place is safe under autograd: the base op's backward never needs its output.
        """
        delta = self.lora_output(name, x).to(out.dtype)
        if rows is None:
            out.add_(delta)
        else:
            out.index_add_(0, rows, delta)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        plan = self._row_plan.plan if self._row_plan is not None else None
        if plan is not None:
            return self._mixed_forward(x, out, plan)
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                self.add_lora_(out, name, x)
        return out

    def _mixed_forward(self, x: torch.Tensor, out: torch.Tensor, plan) -> torch.Tensor:
        """Per-row adapters (see ``lorakit.mixed``): rows were sorted by adapter once
        per forward; here one gather of activations and one matmul pair and
        scatter-add per adapter segment, never a per-row copy of adapter weights."""
        if x.shape[0] != plan.rows:
            raise ValueError(f"mixed batch has {plan.rows} rows but this layer got input of shape {list(x.shape)}")
        segments = [seg for seg in plan.segments if seg[0] in self.r]
        if len(segments) == 1 and plan.single_full:  # every row uses the same adapter, in order
            self.add_lora_(out, segments[0][0], x)
        elif segments:
            self._segments_forward(x, out, plan, tuple(segments))
        return out

    def _segments_forward(self, x: torch.Tensor, out: torch.Tensor, plan, segments) -> None:
        """Add each segment's bypass to its rows of ``out``: one gather, then a matmul pair per adapter."""
        xs = self._row_plan.gathered(x, plan.perm)  # (M, ..., in), rows grouped by adapter
        for name, s, e in segments:
            self.add_lora_(out, name, xs[s:e], rows=plan.perm[s:e])


class LoRALinear(LoRALayer):
    """``nn.Linear`` plus low-rank bypasses (Hu et al. 2021, eq. 3).

    ``forward(x) = base_layer(x) + sum over active, unmerged adapters of
    s * B(A(dropout(x)))`` with ``s = lora_alpha / r`` or ``lora_alpha / sqrt(r)``
    (rsLoRA, Kalajdzievski 2023). ``lora_A[name]`` is ``nn.Linear(in, r)`` (weight
    r x in) and ``lora_B[name]`` is ``nn.Linear(r, out)`` (weight out x r).

    Shapes: x ``(..., in_features)`` -> ``(..., out_features)``. Adapter weights are
    float32 when the base weight is float16/bfloat16 (so small updates are not
    lost to rounding), else the base dtype; the bypass output is cast back to the
    base output dtype. With B = 0 the output equals the base output exactly.
    """

    def __init__(self, base_layer: nn.Linear) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    def _make_adapter(self, key: str, r: int, init_lora_weights: bool | str) -> None:
        kw = dict(device=self.base_layer.weight.device, dtype=self.adapter_dtype)
        a = bare_linear(self.in_features, r, **kw)
        b = bare_linear(r, self.out_features, **kw)
        _init_pair(a.weight, b.weight, r, init_lora_weights, a.reset_parameters, b.reset_parameters)
        self.lora_A[key] = a
        self.lora_B[key] = b

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s * B @ A`` of adapter ``name`` in float32, shape (out_features, in_features)."""
        self._check(name)
        a, b = self.lora_weights(name)
        return (b.detach().float() @ a.detach().float()) * self.scaling[name]

    def _add_delta_(self, target: torch.Tensor, name: str) -> None:
        a, b = self.lora_weights(name)  # one fused addmm: target += s * B @ A
        target.addmm_(b.detach().float(), a.detach().float(), alpha=self.scaling[name])

    def lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        key = adapter_key(name)
        a = self.lora_A[key].weight  # (r, in)
        b = self.lora_B[key].weight  # (out, r)
        h = self.lora_dropout[key](x.to(a.dtype))
        return F.linear(F.linear(h, a), b) * self.scaling[name]

    def add_lora_(self, out: torch.Tensor, name: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        # one matmul chain; the scaling multiplies the rank-r activations, the smallest tensor
        # of the chain, in the forward and (as its gradient) in the backward
        key = adapter_key(name)
        a = self.lora_A[key].weight
        h = F.linear(self.lora_dropout[key](x.to(a.dtype)), a) * self.scaling[name]
        delta = F.linear(h, self.lora_B[key].weight).to(out.dtype)
        if rows is None:
            out.add_(delta)
        else:
            out.index_add_(0, rows, delta)

    def _segments_forward(self, x: torch.Tensor, out: torch.Tensor, plan, segments) -> None:
        """Several adapters in one batched matmul pair (SGMV-style): each adapter's rows, padded to
        the longest segment, against that adapter's stacked (rank-padded, pre-scaled) A and B.

        A fixed handful of ops per layer however many adapters are present; used for inference
        (no gradients) when padding at most doubles the rows, else the per-adapter loop.
        """
        pad = plan.padded(segments) if len(segments) > 1 and not torch.is_grad_enabled() else None
        if pad is None:
            return super()._segments_forward(x, out, plan, segments)
        a_t, b_t = self._row_plan.stacked(self, tuple(name for name, _, _ in segments))  # (k, in, r), (k, r, out)
        k, length = pad.shape
        mid = x.shape[1:-1]
        xs = self._row_plan.gathered(x, pad.index).reshape(k, -1, self.in_features).to(a_t.dtype)
        h = torch.bmm(xs, a_t)  # (k, L * T, r)
        if pad.keep is not None:  # padding rows contribute exactly zero
            h = h.view(k, length, -1, h.shape[-1]).mul_(pad.keep).view(k, -1, h.shape[-1])
        delta = torch.bmm(h, b_t).view(k * length, *mid, self.out_features)
        out.index_add_(0, pad.index, delta.to(out.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}"
