"""Batches of tokenised examples: length-bucketed index batches (little padding) and padding
into tensors."""

from __future__ import annotations

import math
import random

import torch

from .data import IGNORE, Example


def length_batches(lengths: list[int], batch_size: int, rng: random.Random, pool: int = 64) -> list[list[int]]:
    """Index batches with little padding: shuffle, sort pools of ``pool`` batches by length, split.

    Every index appears exactly once. Batches come out in random order so training does
    not see a length curriculum.
    """
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    batches = []
    span = batch_size * pool
    for s in range(0, len(idx), span):
        chunk = sorted(idx[s:s + span], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int, left: bool = False):
    """Pad examples into tensors.

    Returns:
        ``(input_ids, attention_mask, labels)``: int64 tensors of shape (B, T_max); padding
        has attention 0 and label ``IGNORE``; ``left=True`` pads on the left (generation).
    """
    T = max(len(e) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        sl = slice(T - n, T) if left else slice(0, n)
        ids[i, sl] = torch.tensor(e.input_ids)
        mask[i, sl] = 1
        labels[i, sl] = torch.tensor(e.labels)
    return ids, mask, labels


def batch_stream(examples: list[Example], batch_size: int, seed: int, start: int = 0):
    """Endless length-bucketed batches of examples, reshuffled every epoch (``ceil(n / batch_size)``
    batches each), from the ``start``-th batch on (0-based, counted across epochs).

    Each epoch's order depends only on ``seed`` and the epoch number, so a resumed run skips to
    ``start`` without replaying the batches before it and sees the same batches as an
    uninterrupted one.
    """
    lengths = [len(e) for e in examples]
    epoch, skip = divmod(start, math.ceil(len(examples) / batch_size)) if examples else (0, 0)
    while True:
        for b in length_batches(lengths, batch_size, random.Random(seed * 100003 + epoch))[skip:]:
            yield [examples[i] for i in b]
        epoch, skip = epoch + 1, 0
