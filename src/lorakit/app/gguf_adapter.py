"""LoRA adapters as llama.cpp GGUF files, both ways.

Layout (llama.cpp ``convert_lora_to_gguf.py`` and ``src/llama-adapter.cpp``): ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32), ``general.architecture`` equal to the base's;
per adapted weight ``<gguf name>.weight.lora_a`` (numpy (r, in), GGUF ne [in, r]) and ``.lora_b`` (numpy
(out, r)). llama.cpp adds ``alpha / r · B A x`` with r read from each ``lora_b``, so per-module scalings
that differ from ``lora_alpha / r`` (rsLoRA, ``alpha_pattern``) are baked into B. The converter permutes
the rows of ``q_proj`` / ``k_proj`` of Llama models (``LlamaModel.permute``), hence ``lora_B`` of those
(its rows are the weight's output rows) is permuted the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from lorakit import read_adapter
from lorakit.config import LoRAConfig
from lorakit.durable import write_atomic
from lorakit.errors import AdapterLoadError, CLIError, ConfigError

from .convert import targets_for, write_peft
from .files import check_output_file
from .gguf_names import gguf_arch, gguf_module_names, permuted_heads
from .models import adapter_meta
from .rope_layout import from_interleaved, read_dims, to_interleaved

_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def _refuse_unsupported(config: LoRAConfig, tensors: dict, adapter: str) -> None:
    """llama.cpp's LoRA adds ``s·B·A`` to Linear weights only.

    Raises:
        AdapterLoadError: DoRA, lora_bias, trained biases, modules_to_save or embedding adapters (named).
    """
    why = ("DoRA" if config.use_dora else "lora_bias" if config.lora_bias else
           f"bias={config.bias!r}" if config.bias != "none" else
           "modules_to_save" if config.modules_to_save else None)
    if why:
        raise AdapterLoadError(f"adapter {adapter!r} uses {why}, which llama.cpp's LoRA format cannot hold")
    for k in tensors:
        if not _LORA_KEY.match(k):
            raise AdapterLoadError(f"adapter {adapter!r}: tensor {k!r} is not a Linear layer's lora_A / lora_B; "
                                   "llama.cpp's LoRA format cannot hold it")


def gguf_lora_tensors(config: LoRAConfig, tensors: dict, dims, arch: str, permute: bool, adapter: str) -> dict:
    """GGUF name -> float32 array: ``lora_a`` = A (r x in); ``lora_b`` = B·(s / (alpha / r)) (out x r), rows
    permuted for ``q_proj`` / ``k_proj`` when ``permute``.

    Raises:
        AdapterLoadError: a module with no GGUF name for this architecture (e.g. a tied ``lm_head``).
    """
    names = gguf_module_names(arch, dims.n_layers)
    out = {}
    for k, a in sorted(tensors.items()):
        module, which = _LORA_KEY.match(k).groups()
        if which == "B":
            continue
        b = tensors[f"base_model.model.{module}.lora_B.weight"]
        stem = names.get(module)
        if stem is None:
            raise AdapterLoadError(f"adapter {adapter!r}: module {module!r} has no tensor in a {arch} GGUF "
                                   f"({dims.n_layers} blocks)")
        r = a.shape[0]
        b = b.double() * (config.scaling_for(module) / (config.lora_alpha / r))  # llama.cpp applies alpha / r
        heads = permuted_heads(module, dims) if permute else None
        if heads:
            b = to_interleaved(b, heads)
        out[f"{stem}.weight.lora_a"] = a.float().numpy()
        out[f"{stem}.weight.lora_b"] = b.float().numpy()
    return out


def _gguf_array(arr: np.ndarray, outtype: str):
    """``(data, raw type or None)``: f32 / f16 as is; q8_0 where a row holds whole 32-value blocks, else f16
    (llama.cpp's converter falls back the same way)."""
    import gguf

    if outtype == "f32":
        return arr.astype(np.float32), None
    if outtype == "q8_0" and arr.shape[-1] % 32 == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(arr.astype(np.float32), q), q
    return arr.astype(np.float16), None


def write_gguf(path: Path, arch: str, kv: callable, tensors: dict, outtype: str) -> None:
    """Write a GGUF file atomically: ``kv(writer)`` adds the metadata, then the tensors (1-D ones in f32)."""
    import gguf

    def write(tmp):
        w = gguf.GGUFWriter(tmp, arch)
        kv(w)
        for name, arr in tensors.items():
            data, raw = _gguf_array(arr, outtype) if arr.ndim > 1 else (arr.astype(np.float32), None)
            w.add_tensor(name, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write_atomic(path, write)


def export_gguf_adapter(adapter: str, output: str, outtype: str = "f32", base_model: str | None = None,
                        overwrite: bool = False) -> Path:
    """Write PEFT/lorakit adapter folder ``adapter`` as a llama.cpp LoRA GGUF file ``output``.

    Args:
        outtype: ``"f32"``, ``"f16"`` or ``"q8_0"`` for lora_a / lora_b.
        base_model: model reference for the head counts and block count (default: the adapter's base).

    Raises:
        AdapterLoadError: unreadable adapter, or parts llama.cpp cannot hold (DoRA, lora_bias, biases,
            modules_to_save, embeddings, a tied lm_head).
        ModelLoadError: the base's config cannot be read or its architecture is not supported.
        CLIError: ``output`` is a folder, or exists without ``overwrite``.
    """
    out = Path(output)
    if out.is_dir():  # --overwrite replaces a file, never a folder
        raise CLIError(f"output {str(out)!r} is a folder; --output names the .gguf file to write")
    if out.exists() and not overwrite:
        raise CLIError(f"output {str(out)!r} already exists (use --overwrite or another --output)")
    if base_model is None:
        _, base_model = adapter_meta(adapter)
    check_output_file(out, (adapter, base_model))
    config, tensors = read_adapter(adapter)
    _refuse_unsupported(config, tensors, adapter)
    dims = read_dims(base_model)
    arch, permute = gguf_arch(dims, str(out))
    arrays = gguf_lora_tensors(config, tensors, dims, arch, permute, adapter)

    def kv(w) -> None:
        import gguf

        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config.lora_alpha))

    out.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(out, arch, kv, arrays, outtype)
    return out


def read_gguf_adapter(path: str | Path) -> tuple[str, float, dict[str, np.ndarray]]:
    """``(architecture, alpha, {tensor name: float32 array})`` of a llama.cpp LoRA GGUF file.

    Raises:
        AdapterLoadError: not a GGUF file, or not a LoRA adapter (general.type / adapter.type named).
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = Path(path)
    try:
        r = GGUFReader(path)
    except (OSError, ValueError) as e:
        raise AdapterLoadError(f"{str(path)!r} is not a readable GGUF file: {e}") from None

    def field(key: str):
        return r.fields[key].contents() if key in r.fields else None

    if field("general.type") != "adapter" or field("adapter.type") != "lora":
        raise AdapterLoadError(f"{str(path)!r} is not a GGUF LoRA adapter (general.type={field('general.type')!r}, "
                               f"adapter.type={field('adapter.type')!r})")
    arrays = {t.name: dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
              for t in r.tensors}
    return str(field("general.architecture")), float(field("adapter.lora.alpha") or 0.0), arrays


def import_gguf_adapter(path: str, output: str, base_model: str, overwrite: bool = False) -> Path:
    """Convert a llama.cpp LoRA GGUF file back to a PEFT adapter folder with the same outputs.

    ``lora_alpha`` is the file's alpha; a module whose rank differs from the most common one gets a
    ``rank_pattern`` entry; ``q_proj`` / ``k_proj`` rows go back to transformers' order.

    Raises:
        AdapterLoadError: not a LoRA GGUF, alpha 0 (llama.cpp then applies B A unscaled; not representable
            with every rank), a tensor with no transformers name or a lone half of a pair (named).
        ModelLoadError: the base's config cannot be read, or its architecture differs from the file's.
    """
    arch, alpha, arrays = read_gguf_adapter(path)
    dims = read_dims(base_model)
    base_arch, permute = gguf_arch(dims, path)
    if arch != base_arch:
        raise AdapterLoadError(f"{path!r} is a {arch!r} adapter but base model {base_model!r} is {base_arch!r}")
    if alpha <= 0:
        raise AdapterLoadError(f"{path!r} has adapter.lora.alpha {alpha}; lorakit needs alpha > 0")
    to_hf = {v: k for k, v in gguf_module_names(arch, dims.n_layers).items()}
    weights = {}
    other = [n for n in arrays if not n.endswith((".weight.lora_a", ".weight.lora_b"))]
    if other:
        raise AdapterLoadError(f"{path!r}: tensor {other[0]!r} is not a lora_a / lora_b pair (norm vectors and "
                               "other extras are not converted)")
    for name, a in arrays.items():
        if not name.endswith(".weight.lora_a"):
            continue
        stem = name[: -len(".weight.lora_a")]
        if stem not in to_hf or f"{stem}.weight.lora_b" not in arrays:
            raise AdapterLoadError(f"{path!r}: tensor {name!r} has no transformers module or no lora_b")
        b = torch.from_numpy(np.array(arrays[f"{stem}.weight.lora_b"], dtype=np.float32))
        heads = permuted_heads(to_hf[stem], dims) if permute else None
        weights[to_hf[stem]] = (torch.from_numpy(np.array(a, dtype=np.float32)),
                                from_interleaved(b, heads) if heads else b)
    lone = [n for n in arrays if n.endswith(".lora_b") and n[: -len("b")] + "a" not in arrays]
    if lone or not weights:
        raise AdapterLoadError(f"{path!r}: " + (f"tensor {lone[0]!r} has no lora_a" if lone else "no LoRA tensors"))
    return write_peft(Path(output), weights, _gguf_config(weights, alpha, base_model), overwrite, (path, base_model))


def _gguf_config(weights: dict, alpha: float, base_model: str) -> LoRAConfig:
    ranks = {m: a.shape[0] for m, (a, _) in weights.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    try:
        return LoRAConfig(r=r, lora_alpha=alpha, rank_pattern=pattern, task_type="CAUSAL_LM",
                          base_model_name_or_path=base_model, **targets_for(sorted(weights)))
    except ConfigError as e:
        raise AdapterLoadError(str(e)) from None
