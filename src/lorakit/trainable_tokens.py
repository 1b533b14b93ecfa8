"""``trainable_token_indices``: train only some rows of an embedding (PEFT's trainable tokens).

New or chat-template tokens need their own embedding rows trained, not the whole vocabulary. A
``TrainableTokensWrapper`` holds the untouched module (``base_layer``) and, per adapter, the new
values of the chosen rows, ``(k, dim)``. Forward runs the module's own forward with a weight whose
rows are replaced (not added to): ``W' = W.index_copy(0, indices, rows)``, PEFT's
``TrainableTokensLayer`` semantics. The rows start as copies of the base rows, so a fresh adapter
changes nothing.

On disk the rows are ``base_model.model.<module>.token_adapter.trainable_tokens_delta`` (PEFT's key;
the name says delta but the tensor holds the row values). A module whose weight is tied to the
input embedding (a tied ``lm_head``) follows it: a wrapper that reads the embedding's rows, saved
once, under the embedding's key. Source: PEFT ``tuners/trainable_tokens/layer.py`` and
``utils/other.py`` (``TrainableTokensWrapper``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .adapter import adapter_key
from .errors import AdapterExistsError, AdapterNotFoundError, ConfigError, MergeStateError, TargetModuleError
from .fused import hooked
from .rows import run_grouped
from .state import AdapterModule
from .tree import set_submodule, walk

PEFT_SUFFIX = "token_adapter.trainable_tokens_delta"


class TrainableTokensWrapper(AdapterModule):
    """A module (``nn.Embedding``, or a tied ``nn.Linear`` head) with some weight rows replaced per adapter.

    Attributes:
        base_layer: the wrapped module; its weight is only written while merged.
        trainable_tokens_delta: ``nn.ParameterDict`` adapter key -> rows (k, dim), the weight's dtype.
        token_indices: adapter name -> the k row indices (ints).
        leader: for a follower (a module tied to the input embedding), the embedding's wrapper, whose
            rows it uses; None otherwise.

    Forward: the base module's own forward (``torch.func.functional_call``) with ``weight`` replaced by
    ``W`` with the active adapters' rows copied in: ids ``(...)`` -> ``(..., dim)`` for an embedding,
    ``(..., dim)`` -> ``(..., vocab)`` for a head. Merge writes the rows into ``W`` in place and keeps
    the overwritten rows, so ``unmerge`` restores ``W`` bit for bit. A weight shared with a module that
    is not a follower is given a private copy while merged, re-tied on ``unmerge``.

    Raises:
        ConfigError: in forward or merge, two active adapters replace the same row of this module.
    """

    unwrap_when_empty = True

    def __init__(self, base_layer: nn.Module, module_name: str, leader: TrainableTokensWrapper | None = None,
                 tied_elsewhere: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.trainable_tokens_delta = nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = {}
        self._leader = [leader] if leader is not None else []  # a list: not a submodule, saved once
        self._names: list[str] = []
        self.merged_adapters: list[str] = []
        self._merged_rows: dict[str, torch.Tensor] = {}  # adapter -> the rows it overwrote while merged
        self._tied_elsewhere = tied_elsewhere
        self._shared: nn.Parameter | None = None

    @property
    def leader(self) -> TrainableTokensWrapper | None:
        return self._leader[0] if self._leader else None

    @property
    def adapter_names(self) -> list[str]:
        return list(self._names)

    def add_adapter(self, name: str, indices: list[int] | None = None) -> None:
        """Add adapter ``name`` replacing rows ``indices`` (copies of the current rows); a follower takes
        its leader's.

        Raises:
            AdapterExistsError: this module already has ``name``.
        """
        if name in self._names:
            raise AdapterExistsError(f"adapter {name!r} already has trainable tokens on {self.module_name!r}")
        if self.leader is None:
            w = self.base_layer.weight
            idx = torch.tensor(indices, device=w.device)
            self.trainable_tokens_delta[adapter_key(name)] = nn.Parameter(w.detach().index_select(0, idx).clone())
            self.token_indices[name] = list(indices)
        self._names.append(name)

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s rows.

        Raises:
            AdapterNotFoundError: no such adapter here. MergeStateError: it is merged.
        """
        if name not in self._names:
            raise AdapterNotFoundError(f"adapter {name!r} has no trainable tokens on {self.module_name!r}")
        if name in self.merged_adapters:
            raise MergeStateError(f"adapter {name!r} is merged; unmerge before deleting it")
        self._names.remove(name)
        if self.leader is None:
            del self.trainable_tokens_delta[adapter_key(name)]
            del self.token_indices[name]

    def rows(self, name: str) -> tuple[list[int], nn.Parameter]:
        """``(indices, rows)`` of adapter ``name`` (the leader's for a follower)."""
        owner = self.leader or self
        return owner.token_indices[name], owner.trainable_tokens_delta[adapter_key(name)]

    def index(self, name: str, device) -> torch.Tensor:
        """Adapter ``name``'s row indices as an int64 tensor on ``device`` (for ``index_select`` / ``index_copy``)."""
        return torch.tensor(self.rows(name)[0], device=device)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [] if self.leader is not None else [self.rows(name)[1]]

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT key suffix -> live tensor; a follower saves nothing (its rows are the leader's)."""
        return {} if self.leader is not None else {PEFT_SUFFIX: self.rows(name)[1]}

    def _check_disjoint(self, names: list[str]) -> None:
        seen: dict[int, str] = {}
        for n in names:
            for i in self.rows(n)[0]:
                if i in seen and seen[i] != n:
                    raise ConfigError(f"adapters {seen[i]!r} and {n!r} both replace row {i} of {self.module_name!r} "
                                      "(trainable_token_indices); activate or merge one of them at a time")
                seen[i] = n

    def weight_with(self, names: list[str]) -> torch.Tensor:
        """The base weight with the rows of ``names`` copied in (a new tensor; gradients reach the rows)."""
        self._check_disjoint(list(self.merged_adapters) + names)
        w = self.base_layer.weight
        for n in names:
            w = w.index_copy(0, self.index(n, w.device), self.rows(n)[1].to(w.dtype))
        return w

    def _call(self, names: list[str], x, args, kwargs):
        if not args and not kwargs and self._plain():  # the replaced rows only: no copy of the whole weight
            return self._patched(names, x)
        return functional_call(self.base_layer, {"weight": self.weight_with(names)}, (x, *args), kwargs)

    def _plain(self) -> bool:
        """An exact ``nn.Embedding`` (no max_norm, frequency scaling, sparse gradient or padding row among the
        replaced ones: each changes what ``W'`` would give) or ``nn.Linear``, without hooks (``fused.hooked``)."""
        b = self.base_layer
        if hooked(b):
            return False
        if type(b) is nn.Linear:
            return True
        return (type(b) is nn.Embedding and b.max_norm is None and not b.scale_grad_by_freq and not b.sparse
                and (b.padding_idx is None or all(b.padding_idx % b.num_embeddings not in self.rows(n)[0]
                                                  for n in self._names)))

    def _patched(self, names: list[str], x: torch.Tensor) -> torch.Tensor:
        """``base(x)`` with the replaced rows' part written over it: an embedding's looked-up rows, a head's
        output columns (``F.linear`` with the rows alone). Equals the module with ``weight_with(names)``."""
        self._check_disjoint(list(self.merged_adapters) + names)
        base = self.base_layer
        out = base(x)
        for n in names:
            idx_t, rows = self.index(n, out.device), self.rows(n)[1].to(base.weight.dtype)
            if type(base) is nn.Linear:
                bias = base.bias.index_select(0, idx_t) if base.bias is not None else None
                out = out.index_copy(out.dim() - 1, idx_t, F.linear(x, rows, bias))
            else:
                match = x.unsqueeze(-1) == idx_t  # (..., k): which replaced row each id is, if any
                out = torch.where(match.any(-1, keepdim=True), rows[match.int().argmax(-1)], out)
        return out

    def _mixed(self, rows, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """Each row through its own adapter's rows, the others through the base module; each only on its rows."""
        plan = rows.plan(x.shape[0], x.device)
        own = {n: (lambda xs, n=n: self._call([n], xs, args, kwargs)) for n in plan.names if n in self._names}
        return run_grouped(x, plan, own, lambda xs: self.base_layer(xs, *args, **kwargs))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = self.lora_state.rows
        if rows is not None:  # mixed batch: each row through its own adapter's rows
            return rows.run(self._mixed, rows, x, args, kwargs)
        names = [n for n in self.active_adapters if n not in self.merged_adapters]
        return self._call(names, x, args, kwargs) if names else self.base_layer(x, *args, **kwargs)

    def merge(self, names: list[str] | None = None) -> None:
        """Copy the rows of ``names`` (default: the active adapters) into the base weight, in place."""
        names = self.active_adapters if names is None else [n for n in names if n in self._names]
        todo = [n for n in dict.fromkeys(names) if n not in self.merged_adapters]
        if not todo:
            return
        self._check_disjoint(list(self.merged_adapters) + todo)
        if self.leader is None:
            with torch.no_grad():
                if self._tied_elsewhere and self._shared is None:  # never write the other module's weight
                    object.__setattr__(self, "_shared", self.base_layer.weight)  # a reference, not a parameter here
                    self.base_layer.weight = nn.Parameter(self._shared.detach().clone(),
                                                          requires_grad=self._shared.requires_grad)
                w = self.base_layer.weight
                for n in todo:
                    idx = self.index(n, w.device)
                    self._merged_rows[n] = w.index_select(0, idx).clone()
                    w.index_copy_(0, idx, self.rows(n)[1].to(w.dtype))
        self.merged_adapters.extend(todo)

    def unmerge(self) -> None:
        """Put the overwritten rows back (bit for bit) and re-tie a weight untied by ``merge``."""
        with torch.no_grad():
            w = self.base_layer.weight
            for n in reversed(self.merged_adapters):
                if n in self._merged_rows:
                    w.index_copy_(0, self.index(n, w.device), self._merged_rows.pop(n))
        self.merged_adapters = []
        if self._shared is not None:
            self.base_layer.weight = self._shared
            self._shared = None

    def unwrapped(self, merge: bool) -> nn.Module:
        """The base module, with the active adapters' rows written in (``merge``) or as it was."""
        self.merge() if merge else self.unmerge()
        self.merged_adapters, self._merged_rows, self._shared = [], {}, None
        return self.base_layer

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._merged_rows = {k: fn(v) for k, v in self._merged_rows.items()}
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or "_names" not in self.__dict__ or name == "base_layer":
                raise
        return getattr(self.base_layer, name)  # .weight, .num_embeddings, .embedding_dim, ...

    def extra_repr(self) -> str:
        follows = f", follows={self.leader.module_name!r}" if self.leader is not None else ""
        return f"module={self.module_name!r}, adapters={self._names}{follows}"


# --- finding and wrapping the modules -----------------------------------------------------------


def _plain_children(wrapper: nn.Module):
    """``(name, module)`` below a wrapper's original module, named as they were in the model."""
    original = getattr(wrapper, "original_module", None)
    original = getattr(wrapper, "base_layer", None) if original is None else original  # not `or`: a Sequential may be falsy
    return original.named_modules() if isinstance(original, nn.Module) else ()


def _input_embedding_name(model: nn.Module) -> str:
    """Qualified name of ``model.get_input_embeddings()``, else ``"embed_tokens"`` (PEFT's default)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    return next((n for n, m in walk(model) if emb is not None and m is emb and n), "embed_tokens")


def _weight(module: nn.Module) -> torch.Tensor | None:
    if isinstance(module, AdapterModule):  # a LoRA layer's or wrapper's base, a modules_to_save original
        module = module._modules.get("base_layer") or module._modules.get("original_module") or module
    return module._parameters.get("weight")


def token_targets(model: nn.Module, config, adapter_name: str) -> dict[str, tuple[list[int], str | None]]:
    """``{module name: (row indices, leader name or None)}`` for ``config.trainable_token_indices``.

    The list form names the input embedding; a dict names modules as ``modules_to_save`` does (the
    qualified name, or its last dotted parts). Modules whose weight is the input embedding's
    Parameter (a tied head) follow it unless the dict gives them other indices.

    Raises:
        TargetModuleError: a name matches no module, a module without a 2-D ``weight`` Parameter, a
            LoRA or ``modules_to_save`` module, an index >= the number of rows (module, index and row
            count named), or a follower that is a LoRA target.
        AdapterExistsError: a module already has trainable tokens of ``adapter_name``.
    """
    tti = config.trainable_token_indices
    if tti is None:
        return {}
    entries = dict(tti) if isinstance(tti, dict) else {_input_embedding_name(model): list(tti)}
    modules = [(n, m) for n, m in walk(model) if n]
    out: dict[str, tuple[list[int], str | None]] = {}
    for entry, indices in entries.items():
        hits = [(n, m) for n, m in modules if n == entry or n.endswith("." + entry)]
        if not hits:
            inside = [n for n, m in modules if isinstance(m, AdapterModule) and any(
                (f"{n}.{c}" == entry or f"{n}.{c}".endswith("." + entry)) for c, _ in _plain_children(m))]
            where = f": it lies inside {inside[0]!r}, a module another adapter adapts or copies" if inside else ""
            raise TargetModuleError(f"trainable_token_indices entry {entry!r} matches no module in "
                                    f"{type(model).__name__}{where}")
        for name, module in hits:
            _check_target(name, module, indices, config, adapter_name)
            out[name] = (list(indices), None)
    leader = _input_embedding_name(model)
    if leader in out:
        w = _weight(model.get_submodule(leader))
        for name, module in modules:
            if name != leader and _weight(module) is w and out.get(name, (out[leader][0],))[0] == out[leader][0]:
                _check_follower(name, module, adapter_name)
                out[name] = (out[leader][0], leader)
    return out


def _check_target(name: str, module: nn.Module, indices: list[int], config, adapter_name: str) -> None:
    if isinstance(module, AdapterModule) and not isinstance(module, TrainableTokensWrapper):
        raise TargetModuleError(f"trainable_token_indices names {name!r}, which is a {type(module).__name__} "
                                "(a LoRA target or a modules_to_save module): a module takes one of them")
    if name in (config.modules_to_save or ()) or any(name.endswith("." + m) for m in config.modules_to_save or ()):
        raise TargetModuleError(f"{name!r} is both in modules_to_save and in trainable_token_indices; "
                                "choose one (PEFT refuses both too)")
    if isinstance(module, TrainableTokensWrapper) and adapter_name in module.adapter_names:
        raise AdapterExistsError(f"adapter {adapter_name!r} already has trainable tokens on {name!r}")
    w = _weight(module)
    if not isinstance(w, nn.Parameter) or w.dim() != 2:
        raise TargetModuleError(f"trainable_token_indices names {name!r}, a {type(module).__name__} without a 2-D "
                                "weight Parameter (an nn.Embedding or a tied nn.Linear head is expected)")
    bad = [i for i in indices if i >= w.shape[0]]
    if bad:
        raise TargetModuleError(f"trainable_token_indices row {bad[0]} is out of range for {name!r}, which has "
                                f"{w.shape[0]} rows (0..{w.shape[0] - 1})")


def _check_follower(name: str, module: nn.Module, adapter_name: str) -> None:
    if isinstance(module, AdapterModule) and not isinstance(module, TrainableTokensWrapper):
        raise TargetModuleError(f"{name!r} shares its weight with the input embedding, whose rows "
                                "trainable_token_indices trains, but it is a LoRA target or modules_to_save module")
    if isinstance(module, TrainableTokensWrapper) and adapter_name in module.adapter_names:
        raise AdapterExistsError(f"adapter {adapter_name!r} already has trainable tokens on {name!r}")


def add_tokens(model: nn.Module, targets: dict[str, tuple[list[int], str | None]], adapter_name: str) -> None:
    """Wrap each target of ``token_targets`` (leaders first) and add ``adapter_name``'s rows."""
    if not targets:
        return
    owners: dict[int, list[str]] = {}
    for n, m in walk(model):
        w = _weight(m)
        if n and w is not None:
            owners.setdefault(id(w), []).append(n)
    for name, (indices, leader) in sorted(targets.items(), key=lambda t: t[1][1] is not None):
        module = model.get_submodule(name)
        if not isinstance(module, TrainableTokensWrapper):
            shared = [n for n in owners.get(id(_weight(module)), []) if n != name]
            others = [n for n in shared if targets.get(n, (None, None))[1] != name]
            if others and len(others) < len(shared) and leader is None:
                raise TargetModuleError(f"{name!r} shares its weight with {others[0]!r}, which takes other "
                                        "trainable_token_indices, and with modules that follow it; give them the "
                                        "same indices")
            lead = model.get_submodule(leader) if leader else None
            module = TrainableTokensWrapper(module, name, lead, tied_elsewhere=bool(others) and lead is None)
            module.lora_state = getattr(lead, "lora_state", module.lora_state)
            set_submodule(model, name, module)
        module.add_adapter(adapter_name, indices)


def token_shapes(model: nn.Module, targets: dict[str, tuple[list[int], str | None]]) -> dict[str, tuple[int, int]]:
    """Module-qualified PEFT key -> shape ``(k, dim)`` of each leader's rows (followers save nothing)."""
    return {f"{name}.{PEFT_SUFFIX}": (len(idx), int(_weight(model.get_submodule(name)).shape[1]))
            for name, (idx, leader) in targets.items() if leader is None}
