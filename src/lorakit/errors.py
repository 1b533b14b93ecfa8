"""Typed exceptions. Each names the module, key, shape or value at fault.

Every class also derives from the builtin a caller would naturally catch
(``ValueError`` for bad values, ``KeyError`` for unknown names), so code written
against plain Python exceptions keeps working.
"""

from __future__ import annotations


class LoRAError(Exception):
    """Base class of every lorakit error."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class ConfigError(LoRAError, ValueError):
    """A ``LoRAConfig`` field or an ``adapter_config.json`` entry is invalid."""


class TargetModuleError(LoRAError, ValueError):
    """``target_modules`` matches nothing, or matches a module lorakit cannot adapt."""


class AdapterExistsError(LoRAError, ValueError):
    """An adapter of that name is already injected into the module."""


class AdapterNotFoundError(LoRAError, KeyError):
    """No adapter of that name is injected into the model."""


class AdapterLoadError(LoRAError, ValueError):
    """An adapter folder or file cannot be loaded: missing, corrupt, wrong keys, shapes or values."""


class MergeStateError(LoRAError, RuntimeError):
    """The operation is not allowed while adapters are merged into the base weights."""


class MixedBatchError(LoRAError, ValueError):
    """``mixed_batch`` got adapter names that do not fit the batch or the model's state."""
