"""``lorakit train --compile``'s default, "auto": compile the transformer blocks only when the run is long
enough to repay the compilation, judged from the first steps run eagerly.

Compiled steps take 10-16% less time (1.11x in RESULTS.md train_throughput.py runs 6-7, 1.18-1.19x in
run 12, SmolLM2 on 2 CPU cores); COMPILE_GAIN takes the low end. The compilation's cost is the one this
machine measured for the same kind of block (``compile_times.json`` in lorakit's cache folder: the first
compiled step's extra time), else COMPILE_SECONDS (75 s, SmolLM2's cold compile there). The default job
(300 steps of about 1.7 s) stays eager. The decision is taken after step PROBE_STEPS of the run (counted
from its start, so a resumed run decides at the same step) and kept in the checkpoint's state: a run
resumed after it compiles from the same step as the uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
from contextlib import ExitStack

import torch

from lorakit.durable import write_json

from .blocks import blocks, compile_blocks
from .models import cache_root

COMPILE_GAIN = 0.10
COMPILE_SECONDS = 75.0
PROBE_STEPS = 4  # eager steps timed before "auto" decides (step 1, with its warm-up, is not counted)
OFF = 0  # ``CompileSwitch.decision`` once "auto" decided against compiling; else the first compiled step


def _s(seconds: float) -> str:
    return f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.1f}"


def compile_pays(step_seconds: float, steps_left: int, cost: float, measured: bool) -> tuple[bool, str]:
    """Whether compiling the blocks now repays itself over the run's remaining steps, and why:
    ``steps_left × step_seconds × COMPILE_GAIN`` seconds saved against ``cost`` seconds to compile."""
    saved = steps_left * step_seconds * COMPILE_GAIN
    on = saved > cost
    why = (f"{steps_left} steps left x {step_seconds:.2f} s x {COMPILE_GAIN:.0%} = about {_s(saved)} s saved "
           f"{'>' if on else '<='} about {_s(cost)} s to compile ({'measured here before' if measured else 'assumed'})")
    return on, why


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on CPU (``$CXX``, else g++, c++ or clang++ on the PATH), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _times_file():
    return cache_root() / "compile_times.json"


def block_key(model) -> str:
    """What a compilation's cost depends on: the block's class and its frozen parameters' shapes (not the
    adapters': a rank changes little), torch's version, and the device unless it is the CPU."""
    bs = blocks(model)
    frozen = [p for p in bs[0].parameters() if not p.requires_grad] if bs else []
    where = "" if not frozen or frozen[0].device.type == "cpu" else f"|{frozen[0].device.type}"
    return f"{type(bs[0]).__qualname__ if bs else None}|{[tuple(p.shape) for p in frozen]}|{torch.__version__}{where}"


def _read_times() -> dict:
    try:
        doc = json.loads(_times_file().read_text())
    except (OSError, ValueError, RecursionError):
        return {}  # no record yet, or an unreadable one: rewritten by the next measurement
    return doc if isinstance(doc, dict) else {}


def recorded(key: str) -> float | None:
    """The compile time measured before for ``key``, or None (none, or not a positive finite number)."""
    value = _read_times().get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return float(value) if ok else None


def record(key: str, seconds: float) -> None:
    """Keep ``seconds`` as ``key``'s compile time (at least 1 s); a cache only, so failures are ignored."""
    path = _times_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {**_read_times(), key: round(max(seconds, 1.0), 1)}, sort_keys=True)
    except (OSError, ValueError):
        pass


class CompileSwitch:
    """``compile_blocks`` for one training run: ``setting`` True (from the first step), False, or "auto"
    (eager until step ``PROBE_STEPS``, then on if ``compile_pays``; the decision goes to ``say``).
    ``allowed`` False keeps "auto" eager (a quantised base, several processes: compilation not measured
    there). ``decision`` (None: not yet, ``OFF``, or the first compiled step) is the run's, kept in its
    checkpoints; a resumed run passes it back. ``compiled``: the blocks run compiled now (validation then
    forces eager). ``compiled_from``: the first step that ran compiled (None: none did). The first compiled
    step's extra time is recorded as this block's compile cost. ``steps``: the run's step count; the log
    says a resumed run's decision again, and that an "auto" run of ``PROBE_STEPS`` steps or fewer stays eager."""

    def __init__(self, model, setting: bool | str, say, allowed: bool = True, decision: int | None = None,
                 steps: int | None = None) -> None:
        self.model, self.setting, self.say, self.allowed, self.decision = model, setting, say, allowed, decision
        self.steps = steps  # the run's steps, counted from its start (None: not known)
        self.compiled, self._times, self._stack = False, {}, ExitStack()
        self.compiled_from: int | None = decision if decision not in (None, OFF) else None  # a resumed "auto" run's
        self._eager: float | None = None  # the eager step time, until the first compiled step is measured

    def __enter__(self) -> "CompileSwitch":
        if self.setting is True or (self.setting == "auto" and self.decision not in (None, OFF)):
            self._on()
        if self.setting is True:  # forced on: the log says so, as it says the auto decision
            self.say("torch.compile: on (--compile): the transformer blocks, from the first step")
        elif self.setting == "auto" and self.decision is not None:  # resumed: the run's decision, said again
            self.say(f"torch.compile: on (auto, decided after step {self.decision - 1} of this run)"
                     if self.decision != OFF else
                     f"torch.compile: off (auto, decided after step {PROBE_STEPS} of this run); --compile forces it")
        elif self.setting == "auto" and self.steps is not None and self.steps <= PROBE_STEPS:
            self.say(f"torch.compile: off (auto): {self.steps} steps end before the decision after step "
                     f"{PROBE_STEPS}; --compile forces it")
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _on(self) -> None:
        self._stack.enter_context(compile_blocks(self.model, True))
        self.compiled = True

    def after_step(self, step: int, seconds: float, steps_left: int) -> None:
        """Record step ``step``'s ``seconds`` (1-based, counted from the run's start); under "auto",
        decide after step ``PROBE_STEPS``."""
        if self.compiled and self.compiled_from is None:
            self.compiled_from = step
        if self._eager is not None:  # the first compiled step after "auto" switched: it paid the compilation
            record(block_key(self.model), seconds - self._eager)
            self._eager = None
        if step > PROBE_STEPS or self.setting is False:
            return
        self._times[step] = seconds
        if step < PROBE_STEPS:
            return
        timed = [t for s, t in self._times.items() if s > 1] or list(self._times.values())
        if self.setting is True:  # forced on: step 1 compiled, the others ran compiled
            if 1 in self._times:  # a run from its start: steps 1-4 all timed here
                record(block_key(self.model), self._times[1] - statistics.median(timed))
        elif self.decision is None and steps_left > 0:
            self._decide(statistics.median(timed), step, steps_left)

    def _decide(self, step_seconds: float, step: int, steps_left: int) -> None:
        if not self.allowed:
            on, why = False, "not measured with a quantised base or several processes"
        elif cxx_compiler() is None:
            on, why = False, "no C++ compiler found (inductor needs one on CPU; set CXX)"
        else:
            known = recorded(block_key(self.model))
            on, why = compile_pays(step_seconds, steps_left, COMPILE_SECONDS if known is None else known,
                                   known is not None)
        self.say(f"torch.compile: {'on' if on else 'off'} (auto): {why}" + ("" if on else "; --compile forces it"))
        self.decision = step + 1 if on else OFF
        if on:
            self._on()
            self._eager = step_seconds
