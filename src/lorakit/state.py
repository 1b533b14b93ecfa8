"""The adapter state of one model, and the base class of every module lorakit puts into a model.

``AdapterState`` is the single source of truth for which adapters exist and which are active:
one object per model, shared (by reference) by every LoRA layer and ``modules_to_save`` wrapper
in it, so switching adapters writes one list and touches no layer. A layer created on its own
(``LoRALinear(nn.Linear(...))``) has a state of its own until ``inject`` binds it to a model's.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class AdapterState:
    """Adapters of one model.

    Attributes:
        configs: adapter name -> its ``LoRAConfig``, in injection order.
        active: names of the active adapters (empty inside ``disable_adapters``).
        rows: while ``lorakit.mixed.mixed_batch`` runs, the object that adds each batch row's
            adapter (``add_bypass(layer, x, out) -> out``); None otherwise.
    """

    def __init__(self) -> None:
        self.configs: dict[str, Any] = {}
        self.active: list[str] = []
        self.rows: Any = None

    def __repr__(self) -> str:
        return f"AdapterState(adapters={list(self.configs)}, active={self.active})"


class AdapterModule(nn.Module):
    """Base of the modules lorakit inserts: LoRA layers and ``modules_to_save`` wrappers.

    Each holds per-adapter parts for a set of adapter names and reads the active set from
    ``lora_state``, shared with the whole model. Model-level verbs (``set_adapter``,
    ``delete_adapter``, ``unload``) treat every subclass alike through these methods.
    """

    #: replace the module by its original when its last adapter is deleted (wrappers do)
    unwrap_when_empty = False
    #: names of the adapters merged into base weights; modules that merge keep their own list
    merged_adapters: list[str] | tuple = ()

    def __init__(self) -> None:
        super().__init__()
        self.lora_state = AdapterState()  # a plain attribute, not in state_dict; inject shares the model's

    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this module holds a part of, in the order they were added."""
        raise NotImplementedError

    @property
    def active_adapters(self) -> list[str]:
        """The model's active adapters that this module holds, in activation order."""
        held = self.adapter_names
        return [n for n in self.lora_state.active if n in held]

    def has_adapter(self, name: str) -> bool:
        """True if this module holds a part of adapter ``name``."""
        return name in self.adapter_names

    def set_adapter(self, names: str | list[str]) -> None:
        """Make ``names`` the active set of the state this module shares (its model's, once injected)."""
        self.lora_state.active = [names] if isinstance(names, str) else list(dict.fromkeys(names))

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable parameters of adapter ``name`` in this module."""
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s parts from this module."""
        raise NotImplementedError

    def merge(self, names: list[str] | None = None) -> None:
        """Write the deltas of ``names`` (default: the active adapters) into the base weights; a module
        whose parts are not deltas of a base weight (``modules_to_save`` copies) has nothing to merge."""

    def unmerge(self) -> None:
        """Restore the base weights bit for bit; a no-op where nothing is merged."""

    def unwrapped(self, merge: bool) -> nn.Module:
        """The plain module that replaces this one in ``unload`` (merged or original)."""
        raise NotImplementedError
