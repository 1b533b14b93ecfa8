"""The training loop: plain PyTorch AdamW, linear warmup + cosine decay, gradient clipping,
loss on label tokens only.

Speed on CPU comes from not doing work that does not count: the LM head (576 x 49152 for
SmolLM2, about a fifth of the model's FLOPs per token) and the cross entropy run only at
positions whose next token carries a label; and each length-bucketed batch runs packed: the
leading tokens all its rows share (a fixed system prompt: 15 of the ~34 tokens of a built-in
G2P example) once instead of once per row, and no padding, with an attention mask that keeps
the rows apart. On CPU a matmul's time follows its rows, and every extra pass over the weights
costs about a full one, so packing into one pass is what pays (a separate prefix pass with a
repeated key/value cache did not).
"""

from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .data import IGNORE, Example, collate, length_batches

# Packed rows hold up to this many tokens: attention over a packed row costs its length squared,
# so several shorter rows beat one long one past a few hundred tokens.
PACK_TOKENS = 256


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
        compile: ``torch.compile`` each transformer block for the training steps (``compile_blocks``):
            fewer, fused elementwise kernels; the first step pays the compilation (15-75 s for
            SmolLM2 on 2 CPU cores; once more when a batch first packs into several rows), so it
            pays on long runs.
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
    compile: bool = False

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


def _plain_head(model) -> bool:
    """True when logits are just ``lm_head(hidden)`` (no soft-capping or logit scale to apply)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "get_decoder") or model.get_output_embeddings() is None:
        return False
    return getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None


def _shared_prefix_len(input_ids: torch.Tensor, attention_mask: torch.Tensor, sel: torch.Tensor) -> int:
    """Length P of the leading tokens every row has in common (unpadded), cut so that no
    position before P predicts a label and at least one token of each row is left after it."""
    same = (input_ids == input_ids[:1]).all(0) & (attention_mask == 1).all(0)
    p = int(same.long().cumprod(0).sum())
    predicting = sel.any(0).nonzero()
    first = int(predicting[0]) if len(predicting) else 0
    return min(p, first, int(attention_mask.sum(1).min()) - 1)


def _packable(model, length: int) -> bool:
    """True when the decoder takes a packed row with a custom 4-D mask and gets every position from
    ``position_ids``: rotary models (Llama, Mistral, Qwen, Gemma, ...) under SDPA or eager attention,
    and no sliding window shorter than the batch (the custom mask replaces the window's mask)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    window = getattr(cfg, "sliding_window", None)
    return hasattr(model.get_decoder(), "rotary_emb") and (not window or window >= length)


@dataclass
class _Packed:
    input_ids: torch.Tensor  # (G, N)
    position_ids: torch.Tensor  # (G, N)
    allowed: torch.Tensor  # (G, 1, N, N) bool, True where query (row) may attend key (column)
    index: torch.Tensor  # (B, T): flat index into G * N of each real token of the padded batch


def _pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, sel: torch.Tensor,
          max_tokens: int | None = None) -> _Packed | None:
    """Lay a right-padded batch out as G packed rows of at most ``max_tokens`` tokens (longer rows alone).

    Each packed row holds the batch's common prefix once, then the rest of each of its rows, padding
    dropped; the mask lets every token see the prefix and the earlier tokens of its own row, so each
    token's output is what the padded batch gives it. A row's tokens after its last label-predicting
    position are left out too (a row's last token, at least): no scored position attends to them.
    Returns None when packing saves no tokens or the batch is not right-padded.
    """
    max_tokens = PACK_TOKENS if max_tokens is None else max_tokens  # read at call time
    device = input_ids.device
    input_ids, attention_mask, sel = input_ids.cpu(), attention_mask.cpu(), sel.cpu()  # laid out on the host
    B, T = input_ids.shape
    lens = attention_mask.sum(1)
    if not torch.equal(attention_mask.bool(), torch.arange(T) < lens[:, None]):
        return None
    P = max(0, _shared_prefix_len(input_ids, attention_mask, sel))
    last = torch.where(sel, torch.arange(T - 1), -1).amax(1)  # each row's last label-predicting position
    need = torch.minimum((last + 1).clamp(min=P), lens)  # the tokens each row needs
    groups, sizes = [[]], [P]  # batch rows of each packed row, and its token count
    for b, n in enumerate((need - P).tolist()):
        if groups[-1] and sizes[-1] + n > max_tokens:
            groups.append([])
            sizes.append(P)
        groups[-1].append(b)
        sizes[-1] += n
    G, N = len(groups), max(sizes)
    if G * N >= B * T:
        return None
    ids = input_ids.new_zeros((G, N))
    pos = torch.zeros((G, N), dtype=torch.long)
    seg = torch.full((G, N), -2)  # -1: the shared prefix, b: batch row b, -2: padding
    index = torch.zeros((B, T), dtype=torch.long)
    for g, rows in enumerate(groups):
        ids[g, :P], pos[g, :P], seg[g, :P] = input_ids[rows[0], :P], torch.arange(P), -1
        o = P
        for b in rows:
            L = int(need[b])
            dst = slice(o, o + L - P)  # row b's tokens after the prefix
            ids[g, dst], pos[g, dst], seg[g, dst] = input_ids[b, P:L], torch.arange(P, L), b
            index[b, :P] = g * N + torch.arange(P)
            index[b, P:L] = g * N + torch.arange(dst.start, dst.stop)
            o = dst.stop
    q, k = seg[:, :, None], seg[:, None, :]
    # padding keys match only padding queries, which then see one another: no softmax row is empty
    allowed = (pos[:, None, :] <= pos[:, :, None]) & ((k == -1) | (k == q))
    return _Packed(ids.to(device), pos.to(device), allowed[:, None].to(device), index.to(device))


def _packed_hidden(model, packed: _Packed) -> torch.Tensor:
    """Decoder output (G * N, H) of the packed rows."""
    mask = packed.allowed
    if model.config._attn_implementation == "eager":  # eager adds the mask to the scores
        dtype = model.get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    out = model.get_decoder()(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                              use_cache=False)
    return out.last_hidden_state.flatten(0, 1)


def label_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
               pack: bool = False):
    """Summed next-token cross entropy over label tokens, and their count.

    Equals ``model(input_ids, attention_mask=..., labels=labels).loss * n`` (transformers
    shifts labels the same way) but computes the LM head only at the n positions whose next
    token has a label.

    Args:
        input_ids, attention_mask, labels: int64 (B, T), right-padded for ``pack``; labels are
            ``IGNORE`` where untrained.
        pack: run the batch as packed rows (see ``_pack``): the leading tokens all rows share (a
            fixed system prompt, say) once instead of once per row, and no padding. Same result up
            to float rounding; used where ``_packable`` allows it, else the padded batch runs.

    Returns:
        ``(loss_sum, n)``: a float32 scalar tensor (nats, summed) and an int.
    """
    target = labels[:, 1:]  # position t predicts token t+1
    sel = target != IGNORE  # (B, T-1)
    n = int(sel.sum())
    if n == 0:
        return input_ids.new_zeros((), dtype=torch.float32), 0
    if _plain_head(model):
        packed = _pack(input_ids, attention_mask, sel) if pack and _packable(model, input_ids.shape[1]) else None
        if packed is not None:
            h = _packed_hidden(model, packed)[packed.index[:, :-1][sel]]
        else:
            h = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                    use_cache=False).last_hidden_state[:, :-1][sel]
        logits = model.get_output_embeddings()(h)  # (n, V)
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
        loss, n = label_loss(model, ids, mask, labels, pack=True)
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
    opt = adamw(params, cfg.lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup, total))
    stream = _batch_stream(train_examples, cfg.batch_size, cfg.seed)
    # validation loss of the untrained adapter: the start of the curve
    val_start = mean_loss(model, val_examples, pad_id)[0] if val_examples and cfg.eval_every else None
    model.train()
    tokens_all, seconds_all = 0, 0.0
    bar = tqdm(range(1, total + 1), desc="train", disable=not progress, dynamic_ncols=True)
    with compile_blocks(model, cfg.compile):
        for step in bar:
            t0 = time.perf_counter()
            micro = [collate(next(stream), pad_id) for _ in range(cfg.grad_accum)]
            n_all = sum(int((lab[:, 1:] != IGNORE).sum()) for _, _, lab in micro)
            loss_sum = 0.0
            for ids, mask, labels in micro:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss, _ = label_loss(model, ids, mask, labels, pack=True)
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
                # compiled blocks validate eagerly: a no-grad graph would be a second compilation
                with torch.compiler.set_stance("force_eager") if cfg.compile else nullcontext():
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
