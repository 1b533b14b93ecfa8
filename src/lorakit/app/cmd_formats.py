"""``lorakit convert`` and ``lorakit export``: adapters in other tools' formats, in and out."""

from __future__ import annotations

import argparse

from lorakit.errors import UsageError

from .console import quiet_transformers

CONVERT_FROM = ("mlx", "torchtune", "gguf")
GGUF_TYPES = ("f32", "f16", "q8_0")


def add_format_parsers(sub) -> None:
    """The ``convert`` and ``export`` sub-commands; ``merge``'s ``--format`` / ``--outtype`` flags are in cli.py."""
    c = sub.add_parser("convert", help="convert an mlx-lm, torchtune or GGUF LoRA adapter to PEFT format",
                       description="Rewrite an adapter written by mlx-lm (folder with adapters.safetensors), torchtune "
                       "(adapter_0.pt / adapter_model.pt / .safetensors) or llama.cpp (a GGUF LoRA file) as a PEFT "
                       "adapter folder with the same outputs.")
    c.add_argument("source", help="the adapter file or folder")
    c.add_argument("--from", dest="source_format", required=True, choices=CONVERT_FROM, help="the source's format")
    c.add_argument("--output", required=True, help="new PEFT adapter folder")
    c.add_argument("--base-model", help="the base model (folder, .gguf, cached id or 'default'); needed for "
                   "torchtune and gguf (head counts for the q/k row order)")
    c.add_argument("--lora-alpha", type=float, help="torchtune: the recipe's lora_alpha (default: the "
                   "adapter_config.json beside the checkpoint)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    e = sub.add_parser("export", help="export an adapter for llama.cpp (GGUF LoRA)",
                       description="Write a PEFT/lorakit adapter as a llama.cpp LoRA adapter (GGUF, general.type "
                       "= adapter); run it with llama-cli -m BASE.gguf --lora FILE.")
    e.add_argument("--adapter", required=True, help="adapter folder")
    e.add_argument("--format", default="gguf", choices=("gguf",), help="output format (gguf)")
    e.add_argument("--output", required=True, help="the .gguf file to write")
    e.add_argument("--outtype", default="f32", choices=GGUF_TYPES, help="tensor type of lora_a/lora_b (default f32)")
    e.add_argument("--base-model", help="base model for the head counts (default: the adapter's own)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def cmd_convert(args: argparse.Namespace) -> int:
    """``lorakit convert --from {mlx,torchtune,gguf} SOURCE --output DIR``."""
    if args.source_format in ("torchtune", "gguf") and not args.base_model:
        raise UsageError(f"--from {args.source_format} needs --base-model (its head counts give the q/k row order)")
    if args.lora_alpha is not None and args.source_format != "torchtune":
        raise UsageError("--lora-alpha is only for --from torchtune (mlx and gguf files store their scale)")
    if args.source_format == "mlx":
        from .convert import convert_mlx

        out = convert_mlx(args.source, args.output, args.base_model, args.overwrite)
    elif args.source_format == "torchtune":
        from .convert import convert_torchtune

        out = convert_torchtune(args.source, args.output, args.base_model, args.lora_alpha, args.overwrite)
    else:
        from .gguf_adapter import import_gguf_adapter

        out = import_gguf_adapter(args.source, args.output, args.base_model, args.overwrite)
    print(f"PEFT adapter written to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``lorakit export --adapter DIR --format gguf --output FILE``."""
    from .gguf_adapter import export_gguf_adapter

    quiet_transformers()
    out = export_gguf_adapter(args.adapter, args.output, args.outtype, args.base_model, args.overwrite)
    print(f"GGUF LoRA adapter written to {out}")
    return 0
