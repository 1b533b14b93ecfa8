"""The training loop: plain PyTorch AdamW, linear warmup + cosine decay, gradient clipping,
loss on label tokens only.

Speed on CPU comes from not doing work that does not count: the decoder body runs on the
whole (length-bucketed) batch, but the LM head (576 x 49152 for SmolLM2, about a quarter of
a small model's FLOPs per token) and the cross entropy run only at positions whose next
token carries a label; and the leading tokens all rows of a batch share (a fixed system prompt:
15 of the ~34 tokens of a built-in G2P example) run through the decoder once per batch, their
key/value cache repeated over the rows, instead of once per row.
"""

from __future__ import annotations

import functools
import inspect
import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .data import IGNORE, Example, collate, length_batches


@dataclass
class TrainConfig:
    """Optimisation settings.

    Attributes:
        steps: optimizer steps; if None, derived from ``epochs``.
        epochs: passes over the training examples (float allowed) when ``steps`` is None.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step (loss normalised by all their label tokens).
        lr: peak learning rate of AdamW.
        warmup: linear warmup steps (from lr/warmup up to lr), then cosine decay to 0.
        max_grad_norm: global L2 norm the gradients are clipped to.
        weight_decay: AdamW weight decay on the LoRA parameters.
        seed: seeds batch order.
        bf16: bfloat16 autocast for the forward pass (weights stay float32).
        eval_every: validation loss every this many steps (and at the last step); 0 = never.
    """

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-3
    warmup: int = 10
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    bf16: bool = False
    eval_every: int = 0

    def total_steps(self, n_examples: int) -> int:
        """Number of optimizer steps for ``n_examples`` training examples."""
        if self.steps is not None:
            return self.steps
        per_epoch = math.ceil(n_examples / self.batch_size / self.grad_accum)
        return max(1, math.ceil((self.epochs or 1.0) * per_epoch))


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at scheduler step ``s`` (0-based): linear warmup then cosine to 0."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = (s - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


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


def _plain_head(model) -> bool:
    """True when logits are just ``lm_head(hidden)`` (no soft-capping or logit scale to apply)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "get_decoder") or model.get_output_embeddings() is None:
        return False
    return getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None


def _shared_prefix_len(input_ids: torch.Tensor, attention_mask: torch.Tensor, sel: torch.Tensor) -> int:
    """Length P of the leading tokens every row has in common (unpadded), cut so that no
    position before P predicts a label and at least one token is left after it."""
    same = (input_ids == input_ids[:1]).all(0) & (attention_mask == 1).all(0)
    p = int(same.long().cumprod(0).sum())
    predicting = sel.any(0).nonzero()
    first = int(predicting[0]) if len(predicting) else 0
    return min(p, first, input_ids.shape[1] - 1)


def _checkpointing(model) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)
    if flag is None:
        flag = getattr(model, "is_gradient_checkpointing", False)
    return bool(flag)


def _prefix_hidden(model, input_ids, attention_mask, sel):
    """Decoder output at positions P.. with the batch's common prefix (length P) run once.

    The prefix (e.g. a fixed system prompt) goes through the decoder for one row; its key/value
    cache is repeated over the batch (autograd sums every row's gradient back into it) and only
    the remaining T - P tokens of each row are run. Exact: the same function of the same
    weights. Returns ``(hidden (B, T-P, H), P)``, or ``None`` when there is nothing to share
    or the model cannot take a cache (activation checkpointing turns the cache off).
    """
    B, T = input_ids.shape
    if B < 2 or _checkpointing(model):
        return None
    P = _shared_prefix_len(input_ids, attention_mask, sel)
    if P < 2:
        return None
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover - transformers is a dependency of every supported model
        return None
    dec = model.get_decoder()
    cache = DynamicCache()
    key = _cache_kwarg(type(dec))
    dec(input_ids=input_ids[:1, :P], use_cache=True, **{key: cache})
    if cache.get_seq_length() != P:  # the model did not fill the cache: do not share
        return None
    cache.batch_repeat_interleave(B)
    h = dec(input_ids=input_ids[:, P:], attention_mask=attention_mask, use_cache=True, **{key: cache})
    return h.last_hidden_state, P


@functools.lru_cache(maxsize=None)
def _cache_kwarg(cls) -> str:
    """``cache`` in newer transformers (``past_key_values`` is deprecated there), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def label_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
               share_prefix: bool = False):
    """Summed next-token cross entropy over label tokens, and their count.

    Equals ``model(input_ids, attention_mask=..., labels=labels).loss * n`` (transformers
    shifts labels the same way) but computes the LM head only at the n positions whose next
    token has a label.

    Args:
        input_ids, attention_mask, labels: int64 (B, T); labels are ``IGNORE`` where untrained.
        share_prefix: run the leading tokens all rows share (a fixed system prompt, say; up to
            the first position that predicts a label) once instead of once per row, through a
            key/value cache repeated over the batch. Same result; only for decoders that take a
            transformers ``DynamicCache`` and not under activation checkpointing (else ignored).

    Returns:
        ``(loss_sum, n)``: a float32 scalar tensor (nats, summed) and an int.
    """
    target = labels[:, 1:]  # position t predicts token t+1
    sel = target != IGNORE  # (B, T-1)
    n = int(sel.sum())
    if n == 0:
        return input_ids.new_zeros((), dtype=torch.float32), 0
    if _plain_head(model):
        shared = _prefix_hidden(model, input_ids, attention_mask, sel) if share_prefix else None
        if shared is not None:
            h, P = shared  # positions P..T-1
            sel, target = sel[:, P:], target[:, P:]
        else:
            h = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logits = model.get_output_embeddings()(h[:, :-1][sel])  # (n, V)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][sel]
    return F.cross_entropy(logits.float(), target[sel], reduction="sum"), n


@torch.no_grad()
def mean_loss(model, examples: list[Example], pad_id: int, batch_size: int = 32) -> tuple[float, int]:
    """Mean cross entropy (nats per label token) over ``examples`` and the label-token count.

    The model is put in eval mode and left in the mode it was in.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))  # little padding
    for s in range(0, len(order), batch_size):
        ids, mask, labels = collate([examples[i] for i in order[s:s + batch_size]], pad_id)
        loss, n = label_loss(model, ids, mask, labels)
        total, count = total + float(loss), count + n
    model.train(was_training)
    return (total / count if count else float("nan")), count


def _batch_stream(examples: list[Example], batch_size: int, seed: int):
    """Endless length-bucketed batches, reshuffled every epoch."""
    lengths = [len(e) for e in examples]
    epoch = 0
    while True:
        for b in length_batches(lengths, batch_size, random.Random(seed * 100003 + epoch)):
            yield [examples[i] for i in b]
        epoch += 1


def train(
    model,
    train_examples: list[Example],
    cfg: TrainConfig,
    pad_id: int,
    val_examples: list[Example] | None = None,
    on_log: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> dict:
    """Train the model's trainable (LoRA) parameters in place.

    Each logged record (passed to ``on_log``) has ``step``, ``loss`` (mean nats per label
    token of that step), ``lr``, ``tokens_per_s`` (non-padding tokens per second of that
    step, forward + backward + update) and, at evaluation steps, ``val_loss``.

    Returns:
        ``{"steps", "tokens", "train_seconds", "tokens_per_s", "val_loss_start"}``: totals
        over the run (validation time excluded) and the validation loss before the first step
        (None without validation).

    Raises:
        ValueError: no training examples or no trainable parameters.
        KeyboardInterrupt: passed through; the caller decides what to keep.
    """
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (inject an adapter first)")
    if not train_examples:
        raise ValueError("no training examples")
    total = cfg.total_steps(len(train_examples))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup, total))
    stream = _batch_stream(train_examples, cfg.batch_size, cfg.seed)
    # validation loss of the untrained adapter: the start of the curve
    val_start = mean_loss(model, val_examples, pad_id)[0] if val_examples and cfg.eval_every else None
    model.train()
    tokens_all, seconds_all = 0, 0.0
    bar = tqdm(range(1, total + 1), desc="train", disable=not progress, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        micro = [collate(next(stream), pad_id) for _ in range(cfg.grad_accum)]
        n_all = sum(int((lab[:, 1:] != IGNORE).sum()) for _, _, lab in micro)
        loss_sum = 0.0
        for ids, mask, labels in micro:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss, _ = label_loss(model, ids, mask, labels, share_prefix=True)
            (loss / n_all).backward()  # mean over all label tokens of the step
            loss_sum += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        tokens = sum(int(mask.sum()) for _, mask, _ in micro)
        tokens_all, seconds_all = tokens_all + tokens, seconds_all + dt
        rec = {"step": step, "loss": loss_sum / n_all, "lr": lr, "tokens_per_s": tokens / dt}
        if val_examples and cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
            rec["val_loss"] = mean_loss(model, val_examples, pad_id)[0]
        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_all / seconds_all:.0f}")
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
