"""The one training loop of the app, shared by the causal-LM job and classification.

A job describes its data and loss as a ``Task`` (``lm_loss.lm_task``, ``classify``); ``train``
owns everything else: torch's fused AdamW, a transformers learning-rate schedule (linear
warmup, then cosine or linear decay), gradient accumulation, gradient clipping, bfloat16
autocast, periodic validation, ``torch.compile`` of the transformer blocks, throughput, logging,
the progress bar, non-finite steps, and checkpoints with bitwise resume (``checkpoint``), written
every N steps and when SIGINT / SIGTERM stop the run.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from lorakit import active_adapters, quantization
from lorakit.errors import CheckpointError, ConfigError, DataError, NonFiniteError, TrainingInterrupted

from . import checkpoint, devices, distributed, fsdp_state
from .autocompile import CompileSwitch
from .blocks import blocks, checkpointed, compile_blocks, set_checkpointing  # noqa: F401  (the loop's API)
from .checkpoint import Checkpointing
from .console import log
from .distributed import Dist
from .interrupt import Signals


@dataclass
class TrainConfig:
    """Optimisation settings (the CLI's defaults for ``lorakit train``).

    Attributes:
        steps: optimizer steps; if None, derived from ``epochs``.
        epochs: passes over the training examples (float allowed) when ``steps`` is None.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step (loss normalised by all their loss units).
        lr: peak learning rate of AdamW.
        warmup: linear warmup steps (from 0 at step 0 up to lr), then the decay.
        schedule: ``"cosine"`` (to 0, ``get_cosine_schedule_with_warmup``) or ``"linear"`` (to 0,
            ``get_linear_schedule_with_warmup``).
        max_grad_norm: global L2 norm the gradients are clipped to; None = no clipping.
        weight_decay: AdamW weight decay on the trainable parameters.
        seed: seeds batch order.
        bf16: bfloat16 autocast for the forward pass (weights stay float32), on the model's device.
        eval_every: validation loss every this many steps (and at the last step); 0 = never.
        compile: ``torch.compile`` each transformer block for the training steps (``compile_blocks``):
            fewer, fused elementwise kernels; the first step pays the compilation (15-75 s for
            SmolLM2 on 2 CPU cores; once more when a batch first packs into several rows), so it
            pays on long runs. ``"auto"`` (the CLI's default): decided after the first steps from
            their time and the steps left (``autocompile.CompileSwitch``), and printed.
        on_nonfinite: a step whose loss or gradient norm is NaN or infinite: ``"error"`` stops with
            ``NonFiniteError`` (naming the step and the first parameter affected), ``"skip"`` drops
            that step's update and logs it as ``skipped``.
    """

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-3
    warmup: int = 10
    schedule: str = "cosine"
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    bf16: bool = False
    eval_every: int = 25
    compile: bool | str = False
    on_nonfinite: str = "error"

    def total_steps(self, n_examples: int, world: int = 1) -> int:
        """Number of optimizer steps for ``n_examples`` training examples (on ``world`` processes of
        ``batch_size`` examples each)."""
        if self.steps is not None:
            return self.steps
        per_epoch = math.ceil(n_examples / (self.batch_size * world) / self.grad_accum)
        return max(1, math.ceil((self.epochs or 1.0) * per_epoch))


@dataclass
class Task:
    """What a training job gives the loop: its batches and its loss.

    Attributes:
        n_examples: training examples (with ``TrainConfig.epochs``, gives the number of steps).
        batches: ``batches(start, size)``: endless micro-batches of ``size`` examples (lists, in training
            order) from the ``start``-th on (0-based, counted across epochs of ``ceil(n_examples / size)``
            batches), so a resumed run continues the same order; ``size`` is the batch size times
            the number of processes, each of which takes its slice (``distributed.share``).
        collate: ``collate(examples)``: a list of examples as the batch the functions below take.
        loss: ``loss(model, batch)``: the loss summed over the batch's units (label tokens,
            examples), a scalar tensor.
        units: ``units(batch)``: how many units ``loss`` sums over; a step's loss is the sum over
            its micro-batches divided by their total units, i.e. the mean per unit.
        tokens: ``tokens(batch)``: real (non-padding) tokens, for ``tokens_per_s``.
        validate: ``validate(model)``: the validation loss, or None for no validation.
    """

    n_examples: int
    batches: Callable[[int, int], Iterator[list]]
    collate: Callable[[list], Any]
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]
    units: Callable[[Any], int]
    tokens: Callable[[Any], int]
    validate: Callable[[torch.nn.Module], float] | None = None


def schedule(opt: torch.optim.Optimizer, kind: str, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' warmup schedule ``kind`` (``"cosine"`` or ``"linear"``) over ``total`` steps.

    The lr multiplier at step ``s`` is ``s / warmup`` during warmup, then
    ``0.5 * (1 + cos(pi * p))`` (cosine) or ``1 - p`` (linear) with ``p = (s - warmup) / (total - warmup)``.

    Raises:
        ConfigError: an unknown ``kind``.
    """
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup}.get(kind)
    if make is None:
        raise ConfigError(f"unknown schedule {kind!r}; expected 'cosine' or 'linear'")
    return make(opt, num_warmup_steps=warmup, num_training_steps=total)


def adamw(params: list[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel over all tensors, transformers Trainer's default since torch 2.8)
    where every parameter is a float tensor on CPU or CUDA, else the for-loop implementation.

    A LoRA step updates a few hundred small tensors: the loop's ~10 ops per tensor cost more than
    the arithmetic.
    """
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def _first_nonfinite(named: list[tuple[str, torch.Tensor]], loss_finite: bool) -> str:
    """The first parameter whose value, else whose gradient, is not finite (``name (value|gradient)``)."""
    for name, p in named:  # full(): every rank takes the same path (FSDP gathers each shard)
        if not torch.isfinite(distributed.full(p)).all():
            return f"{name} (value)"
    for name, p in named:
        if p.grad is not None and not torch.isfinite(distributed.full(p.grad)).all():
            return f"{name} (gradient)"
    return "none: every value and gradient is finite, their norm overflows" if loss_finite else "none (the loss alone)"


def _clip(params: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale the parameters' gradients to the global L2 norm ``max_norm`` (``norm``: their current one)."""
    if any(hasattr(p, "full_tensor") for p in params):  # FSDP shards: one scalar for every shard
        coef = min(1.0, max_norm / (float(norm) + 1e-6))
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    else:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)


class _Run:
    """One training run's moving parts: the model, task and settings, the optimizer and schedule,
    checkpointing, and (under torchrun) this process's rank and its DDP replica."""

    def __init__(self, model, task: Task, cfg: TrainConfig, ck: Checkpointing | None, d: Dist | None) -> None:
        self.model, self.task, self.cfg, self.ck, self.d = model, task, cfg, ck, d
        self.fsdp = d is not None and d.fsdp
        sharded = self.fsdp and bool(distributed.sharded_modules(model))  # fsdp_load: filled from rank 0 already
        if d is not None and not (ck is not None and ck.resume) and not sharded:
            distributed.broadcast_trainable(model)  # one initialisation for all ranks (a resume loads one)
        if self.fsdp:  # before the optimizer: sharding replaces the parameters
            distributed.shard_blocks(blocks(model))
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.world = d.world if d is not None else 1
        self.total = cfg.total_steps(task.n_examples, self.world)
        self.opt = adamw([p for _, p in self.named], cfg.lr, cfg.weight_decay)
        self.sched = schedule(self.opt, cfg.schedule, cfg.warmup, self.total)
        self.replica = distributed.Replica(model, task.loss, d) if d is not None and not self.fsdp else None
        self.main = d is None or d.main
        self.validates = self.main or self.fsdp  # a sharded model validates on every rank together
        self.autocast = devices.model_device(model).type  # bf16 autocast where the model computes

    def config(self) -> dict:
        return checkpoint.run_config(self.model, self.cfg, self.ck.config, self.world)

    def start(self) -> checkpoint.TrainState:
        """The state to start from: a checkpoint's (``ck.resume``: adapters, optimizer and scheduler
        restored) or a fresh one with the validation loss of the untrained adapter (the curve's start)."""
        ck = self.ck
        if ck is not None and ck.resume:
            path, doc = checkpoint.latest(ck.folder, log=log if self.main else lambda *_: None)
            if doc["step"] > self.total:
                raise CheckpointError(f"{str(path)!r} is at step {doc['step']} but the run has {self.total} steps")
            if self.main:  # after latest's notes on damaged checkpoints skipped
                print(f"resuming from {path} (step {doc['step']} of {self.total})", flush=True)
            state = checkpoint.restore(path, doc, self.model, self.opt, self.sched, [n for n, _ in self.named],
                                       self.config(), self.d.rank if self.d is not None else 0, self.fsdp)
            state.extra |= ck.extra  # the caller's newer values win
            return state
        state = checkpoint.TrainState(extra=ck.extra if ck is not None else {})
        if self.task.validate is not None and self.cfg.eval_every > 0 and self.validates:
            state.val_loss_start = self.task.validate(self.model)
        return state

    def step(self, batches) -> tuple[dict, int, float]:
        """One optimizer step over ``cfg.grad_accum`` micro-batches: (log record, real tokens, seconds).

        A non-finite loss or gradient norm skips the update (``on_nonfinite="skip"``: the record says
        ``skipped``) or raises ``NonFiniteError`` before the optimizer touches the weights.
        """
        cfg, task, named, d = self.cfg, self.task, self.named, self.d
        t0 = time.perf_counter()
        micro = [distributed.share(next(batches), d) for _ in range(cfg.grad_accum)]
        micro = [(task.collate(b), 0.0 if empty else 1.0) for b, empty in micro]  # an empty slice weighs 0
        n_all = sum(task.units(b) * w for b, w in micro)
        tokens = sum(task.tokens(b) * w for b, w in micro)
        n_all = int(d.sum([n_all])[0]) if d is not None else n_all
        loss_sum = 0.0
        for i, (batch, w) in enumerate(micro):
            with torch.autocast(self.autocast, dtype=torch.bfloat16, enabled=cfg.bf16):
                if d is None:
                    loss = task.loss(self.model, batch)
                    (loss / max(1, n_all)).backward()  # mean over all loss units of the step
                elif self.replica is None:  # FSDP: reduce-scatter averages like DDP
                    loss = task.loss(self.model, batch) * w
                    (loss / max(1, n_all) * d.world).backward()
                else:  # DDP averages the ranks' gradients: times world, the mean over all ranks' units
                    with self.replica.no_sync(i < len(micro) - 1):
                        loss = self.replica.loss(batch, w)
                        (loss / max(1, n_all) * d.world).backward()
            loss_sum += float(loss.detach())
        if d is not None:
            loss_sum, tokens = d.sum([loss_sum, tokens])
        grads = [p.grad for _, p in named if p.grad is not None]
        norm = distributed.full(torch.nn.utils.get_total_norm(grads)) if grads else torch.zeros(())
        lr = self.sched.get_last_lr()[0]
        finite = math.isfinite(loss_sum) and bool(torch.isfinite(norm))
        if not finite and cfg.on_nonfinite != "skip":
            raise NonFiniteError(f"non-finite loss or gradient (loss {loss_sum}, gradient norm {float(norm)}); "
                                 f"first parameter affected: {_first_nonfinite(named, math.isfinite(loss_sum))}")
        if finite:
            if cfg.max_grad_norm is not None:
                _clip([p for _, p in named], cfg.max_grad_norm, norm)
            self.opt.step()
        self.sched.step()  # a skipped step still counts: the schedule stays tied to the step number
        self.opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        rec = {"loss": loss_sum / max(1, n_all) if finite else None, "lr": lr, "tokens_per_s": tokens / dt}
        return rec | ({} if finite else {"skipped": True}), int(tokens), dt

    def stopping(self, signals: Signals) -> int | None:
        """The signal that stops the run, if any rank received one (every rank gets the same answer)."""
        if self.d is None:
            return signals.received
        return self.d.max(signals.received or 0) or None

    def last_good(self) -> str:
        found = checkpoint.steps_in(self.ck.folder) if self.ck is not None else []
        return f"; the last good checkpoint is {str(found[-1][1])!r}" if found else ""

    def maybe_checkpoint(self, state: checkpoint.TrainState, stop: int | None) -> None:
        """Write a checkpoint at every ``ck.every``-th step and on a signal (then raise
        ``TrainingInterrupted``); under torchrun rank 0 writes it, with every rank's generators (and,
        under FSDP, the whole tensors every rank helped gather)."""
        ck, cfg, d = self.ck, self.cfg, self.d
        if ck is None or not ((ck.every and state.step % ck.every == 0) or stop):
            return
        consumed = state.step * cfg.grad_accum  # global micro-batches; an epoch has ceil(n / size) of them
        per_epoch = math.ceil(self.task.n_examples / (cfg.batch_size * self.world))
        data = {"epoch": consumed // per_epoch, "batches_in_epoch": consumed % per_epoch, "micro_batches": consumed,
                "order_seed": cfg.seed, "ranks": self.world}
        rngs = d.gather(checkpoint.rng_state()) if d is not None else [checkpoint.rng_state()]
        path = Path(ck.folder) / f"{checkpoint.PREFIX}{state.step}"
        names = [n for n, _ in self.named]
        # FSDP: every rank joins the gather of the whole adapters and optimizer state; rank 0 writes them
        gathered = fsdp_state.gather(self.model, self.opt, active_adapters(self.model), names) if self.fsdp else None
        if self.main:
            path = checkpoint.save(ck, state.step, self.model, self.opt, self.sched, names, state, data,
                                   self.config(), rngs, gathered)
        if d is not None:
            d.barrier()
        if stop:
            raise TrainingInterrupted(f"{signal.Signals(stop).name} at step {state.step} of {self.total}: "
                                      f"checkpoint saved to {str(path)!r}", state.step, path, stop)


def train(model, task: Task, cfg: TrainConfig, on_log: Callable[[dict], None] | None = None,
          progress: bool = True, checkpoints: Checkpointing | None = None, dist: Dist | None = None) -> dict:
    """Train the model's trainable (LoRA) parameters in place on ``task``.

    Each logged record (passed to ``on_log``) has ``step``, ``loss`` (mean per loss unit of that
    step: nats per label token, or per example; None for a skipped non-finite step, which also has
    ``skipped: true``; after the first, every record counts them in ``skipped_steps``), ``lr``,
    ``tokens_per_s`` (non-padding tokens per second of that step, forward + backward + update)
    and, at evaluation steps, ``val_loss``.

    With ``checkpoints`` (``checkpoint.Checkpointing``): a checkpoint every ``every`` steps and when
    SIGINT or SIGTERM arrives (then ``TrainingInterrupted``); ``resume`` restores the newest one and
    first replays its logged records through ``on_log``, so the caller sees every step once, and
    the run ends bit for bit where an uninterrupted one would (on the CPU; some CUDA kernels are not
    deterministic, so on a GPU it ends within rounding of it). With ``dist`` (``distributed.setup()``
    under torchrun): DDP over the trainable parameters, each rank on its slice of every global batch
    of ``batch_size × world`` examples (``distributed``); rank 0 alone validates and checkpoints. With
    ``dist.fsdp``: FSDP2 shards instead of DDP; a checkpoint holds the whole adapters and optimizer
    state, gathered from every rank (``fsdp_state``), and a resume splits them into the shards again.

    Returns:
        ``{"steps", "tokens", "train_seconds", "tokens_per_s", "val_loss_start", "skipped_steps",
        "resumed_from", "compile", "compiled_from_step"}``: totals over this process's steps (all ranks'
        tokens; validation time excluded), the validation loss before the first step (None without
        validation or off rank 0), the non-finite steps skipped, the step resumed from (0 for a fresh
        run), ``cfg.compile``, and the first step whose blocks ran compiled (None: every step ran eagerly).

    Raises:
        DataError: no training examples.
        ConfigError: no trainable parameters, or an unknown ``on_nonfinite``.
        NonFiniteError: a non-finite loss or gradient with ``cfg.on_nonfinite == "error"`` (step and
            first parameter named); the weights keep the previous step's values.
        CheckpointError: nothing to resume, or a checkpoint of another configuration (keys listed).
        SaveError: a checkpoint could not be written (path named; earlier checkpoints intact).
        TrainingInterrupted: SIGINT / SIGTERM, after the checkpoint was written.
        KeyboardInterrupt: a second SIGINT, or SIGINT without ``checkpoints``.
    """
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters (inject an adapter first)")
    if not task.n_examples:
        raise DataError("no training examples")
    if cfg.on_nonfinite not in ("error", "skip"):
        raise ConfigError(f"on_nonfinite must be 'error' or 'skip', got {cfg.on_nonfinite!r}")
    if checkpoints is not None:
        checkpoint.check_covered(model)
    run = _Run(model, task, cfg, checkpoints, dist)
    state = run.start()
    resumed_from = state.step if checkpoints is not None and checkpoints.resume else 0
    for rec in state.history if on_log else ():
        on_log(rec)
    tokens, seconds, compiled_from = _steps(run, state, on_log, progress)
    model.eval()
    return {"steps": run.total, "tokens": tokens, "train_seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds else 0.0,
            "val_loss_start": state.val_loss_start, "skipped_steps": state.skipped, "resumed_from": resumed_from,
            "compile": cfg.compile, "compiled_from_step": compiled_from}


def _steps(run: _Run, state: checkpoint.TrainState, on_log, progress: bool) -> tuple[int, float, int | None]:
    """Steps ``state.step + 1 .. total``, updating ``state``: (real tokens, seconds) of this process's steps,
    and the first step that ran with compiled blocks (None: none)."""
    from tqdm.auto import tqdm

    model, task, cfg = run.model, run.task, run.cfg
    batches = task.batches(state.step * cfg.grad_accum, cfg.batch_size * run.world)
    model.train()
    tokens_all, seconds_all = 0, 0.0
    bar = tqdm(range(state.step + 1, run.total + 1), desc="train", disable=not (progress and run.main),
               dynamic_ncols=True, initial=state.step, total=run.total)
    say = tqdm.write if run.main else (lambda *_: None)  # above the progress bar, not into its line
    with Signals(run.ck is not None) as signals, \
            CompileSwitch(model, cfg.compile, say, run.d is None and quantization(model) is None,
                          state.compile_from, run.total) as compiled:
        if state.rng is not None:  # last, so nothing above draws from the restored generators
            checkpoint.set_rng_state(state.rng)
        for step in bar:
            try:
                rec, tokens, dt = run.step(batches)
            except NonFiniteError as e:
                raise NonFiniteError(f"step {step}: {e}{run.last_good()}") from None
            state.skipped += "skipped" in rec
            rec = {"step": step, **rec} | ({"skipped_steps": state.skipped} if state.skipped else {})
            tokens_all, seconds_all = tokens_all + tokens, seconds_all + dt
            compiled.after_step(step, dt, run.total - step)
            state.compile_from = compiled.decision  # checkpointed: a resumed run compiles from the same step
            if state.val_loss_start is not None and (step % cfg.eval_every == 0 or step == run.total):
                rec["val_loss"] = _validate(model, task, compiled.compiled)
            if rec["loss"] is not None:
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}",
                                tok_s=f"{tokens_all / seconds_all:.0f}")
            state.history.append(rec)
            state.step = step
            if on_log:
                on_log(rec)
            run.maybe_checkpoint(state, run.stopping(signals))
    bar.close()
    return tokens_all, seconds_all, compiled.compiled_from


def _validate(model, task: Task, compiled: bool) -> float:
    # compiled blocks validate eagerly: a no-grad graph would be a second compilation
    with torch.compiler.set_stance("force_eager") if compiled else nullcontext():
        return task.validate(model)
