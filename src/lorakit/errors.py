"""Every lorakit exception, in one hierarchy. Each names the file and line, module, key, shape
or value at fault.

Every class also derives from the builtin a caller would naturally catch (``ValueError`` for
bad values, ``KeyError`` for unknown names, ``RuntimeError`` for a wrong state), so code
written against plain Python exceptions keeps working. The same fault raises the same class
wherever it is detected.

Core (``lorakit``): ConfigError, TargetModuleError, AdapterExistsError, AdapterNotFoundError,
AdapterLoadError, MergeStateError, MixedBatchError, QuantizedBaseError.
App (``lorakit.app``): DataError, ModelLoadError, UsageError, CLIError, ServeError, CheckpointError,
SaveError, NonFiniteError, TrainingInterrupted.
"""

from __future__ import annotations


class LoRAError(Exception):
    """Base class of every lorakit error."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


# --- core -------------------------------------------------------------------------------------


class ConfigError(LoRAError, ValueError):
    """A ``LoRAConfig`` field, an ``adapter_config.json`` entry, an adapter name or another argument is invalid."""


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


class QuantizedBaseError(LoRAError, RuntimeError):
    """The operation needs a full-precision base weight but the module's is quantised (merge: call
    ``lorakit.dequantize`` first), or quantising is impossible (bitsandbytes missing, adapters injected)."""


# --- app --------------------------------------------------------------------------------------


class DataError(LoRAError, ValueError):
    """A data file is missing, malformed (file and line named), of an unknown record shape, or empty."""


class ModelLoadError(LoRAError, ValueError):
    """A model reference cannot be resolved or loaded (missing path, not in the local cache, ...)."""


class UsageError(LoRAError, ValueError):
    """A bad command-line or config-file value (the CLI exits with status 2)."""


class CLIError(LoRAError, ValueError):
    """A user error detected by the CLI, e.g. an output folder that already holds an adapter (exit status 1)."""


class ServeError(LoRAError, ValueError):
    """A request ``lorakit serve`` refuses: carries the HTTP status and OpenAI's error fields.

    Attributes:
        status: HTTP status (400 validation, 401 API key, 404 unknown model or route, 409 busy,
            413 too long or too large, 429 queue full, 503 shutting down).
        param: the request field at fault, or None.
        code: a machine-readable reason, e.g. ``"model_not_found"``.
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class CheckpointError(LoRAError, ValueError):
    """A training checkpoint cannot be resumed: none complete in the folder, a corrupt file, or a run
    configuration that differs from the checkpoint's (the changed keys are listed)."""


class SaveError(LoRAError, OSError):
    """Writing a checkpoint or an adapter failed (disk full, no permission); the path is named and the
    previous checkpoint and adapter are left as they were."""


class NonFiniteError(LoRAError, FloatingPointError):
    """Training met a non-finite loss or gradient (the step and the first parameter affected are named),
    or a served model gave non-finite logits (the model is named)."""


class TrainingInterrupted(LoRAError, RuntimeError):
    """SIGINT or SIGTERM stopped training after a checkpoint was written.

    Attributes:
        step: the last completed optimizer step (the checkpoint's).
        checkpoint: the checkpoint folder written.
        signal: the signal number received.
    """

    def __init__(self, message: str, step: int, checkpoint, signal: int) -> None:
        super().__init__(message)
        self.step, self.checkpoint, self.signal = step, checkpoint, signal


class LoRAWarning(UserWarning):
    """Something lorakit went on past, named in the message: e.g. an adapter_config.json key from
    another PEFT version that does not change the adapter's math, ignored."""
