"""The two row orders of a Llama attention projection's output features, and the shape facts of a base
model needed to convert between them, read without loading any weights.

Hugging Face transformers stores ``q_proj`` / ``k_proj`` rows per head as [first halves of the rotary
pairs, then second halves] (``rotate_half`` RoPE). Meta's original checkpoints, torchtune and llama.cpp's
GGUF files interleave them (pair ``(2j, 2j+1)``). llama.cpp's converter (``convert_hf_to_gguf.py``,
``LlamaModel.permute``) and torchtune (``torchtune/models/convert_weights.py``, ``hf_to_tune`` /
``tune_to_hf``) convert between the two with the same reshape: per head of ``d`` rows,
interleaved row ``2j + t`` is HF row ``t * d/2 + j``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.errors import ModelLoadError


def to_interleaved(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF row order -> interleaved (llama.cpp / Meta / torchtune) along dim 0.

    Args:
        t: (n_heads * d, ...) with d even: a ``q_proj``/``k_proj`` weight or its ``lora_B`` (out x r).
        n_heads: heads of that projection (``num_key_value_heads`` for ``k_proj``).

    Raises:
        ModelLoadError: the rows do not split into ``n_heads`` heads of an even size.
    """
    d = _head_dim(t, n_heads)
    return t.reshape(n_heads, 2, d // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def from_interleaved(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``to_interleaved``: interleaved rows -> HF row order (same args and errors)."""
    d = _head_dim(t, n_heads)
    return t.reshape(n_heads, d // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _head_dim(t: torch.Tensor, n_heads: int) -> int:
    rows = t.shape[0]
    if n_heads < 1 or rows % n_heads or (rows // n_heads) % 2:
        raise ModelLoadError(f"a tensor of {rows} rows does not split into {n_heads} heads of an even size")
    return rows // n_heads


@dataclass(frozen=True)
class BaseDims:
    """What format conversions need to know about a base model.

    Attributes:
        arch: ``model_type`` in transformers' terms (``"llama"``, ``"mistral"``, ``"qwen2"``, ...).
        n_heads, n_kv_heads: attention heads of ``q_proj`` and of ``k_proj`` / ``v_proj``.
        n_layers: decoder blocks.
    """

    arch: str
    n_heads: int
    n_kv_heads: int
    n_layers: int


def read_dims(reference: str | None) -> BaseDims:
    """``BaseDims`` of a model reference (``"default"``, a ``.gguf`` file, a transformers folder or a cached
    Hugging Face id), from its ``config.json`` or GGUF metadata only: no weights are read.

    Raises:
        ModelLoadError: the reference cannot be found, or its config lacks the head counts.
    """
    from .models import DEFAULT_MODEL, default_gguf

    ref = DEFAULT_MODEL if reference in (None, "", DEFAULT_MODEL) else str(reference)
    if ref == DEFAULT_MODEL or ref.endswith(".gguf"):
        return _gguf_dims(default_gguf() if ref == DEFAULT_MODEL else Path(ref))
    p = Path(ref).expanduser()
    if p.is_dir():
        f = p / "config.json"
        if not f.is_file():
            raise ModelLoadError(f"{ref!r} is not a transformers model folder (no config.json)")
        return _hf_dims(json.loads(f.read_text()), str(f))
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(ref, local_files_only=True).to_dict()
    except (OSError, ValueError):
        raise ModelLoadError(f"model {ref!r} is not a local path and not in the local Hugging Face cache") from None
    return _hf_dims(cfg, ref)


def _hf_dims(cfg: dict, source: str) -> BaseDims:
    cfg = cfg.get("text_config", cfg) if "num_attention_heads" not in cfg else cfg
    try:
        n = int(cfg["num_attention_heads"])
        return BaseDims(str(cfg.get("model_type", "")), n, int(cfg.get("num_key_value_heads") or n),
                        int(cfg["num_hidden_layers"]))
    except (KeyError, TypeError, ValueError):
        kind = f"a {cfg['model_type']!r} model" if cfg.get("model_type") else "a model"
        raise ModelLoadError(f"{source!r} describes {kind} without num_attention_heads / num_hidden_layers: not a "
                             "Llama-style base (GGUF files cover llama, mistral and qwen2)") from None


def _gguf_dims(path: Path) -> BaseDims:
    from gguf import GGUFReader

    if not path.is_file():
        raise ModelLoadError(f"GGUF file {str(path)!r} does not exist")
    try:
        r = GGUFReader(path)
        arch = r.fields["general.architecture"].contents()
        n = int(r.fields[f"{arch}.attention.head_count"].contents())
        kv = r.fields.get(f"{arch}.attention.head_count_kv")
        return BaseDims(arch, n, int(kv.contents()) if kv else n, int(r.fields[f"{arch}.block_count"].contents()))
    except (KeyError, ValueError, OSError) as e:
        raise ModelLoadError(f"cannot read GGUF metadata of {str(path)!r}: {e}") from None
