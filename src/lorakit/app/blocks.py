"""A model's transformer blocks, and what the training loop does per block: ``torch.compile`` and
activation (gradient) checkpointing. (Sharding them across processes: ``distributed.shard_blocks``.)"""

from __future__ import annotations

import json
import statistics
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from lorakit.durable import write_json

from .allocator import trim


def blocks(model) -> list[torch.nn.Module]:
    """The model's transformer blocks: the longest ``nn.ModuleList`` whose entries share one type."""
    best: list[torch.nn.Module] = []
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > len(best) and len({type(b) for b in m}) == 1:
            best = list(m)
    return best


@contextmanager
def compile_blocks(model, on: bool = True):
    """``torch.compile`` each transformer block (``blocks``) inside the context; eager again after.

    One compiled graph serves every block (same code, parameters are graph inputs) and dynamic
    shapes cover the packed rows' changing length. The compiled graph fuses the blocks' elementwise
    work (norms, rotary embedding, activation, residual adds and their backward), which on CPU
    costs per op rather than per FLOP. Outputs equal eager within float rounding.
    """
    compiled = blocks(model) if on else []
    for b in compiled:
        b.compile(dynamic=True)
    try:
        yield
    finally:
        for b in compiled:
            b._compiled_call_impl = None  # what nn.Module.compile set: back to eager


# ``--compile``'s default, "auto", compiles the blocks only when the run is long enough to repay the
# compilation, judged after the first steps run eagerly. Compiled steps take about 10% less time (1.11x,
# RESULTS.md train_throughput.py runs 6-7, SmolLM2 on 2 CPU cores). The compilation's cost is the one this
# machine measured for the same kind of block (``compile_times.json`` in lorakit's cache folder), else
# COMPILE_SECONDS (75 s, SmolLM2's cold compile there). The default job (300 steps of about 1.7 s) stays eager.
COMPILE_GAIN = 0.10
COMPILE_SECONDS = 75.0
PROBE_STEPS = 4  # eager steps timed before "auto" decides (the first one, with its warm-up, is not counted)


def compile_pays(step_seconds: float, steps_left: int, cost: float, measured: bool) -> tuple[bool, str]:
    """Whether compiling the blocks now repays itself over the run's remaining steps, and why:
    ``steps_left × step_seconds × COMPILE_GAIN`` seconds saved against ``cost`` seconds to compile."""
    saved = steps_left * step_seconds * COMPILE_GAIN
    on = saved > cost
    why = (f"{steps_left} steps left x {step_seconds:.2f} s x {COMPILE_GAIN:.0%} = about {saved:.0f} s saved "
           f"{'>' if on else '<='} about {cost:.0f} s to compile ({'measured here before' if measured else 'assumed'})")
    return on, why


def _times_file() -> Path:
    from .models import cache_root

    return cache_root() / "compile_times.json"


def _block_key(model) -> str:
    """What a compilation depends on: the block's class and parameter shapes, and torch's version."""
    bs = blocks(model)
    shapes = [tuple(p.shape) for p in bs[0].parameters()] if bs else []
    return f"{type(bs[0]).__qualname__ if bs else None}|{shapes}|{torch.__version__}"


def _recorded(key: str) -> float | None:
    try:
        value = json.loads(_times_file().read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None  # no record yet, or an unreadable one: the assumed cost
    return float(value) if isinstance(value, (int, float)) else None


def _record(key: str, seconds: float) -> None:
    path = _times_file()
    try:
        doc = json.loads(path.read_text()) if path.is_file() else {}
        doc = doc if isinstance(doc, dict) else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {**doc, key: round(seconds, 1)}, sort_keys=True)
    except (OSError, ValueError):
        pass  # a cache only: the next run assumes the cost again


class CompileSwitch:
    """``compile_blocks`` for one training run: ``setting`` True (from the first step), False, or "auto"
    (eager for ``PROBE_STEPS`` steps, then on if ``compile_pays``; the decision is passed to ``say``).
    ``allowed`` False keeps "auto" eager (a quantised base, several processes: compilation not measured there).
    ``compiled`` says whether the blocks run compiled now (validation then forces eager). After "auto"
    turns compilation on, the first compiled step's extra time is recorded as this block's compile cost."""

    def __init__(self, model, setting: bool | str, say, allowed: bool = True) -> None:
        self.model, self.setting, self.say, self.allowed = model, setting, say, allowed
        self.compiled, self._times, self._stack = False, [], ExitStack()
        self._eager: float | None = None  # the probe's step time, until the first compiled step is measured

    def __enter__(self) -> "CompileSwitch":
        if self.setting is True:
            self._on()
        elif self.setting == "auto" and not self.allowed:
            self.say("torch.compile: off (auto; not measured with a quantised base or several processes; "
                     "--compile forces it)")
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _on(self) -> None:
        self._stack.enter_context(compile_blocks(self.model, True))
        self.compiled = True

    def after_step(self, seconds: float, steps_left: int) -> None:
        """Record one step's ``seconds``; under "auto", decide once ``PROBE_STEPS`` eager steps have run."""
        if self._eager is not None:  # the first compiled step: it paid the compilation
            _record(_block_key(self.model), max(seconds - self._eager, 0.0))
            self._eager = None
        if self.setting != "auto" or not self.allowed or len(self._times) >= PROBE_STEPS:
            return
        self._times.append(seconds)
        if len(self._times) == PROBE_STEPS and steps_left > 0:
            step = statistics.median(self._times[1:])
            known = _recorded(_block_key(self.model))
            on, why = compile_pays(step, steps_left, COMPILE_SECONDS if known is None else known, known is not None)
            self.say(f"torch.compile: {'on' if on else 'off'} (auto): {why}" + ("" if on else "; --compile forces it"))
            if on:
                self._on()
                self._eager = step


def set_checkpointing(model, on: bool) -> None:
    """Switch activation (gradient) checkpointing of a transformers model on or off.

    Non-reentrant checkpointing, so LoRA layers inside checkpointed blocks get gradients
    even though the (frozen) embedding output does not require grad.
    """
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


@contextmanager
def checkpointed(model, on: bool):
    """Activation checkpointing on inside the block when ``on`` (off again after, even on an error), and
    the allocator's free memory handed back to the OS after each transformer block's forward
    (``allocator.trim``; the freed memory of the previous step's backward goes back at the next step's
    first blocks): memory over speed, as checkpointing is.

    Measured on SmolLM2-135M, NF4 base, 10 steps of 8 G2P rows with ``allocator.return_large_blocks``:
    peak RSS 942 MiB without the trims, 843-849 MiB with them; the trims took 3% of the time (1.6 ms each)."""
    if not on:
        yield
        return
    set_checkpointing(model, True)
    hooks = [b.register_forward_hook(_trim_after) for b in blocks(model)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        set_checkpointing(model, False)


@torch.compiler.disable  # under compile_blocks: run eagerly, no graph break traced into ctypes
def _trim_after(module, args, output) -> None:
    trim()  # returns None: the block's output stays as it is
