"""Every resident adapter of one linear layer stacked once, for per-row adapters: ``AdapterBank``,
S-LoRA's resident pool (Sheng et al. 2023, "S-LoRA: Serving Thousands of Concurrent LoRA Adapters").

The slots are kept current slot by slot: an adapter added to the layer is written into a free slot
(the storage grows by a quarter when none is left; ``a_t`` and ``b_t`` view only the slots up to the
last one held), a deleted one's slot is zeroed and freed, and one whose factors changed in place is
rewritten. Loading the 65th adapter of SmolLM2 therefore writes
that adapter's 210 slots instead of restacking all 65 in every layer, which stalled the next mixed
step for 2.4 s. Only a rank larger than the bank's, another dtype, or more than a quarter of the
slots free restacks (``adapter.stack``) with the ranks padded anew.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Mapping, Sequence

import torch

from . import adapter
from .adapter import LoRAAdapter
from .hot import EmptySlot
from .versions import watch_optimizer_steps

_RANK = operator.attrgetter("r")
_COPIES = itertools.count()  # AdapterBank.slot_gen numbers: unique across banks, so a copy is never mistaken for current


class AdapterBank:
    """Every adapter of one linear layer stacked, for per-row adapters.

    Attributes:
        a_t: (S, in, r_max) = ``A^T`` of each adapter, zero-padded to the largest rank (exact); a free
            slot is all zeros.
        b_t: (S, r_max, out) = ``(s·B)^T``, the scaling folded in.
        a_cat: (in, S·r_max), ``a_t``'s slots side by side (a view), and ``b_cat`` (S·r_max, out), a view of
            ``b_t``: every resident adapter in two dense matmuls (``adapter.masked_bypass_``).
        slots: adapter name -> its index along S; ``names``: the names in slot order (an ``EmptySlot``
            where a slot is free).
        slot_gen: per slot, a number no earlier content of it had (``HotBank``'s check of its copies).

    ``sync`` keeps it current at the cost of an int comparison per layer: when the layer's set of
    adapters changed (``version``, bumped by add / delete), only the added and deleted adapters' slots
    are written; when an adapter's factors changed in place (a load, an optimizer step: the Parameters'
    version counters, their storage, their identity), its slot is rewritten. The bank costs one more
    copy of the adapters' weights.
    """

    def __init__(self) -> None:
        watch_optimizer_steps()  # fused optimizer steps move no version counter by themselves (lorakit.versions)
        self.slots: dict[str, int] = {}
        self.names: tuple = ()
        self.a_t: torch.Tensor | None = None
        self.b_t: torch.Tensor | None = None
        self.a_cat: torch.Tensor | None = None
        self._a_full: torch.Tensor | None = None  # (capacity, r_max, in): A's layout; ``a_t`` views its first S slots
        self._b_full: torch.Tensor | None = None  # (capacity, r_max, out); ``b_t`` views its first S slots
        self._version = -1
        self._adapters: list[LoRAAdapter | None] = []  # per slot, None where free
        self.slot_gen: list[int] = []
        self._seen: list[tuple | None] = []  # per slot: ``_stamp`` of its adapter when written

    @staticmethod
    def _stamp(ad: LoRAAdapter) -> tuple:
        """What ``_stale`` compares: the Parameters, their version counters and storage addresses, the
        scaling, and the stored tensors themselves (``detach``: the same storage), so that storage stays
        allocated while the slot copies it: ``p.data = t`` bumps no version counter, and the allocator
        would otherwise soon hand a later tensor the very address compared (two such assignments in a
        row usually do, and the slot went on serving the old factors)."""
        p = ad._parameters  # not ad.lora_A: nn.Module.__getattr__ costs a microsecond per read
        a, b = p["lora_A"], p["lora_B"]
        return a, a._version, a.data_ptr(), b, b._version, b.data_ptr(), ad.scaling, (a.detach(), b.detach())

    def sync(self, adapters: Mapping[str, LoRAAdapter], version: int, names: Sequence[str], dtype: torch.dtype) -> None:
        """Bring the slots of ``names`` up to date with ``adapters`` (all of the layer's, in order; read
        only when ``version`` changed, so a sync costs no pass over every resident adapter).

        Raises:
            KeyError: a name the layer does not hold.
        """
        restack = self.a_t is None or self.a_t.dtype != dtype
        changed = version != self._version
        stale = [] if restack or changed else self._stale(names)
        if not restack and not changed and not stale:  # the common case, once per layer and new mix: no grad-mode switch
            return
        # a block, not a decorator: mutation testing (mutmut) skips decorated functions. Not an inference
        # tensor even under torch.inference_mode: a later block without it writes the slots in place
        with torch.inference_mode(False), torch.no_grad():
            if not restack and changed:
                restack = not self._update(list(adapters.values()), dtype)
                stale = [] if restack else self._stale(names)
            if restack:
                self._restack(list(adapters.values()), dtype)
            for j in stale:
                self._write(j, dtype)
        self._version = version

    def _stale(self, names: Sequence[str]) -> list[int]:
        """The slots of ``names`` that no longer match their adapter's factors (an in-place change: a load,
        an optimizer step), found with plain comparisons. Raises KeyError for a name the bank does not hold."""
        seen, ads, slots, out = self._seen, self._adapters, self.slots, []
        for n in names:
            j = slots[n]
            a, va, pa, b, vb, pb, s, _ = seen[j]
            ad = ads[j]  # the adapter written there: the version says it is still the layer's
            p = ad._parameters
            if (p["lora_A"] is not a or a._version != va or a.data_ptr() != pa or p["lora_B"] is not b
                    or b._version != vb or b.data_ptr() != pb or ad.scaling != s):
                out.append(j)
        return out

    def _update(self, adapters: list[LoRAAdapter], dtype: torch.dtype) -> bool:
        """Free the slots of adapters the layer no longer holds and write the new ones into free slots
        (growing the bank when none is left). False, changing nothing, where a restack is due instead: a
        rank above the bank's, or more than a quarter of the slots left free. Set operations on the
        adapters' identities (a name deleted and added again is a new adapter): 257 resident adapters in
        210 layers are compared in a few ms."""
        if max(map(_RANK, adapters)) > self.a_t.shape[2]:
            return False
        now = set(map(id, adapters))
        held = set(map(id, self._adapters))
        held.discard(id(None))  # the free slots
        gone = held - now
        new = [ad for ad in adapters if id(ad) not in held]
        free = self._adapters.count(None) + len(gone)
        if 4 * (free - len(new)) > len(self._adapters):  # compact: the spare slots would cost every step
            return False
        names = list(self.names)
        for j, ad in enumerate(self._adapters if gone else ()):  # a pass over the slots only when one is freed
            if id(ad) in gone:
                self._adapters[j], self._seen[j], names[j] = None, None, EmptySlot()
                del self.slots[ad.name]
                self.a_t[j].zero_()
                self.b_t[j].zero_()
                self.slot_gen[j] = next(_COPIES)
        if free < len(new):
            names += self._grow(len(new) - free)
        for ad in new:
            j = self._adapters.index(None)
            self._adapters[j], names[j], self.slots[ad.name] = ad, ad.name, j
            self._write(j, dtype)
        extent = len(self._adapters)
        while self._adapters[extent - 1] is None:  # free slots at the end leave the view (their zeros stay in storage)
            extent -= 1
        del self._adapters[extent:], self._seen[extent:], self.slot_gen[extent:], names[extent:]
        self.names = tuple(names)
        self._view(extent)
        return True

    def _grow(self, extra: int) -> list:
        """``extra`` more free slots at the end (their names returned): from the storage's spare capacity
        (all zeros), else in new storage a quarter larger than needed, so that a server loading and deleting
        adapters one at a time copies the bank once in a while, and the forms over the bank as it lies
        never run over more slots than are held; the slots held keep contents and generations."""
        s_, need = len(self._adapters), len(self._adapters) + extra
        if need > self._a_full.shape[0]:
            cap = max(need, s_ + s_ // 4)
            a, b = self._a_full, self._b_full
            self._a_full, self._b_full = a.new_zeros((cap, *a.shape[1:])), b.new_zeros((cap, *b.shape[1:]))
            self._a_full[:s_], self._b_full[:s_] = a[:s_], b[:s_]
        self._adapters += [None] * extra
        self._seen += [None] * extra
        self.slot_gen += [next(_COPIES) for _ in range(extra)]
        self._view(need)
        return [EmptySlot() for _ in range(extra)]

    def _restack(self, adapters: list[LoRAAdapter], dtype) -> None:
        self._adapters = list(adapters)
        a_t, self._b_full = adapter.stack(adapters, dtype)
        self._a_full = a_t.transpose(1, 2)  # (S, r, in): A's own layout (``hot.a_slots``)
        self._seen = [self._stamp(ad) for ad in adapters]
        self.slot_gen = [next(_COPIES)] * len(adapters)
        self.names = tuple(ad.name for ad in adapters)
        self.slots = {n: j for j, n in enumerate(self.names)}
        self._view(len(adapters))

    def _view(self, s_: int) -> None:
        """``a_t``, ``b_t`` and ``a_cat`` over the first ``s_`` slots of the storage (views, no copy)."""
        self.a_t, self.b_t = self._a_full[:s_].transpose(1, 2), self._b_full[:s_]
        self.a_cat = self._a_full[:s_].reshape(s_ * self._a_full.shape[1], -1).t()  # every slot's A side by side

    def _write(self, j: int, dtype: torch.dtype) -> None:
        ad = self._adapters[j]
        a, sb = ad.folded(dtype)
        self.a_t[j].zero_()[:, : ad.r] = a.t()
        self.b_t[j].zero_()[: ad.r] = sb.t()  # a_cat and b_cat are views: nothing more to copy
        self._seen[j] = self._stamp(ad)
        self.slot_gen[j] = next(_COPIES)

    @property
    def b_cat(self) -> torch.Tensor:
        return self.b_t.view(-1, self.b_t.shape[2])
