"""``lorakit`` console script: ``train``, ``eval``, ``generate``, ``merge``, ``info``, ``serve``, ``convert``,
``export``.

``lorakit train`` with no arguments fine-tunes SmolLM2-135M-Instruct on CMUdict
grapheme-to-phoneme with LoRA on CPU, evaluates before and after, and saves everything to
a printed output folder. User errors print one line ``lorakit: error: ...`` and exit 1
(2 for command-line usage), without a traceback.

Run as ``lorakit``, ``python -m lorakit.app.cli`` or ``python -m lorakit.cli``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from lorakit.errors import LoRAError, TrainingInterrupted, UsageError

from .cmd_train import cmd_train
from .distributed import peer_lost, resume_command
from .cmd_formats import GGUF_TYPES, add_format_parsers, cmd_convert, cmd_export
from .commands import cmd_eval, cmd_generate, cmd_info, cmd_merge
from .options import add_train_flags


def cmd_serve(args: argparse.Namespace) -> int:
    """``lorakit serve`` (imported on use: it needs the ``serve`` extra's packages)."""
    from .serve.command import cmd_serve as serve

    return serve(args)

# Never reach a model hub: only local folders and the local cache are used.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "merge": cmd_merge, "info": cmd_info,
            "serve": cmd_serve, "convert": cmd_convert, "export": cmd_export}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def parse_args(self, args=None, namespace=None):
        ns, extra = self.parse_known_args(args, namespace)
        if extra:  # argparse says so from the top parser: the hint names the command's own help
            prog = f"{self.prog} {ns.command}" if getattr(ns, "command", None) else self.prog
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see '{prog} --help')")
        return ns


def build_parser() -> argparse.ArgumentParser:
    """The ``lorakit`` parser; ``train``'s flags come from ``options.TrainOptions``."""
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
    add_train_flags(t)

    e = sub.add_parser("eval", help="evaluate an adapter", description="Built-in task test metrics of an adapter "
                       "(the after-training numbers), or loss/perplexity on a JSONL file.")
    e.add_argument("--adapter", required=True, help="adapter folder")
    e.add_argument("--data", help="JSONL: report loss and perplexity on it")
    e.add_argument("--max-length", type=int, help="tokens per example (default: the training value)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--num-beams", type=int, help="built-in task: beam search width (1: greedy; default: what "
                   "training evaluated with, recorded in the adapter)")

    gen = sub.add_parser("generate", help="greedy completion of a prompt",
                         description="Greedy completion; the last line printed is the completion.")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", help="adapter folder (knows its base model and prompt format)")
    src.add_argument("--model", help="model folder (e.g. from 'lorakit merge'), cached id or .gguf")
    gen.add_argument("--prompt", required=True, help="the prompt, e.g. a bare word for the built-in task")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--raw", action="store_true", help="use the prompt text as is (no prompt format)")

    m = sub.add_parser("merge", help="merge an adapter into its base and save a transformers checkpoint or a GGUF")
    m.add_argument("--adapter", required=True, help="adapter folder")
    m.add_argument("--output", required=True,
                   help="new folder for the merged checkpoint (a .gguf file with --format gguf)")
    m.add_argument("--format", default="transformers", choices=("transformers", "gguf"),
                   help="transformers folder (default) or one GGUF file for llama.cpp")
    m.add_argument("--outtype", choices=GGUF_TYPES, help="with --format gguf: tensor type (default f16)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    i = sub.add_parser("info", help="describe an adapter folder")
    i.add_argument("adapter", help="adapter folder")

    s = sub.add_parser("serve", help="serve the base model and many adapters over an OpenAI-compatible HTTP API",
                       description="OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models) "
                       "over one base model and many LoRA adapters, batched across adapters.")
    from .serve.command import add_serve_flags

    add_serve_flags(s)
    add_format_parsers(sub)
    return p


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
        os.execve(sys.executable, [sys.executable, "-m", "lorakit.app.cli", *sys.argv[1:]], env)
    except OSError:
        pass  # keep going with the default policy


def _say(message: str) -> None:
    """A final message on stderr; under torchrun only rank 0's (the ranks fail alike; the launcher
    names another rank that fails alone)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lorakit`` console script. Returns the exit status.

    Exit status: 0 success, 1 user error (one line on stderr), 2 command-line usage error,
    128 + the signal number when SIGINT (130) or SIGTERM (143) stops training (a checkpoint is written
    first; the resume command is printed), 130 for any other Ctrl-C.
    """
    if argv is None and "OMP_WAIT_POLICY" not in os.environ:
        _reexec_passive()
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(argv) if argv is not None else sys.argv[1:]  # what --nproc passes to torchrun
        return COMMANDS[args.command](args)
    except UsageError as e:
        _say(f"lorakit: error: {e}")
        return 2
    except TrainingInterrupted as e:
        _say(f"lorakit: interrupted: {e}\nresume with: {resume_command(e.checkpoint.parent)}")
        return 128 + e.signal
    except (LoRAError, OSError, UnicodeDecodeError) as e:  # user errors: a missing/unreadable file, bad bytes
        msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename!r}"
        _say(f"lorakit: error: {msg}".splitlines()[0])
        return 1
    except torch.OutOfMemoryError as e:  # a GPU's: one line, and what to try
        _say(f"lorakit: error: out of GPU memory ({str(e).splitlines()[0][:200]}); try a smaller --batch-size, "
             "--gradient-checkpointing or --quantize nf4")
        return 1
    except RuntimeError as e:
        if not peer_lost(e):
            raise
        _say(f"lorakit: error: lost contact with another process of this job ({str(e).splitlines()[0][:200]}); "
             "its own message or the launcher says why")
        return 1
    except KeyboardInterrupt:
        _say("\nlorakit: interrupted; no adapter was written (the last complete checkpoint, if any, is intact)")
        return 130
    except ModuleNotFoundError as e:  # the core alone is installed: the CLI needs the app's packages
        extra = "serve" if e.name in ("fastapi", "uvicorn", "prometheus_client", "starlette") else "app"
        print(f"lorakit: error: the CLI needs the package {e.name!r}; pip install 'lorakit[{extra}]'", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
