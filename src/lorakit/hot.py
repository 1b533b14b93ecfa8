"""The adapters of the current mix in a few fixed slots, for per-row adapters while decoding.

A layer's ``AdapterBank`` (``lorakit.bank``) holds every resident adapter stacked; a batched
matmul pair over all of its slots costs every resident adapter's factors each step. With many
adapters resident and a few in the batch, ``HotBank`` keeps only the mix's factors in C slots
(vLLM's ``max_loras`` GPU slots, S-LoRA's unified pool, here on the CPU): when the mix changes,
an adapter already in a slot stays where it is, and only the adapters new to the mix are copied
in, over slots whose adapters left it (least recently used first). A serving engine whose batch
changes by one request per step therefore copies one adapter's factors, not the whole mix.

A slot's copy is current while its source slot in the bank has the generation it was copied at
(``AdapterBank.slot_gen``): an adapter loaded again, trained or restacked, or its slot freed, is
copied afresh.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch


def a_slots(like: torch.Tensor, slots: int, n_in: int, r: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Zeros for ``slots`` stacked ``A^T`` (slots, n_in, r), stored as ``A`` is, (slots, r, n_in) row-major,
    and viewed transposed: a batched matmul reads each slot's A row by row. Measured on 2 CPU threads
    with SmolLM2 shapes (16 slots, 2 rows each, r=8): ``bmm`` 36-40 µs against 43-49 µs for a
    row-major (slots, n_in, r)."""
    return like.new_zeros((slots, r, n_in), dtype=dtype or like.dtype).transpose(1, 2)


class EmptySlot:
    """An empty slot's name: unique, never equal to an adapter name or to None (a row without an
    adapter must never be laid out on a slot)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<empty slot>"


class HotBank:
    """C slots of ``(A^T, (s·B)^T)`` copied from an ``AdapterBank``: ``a_t`` (C, in, r_max),
    ``b_t`` (C, r_max, out), ``names`` (C,) the adapter in each slot (an ``EmptySlot`` placeholder where
    none). The slot count grows to the largest mix seen and shrinks back when it exceeds twice the
    mix (so the padding rows a batched product computes stay bounded)."""

    def __init__(self) -> None:
        self.a_t: torch.Tensor | None = None
        self.b_t: torch.Tensor | None = None
        self.names: list = []
        self._gen: list[int] = []  # per slot: the bank generation of the copy
        self._used: list[int] = []  # per slot: the admit() tick that last wanted it (least recently used first)
        self._tick = 0
        self.copies = 0  # adapters copied in so far (what a change of mix cost)

    def admit(self, bank, names: Sequence[str]) -> tuple:
        """Make every adapter in ``names`` (held by ``bank``, its slots current) hot; returns the slot
        names, a tuple (C,) shared by every layer whose slots hold the same adapters."""
        # the slots are never inference tensors, even when admitted under torch.inference_mode: a later
        # block without it writes them in place
        with torch.inference_mode(False), torch.no_grad():
            return self._admit(bank, names)

    def _admit(self, bank, names: Sequence[str]) -> tuple:
        self._tick += 1
        if self.a_t is None or not _fits(self.a_t, bank.a_t) or not _fits(self.b_t, bank.b_t):
            self._reset(bank, 0)
        wanted = set(names)
        where = {}
        for j, n in enumerate(self.names):  # drop stale copies: their name must not route rows
            if n in wanted and self._gen[j] == bank.slot_gen[bank.slots[n]]:
                where[n] = j
                self._used[j] = self._tick
            elif not isinstance(n, EmptySlot) and (n not in bank.slots or self._gen[j] != bank.slot_gen[bank.slots[n]]):
                self.names[j] = EmptySlot()
        missing = [n for n in names if n not in where]
        if len(self.names) > 2 * max(len(wanted), 1):  # a large mix has gone: shrink to this one
            self._reset(bank, 0)
            missing, where = list(names), {}
        free = sorted((j for j, n in enumerate(self.names) if n not in where), key=lambda j: self._used[j])
        if len(free) < len(missing):
            free += self._grow(bank, len(missing) - len(free))
        if missing:  # the least recently used slots, in slot order: consecutive ones are copied as one run
            self._copy(bank, missing, sorted(free[: len(missing)]))
        return tuple(self.names)

    def _copy(self, bank, missing: list[str], slots: list[int]) -> None:
        """Copy the bank slots of ``missing`` into hot slots ``slots`` (ascending), in A's storage layout
        (``a_slots``; through the transposed views a copy goes element by element). Each run of consecutive
        hot slots takes one ``index_select`` written straight into it, so the factors are read once and
        written once: through a temporary and ``index_copy_`` they moved twice (a new mix of 16 adapters
        over SmolLM2's 210 layers: 144 ms to prepare the step, now 98 ms)."""
        a_hot, a_bank = self.a_t.transpose(1, 2), bank.a_t.transpose(1, 2)  # (C, r, in), (S, r, in): contiguous
        device, src = str(self.a_t.device), [bank.slots[n] for n in missing]
        start = 0
        for end in range(1, len(slots) + 1):
            if end == len(slots) or slots[end] != slots[end - 1] + 1:  # a run of hot slots ends here
                lo, hi = slots[start], slots[end - 1] + 1
                if hi - lo == 1:  # one request joined (the serving case): two slot copies, no index tensor
                    a_hot[lo].copy_(a_bank[src[start]])
                    self.b_t[lo].copy_(bank.b_t[src[start]])
                else:
                    index = _index(tuple(src[start:end]), device)
                    torch.index_select(a_bank, 0, index, out=a_hot[lo:hi])
                    torch.index_select(bank.b_t, 0, index, out=self.b_t[lo:hi])
                start = end
        for j, n in zip(slots, missing):
            self.names[j], self._gen[j], self._used[j] = n, bank.slot_gen[bank.slots[n]], self._tick
        self.copies += len(missing)

    def _grow(self, bank, extra: int) -> list[int]:
        c = len(self.names)
        a_t = a_slots(bank.a_t, c + extra, *bank.a_t.shape[1:])  # A's own row-major layout (``a_slots``)
        a_t[:c] = self.a_t
        self.a_t = a_t
        self.b_t = torch.cat([self.b_t, bank.b_t.new_zeros((extra, *bank.b_t.shape[1:]))])
        self.names += [EmptySlot() for _ in range(extra)]
        self._gen += [-1] * extra
        self._used += [0] * extra
        return list(range(c, c + extra))

    def _reset(self, bank, slots: int) -> None:
        self.a_t = a_slots(bank.a_t, slots, *bank.a_t.shape[1:])
        self.b_t = bank.b_t.new_zeros((slots, *bank.b_t.shape[1:]))
        self.names, self._gen, self._used = [EmptySlot() for _ in range(slots)], [-1] * slots, [0] * slots


@functools.lru_cache(maxsize=1024)
def _index(ids: tuple[int, ...], device: str) -> torch.Tensor:
    """``ids`` as an int64 tensor, shared by every layer that copies the same slots (never written to)."""
    return torch.tensor(ids, dtype=torch.long, device=device)


def _fits(hot: torch.Tensor, bank: torch.Tensor) -> bool:
    """Whether slots shaped like ``hot`` can take ``bank``'s slots (same per-slot shape, dtype, device)."""
    return hot.shape[1:] == bank.shape[1:] and hot.dtype == bank.dtype and hot.device == bank.device
