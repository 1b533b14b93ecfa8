"""Quantised bases (QLoRA): ``quantize_base`` swaps a frozen base's ``nn.Linear`` layers for 4-bit NF4 or
8-bit ones, ``dequantize`` swaps them back for full-precision ``nn.Linear`` holding dequant(W) (so adapters
can be merged), ``quantization`` tells which kind a model holds.

- ``"nf4"``: 4-bit NormalFloat, one float32 absmax per block of 64 weights (Dettmers et al. 2023,
  "QLoRA", §3, eq. 1-4; no double quantisation: it saves 0.37 bit per weight and costs a second
  dequantisation per forward on CPU).
- ``"int8"``: one absmax per output row, weights rounded to int8 (Dettmers et al. 2022, "LLM.int8()",
  §3.1 vector-wise quantisation; outlier threshold 0, so no weight column stays in 16 bits).

Library: bitsandbytes (``pip install 'lorakit[quant]'``, pinned in constraints.txt). Chosen over torchao
0.18 because (checked on this CPU with torch 2.13.0, float32): bitsandbytes 0.50 runs both kinds on
CPU, forward and backward to the input, with ``Linear4bit`` / ``Linear8bitLt`` subclassing
``nn.Linear``; PEFT dispatches its LoRA layers onto exactly these classes (``peft.tuners.lora.bnb``),
so PEFT parity is checked on one and the same quantised module; transformers' ``BitsAndBytesConfig``
builds the same classes, so a model quantised there trains here too. torchao 0.18's int8 weight-only
tensor works on CPU (forward and backward), but its NF4 tensor refuses small weights (a 32 × 64
weight: "number of scalers must be divisible by scaler block size", 256) and PEFT's torchao LoRA layer
takes int8 weights only, so NF4 parity could not be checked against it.

bitsandbytes is imported inside these functions only, so ``import lorakit`` needs only torch and
safetensors. The LoRA side (float32 adapters, refused merges) is ``lorakit.qlinear``'s, torch only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from .errors import ConfigError, QuantizedBaseError, TargetModuleError
from .inject import _output_head, nearest_names
from .qlinear import keep_cpu_layout
from .tree import adapter_modules, set_submodule

QUANT_TYPES = ("nf4", "int8")
NF4_BLOCKSIZE = 64  # weights per absmax (QLoRA's block size)
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what bitsandbytes' 4-bit layers compute in
NF4_WEIGHT_DTYPES = COMPUTE_DTYPES  # what bitsandbytes' 4-bit quantiser reads (not float64)


def _bnb():
    """The ``bitsandbytes`` module.

    Raises:
        QuantizedBaseError: it is not installed or fails to import (the reason named).
    """
    try:
        import bitsandbytes
    except Exception as e:  # ImportError, or a broken native library (OSError, RuntimeError)
        raise QuantizedBaseError(f"a quantised base needs bitsandbytes (pip install 'lorakit[quant]'): "
                                 f"{type(e).__name__}: {e}") from None
    return bitsandbytes


def _bnb_types() -> tuple[type, ...]:
    """bitsandbytes' quantised linear classes, if it is imported (no quantised layer exists otherwise)."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    return (bnb_nn.Linear4bit, bnb_nn.Linear8bitLt) if bnb_nn is not None else ()


def check_kind(kind) -> str:
    """``kind`` if it is one of ``QUANT_TYPES``.

    Raises:
        ConfigError: any other value (named, with the choices).
    """
    if kind not in QUANT_TYPES:
        raise ConfigError(f"quantisation must be one of {', '.join(QUANT_TYPES)}, got {kind!r}")
    return kind


def _quantized(bnb, lin: nn.Linear, kind: str, compute_dtype: torch.dtype | None) -> nn.Linear:
    """A bitsandbytes layer holding ``lin``'s weight quantised and its bias as it is, on ``lin``'s device."""
    w, bias = lin.weight.detach(), lin.bias
    with torch.device("meta"):  # no float weight allocated for the new layer
        if kind == "nf4":
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias is not None, quant_type="nf4",
                                  compute_dtype=compute_dtype or w.dtype, compress_statistics=False)
        else:
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias is not None,
                                    has_fp16_weights=False, threshold=0.0)
    if kind == "nf4":
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCKSIZE,
                                     compress_statistics=False)
    else:
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        q.bias = nn.Parameter(bias.detach(), requires_grad=False)
    q.train(lin.training)  # a new module trains; this one runs as the one it replaces (int8: LLM.int8() in eval)
    return keep_cpu_layout(q.to(w.device))  # bitsandbytes quantises on this move


def _check_arguments(model, skip, compute_dtype) -> list[str]:
    """``skip`` as a list of names (one str: one name, not its characters).

    Raises:
        ConfigError: ``model`` is not an ``nn.Module``, a ``skip`` entry is not a str, or ``compute_dtype``
            is not None / float16 / bfloat16 / float32 (each named).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if skip is not None and not isinstance(skip, (str, list, tuple, set, frozenset)):
        raise ConfigError(f"skip must be a module name or a list of them, got {type(skip).__name__} {skip!r}")
    skip = [skip] if isinstance(skip, str) else list(skip or [])
    bad = [s for s in skip if not isinstance(s, str)]
    if bad:
        raise ConfigError(f"skip entries must be module names (str), got {bad[0]!r}")
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"compute_dtype must be {', '.join(map(str, COMPUTE_DTYPES[:-1]))} or {COMPUTE_DTYPES[-1]}, "
                          f"got {compute_dtype!r}")
    return skip


def _check_weights(model: nn.Module, todo: list[str], kind: str) -> None:
    """Raise ``QuantizedBaseError`` naming the first layer of ``todo`` whose weight ``kind`` cannot quantise
    (not loaded: on the meta device; empty; NF4: bitsandbytes reads 16- and 32-bit floats only), before any
    layer is replaced."""
    for name in todo:
        w = model.get_submodule(name).weight
        if w.is_meta or w.numel() == 0:
            raise QuantizedBaseError(f"cannot quantise {name!r}: its weight {tuple(w.shape)} is "
                                     + ("on the meta device (not loaded)" if w.is_meta else "empty"))
        dtype = w.dtype
        if kind == "nf4" and dtype not in NF4_WEIGHT_DTYPES:
            raise QuantizedBaseError(f"cannot quantise {name!r} to nf4: it holds a {dtype} weight and bitsandbytes' "
                                     "4-bit quantiser reads float16, bfloat16 or float32 only; cast the model "
                                     "(model.float()) first, or skip the layer")


def _skipped(name: str, skip: list[str]) -> bool:
    """Whether ``name`` or a module it lies in is named by a ``skip`` entry (in full or by trailing parts)."""
    parts = name.split(".")
    within = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # name and the modules above it
    return any(p == s or p.endswith("." + s) for p in within for s in skip)


def quantize_base(model: nn.Module, kind: str = "nf4", skip: list[str] | None = None,
                  compute_dtype: torch.dtype | None = None,
                  each: Callable[[str, nn.Module], None] | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (exact type) by a frozen quantised layer, in place.

    ``kind`` ``"nf4"`` gives bitsandbytes ``Linear4bit`` (weight: packed uint8 codes, (out·in/2, 1)),
    ``"int8"`` gives ``Linear8bitLt`` (weight: int8 (out, in) plus a float32 scale per row). The output
    head (``get_output_embeddings()`` / ``lm_head``: often tied to the embedding, and the logits are
    where rounding shows most) and modules named in ``skip`` (full names or trailing parts, e.g.
    ``"score"``; a module's Linears with it, e.g. ``"mlp"``) stay full precision, as do embeddings, norms
    and other non-Linear modules. Biases are kept as they are. ``compute_dtype``: the dtype NF4 layers
    compute in (default: the weight's). Quantised layers run inputs of any floating dtype and return it; then ``inject`` wraps them in
    ``LoRAQuantLinear`` with float32 adapters. One layer at a time is quantised, so the peak extra
    memory is one layer's; ``each(name, layer)``, if given, is called after each (e.g. to hand freed
    memory back to the OS). Returns ``model``.

    Raises:
        ConfigError: ``kind`` is not ``"nf4"`` or ``"int8"``, ``model`` is not an ``nn.Module``, a ``skip``
            entry is not a str (a single str is one name), or ``compute_dtype`` is not float16 / bfloat16 /
            float32; nothing is changed.
        QuantizedBaseError: adapters are already injected (quantise the base first), bitsandbytes is
            missing, or a layer's weight cannot be quantised (NF4 of a float64 weight, a weight on the meta
            device or empty; the layer named): nothing is changed. If bitsandbytes itself fails on a layer
            (out of memory, say), the layers before it stay quantised (``_replace``).
        TargetModuleError: no ``nn.Linear`` is left to quantise, or a ``skip`` entry matches no module
            (nearest names listed); nothing is changed.
    """
    check_kind(kind)
    skip = _check_arguments(model, skip, compute_dtype)
    if next(adapter_modules(model), None) is not None:
        raise QuantizedBaseError(f"{type(model).__name__} already has LoRA adapters; quantise the base model "
                                 "before inject / load_adapter")
    names = [n for n, _ in model.named_modules() if n]
    missing = [s for s in skip if not any(_skipped(n, [s]) for n in names)]
    if missing:
        near = nearest_names(missing[0], names)
        raise TargetModuleError(f"skip entry {missing[0]!r} matches no module"
                                + (f"; nearest module names: {', '.join(near)}" if near else ""))
    head = _output_head(model)
    todo = [n for n, m in model.named_modules()
            if type(m) is nn.Linear and m is not head and not _skipped(n, skip)]
    if not todo:
        already = quantization(model)
        raise TargetModuleError(f"{type(model).__name__} has no nn.Linear to quantise (output head and skip={skip} "
                                "kept full precision)" + (f"; it is already quantised ({already})" if already else ""))
    _check_weights(model, todo, kind)
    _replace(model, _bnb(), todo, kind, compute_dtype, each)
    return model


def _replace(model: nn.Module, bnb, todo: list[str], kind: str, compute_dtype, each) -> None:
    """Quantise the layers ``todo`` one by one (each float weight freed as its layer is replaced: one layer's
    extra memory at a time, so none is kept to undo with).

    Raises:
        QuantizedBaseError: bitsandbytes failed on a layer (named, with how many before it are quantised);
            ``_check_weights`` refuses what is known to fail before any layer changes.
    """
    for i, name in enumerate(todo):
        lin = model.get_submodule(name)
        try:
            layer = _quantized(bnb, lin, kind, compute_dtype)
        except Exception as e:  # noqa: BLE001 - bitsandbytes' own errors, named
            raise QuantizedBaseError(f"cannot quantise {name!r} ({lin.in_features} -> {lin.out_features}) to {kind}: "
                                     f"{type(e).__name__}: {e}; the {i} layer(s) before it are quantised") from e
        set_submodule(model, name, layer)
        if each is not None:
            each(name, layer)


def _kind(module: nn.Module) -> str | None:
    types = _bnb_types()
    if not types or not isinstance(module, types):
        return None
    return module.weight.quant_type if isinstance(module, types[0]) else "int8"


def quantization(model: nn.Module) -> str | None:
    """``"nf4"`` (or ``"fp4"``) / ``"int8"`` if ``model`` holds bitsandbytes layers of that kind (the
    first found: base layers of LoRA layers included), else None."""
    for _, m in model.named_modules():
        kind = _kind(m)
        if kind is not None:
            return kind
    return None


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """dequant(W) of a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, float32 (out, in): the weight its
    forward multiplies by (NF4 code × block absmax; int8 × row absmax / 127).

    Raises:
        TypeError: ``layer`` is not one of them.
    """
    kind = _kind(layer)
    if kind is None:
        raise TypeError(f"not a bitsandbytes quantised linear layer: {type(layer).__name__}")
    F = sys.modules["bitsandbytes.functional"]
    w = layer.weight
    if kind == "int8":
        scb = w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB
        return F.int8_vectorwise_dequant(w.data, scb).float()
    return F.dequantize_4bit(w.data, w.quant_state).float()


def _full_precision(layer: nn.Module, dtype: torch.dtype) -> nn.Linear:
    with torch.device("meta"):
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    lin.weight = nn.Parameter(dequantized_weight(layer).to(dtype), requires_grad=False)
    if layer.bias is not None:
        lin.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=layer.bias.requires_grad)
    return lin.train(layer.training)


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every bitsandbytes quantised linear layer of ``model`` (also the base layers inside LoRA
    layers) by an ``nn.Linear`` holding ``dequant(W)`` in ``dtype`` (frozen; biases keep their
    ``requires_grad``), in place. ``dtype`` None: the model's own, that of its first floating-point
    parameter outside the quantised layers (embeddings, norms: float16 in a float16 model), float32 if
    it has none. Outputs stay those of the quantised model up to float rounding (the
    quantised forward multiplies by the same dequant(W)); adapters are untouched and can then be merged:
    ``W' = dequant(W) + s·B·A`` (``lorakit.merge`` / ``unload``). A no-op on a model without quantised
    layers. Returns ``model``.

    Raises:
        ConfigError: ``dtype`` is not a floating ``torch.dtype``; nothing is changed.
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ConfigError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    layers = [(n, m) for n, m in model.named_modules() if _kind(m) is not None]
    if dtype is None:
        inside = {id(p) for _, m in layers for p in m.parameters()}  # adapters (float32 always) neither
        dtype = next((p.dtype for n, p in model.named_parameters() if p.is_floating_point() and id(p) not in inside
                      and ".lora_" not in n and ".adapters." not in n), torch.float32)
    for name, layer in layers:
        set_submodule(model, name, _full_precision(layer, dtype))
    if layers:
        _forget_quantization(model)
    return model


def _forget_quantization(model: nn.Module) -> None:
    """Drop what transformers recorded of a ``BitsAndBytesConfig`` load (``config.quantization_config``,
    ``hf_quantizer``, ``is_loaded_in_4bit``), as its own ``dequantize`` does: ``save_pretrained`` of the
    dequantised model would otherwise write a config that quantises the float weights again on load."""
    for m in model.modules():
        quantizer = getattr(m, "hf_quantizer", None)
        if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
            quantizer.remove_quantization_config(m)
        elif hasattr(getattr(m, "config", None), "quantization_config"):
            del m.config.quantization_config
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
            if getattr(m, flag, False) is True:
                setattr(m, flag, False)
