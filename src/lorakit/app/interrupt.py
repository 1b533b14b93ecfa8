"""SIGINT / SIGTERM during training: checkpoint after the current step, then stop.

The first signal only sets a flag, which the training loop reads after each step (all ranks agree
on it through an all-reduce); the loop then writes a checkpoint and raises ``TrainingInterrupted``.
A second SIGINT raises ``KeyboardInterrupt`` at once: the checkpoint being written, if any, is a
temporary folder that never replaces a complete one. Later SIGTERMs are ignored, since torchrun
sends one to workers that already got the terminal's SIGINT.
"""

from __future__ import annotations

import signal
import sys
import threading


class Signals:
    """SIGINT / SIGTERM during training: the first asks the loop to checkpoint and stop after the
    current step; a second SIGINT raises ``KeyboardInterrupt`` at once; a SIGTERM after the first
    signal is ignored (SIGKILL still stops the process)."""

    def __init__(self, on: bool) -> None:
        self.on = on and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # torchrun answers Ctrl-C by sending SIGTERM to workers that got the SIGINT too: let them finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"\nlorakit: {signal.Signals(signum).name} received: checkpointing after this step "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "Signals":
        if self.on:
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
