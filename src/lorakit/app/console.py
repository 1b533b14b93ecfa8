"""What the commands print: progress notes on stderr, percentages, and a quiet transformers."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    """A progress note on stderr (stdout keeps the results)."""
    print(msg, file=sys.stderr, flush=True)


def pct(x: float) -> str:
    """``0.0123`` -> ``"1.2%"``."""
    return f"{100 * x:.1f}%"


def quiet_transformers() -> None:
    """No transformers warnings below errors, and no download/loading progress bars."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
