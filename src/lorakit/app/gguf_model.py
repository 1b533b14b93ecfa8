"""``lorakit merge --format gguf``: the merged model as one GGUF file that llama.cpp runs.

Metadata: a GGUF base (the built-in default) gives all of its own (hyper-parameters, tokenizer, chat
template) except the file type; a transformers folder gives its ``config.json`` hyper-parameters and its
tokenizer through the ``gguf`` package's vocab readers (``gguf.vocab``). Tensors come from the merged model
under the ``gguf`` package's names, ``q_proj`` / ``k_proj`` rows permuted as llama.cpp's converter does; 1-D
tensors stay f32, matrices are f32, f16 or q8_0 (a matrix whose rows are not whole 32-value blocks: f16).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lorakit import unload
from lorakit.errors import CLIError, ModelLoadError

from .console import quiet_transformers
from .files import check_output_file
from .gguf_adapter import write_gguf
from .gguf_names import gguf_arch, name_map, permuted_heads
from .models import DEFAULT_MODEL, default_gguf, load_with_adapter, make_plain
from .qbase import full_precision
from .rope_layout import BaseDims, read_dims, to_interleaved

# copied from a GGUF base except these: the writer adds the architecture, the rest describe the old tensors
_NOT_COPIED = ("general.architecture", "general.file_type", "general.quantization_version")


def merged_tensors(model, dims: BaseDims, arch: str, permute: bool) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array of every parameter of a merged causal LM (a tied head left out).

    Raises:
        ModelLoadError: a parameter with no name in the ``gguf`` package's map for ``arch``.
    """
    tmap = name_map(arch, dims.n_layers)
    tied = getattr(model.config, "tie_word_embeddings", False)
    out = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ModelLoadError(f"parameter {name!r} has no GGUF tensor name for architecture {arch!r}")
        heads = permuted_heads(name.rsplit(".", 1)[0], dims) if permute else None
        t = t.detach().float()
        out[gname] = (to_interleaved(t, heads) if heads else t).numpy()
    return out


def _copy_kv(base: Path):
    """``kv(writer)`` copying a GGUF file's metadata (``_NOT_COPIED`` left out)."""
    from gguf import GGUFReader, GGUFValueType

    fields = [f for k, f in GGUFReader(base).fields.items() if not k.startswith("GGUF.") and k not in _NOT_COPIED]

    def kv(w) -> None:
        for f in fields:
            sub = f.types[1] if f.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), f.types[0], sub)

    return kv


def _hf_kv(model, tokenizer_dir: Path, arch: str):
    """``kv(writer)`` from a transformers config and the tokenizer files in ``tokenizer_dir``."""
    import gguf

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(c, "rope_theta", 10000.0)
    vocab = gguf.vocab.BpeVocab(tokenizer_dir)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab.vocab_size)

    def kv(w) -> None:
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads or c.num_attention_heads)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(float(rope))
        w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
        w.add_vocab_size(c.vocab_size)
        tokens, scores, types = zip(*vocab.all_tokens())
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(list(tokens))
        w.add_token_types(list(types))
        special.add_to_gguf(w)

    return kv


def _file_type(outtype: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


def write_merged_gguf(model, base_ref: str, out: Path, outtype: str, tokenizer=None) -> Path:
    """Write merged ``model`` (plain nn.Linear weights) as a GGUF file, atomically.

    Args:
        base_ref: the base model reference: a GGUF base lends its metadata; otherwise ``tokenizer`` (a
            transformers fast tokenizer, saved to read its files) gives the vocabulary.
        outtype: ``"f32"``, ``"f16"`` or ``"q8_0"``.

    Raises:
        ModelLoadError: an unsupported architecture or a parameter without a GGUF name.
    """
    import gguf
    import tempfile

    dims = read_dims(base_ref)
    arch, permute = gguf_arch(dims, str(out))
    tensors = merged_tensors(model, dims, arch, permute)
    with tempfile.TemporaryDirectory() as tok_dir:
        if base_ref == DEFAULT_MODEL or str(base_ref).endswith(".gguf"):
            meta = _copy_kv(default_gguf() if base_ref == DEFAULT_MODEL else Path(base_ref))
        else:
            tokenizer.save_pretrained(tok_dir)
            meta = _hf_kv(model, Path(tok_dir), arch)

        def kv(w) -> None:
            meta(w)
            w.add_file_type(_file_type(outtype))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)

        out.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(out, arch, kv, tensors, outtype)
    return out


def cmd_merge_gguf(args: argparse.Namespace) -> int:
    """``lorakit merge --adapter DIR --format gguf --output FILE.gguf [--outtype f16|q8_0|f32]``."""
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise CLIError(f"output {str(out)!r} already exists (use --overwrite or another --output)")
    if out.is_dir():
        raise CLIError(f"output {str(out)!r} is a folder; --format gguf writes one file")
    quiet_transformers()
    lm, meta = load_with_adapter(args.adapter)
    check_output_file(out, (args.adapter, lm.reference))  # the base as loaded
    full_precision(lm.model)  # a quantised base: float32 dequant(W) first, as the transformers merge
    model = unload(lm.model, merge=True)
    make_plain(model)
    outtype = args.outtype or "f16"
    write_merged_gguf(model, lm.reference, out, outtype, lm.tokenizer)
    print(f"merged GGUF ({outtype}) written to {out}")
    return 0
