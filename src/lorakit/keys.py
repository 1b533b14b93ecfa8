"""Adapter file keys: the layouts other tools and versions write, brought to PEFT's saved form.

PEFT saves ``base_model.model.<module>.lora_A.weight``; files in the wild also carry
- the adapter name PEFT holds in memory: ``<module>.lora_A.default.weight``,
  ``<module>.lora_magnitude_vector.default.weight``, ``<module>.modules_to_save.default.weight``,
  ``<module>.token_adapter.trainable_tokens_delta.default`` (what ``model.state_dict()`` of a
  ``PeftModel`` holds);
- no ``base_model.model.`` prefix (``lin.lora_A.weight``: a state dict saved from the bare model);
- wrapper segments of the modules they were saved from: ``torch.compile``'s ``_orig_mod.``,
  FSDP's ``_fsdp_wrapped_module.``, activation checkpointing's ``_checkpoint_wrapped_module.``;
- a model bias (``bias="all"``) as ``<module>.bias`` or ``<module>.base_layer.bias``, depending on
  whether some adapter had wrapped that module when the file was saved.

``clean`` removes the wrapper segments (lorakit saves without them); ``normalize`` renames a file's
keys to the keys a model expects, only where the rename is unambiguous; ``mismatch`` explains what
is left (how many modules matched, a key of the file beside the nearest expected key).
"""

from __future__ import annotations

import collections
import difflib
import re

from .errors import AdapterLoadError

PREFIX = "base_model.model."
WRAPPERS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})  # module path segments
_WRAPPED_BIAS = ".base_layer.bias"
# PEFT's in-memory spellings of saved keys, the adapter name as group "name"
_IN_MEMORY = [
    (re.compile(r"\.lora_magnitude_vector\.(?P<name>[^.]+)\.weight$"), ".lora_magnitude_vector"),
    (re.compile(r"\.modules_to_save\.(?P<name>[^.]+)\."), "."),
]


def clean(name: str) -> str:
    """``name`` without wrapper segments (``_orig_mod`` and the like) anywhere in its dotted path."""
    if "_orig_mod" not in name and "_wrapped_module" not in name:
        return name
    return ".".join(p for p in name.split(".") if p not in WRAPPERS)


def _candidates(key: str):
    """Spellings of ``key`` to try, closest first: cleaned, prefixed, each adapter-name infix removed."""
    k = clean(key)
    base = [k] if k.startswith(PREFIX) else [k, PREFIX + k]
    for b in base:
        yield b
        for pattern, repl in _IN_MEMORY:
            if pattern.search(b):
                yield pattern.sub(repl, b)
        parts = b.split(".")
        for i in range(len(PREFIX.split(".")) - 1, len(parts)):  # one segment (an adapter name) removed
            yield ".".join(parts[:i] + parts[i + 1:])
        if b.endswith(_WRAPPED_BIAS):  # a bias="all" bias, saved while another adapter wrapped its module, or not
            yield b[: -len(_WRAPPED_BIAS)] + ".bias"
        elif b.endswith(".bias"):
            yield b[: -len(".bias")] + _WRAPPED_BIAS


def normalize(tensors: dict, expected, source: str) -> dict:
    """``tensors`` with each key renamed to the first of its spellings the model expects (unchanged
    when none is). Keys the model expects as they are stay as they are.

    Raises:
        AdapterLoadError: two keys of the file name the same tensor (both quoted).
    """
    expected = set(expected)
    out: dict = {}
    origin: dict[str, str] = {}
    for key, t in tensors.items():
        new = key if key in expected else next((c for c in _candidates(key) if c in expected), key)
        if new in out:
            raise AdapterLoadError(f"{source!r} holds {origin[new]!r} and {key!r}, which both name the tensor {new!r}")
        out[new], origin[new] = t, key
    return out


def _module(key: str) -> str:
    """The module part of a saved key (everything before its first ``lora_``/copy segment)."""
    m = re.search(r"\.(lora_[A-Za-z_]+|token_adapter)(\.|$)", key)
    return key[: m.start()] if m else key.rsplit(".", 1)[0]


def adapted_modules(keys) -> list[str]:
    """The modules whose LoRA factors ``keys`` hold (``lora_A`` / ``lora_embedding_A``), as full
    names of the bare model, in file order."""
    out: dict[str, None] = {}
    for key in keys:
        if re.search(r"\.lora_(embedding_)?A(\.|$)", key):
            m = clean(_module(key))
            out[m[len(PREFIX):] if m.startswith(PREFIX) else m] = None
    return list(out)


def mismatch(expected, keys, source: str) -> str | None:
    """Why a file's ``keys`` do not fit the model's ``expected`` keys, or None when they do: the
    first missing key, how many adapted modules the file covers, and a key of the file beside the
    nearest expected key."""
    expected, keys = list(expected), list(keys)
    missing = [k for k in expected if k not in keys]
    extra = [k for k in keys if k not in set(expected)]
    if not missing and not extra:
        return None
    modules = sorted({_module(k) for k in expected})
    covered = sum(all(k in keys for k in expected if _module(k) == m) for m in modules)
    head = (f"{source!r} lacks key {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            if missing else f"{source!r} has key {extra[0]!r}, which matches no adapted module of the model"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    tail = f"; {covered} of {len(modules)} adapted modules matched"
    if missing:  # which kinds of key are missing: all lora_B.bias (a lora_bias config), or whole modules
        kinds = collections.Counter(k[len(_module(k)) + 1:] for k in missing)
        tail += " (missing: " + ", ".join(f"{kind} of {n} module{'s' * (n > 1)}" for kind, n in kinds.items()) + ")"
    if extra:
        near = difflib.get_close_matches(extra[0], missing or expected, n=1, cutoff=0.0)
        tail += f"; the file holds e.g. {extra[0]!r}" + (f", nearest model key {near[0]!r}" if near else "")
    return head + tail
