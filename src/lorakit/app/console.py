"""What the commands print: progress notes on stderr, percentages, and a quiet transformers."""

from __future__ import annotations

import logging
import sys


def log(msg: str) -> None:
    """A progress note on stderr (stdout keeps the results)."""
    print(msg, file=sys.stderr, flush=True)


def pct(x: float) -> str:
    """``0.0123`` -> ``"1.2%"``."""
    return f"{100 * x:.1f}%"


def quiet_bitsandbytes() -> None:
    """No bitsandbytes warnings below errors (it is imported by transformers too, when installed): on
    import it notes that an optional hub kernel package is absent (lorakit never downloads; its own CPU
    kernels run), and int8 in eval mode notes on every forward that LLM.int8() rounds activations
    through float16."""
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_transformers() -> None:
    """No transformers (or bitsandbytes) warnings below errors, and no download/loading progress bars."""
    quiet_bitsandbytes()
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
