"""``modules_to_save``: whole modules trained in full and saved with an adapter (PEFT's feature).

A task head such as BERT's ``classifier`` or Llama's ``score`` starts random, so
a low-rank update of it is not enough: it is trained in full. Each named module
is replaced by a ``ModulesToSaveWrapper`` holding the untouched original
(``original_module``) and one trainable copy per adapter
(``modules_to_save[<adapter>]``), PEFT's ``ModulesToSaveWrapper`` layout, so
the model's state dict has PEFT's keys. The wrapper's forward uses the copy of
the first active adapter that has one, else the original: other adapters and the
disabled state see the original module.

In ``adapter_model.safetensors`` a copy is saved under PEFT's names: the module's
own state-dict keys under ``base_model.model.<module>.``, e.g.
``base_model.model.classifier.weight`` (no adapter name, no wrapper segment).

The wrapper reads the active set from the model's ``AdapterState`` like every LoRA layer,
so ``set_adapter``, ``delete_adapter`` and ``unload`` treat both alike (``AdapterModule``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .adapter import adapter_key
from .errors import AdapterExistsError, AdapterNotFoundError, MixedBatchError, TargetModuleError
from .layers import LoRALayer
from .rows import run_grouped
from .state import AdapterModule
from .tree import adapter_modules, set_submodule, walk

# Heads PEFT adds to modules_to_save by itself for a task type; a PEFT config may
# list them although the model has only one of them (e.g. "score" for BERT).
PEFT_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


class ModulesToSaveWrapper(AdapterModule):
    """A module with a frozen original and one fully trainable copy per adapter.

    Attributes:
        original_module: the module as it was in the model (frozen, never changed).
        modules_to_save: ``nn.ModuleDict`` adapter key -> deep copy of the original (all its
            parameters trainable while the adapter is active).

    Forward takes and returns exactly what the wrapped module does, through the copy of the
    first active adapter that has one, else the original. Attribute reads that the wrapper
    does not define (``.weight``, ``.out_features``, ...) go to the module in use, as in PEFT.
    """

    unwrap_when_empty = True

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self._names: list[str] = []

    @property
    def adapter_names(self) -> list[str]:
        return list(self._names)

    def add_adapter(self, name: str) -> None:
        """Add a trainable deep copy of the original for adapter ``name``.

        Raises:
            AdapterExistsError: this wrapper already has a copy for ``name``.
        """
        if name in self._names:
            raise AdapterExistsError(f"adapter {name!r} already has a modules_to_save copy of this module")
        twin = copy.deepcopy(self.original_module)
        for p in twin.parameters():
            p.requires_grad_(True)
        self.modules_to_save[adapter_key(name)] = twin
        self._names.append(name)

    def delete_adapter(self, name: str) -> None:
        """Drop the copy of adapter ``name``.

        Raises:
            AdapterNotFoundError: no copy for ``name``.
        """
        self.copy_for(name)
        del self.modules_to_save[adapter_key(name)]
        self._names.remove(name)

    def copy_for(self, name: str) -> nn.Module:
        """The trainable copy of adapter ``name``.

        Raises:
            AdapterNotFoundError: no copy for ``name``.
        """
        if name not in self._names:
            raise AdapterNotFoundError(f"adapter {name!r} has no modules_to_save copy here; it has {self._names}")
        return self.modules_to_save[adapter_key(name)]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """All parameters of adapter ``name``'s copy."""
        return list(self.copy_for(name).parameters())

    @property
    def module_in_use(self) -> nn.Module:
        """The copy of the first active adapter, or the original when none is active."""
        for n in self.active_adapters:
            return self.modules_to_save[adapter_key(n)]
        return self.original_module

    def unwrapped(self, merge: bool) -> nn.Module:
        """``merge=True``: the copy in use (the trained head of the first active adapter, or the
        original); False: the original. Parameters keep their ``requires_grad`` flags."""
        return self.module_in_use if merge else self.original_module

    def forward(self, *args, **kwargs):
        rows = self.lora_state.rows
        if rows is not None and self._names:  # mixed batch: each row through its own adapter's copy
            return rows.run(self._mixed, rows, args, kwargs)
        return self.module_in_use(*args, **kwargs)

    def _mixed(self, rows, args: tuple, kwargs: dict):
        """Row i of the first input through the copy of row i's adapter, the original for None rows and for
        adapters without a copy here (PEFT's mixed-batch forward: other arguments are passed as they are).
        Each module runs on its own rows only: a large head (``lm_head``) is not computed twice for rows
        with a copy.

        Raises:
            MixedBatchError: the first input is not a tensor with a batch dimension, or the output is not a
                tensor with the input's rows.
        """
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise MixedBatchError(f"mixed_batch needs a batched tensor as the first input of the modules_to_save "
                                  f"module {type(self.original_module).__name__}; got {type(x).__name__}")
        plan = rows.plan(x.shape[0], x.device)

        def through(m):
            return lambda xs: self._rows_out(m(xs, *args[1:], **kwargs), xs.shape[0])

        copies = {n: through(self.modules_to_save[adapter_key(n)]) for n in plan.names if n in self._names}
        return run_grouped(x, plan, copies, through(self.original_module))

    def _rows_out(self, out, n: int) -> torch.Tensor:
        """``out`` if it is a tensor of ``n`` rows, else the ``MixedBatchError`` ``_mixed`` documents."""
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != n:
            raise MixedBatchError(f"mixed_batch needs the modules_to_save module {type(self.original_module).__name__} "
                                  f"to return one output row per input row; it returned {type(out).__name__}")
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # not yet built (deepcopy, unpickling) or a dunder: no forwarding, no recursion
            if name.startswith("__") or "_names" not in self.__dict__ or name in ("original_module", "modules_to_save"):
                raise
        return getattr(self.module_in_use, name)

    def extra_repr(self) -> str:
        return f"adapters={self._names}, active={self.active_adapters}"


def find_modules_to_save(model: nn.Module, config, adapter_name: str) -> list[str]:
    """Qualified names of the modules ``config.modules_to_save`` names in ``model``.

    An entry matches a module whose qualified name ends with it, as a plain string (PEFT's rule for
    ``modules_to_save``, unlike ``target_modules``: ``"norm"`` matches Llama's ``model.norm`` and every
    ``input_layernorm`` / ``post_attention_layernorm``, so the files of both tools hold the same copies).
    Modules inside LoRA layers or inside wrappers (their copies) never match; a module inside an already
    matched one is not listed again.

    Raises:
        TargetModuleError: an entry matches no module (PEFT's automatic task heads,
            e.g. ``"score"`` for ``task_type="SEQ_CLS"``, may be absent when another
            entry matches), or a matched module is or contains a LoRA layer, trainable tokens or
            adapted parameters of another adapter, or a quantised (non-floating) parameter.
        AdapterExistsError: a matched wrapper already holds a copy for ``adapter_name``.
    """
    entries = list(dict.fromkeys(config.modules_to_save or []))
    if not entries:
        return []
    found: list[str] = []
    used: set[str] = set()
    skip: list[str] = []  # prefixes whose submodules never match
    for name, module in walk(model):  # never enters lorakit's modules: their copies and adapters never match
        if not name or any(name.startswith(p) for p in skip):
            continue
        hits = [e for e in entries if name.endswith(e)]
        if not hits:
            continue
        used.update(hits)
        inner = [] if isinstance(module, ModulesToSaveWrapper) else [m for m in module.modules() if isinstance(m, AdapterModule)]
        if any(isinstance(m, LoRALayer) for m in inner):
            raise TargetModuleError(
                f"modules_to_save entry {hits[0]!r} matches {name!r}, which holds LoRA layers; "
                "a module is either adapted with LoRA or saved in full, not both"
            )
        if inner:  # trainable tokens or target_parameters of another adapter, the module itself or inside it
            raise TargetModuleError(f"modules_to_save entry {hits[0]!r} matches {name!r}, which holds a "
                                    f"{type(inner[0]).__name__} (trainable tokens or adapted parameters of other "
                                    "adapters); a module takes one of them")
        frozen = next((k for k, p in module.named_parameters() if not p.is_floating_point()), None)
        if frozen is not None:  # a quantised weight (bitsandbytes' uint8 / int8 codes) cannot take gradients
            raise TargetModuleError(f"modules_to_save entry {hits[0]!r} matches {name!r}, whose parameter {frozen!r} "
                                    f"is {module.get_parameter(frozen).dtype} (quantised): a trained copy needs "
                                    "floating-point weights; adapt it with LoRA, or lorakit.dequantize(model) first")
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.adapter_names:
            raise AdapterExistsError(f"adapter {adapter_name!r} already has a modules_to_save copy of {name!r}")
        found.append(name)
        skip.append(name + ".")
    optional = set(PEFT_TASK_HEADS.get(config.task_type or "", ())) if found else set()
    missing = [e for e in entries if e not in used and e not in optional]
    if missing:
        raise TargetModuleError(f"modules_to_save entry {missing[0]!r} matches no module in {type(model).__name__}")
    return found


def add_copies(model: nn.Module, names: list[str], adapter_name: str) -> None:
    """Wrap each module in ``names`` (if not yet wrapped) and give it a copy for ``adapter_name``.

    The originals are frozen; the copies are trainable.
    """
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSaveWrapper):
            for p in module.parameters():
                p.requires_grad_(False)
            module = ModulesToSaveWrapper(module)
            set_submodule(model, name, module)
        module.add_adapter(adapter_name)


def state_for(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """``{module-qualified key: tensor}`` of adapter ``adapter_name``'s copies, e.g. ``"classifier.weight"``."""
    out = {}
    for wname, w in adapter_modules(model):
        if isinstance(w, ModulesToSaveWrapper) and adapter_name in w.adapter_names:
            for k, t in w.copy_for(adapter_name).state_dict().items():
                out[f"{wname}.{k}"] = t
    return out
