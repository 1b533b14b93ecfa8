"""The one training loop of the app, shared by the causal-LM job and classification.

A job describes its data and loss as a ``Task`` (``lm_loss.lm_task``, ``classify``); ``train``
owns everything else: torch's fused AdamW, a transformers learning-rate schedule (linear
warmup, then cosine or linear decay), gradient accumulation, gradient clipping, bfloat16
autocast, periodic validation, ``torch.compile`` of the transformer blocks, throughput, logging
and the progress bar.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from lorakit.errors import ConfigError, DataError


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
        bf16: bfloat16 autocast for the forward pass (weights stay float32).
        eval_every: validation loss every this many steps (and at the last step); 0 = never.
        compile: ``torch.compile`` each transformer block for the training steps (``compile_blocks``):
            fewer, fused elementwise kernels; the first step pays the compilation (15-75 s for
            SmolLM2 on 2 CPU cores; once more when a batch first packs into several rows), so it
            pays on long runs.
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
    compile: bool = False

    def total_steps(self, n_examples: int) -> int:
        """Number of optimizer steps for ``n_examples`` training examples."""
        if self.steps is not None:
            return self.steps
        per_epoch = math.ceil(n_examples / self.batch_size / self.grad_accum)
        return max(1, math.ceil((self.epochs or 1.0) * per_epoch))


@dataclass
class Task:
    """What a training job gives the loop: its batches and its loss.

    Attributes:
        n_examples: training examples (with ``TrainConfig.epochs``, gives the number of steps).
        batches: endless micro-batches, in training order (any object the functions below take).
        loss: ``loss(model, batch)``: the loss summed over the batch's units (label tokens,
            examples), a scalar tensor.
        units: ``units(batch)``: how many units ``loss`` sums over; a step's loss is the sum over
            its micro-batches divided by their total units, i.e. the mean per unit.
        tokens: ``tokens(batch)``: real (non-padding) tokens, for ``tokens_per_s``.
        validate: ``validate(model)``: the validation loss, or None for no validation.
    """

    n_examples: int
    batches: Iterator[Any]
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


def _step(model, task: Task, cfg: TrainConfig, params, opt, sched) -> tuple[dict, int, float]:
    """One optimizer step over ``cfg.grad_accum`` micro-batches: (log record, real tokens, seconds)."""
    t0 = time.perf_counter()
    micro = [next(task.batches) for _ in range(cfg.grad_accum)]
    n_all = sum(task.units(b) for b in micro)
    loss_sum = 0.0
    for batch in micro:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = task.loss(model, batch)
        (loss / max(1, n_all)).backward()  # mean over all loss units of the step
        loss_sum += float(loss.detach())
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    lr = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    tokens = sum(task.tokens(b) for b in micro)
    return {"loss": loss_sum / max(1, n_all), "lr": lr, "tokens_per_s": tokens / dt}, tokens, dt


def train(model, task: Task, cfg: TrainConfig, on_log: Callable[[dict], None] | None = None,
          progress: bool = True) -> dict:
    """Train the model's trainable (LoRA) parameters in place on ``task``.

    Each logged record (passed to ``on_log``) has ``step``, ``loss`` (mean per loss unit of that
    step: nats per label token, or per example), ``lr``, ``tokens_per_s`` (non-padding tokens per
    second of that step, forward + backward + update) and, at evaluation steps, ``val_loss``.

    Returns:
        ``{"steps", "tokens", "train_seconds", "tokens_per_s", "val_loss_start"}``: totals
        over the run (validation time excluded) and the validation loss before the first step
        (None without validation).

    Raises:
        DataError: no training examples.
        ConfigError: no trainable parameters.
        KeyboardInterrupt: passed through; the caller decides what to keep.
    """
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (inject an adapter first)")
    if not task.n_examples:
        raise DataError("no training examples")
    total = cfg.total_steps(task.n_examples)
    opt = adamw(params, cfg.lr, cfg.weight_decay)
    sched = schedule(opt, cfg.schedule, cfg.warmup, total)
    validating = task.validate is not None and cfg.eval_every > 0
    val_start = task.validate(model) if validating else None  # the untrained adapter: the curve's start
    model.train()
    tokens_all, seconds_all = 0, 0.0
    bar = tqdm(range(1, total + 1), desc="train", disable=not progress, dynamic_ncols=True)
    with compile_blocks(model, cfg.compile):
        for step in bar:
            rec, tokens, dt = _step(model, task, cfg, params, opt, sched)
            rec = {"step": step, **rec}
            tokens_all, seconds_all = tokens_all + tokens, seconds_all + dt
            if validating and (step % cfg.eval_every == 0 or step == total):
                # compiled blocks validate eagerly: a no-grad graph would be a second compilation
                with torch.compiler.set_stance("force_eager") if cfg.compile else nullcontext():
                    rec["val_loss"] = task.validate(model)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{tokens_all / seconds_all:.0f}")
            if on_log:
                on_log(rec)
    bar.close()
    model.eval()
    return {
        "steps": total,
        "tokens": tokens_all,
        "train_seconds": seconds_all,
        "tokens_per_s": tokens_all / seconds_all if seconds_all else 0.0,
        "val_loss_start": val_start,
    }
