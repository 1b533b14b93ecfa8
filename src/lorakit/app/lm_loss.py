"""The causal-LM loss on label tokens only, and the LM job's ``Task`` for the training loop.

Speed on CPU comes from not doing work that does not count: the LM head (576 x 49152 for
SmolLM2, about a fifth of the model's FLOPs per token) and the cross entropy run only at
positions whose next token carries a label; and each length-bucketed batch runs packed
(``packing``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import packing
from .batches import batch_stream, collate
from .data import IGNORE, Example
from .devices import to_model
from .loop import Task, TrainConfig


def _plain_head(model) -> bool:
    """True when logits are just ``lm_head(hidden)`` (no soft-capping or logit scale to apply)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "get_decoder") or model.get_output_embeddings() is None:
        return False
    return getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None


def label_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
               pack: bool = False):
    """Summed next-token cross entropy over label tokens, and their count.

    Equals ``model(input_ids, attention_mask=..., labels=labels).loss * n`` (transformers
    shifts labels the same way) but computes the LM head only at the n positions whose next
    token has a label.

    Args:
        input_ids, attention_mask, labels: int64 (B, T), right-padded for ``pack``; labels are
            ``IGNORE`` where untrained. Moved to the model's device (``devices.model_device``).
        pack: run the batch as packed rows (see ``packing.pack``): the leading tokens all rows share (a
            fixed system prompt, say) once instead of once per row, and no padding. Same result up
            to float rounding; used where ``packing.packable`` allows it, else the padded batch runs.

    Returns:
        ``(loss_sum, n)``: a float32 scalar tensor (nats, summed) and an int.
    """
    input_ids, attention_mask, labels = to_model(model, input_ids, attention_mask, labels)  # the batch follows the model
    target = labels[:, 1:]  # position t predicts token t+1
    sel = target != IGNORE  # (B, T-1)
    n = int(sel.sum())
    if n == 0:
        return input_ids.new_zeros((), dtype=torch.float32), 0
    if _plain_head(model):
        packed = None
        if pack and packing.packable(model, input_ids.shape[1]):
            packed = packing.pack(input_ids, attention_mask, sel)
        if packed is not None:
            h = packing.packed_hidden(model, packed)[packed.index[:, :-1][sel]]
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


def lm_task(examples: list[Example], pad_id: int, cfg: TrainConfig, val_examples: list[Example] | None = None) -> Task:
    """The causal-LM ``Task`` for ``loop.train``.

    Batches: length-bucketed, ``cfg.batch_size`` examples, order seeded by ``cfg.seed``, run packed.
    Loss: cross entropy summed over label tokens. Validation: ``mean_loss`` on ``val_examples``.
    """

    def units(batch) -> int:
        return int((batch[2][:, 1:] != IGNORE).sum())

    def validate(model) -> float:
        return mean_loss(model, val_examples, pad_id)[0]

    return Task(
        n_examples=len(examples),
        batches=lambda start, size: batch_stream(examples, size, cfg.seed, start),
        collate=lambda b: collate(b, pad_id),
        loss=lambda model, batch: label_loss(model, *batch, pack=True)[0],
        units=units,
        tokens=lambda batch: int(batch[1].sum()),
        validate=validate if val_examples else None,
    )
