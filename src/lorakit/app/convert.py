"""``lorakit convert``: LoRA adapters written by mlx-lm or torchtune, rewritten in PEFT's format
(``adapter_model.safetensors`` + ``adapter_config.json``) with the same outputs.

mlx-lm (``mlx_lm/tuner/lora.py``, ``LoRALinear``; ``mlx_lm/tuner/utils.py``): ``adapters.safetensors``
holds ``<module>.lora_a`` (in x r) and ``<module>.lora_b`` (r x out) under transformers' module names;
``adapter_config.json`` holds ``lora_parameters: {rank, scale, dropout, keys}``. The layer computes
``y = W x + scale · (x A_m) B_m``, so PEFT's ``A = A_mᵀ``, ``B = B_mᵀ`` and ``lora_alpha = scale · r``
(``alpha / r = scale``).

torchtune (``torchtune/modules/peft/lora.py``; ``torchtune/models/convert_weights.py``): keys
``layers.<i>.attn.q_proj.lora_a.weight`` (r x in) / ``lora_b.weight`` (out x r) under torchtune's module
names (``attn.{q,k,v,output}_proj``, ``mlp.w1/w2/w3``, ``output``), ``y = W x + (alpha / rank) B A x``;
alpha comes from the recipe (``lora_alpha``) or its ``adapter_config.json``. torchtune keeps Meta's
interleaved rotary row order, so ``lora_B`` of ``q_proj`` / ``k_proj`` is put back into transformers' order
(``tune_to_peft_adapter_weights``), which needs the base model's head counts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorakit.config import LoRAConfig
from lorakit.durable import read_utf8
from lorakit.errors import AdapterLoadError, CLIError, ConfigError
from lorakit.io import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from lorakit.weightfile import check_finite, load_pickle, load_safetensors

from .files import write_folder
from .rope_layout import from_interleaved, read_dims

MLX_WEIGHTS = "adapters.safetensors"
TORCHTUNE_FILES = ("adapter_model.safetensors", "adapter_model.pt", "adapter_0.pt")
TORCHTUNE_ARCHS = ("llama", "mistral")  # torchtune converts these with hf_to_tune's q/k permutation

# torchtune's module paths -> transformers' (``_FROM_HF`` in torchtune/models/convert_weights.py)
_TUNE_TO_HF = [
    (r"^layers\.(\d+)\.attn\.q_proj$", r"model.layers.\1.self_attn.q_proj"),
    (r"^layers\.(\d+)\.attn\.k_proj$", r"model.layers.\1.self_attn.k_proj"),
    (r"^layers\.(\d+)\.attn\.v_proj$", r"model.layers.\1.self_attn.v_proj"),
    (r"^layers\.(\d+)\.attn\.output_proj$", r"model.layers.\1.self_attn.o_proj"),
    (r"^layers\.(\d+)\.mlp\.w1$", r"model.layers.\1.mlp.gate_proj"),
    (r"^layers\.(\d+)\.mlp\.w2$", r"model.layers.\1.mlp.down_proj"),
    (r"^layers\.(\d+)\.mlp\.w3$", r"model.layers.\1.mlp.up_proj"),
    (r"^output$", "lm_head"),
]


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(read_utf8(path, AdapterLoadError, "utf-8-sig"))
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{str(path)!r} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(d, dict):
        raise AdapterLoadError(f"{str(path)!r} must hold a JSON object")
    return d


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file (its header checked first), or a torch ``.pt`` file read with ``weights_only=True``
    (tensors only: no code runs), as ``read_adapter`` reads them; every floating tensor finite.

    Raises:
        AdapterLoadError: an unreadable, truncated or foreign file, or a NaN / Inf (file, key, index named).
    """
    tensors = load_safetensors(path) if path.suffix == ".safetensors" else load_pickle(path)
    for k, t in tensors.items():
        if t.is_floating_point():
            check_finite(path, k, t)
    return tensors


def _pairs(tensors: dict, a_suffix: str, b_suffix: str, source: Path) -> dict[str, tuple]:
    """module -> (A, B) from keys ``<module><a_suffix>`` / ``<module><b_suffix>``.

    Raises:
        AdapterLoadError: a key that is neither, or a module with only one of the two (the key named).
    """
    out: dict[str, list] = {}
    for k, t in tensors.items():
        if k.endswith(a_suffix):
            out.setdefault(k[: -len(a_suffix)], [None, None])[0] = t
        elif k.endswith(b_suffix):
            out.setdefault(k[: -len(b_suffix)], [None, None])[1] = t
        else:
            raise AdapterLoadError(f"{str(source)!r} has key {k!r}, which is not a LoRA {a_suffix} / {b_suffix} "
                                   "tensor (DoRA magnitudes and embeddings are not converted)")
    for m, (a, b) in out.items():
        if a is None or b is None:
            missing = b_suffix if b is None else a_suffix
            raise AdapterLoadError(f"{str(source)!r} lacks key {m + missing!r} (its pair is present)")
    if not out:
        raise AdapterLoadError(f"{str(source)!r} holds no LoRA tensors")
    return {m: (a, b) for m, (a, b) in out.items()}


def targets_for(modules: list[str]) -> dict:
    """``target_modules`` (+ ``layers_to_transform``) selecting exactly ``modules``: per-block names when
    every adapted block has the same set, else the full module names."""
    parts = [re.match(r"^(.*\.layers)\.(\d+)\.(.+)$", m) for m in modules]
    if all(parts) and len({p.group(1) for p in parts}) == 1:
        layers = sorted({int(p.group(2)) for p in parts})
        names = sorted({p.group(3) for p in parts})
        if len(modules) == len(layers) * len(names):
            return {"target_modules": names, "layers_to_transform": layers, "layers_pattern": "layers"}
    return {"target_modules": sorted(modules)}


def write_peft(out: Path, weights: dict[str, tuple], config: LoRAConfig, overwrite: bool, inputs: tuple = ()) -> Path:
    """Write ``{module: (A (r x in), B (out x r))}`` and ``config`` as a PEFT adapter folder, atomically
    (``inputs``: the files read, which an ``overwrite`` must not remove: ``files.write_folder``).

    Raises:
        AdapterLoadError: a module whose A and B ranks differ from ``config.rank_for(module)``.
        CLIError: ``out`` exists and is not empty, without ``overwrite``.
        SaveError: ``out`` holds the current folder or ``inputs`` (refused, nothing written).
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CLIError(f"output {str(out)!r} already exists (use --overwrite or another --output)")
    state = {}
    for m, (a, b) in sorted(weights.items()):
        r = config.rank_for(m)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise AdapterLoadError(f"module {m!r}: A {list(a.shape)} and B {list(b.shape)} do not have rank {r}")
        state[f"{PREFIX}{m}.lora_A.weight"] = a.contiguous()
        state[f"{PREFIX}{m}.lora_B.weight"] = b.contiguous()

    def fill(tmp: Path) -> None:
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    write_folder(out, fill, replace=True, inputs=inputs)
    return out


def convert_mlx(src: str | Path, out: str | Path, base_model: str | None = None, overwrite: bool = False) -> Path:
    """Convert an mlx-lm LoRA adapter folder to a PEFT adapter folder with the same outputs.

    Args:
        src: folder with ``adapters.safetensors`` and ``adapter_config.json`` (mlx-lm's ``--adapter-path``).
        out: new PEFT folder. base_model: stored as ``base_model_name_or_path`` (default: mlx's ``model``).

    Raises:
        AdapterLoadError: a missing file, a DoRA / full fine-tune / other non-LoRA adapter, or keys that
            are not LoRA pairs (named).
    """
    src = Path(src)
    cfg_file, w_file = src / CONFIG_NAME, src / MLX_WEIGHTS
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise AdapterLoadError(f"{str(f)!r} is missing (an mlx-lm adapter folder holds {MLX_WEIGHTS} and "
                                   f"{CONFIG_NAME})")
    cfg = _read_json(cfg_file)
    kind = cfg.get("fine_tune_type", "dora" if cfg.get("use_dora") else "lora")
    if kind != "lora":
        raise AdapterLoadError(f"{str(cfg_file)!r}: fine_tune_type {kind!r} is not converted (only 'lora')")
    lp = cfg.get("lora_parameters")
    if not isinstance(lp, dict) or "rank" not in lp or "scale" not in lp:
        raise AdapterLoadError(f"{str(cfg_file)!r} lacks lora_parameters with rank and scale")
    pairs = _pairs(_read_tensors(w_file), ".lora_a", ".lora_b", w_file)
    weights = {m: (a.T, b.T) for m, (a, b) in pairs.items()}  # mlx: A (in x r), B (r x out)
    try:
        config = LoRAConfig(r=lp["rank"], lora_alpha=float(lp["scale"]) * lp["rank"],
                            lora_dropout=lp.get("dropout", 0.0), task_type="CAUSAL_LM",
                            base_model_name_or_path=base_model or cfg.get("model"), **targets_for(sorted(pairs)))
    except (ConfigError, TypeError, ValueError) as e:
        raise AdapterLoadError(f"{str(cfg_file)!r}: {e}") from None
    return write_peft(Path(out), weights, config, overwrite, (src, base_model))


def _tune_file(src: Path) -> Path:
    if src.is_file():
        return src
    if not src.exists():
        raise AdapterLoadError(f"{str(src)!r} does not exist")
    for name in TORCHTUNE_FILES:
        if (src / name).is_file():
            return src / name
    raise AdapterLoadError(f"{str(src)!r} holds none of {', '.join(TORCHTUNE_FILES)} (torchtune's adapter files)")


def _tune_alpha(src: Path, lora_alpha: float | None) -> float:
    if lora_alpha is not None:
        return lora_alpha
    cfg = (src if src.is_dir() else src.parent) / CONFIG_NAME
    if cfg.is_file() and "lora_alpha" in (d := _read_json(cfg)):
        return d["lora_alpha"]
    raise AdapterLoadError(f"torchtune adapter {str(src)!r}: pass --lora-alpha (the recipe's lora_alpha); no "
                           f"{CONFIG_NAME} with lora_alpha beside it")


def convert_torchtune(src: str | Path, out: str | Path, base_model: str, lora_alpha: float | None = None,
                      overwrite: bool = False) -> Path:
    """Convert a torchtune LoRA checkpoint (torchtune's module names and row order) to a PEFT adapter folder.

    Args:
        src: ``adapter_0.pt`` / ``adapter_model.pt`` / a ``.safetensors`` file, or the folder holding one.
        base_model: the transformers model it was trained from (``lorakit`` model reference): gives the
            head counts for the row order of ``q_proj`` / ``k_proj``.
        lora_alpha: the recipe's ``lora_alpha`` (default: ``adapter_config.json`` beside ``src``).

    Raises:
        AdapterLoadError: unreadable file, a key that is not torchtune's LoRA layout (named), no alpha.
        ModelLoadError: the base model's config cannot be read.
    """
    src = Path(src)
    f = _tune_file(src)
    pairs = _pairs(_read_tensors(f), ".lora_a.weight", ".lora_b.weight", f)
    dims = read_dims(base_model)
    if dims.arch not in TORCHTUNE_ARCHS:
        raise AdapterLoadError(f"torchtune conversion knows the row order of {', '.join(TORCHTUNE_ARCHS)} bases; "
                               f"{base_model!r} is {dims.arch!r}")
    weights = {}
    for m, (a, b) in pairs.items():
        hf = next((re.sub(p, r, m) for p, r in _TUNE_TO_HF if re.match(p, m)), None)
        if hf is None:
            raise AdapterLoadError(f"{str(f)!r}: module {m!r} is not one of torchtune's Llama module paths")
        if hf.endswith(("q_proj", "k_proj")):
            b = from_interleaved(b, dims.n_heads if hf.endswith("q_proj") else dims.n_kv_heads)
        weights[hf] = (a, b)
    r, alpha = next(iter(pairs.values()))[0].shape[0], _tune_alpha(src, lora_alpha)  # names src itself
    try:
        config = LoRAConfig(r=int(r), lora_alpha=alpha, task_type="CAUSAL_LM",
                            base_model_name_or_path=base_model, **targets_for(sorted(weights)))
    except (ConfigError, TypeError, ValueError) as e:
        raise AdapterLoadError(f"{str(src)!r}: {e}") from None
    return write_peft(Path(out), weights, config, overwrite, (src, base_model))
