"""The running batch of a continuous-batching server: its sequences and their shared, left-padded
KV cache (a transformers ``DynamicCache``; keys and values (rows, kv_heads, T, head_dim)).

Sequences join after their prompts are prefilled (a batch of its own, merged by left-padding both
caches to one length) and leave as soon as they finish (their rows are dropped, and columns no
remaining row uses are trimmed), so the decoding step always runs exactly the live sequences.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .decode import Sampler, TextStream


@dataclass(eq=False)
class Request:
    """One API request: its prompts (token ids) and sampling settings, and where results go.

    ``sink(index, delta, finish)`` receives each choice's text pieces (``finish`` "stop" or
    "length" on its last), or ``sink(None, error, None)`` once if the request fails; it is
    called on the engine thread and must not block.
    """

    adapter: str | None
    prompts: list[list[int]]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    sink: object
    ignore_eos: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    cancelled: bool = False
    generated: int = 0

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


@dataclass(eq=False)
class Sequence:
    """One generated choice of a request: its row in the running batch.

    Attributes:
        request: the owning ``Request``; ``index``: the choice index within it.
        adapter: adapter name, or None for the base model; ``prompt``: its token ids.
        position: position id of ``last`` (real tokens before it).
        last: the last token id (the next step's input).
        generated: how many tokens were generated.
    """

    request: object
    index: int
    adapter: str | None
    sampler: Sampler
    text: TextStream
    prompt: list[int]
    position: int = 0
    last: int = 0
    generated: int = 0
    finish: str | None = None


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache(pairs):
    from transformers import DynamicCache

    return DynamicCache(pairs)


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [n, 0]
    return F.pad(t, pad)


class RunningBatch:
    """Live sequences, their cache and attention mask (int64 (rows, T), 0 on left padding)."""

    def __init__(self) -> None:
        self.seqs: list[Sequence] = []
        self.cache = None
        self.mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seqs: list[Sequence], cache, mask: torch.Tensor) -> None:
        """Append prefilled sequences with their own cache and mask (left-padded to one length)."""
        if not self.seqs:
            self.seqs, self.cache, self.mask = list(seqs), cache, mask
            return
        t_old, t_new = self.mask.shape[1], mask.shape[1]
        length = max(t_old, t_new)
        pairs = []
        for (k0, v0), (k1, v1) in zip(_layers(self.cache), _layers(cache), strict=True):
            pairs.append((torch.cat([_pad_left(k0, length - t_old, -2), _pad_left(k1, length - t_new, -2)]),
                          torch.cat([_pad_left(v0, length - t_old, -2), _pad_left(v1, length - t_new, -2)])))
        self.cache = _cache(pairs)
        self.mask = torch.cat([_pad_left(self.mask, length - t_old, 1), _pad_left(mask, length - t_new, 1)])
        self.seqs.extend(seqs)

    def keep(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (in order); drop the leading columns that are padding in every row."""
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        idx = torch.tensor(keep, dtype=torch.long)
        mask = self.mask.index_select(0, idx)
        start = int(mask.any(0).to(torch.int8).argmax())  # first column some row still uses
        self.mask = mask[:, start:]
        self.cache = _cache([(k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:])
                             for k, v in _layers(self.cache)])

    def step_inputs(self) -> dict:
        """Model inputs for one decoding step: each row's last token at its own position."""
        self.mask = F.pad(self.mask, [0, 1], value=1)
        return {
            "input_ids": torch.tensor([[s.last] for s in self.seqs]),
            "position_ids": torch.tensor([[s.position] for s in self.seqs]),
            "attention_mask": self.mask,
            "cache": self.cache,
        }


def prefill_inputs(prompts: list[list[int]], pad_id: int) -> dict:
    """Left-padded model inputs for a batch of prompts (position ids count real tokens only)."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.tensor(p)
        mask[i, length - len(p):] = 1
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, "cache": _cache(None)}
