"""Save and load adapters in PEFT's on-disk format.

A folder holds ``adapter_config.json`` (``LoRAConfig.to_dict``) and
``adapter_model.safetensors`` with keys such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (r x in) and
``...lora_B.weight`` (out x r): PEFT's names with the adapter name removed.
Each layer class names its own parts (``LoRALayer.peft_suffixes``): an
embedding saves ``<module>.lora_embedding_A`` (r x num_embeddings) and
``<module>.lora_embedding_B`` (dim x r), without ``.weight``, as PEFT does. A
``modules_to_save`` copy is saved under the module's own state-dict keys, e.g.
``base_model.model.classifier.weight``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from . import modules_to_save as mts
from .adapter import check_adapter_name
from .adapters import active_adapters, delete_adapter, list_adapters, set_adapter
from .config import LoRAConfig
from .durable import json_writer, read_utf8, write_atomic_all
from .errors import (
    AdapterLoadError, AdapterNotFoundError, ConfigError, LoRAWarning, MergeStateError, SaveError,
)
from .inject import aux_shapes, biases, find_targets, inject, trained_biases
from .keys import PREFIX, adapted_modules, clean, mismatch, normalize
from .tree import (STATE_ATTR, activate, adapter_modules, check_known, drop_state, is_merged, lora_layers,
                   model_state, outside_mixed_batch, set_submodule)
from .weightfile import check_finite, load_pickle, load_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"  # PEFT's older (and safe_serialization=False) weights file
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # adapter weight dtypes that load


def _peft_key(module_name: str, suffix: str) -> str:
    """``base_model.model.<module>.<suffix>``; suffix e.g. ``lora_A.weight`` or ``lora_embedding_A``. Wrapper
    segments (``torch.compile``'s ``_orig_mod``) are left out: the file fits the plain and the wrapped model."""
    return f"{PREFIX}{clean(module_name)}.{suffix}"


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT key -> the live tensor (parameter or buffer) of adapter ``adapter_name``."""
    out = {}
    for name, layer in adapter_modules(model):  # LoRA layers, trainable tokens, target_parameters wrappers
        if layer.has_adapter(adapter_name) and not isinstance(layer, mts.ModulesToSaveWrapper):
            for suffix, t in layer.peft_tensors(adapter_name).items():
                out[_peft_key(name, suffix)] = t
    for key, t in mts.state_for(model, adapter_name).items():
        out[PREFIX + clean(key)] = t
    for name, bias in trained_biases(model, model_state(model).configs[adapter_name], adapter_name).items():
        out[PREFIX + clean(name)] = bias  # bias="all" / "lora_only": the model's own biases, PEFT's keys
    return out


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (CPU, contiguous copies)."""
    if adapter_name not in list_adapters(model):
        raise AdapterNotFoundError(f"adapter {adapter_name!r} not found; the model has {list_adapters(model)}")
    return {k: t.detach().to("cpu", copy=True).contiguous() for k, t in adapter_tensors(model, adapter_name).items()}


def _given(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` as ``adapter_state_dict`` would give them, after checking they are the adapter's keys."""
    if adapter_name not in list_adapters(model):
        raise AdapterNotFoundError(f"adapter {adapter_name!r} not found; the model has {list_adapters(model)}")
    own = set(adapter_tensors(model, adapter_name))
    odd = sorted(own ^ set(tensors))
    if odd:
        raise SaveError(f"tensors for adapter {adapter_name!r} do not match its keys: {odd[0]!r} "
                        f"({'missing' if odd[0] in own else 'not in the adapter'}); nothing written")
    return {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}


def _config_dict(model: nn.Module, adapter_name: str) -> dict:
    config: LoRAConfig = model_state(model).configs[adapter_name]
    d = config.to_dict()
    hf_config = getattr(model, "config", None)
    if d.get("base_model_name_or_path") is None and hf_config is not None:
        d["base_model_name_or_path"] = getattr(hf_config, "_name_or_path", None) or None
    if d.get("task_type") is None and type(model).__name__.endswith("ForCausalLM"):
        d["task_type"] = "CAUSAL_LM"
    if (d.get("task_type") is None and type(model).__name__.endswith("ForSequenceClassification")
            and {"classifier", "score"} & set(config.modules_to_save or ())):
        d["task_type"] = "SEQ_CLS"  # PEFT then expects the head's weights (it adds classifier / score to modules_to_save)
    return d


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter ``adapter_name`` to folder ``path`` in PEFT's format.

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (adapter
    weights only, in their own dtype) atomically, as a pair: both are written and synced to temporary
    files before either is renamed into place, so a failed save leaves the folder as it was.
    The folder is created if needed. Returns the folder path.

    Args:
        tensors: the values to write instead of the model's own, under the adapter's PEFT keys
            (every key of ``adapter_state_dict``, no other): e.g. the whole tensors gathered from
            the shards of an FSDP-sharded model, whose own parameters hold one rank's part.

    Raises:
        ConfigError: ``adapter_name`` is not a str.
        AdapterNotFoundError: no adapter of that name.
        SaveError (an OSError): ``path`` is an existing file, ``tensors`` misses or adds a key
            (first named; nothing is written), or a write failed (a full disk, no permission: the folder
            and the reason named; the files already there are left as they were).
    """
    check_known(model, [adapter_name])
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SaveError(f"{str(path)!r} is a file; save_adapter writes a folder (adapter_config.json, "
                                 f"{WEIGHTS_NAME})")
    state = adapter_state_dict(model, adapter_name) if tensors is None else _given(model, adapter_name, tensors)
    config = _config_dict(model, adapter_name)
    try:
        path.mkdir(parents=True, exist_ok=True)
        write_atomic_all([(path / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"})),
                          (path / CONFIG_NAME, json_writer(config))])
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        err = SaveError(f"could not write adapter {adapter_name!r} to {str(path)!r}: {reason}")
        err.strerror = reason  # what a caller naming the folder itself shows
        raise err from None
    return path


def read_adapter(path: str | os.PathLike, allow_pickle: bool = True) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """Read and validate an adapter folder without touching any model.

    Returns ``(config, tensors)``. The weights come from ``adapter_model.safetensors``, or, as PEFT
    reads older adapters, from a PyTorch ``adapter_model.bin`` through
    ``torch.load(weights_only=True)``: its restricted unpickler builds tensors and plain containers
    only and refuses any other object, so no code in the file runs. ``allow_pickle=False`` (the
    server) refuses a ``.bin`` unread.

    A config without ``target_modules`` (PEFT fills its per-architecture default) adapts the modules
    whose ``lora_A`` the weight file holds.

    Adapter weights must be finite: a NaN or Inf anywhere is refused (the file, key and first
    index named), never loaded or only warned about, since it would make every output NaN.

    Raises:
        AdapterLoadError: missing folder or file, a config that is not UTF-8, not JSON (line
            named), not an object or has a bad field (the key named), a safetensors file that is
            truncated or whose header does not fit its data (the key, dtype and shape named), a
            non-float tensor, NaN or Inf values; no ``target_modules`` with no ``lora_A`` weights, or
            with ``layers_to_transform`` / ``exclude_modules`` (which narrow PEFT's default list).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise AdapterLoadError(f"an adapter path must be a str or os.PathLike folder, got {type(path).__name__} {path!r}")
    path = Path(path)
    if not path.is_dir():
        raise AdapterLoadError(f"adapter folder {str(path)!r} does not exist" if not path.exists() else
                               f"{str(path)!r} is a file; an adapter is a folder ({CONFIG_NAME}, {WEIGHTS_NAME})")
    cfg_file, w_file, bin_file = path / CONFIG_NAME, path / WEIGHTS_NAME, path / PICKLE_NAME
    if not cfg_file.is_file():
        inside = sorted(p.parent.name for p in path.glob(f"*/{CONFIG_NAME}"))  # a run folder: its adapter/ subfolder
        raise AdapterLoadError(f"{str(cfg_file)!r} is missing" + (f"; {str(path / inside[0])!r} holds an adapter"
                                                                  if inside else ""))
    if not w_file.is_file() and not (allow_pickle and bin_file.is_file()):
        hint = " (pickle adapter_model.bin is not loaded here, for safety)" if bin_file.exists() else ""
        raise AdapterLoadError(f"{str(w_file)!r} is missing{hint}")
    config, targets_given = _read_config(cfg_file)
    if w_file.is_file():
        tensors = load_safetensors(w_file)
    else:
        w_file, tensors = bin_file, load_pickle(bin_file)
    if not targets_given:  # PEFT fills a per-architecture default; the file's own keys say what it adapts
        config = _targets_from_keys(config, tensors, cfg_file, w_file)
    for k, t in tensors.items():
        if t.is_floating_point() and t.dtype not in FLOATS:
            raise AdapterLoadError(f"{str(w_file)!r}: tensor {k!r} has dtype {t.dtype}; adapter weights must be "
                                   "float16, bfloat16, float32 or float64")
        if not t.is_floating_point():
            # integer buffers (BatchNorm's num_batches_tracked) exist only in modules_to_save copies
            if not config.modules_to_save or ".lora_" in k:
                raise AdapterLoadError(f"{str(w_file)!r}: tensor {k!r} has dtype {t.dtype}; adapter weights must be "
                                       "floating point")
            continue
        check_finite(w_file, k, t)
    return config, tensors


def _targets_from_keys(config: LoRAConfig, tensors: dict, cfg_file: Path, w_file: Path) -> LoRAConfig:
    """``config`` targeting the modules whose ``lora_A`` the file holds (its config names none).

    Raises:
        AdapterLoadError: the file holds no ``lora_A``, or the config narrows the targets it does not name
            (``layers_to_transform``, ``exclude_modules``: PEFT applies them to its own default list).
    """
    narrowing = [k for k in ("layers_to_transform", "exclude_modules") if getattr(config, k)]
    if narrowing:
        raise AdapterLoadError(f"{str(cfg_file)!r} names no target_modules but sets {narrowing[0]}, which "
                               "narrows PEFT's per-architecture default list; write the target_modules it means")
    modules = adapted_modules(tensors)
    if not modules:
        raise AdapterLoadError(f"{str(cfg_file)!r} names no target_modules and {str(w_file)!r} holds no lora_A "
                               "weights: nothing says which modules the adapter adapts")
    try:
        return dataclasses.replace(config, target_modules=modules)
    except ConfigError as e:
        raise AdapterLoadError(f"{str(cfg_file)!r}: {e}") from None


def _read_config(cfg_file: Path) -> tuple[LoRAConfig, bool]:
    """The ``LoRAConfig`` of an ``adapter_config.json``, and whether the file names its target
    modules (or parameters).

    Raises:
        AdapterLoadError: not UTF-8, not JSON (line and column named), or a bad field (named).
    """
    text = read_utf8(cfg_file, AdapterLoadError, "utf-8-sig")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{str(cfg_file)!r} is not valid JSON: {e.msg} at line {e.lineno} column "
                               f"{e.colno}") from None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LoRAWarning)
            config = LoRAConfig.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise AdapterLoadError(f"{str(cfg_file)!r}: {e}") from None
    for w in caught:  # re-issued naming the file
        warnings.warn(f"{str(cfg_file)!r}: {w.message}", w.category, stacklevel=3)
    return config, d.get("target_modules") is not None or bool(d.get("target_parameters"))


def _expected_shapes(model: nn.Module, config: LoRAConfig, adapter_name: str) -> dict[str, tuple]:
    """PEFT key -> shape the model needs for this adapter (existing adapter or a fresh injection)."""
    if adapter_name in list_adapters(model):
        return {k: tuple(t.shape) for k, t in adapter_tensors(model, adapter_name).items()}
    shapes = {}
    targets = find_targets(model, config, adapter_name)
    for t in targets:
        for suffix, shape in t.shapes.items():
            shapes[_peft_key(t.name, suffix)] = tuple(shape)
    for key, shape in aux_shapes(model, config, adapter_name, {t.name for t in targets}).items():
        shapes[PREFIX + clean(key)] = shape  # trainable_token_indices rows, target_parameters factors
    for name, bias in biases(model, config, {t.name for t in targets}).items():
        shapes[PREFIX + clean(name)] = tuple(bias.shape)
    for name in mts.find_modules_to_save(model, config, adapter_name):
        module = model.get_submodule(name)
        if isinstance(module, mts.ModulesToSaveWrapper):  # another adapter's copies are there: the original's keys
            module = module.original_module
        for k, v in module.state_dict().items():
            shapes[f"{PREFIX}{clean(name)}.{k}"] = tuple(v.shape)
    return shapes


def _check_keys(expected: dict[str, tuple], tensors: dict[str, torch.Tensor], path) -> None:
    why = mismatch(expected, tensors, str(path))
    if why:
        raise AdapterLoadError(why)
    for k, shape in expected.items():
        got = tuple(tensors[k].shape)
        if got != shape:
            raise AdapterLoadError(f"{str(path)!r} key {k!r} has shape {list(got)} in the file but the model needs "
                                   f"{list(shape)}")


_BASE_COPY = ".base_layer.weight"


def _drop_base_copies(model: nn.Module, tensors: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """Drop PEFT's full copies of base weights (``<module>.base_layer.weight``) that equal the model's.

    PEFT saves them when ``embed_tokens`` or ``lm_head`` is a target
    (``save_embedding_layers="auto"``). lorakit never overwrites base weights, so a
    copy that differs from the model's weight is refused.

    Raises:
        AdapterLoadError: a copy differs in shape or value (the key is named).
    """
    out = {}
    for k, t in tensors.items():
        name = k[len(PREFIX) : -len(_BASE_COPY)] if k.startswith(PREFIX) and k.endswith(_BASE_COPY) else None
        try:
            module = model.get_submodule(name) if name else None
        except AttributeError:
            module = None
        w = getattr(getattr(module, "base_layer", module), "weight", None) if module is not None else None
        if not isinstance(w, torch.Tensor):
            out[k] = t
            continue
        if tuple(w.shape) != tuple(t.shape) or not torch.equal(w.detach().to("cpu", t.dtype), t):
            raise AdapterLoadError(
                f"{str(path)!r} key {k!r} holds a full copy of {name!r}'s weight (PEFT's save_embedding_layers) "
                "that differs from the model's; lorakit does not overwrite base weights: put that weight into "
                "the base model first"
            )
    return out


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Load a PEFT-format adapter folder into ``model`` as ``adapter_name`` and activate it.

    If the model has no adapter of that name, it is injected from the saved
    config first; otherwise the existing adapter's weights are replaced (the saved
    config must equal the existing adapter's). Every key,
    shape and value is checked before the model is touched, so on any error the
    model is left exactly as it was. Returns ``model``.

    ``read_adapter`` + ``load_adapter_tensors``: a server reads and checks the files off its
    compute thread and only applies them there.

    Raises:
        AdapterLoadError: see ``read_adapter``; missing or extra keys, or a shape
            that differs (both shapes named).
        TargetModuleError: the saved ``target_modules`` do not fit this model.
        MergeStateError: adapters are merged (unmerge first).
    """
    check_adapter_name(adapter_name)
    config, tensors = read_adapter(path)
    return load_adapter_tensors(model, config, tensors, adapter_name, Path(path) / WEIGHTS_NAME)


def load_adapter_tensors(model: nn.Module, config: LoRAConfig, tensors: dict[str, torch.Tensor],
                         adapter_name: str = "default", source: str | os.PathLike = "<tensors>") -> nn.Module:
    """Put an adapter already read by ``read_adapter`` (PEFT keys) into ``model`` and activate it.

    Same checks and guarantees as ``load_adapter``; ``source`` names the file in errors.

    Raises:
        AdapterLoadError, TargetModuleError, MergeStateError, MixedBatchError: as ``load_adapter``.
    """
    check_adapter_name(adapter_name)
    if is_merged(model):
        raise MergeStateError("cannot load an adapter while adapters are merged; call unmerge(model) first")
    outside_mixed_batch(model, f"cannot load adapter {adapter_name!r} inside mixed_batch; load it before the block")
    weights = str(source)
    existed = adapter_name in list_adapters(model)
    if existed and _comparable(model_state(model).configs[adapter_name]) != _comparable(config):
        raise AdapterLoadError(
            f"adapter {adapter_name!r} already exists with a different config than {weights!r}; "
            "delete_adapter it first or load under another name"
        )
    expected = _expected_shapes(model, config, adapter_name)
    tensors = normalize(_drop_base_copies(model, tensors, weights), expected, weights)  # other tools' key layouts
    _check_keys(expected, tensors, weights)

    previous_active = active_adapters(model)
    grads = {p: p.requires_grad for p in model.parameters()}
    wrapped_before = {name for name, _ in lora_layers(model)}
    had_state = STATE_ATTR in vars(model)
    try:
        if not existed:
            inject(model, config, adapter_name, init_weights=False)  # every weight is copied in below
        targets = adapter_tensors(model, adapter_name)
        if set(targets) != set(tensors):  # every (possibly uninitialised) tensor must be overwritten
            raise AdapterLoadError(f"internal: adapter tensors {sorted(set(targets) ^ set(tensors))[:3]} do not match")
        with torch.no_grad():
            for key, t in targets.items():
                t.copy_(tensors[key])
        if existed:
            set_adapter(model, adapter_name)
    except BaseException:
        if not existed and adapter_name in list_adapters(model):
            delete_adapter(model, adapter_name)
            for name, layer in list(lora_layers(model)):
                if name not in wrapped_before:
                    set_submodule(model, name, layer.base_layer)
        activate(model, previous_active)
        if not had_state:
            drop_state(model)
        for p, g in grads.items():
            p.requires_grad_(g)
        raise
    return model


def _comparable(config: LoRAConfig) -> dict:
    """The fields that decide an adapter's shapes and outputs (metadata left out)."""
    d = config.to_dict()
    for k in ("base_model_name_or_path", "task_type", "revision", "init_lora_weights", "inference_mode"):
        d.pop(k, None)
    return d


def adapter_file_size(path: str | os.PathLike) -> int:
    """Size in bytes of an adapter folder's weights file."""
    return (Path(path) / WEIGHTS_NAME).stat().st_size

