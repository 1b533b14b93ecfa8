"""Names shared by the GGUF writers and readers: llama.cpp's architecture for a transformers model type,
whether its converter permutes ``q_proj`` / ``k_proj`` rows, and tensor names from the ``gguf`` package's
own map (``gguf.get_tensor_name_map``), e.g. ``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q``."""

from __future__ import annotations

from lorakit.errors import ModelLoadError

from .rope_layout import BaseDims

# transformers model_type (or a GGUF file's general.architecture) -> (llama.cpp arch, q/k rows permuted?).
# llama.cpp's convert_hf_to_gguf.py converts Mistral with its LlamaModel (permuted), Qwen2 without.
ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}

# the adapted Linear layers of a decoder block, in transformers' names
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def gguf_arch(dims: BaseDims, what: str) -> tuple[str, bool]:
    """``(llama.cpp architecture name, q/k permuted)`` for a base model.

    Raises:
        ModelLoadError: an architecture lorakit does not write GGUF for (``what`` names the file).
    """
    if dims.arch not in ARCHS:
        raise ModelLoadError(f"{what}: GGUF export supports {', '.join(sorted(ARCHS))} base models; this base is "
                             f"{dims.arch!r}")
    return ARCHS[dims.arch]


def name_map(arch: str, n_layers: int):
    """The ``gguf`` package's ``TensorNameMap`` for ``arch`` (a llama.cpp architecture name)."""
    import gguf

    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(enum, n_layers)


def gguf_module_names(arch: str, n_layers: int) -> dict[str, str]:
    """transformers module name -> GGUF tensor stem, for every block Linear and the output head."""
    tmap = name_map(arch, n_layers)
    out = {}
    for i in range(n_layers):
        for s in BLOCK_LINEARS:
            hf = f"model.layers.{i}.{s}"
            out[hf] = tmap.get_name(hf)
    out["lm_head"] = tmap.get_name("lm_head")
    return {k: v for k, v in out.items() if v}


def permuted_heads(module: str, dims: BaseDims) -> int | None:
    """Heads whose rows llama.cpp interleaves in ``module`` (``q_proj``: all, ``k_proj``: kv), else None."""
    if module.endswith("self_attn.q_proj"):
        return dims.n_heads
    if module.endswith("self_attn.k_proj"):
        return dims.n_kv_heads
    return None
