"""How one LoRA layer adds the bypasses of one row plan inside a ``mixed_batch`` block (``lorakit.mixed``):
which of the plan's adapters the layer holds, and, built on first use, what each decoding or prefill
form needs from the layer's resident ``AdapterBank`` or its ``HotBank``; and DoRA's per-row rescaling."""

from __future__ import annotations

import operator

import torch

from . import dora
from .hot import HotBank
from .rows import RowPlan

_NAME = operator.attrgetter("name")


def held_segments(layer, plan: RowPlan) -> tuple[tuple, tuple, tuple]:
    """The ``(name, start, end)`` segments of ``plan``'s adapters that ``layer`` holds, and among them
    ``(adapter, start, end)`` of its DoRA adapters and of those with a ``lora_bias`` (the rows the plain
    bypass leaves unfinished). A layer holding every adapter of the plan, none of them DoRA or biased (the
    usual case), answers with one subset test; otherwise the last answer is kept on the layer, so the next
    mix with the same segments (same adapters, same row counts) costs one comparison."""
    version = layer._adapters_version
    names = layer._names
    if names is None or names[0] != version:  # per set of adapters: what it holds, which need more
        ads = list(layer.adapters.values())
        layer._names = names = (version, frozenset(map(_NAME, ads)),
                                {ad.name: ad for ad in ads if ad.use_dora or ad.lora_B_bias is not None})
    if not names[2] and names[1] >= plan.adapters:  # 210 layers of a 16-adapter mix: 5 ms -> 1 ms per change
        return plan.segments, (), ()
    segments, seen = plan.segments, layer._held
    if seen is None or seen[0] != version or seen[1] != segments:
        mine = tuple(seg for seg in segments if seg[0] in names[1])
        special = [(names[2][n], s, e) for n, s, e in mine if n in names[2]] if names[2] else []
        dora_segs = tuple(seg for seg in special if seg[0].use_dora)
        biased = tuple(seg for seg in special if seg[0].lora_B_bias is not None)
        layer._held = seen = (version, segments, (mine, dora_segs, biased))
    return seen[2]


def _hot(layer, names: tuple[str, ...], router) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """``(A^T (C, in, r_max), (s·B)^T (C, r_max, out), slot names)`` of the layer's ``HotBank`` with
    ``names`` admitted, their bank slots brought up to date first (``router.bank``). Adapters hot since an
    earlier mix (and unchanged) are not copied again."""
    bank = router.bank(layer, names)
    if layer._hot is None:
        layer._hot = HotBank()
    slots = layer._hot.admit(bank, names)
    return layer._hot.a_t, layer._hot.b_t, slots


class Route:
    """How one layer adds the bypasses of one row plan: the segments of adapters it holds and, for
    a batched (linear) layer, what its forms need, built on first use: ``bank_dense()`` (the
    bank's ``a_cat``, ``b_cat`` and a mask (N, 1, S·r) over its slots; ``columns()`` = S·r),
    ``bank_segments()`` (the bank's ``a_t``, ``b_t`` and the rows laid out over its slots) and
    ``hot_segments()`` (the same over the layer's ``HotBank``: the mix's adapters only), the latter
    when ``sparse``: the layer holds (or its bank has slots for) more than ``spare``
    (``mixed.BANK_SPARE``) times the mix's adapters."""

    __slots__ = ("layer", "plan", "router", "segments", "names", "batched", "sparse", "dora", "biased", "_bank", "_banked",
                 "_hotted", "_columns")

    def __init__(self, layer, plan: RowPlan, router, spare: float) -> None:
        self.layer, self.plan, self.router = layer, plan, router
        self.segments, dora_segs, biased = held_segments(layer, plan)
        self.names = plan.names if self.segments is plan.segments else tuple(name for name, _, _ in self.segments)
        self.batched = getattr(layer, "batched", False) and len(self.segments) > 1
        bank = layer._bank  # its slots, free ones too, are what a pass over the bank as it lies reads
        slots = max(len(layer.adapters._modules), bank.a_t.shape[0] if bank is not None and bank.a_t is not None else 0)
        self.sparse = slots > spare * len(self.segments)  # see mixed.BANK_SPARE
        self.dora = tuple((ad, plan.perm[s:e]) for ad, s, e in dora_segs) if dora_segs else ()
        self.biased = tuple((ad, plan.perm[s:e]) for ad, s, e in biased) if biased else ()
        self._bank = self._banked = self._hotted = self._columns = None

    def bank_segments(self):
        """``(a_t (S, in, r), b_t (S, r, out), BankLayout)``: the bank's slots as they lie. Only the
        mix's slots are brought up to date: the other slots' results are never gathered back."""
        if self._banked is None:  # no grad-mode switch here (0.5 ms a change of mix): the bank syncs under its own
            bank = self.router.bank(self.layer, self.names)
            layout = self.router.layout(self.plan, bank.names, bank.a_t.device)
            self._banked = (bank.a_t, bank.b_t, layout)
        return self._banked

    def columns(self) -> int:
        """S·r_max: the rank columns of the layer's whole bank (what the dense form computes per row). Read
        off the bank's shape, no slot synced: the form then taken syncs the slots it reads."""
        if self._columns is None:
            a_t = self.router.bank(self.layer, ()).a_t  # no names: a version check only (AdapterBank.sync)
            self._columns = a_t.shape[0] * a_t.shape[2]
        return self._columns

    def bank_dense(self):
        """``(a_cat, b_cat, mask)`` over every adapter in the layer's bank, all brought up to date
        (a stale non-finite slot would reach every row through the masked product)."""
        if self._bank is None:
            bank = self.router.bank(self.layer, tuple(self.layer.adapter_names))
            mask = self.router.mask(self.plan, bank.names, bank.a_t.shape[2], bank.a_t.dtype, bank.a_t.device)
            self._bank = (bank.a_cat, bank.b_cat, mask)
        return self._bank

    def hot_segments(self):
        """``(a_t (C, in, r), b_t (C, r, out), BankLayout)``: the rows laid out over the layer's hot slots."""
        if self._hotted is None:  # the slots are copied under HotBank.admit's own no_grad
            a_t, b_t, slots = _hot(self.layer, self.names, self.router)
            self._hotted = (a_t, b_t, self.router.layout(self.plan, slots, a_t.device))
        return self._hotted

    def slot_segments(self):
        """The rows over the slots of the mix: the hot slots when ``sparse``, else the bank's."""
        return self.hot_segments() if self.sparse else self.bank_segments()

    def slots_fit(self) -> bool:
        """Whether the slots' padded rows are at most twice the rows (else one pair per adapter is cheaper)."""
        a_t, _, layout = self.slot_segments()
        return a_t.shape[0] * layout.length <= 2 * sum(e - s for _, s, e in self.segments)


def rescale_dora_rows_(layer, ad, out: torch.Tensor, rows: torch.Tensor) -> None:
    """DoRA adapter ``ad``'s rows of ``out``, which hold ``W x + b + s·B A x`` (its plain bypass), become
    ``g ⊙ (W x + s·B A x) + b`` with ``g = m / ‖W + s·B·A‖_c`` (Liu et al. 2024, eq. 5): the output
    PEFT's DoRA forward gives. Only these rows are rewritten; other rows keep their bits."""
    g = dora.scale(layer, ad)
    sub = out.index_select(0, rows).to(g.dtype)
    bias = getattr(layer.base_layer, "bias", None)
    if bias is not None:
        bias = dora.along(bias.to(g.dtype), sub.dim(), layer.output_axis)
        sub = (sub - bias) * dora.along(g, sub.dim(), layer.output_axis) + bias
    else:
        sub = sub * dora.along(g, sub.dim(), layer.output_axis)
    dora.writable(out).index_copy_(0, rows, sub.to(out.dtype))
