"""``target_parameters``: LoRA on ``nn.Parameter`` weights that no Linear holds (MoE expert stacks).

A mixture-of-experts block often keeps all experts' weights in one 3-D Parameter, ``(E, out, in)``
(or ``(E, in, out)`` when the module says ``is_transposed = True``), used by its own forward. A
``ParamWrapper`` holds that module (``base_layer``) and, per adapter and per targeted Parameter, one
``LoRAAdapter`` with PEFT's ``ParamWrapper`` layout: A ``(r·E, in)``, B ``(out, r·E)``; expert e
uses ``A_e = A.reshape(E, r, in)[e]`` and ``B_e = B.reshape(out, r, E)[:, :, e]``, and its delta
is ``s · B_e @ A_e`` (``(out, in)``, transposed for ``is_transposed``). A 2-D Parameter ``(out, in)``
is one expert: ``s · B @ A``. Forward runs the module's own forward with each Parameter replaced by
``W + sum of the active adapters' deltas`` (``torch.func.functional_call``), summed in at least
float32 and rounded once to W's dtype. There is no dropout (it cannot act on a weight delta).

Files use PEFT's keys, where each targeted Parameter of a module adds one wrapper level: the
Parameters matched on a module, in their registration order p_0 .. p_(k-1), are saved as
``<module>.`` + ``"base_layer." * (k-1-i)`` + ``lora_A.weight`` / ``lora_B.weight``. Source: Hu et al.
2021 eq. 3 per expert; PEFT 0.21 ``tuners/lora/layer.py`` (``ParamWrapper``) and
``tuners/tuners_utils.py`` (``_inject_parameters``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .adapter import LoRAAdapter, adapter_key, init_factors
from .errors import AdapterExistsError, AdapterNotFoundError, MergeStateError, MixedBatchError, TargetModuleError
from .state import AdapterModule
from .tree import set_submodule, walk


def expert_layout(param: torch.Tensor, transposed: bool) -> tuple[int, int, int]:
    """``(experts, in, out)`` of a targeted Parameter: 3-D ``(E, out, in)``, or ``(E, in, out)`` if
    ``transposed``; 2-D ``(out, in)`` is one expert."""
    if param.dim() == 2:
        return 1, int(param.shape[1]), int(param.shape[0])
    e, d1, d2 = (int(d) for d in param.shape)
    return (e, d1, d2) if transposed else (e, d2, d1)


class ParamWrapper(AdapterModule):
    """A module whose Parameters (2-D or 3-D) carry LoRA deltas, PEFT's ``lora.ParamWrapper``.

    Attributes:
        base_layer: the wrapped module; its Parameters are only written while merged.
        adapters: ``nn.ModuleDict`` adapter key -> ``nn.ModuleDict`` parameter key -> ``LoRAAdapter``
            with A ``(r·E, in)`` and B ``(out, r·E)`` (float32 on a float16/bfloat16 weight, else its dtype).
        module_name: the qualified name, for messages.

    Forward takes and returns what ``base_layer`` does. Merge adds the deltas to the Parameters in
    place (from the kept original, in at least float32, rounded once); ``unmerge`` restores them bit
    for bit. Attribute reads the wrapper does not define go to ``base_layer``.

    Raises:
        MixedBatchError: a forward inside ``mixed_batch`` with rows of its adapters (rows are not known
            inside the module: an expert block may see flattened tokens); other rows see the base module.
    """

    unwrap_when_empty = True

    def __init__(self, base_layer: nn.Module, module_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.adapters = nn.ModuleDict()
        self._params: dict[str, list[str]] = {}  # adapter -> its Parameters, in registration order
        self.merged_adapters: list[str] = []
        self._original: dict[str, torch.Tensor] = {}  # Parameter name -> its value before merging

    @property
    def adapter_names(self) -> list[str]:
        return list(self._params)

    @property
    def transposed(self) -> bool:
        return bool(getattr(self.base_layer, "is_transposed", False))

    def add_adapter(self, name: str, params: dict[str, tuple[int, float]], use_rslora: bool = False,
                    init_lora_weights: bool | str | None = True) -> None:
        """Add adapter ``name`` on ``params`` (Parameter name -> (r, lora_alpha)).

        Raises:
            AdapterExistsError: this module already has ``name``.
        """
        if name in self._params:
            raise AdapterExistsError(f"adapter {name!r} already targets parameters of {self.module_name!r}")
        per_param = nn.ModuleDict()
        for pname, (r, alpha) in params.items():
            w = self.base_layer._parameters[pname]
            e, n_in, n_out = expert_layout(w, self.transposed)
            dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
            a = torch.empty((r * e, n_in), device=w.device, dtype=dtype)
            b = torch.empty((n_out, r * e), device=w.device, dtype=dtype)
            init_factors(a, b, r, init_lora_weights)
            per_param[adapter_key(pname)] = LoRAAdapter(name, a, b, r, alpha, 0.0, use_rslora)
        self.adapters[adapter_key(name)] = per_param
        order = list(self.base_layer._parameters)
        self._params[name] = sorted(params, key=order.index)

    def adapter(self, name: str, pname: str) -> LoRAAdapter:
        """The ``LoRAAdapter`` of adapter ``name`` on Parameter ``pname``.

        Raises:
            AdapterNotFoundError: no such adapter here.
        """
        if name not in self._params:
            raise AdapterNotFoundError(f"adapter {name!r} targets no parameter of {self.module_name!r}")
        return self.adapters[adapter_key(name)][adapter_key(pname)]

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name``. Raises AdapterNotFoundError (absent), MergeStateError (merged)."""
        if name not in self._params:
            raise AdapterNotFoundError(f"adapter {name!r} targets no parameter of {self.module_name!r}")
        if name in self.merged_adapters:
            raise MergeStateError(f"adapter {name!r} is merged; unmerge before deleting it")
        del self.adapters[adapter_key(name)]
        del self._params[name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for pname in self._params[name] for p in (self.adapter(name, pname).lora_A,
                                                              self.adapter(name, pname).lora_B)]

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT key suffix -> live tensor: one wrapper level (``base_layer.``) per later Parameter."""
        params = self._params[name]
        out = {}
        for i, pname in enumerate(params):
            prefix = "base_layer." * (len(params) - 1 - i)
            ad = self.adapter(name, pname)
            out[prefix + "lora_A.weight"], out[prefix + "lora_B.weight"] = ad.lora_A, ad.lora_B
        return out

    def delta(self, name: str, pname: str, dtype: torch.dtype) -> torch.Tensor:
        """``s · B_e A_e`` of every expert, laid out like Parameter ``pname``, in ``dtype``."""
        w = self.base_layer._parameters[pname]
        e, n_in, n_out = expert_layout(w, self.transposed)
        ad = self.adapter(name, pname)
        a, b = ad.lora_A.to(dtype), ad.lora_B.to(dtype) * ad.scaling  # not detached: forward trains them
        if w.dim() == 2:
            return b @ a
        a3, b3 = a.reshape(e, -1, n_in), b.reshape(n_out, -1, e)
        return torch.einsum("ore,eri->eio" if self.transposed else "ore,eri->eoi", b3, a3)

    def _weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for pname, w in self.base_layer._parameters.items():
            held = [n for n in names if pname in self._params[n]]
            if held:
                acc = torch.promote_types(w.dtype, torch.float32)
                out[pname] = (w.to(acc) + sum(self.delta(n, pname, acc) for n in held)).to(w.dtype)
        return out

    def forward(self, *args, **kwargs):
        rows = self.lora_state.rows
        if rows is not None:  # mixed_batch refuses these adapters on entry; rows of others see the base
            if any(n in self._params for n in rows.names):
                raise MixedBatchError(f"{self.module_name!r} carries target_parameters adapters, which mixed_batch "
                                      "does not support")
            return self.base_layer(*args, **kwargs)
        names = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not names:
            return self.base_layer(*args, **kwargs)
        return functional_call(self.base_layer, self._weights(names), args, kwargs)

    def merge(self, names: list[str] | None = None) -> None:
        """Add the deltas of ``names`` (default: the active adapters) to the Parameters, in place."""
        names = self.active_adapters if names is None else [n for n in names if n in self._params]
        todo = [n for n in dict.fromkeys(names) if n not in self.merged_adapters]
        if not todo:
            return
        with torch.no_grad():
            done = self.merged_adapters + todo
            for pname, w in self.base_layer._parameters.items():
                held = [n for n in done if pname in self._params[n]]
                if held:
                    orig = self._original.setdefault(pname, w.detach().clone())
                    acc = torch.promote_types(w.dtype, torch.float32)
                    w.copy_(orig.to(acc) + sum(self.delta(n, pname, acc) for n in held))
        self.merged_adapters.extend(todo)

    def unmerge(self) -> None:
        """Restore every merged Parameter bit for bit; a no-op when nothing is merged."""
        with torch.no_grad():
            for pname, orig in self._original.items():
                self.base_layer._parameters[pname].copy_(orig)
        self._original, self.merged_adapters = {}, []

    def unwrapped(self, merge: bool) -> nn.Module:
        """The base module, holding the active adapters' deltas (``merge``) or its original Parameters."""
        self.merge() if merge else self.unmerge()
        self._original, self.merged_adapters = {}, []
        return self.base_layer

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._original = {k: fn(v) for k, v in self._original.items()}
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or "_params" not in self.__dict__ or name == "base_layer":
                raise
        return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        return f"module={self.module_name!r}, adapters={ {n: p for n, p in self._params.items()} }"


# --- finding and wrapping the Parameters ------------------------------------------------------------


def param_targets(model: nn.Module, config, adapter_name: str) -> dict[str, dict[str, tuple[int, float]]]:
    """``{module name: {Parameter name: (r, lora_alpha)}}`` for ``config.target_parameters``.

    An entry matches Parameter ``p`` of module ``m`` when ``"m.p"`` equals it or ends with ``"." + entry``
    (PEFT's rule); ``rank_pattern`` / ``alpha_pattern`` are looked up with ``"m.p"``.

    Raises:
        TargetModuleError: an entry matches nothing (a missing module or attribute, or an attribute
            that is not an ``nn.Parameter``: named), a Parameter that is not 2-D or 3-D, one on the model
            itself, or on a module lorakit already adapts otherwise (LoRA target, modules_to_save, tokens).
        AdapterExistsError: a matched module already has ``adapter_name``.
    """
    entries = list(config.target_parameters or [])
    out: dict[str, dict[str, tuple[int, float]]] = {}
    used: set[str] = set()
    for name, module in walk(model):
        base = module.base_layer if isinstance(module, ParamWrapper) else module
        for pname, p in base._parameters.items():
            key = f"{name}.{pname}" if name else pname
            hits = [e for e in entries if key == e or key.endswith("." + e)]
            if not hits or p is None:
                continue
            used.update(hits)
            if not name:
                raise TargetModuleError(f"target_parameters entry {hits[0]!r} names a Parameter of the model itself; "
                                        "only Parameters of submodules can be wrapped (as in PEFT)")
            if isinstance(module, AdapterModule) and not isinstance(module, ParamWrapper):
                raise TargetModuleError(f"target_parameters entry {hits[0]!r} names {key!r}, whose module is already a "
                                        f"{type(module).__name__}; a module takes one kind of adapter")
            if isinstance(module, ParamWrapper) and adapter_name in module.adapter_names:
                raise AdapterExistsError(f"adapter {adapter_name!r} already targets parameters of {name!r}")
            if p.dim() not in (2, 3):
                raise TargetModuleError(f"target_parameters entry {hits[0]!r}: {key!r} has shape {list(p.shape)}; "
                                        "only 2-D (out, in) and 3-D (experts, out, in) Parameters are supported")
            out.setdefault(name, {})[pname] = (config.rank_for(key), config.alpha_for(key))
    missing = [e for e in entries if e not in used]
    if missing:
        raise TargetModuleError(_why_unmatched(model, missing[0]))
    return out


def _why_unmatched(model: nn.Module, entry: str) -> str:
    """The message for a ``target_parameters`` entry that names no Parameter: what is there instead."""
    mod, _, attr = entry.rpartition(".")
    for name, module in walk(model):
        if mod and (name == mod or name.endswith("." + mod)):
            base = module.base_layer if isinstance(module, AdapterModule) else module
            found = getattr(base, attr, None)
            params = ", ".join(n for n, _ in base.named_parameters(recurse=False)) or "none"
            if found is None:
                return (f"target_parameters entry {entry!r}: module {name!r} has no attribute {attr!r} "
                        f"(its own Parameters: {params})")
            return (f"target_parameters entry {entry!r}: {name}.{attr} is a {type(found).__name__}, not an "
                    f"nn.Parameter (its own Parameters: {params})")
    return f"target_parameters entry {entry!r} matches no Parameter of {type(model).__name__}"


def add_params(model: nn.Module, targets: dict[str, dict[str, tuple[int, float]]], config, adapter_name: str,
               init_lora_weights) -> None:
    """Wrap each module of ``param_targets`` (once) and add ``adapter_name`` on its Parameters."""
    for name, params in targets.items():
        module = model.get_submodule(name)
        if not isinstance(module, ParamWrapper):
            module = ParamWrapper(module, name)
            set_submodule(model, name, module)
        module.add_adapter(adapter_name, params, config.use_rslora, init_lora_weights)


def param_shapes(model: nn.Module, targets: dict[str, dict[str, tuple[int, float]]]) -> dict[str, tuple[int, ...]]:
    """Module-qualified PEFT key -> shape of each tensor ``param_targets``' adapter will have."""
    out = {}
    for name, params in targets.items():
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, ParamWrapper) else module
        order = [p for p in base._parameters if p in params]
        for i, pname in enumerate(order):
            e, n_in, n_out = expert_layout(base._parameters[pname], bool(getattr(base, "is_transposed", False)))
            r, prefix = params[pname][0], f"{name}." + "base_layer." * (len(order) - 1 - i)
            out[prefix + "lora_A.weight"], out[prefix + "lora_B.weight"] = (r * e, n_in), (n_out, r * e)
    return out
